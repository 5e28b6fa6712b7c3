//! Key material: generation, PKCS#8 / SPKI PEM encoding, JWK / JWKS, key ids and compact JWS
//! tokens. Ed25519 (`alg: EdDSA`, RFC 8037) by default; ECDSA P-256 (`alg: ES256`, RFC 7518)
//! for clients that cannot sign EdDSA (OPA's OAuth2 client assertions, for one). A token's `alg`
//! must be the one of the key its `kid` names: a key never verifies under another algorithm.
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
/// JWS `alg` value for ECDSA P-256 signatures (RFC 7518).
pub const JWS_ALG_ES256: &str = "ES256";
/// JWK `kty` and `crv` of ECDSA P-256 keys (RFC 7518).
pub const JWK_KTY_EC: &str = "EC";
pub const JWK_CRV_P256: &str = "P-256";

/// Whether `alg` is a JWS algorithm Keyward signs and verifies.
pub fn supported_alg(alg: &str) -> bool {
    alg == JWS_ALG || alg == JWS_ALG_ES256
}
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
    /// The token header names an algorithm other than `EdDSA` and `ES256`, or not the one of
    /// the key its `kid` names.
    #[error("unsupported token algorithm {0} (EdDSA or ES256, the one of the signing key)")]
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

/// Which kind of key: the ProvisioningKey's `spec.algorithm`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kind {
    #[default]
    Ed25519,
    EcdsaP256,
}

impl Kind {
    /// The JWS `alg` of this kind's signatures.
    pub fn alg(self) -> &'static str {
        match self {
            Kind::Ed25519 => JWS_ALG,
            Kind::EcdsaP256 => JWS_ALG_ES256,
        }
    }
}

impl From<crate::api::provisioning_key::Algorithm> for Kind {
    fn from(a: crate::api::provisioning_key::Algorithm) -> Self {
        match a {
            crate::api::provisioning_key::Algorithm::Ed25519 => Kind::Ed25519,
            crate::api::provisioning_key::Algorithm::ECDSAP256 => Kind::EcdsaP256,
        }
    }
}

/// A signing key: Ed25519 (the seed is zeroized on drop by `ed25519-dalek`) or ECDSA P-256
/// (the scalar is zeroized on drop by `elliptic-curve`).
pub struct KeyPair {
    signing: Signing,
}

