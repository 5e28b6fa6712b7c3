//! The operator's HTTP endpoints: `GET /metrics` on `--metrics-address`, and `GET /healthz`,
//! `GET /readyz` on `--health-address`.
//!
//! - `/healthz` (liveness) answers 200 while the process runs: it reads no API server and no
//!   leadership, so an API server outage or a lost Lease never restarts the pod.
//! - `/readyz` answers 200 when the watch caches have synced and this replica leads, or when
//!   it is a standby that has read the Lease within the lease duration (see [`Role`]); 503
//!   with a one-line reason otherwise, also while the process waits for the API server or for
//!   its CRDs at startup.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// This replica's part in leader election, as the leader wiring reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// No leader election (`--leader-elect` off): the only replica, and so the leader.
    Single,
    /// Holds the Lease and runs the controllers.
    Leader,
    /// Does not hold the Lease, and has read it within the lease duration: ready to take over.
    Standby,
    /// Leader election has not read the Lease recently (just started, or the API server is out
    /// of reach): not ready.
    Electing,
}

impl Role {
    fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Leader,
            2 => Role::Standby,
            3 => Role::Electing,
            _ => Role::Single,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Role::Single => 0,
            Role::Leader => 1,
            Role::Standby => 2,
            Role::Electing => 3,
        }
    }
}

/// Readiness state, shared (atomics) between the controllers, the leader wiring and the
/// health server. Cheap to clone; clones share the state.
#[derive(Clone, Debug, Default)]
pub struct Health(Arc<HealthInner>);

#[derive(Debug, Default)]
struct HealthInner {
    synced: AtomicBool,
    role: AtomicU8,
    /// Why the process cannot start its controllers yet (the API server out of reach, a CRD
    /// missing, a request refused).
    waiting: Mutex<Option<String>>,
}

impl Health {
    /// Whether every watch stream of the running controllers has delivered its first complete
    /// list (set by `controller::run`; cleared when the controllers stop).
    pub fn set_synced(&self, synced: bool) {
        self.0.synced.store(synced, Ordering::SeqCst);
    }

    pub fn synced(&self) -> bool {
        self.0.synced.load(Ordering::SeqCst)
    }

    /// Set by the leader wiring; [`Role::Single`] (the default) without leader election.
    pub fn set_role(&self, role: Role) {
        self.0.role.store(role.as_u8(), Ordering::SeqCst);
    }

    pub fn role(&self) -> Role {
        Role::from_u8(self.0.role.load(Ordering::SeqCst))
    }

    /// Set while the process waits at startup for the API server or its CRDs: `/readyz`
    /// answers 503 with `why`. `None` once it can start.
    pub fn set_waiting(&self, why: Option<String>) {
        *self.0.waiting.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// `Ok` with a one-line description when ready, `Err` with the reason when not.
    pub fn readiness(&self) -> Result<String, String> {
        if let Some(why) = self
            .0
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(format!("waiting at startup: {why}"));
        }
        match self.role() {
            Role::Single | Role::Leader if self.synced() => Ok("ok: caches synced".into()),
            Role::Single | Role::Leader => Err("caches not synced yet".into()),
            Role::Standby => Ok("ok: standby, the Lease was read within the lease duration".into()),
            Role::Electing => {
                Err("leader election has not read the Lease within the lease duration".into())
            }
        }
    }
}

/// `GET /metrics`.
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                    metrics.encode(),
                )
            }
        }),
    )
}

/// `GET /healthz` and `GET /readyz`.
pub fn health_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.readiness() {
                        Ok(msg) => (StatusCode::OK, format!("{msg}\n")),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        )
}

/// Binds `address` (`host:port`; port 0 picks a free port), or `None` for `0` (disabled).
pub async fn bind(address: &str) -> std::io::Result<Option<TcpListener>> {
    let address = address.trim();
    if address.is_empty() || address == "0" {
        return Ok(None);
    }
    TcpListener::bind(address).await.map(Some)
}

/// Serves `router` on `listener` until `shutdown` resolves (in-flight requests finish).
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(server = name, error = %e, "HTTP server failed");
    }
}

