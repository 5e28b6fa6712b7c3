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
//!
//! A first key, minted while nothing is trusted and no agent Secret exists, is created `Active`
//! (see `first_key_fast`): its path is key Secret, trust bundle, agent Secret. Scheduled times
//! (interval rotation, token refresh) are moved a little earlier per key, see [`schedule`].

mod revoke;
pub mod rules;
mod settings;
#[cfg(test)]
mod tests;

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::trust_record::{Legacy, TrustRecord};

pub mod desired;
pub mod observe;
pub mod outcome;
pub mod schedule;
pub mod snapshot;
pub mod window;
pub mod write;

pub use settings::{
    DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEFAULT_PUBLISH_DELAY, DEFAULT_TOKEN_TTL, Floors, LastGood,
    Names, Refusal, Settings, SpecError, claim_name, default_audience, names, parse_duration,
    resolve_or_keep, valid_compromised,
};

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
    /// Revoked, reversibly: out of the trust bundle and the trust record (every verifier
    /// refuses it), private key kept until `retainDeactivatedFor` has passed; it can be
    /// reactivated until then.
    Deactivated,
    /// Revoked for good: no longer trusted, private key material deleted.
    Destroyed,
}

impl KeyState {
    pub const ALL: [KeyState; 6] = [
        KeyState::Pending,
        KeyState::Published,
        KeyState::Active,
        KeyState::Retiring,
        KeyState::Deactivated,
        KeyState::Destroyed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Pending => "pending",
            KeyState::Published => "published",
            KeyState::Active => "active",
            KeyState::Retiring => "retiring",
            KeyState::Deactivated => "deactivated",
            KeyState::Destroyed => "destroyed",
        }
    }

    /// The name shown in status.
    pub fn display(self) -> &'static str {
        match self {
            KeyState::Pending => "Pending",
            KeyState::Published => "Published",
            KeyState::Active => "Active",
            KeyState::Retiring => "Retiring",
            KeyState::Deactivated => "Deactivated",
            KeyState::Destroyed => "Destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s == "revoked" {
            // The label written before revocation had two steps (private key deleted at once).
            return Some(KeyState::Destroyed);
        }
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the key was revoked: deactivated or destroyed, refused by every verifier.
    pub fn revoked(self) -> bool {
        matches!(self, KeyState::Deactivated | KeyState::Destroyed)
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
    /// The current key can no longer be served: its key Secret was deleted, or its private key
    /// removed without a recorded revocation. Never delayed by `minInterval`, `suspend` or a
    /// refused spec (liveness).
    Replacement,
}

