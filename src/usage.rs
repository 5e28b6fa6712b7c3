//! Key use reported by `keyward verifier` replicas, and what it may prove (pure).
//!
//! Two kinds of object carry it (see `crate::api::key_usage` for why these):
//! - one `KeyUsageReport` per (replica, ProvisioningKey): the last use of each key id and the
//!   pods seen with it, written when it changes (at most once per key per report interval);
//! - one `coordination.k8s.io/v1` Lease per replica, `keyward-verifier-<replica>`, in the
//!   verifier's namespace, renewed every report interval: the window the replica vouches for.
//!   - `acquireTime`: when this incarnation started recording (a restart starts a new window:
//!     what a crashed process saw but had not written is lost, so nothing before counts).
//!   - `renewTime`: the watermark. Every use the replica accepted before it is in its reports,
//!     to the stated resolution. A replica whose writes are throttled or failing does not
//!     advance it.
//!   - `leaseDurationSeconds`: a replica whose watermark is older than this is silent.
//!   - annotations: the namespaces it watches, its report resolution, and `stopped` once it
//!     shut down cleanly (final flush written, no request accepted after the watermark).
//!
//! Silence is never evidence: "unused for W" needs every replica that watches the key's
//! namespace (and is not cleanly stopped) to vouch, without a gap, for the whole window
//! `[T - W, T]`, where `T` is the oldest watermark; and the key id's last reported use (plus
//! the resolution) must fall before the window.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;

use crate::api::key_usage::KeyUsageReport;

/// Label on every verifier Lease (value [`COMPONENT_VERIFIER`] under `keyward.dev/component`).
pub const COMPONENT_VERIFIER: &str = "verifier";
/// Selector of the verifier Leases.
pub const LEASE_SELECTOR: &str = "keyward.dev/component=verifier";
/// Prefix of a replica's Lease name.
pub const LEASE_PREFIX: &str = "keyward-verifier-";
/// Lease annotation: `*` (every namespace) or a comma-separated list of namespaces.
pub const ANN_NAMESPACES: &str = "keyward.dev/namespaces";
/// Lease annotation: the report resolution (Go duration): a key id's `lastUsedAt` is refreshed
/// when a use is at least this much newer than the reported one.
pub const ANN_RESOLUTION: &str = "keyward.dev/report-resolution";
/// Lease annotation `"true"`: the replica stopped cleanly after its final flush.
pub const ANN_STOPPED: &str = "keyward.dev/stopped";
/// Label on reports: the replica that wrote it.
pub const REPLICA_LABEL: &str = "keyward.dev/verifier-replica";
/// Field manager of everything the verifier writes.
pub const FIELD_MANAGER: &str = "keyward-verifier";

/// Name of the Lease of `replica`.
pub fn lease_name(replica: &str) -> String {
    format!("{LEASE_PREFIX}{replica}")
}

/// Name of the report of `replica` for ProvisioningKey `pk`: `<pk>.<replica>`, or, when that
/// exceeds 253 characters, a prefix of it and a hash of the whole (still unique per pair).
pub fn report_name(pk: &str, replica: &str) -> String {
    let full = format!("{pk}.{replica}");
    if full.len() <= 253 {
        return full;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(full.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let mut prefix: String = full.chars().take(253 - 17).collect();
    while prefix.ends_with(['.', '-']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}

/// One replica's Lease, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    pub name: String,
    /// Start of this incarnation's window.
    pub since: DateTime<Utc>,
    /// Every use accepted before this is reported.
    pub watermark: DateTime<Utc>,
    pub lease_duration: Duration,
    /// `None`: every namespace.
    pub namespaces: Option<BTreeSet<String>>,
    pub resolution: Duration,
    pub stopped: bool,
}

impl Replica {
    pub fn watches(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|n| n.contains(namespace))
    }
}

/// Parses a verifier Lease. An unreadable Lease is an error, and the caller treats the replica
/// as silent: it cannot vouch for anything.
pub fn parse_lease(lease: &Lease) -> Result<Replica, String> {
    let name = lease.metadata.name.clone().unwrap_or_default();
    let spec = lease
        .spec
        .as_ref()
        .ok_or_else(|| format!("verifier Lease {name} has no spec"))?;
    let since = spec
        .acquire_time
        .as_ref()
        .and_then(|t| jiff_to_chrono(t.0))
        .ok_or_else(|| format!("verifier Lease {name} has no acquireTime"))?;
    let watermark = spec
        .renew_time
        .as_ref()
        .and_then(|t| jiff_to_chrono(t.0))
        .ok_or_else(|| format!("verifier Lease {name} has no renewTime"))?;
    let secs = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("verifier Lease {name} has no leaseDurationSeconds"))?;
    let ann = lease.metadata.annotations.clone().unwrap_or_default();
    let namespaces = match ann.get(ANN_NAMESPACES).map(String::as_str) {
        None => return Err(format!("verifier Lease {name} has no {ANN_NAMESPACES}")),
        Some("*") => None,
        Some(list) => Some(
            list.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
    };
    let resolution = ann
        .get(ANN_RESOLUTION)
        .and_then(|r| crate::rotation::parse_duration(r))
        .ok_or_else(|| format!("verifier Lease {name} has no valid {ANN_RESOLUTION}"))?;
    Ok(Replica {
        name: name
            .strip_prefix(LEASE_PREFIX)
            .unwrap_or(name.as_str())
            .to_string(),
        since,
        watermark,
        lease_duration: Duration::from_secs(u64::try_from(secs).unwrap_or(1)),
        namespaces,
        resolution,
        stopped: ann.get(ANN_STOPPED).is_some_and(|v| v == "true"),
    })
}

/// What the replicas watching a namespace vouch for together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Covered {
    /// The oldest watermark: everything accepted before it is reported.
    pub as_of: DateTime<Utc>,
    /// The newest window start: no replica has a gap after it.
    pub since: DateTime<Utc>,
    /// The coarsest resolution.
    pub resolution: Duration,
    /// The replicas that vouch.
    pub replicas: Vec<String>,
}

