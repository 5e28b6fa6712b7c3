//! A stand-in kubelet for one namespace of the local plane (which has no kubelet and no
//! scheduler).
//!
//! For every pod controlled by a ReplicaSet or a StatefulSet it does what a kubelet would:
//! projects the pod's Secret volumes into files (keeping the pod pending while a required
//! Secret is missing) and its projected volumes (pod-bound ServiceAccount tokens requested
//! through the TokenRequest API with the source's audience, refreshed at 80 % of their
//! lifetime; ConfigMap and Secret keys; downward-API fields), starts the pod's agent ([`AgentFactory`]) on a unique loopback pod
//! IP, reports the pod `Running` and (per [`KubeletConfig::ready`]) `Ready` through
//! `pods/status`, keeps Secret files in sync after [`KubeletConfig::secret_sync_delay`], and
//! on deletion stops the agent, frees the IP, removes the pod's files and finalizes the
//! deletion (grace period 0) of pods left terminating: at once, or (with
//! [`KubeletConfig::honour_grace_period`]) once the grace period is over or the agent exited.
//! [`KubeletHandle::evict`], [`KubeletHandle::complete`] and [`KubeletHandle::set_unknown`]
//! end pods the way a node does, and [`KubeletHandle::token_at_start`] tells which token a
//! pod started with.
//!
//! It works level-triggered from two reflectors (pods and Secrets of the namespace) plus a
//! periodic resync, so watch restarts and missed events are harmless.

mod ip;
mod projected;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::agent::{AgentFactory, PodInfo, Termination};
use ip::{IpLease, IpPool};
use projected::{ProjectedVolume, Source, projected_volumes};
use volumes::{
    Files, SecretVolume, project, project_keys, safe_relative, secret_data, secret_volumes,
    sync_dir,
};

/// Decides whether a running pod is reported ready; evaluated on every resync, so it may
/// change its answer over time (the kubelet then updates the pod's `Ready` condition).
pub type ReadinessHook = Arc<dyn Fn(&Pod) -> bool + Send + Sync>;

/// Settings of a [`Kubelet`].
#[derive(Clone)]
pub struct KubeletConfig {
    /// First pod IP to hand out (then upward, across `127.10.0.1 ..= 127.255.255.254`,
    /// wrapping). `None`: a random `127.<10..=250>.<x>.2`, so test processes running at the
    /// same time are unlikely to collide; within a process IPs are never shared.
    pub ip_base: Option<Ipv4Addr>,
    /// Directory holding `<pod name>/<volume>/<key>` files. `None`: a fresh temporary
    /// directory, removed when the kubelet stops (a given directory is left in place).
    pub root: Option<PathBuf>,
    /// How long after a Secret changes the files of running pods mounting it are rewritten
    /// (the real kubelet takes up to a minute or so). Default 2 s; zero: at once.
    pub secret_sync_delay: Duration,
    /// The agent to run in every pod. `None`: pods run nothing.
    pub agent: Option<Arc<dyn AgentFactory>>,
    /// Whether a running pod is ready. Default: always.
    pub ready: ReadinessHook,
    /// Period of the level-triggered resync (readiness hook, retries). Default 500 ms.
    pub resync_interval: Duration,
    /// Whether a terminating pod keeps running for its grace period, as with a real kubelet.
    ///
    /// `true`: the kubelet binds each pod it starts to the Node [`NODE_NAME`] (created if
    /// absent) before starting it, because the apiserver deletes unscheduled pods (no
    /// `spec.nodeName`) at once whatever their grace period. A deleted pod is then terminating
    /// until its `deletionTimestamp` (the apiserver sets it to now + grace period): it stays
    /// `Running` with its agent running, the agent sees [`PodInfo::termination`] (its
    /// SIGTERM); once the `deletionTimestamp` has passed or the agent's task has ended, the
    /// kubelet stops the agent and finalizes the deletion with grace period 0. A pod without
    /// an agent runs its whole grace period. Tests opting in should give their pods a short
    /// `terminationGracePeriodSeconds` and keep the kubelet running while they delete pods;
    /// [`crate::TestNamespace::cleanup`] force-deletes pods left over.
    ///
    /// `false` (the default, so that tests whose pods have the default 30 s grace period stay
    /// fast): pods are not bound, so the apiserver deletes them at once (pods held by a
    /// finalizer are stopped at once and their deletion finalized).
    pub honour_grace_period: bool,
}

/// The Node that pods are bound to when [`KubeletConfig::honour_grace_period`] is on. The
/// plane runs no node lifecycle controller, so it is never marked unreachable; the pod
/// garbage collector force-deletes pods bound to a Node that does not exist, hence the object.
pub const NODE_NAME: &str = "keyward-testbed";

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            ip_base: None,
            root: None,
            secret_sync_delay: Duration::from_secs(2),
            agent: None,
            ready: Arc::new(|_: &Pod| true),
            resync_interval: Duration::from_millis(500),
            honour_grace_period: false,
        }
    }
}

impl fmt::Debug for KubeletConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeletConfig")
            .field("ip_base", &self.ip_base)
            .field("root", &self.root)
            .field("secret_sync_delay", &self.secret_sync_delay)
            .field("agent", &self.agent.as_ref().map(|_| "<agent>"))
            .field("resync_interval", &self.resync_interval)
            .field("honour_grace_period", &self.honour_grace_period)
            .finish_non_exhaustive()
    }
}

impl KubeletConfig {
    /// Sets [`KubeletConfig::agent`].
    #[must_use]
    pub fn with_agent(mut self, agent: impl AgentFactory) -> Self {
        self.agent = Some(Arc::new(agent));
        self
    }

