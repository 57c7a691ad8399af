// SPDX-License-Identifier: GPL-2.0
//! Wire records between `trustbind.ko` (the PEM) and `trustbind-agent`.
//!
//! This one file is compiled twice: as the `trustbind-proto` crate for user
//! space (tests, fuzzing, the agent) and, through a `#[path]` module, into the
//! kernel module itself. So it is `no_std`, allocates nothing, never panics on
//! any input, and refers to its own items only through `self::`/`super::`
//! paths (never `crate::`), which resolve the same in both places.
//!
//! # Framing
//!
//! Every record is one `read()` or `write()` on `/dev/trustbind`: a fixed
//! [`Header`] of [`HEADER_LEN`] bytes followed by a kind-specific body. All
//! integers are little-endian. The header's `len` is the length of the whole
//! record, header included, and must equal the number of bytes handed over;
//! records are at most [`MAX_RECORD_LEN`] bytes.
//!
//! ```text
//! 0      4        6      8      12      16             24
//! | magic | version | kind | len | flags | request_id   | body ...
//! ```
//!
//! Decoding checks, in order: length of the buffer against the header, magic,
//! version, declared length, kind, then the body. Each failure is a distinct
//! [`DecodeError`] so that the module and the agent can log what was wrong.
#![cfg_attr(not(any(test, trustbind_kernel)), no_std)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

use core::fmt;

/// `"TBND"` read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TBND");
/// The protocol version this code speaks.
pub const VERSION: u16 = 8;
/// Size of the fixed [`Header`].
pub const HEADER_LEN: usize = 24;
/// Largest record either side may send or accept.
pub const MAX_RECORD_LEN: usize = 8192;
/// Longest path carried in a request (Linux `PATH_MAX`, including no NUL).
pub const MAX_PATH_LEN: usize = 4096;
/// Most ancestors (parent, grandparent, ...) whose program hashes are sent.
pub const MAX_ANCESTRY: usize = 8;
/// Length of a crypto driver name in [`HelloAck`] (`CRYPTO_MAX_ALG_NAME`).
pub const DRIVER_NAME_LEN: usize = 128;
/// SHA-256 digest length.
pub const SHA256_LEN: usize = 32;
/// SHA-1 digest length.
pub const SHA1_LEN: usize = 20;

/// What a record is. The numeric values are the wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Agent → module: first record after `open()`, announces the agent.
    Hello = 1,
    /// Module → agent: answer to [`Kind::Hello`].
    HelloAck = 2,
    /// Module → agent: may this program run in this context?
    ExecRequest = 3,
    /// Agent → module: the appliance's answer to a request.
    Verdict = 4,
    /// Agent → module: enforcement mode and verdict wait.
    Config = 5,
    /// Agent → module: the appliance's policy generation moved.
    Generation = 6,
    /// Module → agent: may this program open this TCP connection (connect)
    /// or take this one (accept)? Answered with a [`Kind::Verdict`] or, for
    /// a connection to bind, a [`Kind::ChannelKey`].
    NetRequest = 7,
    /// Agent → module: the key of the channel a [`NetRequest`] belongs to;
    /// install it as the socket's kTLS state.
    ChannelKey = 8,
    /// Module → agent, fire-and-forget (no reply): a bound channel's
    /// socket closed on this host; sent only to agents whose `Hello`
    /// announced at least [`AGENT_VERSION_CLOSE_RECORDS`].
    ChannelClosed = 9,
    /// Module → agent: may this program connect to a UNIX-domain stream
    /// socket whose listener runs that program? Answered with a
    /// [`Kind::Verdict`].
    IpcRequest = 10,
    /// Agent → module: the addresses of the protected hosts (replacing
    /// the previous set), for the inbound netfilter backstop.
    Peers = 11,
    /// Module → agent: may this program open, delete or rename this
    /// protected file? Answered with a [`Kind::Verdict`].
    FileRequest = 12,
    /// Agent → module: the protected file sets, as the identities of the
    /// files and directories named (replacing the previous sets).
    FileSets = 13,
    /// Agent → module: another agent → module record sealed by the
    /// appliance under the module's session key ([`seal`]): the agent
    /// carries it and can neither forge nor change it.
    Sealed = 14,
    /// Agent → module, sealed by the appliance: the protected file sets
    /// as absolute paths, which the module resolves itself from init's
    /// root (replacing the previous sealed paths).
    FileSetPaths = 15,
    /// Agent → module, sealed by the appliance (an order): this host's own
    /// channel keys v2 host keys ([`ticket::HostKeys`]), replacing the last.
    HostKeys = 16,
    /// Agent → module, sealed by the appliance (an order): what is no
    /// longer valid ([`ticket::Revocations`]), replacing the last.
    Revocations = 17,
    /// Agent → module, sealed by the appliance (an answer to a
    /// [`NetKind::Connect`]): a channel keys v2 grant ([`Grant`]).
    Grant = 18,
}

impl Kind {
    /// Maps a wire value to a kind, or `None` for an unknown one.
    pub const fn from_wire(v: u16) -> Option<Kind> {
        match v {
            1 => Some(Kind::Hello),
            2 => Some(Kind::HelloAck),
            3 => Some(Kind::ExecRequest),
            4 => Some(Kind::Verdict),
            5 => Some(Kind::Config),
            6 => Some(Kind::Generation),
            7 => Some(Kind::NetRequest),
            8 => Some(Kind::ChannelKey),
            9 => Some(Kind::ChannelClosed),
            10 => Some(Kind::IpcRequest),
            11 => Some(Kind::Peers),
            12 => Some(Kind::FileRequest),
            13 => Some(Kind::FileSets),
            14 => Some(Kind::Sealed),
            15 => Some(Kind::FileSetPaths),
            16 => Some(Kind::HostKeys),
            17 => Some(Kind::Revocations),
            18 => Some(Kind::Grant),
            _ => None,
        }
    }
}

/// Why a buffer is not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header or the body needs.
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    BadMagic(u32),
    /// A version this code does not speak.
    UnsupportedVersion(u16),
    /// The header's length does not match the bytes handed over.
    LengthMismatch {
        /// Length declared in the header.
        declared: u32,
        /// Bytes actually present.
        actual: usize,
    },
    /// The record is longer than [`MAX_RECORD_LEN`].
    Oversized(usize),
    /// A kind value this code does not know.
    UnknownKind(u16),
    /// A body field is out of range; the name says which.
    InvalidField(&'static str),
    /// Bytes left over after the body.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            DecodeError::Short { need, have } => {
                write!(f, "record too short: need {need} bytes, have {have}")
            }
            DecodeError::BadMagic(m) => write!(f, "bad magic {m:#010x}"),
            DecodeError::UnsupportedVersion(v) => {
                write!(
                    f,
                    "unsupported protocol version {v} (this side speaks {VERSION})"
                )
            }
            DecodeError::LengthMismatch { declared, actual } => write!(
                f,
                "header declares {declared} bytes but {actual} were given"
            ),
            DecodeError::Oversized(n) => {
                write!(
                    f,
                    "record of {n} bytes exceeds the {MAX_RECORD_LEN}-byte limit"
                )
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            DecodeError::InvalidField(name) => write!(f, "invalid field `{name}`"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the body"),
        }
    }
}

/// Why a record could not be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer is smaller than the record.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The record would exceed [`MAX_RECORD_LEN`] or a field limit; the name
    /// says which.
    TooLong(&'static str),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            EncodeError::BufferTooSmall { need, have } => {
                write!(f, "output buffer too small: need {need} bytes, have {have}")
            }
            EncodeError::TooLong(name) => write!(f, "field `{name}` too long"),
        }
    }
}

/// The fixed header at the start of every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What follows.
    pub kind: Kind,
    /// Total record length, header included.
    pub len: u32,
    /// Reserved; must be zero in version 1.
    pub flags: u32,
    /// Pairs a [`Kind::Verdict`] with the request it answers; 0 for records
    /// that answer nothing.
    pub request_id: u64,
}

/// A bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Short {
            need: usize::MAX,
            have: self.buf.len(),
        })?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Short {
            need: end,
            have: self.buf.len(),
        })?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// `n` ancestor hashes (at most [`MAX_ANCESTRY`]).
    fn ancestry(&mut self, n: usize) -> Result<Ancestry<'a>, DecodeError> {
        if n > MAX_ANCESTRY {
            return Err(DecodeError::InvalidField("ancestry_count"));
        }
        Ok(Ancestry(self.bytes(n * SHA256_LEN)?))
    }

    /// The tail of a request: `n_anc` ancestor hashes, then a path of
    /// `path_len` bytes (at most [`MAX_PATH_LEN`], no NUL). The counts are
    /// checked before any byte is read.
    fn ancestry_and_path(
        &mut self,
        n_anc: usize,
        path_len: usize,
    ) -> Result<(Ancestry<'a>, &'a [u8]), DecodeError> {
        if n_anc > MAX_ANCESTRY {
            return Err(DecodeError::InvalidField("ancestry_count"));
        }
        if path_len > MAX_PATH_LEN {
            return Err(DecodeError::InvalidField("path_len"));
        }
        let anc = self.ancestry(n_anc)?;
        let path = self.bytes(path_len)?;
        if path.contains(&0) {
            return Err(DecodeError::InvalidField("path"));
        }
        Ok((anc, path))
    }
    fn i8(&mut self) -> Result<i8, DecodeError> {
        Ok(i8::from_le_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

/// A bounds-checked little-endian writer into a byte slice.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0 }
    }

    fn bytes(&mut self, b: &[u8]) {
        // Callers size the buffer first (see `encode_record`), so a short
        // write cannot happen; if it did, the length check at the end of
        // `encode_record` would catch it rather than a panic here.
        let end = self.pos.saturating_add(b.len());
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(b);
        }
        self.pos = end;
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&v.to_le_bytes())
    }
    fn i8(&mut self, v: i8) {
        self.bytes(&v.to_le_bytes())
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes())
    }
}

