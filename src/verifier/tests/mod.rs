//! Tests of the verifier, by topic: the verification table over the pure decision
//! (`verification`), the router's auth_request and ext_authz request -> response shapes
//! (`shapes`, tower `oneshot`, no network, no API server), the bundle documents and their cache
//! headers (`bundles`), the reverse proxy against a real upstream (`reverse_proxy`), and the real
//! server loop over TLS (`tls`). This file holds the shared fixtures.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::json;
use tower::ServiceExt as _;

use super::http::{cache_control, max_age, none_match, router};
use super::index::{Index, KeyRef, etag_of};
use super::use_log::MemoryUseLog;
use super::verify::{Binding, Policy, Refusal, verify};
use super::{Shared, Use, UseLog};
use crate::api::ProvisioningKey;
use crate::keys::{Jwks, KeyPair, TokenClaims};
use crate::trust_record::TrustRecord;

mod bundles;
mod oauth;
mod remote;
mod reverse_proxy;
mod shapes;
mod tls;
mod verification;

const NOW: i64 = 1_800_000_000;
const UID_A: &str = "11111111-1111-4111-8111-111111111111";
const UID_B: &str = "22222222-2222-4222-8222-222222222222";
const POD: &str = "3f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81";

/// A ProvisioningKey whose trust record lists `recorded` (each with the spec's token ttl, 1h
/// by default), with the spec's (or the default) bundle name, audience and issuer.
fn pk(name: &str, uid: &str, spec: serde_json::Value, recorded: &[&KeyPair]) -> ProvisioningKey {
    let ttl = spec["token"]["ttl"]
        .as_str()
        .and_then(crate::rotation::parse_duration)
        .map_or(3600, |d| d.as_secs());
    let text = |v: &serde_json::Value, default: &str| v.as_str().unwrap_or(default).to_string();
    let record = TrustRecord {
        bundle: format!("{name}-trust"),
        aud: text(&spec["token"]["audience"], "keyward"),
        iss: text(&spec["token"]["issuer"], "keyward"),
        kids: recorded
            .iter()
            .map(|k| (k.public_key().key_id(), ttl))
            .collect(),
        deactivated: Default::default(),
        claims: Default::default(),
        pop: false,
    };
    unrecorded_pk(name, uid, spec, Some(record.render()))
}

fn unrecorded_pk(
    name: &str,
    uid: &str,
    spec: serde_json::Value,
    record: Option<String>,
) -> ProvisioningKey {
    let annotations = record.map_or(json!({}), |r| json!({ crate::trust_record::ANNOTATION: r }));
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "annotations": annotations},
        "spec": spec,
    }))
    .expect("ProvisioningKey")
}

fn bundle(pk_name: &str, owner_uid: &str, trusted: &[&KeyPair], revoked: &[String]) -> ConfigMap {
    let jwks = Jwks {
        keys: trusted.iter().map(|k| k.public_key().to_jwk()).collect(),
    };
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": format!("{pk_name}-trust"),
            "namespace": "ns",
            "labels": {
                "app.kubernetes.io/managed-by": "keyward",
                "keyward.dev/provisioning-key": pk_name,
                "keyward.dev/component": "trust-bundle",
            },
            "ownerReferences": [{
                "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                "name": pk_name, "uid": owner_uid, "controller": true,
            }],
        },
        "data": {
            "jwks.json": serde_json::to_string_pretty(&jwks).expect("jwks"),
            "revoked.json": serde_json::to_string_pretty(revoked).expect("revoked"),
        },
    }))
    .expect("ConfigMap")
}

fn claims(sub: &str) -> TokenClaims {
    TokenClaims {
        iss: "keyward".into(),
        sub: sub.into(),
        aud: "keyward".into(),
        iat: NOW - 60,
        nbf: NOW - 60,
        exp: NOW + 3000,
        jti: "j1".into(),
    }
}

/// Two keys: `a` (ns/a) trusts `k1` (current) and `k2` (stale JWKS entry, but revoked);
/// `b` (ns/b, custom audience and issuer) trusts `k3`.
struct Fixture {
    index: Index,
    k1: KeyPair,
    k2: KeyPair,
    k3: KeyPair,
}

fn fixture() -> Fixture {
    let (k1, k2, k3) = (
        KeyPair::generate(),
        KeyPair::generate(),
        KeyPair::generate(),
    );
    let mut index = Index::default();
    // k2 is revoked: the operator removed it from the record before listing it as revoked.
    index.apply_key(&pk(
        "a",
        UID_A,
        json!({"rotation": {"publishDelay": "2m"}}),
        &[&k1],
    ));
    index.apply_key(&pk(
        "b",
        UID_B,
        json!({"token": {"audience": "bundles", "issuer": "https://kw.example"}}),
        &[&k3],
    ));
    index
        .apply_bundle(&bundle("a", UID_A, &[&k1, &k2], &[k2.key_id()]))
        .expect("bundle a");
    index
        .apply_bundle(&bundle("b", UID_B, &[&k3], &[]))
        .expect("bundle b");
    Fixture { index, k1, k2, k3 }
}

/// A compact JWS with an arbitrary header, signed by `key` (or with an empty signature).
fn raw_token(header: serde_json::Value, claims: &TokenClaims, key: Option<&KeyPair>) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims"))
    );
    let sig = match key {
        // Re-sign through a real token so the signature covers `input`.
        Some(k) => {
            use ed25519_dalek::pkcs8::DecodePrivateKey as _;
            use ed25519_dalek::{Signer as _, SigningKey};
            let sk = SigningKey::from_pkcs8_pem(&k.to_pkcs8_pem()).expect("pkcs8");
            URL_SAFE_NO_PAD.encode(sk.sign(input.as_bytes()).to_bytes())
        }
        None => String::new(),
    };
    format!("{input}.{sig}")
}

fn tamper(token: &str) -> String {
    let (input, sig) = token.rsplit_once('.').expect("jws");
    let mut bytes = URL_SAFE_NO_PAD.decode(sig).expect("sig");
    bytes[0] ^= 1;
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn shared(f: &Fixture, log: Arc<MemoryUseLog>) -> Arc<Shared> {
    let s = Shared::new(Policy::default(), log, None);
    s.update(|i| *i = f.index.clone());
    Arc::new(s)
}

/// A fresh token of `key` valid now (the router reads the real clock).
fn live_token(key: &KeyPair, sub: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    key.sign_token(&TokenClaims {
        iat: now,
        nbf: now,
        exp: now + 600,
        ..claims(sub)
    })
    .expect("sign")
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let res = app.clone().oneshot(req).await.expect("infallible");
    let (parts, body) = res.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.expect("body");
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn get_with(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Body::empty()).expect("request")
}
