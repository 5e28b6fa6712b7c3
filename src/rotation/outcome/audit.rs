//! The audit of a reconcile, pure: the Events an applied step describes (one function per step
//! kind) and those a report's condition transitions call for. Notes name key ids and
//! fingerprints only, never key bytes.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;

use super::{Minted, UNRECORDED, cond, find, in_flight, key_ref};
use crate::api::conditions;
use crate::api::provisioning_key::{ProvisioningKey, ProvisioningKeyStatus};
use crate::rotation::desired::key_secret_name;
use crate::rotation::observe::ts;
use crate::rotation::snapshot::Read;
use crate::rotation::{self, HandOutReason, Observed, ObservedKey, Plan, Settings, Step, Trigger};

/// Event reasons (PascalCase), shared with conditions and metrics.
pub mod reason {
    use crate::reason::Reason;

    pub const KEY_MINTED: &str = Reason::KeyMinted.as_str();
    pub const KEY_PUBLISHED: &str = Reason::KeyPublished.as_str();
    pub const KEY_ACTIVATED: &str = Reason::KeyActivated.as_str();
    pub const KEY_HANDED_OUT: &str = Reason::KeyHandedOut.as_str();
    pub const KEY_RETIRING: &str = Reason::KeyRetiring.as_str();
    pub const KEY_REVOKED: &str = Reason::KeyRevoked.as_str();
    pub const KEY_REACTIVATED: &str = Reason::KeyReactivated.as_str();
    pub const KEY_DESTROYED: &str = Reason::KeyDestroyed.as_str();
    pub const KEY_SECRET_REPAIRED: &str = Reason::KeySecretRepaired.as_str();
    pub const TOKEN_REFRESHED: &str = Reason::TokenRefreshed.as_str();
    pub const BUNDLE_TAMPERED: &str = Reason::BundleTampered.as_str();
    pub const EMERGENCY_REVOCATION: &str = Reason::EmergencyRevocation.as_str();
    pub const ROTATION_STALLED: &str = Reason::RotationStalled.as_str();
    pub const ROLLOUT_TRIGGERED: &str = Reason::RolloutTriggered.as_str();
    pub const AGENT_CONFIRMED: &str = Reason::AgentConfirmed.as_str();
}

/// One audited fact.
pub struct Audit<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: String,
    /// The object the fact is about besides the regarding one (for a key: its Secret).
    pub related: Option<ObjectReference>,
}

/// What the audit of one step is written from.
struct Facts<'a> {
    pk: &'a ProvisioningKey,
    settings: &'a Settings,
    obs: &'a Observed,
}

impl Facts<'_> {
    /// A fact about key `seq` (its key Secret is the related object).
    fn about(
        &self,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        seq: u32,
        note: String,
    ) -> Audit<'static> {
        Audit {
            warning,
            reason,
            action,
            note,
            related: Some(key_ref(self.pk, seq)),
        }
    }

    /// At most one fact about the observed key `seq`; none when it was not observed.
    fn about_key(
        &self,
        seq: u32,
        fact: impl FnOnce(&ObservedKey) -> Audit<'static>,
    ) -> Vec<Audit<'static>> {
        find(self.obs, seq).map(fact).into_iter().collect()
    }
}

/// The audit of an applied step: pure, one entry per fact (the step describes its own audit,
/// `apply` only writes, the reconcile records). Notes name key ids and fingerprints only.
pub fn step_audits(
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    minted: Option<&Minted>,
) -> Vec<Audit<'static>> {
    let f = Facts {
        pk,
        settings: &read.settings,
        obs: &read.observed,
    };
    match step {
        Step::Mint {
            seq,
            trigger,
            active,
            ..
        } => minted.map_or_else(Vec::new, |m| mint(&f, *seq, *trigger, *active, m)),
        // Recorded as it happens by the KeyMinted, KeyRevoked and EmergencyRevocation Events.
        Step::MarkPublished { .. }
        | Step::Prune { .. }
        | Step::WriteRecord { .. }
        | Step::DropLegacyRecord => Vec::new(),
        Step::WriteBundle { .. } => bundle_tampered(&f),
        Step::RecordPublished { seq } => f.about_key(*seq, |k| published(&f, *seq, k)),
        Step::Activate { seq, emergency } => {
            f.about_key(*seq, |k| activated(&f, *seq, k, *emergency))
        }
        Step::Retire { seq } => f.about_key(*seq, |k| retiring(&f, *seq, k)),
        Step::HandOut { seq, reason: why } => vec![handed_out(&f, *seq, *why)],
        Step::Deactivate { seq } => f.about_key(*seq, |k| deactivated(&f, *seq, k)),
        Step::Destroy { seq, emergency } => f.about_key(*seq, |k| revoked(&f, *seq, k, *emergency)),
        Step::Reactivate { seq, .. } => f.about_key(*seq, |k| reactivated(&f, *seq, k)),
        Step::Repair { seq } => f.about_key(*seq, |k| repaired(&f, *seq, k)),
    }
}

