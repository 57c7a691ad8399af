//! The CA's signing, and the separate process that does it (threat model
//! T-76).
//!
//! [`CaKey`] is the only code that reads the CA private key (`ca.key`) or
//! signs with it. Every signature goes through [`CaKey::sign`], which
//! checks a [`SignRequest`] itself, whoever sent it: the kind (host, admin
//! or server certificate; nothing else, in particular no CA), the names,
//! the CSR (its signature, an ECDSA P-256 key), the validity (1 to
//! [`MAX_DAYS`] days) and, for admin certificates, an [`Authorisation`].
//! The subject and extensions are the CA's own, never the CSR's.
//!
//! `trustbind-appliance serve` does not hold that key: it starts
//! `trustbind-appliance ca-signer --stdin` as a child on one end of a UNIX
//! socket pair ([`spawn_child`]) and asks it over that socket
//! ([`Client`]), or connects to a signer started apart
//! (`ca-signer --listen SOCKET --allow-uid UID`, [`serve_listener`]). The
//! signer process ([`Signer`]) adds what only a process apart can keep:
//! it checks the peer (`SO_PEERCRED`), rate-limits each kind, refuses an
//! admin authorisation used before, and logs every signature, on its
//! stderr and appended to `ca-signatures.jsonl` beside the key.
//!
//! The protocol is one JSON object a line each way ([`Envelope`]), at most
//! [`MAX_LINE`] bytes.
//!
//! What a compromised daemon can still do is ask for certificates that
//! pass these checks; see `docs/THREAT-MODEL.md` T-76.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::pki::{
    check_name, marked_name, random_serial, read_string, set_validity, write_atomic, CertKind,
    IssuedCert, PkiError, CA_CERT_FILE, CA_KEY_FILE,
};
use crate::ratelimit::{KeyedLimiter, Rate};
use trustbind_policy::cert::serial_hex;

/// Longest validity of a host, admin or server certificate, in days.
pub const MAX_DAYS: u32 = 2 * 366;
/// Validity of the CA certificate, in days.
const CA_DAYS: i64 = 20 * 366;
/// Longest request or reply line, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Most names on a server certificate.
const MAX_SERVER_NAMES: usize = 16;
/// The signer's log of signatures, beside the key.
pub const LOG_FILE: &str = "ca-signatures.jsonl";
/// How long the daemon waits for the signer's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an admin certificate may be signed. Host and server certificates
/// carry [`Authorisation::None`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case", deny_unknown_fields)]
pub enum Authorisation {
    /// Nothing (host and server certificates only).
    None,
    /// A one-time admin enrolment token (`trustbind admin enrol`): its
    /// SHA-256, lower-case hex. The signer signs once per token.
    AdminToken {
        /// SHA-256 of the token, 64 lower-case hex digits.
        token_sha256: String,
    },
    /// An admin renewing its certificate (`POST /v1/admins/renew`): the
    /// serial of the certificate it called with. The signer signs once
    /// per serial.
    AdminRenewal {
        /// Serial of the admin's current certificate, lower-case hex.
        old_serial: String,
    },
    /// The operator on the appliance with the key file itself
    /// (`trustbind-appliance admin-cert`, run as the key's owner). A
    /// signer process refuses it: whoever can read the key needs no
    /// signer.
    Operator,
}

/// One certificate to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    /// `host`, `admin` or `server`.
    pub kind: String,
    /// The subject's CN: host or admin name; for a server certificate its
    /// first name.
    pub name: String,
    /// A server certificate's names (DNS names or IP addresses); empty
    /// for the others.
    #[serde(default)]
    pub names: Vec<String>,
    /// The PKCS#10 CSR (PEM) whose public key is certified.
    pub csr_pem: String,
    /// Validity in days, 1 to [`MAX_DAYS`].
    pub days: u32,
    /// Why (admin certificates).
    pub auth: Authorisation,
}

impl SignRequest {
    /// A request of `kind` for `name` from `csr_pem`, valid [`MAX_DAYS`].
    pub fn new(kind: CertKind, name: &str, csr_pem: &str, auth: Authorisation) -> Self {
        Self {
            kind: kind_text(kind).to_owned(),
            name: name.to_owned(),
            names: Vec::new(),
            csr_pem: csr_pem.to_owned(),
            days: MAX_DAYS,
            auth,
        }
    }
}