/// Decodes and checks a header against the buffer it came in.
///
/// The buffer must be the whole record: the declared length has to match.
pub fn decode_header(buf: &[u8]) -> Result<Header, DecodeError> {
    if buf.len() > MAX_RECORD_LEN {
        return Err(DecodeError::Oversized(buf.len()));
    }
    let mut r = Reader::new(buf);
    let head = r.bytes(HEADER_LEN).map_err(|_| DecodeError::Short {
        need: HEADER_LEN,
        have: buf.len(),
    })?;
    let mut r = Reader::new(head);
    let magic = r.u32()?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = r.u16()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let kind = r.u16()?;
    let len = r.u32()?;
    if len as usize != buf.len() {
        return Err(DecodeError::LengthMismatch {
            declared: len,
            actual: buf.len(),
        });
    }
    let flags = r.u32()?;
    let request_id = r.u64()?;
    let kind = Kind::from_wire(kind).ok_or(DecodeError::UnknownKind(kind))?;
    if flags != 0 {
        return Err(DecodeError::InvalidField("flags"));
    }
    Ok(Header {
        kind,
        len,
        flags,
        request_id,
    })
}

/// Agent → module: the agent introduces itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The agent's process id (the module exempts it from interception).
    pub agent_pid: u32,
    /// The agent's own version, `major << 16 | minor << 8 | patch`.
    pub agent_version: u32,
}

/// Module → agent: the module's answer to [`Hello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloAck {
    /// The module's version, `major << 16 | minor << 8 | patch`.
    pub module_version: u32,
    /// Largest record the module accepts.
    pub max_record_len: u32,
    /// Driver behind the SHA-256 transform (e.g. `sha256-avx2`), NUL padded.
    pub sha256_driver: [u8; DRIVER_NAME_LEN],
    /// Driver behind the SHA-1 transform, NUL padded.
    pub sha1_driver: [u8; DRIVER_NAME_LEN],
    /// The module's session public key (P-256 `x || y`, big-endian) when
    /// it was loaded with an appliance authority key, else all zero
    /// ([`seal`]).
    pub session: [u8; seal::SESSION_PUB_LEN],
}

impl HelloAck {
    /// The SHA-256 driver name up to its first NUL.
    pub fn sha256_driver_name(&self) -> &[u8] {
        until_nul(&self.sha256_driver)
    }
    /// The SHA-1 driver name up to its first NUL.
    pub fn sha1_driver_name(&self) -> &[u8] {
        until_nul(&self.sha1_driver)
    }
}

/// Copies `name` into a NUL-padded driver-name field, truncating if needed.
pub fn driver_name_field(name: &[u8]) -> [u8; DRIVER_NAME_LEN] {
    let mut out = [0u8; DRIVER_NAME_LEN];
    for (dst, src) in out.iter_mut().zip(until_nul(name)) {
        *dst = *src;
    }
    out
}

fn until_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => b.get(..n).unwrap_or(b),
        None => b,
    }
}

/// [`ExecRequest::flags`]: the file exec'd is an ELF loader (a file the
/// kernel has seen opened as a program's `PT_INTERP`) run as the program
/// itself, as in `ld.so ./prog`. What the loader then maps (`./prog`) is not
/// an exec to the kernel and is never asked about, so policy decides on
/// this exec.
pub const EXEC_LOADER_DIRECT: u8 = 1;
/// Every flag bit this version defines.
const EXEC_FLAGS_KNOWN: u8 = EXEC_LOADER_DIRECT;

/// The effective uid an exec will run with: the file owner's when its
/// set-uid bit (`mode & 0o4000`) is set and the kernel honours it
/// (`honoured`: a suid-capable mount, no `no_new_privs`, the owner mapped),
/// else `current`. The kernel applies it only once the exec commits, after
/// the module has asked, so the module computes it (THREAT-MODEL T-10).
pub const fn exec_euid(current: u32, mode: u32, owner: u32, honoured: bool) -> u32 {
    if honoured && mode & 0o4000 != 0 {
        owner
    } else {
        current
    }
}

/// The identity and context of one exec, as the kernel saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecRequest<'a> {
    /// SHA-256 of the whole program file.
    pub sha256: [u8; SHA256_LEN],
    /// SHA-1 of the whole program file (NSRL and the seed's scheme).
    pub sha1: [u8; SHA1_LEN],
    /// File size in bytes.
    pub size: u64,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Audit login uid (`u32::MAX` when unset).
    pub loginuid: u32,
    /// Audit session id (`u32::MAX` when unset).
    pub sessionid: u32,
    /// Thread group id of the exec'ing task.
    pub pid: u32,
    /// Thread group id of its parent.
    pub ppid: u32,
    /// SHA-256 of each ancestor's program, parent first; at most
    /// [`MAX_ANCESTRY`] entries, each 32 bytes.
    pub ancestry: Ancestry<'a>,
    /// The path as the kernel opened it (no NUL), at most [`MAX_PATH_LEN`].
    pub path: &'a [u8],
    /// [`EXEC_LOADER_DIRECT`] or 0.
    pub flags: u8,
}

/// A borrowed list of ancestor program hashes: `n * 32` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ancestry<'a>(&'a [u8]);

impl<'a> Ancestry<'a> {
    /// The empty list.
    pub const EMPTY: Ancestry<'static> = Ancestry(&[]);

    /// Wraps `n * 32` bytes of hashes; `None` if the length is not a
    /// multiple of 32 or holds more than [`MAX_ANCESTRY`] hashes.
    pub fn from_bytes(b: &'a [u8]) -> Option<Self> {
        if b.len().is_multiple_of(SHA256_LEN) && b.len() / SHA256_LEN <= MAX_ANCESTRY {
            Some(Ancestry(b))
        } else {
            None
        }
    }

    /// Number of hashes.
    pub fn len(&self) -> usize {
        self.0.len() / SHA256_LEN
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw `n * 32` bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// The hashes, parent first.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0.chunks_exact(SHA256_LEN)
    }
}

/// Which side of a TCP connection a [`NetRequest`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NetKind {
    /// A program opens a connection (`connect(2)`), asked before the SYN.
    Connect = 1,
    /// A program took a connection (`accept(2)`), asked once it is
    /// established and the peer known, before the program sees it.
    /// Answered by a [`Verdict`] (no channel: plaintext, or refused) or by
    /// a [`ChannelKey`] (bind the socket before the program sees it).
    Accept = 2,
    /// A connect whose verdict carried [`Obligations::encrypt`], asked again
    /// once the handshake is done: `src` is now the real client end, so the
    /// appliance can pair it with the server's accept. Answered by a
    /// [`ChannelKey`]; any [`Verdict`] (or none in time) resets the
    /// connection, since it must not carry plaintext.
    Established = 3,
    /// Channel keys v2: a program listens (`listen(2)`) on `dst` (this
    /// host's address, or all zero for any, and the port; `src` all zero),
    /// asked so that the appliance registers it as the server program of
    /// that port. Answered by a [`Verdict`]: allow = registered.
    Listen = 4,
}

impl NetKind {
    /// Maps a wire value to a kind.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(NetKind::Connect),
            2 => Some(NetKind::Accept),
            3 => Some(NetKind::Established),
            4 => Some(NetKind::Listen),
            _ => None,
        }
    }
}

/// Address family of a [`NetRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    /// IPv4: the first 4 bytes of each address field, the rest zero.
    Ipv4 = 4,
    /// IPv6. (An IPv6 socket talking IPv4 — `::ffff:a.b.c.d` — is reported
    /// as [`Family::Ipv4`], so both ends of a connection name it alike.)
    Ipv6 = 6,
}

impl Family {
    /// Maps a wire value to a family.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            4 => Some(Family::Ipv4),
            6 => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// How the module knows a [`NetRequest`]'s program hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ProgramSource {
    /// From the exec it qualified (its lineage table).
    Lineage = 1,
    /// Hashed now from the process's executable (`mm->exe_file`): the
    /// process was started before the module, or in disabled mode.
    ExeFile = 2,
}

impl ProgramSource {
    /// Maps a wire value to a source.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(ProgramSource::Lineage),
            2 => Some(ProgramSource::ExeFile),
            _ => None,
        }
    }
}

/// One TCP connection end a process opens or takes, as the kernel saw it.
///
/// Addresses name the connection the same way on both ends: `src` is the
/// client (the connecting side), `dst` the server (the accepting side), so
/// the two halves of one connection carry the same 4-tuple. On a connect
/// the client port and address are those the socket is bound to before the
/// SYN (zero unless the program bound it: the kernel picks them during the
/// connect). Answered by a [`Verdict`]: `Deny` refuses the connect with
/// `EACCES`, or aborts the accepted connection (`ECONNABORTED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRequest<'a> {
    /// Connect or accept.
    pub kind: NetKind,
    /// Address family.
    pub family: Family,
    /// Client address (network byte order; IPv4 in the first 4 bytes).
    pub src_addr: [u8; 16],
    /// Client port.
    pub src_port: u16,
    /// Server address.
    pub dst_addr: [u8; 16],
    /// Server port.
    pub dst_port: u16,
    /// SHA-256 of the program the process runs.
    pub sha256: [u8; SHA256_LEN],
    /// Where that hash comes from.
    pub program_source: ProgramSource,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Audit login uid (`u32::MAX` when unset).
    pub loginuid: u32,
    /// Audit session id (`u32::MAX` when unset).
    pub sessionid: u32,
    /// Thread group id of the process.
    pub pid: u32,
    /// Thread group id of its parent.
    pub ppid: u32,
    /// SHA-256 of the programs before this one, nearest first (as in
    /// [`ExecRequest::ancestry`]). When the program was hashed now, the
    /// parent's program and its ancestry, as far as the module knows them.
    pub ancestry: Ancestry<'a>,
}

