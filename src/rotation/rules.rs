//! The rotation decision as a table: an ordered chain of small named rules. Each rule looks at
//! (settings, observed, now), and at what the rules before it found, and either decides the
//! plan or passes to the next. The chain reads as the phases of a key's life; docs/rotation.md
//! shows the same table, and a test fails when the two disagree.

use chrono::{DateTime, Utc};

use super::revoke::{overdue, revocation};
use super::*;

/// One rule: the plan, or `None` to pass to the next rule.
pub type Rule = fn(&mut Ctx<'_>) -> Option<Plan>;

/// The chain, in order: (name, what it decides, rule). The last rule always decides.
pub const RULES: &[(&str, &str, Rule)] = &[
    (
        "first key",
        "no key yet: mint one (created active when nothing is trusted and no agent holds a key)",
        first_key,
    ),
    (
        "repair",
        "an edited key Secret gets its labels and annotations back",
        repair,
    ),
    (
        "reactivate",
        "a deactivated key named by a new keyward.dev/reactivate request goes back to retiring (trusted)",
        reactivate,
    ),
    (
        "publish",
        "a minted key is labelled published, written into the trust bundle and recorded there",
        publish,
    ),
    (
        "break-glass",
        "a key listed in compromisedKeys gets a successor at once, then is destroyed without confirmation",
        break_glass,
    ),
    (
        "destroy",
        "a deactivated key is destroyed (private key deleted) once retainDeactivatedFor has passed",
        destroy,
    ),
    (
        "activate",
        "the newest published key becomes current once publishDelay has passed",
        activate,
    ),
    (
        "replace",
        "no current key, or it lost its private key: mint a replacement",
        replace,
    ),
    (
        "retire",
        "older active and superseded published keys retire",
        retire,
    ),
    (
        "hand out",
        "the current key goes into the agent Secret (new key, token refresh, repair)",
        hand_out,
    ),
    (
        "confirm, hold, revoke",
        "a retiring key is deactivated (or destroyed, with retainDeactivatedFor 0s) only on evidence: confirmations, overlap, unused; stalled past confirmationTimeout",
        revoke,
    ),
    (
        "prune",
        "destroyed key Secrets beyond the retention are deleted",
        prune,
    ),
    (
        "rotate",
        "a due or requested rotation mints a key, unless suspended or within minInterval",
        rotate,
    ),
];

/// What the rules share: the inputs, and what earlier rules found.
pub struct Ctx<'a> {
    pub settings: &'a Settings,
    pub obs: &'a Observed,
    pub now: DateTime<Utc>,
    target: BundleTarget,
    next_seq: u32,
    /// `activate`: a published key waits for `publishDelay` (its plan).
    publishing: Option<Plan>,
    /// `hand_out`: the current key is handed out; the plan so far and when it was handed out.
    ready: Option<(Plan, DateTime<Utc>)>,
}

impl<'a> Ctx<'a> {
    fn new(settings: &'a Settings, obs: &'a Observed, now: DateTime<Utc>) -> Self {
        let target = bundle_target(settings, obs);
        let next_seq = target.last_seq + 1;
        Ctx {
            settings,
            obs,
            now,
            target,
            next_seq,
            publishing: None,
            ready: None,
        }
    }

    fn unrecorded(&self) -> Vec<String> {
        self.target.unrecorded.clone()
    }

    fn finish(&self, p: Plan) -> Plan {
        finish(p, self.settings, self.obs, self.now)
    }

    /// A mint of the next seq for `trigger`, created pending, serving any request present.
    fn mint(&self, trigger: Trigger) -> Step {
        self.mint_consuming(
            trigger,
            self.settings.request_token.clone(),
            self.obs.rotate_annotation.clone(),
            false,
        )
    }

    fn mint_consuming(
        &self,
        trigger: Trigger,
        consumed_request_token: Option<String>,
        consumed_annotation: Option<String>,
        active: bool,
    ) -> Step {
        Step::Mint {
            seq: self.next_seq,
            trigger,
            consumed_request_token,
            consumed_annotation,
            active,
        }
    }
}

