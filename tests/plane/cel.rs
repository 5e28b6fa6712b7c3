//! The CRDs' CEL rules (`x-kubernetes-validations`), enforced by the API server itself: every
//! rule in `crds/` has a test here that an object breaking it is refused with the rule's
//! message, and that the same object without the break is accepted. This is the one source of
//! truth for the rules' behaviour; `tests/plane/crds.rs` only checks that each rule is in the schema
//! (and, for `algorithm`, which has one allowed value, evaluates it client-side). The rules
//! the operator checks too (ceilings, names) are also checked here to give the same answer as
//! `Settings::resolve` on the same values.
//!
//! Needs the local plane (`bash e2e/cluster.sh up`).

use std::collections::BTreeSet;

use crate::common::TestNamespace;
use keyward::api::{self, ProvisioningKey, limits};
use keyward::rotation::{Floors, Settings, SpecError};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Every `(json path, message)` of the CRDs' CEL rules, read from the generated CRDs.
fn rules_in_the_crds() -> BTreeSet<(String, String)> {
    fn walk(path: &str, node: &Value, out: &mut BTreeSet<(String, String)>) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            for r in rules {
                let msg = r["message"].as_str().unwrap_or_default().to_string();
                out.insert((path.to_string(), msg));
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let p = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                walk(&p, child, out);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, out);
        }
    }
    let mut out = BTreeSet::new();
    for crd in api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let crd = serde_json::to_value(&crd).expect("CRD serializes");
        for v in crd["spec"]["versions"].as_array().expect("versions") {
            let mut rules = BTreeSet::new();
            walk("", &v["schema"]["openAPIV3Schema"], &mut rules);
            out.extend(rules.into_iter().map(|(p, m)| (format!("{name}:{p}"), m)));
        }
    }
    out
}

/// The rules this file tests (keep in step with the tests below; the first test fails when a
/// rule is added to the CRDs without a server-side test here). Messages come from the constants
/// the rules are generated from; paths are written out.
fn tested() -> BTreeSet<(String, String)> {
    let pk = "provisioningkeys.keyward.dev";
    let mut out: BTreeSet<(String, String)> = [
        ("spec.algorithm", "algorithm is immutable"),
        ("", limits::SECRET_NAME_IMMUTABLE),
        ("", limits::CONFIG_MAP_NAME_IMMUTABLE),
        ("", limits::NAME_TOO_LONG),
        ("", limits::SECRET_NAME_LIKE_A_KEY_SECRET),
        ("spec.token.claims", limits::CLAIMS_RESERVED),
        ("spec.rotation.window", limits::WINDOW_EMPTY),
        ("", limits::POP_NEEDS_PRIVATE_KEY),
    ]
    .into_iter()
    .map(|(p, m)| (format!("{pk}:{p}"), m.to_string()))
    .collect();
    for (path, ceiling) in [
        ("spec.token.ttl", limits::TOKEN_TTL),
        ("spec.rotation.publishDelay", limits::PUBLISH_DELAY),
        ("spec.rotation.overlap", limits::OVERLAP),
        (
            "spec.rotation.revokeWhenUnusedFor",
            limits::REVOKE_WHEN_UNUSED_FOR,
        ),
        (
            "spec.rotation.retainDeactivatedFor",
            limits::RETAIN_DEACTIVATED_FOR,
        ),
        (
            "spec.rotation.confirmationTimeout",
            limits::CONFIRMATION_TIMEOUT,
        ),
        ("spec.rotation.minInterval", limits::MIN_INTERVAL),
        ("spec.rotation.interval", limits::INTERVAL),
    ] {
        assert_eq!(format!("spec.{}", ceiling.field), path);
        out.insert((format!("{pk}:{path}"), ceiling.message()));
    }
    out
}

#[test]
fn every_rule_in_the_crds_has_a_server_side_test() {
    assert_eq!(
        rules_in_the_crds(),
        tested(),
        "CEL rules in the CRDs (left) and rules tested against the API server here (right) differ"
    );
}

