//! The Kubernetes client Keyward talks through: every request carries the `keyward/<version>`
//! User-Agent, is counted by what it asks for ([`RequestStats`]), and waits for a client-side
//! token bucket (`qps`, `burst`) before it is sent.
//!
//! All three live in one tower layer wrapped around kube's default stack (TLS, auth, the
//! 429/503/504 retry), so they see each request once, as the operator issued it; a request
//! that kube retries internally is counted and limited once.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{HeaderValue, Method, Request, Uri};

/// Sent as `User-Agent` on every request, so API server audit logs, APF and metrics name us.
pub const USER_AGENT: &str = concat!("keyward/", env!("CARGO_PKG_VERSION"));

/// Default steady request rate (requests per second) the client allows itself.
pub const DEFAULT_QPS: f32 = 2000.0;
/// Default number of requests that may go out at once above the steady rate.
pub const DEFAULT_BURST: u32 = 4000;

/// Client-side limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOptions {
    /// Steady requests per second; `0` (or anything not positive) disables limiting.
    pub qps: f32,
    /// Requests allowed at once before the steady rate applies (at least 1).
    pub burst: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            qps: DEFAULT_QPS,
            burst: DEFAULT_BURST,
        }
    }
}

impl ClientOptions {
    /// No client-side limiting (tests, tools).
    pub fn unlimited() -> Self {
        ClientOptions {
            qps: 0.0,
            burst: DEFAULT_BURST,
        }
    }
}

/// Builds the operator's client from `config`: kube's default stack plus [`KeywardLayer`].
pub fn build(
    mut config: kube::Config,
    opts: &ClientOptions,
    stats: &RequestStats,
) -> Result<kube::Client, kube::Error> {
    // kube adds `config.headers` with `HeaderMap::extend`, which appends: a User-Agent there
    // would travel next to ours. Dropping it makes ours the only one on the wire.
    config
        .headers
        .retain(|(name, _)| name != http::header::USER_AGENT);
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&KeywardLayer::new(opts, stats))
        .build())
}

// ---------------------------------------------------------------------------------------------
// Request classification

/// The Kubernetes verb of a request, as the API server's audit log and RBAC name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
    /// A method Kubernetes gives no verb (counted as a write, to be safe).
    Other,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
            Verb::Other => "other",
        }
    }

    /// Anything that is not a read (get, list, watch) is a write: Events and status included.
    pub fn is_write(self) -> bool {
        !matches!(self, Verb::Get | Verb::List | Verb::Watch)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// One object (the path names it).
    Named,
    /// A collection in one namespace.
    Namespace,
    /// A collection across the cluster (all namespaces, or a cluster-scoped resource).
    Cluster,
    /// Not a resource: `/version`, discovery (`/api`, `/apis/<group>/<version>`), `/openapi`.
    NonResource,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Named => "named",
            Scope::Namespace => "namespace",
            Scope::Cluster => "cluster",
            Scope::NonResource => "non-resource",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A class of requests: what was asked, of which resource, with which query parameters. No
/// namespace, name or parameter value enters it, so the number of keys stays small and no
/// object name or selector value leaks into a metric or a log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKey {
    pub verb: Verb,
    /// Plural resource (`secrets`, `provisioningkeys`, `events`, `leases`); the path for a
    /// non-resource request.
    pub resource: String,
    /// e.g. `status`; `None` for the object itself.
    pub subresource: Option<String>,
    pub scope: Scope,
    /// Query parameter names, sorted, deduplicated, comma-joined (`fieldManager,force`).
    pub query: String,
}

/// Namespace subresources: `/api/v1/namespaces/{name}/status` is the namespace's own status,
/// not a collection called `status` in that namespace (the API server's rule, mirrored).
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

impl RequestKey {
    /// Classifies a request as the API server would (`k8s.io/apiserver` RequestInfo).
    pub fn classify(method: &Method, uri: &Uri) -> RequestKey {
        let mut names: Vec<&str> = Vec::new();
        let mut watch_param = false;
        for pair in uri.query().unwrap_or("").split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name.is_empty() {
                continue;
            }
            if name == "watch" {
                watch_param = matches!(value, "true" | "1");
            }
            names.push(name);
        }
        names.sort_unstable();
        names.dedup();
        let query = names.join(",");

