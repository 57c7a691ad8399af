//! The client side of the enrol port, shared by `trustbind-agent enrol` and
//! `trustbind admin enrol`: a TLS handshake that trusts nothing but the CA
//! fingerprint read off the appliance's console, a gRPC channel over it,
//! and a fresh P-256 key with its CSR (only the CSR leaves the machine).
//!
//! The handshake is accepted only if the server's chain contains a
//! certificate with the pinned SHA-256 and the server certificate verifies
//! against it, so nothing (token included) is sent to an appliance whose CA
//! is not the pinned one.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

/// Default agent port of the appliance.
pub const AGENT_PORT: u16 = 7443;
/// Default enrol port of the appliance.
pub const ENROL_PORT: u16 = 7444;
/// Default admin port of the appliance.
pub const ADMIN_PORT: u16 = 7445;
/// TCP + TLS connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a pinned connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// Bad input (fingerprint, server name) or local setup.
    #[error("{0}")]
    Config(String),
    /// The network or TLS failed (a CA that is not the pinned one included).
    #[error("cannot reach the appliance at {addr}: {why}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        why: String,
    },
}

/// Lower-case hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// A fingerprint as typed (any case, `:` separators allowed) → 64
/// lower-case hex digits, or an error saying what is expected.
pub fn normalise_fingerprint(fp: &str) -> Result<String, PinError> {
    let pin = fp.trim().to_ascii_lowercase().replace(':', "");
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PinError::Config(
            "--ca-fingerprint must be the 64 hex digits the appliance prints".into(),
        ));
    }
    Ok(pin)
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

/// The crypto provider of every Trustbind client.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3 client configuration builder over [`provider`].
pub fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, PinError> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PinError::Config(format!("TLS setup: {e}")))
}

/// Server-authenticated TLS trusting only the CA whose SHA-256 is `pin`
/// (already normalised, see [`normalise_fingerprint`]).
pub fn pinned_config(pin: &str) -> Result<ClientConfig, PinError> {
    Ok(builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: pin.to_owned(),
            provider: provider(),
        }))
        .with_no_client_auth())
}

/// A gRPC channel over `tls` to `addr`, checking the certificate for `name`.
/// The handshake happens here, before any call is made.
pub async fn channel(addr: &str, name: &str, tls: ClientConfig) -> Result<Channel, PinError> {
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let server = ServerName::try_from(name.to_owned())
        .map_err(|e| PinError::Config(format!("server name `{name}`: {e}")))?;
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
        .map_err(|e| PinError::Connect {
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

/// A fresh P-256 key and a PEM CSR for it with CN = `cn`: returns (key
/// PEM, CSR PEM). The appliance takes only the public key from the CSR.
pub fn key_and_csr(cn: &str) -> Result<(String, String), PinError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PinError::Config(format!("key generation: {e}")))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| PinError::Config(format!("CSR: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn.to_owned());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| PinError::Config(format!("CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Checks that `ca_pem` (from an enrolment reply) is the pinned CA.
pub fn check_reply_ca(ca_pem: &str, pin: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| format!("CA in the reply: {e}"))?;
    if fingerprint(&ca) != pin {
        return Err("the CA in the reply is not the pinned one".into());
    }
    Ok(())
}

/// Writes `data` to `path` atomically (the credentials an enrolment
/// brings, the appliance's own PKI files): a temporary file in the same
/// directory (`tempfile`, mode 0600 if `private`, else 0644), fsync,
/// persisted (renamed) over `path`, fsync of the directory.
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mode = if private { 0o600 } else { 0o644 };
    // A new file only this process can open (0600), removed on failure.
    let mut f = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    f.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.as_file().sync_all()?;
    f.persist(path).map_err(|e| e.error)?;
    fs::File::open(dir)?.sync_all()
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
    fn fingerprints_are_normalised() {
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(normalise_fingerprint(&fp).unwrap(), "ab".repeat(32));
        assert!(normalise_fingerprint("abc").is_err());
    }
}
