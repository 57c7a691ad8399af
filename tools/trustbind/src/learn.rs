//! `trustbind learn`: learning mode's list of observed programs, grouped by
//! Debian package and directory, and their approval into a reference group
//! (`appliance/API.md`, "Learning mode").

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, IsTerminal as _, Write as _};

use reqwest::Method;
use serde_json::{json, Value};

use crate::cli::{LearnArgs, LearnState};
use crate::client::Client;
use crate::error::{CliError, Exit, Result};
use crate::out::{table, Out};

/// One program (SHA-256 at a path) over every host that ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// SHA-256.
    pub sha256: String,
    /// Path.
    pub path: String,
    /// The package a host reported for the path.
    pub package: Option<String>,
    /// Hosts.
    pub hosts: BTreeSet<String>,
    /// Users (as the hosts reported them), and whether there were more.
    pub users: BTreeSet<String>,
    /// More users than listed.
    pub users_more: bool,
    /// First and last decision (ms).
    pub first_ms: i64,
    /// Last decision.
    pub last_ms: i64,
    /// Decisions.
    pub count: u64,
    /// The most severe latest verdict of its hosts.
    pub verdict: String,
    /// The group it was approved into.
    pub approved: Option<String>,
    /// Whether a host still had it refused (or would-deny) after approval.
    pub still_denied: bool,
}

/// A group of programs for the listing and interactive approval.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKey {
    /// Files of a Debian package.
    Package(String),
    /// Files in a directory (no package reported).
    Directory(String),
}

impl GroupKey {
    fn label(&self) -> String {
        match self {
            Self::Package(p) => format!("package {p}"),
            Self::Directory(d) => d.clone(),
        }
    }
}

fn severity(v: &str) -> u8 {
    match v {
        "denied" => 2,
        "would_deny" => 1,
        _ => 0,
    }
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(0) => "/".to_owned(),
        Some(i) => path.get(..i).unwrap_or("/").to_owned(),
        None => path.to_owned(),
    }
}

