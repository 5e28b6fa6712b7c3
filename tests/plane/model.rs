//! Model-based property test of Keyward: a model of raw Kubernetes objects, no client.
//!
//! 1. **The world** ([`World`]): Deployments with a simulated deployment and ReplicaSet
//!    controller (a template change makes a new ReplicaSet `<deploy>-<hash>` with a
//!    `pod-template-hash` label and `deployment.kubernetes.io/revision` annotations, owned by
//!    the Deployment's uid; its pods are owned by the ReplicaSet's uid and carry the hash),
//!    StatefulSets (ControllerRevisions `<sts>-<hash>`, pods with `controller-revision-hash`,
//!    `status.updateRevision`/`currentRevision`, OrderedReady rolling updates), a garbage
//!    collector, and a kubelet that starts pending pods whose Secrets exist, records which key
//!    id and token each pod started with (from its first Secret volume, the agent Secret),
//!    honours grace periods, evicts, completes and loses pods. PolicyAgents and
//!    ProvisioningKeys are `keyward::api` objects; Secrets and ConfigMaps are what the
//!    operator writes. uids and resourceVersions come from counters, time is a simulated
//!    clock that only events advance. The operator reads a [`View`] (which may lag: an older
//!    copy of an object) and writes through [`World::create`], [`World::update`],
//!    [`World::delete`], which fail with a conflict on a stale resourceVersion and can crash
//!    the operator after any write.
//! 2. **The operator** ([`Operator`]): the pure mapping + planner functions of the
//!    ProvisioningKey and PolicyAgent sides, driven against the world. See the section marked
//!    `OPERATOR`: [`KeywardOperator`] runs `keyward::rotation::observe`/`plan` and
//!    `keyward::agent::observe`/`decide`/`outcome` and mirrors the controllers' writes in
//!    memory; there is deliberately no stand-in planner.
//! 3. **The invariants** ([`check_after_write`], [`check_settled`]): no key is revoked while a
//!    running pod covered by a PolicyAgent started with it; pods no PolicyAgent covers get the
//!    time fallback (`overlap` after the successor was handed out and, once the key is sealed,
//!    its last token's expiry + skew); the agent Secret's key is always in the trust bundle;
//!    the agent token is valid at the simulated now; with healthy agents every rotation
//!    completes.
//!
//! Case count: `KEYWARD_MODEL_CASES` (default 64, as in CI). A long run:
//! `KEYWARD_MODEL_CASES=10000 cargo test --release --test plane model::`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use keyward::api::{PolicyAgent, ProvisioningKey};
use keyward::labels as l;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::json;

pub const NAMESPACE: &str = "model";
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
pub const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Default pod grace period in the model (the Kubernetes default).
pub const DEFAULT_GRACE: i64 = 30;

// =============================================================================================
// Objects and the store
// =============================================================================================

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Deployment,
    ReplicaSet,
    StatefulSet,
    ControllerRevision,
    Pod,
    Secret,
    ConfigMap,
    PolicyAgent,
    ProvisioningKey,
}

/// Any object of the model.
#[derive(Clone, Debug)]
pub enum Object {
    Deployment(Deployment),
    ReplicaSet(ReplicaSet),
    StatefulSet(StatefulSet),
    ControllerRevision(ControllerRevision),
    Pod(Pod),
    Secret(Secret),
    ConfigMap(ConfigMap),
    PolicyAgent(PolicyAgent),
    ProvisioningKey(ProvisioningKey),
}

/// A Kubernetes type the model stores.
pub trait Typed: Clone + fmt::Debug + serde::Serialize + Sized {
    const KIND: Kind;
    fn wrap(self) -> Object;
    fn unwrap_ref(o: &Object) -> Option<&Self>;
    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;
    /// The spec as JSON, to decide whether `metadata.generation` moves (`Null`: no spec).
    fn spec_json(&self) -> serde_json::Value;
}

macro_rules! typed {
    ($t:ident, $spec:expr) => {
        impl Typed for $t {
            const KIND: Kind = Kind::$t;
            fn wrap(self) -> Object {
                Object::$t(self)
            }
            fn unwrap_ref(o: &Object) -> Option<&Self> {
                match o {
                    Object::$t(x) => Some(x),
                    _ => None,
                }
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
            fn spec_json(&self) -> serde_json::Value {
                let f: fn(&Self) -> serde_json::Value = $spec;
                f(self)
            }
        }
    };
}

typed!(Deployment, |x| json!(x.spec));
typed!(ReplicaSet, |x| json!(x.spec));
typed!(StatefulSet, |x| json!(x.spec));
typed!(ControllerRevision, |_| serde_json::Value::Null);
typed!(Pod, |x| json!(x.spec));
typed!(Secret, |_| serde_json::Value::Null);
typed!(ConfigMap, |_| serde_json::Value::Null);
typed!(PolicyAgent, |x| json!(x.spec));
typed!(ProvisioningKey, |x| json!(x.spec));

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Deployment(_) => Kind::Deployment,
            Object::ReplicaSet(_) => Kind::ReplicaSet,
            Object::StatefulSet(_) => Kind::StatefulSet,
            Object::ControllerRevision(_) => Kind::ControllerRevision,
            Object::Pod(_) => Kind::Pod,
            Object::Secret(_) => Kind::Secret,
            Object::ConfigMap(_) => Kind::ConfigMap,
            Object::PolicyAgent(_) => Kind::PolicyAgent,
            Object::ProvisioningKey(_) => Kind::ProvisioningKey,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Deployment(x) => &x.metadata,
            Object::ReplicaSet(x) => &x.metadata,
            Object::StatefulSet(x) => &x.metadata,
            Object::ControllerRevision(x) => &x.metadata,
            Object::Pod(x) => &x.metadata,
            Object::Secret(x) => &x.metadata,
            Object::ConfigMap(x) => &x.metadata,
            Object::PolicyAgent(x) => &x.metadata,
            Object::ProvisioningKey(x) => &x.metadata,
        }
    }

    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }
}

/// Workloads and pods of the operator's view of the namespace (by name), owned.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub deployments: Vec<Deployment>,
    pub stateful_sets: Vec<StatefulSet>,
    pub pods: Vec<Pod>,
}

/// Objects by kind and name (one namespace).
#[derive(Clone, Debug, Default)]
pub struct Store {
    objects: BTreeMap<(Kind, String), Object>,
}

impl Store {
    pub fn get<T: Typed>(&self, name: &str) -> Option<&T> {
        self.objects
            .get(&(T::KIND, name.to_string()))
            .and_then(T::unwrap_ref)
    }

    /// All objects of a type, by name.
    pub fn list<T: Typed>(&self) -> Vec<&T> {
        self.objects
            .range((T::KIND, String::new())..)
            .take_while(|((k, _), _)| *k == T::KIND)
            .filter_map(|(_, o)| T::unwrap_ref(o))
            .collect()
    }

    pub fn get_any(&self, kind: Kind, name: &str) -> Option<&Object> {
        self.objects.get(&(kind, name.to_string()))
    }

    fn put(&mut self, o: Object) {
        self.objects.insert((o.kind(), o.name()), o);
    }

    fn remove(&mut self, kind: Kind, name: &str) -> Option<Object> {
        self.objects.remove(&(kind, name.to_string()))
    }

    pub fn keys(&self) -> Vec<(Kind, String)> {
        self.objects.keys().cloned().collect()
    }
}

fn name_of(meta: &ObjectMeta) -> String {
    meta.name.clone().unwrap_or_default()
}

fn uid_of(meta: &ObjectMeta) -> String {
    meta.uid.clone().unwrap_or_default()
}

fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn owner_ref(kind: &str, meta: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: kind.into(),
        name: name_of(meta),
        uid: uid_of(meta),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn time(t: DateTime<Utc>) -> Time {
    Time(Timestamp::from_second(t.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn from_time(t: &Time) -> DateTime<Utc> {
    DateTime::from_timestamp(t.0.as_second(), 0).unwrap_or_default()
}

pub fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Failed" | "Succeeded")
}

/// FNV-1a (32 bit) of the template, encoded like Kubernetes' `rand.SafeEncodeString`.
pub fn template_hash(template: &serde_json::Value) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in template.to_string().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|d| char::from(ALPHABET[usize::from(d - b'0') % ALPHABET.len()]))
        .collect()
}

fn matches_selector(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

// =============================================================================================
// The world
// =============================================================================================

/// What the kubelet knows about a pod it started (kept after the pod stops, for the checks).
#[derive(Clone, Debug, PartialEq)]
pub struct PodRun {
    pub pod: String,
    pub uid: String,
    /// `key-id` of the pod's first Secret volume when it started (the agent Secret).
    pub key_id_at_start: Option<String>,
    /// `token` of that volume when it started.
    pub token_at_start: Option<String>,
    /// The Secret of that volume.
    pub secret: Option<String>,
    pub started_at: DateTime<Utc>,
    pub stopped_at: Option<DateTime<Utc>>,
    /// The `token` file as synced now (the kubelet syncs Secret volumes on every tick).
    pub mounted_token: Option<String>,
    /// Whether the agent works (answers its health check) when its key is trusted.
    pub healthy: bool,
}

impl PodRun {
    pub fn running(&self) -> bool {
        self.stopped_at.is_none()
    }
}

/// Why an operator write failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteError {
    NotFound,
    AlreadyExists,
    /// Stale resourceVersion (or uid precondition failed).
    Conflict,
    /// The operator process crashed after its last allowed write ([`Event::CrashAfterWrites`]).
    Crashed,
}

/// A safety violation found by the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Settings of the invariant checks.
#[derive(Clone, Debug)]
pub struct CheckSettings {
    /// Clock skew allowed after the last token's expiry before a sealed key may go.
    pub skew: Duration,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            skew: Duration::from_secs(60),
        }
    }
}

/// Everything the checks remember across writes.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// (ProvisioningKey, key id) -> when the agent Secret first carried it.
    pub handed_out: BTreeMap<(String, String), DateTime<Utc>>,
    /// (ProvisioningKey, key id) -> the key id handed out right before it.
    pub predecessor: BTreeMap<(String, String), String>,
    /// Key Secrets seen revoked (name).
    pub revoked: BTreeSet<String>,
}

/// The simulated cluster.
#[derive(Clone, Debug)]
pub struct World {
    pub now: DateTime<Utc>,
    pub store: Store,
    next_uid: u64,
    next_rv: u64,
    next_pod: u64,
    /// Pod runs by pod uid.
    pub runs: BTreeMap<String, PodRun>,
    /// Objects the operator sees an older copy of: (copy, operator steps left).
    lag: BTreeMap<(Kind, String), (Option<Object>, u32)>,
    /// Operator writes allowed before it crashes (`None`: no crash planned).
    write_budget: Option<u32>,
    pub ledger: Ledger,
    pub violations: Vec<Violation>,
    pub checks: CheckSettings,
    /// Operator writes so far.
    pub writes: u64,
}

