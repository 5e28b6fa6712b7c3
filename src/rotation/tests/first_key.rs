//! Rule "first key": with no key yet, the first one is minted, created active when nothing is
//! trusted and no agent holds a key (otherwise pending), consuming any request present.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "first key";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key ---------------------------------------------------------------------------
        case(
            RULE,
            "first mint consumes the present requestToken and annotation",
            with_settings(|s| s.request_token = some("r1")),
            with_obs(vec![], |o| {
                o.rotate_annotation = some("a1");
                o.bundle = BundleObs::Missing;
            }),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: some("r1"),
                consumed_annotation: some("a1"),
                active: true,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "first mint without requests",
            s(),
            with_obs(vec![], |o| o.bundle = BundleObs::Missing),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: true,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "first mint while the bundle trusts an unrecorded key: created pending",
            s(),
            with_obs(vec![], |o| o.bundle = bundle(&[7], &[])),
            Some(Mint {
                seq: 8,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        case(
            RULE,
            "first mint while an agent Secret exists: created pending",
            s(),
            with_obs(vec![], |o| {
                o.bundle = BundleObs::Missing;
                o.agent_secret = agent(&kid(9));
            }),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
