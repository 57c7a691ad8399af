//! Slicing the policy set so that a request evaluates only the policies
//! that can apply to it.
//!
//! Every policy goes, for each action its action scope admits, into exactly
//! one slice, keyed by the first of these that it has:
//! 1. its resource scope entity (`resource in ProgramGroup::"x"`,
//!    `resource == Program::"…"`, `resource == Service::"…"`, …);
//! 2. a top-level `when` conjunct `context.program in <entity>` or
//!    `context.program == <entity>`;
//! 3. its principal scope entity (`principal in Role::"admin"`, …);
//! 4. otherwise the action's shared slice.
//!
//! A request's candidate slices are the action's shared slice plus the
//! slices keyed by entities the request's principal, resource or program is
//! (or is in): the user and its roles, the resource (and, for `exec`, the
//! program's groups), the program and its groups. A policy outside these
//! slices has a scope or conjunct that the request cannot satisfy, so
//! evaluating only the candidates gives the same answer as evaluating the
//! whole set. Unions of several slices are built once and cached.
//!
//! Sets with templates are not sliced (every request gets the whole set).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use cedar_policy::{ActionConstraint, EntityUid, Policy, PolicyId, PolicySet, ResourceConstraint};
use serde_json::Value;

use super::class::{self, Shape};
use super::compiled::{self, Compiled, FastSlice};
use super::explain::Permits;
use super::reads::{self, Reads};
use super::PolicyMeta;
use crate::request::Action;

/// Shards of the union cache.
const UNION_SHARDS: usize = 16;
/// Unions kept per shard before the shard is emptied.
const UNION_SHARD_CAP: usize = 4096;

/// A set of policies evaluated together, and what they read.
#[derive(Debug)]
pub struct Slice {
    /// The policies.
    pub set: PolicySet,
    /// Union of the context attributes the policies read.
    pub reads: Reads,
    /// Number of policies.
    pub len: usize,
    /// Unique among the slices of the process: part of a decision-cache
    /// key, naming the policies evaluated.
    pub id: u64,
    /// What the policies read of a request ([`class`]): the decision
    /// cache's key holds only that.
    pub class: Shape,
    /// The slice decided without Cedar, when every policy compiled
    /// ([`compiled`]).
    pub fast: Option<FastSlice>,
}

/// What each policy reads, computed once per policy set (turning a policy
/// into JSON re-parses its text, far too slow for the request path).
type ReadsOf = HashMap<PolicyId, (Reads, Shape, Option<Compiled>)>;

/// Source of [`Slice::id`].
static NEXT_SLICE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Slice {
    fn of(policies: &[Policy], reads_of: &ReadsOf) -> Self {
        let mut set = PolicySet::new();
        let mut r = Reads::NONE;
        let mut shape = Shape::default();
        for p in policies {
            match reads_of.get(p.id()) {
                Some((reads, s, _)) => {
                    r = r.with(*reads);
                    shape.add(s);
                }
                None => {
                    r = Reads::ALL;
                    shape.add(&Shape::all());
                }
            }
            // Ids are unique in the source set, so adding cannot fail.
            let _ = set.add(p.clone());
        }
        Slice {
            set,
            reads: r,
            len: policies.len(),
            id: NEXT_SLICE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            class: shape,
            fast: FastSlice::new(policies, |id| {
                reads_of.get(id).and_then(|(_, _, c)| c.as_ref())
            }),
        }
    }
}

/// Where a policy is filed for one action.
#[derive(Debug, Default)]
struct ActionSlices {
    any: Option<u32>,
    resource: HashMap<EntityUid, u32>,
    program: HashMap<EntityUid, u32>,
    principal: HashMap<EntityUid, u32>,
}

/// The request's entities that select slices.
#[derive(Debug)]
pub struct Keys<'a> {
    /// The action.
    pub action: Action,
    /// The user and its roles.
    pub principal: &'a [EntityUid],
    /// The resource (for `exec`: the program and its groups).
    pub resource: &'a [EntityUid],
    /// The program doing the action and its groups.
    pub program: &'a [EntityUid],
}

type UnionShard = Mutex<HashMap<Vec<u32>, Arc<Slice>>>;

/// The sliced policy set.
#[derive(Debug)]
pub struct Index {
    meta: HashMap<PolicyId, PolicyMeta>,
    permits: Permits,
    full: Arc<Slice>,
    empty: Arc<Slice>,
    /// `None`: not sliced (disabled, or the set has templates).
    sliced: Option<Sliced>,
}

