//! ProvisioningKey reconcile: observe (fresh reads) -> plan (pure) -> apply (one write) -> repeat,
//! then report status and Events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::{ControllerRevision, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};
use zeroize::{Zeroize, Zeroizing};

use super::audit::{self, Audit, reason};
use super::{Context, Error, FIELD_MANAGER, Result, ts, ts_start, workloads};
use crate::api::PolicyAgent;
use crate::api::conditions::{self, condition};
use crate::api::policy_agent::WorkloadKind;
use crate::api::provisioning_key::{
    HistoryEntry, KeyInfo, ProvisioningKey, ProvisioningKeyStatus, RevokedKey, TrustedKey,
    UncoveredConsumers,
};
use crate::fault;
use crate::keys::{self, KeyPair};
use crate::labels as l;
use crate::metrics::{KeyGauges, Metrics, RotationResult};
use crate::rotation::Uncovered;
use crate::rotation::desired;
use crate::rotation::observe::{self, KeyObjects, KeyRef, KeySecrets};
use crate::rotation::{
    self, AgentSecretObs, HandOutReason, KeyState, Observed, ObservedKey, Plan, Settings, Step,
    Trigger,
};
use crate::trust_record::{self, TrustRecord};
use crate::workload::{Lineage, Workload};

/// Most writes one reconcile makes before it yields to other objects.
const MAX_STEPS_PER_RECONCILE: usize = 12;
/// History entries kept in status.
const HISTORY_LIMIT: usize = 10;
/// Workloads of uncovered consumers named in status.
const UNCOVERED_NAMED: usize = 5;
/// The state shown for a trusted key id that no key Secret records.
const UNRECORDED: &str = "Unrecorded";
pub use crate::rotation::desired::{KEY_SECRET_TYPE, key_secret_name};

fn object_key(pk: &ProvisioningKey) -> Result<(String, String)> {
    Ok((
        pk.namespace().ok_or(Error::MissingObjectKey)?,
        pk.meta().name.clone().ok_or(Error::MissingObjectKey)?,
    ))
}

