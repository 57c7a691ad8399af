//! The policy engine: [`QualifyRequest`]s in, [`Decision`]s out.
//!
//! The engine keeps an immutable snapshot of everything a verdict
//! depends on (the compiled governing policy, hosts with their groups and
//! modes, users with their roles, and a lazily filled map of program
//! memberships), all as of one verdict generation. Deciding takes no global
//! lock: the snapshot is read through an `ArcSwap`, and a decision uses one
//! snapshot from start to end, so no decision sees half of a change.
//!
//! The store versions what a snapshot is made of (the verdict generation,
//! the data version of policy, hosts and users, the membership version) and
//! publishes them in [`Source::versions_hint`]; each decision compares them
//! with its snapshot's and refreshes first when they moved: re-reading
//! hosts and users only when the data version moved, and otherwise only
//! emptying the membership map and the decision cache. A decision never
//! compiles a policy set: activation and rollback hand the version to the
//! engine before the switch is written ([`PolicyPrep`]), and
//! it is compiled there, on the administrator's call, while decisions go
//! on with the old snapshot; the switch then swaps in the compiled set. A
//! policy that changed without that (no prepared set) is compiled on a
//! background thread while decisions keep the old snapshot (answers
//! labelled with the old generation, which hosts that moved on do not
//! cache). Every answer is reported to the store's ledger
//! ([`Source::note_answer`]), which decides whether a later membership
//! change must move the generation. All writers must go through the same
//! [`Source`] (the appliance has exactly one store handle).
//!
//! Cedar entities built per request: `User::"<user>"` in its roles,
//! `Host::"<host>"` in its host group, `Program::"<sha256>"` in its
//! reference groups (unknown programs have none and fall to the default
//! policy), `File::"<path>"` in every `FileSet` protecting the path
//! ([`crate::files::FileSets::sets_of`]),
//! `Service::"<dst_addr>:<dst_port>/<proto>"`.
//! Context: `time` (seconds since the epoch), `hour` (0..23) and `weekday`
//! (0 = Monday) in the appliance's time zone (`crate::clock`, UTC unless
//! `serve --time-zone`), `session`, `ancestry`, `mode`; for file actions
//! `program`, `create`, `truncate`, `link` and, for a rename or a hard
//! link, `to` (a `File` in the sets protecting the new path); for network
//! actions the addresses, ports and (in pair decisions) the peer.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    RestrictedExpression, Schema,
};
use cedar_policy_core::ast;

use std::sync::atomic::{AtomicU64, Ordering};

use super::cache::ClockCache;
use super::class::{AtomInput, Ids};
use super::compiled::{self, FastDecision, FastSlice};
use super::explain::{Diagnosis, Facts};
use super::reads::Reads;
use super::slice::{Index, Keys, Slice};
use super::{outcome_of, outcome_with, Outcome, PolicyError, Verdict};
use crate::audit::AuditEvent;
use crate::files::FileSets;
use crate::request::{Action, Program, Proto, QualifyRequest, Target};
use crate::source::{EngineData, Mode, PolicyPrep, PolicyVersion, Source, Versions};

/// How often a decision restarts because the store moved under it before
/// it gives up with [`PolicyError::Unstable`].
const MAX_TRIES: u32 = 8;

/// Shards of the program-membership map.
const PROGRAM_SHARDS: usize = 16;

/// Entries per shard of the program-membership map before it is emptied.
const PROGRAM_SHARD_CAP: usize = 8192;

/// What the engine answers for one request (or one pair).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Verdict, reasons, obligations, permissive-mode flag.
    pub outcome: Outcome,
    /// Verdict generation the decision was made at.
    pub generation: i64,
    /// Whether the kernel may cache the verdict (false when a policy that
    /// could apply reads the clock).
    pub cacheable: bool,
    /// Whether the answer came from the engine's decision cache.
    pub cache_hit: bool,
    /// Reference groups of the program (for a pair: the connecting
    /// program's groups, then the accepting program's not already listed).
    pub groups: Vec<String>,
    /// The host's mode the decision applied (for a pair, the connecting
    /// host's); learning mode records exec decisions by it.
    pub mode: Mode,
}

/// Tuning of an [`Engine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Evaluate only the slices of the policy set that can apply (default
    /// true). False evaluates the whole set for every request (for
    /// comparison and benchmarks).
    pub slicing: bool,
    /// Decisions kept in the decision cache (default 65 536; 0 disables it).
    pub cache_capacity: usize,
    /// Key the decision cache by the request's equivalence class (what
    /// the slice's policies read of it, [`crate::class`]) rather than by
    /// the request itself (default true; false: the exact key only).
    pub class_cache: bool,
    /// Decide slices whose policies all compiled ([`crate::compiled`])
    /// without Cedar (default true; false: Cedar decides every request).
    pub compiled: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            slicing: true,
            cache_capacity: 65_536,
            class_cache: true,
            compiled: true,
        }
    }
}

/// Decision-cache counters since the engine was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Decisions answered from the cache.
    pub hits: u64,
    /// Decisions evaluated (cache miss, cache off, or clock-dependent).
    pub misses: u64,
    /// Entries in the cache of the current generation.
    pub entries: u64,
    /// Evaluated decisions made without Cedar ([`crate::compiled`]).
    pub compiled: u64,
}

/// The governing policy, compiled and sliced.
#[derive(Debug)]
struct Compiled {
    /// Policy version id (`None`: no governing policy, default deny).
    version: Option<i64>,
    /// SHA-256 of the text.
    identity: Option<String>,
    /// The slicing index (holds the whole set too).
    index: Index,
}

impl Compiled {
    fn new(
        schema: &Schema,
        pv: Option<&PolicyVersion>,
        slicing: bool,
    ) -> Result<Self, PolicyError> {
        let Some(pv) = pv else {
            return Ok(Self {
                version: None,
                identity: None,
                index: Index::new(&PolicySet::new(), slicing),
            });
        };
        let loaded = super::validate(schema, &pv.text)?;
        Ok(Self {
            version: Some(pv.id),
            identity: Some(loaded.identity),
            index: Index::new(&loaded.set, slicing),
        })
    }

    fn same_as(&self, data: &EngineData) -> bool {
        match &data.policy {
            None => self.version.is_none(),
            Some(pv) => self.is(pv),
        }
    }

    fn is(&self, pv: &PolicyVersion) -> bool {
        self.version == Some(pv.id) && self.identity.as_deref() == Some(pv.sha256.as_str())
    }
}

/// Compiled policy sets kept for a swap: the ones prepared before an
/// activation or rollback and the last ones in force.
const PREPARED_KEEP: usize = 4;

/// Compiles policy versions off the decision path and keeps them until a
/// refresh swaps them in.
struct Prepared {
    schema: Schema,
    slicing: bool,
    sets: Mutex<Vec<Arc<Compiled>>>,
    /// Versions being compiled on a background thread, by SHA-256.
    compiling: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").finish_non_exhaustive()
    }
}

impl Prepared {
    fn get(&self, pv: &PolicyVersion) -> Option<Arc<Compiled>> {
        let sets = self.sets.lock().ok()?;
        sets.iter().find(|c| c.is(pv)).map(Arc::clone)
    }

    fn keep(&self, c: &Arc<Compiled>) {
        if c.version.is_none() {
            return;
        }
        if let Ok(mut sets) = self.sets.lock() {
            sets.retain(|x| !(x.version == c.version && x.identity == c.identity));
            sets.push(Arc::clone(c));
            while sets.len() > PREPARED_KEEP {
                sets.remove(0);
            }
        }
    }

    fn compile(&self, pv: &PolicyVersion) -> Result<Arc<Compiled>, PolicyError> {
        if let Some(c) = self.get(pv) {
            return Ok(c);
        }
        let c = Arc::new(Compiled::new(&self.schema, Some(pv), self.slicing)?);
        self.keep(&c);
        Ok(c)
    }

