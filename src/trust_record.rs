//! The trust record: which key ids the operator minted for a ProvisioningKey, and the names and
//! claims it signs with. It is the only evidence the verifier trusts a key id on.
//!
//! It lives in the ProvisioningKey's own status, `status.trustRecord` ([`TrustRecord::of`]):
//! - only the operator's identity may write it, enforced by the API server with the
//!   ValidatingAdmissionPolicy the chart installs ([`POLICY_RULE`], on the object and on its
//!   `status` subresource); anyone who may patch the trust-bundle ConfigMap can add a JWK there,
//!   and anyone who may write the status can change the rest of it, but neither can add a key id
//!   here;
//! - a key id is written here before its key replaces a trusted one (before the bundle
//!   publishes it and before a token of it is handed out), and removed only once that key is
//!   revoked, so every token the operator hands out for a rotation passes at once. A key's very
//!   first record rides on the status write that ends the reconcile which minted it: until that
//!   write nothing of the key is trusted anywhere, so there is nothing to protect by writing it
//!   sooner, and one write per new key is saved.
//!
//! Earlier versions kept it in the annotation [`ANNOTATION`] (still read when the status holds
//! no record, and protected by the same policy). The operator copies it into status as it is,
//! and keeps the annotation while the two agree, so that a verifier of an earlier version still
//! trusts the key while an upgrade rolls; the first record change after that (a rotation)
//! removes it.
//!
//! The verifier trusts a key id only when the bundle lists it **and** the record does, and
//! checks `aud`, `iss` and a token's lifetime against the record, never against the current
//! spec (which the operator may have refused).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::ProvisioningKey;

/// The annotation in which earlier versions kept the record (compact JSON); read only when the
/// status holds none.
pub const ANNOTATION: &str = "keyward.dev/trust-record";

/// Largest record read (the API server caps all annotations at 256 KiB; a record of a few keys
/// is a few hundred bytes).
pub const MAX_LEN: usize = 16 * 1024;

/// Most key ids in one record (a key has at most a current, a retiring and a pending key, plus
/// a few whose key Secret was lost).
pub const MAX_KIDS: usize = 32;

/// The record. Serialized with sorted keys (a `BTreeMap`), so the same record is the same
/// string and a settled key writes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRecord {
    /// The trust-bundle ConfigMap's name (it never changes on a live key).
    pub bundle: String,
    /// `aud` of the tokens the operator hands out.
    pub aud: String,
    /// `iss` of the tokens the operator hands out.
    pub iss: String,
    /// Key id to the longest token lifetime (`exp - iat`, seconds) the operator signed with it.
    pub kids: BTreeMap<String, u64>,
    /// Key ids revoked reversibly (deactivated: private key kept until `retainDeactivatedFor`
    /// has passed), to the Unix time of their deactivation. Only the operator writes this, so
    /// an edit of a key Secret's annotations cannot quietly put a deactivated key back into
    /// the trusted set: only a reactivation request does. The verifier ignores it (a key id
    /// here is never in `kids`). Absent when empty, so a record without deactivations renders
    /// as it did before.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deactivated: BTreeMap<String, i64>,
    /// The static claims (`spec.token.claims`) the operator signs into its tokens. A verifier
    /// route that requires a claim checks it here as well as in the token, so an agent holding
    /// the private key (`includePrivateKey`) cannot grant itself a scope. Absent when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
    /// `spec.token.mode: ProofOfPossession`: the verifier refuses a bearer token signed by one
    /// of these key ids, and accepts only access tokens its token endpoint issued against a
    /// client assertion. Absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pop: bool,
}

/// Why a record could not be read (the verifier then trusts nothing of that key; the operator
/// writes a fresh one).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the trust record is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("the trust record is not valid JSON of the expected shape")]
    Malformed,
    #[error("the trust record lists more than {MAX_KIDS} key ids (trusted or deactivated)")]
    TooManyKids,
}

impl TrustRecord {
    /// Parses an annotation value.
    pub fn parse(s: &str) -> Result<Self, RecordError> {
        if s.len() > MAX_LEN {
            return Err(RecordError::TooLong);
        }
        let r: TrustRecord = serde_json::from_str(s).map_err(|_| RecordError::Malformed)?;
        if r.kids.len() > MAX_KIDS || r.deactivated.len() > MAX_KIDS {
            return Err(RecordError::TooManyKids);
        }
        Ok(r)
    }

