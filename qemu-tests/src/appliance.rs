//! The appliance OS image (`cargo xtask image`) booted as a VM on the test
//! [`Network`].
//!
//! No test backdoor: the harness sees the appliance only as a user would,
//! through its console log (ttyS0 to a file, one per boot), the network
//! (the admin API with the `trustbind` CLI run inside the namespace) and
//! QEMU's human monitor (a unix socket) for `system_powerdown`.
//!
//! Two ways to boot: [`Boot::Disk`] boots GRUB from a per-VM sparse copy of
//! `disk.img` (writable; the same copy is booted again by
//! [`Appliance::boot`] after a power-off, so the data partition persists
//! across that test's reboots), the address coming in as SMBIOS OEM string
//! `trustbind.ip=…` that the image's GRUB passes to the kernel.
//! [`Boot::Direct`] boots `-kernel/-initrd` with `trustbind.ip=` on the
//! command line, with or without a copy of the disk attached (without it,
//! the appliance keeps its state in RAM and says NOT PERSISTENT).

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::err::{Error, Result};
use crate::health;
use crate::net::Network;
use crate::scaled;
use crate::vm::escape;

/// How long a boot to "serving" may take before scaling (TCG, busy host).
pub const SERVING_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a clean power-off may take before scaling.
const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(90);
/// The console line the image prints once the daemon serves.
pub const SERVING: &str = "trustbind: serving on ";
/// The admin port.
pub const ADMIN_PORT: u16 = 7445;

/// The image's files, from `cargo xtask test`'s environment.
#[derive(Debug, Clone)]
pub struct ApplianceImage {
    kernel: PathBuf,
    initramfs: PathBuf,
    disk: PathBuf,
}

impl ApplianceImage {
    /// Reads `TRUSTBIND_APPLIANCE_KERNEL`, `TRUSTBIND_APPLIANCE_INITRAMFS`
    /// and `TRUSTBIND_APPLIANCE_DISK`; each must name an existing file.
    pub fn from_env() -> Result<ApplianceImage> {
        Ok(ApplianceImage {
            kernel: crate::artifacts::var(
                "TRUSTBIND_APPLIANCE_KERNEL",
                "appliance kernel (bzImage)",
            )?,
            initramfs: crate::artifacts::var(
                "TRUSTBIND_APPLIANCE_INITRAMFS",
                "appliance initramfs (initramfs.cpio.gz)",
            )?,
            disk: crate::artifacts::var(
                "TRUSTBIND_APPLIANCE_DISK",
                "appliance disk image (disk.img)",
            )?,
        })
    }

    /// The kernel.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// The initramfs.
    pub fn initramfs(&self) -> &Path {
        &self.initramfs
    }

    /// The pristine disk image (never written by the harness).
    pub fn disk(&self) -> &Path {
        &self.disk
    }
}

/// How the appliance boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// GRUB from a writable copy of `disk.img`.
    Disk,
    /// `-kernel/-initrd`; with `data`, a copy of `disk.img` is attached
    /// too (its data partition is used), else the state is in RAM.
    Direct {
        /// Attach a copy of the disk image.
        data: bool,
    },
}

/// A running (or powered-off) appliance VM.
pub struct Appliance {
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    tap: String,
    mode: Boot,
    image: ApplianceImage,
    disk: Option<PathBuf>,
    monitor: PathBuf,
    console: PathBuf,
    boots: u32,
    child: Option<Child>,
    started: Instant,
    net: Network,
}

impl Network {
    /// Prepares appliance VM `name` on this network (the next address, as
    /// for [`Network::vm`]) and boots it; returns once QEMU runs. Wait for
    /// [`SERVING`] with [`Appliance::wait_serving`].
    pub fn appliance(&self, name: &str, image: &ApplianceImage, mode: Boot) -> Result<Appliance> {
        let index = self.next_index();
        let ip = Network::addr(index)?;
        let dir = self.dir().join(format!("appliance-{name}"));
        if dir.exists() {
            return Err(Error::Usage(format!(
                "appliance `{name}`: exists already on network {}",
                self.namespace()
            )));
        }
        std::fs::create_dir_all(&dir).map_err(Error::io(format!(
            "appliance `{name}`: create {}",
            dir.display()
        )))?;
        let disk = match mode {
            Boot::Disk | Boot::Direct { data: true } => {
                let d = dir.join("disk.img");
                sparse_copy(image.disk(), &d)?;
                Some(d)
            }
            Boot::Direct { data: false } => None,
        };
        let tap = self.add_tap(index)?;
        let mut a = Appliance {
            name: name.to_owned(),
            ip,
            monitor: dir.join("monitor.sock"),
            console: dir.join("console-0.log"),
            dir,
            tap,
            mode,
            image: image.clone(),
            disk,
            boots: 0,
            child: None,
            started: Instant::now(),
            net: self.clone(),
        };
        a.boot()?;
        Ok(a)
    }
}