    /// Whether a background compile is under way.
    fn busy(&self) -> bool {
        self.compiling
            .lock()
            .map(|c| !c.is_empty())
            .unwrap_or(false)
    }

    /// Starts compiling `pv` on a thread of its own unless one already is.
    fn compile_in_background(self: &Arc<Self>, pv: PolicyVersion) {
        let fresh = self
            .compiling
            .lock()
            .map(|mut c| c.insert(pv.sha256.clone()))
            .unwrap_or(false);
        if !fresh {
            return;
        }
        let me = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("policy-compile".into())
            .spawn(move || {
                // A failure shows on the next blocking refresh.
                let _ = me.compile(&pv);
                if let Ok(mut c) = me.compiling.lock() {
                    c.remove(&pv.sha256);
                }
            });
        if spawned.is_err() {
            if let Ok(mut c) = self.compiling.lock() {
                c.clear();
            }
        }
    }
}

impl PolicyPrep for Prepared {
    fn prepare(&self, pv: &PolicyVersion) {
        // An invalid text fails the activation's own validation; nothing to keep.
        let _ = self.compile(pv);
    }
}

/// One shard of the program-membership map: SHA-256 -> reference groups.
type GroupShard = Mutex<HashMap<String, Arc<[String]>>>;

/// Program memberships as of one generation, filled on demand.
#[derive(Debug)]
struct ProgramGroups {
    hasher: std::collections::hash_map::RandomState,
    shards: Vec<GroupShard>,
}

impl ProgramGroups {
    fn new() -> Self {
        Self {
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..PROGRAM_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, sha: &str) -> Option<&GroupShard> {
        let i = usize::try_from(self.hasher.hash_one(sha) % PROGRAM_SHARDS as u64).unwrap_or(0);
        self.shards.get(i)
    }

    /// Groups of `sha` as of membership version `members`; `None` when
    /// the store's memberships have moved past it (the caller refreshes
    /// and retries). `lenient` (a decision's last try, memberships
    /// changing faster than it can refresh): the newer groups instead,
    /// not kept; such an answer is not cacheable if they differ (the
    /// change touching `sha` is pending in, or already synced to, the
    /// store's ledger, so [`Source::note_answer`] refuses it).
    fn get(
        &self,
        store: &dyn Source,
        sha: &str,
        members: i64,
        lenient: bool,
    ) -> Result<Option<Arc<[String]>>, PolicyError> {
        let shard = self
            .shard(sha)
            .ok_or(PolicyError::Request("program shard out of range".into()))?;
        if let Ok(map) = shard.lock() {
            if let Some(g) = map.get(sha) {
                return Ok(Some(Arc::clone(g)));
            }
        }
        let (groups, at) = store.groups_of_at(sha)?;
        if at != members {
            return Ok(lenient.then(|| groups.into()));
        }
        let groups: Arc<[String]> = groups.into();
        if let Ok(mut map) = shard.lock() {
            if map.len() >= PROGRAM_SHARD_CAP {
                map.clear();
            }
            map.insert(sha.to_owned(), Arc::clone(&groups));
        }
        Ok(Some(groups))
    }
}

/// What a cached decision depends on besides the generation (each
/// snapshot has its own cache, so a generation move flushes it): the
/// slice evaluated and what its policies read of the request
/// ([`crate::class`]). An exact key holds every identity and membership
/// (the request as the old exact cache keyed it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    slice: u64,
    action: Action,
    mode: Mode,
    /// Identities, present when a policy of the slice reads them.
    user: Option<String>,
    host: Option<String>,
    program: Option<String>,
    /// Memberships among the entities the slice names.
    roles: Vec<String>,
    host_group: Option<String>,
    groups: Vec<String>,
    target: TargetKey,
    peer: Option<PeerKey>,
    /// Outcomes of the slice's comparisons ([`crate::class::Atom`]).
    atoms: Vec<u8>,
    /// Context fields, present only when a candidate policy reads them.
    session: Option<u32>,
    ancestry: Option<Vec<String>>,
    hour: Option<i64>,
    weekday: Option<i64>,
    src_addr: Option<String>,
    src_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PeerKey {
    host: Option<String>,
    group: Option<String>,
    program: Option<String>,
    groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TargetKey {
    Exec(bool),
    /// Path, new path, create, truncate, link. The file's set membership
    /// is a function of the paths and the snapshot's file sets (a change
    /// of the sets makes a new snapshot, with a new cache).
    File(String, Option<String>, [bool; 3]),
    Net(Proto, String, u16),
}

/// A cached decision and the programs it was reported to the ledger for.
#[derive(Debug, Clone)]
struct Cached {
    decision: Decision,
    // Shared: a hit clones the entry.
    program: Arc<str>,
    peer: Option<Arc<str>>,
}

/// What a request offers a cache key besides itself.
struct KeyParts<'a> {
    mode: Mode,
    roles: &'a [String],
    host_group: &'a str,
    groups: &'a [String],
    peer: Option<&'a PeerInfo<'a>>,
}

/// The cache key of `req` for `slice`: its class, or with `exact` the
/// request itself (every identity and membership).
fn cache_key(req: &QualifyRequest, p: &KeyParts<'_>, slice: &Slice, exact: bool) -> CacheKey {
    let shape = &slice.class;
    let (ids, reads) = if exact {
        (Ids::ALL, slice.reads.with(shape.exact))
    } else {
        (shape.ids, shape.exact)
    };
    let named = |ty: &str, id: &str| exact || shape.names(ty, id);
    let (_, hour, weekday) = clock(req.at_ms);
    let (target, src) = match &req.target {
        Target::Exec { loader_direct } => (TargetKey::Exec(*loader_direct), None),
        Target::File {
            path,
            to,
            create,
            truncate,
            link,
        } => (
            TargetKey::File(path.clone(), to.clone(), [*create, *truncate, *link]),
            None,
        ),
        Target::Net(t) => (
            TargetKey::Net(t.proto, t.dst_addr.clone(), t.dst_port),
            Some((&t.src_addr, t.src_port)),
        ),
    };
    let read_program = ids.any(Ids::PROGRAM)
        || (ids.any(Ids::RESOURCE) && matches!(req.target, Target::Exec { .. }));
    let atoms = if exact {
        Vec::new()
    } else {
        let input = AtomInput {
            hour,
            weekday,
            session: i64::from(req.subject.session),
            ports: match &req.target {
                Target::Net(t) => Some((i64::from(t.src_port), i64::from(t.dst_port))),
                _ => None,
            },
            ancestry: &req.subject.ancestry,
        };
        shape.atoms.iter().map(|a| a.eval(&input)).collect()
    };
    CacheKey {
        slice: slice.id,
        action: req.action,
        mode: p.mode,
        user: ids.any(Ids::USER).then(|| req.subject.user.clone()),
        host: ids.any(Ids::HOST).then(|| req.host.clone()),
        program: read_program.then(|| req.program.sha256.clone()),
        roles: p
            .roles
            .iter()
            .filter(|r| named("Role", r))
            .cloned()
            .collect(),
        host_group: named("HostGroup", p.host_group).then(|| p.host_group.to_owned()),
        groups: p
            .groups
            .iter()
            .filter(|g| named("ProgramGroup", g))
            .cloned()
            .collect(),
        target,
        peer: p.peer.map(|peer| PeerKey {
            host: ids.any(Ids::HOST).then(|| peer.host.to_owned()),
            group: named("HostGroup", peer.group).then(|| peer.group.to_owned()),
            program: ids.any(Ids::PROGRAM).then(|| peer.program.to_owned()),
            groups: peer
                .groups
                .iter()
                .filter(|g| named("ProgramGroup", g))
                .cloned()
                .collect(),
        }),
        atoms,
        session: reads.any(Reads::SESSION).then_some(req.subject.session),
        ancestry: reads
            .any(Reads::ANCESTRY)
            .then(|| req.subject.ancestry.clone()),
        hour: reads.any(Reads::HOUR).then_some(hour),
        weekday: reads.any(Reads::WEEKDAY).then_some(weekday),
        src_addr: src
            .filter(|_| reads.any(Reads::SRC_ADDR))
            .map(|(a, _)| a.clone()),
        src_port: src.filter(|_| reads.any(Reads::SRC_PORT)).map(|(_, p)| p),
    }
}

/// Everything a decision depends on, as of one verdict generation.
#[derive(Debug)]
struct Snapshot {
    versions: Versions,
    generation: i64,
    policy: Arc<Compiled>,
    hosts: Arc<HashMap<String, (String, Mode)>>,
    users: Arc<HashMap<String, Vec<String>>>,
    file_sets: Arc<FileSets>,
    programs: ProgramGroups,
    cache: ClockCache<CacheKey, Cached>,
}

/// Entity type names and action uids, parsed once.
#[derive(Debug)]
struct Names {
    user: EntityTypeName,
    role: EntityTypeName,
    host: EntityTypeName,
    host_group: EntityTypeName,
    program: EntityTypeName,
    program_group: EntityTypeName,
    file: EntityTypeName,
    file_set: EntityTypeName,
    service: EntityTypeName,
    actions: Vec<(Action, EntityUid)>,
}

impl Names {
    fn new() -> Result<Self, PolicyError> {
        let ty = |n: &str| {
            EntityTypeName::from_str(&format!("Trustbind::{n}"))
                .map_err(|e| PolicyError::Schema(format!("entity type {n}: {e}")))
        };
        let action = ty("Action")?;
        Ok(Self {
            user: ty("User")?,
            role: ty("Role")?,
            host: ty("Host")?,
            host_group: ty("HostGroup")?,
            program: ty("Program")?,
            program_group: ty("ProgramGroup")?,
            file: ty("File")?,
            file_set: ty("FileSet")?,
            service: ty("Service")?,
            actions: Action::ALL
                .iter()
                .map(|a| {
                    (
                        *a,
                        EntityUid::from_type_name_and_id(action.clone(), EntityId::new(a.as_str())),
                    )
                })
                .collect(),
        })
    }