impl Trigger {
    pub const ALL: [Trigger; 6] = [
        Trigger::Initial,
        Trigger::Interval,
        Trigger::RequestToken,
        Trigger::Annotation,
        Trigger::Compromised,
        Trigger::Replacement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Initial => "Initial",
            Trigger::Interval => "Interval",
            Trigger::RequestToken => "RequestToken",
            Trigger::Annotation => "Annotation",
            Trigger::Compromised => "Compromised",
            Trigger::Replacement => "Replacement",
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
    /// When the key was destroyed.
    pub revoked_at: Option<DateTime<Utc>>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub reactivated_at: Option<DateTime<Utc>>,
    /// The `keyward.dev/reactivate` annotation value this key's last reactivation consumed.
    pub consumed_reactivate: Option<String>,
    pub has_private_key: bool,
    /// `exp` of the last token this key signed, recorded when it retired.
    pub last_token_exp: Option<DateTime<Utc>>,
    /// Why the key Secret's labels or annotations disagree with its evidence (someone edited
    /// them); the state above is the one the evidence supports, and the metadata is restored.
    pub edited: Option<String>,
}

/// The trust bundle ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BundleObs {
    Missing,
    /// Exists but is not controlled by this ProvisioningKey.
    Foreign,
    Owned {
        /// Key ids of the entries whose `kid` is the RFC 7638 thumbprint of their key.
        kids: Vec<String>,
        revoked: Vec<String>,
        /// The highest key sequence number ever minted, recorded on every bundle write, so that a
        /// deleted key Secret never frees its number.
        last_seq: u32,
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
    /// Whether the token carries exactly the static claims of `spec.token.claims` (a change is
    /// a token refresh).
    pub static_claims_match: bool,
    pub has_private_key: bool,
    /// Whether it holds a token (a key in proof-of-possession mode hands out none).
    pub has_token: bool,
    /// Whether labels, annotations and type match what Keyward would write.
    pub metadata_matches: bool,
    /// When this key id was first handed out in the Secret (kept across token refreshes).
    pub handed_out_at: Option<DateTime<Utc>>,
    /// `aud` and `iss` of the token it holds (the last good claims when the spec is refused).
    pub token_audience: Option<String>,
    pub token_issuer: Option<String>,
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

/// A pod that uses the agent Secret but belongs to no workload of a PolicyAgent referencing the
/// key: it has no evidence, so the time fallback applies to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Uncovered {
    pub pod: String,
    /// `Kind/name` of the pod's controller, or `Pod/<name>` for a bare pod.
    pub workload: String,
}

/// Everything the decision needs, gathered by fresh reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Key Secrets, sorted by `seq` ascending.
    pub keys: Vec<ObservedKey>,
    /// The `keyward.dev/rotate` annotation on the ProvisioningKey.
    pub rotate_annotation: Option<String>,
    /// The `keyward.dev/reactivate` annotation on the ProvisioningKey.
    pub reactivate_annotation: Option<String>,
    pub bundle: BundleObs,
    pub agent_secret: AgentSecretObs,
    pub consumers: Vec<Consumer>,
    /// Consumers no PolicyAgent covers. `None` when the pods were not looked at (no key is
    /// retiring); a retiring key is never revoked on `None`.
    pub uncovered: Option<Vec<Uncovered>>,
    /// Key use reported by the verifier replicas. `None` when not read; a key with
    /// `revokeWhenUnusedFor` is never revoked on `None`.
    pub usage: Option<UsageObs>,
    /// The trust record on the ProvisioningKey (see [`crate::trust_record`]): `None` when it has
    /// none yet; an unreadable one counts as recording nothing.
    pub record: Option<TrustRecord>,
    /// Whether the record is still (or also) in the earlier versions' annotation.
    pub legacy_record: crate::trust_record::Legacy,
}

/// Key use reported by the verifier replicas, see [`crate::usage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageObs {
    /// What the replicas watching the key's namespace vouch for, or why they cannot.
    pub coverage: Result<crate::usage::Covered, crate::usage::NoCoverage>,
    pub key_use: crate::usage::KeyUse,
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
        /// The key Secret is created already `active` (published and activated at its creation):
        /// only for a first key, when no key is trusted and no agent holds one, see
        /// `first_key_fast`. Otherwise `pending`, and the key goes through `MarkPublished`,
        /// `WriteBundle`, `RecordPublished` and `Activate` (after `publishDelay`) as usual.
        active: bool,
    },
    /// Label the key `published` (before it is written into the trust bundle).
    MarkPublished { seq: u32 },
    /// Write the trust record (the key ids the operator minted, and the claims it signs with)
    /// into status before anything is published or handed out under it (a key's very first
    /// record rides on the reconcile's status write instead, see [`Plan::record`]).
    WriteRecord { record: TrustRecord },
    /// Remove the earlier versions' record annotation, once the status holds a newer record.
    DropLegacyRecord,
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
    /// Revoke, reversibly: state `deactivated` (out of the trusted set), private key kept.
    Deactivate { seq: u32 },
    /// Revoke for good: state `destroyed`, private key material deleted. `emergency` for a key
    /// listed in `compromisedKeys` (never deactivated first).
    Destroy { seq: u32, emergency: bool },
    /// Put a deactivated key back into the trusted set (state `retiring`), on the
    /// `keyward.dev/reactivate` annotation whose value `request` this consumes.
    Reactivate { seq: u32, request: String },
    /// Delete an old destroyed key Secret beyond [`RETAIN_REVOKED`].
    Prune { seq: u32 },
    /// Restore the labels and annotations of a key Secret that someone edited (its state stays
    /// the one its evidence supports).
    Repair { seq: u32 },
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
    /// Trusted key ids that no key Secret accounts for (reported with a Warning).
    pub unrecorded: Vec<String>,
    /// Key ids the bundle trusts that the operator never recorded: injected by someone who may
    /// write the ConfigMap. The bundle is rewritten without them (`BundleTampered`).
    pub injected: Vec<String>,
    /// A first trust record that the status write ending this reconcile carries (see
    /// [`first_record`]), instead of a `WriteRecord` step of its own.
    pub record: Option<TrustRecord>,
}

