//! The agent proxy against a real local upstream (an axum router on 127.0.0.1:0, over TLS in
//! the https tests) and a real token file.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::response::IntoResponse;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

use super::*;
use crate::verifier::tls::testing::Ca;

/// What the echo upstream saw of a request.
async fn echo(req: Request) -> impl IntoResponse {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let all = |name: &str| -> Vec<String> {
        parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect()
    };
    let seen = json!({
        "method": parts.method.as_str(),
        "target": parts.uri.path_and_query().map(|p| p.as_str()),
        "pod_token": all(POD_TOKEN_HEADER),
        "authorization": all("authorization"),
        "host": all("host"),
        "x_hop": all("x-hop"),
        "x_other": all("x-other"),
        "transfer_encoding": all("transfer-encoding"),
        "body": String::from_utf8_lossy(&body),
    });
    (
        [
            ("x-upstream", "yes"),
            ("x-named-hop", "1"),
            ("connection", "x-named-hop"),
        ],
        [(http::header::CONTENT_TYPE, "application/json")],
        seen.to_string(),
    )
}

fn echo_router() -> Router {
    Router::new().fallback(echo)
}

/// Serves `router` on 127.0.0.1 (TLS with `tls`); the server lives as long as the test's
/// runtime.
async fn upstream(router: Router, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve::serve(
        listener,
        router,
        Limits::default(),
        Arc::new(Stats::default()),
        tls,
        std::future::pending(),
    ));
    addr
}

fn settings(upstream: &str, token_file: &Path, timeout: Duration) -> Settings {
    let mut s = Settings::new(
        "127.0.0.1:0",
        upstream,
        None,
        token_file.to_path_buf(),
        timeout,
    )
    .expect("settings");
    s.env_proxy = false;
    s
}