    fn uid(ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }

    fn action(&self, a: Action) -> Result<EntityUid, PolicyError> {
        self.actions
            .iter()
            .find(|(x, _)| *x == a)
            .map(|(_, u)| u.clone())
            .ok_or(PolicyError::Request(format!(
                "unknown action `{}`",
                a.as_str()
            )))
    }
}

/// The entities a request is decided over.
struct Subjects {
    /// The user, then its roles.
    principal: Vec<EntityUid>,
    /// The program, then its groups.
    program: Vec<EntityUid>,
    /// The resource, then the file sets of a file (empty for `exec`: the
    /// program is the resource).
    resource: Vec<EntityUid>,
    /// A file action's new path (`rename`, hard link): its `File`, then
    /// its file sets; empty otherwise.
    to: Vec<EntityUid>,
}

/// A policy that determined a decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Determining {
    /// Cedar's policy id (`policy0`, …).
    pub id: String,
    /// `@id`, else the Cedar id.
    pub name: String,
    /// `permit` or `forbid`.
    pub effect: &'static str,
}

/// How the current policy and data decide a request ([`Engine::explain`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The governing policy version (`None`: none, default deny).
    pub policy_version: Option<i64>,
    /// The verdict generation.
    pub generation: i64,
    /// The host group's mode.
    pub mode: Mode,
    /// Cedar's decision: `allow` or `deny`.
    pub decision: &'static str,
    /// The verdict after the mode.
    pub verdict: Verdict,
    /// Permissive mode, Cedar denied.
    pub would_deny: bool,
    /// The policies that decided (Cedar's reason): the satisfied permits
    /// of an allow, the satisfied forbids of a deny; none for a default deny.
    pub determining: Vec<Determining>,
    /// `@alert` names of the determining policies.
    pub alerts: Vec<String>,
    /// The host's host group.
    pub host_group: String,
    /// The user's roles.
    pub roles: Vec<String>,
    /// The program's reference groups.
    pub groups: Vec<String>,
    /// For a default deny: what was missing (see [`super::explain`]).
    pub missing: Vec<String>,
    /// Policies skipped because evaluating them failed.
    pub errors: Vec<String>,
}

/// The other side of a correlated connection.
struct Peer<'a> {
    host: &'a str,
    program: &'a Program,
}

/// The peer, resolved against a snapshot.
struct PeerInfo<'a> {
    host: &'a str,
    group: &'a str,
    program: &'a str,
    groups: Arc<[String]>,
}

/// `(time_s, hour, weekday)` of `at_ms` in the appliance's time zone
/// ([`crate::clock`], UTC unless set); weekday 0 = Monday.
pub fn clock(at_ms: i64) -> (i64, i64, i64) {
    crate::clock::civil(at_ms)
}

