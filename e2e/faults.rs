//! The fault suite (issue 20, part 6): Keyward's promise while the control plane is in trouble.
//!
//! Each scenario runs the real `keyward` binary (a `fault-injection` build, floors lowered by
//! its flags) over one scenario bed (stand-in kubelet with OPA-like agents, a bundle server that
//! verifies and logs every token it sees) and does to the plane what a bad day does to a real
//! cluster: the API server stopped, killed, compacted under its watches, throttled with 429s;
//! the operator killed at random moments, started before the API server or before its CRDs,
//! its clock jumped by an hour; a second writer patching our objects every 100 ms.
//!
//! Every scenario then checks the promise itself ([`check_promise`] and the per-rotation
//! [`Bed::check_rotation`]): one key and one roll per rotation; the old key in the trust bundle
//! until every agent connected with the new one; the bundle never empty; no agent request
//! refused (no expired, not-yet-valid or untrusted token); a key that left the bundle never
//! trusted again; the other writer's fields intact.
//!
//! The scenarios stop and kill the API server, so they run on a plane of their own and are
//! `#[ignore]`d in the ordinary test run. Run them with `bash e2e/faults.sh` (the short form, as
//! in CI: each scenario once, outages of 10 s, a few rotations) or `bash e2e/faults.sh --long`
//! (30 s outages, 50 rotations under random SIGKILLs). Lines starting with `[e2e` are progress
//! and the recovery times.
#![cfg(feature = "fault-injection")]

#[allow(dead_code)]
mod scenarios;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, ensure};
use base64::Engine as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use keyward::api::{PolicyAgent, ProvisioningKey};
use keyward::labels as l;
use keyward_testbed::eventually;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt as _};
use rand::{Rng as _, SeedableRng as _};
use scenarios::support::{
    Bed, DEPLOY, OperatorProcess, PK, Rotation, STS, Workloads, private_operator_binary, secs,
};
use serde_json::json;

