//! The agent's link to the appliance: enrolment, credentials on disk, and
//! the mutual-TLS gRPC channel.
//!
//! Enrolment trusts nothing but the CA fingerprint the administrator read
//! off the appliance's console: the TLS handshake on the enrol port is
//! accepted only if the server's chain contains a certificate with that
//! SHA-256 and the server certificate verifies against it. The agent makes
//! its own P-256 key; only a CSR leaves the host.
//!
//! Files in the state directory (written atomically, keys 0600):
//! `ca.pem`, `cert.pem`, `key.pem`, `agent.json` (name, appliance
//! addresses, server name, fingerprint).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use trustbind_api::pb::enrolment_client::EnrolmentClient;
use trustbind_api::pb::EnrolRequest;

/// Default agent port of the appliance.
pub const AGENT_PORT: u16 = 7443;
/// Default enrol port of the appliance.
pub const ENROL_PORT: u16 = 7444;
/// TCP + TLS connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Link failures, each one sentence naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// Bad configuration or credentials.
    #[error("{0}")]
    Config(String),
    /// The network or TLS failed.
    #[error("cannot reach the appliance at {addr}: {why}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        why: String,
    },
    /// The appliance refused.
    #[error("the appliance refused: {0}")]
    Refused(String),
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> LinkError + '_ {
    move |source| LinkError::File {
        path: path.to_owned(),
        source,
    }
}

/// What `enrol` remembers for `run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// This host's enrolled name (the certificate CN).
    pub name: String,
    /// Appliance agent port address, `host:port`.
    pub agent_addr: String,
    /// Name the appliance's server certificate is checked against.
    pub server_name: String,
    /// SHA-256 of the appliance CA certificate (hex).
    pub ca_fingerprint: String,
}

/// Writes `data` to `path` atomically (temp, fsync, rename) with `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), LinkError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(file_err(dir))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(file_err(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(file_err(&tmp))?;
    f.write_all(data).map_err(file_err(&tmp))?;
    f.sync_all().map_err(file_err(&tmp))?;
    fs::rename(&tmp, path).map_err(file_err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))
}

/// Lower-case hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `host[:port]` → (`host:port`, host), with `default_port` when absent.
pub fn split_addr(addr: &str, default_port: u16) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && !h.is_empty() => {
            (addr.to_owned(), h.to_owned())
        }
        _ => (format!("{addr}:{default_port}"), addr.to_owned()),
    }
}

/// Accepts a server whose chain holds the CA with the pinned fingerprint
/// and whose certificate verifies against that CA.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the appliance's CA is not the pinned one (fingerprint {})",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, LinkError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Config(format!("TLS setup: {e}")))
}

/// A gRPC channel over `tls` to `addr`, checking the certificate for `name`.
pub async fn channel(addr: &str, name: &str, tls: ClientConfig) -> Result<Channel, LinkError> {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let server = ServerName::try_from(name.to_owned())
        .map_err(|e| LinkError::Config(format!("server name `{name}`: {e}")))?;
    let target = addr.to_owned();
    let endpoint = Endpoint::from_static("http://appliance")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            let server = server.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out")
                    })??;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| LinkError::Connect {
            addr: addr.to_owned(),
            why: source_chain(&e),
        })
}

/// `e` and its sources, joined, so a TLS refusal is visible.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What `enrol` needs.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// Appliance enrol port, `host[:port]`.
    pub enrol_addr: String,
    /// Appliance agent port, `host[:port]` (defaults to the enrol host).
    pub agent_addr: Option<String>,
    /// Name the server certificate must carry (defaults to the host part).
    pub server_name: Option<String>,
    /// This host's registered name.
    pub name: String,
    /// The one-time token.
    pub token: String,
    /// CA fingerprint from the appliance console.
    pub ca_fingerprint: String,
}

