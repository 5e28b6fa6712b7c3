//! The decision on one bearer token, pure: token, index, clock and policy in, a [`Verified`]
//! or a [`Refusal`] out. Messages name key ids and key names only, never token or key bytes.

use std::time::Duration;

use crate::keys::{self, KeyError};

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
    /// No token lives longer than this (`exp - iat`), whatever a key's `spec.token.ttl` says:
    /// the CRD's ceiling on `ttl`.
    pub max_token_ttl: Duration,
    /// `--require-claim`: claims every route requires (on top of a route's own).
    pub required_claims: Vec<RequiredClaim>,
    /// The token endpoint's access tokens (`--token-endpoint-url`), accepted when set.
    pub access: Option<super::oauth::AccessPolicy>,
}

/// A claim a route requires: the token's claim `name` must grant `value` (a space-separated
/// string holding it, as OAuth's `scope`, or an array with it), and so must the key's trust
/// record, so a consumer holding the private key cannot grant itself what the operator does not
/// sign (`spec.token.claims`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiredClaim {
    pub name: String,
    pub value: String,
}

impl RequiredClaim {
    /// Parses `<name>=<value>` (a valid claim name; a value without spaces).
    pub fn parse(s: &str) -> Option<Self> {
        let (name, value) = s.split_once('=')?;
        (crate::rotation::claim_name(name) && !value.is_empty() && !value.contains(' ')).then(
            || RequiredClaim {
                name: name.to_string(),
                value: value.to_string(),
            },
        )
    }
}

impl std::fmt::Display for RequiredClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            clock_skew: DEFAULT_CLOCK_SKEW,
            audience: None,
            issuer: None,
            max_token_ttl: MAX_TOKEN_TTL,
            required_claims: Vec::new(),
            access: None,
        }
    }
}

/// Default of `--clock-skew`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The ceiling on a token's lifetime (`exp - iat`) whatever the key's ttl: the CRD's ceiling on
/// `spec.token.ttl`.
pub const MAX_TOKEN_TTL: Duration = crate::api::limits::TOKEN_TTL.duration();

