//! PolicyAgent reconcile, in steps: observe (fresh reads of the key, its agent Secret, the
//! workload, its lineage and pods; connectivity checks) -> [`agent::observe::observe`] (raw
//! objects to input, pure) -> [`agent::decide`] (pure) -> apply (the roll) ->
//! [`agent::outcome::outcome`] (pure) -> report (status and Events, only on change).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use super::audit::{self, Audit, reason};
use super::{Context, Error, FIELD_MANAGER, Result, ts_start};
pub use crate::agent::check::{
    Check, DEFAULT_PATH, DEFAULT_PERIOD, DEFAULT_SUCCESS_THRESHOLD, DEFAULT_TIMEOUT, resolve_check,
};
use crate::agent::observe::{self, AgentObjects, Refusal};
use crate::agent::outcome::{self, Outcome};
use crate::agent::{self, AgentInput, Decision, RollSlot, Rollout};
use crate::api::ProvisioningKey;
use crate::api::conditions;
use crate::api::policy_agent::{
    CheckMode, CheckVia, PolicyAgent, PolicyAgentStatus, Scheme, WorkloadKind,
};
use crate::controller::workloads;
use crate::fault;
use crate::labels as l;
use crate::workload::{Lineage, Workload};

/// Probe records and roll slots older than this are dropped.
const STALE_AFTER: Duration = Duration::from_secs(600);

/// In-memory evidence of the connectivity checks, per pod UID (a restarted pod has a new UID, so
/// counting starts again "since it started"). Lost on restart: checks simply run again.
#[derive(Default)]
pub struct AgentState {
    probes: std::sync::Mutex<HashMap<String, Probe>>,
    /// Workloads rolled and not yet complete (the operator-wide cap on concurrent rolls).
    /// Workloads rolling now: when the roll started, and their ProvisioningKey (`<ns>/<name>`).
    rolling: std::sync::Mutex<BTreeMap<String, (Instant, String)>>,
}

#[derive(Clone, Debug)]
struct Probe {
    kid: String,
    successes: u32,
    last: Instant,
}

impl AgentState {
    fn successes(&self, uid: &str, kid: &str) -> u32 {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes
            .get(uid)
            .filter(|p| p.kid == kid)
            .map_or(0, |p| p.successes)
    }

    /// Starts the count of a pod this process has no record of at `successes`.
    fn carry(&self, uid: &str, kid: &str, successes: u32) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.entry(uid.to_string()).or_insert(Probe {
            kid: kid.to_string(),
            successes,
            // Due at once: the carried count still needs a check of its own.
            last: Instant::now()
                .checked_sub(STALE_AFTER / 2)
                .unwrap_or_else(Instant::now),
        });
    }

    fn due(&self, uid: &str, period: Duration) -> bool {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.get(uid).is_none_or(|p| p.last.elapsed() >= period)
    }

    fn record(&self, uid: &str, kid: &str, ok: bool) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let p = probes.entry(uid.to_string()).or_insert(Probe {
            kid: kid.to_string(),
            successes: 0,
            last: Instant::now(),
        });
        if p.kid != kid {
            p.kid = kid.to_string();
            p.successes = 0;
        }
        p.successes = if ok { p.successes.saturating_add(1) } else { 0 };
        p.last = Instant::now();
    }

    /// Drops the records of pods not checked for a while (deleted pods are never checked again;
    /// live pods are checked at least at every reconcile).
    fn forget_stale(&self) {
        let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.retain(|_, p| p.last.elapsed() < STALE_AFTER);
    }

    /// Whether workload `key`, of ProvisioningKey `pk` (`<ns>/<name>`), may roll now: under
    /// the operator-wide `cap` and the key's `budget` (`rotation.maxConcurrentRolls`).
    fn slot(&self, key: &str, cap: usize, pk: &str, budget: Option<u32>) -> RollSlot {
        self.slot_taking(key, cap, pk, budget, false)
    }

    /// [`slot`](Self::slot); with `take`, a free slot is taken under the same lock.
    fn slot_taking(
        &self,
        key: &str,
        cap: usize,
        pk: &str,
        budget: Option<u32>,
        take: bool,
    ) -> RollSlot {
        let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        // A roll whose workload or PolicyAgent went away (or that never completes, e.g. a paused
        // Deployment) gives its slot back after a while, so the cap cannot be exhausted by leaks.
        rolling.retain(|_, (since, _)| since.elapsed() < STALE_AFTER);
        if rolling.contains_key(key) {
            return RollSlot::Free;
        }
        if rolling.len() >= cap {
            return RollSlot::OperatorCap;
        }
        match budget {
            Some(b) if rolling.values().filter(|(_, k)| k == pk).count() >= b as usize => {
                RollSlot::KeyBudget(b)
            }
            _ => {
                if take {
                    rolling.insert(key.to_string(), (Instant::now(), pk.to_string()));
                }
                RollSlot::Free
            }
        }
    }

    /// [`slot`](Self::slot), and when it is free, takes it at once under the same lock: the
    /// reconciles of a key's PolicyAgents run concurrently, and each must see the others' rolls
    /// before its own write, not after.
    fn reserve(&self, key: &str, cap: usize, pk: &str, budget: Option<u32>) -> RollSlot {
        self.slot_taking(key, cap, pk, budget, true)
    }

    fn set_rolling(&self, key: &str, on: bool, pk: &str) {
        let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            rolling
                .entry(key.to_string())
                .or_insert_with(|| (Instant::now(), pk.to_string()));
        } else {
            rolling.remove(key);
        }
    }

    /// How many workloads roll now (the benchmark's and the tests' view of the caps).
    pub fn rolling_now(&self) -> usize {
        let rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        rolling.len()
    }
}

