//! `keyward verifier`: a small HTTP service that verifies the bearer tokens Keyward issues
//! against the trust bundles it watches, for nginx `auth_request`, Envoy `ext_authz` or as a
//! reverse proxy in front of a bundle server, and serves those bundles over HTTP. It serves
//! HTTPS with `--tls-cert-file`/`--tls-key-file` (`tls`: rustls, files re-read on change), or
//! plain HTTP only with `--plain-http`.
//!
//! Layout: `index` (what the watches delivered, plain data), `verify` (the pure decision),
//! `use_log` (recording use per key, key id and pod), `http` (the router), `watch` (the
//! watches), `report` (reporting use to the operator: a pure state and the driver that writes
//! the reports and the replica's Lease). Only `watch` and `report`'s driver hold a client.

pub mod fresh;
pub mod http;
pub mod index;
pub mod oauth;
pub mod pod_identity;
pub mod remote;
pub mod report;
pub mod serve;
pub mod stats;
pub mod tls;
pub mod use_log;
pub mod verify;
mod watch;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub use index::{Index, KeyRef};
pub use report::{ReportConfig, ReportError};
pub use serve::Limits;
pub use stats::Stats;
pub use use_log::{Instance, MemoryUseLog, NoUseLog, Use, UseLog};
pub use verify::{
    Binding, DEFAULT_CLOCK_SKEW, MAX_TOKEN_TTL, Policy, Refusal, RequiredClaim, Verified,
};
pub use watch::watch;

/// The upstream of the reverse-proxy mode.
pub struct Upstream {
    /// `http://host:port[/prefix]`.
    pub base: String,
    pub client: Client<HttpConnector, axum::body::Body>,
    /// How long the upstream may take to answer (its response head); then 504.
    pub timeout: std::time::Duration,
}

