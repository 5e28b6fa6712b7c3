//! The rotation decision: a pure function of (settings, observed evidence, now).
//!
//! No client, no randomness, no clock: everything the decision needs is gathered into
//! [`Observed`] by the controller from fresh reads, and the clock is passed in. The planner
//! returns at most one [`Step`] (the next write); the controller applies it, observes again and
//! plans again, so a crash between any two writes resumes from evidence.
//!
//! Key lifecycle (forward only), recorded as a label on each operator-owned key Secret:
//!
//! ```text
//! Pending -> Published -> Active -> Retiring -> Revoked
//! ```

mod settings;
#[cfg(test)]
mod tests;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use settings::{Floors, Settings, SpecError, parse_duration};

/// How many revoked key Secrets are kept (their public half and timestamps, for audit and the
/// revoked list of the trust bundle); older ones are deleted.
pub const RETAIN_REVOKED: usize = 5;

/// The lifecycle state of one key, in the order it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyState {
    /// Minted; not yet trusted anywhere.
    Pending,
    /// In the trust bundle (or about to be written there); not yet handed out.
    Published,
    /// The current key: handed out to agents.
    Active,
    /// Superseded; still trusted until revocation is safe.
    Retiring,
    /// No longer trusted; private key material deleted.
    Revoked,
}

impl KeyState {
    pub const ALL: [KeyState; 5] = [
        KeyState::Pending,
        KeyState::Published,
        KeyState::Active,
        KeyState::Retiring,
        KeyState::Revoked,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Published => "published",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Revoked => "revoked",
        }
    }

    /// The name shown in status.
    pub fn display(self) -> &'static str {
        match self {
            KeyState::Pending => "Pending",
            KeyState::Published => "Published",
            KeyState::Active => "Active",
            KeyState::Retiring => "Retiring",
            KeyState::Revoked => "Revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the control plane must accept this key now.
    pub fn trusted(self) -> bool {
        matches!(
            self,
            KeyState::Published | KeyState::Active | KeyState::Retiring
        )
    }
}

/// What caused a key to be minted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    Initial,
    Interval,
    RequestToken,
    Annotation,
    Compromised,
}

impl Trigger {
    pub const ALL: [Trigger; 5] = [
        Trigger::Initial,
        Trigger::Interval,
        Trigger::RequestToken,
        Trigger::Annotation,
        Trigger::Compromised,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Initial => "Initial",
            Trigger::Interval => "Interval",
            Trigger::RequestToken => "RequestToken",
            Trigger::Annotation => "Annotation",
            Trigger::Compromised => "Compromised",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One operator-owned key Secret, as read from the API server (no key bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedKey {
    pub seq: u32,
    pub kid: String,
    pub fingerprint: String,
    pub state: KeyState,
    pub trigger: Trigger,
    /// The `rotation.requestToken` value consumed by this key's mint.
    pub consumed_request_token: Option<String>,
    /// The `keyward.dev/rotate` annotation value consumed by this key's mint.
    pub consumed_annotation: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the trust bundle was seen to contain this key (the `publishDelay` clock).
    pub published_at: Option<DateTime<Utc>>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub has_private_key: bool,
}

/// The trust bundle ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleObs {
    Missing,
    /// Exists but is not controlled by this ProvisioningKey.
    Foreign,
    Owned {
        kids: Vec<String>,
        revoked: Vec<String>,
    },
}

/// The agent Secret that workloads mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentSecretObs {
    Missing,
    /// Exists but is not controlled by this ProvisioningKey.
    Foreign,
    Owned(AgentSecret),
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AgentSecret {
    pub kid: Option<String>,
    /// `iat` and `exp` of the token it holds, if it parses.
    pub token_iat: Option<i64>,
    pub token_exp: Option<i64>,
    /// Whether `iss`, `sub` and `aud` of the token match the spec.
    pub token_claims_match: bool,
    pub has_private_key: bool,
    /// Whether labels, annotations and type match what Keyward would write.
    pub metadata_matches: bool,
}

/// A PolicyAgent that references this key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    /// The key id every pod of the agent is confirmed on (evidence recorded by the PolicyAgent
    /// controller after its checks).
    pub confirmed_kid: Option<String>,
    /// When the workload was rolled to the current key.
    pub rolled_at: Option<DateTime<Utc>>,
    /// Why it is not confirmed yet (for the Stalled message).
    pub waiting_reason: Option<String>,
}

impl Consumer {
    /// The agent's roll to the current key is delayed on purpose (its rollout `minInterval`, or
    /// the operator's cap on concurrent rolls).
    pub fn roll_delayed(&self) -> bool {
        self.waiting_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("RolloutDelayed") || r.starts_with("RolloutQueued"))
    }
}

