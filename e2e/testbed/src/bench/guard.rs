//! Keeps the machine alive: an operator that overloads the API server can drive the plane's
//! memory to tens of GiB (seen with the first implementation at N=1,000: kube-apiserver 10 GiB
//! and etcd 12 GiB, buffering full-namespace Secret lists). Every 0.5 s the guard reads the
//! machine's available memory and the plane's resident memory; past a limit it kills the
//! operator (which ends the load) and records why, and every wait of the run then fails at
//! once with that reason. It also records the plane's peak memory for the report.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

static ABORTED: OnceLock<String> = OnceLock::new();

/// Why the run was aborted, if it was.
pub fn aborted() -> Option<&'static str> {
    ABORTED.get().map(String::as_str)
}

/// Fails with the abort reason, if any.
pub fn check() -> anyhow::Result<()> {
    match aborted() {
        Some(r) => anyhow::bail!("aborted by the memory guard: {r}"),
        None => Ok(()),
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The running guard.
#[derive(Clone)]
pub struct Guard {
    /// PID of the operator to kill (updated at a restart).
    pub operator: Arc<AtomicU32>,
    apiserver_peak: Arc<AtomicU64>,
    etcd_peak: Arc<AtomicU64>,
    min_available: Arc<AtomicU64>,
}

impl Guard {
    /// Watches the plane whose PID files are in `plane_dir` (`kube-apiserver.pid`,
    /// `etcd.pid`, as written by `e2e/cluster.sh`); aborts when the machine has less than
    /// `min_free_gib` available or the API server and etcd together hold more than
    /// `max_plane_gib`.
    pub fn start(plane_dir: Option<&Path>, min_free_gib: f64, max_plane_gib: f64) -> Self {
        let pid = |name: &str| -> Option<u32> {
            let dir = plane_dir?;
            std::fs::read_to_string(dir.join(format!("{name}.pid")))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let (apiserver, etcd) = (pid("kube-apiserver"), pid("etcd"));
        let guard = Self {
            operator: Arc::new(AtomicU32::new(0)),
            apiserver_peak: Arc::new(AtomicU64::new(0)),
            etcd_peak: Arc::new(AtomicU64::new(0)),
            min_available: Arc::new(AtomicU64::new(u64::MAX)),
        };
        let g = guard.clone();
        let min_free = (min_free_gib * 1024.0 * 1024.0) as u64;
        let max_plane = (max_plane_gib * 1024.0 * 1024.0) as u64;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let a = apiserver.and_then(rss_kib).unwrap_or(0);
                let e = etcd.and_then(rss_kib).unwrap_or(0);
                g.apiserver_peak.fetch_max(a, Ordering::Relaxed);
                g.etcd_peak.fetch_max(e, Ordering::Relaxed);
                let free = available_kib().unwrap_or(u64::MAX);
                g.min_available.fetch_min(free, Ordering::Relaxed);
                let why = if free < min_free {
                    Some(format!(
                        "the machine had {:.1} GiB available (limit {min_free_gib} GiB); kube-apiserver {:.1} GiB, etcd {:.1} GiB resident",
                        gib(free),
                        gib(a),
                        gib(e)
                    ))
                } else if a + e > max_plane {
                    Some(format!(
                        "kube-apiserver {:.1} GiB + etcd {:.1} GiB resident (limit {max_plane_gib} GiB together)",
                        gib(a),
                        gib(e)
                    ))
                } else {
                    None
                };
                if let Some(why) = why
                    && ABORTED.set(why.clone()).is_ok()
                {
                    super::say(&format!("MEMORY GUARD: {why}; killing the operator"));
                    let op = g.operator.load(Ordering::Relaxed);
                    if op != 0 {
                        let _ = Command::new("kill")
                            .args(["-KILL", &op.to_string()])
                            .status();
                    }
                }
            }
        });
        guard
    }

    /// `kube-apiserver X MiB, etcd Y MiB` (peaks sampled), and the lowest available memory.
    pub fn describe(&self) -> String {
        let avail = self.min_available.load(Ordering::Relaxed);
        format!(
            "kube-apiserver {:.0} MiB, etcd {:.0} MiB (peaks sampled); machine's available memory at its lowest {}",
            self.apiserver_peak.load(Ordering::Relaxed) as f64 / 1024.0,
            self.etcd_peak.load(Ordering::Relaxed) as f64 / 1024.0,
            if avail == u64::MAX {
                "n/a".to_string()
            } else {
                format!("{:.1} GiB", gib(avail))
            }
        )
    }

    /// Peak resident memory of kube-apiserver and etcd, MiB.
    pub fn peaks_mib(&self) -> (f64, f64) {
        (
            self.apiserver_peak.load(Ordering::Relaxed) as f64 / 1024.0,
            self.etcd_peak.load(Ordering::Relaxed) as f64 / 1024.0,
        )
    }
}

fn gib(kib: u64) -> f64 {
    kib as f64 / 1024.0 / 1024.0
}
