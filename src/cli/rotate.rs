//! `keyward rotate <name>...`: requests a rotation through the `keyward.dev/rotate` annotation,
//! as `kubectl annotate ... keyward.dev/rotate=<new value> --overwrite` would. One JSON merge
//! patch of `metadata.annotations` per key: the CLI never writes a spec, so a GitOps controller
//! syncing the key's manifest sees no drift, and the operator serves each new value exactly once
//! (it records the value it consumed on the key it mints).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::view::{self, KeySummary};
use super::{CliError, EXIT_ERROR, EXIT_NOT_READY, EXIT_OK, Output, Target};
use crate::api::ProvisioningKey;
use crate::labels;

pub const AFTER_HELP: &str = "\
Sets the annotation keyward.dev/rotate to a new value (the current time) with a merge patch of
metadata.annotations only; the spec is never written. The operator mints, publishes and hands
out a new key, rolls the PolicyAgents' workloads and revokes the old key only once every agent is
confirmed on the new one. A request inside rotation.minInterval is delayed, never dropped; a
suspended key rotates when it is resumed. Git-driven setups can use spec.rotation.requestToken
instead.

Examples:
  keyward rotate -n payments opa                  request one rotation
  keyward rotate -n payments --all                every key in the namespace
  keyward rotate -n payments opa --wait && echo   wait until the new key is handed out

Exit codes:
  0  every rotation was requested (with --wait: every new key is handed out and Ready)
  1  error: a named key was not found (the others are still requested), the API server
     refused or was unreachable, the kubeconfig is unusable
  2  usage error (unknown flag, no name and no --all, names with --all)
  3  --wait: requested, but a new key was not handed out within --timeout";

#[derive(clap::Args, Debug)]
pub struct RotateArgs {
    /// ProvisioningKeys to rotate.
    #[arg(required_unless_present = "all", conflicts_with_all = ["all", "all_namespaces"])]
    pub names: Vec<String>,
    /// Rotate every ProvisioningKey in the namespace (with -A: in every namespace).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub target: Target,
    /// Wait until each key's new key is handed out and the key is Ready again.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits for all keys (Go-style duration).
    #[arg(long, default_value = "5m", value_parser = parse_timeout, requires = "wait")]
    pub timeout: Duration,
    /// Output format (json and yaml list what was requested).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub(super) fn parse_timeout(s: &str) -> Result<Duration, String> {
    crate::rotation::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (Go syntax: 30s, 5m, 1h)"))
}

