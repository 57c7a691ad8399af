//! Decision throughput and latency of the policy engine.
//!
//! `cargo bench -p trustbind-appliance --bench decisions`
//!
//! 10 000 rules over 1 000 program groups (10 per group: exec, role and
//! office-hours, host-group forbid, user file access, connect/accept pairs,
//! weekend forbid, …, plus shared rules), 2 000 known programs, 1 000
//! users in 21 roles, 50 hosts in 10 host groups. Two worker threads decide
//! a fixed pool of 20 000 distinct requests (70 % exec, 15 % open_read,
//! 10 % connect, 5 % open_write; 5 % unknown programs), each thread from a
//! different offset, and record every decision's latency.
//!
//! Runs: sliced with the cache off (cold), sliced with the cache on after
//! one warm-up pass (warm), and unsliced with the cache off on the same
//! data (fewer decisions: it is slow), giving the sliced/unsliced ratio.
//! `TB_BENCH_RUNS=unseen`: a stream of requests drawn like the pool's but
//! never repeated, through a fresh engine with the exact-request cache and
//! one with the class cache (`EngineOptions::class_cache`).
//! `TB_BENCH_RUNS=audit`: the cold run with every decision's audit row
//! (`decision_event`, as the agent API builds it) appended to the store's
//! chain by a writer thread in batches of up to 1 024 (what
//! `AuditWriter` does), its CPU time counted with the workers'.
//! `TB_BENCH_RUNS=writer`: the audit writer alone, appending decision
//! events made beforehand in batches of 1 024 on one thread.
//! `TB_BENCH_SCALE=0.1` shortens the runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trustbind_appliance::policy::engine::{decision_event, Engine, EngineOptions};
use trustbind_appliance::request::{
    Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target,
};
use trustbind_appliance::store::Store;

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");
const GROUPS: u64 = 1000;
const PROGS_PER_GROUP: u64 = 2;
const USERS: u64 = 1000;
const HOSTS: u64 = 50;
const HOST_GROUPS: u64 = 10;
const POOL: usize = 20_000;
const THREADS: usize = 2;
/// Monday 2024-01-01 00:00 UTC.
const MONDAY: i64 = 1_704_067_200_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn prog_sha(n: u64) -> String {
    format!("{n:064x}")
}

fn program_of(g: u64, k: u64) -> u64 {
    g * PROGS_PER_GROUP + k + 1
}

fn rules() -> String {
    let mut s = String::with_capacity(4 << 20);
    let pg = |g: u64| format!("Trustbind::ProgramGroup::\"g{g}\"");
    for g in 0..GROUPS {
        let next = (g + 1) % GROUPS;
        s += &format!(
            r#"@id("g{g}-exec")
permit (principal, action == Trustbind::Action::"exec", resource in {r});
@id("g{g}-ops-office") @nice("5")
permit (principal in Trustbind::Role::"ops{o}", action == Trustbind::Action::"exec", resource in {r})
when {{ context.hour >= 8 && context.hour < 18 }};
@id("g{g}-not-on-hg")
forbid (principal, action == Trustbind::Action::"exec", resource in {r})
when {{ context.host in Trustbind::HostGroup::"hg{h}" && context.session == 0 }};
@id("g{g}-user-files")
permit (principal == Trustbind::User::"u{g}", action == Trustbind::Action::"open_read", resource)
when {{ context.program in {r} && resource.path like "/srv/g{g}/*" }};
@id("g{g}-connect") @encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when {{ context.program in {r} && resource.port == {port} }};
@id("g{g}-accept") @encrypt("required")
permit (principal, action == Trustbind::Action::"accept", resource)
when {{ context.program in {r} && context has peer_program && context.peer_program in {rn} }};
@id("g{g}-contractor-weekend")
forbid (principal in Trustbind::Role::"contractor", action == Trustbind::Action::"exec", resource in {r})
when {{ context.weekday >= 5 }};
@id("g{g}-logs")
permit (principal, action == Trustbind::Action::"open_write", resource)
when {{ context.program in {r} && resource.path == "/var/log/g{g}.log" }};
@id("g{g}-pinned") @log_level("debug")
permit (principal, action == Trustbind::Action::"exec", resource == Trustbind::Program::"{p0}")
when {{ context.session > 0 }};
@id("g{g}-no-etc-delete")
forbid (principal, action == Trustbind::Action::"delete", resource)
when {{ context.program in {r} && resource.path like "/etc/*" }};
"#,
            r = pg(g),
            rn = pg(next),
            o = g % 20,
            h = g % HOST_GROUPS,
            port = 1000 + g,
            p0 = prog_sha(program_of(g, 0)),
        );
    }
    s += r#"@id("no-exec-from-bad-shell")
forbid (principal, action == Trustbind::Action::"exec", resource)
when { context.ancestry.contains("badbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadbadb") };
@id("etc-read")
permit (principal, action == Trustbind::Action::"open_read", resource)
when { resource.path like "/etc/*" };
"#;
    s
}

