//! `/dev/trustbind`: the agent's end of the module's channel.
//!
//! One opener at a time (the module answers `EBUSY` to a second); records
//! as defined in `trustbind-proto`, one per `read()`/`write()`. The reader
//! ([`Device`]) blocks in `read()` on its own thread; writers
//! ([`DeviceWriter`], a duplicate of the same open file) answer from any
//! thread. Closing the last descriptor tells the module the agent is gone.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use trustbind_proto::{
    self as proto, ChannelClosed, ChannelKey, Config, DecodeError, FileAccess, FileRequest,
    Generation, Hello, HelloAck, IpcRequest, Mode, NetKind, NetRequest, Record, Verdict,
    MAX_RECORD_LEN,
};
use zeroize::Zeroize;

/// The agent's protocol version, sent in `Hello`: it reads `ChannelClosed`
/// records, so the module sends them.
pub const AGENT_VERSION: u32 = proto::AGENT_VERSION_CLOSE_RECORDS;

/// Device failures, naming the device and the step.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A system call failed.
    #[error("{path}: {what}: {source}", path = .path.display())]
    Io {
        /// The device path.
        path: PathBuf,
        /// What the agent was doing.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The module sent something that is not a valid record.
    #[error("{path}: bad record from the module: {0}", path = .1.display())]
    Decode(DecodeError, PathBuf),
    /// The module answered `Hello` with something else.
    #[error("{path}: expected HelloAck, got {kind}", path = .0.display(), kind = .1)]
    Handshake(PathBuf, String),
    /// A record could not be encoded (a bug).
    #[error("cannot encode {0}")]
    Encode(String),
}

/// The process a request is about, as every request record gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// Real gid.
    pub gid: u32,
    /// Audit login uid.
    pub loginuid: u32,
    /// Audit session id.
    pub sessionid: u32,
    /// Thread group id (of the exec'ing task for an exec).
    pub pid: u32,
    /// Its parent's.
    pub ppid: u32,
    /// SHA-256 of ancestors' programs, parent first.
    pub ancestry: Vec<[u8; 32]>,
}

/// The [`Process`] of a request record (`ExecRequest`, `NetRequest`,
/// `IpcRequest`, `FileRequest`: the same fields in each).
macro_rules! process_of {
    ($r:expr) => {
        Process {
            uid: $r.uid,
            euid: $r.euid,
            gid: $r.gid,
            loginuid: $r.loginuid,
            sessionid: $r.sessionid,
            pid: $r.pid,
            ppid: $r.ppid,
            ancestry: ancestry_of($r.ancestry),
        }
    };
}

/// An exec the module asks about, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecEvent {
    /// The request exactly as the module wrote it, when the module has a
    /// session (an authority key): the appliance decides on these bytes
    /// and seals its answer to them. Empty otherwise.
    pub module_request: Vec<u8>,
    /// Request id to answer with.
    pub request_id: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
    /// SHA-1 of the file.
    pub sha1: [u8; 20],
    /// Size in bytes.
    pub size: u64,
    /// Who execs.
    pub process: Process,
    /// Path as opened (lossy UTF-8).
    pub path: String,
    /// The ELF loader run as the program (`ld.so ./prog`).
    pub loader_direct: bool,
}

/// A TCP connect or accept the module asks about, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetEvent {
    /// The request exactly as the module wrote it, when the module has a
    /// session (an authority key): the appliance decides on these bytes
    /// and seals its answer to them. Empty otherwise.
    pub module_request: Vec<u8>,
    /// Request id to answer with.
    pub request_id: u64,
    /// Pre-SYN connect, established connect, or accept.
    pub kind: NetKind,
    /// Client end (the connecting side) address.
    pub src_addr: IpAddr,
    /// Client end port (0 on a pre-SYN connect unless bound).
    pub src_port: u16,
    /// Server end address.
    pub dst_addr: IpAddr,
    /// Server end port.
    pub dst_port: u16,
    /// SHA-256 of the process's program.
    pub sha256: [u8; 32],
    /// Who connects or accepts.
    pub process: Process,
    /// A UNIX-domain connect (an [`IpcRequest`]): the listener's side. The
    /// event's `kind` is then [`NetKind::Connect`] and its addresses are
    /// unspecified.
    pub ipc: Option<IpcPeer>,
}

