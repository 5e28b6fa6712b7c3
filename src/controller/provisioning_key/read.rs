//! The read phase: what to read is decided from the watch caches; what is decided on is read by
//! GET (by deterministic name) at the start of the reconcile into one snapshot
//! ([`Raw`](crate::rotation::snapshot::Raw)), then kept current with the responses of this
//! reconcile's own writes. Its mapping into the planner's input is pure
//! (`rotation::snapshot::map`).
//!
//! The hot path (every reconcile, every step) sends only GETs by name: no request on it costs
//! more because of unrelated objects in the namespace. The only namespace-wide LISTs are the
//! watches' initial LISTs (cold path, once per process and scope) and the consumer scan (at most
//! once per rotation per process, see `scan_consumers`), plus a label-selected ControllerRevision
//! LIST while a key that a DaemonSet consumes is retiring.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Resource, ResourceExt};
use tracing::info;

use super::super::{Context, Result, workloads};
use super::{object_key, uid_of};
use crate::api::PolicyAgent;
use crate::api::policy_agent::WorkloadKind;
use crate::api::provisioning_key::ProvisioningKey;
use crate::labels as l;
use crate::rotation::desired::key_secret_name;
use crate::rotation::observe;
use crate::rotation::snapshot::{self, ConsumerReads, Raw, Read};
use crate::rotation::{self, AgentSecretObs, KeyState, Uncovered};
use crate::workload::Lineage;

/// Reads the consumers of a retiring key into `raw`, once per reconcile, when the decision
/// needs them (see [`read_consumers`]).
pub(super) async fn consumers_when_needed(
    ctx: &Context,
    pk: &ProvisioningKey,
    raw: &mut Raw,
    now: DateTime<Utc>,
) -> Result<()> {
    if raw.consumers.is_none()
        && observe::needs_consumers(&observe::key_secrets(pk, &raw.key_secret_list()))
    {
        raw.consumers = Some(read_consumers(ctx, pk, raw, now).await?);
    }
    Ok(())
}

