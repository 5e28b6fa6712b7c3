//! The scenario bed: one namespace with its own stand-in kubelet running OPA-like agents, its
//! own bundle server, watch-based histories of everything that matters, the operator (in
//! process or as the real binary), object builders, waits and the checks shared by scenarios.

// The crash scenario (feature `fault-injection`) is the only user of the operator process and
// of a few readers.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code))]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use keyward::api::{PolicyAgent, ProvisioningKey};
use keyward::controller::{self, OperatorConfig, WriteCounter};
use keyward::keys::Jwks;
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::{
    Kubelet, KubeletConfig, KubeletHandle, OpaProcess, RunningPod, TestNamespace, eventually,
    wait_for,
};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::bundle_server::{Access, BundleServer, Outcome, Snapshot};
use super::opa_agent::{OpaAgent, PORT};

/// Timeout of a wait for something the operator should do within a rotation.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Polling interval of `eventually` waits.
pub const POLL: Duration = Duration::from_millis(200);
/// Name of the ProvisioningKey (and of its agent Secret) in every scenario.
pub const PK: &str = "opa-agents";
/// The token audience the bundle server accepts.
pub const AUDIENCE: &str = "bundle-service";
/// The pod volume holding the agent Secret.
pub const VOLUME: &str = "keyward";
/// The projected volume with the pod's ServiceAccount token for the keyward audience.
pub const POD_TOKEN_VOLUME: &str = "keyward-pod-token";
/// The two workloads and their PolicyAgents (same names).
pub const DEPLOY: &str = "opa-deploy";
pub const STS: &str = "opa-sts";
pub const REPLICAS: i32 = 2;

/// Seconds between two instants (negative if `b` is before `a`), for timing lines.
pub fn secs(a: Instant, b: Instant) -> f64 {
    if b >= a {
        (b - a).as_secs_f64()
    } else {
        -(a - b).as_secs_f64()
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes access.

pub use keyward_testbed::kube_config;

fn from_json<K: DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).expect("a well-formed object")
}

// ---------------------------------------------------------------------------------------------
// Watch-based histories: every distinct state of every watched object, with the instant the
// test saw it. (The bundle server's request log is the other, independent record.)

/// One observed change of one object (`value: None` = deleted).
#[derive(Clone, Debug)]
pub struct Change<T> {
    pub at: Instant,
    pub name: String,
    pub value: Option<T>,
}

/// A record of changes fed by one or more watches; the watches stop when it is dropped.
pub struct History<T> {
    changes: Arc<Mutex<Vec<Change<T>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl<T> Drop for History<T> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<T: Clone + PartialEq + Send + 'static> History<T> {
    pub fn new() -> Self {
        History {
            changes: Arc::new(Mutex::new(Vec::new())),
            tasks: Vec::new(),
        }
    }

    /// Adds a watch of `api`; each object is recorded as `<prefix><name>` with value `f(obj)`,
    /// whenever that value differs from the last one recorded for it.
    pub fn watch<K>(
        mut self,
        api: Api<K>,
        config: watcher::Config,
        prefix: &'static str,
        f: impl Fn(&K) -> T + Send + 'static,
    ) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let changes = self.changes.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut events =
                pin!(watcher::watcher(api, config).backoff(keyward_testbed::BedBackoff::new()));
            let mut failing = false;
            while let Some(ev) = events.next().await {
                let (obj, deleted) = match ev {
                    Ok(Event::Apply(o) | Event::InitApply(o)) => {
                        failing = false;
                        (o, false)
                    }
                    Ok(Event::Delete(o)) => (o, true),
                    Ok(_) => {
                        failing = false;
                        continue;
                    }
                    Err(e) => {
                        // Once per streak: an API server outage fails every retry.
                        if !failing {
                            eprintln!("[e2e] history watch error (retrying): {e}");
                        }
                        failing = true;
                        continue;
                    }
                };
                let name = format!("{prefix}{}", obj.name_any());
                let value = (!deleted).then(|| f(&obj));
                let mut changes = changes.lock().unwrap_or_else(|e| e.into_inner());
                let last = changes.iter().rev().find(|c| c.name == name);
                if last.map(|c| &c.value) != Some(&value) {
                    changes.push(Change {
                        at: Instant::now(),
                        name,
                        value,
                    });
                }
            }
        }));
        self
    }

    pub fn all(&self) -> Vec<Change<T>> {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The changes of one object, in order.
    pub fn of(&self, name: &str) -> Vec<Change<T>> {
        self.all().into_iter().filter(|c| c.name == name).collect()
    }

    /// The first change after `since` whose value satisfies `pred`.
    pub fn first(&self, since: Instant, pred: impl Fn(&Change<T>) -> bool) -> Option<Change<T>> {
        self.all().into_iter().find(|c| c.at >= since && pred(c))
    }
}

/// A key Secret as seen by the test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyObs {
    pub seq: u32,
    pub kid: String,
    pub state: String,
}

fn key_obs(s: &Secret) -> KeyObs {
    KeyObs {
        seq: s
            .labels()
            .get(l::KEY_SEQ)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        kid: s.annotations().get(l::KEY_ID).cloned().unwrap_or_default(),
        state: s.labels().get(l::KEY_STATE).cloned().unwrap_or_default(),
    }
}

