//! The admin API over real HTTPS on loopback with admin client
//! certificates issued by the appliance's own CA (`Pki`), against a real
//! SQLite file in a temporary directory.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tower::ServiceExt;
use trustbind_appliance::admin::{self, AdminState, Change};
use trustbind_appliance::pki::Pki;
use trustbind_appliance::store::{AdminRole, HostState, Store};

const EXAMPLE: &str = include_str!("../../policies/example.cedar");

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA other than the appliance's, for certificates that must be refused.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf(
        &self,
        cn: &str,
        server: bool,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let sans = if server {
            vec!["localhost".to_owned()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

type Cred = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn from_pem(cert: &str, key: &str) -> Cred {
    (
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
}

struct Harness {
    addr: SocketAddr,
    pki: Arc<Pki>,
    client: Arc<ClientConfig>,
    store: Arc<Store>,
    limits: Arc<trustbind_appliance::limits::Limits>,
    changes: Arc<Mutex<Vec<Change>>>,
    dir: tempfile::TempDir,
    /// Audit rows of the setup (alice's certificate) that `audit` skips.
    audit_base: i64,
}

struct Resp {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

fn client_config(pki: &Pki, cred: Option<Cred>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca_der().clone()).unwrap();
    let b = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match cred {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    })
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
    let pki =
        Arc::new(Pki::open_or_create(&dir.path().join("pki"), &["localhost".to_owned()]).unwrap());
    let server = pki
        .admin_server_config(admin::AdminCerts::new(Arc::clone(&store)))
        .unwrap();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let c2 = Arc::clone(&changes);
    let limits = Arc::new(trustbind_appliance::limits::Limits::new(Arc::clone(&store)).unwrap());
    let state = AdminState::new(Arc::clone(&store))
        .with_hook(Arc::new(move |c: &Change| {
            c2.lock().unwrap().push(c.clone());
        }))
        .with_limits(Arc::clone(&limits))
        .with_ca_fingerprint(pki.fingerprint().to_owned())
        .with_pki(Arc::clone(&pki));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin::serve(listener, server, admin::router(state)));
    let (cert, key) = pki.issue_admin("alice").unwrap();
    admin::register_admin_cert(&store, &cert, AdminRole::Admin, "test").unwrap();
    let audit_base = store.audit_head().unwrap();
    let client = client_config(&pki, Some(from_pem(&cert, &key)));
    Harness {
        addr,
        pki,
        client,
        store,
        limits,
        changes,
        dir,
        audit_base,
    }
}

async fn request_with(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Resp, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let req = b
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    Ok(Resp {
        status,
        content_type,
        body,
    })
}

impl Harness {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|v| serde_json::to_vec(&v).unwrap());
        request_with(Arc::clone(&self.client), self.addr, method, path, body)
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.call("GET", path, None).await;
        (r.status, r.json())
    }

    async fn send(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self.call(method, path, Some(body)).await;
        (r.status, r.json())
    }

    async fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let r = request_with(
            Arc::clone(&self.client),
            self.addr,
            method,
            path,
            Some(body.to_vec()),
        )
        .await
        .unwrap();
        (r.status, r.json())
    }

    fn changes(&self) -> Vec<Change> {
        std::mem::take(&mut *self.changes.lock().unwrap())
    }

    /// The audit rows written after the harness's setup.
    fn audit(&self) -> Vec<trustbind_appliance::store::AuditRow> {
        self.store.audit_rows(self.audit_base, 100_000).unwrap()
    }
}

fn sha(n: u32) -> String {
    format!("{n:064x}")
}

fn sig(n: u32) -> Value {
    json!({ "sha256": sha(n), "size": n, "name": format!("/usr/bin/p{n}") })
}

#[tokio::test]
async fn policy_lifecycle_upload_diff_activate_rollback() {
    let h = start().await;
    let (s, v) = h.get("/v1/policies").await;
    assert_eq!(s, 200);
    assert_eq!(v["policies"], json!([]));
    assert_eq!(v["governing"]["active"], Value::Null);
    let (s, v) = h.get("/v1/policies/active").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));

    let (s, v) = h
        .send("POST", "/v1/policies/validate", json!({ "text": EXAMPLE }))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true);

    let (s, v) = h
        .send(
            "POST",
            "/v1/policies",
            json!({ "text": EXAMPLE, "comment": "first" }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["state"], "draft");
    let id1 = v["id"].as_i64().unwrap();

    let (s, v) = h.get(&format!("/v1/policies/{id1}")).await;
    assert_eq!(s, 200);
    assert_eq!(v["text"], EXAMPLE);
    assert_eq!(v["comment"], "first");

    let (s, v) = h.get(&format!("/v1/policies/{id1}/diff")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["from"], Value::Null);
    assert!(v["diff"].as_str().unwrap().contains("+permit"), "{v}");

    let (s, v) = h
        .send("POST", &format!("/v1/policies/{id1}/activate"), json!({}))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["governing"]["active"], id1);
    assert_eq!(v["governing"]["generation"], 1);
    assert_eq!(h.changes(), vec![Change::Policy { generation: 1 }]);

    let (s, v) = h
        .send(
            "POST",
            "/v1/policies",
            json!({ "text": "permit(principal, action, resource);\n" }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id2 = v["id"].as_i64().unwrap();
    let (_, v) = h.get(&format!("/v1/policies/{id2}/diff")).await;
    assert_eq!(v["from"]["id"], id1);
    assert_eq!(v["changed"], true);
    let d = v["diff"].as_str().unwrap();
    assert!(
        d.contains("-@id(") && d.contains("+permit(principal, action, resource);"),
        "{d}"
    );

    let (s, _) = h
        .send("POST", &format!("/v1/policies/{id2}/activate"), json!({}))
        .await;
    assert_eq!(s, 200);
    let (s, v) = h.send("POST", "/v1/policies/rollback", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["governing"]["active"], id1);
    assert_eq!(v["governing"]["generation"], 3);
    let (_, v) = h.get("/v1/policies/active").await;
    assert_eq!(v["id"], id1);
    let (_, v) = h.get("/v1/policies").await;
    let states: Vec<&str> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["retired", "active"]);

    // Activating the active version is a conflict, a missing one not found.
    let (s, v) = h
        .send("POST", &format!("/v1/policies/{id1}/activate"), json!({}))
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, _) = h.send("POST", "/v1/policies/999/activate", json!({})).await;
    assert_eq!(s, 404);

    // Every change is audited with the admin's name.
    let kinds: Vec<(String, String)> = h.audit().into_iter().map(|r| (r.kind, r.actor)).collect();
    for k in ["policy.draft", "policy.activate", "policy.rollback"] {
        assert!(
            kinds.contains(&(k.to_owned(), "admin:alice".to_owned())),
            "{k} missing in {kinds:?}"
        );
    }
}

