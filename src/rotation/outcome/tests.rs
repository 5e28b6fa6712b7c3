//! Tables over the pure outcome: counters, gauges, audit notes and kstatus conditions.

use std::collections::BTreeMap;

use chrono::DateTime;

use super::*;
use crate::api::conditions;
use crate::api::provisioning_key::{ProvisioningKey, ProvisioningKeyStatus};
use crate::rotation::observe::KeySecrets;
use crate::rotation::snapshot::Read;
use crate::rotation::{
    self, AgentSecretObs, BundleObs, HandOutReason, KeyState, Observed, ObservedKey, Plan, Step,
    Trigger, Uncovered,
};

fn read(uncovered: Vec<Uncovered>, consumers: Vec<rotation::Consumer>) -> Read {
    let t = |s: i64| DateTime::from_timestamp(s, 0).expect("valid");
    let key = |seq: u32, state: KeyState| ObservedKey {
        seq,
        kid: format!("kid{seq}"),
        fingerprint: format!("SHA256:fp{seq}"),
        state,
        trigger: Trigger::Interval,
        consumed_request_token: None,
        consumed_annotation: None,
        created_at: t(1_000),
        published_at: Some(t(1_000)),
        activated_at: Some(t(1_000)),
        retired_at: None,
        revoked_at: None,
        deactivated_at: None,
        reactivated_at: None,
        consumed_reactivate: None,
        has_private_key: true,
        last_token_exp: None,
        edited: None,
    };
    let pk = ProvisioningKey::new("demo", Default::default());
    Read {
        settings: rotation::resolve_or_keep(&pk, &rotation::Floors::none(), &Default::default()),
        observed: Observed {
            keys: vec![key(1, KeyState::Retiring), key(2, KeyState::Active)],
            rotate_annotation: None,
            reactivate_annotation: None,
            bundle: BundleObs::Missing,
            agent_secret: AgentSecretObs::Missing,
            consumers,
            uncovered: Some(uncovered),
            usage: None,
            record: None,
            legacy_record: Default::default(),
        },
        secrets: KeySecrets::default(),
        bundle_jwks: BTreeMap::new(),
        bundle_rv: None,
        agent_secret_rv: None,
    }
}

fn notes(step: &Step, read: &Read, minted: Option<&Minted>) -> Vec<(String, String)> {
    let pk = ProvisioningKey::new("demo", Default::default());
    step_audits(&pk, read, step, minted)
        .into_iter()
        .map(|a| (a.reason.to_string(), a.note))
        .collect()
}

/// The counters of applied steps: a mint that created a key starts a rotation of its
/// trigger (not one that found its Secret there); a revocation counts by kind and completes
/// the rotation of the current key only when no superseded or compromised key is left.
#[test]
fn steps_count_rotations_and_revocations() {
    use RotationResult::*;
    let r = read(Vec::new(), Vec::new());
    let mint = Step::Mint {
        seq: 3,
        trigger: Trigger::RequestToken,
        consumed_request_token: None,
        consumed_annotation: None,
        active: false,
    };
    assert_eq!(
        step_counts(&r, &mint, true),
        [Counted::Rotation(Trigger::RequestToken, Started)]
    );
    assert!(step_counts(&r, &mint, false).is_empty());
    let revoke = |seq, emergency| Step::Destroy { seq, emergency };
    // kid1 retiring, kid2 (trigger Interval) current: revoking kid1 completes the rotation.
    assert_eq!(
        step_counts(&r, &revoke(1, false), false),
        [
            Counted::Revocation { emergency: false },
            Counted::Lifecycle("destroyed"),
            Counted::Rotation(Trigger::Interval, Completed)
        ]
    );
    // Another superseded key still retiring: not complete yet.
    let mut two = read(Vec::new(), Vec::new());
    two.observed.keys[1].state = KeyState::Retiring;
    let mut k3 = two.observed.keys[1].clone();
    (k3.seq, k3.kid, k3.state, k3.trigger) =
        (3, "kid3".into(), KeyState::Active, Trigger::Compromised);
    two.observed.keys.push(k3);
    two.settings.compromised.insert("kid2".into());
    assert_eq!(
        step_counts(&two, &revoke(1, true), false),
        [
            Counted::Revocation { emergency: true },
            Counted::Lifecycle("destroyed")
        ]
    );
    // The last compromised key revoked completes the emergency rotation.
    two.observed.keys[0].state = KeyState::Destroyed;
    assert_eq!(
        step_counts(&two, &revoke(2, true), false),
        [
            Counted::Revocation { emergency: true },
            Counted::Lifecycle("destroyed"),
            Counted::Rotation(Trigger::Compromised, Completed)
        ]
    );
    for quiet in [
        Step::MarkPublished { seq: 2 },
        Step::Activate {
            seq: 2,
            emergency: false,
        },
        Step::Retire { seq: 1 },
        Step::Prune { seq: 1 },
    ] {
        assert!(step_counts(&r, &quiet, true).is_empty(), "{quiet:?}");
    }
}