impl World {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now,
            store: Store::default(),
            next_uid: 1,
            next_rv: 1,
            next_pod: 1,
            runs: BTreeMap::new(),
            lag: BTreeMap::new(),
            write_budget: None,
            ledger: Ledger::default(),
            violations: Vec::new(),
            checks: CheckSettings::default(),
            writes: 0,
        }
    }

    fn uid(&mut self) -> String {
        let u = format!("uid-{:04}", self.next_uid);
        self.next_uid += 1;
        u
    }

    /// Removes an object at once (moves the resourceVersion counter, as every change does).
    fn remove_obj(&mut self, kind: Kind, name: &str) -> Option<Object> {
        let removed = self.store.remove(kind, name);
        if removed.is_some() {
            self.next_rv += 1;
        }
        removed
    }

    fn rv(&mut self) -> String {
        let r = self.next_rv.to_string();
        self.next_rv += 1;
        r
    }

    /// Stores a new object as the apiserver does: uid, resourceVersion, generation 1,
    /// creationTimestamp, namespace.
    fn insert_new<T: Typed>(&mut self, mut obj: T) -> T {
        let uid = self.uid();
        let rv = self.rv();
        let now = self.now;
        let m = obj.meta_mut();
        m.namespace = Some(NAMESPACE.into());
        m.uid = Some(uid);
        m.resource_version = Some(rv);
        m.creation_timestamp = Some(time(now));
        m.generation = Some(1);
        m.deletion_timestamp = None;
        self.store.put(obj.clone().wrap());
        obj
    }

    /// Replaces an object (controllers' writes: no precondition); generation moves with spec.
    fn replace<T: Typed>(&mut self, mut obj: T) {
        let name = name_of(obj.meta());
        let Some(old) = self.store.get::<T>(&name).cloned() else {
            return;
        };
        let generation =
            old.meta().generation.unwrap_or(1) + i64::from(old.spec_json() != obj.spec_json());
        let rv = self.rv();
        let m = obj.meta_mut();
        m.uid = old.meta().uid.clone();
        m.creation_timestamp = old.meta().creation_timestamp.clone();
        m.namespace = old.meta().namespace.clone();
        m.generation = Some(generation);
        m.resource_version = Some(rv);
        self.store.put(obj.wrap());
    }

    fn modify<T: Typed>(&mut self, name: &str, f: impl FnOnce(&mut T)) {
        if let Some(mut obj) = self.store.get::<T>(name).cloned() {
            let before = obj.clone();
            f(&mut obj);
            if json!(before) != json!(obj) {
                self.replace(obj);
            }
        }
    }

    /// Deletes a pod as the apiserver does: at once if it never ran or has ended, otherwise
    /// graceful (deletionTimestamp = now + grace period; the kubelet removes it later).
    fn delete_pod(&mut self, name: &str) {
        let Some(pod) = self.store.get::<Pod>(name).cloned() else {
            return;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            return;
        }
        let started = self.runs.contains_key(&uid_of(&pod.metadata));
        let grace = pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE);
        if !started || is_terminal(&pod) || grace == 0 {
            self.stop_run(&uid_of(&pod.metadata));
            self.remove_obj(Kind::Pod, name);
            return;
        }
        let deadline = self.now + chrono::Duration::seconds(grace);
        self.modify::<Pod>(name, |p| {
            p.metadata.deletion_timestamp = Some(time(deadline))
        });
    }

    fn stop_run(&mut self, uid: &str) {
        let now = self.now;
        if let Some(run) = self.runs.get_mut(uid)
            && run.stopped_at.is_none()
        {
            run.stopped_at = Some(now);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Operator API: reads through a possibly lagging view, writes with preconditions.
    // ---------------------------------------------------------------------------------------

    /// What the operator's caches show: the store, except objects under watch lag, which show
    /// the older copy (or are still absent).
    pub fn view(&self) -> Store {
        let mut view = self.store.clone();
        for ((kind, name), (copy, _)) in &self.lag {
            match copy {
                Some(o) => view.put(o.clone()),
                None => {
                    view.remove(*kind, name);
                }
            }
        }
        view
    }

    /// Workloads and pods of the operator's view as owned lists, for the functions that take
    /// slices.
    pub fn snapshot(&self) -> Snapshot {
        let view = self.view();
        fn all<T: Typed>(s: &Store) -> Vec<T> {
            s.list::<T>().into_iter().cloned().collect()
        }
        Snapshot {
            deployments: all(&view),
            stateful_sets: all(&view),
            pods: all(&view),
        }
    }

    /// Called by the driver after each operator step: lag wears off.
    fn age_lag(&mut self) {
        self.lag.retain(|_, (_, left)| {
            *left = left.saturating_sub(1);
            *left > 0
        });
    }

    fn spend_write(&mut self) -> Result<(), WriteError> {
        match &mut self.write_budget {
            Some(0) => Err(WriteError::Crashed),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn after_write(&mut self) {
        self.writes += 1;
        self.check();
    }

    /// Runs the safety checks now and records new violations (each message once). The
    /// driver calls it after every write and after every event, so state that decays with
    /// time alone (token expiry) is checked even when the operator writes nothing.
    pub fn check(&mut self) {
        for v in check_after_write(self) {
            if !self.violations.contains(&v) {
                self.violations.push(v);
            }
        }
    }

    /// Operator create. Fails if the name is taken.
    pub fn create<T: Typed>(&mut self, obj: T) -> Result<T, WriteError> {
        if self.store.get::<T>(&name_of(obj.meta())).is_some() {
            return Err(WriteError::AlreadyExists);
        }
        self.spend_write()?;
        let created = self.insert_new(obj);
        self.after_write();
        Ok(created)
    }

    /// Operator update (also of status). A set resourceVersion must match the stored one
    /// (optimistic concurrency); a set uid must match too.
    pub fn update<T: Typed>(&mut self, obj: T) -> Result<(), WriteError> {
        let name = name_of(obj.meta());
        let Some(current) = self.store.get::<T>(&name) else {
            return Err(WriteError::NotFound);
        };
        let (m, c) = (obj.meta(), current.meta());
        if m.resource_version.is_some() && m.resource_version != c.resource_version
            || m.uid.is_some() && m.uid != c.uid
        {
            return Err(WriteError::Conflict);
        }
        self.spend_write()?;
        self.replace(obj);
        self.after_write();
        Ok(())
    }

    /// Operator delete, with an optional uid precondition. Pods go through graceful deletion.
    pub fn delete(&mut self, kind: Kind, name: &str, uid: Option<&str>) -> Result<(), WriteError> {
        let Some(current) = self.store.get_any(kind, name) else {
            return Err(WriteError::NotFound);
        };
        if uid.is_some_and(|u| current.meta().uid.as_deref() != Some(u)) {
            return Err(WriteError::Conflict);
        }
        self.spend_write()?;
        if kind == Kind::Pod {
            self.delete_pod(name);
        } else {
            self.remove_obj(kind, name);
        }
        self.after_write();
        Ok(())
    }

    /// Whether the agent of pod `name` passes its connectivity check now: it runs, is healthy,
    /// and the token it has mounted is signed by a key the trust bundle of its
    /// ProvisioningKey trusts and has not expired. For the operator's `check` function.
    pub fn agent_check(&self, name: &str) -> bool {
        let Some(pod) = self.store.get::<Pod>(name) else {
            return false;
        };
        let Some(run) = self.runs.get(&uid_of(&pod.metadata)) else {
            return false;
        };
        if !run.running() || !run.healthy || phase(pod) != "Running" {
            return false;
        }
        let Some(token) = &run.mounted_token else {
            return false;
        };
        let Ok((header, claims)) = keyward::keys::decode_token_unverified(token) else {
            return false;
        };
        // As the verifier decides: the bundle lists the key id and so does the trust record of
        // the ProvisioningKey the bundle belongs to.
        let recorded = |cm: &ConfigMap| {
            label(&cm.metadata, l::PROVISIONING_KEY)
                .and_then(|pk| self.store.get::<ProvisioningKey>(pk))
                .and_then(keyward::trust_record::TrustRecord::of)
                .and_then(Result::ok)
                .is_some_and(|r| r.has(&header.kid))
        };
        let trusted = self.store.list::<ConfigMap>().into_iter().any(|cm| {
            cm.metadata
                .labels
                .as_ref()
                .and_then(|ls| ls.get(l::COMPONENT))
                .is_some_and(|c| c == l::COMPONENT_TRUST_BUNDLE)
                && trust_bundle_kids(cm).contains(&header.kid)
                && recorded(cm)
        });
        trusted && claims.exp > self.now.timestamp()
    }

    // ---------------------------------------------------------------------------------------
    // Controllers (the kube-controller-manager part)
    // ---------------------------------------------------------------------------------------

    /// Runs the garbage collector and the workload controllers until nothing changes (at
    /// most a few rounds).
    pub fn run_controllers(&mut self) {
        for _ in 0..8 {
            let before = self.next_rv;
            self.garbage_collect();
            self.deployment_controller();
            self.replicaset_controller();
            self.statefulset_controller();
            if self.next_rv == before {
                break;
            }
        }
    }

    /// Deletes objects whose controller owner (by uid) no longer exists.
    fn garbage_collect(&mut self) {
        let uids: BTreeSet<String> = self
            .store
            .objects
            .values()
            .map(|o| uid_of(o.meta()))
            .collect();
        let orphans: Vec<(Kind, String)> = self
            .store
            .objects
            .iter()
            .filter(|(_, o)| {
                // As the garbage collector: gone once every owner is gone.
                let owners = o.meta().owner_references.as_deref().unwrap_or_default();
                !owners.is_empty() && owners.iter().all(|r| !uids.contains(&r.uid))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (kind, name) in orphans {
            if kind == Kind::Pod {
                self.delete_pod(&name);
            } else {
                self.remove_obj(kind, &name);
            }
        }
    }

    fn owned_pods(&self, owner_uid: &str) -> Vec<Pod> {
        self.store
            .list::<Pod>()
            .into_iter()
            .filter(|p| controller_uid(&p.metadata) == Some(owner_uid))
            .cloned()
            .collect()
    }

    fn new_pod(
        &mut self,
        name: String,
        template: &k8s_openapi::api::core::v1::PodTemplateSpec,
        owner: OwnerReference,
        extra_labels: &[(&str, &str)],
    ) {
        let tm = template.metadata.clone().unwrap_or_default();
        let mut labels = tm.labels.unwrap_or_default();
        for (k, v) in extra_labels {
            labels.insert((*k).into(), (*v).into());
        }
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                annotations: tm.annotations,
                owner_references: Some(vec![owner]),
                ..ObjectMeta::default()
            },
            spec: template.spec.clone(),
            status: Some(k8s_openapi::api::core::v1::PodStatus {
                phase: Some("Pending".into()),
                ..Default::default()
            }),
        };
        self.insert_new(pod);
    }

    fn deployment_controller(&mut self) {
        let deployments: Vec<Deployment> = self
            .store
            .list::<Deployment>()
            .into_iter()
            .cloned()
            .collect();
        for d in deployments {
            let name = name_of(&d.metadata);
            let uid = uid_of(&d.metadata);
            let Some(spec) = d.spec.clone() else { continue };
            let desired = spec.replicas.unwrap_or(1).max(0);
            let hash = template_hash(&json!(spec.template));
            let owned: Vec<ReplicaSet> = self
                .store
                .list::<ReplicaSet>()
                .into_iter()
                .filter(|rs| controller_uid(&rs.metadata) == Some(uid.as_str()))
                .cloned()
                .collect();
            let revision = |rs: &ReplicaSet| -> i64 {
                rs.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REVISION))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            let max_rev = owned.iter().map(revision).max().unwrap_or(0);
            let rs_hash = |rs: &ReplicaSet| {
                rs.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(POD_TEMPLATE_HASH))
                    .cloned()
            };
            let new_name = match owned
                .iter()
                .find(|rs| rs_hash(rs).as_deref() == Some(&hash))
            {
                Some(rs) => {
                    let n = name_of(&rs.metadata);
                    if revision(rs) < max_rev {
                        // Rolled back to an older template: that ReplicaSet is the newest again.
                        self.modify::<ReplicaSet>(&n, |rs| {
                            rs.metadata
                                .annotations
                                .get_or_insert_default()
                                .insert(REVISION.into(), (max_rev + 1).to_string());
                        });
                    }
                    n
                }
                None => {
                    let rs_name = format!("{name}-{hash}");
                    if self.store.get::<ReplicaSet>(&rs_name).is_some() {
                        continue; // an old owner's ReplicaSet not collected yet
                    }
                    let mut template = spec.template.clone();
                    template
                        .metadata
                        .get_or_insert_default()
                        .labels
                        .get_or_insert_default()
                        .insert(POD_TEMPLATE_HASH.into(), hash.clone());
                    let mut selector = spec.selector.clone();
                    selector
                        .match_labels
                        .get_or_insert_default()
                        .insert(POD_TEMPLATE_HASH.into(), hash.clone());
                    let mut labels = template
                        .metadata
                        .as_ref()
                        .and_then(|m| m.labels.clone())
                        .unwrap_or_default();
                    labels.insert(POD_TEMPLATE_HASH.into(), hash.clone());
                    let rs = ReplicaSet {
                        metadata: ObjectMeta {
                            name: Some(rs_name.clone()),
                            labels: Some(labels),
                            annotations: Some(BTreeMap::from([
                                (REVISION.to_string(), (max_rev + 1).to_string()),
                                (
                                    "deployment.kubernetes.io/desired-replicas".to_string(),
                                    desired.to_string(),
                                ),
                            ])),
                            owner_references: Some(vec![owner_ref("Deployment", &d.metadata)]),
                            ..ObjectMeta::default()
                        },
                        spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                            replicas: Some(if owned.is_empty() { desired } else { 0 }),
                            selector,
                            template: Some(template),
                            min_ready_seconds: None,
                        }),
                        status: None,
                    };
                    self.insert_new(rs);
                    rs_name
                }
            };
            // Rolling update, maxSurge 1, maxUnavailable 0.
            let rs_replicas = |w: &World, n: &str| {
                w.store
                    .get::<ReplicaSet>(n)
                    .and_then(|rs| rs.spec.as_ref()?.replicas)
                    .unwrap_or(0)
            };
            let running = |w: &World, n: &str| {
                w.store.get::<ReplicaSet>(n).map_or(0, |rs| {
                    w.owned_pods(&uid_of(&rs.metadata))
                        .iter()
                        .filter(|p| {
                            phase(p) == "Running" && p.metadata.deletion_timestamp.is_none()
                        })
                        .count() as i32
                })
            };
            let mut olds: Vec<String> = owned
                .iter()
                .map(|rs| name_of(&rs.metadata))
                .filter(|n| *n != new_name)
                .collect();
            olds.sort_by_key(|n| self.store.get::<ReplicaSet>(n).map_or(0, revision));
            let old_total: i32 = olds.iter().map(|n| rs_replicas(self, n)).sum();
            let set_replicas = |w: &mut World, n: &str, r: i32| {
                w.modify::<ReplicaSet>(n, |rs| {
                    if let Some(s) = rs.spec.as_mut() {
                        s.replicas = Some(r);
                    }
                });
            };
            if old_total == 0 || desired == 0 {
                set_replicas(self, &new_name, desired);
                for n in &olds {
                    set_replicas(self, n, 0);
                }
            } else {
                let new_r = rs_replicas(self, &new_name);
                if new_r > desired {
                    set_replicas(self, &new_name, desired);
                } else if new_r < desired && new_r + old_total < desired + 1 {
                    set_replicas(self, &new_name, new_r + 1);
                }
                // Old replicas that are not running go first; then as many as are surplus.
                let available: i32 =
                    running(self, &new_name) + olds.iter().map(|n| running(self, n)).sum::<i32>();
                let mut surplus = (available - desired).max(0);
                for n in &olds {
                    let r = rs_replicas(self, n);
                    let unavailable = (r - running(self, n)).max(0);
                    let cut = (unavailable + surplus).min(r);
                    surplus -= (cut - unavailable).max(0);
                    set_replicas(self, n, r - cut);
                }
            }
            // Status and the revision annotation.
            let new_rev = self.store.get::<ReplicaSet>(&new_name).map_or(0, revision);
            let all: Vec<String> = std::iter::once(new_name.clone()).chain(olds).collect();
            let count = |w: &World, n: &str, f: &dyn Fn(&Pod) -> bool| -> i32 {
                w.store.get::<ReplicaSet>(n).map_or(0, |rs| {
                    w.owned_pods(&uid_of(&rs.metadata))
                        .iter()
                        .filter(|p| f(p))
                        .count() as i32
                })
            };
            let active = |p: &Pod| !is_terminal(p) && p.metadata.deletion_timestamp.is_none();
            let ready = |p: &Pod| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none();
            let replicas: i32 = all.iter().map(|n| count(self, n, &active)).sum();
            let ready_n: i32 = all.iter().map(|n| count(self, n, &ready)).sum();
            let updated = count(self, &new_name, &active);
            let generation = d.metadata.generation;
            self.modify::<Deployment>(&name, |d| {
                d.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(REVISION.into(), new_rev.to_string());
                let s = d.status.get_or_insert_default();
                s.observed_generation = generation;
                s.replicas = Some(replicas);
                s.updated_replicas = Some(updated);
                s.ready_replicas = Some(ready_n);
                s.available_replicas = Some(ready_n);
                s.unavailable_replicas = Some((desired - ready_n).max(0));
            });
        }
    }

    fn replicaset_controller(&mut self) {
        let sets: Vec<ReplicaSet> = self
            .store
            .list::<ReplicaSet>()
            .into_iter()
            .cloned()
            .collect();
        for rs in sets {
            let name = name_of(&rs.metadata);
            let uid = uid_of(&rs.metadata);
            let Some(spec) = rs.spec.clone() else {
                continue;
            };
            let selector = spec.selector.match_labels.clone().unwrap_or_default();
            // Release pods relabelled out of the selector.
            for p in self.owned_pods(&uid) {
                if !matches_selector(
                    &selector,
                    p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                ) {
                    self.modify::<Pod>(&name_of(&p.metadata), |p| {
                        p.metadata.owner_references = None
                    });
                }
            }
            let pods = self.owned_pods(&uid);
            let mut active: Vec<&Pod> = pods
                .iter()
                .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_none())
                .collect();
            let want = spec.replicas.unwrap_or(1).max(0) as usize;
            if active.len() < want {
                let Some(template) = spec.template.clone() else {
                    continue;
                };
                for _ in active.len()..want {
                    let pod_name = format!("{name}-{:05}", self.next_pod);
                    self.next_pod += 1;
                    self.new_pod(
                        pod_name,
                        &template,
                        owner_ref("ReplicaSet", &rs.metadata),
                        &[],
                    );
                }
            } else if active.len() > want {
                // Not yet running first, then Unknown, then the newest.
                active.sort_by_key(|p| {
                    let rank = match phase(p) {
                        "Pending" => 0,
                        "Unknown" => 1,
                        _ => 2,
                    };
                    (
                        rank,
                        std::cmp::Reverse(p.metadata.creation_timestamp.clone().map(|t| t.0)),
                        name_of(&p.metadata),
                    )
                });
                let victims: Vec<String> = active[..active.len() - want]
                    .iter()
                    .map(|p| name_of(&p.metadata))
                    .collect();
                for v in victims {
                    self.delete_pod(&v);
                }
            }
            let pods = self.owned_pods(&uid);
            let active_n = pods
                .iter()
                .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_none())
                .count() as i32;
            let ready_n = pods
                .iter()
                .filter(|p| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none())
                .count() as i32;
            let generation = rs.metadata.generation;
            self.modify::<ReplicaSet>(&name, |rs| {
                let s = rs.status.get_or_insert_default();
                s.replicas = active_n;
                s.fully_labeled_replicas = Some(active_n);
                s.ready_replicas = Some(ready_n);
                s.available_replicas = Some(ready_n);
                s.observed_generation = generation;
            });
        }
    }

    fn statefulset_controller(&mut self) {
        let sets: Vec<StatefulSet> = self
            .store
            .list::<StatefulSet>()
            .into_iter()
            .cloned()
            .collect();
        for sts in sets {
            let name = name_of(&sts.metadata);
            let uid = uid_of(&sts.metadata);
            let Some(spec) = sts.spec.clone() else {
                continue;
            };
            let want = spec.replicas.unwrap_or(1).max(0);
            let hash = template_hash(&json!(spec.template));
            let update_revision = format!("{name}-{hash}");
            let revs: Vec<ControllerRevision> = self
                .store
                .list::<ControllerRevision>()
                .into_iter()
                .filter(|r| controller_uid(&r.metadata) == Some(uid.as_str()))
                .cloned()
                .collect();
            if !revs.iter().any(|r| name_of(&r.metadata) == update_revision) {
                if self
                    .store
                    .get::<ControllerRevision>(&update_revision)
                    .is_some()
                {
                    continue; // an old owner's revision not collected yet
                }
                let max = revs.iter().map(|r| r.revision).max().unwrap_or(0);
                self.insert_new(ControllerRevision {
                    metadata: ObjectMeta {
                        name: Some(update_revision.clone()),
                        labels: Some(BTreeMap::from([(
                            CONTROLLER_REVISION_HASH.to_string(),
                            hash.clone(),
                        )])),
                        owner_references: Some(vec![owner_ref("StatefulSet", &sts.metadata)]),
                        ..ObjectMeta::default()
                    },
                    data: Some(k8s_openapi::apimachinery::pkg::runtime::RawExtension(
                        json!({"spec": {"template": spec.template}}),
                    )),
                    revision: max + 1,
                });
            }
            let pod_rev = |p: &Pod| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(CONTROLLER_REVISION_HASH))
                    .cloned()
                    .unwrap_or_default()
            };
            let pods: BTreeMap<i32, Pod> = self
                .owned_pods(&uid)
                .into_iter()
                .filter_map(|p| {
                    let ordinal = name_of(&p.metadata).rsplit('-').next()?.parse().ok()?;
                    Some((ordinal, p))
                })
                .collect();
            let healthy =
                |p: &Pod| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none();
            // Failed and Succeeded pods are deleted and recreated.
            let mut acted = false;
            for p in pods.values().filter(|p| is_terminal(p)) {
                self.delete_pod(&name_of(&p.metadata));
                acted = true;
            }
            if !acted {
                // OrderedReady: create the first missing ordinal once all before it run.
                for i in 0..want {
                    match pods.get(&i) {
                        Some(p) if healthy(p) => continue,
                        Some(_) => break,
                        None if self.store.get::<Pod>(&format!("{name}-{i}")).is_some() => break,
                        None => {
                            let template = spec.template.clone();
                            self.new_pod(
                                format!("{name}-{i}"),
                                &template,
                                owner_ref("StatefulSet", &sts.metadata),
                                &[(CONTROLLER_REVISION_HASH, &update_revision)],
                            );
                            acted = true;
                            break;
                        }
                    }
                }
            }
            let all_healthy = (0..want).all(|i| pods.get(&i).is_some_and(healthy))
                && pods
                    .values()
                    .all(|p| p.metadata.deletion_timestamp.is_none());
            if !acted && all_healthy {
                // Scale down from the highest ordinal, then roll from the highest ordinal.
                if let Some((_, p)) = pods.iter().rev().find(|(i, _)| **i >= want) {
                    self.delete_pod(&name_of(&p.metadata));
                } else if let Some((_, p)) = pods
                    .iter()
                    .rev()
                    .find(|(_, p)| pod_rev(p) != update_revision)
                {
                    self.delete_pod(&name_of(&p.metadata));
                }
            }
            let pods = self.owned_pods(&uid);
            let live: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let updated = live
                .iter()
                .filter(|p| pod_rev(p) == update_revision)
                .count() as i32;
            let ready = live.iter().filter(|p| phase(p) == "Running").count() as i32;
            let current_done = updated == want && live.len() as i32 == want;
            let generation = sts.metadata.generation;
            self.modify::<StatefulSet>(&name, |s| {
                let st = s.status.get_or_insert_default();
                st.observed_generation = generation;
                st.replicas = live.len() as i32;
                st.ready_replicas = Some(ready);
                st.updated_replicas = Some(updated);
                st.update_revision = Some(update_revision.clone());
                if current_done || st.current_revision.is_none() {
                    st.current_revision = Some(update_revision.clone());
                }
                let current = st.current_revision.clone().unwrap_or_default();
                st.current_replicas =
                    Some(live.iter().filter(|p| pod_rev(p) == current).count() as i32);
            });
        }
    }

    // ---------------------------------------------------------------------------------------
    // The kubelet
    // ---------------------------------------------------------------------------------------

    /// Starts up to `n` pending pods (oldest first) whose required Secrets exist, recording
    /// the key id and token of their first Secret volume.
    pub fn kubelet_start(&mut self, n: usize) {
        let mut pending: Vec<Pod> = self
            .store
            .list::<Pod>()
            .into_iter()
            .filter(|p| {
                phase(p) == "Pending"
                    && p.metadata.deletion_timestamp.is_none()
                    && !self.runs.contains_key(&uid_of(&p.metadata))
            })
            .cloned()
            .collect();
        pending.sort_by_key(|p| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                name_of(&p.metadata),
            )
        });
        let mut started = 0;
        for pod in pending {
            if started == n {
                break;
            }
            let volumes: Vec<(String, bool)> = pod
                .spec
                .iter()
                .flat_map(|s| s.volumes.iter().flatten())
                .filter_map(|v| {
                    let s = v.secret.as_ref()?;
                    Some((s.secret_name.clone()?, s.optional.unwrap_or(false)))
                })
                .collect();
            if volumes
                .iter()
                .any(|(s, optional)| !optional && self.store.get::<Secret>(s).is_none())
            {
                continue;
            }
            let first = volumes.first().map(|(s, _)| s.clone());
            let data = |key: &str| {
                let s = self.store.get::<Secret>(first.as_deref()?)?;
                let b = s.data.as_ref()?.get(key)?;
                String::from_utf8(b.0.clone()).ok()
            };
            let name = name_of(&pod.metadata);
            let uid = uid_of(&pod.metadata);
            let run = PodRun {
                pod: name.clone(),
                uid: uid.clone(),
                key_id_at_start: data(l::DATA_KEY_ID),
                token_at_start: data(l::DATA_TOKEN),
                secret: first.clone(),
                started_at: self.now,
                stopped_at: None,
                mounted_token: data(l::DATA_TOKEN),
                healthy: true,
            };
            self.runs.insert(uid, run);
            let now = self.now;
            let ip = format!("10.0.{}.{}", started / 250, started % 250 + 1);
            self.modify::<Pod>(&name, |p| {
                let s = p.status.get_or_insert_default();
                s.phase = Some("Running".into());
                s.pod_ip = Some(ip);
                s.start_time = Some(time(now));
                // As the kubelet once the containers run (no readiness probe in the model).
                s.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]);
            });
            started += 1;
        }
    }

    /// The kubelet's periodic work: syncs mounted tokens of running pods, removes terminating
    /// pods whose grace period is over (and stops them).
    pub fn kubelet_tick(&mut self) {
        let tokens: BTreeMap<String, Option<String>> = self
            .store
            .list::<Secret>()
            .into_iter()
            .map(|s| {
                let t = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(l::DATA_TOKEN))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok());
                (name_of(&s.metadata), t)
            })
            .collect();
        for run in self.runs.values_mut().filter(|r| r.running()) {
            if let Some(s) = &run.secret
                && let Some(t) = tokens.get(s)
            {
                // As the kubelet: a deleted Secret leaves the last files in place.
                run.mounted_token = t.clone();
            }
        }
        let now = self.now;
        let done: Vec<(String, String)> = self
            .store
            .list::<Pod>()
            .into_iter()
            .filter(|p| {
                p.metadata
                    .deletion_timestamp
                    .as_ref()
                    .is_some_and(|t| from_time(t) <= now)
            })
            .map(|p| (name_of(&p.metadata), uid_of(&p.metadata)))
            .collect();
        for (name, uid) in done {
            self.stop_run(&uid);
            self.remove_obj(Kind::Pod, &name);
        }
    }

    fn end_pod(&mut self, name: &str, to: &str) {
        let Some(pod) = self.store.get::<Pod>(name).cloned() else {
            return;
        };
        if is_terminal(&pod) {
            return;
        }
        self.stop_run(&uid_of(&pod.metadata));
        self.modify::<Pod>(name, |p| {
            let s = p.status.get_or_insert_default();
            s.phase = Some(to.into());
            if to == "Failed" {
                s.reason = Some("Evicted".into());
                s.message = Some("The node was low on resource: memory.".into());
            }
        });
    }

    /// Evicts a pod: phase `Failed`, reason `Evicted`, agent stopped; the object stays.
    pub fn evict(&mut self, name: &str) {
        self.end_pod(name, "Failed");
    }

    /// Completes a pod: phase `Succeeded`, agent stopped.
    pub fn complete(&mut self, name: &str) {
        self.end_pod(name, "Succeeded");
    }

    /// Phase `Unknown`; the agent keeps running.
    pub fn set_unknown(&mut self, name: &str) {
        let Some(pod) = self.store.get::<Pod>(name) else {
            return;
        };
        if self
            .runs
            .get(&uid_of(&pod.metadata))
            .is_some_and(PodRun::running)
        {
            self.modify::<Pod>(name, |p| {
                p.status.get_or_insert_default().phase = Some("Unknown".into())
            });
        }
    }

    /// The node recovers: every agent healthy, pods reported `Unknown` that still run are
    /// `Running` again.
    pub fn heal(&mut self) {
        for r in self.runs.values_mut() {
            r.healthy = true;
        }
        let unknown: Vec<String> = self
            .store
            .list::<Pod>()
            .into_iter()
            .filter(|p| phase(p) == "Unknown")
            .map(|p| name_of(&p.metadata))
            .collect();
        for name in unknown {
            self.modify::<Pod>(&name, |p| {
                p.status.get_or_insert_default().phase = Some("Running".into())
            });
        }
        self.run_controllers();
    }

    /// Runs of pods still running (by pod uid).
    pub fn running_runs(&self) -> impl Iterator<Item = &PodRun> {
        self.runs.values().filter(|r| r.running())
    }
}

