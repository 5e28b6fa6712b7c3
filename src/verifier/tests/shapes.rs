//! Request -> response shapes of the router (tower `oneshot`, no network, no API server):
//! auth_request and ext_authz, the unbound routes, decisions counted by reason, readiness.

use super::*;

#[tokio::test]
async fn auth_request_shapes() {
    let f = fixture();
    let log = Arc::new(MemoryUseLog::new(100));
    let app = router(shared(&f, log.clone()));
    let token = live_token(&f.k1, "ns/a");
    let bearer = format!("Bearer {token}");

    // nginx auth_request on the key's own route: allowed, with the key headers. A pod UID the
    // client names (the old X-Keyward-Pod-UID) is not read: only a pod token the API server
    // vouches for names a pod.
    let req = get_with(
        "/auth/ns/a",
        &[("authorization", &bearer), ("x-keyward-pod-uid", POD)],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-keyward-key"], "ns/a");
    assert_eq!(headers["x-keyward-kid"], f.k1.key_id().as_str());
    assert!(body.is_empty());
    let key = KeyRef::new("ns", "a");
    assert!(log.pods_seen(&key, &f.k1.key_id()).is_empty());

    // With a pod token the reviewer knows, the pod is recorded (once the review is back).
    let reviewer = Arc::new(crate::verifier::pod_identity::testing::Table::new([(
        "pod-token",
        crate::verifier::pod_identity::testing::status(
            "system:serviceaccount:ns:agent",
            &[POD],
            &["keyward"],
            true,
        ),
    )]));
    let with_pods = {
        let s = Shared::new(Policy::default(), log.clone(), None).with_pod_identity(
            reviewer.clone(),
            crate::verifier::pod_identity::DEFAULT_AUDIENCE,
        );
        s.update(|i| *i = f.index.clone());
        router(Arc::new(s))
    };
    let req = get_with(
        "/auth/ns/a",
        &[
            ("authorization", &bearer),
            ("x-keyward-pod-token", "pod-token"),
        ],
    );
    assert_eq!(call(&with_pods, req).await.0, StatusCode::OK);
    for _ in 0..100 {
        if !log.pods_seen(&key, &f.k1.key_id()).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(log.pods_seen(&key, &f.k1.key_id()).contains_key(POD));
    assert_eq!(reviewer.reviews(), 1);

    // No token: 401, a reason, WWW-Authenticate, no body.
    let (status, headers, body) = call(&app, get_with("/auth/ns/a", &[])).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "MissingToken");
    assert!(headers.contains_key("www-authenticate"));
    assert!(body.is_empty());

    // A revoked key: 401, and the response holds nothing of the token.
    let revoked = live_token(&f.k2, "ns/a");
    let req = get_with(
        "/auth/ns/a",
        &[("authorization", &format!("Bearer {revoked}"))],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "TokenRevoked");
    assert!(!headers.contains_key("x-keyward-key"));
    assert!(body.is_empty());
    for segment in revoked.split('.') {
        for v in headers.values() {
            assert!(
                !v.to_str().unwrap_or("").contains(segment),
                "a header echoes the token"
            );
        }
    }

    // A genuine token of key a on key b's route: 403, whatever the client adds (the old
    // X-Keyward-Expect-Key header is not read, so it can neither narrow nor widen).
    for extra in [None, Some("ns/a"), Some("ns/b")] {
        let mut h = vec![("authorization", bearer.as_str())];
        if let Some(e) = extra {
            h.push(("x-keyward-expect-key", e));
        }
        let (status, headers, _) = call(&app, get_with("/auth/ns/b", &h)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{extra:?}");
        assert_eq!(headers["x-keyward-reason"], "KeyNotAccepted");
    }

    // The unbound /auth refuses every token (403 Unbound) without --accept-any-key.
    let (status, headers, _) = call(&app, get_with("/auth", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-keyward-reason"], "Unbound");

    // Two Authorization headers: refused, even if one of them is good.
    for pair in [[bearer.as_str(), "Bearer x"], ["Bearer x", bearer.as_str()]] {
        let req = get_with(
            "/auth/ns/a",
            &[("authorization", pair[0]), ("authorization", pair[1])],
        );
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["x-keyward-reason"], "DuplicateAuthorization");
    }

    // Key b's token with key a's default audience is refused.
    let req = get_with(
        "/auth/ns/b",
        &[(
            "authorization",
            &format!("Bearer {}", live_token(&f.k3, "ns/b")),
        )],
    );
    assert_eq!(call(&app, req).await.0, StatusCode::UNAUTHORIZED); // wrong aud for b
}

#[tokio::test]
async fn accept_any_key_opens_the_unbound_routes() {
    let f = fixture();
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None)
        .accepting_any_key(true);
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    for path in ["/auth", "/ext_authz", "/ext_authz/x/y"] {
        let (status, headers, _) = call(&app, get_with(path, &[("authorization", &bearer)])).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert_eq!(headers["x-keyward-key"], "ns/a");
    }
    // A bound route stays bound.
    let (status, _, _) = call(&app, get_with("/auth/ns/b", &[("authorization", &bearer)])).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn ext_authz_shapes() {
    let f = fixture();
    let app = router(shared(&f, Arc::new(MemoryUseLog::new(100))));
    let token = live_token(&f.k1, "ns/a");
    // Envoy's HTTP service with path_prefix /authz/ns/a: the original method and path follow.
    for (method, path) in [
        ("GET", "/authz/ns/a/bundles/authz.tar.gz"),
        ("POST", "/authz/ns/a/v1/data?x=1"),
        ("GET", "/authz/ns/a"),
        ("GET", "/authz/ns/a/"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request");
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}");
        assert_eq!(headers["x-keyward-key"], "ns/a");
        assert_eq!(headers["x-keyward-kid"], f.k1.key_id().as_str());
    }
    // Key b's route, and the old unbound prefix, whatever path the client chose after it
    // (behind `path_prefix: /ext_authz` the client's path could name any key).
    for (path, reason) in [
        ("/authz/ns/b/bundles/authz.tar.gz", "KeyNotAccepted"),
        ("/ext_authz/bundles/authz.tar.gz", "Unbound"),
        ("/ext_authz/ns/a/bundles/authz.tar.gz", "Unbound"),
        ("/ext_authz", "Unbound"),
    ] {
        let req = get_with(path, &[("authorization", &format!("Bearer {token}"))]);
        let (status, headers, _) = call(&app, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(headers["x-keyward-reason"], reason, "{path}");
    }
    let req = get_with(
        "/authz/ns/a/bundles/authz.tar.gz",
        &[("authorization", &format!("Bearer {}", tamper(&token)))],
    );
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-keyward-reason"], "SignatureInvalid");
    assert!(body.is_empty());
    let req = get_with("/authz/ns/a/x", &[("authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(
        call(&app, req).await.1["x-keyward-reason"],
        "MalformedAuthorization"
    );
}

#[tokio::test]
async fn decisions_are_counted_by_reason() {
    let f = fixture();
    let s = shared(&f, Arc::new(MemoryUseLog::new(10)));
    let app = router(s.clone());
    let bearer = format!("Bearer {}", live_token(&f.k1, "ns/a"));
    call(&app, get_with("/auth/ns/a", &[("authorization", &bearer)])).await;
    call(&app, get_with("/auth", &[("authorization", &bearer)])).await;
    call(&app, get_with("/auth/ns/a", &[])).await;
    assert_eq!(s.stats.decisions("allowed", ""), 1);
    assert_eq!(s.stats.decisions("refused", "Unbound"), 1);
    assert_eq!(s.stats.decisions("refused", "MissingToken"), 1);
    let (status, headers, body) = call(&app, get_with("/metrics", &[])).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    assert!(
        body.contains(r#"keyward_verifier_decisions_total{result="refused",reason="Unbound"} 1"#),
        "{body}"
    );
    assert!(!body.contains(&f.k1.key_id()), "no key id in metrics");
}

#[tokio::test]
async fn readiness_waits_for_the_first_lists() {
    let s = Arc::new(Shared::new(
        Policy::default(),
        Arc::new(crate::verifier::NoUseLog),
        None,
    ));
    s.expect_lists(2);
    let app = router(s.clone());
    let get = |p: &'static str| Request::get(p).body(Body::empty()).expect("request");
    assert_eq!(call(&app, get("/healthz")).await.0, StatusCode::OK);
    assert_eq!(
        call(&app, get("/readyz")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    s.listed();
    s.listed();
    assert_eq!(call(&app, get("/readyz")).await.0, StatusCode::OK);
    // Without --upstream, other paths are 404, not proxied.
    assert_eq!(call(&app, get("/bundles/x")).await.0, StatusCode::NOT_FOUND);
}

#[test]
fn use_log_is_a_trait_object() {
    let log: Arc<dyn UseLog> = Arc::new(MemoryUseLog::new(1));
    log.record(Use {
        key: KeyRef::new("ns", "a"),
        kid: "k".into(),
        instance: crate::verifier::Instance::Unattributed,
        at: chrono::Utc::now(),
    });
}
