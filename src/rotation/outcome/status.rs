//! The status a reconcile reports, and its kstatus conditions.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;

use super::{HISTORY_LIMIT, UNCOVERED_NAMED, UNRECORDED, jiff_from, last_used};
use crate::api::conditions::{self, condition};
use crate::api::provisioning_key::{
    HistoryEntry, KeyInfo, ProvisioningKey, ProvisioningKeyStatus, RevokedKey, TrustedKey,
    UncoveredConsumers,
};
use crate::rotation::observe::ts;
use crate::rotation::{self, AgentSecretObs, KeyState, Observed, ObservedKey, Plan};

/// What every condition of one report is built with: the previous conditions (whose
/// `lastTransitionTime` is kept when the status does not change), the generation and the time.
struct Conds<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Time,
}

impl Conds<'_> {
    fn set(
        &self,
        type_: &str,
        status: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Condition {
        condition(
            self.previous,
            type_,
            status,
            reason,
            message,
            self.generation,
            self.now.clone(),
        )
    }
}

/// The status a reconcile reports; pure, and the same on every reconcile of a settled object.
pub fn desired_status(
    pk: &ProvisioningKey,
    settings: &rotation::Settings,
    obs: &Observed,
    plan: &Plan,
    now: DateTime<Utc>,
) -> ProvisioningKeyStatus {
    let previous = pk.status.clone().unwrap_or_default().conditions;
    let generation = pk.meta().generation;
    let c = Conds {
        previous: &previous,
        generation,
        now: Time(jiff_from(now)),
    };
    let cur = rotation::current(&obs.keys);
    let handed_out = matches!(&obs.agent_secret, AgentSecretObs::Owned(s) if cur.is_some_and(|c| s.kid.as_deref() == Some(c.kid.as_str())));
    ProvisioningKeyStatus {
        phase: Some(plan.phase.as_str().to_string()),
        current_key: cur.map(|c| KeyInfo {
            kid: c.kid.clone(),
            fingerprint: c.fingerprint.clone(),
            created_at: Some(ts(c.created_at)),
            activated_at: c.activated_at.map(ts),
        }),
        trusted_keys: trusted_keys(obs, plan),
        uncovered_consumers: uncovered_consumers(obs),
        revoked_keys: revoked_keys(obs, settings),
        next_rotation_at: plan.next_rotation_at.map(ts),
        token_refresh_at: plan.token_refresh_at.map(ts),
        observed_generation: generation,
        conditions: vec![
            ready(&c, plan, cur, handed_out),
            reconciling(&c, plan, cur, handed_out),
            rotating(&c, plan),
            stalled(&c, plan),
        ],
        history: history(obs),
        // The record as stored, or a key's first record, which this status write carries.
        trust_record: plan
            .record
            .as_ref()
            .map(crate::trust_record::TrustRecord::render)
            .or_else(|| pk.status.as_ref().and_then(|s| s.trust_record.clone())),
    }
}

fn ready(c: &Conds<'_>, plan: &Plan, cur: Option<&ObservedKey>, handed_out: bool) -> Condition {
    match (&plan.blocked, cur) {
        (Some(why), _) => c.set(conditions::READY, false, why.reason, why.message.clone()),
        (None, Some(k)) if handed_out => c.set(
            conditions::READY,
            true,
            rotation::reasons::KEY_ACTIVE,
            format!("key {} is current and handed out", k.kid),
        ),
        _ => c.set(
            conditions::READY,
            false,
            rotation::reasons::MINTING,
            "the first key is being minted and handed out",
        ),
    }
}

/// Reconciling (kstatus): only while the spec has not been acted on yet, that is while a new
/// ProvisioningKey has no key handed out. A rotation (scheduled, requested by a new
/// `requestToken`, emergency) is reported by `Rotating`, never here.
fn reconciling(
    c: &Conds<'_>,
    plan: &Plan,
    cur: Option<&ObservedKey>,
    handed_out: bool,
) -> Condition {
    if plan.blocked.is_none() && !(cur.is_some() && handed_out) {
        c.set(
            conditions::RECONCILING,
            true,
            rotation::reasons::MINTING,
            "the first key is being minted and handed out",
        )
    } else {
        c.set(
            conditions::RECONCILING,
            false,
            conditions::reasons::RECONCILED,
            format!(
                "generation {} has been acted on",
                c.generation.unwrap_or_default()
            ),
        )
    }
}

