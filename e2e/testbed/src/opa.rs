//! A real Open Policy Agent per pod: `opa run --server` as a child process of the stand-in
//! kubelet, built from Debian's packages by `e2e/opa.sh` (cached under `~/.cache/keyward`).
//!
//! Each pod's OPA
//! - listens on `<pod IP>:<port>` only (`--addr`), so the operator's connectivity check
//!   (`/health?bundles=true`) reaches exactly that pod;
//! - downloads its bundle from the bundle service with `credentials.bearer.token_path` set to
//!   the `token` file of the pod's emulated Secret volume (OPA re-reads it on every request);
//! - sends the pod's name and uid as headers, filled by OPA's `${ENV}` substitution from the
//!   process environment (`POD_NAME`, `POD_UID`, as the downward API would set them).
//!
//! Unlike the in-process agent of the scenarios, OPA's `/health?bundles=true` stays 200 once a
//! bundle activated, even while later downloads are refused: it proves one download worked
//! since the process started, not which key the agent uses now.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::FutureExt;
use futures::future::BoxFuture;

use crate::agent::{AgentFactory, PodInfo};

/// OPA's default port.
pub const OPA_PORT: u16 = 8181;
/// Header carrying the pod's uid on every bundle download (`${POD_UID}` in OPA's config).
pub const POD_UID_HEADER: &str = "x-keyward-pod-uid";
/// Header carrying the pod's name on every bundle download (`${POD_NAME}` in OPA's config).
pub const POD_NAME_HEADER_OPA: &str = "x-keyward-pod-name";

/// The `opa` binary: `$KEYWARD_OPA` if set, else what `bash e2e/opa.sh path` prints (which
/// builds it once, a few minutes, and caches it). Looked up once per process.
///
/// # Errors
/// When the script fails (its one-line reason is in the error) or the binary does not run.
pub fn opa_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| locate().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn locate() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KEYWARD_OPA").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../opa.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("path")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "`bash {} path` failed (its last line says why)",
            script.display()
        );
    }
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !path.is_file() {
        bail!("`e2e/opa.sh path` printed {}, not a file", path.display());
    }
    Ok(path)
}

/// The agent factory: one `opa run --server` per pod.
#[derive(Clone, Debug)]
pub struct OpaProcess {
    binary: PathBuf,
    service_url: String,
    volume: String,
    resource: String,
    port: u16,
    polling_seconds: u32,
    agent_proxy: Option<AgentProxy>,
}

/// `keyward agent-proxy` next to OPA in each pod (docs/agent-proxy.md): OPA downloads through
/// it, and it adds the pod's projected ServiceAccount token (`X-Keyward-Pod-Token`).
#[derive(Clone, Debug)]
pub struct AgentProxy {
    /// The `keyward` binary.
    pub binary: PathBuf,
    /// The projected volume holding the pod token.
    pub volume: String,
    /// The token's path in that volume.
    pub path: String,
    /// The proxy's port on the pod's IP.
    pub port: u16,
}

impl OpaProcess {
    /// OPA from `binary`, downloading `bundles/authz.tar.gz` from `service_url` with the
    /// token in the `token` file of the pod's Secret volume `volume`, every second.
    pub fn new(
        binary: impl Into<PathBuf>,
        service_url: impl Into<String>,
        volume: impl Into<String>,
    ) -> Self {
        Self {
            binary: binary.into(),
            service_url: service_url.into(),
            volume: volume.into(),
            resource: "bundles/authz.tar.gz".into(),
            port: OPA_PORT,
            polling_seconds: 1,
            agent_proxy: None,
        }
    }

    /// Runs `proxy` in each pod, and points OPA at it instead of the service.
    #[must_use]
    pub fn with_agent_proxy(mut self, proxy: AgentProxy) -> Self {
        self.agent_proxy = Some(proxy);
        self
    }

    /// Sets the bundle's resource path on the service (default `bundles/authz.tar.gz`).
    #[must_use]
    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = resource.into();
        self
    }

    /// Sets the bundle polling delay in seconds (min = max; OPA's default is 60..120).
    #[must_use]
    pub fn with_polling_seconds(mut self, seconds: u32) -> Self {
        self.polling_seconds = seconds.max(1);
        self
    }

    /// OPA's configuration for one pod (YAML). `${POD_NAME}` / `${POD_UID}` are left for OPA
    /// to substitute from its environment.
    pub fn config(&self, token_path: &Path) -> String {
        self.config_for(&self.service_url, token_path)
    }

    fn config_for(&self, service_url: &str, token_path: &Path) -> String {
        // JSON strings are valid YAML scalars: paths and URLs need no further quoting.
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        format!(
            "services:\n  control-plane:\n    url: {url}\n    headers:\n      X-Keyward-Pod-UID: \"${{POD_UID}}\"\n      X-Keyward-Pod-Name: \"${{POD_NAME}}\"\n    credentials:\n      bearer:\n        token_path: {token}\n\
             bundles:\n  authz:\n    service: control-plane\n    resource: {resource}\n    polling:\n      min_delay_seconds: {p}\n      max_delay_seconds: {p}\n\
             labels:\n  pod: \"${{POD_NAME}}\"\n  pod_uid: \"${{POD_UID}}\"\n",
            url = q(service_url),
            token = q(&token_path.to_string_lossy()),
            resource = q(&self.resource),
            p = self.polling_seconds,
        )
    }
}

