//! Group-commit audit writer.
//!
//! Appends from many tasks are queued to one writer task, which takes
//! everything queued (up to a bound), appends it to the chain in one
//! transaction and commits once (one fsync for the whole batch). Each
//! caller's `append` resolves only after that commit: an acknowledged row
//! is durable. While one batch commits, the next one gathers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{AuditEvent, AuditRow, Store, StoreError};

/// Appends waiting for the writer before `append` itself waits.
const QUEUE: usize = 65_536;

/// Most events committed in one transaction.
pub const MAX_BATCH: usize = 1024;

struct Pending {
    ev: AuditEvent,
    done: oneshot::Sender<Result<AuditRow, StoreError>>,
}

/// Counters of an [`AuditWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Events committed.
    pub appended: u64,
    /// Transactions committed.
    pub batches: u64,
}

#[derive(Debug, Default)]
struct Counters {
    appended: AtomicU64,
    batches: AtomicU64,
}

/// Handle on the writer task; cheap to clone, share it freely.
#[derive(Debug, Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Pending>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("kind", &self.ev.kind)
            .finish()
    }
}

impl AuditWriter {
    /// Starts the writer on a thread of its own, which waits on its queue
    /// (no hand-off to a blocking pool per commit). The thread ends when
    /// every handle is dropped.
    pub fn spawn(store: Arc<Store>) -> AuditWriter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = Arc::clone(&counters);
        // Like tokio's own blocking threads, a thread the OS cannot start
        // is a panic here (the appliance cannot audit without it).
        std::thread::spawn(move || run(&store, rx, &c));
        AuditWriter { tx, counters }
    }

    /// Appends `ev` to the audit chain; returns the stored row once the
    /// transaction holding it has committed.
    pub async fn append(&self, ev: AuditEvent) -> Result<AuditRow, StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending { ev, done })
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        wait.await.map_err(|_| StoreError::WriterClosed)?
    }

    /// Events and transactions committed so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            appended: self.counters.appended.load(Ordering::Relaxed),
            batches: self.counters.batches.load(Ordering::Relaxed),
        }
    }
}

fn run(store: &Store, mut rx: mpsc::Receiver<Pending>, counters: &Counters) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let (events, dones): (Vec<AuditEvent>, Vec<_>) =
            batch.into_iter().map(|p| (p.ev, p.done)).unzip();
        let n = events.len();
        let t = std::time::Instant::now();
        // A panic fails this batch's callers, not the writer (as a failed
        // blocking task did before the writer had its own thread).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.append_audit_owned(events)
        }))
        .unwrap_or_else(|_| Err(StoreError::Batch("the audit writer panicked".into())));
        crate::metrics::metrics().record_audit_commit(t.elapsed(), n);
        match result {
            Ok(rows) => {
                counters.appended.fetch_add(n as u64, Ordering::Relaxed);
                counters.batches.fetch_add(1, Ordering::Relaxed);
                for (done, row) in dones.into_iter().zip(rows) {
                    // The caller may have gone away; the row is stored anyway.
                    let _ = done.send(Ok(row));
                }
            }
            Err(StoreError::DiskFull) => {
                // Counted in the audit gap by the store.
                for done in dones {
                    let _ = done.send(Err(StoreError::DiskFull));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for done in dones {
                    let _ = done.send(Err(StoreError::Batch(why.clone())));
                }
            }
        }
    }
}
