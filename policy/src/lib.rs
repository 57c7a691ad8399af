//! Trustbind's policy: the language, the engine, the requests it decides
//! and the audit record of its decisions, shared by the appliance (which
//! decides for enrolled hosts) and the CLI (`trustbind policy validate`,
//! `policy test --replay-audit`, `audit verify-export`) so that both
//! decide, validate and verify alike.
//!
//! This module turns a Cedar authorization response into a Trustbind
//! verdict. Cedar gives allow/deny (deny by default, forbid overrides
//! permit) and the determining policies; this adds what Cedar does not
//! know: the obligations carried by annotations on the determining permit
//! policies, the policy names (`@id`) used as reasons, and the host group's
//! mode. [`engine`] builds Cedar requests from
//! [`request::QualifyRequest`]s and a [`source::Source`] (the appliance's
//! store), with the slicing index ([`mod@slice`]) and a decision cache.
//!
//! Also here: [`files`] (protected file sets), [`clock`] (the time zone
//! policies read hours and weekdays in), [`check`] (offline validation),
//! [`audit`] (the hash chain, checkpoints, export verification), [`cert`]
//! (what a Trustbind certificate says) and [`wire`] (the admin API's
//! limits). No I/O of its own beyond reading export files.
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

pub mod audit;
pub mod audit_seal;
mod cache;
pub mod cert;
pub mod check;
pub mod class;
pub mod clock;
pub mod compiled;
pub mod engine;
mod err;
pub mod explain;
pub mod files;
pub mod reads;
pub mod request;
pub mod slice;
pub mod source;
pub mod wire;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Decision, PolicySet, Response, Schema, ValidationMode, Validator};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use check::SCHEMA;
pub use err::PolicyError;
pub use explain::Diagnosis;

use crate::source::Mode;

/// Annotations that become obligations when on a determining permit policy.
pub const OBLIGATIONS: &[&str] = &[
    "encrypt",
    "channel_idle_s",
    "nice",
    "cpu_limit_s",
    "alert",
    "log_level",
];

/// Values `@encrypt` may take: a channel with TLS 1.3 records, or with
/// TLS 1.2 records (which NICs can offload).
pub const ENCRYPT_VALUES: &[&str] = &["required", "offload"];

/// An obligation annotation whose value the appliance cannot act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObligationProblem {
    /// What is wrong, naming the policy and the annotation.
    pub message: String,
    /// Byte offset and length of the annotation in the policy text, when
    /// found there.
    pub span: Option<(usize, usize)>,
}

/// Where `@key(...)` holding `"value"` is in `text` (the first such).
fn annotation_span(text: &str, key: &str, value: &str) -> Option<(usize, usize)> {
    let at = format!("@{key}");
    let quoted = format!("\"{value}\"");
    let mut from = 0;
    while let Some(i) = text.get(from..)?.find(&at) {
        let start = from + i;
        let end = start + text.get(start..)?.find(')')? + 1;
        if text.get(start..end)?.contains(&quoted) {
            return Some((start, end - start));
        }
        from = start + at.len();
    }
    None
}

/// Checks the values of the channel obligations of every policy in `set`
/// (parsed from `text`): `@encrypt` one of [`ENCRYPT_VALUES`],
/// `@channel_idle_s` a whole number of seconds (1 to 2^31 − 1).
pub fn obligation_problems(set: &PolicySet, text: &str) -> Vec<ObligationProblem> {
    let mut bad = Vec::new();
    for p in set.policies() {
        let id = p
            .annotation("id")
            .map_or_else(|| p.id().to_string(), str::to_owned);
        if let Some(v) = p.annotation("encrypt") {
            if !ENCRYPT_VALUES.contains(&v) {
                bad.push(ObligationProblem {
                    message: format!(
                        "policy `{id}`: @encrypt(\"{v}\"): expected \"required\" or \"offload\""
                    ),
                    span: annotation_span(text, "encrypt", v),
                });
            }
        }
        if let Some(v) = p.annotation("channel_idle_s") {
            if !matches!(v.parse::<u32>(), Ok(1..=0x7fff_ffff)) {
                bad.push(ObligationProblem {
                    message: format!(
                        "policy `{id}`: @channel_idle_s(\"{v}\"): expected whole seconds, 1 to 2147483647"
                    ),
                    span: annotation_span(text, "channel_idle_s", v),
                });
            }
        }
    }
    bad
}

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
    let bad = obligation_problems(&set, text);
    if !bad.is_empty() {
        let msgs: Vec<String> = bad.into_iter().map(|b| b.message).collect();
        return Err(PolicyError::Validation(msgs.join("; ")));
    }
    let identity = hex::encode(Sha256::digest(text.as_bytes()));
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
    /// `@alert` names of the determining policies (permits of an allow,
    /// forbids of a deny; none in disabled mode), sorted: each is
    /// delivered to the alert sinks once the decision is audited.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<String>,
    /// When Cedar denied (enforced or would-deny): the entity data and
    /// what no permit got ([`explain`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Arc<Diagnosis>>,
}

