//! Equivalence classes of requests, for the decision cache.
//!
//! A request's decision depends only on what the policies of its slice
//! read of it. Walking each policy's JSON form (EST) once, this module
//! records that:
//! - which identities a policy reads ([`Ids`]): the user's name, the
//!   host's, the program's (or, for `exec`, the resource's). A literal
//!   `User::"…"`, `Host::"…"` or `Program::"…"` anywhere in the policy,
//!   an attribute of `principal` or `resource`, or any use of `principal`,
//!   `resource`, `context.host`, `context.program`, `context.peer_host` or
//!   `context.peer_program` other than as the left side of `in <literal>`
//!   counts as reading the identity;
//! - which group-like entities it names (roles, host groups, program
//!   groups, file sets): an `in <literal>` can only tell whether the
//!   request's entity is in one of those, so the key holds the request's
//!   memberships among the named ones only;
//! - which context attributes it reads only through comparisons with a
//!   literal (`context.hour >= 8`, `context.session == 0`,
//!   `context.ancestry.contains("…")`, [`Atom`]): the key holds each
//!   comparison's outcome instead of the value;
//! - the other context attributes it reads ([`Reads`]): their values go
//!   into the key as before.
//!
//! Two requests with the same slice and the same key give every policy of
//! the slice the same inputs, so Cedar gives them the same decision and
//! the same determining policies. Anything the walk does not understand
//! (a template slot, `context` as a whole) reads everything.

use std::collections::HashMap;

use serde_json::Value;

use super::reads::Reads;

/// Identities a policy reads, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Ids(u8);

impl Ids {
    /// None: the identities are seen only through memberships.
    pub const NONE: Ids = Ids(0);
    /// The user (principal) name.
    pub const USER: Ids = Ids(1);
    /// The host's and the peer host's names.
    pub const HOST: Ids = Ids(1 << 1);
    /// The program's and the peer program's SHA-256.
    pub const PROGRAM: Ids = Ids(1 << 2);
    /// The resource itself (for `exec`, the program; file and network
    /// targets are always in the key).
    pub const RESOURCE: Ids = Ids(1 << 3);
    /// Everything.
    pub const ALL: Ids = Ids(u8::MAX);

    /// Union.
    #[must_use]
    pub fn with(self, other: Ids) -> Ids {
        Ids(self.0 | other.0)
    }

    /// Whether any identity of `other` is in `self`.
    pub fn any(self, other: Ids) -> bool {
        self.0 & other.0 != 0
    }
}

/// A context attribute of type Long that an [`Atom`] may compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LongAttr {
    /// `context.hour`.
    Hour,
    /// `context.weekday`.
    Weekday,
    /// `context.session`.
    Session,
    /// `context.src_port` (network actions only).
    SrcPort,
    /// `context.dst_port` (network actions only).
    DstPort,
}

/// A comparison operator of an [`Atom`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `==`.
    Eq,
    /// `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
}

/// A comparison of a context attribute with a literal, whose outcome (not
/// the attribute's value) goes into the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Atom {
    /// `context.<attr> <op> <long>`.
    Cmp(LongAttr, Op, i64),
    /// `context.ancestry.contains("<sha>")`.
    Contains(String),
}

/// The context values an atom is evaluated on.
#[derive(Debug, Clone, Copy)]
pub struct AtomInput<'a> {
    /// `context.hour`.
    pub hour: i64,
    /// `context.weekday`.
    pub weekday: i64,
    /// `context.session`.
    pub session: i64,
    /// `context.src_port`, `context.dst_port`: network actions only.
    pub ports: Option<(i64, i64)>,
    /// `context.ancestry`.
    pub ancestry: &'a [String],
}

impl Atom {
    /// The outcome: 0 false, 1 true, 2 the attribute is absent (Cedar
    /// raises the same error, or short-circuits the same way, for every
    /// request lacking it).
    pub fn eval(&self, i: &AtomInput<'_>) -> u8 {
        match self {
            Atom::Contains(s) => u8::from(i.ancestry.iter().any(|a| a == s)),
            Atom::Cmp(attr, op, lit) => {
                let v = match attr {
                    LongAttr::Hour => Some(i.hour),
                    LongAttr::Weekday => Some(i.weekday),
                    LongAttr::Session => Some(i.session),
                    LongAttr::SrcPort => i.ports.map(|p| p.0),
                    LongAttr::DstPort => i.ports.map(|p| p.1),
                };
                let Some(v) = v else { return 2 };
                u8::from(op.holds(v, *lit))
            }
        }
    }
}

