//! HKDF-SHA256 (RFC 5869) over the caller's HMAC-SHA256: the kernel
//! module's HMAC is the crypto API's `hmac(sha256)`, a test's is a
//! RustCrypto crate. The construction lives here once; the module and
//! the appliance agree on it because both are tested against RFC 5869's
//! vectors and against each other (`ticket::kat`).
//!
//! The caller keys its HMAC (`keyed(key)`) once per key: extract keys
//! one with the salt, every block of an expansion shares one keyed with
//! the pseudorandom key. Its errors are passed through.

/// Bytes of SHA-256's output (HKDF's `HashLen`).
pub const HASH_LEN: usize = 32;
/// Most bytes one expansion yields (RFC 5869 2.3: 255 × `HashLen`).
pub const MAX_OUTPUT: usize = 255 * HASH_LEN;

/// Why a derivation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HkdfError<E> {
    /// More than [`MAX_OUTPUT`] bytes were asked for.
    TooLong,
    /// The HMAC failed.
    Mac(E),
}

/// HMAC-SHA256 under one key, as the caller provides it.
pub trait Mac {
    type Error;
    /// The MAC of the concatenation of `parts`.
    fn mac(&self, parts: &[&[u8]]) -> Result<[u8; HASH_LEN], Self::Error>;
}

/// RFC 5869 2.2: the pseudorandom key of `ikm` with `salt` (an empty salt
/// is HMAC's all-zero key, as the RFC's absent salt).
pub fn extract<M: Mac>(
    keyed: impl FnOnce(&[u8]) -> Result<M, M::Error>,
    salt: &[u8],
    ikm: &[u8],
) -> Result<[u8; HASH_LEN], M::Error> {
    keyed(salt)?.mac(&[ikm])
}

/// RFC 5869 2.3: fills `out` from `info` with `prk`, the HMAC keyed with
/// the pseudorandom key.
pub fn expand<M: Mac>(prk: &M, info: &[u8], out: &mut [u8]) -> Result<(), HkdfError<M::Error>> {
    if out.len() > MAX_OUTPUT {
        return Err(HkdfError::TooLong);
    }
    let mut t = [0u8; HASH_LEN];
    let mut t_len = 0;
    let mut r = Ok(());
    for (i, chunk) in out.chunks_mut(HASH_LEN).enumerate() {
        // CAST: at most 255 chunks (checked above), counted from 1.
        let counter = [(i + 1) as u8];
        match prk.mac(&[t.get(..t_len).unwrap_or_default(), info, &counter]) {
            Ok(next) => t = next,
            Err(e) => {
                r = Err(HkdfError::Mac(e));
                break;
            }
        }
        t_len = HASH_LEN;
        for (o, b) in chunk.iter_mut().zip(t.iter()) {
            *o = *b;
        }
    }
    wipe(&mut t);
    if r.is_err() {
        wipe(out);
    }
    r
}

/// Extract, then expand into `out`: HKDF-SHA256 of `ikm` with `salt` and
/// `info`, with HMACs `keyed` makes. The pseudorandom key is wiped before
/// returning.
pub fn derive<M: Mac>(
    mut keyed: impl FnMut(&[u8]) -> Result<M, M::Error>,
    salt: &[u8],
    ikm: &[u8],
    info: &[u8],
    out: &mut [u8],
) -> Result<(), HkdfError<M::Error>> {
    let mut prk = extract(&mut keyed, salt, ikm).map_err(HkdfError::Mac)?;
    let r = keyed(&prk)
        .map_err(HkdfError::Mac)
        .and_then(|m| expand(&m, info, out));
    wipe(&mut prk);
    r
}

