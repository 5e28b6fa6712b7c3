//! Copies of a trust bundle in other namespaces (`spec.trustBundle.namespaceSelector`), the pure
//! part: what a copy holds and which namespaces get one, lose one, or are blocked.
//!
//! A copy holds only what every verifier trusts: the source bundle's entries whose key ids the
//! trust record lists, and the revoked key ids the record does not (a JWK injected into the
//! source ConfigMap is never copied). A copy is a ConfigMap named like the source bundle,
//! labelled `keyward.dev/copy-of-uid=<the key's uid>` (a label value fits; `<ns>.<name>` may
//! not), never `keyward.dev/provisioning-key` (the verifier must not take a copy for a source).
//! A ConfigMap of that name that is not such a copy is someone else's: it is never overwritten.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::ProvisioningKey;
use crate::keys::Jwks;
use crate::labels as l;
use crate::trust_record::TrustRecord;

/// The label that marks a copy, with the source key's uid as its value.
pub const COPY_OF_UID: &str = "keyward.dev/copy-of-uid";
/// The annotation that names the source, `<namespace>/<name>`, for people.
pub const COPY_OF: &str = "keyward.dev/copy-of";
/// `keyward.dev/component` of a copy.
pub const COMPONENT_COPY: &str = "trust-bundle-copy";
/// A namespace accepts copies from the keys of namespace `<ns>` only when it carries the label
/// `accept-bundles.keyward.dev/<ns>: "true"`: namespaces are cluster-scoped, so a tenant who
/// may edit a ProvisioningKey cannot place a ConfigMap of its choosing in another tenant's
/// namespace by writing a selector. The selector narrows further.
pub fn accept_label(source_ns: &str) -> String {
    format!("accept-bundles.keyward.dev/{source_ns}")
}

/// The finalizer that removes the copies when the key goes (they have no owner reference: it
/// cannot cross namespaces).
pub const FINALIZER: &str = "keyward.dev/bundle-copies";

/// The data of a copy of `source` (the key's own bundle ConfigMap), or `None` while there is
/// nothing trustworthy to copy (no readable trust record, an unreadable bundle).
pub fn copy_data(pk: &ProvisioningKey, source: &ConfigMap) -> Option<BTreeMap<String, String>> {
    let record = TrustRecord::of(pk)?.ok()?;
    let data = source.data.as_ref()?;
    let jwks: Jwks = serde_json::from_str(data.get(l::DATA_JWKS)?).ok()?;
    let revoked: Vec<String> = data
        .get(l::DATA_REVOKED)
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    let jwks = Jwks {
        keys: jwks
            .keys
            .into_iter()
            .filter(|k| k.kid.as_deref().is_some_and(|kid| record.has(kid)))
            .collect(),
    };
    let revoked: Vec<String> = revoked.into_iter().filter(|k| !record.has(k)).collect();
    Some(BTreeMap::from([
        (
            l::DATA_JWKS.to_string(),
            serde_json::to_string_pretty(&jwks).ok()?,
        ),
        (
            l::DATA_REVOKED.to_string(),
            serde_json::to_string_pretty(&revoked).ok()?,
        ),
    ]))
}

