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
//!   - annotations: the namespaces it watches, its report resolution, `stopped` once it
//!     shut down cleanly (final flush written, no request accepted after the watermark), and
//!     [`ANN_REPORTS`]: every report it has written that may still matter, each with the
//!     sequence number of its last write (see below).
//!
//! Silence is never evidence: "unused for W" needs every replica that watches the key's
//! namespace (and is not cleanly stopped) to vouch, without a gap, for the whole window
//! `[T - W, T]`, where `T` is the oldest watermark; and the key id's last reported use (plus
//! the resolution) must fall before the window.
//!
//! Absence is never evidence either (issue 18, finding 4). A report can be deleted, or replaced
//! by an older copy, by anyone who may write reports; so a replica numbers its report writes
//! (annotation [`ANN_REPORT_SEQ`] on the report, increasing per replica) and, only after a
//! report is written, lists it in its Lease with that number. A key whose report a Lease lists
//! but which is missing, carries a lower number, or that the Lease could not list (the list
//! overflowed), and a key id a report had to leave out (more key ids than a report holds,
//! [`ANN_KEYS_TRUNCATED`]), count as used at the time of the evaluation: never as unused. All
//! of it is read from API objects, so an operator restart changes nothing.
//!
//! No pod is dropped for want of room either. A report with more pods per key id than one
//! object holds is split into pages ([`report_page_name`]): every page repeats each key id's
//! `lastUsedAt` (so any page alone never understates use) and carries its share of the pods;
//! all pages are written with the same number and each is listed in the Lease
//! ([`page_key`]), so a missing or older page is doubt like a missing report. Only a replica's
//! memory bound (65,536 pods per key id) truncates a pod list, and says so (`podsTruncated`,
//! [`KeyUse::pods_truncated`]): pods are positive evidence only, so a pod absent from a
//! truncated list is unknown, never "not seen" ([`KeyUse::pod_seen`]).
//!
//! Which replicas must vouch: with `--verifier-replicas` (the chart passes the StatefulSet's
//! pod names), every listed replica needs a Lease, so deleting one never shrinks coverage
//! (`VerifierSilent`). Without it, the replicas are whichever Leases exist, and deleting a
//! replica's Lease removes it from the coverage (documented in docs/security.md).

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
/// Lease annotation: when the replica last renewed its Lease (RFC 3339), whether or not its
/// reports caught up. Separate from the watermark (`renewTime`): a replica that is alive but
/// behind (a burst of new keys, its writes throttled) renews this while its watermark waits,
/// and the operator says `VerifierBehind` instead of `VerifierSilent`. Either way revocation
/// waits: only the watermark is evidence.
pub const ANN_HEARTBEAT: &str = "keyward.dev/heartbeat";
/// Lease annotation: how many reports the replica still has to write (decimal), as of
/// [`ANN_HEARTBEAT`].
pub const ANN_PENDING: &str = "keyward.dev/pending-reports";
/// Lease annotation `"true"`: the replica stopped cleanly after its final flush.
pub const ANN_STOPPED: &str = "keyward.dev/stopped";
/// Lease annotation: compact JSON `{"<namespace>/<ProvisioningKey>": <seq>,
/// "<namespace>/<ProvisioningKey>#2": <seq>, ...}`, the reports the replica has written, one
/// entry per page (page 1 without a suffix, see [`page_key`]), and the sequence number of the
/// last write of each. Bounded by [`MAX_REPORTS_BYTES`] (a key's pages fit together or not at
/// all); what does not fit is dropped and [`ANN_REPORTS_OVERFLOW`] set.
pub const ANN_REPORTS: &str = "keyward.dev/reports";
/// Lease annotation `"true"`: [`ANN_REPORTS`] could not list every report of the replica, so a
/// key it does not list may have a report that is missing: every such key counts as used.
pub const ANN_REPORTS_OVERFLOW: &str = "keyward.dev/reports-overflow";
/// Most bytes of [`ANN_REPORTS`] (annotations of an object total at most 256 KiB).
pub const MAX_REPORTS_BYTES: usize = 128 * 1024;
/// Report annotation: the sequence number of this write of the report (decimal), increasing
/// per replica across its writes (and its restarts: a new incarnation starts above what its
/// Lease listed).
pub const ANN_REPORT_SEQ: &str = "keyward.dev/report-seq";
/// Report annotation `"true"`: the replica saw more key ids than the report lists, so a key id
/// it does not list counts as used.
pub const ANN_KEYS_TRUNCATED: &str = "keyward.dev/keys-truncated";
/// Label on reports: the replica that wrote it.
pub const REPLICA_LABEL: &str = "keyward.dev/verifier-replica";
/// Field manager of everything the verifier writes.
pub const FIELD_MANAGER: &str = "keyward-verifier";

