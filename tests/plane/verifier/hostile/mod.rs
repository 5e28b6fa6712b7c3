//! The hostile corpus (`tests/plane/verifier/hostile/cases.jsonl`, written by `tests/plane/verifier/hostile/gen.py`): forged,
//! malformed, cross-key and cross-route tokens, time tricks, revoked and injected keys and
//! header tricks, each with its expected verdict, run against a real `keyward verifier`
//! process on the local plane in three shapes:
//!
//! * `nginx`: through Debian's nginx `auth_request` (docs/verifier.md's config), one location
//!   per binding;
//! * `authz`: direct requests in Envoy's HTTP `ext_authz` shape (`/authz/<ns>/<name>/<path>`);
//! * `proxy`: through the verifier's reverse proxy (`--upstream`, `--bind-key`) to an echo
//!   upstream.
//!
//! The keys are minted by the operator; the test reads their private keys (as the admin) to
//! forge what a key holder could. It prints counts per tag and fails on any case that does not
//! get its verdict, except cases marked `open` (findings not fixed yet), which are counted.
//!
//! Any binary: `KEYWARD_HOSTILE_BIN=/path/to/keyward cargo test --test plane verifier::hostile -- --nocapture`
//! runs the corpus against another build (an older one shows the verdicts before a fix).
//! Needs the local plane (`bash e2e/cluster.sh up`) and nginx (`/usr/sbin/nginx`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use keyward::api::ProvisioningKey;
use keyward::controller::provisioning_key::key_secret_name;
use keyward::keys::{Jwks, KeyPair};
use keyward::labels as l;
use keyward::rotation::Floors;
use kube::Api;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

#[derive(Debug, Deserialize)]
struct Case {
    id: String,
    tag: String,
    finding: u32,
    mode: String,
    want: u16,
    #[serde(default)]
    want_nginx: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    signer: Option<String>,
    #[serde(default)]
    header: Option<Value>,
    #[serde(default)]
    header_raw: Option<String>,
    #[serde(default)]
    claims: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    claims_raw: Option<String>,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    quote_exp: bool,
    #[serde(default)]
    token_raw: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    check_echo: bool,
    #[serde(default)]
    open: bool,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/plane/verifier/hostile/cases.jsonl"
    );
    std::fs::read_to_string(path)
        .expect("tests/plane/verifier/hostile/cases.jsonl")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad case {l}: {e}")))
        .collect()
}

/// The corpus is well-formed and as large as the issue asks, without a plane.
#[test]
fn the_corpus_has_at_least_150_tagged_cases_with_unique_ids() {
    let cases = cases();
    assert!(cases.len() >= 150, "{} cases", cases.len());
    let mut ids = std::collections::BTreeSet::new();
    for c in &cases {
        assert!(ids.insert(c.id.clone()), "duplicate id {}", c.id);
        assert!(
            ["nginx", "authz", "proxy"].contains(&c.mode.as_str()),
            "{}",
            c.id
        );
        assert!([200, 401, 403].contains(&c.want), "{}", c.id);
        assert!(
            c.want == 200 || c.reason.is_some(),
            "{}: a refusal names its reason",
            c.id
        );
        assert!(!c.tag.is_empty() && c.finding <= 10, "{}", c.id);
    }
}

/// Signing keys by role, with their key ids.
struct Signers {
    a: SigningKey,
    a_old: SigningKey,
    b: SigningKey,
    attacker: SigningKey,
    injected: SigningKey,
    kid: BTreeMap<&'static str, String>,
}

fn signing_key(pem: &str) -> SigningKey {
    SigningKey::from_pkcs8_pem(pem).expect("PKCS#8")
}

fn kid_of(key: &SigningKey) -> String {
    let pem = KeyPair::from_pkcs8_pem(&pkcs8_pem(key)).expect("pair");
    pem.key_id()
}

