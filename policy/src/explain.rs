//! Why a request was denied: what the policy set's permits for its action
//! needed that the request's entities do not have.
//!
//! Cedar names the determining policies (`Response::diagnostics().reason()`:
//! the satisfied permits of an allow, the satisfied forbids of a deny); a
//! default deny has none. For that case this module compares every permit
//! of the action with the request's entity data (the user's roles, the
//! program's reference groups, the host's host group, the resource) and
//! says, per permit, which part did not hold: its principal scope, its
//! resource scope, a top-level `when` conjunct on `context.program` or
//! `context.host`, or else its other conditions (naming what they read).
//! The shapes of the permits are read once per policy set ([`Permits::new`]),
//! so a diagnosis costs a pass over the action's permits, no evaluation.

use std::collections::BTreeSet;

use cedar_policy::{
    ActionConstraint, Effect, EntityUid, Policy, PrincipalConstraint, ResourceConstraint,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::Action;

/// Lines about permits in one diagnosis before the rest are only counted.
pub const MAX_PERMIT_LINES: usize = 8;

/// The entity data and policy facts behind a Cedar deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// The host's host group.
    pub host_group: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// The program's reference groups.
    pub groups: Vec<String>,
    /// What was missing for a permit to apply, one line per fact or
    /// permit; empty when a forbid decided (the reasons name it).
    pub missing: Vec<String>,
    /// Policies Cedar skipped because evaluating them failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// What a request offers the scopes of a permit.
#[derive(Debug)]
pub struct Facts<'a> {
    /// The action.
    pub action: Action,
    /// `User::"<name>"`, then its roles.
    pub principal: &'a [EntityUid],
    /// The resource, then its parents (for `exec`: the program, then its
    /// groups).
    pub resource: &'a [EntityUid],
    /// The program doing the action, then its groups.
    pub program: &'a [EntityUid],
    /// `Host::"<name>"`, then its host group.
    pub host: &'a [EntityUid],
    /// Whether a policy is in force at all.
    pub policy: bool,
}

/// A top-level `when` conjunct `context.<attr> in|== <entity>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Needs {
    attr: String,
    is_in: bool,
    entity: EntityUid,
}

/// One permit, as far as a diagnosis needs it.
#[derive(Debug, Clone)]
struct Shape {
    name: String,
    actions: Vec<Action>,
    principal: PrincipalConstraint,
    resource: ResourceConstraint,
    needs: Vec<Needs>,
    /// Conditions besides `needs` (other `when` conjuncts, any `unless`).
    other_conditions: bool,
    /// `context.<attr>` and entities its conditions mention, for the line
    /// that says they were false.
    mentions: Vec<String>,
}

/// The permits of a policy set, read once, by action (each list by name),
/// so that a diagnosis looks at no more than it lists.
#[derive(Debug, Clone, Default)]
pub struct Permits {
    by_action: Vec<(Action, Vec<Shape>)>,
}

impl Permits {
    /// Reads the permits of `policies` (`ests`: their JSON forms, in the
    /// same order; `None` when a policy has none).
    pub fn new(
        policies: &[Policy],
        ests: &[Option<Value>],
        name: impl Fn(&Policy) -> String,
    ) -> Self {
        let mut shapes: Vec<Shape> = policies
            .iter()
            .zip(ests)
            .filter(|(p, _)| p.effect() == Effect::Permit)
            .map(|(p, est)| shape(p, est.as_ref(), name(p)))
            .collect();
        shapes.sort_by(|a, b| a.name.cmp(&b.name));
        let by_action = Action::ALL
            .iter()
            .map(|a| {
                let of: Vec<Shape> = shapes
                    .iter()
                    .filter(|s| s.actions.contains(a))
                    .cloned()
                    .collect();
                (*a, of)
            })
            .collect();
        Permits { by_action }
    }

