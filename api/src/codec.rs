//! The codec of both gRPC services: prost's encoding, and once a message
//! is encoded, the channel key bytes it carried are wiped (T-84).
//!
//! The appliance pushes channel keys to agents in `Push` messages
//! (`ChannelKey`: key, salts, IVs, the key sealed for the module). The
//! message is handed to tonic by value, which encodes it into the HTTP/2
//! frame and drops it: prost messages have no `Drop` that could wipe them,
//! so without this codec every pushed key's bytes were freed as they were.
//! [`WipingEncoder`] encodes exactly as `tonic_prost::ProstEncoder` and then
//! zeroizes [`Push`]'s key fields ([`wipe_push`]: a `ChannelKey`'s, a
//! `HostKeys` record and its sealed order), a `GrantReply`'s pair secret
//! and a `QualifyReply`'s grants (a result's `GrantReply` and its sealed
//! answer, which holds the pair secret too) before the message is dropped. Decoding is prost's, unchanged (the agent wipes what it
//! receives itself). The encoded frame bytes are tonic's, h2's and
//! rustls's buffers, outside what this crate can wipe.
//!
//! Used through `codec_path` in `build.rs`, for clients and servers alike;
//! the wire format is prost's, byte for byte.

use std::any::Any;
use std::marker::PhantomData;

use prost::bytes::BufMut;
use prost::Message;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;
use zeroize::Zeroize;

use crate::pb::{push, ChannelKey, GrantReply, Push, QualifyReply};

