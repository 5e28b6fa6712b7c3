//! Rule "retire": older active and superseded published keys retire.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "retire";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Retirement and hand-out -------------------------------------------------------------
        case(
            RULE,
            "older active key retires",
            s(),
            with_obs(vec![key(1, Active), key(2, Active)], |o| {
                o.agent_secret = agent(&kid(1))
            }),
            Some(Retire { seq: 1 }),
            Phase::Confirming,
        ),
        case(
            RULE,
            "superseded published key retires",
            s(),
            obs(vec![key(1, Published), key(2, Active)]),
            Some(Retire { seq: 1 }),
            Phase::Confirming,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
