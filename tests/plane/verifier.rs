//! `keyward verifier` on the real local control plane (`e2e/cluster.sh up`), and interop of
//! Keyward's tokens with an independent JWT library (`jsonwebtoken`, ring's EdDSA), not
//! Keyward's own verification code.
//!
//! The plane test: the in-process operator mints a key; the in-process verifier (the same
//! `verifier::run` the binary calls, on a real socket, watching the namespace) accepts the
//! agent Secret's token, serves jwks.json with an ETag (304 on `If-None-Match`) and
//! `max-age` from publishDelay; after a break-glass rotation revokes the old key, it refuses
//! the old token and accepts the new one.
//!
//! The reporting tests spawn the `keyward verifier` binary (reporting on): a flood of requests
//! for one key makes at most one KeyUsageReport write per report interval and lists exactly
//! the pods seen; the replica's Lease has its window and watermark, is marked stopped after
//! SIGTERM, and is taken over (new window) by a restart; two processes with the same replica
//! id never share it: the older exits non-zero.

/// The hostile corpus (`tests/plane/verifier/hostile/cases.jsonl`) against the real binary.
mod hostile;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward::controller::provisioning_key::key_secret_name;
use keyward::keys::{Jwks, KeyPair, TokenClaims};
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward::verifier::{self, KeyRef, MemoryUseLog, Policy, Shared};
use kube::Api;
use serde_json::json;

/// Verifies `token` with `jsonwebtoken` against `jwks_json` (as served or stored).
fn jsonwebtoken_verify(
    token: &str,
    jwks_json: &str,
    aud: &str,
    iss: &str,
) -> jsonwebtoken::errors::Result<serde_json::Value> {
    let header = jsonwebtoken::decode_header(token)?;
    assert_eq!(header.alg, Algorithm::EdDSA);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks_json).expect("a JWK set");
    let kid = header.kid.expect("a kid");
    let jwk = set.find(&kid).expect("the token's kid in the JWKS");
    let key = DecodingKey::from_jwk(jwk)?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[aud]);
    validation.set_issuer(&[iss]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map(|d| d.claims)
}

#[test]
fn jsonwebtoken_verifies_keyward_tokens() {
    let pair = KeyPair::generate();
    let jwks = serde_json::to_string(&Jwks {
        keys: vec![pair.public_key().to_jwk()],
    })
    .expect("jwks");
    let now = chrono::Utc::now().timestamp();
    let claims = TokenClaims {
        iss: "https://kw.example".into(),
        sub: "ns/pk".into(),
        aud: "bundles".into(),
        iat: now,
        nbf: now,
        exp: now + 600,
        jti: "j".into(),
    };
    let token = pair.sign_token(&claims).expect("sign");
    let got = jsonwebtoken_verify(&token, &jwks, "bundles", "https://kw.example")
        .expect("jsonwebtoken accepts a Keyward token");
    assert_eq!(got["sub"], "ns/pk");
    // The independent library also refuses what it should.
    assert!(jsonwebtoken_verify(&token, &jwks, "other", "https://kw.example").is_err());
    let (input, sig) = token.rsplit_once('.').expect("jws");
    let flipped = if sig.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{input}.{flipped}{}", &sig[1..]);
    assert!(jsonwebtoken_verify(&tampered, &jwks, "bundles", "https://kw.example").is_err());
}

/// The verifier serving on a free port, watching `namespace`.
struct Running {
    base: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    log: Arc<MemoryUseLog>,
}

impl Running {
    async fn start(namespace: &str) -> Self {
        Self::watching(&[namespace]).await
    }

