//! (j) Proof of possession with the real OPA (issue "The key's whole life", part 2).
//!
//! An OPA outside any PolicyAgent holds the agent key's private key (a P-256 key: OPA 1.4 signs
//! client assertions with RSA, ECDSA or HMAC keys only, never EdDSA) and fetches its bundle
//! through the real `keyward verifier` over TLS, in reverse-proxy mode, with OPA's own OAuth2
//! client-credentials plugin: it signs an RFC 7523 assertion (`signing_key`,
//! `include_jti_claim: true`, `additional_claims` for `iss`, `sub` and `aud`), trades it at the
//! verifier's token endpoint for an access token, and sends only that. The access tokens are
//! signed by a second ProvisioningKey the operator mints, whose private key the verifier reads
//! from a file kept current the way a Secret volume is.
//!
//! Checked: OPA downloads; the agent Secret holds the key and no token, and a bearer token
//! signed with the very key is refused (`ProofOfPossessionRequired`); an assertion signed by an independent JWT library
//! (jsonwebtoken) is accepted once and refused when replayed; and the access-token signer
//! rotates (its overlap longer than the access tokens live) while OPA keeps downloading with no
//! gap.
//!
//! How to see it fail: let `/auth` accept the key's own tokens (in `src/verifier/verify.rs`,
//! drop the `params.pop` refusal): step 2 fails with "a bearer token signed with the
//! proof-of-possession key passed".

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward_testbed::{TestNamespace, eventually};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::scenarios::control_plane::free_port;
use crate::scenarios::support::{InProcessOperator, POLL, TIMEOUT};

const BUNDLE: &[u8] = include_bytes!("scenarios/authz.tar.gz");
/// Access tokens live 20 s (OPA asks for a new one when less than 10 s are left); the signer's
/// overlap is longer, so no access token outlives its signing key's trust.
const ACCESS_TTL: &str = "20s";

fn say(msg: impl AsRef<str>) {
    eprintln!("[e2e pop] {}", msg.as_ref());
}

