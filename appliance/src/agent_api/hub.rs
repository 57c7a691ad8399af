//! Per-host push streams.
//!
//! Every `Subscribe` call registers a sender here under the host name from
//! its certificate; [`Hub::push`] delivers to that host's streams,
//! [`Hub::broadcast`] to all, [`Hub::revoke`] sends `Revoked` and ends the
//! host's streams.
//!
//! A push is never dropped silently: a stream whose agent has
//! [`STREAM_BUFFER`] pushes unread gets a last RESOURCE_EXHAUSTED status
//! (in a slot kept for it) and is ended; the agent reconnects and
//! `Subscribe` resynchronises it (mode, generation, peers).
//!
//! A stream whose agent named its module's session (`Hello.module_session`)
//! has an [`OrderSeal`]: every `HostMode` and `Peers` push to it carries
//! its own sealed order (`module_order`), sealed for that session when it
//! is queued.
//!
//! Key bytes of a pushed `ChannelKey` (T-84): the caller's message is wiped
//! once queued; each stream's copy is wiped by the codec once encoded
//! (`trustbind_api::codec`), or, if the stream ends before it is sent, when
//! the stream is dropped ([`Pushes`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tonic::Status;

use std::net::IpAddr;
use std::sync::Arc;

use super::pb::{push, Peers, Push, Revoked};
use crate::hostaddr::Observed;
use crate::seal::{wipe_push, OrderSeal};

/// Pushes buffered per stream; a stream that falls this far behind is
/// ended (with a status saying so) for the agent to resynchronise.
pub const STREAM_BUFFER: usize = 256;

type Item = Result<Push, Status>;
type Tx = mpsc::Sender<Item>;

/// One open push stream.
#[derive(Debug)]
struct Stream {
    tx: Tx,
    /// Its module session's orders, when the agent named one.
    seal: Option<Arc<OrderSeal>>,
}

/// `msg` as stream `seal` gets it: with its sealed order when it is one.
fn for_stream(seal: Option<&OrderSeal>, msg: &push::Kind) -> push::Kind {
    seal.and_then(|s| s.seal_push(msg))
        .unwrap_or_else(|| msg.clone())
}

/// The receiving end of one push stream, as the `Subscribe` response
/// streams it. Dropped (the agent went away, the hub ended the stream) it
/// wipes the key bytes of the pushes still queued.
#[derive(Debug)]
pub struct Pushes(mpsc::Receiver<Item>);

impl Pushes {
    /// The next push, `None` once the stream is ended and empty.
    pub async fn recv(&mut self) -> Option<Item> {
        self.0.recv().await
    }

    /// Ends the stream and takes what it still holds, key bytes wiped.
    fn drain(&mut self) -> Vec<Item> {
        self.0.close();
        let mut out = Vec::new();
        while let Ok(mut item) = self.0.try_recv() {
            if let Ok(Push { kind: Some(k) }) = &mut item {
                wipe_push(k);
            }
            out.push(item);
        }
        out
    }
}

impl tokio_stream::Stream for Pushes {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        self.0.poll_recv(cx)
    }
}

impl Drop for Pushes {
    fn drop(&mut self) {
        self.drain();
    }
}

/// Most protected-host addresses remembered (the module takes as many).
pub const MAX_PEERS: usize = 256;

/// Queues `msg` on the stream `t`: `true` if it took it. A closed stream
/// is `false`; a stream with [`STREAM_BUFFER`] pushes unread gets the
/// status that ends it (in the slot kept for it) and is `false`: the
/// caller drops it from the hub, which ends it after what it holds.
fn offer(s: &Stream, msg: &push::Kind) -> bool {
    let t = &s.tx;
    if t.is_closed() {
        return false;
    }
    if t.capacity() <= 1 {
        crate::metrics::metrics().record_refused("slow_stream");
        tracing::warn!(
            "a push stream has {STREAM_BUFFER} pushes unread: ended for its agent to resynchronise"
        );
        let _ = t.try_send(Err(Status::resource_exhausted(format!(
            "this push stream fell {STREAM_BUFFER} pushes behind and was ended; reconnect to resynchronise"
        ))));
        return false;
    }
    t.try_send(Ok(Push {
        kind: Some(for_stream(s.seal.as_deref(), msg)),
    }))
    .is_ok()
}

