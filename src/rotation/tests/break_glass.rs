//! Rule "break-glass": a key listed in compromisedKeys gets a successor at once (ignoring
//! minInterval and suspend), then is revoked without waiting for confirmations.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "break-glass";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first key created active, compromised before its hand-out: a successor is minted",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        // --- revokeWhenUnusedFor: the control plane's word ---------------------------------------
        case(
            RULE,
            "unused-for: compromisedKeys overrides it (used now, verifier silent)",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.revoke_when_unused_for = Some(secs(300));
            }),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| o.usage = usage(vec![replica(3600, 120)], &[(1, 0)]),
            ),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        // --- Break-glass -------------------------------------------------------------------------
        case(
            RULE,
            "compromised current key: successor minted ignoring minInterval and suspend",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.suspend = true;
                s.min_interval = secs(DAY as u64);
                s.request_token = some("r1");
            }),
            obs(vec![ObservedKey {
                created_at: ago(10),
                activated_at: Some(ago(5)),
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: some("r1"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        case(
            RULE,
            "compromise: key revoked as soon as the successor is published (before publishDelay)",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    published_at: Some(now()),
                    ..key(2, Published)
                },
            ]),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        case(
            RULE,
            "compromise: no confirmation needed, consumers still on the compromised kid",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(10)))],
            ),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromise during a rotation: the in-flight key is the successor",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromised current key with a retiring predecessor: a successor is minted first",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![key(1, Retiring), key(2, Active)]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromised retiring key: revoked at once, consumers not awaited",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(1)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(1)))],
            ),
            Some(Destroy {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromised in-flight key: revoked, the current key stays",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            Some(Destroy {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