/// The policy engine. `Send + Sync`; share it behind an `Arc`.
pub struct Engine {
    store: Arc<dyn Source>,
    prepared: Arc<Prepared>,
    options: EngineOptions,
    authorizer: Authorizer,
    names: Names,
    current: ArcSwap<Snapshot>,
    refreshing: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    compiled: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the governing policy (none: default deny) and the host and
    /// user data from `store`, validating the policy against `schema_text`.
    pub fn new<S: Source + 'static>(
        store: Arc<S>,
        schema_text: &str,
    ) -> Result<Engine, PolicyError> {
        Self::with_options(store, schema_text, EngineOptions::default())
    }

    /// [`Engine::new`] with explicit slicing and cache settings.
    pub fn with_options<S: Source + 'static>(
        store: Arc<S>,
        schema_text: &str,
        options: EngineOptions,
    ) -> Result<Engine, PolicyError> {
        let store: Arc<dyn Source> = store;
        let (schema, _warnings) = Schema::from_cedarschema_str(schema_text)
            .map_err(|e| PolicyError::Schema(e.to_string()))?;
        let data = store.engine_data()?;
        let policy = Arc::new(Compiled::new(
            &schema,
            data.policy.as_ref(),
            options.slicing,
        )?);
        let prepared = Arc::new(Prepared {
            schema,
            slicing: options.slicing,
            sets: Mutex::new(Vec::new()),
            compiling: Mutex::new(HashSet::new()),
        });
        prepared.keep(&policy);
        let prep: Arc<dyn PolicyPrep> = Arc::clone(&prepared) as Arc<dyn PolicyPrep>;
        store.add_policy_prep(Arc::downgrade(&prep));
        let snap = Snapshot::new(data, policy, options.cache_capacity);
        Ok(Engine {
            store,
            prepared,
            options,
            authorizer: Authorizer::new(),
            names: Names::new()?,
            current: ArcSwap::from_pointee(snap),
            refreshing: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            compiled: AtomicU64::new(0),
        })
    }

    /// Decision-cache hit and miss counters.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: u64::try_from(self.current.load().cache.len()).unwrap_or(u64::MAX),
            compiled: self.compiled.load(Ordering::Relaxed),
        }
    }

    /// Number of slices of the governing policy set (0 when not sliced).
    pub fn slices(&self) -> usize {
        self.current.load().policy.index.slices()
    }

    /// The verdict generation of the data the engine decides with.
    pub fn generation(&self) -> i64 {
        self.current.load().generation
    }

    /// Re-reads policy and data when the store moved, compiling a new
    /// policy set if one is needed; returns the generation now in use.
    /// Cheap (three atomic loads) when nothing moved; the compiled policy
    /// is reused when only data moved, hosts and users too when only
    /// memberships or the generation moved.
    pub fn refresh(&self) -> Result<i64, PolicyError> {
        self.refresh_with(true)
    }

    /// Whether the snapshot decisions use is the store's current one: a
    /// decision made now then needs no refresh (no re-reading of the
    /// store's data), and reads the store at most once, for a program not
    /// seen under this snapshot (one indexed read on a reader connection,
    /// which never waits for the writer).
    pub fn is_current(&self) -> bool {
        self.current.load().versions == self.store.versions_hint()
    }

    /// `compile`: false on a decision's first try: a policy set that was
    /// not prepared is compiled on a background thread and the old
    /// snapshot answers meanwhile. A refresh under way on another thread
    /// is waited for (it never compiles, so it is short): a decision made
    /// after a change committed sees the change.
    fn refresh_with(&self, compile: bool) -> Result<i64, PolicyError> {
        let poisoned = || PolicyError::Poisoned;
        {
            let cur = self.current.load();
            if cur.versions == self.store.versions_hint() {
                return Ok(cur.generation);
            }
        }
        let _one = self.refreshing.lock().map_err(|_| poisoned())?;
        let cur = self.current.load_full();
        if cur.versions == self.store.versions_hint() {
            return Ok(cur.generation);
        }
        let v = self.store.versions()?;
        let snap = if v.data == cur.versions.data {
            Snapshot {
                versions: v,
                generation: v.generation,
                policy: Arc::clone(&cur.policy),
                hosts: Arc::clone(&cur.hosts),
                users: Arc::clone(&cur.users),
                file_sets: Arc::clone(&cur.file_sets),
                programs: ProgramGroups::new(),
                cache: ClockCache::new(self.options.cache_capacity),
            }
        } else {
            if !compile && self.prepared.busy() {
                // A set is being compiled in the background: keep the old
                // snapshot without re-reading the data for every decision.
                return Ok(cur.generation);
            }
            let data = self.store.engine_data()?;
            let policy = match &data.policy {
                _ if cur.policy.same_as(&data) => Arc::clone(&cur.policy),
                None => Arc::new(Compiled::new(
                    &self.prepared.schema,
                    None,
                    self.options.slicing,
                )?),
                Some(pv) => match self.prepared.get(pv) {
                    Some(c) => c,
                    None if compile => self.prepared.compile(pv)?,
                    None => {
                        self.prepared.compile_in_background(pv.clone());
                        return Ok(cur.generation);
                    }
                },
            };
            self.prepared.keep(&policy);
            Snapshot::new(data, policy, self.options.cache_capacity)
        };
        let g = snap.generation;
        self.current.store(Arc::new(snap));
        Ok(g)
    }

    /// Decides one request. An `ipc_connect` naming the listener's
    /// program (`req.peer`) is decided as a pair on one host: the context
    /// carries `peer_program` and `peer_host` (this host).
    pub fn decide(&self, req: &QualifyRequest) -> Result<Decision, PolicyError> {
        let peer = req.peer.as_ref().map(|program| Peer {
            host: &req.host,
            program,
        });
        self.with_snapshot(|snap, last| self.evaluate(snap, req, peer.as_ref(), last))
    }

    /// Decides a correlated connection as one: each side is evaluated with
    /// `peer_host`/`peer_program` set from the other, both against the same
    /// snapshot. Allowed only if both sides allow; obligations are merged
    /// (the connecting side's value wins when both set one); reasons from
    /// both sides; `would_deny` if either side would deny.
    pub fn decide_pair(
        &self,
        connect: &QualifyRequest,
        accept: &QualifyRequest,
    ) -> Result<Decision, PolicyError> {
        for r in [connect, accept] {
            if !matches!(r.target, Target::Net(_)) {
                return Err(PolicyError::Request(format!(
                    "pair decision: request from host `{}` for `{}` has no network target",
                    r.host,
                    r.action.as_str()
                )));
            }
        }
        self.with_snapshot(|snap, last| {
            let a = self.evaluate(
                snap,
                connect,
                Some(&Peer {
                    host: &accept.host,
                    program: &accept.program,
                }),
                last,
            )?;
            let Some(a) = a else { return Ok(None) };
            let b = self.evaluate(
                snap,
                accept,
                Some(&Peer {
                    host: &connect.host,
                    program: &connect.program,
                }),
                last,
            )?;
            Ok(b.map(|b| merge(a, b)))
        })
    }

    /// Decides with the current snapshot (refreshed first if the store
    /// moved), retrying when the store's memberships moved under it.
    fn with_snapshot(
        &self,
        f: impl Fn(&Snapshot, bool) -> Result<Option<Decision>, PolicyError>,
    ) -> Result<Decision, PolicyError> {
        for i in 0..MAX_TRIES {
            // The first try never compiles; a retry (the store's
            // memberships moved under a stale snapshot) must.
            self.refresh_with(i > 0)?;
            let snap = self.current.load();
            if let Some(d) = f(&snap, i + 1 == MAX_TRIES)? {
                return Ok(d);
            }
        }
        Err(PolicyError::Unstable(MAX_TRIES))
    }

    /// `Ok(None)`: the store moved past the snapshot; retry. `lenient`:
    /// the last try, see [`ProgramGroups::get`].
    fn evaluate(
        &self,
        snap: &Snapshot,
        req: &QualifyRequest,
        peer: Option<&Peer<'_>>,
        lenient: bool,
    ) -> Result<Option<Decision>, PolicyError> {
        let Some((host_group, mode)) = snap.hosts.get(&req.host) else {
            // A host registered since the snapshot was taken: retry on a
            // fresh one.
            if snap.versions.data != self.store.versions_hint().data {
                return Ok(None);
            }
            return Err(PolicyError::UnknownHost(req.host.clone()));
        };
        let Some(groups) = snap.programs.get(
            &*self.store,
            &req.program.sha256,
            snap.versions.members,
            lenient,
        )?
        else {
            return Ok(None);
        };
        if *mode == Mode::Disabled {
            // Independent of memberships: nothing for the ledger.
            return Ok(Some(Decision {
                outcome: Outcome::bare(Verdict::Allow),
                generation: snap.generation,
                cacheable: true,
                cache_hit: false,
                groups: groups.to_vec(),
                mode: Mode::Disabled,
            }));
        }
        let peer = match peer {
            None => None,
            Some(p) => match self.peer_info(snap, p, lenient)? {
                Some(info) => Some(info),
                None => return Ok(None),
            },
        };
        let s = self.subjects(snap, req, &groups)?;
        let resource_keys: &[EntityUid] = if s.resource.is_empty() {
            &s.program
        } else {
            &s.resource
        };
        let slice = snap.policy.index.select(&Keys {
            action: req.action,
            principal: &s.principal,
            resource: resource_keys,
            program: &s.program,
        });

        // The decision cache: the request itself first (every decision
        // made or answered from its class is kept under it too, so a
        // request seen before costs one key and one lookup, as with the
        // exact cache alone), then the request's class (decisions whose
        // explanation names the request's own identities are kept under
        // the request only).
        let roles: &[String] = snap.users.get(&req.subject.user).map_or(&[], Vec::as_slice);
        let parts = KeyParts {
            mode: *mode,
            roles,
            host_group,
            groups: &groups,
            peer: peer.as_ref(),
        };
        let cache_on = snap.cache.enabled() && !slice.reads.any(Reads::TIME);
        let exact_key = cache_on.then(|| cache_key(req, &parts, &slice, true));
        if let Some(k) = &exact_key {
            if let Some(c) = snap.cache.get(k) {
                return Ok(Some(self.hit(snap, c, req, &parts).0));
            }
        }
        // A slice decided without Cedar costs about what a class key
        // costs: the class cache serves the slices Cedar decides.
        let by_cedar = slice.fast.is_none() || !self.options.compiled;
        let class_key = (cache_on && self.options.class_cache && by_cedar)
            .then(|| cache_key(req, &parts, &slice, false));
        if let (Some(k), Some(exact)) = (&class_key, &exact_key) {
            if let Some(c) = snap.cache.get(k) {
                let (d, noted) = self.hit(snap, c, req, &parts);
                if noted {
                    // The ledger knows this answer for the request's own
                    // programs now.
                    snap.cache.insert(
                        exact.clone(),
                        Cached {
                            decision: d.clone(),
                            program: req.program.sha256.as_str().into(),
                            peer: peer.as_ref().map(|p| p.program.into()),
                        },
                    );
                }
                return Ok(Some(d));
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let index = &snap.policy.index;
        let fast = match &slice.fast {
            Some(f) if self.options.compiled => self.fast(f, req, host_group, peer.as_ref(), &s)?,
            _ => None,
        };
        let (mut out, allow, reasonless, errors) = match fast {
            Some((allow, ids)) => {
                self.compiled.fetch_add(1, Ordering::Relaxed);
                let reasonless = ids.is_empty();
                let out = outcome_of(allow, ids, 0, *mode, |id| index.meta(id));
                (out, allow, reasonless, Vec::new())
            }
            None => {
                let (request, entities) = self.cedar(req, *mode, host_group, peer.as_ref(), &s)?;
                let resp = self
                    .authorizer
                    .is_authorized(&request, &slice.set, &entities);
                let out = outcome_with(&resp, *mode, |id| index.meta(id));
                let allow = resp.decision() == cedar_policy::Decision::Allow;
                let reasonless = resp.diagnostics().reason().next().is_none();
                let errors = if allow {
                    Vec::new()
                } else {
                    cedar_errors(index, &resp)
                };
                (out, allow, reasonless, errors)
            }
        };
        out.reasons.sort_unstable();
        out.reasons.dedup();
        if !allow {
            out.explain = Some(Arc::new(Diagnosis {
                errors,
                ..self.diagnose(snap, req, host_group, &s, &groups, reasonless)
            }));
        }
        let mut d = Decision {
            outcome: out,
            generation: snap.generation,
            // A direct loader exec is never cached (by the kernel, or in the
            // agent's offline bundle, which would then answer for the
            // loader as every program's loader).
            cacheable: slice.reads.kernel_cacheable()
                && !matches!(
                    req.target,
                    Target::Exec {
                        loader_direct: true
                    }
                ),
            cache_hit: false,
            groups: groups.to_vec(),
            mode: *mode,
        };
        // Reported to the store's ledger before it can be handed out again
        // from the decision cache: every cached entry is one the ledger
        // knows for its programs, so a hit for the same programs need not
        // report it again (a class hit for others does, see `hit`).
        let peer_program = peer.as_ref().map(|p| p.program);
        if self.note(snap, req, peer_program, &d) {
            // A decision some policy determined, without errors, is the
            // class's: its diagnosis (if a forbid denied) holds only the
            // request's memberships, which a hit fills in. A default deny
            // names what each permit lacked of this request's identities,
            // and errors may quote them: kept for the request itself.
            let classy = !d.outcome.reasons.is_empty() && d.outcome.errors == 0;
            let cached = || Cached {
                decision: d.clone(),
                program: req.program.sha256.as_str().into(),
                peer: peer_program.map(Into::into),
            };
            for k in [if classy { class_key } else { None }, exact_key]
                .into_iter()
                .flatten()
            {
                snap.cache.insert(k, cached());
            }
        } else {
            d.cacheable = false;
        }
        Ok(Some(d))
    }

    /// `slice`'s decision without Cedar, when the request has what its
    /// compiled policies read ([`crate::compiled`]); `None`: ask Cedar.
    fn fast<'s>(
        &self,
        slice: &'s FastSlice,
        req: &QualifyRequest,
        host_group: &str,
        peer: Option<&PeerInfo<'_>>,
        s: &Subjects,
    ) -> Result<Option<FastDecision<'s>>, PolicyError> {
        let n = &self.names;
        let action = n.action(req.action)?;
        let host = [
            Names::uid(&n.host, &req.host),
            Names::uid(&n.host_group, host_group),
        ];
        let (_, hour, weekday) = clock(req.at_ms);
        let net = match &req.target {
            Target::Net(t) => Some(t),
            _ => None,
        };
        let peers = match (peer, net) {
            (Some(p), Some(_)) => Some((
                [
                    Names::uid(&n.host, p.host),
                    Names::uid(&n.host_group, p.group),
                ],
                std::iter::once(Names::uid(&n.program, p.program))
                    .chain(p.groups.iter().map(|g| Names::uid(&n.program_group, g)))
                    .collect::<Vec<_>>(),
            )),
            _ => None,
        };
        let (path, to) = match &req.target {
            Target::File { path, to, .. } => (
                Some(path.as_str()),
                to.as_ref()
                    .filter(|_| !s.to.is_empty())
                    .map(|_| s.to.as_slice()),
            ),
            _ => (None, None),
        };
        let exec = matches!(req.target, Target::Exec { .. });
        let facts = compiled::Facts {
            action: &action,
            principal: &s.principal,
            resource: if s.resource.is_empty() {
                &s.program
            } else {
                &s.resource
            },
            host: &host,
            program: (!exec).then_some(s.program.as_slice()),
            peer_host: peers.as_ref().map(|(h, _)| h.as_slice()),
            peer_program: peers.as_ref().map(|(_, p)| p.as_slice()),
            to,
            path,
            port: net.map(|t| i64::from(t.dst_port)),
            atoms: AtomInput {
                hour,
                weekday,
                session: i64::from(req.subject.session),
                ports: net.map(|t| (i64::from(t.src_port), i64::from(t.dst_port))),
                ancestry: &req.subject.ancestry,
            },
        };
        Ok(slice.decide(&facts))
    }

    /// Reports an answer to the store's ledger; false: the kernel must
    /// not cache it (and neither may the engine).
    fn note(
        &self,
        snap: &Snapshot,
        req: &QualifyRequest,
        peer_program: Option<&str>,
        d: &Decision,
    ) -> bool {
        let mut programs = Vec::with_capacity(2);
        programs.push(req.program.sha256.as_str());
        programs.extend(peer_program);
        let allow = !matches!(d.outcome.verdict, Verdict::Deny);
        self.store
            .note_answer(snap.generation, snap.versions.members, &programs, allow)
    }

    /// A cached decision answering `req`: the request's own memberships
    /// filled in (a class hit may come from another program or user with
    /// the same memberships among the named entities), reported to the
    /// ledger when its programs are not the ones it was cached for; with
    /// false when the ledger refused it (not cacheable, by anyone).
    fn hit(
        &self,
        snap: &Snapshot,
        c: Cached,
        req: &QualifyRequest,
        p: &KeyParts<'_>,
    ) -> (Decision, bool) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        let mut d = c.decision;
        d.cache_hit = true;
        if d.groups.as_slice() != p.groups {
            d.groups = p.groups.to_vec();
        }
        if let Some(e) = &mut d.outcome.explain {
            if e.host_group != p.host_group || e.roles != p.roles || e.groups != p.groups {
                let e = Arc::make_mut(e);
                e.host_group = p.host_group.to_owned();
                e.roles = p.roles.to_vec();
                e.groups = p.groups.to_vec();
            }
        }
        let peer_program = p.peer.map(|x| x.program);
        let noted = (*c.program == *req.program.sha256 && c.peer.as_deref() == peer_program)
            || self.note(snap, req, peer_program, &d);
        if !noted {
            d.cacheable = false;
        }
        (d, noted)
    }

    /// The other side of a pair, resolved against `snap`; `Ok(None)`: the
    /// store moved past the snapshot.
    fn peer_info<'a>(
        &self,
        snap: &'a Snapshot,
        p: &Peer<'a>,
        lenient: bool,
    ) -> Result<Option<PeerInfo<'a>>, PolicyError> {
        let (group, _) = snap
            .hosts
            .get(p.host)
            .ok_or_else(|| PolicyError::UnknownHost(p.host.to_owned()))?;
        let Some(groups) = snap.programs.get(
            &*self.store,
            &p.program.sha256,
            snap.versions.members,
            lenient,
        )?
        else {
            return Ok(None);
        };
        Ok(Some(PeerInfo {
            host: p.host,
            group,
            program: &p.program.sha256,
            groups,
        }))
    }

    /// The principal (user, roles), the program (itself, its groups) and
    /// the resource of `req`.
    fn subjects(
        &self,
        snap: &Snapshot,
        req: &QualifyRequest,
        groups: &[String],
    ) -> Result<Subjects, PolicyError> {
        let n = &self.names;
        let mut principal = Vec::with_capacity(2);
        principal.push(Names::uid(&n.user, &req.subject.user));
        if let Some(roles) = snap.users.get(&req.subject.user) {
            principal.extend(roles.iter().map(|r| Names::uid(&n.role, r)));
        }
        let mut program = Vec::with_capacity(1 + groups.len());
        program.push(Names::uid(&n.program, &req.program.sha256));
        program.extend(groups.iter().map(|g| Names::uid(&n.program_group, g)));
        let file = |path: &str| {
            let mut v = vec![Names::uid(&n.file, path)];
            v.extend(
                snap.file_sets
                    .sets_of(path)
                    .iter()
                    .map(|s| Names::uid(&n.file_set, s)),
            );
            v
        };
        let mut to = Vec::new();
        let resource = match (&req.action, &req.target) {
            (Action::Exec, Target::Exec { .. }) => Vec::new(),
            (
                Action::OpenRead | Action::OpenWrite | Action::Delete | Action::Rename,
                Target::File { path, to: new, .. },
            ) => {
                if let Some(new) = new {
                    to = file(new);
                }
                file(path)
            }
            (Action::Connect | Action::Accept | Action::IpcConnect, Target::Net(t)) => {
                vec![Names::uid(
                    &n.service,
                    &format!("{}:{}/{}", t.dst_addr, t.dst_port, t.proto.as_str()),
                )]
            }
            (a, _) => {
                return Err(PolicyError::Request(format!(
                    "host `{}`: action `{}` does not take this kind of target",
                    req.host,
                    a.as_str()
                )))
            }
        };
        Ok(Subjects {
            principal,
            program,
            resource,
            to,
        })
    }

    /// The entity data behind a Cedar deny and, when no forbid decided it,
    /// what each permit of the action lacked (over the whole set, not the
    /// slice: the permits outside it are the ones whose scope failed).
    /// `reasonless`: no policy determined the deny. The evaluation errors
    /// are the caller's to fill in ([`cedar_errors`]; none without Cedar).
    fn diagnose(
        &self,
        snap: &Snapshot,
        req: &QualifyRequest,
        host_group: &str,
        s: &Subjects,
        groups: &[String],
        reasonless: bool,
    ) -> Diagnosis {
        let n = &self.names;
        let index = &snap.policy.index;
        let missing = if reasonless {
            let host = [
                Names::uid(&n.host, &req.host),
                Names::uid(&n.host_group, host_group),
            ];
            index.permits().missing(&Facts {
                action: req.action,
                principal: &s.principal,
                resource: if s.resource.is_empty() {
                    &s.program
                } else {
                    &s.resource
                },
                program: &s.program,
                host: &host,
                policy: snap.policy.version.is_some(),
            })
        } else {
            Vec::new()
        };
        Diagnosis {
            host_group: host_group.to_owned(),
            roles: snap
                .users
                .get(&req.subject.user)
                .cloned()
                .unwrap_or_default(),
            groups: groups.to_vec(),
            missing,
            errors: Vec::new(),
        }
    }

    /// Explains how the current policy and data decide `req`: the whole
    /// set evaluated (no slicing, no decision cache, nothing reported to
    /// the ledger or audited), Cedar's determining policies with their
    /// effect, the entity data, and for a deny what each permit lacked.
    pub fn explain(&self, req: &QualifyRequest) -> Result<Explanation, PolicyError> {
        self.refresh()?;
        let snap = self.current.load();
        let (host_group, mode) = snap
            .hosts
            .get(&req.host)
            .ok_or_else(|| PolicyError::UnknownHost(req.host.clone()))?;
        let groups = snap
            .programs
            .get(
                &*self.store,
                &req.program.sha256,
                snap.versions.members,
                true,
            )?
            .unwrap_or_else(|| Arc::from(Vec::new()));
        let peer = req.peer.as_ref().map(|program| Peer {
            host: &req.host,
            program,
        });
        let peer = match &peer {
            Some(p) => self.peer_info(&snap, p, true)?,
            None => None,
        };
        let s = self.subjects(&snap, req, &groups)?;
        let (request, entities) = self.cedar(req, *mode, host_group, peer.as_ref(), &s)?;
        let index = &snap.policy.index;
        let resp = self
            .authorizer
            .is_authorized(&request, &index.full().set, &entities);
        let out = outcome_with(&resp, *mode, |id| index.meta(id));
        let mut determining: Vec<Determining> = resp
            .diagnostics()
            .reason()
            .map(|id| Determining {
                id: id.to_string(),
                name: index
                    .meta(id)
                    .map_or_else(|| id.to_string(), |m| m.name.clone()),
                effect: match index
                    .full()
                    .set
                    .policy(id)
                    .map(cedar_policy::Policy::effect)
                {
                    Some(cedar_policy::Effect::Forbid) => "forbid",
                    _ => "permit",
                },
            })
            .collect();
        determining.sort_by(|a, b| a.name.cmp(&b.name));
        let diagnosis = self.diagnose(
            &snap,
            req,
            host_group,
            &s,
            &groups,
            resp.diagnostics().reason().next().is_none(),
        );
        Ok(Explanation {
            policy_version: snap.policy.version,
            generation: snap.generation,
            mode: *mode,
            decision: match resp.decision() {
                cedar_policy::Decision::Allow => "allow",
                cedar_policy::Decision::Deny => "deny",
            },
            verdict: out.verdict,
            would_deny: out.would_deny,
            determining,
            alerts: out.alerts,
            host_group: diagnosis.host_group,
            roles: diagnosis.roles,
            groups: diagnosis.groups,
            missing: if resp.decision() == cedar_policy::Decision::Deny {
                diagnosis.missing
            } else {
                Vec::new()
            },
            errors: cedar_errors(&snap.policy.index, &resp),
        })
    }

    /// The Cedar request and entities for `req` over `subjects`.
    fn cedar(
        &self,
        req: &QualifyRequest,
        mode: Mode,
        host_group: &str,
        peer: Option<&PeerInfo<'_>>,
        subjects: &Subjects,
    ) -> Result<(Request, Entities), PolicyError> {
        let (principal, program) = (&subjects.principal, &subjects.program);
        let n = &self.names;
        let cedar = |why: String| PolicyError::Cedar {
            host: req.host.clone(),
            why,
        };
        let mut ents: Vec<ast::Entity> = Vec::with_capacity(6);
        let mut seen: HashSet<EntityUid> = HashSet::with_capacity(6);
        let (user, roles) = principal
            .split_first()
            .ok_or(PolicyError::Request("no principal".into()))?;
        let (prog, groups) = program
            .split_first()
            .ok_or(PolicyError::Request("no program".into()))?;
        ents.push(core_entity(
            user,
            [("name", ast::Value::from(req.subject.user.as_str()))],
            core_uids(roles),
        ));
        seen.insert(user.clone());
        let host = Names::uid(&n.host, &req.host);
        push_plain(
            &mut ents,
            &mut seen,
            host.clone(),
            [Names::uid(&n.host_group, host_group)],
        );
        push_plain(&mut ents, &mut seen, prog.clone(), groups.iter().cloned());
        let mut peer_uids = None;
        if let Some(p) = peer {
            let ph = Names::uid(&n.host, p.host);
            push_plain(
                &mut ents,
                &mut seen,
                ph.clone(),
                [Names::uid(&n.host_group, p.group)],
            );
            let pp = Names::uid(&n.program, p.program);
            push_plain(
                &mut ents,
                &mut seen,
                pp.clone(),
                p.groups.iter().map(|g| Names::uid(&n.program_group, g)),
            );
            peer_uids = Some((ph, pp));
        }

        let (time, hour, weekday) = clock(req.at_ms);
        let mut ctx: Vec<(String, RestrictedExpression)> = vec![
            ("host".into(), RestrictedExpression::new_entity_uid(host)),
            ("time".into(), RestrictedExpression::new_long(time)),
            ("hour".into(), RestrictedExpression::new_long(hour)),
            ("weekday".into(), RestrictedExpression::new_long(weekday)),
            (
                "session".into(),
                RestrictedExpression::new_long(i64::from(req.subject.session)),
            ),
            (
                "ancestry".into(),
                RestrictedExpression::new_set(
                    req.subject
                        .ancestry
                        .iter()
                        .map(|a| RestrictedExpression::new_string(a.clone())),
                ),
            ),
            (
                "mode".into(),
                RestrictedExpression::new_string(mode.as_str().to_owned()),
            ),
        ];
        if let Target::Exec { loader_direct } = req.target {
            ctx.push((
                "loader_direct".into(),
                RestrictedExpression::new_bool(loader_direct),
            ));
        }
        let resource = match (&req.target, subjects.resource.split_first()) {
            (
                Target::File {
                    path,
                    to,
                    create,
                    truncate,
                    link,
                },
                Some((file, sets)),
            ) => {
                push_file(&mut ents, &mut seen, file, path, sets);
                if let (Some(to), Some((to_file, to_sets))) = (to, subjects.to.split_first()) {
                    push_file(&mut ents, &mut seen, to_file, to, to_sets);
                    ctx.push((
                        "to".into(),
                        RestrictedExpression::new_entity_uid(to_file.clone()),
                    ));
                }
                for (k, v) in [("create", create), ("truncate", truncate), ("link", link)] {
                    ctx.push((k.into(), RestrictedExpression::new_bool(*v)));
                }
                ctx.push((
                    "program".into(),
                    RestrictedExpression::new_entity_uid(prog.clone()),
                ));
                file.clone()
            }
            (Target::Net(t), Some((svc, _))) => {
                if seen.insert(svc.clone()) {
                    ents.push(core_entity(
                        svc,
                        [
                            ("host", ast::Value::from(t.dst_addr.as_str())),
                            ("port", ast::Value::from(i64::from(t.dst_port))),
                            ("proto", ast::Value::from(t.proto.as_str())),
                        ],
                        [],
                    ));
                }
                ctx.push((
                    "program".into(),
                    RestrictedExpression::new_entity_uid(prog.clone()),
                ));
                if let Some((ph, pp)) = peer_uids {
                    ctx.push(("peer_host".into(), RestrictedExpression::new_entity_uid(ph)));
                    ctx.push((
                        "peer_program".into(),
                        RestrictedExpression::new_entity_uid(pp),
                    ));
                }
                ctx.push((
                    "src_addr".into(),
                    RestrictedExpression::new_string(t.src_addr.clone()),
                ));
                ctx.push((
                    "src_port".into(),
                    RestrictedExpression::new_long(i64::from(t.src_port)),
                ));
                ctx.push((
                    "dst_addr".into(),
                    RestrictedExpression::new_string(t.dst_addr.clone()),
                ));
                ctx.push((
                    "dst_port".into(),
                    RestrictedExpression::new_long(i64::from(t.dst_port)),
                ));
                svc.clone()
            }
            _ => prog.clone(),
        };
        let context = Context::from_pairs(ctx).map_err(|e| cedar(e.to_string()))?;
        let request = Request::new(user.clone(), n.action(req.action)?, resource, context, None)
            .map_err(|e| cedar(e.to_string()))?;
        let entities = entities(ents).map_err(cedar)?;
        Ok((request, entities))
    }
}