/// Host name -> open push streams.
#[derive(Debug, Default)]
pub struct Hub {
    streams: Mutex<HashMap<String, Vec<Stream>>>,
    /// Addresses protected hosts subscribed from, oldest first.
    peers: Mutex<Vec<IpAddr>>,
    /// The addresses each host's agent calls from (channel binding).
    addrs: Observed,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream for `host` whose first messages are `first`, its
    /// orders sealed with `seal` if given; returns a weak sender (for
    /// keepalives: it stops working once the hub drops the stream) and the
    /// receiver.
    pub(crate) fn subscribe(
        &self,
        host: &str,
        first: Vec<push::Kind>,
        seal: Option<Arc<OrderSeal>>,
    ) -> (mpsc::WeakSender<Item>, Pushes) {
        // One slot more than the buffer: the status that ends a slow stream.
        let (tx, rx) = mpsc::channel(STREAM_BUFFER + 1);
        for kind in first {
            let kind = for_stream(seal.as_deref(), &kind);
            let _ = tx.try_send(Ok(Push { kind: Some(kind) }));
        }
        let weak = tx.downgrade();
        if let Ok(mut m) = self.streams.lock() {
            let v = m.entry(host.to_owned()).or_default();
            v.retain(|s| !s.tx.is_closed());
            v.push(Stream { tx, seal });
        }
        (weak, Pushes(rx))
    }

    /// The addresses hosts' agents call from, as the agent port saw them.
    pub fn addrs(&self) -> &Observed {
        &self.addrs
    }

    /// Remembers that a protected host's agent connects from `addr`
    /// (IPv4-mapped IPv6 as IPv4); `true` if that is new. Past
    /// [`MAX_PEERS`] the oldest address is forgotten.
    pub fn note_peer(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        let Ok(mut p) = self.peers.lock() else {
            return false;
        };
        if p.contains(&addr) {
            return false;
        }
        if p.len() >= MAX_PEERS {
            p.remove(0);
        }
        p.push(addr);
        true
    }

    /// The protected hosts' addresses, as a push.
    pub fn peers(&self) -> push::Kind {
        let addrs = self
            .peers
            .lock()
            .map(|p| p.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        push::Kind::Peers(Peers {
            addrs,
            module_order: Vec::new(),
        })
    }

    /// Sends `msg` to every open stream of `host`. `true` if at least one
    /// stream took it; `false` if the host has no stream or all are full.
    /// Key bytes in `msg` are wiped once queued.
    pub fn push(&self, host: &str, mut msg: push::Kind) -> bool {
        let any = self.push_to(host, &msg);
        wipe_push(&mut msg);
        any
    }

    fn push_to(&self, host: &str, msg: &push::Kind) -> bool {
        let Ok(mut m) = self.streams.lock() else {
            return false;
        };
        let Some(v) = m.get_mut(host) else {
            return false;
        };
        let mut any = false;
        v.retain(|s| {
            let kept = offer(s, msg);
            any |= kept;
            kept
        });
        if v.is_empty() {
            m.remove(host);
        }
        any
    }

    /// Sends `msg` to every open stream; returns how many took it.
    pub fn broadcast(&self, msg: push::Kind) -> usize {
        let Ok(mut m) = self.streams.lock() else {
            return 0;
        };
        let mut n = 0;
        for v in m.values_mut() {
            v.retain(|s| {
                let kept = offer(s, &msg);
                n += usize::from(kept);
                kept
            });
        }
        m.retain(|_, v| !v.is_empty());
        n
    }

    /// Sends `Revoked` to every stream of `host` and ends them.
    pub fn revoke(&self, host: &str) {
        self.addrs.forget(host);
        let Ok(mut m) = self.streams.lock() else {
            return;
        };
        if let Some(v) = m.remove(host) {
            for s in v {
                let _ = s.tx.try_send(Ok(Push {
                    kind: Some(push::Kind::Revoked(Revoked {})),
                }));
            }
        }
    }

    /// Ends every stream (appliance shutdown); agents reconnect later.
    pub fn close_all(&self) {
        if let Ok(mut m) = self.streams.lock() {
            m.clear();
        }
    }

    /// Hosts with an open stream whose agent named no module session on
    /// any of them: their module was loaded without the authority key and
    /// believes its agent (root on those hosts can switch it off).
    pub fn unsealed_hosts(&self) -> Vec<String> {
        self.streams
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| {
                        let open = || v.iter().filter(|s| !s.tx.is_closed());
                        open().next().is_some() && open().all(|s| s.seal.is_none())
                    })
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Hosts with at least one open stream.
    pub fn connected_hosts(&self) -> Vec<String> {
        self.streams
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, v)| v.iter().any(|s| !s.tx.is_closed()))
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent_api::pb::Ping;

