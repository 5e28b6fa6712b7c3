//! ProvisioningKey against the real local control plane (`e2e/cluster.sh up`).
//!
//! Each test gets its own namespace and, unless it runs the real binary, its own in-process
//! operator that watches only that namespace through a client counting its mutating requests.
//! Waits are watch-based (`await_condition`) with timeouts; the only plain sleeps are where a
//! test must let time pass to show that nothing happens.
//!
//! The crash tests (`crash::*`) need `--features fault-injection`.
//!
//! Checked to fail when they should (mutations in a private copy of the tree): status
//! `lastTransitionTime = now` fails `settled_key_makes_zero_writes`; revoking without the
//! overlap fails `interval_rotates_on_schedule` and the crash tests; activating without the
//! publishDelay fails the crash tests; not consuming the creation-time trigger value fails
//! `manual_triggers_rotate_exactly_once`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use keyward::api::ProvisioningKey;
use keyward::controller::provisioning_key::key_secret_name;
use keyward::keys::{Jwks, TokenClaims, TokenHeader};
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::{conditions::is_created, wait_for_deleted};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject};
use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------------------------
// 1. Key material, checked with an independent implementation (the openssl CLI).

/// Runs `openssl` in `dir`; panics with its stderr unless it succeeds.
fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the openssl CLI (OpenSSL 3 is required): {e}"));
    assert!(
        out.status.success(),
        "`openssl {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether `openssl pkeyutl -verify` accepts `signature` over `message` under `public_pem`.
fn openssl_verifies(dir: &Path, public_pem: &str, message: &[u8], signature: &[u8]) -> bool {
    std::fs::write(dir.join("verify-pub.pem"), public_pem).expect("write pem");
    std::fs::write(dir.join("msg.bin"), message).expect("write message");
    std::fs::write(dir.join("sig.bin"), signature).expect("write signature");
    let out = Command::new("openssl")
        .args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "verify-pub.pem",
            "-rawin",
        ])
        .args(["-in", "msg.bin", "-sigfile", "sig.bin"])
        .current_dir(dir)
        .output()
        .expect("run openssl pkeyutl");
    out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully")
}

