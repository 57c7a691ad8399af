//! Wire messages <-> the appliance's own types, with strict validation.
//!
//! Every refusal names the field and the index in the batch, e.g.
//! `requests[3].program.sha256: expected 32 bytes, got 31`.

use std::net::IpAddr;

use tonic::Status;

use super::pb;
use super::service::Answer;
use crate::channels::{ChannelKey, ChannelTerms, Direction, Role};
use crate::policy::Verdict;
use crate::request::{Action, FiveTuple, Program, Proto, QualifyRequest, Subject, Target};
use crate::store::{hex, AgentRecord};

/// Longest path (program or file) accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest user name accepted, in bytes.
pub const MAX_USER: usize = 256;
/// Longest address (IP text or UNIX socket path) accepted, in bytes.
pub const MAX_ADDR: usize = 108;
/// Most ancestry entries accepted per request.
pub const MAX_ANCESTRY: usize = 16;
/// Longest report id accepted, in bytes.
pub const MAX_REPORT_ID: usize = 128;
/// Longest report `what` accepted, in bytes.
pub const MAX_REPORT_WHAT: usize = 64;
/// Longest report detail accepted, in bytes.
pub const MAX_REPORT_DETAIL: usize = 64 * 1024;

fn bad(field: String, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

fn digest(field: String, bytes: &[u8], len: usize) -> Result<String, Status> {
    if bytes.len() == len {
        Ok(hex(bytes))
    } else {
        Err(bad(
            field,
            format_args!("expected {len} bytes, got {}", bytes.len()),
        ))
    }
}

fn text(field: String, s: &str, max: usize, allow_empty: bool) -> Result<String, Status> {
    if s.is_empty() && !allow_empty {
        return Err(bad(field, "must not be empty"));
    }
    if s.len() > max {
        return Err(bad(field, format_args!("{} bytes, at most {max}", s.len())));
    }
    if s.contains('\0') {
        return Err(bad(field, "contains a NUL byte"));
    }
    Ok(s.to_owned())
}

fn action(at: &str, v: i32) -> Result<Action, Status> {
    let a = pb::Action::try_from(v)
        .map_err(|_| bad(format!("{at}.action"), format_args!("unknown action {v}")))?;
    Ok(match a {
        pb::Action::Unspecified => return Err(bad(format!("{at}.action"), "not set")),
        pb::Action::Exec => Action::Exec,
        pb::Action::OpenRead => Action::OpenRead,
        pb::Action::OpenWrite => Action::OpenWrite,
        pb::Action::Delete => Action::Delete,
        pb::Action::Rename => Action::Rename,
        pb::Action::Connect => Action::Connect,
        pb::Action::Accept => Action::Accept,
        pb::Action::IpcConnect => Action::IpcConnect,
    })
}

fn subject(at: &str, s: Option<&pb::Subject>) -> Result<Subject, Status> {
    let s = s.ok_or_else(|| bad(format!("{at}.subject"), "missing"))?;
    if s.ancestry.len() > MAX_ANCESTRY {
        return Err(bad(
            format!("{at}.subject.ancestry"),
            format_args!("{} entries, at most {MAX_ANCESTRY}", s.ancestry.len()),
        ));
    }
    let ancestry = s
        .ancestry
        .iter()
        .enumerate()
        .map(|(j, h)| digest(format!("{at}.subject.ancestry[{j}]"), h, 32))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Subject {
        user: text(format!("{at}.subject.user"), &s.user, MAX_USER, false)?,
        uid: s.uid,
        euid: s.euid,
        gid: s.gid,
        loginuid: s.loginuid,
        session: s.session,
        pid: s.pid,
        ancestry,
    })
}

/// The program. For every action but `exec` the PEM knows only the
/// SHA-256 (of the process's program, from its exec or `mm->exe_file`),
/// so an empty `sha1` (and `path`, `size` 0) is accepted there and kept
/// empty.
fn program(at: &str, action: Action, p: Option<&pb::Program>) -> Result<Program, Status> {
    program_field(at, "program", action, p)
}

