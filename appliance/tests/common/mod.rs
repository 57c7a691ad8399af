//! Shared test harness: a real appliance (store in a temp dir, PKI, agent
//! and enrol ports on 127.0.0.1) and real TLS clients.
#![allow(dead_code)]

pub mod sealing;

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use trustbind_appliance::agent_api::pb::agent_client::AgentClient;
use trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient;
use trustbind_appliance::agent_api::pb::{EnrolReply, EnrolRequest};
use trustbind_appliance::agent_api::{self, AgentApi, Decider};
use trustbind_appliance::pki::Pki;
use trustbind_appliance::store::{hex, Mode, Store};

/// The channel tests' permit of connects (`channels.rs`, `grants.rs`):
/// programs of group `clients` may connect to port 5432, to a program of
/// group `servers` when the peer is known; each test adds its accept rule
/// (`concat!(connect_5432_policy!(), ...)`).
#[macro_export]
macro_rules! connect_5432_policy {
    () => {
        r#"
@id("clients-may-connect-to-5432")
@encrypt("required")
permit (principal, action == Trustbind::Action::"connect", resource)
when {
    context.program in Trustbind::ProgramGroup::"clients" &&
    resource.port == 5432 &&
    (if context has peer_program
        then context.peer_program in Trustbind::ProgramGroup::"servers"
        else true)
};
"#
    };
}

/// A running appliance.
pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub api: Arc<AgentApi>,
    pub agent: SocketAddr,
    pub enrol: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub async fn start(decider: Arc<dyn Decider>) -> Appliance {
    start_with(|_, _| decider).await
}

/// Starts an appliance whose decider is made from its store and hub
/// (deciders that push, such as the channel gate).
pub async fn start_with(
    make: impl FnOnce(Arc<Store>, Arc<trustbind_appliance::agent_api::Hub>) -> Arc<dyn Decider>,
) -> Appliance {
    start_in(tempfile::tempdir().unwrap(), make).await
}

/// [`start_with`], its state in `dir`.
pub async fn start_in(
    dir: tempfile::TempDir,
    make: impl FnOnce(Arc<Store>, Arc<trustbind_appliance::agent_api::Hub>) -> Arc<dyn Decider>,
) -> Appliance {
    let store = Arc::new(Store::open(&dir.path().join("appliance.db")).unwrap());
    let pki = Arc::new(
        Pki::open_or_create(dir.path(), &["localhost".into(), "127.0.0.1".into()]).unwrap(),
    );
    let hub = Arc::new(trustbind_appliance::agent_api::Hub::new());
    let decider = make(Arc::clone(&store), Arc::clone(&hub));
    let api = AgentApi::with_hub(store, pki, hub, decider).unwrap();
    let agent_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let enrol_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = agent_l.local_addr().unwrap();
    let enrol = enrol_l.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(agent_api::serve_agent(
        Arc::clone(&api),
        agent_l,
        stopped(rx.clone()),
    ));
    tokio::spawn(agent_api::serve_enrol(
        Arc::clone(&api),
        enrol_l,
        stopped(rx),
    ));
    Appliance {
        dir,
        api,
        agent,
        enrol,
        stop,
    }
}

pub fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

impl Appliance {
    /// Registers `host` (group `group`, enforce) as pending with `token`.
    pub fn add_pending(&self, host: &str, group: &str, token: &str) {
        self.add_pending_mode(host, group, Mode::Enforce, token);
    }

    /// Registers `host` (group `group` in `mode`) as pending with `token`.
    pub fn add_pending_mode(&self, host: &str, group: &str, mode: Mode, token: &str) {
        let store = &self.api.store;
        store.set_host_group(group, mode, "admin:test").unwrap();
        store
            .add_pending_host(host, group, &sha256_hex(token), "admin:test")
            .unwrap();
    }

    /// The admin port's TLS configuration over this appliance's store.
    pub fn admin_tls(&self) -> Arc<rustls::ServerConfig> {
        self.api
            .pki
            .admin_server_config(trustbind_appliance::admin::AdminCerts::new(Arc::clone(
                &self.api.store,
            )))
            .unwrap()
    }