/// Decide the next step: the first rule of [`RULES`] that decides.
pub(super) fn decide(settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    let mut ctx = Ctx::new(settings, obs, now);
    let mut p = RULES
        .iter()
        .find_map(|(_, _, rule)| rule(&mut ctx))
        .unwrap_or_else(|| ctx.finish(Plan::new(Phase::Ready)));
    if p.step.is_none()
        && let Some(at) = destroy_due(settings, obs).map(|(_, at)| at)
    {
        p.wake_at(at, now);
    }
    p
}

/// The `keyward.dev/reactivate` request's key id: the value up to its first comma.
pub fn reactivate_kid(request: &str) -> &str {
    request.split(',').next().unwrap_or_default().trim()
}

/// Why a reactivation request is not served, or `None` when it names a deactivated key that
/// can go back (or one it already brought back). Pure, for the CLI and the status alike.
pub fn reactivation_refused(settings: &Settings, obs: &Observed, request: &str) -> Option<String> {
    let kid = reactivate_kid(request);
    let Some(k) = obs.keys.iter().find(|k| k.kid == kid) else {
        return Some(format!(
            "no key Secret of this ProvisioningKey has key id {kid:?}"
        ));
    };
    if k.consumed_reactivate.as_deref() == Some(request) {
        return None;
    }
    if settings.compromised.contains(&k.kid) {
        return Some(format!(
            "key {kid} is listed in compromisedKeys and is never reactivated"
        ));
    }
    match k.state {
        KeyState::Deactivated if k.has_private_key => None,
        KeyState::Deactivated | KeyState::Destroyed => Some(format!(
            "key {kid} is destroyed (its private key is deleted); only a rotation brings a new key"
        )),
        s => Some(format!(
            "key {kid} is {} (still trusted); nothing to reactivate",
            s.as_str()
        )),
    }
}

/// Reactivation: a new `keyward.dev/reactivate` request naming a deactivated key that is not
/// compromised and still has its private key puts it back to `retiring` (trusted again: the
/// record and the bundle follow). Anything else is refused in status, never written.
fn reactivate(c: &mut Ctx<'_>) -> Option<Plan> {
    let request = c.obs.reactivate_annotation.as_ref()?;
    if reactivation_refused(c.settings, c.obs, request).is_some() {
        return None;
    }
    // One retiring key at a time: a request made while a rotation is in flight is served once
    // it completes.
    let keys = &c.obs.keys;
    let in_flight = keys.iter().any(|k| {
        matches!(
            k.state,
            KeyState::Pending | KeyState::Published | KeyState::Retiring
        )
    }) || keys.iter().filter(|k| k.state == KeyState::Active).count() > 1;
    if in_flight {
        return None;
    }
    let kid = reactivate_kid(request);
    let k = c.obs.keys.iter().find(|k| {
        k.kid == kid
            && k.state == KeyState::Deactivated
            && k.consumed_reactivate.as_ref() != Some(request)
    })?;
    let mut p = Plan::new(Phase::Publishing).step(Step::Reactivate {
        seq: k.seq,
        request: request.clone(),
    });
    p.rotating = Some(Why::new(
        reasons::PUBLISHING,
        format!("reactivating key {kid}"),
    ));
    Some(p)
}

/// The deactivated key to destroy next and when it falls due (`retainDeactivatedFor` after its
/// deactivation).
/// Beyond [`MAX_DEACTIVATED`] deactivated keys (frequent rotations with a long retention), the
/// oldest is due at once: the trust record lists every deactivated key id and stays bounded.
fn destroy_due(settings: &Settings, obs: &Observed) -> Option<(u32, DateTime<Utc>)> {
    let deactivated: Vec<(u32, DateTime<Utc>)> = obs
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Deactivated)
        .map(|k| {
            let since = k.deactivated_at.or(k.retired_at).unwrap_or(k.created_at);
            (k.seq, add(since, settings.retain_deactivated_for))
        })
        .collect();
    if deactivated.len() > MAX_DEACTIVATED {
        return deactivated
            .iter()
            .min_by_key(|(seq, _)| *seq)
            .map(|(seq, _)| (*seq, DateTime::<Utc>::MIN_UTC));
    }
    deactivated.into_iter().min_by_key(|(_, at)| *at)
}

/// Most keys kept deactivated at once; the oldest beyond it is destroyed before its retention
/// ends (its `KeyDestroyed` Event says so).
pub const MAX_DEACTIVATED: usize = 10;