const SKIP: &str = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`";

// ---------------------------------------------------------------------------------------------
// The form (short in CI, long by hand) and the plane.

/// `KEYWARD_FAULTS_LONG=1` (set by `e2e/faults.sh --long`).
fn long() -> bool {
    std::env::var("KEYWARD_FAULTS_LONG").is_ok_and(|v| v == "1")
}

/// How long the API server stays away: 10 s in the short form, 30 s in the long one
/// (`KEYWARD_FAULTS_OUTAGE_SECS` overrides both).
fn outage() -> Duration {
    let default = if long() { 30 } else { 10 };
    Duration::from_secs(
        std::env::var("KEYWARD_FAULTS_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The fault plane's state directory. The scenarios refuse to run on any other plane: they
/// kill its API server.
fn plane_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::var("KEYWARD_FAULTS_PLANE")
        .map_err(|_| anyhow!("KEYWARD_FAULTS_PLANE is not set: {SKIP}"))?;
    let cluster = std::env::var("KEYWARD_CLUSTER_DIR").unwrap_or_default();
    ensure!(
        cluster == dir,
        "KEYWARD_CLUSTER_DIR ({cluster}) is not the fault plane ({dir}): {SKIP}"
    );
    let kubeconfig = keyward_testbed::kubeconfig_path();
    ensure!(
        kubeconfig.starts_with(&dir),
        "KUBECONFIG ({}) is not the fault plane's: {SKIP}",
        kubeconfig.display()
    );
    Ok(PathBuf::from(dir))
}

/// `bash e2e/cluster.sh <args>` on the fault plane; its stdout.
fn cluster(args: &[&str]) -> anyhow::Result<String> {
    plane_dir()?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/cluster.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("run e2e/cluster.sh {args:?}"))?;
    ensure!(
        out.status.success(),
        "e2e/cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The plane's own kubectl (first on PATH through `e2e/cluster.sh env`) with its kubeconfig.
fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("kubectl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run kubectl")?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("kubectl's stdin")?
            .write_all(text.as_bytes())?;
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of a plane component's log (for failure messages).
fn plane_log_tail(component: &str, n: usize) -> String {
    let Ok(dir) = plane_dir() else {
        return String::new();
    };
    let text = std::fs::read_to_string(dir.join(format!("{component}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.chars().take(300).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

fn apiserver_pid() -> anyhow::Result<u32> {
    let path = plane_dir()?.join("kube-apiserver.pid");
    std::fs::read_to_string(&path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .parse()
        .context("the API server's pid")
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// Restores the API server if a scenario fails while it is stopped or killed, so the next
/// scenario starts on a working plane.
struct PlaneGuard {
    paused: Option<u32>,
    killed: bool,
}

impl PlaneGuard {
    fn new() -> Self {
        PlaneGuard {
            paused: None,
            killed: false,
        }
    }

    fn pause(&mut self) -> anyhow::Result<()> {
        let pid = apiserver_pid()?;
        signal(pid, "STOP")?;
        self.paused = Some(pid);
        Ok(())
    }

    fn resume(&mut self) -> anyhow::Result<Instant> {
        if let Some(pid) = self.paused.take() {
            signal(pid, "CONT")?;
        }
        Ok(Instant::now())
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        self.killed = true;
        cluster(&["apiserver-kill"]).map(drop)
    }

    /// Starts the API server again; returns when it answers `/readyz`.
    fn start(&mut self) -> anyhow::Result<Instant> {
        cluster(&["apiserver-start"])?;
        self.killed = false;
        Ok(Instant::now())
    }
}

impl Drop for PlaneGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.paused.take() {
            let _ = signal(pid, "CONT");
        }
        if self.killed {
            let _ = cluster(&["apiserver-start"]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A scenario: one bed, one operator process, the rotations so far.

struct Scenario {
    bed: Bed,
    _bin_dir: tempfile::TempDir,
    bin: PathBuf,
    op: OperatorProcess,
    /// Extra `keyward run` arguments and environment of every start.
    args: Vec<String>,
    env: Vec<(String, String)>,
    starts: usize,
    /// The key handed out now and its sequence number.
    kid: String,
    seq: u32,
    rotations: usize,
}

const ROTATION: &str =
    r#"{ "minInterval": "1s", "publishDelay": "2s", "confirmationTimeout": "3m" }"#;

impl Scenario {
    /// A bed, the operator, the key and both PolicyAgents confirmed on the first key.
    async fn start(label: &str) -> anyhow::Result<Self> {
        let mut s = Self::without_key(label, &[], &[]).await?;
        s.set_up().await?;
        Ok(s)
    }

    /// A bed and the operator, nothing created yet.
    async fn without_key(label: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        plane_dir()?;
        let bin_dir = tempfile::Builder::new()
            .prefix("keyward-e2e-faults-bin-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
        let bin = private_operator_binary(bin_dir.path())?;
        let bed = Bed::new(label).await;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let op = Self::spawn(&bed, &bin, &args, &env, 0)?;
        Ok(Scenario {
            bed,
            _bin_dir: bin_dir,
            bin,
            op,
            args,
            env,
            starts: 1,
            kid: String::new(),
            seq: 0,
            rotations: 0,
        })
    }

    fn spawn(
        bed: &Bed,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        n: usize,
    ) -> anyhow::Result<OperatorProcess> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        OperatorProcess::start_with(
            bin,
            &bed.ns,
            None,
            &args,
            &env,
            bed.log_path(&format!("operator-{n}.log")),
        )
    }

    /// SIGKILL the operator and start it again at once.
    fn restart(&mut self) -> anyhow::Result<()> {
        self.op.kill();
        self.op = Self::spawn(&self.bed, &self.bin, &self.args, &self.env, self.starts)?;
        self.starts += 1;
        Ok(())
    }

    async fn set_up(&mut self) -> anyhow::Result<()> {
        let rotation: serde_json::Value = serde_json::from_str(ROTATION)?;
        self.kid =
            self.bed.set_up(rotation).await.with_context(|| {
                format!("set-up; the operator's output:\n{}", self.op.log_tail(30))
            })?;
        self.seq = 1;
        Ok(())
    }

    /// Requests a rotation and waits until the old key is retiring: the new key is minted,
    /// published, handed out, and the rolls and confirmations are in flight.
    async fn in_flight(&self, label: &str) -> anyhow::Result<(Workloads, Instant)> {
        let (before, since) = self.request(label).await?;
        self.bed
            .wait_retiring(self.seq)
            .await
            .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(30)))?;
        Ok((before, since))
    }

    async fn request(&self, label: &str) -> anyhow::Result<(Workloads, Instant)> {
        let before = self.bed.workloads_now().await?;
        let since = Instant::now();
        self.bed
            .request_rotation(&format!("{label}-{}", self.rotations + 1))
            .await?;
        Ok((before, since))
    }

    /// The operator's first reconcile after a fault: a new ProvisioningKey (the probe) created
    /// when the fault ended, until its agent Secret carries a key. Goal: within 10 s.
    async fn probe_first_reconcile(&self, back: Instant) -> anyhow::Result<()> {
        let name = format!("probe-{}", self.rotations + 1);
        let pk: ProvisioningKey = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1",
            "kind": "ProvisioningKey",
            "metadata": { "name": name },
            "spec": {},
        }))?;
        // The API server may still refuse for a moment after it answers /readyz.
        let api = self.bed.api::<ProvisioningKey>();
        eventually(
            "the probe ProvisioningKey created",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let (api, pk) = (api.clone(), pk.clone());
                async move { api.create(&Default::default(), &pk).await.ok().map(drop) }
            },
        )
        .await?;
        let secrets = self.bed.api::<Secret>();
        let name2 = name.clone();
        eventually(
            "the probe's agent Secret written",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let (secrets, name) = (secrets.clone(), name2.clone());
                async move {
                    secrets
                        .get_opt(&name)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|s| s.data)
                        .filter(|d| d.contains_key(l::DATA_TOKEN))
                        .map(drop)
                }
            },
        )
        .await
        .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(30)))?;
        let first = secs(back, Instant::now());
        self.bed.say(format!(
            "RECOVERY first reconcile (a new key's token written) {first:.2}s after the fault ended"
        ));
        ensure!(
            first < 10.0,
            "the operator's first reconcile came {first:.1}s after the fault ended (goal: 10 s)"
        );
        Ok(())
    }

    /// Waits until the rotation requested at `since` is complete and checks it; with `back`
    /// (when the fault ended), prints how long after it the rotation completed.
    async fn finish(
        &mut self,
        before: Workloads,
        since: Instant,
        back: Option<Instant>,
    ) -> anyhow::Result<()> {
        let old = self.kid.clone();
        let new = self
            .bed
            .wait_handed_out(|k| k != old)
            .await
            .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(30)))?;
        if back.is_some() {
            // After an API server restart the rolls wait on kube-controller-manager, whose
            // informers back off (client-go: up to 30 s) while the restarted API server warms
            // up: give the agents' confirmation longer than the bed's usual minute.
            let bed = &self.bed;
            let kid = new.clone();
            eventually(
                "both PolicyAgents confirmed after the fault",
                Duration::from_secs(150),
                Duration::from_millis(200),
                || {
                    let kid = kid.clone();
                    async move { (bed.confirmed_count(&kid).await.ok()? == 2).then_some(()) }
                },
            )
            .await
            .with_context(|| {
                format!(
                    "the operator's output:\n{}\nkube-controller-manager's last lines:\n{}",
                    self.op.log_tail(30),
                    plane_log_tail("kube-controller-manager", 8)
                )
            })?;
        }
        self.bed
            .wait_rotation_complete(&old, &new)
            .await
            .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(40)))?;
        let done = Instant::now();
        let t = self
            .bed
            .check_rotation(&Rotation {
                old: old.clone(),
                new: new.clone(),
                new_seq: self.seq + 1,
                before,
                since,
                allowed_refusals: vec![],
                publish_delay: Duration::from_secs(2),
            })
            .await
            .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(40)))?;
        self.bed.say(format!("rotation {old} -> {new}: {t}"));
        if let Some(back) = back {
            self.bed.say(format!(
                "RECOVERY rotation complete {:.2}s after the fault ended",
                secs(back, done)
            ));
        }
        self.kid = new;
        self.seq += 1;
        self.rotations += 1;
        Ok(())
    }

    /// The promise over the whole scenario, then the bed is torn down.
    async fn done(mut self) -> anyhow::Result<()> {
        check_promise(&self.bed, self.seq as usize)
            .await
            .with_context(|| format!("the operator's output:\n{}", self.op.log_tail(30)))?;
        ensure!(
            self.op.running(),
            "the operator exited:\n{}",
            self.op.log_tail(30)
        );
        self.op.kill();
        self.bed.finish().await;
        Ok(())
    }
}

/// The promise, over everything the bed saw since it started.
async fn check_promise(bed: &Bed, keys: usize) -> anyhow::Result<()> {
    // One key per rotation: every key Secret ever seen, and the ones there now.
    let seen: BTreeSet<String> = bed
        .keys
        .all()
        .into_iter()
        .map(|c| c.name)
        .filter(|n| n.starts_with(&format!("{PK}-k")))
        .collect();
    let now = bed.key_secrets().await?;
    ensure!(
        seen.len() == keys && now.len() == keys,
        "expected {keys} key Secrets (one per rotation), saw {seen:?}, now {now:?}"
    );
    // The bundle: never empty once published, never deleted, and a key that left it (revoked)
    // never comes back.
    let mut trusted_before: BTreeSet<String> = BTreeSet::new();
    let mut gone: BTreeSet<String> = BTreeSet::new();
    for c in bed.bundle.all() {
        let b = c
            .value
            .ok_or_else(|| anyhow!("the trust bundle ConfigMap was deleted"))?;
        let trusted: BTreeSet<String> = b.trusted.into_iter().collect();
        ensure!(!trusted.is_empty(), "the trust bundle was empty");
        let back: Vec<&String> = trusted.intersection(&gone).collect();
        ensure!(back.is_empty(), "revoked keys trusted again: {back:?}");
        gone.extend(trusted_before.difference(&trusted).cloned());
        gone.extend(b.revoked.iter().cloned());
        trusted_before = trusted;
    }
    // No agent request refused: no expired, not-yet-valid, untrusted or revoked token was ever
    // presented (a bundle read failing during an outage is not a refusal of the key).
    scenarios::support::check_no_rejections(&bed.server.log(), bed.started, &[])?;
    // And the token the agents hold now is valid and trusted.
    let secret = bed.api::<Secret>().get(PK).await?;
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(l::DATA_TOKEN))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| anyhow!("the agent Secret holds no token"))?;
    let (kid, nbf, exp) = token_times(&token)?;
    let unix = chrono::Utc::now().timestamp();
    ensure!(
        nbf <= unix + 1 && unix < exp,
        "the agents' token is not valid now: nbf {nbf}, exp {exp}, now {unix}"
    );
    let bundle = bed
        .trust_bundle()
        .await?
        .ok_or_else(|| anyhow!("no trust bundle"))?;
    ensure!(
        bundle.trusts(&kid),
        "the agents' token key {kid} is not trusted"
    );
    Ok(())
}

/// `(kid, nbf, exp)` of a compact JWS, unverified (the bundle server verifies; this only reads
/// the times the operator wrote).
fn token_times(token: &str) -> anyhow::Result<(String, i64, i64)> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let header: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts.next().unwrap_or_default())?)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts.next().unwrap_or_default())?)?;
    Ok((
        header["kid"].as_str().unwrap_or_default().to_string(),
        claims["nbf"].as_i64().unwrap_or_default(),
        claims["exp"].as_i64().unwrap_or_default(),
    ))
}

/// The API server's count of requests API Priority and Fairness refused at the fault's
/// priority level (`apiserver_flowcontrol_rejected_requests_total`).
fn apf_rejections() -> anyhow::Result<u64> {
    let metrics = kubectl(&["get", "--raw", "/metrics"], None)?;
    Ok(metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_flowcontrol_rejected_requests_total{")
                && l.contains("priority_level=\"keyward-faults-reject\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum())
}

fn pause(d: Duration) -> impl Future<Output = ()> {
    tokio::time::sleep(d)
}

// ---------------------------------------------------------------------------------------------
// The scenarios. Each runs alone (`--test-threads=1`): most of them stop the shared plane.

/// The API server SIGSTOPped mid-rotation (every connection hangs), then continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn apiserver_stopped_mid_rotation() -> anyhow::Result<()> {
    let mut s = Scenario::start("faults-sigstop").await?;
    let mut plane = PlaneGuard::new();
    let (before, since) = s.in_flight("sigstop").await?;
    plane.pause()?;
    s.bed
        .say(format!("API server stopped (SIGSTOP) for {:?}", outage()));
    pause(outage()).await;
    let back = plane.resume()?;
    s.bed.say("API server continued (SIGCONT)");
    s.probe_first_reconcile(back).await?;
    s.finish(before, since, Some(back)).await?;
    s.done().await
}

/// The API server killed (SIGKILL) right after a rotation was requested with
/// `keyward rotate --wait` (before the new key is handed out), and started again after the
/// outage. The CLI waits the outage out and exits 0 once the new key is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn apiserver_killed_mid_rotation() -> anyhow::Result<()> {
    let mut s = Scenario::start("faults-kill").await?;
    let mut plane = PlaneGuard::new();
    let before = s.bed.workloads_now().await?;
    let since = Instant::now();
    let cli_out = s.bed.log_path("rotate.log");
    let mut cli = Command::new(&s.bin)
        .args(["rotate", "-n", &s.bed.ns, PK, "--wait", "--timeout", "3m"])
        .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
        .stdout(std::fs::File::create(&cli_out)?)
        .stderr(std::fs::File::create(s.bed.log_path("rotate.err"))?)
        .spawn()
        .context("run keyward rotate --wait")?;
    // Requested (the annotation is on the key), not handed out yet (publishDelay is 2 s).
    let pks = s.bed.api::<ProvisioningKey>();
    eventually(
        "the rotation requested by the CLI",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            let pks = pks.clone();
            async move {
                let pk = pks.get(PK).await.ok()?;
                pk.annotations().contains_key(l::ROTATE).then_some(())
            }
        },
    )
    .await?;
    plane.kill()?;
    s.bed
        .say(format!("API server killed; down for {:?}", outage()));
    pause(outage()).await;
    let back = plane.start()?;
    s.bed.say("API server ready again");
    s.probe_first_reconcile(back).await?;
    s.finish(before, since, Some(back)).await?;
    let status = tokio::task::spawn_blocking(move || cli.wait()).await??;
    let said = std::fs::read_to_string(&cli_out)?;
    let err = std::fs::read_to_string(s.bed.log_path("rotate.err"))?;
    ensure!(
        status.success() && said.contains("rotated"),
        "keyward rotate --wait did not wait out the outage: {status}; stdout: {said}; stderr: {err}"
    );
    s.bed.say(format!(
        "keyward rotate --wait waited the outage out: {}",
        said.trim()
    ));
    s.done().await
}

/// etcd compacted at its current revision while the API server is down, so every watch
/// resumed after the restart asks for a compacted resourceVersion: 410 Gone, then a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn etcd_compacted_under_a_restarted_apiserver() -> anyhow::Result<()> {
    let mut s = Scenario::start("faults-compact").await?;
    let mut plane = PlaneGuard::new();
    let (before, since) = s.in_flight("compact").await?;
    // Writes after the operator's last watch event, so the compaction is past every
    // resourceVersion its watches hold.
    for i in 0..20 {
        let cm = json!({ "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": format!("filler-{i}") }, "data": { "i": i.to_string() } });
        s.bed
            .api::<ConfigMap>()
            .patch(
                &format!("filler-{i}"),
                &PatchParams::apply("faults-filler"),
                &Patch::Apply(&cm),
            )
            .await?;
    }
    plane.kill()?;
    let rev = cluster(&["etcd-compact"])?;
    s.bed.say(format!(
        "API server killed, etcd compacted at revision {}",
        rev.trim()
    ));
    pause(Duration::from_secs(2)).await;
    let back = plane.start()?;
    s.bed.say("API server ready again");
    s.probe_first_reconcile(back).await?;
    s.finish(before, since, Some(back)).await?;
    s.done().await
}

/// The operator started while the API server is down: it waits (never exits), then reconciles
/// within seconds of the API server's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn operator_started_while_the_apiserver_is_down() -> anyhow::Result<()> {
    let mut s = Scenario::without_key("faults-startdown", &[], &[]).await?;
    // A key waiting for its first mint, and the operator not yet started.
    s.op.kill();
    let rotation: serde_json::Value = serde_json::from_str(ROTATION)?;
    s.bed.create_key(rotation).await?;
    let mut plane = PlaneGuard::new();
    plane.kill()?;
    s.restart()?;
    s.bed
        .say("operator started with the API server down; waiting 5 s");
    pause(Duration::from_secs(5)).await;
    ensure!(
        s.op.running(),
        "the operator exited while the API server was down:\n{}",
        s.op.log_tail(20)
    );
    ensure!(
        s.op.log_text().contains("not ready; retrying"),
        "the operator does not say it is waiting:\n{}",
        s.op.log_tail(20)
    );
    let back = plane.start()?;
    let kid = s.bed.wait_handed_out(|_| true).await?;
    let first = Instant::now();
    s.bed.say(format!(
        "RECOVERY first key {kid} handed out {:.2}s after the API server answered",
        secs(back, first)
    ));
    ensure!(
        secs(back, first) < 10.0,
        "the first reconcile came {:.1}s after the API server's return (goal: 10 s)",
        secs(back, first)
    );
    s.kid = kid.clone();
    s.seq = 1;
    s.bed.create_agents().await?;
    s.bed.wait_confirmed(&kid).await?;
    let (before, since) = s.request("after-start").await?;
    s.finish(before, since, None).await?;
    s.done().await
}

/// The CRDs missing when the operator starts, installed later: it says so, stays up and not
/// ready, and picks them up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn crds_installed_after_the_operator_started() -> anyhow::Result<()> {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let crds = crds.to_string_lossy().into_owned();
    let mut s = Scenario::without_key("faults-crds", &[], &[]).await?;
    s.op.kill();
    kubectl(
        &["delete", "-f", &crds, "--ignore-not-found", "--wait"],
        None,
    )?;
    // Put them back whatever happens next.
    struct Reinstall(String);
    impl Drop for Reinstall {
        fn drop(&mut self) {
            let _ = kubectl(&["apply", "-f", &self.0], None);
        }
    }
    let _reinstall = Reinstall(crds.clone());
    s.restart()?;
    pause(Duration::from_secs(4)).await;
    ensure!(
        s.op.running(),
        "the operator exited without its CRDs:\n{}",
        s.op.log_tail(20)
    );
    let log = s.op.log_text();
    ensure!(
        log.contains("not ready; retrying") && log.contains("CustomResourceDefinition"),
        "the operator does not name the missing CRDs:\n{}",
        s.op.log_tail(20)
    );
    kubectl(&["apply", "-f", &crds], None)?;
    kubectl(
        &[
            "wait",
            "--for",
            "condition=Established",
            "--timeout",
            "30s",
            "-f",
            &crds,
        ],
        None,
    )?;
    let installed = Instant::now();
    s.bed.say("CRDs installed");
    s.set_up().await?;
    s.bed.say(format!(
        "RECOVERY first key confirmed {:.2}s after the CRDs were installed (no restart: {} start)",
        secs(installed, Instant::now()),
        s.starts
    ));
    let (before, since) = s.request("after-crds").await?;
    s.finish(before, since, None).await?;
    s.done().await
}

/// A second writer patches our objects every 100 ms (its own field manager, its own fields)
/// through two rotations: the operator's optimistic writes meet 409s, and every field the
/// other writer set survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn a_concurrent_writer_every_100ms() -> anyhow::Result<()> {
    let mut s = Scenario::start("faults-writer").await?;
    let written: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = s.bed.client.clone();
        let ns = s.bed.ns.clone();
        let (written, stop) = (written.clone(), stop.clone());
        tokio::spawn(async move {
            let pp = PatchParams::default();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = json!({ "metadata": {
                    "annotations": { "faults.example.com/writer": n.to_string() },
                    "labels": { "faults.example.com/writer": n.to_string() },
                } });
                let patch = Patch::Merge(&body);
                // Labels only on the Deployment: an annotation change bumps a Deployment's
                // generation, which the roll count reads.
                let labels = json!({ "metadata": {
                    "labels": { "faults.example.com/writer": n.to_string() },
                } });
                let labels = Patch::Merge(&labels);
                let keys = format!("{PK}-k1");
                let results = [
                    (
                        "ProvisioningKey",
                        PK.to_string(),
                        Api::<ProvisioningKey>::namespaced(client.clone(), &ns)
                            .patch(PK, &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "PolicyAgent",
                        DEPLOY.to_string(),
                        Api::<PolicyAgent>::namespaced(client.clone(), &ns)
                            .patch(DEPLOY, &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "PolicyAgent",
                        STS.to_string(),
                        Api::<PolicyAgent>::namespaced(client.clone(), &ns)
                            .patch(STS, &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "Secret",
                        PK.to_string(),
                        Api::<Secret>::namespaced(client.clone(), &ns)
                            .patch(PK, &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "Secret",
                        keys.clone(),
                        Api::<Secret>::namespaced(client.clone(), &ns)
                            .patch(&keys, &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "ConfigMap",
                        format!("{PK}-trust"),
                        Api::<ConfigMap>::namespaced(client.clone(), &ns)
                            .patch(&format!("{PK}-trust"), &pp, &patch)
                            .await
                            .map(drop),
                    ),
                    (
                        "Deployment",
                        DEPLOY.to_string(),
                        Api::<Deployment>::namespaced(client.clone(), &ns)
                            .patch(DEPLOY, &pp, &labels)
                            .await
                            .map(drop),
                    ),
                ];
                {
                    let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
                    for (kind, name, r) in results {
                        if r.is_ok() {
                            w.insert(format!("{kind}/{name}"), n);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for _ in 0..2 {
        let (before, since) = s.in_flight("writer").await?;
        s.finish(before, since, None).await?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await?;
    let written = written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure!(written.len() == 7, "the writer reached only {written:?}");
    for (object, n) in &written {
        let (kind, name) = object.split_once('/').unwrap_or_default();
        let meta = match kind {
            "ProvisioningKey" => s
                .bed
                .api::<ProvisioningKey>()
                .get(name)
                .await?
                .meta()
                .clone(),
            "PolicyAgent" => s.bed.api::<PolicyAgent>().get(name).await?.meta().clone(),
            "Secret" => s.bed.api::<Secret>().get(name).await?.meta().clone(),
            "ConfigMap" => s.bed.api::<ConfigMap>().get(name).await?.meta().clone(),
            _ => s.bed.api::<Deployment>().get(name).await?.meta().clone(),
        };
        let want = n.to_string();
        for (what, map) in [("annotation", &meta.annotations), ("label", &meta.labels)] {
            if kind == "Deployment" && what == "annotation" {
                continue;
            }
            let got = map
                .as_ref()
                .and_then(|m| m.get("faults.example.com/writer"));
            ensure!(
                got == Some(&want),
                "{object}: the other writer's {what} is {got:?}, it last wrote {want}"
            );
        }
    }
    s.bed.say(format!(
        "the other writer's fields survived on {} objects ({} rounds)",
        written.len(),
        written.values().max().copied().unwrap_or_default()
    ));
    s.done().await
}

/// SIGKILL of the operator at random moments of rotations (1 or 2 kills per rotation, each a
/// random 0-3 s after the request or the last restart), restarted at once: 3 rotations in the
/// short form, 50 in the long one. Every rotation still mints one key, rolls each workload
/// once, and revokes only after every agent connected with the new key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn operator_sigkilled_at_random_points() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("KEYWARD_FAULTS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rotations = if long() { 50 } else { 3 };
    let mut s = Scenario::start("faults-sigkill").await?;
    s.bed.say(format!(
        "{rotations} rotations, seed {seed} (KEYWARD_FAULTS_SEED={seed} repeats it)"
    ));
    s.bed
        .patch_spec(json!({ "token": { "ttl": "20s" } }))
        .await?;
    let mut kills = 0;
    for _ in 0..rotations {
        let (before, since) = s.request("sigkill").await?;
        for _ in 0..rng.gen_range(1..=2) {
            pause(Duration::from_millis(rng.gen_range(0..3000))).await;
            s.restart()?;
            kills += 1;
        }
        s.finish(before, since, None).await?;
    }
    s.bed
        .say(format!("{kills} SIGKILLs over {rotations} rotations"));
    s.done().await
}

/// The operator's wall clock jumps an hour forward mid-rotation, then an hour back (libfaketime,
/// the monotonic clock untouched, as an NTP step does). Tokens stay valid against the real
/// time (20 s ttl, so several are re-issued meanwhile), nothing is revoked early, and no
/// rotation starts for the jump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn the_operators_clock_jumps_an_hour() -> anyhow::Result<()> {
    let lib = std::env::var("KEYWARD_LIBFAKETIME").map_err(|_| {
        anyhow!("KEYWARD_LIBFAKETIME is not set (e2e/faults.sh installs libfaketime)")
    })?;
    let dir = tempfile::tempdir()?;
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n")?;
    let offset_path = offset.to_string_lossy().into_owned();
    let env = [
        ("LD_PRELOAD", lib.as_str()),
        ("FAKETIME_TIMESTAMP_FILE", offset_path.as_str()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut s = Scenario::without_key("faults-clock", &[], &env).await?;
    s.set_up().await?;
    s.bed
        .patch_spec(json!({ "token": { "ttl": "20s" } }))
        .await?;
    for jump in ["+3600", "-3600"] {
        let (before, since) = s.in_flight(&format!("clock{jump}")).await?;
        std::fs::write(&offset, format!("{jump}\n"))?;
        let at = Instant::now();
        s.bed
            .say(format!("the operator's wall clock jumped {jump} s"));
        s.finish(before, since, None).await?;
        // Past at least one token refresh (8-10 s into a 20 s token) under the jumped clock.
        pause(Duration::from_secs(12).saturating_sub(at.elapsed())).await;
        check_promise(&s.bed, s.seq as usize).await?;
        std::fs::write(&offset, "+0\n")?;
    }
    ensure!(
        s.seq == 3,
        "expected exactly the 2 requested rotations, the key is at sequence {}",
        s.seq
    );
    s.done().await
}

/// API Priority and Fairness refuses the operator's requests (429) whenever more than one is in
/// flight: the operator runs as a ServiceAccount (an admin is exempt from APF) that a FlowSchema
/// sends to a priority level with no nominal share (one seat) and no queue. A rotation and 10
/// new keys at once complete through the 429s: kube's client retries them, honouring the
/// server's `Retry-After`. The API server's own metrics show that it refused requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the API server: runs on a plane of its own, `bash e2e/faults.sh`"]
async fn apf_429s_mid_rotation() -> anyhow::Result<()> {
    // The operator's identity: a ServiceAccount bound to cluster-admin, its token in a
    // kubeconfig of its own.
    let dir = tempfile::tempdir()?;
    let sa = "keyward-faults-operator";
    let sa_ns = "default";
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"{{"apiVersion":"v1","kind":"ServiceAccount","metadata":{{"name":"{sa}","namespace":"{sa_ns}"}}}}"#
        )),
    )?;
    kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            r#"{{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding",
               "metadata":{{"name":"{sa}"}},
               "roleRef":{{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"cluster-admin"}},
               "subjects":[{{"kind":"ServiceAccount","name":"{sa}","namespace":"{sa_ns}"}}]}}"#
        )),
    )?;
    let token = kubectl(
        &["create", "token", sa, "-n", sa_ns, "--duration", "1h"],
        None,
    )?;
    let admin = kube::config::Kubeconfig::read_from(keyward_testbed::kubeconfig_path())?;
    let mut kc = admin.clone();
    for auth in &mut kc.auth_infos {
        auth.auth_info = Some(kube::config::AuthInfo {
            token: Some(token.trim().to_string().into()),
            ..Default::default()
        });
    }
    let kubeconfig = dir.path().join("operator.kubeconfig");
    std::fs::write(&kubeconfig, serde_yaml::to_string(&kc)?)?;
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();

    let mut s = Scenario::without_key("faults-apf", &[], &[("KUBECONFIG", &kubeconfig)]).await?;
    s.set_up().await?;
    let policy = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
  {{"apiVersion":"flowcontrol.apiserver.k8s.io/v1","kind":"PriorityLevelConfiguration",
    "metadata":{{"name":"keyward-faults-reject"}},
    "spec":{{"type":"Limited","limited":{{"nominalConcurrencyShares":0,"lendablePercent":0,
      "borrowingLimitPercent":0,"limitResponse":{{"type":"Reject"}}}}}}}},
  {{"apiVersion":"flowcontrol.apiserver.k8s.io/v1","kind":"FlowSchema",
    "metadata":{{"name":"keyward-faults-reject"}},
    "spec":{{"priorityLevelConfiguration":{{"name":"keyward-faults-reject"}},"matchingPrecedence":100,
      "distinguisherMethod":{{"type":"ByUser"}},
      "rules":[{{"subjects":[{{"kind":"ServiceAccount","serviceAccount":{{"name":"{sa}","namespace":"{sa_ns}"}}}}],
        "resourceRules":[{{"verbs":["*"],"apiGroups":["*"],"resources":["*"],"namespaces":["*"],"clusterScope":true}}],
        "nonResourceRules":[{{"verbs":["*"],"nonResourceURLs":["*"]}}]}}]}}}}]}}"#
    );
    struct Lift;
    impl Drop for Lift {
        fn drop(&mut self) {
            let _ = kubectl(
                &[
                    "delete",
                    "flowschema,prioritylevelconfiguration",
                    "keyward-faults-reject",
                    "--ignore-not-found",
                ],
                None,
            );
        }
    }
    let lift = Lift;
    kubectl(&["apply", "-f", "-"], Some(&policy))?;
    // The API server applies a new FlowSchema within about a second.
    pause(Duration::from_secs(3)).await;
    let rejected_before = apf_rejections()?;
    // A rotation and 10 new keys at once: the operator's concurrent requests meet 429s.
    let (before, since) = s.request("apf").await?;
    let probes: Vec<String> = (1..=10).map(|i| format!("apf-probe-{i}")).collect();
    let pks = s.bed.api::<ProvisioningKey>();
    futures::future::try_join_all(probes.iter().map(|name| {
        let pk: ProvisioningKey = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
            "metadata": { "name": name }, "spec": {},
        }))
        .expect("a ProvisioningKey");
        let pks = pks.clone();
        async move { pks.create(&Default::default(), &pk).await }
    }))
    .await?;
    s.finish(before, since, None).await?;
    let secrets = s.bed.api::<Secret>();
    let all = probes.clone();
    eventually(
        "every new key's agent Secret written under APF",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let (secrets, all) = (secrets.clone(), all.clone());
            async move {
                for name in &all {
                    secrets
                        .get_opt(name)
                        .await
                        .ok()
                        .flatten()?
                        .data?
                        .get(l::DATA_TOKEN)?;
                }
                Some(())
            }
        },
    )
    .await?;
    let rejected = apf_rejections()? - rejected_before;
    s.bed.say(format!(
        "API Priority and Fairness refused {rejected} of the operator's requests with 429; \
         the rotation and 10 new keys completed through them"
    ));
    ensure!(
        rejected > 0,
        "API Priority and Fairness refused none of the operator's requests: the fault did not bite"
    );
    drop(lift);
    s.done().await
}