/// The server side of a UNIX-domain connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcPeer {
    /// The socket's absolute path, or `@name` for an abstract one.
    pub path: String,
    /// SHA-256 of the listener's program.
    pub sha256: [u8; 32],
    /// Its thread group id.
    pub pid: u32,
    /// Its effective uid when it listened.
    pub uid: u32,
    /// Its effective gid when it listened.
    pub gid: u32,
}

/// An operation on a protected file the module asks about, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    /// The request exactly as the module wrote it, when the module has a
    /// session (an authority key): the appliance decides on these bytes
    /// and seals its answer to them. Empty otherwise.
    pub module_request: Vec<u8>,
    /// Request id to answer with.
    pub request_id: u64,
    /// Read, write, delete or rename.
    pub access: FileAccess,
    /// The name does not exist yet (`FILE_CREATE`): `dev`/`ino` are its
    /// directory's.
    pub create: bool,
    /// A truncate (`FILE_TRUNCATE`).
    pub truncate: bool,
    /// A new hard link to `path` named `to` (`FILE_LINK`).
    pub link: bool,
    /// SHA-256 of the process's program.
    pub sha256: [u8; 32],
    /// Who operates on the file.
    pub process: Process,
    /// The file's device (`st_dev`).
    pub dev: u64,
    /// Its inode number.
    pub ino: u64,
    /// Its path (lossy UTF-8) as the module gives it: absolute when
    /// `named`, otherwise from the root of its file system, which the run
    /// loop makes absolute on this host.
    pub path: String,
    /// The new path of a rename or hard link.
    pub to: Option<String>,
    /// `path` is the module's own (`FILE_PATH_NAMED`): passed on as it is.
    pub named: bool,
    /// The same for `to` (`FILE_TO_NAMED`).
    pub to_named: bool,
}

impl FileEvent {
    /// The owned form of request `request_id`.
    pub fn of(request_id: u64, r: &FileRequest<'_>) -> Self {
        let link = r.flags & proto::FILE_LINK != 0;
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Self {
            module_request: Vec::new(),
            request_id,
            access: r.access,
            create: r.flags & proto::FILE_CREATE != 0,
            truncate: r.flags & proto::FILE_TRUNCATE != 0,
            link,
            sha256: r.sha256,
            process: process_of!(r),
            dev: r.dev,
            ino: r.ino,
            path: lossy(r.path),
            to: (r.access == FileAccess::Rename || link).then(|| lossy(r.to)),
            named: r.flags & proto::FILE_PATH_NAMED != 0,
            to_named: r.flags & proto::FILE_TO_NAMED != 0,
        }
    }
}

/// What the module asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An exec.
    Exec(ExecEvent),
    /// An operation on a protected file.
    File(FileEvent),
    /// A connect or accept (TCP), or a UNIX-domain connect.
    Net(NetEvent),
    /// One end of a bound channel closed on this host (nothing to answer).
    Closed(ChannelClosed),
}

pub use trustbind_api::module::ip_of;

fn ancestry_of(a: proto::Ancestry<'_>) -> Vec<[u8; 32]> {
    a.iter()
        .filter_map(|h| <[u8; 32]>::try_from(h).ok())
        .collect()
}

impl NetEvent {
    /// The owned form of request `request_id`.
    pub fn of(request_id: u64, r: &NetRequest<'_>) -> Self {
        Self {
            module_request: Vec::new(),
            request_id,
            kind: r.kind,
            src_addr: ip_of(r.family, r.src_addr),
            src_port: r.src_port,
            dst_addr: ip_of(r.family, r.dst_addr),
            dst_port: r.dst_port,
            sha256: r.sha256,
            process: process_of!(r),
            ipc: None,
        }
    }

