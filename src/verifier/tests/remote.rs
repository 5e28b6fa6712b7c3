//! Remote trust sources (`--remote-bundle`): the flag's grammar, and a real fetch over TLS from
//! another verifier (the "other cluster") with a pinned CA; only the key ids that cluster's
//! trust record lists cross; a stale or never-fetched bundle refuses (fail closed); remote
//! tokens pass only on their own routes.

use super::*;
use crate::keys::KeyError;
use crate::verifier::remote::{RemoteBundle, RemoteSpec};
use crate::verifier::serve::{Limits, serve};
use crate::verifier::tls::testing::Ca;
use crate::verifier::tls::{ReloadingCert, server_config};

#[test]
fn the_flag_names_every_field_it_refuses() {
    let ok = RemoteSpec::parse(
        "name=west,url=https://kw.west.example/keys/ns/a/jwks.json,ca=/etc/ca.pem,sub=ns/a",
    )
    .expect("minimal");
    assert_eq!(ok.aud, "keyward:ns/a");
    assert_eq!(ok.iss, "keyward");
    assert_eq!(ok.interval, Duration::from_secs(30));
    assert_eq!(ok.max_staleness, Duration::from_secs(300));
    let full = RemoteSpec::parse(
        "name=west,url=https://x/j,ca=/c,sub=ns/a,aud=bundles,iss=https://kw,interval=10s,max-staleness=1m",
    )
    .expect("full");
    assert_eq!(
        (full.aud.as_str(), full.max_staleness),
        ("bundles", Duration::from_secs(60))
    );
    for (bad, says) in [
        ("url=https://x/j,ca=/c,sub=ns/a", "name"),
        ("name=West,url=https://x/j,ca=/c,sub=ns/a", "name"),
        ("name=w,url=http://x/j,ca=/c,sub=ns/a", "https"),
        ("name=w,url=https://x/j,sub=ns/a", "ca"),
        ("name=w,url=https://x/j,ca=/c", "sub"),
        ("name=w,url=https://x/j,ca=/c,sub=a", "sub"),
        (
            "name=w,url=https://x/j,ca=/c,sub=ns/a,interval=5m,max-staleness=1m",
            "max-staleness",
        ),
        (
            "name=w,url=https://x/j,ca=/c,sub=ns/a,pin=abc",
            "unknown field pin",
        ),
        ("name=w,name=v,url=https://x/j,ca=/c,sub=ns/a", "twice"),
        (
            "name=w,url=https://x/j,ca=/c,sub=ns/a,interval=soon",
            "interval",
        ),
    ] {
        let err = RemoteSpec::parse(bad).expect_err(bad);
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// The other cluster: a verifier over TLS whose index holds key `ns/a` (k1 recorded) and a
/// JWK someone injected into its bundle ConfigMap.
async fn other_cluster(dir: &std::path::Path) -> (std::net::SocketAddr, Ca, KeyPair, KeyPair) {
    let f = fixture();
    let injected = KeyPair::generate();
    let mut index = f.index.clone();
    index
        .apply_bundle(&bundle("a", UID_A, &[&f.k1, &injected], &[]))
        .expect("bundle with an injected JWK");
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None);
    s.update(|i| *i = index);
    let shared = Arc::new(s);
    let ca = Ca::new(dir, "west");
    let (crt, key) = ca.issue("west-server");
    let resolver = Arc::new(ReloadingCert::new(&crt, &key, Duration::ZERO).expect("load"));
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config(resolver).expect("server config")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        listener,
        router(shared.clone()),
        Limits::default(),
        shared.stats.clone(),
        Some(acceptor),
        std::future::pending(),
    ));
    (addr, ca, f.k1, injected)
}

fn remote(addr: std::net::SocketAddr, ca: &std::path::Path, extra: &str) -> RemoteBundle {
    let spec = RemoteSpec::parse(&format!(
        "name=west,url=https://127.0.0.1:{}/keys/ns/a/jwks.json,ca={},sub=ns/a,aud=keyward{extra}",
        addr.port(),
        ca.display()
    ))
    .expect("spec");
    RemoteBundle::new(spec).expect("bundle")
}