/// RFC 7638 thumbprint of an Ed25519 key, computed by hand from its raw 32 bytes.
fn thumbprint(raw: &[u8]) -> String {
    let x = URL_SAFE_NO_PAD.encode(raw);
    // Required members only, lexicographic order, no whitespace (RFC 7638 section 3).
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

fn b64url_json<T: serde::de::DeserializeOwned>(segment: &str) -> T {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .expect("unpadded base64url segment");
    serde_json::from_slice(&bytes).expect("JSON segment")
}

/// Checks the key Secret, the agent Secret and the trust bundle of a settled ProvisioningKey
/// against openssl and a hand-made thumbprint.
async fn check_material(
    ns: &TestNamespace,
    name: &str,
    audience: &str,
    ttl: i64,
    with_private: bool,
) {
    let secrets: Api<Secret> = ns.api();
    let pks: Api<ProvisioningKey> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    let pk = wait_pk(&pks, name, "settled", is_settled).await;
    let key = secrets
        .get(&key_secret_name(name, 1))
        .await
        .expect("key Secret k1");
    let agent = secrets.get(name).await.expect("agent Secret");
    let bundle = cms
        .get(&format!("{name}-trust"))
        .await
        .expect("trust bundle ConfigMap");
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();

    // The public key derived by openssl from the private PEM equals both public-key.pem entries.
    let private_pem = data(&key, l::DATA_PRIVATE_KEY).expect("key Secret holds private-key.pem");
    assert!(
        private_pem.starts_with("-----BEGIN PRIVATE KEY-----"),
        "PKCS#8 PEM expected"
    );
    std::fs::write(d.join("priv.pem"), &private_pem).expect("write private key");
    let derived =
        String::from_utf8(openssl(d, &["pkey", "-in", "priv.pem", "-pubout"])).expect("PEM");
    let key_pub = data(&key, l::DATA_PUBLIC_KEY).expect("key Secret public-key.pem");
    let agent_pub = data(&agent, l::DATA_PUBLIC_KEY).expect("agent Secret public-key.pem");
    assert_eq!(
        key_pub.trim(),
        derived.trim(),
        "{name}: key Secret public key != openssl's derivation"
    );
    assert_eq!(
        agent_pub.trim(),
        derived.trim(),
        "{name}: agent Secret public key != openssl's derivation"
    );
    // openssl itself says this is an Ed25519 key.
    let text =
        String::from_utf8_lossy(&openssl(d, &["pkey", "-in", "priv.pem", "-noout", "-text"]))
            .into_owned();
    assert!(
        text.contains("ED25519"),
        "{name}: not an Ed25519 key: {text}"
    );

    // Raw public key: the last 32 bytes of the SPKI DER, as openssl writes it.
    std::fs::write(d.join("pub.pem"), &derived).expect("write public key");
    let der = openssl(d, &["pkey", "-pubin", "-in", "pub.pem", "-outform", "DER"]);
    assert_eq!(der.len(), 44, "Ed25519 SPKI DER is 12 + 32 bytes");
    let raw = &der[12..];
    let expected_kid = thumbprint(raw);

    // The token: header, claims and signature, verified by openssl.
    let token = data(&agent, l::DATA_TOKEN).expect("agent Secret token");
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS has three segments: {token}");
    let header: TokenHeader = b64url_json(parts[0]);
    let claims: TokenClaims = b64url_json(parts[1]);
    let signature = URL_SAFE_NO_PAD
        .decode(parts[2])
        .expect("base64url signature");
    let signing_input = format!("{}.{}", parts[0], parts[1]);
    assert!(
        openssl_verifies(d, &derived, signing_input.as_bytes(), &signature),
        "{name}: openssl rejects the token's EdDSA signature"
    );
    // The check can fail: a changed payload does not verify.
    assert!(
        !openssl_verifies(
            d,
            &derived,
            format!("{signing_input}x").as_bytes(),
            &signature
        ),
        "openssl accepted a tampered message: the verification is not checking anything"
    );
    assert_eq!(header.alg, "EdDSA");

    // One key id everywhere.
    let jwks: Jwks = serde_json::from_str(
        bundle
            .data
            .as_ref()
            .and_then(|m| m.get(l::DATA_JWKS))
            .expect("jwks.json"),
    )
    .expect("JWKS JSON");
    assert_eq!(
        jwks.keys.len(),
        1,
        "{name}: one trusted key expected: {jwks:?}"
    );
    let jwk = &jwks.keys[0];
    assert_eq!((jwk.kty.as_str(), jwk.crv.as_str()), ("OKP", "Ed25519"));
    assert_eq!(
        jwk.x,
        URL_SAFE_NO_PAD.encode(raw),
        "{name}: JWKS x != openssl's raw public key"
    );
    let revoked: Vec<String> = serde_json::from_str(
        bundle
            .data
            .as_ref()
            .and_then(|m| m.get(l::DATA_REVOKED))
            .expect("revoked.json"),
    )
    .expect("revoked.json JSON");
    assert!(revoked.is_empty());
    let status_kid = pk
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|c| c.kid.clone());
    let ids = [
        ("agent Secret data key-id", data(&agent, l::DATA_KEY_ID)),
        ("JWKS kid", jwk.kid.clone()),
        ("token header kid", Some(header.kid.clone())),
        (
            "key Secret annotation keyward.dev/key-id",
            annotation(&key, l::KEY_ID),
        ),
        (
            "agent Secret annotation keyward.dev/key-id",
            annotation(&agent, l::KEY_ID),
        ),
        ("status.currentKey.kid", status_kid),
    ];
    for (what, id) in ids {
        assert_eq!(
            id.as_deref(),
            Some(expected_kid.as_str()),
            "{name}: {what} is not the RFC 7638 thumbprint"
        );
    }

    // Claims.
    assert_eq!(claims.sub, format!("{}/{name}", ns.name()));
    assert_eq!(claims.aud, audience);
    assert_eq!(claims.iss, "keyward");
    assert_eq!(
        claims.exp - claims.iat,
        ttl,
        "{name}: exp - iat must be token.ttl"
    );
    assert_eq!(claims.nbf, claims.iat);
    let now = chrono::Utc::now().timestamp();
    assert!(
        (claims.iat - now).abs() < 120,
        "iat {} is not about now ({now})",
        claims.iat
    );

    // The private key reaches the agent only when asked for, and then it is the same key.
    assert_eq!(agent.type_.as_deref(), Some(l::AGENT_SECRET_TYPE));
    match data(&agent, l::DATA_PRIVATE_KEY) {
        Some(p) => {
            assert!(
                with_private,
                "{name}: the agent Secret holds private-key.pem by default"
            );
            assert_eq!(
                p, private_pem,
                "{name}: agent private key != key Secret private key"
            );
        }
        None => assert!(
            !with_private,
            "{name}: includePrivateKey: true but no private-key.pem"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_is_consistent_under_openssl() {
    let ns = TestNamespace::new("kw-material").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let spec = json!({ "token": { "audience": "bundles.example.com", "ttl": "10m" } });
    create_pk(&pks, "plain", json!({}), spec).await;
    let spec = json!({ "includePrivateKey": true, "token": { "audience": "signer", "ttl": "7m" } });
    create_pk(&pks, "with-private", json!({}), spec).await;
    check_material(&ns, "plain", "bundles.example.com", 600, false).await;
    check_material(&ns, "with-private", "signer", 420, true).await;
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 2. Manual triggers rotate exactly once; the value present at creation does not rotate.

/// Fast rotation settings: no debounce, so a duplicate mint would show at once.
fn quick_rotation(extra: serde_json::Value) -> serde_json::Value {
    let mut r = json!({ "publishDelay": "1s", "overlap": "1s", "minInterval": "0s" });
    if let (Some(r), Some(extra)) = (r.as_object_mut(), extra.as_object()) {
        r.extend(extra.clone());
    }
    json!({ "rotation": r })
}

/// Drives one ProvisioningKey through: settle; prove the creation-time trigger value does not
/// rotate; `trigger` it once; wait for the rotation to complete; prove no second rotation.
async fn rotates_exactly_once(
    ns: &TestNamespace,
    name: &str,
    trigger: serde_json::Value,
    expected_trigger: &str,
) {
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let k2 = key_secret_name(name, 2);
    let k3 = key_secret_name(name, 3);
    wait_pk(&pks, name, "settled on the first key", is_settled).await;
    // The trigger value present at creation was consumed by the first mint. With
    // minInterval 0 a (wrong) rotation would start within milliseconds of settling.
    expect_never(
        &secrets,
        &k2,
        "a rotation for the creation-time trigger value",
        Duration::from_secs(3),
        is_created(),
    )
    .await;
    let first = key_secrets(&secrets, name).await;
    assert_eq!(first.len(), 1);
    let kid1 = kid(&first[0]);

    merge(&pks, name, trigger).await;
    let second = wait_obj(&secrets, &k2, "second key minted", TIMEOUT, |_| true).await;
    assert_eq!(
        annotation(&second, l::TRIGGER).as_deref(),
        Some(expected_trigger)
    );
    let kid2 = kid(&second);
    wait_pk(&pks, name, "rotation to k2 complete", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;

    // A reconcile from an unrelated change, then enough time for another mint (minInterval is
    // 0s, publishDelay 1s): still exactly two keys.
    merge(
        &pks,
        name,
        json!({ "metadata": { "labels": { "example.com/poke": "1" } } }),
    )
    .await;
    expect_never(
        &secrets,
        &k3,
        "a second rotation for the same trigger",
        Duration::from_secs(4),
        is_created(),
    )
    .await;
    let keys = key_secrets(&secrets, name).await;
    assert_eq!(
        keys.iter().map(seq).collect::<Vec<_>>(),
        vec![1, 2],
        "{name}: exactly two key Secrets"
    );
    assert_eq!(state(&keys[0]), "deactivated");
    assert_eq!(state(&keys[1]), "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_triggers_rotate_exactly_once() {
    let ns = TestNamespace::new("kw-manual").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    create_pk(
        &pks,
        "by-annotation",
        json!({ l::ROTATE: "at-creation" }),
        quick_rotation(json!({})),
    )
    .await;
    create_pk(
        &pks,
        "by-token",
        json!({}),
        quick_rotation(json!({ "requestToken": "at-creation" })),
    )
    .await;
    let annotation = json!({ "metadata": { "annotations": { l::ROTATE: "now" } } });
    let token = json!({ "spec": { "rotation": { "requestToken": "rotate-1" } } });
    tokio::join!(
        rotates_exactly_once(&ns, "by-annotation", annotation, "Annotation"),
        rotates_exactly_once(&ns, "by-token", token, "RequestToken"),
    );
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Scheduled rotation.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_rotates_on_schedule() {
    let ns = TestNamespace::new("kw-interval").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let spec = json!({ "rotation": { "interval": "3s", "publishDelay": "0s", "overlap": "1s", "minInterval": "0s" } });
    create_pk(&pks, "sched", json!({}), spec).await;
    // Two scheduled rotations: k2 then k3, and k2 revoked after the overlap.
    let k3 = wait_obj(
        &secrets,
        &key_secret_name("sched", 3),
        "third key",
        TIMEOUT,
        |_| true,
    )
    .await;
    let kid3 = kid(&k3);
    let pk = wait_pk(&pks, "sched", "two rotations complete", |pk| {
        pk.status
            .as_ref()
            .is_some_and(|s| s.revoked_keys.len() >= 2)
    })
    .await;
    let keys = key_secrets(&secrets, "sched").await;
    assert!(
        keys.len() >= 3,
        "at least three keys: {:?}",
        keys.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    );
    let (k1, k2) = (&keys[0], &keys[1]);
    assert_eq!((seq(k1), seq(k2), kid(&keys[2])), (1, 2, kid3));
    assert_eq!(annotation(k1, l::TRIGGER).as_deref(), Some("Initial"));
    for (old, new) in [(k1, k2), (k2, &keys[2])] {
        assert_eq!(
            annotation(new, l::TRIGGER).as_deref(),
            Some("Interval"),
            "{}",
            new.name_any()
        );
        // Not before the interval: minted at least 3 s after its predecessor became current.
        let gap = at(new, l::CREATED_AT) - at(old, l::ACTIVATED_AT);
        assert!(
            gap >= chrono::Duration::seconds(3),
            "{} minted {gap} after {} was activated",
            new.name_any(),
            old.name_any()
        );
        // Revoked (deactivated: out of the bundle, private key kept for
        // retainDeactivatedFor), and not before the overlap.
        assert_eq!(state(old), "deactivated", "{}", old.name_any());
        assert!(
            data(old, l::DATA_PRIVATE_KEY).is_some(),
            "{}: private key deleted at deactivation",
            old.name_any()
        );
        let held = at(old, l::DEACTIVATED_AT) - at(old, l::RETIRED_AT);
        assert!(
            held >= chrono::Duration::seconds(1),
            "{} revoked {held} after retiring (overlap 1s)",
            old.name_any()
        );
    }
    // History in status, newest first, matching the key Secrets' annotations.
    let status = pk.status.clone().expect("status");
    assert!(
        status.next_rotation_at.is_some(),
        "nextRotationAt is reported"
    );
    for (k, st) in [(k1, "Deactivated"), (k2, "Deactivated")] {
        let h = status
            .history
            .iter()
            .find(|h| h.kid == kid(k))
            .unwrap_or_else(|| {
                panic!(
                    "no history entry for {}: {:?}",
                    k.name_any(),
                    status.history
                )
            });
        assert_eq!(h.state, st);
        assert_eq!(Some(h.trigger.clone()), annotation(k, l::TRIGGER));
        assert_eq!(h.deactivated_at, annotation(k, l::DEACTIVATED_AT));
        assert_eq!(
            h.revoked_at, None,
            "not destroyed within retainDeactivatedFor"
        );
        assert_eq!(h.activated_at, annotation(k, l::ACTIVATED_AT));
    }
    let positions: Vec<usize> = [k2, k1]
        .iter()
        .map(|k| {
            status
                .history
                .iter()
                .position(|h| h.kid == kid(k))
                .expect("in history")
        })
        .collect();
    assert!(
        positions[0] < positions[1],
        "history is newest first: {:?}",
        status.history
    );
    op.stop().await;
    ns.cleanup().await;
}

/// Keys created together do not fall due together: status shows the scheduled rotation and
/// the token refresh moved earlier by the key's own offset (hashed from its uid, at most a tenth
/// of the period), never later than asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_jittered_schedule() {
    use keyward::rotation::schedule::{self, Purpose};
    let ns = TestNamespace::new("kw-jitter").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let spec = json!({ "rotation": { "interval": "2h" }, "token": { "ttl": "1h" } });
    create_pk(&pks, "herd", json!({}), spec).await;
    let pk = wait_pk(&pks, "herd", "settled", is_settled).await;
    let uid = pk.uid().expect("uid");
    let status = pk.status.clone().expect("status");
    let k1 = &key_secrets(&secrets, "herd").await[0];
    let asked = at(k1, l::ACTIVATED_AT) + chrono::Duration::hours(2);
    let offset = schedule::offset(&uid, Purpose::Rotation, Duration::from_secs(7200));
    let expected = asked - chrono::Duration::from_std(offset).expect("small");
    assert_eq!(
        status.next_rotation_at,
        Some(keyward::controller::ts(expected)),
        "nextRotationAt: interval after activation ({asked}) minus the offset {offset:?}"
    );
    let token = data(
        &secrets.get("herd").await.expect("agent Secret"),
        l::DATA_TOKEN,
    )
    .expect("a token");
    let (_, claims) = keyward::keys::decode_token_unverified(&token).expect("the token decodes");
    let offset = schedule::offset(&uid, Purpose::TokenRefresh, Duration::from_secs(3600));
    let refresh = claims.iat + 1800 - offset.as_secs() as i64;
    let expected = chrono::DateTime::from_timestamp(refresh, 0).expect("valid");
    assert_eq!(
        status.token_refresh_at,
        Some(keyward::controller::ts(expected)),
        "tokenRefreshAt: half the token's life minus the offset {offset:?}"
    );
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A settled key costs nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_key_makes_zero_writes() {
    let ns = TestNamespace::new("kw-zero").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    create_pk(
        &pks,
        "calm",
        json!({}),
        json!({ "secretTemplate": { "labels": { "team": "a" } } }),
    )
    .await;
    wait_pk(&pks, "calm", "settled", is_settled).await;
    // The first key's writes: key Secret (created active), trust bundle, agent Secret, one
    // KeyMinted Event (minted and handed out), the status (which carries the trust record).
    // Every later reconcile writes nothing (below), so no write of the first key can arrive
    // after this count.
    let before = op.writes();
    assert_eq!(before, 5, "writes of the first key");

    // Provoke reconciles without a spec change, from the test's own (uncounted) client: the
    // ProvisioningKey's watch, the owned agent Secret, key Secret and trust bundle each
    // trigger one. Each reconcile observes, plans and computes the status again; if anything
    // in it were not a pure function of the evidence (a timestamp refreshed on every reconcile,
    // a re-issued token, a re-applied Secret, an Event per reconcile) the counter would move.
    // Stored timestamps have a resolution of one second, so the provocations are spread over
    // more than two seconds: a "now" leaking into the status then differs from the stored one
    // for at least one of them (checked: with `lastTransitionTime = now` this test fails).
    // Nothing observable marks "no write happened", so these are plain sleeps by necessity.
    let touch = json!({ "metadata": { "annotations": { "example.com/touched": "yes" } } });
    for i in 0..3 {
        let label = json!({ "metadata": { "labels": { "example.com/unrelated": i.to_string() } } });
        merge(&pks, "calm", label).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    merge(&secrets, "calm", touch.clone()).await;
    merge(&secrets, &key_secret_name("calm", 1), touch.clone()).await;
    merge(&cms, "calm-trust", touch).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        op.writes(),
        before,
        "a settled ProvisioningKey made mutating requests"
    );
    let pk = pks.get("calm").await.expect("get");
    assert!(is_settled(&pk));

    // Positive control: the same kind of change, when it matters (the agent Secret lost its
    // key-id annotation), is repaired: reconciles did run and writes are counted.
    merge(
        &secrets,
        "calm",
        json!({ "metadata": { "annotations": { l::KEY_ID: null } } }),
    )
    .await;
    wait_obj(&secrets, "calm", "agent Secret repaired", TIMEOUT, |s| {
        annotation(s, l::KEY_ID).is_some()
    })
    .await;
    assert!(op.writes() > before, "the repair was not counted");
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Deletion: owned objects are garbage-collected.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_key_removes_what_it_owns() {
    let ns = TestNamespace::new("kw-gc").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    create_pk(&pks, "doomed", json!({}), json!({})).await;
    wait_pk(&pks, "doomed", "settled", is_settled).await;
    let mut uids = Vec::new();
    for name in [key_secret_name("doomed", 1), "doomed".to_string()] {
        let s = secrets.get(&name).await.expect("owned Secret");
        uids.push((name, s.uid().expect("uid")));
    }
    let cm = cms.get("doomed-trust").await.expect("trust bundle");
    let cm_uid = cm.uid().expect("uid");

    let t0 = Instant::now();
    pks.delete("doomed", &DeleteParams::default())
        .await
        .expect("delete ProvisioningKey");
    let gc = Duration::from_secs(60);
    let waits = uids
        .iter()
        .map(|(name, uid)| wait_for_deleted(&secrets, name, uid, gc));
    let (secrets_gone, cm_gone) = tokio::join!(
        futures::future::join_all(waits),
        wait_for_deleted(&cms, "doomed-trust", &cm_uid, gc)
    );
    for r in secrets_gone {
        r.expect("owned Secret garbage-collected");
    }
    cm_gone.expect("trust bundle garbage-collected");
    eprintln!(
        "garbage collection of 3 owned objects took {} ms",
        t0.elapsed().as_millis()
    );
    // And nothing was re-created by the operator meanwhile.
    assert!(key_secrets(&secrets, "doomed").await.is_empty());
    assert!(secrets.get_opt("doomed").await.expect("get").is_none());
    assert!(cms.get_opt("doomed-trust").await.expect("get").is_none());
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 7. Invalid input.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_rejects_unknown_algorithm_and_malformed_duration() {
    let ns = TestNamespace::new("kw-schema").await;
    let ar = ApiResource::erase::<ProvisioningKey>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ns.client(), ns.name(), &ar);
    let create = |name: &str, spec: serde_json::Value| {
        let obj = DynamicObject::new(name, &ar).data(json!({ "spec": spec }));
        let api = api.clone();
        async move { api.create(&PostParams::default(), &obj).await }
    };
    let rejected = |res: Result<DynamicObject, kube::Error>, field: &str| match res {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{field}: {e:?}");
            assert!(
                e.message.contains(field),
                "the error does not name {field}: {}",
                e.message
            );
            eprintln!("rejected as expected: {}", e.message);
        }
        other => panic!("{field}: expected a 422 from the API server, got {other:?}"),
    };
    rejected(
        create("bad-algorithm", json!({ "algorithm": "RSA" })).await,
        "algorithm",
    );
    rejected(
        create(
            "bad-interval",
            json!({ "rotation": { "interval": "10 minutes" } }),
        )
        .await,
        "rotation.interval",
    );
    // Positive controls: the same objects with valid values are accepted, so the rejections
    // above are about those fields and nothing else.
    create("good-algorithm", json!({ "algorithm": "Ed25519" }))
        .await
        .expect("Ed25519 is accepted");
    create(
        "good-interval",
        json!({ "rotation": { "interval": "10m" } }),
    )
    .await
    .expect("10m is accepted");
    let pks: Api<ProvisioningKey> = ns.api();
    assert!(pks.get_opt("bad-algorithm").await.expect("get").is_none());
    assert!(pks.get_opt("bad-interval").await.expect("get").is_none());
    ns.cleanup().await;
}

/// Nothing was minted, handed out or published for `name` (secretName/bundle given).
async fn assert_nothing_written(
    ns: &TestNamespace,
    name: &str,
    secret: Option<&str>,
    bundle: Option<&str>,
) {
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    assert!(
        key_secrets(&secrets, name).await.is_empty(),
        "{name}: a key Secret was created"
    );
    if let Some(secret) = secret {
        assert!(
            secrets.get_opt(secret).await.expect("get").is_none(),
            "{name}: agent Secret {secret} was written"
        );
    }
    if let Some(bundle) = bundle {
        assert!(
            cms.get_opt(bundle).await.expect("get").is_none(),
            "{name}: trust bundle {bundle} was written"
        );
    }
}

async fn assert_never_handed_out(secrets: &Api<Secret>, name: &str) {
    assert!(
        secrets.get_opt(name).await.expect("get").is_none(),
        "{name}: a key was handed out without its trust bundle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_reported_and_nothing_is_overwritten() {
    let ns = TestNamespace::new("kw-invalid").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    // Objects the operator does not own, created before it starts.
    let foreign_secret = secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("taken".into()),
                    ..Default::default()
                },
                data: Some([("token".to_string(), ByteString(b"user data".to_vec()))].into()),
                ..Default::default()
            },
        )
        .await
        .expect("create foreign Secret");
    let foreign_cm = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("their-trust".into()),
                    ..Default::default()
                },
                data: Some([(l::DATA_JWKS.to_string(), r#"{"keys":[]}"#.to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .expect("create foreign ConfigMap");
    // Default floors: rotation.interval must be at least 1h.
    let op = Operator::start(ns.name(), Floors::default()).await;

    create_pk(
        &pks,
        "too-fast",
        json!({}),
        json!({ "rotation": { "interval": "30m" } }),
    )
    .await;
    create_pk(
        &pks,
        "wants-secret",
        json!({}),
        json!({ "secretName": "taken" }),
    )
    .await;
    create_pk(
        &pks,
        "wants-bundle",
        json!({}),
        json!({ "trustBundle": { "configMapName": "their-trust" } }),
    )
    .await;

    // (c) below the floor
    let pk = wait_pk(&pks, "too-fast", "Ready=False BelowFloor", |pk| {
        not_ready_because(pk, "BelowFloor")
    })
    .await;
    let msg = ready_message(&pk);
    assert!(
        msg.contains("rotation.interval") && msg.contains("1h"),
        "unclear message: {msg}"
    );
    assert_eq!(
        pk.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Invalid")
    );
    assert_nothing_written(&ns, "too-fast", Some("too-fast"), Some("too-fast-trust")).await;

    // (d) secretName taken
    let pk = wait_pk(&pks, "wants-secret", "Ready=False SecretNameTaken", |pk| {
        not_ready_because(pk, "SecretNameTaken")
    })
    .await;
    let msg = ready_message(&pk);
    assert!(msg.contains("taken"), "unclear message: {msg}");
    // A key never reconciled reads neither name first: its create is what finds the name taken,
    // so a key may be minted (and published) meanwhile, but nothing is written under the taken
    // name (checked below, after more reconciles).

    // (e) trust bundle name taken
    let pk = wait_pk(
        &pks,
        "wants-bundle",
        "Ready=False TrustBundleNameTaken",
        |pk| not_ready_because(pk, "TrustBundleNameTaken"),
    )
    .await;
    let msg = ready_message(&pk);
    assert!(msg.contains("their-trust"), "unclear message: {msg}");
    // The key minted before the bundle's create found the name taken is never handed out: a
    // key reaches the agent Secret only while its own bundle lists it.
    assert_never_handed_out(&secrets, "wants-bundle").await;

    // A few more reconciles (unrelated label changes), then the foreign objects are still
    // exactly as their owner wrote them: same resourceVersion, same data, no owner reference.
    for name in ["wants-secret", "wants-bundle"] {
        merge(
            &pks,
            name,
            json!({ "metadata": { "labels": { "example.com/poke": "1" } } }),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = secrets.get("taken").await.expect("foreign Secret");
    assert_eq!(
        s.resource_version(),
        foreign_secret.resource_version(),
        "the foreign Secret was written"
    );
    assert_eq!(s.data, foreign_secret.data);
    assert!(s.owner_references().is_empty());
    let c = cms.get("their-trust").await.expect("foreign ConfigMap");
    assert_eq!(
        c.resource_version(),
        foreign_cm.resource_version(),
        "the foreign ConfigMap was written"
    );
    assert_eq!(c.data, foreign_cm.data);
    assert_never_handed_out(&secrets, "wants-bundle").await;
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Measurement: apply -> agent Secret with a token.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measure_apply_to_secret() {
    let ns = TestNamespace::new("kw-measure").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let mut ms = Vec::new();
    for i in 0..5 {
        let name = format!("measure-{i}");
        let t0 = Instant::now();
        create_pk(&pks, &name, json!({}), json!({})).await;
        wait_obj(&secrets, &name, "agent Secret with a token", TIMEOUT, |s| {
            data(s, l::DATA_TOKEN).is_some()
        })
        .await;
        let elapsed = t0.elapsed().as_secs_f64() * 1000.0;
        eprintln!("apply-to-secret: {elapsed:.0} ms");
        ms.push(elapsed);
    }
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "apply-to-secret over {} runs: min {:.0} ms, median {:.0} ms, max {:.0} ms",
        ms.len(),
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Crash after each write of a rotation (the real binary, `--features fault-injection`).

#[cfg(feature = "fault-injection")]
mod crash {
    use std::os::unix::process::ExitStatusExt as _;
    use std::path::PathBuf;
    use std::process::{Child, ExitStatus, Stdio};

    use super::*;

    /// One private copy of the fault-injection build per test process: `target/debug/keyward`
    /// may be replaced by a concurrent build without the feature while the tests run.
    fn binary() -> &'static Path {
        static BIN: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
        &BIN.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let bin = keyward_testbed::private_binary_copy(
                env!("CARGO_BIN_EXE_keyward"),
                dir.path(),
                keyward::fault::ABORT_MESSAGE.as_bytes(),
            )
            .expect("a fault-injection build of keyward");
            (dir, bin)
        })
        .1
    }

    /// The `keyward` binary as a subprocess watching one namespace, all floors at 0s; killed
    /// when dropped. Its output goes to a file, printed if the test fails.
    struct Keyward {
        child: Child,
        log: PathBuf,
    }

    impl Keyward {
        fn spawn(namespace: &str, crash_after: Option<&str>, dir: &Path, label: &str) -> Self {
            let log = dir.join(format!("{label}.log"));
            let out = std::fs::File::create(&log).expect("create log file");
            let err = out.try_clone().expect("clone log file");
            let mut cmd = Command::new(binary());
            cmd.args(["run", "--namespaces", namespace])
                .args(["--metrics-address", "127.0.0.1:0"])
                .args(["--health-address", "127.0.0.1:0"])
                .args(["--min-rotation-interval", "0s", "--min-min-interval", "0s"])
                .args([
                    "--min-publish-delay",
                    "0s",
                    "--min-overlap",
                    "0s",
                    "--min-token-ttl",
                    "0s",
                ])
                .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
                .env("RUST_LOG", "info,kube=warn")
                .env_remove("KEYWARD_CRASH_AFTER")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err);
            if let Some(point) = crash_after {
                cmd.env("KEYWARD_CRASH_AFTER", point);
            }
            let child = cmd.spawn().expect("start the keyward binary");
            Keyward { child, log }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }

        /// Polls for the process's exit (no watch exists for it), at most `timeout`.
        async fn exited(&mut self, timeout: Duration) -> ExitStatus {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "keyward did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    impl Drop for Keyward {
        fn drop(&mut self) {
            if matches!(self.child.try_wait(), Ok(None)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            if std::thread::panicking() {
                eprintln!(
                    "---- keyward log {} ----\n{}",
                    self.log.display(),
                    self.log()
                );
            }
        }
    }

    const PUBLISH_DELAY: i64 = 2;
    const OVERLAP: i64 = 2;

    /// Crashes the operator right after the rotation's write `point` (its `nth` occurrence in
    /// the process: the first key does mint, bundle and hand-out once each, being created
    /// active; mark-published, record-published and activate happen only in the rotation),
    /// restarts it, and checks the rotation completes exactly once and without shortcuts.
    async fn crash_after(point: &str, nth: u32) {
        let ns = TestNamespace::new(&format!("kw-crash-{point}")).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let pks: Api<ProvisioningKey> = ns.api();
        let secrets: Api<Secret> = ns.api();
        let cms: Api<ConfigMap> = ns.api();
        let k1n = key_secret_name("pk", 1);

        let spec = format!("{point}:{nth}");
        let mut first = Keyward::spawn(ns.name(), Some(&spec), dir.path(), "first");
        let rotation = json!({ "rotation": {
            "publishDelay": format!("{PUBLISH_DELAY}s"), "overlap": format!("{OVERLAP}s"), "minInterval": "0s"
        } });
        create_pk(&pks, "pk", json!({}), rotation).await;
        wait_pk(
            &pks,
            "pk",
            "first key settled (before the crash point)",
            is_settled,
        )
        .await;
        let kid1 = kid(&secrets.get(&k1n).await.expect("k1"));
        merge(
            &pks,
            "pk",
            json!({ "metadata": { "annotations": { l::ROTATE: "crash-test" } } }),
        )
        .await;

        let status = first.exited(TIMEOUT).await;
        assert_eq!(
            status.signal(),
            Some(6),
            "expected an abort (SIGABRT) after {spec}, got {status}"
        );
        assert!(
            first
                .log()
                .contains(&format!("aborting right after write \"{point}\"")),
            "log:\n{}",
            first.log()
        );

        // The crash hit the rotation's write: the state is exactly "just after <point>".
        let keys = key_secrets(&secrets, "pk").await;
        assert_eq!(
            keys.iter().map(seq).collect::<Vec<_>>(),
            vec![1, 2],
            "after {spec}"
        );
        let (k1, k2) = (&keys[0], &keys[1]);
        let kid2 = kid(k2);
        let agent_kid = data(
            &secrets.get("pk").await.expect("agent Secret"),
            l::DATA_KEY_ID,
        );
        let bundle = cms.get("pk-trust").await.expect("trust bundle");
        let jwks: Jwks =
            serde_json::from_str(&bundle.data.clone().unwrap_or_default()[l::DATA_JWKS])
                .expect("jwks");
        let in_bundle = |k: &str| jwks.keys.iter().any(|j| j.kid.as_deref() == Some(k));
        let published = annotation(k2, l::PUBLISHED_AT).is_some();
        let seen = (
            state(k1),
            state(k2),
            published,
            in_bundle(&kid2),
            agent_kid == Some(kid2.clone()),
        );
        let expected = match point {
            "mint" => ("active", "pending", false, false, false),
            "mark-published" => ("active", "published", false, false, false),
            "bundle" => ("active", "published", false, true, false),
            "record-published" => ("active", "published", true, true, false),
            "activate" => ("active", "active", true, true, false),
            "retire" => ("retiring", "active", true, true, false),
            "hand-out" => ("retiring", "active", true, true, true),
            "revoke" => ("deactivated", "active", true, true, true),
            other => panic!("unknown point {other}"),
        };
        let s =
            |t: (&str, &str, bool, bool, bool)| (t.0.to_string(), t.1.to_string(), t.2, t.3, t.4);
        assert_eq!(
            seen,
            s(expected),
            "state after {spec}: (k1, k2, published-at, k2 in bundle, handed out)"
        );
        if point == "revoke" {
            assert!(
                in_bundle(&kid1),
                "the bundle is rewritten only after the revoke write"
            );
        }

        // Restart without fault injection: the rotation resumes from evidence and completes.
        let second = Keyward::spawn(ns.name(), None, dir.path(), "second");
        wait_pk(&pks, "pk", "rotation complete after the restart", |pk| {
            rotated_to(pk, &kid2, &[&kid1])
        })
        .await;
        expect_never(
            &secrets,
            &key_secret_name("pk", 3),
            "a third key",
            Duration::from_secs(3),
            is_created(),
        )
        .await;

        let keys = key_secrets(&secrets, "pk").await;
        assert_eq!(
            keys.iter().map(seq).collect::<Vec<_>>(),
            vec![1, 2],
            "exactly one key for the rotation"
        );
        let (k1, k2) = (&keys[0], &keys[1]);
        assert_eq!(
            (state(k1).as_str(), state(k2).as_str()),
            ("deactivated", "active")
        );
        assert_eq!(kid(k2), kid2, "k2 is the key minted before the crash");
        assert!(
            data(k1, l::DATA_PRIVATE_KEY).is_some(),
            "a deactivated key keeps its private key (retainDeactivatedFor)"
        );
        assert_eq!(annotation(k2, l::TRIGGER).as_deref(), Some("Annotation"));
        let agent = secrets.get("pk").await.expect("agent Secret");
        assert_eq!(
            data(&agent, l::DATA_KEY_ID).as_deref(),
            Some(kid2.as_str()),
            "agent Secret on the new key"
        );
        let bundle = cms.get("pk-trust").await.expect("trust bundle");
        let bdata = bundle.data.unwrap_or_default();
        let jwks: Jwks = serde_json::from_str(&bdata[l::DATA_JWKS]).expect("jwks");
        assert_eq!(jwks.key_ids(), vec![kid2.clone()]);
        let revoked: Vec<String> = serde_json::from_str(&bdata[l::DATA_REVOKED]).expect("revoked");
        assert_eq!(revoked, vec![kid1.clone()]);
        // No shortcut: publishDelay and overlap held across the crash.
        let delay = at(k2, l::ACTIVATED_AT) - at(k2, l::PUBLISHED_AT);
        assert!(
            delay >= chrono::Duration::seconds(PUBLISH_DELAY),
            "publishDelay skipped after {spec}: {delay}"
        );
        let held = at(k1, l::DEACTIVATED_AT) - at(k1, l::RETIRED_AT);
        assert!(
            held >= chrono::Duration::seconds(OVERLAP),
            "revoked early after {spec}: {held}"
        );
        assert!(
            at(k1, l::RETIRED_AT) >= at(k2, l::ACTIVATED_AT),
            "retired before its successor was active"
        );
        drop(second);
        ns.cleanup().await;
    }

    macro_rules! crash_tests {
        ($($name:ident: $point:literal, $nth:literal;)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_after($point, $nth).await;
            }
        )*};
    }

    crash_tests! {
        crash_after_mint: "mint", 2;
        crash_after_mark_published: "mark-published", 1;
        crash_after_bundle: "bundle", 2;
        crash_after_record_published: "record-published", 1;
        crash_after_activate: "activate", 1;
        crash_after_retire: "retire", 1;
        crash_after_hand_out: "hand-out", 2;
        crash_after_revoke: "revoke", 1;
    }

    /// Crashes the operator right after the first key's write `point` (it has three: the key
    /// Secret created active, the trust bundle, the agent Secret), restarts it, and checks the
    /// state at the crash (the bundle always before the agent Secret) and that the same key
    /// settles, with no second key.
    async fn crash_first_key(point: &str) {
        let ns = TestNamespace::new(&format!("kw-crash1-{point}")).await;
        let dir = tempfile::tempdir().expect("temp dir");
        let pks: Api<ProvisioningKey> = ns.api();
        let secrets: Api<Secret> = ns.api();
        let cms: Api<ConfigMap> = ns.api();
        let mut first = Keyward::spawn(ns.name(), Some(point), dir.path(), "first");
        create_pk(&pks, "pk", json!({}), json!({})).await;
        let status = first.exited(TIMEOUT).await;
        assert_eq!(status.signal(), Some(6), "expected an abort after {point}");

        let keys = key_secrets(&secrets, "pk").await;
        assert_eq!(keys.len(), 1, "one key Secret after {point}");
        let kid1 = kid(&keys[0]);
        assert_eq!(state(&keys[0]), "active", "created active");
        assert_eq!(annotation(&keys[0], l::TRIGGER).as_deref(), Some("Initial"));
        let bundle_kids = |cm: Option<ConfigMap>| -> Option<Vec<String>> {
            cm.map(|cm| {
                let data = cm.data.unwrap_or_default();
                serde_json::from_str::<Jwks>(&data[l::DATA_JWKS])
                    .expect("jwks")
                    .key_ids()
            })
        };
        let bundle = bundle_kids(cms.get_opt("pk-trust").await.expect("get bundle"));
        let agent = secrets.get_opt("pk").await.expect("get agent Secret");
        let seen = (bundle.clone(), agent.is_some());
        let expected = match point {
            "mint" => (None, false),
            "bundle" => (Some(vec![kid1.clone()]), false),
            "hand-out" => (Some(vec![kid1.clone()]), true),
            other => panic!("unknown point {other}"),
        };
        assert_eq!(seen, expected, "(bundle, agent Secret) after {point}");

        let second = Keyward::spawn(ns.name(), None, dir.path(), "second");
        let pk = wait_pk(&pks, "pk", "settled after the restart", is_settled).await;
        assert_eq!(
            pk.status.and_then(|s| s.current_key).map(|k| k.kid),
            Some(kid1.clone()),
            "the key minted before the crash is current"
        );
        expect_never(
            &secrets,
            &key_secret_name("pk", 2),
            "a second key",
            Duration::from_secs(2),
            is_created(),
        )
        .await;
        let agent = secrets.get("pk").await.expect("agent Secret");
        assert_eq!(data(&agent, l::DATA_KEY_ID), Some(kid1.clone()));
        let bundle = bundle_kids(cms.get_opt("pk-trust").await.expect("get bundle"));
        assert_eq!(bundle, Some(vec![kid1]));
        drop(second);
        ns.cleanup().await;
    }

    macro_rules! first_key_crash_tests {
        ($($name:ident: $point:literal;)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                crash_first_key($point).await;
            }
        )*};
    }

    first_key_crash_tests! {
        crash_after_first_key_mint: "mint";
        crash_after_first_key_bundle: "bundle";
        crash_after_first_key_hand_out: "hand-out";
    }
}

// ---------------------------------------------------------------------------------------------
// 9. Progress is derived from evidence, not from status.

/// A ProvisioningKey whose status is lost (a restore without status, a GitOps re-sync that
/// replaces the object) causes no rotation: the key Secrets are the evidence, and the status is
/// rebuilt from them. Fails if the planner ever read status or treated a missing status as
/// "no key yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_status_causes_no_rotation() {
    let ns = TestNamespace::new("kw-nostatus").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(
        &pks,
        "restored",
        json!({ l::ROTATE: "at-creation" }),
        quick_rotation(json!({ "requestToken": "t-1", "interval": "1h" })),
    )
    .await;
    let settled = wait_pk(&pks, "restored", "settled", is_settled).await;
    let kid1 = settled
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.kid.clone())
        .expect("current key");
    op.stop().await;

    // Wipe the status while the operator is down.
    pks.patch_status(
        "restored",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": null })),
    )
    .await
    .expect("wipe status");
    let wiped = pks.get("restored").await.expect("get");
    assert!(wiped.status.is_none() || wiped.status == Some(Default::default()));

    let op = Operator::start(ns.name(), Floors::none()).await;
    let rebuilt = wait_pk(&pks, "restored", "status rebuilt", is_settled).await;
    assert_eq!(
        rebuilt
            .status
            .as_ref()
            .and_then(|s| s.current_key.as_ref())
            .map(|k| k.kid.clone()),
        Some(kid1.clone()),
        "the same key is current after the status was lost"
    );
    expect_never(
        &secrets,
        &key_secret_name("restored", 2),
        "a second key minted after the status was lost",
        Duration::from_secs(3),
        |s: Option<&Secret>| s.is_some(),
    )
    .await;
    assert_eq!(key_secrets(&secrets, "restored").await.len(), 1);
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 10. Audit: one Event per transition and key, never merged across keys.

/// kube's `Recorder` merges Events with the same type, reason, action, regarding and related
/// object into one Event with a `series` and the first note only. Keyward names the key Secret
/// as `related`, so three keys give three `KeyMinted` Events, each naming its own key id. Fails if
/// the `related` object is dropped (the Events merge and two key ids are missing from the notes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_of_every_key_is_its_own_event() {
    use k8s_openapi::api::events::v1::Event;
    let ns = TestNamespace::new("kw-audit").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let events: Api<Event> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(&pks, "audited", json!({}), quick_rotation(json!({}))).await;
    wait_pk(&pks, "audited", "settled", is_settled).await;
    let mut kids = vec![kid(&key_secrets(&secrets, "audited").await[0])];
    for round in 1..=2 {
        merge(
            &pks,
            "audited",
            json!({ "metadata": { "annotations": { l::ROTATE: format!("round-{round}") } } }),
        )
        .await;
        let next = wait_obj(
            &secrets,
            &key_secret_name("audited", round + 1),
            "next key minted",
            TIMEOUT,
            |_| true,
        )
        .await;
        let new = kid(&next);
        let old: Vec<&str> = kids.iter().map(String::as_str).collect();
        wait_pk(&pks, "audited", "rotation complete", |pk| {
            rotated_to(pk, &new, &old)
        })
        .await;
        kids.push(new);
    }
    op.stop().await;

    let all = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items;
    let notes = |reason: &str| -> Vec<String> {
        all.iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("audited"))
            .map(|e| e.note.clone().unwrap_or_default())
            .collect()
    };
    // The first key is created active and handed out in the same reconcile: one KeyMinted
    // Event that records both (action MintAndHandOut), no KeyPublished or KeyActivated (no such
    // write of its own), no KeyHandedOut of its own.
    let first = all
        .iter()
        .filter(|e| e.reason.as_deref() == Some("KeyMinted"))
        .find(|e| {
            e.note
                .as_deref()
                .is_some_and(|n| n.contains(kids[0].as_str()))
        })
        .expect("the first key's KeyMinted Event");
    assert_eq!(
        first.action.as_deref(),
        Some("MintAndHandOut"),
        "{first:#?}"
    );
    assert!(
        first
            .note
            .as_deref()
            .is_some_and(|n| n.contains("handed out: Secret audited now carries")),
        "{first:#?}"
    );
    for (reason, expected) in [
        ("KeyMinted", &kids[..]),
        ("KeyPublished", &kids[1..]),
        ("KeyActivated", &kids[1..]),
        ("KeyHandedOut", &kids[1..]),
        ("KeyRevoked", &kids[..2]),
    ] {
        let notes = notes(reason);
        assert_eq!(notes.len(), expected.len(), "{reason} Events: {notes:#?}");
        for kid in expected {
            assert!(
                notes.iter().filter(|n| n.contains(kid.as_str())).count() == 1,
                "exactly one {reason} Event names {kid}: {notes:#?}"
            );
        }
    }
    // Key bytes appear in no Event: no PEM armour, no private key material.
    for e in &all {
        let note = e.note.clone().unwrap_or_default();
        assert!(!note.contains("BEGIN"), "an Event carries PEM: {note}");
    }
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 11. Graceful shutdown.

/// `keyward run` stops on SIGTERM (as the kubelet sends it) with exit status 0 after the
/// controllers drained, instead of being killed mid-write at the end of the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_the_operator_down_gracefully() {
    let ns = TestNamespace::new("kw-sigterm").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("keyward.log");
    let mut child = spawn_keyward(
        &[
            "run",
            "--namespaces",
            ns.name(),
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
        ],
        &[],
        &log,
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    keyward_testbed::eventually(
        "the controllers started",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async {
            read_log()
                .contains("keyward controllers started")
                .then_some(())
        },
    )
    .await
    .expect("operator started");
    // A working operator: it has minted and handed out a key.
    let pks: Api<ProvisioningKey> = ns.api();
    create_pk(&pks, "served", json!({}), json!({})).await;
    wait_pk(&pks, "served", "settled", is_settled).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no exit within 5 s of SIGTERM; log:\n{}",
            read_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        read_log()
    );
    let log = read_log();
    assert!(log.contains("SIGTERM received"), "log:\n{log}");
    assert!(log.contains("keyward controllers stopped"), "log:\n{log}");
    eprintln!("sigterm-to-exit: {} ms", started.elapsed().as_millis());
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 9. Ordinary cluster life: liveness under a refused spec, a squatted key Secret name.

/// The `exp` claim of the token in agent Secret `name` (and its key id).
async fn token_exp(secrets: &Api<Secret>, name: &str) -> (String, i64) {
    let s = secrets.get(name).await.expect("the agent Secret");
    let token = data(&s, l::DATA_TOKEN).expect("the agent Secret carries a token");
    let (header, claims) =
        keyward::keys::decode_token_unverified(&token).expect("the token decodes");
    (header.kid, claims.exp)
}

/// Issue row: "The spec was edited below an operator floor: the key went Invalid and the token
/// was never re-issued; it expired, so every agent lost access." Now the key reports
/// `Ready=False BelowFloor`, refuses new rotations, and keeps its token fresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_below_a_floor_keeps_serving_the_current_key() {
    let ns = TestNamespace::new("kw-floor").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let floors = Floors {
        interval: Duration::from_secs(3600),
        ..Floors::none()
    };
    let op = Operator::start(ns.name(), floors).await;
    create_pk(
        &pks,
        "floor",
        json!({}),
        json!({ "token": { "ttl": "6s" } }),
    )
    .await;
    let pk = wait_pk(&pks, "floor", "settled", is_settled).await;
    let kid1 = pk
        .status
        .and_then(|s| s.current_key)
        .map(|k| k.kid)
        .expect("a current key");

    // Edited below the floor (as a raised floor on upgrade would do).
    merge(
        &pks,
        "floor",
        json!({ "spec": { "rotation": { "interval": "1m" } } }),
    )
    .await;
    let pk = wait_pk(&pks, "floor", "Ready=False BelowFloor", |pk| {
        not_ready_because(pk, "BelowFloor")
    })
    .await;
    let msg = ready_message(&pk);
    assert!(
        msg.contains("rotation.interval") && msg.contains("still served"),
        "unclear message: {msg}"
    );

    // Two token lifetimes later the agents still hold a valid token of the same key.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let (kid, exp) = token_exp(&secrets, "floor").await;
    let now = chrono::Utc::now().timestamp();
    assert_eq!(kid, kid1, "the key changed while the spec was refused");
    assert!(
        exp > now,
        "the agents' token expired {} s ago while the spec was refused",
        now - exp
    );
    assert_eq!(
        key_secrets(&secrets, "floor").await.len(),
        1,
        "a rotation started"
    );
    let pk = pks.get("floor").await.expect("the key");
    assert!(not_ready_because(&pk, "BelowFloor"), "no longer reported");

    // Break-glass does not wait for the spec to be fixed: a valid compromisedKeys entry is
    // honoured at once (successor minted, handed out, the compromised key revoked).
    merge(
        &pks,
        "floor",
        json!({ "spec": { "compromisedKeys": [kid1.clone()] } }),
    )
    .await;
    wait_obj(
        &secrets,
        &key_secret_name("floor", 1),
        "the compromised key destroyed",
        TIMEOUT,
        |s| state(s) == "destroyed",
    )
    .await;
    wait_obj(
        &secrets,
        "floor",
        "the successor handed out",
        TIMEOUT,
        |s| data(s, l::DATA_KEY_ID).is_some_and(|k| k != kid1),
    )
    .await;

    // Fixing the spec makes it Ready again.
    merge(
        &pks,
        "floor",
        json!({ "spec": { "rotation": { "interval": "2h" } } }),
    )
    .await;
    wait_pk(&pks, "floor", "settled again", is_settled).await;
    op.stop().await;
    ns.cleanup().await;
}

/// Issue row: "A Secret named `<pk>-k1`, owned by someone else, already existed: 948
/// conflicting POSTs in 20 s, no condition, no Event." Now: `Ready=False NameTaken` naming the
/// object, retries with bounded backoff, the foreign Secret untouched, and the key minted once
/// the name is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_key_secret_name_is_reported_and_retried_with_backoff() {
    let ns = TestNamespace::new("kw-squat").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let squatter = secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some(key_secret_name("squat", 1)),
                    ..Default::default()
                },
                data: Some([("x".to_string(), ByteString(b"theirs".to_vec()))].into()),
                ..Default::default()
            },
        )
        .await
        .expect("create the squatting Secret");
    let op = Operator::start(ns.name(), Floors::none()).await;
    let before = op.writes();
    create_pk(&pks, "squat", json!({}), json!({})).await;
    let pk = wait_pk(&pks, "squat", "Ready=False NameTaken", |pk| {
        not_ready_because(pk, "NameTaken")
    })
    .await;
    let msg = ready_message(&pk);
    assert!(
        msg.contains("squat-k1"),
        "the message does not name the object: {msg}"
    );

    tokio::time::sleep(Duration::from_secs(20)).await;
    let writes = op.writes() - before;
    println!("writes in the first 20 s with a squatted key Secret name: {writes}");
    assert!(
        writes <= 25,
        "{writes} writes in 20 s: the retry is not backed off"
    );
    let s = secrets.get("squat-k1").await.expect("the squatting Secret");
    assert_eq!(
        s.resource_version(),
        squatter.resource_version(),
        "the foreign Secret was written"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let warned = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .iter()
        .any(|e| {
            e.reason.as_deref() == Some("NameTaken")
                && e.note.as_deref().is_some_and(|n| n.contains("squat-k1"))
        });
    assert!(warned, "no NameTaken Warning Event");

    // The name is freed: the key is minted at the next retry (bounded by the backoff cap).
    secrets
        .delete("squat-k1", &DeleteParams::default())
        .await
        .expect("delete the squatting Secret");
    wait_obj(
        &pks,
        "squat",
        "settled once the name is free",
        Duration::from_secs(100),
        is_settled,
    )
    .await;
    op.stop().await;
    ns.cleanup().await;
}