/// Name of the Lease of `replica`.
pub fn lease_name(replica: &str) -> String {
    format!("{LEASE_PREFIX}{replica}")
}

/// Name of the report of `replica` for ProvisioningKey `pk` (its page 1): `<pk>.<replica>`, or,
/// when that exceeds 253 characters, a prefix of it and a hash of the whole (still unique per
/// pair).
pub fn report_name(pk: &str, replica: &str) -> String {
    fit_name(format!("{pk}.{replica}"))
}

/// Name of page `page` of the report of `replica` for ProvisioningKey `pk`: page 1 is
/// [`report_name`], page n > 1 `<pk>.<replica>.p<n>` (shortened like [`report_name`]). A name
/// another pair could also produce (a key named `<pk>.<replica>` and a replica named `p<n>`)
/// only ever fails safe: [`key_use`] takes an object for a page only when its `spec` names the
/// key, the replica and the page, so the other writer's object reads as missing (doubt).
pub fn report_page_name(pk: &str, replica: &str, page: u32) -> String {
    if page <= 1 {
        report_name(pk, replica)
    } else {
        fit_name(format!("{pk}.{replica}.p{page}"))
    }
}

/// `full` when it is a valid length for an object name, else a prefix of it and a hash of the
/// whole.
fn fit_name(full: String) -> String {
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
    /// [`ANN_REPORTS`]: `<namespace>/<ProvisioningKey>` (page 1) and
    /// `<namespace>/<ProvisioningKey>#<n>` (page n, see [`page_key`]) -> the seq of the last
    /// write of that page.
    pub reports: BTreeMap<String, u64>,
    /// [`ANN_REPORTS_OVERFLOW`].
    pub reports_overflow: bool,
    /// [`ANN_HEARTBEAT`]: `None` from a verifier older than this operator.
    pub heartbeat: Option<DateTime<Utc>>,
    /// [`ANN_PENDING`].
    pub pending: u64,
}

/// The key of [`Replica::reports`] for ProvisioningKey `pk` in `namespace` (its page 1).
pub fn report_key(namespace: &str, pk: &str) -> String {
    format!("{namespace}/{pk}")
}

/// The key of [`Replica::reports`] for page `page` of the report of `pk` in `namespace`: page
/// 1 is [`report_key`], page n > 1 `<namespace>/<pk>#<n>` (`#` is in no object name, so it
/// never collides with another key's entry).
pub fn page_key(namespace: &str, pk: &str, page: u32) -> String {
    if page <= 1 {
        report_key(namespace, pk)
    } else {
        format!("{namespace}/{pk}#{page}")
    }
}

/// Splits an entry of [`Replica::reports`] into its [`report_key`] and page (1 without a
/// `#<n>` suffix); `None` for a malformed page suffix.
pub fn parse_page_key(entry: &str) -> Option<(&str, u32)> {
    match entry.split_once('#') {
        None => Some((entry, 1)),
        Some((base, n)) => n.parse().ok().filter(|n| *n > 1).map(|n| (base, n)),
    }
}