fn setup(dir: &std::path::Path) -> Arc<Store> {
    let path = dir.join("appliance.db");
    drop(Store::open(&path).expect("open store"));
    // Bulk load in one unsynchronised transaction (setup only; the store
    // API commits and audits each change, ~3 ms apiece on this disk).
    let mut c = rusqlite::Connection::open(&path).expect("raw open");
    c.pragma_update(None, "synchronous", "OFF").expect("pragma");
    let tx = c.transaction().expect("tx");
    for h in 0..HOST_GROUPS {
        tx.execute(
            "INSERT INTO host_groups (name, mode) VALUES (?1, ?2)",
            (
                format!("hg{h}"),
                if h == 9 { "permissive" } else { "enforce" },
            ),
        )
        .expect("host group");
    }
    for h in 0..HOSTS {
        tx.execute(
            "INSERT INTO hosts (name, host_group, state, changed_ms) VALUES (?1, ?2, 'enrolled', 0)",
            (format!("h{h}"), format!("hg{}", h % HOST_GROUPS)),
        )
        .expect("host");
    }
    for g in 0..GROUPS {
        tx.execute(
            "INSERT INTO ref_groups (name) VALUES (?1)",
            [format!("g{g}")],
        )
        .expect("group");
        for k in 0..PROGS_PER_GROUP {
            let sha = prog_sha(program_of(g, k));
            tx.execute(
                "INSERT INTO signatures (sha256, size, name, source, added_ms) VALUES (?1, 1, ?2, 'bench', 0)",
                (&sha, format!("p{g}-{k}")),
            )
            .expect("signature");
            tx.execute(
                "INSERT INTO ref_group_members (group_name, sha256) VALUES (?1, ?2)",
                (format!("g{g}"), &sha),
            )
            .expect("member");
        }
    }
    for u in 0..USERS {
        tx.execute(
            "INSERT INTO users (name, changed_ms) VALUES (?1, 0)",
            [format!("u{u}")],
        )
        .expect("user");
        tx.execute(
            "INSERT INTO user_roles (user_name, role) VALUES (?1, ?2)",
            (format!("u{u}"), format!("ops{}", u % 20)),
        )
        .expect("role");
        if u % 20 == 7 {
            tx.execute(
                "INSERT INTO user_roles (user_name, role) VALUES (?1, 'contractor')",
                [format!("u{u}")],
            )
            .expect("role");
        }
    }
    tx.commit().expect("commit");
    drop(c);
    let store = Arc::new(Store::open(&path).expect("reopen store"));
    let id = store
        .create_policy_draft(&rules(), "bench", "admin:bench")
        .expect("draft");
    store.activate_policy(id, "admin:bench").expect("activate");
    store
}

fn pool() -> Vec<QualifyRequest> {
    requests(0x1234_5678_9abc_def1, POOL)
}

