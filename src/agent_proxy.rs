//! `keyward agent-proxy`: a loopback sidecar that attaches the pod's identity to an agent's
//! requests (docs/agent-proxy.md).
//!
//! An agent (OPA) downloads its bundles from the control plane with a bearer token, the key
//! token Keyward hands out, and can add only static headers. The verifier in front of the
//! control plane wants to know which pod used which key, and a client-chosen header can be
//! forged by any pod. So the agent talks to this proxy on loopback, and the proxy forwards
//! every request to `--upstream` with the pod's projected ServiceAccount token (audience
//! `keyward`) in [`POD_TOKEN_HEADER`], which the verifier checks with a TokenReview.
//!
//! Per request: the client's own [`POD_TOKEN_HEADER`] and the hop-by-hop headers are removed;
//! the token file is read afresh (the kubelet swaps it atomically through a symlink when it
//! refreshes it), and when it cannot be used the request is forwarded without it (the download
//! must not break; only the per-pod acknowledgement is lost), counted, and warned about at most
//! once per [`WARN_EVERY`]. Bodies are streamed both ways, nothing is buffered. The token and
//! the `Authorization` header never reach a log line or an error.
//!
//! The server is the verifier's hardened loop ([`crate::verifier::serve`]); every path is
//! forwarded, the proxy serves nothing of its own.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use tracing::{debug, warn};
use zeroize::Zeroizing;

use crate::verifier::serve::{self, Limits};
use crate::verifier::stats::Stats;

/// The header the proxy sets (the verifier's; it owns the protocol).
pub use crate::verifier::pod_identity::POD_TOKEN_HEADER;
/// Default of `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8182";
/// Default of `--pod-token-file`: where the example's projected volume puts the token.
pub const DEFAULT_POD_TOKEN_FILE: &str = "/var/run/secrets/keyward/pod-token";
/// Largest token file used; a bigger one is not a ServiceAccount token (they are a few hundred
/// bytes to a few KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// At most one warning about an unusable token file per this long.
pub const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long connecting to the upstream may take (then 502).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the proxy cannot start. No variant carries a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--listen {0:?} is not an IP address and port (e.g. 127.0.0.1:8182)")]
    Listen(String),
    #[error(
        "--listen {0} is not a loopback address: the agent proxy adds the pod's identity to whatever it forwards, so it listens only on 127.0.0.0/8 or ::1"
    )]
    NotLoopback(SocketAddr),
    #[error("--upstream {url:?}: {reason}")]
    Upstream { url: String, reason: &'static str },
    #[error("--upstream-ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("--upstream-ca-file needs an https:// --upstream")]
    CaWithoutHttps,
    #[error("building the upstream client: {0}")]
    Client(reqwest::Error),
}

impl Error {
    /// A static PascalCase name of the failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Listen(_) => "InvalidListen",
            Error::NotLoopback(_) => "ListenNotLoopback",
            Error::Upstream { .. } => "InvalidUpstream",
            Error::CaFile { .. } => "InvalidUpstreamCa",
            Error::CaWithoutHttps => "UpstreamCaWithoutHttps",
            Error::Client(_) => "UpstreamClient",
        }
    }
}

/// `--listen`: an IP literal and port on loopback (any of 127.0.0.0/8, or ::1).
pub fn listen_addr(s: &str) -> Result<SocketAddr, Error> {
    let addr: SocketAddr = s.trim().parse().map_err(|_| Error::Listen(s.into()))?;
    if !addr.ip().is_loopback() {
        return Err(Error::NotLoopback(addr));
    }
    Ok(addr)
}

/// `--upstream`: an `http://` or `https://` base URL without credentials, query or fragment.
/// Returned without a trailing `/`, so that a request's path appends to it.
pub fn upstream_base(s: &str) -> Result<reqwest::Url, Error> {
    let bad = |reason| Error::Upstream {
        url: s.into(),
        reason,
    };
    let url = reqwest::Url::parse(s.trim()).map_err(|_| bad("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must be http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry credentials"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query or a fragment"));
    }
    Ok(url)
}

/// The proxy's settings, from the flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--upstream`.
    pub upstream: reqwest::Url,
    /// `--upstream-ca-file`: trust only these CAs (else the web roots).
    pub upstream_ca_file: Option<PathBuf>,
    /// `--pod-token-file`.
    pub pod_token_file: PathBuf,
    /// `--upstream-timeout`: the upstream's answer (its response head) must arrive within this
    /// (then 504), and so must each read of its body.
    pub upstream_timeout: Duration,
    /// Honour `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` for the upstream (on in the binary).
    pub env_proxy: bool,
}

