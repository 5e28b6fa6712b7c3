//! The operator: one shared [`Context`], one controller per resource and watched namespace.

pub mod audit;
pub mod caches;
pub mod policy_agent;
pub mod provisioning_key;
pub mod workloads;

pub(crate) mod backoff;
mod error;
mod wiring;

pub use backoff::{Backoff, object_key};
pub use error::{Error, MAX_PUBLIC_MESSAGE, Result, bounded, unquoted};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use kube::Client;
use tracing::{info, warn};

use crate::api::{PolicyAgent, ProvisioningKey};
use crate::http::Health;
use crate::metrics::Metrics;
use crate::rotation::Floors;
use wiring::scoped;

/// How long a graceful shutdown waits for in-flight reconciles.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// The single field manager for every server-side apply Keyward makes.
pub const FIELD_MANAGER: &str = "keyward";

/// Operator settings (flags).
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty means all namespaces.
    pub namespaces: Vec<String>,
    pub floors: Floors,
    /// Most workloads rolled at once across the operator.
    pub max_concurrent_rolls: usize,
    /// Name reported on Events (`reportingInstance`), e.g. the pod name.
    pub instance: String,
    /// Most reconciles running at once per controller (at least 1).
    pub concurrency: u16,
    /// Set when leader election is on (`operator::run`): every write of the controllers
    /// is fenced by it, and the reconcilers check it before each irreversible write.
    pub leader: Option<crate::leader::LeaderHandle>,
    /// Namespace of the verifier replicas' Leases (`crate::usage`); `None`: no replica can
    /// vouch, so `revokeWhenUnusedFor` holds the old key (`VerifierSilent`).
    pub verifier_namespace: Option<String>,
    /// The verifier replicas that must each have a Lease (`--verifier-replicas`); empty: the
    /// replicas are whichever Leases exist, so deleting a Lease shrinks the coverage.
    pub verifier_replicas: Vec<String>,
    /// Where decisions take `now` from (the wall clock; a manual clock in tests).
    pub clock: crate::time::SharedClock,
    /// How often a key with bundle copies (`spec.trustBundle.namespaceSelector`) is looked at
    /// again: namespaces and copies are not watched (`--bundle-copy-resync`).
    pub copy_resync: std::time::Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            namespaces: Vec::new(),
            floors: Floors::default(),
            max_concurrent_rolls: 5,
            instance: "keyward".into(),
            concurrency: 16,
            leader: None,
            verifier_namespace: None,
            verifier_replicas: Vec::new(),
            clock: crate::time::SharedClock::default(),
            copy_resync: std::time::Duration::from_secs(60),
        }
    }
}

/// Counts every request by verb, resource and query; `get()` is the write count (anything but
/// get, list, watch): the evidence that a settled object costs nothing.
pub use crate::client::RequestStats as WriteCounter;

/// Builds a client (Keyward's User-Agent, every request counted in `counter`) with no
/// client-side rate limit, so tests measure the operator, not the limiter.
pub fn counting_client(
    config: kube::Config,
    counter: &WriteCounter,
) -> Result<Client, kube::Error> {
    crate::client::build(config, &crate::client::ClientOptions::unlimited(), counter)
}

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    pub writes: WriteCounter,
    /// Connectivity-check evidence and the concurrent-roll cap.
    pub agents: policy_agent::AgentState,
    /// HTTP client for connectivity checks (pod IPs).
    pub http: reqwest::Client,
    /// Retry backoff per object.
    pub backoff: Backoff,
    /// Whether the API server answers the watches, and the news of its return.
    pub outage: Arc<backoff::Outage>,
    /// Watch caches (what to read) and this process's own writes.
    pub caches: caches::Caches,
    /// Consumer scans done per rotation (see `provisioning_key::read::scan_consumers`).
    pub scans: provisioning_key::Scans,
    /// This process's own writes, so their watch events do not wake the reconcile again.
    pub own_writes: caches::OwnWrites,
    /// This process's own trust-record writes on ProvisioningKeys (apart from `own_writes`:
    /// an agent Secret may have the ProvisioningKey's name), whose watch events would
    /// otherwise pass the annotations predicate and wake a second reconcile of each new key.
    pub own_records: caches::OwnWrites,
    /// Prometheus metrics (counters where events happen, per-key gauges at report).
    pub metrics: Metrics,
}

/// What the controllers report to the HTTP endpoints: metrics, and readiness (caches synced).
#[derive(Clone, Debug)]
pub struct Observability {
    pub metrics: Metrics,
    pub health: Health,
}

impl Observability {
    /// Metrics exporting the response counts of `requests` (the client's stats), and a fresh
    /// readiness state.
    pub fn new(requests: &WriteCounter) -> Self {
        Observability {
            metrics: Metrics::new(requests),
            health: Health::default(),
        }
    }
}

