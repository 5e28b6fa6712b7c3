//! Revocation in two steps (issue "The key's whole life", part 1): rules "destroy" and
//! "reactivate", and the deactivation "confirm, hold, revoke" makes when a retention is set.
//! A deactivated key is out of the trusted set with its private key kept; it is destroyed once
//! `retainDeactivatedFor` has passed, and until then a `keyward.dev/reactivate` request puts it
//! back. The trust record holds the deactivation, so an edit of the key Secret cannot undo it.

use super::*;

/// [`settings`] with the default retention (a day).
fn retained() -> Settings {
    with_settings(|s| s.retain_deactivated_for = secs(DAY as u64))
}

/// Key 1 deactivated `since` seconds ago (private key kept), key 2 active.
fn deactivated(since: i64) -> Vec<ObservedKey> {
    vec![
        ObservedKey {
            deactivated_at: Some(ago(since)),
            ..key(1, Deactivated)
        },
        key(2, Active),
    ]
}

fn request(kid_seq: u32, tail: &str) -> String {
    format!("{},{tail}", kid(kid_seq))
}

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    vec![
        // --- Revocation deactivates first ------------------------------------------------------
        case(
            "confirm, hold, revoke",
            "with a retention, revocation deactivates (private key kept)",
            retained(),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(600)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            Some(Deactivate { seq: 1 }),
            Phase::Overlap,
        ),
        case(
            "confirm, hold, revoke",
            "a reactivated key is held another overlap from its reactivation, confirmations or not",
            retained(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(DAY)),
                        reactivated_at: Some(ago(599)),
                        consumed_reactivate: Some(request(1, "r")),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| {
                    o.consumers = vec![consumer("a", Some(2), Some(ago(DAY)))];
                    o.reactivate_annotation = Some(request(1, "r"));
                },
            ),
            None,
            Phase::Overlap,
        )
        .check(Check::RotatingMentions("reactivated at"))
        .check(Check::Requeue(secs(1))),
        case(
            "confirm, hold, revoke",
            "a reactivated key is deactivated again once that overlap has passed",
            retained(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(DAY)),
                        reactivated_at: Some(ago(600)),
                        consumed_reactivate: Some(request(1, "r")),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| {
                    o.consumers = vec![consumer("a", Some(2), Some(ago(DAY)))];
                    o.reactivate_annotation = Some(request(1, "r"));
                },
            ),
            Some(Deactivate { seq: 1 }),
            Phase::Confirming,
        ),
        // --- Destroy after the retention -------------------------------------------------------
        case(
            "destroy",
            "a deactivated key waits out retainDeactivatedFor, and wakes for it",
            retained(),
            obs(deactivated(DAY - 60)),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(60))),
        case(
            "destroy",
            "a deactivated key is destroyed once retainDeactivatedFor has passed",
            retained(),
            obs(deactivated(DAY)),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Ready,
        ),
        case(
            "break-glass",
            "a deactivated key listed as compromised is destroyed at once",
            with_settings(|s| {
                s.retain_deactivated_for = secs(DAY as u64);
                s.compromised.insert(kid(1));
            }),
            obs(deactivated(60)),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "destroy",
            "more than MAX_DEACTIVATED deactivated keys: the oldest is destroyed early",
            retained(),
            obs((1..=11)
                .map(|s| ObservedKey {
                    deactivated_at: Some(ago(60)),
                    ..key(s, Deactivated)
                })
                .chain([key(12, Active)])
                .collect()),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Ready,
        ),
        // --- Reactivation ----------------------------------------------------------------------
        case(
            "reactivate",
            "a new request naming a deactivated key puts it back",
            retained(),
            with_obs(deactivated(60), |o| {
                o.reactivate_annotation = Some(request(1, "2026-12-06"));
            }),
            Some(Reactivate {
                seq: 1,
                request: request(1, "2026-12-06"),
            }),
            Phase::Publishing,
        ),
        case(
            "break-glass",
            "a compromised deactivated key is never reactivated: it is destroyed",
            with_settings(|s| {
                s.retain_deactivated_for = secs(DAY as u64);
                s.compromised.insert(kid(1));
            }),
            with_obs(deactivated(60), |o| {
                o.reactivate_annotation = Some(kid(1));
            }),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "destroy",
            "a request already served by this key does nothing again (GitOps leaves it set)",
            retained(),
            with_obs(
                vec![
                    ObservedKey {
                        deactivated_at: Some(ago(DAY)),
                        consumed_reactivate: Some(kid(1)),
                        ..key(1, Deactivated)
                    },
                    key(2, Active),
                ],
                |o| o.reactivate_annotation = Some(kid(1)),
            ),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Ready,
        ),
        // --- The trust record holds the deactivation -------------------------------------------
        case(
            "repair",
            "a key Secret edited back to retiring stays deactivated, and is repaired",
            retained(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(DAY)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.record = Some(record_deactivating(1, 3600)),
            ),
            Some(Repair { seq: 1 }),
            Phase::Ready,
        ),
        case(
            "repair",
            "a forged reactivation (no request asks for it) is repaired too",
            retained(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(DAY)),
                        reactivated_at: Some(ago(10)),
                        consumed_reactivate: Some(kid(1)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.record = Some(record_deactivating(1, 3600)),
            ),
            Some(Repair { seq: 1 }),
            Phase::Ready,
        ),
    ]
}