    async fn watching(namespaces: &[&str]) -> Self {
        let client = kube::Client::try_from(kube_config().await).expect("client");
        let log = Arc::new(MemoryUseLog::new(1000));
        let shared = Arc::new(
            Shared::new(Policy::default(), log.clone(), None).with_pod_identity(
                Arc::new(verifier::pod_identity::ApiReviewer(client.clone())),
                verifier::pod_identity::DEFAULT_AUDIENCE,
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(verifier::run(
            client,
            namespaces.iter().map(|n| n.to_string()).collect(),
            shared,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        Running {
            base,
            shutdown: Some(tx),
            task,
            log,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("the verifier stops")
            .expect("no panic")
            .expect("served");
    }
}

/// Lists key `name`'s first key id `kid` as compromised and waits until the operator revoked
/// its key Secret.
async fn compromise_first_key(
    pks: &Api<ProvisioningKey>,
    secrets: &Api<Secret>,
    name: &str,
    kid: &str,
) {
    merge(pks, name, json!({ "spec": { "compromisedKeys": [kid] } })).await;
    wait_obj(
        secrets,
        &key_secret_name(name, 1),
        "k1 revoked",
        TIMEOUT,
        |s| state(s) == "destroyed",
    )
    .await;
}

/// Polls `f` every 200 ms until it returns `Some`, at most `TIMEOUT`.
async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the verifier at `base` answers `/readyz` with 200 (every watch listed).
async fn wait_ready(http: &reqwest::Client, base: &str) {
    eventually("the verifier ready", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// `GET /auth/<the key the token names>`: the route nginx is configured to ask for that key,
/// with `pod_token` (unless empty) in `X-Keyward-Pod-Token`.
async fn auth(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    pod_token: &str,
) -> reqwest::Response {
    let (_, claims) = keyward::keys::decode_token_unverified(token).expect("a token");
    auth_at(
        http,
        &format!("{base}/auth/{}", claims.sub),
        token,
        pod_token,
    )
    .await
}

async fn auth_at(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    pod_token: &str,
) -> reqwest::Response {
    let mut req = http.get(url).bearer_auth(token);
    if !pod_token.is_empty() {
        req = req.header(verifier::pod_identity::POD_TOKEN_HEADER, pod_token);
    }
    req.send().await.expect("GET /auth/...")
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// No pod token: the request counts as use of its key id, attributed to no pod.
const NO_POD: &str = "";

#[tokio::test]
async fn verifier_accepts_the_agent_token_serves_the_bundle_and_refuses_a_revoked_key() {
    let ns = TestNamespace::new("kw-verifier").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(
        &pks,
        "vk",
        json!({}),
        json!({ "rotation": { "publishDelay": "10s" } }),
    )
    .await;
    wait_pk(&pks, "vk", "settled", is_settled).await;
    let agent = secrets.get("vk").await.expect("the agent Secret");
    let kid1 = data(&agent, l::DATA_KEY_ID).expect("key id");
    let token1 = data(&agent, l::DATA_TOKEN).expect("token");

    let v = Running::start(ns.name()).await;
    let http = reqwest::Client::new();
    let base = v.base.clone();
    let (pod, pod_token) = pod_with_token(&ns, "agent-0", "keyward").await;

    // Ready once listed; the agent's token accepted, with the key headers, and its use
    // recorded for its pod once the API server vouched for the pod token.
    wait_ready(&http, &base).await;
    let res = eventually("the agent token accepted", || async {
        let r = auth(&http, &base, &token1, &pod_token).await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(header(&res, "x-keyward-key"), format!("{}/vk", ns.name()));
    assert_eq!(header(&res, "x-keyward-kid"), kid1);
    let key = KeyRef::new(ns.name(), "vk");
    eventually("use recorded for the pod", || async {
        v.log
            .pods_seen(&key, &kid1)
            .contains_key(&pod)
            .then_some(())
    })
    .await;

    // The bundle over HTTP: max-age = publishDelay / 2, strong ETag, 304 on If-None-Match.
    let jwks_url = format!("{base}/keys/{}/vk/jwks.json", ns.name());
    let res = http.get(&jwks_url).send().await.expect("GET jwks");
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "cache-control"), "public, max-age=5");
    let etag1 = header(&res, "etag");
    assert!(etag1.starts_with('"'), "strong ETag: {etag1}");
    let jwks1 = res.text().await.expect("body");
    let set: Jwks = serde_json::from_str(&jwks1).expect("JWKS");
    assert_eq!(set.key_ids(), vec![kid1.clone()]);
    let res = http
        .get(&jwks_url)
        .header("if-none-match", &etag1)
        .send()
        .await
        .expect("GET jwks");
    assert_eq!(res.status(), 304);
    let res = http
        .get(format!("{base}/keys/{}/nope/jwks.json", ns.name()))
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 404);

    // Interop: the agent Secret's real token against the served JWKS, in jsonwebtoken.
    // A key created without `token.audience` issues its own: `keyward:<ns>/<name>`.
    let aud = format!("keyward:{}/vk", ns.name());
    let claims = jsonwebtoken_verify(&token1, &jwks1, &aud, "keyward")
        .expect("jsonwebtoken accepts the agent Secret's token");
    assert_eq!(claims["sub"], format!("{}/vk", ns.name()));

    // Break-glass rotation: the successor handed out, the old key revoked.
    compromise_first_key(&pks, &secrets, "vk", &kid1).await;
    let agent = wait_obj(&secrets, "vk", "the successor handed out", TIMEOUT, |s| {
        data(s, l::DATA_KEY_ID).is_some_and(|k| k != kid1)
    })
    .await;
    let kid2 = data(&agent, l::DATA_KEY_ID).expect("key id");
    let token2 = data(&agent, l::DATA_TOKEN).expect("token");

    // The old token refused as revoked (still unexpired), the new one accepted. (It is refused
    // as `KeyNotRecorded` from the moment it leaves the trust record, before the bundle lists
    // it as revoked.)
    let res = eventually("the old token refused as revoked", || async {
        let r = auth(&http, &base, &token1, NO_POD).await;
        (r.status() == 401 && header(&r, "x-keyward-reason") == "TokenRevoked").then_some(r)
    })
    .await;
    assert!(res.text().await.expect("body").is_empty());
    let res = auth(&http, &base, &token2, NO_POD).await;
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "x-keyward-kid"), kid2);

    // The bundle changed: the old ETag no longer matches; revoked.json lists the old key.
    let res = http
        .get(&jwks_url)
        .header("if-none-match", &etag1)
        .send()
        .await
        .expect("GET jwks");
    assert_eq!(res.status(), 200);
    assert_ne!(header(&res, "etag"), etag1);
    let revoked: Vec<String> = serde_json::from_str(
        &http
            .get(format!("{base}/keys/{}/vk/revoked.json", ns.name()))
            .send()
            .await
            .expect("GET revoked")
            .text()
            .await
            .expect("body"),
    )
    .expect("a list");
    assert!(revoked.contains(&kid1), "revoked.json: {revoked:?}");

    v.stop().await;
    op.stop().await;
    ns.cleanup().await;
}

/// Issue 18, finding 1: a token of namespace A's key is not accepted on namespace B's route,
/// nor on the unbound `/auth`, with both keys watched by one verifier (before: 200 on both).
#[tokio::test]
async fn a_token_passes_only_the_route_bound_to_its_key() {
    let ns_a = TestNamespace::new("kw-bind-a").await;
    let ns_b = ns_a.another("kw-bind-b").await;
    let (_, token_a) = minted_key(&ns_a, "bundles").await;
    let (_, token_b) = minted_key(&ns_b, "bundles").await;

    let v = Running::watching(&[ns_a.name(), ns_b.name()]).await;
    let base = v.base.clone();
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;
    let route_a = format!("{base}/auth/{}/bundles", ns_a.name());
    let route_b = format!("{base}/auth/{}/bundles", ns_b.name());
    eventually("both tokens accepted on their own routes", || async {
        let a = auth_at(&http, &route_a, &token_a, NO_POD).await.status() == 200;
        let b = auth_at(&http, &route_b, &token_b, NO_POD).await.status() == 200;
        (a && b).then_some(())
    })
    .await;
    for (url, token) in [(&route_b, &token_a), (&route_a, &token_b)] {
        let res = auth_at(&http, url, token, NO_POD).await;
        assert_eq!(res.status(), 403, "{url}");
        assert_eq!(header(&res, "x-keyward-reason"), "KeyNotAccepted");
        // Envoy's shape for the same binding.
        let envoy = url.replacen("/auth/", "/authz/", 1) + "/bundles/authz.tar.gz";
        assert_eq!(auth_at(&http, &envoy, token, NO_POD).await.status(), 403);
    }
    for url in [
        format!("{base}/auth"),
        format!("{base}/ext_authz/{}/bundles/x", ns_b.name()),
    ] {
        let res = auth_at(&http, &url, &token_a, NO_POD).await;
        assert_eq!(res.status(), 403, "{url}");
        assert_eq!(header(&res, "x-keyward-reason"), "Unbound");
    }
    v.stop().await;
    ns_a.cleanup().await;
    ns_b.cleanup().await;
}

// ---- Reporting: the `keyward verifier` binary writing KeyUsageReports and its Lease. ----

use k8s_openapi::api::coordination::v1::Lease;
use keyward::api::key_usage::KeyUsageReport;
use keyward::usage;

/// A spawned `keyward verifier` with reporting on, its base URL and log.
struct Spawned {
    child: KillOnDrop,
    base: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    async fn start(namespace: &str, replica: &str, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("verifier.log");
        let address = format!("127.0.0.1:{port}");
        let mut args = vec![
            "verifier",
            "--plain-http",
            "--namespaces",
            namespace,
            "--log-format",
            "json",
            "--address",
            &address,
            "--replica-id",
            replica,
            "--lease-namespace",
            namespace,
        ];
        args.extend_from_slice(extra);
        let child = spawn_keyward(&args, &[], &log);
        let v = Spawned {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        wait_ready(&reqwest::Client::new(), &v.base).await;
        v
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sigterm(&self) {
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
    }

    /// Waits for the process to exit (at most `within`).
    async fn exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "no exit within {within:?}; log:\n{}",
                self.read_log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A ProvisioningKey `name`, minted by an in-process operator (stopped afterwards): its UID and
/// the agent Secret's token.
async fn minted_key(ns: &TestNamespace, name: &str) -> (String, String) {
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(&pks, name, json!({}), json!({})).await;
    let pk = wait_pk(&pks, name, "settled", is_settled).await;
    let agent = secrets.get(name).await.expect("the agent Secret");
    op.stop().await;
    (
        pk.metadata.uid.expect("uid"),
        data(&agent, l::DATA_TOKEN).expect("token"),
    )
}

fn lease_times(lease: &Lease) -> (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) {
    let spec = lease.spec.as_ref().expect("spec");
    (
        usage::jiff_to_chrono(spec.acquire_time.as_ref().expect("acquireTime").0).expect("time"),
        usage::jiff_to_chrono(spec.renew_time.as_ref().expect("renewTime").0).expect("time"),
    )
}

fn holder(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

fn stopped(lease: &Lease) -> bool {
    lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(usage::ANN_STOPPED))
        .is_some_and(|v| v == "true")
}

/// ~2,000 accepted requests for one key over ~25 s from 3 pods and unattributed clients: at
/// most one report write per 10 s interval (the object's generation counts spec changes; the
/// resolution is 1 s, so every flush has something newer to write), exactly the 3 pods listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_makes_at_most_one_report_write_per_interval() {
    let ns = TestNamespace::new("kw-vreport").await;
    let (uid, token) = minted_key(&ns, "vk").await;
    let mut pod_uids = Vec::new();
    let mut pod_tokens = Vec::new();
    for i in 0..3 {
        let (pod, pod_token) = pod_with_token(&ns, &format!("agent-{i}"), "keyward").await;
        pod_uids.push(pod);
        pod_tokens.push(pod_token);
    }
    let mut v = Spawned::start(
        ns.name(),
        "flood-0",
        &["--report-interval", "10s", "--report-resolution", "1s"],
    )
    .await;
    let http = reqwest::Client::new();
    let base = v.base.clone();
    eventually("the token accepted", || async {
        (auth(&http, &base, &token, &pod_tokens[0]).await.status() == 200).then_some(())
    })
    .await;

    let started = Instant::now();
    let mut accepted = 0u32;
    let mut i = 0usize;
    // At least 25 s and 1,500 accepted requests (a machine busy with other work serves fewer
    // per second: the flood then lasts longer, up to 2 minutes, rather than failing).
    while started.elapsed() < Duration::from_secs(25)
        || (accepted < 1500 && started.elapsed() < Duration::from_secs(120))
    {
        // Pods round-robin, and every fourth request without a usable pod token (none, or one
        // the API server refuses).
        let pod = match i % 4 {
            3 => {
                if i % 8 == 3 {
                    ""
                } else {
                    "${POD_TOKEN}"
                }
            }
            n => pod_tokens[n].as_str(),
        };
        if auth(&http, &base, &token, pod).await.status() == 200 {
            accepted += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(9)).await;
    }
    let flood_secs = started.elapsed().as_secs_f64();
    assert!(accepted >= 1500, "only {accepted} requests accepted");

    let reports: Api<KeyUsageReport> = ns.api();
    let name = usage::report_name("vk", "flood-0");
    let report = reports.get(&name).await.expect("the report");
    let generation = report.metadata.generation.expect("generation");
    eprintln!(
        "{accepted} requests accepted in {flood_secs:.1} s; report generation (writes) {generation}"
    );
    // 25 s of traffic and the read: the intervals starting at t0, t0+10 and t0+20, plus one
    // for the first write racing the read (one more per 10 s when the flood ran longer).
    let most = (flood_secs / 10.0).floor() as i64 + 2;
    assert!(
        (2..=most).contains(&generation),
        "report written {generation} times for {accepted} requests in {flood_secs:.1} s"
    );
    assert_eq!(report.spec.provisioning_key, "vk");
    assert_eq!(report.spec.replica, "flood-0");
    assert_eq!(report.spec.keys.len(), 1);
    let mut pods: Vec<&str> = report.spec.keys[0]
        .pods
        .iter()
        .map(|p| p.uid.as_str())
        .collect();
    pods.sort();
    assert_eq!(
        pods,
        {
            let mut want: Vec<&str> = pod_uids.iter().map(String::as_str).collect();
            want.sort();
            want
        },
        "exactly the 3 pods, no unattributed use"
    );
    assert!(!report.spec.keys[0].pods_truncated);
    let last = keyward::controller::parse_ts(&report.spec.keys[0].last_used_at).expect("RFC 3339");
    let age = chrono::Utc::now() - last;
    assert!(age < chrono::Duration::seconds(15), "lastUsedAt {age} old");
    let owner = &report.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ProvisioningKey", uid.as_str())
    );
    let labels = report.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(usage::REPLICA_LABEL).map(String::as_str),
        Some("flood-0")
    );
    let managers: Vec<String> = report
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(managers, vec![usage::FIELD_MANAGER.to_string()]);

    v.sigterm();
    assert!(
        v.exit(Duration::from_secs(15)).await.success(),
        "log:\n{}",
        v.read_log()
    );
    ns.cleanup().await;
}

/// The Lease: a window from the process start, a watermark that advances, `stopped` after
/// SIGTERM; a restart takes it over with a new window; a second process with the same replica
/// id takes it over too, and the older one exits non-zero instead of fighting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_lease_vouches_for_a_window_and_is_never_shared() {
    let ns = TestNamespace::new("kw-vlease").await;
    let (_, token) = minted_key(&ns, "vk").await;
    let (pod, pod_token) = pod_with_token(&ns, "agent-0", "keyward").await;
    let leases: Api<Lease> = ns.api();
    let lease_name = usage::lease_name("lease-0");
    let args = ["--report-interval", "2s"];

    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut first = Spawned::start(ns.name(), "lease-0", &args).await;
    let http = reqwest::Client::new();
    let lease = wait_obj(&leases, &lease_name, "the Lease written", TIMEOUT, |_| true).await;
    let (since1, renewed) = lease_times(&lease);
    assert!(
        since1 >= before && since1 <= chrono::Utc::now(),
        "acquireTime {since1}"
    );
    assert!(
        holder(&lease).starts_with("lease-0/"),
        "holder {}",
        holder(&lease)
    );
    assert!(!stopped(&lease));
    let ann = lease.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get(usage::ANN_NAMESPACES).map(String::as_str),
        Some(ns.name())
    );
    assert_eq!(
        ann.get(usage::ANN_RESOLUTION).map(String::as_str),
        Some("60s")
    );
    assert_eq!(
        lease.spec.as_ref().and_then(|s| s.lease_duration_seconds),
        Some(6)
    );
    let parsed = usage::parse_lease(&lease).expect("the operator can read it");
    assert_eq!(parsed.name, "lease-0");
    // The watermark advances with the flushes.
    wait_obj(
        &leases,
        &lease_name,
        "the watermark advanced",
        TIMEOUT,
        |l| lease_times(l).1 > renewed,
    )
    .await;
    let base = first.base.clone();
    eventually("the token accepted", || async {
        (auth(&http, &base, &token, &pod_token).await.status() == 200).then_some(())
    })
    .await;
    // The pod token's review (in the background, a few ms) records the pod's use.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // SIGTERM: a final flush, exit 0, and the Lease marked stopped with a watermark at stop.
    let term = chrono::Utc::now();
    first.sigterm();
    assert!(
        first.exit(Duration::from_secs(15)).await.success(),
        "log:\n{}",
        first.read_log()
    );
    let lease = leases.get(&lease_name).await.expect("the Lease");
    assert!(
        stopped(&lease),
        "stopped after a clean shutdown; log:\n{}",
        first.read_log()
    );
    assert!(
        lease_times(&lease).1 >= term,
        "the final watermark covers every use"
    );
    let reports: Api<KeyUsageReport> = ns.api();
    let report = reports
        .get(&usage::report_name("vk", "lease-0"))
        .await
        .expect("the final flush wrote the report");
    assert_eq!(report.spec.keys[0].pods[0].uid, pod);
    // Issue 18, finding 4: the report carries its write number, and the Lease (renewed after
    // the write) lists it with that number.
    let seq = usage::report_seq(&report).expect("the report is numbered");
    let listed = usage::parse_lease(&lease).expect("parses").reports;
    assert_eq!(
        listed.get(&usage::report_key(ns.name(), "vk")),
        Some(&seq),
        "{listed:?}"
    );

    // A restart with the same replica id: a new, later window, `stopped` removed, and the
    // previous incarnation's list carried over (its report is still evidence).
    let mut second = Spawned::start(ns.name(), "lease-0", &args).await;
    let lease = wait_obj(&leases, &lease_name, "taken over", TIMEOUT, |l| {
        lease_times(l).0 > since1 && !stopped(l)
    })
    .await;
    let holder2 = holder(&lease);
    assert_eq!(
        usage::parse_lease(&lease).expect("parses").reports,
        listed,
        "carried over"
    );

    // A second process with the same replica id: it takes the Lease over; the older one
    // notices at its next renewal and exits non-zero.
    let mut third = Spawned::start(ns.name(), "lease-0", &args).await;
    let status = second.exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "the older process exits non-zero");
    assert!(
        second
            .read_log()
            .contains("another process runs with the same --replica-id"),
        "log:\n{}",
        second.read_log()
    );
    let lease = leases.get(&lease_name).await.expect("the Lease");
    assert_ne!(holder(&lease), holder2);
    assert!(
        third.child.0.try_wait().expect("wait").is_none(),
        "the newer one serves on"
    );
    third.sigterm();
    assert!(
        third.exit(Duration::from_secs(15)).await.success(),
        "log:\n{}",
        third.read_log()
    );
    ns.cleanup().await;
}

/// `--report=false` (a sidecar verifier): it verifies, but writes no Lease and no report, so
/// it never counts as a replica (the operator neither waits on it nor takes its word).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_without_reporting_writes_no_lease_and_no_report() {
    let ns = TestNamespace::new("kw-vnoreport").await;
    let (_, token) = minted_key(&ns, "vk").await;
    let (_, pod_token) = pod_with_token(&ns, "agent-0", "keyward").await;
    let mut v = Spawned::start(
        ns.name(),
        "sidecar-0",
        &["--report=false", "--report-interval", "1s"],
    )
    .await;
    let http = reqwest::Client::new();
    let base = v.base.clone();
    eventually("the token accepted", || async {
        (auth(&http, &base, &token, &pod_token).await.status() == 200).then_some(())
    })
    .await;
    // Several report intervals of use, then a clean stop (a reporter would flush at stop).
    for _ in 0..30 {
        assert_eq!(auth(&http, &base, &token, &pod_token).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v.sigterm();
    assert!(
        v.exit(Duration::from_secs(15)).await.success(),
        "log:\n{}",
        v.read_log()
    );
    let leases: Api<Lease> = ns.api();
    let reports: Api<KeyUsageReport> = ns.api();
    let lp = kube::api::ListParams::default();
    assert!(leases.list(&lp).await.expect("leases").items.is_empty());
    assert!(reports.list(&lp).await.expect("reports").items.is_empty());
    ns.cleanup().await;
}

/// Issue 18, finding 8: the `keyward verifier` binary as an edge. A client that sends half a
/// request head is cut off after `--header-read-timeout`; past `--max-connections` a new
/// connection is closed at once; two `Authorization` headers and a `crit` header are refused;
/// a refused token's claims never reach the log; core dumps are off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_binary_holds_as_an_edge() {
    use std::io::{Read as _, Write as _};
    let ns = TestNamespace::new("kw-edge").await;
    let (_, token) = minted_key(&ns, "edge").await;
    let v = Spawned::start(
        ns.name(),
        "edge-0",
        &[
            "--report=false",
            // Long enough that the 8 connections held below are still open when the 9th comes,
            // also on a loaded machine (at 1 s they were cut off first there).
            "--header-read-timeout",
            "3s",
            "--max-connections",
            "8",
        ],
    )
    .await;
    let addr = v.base.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let route = format!("{}/auth/{}/edge", v.base, ns.name());
    eventually("the token accepted", || async {
        (auth_at(&http, &route, &token, NO_POD).await.status() == 200).then_some(())
    })
    .await;

    // Slowloris: half a head, then silence. Cut off after about 3 s.
    let slow = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .expect("write");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let started = Instant::now();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            (n, started.elapsed())
        }
    })
    .await
    .expect("join");
    assert_eq!(slow.0, 0, "closed without an answer");
    assert!(
        slow.1 < Duration::from_secs(7),
        "cut off after {:?}",
        slow.1
    );

    // The connection cap: 8 held open, the 9th closed at once; a slot frees when one closes.
    let opened = Instant::now();
    let held: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let over = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            let mut s = std::net::TcpStream::connect(&addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 64];
            s.read(&mut buf).unwrap_or(0)
        }
    })
    .await
    .expect("join");
    assert_eq!(
        over,
        0,
        "the connection over the cap gets no answer ({:?} after the 8 were opened)",
        opened.elapsed()
    );
    drop(held);
    eventually("a slot free again", || async {
        (http
            .get(format!("{}/healthz", v.base))
            .send()
            .await
            .ok()?
            .status()
            == 200)
            .then_some(())
    })
    .await;

    // Two Authorization headers, one of them good: refused.
    let res = http
        .get(&route)
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", "Bearer x")
        .send()
        .await
        .expect("GET");
    assert_eq!(res.status(), 401);
    assert_eq!(header(&res, "x-keyward-reason"), "DuplicateAuthorization");

    // A forged token whose claims carry a log-injection payload: refused, and none of it is
    // in the log (refusals are logged by reason only).
    let forger = KeyPair::generate();
    let now = chrono::Utc::now().timestamp();
    let forged = forger
        .sign_token(&TokenClaims {
            iss: "keyward".into(),
            sub: format!(
                "{}/edge\n{{\"level\":\"INFO\",\"fields\":{{\"message\":\"INJECTED-LINE\"}}}}",
                ns.name()
            ),
            aud: "keyward".into(),
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: "INJECTED-JTI".into(),
        })
        .expect("sign");
    let res = auth_at(&http, &route, &forged, NO_POD).await;
    assert_eq!(res.status(), 401);
    let metrics = http
        .get(format!("{}/metrics", v.base))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains(r#"keyward_verifier_decisions_total{result="refused",reason="DuplicateAuthorization"} 1"#),
        "{metrics}"
    );
    let log = v.read_log();
    assert!(
        !log.contains("INJECTED"),
        "unverified claims in the log:\n{log}"
    );

    // No core dumps: RLIMIT_CORE is 0.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", v.child.0.id()))
        .expect("/proc/<pid>/limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core limit line");
    assert!(
        core.split_whitespace().skip(4).take(2).all(|n| n == "0"),
        "{core}"
    );
    drop(v);
    ns.cleanup().await;
}