// =============================================================================================
// Fixtures: the workloads and custom resources a case starts from
// =============================================================================================

fn pod_template(app: &str, secret: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": {"app": app}},
        "spec": {
            "containers": [{"name": "agent", "image": "agent:1"}],
            "terminationGracePeriodSeconds": 30,
            "volumes": [{"name": "key", "secret": {"secretName": secret}}],
        },
    })
}

pub fn deployment(name: &str, replicas: i32, secret: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": pod_template(name, secret),
        },
    }))
    .expect("a valid Deployment")
}

pub fn statefulset(name: &str, replicas: i32, secret: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": pod_template(name, secret),
            "updateStrategy": {"type": "RollingUpdate"},
        },
    }))
    .expect("a valid StatefulSet")
}

pub fn provisioning_key(name: &str) -> ProvisioningKey {
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": {"name": name},
        "spec": {
            "rotation": {"interval": "2h", "minInterval": "1m", "publishDelay": "2m", "overlap": "10m", "confirmationTimeout": "15m"},
            "token": {"ttl": "1h"},
        },
    }))
    .expect("a valid ProvisioningKey")
}

pub fn policy_agent(name: &str, pk: &str, kind: &str, workload: &str) -> PolicyAgent {
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "PolicyAgent",
        "metadata": {"name": name},
        "spec": {
            "provisioningKeyRef": {"name": pk},
            "workloadRef": {"kind": kind, "name": workload},
            "connectivityCheck": {"mode": "Http", "http": {"port": 8181}},
        },
    }))
    .expect("a valid PolicyAgent")
}

/// The starting world: ProvisioningKey `pk`, two PolicyAgents, three workloads mounting the
/// agent Secret `pk` (which the operator creates), controllers run once.
pub fn initial_world() -> World {
    let mut w = World::new(DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default());
    w.insert_new(provisioning_key("pk"));
    w.insert_new(deployment("agents", 2, "pk"));
    w.insert_new(statefulset("stateful", 2, "pk"));
    w.insert_new(deployment("bystander", 1, "pk"));
    w.insert_new(policy_agent("agents", "pk", "Deployment", "agents"));
    w.insert_new(policy_agent("stateful", "pk", "StatefulSet", "stateful"));
    w.run_controllers();
    w
}

// =============================================================================================
// Events
// =============================================================================================

/// One cluster event. Indices pick among the objects that exist when the event applies (so
/// shrinking never makes a sequence invalid); nothing happens when there are none.
#[derive(Clone, Debug)]
pub enum Event {
    /// The clock advances (1..=300 s); controllers and the kubelet catch up.
    Advance {
        secs: u32,
    },
    /// The kubelet starts up to `n` pending pods.
    StartPods {
        n: usize,
    },
    Evict {
        pod: Index,
    },
    Complete {
        pod: Index,
    },
    SetUnknown {
        pod: Index,
    },
    /// An agent's health changes.
    AgentHealth {
        pod: Index,
        healthy: bool,
    },
    /// A workload scales (0..=3).
    Scale {
        workload: Index,
        replicas: i32,
    },
    /// A PolicyAgent is created for a workload (if none exists with its name).
    CreatePolicyAgent {
        workload: Index,
    },
    DeletePolicyAgent {
        pa: Index,
    },
    /// A PolicyAgent is pointed at another workload.
    RepointPolicyAgent {
        pa: Index,
        workload: Index,
    },
    /// A workload is deleted and created again under the same name (new uid).
    ReplaceWorkload {
        workload: Index,
    },
    /// A pod template label is edited (a rollout).
    EditTemplateLabel {
        workload: Index,
        value: u8,
    },
    /// A pod is relabelled out of its ReplicaSet's selector (released, replaced).
    RelabelPod {
        pod: Index,
    },
    /// The status of a ProvisioningKey (its trust record excepted), PolicyAgent or workload is
    /// lost.
    LoseStatus {
        target: Index,
    },
    /// The operator restarts (in-memory state gone).
    RestartOperator,
    /// The operator's next step crashes after `n` writes (then it restarts).
    CrashAfterWrites {
        n: u32,
    },
    /// A key Secret of a ProvisioningKey is deleted by someone.
    DeleteKeySecret {
        key: Index,
    },
    /// The operator sees an older copy of an object for `steps` steps.
    WatchLag {
        object: Index,
        steps: u32,
    },
    /// A rotation is requested (`keyward.dev/rotate`).
    RequestRotation,
}

