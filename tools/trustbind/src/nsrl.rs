//! `trustbind sig import-nsrl` (being written).

use std::path::PathBuf;

use crate::client::Client;
use crate::error::{CliError, Exit, Result};
use crate::out::Out;

/// Options of an import.
#[derive(Debug)]
#[allow(dead_code)] // read once the import lands
pub struct Options {
    /// The RDSv3 database.
    pub db: PathBuf,
    /// Target group.
    pub group: String,
    /// `KEY=VALUE` filters.
    pub filters: Vec<String>,
    /// Rows per request.
    pub batch: usize,
    /// Ignore saved progress.
    pub restart: bool,
    /// Stop after this many rows.
    pub max_rows: Option<u64>,
    /// State file.
    pub state: Option<PathBuf>,
}

/// Runs an import.
pub fn import(_c: &Client, _o: &Options, _out: &Out) -> Result<u8> {
    Err(CliError::new(
        Exit::Usage,
        "import-nsrl is not implemented yet",
    ))
}
