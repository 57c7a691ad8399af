//! Admin bootstrap enrolment over real TLS on 127.0.0.1 with a real store:
//! `admin-token` mints a one-time token; `Enrolment.EnrolAdmin` trades it
//! and a CSR for an admin certificate once; wrong, reused, replaced,
//! expired tokens and a wrong name are refused with a clear message and
//! audited; refusals are rate limited per address; `--if-unenrolled`
//! prints nothing once an admin enrolled.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{connect, start, Appliance};
use trustbind_appliance::agent_api::enrol::{admin_token_sha256, new_admin_token, MAX_REFUSALS};
use trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient;
use trustbind_appliance::agent_api::pb::EnrolAdminRequest;
use trustbind_appliance::agent_api::{Answer, DecideError, Decider};
use trustbind_appliance::pki::{peer_cert, CertKind};
use trustbind_appliance::request::QualifyRequest;
use trustbind_appliance::store::Store;

struct Unused;
impl Decider for Unused {
    fn decide(&self, _r: &QualifyRequest) -> Result<Answer, DecideError> {
        Err(DecideError("no decisions in enrolment tests".into()))
    }
}

/// A new pending admin token for `name` valid `ttl_ms`; returns it.
fn mint(app: &Appliance, name: &str, ttl_ms: i64) -> String {
    let t = new_admin_token().unwrap();
    app.api
        .store
        .create_admin_token(name, &admin_token_sha256(&t), ttl_ms, false, "test")
        .unwrap()
        .unwrap();
    t
}

/// `EnrolAdmin` with a fresh key; returns (cert PEM, key PEM) or the status.
async fn enrol_admin(
    app: &Appliance,
    name: &str,
    token: &str,
) -> Result<(String, String), tonic::Status> {
    let (key, csr_pem) = common::key_and_csr();
    let ch = connect(app.enrol, app.anon_config()).await.unwrap();
    let reply = EnrolmentClient::new(ch)
        .enrol_admin(EnrolAdminRequest {
            name: name.into(),
            token: token.into(),
            csr_pem,
        })
        .await?
        .into_inner();
    assert_eq!(reply.ca_pem, app.api.pki.ca_pem());
    Ok((reply.cert_pem, key.serialize_pem()))
}

fn audit_kinds(app: &Appliance, kind: &str) -> Vec<String> {
    app.api
        .store
        .audit_rows(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.detail)
        .collect()
}