/// Folds the API's per-host rows into programs, grouped by package (where
/// a host reported one) else by directory, each group by path.
pub fn group_rows(rows: &[Value]) -> BTreeMap<GroupKey, Vec<Program>> {
    let mut by: BTreeMap<(String, String), Program> = BTreeMap::new();
    for r in rows {
        let s = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_owned);
        let (Some(sha256), Some(path)) = (s("sha256"), s("path")) else {
            continue;
        };
        let first = r.get("first_ms").and_then(Value::as_i64).unwrap_or(0);
        let last = r.get("last_ms").and_then(Value::as_i64).unwrap_or(0);
        let verdict = s("verdict").unwrap_or_default();
        let approved = s("approved_group");
        let approved_ms = r.get("approved_ms").and_then(Value::as_i64);
        let p = by
            .entry((path.clone(), sha256.clone()))
            .or_insert_with(|| Program {
                sha256,
                path,
                package: None,
                hosts: BTreeSet::new(),
                users: BTreeSet::new(),
                users_more: false,
                first_ms: first,
                last_ms: last,
                count: 0,
                verdict: verdict.clone(),
                approved: None,
                still_denied: false,
            });
        if let Some(h) = s("host") {
            p.hosts.insert(h);
        }
        if let Some(u) = r.get("users").and_then(Value::as_array) {
            p.users
                .extend(u.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        p.users_more |= r
            .get("users_more")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        p.first_ms = p.first_ms.min(first);
        p.last_ms = p.last_ms.max(last);
        p.count += r.get("count").and_then(Value::as_u64).unwrap_or(0);
        if severity(&verdict) > severity(&p.verdict) {
            p.verdict.clone_from(&verdict);
        }
        if p.package.is_none() {
            p.package = s("package");
        }
        if approved.is_some() {
            p.still_denied |= severity(&verdict) > 0 && approved_ms.is_some_and(|a| last > a);
            p.approved = approved;
        }
    }
    let mut groups: BTreeMap<GroupKey, Vec<Program>> = BTreeMap::new();
    for p in by.into_values() {
        let key = match &p.package {
            Some(pkg) => GroupKey::Package(pkg.clone()),
            None => GroupKey::Directory(parent(&p.path)),
        };
        groups.entry(key).or_default().push(p);
    }
    groups
}

fn short(sha: &str) -> String {
    sha.get(..12).unwrap_or(sha).to_owned()
}

fn users_text(p: &Program) -> String {
    let mut s = p.users.iter().cloned().collect::<Vec<_>>().join(",");
    if p.users_more {
        s.push_str(",+");
    }
    s
}

fn verdict_text(p: &Program) -> String {
    match (&p.approved, p.still_denied) {
        (Some(g), false) => format!("approved:{g}"),
        (Some(g), true) => format!("approved:{g} but still {}", p.verdict.replace('_', "-")),
        (None, _) => p.verdict.replace('_', "-"),
    }
}

/// The text of one group: a heading and a table.
pub fn group_text(key: &GroupKey, programs: &[Program]) -> String {
    let hosts: BTreeSet<&String> = programs.iter().flat_map(|p| &p.hosts).collect();
    let mut s = format!(
        "{} ({} program(s), {} host(s))\n",
        key.label(),
        programs.len(),
        hosts.len()
    );
    let rows: Vec<Vec<String>> = programs
        .iter()
        .map(|p| {
            vec![
                short(&p.sha256),
                p.path.clone(),
                p.hosts.len().to_string(),
                users_text(p),
                p.count.to_string(),
                crate::time::fmt_ms(p.first_ms),
                crate::time::fmt_ms(p.last_ms),
                verdict_text(p),
            ]
        })
        .collect();
    for line in table(
        &[
            "SHA256", "PATH", "HOSTS", "USERS", "COUNT", "FIRST", "LAST", "VERDICT",
        ],
        &rows,
    )
    .lines()
    {
        s.push_str("  ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

fn program_json(p: &Program) -> Value {
    json!({
        "sha256": p.sha256,
        "path": p.path,
        "package": p.package,
        "hosts": p.hosts,
        "users": p.users,
        "users_more": p.users_more,
        "first_ms": p.first_ms,
        "last_ms": p.last_ms,
        "count": p.count,
        "verdict": p.verdict,
        "approved_group": p.approved,
        "still_denied": p.still_denied,
    })
}

/// The filter as query pairs / body fields.
fn filter_pairs(a: &LearnArgs, state: &str) -> Vec<(&'static str, String)> {
    let mut q = vec![("state", state.to_owned())];
    if let Some(h) = &a.host {
        q.push(("host", h.clone()));
    }
    if let Some(p) = &a.path_prefix {
        q.push(("path_prefix", p.clone()));
    }
    if let Some(p) = &a.package {
        q.push(("package", p.clone()));
    }
    q
}

/// Every row matching the filters (all pages), and the hosts' shares.
fn fetch(c: &Client, a: &LearnArgs, state: LearnState) -> Result<(Vec<Value>, Value)> {
    let mut rows = Vec::new();
    let mut after: Option<i64> = None;
    let mut hosts = Value::Null;
    loop {
        let mut q = filter_pairs(a, state.as_str());
        q.push(("limit", "1000".to_owned()));
        if let Some(n) = after {
            q.push(("after", n.to_string()));
        }
        let v = c.json(c.request(Method::GET, "/v1/learn").query(&q))?;
        if let Some(r) = v.get("rows").and_then(Value::as_array) {
            rows.extend(r.iter().cloned());
        }
        if hosts.is_null() {
            hosts = json!({ "hosts": v.get("hosts"), "caps": v.get("caps") });
        }
        match v.get("next").and_then(Value::as_i64) {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    Ok((rows, hosts))
}

/// Lines warning of programs left out at the caps.
fn cap_notes(hosts: &Value) -> String {
    let mut s = String::new();
    let caps = hosts.get("caps");
    let cap = |k: &str| {
        caps.and_then(|c| c.get(k))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    for h in hosts
        .get("hosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let left = h.get("left_out").and_then(Value::as_i64).unwrap_or(0);
        if left > 0 {
            s.push_str(&format!(
                "note: host {}: {left} program(s) not recorded, the list is full ({} per host, {} in all); approve or forget rows (trustbind learn --forget --host {} --state approved)\n",
                h.get("host").and_then(Value::as_str).unwrap_or("?"),
                cap("per_host"),
                cap("total"),
                h.get("host").and_then(Value::as_str).unwrap_or("?"),
            ));
        }
    }
    s
}

/// Runs `trustbind learn`.
pub fn run(a: &LearnArgs, c: &Client, out: &Out) -> Result<u8> {
    if a.forget {
        let mut body = serde_json::Map::new();
        let state = a.state.unwrap_or(LearnState::All).as_str();
        for (k, v) in filter_pairs(a, state) {
            body.insert(k.to_owned(), Value::String(v));
        }
        let v = c.post("/v1/learn/forget", &Value::Object(body))?;
        out.emit(&v, || {
            format!(
                "forgot {} row(s)\n",
                v.get("rows").and_then(Value::as_u64).unwrap_or(0)
            )
        });
        return Ok(0);
    }
    match &a.group {
        None => list(a, c, out),
        Some(g) if a.approve_all || a.dry_run => approve(a, c, g, &[], out).map(|_| 0),
        Some(g) => interactive(a, c, g, out),
    }
}

fn list(a: &LearnArgs, c: &Client, out: &Out) -> Result<u8> {
    let state = a.state.unwrap_or(LearnState::Pending);
    let (rows, hosts) = fetch(c, a, state)?;
    let groups = group_rows(&rows);
    let v = json!({
        "groups": groups.iter().map(|(k, ps)| {
            let (kind, name) = match k {
                GroupKey::Package(p) => ("package", p),
                GroupKey::Directory(d) => ("directory", d),
            };
            json!({ "kind": kind, "name": name, "programs": ps.iter().map(program_json).collect::<Vec<_>>() })
        }).collect::<Vec<_>>(),
        "hosts": hosts.get("hosts"),
        "caps": hosts.get("caps"),
    });
    out.emit(&v, || {
        let mut s = String::new();
        if groups.is_empty() {
            s.push_str(&format!("no {} programs\n", state.as_str()));
        }
        for (k, ps) in &groups {
            s.push_str(&group_text(k, ps));
        }
        s.push_str(&cap_notes(&hosts));
        s
    });
    Ok(0)
}

/// One approval call: the filters, `only` these programs when given.
fn approve(a: &LearnArgs, c: &Client, group: &str, only: &[String], out: &Out) -> Result<Value> {
    let mut body = serde_json::Map::new();
    body.insert("group".into(), json!(group));
    for (k, v) in filter_pairs(a, "pending") {
        if k != "state" {
            body.insert(k.to_owned(), Value::String(v));
        }
    }
    if !only.is_empty() {
        body.insert("programs".into(), json!(only));
    }
    body.insert("dry_run".into(), json!(a.dry_run));
    let v = c.post("/v1/learn/approve", &Value::Object(body))?;
    out.emit(&v, || approval_text(&v));
    Ok(v)
}

fn approval_text(v: &Value) -> String {
    let programs = v.get("programs").and_then(Value::as_array);
    let n = programs.map_or(0, Vec::len);
    let group = v.get("group").and_then(Value::as_str).unwrap_or("?");
    let dry = v.get("dry_run").and_then(Value::as_bool).unwrap_or(false);
    let mut s = String::new();
    for p in programs.into_iter().flatten() {
        s.push_str(&format!(
            "  {}  {}{}\n",
            short(p.get("sha256").and_then(Value::as_str).unwrap_or("?")),
            p.get("path").and_then(Value::as_str).unwrap_or("?"),
            if p.get("known").and_then(Value::as_bool).unwrap_or(false) {
                "  (known signature)"
            } else {
                ""
            }
        ));
    }
    let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    if n == 0 {
        s.push_str("no pending programs match; nothing to approve\n");
    } else if dry {
        s.push_str(&format!(
            "dry run: would approve {n} program(s) into {group} ({} new signature(s), {} new in the group, {} observed row(s)); nothing changed\n",
            num("inserted"),
            num("added_to_group"),
            num("rows")
        ));
    } else {
        s.push_str(&format!(
            "approved {n} program(s) into {group} ({} new signature(s), {} new in the group, {} observed row(s))\n",
            num("inserted"),
            num("added_to_group"),
            num("rows")
        ));
    }
    s
}

fn interactive(a: &LearnArgs, c: &Client, group: &str, out: &Out) -> Result<u8> {
    if !std::io::stdin().is_terminal() || out.is_json() {
        return Err(CliError::new(
            Exit::Usage,
            "approving with --group asks group by group and needs a terminal (and text output); use --approve-all with filters (--path-prefix, --package, --host), --dry-run first",
        ));
    }
    let (rows, hosts) = fetch(c, a, LearnState::Pending)?;
    let groups = group_rows(&rows);
    if groups.is_empty() {
        println!("no pending programs");
        return Ok(0);
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let (mut approved, mut skipped) = (0_usize, 0_usize);
    for (k, ps) in &groups {
        print!("{}", group_text(k, ps));
        print!(
            "approve these {} program(s) into {group}? [y/N/q] ",
            ps.len()
        );
        let _ = std::io::stdout().flush();
        let answer = match lines.next() {
            Some(Ok(l)) => l.trim().to_ascii_lowercase(),
            _ => "q".to_owned(),
        };
        match answer.as_str() {
            "y" | "yes" => {
                let only: Vec<String> = ps.iter().map(|p| p.sha256.clone()).collect();
                approve(a, c, group, &only, out)?;
                approved += ps.len();
            }
            "q" | "quit" => break,
            _ => skipped += ps.len(),
        }
    }
    print!("{}", cap_notes(&hosts));
    println!("{approved} program(s) approved into {group}, {skipped} skipped");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, sha: &str, path: &str, pkg: Option<&str>, verdict: &str) -> Value {
        json!({
            "host": host, "sha256": sha, "path": path, "package": pkg,
            "users": ["root"], "users_more": false, "first_ms": 1000, "last_ms": 2000,
            "count": 2, "verdict": verdict, "approved_group": null, "approved_ms": null,
        })
    }

    #[test]
    fn rows_fold_into_programs_by_package_then_directory() {
        let a = "a".repeat(64);
        let b = "b".repeat(64);
        let rows = vec![
            row("web1", &a, "/opt/app/run", None, "would_deny"),
            row("web2", &a, "/opt/app/run", None, "denied"),
            row("web1", &b, "/usr/bin/id", Some("coreutils"), "would_deny"),
        ];
        let g = group_rows(&rows);
        let keys: Vec<_> = g.keys().cloned().collect();
        assert_eq!(
            keys,
            vec![
                GroupKey::Package("coreutils".into()),
                GroupKey::Directory("/opt/app".into())
            ]
        );
        let app = &g[&GroupKey::Directory("/opt/app".into())][0];
        assert_eq!(app.hosts.len(), 2);
        assert_eq!(app.count, 4);
        assert_eq!(app.verdict, "denied");
        let text = group_text(
            &GroupKey::Directory("/opt/app".into()),
            &g[&GroupKey::Directory("/opt/app".into())],
        );
        assert!(
            text.starts_with("/opt/app (1 program(s), 2 host(s))"),
            "{text}"
        );
        assert!(text.contains("aaaaaaaaaaaa  /opt/app/run"), "{text}");
    }

    #[test]
    fn an_approved_program_still_refused_says_so() {
        let a = "a".repeat(64);
        let mut r = row("web1", &a, "/opt/app/run", None, "would_deny");
        r["approved_group"] = json!("app");
        r["approved_ms"] = json!(1500);
        let g = group_rows(&[r]);
        let p = &g[&GroupKey::Directory("/opt/app".into())][0];
        assert_eq!(verdict_text(p), "approved:app but still would-deny");
    }
}
