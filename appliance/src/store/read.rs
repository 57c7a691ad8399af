//! Read connections: every read that needs no write transaction runs on
//! one of these, never on the writer's connection, so a decision's lookup
//! does not wait behind a commit's fsync, a long audit verification or an
//! export (WAL mode: readers see the last commit and never block the
//! writer, and the writer never blocks them).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;

/// Read connections kept open. More readers at once get a connection of
/// their own for the call (opening one costs about 100 µs).
const POOLED: usize = 4;

/// The pool of read connections.
#[derive(Debug)]
pub(super) struct Readers {
    path: PathBuf,
    pooled: Vec<Mutex<Connection>>,
}

/// A read connection for one call: pooled, or opened for it alone.
pub(super) enum Reader<'a> {
    Pooled(MutexGuard<'a, Connection>),
    Own(Connection),
}

impl Deref for Reader<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Reader::Pooled(g) => g,
            Reader::Own(c) => c,
        }
    }
}

fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // A reader never writes; refuse it if some code path tries.
    conn.pragma_update(None, "query_only", true)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

impl Readers {
    /// Opens the pool on the database at `path` (already in WAL mode and
    /// migrated by the writer's connection).
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let pooled = (0..POOLED)
            .map(|_| open(path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Readers {
            path: path.to_owned(),
            pooled,
        })
    }

    /// A free pooled connection, or a new one when all are busy: a reader
    /// never waits for another reader.
    pub(super) fn get(&self) -> Result<Reader<'_>, StoreError> {
        for m in &self.pooled {
            match m.try_lock() {
                Ok(g) => return Ok(Reader::Pooled(g)),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Poisoned(_)) => return Err(StoreError::Poisoned),
            }
        }
        Ok(Reader::Own(open(&self.path)?))
    }
}
