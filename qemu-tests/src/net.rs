//! The private test network: a network namespace holding a Linux bridge
//! (`br0`) with one tap per VM, and packet capture on that bridge.
//!
//! The namespace is named `tbt-<pid>-<n>`; its only addresses are the
//! guests' in [`SUBNET`], it has no routes and no uplink, so no test
//! traffic can leave it. QEMU runs inside it (`ip netns exec`). Dropping
//! the last handle deletes the namespace and the VMs' disks; the logs and
//! captures stay in `$TMPDIR/trustbind-qemu/<namespace>/` (everything stays
//! with `TRUSTBIND_KEEP=1`). Namespaces and directories left by test
//! processes that are gone are removed by the next [`Network::new`].

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cpus::Share;
use crate::err::{Error, Result};
use crate::vm::VmBuilder;

/// The guests' subnet; it exists only inside the test namespace.
pub const SUBNET: &str = "10.99.0.0/24";
/// The bridge's own address once [`Network::host_address`] set it.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// Host part of the first VM's address.
const FIRST_HOST: u8 = 10;

/// A handle on one test network; cheap to clone. The namespace is deleted
/// when the last handle (VMs hold one) is dropped.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    ns: String,
    next_vm: AtomicU32,
    dir: PathBuf,
    host_addr: std::sync::Mutex<bool>,
    /// The host cores this network's VMs hold (one per VM).
    cores: std::sync::Mutex<Share>,
}

impl Network {
    /// Creates the namespace `tbt-<pid>-<n>` with bridge `br0`, up.
    pub fn new() -> Result<Network> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let ns = format!(
            "tbt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = runs_dir().join(&ns);
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::create_dir_all(&dir)
            .map_err(Error::io(format!("network: create {}", dir.display())))?;
        crate::host_run(
            "network: create namespace",
            Command::new("ip").args(["netns", "add", &ns]),
        )?;
        // From here on, Drop deletes the namespace.
        let net = Network {
            inner: Arc::new(Inner {
                dir: dir.clone(),
                ns,
                next_vm: AtomicU32::new(0),
                host_addr: std::sync::Mutex::new(false),
                cores: std::sync::Mutex::new(Share::default()),
            }),
        };
        net.ip("network: lo up", &["link", "set", "lo", "up"])?;
        net.ip(
            "network: create br0",
            &["link", "add", "br0", "type", "bridge"],
        )?;
        // Forward at once (no STP listening delay); the bridge itself has no
        // addresses, IPv6 link-local included, so it sends nothing.
        net.ip(
            "network: configure br0",
            &[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        crate::host_run(
            "network: disable IPv6 on br0",
            net.command("sysctl")
                .args(["-qw", "net.ipv6.conf.br0.disable_ipv6=1"]),
        )?;
        net.ip("network: br0 up", &["link", "set", "br0", "up"])?;
        Ok(net)
    }

    /// The namespace's name.
    pub fn namespace(&self) -> &str {
        &self.inner.ns
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.inner.ns, program]);
        c
    }

    /// Starts describing a VM named `name` on this network; it gets the
    /// next address of [`SUBNET`] (10.99.0.10, .11, …).
    pub fn vm(&self, name: &str) -> VmBuilder {
        VmBuilder::new(self.clone(), name, self.next_index())
    }

    /// Gives `br0` the address [`HOST_ADDR`] (once), so host programs run
    /// with [`Network::command`] reach the guests; until then the bridge
    /// has no address and sends nothing itself.
    pub fn host_address(&self) -> Result<Ipv4Addr> {
        let mut done = self
            .inner
            .host_addr
            .lock()
            .map_err(|_| Error::Usage("network: host address lock poisoned".into()))?;
        if !*done {
            self.ip(
                "network: address br0",
                &["addr", "add", &format!("{HOST_ADDR}/24"), "dev", "br0"],
            )?;
            *done = true;
        }
        Ok(HOST_ADDR)
    }

    /// The next VM number (its address is [`Network::addr`] of it). Waits
    /// until this network can hold one host core per VM (see [`crate::cpus`]).
    pub(crate) fn next_index(&self) -> u32 {
        let index = self.inner.next_vm.fetch_add(1, Ordering::Relaxed);
        self.inner
            .cores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .grow(index as usize + 1);
        index
    }

    /// Boots several VMs at once (their boots overlap) and waits for all.
    pub fn boot_all(&self, vms: Vec<VmBuilder>, art: &crate::Artifacts) -> Result<Vec<crate::Vm>> {
        let mut starting = Vec::new();
        for b in vms {
            starting.push(b.start(art)?);
        }
        starting.into_iter().map(|s| s.wait_ready()).collect()
    }