fn kind_text(kind: CertKind) -> &'static str {
    match kind {
        CertKind::Host => "host",
        CertKind::Admin => "admin",
        CertKind::Server => "server",
    }
}

/// What the signer refuses, with why.
fn refused(why: impl Into<String>) -> PkiError {
    PkiError::Refused(why.into())
}

/// The signer could not be asked, or its answer not read.
fn unavailable(why: impl Into<String>) -> PkiError {
    PkiError::SignerUnavailable(why.into())
}

/// A request that passed [`check`]: the kind, and the server
/// certificate's names.
#[derive(Debug)]
struct Checked {
    kind: CertKind,
    sans: Vec<SanType>,
    csr: CertificateSigningRequestParams,
}

/// Checks `req` (the policy of [`CaKey::sign`]); `operator` allows
/// [`Authorisation::Operator`].
fn check(req: &SignRequest, operator: bool) -> Result<Checked, PkiError> {
    let kind = match req.kind.as_str() {
        "host" => CertKind::Host,
        "admin" => CertKind::Admin,
        "server" => CertKind::Server,
        other => {
            return Err(refused(format!(
                "unknown certificate kind `{}` (host, admin or server)",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    if kind != CertKind::Server || req.name.parse::<std::net::IpAddr>().is_err() {
        check_name(&req.name)?;
    }
    if !(1..=MAX_DAYS).contains(&req.days) {
        return Err(refused(format!(
            "validity {} days is out of range 1..={MAX_DAYS}",
            req.days
        )));
    }
    match (kind, &req.auth) {
        (CertKind::Host | CertKind::Server, Authorisation::None) => {}
        (CertKind::Host | CertKind::Server, _) => {
            return Err(refused(
                "host and server certificates carry no authorisation",
            ))
        }
        (CertKind::Admin, Authorisation::None) => {
            return Err(refused(
                "an admin certificate needs an authorisation (an enrolment token or a renewal)",
            ))
        }
        (CertKind::Admin, Authorisation::Operator) if !operator => return Err(refused(
            "the signer does not take operator requests: run `admin-cert` as the CA key's owner",
        )),
        (CertKind::Admin, Authorisation::AdminToken { token_sha256 }) => {
            if token_sha256.len() != 64
                || !token_sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(refused(
                    "the token's SHA-256 is not 64 lower-case hex digits",
                ));
            }
        }
        (CertKind::Admin, Authorisation::AdminRenewal { old_serial }) => {
            if old_serial.is_empty()
                || old_serial.len() > 40
                || !old_serial
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(refused(
                    "the renewed serial is not 1 to 40 lower-case hex digits",
                ));
            }
        }
        (CertKind::Admin, Authorisation::Operator) => {}
    }
    let sans = if kind == CertKind::Server {
        if req.names.is_empty() || req.names.len() > MAX_SERVER_NAMES {
            return Err(refused(format!(
                "a server certificate has 1 to {MAX_SERVER_NAMES} names"
            )));
        }
        if req.names.first() != Some(&req.name) {
            return Err(refused("a server certificate's CN is its first name"));
        }
        req.names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => {
                    check_name(n)?;
                    Ok(SanType::DnsName(n.as_str().try_into()?))
                }
            })
            .collect::<Result<Vec<_>, PkiError>>()?
    } else {
        if !req.names.is_empty() {
            return Err(refused("only a server certificate has names"));
        }
        Vec::new()
    };
    if req.csr_pem.len() > MAX_LINE / 2 {
        return Err(PkiError::Csr("too long".into()));
    }
    let csr = CertificateSigningRequestParams::from_pem(&req.csr_pem)
        .map_err(|e| PkiError::Csr(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::Csr("the key must be ECDSA P-256".into()));
    }
    Ok(Checked { kind, sans, csr })
}

/// The CA key and certificate: the one reader of `ca.key`.
pub struct CaKey {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaKey")
    }
}