/// `secretName` set on a live key that had none (its default name is the key's name) is refused
/// by the API server: a CEL rule at the root compares the effective names (`tests/plane/cel.rs`).
/// Writing the default names explicitly, as a GitOps tool that renders defaults does, is no
/// change: the server accepts it and the operator agrees (the key stays Ready on the same
/// Secret, no `NameImmutable`). The operator's own refusal of a changed name, for an object
/// that reached it without the rule, is unit-tested (`an_explicit_default_name_is_no_change`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_changed_on_a_live_key_is_refused_and_the_default_may_be_written() {
    let ns = TestNamespace::new("kw-rename").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    create_pk(&pks, "rename", json!({}), json!({})).await;
    wait_pk(&pks, "rename", "settled", is_settled).await;
    let (kid1, _) = token_exp(&secrets, "rename").await;

    let refused = pks
        .patch(
            "rename",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "secretName": "agents-b" } })),
        )
        .await;
    match refused {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("secretName is immutable"),
                "{}",
                s.message
            );
        }
        other => panic!("a name set on a live key was not refused: {other:?}"),
    }

    let pk = merge(
        &pks,
        "rename",
        json!({ "spec": { "secretName": "rename", "trustBundle": { "configMapName": "rename-trust" } } }),
    )
    .await;
    let generation = pk.metadata.generation;
    let pk = wait_pk(&pks, "rename", "settled on the explicit defaults", |pk| {
        is_settled(pk) && pk.status.as_ref().and_then(|s| s.observed_generation) == generation
    })
    .await;
    assert!(!not_ready_because(&pk, "NameImmutable"));
    let (kid, _) = token_exp(&secrets, "rename").await;
    assert_eq!(kid, kid1, "the key changed");
    assert!(
        secrets.get_opt("agents-b").await.expect("get").is_none(),
        "a Secret was written under the refused name"
    );
    merge(
        &pks,
        "rename",
        json!({ "spec": { "secretName": null, "trustBundle": null } }),
    )
    .await;
    wait_pk(&pks, "rename", "settled again", is_settled).await;
    op.stop().await;
    ns.cleanup().await;
}

