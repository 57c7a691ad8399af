//! QEMU harness for Trustbind's VM integration tests.
//!
//! A test creates a [`Network`] (a private network namespace holding a
//! Linux bridge; nothing in it routes anywhere else), boots VMs on it from
//! the build [`Artifacts`] (kernel, module, Debian root filesystem), runs
//! shell commands in them over a framed serial channel, captures the
//! bridge's traffic, and shuts them down with a kernel health check.
//!
//! ```no_run
//! # fn main() -> trustbind_qemu_tests::Result<()> {
//! use trustbind_qemu_tests::{Artifacts, Network};
//! let art = Artifacts::from_env()?;
//! let net = Network::new()?;
//! let mut vm = net.vm("a").boot(&art)?;
//! vm.run_ok("insmod /tb/trustbind.ko")?;
//! vm.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! Every VM boots `init=/sbin/tb-init` (a stub in the root filesystem) that
//! mounts the per-VM payload disk at `/tb` and runs `/tb/init` from
//! `guest/`; the kernel console (ttyS0) goes to a log file, ttyS1 carries
//! the command channel (protocol in `guest/loop`).
//!
//! Host requirements: root (network namespaces, taps), `ip` (iproute2),
//! `qemu-system-x86_64`, `mke2fs` (e2fsprogs ≥ 1.43), `tcpdump`.
//!
//! Environment: `TRUSTBIND_KERNEL`, `TRUSTBIND_KMOD`, `TRUSTBIND_ROOTFS`
//! (required), `TRUSTBIND_APPLIANCE_KERNEL`, `TRUSTBIND_APPLIANCE_INITRAMFS`,
//! `TRUSTBIND_APPLIANCE_DISK` (the appliance image, for [`Appliance`]), `TRUSTBIND_ACCEL=tcg|kvm|auto` (default `auto`: KVM only if
//! a boot probe shows it works), `TRUSTBIND_TIMEOUT_SCALE` (multiplies
//! every timeout), `TRUSTBIND_KEEP=1` (keep the VMs' disk images too; logs
//! and captures always stay until the next run).

mod accel;
mod appliance;
mod artifacts;
mod channel;
mod cpus;
mod err;
mod health;
mod net;
mod payload;
pub mod steps;
mod vm;

pub use accel::{accel, Accel};
pub use appliance::{gpt_partition, Admin, Appliance, ApplianceImage, Boot, ADMIN_PORT, SERVING};
pub use artifacts::Artifacts;
pub use err::{Error, Result};
pub use health::{check_console, check_taint, TAINT_OOT_MODULE};
pub use net::{Capture, CaptureData, Network, HOST_ADDR, SUBNET};
pub use vm::{BgProcess, Output, Starting, Vm, VmBuilder};

use std::time::Duration;

/// `base` multiplied by `TRUSTBIND_TIMEOUT_SCALE` (default 1; values that
/// do not parse as a positive number are ignored).
pub fn scaled(base: Duration) -> Duration {
    let scale = std::env::var("TRUSTBIND_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    base.mul_f64(scale)
}

/// Whether the VM benchmarks run as a smoke (`TRUSTBIND_BENCH_SMOKE` set,
/// as `cargo xtask test` does): one round of a few iterations, so every
/// benchmark's code runs in CI and cannot rot. Its numbers mean nothing.
pub fn bench_smoke() -> bool {
    std::env::var_os("TRUSTBIND_BENCH_SMOKE").is_some_and(|v| !v.is_empty())
}

/// A benchmark's `full` size (iterations, rounds, seconds), or `smoke`
/// in a smoke run ([`bench_smoke`]).
pub fn bench_size<T>(full: T, smoke: T) -> T {
    if bench_smoke() {
        smoke
    } else {
        full
    }
}

/// A binary of this workspace (`target/debug/NAME`), beside the running
/// program or, for a test binary (`target/debug/deps/`), its directory's
/// parent; built by `cargo xtask test` (or `build`) first.
pub fn workspace_bin(name: &str) -> Result<std::path::PathBuf> {
    let exe = std::env::current_exe().map_err(Error::io("find the test binary"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Usage(format!("{} has no directory", exe.display())))?;
    let dir = match dir.file_name() {
        Some(n) if n == "deps" => dir.parent().unwrap_or(dir),
        _ => dir,
    };
    let p = dir.join(name);
    if !p.is_file() {
        return Err(Error::Usage(format!(
            "{} is missing: build the workspace first (`cargo xtask test` does)",
            p.display()
        )));
    }
    Ok(p)
}

/// Renders a command line for messages.
pub(crate) fn show(cmd: &std::process::Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a host command to completion; fails with its stderr.
pub(crate) fn host_run(step: &str, cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(Error::io(format!("{step}: cannot start `{}`", show(cmd))))?;
    if !out.status.success() {
        // Some commands say why on stdout (e.g. `trustbind audit verify`).
        let mut said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !stdout.trim().is_empty() {
            said.push_str(&format!("\n(stdout) {}", stdout.trim()));
        }
        return Err(Error::HostCommand {
            step: step.to_owned(),
            command: show(cmd),
            status: out.status.to_string(),
            stderr: said,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `TRUSTBIND_KEEP` asks to keep VM directories after the test.
pub(crate) fn keep_files() -> bool {
    std::env::var_os("TRUSTBIND_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}