/// The API server's pods-proxy path for a check (`via: ApiServerProxy`).
pub fn proxy_path(namespace: &str, pod: &str, scheme: Scheme, port: i32, path: &str) -> String {
    let prefix = match scheme {
        Scheme::Http => "",
        Scheme::Https => "https:",
    };
    format!("/api/v1/namespaces/{namespace}/pods/{prefix}{pod}:{port}/proxy{path}")
}

/// The direct URL for a check (`via: PodIp`).
pub fn pod_url(ip: &str, scheme: Scheme, port: i32, path: &str) -> String {
    let s = match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    format!("{s}://{host}:{port}{path}")
}

async fn probe(ctx: &Context, ns: &str, pod: &Pod, check: &Check) -> bool {
    match check.via {
        CheckVia::PodIp => {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                return false;
            };
            let url = pod_url(&ip, check.scheme, check.port, &check.path);
            match ctx.http.get(&url).timeout(check.timeout).send().await {
                Ok(r) => r.status().is_success(),
                Err(e) => {
                    debug!(pod = %pod.name_any(), error = %e, "connectivity check failed");
                    false
                }
            }
        }
        CheckVia::ApiServerProxy => {
            let path = proxy_path(ns, &pod.name_any(), check.scheme, check.port, &check.path);
            let Ok(req) = http::Request::get(path).body(Vec::new()) else {
                return false;
            };
            tokio::time::timeout(check.timeout, ctx.client.request_text(req))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    }
}

/// Rolls the workload: writes the key id into the pod template (pods restart and read the new
/// Secret) and records when, on the workload's own metadata. Only Keyward's keys are touched.
/// The patch carries the workload's resourceVersion as read (`observed_rv`): a workload changed
/// since (rolled by a new leader while this replica was paused) answers 409, never a second
/// roll on a stale decision. Under leader election, nothing is written unless this replica
/// holds the Lease.
async fn roll(
    ctx: &Context,
    ns: &str,
    pa: &PolicyAgent,
    kid: &str,
    observed_rv: Option<String>,
    now: DateTime<Utc>,
) -> Result<()> {
    ctx.ensure_leading()?;
    let name = &pa.spec.workload_ref.name;
    let Some(observed_rv) = observed_rv else {
        return Err(Error::MissingObjectKey);
    };
    let body = json!({
        "metadata": {
            "resourceVersion": observed_rv,
            "annotations": { l::ROLLED_AT: ts_start(now), l::POLICY_AGENT: pa.name_any() },
        },
        "spec": { "template": { "metadata": { "annotations": { l::KEY_ID: kid } } } }
    });
    let resource = match pa.spec.workload_ref.kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
        // An agent outside the cluster has nothing to roll (never decided: its "template" is
        // always the Secret's key).
        WorkloadKind::ServiceAccount => return Ok(()),
    };
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    Api::<DynamicObject>::namespaced_with(ctx.client.clone(), ns, &resource)
        .patch(name, &pp, &Patch::Merge(&body))
        .await?;
    Ok(())
}