/// Default of `--upstream-timeout`.
pub const DEFAULT_UPSTREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long connecting to the upstream may take.
pub const UPSTREAM_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Upstream {
    /// Only plain `http://` upstreams (the verifier sits next to the bundle server).
    pub fn new(base: &str) -> Result<Self, String> {
        let uri: ::http::Uri = base
            .parse()
            .map_err(|_| format!("--upstream {base:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(format!(
                "--upstream {base:?} must be http://host:port[/path]"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(UPSTREAM_CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        Ok(Upstream {
            base: base.to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
        })
    }
}

/// State shared by the watches and the handlers.
pub struct Shared {
    pub index: RwLock<Index>,
    pub policy: Policy,
    pub use_log: Arc<dyn UseLog>,
    pub upstream: Option<Upstream>,
    /// `--accept-any-key`: unbound routes (`/auth`, `/ext_authz`, the proxy without
    /// `--bind-key`) accept any watched key's token instead of refusing.
    pub accept_any_key: bool,
    /// `--bind-key`: the one key the reverse proxy accepts.
    pub bind_key: Option<KeyRef>,
    pub stats: Arc<Stats>,
    /// The server's connection limits.
    pub limits: Limits,
    /// TLS (`--tls-cert-file`); `None` serves plain HTTP (`--plain-http`, in-process tests).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Whether the watches' view is confirmed (`--max-staleness`).
    pub freshness: fresh::Freshness,
    /// Attributes accepted requests to pods by their pod token (`None`: no request is
    /// attributed to any pod).
    pub pods: Option<Arc<pod_identity::PodIdentity>>,
    /// The OAuth 2.0 token endpoint of proof-of-possession keys (`--token-endpoint-url`).
    pub token_endpoint: Option<Arc<oauth::TokenEndpoint>>,
    /// Remote trust sources (`--remote-bundle`), by name.
    pub remotes: std::collections::BTreeMap<String, Arc<remote::RemoteBundle>>,
    /// Watches that have not listed yet; ready at 0.
    pending: AtomicUsize,
}

impl Shared {
    pub fn new(policy: Policy, use_log: Arc<dyn UseLog>, upstream: Option<Upstream>) -> Self {
        Shared {
            index: RwLock::new(Index::default()),
            policy,
            use_log,
            upstream,
            accept_any_key: false,
            bind_key: None,
            stats: Arc::new(Stats::default()),
            limits: Limits::default(),
            tls: None,
            freshness: fresh::Freshness::default(),
            pods: None,
            token_endpoint: None,
            remotes: std::collections::BTreeMap::new(),
            pending: AtomicUsize::new(0),
        }
    }

    /// Trust these remote bundles, each on its own routes (`/auth-remote/<name>`).
    pub fn with_remotes(mut self, remotes: Vec<Arc<remote::RemoteBundle>>) -> Self {
        self.remotes = remotes
            .into_iter()
            .map(|r| (r.spec.name.clone(), r))
            .collect();
        self
    }

    /// Serve the token endpoint of proof-of-possession keys, and accept its access tokens.
    pub fn with_token_endpoint(mut self, endpoint: Option<oauth::TokenEndpoint>) -> Self {
        self.policy.access = endpoint.as_ref().map(oauth::TokenEndpoint::access_policy);
        self.token_endpoint = endpoint.map(Arc::new);
        self
    }

    /// Attributes requests to pods by their pod token, reviewed by `reviewer` for `audience`.
    pub fn with_pod_identity(
        mut self,
        reviewer: Arc<dyn pod_identity::Reviewer>,
        audience: &str,
    ) -> Self {
        self.pods = Some(Arc::new(pod_identity::PodIdentity::new(
            reviewer,
            audience,
            self.stats.clone(),
        )));
        self
    }

    /// Unbound routes accept any watched key (`--accept-any-key`).
    pub fn accepting_any_key(mut self, yes: bool) -> Self {
        self.accept_any_key = yes;
        self
    }

    /// The server's connection limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serve over TLS with `acceptor` (`None`: plain HTTP).
    pub fn with_tls(mut self, acceptor: Option<tokio_rustls::TlsAcceptor>) -> Self {
        self.tls = acceptor;
        self
    }

    /// A view unconfirmed for longer than `max_staleness` makes the verifier not ready
    /// (`--max-staleness`).
    pub fn with_max_staleness(mut self, max_staleness: std::time::Duration) -> Self {
        self.freshness = fresh::Freshness::new(max_staleness);
        self
    }

    /// The reverse proxy accepts only `key` (`--bind-key`).
    pub fn bound_to(mut self, key: Option<KeyRef>) -> Self {
        self.bind_key = key;
        self
    }

    /// What the reverse proxy accepts: its `--bind-key`, else any key with `--accept-any-key`,
    /// else nothing.
    pub fn proxy_binding(&self) -> Result<Binding, Refusal> {
        match (&self.bind_key, self.accept_any_key) {
            (Some(key), _) => Ok(Binding::Key(key.clone())),
            (None, true) => Ok(Binding::AnyKey),
            (None, false) => Err(Refusal::Unbound),
        }
    }

    /// Ready once every watch has delivered its first complete list, and while no watch has
    /// gone unconfirmed for longer than `--max-staleness`.
    pub fn is_ready(&self) -> bool {
        self.has_listed() && !self.freshness.is_stale(std::time::Instant::now())
    }

    /// Every watch has delivered its first complete list.
    pub fn has_listed(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    pub(crate) fn expect_lists(&self, n: usize) {
        self.pending.fetch_add(n, Ordering::AcqRel);
    }

    pub(crate) fn listed(&self) {
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Applies `f` to the index (a watch event).
    pub fn update<T>(&self, f: impl FnOnce(&mut Index) -> T) -> T {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        f(&mut index)
    }
}

/// Runs the verifier: watches, then serves `listener` until `shutdown`.
pub async fn run(
    client: kube::Client,
    namespaces: Vec<String>,
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let watches = tokio::spawn(watch(client, namespaces, shared.clone()));
    let (stats, limits, tls) = (shared.stats.clone(), shared.limits, shared.tls.clone());
    let res = serve::serve(listener, http::router(shared), limits, stats, tls, shutdown).await;
    watches.abort();
    res
}

/// Runs the verifier with reporting: watches, the reporter, and the server on `listener` until
/// `shutdown`. Then the server stops accepting, the reporter flushes a last time and marks its
/// Lease stopped (at most [`report::SHUTDOWN_BUDGET`]). Returns an error when the reporter lost
/// its Lease to another process with the same replica id (the server is stopped at once).
pub async fn run_reporting(
    client: kube::Client,
    namespaces: Vec<String>,
    shared: Arc<Shared>,
    log: Arc<MemoryUseLog>,
    report: ReportConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let since = chrono::Utc::now();
    let watches = tokio::spawn(watch(client.clone(), namespaces, shared.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut reporter = tokio::spawn(report::run(
        client,
        report,
        shared.clone(),
        log,
        since,
        stop_rx,
    ));
    let (stats, limits, tls) = (shared.stats.clone(), shared.limits, shared.tls.clone());
    let router = http::router(shared);
    let mut server = tokio::spawn(serve::serve(listener, router, limits, stats, tls, shutdown));
    let res: Result<(), Box<dyn std::error::Error + Send + Sync>> = tokio::select! {
        served = &mut server => {
            let _ = stop_tx.send(true);
            let reported = tokio::time::timeout(
                report::SHUTDOWN_BUDGET + std::time::Duration::from_secs(2),
                &mut reporter,
            )
            .await;
            match (served, reported) {
                (Err(e), _) => Err(e.into()),
                (Ok(Err(e)), _) => Err(e.into()),
                (_, Ok(Ok(Err(e)))) => Err(e.into()),
                (_, Ok(Err(e))) => Err(e.into()),
                (_, Err(_)) => {
                    reporter.abort();
                    Err("the final usage report flush did not finish in time".into())
                }
                (Ok(Ok(())), Ok(Ok(Ok(())))) => Ok(()),
            }
        }
        reported = &mut reporter => {
            server.abort();
            match reported {
                Ok(Err(e)) => {
                    tracing::error!(reason = e.reason(), error = %e, "stopping: the verifier Lease was lost");
                    Err(e.into())
                }
                Ok(Ok(())) => Err("the reporter stopped unexpectedly".into()),
                Err(e) => Err(e.into()),
            }
        }
    };
    watches.abort();
    res
}
