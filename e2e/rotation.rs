//! End-to-end scenarios: Keyward's promise against the real local control plane.
//!
//! "An old provisioning key is revoked only on evidence that every agent connects with its
//! successor, and a crash at any moment changes nothing about that."
//!
//! Each scenario runs in its own namespace with its own stand-in kubelet and its own bundle
//! server. The promise scenarios run a real `opa run --server` per pod (built by `e2e/opa.sh`,
//! see `keyward_testbed::OpaProcess`), which downloads its bundle with the token of its mounted
//! Secret; the oracle scenario runs the in-process OPA-like agent (`scenarios/opa_agent.rs`).
//! The bundle server verifies those tokens against the live trust bundle ConfigMap and logs
//! every request (`scenarios/bundle_server.rs`).
//!
//! Run (the plane must be up: `bash e2e/cluster.sh up`, CRDs applied):
//! `cargo test --features fault-injection --test e2e -- --nocapture --test-threads=2`
//! Lines starting with `[e2e` are the scenarios' progress and timings.

mod pop;
mod scenarios;
mod verified;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use keyward_testbed::eventually;
use scenarios::bundle_server::Outcome;
use scenarios::support::{Bed, InProcessOperator, Rotation, TIMEOUT, check_no_rejections, secs};
use serde_json::json;

