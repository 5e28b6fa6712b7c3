//! A test bundle server: the control plane an OPA agent downloads its bundle from.
//!
//! `GET /bundles/authz.tar.gz` with `Authorization: Bearer <token>`. The token is verified
//! against the CURRENT trust bundle ConfigMap, fetched from the API server on every request
//! (a control plane that refreshes its JWKS instantly): `jwks.json` are the trusted keys,
//! `revoked.json` the revoked key ids, and `aud` must be the expected audience. The answer is
//! `200` with a real OPA bundle (`authz.tar.gz`: a `.manifest` with root `authz` and a
//! one-rule policy, which `opa run` activates) and an `ETag`, `304` to an accepted request
//! whose `If-None-Match` carries that ETag (OPA sends it), or `401`.
//!
//! Every request is logged in order with its arrival time, key id, pod, outcome and the trust
//! bundle the decision was made with. The snapshot is what makes the log evidence: a request
//! accepted with a snapshot that still trusts the old key provably happened before the old
//! key was revoked, without comparing clocks of different observers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::core::v1::ConfigMap;
use keyward::keys::{self, Jwks, KeyError};
use keyward::labels as l;
use kube::Api;

/// Header the agents send with their pod's name (OPA: `${POD_NAME}` in its service headers).
pub const POD_NAME: &str = keyward_testbed::POD_NAME_HEADER_OPA;
/// Header the agents send with their pod's uid (a StatefulSet pod keeps its name across rolls).
pub const POD_UID: &str = keyward_testbed::POD_UID_HEADER;

/// The bundle served: a real OPA bundle (gzipped tar, mtime 0) with `.manifest`
/// (`{"revision":"keyward-e2e","roots":["authz"]}`) and `authz/policy.rego`
/// (`default allow := false`).
pub const BUNDLE: &[u8] = include_bytes!("authz.tar.gz");
/// The bundle's ETag (one bundle, one revision).
pub const ETAG: &str = "\"keyward-e2e-1\"";

/// Why a request was answered the way it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// No or malformed `Authorization` header, or a token that does not parse.
    BadRequest(String),
    /// The trust bundle could not be read (API error, missing ConfigMap, bad JSON).
    BundleUnavailable(String),
    /// The key id is not in the trust bundle (and not revoked): not published yet, or unknown.
    Untrusted,
    /// The key id is in the revoked list.
    Revoked,
    /// The test told the server to reject this key id.
    RejectedByTest,
    /// The signature, the time claims or the audience are wrong.
    Invalid(String),
}

/// One logged request.
#[derive(Clone, Debug)]
pub struct Access {
    pub at: Instant,
    pub wall: SystemTime,
    /// The token's `kid` (read before verification, for the log only).
    pub kid: Option<String>,
    pub pod: String,
    pub pod_uid: String,
    pub outcome: Outcome,
    /// The trust bundle the decision was made with (`None` if it could not be read).
    pub bundle: Option<Snapshot>,
}

impl Access {
    pub fn accepted(&self) -> bool {
        self.outcome == Outcome::Accepted
    }
}

/// Trusted and revoked key ids as the server read them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub trusted: Vec<String>,
    pub revoked: Vec<String>,
}

impl Snapshot {
    pub fn trusts(&self, kid: &str) -> bool {
        self.trusted.iter().any(|k| k == kid) && !self.revoked.iter().any(|k| k == kid)
    }
}

#[derive(Default)]
struct Rules {
    /// If set, every key id NOT in this set is answered with 401 ("reject the next key").
    only: Option<BTreeSet<String>>,
}

