//! PolicyAgent reconcile: observe the key Secret, the workload and its pods -> probe the pods on
//! the current key -> decide (pure, [`crate::agent::decide`]) -> roll or record confirmation ->
//! report status and Events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};

use super::audit::{self, Audit, reason};
use super::{Context, Error, FIELD_MANAGER, Result, parse_ts, ts, ts_start};
use crate::agent::{self, AgentInput, AgentStep, Figures, PodObs, Rollout};
use crate::api::ProvisioningKey;
use crate::api::conditions::{self, condition};
use crate::api::policy_agent::{
    AgentHistoryEntry, CheckMode, CheckVia, PodCounts, PolicyAgent, PolicyAgentStatus, Scheme,
    WorkloadKind, WorkloadRollout,
};
use crate::fault;
use crate::labels as l;

pub const DEFAULT_PATH: &str = "/health?bundles=true";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(2);
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;
/// Probe records and roll slots older than this are dropped.
const STALE_AFTER: Duration = Duration::from_secs(600);
/// History entries kept in status.
const HISTORY_LIMIT: usize = 10;
/// How often a confirmed agent is looked at again when nothing else wakes it.
const RECHECK: Duration = Duration::from_secs(60);

/// In-memory evidence of the connectivity checks, per pod UID (a restarted pod has a new UID, so
/// counting starts again "since it started"). Lost on restart: checks simply run again.
#[derive(Default)]
pub struct AgentState {
    probes: std::sync::Mutex<HashMap<String, Probe>>,
    /// Workloads rolled and not yet complete (the operator-wide cap on concurrent rolls).
    rolling: std::sync::Mutex<BTreeMap<String, Instant>>,
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

    fn slot_free(&self, key: &str, cap: usize) -> bool {
        let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        // A roll whose workload or PolicyAgent went away (or that never completes, e.g. a paused
        // Deployment) gives its slot back after a while, so the cap cannot be exhausted by leaks.
        rolling.retain(|_, since| since.elapsed() < STALE_AFTER);
        rolling.contains_key(key) || rolling.len() < cap
    }

    fn set_rolling(&self, key: &str, on: bool) {
        let mut rolling = self.rolling.lock().unwrap_or_else(|e| e.into_inner());
        if on {
            rolling.entry(key.to_string()).or_insert_with(Instant::now);
        } else {
            rolling.remove(key);
        }
    }
}

/// The check settings resolved from the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub mode: CheckMode,
    pub port: i32,
    pub path: String,
    pub scheme: Scheme,
    pub timeout: Duration,
    pub period: Duration,
    pub success_threshold: u32,
    pub via: CheckVia,
    pub min_roll_interval: Duration,
}

fn dur(
    field: &str,
    v: Option<&String>,
    default: Duration,
) -> std::result::Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => crate::rotation::parse_duration(s).ok_or_else(|| {
            format!("{field}: {s:?} is not a duration (use Go syntax such as 2s or 1m)")
        }),
    }
}

