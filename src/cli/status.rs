//! `keyward status [<name>]`: a table of ProvisioningKeys, or one key in detail with its
//! PolicyAgents, conditions and history. Read-only.

use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde::Serialize;

use super::view::{self, KeySummary};
use super::{CliError, EXIT_NOT_READY, EXIT_OK, Output, Target};
use crate::api::{PolicyAgent, ProvisioningKey};

pub const AFTER_HELP: &str = "\
Columns: READY is the Ready condition; AGENTS is PolicyAgents confirmed on the current key /
PolicyAgents referencing the key; KEY ID is shortened (-o wide shows it whole, with the
fingerprint, the trusted keys and why a key needs attention). Key material is never shown.

Examples:
  keyward status -A                      every key in every namespace
  keyward status -n payments opa         one key in detail: agents, conditions, history
  keyward status -n payments && deploy   go on only when every key is Ready and not Stalled

Exit codes:
  0  every key shown is Ready and none is Stalled (also: no keys at all)
  1  error: the named key was not found, the API server refused or was unreachable,
     the kubeconfig is unusable
  2  usage error (unknown flag, missing or conflicting arguments)
  3  a key shown is not Ready, is Stalled, or its status is older than its spec";

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The ProvisioningKey to show in detail (default: a table of every key in the namespace).
    #[arg(conflicts_with = "all_namespaces")]
    pub name: Option<String>,
    #[command(flatten)]
    pub target: Target,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// The `-o json|yaml` document for the table.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    healthy: bool,
    items: &'a [KeySummary],
}

/// The exit code for keys shown: [`EXIT_NOT_READY`] when any needs attention.
pub fn exit_code<'a>(keys: impl IntoIterator<Item = &'a KeySummary>) -> u8 {
    if keys.into_iter().all(|k| k.healthy) {
        EXIT_OK
    } else {
        EXIT_NOT_READY
    }
}

pub async fn run(args: StatusArgs) -> Result<u8, CliError> {
    let (client, namespace) = super::connect(&args.target).await?;
    let now = chrono::Utc::now();
    let (pks, agents): (Api<ProvisioningKey>, Api<PolicyAgent>) = if args.target.all_namespaces {
        (Api::all(client.clone()), Api::all(client))
    } else {
        (
            Api::namespaced(client.clone(), &namespace),
            Api::namespaced(client, &namespace),
        )
    };
    match &args.name {
        Some(name) => {
            let pk = pks.get_opt(name).await?.ok_or_else(|| CliError::NotFound {
                namespace: namespace.clone(),
                name: name.clone(),
            })?;
            let agents = agents.list(&ListParams::default()).await?.items;
            let detail = view::detail(&pk, &agents);
            match args.output {
                Output::Table | Output::Wide => print!("{}", view::detail_text(&detail, now)),
                out => print!("{}", super::encode(&detail, out)?),
            }
            Ok(exit_code([&detail.summary]))
        }
        None => {
            let mut keys = pks.list(&ListParams::default()).await?.items;
            keys.sort_by_key(|k| (k.namespace(), k.name_any()));
            let agents = agents.list(&ListParams::default()).await?.items;
            let rows: Vec<KeySummary> = keys.iter().map(|k| view::summarize(k, &agents)).collect();
            match args.output {
                Output::Table | Output::Wide => {
                    if rows.is_empty() {
                        if args.target.all_namespaces {
                            eprintln!("No ProvisioningKeys found.");
                        } else {
                            eprintln!("No ProvisioningKeys found in namespace {namespace}.");
                        }
                    } else {
                        print!(
                            "{}",
                            view::keys_table(
                                &rows,
                                args.target.all_namespaces,
                                args.output == Output::Wide,
                                now
                            )
                        );
                    }
                }
                out => print!(
                    "{}",
                    super::encode(
                        &List {
                            healthy: rows.iter().all(|k| k.healthy),
                            items: &rows,
                        },
                        out
                    )?
                ),
            }
            Ok(exit_code(&rows))
        }
    }
}