        let path = uri.path();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let rest = match segments.as_slice() {
            ["api", _, rest @ ..] | ["apis", _, _, rest @ ..] if !rest.is_empty() => rest,
            _ => {
                let verb = match *method {
                    Method::GET | Method::HEAD => Verb::Get,
                    Method::POST => Verb::Create,
                    Method::PUT => Verb::Update,
                    Method::PATCH => Verb::Patch,
                    Method::DELETE => Verb::Delete,
                    _ => Verb::Other,
                };
                return RequestKey {
                    verb,
                    resource: path.to_string(),
                    subresource: None,
                    scope: Scope::NonResource,
                    query,
                };
            }
        };
        // The deprecated `/watch/` path prefix (kube uses `?watch=true`).
        let (legacy_watch, rest) = match rest {
            ["watch", rest @ ..] if !rest.is_empty() => (true, rest),
            _ => (false, rest),
        };
        let (namespaced, parts) = match rest {
            ["namespaces", _ns, parts @ ..]
                if parts
                    .first()
                    .is_some_and(|r| !NAMESPACE_SUBRESOURCES.contains(r)) =>
            {
                (true, parts)
            }
            _ => (false, rest),
        };
        let (resource, name, subresource) = match parts {
            [resource] => (*resource, None, None),
            [resource, name] => (*resource, Some(*name), None),
            [resource, name, sub @ ..] => (*resource, Some(*name), Some(sub.join("/"))),
            // Unreachable: `rest` is non-empty and so is every slice taken from it above.
            [] => ("", None, None),
        };
        let scope = match (name, namespaced) {
            (Some(_), _) => Scope::Named,
            (None, true) => Scope::Namespace,
            (None, false) => Scope::Cluster,
        };
        let verb = match *method {
            Method::GET | Method::HEAD if legacy_watch || watch_param => Verb::Watch,
            Method::GET | Method::HEAD if name.is_some() => Verb::Get,
            Method::GET | Method::HEAD => Verb::List,
            Method::POST => Verb::Create,
            Method::PUT => Verb::Update,
            Method::PATCH => Verb::Patch,
            Method::DELETE if name.is_some() => Verb::Delete,
            Method::DELETE => Verb::DeleteCollection,
            _ => Verb::Other,
        };
        RequestKey {
            verb,
            resource: resource.to_string(),
            subresource,
            scope,
            query,
        }
    }

    /// A LIST (not a watch) of a whole namespace or cluster collection: the expensive request
    /// class (it reads every matching object from etcd or the watch cache) that must stay off
    /// the reconcile hot path.
    pub fn is_collection_list(&self) -> bool {
        self.verb == Verb::List && matches!(self.scope, Scope::Namespace | Scope::Cluster)
    }

    pub fn is_write(&self) -> bool {
        self.verb.is_write()
    }
}

impl fmt::Display for RequestKey {
    /// `patch provisioningkeys/status (named) ?fieldManager,force`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(sub) = &self.subresource {
            write!(f, "/{sub}")?;
        }
        write!(f, " ({})", self.scope)?;
        if !self.query.is_empty() {
            write!(f, " ?{}", self.query)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Counting

/// Counts every request the client sends, by [`RequestKey`], and every response by verb and
/// status code (the `keyward_kube_requests_total` metric). Cheap to clone (one `Arc`); clones
/// share the counts.
#[derive(Clone, Debug, Default)]
pub struct RequestStats(Arc<StatsInner>);

#[derive(Debug, Default)]
struct StatsInner {
    requests: Mutex<BTreeMap<RequestKey, u64>>,
    responses: Mutex<BTreeMap<(Verb, ResponseCode), u64>>,
}

/// The outcome of a request: the HTTP status code of its response, or no response at all
/// (connection, TLS or timeout error).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResponseCode {
    Status(u16),
    /// No response (client-go's `rest_client_requests_total` calls it `<error>` too).
    Error,
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseCode::Status(c) => write!(f, "{c}"),
            ResponseCode::Error => f.write_str("<error>"),
        }
    }
}

