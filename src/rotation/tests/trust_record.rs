//! The trust record (issue "The trust boundary", part 2): what `plan` writes to and reads from
//! the record of every key id the operator signed with, and the per-key default audience.

use super::*;

/// Evidence of a settled key 2 (key 1 revoked) with this record on the ProvisioningKey.
fn with_record(kids: &[u32], bundle_kids: &[u32]) -> Observed {
    with_obs(vec![key(1, Destroyed), key(2, Active)], |o| {
        o.bundle = bundle(bundle_kids, &[1]);
        o.record = Some(sim_record(&settings(), kids));
    })
}

#[test]
fn a_settled_key_with_its_record_writes_nothing() {
    let p = crate::rotation::plan(&settings(), &with_record(&[2], &[2]), now());
    assert_eq!(p.step, None);
    assert!(p.injected.is_empty());
}

#[test]
fn an_injected_key_id_leaves_the_bundle_and_is_reported() {
    let mut o = with_record(&[2], &[2]);
    let BundleObs::Owned { kids, .. } = &mut o.bundle else {
        unreachable!()
    };
    kids.push(kid(9));
    let p = crate::rotation::plan(&settings(), &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteBundle {
            trusted: vec![kid(2)],
            revoked: vec![kid(1)],
        })
    );
    assert_eq!(p.injected, vec![kid(9)]);
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(9)]);
}

#[test]
fn a_recorded_key_id_whose_secret_was_lost_stays_trusted_and_recorded() {
    // Key 1's Secret is gone, but the record lists it: the operator minted it.
    let mut o = with_obs(vec![key(2, Active)], |o| {
        o.bundle = bundle(&[1, 2], &[]);
    });
    o.record = Some(sim_record(&settings(), &[1, 2]));
    let p = crate::rotation::plan(&settings(), &o, now());
    assert!(!matches!(p.step, Some(Step::WriteRecord { .. })), "{p:?}");
    let target = bundle_target(&settings(), &o);
    assert_eq!(target.unrecorded, vec![kid(1)]);
    assert!(target.injected.is_empty());
    assert_eq!(
        desired_record(&settings(), &o),
        sim_record(&settings(), &[1, 2])
    );
    // Never recorded: the same key id is dropped.
    o.record = Some(sim_record(&settings(), &[2]));
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(1)]);
    assert_eq!(
        desired_record(&settings(), &o),
        sim_record(&settings(), &[2])
    );
}

#[test]
fn a_key_without_a_record_gets_one_from_its_key_secrets_first() {
    // After an upgrade: no record yet. The minted key ids are recorded before anything else;
    // a bundle entry no key Secret accounts for was never recorded and is not adopted.
    let mut o = with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
        o.bundle = bundle(&[1, 2, 7], &[]);
    });
    o.record = None;
    let p = crate::rotation::plan(&settings(), &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteRecord {
            record: sim_record(&settings(), &[1, 2])
        })
    );
    o.record = Some(sim_record(&settings(), &[1, 2]));
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(7)]);
}

#[test]
fn the_record_keeps_the_longest_lifetime_a_key_id_signed() {
    let mut o = with_record(&[2], &[2]);
    let mut s = settings();
    s.token_ttl = secs(600);
    // Lowered from 3600 s: the record keeps 3600 (tokens issued before still live that long).
    assert_eq!(desired_record(&s, &o).kids[&kid(2)], TTL);
    // Raised: recorded before a token of that lifetime is handed out.
    s.token_ttl = secs(7200);
    let p = crate::rotation::plan(&s, &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteRecord {
            record: sim_record(&s, &[2])
        })
    );
    // The token the agent Secret holds counts too (a record lost with a long-lived token out).
    o.record = Some(TrustRecord::default());
    if let AgentSecretObs::Owned(a) = &mut o.agent_secret {
        a.token_iat = Some(now().timestamp());
        a.token_exp = Some(now().timestamp() + 5000);
    }
    assert_eq!(desired_record(&settings(), &o).kids[&kid(2)], 5000);
}

#[test]
fn a_compromised_key_id_leaves_the_record_at_once() {
    let o = with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
        o.record = Some(sim_record(&settings(), &[1, 2]));
    });
    let s = with_settings(|s| {
        s.compromised.insert(kid(1));
    });
    assert_eq!(
        crate::rotation::plan(&s, &o, now()).step,
        Some(Step::WriteRecord {
            record: sim_record(&s, &[2])
        })
    );
}

#[test]
fn the_record_carries_the_names_and_claims_the_operator_signs_with() {
    let o = with_record(&[2], &[2]);
    let s = with_settings(|s| {
        s.audience = "keyward:ns/demo".into();
        s.issuer = "https://issuer".into();
    });
    let Some(Step::WriteRecord { record }) = crate::rotation::plan(&s, &o, now()).step else {
        panic!("no record write");
    };
    assert_eq!(
        (
            record.bundle.as_str(),
            record.aud.as_str(),
            record.iss.as_str()
        ),
        ("demo-trust", "keyward:ns/demo", "https://issuer")
    );
}

