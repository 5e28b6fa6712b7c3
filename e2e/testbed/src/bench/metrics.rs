//! The API server's own view of a phase: its `/metrics` scraped before and after, latency
//! quantiles computed from the histogram bucket deltas (as Prometheus' `histogram_quantile`
//! does), and API Priority and Fairness rejections.

use std::collections::BTreeMap;

use anyhow::Context as _;
use kube::Client;

/// Cumulative request-duration buckets per verb (`le` -> count), summed over every other
/// label, and APF counters.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    durations: BTreeMap<String, BTreeMap<Le, f64>>,
    rejected: f64,
    /// `apiserver_request_total` answered 429 (APF or inflight limits), and 5xx.
    too_many: f64,
    server_errors: f64,
}

/// A bucket bound that sorts numerically (`+Inf` last).
#[derive(Clone, Copy, Debug)]
struct Le(f64);

impl PartialEq for Le {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Le {}

impl PartialOrd for Le {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Le {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Scrapes `/metrics` (needs a client allowed to read it: the admin).
pub async fn scrape(client: &Client) -> anyhow::Result<Snapshot> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .context("build the /metrics request")?;
    let text = client
        .request_text(req)
        .await
        .context("GET /metrics from the API server")?;
    Ok(parse(&text))
}

fn parse(text: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        match name {
            "apiserver_request_duration_seconds_bucket" => {
                let (Some(verb), Some(le)) = (labels.get("verb"), labels.get("le")) else {
                    continue;
                };
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse() {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                *snap
                    .durations
                    .entry(verb.clone())
                    .or_default()
                    .entry(Le(le))
                    .or_default() += value;
            }
            "apiserver_flowcontrol_rejected_requests_total" => snap.rejected += value,
            "apiserver_request_total" => match labels.get("code").map(String::as_str) {
                Some("429") => snap.too_many += value,
                Some(c) if c.starts_with('5') => snap.server_errors += value,
                _ => {}
            },
            _ => {}
        }
    }
    snap
}

/// `a="x",b="y"` -> map, honouring backslash escapes inside values.
fn labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// Latency of one verb over a phase.
#[derive(Clone, Debug)]
pub struct VerbLatency {
    pub verb: String,
    pub count: f64,
    pub p50: Quantile,
    pub p99: Quantile,
}

/// A quantile from a histogram: interpolated inside a bucket, or only bounded when it falls in
/// the first bucket (interpolating from 0 would invent a figure) or above the last bound.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantile {
    AtMost(f64),
    About(f64),
    Above(f64),
}

/// Answers that refused or failed in a phase.
#[derive(Clone, Copy, Debug, Default)]
pub struct Refusals {
    /// APF rejections (`apiserver_flowcontrol_rejected_requests_total`).
    pub apf_rejected: f64,
    /// 429 answers.
    pub too_many: f64,
    /// 5xx answers (timeouts, etcd errors).
    pub server_errors: f64,
}

/// Per verb (watches and connects excluded: their duration is their lifetime), requests and
/// p50/p99 in the phase between `before` and `after`; and the refusals in it.
pub fn delta(before: &Snapshot, after: &Snapshot) -> (Vec<VerbLatency>, Refusals) {
    let mut out = Vec::new();
    for (verb, buckets) in &after.durations {
        if matches!(verb.as_str(), "WATCH" | "WATCHLIST" | "CONNECT") {
            continue;
        }
        let prev = before.durations.get(verb);
        let cumulative: Vec<(f64, f64)> = buckets
            .iter()
            .map(|(le, n)| {
                let was = prev.and_then(|p| p.get(le)).copied().unwrap_or(0.0);
                (le.0, (n - was).max(0.0))
            })
            .collect();
        let count = cumulative.last().map_or(0.0, |(_, n)| *n);
        if count < 1.0 {
            continue;
        }
        out.push(VerbLatency {
            verb: verb.clone(),
            count,
            p50: quantile(0.5, &cumulative),
            p99: quantile(0.99, &cumulative),
        });
    }
    out.sort_by(|a, b| b.count.total_cmp(&a.count));
    let refusals = Refusals {
        apf_rejected: (after.rejected - before.rejected).max(0.0),
        too_many: (after.too_many - before.too_many).max(0.0),
        server_errors: (after.server_errors - before.server_errors).max(0.0),
    };
    (out, refusals)
}

/// `histogram_quantile`: linear interpolation inside the bucket holding the rank.
fn quantile(q: f64, cumulative: &[(f64, f64)]) -> Quantile {
    let total = cumulative.last().map_or(0.0, |(_, n)| *n);
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_n = 0.0;
    for (i, (le, n)) in cumulative.iter().enumerate() {
        if *n >= rank {
            if le.is_infinite() {
                return Quantile::Above(prev_le);
            }
            if i == 0 {
                return Quantile::AtMost(*le);
            }
            let in_bucket = n - prev_n;
            if in_bucket <= 0.0 {
                return Quantile::About(*le);
            }
            return Quantile::About(prev_le + (le - prev_le) * (rank - prev_n) / in_bucket);
        }
        prev_le = *le;
        prev_n = *n;
    }
    Quantile::Above(prev_le)
}

impl Quantile {
    /// Seconds (the bound when only bounded).
    pub fn secs(self) -> f64 {
        match self {
            Quantile::AtMost(s) | Quantile::About(s) | Quantile::Above(s) => s,
        }
    }
}

/// `GET 1200: p50 4 ms, p99 40 ms; ...`
pub fn describe(latencies: &[VerbLatency], refusals: Refusals) -> String {
    let ms = |v: Quantile| match v {
        Quantile::AtMost(s) => format!("<= {:.0} ms", s * 1000.0),
        Quantile::About(s) => format!("{:.0} ms", s * 1000.0),
        Quantile::Above(s) => format!("> {:.0} s", s),
    };
    let mut parts: Vec<String> = latencies
        .iter()
        .map(|l| {
            format!(
                "{} {:.0}: p50 {}, p99 {}",
                l.verb,
                l.count,
                ms(l.p50),
                ms(l.p99)
            )
        })
        .collect();
    if parts.is_empty() {
        parts.push("no requests".into());
    }
    format!(
        "{}; answers 429: {:.0} (APF rejections {:.0}), 5xx: {:.0}",
        parts.join("; "),
        refusals.too_many,
        refusals.apf_rejected,
        refusals.server_errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_computes_quantiles() {
        let before = parse(
            r#"apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="0.05"} 10
apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="0.1"} 10
apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="+Inf"} 10
"#,
        );
        let after = parse(
            r#"# HELP x
apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="0.05"} 60
apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="0.1"} 110
apiserver_request_duration_seconds_bucket{component="apiserver",resource="secrets",verb="POST",le="+Inf"} 110
apiserver_request_duration_seconds_bucket{component="apiserver",resource="pods",verb="WATCH",le="+Inf"} 3
apiserver_flowcontrol_rejected_requests_total{flow_schema="x",priority_level="y",reason="queue-full"} 2
apiserver_request_total{code="429",verb="LIST"} 3
apiserver_request_total{code="504",verb="LIST"} 4
apiserver_request_total{code="200",verb="LIST"} 5
"#,
        );
        let (l, rejected) = delta(&before, &after);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].verb, "POST");
        assert!((l[0].count - 100.0).abs() < 1e-9);
        assert_eq!(l[0].p50, Quantile::AtMost(0.05));
        assert!((l[0].p99.secs() - 0.099).abs() < 1e-9);
        assert!((rejected.apf_rejected - 2.0).abs() < 1e-9);
        assert!((rejected.too_many - 3.0).abs() < 1e-9);
        assert!((rejected.server_errors - 4.0).abs() < 1e-9);
        assert_eq!(
            labels(r#"a="x\"y",b="z""#).get("a").map(String::as_str),
            Some("x\"y")
        );
    }
}