impl RequestStats {
    fn counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<RequestKey, u64>> {
        // A panic while holding the lock cannot leave a count half-written: use it anyway.
        self.0.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn response_counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Verb, ResponseCode), u64>> {
        self.0.responses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one response (or failure) of a request with `verb`.
    pub fn record_response(&self, verb: Verb, code: ResponseCode) {
        *self.response_counts().entry((verb, code)).or_insert(0) += 1;
    }

    /// Responses so far, by verb and status code.
    pub fn responses(&self) -> BTreeMap<(Verb, ResponseCode), u64> {
        self.response_counts().clone()
    }

    pub fn record(&self, key: RequestKey) {
        *self.counts().entry(key).or_insert(0) += 1;
    }

    pub fn record_request<B>(&self, req: &Request<B>) {
        self.record(RequestKey::classify(req.method(), req.uri()));
    }

    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<RequestKey, u64> {
        self.counts().clone()
    }

    /// Requests that are not get, list or watch (Events and status patches included).
    pub fn writes(&self) -> u64 {
        self.counts()
            .iter()
            .filter(|(k, _)| k.is_write())
            .map(|(_, n)| n)
            .sum()
    }

    /// The write count (what `controller::WriteCounter::get` always returned).
    pub fn get(&self) -> u64 {
        self.writes()
    }

    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    pub fn reset(&self) {
        self.counts().clear();
        self.response_counts().clear();
    }

    /// The counts so far as a printable table.
    pub fn table(&self) -> RequestTable {
        RequestTable(self.snapshot())
    }
}

/// A snapshot printed as an aligned table, most frequent first, with totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestTable(pub BTreeMap<RequestKey, u64>);

impl fmt::Display for RequestTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = ["COUNT", "VERB", "RESOURCE", "SCOPE", "QUERY"];
        let mut rows: Vec<(u64, [String; 5])> = self
            .0
            .iter()
            .map(|(k, n)| {
                let resource = match &k.subresource {
                    Some(sub) => format!("{}/{sub}", k.resource),
                    None => k.resource.clone(),
                };
                (
                    *n,
                    [
                        n.to_string(),
                        k.verb.to_string(),
                        resource,
                        k.scope.to_string(),
                        k.query.clone(),
                    ],
                )
            })
            .collect();
        rows.sort_by_key(|row| std::cmp::Reverse(row.0));
        let mut widths = header.map(str::len);
        for (_, cells) in &rows {
            for (w, c) in widths.iter_mut().zip(cells) {
                *w = (*w).max(c.len());
            }
        }
        let line = |f: &mut fmt::Formatter<'_>, cells: [&str; 5]| -> fmt::Result {
            let [w0, w1, w2, w3, _] = widths;
            let out = format!(
                "{:>w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
                cells[0], cells[1], cells[2], cells[3], cells[4]
            );
            writeln!(f, "{}", out.trim_end())
        };
        line(f, header)?;
        for (_, cells) in &rows {
            line(f, cells.each_ref().map(String::as_str))?;
        }
        let total: u64 = self.0.values().sum();
        let writes: u64 = self
            .0
            .iter()
            .filter(|(k, _)| k.is_write())
            .map(|(_, n)| n)
            .sum();
        write!(f, "total {total}, writes {writes}")
    }
}

// ---------------------------------------------------------------------------------------------
// The layer

/// governor's clock reading tokio's clock, so the bucket and the sleeps that wait for it use one
/// time source (and a paused tokio clock pauses the bucket too).
#[derive(Clone, Copy, Debug, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;
    fn now(&self) -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<std::time::Instant>>;