/// The annotation value for a request made at `now`: a new value on every call (microseconds),
/// readable in `kubectl get -o yaml`.
pub fn request_value(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The merge patch `rotate` sends: metadata.annotations only.
pub fn request_patch(value: &str) -> serde_json::Value {
    json!({ "metadata": { "annotations": { labels::ROTATE: value } } })
}

/// What `rotate` did to one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Requested {
    pub namespace: String,
    pub name: String,
    /// The annotation value written.
    pub request: String,
    /// The key handed out when the request was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_key: Option<String>,
    /// With --wait: the key handed out after the rotation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_key: Option<String>,
    /// Something the user should know (suspended, first key not minted yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The line `rotate` prints for one request.
pub fn requested_line(r: &Requested) -> String {
    let mut line = format!(
        "provisioningkey {}/{}: rotation requested ({}={})",
        r.namespace,
        r.name,
        labels::ROTATE,
        r.request
    );
    if let Some(kid) = &r.previous_key {
        line.push_str(&format!("; current key {kid}"));
    }
    if let Some(note) = &r.note {
        line.push_str(&format!("; note: {note}"));
    }
    line
}

/// A note on why a requested rotation may not start at once.
pub fn note_for(pk: &ProvisioningKey) -> Option<String> {
    if pk.spec.suspend == Some(true) {
        Some("spec.suspend is true: the rotation starts when the key is resumed".into())
    } else if pk
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .is_none()
    {
        Some("the key has no current key yet: the first key is minted, no rotation follows".into())
    } else {
        None
    }
}

/// True once the key hands out a key other than `previous`, is Ready and its status describes
/// its current generation.
pub fn rotated_from(pk: &ProvisioningKey, previous: Option<&str>) -> bool {
    let s: KeySummary = view::summarize(pk, &[]);
    let current = s.current_key.as_ref().map(|c| c.kid.as_str());
    current.is_some() && current != previous && s.ready == "True" && {
        pk.status.as_ref().and_then(|st| st.observed_generation) == pk.metadata.generation
    }
}

pub async fn run(args: RotateArgs) -> Result<u8, CliError> {
    let (client, namespace) = super::connect(&args.target).await?;
    let (keys, mut failed) = selected(&args, &client, &namespace).await?;
    let (mut done, request_failed) = request(&args, &client, &keys).await;
    failed |= request_failed;
    let (wait_failed, late) = wait(&args, &client, &mut done).await;
    failed |= wait_failed;
    if !matches!(args.output, Output::Table | Output::Wide) {
        print!("{}", super::encode(&done, args.output)?);
    }
    Ok(if failed {
        EXIT_ERROR
    } else if late {
        EXIT_NOT_READY
    } else {
        EXIT_OK
    })
}

/// The ProvisioningKeys named (or all of them), and whether one named was missing.
async fn selected(
    args: &RotateArgs,
    client: &kube::Client,
    namespace: &str,
) -> Result<(Vec<ProvisioningKey>, bool), CliError> {
    let namespace = namespace.to_string();
    let api_for = |ns: &str| Api::<ProvisioningKey>::namespaced(client.clone(), ns);
    let mut failed = false;
    let mut keys: Vec<ProvisioningKey> = vec![];
    if args.all {
        let api: Api<ProvisioningKey> = if args.target.all_namespaces {
            Api::all(client.clone())
        } else {
            api_for(&namespace)
        };
        keys = api.list(&ListParams::default()).await?.items;
        keys.sort_by_key(|k| (k.namespace(), k.name_any()));
        if keys.is_empty() {
            if args.target.all_namespaces {
                eprintln!("No ProvisioningKeys found.");
            } else {
                eprintln!("No ProvisioningKeys found in namespace {namespace}.");
            }
        }
    } else {
        for name in &args.names {
            match api_for(&namespace).get_opt(name).await? {
                Some(pk) => keys.push(pk),
                None => {
                    failed = true;
                    eprintln!(
                        "keyward rotate: error: {}",
                        CliError::NotFound {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        }
                    );
                }
            }
        }
    }

    Ok((keys, failed))
}

/// Asks each key for a rotation; what was asked, and whether a request failed.
async fn request(
    args: &RotateArgs,
    client: &kube::Client,
    keys: &[ProvisioningKey],
) -> (Vec<Requested>, bool) {
    let api_for = |ns: &str| Api::<ProvisioningKey>::namespaced(client.clone(), ns);
    let mut failed = false;
    let mut done: Vec<Requested> = vec![];
    for pk in keys {
        let ns = pk.namespace().unwrap_or_default();
        let name = pk.name_any();
        let value = request_value(Utc::now());
        let patched = api_for(&ns)
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&request_patch(&value)),
            )
            .await;
        match patched {
            Ok(_) => {
                let r = Requested {
                    namespace: ns,
                    name,
                    request: value,
                    previous_key: pk
                        .status
                        .as_ref()
                        .and_then(|s| s.current_key.as_ref())
                        .map(|c| c.kid.clone()),
                    new_key: None,
                    note: note_for(pk),
                };
                if matches!(args.output, Output::Table | Output::Wide) {
                    println!("{}", requested_line(&r));
                }
                done.push(r);
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                failed = true;
                eprintln!(
                    "keyward rotate: error: {}",
                    CliError::NotFound {
                        namespace: ns,
                        name
                    }
                );
            }
            Err(e) => {
                failed = true;
                let e = CliError::from(e);
                eprintln!("keyward rotate: error: {ns}/{name}: {e}");
                if let Some(hint) = e.hint() {
                    eprintln!("hint: {hint}");
                }
            }
        }
    }

    (done, failed)
}

