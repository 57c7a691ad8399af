//! Enrolment and the agent port's TLS gate, over real TLS on 127.0.0.1 with
//! a real SQLite store: a good token buys a certificate that works on the
//! agent port; bad, reused, unknown and revoked are refused and audited; no
//! client certificate, a revoked host's certificate and an admin
//! certificate fail the handshake; a connected host loses its stream and
//! its next call on revocation.

mod common;

use std::sync::Arc;

use common::{start, Appliance};
use tokio_stream::StreamExt;
use trustbind_appliance::agent_api::pb::{push, Hello};
use trustbind_appliance::agent_api::{Answer, DecideError, Decider};
use trustbind_appliance::request::QualifyRequest;
use trustbind_appliance::store::HostState;

/// These tests never reach a decision.
struct Unused;
impl Decider for Unused {
    fn decide(&self, _r: &QualifyRequest) -> Result<Answer, DecideError> {
        Err(DecideError("no decisions in enrolment tests".into()))
    }
}

async fn appliance() -> Appliance {
    start(Arc::new(Unused)).await
}

fn refusals(app: &Appliance) -> Vec<String> {
    app.api
        .store
        .audit_rows(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "host.enrol.refused")
        .map(|r| r.detail)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_token_gives_a_certificate_that_works_on_the_agent_port() {
    let app = appliance().await;
    app.add_pending("web1", "web", "s3cret-token-web1");
    let (cert, key) = app.enrol("web1", "s3cret-token-web1").await.unwrap();
    assert!(matches!(
        app.api.store.host("web1").unwrap(),
        Some((HostState::Enrolled, _))
    ));
    let info = trustbind_appliance::pki::peer_cert(&rustls::pki_types::CertificateDer::from(
        x509_der(&cert),
    ))
    .unwrap();
    assert_eq!(info.kind, trustbind_appliance::pki::CertKind::Host);
    assert_eq!(info.name, "web1");
    let mut client = app
        .agent_client(app.client_config(&cert, &key))
        .await
        .unwrap();
    let mut stream = client
        .subscribe(Hello {
            agent_version: "test".into(),
            generation: 0,
            module_session: Vec::new(),
            qualify_net: false,
            verdict_timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // First the host's mode, then the current generation.
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first.kind,
        Some(push::Kind::HostMode(
            trustbind_appliance::agent_api::pb::HostMode {
                mode: "enforce".into(),
                module_order: Vec::new(),
            }
        ))
    );
    let second = stream.next().await.unwrap().unwrap();
    let generation = app.api.store.governing().unwrap().generation;
    assert_eq!(
        second.kind,
        Some(push::Kind::Generation(
            trustbind_appliance::agent_api::pb::PolicyGeneration { generation }
        ))
    );
    let rows = app.api.store.audit_rows(0, 1000).unwrap();
    assert!(rows
        .iter()
        .any(|r| r.kind == "host.enrol" && r.actor == "web1"));
    // The token is never in the audit log.
    assert!(rows.iter().all(|r| !r.detail.contains("s3cret")));
}

fn x509_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_is_refused_and_audited() {
    let app = appliance().await;
    app.add_pending("web1", "web", "right-token");
    let err = app.enrol("web1", "wrong-token").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message()
            .contains("wrong enrolment token for host `web1`"),
        "{err:?}"
    );
    assert!(matches!(
        app.api.store.host("web1").unwrap(),
        Some((HostState::Pending, _))
    ));
    let r = refusals(&app);
    assert_eq!(r.len(), 1);
    assert!(r[0].contains("wrong enrolment token"));
    assert!(!r[0].contains("wrong-token") && !r[0].contains("right-token"));
    // The right token still works afterwards.
    app.enrol("web1", "right-token").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_token_is_refused() {
    let app = appliance().await;
    app.add_pending("web1", "web", "once");
    app.enrol("web1", "once").await.unwrap();
    let err = app.enrol("web1", "once").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("already enrolled"), "{err:?}");
    assert_eq!(refusals(&app).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_revoked_hosts_cannot_enrol() {
    let app = appliance().await;
    let err = app.enrol("ghost", "whatever").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("`ghost`"), "{err:?}");
    app.add_pending("web2", "web", "tok");
    app.api.revoke_host("web2", "admin:test").unwrap();
    let err = app.enrol("web2", "tok").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("revoked"), "{err:?}");
    assert_eq!(refusals(&app).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_csr_is_refused_and_token_not_consumed() {
    let app = appliance().await;
    app.add_pending("web1", "web", "tok");
    let ch = common::connect(app.enrol, app.anon_config()).await.unwrap();
    let err = trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient::new(ch)
        .enrol(trustbind_appliance::agent_api::pb::EnrolRequest {
            host: "web1".into(),
            token: "tok".into(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("csr_pem"), "{err:?}");
    app.enrol("web1", "tok").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_fails_the_handshake() {
    let app = appliance().await;
    let refused = common::raw_handshake(app.agent, app.anon_config()).await;
    assert!(
        refused.is_err(),
        "agent port accepted a client without certificate"
    );
    let ch = common::connect(app.agent, app.anon_config()).await;
    if let Ok(ch) = ch {
        let r = trustbind_appliance::agent_api::pb::agent_client::AgentClient::new(ch)
            .subscribe(Hello::default())
            .await;
        assert!(r.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_certificate_is_refused_on_the_agent_port() {
    let app = appliance().await;
    let (cert, key) = app.api.pki.issue_admin("alice").unwrap();
    let cfg = app.client_config(&cert, &key);
    let refused = common::raw_handshake(app.agent, cfg).await;
    let err = refused.unwrap_err();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_certificate_is_refused_by_the_admin_config() {
    let app = appliance().await;
    let host_cfg = app.enrolled("web1").await;
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_l.local_addr().unwrap();
    let router = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let cfg = app.admin_tls();
    tokio::spawn(trustbind_appliance::admin::serve(admin_l, cfg, router));
    assert!(common::raw_handshake(admin_addr, host_cfg).await.is_err());
    let (cert, key) = app.api.pki.issue_admin("alice").unwrap();
    // An admin certificate the appliance has no record of is refused too.
    assert!(
        common::raw_handshake(admin_addr, app.client_config(&cert, &key))
            .await
            .is_err()
    );
    trustbind_appliance::admin::register_admin_cert(
        &app.api.store,
        &cert,
        trustbind_appliance::store::AdminRole::Admin,
        "test",
    )
    .unwrap();
    assert!(
        common::raw_handshake(admin_addr, app.client_config(&cert, &key))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_host_fails_the_handshake_and_loses_its_stream_and_calls() {
    let app = appliance().await;
    let cfg = app.enrolled("web1").await;
    let mut client = app.agent_client(Arc::clone(&cfg)).await.unwrap();
    let mut stream = client
        .subscribe(Hello::default())
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.next().await.unwrap().unwrap().kind,
        Some(push::Kind::HostMode(_))
    ));

    app.api.revoke_host("web1", "admin:test").unwrap();

    // The open stream gets Revoked, then ends (a generation announcement
    // from the enrolment may come first).
    let mut msg = stream.next().await.unwrap().unwrap();
    while matches!(
        msg.kind,
        Some(
            push::Kind::Generation(_)
                | push::Kind::HostMode(_)
                | push::Kind::Peers(_)
                | push::Kind::FileSets(_)
        )
    ) {
        msg = stream.next().await.unwrap().unwrap();
    }
    assert_eq!(
        msg.kind,
        Some(push::Kind::Revoked(
            trustbind_appliance::agent_api::pb::Revoked {}
        ))
    );
    assert!(stream.next().await.is_none());
    // The next call on the same connection is refused.
    let err = client.subscribe(Hello::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("web1"), "{err:?}");
    // A new connection fails at the handshake.
    let err = common::raw_handshake(app.agent, cfg).await.unwrap_err();
    assert!(err.to_lowercase().contains("revoked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_hosts_survive_a_restart_of_the_api() {
    let app = appliance().await;
    let _cfg = app.enrolled("web1").await;
    // A fresh AgentApi over the same store allows the same certificate.
    let store = Arc::clone(&app.api.store);
    let api2 = trustbind_appliance::agent_api::AgentApi::new(
        store,
        Arc::clone(&app.api.pki),
        Arc::new(Unused),
    )
    .unwrap();
    assert_eq!(api2.hosts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_used_for_new_handshakes() {
    let app = appliance().await;
    let cfg = app.enrolled("web1").await;
    let before = app.api.pki.server_serial();
    let after = app.api.pki.rotate_server_cert().unwrap();
    assert_ne!(before, after);
    // A new connection still verifies (same CA) and works.
    let mut client = app.agent_client(cfg).await.unwrap();
    client.subscribe(Hello::default()).await.unwrap();
    // The CA persisted: reopening gives the same fingerprint and new serial.
    let pki2 = trustbind_appliance::pki::Pki::open_or_create(app.dir.path(), &[]).unwrap();
    assert_eq!(pki2.fingerprint(), app.api.pki.fingerprint());
    assert_eq!(pki2.server_serial(), after);
}

/// The `serve` binary end to end: ports from its output, the CA pinned by
/// the printed fingerprint, an enrolment, a call on the agent port, and a
/// clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binary_enrols_and_stops_on_sigterm() {
    use std::process::Command;

    use rustls::pki_types::pem::PemObject;
    use sha2::Digest;

    let dir = tempfile::tempdir().unwrap();
    let mut serve = common::ServeBinary::start(dir.path(), &[]);
    let (agent, enrol) = (serve.agent, serve.enrol);
    let fingerprint = serve.fingerprint.clone();

    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap();
    assert_eq!(
        trustbind_appliance::store::hex(&sha2::Sha256::digest(ca.as_ref())),
        fingerprint
    );
    let store = trustbind_appliance::store::Store::open(&dir.path().join("appliance.db")).unwrap();
    store
        .set_host_group("web", trustbind_appliance::store::Mode::Enforce, "admin:t")
        .unwrap();
    store
        .add_pending_host("web9", "web", &common::sha256_hex("tok-9"), "admin:t")
        .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let builder = || {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let ch = common::connect(enrol, Arc::new(builder().with_no_client_auth()))
        .await
        .unwrap();
    let reply = trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient::new(ch)
        .enrol(trustbind_appliance::agent_api::pb::EnrolRequest {
            host: "web9".into(),
            token: "tok-9".into(),
            csr_pem: csr.pem().unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    let cfg = builder()
        .with_client_auth_cert(
            vec![
                rustls::pki_types::CertificateDer::from_pem_slice(reply.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
    let ch = common::connect(agent, Arc::new(cfg)).await.unwrap();
    let mut client = trustbind_appliance::agent_api::pb::agent_client::AgentClient::new(ch);
    let mut stream = client
        .subscribe(Hello::default())
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        stream.next().await.unwrap().unwrap().kind,
        Some(push::Kind::HostMode(_))
    ));
    // SIGTERM with the stream still open: the stream ends, the process exits.
    let pid = serve.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    while let Some(m) = stream.next().await {
        if m.is_err() {
            break;
        }
    }
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_enrolment_token_is_refused_with_a_clear_error() {
    let app = appliance().await;
    let store = &app.api.store;
    store
        .set_host_group("web", trustbind_appliance::store::Mode::Enforce, "admin:t")
        .unwrap();
    let token = "short-lived-token-of-web1";
    store
        .add_pending_host_ttl("web1", "web", &common::sha256_hex(token), 1, "admin:t")
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let err = app.enrol("web1", token).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("field `token`") && err.message().contains("expired"),
        "{}",
        err.message()
    );
    assert!(matches!(
        store.host("web1").unwrap(),
        Some((HostState::Pending, _))
    ));
    assert!(refusals(&app).iter().any(|d| d.contains("expired")));
    // A new token (the admin API's `POST /v1/hosts/{name}/token`) works.
    store
        .retoken_host(
            "web1",
            &common::sha256_hex("fresh-token"),
            60_000,
            "admin:t",
        )
        .unwrap();
    app.enrol("web1", "fresh-token").await.unwrap();
    // The default lifetime is 24 h.
    app.add_pending("web2", "web", "tok-web2");
    let (_, exp) = store.pending_token("web2").unwrap().unwrap();
    let left = exp.unwrap() - trustbind_appliance::store::now_ms();
    assert!((86_000_000..=86_400_000).contains(&left), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_checked_before_anything_is_signed() {
    let app = appliance().await;
    app.add_pending("web1", "web", "the-right-token");
    // A wrong token with an unusable CSR: refused for the token, so the
    // CSR was never handed to the CA.
    let ch = common::connect(app.enrol, app.anon_config()).await.unwrap();
    let err = trustbind_appliance::agent_api::pb::enrolment_client::EnrolmentClient::new(ch)
        .enrol(trustbind_appliance::agent_api::pb::EnrolRequest {
            host: "web1".into(),
            token: "a-wrong-token".into(),
            csr_pem: "not a CSR".into(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("wrong enrolment token"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_renews_its_certificate_over_its_connection() {
    use trustbind_appliance::agent_api::pb::RenewRequest;
    let app = appliance().await;
    app.add_pending("web1", "web", "token-web1-renew");
    let (cert1, key1) = app.enrol("web1", "token-web1-renew").await.unwrap();
    let cfg1 = app.client_config(&cert1, &key1);
    let mut client = app.agent_client(Arc::clone(&cfg1)).await.unwrap();
    // A renewal with a CSR for a new key.
    let (key2, csr2) = common::key_and_csr();
    let r = client
        .renew(RenewRequest { csr_pem: csr2 })
        .await
        .unwrap()
        .into_inner();
    let serial1 = cert_serial(&cert1);
    assert_ne!(r.serial, serial1);
    assert_eq!(cert_serial(&r.cert_pem), r.serial);
    assert!(r.not_after_ms > trustbind_appliance::store::now_ms() + 700 * 86_400_000);
    let cfg2 = app.client_config(&r.cert_pem, &key2.serialize_pem());
    assert!(common::raw_handshake(app.agent, Arc::clone(&cfg2))
        .await
        .is_ok());
    // The previous certificate stays valid (a lost reply is no lock-out)...
    assert!(common::raw_handshake(app.agent, Arc::clone(&cfg1))
        .await
        .is_ok());
    // ...until the next renewal.
    let mut client2 = app.agent_client(Arc::clone(&cfg2)).await.unwrap();
    let (key3, csr3) = common::key_and_csr();
    let r3 = client2
        .renew(RenewRequest { csr_pem: csr3 })
        .await
        .unwrap()
        .into_inner();
    let cfg3 = app.client_config(&r3.cert_pem, &key3.serialize_pem());
    assert!(common::raw_handshake(app.agent, Arc::clone(&cfg3))
        .await
        .is_ok());
    assert!(common::raw_handshake(app.agent, Arc::clone(&cfg2))
        .await
        .is_ok());
    assert!(common::raw_handshake(app.agent, Arc::clone(&cfg1))
        .await
        .is_err());
    // The oldest one cannot renew any more either (its open connection).
    let (_, csr4) = common::key_and_csr();
    let err = client
        .renew(RenewRequest { csr_pem: csr4 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // Revocation ends both.
    app.api.store.revoke_host("web1", "admin:t").unwrap();
    app.api.disconnect_host("web1");
    assert!(common::raw_handshake(app.agent, cfg3).await.is_err());
    assert!(common::raw_handshake(app.agent, cfg2).await.is_err());
    let renewals = app
        .api
        .store
        .audit_rows(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == "host.renew")
        .count();
    assert_eq!(renewals, 2);
}

fn cert_serial(pem: &str) -> String {
    trustbind_appliance::pki::peer_cert(&x509_der(pem))
        .unwrap()
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_its_certificate_over_its_connection() {
    use trustbind_agent::link;
    let app = appliance().await;
    app.add_pending("web1", "web", "token-web1-agent");
    let state = tempfile::tempdir().unwrap();
    let e = link::Enrolment {
        enrol_addr: app.enrol.to_string(),
        agent_addr: Some(app.agent.to_string()),
        server_name: Some("localhost".into()),
        name: "web1".into(),
        token: "token-web1-agent".into(),
        ca_fingerprint: app.api.pki.fingerprint().to_owned(),
    };
    let cfg = link::enrol(&e, state.path()).await.unwrap();
    let old_cert = std::fs::read_to_string(state.path().join("cert.pem")).unwrap();
    let old_after = link::cert_not_after_ms(state.path()).unwrap();
    // Two years from now: not due with 30 days of margin, due with 800.
    let now = trustbind_appliance::store::now_ms();
    assert!(!link::renewal_due(old_after, now, link::RENEW_BEFORE_DAYS));
    assert!(link::renewal_due(old_after, now, 800));
    let ch = link::channel(
        &cfg.agent_addr,
        &cfg.server_name,
        link::agent_tls(state.path()).unwrap(),
    )
    .await
    .unwrap();
    let mut client = trustbind_appliance::agent_api::pb::agent_client::AgentClient::new(ch);
    let new_after = link::renew(
        &mut client,
        state.path(),
        &cfg.name,
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    assert!(new_after >= old_after);
    let new_cert = std::fs::read_to_string(state.path().join("cert.pem")).unwrap();
    assert_ne!(cert_serial(&new_cert), cert_serial(&old_cert));
    assert!(!state.path().join("cert.pem.new").exists());
    // The files in the state directory make a working credential.
    let tls = Arc::new(link::agent_tls(state.path()).unwrap());
    assert!(common::raw_handshake(app.agent, tls).await.is_ok());
    assert_eq!(
        app.api
            .store
            .host_info("web1")
            .unwrap()
            .unwrap()
            .cert_serial,
        Some(cert_serial(&new_cert))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_host_name_is_refused_and_stored_cut() {
    let app = appliance().await;
    let long = "h".repeat(60_000);
    let err = app.enrol(&long, "any-token").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("field `host`"), "{}", err.message());
    assert!(err.message().len() < 400, "{}", err.message().len());
    let rows = refusals(&app);
    assert_eq!(rows.len(), 1);
    // The refusal row holds a cut name and message, not 60 kB.
    assert!(rows[0].len() < 1_000, "{}", rows[0].len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_from_one_address_do_not_lock_others_out() {
    let app = appliance().await;
    // 300 connections from 127.0.0.1 that never say a word: more than the
    // port's 256 handshake slots, which used to lock every agent out for
    // the 10 s handshake timeout. Past its 16 handshakes in progress (and
    // its burst of new connections) the address's connections are closed
    // at once...
    let m = trustbind_appliance::metrics::metrics();
    let before = m.refused("connection");
    let (stalled, closed) = common::stall(app.enrol, 300).await;
    assert!(closed >= 300 - 16, "{closed} of 300 closed");
    assert!(m.refused("connection") >= before + 284);
    // ...so another address handshakes at once.
    let tcp = common::connect_from("127.0.0.2", app.enrol).await;
    let connector = tokio_rustls::TlsConnector::from(app.anon_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(3),
        connector.connect(name, tcp),
    )
    .await
    .expect("the handshake must not wait behind the stalled ones")
    .unwrap();
    drop(stalled);
}