/// (a) A scheduled rotation, then a manual one, with two PolicyAgents (a Deployment and a
/// StatefulSet, 2 replicas each) sharing one key.
///
/// Asserted for each rotation: exactly one new key Secret; each workload rolled exactly once
/// (generation +1, one more ReplicaSet / ControllerRevision, template key ids seen: only the
/// new one); both PolicyAgents confirmed; the old key revoked; from the bundle server's log:
/// no download refused at all (in particular none with the new key for being untrusted: publish
/// before hand-out) and every pod running at the end first connected with the new key while the
/// old key was still trusted (no early revocation).
///
/// How to see it fail: make the planner stop waiting for evidence, e.g. in
/// `src/rotation/mod.rs` step 8 change `if waiting.is_empty() {` to
/// `if true || waiting.is_empty() {`, so a retiring key is revoked right after the hand-out.
/// Tried (on a copy): the scheduled rotation fails with "EARLY REVOCATION: old key ... was
/// already out of the trust bundle (...) when pod opa-deploy-... first connected with <new>"
/// from `check_no_early_revocation`; old pods still presenting the old key would also be
/// refused as `Revoked` (`check_no_rejections`, see scenario (e)). Handing a key out before it
/// is in the trust bundle makes pods present an untrusted key
/// (`check_published_before_handed_out`), and skipping `publishDelay` trips the publish gap
/// check of `check_rotation`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_then_manual_rotation_with_two_policy_agents() -> anyhow::Result<()> {
    let bed = Bed::real_opa("rotation").await;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({
            "interval": "20s",
            "minInterval": "1s",
            "publishDelay": "2s",
            "confirmationTimeout": "2m",
        }))
        .await?;

    // 1. The scheduled rotation (20 s after the first key was activated).
    let before = bed.workloads_now().await?;
    ensure!(
        before.deploy_kid.as_deref() == Some(k1.as_str())
            && before.sts_kid.as_deref() == Some(k1.as_str())
            && bed.key_secrets().await?.len() == 1,
        "the set-up took longer than the rotation interval (20 s): {before:?}"
    );
    let since = Instant::now();
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    bed.say(format!("scheduled rotation: {k1} -> {k2}"));
    bed.wait_rotation_complete(&k1, &k2).await?;
    let t = bed
        .check_rotation(&Rotation {
            old: k1.clone(),
            new: k2.clone(),
            new_seq: 2,
            before,
            since,
            allowed_refusals: vec![],
            publish_delay: Duration::from_secs(2),
        })
        .await?;
    bed.say(format!(
        "TIMING scheduled rotation (from +{:.1}s when the test began waiting; the mint is the schedule): {t}",
        secs(bed.started, since)
    ));

    // 2. A manual rotation through the annotation (the schedule switched off first, so the
    //    counts are exact).
    bed.patch_spec(json!({ "rotation": { "interval": null } }))
        .await?;
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.request_rotation("manual-1").await?;
    let k3 = bed.wait_handed_out(|k| k != k2).await?;
    bed.say(format!("manual rotation: {k2} -> {k3}"));
    bed.wait_rotation_complete(&k2, &k3).await?;
    let t = bed
        .check_rotation(&Rotation {
            old: k2.clone(),
            new: k3.clone(),
            new_seq: 3,
            before,
            since,
            allowed_refusals: vec![],
            publish_delay: Duration::from_secs(2),
        })
        .await?;
    bed.say(format!("TIMING manual rotation (from the annotation): {t}"));

    // The triggers are recorded, and nothing at all was refused during the whole scenario.
    let status = bed.key().await?.status.unwrap_or_default();
    let trigger = |kid: &str| {
        status
            .history
            .iter()
            .find(|h| h.kid == kid)
            .map(|h| h.trigger.clone())
    };
    ensure!(
        trigger(&k2).as_deref() == Some("Interval")
            && trigger(&k3).as_deref() == Some("Annotation"),
        "triggers in status.history: {:?}",
        status.history
    );
    check_no_rejections(&bed.server.log(), bed.started, &[])?;
    bed.say(format!(
        "done in {:.1}s ({} bundle downloads, all accepted)",
        bed.started.elapsed().as_secs_f64(),
        bed.server.log().len()
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (b) The control plane rejects the new key: the old key is never revoked; after
/// `confirmationTimeout` the ProvisioningKey is `Stalled=True` (`RotationStalled`, with a
/// Warning Event); once the server accepts the key, the rotation completes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_rejecting_the_new_key_stalls_the_rotation_until_it_accepts() -> anyhow::Result<()> {
    let bed = Bed::real_opa("reject").await;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({ "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "6s" }))
        .await?;
    let before = bed.workloads_now().await?;
    bed.server.reject_all_but(&[&k1]);
    let since = Instant::now();
    bed.request_rotation("rejected-1").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    let handed_out = Instant::now();
    bed.say(format!(
        "rotation {k1} -> {k2}; the bundle server rejects {k2}"
    ));

    let reason = bed.wait_condition("Stalled", "True", TIMEOUT).await?;
    let stalled = Instant::now();
    ensure!(
        reason == "RotationStalled",
        "Stalled=True with reason {reason}"
    );
    let events = bed.wait_events("Warning", "RotationStalled").await?;
    bed.say(format!(
        "Stalled=True (RotationStalled) {:.1}s after the hand-out; Warning Event: {:?}",
        secs(handed_out, stalled),
        events.first().and_then(|e| e.note.clone())
    ));

    // Nothing may happen to the old key while the new one is refused: watch it for a while.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let state = bed.key_state(&k1).await?;
    let bundle = bed.trust_bundle().await?;
    ensure!(
        state.as_deref() == Some("retiring") && bundle.as_ref().is_some_and(|b| b.trusts(&k1)),
        "old key {k1} must stay trusted while {k2} is refused: state {state:?}, bundle {bundle:?}"
    );
    let now = bed.workloads_now().await?;
    ensure!(
        now.deploy_kid.as_deref() == Some(k2.as_str())
            && now.sts_kid.as_deref() == Some(k2.as_str()),
        "both workloads should have rolled to {k2} meanwhile: {now:?}"
    );
    let refused = bed
        .server
        .log()
        .iter()
        .filter(|a| a.kid.as_deref() == Some(k2.as_str()) && a.outcome == Outcome::RejectedByTest)
        .count();
    ensure!(
        refused > 0,
        "the agents never presented {k2} while it was refused"
    );

    let accept = Instant::now();
    bed.server.accept_all();
    bed.say(format!(
        "bundle server accepts {k2} again ({refused} downloads refused so far)"
    ));
    bed.wait_rotation_complete(&k1, &k2).await?;
    let completed = Instant::now();
    let reason = bed.wait_condition("Stalled", "False", TIMEOUT).await?;
    let first_untrusted = bed
        .bundle
        .first(since, |c| c.value.as_ref().is_some_and(|b| !b.trusts(&k1)))
        .map(|c| c.at)
        .context("the trust bundle history never dropped the old key")?;
    ensure!(
        first_untrusted > accept,
        "the old key left the trust bundle {:.1}s BEFORE the server accepted the new key",
        secs(first_untrusted, accept)
    );
    let t = bed
        .check_rotation(&Rotation {
            old: k1.clone(),
            new: k2.clone(),
            new_seq: 2,
            before,
            since,
            allowed_refusals: vec![(k2.clone(), Outcome::RejectedByTest)],
            publish_delay: Duration::from_secs(2),
        })
        .await?;
    bed.say(format!(
        "TIMING rejected rotation: {t}; stalled at +{:.1}s, accepted at +{:.1}s, completed (old key revoked) at +{:.1}s, Stalled=False ({reason})",
        secs(since, stalled),
        secs(since, accept),
        secs(since, completed)
    ));
    bed.say(format!(
        "done in {:.1}s",
        bed.started.elapsed().as_secs_f64()
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (d) Break-glass: the current key is listed in `spec.compromisedKeys`. A Warning Event
/// `EmergencyRevocation`; the compromised key is revoked without waiting for confirmation
/// (before any agent connected with the successor, and well within the 60 s `publishDelay`
/// that an emergency skips); the successor is handed out, the agents roll and confirm; the
/// trust bundle is never empty (every version seen by the watch and by the bundle server's
/// reads, about ten per second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compromised_key_is_revoked_at_once_and_replaced() -> anyhow::Result<()> {
    let bed = Bed::real_opa("breakglass").await;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({ "minInterval": "1s", "publishDelay": "60s", "confirmationTimeout": "2m" }))
        .await?;
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.patch_spec(json!({ "compromisedKeys": [k1] })).await?;
    bed.say(format!("{k1} declared compromised"));

    let events = bed.wait_events("Warning", "EmergencyRevocation").await?;
    let event_at = Instant::now();
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    let handed_out = Instant::now();
    ensure!(
        secs(since, handed_out) < 30.0,
        "the successor was handed out {:.1}s after the compromise: the emergency must skip publishDelay (60 s)",
        secs(since, handed_out)
    );
    bed.wait_confirmed(&k2).await?;
    let confirmed = Instant::now();
    bed.say(format!("successor {k2} handed out and confirmed"));

    // The compromised key was revoked without waiting for any confirmation.
    let keys = bed.key_secrets().await?;
    ensure!(
        keys.iter()
            .map(|k| (k.seq, k.state.as_str()))
            .collect::<Vec<_>>()
            == vec![(1, "destroyed"), (2, "active")]
            && keys[1].kid == k2,
        "key Secrets: {keys:?}"
    );
    let revoked_at = bed
        .keys
        .first(since, |c| {
            c.value
                .as_ref()
                .is_some_and(|k| k.kid == k1 && k.state == "destroyed")
        })
        .map(|c| c.at)
        .context("no revocation of the compromised key in the history")?;
    let bundle_dropped = bed
        .bundle
        .first(since, |c| c.value.as_ref().is_some_and(|b| !b.trusts(&k1)))
        .map(|c| c.at)
        .context("the trust bundle never dropped the compromised key")?;
    let log = bed.server.log();
    let accepted_new: Vec<_> = log
        .iter()
        .filter(|a| a.accepted() && a.kid.as_deref() == Some(k2.as_str()))
        .collect();
    ensure!(!accepted_new.is_empty(), "no download with {k2}");
    ensure!(
        accepted_new
            .iter()
            .all(|a| a.bundle.as_ref().is_some_and(|b| !b.trusts(&k1))),
        "an agent connected with {k2} while the compromised {k1} was still trusted: revocation waited"
    );

    // The trust bundle never became empty.
    let versions = bed.bundle.all();
    ensure!(
        versions.iter().all(|c| c
            .value
            .as_ref()
            .is_none_or(|b| b.trusted.iter().any(|k| !b.revoked.contains(k)))),
        "the trust bundle was empty at some point: {:?}",
        versions.iter().map(|c| c.value.clone()).collect::<Vec<_>>()
    );
    ensure!(
        log.iter()
            .filter_map(|a| a.bundle.as_ref())
            .all(|b| !b.trusted.is_empty()),
        "the bundle server read an empty trust bundle"
    );
    // Refusals: only the compromised key, only as revoked.
    check_no_rejections(&log, bed.started, &[(&k1, Outcome::Revoked)])?;
    let now = bed.workloads_now().await?;
    ensure!(
        now.deploy_generation == before.deploy_generation + 1
            && now.sts_generation == before.sts_generation + 1
            && now.deploy_kid.as_deref() == Some(k2.as_str())
            && now.sts_kid.as_deref() == Some(k2.as_str()),
        "each workload must roll exactly once to {k2}: before {before:?}, now {now:?}"
    );
    let refused = log.iter().filter(|a| a.outcome == Outcome::Revoked).count();
    bed.say(format!(
        "TIMING break-glass: Warning Event by +{:.1}s ({:?}), compromised key revoked +{:.1}s, out of the bundle +{:.1}s, successor handed out +{:.1}s, both agents confirmed +{:.1}s; {refused} downloads with the revoked key refused meanwhile; {} trust bundle versions, none empty",
        secs(since, event_at),
        events.first().and_then(|e| e.note.clone()),
        secs(since, revoked_at),
        secs(since, bundle_dropped),
        secs(since, handed_out),
        secs(since, confirmed),
        versions.len()
    ));
    bed.say(format!(
        "done in {:.1}s",
        bed.started.elapsed().as_secs_f64()
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (f) A token refresh is never a rotation: with `token.ttl: 4s` the token is re-issued about
/// every 2 s; the agents read the new token from their Secret volume on every request (as OPA's
/// `token_path` does) and keep downloading, no workload rolls, and the key stays the same.
///
/// How to see it fail: make the PolicyAgent compare the token (or the Secret's resourceVersion)
/// instead of the key id before rolling, and the workloads roll on every refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_refresh_never_rolls_the_agents() -> anyhow::Result<()> {
    let bed = Bed::real_opa("refresh").await;
    let op = InProcessOperator::start(&bed.ns).await;
    let k1 = bed
        .set_up(json!({ "minInterval": "1s", "publishDelay": "1s" }))
        .await?;
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.patch_spec(json!({ "token": { "audience": scenarios::support::AUDIENCE, "ttl": "4s" } }))
        .await?;
    // kube's Recorder counts repeated Events for the same key in a series.
    let refreshes = eventually(
        "three token refreshes",
        TIMEOUT,
        Duration::from_millis(500),
        || async {
            let n: i32 = bed
                .events("Normal", "TokenRefreshed")
                .await
                .ok()?
                .iter()
                .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                .sum();
            (n >= 3).then_some(n)
        },
    )
    .await?;
    let after = bed.workloads_now().await?;
    ensure!(
        after.deploy_generation == before.deploy_generation
            && after.deploy_replica_sets == before.deploy_replica_sets
            && after.sts_generation == before.sts_generation
            && after.sts_revisions == before.sts_revisions,
        "a token refresh rolled a workload: before {before:?}, after {after:?}"
    );
    ensure!(
        bed.handed_out_kid().await?.as_deref() == Some(k1.as_str())
            && bed.key_secrets().await?.len() == 1,
        "a token refresh changed the key"
    );
    // The agents kept connecting, with refreshed tokens, and nothing was refused.
    let log = bed.server.log();
    ensure!(
        log.iter().filter(|a| a.at >= since && a.accepted()).count() > 4,
        "the agents stopped downloading during the refreshes"
    );
    check_no_rejections(&log, since, &[])?;
    bed.say(format!(
        "{refreshes} token refreshes in {:.1}s, no roll, key unchanged",
        since.elapsed().as_secs_f64()
    ));
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (e) The oracle fails when it must. Without any PolicyAgent, with `overlap: 0s` and an unsealed
/// key (`includePrivateKey: true`: agents hold the private key, so no token expiry bounds its
/// use), Keyward revokes the old key right after handing the new one out (by design: no evidence
/// is expected, the overlap is the user's choice; a sealed key would also wait for its last
/// token to expire, which would spare these pods). That is exactly the failure the other
/// scenarios guard against, so the same checks must flag it here. The kubelet of this bed never
/// refreshes Secret volumes of running pods (a sync delay of an hour), so the running pods keep
/// presenting the old key and are refused as `Revoked`; the test then restarts the pods (as a
/// late roll would) and their first download with the new key sees a bundle without the old
/// one: "EARLY REVOCATION".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_flag_a_revocation_without_evidence() -> anyhow::Result<()> {
    use scenarios::support::{REPLICAS, check_no_early_revocation, wait_all_connected};
    let bed = Bed::with_secret_sync_delay("oracle", Duration::from_secs(3600)).await;
    let op = InProcessOperator::start(&bed.ns).await;
    bed.create_key(json!({ "minInterval": "1s", "publishDelay": "1s", "overlap": "0s" }))
        .await?;
    bed.api::<keyward::api::ProvisioningKey>()
        .patch(
            scenarios::support::PK,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": { "includePrivateKey": true } })),
        )
        .await
        .context("unseal the key")?;
    let k1 = bed.wait_handed_out(|_| true).await?;
    bed.create_workloads().await?;
    let want = 2 * REPLICAS as usize;
    wait_all_connected(&bed, &k1, want).await?;
    let since = Instant::now();
    bed.request_rotation("no-evidence").await?;
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    let refused = eventually(
        "a refused download",
        TIMEOUT,
        Duration::from_millis(200),
        || {
            let log = bed.server.log();
            async move { check_no_rejections(&log, since, &[]).err() }
        },
    )
    .await?;
    bed.restart_pods().await?;
    let pods = wait_all_connected(&bed, &k2, want).await?;
    let early = check_no_early_revocation(&bed.server.log(), &pods, &k1, &k2);
    bed.say(format!(
        "oracle on a revocation without evidence: check_no_rejections -> {refused}; check_no_early_revocation -> {:?}",
        early.as_ref().err().map(|e| e.to_string())
    ));
    ensure!(
        early
            .as_ref()
            .is_err_and(|e| e.to_string().contains("EARLY REVOCATION")),
        "check_no_early_revocation did not flag the early revocation: {early:?}"
    );
    op.stop().await;
    bed.finish().await;
    Ok(())
}

/// (c) A crash right after each write of a rotation.
///
/// For every point the real binary runs from the start with `KEYWARD_CRASH_AFTER=<point>:<n>`,
/// `n` being one more than the number of such writes in the first key's lifecycle (`:2` for
/// mint, bundle and hand-out; `:3` for roll and confirm, done once per PolicyAgent and there
/// are two; none for mark-published, record-published, activate, retire and revoke: the first
/// key is created active, so only a rotation makes those writes). After the
/// first key settled, a rotation is requested; the process must abort right after that write
/// of the rotation, which the state found at the abort proves (`check_crash_state`). The
/// binary is then started again without the variable, and: exactly one new key Secret (no
/// seq 3), each workload rolled exactly once, no early revocation, no refused download, and
/// the rotation completes.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_each_write_of_a_rotation() {
    use futures::StreamExt;
    let parallel = std::env::var("KEYWARD_E2E_CRASH_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2usize);
    let started = Instant::now();
    let bin_dir = tempfile::Builder::new()
        .prefix("keyward-e2e-bin-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a directory for the operator binary");
    let binary =
        scenarios::support::private_operator_binary(bin_dir.path()).expect("the operator binary");
    let binary = &binary;
    let results: Vec<(&str, anyhow::Result<String>)> = futures::stream::iter(crash::POINTS)
        .map(|p| async move { (p, crash::point(binary, p).await) })
        .buffer_unordered(parallel)
        .collect()
        .await;
    let mut failed = Vec::new();
    for (point, res) in &results {
        match res {
            Ok(t) => eprintln!("[e2e crash] {point:>16}: ok; {t}"),
            Err(e) => {
                eprintln!("[e2e crash] {point:>16}: FAILED: {e:#}");
                failed.push(*point);
            }
        }
    }
    eprintln!(
        "[e2e crash] {} crash points in {:.1}s ({parallel} at a time)",
        crash::POINTS.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "crash points failed: {failed:?}");
}

#[cfg(feature = "fault-injection")]
mod crash {
    use std::os::unix::process::ExitStatusExt;
    use std::time::Instant;

    use anyhow::{Context as _, ensure};
    use serde_json::json;

    use crate::scenarios::support::{Bed, OperatorProcess, Rotation, TIMEOUT, secs};

    pub const POINTS: [&str; 10] = [
        "mint",
        "mark-published",
        "bundle",
        "record-published",
        "activate",
        "retire",
        "hand-out",
        "roll",
        "confirm",
        "revoke",
    ];

    /// `KEYWARD_CRASH_AFTER` for the first write named `point` of the rotation.
    fn crash_spec(point: &str) -> String {
        match point {
            // Never done in the first key's lifecycle (it is created active).
            "mark-published" | "record-published" | "activate" | "retire" | "revoke" => {
                point.to_string()
            }
            // Once per PolicyAgent (two) for the first key.
            "roll" | "confirm" => format!("{point}:3"),
            _ => format!("{point}:2"),
        }
    }

    /// The state right after the abort must be the one right after `point`'s write: proof that
    /// the process died at that exact place of the rotation (and not, say, during the set-up).
    async fn check_crash_state(bed: &Bed, point: &str, k1: &str) -> anyhow::Result<String> {
        let keys = bed.key_secrets().await?;
        let states: Vec<(u32, &str)> = keys.iter().map(|k| (k.seq, k.state.as_str())).collect();
        let k2 = keys
            .iter()
            .find(|k| k.seq == 2)
            .map(|k| k.kid.clone())
            .unwrap_or_default();
        let published_at = bed.key_annotation(2, keyward::labels::PUBLISHED_AT).await?;
        let bundle = bed.trust_bundle().await?.unwrap_or_else(|| {
            crate::scenarios::bundle_server::Snapshot {
                trusted: vec![],
                revoked: vec![],
            }
        });
        let handed_out = bed.handed_out_kid().await?.unwrap_or_default();
        let w = bed.workloads_now().await?;
        let rolled = [&w.deploy_kid, &w.sts_kid]
            .iter()
            .filter(|k| k.as_deref() == Some(k2.as_str()))
            .count();
        let confirmed = bed.confirmed_count(&k2).await?;
        let seen = format!(
            "keys {states:?}, k2 published-at {published_at:?}, bundle trusts k1 {} k2 {}, handed out {}, {rolled} workloads rolled, {confirmed} agents confirmed",
            bundle.trusts(k1),
            bundle.trusts(&k2),
            if handed_out == k1 {
                "k1"
            } else if handed_out == k2 {
                "k2"
            } else {
                "?"
            },
        );
        let expected = match point {
            "mint" => states == [(1, "active"), (2, "pending")],
            "mark-published" => states == [(1, "active"), (2, "published")] && !bundle.trusts(&k2),
            "bundle" => {
                states == [(1, "active"), (2, "published")]
                    && bundle.trusts(&k2)
                    && published_at.is_none()
            }
            "record-published" => {
                states == [(1, "active"), (2, "published")] && published_at.is_some()
            }
            "activate" => states == [(1, "active"), (2, "active")],
            "retire" => states == [(1, "retiring"), (2, "active")] && handed_out == k1,
            "hand-out" => states == [(1, "retiring"), (2, "active")] && handed_out == k2,
            // Both PolicyAgents reconcile concurrently: the other one's write may have been in
            // flight when the first one's aborted the process.
            "roll" => states == [(1, "retiring"), (2, "active")] && rolled >= 1 && confirmed == 0,
            "confirm" => {
                states == [(1, "retiring"), (2, "active")] && rolled == 2 && confirmed >= 1
            }
            "revoke" => states == [(1, "deactivated"), (2, "active")] && bundle.trusts(k1),
            _ => false,
        };
        ensure!(
            expected,
            "the state at the abort is not the one right after {point:?}: {seen}"
        );
        Ok(seen)
    }

    pub async fn point(binary: &std::path::Path, point: &str) -> anyhow::Result<String> {
        let bed = Bed::real_opa(&format!("crash-{point}")).await;
        let spec = crash_spec(point);
        let mut armed =
            OperatorProcess::start(binary, &bed.ns, Some(&spec), bed.log_path("operator-1.log"))?;
        let set_up = bed
            .set_up(
                json!({ "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m" }),
            )
            .await;
        let k1 =
            set_up.with_context(|| format!("set-up; operator output:\n{}", armed.log_tail(30)))?;
        ensure!(
            armed.running(),
            "KEYWARD_CRASH_AFTER={spec}: the operator died during the first key's lifecycle:\n{}",
            armed.log_tail(30)
        );
        let before = bed.workloads_now().await?;
        let since = Instant::now();
        bed.request_rotation(&format!("crash-{point}")).await?;
        let status = armed.wait_exit(TIMEOUT).await?;
        let crashed = Instant::now();
        ensure!(
            status.signal() == Some(6)
                && armed
                    .log_text()
                    .contains(&format!("aborting right after write {point:?}")),
            "expected an abort right after write {point:?}, got {status}:\n{}",
            armed.log_tail(30)
        );
        let at_crash = check_crash_state(&bed, point, &k1).await?;
        bed.say(format!(
            "KEYWARD_CRASH_AFTER={spec}: aborted {:.1}s after the request with {at_crash}",
            secs(since, crashed)
        ));

        let op = OperatorProcess::start(binary, &bed.ns, None, bed.log_path("operator-2.log"))?;
        let outcome = async {
            let k2 = bed.wait_handed_out(|k| k != k1).await?;
            bed.wait_rotation_complete(&k1, &k2).await?;
            let completed = Instant::now();
            let t = bed
                .check_rotation(&Rotation {
                    old: k1.clone(),
                    new: k2.clone(),
                    new_seq: 2,
                    before,
                    since,
                    allowed_refusals: vec![],
                    publish_delay: std::time::Duration::from_secs(2),
                })
                .await?;
            anyhow::Ok(format!(
                "{spec}: crash +{:.1}s, completed +{:.1}s; {t}",
                secs(since, crashed),
                secs(since, completed)
            ))
        }
        .await
        .with_context(|| format!("after the restart; operator output:\n{}", op.log_tail(30)));
        drop(op);
        bed.finish().await;
        outcome
    }
}
