//! Proof of possession: the token endpoint's checks of a client assertion (as OPA signs it:
//! ES256, no `kid`, `iat`/`exp` 10 minutes apart, `jti` only with `include_jti_claim`), its
//! replay cache, and the access tokens `/auth` accepts in place of the key's own tokens.

use super::*;
use crate::keys::{Kind, TokenHeader};
use crate::verifier::oauth::{ASSERTION_TYPE, TokenEndpoint};

const URL: &str = "https://verifier.keyward.svc:8443/oauth2/token";

struct Pop {
    index: Index,
    agent: KeyPair,
    signer: KeyPair,
    endpoint: TokenEndpoint,
    _dir: tempfile::TempDir,
}

/// `ns/agent` in proof-of-possession mode with a P-256 key, `ns/bearer` in bearer mode, and
/// `ns/signer`, the access-token signer, whose private key is in a file.
fn pop() -> Pop {
    let agent = KeyPair::generate_kind(Kind::EcdsaP256);
    let bearer = KeyPair::generate();
    let signer = KeyPair::generate();
    let mut index = Index::default();
    let with_pop = |mut pk: ProvisioningKey| {
        let ann = pk.metadata.annotations.as_mut().expect("annotations");
        let mut r = TrustRecord::parse(&ann[crate::trust_record::ANNOTATION]).expect("record");
        r.pop = true;
        r.claims = [("scope".to_string(), "bundles:read".to_string())].into();
        ann.insert(crate::trust_record::ANNOTATION.into(), r.render());
        pk
    };
    index.apply_key(&with_pop(pk("agent", UID_A, json!({}), &[&agent])));
    index.apply_key(&pk("bearer", UID_B, json!({}), &[&bearer]));
    index.apply_key(&pk("signer", POD, json!({}), &[&signer]));
    for (name, uid, k) in [
        ("agent", UID_A, &agent),
        ("bearer", UID_B, &bearer),
        ("signer", POD, &signer),
    ] {
        index
            .apply_bundle(&bundle(name, uid, &[k], &[]))
            .expect("bundle");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("private-key.pem");
    std::fs::write(&file, signer.to_pkcs8_pem().as_bytes()).expect("write");
    let endpoint = TokenEndpoint::new(
        URL.into(),
        KeyRef::new("ns", "signer"),
        file,
        Duration::from_secs(300),
    );
    Pop {
        index,
        agent,
        signer,
        endpoint,
        _dir: dir,
    }
}

/// An assertion as OPA 1.4 signs it: header `{"typ":"JWT","alg":"ES256"}` (no kid).
fn assertion(key: &KeyPair, claims: serde_json::Value) -> String {
    #[derive(serde::Serialize)]
    struct NoKid<'a> {
        typ: &'a str,
        alg: &'a str,
    }
    let header = serde_json::to_vec(&NoKid {
        typ: "JWT",
        alg: key.kind().alg(),
    })
    .expect("header");
    let mut t = URL_SAFE_NO_PAD.encode(header);
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims")));
    let sig = key.sign_raw(t.as_bytes());
    t.push('.');
    t.push_str(&URL_SAFE_NO_PAD.encode(sig));
    t
}

fn opa_claims(jti: &str) -> serde_json::Value {
    json!({"iss": "ns/agent", "sub": "ns/agent", "aud": URL, "iat": NOW, "exp": NOW + 600, "jti": jti})
}

fn form(assertion: &str) -> Vec<(String, String)> {
    vec![
        ("grant_type".into(), "client_credentials".into()),
        ("client_assertion_type".into(), ASSERTION_TYPE.into()),
        ("client_assertion".into(), assertion.into()),
        ("client_id".into(), "ns/agent".into()),
    ]
}

fn policy(p: &Pop) -> Policy {
    Policy {
        access: Some(p.endpoint.access_policy()),
        ..Policy::default()
    }
}

