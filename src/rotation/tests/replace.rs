//! Rule "replace": with no current key, or one that lost its private key, a replacement is
//! minted.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "replace";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Recovery ----------------------------------------------------------------------------
        case(
            RULE,
            "no key left to hand out: a new one is minted",
            s(),
            with_obs(vec![key(1, Destroyed)], |o| o.agent_secret = agent(&kid(1))),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        // --- Tamper: the bundle, sequence numbers ------------------------------------------------
        case(
            RULE,
            "no current key left (its Secret deleted): a replacement is minted, the old id stays trusted",
            s(),
            with_obs(vec![key(1, Destroyed)], |o| {
                o.bundle = BundleObs::Owned {
                    kids: vec![kid(2)],
                    revoked: vec![kid(1)],
                    last_seq: 2,
                };
                o.agent_secret = agent(&kid(2));
            }),
            Some(Mint {
                seq: 3,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "a replacement for an unrecorded current key waits publishDelay (agents still hold it)",
            s(),
            with_obs(
                vec![
                    key(1, Destroyed),
                    ObservedKey {
                        published_at: Some(ago(30)),
                        ..key(3, Published)
                    },
                ],
                |o| {
                    o.bundle = BundleObs::Owned {
                        kids: vec![kid(2), kid(3)],
                        revoked: vec![kid(1)],
                        last_seq: 3,
                    };
                    o.agent_secret = agent(&kid(2));
                },
            ),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(90))),
        case(
            RULE,
            "a current key that lost its private key is replaced at once, even when refused",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
                s.suspend = true;
            }),
            with_obs(vec![key(1, Active)], |o| o.keys[0].has_private_key = false),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            RULE,
            "no refresh is attempted with a key that lost its private key; the successor waits publishDelay",
            s(),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: Some(ago(30)),
                        trigger: Trigger::Replacement,
                        ..key(2, Published)
                    },
                ],
                |o| {
                    o.keys[0].has_private_key = false;
                    o.agent_secret = agent_with(&kid(1), |a| {
                        a.token_iat = Some(ago(3000).timestamp());
                        a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                    });
                },
            ),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(90))),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