#[tokio::test]
async fn a_remote_bundle_is_fetched_with_a_pinned_ca_and_carries_only_recorded_key_ids() {
    let dir = tempfile::tempdir().expect("dir");
    let (addr, ca, k1, injected) = other_cluster(dir.path()).await;
    let policy = Policy::default();
    let now = chrono::Utc::now().timestamp();
    let at = std::time::Instant::now();
    let b = remote(addr, &ca.cert(), "");
    // Never fetched: refused.
    assert_eq!(
        b.verify(&live_token(&k1, "ns/a"), now, at, &policy),
        Err(Refusal::RemoteBundleStale("west".into()))
    );
    b.fetch()
        .await
        .expect("fetched over TLS with the pinned CA");
    let v = b
        .verify(
            &live_token(&k1, "ns/a"),
            now,
            std::time::Instant::now(),
            &policy,
        )
        .expect("the recorded key's token passes");
    assert_eq!(
        (v.key.to_string(), v.kid),
        ("ns/a".to_string(), k1.key_id())
    );
    // The injected JWK never crossed: the other verifier serves only recorded key ids.
    assert!(matches!(
        b.verify(
            &live_token(&injected, "ns/a"),
            now,
            std::time::Instant::now(),
            &policy
        ),
        Err(Refusal::Token(KeyError::UnknownKeyId(_)))
    ));
    // Another key of that cluster, or another audience: refused.
    assert!(matches!(
        b.verify(
            &live_token(&k1, "ns/b"),
            now,
            std::time::Instant::now(),
            &policy
        ),
        Err(Refusal::KeyNotAccepted { .. })
    ));
    // Stale (beyond max-staleness since the last good fetch): refused, fail closed.
    let later = std::time::Instant::now() + Duration::from_secs(301);
    assert_eq!(
        b.verify(&live_token(&k1, "ns/a"), now, later, &policy),
        Err(Refusal::RemoteBundleStale("west".into()))
    );
    // A revalidation (ETag, 304) counts as fresh.
    b.fetch().await.expect("revalidated");
    assert!(
        b.age(std::time::Instant::now())
            .is_some_and(|a| a < Duration::from_secs(5))
    );

    // Pinned: a client trusting another CA fetches nothing.
    let other = Ca::new(dir.path(), "east");
    let wrong = remote(addr, &other.cert(), "");
    assert!(
        wrong.fetch().await.is_err(),
        "a server of another CA was trusted"
    );
    assert!(wrong.age(std::time::Instant::now()).is_none());
}

#[test]
fn a_document_with_a_key_that_does_not_match_its_id_is_refused_whole() {
    let k = KeyPair::generate();
    let mut jwk = k.public_key().to_jwk();
    jwk.kid = Some(KeyPair::generate().key_id());
    let body = serde_json::to_vec(&Jwks { keys: vec![jwk] }).expect("json");
    assert!(crate::verifier::remote::parse(&body).is_err());
    let mut no_kid = k.public_key().to_jwk();
    no_kid.kid = None;
    let body = serde_json::to_vec(&Jwks { keys: vec![no_kid] }).expect("json");
    assert!(crate::verifier::remote::parse(&body).is_err());
    assert!(crate::verifier::remote::parse(b"{\"keys\": 1}").is_err());
}

#[tokio::test]
async fn remote_tokens_pass_only_on_their_own_routes() {
    let dir = tempfile::tempdir().expect("dir");
    let (addr, ca, k1, _) = other_cluster(dir.path()).await;
    let b = Arc::new(remote(addr, &ca.cert(), ""));
    b.fetch().await.expect("fetched");
    // This cluster: keys ns/a (k1 of its own, another key) and the remote bundle west.
    let f = fixture();
    let s = Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None)
        .with_remotes(vec![b.clone()]);
    s.update(|i| *i = f.index.clone());
    let app = router(Arc::new(s));
    let get = |path: &str, token: &str| {
        Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request")
    };
    let remote_token = live_token(&k1, "ns/a");
    let local_token = live_token(&f.k1, "ns/a");
    // (route, token, the status expected; None: any refusal).
    let cases = [
        ("/auth-remote/west", &remote_token, Some(StatusCode::OK)),
        (
            "/authz-remote/west/bundles/x",
            &remote_token,
            Some(StatusCode::OK),
        ),
        // The local key's token on the remote route, and an unknown remote name: refused.
        (
            "/auth-remote/west",
            &local_token,
            Some(StatusCode::UNAUTHORIZED),
        ),
        (
            "/auth-remote/east",
            &remote_token,
            Some(StatusCode::FORBIDDEN),
        ),
        // The remote token on the local key's route: refused (this cluster never trusted k1 of
        // west), whatever the refusal's status.
        ("/auth/ns/a", &remote_token, None),
    ];
    for (path, token, want) in cases {
        let got = app
            .clone()
            .oneshot(get(path, token))
            .await
            .expect("call")
            .status();
        match want {
            Some(want) => assert_eq!(got, want, "{path}"),
            None => assert_ne!(got, StatusCode::OK, "{path}"),
        }
    }
}