enum Signing {
    Ed25519(SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// The DER OID of id-ecPublicKey (RFC 5480) and of the P-256 curve.
const EC_PUBLIC_KEY_OID: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256_OID: pkcs8::ObjectIdentifier =
    pkcs8::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

impl KeyPair {
    /// Generate a fresh Ed25519 key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self::generate_kind(Kind::Ed25519)
    }

    /// Generate a fresh key of `kind` from the operating system's CSPRNG.
    pub fn generate_kind(kind: Kind) -> Self {
        let signing = match kind {
            Kind::Ed25519 => Signing::Ed25519(SigningKey::generate(&mut OsRng)),
            Kind::EcdsaP256 => Signing::P256(p256::ecdsa::SigningKey::random(&mut OsRng)),
        };
        KeyPair { signing }
    }

    /// Which kind of key this is.
    pub fn kind(&self) -> Kind {
        match self.signing {
            Signing::Ed25519(_) => Kind::Ed25519,
            Signing::P256(_) => Kind::EcdsaP256,
        }
    }

    /// The Ed25519 key of a given 32-byte seed: for fixtures and fuzz corpora only (a real key
    /// comes from [`KeyPair::generate`]).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        KeyPair {
            signing: Signing::Ed25519(SigningKey::from_bytes(seed)),
        }
    }

    /// Parse an unencrypted PKCS#8 (`-----BEGIN PRIVATE KEY-----`) key: Ed25519 (v1 or v2) or
    /// ECDSA P-256.
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
        if info.algorithm.oid == EC_PUBLIC_KEY_OID {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(|_| KeyError::InvalidPrivateKey("EC key without a named curve"))?;
            if curve != P256_OID {
                return Err(KeyError::InvalidPrivateKey("EC key not on the P-256 curve"));
            }
            use p256::pkcs8::DecodePrivateKey as _;
            let key = p256::ecdsa::SigningKey::from_pkcs8_der(doc.as_bytes())
                .map_err(|_| KeyError::InvalidPrivateKey("malformed P-256 private key"))?;
            return Ok(KeyPair {
                signing: Signing::P256(key),
            });
        }
        if info.algorithm.oid != ALGORITHM_OID {
            return Err(KeyError::InvalidPrivateKey(
                "neither an Ed25519 nor a P-256 key",
            ));
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
        Ok(KeyPair {
            signing: Signing::Ed25519(signing),
        })
    }

    /// Encode as a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), LF line endings.
    ///
    /// Ed25519: the RFC 8410 v1 form, through the `pkcs8` crate's types: a `PrivateKeyInfo`
    /// without the public key (v1, what openssl writes; `ed25519-dalek`'s own encoder embeds the
    /// public key, v2), encoded into a `SecretDocument` (zeroized on drop) and written as PEM
    /// into a `Zeroizing<String>`. The only other copy of the seed is the inner OCTET STRING, in
    /// a zeroized buffer. P-256: the `p256` crate's encoder (RFC 5915 inside PKCS#8, what
    /// `openssl genpkey -algorithm EC` writes), also into a `Zeroizing<String>`.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        let signing = match &self.signing {
            Signing::Ed25519(k) => k,
            Signing::P256(k) => {
                use p256::pkcs8::EncodePrivateKey as _;
                return k
                    .to_pkcs8_pem(LineEnding::LF)
                    // Infallible: a fixed structure whose every field is valid.
                    .expect("a PKCS#8 P-256 document always encodes");
            }
        };
        // RFC 8410: the private key is an OCTET STRING (04 20 <seed>) inside PKCS#8's.
        let mut inner = Zeroizing::new([0u8; 2 + SECRET_KEY_LENGTH]);
        inner[..2].copy_from_slice(&[0x04, 0x20]);
        inner[2..].copy_from_slice(signing.as_bytes());
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
        let key = match &self.signing {
            Signing::Ed25519(k) => Verifying::Ed25519(k.verifying_key()),
            Signing::P256(k) => Verifying::P256(*k.verifying_key()),
        };
        PublicKey { key }
    }

    /// RFC 7638 JWK thumbprint of the public key.
    pub fn key_id(&self) -> String {
        self.public_key().key_id()
    }

    /// Sign `claims` as a compact JWS with header `{"alg":<EdDSA|ES256>,"typ":"JWT","kid":<key id>}`.
    pub fn sign_token(&self, claims: &TokenClaims) -> Result<String, KeyError> {
        self.sign_compact(&self.header(), claims)
    }

    /// The JOSE header of this key's tokens.
    pub fn header(&self) -> TokenHeader {
        TokenHeader {
            alg: self.kind().alg().to_owned(),
            typ: Some(JWT_TYP.to_owned()),
            kid: self.key_id(),
            crit: None,
        }
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
        let mut payload = serde_json::to_value(claims)
            .map_err(|_| KeyError::Serialization("token claims are not serializable"))?;
        if let Some(map) = payload.as_object_mut() {
            for (k, v) in extra {
                map.entry(k.clone())
                    .or_insert_with(|| serde_json::Value::String(v.clone()));
            }
        }
        self.sign_compact(&self.header(), &payload)
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
        let signature = self.sign_raw(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }

    /// The raw JWS signature of `message`: 64 bytes, Ed25519's, or ES256's `r || s`
    /// (deterministic, RFC 6979, low-S).
    pub fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        match &self.signing {
            Signing::Ed25519(k) => k.sign(message).to_bytes().to_vec(),
            Signing::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                let sig = sig.normalize_s().unwrap_or(sig);
                sig.to_bytes().to_vec()
            }
        }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("kid", &self.key_id())
            .finish()
    }
}