fn bundle_snapshot(cm: &ConfigMap) -> Snapshot {
    let data = cm.data.clone().unwrap_or_default();
    Snapshot {
        trusted: data
            .get(l::DATA_JWKS)
            .and_then(|j| serde_json::from_str::<Jwks>(j).ok())
            .map(|j| j.key_ids())
            .unwrap_or_default(),
        revoked: data
            .get(l::DATA_REVOKED)
            .and_then(|j| serde_json::from_str::<Vec<String>>(j).ok())
            .unwrap_or_default(),
    }
}

/// The workload state the history records: generation and the key id in the pod template.
pub type Template = (i64, Option<String>);

fn template_kid(
    meta: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> Option<String> {
    meta.and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(l::KEY_ID))
        .cloned()
}

// ---------------------------------------------------------------------------------------------
// The operator.

/// The operator in-process, watching one namespace, floors lowered.
pub struct InProcessOperator {
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessOperator {
    pub async fn start(namespace: &str) -> Self {
        Self::start_with_verifiers(namespace, None).await
    }

    /// As [`InProcessOperator::start`], reading the `keyward verifier` replicas' Leases in
    /// `verifier_namespace` (`--verifier-namespace`).
    pub async fn start_with_verifiers(namespace: &str, verifier_namespace: Option<&str>) -> Self {
        let writes = WriteCounter::default();
        let client = controller::counting_client(kube_config().await, &writes)
            .expect("the operator's client");
        let config = OperatorConfig {
            namespaces: vec![namespace.to_string()],
            floors: Floors::none(),
            max_concurrent_rolls: 5,
            instance: format!("e2e-{namespace}"),
            verifier_namespace: verifier_namespace.map(str::to_string),
            ..OperatorConfig::default()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let obs = controller::Observability::new(&writes);
        let task = tokio::spawn(controller::run(client, config, writes, obs, async move {
            let _ = rx.await;
        }));
        InProcessOperator {
            shutdown: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            eprintln!("[e2e] the in-process operator did not stop within 15 s; aborted");
        }
    }
}

impl Drop for InProcessOperator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The real `keyward` binary as a child process (floors lowered, one namespace), its output in
/// a log file. Killed (by its pid, SIGKILL) when dropped.
pub struct OperatorProcess {
    child: std::process::Child,
    log: PathBuf,
}

/// A private copy of the `keyward` binary Cargo built for this test run, checked to be a
/// `fault-injection` build (see [`keyward_testbed::private_binary_copy`]).
pub fn private_operator_binary(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    keyward_testbed::private_binary_copy(
        env!("CARGO_BIN_EXE_keyward"),
        dir,
        keyward::fault::ABORT_MESSAGE.as_bytes(),
    )
}

impl OperatorProcess {
    /// Starts `<binary> run`; with `crash_after`, sets `KEYWARD_CRASH_AFTER`.
    pub fn start(
        binary: &std::path::Path,
        namespace: &str,
        crash_after: Option<&str>,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, namespace, crash_after, &[], &[], log)
    }

    /// As [`OperatorProcess::start`], with more arguments and environment variables.
    pub fn start_with(
        binary: &std::path::Path,
        namespace: &str,
        crash_after: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = std::process::Command::new(binary);
        cmd.args([
            "run",
            "--namespaces",
            namespace,
            // Ephemeral ports: parallel operators (and the stand-in kubelet's agents on
            // <pod IP>:8080) never collide.
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ])
        .args(keyward_testbed::LOWERED_FLOORS)
        .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
        .env("RUST_LOG", "info,kube=warn")
        .env("NO_COLOR", "1")
        .env_remove("KEYWARD_CRASH_AFTER")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
        if let Some(point) = crash_after {
            cmd.env("KEYWARD_CRASH_AFTER", point);
        }
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawn the keyward binary")?;
        Ok(OperatorProcess { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of its output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the operator (pid {}) did not exit within {timeout:?}; last output:\n{}",
                    self.pid(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, `KILL`) to this process only, by its pid.
    #[allow(dead_code)] // used by e2e/ha.rs, not by e2e/rotation.rs
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .context("run kill")?;
        ensure!(status.success(), "kill -{signal} {} failed", self.pid());
        Ok(())
    }

    /// SIGKILL (this process only) and reap it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The bed.

/// Workload counters before a rotation, to count its rolls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workloads {
    pub deploy_generation: i64,
    pub deploy_kid: Option<String>,
    pub deploy_replica_sets: usize,
    pub sts_generation: i64,
    pub sts_kid: Option<String>,
    pub sts_revisions: usize,
}

/// What a rotation check needs.
#[derive(Clone, Debug)]
pub struct Rotation {
    pub old: String,
    pub new: String,
    pub new_seq: u32,
    pub before: Workloads,
    /// When the rotation was triggered (or, for a scheduled one, when the test started waiting).
    pub since: Instant,
    /// Refusals the scenario provokes on purpose, as `(kid, outcome)`.
    pub allowed_refusals: Vec<(String, Outcome)>,
    /// The spec's `publishDelay`: the new key must be in the trust bundle at least this long
    /// before it is made current and handed out, less 1.5 s: 1 s because Keyward's timestamps
    /// are whole seconds (`published-at` is truncated, so the wait can be up to 1 s short), and
    /// 0.5 s for the lag between the two watches that time it.
    pub publish_delay: Duration,
}

/// Key timings of one rotation, from the test's histories and the bundle server's log.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub minted: Option<f64>,
    pub trusted: Option<f64>,
    pub activated: Option<f64>,
    pub deploy_confirmed: Option<f64>,
    pub sts_confirmed: Option<f64>,
    pub last_pod_connected: Option<f64>,
    pub revoked: Option<f64>,
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}s"));
        write!(
            f,
            "minted {} | in trust bundle {} | activated+handed out {} | {DEPLOY} confirmed {} | {STS} confirmed {} | last new pod's first accepted download {} | old key revoked {}",
            s(self.minted),
            s(self.trusted),
            s(self.activated),
            s(self.deploy_confirmed),
            s(self.sts_confirmed),
            s(self.last_pod_connected),
            s(self.revoked)
        )
    }
}

