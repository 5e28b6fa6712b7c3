//! End-to-end scenarios of revocation on the control plane's word: real OPA agents download
//! their bundle from Debian's nginx, which asks a real `keyward verifier` process
//! (`auth_request`); the verifier reports which pod used which key id to the operator.
//!
//! (f) A rotation confirmed by the control plane's acknowledgement: while the verifier is down,
//!     the new pods run, but no PolicyAgent confirms them; once it is back and has seen each
//!     pod download with the new key id, they confirm and the rotation completes.
//! (i) Scoped tokens: an nginx route that requires `scope=bundles:read` lets the agents through
//!     only while their key's `spec.token.claims` grants it; a change of the claims is a token
//!     refresh (no new key, no roll), and the real OPA agents follow it.
//! (h) Deactivate, then reactivate: a forgotten OPA with a copied token is refused once the old key
//!     is deactivated, and downloads again after `keyward reactivate`, with no new rotation.
//! (k) An agent outside the cluster registered as a consumer: a real OPA fed by
//!     `keyward token sync --acknowledge-via`; the old key waits for its acknowledgement.
//! (g) A consumer outside any PolicyAgent (an OPA with a copied token) keeps using the old key:
//!     `revokeWhenUnusedFor` holds the old key (status shows when it was last used) until that
//!     consumer stops; then the verifier goes silent (SIGKILL) and the old key stays trusted,
//!     visibly (`Stalled`, reason `VerifierSilent`, an Event); a restarted verifier vouches
//!     from its restart on, and the old key is revoked one window after it, never earlier.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use keyward::api::{KeyUsageReport, PolicyAgent, ProvisioningKey};
use keyward_testbed::eventually;
use kube::api::ListParams;
use serde_json::json;

use crate::scenarios::control_plane::{self, Nginx, Verifier, free_port};
use crate::scenarios::support::{Bed, DEPLOY, InProcessOperator, PK, POLL, STS, TIMEOUT};

const OPA_PORT: u16 = 8181;

/// nginx and one verifier replica for a bed; the bed's agents download through nginx.
async fn verified_bed(label: &str) -> anyhow::Result<(Bed, Nginx, Verifier, tempfile::TempDir)> {
    verified_bed_route(label, "").await
}

/// [`verified_bed`] whose nginx route adds `query` to its `auth_request` URI (a route's own
/// requirements, e.g. `?require-claim=scope%3Dbundles%3Aread`).
async fn verified_bed_route(
    label: &str,
    query: &str,
) -> anyhow::Result<(Bed, Nginx, Verifier, tempfile::TempDir)> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("keyward-e2e-{label}-cp-"))
        .tempdir()?;
    let vport = free_port()?;
    let mut nport = free_port()?;
    while nport == vport {
        nport = free_port()?;
    }
    let bed = Bed::real_opa_via(label, control_plane::url(nport)).await;
    let nginx = Nginx::start(dir.path(), nport, vport, &format!("{}/{PK}{query}", bed.ns))?;
    let verifier = Verifier::start(&bed.ns, "v-0", vport, bed.log_path("verifier.log")).await?;
    bed.say(format!(
        "nginx at {} (auth_request -> keyward verifier on :{vport}, replica v-0)",
        nginx.url()
    ));
    Ok((bed, nginx, verifier, dir))
}

/// The pods (UIDs) the verifier replicas reported using `kid`.
async fn acknowledged(bed: &Bed, kid: &str) -> anyhow::Result<Vec<String>> {
    let reports = bed
        .api::<KeyUsageReport>()
        .list(&ListParams::default())
        .await?;
    Ok(
        keyward::usage::key_use(&reports.items, &[], &bed.ns, PK, Utc::now())
            .pods
            .remove(kid)
            .unwrap_or_default()
            .into_iter()
            .collect(),
    )
}

fn confirmed_on(pa: &PolicyAgent) -> Option<String> {
    pa.status.as_ref().and_then(|s| s.confirmed_key_id.clone())
}