#[tokio::test]
async fn invalid_policy_gets_positions_and_changes_nothing() {
    let h = start().await;
    let text = "permit(principal, action, resource);\n\npermit(principal, action == Trustbind::Action::\"exec\", resource)\n  when { context.nosuch == 1 };\n";
    let (s, v) = h
        .send("POST", "/v1/policies", json!({ "text": text }))
        .await;
    assert_eq!(s, 422, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], "invalid_policy");
    assert_eq!(e["field"], "text");
    assert_eq!(e["details"][0]["stage"], "validation");
    assert_eq!(e["details"][0]["line"], 4, "{v}");
    assert!(e["details"][0]["column"].as_u64().unwrap() > 1);
    assert!(e["message"].as_str().unwrap().contains("4:"), "{v}");

    let (s, v) = h
        .send(
            "POST",
            "/v1/policies",
            json!({ "text": "permit(principal,\n  action resource);" }),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(v["error"]["details"][0]["stage"], "parse");
    assert_eq!(v["error"]["details"][0]["line"], 2, "{v}");

    let (s, v) = h
        .send(
            "POST",
            "/v1/policies/validate",
            json!({ "text": "nonsense" }),
        )
        .await;
    assert_eq!(s, 422, "{v}");

    // A channel obligation the engine could not act on is refused at
    // upload, pointing at the annotation.
    let text = "@id(\"web\")\npermit(principal, action == Trustbind::Action::\"connect\", resource);\n\n@id(\"db\")\n@encrypt(\"yes\")\npermit(principal, action == Trustbind::Action::\"accept\", resource);\n";
    let (s, v) = h
        .send("POST", "/v1/policies", json!({ "text": text }))
        .await;
    assert_eq!(s, 422, "{v}");
    let d = &v["error"]["details"][0];
    assert_eq!(
        (d["line"].as_u64(), d["column"].as_u64()),
        (Some(5), Some(1)),
        "{v}"
    );
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("policy `db`: @encrypt(\"yes\")"),
        "{v}"
    );

    let (_, v) = h.get("/v1/policies").await;
    assert_eq!(v["policies"], json!([]));
    assert!(h.audit().is_empty());
}

