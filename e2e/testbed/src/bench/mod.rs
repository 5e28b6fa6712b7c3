//! keyward-bench: the load benchmark's driver (see `e2e/bench.sh`, which starts a plane of its
//! own, installs the CRDs and the operator's RBAC, and calls this once per N).
//!
//! Against a running plane it starts the operator binary as a ServiceAccount (so API Priority
//! and Fairness applies to it, as in a real cluster), then runs the phases in order and prints
//! one Markdown table (appended to the results file):
//!
//! 1. W: the Secret creation rate of a bare client (16 concurrent) on this plane, measured
//!    while creating the 2,000 unrelated Secrets of the fixture (as admin), and again as a
//!    ServiceAccount (under APF);
//! 2. cold start: N ProvisioningKeys created 16 at a time, until all are Ready;
//! 3. PolicyAgents: Deployments of agent pods (run by the stand-in kubelet, in process) and
//!    their PolicyAgents, until all are confirmed;
//! 4. idle: requests and resident memory of a settled operator;
//! 5. warm restart: SIGTERM, start again, until it sends no request for a few seconds;
//! 6. rotation of the PolicyAgents' keys, until every old key is revoked;
//! 7. the herd: up to 1,000 other keys rotated at once.
//!
//! Requests are counted by the API server (its audit log), latencies from its `/metrics`,
//! responsiveness by a separate client GETting a ConfigMap every 100 ms, memory from `/proc`.

