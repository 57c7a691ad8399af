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
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use trustbind_api::pb::enrolment_client::EnrolmentClient;
use trustbind_api::pb::EnrolRequest;
use trustbind_api::pinned::{self, PinError};
pub use trustbind_api::pinned::{
    fingerprint, source_chain, split_addr, AGENT_PORT, CONNECT_TIMEOUT, ENROL_PORT,
};

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
    /// The network or TLS failed, or bad enrolment input.
    #[error(transparent)]
    Pin(#[from] PinError),
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
    // A new file with a random name beside `path` (0600 until chmod),
    // removed if anything below fails.
    let mut f = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(file_err(dir))?;
    let tmp = f.path().to_owned();
    f.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(file_err(&tmp))?;
    f.write_all(data).map_err(file_err(&tmp))?;
    f.as_file().sync_all().map_err(file_err(&tmp))?;
    f.persist(path)
        .map_err(|e| e.error)
        .map_err(file_err(path))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))
}

/// A gRPC channel over `tls` to `addr`, checking the certificate for `name`.
pub async fn channel(addr: &str, name: &str, tls: ClientConfig) -> Result<Channel, LinkError> {
    Ok(pinned::channel(addr, name, tls).await?)
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

/// What the appliance issued on enrolment, in memory (nothing written yet).
pub struct Credentials {
    /// What `run` needs besides the files.
    pub config: AgentConfig,
    /// This host's private key, PEM (made here; it never left the host).
    pub key_pem: zeroize::Zeroizing<String>,
    /// The host certificate, PEM.
    pub cert_pem: String,
    /// The appliance CA certificate, PEM (checked against the pin).
    pub ca_pem: String,
    /// The appliance's authority key (P-256 `x || y`), empty from an
    /// appliance that has none: the module is loaded with it.
    pub authority: Vec<u8>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The mutual-TLS client configuration for the agent port.
    pub fn tls(&self) -> Result<ClientConfig, LinkError> {
        client_tls(
            Pem("the appliance CA", self.ca_pem.as_bytes()),
            Pem("the host certificate", self.cert_pem.as_bytes()),
            Pem("the host key", self.key_pem.as_bytes()),
        )
    }
}

/// Trades the one-time token and a CSR for a host certificate on the
/// enrol port, the CA pinned by fingerprint during the handshake.
pub async fn request_certificate(e: &Enrolment) -> Result<Credentials, LinkError> {
    let pin = pinned::normalise_fingerprint(&e.ca_fingerprint)?;
    let (enrol_addr, host) = split_addr(&e.enrol_addr, ENROL_PORT);
    let server_name = e.server_name.clone().unwrap_or_else(|| host.clone());
    let agent_addr = split_addr(e.agent_addr.as_deref().unwrap_or(&host), AGENT_PORT).0;
    let ch = channel(&enrol_addr, &server_name, pinned::pinned_config(&pin)?).await?;
    let (key_pem, csr) = pinned::key_and_csr(&e.name)?;
    let key_pem = zeroize::Zeroizing::new(key_pem);
    let reply = EnrolmentClient::new(ch)
        .enrol(EnrolRequest {
            host: e.name.clone(),
            token: e.token.clone(),
            csr_pem: csr,
        })
        .await
        .map_err(|s| LinkError::Refused(s.message().to_owned()))?
        .into_inner();
    pinned::check_reply_ca(&reply.ca_pem, &pin).map_err(LinkError::Refused)?;
    Ok(Credentials {
        config: AgentConfig {
            name: e.name.clone(),
            agent_addr,
            server_name,
            ca_fingerprint: pin,
        },
        key_pem,
        cert_pem: reply.cert_pem,
        ca_pem: reply.ca_pem,
        authority: reply.authority,
    })
}

/// The file in the state directory holding the appliance's authority key
/// (128 hex digits), the module's `authority=` parameter.
pub const AUTHORITY_FILE: &str = "authority";

/// Enrols this host and writes its credentials into `state`.
pub async fn enrol(e: &Enrolment, state: &Path) -> Result<AgentConfig, LinkError> {
    let c = request_certificate(e).await?;
    write_atomic(&state.join("key.pem"), c.key_pem.as_bytes(), 0o600)?;
    write_atomic(&state.join("cert.pem"), c.cert_pem.as_bytes(), 0o644)?;
    write_atomic(&state.join("ca.pem"), c.ca_pem.as_bytes(), 0o644)?;
    if c.authority.len() == trustbind_proto::seal::SESSION_PUB_LEN {
        // The module parameter: `modprobe trustbind authority=$(cat authority)`.
        write_atomic(
            &state.join(AUTHORITY_FILE),
            hex::encode(&c.authority).as_bytes(),
            0o644,
        )?;
    }
    let json =
        serde_json::to_vec_pretty(&c.config).map_err(|e| LinkError::Config(e.to_string()))?;
    write_atomic(&state.join("agent.json"), &json, 0o644)?;
    Ok(c.config)
}

/// Renew the host certificate when fewer than this many days remain
/// (`trustbind-agent run --renew-days`).
pub const RENEW_BEFORE_DAYS: u32 = 30;

/// `notAfter` of the host certificate in `state` (`cert.pem`), in
/// milliseconds since the Unix epoch.
pub fn cert_not_after_ms(state: &Path) -> Result<i64, LinkError> {
    let p = state.join("cert.pem");
    let der = CertificateDer::from_pem_file(&p)
        .map_err(|e| LinkError::Config(format!("{}: {e}", p.display())))?;
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| LinkError::Config(format!("{}: {e}", p.display())))?;
    Ok(c.validity().not_after.timestamp().saturating_mul(1000))
}