pub struct Bed {
    pub label: String,
    pub started: Instant,
    pub client: Client,
    pub ns: String,
    namespace: Option<TestNamespace>,
    pub server: BundleServer,
    kubelet: Option<KubeletHandle>,
    pub keys: History<KeyObs>,
    pub bundle: History<Snapshot>,
    pub agents: History<Option<String>>,
    pub workloads: History<Template>,
    pub dir: tempfile::TempDir,
}

impl Drop for Bed {
    fn drop(&mut self) {
        if Self::keep()
            && let Some(ns) = self.namespace.take()
        {
            eprintln!("[e2e {}] keeping namespace {}", self.label, self.ns);
            std::mem::forget(ns);
        }
    }
}

/// What runs in the bed's agent pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agents {
    /// The in-process OPA-like agent ([`OpaAgent`]): fast, health strictly tied to the last
    /// download.
    InProcess,
    /// A real `opa run --server` per pod ([`keyward_testbed::OpaProcess`], built by
    /// `e2e/opa.sh`), polling its bundle every second.
    RealOpa,
}

impl Bed {
    /// A fresh namespace with its bundle server, kubelet (in-process OPA-like agents) and
    /// histories (used by `e2e/ha.rs`; `e2e/rotation.rs` runs real OPA).
    #[allow(dead_code)]
    pub async fn new(label: &str) -> Self {
        Self::with_options(label, Duration::from_secs(2), Agents::InProcess).await
    }

    /// As [`Bed::new`], with a real OPA process in every agent pod.
    pub async fn real_opa(label: &str) -> Self {
        Self::with_options(label, Duration::from_secs(2), Agents::RealOpa).await
    }

    /// As [`Bed::new`], with the kubelet refreshing Secret volumes of running pods after
    /// `delay` (the default is 2 s; a real kubelet takes up to a minute or two).
    pub async fn with_secret_sync_delay(label: &str, delay: Duration) -> Self {
        Self::with_options(label, delay, Agents::InProcess).await
    }

    /// A bed with Secret volumes synced after `delay` and `mode` agents in the pods.
    ///
    /// # Panics
    /// With `Agents::RealOpa`, when no `opa` binary can be had (`e2e/opa.sh` says why).
    pub async fn with_options(label: &str, delay: Duration, mode: Agents) -> Self {
        Self::build(label, delay, mode, None).await
    }

    /// A bed whose real OPA agents download their bundle from `service_url` (e.g. nginx in
    /// front of `keyward verifier`) instead of the bed's bundle server.
    pub async fn real_opa_via(label: &str, service_url: String) -> Self {
        Self::build(
            label,
            Duration::from_secs(2),
            Agents::RealOpa,
            Some(service_url),
        )
        .await
    }

