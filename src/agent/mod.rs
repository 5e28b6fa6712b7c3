//! The PolicyAgent decision, pure: is the workload's rollout complete by the exact criteria of its
//! kind, should it roll, and is every agent pod confirmed on the key the Secret carries?
//!
//! The reconcile reads as: observe (reads, in the controller) -> [`observe::observe`] (raw
//! objects to an [`AgentInput`], pure) -> [`decide`] (pure) -> apply (the roll write) ->
//! [`outcome::outcome`] (status and Events to report, pure) -> report.

pub mod check;
pub mod observe;
pub mod outcome;
#[cfg(test)]
mod tests;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use crate::workload::rollout::{Figures, Rollout, daemon_set, deployment, stateful_set};

/// One agent pod as observed: a pod controlled by the workload that may still hold a key
/// (evicted and completed pods are left out when mapping, see [`crate::workload::holds_key`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObs {
    pub name: String,
    pub uid: String,
    /// The key id in the pod's annotations (copied from the pod template at creation).
    pub kid: Option<String>,
    /// The template revision the pod was created from ([`crate::workload::pod_revision`]).
    pub revision: Option<String>,
    pub terminating: bool,
    /// Phase `Unknown` (its node stopped reporting): it may still run whatever it started with.
    pub unknown: bool,
    pub ready: bool,
    /// Consecutive successful connectivity checks since the pod started.
    pub successes: u32,
    /// A verifier accepted a request from this pod (by UID) with the Secret's key id.
    pub acknowledged: bool,
}

/// What a confirmation rests on: every live pod of the workload with this uid, created from
/// this template revision, runs this key (and passed its checks). It counts only while the
/// workload named by the PolicyAgent still has this uid and this revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub key_id: String,
    pub workload_uid: String,
    pub revision: String,
}

/// Everything the PolicyAgent decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInput {
    /// The key id the agent Secret carries now (read from the Secret itself).
    pub secret_kid: String,
    /// The key id in the workload's pod template.
    pub template_kid: Option<String>,
    /// The uid of the workload named by the PolicyAgent.
    pub workload_uid: String,
    /// The workload's current template revision; `None` while unknown.
    pub current_revision: Option<String>,
    pub rollout: Rollout,
    pub figures: Figures,
    /// The workload's pods that may hold a key (by owner references, evicted ones left out).
    pub pods: Vec<PodObs>,
    /// Required consecutive successes per pod; 0 means no HTTP check.
    pub success_threshold: u32,
    /// Each pod must also be acknowledged by a verifier ([`PodObs::acknowledged`]).
    pub require_ack: bool,
    /// When Keyward last rolled this workload.
    pub rolled_at: Option<DateTime<Utc>>,
    pub min_roll_interval: Duration,
    /// Whether the caps on concurrent rolls leave room for this workload.
    pub roll_slot: RollSlot,
    /// The confirmation recorded in status (confirmedKeyId, confirmedWorkloadUid,
    /// confirmedRevision), complete or absent.
    pub previous: Option<Evidence>,
}

/// Whether a workload may roll now: the operator-wide cap (`--max-concurrent-rolls`) and its
/// ProvisioningKey's budget (`rotation.maxConcurrentRolls`) both leave room, or which is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RollSlot {
    Free,
    OperatorCap,
    /// The key's budget, this many workloads, is taken by workloads rolling now.
    KeyBudget(u32),
}

impl AgentInput {
    /// The recorded confirmation, while it still describes this workload: same uid, and same
    /// revision unless the revision is momentarily unknown (a spec change not yet observed by
    /// the workload's controller: its pods are still those the confirmation was measured on).
    /// A re-pointed PolicyAgent, a workload replaced under the same name or a new template
    /// revision drops it.
    pub fn standing(&self) -> Option<&Evidence> {
        self.previous.as_ref().filter(|e| {
            e.workload_uid == self.workload_uid
                && self
                    .current_revision
                    .as_ref()
                    .is_none_or(|r| *r == e.revision)
        })
    }
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write `kid` into the pod template.
    Roll { kid: String },
    /// Nothing to write; wait, with the reason.
    Wait {
        reason: &'static str,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Every pod is confirmed on the Secret's key: record the evidence.
    Confirmed { evidence: Evidence },
}

/// Pod counts for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pods not terminating.
    pub total: i32,
    /// Of those, pods of the current revision running the Secret's key (phase not Unknown).
    pub on_key: i32,
    /// Of those, ready pods that passed the required checks.
    pub confirmed: i32,
    pub terminating: i32,
    pub unknown: i32,
}

