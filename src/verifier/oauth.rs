//! Proof of possession: an OAuth 2.0 token endpoint (RFC 6749 4.4, `client_credentials`) that
//! authenticates agents by a client assertion signed with their provisioning key (RFC 7523 2.2,
//! `private_key_jwt`), and the access tokens it issues.
//!
//! A ProvisioningKey in `spec.token.mode: ProofOfPossession` (its trust record says `pop`):
//! - its agents hold the private key and, for each access token, sign an assertion with
//!   `iss` = `sub` = `<namespace>/<name>` of the key, `aud` = this endpoint's URL, `exp` at
//!   most [`MAX_ASSERTION_LIFETIME`] after `iat`, and a `jti` (required);
//! - the assertion is checked against the key ids the key's trust record lists (and its bundle
//!   publishes), by the algorithm of each (OPA sends no `kid`: every trusted key id is tried);
//!   a `jti` seen before within its assertion's lifetime is refused;
//! - the access token is signed by the access-token signer, itself a ProvisioningKey the
//!   operator mints and rotates (`--access-token-signer`), with the private key from its
//!   agent Secret (`--access-token-key-file`, read on every issue, so a rotation of the signer
//!   needs no restart). Every replica verifies it against the signer's trust bundle and record,
//!   as any token. It carries `cnf.kid`, the agent key id the assertion was signed with: once
//!   that key id leaves the record (deactivated, revoked), its access tokens are refused at once;
//! - a bearer token signed by the key itself is refused at `/auth` (`ProofOfPossessionRequired`).
//!
//! Replay: the `jti` cache is per replica. An assertion replayed to another replica within its
//! lifetime (at most 10 minutes) gets a second access token there; the assertion is bound to
//! this endpoint's URL (`aud`) and travels only over TLS, and the access tokens are as short
//! lived as `--access-token-ttl`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::index::{Index, KeyRef};
use super::verify::{Binding, Policy, Refusal, Verified};
use crate::keys::{self, KeyError, KeyPair, PublicKey, TokenHeader};

/// RFC 7523's client assertion type.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Longest assertion lifetime (`exp - iat`) accepted: OPA signs for exactly 10 minutes.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// Default and ceiling of `--access-token-ttl`.
pub const DEFAULT_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(300);
pub const MAX_ACCESS_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Most `jti`s remembered per replica; beyond it (every one unexpired) the endpoint refuses
/// until some expire, rather than forget one (fail closed).
pub const MAX_REMEMBERED_JTIS: usize = 100_000;

/// The endpoint's path.
pub const PATH: &str = "/oauth2/token";

/// The token endpoint's configuration and its replay cache.
pub struct TokenEndpoint {
    /// The endpoint's own URL (`https://.../oauth2/token`): the `aud` an assertion must carry,
    /// and the `iss` of the access tokens.
    pub url: String,
    /// The ProvisioningKey whose key signs access tokens.
    pub signer: KeyRef,
    /// Its private key (PKCS#8 PEM, the agent Secret's `private-key.pem`).
    pub key_file: PathBuf,
    pub ttl: Duration,
    seen: Mutex<HashMap<(KeyRef, String), i64>>,
}

/// What verifying an access token needs (part of [`Policy`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessPolicy {
    pub issuer: String,
    pub signer: KeyRef,
    pub max_ttl: Duration,
}

/// An OAuth error response (RFC 6749 5.2). The description names no token or key bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {description}")]
pub struct OAuthError {
    pub code: &'static str,
    pub description: String,
    pub status: http::StatusCode,
}