impl Plan {
    /// A plan with no step: the object is in `phase` and nothing else is known yet.
    pub fn new(phase: Phase) -> Self {
        Plan {
            step: None,
            phase,
            blocked: None,
            rotating: None,
            stalled: None,
            requeue_after: None,
            next_rotation_at: None,
            token_refresh_at: None,
            unrecorded: Vec::new(),
            injected: Vec::new(),
            record: None,
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
    use crate::reason::Reason;

    pub const KEY_ACTIVE: &str = Reason::KeyActive.as_str();
    pub const MINTING: &str = Reason::Minting.as_str();
    pub const PUBLISHING: &str = Reason::Publishing.as_str();
    pub const CONFIRMING: &str = Reason::AwaitingConfirmation.as_str();
    pub const OVERLAP: &str = Reason::Overlap.as_str();
    pub const ROTATION_STALLED: &str = Reason::RotationStalled.as_str();
    pub const SUSPENDED: &str = Reason::Suspended.as_str();
    pub const IDLE: &str = Reason::Idle.as_str();
    pub const SECRET_NAME_TAKEN: &str = Reason::SecretNameTaken.as_str();
    pub const TRUST_BUNDLE_NAME_TAKEN: &str = Reason::TrustBundleNameTaken.as_str();
    pub const EMERGENCY: &str = Reason::EmergencyRevocation.as_str();
    pub const REFUSED: &str = Reason::RotationRefused.as_str();
    pub const UNCOVERED_CONSUMERS: &str = Reason::UncoveredConsumers.as_str();
    pub const UNRECORDED_KEYS: &str = Reason::UnrecordedTrustedKeys.as_str();
    /// The trust bundle trusted a key id the operator never recorded; it was removed.
    pub const BUNDLE_TAMPERED: &str = Reason::BundleTampered.as_str();
    /// `revokeWhenUnusedFor` cannot be judged: no verifier replica, or one is silent.
    pub const VERIFIER_SILENT: &str = Reason::VerifierSilent.as_str();
    /// `revokeWhenUnusedFor` cannot be judged yet: a verifier replica is alive but behind with
    /// its reports (a burst of keys); the old key stays trusted meanwhile.
    pub const VERIFIER_BEHIND: &str = Reason::VerifierBehind.as_str();
    /// `revokeWhenUnusedFor`: the old key is still in use.
    pub const OLD_KEY_IN_USE: &str = Reason::OldKeyInUse.as_str();
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
        .filter(|k| k.state.revoked())
        .map(|k| k.kid.clone())
        .collect();
    (trusted, revoked)
}

/// The current key: the newest `Active` one.
pub fn current(keys: &[ObservedKey]) -> Option<&ObservedKey> {
    keys.iter().rev().find(|k| k.state == KeyState::Active)
}

/// The trust bundle the key Secrets call for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleTarget {
    /// Trusted key ids: those of trusted key Secrets in `seq` order, then the unrecorded ones.
    pub trusted: Vec<String>,
    /// Revoked key ids: those of revoked key Secrets, then earlier entries of the bundle's own
    /// list that are not trusted (a pruned key stays listed), bounded.
    pub revoked: Vec<String>,
    /// Key ids the bundle trusts that no key Secret accounts for (a key Secret deleted or its
    /// labels edited) but the trust record lists: the operator minted them. Only the revocation
    /// path removes a trusted key, so they stay trusted, unless listed in `compromisedKeys`.
    pub unrecorded: Vec<String>,
    /// Key ids the bundle trusts that neither a key Secret nor the trust record accounts for:
    /// never minted by the operator. They are dropped.
    pub injected: Vec<String>,
    /// The highest sequence number ever minted.
    pub last_seq: u32,
}

/// How often a key whose old key waits for consumers no PolicyAgent covers looks at the pods
/// again (they may have gone away, which ends the wait).
pub const UNCOVERED_RECHECK: Duration = Duration::from_secs(15);

/// Most entries kept in the bundle's revoked list.
pub const REVOKED_LIST_LIMIT: usize = 100;

/// What the trust bundle should hold. A key id is added only from a minted key Secret; one
/// already trusted leaves only through revocation (its key Secret revoked, or listed as
/// compromised); a revoked one is never trusted again.
pub fn bundle_target(settings: &Settings, obs: &Observed) -> BundleTarget {
    let keys = &obs.keys;
    let (mut trusted, mut revoked) = desired_bundle(keys);
    let (bundle_kids, bundle_revoked, bundle_seq) = match &obs.bundle {
        BundleObs::Owned {
            kids,
            revoked,
            last_seq,
        } => (kids.as_slice(), revoked.as_slice(), *last_seq),
        _ => (&[][..], &[][..], 0),
    };
    let known = |kid: &String| keys.iter().any(|k| &k.kid == kid);
    let recorded = |kid: &String| obs.record.as_ref().is_some_and(|r| r.has(kid));
    let mut unrecorded = Vec::new();
    let mut injected = Vec::new();
    for kid in bundle_kids.iter().filter(|k| !known(k)) {
        if settings.compromised.contains(kid) {
            revoked.push(kid.clone());
        } else if !recorded(kid) {
            if !injected.contains(kid) {
                injected.push(kid.clone());
            }
        } else if !unrecorded.contains(kid) {
            unrecorded.push(kid.clone());
        }
    }
    trusted.extend(unrecorded.iter().cloned());
    for kid in bundle_revoked {
        if revoked.len() >= REVOKED_LIST_LIMIT {
            break;
        }
        if !revoked.contains(kid) && !trusted.contains(kid) {
            revoked.push(kid.clone());
        }
    }
    BundleTarget {
        trusted,
        revoked,
        unrecorded,
        injected,
        last_seq: keys
            .iter()
            .map(|k| k.seq)
            .max()
            .unwrap_or(0)
            .max(bundle_seq),
    }
}

/// The trust record the evidence calls for: every key id minted and not revoked (nor listed as
/// compromised), and every recorded one whose key Secret was lost while the bundle still
/// trusts it; each with the longest token lifetime it signed (never lowered: a token issued
/// before the ttl was lowered lives as long as it was issued for). The names and claims are the
/// settings the operator signs with (the last good ones when the spec is refused).
pub fn desired_record(settings: &Settings, obs: &Observed) -> TrustRecord {
    let prev = obs.record.as_ref();
    let before = |kid: &str| prev.and_then(|r| r.kids.get(kid)).copied().unwrap_or(0);
    let ttl = settings.token_ttl.as_secs();
    // The lifetime of the token the agent Secret holds now (a ttl lowered since it was issued).
    let held = match &obs.agent_secret {
        AgentSecretObs::Owned(a) => match (&a.kid, a.token_iat, a.token_exp) {
            (Some(kid), Some(iat), Some(exp)) if exp > iat => Some((
                kid.as_str(),
                u64::try_from(exp - iat)
                    .unwrap_or(0)
                    .min(crate::api::limits::TOKEN_TTL.duration().as_secs()),
            )),
            _ => None,
        },
        _ => None,
    };
    let mut kids = std::collections::BTreeMap::new();
    for k in obs
        .keys
        .iter()
        .filter(|k| !k.state.revoked() && !settings.compromised.contains(&k.kid))
    {
        let held = held.filter(|(kid, _)| *kid == k.kid).map_or(0, |(_, t)| t);
        kids.insert(k.kid.clone(), before(&k.kid).max(ttl).max(held));
    }
    if let (Some(r), BundleObs::Owned { kids: listed, .. }) = (prev, &obs.bundle) {
        for kid in listed {
            if let Some(t) = r.kids.get(kid)
                && !kids.contains_key(kid)
                && !settings.compromised.contains(kid)
                && !obs.keys.iter().any(|k| &k.kid == kid)
            {
                kids.insert(kid.clone(), *t);
            }
        }
    }
    // Deactivated keys, with the time of their deactivation (the record's own, once written).
    let deactivated = obs
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Deactivated && !settings.compromised.contains(&k.kid))
        .map(|k| {
            let at = prev
                .and_then(|r| r.deactivated.get(&k.kid))
                .copied()
                .or(k.deactivated_at.map(|t| t.timestamp()))
                .unwrap_or(0);
            (k.kid.clone(), at)
        })
        .collect();
    TrustRecord {
        bundle: settings.trust_bundle_name.clone(),
        aud: settings.audience.clone(),
        iss: settings.issuer.clone(),
        kids,
        deactivated,
        claims: settings.claims.clone(),
        pop: settings.proof_of_possession,
    }
}