impl Op {
    /// `v <op> lit`.
    pub fn holds(self, v: i64, lit: i64) -> bool {
        match self {
            Op::Eq => v == lit,
            Op::Ne => v != lit,
            Op::Lt => v < lit,
            Op::Le => v <= lit,
            Op::Gt => v > lit,
            Op::Ge => v >= lit,
        }
    }

    /// The operator of an EST comparison node.
    pub(crate) fn of(op: &str) -> Option<Op> {
        Some(match op {
            "==" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => return None,
        })
    }

    /// The operator with its operands swapped (`3 < x` is `x > 3`).
    pub(crate) fn flipped(self) -> Op {
        match self {
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            o => o,
        }
    }
}

/// What a policy, or a slice of policies, reads of a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shape {
    /// Identities read.
    pub ids: Ids,
    /// Group-like entity literals named: id -> the kinds named with that
    /// id ([`kind`] bits), so that a lookup by id allocates nothing.
    pub named: HashMap<String, u8>,
    /// Comparisons whose outcome is part of the key.
    pub atoms: Vec<Atom>,
    /// Context attributes read otherwise (their values are in the key).
    pub exact: Reads,
}

impl Shape {
    /// Everything read (the key of an exact request).
    pub fn all() -> Shape {
        Shape {
            ids: Ids::ALL,
            named: HashMap::new(),
            atoms: Vec::new(),
            exact: Reads::ALL,
        }
    }

    /// Adds what `other` reads.
    pub fn add(&mut self, other: &Shape) {
        self.ids = self.ids.with(other.ids);
        self.exact = self.exact.with(other.exact);
        for (id, k) in &other.named {
            *self.named.entry(id.clone()).or_default() |= k;
        }
        for a in &other.atoms {
            if !self.atoms.contains(a) {
                self.atoms.push(a.clone());
            }
        }
    }

    /// Whether membership in `ty::id` is named (`ty` the type's last
    /// path segment).
    pub fn names(&self, ty: &str, id: &str) -> bool {
        self.named.get(id).is_some_and(|k| k & kind(ty) != 0)
    }
}

/// The bit of an entity type (its last path segment) in [`Shape::named`].
fn kind(ty: &str) -> u8 {
    match ty {
        "Role" => 1,
        "HostGroup" => 2,
        "ProgramGroup" => 4,
        _ => 8,
    }
}

/// What the policy in JSON (EST) form reads.
pub fn of_json(est: &Value) -> Shape {
    let mut s = Shape::default();
    for scope in ["principal", "action", "resource"] {
        if let Some(v) = est.get(scope) {
            literals(v, &mut s);
            if v.get("slot").is_some() {
                s.ids = Ids::ALL;
            }
        }
    }
    if let Some(conds) = est.get("conditions").and_then(Value::as_array) {
        for c in conds {
            match c.get("body") {
                Some(b) => walk(b, &mut s),
                None => s.ids = Ids::ALL,
            }
        }
    }
    if s.exact == Reads::ALL {
        s.ids = Ids::ALL;
    }
    s
}