/// Destruction: a deactivated key whose retention has passed loses its private key for good.
fn destroy(c: &mut Ctx<'_>) -> Option<Plan> {
    let (seq, at) = destroy_due(c.settings, c.obs)?;
    if c.now < at {
        return None;
    }
    Some(Plan::new(Phase::Ready).step(Step::Destroy {
        seq,
        emergency: false,
    }))
}

/// The first key: created already active when nothing is trusted and nobody holds a key.
fn first_key(c: &mut Ctx<'_>) -> Option<Plan> {
    if !c.obs.keys.is_empty() {
        return None;
    }
    Some(Plan::new(Phase::Pending).step(c.mint_consuming(
        Trigger::Initial,
        c.settings.request_token.clone(),
        c.obs.rotate_annotation.clone(),
        first_key_fast(c.obs, &c.target),
    )))
}

/// Edited key Secrets get their metadata back (the state is judged from evidence).
fn repair(c: &mut Ctx<'_>) -> Option<Plan> {
    let k = c.obs.keys.iter().find(|k| k.edited.is_some())?;
    Some(Plan::new(Phase::Ready).step(Step::Repair { seq: k.seq }))
}

/// Finish the publication of minted keys: label, bundle, record. A bundle owned by someone else
/// is never written, so nothing new gets published (and nothing activated).
fn publish(c: &mut Ctx<'_>) -> Option<Plan> {
    let (settings, obs) = (c.settings, c.obs);
    if let Some(k) = obs.keys.iter().find(|k| k.state == KeyState::Pending) {
        // A key compromised before it was ever trusted is revoked without being published.
        if settings.compromised.contains(&k.kid) {
            return Some(Plan::new(Phase::Publishing).step(Step::Destroy {
                seq: k.seq,
                emergency: true,
            }));
        }
        return Some(Plan::new(Phase::Publishing).step(Step::MarkPublished { seq: k.seq }));
    }
    let target = &c.target;
    if let BundleObs::Owned {
        kids,
        revoked,
        last_seq,
    } = &obs.bundle
    {
        // Compared as sets: the order of entries carries no meaning.
        let same = |a: &[String], b: &[String]| {
            let (mut a, mut b) = (a.to_vec(), b.to_vec());
            a.sort();
            b.sort();
            a == b
        };
        if !same(kids, &target.trusted)
            || !same(revoked, &target.revoked)
            || *last_seq != target.last_seq
        {
            let mut p = Plan::new(Phase::Publishing).step(Step::WriteBundle {
                trusted: target.trusted.clone(),
                revoked: target.revoked.clone(),
            });
            p.unrecorded = target.unrecorded.clone();
            p.injected = target.injected.clone();
            return Some(p);
        }
    } else if obs.bundle == BundleObs::Missing {
        return Some(Plan::new(Phase::Publishing).step(Step::WriteBundle {
            trusted: target.trusted.clone(),
            revoked: target.revoked.clone(),
        }));
    }
    if obs.bundle != BundleObs::Foreign
        && let Some(k) = obs
            .keys
            .iter()
            .find(|k| k.state == KeyState::Published && k.published_at.is_none())
    {
        return Some(Plan::new(Phase::Publishing).step(Step::RecordPublished { seq: k.seq }));
    }
    None
}

/// Break-glass: a compromised key gets a successor at once (neither minInterval nor suspend
/// delays it); once the successor is in the bundle, the compromised keys are revoked without
/// waiting for confirmation.
fn break_glass(c: &mut Ctx<'_>) -> Option<Plan> {
    let (settings, keys) = (c.settings, &c.obs.keys);
    let compromised = |k: &&ObservedKey| settings.compromised.contains(&k.kid);
    if !keys
        .iter()
        .filter(|k| k.state != KeyState::Destroyed)
        .any(|k| compromised(&k))
    {
        return None;
    }
    // A successor is a key that can become current: not one on its way out.
    let has_successor = keys
        .iter()
        .rev()
        .any(|k| !matches!(k.state, KeyState::Retiring) && !k.state.revoked() && !compromised(&k));
    if !has_successor {
        let latest = keys.last()?;
        let mut p = Plan::new(Phase::Publishing).step(c.mint_consuming(
            Trigger::Compromised,
            latest.consumed_request_token.clone(),
            latest.consumed_annotation.clone(),
            false,
        ));
        p.rotating = Some(Why::new(
            reasons::EMERGENCY,
            "minting a successor for a compromised key",
        ));
        return Some(p);
    }
    // The successor is in the trust bundle (`publish` ensured it): revoke the compromised keys
    // now. The bundle keeps the successor.
    let k = keys
        .iter()
        .find(|k| k.state != KeyState::Destroyed && compromised(k))?;
    let mut p = Plan::new(Phase::Publishing).step(Step::Destroy {
        seq: k.seq,
        emergency: true,
    });
    p.rotating = Some(Why::new(
        reasons::EMERGENCY,
        format!("revoking compromised key {}", k.kid),
    ));
    Some(p)
}

