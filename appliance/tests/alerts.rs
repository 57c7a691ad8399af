//! `@alert` delivery end to end: an enrolled host's Qualify batch, decided
//! by the real engine and audited, raises alerts that a test HTTPS webhook
//! and a test syslog-over-TLS receiver (both with certificates of a test
//! CA) receive; a webhook that fails first is retried; a queue that is full
//! drops and counts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use trustbind_appliance::agent_api::pb::{self, QualifyBatch};
use trustbind_appliance::alerts::{Alerts, Retry, Sink};
use trustbind_appliance::policy::engine::Engine;
use trustbind_appliance::store::hex;

const SCHEMA: &str = include_str!("../../policies/trustbind.cedarschema");

const POLICY: &str = r#"
@id("run-tools")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"tools");

@id("tools-watched")
@alert("ops")
permit (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"watched");

@id("no-shutdown")
@alert("soc")
forbid (principal, action == Trustbind::Action::"exec", resource in Trustbind::ProgramGroup::"root-tools");
"#;

const TOOL: [u8; 32] = [0x11; 32];
const WATCHED: [u8; 32] = [0x22; 32];
const SHUTDOWN: [u8; 32] = [0x33; 32];
const UNKNOWN: [u8; 32] = [0x99; 32];

/// A test CA and a server certificate for `localhost` / 127.0.0.1 it signed.
struct TestCa {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn test_ca() -> TestCa {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    TestCa {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// An HTTPS server on 127.0.0.1 answering each POST with the next status
/// of `statuses` (then 200), sending every body it got to the channel.
async fn webhook_server(
    server: Arc<rustls::ServerConfig>,
    statuses: Vec<u16>,
) -> (String, mpsc::UnboundedReceiver<(String, Value)>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}/hook", l.local_addr().unwrap().port());
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        let statuses = Arc::new(std::sync::Mutex::new(statuses.into_iter()));
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (acceptor, tx, statuses) = (acceptor.clone(), tx.clone(), Arc::clone(&statuses));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut r = BufReader::new(tls);
                loop {
                    // One HTTP/1.1 request: head, then Content-Length bytes.
                    let mut head = Vec::new();
                    let mut len = 0_usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        head.push(line);
                    }
                    let mut body = vec![0_u8; len];
                    r.read_exact(&mut body).await.unwrap();
                    let status = statuses.lock().unwrap().next().unwrap_or(200);
                    let _ = tx.send((
                        head.first().cloned().unwrap_or_default(),
                        serde_json::from_slice(&body).unwrap(),
                    ));
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

/// A syslog-over-TLS receiver on 127.0.0.1: each octet-counted frame's
/// message to the channel.
async fn syslog_server(
    server: Arc<rustls::ServerConfig>,
) -> (String, mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("localhost:{}", l.local_addr().unwrap().port());
    let (tx, rx) = mpsc::unbounded_channel();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut r = BufReader::new(tls);
                loop {
                    // MSG-LEN SP SYSLOG-MSG (RFC 5425 §4.3).
                    let mut len = Vec::new();
                    if r.read_until(b' ', &mut len).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let n: usize = std::str::from_utf8(&len)
                        .unwrap()
                        .trim_end()
                        .parse()
                        .unwrap();
                    let mut msg = vec![0_u8; n];
                    r.read_exact(&mut msg).await.unwrap();
                    let _ = tx.send(String::from_utf8(msg).unwrap());
                }
            });
        }
    });
    (addr, rx)
}

/// Request `id`: bob execs program `sha` at `path`.
fn exec(id: u64, sha: [u8; 32], path: &str) -> pb::Request {
    let mut r = common::exec(id, sha);
    if let Some(p) = r.program.as_mut() {
        p.path = path.into();
    }
    r
}

