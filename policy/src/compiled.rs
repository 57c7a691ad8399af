//! Policies decided without Cedar.
//!
//! Most policies of a fleet test only memberships (`principal in Role`,
//! `resource in ProgramGroup`, `context.host in HostGroup`, `context.program
//! in ProgramGroup`), identities (`resource == Program::"…"`) and simple
//! comparisons of context values with literals (`context.hour >= 8`,
//! `context.ancestry.contains("…")`, `resource.port == 443`, `resource.path
//! like "/srv/*"`), joined by `&&`. Each such policy is compiled once, from
//! its JSON form (EST), into a list of tests on the request's entity lists
//! (an entity, then its ancestors: a membership is a list lookup). A slice
//! whose policies all compiled is decided here, as Cedar decides: any
//! satisfied forbid denies (its determining policies: the satisfied
//! forbids), else any satisfied permit allows (the satisfied permits), else
//! the default deny (none). A test whose input the request lacks (an
//! optional context attribute, a port on a file) would be an evaluation
//! error in Cedar, so the whole request goes to Cedar instead; no compiled
//! test can fail otherwise, so a decision made here has no errors.
//! Anything else (`unless`, `||`, arithmetic, other attributes, sets,
//! templates) leaves the policy, and its slices, to Cedar.

use std::str::FromStr;

use cedar_policy::{Effect, EntityId, EntityTypeName, EntityUid, Policy, PolicyId};
use serde_json::Value;

use super::class::{context_attr, long_attr, Atom, AtomInput, Op};

/// What compiled tests read of a request. Entity lists hold the entity,
/// then its ancestors (the groups it is in), as handed to Cedar.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The action's uid.
    pub action: &'a EntityUid,
    /// The user, then its roles.
    pub principal: &'a [EntityUid],
    /// The resource (the program for `exec`), then its groups or sets.
    pub resource: &'a [EntityUid],
    /// `context.host`, then its host group.
    pub host: &'a [EntityUid],
    /// `context.program` (file and network actions), then its groups.
    pub program: Option<&'a [EntityUid]>,
    /// `context.peer_host` (correlated pairs), then its host group.
    pub peer_host: Option<&'a [EntityUid]>,
    /// `context.peer_program` (correlated pairs), then its groups.
    pub peer_program: Option<&'a [EntityUid]>,
    /// `context.to` (a rename or a hard link), then its sets.
    pub to: Option<&'a [EntityUid]>,
    /// `resource.path` (file actions).
    pub path: Option<&'a str>,
    /// `resource.port` (network actions).
    pub port: Option<i64>,
    /// The context values comparisons read.
    pub atoms: AtomInput<'a>,
}

/// An entity-valued input of a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Principal,
    Resource,
    Host,
    Program,
    PeerHost,
    PeerProgram,
    To,
}

impl Var {
    /// The entity and its ancestors; `None`: absent from this request's
    /// context (Cedar would raise an error reading it).
    fn of<'a>(self, f: &Facts<'a>) -> Option<&'a [EntityUid]> {
        match self {
            Var::Principal => Some(f.principal),
            Var::Resource => Some(f.resource),
            Var::Host => Some(f.host),
            Var::Program => f.program,
            Var::PeerHost => f.peer_host,
            Var::PeerProgram => f.peer_program,
            Var::To => f.to,
        }
    }
}

/// One element of a `like` pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pat {
    Char(char),
    Any,
}

/// One test of a compiled policy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    /// `<var> == <entity>`.
    Eq(Var, EntityUid),
    /// `<var> in <entity>`: the entity is the variable or an ancestor.
    In(Var, EntityUid),
    /// `action in [<entity>, …]`.
    ActionIn(Vec<EntityUid>),
    /// `context has <attr>` for an optional entity attribute.
    Has(Var),
    /// A comparison of a context value with a literal.
    Atom(Atom),
    /// `resource.path == "<s>"`.
    PathEq(String),
    /// `resource.path like "<pattern>"`.
    PathLike(Vec<Pat>),
    /// `resource.port <op> <long>`.
    Port(Op, i64),
}

