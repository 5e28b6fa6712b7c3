//! Label and annotation keys Keyward writes and reads, and the helpers that build them.

use std::collections::BTreeMap;

/// Every object Keyward creates carries this label; the operator's caches select on it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "keyward";
/// The selector the operator's Secret and ConfigMap caches use.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=keyward";

/// Name of the owning ProvisioningKey.
pub const PROVISIONING_KEY: &str = "keyward.dev/provisioning-key";
/// `key` (one per minted key), `agent-secret` or `trust-bundle`.
pub const COMPONENT: &str = "keyward.dev/component";
pub const COMPONENT_KEY: &str = "key";
pub const COMPONENT_AGENT_SECRET: &str = "agent-secret";
pub const COMPONENT_TRUST_BUNDLE: &str = "trust-bundle";
/// Forward-only lifecycle state of a key Secret.
pub const KEY_STATE: &str = "keyward.dev/key-state";
/// Sequence number of a key Secret.
pub const KEY_SEQ: &str = "keyward.dev/key-seq";

/// Manual rotation trigger on a ProvisioningKey (`kubectl annotate ... keyward.dev/rotate=$(date +%s) --overwrite`).
pub const ROTATE: &str = "keyward.dev/rotate";
/// Key id: on key Secrets, on the agent Secret, and on a workload's pod template (which key the pods run).
pub const KEY_ID: &str = "keyward.dev/key-id";
pub const FINGERPRINT: &str = "keyward.dev/fingerprint";
pub const TRIGGER: &str = "keyward.dev/trigger";
pub const CONSUMED_REQUEST_TOKEN: &str = "keyward.dev/consumed-request-token";
pub const CONSUMED_ROTATE: &str = "keyward.dev/consumed-rotate-annotation";
pub const CREATED_AT: &str = "keyward.dev/created-at";
pub const PUBLISHED_AT: &str = "keyward.dev/published-at";
pub const ACTIVATED_AT: &str = "keyward.dev/activated-at";
pub const RETIRED_AT: &str = "keyward.dev/retired-at";
/// When the key was destroyed (its private key deleted); the name predates deactivation.
pub const REVOKED_AT: &str = "keyward.dev/revoked-at";
/// When the key was deactivated (out of the trusted set, private key kept).
pub const DEACTIVATED_AT: &str = "keyward.dev/deactivated-at";
/// When a deactivated key was put back into the trusted set.
pub const REACTIVATED_AT: &str = "keyward.dev/reactivated-at";
/// The `keyward.dev/reactivate` annotation value this key's reactivation consumed.
pub const CONSUMED_REACTIVATE: &str = "keyward.dev/consumed-reactivate-annotation";
/// Reactivation request on a ProvisioningKey: `<kid>` or `<kid>,<anything>` (a new value is a
/// new request; `keyward reactivate` writes `<kid>,<time>`).
pub const REACTIVATE: &str = "keyward.dev/reactivate";
/// On a trust bundle exported by `keyward bundle export`: `<namespace>.<name>` of its key (a
/// copy, never a live bundle: it carries no `managed-by` label and no owner).
pub const EXPORTED_FROM: &str = "keyward.dev/exported-from";
/// Why the key is reactivated (free text, shown in the audit Event; at most 256 characters).
pub const REACTIVATE_REASON: &str = "keyward.dev/reactivate-reason";
/// On a key Secret: the settings recorded at mint (JSON; names and durations).
pub const SETTINGS: &str = "keyward.dev/settings";
/// On a retiring key Secret: `exp` of the last token the key signed.
pub const LAST_TOKEN_EXP: &str = "keyward.dev/last-token-exp";
/// On the agent Secret: when its key id was first handed out (kept across token refreshes).
pub const HANDED_OUT_AT: &str = "keyward.dev/handed-out-at";
/// On the trust bundle: the highest key sequence number ever minted (never reused).
pub const LAST_SEQ: &str = "keyward.dev/last-seq";
/// On a workload: when Keyward rolled it, and to which key (metadata, not the pod template).
pub const ROLLED_AT: &str = "keyward.dev/rolled-at";
/// On a workload: the PolicyAgent that manages its rolls.
pub const POLICY_AGENT: &str = "keyward.dev/policy-agent";

/// Secret type of the agent Secret.
pub const AGENT_SECRET_TYPE: &str = "keyward.dev/provisioning-key";