/// [`ANN_REPORTS`] as written: compact JSON.
pub fn reports_annotation(reports: &BTreeMap<String, u64>) -> String {
    serde_json::to_string(reports).unwrap_or_else(|_| "{}".into())
}

/// The sequence number of a report's write ([`ANN_REPORT_SEQ`]); `None` when absent or
/// unreadable.
pub fn report_seq(report: &KeyUsageReport) -> Option<u64> {
    report
        .metadata
        .annotations
        .as_ref()?
        .get(ANN_REPORT_SEQ)?
        .trim()
        .parse()
        .ok()
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
        .and_then(|r| crate::time::parse_duration(r))
        .ok_or_else(|| format!("verifier Lease {name} has no valid {ANN_RESOLUTION}"))?;
    // A Lease without the list cannot prove that no report was deleted: it vouches for nothing
    // (a verifier older than this operator, or someone removed it).
    let reports: BTreeMap<String, u64> = match ann.get(ANN_REPORTS) {
        None => {
            return Err(format!(
                "verifier Lease {name} has no {ANN_REPORTS} (a verifier older than the operator?)"
            ));
        }
        Some(json) => serde_json::from_str(json)
            .map_err(|e| format!("verifier Lease {name} has an unreadable {ANN_REPORTS}: {e}"))?,
    };
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
        reports,
        reports_overflow: ann.get(ANN_REPORTS_OVERFLOW).is_some_and(|v| v == "true"),
        heartbeat: ann
            .get(ANN_HEARTBEAT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        pending: ann
            .get(ANN_PENDING)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    })
}

/// Why the replicas cannot vouch for a namespace now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCoverage {
    /// The message (names the replicas and what is wrong with each).
    pub why: String,
    /// Every replica that cannot vouch is alive and renewing, only behind with its reports
    /// (`VerifierBehind`); `false`: at least one is silent, missing or unreadable
    /// (`VerifierSilent`).
    pub behind: bool,
}

impl NoCoverage {
    fn silent(why: String) -> Self {
        NoCoverage { why, behind: false }
    }
}

impl std::fmt::Display for NoCoverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
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

/// The coverage of `namespace` at `now`, or why there is none (the `VerifierSilent` or
/// `VerifierBehind` message).
/// `leases` holds every verifier Lease as parsed (errors included); `expected` the replicas
/// that must have one (`--verifier-replicas`; empty: whichever Leases exist).
pub fn coverage(
    leases: &[Result<Replica, String>],
    expected: &[String],
    namespace: &str,
    now: DateTime<Utc>,
) -> Result<Covered, NoCoverage> {
    let mut missing: Vec<&str> = expected
        .iter()
        .filter(|e| {
            !leases
                .iter()
                .any(|l| l.as_ref().is_ok_and(|r| &r.name == *e))
        })
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        missing.sort_unstable();
        missing.dedup();
        return Err(NoCoverage::silent(format!(
            "expected verifier replica(s) without a Lease (deleted, or not started yet): {}",
            missing.join(", ")
        )));
    }
    let mut live = Vec::new();
    for lease in leases {
        match lease {
            Err(e) => return Err(NoCoverage::silent(e.clone())),
            Ok(r) if r.stopped || !r.watches(namespace) => {}
            Ok(r) => live.push(r),
        }
    }
    if live.is_empty() {
        return Err(NoCoverage::silent(format!(
            "no keyward verifier replica reports use in namespace {namespace}"
        )));
    }
    let mut silent = Vec::new();
    let mut behind = Vec::new();
    let secs = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for r in &live {
        let deadline = add(r.watermark, r.lease_duration);
        if now <= deadline {
            continue;
        }
        // Alive (renewed within its lease duration) but its reports have not caught up.
        let alive = r.heartbeat.is_some_and(|h| {
            h <= now + chrono::Duration::seconds(5) && now <= add(h, r.lease_duration)
        });
        if alive {
            behind.push(format!(
                "{} ({} reports pending; reports cover up to {})",
                r.name,
                r.pending,
                secs(r.watermark)
            ));
        } else {
            silent.push(format!(
                "{} (last report covers up to {})",
                r.name,
                secs(r.watermark)
            ));
        }
    }
    if !silent.is_empty() {
        silent.sort();
        silent.extend(behind.iter().map(|b| format!("{b}, behind")));
        return Err(NoCoverage::silent(format!(
            "verifier replica(s) silent: {}",
            silent.join(", ")
        )));
    }
    if !behind.is_empty() {
        behind.sort();
        return Err(NoCoverage {
            why: format!(
                "verifier replica(s) alive but behind with their reports: {}",
                behind.join(", ")
            ),
            behind: true,
        });
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
    /// A report is missing or stale: every key id counts as used at this time, and why.
    pub all_used: Option<Doubt>,
    /// A report had to leave key ids out: every key id it does not list (in
    /// [`KeyUse::last_used`]) counts as used at this time, and why.
    pub unlisted_used: Option<Doubt>,
    /// Key ids whose pods a replica could not all hold (`podsTruncated`): a pod missing from
    /// [`KeyUse::pods`] may still have used them. Pods are positive evidence only (see
    /// [`KeyUse::pod_seen`]).
    pub pods_truncated: BTreeSet<String>,
}

