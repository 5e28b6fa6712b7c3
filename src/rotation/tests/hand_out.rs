//! Rule "hand out": the current key goes into the agent Secret: a new key, a token refresh, a
//! repair of the Secret; never into a Secret someone else owns.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "hand out";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first key created active, crash after the bundle: handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::NewKey,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "first key created active, bundle someone else's: never handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = AgentSecretObs::Missing;
            }),
            None,
            Phase::Pending,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            RULE,
            "first key created active, agent Secret someone else's: not handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Foreign;
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            RULE,
            "rotated key whose bundle became someone else's: not handed out",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = agent(&kid(1));
            }),
            None,
            Phase::Publishing,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN))
        .check(Check::Rotating(reasons::PUBLISHING)),
        // --- publishDelay ------------------------------------------------------------------------
        case(
            RULE,
            "rotated key is not activated before publishDelay",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(60)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(60)))
        .check(Check::Rotating(reasons::PUBLISHING)),
        case(
            RULE,
            "publishDelay counts from published_at, not from the mint",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    created_at: ago(DAY),
                    published_at: Some(ago(119)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(1))),
        // --- Retirement and hand-out -------------------------------------------------------------
        case(
            RULE,
            "new key is handed out when the agent Secret holds the old kid",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = agent(&kid(1))
            }),
            Some(HandOut {
                seq: 2,
                reason: HandOutReason::NewKey,
            }),
            Phase::Confirming,
        ),
        case(
            RULE,
            "key is handed out when the agent Secret is missing",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = AgentSecretObs::Missing
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::NewKey,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "repair on metadata mismatch",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.metadata_matches = false)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "repair when the private key is missing but includePrivateKey is set",
            with_settings(|s| s.include_private_key = true),
            obs(vec![key(1, Active)]),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "repair when the private key is present but not wanted",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.has_private_key = true)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "proof of possession: a token in the agent Secret is repaired away",
            with_settings(|s| {
                s.include_private_key = true;
                s.proof_of_possession = true;
            }),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.has_private_key = true)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "proof of possession: the private key and no token is settled, however old, with no refresh",
            with_settings(|s| {
                s.include_private_key = true;
                s.proof_of_possession = true;
            }),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.has_private_key = true;
                    a.has_token = false;
                    a.token_iat = None;
                    a.token_exp = None;
                    a.token_claims_match = false;
                    a.static_claims_match = false;
                })
            }),
            None,
            Phase::Ready,
        ),
        case(
            RULE,
            "back to bearer: an agent Secret without a token is repaired",
            with_settings(|s| s.include_private_key = true),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.has_private_key = true;
                    a.has_token = false;
                    a.token_iat = None;
                    a.token_exp = None;
                    a.token_claims_match = false;
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "repair when token claims differ from the spec",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.token_claims_match = false)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "changed static claims (spec.token.claims) are a token refresh, not a repair",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.static_claims_match = false)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "token refresh at half the ttl",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(1800).timestamp());
                    a.token_exp = Some(ago(1800).timestamp() + TTL as i64);
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "token refresh when the ttl changed",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_exp = a.token_iat.map(|iat| iat + 2 * TTL as i64)
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            RULE,
            "token refresh when the token cannot be read",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = None;
                    a.token_exp = None;
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        // --- Requests ----------------------------------------------------------------------------
        case(
            RULE,
            "request during an in-flight rotation waits (publishing)",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        ),
        // --- Break-glass -------------------------------------------------------------------------
        case(
            RULE,
            "compromise: successor handed out",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Destroyed),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        activated_at: Some(now()),
                        ..key(2, Active)
                    },
                ],
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(HandOut {
                seq: 2,
                reason: HandOutReason::NewKey,
            }),
            Phase::Confirming,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
