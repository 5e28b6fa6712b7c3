//! Rule "activate": the newest published key becomes current once publishDelay has passed (at once
//! for a first key and in an emergency).

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "activate";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first key is activated at once (no publishDelay)",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: Some(now()),
                    ..key(1, Published)
                }],
                |o| o.agent_secret = AgentSecretObs::Missing,
            ),
            Some(Activate {
                seq: 1,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        // --- publishDelay ------------------------------------------------------------------------
        case(
            RULE,
            "rotated key is activated once publishDelay has passed",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(120)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "the same evidence once publishDelay has passed: activated",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(60)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        )
        .at(later(60)),
        // --- suspend -----------------------------------------------------------------------------
        case(
            RULE,
            "suspend does not block the activation of an in-flight key",
            with_settings(|s| s.suspend = true),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(200)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        // --- Break-glass -------------------------------------------------------------------------
        case(
            RULE,
            "compromise: successor activated at once as an emergency",
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
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(Activate {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "compromise during a rotation: the in-flight successor is activated as an emergency",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Destroyed),
                    ObservedKey {
                        published_at: Some(ago(10)),
                        ..key(2, Published)
                    },
                ],
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(Activate {
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
