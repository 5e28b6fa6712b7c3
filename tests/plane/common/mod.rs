//! The shared fixture of the `plane` test binary: a namespace per test that also holds one of a
//! bounded number of plane slots ([`TestNamespace`]), an in-process operator watching one
//! namespace through a counting client, object builders, watch-based waits on ProvisioningKey
//! status and readers for key Secrets.

use std::ops::Deref;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition as KubeCondition;
use keyward::api::ProvisioningKey;
use keyward::controller::{self, OperatorConfig, WriteCounter};
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::{WaitError, wait_for};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::Condition;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// Default timeout of a wait for something the operator should do promptly.
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub use keyward_testbed::kube_config;

/// Plane tests of this process that may hold the API server at once: `KEYWARD_PLANE_TESTS`
/// (default 4). All modules run in one binary, so without a bound `--test-threads` alone would
/// decide how many operators, kubelets and verifiers share the one plane.
fn plane_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
        let n = std::env::var("KEYWARD_PLANE_TESTS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(4);
        tokio::sync::Semaphore::new(n)
    });
    &SLOTS
}

/// One of the [`plane_slots`], held for as long as a test uses the plane.
pub struct PlaneSlot {
    _permit: tokio::sync::SemaphorePermit<'static>,
}

/// Waits (first come, first served) for a plane slot. [`TestNamespace::new`] takes one; call
/// this directly only in a plane test without a namespace.
pub async fn plane_slot() -> PlaneSlot {
    PlaneSlot {
        _permit: plane_slots()
            .acquire()
            .await
            .expect("the plane semaphore is never closed"),
    }
}

/// A namespace for one test (`keyward_testbed::TestNamespace`, which it dereferences to) that
/// holds a plane slot until it is cleaned up or dropped: every test that creates a namespace
/// waits for a slot first. A second namespace of the same test comes from
/// [`TestNamespace::another`] and shares the slot (taking a second one could wait forever).
pub struct TestNamespace {
    // Field order: the namespace is deleted (on drop too) before the slot is given back.
    ns: keyward_testbed::TestNamespace,
    _slot: Arc<PlaneSlot>,
}

impl TestNamespace {
    /// Waits for a plane slot, then creates the namespace (`keyward_testbed::TestNamespace::new`).
    pub async fn new(prefix: &str) -> Self {
        let slot = Arc::new(plane_slot().await);
        Self {
            ns: keyward_testbed::TestNamespace::new(prefix).await,
            _slot: slot,
        }
    }

    /// [`TestNamespace::new`] with a given client.
    pub async fn with_client(client: kube::Client, prefix: &str) -> Self {
        let slot = Arc::new(plane_slot().await);
        Self {
            ns: keyward_testbed::TestNamespace::with_client(client, prefix).await,
            _slot: slot,
        }
    }

    /// Another namespace for the same test, in the same plane slot.
    pub async fn another(&self, prefix: &str) -> Self {
        Self {
            ns: keyward_testbed::TestNamespace::new(prefix).await,
            _slot: Arc::clone(&self._slot),
        }
    }

    /// Deletes the namespace (`keyward_testbed::TestNamespace::cleanup`), then frees the slot.
    pub async fn cleanup(self) {
        self.ns.cleanup().await;
    }
}

impl Deref for TestNamespace {
    type Target = keyward_testbed::TestNamespace;

    fn deref(&self) -> &Self::Target {
        &self.ns
    }
}

/// The operator, started in-process as a Tokio task that watches one namespace only, with a
/// client that counts its mutating requests. Call [`Operator::stop`] at the end of the test
/// (dropping the runtime at a panic stops it too).
pub struct Operator {
    writes: WriteCounter,
    obs: controller::Observability,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    pub async fn start(namespace: &str, floors: Floors) -> Self {
        let writes = WriteCounter::default();
        let obs = controller::Observability::new(&writes);
        Self::start_with(namespace, floors, writes, obs).await
    }

