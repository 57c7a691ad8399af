//! `trustbind policy test --replay-audit` (being written).

use crate::client::Client;
use crate::error::{CliError, Exit, Result};
use crate::out::Out;

/// Runs a replay.
pub fn run(_c: &Client, _draft: &str, _since: &str, _out: &Out) -> Result<u8> {
    Err(CliError::new(
        Exit::Usage,
        "policy test is not implemented yet",
    ))
}