/// The per-key gauges come from the reported status and the observation: the token's
/// expiry, the next rotation, Ready, Stalled and the agents confirmed on the current key.
#[test]
fn key_gauges_follow_the_report() {
    let consumer = |name: &str, kid: Option<&str>| rotation::Consumer {
        name: name.into(),
        confirmed_kid: kid.map(Into::into),
        rolled_at: None,
        waiting_reason: None,
    };
    let mut r = read(
        Vec::new(),
        vec![
            consumer("a", Some("kid2")),
            consumer("b", Some("kid1")),
            consumer("c", None),
        ],
    );
    r.observed.agent_secret = AgentSecretObs::Owned(rotation::AgentSecret {
        kid: Some("kid2".into()),
        token_exp: Some(5_000),
        ..Default::default()
    });
    let pk = ProvisioningKey::new("demo", Default::default());
    let now = DateTime::from_timestamp(2_000, 0).expect("valid");
    let mut plan = rotation::plan(&r.settings, &r.observed, now);
    plan.next_rotation_at = DateTime::from_timestamp(9_000, 0);
    let status = desired_status(&pk, &r.settings, &r.observed, &plan, now);
    let g = key_gauges(&status, &r.observed, &plan);
    assert_eq!(g.token_expiration, Some(5_000));
    assert_eq!(g.next_rotation, Some(9_000));
    assert_eq!((g.agents_total, g.agents_confirmed), (3, 1));
    assert_eq!(
        g.ready,
        cond(&status, conditions::READY).map_or("", |c| c.status.as_str())
    );
    r.observed.agent_secret = AgentSecretObs::Missing;
    plan.next_rotation_at = None;
    let g = key_gauges(&status, &r.observed, &plan);
    assert_eq!((g.token_expiration, g.next_rotation), (None, None));
    assert_eq!(
        key_gauges(&ProvisioningKeyStatus::default(), &r.observed, &plan).ready,
        "Unknown"
    );
}

#[test]
fn status_carries_a_first_record_and_keeps_the_stored_one() {
    let r = read(Vec::new(), Vec::new());
    let now = DateTime::from_timestamp(2_000, 0).expect("valid");
    let mut plan = rotation::plan(&r.settings, &r.observed, now);
    let mut pk = ProvisioningKey::new("demo", Default::default());
    // Nothing stored, nothing to carry: no record.
    plan.record = None;
    let status = desired_status(&pk, &r.settings, &r.observed, &plan, now);
    assert_eq!(status.trust_record, None);
    // The stored record is kept as it is (a status write never drops or rewrites it).
    pk.status = Some(ProvisioningKeyStatus {
        trust_record: Some("stored".into()),
        ..Default::default()
    });
    let status = desired_status(&pk, &r.settings, &r.observed, &plan, now);
    assert_eq!(status.trust_record.as_deref(), Some("stored"));
    // A first record the plan carries is written by this status write.
    let first = crate::trust_record::TrustRecord {
        bundle: "demo-trust".into(),
        kids: [("k1".to_string(), 3600)].into(),
        ..Default::default()
    };
    plan.record = Some(first.clone());
    pk.status = None;
    let status = desired_status(&pk, &r.settings, &r.observed, &plan, now);
    assert_eq!(status.trust_record, Some(first.render()));
}

