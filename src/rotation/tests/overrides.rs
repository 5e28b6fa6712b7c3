//! What `plan` adds over the chain's decision: a refused spec and names owned by someone else
//! block what they must (never a hand-out into a foreign Secret, no write of a foreign bundle)
//! and nothing else: liveness first. Each row names the rule of the chain that decides under
//! the override.

use super::*;

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Names taken -------------------------------------------------------------------------
        case(
            "first key",
            "foreign trust bundle: blocked, not even the first mint",
            s(),
            with_obs(vec![], |o| o.bundle = BundleObs::Foreign),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "publish",
            "foreign trust bundle during a rotation: labels move, the bundle is never written",
            s(),
            with_obs(vec![key(1, Active), key(2, Pending)], |o| {
                o.bundle = BundleObs::Foreign
            }),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "hand out",
            "foreign agent Secret: blocked",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = AgentSecretObs::Foreign
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            "first key",
            "foreign agent Secret before the first key: blocked",
            s(),
            with_obs(vec![], |o| o.agent_secret = AgentSecretObs::Foreign),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        // --- Liveness first: refused specs, names owned by someone else --------------------------
        case(
            "hand out",
            "refused spec: a due token refresh still happens",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "rotation.interval: 1m is below the operator's floor".into(),
                })
            }),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(3000).timestamp());
                    a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        )
        .check(Check::Blocked("BelowFloor")),
        case(
            "rotate",
            "refused spec: a due rotation is refused, not started",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Ready,
        )
        .check(Check::Blocked("BelowFloor"))
        .check(Check::Rotating(reasons::REFUSED))
        .check(Check::TokenRefreshAt(
            ago(60) + chrono::Duration::seconds(TTL as i64 / 2),
        )),
        case(
            "activate",
            "refused spec: a rotation in flight still completes",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "MalformedDuration",
                    message: "bad".into(),
                })
            }),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: Some(ago(200)),
                        ..key(2, Published)
                    },
                ],
                |_| {},
            ),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Blocked("MalformedDuration")),
        case(
            "break-glass",
            "refused spec: a valid compromisedKeys entry is honoured at once",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
            }),
            obs(vec![key(1, Active)]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "hand out",
            "foreign agent Secret: never written, no revocation, bundle still kept",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = AgentSecretObs::Foreign;
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            "hand out",
            "foreign trust bundle: the token is still refreshed",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(3000).timestamp());
                    a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                });
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "replace",
            "foreign trust bundle: a published key is never activated",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: None,
                    ..key(1, Published)
                }],
                |o| {
                    o.bundle = BundleObs::Foreign;
                    o.agent_secret = AgentSecretObs::Missing;
                },
            ),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "hand out",
            "agent Secret without hand-out time is repaired (the overlap clock needs it)",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.handed_out_at = None);
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