fn workload_key(ns: &str, pa: &PolicyAgent) -> String {
    format!(
        "{ns}/{}/{}",
        pa.spec.workload_ref.kind, pa.spec.workload_ref.name
    )
}

/// What the observe step read, fresh from the API server. Reads stop at the first missing
/// reference or at a lost claim: the decision needs nothing more then.
#[derive(Default)]
struct Reads {
    agents: Vec<PolicyAgent>,
    pk: Option<ProvisioningKey>,
    agent_secret: Option<Secret>,
    workload: Option<Workload>,
    service_account: Option<k8s_openapi::api::core::v1::ServiceAccount>,
    replica_sets: Vec<ReplicaSet>,
    revisions: Vec<ControllerRevision>,
    pods: Vec<Pod>,
}

impl Reads {
    fn objects<'a>(&'a self, pa: &'a PolicyAgent, roll_slot: RollSlot) -> AgentObjects<'a> {
        AgentObjects {
            pa,
            agents: &self.agents,
            pk: self.pk.as_ref(),
            agent_secret: self.agent_secret.as_ref(),
            workload: self.workload.as_ref(),
            service_account: self.service_account.as_ref(),
            lineage: Lineage {
                replica_sets: &self.replica_sets,
                revisions: &self.revisions,
            },
            pods: &self.pods,
            roll_slot,
        }
    }

    /// The key id the agent Secret carries, if it is the ProvisioningKey's.
    fn secret_kid(&self) -> Option<String> {
        observe::secret_kid(self.pk.as_ref()?, self.agent_secret.as_ref()?)
    }
}

/// Reads everything the decision needs: the PolicyAgents of the namespace from the watch cache
/// (claims: who manages a workload is the oldest PolicyAgent naming it, and an older one is in
/// the cache before a newer one is created, up to watch latency; the ProvisioningKey side never
/// relies on claims for a revocation), then by GET the ProvisioningKey and its agent Secret (the
/// key id is read from the Secret itself, never from ProvisioningKey status) and the workload,
/// then its lineage and its pods by label-selected LISTs (see [`workloads`] for why this order
/// is safe).
async fn read(ctx: &Context, ns: &str, pa: &PolicyAgent) -> Result<Reads> {
    ctx.caches.ready().await;
    let mut reads = Reads {
        agents: ctx
            .caches
            .agents(ns)
            .into_iter()
            .map(|a| (*a).clone())
            .collect(),
        ..Reads::default()
    };
    // The PolicyAgent being reconciled as read fresh, whatever the cache holds.
    reads.agents.retain(|a| a.name_any() != pa.name_any());
    reads.agents.push(pa.clone());
    if observe::claimant(pa, &reads.agents).is_some() {
        return Ok(reads);
    }
    reads.pk = Api::<ProvisioningKey>::namespaced(ctx.client.clone(), ns)
        .get_opt(&pa.spec.provisioning_key_ref.name)
        .await?;
    let Some(pk) = reads.pk.as_ref() else {
        return Ok(reads);
    };
    reads.agent_secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&pk.secret_name())
        .await?;
    let wl = &pa.spec.workload_ref;
    if wl.kind == WorkloadKind::ServiceAccount {
        // An agent outside the cluster: its ServiceAccount, nothing to list.
        reads.service_account =
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(ctx.client.clone(), ns)
                .get_opt(&wl.name)
                .await?;
        return Ok(reads);
    }
    reads.workload = workloads::fetch(&ctx.client, ns, wl.kind, &wl.name).await?;
    let Some(w) = reads.workload.as_ref() else {
        return Ok(reads);
    };
    let (replica_sets, revisions) = workloads::lineage(&ctx.client, ns, w).await?;
    let lineage = Lineage {
        replica_sets: &replica_sets,
        revisions: &revisions,
    };
    reads.pods = workloads::pods(&ctx.client, ns, w, lineage).await?;
    reads.replica_sets = replica_sets;
    reads.revisions = revisions;
    Ok(reads)
}

