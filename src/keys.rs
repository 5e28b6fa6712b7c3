//! Ed25519 key material: generation, PKCS#8 / SPKI PEM encoding, JWK / JWKS, key ids and
//! compact JWS tokens (`alg: EdDSA`, RFC 8037).
//!
//! Security rules enforced here:
//!
//! * private key bytes never appear in `Debug`/`Display` output or in [`KeyError`] messages;
//!   [`KeyPair`] and [`PublicKey`] print only their key id;
//! * private PEM output is returned as [`Zeroizing<String>`], and every intermediate buffer
//!   that holds the seed or its encoding is zeroized: the documents are the `pkcs8` and `spki`
//!   crates' types (`SecretDocument` zeroizes), not `pkcs8::KeypairBytes` (whose `zeroize`
//!   feature is not enabled in this build, and whose encoder would embed the public key);
//! * the PKCS#8 output is the RFC 8410 v1 form (no embedded public key), byte-for-byte what
//!   `openssl genpkey -algorithm ed25519` writes, for the widest interoperability. Both v1
//!   and v2 (with public key, which must then match the seed) are accepted on input;
//! * public keys with small order ("weak" keys) are rejected and signatures are verified
//!   with `verify_strict` (no malleable signatures).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::ALGORITHM_OID;
use ed25519_dalek::{
    PUBLIC_KEY_LENGTH, SECRET_KEY_LENGTH, Signature, Signer as _, SigningKey, VerifyingKey,
};
use pkcs8::{LineEnding, PrivateKeyInfo, SecretDocument};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use spki::{AlgorithmIdentifierRef, DecodePublicKey as _, EncodePublicKey as _};
use zeroize::Zeroizing;

/// JWS `alg` value for Ed25519 signatures (RFC 8037).
pub const JWS_ALG: &str = "EdDSA";
/// JWK `kty` for Ed25519 keys (RFC 8037).
pub const JWK_KTY: &str = "OKP";
/// JWK `crv` for Ed25519 keys (RFC 8037).
pub const JWK_CRV: &str = "Ed25519";
/// JWK `use` for signing keys.
pub const JWK_USE_SIG: &str = "sig";
/// JWT `typ` header value we emit.
pub const JWT_TYP: &str = "JWT";
/// Upper bound on the length of a compact JWS we are willing to parse.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

const PRIVATE_PEM_LABEL: &str = "PRIVATE KEY";

/// Errors of this module. Messages never contain key bytes; identifiers taken from untrusted
/// input (a token's `kid`, `alg`) are truncated and escaped before they are stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The private key could not be parsed or is not an Ed25519 PKCS#8 key.
    #[error("invalid private key: {0}")]
    InvalidPrivateKey(&'static str),
    /// The public key (SPKI PEM or JWK) could not be parsed or is not acceptable.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(&'static str),
    /// A JWK's `kid` is not the RFC 7638 thumbprint of its key.
    #[error("JWK kid {claimed} does not match the key's thumbprint {actual}")]
    KeyIdMismatch { claimed: String, actual: String },
    /// The token is not a well-formed compact JWS with our header and claims.
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    /// The token header names an algorithm other than `EdDSA`.
    #[error("unsupported token algorithm {0} (only EdDSA is accepted)")]
    UnsupportedAlgorithm(String),
    /// The signature does not verify under the key.
    #[error("signature verification failed")]
    SignatureInvalid,
    /// The token's `kid` is not in the trusted key set.
    #[error("token key id {0} is not trusted")]
    UnknownKeyId(String),
    /// The token's `kid` is revoked.
    #[error("token key id {0} is revoked")]
    TokenRevoked(String),
    /// `now >= exp + leeway`.
    #[error("token expired (exp {exp}, now {now})")]
    TokenExpired { exp: i64, now: i64 },
    /// `now < nbf - leeway`.
    #[error("token not yet valid (nbf {nbf}, now {now})")]
    TokenNotYetValid { nbf: i64, now: i64 },
    /// JSON serialization of a header or claims failed (should not happen).
    #[error("could not serialize token: {0}")]
    Serialization(&'static str),
}

impl KeyError {
    /// A PascalCase reason, suitable for Kubernetes Event reasons and status conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyError::InvalidPrivateKey(_) => "InvalidPrivateKey",
            KeyError::InvalidPublicKey(_) => "InvalidPublicKey",
            KeyError::KeyIdMismatch { .. } => "KeyIdMismatch",
            KeyError::InvalidToken(_) => "InvalidToken",
            KeyError::UnsupportedAlgorithm(_) => "UnsupportedAlgorithm",
            KeyError::SignatureInvalid => "SignatureInvalid",
            KeyError::UnknownKeyId(_) => "UnknownKeyId",
            KeyError::TokenRevoked(_) => "TokenRevoked",
            KeyError::TokenExpired { .. } => "TokenExpired",
            KeyError::TokenNotYetValid { .. } => "TokenNotYetValid",
            KeyError::Serialization(_) => "SerializationFailed",
        }
    }
}

