//! The bundle documents over HTTP: the JWKS endpoint serves only recorded keys, ETag and
//! If-None-Match, max-age from the publish delay.

use super::*;

#[tokio::test]
async fn the_jwks_endpoint_serves_only_recorded_keys() {
    let (k1, injected) = (KeyPair::generate(), KeyPair::generate());
    let mut index = Index::default();
    index.apply_key(&pk("a", UID_A, json!({}), &[&k1]));
    index
        .apply_bundle(&bundle("a", UID_A, &[&k1, &injected], &[]))
        .expect("parse");
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None);
    s.update(|i| *i = index);
    let app = router(Arc::new(s));
    let (status, _, body) = call(&app, get_with("/keys/ns/a/jwks.json", &[])).await;
    assert_eq!(status, StatusCode::OK);
    let jwks: Jwks = serde_json::from_str(&body).expect("jwks");
    assert_eq!(jwks.key_ids(), vec![k1.key_id()]);
}

#[test]
fn max_age_is_half_the_publish_delay_capped() {
    let s = Duration::from_secs;
    for (delay, want, header) in [
        (s(0), s(0), "no-cache"),
        (s(1), s(0), "no-cache"),
        (s(3), s(1), "public, max-age=1"),
        (s(120), s(60), "public, max-age=60"),
        (s(3600), s(300), "public, max-age=300"),
    ] {
        assert_eq!(max_age(delay), want, "{delay:?}");
        assert!(
            max_age(delay) * 2 <= delay,
            "a consumer must refetch before agents switch"
        );
        assert_eq!(cache_control(max_age(delay)), header);
    }
}

#[test]
fn if_none_match_comparison() {
    let etag = etag_of(b"{}");
    assert!(etag.starts_with('"') && etag.ends_with('"'));
    assert_ne!(etag, etag_of(b"{ }"));
    let h = |v: &str| {
        let mut m = HeaderMap::new();
        m.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(v).expect("value"),
        );
        m
    };
    assert!(none_match(&h(&etag), &etag));
    assert!(none_match(&h(&format!("W/{etag}")), &etag));
    assert!(none_match(&h(&format!("\"other\", {etag}")), &etag));
    assert!(none_match(&h("*"), &etag));
    assert!(!none_match(&h("\"other\""), &etag));
    assert!(!none_match(&HeaderMap::new(), &etag));
}

#[tokio::test]
async fn bundle_documents_with_etag_and_max_age() {
    let f = fixture();
    let app = router(shared(&f, Arc::new(MemoryUseLog::new(100))));
    let (status, headers, body) = call(
        &app,
        Request::get("/keys/ns/a/jwks.json")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["cache-control"], "public, max-age=60"); // publishDelay 2m
    assert_eq!(headers["content-type"], "application/json");
    let jwks: Jwks = serde_json::from_str(&body).expect("a JWKS");
    // k2 is still in the ConfigMap's JWKS, but no longer in the trust record: not served.
    assert_eq!(jwks.key_ids(), vec![f.k1.key_id()]);
    let etag = headers["etag"].clone();

    let req = Request::get("/keys/ns/a/jwks.json")
        .header("if-none-match", etag.clone())
        .body(Body::empty())
        .expect("request");
    let (status, headers, body) = call(&app, req).await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    assert_eq!(headers["etag"], etag);
    assert_eq!(headers["cache-control"], "public, max-age=60");
    assert!(body.is_empty());

    let (status, _, body) = call(
        &app,
        Request::get("/keys/ns/a/revoked.json")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let revoked: Vec<String> = serde_json::from_str(&body).expect("a list");
    assert_eq!(revoked, vec![f.k2.key_id()]);

    // Key b: default publishDelay (2m) too; unknown keys and documents: 404.
    for path in [
        "/keys/ns/c/jwks.json",
        "/keys/other/a/jwks.json",
        "/keys/ns/a/private.pem",
    ] {
        let (status, _, _) = call(
            &app,
            Request::get(path).body(Body::empty()).expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}