impl Test {
    /// `None`: the request lacks the input (Cedar would raise an error).
    fn eval(&self, f: &Facts<'_>) -> Option<bool> {
        Some(match self {
            Test::Eq(v, uid) => v.of(f)?.first().is_some_and(|x| same(x, uid)),
            Test::In(v, uid) => v.of(f)?.iter().any(|x| same(x, uid)),
            Test::ActionIn(uids) => uids.iter().any(|x| same(x, f.action)),
            Test::Has(v) => v.of(f).is_some(),
            Test::Atom(a) => match a.eval(&f.atoms) {
                0 => false,
                1 => true,
                _ => return None,
            },
            Test::PathEq(s) => f.path? == s,
            Test::PathLike(p) => like(f.path?, p),
            Test::Port(op, lit) => op.holds(f.port?, *lit),
        })
    }
}

/// Uid equality, the ids first: they differ far more often than the type
/// names, whose comparison (namespace and name) was most of a compiled
/// slice's cost.
fn same(a: &EntityUid, b: &EntityUid) -> bool {
    a.id() == b.id() && a == b
}

/// Cedar's `like`: `Any` matches any run of characters, possibly empty.
fn like(s: &str, pat: &[Pat]) -> bool {
    let text: Vec<char> = s.chars().collect();
    let (mut t, mut p) = (0usize, 0usize);
    // The last wildcard seen and the text position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match (pat.get(p), text.get(t)) {
            (Some(Pat::Any), _) => {
                star = Some((p, t));
                p += 1;
            }
            (Some(Pat::Char(c)), Some(x)) if c == x => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pat.iter().skip(p).all(|x| *x == Pat::Any)
}

/// A policy compiled to tests, all of which must hold for it to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    tests: Vec<Test>,
}

impl Compiled {
    /// Whether the policy applies; `None`: Cedar must decide.
    fn eval(&self, f: &Facts<'_>) -> Option<bool> {
        for t in &self.tests {
            if !t.eval(f)? {
                return Some(false);
            }
        }
        Some(true)
    }
}

/// A slice whose every policy compiled.
#[derive(Debug, Clone)]
pub struct FastSlice {
    policies: Vec<(PolicyId, Effect, Compiled)>,
}

/// A decision made without Cedar: allowed, and the determining policies
/// (unsorted; none for the default deny).
pub type FastDecision<'a> = (bool, Vec<&'a PolicyId>);

impl FastSlice {
    /// The slice of `policies`, when each has a compiled form in `of`.
    pub fn new<'a>(
        policies: &[Policy],
        of: impl Fn(&PolicyId) -> Option<&'a Compiled>,
    ) -> Option<FastSlice> {
        let policies = policies
            .iter()
            .map(|p| Some((p.id().clone(), p.effect(), of(p.id())?.clone())))
            .collect::<Option<Vec<_>>>()?;
        Some(FastSlice { policies })
    }

    /// Cedar's decision and determining policies for `f`; `None` when a
    /// policy reads what the request lacks (Cedar decides it then).
    pub fn decide(&self, f: &Facts<'_>) -> Option<FastDecision<'_>> {
        let mut permits = Vec::new();
        let mut forbids = Vec::new();
        for (id, effect, c) in &self.policies {
            if c.eval(f)? {
                match effect {
                    Effect::Permit => permits.push(id),
                    Effect::Forbid => forbids.push(id),
                }
            }
        }
        Some(if !forbids.is_empty() {
            (false, forbids)
        } else if !permits.is_empty() {
            (true, permits)
        } else {
            (false, Vec::new())
        })
    }
}

/// The compiled form of the policy in JSON (EST) form, if it has one.
pub fn of_json(est: &Value) -> Option<Compiled> {
    let mut tests = Vec::new();
    scope(est.get("principal")?, Var::Principal, &mut tests)?;
    action(est.get("action")?, &mut tests)?;
    scope(est.get("resource")?, Var::Resource, &mut tests)?;
    for c in est.get("conditions")?.as_array()? {
        if c.get("kind")?.as_str()? != "when" {
            return None;
        }
        conjunction(c.get("body")?, &mut tests)?;
    }
    Some(Compiled { tests })
}