#[tokio::test]
async fn signatures_and_groups() {
    let h = start().await;
    let (s, v) = h
        .send(
            "POST",
            "/v1/groups",
            json!({ "name": "coreutils", "description": "GNU" }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["created"], true);
    let (s, v) = h
        .send("POST", "/v1/groups", json!({ "name": "coreutils" }))
        .await;
    assert_eq!((s, &v["created"]), (200, &json!(false)));

    let batch =
        json!({ "signatures": [sig(1), sig(2), sig(3)], "group": "coreutils", "source": "test" });
    let (s, v) = h.send("POST", "/v1/signatures", batch.clone()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (&v["inserted"], &v["unchanged"], &v["added_to_group"]),
        (&json!(3), &json!(0), &json!(3))
    );
    assert_eq!(h.changes(), vec![Change::Signatures]);
    // Idempotent.
    let (_, v) = h.send("POST", "/v1/signatures", batch).await;
    assert_eq!(
        (&v["inserted"], &v["unchanged"], &v["added_to_group"]),
        (&json!(0), &json!(3), &json!(0))
    );
    assert!(h.changes().is_empty());

    // Upper-case hex is accepted and normalised.
    let (s, v) = h
        .get(&format!("/v1/signatures/{}", sha(2).to_uppercase()))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["name"], "/usr/bin/p2");
    assert_eq!(v["source"], "test");
    assert_eq!(v["groups"], json!(["coreutils"]));

    // Cursor pagination.
    let (_, v) = h.get("/v1/signatures?limit=2").await;
    assert_eq!(v["signatures"].as_array().unwrap().len(), 2);
    let next = v["next"].as_str().unwrap().to_owned();
    assert_eq!(next, sha(2));
    let (_, v) = h.get(&format!("/v1/signatures?limit=2&after={next}")).await;
    assert_eq!(v["signatures"][0]["sha256"], sha(3));
    assert_eq!(v["next"], Value::Null);
    let (_, v) = h.get("/v1/signatures?group=coreutils").await;
    assert_eq!(v["signatures"].as_array().unwrap().len(), 3);
    let (s, _) = h.get("/v1/signatures?group=nosuch").await;
    assert_eq!(s, 404);

    // Membership in batches; an unknown hash fails the whole batch.
    let (s, _) = h
        .send("POST", "/v1/groups", json!({ "name": "tools" }))
        .await;
    assert_eq!(s, 201);
    let (s, v) = h
        .send(
            "POST",
            "/v1/groups/tools/members",
            json!({ "sha256": [sha(1), sha(99)] }),
        )
        .await;
    assert_eq!(s, 404, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(&sha(99)));
    let (_, v) = h.get("/v1/groups/tools").await;
    assert_eq!(v["group"]["members"], 0);
    let (s, v) = h
        .send(
            "POST",
            "/v1/groups/tools/members",
            json!({ "sha256": [sha(1), sha(2), sha(1)] }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((&v["added"], &v["already_members"]), (&json!(2), &json!(1)));
    let (s, v) = h
        .send(
            "POST",
            "/v1/groups/tools/members/remove",
            json!({ "sha256": [sha(2), sha(3)] }),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!((&v["removed"], &v["not_members"]), (&json!(1), &json!(1)));
    let (_, v) = h.get("/v1/groups").await;
    let counts: Vec<(String, u64)> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().to_owned(),
                g["members"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts, [("coreutils".into(), 3), ("tools".into(), 1)]);

    // Removal.
    let r = h
        .call("DELETE", &format!("/v1/signatures/{}", sha(1)), None)
        .await;
    assert_eq!(r.status, 204);
    let r = h
        .call("DELETE", &format!("/v1/signatures/{}", sha(1)), None)
        .await;
    assert_eq!(r.status, 404);
    let (s, v) = h
        .send(
            "POST",
            "/v1/signatures/remove",
            json!({ "sha256": [sha(2), sha(1)] }),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (&v["removed"], &v["missing"]),
        (&json!(1), &json!([sha(1)]))
    );
    let (_, v) = h.get("/v1/groups/coreutils").await;
    assert_eq!(v["group"]["members"], 1);
    let (s, v) = h.send("DELETE", "/v1/groups/coreutils", json!(null)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["members_removed"], 1);
    let (s, _) = h.get("/v1/groups/coreutils").await;
    assert_eq!(s, 404);
    // The signature itself stays.
    let (s, _) = h.get(&format!("/v1/signatures/{}", sha(3))).await;
    assert_eq!(s, 200);

    let audit = h.audit();
    assert!(audit
        .iter()
        .any(|r| r.kind == "signature.batch" && r.actor == "admin:alice"));
    assert!(audit.iter().any(|r| r.kind == "group.delete"));
}

#[tokio::test]
async fn signature_batches_are_bounded_and_checked_entry_by_entry() {
    let h = start().await;
    let many: Vec<Value> = (0..10_001).map(sig).collect();
    let (s, v) = h
        .send("POST", "/v1/signatures", json!({ "signatures": many }))
        .await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["code"], "batch_too_large");

    let full: Vec<Value> = (0..10_000).map(sig).collect();
    let (s, v) = h
        .send("POST", "/v1/signatures", json!({ "signatures": full }))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["inserted"], 10_000);

    let (s, v) = h
        .send(
            "POST",
            "/v1/signatures",
            json!({ "signatures": [sig(20_000), { "sha256": "xyz", "size": 1, "name": "n" }] }),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["error"]["field"], "signatures[1].sha256");
    let (s, _) = h.get(&format!("/v1/signatures/{}", sha(20_000))).await;
    assert_eq!(s, 404, "nothing of a refused batch is written");

    let (s, v) = h
        .send(
            "POST",
            "/v1/signatures",
            json!({ "signatures": [{ "sha256": sha(1), "size": 1, "name": "n", "sha1": "12" }] }),
        )
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("signatures[0].sha1"))
    );
    let (s, v) = h
        .send(
            "POST",
            "/v1/signatures",
            json!({ "signatures": [sig(1)], "group": "nosuch" }),
        )
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn hosts_tokens_and_revocation() {
    let h = start().await;
    let (s, v) = h
        .send(
            "PUT",
            "/v1/host-groups/web",
            json!({ "mode": "permissive" }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h.changes(), vec![Change::HostGroups]);
    let (s, v) = h
        .send("PUT", "/v1/host-groups/web", json!({ "mode": "sometimes" }))
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("mode")));

    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "web1", "host_group": "web" }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert_eq!(v["host"]["state"], "pending");
    assert_eq!(v["ca_fingerprint"], h.pki.fingerprint());
    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "web1", "host_group": "web" }),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "web2", "host_group": "nosuch" }),
        )
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (404, Some("host_group")));
    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "bad name", "host_group": "web" }),
        )
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("name")));

    // The token works exactly once, through its documented hash.
    h.store
        .enrol_host("web1", &admin::token_sha256(&token), "01ab")
        .unwrap();
    assert!(h
        .store
        .enrol_host("web1", &admin::token_sha256(&token), "01ab")
        .is_err());
    let (_, v) = h.get("/v1/hosts/web1").await;
    assert_eq!(v["host"]["state"], "enrolled");
    assert_eq!(v["host"]["cert_serial"], "01ab");

    let (s, v) = h.get("/v1/host-groups").await;
    assert_eq!(s, 200);
    assert_eq!(
        v["host_groups"][0],
        json!({ "name": "web", "mode": "permissive", "hosts": 1 })
    );
    let r = h.call("DELETE", "/v1/host-groups/web", None).await;
    assert_eq!(r.status, 409);

    for i in 2..5 {
        let (s, _) = h
            .send(
                "POST",
                "/v1/hosts",
                json!({ "name": format!("web{i}"), "host_group": "web" }),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (_, v) = h.get("/v1/hosts?limit=3").await;
    assert_eq!(v["hosts"].as_array().unwrap().len(), 3);
    let (_, v) = h
        .get(&format!("/v1/hosts?after={}", v["next"].as_str().unwrap()))
        .await;
    assert_eq!(v["hosts"][0]["name"], "web4");
    assert_eq!(v["next"], Value::Null);

    h.changes();
    let (s, v) = h.send("POST", "/v1/hosts/web1/revoke", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["host"]["state"], "revoked");
    assert_eq!(
        h.changes(),
        vec![Change::HostRevoked {
            host: "web1".into()
        }]
    );
    assert_eq!(h.store.host("web1").unwrap().unwrap().0, HostState::Revoked);
    let (s, _) = h.send("POST", "/v1/hosts/nosuch/revoke", json!({})).await;
    assert_eq!(s, 404);

    // The token is in no audit row.
    let r = h.call("GET", "/v1/audit/export", None).await;
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("host.revoke"));
    assert!(!text.contains(&token));
}

async fn put_addresses(h: &Harness, host: &str, addresses: Value) -> (u16, Value) {
    h.send(
        "PUT",
        &format!("/v1/hosts/{host}/addresses"),
        json!({ "addresses": addresses }),
    )
    .await
}