impl Settings {
    /// Validates the flags.
    pub fn new(
        listen: &str,
        upstream: &str,
        upstream_ca_file: Option<PathBuf>,
        pod_token_file: PathBuf,
        upstream_timeout: Duration,
    ) -> Result<Settings, Error> {
        let settings = Settings {
            listen: listen_addr(listen)?,
            upstream: upstream_base(upstream)?,
            upstream_ca_file,
            pod_token_file,
            upstream_timeout,
            env_proxy: true,
        };
        if settings.upstream_ca_file.is_some() && settings.upstream.scheme() != "https" {
            return Err(Error::CaWithoutHttps);
        }
        Ok(settings)
    }
}

/// Why the token file was not used. The file's content never appears here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    Unreadable(std::io::ErrorKind),
    TooLarge,
    Empty,
    NotAHeaderValue,
}

impl TokenProblem {
    pub fn reason(self) -> &'static str {
        match self {
            TokenProblem::Unreadable(std::io::ErrorKind::NotFound) => "Missing",
            TokenProblem::Unreadable(_) => "Unreadable",
            TokenProblem::TooLarge => "TooLarge",
            TokenProblem::Empty => "Empty",
            TokenProblem::NotAHeaderValue => "NotAHeaderValue",
        }
    }
}

/// Reads the pod token from `path` as a (sensitive) header value, trimmed of whitespace. The
/// file's bytes are zeroized when read. Runs the read on the blocking pool (a few hundred
/// bytes from a tmpfs).
pub async fn read_token(path: &Path) -> Result<HeaderValue, TokenProblem> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || read_token_blocking(&path))
        .await
        .unwrap_or(Err(TokenProblem::Unreadable(std::io::ErrorKind::Other)))
}

fn read_token_blocking(path: &Path) -> Result<HeaderValue, TokenProblem> {
    let file = std::fs::File::open(path).map_err(|e| TokenProblem::Unreadable(e.kind()))?;
    // Room for the largest accepted token, one more byte to see it is too large, and the
    // reader's probe, so the buffer never reallocates (and leaves no copy behind).
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_TOKEN_BYTES + 64));
    let limit = u64::try_from(MAX_TOKEN_BYTES).unwrap_or(u64::MAX) + 1;
    file.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| TokenProblem::Unreadable(e.kind()))?;
    if buf.len() > MAX_TOKEN_BYTES {
        return Err(TokenProblem::TooLarge);
    }
    let token = buf.trim_ascii();
    if token.is_empty() {
        return Err(TokenProblem::Empty);
    }
    let mut value = HeaderValue::from_bytes(token).map_err(|_| TokenProblem::NotAHeaderValue)?;
    value.set_sensitive(true);
    Ok(value)
}

/// Requests forwarded without a pod token, and when that was last warned about.
#[derive(Default)]
struct Misses {
    total: AtomicU64,
    warned: Mutex<Warned>,
}

#[derive(Default)]
struct Warned {
    at: Option<Instant>,
    /// Misses since the last warning.
    since: u64,
}

impl Misses {
    /// Counts one miss; warns unless a warning went out less than [`WARN_EVERY`] before `now`.
    /// Returns whether it warned.
    fn record(&self, path: &Path, problem: TokenProblem, now: Instant) -> bool {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        warned.since += 1;
        if warned
            .at
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            return false;
        }
        warn!(
            file = %path.display(),
            reason = problem.reason(),
            since_last_warning = warned.since,
            total,
            "forwarding without the pod token: the verifier cannot attribute these requests to this pod"
        );
        *warned = Warned {
            at: Some(now),
            since: 0,
        };
        true
    }
}

/// The proxy: the upstream client and the token file.
pub struct Proxy {
    /// The upstream base URL, without a trailing `/`.
    base: String,
    client: reqwest::Client,
    token_file: PathBuf,
    timeout: Duration,
    misses: Misses,
}