/// The reconcile entry point. A failed reconcile reports its error in the `Ready` condition
/// (not only in the log) and is retried with backoff by the controller's error policy.
pub async fn reconcile(pk: Arc<ProvisioningKey>, ctx: Arc<Context>) -> Result<Action> {
    if pk.meta().deletion_timestamp.is_some() {
        // Owned objects are garbage-collected through their owner references.
        if let Ok((ns, name)) = object_key(&pk) {
            ctx.metrics.remove_key(&ns, &name);
        }
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    match run_steps(&ctx, &pk, now).await {
        Ok(action) => {
            ctx.backoff.reset(&super::object_key(&*pk));
            Ok(action)
        }
        Err(e) => {
            if e.reportable()
                && let Err(report_err) = report_error(&ctx, &pk, &e, now).await
            {
                debug!(error = %report_err, "could not report the error in status");
            }
            Err(e)
        }
    }
}

async fn run_steps(ctx: &Context, pk: &ProvisioningKey, now: DateTime<Utc>) -> Result<Action> {
    let mut raw = read(ctx, pk).await?;
    let mut fresh: Option<(u32, KeyPair)> = None;
    for _ in 0..MAX_STEPS_PER_RECONCILE {
        if raw.consumers.is_none()
            && observe::needs_consumers(&observe::key_secrets(pk, &raw.key_secret_list()))
        {
            raw.consumers = Some(read_consumers(ctx, pk, &mut raw, now).await?);
        }
        let read = map(ctx, pk, &raw);
        let plan = rotation::plan(&read.settings, &read.observed, now);
        match &plan.step {
            None => {
                report(ctx, pk, &read, &plan, now).await?;
                return Ok(plan
                    .requeue_after
                    .map_or_else(Action::await_change, Action::requeue));
            }
            Some(step) => {
                let (mut minted, written) = apply(ctx, pk, &read, step, now, &mut fresh).await?;
                if let (Some(m), Step::Mint { seq, .. }) = (minted.as_mut(), step) {
                    fresh = m.pair.take().map(|p| (*seq, p));
                }
                written.record(&ctx.own_writes);
                raw.absorb(written);
                if let Step::Revoke { seq, .. } = step {
                    ctx.scans.forget(&uid_of(pk), *seq);
                }
                let regarding = pk.object_ref(&());
                for fact in step_audits(pk, &read, step, minted.as_ref()) {
                    audit::record(ctx, &regarding, fact).await;
                }
                for count in step_counts(&read, step, minted.is_some()) {
                    count.record(&ctx.metrics);
                }
            }
        }
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

fn uid_of(pk: &ProvisioningKey) -> String {
    pk.meta().uid.clone().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// observe: what to read is decided from the watch caches; what is decided on is read by GET (by
// deterministic name) at the start of the reconcile, then kept current with the responses of
// this reconcile's own writes. Then the pure mapping of `rotation::observe`.
//
// The hot path (every reconcile, every step) sends only GETs by name: no request on it costs
// more because of unrelated objects in the namespace. The only namespace-wide LISTs are the
// watches' initial LISTs (cold path, once per process and scope) and the consumer scan (at most
// once per rotation per process, see `scan_consumers`), plus a label-selected ControllerRevision
// LIST while a key that a DaemonSet consumes is retiring.

/// The raw objects a reconcile decides on. Secret data is held only while the reconcile runs;
/// private key bytes are wiped as soon as a key Secret is read (only their presence counts).
#[derive(Default)]
struct Raw {
    /// Key Secrets by sequence number.
    key_secrets: BTreeMap<u32, Secret>,
    bundle: Option<ConfigMap>,
    agent_secret: Option<Secret>,
    /// The namespace's PolicyAgents from the watch cache; those referencing the key are
    /// replaced by fresh GETs once its consumers matter (a key is retiring).
    agents: Vec<PolicyAgent>,
    /// Read only while a key is retiring.
    consumers: Option<ConsumerReads>,
    /// Key use reported by the verifier replicas, see [`read_usage`].
    usage: Option<rotation::UsageObs>,
    /// The trust record this reconcile wrote (the ProvisioningKey it was given predates it).
    record: Option<TrustRecord>,
}

/// What the revocation of a retiring key is decided on.
#[derive(Default)]
struct ConsumerReads {
    workloads: Vec<Workload>,
    replica_sets: Vec<ReplicaSet>,
    revisions: Vec<ControllerRevision>,
    /// Pods using the agent Secret that no PolicyAgent covers; `None` until scanned.
    uncovered: Option<Vec<Uncovered>>,
}

/// The object a step wrote, as the API server returned it.
enum Written {
    Nothing,
    KeySecret(u32, Box<Secret>),
    KeySecretGone(u32),
    Bundle(Box<ConfigMap>),
    AgentSecret(Box<Secret>),
    /// The trust record as written on the ProvisioningKey.
    Record(Box<TrustRecord>),
}

impl Written {
    fn record(&self, own: &super::caches::OwnWrites) {
        match self {
            Written::KeySecret(_, s) | Written::AgentSecret(s) => own.wrote(&s.metadata),
            Written::Bundle(cm) => own.wrote(&cm.metadata),
            // Not remembered: the ProvisioningKey's watch event of it wakes one reconcile that
            // writes nothing (and `ns/name` would collide with an agent Secret of the same name).
            Written::Nothing | Written::KeySecretGone(_) | Written::Record(_) => {}
        }
    }
}

impl Raw {
    fn key_secret_list(&self) -> Vec<Secret> {
        self.key_secrets.values().cloned().collect()
    }

    /// Takes a write's response as the object's current state: a GET right after the write
    /// would return the same (or something newer that the next reconcile sees).
    fn absorb(&mut self, written: Written) {
        match written {
            Written::Nothing => {}
            Written::KeySecret(seq, mut s) => {
                wipe_private(&mut s);
                self.key_secrets.insert(seq, *s);
            }
            Written::KeySecretGone(seq) => {
                self.key_secrets.remove(&seq);
            }
            Written::Bundle(cm) => self.bundle = Some(*cm),
            Written::Record(r) => self.record = Some(*r),
            Written::AgentSecret(s) => {
                if let Some(old) = self.agent_secret.as_mut() {
                    wipe(old);
                }
                self.agent_secret = Some(*s);
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        for s in self.key_secrets.values_mut() {
            wipe(s);
        }
        if let Some(s) = self.agent_secret.as_mut() {
            wipe(s);
        }
    }
}

/// Wipes the private key of a key Secret, keeping the entry (its presence is evidence).
fn wipe_private(s: &mut Secret) {
    if let Some(v) = s.data.as_mut().and_then(|d| d.get_mut(l::DATA_PRIVATE_KEY)) {
        v.0.zeroize();
    }
}

/// The key, bundle and agent Secret reads, and the PolicyAgents from the cache.
///
/// Why each read is safe:
/// - Key Secrets: GET `<pk>-k<seq>` for every seq the Keyward-labelled Secret cache holds for
///   this key, plus every seq this process minted (recorded synchronously at the write, so a key
///   minted a moment ago is read even before its watch event), plus the bundle's `last-seq`.
///   The cache's first LIST is a consistent snapshot taken after this process started, so it
///   holds every key Secret minted before; after it, key Secrets are created only by this
///   process (one writer per key). A key Secret that someone else creates or restores and that
///   the cache has not delivered yet is simply not seen for a moment: a trusted key id leaves
///   the bundle only through a revocation of a key Secret read here, never because a key
///   Secret is missing (it stays trusted as `Unrecorded`), and minting its seq again fails
///   with 409, after which it is read. A deleted one answers 404 (fresh).
/// - Trust bundle and agent Secret: GET by name (the names recorded on the key Secrets).
/// - PolicyAgents: the cache decides who to read; see [`read_consumers`] for the fresh reads
///   a revocation is decided on.
async fn read(ctx: &Context, pk: &ProvisioningKey) -> Result<Raw> {
    ctx.caches.ready().await;
    let (ns, name) = object_key(pk)?;
    let uid = uid_of(pk);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let mut raw = Raw::default();
    for seq in ctx.caches.key_seqs(&ns, &name, &uid) {
        get_key_secret(ctx, &secrets, &name, &uid, seq, &mut raw).await?;
    }
    let parsed = observe::key_secrets(pk, &raw.key_secret_list());
    let names = observe::names(pk, &parsed);
    raw.bundle = cms.get_opt(&names.trust_bundle_name).await?;
    let last_seq = raw
        .bundle
        .as_ref()
        .filter(|cm| observe::controlled_by(cm.meta(), &uid))
        .and_then(|cm| cm.annotations().get(l::LAST_SEQ))
        .and_then(|v| v.parse::<u32>().ok());
    if let Some(seq) = last_seq.filter(|s| !raw.key_secrets.contains_key(s)) {
        // The newest published key, even if its labels were edited out of the cache's selector.
        get_key_secret(ctx, &secrets, &name, &uid, seq, &mut raw).await?;
    }
    raw.agent_secret = secrets.get_opt(&names.secret_name).await?;
    let decisive = observe::needs_consumers(&parsed)
        && pk
            .spec
            .rotation
            .as_ref()
            .is_some_and(|r| r.revoke_when_unused_for.is_some());
    raw.usage = read_usage(ctx, &ns, &name, decisive).await?;
    raw.agents = ctx
        .caches
        .agents(&ns)
        .into_iter()
        .map(|pa| (*pa).clone())
        .collect();
    Ok(raw)
}

/// Key use reported by the verifier replicas (`crate::usage`).
/// - For status (`lastUsedAt`) only: the reports the metadata cache names, by GET; no report
///   named, no request.
/// - When it can justify a revocation (a key is retiring and the spec sets
///   `revokeWhenUnusedFor`): the key's reports by a fresh label-selected LIST and the verifier
///   Leases by a fresh LIST, so a report or a replica the caches have not delivered yet is never
///   missed. A Lease LIST that fails is a reason to hold (`VerifierSilent`), never to revoke.
async fn read_usage(
    ctx: &Context,
    ns: &str,
    name: &str,
    decisive: bool,
) -> Result<Option<rotation::UsageObs>> {
    use crate::api::KeyUsageReport;
    let api: Api<KeyUsageReport> = Api::namespaced(ctx.client.clone(), ns);
    let reports = if decisive {
        api.list(&ListParams::default().labels(&format!("{}={name}", l::PROVISIONING_KEY)))
            .await?
            .items
    } else {
        let names = ctx.caches.report_names(ns, name);
        if names.is_empty() {
            return Ok(None);
        }
        let mut reports = Vec::new();
        for n in names {
            reports.extend(api.get_opt(&n).await?);
        }
        reports
    };
    let reports: Vec<KeyUsageReport> = reports
        .into_iter()
        .filter(|r| r.spec.provisioning_key == name)
        .collect();
    let now = ctx.now();
    // The verifier Leases: what each replica vouches for, and which reports it has written (a
    // listed report that is missing or older counts as use now, see `crate::usage`).
    let leases: Result<Vec<Result<crate::usage::Replica, String>>, String> = if !decisive {
        Err("verifier Leases not read".to_string())
    } else {
        match &ctx.config.verifier_namespace {
            None => Err(
                "the operator was started without --verifier-namespace, so no verifier replica \
                 can vouch"
                    .to_string(),
            ),
            Some(vns) => {
                let api: Api<k8s_openapi::api::coordination::v1::Lease> =
                    Api::namespaced(ctx.client.clone(), vns);
                match api
                    .list(&ListParams::default().labels(crate::usage::LEASE_SELECTOR))
                    .await
                {
                    Ok(list) => Ok(list.items.iter().map(crate::usage::parse_lease).collect()),
                    Err(e) => Err(format!(
                        "the verifier Leases in namespace {vns} could not be read: {e}"
                    )),
                }
            }
        }
    };
    let (coverage, parsed) = match leases {
        Ok(parsed) => (
            crate::usage::coverage(&parsed, &ctx.config.verifier_replicas, ns, now),
            parsed,
        ),
        Err(why) => (Err(why), Vec::new()),
    };
    Ok(Some(rotation::UsageObs {
        coverage,
        key_use: crate::usage::key_use(&reports, &parsed, ns, name, now),
    }))
}

async fn get_key_secret(
    ctx: &Context,
    secrets: &Api<Secret>,
    name: &str,
    uid: &str,
    seq: u32,
    raw: &mut Raw,
) -> Result<()> {
    match secrets.get_opt(&key_secret_name(name, seq)).await? {
        Some(mut s) => {
            wipe_private(&mut s);
            raw.key_secrets.insert(seq, s);
        }
        None => ctx.caches.gone(uid, seq),
    }
    Ok(())
}

/// A consumer scan's result: the uncovered pods, and the resourceVersion of each workload that
/// runs them (`Kind/name` -> resourceVersion) when the scan was made.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    uncovered: Vec<Uncovered>,
    owners: BTreeMap<String, Option<String>>,
}

/// Consumer scans per rotation: (ProvisioningKey uid, retiring seq) -> scan.
#[derive(Default)]
pub struct Scans(std::sync::Mutex<std::collections::HashMap<(String, u32), Scan>>);

impl Scans {
    fn get(&self, uid: &str, seq: u32) -> Option<Scan> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(uid.to_string(), seq)).cloned()
    }

    fn put(&self, uid: &str, seq: u32, found: Scan) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.retain(|(u, _), _| u != uid);
        m.insert((uid.to_string(), seq), found);
    }

    fn forget(&self, uid: &str, seq: u32) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(&(uid.to_string(), seq));
    }
}

/// How long after the hand-out the consumer scan waits, so a pod started just before the new
/// key was handed out has been created (and is listed) and one started just after has read
/// the new Secret, not a kubelet's older copy.
pub const SCAN_DELAY: Duration = Duration::from_secs(3);

/// The fresh reads a retiring key's revocation is decided on (every reconcile while a key is
/// retiring; all by name except the DaemonSet lineage):
/// - every PolicyAgent the cache shows referencing this key, by GET (one deleted meanwhile
///   drops out; its status is the one the API server has now);
/// - the workload each of them (or the PolicyAgent claiming its workload) names, by GET;
/// - the lineage that ties the confirmed revision to the workload: a Deployment's ReplicaSet
///   `<deployment>-<confirmedRevision>` by GET (its `revision` annotation equals the
///   Deployment's exactly when that revision is current); a DaemonSet's ControllerRevisions
///   by a label-selected LIST (their current one is the highest `revision`, which no single
///   GET can show); a StatefulSet needs none (`status.updateRevision`).
///
/// A PolicyAgent the cache has not shown yet is not missed: its workload's pods use the agent
/// Secret, so the consumer scan counts them as uncovered, and the old key then also waits for
/// its last token's expiry.
async fn read_consumers(
    ctx: &Context,
    pk: &ProvisioningKey,
    raw: &mut Raw,
    now: DateTime<Utc>,
) -> Result<ConsumerReads> {
    let (ns, name) = object_key(pk)?;
    let pas: Api<PolicyAgent> = Api::namespaced(ctx.client.clone(), &ns);
    let referencing: Vec<String> = raw
        .agents
        .iter()
        .filter(|pa| pa.spec.provisioning_key_ref.name == name)
        .map(ResourceExt::name_any)
        .collect();
    for pa_name in referencing {
        let fresh = pas.get_opt(&pa_name).await?;
        raw.agents.retain(|pa| pa.name_any() != pa_name);
        if let Some(mut pa) = fresh {
            pa.meta_mut().managed_fields = None;
            raw.agents.push(pa);
        }
    }
    let mut out = ConsumerReads::default();
    let owners: Vec<PolicyAgent> = raw
        .agents
        .iter()
        .filter(|pa| pa.spec.provisioning_key_ref.name == name)
        .map(|pa| observe::claim_owner(pa, &raw.agents).clone())
        .collect();
    let mut named: Vec<(WorkloadKind, String, Option<String>)> = owners
        .iter()
        .map(|pa| {
            (
                pa.spec.workload_ref.kind,
                pa.spec.workload_ref.name.clone(),
                pa.status
                    .as_ref()
                    .and_then(|s| s.confirmed_revision.clone()),
            )
        })
        .collect();
    named.sort_by(|a, b| (a.0.to_string(), &a.1).cmp(&(b.0.to_string(), &b.1)));
    named.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    for (kind, wname, confirmed) in named {
        let Some(w) = workloads::fetch(&ctx.client, &ns, kind, &wname).await? else {
            continue;
        };
        match kind {
            WorkloadKind::Deployment => {
                if let Some(rev) = confirmed {
                    let rs = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns)
                        .get_opt(&format!("{wname}-{rev}"))
                        .await?;
                    out.replica_sets.extend(rs);
                }
            }
            WorkloadKind::DaemonSet => {
                let (_, revisions) = workloads::lineage(&ctx.client, &ns, &w).await?;
                out.revisions.extend(revisions);
            }
            WorkloadKind::StatefulSet => {}
        }
        out.workloads.push(w);
    }
    out.uncovered = scan_consumers(ctx, pk, raw, &out, now).await?;
    Ok(out)
}