/// Whether a certificate valid until `not_after_ms` is due for renewal at
/// `now_ms` with `days` of margin.
pub fn renewal_due(not_after_ms: i64, now_ms: i64, days: u32) -> bool {
    not_after_ms.saturating_sub(now_ms) < i64::from(days) * 86_400_000
}

/// Renews the host certificate over an open agent connection: a new key
/// made here, its CSR sent with `Renew`, the new key and certificate
/// written into `state`. Both are written beside the old ones first
/// (`key.pem.new`, then `cert.pem.new`) and then renamed in that order, so
/// a crash leaves a pair [`finish_renewal`] completes or discards at the
/// next start. Returns the new certificate's `notAfter` (ms).
pub async fn renew(
    client: &mut trustbind_api::pb::agent_client::AgentClient<Channel>,
    state: &Path,
    name: &str,
    timeout: std::time::Duration,
) -> Result<i64, LinkError> {
    let (key_pem, csr) = pinned::key_and_csr(name)?;
    let key_pem = zeroize::Zeroizing::new(key_pem);
    let mut req = tonic::Request::new(trustbind_api::pb::RenewRequest { csr_pem: csr });
    req.set_timeout(timeout);
    let reply = client
        .renew(req)
        .await
        .map_err(|s| LinkError::Refused(format!("Renew: {}", s.message())))?
        .into_inner();
    // The reply must fit the key and chain to the CA before it replaces
    // anything.
    let ca = fs::read(state.join("ca.pem")).map_err(file_err(&state.join("ca.pem")))?;
    client_tls(
        Pem("the appliance CA", &ca),
        Pem("the renewed certificate", reply.cert_pem.as_bytes()),
        Pem("the new key", key_pem.as_bytes()),
    )?;
    write_atomic(&state.join("key.pem.new"), key_pem.as_bytes(), 0o600)?;
    write_atomic(
        &state.join("cert.pem.new"),
        reply.cert_pem.as_bytes(),
        0o644,
    )?;
    finish_renewal(state)?;
    Ok(reply.not_after_ms)
}

