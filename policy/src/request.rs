//! What an agent asks, in the appliance's own terms.
//!
//! The agent API (gRPC) decodes its messages into these types, the policy
//! engine turns them into Cedar requests, the audit log records them and the
//! replay (`trustbind policy test --replay-audit`) reads them back from the
//! audit rows. One type, one place: nothing else spells out a request.
//!
//! The host is never taken from the message: the agent API fills
//! [`QualifyRequest::host`] from the enrolled identity of the TLS peer.

use serde::{Deserialize, Serialize};

/// The action being qualified (the Cedar action of the same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A program is about to run.
    Exec,
    /// A file is opened for reading.
    OpenRead,
    /// A file is opened for writing.
    OpenWrite,
    /// A file is deleted.
    Delete,
    /// A file is renamed.
    Rename,
    /// The source side of a TCP connection (before the SYN).
    Connect,
    /// The target side of a TCP connection (after the handshake).
    Accept,
    /// A UNIX-domain socket connect (program pair on one host).
    IpcConnect,
}

impl Action {
    /// Every action, in schema order.
    pub const ALL: [Action; 8] = [
        Self::Exec,
        Self::OpenRead,
        Self::OpenWrite,
        Self::Delete,
        Self::Rename,
        Self::Connect,
        Self::Accept,
        Self::IpcConnect,
    ];

    /// The Cedar action id (`Trustbind::Action::"<id>"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::OpenRead => "open_read",
            Self::OpenWrite => "open_write",
            Self::Delete => "delete",
            Self::Rename => "rename",
            Self::Connect => "connect",
            Self::Accept => "accept",
            Self::IpcConnect => "ipc_connect",
        }
    }

    /// Parses a Cedar action id.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// A program instance as the PEM saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Program {
    /// SHA-256 of the file, 64 lower-case hex digits (the identity).
    pub sha256: String,
    /// SHA-1 of the file, 40 lower-case hex digits.
    pub sha1: String,
    /// File size in bytes.
    pub size: u64,
    /// Path as opened on the host (informational; never decides alone).
    pub path: String,
}

/// Who is acting on the host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subject {
    /// User name resolved by the agent on the host (`uid:<n>` when unknown).
    /// This is the Cedar principal `Trustbind::User::"<user>"`.
    pub user: String,
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Real gid.
    pub gid: u32,
    /// Audit login uid (`u32::MAX` when unset).
    pub loginuid: u32,
    /// Audit session id (`u32::MAX` when unset).
    pub session: u32,
    /// Process id on the host (audit only).
    pub pid: u32,
    /// SHA-256 of the parent programs, nearest first, bounded depth.
    pub ancestry: Vec<String>,
}

/// Transport of a network request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// A UNIX-domain stream socket.
    Unix,
}

impl Proto {
    /// The spelling used in `Service` ids (`host:port/proto`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// One side of a connection, as seen from the host that asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FiveTuple {
    /// Transport.
    pub proto: Proto,
    /// Source address (the connecting side), textual IP or socket path.
    pub src_addr: String,
    /// Source port (0 for UNIX sockets).
    pub src_port: u16,
    /// Destination address (the accepting side).
    pub dst_addr: String,
    /// Destination port (0 for UNIX sockets).
    pub dst_port: u16,
    /// `connect` only: asked again once the handshake is done, so `src` is
    /// the real client end (before the SYN the client port is 0 unless the
    /// program bound the socket). Only such a connect half is paired with
    /// the server's accept. Not part of the connection's identity: the
    /// correlator ignores it when matching halves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub established: bool,
}

/// What the action applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// `exec`: the program itself is the resource.
    Exec {
        /// The program is an ELF loader run as the program itself (`ld.so
        /// ./prog`): what it then runs is never asked about.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        loader_direct: bool,
    },
    /// File actions: the path (for `rename`, the new path in `to`).
    File {
        /// Absolute path in the host's initial mount namespace.
        path: String,
        /// The new path: `rename`'s, or a hard link's new name
        /// (`open_write` with `link`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
        /// `open_write` only: the name did not exist (a create in a
        /// protected directory: `O_CREAT`, `mkdir`, `mknod`, `symlink`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        create: bool,
        /// `open_write` only: a truncate (`O_TRUNC`, `truncate(2)`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncate: bool,
        /// `open_write` only: a new hard link to `path`, named `to`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        link: bool,
    },
    /// `connect`, `accept`, `ipc_connect`.
    Net(FiveTuple),
}

impl Target {
    /// A file target with no flags: `path`, and `to` for a rename.
    pub fn file(path: impl Into<String>, to: Option<String>) -> Self {
        Self::File {
            path: path.into(),
            to,
            create: false,
            truncate: false,
            link: false,
        }
    }
}

/// One request from one enrolled host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QualifyRequest {
    /// Enrolled host name, from the TLS peer certificate.
    pub host: String,
    /// The action.
    pub action: Action,
    /// Who.
    pub subject: Subject,
    /// The program doing the action (for `exec`, the program to run).
    pub program: Program,
    /// What it applies to.
    pub target: Target,
    /// Appliance time of the request, milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `ipc_connect` only: the program of the process listening on the
    /// UNIX socket (same host), known by its SHA-256. Policy sees it as
    /// `context.peer_program` (and `context.peer_host`, this host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<Program>,
}

impl QualifyRequest {
    /// `user` (uid 1, no login session or ancestry) on `host` runs the
    /// program `sha256` found at `path`, at time 0: a plain exec request,
    /// for tests and tools.
    pub fn exec(host: &str, user: &str, sha256: String, path: &str) -> Self {
        QualifyRequest {
            host: host.into(),
            action: Action::Exec,
            subject: Subject {
                user: user.into(),
                uid: 1,
                euid: 1,
                gid: 1,
                loginuid: 1,
                session: 1,
                pid: 1,
                ancestry: vec![],
            },
            program: Program {
                sha256,
                sha1: "2".repeat(40),
                size: 1,
                path: path.into(),
            },
            target: Target::Exec {
                loader_direct: false,
            },
            at_ms: 0,
            peer: None,
        }
    }
}
