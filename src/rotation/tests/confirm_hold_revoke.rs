//! Rule "confirm, hold, revoke": a retiring key is revoked only on evidence (every consumer
//! confirmed, the overlap passed, reported unused for revokeWhenUnusedFor), and a rotation waiting
//! past confirmationTimeout is reported stalled.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "confirm, hold, revoke";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Revocation without consumers: overlap -----------------------------------------------
        case(
            RULE,
            "no revocation before the overlap (no consumers)",
            s(),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(599)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::Rotating(reasons::OVERLAP)),
        case(
            RULE,
            "revocation at retired_at + overlap (no consumers)",
            s(),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(600)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Overlap,
        ),
        // --- revokeWhenUnusedFor: the control plane's word ---------------------------------------
        case(
            RULE,
            "unused-for: revoked when every replica vouches for the whole window",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 400), (2, 1)])),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            RULE,
            "unused-for: held while the old key was used inside the window",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 30)])),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE))
        .check(Check::RotatingMentions("last used at"))
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(10))),
        case(
            RULE,
            "unused-for: a use just before the window counts (resolution)",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 310)])),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE)),
        case(
            RULE,
            "unused-for: a replica restarted inside the window is not yet evidence",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5), replica(100, 5)], &[])),
            None,
            Phase::Overlap,
        )
        .check(Check::RotatingMentions("not yet vouched"))
        .check(Check::NotStalled),
        case(
            RULE,
            "unused-for: usage not read is never evidence (VerifierSilent)",
            unused_5m(),
            confirmed_with(None),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::Rotating(reasons::VERIFIER_SILENT)),
        case(
            RULE,
            "unused-for: no verifier replica is never evidence (VerifierSilent)",
            unused_5m(),
            confirmed_with(usage(vec![], &[])),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::RotatingMentions("no keyward verifier replica")),
        case(
            RULE,
            "unused-for: one silent replica holds it, however quiet the others",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5), replica(3600, 120)], &[])),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::RotatingMentions("silent: v-3600")),
        case(
            RULE,
            "unused-for: a replica alive but behind holds it without an alarm (VerifierBehind)",
            unused_5m(),
            confirmed_with(usage(
                vec![replica(3600, 5), {
                    let mut r = replica(3600, 120);
                    r.heartbeat = Some(ago(3));
                    r.pending = 640;
                    r
                }],
                &[],
            )),
            None,
            Phase::Overlap,
        )
        .check(Check::NotStalled)
        .check(Check::Rotating(reasons::VERIFIER_BEHIND))
        .check(Check::RotatingMentions("640 reports pending")),
        case(
            RULE,
            "unused-for: the agents' evidence still comes first",
            unused_5m(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("a", Some(1), Some(ago(10)))];
                o.usage = usage(vec![replica(3600, 5)], &[]);
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::Rotating(reasons::CONFIRMING)),
        case(
            RULE,
            "unused-for: no consumers, overlap passed, still in use: held",
            unused_5m(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(600)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.usage = usage(vec![replica(3600, 5)], &[(1, 20)]),
            ),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE)),
        // --- Revocation with consumers: evidence -------------------------------------------------
        case(
            RULE,
            "no revocation while a consumer is confirmed on the old kid (overlap long past)",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![
                    consumer("a", Some(2), Some(ago(10))),
                    consumer("b", Some(1), Some(ago(10))),
                ]
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::Rotating(reasons::CONFIRMING))
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(890))),
        case(
            RULE,
            "no revocation while a consumer has confirmed nothing yet",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![
                    consumer("a", Some(2), None),
                    consumer("b", None, Some(now())),
                ]
            }),
            None,
            Phase::Confirming,
        ),
        case(
            RULE,
            "revocation as soon as every consumer is confirmed on the current kid",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(now()),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| {
                    o.consumers = vec![
                        consumer("a", Some(2), Some(ago(10))),
                        consumer("b", Some(2), Some(ago(10))),
                    ]
                },
            ),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            RULE,
            "stalled after confirmationTimeout from the roll",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("a", Some(1), Some(ago(900)))]
            }),
            None,
            Phase::Stalled,
        )
        .check(Check::Stalled),
        case(
            RULE,
            "not stalled before confirmationTimeout from the roll (retired long ago)",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(100 * 3600)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(899)))],
            ),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(1))),
        case(
            RULE,
            "not rolled yet: confirmationTimeout counts from the retirement",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(900)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", None, None)],
            ),
            None,
            Phase::Stalled,
        )
        .check(Check::Stalled),
        case(
            RULE,
            "a delayed roll is never a stall",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![Consumer {
                    waiting_reason: some("RolloutDelayed: rollout minInterval"),
                    ..consumer("a", Some(1), None)
                }]
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(1740))),
        case(
            RULE,
            "a roll from an earlier rotation does not start the confirmationTimeout",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(100)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(5000)))],
            ),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(800))),
        // --- Requests ----------------------------------------------------------------------------
        case(
            RULE,
            "request during an in-flight rotation waits (overlap)",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(10)),
                    ..key(1, Retiring)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Overlap,
        ),
        case(
            RULE,
            "request during an in-flight rotation waits (confirming)",
            with_settings(|s| s.request_token = some("r3")),
            with_obs(
                vec![
                    key(1, Retiring),
                    ObservedKey {
                        consumed_request_token: some("r2"),
                        ..key(2, Active)
                    },
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(10)))],
            ),
            None,
            Phase::Confirming,
        ),
        // --- suspend -----------------------------------------------------------------------------
        case(
            RULE,
            "suspend does not block the revocation of an in-flight old key",
            with_settings(|s| s.suspend = true),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(700)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Overlap,
        ),
        // --- Consumers no PolicyAgent covers -----------------------------------------------------
        case(
            RULE,
            "uncovered consumer: confirmed agents are not enough before the overlap",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(100)))];
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(120)));
                o.keys[0].retired_at = Some(ago(121));
                o.keys[0].last_token_exp = Some(ago(10));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OVERLAP))
        .check(Check::Requeue(UNCOVERED_RECHECK)),
        case(
            RULE,
            "uncovered consumer: a sealed key also waits for its last token to expire",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(700)));
                o.keys[0].retired_at = Some(ago(701));
                o.keys[0].last_token_exp = Some(later(1000));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(UNCOVERED_RECHECK))
        .check(Check::RotatingMentions("2025-06-01T12:17:40")),
        case(
            RULE,
            "uncovered consumer: revoked once overlap and last token (plus skew) have passed",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(700)))];
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(700)));
                o.keys[0].retired_at = Some(ago(701));
                o.keys[0].last_token_exp = Some(ago(61));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            Some(Destroy {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            RULE,
            "consumers not looked at: never revoke on missing evidence",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(700)))];
                o.uncovered = None;
            }),
            None,
            Phase::Confirming,
        ),
        case(
            RULE,
            "overlap counts from the hand-out, not from the retirement",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.keys[0].retired_at = Some(ago(3000));
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(300)));
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(secs(300))),
        // --- Stuck rotations are visible ---------------------------------------------------------
        case(
            RULE,
            "a request made during a rotation is queued and reported",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", None, Some(ago(10)))];
                o.rotate_annotation = some("again");
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::RotatingMentions("is queued")),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