/// The pure mapping of what was read (`rotation::snapshot::map`), with a Warning in the log for
/// each key Secret whose evidence was repaired or ignored.
pub(super) fn map(ctx: &Context, pk: &ProvisioningKey, raw: &Raw) -> Read {
    let read = snapshot::map(pk, raw, &ctx.config.floors);
    for t in &read.secrets.tampered {
        tracing::warn!(pk = %pk.name_any(), secret = %t, "key Secret evidence repaired or ignored");
    }
    read
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
pub(super) async fn snapshot(ctx: &Context, pk: &ProvisioningKey) -> Result<Raw> {
    ctx.caches.ready().await;
    let (ns, name) = object_key(pk)?;
    let uid = uid_of(pk);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let mut raw = Raw::default();
    let seqs = ctx.caches.key_seqs(&ns, &name, &uid);
    // A ProvisioningKey never reconciled: no key Secret (cached or minted here), no trust
    // record (the cached copy carries no status but the record). When this reconcile mints its first key, its
    // first status is written without reading it again (see `report::status_and_events`), and
    // its bundle and agent Secret are not read either (both would answer 404): they are created
    // by POST, and a name someone else took answers 409, which is reported (`NameTaken`, then
    // `TrustBundleNameTaken` or `SecretNameTaken` from the next reconcile's reads) and never
    // overwritten (`invalid_input_is_reported_and_nothing_is_overwritten`). The key minted
    // before it stays, unpublished or not handed out, until the name is free.
    raw.never_reconciled = seqs.is_empty() && crate::trust_record::TrustRecord::of(pk).is_none();
    // The key Secrets all at once (a rotation holds two or three).
    let got = futures::future::try_join_all(seqs.iter().map(|&seq| {
        let secrets = secrets.clone();
        let secret = key_secret_name(&name, seq);
        async move { secrets.get_opt(&secret).await }
    }))
    .await?;
    for (seq, s) in seqs.into_iter().zip(got) {
        match s {
            Some(s) => raw.insert_key_secret(seq, s),
            None => ctx.caches.gone(&uid, seq),
        }
    }
    let parsed = observe::key_secrets(pk, &raw.key_secret_list());
    let names = observe::names(pk, &parsed);
    let decisive = observe::needs_consumers(&parsed)
        && pk
            .spec
            .rotation
            .as_ref()
            .is_some_and(|r| r.revoke_when_unused_for.is_some());
    // The bundle, the agent Secret and the usage reports go out together: one round trip (the
    // first two not at all for a key never reconciled, see above).
    let skip = raw.never_reconciled;
    let get_cm = async {
        match skip {
            true => Ok(None),
            false => cms.get_opt(&names.trust_bundle_name).await,
        }
    };
    let get_secret = async {
        match skip {
            true => Ok(None),
            false => secrets.get_opt(&names.secret_name).await,
        }
    };
    let (bundle, agent_secret, usage) =
        tokio::join!(get_cm, get_secret, read_usage(ctx, &ns, &name, decisive));
    raw.bundle = bundle?;
    raw.agent_secret = agent_secret?;
    raw.usage = usage?;
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
        // One GET per replica's report, all at once: a reconcile waits one round trip, not one
        // per replica (at 10,000 keys the serial reads left the operator behind the reports).
        futures::future::try_join_all(names.iter().map(|n| api.get_opt(n)))
            .await?
            .into_iter()
            .flatten()
            .collect()
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
        Err(why) => (
            Err(crate::usage::NoCoverage { why, behind: false }),
            Vec::new(),
        ),
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
        Some(s) => raw.insert_key_secret(seq, s),
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

    pub(super) fn forget(&self, uid: &str, seq: u32) {
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
            WorkloadKind::StatefulSet | WorkloadKind::ServiceAccount => {}
        }
        out.workloads.push(w);
    }
    let (uncovered, settling) = scan_consumers(ctx, pk, raw, &out, now).await?;
    out.uncovered = uncovered;
    out.settling = settling;
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
///
/// A scan that sees terminating pods using the Secret is not remembered, and says so
/// (`settling`): those pods are about to go, but their workload (already scaled down or
/// rolled) may not change again to wake a new scan, so the old key would wait for the time
/// fallback on pods that no longer exist.
async fn scan_consumers(
    ctx: &Context,
    pk: &ProvisioningKey,
    raw: &Raw,
    reads: &ConsumerReads,
    now: DateTime<Utc>,
) -> Result<(Option<Vec<Uncovered>>, bool)> {
    let (ns, name) = object_key(pk)?;
    let uid = uid_of(pk);
    let parsed = observe::key_secrets(pk, &raw.key_secret_list());
    let Some(old) = parsed.keys.iter().find(|k| k.state == KeyState::Retiring) else {
        return Ok((None, false));
    };
    if let Some(scan) = ctx.scans.get(&uid, old.seq) {
        // Pods are not watched. Their workloads are read by name instead (cheap): only when one
        // of them changed (scaled down, rolled, deleted) is the namespace scanned again.
        if !owners_changed(ctx, &ns, &scan.owners).await? {
            return Ok((Some(scan.uncovered), false));
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
        return Ok((None, false));
    };
    if now < handed_out + chrono::Duration::from_std(SCAN_DELAY).unwrap_or_default() {
        return Ok((None, false));
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
    // Only while uncovered consumers hold the key back does their going away matter.
    let settling =
        !found.is_empty() && pods.iter().any(|p| p.metadata.deletion_timestamp.is_some());
    info!(pk = %name, seq = old.seq, uncovered = found.len(), settling, "consumer scan");
    if !settling {
        ctx.scans.put(
            &uid,
            old.seq,
            Scan {
                uncovered: found.clone(),
                owners,
            },
        );
    }
    Ok((Some(found), settling))
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