    /// Sets [`KubeletConfig::ready`].
    #[must_use]
    pub fn with_ready(mut self, ready: impl Fn(&Pod) -> bool + Send + Sync + 'static) -> Self {
        self.ready = Arc::new(ready);
        self
    }

    /// Sets [`KubeletConfig::secret_sync_delay`].
    #[must_use]
    pub fn with_secret_sync_delay(mut self, delay: Duration) -> Self {
        self.secret_sync_delay = delay;
        self
    }

    /// Sets [`KubeletConfig::ip_base`].
    #[must_use]
    pub fn with_ip_base(mut self, base: Ipv4Addr) -> Self {
        self.ip_base = Some(base);
        self
    }

    /// Sets [`KubeletConfig::root`].
    #[must_use]
    pub fn with_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// Sets [`KubeletConfig::resync_interval`].
    #[must_use]
    pub fn with_resync_interval(mut self, interval: Duration) -> Self {
        self.resync_interval = interval;
        self
    }

    /// Sets [`KubeletConfig::honour_grace_period`].
    #[must_use]
    pub fn with_grace_period(mut self, honour: bool) -> Self {
        self.honour_grace_period = honour;
        self
    }
}

/// Why a [`KubeletHandle`] request failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// No such pod in the namespace.
    #[error("no pod {0}")]
    NoSuchPod(String),
    /// The pod is not running on this kubelet (not started yet, or already stopped).
    #[error("pod {0} is not running")]
    NotRunning(String),
    /// The kubelet already ended this pod (evicted or completed it).
    #[error("pod {0} was already ended by the kubelet")]
    AlreadyEnded(String),
    /// The kubelet has stopped.
    #[error("the kubelet has stopped")]
    Stopped,
    /// An API request failed.
    #[error("API request failed: {0}")]
    Api(#[from] kube::Error),
}

/// How [`KubeletHandle`] ends or marks a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Evict,
    Complete,
    Unknown,
}

struct Command {
    pod: String,
    action: Action,
    reply: oneshot::Sender<Result<(), KubeletError>>,
}

/// A pod the kubelet runs (reported `Running` at least once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningPod {
    /// Pod name.
    pub name: String,
    /// Pod uid.
    pub uid: String,
    /// Its loopback IP.
    pub ip: Ipv4Addr,
    /// Its directory, `<root>/<name>`.
    pub dir: PathBuf,
    /// Secret volumes: volume name -> directory.
    pub secret_dirs: BTreeMap<String, PathBuf>,
    /// Projected volumes (ServiceAccount tokens among them): volume name -> directory.
    pub projected_dirs: BTreeMap<String, PathBuf>,
    /// Whether it was last reported ready.
    pub ready: bool,
    /// See [`KubeletHandle::token_at_start`].
    pub token_at_start: Option<String>,
    /// Whether it is terminating (deleted, within its grace period).
    pub terminating: bool,
}

/// A pod's agent task; aborted when dropped.
struct AgentTask(Option<JoinHandle<()>>);