/// `{"type": "…", "id": "…"}` as a uid.
fn uid(v: &Value) -> Option<EntityUid> {
    let ty = EntityTypeName::from_str(v.get("type")?.as_str()?).ok()?;
    Some(EntityUid::from_type_name_and_id(
        ty,
        EntityId::new(v.get("id")?.as_str()?),
    ))
}

fn scope(v: &Value, var: Var, tests: &mut Vec<Test>) -> Option<()> {
    match v.get("op")?.as_str()? {
        "All" => {}
        "==" => tests.push(Test::Eq(var, uid(v.get("entity")?)?)),
        "in" => tests.push(Test::In(var, uid(v.get("entity")?)?)),
        _ => return None,
    }
    Some(())
}

fn action(v: &Value, tests: &mut Vec<Test>) -> Option<()> {
    match v.get("op")?.as_str()? {
        "All" => {}
        "==" => tests.push(Test::ActionIn(vec![uid(v.get("entity")?)?])),
        // `in` one entity would name an action group, which needs the
        // schema's action hierarchy: left to Cedar.
        "in" => tests.push(Test::ActionIn(
            v.get("entities")?
                .as_array()?
                .iter()
                .map(uid)
                .collect::<Option<_>>()?,
        )),
        _ => return None,
    }
    Some(())
}

/// `a && b && …` into `tests`, in Cedar's order of evaluation.
fn conjunction(v: &Value, tests: &mut Vec<Test>) -> Option<()> {
    if let Some(and) = v.get("&&") {
        conjunction(and.get("left")?, tests)?;
        return conjunction(and.get("right")?, tests);
    }
    tests.push(leaf(v)?);
    Some(())
}

/// `context.<attr>` or `principal`/`resource` as an entity input.
fn var(v: &Value) -> Option<Var> {
    if let Some(name) = v.get("Var").and_then(Value::as_str) {
        return match name {
            "principal" => Some(Var::Principal),
            "resource" => Some(Var::Resource),
            _ => None,
        };
    }
    Some(match context_attr(v)? {
        "host" => Var::Host,
        "program" => Var::Program,
        "peer_host" => Var::PeerHost,
        "peer_program" => Var::PeerProgram,
        "to" => Var::To,
        _ => return None,
    })
}

/// `resource.<attr>`.
fn resource_attr(v: &Value) -> Option<&str> {
    let dot = v.get(".")?;
    (dot.get("left")?.get("Var")?.as_str()? == "resource").then_some(())?;
    dot.get("attr")?.as_str()
}

fn entity_literal(v: &Value) -> Option<EntityUid> {
    uid(v.get("Value")?.get("__entity")?)
}

fn leaf(v: &Value) -> Option<Test> {
    let map = v.as_object()?;
    if map.len() != 1 {
        return None;
    }
    let (op, inner) = map.iter().next()?;
    let (left, right) = (inner.get("left"), inner.get("right"));
    match op.as_str() {
        "in" => Some(Test::In(var(left?)?, entity_literal(right?)?)),
        "has" => {
            (left?.get("Var")?.as_str()? == "context").then_some(())?;
            Some(Test::Has(match inner.get("attr")?.as_str()? {
                "peer_host" => Var::PeerHost,
                "peer_program" => Var::PeerProgram,
                "to" => Var::To,
                _ => return None,
            }))
        }
        "contains" => {
            (context_attr(left?)? == "ancestry").then_some(())?;
            let sha = right?.get("Value")?.as_str()?;
            Some(Test::Atom(Atom::Contains(sha.to_owned())))
        }
        "like" => {
            (resource_attr(left?)? == "path").then_some(())?;
            let mut pat = Vec::new();
            for el in inner.get("pattern")?.as_array()? {
                match el {
                    Value::String(w) if w == "Wildcard" => pat.push(Pat::Any),
                    _ => pat.extend(el.get("Literal")?.as_str()?.chars().map(Pat::Char)),
                }
            }
            Some(Test::PathLike(pat))
        }
        _ => {
            let (l, r) = (left?, right?);
            if let Some(t) = path_eq(op, l, r) {
                return Some(t);
            }
            let op = Op::of(op)?;
            // Entity equality: `<var> == <entity>`, either way round.
            if op == Op::Eq {
                if let (Some(x), Some(e)) = (var(l), entity_literal(r)) {
                    return Some(Test::Eq(x, e));
                }
                if let (Some(e), Some(x)) = (entity_literal(l), var(r)) {
                    return Some(Test::Eq(x, e));
                }
            }
            let long = |x: &Value| x.get("Value").and_then(Value::as_i64);
            let (attr, op, n) = if let Some(n) = long(r) {
                (l, op, n)
            } else {
                (r, op.flipped(), long(l)?)
            };
            if let Some(a) = context_attr(attr).and_then(long_attr) {
                return Some(Test::Atom(Atom::Cmp(a, op, n)));
            }
            if resource_attr(attr)? == "port" {
                return Some(Test::Port(op, n));
            }
            None
        }
    }
}