/// Evidence that cannot be trusted, so use is assumed at `at` (the evaluation time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doubt {
    pub at: DateTime<Utc>,
    pub why: String,
}

impl KeyUse {
    /// Why `kid`'s use cannot be ruled out, if the reports cannot be trusted for it.
    pub fn doubt(&self, kid: &str) -> Option<&Doubt> {
        self.all_used.as_ref().or_else(|| {
            self.unlisted_used
                .as_ref()
                .filter(|_| !self.last_used.contains_key(kid))
        })
    }

    /// Whether a replica saw pod `uid` use `kid`: `Some(true)` when a report lists it,
    /// `Some(false)` when no report lists it and every pod list of `kid` is whole, `None` when
    /// it is not listed but a list of `kid` was truncated (unknown). An acknowledgement needs
    /// `Some(true)`: absence from a truncated list proves nothing either way.
    pub fn pod_seen(&self, kid: &str, uid: &str) -> Option<bool> {
        if self.pods.get(kid).is_some_and(|p| p.contains(uid)) {
            Some(true)
        } else if self.pods_truncated.contains(kid) {
            None
        } else {
            Some(false)
        }
    }

    fn doubt_all(&mut self, at: DateTime<Utc>, why: String) {
        if self.all_used.is_none() {
            self.all_used = Some(Doubt { at, why });
        }
    }
}