/// The key Secrets as the trust record vouches for them. A key the record holds deactivated
/// is deactivated whatever its key Secret says (someone removed the annotation), unless the
/// Secret shows the reactivation the ProvisioningKey's `keyward.dev/reactivate` annotation
/// asks for now: then the record is behind the Secret, and is written next. `None` when the
/// record and the Secrets agree.
pub fn anchored(obs: &Observed) -> Option<Observed> {
    let record = obs.record.as_ref()?;
    if record.deactivated.is_empty() {
        return None;
    }
    let lost = |k: &ObservedKey| {
        let at = record.deactivated.get(&k.kid)?;
        if k.state.revoked() {
            return None;
        }
        let reactivated = k.reactivated_at.is_some_and(|r| r.timestamp() >= *at)
            && k.consumed_reactivate.is_some()
            && k.consumed_reactivate == obs.reactivate_annotation;
        (!reactivated).then_some(*at)
    };
    if !obs.keys.iter().any(|k| lost(k).is_some()) {
        return None;
    }
    let mut o = obs.clone();
    for k in &mut o.keys {
        if let Some(at) = lost(k) {
            k.edited = Some(format!(
                "the trust record holds it deactivated but the key Secret says {}",
                k.state.as_str()
            ));
            k.state = KeyState::Deactivated;
            k.deactivated_at = DateTime::from_timestamp(at, 0);
        }
    }
    Some(o)
}