/// Everything the decision needs, gathered by fresh reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Key Secrets, sorted by `seq` ascending.
    pub keys: Vec<ObservedKey>,
    /// The `keyward.dev/rotate` annotation on the ProvisioningKey.
    pub rotate_annotation: Option<String>,
    pub bundle: BundleObs,
    pub agent_secret: AgentSecretObs,
    pub consumers: Vec<Consumer>,
}

/// Why the agent Secret is (re)written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOutReason {
    /// A key is handed out for the first time.
    NewKey,
    /// Same key, fresh token (never a rotation, never restarts anything).
    TokenRefresh,
    /// The Secret was missing or differs from what Keyward writes.
    Repair,
}

/// The next write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create key Secret `<name>-k<seq>` (POST; a 409 means it was already minted).
    Mint {
        seq: u32,
        trigger: Trigger,
        consumed_request_token: Option<String>,
        consumed_annotation: Option<String>,
    },
    /// Label the key `published` (before it is written into the trust bundle).
    MarkPublished { seq: u32 },
    /// Write the trust bundle from the key Secrets.
    WriteBundle {
        trusted: Vec<String>,
        revoked: Vec<String>,
    },
    /// Record that the trust bundle now contains the key (starts the `publishDelay` clock).
    RecordPublished { seq: u32 },
    /// Make the key current (before it is written into the agent Secret).
    Activate { seq: u32, emergency: bool },
    /// Mark a superseded key as retiring.
    Retire { seq: u32 },
    /// Write the agent Secret for the current key.
    HandOut { seq: u32, reason: HandOutReason },
    /// Revoke: state `revoked`, private key material deleted.
    Revoke { seq: u32, emergency: bool },
    /// Delete an old revoked key Secret beyond [`RETAIN_REVOKED`].
    Prune { seq: u32 },
}

/// The phase shown in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Ready,
    Publishing,
    Confirming,
    Overlap,
    Stalled,
    Suspended,
    Invalid,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Ready => "Ready",
            Phase::Publishing => "Publishing",
            Phase::Confirming => "Confirming",
            Phase::Overlap => "Overlap",
            Phase::Stalled => "Stalled",
            Phase::Suspended => "Suspended",
            Phase::Invalid => "Invalid",
        }
    }
}

/// A condition outcome (reason and message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Why {
    pub reason: &'static str,
    pub message: String,
}

impl Why {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub step: Option<Step>,
    pub phase: Phase,
    /// Set when nothing can be done until the user changes something (`Ready=False`).
    pub blocked: Option<Why>,
    /// Set while a rotation is in flight (`Rotating=True`).
    pub rotating: Option<Why>,
    /// Set when a rotation waits past its `confirmationTimeout` (`Stalled=True`).
    pub stalled: Option<Why>,
    /// When to look again if nothing changes (the next due time minus now).
    pub requeue_after: Option<Duration>,
    /// When the next scheduled rotation is due.
    pub next_rotation_at: Option<DateTime<Utc>>,
    /// When the token is re-issued next.
    pub token_refresh_at: Option<DateTime<Utc>>,
}

impl Plan {
    fn new(phase: Phase) -> Self {
        Plan {
            step: None,
            phase,
            blocked: None,
            rotating: None,
            stalled: None,
            requeue_after: None,
            next_rotation_at: None,
            token_refresh_at: None,
        }
    }

    fn step(mut self, step: Step) -> Self {
        self.step = Some(step);
        self
    }

    fn wake_at(&mut self, at: DateTime<Utc>, now: DateTime<Utc>) {
        let after = (at - now)
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(200));
        self.requeue_after = Some(self.requeue_after.map_or(after, |d| d.min(after)));
    }
}

/// Reasons shared by conditions, Events and metrics.
pub mod reasons {
    pub const KEY_ACTIVE: &str = "KeyActive";
    pub const MINTING: &str = "Minting";
    pub const PUBLISHING: &str = "Publishing";
    pub const CONFIRMING: &str = "AwaitingConfirmation";
    pub const OVERLAP: &str = "Overlap";
    pub const ROTATION_STALLED: &str = "RotationStalled";
    pub const SUSPENDED: &str = "Suspended";
    pub const IDLE: &str = "Idle";
    pub const SECRET_NAME_TAKEN: &str = "SecretNameTaken";
    pub const TRUST_BUNDLE_NAME_TAKEN: &str = "TrustBundleNameTaken";
    pub const EMERGENCY: &str = "EmergencyRevocation";
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d).map_or(DateTime::<Utc>::MAX_UTC, |d| {
        t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
    })
}