/// Checks the pods that are due (at most once per period each) and refreshes the input's
/// success counts from the recorded evidence.
async fn check_pods(
    ctx: &Context,
    ns: &str,
    pa: &PolicyAgent,
    reads: &Reads,
    input: &mut AgentInput,
    check: &Check,
) {
    if check.mode == CheckMode::Http {
        carry_over(ctx, pa, reads, input);
        let due: Vec<&Pod> = agent::probe_targets(input)
            .into_iter()
            .filter(|p| ctx.agents.due(&p.uid, check.period))
            .filter_map(|p| {
                reads
                    .pods
                    .iter()
                    .find(|pod| pod.uid().as_deref() == Some(&p.uid))
            })
            .collect();
        let results = join_all(due.iter().map(|p| probe(ctx, ns, p, check))).await;
        for (p, ok) in due.iter().zip(results) {
            ctx.agents
                .record(&p.uid().unwrap_or_default(), &input.secret_kid, ok);
        }
    }
    ctx.agents.forget_stale();
    for p in &mut input.pods {
        p.successes = ctx.agents.successes(&p.uid, &input.secret_kid);
    }
}

/// After a restart the check counts, kept in memory, are gone. A pod that the recorded
/// confirmation covered starts one check short of the threshold instead of at zero: the check
/// made now keeps it confirmed, a failed one drops it to zero as always. So a warm restart
/// writes no status (before: `Connected` went to pending and back, two writes per agent).
/// Covered means: the confirmation still stands for this workload uid and revision, it is on
/// the Secret's key, and the pod runs that revision and key and existed when it was
/// confirmed. The status is the operator's own (only it may write `policyagents/status`).
fn carry_over(ctx: &Context, pa: &PolicyAgent, reads: &Reads, input: &AgentInput) {
    let Some(evidence) = input.standing().filter(|e| e.key_id == input.secret_kid) else {
        return;
    };
    if input.current_revision.as_deref() != Some(evidence.revision.as_str()) {
        return;
    }
    let Some(confirmed_at) = pa
        .status
        .as_ref()
        .and_then(|s| s.confirmed_at.as_deref())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    else {
        return;
    };
    let carried = input.success_threshold.saturating_sub(1);
    for p in &input.pods {
        let existed = reads
            .pods
            .iter()
            .find(|pod| pod.uid().as_deref() == Some(p.uid.as_str()))
            .and_then(|pod| pod.metadata.creation_timestamp.as_ref())
            .is_some_and(|t| t.0.as_second() <= confirmed_at.timestamp());
        if existed
            && p.kid.as_deref() == Some(evidence.key_id.as_str())
            && p.revision.as_deref() == Some(evidence.revision.as_str())
        {
            ctx.agents.carry(&p.uid, &evidence.key_id, carried);
        }
    }
}

/// What the verifier replicas saw of ProvisioningKey `pk` (every page of every report): the
/// reports the metadata cache names, read by GET. A report the cache has not delivered yet only
/// delays a confirmation (its event wakes this PolicyAgent). Only positive evidence
/// acknowledges a pod ([`crate::usage::KeyUse::pod_seen`]).
async fn acknowledgements(ctx: &Context, ns: &str, pk: &str) -> Result<crate::usage::KeyUse> {
    let api: Api<crate::api::KeyUsageReport> = Api::namespaced(ctx.client.clone(), ns);
    let mut reports = Vec::new();
    for name in ctx.caches.report_names(ns, pk) {
        reports.extend(api.get_opt(&name).await?);
    }
    reports.retain(|r| r.spec.provisioning_key == pk);
    Ok(crate::usage::key_use(&reports, &[], ns, pk, ctx.now()))
}

/// Marks each pod acknowledged when a report lists it on the Secret's key id. A pod missing
/// from a truncated list is unknown, so not acknowledged (the confirmation waits for positive
/// evidence); returns how many pods are unknown that way.
fn acknowledge(kid: &str, pods: &mut [agent::PodObs], seen: &crate::usage::KeyUse) -> usize {
    let mut unknown = 0;
    for p in pods {
        let s = seen.pod_seen(kid, &p.uid);
        p.acknowledged = s == Some(true);
        unknown += usize::from(s.is_none());
    }
    unknown
}