/// The record to write, when the one on the ProvisioningKey differs from what the evidence
/// calls for. A key that has none and nothing to record writes none.
fn record_to_write(settings: &Settings, obs: &Observed) -> Option<TrustRecord> {
    let want = desired_record(settings, obs);
    match &obs.record {
        None if want.kids.is_empty() => None,
        // Read from the earlier versions' annotation: written into status as it is.
        Some(have) if *have == want && obs.legacy_record != Legacy::Only => None,
        _ => Some(want),
    }
}

/// Whether a record to write is a key's first one, which the reconcile's closing status write
/// carries instead of a write of its own (the fourth write of a new key, not the fifth).
///
/// Safe because nothing is recorded yet: the verifier trusts no key id of this key until a
/// record exists, so writing the bundle or handing out a token before it makes nothing trusted
/// that the record would not. It only delays, by the rest of one reconcile, when the first
/// token starts to pass; no agent held a passing token before it. Any later record (a new key
/// id beside a trusted one, a revocation) is still written first, as its own step. A reconcile
/// that fails before its status write leaves no record, and the next one carries it again.
///
/// Only for a key's own first key: nothing recorded, at most one key Secret, and the bundle and
/// the agent Secret (if any) hold that key alone. A key that predates the record (an upgrade
/// from a version without one) has its key ids recorded first, as before.
fn first_record(obs: &Observed) -> bool {
    let [key] = obs.keys.as_slice() else {
        return obs.keys.is_empty() && obs.record.is_none();
    };
    let only = |kid: &str| kid == key.kid;
    obs.record.is_none()
        && match &obs.bundle {
            BundleObs::Owned { kids, .. } => kids.iter().all(|k| only(k)),
            _ => true,
        }
        && match &obs.agent_secret {
            AgentSecretObs::Owned(a) => a.kid.as_deref().is_none_or(only),
            _ => true,
        }
}

