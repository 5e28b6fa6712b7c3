//! `keyward bundle export <name>`: the keys a ProvisioningKey's control plane must trust, for
//! GitOps repositories and other clusters: a JWKS file (`--format jwks`, the default) or a
//! ConfigMap manifest (`--format configmap`) holding `jwks.json` and `revoked.json`.
//!
//! It exports what a `keyward verifier` would trust, never more: a key id is exported only when
//! the trust bundle lists it **and** the key's trust record (which only the operator writes)
//! does, so a JWK someone injected into the ConfigMap never leaves the cluster. A key with no
//! readable record exports nothing and says why.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{CliError, EXIT_ERROR, EXIT_OK, Target};
use crate::api::ProvisioningKey;
use crate::keys::Jwks;
use crate::labels as l;
use crate::trust_record::TrustRecord;
use crate::verifier::index::Bundle;

pub const AFTER_HELP: &str = "\
Exports only key ids that the trust bundle lists AND the key's trust record (written only by the
operator) lists: what every keyward verifier trusts now. The ConfigMap form is labelled
keyward.dev/exported-from=<namespace>.<name> and not app.kubernetes.io/managed-by=keyward, so no
operator or verifier takes a copy for a live bundle; re-export after each rotation (a GitOps job).

Examples:
  keyward bundle export -n payments opa-agents > jwks.json
  keyward bundle export -n payments opa-agents --format configmap --name opa-trust \\
      --to-namespace edge > gitops/edge/opa-trust.yaml

Exit codes:
  0  exported
  1  error: the key or its bundle does not exist, the key has no readable trust record yet, the
     API server refused or was unreachable (the message says which)";

#[derive(clap::Subcommand, Debug)]
pub enum BundleCommand {
    /// Export the keys a ProvisioningKey's control plane must trust (JWKS or ConfigMap).
    #[command(after_help = AFTER_HELP)]
    Export(ExportArgs),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A JWKS document (`{"keys": [...]}`).
    Jwks,
    /// A ConfigMap manifest (YAML) with `jwks.json` and `revoked.json`.
    Configmap,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The ProvisioningKey.
    pub name: String,
    #[command(flatten)]
    pub target: Target,
    #[arg(long, value_enum, default_value_t = Format::Jwks)]
    pub format: Format,
    /// `--format configmap`: the ConfigMap's name (default `<name>-trust`).
    #[arg(long = "name")]
    pub cm_name: Option<String>,
    /// `--format configmap`: its namespace (default: none, set by whoever applies it).
    #[arg(long)]
    pub to_namespace: Option<String>,
    /// Write here instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The trusted JWKS and the revoked key ids of `pk`'s bundle `cm`, or why there are none.
pub fn trusted(pk: &ProvisioningKey, cm: &ConfigMap) -> Result<(Jwks, Vec<String>), String> {
    let record = match TrustRecord::of(pk) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Err(format!("its trust record is unreadable ({e})")),
        None => {
            return Err(
                "it has no trust record yet (the operator has not reconciled it): nothing is trusted"
                    .into(),
            );
        }
    };
    let bundle = Bundle::parse(cm).map_err(|e| format!("its trust bundle {}", e))?;
    let owner = pk.metadata.uid.clone().unwrap_or_default();
    if bundle.key_name != pk.name_any() || !bundle.owner_uids.contains(&owner) {
        return Err(format!(
            "ConfigMap {} is not this key's trust bundle (label or owner differ)",
            cm.name_any()
        ));
    }
    let jwks = Jwks {
        keys: bundle
            .jwks
            .keys
            .into_iter()
            .filter(|k| k.kid.as_deref().is_some_and(|kid| record.has(kid)))
            .collect(),
    };
    let revoked = bundle
        .revoked
        .into_iter()
        .filter(|k| !record.has(k))
        .collect();
    Ok((jwks, revoked))
}

/// The export as text.
pub fn render(
    pk: &ProvisioningKey,
    jwks: &Jwks,
    revoked: &[String],
    args: &ExportArgs,
) -> Result<String, CliError> {
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| CliError::Encode(e.to_string()))
    };
    let jwks_text =
        pretty(&serde_json::to_value(jwks).map_err(|e| CliError::Encode(e.to_string()))?)?;
    match args.format {
        Format::Jwks => Ok(jwks_text + "\n"),
        Format::Configmap => {
            let from = format!("{}.{}", pk.namespace().unwrap_or_default(), pk.name_any());
            let mut metadata = json!({
                "name": args.cm_name.clone().unwrap_or_else(|| format!("{}-trust", pk.name_any())),
                "labels": { l::EXPORTED_FROM: from },
            });
            if let Some(ns) = &args.to_namespace {
                metadata["namespace"] = json!(ns);
            }
            let data: BTreeMap<&str, String> = BTreeMap::from([
                (l::DATA_JWKS, jwks_text),
                (l::DATA_REVOKED, pretty(&json!(revoked))?),
            ]);
            let cm = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": metadata,
                "data": data,
            });
            serde_yaml::to_string(&cm).map_err(|e| CliError::Encode(e.to_string()))
        }
    }
}

pub async fn run(command: BundleCommand) -> Result<u8, CliError> {
    let BundleCommand::Export(args) = command;
    let (client, ns) = super::connect(&args.target).await?;
    let pks: Api<ProvisioningKey> = Api::namespaced(client.clone(), &ns);
    let Some(pk) = pks.get_opt(&args.name).await? else {
        return Err(CliError::NotFound {
            namespace: ns,
            name: args.name.clone(),
        });
    };
    let bundle_name = TrustRecord::of(&pk)
        .and_then(Result::ok)
        .map_or_else(|| pk.trust_bundle_name(), |r| r.bundle);
    let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
    let Some(cm) = cms.get_opt(&bundle_name).await? else {
        eprintln!(
            "keyward bundle export: error: {ns}/{}: its trust bundle ConfigMap {bundle_name} does not exist",
            args.name
        );
        return Ok(EXIT_ERROR);
    };
    let (jwks, revoked) = match trusted(&pk, &cm) {
        Ok(t) => t,
        Err(why) => {
            eprintln!("keyward bundle export: error: {ns}/{}: {why}", args.name);
            return Ok(EXIT_ERROR);
        }
    };
    let text = render(&pk, &jwks, &revoked, &args)?;
    match &args.out {
        Some(path) => std::fs::write(path, text)
            .map_err(|e| CliError::Encode(format!("cannot write {}: {e}", path.display())))?,
        None => print!("{text}"),
    }
    Ok(EXIT_OK)
}