/// Prost's codec, wiping channel keys once encoded.
#[derive(Debug, Clone)]
pub struct WipingCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WipingCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for WipingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = WipingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        WipingEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes `T` as prost does, then wipes its key bytes (a [`Push`]).
#[derive(Debug, Clone)]
pub struct WipingEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message + 'static> Encoder for WipingEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, mut item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_wiping(&mut item, buf)
            .map_err(|e| Status::internal(format!("cannot encode a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Encodes `item` into `buf` as prost does, then wipes its key bytes if it
/// is a [`Push`] (whether or not encoding succeeded).
fn encode_wiping<T: Message + 'static>(
    item: &mut T,
    buf: &mut impl BufMut,
) -> Result<(), prost::EncodeError> {
    let encoded = item.encode(buf);
    wipe_any(item);
    encoded
}

/// Wipes `item`'s key bytes if it is a [`Push`].
fn wipe_any<T: 'static>(item: &mut T) {
    let any = item as &mut dyn Any;
    if let Some(p) = any.downcast_mut::<Push>() {
        if let Some(k) = p.kind.as_mut() {
            wipe_push(k);
        }
    } else if let Some(g) = any.downcast_mut::<GrantReply>() {
        g.pair_secret.zeroize();
    } else if let Some(q) = any.downcast_mut::<QualifyReply>() {
        q.results.iter_mut().for_each(wipe_result);
    }
}

/// Wipes a `Qualify` result's grant: its pair secret, and the sealed
/// answer (a sealed `Grant` record carries the pair secret; a sealed
/// verdict holds nothing secret, wiped all the same).
pub fn wipe_result(r: &mut crate::pb::Result) {
    if let Some(g) = r.grant.as_mut() {
        g.pair_secret.zeroize();
    }
    r.module_answer.zeroize();
}

/// Wipes the key bytes of a pushed message (a `ChannelKey`, `HostKeys`).
pub fn wipe_push(msg: &mut push::Kind) {
    match msg {
        push::Kind::ChannelKey(k) => wipe_channel_key(k),
        push::Kind::HostKeys(k) => {
            k.record.zeroize();
            k.module_order.zeroize();
        }
        _ => {}
    }
}

/// Wipes the key bytes of `k` (and its sealed copy), leaving them empty.
pub fn wipe_channel_key(k: &mut ChannelKey) {
    k.key.zeroize();
    k.tx_salt.zeroize();
    k.tx_iv.zeroize();
    k.rx_salt.zeroize();
    k.rx_iv.zeroize();
    k.module_answer.zeroize();
}

/// Whether `k` holds no key bytes (wiped, or never given any).
pub fn is_wiped(k: &ChannelKey) -> bool {
    [
        &k.key,
        &k.tx_iv,
        &k.tx_salt,
        &k.rx_iv,
        &k.rx_salt,
        &k.module_answer,
    ]
    .iter()
    .all(|f| f.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::Ping;

    fn key_push() -> Push {
        Push {
            kind: Some(push::Kind::ChannelKey(ChannelKey {
                channel_id: 7,
                key_id: "ab".repeat(16),
                key: vec![0x11; 32],
                tx_iv: vec![0x22; 8],
                tx_salt: vec![0x33; 4],
                rx_iv: vec![0x44; 8],
                rx_salt: vec![0x55; 4],
                role: 1,
                tls12: false,
                idle_timeout_s: 0,
                module_answer: vec![0x66; 100],
            })),
        }
    }

    #[test]
    fn a_pushed_key_is_wiped_once_encoded_and_encodes_as_prost_does() {
        let mut item = key_push();
        let want = item.encode_to_vec();
        // What the encoder does with the item it owns, into a plain buffer
        // instead of tonic's.
        let mut out = Vec::new();
        encode_wiping(&mut item, &mut out).unwrap();
        assert_eq!(out, want, "the wire format is prost's");
        let Some(push::Kind::ChannelKey(k)) = &item.kind else {
            panic!("not a key")
        };
        assert!(is_wiped(k), "{k:?}");
        // The id and the rest stay: only key bytes are wiped.
        assert_eq!((k.channel_id, k.key_id.len()), (7, 32));
        // Other messages are left alone.
        let mut ping = Push {
            kind: Some(push::Kind::Ping(Ping { at_ms: 5 })),
        };
        encode_wiping(&mut ping, &mut Vec::new()).unwrap();
        assert_eq!(ping.kind, Some(push::Kind::Ping(Ping { at_ms: 5 })));
        let mut other = ChannelKey {
            key: vec![1; 32],
            ..ChannelKey::default()
        };
        encode_wiping(&mut other, &mut Vec::new()).unwrap();
        assert_eq!(other.key, vec![1; 32], "only Push is wiped by the codec");
    }

    #[test]
    fn host_keys_and_a_grants_pair_secret_are_wiped_once_encoded() {
        let mut keys = Push {
            kind: Some(push::Kind::HostKeys(crate::pb::HostKeys {
                record: vec![9; 88],
                epoch: 3,
                module_order: vec![8; 150],
            })),
        };
        let want = keys.encode_to_vec();
        let mut out = Vec::new();
        encode_wiping(&mut keys, &mut out).unwrap();
        assert_eq!(out, want);
        let Some(push::Kind::HostKeys(k)) = &keys.kind else {
            panic!("not host keys")
        };
        assert!(
            k.record.is_empty() && k.module_order.is_empty() && k.epoch == 3,
            "{k:?}"
        );
        let mut g = GrantReply {
            granted: true,
            pair_secret: vec![7; 32],
            ticket: vec![1; 10],
            ..GrantReply::default()
        };
        encode_wiping(&mut g, &mut Vec::new()).unwrap();
        assert!(g.pair_secret.is_empty());
        assert_eq!(g.ticket, vec![1; 10], "only the secret is wiped");
        let mut q = QualifyReply {
            results: vec![crate::pb::Result {
                id: 4,
                module_answer: vec![6; 700],
                grant: Some(GrantReply {
                    pair_secret: vec![7; 32],
                    ticket: vec![1; 10],
                    ..GrantReply::default()
                }),
                ..crate::pb::Result::default()
            }],
        };
        let want = q.encode_to_vec();
        let mut out = Vec::new();
        encode_wiping(&mut q, &mut out).unwrap();
        assert_eq!(out, want);
        let r = &q.results[0];
        let g = r.grant.as_ref().unwrap();
        assert!(r.module_answer.is_empty() && g.pair_secret.is_empty());
        assert_eq!((r.id, &g.ticket[..]), (4, &[1u8; 10][..]));
    }
}
