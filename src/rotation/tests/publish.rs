//! Rule "publish": a minted key is labelled published, written into the trust bundle (exact
//! trusted and revoked lists) and its publication recorded; a compromised pending key is revoked
//! without ever being published.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "publish";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first key created active, crash before the bundle: the bundle is written first",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = BundleObs::Missing;
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "first key created active, bundle emptied by someone: rewritten before the hand-out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = bundle(&[], &[]);
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "first key: pending is labelled published before the bundle is written",
            s(),
            with_obs(vec![key(1, Pending)], |o| o.bundle = BundleObs::Missing),
            Some(MarkPublished { seq: 1 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "rotated key: pending is labelled published",
            s(),
            obs(vec![key(1, Active), key(2, Pending)]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "missing bundle is written with the published key",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: None,
                    ..key(1, Published)
                }],
                |o| o.bundle = BundleObs::Missing,
            ),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "bundle mismatch: exact trusted and revoked lists in seq order",
            s(),
            with_obs(
                vec![
                    key(1, Destroyed),
                    key(2, Retiring),
                    key(3, Active),
                    ObservedKey {
                        published_at: None,
                        ..key(4, Published)
                    },
                ],
                |o| o.bundle = bundle(&[2, 3], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(2), kid(3), kid(4)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "bundle mismatch in the revoked list only",
            s(),
            with_obs(vec![key(1, Destroyed), key(2, Active)], |o| {
                o.bundle = bundle(&[2], &[])
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "bundle that still trusts a revoked key is rewritten",
            s(),
            with_obs(vec![key(1, Destroyed), key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[])
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "publication is recorded once the bundle contains the kid",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: None,
                    ..key(2, Published)
                },
            ]),
            Some(RecordPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "publication is not recorded while the bundle lacks the kid",
            s(),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: None,
                        ..key(2, Published)
                    },
                ],
                |o| o.bundle = bundle(&[1], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(1), kid(2)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        // --- Requests ----------------------------------------------------------------------------
        case(
            RULE,
            "requestToken consumed by the mint: no second mint",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![
                ObservedKey {
                    consumed_request_token: some("r1"),
                    ..key(1, Active)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Pending)
                },
            ]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "annotation consumed by the mint: no second mint",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        consumed_annotation: some("a1"),
                        ..key(1, Active)
                    },
                    ObservedKey {
                        consumed_annotation: some("a2"),
                        ..key(2, Pending)
                    },
                ],
                |o| o.rotate_annotation = some("a2"),
            ),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        // --- Break-glass -------------------------------------------------------------------------
        case(
            RULE,
            "compromise: successor labelled published",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    created_at: now(),
                    ..key(2, Pending)
                },
            ]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromise: successor written into the bundle (compromised key still trusted)",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: None,
                        ..key(2, Published)
                    },
                ],
                |o| o.bundle = bundle(&[1], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(1), kid(2)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromise: successor publication recorded",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    published_at: None,
                    ..key(2, Published)
                },
            ]),
            Some(RecordPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromise: bundle rewritten with the successor only",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Destroyed),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| {
                    o.bundle = bundle(&[1, 2], &[]);
                    o.agent_secret = agent(&kid(1));
                },
            ),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromised pending key: revoked without ever being published",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![key(1, Active), key(2, Pending)]),
            Some(Destroy {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        // --- Tamper: the bundle, sequence numbers ------------------------------------------------
        case(
            RULE,
            "an unrecorded trusted key listed as compromised is revoked in the bundle",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[]);
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
