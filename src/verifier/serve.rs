//! The verifier's HTTP/1 server, hardened as an edge: a cap on open connections (a connection
//! over it is closed at once and counted), and a deadline for a request's headers that also
//! bounds how long an idle keep-alive connection is kept (hyper starts the same timer when a
//! connection waits for its next request), so a slow or silent client (slowloris) holds a
//! connection slot for at most that long. `axum::serve` has neither: it sets no timer, so
//! hyper's header timeout never fires.
//!
//! With TLS (`--tls-cert-file`), the handshake runs inside the connection's slot and under the
//! same deadline: it must finish within the header-read timeout, and the first request's head
//! must arrive within what is left of it. A client that opens TCP and never completes the
//! handshake is closed at the header-read timeout, like a silent plain-HTTP client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::stats::Stats;

/// Default of `--max-connections`: well above a proxy's keep-alive pool, far below the
/// process's file limit.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Default of `--header-read-timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// How long open requests may finish after shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(10);
/// Largest request head read (request line and headers); a larger one is answered 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields of one request.
pub const MAX_HEADERS: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A request's head must arrive within this after the connection opens or goes idle.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS as usize,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` (over TLS with `tls`, else plain HTTP) until `shutdown`, then
/// lets open requests finish for at most [`DRAIN`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE, ECONNABORTED, ...: the listener itself is fine; back off a little
                    // so a full file table does not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.connection_refused();
            debug!("connection refused: --max-connections are open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut closing = closing_rx.clone();
        let stats = stats.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            stats.connection_opened();
            let deadline = tokio::time::Instant::now() + limits.header_read_timeout;
            match tls {
                None => {
                    http1_connection(stream, service, limits.header_read_timeout, &mut closing)
                        .await;
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout_at(deadline, acceptor.accept(stream));
                    let stream = tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => Some(stream),
                            Ok(Err(e)) => {
                                stats.tls_handshake_failed("error");
                                debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                stats.tls_handshake_failed("timeout");
                                debug!("TLS handshake not done within --header-read-timeout");
                                None
                            }
                        },
                        Ok(()) = closing.changed() => None,
                    };
                    // The first request's head gets what is left of the deadline.
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if let Some(stream) = stream.filter(|_| !left.is_zero()) {
                        http1_connection(stream, service, left, &mut closing).await;
                    }
                }
            }
            stats.connection_closed();
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "connections still open after the drain; closing them"
        );
        connections.abort_all();
    }
    Ok(())
}

/// Serves one connection with hyper's HTTP/1 until it ends or `closing` turns, then shuts it
/// down gracefully.
async fn http1_connection<S, T>(
    stream: T,
    service: S,
    header_read_timeout: Duration,
    closing: &mut tokio::sync::watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: 'static + Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    <S::ResBody as hyper::body::Body>::Data: Send,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        Ok(()) = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.as_mut().await;
        }
    }
}
