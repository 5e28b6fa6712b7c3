//! The operator: one shared [`Context`], one controller per resource and watched namespace.

pub mod audit;
pub mod caches;
pub mod policy_agent;
pub mod provisioning_key;
pub mod workloads;

mod backoff;
mod error;

pub use backoff::{Backoff, object_key};
pub use error::{Error, MAX_PUBLIC_MESSAGE, Result, bounded, unquoted};

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::utils::Predicate;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::policy_agent::WorkloadKind;
use crate::api::{PolicyAgent, ProvisioningKey};
use crate::http::Health;
use crate::labels;
use crate::metrics::{ControllerKind, Metrics};
use crate::rotation::Floors;

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
    /// Watch caches (what to read) and this process's own writes.
    pub caches: caches::Caches,
    /// Consumer scans done per rotation (see `provisioning_key::scan_consumers`).
    pub scans: provisioning_key::Scans,
    /// This process's own writes, so their watch events do not wake the reconcile again.
    pub own_writes: caches::OwnWrites,
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
            caches,
            scans: provisioning_key::Scans::default(),
            own_writes: caches::OwnWrites::default(),
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

    /// The clock, read once per reconcile and passed down.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Timestamps as Keyward stores them (RFC 3339, seconds, `Z`); wait starts rounded up.
pub use crate::rotation::observe::{parse_ts, ts, ts_start};

async fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(res: std::result::Result<T, E>) {
    match res {
        Ok(obj) => tracing::debug!(object = ?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

/// Runs one reconcile and records it in the metrics (count, duration, error reason).
async fn timed(
    kind: ControllerKind,
    ctx: Arc<Context>,
    reconcile: impl std::future::Future<Output = Result<Action>>,
) -> Result<Action> {
    let start = std::time::Instant::now();
    let res = reconcile.await;
    ctx.metrics
        .reconciled(kind, start.elapsed(), res.as_ref().err().map(Error::reason));
    res
}

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
                        "the CustomResourceDefinition {crd} is not installed: install it with `kubectl apply --server-side -f crds/` (or `keyward crds | kubectl apply --server-side -f -`), then restart keyward"
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

/// An `Api` for one namespace, or for all.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Maps a workload (its metadata) to the PolicyAgents that name it.
fn workload_mapper<K: Resource>(
    store: &Store<PolicyAgent>,
    kind: WorkloadKind,
) -> impl Fn(PartialObjectMeta<K>) -> Vec<ObjectRef<PolicyAgent>> + Send + Sync + Clone + 'static {
    let store = store.clone();
    move |w: PartialObjectMeta<K>| {
        let ns = w.metadata.namespace.clone();
        let name = w.metadata.name.clone();
        store
            .state()
            .into_iter()
            .filter(|pa| {
                pa.meta().namespace == ns
                    && pa.spec.workload_ref.kind == kind
                    && Some(&pa.spec.workload_ref.name) == name.as_ref()
            })
            .map(|pa| ObjectRef::from_obj(&*pa))
            .collect()
    }
}

/// The ProvisioningKey controlling a labelled Secret or ConfigMap.
fn owner_pk<K>(s: &PartialObjectMeta<K>) -> Option<ObjectRef<ProvisioningKey>> {
    let ns = s.metadata.namespace.as_deref()?;
    s.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ProvisioningKey")
        .map(|o| ObjectRef::new(&o.name).within(ns))
}

/// The PolicyAgents using an agent Secret (by its ProvisioningKey label).
fn agents_of_secret(
    store: &Store<PolicyAgent>,
    s: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<PolicyAgent>> {
    if s.labels().get(labels::COMPONENT).map(String::as_str) != Some(labels::COMPONENT_AGENT_SECRET)
    {
        return Vec::new();
    }
    let ns = s.metadata.namespace.clone();
    let pk = s.labels().get(labels::PROVISIONING_KEY).cloned();
    store
        .state()
        .into_iter()
        .filter(|pa| {
            pa.meta().namespace == ns && Some(&pa.spec.provisioning_key_ref.name) == pk.as_ref()
        })
        .map(|pa| ObjectRef::from_obj(&*pa))
        .collect()
}

/// Drops what no decision reads from a cache before an object is cached: `managedFields` and
/// kubectl's `last-applied-configuration` (often the largest parts of an object).
fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A cached ProvisioningKey is only a trigger and its spec: status is always read fresh (by
/// `get_status`) before it is compared or written, so it is not kept.
fn slim_pk(pk: &mut ProvisioningKey) {
    slim(pk);
    pk.status = None;
}

/// A cached labelled Secret only tells which key Secrets exist (name, labels, owner) and
/// which key id each holds.
fn slim_secret(s: &mut PartialObjectMeta<Secret>) {
    slim(s);
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k == labels::KEY_ID);
    }
}

/// A watcher stream with backoff, trimmed by `trim` before anything caches it, ending at
/// `shutdown`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config)
        .default_backoff()
        .modify(trim)
        .take_until(shutdown)
}

/// Changes of one workload kind, as metadata (a wake-up: the reconcile reads the workload by
/// GET).
fn workload_changes<K>(
    client: &Client,
    ns: &Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    watch(
        scoped::<PartialObjectMeta<K>>(client, ns),
        watcher::Config::default(),
        slim,
        shutdown,
    )
    .touched_objects()
}

/// Buffer of a shared watch stream (events a slow subscriber may lag behind).
const SHARED_BUFFER: usize = 1024;

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
    if let Err(e) = preflight(&client, &config.namespaces).await {
        tracing::error!("{e}");
        return;
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
    let mut runs = Vec::new();
    let mut caches = Vec::new();
    let mut wiring = Vec::new();
    for ns in &scopes {
        let (agents, agents_writer) = reflector::store_shared::<PolicyAgent>(SHARED_BUFFER);
        let (secrets, secrets_writer) = reflector::store::<PartialObjectMeta<Secret>>();
        let (reports, reports_writer) =
            reflector::store::<PartialObjectMeta<crate::api::KeyUsageReport>>();
        let (agents_ready_tx, agents_ready) = tokio::sync::watch::channel(false);
        let (secrets_ready_tx, secrets_ready) = tokio::sync::watch::channel(false);
        caches.push(caches::ScopeCaches {
            namespace: ns.clone(),
            agents,
            secrets,
            reports,
            agents_ready,
            secrets_ready,
        });
        wiring.push((
            ns.clone(),
            agents_writer,
            secrets_writer,
            reports_writer,
            agents_ready_tx,
            secrets_ready_tx,
        ));
    }
    let ctx = Context::with_caches(
        client.clone(),
        config.clone(),
        writes,
        caches::Caches::new(caches.clone()),
        obs.metrics.clone(),
    );
    // Running the controllers means leading (the only replica without leader election).
    obs.metrics.set_leader(true);
    let mut keys_ready = Vec::new();
    for ((ns, agents_writer, secrets_writer, reports_writer, agents_ready, secrets_ready), cache) in
        wiring.into_iter().zip(caches)
    {
        let stop = shutdown.clone();
        // Only Keyward-labelled Secrets and ConfigMaps are watched, never every Secret.
        let owned = watcher::Config::default().labels(labels::MANAGED_SELECTOR);
        let Some(agents_sub) = agents_writer.subscribe() else {
            tracing::error!("shared PolicyAgent stream unavailable");
            return;
        };
        // Wake-ups routed by hand, because they include deletions (a deleted agent Secret is
        // re-created; a deleted PolicyAgent no longer holds back a revocation), which shared
        // subscriptions do not carry.
        let (pk_tx, pk_rx) = futures::channel::mpsc::unbounded::<ObjectRef<ProvisioningKey>>();
        let (pa_tx, pa_rx) = futures::channel::mpsc::unbounded::<ObjectRef<PolicyAgent>>();
        let agents_store = cache.agents.clone();
        let (to_pk, to_pa) = (pk_tx.clone(), pa_tx.clone());
        let cm_tx = pk_tx.clone();
        let own_writes = ctx.own_writes.clone();
        runs.push(
            reflector(
                secrets_writer,
                watch(
                    scoped::<PartialObjectMeta<Secret>>(&client, &ns),
                    owned.clone(),
                    slim_secret,
                    stop.clone(),
                ),
            )
            .for_each(move |ev| {
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        secrets_ready.send_replace(true);
                    }
                    Ok(
                        watcher::Event::Apply(s)
                        | watcher::Event::InitApply(s)
                        | watcher::Event::Delete(s),
                    ) => {
                        if let Some(pk) = owner_pk(&s)
                            && !own_writes.echo(&s.metadata)
                        {
                            let _ = to_pk.unbounded_send(pk);
                        }
                        for pa in agents_of_secret(&agents_store, &s) {
                            let _ = to_pa.unbounded_send(pa);
                        }
                    }
                    _ => {}
                }
                futures::future::ready(())
            })
            .boxed(),
        );
        let to_pk = pk_tx.clone();
        runs.push(
            reflector(
                agents_writer,
                watch(
                    scoped::<PolicyAgent>(&client, &ns),
                    watcher::Config::default(),
                    slim,
                    stop.clone(),
                ),
            )
            .for_each(move |ev| {
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        agents_ready.send_replace(true);
                    }
                    Ok(
                        watcher::Event::Apply(pa)
                        | watcher::Event::InitApply(pa)
                        | watcher::Event::Delete(pa),
                    ) => {
                        if let Some(ns) = pa.meta().namespace.clone() {
                            let _ = to_pk.unbounded_send(
                                ObjectRef::new(&pa.spec.provisioning_key_ref.name).within(&ns),
                            );
                        }
                    }
                    _ => {}
                }
                futures::future::ready(())
            })
            .boxed(),
        );

        // Verifier usage reports: names cached; a new or changed report wakes its key (status
        // lastUsedAt, revokeWhenUnusedFor) and the PolicyAgents using that key (acknowledgement).
        let (to_pk, to_pa, agents_store) = (pk_tx.clone(), pa_tx.clone(), cache.agents.clone());
        runs.push(
            reflector(
                reports_writer,
                watch(
                    scoped::<PartialObjectMeta<crate::api::KeyUsageReport>>(&client, &ns),
                    owned.clone(),
                    slim,
                    stop.clone(),
                ),
            )
            .touched_objects()
            .for_each(move |r| {
                if let Ok(r) = r
                    && let Some(ns) = r.metadata.namespace.clone()
                    && let Some(pk) = r.labels().get(labels::PROVISIONING_KEY).cloned()
                {
                    let _ = to_pk.unbounded_send(ObjectRef::new(&pk).within(&ns));
                    for pa in agents_store.state() {
                        if pa.meta().namespace.as_deref() == Some(ns.as_str())
                            && pa.spec.provisioning_key_ref.name == pk
                        {
                            let _ = to_pa.unbounded_send(ObjectRef::from_obj(&*pa));
                        }
                    }
                }
                futures::future::ready(())
            })
            .boxed(),
        );

        // Trust bundles (labelled ConfigMaps): wake-ups only, no store.
        let (to_pk, own_writes_cm) = (cm_tx, ctx.own_writes.clone());
        runs.push(
            watch(
                scoped::<PartialObjectMeta<ConfigMap>>(&client, &ns),
                owned.clone(),
                slim,
                stop.clone(),
            )
            .touched_objects()
            .for_each(move |cm| {
                if let Ok(cm) = cm
                    && let Some(pk) = owner_pk(&cm)
                    && !own_writes_cm.echo(&cm.metadata)
                {
                    let _ = to_pk.unbounded_send(pk);
                }
                futures::future::ready(())
            })
            .boxed(),
        );
        let (pk_store, pk_writer) = reflector::store::<ProvisioningKey>();
        let (pk_ready, pk_ready_rx) = tokio::sync::watch::channel(false);
        keys_ready.push(pk_ready_rx);
        let pk_stream = reflector(
            pk_writer,
            watch(
                scoped::<ProvisioningKey>(&client, &ns),
                watcher::Config::default(),
                slim_pk,
                stop.clone(),
            ),
        )
        .inspect(key_gauges_follow_watch(
            ctx.metrics.clone(),
            pk_store.clone(),
            ns.clone(),
            pk_ready,
        ))
        .applied_objects()
        // A ProvisioningKey is reconciled when its spec (generation) or annotations (a rotation
        // request) change, not on its own status writes.
        .predicate_filter(
            predicates::generation.combine(predicates::annotations),
            Default::default(),
        );
        let keys = Controller::for_stream(pk_stream, pk_store)
            .with_config(controller_config.clone())
            .reconcile_on(pk_rx)
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |pk, ctx| {
                    timed(
                        ControllerKind::ProvisioningKey,
                        ctx.clone(),
                        provisioning_key::reconcile(pk, ctx),
                    )
                },
                backoff::error_policy,
                ctx.clone(),
            )
            .for_each(log_result);
        runs.push(keys.boxed());

        let store = cache.agents.clone();
        let agents = Controller::for_shared_stream(agents_sub, cache.agents.clone())
            .with_config(controller_config.clone())
            // An agent Secret that changes (a new key handed out) wakes the PolicyAgents using it.
            .reconcile_on(pa_rx)
            // A workload that changes (rollout progress, scaling, someone else's edit) wakes
            // the PolicyAgent naming it. Metadata suffices: every change bumps its
            // resourceVersion, and the reconcile reads the workload itself by GET.
            .watches_stream(
                workload_changes::<Deployment>(&client, &ns, stop.clone()),
                workload_mapper::<Deployment>(&store, WorkloadKind::Deployment),
            )
            .watches_stream(
                workload_changes::<StatefulSet>(&client, &ns, stop.clone()),
                workload_mapper::<StatefulSet>(&store, WorkloadKind::StatefulSet),
            )
            .watches_stream(
                workload_changes::<DaemonSet>(&client, &ns, stop.clone()),
                workload_mapper::<DaemonSet>(&store, WorkloadKind::DaemonSet),
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(
                |pa, ctx| {
                    timed(
                        ControllerKind::PolicyAgent,
                        ctx.clone(),
                        policy_agent::reconcile(pa, ctx),
                    )
                },
                backoff::error_policy,
                ctx.clone(),
            )
            .for_each(log_result);
        runs.push(agents.boxed());
    }
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

/// Per-key gauges follow the ProvisioningKey watch of one scope: a deleted key's series are
/// removed, and after each complete list (a relist after a watch error included) the series of
/// keys the list no longer has. Also reports the list's completion (`ready`).
fn key_gauges_follow_watch(
    metrics: Metrics,
    store: Store<ProvisioningKey>,
    scope: Option<String>,
    ready: tokio::sync::watch::Sender<bool>,
) -> impl FnMut(&Result<watcher::Event<ProvisioningKey>, watcher::Error>) {
    move |ev| match ev {
        Ok(watcher::Event::Delete(pk)) => {
            if let (Some(ns), Some(name)) =
                (pk.meta().namespace.as_deref(), pk.meta().name.as_deref())
            {
                metrics.remove_key(ns, name);
            }
        }
        Ok(watcher::Event::InitDone) => {
            // The reflector has applied the list before the event gets here.
            metrics.retain_keys(|ns, name| {
                scope.as_deref().is_some_and(|s| s != ns)
                    || store.get(&ObjectRef::new(name).within(ns)).is_some()
            });
            ready.send_replace(true);
        }
        _ => {}
    }
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