    /// Starts `tcpdump` on `br0`, writing every frame to a pcap file; returns
    /// once tcpdump is listening.
    pub fn start_capture(&self, name: &str) -> Result<Capture> {
        let pcap = self.dir().join(format!("{name}.pcap"));
        let mut cmd = self.command("tcpdump");
        cmd.args([
            "-i",
            "br0",
            "--immediate-mode",
            "-U",
            "-nn",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&pcap)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("capture: start `{}`", crate::show(&cmd))))?;
        let Some(stderr) = child.stderr.take() else {
            let _ = child.kill();
            return Err(Error::Usage("capture: tcpdump has no stderr pipe".into()));
        };
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(l)) => seen.push(l),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::HostCommand {
                        step: "capture: start tcpdump on br0".into(),
                        command: crate::show(&cmd),
                        status: "exited before listening".into(),
                        stderr: seen.join("\n"),
                    });
                }
            }
        }
        // Keep draining stderr so tcpdump never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Ok(Capture {
            child: Some(child),
            pcap,
            net: self.clone(),
        })
    }

    /// The directory holding VM logs, disks and captures.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn ip(&self, step: &str, args: &[&str]) -> Result<()> {
        crate::host_run(
            step,
            Command::new("ip").args(["-n", &self.inner.ns]).args(args),
        )
        .map(drop)
    }

    /// Creates tap `tap<i>` on `br0`, up.
    pub(crate) fn add_tap(&self, i: u32) -> Result<String> {
        let tap = format!("tap{i}");
        self.ip(
            "network: create tap",
            &["tuntap", "add", "dev", &tap, "mode", "tap"],
        )?;
        self.ip(
            "network: attach tap to br0",
            &["link", "set", &tap, "master", "br0"],
        )?;
        self.ip("network: tap up", &["link", "set", &tap, "up"])?;
        Ok(tap)
    }

    /// The guest address of VM number `i`.
    pub(crate) fn addr(i: u32) -> Result<Ipv4Addr> {
        let host = u8::try_from(i)
            .ok()
            .and_then(|i| i.checked_add(FIRST_HOST))
            .filter(|h| *h < 255)
            .ok_or_else(|| Error::Usage(format!("network: too many VMs ({i})")))?;
        Ok(Ipv4Addr::new(10, 99, 0, host))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Captures and VMs hold a handle, so none of them runs any more.
        let st = Command::new("ip")
            .args(["netns", "del", &self.ns])
            .stderr(Stdio::null())
            .status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!(
                "harness: cannot delete network namespace {}; `ip netns del {}` by hand",
                self.ns, self.ns
            );
        }
        if !crate::keep_files() {
            remove_disks(&self.dir);
        }
    }
}

/// Where each network keeps its directory.
fn runs_dir() -> PathBuf {
    std::env::temp_dir().join("trustbind-qemu")
}

/// Deletes the VMs' disk images and staging trees under `dir`, keeping
/// logs and captures.
fn remove_disks(dir: &Path) {
    let Ok(vms) = std::fs::read_dir(dir) else {
        return;
    };
    for vm in vms.flatten() {
        let p = vm.path();
        if p.is_dir() {
            let _ = std::fs::remove_file(p.join("payload.ext4"));
            let _ = std::fs::remove_file(p.join("disk.img"));
            let _ = std::fs::remove_file(p.join("cmd.sock"));
            let _ = std::fs::remove_dir_all(p.join("payload"));
        }
    }
}

/// Sends `sig` to `pid` (a process this harness started).
pub(crate) fn kill(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Deletes `tbt-<pid>-*` namespaces whose test process is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix("tbt-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(|p| !alive(p)) {
            eprintln!("harness: deleting stale network namespace {name}");
            let _ = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| {
                    for p in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                        if let Ok(p) = p.parse() {
                            kill(p, libc::SIGKILL);
                        }
                    }
                });
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    let Ok(dirs) = std::fs::read_dir(runs_dir()) else {
        return;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("tbt-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok_and(|p| !alive(p)) {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesized command name.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// A running capture on `br0`.
pub struct Capture {
    child: Option<Child>,
    pcap: PathBuf,
    net: Network,
}

impl Capture {
    /// Stops tcpdump (SIGINT, so it flushes) and returns what it captured.
    pub fn stop(mut self) -> Result<CaptureData> {
        if let Some(mut c) = self.child.take() {
            kill(c.id(), libc::SIGINT);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let bytes = std::fs::read(&self.pcap)
            .map_err(Error::io(format!("capture: read {}", self.pcap.display())))?;
        Ok(CaptureData {
            pcap: self.pcap.clone(),
            bytes,
            _net: self.net.clone(),
        })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A finished capture.
pub struct CaptureData {
    pcap: PathBuf,
    bytes: Vec<u8>,
    /// Keeps the directory holding the pcap alive.
    _net: Network,
}

impl CaptureData {
    /// The pcap file (it stays after the test, until the next run).
    pub fn pcap(&self) -> &Path {
        &self.pcap
    }

    /// The raw pcap bytes (frames are stored whole, so payloads appear
    /// verbatim unless split across segments).
    pub fn raw(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether `needle` occurs in the raw capture.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.bytes.windows(needle.len()).any(|w| w == needle)
    }

    /// The capture decoded by `tcpdump -r <pcap> -nn -A` (headers plus
    /// payload as ASCII).
    pub fn text(&self) -> Result<String> {
        crate::host_run(
            "capture: decode with tcpdump -r",
            Command::new("tcpdump")
                .args(["-nn", "-A", "-r"])
                .arg(&self.pcap),
        )
    }
}