    /// Explains a Cedar deny with no determining policy: the facts that
    /// matter and, per permit of the action, what it lacked.
    pub fn missing(&self, f: &Facts<'_>) -> Vec<String> {
        let mut out = Vec::new();
        if !f.policy {
            out.push("no policy is active: everything is denied by default".to_owned());
            return out;
        }
        if f.program.len() <= 1 {
            out.push("the program is in no reference group".to_owned());
        }
        let permits: &[Shape] = self
            .by_action
            .iter()
            .find(|(a, _)| *a == f.action)
            .map_or(&[], |(_, p)| p.as_slice());
        if permits.is_empty() {
            out.push(format!(
                "no permit policy covers action `{}`",
                f.action.as_str()
            ));
            return out;
        }
        for (shown, s) in permits.iter().enumerate() {
            if shown == MAX_PERMIT_LINES {
                out.push(format!(
                    "… and {} more permits of `{}` (listed by name) did not apply",
                    permits.len() - shown,
                    f.action.as_str()
                ));
                break;
            }
            out.push(format!("permit `{}`: {}", s.name, lack(s, f)));
        }
        out
    }
}

fn shape(p: &Policy, est: Option<&Value>, name: String) -> Shape {
    let actions = match p.action_constraint() {
        ActionConstraint::Any => Action::ALL.to_vec(),
        ActionConstraint::Eq(u) => action_of(&u).into_iter().collect(),
        ActionConstraint::In(us) => us.iter().filter_map(action_of).collect(),
    };
    let mut needs = Vec::new();
    let mut other_conditions = false;
    let mut mentions = BTreeSet::new();
    match est
        .and_then(|e| e.get("conditions"))
        .and_then(Value::as_array)
    {
        Some(conds) => {
            for c in conds {
                let Some(body) = c.get("body") else { continue };
                if c.get("kind").and_then(Value::as_str) == Some("when") {
                    let mut conj = Vec::new();
                    conjuncts(body, &mut conj);
                    for e in conj {
                        match need_of(e) {
                            Some(n) => needs.push(n),
                            None => {
                                other_conditions = true;
                                mentioned(e, &mut mentions);
                            }
                        }
                    }
                } else {
                    other_conditions = true;
                    mentioned(body, &mut mentions);
                }
            }
        }
        // No JSON form: its conditions cannot be read.
        None => other_conditions = true,
    }
    Shape {
        name,
        actions,
        principal: p.principal_constraint(),
        resource: p.resource_constraint(),
        needs,
        other_conditions,
        mentions: mentions.into_iter().collect(),
    }
}

fn action_of(u: &EntityUid) -> Option<Action> {
    (u.type_name().to_string() == "Trustbind::Action")
        .then(|| Action::parse(u.id().unescaped()))
        .flatten()
}

/// The top-level conjuncts of `e`.
fn conjuncts<'a>(e: &'a Value, out: &mut Vec<&'a Value>) {
    match e.get("&&") {
        Some(and) => {
            for side in ["left", "right"] {
                if let Some(x) = and.get(side) {
                    conjuncts(x, out);
                }
            }
        }
        None => out.push(e),
    }
}

/// `context.<attr> in|== <entity literal>`.
fn need_of(e: &Value) -> Option<Needs> {
    let (op, is_in) = match (e.get("in"), e.get("==")) {
        (Some(op), _) => (op, true),
        (None, Some(op)) => (op, false),
        _ => return None,
    };
    let left = op.get("left")?.get(".")?;
    if left.get("left")?.get("Var")?.as_str()? != "context" {
        return None;
    }
    let attr = left.get("attr")?.as_str()?;
    if !matches!(attr, "program" | "host") {
        return None;
    }
    let entity = entity_literal(op.get("right")?.get("Value")?)?;
    Some(Needs {
        attr: attr.to_owned(),
        is_in,
        entity,
    })
}

fn entity_literal(v: &Value) -> Option<EntityUid> {
    let ent = v.get("__entity")?;
    let ty = ent.get("type")?.as_str()?.parse().ok()?;
    let id = ent.get("id")?.as_str()?;
    Some(EntityUid::from_type_name_and_id(
        ty,
        cedar_policy::EntityId::new(id),
    ))
}

