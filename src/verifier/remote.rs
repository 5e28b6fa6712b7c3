//! Remote trust sources: a bundle fetched from another cluster's JWKS URL (`--remote-bundle`).
//!
//! Each remote bundle is a trust source of its own:
//! - it is bound to named routes only (`/auth-remote/<name>`, `/authz-remote/<name>/...`): a
//!   token it verifies never passes on a local key's route, and no local key's token passes on
//!   its routes;
//! - it is fetched over TLS with a pinned CA (the system roots are not trusted), at most
//!   1 MiB, every `interval`, revalidated with its `ETag`;
//! - it fails closed: once the last successful fetch is older than `max-staleness`, every token
//!   on its routes is refused (`RemoteBundleStale`), and a source never fetched refuses too;
//! - it carries the trust boundary's rule by where it points: the other cluster's
//!   `keyward verifier` serves at `/keys/<ns>/<name>/jwks.json` only the key ids its operator
//!   recorded (the trust record), so a JWK injected into that cluster's ConfigMap never crosses.
//!   Every JWK must also check against its RFC 7638 key id, or the whole document is refused;
//! - `sub` must be the remote key (`<ns>/<name>`), `aud` and `iss` what that key issues (flags;
//!   default `keyward:<sub>` and `keyward`), and a token's lifetime at most 24 h.
//!
//! Uses on remote routes are not reported: the other cluster's operator never reads this
//! cluster's reports.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::index::KeyRef;
use super::verify::{Policy, Refusal, Verified};
use crate::keys::{self, Jwks, KeyError, PublicKey};

/// Largest remote JWKS document read.
pub const MAX_DOCUMENT: usize = 1024 * 1024;
/// Default fetch interval and staleness limit.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(300);

/// One `--remote-bundle`: `name=N,url=https://...,ca=PATH,sub=NS/NAME[,aud=A][,iss=I]
/// [,interval=30s][,max-staleness=5m]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub name: String,
    pub url: String,
    pub ca: std::path::PathBuf,
    pub sub: KeyRef,
    pub aud: String,
    pub iss: String,
    pub interval: Duration,
    pub max_staleness: Duration,
}

impl RemoteSpec {
    /// Parses the flag's value; every error names the field.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut fields = std::collections::BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            if fields
                .insert(k.trim().to_string(), v.trim().to_string())
                .is_some()
            {
                return Err(format!("{k} is given twice"));
            }
        }
        let mut take = |k: &str| fields.remove(k);
        let name = take("name").ok_or("name= is required")?;
        if name.is_empty()
            || name.len() > 63
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "name {name:?}: lowercase letters, digits and -, at most 63"
            ));
        }
        let url = take("url").ok_or("url= is required")?;
        if !url.starts_with("https://") || url.parse::<http::Uri>().is_err() {
            return Err(format!("url {url:?} must be an https:// URL"));
        }
        let ca = take("ca").ok_or("ca= (the pinned CA's PEM file) is required")?;
        let sub = take("sub").ok_or("sub= (the remote key, <namespace>/<name>) is required")?;
        let sub =
            KeyRef::parse(&sub).ok_or_else(|| format!("sub {sub:?} is not <namespace>/<name>"))?;
        let aud = take("aud").unwrap_or_else(|| format!("keyward:{sub}"));
        let iss = take("iss").unwrap_or_else(|| "keyward".to_string());
        let duration = |v: Option<String>, d: Duration, what: &str| match v {
            None => Ok(d),
            Some(v) => crate::rotation::parse_duration(&v)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("{what} {v:?} is not a duration")),
        };
        let interval = duration(take("interval"), DEFAULT_INTERVAL, "interval")?;
        let max_staleness = duration(
            take("max-staleness"),
            DEFAULT_MAX_STALENESS,
            "max-staleness",
        )?;
        if max_staleness < interval {
            return Err("max-staleness must be at least interval".into());
        }
        if let Some(k) = fields.keys().next() {
            return Err(format!("unknown field {k}"));
        }
        Ok(RemoteSpec {
            name,
            url,
            ca: ca.into(),
            sub,
            aud,
            iss,
            interval,
            max_staleness,
        })
    }
}

#[derive(Debug, Default)]
struct Fetched {
    jwks: Jwks,
    etag: Option<String>,
    at: Option<Instant>,
}

/// A remote bundle and its last good fetch.
pub struct RemoteBundle {
    pub spec: RemoteSpec,
    state: RwLock<Fetched>,
    http: reqwest::Client,
}

/// Why a remote document was not taken.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Http(String),
    #[error("the document is longer than {MAX_DOCUMENT} bytes")]
    TooLong,
    #[error("not a JWKS: {0}")]
    Malformed(String),
}

