//! The demo's "cluster side" (run by `e2e/demo.sh`): a stand-in kubelet that runs every pod of
//! the namespace as a real `opa run --server` (built by `e2e/opa.sh`), and a bundle server
//! that verifies each download's token against the live trust bundle ConfigMap. It prints one
//! line whenever a pod's downloads change key or outcome, so the demo shows the agents moving
//! from the old key to the new one, and the old key being refused once it is revoked.
//!
//! `cargo run --example demo-bed -- [namespace] [provisioning key] [audience] [volume]`
//! (defaults: `default opa-agents bundle-service keyward`, as in `examples/`). Ctrl-C stops
//! the kubelet and every OPA process it started.

#[allow(dead_code)]
#[path = "scenarios/bundle_server.rs"]
mod bundle_server;

use std::collections::BTreeMap;
use std::time::Duration;

use bundle_server::BundleServer;
use k8s_openapi::api::core::v1::ConfigMap;
use keyward_testbed::{Kubelet, KubeletConfig, OpaProcess, opa_binary};
use kube::Api;

fn short(kid: Option<&str>) -> String {
    kid.map_or_else(|| "-".to_string(), |k| k.chars().take(10).collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let ns = args.next().unwrap_or_else(|| "default".into());
    let pk = args.next().unwrap_or_else(|| "opa-agents".into());
    let audience = args.next().unwrap_or_else(|| "bundle-service".into());
    let volume = args.next().unwrap_or_else(|| "keyward".into());
    if std::env::var_os("RUST_LOG").is_none() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let opa = tokio::task::spawn_blocking(opa_binary).await??;
    let client = keyward_testbed::client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let server = BundleServer::start(cms, &format!("{pk}-trust"), &audience).await;
    let kubelet = Kubelet::start(
        client,
        &ns,
        KubeletConfig::default()
            .with_agent(OpaProcess::new(&opa, server.url(), &volume).with_polling_seconds(2)),
    );
    println!(
        "[demo-bed] stand-in kubelet for namespace {ns}: every pod runs {} (real OPA), bundles from {} (tokens checked against ConfigMap {pk}-trust, audience {audience})",
        opa.display(),
        server.url()
    );
    let mut seen = 0;
    let mut last: BTreeMap<String, (Option<String>, bool)> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        let log = server.log();
        for a in log.iter().skip(seen) {
            let now = (a.kid.clone(), a.accepted());
            if last.get(&a.pod) != Some(&now) {
                let what = if a.accepted() {
                    "bundle downloaded".to_string()
                } else {
                    format!("REFUSED ({:?})", a.outcome)
                };
                println!(
                    "[demo-bed] OPA in pod {} (uid {}) with key {}: {what}",
                    a.pod,
                    a.pod_uid.chars().take(8).collect::<String>(),
                    short(a.kid.as_deref())
                );
                last.insert(a.pod.clone(), now);
            }
        }
        seen = log.len();
        // Forget pods that are gone, so a new pod of the same name prints again.
        let running: Vec<String> = kubelet.running_pods().into_iter().map(|p| p.name).collect();
        last.retain(|pod, _| running.contains(pod));
    }
    println!("[demo-bed] stopping the kubelet and its OPA processes");
    kubelet.shutdown().await;
    Ok(())
}
