//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run with `cargo fuzz`) over
//! everything Keyward parses from someone else: tokens, JWKs and trust-bundle ConfigMaps,
//! KeyUsageReports and verifier Leases, ProvisioningKey specs. Each takes arbitrary bytes and
//! must return without panicking, whatever they hold. `cargo test` replays the committed corpora
//! (`fuzz/corpus/<target>/`) through the same functions (`tests` below), so a crash found by a
//! fuzz run and added to the corpus stays fixed.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;

use crate::api::{KeyUsageReport, ProvisioningKey};
use crate::keys::{Jwks, KeyPair, PublicKey};
use crate::rotation::{Floors, Settings};
use crate::verifier::{Binding, Index, KeyRef, Policy, verify::verify};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 4] = [
    ("token", token),
    ("bundle", bundle),
    ("report", report),
    ("spec", spec),
];

/// A fixed clock, so a corpus entry means the same on every run.
const NOW: i64 = 1_800_000_000;

fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(NOW, 0).unwrap_or_default()
}

/// One key `ns/a` with a bundle trusting a fixed key (seed 1), and its token of the corpus.
fn index() -> &'static Index {
    static INDEX: OnceLock<Index> = OnceLock::new();
    INDEX.get_or_init(|| {
        let mut index = Index::default();
        let key = fixed_key();
        let record = crate::trust_record::TrustRecord {
            bundle: "a-trust".into(),
            aud: "keyward".into(),
            iss: "keyward".into(),
            kids: [(key.public_key().key_id(), 3600)].into(),
            deactivated: Default::default(),
            claims: Default::default(),
            pop: false,
        };
        let pk: Result<ProvisioningKey, _> = serde_json::from_value(serde_json::json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
            "metadata": {"name": "a", "namespace": "ns", "uid": "11111111-1111-4111-8111-111111111111",
                "annotations": {crate::trust_record::ANNOTATION: record.render()}},
            "spec": {},
        }));
        if let Ok(pk) = pk {
            index.apply_key(&pk);
        }
        let jwks = Jwks {
            keys: vec![key.public_key().to_jwk()],
        };
        let cm: Result<ConfigMap, _> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": "a-trust", "namespace": "ns",
                "labels": {"keyward.dev/provisioning-key": "a"},
                "ownerReferences": [{"apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                    "name": "a", "uid": "11111111-1111-4111-8111-111111111111", "controller": true}],
            },
            "data": {"jwks.json": serde_json::to_string(&jwks).unwrap_or_default(), "revoked.json": "[]"},
        }));
        if let Ok(cm) = cm {
            let _ = index.apply_bundle(&cm);
        }
        index
    })
}

/// The key the corpus's genuine tokens are signed with (a fixed seed: the corpus is public).
pub fn fixed_key() -> KeyPair {
    KeyPair::from_seed(&[1u8; 32])
}

/// A bearer token: the unverified decode and the whole verification, on every binding.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::keys::decode_token_unverified(text);
    let policy = Policy::default();
    for binding in [Binding::AnyKey, Binding::Key(KeyRef::new("ns", "a"))] {
        let _ = verify(text, index(), &binding, NOW, &policy);
    }
}

/// A trust bundle: as a ConfigMap (the verifier's index), and its `jwks.json` alone (every
/// JWK through the public-key decoder, which checks the kid against the thumbprint).
pub fn bundle(data: &[u8]) {
    if let Ok(cm) = serde_json::from_slice::<ConfigMap>(data) {
        let mut index = index().clone();
        let _ = index.apply_bundle(&cm);
        let _ = index.usable();
        let _ = index.report_target(&KeyRef::new("ns", "a"));
    }
    if let Ok(jwks) = serde_json::from_slice::<Jwks>(data) {
        for jwk in &jwks.keys {
            let _ = PublicKey::from_jwk(jwk);
        }
        let _ = jwks.key_ids();
    }
}