// ---- Issue 18, finding 2: injected keys. ----

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use keyward::trust_record::{self, TrustRecord};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

/// A client that acts as `user` (impersonation by the admin identity of the plane).
async fn client_as(user: &str) -> kube::Client {
    let mut cfg = kube_config().await;
    cfg.auth_info.impersonate = Some(user.to_string());
    kube::Client::try_from(cfg).expect("client")
}

/// The plane's admin username (the identity the in-process operator runs as).
async fn own_username() -> String {
    let client = kube::Client::try_from(kube_config().await).expect("client");
    let review: k8s_openapi::api::authentication::v1::SelfSubjectReview = client
        .request(
            http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
                .header("content-type", "application/json")
                .body(
                    serde_json::to_vec(&json!({
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "SelfSubjectReview",
                    }))
                    .expect("body"),
                )
                .expect("request"),
        )
        .await
        .expect("SelfSubjectReview");
    review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .expect("a username")
}

/// Installs the trust-record policy (the chart's rule) for `ns`, with the operator's identity
/// as the only writer; returns its name for the cleanup.
async fn install_trust_record_policy(ns: &str) -> String {
    let name = format!("keyward-trust-record-{ns}");
    install_admission_policy(trust_record::policy_objects(
        &name,
        &[own_username().await],
        Some(ns),
    ))
    .await;
    name
}