impl CaKey {
    /// Opens the CA of `dir`, making it on first start (`ca.key` mode 0600,
    /// `ca.pem`).
    pub fn open_or_create(dir: &Path) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(|e| crate::pki::io_err(dir, e))?;
        let ca_cert_path = dir.join(CA_CERT_FILE);
        let ca_key_path = dir.join(CA_KEY_FILE);
        let (ca_pem, key) = if ca_cert_path.exists() || ca_key_path.exists() {
            let pem = read_string(&ca_cert_path)?;
            let key_pem = Zeroizing::new(read_string(&ca_key_path)?);
            let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::BadFile {
                path: ca_key_path.clone(),
                why: format!("not a usable private key ({e})"),
            })?;
            (pem, key)
        } else {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "Trustbind appliance CA");
            params
                .distinguished_name
                .push(DnType::OrganizationName, "Trustbind");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.serial_number = Some(random_serial()?);
            set_validity(&mut params, CA_DAYS);
            let cert = params.self_signed(&key)?;
            let key_pem = Zeroizing::new(key.serialize_pem());
            write_atomic(&ca_key_path, key_pem.as_bytes(), true)?;
            write_atomic(&ca_cert_path, cert.pem().as_bytes(), false)?;
            (cert.pem(), key)
        };
        let der = ca_der(&ca_pem, &ca_cert_path)?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| PkiError::BadFile {
            path: ca_cert_path.clone(),
            why: format!("not a usable CA certificate ({e})"),
        })?;
        Ok(Self { issuer, ca_pem })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Checks `req` and signs it: CN = `req.name`, OU = the kind's marker,
    /// client-auth EKU (server-auth and the names for a server
    /// certificate), a random serial, `notAfter` in `req.days`. Only the
    /// CSR's public key is taken. `operator`: the caller holds the key
    /// file itself ([`Authorisation::Operator`] allowed).
    pub fn sign(&self, req: &SignRequest, operator: bool) -> Result<IssuedCert, PkiError> {
        self.sign_checked(req, check(req, operator)?)
    }

    fn sign_checked(&self, req: &SignRequest, checked: Checked) -> Result<IssuedCert, PkiError> {
        let Checked {
            kind,
            sans,
            mut csr,
        } = checked;
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = marked_name(kind, &req.name);
        params.extended_key_usages = vec![if kind == CertKind::Server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_text = serial_hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        let expires_ms = set_validity(&mut params, i64::from(req.days));
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            serial: serial_text,
            expires_ms,
        })
    }
}

/// `ca.pem`'s certificate, DER.
pub fn ca_der(pem: &str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::BadFile {
            path: path.to_owned(),
            why: format!("not a PEM certificate ({e})"),
        })?
        .into_owned())
}

/// One line of the protocol: the signer's greeting (`id` 0, `ca_pem`), a
/// request (`req`) or its answer (`ok` or `err`), matched by `id`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The request's number, echoed in its answer.
    pub id: u64,
    /// The request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<SignRequest>,
    /// The certificate signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<IssuedCert>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    /// The CA certificate (PEM), in the greeting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

impl Envelope {
    fn answer(id: u64, r: Result<IssuedCert, PkiError>) -> Self {
        let (ok, err) = match r {
            Ok(c) => (Some(c), None),
            Err(PkiError::Refused(why)) => (None, Some(why)),
            Err(e) => (None, Some(e.to_string())),
        };
        Self {
            id,
            req: None,
            ok,
            err,
            ca_pem: None,
        }
    }
}

/// How many signatures of each kind the signer makes: host certificates
/// (enrolments and renewals of a fleet), admin and server certificates
/// (rare: an attacker asking through a compromised daemon is slowed and
/// shows in the log).
fn rate(kind: CertKind) -> Rate {
    match kind {
        CertKind::Host => Rate::per(1000, Duration::from_secs(100)),
        CertKind::Admin => Rate::per(10, Duration::from_secs(600)),
        CertKind::Server => Rate::per(10, Duration::from_secs(600)),
    }
}

/// One logged signature (a line of [`LOG_FILE`]).
#[derive(Debug, Serialize, Deserialize)]
struct LogLine {
    at_ms: i64,
    kind: String,
    name: String,
    serial: String,
    expires_ms: i64,
    auth: Authorisation,
    peer_pid: i32,
}

