//! Verifier mode (`bash e2e/bench.sh --verifier`): what `keyward verifier`'s reporting costs the
//! API server under load.
//!
//! 1. The operator runs (as in the other phases, with `KEYWARD_VERIFIER_NAMESPACE` set so it
//!    reads the replicas' Leases as a deployment does); N ProvisioningKeys are created and
//!    waited for until Ready.
//! 2. R `keyward verifier` replicas start (`--replica-id v-<i>`, default report settings),
//!    each on its own loopback port, with their own kubeconfig (bench.sh: a ServiceAccount).
//! 3. The load: every key's agent token (Secret data `token`) is read; for `--duration`
//!    seconds `--rps` requests per second go to `/auth`, spread over every key, round-robin
//!    over the replicas, with `X-Keyward-Pod-UID` one of `--pods-per-key` UUIDs per key (so
//!    every key visits every replica and pod; since issue 18 the verifier ignores that header
//!    and names pods only by a pod-bound token, which this load does not send, so the reports
//!    list no pods); in the middle, `--flood-keys` keys get `--flood-rps` more for
//!    `--flood-secs`.
//! 4. Until every replica's Lease watermark has passed the end of the load (all uses written).
//!
//! Reported: requests/s achieved and `/auth` latency (client side: from the request being sent
//! on a kept-alive connection to the answer; open-loop schedule, a late request is sent at
//! once and counted); KeyUsageReport writes (from the API server's audit log: total, per
//! second, per replica, the most for one report in any 10 s window and the shortest gap between
//! two writes of one report); Lease writes per replica; the operator's requests and writes
//! meanwhile (its status `lastUsedAt`); API server latency by verb (`/metrics`); a plain GET's
//! p99 (the probe); the replicas' RSS; each replica's watermark lag (now - `renewTime`, sampled
//! every second) against its `leaseDurationSeconds`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};

use super::audit::{self, AuditLog};
use super::process::Operator;
use super::tracker::{self, Seen, Tracker};
use super::{
    Args, Report, client_from, fixture, guard, metrics, mib, say, secs, start_operator,
    start_prober,
};

const NS: &str = "bench";

/// A pod UID for pod `pod` of key `key`: a valid UUID (version 4 layout), never nil.
fn pod_uid(key: usize, pod: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", key, pod)
}

/// One request of the load: which key's token, which pod UID, which replica.
#[derive(Clone, Copy)]
struct Slot {
    key: usize,
    pod: usize,
    replica: usize,
}

/// A stream of requests at a fixed rate: slot `j` is due at `start + j / rate`.
#[derive(Clone)]
struct Stream {
    rate: f64,
    secs: f64,
    /// The keys this stream uses (indices into the token list).
    keys: Arc<Vec<usize>>,
    replicas: usize,
    pods: usize,
}

impl Stream {
    fn slots(&self) -> usize {
        (self.rate * self.secs).floor() as usize
    }

    /// Key `j mod K`; each round over the keys moves to the next replica, and every R rounds
    /// to the next pod, so each key visits every (replica, pod).
    fn slot(&self, j: usize) -> Slot {
        let k = self.keys.len().max(1);
        let round = j / k;
        Slot {
            key: self.keys[j % k],
            replica: round % self.replicas.max(1),
            pod: (round / self.replicas.max(1)) % self.pods.max(1),
        }
    }
}