/// Make an identifier from untrusted input safe to put in an error message / log line:
/// at most 64 characters, control and non-ASCII characters escaped.
pub(crate) fn sanitize_ident(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_default).collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// An Ed25519 signing key. The seed is zeroized on drop (by `ed25519-dalek`).
pub struct KeyPair {
    signing: SigningKey,
}

impl KeyPair {
    /// Generate a fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        KeyPair {
            signing: SigningKey::generate(&mut OsRng),
        }
    }

    /// The key of a given 32-byte seed: for fixtures and fuzz corpora only (a real key comes
    /// from [`KeyPair::generate`]).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        KeyPair {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// Parse an unencrypted PKCS#8 (`-----BEGIN PRIVATE KEY-----`) Ed25519 key, v1 or v2.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        // `SecretDocument` zeroizes the decoded DER on drop.
        let (label, doc) = SecretDocument::from_pem(pem.trim())
            .map_err(|_| KeyError::InvalidPrivateKey("not a valid PEM document"))?;
        if label != PRIVATE_PEM_LABEL {
            return Err(KeyError::InvalidPrivateKey(
                "expected an unencrypted PKCS#8 \"PRIVATE KEY\" PEM block",
            ));
        }
        let info = PrivateKeyInfo::try_from(doc.as_bytes())
            .map_err(|_| KeyError::InvalidPrivateKey("malformed PKCS#8 structure"))?;
        if info.algorithm.oid != ALGORITHM_OID {
            return Err(KeyError::InvalidPrivateKey("not an Ed25519 key"));
        }
        if info.algorithm.parameters.is_some() {
            return Err(KeyError::InvalidPrivateKey(
                "Ed25519 algorithm identifier must not have parameters",
            ));
        }
        // RFC 8410: the private key is an OCTET STRING wrapped in the PKCS#8 OCTET STRING.
        let seed_bytes = match info.private_key {
            [0x04, 0x20, rest @ ..] if rest.len() == SECRET_KEY_LENGTH => rest,
            _ => return Err(KeyError::InvalidPrivateKey("malformed Ed25519 private key")),
        };
        let mut seed = Zeroizing::new([0u8; SECRET_KEY_LENGTH]);
        seed.copy_from_slice(seed_bytes);
        let signing = SigningKey::from_bytes(&seed);
        if let Some(public) = info.public_key
            && public != signing.verifying_key().as_bytes()
        {
            return Err(KeyError::InvalidPrivateKey(
                "embedded public key does not match the private key",
            ));
        }
        Ok(KeyPair { signing })
    }

    /// Encode as an RFC 8410 PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`), LF line endings,
    /// through the `pkcs8` crate's types: a `PrivateKeyInfo` without the public key (v1, what
    /// openssl writes; `ed25519-dalek`'s own encoder embeds the public key, v2), encoded into a
    /// `SecretDocument` (zeroized on drop) and written as PEM into a `Zeroizing<String>`. The
    /// only other copy of the seed is the inner OCTET STRING, in a zeroized buffer.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        // RFC 8410: the private key is an OCTET STRING (04 20 <seed>) inside PKCS#8's.
        let mut inner = Zeroizing::new([0u8; 2 + SECRET_KEY_LENGTH]);
        inner[..2].copy_from_slice(&[0x04, 0x20]);
        inner[2..].copy_from_slice(self.signing.as_bytes());
        let info = PrivateKeyInfo {
            algorithm: AlgorithmIdentifierRef {
                oid: ALGORITHM_OID,
                parameters: None,
            },
            private_key: &inner[..],
            public_key: None,
        };
        SecretDocument::encode_msg(&info)
            .and_then(|doc| doc.to_pem(PRIVATE_PEM_LABEL, LineEnding::LF))
            // Infallible: a fixed 48-byte structure whose every field is valid.
            .expect("a PKCS#8 v1 Ed25519 document always encodes")
    }

    /// The public half of this key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            key: self.signing.verifying_key(),
        }
    }

    /// RFC 7638 JWK thumbprint of the public key.
    pub fn key_id(&self) -> String {
        self.public_key().key_id()
    }

    /// Sign `claims` as a compact JWS with header `{"alg":"EdDSA","typ":"JWT","kid":<key id>}`.
    pub fn sign_token(&self, claims: &TokenClaims) -> Result<String, KeyError> {
        let header = TokenHeader {
            alg: JWS_ALG.to_owned(),
            typ: Some(JWT_TYP.to_owned()),
            kid: self.key_id(),
            crit: None,
        };
        self.sign_compact(&header, claims)
    }

    /// [`sign_token`](Self::sign_token) with static claims added beside the registered ones
    /// (a name the registered claims use is never overwritten: the caller validated them).
    pub fn sign_token_with(
        &self,
        claims: &TokenClaims,
        extra: &std::collections::BTreeMap<String, String>,
    ) -> Result<String, KeyError> {
        if extra.is_empty() {
            return self.sign_token(claims);
        }
        let header = TokenHeader {
            alg: JWS_ALG.to_owned(),
            typ: Some(JWT_TYP.to_owned()),
            kid: self.key_id(),
            crit: None,
        };
        let mut payload = serde_json::to_value(claims)
            .map_err(|_| KeyError::Serialization("token claims are not serializable"))?;
        if let Some(map) = payload.as_object_mut() {
            for (k, v) in extra {
                map.entry(k.clone())
                    .or_insert_with(|| serde_json::Value::String(v.clone()));
            }
        }
        self.sign_compact(&header, &payload)
    }

    /// Sign an arbitrary header and claims (the header is not checked against this key).
    pub(crate) fn sign_compact(
        &self,
        header: &TokenHeader,
        claims: &impl Serialize,
    ) -> Result<String, KeyError> {
        let header_json = serde_json::to_vec(header)
            .map_err(|_| KeyError::Serialization("token header is not serializable"))?;
        let claims_json = serde_json::to_vec(claims)
            .map_err(|_| KeyError::Serialization("token claims are not serializable"))?;
        let mut token = URL_SAFE_NO_PAD.encode(header_json);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(claims_json, &mut token);
        let signature = self.signing.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
        Ok(token)
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("kid", &self.key_id())
            .finish()
    }
}