/// A data item of a Secret, as text.
fn item(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

async fn agent_secret(api: &kube::Api<Secret>, name: &str) -> anyhow::Result<Secret> {
    eventually(
        &format!("agent Secret {name} with its private key"),
        TIMEOUT,
        POLL,
        || async {
            let s = api.get_opt(name).await.ok()??;
            item(&s, "private-key.pem").map(|_| s)
        },
    )
    .await
}

/// The upstream bundle server: serves the bundle, and notes when.
async fn upstream() -> anyhow::Result<(u16, Arc<Mutex<Vec<Instant>>>)> {
    let served = Arc::new(Mutex::new(Vec::new()));
    let log = served.clone();
    let app = axum::Router::new().route(
        "/bundles/authz.tar.gz",
        axum::routing::get(move || {
            let log = log.clone();
            async move {
                log.lock().expect("log").push(Instant::now());
                BUNDLE
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((port, served))
}

struct Child(tokio::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// An ES256 client assertion for `key_ref`, signed by jsonwebtoken from the agent's PKCS#8 PEM.
fn assertion(pem: &str, key_ref: &str, aud: &str, jti: &str) -> anyhow::Result<String> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": key_ref, "sub": key_ref, "aud": aud, "iat": now, "exp": now + 60, "jti": jti});
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &key,
    )?)
}

/// A bearer token (`iss` and `aud` the key's, as its trust record says; `sub` the key) signed with the agent's private key, as
/// anyone holding the key could make one.
fn self_signed_bearer(
    pem: &str,
    kid: &str,
    key_ref: &str,
    record: &keyward::trust_record::TrustRecord,
) -> anyhow::Result<String> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": record.iss, "sub": key_ref, "aud": record.aud, "iat": now, "nbf": now, "exp": now + 600, "jti": "self-made"});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_string());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opa_holding_the_key_proves_possession_and_its_bearer_token_is_refused()
-> anyhow::Result<()> {
    let ns = TestNamespace::new("kw-pop").await;
    let op = InProcessOperator::start(ns.name()).await;
    let pks: kube::Api<ProvisioningKey> = ns.api();
    let secrets: kube::Api<Secret> = ns.api();
    let dir = tempfile::Builder::new()
        .prefix("keyward-e2e-pop-")
        .tempdir()?;
    let create = |name: &str, spec: serde_json::Value| {
        serde_json::from_value::<ProvisioningKey>(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
            "metadata": {"name": name}, "spec": spec,
        }))
    };
    let rotation = json!({"minInterval": "1s", "publishDelay": "1s", "overlap": "25s", "retainDeactivatedFor": "0s"});
    pks.create(
        &PostParams::default(),
        &create(
            "signer",
            json!({"includePrivateKey": true, "rotation": rotation}),
        )?,
    )
    .await?;
    pks.create(
        &PostParams::default(),
        &create(
            "agent",
            json!({
                "algorithm": "ECDSAP256", "includePrivateKey": true,
                "token": {"mode": "ProofOfPossession"}, "rotation": rotation,
            }),
        )?,
    )
    .await?;
    let agent = agent_secret(&secrets, "agent").await?;
    let agent_pem = item(&agent, "private-key.pem").context("agent key")?;
    ensure!(
        agent_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8"
    );
    let signer = agent_secret(&secrets, "signer").await?;
    let signer_file = dir.path().join("signer-key.pem");
    std::fs::write(
        &signer_file,
        item(&signer, "private-key.pem").context("signer key")?,
    )?;
    // The Secret volume, as the kubelet keeps it: the file follows the signer's agent Secret.
    let follow = {
        let (secrets, file, tmp) = (
            secrets.clone(),
            signer_file.clone(),
            dir.path().join(".signer.tmp"),
        );
        tokio::spawn(async move {
            loop {
                if let Ok(s) = secrets.get("signer").await
                    && let Some(pem) = item(&s, "private-key.pem")
                    && std::fs::write(&tmp, pem).is_ok()
                {
                    let _ = std::fs::rename(&tmp, &file);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    say("ProvisioningKeys agent (ECDSAP256, ProofOfPossession) and signer minted");

    let (ca_file, crt, key) = keyward_testbed::tls::ca_and_server(dir.path())?;
    let (up, served) = upstream().await?;
    let vport = free_port()?;
    let token_url = format!("https://127.0.0.1:{vport}/oauth2/token");
    let key_ref = format!("{}/agent", ns.name());
    let vlog = std::fs::File::create(dir.path().join("verifier.log"))?;
    let _verifier = Child(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["verifier", "--namespaces", ns.name(), "--report=false"])
            .args(["--address", &format!("127.0.0.1:{vport}")])
            .arg("--tls-cert-file")
            .arg(&crt)
            .arg("--tls-key-file")
            .arg(&key)
            .args([
                "--upstream",
                &format!("http://127.0.0.1:{up}"),
                "--bind-key",
                &key_ref,
            ])
            .args(["--token-endpoint-url", &token_url])
            .args(["--access-token-signer", &format!("{}/signer", ns.name())])
            .arg("--access-token-key-file")
            .arg(&signer_file)
            .args(["--access-token-ttl", ACCESS_TTL])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(vlog.try_clone()?)
            .stderr(vlog)
            .kill_on_drop(true)
            .spawn()
            .context("start keyward verifier")?,
    );
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_file)?)?;
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()?;
    let base = format!("https://127.0.0.1:{vport}");
    eventually("the verifier ready over TLS", TIMEOUT, POLL, || async {
        let r = https.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .with_context(|| {
        std::fs::read_to_string(dir.path().join("verifier.log")).unwrap_or_default()
    })?;

    // 1. The real OPA, with its OAuth2 client-credentials plugin and the agent's private key.
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("        {l}\n"))
            .collect::<String>()
    };
    let config = format!(
        "services:\n  cp:\n    url: {base}\n    credentials:\n      oauth2:\n        grant_type: client_credentials\n        token_url: {tu}\n        client_id: {id}\n        signing_key: agent\n        include_jti_claim: true\n        additional_claims:\n          iss: {id}\n          sub: {id}\n          aud: {tu}\n\
         keys:\n  agent:\n    algorithm: ES256\n    private_key: |\n{pem}\
         bundles:\n  authz:\n    service: cp\n    resource: bundles/authz.tar.gz\n    polling:\n      min_delay_seconds: 1\n      max_delay_seconds: 1\n",
        base = q(&base),
        tu = q(&token_url),
        id = q(&key_ref),
        pem = indent(&agent_pem),
    );
    std::fs::write(dir.path().join("opa.yaml"), config)?;
    let opa_bin = tokio::task::spawn_blocking(keyward_testbed::opa_binary).await??;
    let olog = std::fs::File::create(dir.path().join("opa.log"))?;
    let _opa = Child(
        tokio::process::Command::new(opa_bin)
            .args(["run", "--server", "--disable-telemetry"])
            .args(["--addr", &format!("127.0.0.1:{}", free_port()?)])
            .arg("--config-file")
            .arg(dir.path().join("opa.yaml"))
            // OPA's token request trusts the system roots only: point them at our CA.
            .env("SSL_CERT_FILE", &ca_file)
            .stdin(Stdio::null())
            .stdout(olog.try_clone()?)
            .stderr(olog)
            .kill_on_drop(true)
            .spawn()
            .context("start opa")?,
    );
    let downloads = || served.lock().expect("log").clone();
    eventually(
        "OPA downloads through the token endpoint",
        TIMEOUT,
        POLL,
        || async { (downloads().len() >= 3).then_some(()) },
    )
    .await
    .with_context(|| std::fs::read_to_string(dir.path().join("opa.log")).unwrap_or_default())?;
    say(format!(
        "OPA downloads with access tokens ({} so far)",
        downloads().len()
    ));

    // 2. The agent Secret holds the key and no token; a bearer token signed with the very key,
    // as its holder would make one: refused.
    ensure!(
        item(&agent, "token").is_none(),
        "the agent Secret of a proof-of-possession key holds a token"
    );
    let kid = item(&agent, "key-id").context("the agent key id")?;
    let record = keyward::trust_record::TrustRecord::of(&pks.get("agent").await?)
        .context("a trust record")??;
    ensure!(
        record.pop,
        "the trust record holds the key in proof-of-possession mode"
    );
    let bearer = self_signed_bearer(&agent_pem, &kid, &key_ref, &record)?;
    let r = https
        .get(format!("{base}/bundles/authz.tar.gz"))
        .bearer_auth(&bearer)
        .send()
        .await?;
    let reason = r
        .headers()
        .get("x-keyward-reason")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if r.status().is_success() {
        bail!("a bearer token signed with the proof-of-possession key passed");
    }
    ensure!(
        r.status() == 401 && reason.as_deref() == Some("ProofOfPossessionRequired"),
        "bearer token: {} {reason:?}",
        r.status()
    );
    say(
        "the agent Secret holds no token; a bearer token signed with the key: 401 ProofOfPossessionRequired",
    );

    // 3. An assertion signed by an independent library: accepted once, refused replayed.
    let a = assertion(&agent_pem, &key_ref, &token_url, "jwt-lib-1")?;
    let form = [
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", a.as_str()),
    ];
    let first = https.post(&token_url).form(&form).send().await?;
    ensure!(first.status() == 200, "token request: {}", first.status());
    let body: serde_json::Value = serde_json::from_str(&first.text().await?)?;
    let access = body["access_token"]
        .as_str()
        .context("access_token")?
        .to_string();
    let again = https.post(&token_url).form(&form).send().await?;
    ensure!(
        again.status() == 401,
        "replayed assertion: {}",
        again.status()
    );
    let err: serde_json::Value = serde_json::from_str(&again.text().await?)?;
    ensure!(err["error"] == "invalid_client", "{err}");
    let r = https
        .get(format!("{base}/bundles/authz.tar.gz"))
        .bearer_auth(&access)
        .send()
        .await?;
    ensure!(r.status() == 200, "the access token: {}", r.status());
    say("jsonwebtoken's assertion: one access token, the replay refused (invalid_client)");

    // 4. The signer rotates; OPA keeps downloading, with no gap.
    let old_signer = item(&signer, "key-id").context("signer kid")?;
    let body = json!({"metadata": {"annotations": {keyward::labels::ROTATE: "1"}}});
    pks.patch("signer", &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    let rotated = Instant::now();
    eventually(
        "the signer's old key deactivated",
        Duration::from_secs(120),
        POLL,
        || async {
            let pk = pks.get("signer").await.ok()?;
            let record = keyward::trust_record::TrustRecord::of(&pk)?.ok()?;
            (!record.has(&old_signer)).then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after: Vec<Instant> = downloads().into_iter().filter(|t| *t >= rotated).collect();
    ensure!(
        after.len() >= 10,
        "OPA downloads after the signer's rotation: {}",
        after.len()
    );
    let gap = after
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    ensure!(
        gap < Duration::from_secs(5),
        "OPA's longest gap between downloads across the signer's rotation: {gap:?}\n{}",
        std::fs::read_to_string(dir.path().join("opa.log")).unwrap_or_default()
    );
    say(format!(
        "the signer rotated and its old key left the record; OPA downloaded {} times since, longest gap {:.1}s",
        after.len(),
        gap.as_secs_f64()
    ));
    follow.abort();
    op.stop().await;
    ns.cleanup().await;
    Ok(())
}
