//! Ed25519 key material: generation, PKCS#8 / SPKI PEM encoding, JWK / JWKS, key ids and
//! compact JWS tokens (`alg: EdDSA`, RFC 8037).
//!
//! Security rules enforced here:
//!
//! * private key bytes never appear in `Debug`/`Display` output or in [`KeyError`] messages;
//!   [`KeyPair`] and [`PublicKey`] print only their key id;
//! * private PEM output is returned as [`Zeroizing<String>`], and every intermediate buffer
//!   that holds the seed or its encoding is zeroized. The PKCS#8 document is assembled by hand
//!   (instead of through `pkcs8::KeypairBytes`, whose `zeroize` feature is not enabled in
//!   this build) so that no unzeroized copy is left behind;
//! * the PKCS#8 output is the RFC 8410 v1 form (no embedded public key), byte-for-byte what
//!   `openssl genpkey -algorithm ed25519` writes, for the widest interoperability. Both v1
//!   and v2 (with public key, which must then match the seed) are accepted on input;
//! * public keys with small order ("weak" keys) are rejected and signatures are verified
//!   with `verify_strict` (no malleable signatures).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::spki::DecodePublicKey as _;
use ed25519_dalek::pkcs8::{ALGORITHM_OID, PrivateKeyInfo, SecretDocument};
use ed25519_dalek::{
    PUBLIC_KEY_LENGTH, SECRET_KEY_LENGTH, Signature, Signer as _, SigningKey, VerifyingKey,
};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
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

/// DER prefix of an RFC 8410 PKCS#8 v1 Ed25519 private key; the 32-byte seed follows.
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }`
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const PKCS8_V1_LEN: usize = PKCS8_V1_PREFIX.len() + SECRET_KEY_LENGTH;
/// base64 (with padding) length of the 48-byte PKCS#8 document: 48 / 3 * 4.
const PKCS8_V1_B64_LEN: usize = PKCS8_V1_LEN / 3 * 4;

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte public key follows.
/// `SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING (0 unused bits) }`
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

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

    /// Encode as an RFC 8410 PKCS#8 v1 PEM (`-----BEGIN PRIVATE KEY-----`), LF line endings.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        let mut der = Zeroizing::new([0u8; PKCS8_V1_LEN]);
        der[..PKCS8_V1_PREFIX.len()].copy_from_slice(&PKCS8_V1_PREFIX);
        der[PKCS8_V1_PREFIX.len()..].copy_from_slice(self.signing.as_bytes());

        // `encode_slice` writes straight into our zeroized buffer (no internal copies).
        let mut b64 = Zeroizing::new([0u8; PKCS8_V1_B64_LEN]);
        let written = STANDARD
            .encode_slice(&der[..], &mut b64[..])
            // Infallible: 48 input bytes always encode to exactly 64 bytes, the buffer size.
            .expect("base64 buffer sized for the fixed-length PKCS#8 document");

        let begin = "-----BEGIN PRIVATE KEY-----\n";
        let end = "\n-----END PRIVATE KEY-----\n";
        // Exact capacity: the string never reallocates, so no unzeroized copy is left behind.
        let mut pem = Zeroizing::new(String::with_capacity(begin.len() + written + end.len()));
        pem.push_str(begin);
        // 64 characters fit on a single PEM line.
        for &byte in &b64[..written] {
            pem.push(char::from(byte));
        }
        pem.push_str(end);
        pem
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

    /// Sign an arbitrary header and claims (the header is not checked against this key).
    pub(crate) fn sign_compact(
        &self,
        header: &TokenHeader,
        claims: &TokenClaims,
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

    /// Encode as a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), LF line endings.
    pub fn to_spki_pem(&self) -> String {
        let mut der = Vec::with_capacity(SPKI_PREFIX.len() + PUBLIC_KEY_LENGTH);
        der.extend_from_slice(&SPKI_PREFIX);
        der.extend_from_slice(self.key.as_bytes());
        // 44 DER bytes encode to 60 base64 characters: a single PEM line.
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
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
mod tests {
    use super::*;
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
            signing: SigningKey::from_bytes(seed),
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
        assert_eq!(back.signing.to_bytes(), key.signing.to_bytes());
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
        let v2 = key.signing.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert_ne!(*v2, *key.to_pkcs8_pem());
        assert_eq!(KeyPair::from_pkcs8_pem(&v2).unwrap().key_id(), key.key_id());

        let other = KeyPair::generate();
        let mismatched = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: key.signing.to_bytes(),
            public_key: Some(ed25519_dalek::pkcs8::PublicKeyBytes(
                other.public_key().key.to_bytes(),
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
                .key
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
            key.signing.sign(signing_input.as_bytes()).to_bytes()[..],
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
        let seed = key.signing.to_bytes();
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
}