/// Completes a renewal a crash interrupted: with `cert.pem.new` present the
/// new key (`key.pem.new`, or already `key.pem`) and certificate are moved
/// into place; a `key.pem.new` alone (no certificate came) is removed.
pub fn finish_renewal(state: &Path) -> Result<(), LinkError> {
    let (key_new, cert_new) = (state.join("key.pem.new"), state.join("cert.pem.new"));
    let rename = |from: &Path, to: &Path| fs::rename(from, to).map_err(file_err(from));
    if cert_new.exists() {
        if key_new.exists() {
            rename(&key_new, &state.join("key.pem"))?;
        }
        rename(&cert_new, &state.join("cert.pem"))?;
    } else if key_new.exists() {
        fs::remove_file(&key_new).map_err(file_err(&key_new))?;
    }
    fs::File::open(state)
        .and_then(|d| d.sync_all())
        .map_err(file_err(state))
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

/// PEM text and what it is, for error messages (never the text itself).
#[derive(Clone, Copy)]
pub struct Pem<'a>(pub &'a str, pub &'a [u8]);

/// A mutual-TLS client configuration trusting only the CA certificate
/// `ca` and presenting the certificate chain `cert` with key `key`.
pub fn client_tls(ca: Pem<'_>, cert: Pem<'_>, key: Pem<'_>) -> Result<ClientConfig, LinkError> {
    let ca_der = CertificateDer::from_pem_slice(ca.1)
        .map_err(|e| LinkError::Config(format!("{}: {e}", ca.0)))?;
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_der)
        .map_err(|e| LinkError::Config(format!("{}: {e}", ca.0)))?;
    let certs = CertificateDer::pem_slice_iter(cert.1)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LinkError::Config(format!("{}: {e}", cert.0)))?;
    // Never echo key material: only what the key is goes into the message.
    let key_der = PrivateKeyDer::from_pem_slice(key.1)
        .map_err(|e| LinkError::Config(format!("{}: {e}", key.0)))?;
    pinned::builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key_der)
        .map_err(|e| LinkError::Config(format!("{}: {e}", cert.0)))
}

/// The mutual-TLS client configuration from the files in `state` (after
/// completing an interrupted renewal, [`finish_renewal`]).
pub fn agent_tls(state: &Path) -> Result<ClientConfig, LinkError> {
    finish_renewal(state)?;
    let read = |name: &str| {
        let p = state.join(name);
        fs::read(&p)
            .map_err(file_err(&p))
            .map(|b| (p.display().to_string(), zeroize::Zeroizing::new(b)))
    };
    let (ca, cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
    client_tls(
        Pem(&ca.0, &ca.1),
        Pem(&cert.0, &cert.1),
        Pem(&key.0, &key.1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_within_the_margin() {
        let day = 86_400_000;
        assert!(!renewal_due(100 * day, 0, 30));
        assert!(renewal_due(29 * day, 0, 30));
        assert!(renewal_due(-1, 0, 0));
    }

    #[test]
    fn an_interrupted_renewal_completes_or_is_discarded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let put = |n: &str, t: &str| fs::write(p.join(n), t).unwrap();
        let get = |n: &str| fs::read_to_string(p.join(n)).unwrap();
        put("key.pem", "old key");
        put("cert.pem", "old cert");
        // Crashed before the certificate came: the new key goes.
        put("key.pem.new", "new key");
        finish_renewal(p).unwrap();
        assert_eq!(
            (get("key.pem"), get("cert.pem")),
            ("old key".into(), "old cert".into())
        );
        assert!(!p.join("key.pem.new").exists());
        // Crashed with both new files written: both move in.
        put("key.pem.new", "new key");
        put("cert.pem.new", "new cert");
        finish_renewal(p).unwrap();
        assert_eq!(
            (get("key.pem"), get("cert.pem")),
            ("new key".into(), "new cert".into())
        );
        // Crashed between the two renames: the certificate follows the key.
        put("cert.pem.new", "newer cert");
        finish_renewal(p).unwrap();
        assert_eq!(get("cert.pem"), "newer cert");
        assert!(!p.join("cert.pem.new").exists());
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
        // Replacing keeps the new mode and leaves no temporary file behind.
        write_atomic(&p, b"public", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"public");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let names: Vec<_> = fs::read_dir(d.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key.pem"]);
        // A failed write leaves the old file and nothing else.
        assert!(write_atomic(&d.path().join("sub/key.pem/x"), b"y", 0o600).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"public");
    }

    #[test]
    fn a_missing_config_says_enrol() {
        let d = tempfile::tempdir().unwrap();
        let e = load_config(d.path()).unwrap_err().to_string();
        assert!(e.contains("not enrolled"), "{e}");
    }
}
