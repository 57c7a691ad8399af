//! The Trustbind appliance: the server that qualifies exec, file-open,
//! connect and accept requests from enrolled hosts, issues channel keys and
//! keeps the audit chain.
//!
//! Built so far: [`policy`] (the engine deciding requests against the
//! governing Cedar policy set with entities from the store, verdicts with
//! obligations and modes) and [`store`] (SQLite in WAL mode, versioned migrations,
//! signatures and reference groups, policy versions with atomic switch and
//! rollback, hosts, channels, and the hash-chained audit log with verify and
//! JSON-lines export). The agent and admin APIs follow.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admin;
pub mod channels;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod store;
