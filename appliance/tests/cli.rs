//! `trustbind-appliance`'s arguments (clap): help, usage errors (exit 64),
//! `--data-dir` on either side of the command, empty environment variables
//! counting as unset, the last of a repeated flag winning; `farm-secret
//! export | import` moving a farm secret between two data directories.

use std::process::{Command, Output};

fn appliance(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"));
    for v in [
        "TRUSTBIND_DATA_DIR",
        "TRUSTBIND_ADMIN_NAME",
        "TRUSTBIND_SERVER_NAMES",
    ] {
        cmd.env_remove(v);
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn help_lists_every_command_and_exits_0() {
    for args in [&["--help"][..], &[]] {
        let out = appliance(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let text = stdout(&out);
        for cmd in [
            "serve",
            "ca-fingerprint",
            "authority",
            "admin-cert",
            "admin-token",
            "rotate-server-cert",
            "init",
            "audit",
            "farm-secret",
            "--data-dir",
        ] {
            assert!(text.contains(cmd), "{cmd} missing from:\n{text}");
        }
    }
    let out = appliance(&["serve", "--help"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for flag in [
        "--agent-listen",
        "--enrol-listen",
        "--admin-listen",
        "--server-name",
        "TRUSTBIND_AGENT_LISTEN",
    ] {
        assert!(stdout(&out).contains(flag), "{flag}: {out:?}");
    }
}

#[test]
fn usage_errors_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for args in [
        &["--data-dir", d, "bogus"][..],
        &["--data-dir", d, "init", "--no-such-flag"],
        &["--data-dir", d, "audit"],
        &["--data-dir", d, "serve", "--agent-listen", "nowhere"],
        &["--data-dir", d, "admin-cert", "--name", "a"],
        &["--data-dir", d, "admin-token", "--ttl-min", "527041"],
        &["--data-dir", d, "serve", "--alert-queue", "0"],
    ] {
        let out = appliance(args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // Alert sinks are checked before anything is served, naming the option.
    for (args, says) in [
        (
            &["serve", "--alert-webhook", "http://hooks.example/x"][..],
            "--alert-webhook `http://hooks.example/x`: must be an https:// URL",
        ),
        (
            &["serve", "--alert-webhook", "https://hooks.example/x"],
            "needs --alert-webhook-ca FILE",
        ),
        (
            &[
                "serve",
                "--alert-syslog",
                "logs.example:0",
                "--alert-syslog-ca",
                "/x",
            ],
            "--alert-syslog `logs.example:0`: port `0` is not 1 to 65535",
        ),
        (
            &["serve", "--alert-syslog-ca", "/x"],
            "--alert-syslog-ca is given without the sink it is for",
        ),
    ] {
        let mut all = vec!["--data-dir", d];
        all.extend_from_slice(args);
        let out = appliance(&all, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(
            !dir.path().join("appliance.db").exists(),
            "{args:?} opened the store"
        );
    }
}

#[test]
fn data_dir_before_or_after_the_command_env_and_last_flag() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let a = a.to_str().unwrap();
    let b = b.to_str().unwrap();
    let out = appliance(&["init", "--data-dir", a], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("a/appliance.db").exists());
    // The environment, and a flag over it; of two flags the last.
    let out = appliance(&["init"], &[("TRUSTBIND_DATA_DIR", b)]);
    assert!(out.status.success(), "{out:?}");
    assert!(dir.path().join("b/appliance.db").exists());
    let out = appliance(
        &[
            "--data-dir",
            "/nonexistent/x",
            "--data-dir",
            a,
            "admin-token",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).lines().count(), 1, "{out:?}");
    let fp = appliance(&["ca-fingerprint", "--data-dir", a], &[]);
    assert_eq!(stdout(&fp).trim().len(), 64, "{fp:?}");
    // The authority key (sealed records): 128 hex digits, the same on
    // every start, in its own 0600 file.
    let auth = appliance(&["authority", "--data-dir", a], &[]);
    let hex = stdout(&auth).trim().to_owned();
    assert_eq!(hex.len(), 128, "{auth:?}");
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{hex}");
    assert_eq!(
        stdout(&appliance(&["authority", "--data-dir", a], &[])).trim(),
        hex
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("a/authority.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Neither reads the CA key (T-76): with it moved away both still
    // answer the same, and no new key is made.
    let key = dir.path().join("a/ca.key");
    let aside = dir.path().join("ca.key.aside");
    std::fs::rename(&key, &aside).unwrap();
    let again = appliance(&["ca-fingerprint", "--data-dir", a], &[]);
    assert_eq!(stdout(&again), stdout(&fp), "{again:?}");
    let auth_again = appliance(&["authority", "--data-dir", a], &[]);
    assert_eq!(stdout(&auth_again).trim(), hex, "{auth_again:?}");
    assert!(!key.exists(), "a command made a new CA key");
    std::fs::rename(&aside, &key).unwrap();
    // An empty variable counts as unset: the default name `admin`, not "".
    let out = appliance(
        &["--data-dir", a, "admin-token"],
        &[("TRUSTBIND_ADMIN_NAME", ""), ("TRUSTBIND_SERVER_NAMES", "")],
    );
    assert!(out.status.success(), "{out:?}");
    // Server names from the environment, comma-separated.
    let out = appliance(
        &["--data-dir", a, "rotate-server-cert"],
        &[("TRUSTBIND_SERVER_NAMES", "one.example, two.example")],
    );
    assert!(out.status.success(), "{out:?}");
    let pem = std::fs::read(dir.path().join("a/server.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(names, ["DNSName(one.example)", "DNSName(two.example)"]);
}

/// Channel keys v2: the farm secret moves between two appliances' data
/// directories by export and import; it is never printed, the export is a
/// new 0600 file, and an import over another secret needs `--replace`.
#[test]
fn farm_secret_export_and_import() {
    use std::os::unix::fs::PermissionsExt as _;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (da, db) = (a.path().to_str().unwrap(), b.path().to_str().unwrap());
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("farm");
    let out_s = out.to_str().unwrap();
    let o = appliance(
        &["--data-dir", da, "farm-secret", "export", "--out", out_s],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let secret = std::fs::read_to_string(&out).unwrap();
    assert_eq!(secret.trim().len(), 64);
    assert!(
        !stdout(&o).contains(secret.trim())
            && !String::from_utf8_lossy(&o.stderr).contains(secret.trim())
    );
    for f in [out.clone(), a.path().join("farm.key")] {
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // The export never overwrites.
    let o = appliance(
        &["--data-dir", da, "farm-secret", "export", "--out", out_s],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // b made its own; importing a's needs --replace.
    let o = appliance(
        &[
            "--data-dir",
            db,
            "farm-secret",
            "export",
            "--out",
            &format!("{out_s}-b"),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let o = appliance(
        &["--data-dir", db, "farm-secret", "import", "--from", out_s],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--replace"),
        "{o:?}"
    );
    let o = appliance(
        &[
            "--data-dir",
            db,
            "farm-secret",
            "import",
            "--from",
            out_s,
            "--replace",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        std::fs::read_to_string(b.path().join("farm.key")).unwrap(),
        secret
    );
}