/// A tenant with ConfigMap rights in `ns` (and patch on ProvisioningKeys and their status, to
/// show the policy, not RBAC, stops the record write), but no Secret rights.
async fn grant_configmap_rights(ns: &TestNamespace, user: &str) {
    grant(
        ns,
        "configmap-editor",
        user,
        json!([
            {"apiGroups": [""], "resources": ["configmaps"],
             "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
            {"apiGroups": ["keyward.dev"], "resources": ["provisioningkeys", "provisioningkeys/status"],
             "verbs": ["get", "list", "watch", "update", "patch"]},
        ]),
    )
    .await;
}

/// A Role `name` with `rules` in `ns`, bound to `user`.
async fn grant(ns: &TestNamespace, name: &str, user: &str, rules: serde_json::Value) {
    let roles: Api<Role> = ns.api();
    let bindings: Api<RoleBinding> = ns.api();
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": {"name": name}, "rules": rules }))
                .expect("role"),
        )
        .await
        .expect("create the role");
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }))
            .expect("binding"),
        )
        .await
        .expect("create the binding");
}

fn record_of(pk: &ProvisioningKey) -> TrustRecord {
    TrustRecord::of(pk)
        .expect("a trust record")
        .expect("a readable trust record")
}

/// Issue 18, finding 2 (before: 98 of 98 forged tokens passed, and the JWKS endpoint served
/// the injected key). A tenant who may patch the trust-bundle ConfigMap adds a JWK of their
/// own: no token of it passes, the JWKS endpoint never serves it, the operator restores the
/// bundle within a reconcile with a `BundleTampered` Warning and a metric, and the tenant cannot
/// write the trust record (the ValidatingAdmissionPolicy refuses them). Wiping the status
/// refuses no legitimate token, nor does a whole rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_jwk_is_never_trusted_and_the_bundle_is_restored() {
    let ns = TestNamespace::new("kw-inject").await;
    let policy = install_trust_record_policy(ns.name()).await;
    grant_configmap_rights(&ns, "mallory").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(
        &pks,
        "tk",
        json!({}),
        // No PolicyAgent: the old key is revoked once its last token expired, so a short ttl.
        json!({ "rotation": { "publishDelay": "2s", "overlap": "2s" }, "token": { "ttl": "20s" } }),
    )
    .await;
    let pk = wait_pk(&pks, "tk", "settled", is_settled).await;
    let record = record_of(&pk);
    let agent = secrets.get("tk").await.expect("the agent Secret");
    let (kid1, token1) = (
        data(&agent, l::DATA_KEY_ID).expect("key id"),
        data(&agent, l::DATA_TOKEN).expect("token"),
    );
    assert_eq!(record.kids.keys().collect::<Vec<_>>(), vec![&kid1]);

    let v = Running::start(ns.name()).await;
    let http = reqwest::Client::new();
    let route = format!("{}/auth/{}/tk", v.base, ns.name());
    let jwks_url = format!("{}/keys/{}/tk/jwks.json", v.base, ns.name());
    wait_ready(&http, &v.base).await;
    eventually("the agent token accepted", || async {
        (auth_at(&http, &route, &token1, NO_POD).await.status() == 200).then_some(())
    })
    .await;

    // Mallory adds her own JWK to the bundle, and signs a token with the record's claims.
    let mallory = client_as("mallory").await;
    let cms: Api<ConfigMap> = Api::namespaced(mallory.clone(), ns.name());
    let cm = cms.get("tk-trust").await.expect("mallory reads the bundle");
    let mut jwks: Jwks = serde_json::from_str(&cm.data.expect("data")[l::DATA_JWKS]).expect("jwks");
    let evil = KeyPair::generate();
    jwks.keys.push(evil.public_key().to_jwk());
    cms.patch(
        "tk-trust",
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "data": { l::DATA_JWKS: serde_json::to_string(&jwks).expect("json") } }),
        ),
    )
    .await
    .expect("mallory may patch the ConfigMap");
    let now = chrono::Utc::now().timestamp();
    let forged = evil
        .sign_token(&TokenClaims {
            iss: record.iss.clone(),
            sub: format!("{}/tk", ns.name()),
            aud: record.aud.clone(),
            iat: now,
            nbf: now,
            exp: now + 600,
            jti: "forged".into(),
        })
        .expect("sign");
    // Whether the verifier has seen the injection or the restored bundle, the forged token
    // never passes, and the JWKS endpoint never lists the injected key.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tries = 0;
    while Instant::now() < deadline {
        let res = auth_at(&http, &route, &forged, NO_POD).await;
        assert_eq!(res.status(), 401, "a forged token passed");
        let served: Jwks = serde_json::from_str(
            &http
                .get(&jwks_url)
                .send()
                .await
                .expect("GET")
                .text()
                .await
                .expect("body"),
        )
        .expect("jwks");
        assert!(!served.key_ids().contains(&evil.public_key().key_id()));
        assert_eq!(auth_at(&http, &route, &token1, NO_POD).await.status(), 200);
        tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tries > 10);
    // Restored by the operator, with a Warning and a metric.
    let cms_admin: Api<ConfigMap> = ns.api();
    wait_obj(
        &cms_admin,
        "tk-trust",
        "the bundle restored",
        TIMEOUT,
        |cm| {
            let jwks: Option<Jwks> = cm
                .data
                .as_ref()
                .and_then(|d| serde_json::from_str(&d[l::DATA_JWKS]).ok());
            jwks.is_some_and(|j| j.key_ids() == vec![kid1.clone()])
        },
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    eventually("a BundleTampered Warning", || async {
        let list = events.list(&Default::default()).await.expect("events");
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("BundleTampered"))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .filter(|e| {
                e.note
                    .as_deref()
                    .is_some_and(|n| n.contains(&evil.public_key().key_id()))
            })
    })
    .await;
    let metrics = op.observability().metrics.encode();
    let tampered = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_bundle_tampered_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(tampered.is_some_and(|n| n >= 1.0), "{metrics}");

    // Mallory cannot write the record: not add her key id, not remove the record, neither in
    // status (where it is) nor in the earlier versions' annotation (read when status has none).
    let mallory_pks: Api<ProvisioningKey> = Api::namespaced(mallory, ns.name());
    let mut tampered = record.clone();
    tampered.kids.insert(evil.public_key().key_id(), 600);
    let status_writes = [
        json!({ "status": { "trustRecord": tampered.render() } }),
        json!({ "status": { "trustRecord": null } }),
        json!({ "status": null }),
    ];
    // (The key has no such annotation to remove: this version never wrote one.)
    let annotation_writes =
        [json!({ "metadata": { "annotations": { trust_record::ANNOTATION: tampered.render() } } })];
    for (status, body) in status_writes
        .iter()
        .map(|b| (true, b))
        .chain(annotation_writes.iter().map(|b| (false, b)))
    {
        let err = eventually("the policy in force", || async {
            let params = PatchParams::default();
            let patch = Patch::Merge(body);
            if status {
                mallory_pks.patch_status("tk", &params, &patch).await.err()
            } else {
                mallory_pks.patch("tk", &params, &patch).await.err()
            }
        })
        .await;
        assert!(
            err.to_string()
                .contains("only the Keyward operator may write"),
            "{body}: {err}"
        );
    }
    assert_eq!(record_of(&pks.get("tk").await.expect("pk")), record);

    // The rest of status is not evidence: Mallory wipes it (the record kept, which the policy
    // requires), and no legitimate token is refused.
    let record_text = pks
        .get_status("tk")
        .await
        .expect("status")
        .status
        .and_then(|s| s.trust_record)
        .expect("the record is in status");
    let mut wiped = pks.get("tk").await.expect("pk");
    wiped.status = Some(keyward::api::provisioning_key::ProvisioningKeyStatus {
        trust_record: Some(record_text),
        ..Default::default()
    });
    mallory_pks
        .replace_status("tk", &PostParams::default(), &wiped)
        .await
        .expect("mallory wipes the rest of the status");
    for _ in 0..10 {
        assert_eq!(auth_at(&http, &route, &token1, NO_POD).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A whole rotation: every token the agent Secret holds passes at every look, and so does
    // the newest token of the old key until it expires or the key is revoked.
    merge(
        &pks,
        "tk",
        json!({ "metadata": { "annotations": { l::ROTATE: "inject-test" } } }),
    )
    .await;
    let k1 = key_secret_name("tk", 1);
    let k1_revoked = || async {
        secrets
            .get(&k1)
            .await
            .map(|s| state(&s) == "deactivated")
            .unwrap_or(true)
    };
    let exp_of = |t: &str| {
        keyward::keys::decode_token_unverified(t)
            .map(|(_, c)| c.exp)
            .unwrap_or(0)
    };
    let mut old_token = token1.clone();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut looks = 0;
    loop {
        let agent = secrets.get("tk").await.expect("agent Secret");
        let (kid, token) = (
            data(&agent, l::DATA_KEY_ID).expect("kid"),
            data(&agent, l::DATA_TOKEN).expect("token"),
        );
        if kid == kid1 {
            old_token = token.clone();
        }
        let res = auth_at(&http, &route, &token, NO_POD).await;
        assert_eq!(
            res.status(),
            200,
            "the agent Secret's token refused: {}",
            header(&res, "x-keyward-reason")
        );
        let revoked = k1_revoked().await;
        if !revoked && exp_of(&old_token) > chrono::Utc::now().timestamp() + 1 {
            let res = auth_at(&http, &route, &old_token, NO_POD).await;
            assert!(
                res.status() == 200 || k1_revoked().await,
                "the old key's live token refused before its revocation: {}",
                header(&res, "x-keyward-reason")
            );
        }
        looks += 1;
        if revoked && kid != kid1 && is_settled(&pks.get("tk").await.expect("pk")) {
            break;
        }
        assert!(Instant::now() < deadline, "the rotation did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(looks > 3, "{looks}");
    let record = record_of(&pks.get("tk").await.expect("pk"));
    assert!(
        !record.has(&kid1),
        "the revoked key id left the record: {record:?}"
    );

    v.stop().await;
    op.stop().await;
    remove_admission_policy(&policy).await;
    ns.cleanup().await;
}

// ---- Issue 18 part 9: a stale view is visible. ----

/// A TCP forwarder to the API server that the test can cut (every connection dropped, new
/// ones refused by closing them at once) and restore.
struct Cuttable {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn to(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut cut_rx = cut_rx;
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        if *cut_rx.borrow() {
                            continue; // dropped: closed at once
                        }
                        let upstream = upstream.clone();
                        conns.spawn(async move {
                            if let Ok(mut out) = tokio::net::TcpStream::connect(&upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                            }
                        });
                    }
                    changed = cut_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        if *cut_rx.borrow() {
                            conns.abort_all();
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Cuttable { addr, cut, task }
    }
}

/// Issue 18 part 9: when the verifier's watches fail for longer than `--max-staleness`, it goes
/// not ready (with the reason) and `keyward_verifier_view_unconfirmed_seconds` shows how long;
/// when the API server is back, the watches list afresh, so a revocation made meanwhile is
/// seen, and it is ready again. (Before: a failed watch kept the verifier ready, silently.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_that_cannot_confirm_its_view_goes_not_ready_and_lists_again() {
    let ns = TestNamespace::new("kw-stale").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(&pks, "sk", json!({}), json!({})).await;
    wait_pk(&pks, "sk", "settled", is_settled).await;
    let agent = secrets.get("sk").await.expect("the agent Secret");
    let (kid1, token1) = (
        data(&agent, l::DATA_KEY_ID).expect("key id"),
        data(&agent, l::DATA_TOKEN).expect("token"),
    );

    // The verifier reaches the API server only through the forwarder.
    let mut config = kube_config().await;
    let api = config.cluster_url.clone();
    let upstream = format!(
        "{}:{}",
        api.host().expect("host"),
        api.port_u16().unwrap_or(443)
    );
    let proxy = Cuttable::to(upstream).await;
    config.cluster_url = format!("https://{}", proxy.addr).parse().expect("url");
    let client = kube::Client::try_from(config).expect("client");
    let shared = Arc::new(
        Shared::new(Policy::default(), Arc::new(MemoryUseLog::new(10)), None)
            .with_max_staleness(Duration::from_secs(2)),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(verifier::run(
        client,
        vec![ns.name().to_string()],
        shared,
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    let http = reqwest::Client::new();
    let route = format!("{base}/auth/{}/sk", ns.name());
    wait_ready(&http, &base).await;
    eventually("the agent token accepted", || async {
        (auth_at(&http, &route, &token1, NO_POD).await.status() == 200).then_some(())
    })
    .await;

    // Cut: not ready past the bound, with the reason, and the gauge says how long.
    let _ = proxy.cut.send(true);
    let cut_at = Instant::now();
    let body = eventually("not ready", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 503).then_some(r.text().await.ok()?)
    })
    .await;
    assert!(
        cut_at.elapsed() >= Duration::from_secs(2),
        "not ready before the bound"
    );
    assert!(body.contains("unconfirmed"), "{body}");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let unconfirmed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keyward_verifier_view_unconfirmed_seconds "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(unconfirmed.is_some_and(|s| s >= 2.0), "{metrics}");

    // Meanwhile the key is compromised: the operator revokes it (the verifier cannot see it).
    compromise_first_key(&pks, &secrets, "sk", &kid1).await;

    // Restored: the watches list again, the revocation is seen, ready again.
    let _ = proxy.cut.send(false);
    eventually("ready again", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    eventually("the revoked key's token refused", || async {
        (auth_at(&http, &route, &token1, NO_POD).await.status() == 401).then_some(())
    })
    .await;

    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    proxy.task.abort();
    op.stop().await;
    ns.cleanup().await;
}

// ---- Issue 18, finding 4: usage evidence edited in place. ----

/// With the chart's evidence policy, nobody but the verifier's pods (and the control plane's
/// collectors) may create, change or delete usage evidence: an admin (`system:masters`, which
/// RBAC does not stop) can neither lower a report's `lastUsedAt` nor delete it, nor write a
/// `keyward-verifier-*` Lease; other Leases are untouched, and the garbage collector still
/// deletes a deleted key's reports. (Before: a patch of `lastUsedAt` was accepted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_evidence_is_written_only_by_the_verifier() {
    use keyward::usage::write_policy;
    let ns = TestNamespace::new("kw-evidence").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let reports: Api<KeyUsageReport> = ns.api();
    let leases: Api<Lease> = ns.api();
    let pk = pks
        .create(
            &PostParams::default(),
            &provisioning_key("ek", json!({}), json!({})),
        )
        .await
        .expect("create the key");
    let report: KeyUsageReport = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "KeyUsageReport",
        "metadata": {
            "name": "ek-v-0",
            "labels": { "keyward.dev/verifier-replica": "v-0" },
            "ownerReferences": [{
                "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                "name": "ek", "uid": pk.metadata.uid.clone().expect("uid"),
            }],
        },
        "spec": {
            "provisioningKey": "ek",
            "replica": "v-0",
            "keys": [{ "kid": "k", "lastUsedAt": "2026-12-05T08:00:00Z" }],
        },
    }))
    .expect("report");
    reports
        .create(&PostParams::default(), &report)
        .await
        .expect("create the report before the policy");

    let name = format!("keyward-evidence-{}", ns.name());
    install_admission_policy(write_policy::evidence_policy_objects(
        &name,
        &[],
        Some(ns.name()),
    ))
    .await;

    let refused = |e: Option<kube::Error>| {
        e.is_some_and(|e| e.to_string().contains(write_policy::EVIDENCE_MESSAGE))
    };
    // A harmless probe until the policy is in force (it takes a moment to load).
    let probe = json!({ "metadata": { "annotations": { "probe": "1" } } });
    let err = eventually("the policy in force", || async {
        reports
            .patch("ek-v-0", &PatchParams::default(), &Patch::Merge(&probe))
            .await
            .err()
    })
    .await;
    assert!(refused(Some(err)), "the probe");
    let older =
        json!({ "spec": { "keys": [{ "kid": "k", "lastUsedAt": "2020-01-01T00:00:00Z" }] } });
    let err = reports
        .patch("ek-v-0", &PatchParams::default(), &Patch::Merge(&older))
        .await
        .err();
    assert!(refused(err), "patch of lastUsedAt");
    assert!(refused(
        reports
            .delete("ek-v-0", &DeleteParams::default())
            .await
            .err()
    ));
    let lease = |name: &str| -> Lease {
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "holderIdentity": "x" },
        }))
        .expect("lease")
    };
    assert!(refused(
        leases
            .create(&PostParams::default(), &lease("keyward-verifier-v-0"))
            .await
            .err()
    ));
    leases
        .create(&PostParams::default(), &lease("someone-else"))
        .await
        .expect("other Leases are not evidence");
    let report = reports.get("ek-v-0").await.expect("report");
    assert_eq!(report.spec.keys[0].last_used_at, "2026-12-05T08:00:00Z");

    // The key deleted: the garbage collector still removes its report.
    pks.delete("ek", &DeleteParams::default())
        .await
        .expect("delete the key");
    eventually("the report collected", || async {
        reports
            .get_opt("ek-v-0")
            .await
            .ok()
            .and_then(|r| r.is_none().then_some(()))
    })
    .await;

    remove_admission_policy(&name).await;
    ns.cleanup().await;
}

