//! Running the commands.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use reqwest::Method;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};

use trustbind_policy::audit_seal::{SealReport, VerifyKey};
use trustbind_policy::check::PolicyDiagnostic;

use crate::cli::{AdminCmd, ChannelCmd, FileSetCmd, UserCmd};
use crate::cli::{AuditCmd, Cli, Cmd, GroupCmd, HostCmd, HostGroupCmd, ModeArg, PolicyCmd, SigCmd};
use crate::client::Client;
use crate::config::{self, Overrides};
use crate::error::{io_err, CliError, Exit, Result};
use crate::out::{field, table, Out};
use crate::{time, validate};

/// Runs the parsed command line; returns the exit code on success.
pub fn run(cli: Cli, out: &Out) -> Result<u8> {
    let g = &cli.global;
    let ov = Overrides {
        config: g.config.clone(),
        url: g.url.clone(),
        cert: g.cert.clone(),
        key: g.key.clone(),
        ca: g.ca.clone(),
    };
    let connect = || -> Result<Client> { Client::new(config::resolve(&ov)?) };
    match cli.cmd {
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: clap_complete panics on a write error
            // (e.g. a closed pipe), a plain write does not.
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "trustbind", &mut buf);
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&buf);
            Ok(0)
        }
        Cmd::Policy(PolicyCmd::Validate { files }) => policy_validate(&files, out),
        Cmd::Policy(p) => policy(p, &connect()?, out),
        Cmd::Sig(s) => sig(s, &connect()?, out),
        Cmd::Group(gc) => group(gc, &connect()?, out),
        Cmd::Host(h) => host(h, &connect()?, out),
        Cmd::Channel(ch) => channel(ch, &connect()?, out),
        Cmd::Audit(AuditCmd::VerifyExport { files, seal_key }) => {
            let ca = match &ov.ca {
                Some(ca) => ca.clone(),
                None => config::resolve(&ov)?.ca,
            };
            audit_verify_export(&files, &ca, seal_key.as_deref(), out)
        }
        Cmd::Learn(l) => crate::learn::run(&l, &connect()?, out),
        Cmd::Audit(a) => audit(a, &connect()?, out),
        Cmd::Explain(x) => crate::explain::run(x, &connect()?, out),
        Cmd::User(u) => user(u, &connect()?, out),
        Cmd::FileSet(f) => fileset(f, &connect()?, out),
        Cmd::Admin(a @ AdminCmd::Enrol { .. }) => crate::enrol::run(a, &ov, out),
        Cmd::Admin(a) => admin(a, &connect()?, &config::resolve(&ov)?, out),
        Cmd::Status => {
            let c = connect()?;
            let v = c.get("/v1/status")?;
            out.emit(&v, || {
                let gv = v.get("governing").cloned().unwrap_or(Value::Null);
                format!(
                    "appliance  {}\nversion    {}\nyou        {}\npolicy     active {} (previous {}, generation {})\naudit      {} rows\n",
                    c.url(),
                    field(&v, "version"),
                    field(&v, "you"),
                    field(&gv, "active"),
                    field(&gv, "previous"),
                    field(&gv, "generation"),
                    field(&v, "audit_head"),
                )
            });
            Ok(0)
        }
    }
}

/// Reads a policy file, `-` meaning standard input.
fn read_policy(path: &Path) -> Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| io_err("read", Path::new("standard input"), &e))?;
        Ok(("<stdin>".to_owned(), s))
    } else {
        let s = std::fs::read_to_string(path).map_err(|e| io_err("read", path, &e))?;
        Ok((path.display().to_string(), s))
    }
}

fn policy_validate(files: &[PathBuf], out: &Out) -> Result<u8> {
    let mut reports = Vec::new();
    for f in files {
        let (name, text) = read_policy(f)?;
        reports.push(validate::check_text(&name, text)?);
    }
    let bad = reports.iter().filter(|r| r.result.is_err()).count();
    let v = json!({
        "ok": bad == 0,
        "files": reports.iter().map(validate::report_json).collect::<Vec<_>>(),
    });
    out.emit(&v, || {
        let mut s = String::new();
        for r in &reports {
            match &r.result {
                Ok(n) => s.push_str(&format!("ok: {} ({n} policies)\n", r.file)),
                Err(diags) => {
                    for d in diags {
                        s.push_str(&validate::render(&r.file, &r.text, d));
                    }
                }
            }
        }
        if bad > 0 {
            let problems: usize = reports
                .iter()
                .filter_map(|r| r.result.as_ref().err())
                .map(Vec::len)
                .sum();
            s.push_str(&format!(
                "{problems} problem(s) in {bad} of {} file(s)\n",
                reports.len()
            ));
        }
        s
    });
    Ok(if bad == 0 { 0 } else { Exit::CheckFailed as u8 })
}

/// Renders the appliance's `invalid_policy` details with carets when the text is at hand.
fn explain_policy_error(mut e: CliError, file: &str, text: &str, out: &Out) -> CliError {
    if e.code == "invalid_policy" && !out.is_json() {
        if let Some(d) = e
            .details
            .clone()
            .and_then(|d| serde_json::from_value::<Vec<PolicyDiagnostic>>(d).ok())
        {
            for x in &d {
                eprint!("{}", validate::render(file, text, x));
            }
            e.message = format!(
                "the appliance refused {file}: {} problem(s) (shown above)",
                d.len()
            );
        }
    }
    e
}

fn policy_id(s: &str) -> Result<i64> {
    s.parse().map_err(|_| {
        CliError::new(
            Exit::Usage,
            format!("`{s}` is not a policy version id (a number, see `trustbind policy list`)"),
        )
    })
}

