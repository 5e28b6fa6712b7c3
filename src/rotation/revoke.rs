//! Revocation of a retiring key, only on evidence: confirmations of every PolicyAgent, the time
//! fallback for consumers no PolicyAgent covers, and `revokeWhenUnusedFor` from the verifiers'
//! reports. The `confirm, hold, revoke` rule of [`super::rules`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;

/// `"; the scheduled rotation is overdue since <t>"` when `scheduled` has passed.
pub(super) fn overdue(scheduled: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match scheduled {
        Some(due) if due <= now => {
            format!(
                "; the scheduled rotation is overdue since {}",
                due.to_rfc3339()
            )
        }
        _ => String::new(),
    }
}

/// Step 7: may the retiring key `old` be revoked now that `cur` is handed out?
///
/// - Every PolicyAgent that references the key must be confirmed on `cur` (the mapping from
///   objects checked that evidence against the workload's identity and the agent's generation).
/// - Consumers no PolicyAgent covers have no evidence: the time fallback applies to them. The
///   old key waits `overlap` from the hand-out and, when sealed (agents hold tokens, never the
///   private key), until the last token it signed has expired plus the allowed clock skew: a pod that
///   read its token once at start then holds no valid token of the old key.
/// - With no PolicyAgent and no consumer in sight, `overlap` from the hand-out (agents outside
///   the cluster are covered by `overlap` alone).
#[allow(clippy::too_many_arguments)]
pub(super) fn revocation(
    mut p: Plan,
    settings: &Settings,
    obs: &Observed,
    cur: &ObservedKey,
    old: &ObservedKey,
    handed_out_at: DateTime<Utc>,
    pending_request: Option<Trigger>,
    now: DateTime<Utc>,
) -> Plan {
    let retired_at = old.retired_at.unwrap_or(now);
    let start = retired_at.max(handed_out_at);
    let queued = match pending_request {
        Some(t) => format!(
            "; a {} rotation is queued until this one completes",
            t.as_str()
        ),
        None => String::new(),
    };
    let scheduled = schedule::rotation_due(settings, cur);
    let queued = format!("{queued}{}", overdue(scheduled, now));
    let Some(uncovered) = &obs.uncovered else {
        // Pods not looked at: never revoke on missing evidence.
        p.phase = Phase::Confirming;
        p.rotating = Some(Why::new(
            reasons::CONFIRMING,
            format!(
                "old key {} stays trusted until its consumers are known{queued}",
                old.kid
            ),
        ));
        p.wake_at(add(now, Duration::from_secs(1)), now);
        return finish(p, settings, obs, now);
    };
    let mut time_due = add(start, settings.overlap);
    if !uncovered.is_empty() && !settings.include_private_key {
        let last_exp = old
            .last_token_exp
            .unwrap_or_else(|| add(retired_at, settings.token_ttl));
        time_due = time_due.max(add(last_exp, settings.clock_skew));
    }
    let waiting: Vec<&Consumer> = obs
        .consumers
        .iter()
        .filter(|c| c.confirmed_kid.as_deref() != Some(cur.kid.as_str()))
        .collect();
    // A reactivated key was brought back for a consumer that broke without it: whatever the
    // confirmations say, it stays trusted another `overlap` from its reactivation.
    if let Some(r) = old.reactivated_at {
        time_due = time_due.max(add(r, settings.overlap));
    }
    let needs_time =
        obs.consumers.is_empty() || !uncovered.is_empty() || old.reactivated_at.is_some();
    if waiting.is_empty() && (!needs_time || now >= time_due) {
        let phase = if obs.consumers.is_empty() {
            Phase::Overlap
        } else {
            Phase::Confirming
        };
        if let Some(window) = settings.revoke_when_unused_for {
            // On top of the evidence above: the control plane's word that nothing uses it.
            if let Some(p) = unused_hold(p.clone(), window, obs, old, &queued, now) {
                return finish(p, settings, obs, now);
            }
        }
        // Revoked reversibly first (kept deactivated for `retainDeactivatedFor`), unless no
        // retention is asked for.
        let step = if settings.retain_deactivated_for.is_zero() {
            Step::Destroy {
                seq: old.seq,
                emergency: false,
            }
        } else {
            Step::Deactivate { seq: old.seq }
        };
        return Plan::new(phase).step(step);
    }
    let names: Vec<String> = waiting
        .iter()
        .map(|c| match &c.waiting_reason {
            Some(r) => format!("{} ({r})", c.name),
            None => c.name.clone(),
        })
        .collect();
    let mut parts = Vec::new();
    if !waiting.is_empty() {
        parts.push(format!(
            "every PolicyAgent is confirmed on {}; waiting for {}",
            cur.kid,
            names.join(", ")
        ));
    }
    if needs_time {
        let why = if let Some(r) = old.reactivated_at.filter(|_| uncovered.is_empty()) {
            format!("it was reactivated at {}", ts_secs(r))
        } else if uncovered.is_empty() {
            "no PolicyAgent references this key".to_string()
        } else {
            format!(
                "{} pod(s) no PolicyAgent covers use the agent Secret: {}",
                uncovered.len(),
                uncovered_workloads(uncovered).join(", ")
            )
        };
        parts.push(format!("{} ({why})", time_due.to_rfc3339()));
        if now < time_due {
            p.wake_at(time_due, now);
        }
        if !uncovered.is_empty() {
            // Nothing wakes the key when those pods go away (pods are not watched): look again.
            p.wake_at(add(now, UNCOVERED_RECHECK), now);
        }
    }
    p.phase = if waiting.is_empty() {
        Phase::Overlap
    } else {
        Phase::Confirming
    };
    p.rotating = Some(Why::new(
        if waiting.is_empty() {
            reasons::OVERLAP
        } else {
            reasons::CONFIRMING
        },
        format!(
            "old key {} stays trusted until {}{queued}",
            old.kid,
            parts.join(" and until ")
        ),
    ));
    if !waiting.is_empty() {
        stall_or_wake(&mut p, settings, cur, old, &waiting, &names, &queued, now);
    }
    finish(p, settings, obs, now)
}