/// The pods no PolicyAgent covers that use the agent Secret, found once per rotation: a fresh
/// LIST of the namespace's pods, after the agent Secret was read carrying the new key, then
/// the ReplicaSets of the pods that use the Secret, by GET. (A LIST served from the API
/// server's watch cache at `NotOlderThan` the agent Secret's resourceVersion would be cheaper,
/// but on 1.20 the pod cache only advances with pod events: it blocks 3 s and fails with 504.)
///
/// Once is enough: every pod that existed when the new key was handed out and may hold the old
/// key is in that list; a pod created later reads the new key. The pods found are remembered
/// for the rest of the rotation, with the workloads that run them; only when one of those
/// changes (read by name, see [`owners_changed`]) is the namespace listed again, so scaling a
/// stray workload down still lets the revocation go ahead on the PolicyAgents' evidence. A
/// restart of the operator scans again.
async fn scan_consumers(
    ctx: &Context,
    pk: &ProvisioningKey,
    raw: &Raw,
    reads: &ConsumerReads,
    now: DateTime<Utc>,
) -> Result<Option<Vec<Uncovered>>> {
    let (ns, name) = object_key(pk)?;
    let uid = uid_of(pk);
    let parsed = observe::key_secrets(pk, &raw.key_secret_list());
    let Some(old) = parsed.keys.iter().find(|k| k.state == KeyState::Retiring) else {
        return Ok(None);
    };
    if let Some(scan) = ctx.scans.get(&uid, old.seq) {
        // Pods are not watched. Their workloads are read by name instead (cheap): only when one
        // of them changed (scaled down, rolled, deleted) is the namespace scanned again.
        if !owners_changed(ctx, &ns, &scan.owners).await? {
            return Ok(Some(scan.uncovered));
        }
    }
    let names = observe::names(pk, &parsed);
    // The agent Secret must carry the new key, for long enough (see SCAN_DELAY).
    let mapped = map(ctx, pk, raw);
    let current = rotation::current(&mapped.observed.keys).map(|k| k.kid.clone());
    let handed_out = match &mapped.observed.agent_secret {
        AgentSecretObs::Owned(s) if s.kid.is_some() && s.kid == current => s.handed_out_at,
        _ => None,
    };
    let Some(handed_out) = handed_out else {
        return Ok(None);
    };
    if now < handed_out + chrono::Duration::from_std(SCAN_DELAY).unwrap_or_default() {
        return Ok(None);
    }
    let pods: Vec<Pod> = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| {
            crate::workload::holds_key(p) && crate::workload::uses_secret(p, &names.secret_name)
        })
        .collect();
    let mut replica_sets = reads.replica_sets.clone();
    let rs_names: std::collections::BTreeSet<String> = pods
        .iter()
        .flat_map(|p| p.owner_references().iter())
        .filter(|o| o.controller == Some(true) && o.kind == "ReplicaSet")
        .map(|o| o.name.clone())
        .collect();
    let rs_api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns);
    for rs in rs_names {
        if !replica_sets.iter().any(|r| r.name_any() == rs) {
            replica_sets.extend(rs_api.get_opt(&rs).await?);
        }
    }
    let found = observe::uncovered(
        &name,
        &names.secret_name,
        &raw.agents,
        &reads.workloads,
        Lineage {
            replica_sets: &replica_sets,
            revisions: &reads.revisions,
        },
        &pods,
    );
    let mut owners = BTreeMap::new();
    for u in &found {
        owners.insert(u.workload.clone(), None);
    }
    for (owner, rv) in &mut owners {
        *rv = owner_version(ctx, &ns, owner).await?;
    }
    info!(pk = %name, seq = old.seq, uncovered = found.len(), "consumer scan");
    ctx.scans.put(
        &uid,
        old.seq,
        Scan {
            uncovered: found.clone(),
            owners,
        },
    );
    Ok(Some(found))
}

/// Whether any workload that ran uncovered pods at the last scan changed since.
async fn owners_changed(
    ctx: &Context,
    ns: &str,
    owners: &BTreeMap<String, Option<String>>,
) -> Result<bool> {
    for (owner, rv) in owners {
        if rv.is_some() && owner_version(ctx, ns, owner).await? != *rv {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The resourceVersion of workload `Kind/name` (metadata-only GET); `None` when it is gone or
/// of a kind not read here (its pods then wait for the time fallback).
async fn owner_version(ctx: &Context, ns: &str, owner: &str) -> Result<Option<String>> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let Some((kind, name)) = owner.split_once('/') else {
        return Ok(None);
    };
    let c = ctx.client.clone();
    let rv = |m: Option<ObjectMeta>| m.and_then(|m| m.resource_version);
    let version = match kind {
        "Deployment" => rv(Api::<Deployment>::namespaced(c, ns)
            .get_metadata_opt(name)
            .await?
            .map(|m| m.metadata)),
        "StatefulSet" => rv(Api::<StatefulSet>::namespaced(c, ns)
            .get_metadata_opt(name)
            .await?
            .map(|m| m.metadata)),
        "DaemonSet" => rv(Api::<DaemonSet>::namespaced(c, ns)
            .get_metadata_opt(name)
            .await?
            .map(|m| m.metadata)),
        "ReplicaSet" => rv(Api::<ReplicaSet>::namespaced(c, ns)
            .get_metadata_opt(name)
            .await?
            .map(|m| m.metadata)),
        "Pod" => rv(Api::<Pod>::namespaced(c, ns)
            .get_metadata_opt(name)
            .await?
            .map(|m| m.metadata)),
        _ => return Ok(None),
    };
    Ok(Some(version.unwrap_or_default()))
}

/// What observe read: the planner's input and what apply needs besides it.
struct Read {
    settings: Settings,
    observed: Observed,
    secrets: KeySecrets,
    bundle_jwks: BTreeMap<String, keys::Jwk>,
    /// resourceVersions of the trust bundle and of the agent Secret as read: the preconditions
    /// of their writes.
    bundle_rv: Option<String>,
    agent_secret_rv: Option<String>,
}

/// The pure mapping of what was read.
fn map(ctx: &Context, pk: &ProvisioningKey, raw: &Raw) -> Read {
    let key_secrets = raw.key_secret_list();
    let none = ConsumerReads::default();
    let consumers = raw.consumers.as_ref().unwrap_or(&none);
    let mut mapped = observe::observe(
        &KeyObjects {
            pk,
            key_secrets: &key_secrets,
            bundle: raw.bundle.as_ref(),
            agent_secret: raw.agent_secret.as_ref(),
            agents: &raw.agents,
            workloads: &consumers.workloads,
            lineage: Lineage {
                replica_sets: &consumers.replica_sets,
                revisions: &consumers.revisions,
            },
            pods: None,
        },
        &ctx.config.floors,
    );
    mapped.observed.uncovered = consumers.uncovered.clone();
    mapped.observed.usage = raw.usage.clone();
    if let Some(r) = &raw.record {
        mapped.observed.record = Some(r.clone());
    }
    for t in &mapped.secrets.tampered {
        tracing::warn!(pk = %pk.name_any(), secret = %t, "key Secret evidence repaired or ignored");
    }
    Read {
        settings: mapped.settings,
        observed: mapped.observed,
        secrets: mapped.secrets,
        bundle_jwks: mapped.bundle_jwks,
        bundle_rv: raw.bundle.as_ref().and_then(|c| c.resource_version()),
        agent_secret_rv: raw.agent_secret.as_ref().and_then(|s| s.resource_version()),
    }
}

// ---------------------------------------------------------------------------------------------
// apply: one idempotent write, with names known in advance; then its audit record.

fn key_ref(pk: &ProvisioningKey, seq: u32) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: pk.namespace(),
        name: Some(key_secret_name(&pk.name_any(), seq)),
        ..Default::default()
    }
}

fn find(obs: &Observed, seq: u32) -> Option<&ObservedKey> {
    obs.keys.iter().find(|k| k.seq == seq)
}

/// When a verifier last reported `kid` used (status `trustedKeys[].lastUsedAt`).
fn last_used(obs: &Observed, kid: &str) -> Option<String> {
    obs.usage
        .as_ref()
        .and_then(|u| u.key_use.last_used.get(kid))
        .map(|t| ts(*t))
}

/// Why a revocation was safe, for its audit note.
fn revocation_evidence(settings: &Settings, obs: &Observed, emergency: bool) -> String {
    if emergency {
        return "listed in spec.compromisedKeys; revoked without waiting for confirmation".into();
    }
    let overlap = humantime::format_duration(settings.overlap);
    let mut parts = Vec::new();
    if !obs.consumers.is_empty() {
        let cur = rotation::current(&obs.keys).map_or("-", |c| c.kid.as_str());
        let names: Vec<&str> = obs.consumers.iter().map(|c| c.name.as_str()).collect();
        parts.push(format!(
            "every PolicyAgent ({}) is confirmed on {cur}",
            names.join(", ")
        ));
    }
    match obs.uncovered.as_deref() {
        Some(u) if !u.is_empty() => parts.push(format!(
            "{} pod(s) no PolicyAgent covers ({}) use the agent Secret: overlap of {overlap} after the hand-out passed{}",
            u.len(),
            rotation::uncovered_workloads(u).join(", "),
            if settings.include_private_key {
                ""
            } else {
                " and the key's last token expired"
            }
        )),
        _ if obs.consumers.is_empty() => parts.push(format!(
            "overlap of {overlap} passed and no PolicyAgent references this key"
        )),
        _ => {}
    }
    if let (Some(window), Some(Ok(cov))) = (
        settings.revoke_when_unused_for,
        obs.usage.as_ref().map(|u| &u.coverage),
    ) {
        parts.push(format!(
            "unused for {} as reported by verifier replica(s) {} (reports as of {})",
            humantime::format_duration(window),
            cov.replicas.join(", "),
            ts(cov.as_of)
        ));
    }
    parts.join("; ")
}