mod audit;
mod fixture;
mod guard;
mod metrics;
mod outage;
mod probe;
mod process;
mod soak;
mod tracker;
mod verifier;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use keyward_testbed::{HttpAgent, Kubelet, KubeletConfig};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use audit::AuditLog;
use process::Operator;
use tracker::{Seen, Tracker};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "keyward-bench",
    about = "Keyward's load benchmark driver (run it through e2e/bench.sh)"
)]
pub struct Args {
    /// Number of ProvisioningKeys.
    #[arg(long)]
    n: usize,
    /// Spread the keys (and the unrelated Secrets) over this many namespaces.
    #[arg(long, default_value_t = 1)]
    namespaces: usize,
    /// Unrelated Secrets in the key namespace(s), created as admin (this measures W).
    #[arg(long, default_value_t = 2000)]
    unrelated: usize,
    /// Secrets created as a ServiceAccount (W under APF); 0 skips.
    #[arg(long, default_value_t = 1000)]
    w_sa: usize,
    /// PolicyAgents (one Deployment each); 0 skips the agents and their rotation.
    #[arg(long, default_value_t = 100)]
    policy_agents: usize,
    /// Pods per agent Deployment.
    #[arg(long, default_value_t = 2)]
    replicas: i32,
    /// Keys the PolicyAgents use (agent i uses key i mod this).
    #[arg(long, default_value_t = 10)]
    pa_keys: usize,
    /// Sets `rotation.maxConcurrentRolls` on the PolicyAgents' keys before their rotation, and
    /// records the most workloads rolling at once during it; 0: no budget.
    #[arg(long, default_value_t = 0)]
    roll_budget: i32,
    /// `keyward run --max-concurrent-rolls` (default: the operator's own default).
    #[arg(long)]
    max_concurrent_rolls: Option<usize>,
    /// Keys rotated at once in the herd phase (other than the agents' keys); 0 skips.
    #[arg(long, default_value_t = 1000)]
    herd: usize,
    /// Cold start times out after 120 s plus this many seconds per key.
    #[arg(long, default_value_t = 1.0)]
    timeout_per_key: f64,
    /// Length of the idle window, seconds.
    #[arg(long, default_value_t = 30)]
    idle: u64,
    /// Warm restart: settled after this many seconds without a request from the operator.
    #[arg(long, default_value_t = 5)]
    quiet: u64,
    /// Concurrent requests of the bench's own clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Phases to skip: restart, agents, rotation, herd.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// After the phases above, the verifier phase on the same keys (`bench/verifier.rs`:
    /// `--verifiers` replicas, the `/auth` load, report lag in the burst of N keys); the
    /// operator then reads the replicas' Leases (`KEYWARD_VERIFIER_NAMESPACE`).
    #[arg(long)]
    reports: bool,
    /// After that, API server outages of these lengths, seconds (`bench/outage.rs`), e.g.
    /// `5,30,120`; empty: none.
    #[arg(long, value_delimiter = ',')]
    outages: Vec<u64>,
    /// Keys created at once when the API server returns from each outage (the backlog).
    #[arg(long, default_value_t = 100)]
    outage_backlog: usize,
    /// The operator binary (`keyward`).
    #[arg(long)]
    operator_bin: PathBuf,
    /// Kubeconfig the operator runs with (its ServiceAccount's token).
    #[arg(long)]
    operator_kubeconfig: PathBuf,
    /// Kubeconfig of the probe (a ServiceAccount allowed to GET the probe ConfigMap and to
    /// create Secrets in the W namespace); default: the admin's.
    #[arg(long)]
    probe_kubeconfig: Option<PathBuf>,
    /// The API server's audit log (`KEYWARD_AUDIT_LOG` of `e2e/cluster.sh`).
    #[arg(long)]
    audit_log: PathBuf,
    /// The user the operator runs as (requests are attributed by user agent `keyward/...`, or
    /// by this user).
    #[arg(long, default_value = "system:serviceaccount:keyward-system:keyward")]
    operator_user: String,
    /// Namespace of the probe ConfigMap (`probe`).
    #[arg(long, default_value = "bench-probe")]
    probe_namespace: String,
    /// Namespace for the ServiceAccount's W measurement.
    #[arg(long, default_value = "bench-w")]
    w_namespace: String,
    /// Directory for logs.
    #[arg(long, default_value = "/tmp/keyward-bench")]
    out: PathBuf,
    /// Markdown file the table is appended to (default `<out>/results.md`).
    #[arg(long)]
    results: Option<PathBuf>,
    /// The plane's state directory (PID files of kube-apiserver and etcd, for the memory guard
    /// and the plane's peak memory).
    #[arg(long)]
    plane_dir: Option<PathBuf>,
    /// Memory guard: abort (kill the operator) when the machine has less than this available.
    #[arg(long, default_value_t = 4.0)]
    min_free_gib: f64,
    /// Memory guard: abort when kube-apiserver and etcd hold more than this together.
    #[arg(long, default_value_t = 8.0)]
    max_plane_gib: f64,
    /// A label for the run (e.g. `before`, or a commit).
    #[arg(long, default_value = "")]
    label: String,
    /// Verifier reporting instead of the phases above: N keys, then `keyward verifier`
    /// replicas under an /auth load (see `bench/verifier.rs`; `bash e2e/bench.sh --verifier`).
    #[arg(long)]
    verifier: bool,
    /// Verifier mode: number of `keyward verifier` replicas (`--replica-id v-<i>`).
    #[arg(long, default_value_t = 2)]
    verifiers: usize,
    /// Verifier mode: kubeconfig the replicas run with (default: the admin's).
    #[arg(long)]
    verifier_kubeconfig: Option<PathBuf>,
    /// Verifier mode: the user the replicas run as (their requests in the audit log).
    #[arg(
        long,
        default_value = "system:serviceaccount:keyward-system:keyward-verifier"
    )]
    verifier_user: String,
    /// Verifier mode: the replicas' `--lease-namespace` (also the operator's
    /// `KEYWARD_VERIFIER_NAMESPACE`).
    #[arg(long, default_value = "keyward-system")]
    lease_namespace: String,
    /// Verifier mode: replica i listens on 127.0.0.1:<this + i>.
    #[arg(long, default_value_t = 27480)]
    verifier_port: u16,
    /// Verifier mode: extra arguments for every replica (e.g. `--report-qps=20`).
    #[arg(long, allow_hyphen_values = true)]
    verifier_arg: Vec<String>,
    /// Verifier mode: length of the /auth load, seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Verifier mode: steady /auth requests per second, spread over every key.
    #[arg(long, default_value_t = 500.0)]
    rps: f64,
    /// Verifier mode: pod UIDs per key (`X-Keyward-Pod-UID`).
    #[arg(long, default_value_t = 3)]
    pods_per_key: usize,
    /// Verifier mode: keys flooded in the middle of the load (0: no flood).
    #[arg(long, default_value_t = 5)]
    flood_keys: usize,
    /// Verifier mode: requests per second of the flood, on top of the steady load.
    #[arg(long, default_value_t = 2000.0)]
    flood_rps: f64,
    /// Verifier mode: length of the flood, seconds (centered in the load).
    #[arg(long, default_value_t = 20)]
    flood_secs: u64,
    /// Verifier mode: concurrent connections of the load generator (each holds one
    /// keep-alive connection per replica).
    #[arg(long, default_value_t = 48)]
    load_connections: usize,
    /// Verifier mode: client connections held open and silent on the replicas during the load
    /// (each re-opened when the verifier's header-read timeout closes it). With N > 0 the
    /// steady load first runs alone as the baseline, then again while they are held, and the
    /// two p99s are compared.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// The soak instead of the phases above (`bash e2e/bench.sh soak`): N keys rotating every
    /// 60 s, `--policy-agents` PolicyAgents (one per key), `--verifiers` replicas, for this
    /// many minutes (see `bench/soak.rs`); 0: no soak.
    #[arg(long, default_value_t = 0)]
    soak_minutes: u64,
}

impl Args {
    fn skips(&self, phase: &str) -> bool {
        self.skip.iter().any(|s| s == phase)
    }
}

/// Progress on stderr, with the wall-clock time.
pub fn say(msg: &str) {
    let now = Timestamp::now().strftime("%H:%M:%S");
    eprintln!("[bench {now}] {msg}");
}

fn secs(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

fn plus(t: Timestamp, s: f64) -> Timestamp {
    t.checked_add(SignedDuration::from_secs_f64(s)).unwrap_or(t)
}

fn mib(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |m| format!("{m:.1} MiB"))
}