/// The coverage of `namespace` at `now`, or why there is none (the `VerifierSilent` message).
/// `leases` holds every verifier Lease as parsed (errors included).
pub fn coverage(
    leases: &[Result<Replica, String>],
    namespace: &str,
    now: DateTime<Utc>,
) -> Result<Covered, String> {
    let mut live = Vec::new();
    for lease in leases {
        match lease {
            Err(e) => return Err(e.clone()),
            Ok(r) if r.stopped || !r.watches(namespace) => {}
            Ok(r) => live.push(r),
        }
    }
    if live.is_empty() {
        return Err(format!(
            "no keyward verifier replica reports use in namespace {namespace}"
        ));
    }
    let mut silent = Vec::new();
    for r in &live {
        let deadline = add(r.watermark, r.lease_duration);
        if now > deadline {
            silent.push(format!(
                "{} (last report covers up to {})",
                r.name,
                r.watermark
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
        }
    }
    if !silent.is_empty() {
        silent.sort();
        return Err(format!("verifier replica(s) silent: {}", silent.join(", ")));
    }
    let as_of = live.iter().map(|r| r.watermark).min().unwrap_or(now);
    let since = live.iter().map(|r| r.since).max().unwrap_or(now);
    let resolution = live
        .iter()
        .map(|r| r.resolution)
        .max()
        .unwrap_or(Duration::ZERO);
    let mut replicas: Vec<String> = live.iter().map(|r| r.name.clone()).collect();
    replicas.sort();
    Ok(Covered {
        as_of,
        since,
        resolution,
        replicas,
    })
}

/// What the reports say about one ProvisioningKey: per key id, the last use and the pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUse {
    pub last_used: BTreeMap<String, DateTime<Utc>>,
    pub pods: BTreeMap<String, BTreeSet<String>>,
}

/// Merges the reports of every replica (stopped ones included: what they saw still counts).
/// Entries with an unreadable time are kept as used "now" (never as unused).
pub fn key_use(reports: &[KeyUsageReport], now: DateTime<Utc>) -> KeyUse {
    let mut out = KeyUse::default();
    for r in reports {
        for k in &r.spec.keys {
            let at = crate::rotation::observe::parse_ts(&k.last_used_at).unwrap_or(now);
            let e = out.last_used.entry(k.kid.clone()).or_insert(at);
            *e = (*e).max(at);
            let pods = out.pods.entry(k.kid.clone()).or_default();
            pods.extend(k.pods.iter().map(|p| p.uid.clone()));
        }
    }
    out
}

/// The verdict on "unused for `window`".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unused {
    /// Nothing used the key id during a window every replica vouches for.
    Yes,
    /// Used at `last_used`: it can be unused at `until` at the earliest.
    InUse {
        last_used: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    /// The replicas have not vouched for long enough yet (a replica started at `since`).
    Warming { until: DateTime<Utc> },
    /// No replica, or one is silent: never evidence.
    Silent(String),
}

/// Whether `kid` was unused for `window`, as of the replicas' watermark.
pub fn unused_for(
    window: Duration,
    kid: &str,
    usage: &KeyUse,
    coverage: &Result<Covered, String>,
) -> Unused {
    let cov = match coverage {
        Ok(c) => c,
        Err(why) => return Unused::Silent(why.clone()),
    };
    let start = sub(cov.as_of, window);
    if cov.since > start {
        return Unused::Warming {
            until: add(cov.since, window),
        };
    }
    if let Some(last) = usage.last_used.get(kid)
        && add(*last, cov.resolution) >= start
    {
        return Unused::InUse {
            last_used: *last,
            until: add(add(*last, cov.resolution), window),
        };
    }
    Unused::Yes
}

/// A Lease time (microseconds) as chrono.
pub fn jiff_to_chrono(t: k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(t.as_microsecond())
}

/// A chrono time as a Lease time.
pub fn chrono_to_jiff(t: DateTime<Utc>) -> Option<k8s_openapi::jiff::Timestamp> {
    k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros()).ok()
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn sub(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests;