/// The record of keys 1 (deactivated `since` seconds ago) and 2 (trusted).
fn record_deactivating(seq: u32, since: i64) -> TrustRecord {
    let mut r = sim_record(&settings(), &[2]);
    r.deactivated.insert(kid(seq), ago(since).timestamp());
    r
}

#[test]
fn table() {
    run_table(cases());
}

/// The record is written before the bundle: a deactivated key id leaves `kids` and enters
/// `deactivated` (with its time); a reactivated one goes back; the bundle lists both revoked
/// states as revoked.
#[test]
fn the_record_and_the_bundle_follow_the_states() {
    let s = retained();
    let o = obs(deactivated(60));
    let r = desired_record(&s, &o);
    assert!(!r.kids.contains_key(&kid(1)) && r.kids.contains_key(&kid(2)));
    assert_eq!(r.deactivated.get(&kid(1)), Some(&ago(60).timestamp()));
    let (trusted, revoked) = desired_bundle(&o.keys);
    assert_eq!((trusted, revoked), (vec![kid(2)], vec![kid(1)]));
    // A record without deactivations renders as before (no new field): no write on upgrade.
    let plain = sim_record(&s, &[2]);
    assert!(!plain.render().contains("deactivated"));
    // Reactivated: the record is behind the Secret and is written next, listing it again.
    let back = with_obs(
        vec![
            ObservedKey {
                retired_at: Some(ago(DAY)),
                reactivated_at: Some(ago(10)),
                consumed_reactivate: Some(kid(1)),
                ..key(1, Retiring)
            },
            key(2, Active),
        ],
        |o| {
            o.reactivate_annotation = Some(kid(1));
            o.record = Some(record_deactivating(1, 3600));
        },
    );
    assert_eq!(
        anchored(&back),
        None,
        "a requested reactivation is believed"
    );
    let p = crate::rotation::plan(&s, &back, now());
    match p.step {
        Some(Step::WriteRecord { record }) => {
            assert!(record.kids.contains_key(&kid(1)));
            assert!(record.deactivated.is_empty());
        }
        other => panic!("expected the record first, got {other:?}"),
    }
}

/// Why requests are refused, as the CLI and the docs say it.
#[test]
fn refused_requests_say_why() {
    let s = retained();
    let o = obs(vec![
        ObservedKey {
            deactivated_at: Some(ago(60)),
            ..key(1, Deactivated)
        },
        key(2, Active),
        key(3, Destroyed),
    ]);
    let refused = |r: &str| crate::rotation::rules::reactivation_refused(&s, &o, r);
    assert_eq!(refused(&kid(1)), None);
    assert!(refused(&kid(2)).is_some_and(|m| m.contains("still trusted")));
    assert!(refused(&kid(3)).is_some_and(|m| m.contains("destroyed")));
    assert!(refused("nope").is_some_and(|m| m.contains("no key Secret")));
    let mut c = s.clone();
    c.compromised.insert(kid(1));
    assert!(
        crate::rotation::rules::reactivation_refused(&c, &o, &kid(1))
            .is_some_and(|m| m.contains("compromisedKeys"))
    );
}