impl Appliance {
    /// The appliance's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The writable disk copy (Disk mode, or Direct with data).
    pub fn disk(&self) -> Option<&Path> {
        self.disk.as_deref()
    }

    /// The console log of the current (or last) boot.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The console of the current (or last) boot so far.
    pub fn console(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether QEMU runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Boots (again): the same disk copy, a new console log.
    pub fn boot(&mut self) -> Result<()> {
        if self.running() {
            return Err(Error::Usage(format!(
                "appliance `{}` is running",
                self.name
            )));
        }
        self.boots += 1;
        self.console = self.dir.join(format!("console-{}.log", self.boots));
        let _ = std::fs::remove_file(&self.monitor);
        let accel = crate::accel(self.image.kernel())?;
        let stderr_path = self.dir.join(format!("qemu-{}.stderr", self.boots));
        let stderr = std::fs::File::create(&stderr_path).map_err(Error::io(format!(
            "appliance `{}`: create {}",
            self.name,
            stderr_path.display()
        )))?;
        let ipnet = format!("{}/24", self.ip);
        let mut cmd = self.net.command("qemu-system-x86_64");
        cmd.args(accel.qemu_args())
            .args(["-m", "256", "-smp", "1", "-no-reboot", "-display", "none"])
            .args(["-nodefaults", "-no-user-config"]);
        match self.mode {
            Boot::Disk => {
                cmd.arg("-smbios")
                    .arg(format!("type=11,value=trustbind.ip={ipnet}"));
            }
            Boot::Direct { .. } => {
                cmd.arg("-kernel")
                    .arg(self.image.kernel())
                    .arg("-initrd")
                    .arg(self.image.initramfs())
                    .arg("-append")
                    .arg(format!(
                        "console=ttyS0 rdinit=/sbin/init panic=-1 no_timer_check trustbind.ip={ipnet}"
                    ));
            }
        }
        if let Some(d) = &self.disk {
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", escape(d)));
        }
        crate::vm::devices(&mut cmd, &self.tap, self.ip, &self.console);
        cmd.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", escape(&self.monitor)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        crate::vm::die_with_parent(&mut cmd);
        let line = crate::show(&cmd);
        let _ = std::fs::write(self.dir.join(format!("qemu-{}.cmdline", self.boots)), &line);
        self.started = Instant::now();
        self.child = Some(cmd.spawn().map_err(Error::io(format!(
            "appliance `{}`: start `{line}`",
            self.name
        )))?);
        eprintln!(
            "harness: appliance `{}` ({}) boot {} ({:?})",
            self.name, self.ip, self.boots, self.mode
        );
        Ok(())
    }

    /// Waits until the console of this boot shows `text` (`timeout` is
    /// scaled); fails with the console's tail if QEMU exits or time runs out.
    pub fn wait_console(&mut self, text: &str, timeout: Duration) -> Result<Duration> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(text) {
                return Ok(self.started.elapsed());
            }
            if !self.running() {
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .map_or_else(|| "not running".to_owned(), |s| s.to_string());
                self.banner(&format!("QEMU exited while waiting for {text:?}"));
                return Err(Error::QemuExited {
                    vm: self.name.clone(),
                    step: format!("waiting for {text:?} on the console"),
                    status,
                    stderr: std::fs::read_to_string(
                        self.dir.join(format!("qemu-{}.stderr", self.boots)),
                    )
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
                    console: self.console.clone(),
                });
            }
            if Instant::now() >= deadline {
                self.banner(&format!("timeout waiting for {text:?}"));
                return Err(Error::ConsoleTimeout {
                    vm: self.name.clone(),
                    text: text.to_owned(),
                    waited: timeout,
                    tail: tail(&self.console(), 30),
                    console: self.console.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the serving line (timeout [`SERVING_TIMEOUT`], scaled);
    /// returns the time from QEMU's start.
    pub fn wait_serving(&mut self) -> Result<Duration> {
        let t = self.wait_console(SERVING, SERVING_TIMEOUT)?;
        eprintln!(
            "harness: appliance `{}` serving {:.1?} after QEMU started",
            self.name, t
        );
        Ok(t)
    }

    /// The CA fingerprint from this boot's banner.
    pub fn ca_fingerprint(&self) -> Result<String> {
        banner_value(&self.console(), "CA fingerprint:").ok_or_else(|| {
            Error::Usage(format!(
                "appliance `{}`: no `CA fingerprint:` line on the console {}",
                self.name,
                self.console.display()
            ))
        })
    }

    /// Sends a line to QEMU's human monitor.
    pub fn monitor(&self, command: &str) -> Result<()> {
        let mut s = UnixStream::connect(&self.monitor).map_err(Error::io(format!(
            "appliance `{}`: connect to the monitor {}",
            self.name,
            self.monitor.display()
        )))?;
        s.write_all(format!("{command}\n").as_bytes())
            .map_err(Error::io(format!(
                "appliance `{}`: monitor command {command}",
                self.name
            )))?;
        // Let QEMU read it before the socket closes.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Presses the ACPI power button (`system_powerdown`) and waits for
    /// QEMU to exit (the image powers off cleanly); then checks the
    /// console for kernel warnings. QEMU is killed after the timeout.
    pub fn powerdown(&mut self) -> Result<()> {
        self.monitor("system_powerdown")?;
        let timeout = scaled(POWERDOWN_TIMEOUT);
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                self.banner("no power-off after system_powerdown");
                self.kill();
                return Err(Error::ConsoleTimeout {
                    vm: self.name.clone(),
                    text: "(QEMU to exit after system_powerdown)".into(),
                    waited: timeout,
                    tail: tail(&self.console(), 30),
                    console: self.console.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.child = None;
        self.check_health()
    }

    /// Kernel warnings, oopses or panics on this boot's console.
    pub fn check_health(&self) -> Result<()> {
        let problems = health::check_console(&self.console());
        if !problems.is_empty() {
            self.banner("kernel health check FAILED");
        }
        health::verdict(&self.name, &self.console, problems)
    }

    /// Kills QEMU (pulls the plug).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Enrols an administrator with the one-time token and CA fingerprint
    /// of the console banner (`trustbind admin enrol`, run in the test
    /// namespace), credentials into `dir`.
    pub fn admin(&self, dir: &Path) -> Result<Admin> {
        let console = self.console();
        let fp = self.ca_fingerprint()?;
        let token = enrol_token(&console).ok_or_else(|| {
            Error::Usage(format!(
                "appliance `{}`: the console banner holds no `trustbind admin enrol … --token T` line (an admin enrolled already?); console: {}",
                self.name,
                self.console.display()
            ))
        })?;
        std::fs::create_dir_all(dir)
            .map_err(Error::io(format!("admin: create {}", dir.display())))?;
        // Host programs reach the guests through the bridge.
        self.net.host_address()?;
        let cli = crate::workspace_bin("trustbind")?;
        let mut cmd = self.net.command(&cli.to_string_lossy());
        cmd.args(["admin", "enrol", "--appliance"])
            .arg(self.ip.to_string())
            .args(["--ca-fingerprint", &fp, "--token", &token, "--out"])
            .arg(dir)
            .env("HOME", dir)
            .env_remove("XDG_CONFIG_HOME");
        crate::host_run(
            &format!("appliance `{}`: trustbind admin enrol", self.name),
            &mut cmd,
        )?;
        for f in ["ca.pem", "admin.pem", "admin.key"] {
            if !dir.join(f).is_file() {
                return Err(Error::Usage(format!(
                    "admin: `trustbind admin enrol` wrote no {} in {}",
                    f,
                    dir.display()
                )));
            }
        }
        Ok(Admin {
            cli,
            dir: dir.to_owned(),
            url: format!("https://{}:{ADMIN_PORT}", self.ip),
            net: self.net.clone(),
        })
    }

    /// Prints the tail of this boot's console between framed banners.
    pub fn banner(&self, why: &str) {
        eprintln!(
            "==== console log (appliance {}, boot {}): {why}; {} ====",
            self.name,
            self.boots,
            self.console.display()
        );
        eprintln!("{}", tail(&self.console(), 60));
        eprintln!("==== end of console log (appliance {}) ====", self.name);
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if self.running() && std::thread::panicking() {
            self.banner("test panicked");
        }
        self.kill();
        if !crate::keep_files() {
            if let Some(d) = &self.disk {
                let _ = std::fs::remove_file(d);
            }
            let _ = std::fs::remove_file(&self.monitor);
        }
    }
}

/// An enrolled administrator: runs the `trustbind` CLI with its
/// credentials against the appliance, inside the test namespace.
pub struct Admin {
    cli: PathBuf,
    dir: PathBuf,
    url: String,
    net: Network,
}

impl Admin {
    /// The directory holding `ca.pem`, `admin.pem`, `admin.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CLI command with the credentials, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.net.command(&self.cli.to_string_lossy());
        cmd.arg("--url")
            .arg(&self.url)
            .arg("--cert")
            .arg(self.dir.join("admin.pem"))
            .arg("--key")
            .arg(self.dir.join("admin.key"))
            .arg("--ca")
            .arg(self.dir.join("ca.pem"))
            .args(args)
            .env("HOME", &self.dir)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("TRUSTBIND_CONFIG");
        cmd
    }

    /// Runs `trustbind ARGS…`; its stdout, or an error with its status and
    /// stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        crate::host_run(
            &format!("trustbind {}", args.join(" ")),
            &mut self.command(args),
        )
    }
}

/// The text after `key` on the last console line holding it, trimmed.
fn banner_value(console: &str, key: &str) -> Option<String> {
    console
        .lines()
        .rev()
        .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_owned()))
        .filter(|v| !v.is_empty())
}

/// The token of the last `trustbind admin enrol … --token T` banner line.
fn enrol_token(console: &str) -> Option<String> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains("trustbind admin enrol"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "--token")?;
    words.next().map(str::to_owned)
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Copies `from` to `to` keeping holes (`cp --sparse=always`).
fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    crate::host_run(
        "appliance: copy the disk image",
        Command::new("cp").arg("--sparse=always").arg(from).arg(to),
    )
    .map(drop)
}

/// Byte range (start, length) of the GPT partition named `name` in `disk`.
pub fn gpt_partition(disk: &Path, name: &str) -> Result<(u64, u64)> {
    let bytes = std::fs::read(disk).map_err(Error::io(format!("gpt: read {}", disk.display())))?;
    let bad = |why: &str| Error::Usage(format!("gpt: {}: {why}", disk.display()));
    let hdr = bytes.get(512..1024).ok_or_else(|| bad("too small"))?;
    if &hdr[..8] != b"EFI PART" {
        return Err(bad("no GPT header at LBA 1"));
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let lba = usize::try_from(u64_at(hdr, 72)).map_err(|_| bad("entry LBA"))?;
    let count = u32_at(hdr, 80) as usize;
    let size = u32_at(hdr, 84) as usize;
    for i in 0..count {
        let off = lba * 512 + i * size;
        let e = bytes
            .get(off..off + size)
            .ok_or_else(|| bad("truncated entries"))?;
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        if String::from_utf16_lossy(&units) == name {
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            return Ok((first * 512, (last - first + 1) * 512));
        }
    }
    Err(bad(&format!("no partition named {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANNER: &str = "\
 CA fingerprint:   ab12cd
 Admin enrolment:  one-time token, valid 24 h; on your admin machine run
   trustbind admin enrol --appliance 10.99.0.10 --ca-fingerprint ab12cd --token TOK123 --out ~/.config/trustbind
trustbind: serving on 10.99.0.10 (uptime 3.2 s)
";

    #[test]
    fn banner_gives_fingerprint_and_token() {
        assert_eq!(
            banner_value(BANNER, "CA fingerprint:").as_deref(),
            Some("ab12cd")
        );
        assert_eq!(enrol_token(BANNER).as_deref(), Some("TOK123"));
        assert_eq!(enrol_token("no banner"), None);
    }
}