    pub fn ca_roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.api.pki.ca_der().clone()).unwrap();
        roots
    }

    /// A client config trusting the CA, without a client certificate.
    pub fn anon_config(&self) -> Arc<ClientConfig> {
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.ca_roots())
                .with_no_client_auth(),
        )
    }

    /// A client config trusting the CA and presenting `cert_pem`/`key_pem`.
    pub fn client_config(&self, cert_pem: &str, key_pem: &str) -> Arc<ClientConfig> {
        let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.ca_roots())
                .with_client_auth_cert(certs, key)
                .unwrap(),
        )
    }

    /// Sends an enrolment with a fresh key; returns (cert PEM, key PEM) or the status.
    pub async fn enrol(&self, host: &str, token: &str) -> Result<(String, String), tonic::Status> {
        self.enrol_reply(host, token)
            .await
            .map(|(reply, key)| (reply.cert_pem, key))
    }

    /// [`Appliance::enrol`], returning the whole reply and the key PEM.
    pub async fn enrol_reply(
        &self,
        host: &str,
        token: &str,
    ) -> Result<(EnrolReply, String), tonic::Status> {
        let (key, csr_pem) = key_and_csr();
        let ch = connect(self.enrol, self.anon_config()).await.unwrap();
        let reply = EnrolmentClient::new(ch)
            .enrol(EnrolRequest {
                host: host.into(),
                token: token.into(),
                csr_pem,
            })
            .await?
            .into_inner();
        assert_eq!(reply.ca_pem, self.api.pki.ca_pem());
        // The key the agent loads its module with (sealed records).
        assert_eq!(reply.authority, self.api.pki.authority().public());
        Ok((reply, key.serialize_pem()))
    }

    /// Pending + enrolled host; returns its agent client config.
    pub async fn enrolled(&self, host: &str) -> Arc<ClientConfig> {
        self.enrolled_in(host, "web", Mode::Enforce).await
    }

    /// Pending + enrolled host in `group` (`mode`); returns its agent client config.
    pub async fn enrolled_in(&self, host: &str, group: &str, mode: Mode) -> Arc<ClientConfig> {
        let token = format!("token-of-{host}-0123456789abcdef");
        self.add_pending_mode(host, group, mode, &token);
        let (cert, key) = self.enrol(host, &token).await.unwrap();
        self.client_config(&cert, &key)
    }

    /// Assigns `addrs` to `host` as an administrator would (`trustbind
    /// host addresses`): test agents all connect from 127.0.0.1, so the
    /// addresses their channel halves name must be assigned.
    pub fn assign(&self, host: &str, addrs: &[&str]) {
        let addrs: Vec<std::net::IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
        self.api
            .store
            .set_host_addresses(host, &addrs, "admin:test")
            .unwrap();
    }

    /// An agent client over mutual TLS with `cfg`.
    pub async fn agent_client(
        &self,
        cfg: Arc<ClientConfig>,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        Ok(AgentClient::new(connect(self.agent, cfg).await?))
    }

    pub fn audit_count(&self) -> usize {
        self.api.store.audit_rows(0, u32::MAX).unwrap().len()
    }
}