/// An Ed25519 public key (never a small-order "weak" key).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
}

impl PublicKey {
    fn from_raw(bytes: &[u8; PUBLIC_KEY_LENGTH]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::InvalidPublicKey("not a valid Ed25519 point"))?;
        if key.is_weak() {
            return Err(KeyError::InvalidPublicKey("small-order (weak) Ed25519 key"));
        }
        Ok(PublicKey { key })
    }

    /// base64url (no padding) of the raw 32-byte key: the JWK `x` member.
    fn x(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.key.as_bytes())
    }

    /// RFC 7638 JWK thumbprint: base64url-no-pad(SHA-256(`{"crv":"Ed25519","kty":"OKP","x":…}`)).
    pub fn key_id(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"{JWK_CRV}","kty":"{JWK_KTY}","x":"{}"}}"#,
            self.x()
        );
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// `SHA256:` + unpadded standard base64 of SHA-256 over the raw 32-byte public key.
    ///
    /// This uses OpenSSH's *format*, but hashes the raw key rather than the SSH wire blob, so
    /// it is not the value `ssh-keygen -l` prints for the same key.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(self.key.as_bytes()))
        )
    }

    /// Encode as a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), LF line endings,
    /// through the `spki` crate's encoder (`EncodePublicKey`).
    pub fn to_spki_pem(&self) -> String {
        self.key
            .to_public_key_pem(LineEnding::LF)
            // Infallible: a fixed 44-byte structure.
            .expect("an Ed25519 SubjectPublicKeyInfo always encodes")
    }

    /// Parse a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`) holding an Ed25519 key.
    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_public_key_pem(pem.trim())
            .map_err(|_| KeyError::InvalidPublicKey("not an Ed25519 SubjectPublicKeyInfo PEM"))?;
        Self::from_raw(key.as_bytes())
    }

    /// The JWK (`kty` OKP, `crv` Ed25519, `x`, `kid` = thumbprint, `use` sig, `alg` EdDSA).
    pub fn to_jwk(&self) -> Jwk {
        Jwk {
            kty: JWK_KTY.to_owned(),
            crv: JWK_CRV.to_owned(),
            x: self.x(),
            kid: Some(self.key_id()),
            use_: Some(JWK_USE_SIG.to_owned()),
            alg: Some(JWS_ALG.to_owned()),
        }
    }

    /// Parse an Ed25519 JWK. `use` and `alg`, if present, must be `sig` and `EdDSA`; `kid`, if
    /// present, must equal the RFC 7638 thumbprint.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        if jwk.kty != JWK_KTY {
            return Err(KeyError::InvalidPublicKey("JWK kty must be OKP"));
        }
        if jwk.crv != JWK_CRV {
            return Err(KeyError::InvalidPublicKey("JWK crv must be Ed25519"));
        }
        if jwk.use_.as_deref().is_some_and(|u| u != JWK_USE_SIG) {
            return Err(KeyError::InvalidPublicKey("JWK use must be sig"));
        }
        if jwk.alg.as_deref().is_some_and(|a| a != JWS_ALG) {
            return Err(KeyError::InvalidPublicKey("JWK alg must be EdDSA"));
        }
        let raw = URL_SAFE_NO_PAD
            .decode(jwk.x.as_bytes())
            .map_err(|_| KeyError::InvalidPublicKey("JWK x is not unpadded base64url"))?;
        let raw: [u8; PUBLIC_KEY_LENGTH] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::InvalidPublicKey("JWK x must be 32 bytes"))?;
        let key = Self::from_raw(&raw)?;
        if let Some(kid) = &jwk.kid {
            let actual = key.key_id();
            if *kid != actual {
                return Err(KeyError::KeyIdMismatch {
                    claimed: sanitize_ident(kid),
                    actual,
                });
            }
        }
        Ok(key)
    }

    /// Verify a raw Ed25519 signature (strict: rejects non-canonical signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        let signature = Signature::from_slice(signature).map_err(|_| KeyError::SignatureInvalid)?;
        self.key
            .verify_strict(message, &signature)
            .map_err(|_| KeyError::SignatureInvalid)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.key_id())
            .finish()
    }
}

