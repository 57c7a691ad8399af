//! `cargo xtask`: the one entry point for setting up, building, testing and
//! demonstrating Trustbind. See https://github.com/matklad/cargo-xtask/.
//!
//! Long builds (the kernel, the guest root filesystem, the pinned bindgen)
//! are cached under `~/.cache/trustbind/` (or `$TRUSTBIND_CACHE`), keyed by
//! a hash of their inputs.

mod image;
mod kernel;
mod package;
mod rootfs;
mod sh;

use anyhow::{bail, Context, Result};
use kernel::Flavor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const HELP: &str = "\
cargo xtask <command>

Commands:
  setup         install missing Debian packages and the pinned bindgen, build
                (or reuse) the two kernels (production, and debug with
                lockdep, KFENCE and kmemleak for the tests) and the guest
                root filesystem
  build         setup, then build trustbind.ko for the debug kernel, the
                workspace and the appliance OS image (production kernel)
  image [--kernel BZIMAGE]
                build (or reuse) the kernel, then the appliance OS image:
                kernel, initramfs and a GPT disk.img (see image/README.md)
  test [FILTER] build, then run every test: unit tests, then the QEMU tests
                (protected hosts on the debug kernel; a checker's report
                fails the test), then one smoke round of each VM
                benchmark (a few iterations: they cannot rot; the
                numbers mean nothing); with FILTER, only the QEMU tests
                whose names contain it (e.g. `cargo xtask test file_`;
                `bench_…` runs those benchmarks' smoke)
  demo [--shell]
                build, boot the appliance and two protected hosts, set them
                up with the trustbind CLI and show exec control, an
                encrypted channel, file access and the audit log; --shell
                then gives a prompt (`trustbind ARGS`, `a: CMD`, `b: CMD`)
  bench         build, run the cargo benchmarks (release; `fleet` with its
                defaults, 100 agents for 10 s) and the NSRL import
                benchmark, then the VM
                benchmarks: the PEM's exec overhead, and channel throughput
                (plaintext vs kTLS channel vs WireGuard) and connect latency
  fleet [--agents N] [--seconds S] [--rate R] [--batch B] [--cold PCT]
        [--mix exec=85,connect=8,pair=3,report=2,sign=1,reconnect=1] ...
                load-test a real `trustbind-appliance serve` on loopback
                with N enrolled agents over mutual TLS (release build; no
                VM); prints connected agents, decisions/s, p50/p99/max,
                appliance RSS, fds, CPU and audit bytes per decision;
                `--kill-at T [--kills K]` SIGKILLs and restarts the
                appliance under load, then checks that every decision an
                agent got is in the audit log and the chain verifies
                (exit 1 if not); `cargo xtask fleet --help` lists every option
  soak [MINUTES]
                build, then the soak with faults for MINUTES (default 10):
                exec, TCP, channel and UNIX load from several users on a
                protected host (debug kernel) against the appliance image
                while agents are killed, the appliance is powered off and
                the policy moves; then checks counters, audit, memory and
                the kernel's checkers (`cargo xtask test` runs 1 minute)
  package [--debug]
                build the Debian packages of a protected host into
                $CARGO_TARGET_DIR/deb/: linux-image-<release> (the production
                kernel, by its own `make bindeb-pkg`, cached),
                trustbind-modules-<release>, trustbind-agent, trustbind-cli
                (release binaries; --debug: the dev-profile ones)
  fuzz [SECS]   fuzz the proto record decoder and the channel ticket parsers
                with cargo-fuzz (SECS each, default 60)
  help          this text

Environment:
  TRUSTBIND_CACHE         cache root (default ~/.cache/trustbind)
  TRUSTBIND_ACCEL         tcg | kvm | auto (default auto: KVM only if a boot
                          probe shows it works)
  TRUSTBIND_TIMEOUT_SCALE multiply every VM timeout (slow machines)
";

/// Paths every task needs.
pub struct Ctx {
    /// The repository root.
    pub root: PathBuf,
    /// The cargo target directory.
    pub target: PathBuf,
    /// The cache root for long builds.
    pub cache: PathBuf,
}

impl Ctx {
    fn new() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .to_owned();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let cache = match std::env::var_os("TRUSTBIND_CACHE") {
            Some(c) => PathBuf::from(c),
            // Without HOME (some CI environments) fall back to root's home:
            // this tool installs Debian packages and so runs as root.
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/trustbind"),
        };
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("cannot create cache {}", cache.display()))?;
        Ok(Ctx {
            root,
            target,
            cache,
        })
    }
}