/// Resolve and validate the PolicyAgent's spec (the operator enforces every schema rule too).
pub fn resolve_check(pa: &PolicyAgent) -> std::result::Result<Check, String> {
    let cc = pa.spec.connectivity_check.clone().unwrap_or_default();
    let mode = cc.mode.unwrap_or_default();
    let http = cc.http.clone();
    if mode == CheckMode::Http && http.is_none() {
        return Err(
            "connectivityCheck.http is required unless connectivityCheck.mode is RolloutOnly"
                .into(),
        );
    }
    let http = http.unwrap_or_default();
    if mode == CheckMode::Http && !(1..=65535).contains(&http.port) {
        return Err(format!(
            "connectivityCheck.http.port: {} is not a port",
            http.port
        ));
    }
    let path = http
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    if !path.starts_with('/') {
        return Err("connectivityCheck.http.path must start with /".into());
    }
    let threshold = http
        .success_threshold
        .map_or(DEFAULT_SUCCESS_THRESHOLD, |t| {
            u32::try_from(t.clamp(1, 100)).unwrap_or(1)
        });
    let rollout = pa.spec.rollout.clone().unwrap_or_default();
    Ok(Check {
        mode,
        port: http.port,
        path,
        scheme: http.scheme.unwrap_or_default(),
        timeout: dur(
            "connectivityCheck.http.timeout",
            http.timeout.as_ref(),
            DEFAULT_TIMEOUT,
        )?,
        period: dur(
            "connectivityCheck.http.period",
            http.period.as_ref(),
            DEFAULT_PERIOD,
        )?,
        success_threshold: if mode == CheckMode::RolloutOnly {
            0
        } else {
            threshold
        },
        via: http.via.unwrap_or_default(),
        min_roll_interval: dur(
            "rollout.minInterval",
            rollout.min_interval.as_ref(),
            Duration::ZERO,
        )?,
    })
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

/// The workload as the decision needs it.
struct Workload {
    template_kid: Option<String>,
    rolled_at: Option<DateTime<Utc>>,
    selector: Option<LabelSelector>,
    rollout: Rollout,
    figures: Figures,
}

/// Reads a workload of kind `K`; `parts` gives its pod template, selector and rollout judgement.
async fn fetch<K>(
    ctx: &Context,
    ns: &str,
    name: &str,
    parts: impl Fn(&K) -> (PodTemplateSpec, LabelSelector, (Rollout, Figures)),
) -> Result<Option<Workload>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    <K as Resource>::DynamicType: Default,
{
    Ok(Api::<K>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
        .map(|w| {
            let (template, selector, (rollout, figures)) = parts(&w);
            Workload {
                template_kid: template
                    .metadata
                    .and_then(|m| m.annotations)
                    .and_then(|a| a.get(l::KEY_ID).cloned()),
                rolled_at: w.annotations().get(l::ROLLED_AT).and_then(|s| parse_ts(s)),
                selector: Some(selector),
                rollout,
                figures,
            }
        }))
}

async fn get_workload(
    ctx: &Context,
    ns: &str,
    kind: WorkloadKind,
    name: &str,
) -> Result<Option<Workload>> {
    match kind {
        WorkloadKind::Deployment => {
            fetch(ctx, ns, name, |d: &Deployment| {
                let spec = d.spec.clone().unwrap_or_default();
                (spec.template, spec.selector, agent::deployment(d))
            })
            .await
        }
        WorkloadKind::StatefulSet => {
            fetch(ctx, ns, name, |s: &StatefulSet| {
                let spec = s.spec.clone().unwrap_or_default();
                (spec.template, spec.selector, agent::stateful_set(s))
            })
            .await
        }
        WorkloadKind::DaemonSet => {
            fetch(ctx, ns, name, |d: &DaemonSet| {
                let spec = d.spec.clone().unwrap_or_default();
                (spec.template, spec.selector, agent::daemon_set(d))
            })
            .await
        }
    }
}

fn selector_string(sel: &LabelSelector) -> Option<String> {
    let mut parts: Vec<String> = sel
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.clone().unwrap_or_default() {
        let values = e.values.unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None,
        });
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(","))
    }
}