impl AgentTask {
    /// Aborts the task and waits until it is gone (its future dropped).
    async fn stop(mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for AgentTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// A pod the kubelet started. Dropping it aborts the agent and frees the IP.
struct PodState {
    uid: String,
    lease: IpLease,
    dir: PathBuf,
    volumes: Vec<SecretVolume>,
    /// Projected volumes, re-projected whole when a token in them is due for refresh.
    projected: Vec<ProjectedVolume>,
    /// When the earliest token of `projected` is due for refresh (`None`: no token).
    token_refresh: Option<Timestamp>,
    /// Files written per volume (relative paths), to remove keys dropped from the Secret.
    written: BTreeMap<String, BTreeSet<PathBuf>>,
    started_at: Timestamp,
    /// What the last successful status patch said about readiness (`None`: not reported).
    reported_ready: Option<bool>,
    agent: Option<AgentTask>,
    /// The `token` file of the first Secret volume when the pod started.
    token_at_start: Option<String>,
    /// Reported `Unknown` through [`KubeletHandle::set_unknown`]: status left alone since.
    frozen: bool,
    /// The agent's SIGTERM: set when the pod is terminating.
    terminating: watch::Sender<bool>,
}

impl PodState {
    fn agent_exited(&self) -> bool {
        self.agent
            .as_ref()
            .and_then(|a| a.0.as_ref())
            .is_some_and(JoinHandle::is_finished)
    }
}

impl PodState {
    fn secret_dirs(&self) -> BTreeMap<String, PathBuf> {
        self.volumes
            .iter()
            .map(|v| (v.volume.clone(), self.dir.join(&v.volume)))
            .collect()
    }

    fn projected_dirs(&self) -> BTreeMap<String, PathBuf> {
        self.projected
            .iter()
            .map(|v| (v.volume.clone(), self.dir.join(&v.volume)))
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    pods: BTreeMap<String, PodState>,
    /// Every pod ever started, by name (the latest of that name): uid and token at start.
    started: BTreeMap<String, (String, Option<String>)>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The stand-in kubelet for one namespace (the plane has no kubelet and no scheduler).
///
/// For every pod controlled by a ReplicaSet or a StatefulSet it does what a kubelet would:
/// projects the pod's Secret volumes into `<root>/<pod>/<volume>/<key>` files (keeping the
/// pod pending while a required Secret or key is missing), starts the pod's agent
/// ([`KubeletConfig::agent`]) on a unique loopback pod IP, reports the pod `Running` and
/// (per [`KubeletConfig::ready`]) `Ready` through `pods/status` (`podIP`, `hostIP:
/// 127.0.0.1`, `startTime`, conditions, one running container status per container; no
/// `nodeName`), rewrites the Secret files of running pods [`KubeletConfig::secret_sync_delay`]
/// after the Secret changes, and when a pod is deleted or terminating stops its agent,
/// removes its files, frees its IP and finalizes the deletion (grace period 0, uid
/// precondition).
///
/// It is level-triggered: two reflectors (pods and Secrets of the namespace, restarted with
/// backoff on watch errors) and a periodic resync drive one reconcile loop, so watch restarts
/// and missed events are harmless. Pods already running when it starts are adopted (they keep
/// their IP if it is free).
pub struct Kubelet;

impl Kubelet {
    /// Starts a kubelet for the pods of `namespace`, as a Tokio task.
    ///
    /// # Panics
    /// If the root directory cannot be created.
    pub fn start(client: Client, namespace: &str, config: KubeletConfig) -> KubeletHandle {
        let (root, tempdir) = match &config.root {
            Some(root) => {
                std::fs::create_dir_all(root)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
                (root.clone(), None)
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("keyward-kubelet-{namespace}-"))
                    .tempdir()
                    .unwrap_or_else(|e| panic!("cannot create a kubelet directory: {e}"));
                (dir.path().to_path_buf(), Some(dir))
            }
        };
        let base = config.ip_base.unwrap_or_else(ip::random_base);
        let pool = IpPool::new(base, config.agent.as_ref().and_then(|a| a.port()));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (pod_store, pod_writer) = reflector::store();
        let (secret_store, secret_writer) = reflector::store();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (command_tx, command_rx) = mpsc::unbounded_channel();
        let worker = Worker {
            nodes_api: Api::all(client.clone()),
            node_ready: false,
            pods_api: Api::namespaced(client.clone(), namespace),
            secrets_api: Api::namespaced(client.clone(), namespace),
            service_accounts_api: Api::namespaced(client.clone(), namespace),
            config_maps_api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            pods: pod_store,
            secrets: secret_store,
            shared: shared.clone(),
            pool,
            root: root.clone(),
            config,
            pending: BTreeMap::new(),
            deleting: BTreeMap::new(),
            ended: BTreeSet::new(),
        };
        tracing::info!(%namespace, ip_base = %base, root = %root.display(), "stand-in kubelet starting");
        let task = tokio::spawn(worker.run(pod_writer, secret_writer, stop_rx, command_rx));
        KubeletHandle {
            namespace: namespace.to_string(),
            root,
            shared,
            commands: command_tx,
            stop: Some(stop_tx),
            task: Some(task),
            _tempdir: tempdir,
        }
    }
}

/// Controls a running [`Kubelet`]. Dropping it stops the kubelet too (aborting its task and
/// every agent, freeing the IPs, removing a temporary root); [`KubeletHandle::shutdown`]
/// does the same in order.
pub struct KubeletHandle {
    namespace: String,
    root: PathBuf,
    shared: Arc<Mutex<Shared>>,
    commands: mpsc::UnboundedSender<Command>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _tempdir: Option<tempfile::TempDir>,
}

impl fmt::Debug for KubeletHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeletHandle")
            .field("namespace", &self.namespace)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl KubeletHandle {
    /// The namespace it serves.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The directory holding the pods' directories.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The IP of a pod the kubelet started.
    pub fn pod_ip(&self, pod: &str) -> Option<Ipv4Addr> {
        lock(&self.shared).pods.get(pod).map(|p| p.lease.ip())
    }

    /// The directory (`<root>/<pod>`) of a pod the kubelet started.
    pub fn pod_dir(&self, pod: &str) -> Option<PathBuf> {
        lock(&self.shared).pods.get(pod).map(|p| p.dir.clone())
    }

    /// The directory of one Secret volume of a pod the kubelet started.
    pub fn secret_dir(&self, pod: &str, volume: &str) -> Option<PathBuf> {
        let shared = lock(&self.shared);
        let p = shared.pods.get(pod)?;
        p.volumes
            .iter()
            .any(|v| v.volume == volume)
            .then(|| p.dir.join(volume))
    }

    /// The pods reported running, by name.
    pub fn running_pods(&self) -> Vec<RunningPod> {
        lock(&self.shared)
            .pods
            .iter()
            .filter_map(|(name, p)| {
                Some(RunningPod {
                    name: name.clone(),
                    uid: p.uid.clone(),
                    ip: p.lease.ip(),
                    dir: p.dir.clone(),
                    secret_dirs: p.secret_dirs(),
                    projected_dirs: p.projected_dirs(),
                    ready: p.reported_ready?,
                    token_at_start: p.token_at_start.clone(),
                    terminating: *p.terminating.borrow(),
                })
            })
            .collect()
    }

    /// The content of the file `token` of the first Secret volume (in `spec.volumes` order)
    /// of pod `pod` when the kubelet started it (the latest pod of that name it started, even
    /// if stopped since). `None`: never started, no Secret volume, or no `token` file in it.
    pub fn token_at_start(&self, pod: &str) -> Option<String> {
        lock(&self.shared).started.get(pod)?.1.clone()
    }

    /// Evicts a pod as a kubelet under node pressure does: stops its agent, then reports it
    /// `Failed` with reason `Evicted` through `pods/status` (containers terminated). The pod
    /// object stays (its controller creates a replacement, which the kubelet runs as usual);
    /// the kubelet never updates it again (if it was already terminating, it finalizes its
    /// deletion, as its containers are gone). Works on a pod not started yet too.
    ///
    /// # Errors
    /// No such pod, the kubelet already ended it, or the status patch failed.
    pub async fn evict(&self, pod: &str) -> Result<(), KubeletError> {
        self.command(pod, Action::Evict).await
    }

    /// Completes a pod: stops its agent and reports it `Succeeded` (containers terminated with
    /// exit code 0); otherwise as [`KubeletHandle::evict`].
    ///
    /// # Errors
    /// As [`KubeletHandle::evict`].
    pub async fn complete(&self, pod: &str) -> Result<(), KubeletError> {
        self.command(pod, Action::Complete).await
    }

    /// Reports a running pod's phase `Unknown` (as for a node that lost contact); its agent
    /// keeps running and the kubelet no longer updates its status (it still stops it when it
    /// is deleted).
    ///
    /// # Errors
    /// No such pod, the pod is not running, or the status patch failed.
    pub async fn set_unknown(&self, pod: &str) -> Result<(), KubeletError> {
        self.command(pod, Action::Unknown).await
    }

    async fn command(&self, pod: &str, action: Action) -> Result<(), KubeletError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command {
                pod: pod.to_string(),
                action,
                reply,
            })
            .map_err(|_| KubeletError::Stopped)?;
        answer.await.map_err(|_| KubeletError::Stopped)?
    }

    /// Stops the kubelet: its watches, every agent; frees the IPs. Pods keep their last
    /// reported status.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!(namespace = %self.namespace, "stand-in kubelet panicked: {e}");
        }
        lock(&self.shared).pods.clear();
        tracing::info!(namespace = %self.namespace, "stand-in kubelet stopped");
    }
}