/// A public key: Ed25519 (never a small-order "weak" key) or ECDSA P-256 (a valid curve
/// point, never the identity).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: Verifying,
}

#[derive(Clone, PartialEq, Eq)]
enum Verifying {
    Ed25519(VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    fn from_raw(bytes: &[u8; PUBLIC_KEY_LENGTH]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| KeyError::InvalidPublicKey("not a valid Ed25519 point"))?;
        if key.is_weak() {
            return Err(KeyError::InvalidPublicKey("small-order (weak) Ed25519 key"));
        }
        Ok(PublicKey {
            key: Verifying::Ed25519(key),
        })
    }

    /// Which kind of key this is.
    pub fn kind(&self) -> Kind {
        match self.key {
            Verifying::Ed25519(_) => Kind::Ed25519,
            Verifying::P256(_) => Kind::EcdsaP256,
        }
    }

    /// The raw public key: Ed25519's 32 bytes, or P-256's uncompressed SEC1 point (65 bytes).
    fn raw(&self) -> Vec<u8> {
        match &self.key {
            Verifying::Ed25519(k) => k.as_bytes().to_vec(),
            Verifying::P256(k) => k.to_encoded_point(false).as_bytes().to_vec(),
        }
    }

    /// The JWK coordinates, base64url (no padding): `x` (Ed25519's raw key), and `y` for P-256.
    fn coordinates(&self) -> (String, Option<String>) {
        match &self.key {
            Verifying::Ed25519(k) => (URL_SAFE_NO_PAD.encode(k.as_bytes()), None),
            Verifying::P256(k) => {
                let point = k.to_encoded_point(false);
                let (x, y) = (point.x(), point.y());
                (
                    x.map(|x| URL_SAFE_NO_PAD.encode(x)).unwrap_or_default(),
                    y.map(|y| URL_SAFE_NO_PAD.encode(y)),
                )
            }
        }
    }