/// While agents are waiting: the rotation stalls once `confirmationTimeout` has passed since
/// their roll; until then it wakes at that deadline.
#[allow(clippy::too_many_arguments)]
fn stall_or_wake(
    p: &mut Plan,
    settings: &Settings,
    cur: &ObservedKey,
    old: &ObservedKey,
    waiting: &[&Consumer],
    names: &[String],
    queued: &str,
    now: DateTime<Utc>,
) {
    let retired_at = old.retired_at.unwrap_or(now);
    // confirmationTimeout counts from the roll (or from the retirement when the agent
    // cannot roll, e.g. its workload is missing). A roll that is only delayed (rollout
    // minInterval, the concurrent-roll cap) shows as its own reason, never as a stall.
    let started = waiting
        .iter()
        .filter(|c| !c.roll_delayed())
        .map(|c| {
            c.rolled_at
                .filter(|r| *r >= retired_at)
                .unwrap_or(retired_at)
        })
        .min();
    let deadline = started.map(|s| add(s, settings.confirmation_timeout));
    if deadline.is_some_and(|d| now >= d) {
        p.phase = Phase::Stalled;
        p.stalled = Some(Why::new(
            reasons::ROTATION_STALLED,
            format!(
                "agents not confirmed on {} within {}: {}; old key {} stays trusted{queued}",
                cur.kid,
                humantime::format_duration(settings.confirmation_timeout),
                names.join(", "),
                old.kid
            ),
        ));
    } else if let Some(deadline) = deadline {
        p.wake_at(deadline, now);
    }
}

/// `revokeWhenUnusedFor`: `None` when the verifier replicas vouch that nothing used the old key
/// for the whole window; otherwise the plan that holds it. Silence is never evidence: no usage
/// read, no replica, a silent replica or an unreadable Lease stall the rotation
/// (`VerifierSilent`) and the old key stays trusted.
fn unused_hold(
    mut p: Plan,
    window: Duration,
    obs: &Observed,
    old: &ObservedKey,
    queued: &str,
    now: DateTime<Utc>,
) -> Option<Plan> {
    use crate::usage::{Unused, unused_for};
    let w = humantime::format_duration(window);
    let verdict = match &obs.usage {
        None => Unused::Silent("key use was not read".into()),
        Some(u) => unused_for(window, &old.kid, &u.key_use, &u.coverage),
    };
    let message = |tail: String| format!("old key {} stays trusted: {tail}{queued}", old.kid);
    match verdict {
        Unused::Yes => return None,
        Unused::InUse { last_used, until } => {
            p.phase = Phase::Overlap;
            p.rotating = Some(Why::new(
                reasons::OLD_KEY_IN_USE,
                message(format!(
                    "last used at {} (revokeWhenUnusedFor {w}; unused at the earliest {})",
                    ts_secs(last_used),
                    ts_secs(until)
                )),
            ));
            p.wake_at(until, now);
        }
        Unused::Warming { until } => {
            p.phase = Phase::Overlap;
            p.rotating = Some(Why::new(
                reasons::OLD_KEY_IN_USE,
                message(format!(
                    "the verifier replicas have not yet vouched for a whole {w} window (a replica \
                     started recently); unused at the earliest {}",
                    ts_secs(until)
                )),
            ));
            p.wake_at(until, now);
        }
        Unused::Unproven { why, until } => {
            p.phase = Phase::Overlap;
            p.rotating = Some(Why::new(
                reasons::OLD_KEY_IN_USE,
                message(format!(
                    "its use cannot be ruled out, so it counts as used now: {why} \
                     (revokeWhenUnusedFor {w}; unused at the earliest {})",
                    ts_secs(until)
                )),
            ));
            p.wake_at(until, now);
        }
        Unused::Behind(why) => {
            // Not an alarm: the replica renews its Lease and is catching up.
            p.phase = Phase::Overlap;
            p.rotating = Some(Why::new(
                reasons::VERIFIER_BEHIND,
                message(format!(
                    "revokeWhenUnusedFor {w} waits until every keyward verifier replica has \
                     reported: {why}"
                )),
            ));
        }
        Unused::Silent(why) => {
            p.phase = Phase::Stalled;
            let m = message(format!(
                "revokeWhenUnusedFor {w} needs every keyward verifier replica to report, and {why}"
            ));
            p.rotating = Some(Why::new(reasons::VERIFIER_SILENT, m.clone()));
            p.stalled = Some(Why::new(reasons::VERIFIER_SILENT, m));
        }
    }
    // Lease renewals wake nothing: look again while waiting on the replicas.
    p.wake_at(add(now, USAGE_RECHECK), now);
    Some(p)
}
