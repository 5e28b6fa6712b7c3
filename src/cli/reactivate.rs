//! `keyward reactivate <name> <kid> --reason <text>`: puts a deactivated key back into the
//! trusted set, through the `keyward.dev/reactivate` annotation (one JSON merge patch of
//! `metadata.annotations`, as `rotate` does; the spec is never written). GitOps setups set the
//! same annotation in the manifest.
//!
//! The CLI refuses up front what the operator would refuse (reading the key's status): a key id
//! this key never had, one still trusted, a destroyed one, one listed in `compromisedKeys`.

use std::time::Duration;

use chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::{CliError, EXIT_ERROR, EXIT_NOT_READY, EXIT_OK, Output, Target};
use crate::api::ProvisioningKey;
use crate::labels;

pub const AFTER_HELP: &str = "\
A revoked key is first deactivated: every verifier refuses it, but its key Secret keeps the private
key for spec.rotation.retainDeactivatedFor (default 24h). Until then this command puts it back into
the trust bundle as a retiring key, with a KeyReactivated audit Event carrying --reason. It stays
trusted at least rotation.overlap from the reactivation, then is revoked again on the usual
evidence. A key listed in spec.compromisedKeys, or one already destroyed, is never reactivated.

It sets keyward.dev/reactivate=<kid>,<time> and keyward.dev/reactivate-reason=<reason> with a merge
patch of metadata.annotations only.

Examples:
  keyward status -n payments opa                  the detailed view lists revoked keys and states
  keyward reactivate -n payments opa <kid> --reason 'INC-1234: billing still on the old key'
  keyward reactivate -n payments opa <kid> --reason '...' --wait

Exit codes:
  0  requested (with --wait: the key is trusted again)
  1  error: no such key or key id, the key id cannot be reactivated (the message says why),
     the API server refused or was unreachable
  2  usage error
  3  --wait: requested, but the key was not trusted again within --timeout";

#[derive(clap::Args, Debug)]
pub struct ReactivateArgs {
    /// The ProvisioningKey.
    pub name: String,
    /// The key id (kid) to reactivate, as `keyward status <name>` lists it. A key id is
    /// base64url and may begin with `-` (one in 64 does): it is taken as the key id, not as
    /// an option.
    #[arg(allow_hyphen_values = true)]
    pub kid: String,
    /// Why: recorded in the KeyReactivated audit Event (at most 256 characters).
    #[arg(long, value_parser = parse_reason)]
    pub reason: String,
    #[command(flatten)]
    pub target: Target,
    /// Wait until the key id is trusted again.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (Go-style duration).
    #[arg(long, default_value = "2m", value_parser = super::rotate::parse_timeout, requires = "wait")]
    pub timeout: Duration,
    /// Output format (json and yaml describe the request).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn parse_reason(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        return Err("a reason is required (it goes into the audit Event)".into());
    }
    if s.chars().count() > 256 {
        return Err("at most 256 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("control characters are not allowed".into());
    }
    Ok(s.to_string())
}

/// What was requested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reactivation {
    pub namespace: String,
    pub name: String,
    pub kid: String,
    /// The annotation value written.
    pub request: String,
    pub reason: String,
    /// With --wait: whether the key id is trusted again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted: Option<bool>,
}

/// Why `kid` of `pk` cannot be reactivated, from its spec and status; `None` when it is a
/// deactivated key whose private key is kept.
pub fn refusal(pk: &ProvisioningKey, kid: &str) -> Option<String> {
    if pk.spec.compromised_keys.iter().any(|k| k.0 == kid) {
        return Some(format!(
            "key {kid} is listed in spec.compromisedKeys and is never reactivated"
        ));
    }
    let status = pk.status.clone().unwrap_or_default();
    if status.trusted_keys.iter().any(|k| k.kid == kid) {
        return Some(format!("key {kid} is still trusted; nothing to reactivate"));
    }
    match status.revoked_keys.iter().find(|k| k.kid == kid) {
        Some(k) if k.state.as_deref() == Some("Deactivated") => None,
        Some(_) => Some(format!(
            "key {kid} is destroyed (its private key is deleted); only a rotation brings a new key"
        )),
        None => Some(format!(
            "this ProvisioningKey's status lists no revoked key {kid} (see `keyward status {}`)",
            pk.name_any()
        )),
    }
}

/// The merge patch: the request and its reason, `metadata.annotations` only.
pub fn request_patch(request: &str, reason: &str) -> serde_json::Value {
    json!({ "metadata": { "annotations": {
        labels::REACTIVATE: request,
        labels::REACTIVATE_REASON: reason,
    } } })
}

/// Whether the key id is trusted again (in the status the operator wrote for this generation).
pub fn trusted_again(pk: &ProvisioningKey, kid: &str) -> bool {
    pk.status
        .as_ref()
        .is_some_and(|s| s.trusted_keys.iter().any(|k| k.kid == kid))
}

pub async fn run(args: ReactivateArgs) -> Result<u8, CliError> {
    let (client, namespace) = super::connect(&args.target).await?;
    let api: Api<ProvisioningKey> = Api::namespaced(client, &namespace);
    let Some(pk) = api.get_opt(&args.name).await? else {
        return Err(CliError::NotFound {
            namespace,
            name: args.name.clone(),
        });
    };
    if let Some(why) = refusal(&pk, &args.kid) {
        eprintln!(
            "keyward reactivate: error: {namespace}/{}: {why}",
            args.name
        );
        return Ok(EXIT_ERROR);
    }
    let request = format!("{},{}", args.kid, super::rotate::request_value(Utc::now()));
    api.patch(
        &args.name,
        &PatchParams::default(),
        &Patch::Merge(&request_patch(&request, &args.reason)),
    )
    .await?;
    let mut done = Reactivation {
        namespace: namespace.clone(),
        name: pk.name_any(),
        kid: args.kid.clone(),
        request,
        reason: args.reason.clone(),
        trusted: None,
    };
    if matches!(args.output, Output::Table | Output::Wide) {
        println!(
            "provisioningkey {namespace}/{}: reactivation of key {} requested ({}={})",
            done.name,
            done.kid,
            labels::REACTIVATE,
            done.request
        );
    }
    let mut late = false;
    if args.wait {
        let kid = args.kid.clone();
        let watch = super::rotate::await_rotated(api, &args.name, move |o| {
            o.is_some_and(|pk| trusted_again(pk, &kid))
        });
        let trusted = matches!(
            tokio::time::timeout(args.timeout, watch).await,
            Ok(Ok(Some(_)))
        );
        done.trusted = Some(trusted);
        late = !trusted;
        if matches!(args.output, Output::Table | Output::Wide) {
            println!(
                "provisioningkey {namespace}/{}: key {} {}",
                done.name,
                done.kid,
                if trusted {
                    "is trusted again"
                } else {
                    "is not trusted again yet (--timeout)"
                }
            );
        }
    }
    if !matches!(args.output, Output::Table | Output::Wide) {
        print!("{}", super::encode(&done, args.output)?);
    }
    Ok(if late { EXIT_NOT_READY } else { EXIT_OK })
}