/// One UNIX-domain stream (or seqpacket) connect, as the kernel saw it
/// once the listener accepted it into its queue: the connecting program
/// (client, the current process) and the program of the process that
/// listens (server, `SO_PEERCRED` of the connection). Answered by a
/// [`Verdict`]: `Deny` severs the connection (both directions shut down,
/// the server sees end of file) and fails the connect with `EACCES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcRequest<'a> {
    /// SHA-256 of the client's program.
    pub sha256: [u8; SHA256_LEN],
    /// Where that hash comes from.
    pub program_source: ProgramSource,
    /// Client's real user id.
    pub uid: u32,
    /// Client's effective user id.
    pub euid: u32,
    /// Client's real group id.
    pub gid: u32,
    /// Client's audit login uid (`u32::MAX` when unset).
    pub loginuid: u32,
    /// Client's audit session id (`u32::MAX` when unset).
    pub sessionid: u32,
    /// Client's thread group id.
    pub pid: u32,
    /// Thread group id of the client's parent.
    pub ppid: u32,
    /// The client's ancestry, as in [`NetRequest::ancestry`].
    pub ancestry: Ancestry<'a>,
    /// SHA-256 of the server's program.
    pub peer_sha256: [u8; SHA256_LEN],
    /// Where that hash comes from.
    pub peer_program_source: ProgramSource,
    /// Thread group id of the process that listens (`SO_PEERCRED`).
    pub peer_pid: u32,
    /// Its effective user id when it listened (`SO_PEERCRED`).
    pub peer_uid: u32,
    /// Its effective group id when it listened.
    pub peer_gid: u32,
    /// The socket's name: the absolute path of a file-system socket, or
    /// `@` and the name of an abstract one (its NUL bytes shown as `@`, as
    /// `ss` does); no NUL, at most [`MAX_PATH_LEN`] bytes.
    pub path: &'a [u8],
}

/// What a [`FileRequest`] asks to do to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FileAccess {
    /// Open for reading (`O_RDONLY`, or the read half of `O_RDWR`, which
    /// is asked as [`FileAccess::Write`]).
    Read = 1,
    /// Open for writing (`O_WRONLY`, `O_RDWR`, `O_TRUNC`, `O_APPEND`), create
    /// a new name in a protected directory, or truncate.
    Write = 2,
    /// Remove a name (`unlink`, `rmdir`).
    Delete = 3,
    /// Move a name (`rename`, from or into a protected set); `to` is the
    /// new path.
    Rename = 4,
}

impl FileAccess {
    /// Maps a wire value to an access.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(FileAccess::Read),
            2 => Some(FileAccess::Write),
            3 => Some(FileAccess::Delete),
            4 => Some(FileAccess::Rename),
            _ => None,
        }
    }
}

/// [`FileRequest::flags`]: the name does not exist yet (a create, `mkdir`,
/// `mknod`, `symlink`, or the new name of a hard link); `dev`/`ino` are
/// its directory's.
pub const FILE_CREATE: u8 = 1;
/// [`FileRequest::flags`]: a truncate (`truncate(2)`, `ftruncate(2)`).
pub const FILE_TRUNCATE: u8 = 2;
/// [`FileRequest::flags`]: a new hard link to `path` named `to`.
pub const FILE_LINK: u8 = 4;
/// [`FileRequest::flags`]: `path` is the module's own: the appliance's
/// path of the protected directory or file its walk matched
/// ([`FileSetPaths`], which the module resolved), then the components
/// below it. Absolute in the initial mount namespace; the agent passes it
/// on as it is and the appliance checks that it did (T-102).
pub const FILE_PATH_NAMED: u8 = 8;
/// [`FileRequest::flags`]: the same for `to`.
pub const FILE_TO_NAMED: u8 = 16;
/// Every flag bit this version defines.
const FILE_FLAGS_KNOWN: u8 =
    FILE_CREATE | FILE_TRUNCATE | FILE_LINK | FILE_PATH_NAMED | FILE_TO_NAMED;

/// One operation on a protected file, as the kernel saw it.
///
/// Paths are absolute in the initial mount namespace, whatever namespace
/// or bind mount the process used; `path` and `to` together fit one
/// record (at most [`MAX_FILE_PATHS_LEN`] bytes). Answered by a
/// [`Verdict`]: `Deny` fails the operation with `EACCES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileRequest<'a> {
    /// What is asked.
    pub access: FileAccess,
    /// [`FILE_CREATE`], [`FILE_TRUNCATE`], [`FILE_LINK`],
    /// [`FILE_PATH_NAMED`], [`FILE_TO_NAMED`] or 0.
    pub flags: u8,
    /// SHA-256 of the program the process runs.
    pub sha256: [u8; SHA256_LEN],
    /// Where that hash comes from.
    pub program_source: ProgramSource,
    /// Real user id.
    pub uid: u32,
    /// Effective user id.
    pub euid: u32,
    /// Real group id.
    pub gid: u32,
    /// Audit login uid (`u32::MAX` when unset).
    pub loginuid: u32,
    /// Audit session id (`u32::MAX` when unset).
    pub sessionid: u32,
    /// Thread group id of the process.
    pub pid: u32,
    /// Thread group id of its parent.
    pub ppid: u32,
    /// Device of the file's file system, its super block's (`stat`'s
    /// `st_dev` encoding), as `/proc/self/mountinfo` names its mounts:
    /// `path` is relative to its root. On btrfs a file's own `st_dev` is
    /// its subvolume's, another number.
    pub dev: u64,
    /// Inode number of the file (of its directory with [`FILE_CREATE`]).
    pub ino: u64,
    /// The process's ancestry, as in [`NetRequest::ancestry`].
    pub ancestry: Ancestry<'a>,
    /// The file's path (no NUL): with [`FILE_PATH_NAMED`] absolute, as
    /// the appliance named the protected set; otherwise from the root of
    /// the file system `dev` (the agent maps it).
    pub path: &'a [u8],
    /// [`FileAccess::Rename`] and [`FILE_LINK`]: the new path; otherwise
    /// empty.
    pub to: &'a [u8],
}

/// Longest `path` plus `to` of a [`FileRequest`]: what is left of
/// [`MAX_RECORD_LEN`] after the header, the fixed part and the largest
/// ancestry. An operation whose paths are longer cannot be asked (the
/// module decides it as it decides an unanswered request).
pub const MAX_FILE_PATHS_LEN: usize =
    MAX_RECORD_LEN - HEADER_LEN - FILE_FIXED_LEN - MAX_ANCESTRY * SHA256_LEN;

/// Most entries in one [`FileSets`] record.
pub const MAX_FILE_SET_ENTRIES: usize = 500;
/// Bytes per [`FileSets`] entry: device (`st_dev`), inode number.
pub const FILE_SET_ENTRY_LEN: usize = 16;

/// Agent → module: the protected files and directories, by identity
/// (device, inode number), replacing the previous sets. A file is
/// protected when it, or any directory above it on its file system, is
/// listed. Entries are sorted and unique (checked on construction), so the
/// module looks one up with a binary search.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSets<'a> {
    entries: &'a [u8],
}

impl<'a> FileSets<'a> {
    /// One entry's bytes.
    pub fn entry(dev: u64, ino: u64) -> [u8; FILE_SET_ENTRY_LEN] {
        let mut e = [0u8; FILE_SET_ENTRY_LEN];
        let (d, i) = e.split_at_mut(8);
        d.copy_from_slice(&dev.to_le_bytes());
        i.copy_from_slice(&ino.to_le_bytes());
        e
    }

    /// Checks `entries` (a concatenation of [`FileSets::entry`] values in
    /// ascending (dev, ino) order, no duplicates, at most
    /// [`MAX_FILE_SET_ENTRIES`]).
    pub fn new(entries: &'a [u8]) -> Result<Self, DecodeError> {
        if !entries.len().is_multiple_of(FILE_SET_ENTRY_LEN)
            || entries.len() / FILE_SET_ENTRY_LEN > MAX_FILE_SET_ENTRIES
        {
            return Err(DecodeError::InvalidField("file_set_count"));
        }
        let s = Self { entries };
        let mut prev: Option<(u64, u64)> = None;
        for e in s.iter() {
            if prev.is_some_and(|p| p >= e) {
                return Err(DecodeError::InvalidField("file_set_order"));
            }
            prev = Some(e);
        }
        Ok(s)
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len() / FILE_SET_ENTRY_LEN
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The raw entries ([`FILE_SET_ENTRY_LEN`] bytes each).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.entries
    }

    /// The (device, inode) pairs, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.entries.chunks_exact(FILE_SET_ENTRY_LEN).map(|e| {
            let mut d = [0u8; 8];
            let mut i = [0u8; 8];
            let (a, b) = e.split_at(8);
            d.copy_from_slice(a);
            i.copy_from_slice(b);
            (u64::from_le_bytes(d), u64::from_le_bytes(i))
        })
    }
}

/// What the appliance decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Decision {
    /// Run it.
    Allow = 1,
    /// Run it, applying the [`Obligations`].
    AllowWithConditions = 2,
    /// Refuse with `EACCES`.
    Deny = 3,
}

impl Decision {
    fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(Decision::Allow),
            2 => Some(Decision::AllowWithConditions),
            3 => Some(Decision::Deny),
            _ => None,
        }
    }
}

