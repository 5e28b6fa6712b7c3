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
    Run(RunArgs),
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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
        Command::Run(args) => match run(args).await {
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
    let config = kube::Config::infer().await?;
    let writes = RequestStats::default();
    let client = client::build(
        config,
        &ClientOptions {
            qps: args.kube_api_qps,
            burst: args.kube_api_burst,
        },
        &writes,
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
        instance: std::env::var("POD_NAME").unwrap_or_else(|_| "keyward".into()),
        concurrency: args.concurrency.max(1),
    };
    info!(
        version = env!("CARGO_PKG_VERSION"),
        namespaces = ?op.namespaces,
        concurrency = op.concurrency,
        kube_api_qps = args.kube_api_qps,
        kube_api_burst = args.kube_api_burst,
        "starting keyward"
    );
    controller::preflight(&client, &op.namespaces).await?;
    controller::run(client, op, writes, shutdown_signal()).await;
    Ok(())
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
