use super::*;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;

/// RFC 8037 appendix A.1 private key `d` (the seed) and A.3 thumbprint.
const RFC8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
const RFC8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
const RFC8037_KID: &str = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k";
/// RFC 8037 appendix A.4: JWS of "Example of Ed25519 signing" with header {"alg":"EdDSA"}.
const RFC8037_JWS: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";
const NOW: i64 = 1_700_000_000;

fn from_seed(seed: &[u8; 32]) -> KeyPair {
    KeyPair {
        signing: Signing::Ed25519(SigningKey::from_bytes(seed)),
    }
}

fn rfc_key() -> KeyPair {
    let seed: [u8; 32] = URL_SAFE_NO_PAD
        .decode(RFC8037_D)
        .unwrap()
        .try_into()
        .unwrap();
    from_seed(&seed)
}

fn claims() -> TokenClaims {
    TokenClaims {
        iss: "keyward".into(),
        sub: "agent-1".into(),
        aud: "policy-agents".into(),
        iat: NOW,
        nbf: NOW,
        exp: NOW + 600,
        jti: "6f1c1d9e-1b0f-4c53-9d34-0d1e4c1c2f11".into(),
    }
}

fn jwks(keys: &[&KeyPair]) -> Jwks {
    Jwks {
        keys: keys.iter().map(|k| k.public_key().to_jwk()).collect(),
    }
}

/// Replace one segment of a compact JWS.
fn with_segment(token: &str, index: usize, value: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[index] = value;
    parts.join(".")
}

#[test]
fn private_pem_round_trip() {
    let key = KeyPair::generate();
    let pem = key.to_pkcs8_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    assert!(pem.ends_with("\n-----END PRIVATE KEY-----\n"));
    let back = KeyPair::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(back.key_id(), key.key_id());
    assert_eq!(back.ed().to_bytes(), key.ed().to_bytes());
    assert_eq!(*back.to_pkcs8_pem(), *pem);
    // CRLF and surrounding whitespace are tolerated.
    let crlf = format!("\n  {}  \n", pem.replace('\n', "\r\n"));
    assert_eq!(
        KeyPair::from_pkcs8_pem(&crlf).unwrap().key_id(),
        key.key_id()
    );
}

#[test]
fn private_pem_matches_rfc8410_encoding() {
    // RFC 8410 section 10.3 example private key (v1).
    let pem = "-----BEGIN PRIVATE KEY-----\n\
               MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
               -----END PRIVATE KEY-----\n";
    let key = KeyPair::from_pkcs8_pem(pem).unwrap();
    assert_eq!(*key.to_pkcs8_pem(), pem);
    // RFC 8410 section 10.1 public key (it belongs to a different private key, so only
    // check that the SPKI encoding round-trips byte for byte).
    let spki = "-----BEGIN PUBLIC KEY-----\n\
                MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
                -----END PUBLIC KEY-----\n";
    assert_eq!(PublicKey::from_spki_pem(spki).unwrap().to_spki_pem(), spki);
}

#[test]
fn private_pem_accepts_v2_and_checks_embedded_public_key() {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    let key = KeyPair::generate();
    // ed25519-dalek writes v2 (with the public key).
    let v2 = key.ed().to_pkcs8_pem(LineEnding::LF).unwrap();
    assert_ne!(*v2, *key.to_pkcs8_pem());
    assert_eq!(KeyPair::from_pkcs8_pem(&v2).unwrap().key_id(), key.key_id());

    let other = KeyPair::generate();
    let mismatched = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.ed().to_bytes(),
        public_key: Some(ed25519_dalek::pkcs8::PublicKeyBytes(
            other.public_key().ed().to_bytes(),
        )),
    }
    .to_pkcs8_pem(LineEnding::LF)
    .unwrap();
    let err = KeyPair::from_pkcs8_pem(&mismatched).unwrap_err();
    assert_eq!(err.reason(), "InvalidPrivateKey");
}