#[derive(Debug)]
struct Sliced {
    reads_of: ReadsOf,
    actions: Vec<(Action, ActionSlices)>,
    slices: Vec<Arc<Slice>>,
    hasher: RandomState,
    unions: Vec<UnionShard>,
}

/// Where a policy goes, apart from its actions.
#[derive(Debug, PartialEq, Eq, Hash, Clone)]
enum Key {
    Any,
    Resource(EntityUid),
    Program(EntityUid),
    Principal(EntityUid),
}

impl Index {
    /// Indexes `set`; with `slicing` false every request gets the whole set.
    pub fn new(set: &PolicySet, slicing: bool) -> Self {
        let all: Vec<Policy> = set.policies().cloned().collect();
        let ests: Vec<Option<Value>> = all.iter().map(|p| p.to_json().ok()).collect();
        let reads_of: ReadsOf = all
            .iter()
            .zip(&ests)
            .map(|(p, e)| {
                (
                    p.id().clone(),
                    e.as_ref().map_or_else(
                        || (Reads::ALL, Shape::all(), None),
                        |e| (reads::of_json(e), class::of_json(e), compiled::of_json(e)),
                    ),
                )
            })
            .collect();
        let meta: HashMap<PolicyId, PolicyMeta> = all
            .iter()
            .map(|p| (p.id().clone(), PolicyMeta::of(p)))
            .collect();
        let permits = Permits::new(&all, &ests, |p| {
            meta.get(p.id())
                .map_or_else(|| p.id().to_string(), |m| m.name.clone())
        });
        let full = Arc::new(Slice::of(&all, &reads_of));
        let empty = Arc::new(Slice::of(&[], &reads_of));
        let sliced = (slicing && set.templates().next().is_none())
            .then(|| Sliced::new(&all, &ests, reads_of));
        Index {
            meta,
            permits,
            full,
            empty,
            sliced,
        }
    }

    /// Name and obligations of policy `id`.
    pub fn meta(&self, id: &PolicyId) -> Option<&PolicyMeta> {
        self.meta.get(id)
    }

    /// The permits, read for diagnoses of denies.
    pub fn permits(&self) -> &Permits {
        &self.permits
    }

    /// The whole set.
    pub fn full(&self) -> &Arc<Slice> {
        &self.full
    }

    /// Number of slices (0 when not sliced).
    pub fn slices(&self) -> usize {
        self.sliced.as_ref().map_or(0, |s| s.slices.len())
    }

    /// The policies that can apply to a request with these keys.
    pub fn select(&self, keys: &Keys<'_>) -> Arc<Slice> {
        let Some(s) = &self.sliced else {
            return Arc::clone(&self.full);
        };
        let Some((_, a)) = s.actions.iter().find(|(x, _)| *x == keys.action) else {
            return Arc::clone(&self.empty);
        };
        let mut ids: Vec<u32> = Vec::with_capacity(4);
        ids.extend(a.any);
        for (map, uids) in [
            (&a.resource, keys.resource),
            (&a.program, keys.program),
            (&a.principal, keys.principal),
        ] {
            if map.is_empty() {
                continue;
            }
            ids.extend(uids.iter().filter_map(|u| map.get(u).copied()));
        }
        ids.sort_unstable();
        ids.dedup();
        match ids.as_slice() {
            [] => Arc::clone(&self.empty),
            [one] => s
                .slices
                .get(*one as usize)
                .map_or_else(|| Arc::clone(&self.full), Arc::clone),
            _ => s.union(ids).unwrap_or_else(|| Arc::clone(&self.full)),
        }
    }
}