async fn create(pks: &Api<ProvisioningKey>, name: &str, spec: Value) {
    try_create(pks, name, spec)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

async fn try_create(
    pks: &Api<ProvisioningKey>,
    name: &str,
    spec: Value,
) -> Result<ProvisioningKey, kube::Error> {
    let pk: ProvisioningKey = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": name },
        "spec": spec,
    }))
    .expect("a ProvisioningKey");
    pks.create(&PostParams::default(), &pk).await
}

/// A merge patch of `spec`, as `kubectl patch --type merge` sends it.
async fn patch_spec(
    pks: &Api<ProvisioningKey>,
    name: &str,
    spec: Value,
) -> Result<ProvisioningKey, kube::Error> {
    pks.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
}

/// The API server refused the request as invalid (422) with `message` in its causes.
fn assert_refused_with(result: Result<ProvisioningKey, kube::Error>, message: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "not refused as invalid: {s:?}");
            assert!(
                s.message.contains(message),
                "the refusal does not carry the rule's message {message:?}: {}",
                s.message
            );
        }
        Err(e) => panic!("refused, but not by validation: {e}"),
        Ok(pk) => panic!("accepted: {:?}", pk.spec),
    }
}

/// `secretName` and `trustBundle.configMapName` cannot change on a live key: the server
/// refuses the change with the rule's message, accepts an unchanged value and other edits.
#[tokio::test]
async fn the_server_refuses_a_changed_name() {
    let ns = TestNamespace::new("kw-cel-names").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(
        &pks,
        "names",
        json!({ "secretName": "agents-a", "trustBundle": { "configMapName": "trust-a" } }),
    )
    .await;
    assert_refused_with(
        patch_spec(&pks, "names", json!({ "secretName": "agents-b" })).await,
        "secretName is immutable",
    );
    assert_refused_with(
        patch_spec(
            &pks,
            "names",
            json!({ "trustBundle": { "configMapName": "trust-b" } }),
        )
        .await,
        "configMapName is immutable",
    );
    // Both at once: both messages.
    let both = patch_spec(
        &pks,
        "names",
        json!({ "secretName": "agents-b", "trustBundle": { "configMapName": "trust-b" } }),
    )
    .await;
    assert_refused_with(both, "secretName is immutable");
    // The same values, and other fields, pass.
    let pk = patch_spec(
        &pks,
        "names",
        json!({ "secretName": "agents-a", "trustBundle": { "configMapName": "trust-a" }, "suspend": true }),
    )
    .await
    .expect("an unchanged name with another edit is accepted");
    assert_eq!(pk.spec.secret_name.as_deref(), Some("agents-a"));
    assert_eq!(pk.spec.suspend, Some(true));
    // Nothing changed on the server.
    let pk = pks.get("names").await.expect("get");
    assert_eq!(pk.spec.secret_name.as_deref(), Some("agents-a"));
    ns.cleanup().await;
}

/// `algorithm` has one allowed value (`Ed25519`), so a change is refused by the enum before a
/// transition rule could tell: the server still refuses it, and an unchanged value passes.
/// The rule itself is evaluated client-side in `tests/plane/crds.rs` (`changed_algorithm_is_rejected`).
#[tokio::test]
async fn the_server_refuses_a_changed_algorithm() {
    let ns = TestNamespace::new("kw-cel-alg").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "alg", json!({ "algorithm": "Ed25519" })).await;
    let refused = patch_spec(&pks, "alg", json!({ "algorithm": "EcdsaP256" })).await;
    match refused {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("spec.algorithm"), "{}", s.message);
        }
        other => panic!("a changed algorithm was not refused: {other:?}"),
    }
    patch_spec(&pks, "alg", json!({ "algorithm": "Ed25519" }))
        .await
        .expect("an unchanged algorithm is accepted");
    ns.cleanup().await;
}

