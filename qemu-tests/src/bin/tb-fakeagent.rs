//! `tb-fakeagent`: a stand-in for `trustbind-agent` in VM tests of the
//! module's exec path. It answers the module itself from an allowlist of
//! file hashes it computes in user space at start, so a test can check
//! both the module's enforcement and that its in-kernel SHA-256/SHA-1 match
//! user-space hashes of the same files.
//!
//! ```text
//! tb-fakeagent --mode enforce|permissive|disabled [--timeout-ms N]
//!              [--allow-dir DIR]... [--allow FILE]... [--no-cache]
//!              [--nice-path PATH:N]... [--net] [--net-allow FILE]...
//!              [--deny-loader-direct] [--net-bind [--net-no-key]
//!              [--net-key-delay-ms N] [--net-tls12] [--net-idle-s N]]
//!              [--net-accept-delay-ms N]
//!              [--unix-allow CLIENT_FILE:SERVER_FILE]...
//!              [--pause-file FILE] [--delay-path PATH:MS]...
//!              [--no-cache-path PATH]...
//!              [--file-protect PATH]... [--file-sets-clear]
//!              [--file-path PATH]... [--file-paths-clear] [--file-deny PREFIX]...
//!              [--file-deny-write PREFIX]... [--file-allow-prog FILE]...
//!              --log FILE
//! ```
//!
//! `--pause-file FILE`: while FILE exists the agent reads nothing (requests
//! pile up in the module's queue; the one already read is answered, and
//! an agent already waiting in `read()` when FILE appears takes one more
//! request before it looks again).
//! `--delay-path PATH:MS`: an exec request about PATH, or a UNIX connect
//! to the socket named PATH, is answered MS ms late, from another thread,
//! while the agent goes on answering others.
//! `--no-cache-path PATH`: verdicts about PATH are never cacheable (others
//! are unless `--no-cache`).
//!
//! Every request becomes one line in the log:
//! `exec <path> sha256=<hex> sha1=<hex> size=<n> uid=<u> euid=<e> pid=<p> anc=<hex,...> direct=0|1 -> allow|deny`
//! (`anc`: the ancestry, nearest first; `-` when empty; `direct=1`: the ELF
//! loader run as the program, which `--deny-loader-direct` denies).
//!
//! With `--net` (implied by `--net-allow`) it asks the module to qualify TCP
//! connects and accepts, and allows those of the programs named by
//! `--net-allow` (by hash; any other program's are denied; `--allow` and
//! `--allow-dir` are about execs only). Each becomes one line:
//! `net connect|accept <src> -> <dst> sha256=<hex> from=lineage|exe uid=<u> pid=<p> anc=<hex,...> -> allow|deny`
//! (`src` the client end, `dst` the server end).
//! With `--net-bind` an allowed connect carries the `encrypt` obligation,
//! so the module asks again once it is established (`net established ...`);
//! that and an allowed accept are answered with a channel key, the same
//! for both ends of one 4-tuple (tx and rx crossed), drawn from
//! `/dev/urandom`; the line ends `-> key <channel id> <key id hex>`. With
//! `--net-no-key` established connects get a deny verdict instead of a key
//! (the module must reset them); `--net-key-delay-ms N` answers an
//! established connect's key N ms late (`--net-accept-delay-ms N`: any
//! accept's answer); `--net-tls12` keys channels for
//! TLS 1.2 records, `--net-idle-s N` with an idle timeout of N seconds.
//! With `--unix-allow` (implies `--net`) UNIX-domain connects are allowed
//! for the named (client program, server program) pairs, by hash, and
//! denied for any other pair; each becomes one line:
//! `unix path=<name> sha256=<hex> from=lineage|exe peer_sha256=<hex> peer_from=lineage|exe uid=<u> pid=<p> peer_uid=<u> peer_pid=<p> anc=<hex,...> -> allow|deny`.
//! Verdicts are cacheable unless `--no-cache`; an allowed exec of a path
//! named by `--nice-path` is allowed with the condition "nice N".
//! Its `Hello` announces `AGENT_VERSION_CLOSE_RECORDS`, so the module
//! reports each bound socket's close; each becomes one line:
//! `closed <channel id> <key id hex> connect|accept sent=<n> received=<n> ms=<n> closed|idle`.
//! With `--file-protect` it sends the module the identities (`st_dev`,
//! `st_ino`) of the named files and directories as its protected file
//! sets (`--file-sets-clear`: an empty `FileSets`, as root would send);
//! with `--file-path` (`--file-paths-clear`: none) an unsealed
//! `FileSetPaths` record of the named paths, which the module resolves
//! itself. File requests are allowed unless their path (from the root of
//! the file's file system) starts with a `--file-deny` prefix (any access)
//! or a `--file-deny-write` prefix (write, delete, rename), and the
//! program is not one named by `--file-allow-prog` (by hash); each becomes
//! one line:
//! `file read|write|delete|rename <path>[ => <to>] flags=<n> sha256=<hex> from=lineage|exe uid=<u> pid=<p> ino=<i> -> allow|deny`.
//! File verdicts are cacheable unless `--no-cache`.
//! SIGUSR1 moves the policy generation by one (a `Generation` record, logged
//! as `generation <n>`), as the appliance does on a policy switch.
//! SIGUSR2 sends the `--file-path` record again (logged as `paths sent`),
//! as the agent does every 30 s, so the module resolves the paths again.
//! On SIGTERM or SIGINT it sets the module to disabled mode before it
//! exits, so the VM stays usable.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use trustbind_proto::{
    self as proto, ChannelKey, ChannelRole, ChannelTls, CloseReason, Config, Decision, Family,
    FileAccess, FileRequest, FileSets, Generation, Hello, IpcRequest, Mode, NetKind, NetRequest,
    Obligations, ProgramSource, Record, Verdict,
};