/// Cedar's evaluation errors, `<policy name>: <error>`, sorted.
fn cedar_errors(index: &Index, resp: &cedar_policy::Response) -> Vec<String> {
    let mut errors: Vec<String> = resp
        .diagnostics()
        .errors()
        .map(|e| {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(pe) = e;
            let id = pe.policy_id();
            let name = index
                .meta(id)
                .map_or_else(|| id.to_string(), |m| m.name.clone());
            format!("{name}: {}", pe.inner())
        })
        .collect();
    errors.sort_unstable();
    errors
}

/// The audit event for one decision: kind `decision`, actor the asking
/// host, detail `{ "request": <QualifyRequest>, "outcome": <Outcome>,
/// "generation", "cacheable", "cache_hit", "groups" }`. The replay tool
/// reads `request` back as a [`QualifyRequest`].
pub fn decision_event(req: &QualifyRequest, d: &Decision) -> AuditEvent {
    /// The detail, borrowed: serialised straight to text, in this order.
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        request: &'a QualifyRequest,
        outcome: &'a Outcome,
        generation: i64,
        cacheable: bool,
        cache_hit: bool,
        groups: &'a [String],
    }
    AuditEvent::serialized(
        "decision",
        &req.host,
        &Detail {
            request: req,
            outcome: &d.outcome,
            generation: d.generation,
            cacheable: d.cacheable,
            cache_hit: d.cache_hit,
            groups: &d.groups,
        },
    )
}

