//! What a PolicyAgent reconcile reports, pure: phase, conditions, the confirmation to record
//! and the Events to publish, from the decision (or the refusal) and its input.

use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;

use super::observe::Refusal;
use crate::api::PolicyAgent;
use crate::api::conditions::{self, condition};
use crate::api::policy_agent::{AgentHistoryEntry, PodCounts, PolicyAgentStatus, WorkloadRollout};
use crate::rotation::observe::{ts, ts_start};

/// History entries kept in status.
const HISTORY_LIMIT: usize = 10;
use super::{AgentInput, Counts, Decision, Evidence, Figures, Rollout, reasons};

/// `status.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Rolling,
    Confirming,
    Confirmed,
    Stalled,
    Invalid,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Rolling => "Rolling",
            Phase::Confirming => "Confirming",
            Phase::Confirmed => "Confirmed",
            Phase::Stalled => "Stalled",
            Phase::Invalid => "Invalid",
        }
    }
}

/// One condition as decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    fn new(status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Cond {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// What the reconcile found and did, for status, Events and the requeue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub phase: Phase,
    pub ready: Cond,
    pub connected: Cond,
    /// The confirmation to record (status.confirmedKeyId, confirmedWorkloadUid,
    /// confirmedRevision): a new one, or the recorded one while it still stands; never one
    /// measured on another workload or revision.
    pub evidence: Option<Evidence>,
    /// The key the workload is rolled to (the Secret's key).
    pub target: Option<String>,
    /// When the workload was rolled to the target.
    pub rolled_at: Option<DateTime<Utc>>,
    pub counts: Option<Counts>,
    /// Rollout figures and whether the rollout is complete.
    pub figures: Option<(Figures, bool)>,
    /// This reconcile rolled the workload: (from key, to key).
    pub rolled: Option<(Option<String>, String)>,
    pub requeue: Option<Duration>,
}

/// How often a confirmed agent is looked at again when nothing else wakes it.
pub const RECHECK: Duration = Duration::from_secs(60);
/// How soon a refused or waiting PolicyAgent looks again when nothing wakes it.
pub const RETRY: Duration = Duration::from_secs(10);

/// A refused PolicyAgent: nothing recorded, nothing rolled.
pub fn refused(r: &Refusal) -> Outcome {
    let phase = if r.is_warning() {
        Phase::Invalid
    } else {
        Phase::Pending
    };
    let cond = Cond::new(false, r.reason(), r.to_string());
    Outcome {
        phase,
        ready: cond.clone(),
        connected: cond,
        evidence: None,
        target: None,
        rolled_at: None,
        counts: None,
        figures: None,
        rolled: None,
        // An invalid spec changes only with the PolicyAgent (a watch event); anything else
        // (a claim given up, a key or workload created) may not wake this PolicyAgent.
        requeue: match r {
            Refusal::InvalidSpec(_) => None,
            _ => Some(RETRY),
        },
    }
}

/// The phase of a wait.
fn wait_phase(input: &AgentInput, reason: &str) -> Phase {
    match reason {
        reasons::ROLL_DELAYED | reasons::ROLL_QUEUED => Phase::Pending,
        reasons::ROLLING => Phase::Rolling,
        _ => match &input.rollout {
            Rollout::Stalled { reason: r, .. } | Rollout::Failed { reason: r, .. }
                if *r == reason =>
            {
                Phase::Stalled
            }
            _ => Phase::Confirming,
        },
    }
}

