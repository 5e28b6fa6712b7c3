//! Is the API server still answering? A plain GET of one ConfigMap every 100 ms from a
//! separate client (its own identity and connection), each in its own task so a slow answer
//! does not delay the next probe.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::jiff::Timestamp;
use kube::Api;

/// A probe's answer time, or `None` when it failed or took longer than [`TIMEOUT`].
#[derive(Clone, Copy, Debug)]
struct Probe {
    at: Timestamp,
    latency: Option<Duration>,
}

/// A failed or timed-out probe counts as this long in the quantiles.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The running probe; stops when dropped.
pub struct Prober {
    probes: Arc<Mutex<Vec<Probe>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    /// Starts probing `api.get(name)` every 100 ms.
    pub fn start(api: Api<ConfigMap>, name: &str) -> Self {
        let probes = Arc::new(Mutex::new(Vec::new()));
        let out = probes.clone();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let (api, name, out) = (api.clone(), name.clone(), out.clone());
                tokio::spawn(async move {
                    let at = Timestamp::now();
                    let t0 = Instant::now();
                    let latency = match tokio::time::timeout(TIMEOUT, api.get(&name)).await {
                        Ok(Ok(_)) => Some(t0.elapsed()),
                        _ => None,
                    };
                    out.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Probe { at, latency });
                });
            }
        });
        Self { probes, task }
    }

    /// `n, p50, p99, max, failures` of the probes sent in `[from, to)`.
    pub fn describe(&self, from: Timestamp, to: Timestamp) -> String {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let window: Vec<&Probe> = probes
            .iter()
            .filter(|p| p.at >= from && p.at < to)
            .collect();
        if window.is_empty() {
            return "no probes".into();
        }
        let failed = window.iter().filter(|p| p.latency.is_none()).count();
        let mut ms: Vec<f64> = window
            .iter()
            .map(|p| p.latency.unwrap_or(TIMEOUT).as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        let q = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} GETs, {failed} failed (> {} s or error)",
            q(0.5),
            q(0.99),
            ms[ms.len() - 1],
            ms.len(),
            TIMEOUT.as_secs()
        )
    }

    /// p99 in seconds over `[from, to)` (failures count as [`TIMEOUT`]).
    pub fn p99(&self, from: Timestamp, to: Timestamp) -> Option<f64> {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        let mut s: Vec<f64> = probes
            .iter()
            .filter(|p| p.at >= from && p.at < to)
            .map(|p| p.latency.unwrap_or(TIMEOUT).as_secs_f64())
            .collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        Some(s[((s.len() as f64 * 0.99).ceil() as usize).clamp(1, s.len()) - 1])
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}