/// Same for the field `which` (`program`, or `peer` of an ipc_connect).
fn program_field(
    at: &str,
    which: &str,
    action: Action,
    p: Option<&pb::Program>,
) -> Result<Program, Status> {
    let p = p.ok_or_else(|| bad(format!("{at}.{which}"), "missing"))?;
    let hash_only = action != Action::Exec;
    Ok(Program {
        sha256: digest(format!("{at}.{which}.sha256"), &p.sha256, 32)?,
        sha1: if hash_only && p.sha1.is_empty() {
            String::new()
        } else {
            digest(format!("{at}.{which}.sha1"), &p.sha1, 20)?
        },
        size: p.size,
        path: text(format!("{at}.{which}.path"), &p.path, MAX_PATH, true)?,
    })
}

fn port(field: String, p: u32) -> Result<u16, Status> {
    u16::try_from(p).map_err(|_| bad(field, format_args!("{p} is not a port (0..=65535)")))
}

fn net(at: &str, action: Action, n: &pb::NetTarget) -> Result<FiveTuple, Status> {
    let proto = match pb::Proto::try_from(n.proto) {
        Ok(pb::Proto::Tcp) => Proto::Tcp,
        Ok(pb::Proto::Unix) => Proto::Unix,
        Ok(pb::Proto::Unspecified) => return Err(bad(format!("{at}.net.proto"), "not set")),
        Err(_) => {
            return Err(bad(
                format!("{at}.net.proto"),
                format_args!("unknown protocol {}", n.proto),
            ))
        }
    };
    let want = if action == Action::IpcConnect {
        Proto::Unix
    } else {
        Proto::Tcp
    };
    if proto != want {
        return Err(bad(
            format!("{at}.net.proto"),
            format_args!("{} needs {}", action.as_str(), want.as_str()),
        ));
    }
    let src_addr = text(
        format!("{at}.net.src_addr"),
        &n.src_addr,
        MAX_ADDR,
        proto == Proto::Unix,
    )?;
    // A UNIX socket's name is its absolute path (or `@name`), which may be
    // longer than `sun_path` when it was bound by a relative name.
    let dst_max = if proto == Proto::Unix {
        MAX_PATH
    } else {
        MAX_ADDR
    };
    let dst_addr = text(format!("{at}.net.dst_addr"), &n.dst_addr, dst_max, false)?;
    let src_port = port(format!("{at}.net.src_port"), n.src_port)?;
    let dst_port = port(format!("{at}.net.dst_port"), n.dst_port)?;
    if proto == Proto::Tcp {
        for (f, a) in [("src_addr", &src_addr), ("dst_addr", &dst_addr)] {
            if a.parse::<IpAddr>().is_err() {
                return Err(bad(
                    format!("{at}.net.{f}"),
                    format_args!("`{a}` is not an IP address"),
                ));
            }
        }
    }
    if n.established && action != Action::Connect {
        return Err(bad(format!("{at}.net.established"), "only for connect"));
    }
    Ok(FiveTuple {
        proto,
        src_addr,
        src_port,
        dst_addr,
        dst_port,
        established: n.established,
    })
}

/// An absolute file path (`field`), at most [`MAX_PATH`] bytes.
fn abs_path(field: String, s: &str) -> Result<String, Status> {
    let p = text(field.clone(), s, MAX_PATH, false)?;
    if !p.starts_with('/') {
        return Err(bad(field, "not an absolute path"));
    }
    Ok(p)
}

/// The target of a file action: `to` for a rename and for a hard link
/// (`open_write` with `link`), the flags for `open_write` only.
fn file(at: &str, action: Action, f: &pb::FileTarget) -> Result<Target, Status> {
    let path = abs_path(format!("{at}.file.path"), &f.path)?;
    let write = action == Action::OpenWrite;
    for (set, name) in [
        (f.create, "create"),
        (f.truncate, "truncate"),
        (f.link, "link"),
    ] {
        if set && !write {
            return Err(bad(format!("{at}.file.{name}"), "only for open_write"));
        }
    }
    let wants_to = action == Action::Rename || f.link;
    let to = match (&f.to, wants_to) {
        (Some(to), true) => Some(abs_path(format!("{at}.file.to"), to)?),
        (None, true) => {
            return Err(bad(
                format!("{at}.file.to"),
                "missing (needed for rename and link)",
            ))
        }
        (Some(_), false) => {
            return Err(bad(
                format!("{at}.file.to"),
                "only for rename and open_write with link",
            ))
        }
        (None, false) => None,
    };
    Ok(Target::File {
        path,
        to,
        create: f.create,
        truncate: f.truncate,
        link: f.link,
    })
}