/// The signer process's state: the key, the authorisations used, the
/// rates and the log.
pub struct Signer {
    key: CaKey,
    used: HashSet<Authorisation>,
    limits: Vec<(CertKind, KeyedLimiter<()>)>,
    log: fs::File,
    log_path: PathBuf,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("log", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Opens (or makes) the CA of `dir` and its log; the authorisations
    /// the log names count as used.
    pub fn open(dir: &Path) -> Result<Self, PkiError> {
        let key = CaKey::open_or_create(dir)?;
        let log_path = dir.join(LOG_FILE);
        let mut used = HashSet::new();
        // Read once: the authorisations it names, and whether its last
        // line was cut short by a crash.
        let text = match fs::read_to_string(&log_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(crate::pki::io_err(&log_path, e)),
        };
        for line in text.lines() {
            if let Ok(l) = serde_json::from_str::<LogLine>(line) {
                used.insert(l.auth);
            }
        }
        used.remove(&Authorisation::None);
        let mut log = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| crate::pki::io_err(&log_path, e))?;
        // A line cut short by a crash is ended, so the next one is whole.
        if !text.is_empty() && !text.ends_with('\n') {
            log.write_all(b"\n")
                .map_err(|e| crate::pki::io_err(&log_path, e))?;
        }
        let limits = [CertKind::Host, CertKind::Admin, CertKind::Server]
            .into_iter()
            .map(|k| (k, KeyedLimiter::new(rate(k), 1, rate(k))))
            .collect();
        Ok(Self {
            key,
            used,
            limits,
            log,
            log_path,
        })
    }

    /// Checks, rate-limits, signs and logs `req` from the process
    /// `peer_pid`.
    pub fn handle(&mut self, req: &SignRequest, peer_pid: i32) -> Result<IssuedCert, PkiError> {
        let checked = match check(req, false) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "ca-signer: refused {} `{}` for pid {peer_pid}: {e}",
                    req.kind.chars().take(32).collect::<String>(),
                    req.name.chars().take(64).collect::<String>()
                );
                return Err(e);
            }
        };
        if req.auth != Authorisation::None && self.used.contains(&req.auth) {
            tracing::warn!(
                "ca-signer: refused admin `{}` for pid {peer_pid}: its authorisation was used before",
                req.name
            );
            return Err(refused(
                "this authorisation was used before (one certificate per token or renewed certificate)",
            ));
        }
        if let Some((_, l)) = self.limits.iter().find(|(k, _)| *k == checked.kind) {
            if let Err(lim) = l.check(&(), 1.0) {
                tracing::warn!(
                    "ca-signer: refused {} `{}` for pid {peer_pid}: rate limit",
                    req.kind,
                    req.name
                );
                return Err(refused(format!(
                    "too many {} certificates; retry in {} s",
                    req.kind,
                    lim.retry_after.as_secs() + 1
                )));
            }
        }
        let issued = self.key.sign_checked(req, checked)?;
        let line = LogLine {
            at_ms: crate::store::now_ms(),
            kind: req.kind.clone(),
            name: req.name.clone(),
            serial: issued.serial.clone(),
            expires_ms: issued.expires_ms,
            auth: req.auth.clone(),
            peer_pid,
        };
        let text = serde_json::to_string(&line).map_err(|e| refused(e.to_string()))?;
        // Not logged, not handed out. A line half written (a full disk)
        // is cut off again, so the next one does not run into it.
        let before = self.log.metadata().map(|m| m.len());
        if let Err(e) = self
            .log
            .write_all(format!("{text}\n").as_bytes())
            .and_then(|()| self.log.sync_data())
        {
            if let Ok(len) = before {
                let _ = self.log.set_len(len);
            }
            return Err(crate::pki::io_err(&self.log_path, e));
        }
        if req.auth != Authorisation::None {
            self.used.insert(req.auth.clone());
        }
        tracing::info!("ca-signer: signed {text}");
        Ok(issued)
    }

    /// Greets `stream` with the CA certificate, then answers its requests
    /// until it closes.
    pub fn serve_stream(&mut self, stream: &UnixStream, peer_pid: i32) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream);
        let mut writer = stream;
        let hello = Envelope {
            id: 0,
            req: None,
            ok: None,
            err: None,
            ca_pem: Some(self.key.ca_pem().to_owned()),
        };
        let text = serde_json::to_string(&hello).map_err(std::io::Error::other)?;
        writer.write_all(format!("{text}\n").as_bytes())?;
        loop {
            let mut line = String::new();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut line)?;
            if n == 0 {
                return Ok(());
            }
            if n > MAX_LINE || !line.ends_with('\n') {
                tracing::warn!(
                    "ca-signer: a request over {MAX_LINE} bytes from pid {peer_pid}: closing"
                );
                return Ok(());
            }
            let answer = match serde_json::from_str::<Envelope>(&line) {
                Ok(Envelope {
                    id, req: Some(req), ..
                }) => Envelope::answer(id, self.handle(&req, peer_pid)),
                Ok(Envelope { id, .. }) => Envelope::answer(id, Err(refused("no request"))),
                Err(e) => {
                    tracing::warn!("ca-signer: unreadable request from pid {peer_pid}: {e}");
                    return Ok(());
                }
            };
            let text = serde_json::to_string(&answer).map_err(std::io::Error::other)?;
            writer.write_all(format!("{text}\n").as_bytes())?;
        }
    }
}