/// The reconcile entry point.
pub async fn reconcile(pa: Arc<PolicyAgent>, ctx: Arc<Context>) -> Result<Action> {
    if pa.meta().deletion_timestamp.is_some() {
        // Deleting a PolicyAgent never restarts its workload.
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    let ns = pa.namespace().ok_or(Error::MissingObjectKey)?;
    // The PolicyAgent as the API server has it now: the watch cache may not show our last status
    // write yet (comparing against a stale copy would re-send an identical status), nor the
    // latest spec (a re-pointed workloadRef must never be judged by the old one).
    let pa = Api::<PolicyAgent>::namespaced(ctx.client.clone(), &ns)
        .get_status(&pa.name_any())
        .await?;
    if pa.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let previous = pa.status.clone().unwrap_or_default();

    let (input, outcome) = match evaluate(&ctx, &pa, &ns, now).await? {
        Ok((input, decision, check, workload_rv)) => {
            let o = outcome::outcome(&input, &decision, check.period, now);
            // Apply: the only write besides status and Events.
            if let Decision::Roll { kid } = &decision {
                roll(&ctx, &ns, &pa, kid, workload_rv, now).await?;
                let pk = format!("{ns}/{}", pa.spec.provisioning_key_ref.name);
                ctx.agents.set_rolling(&workload_key(&ns, &pa), true, &pk);
                fault::after("roll");
                info!(pa = %pa.name_any(), workload = %pa.spec.workload_ref.name, kid = %kid, "rolled workload");
            }
            (Some(input), o)
        }
        Err(refusal) => (None, outcome::refused(&refusal)),
    };
    report(&ctx, &pa, &previous, input.as_ref(), &outcome, now).await?;
    ctx.backoff.reset(&super::object_key(&pa));
    Ok(outcome
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// Observe and decide: the reads, the checks, the pure mapping and the pure decision.
async fn evaluate(
    ctx: &Context,
    pa: &PolicyAgent,
    ns: &str,
    now: DateTime<Utc>,
) -> Result<std::result::Result<(AgentInput, Decision, Check, Option<String>), Refusal>> {
    let check = match resolve_check(pa) {
        Ok(c) => c,
        Err(m) => return Ok(Err(Refusal::InvalidSpec(m))),
    };
    let reads = read(ctx, ns, pa).await?;
    // A rollout complete on the Secret's key gives its roll slot back.
    let key = workload_key(ns, pa);
    let secret_kid = reads.secret_kid();
    if let Some(w) = reads.workload.as_ref()
        && secret_kid.is_some()
        && w.template_kid() == secret_kid
        && w.rollout().0 == Rollout::Complete
    {
        ctx.agents.set_rolling(&key, false, "");
    }
    let pk_key = format!("{ns}/{}", pa.spec.provisioning_key_ref.name);
    let budget = reads
        .pk
        .as_ref()
        .and_then(|pk| pk.spec.rotation.as_ref())
        .and_then(|r| r.max_concurrent_rolls)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0);
    let slot_free = ctx
        .agents
        .slot(&key, ctx.config.max_concurrent_rolls, &pk_key, budget);
    let successes = |uid: &str, kid: &str| ctx.agents.successes(uid, kid);
    let mut input = match observe::observe(&reads.objects(pa, slot_free), &successes, &check) {
        Ok(input) => input,
        Err(refusal) => return Ok(Err(refusal)),
    };
    check_pods(ctx, ns, pa, &reads, &mut input, &check).await;
    if check.acknowledgement {
        let seen = acknowledgements(ctx, ns, &pa.spec.provisioning_key_ref.name).await?;
        let unknown = acknowledge(&input.secret_kid, &mut input.pods, &seen);
        if unknown > 0 {
            warn!(pa = %pa.name_any(), kid = %input.secret_kid, unknown,
                  "a verifier's pod list for this key id is truncated (podsTruncated): pods it \
                   does not list count as not acknowledged yet");
        }
    }
    let mut decision = agent::decide(&input, now);
    if matches!(decision, Decision::Roll { .. }) {
        // The slot seen above may have been taken meanwhile by another PolicyAgent's reconcile:
        // take it now, or wait as queued.
        let slot = ctx
            .agents
            .reserve(&key, ctx.config.max_concurrent_rolls, &pk_key, budget);
        if slot != RollSlot::Free {
            input.roll_slot = slot;
            decision = agent::decide(&input, now);
        }
    }
    let workload_rv = reads
        .workload
        .as_ref()
        .and_then(|w| w.meta().resource_version.clone());
    Ok(Ok((input, decision, check, workload_rv)))
}

/// Writes the status when it changed, then records the Events of this reconcile's transitions:
/// the roll, a new confirmation, a new reason the user must act on.
async fn report(
    ctx: &Context,
    pa: &PolicyAgent,
    previous: &PolicyAgentStatus,
    input: Option<&AgentInput>,
    o: &Outcome,
    now: DateTime<Utc>,
) -> Result<()> {
    let ns = pa.namespace().ok_or(Error::MissingObjectKey)?;
    let regarding = pa.object_ref(&());
    let wl = &pa.spec.workload_ref;
    let counts = o.counts.clone().unwrap_or_default();
    if let Some((from, to)) = o.rolled.as_ref() {
        ctx.metrics.rollout_triggered(wl.kind);
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: false,
                reason: reason::ROLLOUT_TRIGGERED,
                action: "Roll",
                note: format!(
                    "rolled {} {} from key {} to key {to} ({} pods, {} desired)",
                    wl.kind,
                    wl.name,
                    from.as_deref().unwrap_or("none"),
                    counts.total,
                    input.map_or(0, |i| i.figures.desired)
                ),
                related: Some(key_ref(ctx, &ns, pa, Some(to))),
            },
        )
        .await;
    }
    let status = outcome::status(pa, previous, o, now);
    if pa.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let body =
        json!({ "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent", "status": status });
    Api::<PolicyAgent>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &pa.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    if let Some(e) = outcome::newly_confirmed(observe::recorded(Some(previous)).as_ref(), o) {
        fault::after("confirm");
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: false,
                reason: reason::AGENT_CONFIRMED,
                action: "Confirm",
                note: format!(
                    "{} {}: all {} pods at revision {} confirmed on key {} ({})",
                    wl.kind,
                    wl.name,
                    counts.total,
                    e.revision,
                    e.key_id,
                    match input.map(|i| (i.success_threshold, i.require_ack)) {
                        Some((0, false)) => "rollout only".to_string(),
                        Some((0, true)) => "each acknowledged by the keyward verifier".to_string(),
                        Some((n, false)) => format!("{n} consecutive checks each"),
                        Some((n, true)) => format!(
                            "{n} consecutive checks each, each acknowledged by the keyward verifier"
                        ),
                        None => String::new(),
                    }
                ),
                related: Some(key_ref(ctx, &ns, pa, Some(&e.key_id))),
            },
        )
        .await;
    }
    let was = previous
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map(|c| c.reason.as_str());
    if outcome::warning_due(was, o) {
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: true,
                reason: o.ready.reason,
                action: "Reconcile",
                note: o.ready.message.clone(),
                related: Some(workload_ref(pa, &ns)),
            },
        )
        .await;
    }
    Ok(())
}

