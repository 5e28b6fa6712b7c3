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
use std::time::{Duration, Instant};

use crate::time::ApiClock;
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
    config: kube::Config,
    opts: &ClientOptions,
    stats: &RequestStats,
) -> Result<kube::Client, kube::Error> {
    stack(config, KeywardLayer::new(opts, stats))
}

/// As [`build`], and every response's `Date` header keeps `clock` on the API server's time
/// (see [`ApiClock`]).
pub fn build_with_clock(
    config: kube::Config,
    opts: &ClientOptions,
    stats: &RequestStats,
    clock: Arc<ApiClock>,
) -> Result<kube::Client, kube::Error> {
    stack(config, KeywardLayer::new(opts, stats).with_clock(clock))
}

/// How a 429 (API Priority and Fairness, or a watch cache that is still being filled), 503 or
/// 504 is retried inside one request, at most [`Retry::MAX`] times before the answer goes to the
/// caller:
/// - when the server says when to come back (`Retry-After`), then, every time (plus 0-20 %
///   jitter, never sooner), as client-go does. kube's policy takes the longer of that and its
///   own growing backoff: after an API server restart at 10,000 keys, whose custom-resource
///   watch caches answer 429 with `Retry-After: 1` while they fill (13-17 s in `e2e/bench.sh`),
///   the operator's watch came back up to 4 s after the cache was ready;
/// - otherwise: 100 ms doubling to at most 4 s (jittered). kube's default grows to 1,000 s over
///   15 retries, so one request could wait minutes while its object's own backoff and the
///   outage recovery (`controller::backoff`) wait for it.
#[derive(Clone)]
pub struct Retry {
    backoff: kube::client::retry::RetryPolicy,
    attempt: u32,
}

impl Retry {
    pub const MAX: u32 = 8;

    pub fn new() -> Retry {
        let backoff = kube::client::retry::RetryPolicy::new(
            Duration::from_millis(100),
            Duration::from_secs(4),
            Self::MAX,
            false,
        )
        .unwrap_or_else(|_| kube::client::retry::RetryPolicy::server_retry());
        Retry {
            backoff,
            attempt: 0,
        }
    }

    /// The server's `Retry-After` in whole seconds (the form the API server sends), if any.
    fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
        let secs: u64 = headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        (secs > 0).then(|| Duration::from_secs(secs.min(60)))
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

impl<Res>
    tower::retry::Policy<http::Request<kube::client::Body>, http::Response<Res>, tower::BoxError>
    for Retry
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut http::Request<kube::client::Body>,
        result: &mut Result<http::Response<Res>, tower::BoxError>,
    ) -> Option<Self::Future> {
        if let Ok(response) = result
            && matches!(
                response.status(),
                http::StatusCode::TOO_MANY_REQUESTS
                    | http::StatusCode::SERVICE_UNAVAILABLE
                    | http::StatusCode::GATEWAY_TIMEOUT
            )
            && let Some(asked) = Self::retry_after(response.headers())
        {
            if self.attempt >= Self::MAX {
                return None;
            }
            self.attempt += 1;
            let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 1.0..1.2);
            return Some(tokio::time::sleep(asked.mul_f64(jitter)));
        }
        if self.attempt >= Self::MAX {
            return None;
        }
        let sleep = self.backoff.retry(req, result);
        if sleep.is_some() {
            self.attempt += 1;
        }
        sleep
    }

    fn clone_request(
        &mut self,
        req: &http::Request<kube::client::Body>,
    ) -> Option<http::Request<kube::client::Body>> {
        tower::retry::Policy::<_, http::Response<Res>, tower::BoxError>::clone_request(
            &mut self.backoff,
            req,
        )
    }
}

fn stack(mut config: kube::Config, layer: KeywardLayer) -> Result<kube::Client, kube::Error> {
    // kube adds `config.headers` with `HeaderMap::extend`, which appends: a User-Agent there
    // would travel next to ours. Dropping it makes ours the only one on the wire.
    config
        .headers
        .retain(|(name, _)| name != http::header::USER_AGENT);
    // Our retry policy instead of kube's default one (see [`Retry`]), inside our layer:
    // a request is counted once, with its final answer.
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&tower::retry::RetryLayer::new(Retry::new()))
        .with_layer(&layer)
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
    clock: Option<Arc<ApiClock>>,
}

impl KeywardLayer {
    pub fn new(opts: &ClientOptions, stats: &RequestStats) -> Self {
        KeywardLayer {
            stats: stats.clone(),
            limiter: limiter(opts),
            clock: None,
        }
    }

    /// Every response's `Date` header re-anchors `clock` when it strays ([`ApiClock`]).
    pub fn with_clock(mut self, clock: Arc<ApiClock>) -> Self {
        self.clock = Some(clock);
        self
    }
}

impl<S> tower::Layer<S> for KeywardLayer {
    type Service = KeywardService<S>;
    fn layer(&self, inner: S) -> KeywardService<S> {
        KeywardService {
            inner,
            stats: self.stats.clone(),
            limiter: self.limiter.clone(),
            clock: self.clock.clone(),
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
    clock: Option<Arc<ApiClock>>,
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
            clock: self.clock.clone(),
            verb,
        }
    }
}

/// The response of a request, counted by verb and status code when it arrives (for a watch:
/// when its stream starts).
pub struct ResponseFuture<F> {
    inner: Pin<Box<F>>,
    stats: RequestStats,
    clock: Option<Arc<ApiClock>>,
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
        if let (Some(clock), Ok(r)) = (&self.clock, &res) {
            let date = r
                .headers()
                .get(http::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::time::parse_http_date);
            if let Some(moved) = date.and_then(|d| clock.observe_date(d, Instant::now())) {
                // Re-anchoring by up to a few seconds is the Date header's own resolution at
                // start; more means the local clock and the API server's disagree.
                if moved.num_seconds().abs() >= 5 {
                    tracing::warn!(
                        moved_seconds = moved.num_seconds(),
                        local_skew_seconds = clock.local_skew().num_seconds(),
                        "the local wall clock disagrees with the API server's; keyward keeps the API server's time"
                    );
                }
            }
        }
        self.stats.record_response(self.verb, code);
        Poll::Ready(res)
    }
}

#[cfg(test)]
mod tests;