/// Activation: the newest published key becomes current once `publishDelay` has passed since
/// the trust bundle was seen to contain it. The very first key has no predecessor to keep agents
/// working meanwhile, so it is activated at once. A key never seen in the bundle is never
/// activated. While it waits, the rules after this one still serve the current key.
fn activate(c: &mut Ctx<'_>) -> Option<Plan> {
    let (settings, obs, now) = (c.settings, c.obs, c.now);
    let keys = &obs.keys;
    let cur = current(keys);
    let newest = keys.iter().rev().find(|k| k.state == KeyState::Published)?;
    let published_at = newest.published_at?;
    if cur.is_some_and(|c| newest.seq <= c.seq) {
        return None;
    }
    // `break_glass` revoked any compromised current key, so an emergency activation is one with
    // no current key left and a compromised older key.
    let emergency = newest.trigger == Trigger::Compromised
        || (cur.is_none()
            && keys
                .iter()
                .any(|k| k.seq < newest.seq && settings.compromised.contains(&k.kid)));
    // The first key and an emergency successor go out as soon as they are published. A
    // replacement for a current key whose key Secret is gone waits `publishDelay` like any
    // successor: the agents still hold that (trusted) key meanwhile.
    let unrecorded = &c.target.unrecorded;
    let replaces_unrecorded = matches!(&obs.agent_secret,
        AgentSecretObs::Owned(s) if s.kid.as_ref().is_some_and(|k| unrecorded.contains(k)));
    let due = if (cur.is_none() && !replaces_unrecorded) || emergency {
        now
    } else {
        add(published_at, settings.publish_delay)
    };
    if now >= due {
        return Some(Plan::new(Phase::Publishing).step(Step::Activate {
            seq: newest.seq,
            emergency,
        }));
    }
    let mut p = Plan::new(Phase::Publishing);
    p.rotating = Some(Why::new(
        reasons::PUBLISHING,
        format!(
            "key {} is published; it is handed out at {}",
            newest.kid,
            due.to_rfc3339()
        ),
    ));
    p.wake_at(due, now);
    // Meanwhile the current key keeps being handed out (token refresh, repair).
    c.publishing = Some(p);
    None
}

/// No current key (its key Secret was deleted), or the current key lost its private key
/// without a recorded revocation (someone edited its Secret): a replacement is minted at once
/// and rotated in as usual. The old key stays trusted meanwhile.
fn replace(c: &mut Ctx<'_>) -> Option<Plan> {
    let keys = &c.obs.keys;
    let Some(cur) = current(keys) else {
        if let Some(mut p) = c.publishing.take() {
            p.unrecorded = c.unrecorded();
            return Some(c.finish(p));
        }
        if keys.iter().any(|k| k.state == KeyState::Published) {
            // Minted and waiting to be seen in the bundle (a foreign bundle never shows it).
            let mut p = Plan::new(Phase::Pending);
            p.unrecorded = c.unrecorded();
            return Some(c.finish(p));
        }
        // A replacement is a new key: it serves any request present (the key Secret that
        // recorded the last one consumed may be the one that was deleted).
        let mut p = Plan::new(Phase::Pending).step(c.mint(Trigger::Replacement));
        p.unrecorded = c.unrecorded();
        return Some(p);
    };
    if cur.has_private_key {
        return None;
    }
    if let Some(mut p) = c.publishing.take() {
        // No token refresh to wake for: none can be signed until the successor is out.
        p.unrecorded = c.unrecorded();
        return Some(p);
    }
    if keys.iter().any(|k| k.seq > cur.seq && !k.state.revoked()) {
        return None;
    }
    let mut p = Plan::new(Phase::Publishing).step(c.mint(Trigger::Replacement));
    p.rotating = Some(Why::new(
        reasons::PUBLISHING,
        format!(
            "key {} lost its private key; minting a replacement",
            cur.kid
        ),
    ));
    p.unrecorded = c.unrecorded();
    Some(p)
}

