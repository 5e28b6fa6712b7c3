//! Rule "rotate", the last of the chain: a due or requested rotation mints a key, unless suspended
//! or within minInterval; otherwise nothing to do, and the plan says when to look again.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "rotate";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first key created active and handed out: ready",
            s(),
            obs(vec![first_active()]),
            None,
            Phase::Ready,
        )
        .check(Check::NotBlocked),
        // --- Retirement and hand-out -------------------------------------------------------------
        case(
            RULE,
            "no token refresh before half the ttl",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(1799).timestamp());
                    a.token_exp = Some(ago(1799).timestamp() + TTL as i64);
                })
            }),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::TokenRefreshAt(later(1))),
        case(
            RULE,
            "steady state: nothing to do, wake up for the token refresh",
            s(),
            obs(vec![key(1, Destroyed), key(2, Active)]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1740)))
        .check(Check::TokenRefreshAt(later(1740)))
        .check(Check::NotBlocked),
        // --- Requests ----------------------------------------------------------------------------
        case(
            RULE,
            "new requestToken triggers a rotation",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![ObservedKey {
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r2"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "requestToken consumed: nothing to do after the rotation",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![
                ObservedKey {
                    consumed_request_token: some("r1"),
                    ..key(1, Destroyed)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "removing the requestToken does not rotate",
            s(),
            obs(vec![ObservedKey {
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "new rotate annotation triggers a rotation",
            s(),
            with_obs(
                vec![ObservedKey {
                    consumed_annotation: some("a1"),
                    ..key(1, Active)
                }],
                |o| o.rotate_annotation = some("a2"),
            ),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Annotation,
                consumed_request_token: None,
                consumed_annotation: some("a2"),
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "annotation consumed: nothing to do after the rotation",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        consumed_annotation: some("a1"),
                        ..key(1, Destroyed)
                    },
                    ObservedKey {
                        consumed_annotation: some("a2"),
                        ..key(2, Active)
                    },
                ],
                |o| o.rotate_annotation = some("a2"),
            ),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "token and annotation requested together: one mint consumes both",
            with_settings(|s| s.request_token = some("r2")),
            with_obs(vec![key(1, Active)], |o| o.rotate_annotation = some("a2")),
            Some(Mint {
                seq: 2,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r2"),
                consumed_annotation: some("a2"),
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "request made during a rotation is served after it completes",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                key(1, Destroyed),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r3"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        // --- minInterval -------------------------------------------------------------------------
        case(
            RULE,
            "minInterval delays a request until the earliest time",
            with_settings(|s| {
                s.request_token = some("r3");
                s.min_interval = secs(600);
            }),
            obs(vec![
                key(1, Destroyed),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    created_at: ago(100),
                    activated_at: Some(ago(50)),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(500)))
        .check(Check::Rotating(reasons::IDLE)),
        case(
            RULE,
            "minInterval elapsed: the delayed request is served",
            with_settings(|s| {
                s.request_token = some("r3");
                s.min_interval = secs(600);
            }),
            obs(vec![
                key(1, Destroyed),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    created_at: ago(600),
                    activated_at: Some(ago(550)),
                    ..key(2, Active)
                },
            ]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r3"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "minInterval delays a due interval rotation",
            with_settings(|s| {
                s.interval = Some(secs(30));
                s.min_interval = secs(600);
            }),
            obs(vec![ObservedKey {
                created_at: ago(100),
                activated_at: Some(ago(50)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(500))),
        // --- interval ----------------------------------------------------------------------------
        case(
            RULE,
            "interval due: rotation with Trigger::Interval",
            with_settings(|s| s.interval = Some(secs(3600))),
            obs(vec![ObservedKey {
                activated_at: Some(ago(3600)),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Interval,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "interval not due yet: wake up when it is",
            with_settings(|s| s.interval = Some(secs(3600))),
            obs(vec![ObservedKey {
                activated_at: Some(ago(3599)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::NextRotationAt(later(1))),
        // --- rotation.window (now: Sunday 2025-06-01 12:00 UTC) -------------------------------
        case(
            RULE,
            "window: a due rotation outside the window waits for its next opening",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.window = Some(office_hours());
            }),
            obs(vec![ObservedKey {
                activated_at: Some(ago(7200)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::NextRotationAt(later(21 * 3600))),
        case(
            RULE,
            "window: a due rotation inside the window starts",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.window = Some(window(&[], "11:00", "13:00"));
            }),
            obs(vec![ObservedKey {
                activated_at: Some(ago(7200)),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Interval,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "window: a requested rotation ignores it",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.window = Some(office_hours());
                s.request_token = some("r2");
            }),
            obs(vec![key(1, Active)]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r2"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "window: never earlier than interval, even inside the window",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.window = Some(window(&[], "11:00", "13:00"));
            }),
            obs(vec![ObservedKey {
                activated_at: Some(ago(3000)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::NextRotationAt(later(600))),
        // --- suspend -----------------------------------------------------------------------------
        case(
            RULE,
            "suspend blocks a requested rotation",
            with_settings(|s| {
                s.suspend = true;
                s.request_token = some("r2");
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        case(
            RULE,
            "suspend blocks a due interval rotation",
            with_settings(|s| {
                s.suspend = true;
                s.interval = Some(secs(3600));
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        case(
            RULE,
            "suspended and idle",
            with_settings(|s| s.suspend = true),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        // --- Break-glass -------------------------------------------------------------------------
        case(
            RULE,
            "compromised key already revoked: nothing to do",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![key(1, Destroyed), key(2, Active)]),
            None,
            Phase::Ready,
        ),
        // --- Prune -------------------------------------------------------------------------------
        case(
            RULE,
            "RETAIN_REVOKED revoked keys are kept",
            s(),
            obs((1..=5)
                .map(|s| key(s, Destroyed))
                .chain([key(6, Active)])
                .collect()),
            None,
            Phase::Ready,
        ),
        // --- Tamper: the bundle, sequence numbers ------------------------------------------------
        case(
            RULE,
            "a trusted key whose key Secret is gone stays in the bundle",
            s(),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[]);
            }),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "a pruned revoked key stays in the revoked list",
            s(),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[2], &[1]);
            }),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "sequence numbers are never reused after a key Secret is deleted",
            with_settings(|s| s.request_token = some("r9")),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = BundleObs::Owned {
                    kids: vec![kid(2)],
                    revoked: vec![],
                    last_seq: 3,
                };
            }),
            Some(Mint {
                seq: 4,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r9"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        // --- Stuck rotations are visible ---------------------------------------------------------
        case(
            RULE,
            "an overdue scheduled rotation is reported while suspended",
            with_settings(|s| {
                s.interval = Some(secs(DAY as u64));
                s.suspend = true;
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        )
        .check(Check::RotatingMentions("overdue")),
    ]
}

#[test]
fn table() {
    run_table(cases());
}

/// A window on `days` (every day when empty) from `start` to `end`, UTC.
fn window(days: &[&str], start: &str, end: &str) -> crate::rotation::window::Window {
    let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
    crate::rotation::window::Window::parse(&days, start, end, None).expect("valid window")
}

/// Monday to Friday, 09:00 to 17:00 UTC.
fn office_hours() -> crate::rotation::window::Window {
    window(&["Mon", "Tue", "Wed", "Thu", "Fri"], "09:00", "17:00")
}