impl Outcome {
    /// An outcome with no reasons, alerts or diagnosis.
    pub fn bare(verdict: Verdict) -> Self {
        Outcome {
            verdict,
            reasons: Vec::new(),
            would_deny: false,
            errors: 0,
            alerts: Vec::new(),
            explain: None,
        }
    }
}

/// The annotations of one policy that [`outcome`] uses, read once.
///
/// Reading an annotation parses its key each time; the engine reads every
/// policy's once when it loads the set and keeps these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyMeta {
    /// `@id`, else the Cedar policy id.
    pub name: String,
    /// Obligation annotations present on the policy, in [`OBLIGATIONS`] order.
    pub obligations: Vec<(&'static str, String)>,
    /// `@alert`, on a permit or a forbid.
    pub alert: Option<String>,
}

impl PolicyMeta {
    /// Reads the annotations of `p`.
    pub fn of(p: &cedar_policy::Policy) -> Self {
        PolicyMeta {
            name: p
                .annotation("id")
                .map_or_else(|| p.id().to_string(), str::to_owned),
            obligations: OBLIGATIONS
                .iter()
                .filter_map(|k| p.annotation(k).map(|v| (*k, v.to_owned())))
                .collect(),
            alert: p.annotation("alert").map(str::to_owned),
        }
    }
}

/// Maps a Cedar response to an outcome under the host group's `mode`.
pub fn outcome(set: &PolicySet, resp: &Response, mode: Mode) -> Outcome {
    outcome_with(resp, mode, |id| set.policy(id).map(PolicyMeta::of))
}

/// [`outcome`] with the policies' annotations looked up by `meta`.
pub fn outcome_with<M: std::borrow::Borrow<PolicyMeta>>(
    resp: &Response,
    mode: Mode,
    meta: impl Fn(&cedar_policy::PolicyId) -> Option<M>,
) -> Outcome {
    outcome_of(
        resp.decision() == Decision::Allow,
        resp.diagnostics().reason().collect(),
        resp.diagnostics().errors().count(),
        mode,
        meta,
    )
}

/// [`outcome_with`] from its parts: whether Cedar allowed, the
/// determining policies and the number of evaluation errors (a decision
/// made without Cedar, [`compiled`], has the same parts).
pub fn outcome_of<M: std::borrow::Borrow<PolicyMeta>>(
    allow: bool,
    mut ids: Vec<&cedar_policy::PolicyId>,
    errors: usize,
    mode: Mode,
    meta: impl Fn(&cedar_policy::PolicyId) -> Option<M>,
) -> Outcome {
    let decision = if allow {
        Decision::Allow
    } else {
        Decision::Deny
    };
    let mut reasons = Vec::new();
    let mut alerts = Vec::new();
    let mut obligations = BTreeMap::new();
    // Sorted, so that obligations and reasons do not depend on hash order.
    ids.sort_unstable();
    for id in ids {
        let m = meta(id);
        let m = m.as_ref().map(std::borrow::Borrow::borrow);
        reasons.push(m.map_or_else(|| id.to_string(), |m| m.name.clone()));
        if mode != Mode::Disabled {
            alerts.extend(m.and_then(|m| m.alert.clone()));
        }
        if decision == Decision::Allow {
            for (k, v) in m.map(|m| m.obligations.as_slice()).unwrap_or_default() {
                obligations.insert((*k).to_owned(), v.clone());
            }
        }
    }
    let (verdict, would_deny) = match (mode, decision) {
        (Mode::Disabled, _) => (Verdict::Allow, false),
        (_, Decision::Allow) if obligations.is_empty() => (Verdict::Allow, false),
        (_, Decision::Allow) => (Verdict::AllowWithConditions { obligations }, false),
        (Mode::Permissive, Decision::Deny) => (Verdict::Allow, true),
        (Mode::Enforce, Decision::Deny) => (Verdict::Deny, false),
    };
    alerts.sort_unstable();
    alerts.dedup();
    Outcome {
        verdict,
        reasons,
        would_deny,
        errors,
        alerts,
        explain: None,
    }
}