/// Issue 18: an invalid `secretTemplate` (here a key Keyward owns and a label value the API
/// server refuses) made every write of the agent Secret fail with 422, in a loop, until the
/// token expired. Now the key reports `Ready=False InvalidSpec` naming the entry, refuses new
/// rotations, and keeps refreshing the token with the template's valid entries only: not one
/// 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_secret_template_keeps_serving_the_current_key() {
    use keyward::client::ResponseCode;
    let ns = TestNamespace::new("kw-template").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let writes = keyward::controller::WriteCounter::default();
    let obs = keyward::controller::Observability::new(&writes);
    let op = Operator::start_with(ns.name(), Floors::none(), writes.clone(), obs).await;
    let refusals = |w: &keyward::controller::WriteCounter| -> u64 {
        w.responses()
            .iter()
            .filter(|((_, code), _)| *code == ResponseCode::Status(422))
            .map(|(_, n)| n)
            .sum()
    };
    create_pk(
        &pks,
        "tmpl",
        json!({}),
        json!({ "token": { "ttl": "6s" }, "secretTemplate": { "labels": { "team": "a" } } }),
    )
    .await;
    let pk = wait_pk(&pks, "tmpl", "settled", is_settled).await;
    let kid1 = pk
        .status
        .and_then(|s| s.current_key)
        .map(|k| k.kid)
        .expect("a current key");
    let before = refusals(&writes);

    merge(
        &pks,
        "tmpl",
        json!({ "spec": { "secretTemplate": { "labels": {
            "team": "b",
            "tier": "not a label value!",
            "keyward.dev/provisioning-key": "other",
        } } } }),
    )
    .await;
    let pk = wait_pk(&pks, "tmpl", "Ready=False InvalidSpec", |pk| {
        not_ready_because(pk, "InvalidSpec")
    })
    .await;
    let msg = ready_message(&pk);
    assert!(
        msg.contains("secretTemplate.labels")
            && msg.contains("keyward.dev/provisioning-key")
            && msg.contains("still served"),
        "unclear message: {msg}"
    );

    // Two token lifetimes later the agents still hold a valid token of the same key, and the
    // agent Secret carries the template's valid entries only.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let (kid, exp) = token_exp(&secrets, "tmpl").await;
    let now = chrono::Utc::now().timestamp();
    assert_eq!(kid, kid1, "the key changed while the spec was refused");
    assert!(
        exp > now,
        "the agents' token expired {} s ago while the template was refused",
        now - exp
    );
    let agent = secrets.get("tmpl").await.expect("the agent Secret");
    assert_eq!(
        agent.labels().get(l::PROVISIONING_KEY).map(String::as_str),
        Some("tmpl"),
        "the template overwrote Keyward's label"
    );
    assert_eq!(agent.labels().get("team").map(String::as_str), Some("b"));
    assert!(!agent.labels().contains_key("tier"));
    assert_eq!(
        refusals(&writes) - before,
        0,
        "writes refused with 422 while the template was invalid: {:?}",
        writes.responses()
    );
    assert_eq!(
        key_secrets(&secrets, "tmpl").await.len(),
        1,
        "a rotation started"
    );
    let pk = pks.get("tmpl").await.expect("the key");
    assert!(not_ready_because(&pk, "InvalidSpec"), "no longer reported");

    // Fixing the template makes it Ready again.
    merge(
        &pks,
        "tmpl",
        json!({ "spec": { "secretTemplate": { "labels": {
            "tier": null,
            "keyward.dev/provisioning-key": null,
        } } } }),
    )
    .await;
    wait_pk(&pks, "tmpl", "settled again", is_settled).await;
    op.stop().await;
    ns.cleanup().await;
}

