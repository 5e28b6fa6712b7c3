//! The API server out of reach (issue 20, parts 1 and 2). `keyward run` started without it never
//! exits: it serves `/healthz` (live) and `/readyz` (not ready, with the reason), retries with
//! capped, jittered backoff, and reconciles soon after the API server answers. An outage in the
//! middle of a rotation is recovered within seconds: the watches retry at most 4 s apart, and
//! the first event after the outage clears every object's backoff and requeues the failed ones.
//! The API server goes away and comes back here as a loopback proxy to the plane, on the port
//! the operator's kubeconfig names (closing it drops every connection), so the shared plane keeps
//! running for the other tests.

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

/// A loopback proxy to the plane's API server that can be closed (every connection dropped,
/// new ones refused) and opened again on the same port.
struct Proxy {
    port: u16,
    upstream: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    fn new(port: u16, upstream: String) -> Self {
        Proxy {
            port,
            upstream,
            tasks: Vec::new(),
            conns: Default::default(),
        }
    }

    async fn open(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("bind the API port");
        let (upstream, conns) = (self.upstream.clone(), self.conns.clone());
        self.tasks.push(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                conns.lock().expect("lock").push(conn);
            }
        }));
    }

    fn close(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
}

/// The plane's kubeconfig, pointed at `127.0.0.1:<port>`, written to `dir`; and the plane's own
/// API server address.
fn kubeconfig_via(port: u16, dir: &std::path::Path) -> (std::path::PathBuf, String) {
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
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        plane.replace(&server, &format!("https://127.0.0.1:{port}")),
    )
    .expect("write kubeconfig");
    (path, upstream)
}

/// Starts `keyward run` on `ns` with `kubeconfig`, its health endpoints on `health_port`.
fn spawn_run(
    ns: &str,
    kubeconfig: &std::path::Path,
    health_port: u16,
    log: &std::path::Path,
) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log file");
    // `KEYWARD_BIN_UNDER_TEST`: another build (an older commit's, to show the test failing).
    let bin = std::env::var_os("KEYWARD_BIN_UNDER_TEST")
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_keyward").into());
    let child = Command::new(bin)
        .args(["run", "--namespaces", ns])
        .args(["--health-address", &format!("127.0.0.1:{health_port}")])
        .args(["--metrics-address", "127.0.0.1:0"])
        .args([
            "--min-publish-delay",
            "0s",
            "--min-overlap",
            "0s",
            "--min-min-interval",
            "0s",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("KEYWARD_TEST_RUST_LOG").unwrap_or_else(|_| "info,kube=off".into()),
        )
        .stdout(out.try_clone().expect("clone"))
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start keyward");
    KillOnDrop(child)
}

/// An outage of the API server in the middle of a rotation (`KEYWARD_TEST_OUTAGE_SECS`, 5 s by
/// default; the long form measures 30 s and 120 s): the rotation goes on within 10 s of the
/// API server's return. To see why it was slow: `KEYWARD_TEST_SHOW_LOG=1` prints the operator's
/// log, at the level `KEYWARD_TEST_RUST_LOG` sets (default `info,kube=off`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_rotation_is_recovered_within_seconds() {
    let outage = std::env::var("KEYWARD_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_secs);
    let ns = TestNamespace::new("kw-outage").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let (kubeconfig, upstream) = kubeconfig_via(port, dir.path());
    let mut proxy = Proxy::new(port, upstream);
    proxy.open().await;
    let log = dir.path().join("keyward.log");
    let mut child = spawn_run(ns.name(), &kubeconfig, free_port(), &log);
    let show_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let rotation =
        json!({ "rotation": { "publishDelay": "3s", "overlap": "0s", "minInterval": "0s" } });
    create_pk(&pks, "r", json!({}), rotation).await;
    wait_pk(&pks, "r", "settled on the first key", is_settled).await;
    merge(
        &pks,
        "r",
        json!({ "metadata": { "annotations": { keyward::labels::ROTATE: "now" } } }),
    )
    .await;
    let k2 = keyward::controller::provisioning_key::key_secret_name("r", 2);
    let published = wait_obj(&secrets, &k2, "the new key published", TIMEOUT, |s| {
        annotation(s, keyward::labels::PUBLISHED_AT).is_some()
    })
    .await;
    let kid2 = kid(&published);

    // The API server goes away while the key waits out its publishDelay (3 s): the reconcile
    // that would activate it fails, again and again, and its backoff grows.
    proxy.close();
    tokio::time::sleep(outage).await;
    assert!(
        child.0.try_wait().expect("wait").is_none(),
        "{}",
        show_log()
    );
    proxy.open().await;
    let back = Instant::now();
    wait_obj(
        &secrets,
        "r",
        "the new key handed out after the outage",
        // Long enough to see a slow recovery, which the assertion below then shows with the log.
        Duration::from_secs(120),
        |s| {
            s.data
                .as_ref()
                .and_then(|d| d.get(keyward::labels::DATA_KEY_ID))
                .is_some_and(|b| b.0 == kid2.as_bytes())
        },
    )
    .await;
    let recovered = back.elapsed();
    eprintln!(
        "outage of {outage:?} mid-rotation: the rotation went on {recovered:?} after the API server answered"
    );
    if std::env::var_os("KEYWARD_TEST_SHOW_LOG").is_some() {
        eprintln!("{}", show_log());
    }
    assert!(
        recovered < Duration::from_secs(10),
        "the rotation went on only {recovered:?} after the API server answered:\n{}",
        show_log()
    );
    drop(child);
    proxy.close();
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_without_the_api_server_it_waits_live_then_reconciles() {
    let ns = TestNamespace::new("kw-startup").await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The plane's kubeconfig, pointed at a loopback port where nothing listens yet.
    let api_port = free_port();
    let (kubeconfig, upstream) = kubeconfig_via(api_port, dir.path());
    let health_port = free_port();
    let log = dir.path().join("keyward.log");
    let mut child = spawn_run(ns.name(), &kubeconfig, health_port, &log);
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
