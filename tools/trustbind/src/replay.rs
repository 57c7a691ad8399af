//! `trustbind policy test DRAFT --replay-audit --since 24h`: what-if.
//!
//! Reads the `decision` and `decision.pair` audit rows of the window (their
//! detail holds the full [`QualifyRequest`]s and the recorded outcome),
//! re-decides each against the draft with the appliance's own engine, and
//! lists every decision that would change, grouped, old → new.
//!
//! The appliance has no replay endpoint, so the engine runs here, over an
//! in-memory mirror of what decisions read from the appliance:
//! host groups and their modes, hosts, users and roles, and the reference
//! groups of every program that appears in the replayed requests. Verdicts
//! are therefore those of the draft over *today's* signatures, groups,
//! roles and modes, compared with what was recorded at the time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead as _;
use std::path::Path;
use std::sync::{Arc, Weak};

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use trustbind_policy::engine::Engine;
use trustbind_policy::files::FileSet;
use trustbind_policy::request::{QualifyRequest, Target};
use trustbind_policy::source::{
    EngineData, Mode, PolicyPrep, PolicyState, PolicyVersion, Source, SourceError, Versions,
};
use trustbind_policy::{Outcome, SCHEMA};

use crate::client::Client;
use crate::cmd::enc;
use crate::error::{io_err, CliError, Exit, Result};
use crate::out::{table, Out};
use crate::{time, validate};

/// One recorded decision.
#[derive(Debug)]
enum Recorded {
    One(Box<QualifyRequest>),
    Pair(Box<(QualifyRequest, QualifyRequest)>),
}

#[derive(Debug)]
struct Row {
    seq: i64,
    at_ms: i64,
    req: Recorded,
    /// Recorded `outcome.verdict` and `would_deny`.
    old: (Value, bool),
}

/// A verdict in a few characters: `allow`, `deny`, `allow{encrypt=required}`,
/// with ` (would deny)` in permissive mode.
fn verdict_text(v: &Value, would_deny: bool) -> String {
    let kind = v.get("verdict").and_then(Value::as_str).unwrap_or("?");
    let mut s = match v.get("obligations").and_then(Value::as_object) {
        Some(o) if !o.is_empty() => {
            let parts: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
                .collect();
            format!("allow{{{}}}", parts.join(","))
        }
        _ if kind == "allow_with_conditions" => "allow".to_owned(),
        _ => kind.to_owned(),
    };
    if would_deny {
        s.push_str(" (would deny)");
    }
    s
}