    /// [`Operator::start`] reporting to `obs` (whose metrics export `writes`' response counts).
    pub async fn start_with(
        namespace: &str,
        floors: Floors,
        writes: WriteCounter,
        obs: controller::Observability,
    ) -> Self {
        Self::start_configured(namespace, floors, writes, obs, |_| {}).await
    }

    /// [`Operator::start_with`], with `adjust` applied to the configuration.
    pub async fn start_configured(
        namespace: &str,
        floors: Floors,
        writes: WriteCounter,
        obs: controller::Observability,
        adjust: impl FnOnce(&mut OperatorConfig),
    ) -> Self {
        keyward_testbed::init_tracing();
        let client = controller::counting_client(kube_config().await, &writes)
            .expect("build the operator's counting client");
        let mut config = OperatorConfig {
            namespaces: vec![namespace.to_string()],
            floors,
            instance: format!("test-{namespace}"),
            ..OperatorConfig::default()
        };
        adjust(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(controller::run(
            client,
            config,
            writes.clone(),
            obs.clone(),
            shutdown,
        ));
        Operator {
            writes,
            obs,
            shutdown: Some(tx),
            task,
        }
    }

    /// Mutating requests the operator sent so far.
    /// Every request the operator sent so far, by verb, resource and query.
    pub fn requests(&self) -> &WriteCounter {
        &self.writes
    }

    /// The operator's metrics and readiness (what its HTTP endpoints serve).
    pub fn observability(&self) -> &controller::Observability {
        &self.obs
    }

    pub fn writes(&self) -> u64 {
        self.writes.get()
    }

    /// Graceful shutdown (in-flight reconciles finish), at most 15 s.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(15), &mut self.task).await {
            Ok(res) => res.expect("the operator task panicked"),
            Err(_) => {
                self.task.abort();
                panic!("the operator did not stop within 15 s of its shutdown signal");
            }
        }
    }
}

/// A ProvisioningKey named `name` with `spec` (JSON) and `annotations`.
pub fn provisioning_key(name: &str, annotations: Value, spec: Value) -> ProvisioningKey {
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": name, "annotations": annotations },
        "spec": spec,
    }))
    .expect("a valid ProvisioningKey")
}

/// Creates a ProvisioningKey.
pub async fn create_pk(
    api: &Api<ProvisioningKey>,
    name: &str,
    annotations: Value,
    spec: Value,
) -> ProvisioningKey {
    api.create(
        &PostParams::default(),
        &provisioning_key(name, annotations, spec),
    )
    .await
    .unwrap_or_else(|e| panic!("create ProvisioningKey {name}: {e}"))
}

/// JSON merge patch from the test's own client.
pub async fn merge<K>(api: &Api<K>, name: &str, body: Value) -> K
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .unwrap_or_else(|e| panic!("patch {name} with {body}: {e}"))
}

pub fn condition<'a>(pk: &'a ProvisioningKey, type_: &str) -> Option<&'a KubeCondition> {
    pk.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// The message of the `Ready` condition (empty when there is none).