/// Enrols this host and writes its credentials into `state`.
pub async fn enrol(e: &Enrolment, state: &Path) -> Result<AgentConfig, LinkError> {
    let pin = e.ca_fingerprint.to_ascii_lowercase().replace(':', "");
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LinkError::Config(
            "--ca-fingerprint must be the 64 hex digits the appliance prints".into(),
        ));
    }
    let (enrol_addr, host) = split_addr(&e.enrol_addr, ENROL_PORT);
    let server_name = e.server_name.clone().unwrap_or_else(|| host.clone());
    let agent_addr = split_addr(e.agent_addr.as_deref().unwrap_or(&host), AGENT_PORT).0;
    let tls = builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: pin.clone(),
            provider: provider(),
        }))
        .with_no_client_auth();
    let ch = channel(&enrol_addr, &server_name, tls).await?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| LinkError::Config(format!("key generation: {e}")))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| LinkError::Config(format!("CSR: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, e.name.clone());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| LinkError::Config(format!("CSR: {e}")))?;
    let reply = EnrolmentClient::new(ch)
        .enrol(EnrolRequest {
            host: e.name.clone(),
            token: e.token.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| LinkError::Refused(s.message().to_owned()))?
        .into_inner();
    let ca = CertificateDer::from_pem_slice(reply.ca_pem.as_bytes())
        .map_err(|e| LinkError::Refused(format!("CA in the reply: {e}")))?;
    if fingerprint(&ca) != pin {
        return Err(LinkError::Refused(
            "the CA in the reply is not the pinned one".into(),
        ));
    }
    write_atomic(
        &state.join("key.pem"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&state.join("cert.pem"), reply.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&state.join("ca.pem"), reply.ca_pem.as_bytes(), 0o644)?;
    let cfg = AgentConfig {
        name: e.name.clone(),
        agent_addr,
        server_name,
        ca_fingerprint: pin,
    };
    let json = serde_json::to_vec_pretty(&cfg).map_err(|e| LinkError::Config(e.to_string()))?;
    write_atomic(&state.join("agent.json"), &json, 0o644)?;
    Ok(cfg)
}

/// Loads `agent.json` from `state`.
pub fn load_config(state: &Path) -> Result<AgentConfig, LinkError> {
    let p = state.join("agent.json");
    let text = fs::read(&p).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            LinkError::Config(format!(
                "{} is missing: this host is not enrolled (run `trustbind-agent enrol`)",
                p.display()
            ))
        } else {
            file_err(&p)(e)
        }
    })?;
    serde_json::from_slice(&text).map_err(|e| LinkError::Config(format!("{}: {e}", p.display())))
}

/// The mutual-TLS client configuration from the files in `state`.
pub fn agent_tls(state: &Path) -> Result<ClientConfig, LinkError> {
    let ca_path = state.join("ca.pem");
    let ca = CertificateDer::from_pem_file(&ca_path)
        .map_err(|e| LinkError::Config(format!("{}: {e}", ca_path.display())))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca)
        .map_err(|e| LinkError::Config(format!("{}: {e}", ca_path.display())))?;
    let cert_path = state.join("cert.pem");
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| LinkError::Config(format!("{}: {e}", cert_path.display())))?;
    let key_path = state.join("key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| LinkError::Config(format!("{}: {e}", key_path.display())))?;
    builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| LinkError::Config(format!("host certificate: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_default_ports() {
        assert_eq!(
            split_addr("10.0.0.1", 7444),
            ("10.0.0.1:7444".into(), "10.0.0.1".into())
        );
        assert_eq!(
            split_addr("appliance:9000", 7444),
            ("appliance:9000".into(), "appliance".into())
        );
    }

    #[test]
    fn atomic_writes_set_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/key.pem");
        write_atomic(&p, b"secret", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_missing_config_says_enrol() {
        let d = tempfile::tempdir().unwrap();
        let e = load_config(d.path()).unwrap_err().to_string();
        assert!(e.contains("not enrolled"), "{e}");
    }
}
