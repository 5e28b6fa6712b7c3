//! The control plane's side, for real: Debian's nginx serving the test bundle behind
//! `auth_request` to a `keyward verifier` process (docs/verifier.md's config), which verifies
//! each agent's token against the trust bundles it watches and reports use to the operator
//! (its Lease and KeyUsageReports, `keyward::usage`). Real OPA agents download through nginx.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::bundle_server::BUNDLE;

/// A free loopback port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The nginx binary: `$KEYWARD_NGINX`, else `nginx` on PATH, else Debian's `/usr/sbin/nginx`
/// (`.ci/run` installs `nginx-light` when it is missing).
pub fn nginx_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KEYWARD_NGINX") {
        return Ok(p.into());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
        .context(
            "no nginx binary: install Debian's nginx-light (`.ci/run` does) or set KEYWARD_NGINX",
        )
}

/// The status code of `GET path` on a loopback port (HTTP/1.0, no client library needed).
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The service URL of nginx on `port`.
pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// nginx on a loopback port: `/bundles/authz.tar.gz` (the test bundle, a static file with its
/// ETag) behind `auth_request` to the verifier's `/auth/<ns>/<name>`: the location accepts only
/// the tokens of the ProvisioningKey `key` (`<ns>/<name>`).
pub struct Nginx {
    dir: PathBuf,
    pub port: u16,
    master: Option<u32>,
}

impl Nginx {
    pub fn start(dir: &Path, port: u16, verifier_port: u16, key: &str) -> anyhow::Result<Self> {
        let binary = nginx_binary()?;
        let dir = dir.join("nginx");
        for d in ["srv/bundles", "logs", "tmp"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        // Workers may run as another user: the prefix must be readable.
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status();
        std::fs::write(dir.join("srv/bundles/authz.tar.gz"), BUNDLE)?;
        let d = dir.display();
        let conf = format!(
            r#"pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;
  log_format keyward '$msec $remote_addr "$request" $status key=$keyward_key kid=$keyward_kid pod=$http_x_keyward_pod_uid';
  server {{
    listen 127.0.0.1:{port};
    access_log {d}/logs/bundles.log keyward;
    location /bundles/ {{
      auth_request /_keyward;
      auth_request_set $keyward_key $upstream_http_x_keyward_key;
      auth_request_set $keyward_kid $upstream_http_x_keyward_kid;
      root {d}/srv;
    }}
    location = /_keyward {{
      internal;
      proxy_pass http://127.0.0.1:{verifier_port}/auth/{key};
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
    }}
  }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let status = Command::new(&binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .status()
            .with_context(|| format!("start {}", binary.display()))?;
        if !status.success() {
            bail!(
                "nginx did not start ({status}): {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
        }
        let master = std::fs::read_to_string(dir.join("nginx.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        Ok(Nginx { dir, port, master })
    }

    /// The service URL agents use.
    pub fn url(&self) -> String {
        url(self.port)
    }

    /// nginx's access log: `<msec> <addr> "<request>" <status> key=<ns/name> kid=<kid>
    /// pod=<uid>` per request.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/bundles.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(pid) = self.master {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// One `keyward verifier` replica (the crate's own binary), watching one namespace, with its
/// Lease in the same namespace, reporting every second at 1 s resolution.
pub struct Verifier {
    proc: Option<Proc>,
    pub port: u16,
    pub replica: String,
    namespace: String,
    log: PathBuf,
}

impl Verifier {
    pub async fn start(
        namespace: &str,
        replica: &str,
        port: u16,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut v = Verifier {
            proc: None,
            port,
            replica: replica.to_string(),
            namespace: namespace.to_string(),
            log,
        };
        v.spawn().await?;
        Ok(v)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["verifier", "--plain-http", "--namespaces", &self.namespace])
            .args(["--address", &format!("127.0.0.1:{}", self.port)])
            .args([
                "--replica-id",
                &self.replica,
                "--lease-namespace",
                &self.namespace,
            ])
            .args(["--report-interval", "1s", "--report-resolution", "1s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start keyward verifier")?;
        self.proc = Some(Proc(child));
        // Generous: on a loaded 2-core machine the first LISTs can take a while.
        for _ in 0..600 {
            if http_status(self.port, "/readyz").await == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "keyward verifier not ready within 15 s: {}",
            self.log_tail()
        )
    }

    /// SIGKILL: no final report, its Lease stops advancing (silence).
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// A new incarnation of the same replica.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}