#[test]
fn an_opa_style_assertion_gets_an_access_token_that_auth_accepts_once_per_jti() {
    let p = pop();
    let issued = p
        .endpoint
        .issue(
            &form(&assertion(&p.agent, opa_claims("j-1"))),
            &p.index,
            NOW,
            30,
        )
        .expect("issued");
    assert_eq!(issued.expires_in, 300);
    assert_eq!(issued.verified.kid, p.agent.key_id());
    let body: serde_json::Value = serde_json::from_str(&issued.body()).expect("json");
    assert_eq!(body["token_type"], "Bearer");
    // /auth: the access token passes for the agent's key, naming the agent's key id.
    let binding = Binding::Key(KeyRef::new("ns", "agent"));
    let v = verify(
        &issued.access_token,
        &p.index,
        &binding,
        NOW + 10,
        &policy(&p),
    )
    .expect("access token accepted");
    assert_eq!(
        (v.key.to_string(), v.kid),
        ("ns/agent".to_string(), p.agent.key_id())
    );
    // The record's claims ride along, so a route's required claim passes.
    let want = crate::verifier::RequiredClaim::parse("scope=bundles:read").expect("claim");
    crate::verifier::verify::require_claims(&issued.access_token, &p.index, &v.key, &[&want])
        .expect("scope");
    // Another key's route refuses it (403), and it expires with its ttl.
    let other = Binding::Key(KeyRef::new("ns", "bearer"));
    assert!(matches!(
        verify(&issued.access_token, &p.index, &other, NOW, &policy(&p)),
        Err(Refusal::KeyNotAccepted { .. })
    ));
    assert!(
        verify(
            &issued.access_token,
            &p.index,
            &binding,
            NOW + 300 + 31,
            &policy(&p)
        )
        .is_err()
    );
    // The same assertion again: a replay.
    let again = p
        .endpoint
        .issue(
            &form(&assertion(&p.agent, opa_claims("j-1"))),
            &p.index,
            NOW + 1,
            30,
        )
        .expect_err("replay");
    assert_eq!(again.code, "invalid_client");
    assert!(again.description.contains("replay"), "{again}");
    // A new jti passes.
    assert!(
        p.endpoint
            .issue(
                &form(&assertion(&p.agent, opa_claims("j-2"))),
                &p.index,
                NOW + 1,
                30
            )
            .is_ok()
    );
}

#[test]
fn a_pop_keys_own_bearer_token_is_refused_even_signed_with_the_real_key() {
    let p = pop();
    // Whoever holds the agent's private key signs a perfect bearer token: refused.
    let token = p.agent.sign_token(&claims("ns/agent")).expect("sign");
    let binding = Binding::Key(KeyRef::new("ns", "agent"));
    assert_eq!(
        verify(&token, &p.index, &binding, NOW, &policy(&p)),
        Err(Refusal::ProofOfPossessionRequired("ns/agent".into()))
    );
    assert_eq!(
        Refusal::ProofOfPossessionRequired("x".into()).status(),
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn assertions_that_must_not_pass() {
    let p = pop();
    let stranger = KeyPair::generate_kind(Kind::EcdsaP256);
    let mut cases: Vec<(&str, Vec<(String, String)>)> = vec![
        (
            "signed by another key",
            form(&assertion(&stranger, opa_claims("a"))),
        ),
        (
            "no jti",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("x");
                c.as_object_mut().expect("obj").remove("jti");
                c
            })),
        ),
        (
            "aud of another endpoint",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("b");
                c["aud"] = json!("https://elsewhere/oauth2/token");
                c
            })),
        ),
        (
            "iss not the key",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("c");
                c["iss"] = json!("ns/other");
                c
            })),
        ),
        (
            "lives longer than 10 minutes",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("d");
                c["exp"] = json!(NOW + 3600);
                c
            })),
        ),
        (
            "expired",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("e");
                c["iat"] = json!(NOW - 700);
                c["exp"] = json!(NOW - 100);
                c
            })),
        ),
        (
            "issued in the future",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("f");
                c["iat"] = json!(NOW + 120);
                c["exp"] = json!(NOW + 600);
                c
            })),
        ),
        (
            "a bearer-mode key",
            form(&assertion(&p.agent, {
                let mut c = opa_claims("g");
                c["iss"] = json!("ns/bearer");
                c["sub"] = json!("ns/bearer");
                c
            })),
        ),
        (
            "the agent key's own bearer token as the assertion",
            form(&p.agent.sign_token(&claims("ns/agent")).expect("sign")),
        ),
    ];
    let mut wrong_id = form(&assertion(&p.agent, opa_claims("h")));
    wrong_id[3].1 = "ns/bearer".into();
    cases.push(("client_id not the key", wrong_id));
    let mut grant = form(&assertion(&p.agent, opa_claims("i")));
    grant[0].1 = "password".into();
    cases.push(("another grant type", grant));
    let mut twice = form(&assertion(&p.agent, opa_claims("j")));
    twice.push(("client_assertion".into(), "x".into()));
    cases.push(("a repeated field", twice));
    // An EdDSA-signed assertion in the header of a P-256 key.
    let header = TokenHeader {
        alg: "EdDSA".into(),
        typ: None,
        kid: p.agent.key_id(),
        crit: None,
    };
    let confused = KeyPair::generate()
        .sign_compact(&header, &opa_claims("k"))
        .expect("sign");
    cases.push(("alg of another kind", form(&confused)));
    for (what, f) in cases {
        let err = p.endpoint.issue(&f, &p.index, NOW, 30).expect_err(what);
        assert!(
            !err.body().contains("eyJ"),
            "{what}: the answer echoes no token: {err}"
        );
    }
}

