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
}
