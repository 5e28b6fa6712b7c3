//! An OPA-like agent for the stand-in kubelet: what runs in every agent pod.
//!
//! - Downloads `GET <server>/bundles/authz.tar.gz` every 300-500 ms (a random delay, like
//!   OPA's `polling.min_delay_seconds`/`max_delay_seconds`) with `Authorization: Bearer
//!   <token>`, the token read from the `token` file of its Secret volume before EVERY request,
//!   as OPA's `credentials.bearer.token_path` does. It also sends its pod's name and uid.
//! - Serves `GET /health?bundles=true` on `<pod IP>:8181`.
//!
//! Health is deliberately STRICTER than OPA's: OPA answers 200 once every bundle activated
//! once (and, with `persist: true`, even from disk), so a pod that lost its credential stays
//! healthy. This agent answers 200 only while its MOST RECENT download attempt succeeded
//! (500 before the first attempt and after any failed one), so the operator's connectivity
//! check reflects whether the control plane accepts the key the pod presents right now.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use futures::FutureExt;
use futures::future::BoxFuture;
use keyward_testbed::{AgentFactory, PodInfo};
use rand::Rng;

use super::bundle_server::{POD_NAME, POD_UID};

/// OPA's default port.
pub const PORT: u16 = 8181;

/// The agent factory.
#[derive(Clone, Debug)]
pub struct OpaAgent {
    /// Bundle service URL, e.g. `http://127.0.0.1:40123`.
    server: String,
    /// The pod volume holding the agent Secret.
    volume: String,
}

impl OpaAgent {
    pub fn new(server: impl Into<String>, volume: impl Into<String>) -> Self {
        OpaAgent {
            server: server.into(),
            volume: volume.into(),
        }
    }
}

struct Health {
    ok: AtomicBool,
}

async fn health(State(h): State<Arc<Health>>) -> impl IntoResponse {
    if h.ok.load(Ordering::SeqCst) {
        (StatusCode::OK, "{}\n")
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"code\":\"internal_error\",\"message\":\"last bundle download failed\"}\n",
        )
    }
}

async fn poll(pod: PodInfo, token_file: PathBuf, url: String, health: Arc<Health>) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("[e2e] agent {}: no HTTP client: {e}", pod.name);
            return;
        }
    };
    loop {
        let ok = match tokio::fs::read_to_string(&token_file).await {
            Ok(token) => http
                .get(&url)
                .bearer_auth(token.trim())
                .header(POD_NAME, &pod.name)
                .header(POD_UID, &pod.uid)
                .send()
                .await
                .is_ok_and(|r| r.status() == reqwest::StatusCode::OK),
            Err(_) => false,
        };
        health.ok.store(ok, Ordering::SeqCst);
        let delay = rand::thread_rng().gen_range(300..=500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}

impl AgentFactory for OpaAgent {
    fn port(&self) -> Option<u16> {
        Some(PORT)
    }

    fn start(&self, pod: PodInfo) -> BoxFuture<'static, ()> {
        let addr = SocketAddr::from((pod.ip, PORT));
        // Bound now, so the health endpoint answers as soon as the pod is reported running.
        let bound = std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        });
        let token_file = pod
            .secret_dirs
            .get(&self.volume)
            .map(|d| d.join(keyward::labels::DATA_TOKEN));
        let url = format!("{}/bundles/authz.tar.gz", self.server);
        async move {
            let listener = match bound.and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("[e2e] agent {} cannot listen on {addr}: {e}", pod.name);
                    return;
                }
            };
            let Some(token_file) = token_file else {
                eprintln!("[e2e] agent {}: no Secret volume with the token", pod.name);
                return;
            };
            let state = Arc::new(Health {
                ok: AtomicBool::new(false),
            });
            let app = Router::new()
                .route("/health", get(health))
                .with_state(state.clone());
            let name = pod.name.clone();
            let serve = async move {
                if let Err(e) = axum::serve(listener, app).await {
                    eprintln!("[e2e] agent {name}: server failed: {e}");
                }
            };
            // Both run inside the pod's task: aborting it (pod terminated) stops both.
            futures::future::join(serve, poll(pod, token_file, url, state)).await;
        }
        .boxed()
    }
}