impl Proxy {
    pub fn new(settings: &Settings) -> Result<Proxy, Error> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(settings.upstream_timeout)
            .tcp_nodelay(true);
        if !settings.env_proxy {
            builder = builder.no_proxy();
        }
        if let Some(path) = &settings.upstream_ca_file {
            let ca_error = |reason: String| Error::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ca_error(format!("not PEM certificates ({e})")))?;
            if certs.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Proxy {
            base: settings.upstream.as_str().trim_end_matches('/').to_string(),
            client: builder.build().map_err(Error::Client)?,
            token_file: settings.pod_token_file.clone(),
            timeout: settings.upstream_timeout,
            misses: Misses::default(),
        })
    }

    /// Requests forwarded without a pod token since the start.
    pub fn forwarded_without_token(&self) -> u64 {
        self.misses.total.load(Ordering::Relaxed)
    }

    /// The token file's state now, for a line at startup (not counted).
    pub async fn check_token(&self) -> Result<(), TokenProblem> {
        read_token(&self.token_file).await.map(drop)
    }

    /// The token header for one request, or `None` (counted, warned about).
    async fn pod_token(&self) -> Option<HeaderValue> {
        match read_token(&self.token_file).await {
            Ok(value) => Some(value),
            Err(problem) => {
                self.misses
                    .record(&self.token_file, problem, Instant::now());
                None
            }
        }
    }
}

/// The proxy's router: every method and path goes to the upstream.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new().fallback(forward).with_state(proxy)
}

/// Serves `proxy` on `listener` with the verifier's hardened server loop (default limits)
/// until `shutdown`, then lets open requests finish for at most [`serve::DRAIN`].
pub async fn run(
    listener: tokio::net::TcpListener,
    proxy: Arc<Proxy>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve::serve(
        listener,
        router(proxy),
        Limits::default(),
        Arc::new(Stats::default()),
        None,
        shutdown,
    )
    .await
}

/// Hop-by-hop headers (RFC 9110 7.6.1), `Host` (set for the upstream) and the pod token
/// header, which only the proxy sets.
fn drop_on_forward(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | POD_TOKEN_HEADER
    ) || name.starts_with("proxy-")
}

/// Copies `headers` without the hop-by-hop ones (and those the `Connection` header names) and
/// without those `also_drop` names.
fn forwardable(headers: &HeaderMap, also_drop: impl Fn(&HeaderName) -> bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len() + 1);
    for (name, value) in headers {
        if !also_drop(name) && !named.iter().any(|n| n == name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Forwards one request: the client's headers minus hop-by-hop and its own pod token header,
/// plus the pod token from the file; the body streamed up, the answer streamed back.
async fn forward(State(proxy): State<Arc<Proxy>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.starts_with('/') { path } else { "/" };
    let Ok(url) = reqwest::Url::parse(&format!("{}{path}", proxy.base)) else {
        return plain(StatusCode::BAD_REQUEST, "bad request target\n");
    };
    let mut headers = forwardable(&parts.headers, drop_on_forward);
    if let Some(token) = proxy.pod_token().await {
        headers.insert(POD_TOKEN_HEADER, token);
    }
    let mut request = reqwest::Request::new(parts.method, url);
    *request.headers_mut() = headers;
    *request.body_mut() = Some(reqwest::Body::wrap(SyncBody::new(body)));
    match tokio::time::timeout(proxy.timeout, proxy.client.execute(request)).await {
        Err(_) => {
            warn!(timeout = ?proxy.timeout, "upstream did not answer in time");
            plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
        }
        Ok(Err(e)) if e.is_timeout() && !e.is_connect() => {
            warn!(timeout = ?proxy.timeout, "upstream did not answer in time");
            plain(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
        }
        Ok(Err(e)) => {
            // reqwest's error names the URL and the cause, never a header.
            warn!(error = %e, "upstream request failed");
            plain(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
        }
        Ok(Ok(res)) => {
            debug!(status = %res.status(), "forwarded");
            let res: http::Response<reqwest::Body> = res.into();
            let (mut parts, body) = res.into_parts();
            parts.headers = forwardable(&parts.headers, drop_on_forward);
            Response::from_parts(parts, Body::new(body))
        }
    }
}

/// The client's body, streamed to the upstream. reqwest wants a `Sync` body and axum's is
/// not; a `Mutex` makes it `Sync`, and `get_mut` reaches it without locking.
struct SyncBody(Mutex<Body>);

impl SyncBody {
    fn new(body: Body) -> Self {
        SyncBody(Mutex::new(body))
    }

    fn body(&mut self) -> &mut Body {
        self.0.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl HttpBody for SyncBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(self.get_mut().body()).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        match self.0.try_lock() {
            Ok(body) => body.is_end_stream(),
            Err(_) => false,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.0.try_lock() {
            Ok(body) => body.size_hint(),
            Err(_) => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