/// What `build` produces for the VM tests and the demo.
struct Artifacts {
    kernel: PathBuf,
    kmod: PathBuf,
    rootfs: PathBuf,
    image: image::Image,
    /// The Debian packages (`cargo xtask test` builds them for the
    /// packaging test).
    debs: Option<package::Debs>,
}

impl Artifacts {
    fn apply(&self, cmd: &mut Command) {
        cmd.env("TRUSTBIND_KERNEL", &self.kernel)
            .env("TRUSTBIND_KMOD", &self.kmod)
            .env("TRUSTBIND_ROOTFS", &self.rootfs);
        if let Some(d) = &self.debs {
            cmd.env("TRUSTBIND_DEBS", &d.dir);
        }
        self.image.apply(cmd);
    }
}

/// The kernels, the bindgen they need and the guest root filesystem.
struct Setup {
    production: kernel::Kernel,
    debug: Option<kernel::Kernel>,
    rootfs: PathBuf,
}

/// Builds (or reuses) the production kernel, the debug kernel when `debug`,
/// and the guest root filesystem.
fn setup(ctx: &Ctx, debug: bool) -> Result<Setup> {
    kernel::ensure_packages()?;
    let bindgen = kernel::ensure_bindgen(ctx)?;
    let production = kernel::ensure_kernel(ctx, &bindgen, Flavor::Production)?;
    let debug = match debug {
        true => Some(kernel::ensure_kernel(ctx, &bindgen, Flavor::Debug)?),
        false => None,
    };
    let rootfs = rootfs::ensure(&ctx.cache)?;
    Ok(Setup {
        production,
        debug,
        rootfs,
    })
}

