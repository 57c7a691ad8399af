//! Turning a Cedar authorization response into a Trustbind verdict.
//!
//! Cedar gives allow/deny (deny by default, forbid overrides permit) and the
//! determining policies. This module adds what Cedar does not know: the
//! obligations carried by annotations on the determining permit policies,
//! the policy names (`@id`) used as reasons, and the host group's mode.
//! [`engine`] builds Cedar requests from [`crate::request::QualifyRequest`]s
//! and the store, with the slicing index ([`mod@slice`]) and a decision cache.

mod cache;
pub mod engine;
mod err;
pub mod reads;
pub mod slice;

use std::collections::BTreeMap;
use std::str::FromStr;

use cedar_policy::{Decision, PolicySet, Response, Schema, ValidationMode, Validator};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use err::PolicyError;

use crate::store::{hex, Mode};

/// Annotations that become obligations when on a determining permit policy.
pub const OBLIGATIONS: &[&str] = &["encrypt", "nice", "cpu_limit_s", "alert", "log_level"];

/// A validated policy set and its ruleset identity.
#[derive(Debug)]
pub struct LoadedPolicy {
    /// The policies.
    pub set: PolicySet,
    /// SHA-256 of the policy text, logged whenever it is loaded.
    pub identity: String,
}

/// Parses `schema` and `text` and validates `text` in strict mode.
pub fn load(schema: &str, text: &str) -> Result<(Schema, LoadedPolicy), PolicyError> {
    let (schema, _warnings) =
        Schema::from_cedarschema_str(schema).map_err(|e| PolicyError::Schema(e.to_string()))?;
    let loaded = validate(&schema, text)?;
    Ok((schema, loaded))
}

/// Parses `text` and validates it in strict mode against an already parsed `schema`.
pub fn validate(schema: &Schema, text: &str) -> Result<LoadedPolicy, PolicyError> {
    let set = PolicySet::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        let msgs: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
        return Err(PolicyError::Validation(msgs.join("; ")));
    }
    let identity = hex(&Sha256::digest(text.as_bytes()));
    Ok(LoadedPolicy { set, identity })
}

/// What the appliance answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Proceed.
    Allow,
    /// Proceed under these obligations (annotation name -> value).
    AllowWithConditions {
        /// E.g. `encrypt -> required`, `nice -> 10`.
        obligations: BTreeMap<String, String>,
    },
    /// Refuse.
    Deny,
}

/// A verdict with its reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The answer sent to the agent.
    pub verdict: Verdict,
    /// Names (`@id`, else the Cedar policy id) of the determining policies.
    pub reasons: Vec<String>,
    /// Set in permissive mode when the policy would have denied.
    pub would_deny: bool,
    /// Set when evaluation raised errors (the affected policies are skipped by Cedar).
    pub errors: usize,
}

/// Maps a Cedar response to an outcome under the host group's `mode`.
pub fn outcome(set: &PolicySet, resp: &Response, mode: Mode) -> Outcome {
    let mut reasons = Vec::new();
    let mut obligations = BTreeMap::new();
    // Sorted, so that obligations and reasons do not depend on hash order.
    let mut ids: Vec<&cedar_policy::PolicyId> = resp.diagnostics().reason().collect();
    ids.sort_unstable();
    for id in ids {
        let name = set
            .policy(id)
            .and_then(|p| p.annotation("id"))
            .map_or_else(|| id.to_string(), str::to_owned);
        reasons.push(name);
        if resp.decision() == Decision::Allow {
            if let Some(p) = set.policy(id) {
                for key in OBLIGATIONS {
                    if let Some(v) = p.annotation(key) {
                        obligations.insert((*key).to_owned(), v.to_owned());
                    }
                }
            }
        }
    }
    let errors = resp.diagnostics().errors().count();
    let (verdict, would_deny) = match (mode, resp.decision()) {
        (Mode::Disabled, _) => (Verdict::Allow, false),
        (_, Decision::Allow) if obligations.is_empty() => (Verdict::Allow, false),
        (_, Decision::Allow) => (Verdict::AllowWithConditions { obligations }, false),
        (Mode::Permissive, Decision::Deny) => (Verdict::Allow, true),
        (Mode::Enforce, Decision::Deny) => (Verdict::Deny, false),
    };
    Outcome {
        verdict,
        reasons,
        would_deny,
        errors,
    }
}