/// Issue 18, finding 5: acknowledgements tied to the pod, not to a header. Before, the pod UID
/// was the client's `X-Keyward-Pod-UID`, so any pod holding the shared agent token could
/// confirm any other pod (a rotation was confirmed 1.8 s after one pod sent another's UID).
/// Now only a pod-bound ServiceAccount token for the `keyward` audience, vouched for by the API
/// server, names a pod. Pod a's agent tries every way to acknowledge for pod b, with b's UID
/// in hand: the old header, an unsigned token claiming b, a token bound to b for the API
/// server's audience that a tenant (mallory, who may create ServiceAccount tokens) minted, and
/// a keyward token bound to b, which the pod-token policy refuses to mint for anyone but a
/// kubelet. A pod of another namespace does not count either. The report lists pod a only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_acknowledges_only_itself() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    let ns = TestNamespace::new("kw-vpodack").await;
    let other = ns.another("kw-vpodack-other").await;
    let (_, token) = minted_key(&ns, "vk").await;
    // The chart's pod-token policy, with the test harness as the kubelet stand-in.
    let policy = format!("keyward-pod-token-{}", ns.name());
    install_admission_policy(verifier::pod_identity::minting_policy_objects(
        &policy,
        verifier::pod_identity::DEFAULT_AUDIENCE,
        &[own_username().await],
        Some(ns.name()),
    ))
    .await;
    let (pod_a, token_a) = pod_with_token(&ns, "agent-a", "keyward").await;
    let (pod_b, _) = pod_with_token(&ns, "agent-b", "").await;
    let (pod_c, token_c) = pod_with_token(&other, "agent-c", "keyward").await;

    // mallory may create ServiceAccount tokens in the namespace (as `edit`-like roles may).
    grant(
        &ns,
        "token-minter",
        "mallory",
        json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}]),
    )
    .await;
    let mallory: Api<ServiceAccount> = Api::namespaced(client_as("mallory").await, ns.name());
    // A keyward token bound to pod b: refused by the policy (RBAC allowed it).
    let refused = eventually("mallory refused a keyward-audience token", || async {
        match request_pod_token(&mallory, "agent-b", &pod_b, "keyward").await {
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 403 => {
                e.message.contains("only kubelets").then_some(e)
            }
            Err(e) => panic!("unexpected error {e}"),
            // The policy may take a moment to reach the admission chain: retry.
            Ok(_) => None,
        }
    })
    .await;
    eprintln!(
        "mallory's keyward token for pod b: refused, {}",
        refused.message
    );
    // A token bound to pod b for the API server's audience: minted, but not for keyward.
    let b_api_token = request_pod_token(&mallory, "agent-b", &pod_b, "")
        .await
        .expect("a token for the API server's audience");
    // An unsigned token that claims pod b.
    let b64 = |v: serde_json::Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let forged = format!(
        "{}.{}.",
        b64(json!({"alg": "none"})),
        b64(json!({
            "aud": ["keyward"], "sub": "system:serviceaccount:x:agent",
            "kubernetes.io": {"namespace": ns.name(), "pod": {"name": "agent-b", "uid": pod_b}}
        }))
    );

    let v = Spawned::start(
        ns.name(),
        "ack-0",
        &["--report-interval", "1s", "--report-resolution", "1s"],
    )
    .await;
    let http = reqwest::Client::new();
    let base = v.base.clone();
    let attempts: [(&str, &str); 5] = [
        ("pod a's own token", &token_a),
        ("b's API-audience token", &b_api_token),
        ("an unsigned token claiming b", &forged),
        ("another namespace's pod", &token_c),
        ("garbage", "${POD_TOKEN}"),
    ];
    for round in 0..5 {
        for (what, pod_token) in attempts {
            let res = http
                .get(format!("{base}/auth/{}/vk", ns.name()))
                .bearer_auth(&token)
                .header(verifier::pod_identity::POD_TOKEN_HEADER, pod_token)
                // The old header, naming pod b: never read.
                .header("x-keyward-pod-uid", &pod_b)
                .send()
                .await
                .expect("GET /auth");
            assert_eq!(
                res.status(),
                200,
                "{what}, round {round}: the key token is valid"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Two report intervals after the last request, the report lists exactly pod a.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reports: Api<KeyUsageReport> = ns.api();
    let report = reports
        .get(&usage::report_name("vk", "ack-0"))
        .await
        .expect("the report");
    let listed: Vec<&str> = report.spec.keys[0]
        .pods
        .iter()
        .map(|p| p.uid.as_str())
        .collect();
    assert_eq!(
        listed,
        vec![pod_a.as_str()],
        "only pod a, never b ({pod_b}) or c ({pod_c})"
    );
    // Each distinct token reviewed once, whatever the number of requests.
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    let count = |result: &str| -> u64 {
        let prefix = format!("keyward_verifier_pod_token_reviews_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    eprintln!(
        "pod token reviews: pod {}, unauthenticated {}, other_namespace {}",
        count("pod"),
        count("unauthenticated"),
        count("other_namespace")
    );
    assert_eq!(
        count("pod"),
        2,
        "pod a and pod c (of another namespace), once each"
    );
    assert_eq!(
        count("unauthenticated"),
        3,
        "b's API token, the forgery, garbage: once each"
    );
    assert!(
        count("other_namespace") >= 4,
        "pod c refused for this key on every request after its review"
    );

    remove_admission_policy(&policy).await;
    ns.cleanup().await;
    other.cleanup().await;
}

/// A token signed with `pair` for key `name` in `ns` (the claims the operator signs with for a
/// key created without `token`): what a consumer holding the key's private key
/// (`includePrivateKey`) signs for itself.
fn self_signed(pair: &KeyPair, ns: &str, name: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = TokenClaims {
        iss: "keyward".into(),
        sub: format!("{ns}/{name}"),
        aud: format!("keyward:{ns}/{name}"),
        iat: now,
        nbf: now,
        exp: now + 300,
        jti: format!("consumer-{now}"),
    };
    pair.sign_token(&claims).expect("sign")
}

/// Revocation in two steps, against the real verifier (issue "The key's whole life", part 1).
///
/// A forgotten consumer copied the first key's private key (`includePrivateKey`) and signs its
/// own tokens. The rotation deactivates that key: every verifier refuses it, but its key
/// Secret keeps the private key. A tenant who edits the key Secret back to `retiring` does not
/// bring it back: the trust record holds the deactivation, the operator repairs the Secret and
/// the verifier never accepts the key meanwhile. A `keyward.dev/reactivate` request does bring
/// it back, with no new rotation: the consumer works again, an audit Event carries the reason,
/// and the key stays trusted `overlap` from its reactivation before it is deactivated again.
/// With `retainDeactivatedFor: 0s` it is destroyed (private key deleted), and a request to
/// reactivate it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivated_key_is_refused_comes_back_on_request_and_is_destroyed_after_retention() {
    use k8s_openapi::api::events::v1::Event;
    let ns = TestNamespace::new("kw-lifecycle").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let events: Api<Event> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(
        &pks,
        "life",
        json!({}),
        json!({
            "includePrivateKey": true,
            "rotation": { "publishDelay": "1s", "overlap": "3s", "minInterval": "0s",
                          "retainDeactivatedFor": "1h" }
        }),
    )
    .await;
    wait_pk(&pks, "life", "settled", is_settled).await;
    let agent = secrets.get("life").await.expect("the agent Secret");
    let kid1 = data(&agent, l::DATA_KEY_ID).expect("key id");
    let copied = KeyPair::from_pkcs8_pem(&data(&agent, l::DATA_PRIVATE_KEY).expect("private key"))
        .expect("the copied private key");
    let v = Running::start(ns.name()).await;
    let http = reqwest::Client::new();
    let base = v.base.clone();
    wait_ready(&http, &base).await;
    let consumer = || self_signed(&copied, ns.name(), "life");
    eventually("the consumer's own token accepted", || async {
        (auth(&http, &base, &consumer(), NO_POD).await.status() == 200).then_some(())
    })
    .await;

    // 1. A rotation: the old key is deactivated, not destroyed. The consumer breaks.
    merge(
        &pks,
        "life",
        json!({ "metadata": { "annotations": { l::ROTATE: "r1" } } }),
    )
    .await;
    let k1 = key_secret_name("life", 1);
    let old = wait_obj(&secrets, &k1, "k1 deactivated", TIMEOUT, |s| {
        state(s) == "deactivated"
    })
    .await;
    assert!(
        data(&old, l::DATA_PRIVATE_KEY).is_some(),
        "a deactivated key keeps its private key"
    );
    eventually("the consumer refused", || async {
        (auth(&http, &base, &consumer(), NO_POD).await.status() == 401).then_some(())
    })
    .await;
    let pk = wait_pk(&pks, "life", "status lists k1 deactivated", |pk| {
        pk.status.as_ref().is_some_and(|s| {
            s.revoked_keys.iter().any(|k| {
                k.kid == kid1 && k.state.as_deref() == Some("Deactivated") && k.destroy_at.is_some()
            })
        })
    })
    .await;
    let record = record_of(&pk);
    assert!(!record.kids.contains_key(&kid1) && record.deactivated.contains_key(&kid1));

    // 2. A tenant edits the key Secret back to retiring: repaired, never trusted meanwhile.
    merge(
        &secrets,
        &k1,
        json!({ "metadata": {
            "labels": { l::KEY_STATE: "retiring" },
            "annotations": { l::DEACTIVATED_AT: null }
        } }),
    )
    .await;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let r = auth(&http, &base, &consumer(), NO_POD).await;
        assert_eq!(r.status(), 401, "the edited key was trusted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_obj(&secrets, &k1, "k1 repaired", TIMEOUT, |s| {
        state(s) == "deactivated" && annotation(s, l::DEACTIVATED_AT).is_some()
    })
    .await;

    // 3. Reactivation on request: trusted again, no new key minted, an audited reason.
    merge(
        &pks,
        "life",
        json!({ "metadata": { "annotations": {
            l::REACTIVATE: format!("{kid1},t1"),
            l::REACTIVATE_REASON: "INC-7: billing still signs with the old key"
        } } }),
    )
    .await;
    eventually("the consumer accepted again", || async {
        (auth(&http, &base, &consumer(), NO_POD).await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        key_secrets(&secrets, "life").await.len(),
        2,
        "reactivation minted no key"
    );
    let reactivated = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("KeyReactivated"))
        .expect("a KeyReactivated Event");
    let note = reactivated.note.unwrap_or_default();
    assert!(note.contains(&kid1) && note.contains("INC-7"), "{note}");

    // 4. Another overlap from the reactivation, then deactivated again (the request, left in
    //    place as GitOps would, is not served twice).
    let again = wait_obj(&secrets, &k1, "k1 deactivated again", TIMEOUT, |s| {
        state(s) == "deactivated"
    })
    .await;
    let held = at(&again, l::DEACTIVATED_AT) - at(&again, l::REACTIVATED_AT);
    assert!(
        held >= chrono::Duration::seconds(3),
        "deactivated again {held} after its reactivation (overlap 3s)"
    );
    eventually("the consumer refused again", || async {
        (auth(&http, &base, &consumer(), NO_POD).await.status() == 401).then_some(())
    })
    .await;

    // 5. No retention: destroyed, and a new request changes nothing.
    merge(
        &pks,
        "life",
        json!({ "spec": { "rotation": { "retainDeactivatedFor": "0s" } } }),
    )
    .await;
    let gone = wait_obj(&secrets, &k1, "k1 destroyed", TIMEOUT, |s| {
        state(s) == "destroyed"
    })
    .await;
    assert!(data(&gone, l::DATA_PRIVATE_KEY).is_none());
    merge(
        &pks,
        "life",
        json!({ "metadata": { "annotations": { l::REACTIVATE: format!("{kid1},t2") } } }),
    )
    .await;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            auth(&http, &base, &consumer(), NO_POD).await.status(),
            401,
            "a destroyed key was trusted again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        state(&secrets.get(&k1).await.expect("k1")),
        "destroyed",
        "a destroyed key came back"
    );
    v.stop().await;
    drop(op);
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// A remote trust source: another cluster's verifier, fetched over TLS with a pinned CA.

/// Two verifier binaries standing for two clusters (issue 21, part 5): "west" watches the key's
/// namespace and serves its trust bundle over TLS; "east" watches nothing of it and trusts
/// west's bundle as `--remote-bundle west` (pinned CA, 1 s interval, 3 s max-staleness). West's
/// token passes on east's remote route only; after west rotates and revokes the old key, east
/// refuses the old token within a fetch; with west gone, east refuses everything on that route
/// once the bundle is stale (`RemoteBundleStale`), never sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_bundle_follows_the_other_clusters_revocations_and_fails_closed_when_stale() {
    let ns = TestNamespace::new("kw-remote-west").await;
    let elsewhere = ns.another("kw-remote-east").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    create_pk(
        &pks,
        "a",
        json!({}),
        json!({ "rotation": { "publishDelay": "1s", "overlap": "1s", "minInterval": "0s", "retainDeactivatedFor": "0s" } }),
    )
    .await;
    let pk = wait_pk(&pks, "a", "settled", is_settled).await;
    let kid1 = pk
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.kid.clone())
        .expect("kid");
    let token1 = data(
        &secrets.get("a").await.expect("agent Secret"),
        l::DATA_TOKEN,
    )
    .expect("token");

    let dir = tempfile::tempdir().expect("dir");
    let (ca, crt, key) = keyward_testbed::tls::ca_and_server(dir.path()).expect("certificates");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port()
    };
    let (west_port, east_port) = (free(), free());
    let west_addr = format!("127.0.0.1:{west_port}");
    let mut west = spawn_keyward(
        &[
            "verifier",
            "--namespaces",
            ns.name(),
            "--report=false",
            "--address",
            &west_addr,
            "--tls-cert-file",
            crt.to_str().expect("path"),
            "--tls-key-file",
            key.to_str().expect("path"),
        ],
        &[],
        &dir.path().join("west.log"),
    );
    let spec = format!(
        "name=west,url=https://{west_addr}/keys/{}/a/jwks.json,ca={},sub={}/a,interval=1s,max-staleness=3s",
        ns.name(),
        ca.display(),
        ns.name()
    );
    let east_addr = format!("127.0.0.1:{east_port}");
    let _east = spawn_keyward(
        &[
            "verifier",
            "--plain-http",
            "--namespaces",
            elsewhere.name(),
            "--report=false",
            "--address",
            &east_addr,
            "--remote-bundle",
            &spec,
        ],
        &[],
        &dir.path().join("east.log"),
    );
    let east = format!("http://{east_addr}");
    let http = reqwest::Client::new();
    wait_ready(&http, &east).await;
    let at = |path: String, token: String| {
        let http = http.clone();
        async move {
            let r = http.get(path).bearer_auth(token).send().await.expect("GET");
            let reason = r
                .headers()
                .get("x-keyward-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (r.status().as_u16(), reason)
        }
    };
    let remote_route = format!("{east}/auth-remote/west");
    eventually("east accepts west's token on the remote route", || async {
        (at(remote_route.clone(), token1.clone()).await.0 == 200).then_some(())
    })
    .await;
    // East never trusts it on a local route (it does not watch west's namespace).
    assert_ne!(
        at(format!("{east}/auth/{}/a", ns.name()), token1.clone())
            .await
            .0,
        200
    );

    // West rotates; the old key is revoked there; east follows within a fetch.
    merge(
        &pks,
        "a",
        json!({ "metadata": { "annotations": { l::ROTATE: "remote-1" } } }),
    )
    .await;
    let rotated = wait_pk(&pks, "a", "old key revoked", |pk| {
        is_settled(pk)
            && keyward::trust_record::TrustRecord::of(pk)
                .and_then(Result::ok)
                .is_some_and(|r| !r.has(&kid1))
    })
    .await;
    let kid2 = rotated
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.kid.clone())
        .expect("kid2");
    assert_ne!(kid1, kid2);
    let token2 = data(
        &secrets.get("a").await.expect("agent Secret"),
        l::DATA_TOKEN,
    )
    .expect("token");
    eventually("east refuses the revoked key", || async {
        (at(remote_route.clone(), token1.clone()).await.0 == 401).then_some(())
    })
    .await;
    eventually("east accepts the new key", || async {
        (at(remote_route.clone(), token2.clone()).await.0 == 200).then_some(())
    })
    .await;

    // West goes away: east keeps its last good bundle up to max-staleness, then fails closed.
    let _ = west.0.kill();
    let _ = west.0.wait();
    let gone = Instant::now();
    let (status, reason) = loop {
        let got = at(remote_route.clone(), token2.clone()).await;
        if got.0 != 200 || gone.elapsed() > Duration::from_secs(20) {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((status, reason.as_str()), (401, "RemoteBundleStale"));
    assert!(
        gone.elapsed() >= Duration::from_secs(2),
        "refused {:?} after west stopped: sooner than the 3 s max-staleness allows",
        gone.elapsed()
    );
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Bundle copies in other namespaces (spec.trustBundle.namespaceSelector).

/// `spec.trustBundle.namespaceSelector` (issue 21, part 5), on the real plane. Namespaces a and c
/// match and accept copies from the key's namespace; b matches but does not accept (a tenant's
/// selector alone never places a ConfigMap in another namespace); c already holds a ConfigMap
/// of that name (never overwritten). The copy in a lists only recorded key ids (a JWK injected
/// into the source is not copied), follows a rotation, is repaired after an edit, leaves a when
/// a's labels stop matching, and the last copy goes with the key (its finalizer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_copies_follow_the_selector_and_the_trust_record_and_go_with_the_key() {
    use k8s_openapi::api::core::v1::Namespace;
    use keyward::controller::WriteCounter;
    use kube::ResourceExt as _;
    let src = TestNamespace::new("kw-copy-src").await;
    let (a, b, c) = (
        src.another("kw-copy-a").await,
        src.another("kw-copy-b").await,
        src.another("kw-copy-c").await,
    );
    let namespaces: Api<Namespace> = Api::all(src.client());
    let accept = keyward::bundle_copy::accept_label(src.name());
    for (ns, accepts) in [(&a, true), (&b, false), (&c, true)] {
        let mut labels = json!({ "team": "x" });
        if accepts {
            labels[&accept] = json!("true");
        }
        namespaces
            .patch(
                ns.name(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": labels } })),
            )
            .await
            .expect("label the namespace");
    }
    let foreign = json!({ "metadata": { "name": "pk-trust" }, "data": { "jwks.json": "{\"keys\":[]}", "owner": "team-c" } });
    c.api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(foreign).expect("cm"),
        )
        .await
        .expect("c's own ConfigMap");
    let watched = vec![
        src.name().to_string(),
        a.name().to_string(),
        b.name().to_string(),
        c.name().to_string(),
    ];
    let writes = WriteCounter::default();
    let obs = keyward::controller::Observability::new(&writes);
    let op = Operator::start_configured(src.name(), Floors::none(), writes, obs, |cfg| {
        cfg.namespaces = watched;
        cfg.copy_resync = Duration::from_secs(2);
    })
    .await;
    let pks: Api<ProvisioningKey> = src.api();
    create_pk(
        &pks,
        "pk",
        json!({}),
        json!({
            "trustBundle": { "namespaceSelector": { "matchLabels": { "team": "x" } } },
            "rotation": { "publishDelay": "1s", "overlap": "1s", "minInterval": "0s", "retainDeactivatedFor": "0s" },
        }),
    )
    .await;
    let pk = wait_pk(&pks, "pk", "settled", is_settled).await;
    let copy_kids = |ns: &TestNamespace| {
        let api: Api<ConfigMap> = ns.api();
        async move {
            let cm = api.get_opt("pk-trust").await.expect("get")?;
            let jwks: Jwks = serde_json::from_str(cm.data.as_ref()?.get("jwks.json")?).ok()?;
            let ours = cm.labels().get(keyward::bundle_copy::COPY_OF_UID).is_some();
            Some((ours, jwks.key_ids()))
        }
    };
    let recorded = |pk: &ProvisioningKey| {
        let mut k: Vec<String> = TrustRecord::of(pk)
            .and_then(Result::ok)
            .map(|r| r.kids.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    let kids1 = recorded(&pk);
    eventually("a gets the copy", || async {
        let (ours, mut kids) = copy_kids(&a).await?;
        kids.sort();
        (ours && kids == kids1).then_some(())
    })
    .await;
    let pk = pks.get("pk").await.expect("get");
    assert!(
        pk.finalizers()
            .iter()
            .any(|f| f == keyward::bundle_copy::FINALIZER),
        "the finalizer"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        copy_kids(&b).await,
        None,
        "b matches but does not accept: no copy"
    );
    let c_cm = c
        .api::<ConfigMap>()
        .get("pk-trust")
        .await
        .expect("c's ConfigMap");
    assert_eq!(
        c_cm.data
            .as_ref()
            .and_then(|d| d.get("owner"))
            .map(String::as_str),
        Some("team-c"),
        "never overwritten"
    );

    // A JWK injected into the source is never copied; an edited copy is repaired.
    let injected = KeyPair::generate();
    let source: Api<ConfigMap> = src.api();
    let cm = source.get("pk-trust").await.expect("source");
    let mut jwks: Jwks =
        serde_json::from_str(&cm.data.as_ref().expect("data")["jwks.json"]).expect("jwks");
    jwks.keys.push(injected.public_key().to_jwk());
    let a_jwks = jwks.clone();
    source
        .patch(
            "pk-trust",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "data": { "jwks.json": serde_json::to_string(&jwks).expect("json") } }),
            ),
        )
        .await
        .expect("inject into the source");
    a.api::<ConfigMap>()
        .patch(
            "pk-trust",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "data": { "jwks.json": serde_json::to_string(&a_jwks).expect("json") } }),
            ),
        )
        .await
        .expect("edit the copy");
    eventually(
        "the edited copy repaired, without the injected key",
        || async {
            let (_, mut kids) = copy_kids(&a).await?;
            kids.sort();
            (kids == kids1).then_some(())
        },
    )
    .await;

    // A rotation reaches the copy: the new key id appears, the revoked one leaves.
    merge(
        &pks,
        "pk",
        json!({ "metadata": { "annotations": { l::ROTATE: "copies-1" } } }),
    )
    .await;
    let rotated = wait_pk(&pks, "pk", "rotated and the old key revoked", |pk| {
        is_settled(pk) && recorded(pk).len() == 1 && recorded(pk) != kids1
    })
    .await;
    let kids2 = recorded(&rotated);
    eventually("the copy follows the rotation", || async {
        let (_, mut kids) = copy_kids(&a).await?;
        kids.sort();
        (kids == kids2).then_some(())
    })
    .await;

    // a stops matching: its copy goes. Then the key goes, and with it every copy.
    namespaces
        .patch(
            a.name(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "y" } } })),
        )
        .await
        .expect("relabel a");
    eventually("a's copy removed", || async {
        copy_kids(&a).await.is_none().then_some(())
    })
    .await;
    namespaces
        .patch(
            a.name(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { "team": "x" } } })),
        )
        .await
        .expect("relabel a back");
    eventually("a's copy back", || async {
        copy_kids(&a).await.map(|_| ())
    })
    .await;
    pks.delete("pk", &DeleteParams::default())
        .await
        .expect("delete the key");
    eventually("the key and its copies gone", || async {
        (pks.get_opt("pk").await.expect("get").is_none() && copy_kids(&a).await.is_none())
            .then_some(())
    })
    .await;
    let c_cm = c
        .api::<ConfigMap>()
        .get("pk-trust")
        .await
        .expect("c's ConfigMap stays");
    assert_eq!(
        c_cm.data
            .as_ref()
            .and_then(|d| d.get("owner"))
            .map(String::as_str),
        Some("team-c")
    );
    op.stop().await;
    src.cleanup().await;
}