/// Each applied step describes its own audit; a mint that found its Secret already there
/// (a crash between the write and the Event) records nothing new; notes name ids only.
#[test]
fn steps_describe_their_audit() {
    let r = read(Vec::new(), Vec::new());
    let mint = Step::Mint {
        seq: 3,
        trigger: Trigger::Compromised,
        consumed_request_token: None,
        consumed_annotation: None,
        active: false,
    };
    let minted = Minted {
        pair: None,
        kid: "kid3".into(),
        fingerprint: "SHA256:fp3".into(),
    };
    let n = notes(&mint, &r, Some(&minted));
    assert_eq!(
        n.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        vec!["KeyMinted", "EmergencyRevocation"]
    );
    assert!(n[0].1.contains("kid3") && n[0].1.contains("seq 3"));
    assert!(notes(&mint, &r, None).is_empty());
    for quiet in [
        Step::MarkPublished { seq: 2 },
        Step::Prune { seq: 1 },
        Step::WriteBundle {
            trusted: vec![],
            revoked: vec![],
        },
    ] {
        assert!(notes(&quiet, &r, None).is_empty(), "{quiet:?}");
    }
    let refresh = Step::HandOut {
        seq: 2,
        reason: HandOutReason::TokenRefresh,
    };
    assert_eq!(notes(&refresh, &r, None)[0].0, "TokenRefreshed");
    let revoke = Step::Destroy {
        seq: 1,
        emergency: false,
    };
    let n = notes(&revoke, &r, None);
    assert_eq!(n[0].0, "KeyRevoked");
    assert!(
        n[0].1.contains("no PolicyAgent references this key"),
        "{n:?}"
    );
    let uncovered = read(
        vec![Uncovered {
            pod: "other-1".into(),
            workload: "Deployment/other".into(),
        }],
        vec![rotation::Consumer {
            name: "opa".into(),
            confirmed_kid: Some("kid2".into()),
            rolled_at: None,
            waiting_reason: None,
        }],
    );
    let n = notes(&revoke, &uncovered, None);
    assert!(
        n[0].1
            .contains("every PolicyAgent (opa) is confirmed on kid2")
            && n[0].1.contains("Deployment/other")
            && n[0].1.contains("last token expired"),
        "{n:?}"
    );
    for (_, note) in n {
        assert!(!note.contains("PRIVATE KEY"));
    }
}

/// A first key created active: one KeyMinted naming its id, fingerprint, bundle and agent
/// Secret (its hand-out records KeyHandedOut, as any hand-out).
#[test]
fn first_key_created_active_is_minted_once() {
    let r = read(Vec::new(), Vec::new());
    let mint = Step::Mint {
        seq: 1,
        trigger: Trigger::Initial,
        consumed_request_token: None,
        consumed_annotation: None,
        active: true,
    };
    let minted = Minted {
        pair: None,
        kid: "kid1".into(),
        fingerprint: "SHA256:fp1".into(),
    };
    let n = notes(&mint, &r, Some(&minted));
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].0, "KeyMinted");
    for part in [
        "kid1",
        "SHA256:fp1",
        "demo-trust",
        "Secret demo",
        "created active",
    ] {
        assert!(n[0].1.contains(part), "{part}: {n:?}");
    }
    assert!(notes(&mint, &r, None).is_empty());
}

