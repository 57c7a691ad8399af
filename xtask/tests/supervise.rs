//! `image/rootfs/usr/libexec/trustbind/tb-supervise` under the host's `sh`
//! with fake daemons: a crashing daemon is restarted with a doubling
//! backoff; SIGTERM stops the supervisor and the daemon cleanly. No VM, no
//! kernel.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn libexec() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/rootfs/usr/libexec/trustbind")
}

struct Sup {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Sup {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A daemon left behind by a failed test.
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("run/daemon.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) on a pid this test's supervisor started.
                unsafe { libc::kill(pid, 9) };
            }
        }
    }
}

/// Starts tb-supervise on `daemon` (a shell script body) in a temp dir.
fn start(daemon: &str) -> Sup {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("daemon.sh");
    std::fs::write(&script, daemon).expect("write the fake daemon");
    let child = Command::new("sh")
        .arg(libexec().join("tb-supervise"))
        .arg("sh")
        .arg(&script)
        .arg(dir.path())
        .env("TB_LIB", libexec().join("lib.sh"))
        .env("TB_RUN", dir.path().join("run"))
        .env("TB_STATE", dir.path().join("state"))
        .env("TB_LOG", dir.path().join("log/appliance.log"))
        .env("TB_LOG_MAX", "4096")
        .env("TB_BACKOFF_MIN", "1")
        .env("TB_BACKOFF_MAX", "4")
        .env("TB_STOP_GRACE", "5")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tb-supervise");
    Sup { child, dir }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn crashing_daemon_is_restarted_with_backoff() {
    // Each start appends a timestamp (ms) and crashes at once.
    let sup = start("date +%s%3N >>\"$1/starts\"; echo fake daemon crashing; exit 3\n");
    let starts = sup.dir.path().join("starts");
    wait_until("four starts", Duration::from_secs(30), || {
        lines(&starts).len() >= 4
    });
    let t: Vec<i64> = lines(&starts)
        .iter()
        .map(|l| l.trim().parse().expect("timestamp"))
        .collect();
    let gaps: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff 1 s, 2 s, 4 s (plus the shell's overhead).
    for (gap, want) in gaps.iter().zip([1000, 2000, 4000]) {
        assert!(
            *gap >= want - 100 && *gap < want + 1500,
            "restart gaps {gaps:?} ms, want about 1000, 2000, 4000"
        );
    }
    let log = std::fs::read_to_string(sup.dir.path().join("log/appliance.log")).unwrap();
    assert!(log.contains("fake daemon crashing"), "{log}");
    assert!(
        log.contains("exited with status 3"),
        "the log names the exit status: {log}"
    );
}

#[test]
fn sigterm_stops_daemon_and_supervisor() {
    // The daemon records SIGTERM and exits cleanly on it.
    let mut sup = start(
        "trap 'echo term >>\"$1/got\"; exit 0' TERM\necho $$ >\"$1/pid\"\nwhile :; do sleep 0.1; done\n",
    );
    let d = sup.dir.path().to_owned();
    wait_until("the daemon", Duration::from_secs(10), || {
        d.join("pid").exists() && d.join("run/daemon.pid").exists()
    });
    let pid: i32 = std::fs::read_to_string(d.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the supervisor this test started.
    unsafe { libc::kill(sup.child.id() as i32, 15) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = sup.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "tb-supervise did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "tb-supervise exited with {status}");
    assert_eq!(
        lines(&d.join("got")),
        ["term"],
        "the daemon got one SIGTERM"
    );
    // SAFETY: signal 0 only checks whether the process exists.
    assert!(unsafe { libc::kill(pid, 0) } != 0, "the daemon still runs");
    assert!(
        !d.join("run/supervise.pid").exists(),
        "pid file left behind"
    );
    let log = std::fs::read_to_string(d.join("log/appliance.log")).unwrap();
    assert!(log.contains("tb-supervise: stopped"), "{log}");
    // The daemon ran once: no restart after a requested stop.
    assert_eq!(log.matches("tb-supervise: started").count(), 1, "{log}");
}

#[test]
fn log_stays_bounded() {
    let sup = start("i=0; while [ $i -lt 400 ]; do echo \"line $i of a chatty daemon\"; i=$((i+1)); done; touch \"$1/done\"; sleep 30\n");
    let d = sup.dir.path().to_owned();
    wait_until("the chatty daemon", Duration::from_secs(30), || {
        d.join("done").exists()
    });
    std::thread::sleep(Duration::from_millis(500));
    let size = |p: &str| std::fs::metadata(d.join(p)).map(|m| m.len()).unwrap_or(0);
    assert!(size("log/appliance.log.1") > 0, "no rotated log");
    // 4096 bytes plus at most 50 lines written between two size checks.
    assert!(
        size("log/appliance.log") < 4096 + 50 * 40,
        "{} bytes",
        size("log/appliance.log")
    );
}