/// The figures of issue "Faults of the control plane" against its goals, as one table at the
/// end of the report (from the figures the phases recorded; a phase that did not run shows
/// "not measured").
fn goals(report: &mut Report) {
    let get = |k: &str| report.json.get(k).and_then(serde_json::Value::as_f64);
    let n = report.json.get("n").and_then(serde_json::Value::as_f64);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let mut add = |what: &str,
                   goal: String,
                   figure: Option<f64>,
                   fmt: &dyn Fn(f64) -> String,
                   ok: &dyn Fn(f64) -> bool| {
        rows.push(match figure {
            Some(v) => (
                what.to_string(),
                goal,
                format!("{} ({})", fmt(v), verdict(ok(v))),
            ),
            None => (what.to_string(), goal, "not measured".to_string()),
        });
    };
    add(
        "Writes per new key (cold start, audit log)",
        "<= 5 (4 objects + 1 audit Event)".into(),
        get("cold_writes_per_key"),
        &|v| format!("{v:.2}"),
        &|v| v <= 5.0,
    );
    add(
        "Cold start as a ratio to W/3",
        ">= 0.5".into(),
        get("ratio_w3"),
        &|v| format!("{v:.2}"),
        &|v| v >= 0.5,
    );
    add(
        "Warm restart: writes",
        "0".into(),
        get("restart_writes"),
        &|v| format!("{v:.0}"),
        &|v| v == 0.0,
    );
    add(
        "Operator RSS, base (nothing to manage yet)",
        "<= 20 MiB".into(),
        get("rss_base_mib"),
        &|v| format!("{v:.1} MiB"),
        &|v| v <= 20.0,
    );
    let rss_goal = n.map(|n| 20.0 + 6.0 * n / 1024.0);
    add(
        "Operator RSS, steady (idle median)",
        rss_goal.map_or_else(
            || "20 MiB + 6 KiB per key".to_string(),
            |g| format!("<= {g:.1} MiB (20 MiB + 6 KiB per key)"),
        ),
        get("rss_steady_mib"),
        &|v| format!("{v:.1} MiB"),
        &|v| rss_goal.is_some_and(|g| v <= g),
    );
    let silent = report
        .json
        .get("silent")
        .and_then(serde_json::Value::as_bool);
    add(
        "Report lag in the burst (max watermark lag, any replica)",
        "never silent (behind is reported as VerifierBehind)".into(),
        get("report_lag_max_s"),
        &|v| {
            format!(
                "{v:.1} s, {}",
                if silent == Some(true) {
                    "a replica went SILENT"
                } else {
                    "never silent"
                }
            )
        },
        &|_| silent == Some(false),
    );
    add(
        "Report drain after the load (all uses written)",
        "-".into(),
        get("report_drain_s"),
        &|v| format!("{v:.1} s"),
        &|_| true,
    );
    for len in [5, 30, 120] {
        add(
            &format!("Recovery after a {len} s outage: first reconcile"),
            "<= 10 s".into(),
            get(&format!("recovery_{len}s_first_s")),
            &|v| format!("{v:.2} s"),
            &|v| v <= 10.0,
        );
    }
    let mut s = String::from(
        "\nThe goals of issue \"Faults of the control plane\" in this run:\n\n| Figure | Goal | This run |\n|---|---|---|\n",
    );
    for (a, b, c) in rows {
        let _ = writeln!(s, "| {a} | {b} | {c} |");
    }
    say(&s);
    report.extra.push_str(&s);
}

/// The table being built.
struct Report {
    title: String,
    rows: Vec<(String, String)>,
    extra: String,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn row(&mut self, what: impl Into<String>, figure: impl Into<String>) {
        let (what, figure) = (what.into(), figure.into());
        say(&format!("{what}: {figure}"));
        self.rows.push((what, figure));
    }

    fn num(&mut self, key: &str, v: f64) {
        if let Some(n) = serde_json::Number::from_f64(v) {
            self.json.insert(key.into(), n.into());
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!("\n### {}\n\n| Phase | Figure |\n|---|---|\n", self.title);
        for (a, b) in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} |",
                a.replace('|', "\\|"),
                b.replace('|', "\\|")
            );
        }
        s.push_str(&self.extra);
        s
    }
}

/// Requests by shape (verb, resource, scope, query), per key, as a Markdown table.
fn shapes_table(title: &str, requests: &[&audit::Request], per: usize, top: usize) -> String {
    let shapes = audit::count_by(requests.iter().copied(), audit::Request::shape);
    if shapes.is_empty() {
        return String::new();
    }
    let mut s = format!("\n{title}\n\n| Request | Count | Per key |\n|---|---|---|\n");
    for (shape, n) in shapes.iter().take(top) {
        let _ = writeln!(
            s,
            "| `{}` | {n} | {:.2} |",
            shape.replace('|', "\\|"),
            *n as f64 / per.max(1) as f64
        );
    }
    if shapes.len() > top {
        let rest: usize = shapes.iter().skip(top).map(|(_, n)| n).sum();
        let _ = writeln!(
            s,
            "| ({} other shapes) | {rest} | {:.2} |",
            shapes.len() - top,
            rest as f64 / per.max(1) as f64
        );
    }
    s
}

/// Starts the operator under test (`<operator-bin> <run_args>`, its log at `log`, started
/// afresh) as the operator's ServiceAccount, and hands its pid to the memory guard.
fn start_operator(
    args: &Args,
    guard: &guard::Guard,
    log: &Path,
    run_args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<Operator> {
    let _ = std::fs::remove_file(log);
    let op = Operator::start_with(
        &args.operator_bin,
        run_args,
        env,
        &args.operator_kubeconfig,
        log,
    )?;
    guard
        .operator
        .store(op.pid, std::sync::atomic::Ordering::Relaxed);
    say(&format!(
        "operator started (pid {}), log {}",
        op.pid,
        log.display()
    ));
    Ok(op)
}

/// Creates the probe ConfigMap `probe` in `namespace` (as admin) and starts the plain-GET
/// probe on it (as the probe's client).
async fn start_prober(
    admin: &Client,
    probe_client: &Client,
    namespace: &str,
) -> anyhow::Result<probe::Prober> {
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), namespace);
    let probe_cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("probe".into()),
            ..ObjectMeta::default()
        },
        data: Some([("hello".to_string(), "world".to_string())].into()),
        ..ConfigMap::default()
    };
    match cms.create(&PostParams::default(), &probe_cm).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("create the probe ConfigMap"),
    }
    Ok(probe::Prober::start(
        Api::namespaced(probe_client.clone(), namespace),
        "probe",
    ))
}