impl Drop for KubeletHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        lock(&self.shared).pods.clear();
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_managed(pod: &Pod) -> bool {
    pod.owner_references().iter().any(|o| {
        o.controller == Some(true)
            && o.api_version == "apps/v1"
            && (o.kind == "ReplicaSet" || o.kind == "StatefulSet")
    })
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The `pods/status` merge patch of a running pod, as a kubelet would report it. Carries the
/// pod's uid, so it fails (uid is immutable) if the pod was replaced by one of the same name.
fn running_status(
    pod: &Pod,
    ip: Ipv4Addr,
    started_at: Timestamp,
    ready: bool,
    now: Timestamp,
) -> Value {
    let started = Time(started_at);
    let now = Time(now);
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let flag = if ready { "True" } else { "False" };
    let not_ready = |cond: &str| {
        let mut c =
            json!({"type": cond, "status": flag, "lastProbeTime": null, "lastTransitionTime": now});
        if !ready {
            c["reason"] = json!("ContainersNotReady");
            c["message"] = json!("readiness withheld by the test kubelet");
        }
        c
    };
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("keyward-testbed://{image}"),
                "containerID": format!("keyward-testbed://{uid}/{}", c.name),
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": started}},
            })
        })
        .collect();
    let init_containers: Vec<Value> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("keyward-testbed://{image}"),
                "containerID": format!("keyward-testbed://{uid}/{}", c.name),
                "ready": true,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": started}},
            })
        })
        .collect();
    let mut status = json!({
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": ip.to_string(),
        "podIPs": [{"ip": ip.to_string()}],
        "startTime": started,
        "conditions": [
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            not_ready("Ready"),
            not_ready("ContainersReady"),
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
        ],
        "containerStatuses": containers,
    });
    if !init_containers.is_empty() {
        status["initContainerStatuses"] = json!(init_containers);
    }
    json!({"metadata": {"uid": uid}, "status": status})
}