/// `context.<attr>` uses and entity literals anywhere in `e`.
fn mentioned(e: &Value, out: &mut BTreeSet<String>) {
    match e {
        Value::Object(m) => {
            for key in [".", "has"] {
                let attr = m
                    .get(key)
                    .filter(|x| {
                        x.get("left")
                            .and_then(|l| l.get("Var"))
                            .and_then(Value::as_str)
                            == Some("context")
                    })
                    .and_then(|x| x.get("attr"))
                    .and_then(Value::as_str);
                if let Some(a) = attr {
                    out.insert(format!("context.{a}"));
                }
            }
            if m.contains_key("__entity") {
                if let Some(u) = entity_literal(e) {
                    out.insert(show(&u));
                }
                return;
            }
            for v in m.values() {
                mentioned(v, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                mentioned(v, out);
            }
        }
        _ => {}
    }
}

/// `Role "admin"`: the entity's type without the namespace, and its id.
fn show(u: &EntityUid) -> String {
    format!("{} \"{}\"", u.type_name().basename(), u.id().unescaped())
}

/// The ids of `uids` of entity type `ty` (without namespace), or `none`.
fn listed(uids: &[EntityUid], ty: &str) -> String {
    let ids: Vec<String> = uids
        .iter()
        .filter(|u| u.type_name().basename() == ty)
        .map(|u| format!("`{}`", u.id().unescaped()))
        .collect();
    if ids.is_empty() {
        "none".to_owned()
    } else {
        ids.join(", ")
    }
}

/// Whether `who` (an entity then its parents) satisfies `in e`.
fn is_in(who: &[EntityUid], e: &EntityUid) -> bool {
    who.contains(e)
}

/// What `s` lacked for request `f` (its first unmet part).
fn lack(s: &Shape, f: &Facts<'_>) -> String {
    let user = f.principal.first();
    match &s.principal {
        PrincipalConstraint::Eq(u) if Some(u) != user => {
            return format!(
                "needs the user to be {} (it is {})",
                show(u),
                user.map_or("unknown".into(), show)
            );
        }
        PrincipalConstraint::In(u) | PrincipalConstraint::IsIn(_, u) if !is_in(f.principal, u) => {
            return format!(
                "needs the user in {} (user {} has roles: {})",
                show(u),
                user.map_or("unknown".into(), |x| format!("`{}`", x.id().unescaped())),
                listed(f.principal, "Role")
            );
        }
        _ => {}
    }
    let res = f.resource.first();
    match &s.resource {
        ResourceConstraint::Eq(u) if Some(u) != res => {
            return format!(
                "needs the resource to be {} (it is {})",
                show(u),
                res.map_or("none".into(), show)
            );
        }
        ResourceConstraint::In(u) | ResourceConstraint::IsIn(_, u) if !is_in(f.resource, u) => {
            return if u.type_name().basename() == "ProgramGroup" {
                format!(
                    "needs the program in group `{}` (it is in: {})",
                    u.id().unescaped(),
                    listed(f.resource, "ProgramGroup")
                )
            } else if u.type_name().basename() == "FileSet" {
                format!(
                    "needs the file in file set `{}` (it is in: {})",
                    u.id().unescaped(),
                    listed(f.resource, "FileSet")
                )
            } else {
                format!(
                    "needs the resource in {} (it is {})",
                    show(u),
                    res.map_or("none".into(), show)
                )
            };
        }
        _ => {}
    }
    for n in &s.needs {
        let (who, what) = match n.attr.as_str() {
            "program" => (f.program, "program"),
            _ => (f.host, "host"),
        };
        let met = if n.is_in {
            is_in(who, &n.entity)
        } else {
            who.first() == Some(&n.entity)
        };
        if met {
            continue;
        }
        let op = if n.is_in { "in" } else { "==" };
        let has = match what {
            "program" => format!("it is in: {}", listed(who, "ProgramGroup")),
            _ => format!(
                "host {} is in host group {}",
                who.first()
                    .map_or("unknown".into(), |h| format!("`{}`", h.id().unescaped())),
                listed(who, "HostGroup")
            ),
        };
        return format!("needs context.{} {op} {} ({has})", n.attr, show(&n.entity));
    }
    if s.other_conditions {
        if s.mentions.is_empty() {
            "its scope matched but its conditions were false".to_owned()
        } else {
            format!(
                "its scope matched but its conditions were false (they use {})",
                s.mentions.join(", ")
            )
        }
    } else {
        "its scope matched but Cedar did not apply it (see errors)".to_owned()
    }
}
