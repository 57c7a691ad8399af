//! What the tests share beyond [`trustbind_qemu_tests::steps`] (the
//! administrator's steps, re-exported here): the guest's kernel log and
//! freestanding test programs.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
pub use trustbind_qemu_tests::steps::*;
use trustbind_qemu_tests::Vm;

/// The guest's kernel log lines, without their timestamps.
pub fn dmesg_lines(vm: &mut Vm) -> Result<Vec<String>> {
    let dmesg = vm.run_ok("dmesg")?.stdout;
    Ok(crate::kernel_lines(&dmesg)
        .into_iter()
        .map(|l| l.trim_end().to_owned())
        .collect())
}

/// Builds `tests/it/progs/<name>.c` freestanding (no libc, static, raw
/// system calls) with the clang `cargo xtask setup` installs, into the
/// test's temporary directory, and returns the binary.
pub fn freestanding(name: &str) -> Result<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/it/progs/{name}.c"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let st = Command::new("/usr/lib/llvm-22/bin/clang")
        .args([
            "-static",
            "-nostdlib",
            "-O2",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-stack-protector",
            "-fno-pie",
            "-fcf-protection=none",
            "-fuse-ld=lld",
            "-Wall",
            "-Werror",
            "-o",
        ])
        .arg(&out)
        .arg(&src)
        .status()
        .context("cannot run clang (installed by `cargo xtask setup`)")?;
    ensure!(st.success(), "cannot build {}", src.display());
    std::fs::read(&out).with_context(|| format!("reading {}", out.display()))
}
