//! T-81: the enrolment token must not be readable by local users from the
//! agent's command line while `trustbind-agent enrol` runs.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "0123456789abcdef-secret-enrolment-token";

/// Starts `trustbind-agent enrol` against an appliance that accepts and
/// never answers (so enrolment waits), reads its /proc/PID/cmdline and
/// environment as another user would see them, then stops it.
fn cmdline_while_enrolling(extra: &[&str], env_token: bool, stdin: Option<&str>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().take(4) {
            held.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trustbind-agent"));
    cmd.arg("--state")
        .arg(state.path())
        .args(["enrol", "--appliance", &addr.to_string(), "--name", "web1"])
        .args(["--ca-fingerprint", &"ab".repeat(32)])
        .args(extra)
        .env_remove("TRUSTBIND_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if env_token {
        cmd.env("TRUSTBIND_TOKEN", TOKEN);
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&cmdline).replace('\0', " ")
}

#[test]
fn the_token_is_on_the_command_line_only_if_given_there() {
    // The attack: with --token it is there for any local user to read.
    let seen = cmdline_while_enrolling(&["--token", TOKEN], false, None);
    assert!(seen.contains(TOKEN), "{seen}");
    // From the environment, a file or standard input: not on the command line.
    let seen = cmdline_while_enrolling(&[], true, None);
    assert!(seen.contains("enrol") && !seen.contains(TOKEN), "{seen}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("token");
    std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
    let seen = cmdline_while_enrolling(&["--token-file", f.to_str().unwrap()], false, None);
    assert!(
        seen.contains("--token-file") && !seen.contains(TOKEN),
        "{seen}"
    );
    let seen = cmdline_while_enrolling(&["--token-file", "-"], false, Some(TOKEN));
    assert!(
        seen.contains("--token-file") && !seen.contains(TOKEN),
        "{seen}"
    );
}

#[test]
fn a_token_is_required_and_not_empty() {
    let state = tempfile::tempdir().unwrap();
    let empty = state.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trustbind-agent"))
        .arg("--state")
        .arg(state.path())
        .args(["enrol", "--appliance", "127.0.0.1:1", "--name", "web1"])
        .args(["--ca-fingerprint", &"ab".repeat(32), "--token-file"])
        .arg(&empty)
        .env_remove("TRUSTBIND_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token is empty"));
    let out = Command::new(env!("CARGO_BIN_EXE_trustbind-agent"))
        .arg("--state")
        .arg(state.path())
        .args(["enrol", "--appliance", "127.0.0.1:1", "--name", "web1"])
        .args(["--ca-fingerprint", &"ab".repeat(32)])
        .env_remove("TRUSTBIND_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
}
