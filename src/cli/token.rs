//! `keyward token sync --key <ns>/<name> --out <file>`: keeps a token file fresh for an agent
//! outside the cluster (a VM, a CI job, the edge) that cannot mount the agent Secret. It reads
//! that one Secret with a kubeconfig whose RBAC allows `get` on it alone, and writes the token
//! with an atomic rename (a reader never sees a partial file), mode 0600. With `--once` it
//! writes once and exits (pipelines); otherwise it runs until stopped, polling at a quarter of
//! the token's remaining life (5 s to 60 s) and waiting out API server outages with capped,
//! jittered backoff while the file keeps the last good token.
//!
//! It checks what it writes without the key: a JWS whose `sub` is the key it was told to sync
//! and whose `exp` is still ahead. The token itself is never printed or logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tracing::{info, warn};

use super::{CliError, EXIT_ERROR, EXIT_OK, Target};
use crate::labels as l;

pub const AFTER_HELP: &str = "\
Runs where the agent runs, with a kubeconfig that may read the one agent Secret (RBAC: get on
secrets, resourceNames [<secret>]). The token file is replaced atomically (write beside it, fsync,
rename), mode 0600, only when the Secret holds a new token; OPA's bearer credentials re-read it on
every request (services.<name>.credentials.bearer.token_path).

Examples:
  keyward token sync --key payments/opa --out /var/run/keyward/token --kubeconfig sync.kubeconfig
  keyward token sync --key payments/opa --out token --once && opa run --server -c opa.yaml

Exit codes:
  0  --once: the token was written (or the file already held it); without --once: stopped by a
     signal
  1  --once: no valid token could be read (not found, forbidden, malformed, expired), or the
     file could not be written; the message says which";

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Keep a token file fresh from an agent Secret (for agents outside the cluster).
    #[command(after_help = AFTER_HELP)]
    Sync(SyncArgs),
}

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// The ProvisioningKey, `<namespace>/<name>`: the token's `sub` must name it.
    #[arg(long, value_parser = parse_key)]
    pub key: (String, String),
    /// The agent Secret (default: the key's name, its default `secretName`).
    #[arg(long)]
    pub secret: Option<String>,
    /// The token file to keep fresh.
    #[arg(long)]
    pub out: PathBuf,
    /// Write once and exit.
    #[arg(long)]
    pub once: bool,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Register as a consumer of the key: after each new key id, acknowledge it to this
    /// `keyward verifier` (`https://host:port`) with the token and a token of
    /// `--service-account` (audience `keyward-consumer`), so that a PolicyAgent with
    /// `workloadRef: {kind: ServiceAccount, name: <that account>}` is confirmed and the old key is
    /// revoked only after this agent holds the new one. Needs `create` on
    /// `serviceaccounts/token` for that account.
    #[arg(long, value_name = "URL", requires = "service_account")]
    pub acknowledge_via: Option<String>,
    /// The ServiceAccount (in the key's namespace) this agent is, for `--acknowledge-via`.
    #[arg(long, value_name = "NAME", requires = "acknowledge_via")]
    pub service_account: Option<String>,
    /// Trust only the CAs in this PEM file for `--acknowledge-via` (default: the web roots).
    #[arg(long, value_name = "PATH")]
    pub verifier_ca_file: Option<PathBuf>,
}

fn parse_key(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not <namespace>/<name>")),
    }
}

/// Why a Secret holds no token this command may write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unusable {
    #[error("Secret {0} holds no token (key `token`)")]
    NoToken(String),
    #[error("Secret {0}: the token is not a JWS this command can read")]
    Malformed(String),
    #[error("Secret {secret}: the token is for {sub:?}, not {want}")]
    OtherKey {
        secret: String,
        sub: String,
        want: String,
    },
    #[error("Secret {0}: the token has expired (is the operator running?)")]
    Expired(String),
}

/// The token of `secret` if it is one for key `want` (`<ns>/<name>`) that has not expired at
/// `now`, with its key id and `exp`. Unverified: the agent's control plane verifies it; this
/// only refuses to write what is certainly wrong.
pub fn usable_token(
    secret: &Secret,
    want: &str,
    now: i64,
) -> Result<(String, String, i64), Unusable> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(l::DATA_TOKEN))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Unusable::NoToken(name.clone()))?;
    let (header, claims) = crate::keys::decode_token_unverified(&token)
        .map_err(|_| Unusable::Malformed(name.clone()))?;
    if claims.sub != want {
        return Err(Unusable::OtherKey {
            secret: name,
            sub: crate::keys::sanitize_ident(&claims.sub),
            want: want.to_string(),
        });
    }
    if claims.exp <= now {
        return Err(Unusable::Expired(name));
    }
    Ok((token, header.kid, claims.exp))
}