/// Merges the reports of every replica (stopped ones included: what they saw still counts),
/// every page of each, for ProvisioningKey `pk` in `namespace`, and checks them against what
/// the replicas' Leases list (`leases`, as parsed; unreadable ones are for [`coverage`] to
/// refuse). Entries with an unreadable time are kept as used "now" (never as unused); a report
/// page a Lease lists that is missing or older than listed, a Lease whose list overflowed, and
/// a report that left key ids out make the key ids concerned used "now" ([`KeyUse::doubt`]). A
/// key id whose pods a replica could not all hold is in [`KeyUse::pods_truncated`].
pub fn key_use(
    reports: &[KeyUsageReport],
    leases: &[Result<Replica, String>],
    namespace: &str,
    pk: &str,
    now: DateTime<Utc>,
) -> KeyUse {
    let mut out = KeyUse::default();
    let listed_as = report_key(namespace, pk);
    for replica in leases.iter().filter_map(|l| l.as_ref().ok()) {
        // Page 1 under the key's entry, page n under `<entry>#<n>`.
        let prefix = format!("{listed_as}#");
        let listed: Vec<(u32, u64)> = replica
            .reports
            .get(&listed_as)
            .map(|seq| (1, *seq))
            .into_iter()
            .chain(
                replica
                    .reports
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .filter_map(|(k, seq)| {
                        parse_page_key(k)
                            .filter(|(base, _)| *base == listed_as)
                            .map(|(_, page)| (page, *seq))
                    }),
            )
            .collect();
        if listed.is_empty() {
            if replica.reports_overflow && replica.watches(namespace) {
                out.doubt_all(
                    now,
                    format!(
                        "verifier replica {}'s Lease could not list all its reports, so a \
                         deleted report {namespace}/{} would go unnoticed",
                        replica.name,
                        report_name(pk, &replica.name)
                    ),
                );
            }
            continue;
        }
        for (page, want) in listed {
            let name = report_page_name(pk, &replica.name, page);
            let found = reports.iter().find(|r| {
                r.metadata.name.as_deref() == Some(name.as_str())
                    && r.spec.replica == replica.name
                    && r.spec.provisioning_key == pk
                    && r.spec.page == page
            });
            match found.map(report_seq) {
                None => out.doubt_all(
                    now,
                    format!(
                        "report {namespace}/{name}, which verifier replica {}'s Lease lists \
                         (write {want}), is missing (deleted?)",
                        replica.name
                    ),
                ),
                Some(seq) if seq.is_none_or(|s| s < want) => out.doubt_all(
                    now,
                    format!(
                        "report {namespace}/{name} is write {} but verifier replica {}'s Lease \
                         lists write {want} (replaced by an older copy?)",
                        seq.map_or_else(|| "(unnumbered)".to_string(), |s| s.to_string()),
                        replica.name
                    ),
                ),
                Some(_) => {}
            }
        }
    }
    for r in reports {
        // A superseded page (the report shrank after it was written) lists nothing.
        if r.spec.page > r.spec.pages {
            continue;
        }
        let truncated = r
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANN_KEYS_TRUNCATED))
            .is_some_and(|v| v == "true");
        if truncated && out.unlisted_used.is_none() {
            out.unlisted_used = Some(Doubt {
                at: now,
                why: format!(
                    "report {namespace}/{} of verifier replica {} could not list every key id",
                    r.metadata.name.as_deref().unwrap_or_default(),
                    r.spec.replica
                ),
            });
        }
        for k in &r.spec.keys {
            let at = crate::time::parse_ts(&k.last_used_at).unwrap_or(now);
            let e = out.last_used.entry(k.kid.clone()).or_insert(at);
            *e = (*e).max(at);
            let pods = out.pods.entry(k.kid.clone()).or_default();
            pods.extend(k.pods.iter().map(|p| p.uid.clone()));
            if k.pods_truncated {
                out.pods_truncated.insert(k.kid.clone());
            }
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
    /// The reports cannot be trusted for this key id (one is missing, stale or incomplete):
    /// counted as used at the evaluation time, so unused at `until` at the earliest.
    Unproven { why: String, until: DateTime<Utc> },
    /// No replica, or one is silent: never evidence.
    Silent(String),
    /// Every replica is alive but one is behind with its reports (a burst): not evidence yet.
    Behind(String),
}

/// Whether `kid` was unused for `window`, as of the replicas' watermark.
pub fn unused_for(
    window: Duration,
    kid: &str,
    usage: &KeyUse,
    coverage: &Result<Covered, NoCoverage>,
) -> Unused {
    let cov = match coverage {
        Ok(c) => c,
        Err(n) if n.behind => return Unused::Behind(n.why.clone()),
        Err(n) => return Unused::Silent(n.why.clone()),
    };
    let start = sub(cov.as_of, window);
    if cov.since > start {
        return Unused::Warming {
            until: add(cov.since, window),
        };
    }
    if let Some(d) = usage.doubt(kid) {
        return Unused::Unproven {
            why: d.why.clone(),
            until: add(add(d.at.max(cov.as_of), cov.resolution), window),
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

pub mod write_policy;

#[cfg(test)]
mod tests;
