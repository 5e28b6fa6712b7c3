//! The `keyward` binary: thin CLI over the library.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keyward::client::{self, ClientOptions, RequestStats};
use keyward::controller::{self, OperatorConfig};
use keyward::rotation::Floors;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "Ed25519 provisioning keys for policy agents, revoked only on evidence"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Print the CustomResourceDefinitions as YAML, or write them to a directory.
    Crds {
        /// Write one file per CRD into this directory (and nothing to stdout).
        #[arg(long)]
        write: Option<PathBuf>,
        /// Also write the Helm chart's copy (templates gated by `crds.enabled` and `crds.keep`)
        /// into this directory, normally `charts/keyward/templates/crds`.
        #[arg(long)]
        write_chart: Option<PathBuf>,
    },
    /// Run the operator (in-cluster config, or KUBECONFIG).
    Run(Box<RunArgs>),
    /// Verify Keyward's bearer tokens over HTTP (nginx auth_request, Envoy ext_authz, reverse
    /// proxy) and serve the trust bundles (docs/verifier.md).
    Verifier(Box<VerifierArgs>),
    /// Loopback sidecar for a policy agent: forwards its requests to the control plane with
    /// the pod's projected ServiceAccount token added (docs/agent-proxy.md).
    AgentProxy(Box<AgentProxyArgs>),
    // The CLI for people (`keyward status`, `keyward rotate`): src/cli/.
    #[command(flatten)]
    Cli(keyward::cli::Command),
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    keyward::rotation::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (Go syntax: 1h, 30m, 0s)"))
}

fn parse_qps(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(q) if q.is_finite() && q >= 0.0 => Ok(q),
        _ => Err(format!(
            "{s:?} is not a request rate (a number >= 0; 0 disables limiting)"
        )),
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch (comma-separated); empty watches all namespaces.
    #[arg(long, env = "KEYWARD_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Namespace of the `keyward verifier` replicas' Leases, read to judge
    /// `rotation.revokeWhenUnusedFor` (default: $POD_NAMESPACE, else the in-cluster service
    /// account's namespace). Without it, keys that require that check hold their old key.
    #[arg(long, env = "KEYWARD_VERIFIER_NAMESPACE")]
    verifier_namespace: Option<String>,
    /// The `keyward verifier` replicas that must each vouch for `revokeWhenUnusedFor`
    /// (comma-separated replica ids, e.g. `keyward-verifier-0,keyward-verifier-1`; the chart
    /// passes the StatefulSet's pod names). A listed replica without a Lease holds every such
    /// key (`VerifierSilent`). Empty: the replicas are whichever Leases exist, so deleting a
    /// replica's Lease removes it from the coverage.
    #[arg(long, env = "KEYWARD_VERIFIER_REPLICAS", value_delimiter = ',')]
    verifier_replicas: Vec<String>,
    /// Smallest rotation.interval accepted.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    min_rotation_interval: Duration,
    /// Smallest rotation.minInterval accepted.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    min_min_interval: Duration,
    /// Smallest rotation.publishDelay accepted.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    min_publish_delay: Duration,
    /// Smallest rotation.overlap accepted.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    min_overlap: Duration,
    /// Smallest token.ttl accepted.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    min_token_ttl: Duration,
    /// Clock skew allowed between the operator and token verifiers: an old sealed key that pods
    /// no PolicyAgent covers may hold is revoked only this long after its last token expired.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    max_clock_skew: Duration,
    /// Most workloads rolled at once, so a rotation never becomes a restart storm.
    #[arg(long, default_value_t = 5)]
    max_concurrent_rolls: usize,
    /// How often a ProvisioningKey with bundle copies (spec.trustBundle.namespaceSelector) is
    /// looked at again: how long a newly labelled namespace waits for its copy, and an edited
    /// copy stays edited (namespaces and copies are not watched).
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    bundle_copy_resync: Duration,
    /// Most reconciles running at once per controller (ProvisioningKeys, PolicyAgents);
    /// at least 1. Higher drains a large backlog sooner at the cost of more concurrent API
    /// requests (still bounded by --kube-api-qps and --kube-api-burst).
    #[arg(long, env = "KEYWARD_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Client-side limit on Kubernetes API requests per second (token bucket refill rate);
    /// 0 disables client-side limiting (the API server's priority and fairness still applies).
    /// A long-running watch counts once, when it starts.
    #[arg(long, env = "KEYWARD_KUBE_API_QPS", default_value_t = client::DEFAULT_QPS,
          value_parser = parse_qps)]
    kube_api_qps: f32,
    /// Most Kubernetes API requests sent back to back before --kube-api-qps paces them
    /// (token bucket size); at least 1.
    #[arg(long, env = "KEYWARD_KUBE_API_BURST", default_value_t = client::DEFAULT_BURST,
          value_parser = clap::value_parser!(u32).range(1..))]
    kube_api_burst: u32,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Address of the Prometheus endpoint (GET /metrics), `host:port`; port 0 picks a free
    /// port (the bound address is logged); `0` disables it.
    #[arg(long, env = "KEYWARD_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: String,
    /// Address of the probes (GET /healthz: liveness; GET /readyz: caches synced and leader or
    /// ready standby), `host:port`; port 0 picks a free port; `0` disables it.
    #[arg(long, env = "KEYWARD_HEALTH_ADDRESS", default_value = "0.0.0.0:8081")]
    health_address: String,
    #[command(flatten)]
    leader_election: LeaderElectionArgs,
}