/// Issue 18 part 1: a key created without `token.audience` issues its own audience,
/// `keyward:<ns>/<name>`; a key that already issues one keeps it (an upgrade refuses no token);
/// an audience in the spec always wins.
#[test]
fn the_default_audience_is_per_key_and_sticks_to_a_live_key() {
    let mut new = pk(ProvisioningKeySpec::default());
    new.metadata.namespace = Some("team-a".into());
    let s = resolve_or_keep(&new, &Floors::none(), &LastGood::default());
    assert_eq!(s.audience, "keyward:team-a/demo");
    // Minted before audiences were per key: its token and record say `keyward`.
    for last in [
        LastGood {
            audience: Some(DEFAULT_AUDIENCE.into()),
            ..Default::default()
        },
        LastGood {
            recorded_audience: Some(DEFAULT_AUDIENCE.into()),
            ..Default::default()
        },
    ] {
        assert_eq!(
            resolve_or_keep(&new, &Floors::none(), &last).audience,
            "keyward"
        );
    }
    let mut explicit = new.clone();
    explicit.spec.token = Some(TokenSpec {
        audience: some("bundles"),
        ..Default::default()
    });
    let last = LastGood {
        recorded_audience: Some(DEFAULT_AUDIENCE.into()),
        ..Default::default()
    };
    assert_eq!(
        resolve_or_keep(&explicit, &Floors::none(), &last).audience,
        "bundles"
    );
}

#[test]
fn a_first_key_is_recorded_by_the_closing_status_write_and_any_later_one_first() {
    // The first key, created active, bundle written and handed out: nothing recorded yet. No
    // record step: the status write that ends the reconcile carries it.
    let first = with_obs(vec![key(1, Active)], |o| {
        o.bundle = bundle(&[1], &[]);
        o.record = None;
    });
    let p = crate::rotation::plan(&settings(), &first, now());
    assert_eq!(p.step, None, "{p:?}");
    assert_eq!(p.record, Some(sim_record(&settings(), &[1])));
    // Mid-way (key minted, no bundle yet): the bundle comes next, the record still waits.
    let minted = with_obs(vec![key(1, Active)], |o| {
        o.bundle = BundleObs::Missing;
        o.agent_secret = AgentSecretObs::Missing;
        o.record = None;
    });
    let p = crate::rotation::plan(&settings(), &minted, now());
    assert!(matches!(p.step, Some(Step::WriteBundle { .. })), "{p:?}");
    assert_eq!(p.record, Some(sim_record(&settings(), &[1])));
    // Once recorded, nothing more.
    let mut settled = first.clone();
    settled.record = p.record.clone();
    let p = crate::rotation::plan(&settings(), &settled, now());
    assert_eq!((p.step, p.record), (None, None));
    // A second key beside it: recorded first, as its own step, never by the status write.
    let mut second = with_obs(vec![key(1, Active), key(2, Pending)], |o| {
        o.bundle = bundle(&[1], &[]);
    });
    second.record = Some(sim_record(&settings(), &[1]));
    let p = crate::rotation::plan(&settings(), &second, now());
    assert_eq!(
        p.step,
        Some(Step::WriteRecord {
            record: sim_record(&settings(), &[1, 2])
        })
    );
    assert_eq!(p.record, None);
    // A bundle or an agent Secret holding another key id is not a first key's: recorded first.
    for o in [
        with_obs(vec![key(2, Active)], |o| {
            o.bundle = bundle(&[1, 2], &[]);
            o.record = None;
        }),
        with_obs(vec![key(2, Active)], |o| {
            o.bundle = bundle(&[2], &[]);
            o.agent_secret = agent(&kid(1));
            o.record = None;
        }),
    ] {
        let p = crate::rotation::plan(&settings(), &o, now());
        assert!(
            matches!(p.step, Some(Step::WriteRecord { .. })),
            "{p:?} for {o:?}"
        );
        assert_eq!(p.record, None);
    }
}

#[test]
fn a_record_in_the_earlier_annotation_is_copied_into_status_and_removed_once_stale() {
    use crate::trust_record::Legacy;
    let mut o = with_record(&[2], &[2]);
    // Read from the annotation only: written into status as it is.
    o.legacy_record = Legacy::Only;
    assert_eq!(
        crate::rotation::plan(&settings(), &o, now()).step,
        Some(Step::WriteRecord {
            record: sim_record(&settings(), &[2])
        })
    );
    // Copied into status as it is: the annotation is kept for verifiers of an earlier version.
    o.legacy_record = Legacy::Copied;
    assert_eq!(crate::rotation::plan(&settings(), &o, now()).step, None);
    // The status holds a newer record (a rotation since): the stale annotation is removed once
    // nothing else is to do.
    o.legacy_record = Legacy::Stale;
    assert_eq!(
        crate::rotation::plan(&settings(), &o, now()).step,
        Some(Step::DropLegacyRecord)
    );
    // A record change comes first.
    let s = with_settings(|s| s.token_ttl = secs(7200));
    assert!(matches!(
        crate::rotation::plan(&s, &o, now()).step,
        Some(Step::WriteRecord { .. })
    ));
    o.legacy_record = Legacy::None;
    assert_eq!(crate::rotation::plan(&settings(), &o, now()).step, None);
}