fn condition(pk: &ProvisioningKey, type_: &str) -> Option<(String, String, String)> {
    pk.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn revoked_at(pk: &ProvisioningKey, kid: &str) -> Option<DateTime<Utc>> {
    pk.status
        .as_ref()?
        .revoked_keys
        .iter()
        .find(|k| k.kid == kid)?
        .revoked_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// (f) See the module docs.
///
/// How to see it fail: make the PolicyAgent ignore the acknowledgement (in
/// `src/agent/check.rs`, `acknowledgement: false`): the StatefulSet's PolicyAgent (mode
/// `Acknowledgement`: no HTTP check) confirms the new key while the verifier is down, and step 2
/// fails with "confirmed on the new key without any acknowledgement".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_confirmed_by_the_control_planes_acknowledgement() -> anyhow::Result<()> {
    let (bed, _nginx, mut verifier, _dir) = verified_bed("ack").await?;
    let op = InProcessOperator::start_with_verifiers(&bed.ns, Some(&bed.ns)).await;
    bed.create_key(json!({
        "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m",
    }))
    .await?;
    let k1 = bed.wait_handed_out(|_| true).await?;
    // The Deployment's agents: HTTP check and acknowledgement; the StatefulSet's: the
    // acknowledgement alone.
    bed.create_workloads().await?;
    for (kind, name, check) in [
        (
            "Deployment",
            DEPLOY,
            json!({ "http": { "port": OPA_PORT, "successThreshold": 2, "period": "500ms" },
                    "requireAcknowledgement": true }),
        ),
        ("StatefulSet", STS, json!({ "mode": "Acknowledgement" })),
    ] {
        let pa: PolicyAgent = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent",
            "metadata": { "name": name },
            "spec": { "provisioningKeyRef": { "name": PK },
                      "workloadRef": { "kind": kind, "name": name },
                      "connectivityCheck": check },
        }))?;
        bed.api::<PolicyAgent>()
            .create(&Default::default(), &pa)
            .await
            .with_context(|| format!("create PolicyAgent {name}"))?;
    }
    bed.wait_confirmed(&k1).await?;
    let pods = bed.running_pods();
    let acked = acknowledged(&bed, &k1).await?;
    ensure!(
        pods.iter().all(|p| acked.contains(&p.uid)),
        "confirmed on {k1}, but the verifier acknowledged only {acked:?} of {:?}",
        pods.iter().map(|p| &p.uid).collect::<Vec<_>>()
    );
    bed.say(format!(
        "both PolicyAgents confirmed on {k1} by acknowledgement ({} pods)",
        pods.len()
    ));

    // 1. The verifier goes down; a rotation rolls the agents to k2. Their downloads fail at
    //    nginx (no verifier to ask), so nothing acknowledges them.
    verifier.kill();
    bed.request_rotation("1").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    let rolled = Instant::now();
    eventually(
        "every running pod on the new revision",
        TIMEOUT,
        POLL,
        || async {
            let pods = bed.running_pods();
            let w = bed.workloads_now().await.ok()?;
            (w.deploy_kid.as_deref() == Some(k2.as_str())
                && w.sts_kid.as_deref() == Some(k2.as_str())
                && pods.len() == 4
                && bed
                    .api::<k8s_openapi::api::core::v1::Pod>()
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .all(|p| {
                        p.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get("keyward.dev/key-id"))
                            == Some(&k2)
                    }))
            .then_some(())
        },
    )
    .await?;
    bed.say(format!(
        "rolled to {k2}, all pods on it ({:.1}s); verifier down: no acknowledgement",
        rolled.elapsed().as_secs_f64()
    ));

    // 2. For 6 s with every pod on k2: no PolicyAgent confirms k2 (the rollout and the pods are
    //    not the control plane's word), and the old key stays trusted.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        for name in [DEPLOY, STS] {
            let pa = bed.api::<PolicyAgent>().get(name).await?;
            if confirmed_on(&pa).as_deref() == Some(k2.as_str()) {
                bail!(
                    "{name} confirmed on the new key without any acknowledgement (verifier down)"
                );
            }
        }
        ensure!(
            bed.key_state(&k1)
                .await?
                .as_deref()
                .is_none_or(|s| !matches!(s, "deactivated" | "destroyed")),
            "old key revoked without the agents' acknowledgement"
        );
        tokio::time::sleep(POLL).await;
    }
    let sts = bed.api::<PolicyAgent>().get(STS).await?;
    let waiting = sts
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    bed.say(format!("held for 6 s; {STS} says: {waiting}"));

    // 3. The verifier is back: each new pod's next download is acknowledged, the PolicyAgents
    //    confirm, and the old key is revoked.
    verifier.restart().await?;
    bed.wait_rotation_complete(&k1, &k2).await?;
    let pods = bed.running_pods();
    let acked = acknowledged(&bed, &k2).await?;
    ensure!(
        pods.iter().all(|p| acked.contains(&p.uid)),
        "confirmed on {k2}, but the verifier acknowledged only {acked:?}"
    );
    let confirms = bed.events("Normal", "AgentConfirmed").await?;
    ensure!(
        confirms.iter().any(|e| {
            e.note.as_deref().is_some_and(|n| {
                n.contains(&k2) && n.contains("acknowledged by the keyward verifier")
            })
        }),
        "the confirmation Events name the acknowledgement"
    );
    bed.say(format!(
        "rotation {k1} -> {k2} confirmed by acknowledgement and complete"
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// An OPA outside any PolicyAgent (outside the cluster, say), polling through nginx with a
/// token copied from the agent Secret; it sends no pod UID.
struct OutsideAgent(tokio::process::Child);

impl OutsideAgent {
    async fn start(bed: &Bed, url: &str, token: &str) -> anyhow::Result<Self> {
        let dir = bed.log_path("outside");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("token"), token)?;
        Self::start_with_file(bed, url, &dir.join("token")).await
    }

    /// An outside OPA reading its token from `token_file` (kept fresh by `keyward token sync`).
    async fn start_with_file(
        bed: &Bed,
        url: &str,
        token_file: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let binary = tokio::task::spawn_blocking(keyward_testbed::opa_binary).await??;
        let dir = bed.log_path("outside-file");
        std::fs::create_dir_all(&dir)?;
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let config = format!(
            "services:\n  cp:\n    url: {}\n    credentials:\n      bearer:\n        token_path: {}\n\
             bundles:\n  authz:\n    service: cp\n    resource: bundles/authz.tar.gz\n    polling:\n      min_delay_seconds: 1\n      max_delay_seconds: 1\n",
            q(url),
            q(&token_file.to_string_lossy())
        );
        std::fs::write(dir.join("config.yaml"), config)?;
        let log = std::fs::File::create(dir.join("opa.log"))?;
        let child = tokio::process::Command::new(binary)
            .args(["run", "--server", "--disable-telemetry"])
            .args(["--addr", &format!("127.0.0.1:{}", free_port()?)])
            .arg("--config-file")
            .arg(dir.join("config.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start the outside OPA")?;
        Ok(OutsideAgent(child))
    }

    async fn stop(mut self) {
        let _ = self.0.kill().await;
    }
}

/// The token the agent Secret holds now (what an agent outside the cluster copies).
async fn agent_token(bed: &Bed) -> anyhow::Result<String> {
    bed.api::<k8s_openapi::api::core::v1::Secret>()
        .get(PK)
        .await?
        .data
        .and_then(|d| {
            d.get("token")
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        })
        .context("the agent token")
}

/// Checks for `secs` seconds that key `kid` is never revoked.
async fn still_trusted(bed: &Bed, kid: &str, secs: i64, when: &str) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(secs.unsigned_abs());
    while Instant::now() < until {
        ensure!(
            bed.key_state(kid)
                .await?
                .as_deref()
                .is_none_or(|s| !matches!(s, "deactivated" | "destroyed")),
            "old key revoked {when}"
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// The last time nginx let a request with `kid` through (from its access log's `$msec`).
fn last_accepted(nginx: &Nginx, kid: &str) -> Option<f64> {
    nginx
        .access_log()
        .lines()
        .filter(|l| l.contains(" 200 ") || l.contains(" 304 "))
        .filter(|l| l.contains(&format!("kid={kid} ")))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// (g) See the module docs.
///
/// How to see it fail: take silence as "unused" (in `src/rotation/mod.rs`, `unused_hold`,
/// `Unused::Yes | Unused::Silent(_) => return None`): with the verifier killed, the old key is
/// revoked at once and step 3 fails with "old key revoked while the verifier was silent".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_consumer_and_silent_verifier_hold_the_old_key() -> anyhow::Result<()> {
    const WINDOW: i64 = 6;
    let (bed, nginx, mut verifier, _dir) = verified_bed("unused").await?;
    let op = InProcessOperator::start_with_verifiers(&bed.ns, Some(&bed.ns)).await;
    let k1 = bed
        .set_up(json!({
            "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m",
            "revokeWhenUnusedFor": format!("{WINDOW}s"),
        }))
        .await?;
    let token = agent_token(&bed).await?;
    let outside = OutsideAgent::start(&bed, &nginx.url(), &token).await?;
    eventually(
        "the outside OPA downloads with the old key",
        TIMEOUT,
        POLL,
        || async {
            last_accepted(&nginx, &k1).filter(|_| {
                nginx
                    .access_log()
                    .lines()
                    .any(|l| l.contains(&format!("kid={k1} pod=-")))
            })
        },
    )
    .await?;
    bed.say("an OPA outside any PolicyAgent uses a copy of the old token");

    // 1. Rotate: both PolicyAgents confirm k2, but the old key is held while in use.
    bed.request_rotation("1").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    bed.wait_confirmed(&k2).await?;
    let pk = eventually(
        "held: old key in use, shown in status",
        TIMEOUT,
        POLL,
        || async {
            let pk = bed.key().await.ok()?;
            let retiring = pk
                .status
                .as_ref()?
                .trusted_keys
                .iter()
                .find(|k| k.kid == k1)?;
            (retiring.last_used_at.is_some()
                && condition(&pk, "Rotating").is_some_and(|c| c.1 == "OldKeyInUse"))
            .then_some(pk)
        },
    )
    .await?;
    bed.say(format!(
        "PolicyAgents confirmed on {k2}; old key held: {}",
        condition(&pk, "Rotating").map(|c| c.2).unwrap_or_default()
    ));
    still_trusted(&bed, &k1, 2 * WINDOW, "while a consumer still used it").await?;
    let shown = bed.key().await?;
    let shown = shown
        .status
        .as_ref()
        .and_then(|s| s.trusted_keys.iter().find(|k| k.kid == k1))
        .and_then(|k| k.last_used_at.clone())
        .unwrap_or_default();
    bed.say(format!(
        "held for {}s past the window; old key last used at {shown}",
        2 * WINDOW
    ));

    // 2. The consumer stops; 3. the verifier goes silent at once (SIGKILL): nothing may count
    //    as "unused" now.
    outside.stop().await;
    let stopped = Utc::now();
    verifier.kill();
    let killed = Instant::now();
    let pk = eventually("Stalled: VerifierSilent", TIMEOUT, POLL, || async {
        let pk = bed.key().await.ok()?;
        condition(&pk, "Stalled")
            .is_some_and(|c| c.0 == "True" && c.1 == "VerifierSilent")
            .then_some(pk)
    })
    .await?;
    bed.say(format!(
        "verifier killed; {:.1}s later: {}",
        killed.elapsed().as_secs_f64(),
        condition(&pk, "Stalled").map(|c| c.2).unwrap_or_default()
    ));
    bed.wait_events("Warning", "VerifierSilent").await?;
    still_trusted(&bed, &k1, 2 * WINDOW, "while the verifier was silent").await?;

    // 4. A new incarnation vouches from its start: revoked one window after it, and after the
    //    window since the consumer's last accepted request.
    verifier.restart().await?;
    let restarted = Utc::now();
    bed.wait_rotation_complete(&k1, &k2).await?;
    // The status follows the revocation's write.
    let at = eventually(
        "status.revokedKeys lists the old key",
        TIMEOUT,
        POLL,
        || async { revoked_at(&bed.key().await.ok()?, &k1) },
    )
    .await?;
    let last = last_accepted(&nginx, &k1).context("the old key's last accepted request")?;
    let last = DateTime::from_timestamp_millis((last * 1000.0) as i64).context("time")?;
    let w = chrono::Duration::seconds(WINDOW);
    ensure!(
        at + chrono::Duration::seconds(1) >= restarted + w,
        "revoked at {at}, before a whole window of the restarted verifier ({restarted})"
    );
    ensure!(
        at + chrono::Duration::seconds(1) >= last + w,
        "revoked at {at}, within the window after the last use at {last}"
    );
    ensure!(
        last <= stopped + chrono::Duration::seconds(1),
        "the old key was used after the consumer stopped"
    );
    bed.say(format!(
        "old key revoked at {at}: last used {last}, verifier back at {restarted}, window {WINDOW}s"
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// Requests in nginx's access log from a consumer that sends no pod UID (the outside OPA),
/// after `since` (Unix seconds): `(accepted with kid, refused)`.
fn outside_requests(nginx: &Nginx, kid: &str, since: f64) -> (usize, usize) {
    let log = nginx.access_log();
    let after = log.lines().filter(|l| l.contains(" pod=-")).filter(|l| {
        l.split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
            .is_some_and(|t| t >= since)
    });
    let (mut ok, mut refused) = (0, 0);
    for l in after {
        if (l.contains(" 200 ") || l.contains(" 304 ")) && l.contains(&format!("kid={kid} ")) {
            ok += 1;
        } else if l.contains(" 401 ") {
            refused += 1;
        }
    }
    (ok, refused)
}

fn unix_now() -> f64 {
    Utc::now().timestamp_millis() as f64 / 1000.0
}

/// (h) Deactivate, then reactivate (issue "The key's whole life", part 1), with a real OPA that
/// no PolicyAgent covers, downloading through nginx with a copy of the first key's token.
///
/// The rotation completes on the PolicyAgents' evidence and the old key is **deactivated**: the
/// forgotten OPA's downloads are refused (401) by the real verifier behind nginx, though the key
/// Secret keeps the private key. `keyward reactivate` (the built binary) puts the key back with
/// a reason: the same OPA, with the same token, downloads again, and no key is minted. The key
/// is deactivated again one `overlap` after its reactivation.
///
/// How to see it fail: make reactivation a no-op (in `src/rotation/rules.rs`, `reactivate`,
/// return `None` first): the CLI's `--wait` times out (exit 3) and step 3 fails with
/// "keyward reactivate: ... is not trusted again yet (--timeout)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_consumer_breaks_on_deactivation_and_recovers_on_reactivation()
-> anyhow::Result<()> {
    let (bed, nginx, verifier, _dir) = verified_bed("reactivate").await?;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({
            "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m",
            "overlap": "8s", "retainDeactivatedFor": "1h",
        }))
        .await?;
    let token = agent_token(&bed).await?;
    let outside = OutsideAgent::start(&bed, &nginx.url(), &token).await?;
    let t0 = unix_now();
    eventually(
        "the outside OPA downloads with the first key",
        TIMEOUT,
        POLL,
        || async { (outside_requests(&nginx, &k1, t0).0 > 0).then_some(()) },
    )
    .await?;
    bed.say("an OPA outside any PolicyAgent downloads with a copy of the first key's token");

    // 1. Rotate: confirmed by the PolicyAgents, the old key deactivated (private key kept).
    bed.request_rotation("1").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    bed.wait_confirmed(&k2).await?;
    eventually("the old key deactivated", TIMEOUT, POLL, || async {
        (bed.key_state(&k1).await.ok()?.as_deref() == Some("deactivated")).then_some(())
    })
    .await?;
    let deactivated = unix_now();
    let keys = bed.key_secrets().await?;
    ensure!(keys.len() == 2, "key Secrets: {keys:?}");
    // 2. The forgotten consumer breaks: refused by the verifier, several polls in a row.
    eventually("the outside OPA refused", TIMEOUT, POLL, || async {
        (outside_requests(&nginx, &k1, deactivated + 1.0).1 >= 3).then_some(())
    })
    .await?;
    let (ok, refused) = outside_requests(&nginx, &k1, deactivated + 1.0);
    ensure!(
        ok == 0,
        "the deactivated key was accepted {ok} times after its deactivation"
    );
    bed.say(format!(
        "old key {k1} deactivated; the outside OPA is refused ({refused} downloads)"
    ));

    // 3. keyward reactivate, as a user runs it: the same OPA, same token, downloads again.
    let kubeconfig = keyward_testbed::kubeconfig_path();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .args(["reactivate", "-n", &bed.ns, PK, &k1])
        .args([
            "--reason",
            "INC-42: an OPA outside the cluster still uses the old token",
        ])
        .args(["--wait", "--timeout", "60s", "--kubeconfig"])
        .arg(&kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .await
        .context("run keyward reactivate")?;
    ensure!(
        out.status.success(),
        "keyward reactivate: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reactivated = unix_now();
    eventually("the outside OPA downloads again", TIMEOUT, POLL, || async {
        (outside_requests(&nginx, &k1, reactivated).0 > 0).then_some(())
    })
    .await
    .context("the outside OPA never downloaded again after the reactivation")?;
    ensure!(
        bed.key_secrets().await?.len() == 2,
        "reactivation minted a key"
    );
    let events = bed.wait_events("Warning", "KeyReactivated").await?;
    ensure!(
        events
            .iter()
            .any(|e| e.note.as_deref().is_some_and(|n| n.contains("INC-42"))),
        "the KeyReactivated Event carries the reason: {events:?}"
    );
    bed.say(format!(
        "reactivated {k1} by keyward reactivate: the outside OPA downloads again, no new key"
    ));

    // 4. One overlap later it is deactivated again (the consumer had that long to move).
    eventually("deactivated again", TIMEOUT, POLL, || async {
        (bed.key_state(&k1).await.ok()?.as_deref() == Some("deactivated")).then_some(())
    })
    .await?;
    let again = unix_now();
    ensure!(
        again - reactivated >= 7.0,
        "deactivated again {:.1}s after the reactivation (overlap 8s)",
        again - reactivated
    );
    bed.say(format!(
        "deactivated again {:.1}s after the reactivation",
        again - reactivated
    ));
    outside.stop().await;
    drop(verifier);
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// Downloads through nginx after `since` (Unix seconds) by pods (requests that name a pod):
/// `(allowed, refused with 403)`.
fn pod_downloads(nginx: &Nginx, since: f64) -> (usize, usize) {
    let log = nginx.access_log();
    let mut out = (0, 0);
    for l in log.lines().filter(|l| !l.contains(" pod=-")) {
        let t = l
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok());
        if t.is_none_or(|t| t < since) {
            continue;
        }
        if l.contains(" 200 ") || l.contains(" 304 ") {
            out.0 += 1;
        } else if l.contains(" 403 ") {
            out.1 += 1;
        }
    }
    out
}

/// The verifier's count of `ClaimMissing` refusals (its /metrics).
async fn claim_missing(verifier: &Verifier) -> anyhow::Result<f64> {
    let body = reqwest::get(format!("http://127.0.0.1:{}/metrics", verifier.port))
        .await?
        .text()
        .await?;
    Ok(body
        .lines()
        .find(|l| {
            l.starts_with("keyward_verifier_decisions_total{")
                && l.contains("reason=\"ClaimMissing\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// (i) Scoped tokens (issue "The key's whole life", part 7), with real OPA agents, Debian's nginx
/// and the real verifier.
///
/// How to see it fail: sign no static claims (in `src/rotation/desired.rs`, `agent_secret`, call
/// `sign_token` instead of `sign_token_with`): the agents are refused from the start and step 1
/// fails with "the agents download with scope bundles:read".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_requiring_a_scope_follows_the_keys_claims_without_a_rotation() -> anyhow::Result<()>
{
    let (bed, nginx, verifier, _dir) =
        verified_bed_route("scoped", "?require-claim=scope%3Dbundles%3Aread").await?;
    let op = InProcessOperator::start(&bed.ns).await;
    let scope = |s: &str| json!({ "token": { "claims": { "scope": s } } });
    let k1 = bed
        .set_up_with_claims(
            json!({ "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m" }),
            json!({ "scope": "bundles:read metrics:read" }),
        )
        .await?;
    // 1. Granted: the agents download.
    let t0 = unix_now();
    eventually(
        "the agents download with scope bundles:read",
        TIMEOUT,
        POLL,
        || async { (pod_downloads(&nginx, t0).0 >= 2).then_some(()) },
    )
    .await?;
    let before = bed.workloads_now().await?;
    bed.say("agents download through a route that requires scope=bundles:read");

    // 2. The scope taken away: a token refresh (same key, no roll), and the route refuses.
    bed.patch_spec(scope("metrics:read")).await?;
    let t1 = unix_now();
    eventually(
        "the agents refused (403 ClaimMissing)",
        TIMEOUT,
        POLL,
        || async {
            let refused = pod_downloads(&nginx, t1).1;
            (refused >= 2 && claim_missing(&verifier).await.ok()? >= 2.0).then_some(())
        },
    )
    .await?;
    // Settle: no download allowed once the refresh reached every agent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t2 = unix_now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (allowed, refused) = pod_downloads(&nginx, t2);
    ensure!(
        allowed == 0 && refused > 0,
        "after the scope was taken away: {allowed} allowed, {refused} refused"
    );
    let keys = bed.key_secrets().await?;
    ensure!(
        keys.len() == 1 && keys[0].kid == k1,
        "a claims change minted a key: {keys:?}"
    );
    let after = bed.workloads_now().await?;
    ensure!(
        after.deploy_generation == before.deploy_generation
            && after.sts_generation == before.sts_generation,
        "a claims change rolled the workloads: {before:?} -> {after:?}"
    );
    bed.say(format!(
        "scope taken away: refused ({refused} downloads, ClaimMissing {}), same key, nothing rolled",
        claim_missing(&verifier).await?
    ));

    // 3. Granted again: the agents download again, still on the same key.
    bed.patch_spec(scope("bundles:read")).await?;
    let t3 = unix_now();
    eventually("the agents download again", TIMEOUT, POLL, || async {
        (pod_downloads(&nginx, t3).0 >= 2).then_some(())
    })
    .await?;
    ensure!(
        bed.key_secrets().await?.len() == 1,
        "a claims change minted a key"
    );
    bed.say("scope granted again: the agents download, no rotation");
    drop(verifier);
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (k) An agent outside the cluster, registered as a consumer (issue 21, part 3): a real OPA
/// reads its token from a file that `keyward token sync --acknowledge-via` (the built binary, a
/// plain process, with a kubeconfig of the agent's own ServiceAccount) keeps fresh, and
/// downloads through Debian's nginx and the real verifier. A PolicyAgent of kind
/// `ServiceAccount` names it. While `token sync` is stopped, a rotation completes for the
/// in-cluster agents but the old key stays trusted, and the outside OPA keeps downloading with
/// it; restarted, `token sync` writes the new token and acknowledges it, and only then is the
/// old key deactivated. The outside OPA is never refused.
///
/// How to see it fail: confirm agents outside the cluster without the acknowledgement (in
/// `src/agent/observe.rs`, `external`, set `require_ack: false`): the old key is deactivated
/// while `token sync` is stopped, and step 2 fails with "the old key left while the outside
/// agent had not acknowledged the new one".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_opa_registered_as_a_consumer_holds_the_old_key_until_it_acknowledges()
-> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::PostParams;
    let (bed, nginx, verifier, _dir) = verified_bed("outside").await?;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({
            "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "5m",
            "overlap": "1s", "retainDeactivatedFor": "1h",
        }))
        .await?;
    // The outside agent's identity: a ServiceAccount that may read the one agent Secret and
    // mint tokens for itself; a PolicyAgent names it.
    let sa = "outside-opa";
    bed.api::<ServiceAccount>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
        )
        .await?;
    bed.api::<Role>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": {"name": sa},
            "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [PK], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": [sa], "verbs": ["create"]},
            ],
        }))?)
        .await?;
    bed.api::<RoleBinding>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": sa},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": bed.ns}],
            }))?,
        )
        .await?;
    bed.api::<PolicyAgent>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent",
            "metadata": {"name": "outside"},
            "spec": {"provisioningKeyRef": {"name": PK}, "workloadRef": {"kind": "ServiceAccount", "name": sa}},
        }))?)
        .await?;
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}}))?;
    let sa_token = bed
        .api::<ServiceAccount>()
        .create_token_request(sa, &PostParams::default(), &request)
        .await?
        .status
        .context("TokenRequest status")?
        .token;
    let dir = bed.log_path("outside-sync");
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = keyward_testbed::kubeconfig_with_token(&dir, sa, &sa_token)?;
    let token_file = dir.join("token");
    let verifier_url = format!("http://127.0.0.1:{}", verifier.port);
    let sync = || -> anyhow::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sync.log"))?;
        Ok(tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["token", "sync", "--key", &format!("{}/{PK}", bed.ns)])
            .arg("--out")
            .arg(&token_file)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--acknowledge-via", &verifier_url, "--service-account", sa])
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?)
    };
    let outside_confirmed = |kid: String| {
        let api = bed.api::<PolicyAgent>();
        async move {
            let pa = api.get("outside").await.ok()?;
            (confirmed_on(&pa).as_deref() == Some(kid.as_str())).then_some(())
        }
    };

    // 1. Registered: token sync writes the file and acknowledges; the real OPA downloads.
    let mut child = sync()?;
    eventually("the token file", TIMEOUT, POLL, || async {
        std::fs::metadata(&token_file).ok().map(|_| ())
    })
    .await?;
    let outside = OutsideAgent::start_with_file(&bed, &nginx.url(), &token_file).await?;
    eventually(
        "the outside PolicyAgent confirmed on the first key",
        TIMEOUT,
        POLL,
        || outside_confirmed(k1.clone()),
    )
    .await?;
    let t0 = unix_now();
    eventually("the outside OPA downloads", TIMEOUT, POLL, || async {
        (outside_requests(&nginx, &k1, t0).0 > 0).then_some(())
    })
    .await?;
    bed.say("outside OPA registered (PolicyAgent of kind ServiceAccount), confirmed on the first key, downloading");

    // 2. token sync stopped: the rotation completes in the cluster, the old key stays trusted.
    let _ = child.kill().await;
    bed.request_rotation("1").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    bed.wait_confirmed(&k2).await?;
    let held_since = unix_now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let state = bed.key_state(&k1).await?;
    ensure!(
        !matches!(state.as_deref(), Some("deactivated" | "destroyed")),
        "the old key left while the outside agent had not acknowledged the new one ({state:?})"
    );
    let (ok, refused) = outside_requests(&nginx, &k1, held_since);
    ensure!(
        ok > 0 && refused == 0,
        "the outside OPA with the old key: {ok} downloads, {refused} refused"
    );
    bed.say(format!(
        "in-cluster agents confirmed on {k2}; the old key held 8 s for the stopped outside agent ({ok} downloads with it)"
    ));

    // 3. token sync back: new token, acknowledged, confirmed; only then the old key goes.
    let mut child = sync()?;
    eventually(
        "the outside PolicyAgent confirmed on the new key",
        TIMEOUT,
        POLL,
        || outside_confirmed(k2.clone()),
    )
    .await?;
    eventually("the old key deactivated", TIMEOUT, POLL, || async {
        (bed.key_state(&k1).await.ok()?.as_deref() == Some("deactivated")).then_some(())
    })
    .await?;
    let t2 = unix_now();
    eventually(
        "the outside OPA downloads with the new key",
        TIMEOUT,
        POLL,
        || async { (outside_requests(&nginx, &k2, t2).0 > 0).then_some(()) },
    )
    .await?;
    let (_, refused_old) = outside_requests(&nginx, &k1, t0);
    let (_, refused_new) = outside_requests(&nginx, &k2, t0);
    ensure!(
        refused_old + refused_new == 0,
        "the outside OPA was refused {} times",
        refused_old + refused_new
    );
    bed.say(format!(
        "token sync acknowledged {k2}; the old key deactivated only then; the outside OPA was never refused"
    ));
    let _ = child.kill().await;
    outside.stop().await;
    drop(verifier);
    op.stop().await;
    bed.finish().await;
    Ok(())
}
