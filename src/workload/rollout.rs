//! A workload's rollout judged by the exact criteria of its kind (pure): complete,
//! progressing, failed or stalled, with the figures shown in status.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

use crate::reason::Reason;

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
                reason: Reason::DeploymentPaused.as_str(),
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
        && c.reason.as_deref() == Some(Reason::ProgressDeadlineExceeded.as_str())
    {
        return (
            Rollout::Failed {
                reason: Reason::ProgressDeadlineExceeded.as_str(),
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
            Rollout::Stalled { reason: Reason::OnDeleteStrategy.as_str(), message: "the StatefulSet uses updateStrategy OnDelete; its pods must be deleted to pick up the new key".into() },
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
                reason: Reason::Partitioned.as_str(),
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
            Rollout::Stalled { reason: Reason::OnDeleteStrategy.as_str(), message: "the DaemonSet uses updateStrategy OnDelete; its pods must be deleted to pick up the new key".into() },
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
