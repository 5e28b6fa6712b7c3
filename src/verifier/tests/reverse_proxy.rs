//! The reverse proxy (`--upstream`), against a real upstream: only verified requests are
//! forwarded; an unbound proxy refuses; a silent upstream gets 504.

use super::*;

/// An upstream that echoes what it received: method, path, the headers the proxy controls,
/// and the body.
async fn echo_upstream() -> String {
    use axum::extract::Request as AxumRequest;
    let app = axum::Router::new().fallback(|req: AxumRequest| async move {
        let (parts, body) = req.into_parts();
        let h = |n: &str| {
            parts
                .headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let head = format!(
            "{} {} auth={} key={} kid={} |",
            parts.method,
            parts.uri,
            h("authorization"),
            h("x-keyward-key"),
            h("x-keyward-kid"),
        );
        let body = axum::body::to_bytes(body, 1 << 20)
            .await
            .unwrap_or_default();
        format!("{head}{}", String::from_utf8_lossy(&body))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn reverse_proxy_forwards_only_verified_requests() {
    let f = fixture();
    let upstream = crate::verifier::Upstream::new(&echo_upstream().await).expect("upstream");
    let s = Shared::new(
        Policy::default(),
        Arc::new(MemoryUseLog::new(10)),
        Some(upstream),
    )
    .bound_to(Some(KeyRef::new("ns", "a")));
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let token = live_token(&f.k1, "ns/a");

    // Another key's genuine token: 403, never forwarded.
    let mut b_claims = claims("ns/b");
    let now = chrono::Utc::now().timestamp();
    b_claims.aud = "bundles".into();
    b_claims.iss = "https://kw.example".into();
    b_claims.iat = now;
    b_claims.nbf = now;
    b_claims.exp = now + 600;
    let token_b = f.k3.sign_token(&b_claims).expect("sign");
    let (status, headers, body) = call(
        &app,
        get_with(
            "/v1/data/x",
            &[("authorization", &format!("Bearer {token_b}"))],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "KeyNotAccepted");
    assert!(body.is_empty());

    // Verified: forwarded with the body, the token removed, the key headers set (a forged
    // client-sent X-Keyward-Key is dropped).
    let req = Request::post("/v1/data/x?q=1")
        .header("authorization", format!("Bearer {token}"))
        .header("x-keyward-key", "ns/forged")
        .body(Body::from("payload"))
        .expect("request");
    let (status, _, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        format!(
            "POST /v1/data/x?q=1 auth=- key=ns/a kid={} |payload",
            f.k1.key_id()
        )
    );

    // Refused: never reaches the upstream.
    let req = Request::get("/bundles/authz.tar.gz")
        .header("authorization", format!("Bearer {}", tamper(&token)))
        .body(Body::empty())
        .expect("request");
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "SignatureInvalid");
    assert!(body.is_empty());

    // The verifier's own routes are not proxied.
    let (status, _, _) = call(
        &app,
        Request::get("/healthz")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn an_unbound_reverse_proxy_refuses() {
    let f = fixture();
    let upstream = crate::verifier::Upstream::new(&echo_upstream().await).expect("upstream");
    let s = Shared::new(
        Policy::default(),
        Arc::new(MemoryUseLog::new(10)),
        Some(upstream),
    );
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    let (status, headers, body) =
        call(&app, get_with("/v1/data/x", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "Unbound");
    assert!(body.is_empty());
}

#[tokio::test]
async fn a_silent_upstream_gets_504() {
    let f = fixture();
    // An upstream that accepts and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let upstream = crate::verifier::Upstream {
        timeout: Duration::from_millis(300),
        ..crate::verifier::Upstream::new(&format!("http://{addr}")).expect("upstream")
    };
    let s = Arc::new(
        Shared::new(
            Policy::default(),
            Arc::new(MemoryUseLog::new(10)),
            Some(upstream),
        )
        .bound_to(Some(KeyRef::new("ns", "a"))),
    );
    s.update(|i| *i = f.index.clone());
    let app = router(s.clone());
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    let started = std::time::Instant::now();
    let (status, _, _) = call(&app, get_with("/v1/data/x", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    held.abort();
}