    /// The owned form of UNIX-domain connect `request_id`.
    pub fn of_ipc(request_id: u64, r: &IpcRequest<'_>) -> Self {
        let none = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        Self {
            module_request: Vec::new(),
            request_id,
            kind: NetKind::Connect,
            src_addr: none,
            src_port: 0,
            dst_addr: none,
            dst_port: 0,
            sha256: r.sha256,
            process: process_of!(r),
            ipc: Some(IpcPeer {
                path: String::from_utf8_lossy(r.path).into_owned(),
                sha256: r.peer_sha256,
                pid: r.peer_pid,
                uid: r.peer_uid,
                gid: r.peer_gid,
            }),
        }
    }
}

/// The reading end (owns the descriptor the module sees as the agent).
#[derive(Debug)]
pub struct Device {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    /// What the module said about itself.
    pub ack: HelloAck,
}

/// A writing end; clone freely.
#[derive(Debug)]
pub struct DeviceWriter {
    path: PathBuf,
    file: File,
}

fn encode(rec: &Record<'_>, id: u64) -> Result<Vec<u8>, DeviceError> {
    let mut buf = vec![0u8; rec.encoded_len()];
    rec.encode(id, &mut buf)
        .map_err(|e| DeviceError::Encode(format!("{:?}: {e}", rec.kind())))?;
    Ok(buf)
}

impl Device {
    /// Opens `path` and greets the module, announcing channel keys v2
    /// when `tickets` (`proto::AGENT_VERSION_TICKETS`).
    pub fn open(path: &Path, tickets: bool) -> Result<Self, DeviceError> {
        let io_err = |what| {
            move |source| DeviceError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open"))?;
        let hello = Record::Hello(Hello {
            agent_pid: std::process::id(),
            agent_version: if tickets {
                proto::AGENT_VERSION_TICKETS
            } else {
                AGENT_VERSION
            },
        });
        file.write_all(&encode(&hello, 1)?)
            .map_err(io_err("write Hello"))?;
        let mut buf = vec![0u8; MAX_RECORD_LEN];
        let n = file.read(&mut buf).map_err(io_err("read HelloAck"))?;
        let got = buf.get(..n).unwrap_or_default();
        let ack = match proto::decode(got) {
            Ok((_, Record::HelloAck(a))) => a,
            Ok((_, other)) => {
                return Err(DeviceError::Handshake(
                    path.to_owned(),
                    format!("{:?}", other.kind()),
                ))
            }
            Err(e) => return Err(DeviceError::Decode(e, path.to_owned())),
        };
        Ok(Self {
            path: path.to_owned(),
            file,
            buf,
            ack,
        })
    }

    /// A writer on the same open file.
    pub fn writer(&self) -> Result<DeviceWriter, DeviceError> {
        Ok(DeviceWriter {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(|source| DeviceError::Io {
                path: self.path.clone(),
                what: "dup",
                source,
            })?,
        })
    }

    /// The module's session public key ([`proto::seal`]), when it was
    /// loaded with an authority key.
    pub fn session(&self) -> Option<[u8; proto::seal::SESSION_PUB_LEN]> {
        self.ack
            .session
            .iter()
            .any(|&b| b != 0)
            .then_some(self.ack.session)
    }

    /// Blocks until the module asks something. Records of kinds the agent
    /// does not handle are skipped.
    pub fn next_event(&mut self) -> Result<Event, DeviceError> {
        loop {
            let n = match self.file.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(DeviceError::Io {
                        path: self.path.clone(),
                        what: "read",
                        source,
                    })
                }
            };
            let got = self.buf.get(..n).unwrap_or_default();
            let (h, rec) =
                proto::decode(got).map_err(|e| DeviceError::Decode(e, self.path.clone()))?;
            // The appliance decides on the module's own bytes when it
            // seals the answer.
            let module_request = if self.session().is_some() {
                got.to_vec()
            } else {
                Vec::new()
            };
            if let Record::NetRequest(r) = rec {
                let mut e = NetEvent::of(h.request_id, &r);
                e.module_request = module_request;
                return Ok(Event::Net(e));
            }
            if let Record::ChannelClosed(c) = rec {
                return Ok(Event::Closed(c));
            }
            if let Record::IpcRequest(r) = rec {
                let mut e = NetEvent::of_ipc(h.request_id, &r);
                e.module_request = module_request;
                return Ok(Event::Net(e));
            }
            if let Record::FileRequest(r) = rec {
                let mut e = FileEvent::of(h.request_id, &r);
                e.module_request = module_request;
                return Ok(Event::File(e));
            }
            if let Record::ExecRequest(r) = rec {
                return Ok(Event::Exec(ExecEvent {
                    module_request,
                    request_id: h.request_id,
                    sha256: r.sha256,
                    sha1: r.sha1,
                    size: r.size,
                    process: process_of!(r),
                    path: String::from_utf8_lossy(r.path).into_owned(),
                    loader_direct: r.flags & trustbind_proto::EXEC_LOADER_DIRECT != 0,
                }));
            }
        }
    }
}