impl OAuthError {
    fn request(description: impl Into<String>) -> Self {
        OAuthError {
            code: "invalid_request",
            description: description.into(),
            status: http::StatusCode::BAD_REQUEST,
        }
    }
    fn client(description: impl Into<String>) -> Self {
        OAuthError {
            code: "invalid_client",
            description: description.into(),
            status: http::StatusCode::UNAUTHORIZED,
        }
    }
    fn unavailable(description: impl Into<String>) -> Self {
        OAuthError {
            code: "temporarily_unavailable",
            description: description.into(),
            status: http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    /// The JSON body.
    pub fn body(&self) -> String {
        json!({ "error": self.code, "error_description": self.description }).to_string()
    }
}

/// An issued access token.
#[derive(Clone, Debug)]
pub struct Issued {
    pub access_token: String,
    pub expires_in: u64,
    /// The agent key and key id the assertion was signed with (its use is reported).
    pub verified: Verified,
}

impl Issued {
    /// The JSON body (RFC 6749 5.1).
    pub fn body(&self) -> String {
        json!({
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
        })
        .to_string()
    }
}

impl TokenEndpoint {
    pub fn new(url: String, signer: KeyRef, key_file: PathBuf, ttl: Duration) -> Self {
        TokenEndpoint {
            url,
            signer,
            key_file,
            ttl: ttl.min(MAX_ACCESS_TOKEN_TTL),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// What `/auth` needs to verify this endpoint's access tokens.
    pub fn access_policy(&self) -> AccessPolicy {
        AccessPolicy {
            issuer: self.url.clone(),
            signer: self.signer.clone(),
            max_ttl: self.ttl,
        }
    }

    /// Handles a token request's form fields: checks the assertion, remembers its `jti`, and
    /// signs an access token.
    pub fn issue(
        &self,
        form: &[(String, String)],
        index: &Index,
        now: i64,
        skew: i64,
    ) -> Result<Issued, OAuthError> {
        let field = |name: &str| -> Result<Option<&str>, OAuthError> {
            let mut values = form.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
            let first = values.next().map(String::as_str);
            if values.next().is_some() {
                return Err(OAuthError::request(format!("{name} is repeated")));
            }
            Ok(first)
        };
        match field("grant_type")? {
            Some("client_credentials") => {}
            Some(_) => {
                return Err(OAuthError {
                    code: "unsupported_grant_type",
                    description: "only client_credentials is supported".into(),
                    status: http::StatusCode::BAD_REQUEST,
                });
            }
            None => return Err(OAuthError::request("grant_type is missing")),
        }
        if field("client_assertion_type")? != Some(ASSERTION_TYPE) {
            return Err(OAuthError::request(format!(
                "client_assertion_type must be {ASSERTION_TYPE}"
            )));
        }
        let assertion = field("client_assertion")?
            .ok_or_else(|| OAuthError::request("client_assertion is missing"))?;
        let (key, kid, claims) = self.check_assertion(assertion, index, now, skew)?;
        if let Some(client_id) = field("client_id")?
            && client_id != key.to_string()
        {
            return Err(OAuthError::client("client_id is not the assertion's iss"));
        }
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= 256)
            .ok_or_else(|| {
                OAuthError::client("the assertion has no jti (OPA: include_jti_claim: true)")
            })?;
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(now);
        self.remember(&key, jti, exp, now, skew)?;
        self.sign(index, key, kid, now)
    }

    /// The assertion's key, key id and claims, once its signature, issuer, subject, audience
    /// and times check out.
    fn check_assertion(
        &self,
        assertion: &str,
        index: &Index,
        now: i64,
        skew: i64,
    ) -> Result<(KeyRef, String, Map<String, Value>), OAuthError> {
        let header = keys::jose_header_unverified(assertion)
            .map_err(|e| OAuthError::client(format!("assertion: {e}")))?;
        // Unverified: only to find the key; checked again once the signature is.
        let sub = unverified_claim(assertion, "sub")
            .ok_or_else(|| OAuthError::client("the assertion has no sub"))?;
        let key = KeyRef::parse(&sub).ok_or_else(|| {
            OAuthError::client("the assertion's sub is not <namespace>/<name> of a ProvisioningKey")
        })?;
        let (params, bundle) = index
            .bundle(&key)
            .ok_or_else(|| OAuthError::client(format!("no trust bundle is known for {key}")))?;
        if !params.pop {
            return Err(OAuthError {
                code: "unauthorized_client",
                description: format!(
                    "ProvisioningKey {key} is not in spec.token.mode ProofOfPossession"
                ),
                status: http::StatusCode::BAD_REQUEST,
            });
        }
        // Every trusted key id (the record's, published, not revoked), or the one the header
        // names.
        let mut last = KeyError::UnknownKeyId(keys::sanitize_ident(
            header.kid.as_deref().unwrap_or("(none)"),
        ));
        let mut verified = None;
        for jwk in &bundle.jwks.keys {
            let Some(kid) = jwk.kid.as_deref() else {
                continue;
            };
            if !params.trusts(kid)
                || bundle.revoked.iter().any(|r| r == kid)
                || header.kid.as_deref().is_some_and(|h| h != kid)
            {
                continue;
            }
            let Ok(public) = PublicKey::from_jwk(jwk) else {
                continue;
            };
            match keys::verify_jws(assertion, &public) {
                Ok(claims) => {
                    verified = Some((kid.to_string(), claims));
                    break;
                }
                Err(e) => last = e,
            }
        }
        let (kid, claims) =
            verified.ok_or_else(|| OAuthError::client(format!("assertion: {last}")))?;
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        if text("iss") != Some(sub.as_str()) || text("sub") != Some(sub.as_str()) {
            return Err(OAuthError::client(
                "the assertion's iss and sub must both be the key",
            ));
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == self.url,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(self.url.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(OAuthError::client(
                "the assertion's aud is not this token endpoint",
            ));
        }
        let num = |name: &str| claims.get(name).and_then(Value::as_i64);
        let exp = num("exp").ok_or_else(|| OAuthError::client("the assertion has no exp"))?;
        let iat = num("iat").ok_or_else(|| OAuthError::client("the assertion has no iat"))?;
        if now >= exp.saturating_add(skew) {
            return Err(OAuthError::client("the assertion has expired"));
        }
        if iat > now.saturating_add(skew)
            || num("nbf").is_some_and(|n| n > now.saturating_add(skew))
        {
            return Err(OAuthError::client("the assertion is not valid yet"));
        }
        let max = i64::try_from(MAX_ASSERTION_LIFETIME.as_secs()).unwrap_or(600);
        if exp.saturating_sub(iat) > max.saturating_add(skew) {
            return Err(OAuthError::client(
                "the assertion lives longer than 10 minutes (exp - iat)",
            ));
        }
        Ok((key, kid, claims))
    }

    /// Remembers `jti` until `exp` (plus skew); refuses one already remembered.
    fn remember(
        &self,
        key: &KeyRef,
        jti: &str,
        exp: i64,
        now: i64,
        skew: i64,
    ) -> Result<(), OAuthError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let k = (key.clone(), jti.to_string());
        if seen.get(&k).is_some_and(|until| *until > now) {
            return Err(OAuthError::client(
                "the assertion's jti was used before (replay)",
            ));
        }
        if seen.len() >= MAX_REMEMBERED_JTIS {
            seen.retain(|_, until| *until > now);
            if seen.len() >= MAX_REMEMBERED_JTIS {
                return Err(OAuthError::unavailable(
                    "too many assertions in flight; try again shortly",
                ));
            }
        }
        seen.insert(k, exp.saturating_add(skew));
        Ok(())
    }

    /// Signs the access token with the signer's current key, if its record and bundle trust it.
    fn sign(
        &self,
        index: &Index,
        key: KeyRef,
        kid: String,
        now: i64,
    ) -> Result<Issued, OAuthError> {
        let (params, _) = index
            .bundle(&key)
            .ok_or_else(|| OAuthError::client(format!("no trust bundle is known for {key}")))?;
        let pem =
            zeroize::Zeroizing::new(std::fs::read_to_string(&self.key_file).map_err(|_| {
                OAuthError::unavailable("the access-token signing key cannot be read")
            })?);
        let signer = KeyPair::from_pkcs8_pem(&pem)
            .map_err(|_| OAuthError::unavailable("the access-token signing key is not a key"))?;
        let signer_kid = signer.key_id();
        let trusted = index
            .bundle(&self.signer)
            .is_some_and(|(p, b)| p.trusts(&signer_kid) && b.jwks.find(&signer_kid).is_some());
        if !trusted {
            return Err(OAuthError::unavailable(format!(
                "the access-token signing key is not (yet) trusted by ProvisioningKey {}",
                self.signer
            )));
        }
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(300);
        let mut payload = json!({
            "iss": self.url,
            "sub": key.to_string(),
            "aud": params.audience,
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add(ttl),
            "jti": uuid::Uuid::new_v4().to_string(),
            "cnf": { "kid": kid },
        });
        if let Some(map) = payload.as_object_mut() {
            for (k, v) in &params.claims {
                map.entry(k.clone())
                    .or_insert_with(|| Value::String(v.clone()));
            }
        }
        let header = TokenHeader {
            alg: signer.kind().alg().to_owned(),
            typ: Some(keys::JWT_TYP.to_owned()),
            kid: signer_kid,
            crit: None,
        };
        let access_token = signer
            .sign_compact(&header, &payload)
            .map_err(|_| OAuthError::unavailable("could not sign the access token"))?;
        Ok(Issued {
            access_token,
            expires_in: self.ttl.as_secs(),
            verified: Verified {
                key,
                kid,
                exp: now.saturating_add(ttl),
            },
        })
    }
}

/// A string claim of a JWS, WITHOUT verifying.
fn unverified_claim(token: &str, name: &str) -> Option<String> {
    use base64::Engine as _;
    let claims_b64 = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims_b64)
        .ok()?;
    let map: Map<String, Value> = serde_json::from_slice(&json).ok()?;
    map.get(name).and_then(Value::as_str).map(str::to_string)
}

/// Whether `kid` (a token header's) is one of the access-token signer's trusted key ids.
pub fn is_access_token(index: &Index, access: &AccessPolicy, kid: &str) -> bool {
    index
        .bundle(&access.signer)
        .is_some_and(|(p, _)| p.trusts(kid))
}

/// Verifies an access token this endpoint (on any replica) issued: the signer's key signed it,
/// `iss` is the endpoint, `sub` names a key in proof-of-possession mode whose record still
/// trusts `cnf.kid` (and whose bundle does not revoke it), `aud` is that key's, its lifetime is
/// at most the access-token ttl, and the route accepts that key.
pub fn verify_access(
    token: &str,
    index: &Index,
    binding: &Binding,
    now: i64,
    policy: &Policy,
    access: &AccessPolicy,
) -> Result<Verified, Refusal> {
    let skew = i64::try_from(policy.clock_skew.as_secs()).unwrap_or(i64::MAX / 2);
    let (sp, sb) = index
        .bundle(&access.signer)
        .ok_or_else(|| Refusal::UnknownKey(access.signer.to_string()))?;
    let revoked: Vec<String> = sb
        .revoked
        .iter()
        .filter(|k| !sp.trusts(k))
        .cloned()
        .collect();
    let (header, claims) = keys::verify_token(token, &sb.jwks, &revoked, now, skew)?;
    if !sp.trusts(&header.kid) {
        return Err(Refusal::KeyNotRecorded(access.signer.to_string()));
    }
    if claims.iss != access.issuer {
        return Err(Refusal::WrongIssuer(access.signer.to_string()));
    }
    let key = KeyRef::parse(&claims.sub).ok_or(Refusal::BadSubject)?;
    let (params, bundle) = index
        .bundle(&key)
        .ok_or_else(|| Refusal::UnknownKey(key.to_string()))?;
    if !params.pop {
        return Err(Refusal::KeyNotRecorded(key.to_string()));
    }
    let custom = keys::custom_claims(token)?;
    let kid = custom
        .get("cnf")
        .and_then(|c| c.get("kid"))
        .and_then(Value::as_str)
        .ok_or(KeyError::InvalidToken("an access token without cnf.kid"))?;
    if bundle.revoked.iter().any(|r| r == kid) && !params.trusts(kid) {
        return Err(KeyError::TokenRevoked(keys::sanitize_ident(kid)).into());
    }
    if !params.trusts(kid) {
        return Err(Refusal::KeyNotRecorded(key.to_string()));
    }
    if claims.iat > now.saturating_add(skew) {
        return Err(Refusal::IssuedInFuture);
    }
    let max = i64::try_from(access.max_ttl.as_secs()).unwrap_or(i64::MAX / 2);
    if claims.exp.saturating_sub(claims.iat) > max.saturating_add(skew) {
        return Err(Refusal::LifetimeTooLong);
    }
    super::verify::check_audience(policy, params, &claims.aud, &key)?;
    super::verify::accepted_here(binding, &key)?;
    Ok(Verified {
        key,
        kid: kid.to_string(),
        exp: claims.exp,
    })
}