/// Conditions attached to an allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Obligations {
    /// Nice level to set on the new process, if any (-20..=19).
    pub nice: Option<i8>,
    /// `RLIMIT_CPU` in seconds to set, if any.
    pub cpu_limit_s: Option<u32>,
    /// Audit verbosity for this process: 0 none .. 3 all.
    pub log_level: u8,
    /// connect only: the connection must be a bound channel (policy
    /// `@encrypt("required")`): once established the module asks again
    /// ([`NetKind::Established`]) for its key, and resets it without one.
    pub encrypt: bool,
}

/// Agent → module: the answer to the request with the header's `request_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The decision.
    pub decision: Decision,
    /// The appliance's policy generation the decision was taken under; the
    /// module flushes its cache when this moves.
    pub policy_generation: u64,
    /// Whether the module may cache this verdict.
    pub cacheable: bool,
    /// Conditions, meaningful with [`Decision::AllowWithConditions`].
    pub obligations: Obligations,
}

impl Verdict {
    /// A deny under `policy_generation`, never cached, with no obligation.
    pub const fn deny(policy_generation: u64) -> Self {
        Verdict {
            decision: Decision::Deny,
            policy_generation,
            cacheable: false,
            obligations: Obligations {
                nice: None,
                cpu_limit_s: None,
                log_level: 0,
                encrypt: false,
            },
        }
    }
}

/// Length of a channel key (AES-256-GCM).
pub const CHANNEL_KEY_LEN: usize = 32;
/// Length of a channel's key id (random; shown hex-encoded).
pub const CHANNEL_KEY_ID_LEN: usize = 16;
/// Length of the implicit nonce part (kTLS `salt`).
pub const CHANNEL_SALT_LEN: usize = 4;
/// Length of the explicit nonce part (kTLS `iv`).
pub const CHANNEL_IV_LEN: usize = 8;

/// Agent → module: the key material of one channel from this host's point
/// of view, answering the [`NetRequest`] with the header's `request_id`
/// (an accept, or an established connect). The module installs it as kTLS
/// AES-256-GCM state on the socket (TLS 1.3, or TLS 1.2 where the policy
/// asks for NIC offload, [`ChannelTls`]): `TLS_TX` {`key`, `tx_iv`,
/// `tx_salt`, record sequence 0} and `TLS_RX` {`key`, `rx_iv`, `rx_salt`,
/// 0}; the two ends' tx and rx are crossed. Both sides zero the bytes once
/// used: the key lives on only in the kernel's kTLS state.
///
/// Not `Copy`: every copy of key material is an explicit `clone()`, so
/// each one can be found and wiped.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelKey {
    /// The appliance's channel id (both ends carry the same).
    pub channel_id: u64,
    /// Random key id, as the appliance's audit log records it.
    pub key_id: [u8; CHANNEL_KEY_ID_LEN],
    /// AES-256-GCM key, both directions.
    pub key: [u8; CHANNEL_KEY_LEN],
    /// What this host sends: implicit nonce part.
    pub tx_salt: [u8; CHANNEL_SALT_LEN],
    /// What this host sends: explicit nonce part.
    pub tx_iv: [u8; CHANNEL_IV_LEN],
    /// What this host receives: implicit nonce part.
    pub rx_salt: [u8; CHANNEL_SALT_LEN],
    /// What this host receives: explicit nonce part.
    pub rx_iv: [u8; CHANNEL_IV_LEN],
    /// The kTLS record version to install.
    pub tls: ChannelTls,
    /// End the channel (reset the connection) after this many seconds
    /// without a byte either way; 0: never.
    pub idle_timeout_s: u32,
}

/// The TLS record version of a channel (the cipher is AES-256-GCM either
/// way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelTls {
    /// TLS 1.3, the default.
    Tls13 = 0,
    /// TLS 1.2, which NICs can offload (policy `@encrypt("offload")`).
    Tls12 = 1,
}

impl ChannelTls {
    /// Maps a wire value to a version.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(ChannelTls::Tls13),
            1 => Some(ChannelTls::Tls12),
            _ => None,
        }
    }
}

impl fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material.
        f.debug_struct("ChannelKey")
            .field("channel_id", &self.channel_id)
            .field("key_id", &self.key_id)
            .field("tls", &self.tls)
            .field("idle_timeout_s", &self.idle_timeout_s)
            .finish_non_exhaustive()
    }
}

impl ChannelKey {
    /// All zero (what a wiped key holds).
    pub const ZERO: ChannelKey = ChannelKey {
        channel_id: 0,
        key_id: [0; CHANNEL_KEY_ID_LEN],
        key: [0; CHANNEL_KEY_LEN],
        tx_salt: [0; CHANNEL_SALT_LEN],
        tx_iv: [0; CHANNEL_IV_LEN],
        rx_salt: [0; CHANNEL_SALT_LEN],
        rx_iv: [0; CHANNEL_IV_LEN],
        tls: ChannelTls::Tls13,
        idle_timeout_s: 0,
    };

    /// Overwrites the key material with zeros (the fence keeps the stores
    /// from being dropped as dead before the memory is reused).
    pub fn wipe(&mut self) {
        self.key = [0; CHANNEL_KEY_LEN];
        self.tx_salt = [0; CHANNEL_SALT_LEN];
        self.tx_iv = [0; CHANNEL_IV_LEN];
        self.rx_salt = [0; CHANNEL_SALT_LEN];
        self.rx_iv = [0; CHANNEL_IV_LEN];
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }
}

/// The first [`HelloAck::module_version`] that speaks channel keys v2
/// (`docs/CHANNEL-KEYS-V2.md`): it registers listeners
/// ([`NetKind::Listen`]), takes [`Grant`] answers to its connects, and
/// [`Kind::HostKeys`] and [`Kind::Revocations`] orders.
pub const MODULE_VERSION_TICKETS: u32 = 0x0001_0100;

/// Agent → module, sealed by the appliance: the answer to a
/// [`NetKind::Connect`] whose connection must be a channel and whose
/// service a channel keys v2 module registered. The client's module keeps
/// it (for at most `valid_s` seconds, or until a [`Kind::Revocations`]
/// or a new generation drops it) and keys every connection of this
/// program pair from it with no further question: it sends
/// [`ticket::assemble`]`(nonce, epoch, gcm_nonce, ciphertext, tag)` in-band after the
/// handshake and derives the connection's key from `pair_secret`.
///
/// Not `Copy`: it carries the pair secret ([`Grant::wipe`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The ticket's id, as audited, revoked and reported at close.
    pub ticket_id: [u8; ticket::TICKET_ID_LEN],
    /// The pair secret (also inside the sealed ticket).
    pub pair_secret: [u8; ticket::PAIR_SECRET_LEN],
    /// Wall-clock seconds (Unix time) after which the server refuses it.
    pub expires_s: u64,
    /// Seconds from its arrival the client may use it (the appliance's
    /// `expires_s` less its clock then, so a client whose clock differs
    /// still stops in time by its own monotonic clock).
    pub valid_s: u32,
    /// The policy generation it was decided under.
    pub generation: u64,
    /// The server host key's epoch the ticket is sealed under.
    pub epoch: u32,
    /// The kTLS record version to install.
    pub tls: ChannelTls,
    /// End the channel after this many seconds without a byte; 0: never.
    pub idle_timeout_s: u32,
    /// The sealed ticket's GCM nonce.
    pub gcm_nonce: [u8; ticket::GCM_NONCE_LEN],
    /// The sealed ticket ([`ticket::Ticket`] encrypted under the server's
    /// host key of `epoch`).
    pub ciphertext: [u8; ticket::PLAIN_LEN],
    /// Its GCM tag.
    pub tag: [u8; ticket::GCM_TAG_LEN],
}

impl Grant {
    /// Overwrites the pair secret with zeros.
    pub fn wipe(&mut self) {
        self.pair_secret = [0; ticket::PAIR_SECRET_LEN];
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    }

    /// The channel id its connections are reported under: the ticket id's
    /// first eight bytes, little-endian.
    pub fn channel_id(&self) -> u64 {
        ticket::channel_id(&self.ticket_id)
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the pair secret.
        f.debug_struct("Grant")
            .field("ticket_id", &self.ticket_id)
            .field("expires_s", &self.expires_s)
            .field("valid_s", &self.valid_s)
            .field("generation", &self.generation)
            .field("epoch", &self.epoch)
            .field("tls", &self.tls)
            .field("idle_timeout_s", &self.idle_timeout_s)
            .finish_non_exhaustive()
    }
}

/// The first `Hello::agent_version` that reads [`ChannelClosed`] records:
/// the module sends them only to such agents, so an older agent of the same
/// protocol version never sees a kind it does not know.
pub const AGENT_VERSION_CLOSE_RECORDS: u32 = 0x0001_0100;

/// The first `Hello::agent_version` that carries channel keys v2: it
/// answers [`NetKind::Listen`] through the appliance's registration (not
/// as a plain accept), carries [`Grant`] answers, and relays host keys
/// and revocations. The module asks `Listen` only of such an agent.
pub const AGENT_VERSION_TICKETS: u32 = 0x0001_0200;

/// Which end of a channel a host's socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelRole {
    /// The connecting (client) end.
    Connect = 1,
    /// The accepting (server) end.
    Accept = 2,
}

impl ChannelRole {
    /// Maps a wire value to a role.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(ChannelRole::Connect),
            2 => Some(ChannelRole::Accept),
            _ => None,
        }
    }
}

/// Why a channel's end closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// Its socket reached `tcp_close` (the program closed it, or exited).
    Closed = 0,
    /// No byte moved either way for the key's `idle_timeout_s`: the module
    /// reset the connection.
    Idle = 1,
}

impl CloseReason {
    /// Maps a wire value to a reason.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(CloseReason::Closed),
            1 => Some(CloseReason::Idle),
            _ => None,
        }
    }
}

