//! High availability on the real local control plane: two `keyward run --leader-elect`
//! processes (the real binary, a `fault-injection` build) over one scenario bed (stand-in
//! kubelet with OPA-like agents, bundle server logging every token it sees).
//!
//! Run (the plane must be up: `bash e2e/cluster.sh up`, CRDs applied):
//! `cargo test --features fault-injection --test ha -- --nocapture --test-threads=3`
//! Lines starting with `[e2e` are the scenarios' progress and timings.
#![cfg(feature = "fault-injection")]

#[allow(dead_code)]
mod scenarios;

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use keyward_testbed::eventually;
use kube::api::ListParams;
use scenarios::support::{
    Bed, OperatorProcess, Rotation, Workloads, private_operator_binary, secs,
};
use serde_json::json;

const LEASE: &str = "keyward";
/// Short but legal settings (lease > renew > 1.2 x retry).
const SHORT: [&str; 6] = [
    "--leader-election-lease-duration",
    "6s",
    "--leader-election-renew-deadline",
    "4s",
    "--leader-election-retry-period",
    "1s",
];
const SHORT_LEASE: Duration = Duration::from_secs(6);
const SHORT_RETRY: Duration = Duration::from_secs(1);

/// The latest a standby takes over after the leader stopped renewing: it saw the last renewal
/// at most one jittered retry after it was made (the leader stopped right after it), then waits
/// the lease duration, and takes the Lease at its next jittered retry; plus request latency.
fn max_takeover() -> Duration {
    SHORT_LEASE + SHORT_RETRY.mul_f64(2.0 * 1.2) + Duration::from_millis(500)
}

fn binary() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("keyward-e2e-ha-bin-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a directory for the operator binary");
    let bin = private_operator_binary(dir.path()).expect("the operator binary");
    (dir, bin)
}

/// `keyward run --leader-elect` as `POD_NAME=<name>` (its Events' reportingInstance, and the
/// prefix of its Lease identity), the Lease in the bed's namespace.
fn replica(
    bed: &Bed,
    bin: &std::path::Path,
    name: &str,
    settings: &[&str],
) -> anyhow::Result<OperatorProcess> {
    replica_with(bed, bin, name, settings, &[])
}

fn replica_with(
    bed: &Bed,
    bin: &std::path::Path,
    name: &str,
    settings: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<OperatorProcess> {
    let mut args = vec!["--leader-elect", "--leader-election-namespace", &bed.ns];
    args.extend_from_slice(settings);
    let mut env = env.to_vec();
    env.push(("POD_NAME", name));
    OperatorProcess::start_with(
        bin,
        &bed.ns,
        None,
        &args,
        &env,
        bed.log_path(&format!("{name}.log")),
    )
}

/// Whether process `pid` is stopped (state `T` in `/proc/<pid>/stat`).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// The replica name (`POD_NAME`) of the Lease's holder, "" when released or missing.
async fn holder(bed: &Bed) -> String {
    bed.api::<Lease>()
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .map(|h| h.split('_').next().unwrap_or_default().to_string())
        .unwrap_or_default()
}

async fn wait_holder(bed: &Bed, name: &str, timeout: Duration) -> anyhow::Result<Instant> {
    eventually(
        &format!("Lease held by {name}"),
        timeout,
        Duration::from_millis(50),
        || async move { (holder(bed).await == name).then(Instant::now) },
    )
    .await
}

/// Waits until the process's log shows it standing by.
async fn wait_standby(op: &OperatorProcess) -> anyhow::Result<()> {
    eventually(
        "replica standing by",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || async move {
            op.log_text()
                .contains("leader election: standing by")
                .then_some(())
        },
    )
    .await
}

/// Events of the namespace, by reportingInstance.
async fn events_by(bed: &Bed, instance: &str) -> anyhow::Result<Vec<KubeEvent>> {
    Ok(bed
        .api::<KubeEvent>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_instance.as_deref() == Some(instance))
        .collect())
}

/// Starts replica a, waits until it leads, starts b and waits until it stands by, then sets up
/// the key and both PolicyAgents (all done by a). Returns the first key id.
async fn two_replicas(
    bed: &Bed,
    bin: &std::path::Path,
    settings: &[&str],
) -> anyhow::Result<(OperatorProcess, OperatorProcess, String)> {
    two_replicas_with(bed, bin, settings, &[]).await
}

