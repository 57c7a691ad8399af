//! The Trustbind appliance: the server that qualifies exec, file-open,
//! connect and accept requests from enrolled hosts, issues channel keys and
//! keeps the audit chain.
//!
//! Built so far: [`policy`] (verdicts with obligations and modes from a
//! validated Cedar policy set) and [`store`] (SQLite in WAL mode, versioned migrations,
//! signatures and reference groups, policy versions with atomic switch and
//! rollback, hosts, channels, and the hash-chained audit log with verify and
//! JSON-lines export). The policy engine, the agent and admin APIs follow.
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

pub mod agent_api;
pub mod pki;
pub mod policy;
pub mod request;
pub mod store;