impl RemoteBundle {
    /// The client trusts only the CA in `spec.ca`.
    pub fn new(spec: RemoteSpec) -> Result<Self, String> {
        let pem = std::fs::read(&spec.ca)
            .map_err(|e| format!("remote bundle {}: CA {}: {e}", spec.name, spec.ca.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("remote bundle {}: CA {}: {e}", spec.name, spec.ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "remote bundle {}: no certificate in {}",
                spec.name,
                spec.ca.display()
            ));
        }
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
        let http = builder
            .build()
            .map_err(|e| format!("remote bundle {}: {e}", spec.name))?;
        Ok(RemoteBundle {
            spec,
            state: RwLock::new(Fetched::default()),
            http,
        })
    }

    /// Fetches once; on success the document (or a 304) refreshes the bundle.
    pub async fn fetch(&self) -> Result<(), FetchError> {
        let etag = self
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .etag
            .clone();
        let mut req = self.http.get(&self.spec.url);
        if let Some(e) = &etag {
            req = req.header(http::header::IF_NONE_MATCH, e);
        }
        let res = req
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if res.status() == http::StatusCode::NOT_MODIFIED && etag.is_some() {
            self.state.write().unwrap_or_else(|e| e.into_inner()).at = Some(Instant::now());
            return Ok(());
        }
        if !res.status().is_success() {
            return Err(FetchError::Http(format!("answered {}", res.status())));
        }
        if res
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT as u64)
        {
            return Err(FetchError::TooLong);
        }
        let new_etag = res
            .headers()
            .get(http::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = res
            .bytes()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if body.len() > MAX_DOCUMENT {
            return Err(FetchError::TooLong);
        }
        let jwks = parse(&body)?;
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        *state = Fetched {
            jwks,
            etag: new_etag,
            at: Some(Instant::now()),
        };
        Ok(())
    }

    /// How old the last good fetch is; `None` when it never succeeded.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.at.map(|at| now.saturating_duration_since(at))
    }

    /// Verifies `token` against this bundle (fail closed when stale or never fetched).
    pub fn verify(
        &self,
        token: &str,
        now: i64,
        at: Instant,
        policy: &Policy,
    ) -> Result<Verified, Refusal> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let fresh = state
            .at
            .is_some_and(|t| at.saturating_duration_since(t) <= self.spec.max_staleness);
        if !fresh {
            return Err(Refusal::RemoteBundleStale(self.spec.name.clone()));
        }
        let skew = i64::try_from(policy.clock_skew.as_secs()).unwrap_or(i64::MAX / 2);
        let (header, claims) = keys::verify_token(token, &state.jwks, &[], now, skew)?;
        let key = KeyRef::parse(&claims.sub).ok_or(Refusal::BadSubject)?;
        if key != self.spec.sub {
            return Err(Refusal::KeyNotAccepted {
                expected: self.spec.sub.to_string(),
            });
        }
        if claims.iat > now.saturating_add(skew) {
            return Err(Refusal::IssuedInFuture);
        }
        let max = i64::try_from(policy.max_token_ttl.as_secs()).unwrap_or(i64::MAX / 2);
        if claims.exp.saturating_sub(claims.iat) > max.saturating_add(skew) {
            return Err(Refusal::LifetimeTooLong);
        }
        if claims.aud != self.spec.aud {
            return Err(Refusal::WrongAudience(key.to_string()));
        }
        if claims.iss != self.spec.iss {
            return Err(Refusal::WrongIssuer(key.to_string()));
        }
        Ok(Verified {
            key,
            kid: header.kid,
            exp: claims.exp,
        })
    }
}

/// A JWKS document whose every key checks against its key id.
pub fn parse(body: &[u8]) -> Result<Jwks, FetchError> {
    let jwks: Jwks =
        serde_json::from_slice(body).map_err(|_| FetchError::Malformed("not a JWKS".into()))?;
    for jwk in &jwks.keys {
        if jwk.kid.is_none() {
            return Err(FetchError::Malformed("a key without kid".into()));
        }
        PublicKey::from_jwk(jwk).map_err(|e: KeyError| FetchError::Malformed(e.to_string()))?;
    }
    Ok(jwks)
}

/// Keeps `bundles` fresh: each fetched every `interval` (at once at start), failures logged
/// once per kind of error and retried at the next interval.
pub async fn keep_fresh(bundles: Vec<Arc<RemoteBundle>>) {
    let tasks = bundles.into_iter().map(|b| async move {
        let mut last_error: Option<String> = None;
        loop {
            match b.fetch().await {
                Ok(()) => {
                    if last_error.take().is_some() {
                        info!(remote = %b.spec.name, "remote bundle fetched again");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        warn!(remote = %b.spec.name, url = %b.spec.url, error = %text,
                              "cannot fetch the remote bundle; its routes refuse once it is stale");
                    }
                    last_error = Some(text);
                }
            }
            tokio::time::sleep(b.spec.interval).await;
        }
    });
    futures::future::join_all(tasks).await;
}