/// High availability: run several replicas, of which only the holder of a Lease reconciles.
#[derive(clap::Args)]
struct LeaderElectionArgs {
    /// Run the controllers only while this replica holds the leader election Lease; other
    /// replicas stand by and take over when it is released or expires. `--leader-elect`,
    /// `--leader-elect=true` and `--leader-elect=false` all work (the chart passes the value).
    #[arg(long, env = "KEYWARD_LEADER_ELECT", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else the in-cluster service account's
    /// namespace).
    #[arg(long, env = "KEYWARD_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "KEYWARD_LEADER_ELECTION_ID", default_value = keyward::leader::DEFAULT_LEASE_NAME)]
    leader_election_id: String,
    /// How long a standby waits, after it last saw the Lease renewed, before taking it over.
    #[arg(long, env = "KEYWARD_LEADER_ELECTION_LEASE_DURATION", default_value = "15s",
          value_parser = parse_duration)]
    leader_election_lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal (then it stops its
    /// controllers and exits non-zero).
    #[arg(long, env = "KEYWARD_LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s",
          value_parser = parse_duration)]
    leader_election_renew_deadline: Duration,
    /// How often the Lease is renewed by the leader and tried by standbys.
    #[arg(long, env = "KEYWARD_LEADER_ELECTION_RETRY_PERIOD", default_value = "2s",
          value_parser = parse_duration)]
    leader_election_retry_period: Duration,
}

