//! The appliance's own certificate authority.
//!
//! On first start [`Pki::open_or_create`] makes an ECDSA P-256 CA and a
//! server certificate in the data directory:
//!
//! ```text
//! DIR/ca.pem       CA certificate (its SHA-256 is the fingerprint agents pin)
//! DIR/ca.key       CA private key, mode 0600
//! DIR/server.pem   server certificate of the agent, enrolment and admin ports
//! DIR/server.key   its private key, mode 0600
//! DIR/authority.key the authority key of sealed records, mode 0600
//!                   (`crate::seal::Authority`: P-256, not the CA's key)
//! DIR/farm.key     channel keys v2's farm secret, mode 0600
//!                  (`crate::tickets::Farm`, not written here)
//! ```
//!
//! The CA key is read and used by `crate::casign` alone; `serve` does not
//! read it but asks the CA signer process (`Pki::open_with_signer`, threat
//! model T-76).
//!
//! Every file is written atomically (temporary file, fsync, rename, fsync of
//! the directory), so a crash leaves either the old or the new file.
//!
//! Every certificate the CA issues carries its kind in the subject's
//! organizational unit ([`CertKind`]): `trustbind-host` for host certificates
//! (issued from the host's CSR, CN = host name, client-auth EKU),
//! `trustbind-admin` for admin client certificates (CN = admin name,
//! client-auth EKU) and `trustbind-server` for the server certificate
//! (server-auth EKU). The agent port accepts host certificates only, the admin
//! port admin certificates only, so one cannot stand in for the other.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, DnType, KeyPair, SerialNumber, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::casign::{self, Authorisation, CaKey, SignRequest};
use crate::store::hex;
pub use trustbind_policy::cert::{peer_cert, CertKind, PeerCert};

/// CA certificate file name in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA key file name in the data directory (mode 0600).
pub const CA_KEY_FILE: &str = "ca.key";
/// Server certificate file name in the data directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// Server key file name in the data directory (mode 0600).
pub const SERVER_KEY_FILE: &str = "server.key";

/// What went wrong in the PKI. Never carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file of the data directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file of the data directory does not hold what it should.
    #[error("{path}: {why}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The certificate signing request is unusable.
    #[error("certificate signing request: {0}")]
    Csr(String),
    /// A name is not acceptable in a certificate.
    #[error("invalid name `{name}`: {why}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        why: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Building a TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The CA signer refused to sign.
    #[error("CA signer: {0}")]
    Refused(String),
    /// The CA signer could not be asked (gone, or no answer in time).
    #[error("CA signer unavailable: {0}")]
    SignerUnavailable(String),
    /// A lock was poisoned by a panic in another thread.
    #[error("PKI lock poisoned")]
    Poisoned,
}

/// The set of host certificates allowed on the agent port: serial -> host
/// name of every enrolled (not revoked) host. Loaded from the store at start,
/// updated on enrolment and revocation; the agent port's verifier consults it
/// at every handshake and the handlers at every call.
#[derive(Debug, Default)]
pub struct EnrolledHosts {
    by_serial: RwLock<HashMap<String, String>>,
}

