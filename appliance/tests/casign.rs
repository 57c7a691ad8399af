//! The CA signer (threat model T-76): `serve` has every certificate signed
//! by a separate signer process and never holds the CA key; a signer
//! started apart serves only the uid it is told.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::ServeBinary;
use rustls::pki_types::pem::PemObject;
use tonic::transport::Channel;
use trustbind_appliance::agent_api::enrol::{admin_token_sha256, new_admin_token};
use trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient;
use trustbind_appliance::agent_api::pb::{
    EnrolAdminReply, EnrolAdminRequest, EnrolReply, EnrolRequest,
};
use trustbind_appliance::store::{Mode, Store};

/// The 32-byte private scalar of the P-256 PKCS#8 key in `pem`
/// (`ECPrivateKey`: version 1, then the key as an OCTET STRING of 32).
fn scalar_of(pem: &str) -> Vec<u8> {
    let der = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
    let b = der.secret_der();
    let i = b
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .unwrap();
    b.get(i + 5..i + 37).unwrap().to_vec()
}

/// Whether `needle` is anywhere in the readable memory of process `pid`.
fn in_memory(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (mut at, end) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        // Chunks overlap by the needle's length, so none is missed.
        let mut tail = Vec::new();
        while at < end {
            let n = usize::try_from((end - at).min(1 << 20)).unwrap();
            let mut buf = vec![0; n];
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf).is_err() {
                break;
            }
            let mut hay = std::mem::take(&mut tail);
            hay.extend_from_slice(&buf);
            if hay.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            tail = hay
                .get(hay.len().saturating_sub(needle.len())..)
                .unwrap()
                .to_vec();
            at += n as u64;
        }
    }
    false
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.get(s.rfind(')')? + 1..)?.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A client of `serve`'s enrol port (anonymous TLS, the CA of `dir`).
async fn enrolment(dir: &Path, serve: &ServeBinary) -> EnrolmentClient<Channel> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    EnrolmentClient::new(common::connect(serve.enrol, Arc::new(cfg)).await.unwrap())
}

/// Registers `host` and enrols it on `serve`'s enrol port.
async fn enrol(dir: &Path, serve: &ServeBinary, host: &str) -> EnrolReply {
    let store = Store::open(&dir.join("appliance.db")).unwrap();
    store
        .set_host_group("web", Mode::Enforce, "admin:t")
        .unwrap();
    let token = format!("tok-{host}");
    store
        .add_pending_host(host, "web", &common::sha256_hex(&token), "admin:t")
        .unwrap();
    let (_key, csr_pem) = common::key_and_csr();
    enrolment(dir, serve)
        .await
        .enrol(EnrolRequest {
            host: host.into(),
            token,
            csr_pem,
        })
        .await
        .unwrap()
        .into_inner()
}

