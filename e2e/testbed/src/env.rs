//! Connection to the local control plane.

use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where `e2e/cluster.sh up` writes the admin kubeconfig by default.
pub const DEFAULT_KUBECONFIG: &str = "/tmp/keyward-cluster/admin.kubeconfig";

const HINT: &str = "start the local control plane with `bash e2e/cluster.sh up` \
                    and export the KUBECONFIG printed by `e2e/cluster.sh env`";

/// The kubeconfig the test bed uses: the first entry of `KUBECONFIG` if set and non-empty,
/// else [`DEFAULT_KUBECONFIG`].
pub fn kubeconfig_path() -> PathBuf {
    std::env::var_os("KUBECONFIG")
        .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_KUBECONFIG))
}

/// The local control plane's admin kubeconfig as a `kube::Config` (to build a client of one's
/// own, e.g. the operator's counting client).
///
/// # Panics
/// With a message telling to run `e2e/cluster.sh up` when the kubeconfig is missing or invalid.
pub async fn kube_config() -> kube::Config {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}; {HINT}", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("invalid kubeconfig {}: {e}; {HINT}", path.display()))
}

/// A client for the local control plane, checked to be reachable.
///
/// # Panics
/// With a message telling to run `e2e/cluster.sh up` when the kubeconfig is missing or the
/// API server does not answer within 10 s.
pub async fn client() -> kube::Client {
    let config = kube_config().await;
    let url = config.cluster_url.clone();
    let client = kube::Client::try_from(config)
        .unwrap_or_else(|e| panic!("cannot build a client for {url}: {e}; {HINT}"));
    match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
        Ok(Ok(_)) => client,
        Ok(Err(e)) => panic!("the API server at {url} is not reachable: {e}; {HINT}"),
        Err(_) => panic!("the API server at {url} did not answer within 10 s; {HINT}"),
    }
}

/// Installs a `tracing` subscriber writing to the test output, filtered by `RUST_LOG`
/// (default `info`). Safe to call from every test; only the first call installs it.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A kubeconfig for `user` with bearer `token`, on the plane's cluster (the admin kubeconfig's
/// server and CA), written to `dir/<user>.kubeconfig`.
pub fn kubeconfig_with_token(
    dir: &std::path::Path,
    user: &str,
    token: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let admin: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path())?)?;
    let mut limited = admin.clone();
    limited["users"] = serde_json::json!([{ "name": user, "user": { "token": token } }]);
    if let Some(contexts) = limited["contexts"].as_array_mut() {
        for c in contexts {
            c["context"]["user"] = serde_json::json!(user);
        }
    }
    let path = dir.join(format!("{user}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&limited)?)?;
    Ok(path)
}