/// Module → agent: one end of a bound channel closed (its socket reached
/// `tcp_close`, or the module ended it idle). Not a request: the header's `request_id` is 0 and nothing
/// answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelClosed {
    /// The appliance's channel id, from the [`ChannelKey`].
    pub channel_id: u64,
    /// The key id, from the [`ChannelKey`].
    pub key_id: [u8; CHANNEL_KEY_ID_LEN],
    /// This host's end.
    pub role: ChannelRole,
    /// Why it closed.
    pub reason: CloseReason,
    /// TCP payload bytes this end transmitted (`tcp_sock.bytes_sent`: TLS
    /// records with their headers and tags, retransmissions included) plus
    /// what was still queued, unsent, when it closed (the FIN counting
    /// one), so a sender that closes right after writing is counted whole.
    pub bytes_sent: u64,
    /// TCP payload bytes this end received in order
    /// (`tcp_sock.bytes_received`, TLS records included; the peer's FIN
    /// counts as one, as the kernel adds every `rcv_nxt` advance).
    pub bytes_received: u64,
    /// From the key's installation to the close, in milliseconds.
    pub duration_ms: u64,
}

/// How the module enforces (DESIGN.md §4 "Modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Nothing is intercepted (the state at load, before an agent says
    /// otherwise).
    Disabled = 0,
    /// Everything is asked and reported; nothing is refused.
    Permissive = 1,
    /// Denied and unanswered requests are refused.
    Enforce = 2,
}

impl Mode {
    /// Maps a wire value to a mode.
    pub const fn from_wire(v: u8) -> Option<Self> {
        match v {
            0 => Some(Mode::Disabled),
            1 => Some(Mode::Permissive),
            2 => Some(Mode::Enforce),
            _ => None,
        }
    }
}

/// Longest verdict wait an agent may configure, in milliseconds.
pub const MAX_VERDICT_TIMEOUT_MS: u32 = 60_000;

/// Agent → module: how to enforce from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Enforcement mode.
    pub mode: Mode,
    /// How long an intercepted task waits for a verdict, in milliseconds
    /// (1..=[`MAX_VERDICT_TIMEOUT_MS`]).
    pub verdict_timeout_ms: u32,
    /// Whether the agent answers [`NetRequest`]s: only then does the module
    /// qualify TCP connects and accepts (in the same mode as execs). An
    /// agent that does not set it is never sent one.
    pub qualify_net: bool,
}

/// Agent → module: the appliance's policy generation is now this; cached
/// verdicts of any other generation are dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The appliance's current policy generation.
    pub policy_generation: u64,
}

/// Most addresses in one [`Peers`] record.
pub const MAX_PEERS: usize = 256;
/// Bytes per [`Peers`] entry: family, three zero pads, 16 address bytes
/// (IPv4 in the first 4, the rest zero).
pub const PEER_LEN: usize = 20;

/// Agent → module: the addresses of the protected hosts (every host the
/// appliance knows an agent of), replacing the previous set. An inbound
/// SYN to a protected service from any other address is dropped: no PEM
/// qualified that connection. Entries are validated on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peers<'a> {
    entries: &'a [u8],
}

impl<'a> Peers<'a> {
    /// One entry's bytes.
    pub fn entry(family: Family, addr: &[u8; 16]) -> [u8; PEER_LEN] {
        let n = match family {
            Family::Ipv4 => 4,
            Family::Ipv6 => 16,
        };
        let mut e = [0u8; PEER_LEN];
        for (i, b) in e.iter_mut().enumerate() {
            *b = match i {
                0 => family as u8,
                4.. if i - 4 < n => addr.get(i - 4).copied().unwrap_or(0),
                _ => 0,
            };
        }
        e
    }

    /// Checks `entries` (a concatenation of [`Peers::entry`] values, at
    /// most [`MAX_PEERS`]).
    pub fn new(entries: &'a [u8]) -> Result<Self, DecodeError> {
        if !entries.len().is_multiple_of(PEER_LEN) || entries.len() / PEER_LEN > MAX_PEERS {
            return Err(DecodeError::InvalidField("peer_count"));
        }
        for e in entries.chunks_exact(PEER_LEN) {
            let (head, addr) = e.split_at(4);
            match head {
                [4, 0, 0, 0] if addr.get(4..).is_some_and(|r| r.iter().all(|&b| b == 0)) => {}
                [6, 0, 0, 0] => {}
                _ => return Err(DecodeError::InvalidField("peer")),
            }
        }
        Ok(Self { entries })
    }

    /// How many addresses.
    pub fn len(&self) -> usize {
        self.entries.len() / PEER_LEN
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The raw entries ([`PEER_LEN`] bytes each).
    pub fn as_bytes(&self) -> &'a [u8] {
        self.entries
    }

    /// The addresses.
    pub fn iter(&self) -> impl Iterator<Item = (Family, [u8; 16])> + 'a {
        self.entries.chunks_exact(PEER_LEN).filter_map(|e| {
            let family = Family::from_wire(*e.first()?)?;
            let mut a = [0u8; 16];
            a.copy_from_slice(e.get(4..)?);
            Some((family, a))
        })
    }
}

/// Most paths in one [`FileSetPaths`] record.
pub const MAX_FILE_SET_PATHS: usize = 256;
/// Most bytes of paths (each with its NUL) in one [`FileSetPaths`]
/// record, so that it fits a [`Sealed`] record: what is left of
/// [`MAX_RECORD_LEN`] after two headers, the seal (sequence and MAC) and
/// the count.
pub const MAX_FILE_SET_PATH_BYTES: usize = MAX_RECORD_LEN - 2 * HEADER_LEN - 8 - seal::MAC_LEN - 8;

/// Agent → module, an order the appliance seals: the protected files and
/// directories by absolute path, as the host's initial mount namespace
/// names them, replacing the previous paths. The module resolves each
/// path itself, from the root of init (pid 1), following symlinks, so
/// the identities it protects are the appliance's word and not the
/// agent's (THREAT-MODEL.md T-102). Each path is absolute, at most
/// [`MAX_PATH_LEN`] bytes, ends with a NUL and holds none before it; at
/// most [`MAX_FILE_SET_PATHS`] paths and [`MAX_FILE_SET_PATH_BYTES`]
/// bytes, checked on construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileSetPaths<'a> {
    paths: &'a [u8],
    count: usize,
}

impl<'a> FileSetPaths<'a> {
    /// Checks `paths` (absolute paths, each followed by one NUL).
    pub fn new(paths: &'a [u8]) -> Result<Self, DecodeError> {
        if paths.len() > MAX_FILE_SET_PATH_BYTES {
            return Err(DecodeError::InvalidField("file_set_path_bytes"));
        }
        let mut count = 0;
        let mut rest = paths;
        while !rest.is_empty() {
            let end = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or(DecodeError::InvalidField("file_set_path"))?;
            let (path, tail) = rest.split_at(end);
            if path.first() != Some(&b'/') || path.len() > MAX_PATH_LEN {
                return Err(DecodeError::InvalidField("file_set_path"));
            }
            count += 1;
            if count > MAX_FILE_SET_PATHS {
                return Err(DecodeError::InvalidField("file_set_path_count"));
            }
            rest = tail.get(1..).unwrap_or(&[]);
        }
        Ok(Self { paths, count })
    }

    /// How many paths.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The raw paths, each followed by a NUL.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.paths
    }

    /// Each path, without its NUL.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.paths.split(|&b| b == 0).take(self.count)
    }

    /// Each path with its NUL (a C string).
    pub fn iter_c(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.paths.split_inclusive(|&b| b == 0)
    }
}

/// Agent → module: a record the appliance sealed for this module
/// ([`seal`]). `inner` is a whole record (header and body) of a kind
/// [`seal::sealable`] allows; its MAC covers `inner` exactly, the order
/// sequence and, for an answer, the digest of the request it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sealed<'a> {
    /// Order sequence number (strictly increasing per order kind within a
    /// session; 0 for answers, which the request digest binds instead).
    pub seq: u64,
    /// HMAC-SHA256 under the session key ([`seal::prefix`]).
    pub mac: [u8; seal::MAC_LEN],
    inner: &'a [u8],
}

impl<'a> Sealed<'a> {
    /// Checks that `inner` is a record of a sealable kind (its own header
    /// only: the body is decoded once the MAC has been checked).
    pub fn new(seq: u64, mac: [u8; seal::MAC_LEN], inner: &'a [u8]) -> Result<Self, DecodeError> {
        let h = decode_header(inner)?;
        if !seal::sealable(h.kind) {
            return Err(DecodeError::InvalidField("sealed_kind"));
        }
        Ok(Self { seq, mac, inner })
    }

    /// The sealed record, header included.
    pub fn inner(&self) -> &'a [u8] {
        self.inner
    }
}

