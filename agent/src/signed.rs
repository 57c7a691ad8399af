//! The appliance-signed offline bundle (`Agent.SignBundle`): the only
//! source of offline verdicts.
//!
//! The appliance re-decides the pairs the agent remembers
//! ([`crate::bundle`]) and signs a `BundlePayload` (agent.proto) with its
//! server key. The agent keeps the reply as sent (`bundle.signed`, the
//! encoded `SignedBundle`, written atomically, 0600) and uses it only if
//! [`Verified::verify`] accepts it: the signer certificate chains to the
//! pinned CA (`ca.pem`), is valid now, is a server certificate (OU
//! `trustbind-server`, server-auth usage), the ECDSA P-256 signature over
//! the payload verifies with it, and the payload is version 1, made for
//! this host and not expired. Expiry is checked again at every use.

use std::collections::HashMap;
use std::path::Path;

use prost::Message as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use trustbind_api::pb::{BundlePayload, SignedBundle, Verdict as PbVerdict};
use trustbind_proto::Decision;

use crate::link::{write_atomic, LinkError};

/// File name of the signed bundle in the state directory.
pub const SIGNED_FILE: &str = "bundle.signed";
/// The payload version this agent understands.
pub const VERSION: u32 = 1;
/// Subject OU of the appliance's server certificate (the signer).
const SIGNER_OU: &str = "trustbind-server";

/// A signed bundle that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The host it was made for.
    pub host: String,
    /// Policy generation of its verdicts.
    pub generation: i64,
    /// Appliance time it was made (ms since the epoch).
    pub issued_at_ms: i64,
    /// Not used after this (ms since the epoch).
    pub expires_at_ms: i64,
    map: HashMap<(String, String), Decision>,
}

/// Most pairs sent in one `SignBundle` request (the appliance's bound).
pub const MAX_ASK: usize = 4096;

impl Verified {
    /// Checks `signed` against the pinned CA `ca`, this `host` and the
    /// clock (`now_ms`); `Err` says why it must not be used.
    pub fn verify(
        signed: &SignedBundle,
        ca: &CertificateDer<'_>,
        host: &str,
        now_ms: i64,
    ) -> Result<Self, String> {
        let signer = CertificateDer::from_pem_slice(signed.signer_cert_pem.as_bytes())
            .map_err(|e| format!("signer certificate unreadable ({e})"))?;
        let anchor = webpki::anchor_from_trusted_cert(ca)
            .map_err(|e| format!("pinned CA unusable ({e})"))?;
        let ee = webpki::EndEntityCert::try_from(&signer)
            .map_err(|e| format!("signer certificate unreadable ({e})"))?;
        let secs = u64::try_from(now_ms / 1000).unwrap_or(0);
        ee.verify_for_usage(
            &[webpki::ring::ECDSA_P256_SHA256],
            &[anchor],
            &[],
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs)),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            format!("signer certificate not issued by the pinned CA for a server ({e})")
        })?;
        if !signer_ou_ok(signer.as_ref()) {
            return Err(format!(
                "signer certificate is not the appliance's (OU is not {SIGNER_OU})"
            ));
        }
        ee.verify_signature(
            webpki::ring::ECDSA_P256_SHA256,
            &signed.payload,
            &signed.signature,
        )
        .map_err(|e| format!("signature does not verify ({e})"))?;
        let p = BundlePayload::decode(signed.payload.as_slice())
            .map_err(|e| format!("payload unreadable ({e})"))?;
        if p.version != VERSION {
            return Err(format!(
                "payload version {} (expected {VERSION})",
                p.version
            ));
        }
        if p.host != host {
            return Err(format!("made for host `{}`, this is `{host}`", p.host));
        }
        let mut map = HashMap::with_capacity(p.entries.len());
        for e in p.entries {
            let d = match PbVerdict::try_from(e.verdict) {
                Ok(PbVerdict::Allow) => Decision::Allow,
                Ok(PbVerdict::Deny) => Decision::Deny,
                _ => continue,
            };
            map.insert((hex::encode(&e.sha256), e.user), d);
        }
        let v = Self {
            host: p.host,
            generation: p.generation,
            issued_at_ms: p.issued_at_ms,
            expires_at_ms: p.expires_at_ms,
            map,
        };
        v.check_fresh(now_ms)?;
        Ok(v)
    }

    /// `Err` (why) if the bundle has expired at `now_ms`.
    pub fn check_fresh(&self, now_ms: i64) -> Result<(), String> {
        if now_ms >= self.expires_at_ms {
            return Err(format!(
                "expired (valid until {} ms since the epoch)",
                self.expires_at_ms
            ));
        }
        Ok(())
    }

    /// The verdict for `sha256` (hex) run by `user`, if the bundle has one.
    pub fn get(&self, sha256: &str, user: &str) -> Option<Decision> {
        self.map.get(&(sha256.to_owned(), user.to_owned())).copied()
    }

    /// Verdicts held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds no verdict.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Whether the certificate's subject carries exactly the signer's OU.