/// A key minted by [`apply`]: its id and fingerprint, for the audit (never key bytes).
struct Minted {
    kid: String,
    fingerprint: String,
    /// The key itself, kept (zeroized on drop) for a hand-out later in the same reconcile, so
    /// its private key is not read back from the API server right after it was written.
    pair: Option<KeyPair>,
}

/// The audit of an applied step: pure, one entry per fact (the step describes its own audit,
/// `apply` only writes, the reconcile records). Notes name key ids and fingerprints only.
fn step_audits(
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    minted: Option<&Minted>,
) -> Vec<Audit<'static>> {
    let (settings, obs) = (&read.settings, &read.observed);
    let fact =
        |warning: bool, reason: &'static str, action: &'static str, seq: u32, note: String| Audit {
            warning,
            reason,
            action,
            note,
            related: Some(key_ref(pk, seq)),
        };
    let key = |seq: u32| find(obs, seq);
    match step {
        Step::Mint {
            seq,
            trigger,
            active,
            ..
        } => {
            // Nothing new when the key Secret already existed (minted before a crash).
            let Some(m) = minted else {
                return Vec::new();
            };
            // A first key created active records two Events, KeyMinted here and KeyHandedOut
            // at the hand-out (down from four: no KeyPublished or KeyActivated, since those
            // transitions are no longer writes of their own). Two, not one, because:
            // - each Event states a fact that holds when it is recorded. The hand-out is a later
            //   write that may be held back (the agent Secret's or bundle's name taken, a key
            //   listed as compromised first) or interrupted by a crash; a mint Event claiming
            //   it would be false then, and a hand-out Event alone would leave a private key
            //   that came into existence without any record;
            // - the hand-out Event cannot be left out for the first key only: from evidence, a
            //   first hand-out is indistinguishable from re-creating a deleted agent Secret,
            //   which must stay audited.
            let note = if *active {
                format!(
                    "minted key {} (fingerprint {}, seq {seq}, trigger {}) as the first key, created active: no key was trusted and no agent held one, so publishDelay protects nobody; trust bundle {} lists it before Secret {} carries it",
                    m.kid,
                    m.fingerprint,
                    trigger.as_str(),
                    settings.trust_bundle_name,
                    settings.secret_name
                )
            } else {
                format!(
                    "minted key {} (fingerprint {}, seq {seq}, trigger {})",
                    m.kid,
                    m.fingerprint,
                    trigger.as_str()
                )
            };
            let mut facts = vec![fact(false, reason::KEY_MINTED, "Mint", *seq, note)];
            if *trigger == Trigger::Compromised {
                facts.push(fact(
                    true,
                    reason::EMERGENCY_REVOCATION,
                    "Mint",
                    *seq,
                    format!(
                        "compromised key(s) {} listed in spec.compromisedKeys: minted successor {}; the compromised keys are revoked without waiting for confirmation",
                        settings.compromised.iter().cloned().collect::<Vec<_>>().join(", "),
                        m.kid
                    ),
                ));
            }
            facts
        }
        Step::MarkPublished { .. } | Step::Prune { .. } => Vec::new(),
        Step::WriteBundle { .. } => {
            let injected = rotation::bundle_target(settings, obs).injected;
            if injected.is_empty() {
                return Vec::new();
            }
            vec![Audit {
                warning: true,
                reason: reason::BUNDLE_TAMPERED,
                action: "Publish",
                note: format!(
                    "trust bundle {} trusted key id(s) {} that this operator never minted (not in the trust record); removed. The verifier never trusted them. Someone who may write the ConfigMap added them: check who (audit log)",
                    settings.trust_bundle_name,
                    injected.join(", ")
                ),
                related: None,
            }]
        }
        // Recorded as it happens by the KeyMinted, KeyRevoked and EmergencyRevocation Events.
        Step::WriteRecord { .. } => Vec::new(),
        Step::RecordPublished { seq } => key(*seq)
            .map(|k| {
                fact(
                    false,
                    reason::KEY_PUBLISHED,
                    "Publish",
                    *seq,
                    format!(
                        "key {} (fingerprint {}) is in trust bundle {}",
                        k.kid, k.fingerprint, settings.trust_bundle_name
                    ),
                )
            })
            .into_iter()
            .collect(),
        Step::Activate { seq, emergency } => key(*seq)
            .map(|k| {
                fact(
                    false,
                    reason::KEY_ACTIVATED,
                    "Activate",
                    *seq,
                    format!(
                        "key {} (fingerprint {}) is now current{}",
                        k.kid,
                        k.fingerprint,
                        if *emergency {
                            " (emergency: publishDelay skipped)"
                        } else {
                            ""
                        }
                    ),
                )
            })
            .into_iter()
            .collect(),
        Step::Retire { seq } => key(*seq)
            .map(|k| {
                fact(
                    false,
                    reason::KEY_RETIRING,
                    "Retire",
                    *seq,
                    format!(
                        "key {} is superseded; it stays trusted until revocation is safe",
                        k.kid
                    ),
                )
            })
            .into_iter()
            .collect(),
        Step::HandOut { seq, reason: why } => {
            let kid = key(*seq).map(|k| k.kid.clone()).unwrap_or_default();
            let secret = &settings.secret_name;
            let (reason, note) = match why {
                HandOutReason::TokenRefresh => (
                    reason::TOKEN_REFRESHED,
                    format!("re-issued the token of key {kid} in Secret {secret}"),
                ),
                HandOutReason::NewKey => (
                    reason::KEY_HANDED_OUT,
                    format!("Secret {secret} now carries key {kid}"),
                ),
                HandOutReason::Repair => (
                    reason::KEY_HANDED_OUT,
                    format!("Secret {secret} rewritten for key {kid} (it differed from the spec)"),
                ),
            };
            vec![fact(false, reason, "HandOut", *seq, note)]
        }
        Step::Revoke { seq, emergency } => key(*seq)
            .map(|k| {
                fact(
                    *emergency,
                    if *emergency {
                        reason::EMERGENCY_REVOCATION
                    } else {
                        reason::KEY_REVOKED
                    },
                    "Revoke",
                    *seq,
                    format!(
                        "revoked key {} (fingerprint {}); private key deleted; {}",
                        k.kid,
                        k.fingerprint,
                        revocation_evidence(settings, obs, *emergency)
                    ),
                )
            })
            .into_iter()
            .collect(),
        Step::Repair { seq } => key(*seq)
            .map(|k| {
                fact(
                    true,
                    reason::KEY_SECRET_REPAIRED,
                    "Repair",
                    *seq,
                    format!(
                        "key Secret {} of key {} was edited ({}); its labels and annotations were restored, state {} as its evidence shows",
                        key_secret_name(&pk.name_any(), *seq),
                        k.kid,
                        k.edited.as_deref().unwrap_or("metadata differed"),
                        k.state.as_str()
                    ),
                )
            })
            .into_iter()
            .collect(),
    }
}