fn fast() -> Retry {
    Retry {
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_times: 4,
    }
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no alert within 20 s")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_and_syslog_with_their_audit_rows() {
    let ca = test_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    // The webhook fails the first POST: the alert is retried.
    let (url, mut hooks) = webhook_server(Arc::clone(&ca.server), vec![503]).await;
    let (syslog, mut lines) = syslog_server(Arc::clone(&ca.server)).await;

    let app = common::start_with(|store, _| {
        Arc::new(Engine::new(store, SCHEMA).unwrap())
            as Arc<dyn trustbind_appliance::agent_api::Decider>
    })
    .await;
    let store = &app.api.store;
    for (sha, group) in [
        (TOOL, "tools"),
        (WATCHED, "watched"),
        (SHUTDOWN, "root-tools"),
    ] {
        common::sig(store, sha, group);
    }
    let id = store
        .create_policy_draft(POLICY, "t", "admin:test")
        .unwrap();
    store.activate_policy(id, "admin:test").unwrap();
    let sinks = vec![
        Sink::webhook(&url, Some(&ca_file)).unwrap(),
        Sink::syslog(&syslog, Some(&ca_file), "appliance1").unwrap(),
    ];
    assert!(app.api.set_alerts(Alerts::start(sinks, 64, fast())));
    let cfg = app.enrolled("web1").await;
    let mut client = app.agent_client(cfg).await.unwrap();

    let reply = client
        .qualify(QualifyBatch {
            requests: vec![
                exec(1, TOOL, "/usr/bin/tool"),
                exec(2, WATCHED, "/usr/bin/watched"),
                exec(3, SHUTDOWN, "/usr/sbin/shutdown"),
                exec(4, UNKNOWN, "/tmp/x"),
            ],
            module_session: Vec::new(),
            module_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.results[2].verdict(), pb::Verdict::Deny);

    // The audit rows of requests 2 and 3.
    let rows = store.audit_rows(0, 10_000).unwrap();
    let seq_of = |id: u64| {
        rows.iter()
            .filter(|r| r.kind == "decision")
            .find(|r| serde_json::from_str::<Value>(&r.detail).unwrap()["id"] == id)
            .unwrap()
            .seq
    };

    // Webhook: the first POST answered 503, the same alert again, then the
    // next; nothing for the plain allow and the default deny.
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let (line, body) = recv(&mut hooks).await;
        assert_eq!(line, "POST /hook HTTP/1.1\r\n");
        bodies.push(body);
    }
    assert_eq!(
        bodies[0], bodies[1],
        "a failed POST is retried with the same body"
    );
    let by_name = |name: &str| bodies.iter().find(|b| b["alert"] == name).unwrap().clone();
    let ops = by_name("ops");
    assert_eq!(ops["host"], "web1");
    assert_eq!(ops["user"], "bob");
    assert_eq!(ops["program"], hex(&WATCHED));
    assert_eq!(ops["path"], "/usr/bin/watched");
    assert_eq!(ops["action"], "exec");
    assert_eq!(ops["resource"], "/usr/bin/watched");
    assert_eq!(ops["decision"], "allow");
    assert_eq!(ops["policies"], serde_json::json!(["tools-watched"]));
    assert_eq!(ops["audit_seq"], seq_of(2));
    let soc = by_name("soc");
    assert_eq!(soc["decision"], "deny");
    assert_eq!(soc["program"], hex(&SHUTDOWN));
    assert_eq!(soc["resource"], "/usr/sbin/shutdown");
    assert_eq!(soc["policies"], serde_json::json!(["no-shutdown"]));
    assert_eq!(soc["audit_seq"], seq_of(3));

    // Syslog: two RFC 5424 messages with the same fields.
    let mut msgs = [recv(&mut lines).await, recv(&mut lines).await];
    msgs.sort();
    let soc_line = msgs.iter().find(|m| m.contains("alert=\"soc\"")).unwrap();
    assert!(soc_line.starts_with("<36>1 "), "{soc_line}");
    assert!(soc_line.contains(" appliance1 trustbind "), "{soc_line}");
    for field in [
        "host=\"web1\"".to_owned(),
        "user=\"bob\"".to_owned(),
        format!("program=\"{}\"", hex(&SHUTDOWN)),
        "action=\"exec\"".to_owned(),
        "resource=\"/usr/sbin/shutdown\"".to_owned(),
        "decision=\"deny\"".to_owned(),
        format!("audit_seq=\"{}\"", seq_of(3)),
    ] {
        assert!(soc_line.contains(&field), "{field} not in {soc_line}");
    }
    let ops_line = msgs.iter().find(|m| m.contains("alert=\"ops\"")).unwrap();
    assert!(ops_line.starts_with("<37>1 "), "{ops_line}");
    assert!(
        ops_line.contains(&format!("audit_seq=\"{}\"", seq_of(2))),
        "{ops_line}"
    );

    // Nothing more: the allow without @alert and the default deny raise none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hooks.try_recv().is_err());
    assert!(lines.try_recv().is_err());
    let m = trustbind_appliance::metrics::metrics();
    assert!(m.alerts("webhook", "sent") >= 2);
    assert!(m.alerts("syslog", "sent") >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_keeps_failing_is_counted_failed_and_a_full_queue_drops() {
    let ca = test_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let (url, mut hooks) = webhook_server(Arc::clone(&ca.server), vec![500; 100]).await;
    let m = trustbind_appliance::metrics::metrics();
    let (failed, dropped) = (
        m.alerts("webhook", "failed"),
        m.alerts("webhook", "dropped"),
    );
    let alerts = Alerts::start(
        vec![Sink::webhook(&url, Some(&ca_file)).unwrap()],
        1,
        fast(),
    );
    let alert = |seq| trustbind_appliance::alerts::Alert {
        alert: "soc".into(),
        host: "web1".into(),
        user: "bob".into(),
        program: "ab".repeat(32),
        path: "/x".into(),
        action: "exec".into(),
        resource: "/x".into(),
        decision: "deny".into(),
        policies: vec![],
        audit_seq: seq,
        at_ms: 0,
        generation: 1,
    };
    // The first is taken by the task (its first POST arrives) and retried
    // while one more waits in the queue; the other eight drop, at once.
    alerts.send(alert(1));
    assert_eq!(recv(&mut hooks).await.1["audit_seq"], 1);
    let t = std::time::Instant::now();
    for seq in 2..=10 {
        alerts.send(alert(seq));
    }
    assert!(t.elapsed() < Duration::from_millis(200), "send waited");
    assert_eq!(m.alerts("webhook", "dropped") - dropped, 8);
    // 4 retries of the first, then 1 + 4 tries of the second.
    for i in 0..9 {
        let (_, body) = recv(&mut hooks).await;
        assert_eq!(body["audit_seq"], if i < 4 { 1 } else { 2 }, "{body}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m.alerts("webhook", "failed") < failed + 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(m.alerts("webhook", "failed") - failed, 2);
    assert!(m
        .render()
        .contains("trustbind_alerts_total{sink=\"webhook\",result=\"dropped\"}"));
}