fn rotating(c: &Conds<'_>, plan: &Plan) -> Condition {
    match &plan.rotating {
        Some(why) => c.set(conditions::ROTATING, true, why.reason, why.message.clone()),
        None => c.set(
            conditions::ROTATING,
            false,
            rotation::reasons::IDLE,
            "no rotation in flight",
        ),
    }
}

fn stalled(c: &Conds<'_>, plan: &Plan) -> Condition {
    match (&plan.blocked, &plan.stalled) {
        (Some(why), _) | (None, Some(why)) => {
            c.set(conditions::STALLED, true, why.reason, why.message.clone())
        }
        (None, None) => c.set(
            conditions::STALLED,
            false,
            rotation::reasons::IDLE,
            "not stalled",
        ),
    }
}

/// The keys the trust bundle lists: those a key Secret records, then the unrecorded ones.
fn trusted_keys(obs: &Observed, plan: &Plan) -> Vec<TrustedKey> {
    obs.keys
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
        .collect()
}

fn uncovered_consumers(obs: &Observed) -> Option<UncoveredConsumers> {
    obs.uncovered
        .as_ref()
        .filter(|u| !u.is_empty())
        .map(|u| UncoveredConsumers {
            count: i32::try_from(u.len()).unwrap_or(i32::MAX),
            workloads: rotation::uncovered_workloads(u)
                .into_iter()
                .take(UNCOVERED_NAMED)
                .collect(),
        })
}

fn revoked_keys(obs: &Observed, settings: &rotation::Settings) -> Vec<RevokedKey> {
    obs.keys
        .iter()
        .rev()
        .filter(|k| k.state.revoked())
        .map(|k| {
            let deactivated = k.state == KeyState::Deactivated;
            RevokedKey {
                kid: k.kid.clone(),
                state: Some(k.state.display().to_string()),
                revoked_at: k.deactivated_at.or(k.revoked_at).map(ts),
                destroy_at: k
                    .deactivated_at
                    .filter(|_| deactivated)
                    .and_then(|t| {
                        chrono::Duration::from_std(settings.retain_deactivated_for)
                            .ok()
                            .and_then(|d| t.checked_add_signed(d))
                    })
                    .map(ts),
                destroyed_at: k.revoked_at.filter(|_| !deactivated).map(ts),
            }
        })
        .collect()
}

fn history(obs: &Observed) -> Vec<HistoryEntry> {
    obs.keys
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
            deactivated_at: k.deactivated_at.map(ts),
            reactivated_at: k.reactivated_at.map(ts),
            revoked_at: k.revoked_at.map(ts),
        })
        .collect()
}

/// The status of a failed reconcile: the error (`reason`, `message`) in `Ready`; a new
/// generation that could not be acted on `Reconciling` (kstatus) until a reconcile succeeds;
/// with `stalls` (a name owned by someone else, which needs a human) `Stalled`. Everything else
/// is kept as it was.
pub fn failed_status(
    pk: &ProvisioningKey,
    reason: &str,
    message: String,
    stalls: bool,
    now: DateTime<Utc>,
) -> ProvisioningKeyStatus {
    let previous = pk.status.clone().unwrap_or_default();
    let generation = pk.meta().generation;
    let c = Conds {
        previous: &previous.conditions,
        generation,
        now: Time(jiff_from(now)),
    };
    let mut status = previous.clone();
    let ready = c.set(conditions::READY, false, reason, message.clone());
    status.conditions.retain(|c| c.type_ != conditions::READY);
    status.conditions.insert(0, ready);
    if previous.observed_generation != generation {
        let reconciling = c.set(
            conditions::RECONCILING,
            true,
            conditions::reasons::RECONCILE_FAILED,
            format!(
                "generation {} is not applied yet: {}",
                generation.unwrap_or_default(),
                message
            ),
        );
        status
            .conditions
            .retain(|c| c.type_ != conditions::RECONCILING);
        status.conditions.insert(1, reconciling);
    }
    if stalls {
        let stalled = c.set(conditions::STALLED, true, reason, message);
        status.conditions.retain(|c| c.type_ != conditions::STALLED);
        status.conditions.push(stalled);
    }
    status.observed_generation = generation;
    status
}