/// Watches ProvisioningKey `name` until `cond` holds; `Ok(None)` when it is deleted. An API
/// server that stops answering is waited out (the operator's watch backoff: 200 ms doubling to
/// 4 s, jittered), so only `--timeout` ends the wait: a restart of the API server mid-rotation
/// does not fail `keyward rotate --wait`. Said once on stderr.
pub(super) async fn await_rotated(
    api: Api<ProvisioningKey>,
    name: &str,
    cond: impl Fn(Option<&ProvisioningKey>) -> bool,
) -> Result<Option<ProvisioningKey>, kube::runtime::watcher::Error> {
    use futures::StreamExt as _;
    let outage = std::sync::Arc::new(crate::controller::backoff::Outage::default());
    let watch = kube::runtime::watcher::watch_object(api, name);
    let mut events = std::pin::pin!(crate::controller::backoff::watch_backoff(watch, outage));
    let mut seen = false;
    let mut told = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(obj) => {
                if cond(obj.as_ref()) {
                    return Ok(obj);
                }
                match obj {
                    Some(_) => seen = true,
                    None if seen => return Ok(None),
                    None => {}
                }
            }
            Err(e) if !told => {
                told = true;
                eprintln!(
                    "keyward rotate: the API server does not answer ({e}); still waiting (--timeout)"
                );
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

/// With `--wait`, waits for each requested key to rotate: whether watching failed, and whether
/// a key did not rotate in time.
async fn wait(args: &RotateArgs, client: &kube::Client, done: &mut [Requested]) -> (bool, bool) {
    let api_for = |ns: &str| Api::<ProvisioningKey>::namespaced(client.clone(), ns);
    let mut failed = false;
    let mut late = false;
    if args.wait && !done.is_empty() {
        let deadline = tokio::time::Instant::now() + args.timeout;
        for r in done.iter_mut() {
            let api = api_for(&r.namespace);
            let previous = r.previous_key.clone();
            let cond = move |o: Option<&ProvisioningKey>| {
                o.is_some_and(|pk| rotated_from(pk, previous.as_deref()))
            };
            match tokio::time::timeout_at(deadline, await_rotated(api.clone(), &r.name, cond)).await
            {
                Ok(Ok(Some(pk))) => {
                    r.new_key = pk
                        .status
                        .as_ref()
                        .and_then(|s| s.current_key.as_ref())
                        .map(|c| c.kid.clone());
                    if matches!(args.output, Output::Table | Output::Wide) {
                        println!(
                            "provisioningkey {}/{}: rotated: {} -> {}",
                            r.namespace,
                            r.name,
                            r.previous_key.as_deref().unwrap_or("none"),
                            r.new_key.as_deref().unwrap_or("none"),
                        );
                    }
                }
                Ok(Ok(None)) => {
                    failed = true;
                    eprintln!(
                        "keyward rotate: error: ProvisioningKey {}/{} was deleted while waiting",
                        r.namespace, r.name
                    );
                }
                Ok(Err(e)) => {
                    failed = true;
                    eprintln!(
                        "keyward rotate: error: watching {}/{}: {e}",
                        r.namespace, r.name
                    );
                }
                Err(_) => {
                    late = true;
                    let why = match api.get_opt(&r.name).await {
                        Ok(Some(pk)) => {
                            let s = view::summarize(&pk, &[]);
                            format!(
                                "phase {}, {}",
                                s.phase.as_deref().unwrap_or("unknown"),
                                s.unhealthy_reason
                                    .unwrap_or_else(|| "the new key is not handed out yet".into())
                            )
                        }
                        _ => "its status could not be read".to_string(),
                    };
                    eprintln!(
                        "keyward rotate: {}/{}: not rotated within {}: {why}",
                        r.namespace,
                        r.name,
                        humantime::format_duration(args.timeout)
                    );
                }
            }
        }
    }

    (failed, late)
}