/// Older active keys retire (the newer one is current), and so do keys published before the
/// current one that never became current (superseded).
fn retire(c: &mut Ctx<'_>) -> Option<Plan> {
    let keys = &c.obs.keys;
    let cur = current(keys)?;
    let k = keys
        .iter()
        .find(|k| k.state == KeyState::Active && k.seq < cur.seq)
        .or_else(|| {
            keys.iter()
                .find(|k| k.state == KeyState::Published && k.seq < cur.seq)
        })?;
    Some(Plan::new(Phase::Confirming).step(Step::Retire { seq: k.seq }))
}

/// Hand the current key out: a new key, a token refresh at about half its life, or a repair
/// of the agent Secret. A key goes into the agent Secret only while the trust bundle this key
/// owns lists it.
fn hand_out(c: &mut Ctx<'_>) -> Option<Plan> {
    let (settings, obs, now) = (c.settings, c.obs, c.now);
    let cur = current(&obs.keys)?;
    let (token_refresh_at, handed_out_at) = match &obs.agent_secret {
        AgentSecretObs::Owned(s)
            if s.kid.as_deref() == Some(cur.kid.as_str()) && settings.proof_of_possession =>
        {
            // Proof of possession: the private key and no token; nothing to refresh.
            if !s.has_private_key || s.has_token || !s.metadata_matches || s.handed_out_at.is_none()
            {
                return Some(Plan::new(Phase::Ready).step(Step::HandOut {
                    seq: cur.seq,
                    reason: HandOutReason::Repair,
                }));
            }
            (None, s.handed_out_at.unwrap_or(now))
        }
        AgentSecretObs::Owned(s) if s.kid.as_deref() == Some(cur.kid.as_str()) => {
            let refresh_at = match (s.token_iat, s.token_exp) {
                // Re-issue at about half the token's life (a little earlier, by this key's
                // offset), and at once when the spec's ttl changed.
                (Some(iat), Some(exp)) => schedule::token_refresh_at(settings, iat, exp)
                    .filter(|_| (exp - iat) as u64 == settings.token_ttl.as_secs()),
                _ => None,
            };
            let reason = if s.has_private_key != settings.include_private_key
                || !s.metadata_matches
                || !s.token_claims_match
                || s.handed_out_at.is_none()
            {
                Some(HandOutReason::Repair)
            } else if refresh_at.is_none_or(|r| now >= r) || !s.static_claims_match {
                // Changed static claims are a refresh: same key, new token, nothing rolled.
                Some(HandOutReason::TokenRefresh)
            } else {
                None
            };
            if let Some(reason) = reason {
                return Some(Plan::new(Phase::Ready).step(Step::HandOut {
                    seq: cur.seq,
                    reason,
                }));
            }
            (refresh_at, s.handed_out_at.unwrap_or(now))
        }
        // `publish` wrote the bundle before anything else, so this holds back only a key whose
        // bundle is someone else's. It is what makes a first key created `active` safe: its
        // state says nothing about the bundle, this check does (see `first_key_fast`).
        other if !listed(obs, &cur.kid) => {
            let rotating = matches!(other, AgentSecretObs::Owned(_));
            let mut p = Plan::new(if rotating {
                Phase::Publishing
            } else {
                Phase::Pending
            });
            p.rotating = rotating.then(|| {
                Why::new(
                    reasons::PUBLISHING,
                    format!(
                        "key {} is handed out once trust bundle {} lists it",
                        cur.kid, settings.trust_bundle_name
                    ),
                )
            });
            p.unrecorded = c.unrecorded();
            return Some(c.finish(p));
        }
        other => {
            let phase = if matches!(other, AgentSecretObs::Owned(_)) {
                Phase::Confirming
            } else {
                Phase::Pending
            };
            return Some(Plan::new(phase).step(Step::HandOut {
                seq: cur.seq,
                reason: HandOutReason::NewKey,
            }));
        }
    };
    if let Some(mut p) = c.publishing.take() {
        p.unrecorded = c.unrecorded();
        return Some(c.finish(p));
    }
    let mut p = Plan::new(Phase::Ready);
    p.unrecorded = c.unrecorded();
    p.token_refresh_at = token_refresh_at;
    if let Some(t) = token_refresh_at {
        p.wake_at(t, now);
    }
    c.ready = Some((p, handed_out_at));
    None
}