impl Context {
    /// A context without watch caches (for tests of a single reconcile).
    pub fn new(client: Client, config: OperatorConfig, writes: WriteCounter) -> Arc<Self> {
        let metrics = Metrics::new(&writes);
        Self::with_caches(client, config, writes, caches::Caches::default(), metrics)
    }

    pub fn with_caches(
        client: Client,
        config: OperatorConfig,
        writes: WriteCounter,
        caches: caches::Caches,
        metrics: Metrics,
    ) -> Arc<Self> {
        let http = reqwest::Client::builder()
            // A check proves the agent answers on its bundle health endpoint; the agent's
            // serving certificate is not what is being confirmed.
            .danger_accept_invalid_certs(true)
            .no_proxy()
            // No idle connections kept: checks are seconds apart and go to many pods; a pooled
            // connection (with its TLS state and buffers) per pod costs more memory than a new
            // connection per check costs time.
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default();
        Arc::new(Context {
            client,
            config,
            writes,
            agents: policy_agent::AgentState::default(),
            http,
            backoff: Backoff::default(),
            outage: Arc::default(),
            caches,
            scans: provisioning_key::Scans::default(),
            own_writes: caches::OwnWrites::default(),
            own_records: caches::OwnWrites::default(),
            metrics,
        })
    }

    /// Fails with [`Error::NotLeading`] when leader election is on and this replica does not
    /// hold the Lease now (see [`crate::leader`]); checked right before irreversible writes.
    pub fn ensure_leading(&self) -> Result<()> {
        match &self.config.leader {
            Some(l) if !l.is_leading() && !crate::fault::unfenced() => Err(Error::NotLeading),
            _ => Ok(()),
        }
    }

    /// The clock ([`OperatorConfig::clock`]), read once per reconcile and passed down.
    pub fn now(&self) -> DateTime<Utc> {
        self.config.clock.now()
    }
}

/// Timestamps as Keyward stores them (RFC 3339, seconds, `Z`); wait starts rounded up.
pub use crate::rotation::observe::{parse_ts, ts, ts_start};