/// The trail of one reconcile: a first key's mint and hand-out are one Event; a mint whose
/// hand-out does not follow keeps its own Event, recorded before any later one or at the end.
#[test]
fn a_first_key_costs_one_audit_event() {
    let r = read(Vec::new(), Vec::new());
    let pk = ProvisioningKey::new("demo", Default::default());
    let mint = |seq: u32, active: bool, trigger: Trigger| Step::Mint {
        seq,
        trigger,
        consumed_request_token: None,
        consumed_annotation: None,
        active,
    };
    let minted = Minted {
        pair: None,
        kid: "kid2".into(),
        fingerprint: "SHA256:fp2".into(),
    };
    let hand_out = |seq: u32, reason: HandOutReason| Step::HandOut { seq, reason };
    let bundle = Step::WriteBundle {
        trusted: vec![],
        revoked: vec![],
    };
    let revoke = Step::Destroy {
        seq: 1,
        emergency: false,
    };
    // Each row: the steps of one reconcile (the first key is seq 2 in this fixture), and the
    // reasons recorded after each step, then at the end.
    // (name, steps, reasons after each step, reasons at the end)
    type Row<'a> = (&'a str, Vec<Step>, Vec<Vec<&'a str>>, Vec<&'a str>);
    let rows: Vec<Row> = vec![
        (
            "mint, record, bundle, hand-out: one Event at the hand-out",
            vec![
                mint(2, true, Trigger::Initial),
                Step::WriteRecord {
                    record: Default::default(),
                },
                bundle.clone(),
                hand_out(2, HandOutReason::NewKey),
            ],
            vec![vec![], vec![], vec![], vec!["KeyMinted"]],
            vec![],
        ),
        (
            "the hand-out never comes: the mint's Event at the end",
            vec![mint(2, true, Trigger::Initial), bundle.clone()],
            vec![vec![], vec![]],
            vec!["KeyMinted"],
        ),
        (
            "another audited step in between: the mint's Event first, in order",
            vec![mint(2, true, Trigger::Initial), revoke.clone()],
            vec![vec![], vec!["KeyMinted", "KeyRevoked"]],
            vec![],
        ),
        (
            "a token refresh is not the first hand-out",
            vec![
                mint(2, true, Trigger::Initial),
                hand_out(2, HandOutReason::TokenRefresh),
            ],
            vec![vec![], vec!["KeyMinted", "TokenRefreshed"]],
            vec![],
        ),
        (
            "a successor (not created active) is never held",
            vec![mint(2, false, Trigger::Interval)],
            vec![vec!["KeyMinted"]],
            vec![],
        ),
        (
            "a compromise's mint is never held",
            vec![mint(2, true, Trigger::Compromised)],
            vec![vec!["KeyMinted", "EmergencyRevocation"]],
            vec![],
        ),
        (
            "a hand-out in a later reconcile has its own Event",
            vec![hand_out(2, HandOutReason::NewKey)],
            vec![vec!["KeyHandedOut"]],
            vec![],
        ),
    ];
    for (name, steps, after, end) in rows {
        let mut trail = Trail::default();
        for (step, want) in steps.iter().zip(after) {
            let m = matches!(step, Step::Mint { .. }).then_some(&minted);
            let got = trail.after(step, step_audits(&pk, &r, step, m));
            let reasons: Vec<&str> = got.iter().map(|a| a.reason).collect();
            assert_eq!(reasons, want, "{name}: after {step:?}");
            if let Some(one) = got.iter().find(|a| a.action == "MintAndHandOut") {
                assert!(
                    one.note.contains("kid2") && one.note.contains("Secret demo now carries"),
                    "{name}: {}",
                    one.note
                );
            }
        }
        let reasons: Vec<&str> = trail.finish().iter().map(|a| a.reason).collect();
        assert_eq!(reasons, end, "{name}: at the end");
    }
}

