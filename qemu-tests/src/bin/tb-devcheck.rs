//! `tb-devcheck`: exercises `/dev/trustbind` from user space, inside a test
//! VM with `trustbind.ko` loaded. Every step prints one line; the first
//! mismatch exits non-zero with what was expected and what happened.
//!
//! It checks the contract documented in `kmod/device.rs`: one opener at a
//! time, one record per `read()`/`write()`, `Hello` first, typed errors
//! for bad records, blocking and non-blocking reads, `poll()`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode;
use std::time::Duration;

use trustbind_proto::{self as proto, Decision, Hello, Obligations, Record, Verdict};

const DEV: &str = "/dev/trustbind";

fn open(nonblock: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if nonblock {
        o.custom_flags(libc::O_NONBLOCK);
    }
    o.open(DEV)
}

fn encode(rec: &Record<'_>, id: u64) -> Vec<u8> {
    let mut buf = vec![0u8; rec.encoded_len()];
    rec.encode(id, &mut buf).expect("records here are valid");
    buf
}

fn hello() -> Record<'static> {
    Record::Hello(Hello {
        agent_pid: std::process::id(),
        agent_version: 0x00_01_00,
    })
}

fn verdict() -> Record<'static> {
    Record::Verdict(Verdict {
        decision: Decision::Allow,
        policy_generation: 1,
        cacheable: true,
        obligations: Obligations::default(),
    })
}

fn expect_errno(what: &str, r: io::Result<usize>, errno: i32) -> Result<(), String> {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => {
            println!("devcheck: {what}: errno {errno} as expected");
            Ok(())
        }
        other => Err(format!("{what}: expected errno {errno}, got {other:?}")),
    }
}

fn poll_in(f: &File, timeout_ms: i32) -> Result<bool, String> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n < 0 {
        return Err(format!("poll: {}", io::Error::last_os_error()));
    }
    Ok(n == 1 && p.revents & libc::POLLIN != 0)
}

fn read_ack(f: &mut File, want_id: u64) -> Result<(), String> {
    let mut buf = vec![0u8; proto::MAX_RECORD_LEN];
    let n = f
        .read(&mut buf)
        .map_err(|e| format!("read HelloAck: {e}"))?;
    let (h, rec) = proto::decode(&buf[..n]).map_err(|e| format!("decode HelloAck: {e}"))?;
    let Record::HelloAck(ack) = rec else {
        return Err(format!("expected HelloAck, got {:?}", rec.kind()));
    };
    if h.request_id != want_id {
        return Err(format!(
            "HelloAck echoes id {}, want {want_id}",
            h.request_id
        ));
    }
    let s256 = String::from_utf8_lossy(ack.sha256_driver_name()).into_owned();
    let s1 = String::from_utf8_lossy(ack.sha1_driver_name()).into_owned();
    if !s256.starts_with("sha256") || !s1.starts_with("sha1") {
        return Err(format!("implausible driver names {s256:?} / {s1:?}"));
    }
    if ack.max_record_len as usize != proto::MAX_RECORD_LEN {
        return Err(format!("max_record_len {}", ack.max_record_len));
    }
    println!(
        "devcheck: HelloAck id {want_id}: module {:#08x}, drivers {s256} / {s1}",
        ack.module_version
    );
    Ok(())
}

fn run() -> Result<(), String> {
    let mut f = open(true).map_err(|e| format!("open {DEV}: {e}"))?;
    println!("devcheck: opened {DEV}");
    match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            println!("devcheck: second open: EBUSY as expected")
        }
        other => return Err(format!("second open: expected EBUSY, got {other:?}")),
    }

    let mut buf = vec![0u8; proto::MAX_RECORD_LEN];
    expect_errno(
        "read with nothing queued (O_NONBLOCK)",
        f.read(&mut buf),
        libc::EAGAIN,
    )?;
    if poll_in(&f, 0)? {
        return Err("poll reports readable with nothing queued".into());
    }
    expect_errno(
        "verdict before hello",
        f.write(&encode(&verdict(), 1)),
        libc::EINVAL,
    )?;
    let mut bad = encode(&hello(), 2);
    bad[0] ^= 0xff;
    expect_errno("bad magic", f.write(&bad), libc::EINVAL)?;
    let mut bad = encode(&hello(), 2);
    bad[4] = 9;
    expect_errno("wrong version", f.write(&bad), libc::EINVAL)?;
    expect_errno("short record", f.write(&[0u8; 5]), libc::EINVAL)?;
    expect_errno(
        "oversized record",
        f.write(&vec![0u8; proto::MAX_RECORD_LEN + 1]),
        libc::E2BIG,
    )?;

    let rec = encode(&hello(), 41);
    let n = f.write(&rec).map_err(|e| format!("write Hello: {e}"))?;
    if n != rec.len() {
        return Err(format!("write Hello returned {n}, want {}", rec.len()));
    }
    if !poll_in(&f, 5000)? {
        return Err("poll: not readable 5 s after Hello".into());
    }
    println!("devcheck: poll reports readable after Hello");
    expect_errno(
        "read into a 10-byte buffer",
        f.read(&mut [0u8; 10]),
        libc::EINVAL,
    )?;
    read_ack(&mut f, 41)?;
    expect_errno(
        "read after the queue drained",
        f.read(&mut buf),
        libc::EAGAIN,
    )?;
    expect_errno(
        "verdict for an unknown request",
        f.write(&encode(&verdict(), 999)),
        libc::ENOENT,
    )?;

    // A blocking reader is woken by the next record.
    let mut reader = f.try_clone().map_err(|e| format!("dup: {e}"))?;
    drop(f);
    let mut blocking = open_blocking_view(&reader)?;
    let t = std::thread::spawn(move || read_ack(&mut blocking, 42));
    std::thread::sleep(Duration::from_millis(300));
    reader
        .write_all(&encode(&hello(), 42))
        .map_err(|e| format!("write Hello: {e}"))?;
    t.join()
        .map_err(|_| "reader thread panicked".to_string())??;
    println!("devcheck: blocked reader woken by HelloAck");
    drop(reader);

    // The device is free again once the agent closed it; state is reset.
    let mut f = open(true).map_err(|e| format!("reopen: {e}"))?;
    expect_errno(
        "verdict before hello after reopen",
        f.write(&encode(&verdict(), 1)),
        libc::EINVAL,
    )?;
    println!("devcheck: reopen after close resets the session");
    Ok(())
}

/// Switches the open file (shared by all its descriptors) to blocking mode
/// and returns another descriptor for it.
fn open_blocking_view(f: &File) -> Result<File, String> {
    let g = f.try_clone().map_err(|e| format!("dup: {e}"))?;
    // SAFETY: F_GETFL/F_SETFL on a valid descriptor we own.
    let fl = unsafe { libc::fcntl(g.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: As above.
    if fl < 0 || unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0 {
        return Err(format!("fcntl: {}", io::Error::last_os_error()));
    }
    Ok(g)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("devcheck: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("devcheck: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
