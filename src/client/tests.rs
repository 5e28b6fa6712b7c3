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

/// A 429 with `Retry-After: 1` (API Priority and Fairness) is retried inside the request, after
/// the second the server asked for, and counted once with its final answer. The response's
/// `Date` keeps the API clock on the server's time.
#[tokio::test]
async fn a_429_is_retried_after_the_servers_retry_after() {
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let app = axum::Router::new().fallback(move |_req: axum::extract::Request| {
        let counter = counter.clone();
        async move {
            let n = {
                let mut c = counter.lock().unwrap();
                *c += 1;
                *c
            };
            let date = "Sun, 06 Nov 1994 08:49:37 GMT";
            if n == 1 {
                (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [
                        (http::header::RETRY_AFTER, "1"),
                        (http::header::DATE, date),
                        (http::header::CONTENT_TYPE, "application/json"),
                    ],
                    r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"TooManyRequests","code":429}"#,
                )
            } else {
                (
                    http::StatusCode::OK,
                    [
                        (http::header::RETRY_AFTER, "0"),
                        (http::header::DATE, date),
                        (http::header::CONTENT_TYPE, "application/json"),
                    ],
                    r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"x","namespace":"ns"}}"#,
                )
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let stats = RequestStats::default();
    let clock = Arc::new(crate::time::ApiClock::new());
    let client =
        build_with_clock(config, &ClientOptions::unlimited(), &stats, clock.clone()).unwrap();
    let t0 = std::time::Instant::now();
    Api::<ConfigMap>::namespaced(client, "ns")
        .get("x")
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(*calls.lock().unwrap(), 2);
    assert!(took >= Duration::from_millis(950), "retried after {took:?}");
    assert!(took < Duration::from_secs(4), "retried after {took:?}");
    assert_eq!(stats.total(), 1);
    assert_eq!(
        stats
            .responses()
            .get(&(Verb::Get, ResponseCode::Status(200))),
        Some(&1)
    );
    use crate::time::Clock as _;
    assert_eq!(clock.now().timestamp() / 60, 784_111_777 / 60);
}

/// The retry policy by itself: a 429 or 503 that says when to come back (`Retry-After`, as the
/// API server's APF and its filling watch caches do) is asked again then, every time (never
/// sooner, at most 20 % later), not after a backoff that grows past it; one that does not say
/// backs off from about 100 ms (kube's jittered backoff) to at most 4 s; other answers are not retried; and after
/// [`Retry::MAX`] retries the answer goes to the caller.
#[tokio::test]
async fn a_retry_waits_what_the_server_asked_for_every_time() {
    use tower::retry::Policy as _;
    fn answer(
        status: u16,
        retry_after: Option<&str>,
    ) -> Result<http::Response<()>, tower::BoxError> {
        let mut r = http::Response::builder().status(status);
        if let Some(ra) = retry_after {
            r = r.header(http::header::RETRY_AFTER, ra);
        }
        Ok(r.body(()).unwrap())
    }
    let mut req = http::Request::new(kube::client::Body::from(Vec::new()));
    let mut wait = |p: &mut Retry, status: u16, ra: Option<&str>| {
        p.retry(&mut req, &mut answer(status, ra))
            .map(|s| s.deadline() - tokio::time::Instant::now())
    };

    let mut p = Retry::new();
    for (status, n) in [
        (429, 0),
        (503, 1),
        (429, 2),
        (429, 3),
        (429, 4),
        (429, 5),
        (504, 6),
        (429, 7),
    ] {
        let d = wait(&mut p, status, Some("1")).unwrap_or_else(|| panic!("retry {n} refused"));
        assert!(
            d > Duration::from_millis(990) && d <= Duration::from_millis(1200),
            "retry {n}: {d:?}"
        );
    }
    assert_eq!(
        wait(&mut p, 429, Some("1")),
        None,
        "more than Retry::MAX retries"
    );

    // Longer asks are honoured as asked (capped at a minute); a zero or unreadable one falls back
    // to the backoff.
    let mut p = Retry::new();
    let d = wait(&mut p, 429, Some("3")).unwrap();
    assert!(
        d > Duration::from_millis(2990) && d <= Duration::from_millis(3600),
        "{d:?}"
    );
    let d = wait(&mut p, 429, Some("3600")).unwrap();
    assert!(
        d > Duration::from_secs(59) && d <= Duration::from_secs(72),
        "{d:?}"
    );
    for ra in [Some("0"), Some("soon"), None] {
        let d = wait(&mut Retry::new(), 429, ra).unwrap();
        assert!(d <= Duration::from_millis(500), "{ra:?}: {d:?}");
    }

    let mut p = Retry::new();
    let backoff: Vec<Duration> = (0..Retry::MAX)
        .map(|_| wait(&mut p, 503, None).unwrap())
        .collect();
    assert!(
        backoff.iter().all(|d| *d <= Duration::from_secs(4)),
        "{backoff:?}"
    );
    assert!(
        backoff.iter().any(|d| *d > Duration::from_millis(800)),
        "grows: {backoff:?}"
    );
    assert_eq!(wait(&mut p, 503, None), None);

    for status in [200, 201, 404, 409, 410, 500] {
        assert_eq!(wait(&mut Retry::new(), status, Some("1")), None, "{status}");
    }
}