fn cert_of(pem: &str) -> trustbind_appliance::pki::PeerCert {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    peer_cert(der.as_ref()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_buys_one_admin_certificate() {
    let app = start(Arc::new(Unused)).await;
    assert!(!app.api.store.admin_ever_enrolled().unwrap());
    let token = mint(&app, "admin", 60_000);
    // Typed in lower case with spaces instead of dashes: the same token.
    let typed = token.to_lowercase().replace('-', " ");
    let (cert, key) = enrol_admin(&app, "", &typed).await.unwrap();
    let info = cert_of(&cert);
    assert_eq!(info.kind, CertKind::Admin);
    assert_eq!(info.name, "admin");
    assert!(app.api.store.admin_ever_enrolled().unwrap());
    let ok = audit_kinds(&app, "admin.enrol");
    assert_eq!(ok.len(), 1);
    assert!(ok[0].contains(&info.serial), "{ok:?}");

    // The certificate is accepted by the admin port's verifier (and the
    // agent port's refuses it: it is no host certificate).
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_l.local_addr().unwrap();
    let cfg = app.admin_tls();
    tokio::spawn(async move {
        let acc = tokio_rustls::TlsAcceptor::from(cfg);
        while let Ok((tcp, _)) = admin_l.accept().await {
            let acc = acc.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acc.accept(tcp).await {
                    use tokio::io::AsyncReadExt;
                    let mut b = [0_u8; 1];
                    let _ = s.read(&mut b).await;
                }
            });
        }
    });
    common::raw_handshake(admin, app.client_config(&cert, &key))
        .await
        .unwrap();
    assert!(
        common::raw_handshake(app.agent, app.client_config(&cert, &key))
            .await
            .is_err()
    );

    // Second use: refused, saying why, and audited.
    let again = enrol_admin(&app, "", &token).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(again.message().contains("already used"), "{again:?}");
    let refused = audit_kinds(&app, "admin.enrol.refused");
    assert_eq!(refused.len(), 1);
    assert!(refused[0].contains("already used"), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_replaced_expired_and_misnamed_tokens_are_refused() {
    let app = start(Arc::new(Unused)).await;
    let e = enrol_admin(&app, "", "NOPE-NOPE").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("wrong admin enrolment token"), "{e:?}");

    let old = mint(&app, "admin", 60_000);
    let new = mint(&app, "alice", 60_000);
    let e = enrol_admin(&app, "", &old).await.unwrap_err();
    assert!(e.message().contains("replaced by a newer one"), "{e:?}");
    let e = enrol_admin(&app, "bob", &new).await.unwrap_err();
    assert!(e.message().contains("is for admin `alice`"), "{e:?}");

    let expired = mint(&app, "admin", 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let e = enrol_admin(&app, "", &expired).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("expired"), "{e:?}");
    let e = enrol_admin(&app, "", "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("`token`"), "{e:?}");

    assert_eq!(audit_kinds(&app, "admin.enrol.refused").len(), 5);
    assert!(!app.api.store.admin_ever_enrolled().unwrap());
    // A refused attempt does not burn the token.
    let good = mint(&app, "admin", 60_000);
    enrol_admin(&app, "admin", &good).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_rate_limited_per_address() {
    let app = start(Arc::new(Unused)).await;
    let good = mint(&app, "admin", 60_000);
    for _ in 0..MAX_REFUSALS {
        let e = enrol_admin(&app, "", "WRONG").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
    // Even the right token is refused unexamined now (and not burnt).
    let e = enrol_admin(&app, "", &good).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("too many refused"), "{e:?}");
    assert!(app.api.store.pending_admin_token().unwrap().is_some());
    // Host enrolment shares the limit.
    let e = app.enrol("web1", "x").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
}

fn appliance_cmd(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_trustbind-appliance"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("TRUSTBIND_ADMIN_NAME")
        .output()
        .unwrap()
}

#[test]
fn admin_token_command_creates_what_is_missing_and_respects_if_unenrolled() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fresh");
    // First boot: no database, no CA yet.
    let out = appliance_cmd(&data, &["admin-token", "--if-unenrolled"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let first = stdout.trim().to_owned();
    // >= 128 bits: 32 base32 characters in groups of four.
    assert_eq!(first.replace('-', "").len(), 32, "{first}");
    assert!(data.join("ca.pem").exists());
    let fp = appliance_cmd(&data, &["ca-fingerprint"]);
    assert!(fp.status.success());
    assert_eq!(String::from_utf8(fp.stdout).unwrap().trim().len(), 64);

    let store = Store::open(&data.join("appliance.db")).unwrap();
    let pending = store.pending_admin_token().unwrap().unwrap();
    assert_eq!(pending.token_sha256, admin_token_sha256(&first));
    assert_eq!(pending.name, "admin");

    // Not enrolled yet: a new token, which replaces the first.
    let out = appliance_cmd(
        &data,
        &[
            "admin-token",
            "--if-unenrolled",
            "--name",
            "ops",
            "--ttl-min",
            "5",
        ],
    );
    let second = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_ne!(second, first);
    let pending = store.pending_admin_token().unwrap().unwrap();
    assert_eq!(pending.token_sha256, admin_token_sha256(&second));
    assert_eq!(pending.name, "ops");
    assert_eq!(
        store
            .admin_token_state(&admin_token_sha256(&first))
            .unwrap()
            .as_deref(),
        Some("superseded")
    );

    // Once an admin enrolled, --if-unenrolled prints nothing and succeeds;
    // without it a token is still made (another admin).
    store
        .use_admin_token(pending.id, "ops", "01", i64::MAX, "test")
        .unwrap();
    let out = appliance_cmd(&data, &["admin-token", "--if-unenrolled"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = appliance_cmd(&data, &["admin-token"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1);

    // Usage errors.
    let out = appliance_cmd(&data, &["admin-token", "--ttl-min", "0"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = appliance_cmd(&data, &["admin-token", "--name", "-x"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let made = store.audit_rows(0, 100).unwrap();
    assert_eq!(
        made.iter()
            .filter(|r| r.kind == "admin.token.create")
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_grants_its_role_to_the_certificate() {
    use trustbind_appliance::store::AdminRole;
    let app = start(Arc::new(Unused)).await;
    let t = new_admin_token().unwrap();
    app.api
        .store
        .create_admin_token_as(
            "auditor",
            AdminRole::ReadOnly,
            &admin_token_sha256(&t),
            60_000,
            false,
            "test",
        )
        .unwrap()
        .unwrap();
    let (cert, _) = enrol_admin(&app, "auditor", &t).await.unwrap();
    let info = cert_of(&cert);
    let rec = app.api.store.admin_cert(&info.serial).unwrap().unwrap();
    assert_eq!(rec.role, AdminRole::ReadOnly);
    assert_eq!(rec.name, "auditor");
    assert!(rec.revoked_ms.is_none());
    let exp = trustbind_appliance::pki::not_after_ms(cert.as_bytes()).unwrap();
    assert_eq!(rec.expires_ms / 1000, exp / 1000);
}