/// Overwrites key material; `black_box` keeps the stores from being
/// dropped as dead.
pub fn wipe(b: &mut [u8]) {
    b.fill(0);
    core::hint::black_box(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use proptest::prelude::*;
    use sha2::Sha256;

    /// RustCrypto's HMAC-SHA256; `fail_at` makes its n-th MAC (from 1)
    /// fail.
    struct Rc {
        key: Hmac<Sha256>,
        fail_at: Option<usize>,
        calls: core::cell::Cell<usize>,
    }

    impl super::Mac for Rc {
        type Error = usize;
        fn mac(&self, parts: &[&[u8]]) -> Result<[u8; HASH_LEN], usize> {
            self.calls.set(self.calls.get() + 1);
            if self.fail_at == Some(self.calls.get()) {
                return Err(self.calls.get());
            }
            let mut m = self.key.clone();
            for p in parts {
                m.update(p);
            }
            Ok(m.finalize().into_bytes().into())
        }
    }

    fn mac(key: &[u8]) -> Result<Rc, usize> {
        Ok(Rc {
            key: <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| 0usize)?,
            fail_at: None,
            calls: core::cell::Cell::new(0),
        })
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 5869 appendix A.1–A.3 (the SHA-256 cases).
    #[test]
    fn rfc5869_vectors() {
        let cases = [
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "000102030405060708090a0b0c",
                "f0f1f2f3f4f5f6f7f8f9",
                "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
                "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
            ),
            (
                "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                 202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\
                 404142434445464748494a4b4c4d4e4f",
                "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f\
                 808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\
                 a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
                "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf\
                 d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef\
                 f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
                "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
                "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
                 59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
                 cc30c58179ec3e87c14c01d5c1f3434f1d87",
            ),
            (
                "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
                "",
                "",
                "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
                "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
            ),
        ];
        for (ikm, salt, info, prk, okm) in cases {
            let (ikm, salt, info) = (hex(ikm), hex(salt), hex(info));
            let got = extract(mac, &salt, &ikm).unwrap();
            assert_eq!(got.to_vec(), hex(prk));
            let want = hex(okm);
            let mut out = vec![0u8; want.len()];
            expand(&mac(&got).unwrap(), &info, &mut out).unwrap();
            assert_eq!(out, want);
            let mut again = vec![0u8; want.len()];
            derive(mac, &salt, &ikm, &info, &mut again).unwrap();
            assert_eq!(again, want);
        }
    }

    #[test]
    fn too_long_and_failing_macs_are_refused_and_leave_nothing() {
        let prk = mac(&[1u8; HASH_LEN]).unwrap();
        let mut big = vec![0u8; MAX_OUTPUT + 1];
        assert_eq!(expand(&prk, b"", &mut big), Err(HkdfError::TooLong));
        let mut exactly = vec![0u8; MAX_OUTPUT];
        assert_eq!(expand(&prk, b"", &mut exactly), Ok(()));
        // A MAC that fails on its second call: nothing of the first block
        // is left in the output.
        let flaky = Rc {
            fail_at: Some(2),
            ..mac(&[1u8; HASH_LEN]).unwrap()
        };
        let mut out = [0xaau8; 64];
        assert_eq!(expand(&flaky, b"x", &mut out), Err(HkdfError::Mac(2)));
        assert_eq!(out, [0u8; 64]);
    }

    proptest! {
        /// The same bytes as the `hkdf` crate, the appliance's HKDF.
        #[test]
        fn agrees_with_the_hkdf_crate(
            salt in proptest::collection::vec(any::<u8>(), 0..80),
            ikm in proptest::collection::vec(any::<u8>(), 0..80),
            info in proptest::collection::vec(any::<u8>(), 0..80),
            len in 0usize..200,
        ) {
            let mut ours = vec![0u8; len];
            derive(mac, &salt, &ikm, &info, &mut ours).unwrap();
            let mut theirs = vec![0u8; len];
            hkdf::Hkdf::<Sha256>::new(Some(&salt), &ikm).expand(&info, &mut theirs).unwrap();
            prop_assert_eq!(ours, theirs);
        }
    }
}
