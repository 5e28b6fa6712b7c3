//! The outage phase (`--outages 5,30,120`): recovery after the API server was away.
//!
//! For each length L: the API server is SIGKILLed (`e2e/cluster.sh apiserver-kill`), stays
//! down L seconds, and is started again with the same flags (`apiserver-start`, which returns
//! once `/readyz` answers: "the return"). At the return the driver creates one probe
//! ProvisioningKey and `--outage-backlog` more at once. Reported:
//! - first reconcile: the return until the probe's agent Secret holds a token (the same
//!   definition as the fault suite's `RECOVERY` lines, `e2e/faults.rs`);
//! - the backlog: the return until every backlog key's token is written, and the rate from
//!   the first reconcile to the last backlog token, against the cold start's rate in the same
//!   run (the goal: the backlog drains at least at the cold-start rate);
//! - the operator's first request after the return (API server's audit log);
//! - that every one of the N keys is still Ready afterwards, and the operator never exited.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::audit::AuditLog;
use super::process::Operator;
use super::tracker::{self, Seen, Tracker};
use super::{Args, Report, fixture, guard, say, secs};

/// `bash e2e/cluster.sh <arg>` on the bench's plane (bench.sh exports its directory, ports
/// and audit settings, so the restarted API server keeps writing the audit log).
fn cluster(arg: &str) -> anyhow::Result<()> {
    let script = Path::new("e2e/cluster.sh");
    anyhow::ensure!(
        script.exists(),
        "run the driver from the repository's root (through e2e/bench.sh)"
    );
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(arg)
        .output()
        .with_context(|| format!("run e2e/cluster.sh {arg}"))?;
    anyhow::ensure!(
        out.status.success(),
        "e2e/cluster.sh {arg} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn outage_key(len: u64, i: usize) -> String {
    format!("outage-{len}s-{i:04}")
}

/// Creates key `name` in `ns`, retrying for up to 30 s: right after `/readyz` answers, the
/// API server may still refuse for a moment.
async fn create_key(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<()> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": name },
        "spec": fixture::key_spec(),
    }))?;
    let t = Instant::now();
    loop {
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
            Err(e) if t.elapsed() > Duration::from_secs(30) => {
                return Err(e).with_context(|| format!("create ProvisioningKey {name}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Whether the agent Secret `name` holds a token.
async fn token_written(secrets: &Api<Secret>, name: &str) -> bool {
    secrets
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data)
        .is_some_and(|d| d.contains_key("token"))
}

/// Polls until every one of `names` has its token, or `limit`; returns when each was first
/// seen written (time since `from`).
async fn wait_tokens(
    secrets: &Api<Secret>,
    names: &[String],
    from: Instant,
    limit: Duration,
    concurrency: usize,
) -> HashMap<String, f64> {
    let mut done: HashMap<String, f64> = HashMap::new();
    while done.len() < names.len() && from.elapsed() < limit {
        let pending: Vec<&String> = names.iter().filter(|n| !done.contains_key(*n)).collect();
        let seen: Vec<(String, bool)> = futures::stream::iter(pending.into_iter().map(|n| {
            let secrets = secrets.clone();
            async move { (n.clone(), token_written(&secrets, n).await) }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
        let at = from.elapsed().as_secs_f64();
        for (n, ok) in seen {
            if ok {
                done.insert(n, at);
            }
        }
        if done.len() < names.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    done
}

/// Runs the outages in order. `cold_rate` is the cold start's keys/s in this run (for the
/// backlog's ratio).
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    args: &Args,
    report: &mut Report,
    admin: &Client,
    ns: &str,
    audit: &mut AuditLog,
    op: &mut Operator,
    keys: &Tracker,
    cold_rate: Option<f64>,
) -> anyhow::Result<()> {
    let pks: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), ns, &tracker::provisioning_keys());
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let limit = Duration::from_secs(120 + args.outage_backlog as u64);
    let mut summary = Vec::new();
    for &len in &args.outages {
        guard::check()?;
        anyhow::ensure!(op.running(), "the operator exited before the outage");
        say(&format!("outage: API server killed for {len} s"));
        let t_kill = Timestamp::now();
        cluster("apiserver-kill")?;
        tokio::time::sleep(Duration::from_secs(len)).await;
        cluster("apiserver-start").context("restart the API server")?;
        let back = Instant::now();
        let t_back = Timestamp::now();
        anyhow::ensure!(
            op.running(),
            "the operator exited while the API server was away"
        );
        let probe = outage_key(len, 0);
        create_key(&pks, &probe).await?;
        let backlog: Vec<String> = (1..=args.outage_backlog)
            .map(|i| outage_key(len, i))
            .collect();
        futures::stream::iter(backlog.iter().map(|n| create_key(&pks, n)))
            .buffer_unordered(args.concurrency.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<Vec<()>>>()?;
        let first = wait_tokens(&secrets, std::slice::from_ref(&probe), back, limit, 1)
            .await
            .get(&probe)
            .copied();
        let drained = wait_tokens(&secrets, &backlog, back, limit, args.concurrency).await;
        let all = drained.len() == backlog.len();
        let last = drained.values().copied().fold(0.0_f64, f64::max);
        tokio::time::sleep(Duration::from_secs(1)).await;
        audit.refresh()?;
        let first_req = audit
            .between(t_back, Timestamp::now())
            .first()
            .map(|r| secs(t_back, r.at));
        let first_write = audit
            .between(t_back, Timestamp::now())
            .iter()
            .find(|r| r.is_write())
            .map(|r| secs(t_back, r.at));
        // Every key of the run still Ready (the tracker's watch has come back by now).
        let n = args.n;
        let ready = |m: &HashMap<String, Seen>| m.values().filter(|s| s.settled()).count();
        let still = keys
            .wait(
                &format!("the {n} keys Ready after the {len} s outage"),
                Duration::from_secs(120),
                |m| ready(m) >= n,
                |m| format!("{} of at least {n} Ready", ready(m)),
            )
            .await
            .is_ok();
        if let Some(f) = first {
            report.num(&format!("recovery_{len}s_first_s"), f);
        }
        // The drain rate counts from the first reconcile: what the operator achieves once it
        // works again, comparable with the cold start's rate.
        let rate = (all && !backlog.is_empty())
            .then(|| backlog.len() as f64 / (last - first.unwrap_or(0.0)).max(0.001));
        if let Some(r) = rate {
            report.num(&format!("recovery_{len}s_backlog_keys_per_s"), r);
        }
        let fmt = |v: Option<f64>| v.map_or_else(|| "none".to_string(), |v| format!("{v:.2} s"));
        report.row(
            format!("Outage {len} s (API server SIGKILLed, restarted; from /readyz answering)"),
            format!(
                "down {:.1} s in all; first reconcile (a new key's token written) {}; {} backlog keys created at the return: {}; operator's first request {}, first write {}; all {n} keys Ready afterwards: {}",
                secs(t_kill, t_back),
                fmt(first),
                backlog.len(),
                match rate {
                    Some(r) => format!(
                        "all written {last:.1} s after the return, {r:.1} keys/s after the first reconcile{}",
                        cold_rate.map_or_else(String::new, |c| format!(
                            " ({:.2} x the cold start's {c:.1} keys/s)",
                            r / c
                        ))
                    ),
                    None => format!("{} of {} written (timeout)", drained.len(), backlog.len()),
                },
                fmt(first_req),
                fmt(first_write),
                if still { "yes" } else { "NO" }
            ),
        );
        summary.push(format!("{len} s: {}", fmt(first)));
        anyhow::ensure!(
            first.is_some() && all && still,
            "the operator did not recover from the {len} s outage"
        );
    }
    if !summary.is_empty() {
        report.row(
            "Recovery: first reconcile after each outage (goal: within 10 s)",
            summary.join("; "),
        );
    }
    Ok(())
}