pub fn ready_message(pk: &ProvisioningKey) -> String {
    condition(pk, "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

fn condition_is(pk: &ProvisioningKey, type_: &str, status: &str) -> bool {
    condition(pk, type_).is_some_and(|c| c.status == status)
}

/// Status describes the current generation.
fn observed(pk: &ProvisioningKey) -> bool {
    pk.status.as_ref().and_then(|s| s.observed_generation) == pk.metadata.generation
}

/// Ready=True, Rotating=False for the current generation, with a current key.
pub fn is_settled(pk: &ProvisioningKey) -> bool {
    observed(pk)
        && condition_is(pk, "Ready", "True")
        && condition_is(pk, "Rotating", "False")
        && pk.status.as_ref().is_some_and(|s| s.current_key.is_some())
}

/// Settled on `current` with every kid of `revoked` in `status.revokedKeys`: a rotation has
/// fully completed (the status is written only once no step is left, so the trust bundle
/// already lists the revoked keys too).
pub fn rotated_to(pk: &ProvisioningKey, current: &str, revoked: &[&str]) -> bool {
    let Some(s) = pk.status.as_ref() else {
        return false;
    };
    is_settled(pk)
        && s.current_key.as_ref().is_some_and(|c| c.kid == current)
        && revoked
            .iter()
            .all(|r| s.revoked_keys.iter().any(|k| k.kid == *r))
}

/// Ready=False with `reason`, for the current generation.
pub fn not_ready_because(pk: &ProvisioningKey, reason: &str) -> bool {
    observed(pk)
        && condition(pk, "Ready").is_some_and(|c| c.status == "False" && c.reason == reason)
}

/// Waits (watch-based) for `cond` on the ProvisioningKey `name`; panics with `what` and the last
/// status seen on timeout.
pub async fn wait_pk(
    api: &Api<ProvisioningKey>,
    name: &str,
    what: &str,
    cond: impl Fn(&ProvisioningKey) -> bool,
) -> ProvisioningKey {
    wait_obj(api, name, what, TIMEOUT, cond).await
}

/// Waits (watch-based) for `cond` on an object that must exist; panics on timeout.
pub async fn wait_obj<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + serde::Serialize
        + serde::de::DeserializeOwned
        + 'static,
    <K as kube::Resource>::DynamicType: Default,
{
    let c = move |o: Option<&K>| o.is_some_and(&cond);
    match wait_for(api, name, c, timeout).await {
        Ok(Some(obj)) => obj,
        Ok(None) => panic!("{name}: {what}: the object is absent"),
        Err(e) => panic!("{name}: {what}: {e}"),
    }
}

/// Waits for `cond` for `window` and expects it NOT to happen: panics if it does. Used to prove
/// that something (a second mint, a write) does not happen.
pub async fn expect_never<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    window: Duration,
    cond: impl Condition<K>,
) where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + Send
        + serde::Serialize
        + serde::de::DeserializeOwned
        + 'static,
    <K as kube::Resource>::DynamicType: Default,
{
    match wait_for(api, name, cond, window).await {
        Err(WaitError::Timeout { .. }) => {}
        // Metadata only: the object may be a Secret.
        Ok(obj) => panic!(
            "{name}: {what} happened (within {window:?}): labels {:?}, annotations {:?}",
            obj.as_ref().map(|o| o.labels()),
            obj.as_ref().map(|o| o.annotations()),
        ),
        Err(e) => panic!("{name}: watching for {what} failed: {e}"),
    }
}

/// Operator-owned key Secrets of ProvisioningKey `pk`, sorted by seq.
pub async fn key_secrets(secrets: &Api<Secret>, pk: &str) -> Vec<Secret> {
    let selector = format!(
        "{}={pk},{}={}",
        l::PROVISIONING_KEY,
        l::COMPONENT,
        l::COMPONENT_KEY
    );
    let mut list = secrets
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list key Secrets")
        .items;
    list.sort_by_key(seq);
    list
}

pub fn seq(s: &Secret) -> u32 {
    s.labels()
        .get(l::KEY_SEQ)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn state(s: &Secret) -> String {
    s.labels().get(l::KEY_STATE).cloned().unwrap_or_default()
}

pub fn annotation(s: &Secret, key: &str) -> Option<String> {
    s.annotations().get(key).cloned()
}

pub fn kid(s: &Secret) -> String {
    annotation(s, l::KEY_ID).unwrap_or_else(|| panic!("{} has no key-id annotation", s.name_any()))
}

/// A timestamp annotation (`keyward.dev/*-at`) of a key Secret; panics if absent or malformed.
pub fn at(s: &Secret, key: &str) -> DateTime<Utc> {
    let v =
        annotation(s, key).unwrap_or_else(|| panic!("{} has no {key} annotation", s.name_any()));
    controller::parse_ts(&v)
        .unwrap_or_else(|| panic!("{}: {key}={v:?} is not RFC 3339", s.name_any()))
}

/// A data entry of a Secret as UTF-8.
pub fn data(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8(b.0.clone()).expect("UTF-8 Secret data"))
}

/// A spawned `keyward` process, killed (and reaped) if the test fails before it exits by itself.
pub struct KillOnDrop(pub std::process::Child);

/// Starts the crate's `keyward` binary with `args` against the plane (`KUBECONFIG`), logging
/// at info to the new file `log`, plus `env`; killed when dropped.
pub fn spawn_keyward(args: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log file");
    // `KEYWARD_BIN_UNDER_TEST`: run another build (an older commit's, to show a test failing
    // before a fix); default: this build's binary.
    let bin = std::env::var_os("KEYWARD_BIN_UNDER_TEST")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keyward").into());
    std::process::Command::new(bin)
        .args(args)
        .envs(env.iter().copied())
        .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .map(KillOnDrop)
        .expect("start keyward")
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Installs a ValidatingAdmissionPolicy and its binding (objects as `keyward::admission`
/// builds them); remove them with [`remove_admission_policy`] and the policy's name.
pub async fn install_admission_policy((policy, binding): (Value, Value)) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let client = kube::Client::try_from(kube_config().await).expect("client");
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(policy).expect("a policy"),
        )
        .await
        .expect("create the policy");
    Api::<ValidatingAdmissionPolicyBinding>::all(client)
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(binding).expect("a binding"),
        )
        .await
        .expect("create the policy binding");
}

