//! Errors of the store.

/// What can go wrong while opening, migrating, reading or writing the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer appliance than this one.
    #[error("database schema version {found} is newer than the supported {supported}")]
    TooNew {
        /// `PRAGMA user_version` found in the file.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// A value given by a caller is not acceptable (e.g. a malformed hash).
    #[error("invalid {what}: {why}")]
    Invalid {
        /// Which value.
        what: &'static str,
        /// Why it was refused.
        why: String,
    },
    /// A referenced row does not exist.
    #[error("no such {what} `{key}`")]
    NotFound {
        /// Kind of row.
        what: &'static str,
        /// Its key.
        key: String,
    },
    /// A state change is not allowed from the current state.
    #[error("{0}")]
    Conflict(String),
    /// Serialising an audit record failed.
    #[error("audit record encoding: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing an export failed.
    #[error("export: {0}")]
    Io(#[from] std::io::Error),
    /// The store lock was poisoned by a panic in another thread.
    #[error("store lock poisoned")]
    Poisoned,
    /// The audit writer task has stopped.
    #[error("the audit writer has stopped")]
    WriterClosed,
    /// The audit batch this event was in could not be committed (nothing
    /// of the batch was stored).
    #[error("audit batch not committed: {0}")]
    Batch(String),
    /// The database or its disk is full (`SQLITE_FULL`); the events of an
    /// audit append were counted in the audit gap.
    #[error("the data partition is full: the event was counted in the audit gap, not stored")]
    DiskFull,
    /// An internal invariant did not hold; please file a bug.
    #[error("internal error (please file a bug): {0}")]
    Unreachable(&'static str),
}

/// How the audit chain was found broken by [`super::Store::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A row's stored hash does not match its recomputed content hash (edited row).
    #[error("audit row {seq}: content hash mismatch (row changed)")]
    HashMismatch {
        /// Sequence number of the row.
        seq: i64,
    },
    /// A row's `prev_hash` is not the hash of the row before it (removed or reordered rows).
    #[error("audit row {seq}: previous-hash link broken (row removed or reordered)")]
    BrokenLink {
        /// Sequence number of the row.
        seq: i64,
    },
    /// Sequence numbers are not contiguous from 1.
    #[error("audit row {seq}: expected sequence {expected} (row removed or reordered)")]
    Gap {
        /// Sequence number found.
        seq: i64,
        /// Sequence number expected.
        expected: i64,
    },
    /// A checkpoint does not continue the one before it (or the genesis).
    #[error("audit checkpoint {id} does not continue the checkpoint before it")]
    Checkpoint {
        /// The checkpoint's id.
        id: i64,
    },
    /// The chain does not end where the recorded head says (tail removed).
    #[error("audit head mismatch: recorded head is row {head_seq}, chain ends at row {last_seq}")]
    Head {
        /// Head recorded at the last append.
        head_seq: i64,
        /// Last row found.
        last_seq: i64,
    },
}