impl LeaderElectionArgs {
    /// The election settings, when `--leader-elect` is on.
    fn config(&self) -> Result<Option<keyward::leader::LeaderElectionConfig>, String> {
        if !self.leader_elect {
            return Ok(None);
        }
        let namespace = self
            .leader_election_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(keyward::leader::default_namespace)
            .ok_or("--leader-elect needs --leader-election-namespace (or POD_NAMESPACE, or an in-cluster service account)")?;
        let config = keyward::leader::LeaderElectionConfig {
            lease_duration: self.leader_election_lease_duration,
            renew_deadline: self.leader_election_renew_deadline,
            retry_period: self.leader_election_retry_period,
            ..keyward::leader::LeaderElectionConfig::new(
                namespace,
                self.leader_election_id.clone(),
                keyward::leader::identity(),
            )
        };
        config.validate()?;
        Ok(Some(config))
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Run(_) | Command::Verifier(_) | Command::AgentProxy(_)
    ) {
        // Long-running: give back what glibc keeps after each burst (src/heap.rs).
        tokio::spawn(keyward::heap::trim_periodically());
    }
    match cli.command {
        Command::Version => {
            println!("keyward {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        Command::Crds { write, write_chart } => match crds(write, write_chart) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward crds: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Cli(command) => keyward::cli::run(command).await,
        Command::Verifier(args) => match verifier(*args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward verifier: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::AgentProxy(args) => match agent_proxy(*args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward agent-proxy: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(*args).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward run: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

fn crds(
    write: Option<PathBuf>,
    write_chart: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let files = keyward::api::crds_yaml()?;
    if let Some(dir) = &write_chart {
        write_files(dir, keyward::api::chart_crds_yaml()?)?;
    }
    match write {
        Some(dir) => write_files(&dir, files)?,
        None if write_chart.is_none() => {
            for (_, body) in files {
                print!("{body}");
            }
        }
        None => {}
    }
    Ok(())
}

fn write_files(dir: &std::path::Path, files: Vec<(String, String)>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, body) in files {
        std::fs::write(dir.join(&name), body)?;
        eprintln!("wrote {}", dir.join(&name).display());
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    keyward::telemetry::init(&args.log_format);
    forbid_core_dumps();
    let election = args.leader_election.config()?;
    let config = kube::Config::infer().await?;
    let writes = RequestStats::default();
    // The API server's time, carried by the monotonic clock: a jump of the local wall clock
    // moves no token time and no deadline (see `ApiClock`).
    let clock = std::sync::Arc::new(keyward::time::ApiClock::new());
    let client = client::build_with_clock(
        config,
        &ClientOptions {
            qps: args.kube_api_qps,
            burst: args.kube_api_burst,
        },
        &writes,
        clock.clone(),
    )?;
    let op = OperatorConfig {
        namespaces: args
            .namespaces
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect(),
        floors: Floors {
            interval: args.min_rotation_interval,
            min_interval: args.min_min_interval,
            publish_delay: args.min_publish_delay,
            overlap: args.min_overlap,
            token_ttl: args.min_token_ttl,
            clock_skew: args.max_clock_skew,
        },
        max_concurrent_rolls: args.max_concurrent_rolls.max(1),
        copy_resync: args.bundle_copy_resync,
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| "keyward".into()),
        concurrency: args.concurrency.max(1),
        leader: None,
        verifier_namespace: args
            .verifier_namespace
            .filter(|n| !n.is_empty())
            .or_else(keyward::leader::default_namespace),
        verifier_replicas: args
            .verifier_replicas
            .iter()
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect(),
        clock: keyward::time::SharedClock(clock),
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        namespaces = ?op.namespaces,
        concurrency = op.concurrency,
        kube_api_qps = args.kube_api_qps,
        kube_api_burst = args.kube_api_burst,
        "starting keyward"
    );
    // The HTTP endpoints start first: liveness answers while the preflight waits on the API
    // server, and readiness says why the process is not ready yet.
    let obs = controller::Observability::new(&writes);
    let servers = keyward::http::Servers::start(
        &args.metrics_address,
        &args.health_address,
        obs.metrics.clone(),
        obs.health.clone(),
    )
    .await?;
    // Never exits for the API server's absence: waits (live, not ready) until it answers.
    let started = tokio::select! {
        () = controller::await_api(&client, &op.namespaces, &obs.health) => true,
        () = shutdown_signal() => false,
    };
    let res = match started {
        false => Ok(()),
        true => match election {
            Some(election) => {
                info!(
                    lease = %format!("{}/{}", election.namespace, election.name),
                    identity = %election.identity,
                    lease_duration = ?election.lease_duration,
                    renew_deadline = ?election.renew_deadline,
                    retry_period = ?election.retry_period,
                    "leader election on"
                );
                keyward::operator::run(client, op, writes, obs, election, shutdown_signal())
                    .await
                    .map_err(Into::into)
            }
            None => {
                controller::run(client, op, writes, obs, shutdown_signal()).await;
                Ok(())
            }
        },
    };
    servers.stop().await;
    res
}

// ---- `keyward verifier`: the flags and the wiring; the service is src/verifier/. ----

#[derive(clap::Args)]
struct VerifierArgs {
    /// Namespaces whose trust bundles are watched (comma-separated); empty watches all.
    #[arg(long, env = "KEYWARD_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address to serve on (`host:port`; port 0 picks a free port, which is logged).
    #[arg(long, env = "KEYWARD_VERIFIER_ADDRESS", default_value = "0.0.0.0:8443")]
    address: String,
    /// Clock skew allowed on a token's `nbf` and `exp`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    clock_skew: Duration,
    /// Require this `aud` instead of each key's `spec.token.audience` (default `keyward`).
    #[arg(long, env = "KEYWARD_VERIFIER_AUDIENCE")]
    audience: Option<String>,
    /// Require this `iss` instead of each key's `spec.token.issuer` (default `keyward`).
    #[arg(long, env = "KEYWARD_VERIFIER_ISSUER")]
    issuer: Option<String>,
    /// Require a claim on every route, as `<name>=<value>` (repeatable), e.g.
    /// `scope=bundles:read`: the token's claim must grant the value (a space-separated list
    /// holding it, or an array with it) and so must its key's `spec.token.claims` as the trust
    /// record holds them. Refused otherwise: 403 `ClaimMissing`. An nginx route can add its own
    /// with `/auth/<ns>/<name>?require-claim=<name>=<value>`.
    #[arg(long = "require-claim", value_name = "NAME=VALUE", value_parser = parse_required_claim)]
    require_claim: Vec<keyward::verifier::RequiredClaim>,
    /// Reverse-proxy mode: forward verified requests to this `http://host:port` (every path
    /// except /auth, /authz, /ext_authz, /keys, /metrics, /healthz and /readyz). Needs
    /// --bind-key (or --accept-any-key).
    #[arg(long, env = "KEYWARD_VERIFIER_UPSTREAM")]
    upstream: Option<String>,
    /// Reverse-proxy mode: the one ProvisioningKey (`<namespace>/<name>`) whose tokens reach the
    /// upstream.
    #[arg(long, env = "KEYWARD_VERIFIER_BIND_KEY", value_parser = parse_key_ref)]
    bind_key: Option<keyward::verifier::KeyRef>,
    /// Let the unbound routes (`/auth`, `/ext_authz`, and the proxy without --bind-key) accept
    /// a token of ANY watched ProvisioningKey. Off: they refuse (403 `Unbound`), and each
    /// route names its key (`/auth/<ns>/<name>`, `/authz/<ns>/<name>`). Turn it on only when
    /// every key the verifier watches may reach every route.
    #[arg(long, env = "KEYWARD_VERIFIER_ACCEPT_ANY_KEY", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    accept_any_key: bool,
    /// How long the upstream may take to answer a proxied request (then 504).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    upstream_timeout: Duration,
    /// Most client connections open at once; one over it is closed at once (and counted).
    #[arg(long, default_value_t = keyward::verifier::serve::DEFAULT_MAX_CONNECTIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// A request's headers must arrive within this after the connection opens or goes idle;
    /// idle keep-alive connections are closed after it too.
    #[arg(long, default_value = "20s", value_parser = parse_positive_duration)]
    header_read_timeout: Duration,
    /// The verifier goes not ready when a watch of ProvisioningKeys or trust bundles has been
    /// failing for longer than this (its view of revocations can no longer be confirmed).
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    max_staleness: Duration,
    /// Serve HTTPS with this PEM certificate chain (leaf first); re-read when the file changes
    /// (a Secret volume's update included). Needs --tls-key-file.
    #[arg(long, env = "KEYWARD_VERIFIER_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert-file; re-read with it.
    #[arg(long, env = "KEYWARD_VERIFIER_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// Serve plain HTTP instead of TLS: only for a sidecar on loopback, or tests. Without it and
    /// without --tls-cert-file/--tls-key-file the verifier refuses to start.
    #[arg(long, env = "KEYWARD_VERIFIER_PLAIN_HTTP", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    plain_http: bool,
    /// Serve the OAuth 2.0 token endpoint of proof-of-possession keys (`spec.token.mode:
    /// ProofOfPossession`) at /oauth2/token, and accept its access tokens. The value is the
    /// endpoint's URL as agents reach it (`https://<host>[:port]/oauth2/token`): the `aud` their
    /// client assertions must carry, and the `iss` of the access tokens. Needs TLS,
    /// --access-token-signer and --access-token-key-file.
    #[arg(long, env = "KEYWARD_VERIFIER_TOKEN_ENDPOINT_URL")]
    token_endpoint_url: Option<String>,
    /// The ProvisioningKey (`<namespace>/<name>`, in a watched namespace) whose key signs the
    /// access tokens: the operator mints and rotates it, and every replica verifies the access
    /// tokens against its trust bundle.
    #[arg(long, env = "KEYWARD_VERIFIER_ACCESS_TOKEN_SIGNER", value_parser = parse_key_ref)]
    access_token_signer: Option<keyward::verifier::KeyRef>,
    /// That key's private key: its agent Secret's `private-key.pem` (`includePrivateKey: true`),
    /// mounted. Read on every token request, so a rotation needs no restart.
    #[arg(long, env = "KEYWARD_VERIFIER_ACCESS_TOKEN_KEY_FILE")]
    access_token_key_file: Option<PathBuf>,
    /// Trust a bundle fetched from another cluster's JWKS URL (repeatable), on its own routes
    /// `/auth-remote/<name>` and `/authz-remote/<name>/...`:
    /// `name=N,url=https://.../keys/<ns>/<name>/jwks.json,ca=<pinned CA PEM>,sub=<ns>/<name>`
    /// `[,aud=A][,iss=I][,interval=30s][,max-staleness=5m]`. Fetched over TLS trusting only that
    /// CA; once the last good fetch is older than max-staleness its routes refuse every token.
    #[arg(long = "remote-bundle", value_name = "SPEC", value_parser = parse_remote_bundle)]
    remote_bundle: Vec<keyward::verifier::remote::RemoteSpec>,
    /// Lifetime of an access token (at most 1h).
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    access_token_ttl: Duration,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
    /// Report key use to the operator (KeyUsageReports and this replica's Lease). On by default;
    /// `--report=false` turns it off (then nothing is written and the operator sees no replica).
    #[arg(long, env = "KEYWARD_VERIFIER_REPORT", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    report: bool,
    /// Stable id of this replica (the chart passes the StatefulSet pod name); names its Lease
    /// and reports. Default: $POD_NAME, else the host name.
    #[arg(long, env = "POD_NAME")]
    replica_id: Option<String>,
    /// Namespace of this replica's Lease (`keyward-verifier-<replica-id>`); required while
    /// reporting is on.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How often use is flushed and the Lease renewed; also the per-key write bound (at most
    /// one report write per key per interval). The Lease lasts 3 intervals.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    report_interval: Duration,
    /// A key id's reported lastUsedAt is refreshed when a use is at least this much newer (new
    /// key ids and new pods are reported at the next interval regardless).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    report_resolution: Duration,
    /// Most report writes per second of this replica (token bucket refill rate; > 0).
    #[arg(long, default_value_t = 50.0, value_parser = parse_report_qps)]
    report_qps: f32,
    /// Most report writes back to back before --report-qps paces them (token bucket size).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    report_burst: u32,
    /// Attribute requests to pods by the pod-bound ServiceAccount token in
    /// `X-Keyward-Pod-Token` (checked with TokenReview: needs RBAC `create` on
    /// `tokenreviews`). `--review-pod-tokens=false`: no request names a pod (acknowledgements
    /// then never confirm; use another check mode).
    #[arg(long, env = "KEYWARD_VERIFIER_REVIEW_POD_TOKENS", num_args = 0..=1, default_value_t = true,
          default_missing_value = "true", action = clap::ArgAction::Set)]
    review_pod_tokens: bool,
    /// The audience a pod token must be for (its projected volume's `audience`).
    #[arg(long, env = "KEYWARD_VERIFIER_POD_TOKEN_AUDIENCE",
          default_value = keyward::verifier::pod_identity::DEFAULT_AUDIENCE)]
    pod_token_audience: String,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)?;
    keyward::rotation::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} must be a duration above 0"))
}