fn target_text(r: &QualifyRequest) -> String {
    match &r.target {
        Target::Exec { .. } => String::new(),
        Target::File { path, to, .. } => match to {
            Some(t) => format!("{path} -> {t}"),
            None => path.clone(),
        },
        Target::Net(t) => format!(
            "{}:{} -> {}:{}/{}",
            t.src_addr,
            t.src_port,
            t.dst_addr,
            t.dst_port,
            t.proto.as_str()
        ),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// Who/what of a row, for grouping and display.
fn what(r: &Recorded) -> (String, String, String, String, String) {
    match r {
        Recorded::One(q) => (
            q.host.clone(),
            q.subject.user.clone(),
            q.action.as_str().to_owned(),
            format!("{} ({})", q.program.path, short(&q.program.sha256)),
            target_text(q),
        ),
        Recorded::Pair(p) => {
            let (c, a) = (&p.0, &p.1);
            (
                format!("{} -> {}", c.host, a.host),
                format!("{} -> {}", c.subject.user, a.subject.user),
                "connect+accept".to_owned(),
                format!(
                    "{} ({}) -> {} ({})",
                    c.program.path,
                    short(&c.program.sha256),
                    a.program.path,
                    short(&a.program.sha256)
                ),
                target_text(c),
            )
        }
    }
}

fn parse_row(line: &str) -> Option<Row> {
    let v: Value = serde_json::from_str(line).ok()?;
    let kind = v.get("kind")?.as_str()?;
    let detail: Value = serde_json::from_str(v.get("detail")?.as_str()?).ok()?;
    let req = match kind {
        "decision" => Recorded::One(serde_json::from_value(detail.get("request")?.clone()).ok()?),
        "decision.pair" => Recorded::Pair(Box::new((
            serde_json::from_value(detail.get("connect")?.clone()).ok()?,
            serde_json::from_value(detail.get("accept")?.clone()).ok()?,
        ))),
        _ => return None,
    };
    let outcome = detail.get("outcome")?;
    Some(Row {
        seq: v.get("seq")?.as_i64()?,
        at_ms: v.get("at_ms")?.as_i64()?,
        req,
        old: (
            outcome.get("verdict")?.clone(),
            outcome
                .get("would_deny")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
    })
}

/// Pages through a listing endpoint whose answer has `key` and `next`.
pub fn list_all(c: &Client, path: &str, key: &str) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = vec![("limit", "1000".to_owned())];
        if let Some(a) = &after {
            q.push(("after", a.clone()));
        }
        let v = c.json(c.request(Method::GET, path).query(&q))?;
        if let Some(a) = v.get(key).and_then(Value::as_array) {
            all.extend(a.iter().cloned());
        }
        match v.get("next").and_then(Value::as_str) {
            Some(n) => after = Some(n.to_owned()),
            None => return Ok(all),
        }
    }
}

fn local(e: impl std::fmt::Display) -> CliError {
    CliError::io(format!("the local replay engine failed: {e}"))
}

/// What decisions read, mirrored from the appliance: the engine's
/// [`Source`], fixed for the replay (its versions never move).
#[derive(Debug)]
struct Mirror {
    data: EngineData,
    /// Program SHA-256 -> its reference groups, sorted.
    groups: HashMap<String, Vec<String>>,
}

impl Source for Mirror {
    fn versions_hint(&self) -> Versions {
        self.data.versions
    }

    fn versions(&self) -> std::result::Result<Versions, SourceError> {
        Ok(self.data.versions)
    }

    fn engine_data(&self) -> std::result::Result<EngineData, SourceError> {
        Ok(self.data.clone())
    }

    fn groups_of_at(&self, sha256: &str) -> std::result::Result<(Vec<String>, i64), SourceError> {
        let groups = self.groups.get(sha256).cloned().unwrap_or_default();
        Ok((groups, self.data.versions.members))
    }

    fn note_answer(&self, _: i64, _: i64, _: &[&str], _: bool) -> bool {
        true
    }

    fn add_policy_prep(&self, _: Weak<dyn PolicyPrep>) {}
}

/// Mirrors what the engine reads from the appliance, with `draft` as the
/// governing policy.
fn mirror(c: &Client, rows: &[Row], draft: &str) -> Result<Mirror> {
    let mut modes = HashMap::new();
    let hg = c.get("/v1/host-groups")?;
    for g in hg
        .get("host_groups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = g.get("name").and_then(Value::as_str).unwrap_or_default();
        let mode: Mode = serde_json::from_value(g.get("mode").cloned().unwrap_or(Value::Null))
            .map_err(|e| {
                CliError::new(
                    Exit::Server,
                    format!("host group `{name}` has an unknown mode: {e}"),
                )
            })?;
        modes.insert(name.to_owned(), mode);
    }
    let mut hosts = HashMap::new();
    for h in list_all(c, "/v1/hosts", "hosts")? {
        let name = h.get("name").and_then(Value::as_str).unwrap_or_default();
        let group = h
            .get("host_group")
            .and_then(Value::as_str)
            .unwrap_or_default();
        // A host is in a group the appliance has (what the store joins).
        if let Some(mode) = modes.get(group) {
            hosts.insert(name.to_owned(), (group.to_owned(), *mode));
        }
    }
    let mut users = HashMap::new();
    for u in list_all(c, "/v1/users", "users")? {
        let name = u.get("name").and_then(Value::as_str).unwrap_or_default();
        let mut roles: Vec<String> = u
            .get("roles")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        roles.sort_unstable();
        roles.dedup();
        users.insert(name.to_owned(), roles);
    }
    // The protected file sets decide which `FileSet`s a file is in.
    let fs = c.get("/v1/file-sets")?;
    let mut file_sets: Vec<FileSet> =
        serde_json::from_value(fs.get("file_sets").cloned().unwrap_or(Value::Null))
            .map_err(|e| CliError::new(Exit::Server, format!("file sets: {e}")))?;
    file_sets.sort_by(|a, b| a.name.cmp(&b.name));
    for f in &mut file_sets {
        f.paths.sort();
    }
    let mut programs = BTreeSet::new();
    for r in rows {
        match &r.req {
            Recorded::One(q) => {
                programs.insert(q.program.sha256.clone());
            }
            Recorded::Pair(p) => {
                programs.insert(p.0.program.sha256.clone());
                programs.insert(p.1.program.sha256.clone());
            }
        }
    }
    let mut groups = HashMap::new();
    for sha in programs {
        let v = match c.get(&format!("/v1/signatures/{}", enc(&sha))) {
            Ok(v) => v,
            Err(e) if e.code == "not_found" || e.code == "invalid" => continue,
            Err(e) => return Err(e),
        };
        let mut of: Vec<String> = v
            .get("groups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        of.sort_unstable();
        of.dedup();
        groups.insert(sha, of);
    }
    let policy = PolicyVersion {
        id: 1,
        text: draft.to_owned(),
        sha256: hex::encode(Sha256::digest(draft.as_bytes())),
        state: PolicyState::Active,
    };
    Ok(Mirror {
        data: EngineData {
            versions: Versions::default(),
            generation: 0,
            policy: Some(policy),
            hosts,
            users,
            file_sets,
        },
        groups,
    })
}

/// (host, user, action, program, target, old verdict, new verdict).
type Key = (String, String, String, String, String, String, String);
/// (count, first at_ms, last at_ms, some audit seqs, new reasons).
type Agg = (u64, i64, i64, Vec<i64>, Vec<String>);

/// Runs a replay.
pub fn run(c: &Client, draft: &str, since: &str, out: &Out) -> Result<u8> {
    let now = time::now_ms();
    let since_ms = time::parse_since(since, now)?;
    // Hours and weekdays as the appliance reads them: in its time zone
    // (an appliance that does not say is on UTC, the default).
    let status = c.get("/v1/status")?;
    if let Some(tz) = status.get("time_zone").and_then(Value::as_str) {
        let tz = trustbind_policy::clock::zone_named(tz)
            .map_err(|e| CliError::io(format!("the appliance's time zone: {e}")))?;
        trustbind_policy::clock::set_zone(tz);
    }
    // The draft: a stored version or a local file, validated first.
    let (name, text) = if let Ok(id) = draft.parse::<i64>() {
        let v = c.get(&format!("/v1/policies/{id}"))?;
        let t = v
            .get("text")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        (format!("v{id}"), t)
    } else {
        let p = Path::new(draft);
        let t = std::fs::read_to_string(p).map_err(|e| io_err("read", p, &e))?;
        (p.display().to_string(), t)
    };
    let report = validate::check_text(&name, text.clone())?;
    if let Err(diags) = &report.result {
        for d in diags {
            eprint!("{}", validate::render(&name, &text, d));
        }
        return Err(CliError::new(
            Exit::CheckFailed,
            format!(
                "{name} does not validate ({} problem(s)); nothing replayed",
                diags.len()
            ),
        ));
    }
    // The recorded decisions of the window.
    let resp = c.send(c.request(Method::GET, "/v1/audit/export").query(&[
        ("since_ms", since_ms.to_string()),
        ("kind", "decision".to_owned()),
    ]))?;
    let mut rows = Vec::new();
    let mut unreadable = 0_u64;
    for line in std::io::BufReader::new(resp).lines() {
        let line = line.map_err(|e| {
            CliError::new(Exit::Connect, format!("the audit export broke off: {e}"))
        })?;
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(&line) {
            Some(r) => rows.push(r),
            None => unreadable += 1,
        }
    }
    let engine = Engine::new(Arc::new(mirror(c, &rows, &text)?), SCHEMA).map_err(local)?;

    // (host, user, action, program, target, old, new) -> (count, first, last, seqs)
    let mut changes: BTreeMap<Key, Agg> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut unchanged = 0_u64;
    for r in &rows {
        let d = match &r.req {
            Recorded::One(q) => engine.decide(q),
            Recorded::Pair(p) => engine.decide_pair(&p.0, &p.1),
        };
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                errors.push(json!({ "seq": r.seq, "error": e.to_string() }));
                continue;
            }
        };
        let Outcome {
            verdict,
            reasons,
            would_deny,
            ..
        } = d.outcome;
        let new_v = serde_json::to_value(&verdict).unwrap_or(Value::Null);
        if new_v == r.old.0 && would_deny == r.old.1 {
            unchanged += 1;
            continue;
        }
        let (host, user, action, program, target) = what(&r.req);
        let key = (
            host,
            user,
            action,
            program,
            target,
            verdict_text(&r.old.0, r.old.1),
            verdict_text(&new_v, would_deny),
        );
        let e = changes
            .entry(key)
            .or_insert_with(|| (0, r.at_ms, r.at_ms, Vec::new(), reasons.clone()));
        e.0 += 1;
        e.1 = e.1.min(r.at_ms);
        e.2 = e.2.max(r.at_ms);
        if e.3.len() < 20 {
            e.3.push(r.seq);
        }
    }
    let mut list: Vec<(&Key, &Agg)> = changes.iter().collect();
    list.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then_with(|| a.0.cmp(b.0)));
    let changed: u64 = list.iter().map(|(_, v)| v.0).sum();
    let v = json!({
        "draft": name,
        "since_ms": since_ms,
        "replayed": rows.len(),
        "unreadable_rows": unreadable,
        "unchanged": unchanged,
        "changed": changed,
        "errors": errors,
        "changes": list.iter().map(|(k, v)| json!({
            "host": k.0, "user": k.1, "action": k.2, "program": k.3, "target": k.4,
            "old": k.5, "new": k.6, "count": v.0, "first_ms": v.1, "last_ms": v.2,
            "seqs": v.3, "new_reasons": v.4,
        })).collect::<Vec<_>>(),
    });
    out.emit(&v, || {
        let mut s = format!(
            "replayed {} recorded decision(s) since {} UTC against {name}\n",
            rows.len(),
            time::fmt_ms(since_ms)
        );
        if list.is_empty() {
            s.push_str("no decision would change\n");
        } else {
            s.push_str(&format!(
                "{changed} decision(s) would change ({} distinct):\n\n",
                list.len()
            ));
            let trows: Vec<Vec<String>> = list
                .iter()
                .map(|(k, v)| {
                    vec![
                        v.0.to_string(),
                        k.0.clone(),
                        k.1.clone(),
                        k.2.clone(),
                        if k.4.is_empty() {
                            k.3.clone()
                        } else {
                            format!("{} {}", k.3, k.4)
                        },
                        format!("{} -> {}", k.5, k.6),
                        if v.4.is_empty() {
                            "(no policy matched)".to_owned()
                        } else {
                            v.4.join(", ")
                        },
                        time::fmt_ms(v.2),
                    ]
                })
                .collect();
            s.push_str(&table(
                &[
                    "COUNT",
                    "HOST",
                    "USER",
                    "ACTION",
                    "PROGRAM / TARGET",
                    "OLD -> NEW",
                    "NEW REASONS",
                    "LAST SEEN (UTC)",
                ],
                &trows,
            ));
        }
        s.push_str(&format!("\nunchanged: {unchanged}"));
        if !errors.is_empty() {
            s.push_str(&format!(
                "; {} could not be decided (e.g. seq {})",
                errors.len(),
                errors
                    .first()
                    .and_then(|e| e.get("seq"))
                    .map_or_else(String::new, Value::to_string)
            ));
        }
        if unreadable > 0 {
            s.push_str(&format!("; {unreadable} row(s) unreadable"));
        }
        s.push('\n');
        s
    });
    Ok(if changed > 0 {
        Exit::CheckFailed as u8
    } else {
        0
    })
}