/// Revocation of retiring keys: only on evidence (see [`revocation`]).
fn revoke(c: &mut Ctx<'_>) -> Option<Plan> {
    let keys = &c.obs.keys;
    let old = keys.iter().find(|k| k.state == KeyState::Retiring)?;
    let cur = current(keys)?;
    let (p, handed_out_at) = c.ready.take()?;
    let pending_request = requested(c.settings, c.obs, keys.last()?);
    Some(revocation(
        p,
        c.settings,
        c.obs,
        cur,
        old,
        handed_out_at,
        pending_request,
        c.now,
    ))
}

/// Prune old revoked key Secrets beyond [`RETAIN_REVOKED`].
fn prune(c: &mut Ctx<'_>) -> Option<Plan> {
    let revoked: Vec<&ObservedKey> = c
        .obs
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Destroyed)
        .collect();
    if revoked.len() <= RETAIN_REVOKED {
        return None;
    }
    let (p, _) = c.ready.take()?;
    Some(p.step(Step::Prune {
        seq: revoked[0].seq,
    }))
}

/// Start a rotation when one is due or requested. Due means `interval` after the current key
/// became current, minus this key's offset (never later than asked), then, with a
/// `rotation.window`, the window's next opening at or after both that and now (a window can
/// delay a scheduled rotation, never hasten it). Requests ignore the window. Always decides.
fn rotate(c: &mut Ctx<'_>) -> Option<Plan> {
    let (settings, obs, now) = (c.settings, c.obs, c.now);
    let cur = current(&obs.keys)?;
    let latest = obs.keys.last()?;
    let (mut p, _) = c.ready.take()?;
    let scheduled = schedule::rotation_start(settings, cur, now);
    p.next_rotation_at = scheduled;
    let trigger = match (requested(settings, obs, latest), scheduled) {
        (Some(t), _) => Some(t),
        (None, Some(due)) if now >= due => Some(Trigger::Interval),
        (None, Some(due)) => {
            p.wake_at(due, now);
            None
        }
        (None, None) => None,
    };
    let Some(trigger) = trigger else {
        if settings.suspend {
            p.phase = Phase::Suspended;
        }
        return Some(c.finish(p));
    };
    if settings.suspend {
        p.phase = Phase::Suspended;
        p.rotating = Some(Why::new(
            reasons::SUSPENDED,
            format!(
                "{} rotation queued while suspended{}",
                trigger.as_str(),
                overdue(scheduled, now)
            ),
        ));
        return Some(c.finish(p));
    }
    let earliest = add(latest.created_at, settings.min_interval);
    if now < earliest {
        p.rotating = Some(Why::new(
            reasons::IDLE,
            format!(
                "{} rotation requested; delayed by minInterval until {}",
                trigger.as_str(),
                earliest.to_rfc3339()
            ),
        ));
        p.wake_at(earliest, now);
        return Some(c.finish(p));
    }
    let mut p = p.step(c.mint(trigger));
    p.phase = Phase::Publishing;
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::RULES;

    /// docs/rotation.md shows the chain: one table row per rule, in order, with its name.
    #[test]
    fn the_doc_shows_the_chain() {
        let doc = include_str!("../../docs/rotation.md");
        let rows: Vec<(String, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                // | n | rule | what it decides |
                (cells.len() >= 4 && cells[1].parse::<usize>().is_ok())
                    .then(|| (cells[1].to_string(), cells[2].trim_matches('`').to_string()))
            })
            .collect();
        let want: Vec<(String, String)> = RULES
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| ((i + 1).to_string(), (*name).to_string()))
            .collect();
        assert_eq!(
            rows, want,
            "docs/rotation.md's table and rotation::rules::RULES disagree"
        );
    }
}