fn parse_remote_bundle(s: &str) -> Result<keyward::verifier::remote::RemoteSpec, String> {
    keyward::verifier::remote::RemoteSpec::parse(s)
}

fn parse_required_claim(s: &str) -> Result<keyward::verifier::RequiredClaim, String> {
    keyward::verifier::RequiredClaim::parse(s).ok_or_else(|| {
        format!("{s:?} is not <name>=<value> (a claim name, then a value without spaces)")
    })
}

fn parse_key_ref(s: &str) -> Result<keyward::verifier::KeyRef, String> {
    keyward::verifier::KeyRef::parse(s)
        .ok_or_else(|| format!("{s:?} is not <namespace>/<name> of a ProvisioningKey"))
}

fn parse_report_qps(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(q) if q.is_finite() && q > 0.0 => Ok(q),
        _ => Err(format!("{s:?} is not a write rate (a number > 0)")),
    }
}

/// The host name (`$HOSTNAME`, else the kernel's), for `--replica-id`'s default.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

impl VerifierArgs {
    /// The reporting settings, `None` with `--report=false`.
    fn report_config(
        &self,
        namespaces: &[String],
    ) -> Result<Option<keyward::verifier::ReportConfig>, String> {
        if !self.report {
            return Ok(None);
        }
        let lease_namespace = self
            .lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .ok_or("reporting needs --lease-namespace (or POD_NAMESPACE); pass --report=false to run without it")?;
        let replica = self
            .replica_id
            .clone()
            .filter(|r| !r.is_empty())
            .or_else(host_name)
            .ok_or("reporting needs --replica-id (or POD_NAME, or a host name)")?;
        Ok(Some(keyward::verifier::ReportConfig {
            replica,
            lease_namespace,
            namespaces: namespaces.to_vec(),
            interval: self.report_interval,
            resolution: self.report_resolution,
            qps: self.report_qps,
            burst: self.report_burst,
        }))
    }
}