/// Rolls the workload: writes the key id into the pod template (pods restart and read the new
/// Secret) and records when, on the workload's own metadata. Only Keyward's keys are touched.
async fn roll(
    ctx: &Context,
    ns: &str,
    pa: &PolicyAgent,
    kid: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let name = &pa.spec.workload_ref.name;
    let body = json!({
        "metadata": { "annotations": { l::ROLLED_AT: ts_start(now), l::POLICY_AGENT: pa.name_any() } },
        "spec": { "template": { "metadata": { "annotations": { l::KEY_ID: kid } } } }
    });
    let resource = match pa.spec.workload_ref.kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
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

/// What the reconcile found, for status.
struct Outcome {
    phase: &'static str,
    ready: (bool, &'static str, String),
    connected: (bool, &'static str, String),
    confirmed: Option<String>,
    target: Option<String>,
    rolled_at: Option<DateTime<Utc>>,
    counts: Option<agent::Counts>,
    figures: Option<(Figures, bool)>,
    /// This reconcile rolled the workload.
    rolled_now: bool,
}

impl Outcome {
    fn not_ready(phase: &'static str, reason: &'static str, message: String) -> Self {
        Outcome {
            phase,
            ready: (false, reason, message.clone()),
            connected: (false, reason, message),
            confirmed: None,
            target: None,
            rolled_at: None,
            counts: None,
            figures: None,
            rolled_now: false,
        }
    }
}

fn workload_key(ns: &str, pa: &PolicyAgent) -> String {
    format!(
        "{ns}/{}/{}",
        pa.spec.workload_ref.kind, pa.spec.workload_ref.name
    )
}

/// The reconcile entry point.
pub async fn reconcile(pa: Arc<PolicyAgent>, ctx: Arc<Context>) -> Result<Action> {
    if pa.meta().deletion_timestamp.is_some() {
        // Deleting a PolicyAgent never restarts its workload.
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    let ns = pa.namespace().ok_or(Error::MissingObjectKey)?;
    // The status as the API server has it now: the watch cache may not show our last write yet,
    // and comparing against a stale copy would re-send an identical status.
    let fresh = Api::<PolicyAgent>::namespaced(ctx.client.clone(), &ns)
        .get_status(&pa.name_any())
        .await?;
    let mut pa = (*pa).clone();
    pa.status = fresh.status;
    let previous = pa.status.clone().unwrap_or_default();
    let (outcome, requeue) = evaluate(&ctx, &pa, &ns, &previous, now).await?;
    report(&ctx, &pa, &previous, outcome, now).await?;
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

async fn evaluate(
    ctx: &Context,
    pa: &PolicyAgent,
    ns: &str,
    previous: &PolicyAgentStatus,
    now: DateTime<Utc>,
) -> Result<(Outcome, Option<Duration>)> {
    let retry = Some(Duration::from_secs(10));
    let check = match resolve_check(pa) {
        Ok(c) => c,
        Err(m) => return Ok((Outcome::not_ready("Invalid", "InvalidSpec", m), None)),
    };
    // One PolicyAgent per workload: the oldest claim wins.
    let others = Api::<PolicyAgent>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    let me = (
        pa.meta().creation_timestamp.clone().map(|t| t.0),
        pa.name_any(),
    );
    if let Some(owner) = others.items.iter().find(|o| {
        o.name_any() != pa.name_any()
            && o.spec.workload_ref == pa.spec.workload_ref
            && (
                o.meta().creation_timestamp.clone().map(|t| t.0),
                o.name_any(),
            ) < me
    }) {
        return Ok((
            Outcome::not_ready(
                "Invalid",
                "WorkloadClaimed",
                format!(
                    "{} {} is already managed by PolicyAgent {}",
                    pa.spec.workload_ref.kind,
                    pa.spec.workload_ref.name,
                    owner.name_any()
                ),
            ),
            // Nothing wakes this PolicyAgent when the owner goes away: look again.
            retry,
        ));
    }
    let pk_name = &pa.spec.provisioning_key_ref.name;
    let Some(pk) = Api::<ProvisioningKey>::namespaced(ctx.client.clone(), ns)
        .get_opt(pk_name)
        .await?
    else {
        return Ok((
            Outcome::not_ready(
                "Pending",
                "ProvisioningKeyNotFound",
                format!("ProvisioningKey {pk_name} not found in namespace {ns}"),
            ),
            retry,
        ));
    };
    // The key id is read from the agent Secret itself, never from ProvisioningKey status.
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(&pk.secret_name())
        .await?;
    let pk_uid = pk.meta().uid.clone().unwrap_or_default();
    let secret_kid = secret
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == pk_uid)
        })
        .and_then(|s| {
            s.data.and_then(|d| {
                d.get(l::DATA_KEY_ID)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            })
        });
    let Some(secret_kid) = secret_kid else {
        return Ok((
            Outcome::not_ready(
                "Pending",
                "KeyNotHandedOut",
                format!(
                    "Secret {} of ProvisioningKey {pk_name} does not carry a key yet",
                    pk.secret_name()
                ),
            ),
            retry,
        ));
    };
    let wl = &pa.spec.workload_ref;
    let Some(workload) = get_workload(ctx, ns, wl.kind, &wl.name).await? else {
        return Ok((
            Outcome::not_ready(
                "Pending",
                "WorkloadNotFound",
                format!("{} {} not found in namespace {ns}", wl.kind, wl.name),
            ),
            retry,
        ));
    };

    // Pods of the workload.
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
    let pods: Vec<Pod> = match workload.selector.as_ref().and_then(selector_string) {
        Some(sel) => {
            pods_api
                .list(&ListParams::default().labels(&sel))
                .await?
                .items
        }
        None => Vec::new(),
    };
    // Probe the running, ready pods that carry the Secret's key, at most once per period.
    let on_key: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.meta().deletion_timestamp.is_none())
        .filter(|p| {
            agent::pod_kid(p.meta().annotations.as_ref()).as_deref() == Some(secret_kid.as_str())
        })
        .filter(|p| pod_ready(p))
        .collect();
    if check.mode == CheckMode::Http
        && workload.template_kid.as_deref() == Some(secret_kid.as_str())
    {
        let due: Vec<&&Pod> = on_key
            .iter()
            .filter(|p| ctx.agents.due(&p.uid().unwrap_or_default(), check.period))
            .collect();
        let results = join_all(due.iter().map(|p| probe(ctx, ns, p, &check))).await;
        for (p, ok) in due.iter().zip(results) {
            ctx.agents
                .record(&p.uid().unwrap_or_default(), &secret_kid, ok);
        }
    }
    ctx.agents.forget_stale();
    let pod_obs: Vec<PodObs> = pods
        .iter()
        .map(|p| {
            let uid = p.uid().unwrap_or_default();
            PodObs {
                name: p.name_any(),
                successes: ctx.agents.successes(&uid, &secret_kid),
                uid,
                kid: agent::pod_kid(p.meta().annotations.as_ref()),
                terminating: p.meta().deletion_timestamp.is_some(),
                ready: pod_ready(p),
            }
        })
        .collect();
    let key = workload_key(ns, pa);
    let complete = workload.rollout == Rollout::Complete;
    if complete && workload.template_kid.as_deref() == Some(secret_kid.as_str()) {
        ctx.agents.set_rolling(&key, false);
    }
    let input = AgentInput {
        secret_kid: secret_kid.clone(),
        template_kid: workload.template_kid.clone(),
        rollout: workload.rollout.clone(),
        pods: pod_obs,
        success_threshold: check.success_threshold,
        rolled_at: workload.rolled_at,
        min_roll_interval: check.min_roll_interval,
        roll_slot_free: ctx.agents.slot_free(&key, ctx.config.max_concurrent_rolls),
        confirmed_kid: previous.confirmed_key_id.clone(),
    };
    let counts = agent::counts(&input);
    let step = agent::decide(&input, now);
    let figures = Some((workload.figures.clone(), complete));
    let confirmed_prev = previous.confirmed_key_id.clone();
    let out = |phase,
               ready: (bool, &'static str, String),
               connected: (bool, &'static str, String),
               confirmed: Option<String>,
               rolled_at| Outcome {
        phase,
        ready,
        connected,
        confirmed,
        target: Some(secret_kid.clone()),
        rolled_at,
        counts: Some(counts.clone()),
        figures: figures.clone(),
        rolled_now: false,
    };
    Ok(match step {
        AgentStep::Roll { kid } => {
            let old = workload
                .template_kid
                .clone()
                .unwrap_or_else(|| "none".into());
            roll(ctx, ns, pa, &kid, now).await?;
            ctx.agents.set_rolling(&key, true);
            fault::after("roll");
            audit::record(
                ctx,
                &pa.object_ref(&()),
                Audit {
                    warning: false,
                    reason: reason::ROLLOUT_TRIGGERED,
                    action: "Roll",
                    note: format!(
                        "rolled {} {} from key {old} to key {kid} ({} pods, {} desired)",
                        wl.kind, wl.name, counts.total, workload.figures.desired
                    ),
                    related: Some(key_ref(ctx, ns, pa, Some(&kid)).await),
                },
            )
            .await;
            info!(pa = %pa.name_any(), workload = %wl.name, kid = %kid, "rolled workload");
            let mut o = out(
                "Rolling",
                (
                    confirmed_prev.is_some(),
                    "RolloutTriggered",
                    format!("rolling to key {kid}"),
                ),
                (false, "RolloutTriggered", format!("rolling to key {kid}")),
                confirmed_prev.clone(),
                Some(now),
            );
            o.rolled_now = true;
            (o, Some(Duration::from_secs(1)))
        }
        AgentStep::Wait {
            reason: r,
            message,
            retry_after,
        } => {
            let phase = match r {
                "DeploymentPaused"
                | "OnDeleteStrategy"
                | "Partitioned"
                | "ProgressDeadlineExceeded" => "Stalled",
                agent::reasons::ROLL_DELAYED | agent::reasons::ROLL_QUEUED => "Pending",
                agent::reasons::ROLLING => "Rolling",
                _ => "Confirming",
            };
            let on_current = confirmed_prev.as_deref() == Some(secret_kid.as_str());
            let retry = retry_after.or(Some(check.period));
            (
                out(
                    phase,
                    (
                        on_current,
                        if on_current {
                            agent::reasons::CONFIRMED
                        } else {
                            r
                        },
                        if on_current {
                            format!("confirmed on key {secret_kid}")
                        } else {
                            message.clone()
                        },
                    ),
                    (false, r, message),
                    confirmed_prev.clone(),
                    // Only a roll to the Secret's key counts (confirmationTimeout runs from it).
                    workload
                        .rolled_at
                        .filter(|_| workload.template_kid.as_deref() == Some(secret_kid.as_str())),
                ),
                retry,
            )
        }
        AgentStep::Confirmed { kid } => (
            out(
                "Confirmed",
                (
                    true,
                    agent::reasons::CONFIRMED,
                    format!("every pod is confirmed on key {kid}"),
                ),
                (
                    true,
                    agent::reasons::CONFIRMED,
                    format!(
                        "{} of {} pods connect with key {kid}",
                        counts.confirmed, counts.total
                    ),
                ),
                Some(kid),
                workload.rolled_at,
            ),
            Some(RECHECK),
        ),
    })
}

/// The related object of an Event about key `kid`: the key's own Secret, so that kube's Recorder
/// (which merges Events with the same related object) keeps one Event per key; the workload when
/// the key Secret cannot be found.
async fn key_ref(
    ctx: &Context,
    ns: &str,
    pa: &PolicyAgent,
    kid: Option<&str>,
) -> k8s_openapi::api::core::v1::ObjectReference {
    let selector = format!(
        "{}={},{}={}",
        l::PROVISIONING_KEY,
        pa.spec.provisioning_key_ref.name,
        l::COMPONENT,
        l::COMPONENT_KEY
    );
    let found = match (
        kid,
        Api::<Secret>::namespaced(ctx.client.clone(), ns)
            .list_metadata(&ListParams::default().labels(&selector))
            .await,
    ) {
        (Some(kid), Ok(list)) => list
            .items
            .into_iter()
            .find(|s| s.annotations().get(l::KEY_ID).map(String::as_str) == Some(kid)),
        _ => None,
    };
    match found {
        Some(s) => k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Secret".into()),
            namespace: Some(ns.to_string()),
            name: s.metadata.name,
            ..Default::default()
        },
        None => workload_ref(pa, ns),
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
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

/// Status history: a roll adds an entry, a new confirmation completes it (bounded, newest first).
fn history(
    previous: &PolicyAgentStatus,
    o: &Outcome,
    now: DateTime<Utc>,
) -> Vec<AgentHistoryEntry> {
    let mut h = previous.history.clone();
    if let Some(kid) = o.target.as_ref().filter(|_| o.rolled_now) {
        h.insert(
            0,
            AgentHistoryEntry {
                kid: kid.clone(),
                rolled_at: Some(ts_start(now)),
                ..Default::default()
            },
        );
    }
    if let Some(kid) = o
        .confirmed
        .as_ref()
        .filter(|k| previous.confirmed_key_id.as_ref() != Some(*k))
    {
        let pods = o.counts.as_ref().map(|c| c.confirmed);
        match h
            .iter_mut()
            .find(|e| &e.kid == kid && e.confirmed_at.is_none())
        {
            Some(e) => {
                e.confirmed_at = Some(ts(now));
                e.pods = pods;
            }
            None => h.insert(
                0,
                AgentHistoryEntry {
                    kid: kid.clone(),
                    rolled_at: None,
                    confirmed_at: Some(ts(now)),
                    pods,
                },
            ),
        }
    }
    h.truncate(HISTORY_LIMIT);
    h
}

async fn report(
    ctx: &Context,
    pa: &PolicyAgent,
    previous: &PolicyAgentStatus,
    o: Outcome,
    now: DateTime<Utc>,
) -> Result<()> {
    let generation = pa.meta().generation;
    let now_t = Time(
        k8s_openapi::jiff::Timestamp::from_second(now.timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    );
    let newly_confirmed = o.confirmed.is_some() && o.confirmed != previous.confirmed_key_id;
    let confirmed_at = if newly_confirmed {
        Some(ts(now))
    } else {
        previous
            .confirmed_at
            .clone()
            .filter(|_| o.confirmed.is_some())
    };
    let status = PolicyAgentStatus {
        phase: Some(o.phase.to_string()),
        confirmed_key_id: o.confirmed.clone(),
        confirmed_at,
        confirmed_workload_uid: None,
        confirmed_revision: None,
        target_key_id: o.target.clone(),
        rolled_at: o.rolled_at.map(ts_start),
        pods: o.counts.as_ref().map(|c| PodCounts {
            total: c.total,
            on_current_key: c.on_key,
            confirmed: c.confirmed,
        }),
        workload: o.figures.as_ref().map(|(f, complete)| WorkloadRollout {
            desired: f.desired,
            updated: f.updated,
            ready: f.ready,
            available: f.available,
            complete: *complete,
        }),
        observed_generation: generation,
        history: history(previous, &o, now),
        conditions: vec![
            condition(
                &previous.conditions,
                conditions::READY,
                o.ready.0,
                o.ready.1,
                o.ready.2.clone(),
                generation,
                now_t.clone(),
            ),
            condition(
                &previous.conditions,
                conditions::CONNECTED,
                o.connected.0,
                o.connected.1,
                o.connected.2.clone(),
                generation,
                now_t,
            ),
        ],
    };
    if pa.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = pa.namespace().ok_or(Error::MissingObjectKey)?;
    let body =
        json!({ "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent", "status": status });
    Api::<PolicyAgent>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &pa.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    let regarding = pa.object_ref(&());
    if newly_confirmed {
        fault::after("confirm");
        let c = o.counts.clone().unwrap_or_default();
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: false,
                reason: reason::AGENT_CONFIRMED,
                action: "Confirm",
                note: format!(
                    "{} {}: all {} pods confirmed on key {} ({})",
                    pa.spec.workload_ref.kind,
                    pa.spec.workload_ref.name,
                    c.total,
                    o.confirmed.clone().unwrap_or_default(),
                    match resolve_check(pa).map(|c| c.success_threshold) {
                        Ok(0) => "rollout only".to_string(),
                        Ok(n) => format!("{n} consecutive checks each"),
                        Err(_) => String::new(),
                    }
                ),
                related: Some(key_ref(ctx, &ns, pa, o.confirmed.as_deref()).await),
            },
        )
        .await;
    }
    let was = previous
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)
        .map(|c| c.reason.clone());
    let warn = matches!(
        o.ready.1,
        "InvalidSpec"
            | "WorkloadClaimed"
            | "DeploymentPaused"
            | "OnDeleteStrategy"
            | "Partitioned"
            | "ProgressDeadlineExceeded"
    );
    if warn && !o.ready.0 && was.as_deref() != Some(o.ready.1) {
        audit::record(
            ctx,
            &regarding,
            Audit {
                warning: true,
                reason: o.ready.1,
                action: "Reconcile",
                note: o.ready.2.clone(),
                related: Some(workload_ref(pa, &ns)),
            },
        )
        .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            via: CheckVia::ApiServerProxy,
            min_roll_interval: Duration::ZERO,
        };
        assert!(probe(&ctx, "agents", &pod, &check).await);
        server.await.unwrap();
    }

    #[test]
    fn check_spec_validation() {
        let mut pa = PolicyAgent::new("a", Default::default());
        assert!(resolve_check(&pa).unwrap_err().contains("http is required"));
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: Some(CheckMode::RolloutOnly),
            http: None,
        });
        assert_eq!(resolve_check(&pa).unwrap().success_threshold, 0);
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: None,
            http: Some(crate::api::policy_agent::HttpCheck {
                port: 8181,
                timeout: Some("2 seconds".into()),
                ..Default::default()
            }),
        });
        assert!(resolve_check(&pa).unwrap_err().contains("timeout"));
    }
}