/// Starts the proxy on its own loopback address; returns its base URL and the proxy.
async fn start(settings: &Settings) -> (String, Arc<Proxy>) {
    let proxy = Arc::new(Proxy::new(settings).expect("proxy"));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(run(listener, proxy.clone(), std::future::pending()));
    (format!("http://{addr}"), proxy)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn seen(res: reqwest::Response) -> Value {
    assert_eq!(res.status(), StatusCode::OK);
    serde_json::from_slice(&res.bytes().await.expect("body")).expect("json")
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

/// Writes `token` to a new file and renames it over `path`, as an atomic writer does.
fn replace(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn forwards_the_file_token_authorization_path_query_and_body() {
    let up = upstream(echo_router(), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "  pod-token-one\n").expect("write");
    let (proxy_url, proxy) = start(&settings(
        &format!("http://{up}/prefix/"),
        &file,
        Duration::from_secs(5),
    ))
    .await;

    let res = client()
        .post(format!(
            "{proxy_url}/bundles/authz.tar.gz?x=1&y=two%20words"
        ))
        .header("authorization", "Bearer the-key-token")
        .header("x-other", "kept")
        .header("x-hop", "gone")
        .header("connection", "x-hop")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .body("the body")
        .send()
        .await
        .expect("send");
    assert_eq!(res.headers()["x-upstream"], "yes");
    assert!(res.headers().get("x-named-hop").is_none());
    let seen = seen(res).await;
    assert_eq!(seen["method"], "POST");
    assert_eq!(
        seen["target"],
        "/prefix/bundles/authz.tar.gz?x=1&y=two%20words"
    );
    assert_eq!(strings(&seen["pod_token"]), ["pod-token-one"]);
    assert_eq!(strings(&seen["authorization"]), ["Bearer the-key-token"]);
    assert_eq!(strings(&seen["host"]), [up.to_string()]);
    assert_eq!(strings(&seen["x_other"]), ["kept"]);
    assert!(strings(&seen["x_hop"]).is_empty());
    assert_eq!(seen["body"], "the body");
    assert_eq!(proxy.forwarded_without_token(), 0);
}

#[tokio::test]
async fn a_forged_pod_token_is_replaced_or_removed() {
    let up = upstream(echo_router(), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "real").expect("write");
    let (proxy_url, proxy) = start(&settings(
        &format!("http://{up}"),
        &file,
        Duration::from_secs(5),
    ))
    .await;
    let forged = || {
        client()
            .get(format!("{proxy_url}/x"))
            .header(POD_TOKEN_HEADER, "forged")
            .header(POD_TOKEN_HEADER, "forged-again")
    };

    let seen_with = seen(forged().send().await.expect("send")).await;
    assert_eq!(strings(&seen_with["pod_token"]), ["real"]);
    // A GET without a body goes up without one (no chunked empty body).
    assert!(strings(&seen_with["transfer_encoding"]).is_empty());

    std::fs::remove_file(&file).expect("remove");
    let seen_without = seen(forged().send().await.expect("send")).await;
    assert!(strings(&seen_without["pod_token"]).is_empty());
    assert_eq!(proxy.forwarded_without_token(), 1);
}

#[tokio::test]
async fn a_replaced_file_is_read_on_the_next_request() {
    let up = upstream(echo_router(), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "first").expect("write");
    let (proxy_url, _) = start(&settings(
        &format!("http://{up}"),
        &file,
        Duration::from_secs(5),
    ))
    .await;
    let get = || client().get(format!("{proxy_url}/")).send();

    assert_eq!(
        strings(&seen(get().await.expect("send")).await["pod_token"]),
        ["first"]
    );
    replace(&file, "second\n");
    assert_eq!(
        strings(&seen(get().await.expect("send")).await["pod_token"]),
        ["second"]
    );
}

/// The kubelet's projected volume: `pod-token -> ..data/pod-token`, `..data -> ..<timestamp>`,
/// and a refresh writes a new timestamped directory and renames a new `..data` link over the
/// old one.
#[tokio::test]
async fn a_kubelet_style_symlink_swap_is_followed() {
    use std::os::unix::fs::symlink;
    let up = upstream(echo_router(), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::create_dir(d.join("..2025_01_01_00_00_00.1")).expect("mkdir");
    std::fs::write(d.join("..2025_01_01_00_00_00.1/pod-token"), "generation-1").expect("write");
    symlink("..2025_01_01_00_00_00.1", d.join("..data")).expect("symlink");
    symlink("..data/pod-token", d.join("pod-token")).expect("symlink");
    let (proxy_url, _) = start(&settings(
        &format!("http://{up}"),
        &d.join("pod-token"),
        Duration::from_secs(5),
    ))
    .await;
    let get = || client().get(format!("{proxy_url}/")).send();
    assert_eq!(
        strings(&seen(get().await.expect("send")).await["pod_token"]),
        ["generation-1"]
    );

    std::fs::create_dir(d.join("..2025_01_01_00_48_00.2")).expect("mkdir");
    std::fs::write(d.join("..2025_01_01_00_48_00.2/pod-token"), "generation-2").expect("write");
    symlink("..2025_01_01_00_48_00.2", d.join("..data_tmp")).expect("symlink");
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("rename");
    std::fs::remove_dir_all(d.join("..2025_01_01_00_00_00.1")).expect("rm old");
    assert_eq!(
        strings(&seen(get().await.expect("send")).await["pod_token"]),
        ["generation-2"]
    );
}

#[tokio::test]
async fn without_a_usable_file_the_request_is_still_forwarded() {
    let up = upstream(echo_router(), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    let (proxy_url, proxy) = start(&settings(
        &format!("http://{up}"),
        &file,
        Duration::from_secs(5),
    ))
    .await;
    let get = || {
        client()
            .get(format!("{proxy_url}/bundle"))
            .header("authorization", "Bearer k")
            .send()
    };

    // Missing, empty, and not a header value: forwarded each time, without the header.
    for content in [None, Some("  \n"), Some("bad\ntoken")] {
        if let Some(content) = content {
            std::fs::write(&file, content).expect("write");
        }
        let seen = seen(get().await.expect("send")).await;
        assert!(strings(&seen["pod_token"]).is_empty(), "{content:?}");
        assert_eq!(strings(&seen["authorization"]), ["Bearer k"]);
    }
    assert_eq!(proxy.forwarded_without_token(), 3);
    assert_eq!(
        proxy.check_token().await,
        Err(TokenProblem::NotAHeaderValue)
    );

    std::fs::write(&file, "ok").expect("write");
    assert_eq!(
        strings(&seen(get().await.expect("send")).await["pod_token"]),
        ["ok"]
    );
    assert_eq!(proxy.forwarded_without_token(), 3);
}

#[tokio::test]
async fn token_file_problems_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    type Case = (Option<Vec<u8>>, Result<&'static str, TokenProblem>);
    let cases: [Case; 6] = [
        (
            None,
            Err(TokenProblem::Unreadable(std::io::ErrorKind::NotFound)),
        ),
        (Some(b"".to_vec()), Err(TokenProblem::Empty)),
        (Some(b" \t\n".to_vec()), Err(TokenProblem::Empty)),
        (Some(b"a\x00b".to_vec()), Err(TokenProblem::NotAHeaderValue)),
        (
            Some(vec![b'a'; MAX_TOKEN_BYTES + 1]),
            Err(TokenProblem::TooLarge),
        ),
        (Some(b"\neyJ.abc.def\n".to_vec()), Ok("eyJ.abc.def")),
    ];
    for (content, want) in cases {
        let _ = std::fs::remove_file(&file);
        if let Some(content) = &content {
            std::fs::write(&file, content).expect("write");
        }
        let got = read_token(&file).await;
        match (got, want) {
            (Ok(v), Ok(w)) => {
                assert_eq!(v.as_bytes(), w.as_bytes());
                assert!(v.is_sensitive());
                // Debug of a sensitive value does not show it.
                assert!(!format!("{v:?}").contains(w));
            }
            (got, want) => assert_eq!(got.map(|_| ()), want.map(|_| ())),
        }
    }
    assert_eq!(
        TokenProblem::Unreadable(std::io::ErrorKind::NotFound).reason(),
        "Missing"
    );
}

#[test]
fn only_loopback_listen_addresses_are_accepted() {
    let cases = [
        ("127.0.0.1:8182", Ok(())),
        ("127.3.4.5:0", Ok(())),
        ("[::1]:8182", Ok(())),
        ("0.0.0.0:8182", Err("ListenNotLoopback")),
        ("10.0.0.7:8182", Err("ListenNotLoopback")),
        ("[::]:8182", Err("ListenNotLoopback")),
        ("[::ffff:127.0.0.1]:8182", Err("ListenNotLoopback")),
        ("localhost:8182", Err("InvalidListen")),
        ("127.0.0.1", Err("InvalidListen")),
    ];
    for (listen, want) in cases {
        let got = listen_addr(listen).map(drop).map_err(|e| e.reason());
        assert_eq!(got, want, "{listen}");
    }
    let e = Settings::new(
        "0.0.0.0:8182",
        "http://up",
        None,
        DEFAULT_POD_TOKEN_FILE.into(),
        Duration::from_secs(1),
    )
    .expect_err("refused");
    assert!(e.to_string().contains("not a loopback address"), "{e}");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn upstream_urls_are_checked() {
    let cases = [
        ("http://bundles:8080", Ok("http://bundles:8080")),
        (
            "https://bundles.example.com/",
            Ok("https://bundles.example.com"),
        ),
        ("https://h/prefix/", Ok("https://h/prefix")),
        ("ftp://h", Err("InvalidUpstream")),
        ("bundles:8080", Err("InvalidUpstream")),
        ("http://u:p@h", Err("InvalidUpstream")),
        ("http://h/?q=1", Err("InvalidUpstream")),
        ("http://h/#f", Err("InvalidUpstream")),
        ("not a url", Err("InvalidUpstream")),
    ];
    for (upstream, want) in cases {
        let got = upstream_base(upstream)
            .map(|u| u.as_str().trim_end_matches('/').to_string())
            .map_err(|e| e.reason());
        assert_eq!(got, want.map(String::from), "{upstream}");
    }
    let ca_on_http = Settings::new(
        DEFAULT_LISTEN,
        "http://up",
        Some("/ca.pem".into()),
        DEFAULT_POD_TOKEN_FILE.into(),
        Duration::from_secs(1),
    );
    assert_eq!(
        ca_on_http.map(drop).map_err(|e| e.reason()),
        Err("UpstreamCaWithoutHttps")
    );
}

#[tokio::test]
async fn a_slow_upstream_gives_504() {
    let slow = Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "late"
    });
    let up = upstream(slow, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "secret-pod-token").expect("write");
    let (proxy_url, _) = start(&settings(
        &format!("http://{up}"),
        &file,
        Duration::from_millis(300),
    ))
    .await;
    let res = client()
        .get(format!("{proxy_url}/bundle"))
        .header("authorization", "Bearer secret-key-token")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
    let body = res.text().await.expect("body");
    assert_eq!(body, "upstream timed out\n");
}

#[tokio::test]
async fn an_unreachable_upstream_gives_502() {
    // A port that was free a moment ago: nothing listens there.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = gone.local_addr().expect("addr");
    drop(gone);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "secret-pod-token").expect("write");
    let (proxy_url, _) = start(&settings(
        &format!("http://{addr}"),
        &file,
        Duration::from_secs(5),
    ))
    .await;
    let res = client()
        .get(format!("{proxy_url}/bundle"))
        .header("authorization", "Bearer secret-key-token")
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
    let body = res.text().await.expect("body");
    assert_eq!(body, "upstream unavailable\n");
}

#[tokio::test]
async fn large_bodies_pass_both_ways() {
    let sum = Router::new().fallback(|body: Bytes| async move {
        // Answers with twice what it got.
        let mut out = body.to_vec();
        out.extend_from_slice(&body);
        out
    });
    let up = upstream(sum, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy_url, _) = start(&settings(
        &format!("http://{up}"),
        &dir.path().join("pod-token"),
        Duration::from_secs(10),
    ))
    .await;
    let body = vec![7u8; 1 << 20];
    let res = client()
        .put(format!("{proxy_url}/big"))
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let got = res.bytes().await.expect("body");
    assert_eq!(got.len(), 2 << 20);
}

/// An https upstream for 127.0.0.1 signed by `ca`.
async fn https_upstream(ca: &Ca) -> SocketAddr {
    let (cert, key) = ca.issue("upstream");
    let (acceptor, _) = crate::verifier::tls::acceptor(&cert, &key).expect("acceptor");
    upstream(echo_router(), Some(acceptor)).await
}

fn https_settings(up: SocketAddr, ca: &Path, token_file: &Path) -> Settings {
    let mut s = Settings::new(
        "127.0.0.1:0",
        &format!("https://{up}"),
        Some(ca.to_path_buf()),
        token_file.to_path_buf(),
        Duration::from_secs(5),
    )
    .expect("settings");
    s.env_proxy = false;
    s
}

#[tokio::test]
async fn an_https_upstream_signed_by_the_ca_file_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "plane");
    let up = https_upstream(&ca).await;
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "pod").expect("write");
    let (proxy_url, _) = start(&https_settings(up, &ca.cert(), &file)).await;
    let seen = seen(
        client()
            .get(format!("{proxy_url}/bundles/b.tar.gz"))
            .send()
            .await
            .expect("send"),
    )
    .await;
    assert_eq!(seen["target"], "/bundles/b.tar.gz");
    assert_eq!(strings(&seen["pod_token"]), ["pod"]);
}