/// A name going from unset (the default) to another value is a change: the rules sit at the
/// root and compare effective names (a field-level `self == oldSelf` rule would not run, the
/// old object having no value).
#[tokio::test]
async fn the_server_refuses_a_name_set_on_a_live_key() {
    let ns = TestNamespace::new("kw-cel-unset").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "unset", json!({})).await;
    assert_refused_with(
        patch_spec(&pks, "unset", json!({ "secretName": "other" })).await,
        "secretName is immutable",
    );
    assert_refused_with(
        patch_spec(
            &pks,
            "unset",
            json!({ "trustBundle": { "configMapName": "other" } }),
        )
        .await,
        "configMapName is immutable",
    );
    // And from set to unset, when the default differs.
    create(
        &pks,
        "set",
        json!({ "secretName": "agents", "trustBundle": { "configMapName": "bundle" } }),
    )
    .await;
    assert_refused_with(
        patch_spec(&pks, "set", json!({ "secretName": null })).await,
        "secretName is immutable",
    );
    assert_refused_with(
        patch_spec(&pks, "set", json!({ "trustBundle": null })).await,
        "configMapName is immutable",
    );
    ns.cleanup().await;
}

/// Writing the default explicitly (as a GitOps tool that renders defaults does), and removing
/// it again, is no change of the effective name: accepted.
#[tokio::test]
async fn the_server_accepts_a_default_name_written_explicitly() {
    let ns = TestNamespace::new("kw-cel-explicit").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "explicit", json!({})).await;
    let pk = patch_spec(
        &pks,
        "explicit",
        json!({ "secretName": "explicit", "trustBundle": { "configMapName": "explicit-trust" } }),
    )
    .await
    .expect("the default names written explicitly are accepted");
    assert_eq!(pk.spec.secret_name.as_deref(), Some("explicit"));
    let pk = patch_spec(
        &pks,
        "explicit",
        json!({ "secretName": null, "trustBundle": null }),
    )
    .await
    .expect("removing the explicit default names is accepted");
    assert_eq!(pk.spec.secret_name, None);
    assert_eq!(pk.spec.trust_bundle, None);
    ns.cleanup().await;
}

/// The spec of a ProvisioningKey that sets `field` (`token.ttl`, `rotation.overlap`, ...) to
/// `value`.
fn with_duration(field: &str, value: &str) -> Value {
    let (parent, child) = field.split_once('.').expect("a nested field");
    json!({ parent: { child: value } })
}

/// Each duration has a ceiling: exactly at it is accepted, above is refused with the rule's
/// message, on update and on creation. `1000000000000s` (10^12 s, which Go's duration parser
/// cannot hold) is refused by the same rule, not by a CEL runtime error; a malformed value
/// (`1e12s`) gets the schema's pattern error only.
#[tokio::test]
async fn the_server_refuses_durations_above_their_ceilings() {
    let ns = TestNamespace::new("kw-cel-ceil").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "ceil", json!({})).await;
    for c in limits::CEILINGS {
        let message = c.message();
        let at = format!("{}h", c.hours);
        patch_spec(&pks, "ceil", with_duration(c.field, &at))
            .await
            .unwrap_or_else(|e| panic!("{}: {at} (the ceiling) refused: {e}", c.field));
        let just_below = format!("{}m59.999s", c.hours * 60 - 1);
        patch_spec(&pks, "ceil", with_duration(c.field, &just_below))
            .await
            .unwrap_or_else(|e| panic!("{}: {just_below} refused: {e}", c.field));
        for above in [
            format!("{}h1s", c.hours),
            format!("{}m", c.hours * 60 + 1),
            "1000000000000s".to_string(),
            "99999999999999999999h".to_string(),
        ] {
            assert_refused_with(
                patch_spec(&pks, "ceil", with_duration(c.field, &above)).await,
                &message,
            );
        }
        // Leading zeros are no magnitude: the guard pattern allows them.
        let padded = format!("{}1h", "0".repeat(29));
        patch_spec(&pks, "ceil", with_duration(c.field, &padded))
            .await
            .unwrap_or_else(|e| panic!("{}: {padded} refused: {e}", c.field));
        match patch_spec(&pks, "ceil", with_duration(c.field, "1e12s")).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{s:?}");
                assert!(s.message.contains("should match"), "{}", s.message);
                assert!(!s.message.contains(&message), "{}", s.message);
                assert!(!s.message.contains("evaluation"), "{}", s.message);
            }
            other => panic!("{}: 1e12s not refused by the pattern: {other:?}", c.field),
        }
        assert_refused_with(
            try_create(
                &pks,
                "ceil-new",
                with_duration(c.field, &format!("{}h", c.hours + 1)),
            )
            .await,
            &message,
        );
    }
    ns.cleanup().await;
}