async fn apply(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    now: DateTime<Utc>,
    fresh: &mut Option<(u32, KeyPair)>,
) -> Result<(Option<Minted>, Written)> {
    let (settings, obs, refs) = (&read.settings, &read.observed, &read.secrets.refs);
    let mut minted = None;
    let written;
    let (ns, name) = object_key(pk)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey)?;
    debug!(pk = %name, ?step, "applying step");
    // Under leader election, nothing is written unless this replica holds the Lease right now
    // (the client's fence checks again as the request is sent).
    ctx.ensure_leading()?;
    match step {
        Step::Mint { seq, .. } => {
            let Some(mint) = desired::MintOf::of(step) else {
                return Ok((None, Written::Nothing));
            };
            let pair = KeyPair::generate();
            let public = pair.public_key();
            let (kid, fingerprint) = (public.key_id(), public.fingerprint());
            let mut secret = desired::key_secret(pk, owner, settings, mint, &pair, now);
            let created = secrets
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &secret,
                )
                .await;
            wipe(&mut secret);
            let uid = uid_of(pk);
            match created {
                Ok(s) => {
                    ctx.caches.minted(&uid, *seq);
                    written = Written::KeySecret(*seq, Box::new(s));
                }
                // Already minted (by us before a crash, or by another replica): the existing
                // Secret is the evidence; never mint twice for the same seq. A Secret of that
                // name that this ProvisioningKey does not control is someone else's: never
                // taken for ours, reported, retried with backoff.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let key_name = key_secret_name(&name, *seq);
                    let existing = secrets.get_opt(&key_name).await?;
                    if let Some(s) = existing.filter(|s| observe::controlled_by(s.meta(), &uid)) {
                        info!(pk = %name, seq, "key Secret already exists; not minting again");
                        ctx.caches.minted(&uid, *seq);
                        return Ok((None, Written::KeySecret(*seq, Box::new(s))));
                    }
                    return Err(Error::NameTaken {
                        kind: "Secret",
                        name: key_name,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            fault::after("mint");
            minted = Some(Minted {
                kid,
                fingerprint,
                pair: Some(pair),
            });
        }
        Step::MarkPublished { seq } => {
            written =
                transition(&secrets, &name, refs, *seq, KeyState::Published, &[], false).await?;
            fault::after("mark-published");
        }
        Step::WriteRecord { record } => {
            written = Written::Record(Box::new(write_record(ctx, pk, record).await?));
            fault::after("record");
            info!(pk = %name, kids = ?record.kids.keys().collect::<Vec<_>>(), "trust record written");
        }
        Step::WriteBundle { trusted, revoked } => {
            let cm = desired::trust_bundle(
                pk,
                owner,
                settings,
                obs,
                refs,
                &read.bundle_jwks,
                trusted,
                revoked,
            )?;
            let cm = write_bundle(
                &Api::namespaced(ctx.client.clone(), &ns),
                cm,
                read.bundle_rv.as_deref(),
            )
            .await?;
            written = Written::Bundle(Box::new(cm));
            fault::after("bundle");
            info!(pk = %name, trusted = ?trusted, revoked = ?revoked, "trust bundle written");
        }
        Step::RecordPublished { seq } => {
            written = transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Published,
                &[(l::PUBLISHED_AT, ts_start(now))],
                false,
            )
            .await?;
            fault::after("record-published");
        }
        Step::Activate { seq, .. } => {
            written = transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Active,
                &[(l::ACTIVATED_AT, ts_start(now))],
                false,
            )
            .await?;
            fault::after("activate");
        }
        Step::Retire { seq } => {
            written = transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Retiring,
                &desired::retire_annotations(obs, *seq, now),
                false,
            )
            .await?;
            fault::after("retire");
        }
        Step::HandOut { seq, .. } => {
            let fresh = fresh.take().filter(|(s, _)| s == seq).map(|(_, p)| p);
            written = Written::AgentSecret(Box::new(
                hand_out(
                    ctx,
                    pk,
                    settings,
                    obs,
                    (*seq, read.agent_secret_rv.as_deref()),
                    now,
                    fresh,
                )
                .await?,
            ));
            fault::after("hand-out");
        }
        Step::Revoke { seq, .. } => {
            fault::before("revoke");
            written = transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Revoked,
                &[(l::REVOKED_AT, ts_start(now))],
                true,
            )
            .await?;
            fault::after("revoke");
        }
        Step::Repair { seq } => {
            let Some(k) = find(obs, *seq) else {
                return Ok((None, Written::Nothing));
            };
            let key_name = key_secret_name(&name, *seq);
            // Only the metadata is restored, with the observed resourceVersion as precondition;
            // the state written is the one the key's evidence supports.
            let body = json!({
                "metadata": {
                    "resourceVersion": observed_rv(&name, refs, *seq)?,
                    "labels": {
                        l::MANAGED_BY: l::MANAGED_BY_VALUE,
                        l::PROVISIONING_KEY: name,
                        l::COMPONENT: l::COMPONENT_KEY,
                        l::KEY_STATE: k.state.as_str(),
                        l::KEY_SEQ: seq.to_string(),
                    },
                    "annotations": { l::KEY_ID: k.kid, l::FINGERPRINT: k.fingerprint },
                }
            });
            let s = secrets
                .patch(
                    &key_name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &Patch::Merge(&body),
                )
                .await?;
            written = Written::KeySecret(*seq, Box::new(s));
        }
        Step::Prune { seq } => {
            let key_name = key_secret_name(&name, *seq);
            // Deleted only as it was read (revoked, by this resourceVersion).
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(observed_rv(&name, refs, *seq)?),
                    uid: None,
                }),
                ..Default::default()
            };
            match secrets.delete(&key_name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            ctx.caches.gone(&uid_of(pk), *seq);
            written = Written::KeySecretGone(*seq);
            info!(pk = %name, secret = %key_name, "pruned old revoked key Secret");
        }
    }
    Ok((minted, written))
}

/// The resourceVersion of key Secret `seq` as read: the precondition of every write to it. A
/// write without one would be unconditional, so its absence is an error, never a default.
fn observed_rv(pk_name: &str, refs: &BTreeMap<u32, KeyRef>, seq: u32) -> Result<String> {
    refs.get(&seq)
        .map(|r| r.resource_version.clone())
        .filter(|rv| !rv.is_empty())
        .ok_or_else(|| Error::KeySecret {
            name: key_secret_name(pk_name, seq),
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        })
}

/// Moves a key Secret forward to `state` (see [`transition_key_secret`]).
async fn transition(
    secrets: &Api<Secret>,
    pk_name: &str,
    refs: &BTreeMap<u32, KeyRef>,
    seq: u32,
    state: KeyState,
    annotations: &[(&str, String)],
    drop_private: bool,
) -> Result<Written> {
    let rv = observed_rv(pk_name, refs, seq)?;
    let s =
        transition_key_secret(secrets, pk_name, seq, &rv, state, annotations, drop_private).await?;
    Ok(Written::KeySecret(seq, Box::new(s)))
}

/// Moves key Secret `seq` forward to `state`, adding annotations; with `drop_private` (a
/// revocation), deletes the private key. The merge patch carries `observed_rv`, the
/// resourceVersion the decision was made on, as a precondition: if anyone (a new leader, while
/// this replica was paused) changed the key Secret since, it fails with 409 and changes
/// nothing.
pub async fn transition_key_secret(
    secrets: &Api<Secret>,
    pk_name: &str,
    seq: u32,
    observed_rv: &str,
    state: KeyState,
    annotations: &[(&str, String)],
    drop_private: bool,
) -> Result<Secret> {
    if observed_rv.is_empty() {
        return Err(Error::KeySecret {
            name: key_secret_name(pk_name, seq),
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        });
    }
    let rv = observed_rv;
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut body = json!({
        "metadata": {
            "resourceVersion": rv,
            "labels": { l::KEY_STATE: state.as_str() },
            "annotations": ann,
        }
    });
    if drop_private {
        body["data"] = json!({ l::DATA_PRIVATE_KEY: null });
    }
    let s = secrets
        .patch(
            &key_secret_name(pk_name, seq),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&body),
        )
        .await?;
    Ok(s)
}

/// Writes the trust bundle by server-side apply. When it was read, the body carries its
/// resourceVersion (`observed_rv`), which the API server takes as a precondition: a bundle
/// changed since (a key published or removed by a new leader) answers 409, so a stale
/// decision never drops a trusted key id. A bundle that was missing is created (POST), so one
/// created meanwhile answers 409 too.
pub async fn write_bundle(
    cms: &Api<ConfigMap>,
    mut cm: ConfigMap,
    observed_rv: Option<&str>,
) -> Result<ConfigMap> {
    let name = cm.name_any();
    match observed_rv {
        Some(rv) => {
            cm.metadata.resource_version = Some(rv.to_string());
            Ok(cms
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cm),
                )
                .await?)
        }
        None => Ok(cms
            .create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &cm,
            )
            .await?),
    }
}

/// Writes the trust record: server-side apply of that one annotation, with the
/// ProvisioningKey's UID as a precondition (a key deleted and created again under the same name
/// answers 409 instead of getting the old key's record).
async fn write_record(
    ctx: &Context,
    pk: &ProvisioningKey,
    record: &TrustRecord,
) -> Result<TrustRecord> {
    let (ns, name) = object_key(pk)?;
    let pks: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": ProvisioningKey::api_version(&()),
        "kind": ProvisioningKey::kind(&()),
        "metadata": {
            "name": name,
            "uid": uid_of(pk),
            "annotations": { trust_record::ANNOTATION: record.render() },
        },
    });
    let written = pks
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(TrustRecord::of(&written)
        .and_then(|r| r.ok())
        .unwrap_or_else(|| record.clone()))
}

/// Writes the agent Secret for key `seq`: key id, public key, a fresh token, and the private key
/// only when the spec asks for it.
async fn hand_out(
    ctx: &Context,
    pk: &ProvisioningKey,
    settings: &Settings,
    obs: &Observed,
    (seq, observed_rv): (u32, Option<&str>),
    now: DateTime<Utc>,
    fresh: Option<KeyPair>,
) -> Result<Secret> {
    let (ns, name) = object_key(pk)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let key_name = key_secret_name(&name, seq);
    let pair = match fresh {
        // Minted by this reconcile: the key Secret POST returned it stored.
        Some(pair) => pair,
        // Otherwise read once, here, the only step that needs the private key.
        None => {
            let mut key_secret = secrets.get(&key_name).await?;
            let private = key_secret
                .data
                .as_ref()
                .and_then(|d| d.get(l::DATA_PRIVATE_KEY))
                .map(|b| Zeroizing::new(String::from_utf8_lossy(&b.0).into_owned()));
            // The decoded data map holds the private key: wipe it, not just drop it.
            wipe(&mut key_secret);
            drop(key_secret);
            let private = private.ok_or_else(|| Error::KeySecret {
                name: key_name.clone(),
                message: "has no private key".into(),
            })?;
            KeyPair::from_pkcs8_pem(&private)?
        }
    };
    let kid = pair.key_id();
    if find(obs, seq).is_none_or(|k| k.kid != kid) {
        return Err(Error::KeySecret {
            name: key_name,
            message: "private key does not match its key id".into(),
        });
    }
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey)?;
    let mut secret = desired::agent_secret(
        pk,
        owner,
        settings,
        obs,
        &pair,
        now,
        uuid::Uuid::new_v4().to_string(),
    )?;
    drop(pair);
    // A Secret that was missing is created (POST): should someone else's appear meanwhile,
    // the create fails instead of taking it over. An owned one is applied with the
    // resourceVersion it was read at: a stale replica never hands out over a newer hand-out.
    let res = match &obs.agent_secret {
        AgentSecretObs::Owned(_) => {
            secret.metadata.resource_version = observed_rv.map(str::to_string);
            secrets
                .patch(
                    &settings.secret_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
        }
        _ => {
            secrets
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &secret,
                )
                .await
        }
    };
    wipe(&mut secret);
    let owned = matches!(&obs.agent_secret, AgentSecretObs::Owned(_));
    match res {
        // 409 on the apply of an owned Secret is a stale resourceVersion: retried, re-read.
        Err(kube::Error::Api(e)) if e.code == 409 && !owned => Err(Error::NameTaken {
            kind: "Secret",
            name: settings.secret_name.clone(),
        }),
        other => Ok(other?),
    }
}

