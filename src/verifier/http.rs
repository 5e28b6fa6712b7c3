//! The verifier's HTTP surface, one router:
//!
//! * `GET /auth/<ns>/<name>`: nginx `auth_request` for the routes of one ProvisioningKey
//!   (200 / 401 / 403, empty body);
//! * `ANY /authz/<ns>/<name>/...`: Envoy `ext_authz` HTTP service with
//!   `path_prefix: /authz/<ns>/<name>` (200 allows, anything else denies);
//! * `GET /auth` and `ANY /ext_authz/...`: the same without a binding, refused (403 `Unbound`)
//!   unless the verifier was started with `--accept-any-key`. A new route prefix, not
//!   `/ext_authz/<ns>/<name>`: behind an old `path_prefix: /ext_authz` the client's own path
//!   would follow the prefix and could name any key;
//! * `GET /keys/<ns>/<name>/jwks.json` and `.../revoked.json`: the trust bundle, with
//!   `Cache-Control: max-age` from the key's `publishDelay` and a strong `ETag`;
//! * `GET /healthz`, `GET /readyz`;
//! * everything else, with `--upstream`: verified, then forwarded (streaming) to the upstream.
//!
//! Allowed answers carry `X-Keyward-Key: <ns>/<name>` and `X-Keyward-Kid: <key id>`; refusals
//! carry `X-Keyward-Reason` (a PascalCase reason) and never token or key bytes.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use chrono::Utc;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tracing::{debug, warn};

use super::Shared;
use super::index::{Bundle, Document, KeyParams, KeyRef};
use super::pod_identity::{CONSUMER_TOKEN_HEADER, POD_TOKEN_HEADER, TokenKind};
use super::use_log::{Instance, Use};
use super::verify::{self, Binding, Refusal, RequiredClaim, Verified};
use crate::keys::Jwks;

pub const KEY_HEADER: &str = "x-keyward-key";
pub const KID_HEADER: &str = "x-keyward-kid";
pub const REASON_HEADER: &str = "x-keyward-reason";

/// Longest `max-age` served, whatever the publishDelay: revocations reach consumers too.
pub const MAX_AGE_CAP: Duration = Duration::from_secs(300);

/// `max-age` for a key's bundle documents: half its `publishDelay`, whole seconds rounded
/// down, at most [`MAX_AGE_CAP`]. A new key is in the bundle `publishDelay` before any agent
/// holds it; a consumer that fetched just before it was published refetches within `max-age`,
/// which leaves the other half for the verifier's watch lag and the consumer's own fetch.
/// `0` (publishDelay under 2 s) is served as `no-cache`: revalidate every time.
pub fn max_age(publish_delay: Duration) -> Duration {
    Duration::from_secs((publish_delay / 2).as_secs()).min(MAX_AGE_CAP)
}

/// The `Cache-Control` value for `max_age`.
pub fn cache_control(max_age: Duration) -> String {
    match max_age.as_secs() {
        0 => "no-cache".into(),
        n => format!("public, max-age={n}"),
    }
}

/// Whether an `If-None-Match` header matches `etag` (weak comparison, RFC 9110 13.1.2).
pub fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || strip(t) == strip(etag))
}