static STOP: AtomicBool = AtomicBool::new(false);
static BUMP: AtomicBool = AtomicBool::new(false);
static RESEND: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        BUMP.store(true, Ordering::SeqCst);
    } else if sig == libc::SIGUSR2 {
        RESEND.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hash_file(p: &Path) -> std::io::Result<[u8; 32]> {
    let mut f = File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

fn add_dir(
    dir: &Path,
    allow: &mut HashSet<[u8; 32]>,
    seen: &mut HashSet<(u64, u64)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        // Follow symlinks (the kernel hashes what a link points at), and
        // hash each file once however many names it has.
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() && seen.insert((m.dev(), m.ino())) => {
                if let Ok(h) = hash_file(&p) {
                    allow.insert(h);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn endpoint(family: Family, a: &[u8; 16], port: u16) -> String {
    match family {
        Family::Ipv4 => format!("{}.{}.{}.{}:{port}", a[0], a[1], a[2], a[3]),
        Family::Ipv6 => format!("[{}]:{port}", std::net::Ipv6Addr::from(*a)),
    }
}

fn net_line(r: &NetRequest<'_>, allowed: bool) -> String {
    format!(
        "net {} {} -> {} sha256={} from={} uid={} pid={} anc={} -> {}",
        match r.kind {
            NetKind::Connect => "connect",
            NetKind::Accept => "accept",
            NetKind::Established => "established",
            NetKind::Listen => "listen",
        },
        endpoint(r.family, &r.src_addr, r.src_port),
        endpoint(r.family, &r.dst_addr, r.dst_port),
        hex(&r.sha256),
        match r.program_source {
            ProgramSource::Lineage => "lineage",
            ProgramSource::ExeFile => "exe",
        },
        r.uid,
        r.pid,
        anc_field(&r.ancestry),
        if allowed { "allow" } else { "deny" }
    )
}

fn source(s: ProgramSource) -> &'static str {
    match s {
        ProgramSource::Lineage => "lineage",
        ProgramSource::ExeFile => "exe",
    }
}

fn unix_line(r: &IpcRequest<'_>, allowed: bool) -> String {
    format!(
        "unix path={} sha256={} from={} peer_sha256={} peer_from={} uid={} pid={} peer_uid={} peer_pid={} anc={} -> {}",
        String::from_utf8_lossy(r.path),
        hex(&r.sha256),
        source(r.program_source),
        hex(&r.peer_sha256),
        source(r.peer_program_source),
        r.uid,
        r.pid,
        r.peer_uid,
        r.peer_pid,
        anc_field(&r.ancestry),
        if allowed { "allow" } else { "deny" }
    )
}

fn anc_field(a: &proto::Ancestry<'_>) -> String {
    if a.is_empty() {
        "-".to_owned()
    } else {
        a.iter().map(hex).collect::<Vec<_>>().join(",")
    }
}

fn send(dev: &mut File, rec: &Record<'_>, id: u64) -> Result<(), String> {
    let mut buf = vec![0u8; rec.encoded_len()];
    rec.encode(id, &mut buf).map_err(|e| e.to_string())?;
    dev.write_all(&buf)
        .map_err(|e| format!("write {:?}: {e}", rec.kind()))
}

/// Sends `verdict` for request `id`, or `late_ms` ms late from another
/// thread (the device takes writes from any thread of the agent) while
/// the agent goes on answering others.
fn answer(
    dev: &mut File,
    verdict: &Record<'_>,
    id: u64,
    late_ms: Option<u64>,
) -> Result<(), String> {
    let Some(ms) = late_ms else {
        return match send(dev, verdict, id) {
            // The requester gave up (timeout, signal): nothing to answer.
            Err(e) if e.contains("No such file") => Ok(()),
            r => r,
        };
    };
    let mut late = dev
        .try_clone()
        .map_err(|e| format!("dup /dev/trustbind: {e}"))?;
    let mut out = vec![0u8; verdict.encoded_len()];
    verdict.encode(id, &mut out).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let _ = late.write_all(&out);
    });
    Ok(())
}

fn run() -> Result<(), String> {
    let mut mode = None;
    let mut timeout_ms = 3000;
    let mut allow = HashSet::new();
    let mut seen = HashSet::new();
    let mut log_path = None;
    let mut cacheable = true;
    let mut deny_loader_direct = false;
    let mut nice: HashMap<String, i8> = HashMap::new();
    let mut net = false;
    let mut net_allow = HashSet::new();
    let mut net_bind = false;
    let mut net_no_key = false;
    let mut key_delay_ms = 0u64;
    let mut accept_delay_ms = 0u64;
    let mut terms = (ChannelTls::Tls13, 0u32);
    let mut unix_allow: HashSet<([u8; 32], [u8; 32])> = HashSet::new();
    let mut pause_file: Option<String> = None;
    let mut delay: HashMap<String, u64> = HashMap::new();
    let mut no_cache_paths: HashSet<String> = HashSet::new();
    let mut file_protect: Vec<(u64, u64)> = Vec::new();
    let mut file_deny: Vec<String> = Vec::new();
    let mut file_sets_clear = false;
    let mut file_paths: Option<Vec<String>> = None;
    let mut file_deny_write: Vec<String> = Vec::new();
    let mut file_allow_prog: HashSet<[u8; 32]> = HashSet::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mode" => {
                mode = Some(match val()?.as_str() {
                    "enforce" => Mode::Enforce,
                    "permissive" => Mode::Permissive,
                    "disabled" => Mode::Disabled,
                    m => return Err(format!("unknown mode {m}")),
                })
            }
            "--timeout-ms" => timeout_ms = val()?.parse().map_err(|e| format!("{e}"))?,
            "--allow-dir" => {
                let d = val()?;
                add_dir(Path::new(&d), &mut allow, &mut seen).map_err(|e| format!("{d}: {e}"))?
            }
            "--allow" => {
                let f = val()?;
                allow.insert(hash_file(Path::new(&f)).map_err(|e| format!("{f}: {e}"))?);
            }
            "--net" => net = true,
            "--net-allow" => {
                let f = val()?;
                net = true;
                net_allow.insert(hash_file(Path::new(&f)).map_err(|e| format!("{f}: {e}"))?);
            }
            "--unix-allow" => {
                let v = val()?;
                let (c, sv) = v
                    .split_once(':')
                    .ok_or(format!("--unix-allow {v}: want CLIENT_FILE:SERVER_FILE"))?;
                let h = |f: &str| hash_file(Path::new(f)).map_err(|e| format!("{f}: {e}"));
                net = true;
                unix_allow.insert((h(c)?, h(sv)?));
            }
            "--net-bind" => net_bind = true,
            "--net-no-key" => net_no_key = true,
            "--net-tls12" => terms.0 = ChannelTls::Tls12,
            "--net-idle-s" => terms.1 = val()?.parse().map_err(|e| format!("--net-idle-s: {e}"))?,
            "--net-key-delay-ms" => {
                key_delay_ms = val()?
                    .parse()
                    .map_err(|e| format!("--net-key-delay-ms: {e}"))?
            }
            "--net-accept-delay-ms" => {
                accept_delay_ms = val()?
                    .parse()
                    .map_err(|e| format!("--net-accept-delay-ms: {e}"))?
            }
            "--log" => log_path = Some(val()?),
            "--pause-file" => pause_file = Some(val()?),
            "--no-cache-path" => {
                no_cache_paths.insert(val()?);
            }
            "--delay-path" => {
                let v = val()?;
                let (p, ms) = v
                    .rsplit_once(':')
                    .ok_or(format!("--delay-path {v}: want PATH:MS"))?;
                let ms = ms.parse().map_err(|e| format!("--delay-path {v}: {e}"))?;
                delay.insert(p.to_owned(), ms);
            }
            "--no-cache" => cacheable = false,
            "--file-protect" => {
                use std::os::unix::fs::MetadataExt;
                let v = val()?;
                let m = std::fs::metadata(&v).map_err(|e| format!("--file-protect {v}: {e}"))?;
                file_protect.push((m.dev(), m.ino()));
            }
            "--file-sets-clear" => file_sets_clear = true,
            "--file-path" => {
                let v = val()?;
                file_paths.get_or_insert_with(Vec::new).push(v);
            }
            "--file-paths-clear" => {
                file_paths.get_or_insert_with(Vec::new);
            }
            "--file-deny" => file_deny.push(val()?),
            "--file-deny-write" => file_deny_write.push(val()?),
            "--file-allow-prog" => {
                let v = val()?;
                file_allow_prog.insert(hash_file(Path::new(&v)).map_err(|e| format!("{v}: {e}"))?);
            }
            "--deny-loader-direct" => deny_loader_direct = true,
            "--nice-path" => {
                let v = val()?;
                let (p, n) = v
                    .rsplit_once(':')
                    .ok_or(format!("--nice-path {v}: want PATH:N"))?;
                let n = n.parse().map_err(|e| format!("--nice-path {v}: {e}"))?;
                nice.insert(p.to_owned(), n);
            }
            _ => return Err(format!("unknown argument {a}")),
        }
    }
    let mode = mode.ok_or("--mode is required")?;
    let mut log = File::create(log_path.ok_or("--log is required")?).map_err(|e| e.to_string())?;

    // No SA_RESTART: a signal must interrupt the blocking read().
    // SAFETY: A zeroed sigaction is valid; the handler only stores to an
    // atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut());
    }
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/trustbind")
        .map_err(|e| format!("open /dev/trustbind: {e}"))?;
    let hello = Record::Hello(Hello {
        agent_pid: std::process::id(),
        agent_version: proto::AGENT_VERSION_CLOSE_RECORDS,
    });
    send(&mut dev, &hello, 1)?;
    let mut buf = vec![0u8; proto::MAX_RECORD_LEN];
    let n = dev
        .read(&mut buf)
        .map_err(|e| format!("read HelloAck: {e}"))?;
    match proto::decode(&buf[..n]) {
        Ok((_, Record::HelloAck(_))) => {}
        other => return Err(format!("expected HelloAck, got {other:?}")),
    }
    let config = |mode| {
        Record::Config(Config {
            mode,
            verdict_timeout_ms: timeout_ms,
            qualify_net: net,
        })
    };
    send(&mut dev, &config(mode), 2)?;
    if !file_protect.is_empty() {
        file_protect.sort_unstable();
        file_protect.dedup();
        let bytes: Vec<u8> = file_protect
            .iter()
            .flat_map(|&(d, i)| FileSets::entry(d, i))
            .collect();
        let sets = FileSets::new(&bytes).map_err(|e| format!("file sets: {e}"))?;
        send(&mut dev, &Record::FileSets(sets), 5)?;
    } else if file_sets_clear {
        send(
            &mut dev,
            &Record::FileSets(FileSets::new(&[]).expect("empty")),
            5,
        )?;
    }
    let paths_body: Option<Vec<u8>> = file_paths.as_ref().map(|paths| {
        paths
            .iter()
            .flat_map(|p| p.bytes().chain(std::iter::once(0)))
            .collect()
    });
    let send_paths = |dev: &mut File| -> Result<(), String> {
        let Some(body) = &paths_body else {
            return Ok(());
        };
        let rec = proto::FileSetPaths::new(body).map_err(|e| format!("file paths: {e}"))?;
        send(dev, &Record::FileSetPaths(rec), 6)
    };
    send_paths(&mut dev)?;
    writeln!(
        log,
        "ready mode={mode:?} allowlist={} net={net} net_allowlist={}",
        allow.len(),
        net_allow.len()
    )
    .map_err(|e| e.to_string())?;
    log.flush().ok();

    let mut generation = 1u64;
    let mut channels = Channels::default();
    // On SIGTERM: disabled mode first (nothing new is asked), then answer
    // what is still queued (non-blocking reads until none is left), so a
    // stop never leaves an exec that raced it unanswered.
    let mut draining = false;
    loop {
        if STOP.load(Ordering::SeqCst) && !draining {
            send(&mut dev, &config(Mode::Disabled), 3)?;
            use std::os::fd::AsRawFd;
            // SAFETY: fcntl on a descriptor this process owns.
            unsafe {
                let fd = dev.as_raw_fd();
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
            draining = true;
        }
        if RESEND.swap(false, Ordering::SeqCst) {
            send_paths(&mut dev)?;
            writeln!(log, "paths sent").ok();
            log.flush().ok();
        }
        if BUMP.swap(false, Ordering::SeqCst) {
            generation += 1;
            let rec = Record::Generation(Generation {
                policy_generation: generation,
            });
            send(&mut dev, &rec, 4)?;
            writeln!(log, "generation {generation}").ok();
            log.flush().ok();
        }
        if let Some(p) = pause_file.as_ref().filter(|_| !draining) {
            if Path::new(p).exists() {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        }
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if draining && e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("read: {e}")),
        };
        let (h, rec) = proto::decode(&buf[..n]).map_err(|e| format!("decode: {e}"))?;
        let r = match rec {
            Record::ExecRequest(r) => r,
            Record::NetRequest(r) => {
                if r.kind == NetKind::Accept && accept_delay_ms > 0 {
                    std::thread::sleep(std::time::Duration::from_millis(accept_delay_ms));
                }
                let allowed = net_allow.contains(&r.sha256);
                let keyed = net_bind
                    && allowed
                    && match r.kind {
                        NetKind::Connect | NetKind::Listen => false,
                        NetKind::Established => !net_no_key,
                        NetKind::Accept => true,
                    };
                let answer = if keyed {
                    if r.kind == NetKind::Established && key_delay_ms > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(key_delay_ms));
                    }
                    let (key, id) = channels.key_for(&r, terms)?;
                    writeln!(
                        log,
                        "{} key {id} {}",
                        net_line(&r, true).trim_end_matches(" allow"),
                        hex(&key.key_id)
                    )
                    .ok();
                    Record::ChannelKey(key)
                } else {
                    let granted = allowed && !(r.kind == NetKind::Established && net_no_key);
                    writeln!(log, "{}", net_line(&r, granted)).ok();
                    Record::Verdict(Verdict {
                        decision: if granted {
                            Decision::Allow
                        } else {
                            Decision::Deny
                        },
                        policy_generation: generation,
                        cacheable: false,
                        obligations: Obligations {
                            encrypt: net_bind && r.kind == NetKind::Connect,
                            ..Obligations::default()
                        },
                    })
                };
                log.flush().ok();
                match send(&mut dev, &answer, h.request_id) {
                    Ok(()) => {}
                    Err(e) if e.contains("No such file") => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            Record::ChannelClosed(c) => {
                writeln!(
                    log,
                    "closed {} {} {} sent={} received={} ms={} {}",
                    c.channel_id,
                    hex(&c.key_id),
                    match c.role {
                        ChannelRole::Connect => "connect",
                        ChannelRole::Accept => "accept",
                    },
                    c.bytes_sent,
                    c.bytes_received,
                    c.duration_ms,
                    match c.reason {
                        CloseReason::Closed => "closed",
                        CloseReason::Idle => "idle",
                    }
                )
                .ok();
                log.flush().ok();
                continue;
            }
            Record::FileRequest(r) => {
                let allowed = file_allowed(&r, &file_deny, &file_deny_write, &file_allow_prog);
                writeln!(log, "{}", file_line(&r, allowed)).ok();
                log.flush().ok();
                let verdict = yes_no(allowed, generation, cacheable);
                answer(&mut dev, &verdict, h.request_id, None)?;
                continue;
            }
            Record::IpcRequest(r) => {
                let allowed = unix_allow.contains(&(r.sha256, r.peer_sha256));
                writeln!(log, "{}", unix_line(&r, allowed)).ok();
                log.flush().ok();
                let verdict = yes_no(allowed, generation, false);
                let late = delay.get(&*String::from_utf8_lossy(r.path)).copied();
                answer(&mut dev, &verdict, h.request_id, late)?;
                continue;
            }
            _ => continue,
        };
        let direct = r.flags & trustbind_proto::EXEC_LOADER_DIRECT != 0;
        let allowed = allow.contains(&r.sha256) && !(direct && deny_loader_direct);
        let niced = nice.get(&*String::from_utf8_lossy(r.path)).copied();
        let verdict = Record::Verdict(Verdict {
            decision: match (allowed, niced) {
                (false, _) => Decision::Deny,
                (true, None) => Decision::Allow,
                (true, Some(_)) => Decision::AllowWithConditions,
            },
            policy_generation: generation,
            cacheable: cacheable && !no_cache_paths.contains(&*String::from_utf8_lossy(r.path)),
            obligations: Obligations {
                nice: niced.filter(|_| allowed),
                ..Obligations::default()
            },
        });
        writeln!(
            log,
            "exec {} sha256={} sha1={} size={} uid={} euid={} pid={} anc={} direct={} -> {}",
            String::from_utf8_lossy(r.path),
            hex(&r.sha256),
            hex(&r.sha1),
            r.size,
            r.uid,
            r.euid,
            r.pid,
            anc_field(&r.ancestry),
            u8::from(direct),
            if allowed { "allow" } else { "deny" }
        )
        .ok();
        log.flush().ok();
        let late = delay.get(&*String::from_utf8_lossy(r.path)).copied();
        answer(&mut dev, &verdict, h.request_id, late)?;
    }
    writeln!(log, "stopped").ok();
    Ok(())
}

