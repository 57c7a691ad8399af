//! The Trustbind appliance: the server that qualifies exec, file-open,
//! connect and accept requests from enrolled hosts, issues channel keys and
//! keeps the audit chain.
//!
//! Built so far: [`policy`] (the engine deciding requests against the
//! governing Cedar policy set with entities from the store, verdicts with
//! obligations and modes) and [`store`] (SQLite in WAL mode, versioned migrations,
//! signatures and reference groups, policy versions with atomic switch and
//! rollback, hosts, channels, and the hash-chained audit log with verify and
//! JSON-lines export), [`pki`] (the CA, enrolment certificates, TLS configurations)
//! and [`agent_api`] (gRPC over mutual TLS), [`admin`] (the HTTPS admin
//! API), [`alerts`] (`@alert` delivery to a webhook and syslog over TLS)
//! and [`grow`] (the data partition and its ext4 fill a larger disk at boot).
// `unsafe` is denied everywhere but the two ioctls of `sys.rs` (allowed
// there function by function).
#![deny(unsafe_code)]
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
pub mod agent_api;
pub mod alerts;
pub mod audit_seal;
pub mod casign;
pub mod channels;
pub mod gate;
pub mod grants;
pub mod grow;
pub mod hostaddr;
pub mod learn;
pub mod limits;
pub mod metrics;
pub mod ntp;
pub mod pki;
pub mod ratelimit;
pub mod retention;
pub mod seal;
pub mod store;
pub mod sys;
pub mod tickets;

// The policy engine, the request model, file sets and the time zone live in
// `trustbind-policy` (shared with the CLI), under their old paths here.
pub use trustbind_policy as policy;
pub use trustbind_policy::{clock, files, request};
