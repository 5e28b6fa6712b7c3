//! The parts every ValidatingAdmissionPolicy Keyward ships shares, as objects for tests (the
//! chart renders the same in its templates): a CEL list of usernames, the policy's skeleton
//! and its binding.

use serde_json::{Value, json};

/// `'a', 'b'`: `usernames` as CEL string literals, for `request.userInfo.username in [...]`.
pub fn cel_strings<S: AsRef<str>>(usernames: impl IntoIterator<Item = S>) -> String {
    usernames
        .into_iter()
        .map(|u| {
            format!(
                "'{}'",
                u.as_ref().replace('\\', "\\\\").replace('\'', "\\'")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A policy `name` over `resource_rules`, failing closed, with these match conditions,
/// variables and validations.
pub fn policy(
    name: &str,
    resource_rules: Value,
    match_conditions: Value,
    variables: Option<Value>,
    validations: Value,
) -> Value {
    let mut p = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": { "name": name },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": resource_rules },
            "matchConditions": match_conditions,
            "validations": validations,
        },
    });
    if let Some(v) = variables {
        p["spec"]["variables"] = v;
    }
    p
}

/// The binding of policy `name` (same name), denying; only in `namespace` when given.
pub fn binding(name: &str, namespace: Option<&str>) -> Value {
    let mut b = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": { "name": name },
        "spec": { "policyName": name, "validationActions": ["Deny"] },
    });
    if let Some(ns) = namespace {
        b["spec"]["matchResources"] = json!({
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": ns } },
        });
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_quoted_as_cel_strings() {
        assert_eq!(
            cel_strings(["system:serviceaccount:a:b", "x'y", r"c\d"]),
            r"'system:serviceaccount:a:b', 'x\'y', 'c\\d'"
        );
    }

    #[test]
    fn a_binding_covers_one_namespace_or_all() {
        assert_eq!(
            binding("p", Some("ns"))["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
                ["kubernetes.io/metadata.name"],
            "ns"
        );
        assert!(binding("p", None)["spec"].get("matchResources").is_none());
    }
}