impl DeviceWriter {
    fn send(&mut self, rec: &Record<'_>, id: u64, what: &'static str) -> Result<(), DeviceError> {
        let buf = encode(rec, id)?;
        self.file.write_all(&buf).map_err(|source| DeviceError::Io {
            path: self.path.clone(),
            what,
            source,
        })
    }

    /// Writes a record the appliance sealed for the module, as it is
    /// (`trustbind_proto::seal`). `Ok(false)` if the module no longer
    /// waits for the request it answers (`ENOENT`).
    pub fn sealed(&mut self, bytes: &[u8], what: &'static str) -> Result<bool, DeviceError> {
        let written = self.file.write_all(bytes);
        self.answered(written, what)
    }

    /// What the write of an answer did: `Ok(false)` if the module no
    /// longer waits for the request it answers (`ENOENT`).
    fn answered(&self, written: io::Result<()>, what: &'static str) -> Result<bool, DeviceError> {
        match written {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(DeviceError::Io {
                path: self.path.clone(),
                what,
                source,
            }),
        }
    }

    /// A writer on a descriptor of its own (`dup`), for a write that may
    /// take long (the module walks sealed paths) without holding this one.
    pub fn try_clone(&self) -> io::Result<DeviceWriter> {
        Ok(DeviceWriter {
            path: self.path.clone(),
            file: self.file.try_clone()?,
        })
    }