/// The peer of `stream` (`SO_PEERCRED`): (pid, uid).
pub fn peer(stream: &UnixStream) -> std::io::Result<(i32, u32)> {
    let c = rustix::net::sockopt::socket_peercred(stream)?;
    Ok((c.pid.as_raw_nonzero().get(), c.uid.as_raw()))
}

/// `ca-signer --stdin`: serves the socket on standard input, which must be
/// a UNIX socket whose peer is this process's parent.
pub fn serve_stdin(dir: &Path) -> Result<(), PkiError> {
    harden();
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(stdin_err)?;
    let stream = UnixStream::from(fd);
    let (pid, _uid) = peer(&stream).map_err(stdin_err)?;
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    if pid != parent {
        return Err(refused(format!(
            "standard input's peer is pid {pid}, not the parent {parent}"
        )));
    }
    let mut signer = Signer::open(dir)?;
    tracing::info!("ca-signer: serving pid {pid} ({})", dir.display());
    signer.serve_stream(&stream, pid).map_err(stdin_err)
}

fn stdin_err(e: std::io::Error) -> PkiError {
    crate::pki::io_err(Path::new("<stdin>"), e)
}

/// `ca-signer --listen SOCKET --allow-uid UID`: serves every connection
/// whose peer runs as `allow_uid`, one at a time.
pub fn serve_listener(dir: &Path, socket: &Path, allow_uid: u32) -> Result<(), PkiError> {
    harden();
    let mut signer = Signer::open(dir)?;
    let _ = fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| crate::pki::io_err(socket, e))?;
    // Anyone may connect; only `allow_uid` is served (`SO_PEERCRED`).
    fs::set_permissions(socket, fs::Permissions::from_mode(0o666))
        .map_err(|e| crate::pki::io_err(socket, e))?;
    tracing::info!(
        "ca-signer: listening on {} for uid {allow_uid}",
        socket.display()
    );
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        match peer(&stream) {
            Ok((pid, uid)) if uid == allow_uid => {
                if let Err(e) = signer.serve_stream(&stream, pid) {
                    tracing::warn!("ca-signer: pid {pid}: {e}");
                }
            }
            Ok((pid, uid)) => {
                tracing::warn!("ca-signer: refused pid {pid}: uid {uid} is not {allow_uid}");
            }
            Err(e) => tracing::warn!("ca-signer: no peer credentials: {e}"),
        }
    }
    Ok(())
}

/// No core dumps and no `ptrace` by processes of the same uid: the key
/// stays in this process.
fn harden() {
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!("ca-signer: PR_SET_DUMPABLE: {e}");
    }
}

/// The daemon's side: asks a signer over one stream, one request at a
/// time.
#[derive(Debug)]
pub struct Client {
    conn: Mutex<(UnixStream, u64)>,
    ca_pem: String,
}

impl Client {
    /// A client on `stream`, connected to a signer: reads its greeting
    /// (the CA certificate).
    pub fn new(stream: UnixStream) -> Result<Self, PkiError> {
        let io = |e: std::io::Error| unavailable(format!("{e}"));
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let hello = read_envelope(&mut BufReader::new(&stream))?;
        let ca_pem = hello
            .ca_pem
            .filter(|_| hello.id == 0)
            .ok_or_else(|| unavailable("it did not send its CA certificate"))?;
        Ok(Self {
            conn: Mutex::new((stream, 0)),
            ca_pem,
        })
    }