#[test]
fn private_pem_rejects_garbage_without_echoing_it() {
    let key = KeyPair::generate();
    let pem = key.to_pkcs8_pem();
    let body = pem.lines().nth(1).unwrap().to_owned();
    let cases = [
        String::new(),
        "not a pem".to_owned(),
        key.public_key().to_spki_pem(),
        pem.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"),
        pem.replace(&body[..8], "AAAAAAAA"),
        pem.replace(&body, &body[..40]),
    ];
    for case in cases {
        let err = KeyPair::from_pkcs8_pem(&case).unwrap_err();
        assert_eq!(err.reason(), "InvalidPrivateKey", "{case}");
        let msg = format!("{err} {err:?}");
        assert!(!msg.contains(&body[16..]), "{msg}");
    }
}

#[test]
fn public_pem_round_trip() {
    let key = KeyPair::generate();
    let pem = key.public_key().to_spki_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
    assert!(pem.ends_with("\n-----END PUBLIC KEY-----\n"));
    let back = PublicKey::from_spki_pem(&pem).unwrap();
    assert_eq!(back, key.public_key());
    assert_eq!(back.to_spki_pem(), pem);
    // Agrees with the pkcs8 crate's encoder.
    use ed25519_dalek::pkcs8::EncodePublicKey as _;
    use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
    assert_eq!(
        key.public_key()
            .ed()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
        pem
    );
    let err = PublicKey::from_spki_pem(&key.to_pkcs8_pem()).unwrap_err();
    assert_eq!(err.reason(), "InvalidPublicKey");
}

#[test]
fn key_id_matches_rfc8037_vector() {
    let key = rfc_key();
    let jwk = key.public_key().to_jwk();
    assert_eq!(jwk.x, RFC8037_X);
    assert_eq!(key.key_id(), RFC8037_KID);
    assert_eq!(jwk.kid.as_deref(), Some(RFC8037_KID));

    let bare = Jwk {
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: RFC8037_X.into(),
        y: None,
        kid: None,
        use_: None,
        alg: None,
    };
    assert_eq!(PublicKey::from_jwk(&bare).unwrap().key_id(), RFC8037_KID);
}

#[test]
fn rfc8037_signature_vector_verifies() {
    let key = rfc_key();
    let (signing_input, sig) = RFC8037_JWS.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    key.public_key()
        .verify(signing_input.as_bytes(), &sig)
        .unwrap();
    // Ed25519 is deterministic: we produce the same signature.
    assert_eq!(
        key.ed().sign(signing_input.as_bytes()).to_bytes()[..],
        sig[..]
    );
    let err = key
        .public_key()
        .verify(b"Example of Ed25519 signing!", &sig)
        .unwrap_err();
    assert_eq!(err, KeyError::SignatureInvalid);
    assert_eq!(
        key.public_key()
            .verify(signing_input.as_bytes(), &sig[..63]),
        Err(KeyError::SignatureInvalid)
    );
}

#[test]
fn fingerprint_format() {
    let key = rfc_key();
    let fp = key.public_key().fingerprint();
    let raw = URL_SAFE_NO_PAD.decode(RFC8037_X).unwrap();
    let expected = format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&raw)));
    assert_eq!(fp, expected);
    assert_eq!(fp.len(), "SHA256:".len() + 43);
    assert!(!fp.ends_with('='));
}

#[test]
fn jwk_round_trip_and_validation() {
    let key = KeyPair::generate();
    let jwk = key.public_key().to_jwk();
    let json = serde_json::to_value(&jwk).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": jwk.x, "kid": key.key_id(),
            "use": "sig", "alg": "EdDSA"
        })
    );
    let parsed: Jwk = serde_json::from_value(json).unwrap();
    assert_eq!(PublicKey::from_jwk(&parsed).unwrap(), key.public_key());

    let other = KeyPair::generate();
    let bad_kid = Jwk {
        kid: Some(other.key_id()),
        ..jwk.clone()
    };
    let err = PublicKey::from_jwk(&bad_kid).unwrap_err();
    assert_eq!(err.reason(), "KeyIdMismatch");

    let cases = [
        Jwk {
            kty: "EC".into(),
            ..jwk.clone()
        },
        Jwk {
            crv: "X25519".into(),
            ..jwk.clone()
        },
        Jwk {
            use_: Some("enc".into()),
            ..jwk.clone()
        },
        Jwk {
            alg: Some("ES256".into()),
            ..jwk.clone()
        },
        Jwk {
            x: format!("{}=", jwk.x),
            kid: None,
            ..jwk.clone()
        },
        Jwk {
            x: jwk.x[..40].to_owned(),
            kid: None,
            ..jwk.clone()
        },
        // Identity point: small order.
        Jwk {
            x: URL_SAFE_NO_PAD.encode({
                let mut b = [0u8; 32];
                b[0] = 1;
                b
            }),
            kid: None,
            ..jwk.clone()
        },
    ];
    for case in cases {
        assert_eq!(
            PublicKey::from_jwk(&case).unwrap_err().reason(),
            "InvalidPublicKey",
            "{case:?}"
        );
    }
}