/// The results of one `Qualify` batch of `requests` (no module session).
pub async fn qualify_all(
    client: &mut AgentClient<Channel>,
    requests: Vec<trustbind_appliance::agent_api::pb::Request>,
) -> Vec<trustbind_appliance::agent_api::pb::Result> {
    client
        .qualify(trustbind_appliance::agent_api::pb::QualifyBatch {
            requests,
            module_session: Vec::new(),
            module_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

/// A fresh key and a PEM CSR for it.
pub fn key_and_csr() -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    (key, csr.pem().unwrap())
}

/// A gRPC channel over TLS (`cfg`) to `addr`, server name `localhost`.
pub async fn connect(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let mut cfg = Arc::unwrap_or_clone(cfg);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

/// Does a raw TLS handshake with `cfg` and reads once: `Err(text)` if the
/// server refused (alert or close), `Ok(())` if it kept the connection open
/// waiting for the HTTP/2 preface.
pub async fn raw_handshake(addr: SocketAddr, cfg: Arc<ClientConfig>) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0_u8; 16];
    // TLS 1.3: the server judges the client certificate after the client's
    // Finished, so the refusal arrives as an alert on the first read. An
    // accepted connection sends nothing and the read waits; the bound turns a
    // hang into an answer.
    match tokio::time::timeout(std::time::Duration::from_secs(3), tls.read(&mut buf)).await {
        Err(_) => Ok(()),
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Opens `n` connections to `addr` from 127.0.0.1 that never say a word,
/// waits a little and returns them with how many the server has closed.
pub async fn stall(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    use tokio::io::AsyncReadExt;
    let mut stalled = Vec::new();
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect(addr).await {
            stalled.push(s);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut closed = 0;
    for s in &mut stalled {
        let mut b = [0_u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(std::time::Duration::from_millis(5), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    (stalled, closed)
}

/// A TCP connection to `addr` from the local address `from` (e.g.
/// 127.0.0.2, another loopback address).
pub async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Puts `sha` in the store as a signature and into `group` (created).
pub fn sig(store: &Store, sha: [u8; 32], group: &str) {
    let hex = trustbind_appliance::store::hex(&sha);
    store
        .put_signature(
            &trustbind_appliance::store::Signature {
                sha256: hex.clone(),
                sha1: None,
                size: 1,
                name: group.into(),
                source: "test".into(),
            },
            "admin:test",
        )
        .unwrap();
    store.create_group(group, "", "admin:test").unwrap();
    store.add_member(group, &hex, "admin:test").unwrap();
}

/// Puts a program named `name` (its SHA-256 is that of the name) in the
/// store and into `group` (created if need be); returns its hex SHA-256.
pub fn named_sig(store: &Store, name: &str, group: &str) -> String {
    let sha = sha256_hex(name);
    store
        .put_signature(
            &trustbind_appliance::store::Signature {
                sha256: sha.clone(),
                sha1: None,
                size: 1,
                name: name.into(),
                source: "test".into(),
            },
            "admin:t",
        )
        .unwrap();
    let _ = store.create_group(group, "", "admin:t");
    store.add_member(group, &sha, "admin:t").unwrap();
    sha
}

/// A Qualify request subject: `user`, uid 1000, one ancestor.
pub fn subject(user: &str) -> trustbind_appliance::agent_api::pb::Subject {
    trustbind_appliance::agent_api::pb::Subject {
        user: user.into(),
        uid: 1000,
        euid: 1000,
        gid: 1000,
        loginuid: 1000,
        session: 7,
        pid: 4242,
        ancestry: vec![vec![0xab; 32]],
    }
}

/// Request `id`: bob execs program `sha` at /usr/bin/x.
pub fn exec(id: u64, sha: [u8; 32]) -> trustbind_appliance::agent_api::pb::Request {
    use trustbind_appliance::agent_api::pb::{self, request::Target, Action};
    pb::Request {
        id,
        action: Action::Exec.into(),
        subject: Some(subject("bob")),
        program: Some(pb::Program {
            sha256: sha.to_vec(),
            sha1: vec![0x01; 20],
            size: 1234,
            path: "/usr/bin/x".into(),
            package: String::new(),
        }),
        target: Some(Target::Exec(pb::ExecTarget::default())),
        peer: None,
        module_request: Vec::new(),
    }
}

/// The real policy engine, installed once the appliance's store exists
/// (the engine needs the store, which [`start`] creates).
#[derive(Default)]
pub struct LateEngine(std::sync::OnceLock<trustbind_appliance::policy::engine::Engine>);

impl LateEngine {
    pub fn set(&self, e: trustbind_appliance::policy::engine::Engine) {
        assert!(self.0.set(e).is_ok());
    }
}

impl Decider for LateEngine {
    fn decide(
        &self,
        r: &trustbind_appliance::request::QualifyRequest,
    ) -> Result<trustbind_appliance::agent_api::Answer, trustbind_appliance::agent_api::DecideError>
    {
        let e = self.0.get().ok_or_else(|| {
            trustbind_appliance::agent_api::DecideError("engine not installed".into())
        })?;
        Decider::decide(e, r)
    }
}

/// An appliance deciding with the real engine over its own store, with
/// each `(sha, group)` of `sigs` a member and `policy` active.
pub async fn start_with_policy(policy: &str, sigs: &[([u8; 32], &str)]) -> Appliance {
    start_with_policy_in(tempfile::tempdir().unwrap(), policy, sigs).await
}

/// [`start_with_policy`], its state in `dir`.
pub async fn start_with_policy_in(
    dir: tempfile::TempDir,
    policy: &str,
    sigs: &[([u8; 32], &str)],
) -> Appliance {
    const SCHEMA: &str = include_str!("../../../policies/trustbind.cedarschema");
    let late = Arc::new(LateEngine::default());
    let decider: Arc<dyn Decider> = late.clone();
    let app = start_in(dir, |_, _| decider).await;
    let store = &app.api.store;
    for (sha, group) in sigs {
        sig(store, *sha, group);
    }
    let id = store
        .create_policy_draft(policy, "test", "admin:test")
        .unwrap();
    store.activate_policy(id, "admin:test").unwrap();
    late.set(trustbind_appliance::policy::engine::Engine::new(Arc::clone(store), SCHEMA).unwrap());
    app
}

/// The `serve` binary on loopback ports, its state in a directory; its
/// addresses and CA fingerprint read off its first lines of output.
pub struct ServeBinary {
    pub child: std::process::Child,
    pub agent: SocketAddr,
    pub enrol: SocketAddr,
    pub admin: SocketAddr,
    pub fingerprint: String,
    /// The rest of its output (kept open: `serve` fails on a closed stdout).
    pub stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Drop for ServeBinary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServeBinary {
    /// `trustbind-appliance --data-dir DIR serve ... EXTRA`.
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
            .arg("--data-dir")
            .arg(dir)
            .args([
                "serve",
                "--agent-listen",
                "127.0.0.1:0",
                "--enrol-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--server-name",
                "localhost",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = |prefix: &str| -> String {
            let l = lines.next().unwrap().unwrap();
            assert!(l.starts_with(prefix), "{l}");
            l.rsplit(' ').next().unwrap().to_owned()
        };
        Self {
            agent: addr("agent port").parse().unwrap(),
            enrol: addr("enrol port").parse().unwrap(),
            admin: addr("admin port").parse().unwrap(),
            fingerprint: addr("CA fingerprint"),
            child,
            stdout: lines,
        }
    }
}