/// Channel binding: an administrator assigns a host its addresses
/// (canonical, one host per address, audited), sees them with the host,
/// and bad addresses are refused naming the entry.
#[tokio::test]
async fn host_addresses_are_assigned_shown_and_exclusive() {
    let h = start().await;
    let (s, _) = h
        .send("PUT", "/v1/host-groups/web", json!({ "mode": "enforce" }))
        .await;
    assert_eq!(s, 200);
    for name in ["web1", "web2"] {
        let (s, _) = h
            .send(
                "POST",
                "/v1/hosts",
                json!({ "name": name, "host_group": "web" }),
            )
            .await;
        assert_eq!(s, 201);
    }
    let (s, v) = put_addresses(
        &h,
        "web1",
        json!(["::ffff:10.0.0.5", "2001:db8::5", "10.0.0.5"]),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["host"]["addresses"], json!(["10.0.0.5", "2001:db8::5"]));
    let (_, v) = h.get("/v1/hosts/web1").await;
    assert_eq!(v["host"]["addresses"], json!(["10.0.0.5", "2001:db8::5"]));
    let (_, v) = h.get("/v1/hosts").await;
    assert_eq!(
        v["hosts"][0]["addresses"],
        json!(["10.0.0.5", "2001:db8::5"])
    );
    assert_eq!(v["hosts"][1]["addresses"], json!([]));
    // One host per address.
    let (s, v) = put_addresses(&h, "web2", json!(["10.0.0.5"])).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("`web1`"));
    for (bad, field) in [
        ("nope", "addresses[1]"),
        ("127.0.0.1", "addresses"),
        ("0.0.0.0", "addresses"),
    ] {
        let (s, v) = put_addresses(&h, "web2", json!(["10.0.0.6", bad])).await;
        assert_eq!(
            (s, v["error"]["field"].as_str()),
            (400, Some(field)),
            "{bad}: {v}"
        );
    }
    let (s, _) = put_addresses(&h, "nosuch", json!([])).await;
    assert_eq!(s, 404);
    // Removing them frees the address for another host.
    let (s, _) = put_addresses(&h, "web1", json!([])).await;
    assert_eq!(s, 200);
    let (s, v) = put_addresses(&h, "web2", json!(["10.0.0.5"])).await;
    assert_eq!((s, &v["host"]["addresses"]), (200, &json!(["10.0.0.5"])));
    let rows = h.store.audit_rows(0, u32::MAX).unwrap();
    assert_eq!(
        rows.iter().filter(|r| r.kind == "host.addresses").count(),
        3
    );
}

#[tokio::test]
async fn users_and_roles() {
    let h = start().await;
    let g0 = h.store.generation_hint();
    let (s, v) = h
        .send(
            "PUT",
            "/v1/users/alice",
            json!({ "roles": ["ops", "admin", "ops"] }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["user"],
        json!({ "name": "alice", "roles": ["admin", "ops"] })
    );
    assert!(h.store.generation_hint() > g0);
    assert_eq!(h.changes(), vec![Change::Users]);
    let (s, _) = h
        .send("PUT", "/v1/users/bob", json!({ "roles": ["ops"] }))
        .await;
    assert_eq!(s, 200);
    let (s, _) = h
        .send("PUT", "/v1/users/carol", json!({ "roles": [] }))
        .await;
    assert_eq!(s, 200);
    assert_eq!(h.store.user_roles("bob").unwrap(), ["ops"]);

    let (_, v) = h.get("/v1/users?limit=2").await;
    assert_eq!(v["users"][1], json!({ "name": "bob", "roles": ["ops"] }));
    assert_eq!(v["next"], "bob");
    let (_, v) = h.get("/v1/users?after=bob").await;
    assert_eq!(v["users"], json!([{ "name": "carol", "roles": [] }]));
    let (_, v) = h.get("/v1/roles").await;
    assert_eq!(
        v["roles"],
        json!([{ "name": "admin", "users": 1 }, { "name": "ops", "users": 2 }])
    );
    let (s, v) = h
        .send("PUT", "/v1/users/dave", json!({ "roles": [""] }))
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("roles[0]")));

    let r = h.call("DELETE", "/v1/users/bob", None).await;
    assert_eq!(r.status, 204);
    let (s, _) = h.get("/v1/users/bob").await;
    assert_eq!(s, 404);
    let r = h.call("DELETE", "/v1/users/bob", None).await;
    assert_eq!(r.status, 404);
    assert!(h.store.user_roles("bob").unwrap().is_empty());
    let audit = h.audit();
    assert!(audit
        .iter()
        .any(|r| r.kind == "user.delete" && r.actor == "admin:alice"));
}

#[tokio::test]
async fn file_sets_add_remove_replace_delete() {
    let h = start().await;
    let g0 = h.store.generation_hint();
    let (s, v) = h
        .send(
            "POST",
            "/v1/file-sets/pgdata/paths",
            json!({ "paths": ["/var/lib/postgresql", "/etc/postgresql"] }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["created"], true);
    assert_eq!(
        v["file_set"],
        json!({ "name": "pgdata", "paths": ["/etc/postgresql", "/var/lib/postgresql"] })
    );
    assert_eq!(h.store.generation_hint(), g0 + 1);
    assert_eq!(h.changes(), vec![Change::FileSets]);
    // The same again changes nothing: no generation move, no change hook.
    let (s, v) = h
        .send(
            "POST",
            "/v1/file-sets/pgdata/paths",
            json!({ "paths": ["/etc/postgresql"] }),
        )
        .await;
    assert_eq!((s, &v["added"]), (200, &json!([])));
    assert_eq!(h.store.generation_hint(), g0 + 1);
    assert_eq!(h.changes(), vec![]);
    // A bad path is refused naming it and its index.
    let (s, v) = h
        .send(
            "POST",
            "/v1/file-sets/pgdata/paths",
            json!({ "paths": ["/ok", "/srv//data"] }),
        )
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("paths[1]")));
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`/srv//data`"),
        "{v}"
    );
    let (s, v) = h
        .send(
            "PUT",
            "/v1/file-sets/pgdata",
            json!({ "paths": ["/srv/pg"] }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["removed"],
        json!(["/etc/postgresql", "/var/lib/postgresql"])
    );
    let (s, v) = h
        .send(
            "POST",
            "/v1/file-sets/pgdata/paths/remove",
            json!({ "paths": ["/srv/pg"] }),
        )
        .await;
    assert_eq!((s, &v["file_set"]["paths"]), (200, &json!([])));
    let (_, v) = h.get("/v1/file-sets").await;
    assert_eq!(v["max_paths"], 256);
    assert_eq!(v["file_sets"], json!([{ "name": "pgdata", "paths": [] }]));
    let (s, _) = h.get("/v1/file-sets/pgdata").await;
    assert_eq!(s, 200);
    assert_eq!(
        h.call("DELETE", "/v1/file-sets/pgdata", None).await.status,
        204
    );
    assert_eq!(h.get("/v1/file-sets/pgdata").await.0, 404);
    assert_eq!(
        h.call("DELETE", "/v1/file-sets/pgdata", None).await.status,
        404
    );
    assert!(h
        .audit()
        .iter()
        .any(|r| r.kind == "fileset.delete" && r.actor == "admin:alice"));
}