/// Which key a route accepts. The binding comes from the route the proxy is configured to ask
/// (`/auth/<ns>/<name>`, `/authz/<ns>/<name>/...`, `--bind-key`), never from anything the client
/// sends: the client reaches the verifier only through that configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Only tokens of this key.
    Key(KeyRef),
    /// Tokens of any watched key (an unbound route of a verifier started with
    /// `--accept-any-key`).
    AnyKey,
}

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
    #[error("a token of another ProvisioningKey than {expected}, the one this route accepts")]
    KeyNotAccepted { expected: String },
    #[error(
        "this route accepts no key: use /auth/<namespace>/<name> or /authz/<namespace>/<name>, or start the verifier with --accept-any-key"
    )]
    Unbound,
    #[error("more than one Authorization header")]
    DuplicateAuthorization,
    #[error("token issued in the future (iat beyond now plus the allowed clock skew)")]
    IssuedInFuture,
    #[error("token lifetime (exp - iat) is longer than its key's ttl")]
    LifetimeTooLong,
    #[error(
        "the key id is not in the trust record of ProvisioningKey {0}: the operator never minted it"
    )]
    KeyNotRecorded(String),
    #[error(
        "the route requires claim {0}, which the token or its key's trust record does not grant"
    )]
    ClaimMissing(String),
    #[error(
        "ProvisioningKey {0} is in proof-of-possession mode: a token it signed is not accepted, only an access token of the token endpoint"
    )]
    ProofOfPossessionRequired(String),
    #[error(
        "remote bundle {0} is stale or was never fetched: its routes refuse every token until it is fetched again"
    )]
    RemoteBundleStale(String),
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
            Refusal::Unbound => "Unbound",
            Refusal::DuplicateAuthorization => "DuplicateAuthorization",
            Refusal::IssuedInFuture => "TokenIssuedInFuture",
            Refusal::LifetimeTooLong => "TokenLifetimeTooLong",
            Refusal::KeyNotRecorded(_) => "KeyNotRecorded",
            Refusal::ClaimMissing(_) => "ClaimMissing",
            Refusal::ProofOfPossessionRequired(_) => "ProofOfPossessionRequired",
            Refusal::RemoteBundleStale(_) => "RemoteBundleStale",
        }
    }

    /// 401 (not authenticated) or 403 (authenticated, not accepted here).
    pub fn status(&self) -> http::StatusCode {
        match self {
            Refusal::KeyNotAccepted { .. } | Refusal::Unbound | Refusal::ClaimMissing(_) => {
                http::StatusCode::FORBIDDEN
            }
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// The token of the request's one `Authorization: Bearer <token>` header (two or more
/// `Authorization` headers are refused: proxies and the verifier could read different ones).
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Refusal::MissingToken)?;
    if values.next().is_some() {
        return Err(Refusal::DuplicateAuthorization);
    }
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
/// 1. `alg` is EdDSA or ES256 (`none`, HS*, RS*, ... are refused before anything else is read;
///    the key the `kid` names must be of that algorithm);
/// 2. `sub` names a key whose bundle is known;
/// 3. the `kid` is in that bundle's JWKS, the signature verifies, the `kid` is not revoked
///    (a revoked kid is refused even if a stale JWKS still lists it), and the key's trust
///    record lists the `kid` (a JWK injected into the ConfigMap is never trusted);
/// 4. `nbf - skew <= now < exp + skew`, `iat <= now + skew`, and `exp - iat` at most the
///    lifetime recorded for the `kid` (at most [`Policy::max_token_ttl`]) plus skew;
/// 5. `aud` and `iss` are what the record says the key issues (or what the policy requires);
/// 6. the key is the one the route is bound to (else 403).
///
/// The refusal's message may name the key of a token whose signature did not verify: log its
/// reason, never the message.
pub fn verify(
    token: &str,
    index: &Index,
    binding: &Binding,
    now: i64,
    policy: &Policy,
) -> Result<Verified, Refusal> {
    // Unverified read of header and claims only to find the bundle; nothing below trusts
    // them before `keys::verify_token` has checked the signature.
    let (header, claims) = keys::decode_token_unverified(token)?;
    if !keys::supported_alg(&header.alg) {
        return Err(KeyError::UnsupportedAlgorithm(keys::sanitize_ident(&header.alg)).into());
    }
    // An access token of the token endpoint: signed by the access-token signer's key.
    if let Some(access) = &policy.access
        && super::oauth::is_access_token(index, access, &header.kid)
    {
        return super::oauth::verify_access(token, index, binding, now, policy, access);
    }
    let key = KeyRef::parse(&claims.sub).ok_or(Refusal::BadSubject)?;
    let (params, bundle) = index
        .bundle(&key)
        .ok_or_else(|| Refusal::UnknownKey(key.to_string()))?;
    let skew = i64::try_from(policy.clock_skew.as_secs()).unwrap_or(i64::MAX / 2);
    // A revoked entry of a key id the record still lists is not the operator's (it removes a
    // key id from the record before it lists it as revoked): ignored, so that nobody who can
    // write the ConfigMap can deny a live key.
    let revoked: Vec<String> = bundle
        .revoked
        .iter()
        .filter(|k| !params.trusts(k))
        .cloned()
        .collect();
    let (header, claims) = keys::verify_token(token, &bundle.jwks, &revoked, now, skew)?;
    if !params.trusts(&header.kid) {
        return Err(Refusal::KeyNotRecorded(key.to_string()));
    }
    if claims.iat > now.saturating_add(skew) {
        return Err(Refusal::IssuedInFuture);
    }
    let ttl = params.ttl_of(&header.kid).min(policy.max_token_ttl);
    let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    if claims.exp.saturating_sub(claims.iat) > ttl.saturating_add(skew) {
        return Err(Refusal::LifetimeTooLong);
    }
    check_audience(policy, params, &claims.aud, &key)?;
    let issuer = policy.issuer.as_deref().unwrap_or(&params.issuer);
    if claims.iss != issuer {
        return Err(Refusal::WrongIssuer(key.to_string()));
    }
    accepted_here(binding, &key)?;
    // Whoever holds the private key of a proof-of-possession key could sign a bearer token of
    // their own: such a key's tokens pass only as the token endpoint's access tokens.
    if params.pop {
        return Err(Refusal::ProofOfPossessionRequired(key.to_string()));
    }
    Ok(Verified {
        key,
        kid: header.kid,
        exp: claims.exp,
    })
}

/// `aud` is what the policy requires, else what the key's record says it issues.
pub(super) fn check_audience(
    policy: &Policy,
    params: &super::index::KeyParams,
    aud: &str,
    key: &KeyRef,
) -> Result<(), Refusal> {
    let audience = policy.audience.as_deref().unwrap_or(&params.audience);
    if aud == audience {
        Ok(())
    } else {
        Err(Refusal::WrongAudience(key.to_string()))
    }
}

/// The route accepts `key` (403 otherwise).
pub(super) fn accepted_here(binding: &Binding, key: &KeyRef) -> Result<(), Refusal> {
    match binding {
        Binding::Key(expected) if expected != key => Err(Refusal::KeyNotAccepted {
            expected: expected.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The claims `required` of a token [`verify`] accepted for `key`: each must be granted by the
/// token and by the key's trust record (else 403 `ClaimMissing`, naming the first one missing).
pub fn require_claims(
    token: &str,
    index: &Index,
    key: &KeyRef,
    required: &[&RequiredClaim],
) -> Result<(), Refusal> {
    if required.is_empty() {
        return Ok(());
    }
    let recorded = index
        .bundle(key)
        .map(|(params, _)| params.claims.clone())
        .unwrap_or_default();
    let custom = keys::custom_claims(token)?;
    for r in required {
        let in_token = custom
            .get(&r.name)
            .is_some_and(|v| keys::claim_grants(v, &r.value));
        let in_record = recorded
            .get(&r.name)
            .is_some_and(|v| v.split(' ').any(|item| item == r.value));
        if !(in_token && in_record) {
            return Err(Refusal::ClaimMissing(r.to_string()));
        }
    }
    Ok(())
}
