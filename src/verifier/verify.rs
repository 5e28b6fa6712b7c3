//! The decision on one bearer token, pure: token, index, clock and policy in, a [`Verified`]
//! or a [`Refusal`] out. Messages name key ids and key names only, never token or key bytes.

use std::time::Duration;

use crate::keys::{self, JWS_ALG, KeyError};

use super::index::{Index, KeyRef};

/// Checks beyond the bundle, from the verifier's flags.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Clock skew allowed on `nbf` and `exp` (both directions).
    pub clock_skew: Duration,
    /// Require this `aud` instead of the key's `spec.token.audience` (default `keyward`).
    pub audience: Option<String>,
    /// Require this `iss` instead of the key's `spec.token.issuer` (default `keyward`).
    pub issuer: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            clock_skew: DEFAULT_CLOCK_SKEW,
            audience: None,
            issuer: None,
        }
    }
}

/// Default of `--clock-skew`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// An accepted token: which key, which key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub key: KeyRef,
    pub kid: String,
    pub exp: i64,
}

/// Why a request is refused. 401 for anything that fails authentication; 403 for a genuine
/// token of a key this route does not accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token in the Authorization header")]
    MissingToken,
    #[error("the Authorization header is not `Bearer <token>`")]
    MalformedAuthorization,
    #[error("token: {0}")]
    Token(#[from] KeyError),
    #[error("token subject is not <namespace>/<name> of a ProvisioningKey")]
    BadSubject,
    #[error("no trust bundle is known for ProvisioningKey {0}")]
    UnknownKey(String),
    #[error("token audience does not match what ProvisioningKey {0} issues")]
    WrongAudience(String),
    #[error("token issuer does not match what ProvisioningKey {0} issues")]
    WrongIssuer(String),
    #[error("token of ProvisioningKey {actual} is not accepted here (expected {expected})")]
    KeyNotAccepted { expected: String, actual: String },
}

impl Refusal {
    /// PascalCase reason, for the `X-Keyward-Reason` header, logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::MissingToken => "MissingToken",
            Refusal::MalformedAuthorization => "MalformedAuthorization",
            Refusal::Token(e) => e.reason(),
            Refusal::BadSubject => "BadSubject",
            Refusal::UnknownKey(_) => "UnknownKey",
            Refusal::WrongAudience(_) => "WrongAudience",
            Refusal::WrongIssuer(_) => "WrongIssuer",
            Refusal::KeyNotAccepted { .. } => "KeyNotAccepted",
        }
    }

    /// 401 (not authenticated) or 403 (authenticated, not accepted here).
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::KeyNotAccepted { .. } => http::StatusCode::FORBIDDEN,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&http::HeaderValue>) -> Result<&str, Refusal> {
    let value = header.ok_or(Refusal::MissingToken)?;
    let value = value
        .to_str()
        .map_err(|_| Refusal::MalformedAuthorization)?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Refusal::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Refusal::MalformedAuthorization);
    }
    Ok(token)
}

/// Verifies `token` against the bundle of the ProvisioningKey its `sub` names:
/// 1. `alg` is EdDSA (`none`, HS*, RS*, ... are refused before anything else is read);
/// 2. `sub` names a key whose bundle is known;
/// 3. the `kid` is in that bundle's JWKS, the signature verifies, the `kid` is not revoked
///    (a revoked kid is refused even if a stale JWKS still lists it);
/// 4. `nbf - skew <= now < exp + skew`;
/// 5. `aud` and `iss` are what the key issues (or what the policy requires);
/// 6. when `expect` is given, the key is that one (else 403).
pub fn verify(
    token: &str,
    index: &Index,
    expect: Option<&KeyRef>,
    now: i64,
    policy: &Policy,
) -> Result<Verified, Refusal> {
    // Unverified read of header and claims only to find the bundle; nothing below trusts
    // them before `keys::verify_token` has checked the signature.
    let (header, claims) = keys::decode_token_unverified(token)?;
    if header.alg != JWS_ALG {
        return Err(KeyError::UnsupportedAlgorithm(keys::sanitize_ident(&header.alg)).into());
    }
    let key = KeyRef::parse(&claims.sub).ok_or(Refusal::BadSubject)?;
    let (params, bundle) = index
        .bundle(&key)
        .ok_or_else(|| Refusal::UnknownKey(key.to_string()))?;
    let skew = i64::try_from(policy.clock_skew.as_secs()).unwrap_or(i64::MAX / 2);
    let (header, claims) = keys::verify_token(token, &bundle.jwks, &bundle.revoked, now, skew)?;
    let audience = policy.audience.as_deref().unwrap_or(&params.audience);
    if claims.aud != audience {
        return Err(Refusal::WrongAudience(key.to_string()));
    }
    let issuer = policy.issuer.as_deref().unwrap_or(&params.issuer);
    if claims.iss != issuer {
        return Err(Refusal::WrongIssuer(key.to_string()));
    }
    if let Some(expected) = expect
        && *expected != key
    {
        return Err(Refusal::KeyNotAccepted {
            expected: expected.to_string(),
            actual: key.to_string(),
        });
    }
    Ok(Verified {
        key,
        kid: header.kid,
        exp: claims.exp,
    })
}