    /// Answers request `id`. `Ok(false)` if the module no longer waits for
    /// it (timed out or interrupted: `ENOENT`).
    pub fn verdict(&mut self, id: u64, v: Verdict) -> Result<bool, DeviceError> {
        match self.send(&Record::Verdict(v), id, "write Verdict") {
            Ok(()) => Ok(true),
            Err(DeviceError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Answers net request `id` with the channel key `key`, then wipes
    /// `key` and the encoded copy. `Ok(false)` if the module no longer
    /// waits for it.
    pub fn channel_key(&mut self, id: u64, key: &mut ChannelKey) -> Result<bool, DeviceError> {
        let mut rec = Record::ChannelKey(key.clone());
        key.wipe();
        let written = self.send_secret(&rec, id, "write ChannelKey");
        if let Record::ChannelKey(k) = &mut rec {
            k.wipe();
        }
        written
    }

    /// Writes `rec`, which holds key material, with request id `id`, and
    /// wipes its encoding. `Ok(false)` if the module no longer waits for
    /// the request it answers (`ENOENT`).
    fn send_secret(
        &mut self,
        rec: &Record<'_>,
        id: u64,
        what: &'static str,
    ) -> Result<bool, DeviceError> {
        let mut buf = encode(rec, id)?;
        let written = self.file.write_all(&buf);
        buf.zeroize();
        self.answered(written, what)
    }

    /// Answers connect `id` with the channel keys v2 grant `grant` (an
    /// unsealed one: a module without an authority key), then wipes its
    /// pair secret and the encoded copy. `Ok(false)` if the module no
    /// longer waits for it.
    pub fn grant(&mut self, id: u64, grant: &mut proto::Grant) -> Result<bool, DeviceError> {
        let mut rec = Record::Grant(grant.clone());
        grant.wipe();
        let written = self.send_secret(&rec, id, "write Grant");
        if let Record::Grant(g) = &mut rec {
            g.wipe();
        }
        written
    }

    /// Gives a module without an authority key this host's channel keys
    /// v2 host keys: `record` is a `proto::ticket::HostKeys` record as the
    /// appliance pushed it. Every copy of the keys made here is wiped.
    pub fn host_keys(&mut self, record: &[u8]) -> Result<(), DeviceError> {
        let keys = proto::ticket::HostKeys::decode(record)
            .map_err(|e| DeviceError::Decode(e, self.path.clone()))?;
        let mut rec = Record::HostKeys(keys);
        let written = self.send_secret(&rec, 6, "write HostKeys");
        if let Record::HostKeys(k) = &mut rec {
            k.key.zeroize();
            k.prev_key.zeroize();
        }
        written.map(drop)
    }

    /// Gives a module without an authority key the channel keys v2
    /// revocations in force (`record`: a `proto::ticket::Revocations`
    /// record as the appliance pushed it).
    pub fn revocations(&mut self, record: &[u8]) -> Result<(), DeviceError> {
        let r = proto::ticket::Revocations::decode(record)
            .map_err(|e| DeviceError::Decode(e, self.path.clone()))?;
        self.send(&Record::Revocations(r), 7, "write Revocations")
    }

    /// Sets the module's mode and verdict wait, and whether it asks this
    /// agent about TCP connects and accepts.
    pub fn config(
        &mut self,
        mode: Mode,
        verdict_timeout_ms: u32,
        qualify_net: bool,
    ) -> Result<(), DeviceError> {
        let rec = Record::Config(Config {
            mode,
            verdict_timeout_ms,
            qualify_net,
        });
        self.send(&rec, 2, "write Config")
    }

    /// Tells the module the policy generation moved.
    pub fn generation(&mut self, policy_generation: u64) -> Result<(), DeviceError> {
        let rec = Record::Generation(Generation { policy_generation });
        self.send(&rec, 3, "write Generation")
    }

    /// Tells the module the protected hosts' addresses (at most
    /// [`proto::MAX_PEERS`]; the rest are left out).
    pub fn peers(&mut self, addrs: &[IpAddr]) -> Result<(), DeviceError> {
        let bytes = trustbind_api::module::peer_entries(addrs);
        let peers =
            proto::Peers::new(&bytes).map_err(|e| DeviceError::Decode(e, self.path.clone()))?;
        self.send(&Record::Peers(peers), 4, "write Peers")
    }

    /// Tells the module the protected files and directories by identity
    /// (`(st_dev, st_ino)`, sorted, unique, at most
    /// [`proto::MAX_FILE_SET_ENTRIES`]: more is refused, not cut).
    pub fn file_sets(&mut self, ids: &[(u64, u64)]) -> Result<(), DeviceError> {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&(dev, ino)| proto::FileSets::entry(dev, ino))
            .collect();
        let sets =
            proto::FileSets::new(&bytes).map_err(|e| DeviceError::Decode(e, self.path.clone()))?;
        self.send(&Record::FileSets(sets), 5, "write FileSets")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;
    use trustbind_proto::Family;

    #[test]
    fn peer_addresses_become_the_modules_entries() {
        let addrs: Vec<IpAddr> = ["10.99.0.11", "::ffff:10.99.0.12", "fd00::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let bytes = trustbind_api::module::peer_entries(&addrs);
        let got: Vec<(Family, [u8; 16])> = proto::Peers::new(&bytes).unwrap().iter().collect();
        let v4 = |a: [u8; 4]| {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&a);
            x
        };
        let v6: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(
            got,
            vec![
                (Family::Ipv4, v4([10, 99, 0, 11])),
                (Family::Ipv4, v4([10, 99, 0, 12])),
                (Family::Ipv6, v6.octets()),
            ]
        );
        let many: Vec<IpAddr> = (0..300u32).map(|i| IpAddr::V4(Ipv4Addr::from(i))).collect();
        assert_eq!(
            trustbind_api::module::peer_entries(&many).len(),
            proto::MAX_PEERS * proto::PEER_LEN
        );
    }

    #[test]
    fn addresses_are_spelled_as_the_appliance_parses_them() {
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 99, 0, 5]);
        assert_eq!(ip_of(Family::Ipv4, v4).to_string(), "10.99.0.5");
        let mapped = Ipv4Addr::new(10, 99, 0, 5).to_ipv6_mapped().octets();
        assert_eq!(ip_of(Family::Ipv6, mapped).to_string(), "::ffff:10.99.0.5");
        let v6: Ipv6Addr = "fd00::1:2".parse().unwrap();
        assert_eq!(ip_of(Family::Ipv6, v6.octets()).to_string(), "fd00::1:2");
        for a in ["10.99.0.5", "::ffff:10.99.0.5", "fd00::1:2"] {
            assert!(a.parse::<IpAddr>().is_ok());
        }
    }

    #[test]
    fn net_requests_become_owned_events() {
        let h = [7u8; 32];
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[127, 0, 0, 1]);
        let r = NetRequest {
            kind: NetKind::Established,
            family: Family::Ipv4,
            src_addr: src,
            src_port: 40000,
            dst_addr: src,
            dst_port: 443,
            sha256: [1; 32],
            program_source: proto::ProgramSource::Lineage,
            uid: 1,
            euid: 2,
            gid: 3,
            loginuid: 4,
            sessionid: 5,
            pid: 6,
            ppid: 7,
            ancestry: proto::Ancestry::from_bytes(&h).unwrap(),
        };
        let ev = NetEvent::of(9, &r);
        assert_eq!(ev.request_id, 9);
        assert_eq!(ev.kind, NetKind::Established);
        assert_eq!(
            (ev.src_addr.to_string(), ev.src_port, ev.dst_port),
            ("127.0.0.1".into(), 40000, 443)
        );
        assert_eq!(ev.process.ancestry, vec![h]);
        let p = &ev.process;
        assert_eq!((p.uid, p.euid, p.gid, p.pid), (1, 2, 3, 6));
        assert!(ev.ipc.is_none());
    }

