//! TLS glue: a TCP accept loop that runs rustls handshakes off the accept
//! path and yields connections carrying the verified peer certificate, for
//! tonic's `serve_with_incoming`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::pki::{peer_cert, PeerCert};
use crate::ratelimit::{AddrKey, InFlight, InFlightGuard, KeyedLimiter, Rate};
use std::net::IpAddr;

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the agent and enrol ports hold open at once.
pub const MAX_CONNECTIONS: usize = 60_000;
/// Handshakes in progress at once on the agent and enrol ports.
pub const MAX_HANDSHAKES: usize = 256;

/// What one listening port admits (issue 16 item 3): connections open at
/// once, handshakes in progress at once (in all and per address: IPv4, or
/// IPv6 /64), and new connections per address (a token bucket). A
/// connection over a limit is closed at once, before any TLS work, so one
/// unauthenticated address cannot hold the port's handshake slots (T-78)
/// nor its file descriptors (T-77).
#[derive(Debug)]
pub struct PortLimits {
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    handshakes_per_addr: InFlight<AddrKey>,
    new_per_addr: KeyedLimiter<AddrKey>,
    max_connections: usize,
    max_handshakes: usize,
    per_addr: usize,
    new_conns: Rate,
}

/// A connection admitted by [`PortLimits::admit`]: its place among the
/// port's connections (kept while it is open) and its address's handshake
/// slot (given back once the handshake is over).
#[derive(Debug)]
pub struct Admission {
    connection: OwnedSemaphorePermit,
    handshake: InFlightGuard<AddrKey>,
}

impl Admission {
    /// The connection's place (keep it while the connection is open) and
    /// the address's handshake slot (drop it once the handshake is over).
    pub fn into_parts(self) -> (OwnedSemaphorePermit, InFlightGuard<AddrKey>) {
        (self.connection, self.handshake)
    }
}

impl PortLimits {
    /// Limits of the agent and enrolment ports: 60,000 connections (an agent
    /// holds one), 256 handshakes, 16 per address, 64 new connections per
    /// address at once then 16/s.
    pub fn agent() -> Self {
        Self::new(
            MAX_CONNECTIONS,
            MAX_HANDSHAKES,
            16,
            Rate {
                burst: 64.0,
                per_sec: 16.0,
            },
        )
    }

    /// Limits of the admin port: 256 connections, 64 handshakes, 16 per
    /// address, 64 new connections per address at once then 16/s.
    pub fn admin() -> Self {
        Self::admin_with(
            16,
            Rate {
                burst: 64.0,
                per_sec: 16.0,
            },
        )
    }

    /// The admin port's totals (256 connections, 64 handshakes) with these
    /// per-address figures.
    pub fn admin_with(per_addr: usize, new_conns: Rate) -> Self {
        Self::new(256, 64, per_addr, new_conns)
    }

    /// Custom limits.
    pub fn new(connections: usize, handshakes: usize, per_addr: usize, new_conns: Rate) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(connections)),
            handshakes: Arc::new(Semaphore::new(handshakes)),
            handshakes_per_addr: InFlight::new(per_addr),
            new_per_addr: KeyedLimiter::new(new_conns, 65_536, new_conns),
            max_connections: connections,
            max_handshakes: handshakes,
            per_addr,
            new_conns,
        }
    }

    /// Handshakes in progress at once per address.
    pub fn per_address(&self) -> usize {
        self.per_addr
    }

    /// New connections per address.
    pub fn new_connections(&self) -> Rate {
        self.new_conns
    }

    /// Fresh limits with the same figures (for another port).
    pub fn same_figures(&self) -> Self {
        Self::new(
            self.max_connections,
            self.max_handshakes,
            self.per_addr,
            self.new_conns,
        )
    }

    /// Admits a new connection from `ip`, or says why not (the caller
    /// closes it).
    pub fn admit(&self, ip: IpAddr) -> Result<Admission, &'static str> {
        let r = self.admit_inner(ip);
        if r.is_err() {
            crate::metrics::metrics().record_refused("connection");
        }
        r
    }

    fn admit_inner(&self, ip: IpAddr) -> Result<Admission, &'static str> {
        let key = AddrKey::of(ip);
        if self.new_per_addr.check(&key, 1.0).is_err() {
            return Err("too many new connections from this address");
        }
        let connection = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| "the port has all the connections it admits")?;
        let handshake = self
            .handshakes_per_addr
            .try_acquire(key)
            .ok_or("too many handshakes in progress from this address")?;
        Ok(Admission {
            connection,
            handshake,
        })
    }

    /// Waits for a handshake slot of the port.
    pub async fn handshake_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.handshakes).acquire_owned().await.ok()
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
    }
}

/// What handlers learn about the connection, from request extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The verified client certificate, if the port requires one.
    pub peer: Option<PeerCert>,
    /// The client's address.
    pub remote: SocketAddr,
}

/// An accepted, handshaken TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    io: TlsStream<TcpStream>,
    info: ConnInfo,
    /// Its place among the port's connections, given back when it closes.
    _place: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts on `listener`, handshakes with `config` and yields the
/// connections. Failed handshakes (no or refused client certificate, wrong
/// protocol, timeout) are dropped here and never reach tonic. The accept
/// loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    incoming_limited(listener, config, Arc::new(PortLimits::agent()))
}

/// [`incoming`] with `limits`: a connection over them is closed before
/// any TLS work.
pub fn incoming_limited(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: Arc<PortLimits>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let admission = match limits.admit(remote.ip()) {
                Ok(a) => a,
                Err(why) => {
                    tracing::debug!("connection from {remote} closed: {why}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(permit) = limits.handshake_slot().await else {
                break;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (connection, handshake) = admission.into_parts();
                let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop((permit, handshake));
                let Ok(Ok(io)) = hs else {
                    return;
                };
                let peer = io
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| peer_cert(c.as_ref()));
                let conn = TlsConn {
                    io,
                    info: ConnInfo { peer, remote },
                    _place: connection,
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `router` over HTTPS (HTTP/1.1 and HTTP/2) on `listener` with
/// `config` (e.g. [`crate::pki::Pki::admin_server_config`]) until `shutdown`
/// completes. Each request carries the connection's [`ConnInfo`] as an
/// `axum::Extension`, so handlers can read the verified admin name.
pub async fn serve_https(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use tokio_stream::StreamExt as _;
    let mut conns = incoming(listener, config);
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => break,
            c = conns.next() => c,
        };
        let Some(Ok(conn)) = conn else { break };
        let svc = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(axum::Extension(conn.info.clone())),
        );
        tokio::spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(conn), svc)
                .await;
        });
    }
}