/// `n` requests drawn like the pool's, from `seed`.
fn requests(seed: u64, n: usize) -> Vec<QualifyRequest> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| {
            let g = r.below(GROUPS);
            let prog = if r.below(100) < 5 {
                prog_sha(1_000_000 + r.below(1_000_000))
            } else {
                prog_sha(program_of(g, r.below(PROGS_PER_GROUP)))
            };
            let user = format!("u{}", r.below(USERS));
            let host = format!("h{}", r.below(HOSTS));
            let at_ms = MONDAY + i64::try_from(r.below(7 * 24 * 3600) * 1000).unwrap_or(0);
            let (action, target) = match r.below(100) {
                0..70 => (
                    Action::Exec,
                    Target::Exec {
                        loader_direct: false,
                    },
                ),
                70..85 => (
                    Action::OpenRead,
                    Target::file(format!("/srv/g{g}/f{}", r.below(4)), None),
                ),
                85..95 => (
                    Action::Connect,
                    Target::Net(FiveTuple {
                        proto: Proto::Tcp,
                        src_addr: "10.0.0.1".into(),
                        src_port: 40_000,
                        dst_addr: "10.0.0.2".into(),
                        dst_port: u16::try_from(1000 + g).unwrap_or(0),
                        established: false,
                    }),
                ),
                _ => (
                    Action::OpenWrite,
                    Target::file(format!("/var/log/g{g}.log"), None),
                ),
            };
            QualifyRequest {
                host,
                action,
                subject: Subject {
                    user,
                    uid: 1000,
                    euid: 1000,
                    gid: 1000,
                    loginuid: 1000,
                    session: u32::try_from(r.below(3)).unwrap_or(0),
                    pid: 1,
                    ancestry: vec![prog_sha(program_of(r.below(GROUPS), 0))],
                },
                program: Program {
                    sha256: prog,
                    sha1: "0".repeat(40),
                    size: 1,
                    path: "/usr/bin/x".into(),
                },
                target,
                at_ms,
                peer: None,
            }
        })
        .collect()
}

/// CPU time (user + system) of the calling thread, from
/// `/proc/thread-self/stat` (clock ticks, 100 Hz on Linux).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, i.e. the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// One worker's (action, latency ns) samples, allowed count and CPU time.
type ThreadResult = (Vec<(Action, u64)>, usize, Duration);

struct Run {
    name: &'static str,
    cpu: Duration,
    decisions: usize,
    wall: Duration,
    lat: Vec<u64>,
    by_action: Vec<(Action, Vec<u64>)>,
    allows: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        self.decisions as f64 / self.wall.as_secs_f64()
    }
    /// Decisions per second of CPU time of the worker threads.
    fn per_cpu_s(&self) -> f64 {
        self.decisions as f64 / self.cpu.as_secs_f64().max(0.01)
    }
    fn pct(&self, p: f64) -> f64 {
        pct(&self.lat, p)
    }
}

fn pct(lat: &[u64], p: f64) -> f64 {
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat.get(i).copied().unwrap_or(0) as f64 / 1000.0
}