fn signer_ou_ok(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let mut ous = cert
        .subject()
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok());
    ous.next() == Some(SIGNER_OU) && ous.next().is_none()
}

/// Reads and verifies `dir/bundle.signed`: `Ok(None)` if there is none,
/// `Err(why)` if it must not be used.
pub fn load(
    dir: &Path,
    ca: &CertificateDer<'_>,
    host: &str,
    now_ms: i64,
) -> Result<Option<Verified>, String> {
    let path = dir.join(SIGNED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let signed = SignedBundle::decode(bytes.as_slice())
        .map_err(|e| format!("{}: unreadable ({e})", path.display()))?;
    Verified::verify(&signed, ca, host, now_ms)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Stores `signed` (already verified) as `dir/bundle.signed`, atomically, 0600.
pub fn store(dir: &Path, signed: &SignedBundle) -> Result<(), LinkError> {
    write_atomic(&dir.join(SIGNED_FILE), &signed.encode_to_vec(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    use rustls::pki_types::PrivateKeyDer;
    use trustbind_api::pb::BundleVerdict;

    const NOW: i64 = 1_800_000_000_000;
    const HOUR: i64 = 3_600_000;

    /// A CA and a server certificate with its key, as the appliance has.
    struct Appliance {
        ca_der: CertificateDer<'static>,
        signer_pem: String,
        key: KeyPair,
    }

    fn appliance(ou: &str) -> Appliance {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["appliance".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "appliance");
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = p.signed_by(&key, &issuer).unwrap();
        Appliance {
            ca_der: ca_cert.der().clone(),
            signer_pem: cert.pem(),
            key,
        }
    }

    fn payload(host: &str, expires_at_ms: i64) -> BundlePayload {
        BundlePayload {
            version: 1,
            host: host.into(),
            generation: 7,
            issued_at_ms: NOW - HOUR,
            expires_at_ms,
            entries: vec![
                BundleVerdict {
                    sha256: vec![0x11; 32],
                    user: "alice".into(),
                    verdict: PbVerdict::Allow as i32,
                },
                BundleVerdict {
                    sha256: vec![0x22; 32],
                    user: "alice".into(),
                    verdict: PbVerdict::Deny as i32,
                },
            ],
        }
    }

    /// Signs as the appliance does (rustls signer over the server key).
    fn sign(a: &Appliance, p: &BundlePayload) -> SignedBundle {
        let der = PrivateKeyDer::try_from(a.key.serialize_der()).unwrap();
        let key = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        let signer = key
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        let payload = p.encode_to_vec();
        SignedBundle {
            signature: signer.sign(&payload).unwrap(),
            payload,
            signer_cert_pem: a.signer_pem.clone(),
        }
    }

    #[test]
    fn a_good_bundle_is_used_and_survives_a_restart() {
        let a = appliance(SIGNER_OU);
        let s = sign(&a, &payload("web1", NOW + HOUR));
        let v = Verified::verify(&s, &a.ca_der, "web1", NOW).unwrap();
        assert_eq!(v.get(&"11".repeat(32), "alice"), Some(Decision::Allow));
        assert_eq!(v.get(&"22".repeat(32), "alice"), Some(Decision::Deny));
        assert_eq!(v.get(&"11".repeat(32), "bob"), None);
        assert_eq!((v.generation, v.len()), (7, 2));
        let d = tempfile::tempdir().unwrap();
        store(d.path(), &s).unwrap();
        let again = load(d.path(), &a.ca_der, "web1", NOW).unwrap().unwrap();
        assert_eq!(again, v);
        assert!(
            load(tempfile::tempdir().unwrap().path(), &a.ca_der, "web1", NOW)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn one_flipped_byte_anywhere_in_the_payload_is_refused() {
        let a = appliance(SIGNER_OU);
        let s = sign(&a, &payload("web1", NOW + HOUR));
        for i in 0..s.payload.len() {
            let mut t = s.clone();
            t.payload[i] ^= 0x01;
            let e = Verified::verify(&t, &a.ca_der, "web1", NOW).unwrap_err();
            assert!(e.contains("signature does not verify"), "byte {i}: {e}");
        }
        let mut t = s.clone();
        let last = t.signature.len() - 1;
        t.signature[last] ^= 0x01;
        assert!(Verified::verify(&t, &a.ca_der, "web1", NOW).is_err());
        // On disk too.
        let d = tempfile::tempdir().unwrap();
        store(d.path(), &s).unwrap();
        let p = d.path().join(SIGNED_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        let mid = bytes.len() / 3;
        bytes[mid] ^= 0x01;
        std::fs::write(&p, bytes).unwrap();
        assert!(load(d.path(), &a.ca_der, "web1", NOW).is_err());
    }

    #[test]
    fn a_bundle_for_another_host_is_refused() {
        let a = appliance(SIGNER_OU);
        let s = sign(&a, &payload("web2", NOW + HOUR));
        let e = Verified::verify(&s, &a.ca_der, "web1", NOW).unwrap_err();
        assert!(e.contains("made for host `web2`"), "{e}");
    }

    #[test]
    fn an_expired_bundle_is_refused() {
        let a = appliance(SIGNER_OU);
        let s = sign(&a, &payload("web1", NOW - 1));
        let e = Verified::verify(&s, &a.ca_der, "web1", NOW).unwrap_err();
        assert!(e.contains("expired"), "{e}");
        // And one that expires while held.
        let s = sign(&a, &payload("web1", NOW + 1000));
        let v = Verified::verify(&s, &a.ca_der, "web1", NOW).unwrap();
        assert!(v.check_fresh(NOW + 1000).is_err());
    }

    #[test]
    fn a_bundle_signed_under_another_ca_or_by_a_non_server_is_refused() {
        let a = appliance(SIGNER_OU);
        let other = appliance(SIGNER_OU);
        let s = sign(&other, &payload("web1", NOW + HOUR));
        let e = Verified::verify(&s, &a.ca_der, "web1", NOW).unwrap_err();
        assert!(e.contains("not issued by the pinned CA"), "{e}");
        // Another CA's signer certificate with this bundle's signature.
        let mut t = sign(&a, &payload("web1", NOW + HOUR));
        t.signer_cert_pem = other.signer_pem.clone();
        assert!(Verified::verify(&t, &a.ca_der, "web1", NOW).is_err());
        // Signed by the right CA's certificate of another kind.
        let host = appliance("trustbind-host");
        let s = sign(&host, &payload("web1", NOW + HOUR));
        let e = Verified::verify(&s, &host.ca_der, "web1", NOW).unwrap_err();
        assert!(e.contains("OU"), "{e}");
    }
}