async fn verifier(args: VerifierArgs) -> Result<(), Box<dyn std::error::Error>> {
    use keyward::verifier;
    let mode = verifier::tls::Mode::from_flags(
        args.tls_cert_file.as_deref(),
        args.tls_key_file.as_deref(),
        args.plain_http,
    )?;
    keyward::telemetry::init(&args.log_format);
    forbid_core_dumps();
    let tls = match &mode {
        verifier::tls::Mode::Tls { cert, key } => Some(verifier::tls::acceptor(cert, key)?.0),
        verifier::tls::Mode::PlainHttp => {
            tracing::warn!(
                "--plain-http: serving plain HTTP (tokens cross the network unencrypted unless this is loopback)"
            );
            None
        }
    };
    let namespaces: Vec<String> = args
        .namespaces
        .iter()
        .filter(|n| !n.is_empty())
        .cloned()
        .collect();
    let report = args.report_config(&namespaces)?;
    let upstream = args
        .upstream
        .as_deref()
        .map(verifier::Upstream::new)
        .transpose()?
        .map(|u| verifier::Upstream {
            timeout: args.upstream_timeout,
            ..u
        });
    if args.bind_key.is_some() && upstream.is_none() {
        return Err("--bind-key binds the reverse proxy: it needs --upstream".into());
    }
    if args.accept_any_key {
        tracing::warn!(
            "--accept-any-key: /auth, /ext_authz and the proxy accept a token of any watched ProvisioningKey"
        );
    }
    let token_endpoint = match (
        args.token_endpoint_url,
        args.access_token_signer,
        args.access_token_key_file,
    ) {
        (None, None, None) => None,
        (Some(url), Some(signer), Some(file)) => {
            if !url.starts_with("https://") || url.parse::<::http::Uri>().is_err() {
                return Err(format!("--token-endpoint-url {url:?} must be an https:// URL").into());
            }
            if matches!(mode, verifier::tls::Mode::PlainHttp) {
                return Err("--token-endpoint-url needs TLS (--tls-cert-file, --tls-key-file): client assertions and access tokens never cross plain HTTP".into());
            }
            if args.access_token_ttl > verifier::oauth::MAX_ACCESS_TOKEN_TTL {
                return Err("--access-token-ttl is at most 1h".into());
            }
            Some(verifier::oauth::TokenEndpoint::new(
                url,
                signer,
                file,
                args.access_token_ttl,
            ))
        }
        _ => {
            return Err("--token-endpoint-url, --access-token-signer and --access-token-key-file go together".into());
        }
    };
    let remotes = args
        .remote_bundle
        .into_iter()
        .map(|spec| verifier::remote::RemoteBundle::new(spec).map(std::sync::Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    if !remotes.is_empty() {
        tokio::spawn(verifier::remote::keep_fresh(remotes.clone()));
    }
    let policy = verifier::Policy {
        clock_skew: args.clock_skew,
        audience: args.audience,
        issuer: args.issuer,
        required_claims: args.require_claim,
        ..verifier::Policy::default()
    };
    // Use is recorded in memory (bounded; new triples beyond the capacity are counted as
    // dropped) and drained by the reporter every report interval.
    let use_log = std::sync::Arc::new(verifier::MemoryUseLog::new(100_000));
    let limits = verifier::Limits {
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: args.header_read_timeout,
    };
    let client = kube::Client::try_default().await?;
    let mut shared = verifier::Shared::new(policy, use_log.clone(), upstream)
        .accepting_any_key(args.accept_any_key)
        .bound_to(args.bind_key.clone())
        .with_limits(limits)
        .with_max_staleness(args.max_staleness)
        .with_tls(tls)
        .with_token_endpoint(token_endpoint)
        .with_remotes(remotes.clone());
    // Pods are attributed only when their use is reported.
    if args.review_pod_tokens && report.is_some() {
        shared = shared.with_pod_identity(
            std::sync::Arc::new(verifier::pod_identity::ApiReviewer(client.clone())),
            &args.pod_token_audience,
        );
    }
    let shared = std::sync::Arc::new(shared);
    let listener = tokio::net::TcpListener::bind(&args.address).await?;
    info!(address = %listener.local_addr()?, scheme = mode.scheme(), namespaces = ?namespaces, clock_skew = ?args.clock_skew,
          upstream = ?args.upstream, report = report.is_some(), pod_tokens = shared.pods.is_some(), "starting keyward verifier");
    match report {
        Some(report) => verifier::run_reporting(
            client,
            namespaces,
            shared,
            use_log,
            report,
            listener,
            shutdown_signal(),
        )
        .await
        .map_err(|e| -> Box<dyn std::error::Error> { e })?,
        None => verifier::run(client, namespaces, shared, listener, shutdown_signal()).await?,
    }
    Ok(())
}

// ---- `keyward agent-proxy`: the flags and the wiring; the proxy is src/agent_proxy.rs. ----

#[derive(clap::Args)]
struct AgentProxyArgs {
    /// Address to listen on, `ip:port`; only loopback (127.0.0.0/8 or ::1) is accepted.
    #[arg(long, default_value = keyward::agent_proxy::DEFAULT_LISTEN)]
    listen: String,
    /// The control plane's base URL (`http://` or `https://`); a request for `/a/b?c` goes to
    /// `<upstream>/a/b?c`.
    #[arg(long)]
    upstream: String,
    /// Trust only the CAs in this PEM file for an https upstream (default: the web roots).
    #[arg(long)]
    upstream_ca_file: Option<PathBuf>,
    /// The pod's projected ServiceAccount token (audience `keyward`), re-read on every request.
    #[arg(long, default_value = keyward::agent_proxy::DEFAULT_POD_TOKEN_FILE)]
    pod_token_file: PathBuf,
    /// How long the upstream may take to answer (its response head; also each read of its
    /// body); then 504.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    upstream_timeout: Duration,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

async fn agent_proxy(args: AgentProxyArgs) -> Result<(), Box<dyn std::error::Error>> {
    use keyward::agent_proxy::{self, Proxy, Settings};
    let settings = Settings::new(
        &args.listen,
        &args.upstream,
        args.upstream_ca_file,
        args.pod_token_file,
        args.upstream_timeout,
    )?;
    keyward::telemetry::init(&args.log_format);
    forbid_core_dumps();
    let proxy = std::sync::Arc::new(Proxy::new(&settings)?);
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    info!(address = %listener.local_addr()?, upstream = %settings.upstream,
          pod_token_file = %settings.pod_token_file.display(),
          upstream_timeout = ?settings.upstream_timeout, "starting keyward agent-proxy");
    if let Err(problem) = proxy.check_token().await {
        tracing::warn!(file = %settings.pod_token_file.display(), reason = problem.reason(),
            "the pod token file is not usable yet: requests are forwarded without it until it is");
    }
    agent_proxy::run(listener, proxy, shutdown_signal()).await?;
    Ok(())
}

/// Core dumps off for the operator, the verifier and the agent proxy (they hold key material
/// or the pod's token); a failure is logged, not fatal.
fn forbid_core_dumps() {
    match keyward::hygiene::forbid_core_dumps() {
        Ok(()) => tracing::debug!("core dumps off (RLIMIT_CORE 0, not dumpable)"),
        Err(e) => tracing::warn!(error = %e, "could not turn core dumps off"),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => info!("SIGTERM received; shutting down gracefully"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; shutting down gracefully"),
    }
}