    /// RFC 7638 JWK thumbprint: base64url-no-pad(SHA-256) of the required members in
    /// lexicographic order: `{"crv":"Ed25519","kty":"OKP","x":…}` or
    /// `{"crv":"P-256","kty":"EC","x":…,"y":…}`.
    pub fn key_id(&self) -> String {
        let canonical = match self.coordinates() {
            (x, None) => format!(r#"{{"crv":"{JWK_CRV}","kty":"{JWK_KTY}","x":"{x}"}}"#),
            (x, Some(y)) => {
                format!(r#"{{"crv":"{JWK_CRV_P256}","kty":"{JWK_KTY_EC}","x":"{x}","y":"{y}"}}"#)
            }
        };
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// `SHA256:` + unpadded standard base64 of SHA-256 over the raw public key (Ed25519's 32
    /// bytes, P-256's uncompressed point).
    ///
    /// This uses OpenSSH's *format*, but hashes the raw key rather than the SSH wire blob, so
    /// it is not the value `ssh-keygen -l` prints for the same key.
    pub fn fingerprint(&self) -> String {
        format!(
            "SHA256:{}",
            STANDARD_NO_PAD.encode(Sha256::digest(self.raw()))
        )
    }

    /// Encode as a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), LF line endings,
    /// through the `spki` crate's encoder (`EncodePublicKey`).
    pub fn to_spki_pem(&self) -> String {
        match &self.key {
            Verifying::Ed25519(k) => k.to_public_key_pem(LineEnding::LF),
            Verifying::P256(k) => k.to_public_key_pem(LineEnding::LF),
        }
        // Infallible: a fixed structure.
        .expect("a SubjectPublicKeyInfo always encodes")
    }

    /// Parse a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`) holding an Ed25519 or a
    /// P-256 key.
    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        if let Ok(key) = VerifyingKey::from_public_key_pem(pem.trim()) {
            return Self::from_raw(key.as_bytes());
        }
        let key = p256::ecdsa::VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| {
            KeyError::InvalidPublicKey("not an Ed25519 or P-256 SubjectPublicKeyInfo PEM")
        })?;
        Ok(PublicKey {
            key: Verifying::P256(key),
        })
    }

    /// The JWK: `kty` OKP, `crv` Ed25519, `x` (or `kty` EC, `crv` P-256, `x`, `y`), `kid` =
    /// thumbprint, `use` sig, `alg` EdDSA (or ES256).
    pub fn to_jwk(&self) -> Jwk {
        let (x, y) = self.coordinates();
        let (kty, crv) = match self.kind() {
            Kind::Ed25519 => (JWK_KTY, JWK_CRV),
            Kind::EcdsaP256 => (JWK_KTY_EC, JWK_CRV_P256),
        };
        Jwk {
            kty: kty.to_owned(),
            crv: crv.to_owned(),
            x,
            y,
            kid: Some(self.key_id()),
            use_: Some(JWK_USE_SIG.to_owned()),
            alg: Some(self.kind().alg().to_owned()),
        }
    }

    /// Parse an Ed25519 or P-256 JWK. `use` and `alg`, if present, must be `sig` and the key's
    /// algorithm; `kid`, if present, must equal the RFC 7638 thumbprint.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, KeyError> {
        let kind = match (jwk.kty.as_str(), jwk.crv.as_str()) {
            (JWK_KTY, JWK_CRV) => Kind::Ed25519,
            (JWK_KTY_EC, JWK_CRV_P256) => Kind::EcdsaP256,
            (JWK_KTY, _) => return Err(KeyError::InvalidPublicKey("JWK crv must be Ed25519")),
            (JWK_KTY_EC, _) => return Err(KeyError::InvalidPublicKey("JWK crv must be P-256")),
            _ => return Err(KeyError::InvalidPublicKey("JWK kty must be OKP or EC")),
        };
        if jwk.use_.as_deref().is_some_and(|u| u != JWK_USE_SIG) {
            return Err(KeyError::InvalidPublicKey("JWK use must be sig"));
        }
        if jwk.alg.as_deref().is_some_and(|a| a != kind.alg()) {
            return Err(KeyError::InvalidPublicKey(
                "JWK alg must be EdDSA (OKP) or ES256 (EC)",
            ));
        }
        let coordinate = |c: &str, len: usize, what: &'static str| {
            URL_SAFE_NO_PAD
                .decode(c.as_bytes())
                .ok()
                .filter(|b| b.len() == len)
                .ok_or(KeyError::InvalidPublicKey(what))
        };
        let key = match kind {
            Kind::Ed25519 => {
                if jwk.y.is_some() {
                    return Err(KeyError::InvalidPublicKey("an OKP JWK has no y"));
                }
                let raw = coordinate(&jwk.x, PUBLIC_KEY_LENGTH, "JWK x must be 32 bytes")?;
                let mut bytes = [0u8; PUBLIC_KEY_LENGTH];
                bytes.copy_from_slice(&raw);
                Self::from_raw(&bytes)?
            }
            Kind::EcdsaP256 => {
                let x = coordinate(&jwk.x, 32, "JWK x must be 32 bytes of base64url")?;
                let y = jwk
                    .y
                    .as_deref()
                    .ok_or(KeyError::InvalidPublicKey("an EC JWK needs y"))?;
                let y = coordinate(y, 32, "JWK y must be 32 bytes of base64url")?;
                let point = p256::EncodedPoint::from_affine_coordinates(
                    p256::FieldBytes::from_slice(&x),
                    p256::FieldBytes::from_slice(&y),
                    false,
                );
                let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| KeyError::InvalidPublicKey("not a valid P-256 point"))?;
                PublicKey {
                    key: Verifying::P256(key),
                }
            }
        };
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

    /// Verify a raw JWS signature: Ed25519 strictly (no non-canonical signatures), ES256 as
    /// the 64-byte `r || s` of RFC 7518 (not DER).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), KeyError> {
        match &self.key {
            Verifying::Ed25519(k) => {
                let signature =
                    Signature::from_slice(signature).map_err(|_| KeyError::SignatureInvalid)?;
                k.verify_strict(message, &signature)
                    .map_err(|_| KeyError::SignatureInvalid)
            }
            Verifying::P256(k) => {
                use p256::ecdsa::signature::Verifier as _;
                // High-S signatures are accepted: Go's crypto/ecdsa (OPA) does not normalize S,
                // and nothing here keys on signature bytes (replay is caught by `jti`).
                let signature = p256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| KeyError::SignatureInvalid)?;
                k.verify(message, &signature)
                    .map_err(|_| KeyError::SignatureInvalid)
            }
        }
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.key_id())
            .finish()
    }
}

