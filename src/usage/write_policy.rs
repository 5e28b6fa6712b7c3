//! The ValidatingAdmissionPolicy that keeps each `keyward verifier` replica to its own usage
//! evidence (issue 18, finding 4): a request of the verifier's ServiceAccount that creates,
//! changes or deletes a KeyUsageReport or a Lease must come from a pod (a bound token carries
//! `authentication.kubernetes.io/pod-name`), and the object must be that pod's: a report
//! labelled (and `spec.replica`) with the pod's name, a Lease named
//! `keyward-verifier-<pod name>`. So a compromised replica can neither overwrite another
//! replica's reports nor write another replica's Lease or the operator's leader Lease.
//!
//! The chart's template `verifier-write-policy.yaml` carries these expressions verbatim (a test
//! checks it); [`policy_objects`] builds the same policy for tests.

/// The variable `podName`: the requesting pod's name, or `''` when the request carries none
/// (or more than one).
pub const POD_NAME_VARIABLE: &str = "has(request.userInfo.extra) && 'authentication.kubernetes.io/pod-name' in request.userInfo.extra && size(request.userInfo.extra['authentication.kubernetes.io/pod-name']) == 1 ? request.userInfo.extra['authentication.kubernetes.io/pod-name'][0] : ''";

/// The request comes from a pod.
pub const RULE_FROM_A_POD: &str = "variables.podName != ''";
pub const MESSAGE_FROM_A_POD: &str = "the keyward verifier writes usage evidence only with its pod's bound ServiceAccount token (no pod name in the request)";

/// A Lease is the pod's own (`keyward-verifier-<pod>`, see `crate::usage::lease_name`).
pub const RULE_OWN_LEASE: &str = "request.resource.resource != 'leases' || (request.operation == 'DELETE' ? oldObject : object).metadata.name == 'keyward-verifier-' + variables.podName";
pub const MESSAGE_OWN_LEASE: &str =
    "a keyward verifier replica may write only its own Lease, keyward-verifier-<its pod name>";

/// A report is the pod's own, before and after (label `keyward.dev/verifier-replica` and
/// `spec.replica`).
pub const RULE_OWN_REPORT: &str = "request.resource.resource != 'keyusagereports' || ((request.operation == 'CREATE' || (has(oldObject.metadata.labels) && 'keyward.dev/verifier-replica' in oldObject.metadata.labels && oldObject.metadata.labels['keyward.dev/verifier-replica'] == variables.podName)) && (request.operation == 'DELETE' || (has(object.metadata.labels) && 'keyward.dev/verifier-replica' in object.metadata.labels && object.metadata.labels['keyward.dev/verifier-replica'] == variables.podName && object.spec.replica == variables.podName)))";
pub const MESSAGE_OWN_REPORT: &str = "a keyward verifier replica may write only its own KeyUsageReports (label keyward.dev/verifier-replica and spec.replica = its pod name)";

/// The second policy, for everyone else: usage evidence (every KeyUsageReport, every Lease
/// named `keyward-verifier-*`) is not theirs to create, change or delete. Without it, whoever
/// may patch a report could lower its `lastUsedAt` and raise its sequence number, and whoever
/// may update a Lease (the aggregated `edit` role may) could rewrite its list or watermark. The
/// verifier's ServiceAccount (held to its own pod's objects by the policy above), the control
/// plane's garbage and namespace collectors (a deleted key's reports, a deleted namespace) and
/// the configured extra writers are exempt.
pub const EVIDENCE_MATCH: &str =
    "request.resource.resource != 'leases' || request.name.startsWith('keyward-verifier-')";
pub const EVIDENCE_RULE: &str = "false";
pub const EVIDENCE_MESSAGE: &str = "usage evidence (KeyUsageReports and keyward-verifier-* Leases) is written only by the keyward verifier's pods";

/// The control plane's identities that delete evidence with its owner or its namespace.
pub const CONTROL_PLANE_WRITERS: [&str; 3] = [
    "system:serviceaccount:kube-system:generic-garbage-collector",
    "system:serviceaccount:kube-system:namespace-controller",
    "system:kube-controller-manager",
];

/// The evidence policy and its binding (`namespace`: only that namespace), for tests; the
/// chart renders the same from `verifier-write-policy.yaml`.
pub fn evidence_policy_objects(
    name: &str,
    writers: &[String],
    namespace: Option<&str>,
) -> (serde_json::Value, serde_json::Value) {
    use crate::admission;
    let writers = CONTROL_PLANE_WRITERS
        .iter()
        .map(|w| w.to_string())
        .chain(writers.iter().cloned());
    let policy = admission::policy(
        name,
        evidence_resources(),
        serde_json::json!([
            { "name": "usage-evidence", "expression": EVIDENCE_MATCH },
            {
                "name": "not-a-writer",
                "expression": format!(
                    "!(request.userInfo.username in [{}])",
                    admission::cel_strings(writers)
                ),
            },
        ]),
        None,
        serde_json::json!([
            { "expression": EVIDENCE_RULE, "message": EVIDENCE_MESSAGE, "reason": "Forbidden" },
        ]),
    );
    (policy, admission::binding(name, namespace))
}

/// KeyUsageReports and Leases: created, changed, deleted.
fn evidence_resources() -> serde_json::Value {
    serde_json::json!([
        {
            "apiGroups": ["keyward.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["keyusagereports"],
        },
        {
            "apiGroups": ["coordination.k8s.io"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE", "DELETE"],
            "resources": ["leases"],
        },
    ])
}

/// Every expression the chart must carry verbatim.
pub const EXPRESSIONS: [&str; 9] = [
    EVIDENCE_MATCH,
    EVIDENCE_MESSAGE,
    POD_NAME_VARIABLE,
    RULE_FROM_A_POD,
    MESSAGE_FROM_A_POD,
    RULE_OWN_LEASE,
    MESSAGE_OWN_LEASE,
    RULE_OWN_REPORT,
    MESSAGE_OWN_REPORT,
];

/// The policy and its binding (cluster-wide: the match condition limits it to `username`, the
/// verifier's ServiceAccount), as the chart renders them.
pub fn policy_objects(name: &str, username: &str) -> (serde_json::Value, serde_json::Value) {
    use crate::admission;
    let policy = admission::policy(
        name,
        evidence_resources(),
        serde_json::json!([{
            "name": "the-verifier",
            "expression": format!("request.userInfo.username == {}", admission::cel_strings([username])),
        }]),
        Some(serde_json::json!([{ "name": "podName", "expression": POD_NAME_VARIABLE }])),
        serde_json::json!([
            { "expression": RULE_FROM_A_POD, "message": MESSAGE_FROM_A_POD, "reason": "Forbidden" },
            { "expression": RULE_OWN_LEASE, "message": MESSAGE_OWN_LEASE, "reason": "Forbidden" },
            { "expression": RULE_OWN_REPORT, "message": MESSAGE_OWN_REPORT, "reason": "Forbidden" },
        ]),
    );
    (policy, admission::binding(name, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_carries_the_rules_verbatim() {
        let chart = include_str!("../../charts/keyward/templates/verifier-write-policy.yaml");
        for e in EXPRESSIONS {
            assert!(
                chart.contains(e),
                "charts/keyward/templates/verifier-write-policy.yaml does not carry {e}"
            );
        }
        // The names the rules hard-code are the ones the code uses.
        assert!(RULE_OWN_LEASE.contains(&format!("'{}'", crate::usage::LEASE_PREFIX)));
        assert!(RULE_OWN_REPORT.contains(&format!("'{}'", crate::usage::REPLICA_LABEL)));
    }
}
