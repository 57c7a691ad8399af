//! The gRPC API between `trustbind-agent` and `trustbind-appliance`,
//! generated from `proto/trustbind/agent/v1/agent.proto`: the one
//! definition both sides compile (clients and servers for `Enrolment` and
//! `Agent`), and [`pinned`], the enrol port's client side both the agent
//! and the admin CLI use (with `write_atomic`, which the appliance uses
//! for its own PKI files too).

pub mod codec;
pub mod inventory;
pub mod module;
pub mod pinned;

/// Code generated from `proto/trustbind/agent/v1/agent.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
pub mod pb {
    tonic::include_proto!("trustbind.agent.v1");
}