/// The metrics and health servers of one process, running until [`Servers::stop`].
pub struct Servers {
    /// Bound addresses (after port 0 was resolved); `None` when disabled.
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Servers {
    /// Binds and starts both servers, logging each bound address. A bind failure is an error
    /// (a busy port must not go unnoticed).
    pub async fn start(
        metrics_address: &str,
        health_address: &str,
        metrics: Metrics,
        health: Health,
    ) -> std::io::Result<Servers> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = Servers {
            metrics: None,
            health: None,
            stop,
            tasks: Vec::new(),
        };
        let until = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        if let Some(listener) = bind(metrics_address).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("--metrics-address {metrics_address}: {e}"),
            )
        })? {
            let address = listener.local_addr()?;
            info!(%address, "metrics server listening");
            servers.metrics = Some(address);
            servers.tasks.push(tokio::spawn(serve(
                "metrics",
                listener,
                metrics_router(metrics),
                until(),
            )));
        }
        if let Some(listener) = bind(health_address).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("--health-address {health_address}: {e}"))
        })? {
            let address = listener.local_addr()?;
            info!(%address, "health server listening");
            servers.health = Some(address);
            servers.tasks.push(tokio::spawn(serve(
                "health",
                listener,
                health_router(health),
                until(),
            )));
        }
        Ok(servers)
    }

    /// Stops both servers (in-flight requests finish) and waits for them.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_sync_and_role() {
        let h = Health::default();
        assert_eq!(h.role(), Role::Single);
        assert_eq!(h.readiness(), Err("caches not synced yet".to_string()));
        h.set_synced(true);
        assert!(h.readiness().is_ok());
        h.set_role(Role::Electing);
        assert!(h.readiness().is_err());
        h.set_role(Role::Standby);
        h.set_synced(false);
        assert!(h.readiness().is_ok(), "a standby runs no caches");
        h.set_role(Role::Leader);
        assert!(h.readiness().is_err());
        h.set_synced(true);
        assert!(h.readiness().is_ok());
        // Waiting at startup (the API server out of reach) is never ready, whatever else holds.
        h.set_waiting(Some(
            "cannot list provisioningkeys.keyward.dev: connection refused".into(),
        ));
        assert_eq!(
            h.readiness(),
            Err(
                "waiting at startup: cannot list provisioningkeys.keyward.dev: connection refused"
                    .to_string()
            )
        );
        h.set_waiting(None);
        assert!(h.readiness().is_ok());
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Metrics::new(&crate::client::RequestStats::default());
        let health = Health::default();
        let servers = Servers::start("127.0.0.1:0", "127.0.0.1:0", metrics, health.clone())
            .await
            .expect("bind");
        let (m, h) = (servers.metrics.expect("on"), servers.health.expect("on"));
        let http = reqwest::Client::new();
        let get = |addr: SocketAddr, path: &str| {
            let req = http.get(format!("http://{addr}{path}"));
            async move {
                let r = req.send().await.expect("request");
                let status = r.status().as_u16();
                (status, r.text().await.expect("body"))
            }
        };
        let (status, body) = get(m, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("keyward_build_info{version=\""), "{body}");
        assert_eq!(get(h, "/healthz").await.0, 200);
        assert_eq!(
            get(h, "/readyz").await,
            (503, "caches not synced yet\n".into())
        );
        health.set_synced(true);
        assert_eq!(get(h, "/readyz").await.0, 200);
        assert_eq!(
            get(h, "/metrics").await.0,
            404,
            "metrics only on its own address"
        );
        servers.stop().await;
        assert!(
            http.get(format!("http://{h}/healthz"))
                .send()
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn zero_disables_a_server() {
        let servers = Servers::start(
            "0",
            "127.0.0.1:0",
            Metrics::new(&crate::client::RequestStats::default()),
            Health::default(),
        )
        .await
        .expect("bind");
        assert!(servers.metrics.is_none() && servers.health.is_some());
        servers.stop().await;
    }
}
