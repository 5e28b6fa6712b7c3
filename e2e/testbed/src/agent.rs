//! Per-pod agents: what "runs" in a pod once the stand-in kubelet starts it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::FutureExt;
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

/// Header carrying the pod's name on every [`HttpAgent`] answer.
pub const POD_NAME_HEADER: &str = "x-pod-name";

/// What an agent knows about the pod it runs in.
#[derive(Clone, Debug)]
pub struct PodInfo {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod uid.
    pub uid: String,
    /// The pod's own loopback IP (its `status.podIP`).
    pub ip: Ipv4Addr,
    /// The pod's directory on disk: `<kubelet root>/<pod name>`.
    pub dir: PathBuf,
    /// Secret volumes: volume name -> directory holding one file per key.
    pub secret_dirs: BTreeMap<String, PathBuf>,
    /// Projected volumes (the pod-bound ServiceAccount token of `kube-api-access-*`, and any
    /// of the template's own): volume name -> directory holding one file per path.
    pub projected_dirs: BTreeMap<String, PathBuf>,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Pod annotations (the pod template's annotations end up here).
    pub annotations: BTreeMap<String, String>,
    /// The pod as the kubelet saw it when starting it.
    pub pod: Arc<Pod>,
    /// The pod's termination request (its SIGTERM), see [`Termination`].
    pub termination: Termination,
}

/// Tells an agent that its pod is terminating (deleted, within its grace period): the
/// stand-in kubelet's SIGTERM. Only sent with
/// [`crate::KubeletConfig::honour_grace_period`]; an agent that returns (ends its task) then
/// lets the kubelet finalize the deletion before the grace period is over, one that ignores
/// it is stopped when the grace period ends.
#[derive(Clone, Debug)]
pub struct Termination(watch::Receiver<bool>);

impl Termination {
    pub(crate) fn new(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// A termination signal that is never sent (for agents started outside a kubelet).
    pub fn never() -> Self {
        // The sender is dropped at once: `requested` then stays pending for good.
        Self(watch::channel(false).1)
    }

    /// Whether termination was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once termination is requested; never if the pod is stopped without a grace
    /// period (the agent's task is then aborted).
    pub async fn requested(&mut self) {
        if self.0.wait_for(|t| *t).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Starts the agent of a pod. The kubelet calls [`AgentFactory::start`] when it starts the
/// pod (before reporting it running), spawns the returned future as a Tokio task, and aborts
/// that task when the pod is deleted or terminating, or the kubelet stops.
///
/// Closures `Fn(PodInfo) -> BoxFuture<'static, ()>` are agent factories too.
pub trait AgentFactory: Send + Sync + 'static {
    /// The agent's future for this pod. Work done before returning (such as binding a
    /// listener) is complete before the pod is reported running.
    fn start(&self, pod: PodInfo) -> BoxFuture<'static, ()>;

    /// A TCP port the agent listens on at the pod IP, if any: the kubelet then skips pod IPs
    /// where that port cannot be bound (taken by another process).
    fn port(&self) -> Option<u16> {
        None
    }
}

impl<F> AgentFactory for F
where
    F: Fn(PodInfo) -> BoxFuture<'static, ()> + Send + Sync + 'static,
{
    fn start(&self, pod: PodInfo) -> BoxFuture<'static, ()> {
        self(pod)
    }
}

/// The default agent: an HTTP/1 server on `<pod IP>:<port>` answering
/// - `GET /healthz`: `200 ok`;
/// - `GET /files/<volume>/<key>`: the file's content, read from disk on every request (so
///   Secret updates synced by the kubelet are visible), `404` if absent;
/// - `GET /pod`: JSON `{name, namespace, uid, ip, labels, annotations}`;
///
/// each answer with header [`POD_NAME_HEADER`] set to the pod's name.
#[derive(Clone, Debug)]
pub struct HttpAgent {
    port: u16,
}

impl HttpAgent {
    /// The port used by [`HttpAgent::default`].
    pub const DEFAULT_PORT: u16 = 8080;

    /// An agent listening on `port` at each pod IP.
    pub fn new(port: u16) -> Self {
        Self { port }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Default for HttpAgent {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PORT)
    }
}

struct AgentState {
    pod: PodInfo,
    header: HeaderValue,
}

type Shared = Arc<AgentState>;

impl AgentFactory for HttpAgent {
    fn port(&self) -> Option<u16> {
        Some(self.port)
    }

    fn start(&self, pod: PodInfo) -> BoxFuture<'static, ()> {
        let addr = SocketAddr::from((pod.ip, self.port));
        // Bind now, so the socket accepts connections before the pod is reported running.
        let bound = std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        });
        let name = pod.name.clone();
        let header = HeaderValue::from_str(&pod.name).unwrap_or(HeaderValue::from_static("?"));
        let state: Shared = Arc::new(AgentState { pod, header });
        async move {
            let listener = match bound.and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(pod = %name, %addr, "agent cannot listen: {e}");
                    return;
                }
            };
            tracing::debug!(pod = %name, %addr, "agent listening");
            let app = Router::new()
                .route("/healthz", get(healthz))
                .route("/pod", get(pod_info))
                .route("/files/{volume}/{*key}", get(file))
                .with_state(state);
            // Connections are served by tasks owned by this future (not `axum::serve`, whose
            // connection tasks outlive it): when the kubelet aborts the agent, dropping the
            // JoinSet aborts them too, so a deleted pod stops answering on kept-alive
            // connections as well.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let service = TowerToHyperService::new(app.clone());
                            connections.spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                        Err(e) => {
                            tracing::warn!(pod = %name, %addr, "agent accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        }
        .boxed()
    }
}

fn with_pod_header(state: &AgentState, resp: impl IntoResponse) -> Response {
    let mut resp = resp.into_response();
    resp.headers_mut()
        .insert(POD_NAME_HEADER, state.header.clone());
    resp
}

async fn healthz(State(state): State<Shared>) -> Response {
    with_pod_header(&state, "ok")
}

async fn pod_info(State(state): State<Shared>) -> Response {
    let p = &state.pod;
    let body = serde_json::json!({
        "name": p.name,
        "namespace": p.namespace,
        "uid": p.uid,
        "ip": p.ip.to_string(),
        "labels": p.labels,
        "annotations": p.annotations,
    });
    with_pod_header(
        &state,
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        ),
    )
}

fn is_plain_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

async fn file(
    State(state): State<Shared>,
    UrlPath((volume, key)): UrlPath<(String, String)>,
) -> Response {
    let Some(dir) = state.pod.secret_dirs.get(&volume) else {
        return with_pod_header(
            &state,
            (StatusCode::NOT_FOUND, format!("no volume {volume}\n")),
        );
    };
    let key = Path::new(&key);
    if !is_plain_relative(key) {
        return with_pod_header(&state, (StatusCode::BAD_REQUEST, "bad key\n"));
    }
    match tokio::fs::read(dir.join(key)).await {
        Ok(bytes) => with_pod_header(&state, bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => with_pod_header(
            &state,
            (
                StatusCode::NOT_FOUND,
                format!("no key {} in {volume}\n", key.display()),
            ),
        ),
        Err(e) => with_pod_header(
            &state,
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        ),
    }
}