struct Inner {
    cms: Api<ConfigMap>,
    config_map: String,
    audience: String,
    log: Mutex<Vec<Access>>,
    rules: Mutex<Rules>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running bundle server; stops when dropped.
pub struct BundleServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BundleServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BundleServer {
    /// Starts a server on `127.0.0.1:<ephemeral>` trusting the ConfigMap `config_map` read
    /// through `cms`, and accepting tokens for `audience`.
    pub async fn start(cms: Api<ConfigMap>, config_map: &str, audience: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the bundle server");
        let addr = listener.local_addr().expect("bundle server address");
        let inner = Arc::new(Inner {
            cms,
            config_map: config_map.to_string(),
            audience: audience.to_string(),
            log: Mutex::new(Vec::new()),
            rules: Mutex::new(Rules::default()),
        });
        let app = Router::new()
            .route("/bundles/authz.tar.gz", get(bundle))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("[e2e] bundle server failed: {e}");
            }
        });
        BundleServer { addr, inner, task }
    }

    /// The service URL the agents are configured with (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Rejects every key id except `kids` from now on: "reject the next key".
    pub fn reject_all_but(&self, kids: &[&str]) {
        lock(&self.inner.rules).only = Some(kids.iter().map(|k| k.to_string()).collect());
    }

    /// Drops every rejection rule: the trust bundle alone decides again.
    pub fn accept_all(&self) {
        *lock(&self.inner.rules) = Rules::default();
    }

    /// A copy of the request log, in arrival order.
    pub fn log(&self) -> Vec<Access> {
        lock(&self.inner.log).clone()
    }
}

fn rejected_by_test(rules: &Rules, kid: &str) -> bool {
    rules.only.as_ref().is_some_and(|only| !only.contains(kid))
}

async fn read_bundle(inner: &Inner) -> Result<(Jwks, Snapshot), String> {
    let cm = inner
        .cms
        .get_opt(&inner.config_map)
        .await
        .map_err(|e| format!("cannot read ConfigMap {}: {e}", inner.config_map))?
        .ok_or_else(|| format!("ConfigMap {} not found", inner.config_map))?;
    let data = cm.data.unwrap_or_default();
    let jwks: Jwks = data
        .get(l::DATA_JWKS)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| format!("{}: {e}", l::DATA_JWKS))?
        .unwrap_or_default();
    let revoked: Vec<String> = data
        .get(l::DATA_REVOKED)
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| format!("{}: {e}", l::DATA_REVOKED))?
        .unwrap_or_default();
    let snapshot = Snapshot {
        trusted: jwks.key_ids(),
        revoked,
    };
    Ok((jwks, snapshot))
}

async fn bundle(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let at = Instant::now();
    let wall = SystemTime::now();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string()
    };
    let (pod, pod_uid) = (text(POD_NAME), text(POD_UID));
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let kid = token
        .and_then(|t| keys::decode_token_unverified(t).ok())
        .map(|(h, _)| h.kid);
    let (outcome, snapshot) = match (token, &kid) {
        (None, _) => (Outcome::BadRequest("no bearer token".into()), None),
        (Some(_), None) => (Outcome::BadRequest("token does not parse".into()), None),
        (Some(token), Some(kid)) => match read_bundle(&inner).await {
            Err(e) => (Outcome::BundleUnavailable(e), None),
            Ok((jwks, snapshot)) => {
                let now = chrono::Utc::now().timestamp();
                let outcome = if rejected_by_test(&lock(&inner.rules), kid) {
                    Outcome::RejectedByTest
                } else {
                    match keys::verify_token(token, &jwks, &snapshot.revoked, now, 5) {
                        Ok((_, claims)) if claims.aud == inner.audience => Outcome::Accepted,
                        Ok((_, claims)) => Outcome::Invalid(format!("audience {:?}", claims.aud)),
                        Err(KeyError::UnknownKeyId(_)) => Outcome::Untrusted,
                        Err(KeyError::TokenRevoked(_)) => Outcome::Revoked,
                        Err(e) => Outcome::Invalid(e.reason().to_string()),
                    }
                };
                (outcome, Some(snapshot))
            }
        },
    };
    let accepted = outcome == Outcome::Accepted;
    lock(&inner.log).push(Access {
        at,
        wall,
        kid,
        pod,
        pod_uid,
        outcome: outcome.clone(),
        bundle: snapshot,
    });
    if accepted {
        let unchanged = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == ETAG));
        if unchanged {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, ETAG)]).into_response();
        }
        (
            [
                (header::CONTENT_TYPE, "application/gzip"),
                (header::ETAG, ETAG),
            ],
            BUNDLE,
        )
            .into_response()
    } else {
        let status = match outcome {
            Outcome::BundleUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        (status, format!("{outcome:?}\n")).into_response()
    }
}