/// Whether the earlier versions' record annotation is left to remove: the status holds a newer
/// record (a copy is kept for verifiers of an earlier version while an upgrade rolls).
fn drop_legacy(obs: &Observed) -> bool {
    obs.legacy_record == Legacy::Stale
}

/// Whether the trust bundle this key owns lists `kid`.
fn listed(obs: &Observed, kid: &str) -> bool {
    matches!(&obs.bundle, BundleObs::Owned { kids, .. } if kids.iter().any(|k| k == kid))
}

/// Whether the first key is created already `active` (published and activated in the same
/// POST), which takes its path from six writes to three: key Secret, trust bundle, agent Secret.
///
/// `MarkPublished`, `RecordPublished`, `Activate` and `publishDelay` order three facts for a
/// successor: (1) the trust bundle lists the new key, (2) every verifier has had `publishDelay`
/// to reload it while agents keep presenting the old, trusted key, (3) agents get the new key.
/// With no key trusted and no agent Secret, (2) protects nobody: no agent presents any key that
/// could stop working, and the planner never applied `publishDelay` to a first key anyway
/// (step 4 activates it at once). What must stay is (1) before (3), and that is enforced from
/// evidence, not from the key's state: step 6 hands a key out only while the trust bundle this
/// key owns lists it. So every crash point resumes safely:
/// - after the key Secret's POST: `active`, no bundle -> step 3 writes it, then step 6 hands out;
/// - after the bundle write: step 6 hands out;
/// - a bundle someone else owns: never handed out (and the key stays trusted nowhere);
/// - a second POST of the same seq (a restart, a lagging read) gets 409: the name is the seq, so
///   it never mints a second key for it.
///
/// Not when the bundle already trusts a key (one no key Secret records) or an agent Secret
/// exists: an agent may hold a trusted key, so the ordinary path with `publishDelay` applies.
/// Later rotations are unchanged.
fn first_key_fast(obs: &Observed, target: &BundleTarget) -> bool {
    obs.keys.is_empty() && target.trusted.is_empty() && obs.agent_secret == AgentSecretObs::Missing
}

/// A rotation request not yet served: a new `requestToken` or a new annotation value.
fn requested(settings: &Settings, obs: &Observed, latest: &ObservedKey) -> Option<Trigger> {
    if settings.request_token.is_some() && settings.request_token != latest.consumed_request_token {
        Some(Trigger::RequestToken)
    } else if obs.rotate_annotation.is_some() && obs.rotate_annotation != latest.consumed_annotation
    {
        Some(Trigger::Annotation)
    } else {
        None
    }
}