fn pkcs8_pem(key: &SigningKey) -> String {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    key.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .expect("pem")
        .to_string()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `$ns`, `$kid*`, `$now[+-]N` in `text`.
fn subst(text: &str, ns: &str, kid: &str, s: &Signers, now: i64) -> String {
    let mut out = text
        .replace("$ns", ns)
        .replace("$kid_att", &s.kid["attacker"])
        .replace("$kid_a", &s.kid["a"])
        .replace("$kid_b", &s.kid["b"])
        .replace("$kid", kid);
    // $now+N / $now-N / $now, longest first.
    while let Some(i) = out.find("$now") {
        let rest = &out[i + 4..];
        let (delta, len) = match rest.chars().next() {
            Some(sign @ ('+' | '-')) => {
                let digits: String = rest[1..].chars().take_while(char::is_ascii_digit).collect();
                let n: i64 = digits.parse().unwrap_or(0);
                (if sign == '+' { n } else { -n }, 1 + digits.len())
            }
            _ => (0, 0),
        };
        out = format!("{}{}{}", &out[..i], now + delta, &out[i + 4 + len..]);
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// The token of `c`, and the good token of key a (for `$token`).
fn token(c: &Case, ns: &str, s: &Signers, now: i64) -> (String, String) {
    let good_claims = json!({
        "iss": "keyward", "sub": format!("{ns}/a"), "aud": "keyward",
        "iat": now, "nbf": now, "exp": now + 600, "jti": "hostile",
    });
    let sign = |key: &SigningKey, kid: &str, header: &str, claims: &str| {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let _ = kid;
        format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_bytes()))
    };
    let good_header = json!({"alg": "EdDSA", "typ": "JWT", "kid": s.kid["a"]}).to_string();
    let good = sign(&s.a, &s.kid["a"], &good_header, &good_claims.to_string());
    if let Some(raw) = &c.token_raw {
        let padded = format!("{good}==");
        let std = {
            let t = good.replace('-', "+").replace('_', "/");
            if t == good { format!("{good}+") } else { t }
        };
        let t = raw
            .replace("$token_padded", &padded)
            .replace("$token_std", &std)
            .replace("$token", &good);
        return (t, good);
    }
    let signer = c.signer.as_deref().unwrap_or("a");
    let (key, kid) = match signer {
        "b" => (&s.b, s.kid["b"].clone()),
        "a_old" => (&s.a_old, s.kid["a_old"].clone()),
        "attacker" => (&s.attacker, s.kid["attacker"].clone()),
        "injected" => (&s.injected, s.kid["injected"].clone()),
        _ => (&s.a, s.kid["a"].clone()),
    };
    let header = match (&c.header_raw, &c.header) {
        (Some(raw), _) => subst(raw, ns, &kid, s, now),
        (None, Some(h)) => subst(&h.to_string(), ns, &kid, s, now),
        (None, None) => json!({"alg": "EdDSA", "typ": "JWT", "kid": kid}).to_string(),
    };
    let claims = match &c.claims_raw {
        Some(raw) => subst(raw, ns, &kid, s, now),
        None => {
            let mut claims = good_claims.as_object().cloned().unwrap_or_default();
            for d in &c.drop {
                claims.remove(d);
            }
            for (k, v) in c.claims.clone().unwrap_or_default() {
                let v = match v {
                    Value::String(t) if t.contains("$now") && !c.quote_exp => {
                        let n: i64 = subst(&t, ns, &kid, s, now).parse().expect("a time");
                        json!(n)
                    }
                    Value::String(t) => Value::String(subst(&t, ns, &kid, s, now)),
                    other => other,
                };
                claims.insert(k, v);
            }
            Value::Object(claims).to_string()
        }
    };
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let t = match signer {
        "none" => format!("{input}."),
        "tamper" => {
            let mut sig = s.a.sign(input.as_bytes()).to_bytes();
            sig[10] ^= 1;
            format!("{input}.{}", b64(&sig))
        }
        "hs256_pub" => {
            let public = s.a.verifying_key().to_bytes();
            format!("{input}.{}", b64(&hmac_sha256(&public, input.as_bytes())))
        }
        "resign_claims" => {
            let sig = s.a.sign(input.as_bytes()).to_bytes();
            let other = good_claims.to_string().replace("\"exp\":", "\"exp\":1");
            format!(
                "{}.{}.{}",
                b64(header.as_bytes()),
                b64(other.as_bytes()),
                b64(&sig)
            )
        }
        _ => format!("{input}.{}", b64(&key.sign(input.as_bytes()).to_bytes())),
    };
    (t, good)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn keyward_bin() -> String {
    std::env::var("KEYWARD_HOSTILE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_keyward").into())
}

/// A `keyward verifier` process (the binary under test) on `port`.
fn spawn_verifier(ns: &str, port: u16, extra: &[String], log: &std::path::Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log");
    // Plain HTTP: a binary from before TLS has no --plain-http (and serves plain HTTP anyway).
    let help = Command::new(keyward_bin())
        .args(["verifier", "--help"])
        .output()
        .expect("keyward verifier --help");
    let plain = String::from_utf8_lossy(&help.stdout).contains("--plain-http");
    Command::new(keyward_bin())
        .args([
            "verifier",
            "--namespaces",
            ns,
            "--report=false",
            "--address",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .args(plain.then_some("--plain-http"))
        .args(extra)
        .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
        .env("RUST_LOG", "info")
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .spawn()
        .map(KillOnDrop)
        .expect("start keyward verifier")
}

struct Nginx {
    dir: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("nginx.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn nginx_binary() -> String {
    std::env::var("KEYWARD_NGINX").unwrap_or_else(|_| {
        if Command::new("nginx").arg("-v").output().is_ok() {
            "nginx".into()
        } else {
            "/usr/sbin/nginx".into()
        }
    })
}

/// nginx with one location per binding: `/a/` (key a), `/b/` (key b), `/u/` (unbound `/auth`).
fn start_nginx(dir: &std::path::Path, port: u16, vport: u16, ns: &str, legacy: bool) -> Nginx {
    let d = dir.join("nginx");
    for sub in ["srv/a", "srv/b", "srv/u", "logs", "tmp"] {
        std::fs::create_dir_all(d.join(sub)).expect("dirs");
    }
    for sub in ["a", "b", "u"] {
        std::fs::write(d.join(format!("srv/{sub}/bundle")), "bundle").expect("file");
    }
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&d).status();
    let dd = d.display();
    let mut locations = String::new();
    for (loc, route) in [
        ("a", format!("/auth/{ns}/a")),
        ("b", format!("/auth/{ns}/b")),
        ("u", "/auth".to_string()),
    ] {
        let route = if legacy { "/auth".to_string() } else { route };
        locations.push_str(&format!(
            r#"
    location /{loc}/ {{
      auth_request /_kw_{loc};
      auth_request_set $kw_reason $upstream_http_x_keyward_reason;
      add_header X-Keyward-Reason $kw_reason always;
      root {dd}/srv;
    }}
    location = /_kw_{loc} {{
      internal;
      proxy_pass http://127.0.0.1:{vport}{route};
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }}"#
        ));
    }
    let conf = format!(
        r#"pid {dd}/nginx.pid;
error_log {dd}/logs/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {dd}/tmp; proxy_temp_path {dd}/tmp;
  server {{
    listen 127.0.0.1:{port};{locations}
  }}
}}
"#
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("conf");
    let status = Command::new(nginx_binary())
        .arg("-p")
        .arg(&d)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .status()
        .expect("start nginx");
    assert!(
        status.success(),
        "nginx: {}",
        std::fs::read_to_string(d.join("logs/error.log")).unwrap_or_default()
    );
    Nginx { dir: d }
}

/// An upstream that answers 200 with the X-Keyward-Key it received.
async fn echo_upstream() -> u16 {
    let app = axum::Router::new().fallback(|headers: http::HeaderMap| async move {
        let key = headers
            .get("x-keyward-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        format!("key={key}")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

async fn wait_http(url: &str, what: &str) {
    let http = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(start.elapsed() < TIMEOUT, "{what} never answered {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_gets_its_verdicts() {
    let cases = cases();
    let ns = TestNamespace::new("kw-hostile").await;
    let n = ns.name().to_string();
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();

    // Keys a and b, minted by the operator; a rotated once by break-glass so its first key is
    // revoked (its private key read before the revocation deletes it).
    let op = Operator::start(&n, Floors::none()).await;
    for name in ["a", "b"] {
        create_pk(
            &pks,
            name,
            json!({}),
            // One audience for both keys (the corpus's tokens carry it): what separates them
            // is the route binding and the trust record.
            json!({ "rotation": { "publishDelay": "1s" }, "token": { "audience": "keyward" } }),
        )
        .await;
        wait_pk(&pks, name, "settled", is_settled).await;
    }
    let private = |s: &Secret| data(s, l::DATA_PRIVATE_KEY).expect("a private key");
    let a1 = secrets.get(&key_secret_name("a", 1)).await.expect("a-k1");
    let b1 = secrets.get(&key_secret_name("b", 1)).await.expect("b-k1");
    let (a_old, b) = (signing_key(&private(&a1)), signing_key(&private(&b1)));
    let kid_a_old = kid(&a1);
    merge(
        &pks,
        "a",
        json!({ "spec": { "compromisedKeys": [kid_a_old.clone()] } }),
    )
    .await;
    let a2 = wait_obj(
        &secrets,
        &key_secret_name("a", 2),
        "a-k2 handed out",
        TIMEOUT,
        |s| state(s) == "active",
    )
    .await;
    wait_obj(
        &secrets,
        &key_secret_name("a", 1),
        "a-k1 revoked",
        TIMEOUT,
        |s| matches!(state(s).as_str(), "deactivated" | "destroyed"),
    )
    .await;
    let a = signing_key(&private(&a2));
    let attacker = SigningKey::from_bytes(&[7u8; 32]);
    let injected = SigningKey::from_bytes(&[9u8; 32]);
    let mut kids = BTreeMap::new();
    kids.insert("a", kid_of(&a));
    kids.insert("a_old", kid_a_old);
    kids.insert("b", kid_of(&b));
    kids.insert("attacker", kid_of(&attacker));
    kids.insert("injected", kid_of(&injected));
    let s = Signers {
        a,
        a_old,
        b,
        attacker,
        injected,
        kid: kids,
    };

    // Finding 2: a user with ConfigMap patch rights adds a JWK to key a's bundle. The operator
    // is stopped first, so that the injection stays for the whole corpus (a running operator
    // removes it within a reconcile: tests/plane/verifier.rs covers that); the verifier alone must
    // refuse it.
    op.stop().await;
    let bundle = cms.get("a-trust").await.expect("a's bundle");
    let mut jwks: Jwks =
        serde_json::from_str(&bundle.data.as_ref().expect("data")[l::DATA_JWKS]).expect("jwks");
    let injected_pair = KeyPair::from_pkcs8_pem(&pkcs8_pem(&s.injected)).expect("pair");
    jwks.keys.push(injected_pair.public_key().to_jwk());
    merge(
        &cms,
        "a-trust",
        json!({ "data": { l::DATA_JWKS: serde_json::to_string_pretty(&jwks).expect("jwks") } }),
    )
    .await;

    // The verifier processes, nginx and the echo upstream.
    let dir = tempfile::tempdir().expect("temp dir");
    let echo = echo_upstream().await;
    let (vport, pa, pb, nport) = (free_port(), free_port(), free_port(), free_port());
    // A binary from before route binding (no --bind-key) is run as it was deployed then: every
    // location asks the unbound /auth or /ext_authz, the proxy has no binding.
    let help = Command::new(keyward_bin())
        .args(["verifier", "--help"])
        .output()
        .expect("keyward verifier --help");
    let legacy = !String::from_utf8_lossy(&help.stdout).contains("--bind-key");
    if legacy {
        println!("legacy routes: {} has no --bind-key", keyward_bin());
    }
    let _v = spawn_verifier(&n, vport, &[], &dir.path().join("v.log"));
    let upstream = format!("http://127.0.0.1:{echo}");
    let proxy_args = |key: &str| -> Vec<String> {
        let mut a = vec!["--upstream".to_string(), upstream.clone()];
        if !legacy {
            a.extend(["--bind-key".to_string(), format!("{n}/{key}")]);
        }
        a
    };
    let _pa = spawn_verifier(&n, pa, &proxy_args("a"), &dir.path().join("pa.log"));
    let _pb = spawn_verifier(&n, pb, &proxy_args("b"), &dir.path().join("pb.log"));
    for port in [vport, pa, pb] {
        wait_http(&format!("http://127.0.0.1:{port}/readyz"), "the verifier").await;
    }
    let _nginx = start_nginx(dir.path(), nport, vport, &n, legacy);
    let http = reqwest::Client::new();
    // The good token passes everywhere before the corpus starts (watches caught up).
    let now = chrono::Utc::now().timestamp();
    let (good, _) = token(&cases[0], &n, &s, now);
    for url in [
        format!("http://127.0.0.1:{nport}/a/bundle"),
        if legacy {
            format!("http://127.0.0.1:{vport}/ext_authz/x")
        } else {
            format!("http://127.0.0.1:{vport}/authz/{n}/a/x")
        },
        format!("http://127.0.0.1:{pa}/x"),
    ] {
        let start = Instant::now();
        loop {
            let r = http.get(&url).bearer_auth(&good).send().await.expect("GET");
            if r.status() == 200 {
                break;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "the good token is refused at {url}: {}",
                r.status()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // The corpus.
    let mut by_tag: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in &cases {
        let now = chrono::Utc::now().timestamp();
        let (t, good) = token(c, &n, &s, now);
        let route = c.route.as_deref().unwrap_or("own");
        let url = match (c.mode.as_str(), route) {
            ("nginx", "other") => format!("http://127.0.0.1:{nport}/b/bundle"),
            ("nginx", "unbound") => format!("http://127.0.0.1:{nport}/u/bundle"),
            ("nginx", _) => format!("http://127.0.0.1:{nport}/a/bundle"),
            ("authz", "other" | "own") if legacy => {
                format!("http://127.0.0.1:{vport}/ext_authz/bundles/x")
            }
            ("authz", "other") => format!("http://127.0.0.1:{vport}/authz/{n}/b/bundles/x"),
            ("authz", "unbound") => format!("http://127.0.0.1:{vport}/ext_authz/bundles/x"),
            ("authz", "trick") => format!("http://127.0.0.1:{vport}/ext_authz/{n}/a/bundles/x"),
            ("authz", _) => format!("http://127.0.0.1:{vport}/authz/{n}/a/bundles/x"),
            ("proxy", "other") => format!("http://127.0.0.1:{pb}/bundles/x"),
            _ => format!("http://127.0.0.1:{pa}/bundles/x"),
        };
        let mut req = http.get(&url);
        match c.auth.as_deref() {
            None | Some("bearer") => req = req.header("authorization", format!("Bearer {t}")),
            Some("none") => {}
            Some("duplicate") => {
                req = req
                    .header("authorization", format!("Bearer {good}"))
                    .header("authorization", format!("Bearer {t}x"));
            }
            Some(raw) => {
                let v = raw
                    .strip_prefix("raw:")
                    .unwrap_or(raw)
                    .replace("$token", &t);
                req = req.header("authorization", v);
            }
        }
        for (k, v) in &c.headers {
            req = req.header(k, subst(v, &n, "", &s, now));
        }
        let (status, reason, body) = match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let reason = r
                    .headers()
                    .get("x-keyward-reason")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                (status, reason, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, format!("request failed: {e}"), String::new()),
        };
        let (want, want_reason) = match (c.mode.as_str(), c.want_nginx) {
            ("nginx", Some(w)) => (w, None),
            _ => (c.want, c.reason.as_deref()),
        };
        let mut ok = status == want && want_reason.is_none_or(|r| r == reason);
        if ok && c.check_echo {
            ok = body == format!("key={n}/a");
        }
        let entry = by_tag.entry(c.tag.clone()).or_default();
        match (ok, c.open) {
            (true, false) => entry.0 += 1,
            (false, true) => entry.2 += 1,
            (true, true) => entry.0 += 1,
            (false, false) => {
                entry.1 += 1;
                failures.push(format!(
                    "{} (finding {}): got {status} {reason:?}, want {want} {want_reason:?}",
                    c.id, c.finding
                ));
            }
        }
    }
    println!(
        "hostile corpus: {} cases against {}",
        cases.len(),
        keyward_bin()
    );
    println!(
        "{:<14} {:>6} {:>6} {:>12}",
        "tag", "held", "failed", "open (known)"
    );
    for (tag, (held, failed, open)) in &by_tag {
        println!("{tag:<14} {held:>6} {failed:>6} {open:>12}");
    }
    let total = by_tag
        .values()
        .fold((0, 0, 0), |t, v| (t.0 + v.0, t.1 + v.1, t.2 + v.2));
    println!(
        "{:<14} {:>6} {:>6} {:>12}",
        "total", total.0, total.1, total.2
    );
    for f in &failures {
        println!("FAILED {f}");
    }
    assert!(
        failures.is_empty(),
        "{} cases did not get their verdict",
        failures.len()
    );
    ns.cleanup().await;
}
