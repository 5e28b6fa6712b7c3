//! The verification table over the pure decision (`verify`): what is accepted and each refusal
//! with its status; only recorded key ids, with their recorded lifetime; the policy flags; a
//! bundle used only for its own key.

use super::*;

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
    index.replace_keys(
        Some("ns"),
        vec![super::super::index::key_entry(&key("10m"))],
    );
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

/// A required claim passes only when the token grants it AND the key's trust record does: a
/// consumer holding the private key (`includePrivateKey`) signs itself any claim it likes, but
/// not the record, which only the operator writes. Refused as 403 `ClaimMissing`.
#[test]
fn a_required_claim_needs_the_token_and_the_trust_record() {
    use crate::verifier::verify::{RequiredClaim, require_claims};
    let k = KeyPair::generate();
    let granted = |scope: &str| {
        let extra = std::collections::BTreeMap::from([("scope".to_string(), scope.to_string())]);
        k.sign_token_with(&claims("ns/a"), &extra).expect("sign")
    };
    let with_record_claims = |record_scope: Option<&str>| {
        let mut p = pk("a", UID_A, json!({}), &[&k]);
        let mut r = crate::trust_record::TrustRecord::of(&p)
            .expect("record")
            .expect("readable");
        if let Some(s) = record_scope {
            r.claims.insert("scope".into(), s.into());
        }
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert(crate::trust_record::ANNOTATION.into(), r.render());
        let mut index = Index::default();
        index.apply_key(&p);
        index
            .apply_bundle(&bundle("a", UID_A, &[&k], &[]))
            .expect("parse");
        index
    };
    let key = crate::verifier::KeyRef::new("ns", "a");
    let read = RequiredClaim::parse("scope=bundles:read").expect("parses");
    let check = |token: &str, index: &Index| {
        verify(token, index, &Binding::AnyKey, NOW, &Policy::default()).expect("verifies");
        require_claims(token, index, &key, &[&read]).map_err(|e| (e.reason(), e.status()))
    };
    let recorded = with_record_claims(Some("bundles:read metrics:read"));
    assert_eq!(
        check(&granted("metrics:read bundles:read"), &recorded),
        Ok(())
    );
    let forbidden = Err(("ClaimMissing", http::StatusCode::FORBIDDEN));
    assert_eq!(check(&granted("metrics:read"), &recorded), forbidden);
    assert_eq!(
        check(&k.sign_token(&claims("ns/a")).expect("sign"), &recorded),
        forbidden
    );
    // Self-granted: the token says so, the record does not.
    let unrecorded = with_record_claims(None);
    assert_eq!(check(&granted("bundles:read"), &unrecorded), forbidden);
    // Nothing required: nothing checked.
    assert_eq!(
        require_claims(&granted("x"), &unrecorded, &key, &[]),
        Ok(())
    );
    // Parsing: a name and a value without spaces.
    assert!(RequiredClaim::parse("scope").is_none());
    assert!(RequiredClaim::parse("scope=").is_none());
    assert!(RequiredClaim::parse("my scope=x").is_none());
    assert!(RequiredClaim::parse("scope=a b").is_none());
}

/// The recorded key ids, kept as a sorted slice: each is found with its own lifetime, and no
/// other key id is trusted, whatever the order the key ids sort in.
#[test]
fn every_recorded_key_id_is_found_with_its_own_lifetime() {
    let keys: Vec<KeyPair> = (0..5).map(|_| KeyPair::generate()).collect();
    let refs: Vec<&KeyPair> = keys.iter().collect();
    let params = super::super::index::KeyParams::of(&pk(
        "a",
        UID_A,
        json!({"token": {"ttl": "15m"}}),
        &refs,
    ));
    assert!(params.recorded);
    for k in &keys {
        let kid = k.public_key().key_id();
        assert!(params.trusts(&kid), "{kid}");
        assert_eq!(params.ttl_of(&kid), std::time::Duration::from_secs(900));
    }
    let stranger = KeyPair::generate().public_key().key_id();
    assert!(!params.trusts(&stranger));
    assert_eq!(params.ttl_of(&stranger), std::time::Duration::ZERO);
    assert!(!params.trusts(""));
    let none = super::super::index::KeyParams::of(&pk("a", UID_A, json!({}), &[]));
    assert!(!none.trusts(&keys[0].public_key().key_id()));
}