/// Checks that the CRDs are installed, so a missing one is reported once, clearly, at startup
/// instead of as a bare `404 page not found` on every reconcile.
pub async fn preflight(client: &Client, namespaces: &[String]) -> Result<(), String> {
    use kube::CustomResourceExt;
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    for ns in &scopes {
        for (crd, res) in [
            (
                ProvisioningKey::crd_name(),
                scoped::<ProvisioningKey>(client, ns)
                    .list_metadata(&kube::api::ListParams::default().limit(1))
                    .await
                    .map(|_| ()),
            ),
            (
                PolicyAgent::crd_name(),
                scoped::<PolicyAgent>(client, ns)
                    .list_metadata(&kube::api::ListParams::default().limit(1))
                    .await
                    .map(|_| ()),
            ),
        ] {
            match res {
                Ok(()) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    return Err(format!(
                        "the CustomResourceDefinition {crd} is not installed: install it with `kubectl apply --server-side -f crds/` (or `keyward crds | kubectl apply --server-side -f -`); keyward picks it up without a restart"
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "cannot list {crd}{}: {e}",
                        ns.as_ref()
                            .map(|n| format!(" in namespace {n}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The longest wait between two startup checks of the API server ([`await_api`]): a returning
/// API server is used within this (plus jitter) and the watches' first sync.
pub const STARTUP_RETRY_MAX: Duration = Duration::from_secs(4);

/// Waits, without ever giving up, until the API server answers and serves both CRDs in every
/// watched scope ([`preflight`]). The process never exits for the API server's absence: a
/// crash loop would only add the kubelet's growing restart delay to the outage. Meanwhile
/// `/healthz` stays live and `/readyz` answers 503 with the reason; each new reason is logged
/// once (a missing CRD or a refusal with its one-line remedy). Retries with capped, jittered
/// exponential backoff: 200 ms doubling to [`STARTUP_RETRY_MAX`], each wait ±20 %.
pub async fn await_api(client: &Client, namespaces: &[String], health: &Health) {
    let mut delay = Duration::from_millis(200);
    let mut last: Option<String> = None;
    loop {
        match preflight(client, namespaces).await {
            Ok(()) => {
                health.set_waiting(None);
                if last.is_some() {
                    info!(
                        "the API server answers and the CRDs are served: starting the controllers"
                    );
                }
                return;
            }
            Err(e) => {
                if last.as_deref() != Some(e.as_str()) {
                    tracing::error!("{e} (not ready; retrying until it answers)");
                }
                health.set_waiting(Some(e.clone()));
                last = Some(e);
            }
        }
        tokio::time::sleep(jittered(delay)).await;
        delay = (delay * 2).min(STARTUP_RETRY_MAX);
    }
}

/// `d` ±20 %.
fn jittered(d: Duration) -> Duration {
    use rand::Rng as _;
    d.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
}

/// Runs the controllers (one set per watched namespace, or one for all) until `shutdown`
/// resolves; in-flight reconciles finish first.
///
/// Watches, one per kind and scope (see [`caches`]): ProvisioningKeys and PolicyAgents in full,
/// Keyward-labelled Secrets and ConfigMaps and the workload kinds as metadata only. The
/// PolicyAgent and labelled-Secret streams are shared by both controllers.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    writes: WriteCounter,
    obs: Observability,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mut shutdown = Box::pin(shutdown);
    tokio::select! {
        () = await_api(&client, &config.namespaces, &obs.health) => {}
        () = &mut shutdown => return,
    }
    // Under leader election every write goes through the fence (see `crate::leader`).
    let client = match &config.leader {
        Some(leader) if !crate::fault::unfenced() => crate::leader::fenced(client, leader.clone()),
        Some(_) => {
            warn!("fault injection: KEYWARD_UNFENCED set: writes are not fenced by leadership");
            client
        }
        None => client,
    };
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let shutdown = Box::pin(shutdown).shared();
    let controller_config =
        kube::runtime::controller::Config::default().concurrency(config.concurrency.max(1));
    let (caches, writers): (Vec<_>, Vec<_>) = scopes.iter().map(wiring::scope_caches).unzip();
    let ctx = Context::with_caches(
        client.clone(),
        config.clone(),
        writes,
        caches::Caches::new(caches.clone()),
        obs.metrics.clone(),
    );
    // Running the controllers means leading (the only replica without leader election).
    obs.metrics.set_leader(true);
    let mut runs = Vec::new();
    let mut keys_ready = Vec::new();
    for (ns, scope) in scopes.iter().zip(writers.into_iter().zip(caches)) {
        let wired = wiring::scope(
            &client,
            ns,
            &ctx,
            scope,
            shutdown.clone(),
            &controller_config,
        );
        let Some((scope_runs, ready)) = wired else {
            return;
        };
        runs.extend(scope_runs);
        keys_ready.push(ready);
    }
    // The API server's return after an outage is noticed within about a second.
    let (probe_ctx, stop) = (ctx.clone(), shutdown.clone());
    runs.push(
        async move {
            tokio::select! {
                () = probe_ctx.outage.probe(&probe_ctx.client) => {}
                _ = stop => {}
            }
        }
        .boxed(),
    );
    // Ready once every watch stream has delivered its first complete list.
    let (synced_ctx, health, stop) = (ctx.clone(), obs.health.clone(), shutdown.clone());
    runs.push(
        async move {
            let all = async {
                synced_ctx.caches.ready().await;
                for mut r in keys_ready {
                    let _ = r.wait_for(|r| *r).await;
                }
            };
            tokio::select! {
                _ = all => {
                    health.set_synced(true);
                    info!("watch caches synced");
                }
                _ = stop => {}
            }
        }
        .boxed(),
    );
    info!(namespaces = ?config.namespaces, "keyward controllers started");
    // Graceful shutdown lets in-flight reconciles finish. kube-runtime's controller can wait
    // forever when shutdown comes before its caches first synced (seen: SIGTERM right after
    // start), so the drain is bounded, well inside Kubernetes' default 30 s grace period.
    let drained = futures::future::join_all(runs);
    let deadline = shutdown.then(|_| tokio::time::sleep(SHUTDOWN_DRAIN));
    tokio::select! {
        _ = drained => {}
        _ = deadline => warn!(?SHUTDOWN_DRAIN, "controllers did not drain in time; stopping anyway"),
    }
    // Controllers stopped: no caches, no leadership, no per-key series.
    obs.health.set_synced(false);
    obs.metrics.set_leader(false);
    obs.metrics.clear_keys();
    info!("keyward controllers stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing CRD is named at startup (the API server answers 404 for its resource).
    #[tokio::test]
    async fn preflight_names_a_missing_crd() {
        let (service, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert!(
                req.uri().path().ends_with("/provisioningkeys"),
                "{}",
                req.uri()
            );
            send.send_response(
                http::Response::builder()
                    .status(404)
                    .body(kube::client::Body::from(
                        br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#.to_vec(),
                    ))
                    .unwrap(),
            );
        });
        let err = preflight(&client, &["agents".to_string()])
            .await
            .expect_err("a missing CRD fails the preflight");
        assert!(
            err.contains("provisioningkeys.keyward.dev") && err.contains("not installed"),
            "{err}"
        );
        server.await.unwrap();
    }
}