pub fn event_strategy() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => (1u32..=300).prop_map(|secs| Event::Advance { secs }),
        6 => (1usize..=4).prop_map(|n| Event::StartPods { n }),
        2 => any::<Index>().prop_map(|pod| Event::Evict { pod }),
        1 => any::<Index>().prop_map(|pod| Event::Complete { pod }),
        1 => any::<Index>().prop_map(|pod| Event::SetUnknown { pod }),
        2 => (any::<Index>(), any::<bool>()).prop_map(|(pod, healthy)| Event::AgentHealth { pod, healthy }),
        2 => (any::<Index>(), 0i32..=3).prop_map(|(workload, replicas)| Event::Scale { workload, replicas }),
        1 => any::<Index>().prop_map(|workload| Event::CreatePolicyAgent { workload }),
        1 => any::<Index>().prop_map(|pa| Event::DeletePolicyAgent { pa }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(pa, workload)| Event::RepointPolicyAgent { pa, workload }),
        1 => any::<Index>().prop_map(|workload| Event::ReplaceWorkload { workload }),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(workload, value)| Event::EditTemplateLabel { workload, value }),
        1 => any::<Index>().prop_map(|pod| Event::RelabelPod { pod }),
        1 => any::<Index>().prop_map(|target| Event::LoseStatus { target }),
        1 => Just(Event::RestartOperator),
        1 => (0u32..=6).prop_map(|n| Event::CrashAfterWrites { n }),
        1 => any::<Index>().prop_map(|key| Event::DeleteKeySecret { key }),
        1 => (any::<Index>(), 1u32..=4).prop_map(|(object, steps)| Event::WatchLag { object, steps }),
        2 => Just(Event::RequestRotation),
    ]
}

pub fn events_strategy(max: usize) -> impl Strategy<Value = Vec<Event>> {
    proptest::collection::vec(event_strategy(), 1..=max)
}

fn pick<'a>(names: &'a [String], i: &Index) -> Option<&'a String> {
    (!names.is_empty()).then(|| i.get(names))
}

impl World {
    fn pod_names(&self) -> Vec<String> {
        self.store
            .list::<Pod>()
            .into_iter()
            .map(|p| name_of(&p.metadata))
            .collect()
    }

    /// Existing workloads as (kind, name).
    fn workloads(&self) -> Vec<(&'static str, String)> {
        let d = self
            .store
            .list::<Deployment>()
            .into_iter()
            .map(|x| ("Deployment", name_of(&x.metadata)));
        let s = self
            .store
            .list::<StatefulSet>()
            .into_iter()
            .map(|x| ("StatefulSet", name_of(&x.metadata)));
        d.chain(s).collect()
    }

    /// Deletes a workload, lets the garbage collector act, and creates it again from the same
    /// spec (same name, new uid, no status).
    pub fn replace_workload(&mut self, kind: &str, name: &str) {
        let kind = if kind == "Deployment" {
            Kind::Deployment
        } else {
            Kind::StatefulSet
        };
        let Some(old) = self.remove_obj(kind, name) else {
            return;
        };
        self.run_controllers();
        let meta = |m: ObjectMeta| ObjectMeta {
            name: Some(name.to_string()),
            labels: m.labels,
            ..ObjectMeta::default()
        };
        match old {
            Object::Deployment(mut d) => {
                d.metadata = meta(d.metadata);
                d.status = None;
                self.insert_new(d);
            }
            Object::StatefulSet(mut s) => {
                s.metadata = meta(s.metadata);
                s.status = None;
                self.insert_new(s);
            }
            _ => {}
        }
    }

    /// Applies one cluster event (not operator steps: the driver runs those).
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Advance { secs } => {
                self.now += chrono::Duration::seconds(i64::from(*secs));
                self.kubelet_tick();
            }
            Event::StartPods { n } => self.kubelet_start(*n),
            Event::Evict { pod } => {
                if let Some(p) = pick(&self.pod_names(), pod).cloned() {
                    self.evict(&p);
                }
            }
            Event::Complete { pod } => {
                if let Some(p) = pick(&self.pod_names(), pod).cloned() {
                    self.complete(&p);
                }
            }
            Event::SetUnknown { pod } => {
                if let Some(p) = pick(&self.pod_names(), pod).cloned() {
                    self.set_unknown(&p);
                }
            }
            Event::AgentHealth { pod, healthy } => {
                let uids: Vec<String> = self.running_runs().map(|r| r.uid.clone()).collect();
                if let Some(u) = pick(&uids, pod).cloned()
                    && let Some(r) = self.runs.get_mut(&u)
                {
                    r.healthy = *healthy;
                }
            }
            Event::Scale { workload, replicas } => {
                let ws = self.workloads();
                if !ws.is_empty() {
                    let (kind, name) = workload.get(&ws).clone();
                    if kind == "Deployment" {
                        self.modify::<Deployment>(&name, |d| {
                            d.spec.get_or_insert_default().replicas = Some(*replicas)
                        });
                    } else {
                        self.modify::<StatefulSet>(&name, |s| {
                            s.spec.get_or_insert_default().replicas = Some(*replicas)
                        });
                    }
                }
            }
            Event::CreatePolicyAgent { workload } => {
                let ws = self.workloads();
                if !ws.is_empty() {
                    let (kind, name) = workload.get(&ws).clone();
                    if self.store.get::<PolicyAgent>(&name).is_none() {
                        self.insert_new(policy_agent(&name, "pk", kind, &name));
                    }
                }
            }
            Event::DeletePolicyAgent { pa } => {
                let names: Vec<String> = self
                    .store
                    .list::<PolicyAgent>()
                    .into_iter()
                    .map(|p| name_of(&p.metadata))
                    .collect();
                if let Some(n) = pick(&names, pa).cloned() {
                    self.remove_obj(Kind::PolicyAgent, &n);
                }
            }
            Event::RepointPolicyAgent { pa, workload } => {
                let names: Vec<String> = self
                    .store
                    .list::<PolicyAgent>()
                    .into_iter()
                    .map(|p| name_of(&p.metadata))
                    .collect();
                let ws = self.workloads();
                if let Some(n) = pick(&names, pa).cloned()
                    && !ws.is_empty()
                {
                    let (kind, target) = workload.get(&ws).clone();
                    let spec = policy_agent(&n, "pk", kind, &target).spec;
                    self.modify::<PolicyAgent>(&n, |p| p.spec.workload_ref = spec.workload_ref);
                }
            }
            Event::ReplaceWorkload { workload } => {
                let ws = self.workloads();
                if !ws.is_empty() {
                    let (kind, name) = workload.get(&ws).clone();
                    self.replace_workload(kind, &name);
                }
            }
            Event::EditTemplateLabel { workload, value } => {
                let ws = self.workloads();
                if !ws.is_empty() {
                    let (kind, name) = workload.get(&ws).clone();
                    let set = |t: &mut k8s_openapi::api::core::v1::PodTemplateSpec| {
                        t.metadata
                            .get_or_insert_default()
                            .labels
                            .get_or_insert_default()
                            .insert("edit".into(), (value % 4).to_string());
                    };
                    if kind == "Deployment" {
                        self.modify::<Deployment>(&name, |d| {
                            set(&mut d.spec.get_or_insert_default().template)
                        });
                    } else {
                        self.modify::<StatefulSet>(&name, |s| {
                            set(&mut s.spec.get_or_insert_default().template)
                        });
                    }
                }
            }
            Event::RelabelPod { pod } => {
                // ReplicaSet pods only: a relabelled StatefulSet pod keeps its name, so the
                // StatefulSet could never replace it (as in Kubernetes).
                let rs_uids: BTreeSet<String> = self
                    .store
                    .list::<ReplicaSet>()
                    .into_iter()
                    .map(|r| uid_of(&r.metadata))
                    .collect();
                let names: Vec<String> = self
                    .store
                    .list::<Pod>()
                    .into_iter()
                    .filter(|p| controller_uid(&p.metadata).is_some_and(|u| rs_uids.contains(u)))
                    .map(|p| name_of(&p.metadata))
                    .collect();
                if let Some(p) = pick(&names, pod).cloned() {
                    self.modify::<Pod>(&p, |p| {
                        p.metadata
                            .labels
                            .get_or_insert_default()
                            .insert("app".into(), "debug".into());
                    });
                }
            }
            Event::LoseStatus { target } => {
                let mut targets: Vec<(Kind, String)> = Vec::new();
                for k in [
                    Kind::ProvisioningKey,
                    Kind::PolicyAgent,
                    Kind::Deployment,
                    Kind::StatefulSet,
                ] {
                    targets.extend(self.store.keys().into_iter().filter(|(kk, _)| *kk == k));
                }
                if !targets.is_empty() {
                    let (kind, name) = target.get(&targets).clone();
                    match kind {
                        // The trust record in status is the operator's alone (the chart's
                        // policy refuses anyone else a change, removal included): the rest of
                        // the status is what can be lost.
                        Kind::ProvisioningKey => self.modify::<ProvisioningKey>(&name, |x| {
                            x.status = x.status.take().and_then(|s| s.trust_record).map(|r| {
                                keyward::api::provisioning_key::ProvisioningKeyStatus {
                                    trust_record: Some(r),
                                    ..Default::default()
                                }
                            })
                        }),
                        Kind::PolicyAgent => self.modify::<PolicyAgent>(&name, |x| x.status = None),
                        Kind::Deployment => self.modify::<Deployment>(&name, |x| x.status = None),
                        _ => self.modify::<StatefulSet>(&name, |x| x.status = None),
                    }
                }
            }
            Event::RestartOperator => {}
            Event::CrashAfterWrites { n } => self.write_budget = Some(*n),
            Event::DeleteKeySecret { key } => {
                let keys: Vec<String> = self
                    .store
                    .list::<Secret>()
                    .into_iter()
                    .filter(|s| {
                        s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(l::COMPONENT))
                            .is_some_and(|c| c == l::COMPONENT_KEY)
                    })
                    .map(|s| name_of(&s.metadata))
                    .collect();
                if let Some(k) = pick(&keys, key).cloned() {
                    self.remove_obj(Kind::Secret, &k);
                }
            }
            Event::WatchLag { object, steps } => {
                let keys = self.store.keys();
                if !keys.is_empty() {
                    let k = object.get(&keys).clone();
                    let copy = self.view().get_any(k.0, &k.1).cloned();
                    self.lag.entry(k).or_insert((copy, *steps));
                }
            }
            Event::RequestRotation => {
                let t = self.now.timestamp().to_string();
                self.modify::<ProvisioningKey>("pk", |pk| {
                    pk.metadata
                        .annotations
                        .get_or_insert_default()
                        .insert(l::ROTATE.into(), t);
                });
            }
        }
        self.run_controllers();
    }
}

// =============================================================================================
// Invariants
// =============================================================================================

fn trust_bundle_kids(cm: &ConfigMap) -> BTreeSet<String> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(l::DATA_JWKS))
        .and_then(|j| serde_json::from_str::<keyward::keys::Jwks>(j).ok())
        .map(|j| j.key_ids().into_iter().collect())
        .unwrap_or_default()
}

fn secret_text(s: &Secret, key: &str) -> Option<String> {
    String::from_utf8(s.data.as_ref()?.get(key)?.0.clone()).ok()
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| {
            s.parse::<i64>()
                .ok()
                .and_then(|n| DateTime::from_timestamp(n, 0))
        })
}

/// Whether pod `pod` belongs to the workload a PolicyAgent of ProvisioningKey `pk`
/// references now (by the pod's controller chain: ReplicaSet -> Deployment, or StatefulSet).
pub fn covered_by_policy_agent(w: &World, pod: &Pod, pk: &str) -> bool {
    let Some(owner) = controller_uid(&pod.metadata) else {
        return false;
    };
    let workload: Option<(&str, String)> = if let Some(rs) = w
        .store
        .list::<ReplicaSet>()
        .into_iter()
        .find(|rs| uid_of(&rs.metadata) == owner)
    {
        let duid = controller_uid(&rs.metadata);
        w.store
            .list::<Deployment>()
            .into_iter()
            .find(|d| Some(uid_of(&d.metadata).as_str()) == duid)
            .map(|d| ("Deployment", name_of(&d.metadata)))
    } else {
        w.store
            .list::<StatefulSet>()
            .into_iter()
            .find(|s| uid_of(&s.metadata) == owner)
            .map(|s| ("StatefulSet", name_of(&s.metadata)))
    };
    let Some((kind, name)) = workload else {
        return false;
    };
    w.store.list::<PolicyAgent>().into_iter().any(|pa| {
        pa.spec.provisioning_key_ref.name == pk
            && pa.spec.workload_ref.name == name
            && pa.spec.workload_ref.kind.to_string() == kind
    })
}