    #[test]
    fn ipc_requests_become_owned_events() {
        let h = [7u8; 32];
        let r = IpcRequest {
            sha256: [1; 32],
            program_source: proto::ProgramSource::Lineage,
            uid: 1,
            euid: 2,
            gid: 3,
            loginuid: 4,
            sessionid: 5,
            pid: 6,
            ppid: 7,
            ancestry: proto::Ancestry::from_bytes(&h).unwrap(),
            peer_sha256: [2; 32],
            peer_program_source: proto::ProgramSource::ExeFile,
            peer_pid: 8,
            peer_uid: 9,
            peer_gid: 10,
            path: b"@tb-abs",
        };
        let ev = NetEvent::of_ipc(11, &r);
        assert_eq!((ev.request_id, ev.kind), (11, NetKind::Connect));
        assert_eq!(
            (ev.sha256, ev.process.pid, ev.process.ancestry.clone()),
            ([1; 32], 6, vec![h])
        );
        assert_eq!(
            ev.ipc,
            Some(IpcPeer {
                path: "@tb-abs".into(),
                sha256: [2; 32],
                pid: 8,
                uid: 9,
                gid: 10,
            })
        );
    }

    fn file_request<'a>(access: FileAccess, flags: u8, to: &'a [u8]) -> FileRequest<'a> {
        FileRequest {
            access,
            flags,
            sha256: [1; 32],
            program_source: proto::ProgramSource::Lineage,
            uid: 1,
            euid: 2,
            gid: 3,
            loginuid: 4,
            sessionid: 5,
            pid: 6,
            ppid: 7,
            dev: 0x803,
            ino: 42,
            ancestry: proto::Ancestry::from_bytes(&[]).unwrap(),
            path: b"/srv/db/a b",
            to,
        }
    }

    #[test]
    fn file_requests_become_owned_events() {
        let ev = FileEvent::of(12, &file_request(FileAccess::Read, 0, b""));
        assert_eq!((ev.request_id, ev.access), (12, FileAccess::Read));
        assert_eq!((ev.create, ev.truncate, ev.link), (false, false, false));
        assert_eq!(
            (ev.dev, ev.ino, ev.path.as_str()),
            (0x803, 42, "/srv/db/a b")
        );
        assert_eq!(ev.to, None);
        assert_eq!((ev.process.uid, ev.process.ppid), (1, 7));
        assert!(ev.process.ancestry.is_empty());

        let flags = proto::FILE_CREATE | proto::FILE_TRUNCATE;
        let ev = FileEvent::of(13, &file_request(FileAccess::Write, flags, b""));
        assert_eq!((ev.create, ev.truncate, ev.link), (true, true, false));
        assert_eq!(ev.to, None);

        let ev = FileEvent::of(14, &file_request(FileAccess::Rename, 0, b"/tmp/x"));
        assert_eq!(ev.to.as_deref(), Some("/tmp/x"));

        let link = proto::FILE_LINK | proto::FILE_CREATE;
        let ev = FileEvent::of(15, &file_request(FileAccess::Write, link, b"/tmp/l"));
        assert!(ev.link && ev.create);
        assert_eq!(ev.to.as_deref(), Some("/tmp/l"));
    }

    #[test]
    fn file_sets_are_written_as_the_modules_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let mut w = DeviceWriter {
            path: path.clone(),
            file: File::create(&path).unwrap(),
        };
        w.file_sets(&[(0x803, 2), (0x803, 77), (0x900, 1)]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, rec) = proto::decode(&bytes).unwrap();
        let Record::FileSets(f) = rec else {
            panic!("{:?}", rec.kind())
        };
        assert_eq!(
            f.iter().collect::<Vec<_>>(),
            vec![(0x803, 2), (0x803, 77), (0x900, 1)]
        );
        // Unsorted or too many: refused before anything is written.
        assert!(w.file_sets(&[(2, 1), (1, 1)]).is_err());
        let many: Vec<(u64, u64)> = (0..=proto::MAX_FILE_SET_ENTRIES as u64)
            .map(|i| (1, i))
            .collect();
        assert!(w.file_sets(&many).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    /// The bare channel keys v2 records a module without an authority key
    /// is given: as the appliance's records say, the caller's copies of
    /// the secrets wiped; a record that does not decode is not written.
    #[test]
    fn channel_keys_v2_records_are_written_as_the_modules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let mut w = DeviceWriter {
            path: path.clone(),
            file: File::create(&path).unwrap(),
        };
        let keys = proto::ticket::HostKeys {
            host: [1; 16],
            epoch: 9,
            key: [2; 32],
            prev_epoch: 8,
            prev_key: [3; 32],
        };
        w.host_keys(&keys.encode()).unwrap();
        let mut revoked = vec![0u8; proto::ticket::MAX_REVOCATIONS_LEN];
        let n = proto::ticket::Revocations::encode(5, &[[4; 16]], &[], &mut revoked).unwrap();
        w.revocations(&revoked[..n]).unwrap();
        let mut grant = proto::Grant {
            ticket_id: [5; 16],
            pair_secret: [6; 32],
            expires_s: 100,
            valid_s: 60,
            generation: 5,
            epoch: 9,
            tls: proto::ChannelTls::Tls13,
            idle_timeout_s: 0,
            gcm_nonce: [7; proto::ticket::GCM_NONCE_LEN],
            ciphertext: [8; proto::ticket::PLAIN_LEN],
            tag: [9; proto::ticket::GCM_TAG_LEN],
        };
        let want = grant.clone();
        assert!(w.grant(41, &mut grant).unwrap());
        assert_eq!(grant.pair_secret, [0; 32], "the caller's copy is wiped");
        assert!(w.host_keys(&[0; 5]).is_err());
        let bytes = std::fs::read(&path).unwrap();
        // The three records, one after the other, as the module reads them.
        let revocations = proto::ticket::Revocations::decode(&revoked[..n]).unwrap();
        let mut want_bytes = encode(&Record::HostKeys(keys), 6).unwrap();
        want_bytes.extend(encode(&Record::Revocations(revocations), 7).unwrap());
        want_bytes.extend(encode(&Record::Grant(want), 41).unwrap());
        assert_eq!(bytes, want_bytes);
    }
}