#[test]
fn jwks_find_and_key_ids() {
    let (a, b) = (KeyPair::generate(), KeyPair::generate());
    let mut set = jwks(&[&a, &b]);
    set.keys.push(Jwk {
        kid: None,
        ..a.public_key().to_jwk()
    });
    assert_eq!(set.key_ids(), vec![a.key_id(), b.key_id()]);
    assert_eq!(set.find(&b.key_id()), Some(&b.public_key().to_jwk()));
    assert_eq!(set.find("nope"), None);
    let json = serde_json::to_string(&set).unwrap();
    assert_eq!(serde_json::from_str::<Jwks>(&json).unwrap(), set);
    assert_eq!(Jwks::default().key_ids(), Vec::<String>::new());
}

#[test]
fn token_sign_verify_round_trip() {
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let header_json = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(header_json).unwrap(),
        format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#, key.key_id())
    );
    let (header, got) = verify_token(&token, &jwks(&[&key]), &[], NOW, 0).unwrap();
    assert_eq!(got, claims());
    assert_eq!(header.kid, key.key_id());
    assert_eq!(header.alg, JWS_ALG);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(decode_token_unverified(&token).unwrap(), (header, claims()));
    // Among several trusted keys.
    let other = KeyPair::generate();
    verify_token(&token, &jwks(&[&other, &key]), &[other.key_id()], NOW, 0).unwrap();
}

#[test]
fn verify_rejects_revoked_kid() {
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let revoked = vec![key.key_id()];
    let err = verify_token(&token, &jwks(&[&key]), &revoked, NOW, 0).unwrap_err();
    assert_eq!(err, KeyError::TokenRevoked(key.key_id()));
    assert_eq!(err.reason(), "TokenRevoked");
    // Also when the revoked key has already been removed from the trusted set.
    let err = verify_token(&token, &Jwks::default(), &revoked, NOW, 0).unwrap_err();
    assert_eq!(err.reason(), "TokenRevoked");
}

#[test]
fn verify_rejects_unknown_kid() {
    let (key, other) = (KeyPair::generate(), KeyPair::generate());
    let token = key.sign_token(&claims()).unwrap();
    let err = verify_token(&token, &jwks(&[&other]), &[], NOW, 0).unwrap_err();
    assert_eq!(err, KeyError::UnknownKeyId(key.key_id()));
    assert_eq!(err.reason(), "UnknownKeyId");
}

#[test]
fn verify_rejects_tampered_payload() {
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let forged = TokenClaims {
        sub: "agent-2".into(),
        ..claims()
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
    let tampered = with_segment(&token, 1, &payload);
    let err = verify_token(&tampered, &jwks(&[&key]), &[], NOW, 0).unwrap_err();
    assert_eq!(err, KeyError::SignatureInvalid);
    assert_eq!(err.reason(), "SignatureInvalid");
    // A flipped signature bit is caught as well.
    let mut sig = URL_SAFE_NO_PAD
        .decode(token.split('.').nth(2).unwrap())
        .unwrap();
    sig[0] ^= 1;
    let tampered = with_segment(&token, 2, &URL_SAFE_NO_PAD.encode(sig));
    let err = verify_token(&tampered, &jwks(&[&key]), &[], NOW, 0).unwrap_err();
    assert_eq!(err, KeyError::SignatureInvalid);
}

#[test]
fn verify_rejects_wrong_alg() {
    let key = KeyPair::generate();
    for alg in ["none", "HS256", "ES256", "eddsa"] {
        let header = TokenHeader {
            alg: alg.into(),
            typ: Some("JWT".into()),
            kid: key.key_id(),
            crit: None,
        };
        let token = key.sign_compact(&header, &claims()).unwrap();
        let err = verify_token(&token, &jwks(&[&key]), &[], NOW, 0).unwrap_err();
        assert_eq!(err, KeyError::UnsupportedAlgorithm(alg.into()));
        assert_eq!(err.reason(), "UnsupportedAlgorithm");
    }
    // alg=none with an empty signature.
    let token = key.sign_token(&claims()).unwrap();
    let none = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.key_id()));
    let token = with_segment(&with_segment(&token, 0, &none), 2, "");
    let err = verify_token(&token, &jwks(&[&key]), &[], NOW, 0).unwrap_err();
    assert_eq!(err.reason(), "UnsupportedAlgorithm");
}