fn policy(p: PolicyCmd, c: &Client, out: &Out) -> Result<u8> {
    match p {
        PolicyCmd::Validate { .. } => Ok(0),
        PolicyCmd::Upload {
            file,
            comment,
            activate,
        } => {
            let (name, text) = read_policy(&file)?;
            let v = c
                .post("/v1/policies", &json!({ "text": text, "comment": comment }))
                .map_err(|e| explain_policy_error(e, &name, &text, out))?;
            let id = v.get("id").and_then(Value::as_i64).ok_or_else(|| {
                CliError::new(
                    Exit::Server,
                    "the appliance answered an upload without an id",
                )
            })?;
            let mut result = json!({ "upload": v });
            if activate {
                let a = c.post(&format!("/v1/policies/{id}/activate"), &json!({}))?;
                if let Some(o) = result.as_object_mut() {
                    o.insert("activate".into(), a);
                }
            }
            out.emit(&result, || {
                let mut s = format!(
                    "uploaded {name} as draft v{id} ({} policies, sha256 {})\n",
                    field(&v, "policies"),
                    field(&v, "sha256")
                );
                if activate {
                    s.push_str(&format!("activated v{id}\n"));
                } else {
                    s.push_str(&format!(
                        "review: trustbind policy diff {id}; then: trustbind policy activate {id}\n"
                    ));
                }
                s
            });
            Ok(0)
        }
        PolicyCmd::List => {
            let v = c.get("/v1/policies")?;
            out.emit(&v, || {
                let active = v.pointer("/governing/active").and_then(Value::as_i64);
                let rows: Vec<Vec<String>> = v
                    .get("policies")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|p| {
                                let id = p.get("id").and_then(Value::as_i64);
                                vec![
                                    format!(
                                        "{}{}",
                                        if id == active && id.is_some() {
                                            "*"
                                        } else {
                                            " "
                                        },
                                        field(p, "id")
                                    ),
                                    field(p, "state"),
                                    p.get("created_ms")
                                        .and_then(Value::as_i64)
                                        .map_or_else(|| "-".into(), time::fmt_ms),
                                    field(p, "comment"),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&[" ID", "STATE", "CREATED (UTC)", "COMMENT"], &rows)
            });
            Ok(0)
        }
        PolicyCmd::Show { version, text } => {
            let path = if version == "active" {
                "/v1/policies/active".to_owned()
            } else {
                format!("/v1/policies/{}", policy_id(&version)?)
            };
            let v = c.get(&path)?;
            out.emit(&v, || {
                let body = field(&v, "text");
                if text {
                    return body;
                }
                format!(
                    "# version {}  state {}  sha256 {}\n# comment: {}\n{body}",
                    field(&v, "id"),
                    field(&v, "state"),
                    field(&v, "sha256"),
                    field(&v, "comment"),
                )
            });
            Ok(0)
        }
        PolicyCmd::Diff { draft, against } => {
            let v = if let Ok(id) = draft.parse::<i64>() {
                let q = against.map_or_else(String::new, |a| format!("?against={a}"));
                c.get(&format!("/v1/policies/{id}/diff{q}"))?
            } else {
                local_diff(c, Path::new(&draft), against)?
            };
            out.emit(&v, || {
                if v.get("changed").and_then(Value::as_bool) == Some(false) {
                    "no changes\n".to_owned()
                } else {
                    field(&v, "diff")
                }
            });
            Ok(0)
        }
        PolicyCmd::Activate { version } => {
            let v = c.post(&format!("/v1/policies/{version}/activate"), &json!({}))?;
            out.emit(&v, || {
                format!(
                    "v{version} is now active (generation {})\n",
                    v.pointer("/governing/generation")
                        .map_or_else(|| "-".into(), Value::to_string)
                )
            });
            Ok(0)
        }
        PolicyCmd::Rollback => {
            let v = c.post("/v1/policies/rollback", &json!({}))?;
            out.emit(&v, || {
                format!(
                    "rolled back: v{} is active again (generation {})\n",
                    v.pointer("/governing/active")
                        .map_or_else(|| "-".into(), Value::to_string),
                    v.pointer("/governing/generation")
                        .map_or_else(|| "-".into(), Value::to_string)
                )
            });
            Ok(0)
        }
        PolicyCmd::Test { draft, since, .. } => crate::replay::run(c, &draft, &since, out),
    }
}

/// Diff of a local file against a stored version (default: the active one).
fn local_diff(c: &Client, file: &Path, against: Option<i64>) -> Result<Value> {
    let (name, text) = read_policy(file)?;
    let old = match against {
        Some(a) => c.get(&format!("/v1/policies/{a}"))?,
        None => match c.get("/v1/policies/active") {
            Ok(v) => v,
            Err(e) if e.code == "not_found" => json!({ "id": null, "text": "" }),
            Err(e) => return Err(e),
        },
    };
    let old_text = old.get("text").and_then(Value::as_str).unwrap_or("");
    let old_name = old
        .get("id")
        .and_then(Value::as_i64)
        .map_or_else(|| "none".to_owned(), |i| format!("v{i}"));
    let d = similar::TextDiff::from_lines(old_text, text.as_str());
    let unified = d
        .unified_diff()
        .context_radius(3)
        .header(&old_name, &name)
        .to_string();
    Ok(json!({
        "from": old.get("id"),
        "to": { "file": name },
        "changed": old_text != text,
        "diff": unified,
    }))
}

fn sig(s: SigCmd, c: &Client, out: &Out) -> Result<u8> {
    match s {
        SigCmd::Add {
            paths,
            inventory: Some(file),
            group,
            ..
        } if paths.is_empty() => crate::hashing::add_inventory(c, &file, &group, out),
        SigCmd::Add {
            paths,
            group,
            source,
            ..
        } => crate::hashing::add(c, &paths, &group, &source, out),
        SigCmd::Ls { group, limit } => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let want = if limit == 0 {
                    1000
                } else {
                    limit.saturating_sub(all.len() as u64).min(1000)
                };
                if want == 0 {
                    break;
                }
                let mut q: Vec<(&str, String)> = vec![("limit", want.to_string())];
                if let Some(g) = &group {
                    q.push(("group", g.clone()));
                }
                if let Some(a) = &after {
                    q.push(("after", a.clone()));
                }
                let v = c.json(c.request(Method::GET, "/v1/signatures").query(&q))?;
                if let Some(a) = v.get("signatures").and_then(Value::as_array) {
                    all.extend(a.iter().cloned());
                }
                match v.get("next").and_then(Value::as_str) {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            let v = json!({ "signatures": all });
            out.emit(&v, || {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .map(|s| {
                        vec![
                            field(s, "sha256"),
                            field(s, "size"),
                            field(s, "name"),
                            field(s, "source"),
                        ]
                    })
                    .collect();
                table(&["SHA256", "SIZE", "NAME", "SOURCE"], &rows)
            });
            Ok(0)
        }
        SigCmd::Show { sha256 } => {
            let v = c.get(&format!("/v1/signatures/{}", enc(&sha256)))?;
            out.emit(&v, || {
                format!(
                    "sha256  {}\nsha1    {}\nsize    {}\nname    {}\nsource  {}\ngroups  {}\n",
                    field(&v, "sha256"),
                    field(&v, "sha1"),
                    field(&v, "size"),
                    field(&v, "name"),
                    field(&v, "source"),
                    v.get("groups")
                        .and_then(Value::as_array)
                        .map(|g| g
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                )
            });
            Ok(0)
        }
        SigCmd::Rm { sha256 } => {
            let mut removed = 0_u64;
            let mut missing: Vec<Value> = Vec::new();
            for chunk in sha256.chunks(trustbind_policy::wire::MAX_BATCH) {
                let v = c.post("/v1/signatures/remove", &json!({ "sha256": chunk }))?;
                removed += v.get("removed").and_then(Value::as_u64).unwrap_or(0);
                if let Some(m) = v.get("missing").and_then(Value::as_array) {
                    missing.extend(m.iter().cloned());
                }
            }
            let v = json!({ "removed": removed, "missing": missing });
            out.emit(&v, || {
                let mut s = format!("removed {removed} signature(s)\n");
                for m in &missing {
                    s.push_str(&format!("not found: {}\n", m.as_str().unwrap_or("?")));
                }
                s
            });
            Ok(if missing.is_empty() {
                0
            } else {
                Exit::Refused as u8
            })
        }
        SigCmd::ImportNsrl {
            db,
            group,
            products,
            oses,
            manufacturers,
            app_types,
            filters,
            batch,
            restart,
            max_rows,
            state,
        } => crate::nsrl::import(
            c,
            &crate::nsrl::Options {
                db,
                group,
                filters,
                packages: crate::nsrl::PackageFilters {
                    products,
                    oses,
                    manufacturers,
                    app_types,
                },
                batch,
                restart,
                max_rows,
                state,
            },
            out,
        ),
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(char::from(b));
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn group(gc: GroupCmd, c: &Client, out: &Out) -> Result<u8> {
    match gc {
        GroupCmd::Ls => {
            let v = c.get("/v1/groups")?;
            out.emit(&v, || {
                let rows: Vec<Vec<String>> = v
                    .get("groups")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|g| {
                                vec![
                                    field(g, "name"),
                                    field(g, "members"),
                                    field(g, "description"),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["NAME", "MEMBERS", "DESCRIPTION"], &rows)
            });
            Ok(0)
        }
        GroupCmd::Create { name, description } => {
            let v = c.post(
                "/v1/groups",
                &json!({ "name": name, "description": description }),
            )?;
            out.emit(&v, || {
                if v.get("created").and_then(Value::as_bool) == Some(true) {
                    format!("created group {name}\n")
                } else {
                    format!("group {name} already exists\n")
                }
            });
            Ok(0)
        }
        GroupCmd::Show { name } => {
            let v = c.get(&format!("/v1/groups/{}", enc(&name)))?;
            out.emit(&v, || {
                let g = v.get("group").cloned().unwrap_or(Value::Null);
                format!(
                    "name         {}\nmembers      {}\ndescription  {}\n",
                    field(&g, "name"),
                    field(&g, "members"),
                    field(&g, "description")
                )
            });
            Ok(0)
        }
        GroupCmd::Rm { name } => {
            let v = c.json(c.request(Method::DELETE, &format!("/v1/groups/{}", enc(&name))))?;
            out.emit(&v, || {
                format!(
                    "deleted group {name} ({} membership(s) removed)\n",
                    field(&v, "members_removed")
                )
            });
            Ok(0)
        }
        GroupCmd::Add { name, sha256 } => {
            let mut added = 0;
            let mut already = 0;
            for chunk in sha256.chunks(trustbind_policy::wire::MAX_BATCH) {
                let v = c.post(
                    &format!("/v1/groups/{}/members", enc(&name)),
                    &json!({ "sha256": chunk }),
                )?;
                added += v.get("added").and_then(Value::as_u64).unwrap_or(0);
                already += v
                    .get("already_members")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
            let v = json!({ "added": added, "already_members": already });
            out.emit(&v, || {
                format!("added {added} to {name} ({already} already members)\n")
            });
            Ok(0)
        }
        GroupCmd::Remove { name, sha256 } => {
            let mut removed = 0;
            let mut not = 0;
            for chunk in sha256.chunks(trustbind_policy::wire::MAX_BATCH) {
                let v = c.post(
                    &format!("/v1/groups/{}/members/remove", enc(&name)),
                    &json!({ "sha256": chunk }),
                )?;
                removed += v.get("removed").and_then(Value::as_u64).unwrap_or(0);
                not += v.get("not_members").and_then(Value::as_u64).unwrap_or(0);
            }
            let v = json!({ "removed": removed, "not_members": not });
            out.emit(&v, || {
                format!("removed {removed} from {name} ({not} were not members)\n")
            });
            Ok(0)
        }
    }
}

/// Refuses a path the appliance would refuse, before connecting.
fn checked_paths(paths: &[String]) -> Result<()> {
    for p in paths {
        trustbind_policy::files::check_path(p)
            .map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
    }
    Ok(())
}

fn fileset_text(v: &Value) -> String {
    let set = v.get("file_set").unwrap_or(v);
    let mut s = format!("{}\n", field(set, "name"));
    for p in set
        .get("paths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        s.push_str(&format!("  {}\n", p.as_str().unwrap_or_default()));
    }
    s
}

fn fileset(f: FileSetCmd, c: &Client, out: &Out) -> Result<u8> {
    let path = |name: &str| format!("/v1/file-sets/{}", enc(name));
    let v = match f {
        FileSetCmd::Ls => {
            let v = c.get("/v1/file-sets")?;
            out.emit(&v, || {
                let sets = v.get("file_sets").and_then(Value::as_array);
                let mut s: String = sets.into_iter().flatten().map(fileset_text).collect();
                s.push_str(&format!(
                    "({} of at most {} paths)\n",
                    field(&v, "paths"),
                    field(&v, "max_paths")
                ));
                s
            });
            return Ok(0);
        }
        FileSetCmd::Show { name } => {
            let v = c.get(&path(&name))?;
            out.emit(&v, || fileset_text(&v));
            return Ok(0);
        }
        FileSetCmd::Rm { name } => {
            let v = c.json(c.request(Method::DELETE, &path(&name)))?;
            out.emit(&v, || format!("deleted file set {name}\n"));
            return Ok(0);
        }
        FileSetCmd::Add { name, paths } => {
            checked_paths(&paths)?;
            c.post(
                &format!("{}/paths", path(&name)),
                &json!({ "paths": paths }),
            )?
        }
        FileSetCmd::Remove { name, paths } => c.post(
            &format!("{}/paths/remove", path(&name)),
            &json!({ "paths": paths }),
        )?,
        FileSetCmd::Set { name, paths } => {
            checked_paths(&paths)?;
            c.json(
                c.request(Method::PUT, &path(&name))
                    .json(&json!({ "paths": paths })),
            )?
        }
    };
    out.emit(&v, || {
        let n = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        format!(
            "{}{} added, {} removed\n",
            fileset_text(&v),
            n("added"),
            n("removed")
        )
    });
    Ok(0)
}

fn host_rows(v: &Value) -> Vec<Vec<String>> {
    v.get("hosts")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|h| {
                    vec![
                        field(h, "name"),
                        field(h, "host_group"),
                        field(h, "state"),
                        h.get("changed_ms")
                            .and_then(Value::as_i64)
                            .map_or_else(|| "-".into(), time::fmt_ms),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One channel end's bytes sent, `-` while it has not reported its close.
fn end_bytes(ch: &Value, end: &str) -> String {
    ch.get(end)
        .and_then(|e| e.get("bytes_sent"))
        .and_then(Value::as_i64)
        .map_or_else(|| "-".into(), |b| b.to_string())
}

pub(crate) fn channel_rows(v: &Value) -> Vec<Vec<String>> {
    let ms = |c: &Value, k: &str| {
        c.get(k)
            .and_then(Value::as_i64)
            .map_or_else(|| "-".into(), time::fmt_ms)
    };
    v.get("channels")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| {
                    vec![
                        field(c, "id"),
                        field(c, "key_id"),
                        format!("{} -> {}", field(c, "src_host"), field(c, "dst_host")),
                        field(c, "tuple"),
                        ms(c, "opened_ms"),
                        match ["connect", "accept"].iter().find(|e| {
                            c.get(**e).and_then(|end| end.get("reason"))
                                == Some(&Value::from("idle"))
                        }) {
                            Some(e) => format!("{} (idle, {e} end)", ms(c, "closed_ms")),
                            None => ms(c, "closed_ms"),
                        },
                        format!("{} / {}", end_bytes(c, "connect"), end_bytes(c, "accept")),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn channel(ch: ChannelCmd, c: &Client, out: &Out) -> Result<u8> {
    match ch {
        ChannelCmd::Ls { open } => {
            let mut all = Vec::new();
            let mut after: Option<i64> = None;
            loop {
                let mut q = vec![("limit", "1000".to_owned())];
                if open {
                    q.push(("open", "true".to_owned()));
                }
                if let Some(a) = after {
                    q.push(("after", a.to_string()));
                }
                let v = c.json(c.request(Method::GET, "/v1/channels").query(&q))?;
                if let Some(a) = v.get("channels").and_then(Value::as_array) {
                    all.extend(a.iter().cloned());
                }
                match v.get("next").and_then(Value::as_i64) {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            let v = json!({ "channels": all });
            out.emit(&v, || {
                table(
                    &[
                        "ID",
                        "KEY ID",
                        "HOSTS",
                        "TUPLE",
                        "OPENED (UTC)",
                        "CLOSED (UTC)",
                        "BYTES C/A",
                    ],
                    &channel_rows(&v),
                )
            });
            Ok(0)
        }
    }
}

/// A host's assigned addresses, for a person: `a, b` or `none assigned`.
fn addresses(h: &Value) -> String {
    let a: Vec<&str> = h
        .get("addresses")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if a.is_empty() {
        "none assigned (the address its agent connects from counts)".to_owned()
    } else {
        a.join(", ")
    }
}

fn host(h: HostCmd, c: &Client, out: &Out) -> Result<u8> {
    match h {
        HostCmd::EnrolToken {
            name,
            host_group,
            ttl,
        } => {
            let v = c.post(
                "/v1/hosts",
                &json!({ "name": name, "host_group": host_group, "token_ttl_s": ttl }),
            )?;
            out.emit(&v, || {
                format!(
                    "host {name} registered in {host_group} (pending enrolment)\n\
                     one-time enrolment token (shown once, keep it secret; expires {}):\n{}\n",
                    time_field(&v, "token_expires_ms"),
                    field(&v, "token")
                )
            });
            Ok(0)
        }
        HostCmd::Token { name, ttl } => {
            let v = c.post(
                &format!("/v1/hosts/{}/token", enc(&name)),
                &json!({ "token_ttl_s": ttl }),
            )?;
            out.emit(&v, || {
                format!(
                    "host {name} is pending enrolment\n\
                     one-time enrolment token (shown once, keep it secret; expires {}):\n{}\n",
                    time_field(&v, "token_expires_ms"),
                    field(&v, "token")
                )
            });
            Ok(0)
        }
        HostCmd::List => {
            let mut all = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut q = vec![("limit", "1000".to_owned())];
                if let Some(a) = &after {
                    q.push(("after", a.clone()));
                }
                let v = c.json(c.request(Method::GET, "/v1/hosts").query(&q))?;
                if let Some(a) = v.get("hosts").and_then(Value::as_array) {
                    all.extend(a.iter().cloned());
                }
                match v.get("next").and_then(Value::as_str) {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            let v = json!({ "hosts": all });
            out.emit(&v, || {
                table(
                    &["NAME", "HOST GROUP", "STATE", "CHANGED (UTC)"],
                    &host_rows(&v),
                )
            });
            Ok(0)
        }
        HostCmd::Show { name } => {
            let v = c.get(&format!("/v1/hosts/{}", enc(&name)))?;
            out.emit(&v, || {
                let h = v.get("host").cloned().unwrap_or(Value::Null);
                format!(
                    "name         {}\nhost group   {}\nstate        {}\ncert serial  {}\naddresses    {}\n",
                    field(&h, "name"),
                    field(&h, "host_group"),
                    field(&h, "state"),
                    field(&h, "cert_serial"),
                    addresses(&h),
                )
            });
            Ok(0)
        }
        HostCmd::Revoke { name } => {
            let v = c.post(&format!("/v1/hosts/{}/revoke", enc(&name)), &json!({}))?;
            out.emit(&v, || format!("revoked host {name}\n"));
            Ok(0)
        }
        HostCmd::Addresses {
            name,
            set,
            add,
            remove,
        } => {
            let path = format!("/v1/hosts/{}", enc(&name));
            let v = if set.is_none() && add.is_empty() && remove.is_empty() {
                c.get(&path)?
            } else {
                let mut now: Vec<String> = match set {
                    Some(s) => s,
                    None => {
                        let v = c.get(&path)?;
                        v.pointer("/host/addresses")
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .map(String::from)
                                    .collect()
                            })
                            .unwrap_or_default()
                    }
                };
                now.retain(|a| !remove.contains(a));
                now.extend(add);
                c.json(
                    c.request(Method::PUT, &format!("{path}/addresses"))
                        .json(&json!({ "addresses": now })),
                )?
            };
            out.emit(&v, || {
                let h = v.get("host").cloned().unwrap_or(Value::Null);
                format!("host {name}: addresses {}\n", addresses(&h))
            });
            Ok(0)
        }
        HostCmd::Group(HostGroupCmd::Ls) => {
            let v = c.get("/v1/host-groups")?;
            out.emit(&v, || {
                let rows: Vec<Vec<String>> = v
                    .get("host_groups")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|g| vec![field(g, "name"), field(g, "mode"), field(g, "hosts")])
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["NAME", "MODE", "HOSTS"], &rows)
            });
            Ok(0)
        }
        HostCmd::Group(HostGroupCmd::Set { name, mode }) => {
            let m = match mode {
                ModeArg::Enforce => "enforce",
                ModeArg::Permissive => "permissive",
                ModeArg::Disabled => "disabled",
            };
            let v = c.json(
                c.request(Method::PUT, &format!("/v1/host-groups/{}", enc(&name)))
                    .json(&json!({ "mode": m })),
            )?;
            out.emit(&v, || format!("host group {name}: mode {m}\n"));
            Ok(0)
        }
        HostCmd::Group(HostGroupCmd::Rm { name }) => {
            let v =
                c.json(c.request(Method::DELETE, &format!("/v1/host-groups/{}", enc(&name))))?;
            out.emit(&json!({ "deleted": name, "result": v }), || {
                format!("deleted host group {name}\n")
            });
            Ok(0)
        }
    }
}

/// A `*_ms` field as a UTC time, or `-`.
fn time_field(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_i64)
        .map_or_else(|| "-".into(), crate::time::fmt_ms)
}

/// `trustbind admin ls|revoke|renew|token` over the admin API.
fn admin(a: AdminCmd, c: &Client, cfg: &config::Resolved, out: &Out) -> Result<u8> {
    match a {
        AdminCmd::Enrol { .. } => Err(CliError::config("admin enrol needs no admin connection")),
        AdminCmd::Ls => {
            let v = c.get("/v1/admins")?;
            out.emit(&v, || {
                let rows: Vec<Vec<String>> = v
                    .get("admins")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        vec![
                            field(a, "serial"),
                            field(a, "name"),
                            field(a, "role"),
                            time_field(a, "expires_ms"),
                            a.get("revoked_ms").and_then(Value::as_i64).map_or_else(
                                || "-".into(),
                                |t| {
                                    format!(
                                        "{} by {}",
                                        crate::time::fmt_ms(t),
                                        field(a, "revoked_by")
                                    )
                                },
                            ),
                        ]
                    })
                    .collect();
                table(
                    &["SERIAL", "NAME", "ROLE", "EXPIRES (UTC)", "REVOKED"],
                    &rows,
                )
            });
            Ok(0)
        }
        AdminCmd::Revoke { serial } => {
            let v = c.post(&format!("/v1/admins/{}/revoke", enc(&serial)), &json!({}))?;
            out.emit(&v, || {
                let a = v.get("admin").cloned().unwrap_or(Value::Null);
                format!(
                    "revoked admin certificate {} of {}\n",
                    field(&a, "serial"),
                    field(&a, "name")
                )
            });
            Ok(0)
        }
        AdminCmd::Renew => {
            let (key_pem, csr) = trustbind_api::pinned::key_and_csr("admin")
                .map_err(|e| CliError::config(e.to_string()))?;
            let v = c.post("/v1/admins/renew", &json!({ "csr_pem": csr }))?;
            let cert = v.get("cert_pem").and_then(Value::as_str).ok_or_else(|| {
                CliError::new(Exit::Server, "the appliance answered without a certificate")
            })?;
            let write = |p: &Path, data: &str, private: bool| {
                trustbind_api::pinned::write_atomic(p, data.as_bytes(), private)
                    .map_err(|e| CliError::io(format!("cannot write {}: {e}", p.display())))
            };
            write(&cfg.key, &key_pem, true)?;
            write(&cfg.cert, cert, false)?;
            out.emit(&v, || {
                let a = v.get("admin").cloned().unwrap_or(Value::Null);
                format!(
                    "renewed: certificate {} for {} ({}), valid until {}, written to {} and {}\n",
                    field(&a, "serial"),
                    field(&a, "name"),
                    field(&a, "role"),
                    time_field(&a, "expires_ms"),
                    cfg.cert.display(),
                    cfg.key.display()
                )
            });
            Ok(0)
        }
        AdminCmd::Token { name, role, ttl } => {
            let v = c.post(
                "/v1/admins/tokens",
                &json!({ "name": name, "role": role, "ttl_s": ttl }),
            )?;
            out.emit(&v, || {
                format!(
                    "one-time admin token for {name} ({role}), expires {} (shown once):\n{}\n\
                     on the admin's machine: trustbind admin enrol --appliance HOST --ca-fingerprint {} --token TOKEN\n",
                    time_field(&v, "expires_ms"),
                    field(&v, "token"),
                    field(&v, "ca_fingerprint"),
                )
            });
            Ok(0)
        }
    }
}

fn user(u: UserCmd, c: &Client, out: &Out) -> Result<u8> {
    let roles_of = |u: &Value| {
        u.get("roles")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    match u {
        UserCmd::Ls => {
            let users = crate::replay::list_all(c, "/v1/users", "users")?;
            let v = json!({ "users": users });
            out.emit(&v, || {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| vec![field(u, "name"), roles_of(u)])
                    .collect();
                table(&["NAME", "ROLES"], &rows)
            });
        }
        UserCmd::Show { name } => {
            let v = c.get(&format!("/v1/users/{}", enc(&name)))?;
            out.emit(&v, || {
                let u = v.get("user").cloned().unwrap_or(Value::Null);
                format!("name   {}\nroles  {}\n", field(&u, "name"), roles_of(&u))
            });
        }
        UserCmd::Set { name, roles } => {
            let v = c.json(
                c.request(Method::PUT, &format!("/v1/users/{}", enc(&name)))
                    .json(&json!({ "roles": roles })),
            )?;
            out.emit(&v, || {
                let u = v.get("user").cloned().unwrap_or(Value::Null);
                format!("{name}: roles [{}]\n", roles_of(&u))
            });
        }
        UserCmd::Rm { name } => {
            c.json(c.request(Method::DELETE, &format!("/v1/users/{}", enc(&name))))?;
            out.emit(&json!({ "deleted": name }), || {
                format!("deleted user {name}\n")
            });
        }
    }
    Ok(0)
}

/// One audit row as a text line.
fn audit_line(r: &Value) -> String {
    format!(
        "{:>6}  {}  {:<18} {:<22} {}",
        field(r, "seq"),
        r.get("at_ms")
            .and_then(Value::as_i64)
            .map_or_else(|| "-".into(), time::fmt_ms),
        field(r, "kind"),
        field(r, "actor"),
        field(r, "detail"),
    )
}

fn audit(a: AuditCmd, c: &Client, out: &Out) -> Result<u8> {
    match a {
        AuditCmd::Tail {
            lines,
            follow,
            interval_ms,
        } => {
            let lines = lines.clamp(1, trustbind_policy::wire::PAGE_MAX);
            let v = c.json(
                c.request(Method::GET, "/v1/audit")
                    .query(&[("limit", lines)]),
            )?;
            let print = |rows: &Value| {
                for r in rows.as_array().into_iter().flatten() {
                    if out.is_json() {
                        out.line(&r.to_string());
                    } else {
                        out.line(&audit_line(r));
                    }
                }
            };
            if !follow {
                if out.is_json() {
                    out.emit(&v, String::new);
                } else {
                    print(v.get("rows").unwrap_or(&Value::Null));
                }
                return Ok(0);
            }
            print(v.get("rows").unwrap_or(&Value::Null));
            let mut next = v.get("next").and_then(Value::as_i64).unwrap_or(0);
            loop {
                std::thread::sleep(std::time::Duration::from_millis(interval_ms));
                let v = c.json(c.request(Method::GET, "/v1/audit").query(&[
                    ("after", next),
                    ("limit", i64::from(trustbind_policy::wire::PAGE_MAX)),
                ]))?;
                print(v.get("rows").unwrap_or(&Value::Null));
                next = v.get("next").and_then(Value::as_i64).unwrap_or(next);
            }
        }
        AuditCmd::Export {
            since,
            kind,
            out: file,
        } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(s) = &since {
                q.push((
                    "since_ms",
                    time::parse_since(s, time::now_ms())?.to_string(),
                ));
            }
            if let Some(k) = &kind {
                q.push(("kind", k.clone()));
            }
            let mut resp = c.send(c.request(Method::GET, "/v1/audit/export").query(&q))?;
            let n = match &file {
                Some(path) => {
                    let f = std::fs::File::create(path).map_err(|e| io_err("create", path, &e))?;
                    let mut w = CountingWriter {
                        inner: std::io::BufWriter::new(f),
                        lines: 0,
                    };
                    resp.copy_to(&mut w).map_err(|e| {
                        CliError::new(Exit::Connect, format!("the audit export broke off: {e}"))
                    })?;
                    std::io::Write::flush(&mut w.inner).map_err(|e| io_err("write", path, &e))?;
                    w.lines
                }
                None => {
                    let mut w = CountingWriter {
                        inner: std::io::stdout().lock(),
                        lines: 0,
                    };
                    resp.copy_to(&mut w).map_err(|e| {
                        CliError::new(Exit::Connect, format!("the audit export broke off: {e}"))
                    })?;
                    w.lines
                }
            };
            if let Some(path) = &file {
                out.note(&format!("exported {n} audit row(s) to {}", path.display()));
            }
            Ok(0)
        }
        AuditCmd::Verify { seal_key, exported } => {
            let vk = seal_key.as_deref().map(read_seal_key).transpose()?;
            let mut v = c.get("/v1/audit/verify")?;
            let mut ok = v.get("ok").and_then(Value::as_bool) == Some(true);
            // The appliance checked the checkpoint with its CA; check it
            // again with ours.
            if let Some(cp) = v.get("checkpoint").filter(|c| !c.is_null()) {
                let checked =
                    serde_json::from_value::<trustbind_policy::audit::Checkpoint>(cp.clone())
                        .map_err(|e| e.to_string())
                        .and_then(|cp| {
                            let ca = read_ca(c.ca_path())?;
                            trustbind_policy::audit::verify_checkpoint(&cp, &ca)
                        });
                if let Err(e) = checked {
                    ok = false;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("ok".into(), Value::Bool(false));
                        o.insert("error".into(), Value::String(format!("checkpoint: {e}")));
                    }
                }
            }
            let seals = match (&vk, ok) {
                (Some(vk), true) => Some(live_seals(c, &v, vk, &exported)?),
                _ => None,
            };
            if let (Some(seals), Some(o)) = (&seals, v.as_object_mut()) {
                match seals {
                    Ok(rep) => {
                        o.insert("seals".into(), serde_json::json!(rep));
                    }
                    Err(e) => {
                        ok = false;
                        o.insert("ok".into(), Value::Bool(false));
                        o.insert("error".into(), Value::String(format!("seals: {e}")));
                    }
                }
            }
            out.emit(&v, || {
                if ok {
                    let pruned = match v.get("pruned").filter(|p| !p.is_null()) {
                        Some(p) => format!(
                            "pruned: rows 1..={} ({} rows, {} checkpoints; the newest signed by the appliance's key, rows in export/{})\n",
                            field(p, "upto_seq"),
                            field(p, "rows"),
                            field(p, "checkpoints"),
                            field(p, "last_export_file"),
                        ),
                        None => String::new(),
                    };
                    let seals = match &seals {
                        Some(Ok(rep)) => format!("{}\n", rep.summary()),
                        _ => String::new(),
                    };
                    format!(
                        "{pruned}audit chain intact: {} rows verified (head {})\n{seals}",
                        field(&v, "rows"),
                        field(&v, "head")
                    )
                } else {
                    format!("audit chain BROKEN: {}\n", field(&v, "error"))
                }
            });
            Ok(if ok { 0 } else { Exit::CheckFailed as u8 })
        }
        AuditCmd::Seal => {
            let v = c.post("/v1/audit/seal", &json!({}))?;
            let seal = v.get("seal").cloned().unwrap_or(Value::Null);
            out.emit(&v, || {
                format!(
                    "sealed: epoch {}, rows up to seq {}\n",
                    field(&seal, "epoch"),
                    field(&seal, "seq")
                )
            });
            Ok(0)
        }
        AuditCmd::SealSetup {
            out: file,
            interval_secs,
        } => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            // Opened first: a key that cannot be written is never asked for.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&file)
                .map_err(|e| io_err("create", &file, &e))?;
            let v = c.post(
                "/v1/audit/seal/setup",
                &json!({ "interval_secs": interval_secs }),
            );
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    drop(f);
                    let _ = std::fs::remove_file(&file);
                    return Err(e);
                }
            };
            let vk: VerifyKey =
                serde_json::from_value(v.get("verify_key").cloned().unwrap_or(Value::Null))
                    .map_err(|e| CliError::new(Exit::Server, format!("verification key: {e}")))?;
            let text = zeroize::Zeroizing::new(
                serde_json::to_string_pretty(&vk)
                    .map_err(|e| CliError::new(Exit::Server, e.to_string()))?,
            );
            f.write_all(text.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("write", &file, &e))?;
            let summary =
                json!({ "key_id": vk.key_id, "interval_ms": vk.interval_ms, "file": file });
            out.emit(&summary, || {
                format!(
                    "audit sealing set up (key id {}); verification key in {}: store it OFFLINE, the appliance does not keep it and cannot show it again\n",
                    vk.key_id,
                    file.display()
                )
            });
            Ok(0)
        }
        AuditCmd::VerifyExport { .. } => Ok(0),
    }
}

/// The first certificate of a PEM file.
fn read_ca(path: &Path) -> std::result::Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_file(path)
        .map_err(|e| format!("{}: not a PEM certificate ({e})", path.display()))
}

/// Reads a seal verification key file.
fn read_seal_key(path: &Path) -> Result<VerifyKey> {
    VerifyKey::read(path).map_err(|e| CliError::new(Exit::Config, e))
}

/// The seals of the rows the appliance keeps (`audit verify --seal-key`):
/// every row read (`/v1/audit/export`), the first one chaining from the
/// newest checkpoint `v` names (or row 1 from the genesis), every seal
/// checked with `vk`, and the last seal no older than two intervals.
fn live_seals(
    c: &Client,
    v: &Value,
    vk: &VerifyKey,
    exported: &[PathBuf],
) -> Result<std::result::Result<SealReport, String>> {
    let mut resp = c.send(c.request(Method::GET, "/v1/audit/export"))?;
    let mut body = Vec::new();
    resp.copy_to(&mut body)
        .map_err(|e| CliError::new(Exit::Connect, format!("the audit export broke off: {e}")))?;
    let text = String::from_utf8_lossy(&body);
    let first = text
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<trustbind_policy::audit::AuditRow>(l).ok());
    let from = v
        .get("checkpoint")
        .and_then(|cp| cp.get("upto_hash"))
        .and_then(Value::as_str)
        .unwrap_or(trustbind_policy::audit::GENESIS);
    if let Some(r) = &first {
        if r.prev_hash != from {
            return Ok(Err(format!(
                "row {}, the first kept, does not chain from the newest checkpoint",
                r.seq
            )));
        }
    }
    let mut verifier = trustbind_policy::audit_seal::SealVerifier::new(vk)
        .map_err(|e| CliError::new(Exit::Config, e))?;
    if !exported.is_empty() {
        match continues_export(exported, c.ca_path(), vk, first.as_ref())? {
            Ok(next_epoch) => verifier = verifier.max_first_epoch(next_epoch),
            Err(e) => return Ok(Err(e)),
        }
    }
    let rep =
        trustbind_policy::audit_seal::verify_seals_with(text.lines().map(str::to_owned), verifier);
    Ok(rep.and_then(|rep| match rep.stale(time::now_ms(), vk.interval_ms) {
        Some(age) => Err(format!(
            "the last seal (epoch {}, row {}) is {} s old and seals are made every {} s: the log was cut after it, or sealing stopped",
            rep.last_epoch,
            rep.sealed_upto_seq,
            age / 1000,
            vk.interval_ms / 1000
        )),
        None => Ok(rep),
    }))
}

/// `audit verify --seal-key --exported`: the export files verify (chain,
/// checkpoints against the CA, seals) and the appliance's first kept row
/// `first` continues them (no row missing, the same hash before it).
/// Returns the epoch the first kept seal may have at the latest.
fn continues_export(
    files: &[PathBuf],
    ca: &Path,
    vk: &VerifyKey,
    first: Option<&trustbind_policy::audit::AuditRow>,
) -> Result<std::result::Result<u64, String>> {
    let ca = read_ca(ca).map_err(|e| CliError::new(Exit::Config, e))?;
    let lines = trustbind_policy::audit::read_export_files(files)
        .map_err(|(f, e)| io_err("read", &f, &e))?;
    if let Err(e) = trustbind_policy::audit::verify_export(lines.clone(), Some(&ca)) {
        return Ok(Err(format!("export files: {e}")));
    }
    let rep = match trustbind_policy::audit_seal::verify_export_seals(lines.clone(), vk) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("export files: {e}"))),
    };
    if let Some(first) = first {
        if first.seq > rep.last_seq.saturating_add(1) {
            return Ok(Err(format!(
                "rows {}..={} are neither in the export files nor on the appliance",
                rep.last_seq.saturating_add(1),
                first.seq.saturating_sub(1)
            )));
        }
        let before = lines.iter().rev().find_map(|l| {
            match serde_json::from_str::<trustbind_policy::audit::ExportLine>(l) {
                Ok(trustbind_policy::audit::ExportLine::Row(r)) if r.seq == first.seq - 1 => {
                    Some(r.hash)
                }
                _ => None,
            }
        });
        if first.seq > 1 && before.as_deref() != Some(first.prev_hash.as_str()) {
            return Ok(Err(format!(
                "row {}, the first kept, does not chain from row {} of the export files",
                first.seq,
                first.seq - 1
            )));
        }
    }
    Ok(Ok(rep.last_epoch.saturating_add(1)))
}

