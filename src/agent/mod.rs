//! The PolicyAgent decision, pure: is the workload's rollout complete by the exact criteria of its
//! kind, should it roll, and is every agent pod confirmed on the key the Secret carries?

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

/// A workload's rollout, judged by the criteria of its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    /// Still moving; the message says what is awaited.
    Progressing(String),
    /// Will not finish by itself (deadline exceeded): fail fast.
    Failed {
        reason: &'static str,
        message: String,
    },
    /// Configured not to roll by itself (paused, OnDelete, partition): never waited on silently.
    Stalled {
        reason: &'static str,
        message: String,
    },
}

/// Rollout figures for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures {
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
}

fn progressing(what: &str, figures: &Figures) -> Rollout {
    Rollout::Progressing(format!(
        "{what}: {} of {} updated, {} ready, {} available",
        figures.updated, figures.desired, figures.ready, figures.available
    ))
}

/// Deployment: complete when the controller observed the latest generation and every replica is
/// updated and available, with no old replica left (`status.replicas == updatedReplicas`).
pub fn deployment(d: &Deployment) -> (Rollout, Figures) {
    let spec = d.spec.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1);
    let f = Figures {
        desired,
        updated: st.updated_replicas.unwrap_or(0),
        ready: st.ready_replicas.unwrap_or(0),
        available: st.available_replicas.unwrap_or(0),
    };
    if spec.paused == Some(true) {
        return (
            Rollout::Stalled {
                reason: "DeploymentPaused",
                message: "the Deployment is paused; resume it to roll the agents".into(),
            },
            f,
        );
    }
    if let Some(c) = st
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
        && c.status == "False"
        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    {
        return (
            Rollout::Failed {
                reason: "ProgressDeadlineExceeded",
                message: c
                    .message
                    .clone()
                    .unwrap_or_else(|| "progress deadline exceeded".into()),
            },
            f,
        );
    }
    let observed = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let complete = observed
        && f.updated == desired
        && st.replicas.unwrap_or(0) == f.updated
        && f.available == desired;
    if complete {
        (Rollout::Complete, f)
    } else {
        (progressing("Deployment rolling", &f), f)
    }
}

/// StatefulSet: `OnDelete` and a partition never finish by themselves; otherwise complete when
/// `currentRevision == updateRevision` and every replica is updated and ready.
pub fn stateful_set(s: &StatefulSet) -> (Rollout, Figures) {
    let spec = s.spec.clone().unwrap_or_default();
    let st = s.status.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1);
    let f = Figures {
        desired,
        updated: st.updated_replicas.unwrap_or(0),
        ready: st.ready_replicas.unwrap_or(0),
        available: st
            .available_replicas
            .unwrap_or(st.ready_replicas.unwrap_or(0)),
    };
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() == Some("OnDelete") {
        return (
            Rollout::Stalled { reason: "OnDeleteStrategy", message: "the StatefulSet uses updateStrategy OnDelete; its pods must be deleted to pick up the new key".into() },
            f,
        );
    }
    if let Some(p) = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .filter(|p| *p > 0)
    {
        return (
            Rollout::Stalled {
                reason: "Partitioned",
                message: format!(
                    "the StatefulSet's rollingUpdate.partition is {p}; pods below it keep the old key"
                ),
            },
            f,
        );
    }
    let observed = st.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(0);
    let revisions = st.update_revision.is_some() && st.current_revision == st.update_revision;
    let complete = observed
        && revisions
        && f.updated == desired
        && f.ready == desired
        && st.replicas == desired;
    if complete {
        (Rollout::Complete, f)
    } else {
        (progressing("StatefulSet rolling", &f), f)
    }
}

/// DaemonSet: `OnDelete` never finishes by itself; otherwise complete when every scheduled pod is
/// updated and available.
pub fn daemon_set(d: &DaemonSet) -> (Rollout, Figures) {
    let spec = d.spec.clone().unwrap_or_default();
    let st = d.status.clone().unwrap_or_default();
    let f = Figures {
        desired: st.desired_number_scheduled,
        updated: st.updated_number_scheduled.unwrap_or(0),
        ready: st.number_ready,
        available: st.number_available.unwrap_or(0),
    };
    if spec.update_strategy.and_then(|s| s.type_).as_deref() == Some("OnDelete") {
        return (
            Rollout::Stalled { reason: "OnDeleteStrategy", message: "the DaemonSet uses updateStrategy OnDelete; its pods must be deleted to pick up the new key".into() },
            f,
        );
    }
    let observed = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let complete = observed
        && f.updated == f.desired
        && f.available == f.desired
        && st.number_misscheduled == 0;
    if complete {
        (Rollout::Complete, f)
    } else {
        (progressing("DaemonSet rolling", &f), f)
    }
}

/// One agent pod as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodObs {
    pub name: String,
    pub uid: String,
    /// The key id in the pod's annotations (copied from the pod template at creation).
    pub kid: Option<String>,
    pub terminating: bool,
    pub ready: bool,
    /// Consecutive successful connectivity checks since the pod started.
    pub successes: u32,
}