/// A JSON Web Key: Ed25519 (RFC 8037) or P-256 (RFC 7518). Public keys only: there is
/// deliberately no `d` member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub y: Option<String>,
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
/// Checks, in order: well-formedness; `alg` is `EdDSA` or `ES256` (and `typ`, if present, is
/// `JWT`); if `kid` is in `trusted`, the JWK is valid, of the token's `alg`, and the signature
/// verifies, then that `kid` is
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
    if !supported_alg(&header.alg) {
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
    // The algorithm is the key's, never the token's choice.
    if key.kind().alg() != header.alg {
        return Err(KeyError::UnsupportedAlgorithm(sanitize_ident(&header.alg)));
    }

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

/// The JOSE header of a JWS that may carry no `kid` (a client assertion: OPA sends none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct JoseHeader {
    pub alg: String,
    #[serde(default)]
    pub typ: Option<String>,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub crit: Option<serde_json::Value>,
}

/// The header of a compact JWS, WITHOUT verifying (to choose the key it must verify under).
pub fn jose_header_unverified(token: &str) -> Result<JoseHeader, KeyError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(KeyError::InvalidToken("token is too long"));
    }
    let (header_b64, _) = token.split_once('.').ok_or(BAD_SEGMENTS)?;
    let json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| KeyError::InvalidToken("header is not unpadded base64url"))?;
    serde_json::from_slice(&json)
        .map_err(|_| KeyError::InvalidToken("header is not a valid JOSE header"))
}

/// Verifies a compact JWS's signature under `key` (its `alg` must be the key's; `typ`, if
/// present, `JWT`; no `crit`) and returns its claims as a JSON object. No claim is checked:
/// the caller checks the ones its protocol defines.
pub fn verify_jws(
    token: &str,
    key: &PublicKey,
) -> Result<serde_json::Map<String, serde_json::Value>, KeyError> {
    let header = jose_header_unverified(token)?;
    if !supported_alg(&header.alg) || key.kind().alg() != header.alg {
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
    let (signing_input, signature) = token.rsplit_once('.').ok_or(BAD_SEGMENTS)?;
    let (_, claims_b64) = signing_input.split_once('.').ok_or(BAD_SEGMENTS)?;
    if claims_b64.contains('.') {
        return Err(BAD_SEGMENTS);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| KeyError::InvalidToken("signature is not unpadded base64url"))?;
    key.verify(signing_input.as_bytes(), &signature)?;
    let json = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| KeyError::InvalidToken("payload is not unpadded base64url"))?;
    serde_json::from_slice(&json)
        .map_err(|_| KeyError::InvalidToken("payload is not a valid claims object"))
}

#[cfg(test)]
impl KeyPair {
    /// The Ed25519 signing key (tests of Ed25519 keys only).
    fn ed(&self) -> &SigningKey {
        match &self.signing {
            Signing::Ed25519(k) => k,
            Signing::P256(_) => panic!("not an Ed25519 key"),
        }
    }
}

#[cfg(test)]
impl PublicKey {
    /// The Ed25519 verifying key (tests of Ed25519 keys only).
    fn ed(&self) -> &VerifyingKey {
        match &self.key {
            Verifying::Ed25519(k) => k,
            Verifying::P256(_) => panic!("not an Ed25519 key"),
        }
    }
}

#[cfg(test)]
mod tests;