/// As [`two_replicas`], with environment variables for replica a.
async fn two_replicas_with(
    bed: &Bed,
    bin: &std::path::Path,
    settings: &[&str],
    a_env: &[(&str, &str)],
) -> anyhow::Result<(OperatorProcess, OperatorProcess, String)> {
    let a = replica_with(bed, bin, "op-a", settings, a_env)?;
    wait_holder(bed, "op-a", Duration::from_secs(30))
        .await
        .with_context(|| format!("a never led:\n{}", a.log_tail(20)))?;
    let b = replica(bed, bin, "op-b", settings)?;
    wait_standby(&b)
        .await
        .with_context(|| format!("b never stood by:\n{}", b.log_tail(20)))?;
    let k1 = bed
        .set_up(json!({ "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "2m" }))
        .await
        .with_context(|| format!("set-up; a's output:\n{}", a.log_tail(30)))?;
    Ok((a, b, k1))
}

/// Only the leader writes: with two replicas up, every Event comes from the leader, the standby
/// never started its controllers (its log) and sent no write but its Lease reads. On SIGTERM the
/// leader stops its controllers, then releases the Lease, and the standby (default settings:
/// lease 15 s, renew 10 s, retry 2 s) takes over in well under the lease duration, then runs a
/// whole rotation by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_sigterm_hands_over_at_once() -> anyhow::Result<()> {
    let (_dir, bin) = binary();
    let bed = Bed::new("ha-term").await;
    let (mut a, mut b, k1) = two_replicas(&bed, &bin, &[]).await?;
    ensure!(
        !events_by(&bed, "op-a").await?.is_empty() && events_by(&bed, "op-b").await?.is_empty(),
        "Events by a standby"
    );
    ensure!(
        !b.log_text().contains("keyward controllers started"),
        "the standby started its controllers:\n{}",
        b.log_tail(20)
    );

    let term = Instant::now();
    a.signal("TERM")?;
    let took_over = wait_holder(&bed, "op-b", Duration::from_secs(20)).await?;
    let handover = took_over - term;
    let status = a.wait_exit(Duration::from_secs(20)).await?;
    let a_log = a.log_text();
    ensure!(
        status.success() && a_log.contains("controllers stopped, then the Lease released"),
        "a did not stop cleanly ({status}):\n{}",
        a.log_tail(20)
    );
    // The Lease was released only after the controllers stopped.
    let stopped_at = a_log.find("keyward controllers stopped");
    let released_at = a_log.find("Lease released");
    ensure!(
        matches!((stopped_at, released_at), (Some(s), Some(r)) if s < r),
        "the Lease was released before the controllers stopped:\n{}",
        a.log_tail(20)
    );
    bed.say(format!(
        "TIMING SIGTERM to the standby holding the Lease: {:.2}s (lease duration 15 s, retry 2 s)",
        handover.as_secs_f64()
    ));
    ensure!(
        handover < Duration::from_secs(5),
        "handover took {handover:?}"
    );

    // The new leader runs a whole rotation alone.
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.request_rotation("after-handover").await?;
    finishes(&bed, &b, &k1, before, since).await?;
    ensure!(
        events_by(&bed, "op-a")
            .await?
            .iter()
            .all(|e| e.reason.as_deref() != Some("KeyRevoked")),
        "the old leader revoked"
    );
    ensure!(b.running(), "b died:\n{}", b.log_tail(20));
    b.signal("TERM")?;
    b.wait_exit(Duration::from_secs(20)).await?;
    bed.finish().await;
    Ok(())
}

/// Where the rotation stands, to show nothing moved.
#[derive(Debug, PartialEq, Eq)]
struct Settled {
    keys: Vec<(u32, String, String)>,
    workloads: Workloads,
    trusted: Vec<String>,
    handed_out: Option<String>,
}

async fn settled(bed: &Bed) -> anyhow::Result<Settled> {
    let mut trusted = bed
        .trust_bundle()
        .await?
        .map(|b| b.trusted)
        .unwrap_or_default();
    trusted.sort();
    Ok(Settled {
        keys: bed
            .key_secrets()
            .await?
            .into_iter()
            .map(|k| (k.seq, k.kid, k.state))
            .collect(),
        workloads: bed.workloads_now().await?,
        trusted,
        handed_out: bed.handed_out_kid().await?,
    })
}

/// Requests a rotation and waits until the old key is retiring (the leader has work in flight:
/// hand-out, rolls, confirmations, revocation).
async fn rotation_in_flight(
    bed: &Bed,
    a: &OperatorProcess,
) -> anyhow::Result<(Workloads, Instant)> {
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.request_rotation("mid-rotation").await?;
    bed.wait_retiring(1)
        .await
        .with_context(|| format!("a's output:\n{}", a.log_tail(30)))?;
    Ok((before, since))
}

async fn finishes(
    bed: &Bed,
    b: &OperatorProcess,
    k1: &str,
    before: Workloads,
    since: Instant,
) -> anyhow::Result<String> {
    let k2 = bed.wait_handed_out(|k| k != k1).await?;
    bed.wait_rotation_complete(k1, &k2)
        .await
        .with_context(|| format!("b's output:\n{}", b.log_tail(30)))?;
    let t = bed
        .check_rotation(&Rotation {
            old: k1.to_string(),
            new: k2.clone(),
            new_seq: 2,
            before,
            since,
            allowed_refusals: vec![],
            publish_delay: Duration::from_secs(2),
        })
        .await?;
    bed.say(format!("TIMING rotation (from the request): {t}"));
    Ok(k2)
}

/// SIGSTOP of the leader mid-rotation (old key retiring) past the lease duration: the standby
/// takes over one lease duration after it last saw the Lease renewed and finishes the rotation
/// (exactly one new key, one roll per workload, no early revocation, no refused download).
/// Then SIGCONT: the old leader's writes are fenced from its first instruction (its renew
/// deadline passed on its monotonic clock while it was stopped), it stops its reconcilers and
/// exits non-zero, and nothing it held in memory reaches the cluster: same key Secrets, same
/// trust bundle, same agent Secret, same workload generations, no Event from it after the wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_leader_mid_rotation_then_sigcont_writes_nothing() -> anyhow::Result<()> {
    let (_dir, bin) = binary();
    let bed = Bed::new("ha-stop").await;
    let (mut a, b, k1) = two_replicas(&bed, &bin, &SHORT).await?;
    let (before, since) = rotation_in_flight(&bed, &a).await?;
    a.signal("STOP")?;
    let stopped = Instant::now();
    bed.say("leader a stopped (SIGSTOP) with the old key retiring");
    let took_over = wait_holder(&bed, "op-b", Duration::from_secs(20)).await?;
    let takeover = took_over - stopped;
    bed.say(format!(
        "TIMING SIGSTOP to the standby holding the Lease: {:.2}s (lease 6 s, retry 1 s)",
        takeover.as_secs_f64()
    ));
    ensure!(
        takeover >= SHORT_LEASE - SHORT_RETRY.mul_f64(1.5) && takeover <= max_takeover(),
        "takeover {takeover:?} after the leader stopped, expected about one lease duration"
    );
    finishes(&bed, &b, &k1, before, since).await?;

    let done = settled(&bed).await?;
    let woke = Instant::now();
    let woke_at = k8s_openapi::jiff::Timestamp::now();
    a.signal("CONT")?;
    bed.say(format!(
        "leader a resumed (SIGCONT) after {:.1}s stopped",
        secs(stopped, woke)
    ));
    let status = a.wait_exit(Duration::from_secs(20)).await?;
    let a_log = a.log_text();
    ensure!(
        !status.success() && a_log.contains("leadership lost"),
        "the old leader did not exit non-zero on the loss ({status}):\n{}",
        a.log_tail(20)
    );
    bed.say(format!(
        "TIMING old leader exited {:.2}s after SIGCONT ({status}); writes it refused after the wake: {}",
        woke.elapsed().as_secs_f64(),
        a_log.matches("write refused").count()
    ));
    // Let anything that might still be in flight land, then compare.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = settled(&bed).await?;
    ensure!(
        after == done,
        "the woken ex-leader changed the cluster:\nbefore {done:?}\nafter  {after:?}"
    );
    let late: Vec<String> = events_by(&bed, "op-a")
        .await?
        .into_iter()
        .filter(|e| e.event_time.as_ref().is_some_and(|t| t.0 > woke_at))
        .map(|e| format!("{:?} {:?}", e.reason, e.note))
        .collect();
    ensure!(late.is_empty(), "Events by the woken ex-leader: {late:?}");
    ensure!(holder(&bed).await == "op-b", "b lost the Lease");
    drop(b);
    bed.finish().await;
    Ok(())
}

/// SIGKILL of the leader mid-rotation: the standby takes over within a lease duration and
/// finishes the rotation with one new key, one roll per workload and no early revocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leader_mid_rotation_standby_finishes() -> anyhow::Result<()> {
    let (_dir, bin) = binary();
    let bed = Bed::new("ha-kill").await;
    let (mut a, b, k1) = two_replicas(&bed, &bin, &SHORT).await?;
    let (before, since) = rotation_in_flight(&bed, &a).await?;
    a.kill();
    let killed = Instant::now();
    let took_over = wait_holder(&bed, "op-b", Duration::from_secs(20)).await?;
    let takeover = took_over - killed;
    bed.say(format!(
        "TIMING SIGKILL to the standby holding the Lease: {:.2}s (lease 6 s, retry 1 s)",
        takeover.as_secs_f64()
    ));
    ensure!(takeover <= max_takeover(), "takeover took {takeover:?}");
    finishes(&bed, &b, &k1, before, since).await?;
    drop(b);
    bed.finish().await;
    Ok(())
}