/// Records the entity literals in `v`: identity types as identities read,
/// the others as named.
fn literals(v: &Value, s: &mut Shape) {
    match v {
        Value::Object(map) => {
            if let (Some(Value::String(ty)), Some(Value::String(id))) =
                (map.get("type"), map.get("id"))
            {
                let last = ty.rsplit("::").next().unwrap_or(ty);
                match last {
                    "User" => s.ids = s.ids.with(Ids::USER),
                    "Host" => s.ids = s.ids.with(Ids::HOST),
                    "Program" => s.ids = s.ids.with(Ids::PROGRAM),
                    // Actions are part of the key; files and services are
                    // the target, always in the key.
                    "Action" | "File" | "Service" => {}
                    _ => {
                        *s.named.entry(id.clone()).or_default() |= kind(last);
                    }
                }
            }
            for inner in map.values() {
                literals(inner, s);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| literals(i, s)),
        _ => {}
    }
}

/// `context.<attr>`: the attribute's name.
pub(crate) fn context_attr(v: &Value) -> Option<&str> {
    let dot = v.get(".")?;
    if dot.get("left")?.get("Var")?.as_str()? != "context" {
        return None;
    }
    dot.get("attr")?.as_str()
}

/// An entity-valued variable that `in <literal>` may test without reading
/// its identity.
fn is_entity_var(v: &Value) -> bool {
    if let Some(var) = v.get("Var").and_then(Value::as_str) {
        return matches!(var, "principal" | "resource");
    }
    matches!(
        context_attr(v),
        Some("host" | "program" | "peer_host" | "peer_program" | "to")
    )
}

pub(crate) fn long_attr(name: &str) -> Option<LongAttr> {
    Some(match name {
        "hour" => LongAttr::Hour,
        "weekday" => LongAttr::Weekday,
        "session" => LongAttr::Session,
        "src_port" => LongAttr::SrcPort,
        "dst_port" => LongAttr::DstPort,
        _ => return None,
    })
}

fn long_value(v: &Value) -> Option<i64> {
    v.get("Value")?.as_i64()
}

/// `context.<long attr> <op> <long>` (either way round).
fn atom_of(op: &str, left: &Value, right: &Value) -> Option<Atom> {
    let op = Op::of(op)?;
    if let (Some(a), Some(n)) = (context_attr(left).and_then(long_attr), long_value(right)) {
        return Some(Atom::Cmp(a, op, n));
    }
    let (a, n) = (context_attr(right).and_then(long_attr)?, long_value(left)?);
    Some(Atom::Cmp(a, op.flipped(), n))
}

fn walk(v: &Value, s: &mut Shape) {
    let Value::Object(map) = v else {
        if let Value::Array(items) = v {
            items.iter().for_each(|i| walk(i, s));
        }
        return;
    };
    if map.len() == 1 {
        if let Some((op, inner)) = map.iter().next() {
            if handled(op, inner, s) {
                return;
            }
        }
    }
    for inner in map.values() {
        walk(inner, s);
    }
}

/// Handles the node `{op: inner}` when it is one of the forms this module
/// understands; false: walk its children generically.
fn handled(op: &str, inner: &Value, s: &mut Shape) -> bool {
    let (left, right) = (inner.get("left"), inner.get("right"));
    match op {
        "Value" => {
            literals(inner, s);
            true
        }
        "Record" => {
            // Field names are the policy's own: walk only the values.
            if let Value::Object(fields) = inner {
                fields.values().for_each(|f| walk(f, s));
            } else {
                walk(inner, s);
            }
            true
        }
        "Slot" | "Unknown" => {
            s.ids = Ids::ALL;
            s.exact = Reads::ALL;
            true
        }
        "Var" => {
            match inner.as_str() {
                Some("principal") => s.ids = s.ids.with(Ids::USER),
                Some("resource") => s.ids = s.ids.with(Ids::RESOURCE),
                Some("action") => {}
                _ => {
                    s.ids = Ids::ALL;
                    s.exact = Reads::ALL;
                }
            }
            true
        }
        "in" => {
            let (Some(l), Some(r)) = (left, right) else {
                return false;
            };
            if is_entity_var(l) && r.get("Value").and_then(|x| x.get("__entity")).is_some() {
                // A membership test: the literal is named (or, for an
                // identity type, read), the variable's identity is not.
                if let Some(attr) = context_attr(l) {
                    s.exact = s.exact.with(Reads::attr(attr));
                }
                literals(r, s);
                return true;
            }
            false
        }
        "." | "has" => {
            let Some(l) = left else { return false };
            let attr = inner.get("attr").and_then(Value::as_str).unwrap_or("");
            match l.get("Var").and_then(Value::as_str) {
                Some("context") => {
                    s.exact = s.exact.with(Reads::attr(attr));
                    if op == "." {
                        // The value itself: an identity for an entity attribute.
                        s.ids = s.ids.with(match attr {
                            "host" | "peer_host" => Ids::HOST,
                            "program" | "peer_program" => Ids::PROGRAM,
                            _ => Ids::NONE,
                        });
                    }
                }
                Some("principal") => s.ids = s.ids.with(Ids::USER),
                Some("resource") => s.ids = s.ids.with(Ids::RESOURCE),
                _ => {
                    s.ids = Ids::ALL;
                    walk(l, s);
                }
            }
            true
        }
        "contains" => {
            let (Some(l), Some(r)) = (left, right) else {
                return false;
            };
            match (context_attr(l), r.get("Value").and_then(Value::as_str)) {
                (Some("ancestry"), Some(sha)) => {
                    s.atoms.push(Atom::Contains(sha.to_owned()));
                    true
                }
                _ => false,
            }
        }
        "==" | "!=" | "<" | "<=" | ">" | ">=" => {
            let (Some(l), Some(r)) = (left, right) else {
                return false;
            };
            match atom_of(op, l, r) {
                Some(a) => {
                    if !s.atoms.contains(&a) {
                        s.atoms.push(a);
                    }
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cedar_policy::Policy;

    fn shape(src: &str) -> Shape {
        let p: Policy = src.parse().unwrap();
        of_json(&p.to_json().unwrap())
    }

    #[test]
    fn memberships_and_comparisons_are_abstracted() {
        let s = shape(
            r#"permit (principal in Trustbind::Role::"ops", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"g")
            when { context.hour >= 8 && 18 > context.hour && context.host in Trustbind::HostGroup::"hg"
                   && context.ancestry.contains("bad") };"#,
        );
        assert_eq!(s.ids, Ids::NONE);
        assert_eq!(s.exact, Reads::NONE);
        assert!(
            s.names("Role", "ops") && s.names("ProgramGroup", "g") && s.names("HostGroup", "hg")
        );
        assert!(!s.names("Role", "op"));
        assert_eq!(
            s.atoms,
            vec![
                Atom::Cmp(LongAttr::Hour, Op::Ge, 8),
                Atom::Cmp(LongAttr::Hour, Op::Lt, 18),
                Atom::Contains("bad".into()),
            ]
        );
    }

    #[test]
    fn identities_are_seen() {
        let user = shape(r#"permit (principal == Trustbind::User::"u1", action, resource);"#);
        assert!(user.ids.any(Ids::USER));
        let name = shape(r#"permit (principal, action, resource) when { principal.name == "x" };"#);
        assert!(name.ids.any(Ids::USER));
        let pinned = shape(r#"permit (principal, action, resource == Trustbind::Program::"ab");"#);
        assert!(pinned.ids.any(Ids::PROGRAM));
        let host = shape(
            r#"permit (principal, action, resource) when { context.host == Trustbind::Host::"h" };"#,
        );
        assert!(host.ids.any(Ids::HOST));
        let pair = shape(
            r#"permit (principal, action, resource) when { context has peer_program && context.peer_program == context.program };"#,
        );
        assert!(pair.ids.any(Ids::PROGRAM));
        let path =
            shape(r#"permit (principal, action, resource) when { resource.path like "/a*" };"#);
        assert!(path.ids.any(Ids::RESOURCE));
        let whole = shape(r#"permit (principal, action, resource) when { context == {} };"#);
        assert_eq!(whole.ids, Ids::ALL);
        assert_eq!(whole.exact, Reads::ALL);
        let set = shape(
            r#"permit (principal, action, resource) when { principal in [Trustbind::Role::"a"] };"#,
        );
        assert!(set.ids.any(Ids::USER));
        let record = shape(
            r#"permit (principal, action, resource) when { {Value: principal} == {Value: principal} };"#,
        );
        assert!(record.ids.any(Ids::USER));
    }

    #[test]
    fn other_context_reads_stay_exact() {
        let s = shape(
            r#"permit (principal, action, resource) when { context.session + 1 == 2 && context.src_addr == "a" };"#,
        );
        assert!(s.exact.any(Reads::SESSION));
        assert!(s.exact.any(Reads::SRC_ADDR));
        let s = shape(r#"permit (principal, action, resource) when { context.time > 5 };"#);
        assert!(s.exact.any(Reads::TIME));
    }
}