impl EnrolledHosts {
    /// A set holding `(host, serial)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let by_serial = pairs.into_iter().map(|(h, s)| (s, h)).collect();
        Self {
            by_serial: RwLock::new(by_serial),
        }
    }

    /// Allows exactly the certificates `serials` for `host` (a renewed host
    /// keeps its previous certificate, see `Store::renew_host_cert`).
    pub fn allow_only(&self, host: &str, serials: &[String]) {
        if let Ok(mut m) = self.by_serial.write() {
            m.retain(|_, h| h != host);
            for s in serials {
                m.insert(s.clone(), host.to_owned());
            }
        }
    }

    /// Allows the certificate `serial` for `host` (and drops any other serial
    /// of that host).
    pub fn allow(&self, host: &str, serial: &str) {
        if let Ok(mut m) = self.by_serial.write() {
            m.retain(|_, h| h != host);
            m.insert(serial.to_owned(), host.to_owned());
        }
    }

    /// Refuses every certificate of `host` from now on.
    pub fn revoke(&self, host: &str) {
        if let Ok(mut m) = self.by_serial.write() {
            m.retain(|_, h| h != host);
        }
    }

    /// Whether the certificate `serial` is currently valid for `host`.
    /// A poisoned lock refuses (fail closed).
    pub fn is_allowed(&self, host: &str, serial: &str) -> bool {
        self.by_serial
            .read()
            .map(|m| m.get(serial).is_some_and(|h| h == host))
            .unwrap_or(false)
    }

    /// Number of allowed certificates.
    pub fn len(&self) -> usize {
        self.by_serial.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no certificate is allowed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which certificates of one kind are currently valid, consulted by the
/// port's client verifier at every handshake: [`EnrolledHosts`] on the
/// agent port, the store's admin certificates on the admin port
/// (`admin::AdminCerts`).
pub trait CertAllowlist: Send + Sync + fmt::Debug {
    /// Whether the certificate `serial` is valid now for `name` (its CN).
    fn allowed(&self, name: &str, serial: &str) -> bool;
}

impl CertAllowlist for EnrolledHosts {
    fn allowed(&self, name: &str, serial: &str) -> bool {
        self.is_allowed(name, serial)
    }
}

/// A certificate issued to a host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its serial, lower-case hex.
    pub serial: String,
    /// Its `notAfter`, milliseconds since the Unix epoch.
    pub expires_ms: i64,
}

/// Who signs with the CA key: this process (`open_or_create`: tests and
/// the operator's commands) or the CA signer process (`serve`).
#[derive(Debug)]
enum Ca {
    Local(Box<CaKey>),
    Signer(casign::Client),
}

impl Ca {
    fn sign(&self, req: &SignRequest) -> Result<IssuedCert, PkiError> {
        match self {
            Self::Local(key) => key.sign(req, true),
            Self::Signer(client) => client.sign(req),
        }
    }
}

/// Swappable server certificate: listeners keep this resolver, rotation
/// replaces what it hands to new handshakes.
struct SwapResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for SwapResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwapResolver")
    }
}

impl ResolvesServerCert for SwapResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c))
    }
}