/// `trustbind audit verify-export`.
fn audit_verify_export(
    files: &[PathBuf],
    ca: &Path,
    seal_key: Option<&Path>,
    out: &Out,
) -> Result<u8> {
    let ca = read_ca(ca).map_err(|e| CliError::new(Exit::Config, e))?;
    let vk = seal_key.map(read_seal_key).transpose()?;
    let lines = trustbind_policy::audit::read_export_files(files)
        .map_err(|(f, e)| io_err("read", &f, &e))?;
    let r = trustbind_policy::audit::verify_export(lines.clone(), Some(&ca));
    let seals = match (&vk, &r) {
        (Some(vk), Ok(_)) => Some(trustbind_policy::audit_seal::verify_export_seals(lines, vk)),
        _ => None,
    };
    let r = match (r, &seals) {
        (Ok(_), Some(Err(e))) => Err(format!("seals: {e}")),
        (r, _) => r,
    };
    let v = match (&r, &seals) {
        (Ok(rep), Some(Ok(s))) => serde_json::json!({ "ok": true, "report": rep, "seals": s }),
        (Ok(rep), _) => serde_json::json!({ "ok": true, "report": rep }),
        (Err(e), _) => serde_json::json!({ "ok": false, "error": e }),
    };
    out.emit(&v, || match (&r, &seals) {
        (Ok(rep), s) => format!(
            "export intact: rows {}..={} ({} rows), {} signed checkpoints, the last up to row {}\n{}",
            rep.first_seq,
            rep.last_seq,
            rep.rows,
            rep.checkpoints,
            rep.checkpointed_upto,
            match s {
                Some(Ok(s)) => format!("{}\n", s.summary()),
                _ => String::new(),
            }
        ),
        (Err(e), _) => format!("export BROKEN: {e}\n"),
    });
    Ok(if r.is_ok() {
        0
    } else {
        Exit::CheckFailed as u8
    })
}

