//! Tables over the pure parts (verification, cache headers) and request -> response shapes of
//! the router (tower `oneshot`, no network, no API server).

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

/// Accepted as (key, kid), or refused with a reason.
type Want<'a> = Result<(&'a KeyRef, &'a str), &'static str>;

#[test]
fn verification_table() {
    let f = fixture();
    let a = KeyRef::new("ns", "a");
    let b = KeyRef::new("ns", "b");
    let good = f.k1.sign_token(&claims("ns/a")).expect("sign");
    let with = |c: TokenClaims| f.k1.sign_token(&c).expect("sign");
    let mut b_claims = claims("ns/b");
    b_claims.aud = "bundles".into();
    b_claims.iss = "https://kw.example".into();
    let good_b = f.k3.sign_token(&b_claims).expect("sign");
    let kid1 = f.k1.key_id();
    let kid3 = f.k3.key_id();
    let policy = Policy::default(); // 30 s skew

    let cases: Vec<(&str, String, Option<&KeyRef>, Want<'_>)> = vec![
        ("good token", good.clone(), None, Ok((&a, &kid1))),
        (
            "good token, expected key",
            good.clone(),
            Some(&a),
            Ok((&a, &kid1)),
        ),
        ("custom aud and iss", good_b.clone(), None, Ok((&b, &kid3))),
        (
            "alg none",
            raw_token(json!({"alg": "none", "kid": kid1}), &claims("ns/a"), None),
            None,
            Err("UnsupportedAlgorithm"),
        ),
        (
            "alg HS256",
            raw_token(
                json!({"alg": "HS256", "kid": kid1}),
                &claims("ns/a"),
                Some(&f.k1),
            ),
            None,
            Err("UnsupportedAlgorithm"),
        ),
        (
            "alg RS256",
            raw_token(
                json!({"alg": "RS256", "kid": kid1}),
                &claims("ns/a"),
                Some(&f.k1),
            ),
            None,
            Err("UnsupportedAlgorithm"),
        ),
        (
            "unknown kid",
            KeyPair::generate()
                .sign_token(&claims("ns/a"))
                .expect("sign"),
            None,
            Err("UnknownKeyId"),
        ),
        (
            "revoked kid still in a stale JWKS",
            f.k2.sign_token(&claims("ns/a")).expect("sign"),
            None,
            Err("TokenRevoked"),
        ),
        (
            "expired",
            with(TokenClaims {
                exp: NOW - 31,
                ..claims("ns/a")
            }),
            None,
            Err("TokenExpired"),
        ),
        (
            "expired within skew",
            with(TokenClaims {
                exp: NOW - 29,
                ..claims("ns/a")
            }),
            None,
            Ok((&a, &kid1)),
        ),
        (
            "not yet valid, within skew",
            with(TokenClaims {
                nbf: NOW + 29,
                ..claims("ns/a")
            }),
            None,
            Ok((&a, &kid1)),
        ),
        (
            "not yet valid, outside skew",
            with(TokenClaims {
                nbf: NOW + 31,
                ..claims("ns/a")
            }),
            None,
            Err("TokenNotYetValid"),
        ),
        (
            "wrong aud",
            with(TokenClaims {
                aud: "other".into(),
                ..claims("ns/a")
            }),
            None,
            Err("WrongAudience"),
        ),
        (
            "wrong iss",
            with(TokenClaims {
                iss: "evil".into(),
                ..claims("ns/a")
            }),
            None,
            Err("WrongIssuer"),
        ),
        (
            "tampered signature",
            tamper(&good),
            None,
            Err("SignatureInvalid"),
        ),
        (
            "key A's token claiming key B",
            f.k1.sign_token(&b_claims).expect("sign"),
            None,
            Err("UnknownKeyId"),
        ),
        (
            "key A's token where only B is accepted",
            good.clone(),
            Some(&b),
            Err("KeyNotAccepted"),
        ),
        (
            "key of no known bundle",
            with(claims("ns/c")),
            None,
            Err("UnknownKey"),
        ),
        (
            "subject not a key",
            with(claims("a")),
            None,
            Err("BadSubject"),
        ),
        ("garbage", "not-a-jwt".into(), None, Err("InvalidToken")),
        (
            "issued in the future, beyond the skew",
            with(TokenClaims {
                iat: NOW + 31,
                ..claims("ns/a")
            }),
            None,
            Err("TokenIssuedInFuture"),
        ),
        (
            "issued in the future, within the skew",
            with(TokenClaims {
                iat: NOW + 29,
                ..claims("ns/a")
            }),
            None,
            Ok((&a, &kid1)),
        ),
        (
            "lifetime is the key's ttl (1h) plus the skew",
            with(TokenClaims {
                iat: NOW - 60,
                exp: NOW - 60 + 3600 + 30,
                ..claims("ns/a")
            }),
            None,
            Ok((&a, &kid1)),
        ),
        (
            "lifetime longer than the key's ttl plus the skew",
            with(TokenClaims {
                iat: NOW - 60,
                exp: NOW - 60 + 3600 + 31,
                ..claims("ns/a")
            }),
            None,
            Err("TokenLifetimeTooLong"),
        ),
        (
            "exp = i64::MAX",
            with(TokenClaims {
                exp: i64::MAX,
                ..claims("ns/a")
            }),
            None,
            Err("TokenLifetimeTooLong"),
        ),
        (
            "iat = i64::MIN, exp in range",
            with(TokenClaims {
                iat: i64::MIN,
                ..claims("ns/a")
            }),
            None,
            Err("TokenLifetimeTooLong"),
        ),
    ];
    for (name, token, expect, want) in cases {
        let binding = expect.map_or(Binding::AnyKey, |k| Binding::Key(k.clone()));
        let got = verify(&token, &f.index, &binding, NOW, &policy);
        match (got, want) {
            (Ok(v), Ok((key, kid))) => {
                assert_eq!((&v.key, v.kid.as_str()), (key, kid), "{name}");
            }
            (Err(e), Err(reason)) => {
                assert_eq!(e.reason(), reason, "{name}: {e}");
                let msg = e.to_string();
                assert!(
                    !msg.contains(&token) && !msg.contains(token.split('.').next().unwrap_or("")),
                    "{name}: the error must not contain the token: {msg}"
                );
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn refusal_statuses() {
    assert_eq!(Refusal::MissingToken.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        Refusal::KeyNotAccepted {
            expected: "a".into(),
        }
        .status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(Refusal::Unbound.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        Refusal::DuplicateAuthorization.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn a_tokens_lifetime_is_checked_against_the_recorded_one() {
    let k = KeyPair::generate();
    let mut index = Index::default();
    // The record says how long a token of this key id may live (the operator keeps the
    // longest it ever signed with; the spec's ttl is not read).
    let key = |ttl: &str| pk("a", UID_A, json!({"token": {"ttl": ttl}}), &[&k]);
    index.apply_key(&key("2h"));
    index
        .apply_bundle(&bundle("a", UID_A, &[&k], &[]))
        .expect("parse");
    let two_hours = k
        .sign_token(&TokenClaims {
            iat: NOW - 60,
            exp: NOW - 60 + 7200,
            ..claims("ns/a")
        })
        .expect("sign");
    let ok = |index: &Index| verify(&two_hours, index, &Binding::AnyKey, NOW, &Policy::default());
    assert!(ok(&index).is_ok());
    index.replace_keys(Some("ns"), &[key("10m")]);
    assert_eq!(
        ok(&index).map_err(|e| e.reason()),
        Err("TokenLifetimeTooLong")
    );
    // Whatever the record says, no token lives past the ceiling.
    index.apply_key(&key("1000h"));
    let day_and_more = k
        .sign_token(&TokenClaims {
            iat: NOW - 60,
            exp: NOW - 60 + 24 * 3600 + 31,
            ..claims("ns/a")
        })
        .expect("sign");
    assert_eq!(
        verify(
            &day_and_more,
            &index,
            &Binding::AnyKey,
            NOW,
            &Policy::default()
        )
        .map_err(|e| e.reason()),
        Err("TokenLifetimeTooLong")
    );
}

#[test]
fn only_recorded_key_ids_are_trusted_whatever_the_bundle_says() {
    let (k1, injected) = (KeyPair::generate(), KeyPair::generate());
    let mut index = Index::default();
    index.apply_key(&pk("a", UID_A, json!({}), &[&k1]));
    // Someone who may patch the ConfigMap adds a JWK of their own, and lists the live key
    // as revoked.
    index
        .apply_bundle(&bundle("a", UID_A, &[&k1, &injected], &[k1.key_id()]))
        .expect("parse");
    let forged = injected.sign_token(&claims("ns/a")).expect("sign");
    let good = k1.sign_token(&claims("ns/a")).expect("sign");
    let check = |t: &str, index: &Index| {
        verify(
            t,
            index,
            &Binding::Key(KeyRef::new("ns", "a")),
            NOW,
            &Policy::default(),
        )
        .map(|v| v.kid)
        .map_err(|e| e.reason())
    };
    assert_eq!(check(&forged, &index), Err("KeyNotRecorded"));
    assert_eq!(check(&good, &index), Ok(k1.key_id()));
    assert_eq!(
        index.trusted_kids(&KeyRef::new("ns", "a")),
        Some(vec![k1.key_id()])
    );
    // No record (the operator has not reconciled the key since an upgrade), or an unreadable
    // one: nothing of the key is trusted.
    for record in [None, Some("{not json".to_string())] {
        index.apply_key(&unrecorded_pk("a", UID_A, json!({}), record));
        assert!(check(&good, &index).is_err());
        assert_eq!(check(&forged, &index), Err("KeyNotRecorded"));
    }
}

#[tokio::test]
async fn the_jwks_endpoint_serves_only_recorded_keys() {
    let (k1, injected) = (KeyPair::generate(), KeyPair::generate());
    let mut index = Index::default();
    index.apply_key(&pk("a", UID_A, json!({}), &[&k1]));
    index
        .apply_bundle(&bundle("a", UID_A, &[&k1, &injected], &[]))
        .expect("parse");
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None);
    s.update(|i| *i = index);
    let app = router(Arc::new(s));
    let (status, _, body) = call(&app, get_with("/keys/ns/a/jwks.json", &[])).await;
    assert_eq!(status, StatusCode::OK);
    let jwks: Jwks = serde_json::from_str(&body).expect("jwks");
    assert_eq!(jwks.key_ids(), vec![k1.key_id()]);
}

#[test]
fn policy_flags_override_the_keys_aud_and_iss() {
    let f = fixture();
    let good = f.k1.sign_token(&claims("ns/a")).expect("sign");
    let strict = Policy {
        audience: Some("bundles".into()),
        ..Policy::default()
    };
    assert_eq!(
        verify(&good, &f.index, &Binding::AnyKey, NOW, &strict).map_err(|e| e.reason()),
        Err("WrongAudience")
    );
    let strict = Policy {
        issuer: Some("https://kw.example".into()),
        ..Policy::default()
    };
    assert_eq!(
        verify(&good, &f.index, &Binding::AnyKey, NOW, &strict).map_err(|e| e.reason()),
        Err("WrongIssuer")
    );
}

#[test]
fn a_bundle_is_used_only_for_the_key_that_owns_it() {
    let k = KeyPair::generate();
    let token = k.sign_token(&claims("ns/a")).expect("sign");
    // Labelled for `a` but owned by someone else (a forged ConfigMap).
    let mut index = Index::default();
    index.apply_key(&pk("a", UID_A, json!({}), &[&k]));
    index
        .apply_bundle(&bundle("a", UID_B, &[&k], &[]))
        .expect("parse");
    assert_eq!(
        verify(&token, &index, &Binding::AnyKey, NOW, &Policy::default()).map_err(|e| e.reason()),
        Err("UnknownKey")
    );
    // The right owner: accepted; the key deleted: unknown again.
    index
        .apply_bundle(&bundle("a", UID_A, &[&k], &[]))
        .expect("parse");
    assert!(verify(&token, &index, &Binding::AnyKey, NOW, &Policy::default()).is_ok());
    index.delete_key(&pk("a", UID_A, json!({}), &[]));
    assert!(verify(&token, &index, &Binding::AnyKey, NOW, &Policy::default()).is_err());
}

#[test]
fn max_age_is_half_the_publish_delay_capped() {
    let s = Duration::from_secs;
    for (delay, want, header) in [
        (s(0), s(0), "no-cache"),
        (s(1), s(0), "no-cache"),
        (s(3), s(1), "public, max-age=1"),
        (s(120), s(60), "public, max-age=60"),
        (s(3600), s(300), "public, max-age=300"),
    ] {
        assert_eq!(max_age(delay), want, "{delay:?}");
        assert!(
            max_age(delay) * 2 <= delay,
            "a consumer must refetch before agents switch"
        );
        assert_eq!(cache_control(max_age(delay)), header);
    }
}

#[test]
fn if_none_match_comparison() {
    let etag = etag_of(b"{}");
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert_ne!(etag, etag_of(b"{ }"));
    let h = |v: &str| {
        let mut m = HeaderMap::new();
        m.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(v).expect("value"),
        );
        m
    };
    assert!(none_match(&h(&etag), &etag));
    assert!(none_match(&h(&format!("W/{etag}")), &etag));
    assert!(none_match(&h(&format!("\"other\", {etag}")), &etag));
    assert!(none_match(&h("*"), &etag));
    assert!(!none_match(&h("\"other\""), &etag));
    assert!(!none_match(&HeaderMap::new(), &etag));
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

#[tokio::test]
async fn auth_request_shapes() {
    let f = fixture();
    let log = Arc::new(MemoryUseLog::new(100));
    let app = router(shared(&f, log.clone()));
    let token = live_token(&f.k1, "ns/a");
    let bearer = format!("Bearer {token}");

    // nginx auth_request on the key's own route: allowed, with the key headers. A pod UID the
    // client names (the old X-Keyward-Pod-UID) is not read: only a pod token the API server
    // vouches for names a pod.
    let req = get_with(
        "/auth/ns/a",
        &[("authorization", &bearer), ("x-keyward-pod-uid", POD)],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-keyward-key"], "ns/a");
    assert_eq!(headers["x-keyward-kid"], f.k1.key_id().as_str());
    assert!(body.is_empty());
    let key = KeyRef::new("ns", "a");
    assert!(log.pods_seen(&key, &f.k1.key_id()).is_empty());

    // With a pod token the reviewer knows, the pod is recorded (once the review is back).
    let reviewer = Arc::new(super::pod_identity::testing::Table::new([(
        "pod-token",
        super::pod_identity::testing::status(
            "system:serviceaccount:ns:agent",
            &[POD],
            &["keyward"],
            true,
        ),
    )]));
    let with_pods = {
        let s = Shared::new(Policy::default(), log.clone(), None)
            .with_pod_identity(reviewer.clone(), super::pod_identity::DEFAULT_AUDIENCE);
        s.update(|i| *i = f.index.clone());
        router(Arc::new(s))
    };
    let req = get_with(
        "/auth/ns/a",
        &[
            ("authorization", &bearer),
            ("x-keyward-pod-token", "pod-token"),
        ],
    );
    assert_eq!(call(&with_pods, req).await.0, StatusCode::OK);
    for _ in 0..100 {
        if !log.pods_seen(&key, &f.k1.key_id()).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(log.pods_seen(&key, &f.k1.key_id()).contains_key(POD));
    assert_eq!(reviewer.reviews(), 1);

    // No token: 401, a reason, WWW-Authenticate, no body.
    let (status, headers, body) = call(&app, get_with("/auth/ns/a", &[])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "MissingToken");
    assert!(headers.contains_key("www-authenticate"));
    assert!(body.is_empty());

    // A revoked key: 401, and the response holds nothing of the token.
    let revoked = live_token(&f.k2, "ns/a");
    let req = get_with(
        "/auth/ns/a",
        &[("authorization", &format!("Bearer {revoked}"))],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "TokenRevoked");
    assert!(!headers.contains_key("x-keyward-key"));
    assert!(body.is_empty());
    for segment in revoked.split('.') {
        for v in headers.values() {
            assert!(
                !v.to_str().unwrap_or("").contains(segment),
                "a header echoes the token"
            );
        }
    }

    // A genuine token of key a on key b's route: 403, whatever the client adds (the old
    // X-Keyward-Expect-Key header is not read, so it can neither narrow nor widen).
    for extra in [None, Some("ns/a"), Some("ns/b")] {
        let mut h = vec![("authorization", bearer.as_str())];
        if let Some(e) = extra {
            h.push(("x-keyward-expect-key", e));
        }
        let (status, headers, _) = call(&app, get_with("/auth/ns/b", &h)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{extra:?}");
        assert_eq!(headers["x-keyward-reason"], "KeyNotAccepted");
    }

    // The unbound /auth refuses every token (403 Unbound) without --accept-any-key.
    let (status, headers, _) = call(&app, get_with("/auth", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "Unbound");

    // Two Authorization headers: refused, even if one of them is good.
    for pair in [[bearer.as_str(), "Bearer x"], ["Bearer x", bearer.as_str()]] {
        let req = get_with(
            "/auth/ns/a",
            &[("authorization", pair[0]), ("authorization", pair[1])],
        );
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["x-keyward-reason"], "DuplicateAuthorization");
    }

    // Key b's token with key a's default audience is refused.
    let req = get_with(
        "/auth/ns/b",
        &[(
            "authorization",
            &format!("Bearer {}", live_token(&f.k3, "ns/b")),
        )],
    );
    assert_eq!(call(&app, req).await.0, StatusCode::UNAUTHORIZED); // wrong aud for b
}

#[tokio::test]
async fn accept_any_key_opens_the_unbound_routes() {
    let f = fixture();
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None)
        .accepting_any_key(true);
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    for path in ["/auth", "/ext_authz", "/ext_authz/x/y"] {
        let (status, headers, _) = call(&app, get_with(path, &[("authorization", &bearer)])).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["x-keyward-key"], "ns/a");
    }
    // A bound route stays bound.
    let (status, _, _) = call(&app, get_with("/auth/ns/b", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn ext_authz_shapes() {
    let f = fixture();
    let app = router(shared(&f, Arc::new(MemoryUseLog::new(100))));
    let token = live_token(&f.k1, "ns/a");
    // Envoy's HTTP service with path_prefix /authz/ns/a: the original method and path follow.
    for (method, path) in [
        ("GET", "/authz/ns/a/bundles/authz.tar.gz"),
        ("POST", "/authz/ns/a/v1/data?x=1"),
        ("GET", "/authz/ns/a"),
        ("GET", "/authz/ns/a/"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request");
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}");
        assert_eq!(headers["x-keyward-key"], "ns/a");
        assert_eq!(headers["x-keyward-kid"], f.k1.key_id().as_str());
    }
    // Key b's route, and the old unbound prefix, whatever path the client chose after it
    // (behind `path_prefix: /ext_authz` the client's path could name any key).
    for (path, reason) in [
        ("/authz/ns/b/bundles/authz.tar.gz", "KeyNotAccepted"),
        ("/ext_authz/bundles/authz.tar.gz", "Unbound"),
        ("/ext_authz/ns/a/bundles/authz.tar.gz", "Unbound"),
        ("/ext_authz", "Unbound"),
    ] {
        let req = get_with(path, &[("authorization", &format!("Bearer {token}"))]);
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(headers["x-keyward-reason"], reason, "{path}");
    }
    let req = get_with(
        "/authz/ns/a/bundles/authz.tar.gz",
        &[("authorization", &format!("Bearer {}", tamper(&token)))],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "SignatureInvalid");
    assert!(body.is_empty());
    let req = get_with("/authz/ns/a/x", &[("authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(
        call(&app, req).await.1["x-keyward-reason"],
        "MalformedAuthorization"
    );
}

#[tokio::test]
async fn decisions_are_counted_by_reason() {
    let f = fixture();
    let s = shared(&f, Arc::new(MemoryUseLog::new(10)));
    let app = router(s.clone());
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    call(&app, get_with("/auth/ns/a", &[("authorization", &bearer)])).await;
    call(&app, get_with("/auth", &[("authorization", &bearer)])).await;
    call(&app, get_with("/auth/ns/a", &[])).await;
    assert_eq!(s.stats.decisions("allowed", ""), 1);
    assert_eq!(s.stats.decisions("refused", "Unbound"), 1);
    assert_eq!(s.stats.decisions("refused", "MissingToken"), 1);
    let (status, headers, body) = call(&app, get_with("/metrics", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    assert!(
        body.contains(r#"keyward_verifier_decisions_total{result="refused",reason="Unbound"} 1"#),
        "{body}"
    );
    assert!(!body.contains(&f.k1.key_id()), "no key id in metrics");
}

#[tokio::test]
async fn bundle_documents_with_etag_and_max_age() {
    let f = fixture();
    let app = router(shared(&f, Arc::new(MemoryUseLog::new(100))));
    let (status, headers, body) = call(
        &app,
        Request::get("/keys/ns/a/jwks.json")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "public, max-age=60"); // publishDelay 2m
    assert_eq!(headers["content-type"], "application/json");
    let jwks: Jwks = serde_json::from_str(&body).expect("a JWKS");
    // k2 is still in the ConfigMap's JWKS, but no longer in the trust record: not served.
    assert_eq!(jwks.key_ids(), vec![f.k1.key_id()]);
    let etag = headers["etag"].clone();

    let req = Request::get("/keys/ns/a/jwks.json")
        .header("if-none-match", etag.clone())
        .body(Body::empty())
        .expect("request");
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers["etag"], etag);
    assert_eq!(headers["cache-control"], "public, max-age=60");
    assert!(body.is_empty());

    let (status, _, body) = call(
        &app,
        Request::get("/keys/ns/a/revoked.json")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let revoked: Vec<String> = serde_json::from_str(&body).expect("a list");
    assert_eq!(revoked, vec![f.k2.key_id()]);

    // Key b: default publishDelay (2m) too; unknown keys and documents: 404.
    for path in [
        "/keys/ns/c/jwks.json",
        "/keys/other/a/jwks.json",
        "/keys/ns/a/private.pem",
    ] {
        let (status, _, _) = call(
            &app,
            Request::get(path).body(Body::empty()).expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn readiness_waits_for_the_first_lists() {
    let s = Arc::new(Shared::new(
        Policy::default(),
        Arc::new(super::NoUseLog),
        None,
    ));
    s.expect_lists(2);
    let app = router(s.clone());
    let get = |p: &'static str| Request::get(p).body(Body::empty()).expect("request");
    assert_eq!(call(&app, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(
        call(&app, get("/readyz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    s.listed();
    s.listed();
    assert_eq!(call(&app, get("/readyz")).await.0, StatusCode::OK);
    // Without --upstream, other paths are 404, not proxied.
    assert_eq!(call(&app, get("/bundles/x")).await.0, StatusCode::NOT_FOUND);
}

#[test]
fn use_log_is_a_trait_object() {
    let log: Arc<dyn UseLog> = Arc::new(MemoryUseLog::new(1));
    log.record(Use {
        key: KeyRef::new("ns", "a"),
        kid: "k".into(),
        instance: super::Instance::Unattributed,
        at: chrono::Utc::now(),
    });
}

/// An upstream that echoes what it received: method, path, the headers the proxy controls,
/// and the body.
async fn echo_upstream() -> String {
    use axum::extract::Request as AxumRequest;
    let app = axum::Router::new().fallback(|req: AxumRequest| async move {
        let (parts, body) = req.into_parts();
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let head = format!(
            "{} {} auth={} key={} kid={} |",
            parts.method,
            parts.uri,
            h("authorization"),
            h("x-keyward-key"),
            h("x-keyward-kid"),
        );
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        format!("{head}{}", String::from_utf8_lossy(&body))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn reverse_proxy_forwards_only_verified_requests() {
    let f = fixture();
    let upstream = super::Upstream::new(&echo_upstream().await).expect("upstream");
    let s = Shared::new(
        Policy::default(),
        Arc::new(MemoryUseLog::new(10)),
        Some(upstream),
    )
    .bound_to(Some(KeyRef::new("ns", "a")));
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let token = live_token(&f.k1, "ns/a");

    // Another key's genuine token: 403, never forwarded.
    let mut b_claims = claims("ns/b");
    let now = chrono::Utc::now().timestamp();
    b_claims.aud = "bundles".into();
    b_claims.iss = "https://kw.example".into();
    b_claims.iat = now;
    b_claims.nbf = now;
    b_claims.exp = now + 600;
    let token_b = f.k3.sign_token(&b_claims).expect("sign");
    let (status, headers, body) = call(
        &app,
        get_with(
            "/v1/data/x",
            &[("authorization", &format!("Bearer {token_b}"))],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "KeyNotAccepted");
    assert!(body.is_empty());

    // Verified: forwarded with the body, the token removed, the key headers set (a forged
    // client-sent X-Keyward-Key is dropped).
    let req = Request::post("/v1/data/x?q=1")
        .header("authorization", format!("Bearer {token}"))
        .header("x-keyward-key", "ns/forged")
        .body(Body::from("payload"))
        .expect("request");
    let (status, _, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!(
            "POST /v1/data/x?q=1 auth=- key=ns/a kid={} |payload",
            f.k1.key_id()
        )
    );

    // Refused: never reaches the upstream.
    let req = Request::get("/bundles/authz.tar.gz")
        .header("authorization", format!("Bearer {}", tamper(&token)))
        .body(Body::empty())
        .expect("request");
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "SignatureInvalid");
    assert!(body.is_empty());

    // The verifier's own routes are not proxied.
    let (status, _, _) = call(
        &app,
        Request::get("/healthz")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_unbound_reverse_proxy_refuses() {
    let f = fixture();
    let upstream = super::Upstream::new(&echo_upstream().await).expect("upstream");
    let s = Shared::new(
        Policy::default(),
        Arc::new(MemoryUseLog::new(10)),
        Some(upstream),
    );
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    let (status, headers, body) =
        call(&app, get_with("/v1/data/x", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "Unbound");
    assert!(body.is_empty());
}

#[tokio::test]
async fn a_silent_upstream_gets_504() {
    let f = fixture();
    // An upstream that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let upstream = super::Upstream {
        timeout: Duration::from_millis(300),
        ..super::Upstream::new(&format!("http://{addr}")).expect("upstream")
    };
    let s = Arc::new(
        Shared::new(
            Policy::default(),
            Arc::new(MemoryUseLog::new(10)),
            Some(upstream),
        )
        .bound_to(Some(KeyRef::new("ns", "a"))),
    );
    s.update(|i| *i = f.index.clone());
    let app = router(s.clone());
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    let started = std::time::Instant::now();
    let (status, _, _) = call(&app, get_with("/v1/data/x", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    held.abort();
}

// ---- TLS: the real server loop (`serve::serve`) on a socket, with rustls on both ends. ----

mod tls {
    use std::path::Path;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::verifier::serve::{Limits, serve};
    use crate::verifier::tls::testing::Ca;
    use crate::verifier::tls::{ReloadingCert, provider, server_config};

    struct Server {
        addr: std::net::SocketAddr,
        shared: Arc<Shared>,
        _stop: tokio::sync::oneshot::Sender<()>,
    }

    async fn start(resolver: Arc<ReloadingCert>, header_read_timeout: Duration) -> Server {
        let f = fixture();
        let shared = shared(&f, Arc::new(MemoryUseLog::new(100)));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
            server_config(resolver).expect("server config"),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = Limits {
            max_connections: 8,
            header_read_timeout,
        };
        tokio::spawn(serve(
            listener,
            router(shared.clone()),
            limits,
            shared.stats.clone(),
            Some(acceptor),
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            shared,
            _stop: stop,
        }
    }

    fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca).expect("CA pem"))
            .expect("add CA");
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// GET `path` over TLS trusting `ca`: the response, and the leaf certificate served.
    async fn get(
        addr: std::net::SocketAddr,
        ca: &Path,
        path: &str,
    ) -> std::io::Result<(String, Vec<u8>)> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("verifier.test").expect("name");
        let mut tls = connector(ca).connect(name, tcp).await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .expect("a peer certificate")[0]
            .as_ref()
            .to_vec();
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: verifier.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut out = String::new();
        tls.read_to_string(&mut out).await?;
        Ok((out, leaf))
    }

    #[tokio::test]
    async fn https_with_the_right_ca_and_a_failed_handshake_with_a_wrong_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, wrong) = (Ca::new(dir.path(), "right"), Ca::new(dir.path(), "wrong"));
        let (crt, key) = ca.issue("server");
        let resolver = Arc::new(ReloadingCert::new(&crt, &key, Duration::ZERO).expect("load"));
        let s = start(resolver, Duration::from_secs(5)).await;

        let (health, _) = get(s.addr, &ca.cert(), "/healthz")
            .await
            .expect("GET /healthz");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with("ok\n"), "{health}");
        let (jwks, _) = get(s.addr, &ca.cert(), "/keys/ns/a/jwks.json")
            .await
            .expect("GET jwks");
        assert!(jwks.starts_with("HTTP/1.1 200"), "{jwks}");
        let body = jwks.split("\r\n\r\n").nth(1).expect("a body");
        let doc: Jwks = serde_json::from_str(body).expect("a JWKS");
        assert_eq!(doc.keys.len(), 1, "the recorded key only");

        let e = get(s.addr, &wrong.cert(), "/healthz")
            .await
            .expect_err("a certificate of an untrusted CA");
        assert!(
            e.to_string().contains("UnknownIssuer") || e.to_string().contains("invalid peer"),
            "{e}"
        );
        // Plain HTTP to the TLS port gets no HTTP answer.
        let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        assert!(!out.starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(s.shared.stats.tls_handshake_failures("error") >= 1);
    }

    #[tokio::test]
    async fn a_new_certificate_is_served_without_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "right");
        let (first, second) = (ca.issue("first"), ca.issue("second"));
        let live = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::copy(&first.0, &live.0).expect("copy");
        std::fs::copy(&first.1, &live.1).expect("copy");
        let resolver =
            Arc::new(ReloadingCert::new(&live.0, &live.1, Duration::ZERO).expect("load"));
        let s = start(resolver, Duration::from_secs(5)).await;
        let der = |p: &Path| {
            CertificateDer::from_pem_file(p)
                .expect("pem")
                .as_ref()
                .to_vec()
        };
        let (_, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
        assert_eq!(leaf, der(&first.0));
        std::fs::copy(&second.0, &live.0).expect("copy");
        std::fs::copy(&second.1, &live.1).expect("copy");
        let (_, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
        assert_eq!(leaf, der(&second.0), "the new pair is served");
        // A broken key: the second pair stays.
        std::fs::write(&live.1, b"-----BEGIN PRIVATE KEY-----\nAAAA\n").expect("write");
        let (health, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert_eq!(leaf, der(&second.0), "the last good pair stays");
    }

    #[tokio::test]
    async fn a_client_that_never_says_hello_is_closed_at_the_header_read_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "right");
        let (crt, key) = ca.issue("server");
        let resolver = Arc::new(ReloadingCert::new(&crt, &key, Duration::ZERO).expect("load"));
        let s = start(resolver, Duration::from_millis(300)).await;

        let t0 = std::time::Instant::now();
        let mut silent = TcpStream::connect(s.addr).await.expect("connect");
        // A half ClientHello (the record header only) is no better than silence.
        let mut half = TcpStream::connect(s.addr).await.expect("connect");
        half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .expect("write");
        for stream in [&mut silent, &mut half] {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("closed by the server well before 5 s");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "closed too early: {took:?}"
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(s.shared.stats.tls_handshake_failures("timeout"), 2);
        assert_eq!(s.shared.stats.open_connections(), 0, "both slots are free");
        // The server still answers.
        let (health, _) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }
}
