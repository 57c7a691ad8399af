//! The decision cache keyed by equivalence class gives exactly what Cedar
//! gives: random requests (and pairs) over a policy set that reads
//! identities, memberships, the clock, the session, the ancestry, ports,
//! attributes and peers, decided by an engine with the class cache, one
//! with the exact-request cache and one with no cache, must get the same
//! decisions (verdict, reasons, obligations, alerts, explanation, groups,
//! cacheability), apart from the `cache_hit` flag.
//!
//! The same holds for slices decided without Cedar (`crate::compiled`):
//! an engine deciding them so must answer as one sending every request to
//! Cedar, over the set above and over random subsets of it with random
//! effects (forbids, default denies, slices partly compiled).

use std::sync::Arc;

use trustbind_appliance::policy::engine::{Decision, Engine, EngineOptions};
use trustbind_appliance::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};
use trustbind_appliance::store::{Mode, Signature, Store};

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
/// Monday 2024-01-01 00:00 UTC.
const MONDAY: i64 = 1_704_067_200_000;

fn sha(n: u64) -> String {
    format!("{n:064x}")
}

const HOSTS: u64 = 6;
const PROGRAMS: u64 = 9;
const USERS: u64 = 8;

/// Programs 1..=8: 1, 2 in ga; 3, 4 in gb; 5 in gb and gc; 6 in gc; 7 in
/// ga and gc; 8 in none (known, ungrouped); 9 unknown.
fn groups_of(p: u64) -> &'static [&'static str] {
    match p {
        1 | 2 => &["ga"],
        3 | 4 => &["gb"],
        5 => &["gb", "gc"],
        6 => &["gc"],
        7 => &["ga", "gc"],
        _ => &[],
    }
}

/// Users u0..u7: roles by bit (ops, dev, contractor), u7 unknown to the store.
fn roles_of(u: u64) -> Vec<&'static str> {
    let mut r = Vec::new();
    for (bit, role) in [(1, "ops"), (2, "dev"), (4, "contractor")] {
        if u & bit != 0 {
            r.push(role);
        }
    }
    r
}

fn policies() -> String {
    let p5 = sha(5);
    let p7 = sha(7);
    format!(
        r#"@id("exec-ga")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"ga");
@id("exec-gb-ops-office") @nice("5")
permit (principal in Trustbind::Role::"ops", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"gb")
when {{ context.hour >= 8 && context.hour < 18 }};
@id("gb-not-on-hg1") @alert("gb-hg1")
forbid (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"gb")
when {{ context.host in Trustbind::HostGroup::"hg1" && context.session == 0 }};
@id("u1-gc")
permit (principal == Trustbind::User::"u1", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"gc");
@id("pinned-p5") @log_level("debug")
permit (principal, action == Trustbind::Action::"exec", resource == Trustbind::Program::"{p5}")
when {{ context.session > 0 }};
@id("bad-parent")
forbid (principal, action == Trustbind::Action::"exec", resource)
when {{ context.ancestry.contains("{p7}") }};
@id("contractor-weekend")
forbid (principal in Trustbind::Role::"contractor", action == Trustbind::Action::"exec", resource)
when {{ 5 <= context.weekday }};
@id("h3-gc")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"gc")
when {{ context.host == Trustbind::Host::"h3" }};
@id("gc-overflow")
permit (principal in Trustbind::Role::"dev", action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"gc")
when {{ context.session + 9223372036854775807 > 0 }};
@id("srv-read")
permit (principal, action == Trustbind::Action::"open_read", resource)
when {{ context.program in Trustbind::ProgramGroup::"ga" && resource.path like "/srv/*" }};
@id("dev-read-late")
forbid (principal in Trustbind::Role::"dev", action == Trustbind::Action::"open_read", resource)
when {{ context.time > 1704100000 }};
@id("name-write")
permit (principal, action == Trustbind::Action::"open_write", resource)
when {{ principal.name like "u*" && context.program in Trustbind::ProgramGroup::"gc" }};
@id("gb-https") @encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when {{ context.program in Trustbind::ProgramGroup::"gb" && resource.port == 443 }};
@id("ga-high-port")
permit (principal, action == Trustbind::Action::"connect", resource)
when {{ context.program in Trustbind::ProgramGroup::"ga" && context.src_port > 1024 }};
@id("ga-from-src")
forbid (principal in Trustbind::Role::"ops", action == Trustbind::Action::"connect", resource)
when {{ context.src_addr == "10.0.0.66" }};
@id("accept-from-ga") @encrypt("offload")
permit (principal, action == Trustbind::Action::"accept", resource)
when {{ context.program in Trustbind::ProgramGroup::"gc" && context has peer_program && context.peer_program in Trustbind::ProgramGroup::"ga" }};
@id("accept-from-lab")
permit (principal, action == Trustbind::Action::"accept", resource)
when {{ context has peer_host && context.peer_host in Trustbind::HostGroup::"hg2" }};
@id("ipc-same")
permit (principal, action == Trustbind::Action::"ipc_connect", resource)
when {{ context has peer_program && context.peer_program == context.program }};
@id("ipc-gb")
permit (principal, action == Trustbind::Action::"ipc_connect", resource)
when {{ context has peer_program && context.peer_program in Trustbind::ProgramGroup::"gb" && context.dst_port != 0 }};
"#
    )
}

