//! `trustbind-agent`: the user-space half of a protected host.
//!
//! It sits between the PEM (`/dev/trustbind`, records from
//! `trustbind-proto`) and the appliance (gRPC over mutual TLS):
//! [`device`] (the module's channel), [`files`] (protected file sets: paths
//! resolved to the module's device and inode identities), [`keys`] (pushed channel keys held
//! by channel id until the connect/accept they answer takes them), [`link`] (enrolment, credentials, the
//! mTLS channel), [`logging`] (the daemon's log: journald or stderr),
//! [`packages`] (program path -> owning Debian package, from dpkg's file
//! lists, for learning mode), [`run`] (the daemon: batching, offline answers, pushes,
//! spool delivery, status), [`bundle`] (the program/user pairs seen, which
//! the appliance is asked to re-decide and sign), [`signed`] (that signed
//! offline bundle, the only source of offline verdicts), [`spool`] (audit records kept on disk while the appliance is
//! unreachable, delivered later, nothing lost) and [`users`] (uid → name,
//! as the policy's principals are user names).
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

pub mod bundle;
pub mod device;
pub mod files;
pub mod keys;
pub mod link;
pub mod logging;
pub mod packages;
pub mod refusal;
pub mod run;
pub mod signed;
pub mod spool;
pub mod users;