/// The CA, its issuing operations and the TLS configurations of the
/// appliance's listeners.
pub struct Pki {
    dir: PathBuf,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    ca: Ca,
    fingerprint: String,
    server_names: Vec<String>,
    server: Arc<SwapResolver>,
    server_serial: RwLock<String>,
    /// The server key with its certificate PEM, for [`Pki::sign_with_server_key`].
    server_signing: RwLock<Option<(Arc<CertifiedKey>, String)>>,
    provider: Arc<CryptoProvider>,
    /// The key sealed records are sealed under.
    authority: Arc<crate::seal::Authority>,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The SHA-256 fingerprint of the CA certificate in `dir` (what agents
/// and admins pin), from `ca.pem` alone: the CA key is not read (T-76).
pub fn ca_fingerprint(dir: &Path) -> Result<String, PkiError> {
    let path = dir.join(CA_CERT_FILE);
    let der = casign::ca_der(&read_string(&path)?, &path)?;
    Ok(fingerprint_of(&der))
}

/// The fingerprint of a CA certificate: the SHA-256 of its DER, hex.
fn fingerprint_of(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

impl Pki {
    /// Opens the CA in `dir`, creating the CA and a server certificate for
    /// `server_names` (DNS names or IP addresses) on first start. An existing
    /// server certificate is kept; `server_names` is used when it is missing
    /// and by [`Pki::rotate_server_cert`].
    pub fn open_or_create(dir: &Path, server_names: &[String]) -> Result<Self, PkiError> {
        let key = CaKey::open_or_create(dir)?;
        let ca_pem = key.ca_pem().to_owned();
        Self::open_with(dir, server_names, ca_pem, Ca::Local(Box::new(key)))
    }

    /// As [`Pki::open_or_create`], but every certificate is signed by the
    /// CA signer behind `signer` (`crate::casign`): this process never
    /// reads the CA key. The signer made the CA if it was missing.
    pub fn open_with_signer(
        dir: &Path,
        server_names: &[String],
        signer: casign::Client,
    ) -> Result<Self, PkiError> {
        let ca_pem = signer.ca_pem().to_owned();
        Self::open_with(dir, server_names, ca_pem, Ca::Signer(signer))
    }

    fn open_with(
        dir: &Path,
        server_names: &[String],
        ca_pem: String,
        ca: Ca,
    ) -> Result<Self, PkiError> {
        let ca_der = casign::ca_der(&ca_pem, &dir.join(CA_CERT_FILE))?;
        let fingerprint = fingerprint_of(ca_der.as_ref());
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let authority = Arc::new(crate::seal::Authority::open_or_create(dir)?);
        let server_cert_path = dir.join(SERVER_CERT_FILE);
        let server_key_path = dir.join(SERVER_KEY_FILE);
        let pki = Self {
            dir: dir.to_owned(),
            ca_pem,
            ca_der,
            ca,
            fingerprint,
            server_names: server_names.to_vec(),
            server: Arc::new(SwapResolver {
                current: RwLock::new(Arc::new(placeholder_key()?)),
            }),
            server_serial: RwLock::new(String::new()),
            server_signing: RwLock::new(None),
            provider,
            authority,
        };
        if server_cert_path.exists() && server_key_path.exists() {
            let cert_pem = read_string(&server_cert_path)?;
            let key_pem = Zeroizing::new(read_string(&server_key_path)?);
            pki.install_server(&cert_pem, &key_pem, &server_cert_path)?;
        } else {
            pki.rotate_server_cert()?;
        }
        Ok(pki)
    }

    /// SHA-256 of the CA certificate (DER), lower-case hex without colons.
    /// Agents pin it before enrolment.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The authority key of sealed records (made with the CA on first
    /// start, in its own file).
    pub fn authority(&self) -> &Arc<crate::seal::Authority> {
        &self.authority
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serial (hex) of the server certificate new handshakes get.
    pub fn server_serial(&self) -> String {
        self.server_serial
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Issues a new server certificate for the configured names, writes it
    /// to the data directory and hands it to every listener for new
    /// handshakes (connections already open keep theirs). Returns its serial.
    pub fn rotate_server_cert(&self) -> Result<String, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let names = if self.server_names.is_empty() {
            vec!["localhost".to_owned()]
        } else {
            self.server_names.clone()
        };
        let csr = CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let mut req = SignRequest::new(
            CertKind::Server,
            names.first().map_or("localhost", String::as_str),
            &csr,
            Authorisation::None,
        );
        req.names = names;
        let cert = self.ca.sign(&req)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        write_atomic(&self.dir.join(SERVER_KEY_FILE), key_pem.as_bytes(), true)?;
        write_atomic(&cert_path, cert.cert_pem.as_bytes(), false)?;
        self.install_server(&cert.cert_pem, &key_pem, &cert_path)
    }

    /// Re-reads `server.pem` and `server.key` from the data directory (after
    /// `trustbind-appliance rotate-server-cert` replaced them) and hands them
    /// to new handshakes. Returns the serial.
    pub fn reload_server_cert(&self) -> Result<String, PkiError> {
        let cert_path = self.dir.join(SERVER_CERT_FILE);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = Zeroizing::new(read_string(&self.dir.join(SERVER_KEY_FILE))?);
        self.install_server(&cert_pem, &key_pem, &cert_path)
    }

    fn install_server(
        &self,
        cert_pem: &str,
        key_pem: &str,
        path: &Path,
    ) -> Result<String, PkiError> {
        let bad = |why: String| PkiError::BadFile {
            path: path.to_owned(),
            why,
        };
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("not a PEM certificate ({e})")))?
            .into_owned();
        let serial = peer_cert(cert.as_ref())
            .filter(|p| p.kind == CertKind::Server)
            .map(|p| p.serial)
            .ok_or_else(|| bad("not a Trustbind server certificate".into()))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| bad("server key is not a PEM private key".into()))?;
        let signer = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(format!("server key unusable ({e})")))?;
        let ck = Arc::new(CertifiedKey::new(vec![cert, self.ca_der.clone()], signer));
        let mut cur = self
            .server
            .current
            .write()
            .map_err(|_| PkiError::Poisoned)?;
        *cur = Arc::clone(&ck);
        drop(cur);
        *self
            .server_signing
            .write()
            .map_err(|_| PkiError::Poisoned)? = Some((ck, cert_pem.to_owned()));
        let mut s = self.server_serial.write().map_err(|_| PkiError::Poisoned)?;
        s.clone_from(&serial);
        Ok(serial)
    }