/// The audit Events of one reconcile, in the order of its steps. A first key's `KeyMinted` is
/// held until the reconcile hands that key out, and the two facts become one Event: a new key
/// costs one audit Event, not two. Each Event still states only facts that hold when it is
/// recorded:
/// - the hand-out may be held back (the agent Secret's or the bundle's name taken, a key
///   listed as compromised first) or fail: then the `KeyMinted` Event is recorded alone, at the
///   next audited step or when the reconcile ends, successful or not ([`Trail::finish`]);
/// - any other audited step recorded in between flushes it first, so Events keep their order;
/// - a hand-out in a later reconcile (a restart, re-creating a deleted agent Secret) keeps its
///   own `KeyHandedOut` Event.
///
/// A process killed between a write and its Event loses that Event, with or without the hold;
/// the hold widens that window from one request to the few writes of one reconcile.
#[derive(Default)]
pub struct Trail {
    held: Option<(u32, Audit<'static>)>,
}

impl Trail {
    /// The Events to record now, after `step` was applied and described by `audits`
    /// ([`step_audits`]).
    pub fn after(&mut self, step: &Step, audits: Vec<Audit<'static>>) -> Vec<Audit<'static>> {
        let mut now = Vec::new();
        if let Step::HandOut {
            seq,
            reason: HandOutReason::NewKey,
        } = step
            && self.held.as_ref().is_some_and(|(held, _)| held == seq)
            && let Some((_, mut minted)) = self.held.take()
        {
            for a in audits {
                if a.reason == reason::KEY_HANDED_OUT {
                    minted.action = "MintAndHandOut";
                    minted.note = format!("{}; handed out: {}", minted.note, a.note);
                } else {
                    now.push(a);
                }
            }
            now.insert(0, minted);
            return now;
        }
        if !audits.is_empty() {
            now.extend(self.finish());
        }
        match step {
            Step::Mint {
                seq,
                active: true,
                trigger,
                ..
            } if *trigger != Trigger::Compromised
                && audits.len() == 1
                && audits.iter().all(|a| a.reason == reason::KEY_MINTED) =>
            {
                now.extend(self.finish());
                self.held = audits.into_iter().next().map(|a| (*seq, a));
            }
            _ => now.extend(audits),
        }
        now
    }

    /// The Event still held: recorded when the reconcile ends, however it ends.
    pub fn finish(&mut self) -> Vec<Audit<'static>> {
        self.held.take().map(|(_, a)| a).into_iter().collect()
    }
}

/// A key minted (nothing new when the key Secret already existed, minted before a crash: then
/// there is no `Minted`). A first key created active shares its Event with its hand-out
/// ([`Trail`]).
fn mint(
    f: &Facts<'_>,
    seq: u32,
    trigger: Trigger,
    active: bool,
    m: &Minted,
) -> Vec<Audit<'static>> {
    let settings = f.settings;
    let note = if active {
        format!(
            "minted key {} (fingerprint {}, seq {seq}, trigger {}) as the first key, created active: no key was trusted and no agent held one, so publishDelay protects nobody; trust bundle {} lists it before Secret {} carries it",
            m.kid,
            m.fingerprint,
            trigger.as_str(),
            settings.trust_bundle_name,
            settings.secret_name
        )
    } else {
        format!(
            "minted key {} (fingerprint {}, seq {seq}, trigger {})",
            m.kid,
            m.fingerprint,
            trigger.as_str()
        )
    };
    let mut facts = vec![f.about(false, reason::KEY_MINTED, "Mint", seq, note)];
    if trigger == Trigger::Compromised {
        facts.push(f.about(
            true,
            reason::EMERGENCY_REVOCATION,
            "Mint",
            seq,
            format!(
                "compromised key(s) {} listed in spec.compromisedKeys: minted successor {}; the compromised keys are revoked without waiting for confirmation",
                settings.compromised.iter().cloned().collect::<Vec<_>>().join(", "),
                m.kid
            ),
        ));
    }
    facts
}