/// Records the API server's request latency between two scrapes as the row `title` and, with
/// `key`, each verb's p99 as the figure `<key>_api_p99_<verb>_s`.
fn api_latency(
    report: &mut Report,
    title: &str,
    key: Option<&str>,
    m0: &metrics::Snapshot,
    m1: &metrics::Snapshot,
) {
    let (lat, rejected) = metrics::delta(m0, m1);
    if let Some(key) = key {
        for l in &lat {
            report.num(
                &format!("{key}_api_p99_{}_s", l.verb.to_lowercase()),
                l.p99.secs(),
            );
        }
    }
    report.row(title, metrics::describe(&lat, rejected));
}

async fn client_from(path: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("read {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("kubeconfig {}", path.display()))?;
    Ok(Client::try_from(config)?)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |k| format!("{:.0} GiB", k as f64 / 1024.0 / 1024.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{cores} cores, {mem} RAM, kernel {kernel}, load {load} at start")
}

pub async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    std::fs::create_dir_all(&args.out)?;
    let results = args
        .results
        .clone()
        .unwrap_or_else(|| args.out.join("results.md"));
    let layout = if args.namespaces > 1 {
        format!("{} namespaces", args.namespaces)
    } else {
        "1 namespace".into()
    };
    let label = if args.label.is_empty() {
        String::new()
    } else {
        format!(" — {}", args.label)
    };
    let mut report = Report {
        title: format!(
            "N={}, {layout}{label} — {} — {}",
            args.n,
            Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
            machine()
        ),
        rows: Vec::new(),
        extra: String::new(),
        json: serde_json::Map::new(),
    };
    let t_run = Instant::now();
    let guard = guard::Guard::start(
        args.plane_dir.as_deref(),
        args.min_free_gib,
        args.max_plane_gib,
    );
    if args.verifier {
        report.title = format!("Verifier reporting: {}", report.title);
    }
    if args.soak_minutes > 0 {
        report.title = format!("Soak, {} min: {}", args.soak_minutes, report.title);
    }
    let outcome = if args.soak_minutes > 0 {
        soak::run(&args, &mut report, &guard).await
    } else if args.verifier {
        verifier::run(&args, &mut report, &guard).await
    } else {
        run(&args, &mut report, &guard).await
    };
    let (api_mib, etcd_mib) = guard.peaks_mib();
    report.num("apiserver_peak_mib", api_mib);
    report.num("etcd_peak_mib", etcd_mib);
    report.row("Plane memory (whole run)", guard.describe());
    report.row(
        "Run time of the driver",
        format!("{:.0} s", t_run.elapsed().as_secs_f64()),
    );
    if let Err(e) = &outcome {
        report.row("FAILED", format!("{e:#}"));
    }
    report.json.insert("n".into(), args.n.into());
    report
        .json
        .insert("namespaces".into(), args.namespaces.into());
    report
        .json
        .insert("label".into(), args.label.clone().into());
    report.json.insert("ok".into(), outcome.is_ok().into());
    report.json.insert("verifier".into(), args.verifier.into());
    let md = report.markdown();
    println!("{md}");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&results)
        .with_context(|| format!("open {}", results.display()))?;
    f.write_all(md.as_bytes())?;
    let mut j = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(results.with_extension("jsonl"))?;
    writeln!(j, "{}", serde_json::Value::Object(report.json.clone()))?;
    say(&format!("table appended to {}", results.display()));
    outcome
}