/// Longest package name accepted (`Program.package`), in bytes.
pub const MAX_PACKAGE: usize = 128;

/// The dpkg package the agent names for request `i`'s program path
/// (`requests[i].program.package`): `None` when empty; otherwise 1 to
/// [`MAX_PACKAGE`] bytes of `a-z 0-9 + . -` starting with a letter or
/// digit (Debian's package names), or INVALID_ARGUMENT naming the field.
pub fn package(i: usize, r: &pb::Request) -> Result<Option<String>, Status> {
    let Some(p) = r.program.as_ref().map(|p| p.package.as_str()) else {
        return Ok(None);
    };
    if p.is_empty() {
        return Ok(None);
    }
    let field = || format!("requests[{i}].program.package");
    if p.len() > MAX_PACKAGE {
        return Err(bad(
            field(),
            format_args!("{} bytes, at most {MAX_PACKAGE}", p.len()),
        ));
    }
    let ok_first = p
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok_first
        || !p
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+.-".contains(&b))
    {
        return Err(bad(field(), "not a Debian package name (a-z 0-9 + . -)"));
    }
    Ok(Some(p.to_owned()))
}

/// Checks one wire request (index `i` of the batch) and builds the
/// appliance's request for `host` at `at_ms`. Returns (agent's id, request).
pub fn request(
    i: usize,
    r: &pb::Request,
    host: &str,
    at_ms: i64,
) -> Result<(u64, QualifyRequest), Status> {
    let at = format!("requests[{i}]");
    let action = action(&at, r.action)?;
    let subject = subject(&at, r.subject.as_ref())?;
    let program = program(&at, action, r.program.as_ref())?;
    let target = match (action, r.target.as_ref()) {
        (Action::Exec, Some(pb::request::Target::Exec(e))) => Target::Exec {
            loader_direct: e.loader_direct,
        },
        (
            Action::OpenRead | Action::OpenWrite | Action::Delete | Action::Rename,
            Some(pb::request::Target::File(f)),
        ) => file(&at, action, f)?,
        (
            Action::Connect | Action::Accept | Action::IpcConnect,
            Some(pb::request::Target::Net(n)),
        ) => Target::Net(net(&at, action, n)?),
        (_, None) => return Err(bad(format!("{at}.target"), "missing")),
        (a, Some(_)) => {
            let want = match a {
                Action::Exec => "exec",
                Action::Connect | Action::Accept | Action::IpcConnect => "net",
                _ => "file",
            };
            return Err(bad(
                format!("{at}.target"),
                format_args!("{} needs a `{want}` target", a.as_str()),
            ));
        }
    };
    // The listener's program: required for ipc_connect, refused elsewhere.
    let peer = match (action, r.peer.as_ref()) {
        (Action::IpcConnect, p @ Some(_)) => Some(program_field(&at, "peer", action, p)?),
        (Action::IpcConnect, None) => {
            return Err(bad(
                format!("{at}.peer"),
                "missing (needed for ipc_connect)",
            ))
        }
        (_, Some(_)) => return Err(bad(format!("{at}.peer"), "only for ipc_connect")),
        (_, None) => None,
    };
    Ok((
        r.id,
        QualifyRequest {
            host: host.to_owned(),
            action,
            subject,
            program,
            target,
            at_ms,
            peer,
        },
    ))
}

/// A TCP port other than 0 (`field`).
fn service_port(field: String, p: u32) -> Result<u16, Status> {
    match port(field.clone(), p)? {
        0 => Err(bad(field, "0 is no service's port")),
        p => Ok(p),
    }
}

/// A channel keys v2 request's side as a connect or accept request of
/// `host` from `src` to `dst` (no peer): what the engine decides.
fn v2_half(
    host: &str,
    action: Action,
    s: Option<&pb::Subject>,
    p: Option<&pb::Program>,
    (src_addr, dst_addr): (&str, String),
    dst_port: u16,
    at_ms: i64,
) -> Result<QualifyRequest, Status> {
    Ok(QualifyRequest {
        host: host.to_owned(),
        action,
        subject: subject("request", s)?,
        program: program("request", action, p)?,
        target: Target::Net(FiveTuple {
            proto: Proto::Tcp,
            src_addr: src_addr.to_owned(),
            src_port: 0,
            dst_addr,
            dst_port,
            established: false,
        }),
        at_ms,
        peer: None,
    })
}