/// Client address and port, server address and port.
type Tuple = ([u8; 16], u16, [u8; 16], u16);

/// One key per 4-tuple, handed to both ends with tx and rx crossed.
#[derive(Default)]
struct Channels {
    next_id: u64,
    by_tuple: HashMap<Tuple, (u64, [u8; 80])>,
}

impl Channels {
    fn key_for(
        &mut self,
        r: &NetRequest<'_>,
        (tls, idle_timeout_s): (ChannelTls, u32),
    ) -> Result<(ChannelKey, u64), String> {
        let tuple = (r.src_addr, r.src_port, r.dst_addr, r.dst_port);
        if !self.by_tuple.contains_key(&tuple) {
            let mut m = [0u8; 80];
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut m))
                .map_err(|e| format!("/dev/urandom: {e}"))?;
            self.next_id += 1;
            self.by_tuple.insert(tuple, (self.next_id, m));
        }
        let (id, m) = self.by_tuple[&tuple];
        let part = |a: usize, b: usize| m[a..b].to_vec();
        let arr4 = |v: Vec<u8>| <[u8; 4]>::try_from(v).unwrap_or_default();
        let arr8 = |v: Vec<u8>| <[u8; 8]>::try_from(v).unwrap_or_default();
        // key 0..32, key id 32..48, c2s salt/iv 48..60, s2c salt/iv 60..72.
        let (c2s, s2c) = ((part(48, 52), part(52, 60)), (part(60, 64), part(64, 72)));
        let ((tx_salt, tx_iv), (rx_salt, rx_iv)) = match r.kind {
            NetKind::Accept => (s2c, c2s),
            _ => (c2s, s2c),
        };
        Ok((
            ChannelKey {
                channel_id: id,
                key_id: <[u8; 16]>::try_from(part(32, 48)).unwrap_or_default(),
                key: <[u8; 32]>::try_from(part(0, 32)).unwrap_or_default(),
                tx_salt: arr4(tx_salt),
                tx_iv: arr8(tx_iv),
                rx_salt: arr4(rx_salt),
                rx_iv: arr8(rx_iv),
                tls,
                idle_timeout_s,
            },
            id,
        ))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tb-fakeagent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The fake policy for a file request: see the module documentation.