/// The kids of the trust bundle's `jwks.json` and `revoked.json`.
async fn bundle_kids(cms: &Api<ConfigMap>, name: &str) -> (Vec<String>, Vec<String>) {
    let cm = cms.get(name).await.expect("the trust bundle");
    let data = cm.data.unwrap_or_default();
    let jwks: Jwks = serde_json::from_str(&data[l::DATA_JWKS]).expect("JWKS");
    let revoked: Vec<String> = serde_json::from_str(&data[l::DATA_REVOKED]).expect("revoked list");
    (jwks.key_ids(), revoked)
}

/// Tampered key Secrets: edited labels are restored from the evidence (a Warning says so); a
/// deleted key Secret never takes its key out of the trust bundle (it shows as `Unrecorded`
/// until listed in `compromisedKeys`) and never frees its sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_key_secrets_never_drop_a_trusted_key() {
    let ns = TestNamespace::new("kw-tamper").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    let rotation = json!({ "publishDelay": "1s", "overlap": "0s", "minInterval": "0s" });
    create_pk(&pks, "tamper", json!({}), json!({ "rotation": rotation })).await;
    wait_pk(&pks, "tamper", "settled", is_settled).await;

    // 1. The active key labelled `revoked` (its private key is still there): restored.
    merge(
        &secrets,
        "tamper-k1",
        json!({ "metadata": { "labels": { l::KEY_STATE: "revoked" } } }),
    )
    .await;
    wait_obj(&secrets, "tamper-k1", "label restored", TIMEOUT, |s| {
        state(s) == "active"
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    let repaired = events
        .list(&Default::default())
        .await
        .expect("list Events")
        .items
        .iter()
        .any(|e| e.reason.as_deref() == Some("KeySecretRepaired"));
    assert!(repaired, "no KeySecretRepaired Warning");

    // 2. One rotation: k2 current, k1 revoked.
    merge(
        &pks,
        "tamper",
        json!({ "metadata": { "annotations": { l::ROTATE: "1" } } }),
    )
    .await;
    let k2 = wait_obj(&secrets, "tamper-k2", "k2 current", TIMEOUT, |s| {
        state(s) == "active"
    })
    .await;
    let kid2 = kid(&k2);
    wait_obj(&secrets, "tamper-k1", "k1 revoked", TIMEOUT, |s| {
        state(s) == "deactivated"
    })
    .await;

    // 3. The current key's Secret deleted: its key id stays trusted, a replacement is minted
    //    under a new sequence number (3, never 2 again) and handed out.
    secrets
        .delete("tamper-k2", &DeleteParams::default())
        .await
        .expect("delete the current key Secret");
    wait_obj(&secrets, "tamper-k3", "replacement active", TIMEOUT, |s| {
        state(s) == "active"
    })
    .await;
    assert!(
        secrets.get_opt("tamper-k2").await.expect("get").is_none(),
        "sequence number 2 was reused"
    );
    let pk = wait_pk(&pks, "tamper", "k2 shown as unrecorded", |pk| {
        pk.status.as_ref().is_some_and(|s| {
            s.trusted_keys
                .iter()
                .any(|k| k.kid == kid2 && k.state == "Unrecorded")
        })
    })
    .await;
    assert!(pk.status.is_some());
    let (trusted, _) = bundle_kids(&cms, "tamper-trust").await;
    assert!(
        trusted.contains(&kid2),
        "the deleted key's id left the bundle: {trusted:?}"
    );

    // 4. Listed as compromised, the unrecorded key is revoked through the bundle.
    merge(
        &pks,
        "tamper",
        json!({ "spec": { "compromisedKeys": [kid2.clone()] } }),
    )
    .await;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (trusted, revoked) = bundle_kids(&cms, "tamper-trust").await;
        if !trusted.contains(&kid2) && revoked.contains(&kid2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kid2 never revoked: {trusted:?} {revoked:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 5. The current key's private key removed (no revocation recorded): no token can be signed
    //    with it, so a replacement is rotated in; the agents are never left without a key.
    merge(
        &secrets,
        "tamper-k3",
        json!({ "data": { l::DATA_PRIVATE_KEY: null } }),
    )
    .await;
    let k4 = wait_obj(&secrets, "tamper-k4", "replacement active", TIMEOUT, |s| {
        state(s) == "active"
    })
    .await;
    assert_eq!(annotation(&k4, l::TRIGGER).as_deref(), Some("Replacement"));
    wait_obj(
        &secrets,
        "tamper",
        "the replacement handed out",
        TIMEOUT,
        |s| data(s, l::DATA_KEY_ID).as_deref() == Some(kid(&k4).as_str()),
    )
    .await;
    op.stop().await;
    ns.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Time the test steers: a manual clock in the operator instead of a wait.

/// An hour-long `publishDelay` and `overlap`, on the operator's clock: the rotation publishes
/// the new key and holds it (not active, not handed out) while the clock is short of the delay,
/// activates and hands it out only once the clock passes it, and revokes the old key only after
/// the overlap. The test moves a `ManualClock` and pokes the key (an unrelated annotation) instead of
/// waiting two hours; nothing in it is about real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_delay_and_overlap_hold_on_the_operators_clock() {
    use keyward::time::{ManualClock, SharedClock};
    let ns = TestNamespace::new("kw-clock").await;
    let clock = std::sync::Arc::new(ManualClock::new(chrono::Utc::now()));
    let shared = SharedClock(clock.clone());
    let writes = keyward::controller::WriteCounter::default();
    let obs = keyward::controller::Observability::new(&writes);
    let op = Operator::start_configured(ns.name(), Floors::none(), writes, obs, move |c| {
        c.clock = shared
    })
    .await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let rotation =
        json!({ "rotation": { "publishDelay": "1h", "overlap": "1h", "minInterval": "0s" } });
    create_pk(&pks, "slow", json!({}), rotation).await;
    let first = wait_pk(&pks, "slow", "settled on the first key", is_settled).await;
    let kid1 = first
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|c| c.kid.clone())
        .expect("a current key");
    let agent_kid = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(l::DATA_KEY_ID))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
    };
    let poke =
        |n: u32| json!({ "metadata": { "annotations": { "example.com/poke": n.to_string() } } });

    merge(
        &pks,
        "slow",
        json!({ "metadata": { "annotations": { l::ROTATE: "now" } } }),
    )
    .await;
    // Timestamps are kept to the second: the request is taken on the operator's next second.
    clock.advance(Duration::from_secs(1));
    let k2 = key_secret_name("slow", 2);
    let published = wait_obj(&secrets, &k2, "the new key published", TIMEOUT, |s| {
        annotation(s, l::PUBLISHED_AT).is_some()
    })
    .await;
    let kid2 = kid(&published);

    // 59 minutes on the operator's clock: still held.
    clock.advance(Duration::from_secs(59 * 60));
    merge(&pks, "slow", poke(1)).await;
    expect_never(
        &secrets,
        &k2,
        "activation before publishDelay on the operator's clock",
        Duration::from_secs(3),
        |s: Option<&Secret>| s.is_some_and(|s| state(s) != "published"),
    )
    .await;
    let agent = secrets.get("slow").await.expect("agent Secret");
    assert_eq!(agent_kid(&agent).as_deref(), Some(kid1.as_str()));

    // Past the delay: activated and handed out; the old key is held for the overlap.
    clock.advance(Duration::from_secs(2 * 60));
    merge(&pks, "slow", poke(2)).await;
    wait_obj(&secrets, "slow", "the new key handed out", TIMEOUT, |s| {
        agent_kid(s).as_deref() == Some(kid2.as_str())
    })
    .await;
    let k1 = key_secret_name("slow", 1);
    expect_never(
        &secrets,
        &k1,
        "revocation before the overlap on the operator's clock",
        Duration::from_secs(3),
        |s: Option<&Secret>| {
            s.is_some_and(|s| matches!(state(s).as_str(), "deactivated" | "destroyed"))
        },
    )
    .await;

    // Past the overlap: the old key is revoked.
    clock.advance(Duration::from_secs(61 * 60));
    merge(&pks, "slow", poke(3)).await;
    wait_pk(&pks, "slow", "rotation to k2 complete", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    op.stop().await;
    ns.cleanup().await;
}

/// `rotation.window` on the real plane (issue "The key's whole life", part 4): a key whose
/// 3-second interval has long passed does not rotate while its window is closed, and
/// `status.nextRotationAt` shows the window's next opening; a request (the rotate annotation)
/// ignores the window; once the window is open (edited to include now) the scheduled rotation
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_rotation_waits_for_its_window_and_a_request_does_not() {
    let ns = TestNamespace::new("kw-window").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let hm = |t: chrono::DateTime<chrono::Utc>| t.format("%H:%M").to_string();
    let now = chrono::Utc::now();
    // Closed: opens in 10 minutes (UTC), for one minute.
    let closed = json!({
        "start": hm(now + chrono::Duration::minutes(10)),
        "end": hm(now + chrono::Duration::minutes(11)),
    });
    create_pk(
        &pks,
        "win",
        json!({}),
        quick_rotation(json!({ "interval": "3s", "window": closed })),
    )
    .await;
    let pk = wait_pk(&pks, "win", "settled", is_settled).await;
    let next = pk
        .status
        .as_ref()
        .and_then(|s| s.next_rotation_at.clone())
        .expect("nextRotationAt");
    let next = chrono::DateTime::parse_from_rfc3339(&next).expect("a time");
    assert!(
        next > now + chrono::Duration::minutes(9),
        "nextRotationAt {next} is the window's opening, not the interval's due time"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        key_secrets(&secrets, "win").await.len(),
        1,
        "rotated outside its window"
    );
    // A request ignores the window.
    merge(
        &pks,
        "win",
        json!({ "metadata": { "annotations": { l::ROTATE: "asked" } } }),
    )
    .await;
    wait_obj(
        &secrets,
        &key_secret_name("win", 2),
        "requested key",
        TIMEOUT,
        |s| state(s) == "active",
    )
    .await;
    // Open now: the scheduled rotation starts (the 3 s interval has passed by then).
    let now = chrono::Utc::now();
    merge(
        &pks,
        "win",
        json!({ "spec": { "rotation": { "window": {
            "start": hm(now - chrono::Duration::minutes(1)),
            "end": hm(now + chrono::Duration::minutes(30)),
        } } } }),
    )
    .await;
    wait_obj(
        &secrets,
        &key_secret_name("win", 3),
        "scheduled key",
        TIMEOUT,
        |s| annotation(s, l::TRIGGER).as_deref() == Some("Interval"),
    )
    .await;
    drop(op);
    ns.cleanup().await;
}

/// A key last reconciled by a version that kept the trust record in the annotation
/// `keyward.dev/trust-record`: the operator copies the record into status as it is and keeps
/// the annotation while the two agree (a verifier of that version still trusts the key while an
/// upgrade rolls); the next record change (a rotation) removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_in_the_earlier_annotation_moves_into_status() {
    use keyward::trust_record::{ANNOTATION, TrustRecord};
    let ns = TestNamespace::new("kw-legacy-record").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let op = Operator::start(ns.name(), Floors::none()).await;
    let rotation = json!({ "publishDelay": "1s", "overlap": "0s", "minInterval": "0s" });
    create_pk(&pks, "old", json!({}), json!({ "rotation": rotation })).await;
    let pk = wait_pk(&pks, "old", "settled", is_settled).await;
    let text = pk
        .status
        .and_then(|s| s.trust_record)
        .expect("the record is in status");
    // As an earlier version left it: the record in the annotation, none in status (the test
    // runs as the operator's identity, and no policy is installed here).
    pks.patch_status(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "trustRecord": null } })),
    )
    .await
    .expect("remove the record from status");
    merge(
        &pks,
        "old",
        json!({ "metadata": { "annotations": { ANNOTATION: text } } }),
    )
    .await;
    let pk = wait_pk(&pks, "old", "the record copied into status", |pk| {
        pk.status.as_ref().and_then(|s| s.trust_record.as_deref()) == Some(text.as_str())
    })
    .await;
    assert_eq!(
        pk.annotations().get(ANNOTATION),
        Some(&text),
        "the annotation is kept while it agrees with status"
    );
    // A rotation changes the record: written into status, and the stale annotation removed.
    merge(
        &pks,
        "old",
        json!({ "metadata": { "annotations": { l::ROTATE: "1" } } }),
    )
    .await;
    let pk = wait_pk(
        &pks,
        "old",
        "annotation removed after a record change",
        |pk| {
            !pk.annotations().contains_key(ANNOTATION)
                && TrustRecord::of(pk)
                    .and_then(Result::ok)
                    .is_some_and(|r| r.kids.len() == 2)
        },
    )
    .await;
    let record = TrustRecord::of(&pk)
        .expect("a record")
        .expect("a readable record");
    let before = TrustRecord::parse(&text).expect("the first record");
    assert!(
        before.kids.keys().all(|k| record.has(k)),
        "the first key id left the record before its revocation: {record:?}"
    );
    op.stop().await;
    ns.cleanup().await;
}