/// A `Listen` of `host` as the accept half it registers: its program on
/// `port` of any of its addresses, from anyone (`0.0.0.0`), no peer.
pub fn listen(r: &pb::ListenRequest, host: &str, at_ms: i64) -> Result<QualifyRequest, Status> {
    let port = service_port("request.port".into(), r.port)?;
    v2_half(
        host,
        Action::Accept,
        r.subject.as_ref(),
        r.program.as_ref(),
        ("0.0.0.0", "0.0.0.0".into()),
        port,
        at_ms,
    )
}

/// A `Grant` of `host` as the connect half it decides, before the SYN
/// (the client's address is the appliance's to fill in).
pub fn grant(r: &pb::GrantRequest, host: &str, at_ms: i64) -> Result<QualifyRequest, Status> {
    let port = service_port("request.port".into(), r.port)?;
    let server = text(
        "request.server_addr".into(),
        &r.server_addr,
        MAX_ADDR,
        false,
    )?;
    let Some(a) = crate::hostaddr::parse(&server) else {
        return Err(bad(
            "request.server_addr".into(),
            format_args!("`{server}` is not an IP address"),
        ));
    };
    v2_half(
        host,
        Action::Connect,
        r.subject.as_ref(),
        r.program.as_ref(),
        ("0.0.0.0", a.to_string()),
        port,
        at_ms,
    )
}

/// The `FileSets` push of the protected file sets.
pub fn file_sets(sets: &[crate::files::FileSet]) -> pb::push::Kind {
    pb::push::Kind::FileSets(pb::FileSets {
        module_order: Vec::new(),
        sets: sets
            .iter()
            .map(|s| pb::FileSet {
                name: s.name.clone(),
                paths: s.paths.clone(),
            })
            .collect(),
    })
}

/// The wire verdict of an answer.
pub fn verdict_name(v: &Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::AllowWithConditions { .. } => "allow_with_conditions",
        Verdict::Deny => "deny",
    }
}