/// The audit event for a pair decision: kind `decision.pair`, actor the
/// connecting host, detail `{ "connect": …, "accept": …, "outcome": …,
/// "generation", "groups" }`.
pub fn pair_event(connect: &QualifyRequest, accept: &QualifyRequest, d: &Decision) -> AuditEvent {
    /// The detail, borrowed: serialised straight to text, in this order.
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        connect: &'a QualifyRequest,
        accept: &'a QualifyRequest,
        outcome: &'a Outcome,
        generation: i64,
        groups: &'a [String],
    }
    AuditEvent::serialized(
        "decision.pair",
        &connect.host,
        &Detail {
            connect,
            accept,
            outcome: &d.outcome,
            generation: d.generation,
            groups: &d.groups,
        },
    )
}

/// A Cedar entity (core form) with `attrs` and `parents`, its ancestors
/// being its parents (see [`entities`]).
fn core_entity<const N: usize>(
    uid: &EntityUid,
    attrs: [(&str, ast::Value); N],
    parents: impl IntoIterator<Item = ast::EntityUID>,
) -> ast::Entity {
    ast::Entity::new_with_attr_partial_value(
        uid.as_ref().clone(),
        attrs.map(|(k, v)| (k.into(), v.into())),
        HashSet::new(),
        parents.into_iter().collect(),
        [],
    )
}

