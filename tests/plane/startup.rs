//! Starting while the API server is out of reach (issue 20, part 1). `keyward run` never exits
//! for the API server's absence: it serves `/healthz` (live) and `/readyz` (not ready, with the
//! reason), retries with capped, jittered backoff, and reconciles soon after the API server
//! answers. The API server "returns" here as a loopback proxy to the plane that opens on the
//! port the operator's kubeconfig names, so the shared plane keeps running for the other tests.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on `127.0.0.1:port`: the status code and the body, or `None` when nothing answers.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Some((code, body))
}

/// Forwards every connection on `listener` to `upstream` until the task is dropped.
async fn forward(listener: TcpListener, upstream: String) {
    while let Ok((mut client, _)) = listener.accept().await {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Ok(mut server) = TcpStream::connect(&upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_without_the_api_server_it_waits_live_then_reconciles() {
    let ns = TestNamespace::new("kw-startup").await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The plane's kubeconfig, pointed at a loopback port where nothing listens yet.
    let plane = std::fs::read_to_string(keyward_testbed::kubeconfig_path()).expect("kubeconfig");
    let server = plane
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("a server in the kubeconfig")
        .to_string();
    let upstream = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let api_port = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        plane.replace(&server, &format!("https://127.0.0.1:{api_port}")),
    )
    .expect("write kubeconfig");
    let health_port = free_port();
    let log = dir.path().join("keyward.log");
    let out = std::fs::File::create(&log).expect("log file");
    // `KEYWARD_BIN_UNDER_TEST`: another build (an older commit's, to show the test failing).
    let bin = std::env::var_os("KEYWARD_BIN_UNDER_TEST")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keyward").into());
    let child = Command::new(bin)
        .args(["run", "--namespaces", ns.name()])
        .args(["--health-address", &format!("127.0.0.1:{health_port}")])
        .args(["--metrics-address", "127.0.0.1:0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,kube=off")
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start keyward");
    let mut child = KillOnDrop(child);
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // Out of reach for 3 s: still running, live, not ready, and it says why.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "keyward exited while the API server was out of reach:\n{}",
        show_log()
    );
    assert_eq!(get(health_port, "/healthz").await.map(|r| r.0), Some(200));
    let (code, why) = get(health_port, "/readyz").await.expect("/readyz answers");
    assert_eq!(code, 503, "{why}");
    assert!(
        why.contains("waiting at startup") && why.contains("provisioningkeys.keyward.dev"),
        "/readyz: {why}"
    );

    // A key to reconcile, created while the operator cannot see it.
    let pks: Api<ProvisioningKey> = ns.api();
    create_pk(&pks, "late", json!({}), json!({})).await;

    // The API server "returns": ready, and the key reconciled, within 10 s.
    let proxy = tokio::spawn(forward(
        TcpListener::bind(("127.0.0.1", api_port))
            .await
            .expect("bind the API port"),
        upstream,
    ));
    let back = Instant::now();
    loop {
        if get(health_port, "/readyz")
            .await
            .is_some_and(|r| r.0 == 200)
        {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "not ready 10 s after the API server answered:\n{}",
            show_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "after the API server answered: ready in {:?}",
        back.elapsed()
    );
    let secrets: Api<Secret> = ns.api();
    wait_obj(
        &secrets,
        "late",
        "the agent Secret of a key created during the outage",
        Duration::from_secs(10),
        |_| true,
    )
    .await;
    let reconciled = back.elapsed();
    eprintln!("after the API server answered: reconciled in {reconciled:?}");
    assert!(
        reconciled < Duration::from_secs(10),
        "first reconcile {reconciled:?} after the API server answered"
    );
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "{}",
        show_log()
    );
    drop(child);
    proxy.abort();
    ns.cleanup().await;
}