fn file_allowed(
    r: &FileRequest<'_>,
    deny: &[String],
    deny_write: &[String],
    allow_prog: &HashSet<[u8; 32]>,
) -> bool {
    if allow_prog.contains(&r.sha256) {
        return true;
    }
    let hit = |prefixes: &[String], p: &[u8]| prefixes.iter().any(|x| p.starts_with(x.as_bytes()));
    let writes = r.access != FileAccess::Read;
    let paths = [r.path, r.to];
    !paths
        .iter()
        .any(|p| !p.is_empty() && (hit(deny, p) || (writes && hit(deny_write, p))))
}

fn file_line(r: &FileRequest<'_>, allowed: bool) -> String {
    let access = match r.access {
        FileAccess::Read => "read",
        FileAccess::Write => "write",
        FileAccess::Delete => "delete",
        FileAccess::Rename => "rename",
    };
    let to = if r.to.is_empty() {
        String::new()
    } else {
        format!(" => {}", String::from_utf8_lossy(r.to))
    };
    let (major, minor) = trustbind_proto::files::dev_numbers(r.dev);
    format!(
        "file {access} {}{to} flags={} sha256={} from={} uid={} pid={} dev={major}:{minor} ino={} -> {}",
        String::from_utf8_lossy(r.path),
        r.flags,
        hex(&r.sha256),
        source(r.program_source),
        r.uid,
        r.pid,
        r.ino,
        if allowed { "allow" } else { "deny" }
    )
}

/// A plain allow or deny verdict.
fn yes_no(allowed: bool, generation: u64, cacheable: bool) -> Record<'static> {
    Record::Verdict(Verdict {
        decision: if allowed {
            Decision::Allow
        } else {
            Decision::Deny
        },
        policy_generation: generation,
        cacheable,
        obligations: Obligations::default(),
    })
}