fn wipe(secret: &mut Secret) {
    if let Some(data) = secret.data.as_mut() {
        for v in data.values_mut() {
            v.0.zeroize();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// report: status (only when it changed) and condition-transition Events.

/// The status a reconcile reports; pure, and the same on every reconcile of a settled object.
pub fn desired_status(
    pk: &ProvisioningKey,
    obs: &Observed,
    plan: &Plan,
    now: DateTime<Utc>,
) -> ProvisioningKeyStatus {
    let previous = pk.status.clone().unwrap_or_default().conditions;
    let generation = pk.meta().generation;
    let now_t = Time(jiff_from(now));
    let cur = rotation::current(&obs.keys);
    let handed_out = matches!(&obs.agent_secret, AgentSecretObs::Owned(s) if cur.is_some_and(|c| s.kid.as_deref() == Some(c.kid.as_str())));
    let ready = match (&plan.blocked, cur) {
        (Some(why), _) => condition(
            &previous,
            conditions::READY,
            false,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        (None, Some(c)) if handed_out => condition(
            &previous,
            conditions::READY,
            true,
            rotation::reasons::KEY_ACTIVE,
            format!("key {} is current and handed out", c.kid),
            generation,
            now_t.clone(),
        ),
        _ => condition(
            &previous,
            conditions::READY,
            false,
            rotation::reasons::MINTING,
            "the first key is being minted and handed out",
            generation,
            now_t.clone(),
        ),
    };
    // Reconciling (kstatus): only while the spec has not been acted on yet, that is while a new
    // ProvisioningKey has no key handed out. A rotation (scheduled, requested by a new
    // `requestToken`, emergency) is reported by `Rotating`, never here.
    let reconciling = if plan.blocked.is_none() && !(cur.is_some() && handed_out) {
        condition(
            &previous,
            conditions::RECONCILING,
            true,
            rotation::reasons::MINTING,
            "the first key is being minted and handed out",
            generation,
            now_t.clone(),
        )
    } else {
        condition(
            &previous,
            conditions::RECONCILING,
            false,
            conditions::reasons::RECONCILED,
            format!(
                "generation {} has been acted on",
                generation.unwrap_or_default()
            ),
            generation,
            now_t.clone(),
        )
    };
    let rotating = match &plan.rotating {
        Some(why) => condition(
            &previous,
            conditions::ROTATING,
            true,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        None => condition(
            &previous,
            conditions::ROTATING,
            false,
            rotation::reasons::IDLE,
            "no rotation in flight",
            generation,
            now_t.clone(),
        ),
    };
    let stalled = match (&plan.blocked, &plan.stalled) {
        (Some(why), _) | (None, Some(why)) => condition(
            &previous,
            conditions::STALLED,
            true,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        (None, None) => condition(
            &previous,
            conditions::STALLED,
            false,
            rotation::reasons::IDLE,
            "not stalled",
            generation,
            now_t,
        ),
    };
    ProvisioningKeyStatus {
        phase: Some(plan.phase.as_str().to_string()),
        current_key: cur.map(|c| KeyInfo {
            kid: c.kid.clone(),
            fingerprint: c.fingerprint.clone(),
            created_at: Some(ts(c.created_at)),
            activated_at: c.activated_at.map(ts),
        }),
        trusted_keys: obs
            .keys
            .iter()
            .filter(|k| k.state.trusted())
            .map(|k| TrustedKey {
                kid: k.kid.clone(),
                state: k.state.display().to_string(),
                last_used_at: last_used(obs, &k.kid),
            })
            .chain(plan.unrecorded.iter().map(|kid| TrustedKey {
                kid: kid.clone(),
                state: UNRECORDED.to_string(),
                last_used_at: last_used(obs, kid),
            }))
            .collect(),
        uncovered_consumers: obs.uncovered.as_ref().filter(|u| !u.is_empty()).map(|u| {
            UncoveredConsumers {
                count: i32::try_from(u.len()).unwrap_or(i32::MAX),
                workloads: rotation::uncovered_workloads(u)
                    .into_iter()
                    .take(UNCOVERED_NAMED)
                    .collect(),
            }
        }),
        revoked_keys: obs
            .keys
            .iter()
            .rev()
            .filter(|k| k.state == KeyState::Revoked)
            .map(|k| RevokedKey {
                kid: k.kid.clone(),
                revoked_at: k.revoked_at.map(ts),
            })
            .collect(),
        next_rotation_at: plan.next_rotation_at.map(ts),
        token_refresh_at: plan.token_refresh_at.map(ts),
        observed_generation: generation,
        conditions: vec![ready, reconciling, rotating, stalled],
        history: obs
            .keys
            .iter()
            .rev()
            .take(HISTORY_LIMIT)
            .map(|k| HistoryEntry {
                kid: k.kid.clone(),
                trigger: k.trigger.as_str().to_string(),
                state: k.state.display().to_string(),
                minted_at: Some(ts(k.created_at)),
                published_at: k.published_at.map(ts),
                activated_at: k.activated_at.map(ts),
                retired_at: k.retired_at.map(ts),
                revoked_at: k.revoked_at.map(ts),
            })
            .collect(),
    }
}

fn jiff_from(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

async fn write_status(
    ctx: &Context,
    pk: &ProvisioningKey,
    status: &ProvisioningKeyStatus,
) -> Result<bool> {
    if pk.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(true)
}

fn cond<'a>(
    s: &'a ProvisioningKeyStatus,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

/// `pk` with its status as the API server has it now (spec and metadata unchanged: those the plan
/// was made from). The object a reconcile gets comes from the watch cache, which may not show
/// this operator's own last status write yet; comparing against that stale copy re-sent an
/// identical status (a wasted write on a settled object) and could reset `lastTransitionTime`.
async fn with_fresh_status(ctx: &Context, pk: &ProvisioningKey) -> Result<ProvisioningKey> {
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = api.get_status(&name).await?;
    let mut pk = pk.clone();
    pk.status = fresh.status;
    Ok(pk)
}

async fn report(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<()> {
    let obs = &read.observed;
    let pk = &with_fresh_status(ctx, pk).await?;
    let mut status = desired_status(pk, obs, plan, now);
    let previous = pk.status.clone().unwrap_or_default();
    // Uncovered consumers are only seen while a key is retiring; between rotations the last
    // count is kept rather than flapping.
    if obs.uncovered.is_none() {
        status.uncovered_consumers = previous.uncovered_consumers.clone();
    }
    let written = write_status(ctx, pk, &status).await?;
    let (ns, name) = object_key(pk)?;
    ctx.metrics
        .set_key(&ns, &name, &key_gauges(&status, obs, plan));
    if !written {
        return Ok(());
    }
    // Warnings on transitions only.
    let regarding = pk.object_ref(&());
    let was = cond(&previous, conditions::STALLED).map(|c| (c.status.clone(), c.reason.clone()));
    if let Some(c) = cond(&status, conditions::STALLED).filter(|c| c.status == "True")
        && was != Some((c.status.clone(), c.reason.clone()))
    {
        if plan.blocked.is_none()
            && let Some(k) = in_flight(obs)
        {
            ctx.metrics.rotation(k.trigger, RotationResult::Stalled);
        }
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: true,
                // RotationStalled, VerifierSilent, or why the spec cannot be served.
                reason: c.reason.as_str(),
                action: "Reconcile",
                note: c.message.clone(),
                related: None,
            },
        )
        .await;
    }
    let workloads = |s: &ProvisioningKeyStatus| {
        s.uncovered_consumers
            .as_ref()
            .map(|u| u.workloads.clone())
            .unwrap_or_default()
    };
    if let Some(u) = obs.uncovered.as_ref().filter(|u| !u.is_empty())
        && workloads(&previous) != workloads(&status)
    {
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: true,
                reason: rotation::reasons::UNCOVERED_CONSUMERS,
                action: "Confirm",
                note: format!(
                    "{} pod(s) use Secret {} but no PolicyAgent covers them: {}; the old key waits overlap{} instead of evidence",
                    u.len(),
                    read.settings.secret_name,
                    rotation::uncovered_workloads(u).join(", "),
                    if read.settings.include_private_key {
                        ""
                    } else {
                        " and its last token's expiry"
                    }
                ),
                related: None,
            },
        )
        .await;
    }
    let unrecorded = |s: &ProvisioningKeyStatus| -> Vec<String> {
        s.trusted_keys
            .iter()
            .filter(|k| k.state == UNRECORDED)
            .map(|k| k.kid.clone())
            .collect()
    };
    let now_unrecorded = unrecorded(&status);
    if !now_unrecorded.is_empty() && now_unrecorded != unrecorded(&previous) {
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: true,
                reason: rotation::reasons::UNRECORDED_KEYS,
                action: "Publish",
                note: format!(
                    "trust bundle {} keeps key(s) {} trusted although no key Secret records them (deleted or edited); list them in spec.compromisedKeys to revoke them",
                    read.settings.trust_bundle_name,
                    now_unrecorded.join(", ")
                ),
                related: None,
            },
        )
        .await;
    }
    Ok(())
}

/// Reports a failed reconcile in the `Ready` condition (reason and message of the error), so
/// the last error is visible in status and not only in the log. Everything else in status is
/// kept as it was.
async fn report_error(
    ctx: &Context,
    pk: &ProvisioningKey,
    error: &Error,
    now: DateTime<Utc>,
) -> Result<()> {
    let pk = &with_fresh_status(ctx, pk).await?;
    let previous = pk.status.clone().unwrap_or_default();
    let generation = pk.meta().generation;
    let mut status = previous.clone();
    let ready = condition(
        &previous.conditions,
        conditions::READY,
        false,
        error.reason(),
        error.public_message(),
        generation,
        Time(jiff_from(now)),
    );
    status.conditions.retain(|c| c.type_ != conditions::READY);
    status.conditions.insert(0, ready);
    if previous.observed_generation != generation {
        // A new generation that could not be acted on: Reconciling (kstatus) until a reconcile
        // succeeds; a name owned by someone else needs a human: Stalled.
        let reconciling = condition(
            &previous.conditions,
            conditions::RECONCILING,
            true,
            conditions::reasons::RECONCILE_FAILED,
            format!(
                "generation {} is not applied yet: {}",
                generation.unwrap_or_default(),
                error.public_message()
            ),
            generation,
            Time(jiff_from(now)),
        );
        status
            .conditions
            .retain(|c| c.type_ != conditions::RECONCILING);
        status.conditions.insert(1, reconciling);
    }
    if matches!(error, Error::NameTaken { .. }) {
        let stalled = condition(
            &previous.conditions,
            conditions::STALLED,
            true,
            error.reason(),
            error.public_message(),
            generation,
            Time(jiff_from(now)),
        );
        status.conditions.retain(|c| c.type_ != conditions::STALLED);
        status.conditions.push(stalled);
    }
    status.observed_generation = generation;
    let written = write_status(ctx, pk, &status).await?;
    let (ns, name) = object_key(pk)?;
    ctx.metrics.set_key_ready(&ns, &name, "False");
    if written {
        let was = cond(&previous, conditions::READY).map(|c| c.reason.clone());
        if was.as_deref() != Some(error.reason()) {
            audit::record(
                ctx,
                &pk.object_ref(&()),
                Audit {
                    warning: true,
                    reason: error.reason(),
                    action: "Reconcile",
                    note: error.public_message(),
                    related: None,
                },
            )
            .await;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// metrics: what an applied step adds to the counters, and the per-key gauges a report sets
// (pure; labels are the trigger, result and kind only, never a key id).

/// One counter increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counted {
    Rotation(Trigger, RotationResult),
    Revocation { emergency: bool },
    BundleTampered,
}

impl Counted {
    fn record(self, metrics: &Metrics) {
        match self {
            Counted::Rotation(trigger, result) => metrics.rotation(trigger, result),
            Counted::Revocation { emergency } => metrics.revocation(emergency),
            Counted::BundleTampered => metrics.bundle_tampered(),
        }
    }
}

/// The counters an applied step adds: a mint that created a key starts a rotation of its
/// trigger; a revocation counts by kind, and completes the rotation of the current key when
/// it leaves no superseded key (nor, in an emergency, a compromised key) to revoke.
fn step_counts(read: &Read, step: &Step, minted: bool) -> Vec<Counted> {
    let obs = &read.observed;
    match step {
        Step::Mint { trigger, .. } if minted => {
            vec![Counted::Rotation(*trigger, RotationResult::Started)]
        }
        Step::Revoke { seq, emergency } => {
            let mut counts = vec![Counted::Revocation {
                emergency: *emergency,
            }];
            let left = obs.keys.iter().any(|k| {
                k.seq != *seq
                    && (k.state == KeyState::Retiring
                        || (k.state != KeyState::Revoked
                            && read.settings.compromised.contains(&k.kid)))
            });
            if !left && let Some(cur) = rotation::current(&obs.keys).filter(|c| c.seq != *seq) {
                counts.push(Counted::Rotation(cur.trigger, RotationResult::Completed));
            }
            counts
        }
        Step::WriteBundle { .. }
            if !rotation::bundle_target(&read.settings, obs)
                .injected
                .is_empty() =>
        {
            vec![Counted::BundleTampered]
        }
        _ => Vec::new(),
    }
}

/// The newest key not revoked: the one a rotation in flight is about.
fn in_flight(obs: &Observed) -> Option<&ObservedKey> {
    obs.keys.iter().rev().find(|k| k.state != KeyState::Revoked)
}

/// The per-key gauges, from the status a report computed and what it observed.
fn key_gauges(status: &ProvisioningKeyStatus, obs: &Observed, plan: &Plan) -> KeyGauges {
    let holds = |t: &str| cond(status, t).map(|c| c.status.as_str());
    let cur = rotation::current(&obs.keys);
    KeyGauges {
        token_expiration: match &obs.agent_secret {
            AgentSecretObs::Owned(s) => s.token_exp,
            _ => None,
        },
        next_rotation: plan.next_rotation_at.map(|t| t.timestamp()),
        ready: match holds(conditions::READY) {
            Some("True") => "True",
            Some("False") => "False",
            _ => "Unknown",
        },
        stalled: holds(conditions::STALLED) == Some("True"),
        verifier_silent: plan
            .stalled
            .as_ref()
            .is_some_and(|w| w.reason == rotation::reasons::VERIFIER_SILENT),
        agents_total: obs.consumers.len(),
        agents_confirmed: obs
            .consumers
            .iter()
            .filter(|c| cur.is_some_and(|k| c.confirmed_kid.as_deref() == Some(k.kid.as_str())))
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::{BundleObs, Uncovered};

    fn read(uncovered: Vec<Uncovered>, consumers: Vec<rotation::Consumer>) -> Read {
        let t = |s: i64| DateTime::from_timestamp(s, 0).expect("valid");
        let key = |seq: u32, state: KeyState| ObservedKey {
            seq,
            kid: format!("kid{seq}"),
            fingerprint: format!("SHA256:fp{seq}"),
            state,
            trigger: Trigger::Interval,
            consumed_request_token: None,
            consumed_annotation: None,
            created_at: t(1_000),
            published_at: Some(t(1_000)),
            activated_at: Some(t(1_000)),
            retired_at: None,
            revoked_at: None,
            has_private_key: true,
            last_token_exp: None,
            edited: None,
        };
        let pk = ProvisioningKey::new("demo", Default::default());
        Read {
            settings: rotation::resolve_or_keep(
                &pk,
                &rotation::Floors::none(),
                &Default::default(),
            ),
            observed: Observed {
                keys: vec![key(1, KeyState::Retiring), key(2, KeyState::Active)],
                rotate_annotation: None,
                bundle: BundleObs::Missing,
                agent_secret: AgentSecretObs::Missing,
                consumers,
                uncovered: Some(uncovered),
                usage: None,
                record: None,
            },
            secrets: KeySecrets::default(),
            bundle_jwks: BTreeMap::new(),
            bundle_rv: None,
            agent_secret_rv: None,
        }
    }

    fn notes(step: &Step, read: &Read, minted: Option<&Minted>) -> Vec<(String, String)> {
        let pk = ProvisioningKey::new("demo", Default::default());
        step_audits(&pk, read, step, minted)
            .into_iter()
            .map(|a| (a.reason.to_string(), a.note))
            .collect()
    }

    /// The counters of applied steps: a mint that created a key starts a rotation of its
    /// trigger (not one that found its Secret there); a revocation counts by kind and completes
    /// the rotation of the current key only when no superseded or compromised key is left.
    #[test]
    fn steps_count_rotations_and_revocations() {
        use RotationResult::*;
        let r = read(Vec::new(), Vec::new());
        let mint = Step::Mint {
            seq: 3,
            trigger: Trigger::RequestToken,
            consumed_request_token: None,
            consumed_annotation: None,
            active: false,
        };
        assert_eq!(
            step_counts(&r, &mint, true),
            [Counted::Rotation(Trigger::RequestToken, Started)]
        );
        assert!(step_counts(&r, &mint, false).is_empty());
        let revoke = |seq, emergency| Step::Revoke { seq, emergency };
        // kid1 retiring, kid2 (trigger Interval) current: revoking kid1 completes the rotation.
        assert_eq!(
            step_counts(&r, &revoke(1, false), false),
            [
                Counted::Revocation { emergency: false },
                Counted::Rotation(Trigger::Interval, Completed)
            ]
        );
        // Another superseded key still retiring: not complete yet.
        let mut two = read(Vec::new(), Vec::new());
        two.observed.keys[1].state = KeyState::Retiring;
        let mut k3 = two.observed.keys[1].clone();
        (k3.seq, k3.kid, k3.state, k3.trigger) =
            (3, "kid3".into(), KeyState::Active, Trigger::Compromised);
        two.observed.keys.push(k3);
        two.settings.compromised.insert("kid2".into());
        assert_eq!(
            step_counts(&two, &revoke(1, true), false),
            [Counted::Revocation { emergency: true }]
        );
        // The last compromised key revoked completes the emergency rotation.
        two.observed.keys[0].state = KeyState::Revoked;
        assert_eq!(
            step_counts(&two, &revoke(2, true), false),
            [
                Counted::Revocation { emergency: true },
                Counted::Rotation(Trigger::Compromised, Completed)
            ]
        );
        for quiet in [
            Step::MarkPublished { seq: 2 },
            Step::Activate {
                seq: 2,
                emergency: false,
            },
            Step::Retire { seq: 1 },
            Step::Prune { seq: 1 },
        ] {
            assert!(step_counts(&r, &quiet, true).is_empty(), "{quiet:?}");
        }
    }

    /// The per-key gauges come from the reported status and the observation: the token's
    /// expiry, the next rotation, Ready, Stalled and the agents confirmed on the current key.
    #[test]
    fn key_gauges_follow_the_report() {
        let consumer = |name: &str, kid: Option<&str>| rotation::Consumer {
            name: name.into(),
            confirmed_kid: kid.map(Into::into),
            rolled_at: None,
            waiting_reason: None,
        };
        let mut r = read(
            Vec::new(),
            vec![
                consumer("a", Some("kid2")),
                consumer("b", Some("kid1")),
                consumer("c", None),
            ],
        );
        r.observed.agent_secret = AgentSecretObs::Owned(rotation::AgentSecret {
            kid: Some("kid2".into()),
            token_exp: Some(5_000),
            ..Default::default()
        });
        let pk = ProvisioningKey::new("demo", Default::default());
        let now = DateTime::from_timestamp(2_000, 0).expect("valid");
        let mut plan = rotation::plan(&r.settings, &r.observed, now);
        plan.next_rotation_at = DateTime::from_timestamp(9_000, 0);
        let status = desired_status(&pk, &r.observed, &plan, now);
        let g = key_gauges(&status, &r.observed, &plan);
        assert_eq!(g.token_expiration, Some(5_000));
        assert_eq!(g.next_rotation, Some(9_000));
        assert_eq!((g.agents_total, g.agents_confirmed), (3, 1));
        assert_eq!(
            g.ready,
            cond(&status, conditions::READY).map_or("", |c| c.status.as_str())
        );
        r.observed.agent_secret = AgentSecretObs::Missing;
        plan.next_rotation_at = None;
        let g = key_gauges(&status, &r.observed, &plan);
        assert_eq!((g.token_expiration, g.next_rotation), (None, None));
        assert_eq!(
            key_gauges(&ProvisioningKeyStatus::default(), &r.observed, &plan).ready,
            "Unknown"
        );
    }

    /// Each applied step describes its own audit; a mint that found its Secret already there
    /// (a crash between the write and the Event) records nothing new; notes name ids only.
    #[test]
    fn steps_describe_their_audit() {
        let r = read(Vec::new(), Vec::new());
        let mint = Step::Mint {
            seq: 3,
            trigger: Trigger::Compromised,
            consumed_request_token: None,
            consumed_annotation: None,
            active: false,
        };
        let minted = Minted {
            pair: None,
            kid: "kid3".into(),
            fingerprint: "SHA256:fp3".into(),
        };
        let n = notes(&mint, &r, Some(&minted));
        assert_eq!(
            n.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
            vec!["KeyMinted", "EmergencyRevocation"]
        );
        assert!(n[0].1.contains("kid3") && n[0].1.contains("seq 3"));
        assert!(notes(&mint, &r, None).is_empty());
        for quiet in [
            Step::MarkPublished { seq: 2 },
            Step::Prune { seq: 1 },
            Step::WriteBundle {
                trusted: vec![],
                revoked: vec![],
            },
        ] {
            assert!(notes(&quiet, &r, None).is_empty(), "{quiet:?}");
        }
        let refresh = Step::HandOut {
            seq: 2,
            reason: HandOutReason::TokenRefresh,
        };
        assert_eq!(notes(&refresh, &r, None)[0].0, "TokenRefreshed");
        let revoke = Step::Revoke {
            seq: 1,
            emergency: false,
        };
        let n = notes(&revoke, &r, None);
        assert_eq!(n[0].0, "KeyRevoked");
        assert!(
            n[0].1.contains("no PolicyAgent references this key"),
            "{n:?}"
        );
        let uncovered = read(
            vec![Uncovered {
                pod: "other-1".into(),
                workload: "Deployment/other".into(),
            }],
            vec![rotation::Consumer {
                name: "opa".into(),
                confirmed_kid: Some("kid2".into()),
                rolled_at: None,
                waiting_reason: None,
            }],
        );
        let n = notes(&revoke, &uncovered, None);
        assert!(
            n[0].1
                .contains("every PolicyAgent (opa) is confirmed on kid2")
                && n[0].1.contains("Deployment/other")
                && n[0].1.contains("last token expired"),
            "{n:?}"
        );
        for (_, note) in n {
            assert!(!note.contains("PRIVATE KEY"));
        }
    }

    /// A first key created active: one KeyMinted naming its id, fingerprint, bundle and agent
    /// Secret (its hand-out records KeyHandedOut, as any hand-out).
    #[test]
    fn first_key_created_active_is_minted_once() {
        let r = read(Vec::new(), Vec::new());
        let mint = Step::Mint {
            seq: 1,
            trigger: Trigger::Initial,
            consumed_request_token: None,
            consumed_annotation: None,
            active: true,
        };
        let minted = Minted {
            pair: None,
            kid: "kid1".into(),
            fingerprint: "SHA256:fp1".into(),
        };
        let n = notes(&mint, &r, Some(&minted));
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].0, "KeyMinted");
        for part in [
            "kid1",
            "SHA256:fp1",
            "demo-trust",
            "Secret demo",
            "created active",
        ] {
            assert!(n[0].1.contains(part), "{part}: {n:?}");
        }
        assert!(notes(&mint, &r, None).is_empty());
    }

    /// kstatus: `Reconciling` only while a new key has nothing handed out; a rotation in flight
    /// is `Rotating`, not `Reconciling`; a blocked spec is `Stalled`; every condition carries the
    /// generation; a second reconcile of the same state writes the same status.
    #[test]
    fn kstatus_conditions() {
        let now = DateTime::from_timestamp(2_000, 0).expect("valid");
        let mut pk = ProvisioningKey::new("demo", Default::default());
        pk.metadata.generation = Some(3);
        let status = |pk: &ProvisioningKey, obs: &Observed, plan: &Plan| {
            let s = desired_status(pk, obs, plan, now);
            let c = |t: &str| {
                let c = cond(&s, t).unwrap_or_else(|| panic!("no {t}"));
                assert_eq!(c.observed_generation, Some(3), "{t}");
                (c.status.clone(), c.reason.clone())
            };
            assert_eq!(s.observed_generation, Some(3));
            (c("Ready"), c("Reconciling"), c("Rotating"), c("Stalled"))
        };
        let t = |s: &str, r: &str| (s.to_string(), r.to_string());
        let plan = Plan::new;
        let why = |reason: &'static str| rotation::Why {
            reason,
            message: "m".into(),
        };

        // A new key: nothing handed out yet.
        let mut obs = read(Vec::new(), Vec::new()).observed;
        let (ready, reconciling, _, stalled) = status(&pk, &obs, &plan(rotation::Phase::Pending));
        assert_eq!(ready.0, "False");
        assert_eq!(reconciling, t("True", "Minting"));
        assert_eq!(stalled.0, "False");

        // Handed out: Ready, not Reconciling; a rotation in flight changes neither.
        obs.agent_secret = AgentSecretObs::Owned(rotation::AgentSecret {
            kid: Some("kid2".into()),
            ..Default::default()
        });
        let settled = status(&pk, &obs, &plan(rotation::Phase::Ready));
        assert_eq!(settled.0, t("True", "KeyActive"));
        assert_eq!(settled.1, t("False", "Reconciled"));
        let mut rotating = plan(rotation::Phase::Publishing);
        rotating.rotating = Some(why(rotation::reasons::PUBLISHING));
        let (ready, reconciling, rot, stalled) = status(&pk, &obs, &rotating);
        assert_eq!((ready, reconciling), (settled.0.clone(), settled.1.clone()));
        assert_eq!(rot, t("True", "Publishing"));
        assert_eq!(stalled.0, "False");

        // A rotation past its confirmation timeout: Stalled, the key still Ready.
        let mut late = plan(rotation::Phase::Stalled);
        late.stalled = Some(why(rotation::reasons::ROTATION_STALLED));
        let (ready, reconciling, _, stalled) = status(&pk, &obs, &late);
        assert_eq!(ready.0, "True");
        assert_eq!(reconciling.0, "False");
        assert_eq!(stalled, t("True", "RotationStalled"));

        // A name owned by someone else: not Ready, Stalled, not Reconciling.
        let mut blocked = plan(rotation::Phase::Invalid);
        blocked.blocked = Some(why(rotation::reasons::SECRET_NAME_TAKEN));
        let (ready, reconciling, _, stalled) = status(&pk, &obs, &blocked);
        assert_eq!(ready, t("False", "SecretNameTaken"));
        assert_eq!(reconciling.0, "False");
        assert_eq!(stalled, t("True", "SecretNameTaken"));

        // Settled twice: the same status (no write).
        pk.status = Some(desired_status(
            &pk,
            &obs,
            &plan(rotation::Phase::Ready),
            now,
        ));
        let later = now + chrono::Duration::seconds(60);
        assert_eq!(
            pk.status,
            Some(desired_status(
                &pk,
                &obs,
                &plan(rotation::Phase::Ready),
                later
            ))
        );
    }
}