    /// Signs `msg` with the current server key (ECDSA P-256 over SHA-256
    /// of `msg`, ASN.1 DER) and returns the signature with the server
    /// certificate (PEM) that verifies it. Used for the agents' offline
    /// bundles; callers must make `msg` unmistakable for a TLS 1.3
    /// handshake transcript (which starts with 64 spaces).
    pub fn sign_with_server_key(&self, msg: &[u8]) -> Result<(Vec<u8>, String), PkiError> {
        let (ck, pem) = self
            .server_signing
            .read()
            .map_err(|_| PkiError::Poisoned)?
            .clone()
            .ok_or_else(|| PkiError::Tls("no server key loaded".into()))?;
        let signer = ck
            .key
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
            .ok_or_else(|| PkiError::Tls("the server key is not an ECDSA P-256 key".into()))?;
        let sig = signer
            .sign(msg)
            .map_err(|e| PkiError::Tls(format!("signing: {e}")))?;
        Ok((sig, pem))
    }

    /// Issues a host certificate for `host` from the host's PKCS#10 CSR
    /// (PEM). Only the CSR's public key is used (its signature is checked);
    /// subject and extensions are the appliance's: CN = `host`,
    /// OU = `trustbind-host`, client-auth EKU.
    pub fn issue_host(&self, host: &str, csr_pem: &str) -> Result<IssuedCert, PkiError> {
        self.ca.sign(&SignRequest::new(
            CertKind::Host,
            host,
            csr_pem,
            Authorisation::None,
        ))
    }

    /// Issues an admin client certificate for `name` from the admin's
    /// PKCS#10 CSR (PEM), so the private key never leaves the admin's
    /// machine, on the strength of `auth` (an enrolment token or a
    /// renewal, checked by the CA signer). As for [`Pki::issue_host`],
    /// only the CSR's public key is used: CN = `name`,
    /// OU = `trustbind-admin`, client-auth EKU.
    pub fn issue_admin_csr(
        &self,
        name: &str,
        csr_pem: &str,
        auth: Authorisation,
    ) -> Result<IssuedCert, PkiError> {
        self.ca
            .sign(&SignRequest::new(CertKind::Admin, name, csr_pem, auth))
    }

    /// Issues an admin client certificate for `name` with a fresh key:
    /// returns (certificate PEM, private key PEM). The operator's
    /// (`admin-cert`): only with the CA key in this process, never through
    /// a signer.
    pub fn issue_admin(&self, name: &str) -> Result<(String, Zeroizing<String>), PkiError> {
        check_name(name)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let csr = CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let cert = self.ca.sign(&SignRequest::new(
            CertKind::Admin,
            name,
            &csr,
            Authorisation::Operator,
        ))?;
        Ok((cert.cert_pem, Zeroizing::new(key.serialize_pem())))
    }

    fn config_with(
        &self,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        let builder = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_cert_resolver(Arc::clone(&self.server) as _);
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed TLS 1.3 session skips the client
        // certificate check, which would let a revoked host back in.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(Arc::new(cfg))
    }

