//! The soak (`keyward-bench --soak-minutes M`, run by `bash e2e/bench.sh soak`; issue 20,
//! part 7): N ProvisioningKeys (200 in `bench.sh soak`) rotating every 60 s, with the operator's
//! floors lowered by its flags, 20 PolicyAgents (one Deployment of agent pods each, run by the
//! stand-in kubelet, one per key) confirming every rotation, and `keyward verifier` replicas
//! (2) vouching for `revokeWhenUnusedFor`, for M minutes.
//!
//! Every minute it prints the RSS of the operator and of each replica, the watches open on the
//! API server, the rotations so far, and the violations of the promise it sees in a full read
//! of the namespace:
//! - a trust bundle that is missing or empty, or trusts a key id it also lists as revoked;
//! - a ProvisioningKey with more than one key Secret in state `active` in two reads a minute
//!   apart (one read can fall between an activation's two writes; those are counted);
//! - an agent Secret whose token is expired, not yet valid, or signed by a key id its bundle
//!   does not trust;
//! - a key id that left a bundle and came back;
//! - a process (operator or replica) that exited.
//!
//! At the end: RSS at the first and the last minute and its maximum, per process (no growth is
//! the goal), the rotations completed, and every violation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use keyward_testbed::{HttpAgent, Kubelet, KubeletConfig};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::json;

use super::{Args, Report, fixture, guard, say};

const NS: &str = "bench-soak";

/// `VmRSS` of `pid` in MiB, `None` when it is gone.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Watches open on the API server (`apiserver_longrunning_requests`, verb WATCH), all clients.
async fn open_watches(admin: &kube::Client) -> Option<f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).ok()?;
    let text = admin.request_text(req).await.ok()?;
    Some(
        text.lines()
            .filter(|l| {
                l.starts_with("apiserver_longrunning_requests{") && l.contains("verb=\"WATCH\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// `(kid, nbf, exp)` of a compact JWS, unverified (only the times the operator wrote).
fn token_times(token: &str) -> Option<(String, i64, i64)> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.trim().split('.');
    let header: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts.next()?).ok()?).ok()?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts.next()?).ok()?).ok()?;
    Some((
        header["kid"].as_str()?.to_string(),
        claims["nbf"].as_i64()?,
        claims["exp"].as_i64()?,
    ))
}

fn label<'a>(meta: &'a kube::api::ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// What one full read of the namespace shows.
#[derive(Default)]
struct Sample {
    /// Highest key sequence number per ProvisioningKey (1 + rotations started).
    seqs: BTreeMap<String, u32>,
    /// Trusted key ids per ProvisioningKey.
    trusted: BTreeMap<String, BTreeSet<String>>,
    /// ProvisioningKeys with more than one key Secret in state `active` in this read.
    two_active: BTreeSet<String>,
    violations: Vec<String>,
}