/// Everything the VM tests, benchmarks and demo need. Protected hosts boot
/// the `host` kernel flavour with a module built for it; the appliance
/// image always carries the production kernel. With `debs`, also the
/// Debian packages (production kernel and its module, binaries of the
/// dev profile the workspace build made).
fn build(ctx: &Ctx, host: Flavor, debs: bool) -> Result<Artifacts> {
    let s = setup(ctx, host == Flavor::Debug)?;
    let host_kernel = s.debug.as_ref().unwrap_or(&s.production);
    let kmod = kernel::build_kmod(ctx, host_kernel)?;
    sh::run(
        "workspace: cargo build",
        cargo().args(["build", "--workspace", "--all-targets"]),
    )?;
    let image = image::ensure(ctx, &s.production.bzimage)?;
    let debs = match debs {
        true => {
            let kmod = kernel::build_kmod(ctx, &s.production)?;
            Some(package::build(
                ctx,
                &s.production,
                &kmod,
                package::Profile::Debug,
            )?)
        }
        false => None,
    };
    println!(
        "build: protected hosts boot the {} kernel {}",
        host_kernel.flavor.name(),
        host_kernel.bzimage.display()
    );
    Ok(Artifacts {
        kernel: host_kernel.bzimage.clone(),
        kmod,
        rootfs: s.rootfs,
        image,
        debs,
    })
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `cargo test` of the QEMU tests with the artifacts: those of `it`
/// matching `filter` (all tests without), `args` passed to the test
/// binary. `parallel`: as many tests at once as the host has cores (each
/// test's VMs then wait for a core each: `qemu-tests/src/cpus.rs`);
/// otherwise one at a time (benchmarks, the soak).
fn qemu_tests(a: &Artifacts, filter: Option<&str>, args: &[&str], parallel: bool) -> Command {
    let mut c = cargo();
    c.args(["test", "-p", "trustbind-qemu-tests"]);
    if let Some(f) = filter {
        c.args(["--test", "it", f]);
    }
    let threads = match parallel {
        true => std::thread::available_parallelism().map_or(1, |n| n.get()),
        false => 1,
    };
    c.arg("--")
        .args(args)
        .arg(format!("--test-threads={threads}"));
    a.apply(&mut c);
    c
}

/// The QEMU test of the Debian packages (its name, as `cargo test`
/// matches filters).
const DEB_TEST: &str = "deb::debian_packages_install_enrol_remove";

fn test(ctx: &Ctx, filter: Option<&str>) -> Result<()> {
    let a = build(
        ctx,
        Flavor::Debug,
        filter.is_none_or(|f| DEB_TEST.contains(f)),
    )?;
    if let Some(f) = filter.filter(|f| f.starts_with("bench_")) {
        return bench_smoke(&a, f);
    }
    if let Some(f) = filter {
        println!("test: QEMU integration tests matching `{f}`");
        return sh::run("test: QEMU tests", &mut qemu_tests(&a, Some(f), &[], true));
    }
    println!("test: unit tests");
    sh::run(
        "test: unit tests",
        cargo().args(["test", "--workspace", "--exclude", "trustbind-qemu-tests"]),
    )?;
    println!("test: QEMU integration tests");
    sh::run("test: QEMU tests", &mut qemu_tests(&a, None, &[], true))?;
    bench_smoke(&a, "bench_")
}

/// The VM benchmarks matching `filter` (`bench_…`) once each, as a smoke
/// (one round of a few iterations, `trustbind_qemu_tests::bench_smoke`):
/// their code runs in CI and cannot rot; their numbers mean nothing
/// (`cargo xtask bench` measures).
fn bench_smoke(a: &Artifacts, filter: &str) -> Result<()> {
    println!("test: VM benchmarks matching `{filter}`, one smoke round each");
    let mut c = qemu_tests(a, Some(filter), &["--ignored", "--nocapture"], true);
    c.env("TRUSTBIND_BENCH_SMOKE", "1");
    sh::run("test: VM benchmark smoke", &mut c)
}

/// `cargo xtask image [--kernel BZIMAGE]`: the appliance image, with our
/// cached kernel unless another one is named.
fn image_cmd(ctx: &Ctx, args: &[String]) -> Result<()> {
    let bzimage = match args {
        [] => {
            kernel::ensure_packages()?;
            let bindgen = kernel::ensure_bindgen(ctx)?;
            kernel::ensure_kernel(ctx, &bindgen, Flavor::Production)?.bzimage
        }
        [flag, path] if flag == "--kernel" => PathBuf::from(path),
        _ => bail!("usage: cargo xtask image [--kernel BZIMAGE]"),
    };
    let img = image::ensure(ctx, &bzimage)?;
    println!("image: kernel    {}", img.kernel.display());
    println!("image: initramfs {}", img.initramfs.display());
    println!("image: disk      {}", img.disk.display());
    Ok(())
}

/// `cargo xtask package [--debug]`: the production kernel, its module and
/// the Debian packages (docs/PACKAGING.md).
fn package_cmd(ctx: &Ctx, args: &[String]) -> Result<()> {
    let profile = match args {
        [] => package::Profile::Release,
        [flag] if flag == "--debug" => package::Profile::Debug,
        _ => bail!("usage: cargo xtask package [--debug]"),
    };
    let s = setup(ctx, false)?;
    let kmod = kernel::build_kmod(ctx, &s.production)?;
    if profile == package::Profile::Debug {
        // The same build as `cargo xtask build` (one feature set: nothing
        // is compiled twice).
        sh::run(
            "package: cargo build",
            cargo().args(["build", "--workspace", "--all-targets"]),
        )?;
    }
    let debs = package::build(ctx, &s.production, &kmod, profile)?;
    println!(
        "package: install on a host: apt install ./linux-image-*.deb ./trustbind-*.deb (in {})",
        debs.dir.display()
    );
    Ok(())
}

/// `cargo xtask bench`: the cargo benchmarks (release) and the NSRL import
/// benchmark (an ignored release test of `trustbind-cli`), then the VM
/// benchmarks (`bench_*`): in wall-clock TCG exec overhead and channels,
/// then in icount mode exec overhead again, the lineage table's fork cost
/// and the file gate's open cost; each prints its mode and ratios.
fn bench(ctx: &Ctx) -> Result<()> {
    let a = build(ctx, Flavor::Production, false)?;
    sh::run("bench: cargo bench", cargo().args(["bench", "--workspace"]))?;
    sh::run(
        "bench: NSRL import (2M RDS rows, docs/BENCHMARKS.md)",
        cargo().args([
            "test",
            "--release",
            "-p",
            "trustbind-cli",
            "--test",
            "nsrl",
            "--",
            "--ignored",
            "--nocapture",
            "bench_import",
        ]),
    )?;
    sh::run(
        "bench: exec overhead and channels in VMs",
        &mut qemu_tests(
            &a,
            Some("bench_"),
            &[
                "--ignored",
                "--nocapture",
                "--skip",
                "bench_fork_lineage",
                "--skip",
                "bench_file_open",
            ],
            false,
        ),
    )?;
    // Guest clock counting instructions: rounds agree whatever the load.
    // Every single-VM benchmark (the channel's three VMs run wall-clock
    // only, above).
    let mut c = qemu_tests(
        &a,
        Some("bench_"),
        &["--ignored", "--nocapture", "--skip", "bench_channel"],
        false,
    );
    c.env("TRUSTBIND_ACCEL", "icount");
    sh::run(
        "bench: exec overhead, fork cost of the lineage table, open cost of the file gate (icount)",
        &mut c,
    )
}

/// `cargo xtask soak [MINUTES]`: the soak with faults
/// (`qemu-tests/tests/it/soak.rs`) for MINUTES (default 10) on the debug
/// kernel; `cargo xtask test` runs its one-minute version.
fn soak(ctx: &Ctx, minutes: Option<&str>) -> Result<()> {
    let minutes: f64 = minutes
        .unwrap_or("10")
        .parse()
        .context("soak: MINUTES must be a number")?;
    let a = build(ctx, Flavor::Debug, false)?;
    let mut c = qemu_tests(&a, Some("soak_with_faults"), &["--nocapture"], false);
    c.env(
        "TRUSTBIND_SOAK_SECONDS",
        format!("{}", (minutes * 60.0).round() as u64),
    );
    sh::run("soak: load with faults on a protected host", &mut c)
}

fn demo(ctx: &Ctx, shell: bool) -> Result<()> {
    let a = build(ctx, Flavor::Production, false)?;
    let mut c = cargo();
    c.args([
        "run",
        "--quiet",
        "-p",
        "trustbind-qemu-tests",
        "--bin",
        "trustbind-demo",
        "--",
    ]);
    if shell {
        c.arg("--shell");
    }
    a.apply(&mut c);
    sh::run("demo", &mut c)
}

/// `cargo xtask fleet ARGS`: the fleet load generator
/// (`appliance/benches/fleet/`), release build, options passed through.
fn fleet(args: &[String]) -> Result<()> {
    sh::run(
        "fleet: load generator",
        cargo()
            .args([
                "bench",
                "--quiet",
                "-p",
                "trustbind-appliance",
                "--bench",
                "fleet",
                "--",
            ])
            .args(args),
    )
}

/// cargo-fuzz version, pinned.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn fuzz(ctx: &Ctx, secs: Option<&str>) -> Result<()> {
    let secs: u64 = secs
        .unwrap_or("60")
        .parse()
        .context("fuzz: SECS must be a number")?;
    let root = ctx
        .cache
        .join(format!("tools/cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin/cargo-fuzz");
    if !bin.exists() {
        println!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        sh::run(
            "fuzz: cargo install cargo-fuzz",
            cargo()
                .args([
                    "install",
                    "--locked",
                    "cargo-fuzz",
                    "--version",
                    CARGO_FUZZ_VERSION,
                ])
                .arg("--root")
                .arg(&root),
        )?;
    }
    // cargo-fuzz passes -Z sanitizer flags; the stable toolchain accepts
    // them with RUSTC_BOOTSTRAP (its sanitizer runtimes ship with rust-std).
    for target in FUZZ_TARGETS {
        sh::run(
            &format!("fuzz: cargo fuzz run {target} ({secs} s)"),
            Command::new(&bin)
                .current_dir(ctx.root.join("proto"))
                .env("RUSTC_BOOTSTRAP", "1")
                .args(["fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={secs}")),
        )?;
    }
    Ok(())
}

/// `proto/fuzz/fuzz_targets/`: the record decoder and the channel ticket
/// parsers.
const FUZZ_TARGETS: [&str; 2] = ["decode", "ticket"];

fn main() {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = (|| -> Result<()> {
        let ctx = Ctx::new()?;
        match args.first().map(String::as_str) {
            Some("setup") => setup(&ctx, true).map(|_| ()),
            Some("build") => build(&ctx, Flavor::Debug, false).map(|_| ()),
            Some("package") => package_cmd(&ctx, &args[1..]),
            Some("image") => image_cmd(&ctx, &args[1..]),
            Some("test") => test(&ctx, args.get(1).map(String::as_str)),
            Some("demo") => demo(&ctx, args.iter().any(|a| a == "--shell")),
            Some("fuzz") => fuzz(&ctx, args.get(1).map(String::as_str)),
            Some("bench") => bench(&ctx),
            Some("fleet") => fleet(&args[1..]),
            Some("soak") => soak(&ctx, args.get(1).map(String::as_str)),
            Some("help" | "--help" | "-h") | None => {
                print!("{HELP}");
                Ok(())
            }
            Some(other) => bail!("unknown command `{other}`; see `cargo xtask help`"),
        }
    })();
    match result {
        Ok(()) => eprintln!("xtask: done in {:.1?}", started.elapsed()),
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            eprintln!("xtask: failed after {:.1?}", started.elapsed());
            std::process::exit(1);
        }
    }
}