/// The worst moment for a pause: the leader has decided to revoke the old key (every agent
/// confirmed the new one) and passed its leadership check, and stops (`KEYWARD_PAUSE_BEFORE`)
/// right before sending the revocation. The standby takes over and finishes the rotation (it
/// revokes the old key itself). Then the old leader resumes and sends its revocation, decided
/// on a key Secret that has changed since. With `unfenced`, the write fence and leadership
/// checks are switched off (`KEYWARD_UNFENCED`) so the request reaches the API server: the
/// resourceVersion precondition alone must refuse it (409). Either way nothing changes.
async fn paused_right_before_the_revocation(unfenced: bool) -> anyhow::Result<()> {
    let (_dir, bin) = binary();
    let label = if unfenced { "ha-pause-rv" } else { "ha-pause" };
    let bed = Bed::new(label).await;
    let mut env = vec![("KEYWARD_PAUSE_BEFORE", "revoke")];
    if unfenced {
        env.push(("KEYWARD_UNFENCED", "1"));
    }
    let (mut a, b, k1) = two_replicas_with(&bed, &bin, &SHORT, &env).await?;
    let before = bed.workloads_now().await?;
    let since = Instant::now();
    bed.request_rotation("paused-before-revoke").await?;
    let pid = a.pid();
    let stopped = eventually(
        "leader stopped right before the revocation",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || async move { is_stopped(pid).then(Instant::now) },
    )
    .await
    .with_context(|| format!("a's output:\n{}", a.log_tail(30)))?;
    ensure!(
        bed.key_state(&k1).await?.as_deref() == Some("retiring"),
        "the old key is not retiring at the pause"
    );
    bed.say("leader a stopped itself right before revoking the old key");
    let took_over = wait_holder(&bed, "op-b", Duration::from_secs(20)).await?;
    bed.say(format!(
        "TIMING pause to the standby holding the Lease: {:.2}s (lease 6 s, retry 1 s)",
        (took_over - stopped).as_secs_f64()
    ));
    finishes(&bed, &b, &k1, before, since).await?;
    let done = settled(&bed).await?;
    let woke_at = k8s_openapi::jiff::Timestamp::now();
    a.signal("CONT")?;
    let status = a.wait_exit(Duration::from_secs(20)).await?;
    let log = a.log_text();
    let resumed = log
        .split("resumed before write \"revoke\"")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    ensure!(
        !status.success() && resumed.contains("leadership lost"),
        "the old leader did not resume, then exit non-zero on the loss ({status}):\n{}",
        a.log_tail(30)
    );
    let refused_by = if unfenced {
        // The request reached the API server and was refused by its precondition.
        ensure!(
            resumed.contains("the object has been modified"),
            "no 409 for the stale revocation in a's output:\n{}",
            a.log_tail(30)
        );
        "the API server: 409, resourceVersion precondition"
    } else {
        ensure!(
            resumed.contains("not the leader"),
            "the stale revocation was not refused by the fence:\n{}",
            a.log_tail(30)
        );
        "the write fence (not the leader)"
    };
    bed.say(format!(
        "the woken ex-leader's revocation was refused by {refused_by}"
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = settled(&bed).await?;
    ensure!(
        after == done,
        "the woken ex-leader changed the cluster:\nbefore {done:?}\nafter  {after:?}"
    );
    if !unfenced {
        let late: Vec<String> = events_by(&bed, "op-a")
            .await?
            .into_iter()
            .filter(|e| e.event_time.as_ref().is_some_and(|t| t.0 > woke_at))
            .map(|e| format!("{:?} {:?}", e.reason, e.note))
            .collect();
        ensure!(late.is_empty(), "Events by the woken ex-leader: {late:?}");
    }
    drop(b);
    bed.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_paused_right_before_revoking_is_fenced_when_it_wakes() -> anyhow::Result<()> {
    paused_right_before_the_revocation(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfenced_the_stale_revocation_still_gets_409() -> anyhow::Result<()> {
    paused_right_before_the_revocation(true).await
}
