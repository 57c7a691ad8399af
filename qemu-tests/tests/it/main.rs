//! VM integration tests (one binary; `cargo xtask test` runs it with
//! `--test-threads=1`). They need `TRUSTBIND_KERNEL`, `TRUSTBIND_KMOD` and
//! `TRUSTBIND_ROOTFS` (and the appliance image's `TRUSTBIND_APPLIANCE_*`)
//! and fail, naming the variable, without them.

mod appliance_image;
mod attacks;
mod bench;
mod bench_channel;
mod channel_e2e;
mod channel_v2;
mod common;
mod deb;
mod e2e;
mod e2e_disk_full;
mod e2e_files;
mod e2e_learn;
mod exec;
mod files;
mod harness;
mod module;
mod net_backstop;
mod net_channel;
mod net_channel_terms;
mod net_qualify;
mod net_unix;
mod network;
mod soak;

/// A random hex string from the host's /dev/urandom, for canaries that
/// cannot appear anywhere by chance.
pub fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Kernel log lines without their `[ seconds.micros]` prefix.
pub fn kernel_lines(dmesg: &str) -> Vec<&str> {
    dmesg
        .lines()
        .map(
            |l| match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                Some((_, rest)) => rest,
                None => l,
            },
        )
        .collect()
}