/// Everything the PolicyAgent decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInput {
    /// The key id the agent Secret carries now (read from the Secret itself).
    pub secret_kid: String,
    /// The key id in the workload's pod template.
    pub template_kid: Option<String>,
    pub rollout: Rollout,
    pub pods: Vec<PodObs>,
    /// Required consecutive successes per pod; 0 means rollout-only.
    pub success_threshold: u32,
    /// When Keyward last rolled this workload.
    pub rolled_at: Option<DateTime<Utc>>,
    pub min_roll_interval: Duration,
    /// Whether the operator-wide cap on concurrent rolls leaves room for this workload.
    pub roll_slot_free: bool,
    /// The key id this agent was last confirmed on.
    pub confirmed_kid: Option<String>,
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentStep {
    /// Write `kid` into the pod template.
    Roll { kid: String },
    /// Nothing to write; wait (with the reason) or done.
    Wait {
        reason: &'static str,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Every pod is confirmed on `kid`.
    Confirmed { kid: String },
}

/// Pod counts for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: i32,
    pub on_key: i32,
    pub confirmed: i32,
}

pub mod reasons {
    pub const ROLL_DELAYED: &str = "RolloutDelayed";
    pub const ROLL_QUEUED: &str = "RolloutQueued";
    pub const ROLLING: &str = "RolloutInProgress";
    pub const PODS_NOT_ON_KEY: &str = "PodsNotOnKey";
    pub const CHECKS_PENDING: &str = "ConnectivityPending";
    pub const CONFIRMED: &str = "Confirmed";
}

/// Counts pods: total (not terminating), on the Secret's key, confirmed.
pub fn counts(input: &AgentInput) -> Counts {
    let live: Vec<&PodObs> = input.pods.iter().filter(|p| !p.terminating).collect();
    let on_key: Vec<&&PodObs> = live
        .iter()
        .filter(|p| p.kid.as_deref() == Some(input.secret_kid.as_str()))
        .collect();
    let confirmed = on_key
        .iter()
        .filter(|p| p.ready && p.successes >= input.success_threshold)
        .count();
    Counts {
        total: i32::try_from(live.len()).unwrap_or(i32::MAX),
        on_key: i32::try_from(on_key.len()).unwrap_or(i32::MAX),
        confirmed: i32::try_from(confirmed).unwrap_or(i32::MAX),
    }
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Decide. Never rolls a workload whose template already runs the Secret's key, so restarts,
/// resyncs and repeated reconciles cause no extra rollout; a token refresh (same key id) never rolls.
pub fn decide(input: &AgentInput, now: DateTime<Utc>) -> AgentStep {
    let kid = &input.secret_kid;
    if input.template_kid.as_deref() != Some(kid.as_str()) {
        if let Some(rolled) = input.rolled_at {
            let earliest = add(rolled, input.min_roll_interval);
            if now < earliest {
                return AgentStep::Wait {
                    reason: reasons::ROLL_DELAYED,
                    message: format!(
                        "roll to key {kid} delayed by rollout.minInterval until {}",
                        earliest.to_rfc3339()
                    ),
                    retry_after: (earliest - now).to_std().ok(),
                };
            }
        }
        if !input.roll_slot_free {
            return AgentStep::Wait {
                reason: reasons::ROLL_QUEUED,
                message: format!(
                    "roll to key {kid} queued: the operator's cap on concurrent rolls is reached"
                ),
                retry_after: Some(Duration::from_secs(5)),
            };
        }
        return AgentStep::Roll { kid: kid.clone() };
    }
    match &input.rollout {
        Rollout::Complete => {}
        Rollout::Progressing(m) => {
            return AgentStep::Wait {
                reason: reasons::ROLLING,
                message: m.clone(),
                retry_after: Some(Duration::from_secs(2)),
            };
        }
        Rollout::Failed { reason, message } => {
            return AgentStep::Wait {
                reason,
                message: message.clone(),
                retry_after: Some(Duration::from_secs(30)),
            };
        }
        Rollout::Stalled { reason, message } => {
            // Paused, OnDelete or partitioned: that only matters while a pod still runs another
            // key. A workload whose pods all run the key is judged by its pods.
            let c = counts(input);
            let all_on_key =
                c.total > 0 && c.on_key == c.total && input.pods.iter().all(|p| !p.terminating);
            if !all_on_key {
                return AgentStep::Wait {
                    reason,
                    message: message.clone(),
                    retry_after: Some(Duration::from_secs(30)),
                };
            }
        }
    }
    let c = counts(input);
    let terminating = input.pods.iter().filter(|p| p.terminating).count();
    if terminating > 0 || c.on_key < c.total || c.total == 0 {
        return AgentStep::Wait {
            reason: reasons::PODS_NOT_ON_KEY,
            message: format!(
                "{} of {} pods run key {kid}; {terminating} terminating",
                c.on_key, c.total
            ),
            retry_after: Some(Duration::from_secs(2)),
        };
    }
    if c.confirmed < c.total {
        return AgentStep::Wait {
            reason: reasons::CHECKS_PENDING,
            message: format!(
                "{} of {} pods passed {} consecutive connectivity checks on key {kid}",
                c.confirmed, c.total, input.success_threshold
            ),
            retry_after: None,
        };
    }
    AgentStep::Confirmed { kid: kid.clone() }
}

/// Pod annotations as a map helper.
pub fn pod_kid(annotations: Option<&BTreeMap<String, String>>) -> Option<String> {
    annotations
        .and_then(|a| a.get(crate::labels::KEY_ID))
        .cloned()
}