/// Counts the lines written through it.
struct CountingWriter<W> {
    inner: W,
    lines: u64,
}

impl<W: std::io::Write> std::io::Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.lines += buf
            .get(..n)
            .map_or(0, |b| b.iter().filter(|&&x| x == b'\n').count() as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_rows_show_ends_bytes_and_an_idle_end() {
        let v = json!({"channels": [
            {"id": 1, "key_id": "ab", "src_host": "a", "dst_host": "b", "tuple": "t",
             "opened_ms": 0, "closed_ms": 1000,
             "connect": {"closed_ms": 1000, "bytes_sent": 12, "bytes_received": 3,
                         "duration_ms": 1, "reason": "closed"},
             "accept": {"closed_ms": 1000, "bytes_sent": 3, "bytes_received": 13,
                        "duration_ms": 1, "reason": "idle"}},
            {"id": 2, "key_id": "cd", "src_host": "a", "dst_host": "b", "tuple": "u",
             "opened_ms": 0, "closed_ms": null, "connect": null, "accept": null}
        ]});
        let rows = channel_rows(&v);
        assert_eq!(rows[0][2], "a -> b");
        assert_eq!(rows[0][5], "1970-01-01 00:00:01 (idle, accept end)");
        assert_eq!(rows[0][6], "12 / 3");
        assert_eq!((rows[1][5].as_str(), rows[1][6].as_str()), ("-", "- / -"));
    }
}