#[test]
fn verify_checks_time_window() {
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let set = jwks(&[&key]);
    let exp = claims().exp;
    let nbf = claims().nbf;
    assert_eq!(
        verify_token(&token, &set, &[], exp, 0),
        Err(KeyError::TokenExpired { exp, now: exp })
    );
    assert_eq!(
        verify_token(&token, &set, &[], exp + 100, 30)
            .unwrap_err()
            .reason(),
        "TokenExpired"
    );
    verify_token(&token, &set, &[], exp - 1, 0).unwrap();
    verify_token(&token, &set, &[], exp + 29, 30).unwrap();
    assert_eq!(
        verify_token(&token, &set, &[], nbf - 1, 0),
        Err(KeyError::TokenNotYetValid { nbf, now: nbf - 1 })
    );
    verify_token(&token, &set, &[], nbf - 30, 30).unwrap();
    // Negative leeway is treated as zero, extreme values do not overflow.
    verify_token(&token, &set, &[], nbf, -5).unwrap();
    verify_token(&token, &set, &[], exp - 1, i64::MAX).unwrap();
    let extreme = TokenClaims {
        nbf: i64::MIN,
        exp: i64::MAX,
        ..claims()
    };
    let token = key.sign_token(&extreme).unwrap();
    verify_token(&token, &set, &[], NOW, i64::MAX).unwrap();
}

#[test]
fn malformed_tokens_are_rejected() {
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let set = jwks(&[&key]);
    let long = "a".repeat(MAX_TOKEN_LEN + 1);
    let padded = format!("{token}=");
    let cases = [
        "",
        "a.b",
        "a.b.c.d",
        "...",
        &long,
        &padded,
        "eyJhbGciOiJFZERTQSJ9.e30.AAAA",
    ];
    for case in cases {
        let err = verify_token(case, &set, &[], NOW, 0).unwrap_err();
        assert_eq!(err.reason(), "InvalidToken", "{case:?}: {err}");
        assert!(decode_token_unverified(case).is_err() || case == padded);
    }
    let typ = TokenHeader {
        alg: JWS_ALG.into(),
        typ: Some("at+jwt".into()),
        kid: key.key_id(),
        crit: None,
    };
    let token = key.sign_compact(&typ, &claims()).unwrap();
    assert_eq!(
        verify_token(&token, &set, &[], NOW, 0)
            .unwrap_err()
            .reason(),
        "InvalidToken"
    );
    let crit = TokenHeader {
        typ: Some(JWT_TYP.into()),
        crit: Some(serde_json::json!(["exp"])),
        ..typ.clone()
    };
    let token = key.sign_compact(&crit, &claims()).unwrap();
    assert_eq!(
        verify_token(&token, &set, &[], NOW, 0).unwrap_err(),
        KeyError::InvalidToken("crit is not supported"),
        "a critical extension is refused even when the signature verifies"
    );
    let no_typ = TokenHeader { typ: None, ..typ };
    let token = key.sign_compact(&no_typ, &claims()).unwrap();
    verify_token(&token, &set, &[], NOW, 0).unwrap();
}