async fn sample(admin: &kube::Client) -> anyhow::Result<Sample> {
    let mut out = Sample::default();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), NS);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), NS);
    let bundles = cms
        .list(&ListParams::default().labels("keyward.dev/component=trust-bundle"))
        .await?;
    let mut revoked: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for cm in &bundles.items {
        let Some(pk) = label(&cm.metadata, "keyward.dev/provisioning-key") else {
            continue;
        };
        let data = cm.data.clone().unwrap_or_default();
        let kids: BTreeSet<String> = data
            .get("jwks.json")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .and_then(|j| {
                j["keys"].as_array().map(|keys| {
                    keys.iter()
                        .filter_map(|k| k["kid"].as_str().map(String::from))
                        .collect()
                })
            })
            .unwrap_or_default();
        let gone: BTreeSet<String> = data
            .get("revoked.json")
            .and_then(|j| serde_json::from_str::<Vec<String>>(j).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        if kids.is_empty() {
            out.violations
                .push(format!("trust bundle of {pk} is empty"));
        }
        for k in kids.intersection(&gone) {
            out.violations.push(format!(
                "trust bundle of {pk} trusts {k}, which it lists as revoked"
            ));
        }
        out.trusted.insert(pk.to_string(), kids);
        revoked.insert(pk.to_string(), gone);
    }
    let keys = secrets
        .list_metadata(&ListParams::default().labels("keyward.dev/component=key"))
        .await?;
    let mut active: BTreeMap<String, usize> = BTreeMap::new();
    for s in &keys.items {
        let Some(pk) = label(&s.metadata, "keyward.dev/provisioning-key") else {
            continue;
        };
        let seq: u32 = label(&s.metadata, "keyward.dev/key-seq")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let e = out.seqs.entry(pk.to_string()).or_default();
        *e = (*e).max(seq);
        if label(&s.metadata, "keyward.dev/key-state") == Some("active") {
            *active.entry(pk.to_string()).or_default() += 1;
        }
    }
    // Activation is two writes (the new key made active, then the old one retiring), so one
    // read can fall between them; only a key seen so in two reads a minute apart is stuck.
    out.two_active = active
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(pk, _)| pk)
        .collect();
    let agents = secrets
        .list(&ListParams::default().labels("keyward.dev/component=agent-secret"))
        .await?;
    let now = Timestamp::now().as_second();
    for s in &agents.items {
        let Some(pk) = label(&s.metadata, "keyward.dev/provisioning-key") else {
            continue;
        };
        let Some(token) = s
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(|t| String::from_utf8(t.0.clone()).ok())
        else {
            out.violations
                .push(format!("agent Secret of {pk} holds no token"));
            continue;
        };
        match token_times(&token) {
            None => out
                .violations
                .push(format!("agent Secret of {pk} holds an unreadable token")),
            Some((kid, nbf, exp)) => {
                if now >= exp || nbf > now + 1 {
                    out.violations.push(format!(
                        "agent token of {pk} is not valid now (nbf {nbf}, exp {exp}, now {now})"
                    ));
                }
                let trusted = out.trusted.get(pk).is_some_and(|t| t.contains(&kid));
                if !trusted {
                    // The bundle may have been read before a hand-out that happened since:
                    // only a kid the bundle revoked is certain.
                    if revoked.get(pk).is_some_and(|r| r.contains(&kid)) {
                        out.violations.push(format!(
                            "agent token of {pk} is signed by revoked key {kid}"
                        ));
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The verifier replicas as the operator reads them now: `(behind, silent)` replica names. A
/// replica whose watermark (`renewTime`) is older than its lease duration is behind when its
/// heartbeat is fresh, silent otherwise.
async fn replicas_state(
    admin: &kube::Client,
    ns: &str,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    use k8s_openapi::api::coordination::v1::Lease;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let now = Timestamp::now();
    let (mut behind, mut silent) = (Vec::new(), Vec::new());
    for l in leases
        .list(&ListParams::default().labels("keyward.dev/component=verifier"))
        .await?
        .items
    {
        let name = l.metadata.name.clone().unwrap_or_default();
        let spec = l.spec.clone().unwrap_or_default();
        let dur = f64::from(spec.lease_duration_seconds.unwrap_or(0));
        let lag =
            |t: Option<Timestamp>| t.map_or(f64::INFINITY, |t| now.duration_since(t).as_secs_f64());
        if lag(spec.renew_time.map(|t| t.0)) <= dur {
            continue;
        }
        let heartbeat = l
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("keyward.dev/heartbeat"))
            .and_then(|t| t.parse::<Timestamp>().ok());
        if lag(heartbeat) <= dur {
            behind.push(name);
        } else {
            silent.push(name);
        }
    }
    Ok((behind, silent))
}

pub async fn run(args: &Args, report: &mut Report, guard: &guard::Guard) -> anyhow::Result<()> {
    let minutes = args.soak_minutes;
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    let admin = keyward_testbed::client().await;
    fixture::namespaces(&admin, &[NS.to_string(), args.lease_namespace.clone()]).await?;

    // The operator: floors lowered so a 60 s interval is legal, reading the verifier Leases.
    let log = args.out.join(format!("operator-soak-n{}.log", args.n));
    let op_args: Vec<String> = std::iter::once("run")
        .chain(keyward_testbed::LOWERED_FLOORS)
        .map(String::from)
        .collect();
    let mut op = super::start_operator(
        args,
        guard,
        &log,
        &op_args,
        &[(
            "KEYWARD_VERIFIER_NAMESPACE".to_string(),
            args.lease_namespace.clone(),
        )],
    )?;

    // The keys, the agents, the replicas.
    let spec = json!({
        "rotation": {
            "interval": "60s", "minInterval": "30s", "publishDelay": "2s", "overlap": "10s",
            "confirmationTimeout": "5m", "revokeWhenUnusedFor": "20s",
        },
        "token": { "ttl": "10m" },
    });
    fixture::keys_with(
        &admin,
        &[NS.to_string()],
        0..args.n,
        args.concurrency,
        &spec,
    )
    .await?;
    let agent_keys: Vec<String> = (0..args.policy_agents.min(args.n))
        .map(fixture::key_name)
        .collect();
    let _kubelet = Kubelet::start(
        admin.clone(),
        NS,
        KubeletConfig::default().with_agent(HttpAgent::default()),
    );
    if !agent_keys.is_empty() {
        fixture::policy_agents(
            &admin,
            NS,
            agent_keys.len(),
            args.replicas,
            &agent_keys,
            args.concurrency,
        )
        .await?;
    }
    let (mut replicas, _addrs) =
        super::verifier::start_replicas(args, NS, &format!("soak-n{}", args.n), &admin).await?;
    report.row(
        "Soak set-up",
        format!(
            "{} keys rotating every 60 s (revokeWhenUnusedFor 20 s), {} PolicyAgents x {} pods, {} verifier replicas, {minutes} min",
            args.n,
            agent_keys.len(),
            args.replicas,
            replicas.len()
        ),
    );

    // Every minute: memory, watches, rotations, violations.
    let pks = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "keyward.dev",
        "v1alpha1",
        "ProvisioningKey",
    ));
    let pk_api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), NS, &pks);
    let mut op_rss: Vec<f64> = Vec::new();
    let mut v_rss: Vec<Vec<f64>> = vec![Vec::new(); replicas.len()];
    let mut watches: Vec<f64> = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    let mut ever_trusted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut left: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut first_seqs: Option<u32> = None;
    let mut rotations = 0u32;
    let mut not_ready = 0usize;
    let mut behind_minutes = 0usize;
    let mut two_active_before: BTreeSet<String> = BTreeSet::new();
    let mut between_writes = 0usize;
    for minute in 1..=minutes {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let mut this: Vec<String> = Vec::new();
        if !op.running() {
            this.push("the operator exited".into());
        }
        for (i, r) in replicas.iter_mut().enumerate() {
            if !r.running() {
                this.push(format!("verifier v-{i} exited"));
            }
        }
        let s = sample(&admin).await.context("read the namespace")?;
        this.extend(s.violations.iter().cloned());
        for pk in s.two_active.intersection(&two_active_before) {
            this.push(format!(
                "{pk} has two key Secrets in state active, a minute apart"
            ));
        }
        between_writes += s.two_active.difference(&two_active_before).count();
        two_active_before = s.two_active.clone();
        let (behind, silent) = replicas_state(&admin, &args.lease_namespace).await?;
        for v in &silent {
            this.push(format!(
                "verifier Lease {v} is silent (watermark and heartbeat stale)"
            ));
        }
        behind_minutes += usize::from(!behind.is_empty());
        for (pk, kids) in &s.trusted {
            let seen = ever_trusted.entry(pk.clone()).or_default();
            let gone = left.entry(pk.clone()).or_default();
            for k in kids.intersection(gone) {
                this.push(format!("{pk}: key {k} left the bundle and came back"));
            }
            gone.extend(seen.difference(kids).cloned());
            seen.extend(kids.iter().cloned());
        }
        let total: u32 = s.seqs.values().sum();
        let base = *first_seqs.get_or_insert(total);
        rotations = total.saturating_sub(base);
        let list = pk_api.list(&ListParams::default()).await?;
        not_ready = list
            .items
            .iter()
            .filter(|o| {
                !o.data["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        let o = rss_mib(op.pid);
        if let Some(m) = o {
            op_rss.push(m);
        }
        let v: Vec<Option<f64>> = replicas.iter().map(|r| rss_mib(r.pid)).collect();
        for (i, m) in v.iter().enumerate() {
            if let Some(m) = m {
                v_rss[i].push(*m);
            }
        }
        let w = open_watches(&admin).await;
        if let Some(w) = w {
            watches.push(w);
        }
        say(&format!(
            "soak minute {minute}/{minutes}: operator RSS {}, verifiers {}, watches open {}, key Secrets by seq {total} (rotations since minute 1: {rotations}), not Ready {not_ready}, violations {}{}",
            super::mib(o),
            v.iter()
                .map(|m| super::mib(*m))
                .collect::<Vec<_>>()
                .join(" / "),
            w.map_or("n/a".into(), |w| format!("{w:.0}")),
            this.len(),
            this.first()
                .map(|v| format!(" (first: {v})"))
                .unwrap_or_default()
        ));
        violations.extend(this.into_iter().map(|v| format!("minute {minute}: {v}")));
    }
    let span = |v: &[f64]| -> String {
        match (v.first(), v.last()) {
            (Some(a), Some(b)) => format!(
                "{a:.1} MiB at minute 1, {b:.1} MiB at the end, max {:.1} MiB",
                v.iter().copied().fold(0.0_f64, f64::max)
            ),
            _ => "n/a".into(),
        }
    };
    report.row("Operator RSS over the soak", span(&op_rss));
    for (i, v) in v_rss.iter().enumerate() {
        report.row(format!("Verifier v-{i} RSS over the soak"), span(v));
    }
    report.row(
        "Watches open on the API server (all clients)",
        match (watches.first(), watches.last()) {
            (Some(a), Some(b)) => format!(
                "{a:.0} at minute 1, {b:.0} at the end, max {:.0}",
                watches.iter().copied().fold(0.0_f64, f64::max)
            ),
            _ => "n/a".into(),
        },
    );
    report.row(
        "Rotations started after minute 1 (new key Secrets)",
        format!(
            "{rotations} ({:.1} per key per minute); not Ready at the end: {not_ready}",
            rotations as f64 / args.n as f64 / (minutes.saturating_sub(1).max(1)) as f64
        ),
    );
    report.row(
        "Reads that fell between an activation's two writes (two keys active once, not again a minute later)",
        between_writes.to_string(),
    );
    report.row(
        "Minutes with a verifier replica behind (alive, reports lagging)",
        behind_minutes.to_string(),
    );
    report.row(
        "Violations",
        if violations.is_empty() {
            "0".to_string()
        } else {
            format!("{}: {}", violations.len(), violations.join("; "))
        },
    );
    for r in &mut replicas {
        let _ = r.stop(Duration::from_secs(10)).await;
    }
    let _ = op.stop(Duration::from_secs(10)).await;
    anyhow::ensure!(violations.is_empty(), "{} violations", violations.len());
    Ok(())
}