/// `EnrolAdmin` as `ops` with `token` on `serve`.
async fn enrol_admin(
    dir: &Path,
    serve: &ServeBinary,
    token: &str,
) -> Result<EnrolAdminReply, tonic::Status> {
    let (_key, csr_pem) = common::key_and_csr();
    Ok(enrolment(dir, serve)
        .await
        .enrol_admin(EnrolAdminRequest {
            name: "ops".into(),
            token: token.into(),
            csr_pem,
        })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_enrols_through_its_signer_and_never_holds_the_ca_key() {
    let dir = tempfile::tempdir().unwrap();
    let serve = ServeBinary::start(dir.path(), &[]);
    let reply = enrol(dir.path(), &serve, "web1").await;
    assert!(reply.cert_pem.contains("BEGIN CERTIFICATE"));

    let pid = serve.child.id();
    let key_path = dir.path().join("ca.key").canonicalize().unwrap();
    let key_pem = std::fs::read_to_string(&key_path).unwrap();
    let scalar = scalar_of(&key_pem);
    // The key file: not open, not mapped, and the key not in memory.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert_ne!(target, key_path, "serve has the CA key file open");
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(!maps.contains("ca.key"), "{maps}");
    assert!(
        !in_memory(pid, &scalar),
        "the CA private key is in serve's memory"
    );

    // The signer is serve's child and logged the signature, naming serve.
    let kids = children(pid);
    let signer = kids
        .iter()
        .copied()
        .find(|k| {
            std::fs::read(format!("/proc/{k}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("ca-signer"))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no ca-signer among serve's children {kids:?}"));
    // The scan finds the key where it is (where the test may read the
    // signer's memory: it is not dumpable, so only with CAP_SYS_PTRACE).
    if std::fs::File::open(format!("/proc/{signer}/mem")).is_ok() {
        assert!(in_memory(signer, &scalar), "the scan misses the key");
    }
    let log = std::fs::read_to_string(dir.path().join("ca-signatures.jsonl")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(&reply.serial))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("\"name\":\"web1\""), "{line}");
    assert!(line.contains(&format!("\"peer_pid\":{pid}")), "{line}");
    drop(serve);
    // The signer ends with serve.
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{signer}")).exists()
            || std::fs::read_to_string(format!("/proc/{signer}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the signer {signer} outlived serve");
}

/// A process ended when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ca-signer --listen SOCKET --allow-uid UID` for `dir`.
fn listening_signer(dir: &Path, socket: &Path, uid: u32) -> Killed {
    let child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
            .arg("--data-dir")
            .arg(dir)
            .args(["ca-signer", "--listen"])
            .arg(socket)
            .args(["--allow-uid", &uid.to_string()])
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if socket.exists() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("the signer did not listen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_started_apart_serves_only_its_uid() {
    let uid = rustix::process::getuid().as_raw();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ca.sock");
    let signer = listening_signer(dir.path(), &socket, uid);
    let sock = socket.to_str().unwrap();
    let serve = ServeBinary::start(dir.path(), &["--ca-signer", sock]);
    assert!(children(serve.child.id()).is_empty());
    let reply = enrol(dir.path(), &serve, "web2").await;
    let log = std::fs::read_to_string(dir.path().join("ca-signatures.jsonl")).unwrap();
    assert!(log.contains(&reply.serial), "{log}");
    drop(serve);
    drop(signer);

    // Another uid is refused: serve cannot get its server certificate.
    let other = tempfile::tempdir().unwrap();
    let socket = other.path().join("ca.sock");
    let signer = listening_signer(other.path(), &socket, uid.wrapping_add(1));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
        .arg("--data-dir")
        .arg(other.path())
        .args(["serve", "--agent-listen", "127.0.0.1:0"])
        .args([
            "--enrol-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--ca-signer", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CA signer"),
        "{out:?}"
    );
    assert!(!other.path().join("server.pem").exists());
    drop(signer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signer_signs_once_per_admin_token_whatever_the_database_says() {
    let dir = tempfile::tempdir().unwrap();
    let serve = ServeBinary::start(dir.path(), &[]);
    let store = Store::open(&dir.path().join("appliance.db")).unwrap();
    let token = new_admin_token().unwrap();
    let sha = admin_token_sha256(&token);
    let mint = || {
        store
            .create_admin_token("ops", &sha, 60_000, false, "test")
            .unwrap()
            .unwrap()
    };
    mint();
    let reply = enrol_admin(dir.path(), &serve, &token).await.unwrap();
    assert!(reply.cert_pem.contains("BEGIN CERTIFICATE"));
    // What a compromised daemon can do to the database: the used token
    // pending again. The daemon takes it; the signer does not.
    mint();
    let e = enrol_admin(dir.path(), &serve, &token).await.unwrap_err();
    assert!(e.message().contains("used before"), "{e:?}");
    let log = std::fs::read_to_string(dir.path().join("ca-signatures.jsonl")).unwrap();
    let admins: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"kind\":\"admin\""))
        .collect();
    assert_eq!(admins.len(), 1, "{log}");
    assert!(admins.first().unwrap().contains(&sha), "{log}");
}

#[test]
fn serve_stops_when_its_signer_dies() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = ServeBinary::start(dir.path(), &[]);
    let signer = children(serve.child.id())
        .into_iter()
        .find(|k| {
            std::fs::read(format!("/proc/{k}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ca-signer"))
        })
        .unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(signer).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    for _ in 0..200 {
        if let Some(status) = serve.child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(1), "{status:?}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("serve goes on without its CA signer");
}