#[tokio::test]
async fn limits_set_list_remove() {
    use trustbind_appliance::limits::LicenseKey;
    let h = start().await;
    let (s, v) = h
        .send(
            "PUT",
            "/v1/limits",
            json!({ "subject": { "kind": "host", "host": "web1" }, "max_calls": 2 }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let id = v["license"]["id"].as_i64().unwrap();
    assert_eq!(
        v["license"]["subject"],
        json!({ "kind": "host", "host": "web1" })
    );
    assert_eq!(v["license"]["terms"]["max_calls"], 2);
    assert_eq!(v["license"]["calls"], 0);
    assert_eq!(h.changes(), vec![Change::Limits]);

    let client = "A".repeat(64);
    let (s, v) = h
        .send(
            "PUT",
            "/v1/limits",
            json!({ "subject": { "kind": "pair", "client": client, "server": "b".repeat(64) },
                    "max_per_minute": 1, "not_before_ms": 5, "not_after_ms": 9_000_000_000_000_i64 }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["license"]["subject"]["client"], "a".repeat(64));
    let pair_id = v["license"]["id"].as_i64().unwrap();

    // The decision path and the API share one table.
    let web1 = LicenseKey::Host {
        host: "web1".into(),
    };
    h.limits.check(&web1, 1).unwrap();
    let (_, v) = h.get(&format!("/v1/limits/{id}")).await;
    assert_eq!(v["license"]["calls"], 1);
    h.limits.check(&web1, 2).unwrap();
    assert!(h.limits.check(&web1, 3).is_err());
    let (_, v) = h.get("/v1/limits").await;
    let list = v["limits"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list[0]["exceeded"].as_str().unwrap().contains("2 calls"),
        "{v}"
    );
    assert_eq!(list[1]["exceeded"], Value::Null);

    // Reset re-activates.
    let (s, v) = h
        .send(
            "PUT",
            "/v1/limits",
            json!({ "subject": { "kind": "host", "host": "web1" }, "max_calls": 5, "reset": true }),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["license"]["exceeded"], Value::Null);
    h.limits.check(&web1, 4).unwrap();

    for (body, field) in [
        (
            json!({ "subject": { "kind": "host", "host": "a b" } }),
            "subject.host",
        ),
        (
            json!({ "subject": { "kind": "pair", "client": "x", "server": "y" } }),
            "subject.client",
        ),
        (
            json!({ "subject": { "kind": "host", "host": "h" }, "max_calls": 0 }),
            "max_calls",
        ),
        (
            json!({ "subject": { "kind": "host", "host": "h" }, "max_per_minute": 0 }),
            "max_per_minute",
        ),
        (
            json!({ "subject": { "kind": "host", "host": "h" }, "not_before_ms": 5, "not_after_ms": 5 }),
            "not_after_ms",
        ),
        (
            json!({ "subject": { "kind": "file", "path": "/" } }),
            "subject.kind",
        ),
        (
            json!({ "subject": { "kind": "host", "host": "h" }, "max_calls": -1 }),
            "max_calls",
        ),
    ] {
        let (s, v) = h.send("PUT", "/v1/limits", body.clone()).await;
        assert_eq!(
            (s, v["error"]["field"].as_str()),
            (400, Some(field)),
            "{body} -> {v}"
        );
    }

    let r = h
        .call("DELETE", &format!("/v1/limits/{pair_id}"), None)
        .await;
    assert_eq!(r.status, 204);
    let r = h
        .call("DELETE", &format!("/v1/limits/{pair_id}"), None)
        .await;
    assert_eq!(r.status, 404);
    let (_, v) = h.get("/v1/limits").await;
    assert_eq!(v["limits"].as_array().unwrap().len(), 1);
    let k: Vec<String> = h
        .audit()
        .into_iter()
        .map(|r| format!("{} {}", r.kind, r.actor))
        .collect();
    assert!(k.contains(&"limit.set admin:alice".to_owned()), "{k:?}");
    assert!(k.contains(&"limit.remove admin:alice".to_owned()), "{k:?}");
    assert!(k.contains(&"limit.exceeded appliance".to_owned()), "{k:?}");
}

#[tokio::test]
async fn limit_endpoints_without_limits_answer_503() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
    store
        .add_admin_cert("alice", "0a", AdminRole::Admin, i64::MAX, "test")
        .unwrap();
    let router = admin::router(AdminState::new(store));
    let mut req = axum::http::Request::builder()
        .uri("/v1/limits")
        .body(axum::body::Body::empty())
        .unwrap();
    req.extensions_mut().insert(admin::AdminIdentity {
        cn: "alice".into(),
        serial: "0a".into(),
    });
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 503);
}

#[tokio::test]
async fn audit_tail_export_verify() {
    // Row 1 is the setup's `admin.cert.issue` of alice's certificate.
    let h = start().await;
    assert_eq!(h.audit_base, 1);
    for i in 0..5 {
        let (s, _) = h
            .send("POST", "/v1/groups", json!({ "name": format!("g{i}") }))
            .await;
        assert_eq!(s, 201);
    }
    let (s, v) = h.get("/v1/audit?limit=2").await;
    assert_eq!(s, 200);
    assert_eq!(v["head"], 6);
    let seqs: Vec<i64> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [5, 6]);
    assert_eq!(v["next"], 6);
    assert_eq!(v["rows"][0]["actor"], "admin:alice");
    let (_, v) = h.get("/v1/audit?after=2&limit=2").await;
    assert_eq!(v["rows"][0]["seq"], 3);
    assert_eq!(v["next"], 4);
    let (_, v) = h.get("/v1/audit?after=6").await;
    assert_eq!(
        (v["rows"].as_array().unwrap().len(), &v["next"]),
        (0, &json!(6))
    );

    let r = h.call("GET", "/v1/audit/export", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.content_type, "application/x-ndjson");
    let lines: Vec<Value> = String::from_utf8(r.body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[5]["kind"], "group.create");
    let r = h
        .call("GET", "/v1/audit/export?after=4&kind=group", None)
        .await;
    assert_eq!(String::from_utf8(r.body).unwrap().lines().count(), 2);
    let r = h.call("GET", "/v1/audit/export?kind=policy", None).await;
    assert!(r.body.is_empty());
    let future = lines[0]["at_ms"].as_i64().unwrap() + 3_600_000;
    let r = h
        .call("GET", &format!("/v1/audit/export?since_ms={future}"), None)
        .await;
    assert!(r.body.is_empty());
    let r = h.call("GET", "/v1/audit/export?since_ms=0", None).await;
    assert_eq!(String::from_utf8(r.body).unwrap().lines().count(), 6);

    let (_, v) = h.get("/v1/audit/verify").await;
    assert_eq!(
        (&v["ok"], &v["rows"], &v["head"]),
        (&json!(true), &json!(6), &json!(6))
    );
    // Nothing pruned, nothing lost to a full disk.
    assert!(v["pruned"].is_null() && v["checkpoint"].is_null());
    assert_eq!(v["audit_gap"]["events"], 0);
    // Edit a row behind the appliance's back: verify must say so.
    let conn = rusqlite::Connection::open(h.dir.path().join("a.db")).unwrap();
    conn.execute("UPDATE audit SET actor = 'admin:mallory' WHERE seq = 4", [])
        .unwrap();
    drop(conn);
    let (_, v) = h.get("/v1/audit/verify").await;
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("row 4"), "{v}");

    let (_, v) = h.get("/v1/status").await;
    assert_eq!(v["you"], "admin:alice");
    assert_eq!(v["audit_head"], 6);
    // Policies read hours in this zone (serve --time-zone; UTC here).
    assert_eq!(v["time_zone"], "UTC");
    // The authority key of sealed records, for loading modules by hand.
    assert_eq!(v["authority"], h.pki.authority().public_hex());

    // Long poll: a row appended while waiting is returned.
    let store = Arc::clone(&h.store);
    let writer = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        tokio::task::spawn_blocking(move || store.create_group("late", "", "admin:bob").unwrap())
            .await
            .unwrap();
    });
    let (s, v) = h.get("/v1/audit?after=6&wait_ms=20000").await;
    writer.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["rows"][0]["actor"], "admin:bob", "{v}");
    assert_eq!(v["next"], 7);
    let (s, _) = h.get("/v1/audit?wait_ms=10").await;
    assert_eq!(s, 400);
    let (s, _) = h.get("/v1/audit?after=1&wait_ms=30001").await;
    assert_eq!(s, 400);
    let (_, v) = h.get("/v1/audit?after=7&wait_ms=1").await;
    assert_eq!(v["rows"], json!([]));
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let h = start().await;
    trustbind_appliance::metrics::metrics().record_decision(
        "exec",
        "deny",
        false,
        std::time::Duration::from_micros(40),
    );
    let r = h.call("GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r
        .content_type
        .starts_with("application/openmetrics-text; version=1.0.0"));
    let text = String::from_utf8(r.body).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("trustbind_decisions_total{action=\"exec\",verdict=\"deny\"}"))
        .unwrap();
    let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1);
    assert!(text.contains("trustbind_decision_duration_seconds_bucket{le=\"+Inf\"}"));
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn connections_without_a_trusted_client_cert_are_refused() {
    let h = start().await;
    let none = client_config(&h.pki, None);
    let r = request_with(none, h.addr, "GET", "/v1/status", None).await;
    assert!(r.is_err(), "no client cert must get no answer");
    let stranger = Ca::new("Someone else");
    let wrong = client_config(&h.pki, Some(stranger.leaf("alice", false)));
    let r = request_with(wrong, h.addr, "GET", "/v1/status", None).await;
    assert!(r.is_err(), "a cert from another CA must get no answer");
    // A host certificate of the appliance's own CA is no admin certificate.
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let issued = h.pki.issue_host("web1", &csr.pem().unwrap()).unwrap();
    let host_cred = from_pem(&issued.cert_pem, &key.serialize_pem());
    let r = request_with(
        client_config(&h.pki, Some(host_cred)),
        h.addr,
        "GET",
        "/v1/status",
        None,
    )
    .await;
    assert!(r.is_err(), "a host cert must get no answer");
    // The listener still serves admins afterwards.
    let (s, v) = h.get("/v1/status").await;
    assert_eq!(s, 200);
    assert_eq!(v["you"], "admin:alice");
}