/// The outcome of a decision; `period` is the check period (the default wait).
pub fn outcome(
    input: &AgentInput,
    decision: &Decision,
    period: Duration,
    now: DateTime<Utc>,
) -> Outcome {
    let kid = &input.secret_kid;
    let counts = super::counts(input);
    let standing = input.standing().cloned();
    // The agents of this workload were confirmed on a key before (recorded in status): a roll
    // or a wait now is a rotation or a template change, during which they keep a trusted key
    // (the old key is revoked only once they confirm the new one), so the PolicyAgent stays
    // Ready (kstatus `Current`: Flux health checks pass during a rotation). Without it, this is
    // the first confirmation of the spec: Ready=False, and `Reconciling`.
    let was_confirmed = input
        .previous
        .as_ref()
        .filter(|e| e.workload_uid == input.workload_uid);
    let rotating = |message: &str| {
        was_confirmed.map(|e| {
            Cond::new(
                true,
                reasons::KEY_ROTATION,
                format!("agents were confirmed on key {}; {message}", e.key_id),
            )
        })
    };
    let base = Outcome {
        phase: Phase::Confirming,
        ready: Cond::new(false, "", ""),
        connected: Cond::new(false, "", ""),
        evidence: standing.clone(),
        target: Some(kid.clone()),
        rolled_at: None,
        figures: Some((input.figures.clone(), input.rollout == Rollout::Complete)),
        counts: Some(counts.clone()),
        rolled: None,
        requeue: None,
    };
    match decision {
        Decision::Roll { kid } => {
            let message = format!("rolling to key {kid}");
            Outcome {
                phase: Phase::Rolling,
                ready: rotating(&message).unwrap_or_else(|| {
                    Cond::new(standing.is_some(), "RolloutTriggered", message.clone())
                }),
                connected: Cond::new(false, "RolloutTriggered", message),
                rolled_at: Some(now),
                rolled: Some((input.template_kid.clone(), kid.clone())),
                requeue: Some(Duration::from_secs(1)),
                ..base
            }
        }
        Decision::Wait {
            reason,
            message,
            retry_after,
        } => {
            let on_current = standing.as_ref().is_some_and(|e| e.key_id == *kid);
            let phase = wait_phase(input, reason);
            Outcome {
                phase,
                ready: if on_current {
                    Cond::new(true, reasons::CONFIRMED, format!("confirmed on key {kid}"))
                } else if let Some(c) = rotating(message).filter(|_| phase != Phase::Stalled) {
                    c
                } else {
                    Cond::new(false, reason, message.clone())
                },
                connected: Cond::new(false, reason, message.clone()),
                // Only a roll to the Secret's key counts (confirmationTimeout runs from it).
                rolled_at: input
                    .rolled_at
                    .filter(|_| input.template_kid.as_deref() == Some(kid.as_str())),
                requeue: retry_after.or(Some(period)),
                ..base
            }
        }
        Decision::Confirmed { evidence } => {
            let connected = if counts.total == 0 {
                format!("no pods: the workload is scaled to zero; its template runs key {kid}")
            } else {
                format!(
                    "{} of {} pods connect with key {kid}",
                    counts.confirmed, counts.total
                )
            };
            Outcome {
                phase: Phase::Confirmed,
                ready: Cond::new(
                    true,
                    reasons::CONFIRMED,
                    format!("every pod is confirmed on key {kid}"),
                ),
                connected: Cond::new(true, reasons::CONFIRMED, connected),
                evidence: Some(evidence.clone()),
                rolled_at: input.rolled_at,
                requeue: Some(RECHECK),
                ..base
            }
        }
    }
}

/// The confirmation is new: recorded now, not before.
pub fn newly_confirmed(previous: Option<&Evidence>, o: &Outcome) -> Option<Evidence> {
    o.evidence.clone().filter(|e| Some(e) != previous)
}

/// A Warning Event is due: not ready for a reason the user must act on (an invalid spec, a
/// claimed workload, a rollout that will not finish by itself), and that reason is new.
pub fn warning_due(previous_ready_reason: Option<&str>, o: &Outcome) -> bool {
    matches!(o.phase, Phase::Invalid | Phase::Stalled)
        && !o.ready.status
        && previous_ready_reason != Some(o.ready.reason)
}

/// Status history: a roll adds an entry, a new confirmation completes it (bounded, newest first).
fn history(
    previous: &PolicyAgentStatus,
    o: &Outcome,
    newly: Option<&Evidence>,
    now: DateTime<Utc>,
) -> Vec<AgentHistoryEntry> {
    let mut h = previous.history.clone();
    if let Some((_, kid)) = o.rolled.as_ref() {
        h.insert(
            0,
            AgentHistoryEntry {
                kid: kid.clone(),
                rolled_at: Some(ts_start(now)),
                ..Default::default()
            },
        );
    }
    if let Some(e) = newly {
        let pods = o.counts.as_ref().map(|c| c.confirmed);
        let confirmed = |entry: &mut AgentHistoryEntry| {
            entry.confirmed_at = Some(ts(now));
            entry.confirmed_workload_uid = Some(e.workload_uid.clone());
            entry.confirmed_revision = Some(e.revision.clone());
            entry.pods = pods;
        };
        match h
            .iter_mut()
            .find(|entry| entry.kid == e.key_id && entry.confirmed_at.is_none())
        {
            Some(entry) => confirmed(entry),
            None => {
                let mut entry = AgentHistoryEntry {
                    kid: e.key_id.clone(),
                    ..Default::default()
                };
                confirmed(&mut entry);
                h.insert(0, entry);
            }
        }
    }
    h.truncate(HISTORY_LIMIT);
    h
}