/// The `pods/status` merge patch of a pod the kubelet ended: `Failed`/`Evicted` (containers
/// killed, exit code 137) or `Succeeded` (exit code 0). Carries the pod's uid, as
/// [`running_status`].
fn terminal_status(pod: &Pod, evicted: bool, started_at: Timestamp, now: Timestamp) -> Value {
    let started = Time(started_at);
    let now = Time(now);
    let uid = pod.uid().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let (exit_code, reason) = if evicted {
        (137, "Error")
    } else {
        (0, "Completed")
    };
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|c| {
            let image = c.image.clone().unwrap_or_default();
            json!({
                "name": c.name,
                "image": image,
                "imageID": format!("keyward-testbed://{image}"),
                "containerID": format!("keyward-testbed://{uid}/{}", c.name),
                "ready": false,
                "started": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": started, "finishedAt": now}},
            })
        })
        .collect();
    let cond_reason = if evicted { "PodFailed" } else { "PodCompleted" };
    let mut status = json!({
        "phase": if evicted { "Failed" } else { "Succeeded" },
        "conditions": [
            {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
            {"type": "Ready", "status": "False", "reason": cond_reason, "lastProbeTime": null, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": "False", "reason": cond_reason, "lastProbeTime": null, "lastTransitionTime": now},
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": started},
        ],
        "containerStatuses": containers,
    });
    if evicted {
        status["reason"] = json!("Evicted");
        status["message"] =
            json!("The node was low on resource: memory. (stand-in kubelet eviction)");
    }
    json!({"metadata": {"uid": uid}, "status": status})
}

struct Worker {
    nodes_api: Api<Node>,
    /// Whether Node [`NODE_NAME`] is known to exist.
    node_ready: bool,
    pods_api: Api<Pod>,
    secrets_api: Api<Secret>,
    service_accounts_api: Api<ServiceAccount>,
    config_maps_api: Api<ConfigMap>,
    namespace: String,
    pods: Store<Pod>,
    secrets: Store<Secret>,
    shared: Arc<Mutex<Shared>>,
    pool: IpPool,
    root: PathBuf,
    config: KubeletConfig,
    /// Pods waiting to start (uid -> why), to log each reason once.
    pending: BTreeMap<String, String>,
    /// Terminating pods whose deletion was requested (uid -> when), to not repeat it at once.
    deleting: BTreeMap<String, Instant>,
    /// Pods the kubelet ended (evicted, completed), by uid: never touched again.
    ended: BTreeSet<String>,
}

impl Worker {
    async fn run(
        mut self,
        pod_writer: reflector::store::Writer<Pod>,
        secret_writer: reflector::store::Writer<Secret>,
        mut stop: oneshot::Receiver<()>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) {
        let pod_events = reflector::reflector(
            pod_writer,
            watcher::watcher(self.pods_api.clone(), watcher::Config::default()),
        )
        .backoff(crate::BedBackoff::new());
        let secret_events = reflector::reflector(
            secret_writer,
            watcher::watcher(self.secrets_api.clone(), watcher::Config::default()),
        )
        .backoff(crate::BedBackoff::new());
        let mut pod_events = pin!(pod_events);
        let mut secret_events = pin!(secret_events);
        let mut secret_timers: FuturesUnordered<BoxFuture<'static, String>> =
            FuturesUnordered::new();
        let mut resync = tokio::time::interval(self.config.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                ev = pod_events.next() => match ev {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(namespace = %self.namespace, "pod watch failed (retrying): {e}"),
                    None => break,
                },
                ev = secret_events.next() => match ev {
                    Some(Ok(Event::Apply(s) | Event::InitApply(s) | Event::Delete(s))) => {
                        let name = s.name_any();
                        let delay = self.config.secret_sync_delay;
                        if delay.is_zero() {
                            self.sync_secret(&name);
                        } else {
                            secret_timers.push(tokio::time::sleep(delay).map(move |()| name).boxed());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(namespace = %self.namespace, "secret watch failed (retrying): {e}"),
                    None => break,
                },
                Some(name) = secret_timers.next(), if !secret_timers.is_empty() => self.sync_secret(&name),
                Some(cmd) = commands.recv() => {
                    let result = self.execute(&cmd.pod, cmd.action).await;
                    let _ = cmd.reply.send(result);
                }
                _ = resync.tick() => {}
            }
            self.reconcile().await;
        }
        let agents: Vec<AgentTask> = lock(&self.shared)
            .pods
            .values_mut()
            .filter_map(|st| st.agent.take())
            .collect();
        for agent in agents {
            agent.stop().await;
        }
        lock(&self.shared).pods.clear();
    }

    /// Brings the kubelet's pods in line with the pods in the store.
    async fn reconcile(&mut self) {
        let pods = self.pods.state();
        let uids: BTreeMap<String, String> = pods
            .iter()
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect();
        let gone: Vec<String> = lock(&self.shared)
            .pods
            .iter()
            .filter(|(name, st)| uids.get(*name) != Some(&st.uid))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.stop_pod(&name, "deleted").await;
        }
        for pod in &pods {
            if !is_managed(pod) {
                continue;
            }
            if self.ended.contains(&pod.uid().unwrap_or_default()) {
                // An ended pod is left alone, unless it is deleted while terminating (bound
                // and deleted before it ended): its containers are gone, so finalize.
                if pod.metadata.deletion_timestamp.is_some() {
                    self.finalize_deletion(pod).await;
                }
                continue;
            }
            let name = pod.name_any();
            let tracked = lock(&self.shared).pods.contains_key(&name);
            if let Some(deadline) = &pod.metadata.deletion_timestamp {
                if tracked {
                    if self.config.honour_grace_period && !self.grace_over(&name, deadline.0) {
                        continue;
                    }
                    self.stop_pod(&name, "terminating").await;
                }
                self.finalize_deletion(pod).await;
            } else if tracked {
                self.refresh_tokens(pod).await;
                self.report(pod).await;
            } else if matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ) {
                continue;
            } else if !self.config.honour_grace_period || self.bind(pod).await {
                self.start_pod(pod).await;
            }
        }
        let live: BTreeSet<&String> = uids.values().collect();
        self.pending.retain(|uid, _| live.contains(uid));
        self.deleting.retain(|uid, _| live.contains(uid));
        self.ended.retain(|uid| live.contains(uid));
    }

    /// For a terminating pod within its grace period: signals its agent (SIGTERM) and says
    /// whether it may be stopped now (the deadline has passed or the agent has exited).
    fn grace_over(&self, name: &str, deadline: Timestamp) -> bool {
        let shared = lock(&self.shared);
        let Some(st) = shared.pods.get(name) else {
            return true;
        };
        if !*st.terminating.borrow() {
            st.terminating.send_replace(true);
            tracing::info!(namespace = %self.namespace, pod = %name, %deadline, "pod terminating: grace period running");
        }
        Timestamp::now() >= deadline || st.agent_exited()
    }

    /// Binds the pod to [`NODE_NAME`] as a scheduler would (creating the Node first if
    /// needed). True when the pod is bound to it.
    async fn bind(&mut self, pod: &Pod) -> bool {
        match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            Some(NODE_NAME) => return true,
            Some(other) if !other.is_empty() => {
                self.pending(pod, format!("bound to another node {other:?}"));
                return false;
            }
            _ => {}
        }
        if !self.node_ready {
            let node = Node {
                metadata: kube::api::ObjectMeta {
                    name: Some(NODE_NAME.into()),
                    labels: Some([("keyward.dev/testbed".to_string(), "true".to_string())].into()),
                    ..Default::default()
                },
                ..Node::default()
            };
            match self
                .nodes_api
                .create(&kube::api::PostParams::default(), &node)
                .await
            {
                Ok(_) => self.node_ready = true,
                Err(kube::Error::Api(s)) if s.code == 409 => self.node_ready = true,
                Err(e) => {
                    self.pending(pod, format!("cannot create Node {NODE_NAME}: {e}"));
                    return false;
                }
            }
        }
        let name = pod.name_any();
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": pod.uid()},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE_NAME},
        });
        match self
            .pods_api
            .create_subresource::<_, Value>(
                "binding",
                &name,
                &kube::api::PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %self.namespace, pod = %name, node = NODE_NAME, "pod bound");
                true
            }
            Err(e) => {
                // Already bound (store behind), being deleted, or gone: the next pass decides.
                self.pending(pod, format!("cannot bind: {e}"));
                false
            }
        }
    }

    /// Runs a [`KubeletHandle`] request.
    async fn execute(&mut self, name: &str, action: Action) -> Result<(), KubeletError> {
        let pod = self
            .pods_api
            .get_opt(name)
            .await?
            .ok_or_else(|| KubeletError::NoSuchPod(name.to_string()))?;
        let uid = pod.uid().unwrap_or_default();
        if self.ended.contains(&uid) {
            return Err(KubeletError::AlreadyEnded(name.to_string()));
        }
        let started_at = {
            let shared = lock(&self.shared);
            shared
                .pods
                .get(name)
                .filter(|st| st.uid == uid)
                .map(|st| st.started_at)
        };
        let now = Timestamp::now();
        let patch = match action {
            Action::Unknown => {
                if started_at.is_none() {
                    return Err(KubeletError::NotRunning(name.to_string()));
                }
                if let Some(st) = lock(&self.shared).pods.get_mut(name) {
                    st.frozen = true;
                }
                json!({"metadata": {"uid": uid}, "status": {"phase": "Unknown"}})
            }
            Action::Evict | Action::Complete => {
                self.ended.insert(uid.clone());
                if started_at.is_some() {
                    let why = if action == Action::Evict {
                        "evicted"
                    } else {
                        "completed"
                    };
                    self.stop_pod(name, why).await;
                }
                terminal_status(
                    &pod,
                    action == Action::Evict,
                    started_at.unwrap_or(now),
                    now,
                )
            }
        };
        self.pods_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(namespace = %self.namespace, pod = %name, ?action, "pod status reported");
        Ok(())
    }

    /// Stops a pod as a kubelet does: its agent first, then its files; frees its IP last
    /// (until then, the handle still lists it).
    async fn stop_pod(&mut self, name: &str, why: &str) {
        let (agent, dir) = {
            let mut shared = lock(&self.shared);
            let Some(st) = shared.pods.get_mut(name) else {
                return;
            };
            (st.agent.take(), st.dir.clone())
        };
        if let Some(agent) = agent {
            agent.stop().await;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(pod = %name, "cannot remove {}: {e}", dir.display());
        }
        if let Some(st) = lock(&self.shared).pods.remove(name) {
            tracing::info!(namespace = %self.namespace, pod = %name, ip = %st.lease.ip(), "pod stopped ({why})");
        }
    }

    /// The kubelet's part of graceful deletion: once the pod's containers are stopped, it
    /// deletes the pod with grace period 0 (only that pod: uid precondition).
    async fn finalize_deletion(&mut self, pod: &Pod) {
        let uid = pod.uid().unwrap_or_default();
        if self
            .deleting
            .get(&uid)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(2))
        {
            return;
        }
        self.deleting.insert(uid.clone(), Instant::now());
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let name = pod.name_any();
        match self.pods_api.delete(&name, &params).await {
            Ok(_) => {
                tracing::info!(namespace = %self.namespace, pod = %name, "terminating pod deleted (grace period 0)")
            }
            // Gone, or already replaced by a pod of the same name (uid precondition failed):
            // an unscheduled pod is deleted at once, the store may show its last state.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(namespace = %self.namespace, pod = %name, "cannot finalize deletion: {e}")
            }
        }
    }

    fn pending(&mut self, pod: &Pod, reason: String) {
        let uid = pod.uid().unwrap_or_default();
        if self.pending.get(&uid) != Some(&reason) {
            tracing::info!(namespace = %self.namespace, pod = %pod.name_any(), "pod pending: {reason}");
            self.pending.insert(uid, reason);
        }
    }

    fn secret(&self, name: &str) -> Option<Arc<Secret>> {
        self.secrets
            .get(&ObjectRef::new(name).within(&self.namespace))
    }

    async fn start_pod(&mut self, pod: &Arc<Pod>) {
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let volumes = secret_volumes(pod);
        let mut projected = Vec::with_capacity(volumes.len());
        for vol in &volumes {
            match project(vol, self.secret(&vol.secret).as_deref()) {
                Ok(files) => projected.push((vol.volume.clone(), files)),
                Err(why) => {
                    return self.pending(pod, format!("volume {:?}: {why}", vol.volume));
                }
            }
        }
        let projected_vols = projected_volumes(pod);
        let mut projected_files = Vec::with_capacity(projected_vols.len());
        let mut token_refresh: Option<Timestamp> = None;
        for vol in &projected_vols {
            match self.project_volume(pod, vol).await {
                Ok((files, refresh)) => {
                    projected_files.push((vol.volume.clone(), files));
                    token_refresh = earliest(token_refresh, refresh);
                }
                Err(why) => {
                    return self.pending(pod, format!("volume {:?}: {why}", vol.volume));
                }
            }
        }
        // A pod already running (reported by an earlier kubelet) keeps its IP if it can.
        let previous_ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        let Some(lease) = previous_ip
            .and_then(IpLease::reserve)
            .or_else(|| self.pool.allocate())
        else {
            return self.pending(pod, "no free loopback IP".into());
        };
        let dir = self.root.join(&name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return self.pending(pod, format!("cannot clean {}: {e}", dir.display()));
        }
        let token_at_start = projected
            .first()
            .and_then(|(_, files)| files.get(Path::new("token")))
            .map(|(content, _)| String::from_utf8_lossy(content).into_owned());
        let mut written = BTreeMap::new();
        for (volume, files) in projected.iter().chain(&projected_files) {
            if let Err(e) = sync_dir(&dir.join(volume), files, &BTreeSet::new()) {
                return self.pending(pod, format!("cannot write volume {volume:?}: {e}"));
            }
            written.insert(volume.clone(), files.keys().cloned().collect());
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return self.pending(pod, format!("cannot create {}: {e}", dir.display()));
        }
        let ip = lease.ip();
        let (terminating, termination) = watch::channel(false);
        let state = PodState {
            uid: uid.clone(),
            lease,
            dir: dir.clone(),
            volumes,
            projected: projected_vols,
            token_refresh,
            written,
            started_at: Timestamp::now(),
            reported_ready: None,
            agent: None,
            token_at_start: token_at_start.clone(),
            frozen: false,
            terminating,
        };
        let agent = self.config.agent.as_ref().map(|factory| {
            let info = PodInfo {
                name: name.clone(),
                namespace: self.namespace.clone(),
                uid: uid.clone(),
                ip,
                dir: dir.clone(),
                secret_dirs: state.secret_dirs(),
                projected_dirs: state.projected_dirs(),
                labels: pod.labels().clone(),
                annotations: pod.annotations().clone(),
                pod: pod.clone(),
                termination: Termination::new(termination),
            };
            AgentTask(Some(tokio::spawn(factory.start(info))))
        });
        self.pending.remove(&uid);
        {
            let mut shared = lock(&self.shared);
            shared
                .pods
                .insert(name.clone(), PodState { agent, ..state });
            shared.started.insert(name.clone(), (uid, token_at_start));
        }
        tracing::info!(namespace = %self.namespace, pod = %name, %ip, "pod started");
        self.report(pod).await;
    }

    /// The files of a projected volume of `pod`, and when its earliest token is due for
    /// refresh. `Err` when a required source cannot be read or a token cannot be had.
    async fn project_volume(
        &self,
        pod: &Pod,
        vol: &ProjectedVolume,
    ) -> Result<(Files, Option<Timestamp>), String> {
        let mode = vol.default_mode.unwrap_or(0o644) as u32;
        let mut files = Files::new();
        let mut refresh = None;
        for source in &vol.sources {
            match source {
                Source::Token {
                    audience,
                    expiration_seconds,
                    path,
                } => {
                    let (token, due) = self
                        .request_token(pod, audience.as_deref(), *expiration_seconds)
                        .await?;
                    files.insert(path.clone(), (token.into_bytes(), mode));
                    refresh = earliest(refresh, Some(due));
                }
                Source::ConfigMap {
                    name,
                    items,
                    optional,
                }
                | Source::Secret {
                    name,
                    items,
                    optional,
                } => {
                    let (what, data) = if matches!(source, Source::ConfigMap { .. }) {
                        let data = self.config_map_data(name).await?;
                        (format!("configmap {name:?}"), data)
                    } else {
                        let data = self.secret(name).map(|s| secret_data(&s));
                        (format!("secret {name:?}"), data)
                    };
                    let Some(data) = data else {
                        if *optional {
                            continue;
                        }
                        return Err(format!("{what} not found"));
                    };
                    files.extend(project_keys(
                        &what,
                        data,
                        items.as_deref(),
                        *optional,
                        mode,
                    )?);
                }
                Source::Field { field_path, path } => {
                    let value = projected::field_value(pod, field_path)
                        .ok_or_else(|| format!("unsupported downward-API field {field_path:?}"))?;
                    let path = safe_relative(&path.to_string_lossy())
                        .ok_or_else(|| format!("bad path {path:?}"))?;
                    files.insert(path, (value.into_bytes(), mode));
                }
            }
        }
        Ok((files, refresh))
    }

    /// The `data` and `binaryData` of ConfigMap `name` as bytes (`None`: no such ConfigMap).
    async fn config_map_data(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let cm = self
            .config_maps_api
            .get_opt(name)
            .await
            .map_err(|e| format!("cannot read configmap {name:?}: {e}"))?;
        Ok(cm.map(|cm| {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, v.0);
            }
            data
        }))
    }

    /// A ServiceAccount token bound to `pod` from the TokenRequest API (as the kubelet
    /// requests it: the pod's ServiceAccount, bound to the pod's name and uid), and when it
    /// is due for refresh.
    async fn request_token(
        &self,
        pod: &Pod,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<(String, Timestamp), String> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let body = projected::token_request(pod, audience, expiration_seconds);
        let issued = Timestamp::now();
        let response: TokenRequest = self
            .service_accounts_api
            .create_subresource("token", sa, &kube::api::PostParams::default(), &body)
            .await
            .map_err(|e| format!("TokenRequest for serviceaccount {sa:?} failed: {e}"))?;
        let status = response
            .status
            .ok_or_else(|| format!("TokenRequest for serviceaccount {sa:?} has no status"))?;
        Ok((
            status.token,
            projected::refresh_at(issued, status.expiration_timestamp.0),
        ))
    }

    /// Re-projects the projected volumes of a running pod whose token is due for refresh.
    async fn refresh_tokens(&mut self, pod: &Pod) {
        let name = pod.name_any();
        let (vols, dir) = {
            let shared = lock(&self.shared);
            let Some(st) = shared.pods.get(&name) else {
                return;
            };
            match st.token_refresh {
                Some(due) if Timestamp::now() >= due => (st.projected.clone(), st.dir.clone()),
                _ => return,
            }
        };
        let mut next = None;
        let mut results = Vec::new();
        for vol in &vols {
            match self.project_volume(pod, vol).await {
                Ok((files, refresh)) => {
                    next = earliest(next, refresh);
                    results.push((vol.volume.clone(), files));
                }
                Err(why) => {
                    // As the kubelet: keep the old files and try again at the next pass.
                    tracing::warn!(namespace = %self.namespace, pod = %name, volume = %vol.volume, "cannot refresh: {why}");
                    return;
                }
            }
        }
        let mut shared = lock(&self.shared);
        let Some(st) = shared.pods.get_mut(&name) else {
            return;
        };
        for (volume, files) in results {
            let previous = st.written.get(&volume).cloned().unwrap_or_default();
            match sync_dir(&dir.join(&volume), &files, &previous) {
                Ok(_) => {
                    st.written.insert(volume, files.into_keys().collect());
                }
                Err(e) => {
                    tracing::warn!(namespace = %self.namespace, pod = %name, %volume, "cannot write refreshed token: {e}");
                    return;
                }
            }
        }
        st.token_refresh = next;
        tracing::info!(namespace = %self.namespace, pod = %name, "projected ServiceAccount tokens refreshed");
    }

    /// Patches the pod's status if what it should say differs from what was last reported.
    async fn report(&mut self, pod: &Pod) {
        let name = pod.name_any();
        let ready = (self.config.ready)(pod);
        let (ip, started_at) = {
            let shared = lock(&self.shared);
            let Some(st) = shared.pods.get(&name) else {
                return;
            };
            if st.reported_ready == Some(ready) || st.frozen {
                return;
            }
            (st.lease.ip(), st.started_at)
        };
        let patch = running_status(pod, ip, started_at, ready, Timestamp::now());
        match self
            .pods_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                if let Some(st) = lock(&self.shared).pods.get_mut(&name) {
                    st.reported_ready = Some(ready);
                }
                tracing::info!(namespace = %self.namespace, pod = %name, %ip, ready, "pod status reported: Running");
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                tracing::warn!(namespace = %self.namespace, pod = %name, "cannot report pod status (retrying): {e}")
            }
        }
    }

    /// Rewrites the files of running pods that mount Secret `secret`.
    fn sync_secret(&mut self, secret: &str) {
        let current = self.secret(secret);
        let mut shared = lock(&self.shared);
        for (pod, st) in shared.pods.iter_mut() {
            for vol in st.volumes.iter().filter(|v| v.secret == secret) {
                let files = match project(vol, current.as_deref()) {
                    Ok(files) => files,
                    Err(why) => {
                        // As the kubelet: keep the last files when the Secret cannot be read.
                        tracing::warn!(namespace = %self.namespace, %pod, volume = %vol.volume, "cannot sync: {why}");
                        continue;
                    }
                };
                let previous = st.written.get(&vol.volume).cloned().unwrap_or_default();
                match sync_dir(&st.dir.join(&vol.volume), &files, &previous) {
                    Ok(changed) => {
                        if changed {
                            tracing::info!(namespace = %self.namespace, %pod, volume = %vol.volume, %secret, "secret volume updated");
                        }
                        st.written
                            .insert(vol.volume.clone(), files.into_keys().collect());
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %self.namespace, %pod, volume = %vol.volume, "cannot sync: {e}")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use kube::api::ObjectMeta;

    #[test]
    fn status_patch_reports_running_ready_with_ip() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("img".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        };
        let t = Timestamp::now();
        let v = running_status(&pod, Ipv4Addr::new(127, 10, 0, 2), t, true, t);
        assert_eq!(v["metadata"]["uid"], "u1");
        let s = &v["status"];
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "127.10.0.2");
        assert_eq!(s["containerStatuses"][0]["ready"], true);
        let conds = s["conditions"].as_array().unwrap();
        assert!(conds.iter().all(|c| c["status"] == "True"));
        let withheld = running_status(&pod, Ipv4Addr::new(127, 10, 0, 2), t, false, t);
        let ready = withheld["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .cloned();
        assert_eq!(ready.unwrap()["status"], "False");
    }

    #[test]
    fn terminal_patches_report_evicted_and_succeeded() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("img".into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        };
        let t = Timestamp::now();
        let evicted = terminal_status(&pod, true, t, t);
        assert_eq!(evicted["metadata"]["uid"], "u1");
        assert_eq!(evicted["status"]["phase"], "Failed");
        assert_eq!(evicted["status"]["reason"], "Evicted");
        let c = &evicted["status"]["containerStatuses"][0];
        assert_eq!(c["ready"], false);
        assert_eq!(c["state"]["terminated"]["exitCode"], 137);
        let done = terminal_status(&pod, false, t, t);
        assert_eq!(done["status"]["phase"], "Succeeded");
        assert!(done["status"].get("reason").is_none());
        assert_eq!(
            done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
            0
        );
        let conds = done["status"]["conditions"].as_array().unwrap();
        let ready = conds.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["status"], "False");
    }
}