    fn marked_verifier(
        &self,
        kind: CertKind,
        allow: Option<Arc<dyn CertAllowlist>>,
    ) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| PkiError::Tls(e.to_string()))?;
        Ok(Arc::new(MarkedVerifier { inner, kind, allow }))
    }

    /// TLS configuration of the agent port: TLS 1.3, a client certificate
    /// is required, it must be a host certificate of this CA whose serial is
    /// currently in `hosts` (enrolled, not revoked); anything else fails the
    /// handshake.
    pub fn agent_server_config(
        &self,
        hosts: Arc<EnrolledHosts>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        let v = self.marked_verifier(CertKind::Host, Some(hosts as Arc<dyn CertAllowlist>))?;
        self.config_with(Some(v))
    }

    /// TLS configuration of the admin port: TLS 1.3 and an admin client
    /// certificate of this CA is required (host certificates are refused)
    /// whose serial `admins` holds valid (issued, not revoked, not expired).
    pub fn admin_server_config(
        &self,
        admins: Arc<dyn CertAllowlist>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        let v = self.marked_verifier(CertKind::Admin, Some(admins))?;
        let cfg = self.config_with(Some(v))?;
        // The admin API is HTTP/1.1 or HTTP/2 (axum): offer both.
        let mut cfg = Arc::unwrap_or_clone(cfg);
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// TLS configuration of the enrolment port: server authentication only
    /// (the host has no certificate yet).
    pub fn enrol_server_config(&self) -> Result<Arc<ServerConfig>, PkiError> {
        self.config_with(None)
    }
}

/// Client certificate verifier: WebPKI chain check against the CA, then the
/// kind marker, then the allowlist of valid serials (enrolled hosts, or
/// the admin certificates not revoked).
#[derive(Debug)]
struct MarkedVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    kind: CertKind,
    allow: Option<Arc<dyn CertAllowlist>>,
}

impl ClientCertVerifier for MarkedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer = peer_cert(end_entity.as_ref()).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::ApplicationVerificationFailure,
        ))?;
        if peer.kind != self.kind {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::InvalidPurpose,
            ));
        }
        if let Some(allow) = &self.allow {
            if !allow.allowed(&peer.name, &peer.serial) {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked,
                ));
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Subject `CN = cn, OU = <kind marker>, O = Trustbind`.
pub(crate) fn marked_name(kind: CertKind, cn: &str) -> rcgen::DistinguishedName {
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationalUnitName, kind.marker());
    dn.push(DnType::OrganizationName, "Trustbind");
    dn
}

/// Host and admin names: 1..=253 characters of `[A-Za-z0-9._-]`, not
/// starting with `-` or `.`.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name {
            name: name.chars().take(64).collect(),
            why: "use 1 to 253 characters of A-Z a-z 0-9 . _ -, not starting with - or .".into(),
        })
    }
}

/// 16 random bytes, positive and without a leading zero byte, so the DER
/// encoding is exactly these bytes.
pub(crate) fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0_u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| PkiError::Tls(format!("OS random source: {e}")))?;
    if let Some(first) = b.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(SerialNumber::from_slice(&b))
}

/// Sets `notBefore` an hour ago and `notAfter` in `days`; returns
/// `notAfter` in milliseconds since the Unix epoch.
pub(crate) fn set_validity(params: &mut CertificateParams, days: i64) -> i64 {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
    i64::try_from(params.not_after.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// `notAfter` of a PEM or DER certificate, milliseconds since the Unix epoch.
pub fn not_after_ms(cert: &[u8]) -> Option<i64> {
    let der = CertificateDer::from_pem_slice(cert)
        .map(|c| c.as_ref().to_vec())
        .unwrap_or_else(|_| cert.to_vec());
    let (_, c) = x509_parser::parse_x509_certificate(&der).ok()?;
    c.validity().not_after.timestamp().checked_mul(1000)
}

/// A throwaway self-signed key, replaced before any listener starts.
fn placeholder_key() -> Result<CertifiedKey, PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    let der =
        PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| PkiError::Tls(e.to_owned()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signer))
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// [`trustbind_api::pinned::write_atomic`], the path in the error.
pub fn write_atomic(path: &Path, data: &[u8], private: bool) -> Result<(), PkiError> {
    trustbind_api::pinned::write_atomic(path, data, private).map_err(|e| io_err(path, e))
}
