//! Errors of the policy engine.

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The schema text does not parse.
    #[error("schema: {0}")]
    Schema(String),
    /// The policy text does not parse.
    #[error("policy syntax: {0}")]
    Syntax(String),
    /// The policy set does not validate against the schema (strict mode).
    #[error("policy validation: {0}")]
    Validation(String),
    /// The store (the engine's [`crate::source::Source`]) could not be read.
    #[error("store: {0}")]
    Store(#[from] crate::source::SourceError),
    /// The request names a host that is not registered.
    #[error("host `{0}` is not registered with the appliance")]
    UnknownHost(String),
    /// The request is inconsistent (e.g. an action with the wrong target).
    #[error("request: {0}")]
    Request(String),
    /// Building the Cedar request or entities failed.
    #[error("cedar request for host `{host}`: {why}")]
    Cedar {
        /// The host that asked.
        host: String,
        /// What Cedar said.
        why: String,
    },
    /// A lock was poisoned by a panic in another thread.
    #[error("policy engine lock poisoned")]
    Poisoned,
    /// The store kept changing while a decision was being made.
    #[error("the policy data changed {0} times during one decision; try again")]
    Unstable(u32),
}