/// The safety checks, run after every operator write. Also updates the ledger (hand-outs,
/// revocations), so it must see every write.
pub fn check_after_write(w: &mut World) -> Vec<Violation> {
    let mut out = Vec::new();
    let now = w.now;
    for pk in w.store.list::<ProvisioningKey>() {
        let pk_name = name_of(&pk.metadata);
        let compromised: BTreeSet<&str> = pk
            .spec
            .compromised_keys
            .iter()
            .map(|c| c.0.as_str())
            .collect();
        let overlap = pk
            .spec
            .rotation
            .as_ref()
            .and_then(|r| r.overlap.as_deref())
            .and_then(keyward::rotation::parse_duration)
            .unwrap_or(Duration::from_secs(600));
        let agent_secret = w.store.get::<Secret>(&pk.secret_name());
        let bundle = w.store.get::<ConfigMap>(&pk.trust_bundle_name());
        let trusted = bundle.map(trust_bundle_kids).unwrap_or_default();
        // Hand-outs: the agent Secret's key id, first seen.
        if let Some(s) = agent_secret {
            let kid = secret_text(s, l::DATA_KEY_ID);
            if let Some(kid) = &kid {
                let key = (pk_name.clone(), kid.clone());
                if !w.ledger.handed_out.contains_key(&key) {
                    let previous = w
                        .ledger
                        .handed_out
                        .iter()
                        .filter(|((p, _), _)| *p == pk_name)
                        .max_by_key(|(_, t)| **t)
                        .map(|((_, k), _)| k.clone());
                    if let Some(p) = previous {
                        w.ledger.predecessor.insert(key.clone(), p);
                    }
                    w.ledger.handed_out.insert(key, now);
                }
                // The handed-out key is trusted.
                if !trusted.contains(kid) {
                    out.push(Violation(format!(
                        "{pk_name}: agent Secret key {kid} is not in the trust bundle {trusted:?}"
                    )));
                }
            }
            // The token is valid now.
            if let Some(token) = secret_text(s, l::DATA_TOKEN) {
                match keyward::keys::decode_token_unverified(&token) {
                    Ok((_, c)) if c.exp > now.timestamp() && c.nbf <= now.timestamp() + 60 => {}
                    Ok((_, c)) => out.push(Violation(format!(
                        "{pk_name}: agent token not valid at {now} (nbf {}, exp {})",
                        c.nbf, c.exp
                    ))),
                    Err(e) => {
                        out.push(Violation(format!("{pk_name}: agent token unreadable: {e}")))
                    }
                }
            }
        }
        // Effective revocation: a key dropped from the trust bundle while a covered pod that
        // started with it runs (whatever its key Secret says; the key Secret may be gone).
        if bundle.is_some() {
            for run in w.runs.values().filter(|r| r.running()) {
                let Some(kid) = run.key_id_at_start.as_deref() else {
                    continue;
                };
                if trusted.contains(kid)
                    || compromised.contains(kid)
                    || run.secret.as_deref() != Some(pk.secret_name().as_str())
                {
                    continue;
                }
                let Some(pod) = w
                    .store
                    .list::<Pod>()
                    .into_iter()
                    .find(|p| uid_of(&p.metadata) == run.uid)
                else {
                    continue;
                };
                if covered_by_policy_agent(w, pod, &pk_name) {
                    out.push(Violation(format!("{pk_name}: key {kid} dropped from the trust bundle at {now} while pod {} (covered by a PolicyAgent) that started with it runs", run.pod)));
                }
            }
        }
        // Revocations.
        let keys: Vec<&Secret> = w
            .store
            .list::<Secret>()
            .into_iter()
            .filter(|s| {
                label(&s.metadata, l::PROVISIONING_KEY) == Some(pk_name.as_str())
                    && label(&s.metadata, l::COMPONENT) == Some(l::COMPONENT_KEY)
            })
            .collect();
        for s in keys {
            let name = name_of(&s.metadata);
            let Some(kid) = annotation(&s.metadata, l::KEY_ID).map(str::to_string) else {
                continue;
            };
            let state = label(&s.metadata, l::KEY_STATE).unwrap_or_default();
            if !matches!(state, "revoked" | "deactivated" | "destroyed")
                || w.ledger.revoked.contains(&name)
            {
                continue;
            }
            w.ledger.revoked.insert(name.clone());
            if compromised.contains(kid.as_str()) {
                continue; // break-glass: revoked at once by design
            }
            for run in w
                .runs
                .values()
                .filter(|r| r.running() && r.key_id_at_start.as_deref() == Some(kid.as_str()))
            {
                let Some(pod) = w
                    .store
                    .list::<Pod>()
                    .into_iter()
                    .find(|p| uid_of(&p.metadata) == run.uid)
                else {
                    continue;
                };
                if covered_by_policy_agent(w, pod, &pk_name) {
                    out.push(Violation(format!("{pk_name}: key {name} ({kid}) revoked at {now} while pod {} (covered by a PolicyAgent, phase {}) that started with it runs", run.pod, phase(pod))));
                    continue;
                }
                // Not covered: the time fallback.
                let successor_at = w
                    .ledger
                    .predecessor
                    .iter()
                    .filter(|((p, _), prev)| *p == pk_name && **prev == kid)
                    .filter_map(|(k, _)| w.ledger.handed_out.get(k))
                    .min()
                    .copied();
                let Some(successor_at) = successor_at else {
                    out.push(Violation(format!("{pk_name}: key {kid} revoked at {now} before any successor was handed out, while uncovered pod {} runs with it", run.pod)));
                    continue;
                };
                let overlap_end =
                    successor_at + chrono::Duration::from_std(overlap).unwrap_or_default();
                if now < overlap_end {
                    out.push(Violation(format!("{pk_name}: key {kid} revoked at {now}, before the overlap ends at {overlap_end} (uncovered pod {})", run.pod)));
                }
                if let Some(exp) =
                    annotation(&s.metadata, l::LAST_TOKEN_EXP).and_then(parse_instant)
                {
                    let end = exp + chrono::Duration::from_std(w.checks.skew).unwrap_or_default();
                    if now < end {
                        out.push(Violation(format!("{pk_name}: sealed key {kid} revoked at {now}, before its last token's expiry + skew {end} (uncovered pod {})", run.pod)));
                    }
                }
            }
        }
    }
    out
}

/// The liveness check, after a quiet period with healthy agents: every rotation completed
/// (exactly one active key, none published but not active, none retiring).
pub fn check_settled(w: &World) -> Vec<Violation> {
    let mut out = Vec::new();
    for pk in w.store.list::<ProvisioningKey>() {
        let pk_name = name_of(&pk.metadata);
        let mut states: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in w.store.list::<Secret>() {
            if label(&s.metadata, l::PROVISIONING_KEY) == Some(pk_name.as_str())
                && label(&s.metadata, l::COMPONENT) == Some(l::COMPONENT_KEY)
            {
                states
                    .entry(label(&s.metadata, l::KEY_STATE).unwrap_or("?").to_string())
                    .or_default()
                    .push(name_of(&s.metadata));
            }
        }
        let active = states.get("active").map_or(0, Vec::len);
        let in_flight: usize = ["pending", "published", "retiring"]
            .iter()
            .map(|s| states.get(*s).map_or(0, Vec::len))
            .sum();
        if active != 1 || in_flight != 0 {
            out.push(Violation(format!(
                "{pk_name}: rotation not complete after the quiet period: {states:?}"
            )));
        }
    }
    out
}

// =============================================================================================
// OPERATOR — implemented below (`KeywardOperator`) on both pure mapping functions:
//   PolicyAgent side:      keyward::agent::observe(&AgentObjects { .. }, successes_fn, check)
//                          -> Result<AgentInput, Refusal>, then keyward::agent::decide(&input, now)
//   ProvisioningKey side:  keyward::rotation::observe(..) -> Observed,
//                          then keyward::rotation::plan(&settings, &observed, now) -> Plan
// An implementation reads `world.view()` (never `world.store`: the view may lag), maps the raw
// objects with those functions, and performs each resulting step through `World::create`,
// `World::update` and `World::delete`, stopping at the first error (a `Crashed` error means the
// process died: the driver then calls `restart`). Agent checks use `World::agent_check`. There
// is deliberately no stand-in planner here: the safety properties below must be checked against
// the real one.
// =============================================================================================

/// The operator under test, both controllers.
pub trait Operator {
    /// One reconcile pass of every ProvisioningKey and PolicyAgent at the simulated `now`.
    /// Returns whether it wrote anything.
    fn step(&mut self, world: &mut World, now: DateTime<Utc>) -> bool;
    /// The process restarts: in-memory state (caches, check results, backoffs) is lost.
    fn restart(&mut self);
}

// ---------------------------------------------------------------------------------------------
// KeywardOperator: the real pure functions (`rotation::observe::observe` + `rotation::plan`,
// `agent::observe::observe` + `agent::decide` + `agent::outcome`), with the controllers'
// reads and writes mirrored in memory against the World (src/controller/provisioning_key.rs
// `run_steps`/`observe`/`apply`/`transition`/`hand_out`, src/controller/policy_agent.rs
// `reconcile`/`evaluate`/`roll`/`status`).
//
// Deviations from the controllers, all on the side of doing less:
// - Server-side-apply and merge patches without a precondition in the controllers (status of a
//   PolicyAgent, the roll of a workload) are made here on the object as read, with its
//   resourceVersion as precondition (a whole-object write of a lagging copy would otherwise
//   revert newer changes); a conflict ends that object's reconcile, as a retry would.
// - Prune deletes with a uid precondition (the World offers no resourceVersion one).
// - The ProvisioningKey status is not written: no decision reads it. PolicyAgent status is
//   written without `history` (kept as it was).
// - The cap on concurrent rolls is not modelled (`roll_slot: RollSlot::Free`).
// ---------------------------------------------------------------------------------------------

/// Steps one ProvisioningKey reconcile makes at most (`MAX_STEPS_PER_RECONCILE`).
const MAX_STEPS: usize = 12;

/// The operator's floors in the model: none, except the clock skew, which is the one the checks
/// allow after a sealed key's last token expired.
pub fn model_floors() -> keyward::rotation::Floors {
    keyward::rotation::Floors {
        clock_skew: CheckSettings::default().skew,
        ..keyward::rotation::Floors::none()
    }
}

/// The in-memory evidence of connectivity checks of one pod (by uid), lost on restart.
#[derive(Clone, Debug)]
struct Probe {
    kid: String,
    successes: u32,
    last: DateTime<Utc>,
}

/// Keyward's two controllers, driven against the World.
#[derive(Default)]
pub struct KeywardOperator {
    probes: BTreeMap<String, Probe>,
    /// Negative control only: confirm a PolicyAgent as soon as its template carries the key,
    /// without waiting for the rollout or the checks (a broken PolicyAgent decision).
    pub forge_confirmations: bool,
}

fn fetch_workload(
    view: &Store,
    kind: keyward::api::policy_agent::WorkloadKind,
    name: &str,
) -> Option<keyward::workload::Workload> {
    use keyward::api::policy_agent::WorkloadKind as K;
    use keyward::workload::Workload as W;
    match kind {
        K::Deployment => view.get::<Deployment>(name).cloned().map(W::Deployment),
        K::StatefulSet => view.get::<StatefulSet>(name).cloned().map(W::StatefulSet),
        K::DaemonSet | K::ServiceAccount => None,
    }
}

fn all_of<T: Typed>(s: &Store) -> Vec<T> {
    s.list::<T>().into_iter().cloned().collect()
}

/// `observe` of the ProvisioningKey controller, on the view.
fn pk_read(view: &Store, pk: &ProvisioningKey) -> keyward::rotation::snapshot::Read {
    use keyward::rotation::observe;
    let name = name_of(&pk.metadata);
    let key_secrets: Vec<Secret> = view
        .list::<Secret>()
        .into_iter()
        .filter(|s| {
            label(&s.metadata, l::PROVISIONING_KEY) == Some(name.as_str())
                && label(&s.metadata, l::COMPONENT) == Some(l::COMPONENT_KEY)
        })
        .cloned()
        .collect();
    let parsed = observe::key_secrets(pk, &key_secrets);
    let names = observe::names(pk, &parsed);
    let bundle = view.get::<ConfigMap>(&names.trust_bundle_name).cloned();
    let agent_secret = view.get::<Secret>(&names.secret_name).cloned();
    let agents: Vec<PolicyAgent> = all_of(view);
    let (mut workloads, mut replica_sets, mut revisions, mut pods) =
        (Vec::new(), Vec::new(), Vec::new(), None);
    if observe::needs_consumers(&parsed) {
        let mut named: Vec<(String, String)> = agents
            .iter()
            .filter(|pa| pa.spec.provisioning_key_ref.name == name)
            .map(|pa| {
                (
                    pa.spec.workload_ref.kind.to_string(),
                    pa.spec.workload_ref.name.clone(),
                )
            })
            .collect();
        named.sort();
        named.dedup();
        for pa in &agents {
            let key = (
                pa.spec.workload_ref.kind.to_string(),
                pa.spec.workload_ref.name.clone(),
            );
            if let Ok(i) = named.binary_search(&key) {
                named.remove(i);
                if let Some(w) = fetch_workload(view, pa.spec.workload_ref.kind, &key.1) {
                    workloads.push(w);
                }
            }
        }
        replica_sets = all_of::<ReplicaSet>(view);
        revisions = all_of::<ControllerRevision>(view);
        pods = Some(all_of::<Pod>(view));
    }
    let mapped = observe::observe(
        &observe::KeyObjects {
            pk,
            key_secrets: &key_secrets,
            bundle: bundle.as_ref(),
            agent_secret: agent_secret.as_ref(),
            agents: &agents,
            workloads: &workloads,
            lineage: keyward::workload::Lineage {
                replica_sets: &replica_sets,
                revisions: &revisions,
            },
            pods: pods.as_deref(),
        },
        &model_floors(),
    );
    // The resourceVersions read are the preconditions of the bundle's and agent Secret's writes.
    keyward::rotation::snapshot::Read {
        settings: mapped.settings,
        observed: mapped.observed,
        secrets: mapped.secrets,
        bundle_jwks: mapped.bundle_jwks,
        bundle_rv: bundle.and_then(|c| c.metadata.resource_version),
        agent_secret_rv: agent_secret.and_then(|s| s.metadata.resource_version),
    }
}

/// The World as the in-memory executor's objects (`keyward::rotation::write::memory`): the
/// executor reads the stored objects (the API server's, not the lagging view) and writes through
/// the World's own create, update and delete, so its conflicts, write budget and crashes fire
/// per write.
struct Objects<'a>(&'a mut World);

impl keyward::rotation::write::memory::Objects for Objects<'_> {
    type Error = WriteError;

    fn get(&self, kind: MemKind, name: &str) -> Option<Stored> {
        let s = &self.0.store;
        match kind {
            MemKind::Secret => s.get::<Secret>(name).cloned().map(Stored::Secret),
            MemKind::ConfigMap => s.get::<ConfigMap>(name).cloned().map(Stored::ConfigMap),
            MemKind::ProvisioningKey => s
                .get::<ProvisioningKey>(name)
                .cloned()
                .map(|pk| Stored::ProvisioningKey(Box::new(pk))),
        }
    }

    fn create(&mut self, object: Stored) -> Result<(), WriteError> {
        match object {
            Stored::Secret(o) => self.0.create(o).map(|_| ()),
            Stored::ConfigMap(o) => self.0.create(o).map(|_| ()),
            Stored::ProvisioningKey(o) => self.0.create(*o).map(|_| ()),
        }
    }

    fn update(&mut self, object: Stored) -> Result<(), WriteError> {
        match object {
            Stored::Secret(o) => self.0.update(o),
            Stored::ConfigMap(o) => self.0.update(o),
            Stored::ProvisioningKey(o) => self.0.update(*o),
        }
    }

    fn delete(&mut self, kind: MemKind, name: &str, uid: &str) -> Result<(), WriteError> {
        let kind = match kind {
            MemKind::Secret => Kind::Secret,
            MemKind::ConfigMap => Kind::ConfigMap,
            MemKind::ProvisioningKey => Kind::ProvisioningKey,
        };
        self.0.delete(kind, name, Some(uid))
    }

    fn already_exists(e: &WriteError) -> bool {
        *e == WriteError::AlreadyExists
    }

    fn not_found(e: &WriteError) -> bool {
        *e == WriteError::NotFound
    }
}

use keyward::rotation::write::memory::{Kind as MemKind, Stored};

/// `apply` of the ProvisioningKey controller: the write the step makes
/// (`keyward::rotation::write::of`, the controller's own), by the in-memory executor.
fn apply_pk(
    w: &mut World,
    pk: &ProvisioningKey,
    read: &keyward::rotation::snapshot::Read,
    step: &keyward::rotation::Step,
    now: DateTime<Utc>,
) -> Result<(), WriteError> {
    use keyward::controller::provisioning_key::key_secret_name;
    use keyward::keys::KeyPair;
    use keyward::rotation::write::{self, KeyNeed, memory};
    // The key the step needs: a new one, or the stored one (a fresh read, as the controller's).
    let key = match write::key_need(step) {
        Some(KeyNeed::New) => Some(KeyPair::generate()),
        Some(KeyNeed::Stored(seq)) => w
            .store
            .get::<Secret>(&key_secret_name(&name_of(&pk.metadata), seq))
            .and_then(|s| secret_text(s, l::DATA_PRIVATE_KEY))
            .map(|p| KeyPair::from_pkcs8_pem(&p).map_err(|_| WriteError::Conflict))
            .transpose()?,
        None => None,
    };
    let jti = format!("jti-{}-{}", now.timestamp(), w.writes);
    let inputs = write::Inputs {
        pk,
        read,
        now,
        key: key.as_ref(),
        jti: &jti,
    };
    let Some(write) = write::of(step, &inputs).map_err(|_| WriteError::Conflict)? else {
        return Ok(());
    };
    match memory::execute(&mut Objects(w), write) {
        Ok(_) => Ok(()),
        Err(memory::Error::Store(e)) => Err(e),
        Err(memory::Error::Conflict) => Err(WriteError::Conflict),
        Err(memory::Error::NotFound) => Err(WriteError::NotFound),
        Err(memory::Error::NameTaken(_)) => Err(WriteError::AlreadyExists),
    }
}