/// The core form of `uids`.
fn core_uids(uids: &[EntityUid]) -> impl Iterator<Item = ast::EntityUID> + '_ {
    uids.iter().map(|u| u.as_ref().clone())
}

/// Whether the ancestors `ents` name are transitively closed already:
/// no entity names as a parent one that has parents itself (or itself).
/// The request path's hierarchies are one level deep (user → roles, host
/// → host group, program → groups, file → file sets; a group, role or
/// set entity has no parents), so each entity's parents are all its
/// ancestors and Cedar's transitive closure would add nothing.
fn closed(ents: &[ast::Entity]) -> bool {
    let children: Vec<&ast::EntityUID> = ents
        .iter()
        .filter(|e| e.ancestors().next().is_some())
        .map(ast::Entity::uid)
        .collect();
    ents.iter()
        .all(|e| e.ancestors().all(|a| !children.contains(&a)))
}

/// Cedar's entity store for a request's entities. When their hierarchy is
/// closed ([`closed`], always on the request path) Cedar is told so
/// (`TCComputation::AssumeAlreadyComputed`, only in `cedar-policy-core`)
/// instead of recomputing the closure for every decision (its SCC-based
/// `compute_tc` was ≈ 22 % of a cold decision); otherwise Cedar computes
/// it. Debug builds check the store equals the one Cedar's public
/// `Entities::from_entities` builds.
fn entities(ents: Vec<ast::Entity>) -> Result<Entities, String> {
    if !closed(&ents) {
        return Entities::from_entities(ents.into_iter().map(Entity::from), None)
            .map_err(|e| e.to_string());
    }
    #[cfg(debug_assertions)]
    let check = ents.clone();
    let fast = cedar_policy_core::entities::Entities::from_entities(
        ents,
        None::<&cedar_policy_core::entities::NoEntitiesSchema>,
        cedar_policy_core::entities::TCComputation::AssumeAlreadyComputed,
        cedar_policy_core::extensions::Extensions::all_available(),
    )
    .map(Entities::from)
    .map_err(|e| e.to_string())?;
    #[cfg(debug_assertions)]
    {
        let cedar = Entities::from_entities(check.into_iter().map(Entity::from), None)
            .map_err(|e| e.to_string())?;
        assert_eq!(fast, cedar, "entities built without the closure differ");
    }
    Ok(fast)
}