/// kstatus: `Reconciling` only while a new key has nothing handed out; a rotation in flight
/// is `Rotating`, not `Reconciling`; a blocked spec is `Stalled`; every condition carries the
/// generation; a second reconcile of the same state writes the same status.
#[test]
fn kstatus_conditions() {
    let now = DateTime::from_timestamp(2_000, 0).expect("valid");
    let mut pk = ProvisioningKey::new("demo", Default::default());
    pk.metadata.generation = Some(3);
    let status = |pk: &ProvisioningKey, obs: &Observed, plan: &Plan| {
        let s = desired_status(
            pk,
            &rotation::resolve_or_keep(
                pk_default(),
                &rotation::Floors::none(),
                &Default::default(),
            ),
            obs,
            plan,
            now,
        );
        let c = |t: &str| {
            let c = cond(&s, t).unwrap_or_else(|| panic!("no {t}"));
            assert_eq!(c.observed_generation, Some(3), "{t}");
            (c.status.clone(), c.reason.clone())
        };
        assert_eq!(s.observed_generation, Some(3));
        (c("Ready"), c("Reconciling"), c("Rotating"), c("Stalled"))
    };
    let t = |s: &str, r: &str| (s.to_string(), r.to_string());
    let plan = Plan::new;
    let why = |reason: &'static str| rotation::Why {
        reason,
        message: "m".into(),
    };

    // A new key: nothing handed out yet.
    let mut obs = read(Vec::new(), Vec::new()).observed;
    let (ready, reconciling, _, stalled) = status(&pk, &obs, &plan(rotation::Phase::Pending));
    assert_eq!(ready.0, "False");
    assert_eq!(reconciling, t("True", "Minting"));
    assert_eq!(stalled.0, "False");

    // Handed out: Ready, not Reconciling; a rotation in flight changes neither.
    obs.agent_secret = AgentSecretObs::Owned(rotation::AgentSecret {
        kid: Some("kid2".into()),
        ..Default::default()
    });
    let settled = status(&pk, &obs, &plan(rotation::Phase::Ready));
    assert_eq!(settled.0, t("True", "KeyActive"));
    assert_eq!(settled.1, t("False", "Reconciled"));
    let mut rotating = plan(rotation::Phase::Publishing);
    rotating.rotating = Some(why(rotation::reasons::PUBLISHING));
    let (ready, reconciling, rot, stalled) = status(&pk, &obs, &rotating);
    assert_eq!((ready, reconciling), (settled.0.clone(), settled.1.clone()));
    assert_eq!(rot, t("True", "Publishing"));
    assert_eq!(stalled.0, "False");

    // A rotation past its confirmation timeout: Stalled, the key still Ready.
    let mut late = plan(rotation::Phase::Stalled);
    late.stalled = Some(why(rotation::reasons::ROTATION_STALLED));
    let (ready, reconciling, _, stalled) = status(&pk, &obs, &late);
    assert_eq!(ready.0, "True");
    assert_eq!(reconciling.0, "False");
    assert_eq!(stalled, t("True", "RotationStalled"));

    // A name owned by someone else: not Ready, Stalled, not Reconciling.
    let mut blocked = plan(rotation::Phase::Invalid);
    blocked.blocked = Some(why(rotation::reasons::SECRET_NAME_TAKEN));
    let (ready, reconciling, _, stalled) = status(&pk, &obs, &blocked);
    assert_eq!(ready, t("False", "SecretNameTaken"));
    assert_eq!(reconciling.0, "False");
    assert_eq!(stalled, t("True", "SecretNameTaken"));

    // Settled twice: the same status (no write).
    pk.status = Some(desired_status(
        &pk,
        &rotation::resolve_or_keep(pk_default(), &rotation::Floors::none(), &Default::default()),
        &obs,
        &plan(rotation::Phase::Ready),
        now,
    ));
    let later = now + chrono::Duration::seconds(60);
    assert_eq!(
        pk.status,
        Some(desired_status(
            &pk,
            &rotation::resolve_or_keep(
                pk_default(),
                &rotation::Floors::none(),
                &Default::default()
            ),
            &obs,
            &plan(rotation::Phase::Ready),
            later
        ))
    );
}

/// A ProvisioningKey with an empty spec (the settings of most status tests).
fn pk_default() -> &'static ProvisioningKey {
    static PK: std::sync::OnceLock<ProvisioningKey> = std::sync::OnceLock::new();
    PK.get_or_init(|| ProvisioningKey::new("demo", Default::default()))
}