/// `resource.path == "<s>"`, either way round.
fn path_eq(op: &str, l: &Value, r: &Value) -> Option<Test> {
    (op == "==").then_some(())?;
    let s = |x: &Value| x.get("Value").and_then(Value::as_str).map(str::to_owned);
    if resource_attr(l) == Some("path") {
        return Some(Test::PathEq(s(r)?));
    }
    (resource_attr(r)? == "path").then_some(())?;
    Some(Test::PathEq(s(l)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(src: &str) -> Option<Compiled> {
        let p: Policy = src.parse().unwrap();
        of_json(&p.to_json().unwrap())
    }

    fn pat(s: &str) -> Vec<Pat> {
        s.chars()
            .map(|c| if c == '*' { Pat::Any } else { Pat::Char(c) })
            .collect()
    }

    #[test]
    fn like_matches_as_cedar_does() {
        for (s, p, m) in [
            ("/srv/a/b", "/srv/*", true),
            ("/srv", "/srv/*", false),
            ("/srv/", "/srv/*", true),
            ("abc", "a*c", true),
            ("ac", "a*c", true),
            ("abcbc", "a*bc", true),
            ("abcbd", "a*bc", false),
            ("", "*", true),
            ("", "", true),
            ("a", "", false),
            ("aXbXc", "*b*c", true),
            ("/etc/x", "/etc/*", true),
            ("é/x", "é*", true),
        ] {
            assert_eq!(like(s, &pat(p)), m, "{s} like {p}");
        }
    }

    #[test]
    fn memberships_and_comparisons_compile() {
        let c = compiled(
            r#"permit (principal in Trustbind::Role::"ops", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"g")
            when { context.hour >= 8 && 18 > context.hour && context.host in Trustbind::HostGroup::"hg"
                   && context.ancestry.contains("bad") };"#,
        )
        .unwrap();
        assert_eq!(c.tests.len(), 7);
        assert!(compiled(
            r#"permit (principal, action, resource) when { context.program in Trustbind::ProgramGroup::"g" && resource.path like "/srv/*" && resource.port == 443 && context has peer_program && context.peer_program in Trustbind::ProgramGroup::"x" };"#
        )
        .is_some());
    }

    #[test]
    fn anything_else_is_left_to_cedar() {
        for src in [
            r#"permit (principal, action, resource) unless { context.hour > 3 };"#,
            r#"permit (principal, action, resource) when { context.hour > 3 || context.session == 0 };"#,
            r#"permit (principal, action, resource) when { context.session + 1 > 0 };"#,
            r#"permit (principal, action, resource) when { context.time > 5 };"#,
            r#"permit (principal, action, resource) when { principal.name like "u*" };"#,
            r#"permit (principal, action, resource) when { context.src_addr == "a" };"#,
            r#"permit (principal, action, resource) when { context.peer_program == context.program };"#,
            r#"permit (principal, action, resource) when { principal in [Trustbind::Role::"a"] };"#,
            r#"permit (principal is Trustbind::User, action, resource);"#,
            r#"permit (principal, action, resource) when { !(context.hour > 3) };"#,
            r#"permit (principal, action, resource) when { true };"#,
        ] {
            assert!(compiled(src).is_none(), "{src}");
        }
    }
}