#[tokio::test]
async fn requests_without_the_tls_layer_get_401() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("a.db")).unwrap());
    let router = admin::router(AdminState::new(store));
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/groups")
        .body(axum::body::Body::from(r#"{"name":"g"}"#))
        .unwrap();
    let resp = router.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 401);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["code"], "unauthenticated");
}

#[tokio::test]
async fn bad_input_gets_4xx_with_a_message() {
    let h = start().await;
    let (s, v) = h.raw("POST", "/v1/groups", b"{\"name\": ").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_json")));
    let (s, v) = h.raw("POST", "/v1/groups", b"").await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("empty"));
    let (s, v) = h
        .send(
            "POST",
            "/v1/groups",
            json!({ "name": "g", "colour": "red" }),
        )
        .await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `colour`"),
        "{v}"
    );
    let (s, v) = h.send("POST", "/v1/groups", json!({ "name": 7 })).await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("name")));
    let (s, v) = h.send("POST", "/v1/groups", json!({ "name": "" })).await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("name")));
    let (s, v) = h
        .send("POST", "/v1/groups", json!({ "name": "a\u{7}b" }))
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("name")));

    let big = vec![b' '; admin::MAX_BODY + 1];
    let (s, v) = h.raw("POST", "/v1/policies", &big).await;
    assert_eq!((s, v["error"]["code"].as_str()), (413, Some("too_large")));

    let (s, v) = h.get("/v1/policies/abc").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")));
    let (s, v) = h.get("/v1/signatures/xyz").await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("sha256")));
    let (s, v) = h.get("/v1/signatures?limit=0").await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("limit")));
    let (s, v) = h.get("/v1/signatures?limit=lots").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.get("/v1/audit?after=-1").await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = h.get("/v1/nosuch").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = h.send("DELETE", "/v1/policies", json!({})).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    // Nothing above changed anything.
    assert!(h.audit().is_empty());
    assert!(h.changes().is_empty());
}