/// An Ed25519 JSON Web Key (RFC 8037). Public keys only: there is deliberately no `d` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kid: Option<String>,
    #[serde(rename = "use", skip_serializing_if = "Option::is_none", default)]
    pub use_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub alg: Option<String>,
}

/// A JSON Web Key Set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The first key whose explicit `kid` equals `kid` (keys without `kid` never match).
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// The explicit `kid`s of the keys, in order (keys without `kid` are skipped).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }
}

/// Claims of a provisioning token. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// JOSE header of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHeader {
    pub alg: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub typ: Option<String>,
    pub kid: String,
    /// RFC 7515 4.1.11: extensions the recipient must understand. Keyward understands none, so
    /// a token that carries `crit` at all is refused (read only to refuse it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub crit: Option<serde_json::Value>,
}

/// The three segments of a compact JWS, with header and claims decoded.
struct ParsedToken<'a> {
    header: TokenHeader,
    claims: TokenClaims,
    signing_input: &'a str,
    signature: &'a str,
}

const BAD_SEGMENTS: KeyError = KeyError::InvalidToken("expected three dot-separated segments");

fn parse_token(token: &str) -> Result<ParsedToken<'_>, KeyError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(KeyError::InvalidToken("token is too long"));
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(BAD_SEGMENTS)?;
    let (header_b64, claims_b64) = signing_input.split_once('.').ok_or(BAD_SEGMENTS)?;
    if claims_b64.contains('.') {
        return Err(BAD_SEGMENTS);
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| KeyError::InvalidToken("header is not unpadded base64url"))?;
    let header: TokenHeader = serde_json::from_slice(&header_json)
        .map_err(|_| KeyError::InvalidToken("header is not a valid JOSE header"))?;
    let claims_json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| KeyError::InvalidToken("payload is not unpadded base64url"))?;
    let claims: TokenClaims = serde_json::from_slice(&claims_json)
        .map_err(|_| KeyError::InvalidToken("payload is not a valid claims object"))?;
    Ok(ParsedToken {
        header,
        claims,
        signing_input,
        signature,
    })
}