/// Replaces `out` with `content` atomically: a temporary file beside it (mode 0600), fsync,
/// rename, then fsync of the directory. Nothing when the file already holds it.
pub fn write_atomically(out: &Path, content: &str) -> std::io::Result<bool> {
    use std::io::Write as _;
    if std::fs::read_to_string(out).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".keyward-token-")
        .tempfile_in(dir)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    tmp.write_all(content.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(out).map_err(|e| e.error)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// Acknowledges a key id to a verifier as the agent's ServiceAccount: one `/auth` request with
/// the key's token and a fresh TokenRequest token (audience `keyward-consumer`, 10 minutes).
struct Acknowledger {
    accounts: Api<k8s_openapi::api::core::v1::ServiceAccount>,
    account: String,
    url: String,
    http: reqwest::Client,
}

impl Acknowledger {
    fn new(
        client: kube::Client,
        ns: &str,
        key: &str,
        account: &str,
        base: &str,
        ca: Option<&Path>,
    ) -> Result<Self, CliError> {
        let base = base.trim_end_matches('/');
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(CliError::Config(format!(
                "--acknowledge-via {base:?} must be an http(s) URL"
            )));
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = ca {
            let pem = std::fs::read(ca).map_err(|e| {
                CliError::Config(format!("--verifier-ca-file {}: {e}", ca.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                CliError::Config(format!("--verifier-ca-file {}: {e}", ca.display()))
            })?;
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CliError::Config(format!("an HTTP client: {e}")))?;
        Ok(Acknowledger {
            accounts: Api::namespaced(client, ns),
            account: account.to_string(),
            url: format!("{base}/auth/{ns}/{key}"),
            http,
        })
    }

    async fn acknowledge(&self, token: &str) -> Result<(), String> {
        use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![crate::verifier::pod_identity::CONSUMER_AUDIENCE.to_string()],
                expiration_seconds: Some(600),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let issued = self
            .accounts
            .create_token_request(&self.account, &Default::default(), &request)
            .await
            .map_err(|e| {
                format!(
                    "a token of ServiceAccount {}: {}",
                    self.account,
                    CliError::from(e)
                )
            })?;
        let sa_token = issued
            .status
            .map(|s| s.token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("the TokenRequest for {} returned no token", self.account))?;
        let res = self
            .http
            .get(&self.url)
            .bearer_auth(token)
            .header(
                crate::verifier::pod_identity::CONSUMER_TOKEN_HEADER,
                sa_token,
            )
            .send()
            .await
            .map_err(|e| format!("{}: {e}", self.url))?;
        if res.status().is_success() {
            Ok(())
        } else {
            let reason = res
                .headers()
                .get("x-keyward-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string();
            Err(format!("{} answered {} ({reason})", self.url, res.status()))
        }
    }
}

/// `d` plus up to a quarter of it, at random.
fn jittered(d: Duration) -> Duration {
    use rand::Rng as _;
    let quarter = u64::try_from(d.as_millis() / 4).unwrap_or(0);
    d + Duration::from_millis(rand::thread_rng().gen_range(0..=quarter))
}

/// When to look again: a quarter of the token's remaining life, 5 s to 60 s (the operator
/// re-issues it at about half its life, so a new one is seen well before the old expires).
pub fn next_check(exp: i64, now: i64) -> Duration {
    let quarter = u64::try_from((exp - now).max(0) / 4).unwrap_or(0);
    Duration::from_secs(quarter.clamp(5, 60))
}

pub async fn run(command: TokenCommand) -> Result<u8, CliError> {
    let TokenCommand::Sync(args) = command;
    let target = Target {
        namespace: Some(args.key.0.clone()),
        all_namespaces: false,
        kubeconfig: args.kubeconfig.clone(),
        context: args.context.clone(),
    };
    let (client, ns) = super::connect(&target).await?;
    let want = format!("{}/{}", args.key.0, args.key.1);
    let name = args.secret.clone().unwrap_or_else(|| args.key.1.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let ack = match (&args.acknowledge_via, &args.service_account) {
        (Some(url), Some(sa)) => Some(Acknowledger::new(
            client,
            &ns,
            &args.key.1,
            sa,
            url,
            args.verifier_ca_file.as_deref(),
        )?),
        _ => None,
    };
    let mut acked: Option<String> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let now = chrono::Utc::now().timestamp();
        let got = match secrets.get(&name).await {
            Ok(s) => usable_token(&s, &want, now).map_err(|e| e.to_string()),
            Err(e) => Err(format!("Secret {ns}/{name}: {}", CliError::from(e))),
        };
        match got {
            Ok((token, kid, exp)) => {
                backoff = Duration::from_secs(1);
                match write_atomically(&args.out, &token) {
                    Ok(true) => {
                        info!(out = %args.out.display(), kid = %kid, exp, "token written");
                        if args.once {
                            eprintln!(
                                "keyward token sync: wrote {} (key id {kid}, expires at {exp})",
                                args.out.display()
                            );
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        eprintln!(
                            "keyward token sync: error: cannot write {}: {e}",
                            args.out.display()
                        );
                        if args.once {
                            return Ok(EXIT_ERROR);
                        }
                    }
                }
                if let Some(a) = &ack
                    && acked.as_deref() != Some(kid.as_str())
                {
                    match a.acknowledge(&token).await {
                        Ok(()) => {
                            info!(kid = %kid, verifier = %a.url, "key id acknowledged");
                            acked = Some(kid.clone());
                        }
                        Err(e) => {
                            warn!(kid = %kid, error = %e, "could not acknowledge the key id; retrying");
                            if args.once {
                                eprintln!("keyward token sync: error: {e}");
                                return Ok(EXIT_ERROR);
                            }
                        }
                    }
                }
                if args.once {
                    return Ok(EXIT_OK);
                }
                let wait = if ack.is_some() && acked.as_deref() != Some(kid.as_str()) {
                    jittered(backoff.min(Duration::from_secs(5)))
                } else {
                    next_check(exp, now)
                };
                tokio::time::sleep(wait).await;
            }
            Err(why) => {
                if args.once {
                    eprintln!("keyward token sync: error: {why}");
                    return Ok(EXIT_ERROR);
                }
                warn!(error = %why, retry_in_s = backoff.as_secs(), "no token to write; the file keeps the last one");
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(token: Option<&str>) -> Secret {
        let mut s = Secret::default();
        s.metadata.name = Some("opa".into());
        if let Some(t) = token {
            s.data = Some([(l::DATA_TOKEN.to_string(), ByteString(t.as_bytes().to_vec()))].into());
        }
        s
    }

    fn token(sub: &str, exp: i64) -> String {
        crate::keys::KeyPair::generate()
            .sign_token(&crate::keys::TokenClaims {
                iss: "keyward".into(),
                sub: sub.into(),
                aud: "keyward".into(),
                iat: 0,
                nbf: 0,
                exp,
                jti: "j".into(),
            })
            .expect("sign")
    }

    #[test]
    fn only_a_live_token_of_the_key_is_written() {
        let good = token("ns/opa", 200);
        assert!(
            usable_token(&secret(Some(&good)), "ns/opa", 100)
                .is_ok_and(|(t, _, e)| t == good && e == 200)
        );
        assert_eq!(
            usable_token(&secret(None), "ns/opa", 100),
            Err(Unusable::NoToken("opa".into()))
        );
        assert_eq!(
            usable_token(&secret(Some("not a jws")), "ns/opa", 100),
            Err(Unusable::Malformed("opa".into()))
        );
        assert!(matches!(
            usable_token(&secret(Some(&token("ns/other", 200))), "ns/opa", 100),
            Err(Unusable::OtherKey { .. })
        ));
        assert_eq!(
            usable_token(&secret(Some(&good)), "ns/opa", 200),
            Err(Unusable::Expired("opa".into()))
        );
    }

    #[test]
    fn the_file_is_replaced_atomically_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("token");
        assert!(write_atomically(&out, "a").expect("write"));
        assert!(
            !write_atomically(&out, "a").expect("same"),
            "unchanged: no write"
        );
        assert!(write_atomically(&out, "b").expect("write"));
        assert_eq!(std::fs::read_to_string(&out).expect("read"), "b");
        let mode = std::fs::metadata(&out).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "token")
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }

    #[test]
    fn it_looks_again_at_a_quarter_of_the_remaining_life() {
        assert_eq!(next_check(1000 + 3600, 1000), Duration::from_secs(60));
        assert_eq!(next_check(1000 + 120, 1000), Duration::from_secs(30));
        assert_eq!(next_check(1000, 1000), Duration::from_secs(5));
    }
}