#[tokio::test]
async fn channels_list_with_each_end_closed() {
    let h = start().await;
    h.store.open_channel("k-a", "a", "b", "t1").unwrap();
    h.store.open_channel("k-b", "a", "b", "t2").unwrap();
    let close = trustbind_appliance::store::AgentRecord {
        id: "a-1".into(),
        host_at_ms: 1,
        what: "channel.close".into(),
        detail: json!({ "channel_id": 1, "key_id": "k-a", "role": "connect",
            "bytes_sent": 500, "bytes_received": 2, "duration_ms": 9 }),
    };
    h.store.record_agent_reports("a", &[close]).unwrap();
    let (s, v) = h.get("/v1/channels").await;
    assert_eq!(s, 200, "{v}");
    let chans = v["channels"].as_array().unwrap();
    assert_eq!(chans.len(), 2);
    assert_eq!(chans[0]["key_id"], "k-a");
    assert_eq!(chans[0]["connect"]["bytes_sent"], 500);
    assert!(chans[0]["closed_ms"].is_i64());
    assert!(chans[0]["accept"].is_null());
    assert!(chans[1]["closed_ms"].is_null());
    let (s, v) = h.get("/v1/channels?open=true&limit=1").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["channels"].as_array().unwrap().len(), 1);
    assert_eq!(v["channels"][0]["key_id"], "k-b");
    let (s, v) = h.get("/v1/channels?open=maybe").await;
    assert!((400..500).contains(&s), "{v}");
}

/// `"bulk": true` defers the generation move for programs hosts were only
/// denied; without it the move is immediate.
#[tokio::test]
async fn bulk_signature_batches_defer_approvals_of_denied_programs() {
    let h = start().await;
    let (s, _) = h
        .send("POST", "/v1/groups", json!({ "name": "nsrl" }))
        .await;
    assert_eq!(s, 201);
    // Any move makes the store's ledger exact (after a start it is not).
    h.store.set_user_roles("u", &["r"], "admin:t").unwrap();
    for (n, bulk) in [(1, true), (2, false)] {
        let v = h.store.versions().unwrap();
        let x = sig(n)["sha256"].as_str().unwrap().to_owned();
        // A host was denied program `n` under this generation.
        assert!(h
            .store
            .note_answer(v.generation, v.members, &[x.as_str()], false));
        let (s, r) = h
            .send(
                "POST",
                "/v1/signatures",
                json!({ "signatures": [sig(n)], "group": "nsrl", "bulk": bulk }),
            )
            .await;
        assert_eq!(s, 200, "{r}");
        let moved = h.store.versions().unwrap().generation - v.generation;
        assert_eq!((moved, h.store.deferred_move()), (i64::from(!bulk), bulk));
    }
}

/// An admin certificate of `role` for `name`, registered: its client config
/// and serial.
fn admin_with_role(h: &Harness, name: &str, role: AdminRole) -> (Arc<ClientConfig>, String) {
    let (cert, key) = h.pki.issue_admin(name).unwrap();
    let serial = admin::register_admin_cert(&h.store, &cert, role, "test").unwrap();
    (client_config(&h.pki, Some(from_pem(&cert, &key))), serial)
}