impl Run {
    fn per_action(&self) -> String {
        self.by_action
            .iter()
            .map(|(a, v)| format!("{} p50 {:.1} µs", a.as_str(), pct(v, 0.5)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn run(
    name: &'static str,
    engine: &Arc<Engine>,
    pool: &[QualifyRequest],
    per_thread: usize,
) -> Run {
    run_audited(name, engine, pool, per_thread, None)
}

/// Most audit events appended in one transaction (`store::writer::MAX_BATCH`).
const AUDIT_BATCH: usize = 1024;

/// [`run`], each decision's audit row appended to `audit`'s chain by a
/// writer thread (its CPU time added to the workers'). A decision's
/// latency is the engine's and building its audit event, not the wait
/// for the commit.
fn run_audited(
    name: &'static str,
    engine: &Arc<Engine>,
    pool: &[QualifyRequest],
    per_thread: usize,
    audit: Option<&Arc<Store>>,
) -> Run {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel(65_536);
    let mut writer_cpu = Duration::ZERO;
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let writer = audit.map(|store| {
            s.spawn(move || {
                let cpu0 = thread_cpu();
                let (mut rows, mut commits) = (0usize, 0usize);
                while let Ok(ev) = rx.recv() {
                    let mut batch = vec![ev];
                    while batch.len() < AUDIT_BATCH {
                        match rx.try_recv() {
                            Ok(ev) => batch.push(ev),
                            Err(_) => break,
                        }
                    }
                    rows += store.append_audit_owned(batch).expect("audit").len();
                    commits += 1;
                }
                (rows, commits, thread_cpu().saturating_sub(cpu0))
            })
        });
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let engine = Arc::clone(engine);
                let tx = audit.map(|_| tx.clone());
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(per_thread);
                    let mut allows = 0;
                    let offset = t * pool.len() / THREADS;
                    let cpu0 = thread_cpu();
                    for i in 0..per_thread {
                        let q = &pool[(offset + i) % pool.len()];
                        let t0 = Instant::now();
                        let d = engine.decide(q).expect("decide");
                        if let Some(tx) = &tx {
                            tx.send(decision_event(q, &d)).expect("audit queue");
                        }
                        lat.push((
                            q.action,
                            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
                        ));
                        if !matches!(
                            d.outcome.verdict,
                            trustbind_appliance::policy::Verdict::Deny
                        ) {
                            allows += 1;
                        }
                    }
                    (lat, allows, thread_cpu().saturating_sub(cpu0))
                })
            })
            .collect();
        drop(tx);
        let results = handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect();
        if let Some(w) = writer {
            let (rows, commits, cpu) = w.join().expect("join writer");
            assert_eq!(rows, per_thread * THREADS, "every decision audited");
            println!(
                "{name}: {rows} audit rows in {commits} commits ({:.0} a commit), \
                 writer thread {:.2} CPU-s ({:.1} µs a row)",
                rows as f64 / commits.max(1) as f64,
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / rows.max(1) as f64
            );
            writer_cpu = cpu;
        }
        results
    });
    let wall = start.elapsed();
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|(l, _, _)| l.iter().map(|x| x.1))
        .collect();
    lat.sort_unstable();
    let by_action = Action::ALL
        .iter()
        .map(|a| {
            let mut v: Vec<u64> = results
                .iter()
                .flat_map(|(l, _, _)| l.iter().filter(|x| x.0 == *a).map(|x| x.1))
                .collect();
            v.sort_unstable();
            (*a, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    Run {
        name,
        decisions: per_thread * THREADS,
        wall,
        lat,
        by_action,
        allows: results.iter().map(|(_, a, _)| a).sum(),
        cpu: results.iter().map(|(_, _, c)| *c).sum::<Duration>() + writer_cpu,
    }
}

fn main() {
    let scale: f64 = std::env::var("TB_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = |x: f64| ((x * scale) as usize).max(100);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let store = setup(dir.path());
    let setup_s = t.elapsed().as_secs_f64();
    let pool = pool();

    let which = std::env::var("TB_BENCH_RUNS")
        .unwrap_or_else(|_| "cold,audit,writer,warm,unseen,unsliced".into());
    let opts = |slicing, cache_capacity| EngineOptions {
        slicing,
        cache_capacity,
        ..EngineOptions::default()
    };
    let load = |o: EngineOptions| {
        let t = Instant::now();
        let e = Arc::new(Engine::with_options(store.clone(), SCHEMA, o).expect("engine"));
        println!(
            "engine load (parse, validate, slice {} slices): {:.2} s",
            e.slices(),
            t.elapsed().as_secs_f64()
        );
        e
    };
    println!("setup {setup_s:.1} s; pool {} requests", pool.len());
    let mut runs = Vec::new();
    if which.contains("cold") {
        let cold = load(opts(true, 0));
        runs.push(run("sliced, cache off (cold)", &cold, &pool, n(200_000.0)));
    }
    if which.contains("audit") {
        let cold = load(opts(true, 0));
        runs.push(run_audited(
            "sliced, cache off (cold), audit rows",
            &cold,
            &pool,
            n(200_000.0),
            Some(&store),
        ));
    }
    if which.contains("writer") {
        // The audit writer alone: the pool's decision events, made
        // beforehand, appended by one thread in batches of AUDIT_BATCH
        // (one transaction and commit each), as fast as it can.
        let cold = load(opts(true, 0));
        let rows = n(200_000.0);
        let events: Vec<_> = pool
            .iter()
            .cycle()
            .take(rows)
            .map(|q| decision_event(q, &cold.decide(q).expect("decide")))
            .collect();
        let bytes: usize = events.iter().map(|e| e.detail.len()).sum();
        let (t, cpu0) = (Instant::now(), thread_cpu());
        let mut commits = Vec::new();
        let mut it = events.into_iter().peekable();
        while it.peek().is_some() {
            let batch: Vec<_> = it.by_ref().take(AUDIT_BATCH).collect();
            let c = Instant::now();
            store.append_audit_owned(batch).expect("audit");
            commits.push(u64::try_from(c.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        let (wall, cpu) = (t.elapsed(), thread_cpu().saturating_sub(cpu0));
        commits.sort_unstable();
        println!(
            "audit writer alone: {rows} rows (detail {:.0} bytes on average) in {} commits: \
             {:.0} rows/s (wall), {:.0} rows per CPU-s, a batch of {AUDIT_BATCH} p50 {:.1} ms, p99 {:.1} ms",
            bytes as f64 / rows as f64,
            commits.len(),
            rows as f64 / wall.as_secs_f64(),
            rows as f64 / cpu.as_secs_f64().max(0.01),
            pct(&commits, 0.5) / 1000.0,
            pct(&commits, 0.99) / 1000.0,
        );
    }
    if which.contains("warm") {
        let warm = load(opts(true, 65_536));
        // One pass over the pool fills the cache.
        let _ = run("warm-up", &warm, &pool, POOL / THREADS);
        let before = warm.cache_stats();
        runs.push(run("sliced, cache on (warm)", &warm, &pool, n(1_000_000.0)));
        let after = warm.cache_stats();
        let hits = after.hits - before.hits;
        let misses = after.misses - before.misses;
        println!(
            "warm cache hit rate {:.1} % ({} entries)",
            100.0 * hits as f64 / (hits + misses).max(1) as f64,
            after.entries
        );
    }
    if which.contains("unseen") {
        // Requests the cache has not seen: a fresh engine, one pass over
        // a stream drawn like the pool (almost every request distinct), so
        // an exact-request cache nearly never hits and the class cache
        // hits when a request's class was seen.
        let stream = requests(0x0ddb_a11c_afe0_f00d, n(200_000.0));
        for (name, class_cache) in [
            ("unseen, exact-request cache", false),
            ("unseen, class cache", true),
        ] {
            let e = load(EngineOptions {
                class_cache,
                ..opts(true, 65_536)
            });
            runs.push(run(name, &e, &stream, stream.len() / THREADS));
            let st = e.cache_stats();
            println!(
                "{name}: hit rate {:.1} % ({} entries)",
                100.0 * st.hits as f64 / (st.hits + st.misses).max(1) as f64,
                st.entries
            );
        }
    }
    if which.contains("unsliced") {
        let whole = load(opts(false, 0));
        runs.push(run("unsliced, cache off", &whole, &pool, n(200.0)));
    }

    println!();
    println!(
        "| run | decisions | decisions/s (wall) | decisions per CPU-s | ×2 cores | p50 µs | p99 µs | allowed |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} % |",
            r.name,
            r.decisions,
            r.rate(),
            r.per_cpu_s(),
            2.0 * r.per_cpu_s(),
            r.pct(0.50),
            r.pct(0.99),
            100.0 * r.allows as f64 / r.decisions as f64
        );
    }
    println!();
    for r in &runs {
        println!("{}: {}", r.name, r.per_action());
    }
    let find = |name: &str| runs.iter().find(|r| r.name.starts_with(name));
    if let (Some(c), Some(u)) = (find("sliced, cache off"), find("unsliced")) {
        println!(
            "sliced/unsliced throughput (cache off): {:.0}x",
            c.rate() / u.rate()
        );
    }
}