fn limiter(opts: &ClientOptions) -> Option<Arc<Limiter>> {
    if !(opts.qps.is_finite() && opts.qps > 0.0) {
        return None;
    }
    // A period too small to represent (absurd qps) means no effective limit.
    let period = Duration::try_from_secs_f64(1.0 / f64::from(opts.qps)).ok()?;
    let burst = NonZeroU32::new(opts.burst.max(1))?;
    let quota = Quota::with_period(period)?.allow_burst(burst);
    Some(Arc::new(RateLimiter::direct_with_clock(quota, TokioClock)))
}

/// Sets the User-Agent, counts, and rate-limits every request (see the module docs).
#[derive(Clone)]
pub struct KeywardLayer {
    stats: RequestStats,
    limiter: Option<Arc<Limiter>>,
}

impl KeywardLayer {
    pub fn new(opts: &ClientOptions, stats: &RequestStats) -> Self {
        KeywardLayer {
            stats: stats.clone(),
            limiter: limiter(opts),
        }
    }
}

impl<S> tower::Layer<S> for KeywardLayer {
    type Service = KeywardService<S>;
    fn layer(&self, inner: S) -> KeywardService<S> {
        KeywardService {
            inner,
            stats: self.stats.clone(),
            limiter: self.limiter.clone(),
            gate: Gate::Idle,
        }
    }
}

/// Where a service is in taking a token for its next request.
enum Gate {
    Idle,
    Waiting(Pin<Box<tokio::time::Sleep>>),
    /// A token is taken; the next `call` spends it.
    Permitted,
}

/// See [`KeywardLayer`].
pub struct KeywardService<S> {
    inner: S,
    stats: RequestStats,
    limiter: Option<Arc<Limiter>>,
    gate: Gate,
}

impl<S, B, RB> tower::Service<Request<B>> for KeywardService<S>
where
    S: tower::Service<Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    /// Not ready until the bucket has a token. kube's `Client` puts a `Buffer` in front of this
    /// service, whose single worker drives `poll_ready` then `call` for one queued request at a
    /// time, so requests take tokens in arrival order and concurrent callers simply queue. The
    /// token is taken here, not in `call`, because a request must not be sent before it has
    /// one, and `call` cannot wait.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if let Some(limiter) = &self.limiter {
            loop {
                match &mut self.gate {
                    Gate::Permitted => break,
                    Gate::Waiting(sleep) => {
                        if sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        self.gate = Gate::Idle;
                    }
                    Gate::Idle => match limiter.check() {
                        Ok(()) => self.gate = Gate::Permitted,
                        Err(not_until) => {
                            let at = tokio::time::Instant::from_std(not_until.earliest_possible());
                            self.gate = Gate::Waiting(Box::pin(tokio::time::sleep_until(at)));
                        }
                    },
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.gate = Gate::Idle;
        // `insert` replaces any User-Agent a caller set on this request.
        req.headers_mut().insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(USER_AGENT),
        );
        let key = RequestKey::classify(req.method(), req.uri());
        let verb = key.verb;
        self.stats.record(key);
        ResponseFuture {
            inner: Box::pin(self.inner.call(req)),
            stats: self.stats.clone(),
            verb,
        }
    }
}

