//! The operator under test as a child process, and its memory sampled from `/proc`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;

/// `keyward run` (default flags, but metrics and probes on ephemeral ports) with a kubeconfig of
/// its own, output to a log file.
pub struct Operator {
    child: Child,
    pub pid: u32,
    pub started: Timestamp,
    pub memory: MemorySampler,
}

impl Operator {
    /// Starts `<bin> run` with `KUBECONFIG=kubeconfig`; samples its memory every 0.5 s.
    pub fn start(bin: &Path, kubeconfig: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin, &["run".to_string()], &[], kubeconfig, log)
    }

    /// Starts `<bin> <args>` with `KUBECONFIG=kubeconfig` and the extra environment `env`
    /// (e.g. `keyward verifier ...`); samples its memory every 0.5 s.
    pub fn start_with(
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        kubeconfig: &Path,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let err = out.try_clone()?;
        let started = Timestamp::now();
        let child = Command::new(bin)
            .args(args)
            // Metrics and probes on ephemeral loopback ports: never the default 8080, where the
            // stand-in kubelet's agents listen on their pod IPs. Environment, not flags, so a
            // binary from before these flags (--operator-bin) still starts.
            .env("KEYWARD_METRICS_ADDRESS", "127.0.0.1:0")
            .env("KEYWARD_HEALTH_ADDRESS", "127.0.0.1:0")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {} {}", bin.display(), args.join(" ")))?;
        let pid = child.id();
        Ok(Self {
            child,
            pid,
            started,
            memory: MemorySampler::start(pid),
        })
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then waits for the exit (SIGKILL after `grace`). Returns how long it took.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<Duration> {
        let t0 = Instant::now();
        if !self.running() {
            return Ok(Duration::ZERO);
        }
        // `kill` by PID: this process started it, and no unsafe code is needed for a signal.
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .context("run kill -TERM")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", self.pid);
        while t0.elapsed() < grace {
            if !self.running() {
                return Ok(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::bail!("the process did not stop within {grace:?} of SIGTERM (killed)")
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One memory sample: resident set and its high-water mark, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Timestamp,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// Samples `/proc/<pid>/status` (`VmRSS`, `VmHWM`) every 0.5 s until the process is gone.
#[derive(Clone)]
pub struct MemorySampler {
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl MemorySampler {
    fn start(pid: u32) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let path = PathBuf::from(format!("/proc/{pid}/status"));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Ok(text) = tokio::fs::read_to_string(&path).await else {
                    break;
                };
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                };
                // A zombie has no VmRSS line: the process has exited.
                let (Some(rss_kib), Some(hwm_kib)) = (field("VmRSS:"), field("VmHWM:")) else {
                    break;
                };
                out.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                    at: Timestamp::now(),
                    rss_kib,
                    hwm_kib,
                });
            }
        });
        Self { samples }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The highest `VmHWM` seen (the peak resident set since the process started), in MiB.
    pub fn peak_mib(&self) -> Option<f64> {
        self.samples()
            .iter()
            .map(|s| s.hwm_kib)
            .max()
            .map(|k| k as f64 / 1024.0)
    }

    /// The median `VmRSS` over `[from, to)`, in MiB.
    pub fn median_mib(&self, from: Timestamp, to: Timestamp) -> Option<f64> {
        let mut v: Vec<u64> = self
            .samples()
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(|s| s.rss_kib)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(v[v.len() / 2] as f64 / 1024.0)
    }

    /// The highest `VmRSS` sampled over `[from, to)`, in MiB.
    pub fn max_mib(&self, from: Timestamp, to: Timestamp) -> Option<f64> {
        self.samples()
            .iter()
            .filter(|s| s.at >= from && s.at < to)
            .map(|s| s.rss_kib)
            .max()
            .map(|k| k as f64 / 1024.0)
    }
}
