//! `trustbind explain`: a recorded decision, or a request decided now,
//! explained by the appliance (`GET /v1/explain/{seq}`, `POST /v1/explain`).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::cli::ExplainArgs;
use crate::client::Client;
use crate::error::Result;
use crate::out::{field, Out};
use crate::time;

/// A SHA-256 as given, or the SHA-256 of the file at that path.
fn program_arg(s: &str) -> Result<(String, Option<String>)> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok((s.to_ascii_lowercase(), None));
    }
    let h = crate::hashing::hash_file(Path::new(s))?;
    Ok((h.sha256, Some(s.to_owned())))
}

/// Runs `trustbind explain`.
pub fn run(x: ExplainArgs, c: &Client, out: &Out) -> Result<u8> {
    let v = match x.seq {
        Some(seq) => c.get(&format!("/v1/explain/{seq}"))?,
        None => {
            // clap requires these without a sequence number.
            let text = |o: Option<String>| o.unwrap_or_default();
            let (sha, path) = program_arg(&text(x.program))?;
            let peer = x.peer.as_deref().map(program_arg).transpose()?;
            let body = json!({
                "host": text(x.host),
                "user": text(x.user),
                "program": sha,
                "action": text(x.action),
                "resource": x.resource,
                "path": path,
                "peer": peer.map(|p| p.0),
            });
            c.post("/v1/explain", &body)?
        }
    };
    out.emit(&v, || render(&v));
    Ok(0)
}

fn list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn or_none(v: Vec<String>) -> String {
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

/// `deny`, `allow`, `allow (obligations: k=v, …)`, `allow (would deny)`.
fn verdict(v: &Value, would_deny: bool) -> String {
    let name = field(v, "verdict");
    let mut s = match v.get("obligations").and_then(Value::as_object) {
        Some(o) if !o.is_empty() => {
            let kv: Vec<String> = o
                .iter()
                .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or_default()))
                .collect();
            format!("allow ({})", kv.join(", "))
        }
        _ if name == "allow_with_conditions" => "allow".to_owned(),
        _ => name,
    };
    if would_deny {
        s.push_str(" (permissive mode: would deny)");
    }
    s
}

/// The request line: host, user, action, program, resource.
fn request_line(r: &Value) -> String {
    let subject = r.get("subject").cloned().unwrap_or(Value::Null);
    let program = r.get("program").cloned().unwrap_or(Value::Null);
    let target = r.get("target").cloned().unwrap_or(Value::Null);
    let resource = match target.get("kind").and_then(Value::as_str) {
        Some("file") => format!(" on {}", field(&target, "path")),
        Some("net") => format!(
            " to {}:{}",
            field(&target, "dst_addr"),
            field(&target, "dst_port")
        ),
        _ => String::new(),
    };
    let path = field(&program, "path");
    format!(
        "host {}, user {}, {} {}{}{resource}",
        field(r, "host"),
        field(&subject, "user"),
        field(r, "action"),
        field(&program, "sha256"),
        if path.is_empty() || path == "-" {
            String::new()
        } else {
            format!(" ({path})")
        },
    )
}

/// The lines shared by a recorded diagnosis and a current explanation.
fn facts(s: &mut String, d: &Value) {
    let _ = writeln!(
        s,
        "  host group {}; user's roles: {}; program's groups: {}",
        field(d, "host_group"),
        or_none(list(d.get("roles"))),
        or_none(list(d.get("groups"))),
    );
    let missing = list(d.get("missing"));
    if !missing.is_empty() {
        let _ = writeln!(s, "  missing:");
        for m in missing {
            let _ = writeln!(s, "    - {m}");
        }
    }
    for e in list(d.get("errors")) {
        let _ = writeln!(s, "  evaluation error: {e}");
    }
}