/// A decoded record, borrowing variable-length fields from the buffer.
/// Not `Copy` (it may hold a [`ChannelKey`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`ExecRequest`].
    ExecRequest(ExecRequest<'a>),
    /// See [`Verdict`].
    Verdict(Verdict),
    /// See [`Config`].
    Config(Config),
    /// See [`Generation`].
    Generation(Generation),
    /// See [`NetRequest`].
    NetRequest(NetRequest<'a>),
    /// See [`ChannelKey`].
    ChannelKey(ChannelKey),
    /// See [`ChannelClosed`].
    ChannelClosed(ChannelClosed),
    /// See [`IpcRequest`].
    IpcRequest(IpcRequest<'a>),
    /// See [`Peers`].
    Peers(Peers<'a>),
    /// See [`FileRequest`].
    FileRequest(FileRequest<'a>),
    /// See [`FileSets`].
    FileSets(FileSets<'a>),
    /// See [`Sealed`].
    Sealed(Sealed<'a>),
    /// See [`FileSetPaths`].
    FileSetPaths(FileSetPaths<'a>),
    /// See [`ticket::HostKeys`].
    HostKeys(ticket::HostKeys),
    /// See [`ticket::Revocations`].
    Revocations(ticket::Revocations<'a>),
    /// See [`Grant`].
    Grant(Grant),
}

impl Record<'_> {
    /// The kind of this record.
    pub fn kind(&self) -> Kind {
        match self {
            Record::Hello(_) => Kind::Hello,
            Record::HelloAck(_) => Kind::HelloAck,
            Record::ExecRequest(_) => Kind::ExecRequest,
            Record::Verdict(_) => Kind::Verdict,
            Record::Config(_) => Kind::Config,
            Record::Generation(_) => Kind::Generation,
            Record::NetRequest(_) => Kind::NetRequest,
            Record::ChannelKey(_) => Kind::ChannelKey,
            Record::ChannelClosed(_) => Kind::ChannelClosed,
            Record::IpcRequest(_) => Kind::IpcRequest,
            Record::Peers(_) => Kind::Peers,
            Record::FileRequest(_) => Kind::FileRequest,
            Record::FileSets(_) => Kind::FileSets,
            Record::Sealed(_) => Kind::Sealed,
            Record::FileSetPaths(_) => Kind::FileSetPaths,
            Record::HostKeys(_) => Kind::HostKeys,
            Record::Revocations(_) => Kind::Revocations,
            Record::Grant(_) => Kind::Grant,
        }
    }

    /// Body length in bytes.
    fn body_len(&self) -> usize {
        match self {
            Record::Hello(_) => 8,
            Record::HelloAck(_) => 8 + 2 * DRIVER_NAME_LEN + seal::SESSION_PUB_LEN,
            Record::ExecRequest(r) => EXEC_FIXED_LEN + r.ancestry.as_bytes().len() + r.path.len(),
            Record::Verdict(_) => VERDICT_LEN,
            Record::Config(_) => CONFIG_LEN,
            Record::Generation(_) => GENERATION_LEN,
            Record::NetRequest(r) => NET_FIXED_LEN + r.ancestry.as_bytes().len(),
            Record::ChannelKey(_) => CHANNEL_KEY_BODY_LEN,
            Record::ChannelClosed(_) => CHANNEL_CLOSED_LEN,
            Record::IpcRequest(r) => IPC_FIXED_LEN + r.ancestry.as_bytes().len() + r.path.len(),
            Record::Peers(p) => 8 + p.as_bytes().len(),
            Record::FileRequest(r) => {
                FILE_FIXED_LEN + r.ancestry.as_bytes().len() + r.path.len() + r.to.len()
            }
            Record::FileSets(f) => 8 + f.as_bytes().len(),
            Record::Sealed(x) => 8 + seal::MAC_LEN + x.inner.len(),
            Record::FileSetPaths(f) => 8 + f.as_bytes().len(),
            Record::HostKeys(_) => ticket::HOST_KEYS_LEN,
            Record::Revocations(r) => r.encoded_len(),
            Record::Grant(_) => GRANT_BODY_LEN,
        }
    }

    /// Total encoded length, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Writes the record with `request_id` into `out`; returns its length.
    pub fn encode(&self, request_id: u64, out: &mut [u8]) -> Result<usize, EncodeError> {
        if let Record::ExecRequest(r) = self {
            if r.path.len() > MAX_PATH_LEN {
                return Err(EncodeError::TooLong("path"));
            }
            if Ancestry::from_bytes(r.ancestry.as_bytes()).is_none() {
                return Err(EncodeError::TooLong("ancestry"));
            }
        }
        if let Record::NetRequest(r) = self {
            if Ancestry::from_bytes(r.ancestry.as_bytes()).is_none() {
                return Err(EncodeError::TooLong("ancestry"));
            }
        }
        if let Record::IpcRequest(r) = self {
            if r.path.len() > MAX_PATH_LEN {
                return Err(EncodeError::TooLong("path"));
            }
            if Ancestry::from_bytes(r.ancestry.as_bytes()).is_none() {
                return Err(EncodeError::TooLong("ancestry"));
            }
        }
        if let Record::FileRequest(r) = self {
            if r.path.len() > MAX_PATH_LEN || r.to.len() > MAX_PATH_LEN {
                return Err(EncodeError::TooLong("path"));
            }
            if r.path.len() + r.to.len() > MAX_FILE_PATHS_LEN {
                return Err(EncodeError::TooLong("path"));
            }
            if Ancestry::from_bytes(r.ancestry.as_bytes()).is_none() {
                return Err(EncodeError::TooLong("ancestry"));
            }
        }
        let len = self.encoded_len();
        if len > MAX_RECORD_LEN {
            return Err(EncodeError::TooLong("record"));
        }
        if out.len() < len {
            return Err(EncodeError::BufferTooSmall {
                need: len,
                have: out.len(),
            });
        }
        let mut w = Writer::new(out);
        w.u32(MAGIC);
        w.u16(VERSION);
        w.u16(self.kind() as u16);
        // CAST: `len <= MAX_RECORD_LEN`, which fits in a `u32`.
        w.u32(len as u32);
        w.u32(0);
        w.u64(request_id);
        match self {
            Record::Hello(h) => {
                w.u32(h.agent_pid);
                w.u32(h.agent_version);
            }
            Record::HelloAck(a) => {
                w.u32(a.module_version);
                w.u32(a.max_record_len);
                w.bytes(&a.sha256_driver);
                w.bytes(&a.sha1_driver);
                w.bytes(&a.session);
            }
            Record::ExecRequest(r) => {
                w.bytes(&r.sha256);
                w.bytes(&r.sha1);
                w.u64(r.size);
                w.u32(r.uid);
                w.u32(r.euid);
                w.u32(r.gid);
                w.u32(r.loginuid);
                w.u32(r.sessionid);
                w.u32(r.pid);
                w.u32(r.ppid);
                // CAST: both bounded above (MAX_ANCESTRY, MAX_PATH_LEN).
                w.u8(r.ancestry.len() as u8);
                w.u8(r.flags);
                w.u16(r.path.len() as u16);
                w.bytes(r.ancestry.as_bytes());
                w.bytes(r.path);
            }
            Record::FileRequest(r) => {
                w.u8(r.access as u8);
                w.u8(r.flags);
                w.u8(r.program_source as u8);
                // CAST: bounded above (MAX_ANCESTRY, MAX_PATH_LEN, checked).
                w.u8(r.ancestry.len() as u8);
                w.u16(r.path.len() as u16);
                w.u16(r.to.len() as u16);
                w.bytes(&r.sha256);
                w.u32(r.uid);
                w.u32(r.euid);
                w.u32(r.gid);
                w.u32(r.loginuid);
                w.u32(r.sessionid);
                w.u32(r.pid);
                w.u32(r.ppid);
                w.u64(r.dev);
                w.u64(r.ino);
                w.bytes(r.ancestry.as_bytes());
                w.bytes(r.path);
                w.bytes(r.to);
            }
            Record::FileSets(f) => {
                // CAST: at most MAX_FILE_SET_ENTRIES, checked in `FileSets::new`.
                w.u16(f.len() as u16);
                w.u16(0);
                w.u32(0);
                w.bytes(f.as_bytes());
            }
            Record::Sealed(x) => {
                w.u64(x.seq);
                w.bytes(&x.mac);
                w.bytes(x.inner);
            }
            Record::FileSetPaths(f) => {
                // CAST: at most MAX_FILE_SET_PATHS, checked in `FileSetPaths::new`.
                w.u16(f.len() as u16);
                w.u16(0);
                w.u32(0);
                w.bytes(f.as_bytes());
            }
            Record::Peers(p) => {
                // CAST: at most MAX_PEERS, checked in `Peers::new`.
                w.u16(p.len() as u16);
                w.u16(0);
                w.u32(0);
                w.bytes(p.as_bytes());
            }
            Record::Verdict(v) => {
                w.u8(v.decision as u8);
                w.u8(v.cacheable as u8);
                let mut present = 0u8;
                if v.obligations.nice.is_some() {
                    present |= OBL_NICE;
                }
                if v.obligations.cpu_limit_s.is_some() {
                    present |= OBL_CPU;
                }
                if v.obligations.encrypt {
                    present |= OBL_ENCRYPT;
                }
                w.u8(present);
                w.u8(v.obligations.log_level);
                w.u64(v.policy_generation);
                w.i8(v.obligations.nice.unwrap_or(0));
                w.u8(0);
                w.u16(0);
                w.u32(v.obligations.cpu_limit_s.unwrap_or(0));
            }
            Record::Config(c) => {
                w.u8(c.mode as u8);
                w.u8(if c.qualify_net { CONFIG_NET } else { 0 });
                w.u16(0);
                w.u32(c.verdict_timeout_ms);
            }
            Record::Generation(g) => w.u64(g.policy_generation),
            Record::NetRequest(r) => {
                w.u8(r.kind as u8);
                w.u8(r.family as u8);
                w.u16(0);
                w.u16(r.src_port);
                w.u16(r.dst_port);
                w.bytes(&r.src_addr);
                w.bytes(&r.dst_addr);
                w.bytes(&r.sha256);
                w.u32(r.uid);
                w.u32(r.euid);
                w.u32(r.gid);
                w.u32(r.loginuid);
                w.u32(r.sessionid);
                w.u32(r.pid);
                w.u32(r.ppid);
                // CAST: bounded above by MAX_ANCESTRY.
                w.u8(r.ancestry.len() as u8);
                w.u8(r.program_source as u8);
                w.u16(0);
                w.bytes(r.ancestry.as_bytes());
            }
            Record::ChannelKey(k) => {
                w.u64(k.channel_id);
                w.bytes(&k.key_id);
                w.bytes(&k.key);
                w.bytes(&k.tx_salt);
                w.bytes(&k.tx_iv);
                w.bytes(&k.rx_salt);
                w.bytes(&k.rx_iv);
                w.u8(k.tls as u8);
                w.u8(0);
                w.u16(0);
                w.u32(k.idle_timeout_s);
            }
            Record::HostKeys(k) => w.bytes(&k.encode()),
            Record::Revocations(r) => r.write(&mut w),
            Record::Grant(g) => {
                w.bytes(&g.ticket_id);
                w.bytes(&g.pair_secret);
                w.u64(g.expires_s);
                w.u64(g.generation);
                w.u32(g.valid_s);
                w.u32(g.epoch);
                w.u8(g.tls as u8);
                w.u8(0);
                w.u16(0);
                w.u32(g.idle_timeout_s);
                w.bytes(&g.gcm_nonce);
                w.bytes(&g.ciphertext);
                w.bytes(&g.tag);
            }
            Record::ChannelClosed(c) => {
                w.u64(c.channel_id);
                w.bytes(&c.key_id);
                w.u8(c.role as u8);
                w.u8(c.reason as u8);
                w.u16(0);
                w.u32(0);
                w.u64(c.bytes_sent);
                w.u64(c.bytes_received);
                w.u64(c.duration_ms);
            }
            Record::IpcRequest(r) => {
                w.bytes(&r.sha256);
                w.bytes(&r.peer_sha256);
                w.u32(r.uid);
                w.u32(r.euid);
                w.u32(r.gid);
                w.u32(r.loginuid);
                w.u32(r.sessionid);
                w.u32(r.pid);
                w.u32(r.ppid);
                w.u32(r.peer_pid);
                w.u32(r.peer_uid);
                w.u32(r.peer_gid);
                // CAST: both bounded above (MAX_ANCESTRY, MAX_PATH_LEN).
                w.u8(r.ancestry.len() as u8);
                w.u8(r.program_source as u8);
                w.u8(r.peer_program_source as u8);
                w.u8(0);
                w.u16(r.path.len() as u16);
                w.u16(0);
                w.bytes(r.ancestry.as_bytes());
                w.bytes(r.path);
            }
        }
        if w.pos != len {
            return Err(EncodeError::BufferTooSmall {
                need: w.pos,
                have: len,
            });
        }
        Ok(len)
    }
}

/// Fixed part of an exec request body: hashes, size, seven ids, counts.
const EXEC_FIXED_LEN: usize = SHA256_LEN + SHA1_LEN + 8 + 7 * 4 + 1 + 1 + 2;
/// Verdict body: decision, cacheable, present mask, log level, generation,
/// nice, pad, pad, cpu limit.
const VERDICT_LEN: usize = 4 + 8 + 4 + 4;
/// Config body: mode, flags, pad, timeout.
const CONFIG_LEN: usize = 8;
/// Config flag: the agent answers net requests.
const CONFIG_NET: u8 = 1;
/// Fixed part of a net request body: kind, family, pad, two ports, two
/// addresses, program hash, seven ids, counts.
const NET_FIXED_LEN: usize = 1 + 1 + 2 + 2 + 2 + 16 + 16 + SHA256_LEN + 7 * 4 + 1 + 1 + 2;
/// Fixed part of an IPC request body: two program hashes, ten ids,
/// ancestry count, two sources, pad, path length, pad.
const IPC_FIXED_LEN: usize = 2 * SHA256_LEN + 10 * 4 + 1 + 1 + 1 + 1 + 2 + 2;
/// Fixed part of a file request body: access, flags, source, ancestry
/// count, two path lengths, program hash, seven ids, device, inode.
const FILE_FIXED_LEN: usize = 1 + 1 + 1 + 1 + 2 + 2 + SHA256_LEN + 7 * 4 + 8 + 8;
/// Generation body: the generation.
const GENERATION_LEN: usize = 8;
const OBL_NICE: u8 = 1;
const OBL_CPU: u8 = 2;
const OBL_ENCRYPT: u8 = 4;
/// Channel key body: channel id, key id, key, two salts and ivs, TLS
/// version, three pads, idle timeout.
const CHANNEL_KEY_BODY_LEN: usize = 8
    + CHANNEL_KEY_ID_LEN
    + CHANNEL_KEY_LEN
    + 2 * (CHANNEL_SALT_LEN + CHANNEL_IV_LEN)
    + 1
    + 1
    + 2
    + 4;

/// Grant body: ticket id, pair secret, expiry, generation, validity,
/// epoch, TLS version, three pads, idle timeout, the sealed ticket.
const GRANT_BODY_LEN: usize = ticket::TICKET_ID_LEN
    + ticket::PAIR_SECRET_LEN
    + 8
    + 8
    + 4
    + 4
    + 1
    + 1
    + 2
    + 4
    + ticket::GCM_NONCE_LEN
    + ticket::PLAIN_LEN
    + ticket::GCM_TAG_LEN;
const _: () = assert!(HEADER_LEN + GRANT_BODY_LEN <= MAX_RECORD_LEN);
const _: () = assert!(HEADER_LEN + ticket::MAX_REVOCATIONS_LEN <= MAX_RECORD_LEN);

/// Channel closed body: channel id, key id, role, reason, two pads, bytes sent,
/// bytes received, duration.
const CHANNEL_CLOSED_LEN: usize = 8 + CHANNEL_KEY_ID_LEN + 1 + 1 + 2 + 4 + 3 * 8;

/// Decodes one whole record.
pub fn decode(buf: &[u8]) -> Result<(Header, Record<'_>), DecodeError> {
    let header = decode_header(buf)?;
    let body = buf.get(HEADER_LEN..).unwrap_or(&[]);
    let mut r = Reader::new(body);
    let short = |e: DecodeError| match e {
        DecodeError::Short { need, .. } => DecodeError::Short {
            need: need.saturating_add(HEADER_LEN),
            have: buf.len(),
        },
        other => other,
    };
    let record = match header.kind {
        Kind::Hello => Record::Hello(Hello {
            agent_pid: r.u32().map_err(short)?,
            agent_version: r.u32().map_err(short)?,
        }),
        Kind::HelloAck => Record::HelloAck(HelloAck {
            module_version: r.u32().map_err(short)?,
            max_record_len: r.u32().map_err(short)?,
            sha256_driver: r.array().map_err(short)?,
            sha1_driver: r.array().map_err(short)?,
            session: r.array().map_err(short)?,
        }),
        Kind::ExecRequest => {
            let sha256 = r.array().map_err(short)?;
            let sha1 = r.array().map_err(short)?;
            let size = r.u64().map_err(short)?;
            let uid = r.u32().map_err(short)?;
            let euid = r.u32().map_err(short)?;
            let gid = r.u32().map_err(short)?;
            let loginuid = r.u32().map_err(short)?;
            let sessionid = r.u32().map_err(short)?;
            let pid = r.u32().map_err(short)?;
            let ppid = r.u32().map_err(short)?;
            let n_anc = r.u8().map_err(short)? as usize;
            let flags = r.u8().map_err(short)?;
            if flags & !EXEC_FLAGS_KNOWN != 0 {
                return Err(DecodeError::InvalidField("flags"));
            }
            let path_len = r.u16().map_err(short)? as usize;
            let (ancestry, path) = r.ancestry_and_path(n_anc, path_len).map_err(short)?;
            Record::ExecRequest(ExecRequest {
                sha256,
                sha1,
                size,
                uid,
                euid,
                gid,
                loginuid,
                sessionid,
                pid,
                ppid,
                ancestry,
                path,
                flags,
            })
        }
        Kind::Verdict => {
            let decision = r.u8().map_err(short)?;
            let decision =
                Decision::from_wire(decision).ok_or(DecodeError::InvalidField("decision"))?;
            let cacheable = match r.u8().map_err(short)? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::InvalidField("cacheable")),
            };
            let present = r.u8().map_err(short)?;
            if present & !(OBL_NICE | OBL_CPU | OBL_ENCRYPT) != 0 {
                return Err(DecodeError::InvalidField("obligations"));
            }
            let log_level = r.u8().map_err(short)?;
            if log_level > 3 {
                return Err(DecodeError::InvalidField("log_level"));
            }
            let policy_generation = r.u64().map_err(short)?;
            let nice = r.i8().map_err(short)?;
            let _pad = r.u8().map_err(short)?;
            let _pad = r.u16().map_err(short)?;
            let cpu = r.u32().map_err(short)?;
            if present & OBL_NICE != 0 && !(-20..=19).contains(&nice) {
                return Err(DecodeError::InvalidField("nice"));
            }
            Record::Verdict(Verdict {
                decision,
                policy_generation,
                cacheable,
                obligations: Obligations {
                    nice: (present & OBL_NICE != 0).then_some(nice),
                    cpu_limit_s: (present & OBL_CPU != 0).then_some(cpu),
                    log_level,
                    encrypt: present & OBL_ENCRYPT != 0,
                },
            })
        }
        Kind::Config => {
            let mode = r.u8().map_err(short)?;
            let mode = Mode::from_wire(mode).ok_or(DecodeError::InvalidField("mode"))?;
            let flags = r.u8().map_err(short)?;
            if flags & !CONFIG_NET != 0 {
                return Err(DecodeError::InvalidField("config_flags"));
            }
            let _pad = r.u16().map_err(short)?;
            let verdict_timeout_ms = r.u32().map_err(short)?;
            if !(1..=MAX_VERDICT_TIMEOUT_MS).contains(&verdict_timeout_ms) {
                return Err(DecodeError::InvalidField("verdict_timeout_ms"));
            }
            Record::Config(Config {
                mode,
                verdict_timeout_ms,
                qualify_net: flags & CONFIG_NET != 0,
            })
        }
        Kind::Generation => Record::Generation(Generation {
            policy_generation: r.u64().map_err(short)?,
        }),
        Kind::NetRequest => {
            let kind = NetKind::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("net_kind"))?;
            let family = Family::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("family"))?;
            if r.u16().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            let src_port = r.u16().map_err(short)?;
            let dst_port = r.u16().map_err(short)?;
            let src_addr: [u8; 16] = r.array().map_err(short)?;
            let dst_addr: [u8; 16] = r.array().map_err(short)?;
            if family == Family::Ipv4
                && (src_addr.get(4..).unwrap_or(&[]).iter().any(|&b| b != 0)
                    || dst_addr.get(4..).unwrap_or(&[]).iter().any(|&b| b != 0))
            {
                return Err(DecodeError::InvalidField("address"));
            }
            let sha256 = r.array().map_err(short)?;
            let uid = r.u32().map_err(short)?;
            let euid = r.u32().map_err(short)?;
            let gid = r.u32().map_err(short)?;
            let loginuid = r.u32().map_err(short)?;
            let sessionid = r.u32().map_err(short)?;
            let pid = r.u32().map_err(short)?;
            let ppid = r.u32().map_err(short)?;
            let n_anc = r.u8().map_err(short)? as usize;
            let program_source = ProgramSource::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("program_source"))?;
            if r.u16().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            let ancestry = r.ancestry(n_anc).map_err(short)?;
            Record::NetRequest(NetRequest {
                kind,
                family,
                src_addr,
                src_port,
                dst_addr,
                dst_port,
                sha256,
                program_source,
                uid,
                euid,
                gid,
                loginuid,
                sessionid,
                pid,
                ppid,
                ancestry,
            })
        }
        Kind::ChannelKey => {
            let channel_id = r.u64().map_err(short)?;
            let key_id = r.array().map_err(short)?;
            let key = r.array().map_err(short)?;
            let tx_salt = r.array().map_err(short)?;
            let tx_iv = r.array().map_err(short)?;
            let rx_salt = r.array().map_err(short)?;
            let rx_iv = r.array().map_err(short)?;
            let tls = ChannelTls::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("tls"))?;
            if r.u8().map_err(short)? != 0 || r.u16().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            Record::ChannelKey(ChannelKey {
                channel_id,
                key_id,
                key,
                tx_salt,
                tx_iv,
                rx_salt,
                rx_iv,
                tls,
                idle_timeout_s: r.u32().map_err(short)?,
            })
        }
        Kind::HostKeys => {
            let b = r.bytes(r.remaining()).map_err(short)?;
            Record::HostKeys(ticket::HostKeys::decode(b)?)
        }
        Kind::Revocations => {
            let b = r.bytes(r.remaining()).map_err(short)?;
            Record::Revocations(ticket::Revocations::decode(b)?)
        }
        Kind::Grant => {
            let ticket_id = r.array().map_err(short)?;
            let pair_secret = r.array().map_err(short)?;
            let expires_s = r.u64().map_err(short)?;
            let generation = r.u64().map_err(short)?;
            let valid_s = r.u32().map_err(short)?;
            let epoch = r.u32().map_err(short)?;
            let tls = ChannelTls::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("tls"))?;
            if r.u8().map_err(short)? != 0 || r.u16().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            Record::Grant(Grant {
                ticket_id,
                pair_secret,
                expires_s,
                valid_s,
                generation,
                epoch,
                tls,
                idle_timeout_s: r.u32().map_err(short)?,
                gcm_nonce: r.array().map_err(short)?,
                ciphertext: r.array().map_err(short)?,
                tag: r.array().map_err(short)?,
            })
        }
        Kind::ChannelClosed => {
            let channel_id = r.u64().map_err(short)?;
            let key_id = r.array().map_err(short)?;
            let role = ChannelRole::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("role"))?;
            let reason = CloseReason::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("reason"))?;
            if r.u16().map_err(short)? != 0 || r.u32().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            Record::ChannelClosed(ChannelClosed {
                channel_id,
                key_id,
                role,
                reason,
                bytes_sent: r.u64().map_err(short)?,
                bytes_received: r.u64().map_err(short)?,
                duration_ms: r.u64().map_err(short)?,
            })
        }
        Kind::Peers => {
            let n = r.u16().map_err(short)? as usize;
            if r.u16().map_err(short)? != 0 || r.u32().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            if n > MAX_PEERS {
                return Err(DecodeError::InvalidField("peer_count"));
            }
            Record::Peers(Peers::new(r.bytes(n * PEER_LEN).map_err(short)?)?)
        }
        Kind::FileRequest => {
            let access = FileAccess::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("access"))?;
            let flags = r.u8().map_err(short)?;
            if flags & !FILE_FLAGS_KNOWN != 0 {
                return Err(DecodeError::InvalidField("flags"));
            }
            let program_source = ProgramSource::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("program_source"))?;
            let n_anc = r.u8().map_err(short)? as usize;
            let path_len = r.u16().map_err(short)? as usize;
            let to_len = r.u16().map_err(short)? as usize;
            if to_len > MAX_PATH_LEN {
                return Err(DecodeError::InvalidField("to_len"));
            }
            if path_len.saturating_add(to_len) > MAX_FILE_PATHS_LEN {
                return Err(DecodeError::InvalidField("path_len"));
            }
            let sha256 = r.array().map_err(short)?;
            let uid = r.u32().map_err(short)?;
            let euid = r.u32().map_err(short)?;
            let gid = r.u32().map_err(short)?;
            let loginuid = r.u32().map_err(short)?;
            let sessionid = r.u32().map_err(short)?;
            let pid = r.u32().map_err(short)?;
            let ppid = r.u32().map_err(short)?;
            let dev = r.u64().map_err(short)?;
            let ino = r.u64().map_err(short)?;
            let (ancestry, path) = r.ancestry_and_path(n_anc, path_len).map_err(short)?;
            let to = r.bytes(to_len).map_err(short)?;
            if to.contains(&0) {
                return Err(DecodeError::InvalidField("to"));
            }
            let renames = access == FileAccess::Rename || flags & FILE_LINK != 0;
            if renames == to.is_empty() {
                return Err(DecodeError::InvalidField("to"));
            }
            Record::FileRequest(FileRequest {
                access,
                flags,
                sha256,
                program_source,
                uid,
                euid,
                gid,
                loginuid,
                sessionid,
                pid,
                ppid,
                dev,
                ino,
                ancestry,
                path,
                to,
            })
        }
        Kind::Sealed => {
            let seq = r.u64().map_err(short)?;
            let mac = r.array().map_err(short)?;
            let inner = r.bytes(r.remaining()).map_err(short)?;
            Record::Sealed(Sealed::new(seq, mac, inner)?)
        }
        Kind::FileSetPaths => {
            let n = r.u16().map_err(short)? as usize;
            if r.u16().map_err(short)? != 0 || r.u32().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            let f = FileSetPaths::new(r.bytes(r.remaining()).map_err(short)?)?;
            if f.len() != n {
                return Err(DecodeError::InvalidField("file_set_path_count"));
            }
            Record::FileSetPaths(f)
        }
        Kind::FileSets => {
            let n = r.u16().map_err(short)? as usize;
            if r.u16().map_err(short)? != 0 || r.u32().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            if n > MAX_FILE_SET_ENTRIES {
                return Err(DecodeError::InvalidField("file_set_count"));
            }
            Record::FileSets(FileSets::new(
                r.bytes(n * FILE_SET_ENTRY_LEN).map_err(short)?,
            )?)
        }
        Kind::IpcRequest => {
            let sha256 = r.array().map_err(short)?;
            let peer_sha256 = r.array().map_err(short)?;
            let uid = r.u32().map_err(short)?;
            let euid = r.u32().map_err(short)?;
            let gid = r.u32().map_err(short)?;
            let loginuid = r.u32().map_err(short)?;
            let sessionid = r.u32().map_err(short)?;
            let pid = r.u32().map_err(short)?;
            let ppid = r.u32().map_err(short)?;
            let peer_pid = r.u32().map_err(short)?;
            let peer_uid = r.u32().map_err(short)?;
            let peer_gid = r.u32().map_err(short)?;
            let n_anc = r.u8().map_err(short)? as usize;
            let program_source = ProgramSource::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("program_source"))?;
            let peer_program_source = ProgramSource::from_wire(r.u8().map_err(short)?)
                .ok_or(DecodeError::InvalidField("peer_program_source"))?;
            if r.u8().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            let path_len = r.u16().map_err(short)? as usize;
            if r.u16().map_err(short)? != 0 {
                return Err(DecodeError::InvalidField("reserved"));
            }
            let (ancestry, path) = r.ancestry_and_path(n_anc, path_len).map_err(short)?;
            Record::IpcRequest(IpcRequest {
                sha256,
                program_source,
                uid,
                euid,
                gid,
                loginuid,
                sessionid,
                pid,
                ppid,
                ancestry,
                peer_sha256,
                peer_program_source,
                peer_pid,
                peer_uid,
                peer_gid,
                path,
            })
        }
    };
    r.finish()?;
    Ok((header, record))
}

#[cfg(test)]
mod tests;

pub mod addr;
pub mod backstop;
pub mod bound;
pub mod cache;
pub mod deferred;
pub mod elf;
pub mod fairq;
pub mod files;
pub mod grants;
pub mod hkdf;
pub mod hold;
pub mod lineage;
pub mod marks;
pub mod seal;
pub mod sorted;
pub mod ticket;
pub mod ticket_kat;
pub mod unixconnect;
pub mod unqualifiable;