/// Removes the policy `name` and its binding (of the same name); missing ones are fine.
pub async fn remove_admission_policy(name: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let client = kube::Client::try_from(kube_config().await).expect("client");
    let dp = kube::api::DeleteParams::default();
    let _ = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .delete(name, &dp)
        .await;
    let _ = Api::<ValidatingAdmissionPolicy>::all(client)
        .delete(name, &dp)
        .await;
}

/// A pod of ServiceAccount `agent` in `ns` (never scheduled: nothing runs it) and a
/// ServiceAccount token bound to it for `audience` (empty: the API server's own), as the
/// kubelet projects one: (pod UID, token).
pub async fn pod_with_token(
    ns: &keyward_testbed::TestNamespace,
    pod: &str,
    audience: &str,
) -> (String, String) {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let sas: Api<ServiceAccount> = ns.api();
    match sas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "agent" } })).expect("sa"),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create ServiceAccount agent: {e}"),
    }
    let pods: Api<Pod> = ns.api();
    let created = match pods.get_opt(pod).await.expect("get pod") {
        Some(p) => p,
        None => pods
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": pod },
                    "spec": {
                        "serviceAccountName": "agent",
                        "automountServiceAccountToken": false,
                        "containers": [{ "name": "agent", "image": "agent.invalid/none" }],
                    },
                }))
                .expect("pod"),
            )
            .await
            .expect("create pod"),
    };
    let uid = created.uid().expect("uid");
    let token = request_pod_token(&sas, pod, &uid, audience)
        .await
        .expect("TokenRequest");
    (uid, token)
}

/// A TokenRequest for ServiceAccount `agent`, bound to pod `pod` (`uid`), through `sas` (whose
/// client says who asks).
pub async fn request_pod_token(
    sas: &Api<k8s_openapi::api::core::v1::ServiceAccount>,
    pod: &str,
    uid: &str,
    audience: &str,
) -> Result<String, kube::Error> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    let audiences: Vec<&str> = if audience.is_empty() {
        vec![]
    } else {
        vec![audience]
    };
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {
            "audiences": audiences,
            "expirationSeconds": 3600,
            "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid },
        },
    }))
    .expect("token request");
    let got = sas
        .create_token_request("agent", &PostParams::default(), &request)
        .await?;
    Ok(got.status.map(|s| s.token).unwrap_or_default())
}