/// The wire result for request `id`.
pub fn result(id: u64, a: &Answer) -> pb::Result {
    let (verdict, obligations) = match &a.outcome.verdict {
        Verdict::Allow => (pb::Verdict::Allow, Default::default()),
        Verdict::AllowWithConditions { obligations } => (
            pb::Verdict::AllowWithConditions,
            obligations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        Verdict::Deny => (pb::Verdict::Deny, Default::default()),
    };
    pb::Result {
        id,
        verdict: verdict.into(),
        obligations,
        reasons: a.outcome.reasons.clone(),
        generation: a.generation,
        cacheable: a.cacheable,
        would_deny: a.outcome.would_deny,
        channel_id: a.channel_id.unwrap_or(0),
        module_answer: Vec::new(),
        grant: None,
    }
}

/// The `ChannelKey` push for the side `role` of channel `channel_id`: the
/// connecting side sends client-to-server and receives server-to-client,
/// the accepting side the reverse. The returned message holds key bytes:
/// hand it to [`super::Hub::push`] and drop it.
pub fn channel_key_push(
    channel_id: u64,
    key: &ChannelKey,
    role: Role,
    terms: ChannelTerms,
) -> pb::push::Kind {
    let (tx, rx, role) = match role {
        Role::Connect => (
            key.material(Direction::ClientToServer),
            key.material(Direction::ServerToClient),
            pb::ChannelRole::Connect,
        ),
        Role::Accept => (
            key.material(Direction::ServerToClient),
            key.material(Direction::ClientToServer),
            pb::ChannelRole::Accept,
        ),
    };
    pb::push::Kind::ChannelKey(pb::ChannelKey {
        channel_id,
        key_id: key.key_id.clone(),
        key: key.key.to_vec(),
        tx_iv: tx.iv.to_vec(),
        tx_salt: tx.salt.to_vec(),
        rx_iv: rx.iv.to_vec(),
        rx_salt: rx.salt.to_vec(),
        role: role.into(),
        tls12: terms.tls12,
        idle_timeout_s: terms.idle_timeout_s,
        module_answer: Vec::new(),
    })
}

/// Checks one delivered audit record (index `i`).
pub fn record(i: usize, r: &pb::AuditRecord) -> Result<AgentRecord, Status> {
    let at = format!("records[{i}]");
    let id = text(format!("{at}.id"), &r.id, MAX_REPORT_ID, false)?;
    if r.what.is_empty()
        || r.what.len() > MAX_REPORT_WHAT
        || !r
            .what
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
    {
        return Err(bad(
            format!("{at}.what"),
            format_args!("must be 1 to {MAX_REPORT_WHAT} characters of a-z 0-9 _ ."),
        ));
    }
    if r.detail_json.len() > MAX_REPORT_DETAIL {
        return Err(bad(
            format!("{at}.detail_json"),
            format_args!("{} bytes, at most {MAX_REPORT_DETAIL}", r.detail_json.len()),
        ));
    }
    let detail: serde_json::Value = if r.detail_json.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(&r.detail_json)
            .map_err(|e| bad(format!("{at}.detail_json"), format_args!("not JSON ({e})")))?
    };
    if !detail.is_object() {
        return Err(bad(format!("{at}.detail_json"), "must be a JSON object"));
    }
    Ok(AgentRecord {
        id,
        host_at_ms: r.at_ms,
        what: r.what.clone(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(b: u8) -> pb::Program {
        pb::Program {
            sha256: vec![b; 32],
            sha1: Vec::new(),
            size: 0,
            path: String::new(),
            package: String::new(),
        }
    }

    fn ipc(path: &str, peer: Option<pb::Program>) -> pb::Request {
        pb::Request {
            id: 3,
            action: pb::Action::IpcConnect as i32,
            subject: Some(pb::Subject {
                user: "svc".into(),
                pid: 10,
                ..Default::default()
            }),
            program: Some(prog(0xaa)),
            target: Some(pb::request::Target::Net(pb::NetTarget {
                proto: pb::Proto::Unix as i32,
                src_addr: String::new(),
                src_port: 0,
                dst_addr: path.into(),
                dst_port: 0,
                established: false,
            })),
            peer,
            module_request: Vec::new(),
        }
    }

    fn refusal(r: &pb::Request) -> String {
        request(0, r, "h1", 1).unwrap_err().message().to_owned()
    }

    #[test]
    fn an_ipc_connect_carries_the_listeners_program() {
        let (id, q) = request(0, &ipc("/run/app.sock", Some(prog(0xbb))), "h1", 1).unwrap();
        assert_eq!(id, 3);
        assert_eq!(q.action, Action::IpcConnect);
        assert_eq!(q.program.sha256, "aa".repeat(32));
        let peer = q.peer.expect("peer");
        assert_eq!((peer.sha256, peer.sha1), ("bb".repeat(32), String::new()));
        let Target::Net(t) = q.target else {
            panic!("not a net target")
        };
        assert_eq!(
            (t.proto, t.dst_addr.as_str()),
            (Proto::Unix, "/run/app.sock")
        );
        // Abstract names and paths longer than sun_path are accepted.
        let long = format!("/{}", "d/".repeat(200));
        assert!(request(0, &ipc(&long, Some(prog(1))), "h1", 1).is_ok());
        assert!(request(0, &ipc("@x", Some(prog(1))), "h1", 1).is_ok());
    }

    #[test]
    fn the_peer_is_required_for_ipc_connect_and_refused_elsewhere() {
        assert_eq!(
            refusal(&ipc("/s", None)),
            "requests[0].peer: missing (needed for ipc_connect)"
        );
        assert_eq!(
            refusal(&ipc("/s", Some(pb::Program::default()))),
            "requests[0].peer.sha256: expected 32 bytes, got 0"
        );
        let mut tcp = ipc("10.0.0.2", Some(prog(1)));
        tcp.action = pb::Action::Connect as i32;
        if let Some(pb::request::Target::Net(n)) = &mut tcp.target {
            n.proto = pb::Proto::Tcp as i32;
            n.src_addr = "10.0.0.1".into();
        }
        assert_eq!(refusal(&tcp), "requests[0].peer: only for ipc_connect");
        tcp.peer = None;
        assert!(request(0, &tcp, "h1", 1).unwrap().1.peer.is_none());
    }
}
