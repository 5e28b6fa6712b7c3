//! `keyward verifier` on the real local control plane (`e2e/cluster.sh up`), and interop of
//! Keyward's tokens with an independent JWT library (`jsonwebtoken`, ring's EdDSA), not
//! Keyward's own verification code.
//!
//! The plane test: the in-process operator mints a key; the in-process verifier (the same
//! `verifier::run` the binary calls, on a real socket, watching the namespace) accepts the
//! agent Secret's token, serves jwks.json with an ETag (304 on `If-None-Match`) and
//! `max-age` from publishDelay; after a break-glass rotation revokes the old key, it refuses
//! the old token and accepts the new one.

#[allow(dead_code)]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward::controller::provisioning_key::key_secret_name;
use keyward::keys::{Jwks, KeyPair, TokenClaims};
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward::verifier::{self, KeyRef, MemoryUseLog, Policy, Shared};
use keyward_testbed::TestNamespace;
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
        let client = kube::Client::try_from(kube_config().await).expect("client");
        let log = Arc::new(MemoryUseLog::new(1000));
        let shared = Arc::new(Shared::new(Policy::default(), log.clone(), None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(verifier::run(
            client,
            vec![namespace.to_string()],
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

async fn auth(http: &reqwest::Client, base: &str, token: &str, pod: &str) -> reqwest::Response {
    http.get(format!("{base}/auth"))
        .bearer_auth(token)
        .header("x-keyward-pod-uid", pod)
        .send()
        .await
        .expect("GET /auth")
}

fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

const POD: &str = "3f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81";

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

    // Ready once listed; the agent's token accepted, with the key headers.
    eventually("readyz", || async {
        let r = http.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let res = eventually("the agent token accepted", || async {
        let r = auth(&http, &base, &token1, POD).await;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(header(&res, "x-keyward-key"), format!("{}/vk", ns.name()));
    assert_eq!(header(&res, "x-keyward-kid"), kid1);
    let key = KeyRef::new(ns.name(), "vk");
    assert!(
        v.log.pods_seen(&key, &kid1).contains_key(POD),
        "use recorded for the pod"
    );

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
    let claims = jsonwebtoken_verify(&token1, &jwks1, "keyward", "keyward")
        .expect("jsonwebtoken accepts the agent Secret's token");
    assert_eq!(claims["sub"], format!("{}/vk", ns.name()));

    // Break-glass rotation: the successor handed out, the old key revoked.
    merge(
        &pks,
        "vk",
        json!({ "spec": { "compromisedKeys": [kid1.clone()] } }),
    )
    .await;
    wait_obj(
        &secrets,
        &key_secret_name("vk", 1),
        "k1 revoked",
        TIMEOUT,
        |s| state(s) == "revoked",
    )
    .await;
    let agent = wait_obj(&secrets, "vk", "the successor handed out", TIMEOUT, |s| {
        data(s, l::DATA_KEY_ID).is_some_and(|k| k != kid1)
    })
    .await;
    let kid2 = data(&agent, l::DATA_KEY_ID).expect("key id");
    let token2 = data(&agent, l::DATA_TOKEN).expect("token");

    // The old token refused as revoked (still unexpired), the new one accepted.
    let res = eventually("the old token refused", || async {
        let r = auth(&http, &base, &token1, POD).await;
        (r.status() == 401).then_some(r)
    })
    .await;
    assert_eq!(header(&res, "x-keyward-reason"), "TokenRevoked");
    assert!(res.text().await.expect("body").is_empty());
    let res = auth(&http, &base, &token2, POD).await;
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