fn setup(dir: &std::path::Path) -> Arc<Store> {
    setup_with(dir, &policies())
}

fn setup_with(dir: &std::path::Path, policies: &str) -> Arc<Store> {
    let store = Arc::new(Store::open(&dir.join("appliance.db")).unwrap());
    for (g, m) in [
        ("hg0", Mode::Enforce),
        ("hg1", Mode::Enforce),
        ("hg2", Mode::Permissive),
    ] {
        store.set_host_group(g, m, "admin:t").unwrap();
    }
    for h in 0..HOSTS {
        store
            .add_pending_host(
                &format!("h{h}"),
                &format!("hg{}", h % 3),
                &sha(0xa),
                "admin:t",
            )
            .unwrap();
    }
    for g in ["ga", "gb", "gc"] {
        store.create_group(g, "", "admin:t").unwrap();
    }
    for p in 1..PROGRAMS {
        store
            .put_signature(
                &Signature {
                    sha256: sha(p),
                    sha1: None,
                    size: 1,
                    name: format!("p{p}"),
                    source: "admin".into(),
                },
                "admin:t",
            )
            .unwrap();
        for g in groups_of(p) {
            store.add_member(g, &sha(p), "admin:t").unwrap();
        }
    }
    for u in 0..USERS - 1 {
        store
            .set_user_roles(&format!("u{u}"), &roles_of(u), "admin:t")
            .unwrap();
    }
    let id = store.create_policy_draft(policies, "", "admin:t").unwrap();
    store.activate_policy(id, "admin:t").unwrap();
    store
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn program(n: u64) -> Program {
    Program {
        sha256: sha(n),
        sha1: "0".repeat(40),
        size: 1,
        path: format!("/usr/bin/p{n}"),
    }
}

fn request(r: &mut Rng) -> QualifyRequest {
    let action = [
        Action::Exec,
        Action::Exec,
        Action::Exec,
        Action::OpenRead,
        Action::OpenWrite,
        Action::Connect,
        Action::Accept,
        Action::IpcConnect,
    ][usize::try_from(r.below(8)).unwrap()];
    let net = |r: &mut Rng| {
        Target::Net(FiveTuple {
            proto: Proto::Tcp,
            src_addr: ["10.0.0.1", "10.0.0.66"][usize::try_from(r.below(2)).unwrap()].into(),
            src_port: [0, 1024, 1025, 40000][usize::try_from(r.below(4)).unwrap()],
            dst_addr: "10.0.0.2".into(),
            dst_port: [0, 443, 8080][usize::try_from(r.below(3)).unwrap()],
            established: false,
        })
    };
    let target = match action {
        Action::Exec => Target::Exec {
            loader_direct: r.below(10) == 0,
        },
        Action::OpenRead | Action::OpenWrite => Target::file(
            ["/srv/a", "/srv/b", "/etc/passwd"][usize::try_from(r.below(3)).unwrap()],
            None,
        ),
        _ => net(r),
    };
    let ancestry = (0..r.below(3))
        .map(|_| sha(1 + r.below(PROGRAMS)))
        .collect();
    QualifyRequest {
        host: format!("h{}", r.below(HOSTS)),
        action,
        subject: Subject {
            user: format!("u{}", r.below(USERS)),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: u32::try_from(r.below(3)).unwrap(),
            pid: u32::try_from(r.below(100_000)).unwrap(),
            ancestry,
        },
        program: program(1 + r.below(PROGRAMS)),
        target,
        // Any time in one week, to the second.
        at_ms: MONDAY + i64::try_from(r.below(7 * 24 * 3600) * 1000).unwrap(),
        peer: (action == Action::IpcConnect && r.below(4) != 0)
            .then(|| program(1 + r.below(PROGRAMS))),
    }
}

fn same(a: &Decision, b: &Decision) -> bool {
    let mut a = a.clone();
    a.cache_hit = b.cache_hit;
    a == *b
}

fn engine(store: &Arc<Store>, cache_capacity: usize, class_cache: bool) -> Engine {
    Engine::with_options(
        store.clone(),
        SCHEMA,
        EngineOptions {
            slicing: true,
            cache_capacity,
            class_cache,
            compiled: true,
        },
    )
    .unwrap()
}

/// Uncached, every request decided by Cedar: the reference.
fn cedar(store: &Arc<Store>) -> Engine {
    Engine::with_options(
        store.clone(),
        SCHEMA,
        EngineOptions {
            slicing: true,
            cache_capacity: 0,
            class_cache: false,
            compiled: false,
        },
    )
    .unwrap()
}

#[test]
fn class_cache_answers_as_cedar_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let class = engine(&store, 1 << 16, true);
    let exact = engine(&store, 1 << 16, false);
    let cedar = cedar(&store);
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut denies = 0;
    for i in 0..6000 {
        let q = request(&mut r);
        let want = cedar.decide(&q).unwrap();
        assert!(!want.cache_hit);
        let got = class.decide(&q).unwrap();
        assert!(
            same(&got, &want),
            "request {i} {q:#?}\nclass cache: {got:#?}\ncedar: {want:#?}"
        );
        let got = exact.decide(&q).unwrap();
        assert!(
            same(&got, &want),
            "request {i} {q:#?}\nexact cache: {got:#?}\ncedar: {want:#?}"
        );
        denies += usize::from(want.outcome.explain.is_some());
    }
    let (c, e) = (class.cache_stats(), exact.cache_stats());
    println!("class cache {c:?}, exact cache {e:?}, {denies} denies");
    // The classes are coarser than the requests: more hits (a decision is
    // kept under the request too, so a repeat costs one lookup: more
    // entries, not fewer).
    assert!(c.hits > e.hits, "class {c:?} exact {e:?}");
    assert!(c.hits > 1000, "{c:?}");
    assert!(denies > 100, "{denies}");
}