/// An agent Secret name of the form `<something>-k<digits>` (the form of key Secret names) is
/// refused on creation, whether written in `secretName` or the key's own name as the default;
/// a key named so is accepted with another `secretName`, and its updates pass.
#[tokio::test]
async fn the_server_refuses_an_agent_secret_name_of_a_key_secrets_form() {
    let ns = TestNamespace::new("kw-cel-kseq").await;
    let pks: Api<ProvisioningKey> = ns.api();
    assert_refused_with(
        try_create(&pks, "a-k2", json!({})).await,
        limits::SECRET_NAME_LIKE_A_KEY_SECRET,
    );
    assert_refused_with(
        try_create(&pks, "b", json!({ "secretName": "a-k1" })).await,
        limits::SECRET_NAME_LIKE_A_KEY_SECRET,
    );
    create(&pks, "a-k2", json!({ "secretName": "agents-a" })).await;
    create(&pks, "opa-k8s", json!({})).await;
    patch_spec(&pks, "a-k2", json!({ "suspend": true }))
        .await
        .expect("an update of a key named like a key Secret, with another secretName");
    ns.cleanup().await;
}

/// The ProvisioningKey's name is a label value: at most 63 characters, refused on creation.
#[tokio::test]
async fn the_server_refuses_a_name_longer_than_63_characters() {
    let ns = TestNamespace::new("kw-cel-long").await;
    let pks: Api<ProvisioningKey> = ns.api();
    assert_refused_with(
        try_create(&pks, &"a".repeat(64), json!({})).await,
        limits::NAME_TOO_LONG,
    );
    create(&pks, &"a".repeat(63), json!({})).await;
    patch_spec(&pks, &"a".repeat(63), json!({ "suspend": true }))
        .await
        .expect("an update");
    ns.cleanup().await;
}