#[tokio::test]
async fn an_https_upstream_signed_by_another_ca_gives_502() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "plane");
    let other = Ca::new(dir.path(), "other");
    let up = https_upstream(&ca).await;
    let file = dir.path().join("pod-token");
    std::fs::write(&file, "pod").expect("write");
    let (proxy_url, _) = start(&https_settings(up, &other.cert(), &file)).await;
    let res = client()
        .get(format!("{proxy_url}/bundles/b.tar.gz"))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
}

#[test]
fn hop_by_hop_and_connection_named_headers_are_dropped() {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("connection", "close, X-Named"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic x"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("trailer", "x"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("host", "127.0.0.1:8182"),
        ("x-named", "1"),
        (POD_TOKEN_HEADER, "forged"),
        ("authorization", "Bearer k"),
        ("x-keyward-pod-uid", "kept: the verifier decides about it"),
        ("accept", "*/*"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    let out = forwardable(&h, drop_on_forward);
    let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["accept", "authorization", "x-keyward-pod-uid"]);
}

#[tokio::test]
async fn responses_stream_before_the_upstream_finishes() {
    use futures::StreamExt;
    // The first chunk, then nothing more for as long as the test runs.
    let dribble = Router::new().fallback(|| async {
        let first = futures::stream::once(async {
            Ok::<_, std::io::Error>(Bytes::from_static(b"first chunk"))
        });
        axum::body::Body::from_stream(first.chain(futures::stream::pending()))
    });
    let up = upstream(dribble, None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy_url, _) = start(&settings(
        &format!("http://{up}"),
        &dir.path().join("pod-token"),
        Duration::from_secs(30),
    ))
    .await;
    let mut res = tokio::time::timeout(
        Duration::from_secs(5),
        client().get(format!("{proxy_url}/bundle")).send(),
    )
    .await
    .expect("head in time")
    .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    let chunk = tokio::time::timeout(Duration::from_secs(5), res.chunk())
        .await
        .expect("first chunk before the body ends")
        .expect("read");
    assert_eq!(chunk.as_deref(), Some(&b"first chunk"[..]));
}

#[test]
fn a_missing_token_is_warned_about_at_most_once_a_minute() {
    let misses = Misses::default();
    let path = Path::new("/nonexistent/pod-token");
    let problem = TokenProblem::Unreadable(std::io::ErrorKind::NotFound);
    let t0 = Instant::now();
    let warned: Vec<bool> = [0, 1, 59, 60, 61, 119, 121]
        .into_iter()
        .map(|s| misses.record(path, problem, t0 + Duration::from_secs(s)))
        .collect();
    assert_eq!(warned, [true, false, false, true, false, false, true]);
    assert_eq!(misses.total.load(Ordering::Relaxed), 7);
}