/// The related object of an Event about key `kid`: the key's own Secret, so that kube's Recorder
/// (which merges Events with the same related object) keeps one Event per key; the workload when
/// the key Secret cannot be found.
fn key_ref(
    ctx: &Context,
    ns: &str,
    pa: &PolicyAgent,
    kid: Option<&str>,
) -> k8s_openapi::api::core::v1::ObjectReference {
    // From the labelled-Secret cache: an Event's related object needs no fresh read.
    let found = kid.and_then(|kid| {
        ctx.caches
            .key_secret_with_kid(ns, &pa.spec.provisioning_key_ref.name, kid)
    });
    match found {
        Some(s) => k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(ns.to_string()),
            name: Some(s),
            ..Default::default()
        },
        None => workload_ref(pa, ns),
    }
}

fn workload_ref(pa: &PolicyAgent, ns: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some(pa.spec.workload_ref.kind.to_string()),
        namespace: Some(ns.to_string()),
        name: Some(pa.spec.workload_ref.name.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator-wide cap counts every rolling workload; a key's budget counts only its own;
    /// a workload already rolling keeps its slot; a finished roll gives it back.
    #[test]
    fn roll_slots_follow_the_cap_and_the_keys_budget() {
        let s = AgentState::default();
        s.set_rolling("ns/Deployment/a1", true, "ns/a");
        s.set_rolling("ns/Deployment/a2", true, "ns/a");
        assert_eq!(
            s.slot("ns/Deployment/a3", 5, "ns/a", Some(2)),
            RollSlot::KeyBudget(2)
        );
        assert_eq!(
            s.slot("ns/Deployment/a3", 5, "ns/a", Some(3)),
            RollSlot::Free
        );
        assert_eq!(s.slot("ns/Deployment/a3", 5, "ns/a", None), RollSlot::Free);
        assert_eq!(
            s.slot("ns/Deployment/b1", 5, "ns/b", Some(1)),
            RollSlot::Free
        );
        assert_eq!(
            s.slot("ns/Deployment/a1", 2, "ns/a", Some(1)),
            RollSlot::Free
        );
        assert_eq!(
            s.slot("ns/Deployment/b1", 2, "ns/b", None),
            RollSlot::OperatorCap
        );
        s.set_rolling("ns/Deployment/a1", false, "");
        assert_eq!(
            s.slot("ns/Deployment/a3", 5, "ns/a", Some(2)),
            RollSlot::Free
        );
        assert_eq!(s.rolling_now(), 1);
    }

    /// Only positive evidence acknowledges a pod: a pod a report lists is acknowledged; one
    /// missing from a whole list is not; one missing from a truncated list (`podsTruncated`)
    /// is not either, and is counted as unknown (the confirmation waits, never guesses).
    #[test]
    fn only_a_listed_pod_is_acknowledged_and_a_truncated_list_is_counted() {
        let pod = |uid: &str| agent::PodObs {
            name: uid.into(),
            uid: uid.into(),
            kid: Some("k2".into()),
            revision: None,
            terminating: false,
            unknown: false,
            ready: true,
            successes: 0,
            acknowledged: true,
        };
        let mut seen = crate::usage::KeyUse::default();
        seen.pods.insert("k2".into(), ["a".to_string()].into());
        let mut pods = vec![pod("a"), pod("b")];
        assert_eq!(acknowledge("k2", &mut pods, &seen), 0);
        assert_eq!(
            pods.iter().map(|p| p.acknowledged).collect::<Vec<_>>(),
            [true, false]
        );
        seen.pods_truncated.insert("k2".into());
        assert_eq!(acknowledge("k2", &mut pods, &seen), 1);
        assert_eq!(
            pods.iter().map(|p| p.acknowledged).collect::<Vec<_>>(),
            [true, false]
        );
        // Another key id's truncation says nothing about this one.
        assert_eq!(acknowledge("k3", &mut pods, &seen), 0);
        assert!(pods.iter().all(|p| !p.acknowledged));
    }

    #[test]
    fn proxy_and_pod_urls() {
        assert_eq!(
            proxy_path(
                "agents",
                "opa-0",
                Scheme::Http,
                8181,
                "/health?bundles=true"
            ),
            "/api/v1/namespaces/agents/pods/opa-0:8181/proxy/health?bundles=true"
        );
        assert_eq!(
            proxy_path("agents", "opa-0", Scheme::Https, 8443, "/health"),
            "/api/v1/namespaces/agents/pods/https:opa-0:8443/proxy/health"
        );
        assert_eq!(
            pod_url("10.0.0.7", Scheme::Http, 8181, "/health"),
            "http://10.0.0.7:8181/health"
        );
        assert_eq!(
            pod_url("fd00::7", Scheme::Https, 8443, "/h"),
            "https://[fd00::7]:8443/h"
        );
    }

    /// The pods-proxy mode's request, checked against a mock API server (the local plane refuses
    /// to proxy to loopback pod IPs, so this mode cannot be exercised end to end there).
    #[tokio::test]
    async fn proxy_check_request_shape() {
        let (service, mut handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let ctx = Context::new(
            client,
            crate::controller::OperatorConfig::default(),
            crate::controller::WriteCounter::default(),
        );
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), http::Method::GET);
            assert_eq!(
                req.uri().to_string(),
                "/api/v1/namespaces/agents/pods/opa-0:8181/proxy/health?bundles=true"
            );
            send.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(b"{}".to_vec()))
                    .unwrap(),
            );
        });
        let pod = Pod {
            metadata: kube::api::ObjectMeta {
                name: Some("opa-0".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let check = Check {
            mode: CheckMode::Http,
            port: 8181,
            path: DEFAULT_PATH.into(),
            scheme: Scheme::Http,
            timeout: Duration::from_secs(2),
            period: DEFAULT_PERIOD,
            success_threshold: 2,
            acknowledgement: false,
            via: CheckVia::ApiServerProxy,
            min_roll_interval: Duration::ZERO,
        };
        assert!(probe(&ctx, "agents", &pod, &check).await);
        server.await.unwrap();
    }
}