    /// Connects to the signer listening on `socket`.
    pub fn connect(socket: &Path) -> Result<Self, PkiError> {
        let s = UnixStream::connect(socket).map_err(|e| crate::pki::io_err(socket, e))?;
        Self::new(s)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Asks the signer to sign `req`.
    pub fn sign(&self, req: &SignRequest) -> Result<IssuedCert, PkiError> {
        let mut guard = self.conn.lock().map_err(|_| PkiError::Poisoned)?;
        let (stream, next) = &mut *guard;
        *next += 1;
        let id = *next;
        let env = Envelope {
            id,
            req: Some(req.clone()),
            ok: None,
            err: None,
            ca_pem: None,
        };
        let io = |e: std::io::Error| unavailable(format!("{e}"));
        let text = serde_json::to_string(&env).map_err(|e| refused(e.to_string()))?;
        if text.len() >= MAX_LINE {
            return Err(refused("the request is too long"));
        }
        let mut w: &UnixStream = stream;
        w.write_all(format!("{text}\n").as_bytes()).map_err(io)?;
        // Answers to requests given up on (a timeout) are skipped.
        let mut reader = BufReader::new(&*stream);
        loop {
            let answer = read_envelope(&mut reader)?;
            if answer.id != id {
                continue;
            }
            return match (answer.ok, answer.err) {
                (Some(c), None) => Ok(c),
                (_, Some(e)) => Err(refused(e)),
                (None, None) => Err(unavailable("it answered nothing")),
            };
        }
    }
}

/// Reads one line from the signer.
fn read_envelope(reader: &mut BufReader<&UnixStream>) -> Result<Envelope, PkiError> {
    let mut line = String::new();
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_line(&mut line)
        .map_err(|e| unavailable(format!("{e}")))?;
    if n == 0 {
        return Err(unavailable("it closed the connection"));
    }
    serde_json::from_str(&line).map_err(|e| unavailable(format!("its answer: {e}")))
}

/// Starts `exe ca-signer --stdin` for `dir` on one end of a socket pair
/// (its standard input) and returns the child with a [`Client`] on the
/// other end, once the signer has greeted it (the CA is ready).
pub fn spawn_child(exe: &Path, dir: &Path) -> Result<(std::process::Child, Client), PkiError> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| crate::pki::io_err(exe, e))?;
    use std::os::unix::process::CommandExt as _;
    let child = std::process::Command::new(exe)
        .arg("--data-dir")
        .arg(dir)
        .args(["ca-signer", "--stdin"])
        // A terminal's signals are for `serve`: the signer ends when its
        // socket closes.
        .process_group(0)
        .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
            theirs,
        )))
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| crate::pki::io_err(exe, e))?;
    let client = Client::new(ours)?;
    Ok((child, client))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    fn host(name: &str) -> SignRequest {
        SignRequest::new(CertKind::Host, name, &csr(), Authorisation::None)
    }

    fn token(n: u8) -> Authorisation {
        Authorisation::AdminToken {
            token_sha256: format!("{n:02x}").repeat(32),
        }
    }

    fn refusal(r: Result<IssuedCert, PkiError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(c) => panic!("signed {}", c.serial),
        }
    }

    #[test]
    fn the_signer_signs_a_valid_host_request_and_logs_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        let c = s.handle(&host("web1"), 7).unwrap();
        let der = CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap();
        let p = crate::pki::peer_cert(der.as_ref()).unwrap();
        assert_eq!((p.kind, p.name.as_str()), (CertKind::Host, "web1"));
        let log = fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
        assert!(
            log.contains(&c.serial) && log.contains("\"peer_pid\":7"),
            "{log}"
        );
    }

    #[test]
    fn the_signer_refuses_bad_names_kinds_validity_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        assert!(refusal(s.handle(&host("-x"), 1)).contains("invalid name"));
        assert!(refusal(s.handle(&host("a b"), 1)).contains("invalid name"));
        assert!(refusal(s.handle(&host(&"a".repeat(254)), 1)).contains("invalid name"));
        let mut r = host("web1");
        r.kind = "ca".into();
        assert!(refusal(s.handle(&r, 1)).contains("unknown certificate kind"));
        let mut r = host("web1");
        r.days = MAX_DAYS + 1;
        assert!(refusal(s.handle(&r, 1)).contains("out of range"));
        r.days = 0;
        assert!(refusal(s.handle(&r, 1)).contains("out of range"));
        let mut r = host("web1");
        r.names = vec!["web1".into()];
        assert!(refusal(s.handle(&r, 1)).contains("only a server certificate"));
        let mut r = host("web1");
        r.auth = token(1);
        assert!(refusal(s.handle(&r, 1)).contains("carry no authorisation"));
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&ed)
            .unwrap()
            .pem()
            .unwrap();
        let r = SignRequest::new(CertKind::Host, "web1", &ed_csr, Authorisation::None);
        assert!(refusal(s.handle(&r, 1)).contains("P-256"));
        let r = SignRequest::new(CertKind::Host, "web1", "not a csr", Authorisation::None);
        assert!(refusal(s.handle(&r, 1)).contains("certificate signing request"));
        let mut r = SignRequest::new(CertKind::Server, "x", &csr(), Authorisation::None);
        r.names = vec!["y".into()];
        assert!(refusal(s.handle(&r, 1)).contains("first name"));
        assert!(!fs::read_to_string(dir.path().join(LOG_FILE))
            .unwrap()
            .contains("serial"));
    }

    #[test]
    fn admin_certificates_need_an_authorisation_used_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        let admin = |auth| SignRequest::new(CertKind::Admin, "alice", &csr(), auth);
        assert!(
            refusal(s.handle(&admin(Authorisation::None), 1)).contains("needs an authorisation")
        );
        assert!(refusal(s.handle(&admin(Authorisation::Operator), 1)).contains("operator"));
        let bad = Authorisation::AdminToken {
            token_sha256: "XYZ".into(),
        };
        assert!(refusal(s.handle(&admin(bad), 1)).contains("hex"));
        s.handle(&admin(token(1)), 1).unwrap();
        assert!(refusal(s.handle(&admin(token(1)), 1)).contains("used before"));
        let renew = Authorisation::AdminRenewal {
            old_serial: "4a01".into(),
        };
        s.handle(&admin(renew.clone()), 1).unwrap();
        assert!(refusal(s.handle(&admin(renew.clone()), 1)).contains("used before"));
        // Used stays used across a restart of the signer (its log), a
        // line torn by a crash notwithstanding.
        drop(s);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        f.write_all(b"{\"at_ms\":1,\"ki").unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        assert!(refusal(s.handle(&admin(token(1)), 1)).contains("used before"));
        assert!(refusal(s.handle(&admin(renew), 1)).contains("used before"));
        s.handle(&admin(token(2)), 1).unwrap();
        drop(s);
        let mut s = Signer::open(dir.path()).unwrap();
        assert!(refusal(s.handle(&admin(token(2)), 1)).contains("used before"));
        // Local signing (the operator's `admin-cert`) takes Operator.
        CaKey::open_or_create(dir.path())
            .unwrap()
            .sign(&admin(Authorisation::Operator), true)
            .unwrap();
    }

    #[test]
    fn admin_certificates_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        for n in 0..10 {
            s.handle(
                &SignRequest::new(CertKind::Admin, "alice", &csr(), token(n)),
                1,
            )
            .unwrap();
        }
        let r = SignRequest::new(CertKind::Admin, "alice", &csr(), token(10));
        assert!(refusal(s.handle(&r, 1)).contains("too many admin"));
        // Hosts have their own budget.
        s.handle(&host("web1"), 1).unwrap();
    }

    #[test]
    fn a_signer_gone_is_unavailable_not_a_refusal() {
        let (a, b) = UnixStream::pair().unwrap();
        let hello = "{\"id\":0,\"ca_pem\":\"x\"}\n";
        (&b).write_all(hello.as_bytes()).unwrap();
        let c = Client::new(a).unwrap();
        drop(b);
        let e = c.sign(&host("web1")).unwrap_err();
        assert!(matches!(e, PkiError::SignerUnavailable(_)), "{e:?}");
        let st = crate::agent_api::not_issued(&e);
        assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
        let st = crate::agent_api::not_issued(&refused("no"));
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    }

    #[test]
    fn a_client_and_a_signer_talk_over_a_socket_pair() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Signer::open(dir.path()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || s.serve_stream(&b, 1));
        let c = Client::new(a).unwrap();
        assert!(c.ca_pem().contains("BEGIN CERTIFICATE"));
        let issued = c.sign(&host("web1")).unwrap();
        assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(c
            .sign(&host("-bad"))
            .unwrap_err()
            .to_string()
            .contains("invalid name"));
        let (pid, uid) = peer(&c.conn.lock().unwrap().0).unwrap();
        assert_eq!(pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(uid, rustix::process::getuid().as_raw());
        drop(c);
        t.join().unwrap().unwrap();
    }
}