/// A KeyUsageReport (what a verifier replica wrote) and a verifier Lease.
pub fn report(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<KeyUsageReport>(data) {
        let _ = crate::usage::key_use(std::slice::from_ref(&r), &[], "ns", "pk", now());
    }
    if let Ok(lease) = serde_json::from_slice::<Lease>(data) {
        let parsed = [crate::usage::parse_lease(&lease)];
        let _ = crate::usage::coverage(&parsed, &[], "ns", now());
        let _ = crate::usage::key_use(&[], &parsed, "ns", "pk", now());
    }
}

/// A ProvisioningKey as a tenant may write it: the settings the operator resolves from it.
pub fn spec(data: &[u8]) {
    if let Ok(pk) = serde_json::from_slice::<ProvisioningKey>(data) {
        let _ = Settings::resolve(&pk, &Floors::default());
        let _ = Settings::resolve(&pk, &Floors::none());
        // The trust record as the verifier and the operator read it.
        let _ = crate::verifier::index::KeyParams::of(&pk);
        let _ = crate::trust_record::TrustRecord::of(&pk);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::rotation::parse_duration(text);
        if let Ok(r) = crate::trust_record::TrustRecord::parse(text) {
            // What parses renders back to the same record.
            assert_eq!(crate::trust_record::TrustRecord::parse(&r.render()), Ok(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus entry through its target (what `cargo fuzz run` found
    /// and what the seeds cover).
    #[test]
    fn the_committed_corpora_replay_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let mut n = 0;
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
                let path = entry.expect("entry").path();
                let data = std::fs::read(&path).expect("read");
                target(&data);
                n += 1;
            }
            assert!(n >= 3, "{name}: only {n} seeds");
        }
    }

    /// Writes the seed corpora: `cargo test --lib fuzzing::tests::write_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/corpus/*; run by hand after changing the seeds"]
    fn write_seeds() {
        use crate::keys::{TokenClaims, TokenHeader};
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let write = |target: &str, name: &str, data: &str| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join(name), data).expect("write");
        };
        let key = fixed_key();
        let claims = TokenClaims {
            iss: "keyward".into(),
            sub: "ns/a".into(),
            aud: "keyward".into(),
            iat: NOW - 60,
            nbf: NOW - 60,
            exp: NOW + 600,
            jti: "seed".into(),
        };
        let good = key.sign_token(&claims).expect("sign");
        write("token", "good", &good);
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let (_, rest) = good.split_once('.').expect("jws");
        write(
            "token",
            "alg-none",
            &format!("{}.{rest}", b64(r#"{"alg":"none","kid":"x"}"#)),
        );
        write(
            "token",
            "duplicate-alg",
            &format!(
                "{}.{rest}",
                b64(r#"{"alg":"none","alg":"EdDSA","kid":"x"}"#)
            ),
        );
        let crit = TokenHeader {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: key.key_id(),
            crit: Some(serde_json::json!(["exp"])),
        };
        write(
            "token",
            "crit",
            &key.sign_compact(&crit, &claims).expect("sign"),
        );
        let long = TokenClaims {
            exp: i64::MAX,
            iat: i64::MIN,
            ..claims.clone()
        };
        write(
            "token",
            "extreme-times",
            &key.sign_token(&long).expect("sign"),
        );
        write("token", "garbage", "not.a.jwt.at.all");
        write("token", "empty", "");
        let (cm, jwks) = {
            let jwks = Jwks {
                keys: vec![key.public_key().to_jwk()],
            };
            let jwks_text = serde_json::to_string(&jwks).expect("jwks");
            let cm = serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "a-trust", "namespace": "ns",
                    "labels": {"keyward.dev/provisioning-key": "a"},
                    "ownerReferences": [{"apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                        "name": "a", "uid": "11111111-1111-4111-8111-111111111111", "controller": true}]},
                "data": {"jwks.json": jwks_text.clone(), "revoked.json": "[\"x\"]"},
            });
            (cm.to_string(), jwks_text)
        };
        write("bundle", "configmap", &cm);
        write("bundle", "jwks", &jwks);
        write(
            "bundle",
            "jwk-bad-kid",
            &jwks.replacen(
                &key.key_id(),
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                1,
            ),
        );
        write(
            "bundle",
            "jwk-wrong-curve",
            r#"{"keys":[{"kty":"OKP","crv":"X25519","x":"AAAA","kid":"k"},{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
        );
        write(
            "report",
            "report",
            &serde_json::json!({
                "apiVersion": "keyward.dev/v1alpha1", "kind": "KeyUsageReport",
                "metadata": {"name": "a-v-0", "namespace": "ns"},
                "spec": {"provisioningKey": "a", "replica": "v-0", "keys": [
                    {"kid": key.key_id(), "lastUsedAt": "2027-01-15T08:00:00Z",
                     "pods": [{"uid": "3f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81", "lastUsedAt": "2027-01-15T08:00:00Z"}],
                     "podsTruncated": true},
                    {"kid": "other", "lastUsedAt": "not a time"}]},
            })
            .to_string(),
        );
        write(
            "report",
            "lease",
            &serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "keyward-verifier-v-0", "namespace": "keyward-system",
                    "annotations": {crate::usage::ANN_NAMESPACES: "ns,other", crate::usage::ANN_RESOLUTION: "60s",
                        crate::usage::ANN_REPORTS: r#"{"ns/pk":3}"#}},
                "spec": {"holderIdentity": "v-0", "leaseDurationSeconds": 30,
                    "acquireTime": "2027-01-15T07:00:00.000000Z", "renewTime": "2027-01-15T08:00:00.000000Z"},
            })
            .to_string(),
        );
        write(
            "report",
            "lease-extreme",
            r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"x","annotations":{"keyward.dev/namespaces":"*","keyward.dev/resolution":"99999999999999999999h"}},"spec":{"leaseDurationSeconds":2147483647,"acquireTime":"9999-12-31T23:59:59.999999Z","renewTime":"0001-01-01T00:00:00.000000Z"}}"#,
        );
        write(
            "spec",
            "full",
            &serde_json::json!({
                "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                "metadata": {"name": "a", "namespace": "ns", "uid": "u"},
                "spec": {"secretName": "a-agents", "includePrivateKey": true,
                    "secretTemplate": {"labels": {"team": "x"}, "annotations": {"a/b": "c"}},
                    "rotation": {"interval": "720h", "minInterval": "1m", "publishDelay": "2m",
                        "overlap": "10m", "confirmationTimeout": "15m", "revokeWhenUnusedFor": "5m",
                        "requestToken": "r1"},
                    "token": {"audience": "bundles", "issuer": "https://kw.example", "ttl": "1h"},
                    "trustBundle": {"configMapName": "a-trust"},
                    "compromisedKeys": [key.key_id()]},
            })
            .to_string(),
        );
        write(
            "spec",
            "bad",
            r#"{"apiVersion":"keyward.dev/v1alpha1","kind":"ProvisioningKey","metadata":{"name":"a-k2"},"spec":{"secretTemplate":{"labels":{"keyward.dev/x":"y","bad key":"v"}},"rotation":{"interval":"1h-5m","overlap":"1000000000000s","publishDelay":"99999999999999999999h"},"token":{"ttl":"0.0000000001ns","audience":""}}}"#,
        );
        write("spec", "duration", "1h30m0.5s");
        write(
            "spec",
            "record",
            r#"{"bundle":"a-trust","aud":"keyward:ns/a","iss":"keyward","kids":{"qChiL7uNopOAIpjVfVDVvz5opx3DYnHS5PDU3h_-xcY":3600}}"#,
        );
        write(
            "spec",
            "recorded-key",
            r#"{"apiVersion":"keyward.dev/v1alpha1","kind":"ProvisioningKey","metadata":{"name":"a","namespace":"ns","uid":"u","annotations":{"keyward.dev/trust-record":"{\"bundle\":\"a-trust\",\"aud\":\"x\",\"iss\":\"y\",\"kids\":{\"k\":99999999999}}"}},"spec":{}}"#,
        );
    }

    #[test]
    fn the_seed_token_verifies() {
        let token = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/token/good"),
        )
        .expect("seed");
        let v = verify(
            token.trim(),
            index(),
            &Binding::AnyKey,
            NOW,
            &Policy::default(),
        );
        assert!(v.is_ok(), "{v:?}");
    }
}
