//! Metrics, pure: what an applied step adds to the counters, and the per-key gauges a report
//! sets (labels are the trigger, result and kind only, never a key id).

use super::{cond, find};
use crate::api::conditions;
use crate::api::provisioning_key::ProvisioningKeyStatus;
use crate::rotation::snapshot::Read;
use crate::rotation::{self, AgentSecretObs, KeyState, Observed, Plan, Step, Trigger};

/// The outcome of a rotation recorded in `keyward_rotations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationResult {
    /// A new key was minted (its Secret created) for the trigger.
    Started,
    /// The last key the new one superseded was revoked: every agent confirmed the new key (or,
    /// for `Compromised`, the compromised keys were revoked at once).
    Completed,
    /// The rotation became `Stalled` (agents did not confirm the new key in time).
    Stalled,
}

impl RotationResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RotationResult::Started => "started",
            RotationResult::Completed => "completed",
            RotationResult::Stalled => "stalled",
        }
    }
}

/// What the report step of a ProvisioningKey reconcile knows about the key, for its gauges.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyGauges {
    /// `exp` (Unix seconds) of the token in the agent Secret, if it holds one.
    pub token_expiration: Option<i64>,
    /// When the next scheduled rotation is due (Unix seconds), if one is scheduled.
    pub next_rotation: Option<i64>,
    /// The `Ready` condition's status: `True`, `False` or `Unknown`.
    pub ready: &'static str,
    pub stalled: bool,
    /// Stalled because `revokeWhenUnusedFor` cannot be judged (`VerifierSilent`).
    pub verifier_silent: bool,
    /// PolicyAgents referencing the key, and those confirmed on its current key.
    pub agents_total: usize,
    pub agents_confirmed: usize,
    /// Keys deactivated and not yet destroyed (reactivatable).
    pub deactivated: usize,
}

/// One counter increment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Rotation(Trigger, RotationResult),
    Revocation {
        emergency: bool,
    },
    /// A key's lifecycle transition: `deactivated`, `reactivated` or `destroyed`.
    Lifecycle(&'static str),
    BundleTampered,
}

/// The counters an applied step adds: a mint that created a key starts a rotation of its
/// trigger; a revocation counts by kind, and completes the rotation of the current key when
/// it leaves no superseded key (nor, in an emergency, a compromised key) to revoke.
pub fn step_counts(read: &Read, step: &Step, minted: bool) -> Vec<Counted> {
    let obs = &read.observed;
    match step {
        Step::Mint { trigger, .. } if minted => {
            vec![Counted::Rotation(*trigger, RotationResult::Started)]
        }
        Step::Reactivate { .. } => vec![Counted::Lifecycle("reactivated")],
        Step::Destroy {
            emergency: false,
            seq,
        } if find(obs, *seq).is_some_and(|k| k.state == KeyState::Deactivated) => {
            // Its revocation was counted when it was deactivated.
            vec![Counted::Lifecycle("destroyed")]
        }
        Step::Deactivate { seq } | Step::Destroy { seq, .. } => {
            let emergency = matches!(
                step,
                Step::Destroy {
                    emergency: true,
                    ..
                }
            );
            let mut counts = vec![
                Counted::Revocation { emergency },
                Counted::Lifecycle(if matches!(step, Step::Deactivate { .. }) {
                    "deactivated"
                } else {
                    "destroyed"
                }),
            ];
            let left = obs.keys.iter().any(|k| {
                k.seq != *seq
                    && (k.state == KeyState::Retiring
                        || (!k.state.revoked() && read.settings.compromised.contains(&k.kid)))
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

/// The per-key gauges, from the status a report computed and what it observed.
pub fn key_gauges(status: &ProvisioningKeyStatus, obs: &Observed, plan: &Plan) -> KeyGauges {
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
        deactivated: obs
            .keys
            .iter()
            .filter(|k| k.state == KeyState::Deactivated)
            .count(),
    }
}
