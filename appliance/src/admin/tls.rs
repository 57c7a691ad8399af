//! Serving the admin router over TLS with a verified client certificate.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::AdminIdentity;

/// Longest a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The admin name (CN) of the peer's certificate, if it is an admin
/// certificate (subject OU `trustbind-admin`, see [`crate::pki::CertKind`]).
///
/// The chain was already verified by rustls against the server config's
/// client verifier; this only reads the subject, and refuses host and
/// server certificates even if a misconfigured verifier let them through.
pub fn peer_admin_name(conn: &rustls::ServerConnection) -> Option<String> {
    peer_admin(conn).map(|id| id.cn)
}

/// Name and serial of the peer's admin certificate, as for [`peer_admin_name`].
pub fn peer_admin(conn: &rustls::ServerConnection) -> Option<AdminIdentity> {
    let der = conn.peer_certificates()?.first()?;
    let peer = crate::pki::peer_cert(der.as_ref())?;
    (peer.kind == crate::pki::CertKind::Admin).then_some(AdminIdentity {
        cn: peer.name,
        serial: peer.serial,
    })
}

/// Accepts TLS connections on `listener` forever and serves `router` on
/// each, HTTP/1.1 or HTTP/2.
///
/// `tls` must require and verify a client certificate
/// ([`crate::pki::Pki::admin_server_config`]); a connection whose peer
/// certificate is not an admin certificate is closed without a response.
/// The admin's name (CN) is handed to handlers as an [`AdminIdentity`]
/// request extension.
/// Returns only when accepting fails for a reason other than a transient
/// per-connection error.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) -> std::io::Result<()> {
    serve_limited(
        listener,
        tls,
        router,
        Arc::new(crate::agent_api::tls::PortLimits::admin()),
    )
    .await
}

/// [`serve`] admitting connections within `limits` (connections open,
/// handshakes in progress in all and per address, new connections per
/// address: T-77).
pub async fn serve_limited(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: Arc<crate::agent_api::tls::PortLimits>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if is_transient(&e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let Ok(admission) = limits.admit(peer.ip()) else {
            continue;
        };
        let Some(slot) = limits.handshake_slot().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let (_place, handshake) = admission.into_parts();
            let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop((slot, handshake));
            let Ok(Ok(stream)) = hs else {
                return;
            };
            let Some(id) = peer_admin(stream.get_ref().1) else {
                return;
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(id.clone());
                router.clone().oneshot(req.map(Body::new))
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            // A connection error concerns only this client.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) || e.raw_os_error().is_some_and(|c| c == 23 || c == 24) // ENFILE, EMFILE
}