pub fn router(shared: Arc<Shared>) -> Router {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/auth", get(auth_unbound))
        .route("/ext_authz", any(auth_unbound))
        .route("/ext_authz/{*rest}", any(auth_unbound))
        .route("/auth/{namespace}/{name}", get(auth_route))
        .route("/authz/{namespace}/{name}", any(auth_bound))
        .route("/authz/{namespace}/{name}/", any(auth_bound))
        .route("/authz/{namespace}/{name}/{*rest}", any(auth_bound))
        .route("/keys/{namespace}/{name}/{document}", get(bundle_document))
        // Remote trust sources: their own prefixes (a namespace may be called "remote").
        .route("/auth-remote/{name}", get(auth_remote))
        .route("/authz-remote/{name}", any(auth_remote))
        .route("/authz-remote/{name}/", any(auth_remote))
        .route("/authz-remote/{name}/{*rest}", any(auth_remote));
    let router = if shared.token_endpoint.is_some() {
        router.route(super::oauth::PATH, axum::routing::post(token_endpoint))
    } else {
        router
    };
    let router = if shared.upstream.is_some() {
        router.fallback(proxy)
    } else {
        router
    };
    router.with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let unconfirmed = shared.freshness.unconfirmed_for(std::time::Instant::now());
    if !shared.has_listed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "trust bundles not listed yet\n",
        )
            .into_response()
    } else if unconfirmed > shared.freshness.max_staleness {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the view of keys and trust bundles is unconfirmed for {} s (a watch is failing; --max-staleness {} s)\n",
                unconfirmed.as_secs(),
                shared.freshness.max_staleness.as_secs()
            ),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let now = std::time::Instant::now();
    shared
        .stats
        .view_unconfirmed(shared.freshness.unconfirmed_for(now));
    for (name, remote) in &shared.remotes {
        shared.stats.remote_age(name, remote.age(now));
    }
    match shared.stats.encode() {
        Ok(body) => {
            let mut res = body.into_response();
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            res
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Verifies the request's bearer token for `binding` and records the use. Refusals are logged
/// by reason only: the rest of a refused token is unverified input.
fn check(
    shared: &Shared,
    headers: &HeaderMap,
    binding: &Binding,
    route_required: &[RequiredClaim],
) -> Result<Verified, Refusal> {
    let now = Utc::now();
    let verified = verify::bearer(headers).and_then(|token| {
        let index = shared.index.read().unwrap_or_else(|e| e.into_inner());
        let v = verify::verify(token, &index, binding, now.timestamp(), &shared.policy)?;
        let required: Vec<&RequiredClaim> = shared
            .policy
            .required_claims
            .iter()
            .chain(route_required)
            .collect();
        verify::require_claims(token, &index, &v.key, &required)?;
        Ok(v)
    });
    match &verified {
        Ok(v) => {
            // The pod only from a pod token the API server vouches for (never from a header the
            // client chose).
            let instance = shared.pods.as_ref().map_or(Instance::Unattributed, |p| {
                match p.attribute(
                    headers.get(POD_TOKEN_HEADER),
                    &v.key,
                    &v.kid,
                    now,
                    &shared.use_log,
                ) {
                    // An agent outside the cluster names its ServiceAccount instead.
                    Instance::Unattributed => p.attribute_as(
                        TokenKind::Consumer,
                        headers.get(CONSUMER_TOKEN_HEADER),
                        &v.key,
                        &v.kid,
                        now,
                        &shared.use_log,
                    ),
                    pod => pod,
                }
            });
            debug!(key = %v.key, kid = %v.kid, pod = ?instance.pod_uid(), "token accepted");
            shared.stats.allowed();
            shared.use_log.record(Use {
                key: v.key.clone(),
                kid: v.kid.clone(),
                instance,
                at: now,
            });
        }
        Err(e) => {
            shared.stats.refused(e.reason());
            debug!(reason = e.reason(), "token refused");
        }
    }
    verified
}

/// Largest token request body read (a client assertion is well under 2 KiB).
const MAX_TOKEN_REQUEST: usize = 16 * 1024;

/// `POST /oauth2/token`: a client assertion in, an access token out (RFC 6749 4.4, RFC 7523).
/// Answers carry `Cache-Control: no-store`; refusals are logged by their OAuth error code only.
async fn token_endpoint(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    use super::oauth::OAuthError;
    let Some(endpoint) = shared.token_endpoint.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let json = |status: StatusCode, body: String| {
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        res
    };
    let form_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let refuse = |e: OAuthError| {
        shared.stats.refused("TokenRequestRefused");
        debug!(error = e.code, "token request refused");
        json(e.status, e.body())
    };
    if !form_type {
        return refuse(OAuthError {
            code: "invalid_request",
            description: "the body must be application/x-www-form-urlencoded".into(),
            status: StatusCode::BAD_REQUEST,
        });
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_TOKEN_REQUEST).await else {
        return refuse(OAuthError {
            code: "invalid_request",
            description: format!("the body is longer than {MAX_TOKEN_REQUEST} bytes"),
            status: StatusCode::PAYLOAD_TOO_LARGE,
        });
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let now = Utc::now();
    let skew = i64::try_from(shared.policy.clock_skew.as_secs()).unwrap_or(30);
    let issued = {
        let index = shared.index.read().unwrap_or_else(|e| e.into_inner());
        endpoint.issue(&form, &index, now.timestamp(), skew)
    };
    match issued {
        Ok(issued) => {
            debug!(key = %issued.verified.key, kid = %issued.verified.kid, "access token issued");
            shared.stats.allowed();
            // The assertion is a use of the agent's key id, as a bearer token would be.
            shared.use_log.record(Use {
                key: issued.verified.key.clone(),
                kid: issued.verified.kid.clone(),
                instance: Instance::Unattributed,
                at: now,
            });
            json(StatusCode::OK, issued.body())
        }
        Err(e) => refuse(e),
    }
}

/// `/auth-remote/<name>` and `/authz-remote/<name>/...`: a token of the remote bundle `name`
/// (`--remote-bundle`), and nothing else. Its use is not reported (the remote cluster's
/// operator never reads this cluster's reports). An unknown name is refused (403 `Unbound`).
async fn auth_remote(
    State(shared): State<Arc<Shared>>,
    Path(route): Path<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let name = route.get("name").cloned().unwrap_or_default();
    let verified = match shared.remotes.get(&name) {
        None => Err(Refusal::Unbound),
        Some(remote) => verify::bearer(&headers).and_then(|token| {
            remote.verify(
                token,
                Utc::now().timestamp(),
                std::time::Instant::now(),
                &shared.policy,
            )
        }),
    };
    match verified {
        Ok(v) => {
            shared.stats.allowed();
            debug!(remote = %name, key = %v.key, kid = %v.kid, "remote token accepted");
            let mut res = StatusCode::OK.into_response();
            res.headers_mut().extend(allowed_headers(&v));
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(r) => {
            shared.stats.refused(r.reason());
            debug!(remote = %name, reason = r.reason(), "remote token refused");
            refusal_response(&r)
        }
    }
}

/// The binding of an unbound route: any key with `--accept-any-key`, else none.
fn unbound(shared: &Shared) -> Result<Binding, Refusal> {
    if shared.accept_any_key {
        Ok(Binding::AnyKey)
    } else {
        Err(Refusal::Unbound)
    }
}

fn allowed_headers(v: &Verified) -> [(HeaderName, HeaderValue); 2] {
    [
        (
            HeaderName::from_static(KEY_HEADER),
            HeaderValue::from_str(&v.key.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
        ),
        (
            HeaderName::from_static(KID_HEADER),
            HeaderValue::from_str(&v.kid).unwrap_or_else(|_| HeaderValue::from_static("invalid")),
        ),
    ]
}

/// A refusal: status, reason header, `WWW-Authenticate` on 401, an empty body.
pub fn refusal_response(r: &Refusal) -> Response {
    let mut res = r.status().into_response();
    let h = res.headers_mut();
    h.insert(
        HeaderName::from_static(REASON_HEADER),
        HeaderValue::from_static(r.reason()),
    );
    if r.status() == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"keyward\", error=\"invalid_token\""),
        );
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `/auth` and `/ext_authz/...`: refused unless `--accept-any-key`.
async fn auth_unbound(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match unbound(&shared) {
        Ok(binding) => auth(&shared, &headers, &binding),
        Err(r) => {
            shared.stats.refused(r.reason());
            refusal_response(&r)
        }
    }
}

/// `/auth/<ns>/<name>` and `/authz/<ns>/<name>[/<the client's path>]` (Envoy appends the
/// request's path to the prefix): the binding is the route's `namespace` and `name`.
async fn auth_bound(
    State(shared): State<Arc<Shared>>,
    Path(route): Path<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let part = |k: &str| route.get(k).cloned().unwrap_or_default();
    auth(
        &shared,
        &headers,
        &Binding::Key(KeyRef::new(part("namespace"), part("name"))),
    )
}

/// nginx `auth_request` on `/auth/<ns>/<name>`: the binding is the route's key, and the
/// route's query may require claims (`?require-claim=scope=bundles:read`, repeatable). The
/// query is the route's configuration: nginx's `auth_request` subrequest carries only the URI
/// its `proxy_pass` names, never the client's query. (The Envoy prefix `/authz/...` ends in the
/// client's own path and query, so it takes requirements only from `--require-claim`.) A
/// malformed requirement refuses every request (403 `ClaimMissing`): a typo never opens a route.
async fn auth_route(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut required = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        if k == "require-claim" {
            required.push(RequiredClaim::parse(&v).unwrap_or(RequiredClaim {
                name: "<malformed require-claim>".into(),
                value: "-".into(),
            }));
        }
    }
    auth_with(
        &shared,
        &headers,
        &Binding::Key(KeyRef::new(namespace, name)),
        &required,
    )
}

/// nginx `auth_request` and Envoy `ext_authz`: 200 with the key headers, or a refusal.
fn auth(shared: &Shared, headers: &HeaderMap, binding: &Binding) -> Response {
    auth_with(shared, headers, binding, &[])
}

fn auth_with(
    shared: &Shared,
    headers: &HeaderMap,
    binding: &Binding,
    required: &[RequiredClaim],
) -> Response {
    match check(shared, headers, binding, required) {
        Ok(v) => {
            let mut res = StatusCode::OK.into_response();
            res.headers_mut().extend(allowed_headers(&v));
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            res
        }
        Err(r) => refusal_response(&r),
    }
}

/// The bundle's JWKS as served: the ConfigMap's own bytes when the trust record lists every key
/// id in it (always, unless someone wrote the ConfigMap), else only the recorded entries.
fn trusted_jwks(params: &KeyParams, bundle: &Bundle) -> Document {
    if bundle
        .jwks
        .keys
        .iter()
        .all(|k| k.kid.as_deref().is_some_and(|kid| params.trusts(kid)))
    {
        return bundle.jwks_doc.clone();
    }
    let jwks = Jwks {
        keys: bundle
            .jwks
            .keys
            .iter()
            .filter(|k| k.kid.as_deref().is_some_and(|kid| params.trusts(kid)))
            .cloned()
            .collect(),
    };
    Document::new(serde_json::to_string_pretty(&jwks).unwrap_or_else(|_| "{\"keys\":[]}".into()))
}

async fn bundle_document(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name, document)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let key = KeyRef::new(namespace, name);
    let found = {
        let index = shared.index.read().unwrap_or_else(|e| e.into_inner());
        index.bundle(&key).and_then(|(params, bundle)| {
            let doc = match document.as_str() {
                "jwks.json" => trusted_jwks(params, bundle),
                "revoked.json" => bundle.revoked_doc.clone(),
                _ => return None,
            };
            Some((doc, max_age(params.publish_delay)))
        })
    };
    let Some((doc, age)) = found else {
        return (StatusCode::NOT_FOUND, "no such trust bundle\n").into_response();
    };
    let etag =
        HeaderValue::from_str(&doc.etag).unwrap_or_else(|_| HeaderValue::from_static("\"\""));
    let cache = HeaderValue::from_str(&cache_control(age))
        .unwrap_or_else(|_| HeaderValue::from_static("no-cache"));
    let mut res = if none_match(&headers, &doc.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut res = doc.body.into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res
    };
    res.headers_mut().insert(header::ETAG, etag);
    res.headers_mut().insert(header::CACHE_CONTROL, cache);
    res
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and what the proxy never passes on.
fn drop_on_forward(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
    ) || name.as_str().starts_with("x-keyward-")
}

/// Reverse proxy: verified requests go to the upstream with the body streamed both ways, the
/// bearer token removed and `X-Keyward-Key`/`-Kid` set (client-sent `X-Keyward-*` dropped);
/// others get the refusal.
async fn proxy(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let Some(upstream) = shared.upstream.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let verified = match shared
        .proxy_binding()
        .and_then(|binding| check(&shared, req.headers(), &binding, &[]))
    {
        Ok(v) => v,
        Err(r) => {
            if r == Refusal::Unbound {
                shared.stats.refused(r.reason());
            }
            return refusal_response(&r);
        }
    };
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri = match format!("{}{}", upstream.base.trim_end_matches('/'), path).parse::<http::Uri>()
    {
        Ok(u) => u,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in parts.headers.iter() {
        if !drop_on_forward(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.extend(allowed_headers(&verified));
    parts.headers = headers;
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let forward = http::Request::from_parts(parts, body);
    match tokio::time::timeout(upstream.timeout, upstream.client.request(forward)).await {
        Err(_) => {
            shared.stats.upstream_timeout();
            warn!(timeout = ?upstream.timeout, "upstream did not answer in time");
            (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n").into_response()
        }
        Ok(Ok(res)) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) => {
            warn!(error = %e, "upstream request failed");
            (StatusCode::BAD_GATEWAY, "upstream unavailable\n").into_response()
        }
    }
}

/// Removes hop-by-hop headers of an upstream response.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(h);
    }
}
