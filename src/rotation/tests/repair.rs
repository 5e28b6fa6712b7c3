//! Rule "repair": an edited key Secret gets its labels and annotations back before anything
//! else is decided.

use super::*;

/// The rule of [`crate::rotation::rules::RULES`] every row of this table exercises.
const RULE: &str = "repair";

pub(super) fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- Tamper: the bundle, sequence numbers ------------------------------------------------
        case(
            RULE,
            "an edited key Secret gets its metadata back before anything else",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.keys[0].edited = some("labelled revoked without a recorded revocation");
                o.consumers = vec![consumer("opa", Some(2), Some(ago(100)))];
            }),
            Some(Repair { seq: 1 }),
            Phase::Ready,
        ),
    ]
}

#[test]
fn table() {
    run_table(cases());
}