/// What one stream measured.
#[derive(Default)]
struct Outcome {
    latencies_us: Vec<u32>,
    ok: usize,
    refused: BTreeMap<String, usize>,
    errors: usize,
    /// Requests sent again on a new connection because the kept-alive one had been closed by
    /// the verifier while idle (its header-read timeout, 20 s by default), as a proxy does.
    retried: usize,
    late: usize,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Outcome {
    fn merge(&mut self, o: Outcome) {
        self.latencies_us.extend(o.latencies_us);
        self.ok += o.ok;
        for (k, v) in o.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.errors += o.errors;
        self.retried += o.retried;
        self.late += o.late;
        self.first = match (self.first, o.first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last = match (self.last, o.last) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    fn sent(&self) -> usize {
        self.ok + self.refused.values().sum::<usize>() + self.errors
    }

    /// The `p` quantile of the latencies, ms.
    fn quantile(&mut self, p: f64) -> f64 {
        self.latencies_us.sort_unstable();
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len())
            - 1;
        f64::from(self.latencies_us[i]) / 1000.0
    }

    fn describe(&mut self, target: f64) -> String {
        let (p50, p99, max) = (self.quantile(0.5), self.quantile(0.99), self.quantile(1.0));
        let span = match (self.first, self.last) {
            (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let achieved = if span > 0.0 {
            self.sent() as f64 / span
        } else {
            0.0
        };
        let refused = if self.refused.is_empty() {
            String::new()
        } else {
            format!(
                ", refused: {}",
                self.refused
                    .iter()
                    .map(|(k, v)| format!("{v} x {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "{} requests in {span:.1} s = {achieved:.0}/s (target {target:.0}/s; {} sent late); 200: {}{refused}, connection errors: {} (sent again after an idle keep-alive close: {}); latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            self.sent(),
            self.late,
            self.ok,
            self.errors,
            self.retried,
            p50,
            p99,
            max,
        )
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Silent connections held open on the replicas: each task connects, sends nothing, and
/// connects again when the verifier closes it (its header-read timeout).
struct IdleConnections {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    reopened: Arc<std::sync::atomic::AtomicUsize>,
}

impl IdleConnections {
    fn hold(n: usize, addrs: Arc<Vec<SocketAddr>>) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let open = Arc::new(AtomicUsize::new(0));
        let reopened = Arc::new(AtomicUsize::new(0));
        let tasks = (0..n)
            .map(|i| {
                let (addrs, open, reopened) = (addrs.clone(), open.clone(), reopened.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let addr = addrs[i % addrs.len()];
                    let mut first = true;
                    loop {
                        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        };
                        if !first {
                            reopened.fetch_add(1, Ordering::Relaxed);
                        }
                        first = false;
                        open.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 256];
                        // Returns when the verifier closes the connection.
                        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                        open.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        IdleConnections {
            tasks,
            open,
            reopened,
        }
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reopened(&self) -> usize {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The verifier route bound to key `i` (what nginx would be configured to ask for it).
fn route(i: usize) -> String {
    format!("/auth/{NS}/{}", fixture::key_name(i))
}

/// One `/auth/<ns>/<name>` request; `Ok(None)` is a 200, `Ok(Some(reason))` a refusal.
async fn auth(
    sender: &mut Sender,
    token: &str,
    pod: &str,
    path: &str,
) -> anyhow::Result<Option<String>> {
    sender.ready().await?;
    let req = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "verifier")
        .header("authorization", format!("Bearer {token}"))
        .header("x-keyward-pod-uid", pod)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let reason = resp
        .headers()
        .get("x-keyward-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = resp.into_body().collect().await?;
    if status == http::StatusCode::OK {
        Ok(None)
    } else {
        Ok(Some(format!("{} {reason}", status.as_u16())))
    }
}

/// Runs `stream` from `start` with `workers` tasks; worker `w` sends slots `w, w + W, ...`, each
/// on its own kept-alive connection to the slot's replica.
async fn run_stream(
    stream: Stream,
    start: tokio::time::Instant,
    workers: usize,
    addrs: Arc<Vec<SocketAddr>>,
    tokens: Arc<Vec<String>>,
) -> Outcome {
    let total = stream.slots();
    let workers = workers.max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (stream, addrs, tokens) = (stream.clone(), addrs.clone(), tokens.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut conns: Vec<Option<Sender>> = (0..addrs.len()).map(|_| None).collect();
            let mut j = w;
            while j < total {
                let due = start + Duration::from_secs_f64(j as f64 / stream.rate);
                let now = tokio::time::Instant::now();
                if due > now {
                    tokio::time::sleep_until(due).await;
                } else if now - due > Duration::from_millis(50) {
                    out.late += 1;
                }
                let slot = stream.slot(j);
                let t0 = Instant::now();
                out.first.get_or_insert(t0);
                let conn = &mut conns[slot.replica];
                // A kept-alive connection may have been closed by the verifier while idle (at 10k
                // keys a round over the keys takes 20 s, the header-read timeout): as nginx and
                // Envoy do for an idempotent request on a reused connection, send it once more on
                // a new one. A failure on a new connection is an error.
                let reused = conn.as_ref().is_some_and(|s| !s.is_closed());
                let mut result = Err(anyhow::anyhow!("connect failed"));
                for attempt in 0..2 {
                    if attempt == 1 {
                        if !reused {
                            break;
                        }
                        out.retried += 1;
                    }
                    if conn.as_ref().is_none_or(|s| s.is_closed()) || attempt == 1 {
                        *conn = connect(addrs[slot.replica]).await.ok();
                    }
                    result = match conn.as_mut() {
                        Some(s) => {
                            let route = route(slot.key);
                            auth(s, &tokens[slot.key], &pod_uid(slot.key, slot.pod), &route).await
                        }
                        None => Err(anyhow::anyhow!("connect failed")),
                    };
                    if result.is_ok() {
                        break;
                    }
                }
                if result.is_err() {
                    // A new connection for the next request.
                    *conn = None;
                }
                let took = t0.elapsed();
                out.last = Some(Instant::now());
                match result {
                    Ok(None) => {
                        out.ok += 1;
                        out.latencies_us
                            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                    }
                    Ok(Some(reason)) => {
                        *out.refused.entry(reason).or_default() += 1;
                        out.latencies_us
                            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(_) => out.errors += 1,
                }
                j += workers;
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for t in tasks {
        if let Ok(o) = t.await {
            all.merge(o);
        }
    }
    all
}

/// Starts `args.verifiers` `keyward verifier` replicas (`v-<i>`, reporting, plain HTTP on
/// `args.verifier_port + i`) watching `namespace`, waits until each is ready (watches listed)
/// and has written its Lease. Logs go to `<out>/verifier-v-<i>-<tag>.log`.
pub(super) async fn start_replicas(
    args: &Args,
    namespace: &str,
    tag: &str,
    admin: &kube::Client,
) -> anyhow::Result<(Vec<Operator>, Vec<SocketAddr>)> {
    let r = args.verifiers;
    let v_kubeconfig = args
        .verifier_kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(Into::into))
        .context("no kubeconfig for the verifiers (--verifier-kubeconfig or KUBECONFIG)")?;
    let addrs: Vec<SocketAddr> = (0..r)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], args.verifier_port + i as u16)))
        .collect();
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let vlog = args.out.join(format!("verifier-v-{i}-{tag}.log"));
        let _ = std::fs::remove_file(&vlog);
        let mut vargs: Vec<String> = [
            "verifier",
            "--plain-http",
            "--namespaces",
            namespace,
            "--replica-id",
            &format!("v-{i}"),
            "--lease-namespace",
            &args.lease_namespace,
            "--address",
            &addr.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        vargs.extend(args.verifier_arg.iter().cloned());
        let p = Operator::start_with(&args.operator_bin, &vargs, &[], &v_kubeconfig, &vlog)?;
        say(&format!(
            "verifier v-{i} started (pid {}) on {addr}, log {}",
            p.pid,
            vlog.display()
        ));
        replicas.push(p);
    }
    for addr in &addrs {
        wait_ready(*addr, Duration::from_secs(120)).await?;
    }
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &args.lease_namespace);
    let t_limit = Instant::now();
    loop {
        if leases_now(&leases).await?.len() >= r {
            break;
        }
        anyhow::ensure!(
            t_limit.elapsed() < Duration::from_secs(60),
            "the verifier Leases were not all written within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok((replicas, addrs))
}

/// A replica's Lease as sampled.
#[derive(Clone, Debug)]
struct LeaseSample {
    at: Timestamp,
    watermark: Option<Timestamp>,
    /// `keyward.dev/heartbeat`: renewed every interval even while reports lag.
    heartbeat: Option<Timestamp>,
    /// `keyward.dev/pending-reports`.
    pending: u64,
    duration_s: i64,
    stopped: bool,
}

fn parse_lease(l: &Lease) -> (String, LeaseSample) {
    let name = l.metadata.name.clone().unwrap_or_default();
    let spec = l.spec.clone().unwrap_or_default();
    let stopped = l
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("keyward.dev/stopped"))
        .is_some_and(|v| v == "true");
    let ann = l.metadata.annotations.clone().unwrap_or_default();
    (
        name,
        LeaseSample {
            at: Timestamp::now(),
            watermark: spec.renew_time.map(|t| t.0),
            heartbeat: ann
                .get("keyward.dev/heartbeat")
                .and_then(|t| t.parse::<Timestamp>().ok()),
            pending: ann
                .get("keyward.dev/pending-reports")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            duration_s: i64::from(spec.lease_duration_seconds.unwrap_or(0)),
            stopped,
        },
    )
}

/// Samples the verifier Leases every second until dropped.
struct LeaseWatch {
    samples: Arc<std::sync::Mutex<Vec<(String, LeaseSample)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    fn start(api: Api<Lease>) -> Self {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let lp = ListParams::default().labels("keyward.dev/component=verifier");
            loop {
                tick.tick().await;
                if let Ok(list) = api.list(&lp).await {
                    let mut v = out.lock().unwrap_or_else(|e| e.into_inner());
                    v.extend(list.items.iter().map(parse_lease));
                }
            }
        });
        Self { samples, task }
    }

    fn samples(&self) -> Vec<(String, LeaseSample)> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn leases_now(api: &Api<Lease>) -> anyhow::Result<BTreeMap<String, LeaseSample>> {
    let lp = ListParams::default().labels("keyward.dev/component=verifier");
    Ok(api.list(&lp).await?.items.iter().map(parse_lease).collect())
}

/// The most writes of one object in any `window` (sliding), and the shortest gap between two
/// writes of one object, over `writes` (times per object).
fn per_object(writes: &HashMap<String, Vec<Timestamp>>, window: f64) -> (usize, Option<f64>) {
    let mut most = 0;
    let mut gap: Option<f64> = None;
    for times in writes.values() {
        let mut t = times.clone();
        t.sort();
        let mut i = 0;
        for j in 0..t.len() {
            while secs(t[i], t[j]) >= window {
                i += 1;
            }
            most = most.max(j - i + 1);
            if j > 0 {
                let g = secs(t[j - 1], t[j]);
                gap = Some(gap.map_or(g, |x: f64| x.min(g)));
            }
        }
    }
    (most, gap)
}

/// Writes per `bucket` seconds: the highest count.
fn peak_per(times: &[Timestamp], from: Timestamp, bucket: f64) -> usize {
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for t in times {
        *counts
            .entry((secs(from, *t) / bucket).floor() as i64)
            .or_default() += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

async fn wait_ready(addr: SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if let Ok(mut s) = connect(addr).await {
            s.ready().await.ok();
            let req = http::Request::builder()
                .uri("/readyz")
                .header("host", "verifier")
                .body(Empty::<Bytes>::new())?;
            if let Ok(r) = s.send_request(req).await
                && r.status() == http::StatusCode::OK
            {
                return Ok(());
            }
        }
        anyhow::ensure!(
            t0.elapsed() < limit,
            "verifier on {addr} not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(args: &Args, report: &mut Report, guard: &guard::Guard) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(
        args.verifiers > 0 && args.rps > 0.0,
        "--verifiers and --rps must be above 0"
    );
    let admin = keyward_testbed::client().await;
    let probe_client = match &args.probe_kubeconfig {
        Some(p) => client_from(p).await?,
        None => admin.clone(),
    };
    fixture::namespaces(
        &admin,
        &[
            NS.to_string(),
            args.probe_namespace.clone(),
            args.lease_namespace.clone(),
        ],
    )
    .await?;
    let prober = start_prober(&admin, &probe_client, &args.probe_namespace).await?;
    let op_user = args.operator_user.clone();
    let v_user = args.verifier_user.clone();
    let mut audit =
        AuditLog::with_users(args.audit_log.clone(), &[op_user.clone(), v_user.clone()]);
    let keys = Tracker::start(admin.clone(), &tracker::provisioning_keys());

    // The operator, reading the verifier Leases where the replicas write them.
    let log = args.out.join(format!("operator-verifier-n{}.log", args.n));
    let mut op = start_operator(
        args,
        guard,
        &log,
        &["run".to_string()],
        &[(
            "KEYWARD_VERIFIER_NAMESPACE".to_string(),
            args.lease_namespace.clone(),
        )],
    )?;

    // Cold start.
    let n = args.n;
    let t0 = Timestamp::now();
    fixture::keys(&admin, &[NS.to_string()], 0..n, args.concurrency).await?;
    let ready = |m: &HashMap<String, Seen>| m.values().filter(|s| s.settled()).count();
    let t1 = keys
        .wait(
            &format!("{n} keys Ready"),
            Duration::from_secs_f64(120.0 + n as f64 * args.timeout_per_key),
            |m| m.len() >= n && ready(m) >= n,
            |m| format!("{} of {n} Ready ({} seen)", ready(m), m.len()),
        )
        .await?;
    report.row(
        "Keys: created until all Ready (operator as a ServiceAccount)",
        format!("{n} keys in {:.1} s", secs(t0, t1)),
    );

    let caught = burst(args, report, &admin, NS, &mut audit, &prober, &op).await?;
    let _ = op.stop(Duration::from_secs(30)).await;
    anyhow::ensure!(caught, "the watermarks did not catch up");
    Ok(())
}

/// The verifier phase on keys that exist and are Ready: R replicas start, the `/auth` load
/// (every key's agent token, so every (replica, key) has a report to write: the burst), the
/// drain until every replica's watermark passed the end of the load, and what the API server,
/// the replicas and the operator did meanwhile. `audit` must follow the operator's and the
/// verifiers' users. Returns whether the watermarks caught up.
pub(super) async fn burst(
    args: &Args,
    report: &mut Report,
    admin: &kube::Client,
    ns: &str,
    audit: &mut AuditLog,
    prober: &super::probe::Prober,
    op: &Operator,
) -> anyhow::Result<bool> {
    let n = args.n;
    let op_user = args.operator_user.clone();
    let v_user = args.verifier_user.clone();
    // The replicas.
    let r = args.verifiers;
    let t_v = Timestamp::now();
    let (mut replicas, addrs) = start_replicas(args, ns, &format!("n{n}"), admin).await?;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &args.lease_namespace);
    report.row(
        format!("Verifiers: {r} replicas started until ready (watches listed) and Leases written"),
        format!(
            "{:.1} s; identity: {}",
            secs(t_v, Timestamp::now()),
            if args.verifier_kubeconfig.is_some() {
                format!("ServiceAccount ({v_user})")
            } else {
                "admin".to_string()
            }
        ),
    );

    // The tokens, by key index.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let list = secrets
        .list(&ListParams::default().labels("keyward.dev/component=agent-secret"))
        .await?;
    let mut by_key: HashMap<String, String> = HashMap::new();
    for s in list.items {
        let key = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("keyward.dev/provisioning-key"))
            .cloned();
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .and_then(|t| String::from_utf8(t.0.clone()).ok());
        if let (Some(k), Some(t)) = (key, token) {
            by_key.insert(k, t.trim().to_string());
        }
    }
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            by_key
                .remove(&fixture::key_name(i))
                .with_context(|| format!("no agent token for {}", fixture::key_name(i)))
        })
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);
    let addrs = Arc::new(addrs);
    // Every replica accepts a token before the load starts (a refusal names its reason).
    for (i, addr) in addrs.iter().enumerate() {
        let mut s = connect(*addr).await?;
        if let Some(reason) = auth(&mut s, &tokens[0], &pod_uid(0, 0), &route(0)).await? {
            anyhow::bail!("verifier v-{i} refused key 0's token: {reason}");
        }
    }

    // With idle connections: the steady load alone first (the baseline), then the same load
    // while `--idle-connections` silent connections are held on the replicas.
    let mut idle = None;
    if args.idle_connections > 0 {
        let baseline = Stream {
            rate: args.rps,
            secs: args.duration as f64,
            keys: Arc::new((0..n).collect()),
            replicas: r,
            pods: args.pods_per_key,
        };
        say(&format!(
            "baseline: {:.0} req/s over {n} keys for {} s, no idle connections",
            args.rps, args.duration
        ));
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let mut base = run_stream(
            baseline,
            start,
            args.load_connections,
            addrs.clone(),
            tokens.clone(),
        )
        .await;
        let p99 = base.quantile(0.99);
        report.row(
            "Baseline: steady /auth alone (no idle connections)".to_string(),
            base.describe(args.rps),
        );
        report.num("auth_p99_baseline_ms", p99);
        idle = Some((
            IdleConnections::hold(args.idle_connections, addrs.clone()),
            p99,
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        say(&format!(
            "holding {} idle connections: {} open",
            args.idle_connections,
            idle.as_ref().map_or(0, |(h, _)| h.open())
        ));
    }

    // The load.
    let dur = args.duration as f64;
    let steady = Stream {
        rate: args.rps,
        secs: dur,
        keys: Arc::new((0..n).collect()),
        replicas: r,
        pods: args.pods_per_key,
    };
    let flood_keys: Vec<usize> = (0..args.flood_keys.min(n))
        .map(|i| i * n / args.flood_keys.min(n).max(1))
        .collect();
    let flood_secs = (args.flood_secs as f64).min(dur);
    let flood = Stream {
        rate: args.flood_rps,
        secs: flood_secs,
        keys: Arc::new(flood_keys.clone()),
        replicas: r,
        pods: args.pods_per_key,
    };
    let do_flood = !flood_keys.is_empty() && args.flood_rps > 0.0 && flood_secs > 0.0;
    let watch = LeaseWatch::start(leases.clone());
    let m0 = metrics::scrape(admin).await?;
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let t_load0 = super::plus(Timestamp::now(), 0.2);
    let flood_offset = (dur - flood_secs) / 2.0;
    say(&format!(
        "load: {:.0} req/s over {n} keys for {dur:.0} s{}",
        args.rps,
        if do_flood {
            format!(
                ", flood {:.0} req/s on {} keys from {flood_offset:.0} s for {flood_secs:.0} s",
                args.flood_rps,
                flood_keys.len()
            )
        } else {
            String::new()
        }
    ));
    let (steady_plan, flood_plan) = (steady.clone(), flood.clone());
    let s_task = tokio::spawn(run_stream(
        steady,
        start,
        args.load_connections,
        addrs.clone(),
        tokens.clone(),
    ));
    let f_task = do_flood.then(|| {
        tokio::spawn(run_stream(
            flood,
            start + Duration::from_secs_f64(flood_offset),
            args.load_connections,
            addrs.clone(),
            tokens.clone(),
        ))
    });
    let mut s_out = s_task.await?;
    let mut f_out = match f_task {
        Some(t) => Some(t.await?),
        None => None,
    };
    if let Some((held, base_p99)) = idle.take() {
        let p99 = s_out.quantile(0.99);
        let (open, reopened) = (held.open(), held.reopened());
        held.stop();
        report.row(
            format!("Idle connections held during the load: {}", args.idle_connections),
            format!(
                "{open} open at the end, {reopened} re-opened after the verifier closed them; steady /auth p99 {p99:.2} ms vs baseline {base_p99:.2} ms = {:.2}x",
                if base_p99 > 0.0 { p99 / base_p99 } else { 0.0 }
            ),
        );
        report.num("auth_p99_idle_ms", p99);
        report.num("idle_connections_reopened", reopened as f64);
    }
    let t_load1 = Timestamp::now();
    let m1 = metrics::scrape(admin).await?;
    guard::check()?;
    report.row(
        format!(
            "Load: steady /auth over all {n} keys, round-robin over {r} replicas, {} pod UIDs per key",
            args.pods_per_key
        ),
        s_out.describe(args.rps),
    );
    if let Some(f) = f_out.as_mut() {
        report.row(
            format!(
                "Load: flood on {} keys ({flood_secs:.0} s, on top of the steady load)",
                flood_keys.len()
            ),
            f.describe(args.flood_rps),
        );
    }
    report.num(
        "auth_rps",
        s_out.sent() as f64 / secs(t_load0, t_load1).max(0.001),
    );

    // Until every replica's watermark has passed the end of the load.
    say("waiting for every replica's watermark to pass the end of the load");
    let t_limit = Instant::now();
    let caught = loop {
        let now = leases_now(&leases).await?;
        if now.len() >= r
            && now
                .values()
                .all(|l| l.watermark.is_some_and(|w| w >= t_load1))
        {
            break Some(Timestamp::now());
        }
        if t_limit.elapsed() > Duration::from_secs(300 + n as u64 / 20) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let t_end = caught.unwrap_or_else(Timestamp::now);
    if let Some(t) = caught {
        report.num("report_drain_s", secs(t_load1, t));
    }
    report.row(
        "Drain: end of the load until every replica's watermark passed it (all uses written)",
        match caught {
            Some(t) => format!("{:.1} s", secs(t_load1, t)),
            None => format!("NOT REACHED within {:.0} s", secs(t_load1, t_end)),
        },
    );
    let samples = watch.samples();
    drop(watch);

    // Watermark lag per replica during the load and the drain.
    let mut lag_rows = Vec::new();
    let mut silent_any = false;
    let (mut lag_max, mut behind_all) = (0.0_f64, 0usize);
    let mut by_lease: BTreeMap<String, Vec<LeaseSample>> = BTreeMap::new();
    for (name, s) in samples {
        if s.at >= t_load0 && s.at <= t_end {
            by_lease.entry(name).or_default().push(s);
        }
    }
    for (name, v) in &by_lease {
        let lags: Vec<f64> = v
            .iter()
            .map(|s| s.watermark.map_or(f64::INFINITY, |w| secs(w, s.at)))
            .collect();
        let max = lags.iter().copied().fold(0.0_f64, f64::max);
        let dur = v.iter().map(|s| s.duration_s).max().unwrap_or(0);
        // As the operator reads it (`usage::coverage`): past the lease duration, a replica
        // with a fresh heartbeat is behind (VerifierBehind), one without is silent.
        let (mut behind, mut silent, mut pending) = (0, 0, 0);
        for (s, lag) in v.iter().zip(&lags) {
            if *lag <= dur as f64 {
                continue;
            }
            let alive = s.heartbeat.is_some_and(|h| secs(h, s.at) <= dur as f64);
            if alive {
                behind += 1;
                pending = pending.max(s.pending);
            } else {
                silent += 1;
            }
        }
        silent_any |= silent > 0;
        lag_max = lag_max.max(max);
        behind_all += behind;
        lag_rows.push(format!(
            "{name}: max {max:.1} s over {} samples (lease {dur} s){}{}",
            v.len(),
            if behind > 0 {
                format!(", behind in {behind} samples (at most {pending} reports pending)")
            } else {
                String::new()
            },
            if silent > 0 {
                format!(", SILENT in {silent} samples")
            } else {
                ", never silent".to_string()
            }
        ));
    }
    report.row(
        "Watermark lag (now - renewTime, sampled every 1 s, load and drain)",
        format!(
            "{}; {}",
            lag_rows.join("; "),
            if silent_any {
                "a replica went SILENT"
            } else {
                "every replica within its lease duration"
            }
        ),
    );
    report.json.insert("silent".into(), silent_any.into());
    report.num("report_lag_max_s", lag_max);
    report.num("report_behind_samples", behind_all as f64);

    // What the API server recorded.
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.refresh()?;
    let window = secs(t_load0, t_end);
    let reqs = audit.between(t_load0, t_end);
    let v_reqs: Vec<&audit::Request> = reqs.iter().copied().filter(|q| q.user == v_user).collect();
    let o_reqs: Vec<&audit::Request> = reqs.iter().copied().filter(|q| q.user == op_user).collect();
    let kur: Vec<&audit::Request> = v_reqs
        .iter()
        .copied()
        .filter(|q| q.is_write() && q.resource.starts_with("keyusagereports"))
        .collect();
    let kur_times: Vec<Timestamp> = kur.iter().map(|q| q.at).collect();
    let mut per_report: HashMap<String, Vec<Timestamp>> = HashMap::new();
    let mut per_replica: BTreeMap<String, usize> = BTreeMap::new();
    for q in &kur {
        let name = q.name.clone().unwrap_or_default();
        let replica = name.rsplit('.').next().unwrap_or("").to_string();
        *per_replica.entry(replica).or_default() += 1;
        per_report.entry(name).or_default().push(q.at);
    }
    let (most10, gap) = per_object(&per_report, 10.0);
    let failed = kur.iter().filter(|q| q.code >= 400).count();
    report.num("kur_writes", kur.len() as f64);
    report.num("kur_writes_per_s", kur.len() as f64 / window.max(0.001));
    report.num("kur_max_per_report_10s", most10 as f64);
    report.row(
        format!("KeyUsageReport writes (audit log, load and drain: {window:.0} s)"),
        format!(
            "{} writes ({failed} failed) = {:.1}/s on average; peak {}/s (1 s buckets), {} in the busiest 10 s; per replica: {}; {} reports written",
            kur.len(),
            kur.len() as f64 / window.max(0.001),
            peak_per(&kur_times, t_load0, 1.0),
            peak_per(&kur_times, t_load0, 10.0),
            per_replica
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            per_report.len()
        ),
    );
    report.row(
        "KeyUsageReport writes of one (key, replica): most in any 10 s window (sliding) / shortest gap",
        format!(
            "{most10} / {}",
            gap.map_or_else(|| "n/a (no report written twice)".to_string(), |g| format!("{g:.1} s"))
        ),
    );
    let mut lease_writes: BTreeMap<String, usize> = BTreeMap::new();
    for q in v_reqs
        .iter()
        .filter(|q| q.is_write() && q.resource.starts_with("leases"))
    {
        *lease_writes
            .entry(q.name.clone().unwrap_or_default())
            .or_default() += 1;
    }
    report.row(
        "Lease writes per replica (load and drain)",
        lease_writes
            .iter()
            .map(|(k, v)| format!("{k} {v} ({:.2}/s)", *v as f64 / window.max(0.001)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.row(
        "Verifier requests (all replicas, load and drain)",
        audit::summary(&v_reqs, None),
    );
    report.extra.push_str(&super::shapes_table(
        &format!("Verifier requests during the load and drain (N={n}), by verb, resource and query (per key = / N):"),
        &v_reqs,
        n,
        10,
    ));
    let status_writes = o_reqs
        .iter()
        .filter(|q| q.is_write() && q.resource == "provisioningkeys.keyward.dev/status")
        .count();
    report.num("operator_status_writes", status_writes as f64);
    report.row(
        "Operator requests meanwhile (status lastUsedAt)",
        format!(
            "{}; status writes {status_writes} ({:.1}/s)",
            audit::summary(&o_reqs, None),
            status_writes as f64 / window.max(0.001)
        ),
    );
    report.extra.push_str(&super::shapes_table(
        &format!("Operator requests during the load and drain (N={n}), by verb, resource and query (per key = / N):"),
        &o_reqs,
        n,
        10,
    ));
    super::api_latency(
        report,
        "API server request latency during the load (all clients)",
        Some("load"),
        &m0,
        &m1,
    );
    report.row(
        "Plain GET of a ConfigMap every 100 ms during the load (another ServiceAccount)",
        prober.describe(t_load0, t_load1),
    );
    report.row(
        "Verifier RSS per replica: median during the load / max / peak (VmHWM)",
        replicas
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "v-{i} {} / {} / {}",
                    mib(p.memory.median_mib(t_load0, t_load1)),
                    mib(p.memory.max_mib(t_load0, t_end)),
                    mib(p.memory.peak_mib())
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    report.row(
        "Operator RSS during the load: median / max",
        format!(
            "{} / {}",
            mib(op.memory.median_mib(t_load0, t_load1)),
            mib(op.memory.max_mib(t_load0, t_end))
        ),
    );

    // What the operator and the reports say afterwards.
    let reports: Api<DynamicObject> = Api::namespaced_with(
        admin.clone(),
        ns,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("keyward.dev", "v1alpha1", "KeyUsageReport"),
            "keyusagereports",
        ),
    );
    let all = reports.list(&ListParams::default()).await?.items;
    let mut pods_per_key: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
    for rep in &all {
        let spec = &rep.data["spec"];
        let key = spec["provisioningKey"].as_str().unwrap_or("").to_string();
        let set = pods_per_key.entry(key).or_default();
        for k in spec["keys"].as_array().into_iter().flatten() {
            for p in k["pods"].as_array().into_iter().flatten() {
                if let Some(uid) = p["uid"].as_str() {
                    set.insert(uid.to_string());
                }
            }
        }
    }
    // The pod UIDs each key was sent with (both streams, every slot was sent).
    let mut sent: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
    for (stream, used) in [(&steady_plan, true), (&flood_plan, do_flood)] {
        if !used {
            continue;
        }
        for j in 0..stream.slots() {
            let slot = stream.slot(j);
            sent.entry(fixture::key_name(slot.key))
                .or_default()
                .insert(pod_uid(slot.key, slot.pod));
        }
    }
    let complete = sent
        .iter()
        .filter(|(k, want)| pods_per_key.get(*k).is_some_and(|got| want.is_subset(got)))
        .count();
    let pks: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), ns, &tracker::provisioning_keys());
    let with_last_used = pks
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|pk| {
            pk.data["status"]["trustedKeys"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["lastUsedAt"].is_string())
        })
        .count();
    report.row(
        "Afterwards (when the watermarks caught up): KeyUsageReports / keys with reports / keys whose reports list every pod UID sent to them (0 since issue 18: the verifier names a pod only by its pod-bound token, which this load does not send, so reports list no pods) / keys with status lastUsedAt",
        format!(
            "{} (expected {}) / {} / {complete} / {with_last_used} of {n}",
            all.len(),
            n * r,
            pods_per_key.len()
        ),
    );

    // Clean stop: final flush, Leases marked stopped.
    let t_stop = Timestamp::now();
    for p in replicas.iter_mut() {
        let _ = p.stop(Duration::from_secs(20)).await;
    }
    let stopped = leases_now(&leases)
        .await?
        .values()
        .filter(|l| l.stopped)
        .count();
    report.row(
        "Verifiers stopped (SIGTERM): Leases marked stopped",
        format!("{stopped} of {r}, {:.1} s", secs(t_stop, Timestamp::now())),
    );
    Ok(caught.is_some())
}