#[test]
fn untrusted_kid_is_sanitized_in_errors() {
    let key = KeyPair::generate();
    let header = TokenHeader {
        alg: JWS_ALG.into(),
        typ: None,
        kid: format!("evil\n{}", "x".repeat(500)),
        crit: None,
    };
    let token = key.sign_compact(&header, &claims()).unwrap();
    let err = verify_token(&token, &Jwks::default(), &[], NOW, 0).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.len() < 200, "{msg}");
}

#[test]
fn debug_output_never_contains_key_material() {
    let key = KeyPair::generate();
    let pem = key.to_pkcs8_pem();
    let seed = key.ed().to_bytes();
    let debug = format!("{key:?} {:?} {key:#?}", key.public_key());
    assert_eq!(
        format!("{key:?}"),
        format!("KeyPair {{ kid: {:?} }}", key.key_id())
    );
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let secrets = [
        body.clone(),
        body[22..].to_owned(),
        STANDARD.encode(seed),
        STANDARD_NO_PAD.encode(seed),
        URL_SAFE_NO_PAD.encode(seed),
        seed.iter().map(|b| format!("{b:02x}")).collect(),
        format!("{seed:?}"),
    ];
    for secret in &secrets {
        assert!(!debug.contains(secret.as_str()), "Debug leaks key material");
    }
    assert!(debug.contains(&key.key_id()));
}

#[test]
fn error_reasons_are_pascal_case() {
    let errors = [
        KeyError::InvalidPrivateKey("x"),
        KeyError::InvalidPublicKey("x"),
        KeyError::KeyIdMismatch {
            claimed: "a".into(),
            actual: "b".into(),
        },
        KeyError::InvalidToken("x"),
        KeyError::UnsupportedAlgorithm("x".into()),
        KeyError::SignatureInvalid,
        KeyError::UnknownKeyId("x".into()),
        KeyError::TokenRevoked("x".into()),
        KeyError::TokenExpired { exp: 1, now: 2 },
        KeyError::TokenNotYetValid { nbf: 2, now: 1 },
        KeyError::Serialization("x"),
    ];
    for e in errors {
        let r = e.reason();
        assert!(r.chars().next().unwrap().is_ascii_uppercase(), "{r}");
        assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
    }
}

proptest! {
    #[test]
    fn prop_pem_round_trip_preserves_key_id(seed in any::<[u8; 32]>()) {
        let key = from_seed(&seed);
        let back = KeyPair::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
        prop_assert_eq!(back.key_id(), key.key_id());
        let public = PublicKey::from_spki_pem(&key.public_key().to_spki_pem()).unwrap();
        prop_assert_eq!(public.key_id(), key.key_id());
        let from_jwk = PublicKey::from_jwk(&key.public_key().to_jwk()).unwrap();
        prop_assert_eq!(from_jwk, key.public_key());
    }

    #[test]
    fn prop_token_never_verifies_under_another_key(
        seed_a in any::<[u8; 32]>(),
        seed_b in any::<[u8; 32]>(),
    ) {
        prop_assume!(seed_a != seed_b);
        let (a, b) = (from_seed(&seed_a), from_seed(&seed_b));
        let set_b = jwks(&[&b]);
        let token = a.sign_token(&claims()).unwrap();
        prop_assert!(verify_token(&token, &set_b, &[], NOW, 0).is_err());
        // Even when the header claims b's kid, a's signature does not verify.
        let header = TokenHeader {
            alg: JWS_ALG.into(),
            typ: Some(JWT_TYP.into()),
            kid: b.key_id(),
            crit: None,
        };
        let forged = a.sign_compact(&header, &claims()).unwrap();
        prop_assert_eq!(
            verify_token(&forged, &set_b, &[], NOW, 0),
            Err(KeyError::SignatureInvalid)
        );
        // And a's token still verifies under a's JWKS.
        prop_assert!(verify_token(&token, &jwks(&[&a]), &[], NOW, 0).is_ok());
    }
}

