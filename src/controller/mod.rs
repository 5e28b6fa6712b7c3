//! The operator: one shared [`Context`], one controller per resource and watched namespace.

pub mod audit;
pub mod policy_agent;
pub mod provisioning_key;
pub mod workloads;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::policy_agent::WorkloadKind;
use crate::api::{PolicyAgent, ProvisioningKey};
use crate::labels;
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
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            namespaces: Vec::new(),
            floors: Floors::default(),
            max_concurrent_rolls: 5,
            instance: "keyward".into(),
        }
    }
}

/// Counts the mutating requests (anything but GET) the operator sends: the evidence that a
/// settled object costs nothing, and the source of the write metric.
#[derive(Clone, Debug, Default)]
pub struct WriteCounter(Arc<AtomicU64>);

impl WriteCounter {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Builds a client whose every mutating request increments `counter`.
pub fn counting_client(
    config: kube::Config,
    counter: &WriteCounter,
) -> Result<Client, kube::Error> {
    let counter = counter.0.clone();
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        if req.method() != http::Method::GET {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        req
    });
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// State shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub config: OperatorConfig,
    pub writes: WriteCounter,
    /// Connectivity-check evidence and the concurrent-roll cap.
    pub agents: policy_agent::AgentState,
    /// HTTP client for connectivity checks (pod IPs).
    pub http: reqwest::Client,
}

impl Context {
    pub fn new(client: Client, config: OperatorConfig, writes: WriteCounter) -> Arc<Self> {
        let reporter = Reporter {
            controller: "keyward".into(),
            instance: Some(config.instance.clone()),
        };
        let http = reqwest::Client::builder()
            // A check proves the agent answers on its bundle health endpoint; the agent's
            // serving certificate is not what is being confirmed.
            .danger_accept_invalid_certs(true)
            .no_proxy()
            .build()
            .unwrap_or_default();
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            writes,
            agents: policy_agent::AgentState::default(),
            http,
        })
    }

    /// The clock, read once per reconcile and passed down.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Formats a timestamp the way Keyward stores it (RFC 3339, seconds, `Z`).
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Formats the start of a wait (`published-at`, `retired-at`, `rolled-at`, ...) rounded UP to the
/// whole second, so that a wait measured from the stored value is never shorter than asked
/// (truncating would let `publishDelay: 2s` end after 1.0 s).
pub fn ts_start(t: DateTime<Utc>) -> String {
    let rounded = if t.timestamp_subsec_nanos() > 0 {
        DateTime::from_timestamp(t.timestamp().saturating_add(1), 0).unwrap_or(t)
    } else {
        t
    };
    ts(rounded)
}

/// Parses a timestamp stored by [`ts`].
pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Errors of a reconcile. Each variant has a PascalCase reason for Warning Events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("key Secret {name} is unusable: {message}")]
    KeySecret { name: String, message: String },
    #[error("key material: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("object has no namespace or name")]
    MissingObjectKey,
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::KeySecret { .. } => "KeySecretUnusable",
            Error::Key(e) => e.reason(),
            Error::MissingObjectKey => "MissingObjectKey",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

async fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(res: std::result::Result<T, E>) {
    match res {
        Ok(obj) => tracing::debug!(object = ?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(reason = error.reason(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
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

/// Maps a workload to the PolicyAgents that name it.
fn workload_mapper<K: Resource>(
    store: &kube::runtime::reflector::Store<PolicyAgent>,
    kind: WorkloadKind,
) -> impl Fn(K) -> Vec<ObjectRef<PolicyAgent>> + Send + Sync + Clone + 'static {
    let store = store.clone();
    move |w: K| {
        let ns = w.meta().namespace.clone();
        let name = w.meta().name.clone();
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

/// Runs the ProvisioningKey controllers (one per watched namespace, or one for all) until
/// `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    writes: WriteCounter,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Context::new(client.clone(), config.clone(), writes);
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let shutdown = Box::pin(shutdown).shared();
    let mut runs = Vec::new();
    for ns in scopes {
        let api = |c: &Client| -> (
            Api<ProvisioningKey>,
            Api<Secret>,
            Api<ConfigMap>,
            Api<PolicyAgent>,
        ) {
            match &ns {
                Some(ns) => (
                    Api::namespaced(c.clone(), ns),
                    Api::namespaced(c.clone(), ns),
                    Api::namespaced(c.clone(), ns),
                    Api::namespaced(c.clone(), ns),
                ),
                None => (
                    Api::all(c.clone()),
                    Api::all(c.clone()),
                    Api::all(c.clone()),
                    Api::all(c.clone()),
                ),
            }
        };
        let (pks, secrets, cms, pas) = api(&client);
        // Only Keyward-labelled Secrets and ConfigMaps are cached, never every Secret.
        let owned = watcher::Config::default().labels(labels::MANAGED_SELECTOR);
        let keys = Controller::new(pks, watcher::Config::default())
            .owns(secrets.clone(), owned.clone())
            .owns(cms, owned.clone())
            .watches(
                pas.clone(),
                watcher::Config::default(),
                |pa: PolicyAgent| {
                    let ns = pa.meta().namespace.clone()?;
                    Some(ObjectRef::new(&pa.spec.provisioning_key_ref.name).within(&ns))
                },
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(provisioning_key::reconcile, error_policy, ctx.clone())
            .for_each(log_result);
        runs.push(keys.boxed());

        let agents = Controller::new(pas, watcher::Config::default());
        let store = agents.store();
        let secret_store = store.clone();
        // An agent Secret that changes (a new key handed out) wakes the PolicyAgents using it.
        let agents = agents
            .watches(secrets, owned, move |s: Secret| {
                let store = &secret_store;
                let ns = s.meta().namespace.clone();
                let pk = s.labels().get(labels::PROVISIONING_KEY).cloned();
                let is_agent = s.labels().get(labels::COMPONENT).map(String::as_str)
                    == Some(labels::COMPONENT_AGENT_SECRET);
                store
                    .state()
                    .into_iter()
                    .filter(|pa| {
                        is_agent
                            && pa.meta().namespace == ns
                            && Some(&pa.spec.provisioning_key_ref.name) == pk.as_ref()
                    })
                    .map(|pa| ObjectRef::from_obj(&*pa))
                    .collect::<Vec<_>>()
            })
            // A workload that changes (rollout progress, scaling, someone else's edit) wakes
            // the PolicyAgent naming it. Secondary watches keep no cache of their own.
            .watches(
                scoped::<Deployment>(&client, &ns),
                watcher::Config::default(),
                workload_mapper(&store, WorkloadKind::Deployment),
            )
            .watches(
                scoped::<StatefulSet>(&client, &ns),
                watcher::Config::default(),
                workload_mapper(&store, WorkloadKind::StatefulSet),
            )
            .watches(
                scoped::<DaemonSet>(&client, &ns),
                watcher::Config::default(),
                workload_mapper(&store, WorkloadKind::DaemonSet),
            )
            .graceful_shutdown_on(shutdown.clone())
            .run(policy_agent::reconcile, error_policy, ctx.clone())
            .for_each(log_result);
        runs.push(agents.boxed());
    }
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
    info!("keyward controllers stopped");
}
