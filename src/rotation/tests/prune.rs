//! Rule "prune": revoked key Secrets beyond the retention are deleted.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "prune";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Prune -------------------------------------------------------------------------------
        case(
            RULE,
            "prune the oldest revoked key beyond RETAIN_REVOKED",
            s(),
            obs((1..=6)
                .map(|s| key(s, Destroyed))
                .chain([key(7, Active)])
                .collect()),
            Some(Prune { seq: 1 }),
            Phase::Ready,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