/// Decide the next step. Pure: same inputs, same plan.
///
/// Liveness comes first: a name owned by someone else, or a refused spec, refuses only what is
/// unsafe (writes to the foreign object, new rotations); the current key keeps being served.
pub fn plan(settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    let anchored_obs = anchored(obs);
    let obs = anchored_obs.as_ref().unwrap_or(obs);
    let mut p = rules::decide(settings, obs, now);
    let mut dropped = false;
    if obs.agent_secret == AgentSecretObs::Foreign {
        p.blocked.get_or_insert_with(|| {
            Why::new(
                reasons::SECRET_NAME_TAKEN,
                format!(
                    "Secret {:?} exists and is not owned by this ProvisioningKey; Keyward does not write it. Delete it or choose another secretName",
                    settings.secret_name
                ),
            )
        });
        if matches!(p.step, Some(Step::HandOut { .. })) {
            p.step = None;
            p.phase = Phase::Invalid;
            dropped = true;
        }
    }
    if obs.bundle == BundleObs::Foreign {
        p.blocked.get_or_insert_with(|| {
            Why::new(
                reasons::TRUST_BUNDLE_NAME_TAKEN,
                format!(
                    "ConfigMap {:?} exists and is not owned by this ProvisioningKey; Keyward does not write it and publishes no new key. Delete it or choose another trustBundle.configMapName",
                    settings.trust_bundle_name
                ),
            )
        });
    }
    if let Some(refused) = &settings.refused {
        p.blocked = Some(Why::new(refused.reason, refused.message.clone()));
        if let Some(Step::Mint { trigger, .. }) = &p.step
            && !matches!(trigger, Trigger::Compromised | Trigger::Replacement)
        {
            p.rotating = Some(Why::new(
                reasons::REFUSED,
                format!(
                    "{} rotation refused while the spec is refused ({}); key {} is still served",
                    trigger.as_str(),
                    refused.reason,
                    current(&obs.keys).map_or("-", |c| c.kid.as_str())
                ),
            ));
            p.step = None;
            p.phase = if settings.suspend {
                Phase::Suspended
            } else {
                Phase::Ready
            };
            dropped = true;
        }
    }
    // A key with nothing minted yet has nothing to keep alive: a refused spec or a name owned by
    // someone else writes nothing at all, not even a key Secret.
    if obs.keys.is_empty() && p.blocked.is_some() {
        p.step = None;
        p.rotating = None;
        dropped = true;
    }
    if dropped {
        p = finish(p, settings, obs, now);
    }
    if p.blocked.is_some() && current(&obs.keys).is_none() && p.step.is_none() {
        p.phase = Phase::Invalid;
    }
    // The trust record comes before any other write: a key id is recorded before the bundle
    // publishes it and before a token of it is handed out; a revoked one leaves it first. A
    // first record rides on the status write instead (`first_record`).
    if let Some(record) = record_to_write(settings, obs) {
        if first_record(obs) {
            p.record = Some(record);
        } else {
            p.step = Some(Step::WriteRecord { record });
        }
    } else if p.step.is_none() && drop_legacy(obs) {
        p.step = Some(Step::DropLegacyRecord);
    }
    p
}

/// How often a key waiting on reported use looks again (Lease renewals wake nothing).
pub const USAGE_RECHECK: Duration = Duration::from_secs(10);

fn ts_secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The distinct workloads of uncovered consumers, sorted.
pub fn uncovered_workloads(uncovered: &[Uncovered]) -> Vec<String> {
    let mut w: Vec<String> = uncovered.iter().map(|u| u.workload.clone()).collect();
    w.sort();
    w.dedup();
    w
}

/// Fills the fields every waiting plan reports.
fn finish(mut p: Plan, settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    // The times shown are the ones acted on (offsets included).
    if p.next_rotation_at.is_none()
        && let Some(c) = current(&obs.keys)
    {
        p.next_rotation_at = schedule::rotation_start(settings, c, now);
    }
    if p.token_refresh_at.is_none()
        && let AgentSecretObs::Owned(AgentSecret {
            token_iat: Some(iat),
            token_exp: Some(exp),
            ..
        }) = &obs.agent_secret
        && let Some(t) = schedule::token_refresh_at(settings, *iat, *exp)
    {
        p.token_refresh_at = Some(t);
        p.wake_at(t, now);
    }
    p
}