/// The API server (CEL and pattern) and the operator (`Settings::resolve`) give the same answer
/// on durations near and far beyond each ceiling, and on malformed ones. Floors aside: the
/// server knows none (they are operator flags).
#[tokio::test]
async fn the_server_and_the_operator_agree_on_durations() {
    let ns = TestNamespace::new("kw-cel-agree").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "agree", json!({})).await;
    let (mut disagreements, mut refused) = (Vec::new(), 0);
    for c in limits::CEILINGS {
        let h = c.hours;
        let values = [
            format!("{h}h"),
            format!("{}m", h * 60),
            format!("{}s", h * 3600),
            format!("{}ms", h * 3_600_000),
            format!("{}h", h + 1),
            format!("{}m", h * 60 + 1),
            format!("{}s", h * 3600 + 1),
            format!("{}ms", h * 3_600_000 + 1),
            format!("{h}h0.001s"),
            format!("{}.5h", h - 1),
            format!("{}h59m59.999s", h - 1),
            "1h".to_string(),
            "0s".to_string(),
            "99999h".to_string(),
            "100000h".to_string(),
            "9999999m".to_string(),
            "999999999s".to_string(),
            "1000000000000s".to_string(),
            "99999999999999999999h".to_string(),
            "1e12s".to_string(),
            "1d".to_string(),
        ];
        for v in values {
            let spec = with_duration(c.field, &v);
            let server = patch_spec(&pks, "agree", spec.clone()).await;
            let server_accepts = match &server {
                Ok(_) => true,
                Err(kube::Error::Api(s)) if s.code == 422 => false,
                Err(e) => panic!("{} = {v}: {e}", c.field),
            };
            let pk: ProvisioningKey = serde_json::from_value(json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "ProvisioningKey",
                "metadata": { "name": "agree" },
                "spec": spec,
            }))
            .expect("a ProvisioningKey");
            let operator = Settings::resolve(&pk, &Floors::none());
            let operator_accepts = !matches!(
                operator,
                Err(SpecError::AboveCeiling { .. } | SpecError::MalformedDuration { .. })
            );
            if server_accepts != operator_accepts {
                disagreements.push(format!(
                    "{} = {v}: server {server:?}, operator {operator:?}",
                    c.field
                ));
            }
            refused += usize::from(!server_accepts);
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    // 13 of the 21 values of each field are above its ceiling or malformed.
    assert_eq!(refused, 13 * limits::CEILINGS.len());
    ns.cleanup().await;
}

/// The same for the creation rules on names: the server refuses on creation exactly the names
/// the operator refuses.
#[tokio::test]
async fn the_server_and_the_operator_agree_on_names() {
    let ns = TestNamespace::new("kw-cel-agree-names").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let long = "a".repeat(63);
    let too_long = "a".repeat(64);
    let cases: Vec<(&str, Value)> = vec![
        ("a-k2", json!({})),
        ("b-k0001", json!({})),
        ("c-k", json!({})),
        ("d-kx", json!({})),
        ("opa-k8s", json!({})),
        ("e-k-k3", json!({})),
        ("f", json!({ "secretName": "f-k1" })),
        ("g", json!({ "secretName": "g-k1a" })),
        ("h-k1", json!({ "secretName": "agents-h" })),
        (long.as_str(), json!({})),
        (too_long.as_str(), json!({})),
    ];
    let mut disagreements = Vec::new();
    for (name, spec) in cases {
        let server = try_create(&pks, name, spec.clone()).await;
        let server_accepts = match &server {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 422 => false,
            Err(e) => panic!("{name}: {e}"),
        };
        let pk: ProvisioningKey = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1",
            "kind": "ProvisioningKey",
            "metadata": { "name": name },
            "spec": spec,
        }))
        .expect("a ProvisioningKey");
        let operator = Settings::resolve(&pk, &Floors::none());
        if server_accepts != operator.is_ok() {
            disagreements.push(format!("{name}: server {server:?}, operator {operator:?}"));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    ns.cleanup().await;
}

/// `spec.token.claims`: reserved names and malformed names are refused by the server with the
/// rule's message; more than 16 claims or a value over 512 characters by the schema; a valid
/// set is accepted (and the operator's own check, `Settings::resolve`, uses the same constants).
#[tokio::test]
async fn the_server_refuses_reserved_and_malformed_claims() {
    let ns = TestNamespace::new("kw-cel-claims").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "claims", json!({})).await;
    let with = |claims: Value| json!({ "token": { "claims": claims } });
    patch_spec(
        &pks,
        "claims",
        with(json!({ "scope": "bundles:read", "tenant.id": "a" })),
    )
    .await
    .expect("valid claims accepted");
    for bad in limits::RESERVED_CLAIMS
        .iter()
        .map(|c| json!({ *c: "x" }))
        .chain([
            json!({ "my scope": "x" }),
            json!({ "1st": "x" }),
            json!({ "": "x" }),
        ])
    {
        assert_refused_with(
            patch_spec(&pks, "claims", with(bad.clone())).await,
            limits::CLAIMS_RESERVED,
        );
    }
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("c{i}"), json!("x"))).collect();
    assert!(
        patch_spec(&pks, "claims", with(Value::Object(many)))
            .await
            .is_err()
    );
    assert!(
        patch_spec(&pks, "claims", with(json!({ "scope": "x".repeat(513) })))
            .await
            .is_err()
    );
    ns.cleanup().await;
}