#[test]
fn class_cache_answers_pairs_as_cedar_does() {
    let dir = tempfile::tempdir().unwrap();
    let store = setup(dir.path());
    let class = engine(&store, 1 << 16, true);
    let cedar = cedar(&store);
    let mut r = Rng(0x2545_f491_4f6c_dd1d);
    let net = |r: &mut Rng, action| {
        let mut q = request(r);
        while !matches!(q.target, Target::Net(_)) {
            q = request(r);
        }
        q.action = action;
        q.peer = None;
        q
    };
    for i in 0..1500 {
        let c = net(&mut r, Action::Connect);
        let a = net(&mut r, Action::Accept);
        let want = cedar.decide_pair(&c, &a).unwrap();
        let got = class.decide_pair(&c, &a).unwrap();
        assert!(
            same(&got, &want),
            "pair {i} {c:#?} {a:#?}\nclass cache: {got:#?}\ncedar: {want:#?}"
        );
    }
    assert!(class.cache_stats().hits > 300, "{:?}", class.cache_stats());
}

/// The policies of [`policies`], one text each.
fn each_policy() -> Vec<String> {
    let all = policies();
    let mut out: Vec<String> = all
        .split("\n@id(")
        .map(|p| {
            if p.starts_with("@id(") {
                p.to_owned()
            } else {
                format!("@id({p}")
            }
        })
        .collect();
    out.retain(|p| p.contains("permit") || p.contains("forbid"));
    out
}