pub mod reasons {
    use crate::reason::Reason;

    pub const ROLL_DELAYED: &str = Reason::RolloutDelayed.as_str();
    pub const ROLL_QUEUED: &str = Reason::RolloutQueued.as_str();
    pub const ROLLING: &str = Reason::RolloutInProgress.as_str();
    pub const REVISION_UNKNOWN: &str = Reason::RevisionUnknown.as_str();
    pub const PODS_NOT_ON_KEY: &str = Reason::PodsNotOnKey.as_str();
    pub const CHECKS_PENDING: &str = Reason::ConnectivityPending.as_str();
    /// Pods on the key that no verifier has seen use it yet.
    pub const ACK_PENDING: &str = Reason::AcknowledgementPending.as_str();
    pub const CONFIRMED: &str = Reason::Confirmed.as_str();
    /// `Ready=True` while agents confirmed on a key roll to its successor.
    pub const KEY_ROTATION: &str = Reason::KeyRotationInProgress.as_str();
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Whether a pod runs the Secret's key on the current template revision.
fn on_key(input: &AgentInput, p: &PodObs) -> bool {
    !p.terminating
        && !p.unknown
        && p.kid.as_deref() == Some(input.secret_kid.as_str())
        && input.current_revision.is_some()
        && p.revision == input.current_revision
}

/// Counts pods: total (not terminating), on the Secret's key at the current revision, confirmed.
pub fn counts(input: &AgentInput) -> Counts {
    let live = input.pods.iter().filter(|p| !p.terminating);
    let on: Vec<&PodObs> = input.pods.iter().filter(|p| on_key(input, p)).collect();
    Counts {
        total: count(live.count()),
        on_key: count(on.len()),
        confirmed: count(on.iter().filter(|p| confirmed(input, p)).count()),
        terminating: count(input.pods.iter().filter(|p| p.terminating).count()),
        unknown: count(
            input
                .pods
                .iter()
                .filter(|p| p.unknown && !p.terminating)
                .count(),
        ),
    }
}

/// A pod on the key passed what the PolicyAgent requires: ready, its HTTP checks, and the
/// verifier's acknowledgement when required.
fn confirmed(input: &AgentInput, p: &PodObs) -> bool {
    p.ready && p.successes >= input.success_threshold && (!input.require_ack || p.acknowledged)
}

/// Pods whose connectivity is checked: ready pods of the current revision on the Secret's key,
/// once the template carries that key, in `Http` mode (threshold above 0).
pub fn probe_targets(input: &AgentInput) -> Vec<&PodObs> {
    if input.success_threshold == 0 || input.template_kid.as_deref() != Some(&input.secret_kid) {
        return Vec::new();
    }
    input
        .pods
        .iter()
        .filter(|p| on_key(input, p) && p.ready)
        .collect()
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn wait(reason: &'static str, message: String, retry_after: Option<Duration>) -> Decision {
    Decision::Wait {
        reason,
        message,
        retry_after,
    }
}

/// Rule 1: the template must carry the Secret's key; roll it there, paced by
/// `rollout.minInterval` and the operator-wide cap. `None` when the template carries it.
fn roll(input: &AgentInput, now: DateTime<Utc>) -> Option<Decision> {
    let kid = &input.secret_kid;
    if input.template_kid.as_deref() == Some(kid.as_str()) {
        return None;
    }
    if let Some(rolled) = input.rolled_at {
        let earliest = add(rolled, input.min_roll_interval);
        if now < earliest {
            return Some(wait(
                reasons::ROLL_DELAYED,
                format!(
                    "roll to key {kid} delayed by rollout.minInterval until {}",
                    earliest.to_rfc3339()
                ),
                (earliest - now).to_std().ok(),
            ));
        }
    }
    let queued = match input.roll_slot {
        RollSlot::Free => None,
        RollSlot::OperatorCap => Some(
            "the operator's cap on concurrent rolls (--max-concurrent-rolls) is reached".into(),
        ),
        RollSlot::KeyBudget(n) => Some(format!(
            "{n} workload(s) of this ProvisioningKey are rolling, its rotation.maxConcurrentRolls"
        )),
    };
    if let Some(why) = queued {
        return Some(wait(
            reasons::ROLL_QUEUED,
            format!("roll to key {kid} queued: {why}"),
            Some(Duration::from_secs(5)),
        ));
    }
    Some(Decision::Roll { kid: kid.clone() })
}

/// Every live pod runs the key at the current revision, none is terminating or Unknown, and
/// there is a pod unless none is desired (a workload scaled to zero).
fn all_on_key(input: &AgentInput, c: &Counts) -> bool {
    c.terminating == 0
        && c.unknown == 0
        && c.on_key == c.total
        && (c.total > 0 || input.figures.desired == 0)
}

/// Rule 2: the rollout by its kind's criteria.
fn rollout(input: &AgentInput, c: &Counts) -> Option<Decision> {
    match &input.rollout {
        Rollout::Complete => None,
        Rollout::Progressing(m) => Some(wait(
            reasons::ROLLING,
            m.clone(),
            Some(Duration::from_secs(2)),
        )),
        Rollout::Failed { reason, message } => {
            Some(wait(reason, message.clone(), Some(Duration::from_secs(30))))
        }
        // Paused, OnDelete or partitioned: that only matters while a pod still runs another
        // key. A workload whose pods all run the key is judged by its pods.
        Rollout::Stalled { reason, message } => (!all_on_key(input, c))
            .then(|| wait(reason, message.clone(), Some(Duration::from_secs(30)))),
    }
}

/// Rule 3: the pods: every live pod of the current revision on the key, none terminating or
/// Unknown (they may still run the key they started with), then every one checked.
fn pods(input: &AgentInput, c: &Counts) -> Option<Decision> {
    let kid = &input.secret_kid;
    let Some(revision) = input.current_revision.as_ref() else {
        return Some(wait(
            reasons::REVISION_UNKNOWN,
            "the workload's current template revision is not known yet".into(),
            Some(Duration::from_secs(2)),
        ));
    };
    if !all_on_key(input, c) {
        return Some(wait(
            reasons::PODS_NOT_ON_KEY,
            format!(
                "{} of {} pods run key {kid} at revision {revision}; {} terminating, {} in phase Unknown",
                c.on_key, c.total, c.terminating, c.unknown
            ),
            Some(Duration::from_secs(2)),
        ));
    }
    if input.require_ack {
        let on: Vec<&PodObs> = input.pods.iter().filter(|p| on_key(input, p)).collect();
        let acked = on.iter().filter(|p| p.acknowledged).count();
        let checked = on
            .iter()
            .filter(|p| p.ready && p.successes >= input.success_threshold)
            .count();
        if checked == on.len() && acked < on.len() {
            return Some(wait(
                reasons::ACK_PENDING,
                format!(
                    "{acked} of {} pods acknowledged by the keyward verifier on key {kid} (a request \
                     with this key id and the pod's own pod token)",
                    on.len()
                ),
                // Reports wake the PolicyAgent; this is only a backstop.
                Some(Duration::from_secs(15)),
            ));
        }
    }
    (c.confirmed < c.total).then(|| {
        wait(
            reasons::CHECKS_PENDING,
            format!(
                "{} of {} pods passed {} consecutive connectivity checks on key {kid}",
                c.confirmed, c.total, input.success_threshold
            ),
            None,
        )
    })
}

/// Decide, by an ordered list of rules (the first that asks for something wins). Never rolls a
/// workload whose template already runs the Secret's key, so restarts, resyncs and repeated
/// reconciles cause no extra rollout; a token refresh (same key id) never rolls.
pub fn decide(input: &AgentInput, now: DateTime<Utc>) -> Decision {
    let c = counts(input);
    roll(input, now)
        .or_else(|| rollout(input, &c))
        .or_else(|| pods(input, &c))
        .unwrap_or_else(|| Decision::Confirmed {
            evidence: Evidence {
                key_id: input.secret_kid.clone(),
                workload_uid: input.workload_uid.clone(),
                revision: input.current_revision.clone().unwrap_or_default(),
            },
        })
}
