//! What a Trustbind certificate says about its holder: the kind (subject
//! OU) and name (CN) the appliance's CA marks it with.

/// The kind of a certificate issued by this CA, carried as the subject OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertKind {
    /// An enrolled host (agent port).
    Host,
    /// An administrator (admin port).
    Admin,
    /// The appliance's own server certificate.
    Server,
}

impl CertKind {
    /// The OU value marking this kind.
    pub fn marker(self) -> &'static str {
        match self {
            Self::Host => "trustbind-host",
            Self::Admin => "trustbind-admin",
            Self::Server => "trustbind-server",
        }
    }

    fn from_marker(s: &str) -> Option<Self> {
        [Self::Host, Self::Admin, Self::Server]
            .into_iter()
            .find(|k| k.marker() == s)
    }
}

/// What a verified peer certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Kind marker (subject OU).
    pub kind: CertKind,
    /// Subject CN: the host name or admin name.
    pub name: String,
    /// Serial number, lower-case hex.
    pub serial: String,
}

/// Reads kind, CN and serial from a DER certificate (no signature check:
/// call it on certificates rustls has already verified).
pub fn peer_cert(der: &[u8]) -> Option<PeerCert> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let mut kinds = subject
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .filter_map(CertKind::from_marker);
    let kind = kinds.next()?;
    if kinds.next().is_some() {
        return None;
    }
    let mut cns = subject.iter_common_name().filter_map(|a| a.as_str().ok());
    let name = cns.next()?.to_owned();
    if cns.next().is_some() {
        return None;
    }
    Some(PeerCert {
        kind,
        name,
        serial: serial_hex(cert.raw_serial()),
    })
}

/// Lower-case hex of a serial number, without leading zero bytes.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    hex::encode(raw.get(start..).unwrap_or_default())
}