/// The response of a request, counted by verb and status code when it arrives (for a watch:
/// when its stream starts).
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    stats: RequestStats,
    verb: Verb,
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let res = std::task::ready!(self.inner.as_mut().poll(cx));
        let code = match &res {
            Ok(r) => ResponseCode::Status(r.status().as_u16()),
            Err(_) => ResponseCode::Error,
        };
        self.stats.record_response(self.verb, code);
        Poll::Ready(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

    fn key(verb: Verb, resource: &str, sub: Option<&str>, scope: Scope, query: &str) -> RequestKey {
        RequestKey {
            verb,
            resource: resource.into(),
            subresource: sub.map(Into::into),
            scope,
            query: query.into(),
        }
    }

    #[test]
    fn classifies_requests() {
        use Scope::*;
        use Verb::*;
        let cases: &[(&str, &str, RequestKey)] = &[
            // Core group, namespaced.
            (
                "GET",
                "/api/v1/namespaces/ns/secrets/pk-key",
                key(Get, "secrets", None, Named, ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/ns/secrets?labelSelector=app%3Dx",
                key(List, "secrets", None, Namespace, "labelSelector"),
            ),
            (
                "GET",
                "/api/v1/namespaces/ns/secrets?watch=true&resourceVersion=12&labelSelector=a&timeoutSeconds=290&allowWatchBookmarks=true",
                key(
                    Watch,
                    "secrets",
                    None,
                    Namespace,
                    "allowWatchBookmarks,labelSelector,resourceVersion,timeoutSeconds,watch",
                ),
            ),
            (
                "GET",
                "/api/v1/secrets?resourceVersionMatch=NotOlderThan&resourceVersion=0",
                key(
                    List,
                    "secrets",
                    None,
                    Cluster,
                    "resourceVersion,resourceVersionMatch",
                ),
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/ns/configmaps",
                key(Watch, "configmaps", None, Namespace, ""),
            ),
            (
                "POST",
                "/api/v1/namespaces/ns/configmaps?fieldManager=keyward",
                key(Create, "configmaps", None, Namespace, "fieldManager"),
            ),
            (
                "PUT",
                "/api/v1/namespaces/ns/configmaps/b",
                key(Update, "configmaps", None, Named, ""),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/secrets/old",
                key(Delete, "secrets", None, Named, ""),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/ns/secrets?labelSelector=x",
                key(
                    DeleteCollection,
                    "secrets",
                    None,
                    Namespace,
                    "labelSelector",
                ),
            ),
            (
                "GET",
                "/api/v1/namespaces/ns/pods/opa-0:8181/proxy/health?bundles=true",
                key(Get, "pods", Some("proxy/health"), Named, "bundles"),
            ),
            // Namespaces themselves (cluster-scoped), and their subresources.
            (
                "GET",
                "/api/v1/namespaces",
                key(List, "namespaces", None, Cluster, ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/ns",
                key(Get, "namespaces", None, Named, ""),
            ),
            (
                "PUT",
                "/api/v1/namespaces/ns/finalize",
                key(Update, "namespaces", Some("finalize"), Named, ""),
            ),
            // Other groups.
            (
                "PATCH",
                "/apis/keyward.dev/v1alpha1/namespaces/ns/provisioningkeys/pk/status?fieldManager=keyward&force=true",
                key(
                    Patch,
                    "provisioningkeys",
                    Some("status"),
                    Named,
                    "fieldManager,force",
                ),
            ),
            (
                "GET",
                "/apis/keyward.dev/v1alpha1/provisioningkeys?limit=1",
                key(List, "provisioningkeys", None, Cluster, "limit"),
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/ns/events",
                key(Create, "events", None, Namespace, ""),
            ),
            (
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/ns/leases/keyward",
                key(Update, "leases", None, Named, ""),
            ),
            (
                "PATCH",
                "/apis/apps/v1/namespaces/ns/deployments/web?fieldManager=keyward",
                key(Patch, "deployments", None, Named, "fieldManager"),
            ),
            (
                "GET",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/provisioningkeys.keyward.dev",
                key(Get, "customresourcedefinitions", None, Named, ""),
            ),
            (
                "GET",
                "/apis/apps/v1/deployments?watch=1",
                key(Watch, "deployments", None, Cluster, "watch"),
            ),
            // watch=false is a list; repeated and empty names collapse.
            (
                "GET",
                "/apis/apps/v1/deployments?watch=false&b=1&a=2&b=3&",
                key(List, "deployments", None, Cluster, "a,b,watch"),
            ),
            // Non-resource requests.
            (
                "GET",
                "/version",
                key(Get, "/version", None, NonResource, ""),
            ),
            (
                "GET",
                "/apis/apps/v1",
                key(Get, "/apis/apps/v1", None, NonResource, ""),
            ),
            ("GET", "/api", key(Get, "/api", None, NonResource, "")),
        ];
        for (method, uri, want) in cases {
            let got =
                RequestKey::classify(&method.parse().expect("method"), &uri.parse().expect("uri"));
            assert_eq!(&got, want, "{method} {uri}");
            // No parameter value ever enters a key.
            for value in ["keyward", "app%3Dx", "NotOlderThan", "290", "pk-key", "ns"] {
                assert!(
                    !got.query.contains(value) && got.resource != *value,
                    "{method} {uri}: {got}"
                );
            }
        }
    }

    #[test]
    fn collection_lists_are_flagged() {
        let classify =
            |m: &str, u: &str| RequestKey::classify(&m.parse().unwrap(), &u.parse().unwrap());
        assert!(classify("GET", "/api/v1/namespaces/ns/secrets").is_collection_list());
        assert!(classify("GET", "/api/v1/secrets?labelSelector=a").is_collection_list());
        assert!(!classify("GET", "/api/v1/namespaces/ns/secrets/a").is_collection_list());
        assert!(!classify("GET", "/api/v1/secrets?watch=true").is_collection_list());
        assert!(!classify("DELETE", "/api/v1/namespaces/ns/secrets").is_collection_list());
        assert!(!classify("GET", "/version").is_collection_list());
    }

    #[test]
    fn stats_count_and_print() {
        let stats = RequestStats::default();
        let clone = stats.clone();
        let get = |u: &str| Request::get(u).body(()).unwrap();
        clone.record_request(&get("/api/v1/namespaces/ns/secrets/a"));
        clone.record_request(&get("/api/v1/namespaces/ns/secrets/b"));
        clone.record_request(&get("/api/v1/namespaces/ns/secrets?labelSelector=x"));
        clone.record_request(
            &Request::post("/apis/events.k8s.io/v1/namespaces/ns/events")
                .body(())
                .unwrap(),
        );
        assert_eq!(stats.total(), 4);
        assert_eq!(stats.writes(), 1);
        assert_eq!(stats.get(), 1);
        let snap = stats.snapshot();
        assert_eq!(
            snap[&key(Verb::Get, "secrets", None, Scope::Named, "")],
            2,
            "{snap:?}"
        );
        let table = stats.table().to_string();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 5, "{table}");
        assert!(lines[0].starts_with("COUNT  VERB"), "{table}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["2", "get", "secrets", "named"],
            "most frequent first:\n{table}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["1", "list", "secrets", "namespace", "labelSelector"],
            "{table}"
        );
        assert_eq!(lines[4], "total 4, writes 1");
        stats.reset();
        assert_eq!((clone.total(), clone.writes()), (0, 0));
    }

    /// One request a tiny API server saw: method, URI, User-Agent values.
    type SeenRequest = (String, String, Vec<String>);

    /// What a tiny API server saw.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<SeenRequest>>>);

    /// Serves `{}` for every request on a loopback port, recording method, URI and User-Agents.
    async fn api_server() -> (kube::Config, Seen) {
        let seen = Seen::default();
        let recorder = seen.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let recorder = recorder.clone();
            async move {
                let agents = req
                    .headers()
                    .get_all(http::header::USER_AGENT)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                recorder.0.lock().unwrap().push((
                    req.method().to_string(),
                    req.uri().to_string(),
                    agents,
                ));
                (
                    [(http::header::CONTENT_TYPE, "application/json")],
                    r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"ns"}}"#,
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (config, seen)
    }

    /// Our User-Agent is on the wire, alone, even when the kubeconfig's headers bring another.
    #[tokio::test]
    async fn user_agent_on_the_wire() {
        let (mut config, seen) = api_server().await;
        config.headers.push((
            http::header::USER_AGENT,
            HeaderValue::from_static("someone-else/1"),
        ));
        let stats = RequestStats::default();
        let client = build(config, &ClientOptions::default(), &stats).unwrap();
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
        cms.get("x").await.unwrap();
        client.apiserver_version().await.ok();
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        for (method, uri, agents) in &seen {
            assert_eq!(agents, &[USER_AGENT.to_string()], "{method} {uri}");
        }
        assert!(USER_AGENT.starts_with("keyward/") && USER_AGENT.len() > "keyward/".len());
        assert_eq!(stats.total(), 2);
        assert_eq!(stats.writes(), 0);
    }

    /// Events and status patches are writes; reads are not.
    #[tokio::test]
    async fn writes_include_events_and_status() {
        let (config, seen) = api_server().await;
        let stats = RequestStats::default();
        let client = build(config, &ClientOptions::unlimited(), &stats).unwrap();

        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "keyward".into(),
                instance: None,
            },
        );
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("x".into()),
                namespace: Some("ns".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        // The reply is not an Event; only the request matters here.
        let _ = recorder
            .publish(
                &kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Normal,
                    reason: "KeyMinted".into(),
                    note: Some("k1".into()),
                    action: "Mint".into(),
                    secondary: None,
                },
                &kube::Resource::object_ref(&cm, &()),
            )
            .await;
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
        cms.patch_status(
            "x",
            &PatchParams::apply("keyward").force(),
            &Patch::Apply(serde_json::json!({})),
        )
        .await
        .unwrap();
        cms.list(&ListParams::default().labels("a=b")).await.ok();
        cms.create(&PostParams::default(), &cm).await.unwrap();

        let snap = stats.snapshot();
        assert_eq!(stats.writes(), 3, "{}", stats.table());
        assert_eq!(stats.total(), 4, "{}", stats.table());
        assert_eq!(
            snap.get(&key(Verb::Create, "events", None, Scope::Namespace, "")),
            Some(&1),
            "{}",
            stats.table()
        );
        assert_eq!(
            snap.get(&key(
                Verb::Patch,
                "configmaps",
                Some("status"),
                Scope::Named,
                "fieldManager,force"
            )),
            Some(&1),
            "{}",
            stats.table()
        );
        assert!(
            snap.keys().any(|k| k.is_collection_list()),
            "{}",
            stats.table()
        );
        assert_eq!(seen.0.lock().unwrap().len(), 4);
        // Every response is counted by verb and status code (the fake server answers 200).
        let responses = stats.responses();
        assert_eq!(
            responses.get(&(Verb::Create, ResponseCode::Status(200))),
            Some(&2),
            "{responses:?}"
        );
        assert_eq!(responses.values().sum::<u64>(), 4, "{responses:?}");
    }

    /// A client whose "API server" answers `{}` at once, in process.
    fn instant_client(opts: &ClientOptions, stats: &RequestStats) -> kube::Client {
        let service = tower::service_fn(|_req: Request<kube::client::Body>| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(b"{}".to_vec()))
                    .unwrap(),
            )
        });
        kube::client::ClientBuilder::new(service, "default")
            .with_layer(&KeywardLayer::new(opts, stats))
            .build()
    }

    async fn send_concurrently(client: &kube::Client, n: usize) {
        let requests = (0..n).map(|i| {
            let client = client.clone();
            async move {
                client
                    .request_text(
                        Request::get(format!("/api/v1/namespaces/ns/configmaps/c{i}"))
                            .body(Vec::new())
                            .unwrap(),
                    )
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(requests).await;
    }

    /// qps 10, burst 2: two requests go at once, the other ten one per 100 ms, so twelve
    /// concurrent requests take 1 s. Real time: the lower bound is what proves the limit; the
    /// upper one is generous for a busy machine.
    #[tokio::test]
    async fn limiter_spaces_requests() {
        let stats = RequestStats::default();
        let client = instant_client(
            &ClientOptions {
                qps: 10.0,
                burst: 2,
            },
            &stats,
        );
        let start = std::time::Instant::now();
        send_concurrently(&client, 12).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(950) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(stats.total(), 12);

        // The bucket refills to its burst, no more: after a pause, two go at once again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let start = std::time::Instant::now();
        send_concurrently(&client, 2).await;
        assert!(
            start.elapsed() < Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn qps_zero_disables_limiting() {
        let stats = RequestStats::default();
        let client = instant_client(&ClientOptions { qps: 0.0, burst: 1 }, &stats);
        let start = std::time::Instant::now();
        send_concurrently(&client, 200).await;
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(stats.total(), 200);
        assert!(limiter(&ClientOptions::unlimited()).is_none());
        assert!(limiter(&ClientOptions::default()).is_some());
    }
}
