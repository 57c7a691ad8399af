//! The admin API client: HTTPS with the admin client certificate, rustls
//! with the ring provider only, JSON bodies, appliance errors turned into
//! one sentence.

use std::sync::Arc;
use std::time::Duration;

use reqwest::blocking::{Client as Http, RequestBuilder, Response};
use reqwest::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

use crate::config::Resolved;
use crate::error::{io_err, CliError, Exit, Result};

/// A connection to one appliance's admin API.
#[derive(Debug)]
pub struct Client {
    http: Http,
    cfg: Resolved,
}

fn read(what: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        let mut err = io_err(&format!("read the {what}"), path, &e);
        err.exit = Exit::Config;
        err.code = "config".into();
        err
    })
}

/// Builds the rustls client configuration from the resolved files.
pub fn tls_config(cfg: &Resolved) -> Result<rustls::ClientConfig> {
    let ca_pem = read("appliance CA certificate", &cfg.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        let c = c.map_err(|e| {
            CliError::config(format!(
                "the CA file {} is not valid PEM: {e}",
                cfg.ca.display()
            ))
        })?;
        roots.add(c).map_err(|e| {
            CliError::config(format!(
                "the CA file {} holds an unusable certificate: {e}",
                cfg.ca.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(CliError::config(format!(
            "the CA file {} holds no PEM certificate",
            cfg.ca.display()
        )));
    }
    let cert_pem = read("admin certificate", &cfg.cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            CliError::config(format!(
                "the admin certificate {} is not valid PEM: {e}",
                cfg.cert.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(CliError::config(format!(
            "the admin certificate file {} holds no PEM certificate",
            cfg.cert.display()
        )));
    }
    let key_pem = read("admin key", &cfg.key)?;
    // Never echo key material: only the file name goes into the message.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        CliError::config(format!(
            "the admin key file {} holds no PEM private key",
            cfg.key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CliError::config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            CliError::config(format!(
                "the admin key {} does not fit the certificate {} ({e})",
                cfg.key.display(),
                cfg.cert.display()
            ))
        })?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

impl Client {
    /// The CA certificate file the appliance is checked against.
    pub fn ca_path(&self) -> &std::path::Path {
        &self.cfg.ca
    }

    /// Reads the credentials and prepares a client. Nothing is sent yet.
    pub fn new(cfg: Resolved) -> Result<Self> {
        let tls = tls_config(&cfg)?;
        let http = Http::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(None)
            .user_agent(concat!("trustbind/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::config(format!("HTTP client setup failed: {e}")))?;
        Ok(Self { http, cfg })
    }

    /// The appliance URL.
    pub fn url(&self) -> &str {
        &self.cfg.url
    }

    /// A request to `path` (starting with `/`).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.cfg.url))
    }

    /// Sends `req`; a non-2xx answer becomes a [`CliError`].
    pub fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().map_err(|e| self.transport_error(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.api_error(resp))
        }
    }

    /// Sends `req` and parses the JSON answer (`null` for an empty body).
    pub fn json(&self, req: RequestBuilder) -> Result<Value> {
        let resp = self.send(req)?;
        let bytes = resp.bytes().map_err(|e| self.transport_error(&e))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::new(
                Exit::Server,
                format!(
                    "the appliance at {} answered with invalid JSON: {e}",
                    self.cfg.url
                ),
            )
        })
    }

    /// GET `path` as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.json(self.request(Method::GET, path))
    }

    /// POST `body` to `path`.
    pub fn post<T: serde::Serialize + ?Sized>(&self, path: &str, body: &T) -> Result<Value> {
        self.json(self.request(Method::POST, path).json(body))
    }

    fn api_error(&self, resp: Response) -> CliError {
        let status = resp.status();
        let body: Option<Value> = resp.json().ok();
        let err = body.as_ref().and_then(|b| b.get("error"));
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
            .map_or_else(
                || format!("the appliance answered HTTP {status}"),
                str::to_owned,
            );
        let code = err
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .unwrap_or("http_error")
            .to_owned();
        let exit = if status == reqwest::StatusCode::UNAUTHORIZED {
            Exit::Config
        } else if status.is_client_error() {
            Exit::Refused
        } else {
            Exit::Server
        };
        let mut e = CliError::new(exit, message);
        e.code = code;
        if let Some(d) = err.and_then(|e| e.get("details")) {
            e.details = Some(d.clone());
        }
        e
    }

    /// One sentence for a failure to talk to the appliance at all.
    fn transport_error(&self, e: &reqwest::Error) -> CliError {
        let url = &self.cfg.url;
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut io_kind = None;
        while let Some(s) = src {
            if let Some(t) = rustls_in(s) {
                return self.tls_error(t);
            }
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                io_kind.get_or_insert(io.kind());
            }
            src = s.source();
        }
        use std::io::ErrorKind as K;
        let why = match io_kind {
            Some(K::ConnectionRefused) => "connection refused (is the appliance running and listening there?)".to_owned(),
            Some(K::UnexpectedEof) | Some(K::ConnectionReset) | Some(K::BrokenPipe) => {
                return CliError::new(
                    Exit::Connect,
                    format!(
                        "the appliance at {url} closed the connection; it may have rejected the admin certificate {}",
                        self.cfg.cert.display()
                    ),
                )
            }
            _ if e.is_timeout() => "timed out".to_owned(),
            _ => {
                // The rustls error may arrive only as text (wrapped by the connector).
                let root = root_cause(e);
                if root.starts_with("invalid peer certificate") {
                    return CliError::new(
                        Exit::Connect,
                        format!(
                            "the appliance at {url} presented a certificate that the CA in {} does not vouch for ({root})",
                            self.cfg.ca.display()
                        ),
                    );
                }
                if root.starts_with("received fatal alert") {
                    return CliError::new(
                        Exit::Connect,
                        format!(
                            "the appliance at {url} rejected the admin certificate {} ({root}); was it issued by this appliance's CA?",
                            self.cfg.cert.display()
                        ),
                    );
                }
                root
            }
        };
        CliError::new(
            Exit::Connect,
            format!("cannot reach the appliance at {url}: {why}"),
        )
    }

    fn tls_error(&self, t: &rustls::Error) -> CliError {
        let url = &self.cfg.url;
        let msg = match t {
            rustls::Error::InvalidCertificate(why) => format!(
                "the appliance at {url} presented a certificate that the CA in {} does not vouch for (invalid peer certificate: {why:?})",
                self.cfg.ca.display()
            ),
            rustls::Error::AlertReceived(alert) => format!(
                "the appliance at {url} rejected the admin certificate {} (TLS alert: {alert:?}); was it issued by this appliance's CA?",
                self.cfg.cert.display()
            ),
            other => format!("TLS with the appliance at {url} failed: {other}"),
        };
        CliError::new(Exit::Connect, msg)
    }
}

/// The rustls error inside `e`, directly or wrapped in an `io::Error`.
fn rustls_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(t) = e.downcast_ref::<rustls::Error>() {
        return Some(t);
    }
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The innermost error message of a chain.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    last
}