    async fn build(
        label: &str,
        delay: Duration,
        mode: Agents,
        service_url: Option<String>,
    ) -> Self {
        keyward_testbed::init_tracing();
        let started = Instant::now();
        let namespace = TestNamespace::new(&format!("e2e-{label}")).await;
        let client = namespace.client();
        let ns = namespace.name().to_string();
        let server = BundleServer::start(namespace.api(), &format!("{PK}-trust"), AUDIENCE).await;
        let config = KubeletConfig::default().with_secret_sync_delay(delay);
        let config = match mode {
            Agents::InProcess => config.with_agent(OpaAgent::new(server.url(), VOLUME)),
            Agents::RealOpa => {
                let binary = tokio::task::spawn_blocking(keyward_testbed::opa_binary)
                    .await
                    .expect("locate opa")
                    .unwrap_or_else(|e| panic!("no real OPA for the end-to-end tests: {e}"));
                let opa = match service_url.clone() {
                    // Through the control plane (nginx and the verifier): each pod's OPA
                    // downloads through `keyward agent-proxy`, which adds the pod's token, so
                    // the verifier can tell which pod acknowledged a key.
                    Some(url) => OpaProcess::new(binary, url, VOLUME).with_agent_proxy(
                        keyward_testbed::AgentProxy {
                            binary: env!("CARGO_BIN_EXE_keyward").into(),
                            volume: POD_TOKEN_VOLUME.into(),
                            path: "pod-token".into(),
                            port: 8182,
                        },
                    ),
                    None => OpaProcess::new(binary, server.url(), VOLUME),
                };
                config.with_agent(opa)
            }
        };
        let kubelet = Kubelet::start(client.clone(), &ns, config);
        let managed = || watcher::Config::default().labels(l::MANAGED_SELECTOR);
        let keys = History::new().watch(
            namespace.api::<Secret>(),
            watcher::Config::default().labels(&format!("{}={}", l::COMPONENT, l::COMPONENT_KEY)),
            "",
            key_obs,
        );
        let bundle = History::new().watch(
            namespace.api::<ConfigMap>(),
            managed().fields(&format!("metadata.name={PK}-trust")),
            "",
            bundle_snapshot,
        );
        let agents = History::new().watch(
            namespace.api::<PolicyAgent>(),
            watcher::Config::default(),
            "",
            |pa: &PolicyAgent| pa.status.as_ref().and_then(|s| s.confirmed_key_id.clone()),
        );
        let workloads = History::new()
            .watch(
                namespace.api::<Deployment>(),
                watcher::Config::default(),
                "Deployment/",
                |d: &Deployment| {
                    (
                        d.metadata.generation.unwrap_or(0),
                        template_kid(d.spec.as_ref().and_then(|s| s.template.metadata.as_ref())),
                    )
                },
            )
            .watch(
                namespace.api::<StatefulSet>(),
                watcher::Config::default(),
                "StatefulSet/",
                |s: &StatefulSet| {
                    (
                        s.metadata.generation.unwrap_or(0),
                        template_kid(s.spec.as_ref().and_then(|s| s.template.metadata.as_ref())),
                    )
                },
            );
        let dir = tempfile::Builder::new()
            .prefix(&format!("keyward-e2e-{ns}-"))
            .tempdir()
            .expect("a temporary directory");
        let bed = Bed {
            label: label.to_string(),
            started,
            client,
            ns,
            namespace: Some(namespace),
            server,
            kubelet: Some(kubelet),
            keys,
            bundle,
            agents,
            workloads,
            dir,
        };
        bed.say(format!(
            "namespace {} ready, bundle server at {}, agents: {mode:?}",
            bed.ns,
            service_url.unwrap_or_else(|| bed.server.url())
        ));
        bed
    }

    /// Stops the kubelet and deletes the namespace (kept with `KEYWARD_E2E_KEEP=1`; a bed
    /// dropped without `finish`, as when a scenario fails, deletes it too unless so kept).
    pub async fn finish(mut self) {
        if let Some(k) = self.kubelet.take() {
            k.shutdown().await;
        }
        if let Some(ns) = self.namespace.take() {
            if Self::keep() {
                self.say(format!("keeping namespace {}", self.ns));
                std::mem::forget(ns);
            } else {
                ns.cleanup().await;
            }
        }
    }

    fn keep() -> bool {
        std::env::var_os("KEYWARD_E2E_KEEP").is_some()
    }