/// The claims of `token` beyond the registered ones Keyward reads (`iss`, `sub`, `aud`, `iat`,
/// `nbf`, `exp`, `jti`), WITHOUT verifying: call it only on a token whose signature was checked.
pub fn custom_claims(token: &str) -> Result<serde_json::Map<String, serde_json::Value>, KeyError> {
    let parsed = parse_token(token)?;
    let claims_b64 = parsed
        .signing_input
        .split_once('.')
        .map(|(_, c)| c)
        .ok_or(BAD_SEGMENTS)?;
    let json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| KeyError::InvalidToken("payload is not unpadded base64url"))?;
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|_| KeyError::InvalidToken("payload is not a valid claims object"))?;
    for registered in ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"] {
        map.remove(registered);
    }
    Ok(map)
}

/// Whether a claim value grants `want`: a string whose space-separated items include it (as
/// OAuth's `scope`), or an array with it as an element.
pub fn claim_grants(value: &serde_json::Value, want: &str) -> bool {
    match value {
        serde_json::Value::String(s) => s.split(' ').any(|item| item == want),
        serde_json::Value::Array(items) => items.iter().any(|i| i.as_str() == Some(want)),
        _ => false,
    }
}

/// Parse header and claims WITHOUT verifying (used to read `exp`/`kid` of a token we issued).
/// Never base an authorization decision on the result.
pub fn decode_token_unverified(token: &str) -> Result<(TokenHeader, TokenClaims), KeyError> {
    let parsed = parse_token(token)?;
    Ok((parsed.header, parsed.claims))
}

/// Verify a compact JWS against a JWKS and return its header and claims.
///
/// Checks, in order: well-formedness; `alg` is `EdDSA` (and `typ`, if present, is `JWT`);
/// if `kid` is in `trusted`, the JWK is valid and the signature verifies, then that `kid` is
/// not in `revoked`; if `kid` is not in `trusted`, the result is [`KeyError::TokenRevoked`]
/// when it is in `revoked` and [`KeyError::UnknownKeyId`] otherwise (in both cases the
/// signature could not be checked, so these errors do not prove the token is genuine); finally
/// `nbf - leeway <= now < exp + leeway` (unix seconds; a negative leeway counts as zero).
pub fn verify_token(
    token: &str,
    trusted: &Jwks,
    revoked: &[String],
    now: i64,
    leeway: i64,
) -> Result<(TokenHeader, TokenClaims), KeyError> {
    let parsed = parse_token(token)?;
    let header = &parsed.header;
    if header.alg != JWS_ALG {
        return Err(KeyError::UnsupportedAlgorithm(sanitize_ident(&header.alg)));
    }
    if header
        .typ
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case(JWT_TYP))
    {
        return Err(KeyError::InvalidToken("typ must be JWT"));
    }
    if header.crit.is_some() {
        return Err(KeyError::InvalidToken("crit is not supported"));
    }
    let is_revoked = revoked.contains(&header.kid);
    let Some(jwk) = trusted.find(&header.kid) else {
        return Err(if is_revoked {
            KeyError::TokenRevoked(sanitize_ident(&header.kid))
        } else {
            KeyError::UnknownKeyId(sanitize_ident(&header.kid))
        });
    };
    let key = PublicKey::from_jwk(jwk)?;

    let signature = URL_SAFE_NO_PAD
        .decode(parsed.signature)
        .map_err(|_| KeyError::InvalidToken("signature is not unpadded base64url"))?;
    // A signature of the wrong length is reported as SignatureInvalid by `verify`.
    key.verify(parsed.signing_input.as_bytes(), &signature)?;
    if is_revoked {
        return Err(KeyError::TokenRevoked(sanitize_ident(&header.kid)));
    }

    let leeway = leeway.max(0);
    let claims = &parsed.claims;
    if now < claims.nbf.saturating_sub(leeway) {
        return Err(KeyError::TokenNotYetValid {
            nbf: claims.nbf,
            now,
        });
    }
    if now >= claims.exp.saturating_add(leeway) {
        return Err(KeyError::TokenExpired {
            exp: claims.exp,
            now,
        });
    }
    Ok((parsed.header, parsed.claims))
}

#[cfg(test)]
mod tests;
