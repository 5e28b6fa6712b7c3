//! The HTTP endpoints against the real local control plane (`e2e/cluster.sh up`): `/metrics`
//! follows a rotation (counters by trigger and result, revocations by kind, the per-key gauges,
//! API responses by verb and code) and drops a deleted key's series; `/readyz` is 503 until the
//! watch caches synced, then 200; `/healthz` is 200 throughout. The last test runs the real
//! binary, which logs the addresses it bound.

use std::time::Duration;

use crate::common::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward::controller::{Observability, WriteCounter};
use keyward::http::Servers;
use keyward::labels as l;
use keyward::rotation::Floors;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;

/// `GET http://{addr}{path}`: status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// The value of the sample `series` (`name{labels}` exactly as exported), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the exposition satisfies `check`; returns it.
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    keyward_testbed::eventually(what, TIMEOUT, Duration::from_millis(100), || async {
        let (status, body) = get(addr, "/metrics").await;
        (status == 200 && check(&body)).then_some(body)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `exp` of the token in agent Secret `name`.
async fn token_exp(secrets: &Api<Secret>, name: &str) -> f64 {
    let s = secrets.get(name).await.expect("the agent Secret");
    let token = data(&s, l::DATA_TOKEN).expect("a token");
    let claims = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("base64url")).expect("JSON");
    claims["exp"].as_f64().expect("exp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_probes_follow_a_rotation() {
    let ns = TestNamespace::new("kw-metrics").await;
    let writes = WriteCounter::default();
    let obs = Observability::new(&writes);
    let servers = Servers::start(
        "127.0.0.1:0",
        "127.0.0.1:0",
        obs.metrics.clone(),
        obs.health.clone(),
    )
    .await
    .expect("bind the endpoints");
    let (m, h) = (
        servers.metrics.expect("metrics on"),
        servers.health.expect("health on"),
    );
    // Before the controllers run: alive, not ready.
    assert_eq!(get(h, "/healthz").await.0, 200);
    let (status, why) = get(h, "/readyz").await;
    assert_eq!((status, why.as_str()), (503, "caches not synced yet\n"));

    let op = Operator::start_with(ns.name(), Floors::none(), writes, obs.clone()).await;
    keyward_testbed::eventually(
        "/readyz 200",
        TIMEOUT,
        Duration::from_millis(50),
        || async { (get(h, "/readyz").await.0 == 200).then_some(()) },
    )
    .await
    .expect("ready once the caches synced");

    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let n = ns.name();
    let series =
        |metric: &str, extra: &str| format!(r#"{metric}{{namespace="{n}",name="m"{extra}}}"#);
    let ready_true = series("keyward_key_ready_status", r#",condition="True""#);
    let expiration = series("keyward_key_expiration_timestamp_seconds", "");
    create_pk(
        &pks,
        "m",
        json!({}),
        json!({ "rotation": { "interval": "24h", "publishDelay": "1s", "overlap": "1s", "minInterval": "0s" } }),
    )
    .await;
    wait_pk(&pks, "m", "settled on the first key", is_settled).await;
    let exp1 = token_exp(&secrets, "m").await;
    let text = scrape_until(m, "the first key's gauges", |t| {
        value(t, &ready_true) == Some(1.0) && value(t, &expiration) == Some(exp1)
    })
    .await;
    for (s, v) in [
        (
            series("keyward_key_ready_status", r#",condition="False""#),
            0.0,
        ),
        (series("keyward_rotation_stalled", ""), 0.0),
        (series("keyward_agents_total", ""), 0.0),
        (series("keyward_agents_confirmed", ""), 0.0),
        (
            r#"keyward_rotations_total{trigger="Initial",result="started"}"#.into(),
            1.0,
        ),
        ("keyward_leader".into(), 1.0),
    ] {
        assert_eq!(value(&text, &s), Some(v), "{s} in\n{text}");
    }
    let next = value(
        &text,
        &series("keyward_key_next_rotation_timestamp_seconds", ""),
    )
    .expect("a rotation is scheduled");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now + 23.0 * 3600.0..now + 25.0 * 3600.0).contains(&next),
        "next rotation {next} about 24h from {now}"
    );
    assert!(!text.contains(r#"trigger="Annotation""#), "{text}");

    // A rotation by annotation: started, then completed with the old key's revocation; the
    // token handed out (and its expiry) changes.
    let kid1 = kid(&secrets.get(&key_secret("m", 1)).await.expect("k1"));
    merge(
        &pks,
        "m",
        json!({ "metadata": { "annotations": { l::ROTATE: "now" } } }),
    )
    .await;
    let kid2 = kid(
        &wait_obj(&secrets, &key_secret("m", 2), "second key", TIMEOUT, |_| {
            true
        })
        .await,
    );
    wait_pk(&pks, "m", "rotated to k2", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    let exp2 = token_exp(&secrets, "m").await;
    assert!(exp2 > exp1, "a new token was handed out");
    let text = scrape_until(m, "the rotation's counters and gauges", |t| {
        value(
            t,
            r#"keyward_rotations_total{trigger="Annotation",result="completed"}"#,
        ) == Some(1.0)
            && value(t, &expiration) == Some(exp2)
    })
    .await;
    for (s, v) in [
        (
            r#"keyward_rotations_total{trigger="Annotation",result="started"}"#,
            1.0,
        ),
        (r#"keyward_revocations_total{kind="normal"}"#, 1.0),
    ] {
        assert_eq!(value(&text, s), Some(v), "{s} in\n{text}");
    }
    assert_eq!(value(&text, &ready_true), Some(1.0), "{text}");
    assert!(
        !text.contains(r#"kind="emergency"} 1"#) && !text.contains("result=\"stalled\""),
        "{text}"
    );
    assert!(
        value(
            &text,
            r#"keyward_reconcile_total{controller="provisioningkey"}"#
        )
        .is_some_and(|v| v >= 3.0),
        "{text}"
    );
    assert!(
        text.contains(r#"keyward_reconcile_duration_seconds_count{controller="provisioningkey"}"#),
        "{text}"
    );
    for verb in ["create", "patch", "get"] {
        assert!(
            value(
                &text,
                &format!(r#"keyward_kube_requests_total{{verb="{verb}",code="200"}}"#)
            )
            .or_else(|| value(
                &text,
                &format!(r#"keyward_kube_requests_total{{verb="{verb}",code="201"}}"#)
            ))
            .is_some_and(|v| v >= 1.0),
            "{verb} in\n{text}"
        );
    }
    // No key id anywhere in the exposition.
    for kid in [&kid1, &kid2] {
        assert!(!text.contains(kid.as_str()), "{kid} in\n{text}");
    }

    // A deleted key's series disappear.
    pks.delete("m", &DeleteParams::default())
        .await
        .expect("delete");
    let needle = format!(r#"namespace="{n}",name="m""#);
    let text = scrape_until(m, "the deleted key's series gone", |t| !t.contains(&needle)).await;
    assert!(text.contains("keyward_revocations_total"), "{text}");

    // Controllers stopped: not ready, not leading, still alive.
    op.stop().await;
    assert_eq!(get(h, "/readyz").await.0, 503);
    assert_eq!(get(h, "/healthz").await.0, 200);
    assert_eq!(
        value(&get(m, "/metrics").await.1, "keyward_leader"),
        Some(0.0)
    );
    servers.stop().await;
    ns.cleanup().await;
}

fn key_secret(pk: &str, seq: u32) -> String {
    keyward::controller::provisioning_key::key_secret_name(pk, seq)
}

/// The binary binds `--metrics-address` and `--health-address` with port 0, logs the bound
/// addresses, serves them while it runs, and stops them on SIGTERM with exit status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_metrics_and_probes_on_the_addresses_it_logs() {
    let ns = TestNamespace::new("kw-metrics-bin").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("keyward.log");
    let mut child = crate::common::spawn_keyward(
        &[
            "run",
            "--namespaces",
            ns.name(),
            "--log-format",
            "json",
            "--metrics-address",
            "127.0.0.1:0",
        ],
        &[("KEYWARD_HEALTH_ADDRESS", "127.0.0.1:0")],
        &log,
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let bound = |message: &str| {
        read_log().lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == message).then(|| v["address"].as_str()?.parse().ok())?
        })
    };
    let (m, h): (std::net::SocketAddr, std::net::SocketAddr) = keyward_testbed::eventually(
        "both addresses logged",
        TIMEOUT,
        Duration::from_millis(50),
        || async {
            Some((
                bound("metrics server listening")?,
                bound("health server listening")?,
            ))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", read_log()));
    assert_ne!(m.port(), 0);
    assert_eq!(get(h, "/healthz").await, (200, "ok\n".into()));
    keyward_testbed::eventually(
        "/readyz 200",
        TIMEOUT,
        Duration::from_millis(50),
        || async { (get(h, "/readyz").await.0 == 200).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", read_log()));
    let (status, text) = get(m, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(value(&text, "keyward_leader"), Some(1.0), "{text}");
    assert!(
        text.contains(&format!(
            r#"keyward_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(
        value(
            &text,
            r#"keyward_kube_requests_total{verb="list",code="200"}"#
        )
        .is_some_and(|v| v >= 1.0),
        "{text}"
    );

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let started = std::time::Instant::now();
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
    assert!(status.success(), "exit {status}; log:\n{}", read_log());
    assert!(
        reqwest::get(format!("http://{h}/healthz")).await.is_err(),
        "the servers stop with the process"
    );
    ns.cleanup().await;
}
