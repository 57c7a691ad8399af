//! One QEMU VM: boot, command channel, health check, shutdown.
//!
//! QEMU runs inside the test network's namespace with the kernel console on
//! ttyS0 (a log file) and the command channel on ttyS1 (a unix socket QEMU
//! serves; `wait=on`, so QEMU starts the guest only once the harness is
//! connected and no output is lost). The root filesystem is opened with
//! `snapshot=on`: every VM starts from the same image and its writes are
//! discarded. A [`Vm`] that is dropped without [`Vm::shutdown`] is killed;
//! QEMU also gets SIGKILL if the thread that started it dies.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::channel;
use crate::err::{Error, Result};
use crate::health;
use crate::net::Network;
use crate::payload::Payload;
use crate::{scaled, Artifacts};

/// Boot timeout before scaling (TCG on a busy 2-core host is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default command timeout before scaling.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VM may take to power off after `reboot -f`, before scaling.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Console lines shown in failure banners.
const BANNER_LINES: usize = 60;

/// What a guest command printed and returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status (`sh -c` semantics: 128+N for signal N).
    pub status: i32,
    /// Standard output (lossily UTF-8).
    pub stdout: String,
    /// Standard error (lossily UTF-8).
    pub stderr: String,
}

/// A background process started by [`Vm::spawn_bg`].
#[derive(Debug, Clone)]
pub struct BgProcess {
    /// Its pid in the guest (it leads its own session).
    pub pid: u32,
    /// Guest path of the file collecting its stdout and stderr.
    pub log: String,
}

/// Describes a VM before it boots; from [`Network::vm`].
pub struct VmBuilder {
    net: Network,
    name: String,
    index: u32,
    payload: Payload,
    memory_mib: u32,
    cmdline: Vec<String>,
}

impl VmBuilder {
    pub(crate) fn new(net: Network, name: &str, index: u32) -> VmBuilder {
        VmBuilder {
            net,
            name: name.to_owned(),
            index,
            payload: Payload::new(),
            memory_mib: 512,
            cmdline: Vec::new(),
        }
    }

    /// Copies host file `host` to `/tb/<guest>` with `mode`.
    pub fn file(mut self, guest: impl AsRef<Path>, host: impl AsRef<Path>, mode: u32) -> Self {
        self.payload.add_file(guest, host, mode);
        self
    }

    /// Puts `data` at `/tb/<guest>` with `mode`.
    pub fn bytes(mut self, guest: impl AsRef<Path>, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.payload.add_bytes(guest, data.into(), mode);
        self
    }

    /// Guest memory (default 512 MiB).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Appends `arg` to the kernel command line.
    pub fn cmdline(mut self, arg: &str) -> Self {
        self.cmdline.push(arg.to_owned());
        self
    }

    /// Boots the VM and waits until its command loop is ready.
    pub fn boot(self, art: &Artifacts) -> Result<Vm> {
        self.start(art)?.wait_ready()
    }

