//! Sharing the host's cores between tests that run at the same time.
//!
//! Each VM runs on one emulated CPU, so a test with one VM keeps one host
//! core busy and a test with an appliance and two hosts keeps three busy.
//! `cargo xtask test` runs as many tests at once as the host has cores;
//! each [`Network`](crate::Network) holds a [`Share`] of cores, one per VM
//! it started (at most all of them), so single-VM tests run side by side
//! and a test with several VMs waits until it has the cores to itself
//! instead of slowing everyone's guests past their timeouts.
//!
//! A test that needs more cores gives back what it holds and waits for the
//! larger share, so two tests growing at once cannot deadlock; while one
//! waits to grow, no new share is handed out, so it is not starved.

use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

/// The cores of this process's tests: how many are free, and how many
/// shares wait to grow.
struct Pool {
    state: Mutex<State>,
    changed: Condvar,
    cores: usize,
}

struct State {
    free: usize,
    growing: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::env::var("TRUSTBIND_TEST_CORES")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0)
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1);
        Pool {
            state: Mutex::new(State {
                free: cores,
                growing: 0,
            }),
            changed: Condvar::new(),
            cores,
        }
    })
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock left the counts
        // consistent (every change is one statement), so go on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Cores held by one test network; given back on drop.
#[derive(Debug, Default)]
pub(crate) struct Share {
    held: usize,
}

impl Share {
    /// Holds `want` cores (at most all of them), waiting until they are
    /// free. Never shrinks.
    pub(crate) fn grow(&mut self, want: usize) {
        let pool = pool();
        let want = want.min(pool.cores);
        if want <= self.held {
            return;
        }
        let mut st = pool.lock();
        let growing = self.held > 0;
        st.free += self.held;
        self.held = 0;
        if growing {
            st.growing += 1;
            pool.changed.notify_all();
        }
        while st.free < want || (!growing && st.growing > 0) {
            st = pool.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if growing {
            st.growing -= 1;
        }
        st.free -= want;
        self.held = want;
        pool.changed.notify_all();
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.held == 0 {
            return;
        }
        let pool = pool();
        let mut st = pool.lock();
        st.free += self.held;
        pool.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Whatever the interleaving, the cores held never exceed the pool and
    /// every test finishes (no deadlock when several grow at once).
    #[test]
    fn shares_never_exceed_the_pool_and_all_finish() {
        let cores = pool().cores;
        let in_use = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (in_use, peak) = (in_use.clone(), peak.clone());
                std::thread::spawn(move || {
                    let mut s = Share::default();
                    for want in 1..=(1 + i % 3) {
                        // While it waits to grow, a share holds nothing.
                        in_use.fetch_sub(s.held, Ordering::SeqCst);
                        s.grow(want);
                        let now = in_use.fetch_add(s.held, Ordering::SeqCst) + s.held;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    in_use.fetch_sub(s.held, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= cores);
        assert_eq!(pool().lock().free, cores);
    }
}