    /// The record on `pk`: the one in its status, else the one in the earlier versions'
    /// annotation; `None` when it has neither (never reconciled), `Some(Err)` when it is
    /// unreadable.
    pub fn of(pk: &ProvisioningKey) -> Option<Result<Self, RecordError>> {
        pk.status
            .as_ref()
            .and_then(|s| s.trust_record.as_deref())
            .or_else(|| legacy_annotation(pk))
            .map(Self::parse)
    }

    /// The annotation value.
    pub fn render(&self) -> String {
        // Serializing a struct of strings and a map of string to integer cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn has(&self, kid: &str) -> bool {
        self.kids.contains_key(kid)
    }
}

/// The earlier versions' record annotation on `pk`, if it still carries one.
fn legacy_annotation(pk: &ProvisioningKey) -> Option<&str> {
    pk.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION))
        .map(String::as_str)
}

/// Where a ProvisioningKey keeps its record now, as far as moving it out of the earlier
/// versions' annotation goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Legacy {
    /// No record annotation (the record, if any, is in status).
    #[default]
    None,
    /// The record is read from the annotation: the status holds none yet.
    Only,
    /// The status holds the record, and the annotation holds the same: kept, so that a
    /// verifier of an earlier version (which reads only the annotation) still trusts the key
    /// while an upgrade rolls.
    Copied,
    /// The status holds a newer record than the annotation (a rotation since the upgrade): the
    /// annotation is stale and is removed.
    Stale,
}

impl Legacy {
    pub fn of(pk: &ProvisioningKey) -> Self {
        let in_status = pk.status.as_ref().and_then(|s| s.trust_record.as_deref());
        match (legacy_annotation(pk), in_status) {
            (None, _) => Legacy::None,
            (Some(_), None) => Legacy::Only,
            (Some(a), Some(s)) if a == s => Legacy::Copied,
            (Some(_), Some(_)) => Legacy::Stale,
        }
    }
}

/// The CEL rule of the ValidatingAdmissionPolicy that keeps the record the operator's own. The
/// policy matches the ProvisioningKey and its `status` subresource; its match condition exempts
/// the operator's identity (and any extra writer configured, such as a restore tool). For
/// everyone else, a create must set neither `status.trustRecord` nor the earlier versions'
/// annotation, and an update must leave both as they were (added, changed and removed are all
/// refused). The API server applies a write's strategy first (a write to the object keeps the
/// old status, one to `status` the old metadata), so each rule sees what would be stored. The chart's
/// template `trust-record-policy.yaml` carries this text verbatim (a test checks it).
pub const POLICY_RULE: &str = "request.operation == 'CREATE' ? (!(has(object.metadata.annotations) && 'keyward.dev/trust-record' in object.metadata.annotations) && !(has(object.status) && has(object.status.trustRecord))) : (((has(object.metadata.annotations) && 'keyward.dev/trust-record' in object.metadata.annotations) ? object.metadata.annotations['keyward.dev/trust-record'] : '') == ((has(oldObject.metadata.annotations) && 'keyward.dev/trust-record' in oldObject.metadata.annotations) ? oldObject.metadata.annotations['keyward.dev/trust-record'] : '') && ((has(object.status) && has(object.status.trustRecord)) ? object.status.trustRecord : '') == ((has(oldObject.status) && has(oldObject.status.trustRecord)) ? oldObject.status.trustRecord : ''))";

/// The policy's message to a refused writer.
pub const POLICY_MESSAGE: &str = "only the Keyward operator may write the trust record (status.trustRecord, or the keyward.dev/trust-record annotation): it is the evidence of which key ids the operator minted";