/// The copy of `pk`'s bundle for namespace `ns`.
pub fn copy_object(pk: &ProvisioningKey, ns: &str, data: BTreeMap<String, String>) -> ConfigMap {
    let source = format!(
        "{}/{}",
        pk.metadata.namespace.as_deref().unwrap_or_default(),
        pk.metadata.name.as_deref().unwrap_or_default()
    );
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(pk.trust_bundle_name()),
            namespace: Some(ns.to_string()),
            labels: Some(BTreeMap::from([
                (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                (l::COMPONENT.to_string(), COMPONENT_COPY.to_string()),
                (
                    COPY_OF_UID.to_string(),
                    pk.metadata.uid.clone().unwrap_or_default(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(COPY_OF.to_string(), source)])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

/// What a namespace holds under the copy's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Held {
    /// Our copy, with this data.
    Copy(BTreeMap<String, String>),
    /// A ConfigMap that is not our copy.
    Foreign,
}

/// The changes: namespaces to write a copy into, to delete it from, and blocked ones (a
/// foreign ConfigMap holds the name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub write: Vec<String>,
    pub delete: Vec<String>,
    pub blocked: Vec<String>,
}

/// The changes that bring `held` (namespace -> what it holds) to a copy of `want` in exactly
/// `selected` (the key's own namespace excluded: it holds the source).
pub fn changes(
    own: &str,
    selected: &BTreeSet<String>,
    held: &BTreeMap<String, Held>,
    want: &BTreeMap<String, String>,
) -> Changes {
    let mut c = Changes::default();
    for ns in selected.iter().filter(|n| n.as_str() != own) {
        match held.get(ns) {
            Some(Held::Copy(data)) if data == want => {}
            Some(Held::Foreign) => c.blocked.push(ns.clone()),
            _ => c.write.push(ns.clone()),
        }
    }
    for (ns, h) in held {
        if matches!(h, Held::Copy(_)) && (!selected.contains(ns) || ns == own) {
            c.delete.push(ns.clone());
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn copies_follow_the_selection_and_never_touch_a_foreign_configmap() {
        let want = BTreeMap::from([("jwks.json".to_string(), "{}".to_string())]);
        let old = BTreeMap::from([("jwks.json".to_string(), "{\"keys\":[]}".to_string())]);
        let held = BTreeMap::from([
            ("a".to_string(), Held::Copy(want.clone())),
            ("b".to_string(), Held::Copy(old)),
            ("c".to_string(), Held::Foreign),
            ("gone".to_string(), Held::Copy(want.clone())),
            ("home".to_string(), Held::Copy(want.clone())),
        ]);
        let c = changes("home", &set(&["a", "b", "c", "d", "home"]), &held, &want);
        assert_eq!(
            c.write,
            vec!["b", "d"],
            "stale and missing copies are written"
        );
        assert_eq!(
            c.blocked,
            vec!["c"],
            "a foreign ConfigMap is never overwritten"
        );
        assert_eq!(
            c.delete,
            vec!["gone", "home"],
            "unselected namespaces lose their copy, and the source namespace holds no copy"
        );
        // Settled: nothing to do.
        let settled = BTreeMap::from([("a".to_string(), Held::Copy(want.clone()))]);
        assert_eq!(
            changes("home", &set(&["a"]), &settled, &want),
            Changes::default()
        );
    }

    #[test]
    fn a_copy_holds_only_recorded_key_ids() {
        use crate::keys::KeyPair;
        let (k1, injected) = (KeyPair::generate(), KeyPair::generate());
        let record = TrustRecord {
            bundle: "pk-trust".into(),
            aud: "keyward".into(),
            iss: "keyward".into(),
            kids: [(k1.key_id(), 3600)].into(),
            ..Default::default()
        };
        let pk: ProvisioningKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
            "metadata": {"name": "pk", "namespace": "home", "uid": "u-1",
                "annotations": {crate::trust_record::ANNOTATION: record.render()}},
            "spec": {},
        }))
        .expect("pk");
        let jwks = Jwks {
            keys: vec![k1.public_key().to_jwk(), injected.public_key().to_jwk()],
        };
        let source = ConfigMap {
            data: Some(BTreeMap::from([
                (
                    l::DATA_JWKS.to_string(),
                    serde_json::to_string(&jwks).expect("jwks"),
                ),
                (
                    l::DATA_REVOKED.to_string(),
                    serde_json::to_string(&vec![k1.key_id(), "old".to_string()]).expect("r"),
                ),
            ])),
            ..Default::default()
        };
        let data = copy_data(&pk, &source).expect("data");
        let copied: Jwks = serde_json::from_str(&data[l::DATA_JWKS]).expect("jwks");
        assert_eq!(
            copied.key_ids(),
            vec![k1.key_id()],
            "the injected JWK is not copied"
        );
        let revoked: Vec<String> = serde_json::from_str(&data[l::DATA_REVOKED]).expect("revoked");
        assert_eq!(
            revoked,
            vec!["old"],
            "a recorded key id is never listed revoked"
        );
        let cm = copy_object(&pk, "team-a", data);
        let labels = cm.metadata.labels.expect("labels");
        assert_eq!(labels[COPY_OF_UID], "u-1");
        assert!(
            !labels.contains_key(l::PROVISIONING_KEY),
            "a copy is never a source"
        );
        // No record: nothing to copy.
        let mut bare = pk.clone();
        bare.metadata.annotations = None;
        assert!(copy_data(&bare, &source).is_none());
    }
}
