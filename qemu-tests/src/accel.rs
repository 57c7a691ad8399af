//! Choosing the QEMU accelerator: TCG by default, KVM only when it works.
//!
//! `/dev/kvm` on some hosts is a paravirtual (PVM) nested KVM on which an
//! ordinary guest kernel hangs. With `TRUSTBIND_ACCEL=auto` (the default)
//! the harness boots the test kernel once under KVM with no root disk and
//! expects its "VFS: Unable to mount root fs" panic within a few seconds;
//! the verdict is cached in `/run/trustbind/accel-probe` together with the
//! host's boot id, so the probe runs at most once per host boot.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::err::{Error, Result};

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Emulation (`-accel tcg -cpu max`): slow, always works.
    Tcg,
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// Deterministic emulation for benchmarks (`TRUSTBIND_ACCEL=icount`):
    /// one TCG thread, the guest clock counting executed instructions
    /// (`-icount shift=0,sleep=off`: 1 ns each), so guest-timed rounds
    /// agree within about 0.5 % whatever the host's load.
    Icount,
}

impl Accel {
    /// QEMU arguments selecting this accelerator and a matching CPU model.
    pub fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Tcg => &["-accel", "tcg", "-cpu", "max"],
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Icount => &[
                "-accel",
                "tcg,thread=single",
                "-icount",
                "shift=0,sleep=off",
                "-cpu",
                "max",
            ],
        }
    }

    /// How benchmarks name the mode their guest-clock figures were taken in.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Icount => "icount",
        }
    }
}

const CACHE_DIR: &str = "/run/trustbind";
const CACHE: &str = "/run/trustbind/accel-probe";
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The accelerator to use for `kernel`, per `TRUSTBIND_ACCEL`
/// (`tcg`, `icount`, `kvm` or `auto`, the default).
pub fn accel(kernel: &Path) -> Result<Accel> {
    static CHOSEN: OnceLock<Accel> = OnceLock::new();
    if let Some(a) = CHOSEN.get() {
        return Ok(*a);
    }
    let a = match std::env::var("TRUSTBIND_ACCEL").as_deref() {
        Ok("tcg") => Accel::Tcg,
        Ok("icount") => Accel::Icount,
        Ok("kvm") => Accel::Kvm,
        Ok("auto") | Ok("") | Err(_) => auto(kernel)?,
        Ok(other) => {
            return Err(Error::Usage(format!(
                "TRUSTBIND_ACCEL={other:?}: expected tcg, icount, kvm or auto"
            )))
        }
    };
    Ok(*CHOSEN.get_or_init(|| a))
}

fn auto(kernel: &Path) -> Result<Accel> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(Accel::Tcg);
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(Error::io("accel: read /proc/sys/kernel/random/boot_id"))?;
    let boot_id = boot_id.trim();
    std::fs::create_dir_all(CACHE_DIR).map_err(Error::io(format!("accel: create {CACHE_DIR}")))?;
    let lock = std::fs::File::create(format!("{CACHE_DIR}/accel-probe.lock"))
        .map_err(Error::io("accel: create the probe lock"))?;
    // SAFETY: flock on a descriptor we own; the lock is released when
    // `lock` is closed at the end of this function.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io("accel: lock the probe")(
            std::io::Error::last_os_error(),
        ));
    }
    if let Ok(text) = std::fs::read_to_string(CACHE) {
        match text.split_whitespace().collect::<Vec<_>>()[..] {
            [id, "kvm"] if id == boot_id => return Ok(Accel::Kvm),
            [id, "tcg"] if id == boot_id => return Ok(Accel::Tcg),
            _ => {}
        }
    }
    let a = probe(kernel)?;
    eprintln!(
        "harness: KVM boot probe says {}; cached in {CACHE} until the host reboots",
        a.name()
    );
    std::fs::write(CACHE, format!("{boot_id} {}\n", a.name()))
        .map_err(Error::io(format!("accel: write {CACHE}")))?;
    Ok(a)
}

/// Boots `kernel` under KVM without a root disk; KVM works if the kernel
/// reaches its "cannot mount root" panic and QEMU exits (`-no-reboot`).
fn probe(kernel: &Path) -> Result<Accel> {
    eprintln!("harness: probing KVM (boots the kernel once, at most {PROBE_TIMEOUT:?})");
    let mut log = tempfile::tempfile().map_err(Error::io("accel: create the probe log"))?;
    let log_w = log
        .try_clone()
        .map_err(Error::io("accel: dup the probe log"))?;
    let mut child = Command::new("qemu-system-x86_64")
        .args(Accel::Kvm.qemu_args())
        .args(["-m", "128", "-smp", "1", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-nodefaults"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/null"])
        .stdin(Stdio::null())
        .stdout(log_w)
        .stderr(Stdio::null())
        .spawn()
        .map_err(Error::io(
            "accel: start qemu-system-x86_64 for the KVM probe",
        ))?;
    let started = Instant::now();
    let exited = loop {
        match child.try_wait() {
            Ok(Some(_)) => break true,
            Ok(None) if started.elapsed() < PROBE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(100))
            }
            _ => break false,
        }
    };
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(Accel::Tcg);
    }
    let mut out = String::new();
    let _ = log.seek(SeekFrom::Start(0));
    let _ = log.read_to_string(&mut out);
    Ok(if out.contains("Kernel panic") || out.contains("VFS:") {
        Accel::Kvm
    } else {
        Accel::Tcg
    })
}
