//! `keyward status`, `keyward rotate` and `keyward reactivate`: the operator's CLI for people, in the spirit of
//! `cmctl status` and `cmctl renew`.
//!
//! Layout: `status` and `rotate` each gather objects (reads), turn them into rows and text with
//! pure functions (tested on fixture objects, no client), then print. The CLI never writes a
//! `spec`: `rotate` sends one JSON merge patch of `metadata.annotations` only.
//!
//! Exit codes ([`EXIT_OK`], [`EXIT_ERROR`], [`EXIT_USAGE`], [`EXIT_NOT_READY`]) are part of the
//! interface: scripts run `keyward status && deploy`.

pub mod bundle;
pub mod reactivate;
pub mod rotate;
pub mod status;
pub mod token;
pub mod view;

use std::path::PathBuf;
use std::process::ExitCode;

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Success; for `status`: every key shown is Ready and none is Stalled.
pub const EXIT_OK: u8 = 0;
/// An error: the API server refused or could not be reached, a named key does not exist, the
/// kubeconfig is unusable.
pub const EXIT_ERROR: u8 = 1;
/// Bad usage (unknown flag, missing argument); clap's own code.
pub const EXIT_USAGE: u8 = 2;
/// `status`: a key shown is not Ready, is Stalled, or its status does not yet describe its
/// current generation. `rotate --wait`: the rotation was requested but not complete in time.
pub const EXIT_NOT_READY: u8 = 3;

/// The CLI's subcommands, flattened into the binary's own subcommand list.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Show ProvisioningKeys: a table, or one key in detail with its PolicyAgents.
    #[command(after_help = status::AFTER_HELP)]
    Status(status::StatusArgs),
    /// Request a rotation of ProvisioningKeys (sets the keyward.dev/rotate annotation).
    #[command(after_help = rotate::AFTER_HELP)]
    Rotate(rotate::RotateArgs),
    /// Put a deactivated key back into the trusted set (sets the keyward.dev/reactivate
    /// annotation).
    #[command(after_help = reactivate::AFTER_HELP)]
    Reactivate(reactivate::ReactivateArgs),
    /// Tokens for agents outside the cluster (`keyward token sync`).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Trust bundles for GitOps repositories and other clusters (`keyward bundle export`).
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
}

/// Where to connect and which namespace: the flags `kubectl` users expect.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Target {
    /// Namespace (default: the kubeconfig context's namespace, else `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// `-o` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// The table (or the detailed view for one key).
    #[default]
    Table,
    /// The table with more columns (full key ids, fingerprints, trusted keys, messages).
    Wide,
    /// A JSON summary (no key material: key ids and fingerprints only).
    Json,
    /// The same summary as YAML.
    Yaml,
}

/// What can go wrong; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("ProvisioningKey {name:?} not found in namespace {namespace:?}")]
    NotFound { namespace: String, name: String },
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no usable Kubernetes configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("cannot encode the output: {0}")]
    Encode(String),
}

impl CliError {
    /// Adds a hint to errors a user can act on.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CliError::NotFound { .. } => {
                Some("list the keys with `keyward status -n <namespace>` or `keyward status -A`")
            }
            CliError::Kube(kube::Error::Api(s)) if s.is_forbidden() => Some(
                "the CLI needs get/list on provisioningkeys and policyagents, and patch on provisioningkeys (rotate)",
            ),
            CliError::Kube(kube::Error::Api(s)) if s.is_not_found() => {
                Some("are the Keyward CRDs installed? (`keyward crds | kubectl apply -f -`)")
            }
            _ => None,
        }
    }
}

/// A client and the namespace to use when none is given, from `--kubeconfig`/`--context`, else
/// the usual inference (`$KUBECONFIG`, `~/.kube/config`, in-cluster).
pub async fn connect(target: &Target) -> Result<(kube::Client, String), CliError> {
    let options = KubeConfigOptions {
        context: target.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&target.kubeconfig, &target.context) {
        (Some(path), _) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|source| CliError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CliError::Config(e.to_string()))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
    };
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    Ok((client, namespace))
}

/// Runs a CLI subcommand and maps the outcome to the documented exit code.
pub async fn run(command: Command) -> ExitCode {
    let (name, result) = match command {
        Command::Status(args) => ("status", status::run(args).await),
        Command::Rotate(args) => ("rotate", rotate::run(args).await),
        Command::Reactivate(args) => ("reactivate", reactivate::run(args).await),
        Command::Token(command) => ("token sync", token::run(command).await),
        Command::Bundle(command) => ("bundle export", bundle::run(command).await),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("keyward {name}: error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Prints a serializable value as JSON or YAML.
pub(crate) fn encode<T: serde::Serialize>(value: &T, output: Output) -> Result<String, CliError> {
    match output {
        Output::Yaml => serde_yaml::to_string(value).map_err(|e| CliError::Encode(e.to_string())),
        _ => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(|e| CliError::Encode(e.to_string())),
    }
}

#[cfg(test)]
mod tests;