/// Static claims ride beside the registered ones, never over them, and are read back only as
/// what they are; `claim_grants` reads space-separated strings and arrays.
#[test]
fn static_claims_are_signed_and_read_back() {
    let pair = KeyPair::generate();
    let claims = TokenClaims {
        iss: "keyward".into(),
        sub: "ns/pk".into(),
        aud: "keyward".into(),
        iat: 1,
        nbf: 1,
        exp: 100,
        jti: "j".into(),
    };
    let extra = std::collections::BTreeMap::from([
        ("scope".to_string(), "bundles:read metrics:read".to_string()),
        ("tenant".to_string(), "a".to_string()),
    ]);
    let token = pair.sign_token_with(&claims, &extra).expect("sign");
    let jwks = Jwks {
        keys: vec![pair.public_key().to_jwk()],
    };
    let (_, got) = verify_token(&token, &jwks, &[], 50, 0).expect("verifies");
    assert_eq!(got, claims, "the registered claims are untouched");
    let custom = custom_claims(&token).expect("custom claims");
    assert_eq!(custom.len(), 2);
    assert!(claim_grants(&custom["scope"], "bundles:read"));
    assert!(claim_grants(&custom["scope"], "metrics:read"));
    assert!(!claim_grants(&custom["scope"], "bundles"));
    assert!(!claim_grants(&serde_json::json!(7), "7"));
    assert!(claim_grants(&serde_json::json!(["a", "b"]), "b"));
    // No static claims: the same token as sign_token.
    assert_eq!(
        custom_claims(&pair.sign_token(&claims).expect("sign"))
            .expect("read")
            .len(),
        0
    );
}

// ---------------------------------------------------------------------------------------------
// ECDSA P-256 (ES256)

/// A P-256 key as `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256` writes it,
/// and its public key as `openssl pkey -pubout` prints it (a test fixture, no real key).
const OPENSSL_P256: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgVNnJJ/WWFhMK29L4
HT1SItpzcnJ8BJUMKdBqgp9FTfGhRANCAASyvtgbOnhegNBg9okALgFjdiokPahj
bUqg2se33fMnlo0XVKejBVzmbtIVeqZEcyu4u+qGctkdRSVSe1Q6q4CJ
-----END PRIVATE KEY-----
";
const OPENSSL_P256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEsr7YGzp4XoDQYPaJAC4BY3YqJD2o
Y21KoNrHt93zJ5aNF1SnowVc5m7SFXqmRHMruLvqhnLZHUUlUntUOquAiQ==
-----END PUBLIC KEY-----
";

#[test]
fn p256_keys_read_what_openssl_writes_and_round_trip() {
    let key = KeyPair::from_pkcs8_pem(OPENSSL_P256).expect("openssl's P-256 key");
    assert_eq!(key.kind(), Kind::EcdsaP256);
    assert_eq!(key.public_key().to_spki_pem(), OPENSSL_P256_PUBLIC);
    let back = KeyPair::from_pkcs8_pem(&key.to_pkcs8_pem()).expect("our own encoding");
    assert_eq!(back.key_id(), key.key_id());
    let public = PublicKey::from_spki_pem(OPENSSL_P256_PUBLIC).expect("spki");
    assert_eq!(public.key_id(), key.key_id());
    assert!(
        !format!("{key:?}").contains("BEGIN"),
        "Debug prints the kid only"
    );
    // A fresh key of each kind.
    for kind in [Kind::Ed25519, Kind::EcdsaP256] {
        let k = KeyPair::generate_kind(kind);
        assert_eq!(k.kind(), kind);
        let again = KeyPair::from_pkcs8_pem(&k.to_pkcs8_pem()).expect("round trip");
        assert_eq!(again.key_id(), k.key_id());
    }
}

