//! What the engine decides with, and where it reads it from.
//!
//! The appliance's store is the [`Source`] it runs on; `trustbind policy
//! test --replay-audit` gives the engine a fixed one mirrored from the
//! admin API. The types here are the engine's view of the store's tables.

use std::collections::HashMap;
use std::sync::Weak;

use serde::{Deserialize, Serialize};

use crate::files::FileSet;

/// Mode of a host group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny what the policy denies.
    Enforce,
    /// Allow, but audit "would deny".
    Permissive,
    /// No qualification.
    Disabled,
}

impl Mode {
    /// The database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Permissive => "permissive",
            Self::Disabled => "disabled",
        }
    }
}

/// Lifecycle state of a policy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyState {
    /// Uploaded, not in force.
    Draft,
    /// The governing policy.
    Active,
    /// Was active once.
    Retired,
}

impl PolicyState {
    /// The database spelling's state.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "draft" => Some(Self::Draft),
            "active" => Some(Self::Active),
            "retired" => Some(Self::Retired),
            _ => None,
        }
    }
}

/// One stored policy-set text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// Row id.
    pub id: i64,
    /// Cedar policy-set text.
    pub text: String,
    /// SHA-256 of `text` (the ruleset identity).
    pub sha256: String,
    /// Lifecycle state.
    pub state: PolicyState,
}

/// What the data the engine decides with is versioned by, as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Versions {
    /// The verdict generation (what hosts cache under).
    pub generation: i64,
    /// Moves with the policy, hosts, host groups and users.
    pub data: i64,
    /// Moves with reference-group memberships.
    pub members: i64,
}

/// Everything the policy engine needs besides program memberships, read in
/// one consistent view by [`Source::engine_data`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineData {
    /// Verdict generation and data versions of this view.
    pub versions: Versions,
    /// Verdict generation of this view (`versions.generation`).
    pub generation: i64,
    /// The governing policy version, if any.
    pub policy: Option<PolicyVersion>,
    /// Host name -> (host group, the group's mode).
    pub hosts: HashMap<String, (String, Mode)>,
    /// User name -> roles, sorted.
    pub users: HashMap<String, Vec<String>>,
    /// The protected file sets, by name.
    pub file_sets: Vec<FileSet>,
}

/// Compiles a policy version before it becomes the governing one, so that
/// the engine swaps to it without compiling on the decision path
/// ([`Source::add_policy_prep`]).
pub trait PolicyPrep: Send + Sync {
    /// Called, outside every lock, before `pv` is made governing.
    fn prepare(&self, pv: &PolicyVersion);
}

/// A failure reading the engine's data (the source's own error, boxed).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SourceError(Box<dyn std::error::Error + Send + Sync>);

impl SourceError {
    /// Wraps the source's own error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(e))
    }

    /// The source's own error, to match on.
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

/// What the engine reads. Versions move only after the change that moved
/// them is visible to [`Source::engine_data`] and [`Source::groups_of_at`].
pub trait Source: Send + Sync {
    /// The last committed versions, cheap (read before every decision).
    fn versions_hint(&self) -> Versions;

    /// The committed versions, read from the source itself.
    fn versions(&self) -> Result<Versions, SourceError>;

    /// The governing policy, hosts with their groups' modes, users with
    /// their roles and the file sets, all as of one generation.
    fn engine_data(&self) -> Result<EngineData, SourceError>;

    /// Reference groups of a program, sorted, with the membership version
    /// they belong to, read in one consistent view.
    fn groups_of_at(&self, sha256: &str) -> Result<(Vec<String>, i64), SourceError>;

    /// Records that a decision about `programs` was answered, allowing or
    /// not, from data at `generation` and membership version `members`.
    /// False: the host must not cache the answer (a membership change
    /// touching one of them raced it).
    fn note_answer(&self, generation: i64, members: i64, programs: &[&str], allow: bool) -> bool;

    /// Registers `prep`, called with each policy version about to become
    /// governing before the switch is written.
    fn add_policy_prep(&self, prep: Weak<dyn PolicyPrep>);
}