#[test]
fn a_deactivated_agent_key_voids_its_access_tokens_at_once() {
    let mut p = pop();
    let issued = p
        .endpoint
        .issue(
            &form(&assertion(&p.agent, opa_claims("z"))),
            &p.index,
            NOW,
            30,
        )
        .expect("issued");
    // The operator deactivates the agent key: its id leaves the record.
    let mut gone = pk("agent", UID_A, json!({}), &[]);
    {
        let ann = gone.metadata.annotations.as_mut().expect("annotations");
        let mut r = TrustRecord::parse(&ann[crate::trust_record::ANNOTATION]).expect("record");
        r.pop = true;
        ann.insert(crate::trust_record::ANNOTATION.into(), r.render());
    }
    p.index.apply_key(&gone);
    let binding = Binding::Key(KeyRef::new("ns", "agent"));
    assert_eq!(
        verify(
            &issued.access_token,
            &p.index,
            &binding,
            NOW + 1,
            &policy(&p)
        ),
        Err(Refusal::KeyNotRecorded("ns/agent".into()))
    );
    // Nor does the endpoint issue against it.
    assert!(
        p.endpoint
            .issue(
                &form(&assertion(&p.agent, opa_claims("y"))),
                &p.index,
                NOW,
                30
            )
            .is_err()
    );
}

#[test]
fn the_signer_must_be_trusted_and_its_own_tokens_are_no_access_tokens() {
    let p = pop();
    // The signer key's own bearer token is not an access token (iss is not the endpoint).
    let token = p.signer.sign_token(&claims("ns/agent")).expect("sign");
    let binding = Binding::Key(KeyRef::new("ns", "agent"));
    assert_eq!(
        verify(&token, &p.index, &binding, NOW, &policy(&p)),
        Err(Refusal::WrongIssuer("ns/signer".into()))
    );
    // A signing key file the signer's record does not list: 503, no token.
    std::fs::write(
        &p.endpoint.key_file,
        KeyPair::generate().to_pkcs8_pem().as_bytes(),
    )
    .expect("write");
    let err = p
        .endpoint
        .issue(
            &form(&assertion(&p.agent, opa_claims("s"))),
            &p.index,
            NOW,
            30,
        )
        .expect_err("untrusted signer");
    assert_eq!(err.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn jsonwebtoken_signs_an_assertion_the_endpoint_accepts() {
    // An independent JWT library (jsonwebtoken, on ring) signs the client assertion.
    let p = pop();
    let pem = p.agent.to_pkcs8_pem();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("pem body");
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let token = jsonwebtoken::encode(&header, &opa_claims("lib-1"), &key).expect("encode");
    let issued = p
        .endpoint
        .issue(&form(&token), &p.index, NOW, 30)
        .expect("issued");
    // And it verifies the access token with the signer's public key.
    let decoding = jsonwebtoken::DecodingKey::from_ed_der(&raw_ed25519(&p.signer));
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["keyward"]);
    validation.set_issuer(&[URL]);
    validation.validate_exp = false;
    let data =
        jsonwebtoken::decode::<serde_json::Value>(&issued.access_token, &decoding, &validation)
            .expect("jsonwebtoken verifies the access token");
    assert_eq!(data.claims["cnf"]["kid"], p.agent.key_id());
}

/// The raw 32-byte Ed25519 public key (what jsonwebtoken's `from_ed_der` takes).
fn raw_ed25519(k: &KeyPair) -> Vec<u8> {
    let jwk = k.public_key().to_jwk();
    URL_SAFE_NO_PAD.decode(jwk.x).expect("x")
}