/// One HTTP/1.1 connection kept open across requests.
struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(cfg: Arc<ClientConfig>, addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn(send)
    }

    async fn get(&mut self, path: &str) -> (u16, Value) {
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn read_only_admin_reads_and_gets_403_on_every_write_endpoint_class() {
    let h = start().await;
    let (ro, _) = admin_with_role(&h, "rob", AdminRole::ReadOnly);
    let before = h.audit().len();
    let call = |method: &'static str, path: &'static str, body: Option<Value>| {
        let ro = Arc::clone(&ro);
        let addr = h.addr;
        async move {
            request_with(
                ro,
                addr,
                method,
                path,
                body.map(|b| serde_json::to_vec(&b).unwrap()),
            )
            .await
            .unwrap()
        }
    };
    // Reads, metrics and validation are allowed.
    for path in [
        "/v1/status",
        "/v1/policies",
        "/v1/hosts",
        "/v1/admins",
        "/v1/audit",
        "/metrics",
    ] {
        assert_eq!(call("GET", path, None).await.status, 200, "{path}");
    }
    let r = call(
        "POST",
        "/v1/policies/validate",
        Some(json!({ "text": EXAMPLE })),
    )
    .await;
    assert_eq!(r.status, 200);
    // Asking what the policy would answer is a read too (503 here: this
    // harness serves no engine; never 403).
    let r = call("POST", "/v1/explain", Some(json!({}))).await;
    assert_ne!(r.status, 403);
    // Every class of write is refused before it reaches its handler.
    let writes: &[(&str, &str, Value)] = &[
        ("POST", "/v1/policies", json!({ "text": EXAMPLE })),
        ("POST", "/v1/policies/1/activate", json!({})),
        ("POST", "/v1/policies/rollback", json!({})),
        ("POST", "/v1/signatures", json!({ "signatures": [sig(1)] })),
        (
            "POST",
            "/v1/signatures/remove",
            json!({ "sha256": [sha(1)] }),
        ),
        ("DELETE", "/v1/signatures/00", json!({})),
        ("POST", "/v1/groups", json!({ "name": "g" })),
        ("DELETE", "/v1/groups/g", json!({})),
        (
            "POST",
            "/v1/groups/g/members",
            json!({ "sha256": [sha(1)] }),
        ),
        (
            "POST",
            "/v1/groups/g/members/remove",
            json!({ "sha256": [sha(1)] }),
        ),
        ("PUT", "/v1/host-groups/web", json!({ "mode": "enforce" })),
        ("DELETE", "/v1/host-groups/web", json!({})),
        (
            "POST",
            "/v1/hosts",
            json!({ "name": "h1", "host_group": "web" }),
        ),
        ("POST", "/v1/hosts/h1/revoke", json!({})),
        ("POST", "/v1/hosts/h1/token", json!({})),
        (
            "PUT",
            "/v1/hosts/h1/addresses",
            json!({ "addresses": ["10.0.0.1"] }),
        ),
        ("PUT", "/v1/users/u", json!({ "roles": ["r"] })),
        ("DELETE", "/v1/users/u", json!({})),
        ("PUT", "/v1/file-sets/f", json!({ "paths": ["/a"] })),
        ("POST", "/v1/file-sets/f/paths", json!({ "paths": ["/a"] })),
        (
            "POST",
            "/v1/file-sets/f/paths/remove",
            json!({ "paths": ["/a"] }),
        ),
        ("DELETE", "/v1/file-sets/f", json!({})),
        (
            "PUT",
            "/v1/limits",
            json!({ "subject": { "kind": "host", "host": "h1" }, "max_calls": 1 }),
        ),
        ("DELETE", "/v1/limits/1", json!({})),
        ("POST", "/v1/admins/tokens", json!({ "name": "eve" })),
        ("POST", "/v1/admins/01/revoke", json!({})),
    ];
    for (method, path, body) in writes {
        let r = request_with(
            Arc::clone(&ro),
            h.addr,
            method,
            path,
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 403, "{method} {path}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "forbidden", "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("read-only"),
            "{v}"
        );
    }
    assert_eq!(h.audit().len(), before, "a refused write changed something");
    // The same writes work for an admin (the refusal was the role's).
    let (s, _) = h.send("POST", "/v1/groups", json!({ "name": "g" })).await;
    assert_eq!(s, 201);
}

#[tokio::test]
async fn revoked_admin_certificate_is_refused_on_its_open_connection_and_at_the_next_handshake() {
    let h = start().await;
    let (bob_cfg, bob_serial) = admin_with_role(&h, "bob", AdminRole::Admin);
    let mut bob = Conn::open(Arc::clone(&bob_cfg), h.addr).await;
    let (s, v) = bob.get("/v1/status").await;
    assert_eq!((s, &v["you"]), (200, &json!("admin:bob")));
    // Listed with its role.
    let (_, v) = h.get("/v1/admins").await;
    let listed = v["admins"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{v}");
    assert!(listed
        .iter()
        .any(|a| a["serial"] == bob_serial && a["role"] == "admin" && a["revoked_ms"].is_null()));
    // alice revokes bob's certificate while bob's connection is open.
    let (s, v) = h
        .send(
            "POST",
            &format!("/v1/admins/{bob_serial}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["admin"]["revoked_by"], "admin:alice");
    let (s, v) = bob.get("/v1/status").await;
    assert_eq!(s, 401, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("revoked"),
        "{v}"
    );
    // A new connection fails the handshake.
    let r = request_with(bob_cfg, h.addr, "GET", "/v1/status", None).await;
    assert!(r.is_err(), "a revoked certificate must get no answer");
    assert!(h
        .audit()
        .iter()
        .any(|r| r.kind == "admin.cert.revoke" && r.actor == "admin:alice"));
    // The last valid admin certificate cannot be revoked (no lock-out).
    let alice = h.store.admin_certs().unwrap();
    let alice = alice.iter().find(|c| c.name == "alice").unwrap();
    let (s, v) = h
        .send(
            "POST",
            &format!("/v1/admins/{}/revoke", alice.serial),
            json!({}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, _) = h.send("POST", "/v1/admins/zz/revoke", json!({})).await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn an_admin_renews_its_certificate_and_the_old_one_is_retired() {
    let h = start().await;
    let (cert, key) = h.pki.issue_admin("rob").unwrap();
    let old_serial = admin::register_admin_cert(&h.store, &cert, AdminRole::ReadOnly, "t").unwrap();
    let old = client_config(&h.pki, Some(from_pem(&cert, &key)));
    let new_key = KeyPair::generate().unwrap();
    let csr = CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&new_key)
        .unwrap()
        .pem()
        .unwrap();
    // A read-only admin may renew its own certificate.
    let r = request_with(
        Arc::clone(&old),
        h.addr,
        "POST",
        "/v1/admins/renew",
        Some(serde_json::to_vec(&json!({ "csr_pem": csr })).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["admin"]["name"], "rob");
    assert_eq!(v["admin"]["role"], "read-only");
    assert_ne!(v["admin"]["serial"], json!(old_serial));
    let new = client_config(
        &h.pki,
        Some(from_pem(
            v["cert_pem"].as_str().unwrap(),
            &new_key.serialize_pem(),
        )),
    );
    let r = request_with(new, h.addr, "GET", "/v1/status", None)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["you"], "admin:rob");
    assert!(request_with(old, h.addr, "GET", "/v1/status", None)
        .await
        .is_err());
    let c = h.store.admin_cert(&old_serial).unwrap().unwrap();
    assert_eq!(
        c.revoked_by.as_deref(),
        Some(format!("renewed:{}", v["admin"]["serial"].as_str().unwrap()).as_str())
    );
}

#[tokio::test]
async fn host_tokens_expire_and_can_be_reissued() {
    let h = start().await;
    let (s, _) = h
        .send("PUT", "/v1/host-groups/web", json!({ "mode": "enforce" }))
        .await;
    assert_eq!(s, 200);
    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "web1", "host_group": "web", "token_ttl_s": 600 }),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let exp = v["token_expires_ms"].as_i64().unwrap();
    let left = exp - trustbind_appliance::store::now_ms();
    assert!((590_000..=600_000).contains(&left), "{left}");
    let (s, v) = h
        .send(
            "POST",
            "/v1/hosts",
            json!({ "name": "web2", "host_group": "web", "token_ttl_s": 0 }),
        )
        .await;
    assert_eq!(
        (s, &v["error"]["field"]),
        (400, &json!("token_ttl_s")),
        "{v}"
    );
    // A new token for the pending host replaces the old one.
    let (s, v) = h.send("POST", "/v1/hosts/web1/token", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["host"]["state"], "pending");
    let token = v["token"].as_str().unwrap().to_owned();
    let (sha, _) = h.store.pending_token("web1").unwrap().unwrap();
    assert_eq!(sha, admin::token_sha256(&token));
    // An enrolled host needs revoking first; a revoked one can be re-tokened.
    h.store.enrol_host("web1", &sha, "0b").unwrap();
    let (s, _) = h.send("POST", "/v1/hosts/web1/token", json!({})).await;
    assert_eq!(s, 409);
    let (s, _) = h.send("POST", "/v1/hosts/web1/revoke", json!({})).await;
    assert_eq!(s, 200);
    let (s, v) = h
        .send("POST", "/v1/hosts/web1/token", json!({ "token_ttl_s": 60 }))
        .await;
    assert_eq!((s, &v["host"]["state"]), (200, &json!("pending")), "{v}");
    let (s, _) = h.send("POST", "/v1/hosts/nosuch/token", json!({})).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn unauthenticated_connections_are_capped_per_address() {
    let h = start().await;
    // 300 silent connections from 127.0.0.1 (the admin port used to keep
    // every one, each for its 10 s handshake, and a file descriptor each).
    let (stalled, closed) = common::stall(h.addr, 300).await;
    assert!(closed >= 300 - 16, "{closed} of 300 closed");
    // An admin from another address is served meanwhile.
    let tcp = common::connect_from("127.0.0.2", h.addr).await;
    let tls = TlsConnector::from(Arc::clone(&h.client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/v1/status")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(stalled);
}