    /// A `[e2e <scenario> +<seconds>]` progress line on stderr.
    pub fn say(&self, msg: impl std::fmt::Display) {
        eprintln!(
            "[e2e {} +{:.1}s] {msg}",
            self.label,
            self.started.elapsed().as_secs_f64()
        );
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn running_pods(&self) -> Vec<RunningPod> {
        self.kubelet
            .as_ref()
            .map(KubeletHandle::running_pods)
            .unwrap_or_default()
    }

    // --- objects ------------------------------------------------------------------------------

    /// Creates the ProvisioningKey with `rotation` (and the audience the server expects).
    pub async fn create_key(&self, rotation: Value) -> anyhow::Result<()> {
        self.create_key_with_claims(rotation, json!({})).await
    }

    /// [`Bed::create_key`] with static token claims (`spec.token.claims`).
    pub async fn create_key_with_claims(
        &self,
        rotation: Value,
        claims: Value,
    ) -> anyhow::Result<()> {
        let pk: ProvisioningKey = from_json(json!({
            "apiVersion": "keyward.dev/v1alpha1",
            "kind": "ProvisioningKey",
            "metadata": { "name": PK },
            "spec": { "rotation": rotation, "token": { "audience": AUDIENCE, "claims": claims } },
        }));
        self.api::<ProvisioningKey>()
            .create(&PostParams::default(), &pk)
            .await
            .context("create the ProvisioningKey")?;
        Ok(())
    }

    fn pod_template(app: &str) -> Value {
        json!({
            "metadata": { "labels": { "app": app } },
            "spec": {
                "containers": [{
                    "name": "opa",
                    "image": "openpolicyagent/opa:e2e",
                    "ports": [{ "containerPort": PORT }],
                    "volumeMounts": [
                        { "name": VOLUME, "mountPath": "/var/run/keyward", "readOnly": true },
                        { "name": POD_TOKEN_VOLUME, "mountPath": "/var/run/secrets/keyward", "readOnly": true },
                    ],
                }],
                "volumes": [
                    { "name": VOLUME, "secret": { "secretName": PK } },
                    // The pod's token for the verifier (docs/agent-proxy.md).
                    { "name": POD_TOKEN_VOLUME, "projected": { "sources": [{ "serviceAccountToken": {
                        "audience": "keyward", "expirationSeconds": 3600, "path": "pod-token" } }] } },
                ],
            },
        })
    }

    /// Creates the Deployment and the StatefulSet (2 replicas each, mounting the agent Secret).
    pub async fn create_workloads(&self) -> anyhow::Result<()> {
        let deploy: Deployment = from_json(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": DEPLOY },
            "spec": {
                "replicas": REPLICAS,
                "selector": { "matchLabels": { "app": DEPLOY } },
                "template": Self::pod_template(DEPLOY),
            },
        }));
        let sts: StatefulSet = from_json(json!({
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": { "name": STS },
            "spec": {
                "replicas": REPLICAS,
                "serviceName": STS,
                "selector": { "matchLabels": { "app": STS } },
                "template": Self::pod_template(STS),
            },
        }));
        let pp = PostParams::default();
        self.api::<Deployment>()
            .create(&pp, &deploy)
            .await
            .context("create Deployment")?;
        self.api::<StatefulSet>()
            .create(&pp, &sts)
            .await
            .context("create StatefulSet")?;
        Ok(())
    }

    /// Creates the two workloads and a PolicyAgent for each.
    pub async fn create_agents(&self) -> anyhow::Result<()> {
        self.create_agents_checked(json!({
            "http": { "port": PORT, "successThreshold": 2, "period": "500ms" },
        }))
        .await
    }

    /// [`Bed::create_agents`] with `check` as the PolicyAgents' `connectivityCheck`.
    pub async fn create_agents_checked(&self, check: Value) -> anyhow::Result<()> {
        self.create_workloads().await?;
        let pp = PostParams::default();
        for (kind, name) in [("Deployment", DEPLOY), ("StatefulSet", STS)] {
            let pa: PolicyAgent = from_json(json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "PolicyAgent",
                "metadata": { "name": name },
                "spec": {
                    "provisioningKeyRef": { "name": PK },
                    "workloadRef": { "kind": kind, "name": name },
                    "connectivityCheck": check,
                },
            }));
            self.api::<PolicyAgent>()
                .create(&pp, &pa)
                .await
                .with_context(|| format!("create PolicyAgent {name}"))?;
        }
        Ok(())
    }

    /// Creates the key, waits for it to be handed out, creates the agents and waits until both
    /// PolicyAgents are confirmed on it. Returns the first key id.
    pub async fn set_up(&self, rotation: Value) -> anyhow::Result<String> {
        self.set_up_with_claims(rotation, json!({})).await
    }

    /// [`Bed::set_up`] with static token claims (`spec.token.claims`).
    pub async fn set_up_with_claims(
        &self,
        rotation: Value,
        claims: Value,
    ) -> anyhow::Result<String> {
        self.create_key_with_claims(rotation, claims).await?;
        let kid = self.wait_handed_out(|_| true).await?;
        self.say(format!("first key {kid} handed out"));
        self.create_agents().await?;
        self.wait_confirmed(&kid).await?;
        self.say("both PolicyAgents confirmed on the first key");
        Ok(kid)
    }

    // --- reads ----------------------------------------------------------------------------------

    pub async fn key_secrets(&self) -> anyhow::Result<Vec<KeyObs>> {
        let sel = format!(
            "{}={PK},{}={}",
            l::PROVISIONING_KEY,
            l::COMPONENT,
            l::COMPONENT_KEY
        );
        let mut keys: Vec<KeyObs> = self
            .api::<Secret>()
            .list(&ListParams::default().labels(&sel))
            .await?
            .items
            .iter()
            .map(key_obs)
            .collect();
        keys.sort_by_key(|k| k.seq);
        Ok(keys)
    }

    pub async fn key_state(&self, kid: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .key_secrets()
            .await?
            .into_iter()
            .find(|k| k.kid == kid)
            .map(|k| k.state))
    }

    pub async fn trust_bundle(&self) -> anyhow::Result<Option<Snapshot>> {
        Ok(self
            .api::<ConfigMap>()
            .get_opt(&format!("{PK}-trust"))
            .await?
            .as_ref()
            .map(bundle_snapshot))
    }

    /// An annotation of key Secret `seq`.
    pub async fn key_annotation(&self, seq: u32, key: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .api::<Secret>()
            .get_opt(&format!("{PK}-k{seq}"))
            .await?
            .and_then(|s| s.annotations().get(key).cloned()))
    }

    /// How many of the two PolicyAgents report `status.confirmedKeyId == kid`.
    pub async fn confirmed_count(&self, kid: &str) -> anyhow::Result<usize> {
        let mut n = 0;
        for name in [DEPLOY, STS] {
            let pa = self.api::<PolicyAgent>().get(name).await?;
            if pa.status.and_then(|s| s.confirmed_key_id).as_deref() == Some(kid) {
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn handed_out_kid(&self) -> anyhow::Result<Option<String>> {
        Ok(self.api::<Secret>().get_opt(PK).await?.and_then(|s| {
            s.data.and_then(|d| {
                d.get(l::DATA_KEY_ID)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
        }))
    }

    pub async fn key(&self) -> anyhow::Result<ProvisioningKey> {
        Ok(self.api::<ProvisioningKey>().get(PK).await?)
    }

    /// Current generation, template key id and revision counts of both workloads.
    pub async fn workloads_now(&self) -> anyhow::Result<Workloads> {
        let d = self.api::<Deployment>().get(DEPLOY).await?;
        let s = self.api::<StatefulSet>().get(STS).await?;
        let owned_by = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                        uid: &Option<String>| {
            meta.owner_references
                .iter()
                .flatten()
                .any(|o| Some(&o.uid) == uid.as_ref())
        };
        let rs = self
            .api::<ReplicaSet>()
            .list(&ListParams::default())
            .await?;
        let revs = self
            .api::<ControllerRevision>()
            .list(&ListParams::default())
            .await?;
        Ok(Workloads {
            deploy_generation: d.metadata.generation.unwrap_or(0),
            deploy_kid: template_kid(d.spec.as_ref().and_then(|s| s.template.metadata.as_ref())),
            deploy_replica_sets: rs
                .items
                .iter()
                .filter(|r| owned_by(&r.metadata, &d.metadata.uid))
                .count(),
            sts_generation: s.metadata.generation.unwrap_or(0),
            sts_kid: template_kid(s.spec.as_ref().and_then(|s| s.template.metadata.as_ref())),
            sts_revisions: revs
                .items
                .iter()
                .filter(|r| owned_by(&r.metadata, &s.metadata.uid))
                .count(),
        })
    }

    /// Events of the namespace with this type and reason.
    pub async fn events(&self, type_: &str, reason: &str) -> anyhow::Result<Vec<KubeEvent>> {
        Ok(self
            .api::<KubeEvent>()
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
            .collect())
    }

    /// Waits until at least one Event with this type and reason exists; returns them.
    pub async fn wait_events(&self, type_: &str, reason: &str) -> anyhow::Result<Vec<KubeEvent>> {
        eventually(
            &format!("{type_} Event {reason}"),
            TIMEOUT,
            POLL,
            || async move {
                self.events(type_, reason)
                    .await
                    .ok()
                    .filter(|e| !e.is_empty())
            },
        )
        .await
    }

    // --- writes ---------------------------------------------------------------------------------

    /// `kubectl annotate pk keyward.dev/rotate=<value> --overwrite`.
    pub async fn request_rotation(&self, value: &str) -> anyhow::Result<()> {
        let body = json!({ "metadata": { "annotations": { l::ROTATE: value } } });
        self.api::<ProvisioningKey>()
            .patch(PK, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .context("annotate the ProvisioningKey")?;
        Ok(())
    }

    /// Deletes every pod of the namespace (their controllers recreate them with the Secret's
    /// current content).
    pub async fn restart_pods(&self) -> anyhow::Result<()> {
        self.api::<k8s_openapi::api::core::v1::Pod>()
            .delete_collection(&Default::default(), &ListParams::default())
            .await
            .context("delete the pods")?;
        Ok(())
    }

    pub async fn patch_spec(&self, spec: Value) -> anyhow::Result<()> {
        self.api::<ProvisioningKey>()
            .patch(
                PK,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .context("patch the ProvisioningKey spec")?;
        Ok(())
    }

    // --- waits ----------------------------------------------------------------------------------

    /// Waits until the agent Secret carries a key id accepted by `pred`; returns it.
    pub async fn wait_handed_out(&self, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let pred = &pred;
        eventually("agent Secret handed out", TIMEOUT, POLL, || async move {
            self.handed_out_kid()
                .await
                .ok()
                .flatten()
                .filter(|k| pred(k))
        })
        .await
    }

    /// Waits until key Secret `seq` is retiring: its successor is current and handed out, and
    /// the rolls and confirmations are in flight.
    #[allow(dead_code)] // used by e2e/ha.rs and e2e/faults.rs, not by e2e/rotation.rs
    pub async fn wait_retiring(&self, seq: u32) -> anyhow::Result<()> {
        eventually(
            "old key retiring",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async move {
                self.key_secrets()
                    .await
                    .ok()
                    .filter(|k| k.iter().any(|k| k.seq == seq && k.state == "retiring"))
                    .map(|_| ())
            },
        )
        .await
    }

    /// Waits until both PolicyAgents report `status.confirmedKeyId == kid`.
    pub async fn wait_confirmed(&self, kid: &str) -> anyhow::Result<()> {
        for name in [DEPLOY, STS] {
            let want = kid.to_string();
            wait_for(
                &self.api::<PolicyAgent>(),
                name,
                move |pa: Option<&PolicyAgent>| {
                    pa.and_then(|p| p.status.as_ref())
                        .and_then(|s| s.confirmed_key_id.as_deref())
                        == Some(want.as_str())
                },
                TIMEOUT,
            )
            .await
            .with_context(|| format!("PolicyAgent {name} confirmed on {kid}"))?;
        }
        Ok(())
    }

    /// Waits until the rotation from `old` to `new` is complete: both PolicyAgents confirmed on
    /// `new`, the key Secret of `old` revoked, and the trust bundle trusting `new` but not `old`.
    pub async fn wait_rotation_complete(&self, old: &str, new: &str) -> anyhow::Result<()> {
        self.wait_confirmed(new).await?;
        eventually(
            "old key revoked and out of the trust bundle",
            TIMEOUT,
            POLL,
            || async move {
                let state = self.key_state(old).await.ok().flatten();
                let bundle = self.trust_bundle().await.ok().flatten();
                (matches!(state.as_deref(), Some("deactivated" | "destroyed"))
                    && bundle.is_some_and(|b| b.trusts(new) && !b.trusts(old)))
                .then_some(())
            },
        )
        .await
    }

    /// Waits for the ProvisioningKey condition `type_` to have `status`; returns its reason.
    pub async fn wait_condition(
        &self,
        type_: &str,
        status: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let (t, s) = (type_.to_string(), status.to_string());
        let pk = wait_for(
            &self.api::<ProvisioningKey>(),
            PK,
            move |pk: Option<&ProvisioningKey>| {
                pk.and_then(|p| p.status.as_ref())
                    .is_some_and(|st| st.conditions.iter().any(|c| c.type_ == t && c.status == s))
            },
            timeout,
        )
        .await?
        .ok_or_else(|| anyhow!("ProvisioningKey gone"))?;
        Ok(pk
            .status
            .unwrap_or_default()
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason)
            .unwrap_or_default())
    }

    // --- checks ---------------------------------------------------------------------------------

    /// The checks every completed rotation must pass; returns its timings (seconds from
    /// `r.since`).
    pub async fn check_rotation(&self, r: &Rotation) -> anyhow::Result<Timings> {
        // Exactly one new key for this rotation, the old one revoked.
        let keys = self.key_secrets().await?;
        let newest = keys.last().ok_or_else(|| anyhow!("no key Secrets"))?;
        ensure!(
            newest.seq == r.new_seq && newest.kid == r.new && newest.state == "active",
            "expected the newest key Secret to be seq {} ({}) active, got {keys:?}",
            r.new_seq,
            r.new
        );
        let old = keys.iter().find(|k| k.kid == r.old);
        ensure!(
            old.is_some_and(|k| matches!(k.state.as_str(), "deactivated" | "destroyed")),
            "old key {} not revoked: {keys:?}",
            r.old
        );
        let new_names: Vec<String> = self
            .keys
            .all()
            .into_iter()
            .filter(|c| c.at >= r.since)
            .filter_map(|c| c.value.filter(|k| k.seq >= r.new_seq).map(|_| c.name))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        ensure!(
            new_names == vec![format!("{PK}-k{}", r.new_seq)],
            "expected exactly one new key Secret ({PK}-k{}) for this rotation, saw {new_names:?}",
            r.new_seq
        );

        // Each workload rolled exactly once, to the new key.
        let now = self.workloads_now().await?;
        let b = &r.before;
        ensure!(
            now.deploy_generation == b.deploy_generation + 1
                && now.deploy_kid.as_deref() == Some(r.new.as_str()),
            "Deployment {DEPLOY}: expected exactly one roll to {} (generation {} -> {}), now generation {} with template key {:?}",
            r.new,
            b.deploy_generation,
            b.deploy_generation + 1,
            now.deploy_generation,
            now.deploy_kid
        );
        ensure!(
            now.sts_generation == b.sts_generation + 1
                && now.sts_kid.as_deref() == Some(r.new.as_str()),
            "StatefulSet {STS}: expected exactly one roll to {} (generation {} -> {}), now generation {} with template key {:?}",
            r.new,
            b.sts_generation,
            b.sts_generation + 1,
            now.sts_generation,
            now.sts_kid
        );
        ensure!(
            now.deploy_replica_sets == b.deploy_replica_sets + 1,
            "Deployment {DEPLOY}: {} ReplicaSets before, {} after (expected one more)",
            b.deploy_replica_sets,
            now.deploy_replica_sets
        );
        ensure!(
            now.sts_revisions == b.sts_revisions + 1,
            "StatefulSet {STS}: {} ControllerRevisions before, {} after (expected one more)",
            b.sts_revisions,
            now.sts_revisions
        );
        for name in [format!("Deployment/{DEPLOY}"), format!("StatefulSet/{STS}")] {
            let kids: Vec<Option<String>> = self
                .workloads
                .of(&name)
                .into_iter()
                .filter(|c| c.at >= r.since)
                .filter_map(|c| c.value.map(|v| v.1))
                .collect();
            let mut distinct = kids.clone();
            distinct.dedup();
            ensure!(
                distinct
                    .iter()
                    .all(|k| k.as_deref() == Some(r.new.as_str())),
                "{name}: pod template key ids seen since the rotation started: {distinct:?} (expected only {})",
                r.new
            );
        }

        // The bundle server's evidence.
        let want = 2 * REPLICAS as usize;
        let _ = eventually(
            "every agent pod running",
            Duration::from_secs(10),
            POLL,
            || async move { (self.running_pods().len() == want).then_some(()) },
        )
        .await;
        let log = self.server.log();
        let pods = self.running_pods();
        ensure!(
            pods.len() == 2 * REPLICAS as usize,
            "expected {} running agent pods, the kubelet runs {:?}",
            2 * REPLICAS,
            pods.iter().map(|p| &p.name).collect::<Vec<_>>()
        );
        check_published_before_handed_out(&log, &r.new)?;
        let allowed: Vec<(&str, Outcome)> = r
            .allowed_refusals
            .iter()
            .map(|(k, o)| (k.as_str(), o.clone()))
            .collect();
        check_no_rejections(&log, r.since, &allowed)?;
        let last_connect = check_no_early_revocation(&log, &pods, &r.old, &r.new)?;

        let at = |t: Option<Instant>| t.map(|t| secs(r.since, t));
        let key_name = format!("{PK}-k{}", r.new_seq);
        let confirmed = |pa: &str| {
            self.agents
                .first(r.since, |c| {
                    c.name == pa
                        && c.value.as_ref().and_then(|v| v.as_deref()) == Some(r.new.as_str())
                })
                .map(|c| c.at)
        };
        let revoked = self
            .bundle
            .first(r.since, |c| {
                c.value.as_ref().is_some_and(|b| !b.trusts(&r.old))
            })
            .map(|c| c.at);
        if let (Some(rev), Some(last)) = (revoked, last_connect) {
            ensure!(
                rev > last,
                "the trust bundle dropped {} at +{:.3}s, before the last new pod's first accepted download at +{:.3}s",
                r.old,
                secs(r.since, rev),
                secs(r.since, last)
            );
        }
        // Published first, handed out publishDelay later.
        let trusted = self
            .bundle
            .first(r.since, |c| {
                c.value.as_ref().is_some_and(|b| b.trusts(&r.new))
            })
            .map(|c| c.at)
            .ok_or_else(|| anyhow!("the trust bundle history never trusted {}", r.new))?;
        let activated = self
            .keys
            .first(r.since, |c| {
                c.name == key_name && c.value.as_ref().is_some_and(|k| k.state == "active")
            })
            .map(|c| c.at)
            .ok_or_else(|| anyhow!("the key history never saw {key_name} active"))?;
        let min_gap = r.publish_delay.as_secs_f64() - 1.5;
        ensure!(
            secs(trusted, activated) >= min_gap,
            "{} was made current {:.3}s after it entered the trust bundle; publishDelay is {:?}",
            r.new,
            secs(trusted, activated),
            r.publish_delay
        );
        Ok(Timings {
            minted: at(self
                .keys
                .first(r.since, |c| c.name == key_name)
                .map(|c| c.at)),
            trusted: at(Some(trusted)),
            activated: at(Some(activated)),
            deploy_confirmed: at(confirmed(DEPLOY)),
            sts_confirmed: at(confirmed(STS)),
            last_pod_connected: at(last_connect),
            revoked: at(revoked),
        })
    }
}

/// Waits until `n` agent pods run and each downloaded a bundle with `kid`; returns them.
pub async fn wait_all_connected(bed: &Bed, kid: &str, n: usize) -> anyhow::Result<Vec<RunningPod>> {
    eventually(
        &format!("{n} pods connected with {kid}"),
        TIMEOUT,
        POLL,
        || async move {
            let pods = bed.running_pods();
            let log = bed.server.log();
            let all = pods.len() == n
                && pods.iter().all(|p| {
                    log.iter().any(|a| {
                        a.pod_uid == p.uid && a.accepted() && a.kid.as_deref() == Some(kid)
                    })
                });
            all.then_some(pods)
        },
    )
    .await
}

/// Publish before hand-out: no request with `kid` was refused because the key was not
/// (yet) in the trust bundle.
pub fn check_published_before_handed_out(log: &[Access], kid: &str) -> anyhow::Result<()> {
    let untrusted: Vec<&Access> = log
        .iter()
        .filter(|a| a.kid.as_deref() == Some(kid) && a.outcome == Outcome::Untrusted)
        .collect();
    ensure!(
        untrusted.is_empty(),
        "{} requests with key {kid} were rejected because the key was not trusted yet (handed out before published); first: {:?}",
        untrusted.len(),
        untrusted.first()
    );
    Ok(())
}

/// No request since `since` was refused, except with the outcomes in `allowed` (as `(kid,
/// outcome)`). A trust-bundle read failure is not a refusal of the key and is tolerated.
pub fn check_no_rejections(
    log: &[Access],
    since: Instant,
    allowed: &[(&str, Outcome)],
) -> anyhow::Result<()> {
    let refused: Vec<&Access> = log
        .iter()
        .filter(|a| a.at >= since)
        .filter(|a| !a.accepted() && !matches!(a.outcome, Outcome::BundleUnavailable(_)))
        .filter(|a| {
            !allowed
                .iter()
                .any(|(k, o)| a.kid.as_deref() == Some(*k) && &a.outcome == o)
        })
        .collect();
    if let Some(first) = refused.first() {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for a in &refused {
            *by.entry(format!("{:?} {:?}", a.kid, a.outcome))
                .or_default() += 1;
        }
        bail!(
            "{} agent requests were refused: {by:?}; first: pod {} kid {:?} {:?} with bundle {:?}",
            refused.len(),
            first.pod,
            first.kid,
            first.outcome,
            first.bundle
        );
    }
    Ok(())
}

/// No early revocation: every pod running now connected with `new` while `old` was still
/// trusted. Proof without clocks: the bundle server verified the pod's first accepted request
/// with `new` against a trust bundle that still trusted `old`. Returns the instant of the last
/// such first acceptance.
pub fn check_no_early_revocation(
    log: &[Access],
    pods: &[RunningPod],
    old: &str,
    new: &str,
) -> anyhow::Result<Option<Instant>> {
    let mut last = None;
    for pod in pods {
        let first = log
            .iter()
            .find(|a| a.pod_uid == pod.uid && a.accepted() && a.kid.as_deref() == Some(new))
            .ok_or_else(|| {
                anyhow!(
                    "pod {} ({}) never downloaded a bundle with key {new}",
                    pod.name,
                    pod.uid
                )
            })?;
        let trusted_old = first.bundle.as_ref().is_some_and(|b| b.trusts(old));
        ensure!(
            trusted_old,
            "EARLY REVOCATION: old key {old} was already out of the trust bundle ({:?}) when pod {} first connected with {new} (at {})",
            first.bundle,
            pod.name,
            chrono::DateTime::<chrono::Utc>::from(first.wall).to_rfc3339()
        );
        last = last.max(Some(first.at));
    }
    Ok(last)
}
