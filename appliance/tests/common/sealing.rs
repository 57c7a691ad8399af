//! The module's side of sealed records, written from the spec
//! (`trustbind_proto::seal`), not from the appliance's code: its own
//! P-256 session key, the session key `K` derived with the authority key,
//! every seal checked with its own HMAC.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use trustbind_proto::seal::{prefix, session_info};
use trustbind_proto::{self as proto, Record};

pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The module's side of a session, written from the spec
/// (`proto::seal`), not from the appliance's code.
pub struct Module {
    /// Its session public key (`x || y`), for `module_session`.
    pub public: [u8; 64],
    k: [u8; 32],
}

/// What a sealed record holds once its seal checks.
#[derive(Debug)]
pub struct Opened {
    pub request_id: u64,
    pub seq: u64,
    pub inner: Vec<u8>,
}

impl Module {
    /// A module loaded with `authority` (`EnrolReply.authority`).
    pub fn new(authority: &[u8]) -> Self {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        assert_eq!(authority.len(), 64);
        let secret = p256::SecretKey::random(&mut Rng);
        let point = secret.public_key().to_encoded_point(false);
        let public: [u8; 64] = point.as_bytes()[1..].try_into().unwrap();
        let mut sec1 = vec![4u8];
        sec1.extend_from_slice(authority);
        let authority = p256::PublicKey::from_sec1_bytes(&sec1).unwrap();
        let z = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), authority.as_affine());
        let k = hmac(z.raw_secret_bytes(), &[&session_info(&public)]);
        Self { public, k }
    }

    /// Checks the seal of `bytes` (a whole `Sealed` record) for `digest`.
    pub fn open(&self, bytes: &[u8], digest: &[u8; 32]) -> Result<Opened, String> {
        let (h, rec) = proto::decode(bytes).map_err(|e| e.to_string())?;
        let Record::Sealed(s) = rec else {
            return Err(format!("not sealed: {:?}", h.kind));
        };
        if hmac(&self.k, &[&prefix(digest, s.seq), s.inner()]) != s.mac {
            return Err("bad seal".into());
        }
        Ok(Opened {
            request_id: h.request_id,
            seq: s.seq,
            inner: s.inner().to_vec(),
        })
    }
}

/// `rand_core` randomness from the OS, for the module's key.
struct Rng;

impl p256::elliptic_curve::rand_core::RngCore for Rng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        getrandom::getrandom(dest).unwrap();
    }
    fn try_fill_bytes(
        &mut self,
        dest: &mut [u8],
    ) -> Result<(), p256::elliptic_curve::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl p256::elliptic_curve::rand_core::CryptoRng for Rng {}

pub fn digest(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}