impl KeywardOperator {
    /// `run_steps`: observe -> plan -> apply one step, up to [`MAX_STEPS`] times.
    fn reconcile_pk(
        &mut self,
        w: &mut World,
        pk_name: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, WriteError> {
        let Some(pk) = w.view().get::<ProvisioningKey>(pk_name).cloned() else {
            return Ok(false);
        };
        if pk.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        let mut wrote = false;
        for _ in 0..MAX_STEPS {
            let view = w.view();
            // The controller keeps the trust record it wrote; the model reads it back.
            let pk = view
                .get::<ProvisioningKey>(pk_name)
                .filter(|p| p.metadata.uid == pk.metadata.uid)
                .cloned()
                .unwrap_or_else(|| pk.clone());
            let read = pk_read(&view, &pk);
            let plan = keyward::rotation::plan(&read.settings, &read.observed, now);
            let Some(step) = plan.step else {
                // The closing status write carries a key's first trust record.
                if let Some(record) = &plan.record {
                    let mut pk = pk.clone();
                    pk.status.get_or_insert_default().trust_record = Some(record.render());
                    w.update(pk)?;
                    wrote = true;
                }
                return Ok(wrote);
            };
            match apply_pk(w, &pk, &read, &step, now) {
                Ok(()) => wrote = true,
                Err(WriteError::Crashed) => return Err(WriteError::Crashed),
                Err(_) => return Ok(wrote),
            }
        }
        Ok(wrote)
    }

    fn successes(&self, uid: &str, kid: &str) -> u32 {
        self.probes
            .get(uid)
            .filter(|p| p.kid == kid)
            .map_or(0, |p| p.successes)
    }

    fn record(&mut self, uid: &str, kid: &str, ok: bool, now: DateTime<Utc>) {
        let p = self.probes.entry(uid.to_string()).or_insert(Probe {
            kid: kid.to_string(),
            successes: 0,
            last: now,
        });
        if p.kid != kid {
            p.kid = kid.to_string();
            p.successes = 0;
        }
        p.successes = if ok { p.successes.saturating_add(1) } else { 0 };
        p.last = now;
    }

    fn due(&self, uid: &str, period: Duration, now: DateTime<Utc>) -> bool {
        self.probes
            .get(uid)
            .is_none_or(|p| (now - p.last).to_std().is_ok_and(|d| d >= period))
    }

    /// `evaluate` of the PolicyAgent controller: reads, checks, the pure mapping and decision.
    fn evaluate(
        &mut self,
        w: &World,
        view: &Store,
        pa: &PolicyAgent,
        now: DateTime<Utc>,
    ) -> Result<
        (
            keyward::agent::AgentInput,
            keyward::agent::Decision,
            keyward::agent::check::Check,
        ),
        keyward::agent::observe::Refusal,
    > {
        use keyward::agent::observe::{AgentObjects, Refusal, observe};
        let check = keyward::agent::check::resolve_check(pa).map_err(Refusal::InvalidSpec)?;
        let agents: Vec<PolicyAgent> = all_of(view);
        let pk = view
            .get::<ProvisioningKey>(&pa.spec.provisioning_key_ref.name)
            .cloned();
        let agent_secret = pk
            .as_ref()
            .and_then(|pk| view.get::<Secret>(&pk.secret_name()).cloned());
        let workload = fetch_workload(view, pa.spec.workload_ref.kind, &pa.spec.workload_ref.name);
        let replica_sets: Vec<ReplicaSet> = all_of(view);
        let revisions: Vec<ControllerRevision> = all_of(view);
        let pods: Vec<Pod> = all_of(view);
        let mut input = {
            let successes = |uid: &str, kid: &str| self.successes(uid, kid);
            observe(
                &AgentObjects {
                    pa,
                    agents: &agents,
                    pk: pk.as_ref(),
                    agent_secret: agent_secret.as_ref(),
                    workload: workload.as_ref(),
                    service_account: None,
                    lineage: keyward::workload::Lineage {
                        replica_sets: &replica_sets,
                        revisions: &revisions,
                    },
                    pods: &pods,
                    roll_slot: keyward::agent::RollSlot::Free,
                },
                &successes,
                &check,
            )?
        };
        if check.mode == keyward::api::policy_agent::CheckMode::Http {
            let due: Vec<(String, String)> = keyward::agent::probe_targets(&input)
                .into_iter()
                .filter(|p| self.due(&p.uid, check.period, now))
                .map(|p| (p.uid.clone(), p.name.clone()))
                .collect();
            for (uid, pod) in due {
                let ok = w.agent_check(&pod);
                self.record(&uid, &input.secret_kid.clone(), ok, now);
            }
        }
        for p in &mut input.pods {
            p.successes = self.successes(&p.uid, &input.secret_kid);
        }
        let mut decision = keyward::agent::decide(&input, now);
        if self.forge_confirmations
            && matches!(decision, keyward::agent::Decision::Wait { .. })
            && input.template_kid.as_deref() == Some(input.secret_kid.as_str())
            && input.current_revision.is_some()
        {
            decision = keyward::agent::Decision::Confirmed {
                evidence: keyward::agent::Evidence {
                    key_id: input.secret_kid.clone(),
                    workload_uid: input.workload_uid.clone(),
                    revision: input.current_revision.clone().unwrap_or_default(),
                },
            };
        }
        Ok((input, decision, check))
    }

    /// `reconcile` of the PolicyAgent controller: the roll, then the status.
    fn reconcile_pa(
        &mut self,
        w: &mut World,
        pa_name: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, WriteError> {
        use keyward::agent::outcome;
        let view = w.view();
        let Some(pa) = view.get::<PolicyAgent>(pa_name).cloned() else {
            return Ok(false);
        };
        if pa.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        let previous = pa.status.clone().unwrap_or_default();
        let mut wrote = false;
        let o = match self.evaluate(w, &view, &pa, now) {
            Ok((input, decision, check)) => {
                let o = outcome::outcome(&input, &decision, check.period, now);
                if let keyward::agent::Decision::Roll { kid } = &decision {
                    roll(w, &view, &pa, kid, now)?;
                    wrote = true;
                }
                o
            }
            Err(refusal) => outcome::refused(&refusal),
        };
        let status = pa_status(&pa, &previous, &o, now);
        if pa.status.as_ref() == Some(&status) {
            return Ok(wrote);
        }
        let mut updated = pa.clone();
        updated.status = Some(status);
        w.update(updated)?;
        Ok(true)
    }
}

/// `roll` of the PolicyAgent controller: the key id into the pod template, `rolled-at` and the
/// managing PolicyAgent on the workload's metadata.
fn roll(
    w: &mut World,
    view: &Store,
    pa: &PolicyAgent,
    kid: &str,
    now: DateTime<Utc>,
) -> Result<(), WriteError> {
    use keyward::api::policy_agent::WorkloadKind as K;
    fn edit(
        meta: &mut ObjectMeta,
        template: &mut k8s_openapi::api::core::v1::PodTemplateSpec,
        pa: &str,
        kid: &str,
        now: DateTime<Utc>,
    ) {
        let a = meta.annotations.get_or_insert_default();
        a.insert(l::ROLLED_AT.into(), keyward::controller::ts_start(now));
        a.insert(l::POLICY_AGENT.into(), pa.into());
        template
            .metadata
            .get_or_insert_default()
            .annotations
            .get_or_insert_default()
            .insert(l::KEY_ID.into(), kid.into());
    }
    let name = &pa.spec.workload_ref.name;
    let pa_name = name_of(&pa.metadata);
    match pa.spec.workload_ref.kind {
        K::Deployment => {
            let mut d = view
                .get::<Deployment>(name)
                .cloned()
                .ok_or(WriteError::NotFound)?;
            let mut spec = d.spec.take().unwrap_or_default();
            edit(&mut d.metadata, &mut spec.template, &pa_name, kid, now);
            d.spec = Some(spec);
            w.update(d)
        }
        K::StatefulSet => {
            let mut s = view
                .get::<StatefulSet>(name)
                .cloned()
                .ok_or(WriteError::NotFound)?;
            let mut spec = s.spec.take().unwrap_or_default();
            edit(&mut s.metadata, &mut spec.template, &pa_name, kid, now);
            s.spec = Some(spec);
            w.update(s)
        }
        K::DaemonSet | K::ServiceAccount => Err(WriteError::NotFound),
    }
}

/// `status` of the PolicyAgent controller (the same pure function).
fn pa_status(
    pa: &PolicyAgent,
    previous: &keyward::api::policy_agent::PolicyAgentStatus,
    o: &keyward::agent::outcome::Outcome,
    now: DateTime<Utc>,
) -> keyward::api::policy_agent::PolicyAgentStatus {
    keyward::agent::outcome::status(pa, previous, o, now)
}

impl Operator for KeywardOperator {
    fn step(&mut self, world: &mut World, now: DateTime<Utc>) -> bool {
        let mut wrote = false;
        let view = world.view();
        let pks: Vec<String> = view
            .list::<ProvisioningKey>()
            .into_iter()
            .map(|p| name_of(&p.metadata))
            .collect();
        let pas: Vec<String> = view
            .list::<PolicyAgent>()
            .into_iter()
            .map(|p| name_of(&p.metadata))
            .collect();
        for pk in pks {
            match self.reconcile_pk(world, &pk, now) {
                Ok(w) => wrote |= w,
                Err(_) => return true, // crashed
            }
        }
        for pa in pas {
            match self.reconcile_pa(world, &pa, now) {
                Ok(w) => wrote |= w,
                Err(WriteError::Crashed) => return true,
                Err(_) => wrote = true,
            }
        }
        wrote
    }

    fn restart(&mut self) {
        self.probes.clear();
    }
}

/// Drives one case: every event, then an operator step (restarting it after a crash), then a
/// quiet period (all agents healthy, all pods started, time advancing) and the liveness check.
/// Returns the violations found.
pub fn run_case(events: &[Event], op: &mut dyn Operator) -> Vec<Violation> {
    let mut w = initial_world();
    let step = |w: &mut World, op: &mut dyn Operator| {
        let now = w.now;
        op.step(w, now);
        w.age_lag();
        if w.write_budget == Some(0) {
            w.write_budget = None;
            op.restart();
        }
        w.run_controllers();
    };
    for e in events {
        w.apply(e);
        w.check();
        if matches!(e, Event::RestartOperator) {
            op.restart();
        }
        step(&mut w, op);
    }
    // Quiet period: healthy agents, pods start, two hours pass in 30 s steps. ProvisioningKeys
    // are suspended, so a scheduled rotation cannot start at its end: rotations in flight must
    // complete (the liveness property), new ones do not start.
    w.write_budget = None;
    w.lag.clear();
    w.heal();
    let pks: Vec<String> = w
        .store
        .list::<ProvisioningKey>()
        .into_iter()
        .map(|p| name_of(&p.metadata))
        .collect();
    for pk in pks {
        w.modify::<ProvisioningKey>(&pk, |p| p.spec.suspend = Some(true));
    }
    for _ in 0..240 {
        w.apply(&Event::StartPods { n: usize::MAX });
        w.apply(&Event::Advance { secs: 30 });
        w.check();
        step(&mut w, op);
    }
    let mut found = w.violations.clone();
    found.extend(check_settled(&w));
    found
}

/// Cases to run: `KEYWARD_MODEL_CASES` (default 64).
pub fn cases() -> u32 {
    std::env::var("KEYWARD_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

/// Runs the property for an operator built by `make`: random event sequences, shrunk on
/// failure. Panics with the minimal failing sequence.
pub fn check_operator(make: impl Fn() -> Box<dyn Operator>) {
    check_operator_with(
        ProptestConfig {
            cases: cases(),
            ..ProptestConfig::default()
        },
        make,
    );
}

/// [`check_operator`] with a given proptest configuration.
pub fn check_operator_with(config: ProptestConfig, make: impl Fn() -> Box<dyn Operator>) {
    let mut runner = TestRunner::new(config);
    let result = runner.run(&events_strategy(40), |events| {
        let mut op = make();
        let violations = run_case(&events, op.as_mut());
        prop_assert!(violations.is_empty(), "violations: {violations:#?}");
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// =============================================================================================
// Tests of the world model and of the checks
// =============================================================================================

#[cfg(test)]
mod tests {
    use super::*;
    use keyward::keys::{KeyPair, TokenClaims};

    fn pods_of(w: &World, app: &str) -> Vec<Pod> {
        w.store
            .list::<Pod>()
            .into_iter()
            .filter(|p| label(&p.metadata, "app") == Some(app))
            .cloned()
            .collect()
    }

    fn running_of(w: &World, app: &str) -> Vec<Pod> {
        pods_of(w, app)
            .into_iter()
            .filter(|p| phase(p) == "Running" && p.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// Lets the world settle: pods start, time passes.
    fn settle(w: &mut World, rounds: usize) {
        for _ in 0..rounds {
            w.apply(&Event::StartPods { n: usize::MAX });
            w.apply(&Event::Advance { secs: 31 });
        }
    }

    /// A key Secret and its pair, in the operator's shapes.
    fn key_secret(pk: &str, seq: u32, pair: &KeyPair, state: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(format!("{pk}-k{seq}")),
                labels: Some(BTreeMap::from([
                    (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                    (l::PROVISIONING_KEY.to_string(), pk.to_string()),
                    (l::COMPONENT.to_string(), l::COMPONENT_KEY.to_string()),
                    (l::KEY_STATE.to_string(), state.to_string()),
                    (l::KEY_SEQ.to_string(), seq.to_string()),
                ])),
                annotations: Some(BTreeMap::from([(l::KEY_ID.to_string(), pair.key_id())])),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        }
    }

    fn token(pair: &KeyPair, now: DateTime<Utc>, ttl: i64) -> String {
        pair.sign_token(&TokenClaims {
            iss: "keyward".into(),
            sub: "pk".into(),
            aud: "keyward".into(),
            iat: now.timestamp(),
            nbf: now.timestamp(),
            exp: now.timestamp() + ttl,
            jti: "j".into(),
        })
        .expect("sign")
    }

    fn agent_secret(pair: &KeyPair, now: DateTime<Utc>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("pk".into()),
                labels: Some(BTreeMap::from([
                    (l::PROVISIONING_KEY.to_string(), "pk".to_string()),
                    (
                        l::COMPONENT.to_string(),
                        l::COMPONENT_AGENT_SECRET.to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([
                (
                    l::DATA_KEY_ID.to_string(),
                    ByteString(pair.key_id().into_bytes()),
                ),
                (
                    l::DATA_TOKEN.to_string(),
                    ByteString(token(pair, now, 3600).into_bytes()),
                ),
            ])),
            ..Secret::default()
        }
    }

    fn bundle(pairs: &[&KeyPair]) -> ConfigMap {
        let jwks = keyward::keys::Jwks {
            keys: pairs.iter().map(|p| p.public_key().to_jwk()).collect(),
        };
        ConfigMap {
            metadata: ObjectMeta {
                name: Some("pk-trust".into()),
                labels: Some(BTreeMap::from([
                    (l::PROVISIONING_KEY.to_string(), "pk".to_string()),
                    (
                        l::COMPONENT.to_string(),
                        l::COMPONENT_TRUST_BUNDLE.to_string(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                l::DATA_JWKS.to_string(),
                serde_json::to_string(&jwks).expect("json"),
            )])),
            ..ConfigMap::default()
        }
    }

    /// A world where the operator's first key (k1) is active and handed out, pods running.
    fn world_on_k1() -> (World, KeyPair) {
        let mut w = initial_world();
        let k1 = KeyPair::generate();
        let now = w.now;
        w.create(key_secret("pk", 1, &k1, "active"))
            .expect("create");
        record(&mut w, &[&k1]);
        w.create(bundle(&[&k1])).expect("create");
        w.create(agent_secret(&k1, now)).expect("create");
        settle(&mut w, 6);
        (w, k1)
    }

    /// The trust record the operator would have written for these keys.
    fn record(w: &mut World, keys: &[&KeyPair]) {
        let record = keyward::trust_record::TrustRecord {
            bundle: "pk-trust".into(),
            aud: "keyward".into(),
            iss: "keyward".into(),
            kids: keys
                .iter()
                .map(|k| (k.public_key().key_id(), 3600))
                .collect(),
            deactivated: Default::default(),
            claims: Default::default(),
            pop: false,
        };
        let mut pk = w
            .store
            .get::<ProvisioningKey>("pk")
            .cloned()
            .expect("the ProvisioningKey");
        pk.metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(keyward::trust_record::ANNOTATION.into(), record.render());
        w.update(pk).expect("record");
    }

    /// Hands out k2 (trusted along k1), as a rotation would.
    fn hand_out_k2(w: &mut World, k1: &KeyPair) -> KeyPair {
        let k2 = KeyPair::generate();
        let now = w.now;
        w.create(key_secret("pk", 2, &k2, "active"))
            .expect("create");
        record(w, &[k1, &k2]);
        w.update(bundle(&[k1, &k2])).expect("bundle");
        w.update(agent_secret(&k2, now)).expect("agent secret");
        w.update(key_secret("pk", 1, k1, "retiring"))
            .expect("retire");
        k2
    }

    fn revoke(w: &mut World, seq: u32, pair: &KeyPair) {
        w.update(key_secret("pk", seq, pair, "revoked"))
            .expect("revoke");
    }

    #[test]
    fn deployment_creates_a_replicaset_and_pods_owned_by_uid() {
        let mut w = initial_world();
        let d = w
            .store
            .get::<Deployment>("agents")
            .cloned()
            .expect("deployment");
        let rs: Vec<&ReplicaSet> = w
            .store
            .list::<ReplicaSet>()
            .into_iter()
            .filter(|rs| controller_uid(&rs.metadata) == d.metadata.uid.as_deref())
            .collect();
        assert_eq!(rs.len(), 1);
        let hash = label(&rs[0].metadata, POD_TEMPLATE_HASH)
            .expect("hash")
            .to_string();
        assert_eq!(name_of(&rs[0].metadata), format!("agents-{hash}"));
        assert_eq!(annotation(&rs[0].metadata, REVISION), Some("1"));
        assert_eq!(annotation(&d.metadata, REVISION), Some("1"));
        let pods = pods_of(&w, "agents");
        assert_eq!(pods.len(), 2);
        for p in &pods {
            assert_eq!(controller_uid(&p.metadata), rs[0].metadata.uid.as_deref());
            assert_eq!(label(&p.metadata, POD_TEMPLATE_HASH), Some(hash.as_str()));
            assert_eq!(phase(p), "Pending");
        }
        // The agent Secret does not exist: the kubelet keeps them pending.
        settle(&mut w, 2);
        assert!(running_of(&w, "agents").is_empty());
    }

    #[test]
    fn template_change_rolls_to_a_new_replicaset_one_pod_at_a_time() {
        let (mut w, _) = world_on_k1();
        assert_eq!(running_of(&w, "agents").len(), 2);
        w.modify::<Deployment>("agents", |d| {
            d.spec
                .get_or_insert_default()
                .template
                .metadata
                .get_or_insert_default()
                .annotations
                .get_or_insert_default()
                .insert(l::KEY_ID.into(), "k2".into());
        });
        w.run_controllers();
        let sets: Vec<ReplicaSet> = w
            .store
            .list::<ReplicaSet>()
            .into_iter()
            .filter(|rs| name_of(&rs.metadata).starts_with("agents-"))
            .cloned()
            .collect();
        assert_eq!(sets.len(), 2);
        let new = sets
            .iter()
            .find(|rs| annotation(&rs.metadata, REVISION) == Some("2"))
            .expect("revision 2");
        assert_eq!(
            new.spec.as_ref().and_then(|s| s.replicas),
            Some(1),
            "surge of one"
        );
        // Never fewer than 2 running during the roll (maxUnavailable 0), at most 3 pods live.
        for _ in 0..10 {
            w.apply(&Event::StartPods { n: 1 });
            assert!(running_of(&w, "agents").len() >= 2);
            w.apply(&Event::Advance { secs: 31 });
            assert!(running_of(&w, "agents").len() >= 2);
        }
        let pods = running_of(&w, "agents");
        assert_eq!(pods.len(), 2);
        assert!(
            pods.iter()
                .all(|p| annotation(&p.metadata, l::KEY_ID) == Some("k2")),
            "annotations copied from the template"
        );
        let d = w.store.get::<Deployment>("agents").expect("d");
        assert_eq!(annotation(&d.metadata, REVISION), Some("2"));
        assert_eq!(d.status.as_ref().and_then(|s| s.updated_replicas), Some(2));
        // Back to the old template: the old ReplicaSet becomes revision 3.
        w.modify::<Deployment>("agents", |d| {
            d.spec
                .get_or_insert_default()
                .template
                .metadata
                .get_or_insert_default()
                .annotations = None;
        });
        w.run_controllers();
        let d = w.store.get::<Deployment>("agents").expect("d");
        assert_eq!(annotation(&d.metadata, REVISION), Some("3"));
    }

    #[test]
    fn terminating_pods_keep_running_for_their_grace_period() {
        let (mut w, _) = world_on_k1();
        let pod = running_of(&w, "agents").pop().expect("pod");
        let uid = uid_of(&pod.metadata);
        w.delete(Kind::Pod, &name_of(&pod.metadata), None)
            .expect("delete");
        let held = w
            .store
            .get::<Pod>(&name_of(&pod.metadata))
            .expect("still there");
        assert!(held.metadata.deletion_timestamp.is_some());
        assert!(w.runs[&uid].running());
        w.apply(&Event::Advance { secs: 29 });
        assert!(w.runs[&uid].running());
        w.apply(&Event::Advance { secs: 1 });
        assert!(!w.runs[&uid].running());
        assert!(
            w.store
                .list::<Pod>()
                .iter()
                .all(|p| uid_of(&p.metadata) != uid)
        );
    }

    #[test]
    fn evicted_pods_stay_failed_and_are_replaced() {
        let (mut w, k1) = world_on_k1();
        let pod = running_of(&w, "agents").pop().expect("pod");
        let name = name_of(&pod.metadata);
        assert_eq!(
            w.runs[&uid_of(&pod.metadata)].key_id_at_start,
            Some(k1.key_id())
        );
        w.evict(&name);
        w.run_controllers();
        let evicted = w.store.get::<Pod>(&name).expect("kept");
        assert_eq!(phase(evicted), "Failed");
        assert_eq!(
            evicted.status.as_ref().and_then(|s| s.reason.as_deref()),
            Some("Evicted")
        );
        assert!(!w.runs[&uid_of(&pod.metadata)].running());
        settle(&mut w, 1);
        assert_eq!(running_of(&w, "agents").len(), 2, "replacement runs");
        // StatefulSet pods are deleted and recreated instead.
        let sts_pod = running_of(&w, "stateful").pop().expect("sts pod");
        w.complete(&name_of(&sts_pod.metadata));
        w.run_controllers();
        settle(&mut w, 3);
        let again = w
            .store
            .get::<Pod>(&name_of(&sts_pod.metadata))
            .expect("recreated");
        assert_ne!(again.metadata.uid, sts_pod.metadata.uid);
        assert_eq!(phase(again), "Running");
    }

    #[test]
    fn statefulset_rolls_from_the_highest_ordinal_and_tracks_revisions() {
        let (mut w, _) = world_on_k1();
        let s = w.store.get::<StatefulSet>("stateful").expect("sts").clone();
        let st = s.status.clone().expect("status");
        assert_eq!(st.current_revision, st.update_revision);
        let rev1 = st.update_revision.clone().expect("rev");
        assert!(w.store.get::<ControllerRevision>(&rev1).is_some());
        w.modify::<StatefulSet>("stateful", |s| {
            s.spec
                .get_or_insert_default()
                .template
                .metadata
                .get_or_insert_default()
                .annotations
                .get_or_insert_default()
                .insert("x".into(), "y".into());
        });
        w.run_controllers();
        let st = w
            .store
            .get::<StatefulSet>("stateful")
            .and_then(|s| s.status.clone())
            .expect("status");
        let rev2 = st.update_revision.clone().expect("rev");
        assert_ne!(rev1, rev2);
        assert_eq!(st.current_revision.as_deref(), Some(rev1.as_str()));
        // stateful-1 goes first.
        let p1 = w.store.get::<Pod>("stateful-1").expect("p1");
        assert!(p1.metadata.deletion_timestamp.is_some());
        assert!(
            w.store
                .get::<Pod>("stateful-0")
                .expect("p0")
                .metadata
                .deletion_timestamp
                .is_none()
        );
        settle(&mut w, 8);
        let st = w
            .store
            .get::<StatefulSet>("stateful")
            .and_then(|s| s.status.clone())
            .expect("status");
        assert_eq!(st.current_revision.as_deref(), Some(rev2.as_str()));
        for p in pods_of(&w, "stateful") {
            assert_eq!(
                label(&p.metadata, CONTROLLER_REVISION_HASH),
                Some(rev2.as_str())
            );
        }
    }

    #[test]
    fn replaced_workload_gets_a_new_uid_and_new_pods() {
        let (mut w, _) = world_on_k1();
        let old_uid = w
            .store
            .get::<Deployment>("agents")
            .and_then(|d| d.metadata.uid.clone());
        let old_rs: BTreeSet<String> = w
            .store
            .list::<ReplicaSet>()
            .iter()
            .map(|rs| uid_of(&rs.metadata))
            .collect();
        let old_pods: BTreeSet<String> = pods_of(&w, "agents")
            .iter()
            .map(|p| uid_of(&p.metadata))
            .collect();
        w.replace_workload("Deployment", "agents");
        w.run_controllers();
        let d = w
            .store
            .get::<Deployment>("agents")
            .cloned()
            .expect("re-created");
        assert_ne!(d.metadata.uid, old_uid);
        let rs: Vec<&ReplicaSet> = w
            .store
            .list::<ReplicaSet>()
            .into_iter()
            .filter(|rs| name_of(&rs.metadata).starts_with("agents-"))
            .collect();
        assert_eq!(rs.len(), 1);
        assert!(
            !old_rs.contains(&uid_of(&rs[0].metadata)),
            "old ReplicaSet garbage collected"
        );
        assert_eq!(controller_uid(&rs[0].metadata), d.metadata.uid.as_deref());
        // The old pods are terminating (grace period), the new ones start.
        settle(&mut w, 3);
        let now: BTreeSet<String> = running_of(&w, "agents")
            .iter()
            .map(|p| uid_of(&p.metadata))
            .collect();
        assert_eq!(now.len(), 2);
        assert!(now.is_disjoint(&old_pods));
        assert!(old_pods.iter().all(|u| !w.runs[u].running()));
    }

    #[test]
    fn stale_writes_conflict_and_crashes_stop_writes() {
        let (mut w, k1) = world_on_k1();
        let mut stale = w.view().get::<Secret>("pk").cloned().expect("agent secret");
        w.update(agent_secret(&k1, w.now))
            .expect("unconditional update");
        stale
            .metadata
            .labels
            .get_or_insert_default()
            .insert("x".into(), "y".into());
        assert_eq!(w.update(stale), Err(WriteError::Conflict));
        w.apply(&Event::CrashAfterWrites { n: 1 });
        w.update(agent_secret(&k1, w.now)).expect("first write");
        assert_eq!(w.update(agent_secret(&k1, w.now)), Err(WriteError::Crashed));
    }

    #[test]
    fn watch_lag_shows_an_older_copy_then_wears_off() {
        let (mut w, _) = world_on_k1();
        let before = w.store.get::<Deployment>("agents").cloned();
        w.lag.insert(
            (Kind::Deployment, "agents".into()),
            (before.clone().map(Typed::wrap), 2),
        );
        w.modify::<Deployment>("agents", |d| {
            d.spec.get_or_insert_default().replicas = Some(3)
        });
        w.run_controllers();
        assert_ne!(w.store.get::<Deployment>("agents").cloned(), before);
        assert_eq!(w.view().get::<Deployment>("agents").cloned(), before);
        w.age_lag();
        assert_eq!(w.view().get::<Deployment>("agents").cloned(), before);
        let snap = w.snapshot();
        let seen = snap
            .deployments
            .iter()
            .find(|d| name_of(&d.metadata) == "agents");
        assert_eq!(seen, before.as_ref(), "the snapshot lags too");
        assert_eq!(snap.stateful_sets.len(), 1);
        assert!(snap.pods.len() >= 5);
        w.age_lag();
        assert_eq!(
            w.view().get::<Deployment>("agents"),
            w.store.get::<Deployment>("agents")
        );
    }

    #[test]
    fn pods_record_the_key_they_started_with_across_a_handout() {
        let (mut w, k1) = world_on_k1();
        let k2 = hand_out_k2(&mut w, &k1);
        // The bystander scales up: its new pod starts with k2, the old one keeps k1.
        w.modify::<Deployment>("bystander", |d| {
            d.spec.get_or_insert_default().replicas = Some(2)
        });
        settle(&mut w, 2);
        let mut kids: Vec<Option<String>> = running_of(&w, "bystander")
            .iter()
            .map(|p| w.runs[&uid_of(&p.metadata)].key_id_at_start.clone())
            .collect();
        kids.sort();
        let mut want = vec![Some(k1.key_id()), Some(k2.key_id())];
        want.sort();
        assert_eq!(kids, want);
        // Mounted tokens follow the Secret.
        for p in running_of(&w, "bystander") {
            let run = &w.runs[&uid_of(&p.metadata)];
            let (h, _) = keyward::keys::decode_token_unverified(
                run.mounted_token.as_deref().expect("token"),
            )
            .expect("jws");
            assert_eq!(h.kid, k2.key_id());
            assert!(w.agent_check(&name_of(&p.metadata)));
        }
    }

    // --- The checks catch what they must (negative controls). ---

    #[test]
    fn revoking_under_a_running_covered_pod_is_a_violation() {
        let (mut w, k1) = world_on_k1();
        assert!(w.violations.is_empty(), "{:?}", w.violations);
        hand_out_k2(&mut w, &k1);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
        revoke(&mut w, 1, &k1);
        assert!(
            w.violations
                .iter()
                .any(|v| v.0.contains("covered by a PolicyAgent")),
            "{:?}",
            w.violations
        );
    }

    #[test]
    fn revoking_under_an_uncovered_pod_needs_the_overlap() {
        let (mut w, k1) = world_on_k1();
        let k2 = hand_out_k2(&mut w, &k1);
        // Covered workloads move to k2: their pods are replaced (after the grace period).
        for app in ["agents", "stateful"] {
            for p in pods_of(&w, app) {
                w.delete_pod(&name_of(&p.metadata));
            }
        }
        settle(&mut w, 6);
        let on = |w: &World, kid: &str, bystander: bool| {
            w.running_runs()
                .filter(|r| {
                    r.key_id_at_start.as_deref() == Some(kid)
                        && r.pod.starts_with("bystander") == bystander
                })
                .count()
        };
        assert_eq!(on(&w, &k1.key_id(), false), 0, "covered pods left k1");
        assert!(on(&w, &k2.key_id(), false) >= 4, "covered pods run k2");
        assert_eq!(on(&w, &k1.key_id(), true), 1, "the bystander still runs k1");
        // Within the overlap (10m) after the hand-out: too early for the bystander.
        let mut early = w.clone();
        revoke(&mut early, 1, &k1);
        assert!(
            early
                .violations
                .iter()
                .any(|v| v.0.contains("before the overlap ends")),
            "{:?}",
            early.violations
        );
        // After the overlap: allowed.
        for _ in 0..20 {
            w.apply(&Event::Advance { secs: 30 });
        }
        revoke(&mut w, 1, &k1);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
    }

    #[test]
    fn dropping_a_key_from_the_bundle_under_a_covered_pod_is_a_violation() {
        let (mut w, k1) = world_on_k1();
        let k2 = hand_out_k2(&mut w, &k1);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
        w.update(bundle(&[&k2])).expect("bundle");
        assert!(
            w.violations
                .iter()
                .any(|v| v.0.contains("dropped from the trust bundle")),
            "{:?}",
            w.violations
        );
    }

    #[test]
    fn sealed_keys_wait_for_their_last_token() {
        let (mut w, k1) = world_on_k1();
        hand_out_k2(&mut w, &k1);
        for _ in 0..25 {
            w.apply(&Event::Advance { secs: 30 });
        }
        let exp = w.now + chrono::Duration::minutes(30);
        let mut sealed = key_secret("pk", 1, &k1, "revoked");
        sealed
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(l::LAST_TOKEN_EXP.into(), exp.to_rfc3339());
        w.update(sealed).expect("revoke");
        assert!(
            w.violations
                .iter()
                .any(|v| v.0.contains("last token's expiry")),
            "{:?}",
            w.violations
        );
    }

    #[test]
    fn an_expired_agent_token_is_a_violation() {
        let (mut w, k1) = world_on_k1();
        assert!(w.violations.is_empty());
        for _ in 0..130 {
            w.apply(&Event::Advance { secs: 30 });
        }
        let t = w.now;
        let mut s = agent_secret(&k1, t - chrono::Duration::hours(2));
        s.metadata.resource_version = None;
        w.update(s).expect("write");
        assert!(
            w.violations.iter().any(|v| v.0.contains("not valid")),
            "{:?}",
            w.violations
        );
    }

    #[test]
    fn settled_check_wants_exactly_one_active_key() {
        let (mut w, k1) = world_on_k1();
        assert!(check_settled(&w).is_empty());
        hand_out_k2(&mut w, &k1);
        assert!(!check_settled(&w).is_empty(), "k1 retiring: not complete");
        revoke(&mut w, 1, &k1);
        assert!(check_settled(&w).is_empty());
    }

    #[test]
    fn event_sequences_keep_the_model_consistent() {
        // Model invariants under random cluster events (no operator): every pod is owned by
        // an existing ReplicaSet or StatefulSet or released; Deployment pods carry their
        // ReplicaSet's hash; every running pod has a run that started from a Secret; uids are
        // unique; after a quiet period every workload runs its replicas.
        let mut runner = TestRunner::new(ProptestConfig {
            cases: cases(),
            ..ProptestConfig::default()
        });
        let result = runner.run(&events_strategy(60), |events| {
            let (mut w, _) = world_on_k1();
            for e in &events {
                w.apply(e);
                let uids: Vec<String> =
                    w.store.objects.values().map(|o| uid_of(o.meta())).collect();
                let unique: BTreeSet<&String> = uids.iter().collect();
                prop_assert_eq!(unique.len(), uids.len(), "duplicate uids");
                for p in w.store.list::<Pod>() {
                    if let Some(owner) = controller_uid(&p.metadata) {
                        let rs = w
                            .store
                            .list::<ReplicaSet>()
                            .into_iter()
                            .find(|r| uid_of(&r.metadata) == owner);
                        let sts = w
                            .store
                            .list::<StatefulSet>()
                            .into_iter()
                            .any(|s| uid_of(&s.metadata) == owner);
                        prop_assert!(
                            rs.is_some() || sts || p.metadata.deletion_timestamp.is_some(),
                            "pod {} orphaned",
                            name_of(&p.metadata)
                        );
                        if let Some(rs) = rs {
                            prop_assert_eq!(
                                label(&p.metadata, POD_TEMPLATE_HASH),
                                label(&rs.metadata, POD_TEMPLATE_HASH)
                            );
                        }
                    }
                    if phase(p) == "Running" {
                        let run = w.runs.get(&uid_of(&p.metadata));
                        prop_assert!(
                            run.is_some_and(PodRun::running),
                            "running pod {} without a run",
                            name_of(&p.metadata)
                        );
                    }
                }
            }
            // Quiet period (events may have removed the key Secret but not the agent Secret).
            w.heal();
            settle(&mut w, 40);
            for (kind, name) in w.workloads() {
                let want = if kind == "Deployment" {
                    w.store
                        .get::<Deployment>(&name)
                        .and_then(|d| d.spec.as_ref()?.replicas)
                        .unwrap_or(1)
                } else {
                    w.store
                        .get::<StatefulSet>(&name)
                        .and_then(|d| d.spec.as_ref()?.replicas)
                        .unwrap_or(1)
                };
                let running = running_of(&w, &name).len() as i32;
                prop_assert_eq!(
                    running,
                    want,
                    "{} {} runs {} of {}",
                    kind,
                    name,
                    running,
                    want
                );
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }

    /// Negative control for the driver, not a planner: does nothing.
    struct Idle;

    impl Operator for Idle {
        fn step(&mut self, _: &mut World, _: DateTime<Utc>) -> bool {
            false
        }
        fn restart(&mut self) {}
    }

    /// Negative control for the driver, not a planner: writes a fixed script (k1 handed out at
    /// once; at step `rotate_at`, k2 handed out and k1 revoked in the same step).
    struct Script {
        step: u32,
        rotate_at: u32,
        k1: KeyPair,
        k2: KeyPair,
    }

    impl Operator for Script {
        fn step(&mut self, w: &mut World, now: DateTime<Utc>) -> bool {
            self.step += 1;
            if self.step == 1 {
                w.create(key_secret("pk", 1, &self.k1, "active")).is_ok()
                    && w.create(bundle(&[&self.k1])).is_ok()
                    && w.create(agent_secret(&self.k1, now)).is_ok()
            } else if self.step == self.rotate_at {
                w.create(key_secret("pk", 2, &self.k2, "active")).is_ok()
                    && w.update(bundle(&[&self.k1, &self.k2])).is_ok()
                    && w.update(agent_secret(&self.k2, now)).is_ok()
                    && w.update(key_secret("pk", 1, &self.k1, "revoked")).is_ok()
                    && w.update(bundle(&[&self.k2])).is_ok()
            } else {
                // Keep the token fresh so only the revocation can be at fault.
                w.update(agent_secret(
                    if self.step > self.rotate_at {
                        &self.k2
                    } else {
                        &self.k1
                    },
                    now,
                ))
                .is_ok()
            }
        }
        fn restart(&mut self) {}
    }

    #[test]
    fn the_driver_flags_an_operator_that_never_mints() {
        let found = run_case(&[Event::Advance { secs: 10 }], &mut Idle);
        assert!(
            found.iter().any(|v| v.0.contains("rotation not complete")),
            "{found:?}"
        );
    }

    #[test]
    fn the_driver_flags_a_revocation_under_running_pods() {
        let events = vec![
            Event::StartPods { n: 8 },
            Event::Advance { secs: 60 },
            Event::StartPods { n: 8 },
            Event::Advance { secs: 60 },
        ];
        let mut op = Script {
            step: 0,
            rotate_at: 4,
            k1: KeyPair::generate(),
            k2: KeyPair::generate(),
        };
        let found = run_case(&events, &mut op);
        assert!(
            found
                .iter()
                .any(|v| v.0.contains("revoked") && v.0.contains("covered by a PolicyAgent")),
            "{found:?}"
        );
        // The same script, rotating before any pod ran on k1, breaks no safety invariant.
        let mut op = Script {
            step: 0,
            rotate_at: 2,
            k1: KeyPair::generate(),
            k2: KeyPair::generate(),
        };
        let found = run_case(
            &[Event::Advance { secs: 1 }, Event::Advance { secs: 1 }],
            &mut op,
        );
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    #[should_panic(expected = "rotation not complete")]
    fn the_property_fails_for_an_idle_operator() {
        let config = ProptestConfig {
            cases: 4,
            max_shrink_iters: 4,
            ..ProptestConfig::default()
        };
        check_operator_with(config, || Box::new(Idle));
    }

    // === The operator property: enabled once the OPERATOR section is implemented. ===
    /// Key Secret states of ProvisioningKey `pk`, by seq.
    fn key_states(w: &World) -> Vec<(String, String)> {
        w.store
            .list::<Secret>()
            .into_iter()
            .filter(|s| label(&s.metadata, l::COMPONENT) == Some(l::COMPONENT_KEY))
            .map(|s| {
                (
                    name_of(&s.metadata),
                    label(&s.metadata, l::KEY_STATE).unwrap_or("?").to_string(),
                )
            })
            .collect()
    }

    /// The real operator on a quiet cluster: mints and hands out the first key, rolls and
    /// confirms both PolicyAgents, and on a requested rotation hands out the successor, rolls
    /// every covered pod to it and revokes the old key (after the time fallback, as the
    /// bystander Deployment is not covered), with no violation.
    #[test]
    fn keyward_operator_rotates_and_revokes_on_evidence() {
        let mut w = initial_world();
        let mut op = KeywardOperator::default();
        let tick = |w: &mut World, op: &mut KeywardOperator| {
            w.apply(&Event::StartPods { n: usize::MAX });
            w.apply(&Event::Advance { secs: 30 });
            w.check();
            let now = w.now;
            op.step(w, now);
            w.run_controllers();
        };
        for _ in 0..20 {
            tick(&mut w, &mut op);
        }
        assert_eq!(key_states(&w), vec![("pk-k1".into(), "active".into())]);
        let kid1 = secret_text(
            w.store.get::<Secret>("pk").expect("agent Secret"),
            l::DATA_KEY_ID,
        );
        for pa in w.store.list::<PolicyAgent>() {
            let st = pa.status.clone().unwrap_or_default();
            assert_eq!(st.confirmed_key_id, kid1, "{}", name_of(&pa.metadata));
        }
        w.apply(&Event::RequestRotation);
        for _ in 0..200 {
            tick(&mut w, &mut op);
        }
        assert_eq!(
            key_states(&w),
            vec![
                ("pk-k1".into(), "deactivated".into()),
                ("pk-k2".into(), "active".into())
            ]
        );
        let kid2 = secret_text(
            w.store.get::<Secret>("pk").expect("agent Secret"),
            l::DATA_KEY_ID,
        );
        assert_ne!(kid1, kid2);
        for pa in w.store.list::<PolicyAgent>() {
            let st = pa.status.clone().unwrap_or_default();
            assert_eq!(st.confirmed_key_id, kid2, "{}", name_of(&pa.metadata));
        }
        for run in w.running_runs() {
            if !run.pod.starts_with("bystander") {
                assert_eq!(run.key_id_at_start, kid2, "{}", run.pod);
            }
        }
        assert!(w.violations.is_empty(), "{:#?}", w.violations);
    }

    /// Negative control: the real operator with a PolicyAgent decision that confirms before
    /// the pods run the new key is caught revoking under running covered pods.
    #[test]
    #[should_panic(expected = "covered by a PolicyAgent")]
    fn the_property_catches_forged_confirmations() {
        // A fixed seed: the violation needs a covered pod still on the old key when the overlap
        // has passed (a stuck rollout), which not every batch of random cases contains.
        let config = ProptestConfig {
            cases: 64,
            max_shrink_iters: 8,
            rng_seed: proptest::test_runner::RngSeed::Fixed(7),
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        check_operator_with(config, || {
            Box::new(KeywardOperator {
                forge_confirmations: true,
                ..KeywardOperator::default()
            })
        });
    }

    /// The first key takes four writes (key Secret created active, trust record, trust bundle,
    /// agent Secret), and an operator crashing after any of them resumes from evidence: the
    /// record is written before the bundle, the bundle before any hand-out, no second key is
    /// minted, nothing is violated.
    #[test]
    fn first_key_takes_three_writes_and_resumes_after_each() {
        let fresh = || {
            let mut w = World::new(DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default());
            w.insert_new(provisioning_key("pk"));
            w
        };
        let mut w = fresh();
        let mut op = KeywardOperator::default();
        let now = w.now;
        assert_eq!(op.reconcile_pk(&mut w, "pk", now), Ok(true));
        assert_eq!(w.writes, 4, "writes of the first key");
        assert_eq!(key_states(&w), vec![("pk-k1".into(), "active".into())]);
        for budget in 0..4u32 {
            let mut w = fresh();
            let mut op = KeywardOperator::default();
            w.write_budget = Some(budget);
            let now = w.now;
            assert_eq!(op.reconcile_pk(&mut w, "pk", now), Err(WriteError::Crashed));
            // Exactly the writes before the crash, in order.
            let keys = key_states(&w);
            let bundle = w.store.get::<ConfigMap>("pk-trust").map(trust_bundle_kids);
            let agent = w.store.get::<Secret>("pk").cloned();
            let recorded = w
                .store
                .get::<ProvisioningKey>("pk")
                .and_then(keyward::trust_record::TrustRecord::of)
                .is_some();
            // Key Secret, bundle, agent Secret, then the status write that carries the record.
            match budget {
                0 => assert!(keys.is_empty() && bundle.is_none() && agent.is_none() && !recorded),
                1 => assert!(
                    keys == vec![("pk-k1".into(), "active".into())]
                        && !recorded
                        && bundle.is_none()
                        && agent.is_none(),
                    "{keys:?} {bundle:?}"
                ),
                2 => assert!(!recorded && bundle.is_some_and(|b| b.len() == 1) && agent.is_none()),
                _ => assert!(!recorded && agent.is_some()),
            }
            w.write_budget = None;
            op.restart();
            w.apply(&Event::Advance { secs: 5 });
            let now = w.now;
            assert_eq!(op.reconcile_pk(&mut w, "pk", now), Ok(true));
            assert_eq!(w.writes, 4, "crash after {budget} writes: writes in all");
            assert_eq!(key_states(&w), vec![("pk-k1".into(), "active".into())]);
            let kid = secret_text(
                w.store.get::<Secret>("pk").expect("agent Secret"),
                l::DATA_KEY_ID,
            )
            .expect("key id");
            let bundle = w.store.get::<ConfigMap>("pk-trust").map(trust_bundle_kids);
            assert_eq!(bundle, Some(BTreeSet::from([kid])));
            assert!(w.violations.is_empty(), "{:#?}", w.violations);
        }
    }

    #[test]
    fn operator_keeps_the_invariants() {
        check_operator(|| Box::new(KeywardOperator::default()));
    }
}