/// `spec.token.mode: ProofOfPossession` needs `includePrivateKey: true`, on create and on every
/// later change; unknown modes and algorithms are the schema's to refuse.
#[tokio::test]
async fn the_server_refuses_proof_of_possession_without_the_private_key() {
    let ns = TestNamespace::new("kw-cel-pop").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let pop = json!({ "token": { "mode": "ProofOfPossession" } });
    assert_refused_with(
        try_create(&pks, "pop", pop.clone()).await,
        limits::POP_NEEDS_PRIVATE_KEY,
    );
    assert_refused_with(
        try_create(
            &pks,
            "pop",
            json!({ "includePrivateKey": false, "token": { "mode": "ProofOfPossession" } }),
        )
        .await,
        limits::POP_NEEDS_PRIVATE_KEY,
    );
    create(
        &pks,
        "pop",
        json!({ "algorithm": "ECDSAP256", "includePrivateKey": true, "token": { "mode": "ProofOfPossession" } }),
    )
    .await;
    // Nor may the private key be taken away from a live proof-of-possession key.
    assert_refused_with(
        patch_spec(&pks, "pop", json!({ "includePrivateKey": false })).await,
        limits::POP_NEEDS_PRIVATE_KEY,
    );
    // An unknown mode or algorithm is the schema's to refuse.
    assert!(
        patch_spec(&pks, "pop", json!({ "token": { "mode": "Mutual" } }))
            .await
            .is_err()
    );
    assert!(
        patch_spec(&pks, "pop", json!({ "algorithm": "RS256" }))
            .await
            .is_err()
    );
    // And the algorithm stays what it was minted with.
    assert_refused_with(
        patch_spec(&pks, "pop", json!({ "algorithm": "Ed25519" })).await,
        "algorithm is immutable",
    );
    ns.cleanup().await;
}

/// `spec.rotation.window`: start equal to end is refused by the server; malformed times and
/// unknown days by the schema; a valid window (overnight too) is accepted. An unknown time zone
/// passes the server (CEL has no time-zone database) and is refused by the operator
/// (`InvalidSpec`, `rotation::tests::resolve`).
#[tokio::test]
async fn the_server_refuses_an_empty_or_malformed_window() {
    let ns = TestNamespace::new("kw-cel-window").await;
    let pks: Api<ProvisioningKey> = ns.api();
    create(&pks, "win", json!({})).await;
    let with = |w: Value| json!({ "rotation": { "window": w } });
    for ok in [
        json!({ "days": ["Mon", "Fri"], "start": "09:00", "end": "17:00", "timeZone": "Europe/Berlin" }),
        json!({ "start": "22:00", "end": "06:00" }),
    ] {
        patch_spec(&pks, "win", with(ok.clone()))
            .await
            .unwrap_or_else(|e| panic!("{ok} refused: {e}"));
    }
    assert_refused_with(
        patch_spec(
            &pks,
            "win",
            with(json!({ "start": "09:00", "end": "09:00" })),
        )
        .await,
        limits::WINDOW_EMPTY,
    );
    for bad in [
        json!({ "start": "9:00", "end": "17:00" }),
        json!({ "start": "24:00", "end": "17:00" }),
        json!({ "days": ["Monday"], "start": "09:00", "end": "17:00" }),
    ] {
        assert!(
            patch_spec(&pks, "win", with(bad.clone())).await.is_err(),
            "{bad} accepted"
        );
    }
    ns.cleanup().await;
}
