//! Keyward's integration tests, one test binary (`cargo test --test plane`): one module per
//! area, sharing one fixture ([`common`]). Linking the kube stack once instead of once per file
//! is what this layout is for; the test names are `<module>::<test>`, so a module is selected
//! with a filter: `cargo test --features fault-injection --test plane provisioning_key::`.
//!
//! Most modules need the local plane (`bash e2e/cluster.sh up`); `chart`, `crds`,
//! `keys_interop` and `model` do not. Every test that uses the plane creates its own namespace
//! through [`common::TestNamespace`], which first takes one of `KEYWARD_PLANE_TESTS` (default 4)
//! plane slots, so raising `--test-threads` does not put every plane test on the API server at
//! once.

mod common;

mod cel;
mod chart;
mod cli;
mod crds;
mod gitops;
mod keys_interop;
mod leader;
mod metrics;
mod model;
mod policy_agent;
mod provisioning_key;
mod request_cost;
mod smoke;
mod startup;
mod usage;
mod verifier;

/// Every namespace of a plane test comes from the shared fixture (which holds a plane slot),
/// never from `keyward_testbed::TestNamespace` directly.
#[test]
fn plane_tests_take_their_namespace_from_the_fixture() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plane");
    let mut stack = vec![dir];
    let mut offenders = Vec::new();
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read tests/plane") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let fixture = path.ends_with("common/mod.rs") || path.ends_with("plane/main.rs");
            if path.extension().is_none_or(|e| e != "rs") || fixture {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a module");
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let direct = code.contains("keyward_testbed::TestNamespace")
                || code.split("use keyward_testbed::").skip(1).any(|rest| {
                    rest.split(';')
                        .next()
                        .is_some_and(|u| u.contains("TestNamespace"))
                });
            if direct {
                offenders.push(path.display().to_string());
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "use crate::common::TestNamespace (it takes a plane slot), not keyward_testbed's: {offenders:?}"
    );
}