/// Key ids the bundle trusted that the operator never minted, removed by the bundle write.
fn bundle_tampered(f: &Facts<'_>) -> Vec<Audit<'static>> {
    let injected = rotation::bundle_target(f.settings, f.obs).injected;
    if injected.is_empty() {
        return Vec::new();
    }
    vec![Audit {
        warning: true,
        reason: reason::BUNDLE_TAMPERED,
        action: "Publish",
        note: format!(
            "trust bundle {} trusted key id(s) {} that this operator never minted (not in the trust record); removed. The verifier never trusted them. Someone who may write the ConfigMap added them: check who (audit log)",
            f.settings.trust_bundle_name,
            injected.join(", ")
        ),
        related: None,
    }]
}

fn published(f: &Facts<'_>, seq: u32, k: &ObservedKey) -> Audit<'static> {
    f.about(
        false,
        reason::KEY_PUBLISHED,
        "Publish",
        seq,
        format!(
            "key {} (fingerprint {}) is in trust bundle {}",
            k.kid, k.fingerprint, f.settings.trust_bundle_name
        ),
    )
}

fn activated(f: &Facts<'_>, seq: u32, k: &ObservedKey, emergency: bool) -> Audit<'static> {
    f.about(
        false,
        reason::KEY_ACTIVATED,
        "Activate",
        seq,
        format!(
            "key {} (fingerprint {}) is now current{}",
            k.kid,
            k.fingerprint,
            if emergency {
                " (emergency: publishDelay skipped)"
            } else {
                ""
            }
        ),
    )
}

fn retiring(f: &Facts<'_>, seq: u32, k: &ObservedKey) -> Audit<'static> {
    f.about(
        false,
        reason::KEY_RETIRING,
        "Retire",
        seq,
        format!(
            "key {} is superseded; it stays trusted until revocation is safe",
            k.kid
        ),
    )
}

fn handed_out(f: &Facts<'_>, seq: u32, why: HandOutReason) -> Audit<'static> {
    let kid = find(f.obs, seq).map(|k| k.kid.clone()).unwrap_or_default();
    let secret = &f.settings.secret_name;
    let (reason, note) = match why {
        HandOutReason::TokenRefresh => (
            reason::TOKEN_REFRESHED,
            format!("re-issued the token of key {kid} in Secret {secret}"),
        ),
        HandOutReason::NewKey => (
            reason::KEY_HANDED_OUT,
            format!("Secret {secret} now carries key {kid}"),
        ),
        HandOutReason::Repair => (
            reason::KEY_HANDED_OUT,
            format!("Secret {secret} rewritten for key {kid} (it differed from the spec)"),
        ),
    };
    f.about(false, reason, "HandOut", seq, note)
}

fn revoked(f: &Facts<'_>, seq: u32, k: &ObservedKey, emergency: bool) -> Audit<'static> {
    if !emergency && k.state == rotation::KeyState::Deactivated {
        // The end of a deactivated key's retention: its revocation was audited already.
        return f.about(
            false,
            reason::KEY_DESTROYED,
            "Destroy",
            seq,
            format!(
                "destroyed key {} (fingerprint {}): deactivated since {} and {}; private key deleted, it can no longer be reactivated",
                k.kid,
                k.fingerprint,
                k.deactivated_at.map_or_else(|| "-".to_string(), ts),
                if f.obs.keys.iter().filter(|k| k.state == rotation::KeyState::Deactivated).count()
                    > rotation::rules::MAX_DEACTIVATED
                {
                    format!(
                        "more than {} keys are deactivated (the oldest goes first)",
                        rotation::rules::MAX_DEACTIVATED
                    )
                } else {
                    format!(
                        "retainDeactivatedFor {} has passed",
                        humantime::format_duration(f.settings.retain_deactivated_for)
                    )
                }
            ),
        );
    }
    f.about(
        emergency,
        if emergency {
            reason::EMERGENCY_REVOCATION
        } else {
            reason::KEY_REVOKED
        },
        "Revoke",
        seq,
        format!(
            "revoked key {} (fingerprint {}); private key deleted; {}",
            k.kid,
            k.fingerprint,
            revocation_evidence(f.settings, f.obs, emergency)
        ),
    )
}

fn deactivated(f: &Facts<'_>, seq: u32, k: &ObservedKey) -> Audit<'static> {
    f.about(
        false,
        // The revocation's Event keeps its reason: the key left the trusted set.
        reason::KEY_REVOKED,
        "Revoke",
        seq,
        format!(
            "revoked key {} (fingerprint {}): deactivated, every verifier refuses it; private key kept for retainDeactivatedFor {} (keyward reactivate can bring it back until then); {}",
            k.kid,
            k.fingerprint,
            humantime::format_duration(f.settings.retain_deactivated_for),
            revocation_evidence(f.settings, f.obs, false)
        ),
    )
}

/// The reactivation's reason as given (`keyward.dev/reactivate-reason`): printable characters
/// only, at most 256 of them.
fn reactivate_reason(pk: &ProvisioningKey) -> String {
    let given = pk
        .annotations()
        .get(crate::labels::REACTIVATE_REASON)
        .map(String::as_str)
        .unwrap_or("");
    let clean: String = given
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect();
    if clean.trim().is_empty() {
        "no reason given".into()
    } else {
        clean
    }
}

fn reactivated(f: &Facts<'_>, seq: u32, k: &ObservedKey) -> Audit<'static> {
    f.about(
        true,
        reason::KEY_REACTIVATED,
        "Reactivate",
        seq,
        format!(
            "reactivated key {} (fingerprint {}), deactivated since {}: trusted again as a retiring key, for at least overlap {} (reason: {})",
            k.kid,
            k.fingerprint,
            k.deactivated_at.map_or_else(|| "-".to_string(), ts),
            humantime::format_duration(f.settings.overlap),
            reactivate_reason(f.pk)
        ),
    )
}

fn repaired(f: &Facts<'_>, seq: u32, k: &ObservedKey) -> Audit<'static> {
    f.about(
        true,
        reason::KEY_SECRET_REPAIRED,
        "Repair",
        seq,
        format!(
            "key Secret {} of key {} was edited ({}); its labels and annotations were restored, state {} as its evidence shows",
            key_secret_name(&f.pk.name_any(), seq),
            k.kid,
            k.edited.as_deref().unwrap_or("metadata differed"),
            k.state.as_str()
        ),
    )
}

/// Why a revocation was safe, for its audit note.
pub fn revocation_evidence(settings: &Settings, obs: &Observed, emergency: bool) -> String {
    if emergency {
        return "listed in spec.compromisedKeys; revoked without waiting for confirmation".into();
    }
    let overlap = humantime::format_duration(settings.overlap);
    let mut parts = Vec::new();
    if !obs.consumers.is_empty() {
        let cur = rotation::current(&obs.keys).map_or("-", |c| c.kid.as_str());
        let names: Vec<&str> = obs.consumers.iter().map(|c| c.name.as_str()).collect();
        parts.push(format!(
            "every PolicyAgent ({}) is confirmed on {cur}",
            names.join(", ")
        ));
    }
    match obs.uncovered.as_deref() {
        Some(u) if !u.is_empty() => parts.push(format!(
            "{} pod(s) no PolicyAgent covers ({}) use the agent Secret: overlap of {overlap} after the hand-out passed{}",
            u.len(),
            rotation::uncovered_workloads(u).join(", "),
            if settings.include_private_key {
                ""
            } else {
                " and the key's last token expired"
            }
        )),
        _ if obs.consumers.is_empty() => parts.push(format!(
            "overlap of {overlap} passed and no PolicyAgent references this key"
        )),
        _ => {}
    }
    if let (Some(window), Some(Ok(cov))) = (
        settings.revoke_when_unused_for,
        obs.usage.as_ref().map(|u| &u.coverage),
    ) {
        parts.push(format!(
            "unused for {} as reported by verifier replica(s) {} (reports as of {})",
            humantime::format_duration(window),
            cov.replicas.join(", "),
            ts(cov.as_of)
        ));
    }
    parts.join("; ")
}

/// What a status write's transitions call for: Warnings on transitions only.
pub struct ReportFacts<'a> {
    /// The trigger of the rotation that just became `Stalled` (for the counter), if one did.
    pub stalled_rotation: Option<Trigger>,
    pub audits: Vec<Audit<'a>>,
}

/// The Warnings of a written status, from the status before (`previous`) and now (`status`):
/// `Stalled` turned true (or changed reason), uncovered consumers named anew, trusted key ids
/// that no key Secret records named anew.
pub fn report_facts<'a>(
    previous: &ProvisioningKeyStatus,
    status: &'a ProvisioningKeyStatus,
    read: &Read,
    plan: &Plan,
) -> ReportFacts<'a> {
    let obs = &read.observed;
    let mut facts = ReportFacts {
        stalled_rotation: None,
        audits: Vec::new(),
    };
    let was = cond(previous, conditions::STALLED).map(|c| (c.status.clone(), c.reason.clone()));
    if let Some(c) = cond(status, conditions::STALLED).filter(|c| c.status == "True")
        && was != Some((c.status.clone(), c.reason.clone()))
    {
        if plan.blocked.is_none() {
            facts.stalled_rotation = in_flight(obs).map(|k| k.trigger);
        }
        facts.audits.push(Audit {
            warning: true,
            // RotationStalled, VerifierSilent, or why the spec cannot be served.
            reason: c.reason.as_str(),
            action: "Reconcile",
            note: c.message.clone(),
            related: None,
        });
    }
    facts.audits.extend(uncovered_named(previous, status, read));
    facts
        .audits
        .extend(unrecorded_named(previous, status, read));
    facts
}

fn uncovered_named(
    previous: &ProvisioningKeyStatus,
    status: &ProvisioningKeyStatus,
    read: &Read,
) -> Option<Audit<'static>> {
    let workloads = |s: &ProvisioningKeyStatus| {
        s.uncovered_consumers
            .as_ref()
            .map(|u| u.workloads.clone())
            .unwrap_or_default()
    };
    let u = read.observed.uncovered.as_ref().filter(|u| !u.is_empty())?;
    if workloads(previous) == workloads(status) {
        return None;
    }
    Some(Audit {
        warning: true,
        reason: rotation::reasons::UNCOVERED_CONSUMERS,
        action: "Confirm",
        note: format!(
            "{} pod(s) use Secret {} but no PolicyAgent covers them: {}; the old key waits overlap{} instead of evidence",
            u.len(),
            read.settings.secret_name,
            rotation::uncovered_workloads(u).join(", "),
            if read.settings.include_private_key {
                ""
            } else {
                " and its last token's expiry"
            }
        ),
        related: None,
    })
}

fn unrecorded_named(
    previous: &ProvisioningKeyStatus,
    status: &ProvisioningKeyStatus,
    read: &Read,
) -> Option<Audit<'static>> {
    let unrecorded = |s: &ProvisioningKeyStatus| -> Vec<String> {
        s.trusted_keys
            .iter()
            .filter(|k| k.state == UNRECORDED)
            .map(|k| k.kid.clone())
            .collect()
    };
    let now_unrecorded = unrecorded(status);
    if now_unrecorded.is_empty() || now_unrecorded == unrecorded(previous) {
        return None;
    }
    Some(Audit {
        warning: true,
        reason: rotation::reasons::UNRECORDED_KEYS,
        action: "Publish",
        note: format!(
            "trust bundle {} keeps key(s) {} trusted although no key Secret records them (deleted or edited); list them in spec.compromisedKeys to revoke them",
            read.settings.trust_bundle_name,
            now_unrecorded.join(", ")
        ),
        related: None,
    })
}