    #[tokio::test]
    async fn hosts_whose_module_has_no_session_are_named() {
        let hub = Hub::new();
        let seal = || {
            let key = crate::seal::SessionKey::derive(&[1; 32], &[2; 64]);
            Some(Arc::new(OrderSeal::new(Arc::new(key), 0, true)))
        };
        let (_a, _ra) = hub.subscribe("sealed", vec![], seal());
        let (_b, _rb) = hub.subscribe("open", vec![], None);
        let (_c, rc) = hub.subscribe("gone", vec![], None);
        drop(rc);
        assert_eq!(hub.unsealed_hosts(), vec!["open".to_owned()]);
        let mut all = hub.connected_hosts();
        all.sort();
        assert_eq!(all, vec!["open".to_owned(), "sealed".to_owned()]);
    }

    /// T-84: a key queued for a stream that ends before it is sent is
    /// wiped (what `Drop` does).
    #[tokio::test]
    async fn keys_queued_on_an_ended_stream_are_wiped() {
        use crate::agent_api::pb::ChannelKey;
        let hub = Hub::new();
        let (_weak, mut rx) = hub.subscribe("web1", vec![], None);
        let key = ChannelKey {
            channel_id: 1,
            key: vec![0x5a; 32],
            tx_iv: vec![1; 8],
            tx_salt: vec![2; 4],
            rx_iv: vec![3; 8],
            rx_salt: vec![4; 4],
            module_answer: vec![5; 64],
            ..ChannelKey::default()
        };
        assert!(hub.push("web1", push::Kind::ChannelKey(key.clone())));
        assert!(hub.push("web1", push::Kind::Ping(Ping { at_ms: 1 })));
        let left = rx.drain();
        assert_eq!(left.len(), 2);
        let Ok(Push {
            kind: Some(push::Kind::ChannelKey(k)),
        }) = &left[0]
        else {
            panic!("not the key: {left:?}")
        };
        assert_eq!(k.channel_id, 1);
        assert!(trustbind_api::codec::is_wiped(k), "{k:?}");
    }

    #[tokio::test]
    async fn a_slow_stream_is_ended_with_a_status_never_silently_short() {
        let hub = Hub::new();
        let (_weak, mut rx) = hub.subscribe("web1", vec![], None);
        let ping = |i: i64| push::Kind::Ping(Ping { at_ms: i });
        for i in 0..STREAM_BUFFER {
            assert!(hub.push("web1", ping(i as i64)), "push {i}");
        }
        // One more than the agent has read: the stream is ended, not the
        // push quietly lost.
        let before = crate::metrics::metrics().refused("slow_stream");
        assert!(!hub.push("web1", ping(-1)));
        assert!(crate::metrics::metrics().refused("slow_stream") > before);
        assert!(hub.connected_hosts().is_empty());
        let mut got = 0;
        let mut end = None;
        while let Some(item) = rx.recv().await {
            match item {
                Ok(_) => got += 1,
                Err(st) => end = Some(st),
            }
        }
        assert_eq!(got, STREAM_BUFFER);
        let st = end.expect("the stream must end with a status");
        assert_eq!(st.code(), tonic::Code::ResourceExhausted);
        assert!(st.message().contains("resynchronise"));
        // A host that reads keeps its stream.
        let (_w, mut rx2) = hub.subscribe("web2", vec![], None);
        for i in 0..3 * STREAM_BUFFER {
            assert!(hub.broadcast(ping(i as i64)) >= 1);
            rx2.recv().await.unwrap().unwrap();
        }
    }
}