impl AgentFactory for OpaProcess {
    fn port(&self) -> Option<u16> {
        Some(self.port)
    }

    fn start(&self, pod: PodInfo) -> BoxFuture<'static, ()> {
        let Some(secret_dir) = pod.secret_dirs.get(&self.volume) else {
            tracing::error!(pod = %pod.name, volume = %self.volume, "no Secret volume for OPA's token");
            return async {}.boxed();
        };
        let config_path = pod.dir.join("opa-config.yaml");
        let log_path = pod.dir.join("opa.log");
        let addr = format!("{}:{}", pod.ip, self.port);
        // The sidecar first, so OPA's first download finds it.
        let mut sidecar = None;
        let mut service_url = self.service_url.clone();
        if let Some(proxy) = &self.agent_proxy {
            let Some(token_dir) = pod.projected_dirs.get(&proxy.volume) else {
                tracing::error!(pod = %pod.name, volume = %proxy.volume, "no projected volume for the pod token");
                return async {}.boxed();
            };
            let listen = format!("{}:{}", pod.ip, proxy.port);
            let spawned = std::fs::File::create(pod.dir.join("agent-proxy.log")).and_then(|log| {
                tokio::process::Command::new(&proxy.binary)
                    .args([
                        "agent-proxy",
                        "--listen",
                        &listen,
                        "--upstream",
                        &self.service_url,
                    ])
                    .arg("--pod-token-file")
                    .arg(token_dir.join(&proxy.path))
                    .env("RUST_LOG", "info")
                    .current_dir(&pod.dir)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
            });
            match spawned {
                Ok(child) => sidecar = Some(child),
                Err(e) => {
                    tracing::error!(pod = %pod.name, "cannot start keyward agent-proxy: {e}");
                    return async {}.boxed();
                }
            }
            service_url = format!("http://{listen}");
        }
        let spawned = std::fs::write(
            &config_path,
            self.config_for(&service_url, &secret_dir.join("token")),
        )
        .and_then(|()| std::fs::File::create(&log_path))
        .and_then(|log| {
            tokio::process::Command::new(&self.binary)
                .args(["run", "--server", "--disable-telemetry", "--addr", &addr])
                .arg("--config-file")
                .arg(&config_path)
                .args(["--log-level", "info", "--shutdown-grace-period", "1"])
                .env("POD_NAME", &pod.name)
                .env("POD_UID", &pod.uid)
                .env("POD_NAMESPACE", &pod.namespace)
                .env_remove("HTTP_PROXY")
                .env_remove("HTTPS_PROXY")
                .env_remove("http_proxy")
                .env_remove("https_proxy")
                .current_dir(&pod.dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Aborting the pod's task drops the child: SIGKILL, by its own pid.
                .kill_on_drop(true)
                .spawn()
        });
        let mut termination = pod.termination.clone();
        let name = pod.name.clone();
        async move {
            // Dropped (killed) with the pod's task, like OPA.
            let _sidecar = sidecar;
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(pod = %name, %addr, "cannot start opa: {e}");
                    return;
                }
            };
            tracing::debug!(pod = %name, %addr, pid = ?child.id(), "opa started");
            tokio::select! {
                status = child.wait() => {
                    tracing::warn!(pod = %name, "opa exited: {status:?}; see {}", log_path.display());
                }
                () = termination.requested() => {
                    // The kubelet's SIGTERM, to this child only, then a short wait.
                    if let Some(pid) = child.id() {
                        let _ = std::process::Command::new("kill")
                            .args(["-TERM", &pid.to_string()])
                            .status();
                    }
                    if tokio::time::timeout(Duration::from_secs(3), child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_points_at_the_token_file_and_keeps_env_references() {
        let opa = OpaProcess::new("/bin/opa", "http://127.0.0.1:1234", "keyward");
        let cfg = opa.config(Path::new("/tmp/pod/keyward/token"));
        assert!(
            cfg.contains("token_path: \"/tmp/pod/keyward/token\""),
            "{cfg}"
        );
        assert!(cfg.contains("X-Keyward-Pod-UID: \"${POD_UID}\""), "{cfg}");
        assert!(cfg.contains("url: \"http://127.0.0.1:1234\""), "{cfg}");
        assert!(cfg.contains("min_delay_seconds: 1"), "{cfg}");
    }
}