impl Sliced {
    fn new(all: &[Policy], ests: &[Option<Value>], reads_of: ReadsOf) -> Self {
        let mut filed: HashMap<(Action, Key), Vec<Policy>> = HashMap::new();
        for (p, est) in all.iter().zip(ests) {
            let key = key_of(p, est.as_ref());
            for a in actions_of(p) {
                filed.entry((a, key.clone())).or_default().push(p.clone());
            }
        }
        let mut actions: Vec<(Action, ActionSlices)> = Action::ALL
            .iter()
            .map(|a| (*a, ActionSlices::default()))
            .collect();
        let mut slices = Vec::with_capacity(filed.len());
        for ((action, key), policies) in filed {
            let id = u32::try_from(slices.len()).unwrap_or(u32::MAX);
            slices.push(Arc::new(Slice::of(&policies, &reads_of)));
            if let Some((_, a)) = actions.iter_mut().find(|(x, _)| *x == action) {
                match key {
                    Key::Any => a.any = Some(id),
                    Key::Resource(u) => {
                        a.resource.insert(u, id);
                    }
                    Key::Program(u) => {
                        a.program.insert(u, id);
                    }
                    Key::Principal(u) => {
                        a.principal.insert(u, id);
                    }
                }
            }
        }
        Sliced {
            reads_of,
            actions,
            slices,
            hasher: RandomState::new(),
            unions: (0..UNION_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn union(&self, ids: Vec<u32>) -> Option<Arc<Slice>> {
        let i = usize::try_from(self.hasher.hash_one(&ids) % UNION_SHARDS as u64).unwrap_or(0);
        let shard = self.unions.get(i)?;
        if let Some(u) = shard.lock().ok()?.get(&ids) {
            return Some(Arc::clone(u));
        }
        let mut policies = Vec::new();
        for id in &ids {
            policies.extend(self.slices.get(*id as usize)?.set.policies().cloned());
        }
        let u = Arc::new(Slice::of(&policies, &self.reads_of));
        let mut map = shard.lock().ok()?;
        if map.len() >= UNION_SHARD_CAP {
            map.clear();
        }
        map.insert(ids, Arc::clone(&u));
        Some(u)
    }
}

/// The actions a policy's action scope admits.
fn actions_of(p: &Policy) -> Vec<Action> {
    let parse = |u: &EntityUid| {
        (u.type_name().to_string() == "Trustbind::Action")
            .then(|| Action::parse(u.id().unescaped()))
            .flatten()
    };
    let found: Option<Vec<Action>> = match p.action_constraint() {
        ActionConstraint::Any => None,
        ActionConstraint::Eq(u) => parse(&u).map(|a| vec![a]),
        ActionConstraint::In(us) => us.iter().map(parse).collect(),
    };
    // Anything not understood is filed under every action (safe superset).
    found.unwrap_or_else(|| Action::ALL.to_vec())
}

fn key_of(p: &Policy, est: Option<&Value>) -> Key {
    match p.resource_constraint() {
        ResourceConstraint::Eq(u) | ResourceConstraint::In(u) | ResourceConstraint::IsIn(_, u) => {
            return Key::Resource(u)
        }
        ResourceConstraint::Any | ResourceConstraint::Is(_) => {}
    }
    if let Some(u) = est.and_then(program_conjunct) {
        return Key::Program(u);
    }
    match p.principal_constraint() {
        cedar_policy::PrincipalConstraint::Eq(u)
        | cedar_policy::PrincipalConstraint::In(u)
        | cedar_policy::PrincipalConstraint::IsIn(_, u) => Key::Principal(u),
        cedar_policy::PrincipalConstraint::Any | cedar_policy::PrincipalConstraint::Is(_) => {
            Key::Any
        }
    }
}

/// An entity `e` such that the policy has a top-level `when` conjunct
/// `context.program in e` or `context.program == e`.
fn program_conjunct(est: &Value) -> Option<EntityUid> {
    let conds = est.get("conditions")?.as_array()?;
    conds
        .iter()
        .filter(|c| c.get("kind").and_then(Value::as_str) == Some("when"))
        .filter_map(|c| c.get("body"))
        .find_map(find_in_conjuncts)
}

fn find_in_conjuncts(e: &Value) -> Option<EntityUid> {
    if let Some(and) = e.get("&&") {
        return and
            .get("left")
            .and_then(find_in_conjuncts)
            .or_else(|| and.get("right").and_then(find_in_conjuncts));
    }
    let op = e.get("in").or_else(|| e.get("=="))?;
    let left = op.get("left")?.get(".")?;
    if left.get("left")?.get("Var")?.as_str()? != "context"
        || left.get("attr")?.as_str()? != "program"
    {
        return None;
    }
    let ent = op.get("right")?.get("Value")?.get("__entity")?;
    let ty = ent.get("type")?.as_str()?;
    let id = ent.get("id")?.as_str()?;
    let ty = ty.parse().ok()?;
    Some(EntityUid::from_type_name_and_id(
        ty,
        cedar_policy::EntityId::new(id),
    ))
}