    /// Starts QEMU without waiting for the guest (see [`Network::boot_all`]).
    pub fn start(self, art: &Artifacts) -> Result<Starting> {
        let VmBuilder {
            net,
            name,
            index,
            payload,
            memory_mib,
            cmdline,
        } = self;
        let valid = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(Error::Usage(format!(
                "vm name {name:?}: use 1 to 32 of a-z, 0-9 and `-` (it becomes the hostname)"
            )));
        }
        let dir = net.dir().join(format!("vm-{name}"));
        if dir.exists() {
            return Err(Error::Usage(format!(
                "vm `{name}`: a VM of that name already exists on network {}",
                net.namespace()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(Error::io(format!("vm `{name}`: create {}", dir.display())))?;
        let payload_img = dir.join("payload.ext4");
        payload
            .build(&dir.join("payload"), &payload_img, art.kmod())
            .map_err(|e| prefix(&name, e))?;
        let ip = Network::addr(index)?;
        let tap = net.add_tap(index)?;
        let accel = crate::accel(art.kernel())?;
        let console = dir.join("console.log");
        let sock = dir.join("cmd.sock");
        let stderr_path = dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(Error::io(format!(
            "vm `{name}`: create {}",
            stderr_path.display()
        )))?;

        // no_timer_check: the boot-time IO-APIC timer check races timer
        // ticks against a delay loop; under TCG on a loaded host it can
        // fail and panic ("IO-APIC + timer doesn't work").
        // rcu_cpu_stall_timeout=60 (default 21 s): with more VMs booting
        // than host cores, the emulated ACPI interrupt-link setup keeps the
        // non-preemptible boot CPU away from the RCU kthread for 25 s and
        // more (seen in the soak's four-VM boot), which the health check
        // would report; a real stall still shows after 60 s.
        let append = format!(
            "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/tb-init panic=-1 \
             no_timer_check rcupdate.rcu_cpu_stall_timeout=60 tb.host={name} tb.ip={ip}/24 {}",
            cmdline.join(" ")
        );
        let mut cmd = net.command("qemu-system-x86_64");
        cmd.args(accel.qemu_args())
            .args(["-m", &memory_mib.to_string(), "-smp", "1"])
            .args([
                "-no-reboot",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
            ])
            .arg("-kernel")
            .arg(art.kernel())
            .args(["-append", append.trim_end()])
            .arg("-drive")
            .arg(drive(art.rootfs(), "snapshot=on"))
            .arg("-drive")
            .arg(drive(&payload_img, "readonly=on"));
        devices(&mut cmd, &tap, ip, &console);
        cmd.arg("-chardev")
            .arg(format!(
                "socket,id=cmd,path={},server=on,wait=on",
                escape(&sock)
            ))
            .args(["-serial", "chardev:cmd"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        die_with_parent(&mut cmd);
        let command_line = crate::show(&cmd);
        std::fs::write(dir.join("qemu.cmdline"), &command_line)
            .map_err(Error::io(format!("vm `{name}`: write qemu.cmdline")))?;
        let child = cmd
            .spawn()
            .map_err(Error::io(format!("vm `{name}`: start `{command_line}`")))?;
        let mut vm = Vm {
            name,
            ip,
            dir,
            console,
            stderr: stderr_path,
            child: Some(child),
            chan: None,
            next_id: 1,
            started: Instant::now(),
            _net: net,
        };
        vm.connect(&sock)?;
        Ok(Starting(vm))
    }
}

/// The devices every test VM has: a virtio NIC on `tap` (MAC from the
/// address), virtio-rng, and the console (ttyS0) into the file `console`.
pub(crate) fn devices(cmd: &mut Command, tap: &str, ip: Ipv4Addr, console: &Path) {
    cmd.arg("-netdev")
        .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,mac=52:54:00:99:00:{:02x}",
            ip.octets()[3]
        ))
        .args(["-device", "virtio-rng-pci"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", escape(console)))
        .args(["-serial", "chardev:con"]);
}

/// Never leave QEMU behind if the test thread dies: SIGKILL with the parent.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and
    // only calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn drive(path: &Path, opt: &str) -> String {
    format!("file={},format=raw,if=virtio,{opt}", escape(path))
}

/// A path as a QEMU option value (commas are escaped by doubling them).
pub(crate) fn escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

fn prefix(vm: &str, e: Error) -> Error {
    match e {
        Error::Io { step, source } => Error::Io {
            step: format!("vm `{vm}`: {step}"),
            source,
        },
        Error::HostCommand {
            step,
            command,
            status,
            stderr,
        } => Error::HostCommand {
            step: format!("vm `{vm}`: {step}"),
            command,
            status,
            stderr,
        },
        other => other,
    }
}

/// A VM whose QEMU runs but whose guest may not be ready yet.
pub struct Starting(Vm);

impl Starting {
    /// Waits for the guest's `TB-READY` marker (boot timeout 120 s, scaled).
    pub fn wait_ready(mut self) -> Result<Vm> {
        let timeout = scaled(BOOT_TIMEOUT);
        let deadline = self.0.started + timeout;
        loop {
            match self.0.next_line(deadline, "booting")? {
                Some(l) if l.starts_with(channel::READY) => {
                    eprintln!(
                        "harness: vm `{}` ({}) ready in {:.1?}",
                        self.0.name,
                        self.0.ip,
                        self.0.started.elapsed()
                    );
                    return Ok(self.0);
                }
                Some(_) => {}
                None => {
                    self.0.banner("boot timeout");
                    return Err(Error::BootTimeout {
                        vm: self.0.name.clone(),
                        waited: timeout,
                        console: self.0.console.clone(),
                    });
                }
            }
        }
    }
}

/// The command channel: the socket and the bytes read but not yet split
/// into lines.
struct Chan {
    sock: UnixStream,
    buf: Vec<u8>,
}

/// A running VM. Dropping it kills QEMU; [`Vm::shutdown`] checks health
/// and powers off cleanly.
pub struct Vm {
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    console: PathBuf,
    stderr: PathBuf,
    child: Option<Child>,
    chan: Option<Chan>,
    next_id: u64,
    started: Instant,
    /// Keeps the namespace (and the VM's directory) alive.
    _net: Network,
}

impl Vm {
    /// The VM's name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VM's address on the test network.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The kernel console log (ttyS0).
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The VM's directory on the host (console log, disks, QEMU stderr).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The console log so far.
    pub fn console(&self) -> Result<String> {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(Error::io(format!(
                "vm `{}`: read {}",
                self.name,
                self.console.display()
            )))
    }

    /// Runs `cmd` with `sh -c` in the guest (timeout 60 s, scaled).
    pub fn run(&mut self, cmd: &str) -> Result<Output> {
        self.run_timeout(cmd, COMMAND_TIMEOUT)
    }

    /// Runs `cmd` with `sh -c`; `timeout` is scaled by
    /// `TRUSTBIND_TIMEOUT_SCALE`.
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<Output> {
        let timeout = scaled(timeout);
        let id = self.next_id;
        self.next_id += 1;
        let req = channel::request(id, cmd);
        let Some(chan) = self.chan.as_mut() else {
            return Err(self.channel_error("the channel is closed"));
        };
        if let Err(e) = chan.sock.write_all(req.as_bytes()) {
            return Err(self.channel_error(&format!("write: {e}")));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let step = format!("running `{cmd}`");
            let Some(line) = self.next_line(deadline, &step)? else {
                self.banner(&format!("command timeout: {cmd}"));
                return Err(Error::CommandTimeout {
                    vm: self.name.clone(),
                    command: cmd.to_owned(),
                    timeout,
                    console: self.console.clone(),
                });
            };
            match channel::parse_result(&line) {
                // Other lines, and replies to commands that timed out earlier.
                None => {}
                Some(Ok(r)) if r.id != id => {}
                Some(Ok(r)) => {
                    return Ok(Output {
                        status: r.status,
                        stdout: r.stdout,
                        stderr: r.stderr,
                    })
                }
                Some(Err(e)) => return Err(self.channel_error(&e)),
            }
        }
    }

    /// Runs `cmd` and fails unless it exits 0; the error carries its
    /// status, stdout and stderr.
    pub fn run_ok(&mut self, cmd: &str) -> Result<Output> {
        let out = self.run(cmd)?;
        if out.status != 0 {
            return Err(Error::CommandFailed {
                vm: self.name.clone(),
                command: cmd.to_owned(),
                output: out,
            });
        }
        Ok(out)
    }

    /// Starts `cmd` (a shell command) in the background in its own session,
    /// stdout and stderr to `/run/tb-bg-<n>.log`; returns at once.
    pub fn spawn_bg(&mut self, cmd: &str) -> Result<BgProcess> {
        use base64::Engine;
        let n = self.next_id;
        let log = format!("/run/tb-bg-{n}.log");
        let script = format!("/run/tb-bg-{n}.sh");
        let b64 = base64::engine::general_purpose::STANDARD.encode(cmd);
        let out = self.run_ok(&format!(
            "echo {b64} | base64 -d >{script} && \
             setsid sh {script} >{log} 2>&1 </dev/null & echo $!"
        ))?;
        let pid =
            out.stdout.trim().parse().map_err(|_| {
                self.channel_error(&format!("spawn_bg: no pid in {:?}", out.stdout))
            })?;
        Ok(BgProcess { pid, log })
    }

    /// Checks the kernel's health now: bug markers in the console log,
    /// `/proc/sys/kernel/tainted` (only the out-of-tree-module bit allowed)
    /// and, on a kernel with kmemleak (the debug kernel), a kmemleak scan.
    pub fn check_health(&mut self) -> Result<()> {
        let mut problems = Vec::new();
        match self.run(health::KMEMLEAK_SCAN) {
            Ok(o) if o.status == 0 => problems.extend(health::check_kmemleak(&o.stdout)),
            Ok(o) => problems.push(format!("kmemleak scan failed: {}", o.stderr.trim())),
            Err(e) => problems.push(format!("kmemleak scan failed: {e}")),
        }
        problems.extend(health::check_console(&self.console()?));
        match self.run("cat /proc/sys/kernel/tainted") {
            Ok(o) if o.status == 0 => problems.extend(health::check_taint(&o.stdout)),
            Ok(o) => problems.push(format!(
                "cannot read /proc/sys/kernel/tainted: {}",
                o.stderr.trim()
            )),
            Err(e) => problems.push(format!("cannot read /proc/sys/kernel/tainted: {e}")),
        }
        self.unhealthy(problems)
    }

    fn unhealthy(&self, problems: Vec<String>) -> Result<()> {
        if !problems.is_empty() {
            self.banner("kernel health check FAILED");
        }
        health::verdict(&self.name, &self.console, problems)
    }

    /// Checks health, then powers the VM off (`reboot -f`; QEMU runs with
    /// `-no-reboot`) and checks the console once more. QEMU is killed if it
    /// does not exit within 15 s (scaled).
    pub fn shutdown(mut self) -> Result<()> {
        let health = self.check_health();
        if let Some(chan) = self.chan.as_mut() {
            // No reply comes: the guest is gone before it could answer.
            let _ = chan
                .sock
                .write_all(channel::request(0, "busybox reboot -f").as_bytes());
        }
        let exited = self.wait_exit(scaled(SHUTDOWN_GRACE));
        health?;
        let console = self.console()?;
        self.unhealthy(health::check_console(&console))?;
        if !exited {
            self.banner("no power-off after `reboot -f`");
            return Err(Error::Usage(format!(
                "vm `{}`: did not power off within {:?} of `reboot -f`; killed it; console log: {}",
                self.name,
                scaled(SHUTDOWN_GRACE),
                self.console.display()
            )));
        }
        Ok(())
    }

    /// Waits for QEMU to exit, killing it after `grace`; true if it exited
    /// by itself.
    fn wait_exit(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn connect(&mut self, sock: &Path) -> Result<()> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            match UnixStream::connect(sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(250)))
                        .map_err(Error::io(format!(
                            "vm `{}`: set the socket timeout",
                            self.name
                        )))?;
                    self.chan = Some(Chan {
                        sock: s,
                        buf: Vec::new(),
                    });
                    return Ok(());
                }
                Err(e) => {
                    self.check_alive("starting QEMU")?;
                    if Instant::now() > deadline {
                        return Err(self
                            .channel_error(&format!("cannot connect to {}: {e}", sock.display())));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Fails with `QemuExited` if QEMU is gone.
    fn check_alive(&mut self, step: &str) -> Result<()> {
        let status = match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => return Ok(()),
            Some(Ok(Some(st))) => st.to_string(),
            Some(Err(e)) => format!("unknown: {e}"),
            None => "already shut down".into(),
        };
        self.child = None;
        self.banner(&format!("QEMU exited while {step}"));
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        Err(Error::QemuExited {
            vm: self.name.clone(),
            step: step.to_owned(),
            status,
            stderr: stderr.trim().to_owned(),
            console: self.console.clone(),
        })
    }

    /// The next line from ttyS1, or `None` at `deadline`.
    fn next_line(&mut self, deadline: Instant, step: &str) -> Result<Option<String>> {
        loop {
            let Some(chan) = self.chan.as_mut() else {
                return Err(self.channel_error("the channel is closed"));
            };
            if let Some(pos) = chan.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = chan.buf.drain(..=pos).collect();
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let mut chunk = [0u8; 8192];
            match chan.sock.read(&mut chunk) {
                Ok(0) => {
                    self.chan = None;
                    // QEMU closed the socket: it is exiting.
                    std::thread::sleep(Duration::from_millis(200));
                    self.check_alive(step)?;
                    return Err(self.channel_error("QEMU closed the socket"));
                }
                Ok(n) => chan.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    self.check_alive(step)?
                }
                Err(e) => {
                    self.chan = None;
                    return Err(self.channel_error(&format!("read: {e}")));
                }
            }
        }
    }

    fn channel_error(&self, detail: &str) -> Error {
        Error::Channel {
            vm: self.name.clone(),
            detail: detail.to_owned(),
            console: self.console.clone(),
        }
    }

    /// Prints the tail of the console log between framed banners.
    pub fn banner(&self, why: &str) {
        let text = std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})\n", self.console.display()));
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(BANNER_LINES);
        eprintln!(
            "==== console log (vm {}): {why}; last {} of {} lines of {} ====",
            self.name,
            lines.len() - skip,
            lines.len(),
            self.console.display()
        );
        for l in &lines[skip..] {
            eprintln!("{l}");
        }
        eprintln!("==== end of console log (vm {}) ====", self.name);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                self.banner("test panicked");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