async fn run(args: &Args, report: &mut Report, guard: &guard::Guard) -> anyhow::Result<()> {
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    anyhow::ensure!(
        !args.reports || args.namespaces == 1,
        "--reports needs the keys in one namespace"
    );
    report.json.insert("n".into(), args.n.into());
    let admin = keyward_testbed::client().await;
    let probe_client = match &args.probe_kubeconfig {
        Some(p) => client_from(p).await?,
        None => admin.clone(),
    };
    let namespaces: Vec<String> = if args.namespaces > 1 {
        (0..args.namespaces)
            .map(|i| format!("bench-{i:02}"))
            .collect()
    } else {
        vec!["bench".to_string()]
    };
    let mut all_ns = namespaces.clone();
    all_ns.push(args.probe_namespace.clone());
    all_ns.push(args.w_namespace.clone());
    fixture::namespaces(&admin, &all_ns).await?;
    let prober = start_prober(&admin, &probe_client, &args.probe_namespace).await?;
    let mut audit = AuditLog::new(args.audit_log.clone(), &args.operator_user);
    let keys = Tracker::start(admin.clone(), &tracker::provisioning_keys());
    let agents = Tracker::start(admin.clone(), &tracker::policy_agents());

    // The operator, idle, before anything exists.
    let log = args.out.join(format!("operator-n{}.log", args.n));
    let env = if args.reports {
        vec![(
            "KEYWARD_VERIFIER_NAMESPACE".to_string(),
            args.lease_namespace.clone(),
        )]
    } else {
        Vec::new()
    };
    let mut run_args = vec!["run".to_string()];
    if let Some(m) = args.max_concurrent_rolls {
        run_args.push(format!("--max-concurrent-rolls={m}"));
    }
    let mut op = start_operator(args, guard, &log, &run_args, &env)?;
    let t_up = Instant::now();
    loop {
        audit.refresh()?;
        if audit.last_since(op.started).is_some() {
            break;
        }
        anyhow::ensure!(
            op.running(),
            "the operator exited at start; see {}",
            log.display()
        );
        anyhow::ensure!(
            t_up.elapsed() < Duration::from_secs(60),
            "no request from the operator in the audit log {} within 60 s (is the plane started with KEYWARD_AUDIT_LOG?)",
            args.audit_log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The base: the operator's RSS with its watches open and nothing to manage yet (median over
    // 3 s, once it made its first request). The idle phase divides what it adds by N.
    let t_base = Timestamp::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(base) = op.memory.median_mib(t_base, Timestamp::now()) {
        report.num("rss_base_mib", base);
        report.row(
            "Operator RSS, base: watches open, nothing to manage yet (median over 3 s)",
            mib(Some(base)),
        );
    }

    // 1. W, with the unrelated Secrets of the fixture.
    let took = fixture::unrelated_secrets(&admin, &namespaces, args.unrelated, args.concurrency, 0)
        .await?;
    let w = args.unrelated as f64 / took.as_secs_f64();
    report.num("w", w);
    report.row(
        format!(
            "W: Secrets/s of a bare client, admin (exempt from APF), {} concurrent",
            args.concurrency
        ),
        format!(
            "{w:.0}/s ({} unrelated Secrets of the fixture, about 3.2 KiB average, in {:.2} s)",
            args.unrelated,
            took.as_secs_f64()
        ),
    );
    if args.w_sa > 0 {
        let took = fixture::unrelated_secrets(
            &probe_client,
            std::slice::from_ref(&args.w_namespace),
            args.w_sa,
            args.concurrency,
            100_000,
        )
        .await?;
        let w_sa = args.w_sa as f64 / took.as_secs_f64();
        report.num("w_sa", w_sa);
        report.row(
            format!(
                "W as a ServiceAccount (under APF), {} concurrent",
                args.concurrency
            ),
            format!(
                "{w_sa:.0}/s ({} Secrets in {:.2} s)",
                args.w_sa,
                took.as_secs_f64()
            ),
        );
    }

    // 2. Cold start.
    let m0 = metrics::scrape(&admin).await?;
    let t0 = Timestamp::now();
    fixture::keys(&admin, &namespaces, 0..args.n, args.concurrency).await?;
    let t_created = Timestamp::now();
    let n = args.n;
    let timeout = Duration::from_secs_f64(120.0 + n as f64 * args.timeout_per_key);
    let ready = |m: &HashMap<String, Seen>| m.values().filter(|s| s.settled()).count();
    let waited = keys
        .wait(
            &format!("{n} keys Ready"),
            timeout,
            |m| m.len() >= n && ready(m) >= n,
            |m| format!("{} of {n} Ready ({} seen)", ready(m), m.len()),
        )
        .await;
    // On a timeout the phase is still reported (how far it got, its requests, latencies and
    // memory), then the run fails.
    let t1 = waited.as_ref().map_or_else(|_| Timestamp::now(), |t| *t);
    let m1 = metrics::scrape(&admin).await?;
    let cold = secs(t0, t1);
    let done = keys.with(ready);
    let rate = done as f64 / cold;
    let ratio = rate / (w / 3.0);
    if waited.is_ok() {
        report.num("cold_start_s", cold);
        report.num("keys_per_s", rate);
        report.num("ratio_w3", ratio);
        report.row(
            "Cold start: first create until all Ready",
            format!(
                "{n} keys in {cold:.1} s = {rate:.1} keys/s = {ratio:.2} x W/3 (creates took {:.2} s)",
                secs(t0, t_created)
            ),
        );
    } else {
        report.row(
            "Cold start: first create until all Ready",
            format!(
                "NOT COMPLETE: {done} of {n} Ready after {cold:.0} s (timeout) = {rate:.1} keys/s = {ratio:.2} x W/3 (creates took {:.2} s)",
                secs(t0, t_created)
            ),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.refresh()?;
    let reqs = audit.between(t0, t1);
    report.num("cold_requests_per_key", reqs.len() as f64 / n as f64);
    report.num(
        "cold_writes_per_key",
        reqs.iter().filter(|r| r.is_write()).count() as f64 / n as f64,
    );
    report.row(
        "Cold start: operator requests",
        audit::summary(&reqs, Some(n)),
    );
    report.extra.push_str(&shapes_table(
        &format!("Operator requests during the cold start (N={n}), by verb, resource and query:"),
        &reqs,
        n,
        15,
    ));
    if let Some(p99) = prober.p99(t0, t1) {
        report.num("cold_probe_p99_s", p99);
    }
    report.row(
        "Cold start: plain GET of a ConfigMap every 100 ms (another ServiceAccount)",
        prober.describe(t0, t1),
    );
    api_latency(
        report,
        "Cold start: API server request latency (all clients)",
        Some("cold"),
        &m0,
        &m1,
    );
    report.row(
        "Cold start: operator RSS (max sampled)",
        mib(op.memory.max_mib(t0, t1)),
    );

    waited?;

    // 3. PolicyAgents.
    let mut kubelet = None;
    let mut pairs: Vec<(String, String)> = Vec::new();
    let agents_ns = namespaces[0].clone();
    let do_agents = args.policy_agents > 0 && !args.skips("agents");
    if do_agents {
        let pa_keys: Vec<String> = (0..args.n)
            .filter(|i| i % namespaces.len() == 0)
            .take(args.pa_keys.max(1))
            .map(fixture::key_name)
            .collect();
        kubelet = Some(Kubelet::start(
            admin.clone(),
            &agents_ns,
            KubeletConfig::default().with_agent(HttpAgent::default()),
        ));
        let t0 = Timestamp::now();
        pairs = fixture::policy_agents(
            &admin,
            &agents_ns,
            args.policy_agents,
            args.replicas,
            &pa_keys,
            args.concurrency,
        )
        .await?;
        let want = agents_confirmed_on_current(&agents_ns, &pairs, &keys);
        let t1 = agents
            .wait(
                &format!("{} PolicyAgents confirmed", pairs.len()),
                Duration::from_secs(600 + 6 * pairs.len() as u64),
                |m| want(m) == pairs.len(),
                |m| format!("{} of {} confirmed", want(m), pairs.len()),
            )
            .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        audit.refresh()?;
        let reqs = audit.between(t0, t1);
        report.row(
            "PolicyAgents: created until all confirmed on their key",
            format!(
                "{} PolicyAgents ({} pods) on {} keys in {:.1} s; {}",
                pairs.len(),
                pairs.len() * args.replicas as usize,
                pa_keys.len(),
                secs(t0, t1),
                audit::summary(&reqs, None)
            ),
        );
    }

    // 4. Idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m0 = metrics::scrape(&admin).await?;
    let t0 = Timestamp::now();
    say(&format!("idle for {} s", args.idle));
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    guard::check()?;
    let t1 = Timestamp::now();
    let m1 = metrics::scrape(&admin).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.refresh()?;
    let reqs = audit.between(t0, t1);
    let steady = op.memory.median_mib(t0, t1);
    if let Some(s) = steady {
        report.num("rss_steady_mib", s);
        if let Some(base) = report
            .json
            .get("rss_base_mib")
            .and_then(serde_json::Value::as_f64)
        {
            let per_key_kib = (s - base) * 1024.0 / args.n.max(1) as f64;
            report.num("rss_above_base_per_key_kib", per_key_kib);
            report.row(
                "Operator RSS above the base per key: (idle steady - base) / N, the fixture's PolicyAgents and pods included (the cost of a key alone is the slope between two N: docs/performance.md)",
                format!("{per_key_kib:.1} KiB"),
            );
        }
    }
    report.num("idle_requests", reqs.len() as f64);
    report.num(
        "idle_writes",
        reqs.iter().filter(|r| r.is_write()).count() as f64,
    );
    report.row(
        format!("Idle {} s: operator requests", args.idle),
        audit::summary(&reqs, None),
    );
    report.row(
        format!(
            "Idle {} s: operator RSS, steady (median) / peak so far (VmHWM)",
            args.idle
        ),
        format!("{} / {}", mib(steady), mib(op.memory.peak_mib())),
    );
    api_latency(
        report,
        "Idle: API server request latency (all clients)",
        None,
        &m0,
        &m1,
    );
    if let Some(p) = op.memory.peak_mib() {
        report.num("rss_peak_mib", p);
    }

    // 5. Warm restart.
    if !args.skips("restart") {
        let stop = op.stop(Duration::from_secs(30)).await?;
        op = Operator::start(&args.operator_bin, &args.operator_kubeconfig, &log)?;
        guard
            .operator
            .store(op.pid, std::sync::atomic::Ordering::Relaxed);
        let t0 = op.started;
        let quiet = args.quiet as f64;
        let t_limit = Instant::now();
        let last = loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            guard::check()?;
            audit.refresh()?;
            anyhow::ensure!(
                op.running(),
                "the operator exited after its restart; see {}",
                log.display()
            );
            if let Some(last) = audit.last_since(t0)
                && secs(last, Timestamp::now()) >= quiet
            {
                break last;
            }
            anyhow::ensure!(
                t_limit.elapsed() < Duration::from_secs(600),
                "the restarted operator did not settle within 600 s"
            );
        };
        let reqs = audit.between(t0, plus(last, 0.001));
        let settled = secs(t0, last);
        report.num("restart_settled_s", settled);
        report.num(
            "restart_writes",
            reqs.iter().filter(|r| r.is_write()).count() as f64,
        );
        let still = keys.with(|m| m.values().filter(|s| s.settled()).count());
        report.row(
            "Warm restart (SIGTERM, start again): until no request for 5 s",
            format!(
                "stopped in {:.1} s; settled {settled:.1} s after the start (last request); {}; keys Ready after: {still} of {n}",
                stop.as_secs_f64(),
                audit::summary(&reqs, None)
            ),
        );
        report.extra.push_str(&shapes_table(
            &format!("Operator requests of the warm restart (N={n}), by verb, resource and query (per key = / N):"),
            &reqs,
            n,
            12,
        ));
    }

    // 6. Rotation of the PolicyAgents' keys.
    if do_agents && !args.skips("rotation") {
        let rot_keys: Vec<(String, String)> = {
            let mut v: Vec<String> = pairs.iter().map(|(_, k)| k.clone()).collect();
            v.sort();
            v.dedup();
            v.into_iter().map(|k| (agents_ns.clone(), k)).collect()
        };
        let old = current_kids(&keys, &rot_keys)?;
        wait_min_interval(&keys, &rot_keys).await?;
        if args.roll_budget > 0 {
            for (ns, name) in &rot_keys {
                Api::<kube::api::DynamicObject>::namespaced_with(
                    admin.clone(),
                    ns,
                    &tracker::provisioning_keys(),
                )
                .patch(
                    name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(serde_json::json!({
                        "spec": { "rotation": { "maxConcurrentRolls": args.roll_budget } }
                    })),
                )
                .await
                .context("set the roll budget")?;
            }
        }
        // The most workloads rolling at once (a rollout in progress: not observed, or fewer
        // updated or available replicas than desired), sampled every 250 ms.
        let most_rolling = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sampler = {
            let (deployments, most) = (
                Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
                    admin.clone(),
                    &agents_ns,
                ),
                most_rolling.clone(),
            );
            tokio::spawn(async move {
                loop {
                    if let Ok(list) = deployments.list(&Default::default()).await {
                        let rolling = list
                            .items
                            .iter()
                            .filter(|d| {
                                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                                let st = d.status.clone().unwrap_or_default();
                                st.observed_generation < d.metadata.generation
                                    || st.updated_replicas.unwrap_or(0) < want
                                    || st.available_replicas.unwrap_or(0) < want
                            })
                            .count();
                        most.fetch_max(rolling, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let m0 = metrics::scrape(&admin).await?;
        let t0 = Timestamp::now();
        fixture::rotate(
            &admin,
            &rot_keys,
            &format!("bench-{}", t0.as_second()),
            args.concurrency,
        )
        .await?;
        let revoked = |m: &HashMap<String, Seen>| {
            old.iter()
                .filter(|(k, kid)| {
                    m.get(k.as_str()).is_some_and(|s| {
                        s.settled() && s.current_kid() != Some(kid) && s.revoked(kid)
                    })
                })
                .count()
        };
        let t1 = keys
            .wait(
                "rotation: every old key revoked",
                Duration::from_secs(600 + 6 * pairs.len() as u64),
                |m| revoked(m) == old.len(),
                |m| format!("{} of {} old keys revoked", revoked(m), old.len()),
            )
            .await?;
        let want = agents_confirmed_on_current(&agents_ns, &pairs, &keys);
        let confirmed = agents.with(|m| want(m));
        let m1 = metrics::scrape(&admin).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        audit.refresh()?;
        let reqs = audit.between(t0, t1);
        let rolls = reqs
            .iter()
            .filter(|r| r.is_write() && r.resource == "deployments.apps")
            .count();
        sampler.abort();
        let most = most_rolling.load(std::sync::atomic::Ordering::Relaxed);
        report.num("rotation_s", secs(t0, t1));
        report.num("rotation_most_rolling", most as f64);
        report.row(
            format!(
                "Rotation of {} PolicyAgents: most workloads rolling at once (sampled every 250 ms)",
                pairs.len()
            ),
            format!(
                "{most}{}",
                if args.roll_budget > 0 {
                    format!(
                        " (rotation.maxConcurrentRolls {} on the key; --max-concurrent-rolls {})",
                        args.roll_budget,
                        args.max_concurrent_rolls
                            .map_or("default 5".to_string(), |m| m.to_string())
                    )
                } else {
                    String::new()
                }
            ),
        );
        report.num(
            "rotation_writes",
            reqs.iter().filter(|r| r.is_write()).count() as f64,
        );
        report.row(
            format!("Rotation of {} PolicyAgents ({} keys): annotate until every old key revoked", pairs.len(), rot_keys.len()),
            format!(
                "{:.1} s; {confirmed} of {} agents confirmed on the new key then; Deployment writes {rolls}; {}",
                secs(t0, t1),
                pairs.len(),
                audit::summary(&reqs, None)
            ),
        );
        report.extra.push_str(&shapes_table(
            &format!("Operator requests of the rotation of {} PolicyAgents, by verb, resource and query (per key = / {} keys):", pairs.len(), rot_keys.len()),
            &reqs,
            rot_keys.len(),
            15,
        ));
        api_latency(
            report,
            "Rotation: API server request latency (all clients)",
            None,
            &m0,
            &m1,
        );
    }

    // 7. The herd.
    if args.herd > 0 && !args.skips("herd") {
        let taken: std::collections::HashSet<&str> =
            pairs.iter().map(|(_, k)| k.as_str()).collect();
        let herd: Vec<(String, String)> = (0..args.n)
            .map(|i| {
                (
                    namespaces[i % namespaces.len()].clone(),
                    fixture::key_name(i),
                )
            })
            .filter(|(ns, k)| !(ns == &agents_ns && taken.contains(k.as_str())))
            .take(args.herd)
            .collect();
        let h = herd.len();
        let old = current_kids(&keys, &herd)?;
        wait_min_interval(&keys, &herd).await?;
        let m0 = metrics::scrape(&admin).await?;
        let t0 = Timestamp::now();
        fixture::rotate(
            &admin,
            &herd,
            &format!("herd-{}", t0.as_second()),
            args.concurrency,
        )
        .await?;
        let t_annotated = Timestamp::now();
        let handed = |m: &HashMap<String, Seen>| {
            old.iter()
                .filter(|(k, kid)| {
                    m.get(k.as_str())
                        .and_then(Seen::current_kid)
                        .is_some_and(|c| c != kid)
                })
                .count()
        };
        let revoked = |m: &HashMap<String, Seen>| {
            old.iter()
                .filter(|(k, kid)| {
                    m.get(k.as_str())
                        .is_some_and(|s| s.settled() && s.revoked(kid))
                })
                .count()
        };
        let timeout = Duration::from_secs(300 + h as u64);
        let t_handed = keys
            .wait(
                "herd: new key handed out",
                timeout,
                |m| handed(m) == h,
                |m| format!("{} of {h} on their new key", handed(m)),
            )
            .await?;
        let t1 = keys
            .wait(
                "herd: old keys revoked",
                timeout,
                |m| revoked(m) == h,
                |m| format!("{} of {h} old keys revoked", revoked(m)),
            )
            .await?;
        let m1 = metrics::scrape(&admin).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        audit.refresh()?;
        let reqs = audit.between(t0, t1);
        report.num("herd_handed_out_s", secs(t0, t_handed));
        report.num("herd_revoked_s", secs(t0, t1));
        report.num("herd_requests_per_key", reqs.len() as f64 / h as f64);
        report.row(
            format!("Herd: {h} keys annotated at once (overlap 1m, no PolicyAgents)"),
            format!(
                "annotated in {:.1} s; all on their new key {:.1} s, all old keys revoked {:.1} s after the first annotation; {}",
                secs(t0, t_annotated),
                secs(t0, t_handed),
                secs(t0, t1),
                audit::summary(&reqs, Some(h))
            ),
        );
        report.row("Herd: plain GET every 100 ms", prober.describe(t0, t1));
        api_latency(
            report,
            "Herd: API server request latency (all clients)",
            None,
            &m0,
            &m1,
        );
        report.extra.push_str(&shapes_table(
            &format!("Operator requests of the herd ({h} keys), by verb, resource and query:"),
            &reqs,
            h,
            15,
        ));
    }

    // 8. The verifier phase: report lag in a burst of N keys.
    if args.reports {
        let mut both = AuditLog::with_users(
            args.audit_log.clone(),
            &[args.operator_user.clone(), args.verifier_user.clone()],
        );
        let caught = verifier::burst(
            args,
            report,
            &admin,
            &namespaces[0],
            &mut both,
            &prober,
            &op,
        )
        .await?;
        anyhow::ensure!(caught, "the verifiers' watermarks did not catch up");
    }

    // 9. API server outages.
    if !args.outages.is_empty() {
        outage::run(
            args,
            report,
            &admin,
            &namespaces[0],
            &mut audit,
            &mut op,
            &keys,
            (rate > 0.0).then_some(rate),
        )
        .await?;
    }
    goals(report);

    // Whole run. The operator stops first: the API server logs a watch when it ends.
    let peak = op.memory.peak_mib();
    let _ = op.stop(Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    audit.refresh()?;
    let all = audit.between(Timestamp::UNIX_EPOCH, Timestamp::now());
    report.row("Whole run: operator requests", audit::summary(&all, None));
    report.row(
        "Operator peak RSS (VmHWM) of the running process",
        mib(peak),
    );
    if let Some(k) = kubelet {
        k.shutdown().await;
    }
    Ok(())
}

/// The current key id of each `(namespace, name)`, by tracker key.
fn current_kids(
    keys: &Tracker,
    which: &[(String, String)],
) -> anyhow::Result<Vec<(String, String)>> {
    keys.with(|m| {
        which
            .iter()
            .map(|(ns, name)| {
                let k = tracker::key(ns, name);
                let kid = m
                    .get(&k)
                    .and_then(Seen::current_kid)
                    .with_context(|| format!("{k} has no current key"))?
                    .to_string();
                Ok((k, kid))
            })
            .collect()
    })
}

/// Waits until `minInterval` (1 m) has passed since the current keys were minted, so a
/// rotation request is served at once rather than delayed by the debounce.
async fn wait_min_interval(keys: &Tracker, which: &[(String, String)]) -> anyhow::Result<()> {
    let latest = keys.with(|m| {
        which
            .iter()
            .filter_map(|(ns, name)| m.get(&tracker::key(ns, name))?.current_created())
            .max()
    });
    if let Some(latest) = latest {
        let due = plus(latest, 61.0);
        let wait = secs(Timestamp::now(), due);
        if wait > 0.0 {
            say(&format!(
                "waiting {wait:.0} s: minInterval (1m) since the last mint"
            ));
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
    Ok(())
}

/// A predicate over PolicyAgent states: how many of `pairs` (agent, key) are confirmed on
/// their key's current key id.
fn agents_confirmed_on_current<'a>(
    ns: &'a str,
    pairs: &'a [(String, String)],
    keys: &'a Tracker,
) -> impl Fn(&HashMap<String, Seen>) -> usize + 'a {
    move |m: &HashMap<String, Seen>| {
        let kids: HashMap<String, String> = keys.with(|k| {
            pairs
                .iter()
                .filter_map(|(_, key)| {
                    let id = tracker::key(ns, key);
                    Some((key.clone(), k.get(&id)?.current_kid()?.to_string()))
                })
                .collect()
        });
        pairs
            .iter()
            .filter(|(agent, key)| {
                kids.get(key).is_some_and(|kid| {
                    m.get(&tracker::key(ns, agent))
                        .is_some_and(|s| s.confirmed_on(kid))
                })
            })
            .count()
    }
}