#[test]
fn p256_key_id_is_the_rfc7638_thumbprint_of_its_jwk() {
    let key = KeyPair::from_pkcs8_pem(OPENSSL_P256).expect("key");
    let jwk = key.public_key().to_jwk();
    assert_eq!((jwk.kty.as_str(), jwk.crv.as_str()), ("EC", "P-256"));
    assert_eq!(jwk.alg.as_deref(), Some("ES256"));
    // RFC 7638: the required members, lexicographic order, no whitespace (serde_json's map is
    // sorted), hashed with SHA-256.
    let canonical = serde_json::json!({
        "crv": jwk.crv, "kty": jwk.kty, "x": jwk.x, "y": jwk.y,
    })
    .to_string();
    let want = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
    assert_eq!(key.key_id(), want);
    assert_eq!(jwk.kid.as_deref(), Some(want.as_str()));
    let back = PublicKey::from_jwk(&jwk).expect("jwk");
    assert_eq!(back, key.public_key());
    // A point off the curve, a missing y, a wrong length and a mismatched alg are refused.
    let mut off = jwk.clone();
    off.kid = None;
    off.y = Some(URL_SAFE_NO_PAD.encode([7u8; 32]));
    assert!(PublicKey::from_jwk(&off).is_err());
    let mut no_y = jwk.clone();
    no_y.y = None;
    assert!(PublicKey::from_jwk(&no_y).is_err());
    let mut short = jwk.clone();
    short.x = URL_SAFE_NO_PAD.encode([1u8; 31]);
    assert!(PublicKey::from_jwk(&short).is_err());
    let mut alg = jwk.clone();
    alg.alg = Some("EdDSA".into());
    assert!(PublicKey::from_jwk(&alg).is_err());
}

#[test]
fn es256_tokens_verify_and_the_algorithm_is_the_keys_not_the_tokens() {
    let ec = KeyPair::from_pkcs8_pem(OPENSSL_P256).expect("key");
    let ed = rfc_key();
    let set = jwks(&[&ec, &ed]);
    let token = ec.sign_token(&claims()).expect("sign");
    let (header, got) = verify_token(&token, &set, &[], NOW, 0).expect("verifies");
    assert_eq!(header.alg, "ES256");
    assert_eq!(got, claims());
    // The signature is r || s, 64 bytes (RFC 7518 3.4), not DER.
    let sig = token.rsplit('.').next().expect("sig");
    assert_eq!(URL_SAFE_NO_PAD.decode(sig).expect("b64").len(), 64);
    // An ES256 header on the Ed25519 key's kid, and EdDSA on the P-256 key's: refused before
    // the signature is read.
    let mut as_ed = ec.header();
    as_ed.kid = ed.key_id();
    let forged = ec.sign_compact(&as_ed, &claims()).expect("sign");
    assert!(matches!(
        verify_token(&forged, &set, &[], NOW, 0),
        Err(KeyError::UnsupportedAlgorithm(_))
    ));
    let mut as_ec = ed.header();
    as_ec.kid = ec.key_id();
    let forged = ed.sign_compact(&as_ec, &claims()).expect("sign");
    assert!(matches!(
        verify_token(&forged, &set, &[], NOW, 0),
        Err(KeyError::UnsupportedAlgorithm(_))
    ));
    // Another P-256 key's signature under this kid fails.
    let other = KeyPair::generate_kind(Kind::EcdsaP256);
    let forged = other.sign_compact(&ec.header(), &claims()).expect("sign");
    assert_eq!(
        verify_token(&forged, &set, &[], NOW, 0),
        Err(KeyError::SignatureInvalid)
    );
}

#[test]
fn es256_high_s_signatures_verify_as_go_writes_them() {
    // Go's crypto/ecdsa (OPA) does not normalize S: (r, n - s) of a valid signature is accepted.
    let ec = KeyPair::from_pkcs8_pem(OPENSSL_P256).expect("key");
    let token = ec.sign_token(&claims()).expect("sign");
    let (input, sig) = token.rsplit_once('.').expect("parts");
    let sig = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).expect("b64"))
        .expect("sig");
    let (r, s) = sig.split_scalars();
    let high = p256::ecdsa::Signature::from_scalars(r, -*s).expect("high-S");
    let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(high.to_bytes()));
    assert!(verify_token(&flipped, &jwks(&[&ec]), &[], NOW, 0).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn any_bit_flip_of_an_es256_token_is_refused(pos in 0usize..400, bit in 0u8..8) {
        let ec = KeyPair::from_pkcs8_pem(OPENSSL_P256).expect("key");
        let token = ec.sign_token(&claims()).expect("sign");
        let mut bytes = token.clone().into_bytes();
        let i = pos % bytes.len();
        bytes[i] ^= 1 << bit;
        if let Ok(t) = String::from_utf8(bytes) && t != token {
            prop_assert!(verify_token(&t, &jwks(&[&ec]), &[], NOW, 0).is_err());
        }
    }
}
