//! A real appliance admin API on 127.0.0.1 (real store in a temp dir, the
//! appliance's own PKI, real TLS) and a `trustbind` command configured for it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use assert_cmd::Command;
use trustbind_appliance::admin::{self, AdminState};
use trustbind_appliance::pki::Pki;
use trustbind_appliance::request::{Action, Program, QualifyRequest, Subject, Target};
use trustbind_appliance::store::Store;

/// A running admin API and the files a CLI user needs.
pub struct Appliance {
    /// Holds the store, the PKI and the CLI files.
    pub dir: tempfile::TempDir,
    /// The store behind the API (for checks and for seeding audit rows).
    pub store: Arc<Store>,
    /// The PKI.
    pub pki: Arc<Pki>,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The config file pointing at admin.pem / admin.key / ca.pem.
    pub config: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Appliance {
    /// Starts the admin API.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
        let pki = Arc::new(
            Pki::open_or_create(
                &dir.path().join("pki"),
                &["127.0.0.1".to_owned(), "localhost".to_owned()],
            )
            .unwrap(),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        let addr = std_l.local_addr().unwrap();
        let server = pki
            .admin_server_config(admin::AdminCerts::new(Arc::clone(&store)))
            .unwrap();
        let engine = trustbind_appliance::policy::engine::Engine::new(
            Arc::clone(&store),
            include_str!("../../../../policies/trustbind.cedarschema"),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let state = AdminState::new(Arc::clone(&store))
            .with_pki(Arc::clone(&pki))
            .with_seal_dir(dir.path().join("data"))
            .with_engine(Arc::new(engine));
        {
            let _g = rt.enter();
            let l = tokio::net::TcpListener::from_std(std_l).unwrap();
            rt.spawn(admin::serve(l, server, admin::router(state)));
        }
        let cli = dir.path().join("cli");
        std::fs::create_dir_all(&cli).unwrap();
        let (cert, key) = pki.issue_admin("alice").unwrap();
        admin::register_admin_cert(
            &store,
            &cert,
            trustbind_appliance::store::AdminRole::Admin,
            "test",
        )
        .unwrap();
        std::fs::write(cli.join("admin.pem"), cert).unwrap();
        std::fs::write(cli.join("admin.key"), key.as_bytes()).unwrap();
        std::fs::write(cli.join("ca.pem"), pki.ca_pem()).unwrap();
        let url = format!("https://{addr}");
        let config = cli.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "url = \"{url}\"\ncert = \"admin.pem\"\nkey = \"admin.key\"\nca = \"ca.pem\"\n"
            ),
        )
        .unwrap();
        Self {
            dir,
            store,
            pki,
            url,
            config,
            rt,
        }
    }

    /// Starts the enrol port (`Enrolment` service) beside the admin API;
    /// returns its address. It never decides anything.
    pub fn start_enrol(&self) -> std::net::SocketAddr {
        use trustbind_appliance::agent_api::{self, AgentApi, Answer, DecideError, Decider};
        struct NoDecisions;
        impl Decider for NoDecisions {
            fn decide(
                &self,
                _r: &trustbind_appliance::request::QualifyRequest,
            ) -> Result<Answer, DecideError> {
                Err(DecideError("no decisions here".into()))
            }
        }
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_l.set_nonblocking(true).unwrap();
        let addr = std_l.local_addr().unwrap();
        let _g = self.rt.enter();
        let api = AgentApi::new(
            Arc::clone(&self.store),
            Arc::clone(&self.pki),
            Arc::new(NoDecisions),
        )
        .unwrap();
        let l = tokio::net::TcpListener::from_std(std_l).unwrap();
        self.rt
            .spawn(agent_api::serve_enrol(api, l, std::future::pending()));
        addr
    }

    /// The directory with admin.pem, admin.key, ca.pem, config.toml.
    pub fn cli_dir(&self) -> PathBuf {
        self.dir.path().join("cli")
    }

    /// `trustbind` with a clean environment and this appliance's config.
    pub fn tb(&self) -> Command {
        let mut c = Command::cargo_bin("trustbind").unwrap();
        c.env_clear()
            .env("HOME", self.dir.path())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TRUSTBIND_CONFIG", &self.config);
        c
    }

    /// Prunes the audit log (exported to `<dir>/data/export`) down to
    /// `max_rows` rows in batches of `batch`, at most `max_checkpoints`
    /// checkpoints kept (older ones consolidated), as `serve`'s
    /// retention would.
    pub fn prune_audit(&self, max_rows: u64, batch: u32, max_checkpoints: usize) {
        use trustbind_appliance::retention::{self, Config, Retention};
        let mut r = Retention::new(
            Arc::clone(&self.store),
            Config {
                audit_max_age: None,
                channel_max_age: None,
                report_max_age: None,
                audit_max_rows: Some(max_rows),
                store_max_percent: 90,
                export_max_percent: 90,
                alarm_percent: 1,
                reserve_bytes: 0,
                batch,
                max_checkpoints,
                ..Config::default()
            },
            &self.dir.path().join("data"),
            retention::server_key_signer(Arc::clone(&self.pki)),
            None,
        )
        .unwrap();
        while r.pass().unwrap().more {}
    }

    /// Runs `trustbind -o json ARGS`, expects success, returns the JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let a = self.tb().arg("-o").arg("json").args(args).assert();
        let out = a.get_output();
        assert!(
            out.status.success(),
            "trustbind {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
        })
    }

    /// Runs `trustbind ARGS`, expects exit code `code`, returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self
            .tb()
            .args(args)
            .assert()
            .code(code)
            .get_output()
            .clone();
        String::from_utf8(out.stderr).unwrap()
    }

    /// Runs `trustbind ARGS` (text), expects success, returns stdout.
    pub fn text(&self, args: &[&str]) -> String {
        let a = self.tb().args(args).assert();
        let out = a.get_output();
        assert!(
            out.status.success(),
            "trustbind {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout.clone()).unwrap()
    }
}

/// The repository's `policies/` directory.
pub fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// A SHA-256 of one repeated hex digit.
pub fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// `user` on web1 runs program `prog` (its SHA-256 is `prog` repeated) at `path`.
pub fn exec(user: &str, prog: char, path: &str) -> QualifyRequest {
    QualifyRequest {
        host: "web1".into(),
        action: Action::Exec,
        subject: Subject {
            user: user.into(),
            uid: 1000,
            euid: 1000,
            gid: 1000,
            loginuid: 1000,
            session: 3,
            pid: 77,
            ancestry: vec![],
        },
        program: Program {
            sha256: sha(prog),
            sha1: std::iter::repeat_n(prog, 40).collect(),
            size: 1,
            path: path.into(),
        },
        target: Target::Exec {
            loader_direct: false,
        },
        at_ms: trustbind_appliance::policy::engine::clock(0).0,
        peer: None,
    }
}