/// The ValidatingAdmissionPolicy and its binding, as objects (tests install them; the chart has
/// its own template with the same rule). `writers` are the usernames exempt from the rule; the
/// binding covers `namespace` only, or every namespace.
pub fn policy_objects(
    name: &str,
    writers: &[String],
    namespace: Option<&str>,
) -> (serde_json::Value, serde_json::Value) {
    use crate::admission;
    let policy = admission::policy(
        name,
        serde_json::json!([{
            "apiGroups": ["keyward.dev"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["provisioningkeys", "provisioningkeys/status"],
        }]),
        serde_json::json!([{
            "name": "not-the-operator",
            "expression": format!(
                "!(request.userInfo.username in [{}])",
                admission::cel_strings(writers)
            ),
        }]),
        None,
        serde_json::json!([{ "expression": POLICY_RULE, "message": POLICY_MESSAGE, "reason": "Forbidden" }]),
    );
    (policy, admission::binding(name, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TrustRecord {
        TrustRecord {
            bundle: "b".into(),
            aud: "a".into(),
            iss: "i".into(),
            kids: [("k2".to_string(), 3600), ("k1".to_string(), 600)].into(),
            deactivated: Default::default(),
            claims: Default::default(),
            pop: false,
        }
    }

    #[test]
    fn renders_sorted_and_parses_back() {
        let r = record();
        let s = r.render();
        assert_eq!(
            s,
            r#"{"bundle":"b","aud":"a","iss":"i","kids":{"k1":600,"k2":3600}}"#
        );
        assert_eq!(TrustRecord::parse(&s), Ok(r));
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        assert_eq!(TrustRecord::parse("{"), Err(RecordError::Malformed));
        assert_eq!(
            TrustRecord::parse(r#"{"bundle":"b","aud":"a","iss":"i","kids":{"k":-1}}"#),
            Err(RecordError::Malformed)
        );
        assert_eq!(
            TrustRecord::parse(&" ".repeat(MAX_LEN + 1)),
            Err(RecordError::TooLong)
        );
        let many = TrustRecord {
            kids: (0..=MAX_KIDS).map(|i| (format!("k{i}"), 1)).collect(),
            deactivated: Default::default(),
            claims: Default::default(),
            ..record()
        };
        assert_eq!(
            TrustRecord::parse(&many.render()),
            Err(RecordError::TooManyKids)
        );
    }

    #[test]
    fn the_record_is_read_from_status_before_the_earlier_annotation() {
        let with = |status: Option<&TrustRecord>, annotation: Option<&TrustRecord>| {
            let mut pk = ProvisioningKey::new("k", Default::default());
            if let Some(r) = annotation {
                pk.metadata.annotations = Some([(ANNOTATION.to_string(), r.render())].into());
            }
            if let Some(r) = status {
                pk.status = Some(crate::api::provisioning_key::ProvisioningKeyStatus {
                    trust_record: Some(r.render()),
                    ..Default::default()
                });
            }
            pk
        };
        let old = TrustRecord {
            kids: [("old".to_string(), 60)].into(),
            ..record()
        };
        let new = record();
        let cases = [
            (None, None, None, Legacy::None),
            (Some(&new), None, Some(&new), Legacy::None),
            (None, Some(&old), Some(&old), Legacy::Only),
            (Some(&new), Some(&old), Some(&new), Legacy::Stale),
            (Some(&new), Some(&new), Some(&new), Legacy::Copied),
        ];
        for (status, annotation, read, legacy) in cases {
            let pk = with(status, annotation);
            assert_eq!(
                TrustRecord::of(&pk).map(|r| r.expect("readable")).as_ref(),
                read
            );
            assert_eq!(Legacy::of(&pk), legacy);
        }
        // An unreadable record in status is unreadable: the annotation is not read instead.
        let mut pk = with(None, Some(&old));
        pk.status = Some(crate::api::provisioning_key::ProvisioningKeyStatus {
            trust_record: Some("{".into()),
            ..Default::default()
        });
        assert_eq!(TrustRecord::of(&pk), Some(Err(RecordError::Malformed)));
    }

    #[test]
    fn the_rule_covers_the_status_subresource() {
        let (p, _) = policy_objects("p", &["op".into()], None);
        assert_eq!(
            p["spec"]["matchConstraints"]["resourceRules"][0]["resources"],
            serde_json::json!(["provisioningkeys", "provisioningkeys/status"])
        );
        for field in ["object.status.trustRecord", "oldObject.status.trustRecord"] {
            assert!(POLICY_RULE.contains(field), "{field}");
        }
        let chart = include_str!("../charts/keyward/templates/trust-record-policy.yaml");
        assert!(chart.contains(r#"resources: ["provisioningkeys", "provisioningkeys/status"]"#));
    }

    #[test]
    fn the_chart_carries_the_rule_verbatim() {
        let chart = include_str!("../charts/keyward/templates/trust-record-policy.yaml");
        assert!(
            chart.contains(POLICY_RULE),
            "charts/keyward/templates/trust-record-policy.yaml does not carry trust_record::POLICY_RULE"
        );
        assert!(chart.contains(POLICY_MESSAGE));
    }

    #[test]
    fn writers_are_quoted_as_cel_strings() {
        let (p, b) = policy_objects(
            "p",
            &["system:serviceaccount:a:b".into(), "x'y".into()],
            Some("ns"),
        );
        assert_eq!(
            b["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "ns"
        );
        assert_eq!(
            p["spec"]["matchConditions"][0]["expression"],
            r"!(request.userInfo.username in ['system:serviceaccount:a:b', 'x\'y'])"
        );
    }
}