/// Random subsets of the set, each policy's effect flipped at random, and
/// a few policies for other subsets: decided without Cedar where every
/// policy of a slice compiled, they must get Cedar's decisions.
#[test]
fn compiled_slices_answer_as_cedar_does() {
    let mut each = each_policy();
    assert_eq!(each.len(), policies().matches("\n@id(").count() + 1);
    // Forms the set above lacks: a path compared, an action list.
    each.push(
        r#"@id("ga-write-b")
permit (principal, action == Trustbind::Action::"open_write", resource)
when { context.program in Trustbind::ProgramGroup::"ga" && "/srv/b" == resource.path };"#
            .into(),
    );
    each.push(
        r#"@id("dev-etc") @alert("etc")
forbid (principal in Trustbind::Role::"dev", action in [Trustbind::Action::"open_read", Trustbind::Action::"open_write"], resource)
when { resource.path like "/etc/*" && context.hour < 20 };"#
            .into(),
    );
    let mut r = Rng(0x0123_4567_89ab_cdef);
    let mut fast = 0;
    let mut total = 0;
    for set in 0..24 {
        let mut text = String::new();
        for p in &each {
            match r.below(4) {
                0 => {}
                1 => {
                    text += &if p.contains("\npermit (") {
                        p.replacen("\npermit (", "\nforbid (", 1)
                    } else {
                        p.replacen("\nforbid (", "\npermit (", 1)
                    };
                }
                _ => text += p,
            }
            text.push('\n');
        }
        if set == 0 {
            text = policies();
        }
        let dir = tempfile::tempdir().unwrap();
        let store = setup_with(dir.path(), &text);
        let compiled = engine(&store, 0, false);
        let reference = cedar(&store);
        for i in 0..500 {
            let q = request(&mut r);
            let want = reference.decide(&q).unwrap();
            let got = compiled.decide(&q).unwrap();
            assert!(
                same(&got, &want),
                "set {set} request {i} {q:#?}\npolicies:\n{text}\ncompiled: {got:#?}\ncedar: {want:#?}"
            );
        }
        for i in 0..60 {
            let mut net = |action| loop {
                let mut q = request(&mut r);
                if matches!(q.target, Target::Net(_)) {
                    q.action = action;
                    q.peer = None;
                    break q;
                }
            };
            let (c, a) = (net(Action::Connect), net(Action::Accept));
            let want = reference.decide_pair(&c, &a).unwrap();
            let got = compiled.decide_pair(&c, &a).unwrap();
            assert!(
                same(&got, &want),
                "set {set} pair {i} {c:#?} {a:#?}\npolicies:\n{text}\ncompiled: {got:#?}\ncedar: {want:#?}"
            );
        }
        let st = compiled.cache_stats();
        fast += st.compiled;
        total += st.misses;
        assert_eq!(reference.cache_stats().compiled, 0);
    }
    println!("{fast} of {total} decisions made without Cedar");
    assert!(fast > total / 4, "{fast} of {total}");
    assert!(fast < total, "{fast} of {total}");
}