/// The status to write: only what changed moves (conditions keep `lastTransitionTime`,
/// `confirmedAt` stays while the confirmation stands), so a settled PolicyAgent writes nothing.
pub fn status(
    pa: &PolicyAgent,
    previous: &PolicyAgentStatus,
    o: &Outcome,
    now: DateTime<Utc>,
) -> PolicyAgentStatus {
    let generation = pa.meta().generation;
    let now_t = Time(
        k8s_openapi::jiff::Timestamp::from_second(now.timestamp())
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    );
    let recorded = super::observe::recorded(Some(previous));
    let newly = newly_confirmed(recorded.as_ref(), o);
    let confirmed_at = if newly.is_some() {
        Some(ts(now))
    } else {
        previous
            .confirmed_at
            .clone()
            .filter(|_| o.evidence.is_some())
    };
    let cond = |type_: &str, c: &Cond| {
        condition(
            &previous.conditions,
            type_,
            c.status,
            c.reason,
            c.message.clone(),
            generation,
            now_t.clone(),
        )
    };
    // kstatus: Stalled when a human must act (an invalid spec, a claimed workload, a rollout
    // that will not finish); Reconciling while the spec waits for its first confirmation.
    let needs_human = matches!(o.phase, Phase::Invalid | Phase::Stalled) && !o.ready.status;
    let stalled = if needs_human {
        Cond::new(true, o.ready.reason, o.ready.message.clone())
    } else {
        Cond::new(false, crate::rotation::reasons::IDLE, "not stalled")
    };
    let reconciling = if !o.ready.status && !needs_human {
        Cond::new(true, o.ready.reason, o.ready.message.clone())
    } else {
        Cond::new(
            false,
            conditions::reasons::RECONCILED,
            format!(
                "generation {} has been acted on",
                generation.unwrap_or_default()
            ),
        )
    };
    PolicyAgentStatus {
        phase: Some(o.phase.as_str().to_string()),
        confirmed_key_id: o.evidence.as_ref().map(|e| e.key_id.clone()),
        confirmed_at,
        confirmed_workload_uid: o.evidence.as_ref().map(|e| e.workload_uid.clone()),
        confirmed_revision: o.evidence.as_ref().map(|e| e.revision.clone()),
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
        history: history(previous, o, newly.as_ref(), now),
        conditions: vec![
            cond(conditions::READY, &o.ready),
            cond(conditions::CONNECTED, &o.connected),
            cond(conditions::RECONCILING, &reconciling),
            cond(conditions::STALLED, &stalled),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::PodObs;
    use chrono::TimeZone;

    fn input(template: &str, previous: Option<Evidence>, rollout: Rollout) -> AgentInput {
        AgentInput {
            secret_kid: "K2".into(),
            template_kid: Some(template.into()),
            workload_uid: "w1".into(),
            current_revision: Some("r2".into()),
            rollout,
            figures: Figures {
                desired: 1,
                ..Figures::default()
            },
            pods: vec![PodObs {
                name: "a".into(),
                uid: "a".into(),
                kid: Some("K1".into()),
                revision: Some("r1".into()),
                terminating: false,
                unknown: false,
                ready: true,
                successes: 0,
                acknowledged: false,
            }],
            success_threshold: 0,
            require_ack: false,
            rolled_at: None,
            min_roll_interval: Duration::ZERO,
            roll_slot: crate::agent::RollSlot::Free,
            previous,
        }
    }

    fn ev(kid: &str, uid: &str, rev: &str) -> Evidence {
        Evidence {
            key_id: kid.into(),
            workload_uid: uid.into(),
            revision: rev.into(),
        }
    }

    #[test]
    fn phases_conditions_and_the_recorded_confirmation() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let p = Duration::from_secs(2);
        let paused = Rollout::Stalled {
            reason: "DeploymentPaused",
            message: "paused".into(),
        };
        // Rolling from K1 (confirmed at this revision): the confirmation on K1 stands.
        let i = input("K1", Some(ev("K1", "w1", "r2")), Rollout::Complete);
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(o.phase, Phase::Rolling);
        assert_eq!(o.rolled, Some((Some("K1".into()), "K2".into())));
        assert_eq!(o.evidence, Some(ev("K1", "w1", "r2")));
        // Paused on the way: Stalled; a confirmation of another revision is dropped.
        let i = input("K2", Some(ev("K1", "w1", "r1")), paused.clone());
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(o.phase, Phase::Stalled);
        assert_eq!(o.evidence, None);
        assert!(!o.ready.status && o.ready.reason == "DeploymentPaused");
        assert!(warning_due(Some("Confirmed"), &o));
        assert!(
            !warning_due(Some("DeploymentPaused"), &o),
            "once per reason"
        );
        // A confirmation of another workload (re-pointed, replaced) never carries over.
        let i = input(
            "K2",
            Some(ev("K2", "w0", "r2")),
            Rollout::Progressing("m".into()),
        );
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!((o.phase, o.evidence), (Phase::Rolling, None));
        // Confirmed: the new evidence, once.
        let mut i = input("K2", Some(ev("K1", "w1", "r1")), Rollout::Complete);
        i.pods[0].kid = Some("K2".into());
        i.pods[0].revision = Some("r2".into());
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(o.phase, Phase::Confirmed);
        assert_eq!(
            newly_confirmed(i.previous.as_ref(), &o),
            Some(ev("K2", "w1", "r2"))
        );
        assert_eq!(newly_confirmed(Some(&ev("K2", "w1", "r2")), &o), None);
        // Refusals record nothing.
        let o = refused(&Refusal::WorkloadClaimed {
            kind: "Deployment".into(),
            name: "opa".into(),
            owner: "zz".into(),
        });
        assert_eq!((o.phase, o.evidence.clone()), (Phase::Invalid, None));
        assert!(warning_due(None, &o));
        let o = refused(&Refusal::WorkloadNotFound {
            kind: "Deployment".into(),
            name: "opa".into(),
            namespace: "ns".into(),
        });
        assert_eq!(o.phase, Phase::Pending);
        assert!(!warning_due(None, &o));
    }

    /// kstatus: agents confirmed on a key stay Ready while they roll to its successor (a
    /// rotation is not `Reconciling`); a first confirmation is `Reconciling`; a rollout that
    /// cannot finish or a refused spec is `Stalled`; conditions carry the generation.
    #[test]
    fn kstatus_conditions() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let p = Duration::from_secs(2);
        let mut pa = PolicyAgent::new("opa-agents", Default::default());
        pa.metadata.generation = Some(2);
        let conds = |o: &Outcome| {
            let s = status(&pa, &PolicyAgentStatus::default(), o, now);
            assert_eq!(s.observed_generation, Some(2));
            let c = |t: &str| {
                let c = s.conditions.iter().find(|c| c.type_ == t).expect(t);
                assert_eq!(c.observed_generation, Some(2), "{t}");
                (c.status.clone(), c.reason.clone())
            };
            (
                c("Ready").0,
                c("Reconciling").0,
                c("Stalled").0,
                c("Ready").1,
            )
        };
        let t = |r: &str, rec: &str, st: &str| (r.to_string(), rec.to_string(), st.to_string());
        let three = |c: (String, String, String, String)| (c.0, c.1, c.2);

        // Rolling from K1 to K2, then waiting for the rollout: Ready throughout.
        let i = input("K1", Some(ev("K1", "w1", "r2")), Rollout::Complete);
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(o.phase, Phase::Rolling);
        assert_eq!(three(conds(&o)), t("True", "False", "False"));
        let i = input(
            "K2",
            Some(ev("K1", "w1", "r1")),
            Rollout::Progressing("m".into()),
        );
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(o.phase, Phase::Rolling);
        let c = conds(&o);
        assert_eq!(c.3, reasons::KEY_ROTATION);
        assert_eq!(three(c), t("True", "False", "False"));
        assert!(
            !o.connected.status,
            "Connected tells the roll is not confirmed"
        );

        // Paused on the way: not Ready, Stalled.
        let paused = Rollout::Stalled {
            reason: "DeploymentPaused",
            message: "paused".into(),
        };
        let i = input("K2", Some(ev("K1", "w1", "r1")), paused);
        let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
        assert_eq!(three(conds(&o)), t("False", "False", "True"));

        // A new PolicyAgent (or one re-pointed at another workload): Reconciling until its
        // first confirmation.
        for previous in [None, Some(ev("K1", "w0", "r1"))] {
            let i = input("K2", previous, Rollout::Progressing("m".into()));
            let o = outcome(&i, &crate::agent::decide(&i, now), p, now);
            assert_eq!(three(conds(&o)), t("False", "True", "False"));
        }

        // Refused: an invalid spec is Stalled; a missing key is waited for.
        let o = refused(&Refusal::InvalidSpec("bad".into()));
        assert_eq!(three(conds(&o)), t("False", "False", "True"));
        let o = refused(&Refusal::ProvisioningKeyNotFound {
            name: "k".into(),
            namespace: "ns".into(),
        });
        assert_eq!(three(conds(&o)), t("False", "True", "False"));
    }
}