/// The desired trust bundle content: trusted key ids and revoked key ids, in `seq` order.
pub fn desired_bundle(keys: &[ObservedKey]) -> (Vec<String>, Vec<String>) {
    let trusted = keys
        .iter()
        .filter(|k| k.state.trusted())
        .map(|k| k.kid.clone())
        .collect();
    let revoked = keys
        .iter()
        .filter(|k| k.state == KeyState::Revoked)
        .map(|k| k.kid.clone())
        .collect();
    (trusted, revoked)
}

/// The current key: the newest `Active` one.
pub fn current(keys: &[ObservedKey]) -> Option<&ObservedKey> {
    keys.iter().rev().find(|k| k.state == KeyState::Active)
}

/// Decide the next step. Pure: same inputs, same plan.
pub fn plan(settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    // 1. Names owned by someone else: do nothing at all.
    if obs.bundle == BundleObs::Foreign {
        let mut p = Plan::new(Phase::Invalid);
        p.blocked = Some(Why::new(
            reasons::TRUST_BUNDLE_NAME_TAKEN,
            format!(
                "ConfigMap {:?} exists and is not owned by this ProvisioningKey; choose another trustBundle.configMapName",
                settings.trust_bundle_name
            ),
        ));
        return p;
    }
    if obs.agent_secret == AgentSecretObs::Foreign {
        let mut p = Plan::new(Phase::Invalid);
        p.blocked = Some(Why::new(
            reasons::SECRET_NAME_TAKEN,
            format!(
                "Secret {:?} exists and is not owned by this ProvisioningKey; choose another secretName",
                settings.secret_name
            ),
        ));
        return p;
    }

    let keys = &obs.keys;
    let next_seq = keys.last().map_or(1, |k| k.seq + 1);

    // 2. The first key.
    let Some(latest) = keys.last() else {
        return Plan::new(Phase::Pending).step(Step::Mint {
            seq: 1,
            trigger: Trigger::Initial,
            consumed_request_token: settings.request_token.clone(),
            consumed_annotation: obs.rotate_annotation.clone(),
        });
    };

    // 3. Finish the publication of minted keys: label, bundle, record.
    if let Some(k) = keys.iter().find(|k| k.state == KeyState::Pending) {
        // A key compromised before it was ever trusted is revoked without being published.
        if settings.compromised.contains(&k.kid) {
            return Plan::new(Phase::Publishing).step(Step::Revoke {
                seq: k.seq,
                emergency: true,
            });
        }
        return Plan::new(Phase::Publishing).step(Step::MarkPublished { seq: k.seq });
    }
    let (trusted, revoked) = desired_bundle(keys);
    let bundle_ok = matches!(&obs.bundle, BundleObs::Owned { kids, revoked: r } if *kids == trusted && *r == revoked);
    if !bundle_ok {
        return Plan::new(Phase::Publishing).step(Step::WriteBundle { trusted, revoked });
    }
    if let Some(k) = keys
        .iter()
        .find(|k| k.state == KeyState::Published && k.published_at.is_none())
    {
        return Plan::new(Phase::Publishing).step(Step::RecordPublished { seq: k.seq });
    }

    // 4. Break-glass: compromised keys.
    let compromised = |k: &&ObservedKey| settings.compromised.contains(&k.kid);
    let has_compromised = keys
        .iter()
        .filter(|k| k.state != KeyState::Revoked)
        .any(|k| compromised(&k));
    if has_compromised {
        // A successor is a key that can become current: not one on its way out.
        let has_successor = keys.iter().rev().any(|k| {
            !matches!(k.state, KeyState::Retiring | KeyState::Revoked) && !compromised(&k)
        });
        if !has_successor {
            // Mint a successor at once: neither minInterval nor suspend delays it.
            let mut p = Plan::new(Phase::Publishing).step(Step::Mint {
                seq: next_seq,
                trigger: Trigger::Compromised,
                consumed_request_token: latest.consumed_request_token.clone(),
                consumed_annotation: latest.consumed_annotation.clone(),
            });
            p.rotating = Some(Why::new(
                reasons::EMERGENCY,
                "minting a successor for a compromised key",
            ));
            return p;
        }
        // The successor is in the trust bundle (step 3 ensured it): revoke the compromised keys
        // now, without waiting for confirmation. The bundle keeps the successor.
        if let Some(k) = keys
            .iter()
            .find(|k| k.state != KeyState::Revoked && compromised(k))
        {
            let mut p = Plan::new(Phase::Publishing).step(Step::Revoke {
                seq: k.seq,
                emergency: true,
            });
            p.rotating = Some(Why::new(
                reasons::EMERGENCY,
                format!("revoking compromised key {}", k.kid),
            ));
            return p;
        }
    }

    // 5. Activation: the newest published key becomes current once `publishDelay` has passed
    //    since the trust bundle was seen to contain it. The very first key has no predecessor
    //    to keep agents working meanwhile, so it is activated at once.
    let cur = current(keys);
    let mut publishing = None;
    if let Some(newest) = keys.iter().rev().find(|k| k.state == KeyState::Published) {
        let newer_than_current = cur.is_none_or(|c| newest.seq > c.seq);
        if newer_than_current {
            let published_at = newest.published_at.unwrap_or(now);
            // Step 4 revoked any compromised current key, so an emergency activation is one with
            // no current key left and a compromised older key.
            let emergency = newest.trigger == Trigger::Compromised
                || (cur.is_none()
                    && keys
                        .iter()
                        .any(|k| k.seq < newest.seq && settings.compromised.contains(&k.kid)));
            // The first key and an emergency successor go out as soon as they are published.
            let due = if cur.is_none() || emergency {
                now
            } else {
                add(published_at, settings.publish_delay)
            };
            if now >= due {
                return Plan::new(Phase::Publishing).step(Step::Activate {
                    seq: newest.seq,
                    emergency,
                });
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
            publishing = Some(p);
        }
    }
    let Some(cur) = cur else {
        if let Some(p) = publishing {
            return finish(p, settings, obs, now);
        }
        // Only revoked or retiring keys and nothing active: should not happen; mint.
        return Plan::new(Phase::Pending).step(Step::Mint {
            seq: next_seq,
            trigger: Trigger::Initial,
            consumed_request_token: latest.consumed_request_token.clone(),
            consumed_annotation: latest.consumed_annotation.clone(),
        });
    };

    // 6. Older active keys retire (the newer one is current).
    if let Some(k) = keys
        .iter()
        .find(|k| k.state == KeyState::Active && k.seq < cur.seq)
    {
        return Plan::new(Phase::Confirming).step(Step::Retire { seq: k.seq });
    }
    // Keys published before the current one never became current (superseded); retire them too.
    if let Some(k) = keys
        .iter()
        .find(|k| k.state == KeyState::Published && k.seq < cur.seq)
    {
        return Plan::new(Phase::Confirming).step(Step::Retire { seq: k.seq });
    }

    // 7. Hand the current key out.
    let token_refresh_at = match &obs.agent_secret {
        AgentSecretObs::Owned(s) if s.kid.as_deref() == Some(cur.kid.as_str()) => {
            let refresh_at = match (s.token_iat, s.token_exp) {
                (Some(iat), Some(exp)) => {
                    // Re-issue at half the token's life, and when the spec's ttl changed.
                    let half = iat + (exp - iat) / 2;
                    DateTime::from_timestamp(half, 0)
                        .filter(|_| (exp - iat) as u64 == settings.token_ttl.as_secs())
                }
                _ => None,
            };
            let reason = if s.has_private_key != settings.include_private_key
                || !s.metadata_matches
                || !s.token_claims_match
            {
                Some(HandOutReason::Repair)
            } else if refresh_at.is_none_or(|r| now >= r) {
                Some(HandOutReason::TokenRefresh)
            } else {
                None
            };
            if let Some(reason) = reason {
                return Plan::new(Phase::Ready).step(Step::HandOut {
                    seq: cur.seq,
                    reason,
                });
            }
            refresh_at
        }
        AgentSecretObs::Owned(_) => {
            return Plan::new(Phase::Confirming).step(Step::HandOut {
                seq: cur.seq,
                reason: HandOutReason::NewKey,
            });
        }
        _ => {
            return Plan::new(Phase::Pending).step(Step::HandOut {
                seq: cur.seq,
                reason: HandOutReason::NewKey,
            });
        }
    };

    if let Some(p) = publishing {
        return finish(p, settings, obs, now);
    }
    let mut p = Plan::new(Phase::Ready);
    p.token_refresh_at = token_refresh_at;
    if let Some(t) = token_refresh_at {
        p.wake_at(t, now);
    }

    // 8. Revocation of retiring keys: only on evidence.
    if let Some(old) = keys.iter().find(|k| k.state == KeyState::Retiring) {
        let retired_at = old.retired_at.unwrap_or(now);
        if obs.consumers.is_empty() {
            let due = add(retired_at, settings.overlap);
            if now >= due {
                return Plan::new(Phase::Overlap).step(Step::Revoke {
                    seq: old.seq,
                    emergency: false,
                });
            }
            p.phase = Phase::Overlap;
            p.rotating = Some(Why::new(
                reasons::OVERLAP,
                format!(
                    "old key {} stays trusted until {} (no PolicyAgent references this key)",
                    old.kid,
                    due.to_rfc3339()
                ),
            ));
            p.wake_at(due, now);
        } else {
            let waiting: Vec<&Consumer> = obs
                .consumers
                .iter()
                .filter(|c| c.confirmed_kid.as_deref() != Some(cur.kid.as_str()))
                .collect();
            if waiting.is_empty() {
                return Plan::new(Phase::Confirming).step(Step::Revoke {
                    seq: old.seq,
                    emergency: false,
                });
            }
            let names: Vec<String> = waiting
                .iter()
                .map(|c| match &c.waiting_reason {
                    Some(r) => format!("{} ({r})", c.name),
                    None => c.name.clone(),
                })
                .collect();
            p.phase = Phase::Confirming;
            p.rotating = Some(Why::new(
                reasons::CONFIRMING,
                format!(
                    "old key {} stays trusted until every PolicyAgent is confirmed on {}; waiting for {}",
                    old.kid,
                    cur.kid,
                    names.join(", ")
                ),
            ));
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
                        "agents not confirmed on {} within {}: {}; old key {} stays trusted",
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
        return finish(p, settings, obs, now);
    }

    // 9. Prune old revoked key Secrets.
    let revoked: Vec<&ObservedKey> = keys
        .iter()
        .filter(|k| k.state == KeyState::Revoked)
        .collect();
    if revoked.len() > RETAIN_REVOKED {
        return p.step(Step::Prune {
            seq: revoked[0].seq,
        });
    }

    // 10. Start a rotation when one is due or requested.
    let requested = if settings.request_token.is_some()
        && settings.request_token != latest.consumed_request_token
    {
        Some(Trigger::RequestToken)
    } else if obs.rotate_annotation.is_some() && obs.rotate_annotation != latest.consumed_annotation
    {
        Some(Trigger::Annotation)
    } else {
        None
    };
    let scheduled = settings
        .interval
        .map(|i| add(cur.activated_at.unwrap_or(cur.created_at), i));
    p.next_rotation_at = scheduled;
    let trigger = match (requested, scheduled) {
        (Some(t), _) => Some(t),
        (None, Some(due)) if now >= due => Some(Trigger::Interval),
        (None, Some(due)) => {
            p.wake_at(due, now);
            None
        }
        (None, None) => None,
    };
    if let Some(trigger) = trigger {
        if settings.suspend {
            p.phase = Phase::Suspended;
            return finish(p, settings, obs, now);
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
            return finish(p, settings, obs, now);
        }
        let mut p = p.step(Step::Mint {
            seq: next_seq,
            trigger,
            consumed_request_token: settings.request_token.clone(),
            consumed_annotation: obs.rotate_annotation.clone(),
        });
        p.phase = Phase::Publishing;
        return p;
    }
    if settings.suspend {
        p.phase = Phase::Suspended;
    }
    finish(p, settings, obs, now)
}

/// Fills the fields every waiting plan reports.
fn finish(mut p: Plan, settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    if p.next_rotation_at.is_none()
        && let (Some(i), Some(c)) = (settings.interval, current(&obs.keys))
    {
        let due = add(c.activated_at.unwrap_or(c.created_at), i);
        p.next_rotation_at = Some(due);
    }
    if p.token_refresh_at.is_none()
        && let AgentSecretObs::Owned(AgentSecret {
            token_iat: Some(iat),
            token_exp: Some(exp),
            ..
        }) = &obs.agent_secret
        && let Some(t) = DateTime::from_timestamp(iat + (exp - iat) / 2, 0)
    {
        p.token_refresh_at = Some(t);
        p.wake_at(t, now);
    }
    p
}