/// Data keys of the agent Secret.
pub const DATA_KEY_ID: &str = "key-id";
pub const DATA_PUBLIC_KEY: &str = "public-key.pem";
pub const DATA_PRIVATE_KEY: &str = "private-key.pem";
pub const DATA_TOKEN: &str = "token";
/// Data keys of the trust bundle ConfigMap.
pub const DATA_JWKS: &str = "jwks.json";
pub const DATA_REVOKED: &str = "revoked.json";

/// Metadata of GitOps tools that must never be copied onto generated objects: a copied tracking
/// label makes Argo CD or Flux adopt (and then prune) the generated Secret.
pub fn is_gitops_tracking(key: &str) -> bool {
    key == "app.kubernetes.io/instance"
        || key == "kubectl.kubernetes.io/last-applied-configuration"
        || key.starts_with("argocd.argoproj.io/")
        || key.starts_with("kustomize.toolkit.fluxcd.io/")
        || key.starts_with("helm.toolkit.fluxcd.io/")
        || key.starts_with("fluxcd.io/")
}

/// The user's template metadata without GitOps tracking keys and without keys Keyward owns.
pub fn user_metadata(template: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    template
        .iter()
        .filter(|(k, _)| {
            !is_gitops_tracking(k) && !k.starts_with("keyward.dev/") && k.as_str() != MANAGED_BY
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Keys Keyward sets itself on the objects it creates: everything under `keyward.dev/`, and
/// [`MANAGED_BY`]. A `secretTemplate` may not set them.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with("keyward.dev/") || key == MANAGED_BY
}

/// Whether `s` is a DNS-1123 subdomain (lowercase alphanumerics, `-` and `.`, starting and ending
/// with an alphanumeric, at most 253 characters), as a key prefix must be.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// Whether `s` is 1 to 63 characters of `[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?`.
fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Checks a label or annotation key as the API server does (a qualified name: an optional
/// DNS-subdomain prefix and `/`, then a name of at most 63 characters); the error says why not.
pub fn qualified_name(key: &str) -> Result<(), &'static str> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Err(
            "the prefix before '/' must be a DNS subdomain (lowercase alphanumerics, '-' and '.', at most 253 characters)",
        );
    }
    if !is_name_part(name) {
        return Err(
            "the name must be 1 to 63 characters of alphanumerics, '-', '_' and '.', starting and ending with an alphanumeric, with at most one '/' before it",
        );
    }
    Ok(())
}

/// Checks a label value as the API server does (empty, or a name of at most 63 characters).
pub fn label_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() || is_name_part(value) {
        Ok(())
    } else {
        Err(
            "a label value must be empty or 1 to 63 characters of alphanumerics, '-', '_' and '.', starting and ending with an alphanumeric",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_metadata_is_never_copied() {
        let t: BTreeMap<String, String> = [
            ("app.kubernetes.io/instance", "argo-app"),
            ("argocd.argoproj.io/tracking-id", "x"),
            ("kustomize.toolkit.fluxcd.io/name", "flux"),
            ("helm.toolkit.fluxcd.io/name", "flux"),
            ("keyward.dev/key-id", "forged"),
            ("team", "payments"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let kept = user_metadata(&t);
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["team"]);
    }

    #[test]
    fn keys_and_values_as_the_api_server_checks_them() {
        let long = "a".repeat(63);
        let too_long = "a".repeat(64);
        let ok_prefix = format!("{}.io/x", "a".repeat(250));
        let long_prefix = format!("{}.io/x", "a".repeat(251));
        for (key, ok) in [
            ("team", true),
            ("app.kubernetes.io/part-of", true),
            ("example.com/Team_Name.v1", true),
            ("A", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("", false),
            ("-team", false),
            ("team-", false),
            ("te am", false),
            ("a/b/c", false),
            ("/team", false),
            ("Example.com/team", false),
            ("example..com/team", false),
            ("-example.com/team", false),
            ("example.com/", false),
            (ok_prefix.as_str(), true),
            (long_prefix.as_str(), false),
            ("équipe", false),
        ] {
            assert_eq!(qualified_name(key).is_ok(), ok, "{key:?}");
        }
        for (value, ok) in [
            ("", true),
            ("payments", true),
            ("v1.2_3-x", true),
            (long.as_str(), true),
            (too_long.as_str(), false),
            ("-x", false),
            ("x.", false),
            ("a/b", false),
            ("a b", false),
        ] {
            assert_eq!(label_value(value).is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn reserved_keys() {
        assert!(is_reserved("keyward.dev/key-id"));
        assert!(is_reserved("keyward.dev/anything"));
        assert!(is_reserved(MANAGED_BY));
        assert!(!is_reserved("app.kubernetes.io/part-of"));
        assert!(!is_reserved("sub.keyward.dev/x"));
    }
}