/// The text form of an explain answer.
pub fn render(v: &Value) -> String {
    let mut s = String::new();
    let req = v.get("request").cloned().unwrap_or(Value::Null);
    match v.get("seq").and_then(Value::as_i64) {
        Some(seq) => {
            let at = v
                .get("at_ms")
                .and_then(Value::as_i64)
                .map_or_else(|| "-".to_owned(), time::fmt_ms);
            let _ = writeln!(s, "audit row {seq} ({at} UTC): {}", request_line(&req));
            let rec = v.get("recorded").cloned().unwrap_or(Value::Null);
            let would = rec
                .get("would_deny")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let verdict_v = rec.get("verdict").cloned().unwrap_or(Value::Null);
            let denied = would || field(&verdict_v, "verdict") == "deny";
            let _ = writeln!(
                s,
                "recorded (generation {}): {}",
                field(&rec, "generation"),
                verdict(&verdict_v, would)
            );
            let reasons = list(rec.get("reasons"));
            let _ = writeln!(
                s,
                "  {}",
                match (denied, reasons.is_empty()) {
                    (true, true) =>
                        "no policy forbade it and none permitted it: default deny".to_owned(),
                    (true, false) => format!("forbidden by: {}", reasons.join(", ")),
                    (false, true) =>
                        "allowed without a determining policy (host group disabled)".to_owned(),
                    (false, false) => format!("permitted by: {}", reasons.join(", ")),
                }
            );
            let alerts = list(rec.get("alerts"));
            if !alerts.is_empty() {
                let _ = writeln!(s, "  alerts: {}", alerts.join(", "));
            }
            match rec.get("explain").filter(|d| !d.is_null()) {
                Some(d) => facts(&mut s, d),
                None if denied => {
                    let _ = writeln!(s, "  (this row carries no diagnosis: it predates them)");
                }
                None => {}
            }
        }
        None => {
            let _ = writeln!(s, "request: {}", request_line(&req));
        }
    }
    match v.get("now").filter(|n| !n.is_null()) {
        Some(now) => {
            let would = now
                .get("would_deny")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let _ = writeln!(
                s,
                "now (policy version {}, generation {}, mode {}): {}",
                field(now, "policy_version"),
                field(now, "generation"),
                field(now, "mode"),
                verdict(now.get("verdict").unwrap_or(&Value::Null), would),
            );
            let determining = now
                .get("determining")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if determining.is_empty() {
                let _ = writeln!(
                    s,
                    "  Cedar {}: no determining policy{}",
                    field(now, "decision"),
                    if field(now, "decision") == "deny" {
                        " (default deny)"
                    } else {
                        ""
                    }
                );
            }
            for p in determining {
                let id = field(&p, "id");
                let name = field(&p, "name");
                let _ = writeln!(
                    s,
                    "  {} by `{name}`{}",
                    if field(&p, "effect") == "forbid" {
                        "forbidden"
                    } else {
                        "permitted"
                    },
                    if id == name {
                        String::new()
                    } else {
                        format!(" ({id})")
                    }
                );
            }
            let alerts = list(now.get("alerts"));
            if !alerts.is_empty() {
                let _ = writeln!(s, "  alerts: {}", alerts.join(", "));
            }
            facts(&mut s, now);
        }
        None => {
            let _ = writeln!(s, "now: cannot decide it again: {}", field(v, "now_error"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_default_deny_and_the_current_answer() {
        let v = json!({
            "seq": 7, "at_ms": 0,
            "request": {"host": "web1", "action": "exec", "subject": {"user": "bob"},
                        "program": {"sha256": "99", "path": "/tmp/x"}, "target": {"kind": "exec"}},
            "recorded": {"generation": 3, "verdict": {"verdict": "deny"}, "would_deny": false,
                         "reasons": [], "alerts": [],
                         "explain": {"host_group": "web", "roles": [], "groups": [],
                                     "missing": ["the program is in no reference group"]}},
            "now": {"policy_version": 1, "generation": 4, "mode": "enforce", "decision": "deny",
                    "verdict": {"verdict": "deny"}, "would_deny": false, "determining": [],
                    "alerts": [], "host_group": "web", "roles": [], "groups": [],
                    "missing": ["the program is in no reference group"], "errors": []},
            "now_error": null
        });
        let t = render(&v);
        assert!(
            t.starts_with(
                "audit row 7 (1970-01-01 00:00:00 UTC): host web1, user bob, exec 99 (/tmp/x)\n"
            ),
            "{t}"
        );
        assert!(t.contains("recorded (generation 3): deny\n  no policy forbade it and none permitted it: default deny\n"), "{t}");
        assert!(
            t.contains("  missing:\n    - the program is in no reference group\n"),
            "{t}"
        );
        assert!(t.contains("now (policy version 1, generation 4, mode enforce): deny\n  Cedar deny: no determining policy (default deny)\n"), "{t}");
    }

    #[test]
    fn a_forbid_now_names_the_policy_and_its_alert() {
        let v = json!({
            "request": {"host": "web1", "action": "exec", "subject": {"user": "bob"},
                        "program": {"sha256": "22", "path": ""}, "target": {"kind": "exec"}},
            "now": {"policy_version": 1, "generation": 4, "mode": "enforce", "decision": "deny",
                    "verdict": {"verdict": "deny"}, "would_deny": false,
                    "determining": [{"id": "policy1", "name": "root-tools-only-for-admins", "effect": "forbid"}],
                    "alerts": ["soc"], "host_group": "web", "roles": [], "groups": ["root-tools", "system"],
                    "missing": [], "errors": []}
        });
        let t = render(&v);
        assert_eq!(
            t,
            "request: host web1, user bob, exec 22\n\
             now (policy version 1, generation 4, mode enforce): deny\n  \
             forbidden by `root-tools-only-for-admins` (policy1)\n  \
             alerts: soc\n  \
             host group web; user's roles: none; program's groups: root-tools, system\n"
        );
    }
}