/// Adds a `File` entity (`path`, in `sets`) and its sets, unless there.
fn push_file(
    ents: &mut Vec<ast::Entity>,
    seen: &mut HashSet<EntityUid>,
    file: &EntityUid,
    path: &str,
    sets: &[EntityUid],
) {
    if seen.insert(file.clone()) {
        ents.push(core_entity(
            file,
            [("path", ast::Value::from(path))],
            core_uids(sets),
        ));
    }
    for s in sets {
        push_plain(ents, seen, s.clone(), []);
    }
}

/// Adds an attribute-less entity unless one with this uid is already there.
fn push_plain(
    ents: &mut Vec<ast::Entity>,
    seen: &mut HashSet<EntityUid>,
    uid: EntityUid,
    parents: impl IntoIterator<Item = EntityUid>,
) {
    if seen.insert(uid.clone()) {
        ents.push(core_entity(
            &uid,
            [],
            parents.into_iter().map(ast::EntityUID::from),
        ));
    }
}

impl Snapshot {
    fn new(data: EngineData, policy: Arc<Compiled>, cache_capacity: usize) -> Self {
        Snapshot {
            versions: data.versions,
            generation: data.generation,
            policy,
            hosts: Arc::new(data.hosts),
            users: Arc::new(data.users),
            file_sets: Arc::new(FileSets::new(&data.file_sets)),
            programs: ProgramGroups::new(),
            cache: ClockCache::new(cache_capacity),
        }
    }
}

/// The diagnosis of a pair: the side(s) Cedar denied, each line prefixed
/// with the side (`connect:`, `accept:`); the entity data is the denying
/// side's (the connecting side's when both denied).
fn merge_diagnoses(a: Option<Arc<Diagnosis>>, b: Option<Arc<Diagnosis>>) -> Option<Arc<Diagnosis>> {
    let side = |d: &Diagnosis, name: &str| {
        let mut d = d.clone();
        for l in d.missing.iter_mut().chain(d.errors.iter_mut()) {
            *l = format!("{name}: {l}");
        }
        d
    };
    match (a, b) {
        (None, None) => None,
        (Some(a), None) => Some(Arc::new(side(&a, "connect"))),
        (None, Some(b)) => Some(Arc::new(side(&b, "accept"))),
        (Some(a), Some(b)) => {
            let mut m = side(&a, "connect");
            let b = side(&b, "accept");
            m.missing.extend(b.missing);
            m.errors.extend(b.errors);
            Some(Arc::new(m))
        }
    }
}

/// Combines the two sides of a pair decision.
fn merge(a: Decision, b: Decision) -> Decision {
    let obligations = |v: &Verdict| match v {
        Verdict::AllowWithConditions { obligations } => Some(obligations.clone()),
        Verdict::Allow => Some(Default::default()),
        Verdict::Deny => None,
    };
    let verdict = match (
        obligations(&a.outcome.verdict),
        obligations(&b.outcome.verdict),
    ) {
        (Some(mut oa), Some(ob)) => {
            for (k, v) in ob {
                oa.entry(k).or_insert(v);
            }
            if oa.is_empty() {
                Verdict::Allow
            } else {
                Verdict::AllowWithConditions { obligations: oa }
            }
        }
        _ => Verdict::Deny,
    };
    let mut reasons = a.outcome.reasons;
    for r in b.outcome.reasons {
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    let mut groups = a.groups;
    for g in b.groups {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let mut alerts = a.outcome.alerts;
    alerts.extend(b.outcome.alerts);
    alerts.sort_unstable();
    alerts.dedup();
    let explain = merge_diagnoses(a.outcome.explain, b.outcome.explain);
    Decision {
        outcome: Outcome {
            verdict,
            reasons,
            would_deny: a.outcome.would_deny || b.outcome.would_deny,
            errors: a.outcome.errors.saturating_add(b.outcome.errors),
            alerts,
            explain,
        },
        generation: a.generation,
        cacheable: a.cacheable && b.cacheable,
        cache_hit: a.cache_hit && b.cache_hit,
        groups,
        mode: a.mode,
    }
}

#[cfg(test)]
mod tests {
    use super::{ast, clock, closed, core_entity, core_uids, entities};
    use cedar_policy::{Entities, Entity, EntityId, EntityTypeName, EntityUid};
    use std::str::FromStr;

    fn uid(ty: &str, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(
            EntityTypeName::from_str(&format!("Trustbind::{ty}")).unwrap(),
            EntityId::new(id),
        )
    }

    /// The store handed to Cedar equals the one Cedar builds computing the
    /// closure itself: skipped for a request's flat hierarchy, computed
    /// when an entity's parent has parents (never on the request path).
    #[test]
    fn entities_skip_the_closure_only_when_it_is_closed() {
        let (u, a, b) = (uid("User", "u"), uid("Role", "a"), uid("Role", "b"));
        let (p, g) = (uid("Program", "p"), uid("ProgramGroup", "g"));
        let user = |parents: &[EntityUid]| {
            core_entity(&u, [("name", ast::Value::from("u"))], core_uids(parents))
        };
        let flat = vec![
            user(&[a.clone(), b.clone()]),
            core_entity(&p, [], core_uids(std::slice::from_ref(&g))),
            core_entity(&g, [], []),
        ];
        // u in a, a in b: u is in b too.
        let deep = vec![
            user(std::slice::from_ref(&a)),
            core_entity(&a, [], core_uids(std::slice::from_ref(&b))),
            core_entity(&b, [], []),
        ];
        let cyclic = vec![core_entity(&a, [], core_uids(std::slice::from_ref(&a)))];
        assert!(closed(&flat));
        assert!(!closed(&deep));
        assert!(!closed(&cyclic));
        for ents in [flat, deep] {
            let want =
                Entities::from_entities(ents.iter().cloned().map(Entity::from), None).unwrap();
            let got = entities(ents).unwrap();
            assert_eq!(got, want);
            assert!(got.is_ancestor_of(&b, &u));
        }
        assert!(entities(cyclic).is_err());
    }

    #[test]
    fn clock_is_utc_with_monday_zero() {
        // 1970-01-01T00:00:00Z was a Thursday.
        assert_eq!(clock(0), (0, 0, 3));
        // 2024-01-01T09:30:00Z was a Monday.
        assert_eq!(clock(1_704_101_400_000), (1_704_101_400, 9, 0));
        // One millisecond before the epoch: Wednesday 23h.
        assert_eq!(clock(-1), (-1, 23, 2));
    }
}
