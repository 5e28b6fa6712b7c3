//! Reporting use to the operator, with bounded writes (see `crate::usage` for the objects and
//! what they prove, and `crate::api::key_usage` for why these objects).
//!
//! - [`Reporting`] is the pure state (no client, no clock): per (key, key id) the true last use,
//!   the pods, what was last written, and the first use no write covers yet. An entry is
//!   *dirty* when a use is not covered: a new key id, a new pod for it (acknowledgement must be
//!   prompt), or a use at least the resolution newer than the written `lastUsedAt`.
//! - Every report interval the driver ([`run`]) drains the [`MemoryUseLog`], writes each key
//!   with dirty entries whose last write is at least an interval old while a token bucket
//!   allows (keys with a rotation in flight first), and renews the replica's Lease with the
//!   watermark: the flush's start when nothing dirty is left, else the oldest uncovered use.
//! - A key's report is one or more pages ([`paginate`]): each page lists every key id with its
//!   `lastUsedAt` and at most [`MAX_PODS_PER_KID`] of its pods, so no pod is left out for want
//!   of room. Pages beyond the first are objects of their own (`crate::usage::report_page_name`).
//!   When a report shrinks, its surplus pages are rewritten empty (superseded) in the same
//!   flush, so no page outlives what it says (the verifier may not delete reports).
//! - Every report write carries the next sequence number of the replica (annotation
//!   `keyward.dev/report-seq`), the same on every page of one write; once every page is
//!   written, the key is listed with it in the Lease (`keyward.dev/reports`, one entry per
//!   page) at the renewal that follows, so the operator sees a listed page that goes missing or
//!   older (see `crate::usage`). The list keeps a key until its last
//!   reported use is older than the longest `revokeWhenUnusedFor` (then its report cannot
//!   hold anything back), survives restarts (a new incarnation carries the previous list over
//!   and numbers above it), and is bounded (`keyward.dev/reports-overflow` when it is not
//!   whole).
//! - Bounds: per key at most one write (of its pages) per interval whatever the request rate;
//!   per replica at most `--report-qps` object writes per second on average (`--report-burst`
//!   back to back; a key's pages are written together, the bucket going into debt for all but
//!   the first); one Lease renewal (a read and a replace) per interval. Per key id at most
//!   [`MAX_PODS_HELD_PER_KID`] pods in memory (the most recent kept, `podsTruncated` past it,
//!   and every pod evicted counted in `keyward_verifier_pods_dropped_total`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tracing::{debug, error, info, warn};

use super::Shared;
use super::index::KeyRef;
use super::use_log::{MemoryUseLog, Use};
use crate::api::key_usage::{KeyUsageReport, KeyUsageReportSpec, KidUsage, PodUsage};
use crate::api::key_usage::{MAX_PAGES, MAX_PODS_PER_KID};
use crate::usage;

/// Most key ids listed in one report (the CRD's limit; the most recently used are kept).
pub const MAX_KIDS_PER_REPORT: usize = 64;
/// Most pods held per key id (the most recently seen kept; past it the key id's report says
/// `podsTruncated`): a memory bound, not a report bound, as pod UIDs come from verified pod
/// tokens and so number the real pods. [`MAX_PAGES`] pages of [`MAX_PODS_PER_KID`].
pub const MAX_PODS_HELD_PER_KID: usize = MAX_PAGES as usize * MAX_PODS_PER_KID;
/// How long the final flush and Lease renewal at shutdown may take.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The pure state.

/// What was last written for one key id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    last_used: DateTime<Utc>,
    pods: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct KidState {
    /// The true last use (attributed or not).
    last_used: DateTime<Utc>,
    /// Pod UID -> its last use, at most [`MAX_PODS_HELD_PER_KID`] (the most recent kept).
    pods: BTreeMap<String, DateTime<Utc>>,
    /// Pods were evicted past [`MAX_PODS_HELD_PER_KID`].
    truncated: bool,
    written: Option<Written>,
    /// The first use no write covers yet; `Some` = dirty.
    first_unreported: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default)]
struct KeyState {
    kids: BTreeMap<String, KidState>,
    /// Start of the flush whose write of this key last succeeded.
    last_write: Option<DateTime<Utc>>,
    /// Pages of that write (0: none yet).
    pages_written: u32,
}

impl KeyState {
    fn dirty(&self) -> bool {
        self.kids.values().any(|k| k.first_unreported.is_some())
    }

    fn first_unreported(&self) -> Option<DateTime<Utc>> {
        self.kids.values().filter_map(|k| k.first_unreported).min()
    }
}

/// A report the Lease lists: the seq of its last write, the last use it reported, and its
/// pages (each listed with the seq).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    seq: u64,
    last_used: DateTime<Utc>,
    pages: u32,
}

/// One page of a key's report to write: `page` of `pages`, and its key ids (empty for a
/// superseded page, `page > pages`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub page: u32,
    pub pages: u32,
    pub keys: Vec<KidUsage>,
}

/// Splits a report (key ids with all their pods, most recent first) into pages of at most
/// [`MAX_PODS_PER_KID`] pods per key id: page n holds each key id's pods
/// `[(n-1) * MAX, n * MAX)`, and every page lists every key id with its `lastUsedAt` and
/// `podsTruncated`. Always at least one page; every pod on exactly one.
pub fn paginate(keys: &[KidUsage]) -> Vec<Vec<KidUsage>> {
    let pages = keys
        .iter()
        .map(|k| k.pods.len().div_ceil(MAX_PODS_PER_KID))
        .max()
        .unwrap_or(0)
        .max(1);
    (0..pages)
        .map(|n| {
            keys.iter()
                .map(|k| KidUsage {
                    kid: k.kid.clone(),
                    last_used_at: k.last_used_at.clone(),
                    pods: k
                        .pods
                        .iter()
                        .skip(n * MAX_PODS_PER_KID)
                        .take(MAX_PODS_PER_KID)
                        .cloned()
                        .collect(),
                    pods_truncated: k.pods_truncated,
                })
                .collect()
        })
        .collect()
}

/// The Lease's list of reports ([`usage::ANN_REPORTS`]) as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub reports: BTreeMap<String, u64>,
    /// Not every report fits ([`usage::ANN_REPORTS_OVERFLOW`]).
    pub overflow: bool,
}

/// The reporting state of one replica (pure).
#[derive(Clone, Debug)]
pub struct Reporting {
    resolution: Duration,
    interval: Duration,
    keys: BTreeMap<KeyRef, KeyState>,
    /// The seq of the last successful report write.
    seq: u64,
    /// Reports written (by this incarnation or carried over), for the Lease.
    listed: BTreeMap<KeyRef, Listed>,
    /// Pods evicted past [`MAX_PODS_HELD_PER_KID`] (for the metric).
    evicted: u64,
}

/// A key the index knows: its UID, and whether its bundle lists more than one key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub uid: String,
    pub rotating: bool,
}

fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Reporting {
    pub fn new(interval: Duration, resolution: Duration) -> Self {
        Reporting {
            resolution,
            interval,
            keys: BTreeMap::new(),
            seq: 0,
            listed: BTreeMap::new(),
            evicted: 0,
        }
    }

    /// Pods evicted so far because a key id held [`MAX_PODS_HELD_PER_KID`].
    pub fn pods_evicted(&self) -> u64 {
        self.evicted
    }

    /// The seq the next report write carries.
    pub fn next_seq(&self) -> u64 {
        self.seq.saturating_add(1)
    }

    /// Takes over the list of a previous incarnation's Lease (its reports are still evidence:
    /// their deletion must still be seen), numbering the next writes above it. Entries are
    /// kept until the horizon counted from `now` (their last use is not known).
    pub fn carry_over(&mut self, previous: &BTreeMap<String, u64>, now: DateTime<Utc>) {
        for (listed, seq) in previous {
            let Some((key, page)) = usage::parse_page_key(listed)
                .and_then(|(base, page)| KeyRef::parse(base).map(|k| (k, page)))
            else {
                continue;
            };
            self.seq = self.seq.max(*seq);
            let entry = self.listed.entry(key).or_insert(Listed {
                seq: *seq,
                last_used: now,
                pages: page,
            });
            entry.seq = entry.seq.min(*seq);
            entry.pages = entry.pages.max(page);
        }
    }

    /// The Lease's list at `now`: every report written whose last reported use is within the
    /// longest `revokeWhenUnusedFor` (older ones cannot hold a key back, so are dropped for
    /// good), at most [`usage::MAX_REPORTS_BYTES`] of JSON (the most recently used kept, and
    /// `overflow` set when something had to go).
    pub fn listing(&mut self, now: DateTime<Utc>) -> Listing {
        let horizon = crate::api::limits::REVOKE_WHEN_UNUSED_FOR.duration() + self.resolution;
        self.listed.retain(|_, l| add(l.last_used, horizon) > now);
        let mut entries: Vec<(&KeyRef, &Listed)> = self.listed.iter().collect();
        entries.sort_by(|a, b| b.1.last_used.cmp(&a.1.last_used).then(a.0.cmp(b.0)));
        let mut out = Listing::default();
        // `{}` plus, per entry, `"<key>":<seq>,`. A key's pages fit together or not at all.
        let mut bytes = 2;
        for (key, l) in entries {
            let pages: BTreeMap<String, u64> = (1..=l.pages.max(1))
                .map(|p| (usage::page_key(&key.namespace, &key.name, p), l.seq))
                .collect();
            let len = usage::reports_annotation(&pages).len() - 1;
            if bytes + len > usage::MAX_REPORTS_BYTES {
                out.overflow = true;
                continue;
            }
            bytes += len;
            out.reports.extend(pages);
        }
        out
    }

    /// Whether the report of `key` leaves key ids out ([`MAX_KIDS_PER_REPORT`]).
    pub fn keys_truncated(&self, key: &KeyRef) -> bool {
        self.keys
            .get(key)
            .is_some_and(|s| s.kids.len() > MAX_KIDS_PER_REPORT)
    }

    /// Takes in one use (from the log's drain).
    pub fn absorb(&mut self, used: Use) {
        let resolution = self.resolution;
        let key = self.keys.entry(used.key).or_default();
        let kid = key.kids.entry(used.kid).or_insert_with(|| KidState {
            last_used: used.at,
            pods: BTreeMap::new(),
            truncated: false,
            written: None,
            first_unreported: None,
        });
        kid.last_used = kid.last_used.max(used.at);
        let pod = used.instance.pod_uid().map(str::to_string);
        if let Some(uid) = &pod {
            let at = kid.pods.entry(uid.clone()).or_insert(used.at);
            *at = (*at).max(used.at);
            if kid.pods.len() > MAX_PODS_HELD_PER_KID {
                // Evict the oldest in bulk (a 64th of the bound), so a key id at the bound
                // costs one sort per 1,024 new pods, not one per use.
                kid.truncated = true;
                let keep = MAX_PODS_HELD_PER_KID - MAX_PODS_HELD_PER_KID / 64;
                let mut by_age: Vec<(DateTime<Utc>, String)> =
                    kid.pods.iter().map(|(u, at)| (*at, u.clone())).collect();
                let evict = by_age.len().saturating_sub(keep);
                by_age.select_nth_unstable(evict.saturating_sub(1));
                for (_, uid) in by_age.into_iter().take(evict) {
                    kid.pods.remove(&uid);
                }
                self.evicted = self.evicted.saturating_add(evict as u64);
            }
        }
        let covered = kid.written.as_ref().is_some_and(|w| {
            add(w.last_used, resolution) > used.at
                && pod.as_ref().is_none_or(|uid| w.pods.contains(uid))
        });
        if !covered {
            kid.first_unreported = Some(kid.first_unreported.map_or(used.at, |f| f.min(used.at)));
        }
    }

    /// Forgets keys the index no longer knows (their reports go with the key).
    pub fn retain(&mut self, known: impl Fn(&KeyRef) -> bool) {
        self.keys.retain(|k, _| known(k));
    }

    /// Forgets the key ids of `key` that its trust bundle no longer lists (`trusted`), once
    /// nothing of theirs is left to write and their last use is older than the longest
    /// `revokeWhenUnusedFor` (the CRD's ceiling): without this the set grows by one key id per
    /// rotation for the life of the process. The horizon keeps the evidence of a key id that
    /// someone with ConfigMap rights removes from the bundle for a moment (the operator puts it
    /// back), so its recorded use cannot vanish from the reports and make it look unused.
    pub fn retain_kids(&mut self, key: &KeyRef, trusted: &BTreeSet<String>, now: DateTime<Utc>) {
        if let Some(state) = self.keys.get_mut(key) {
            forget_kids(state, |kid| trusted.contains(kid), now);
        }
    }

    /// [`Self::retain_kids`] for every key held, with the key ids `trusted` gives for it
    /// (`None`: its bundle is not known right now, and it keeps them all). One pass, with
    /// nothing collected: a flush at 10,000 keys used to build a map of every key's trusted
    /// key ids first (megabytes, freed again each second).
    pub fn retain_kids_of_every_key(
        &mut self,
        trusted: impl Fn(&KeyRef) -> Option<Vec<String>>,
        now: DateTime<Utc>,
    ) {
        for (key, state) in &mut self.keys {
            if let Some(kids) = trusted(key) {
                forget_kids(state, |kid| kids.iter().any(|k| k == kid), now);
            }
        }
    }

    /// How many key ids of `key` are held.
    pub fn kid_count(&self, key: &KeyRef) -> usize {
        self.keys.get(key).map_or(0, |s| s.kids.len())
    }

    /// Every key held.
    pub fn keys(&self) -> Vec<KeyRef> {
        self.keys.keys().cloned().collect()
    }

    /// Keys with uses no write covers.
    pub fn dirty_keys(&self) -> Vec<KeyRef> {
        self.keys
            .iter()
            .filter(|(_, s)| s.dirty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The keys to write in the flush starting at `now`, in order: dirty keys whose last write
    /// is at least an interval old (any age when `ignore_interval`, at shutdown) and that the
    /// index knows; rotations in flight first, then the oldest uncovered use first.
    pub fn candidates(
        &self,
        now: DateTime<Utc>,
        ignore_interval: bool,
        target: impl Fn(&KeyRef) -> Option<Target>,
    ) -> Vec<(KeyRef, Target)> {
        let mut out: Vec<(KeyRef, Target, Option<DateTime<Utc>>)> = self
            .keys
            .iter()
            .filter(|(_, s)| s.dirty())
            .filter(|(_, s)| {
                ignore_interval || s.last_write.is_none_or(|w| add(w, self.interval) <= now)
            })
            .filter_map(|(k, s)| target(k).map(|t| (k.clone(), t, s.first_unreported())))
            .collect();
        out.sort_by(|a, b| (!a.1.rotating, a.2, &a.0).cmp(&(!b.1.rotating, b.2, &b.0)));
        out.into_iter().map(|(k, t, _)| (k, t)).collect()
    }

    /// The report of `key` as it stands (every key id, most recent first).
    pub fn report(&self, key: &KeyRef) -> Vec<KidUsage> {
        let Some(state) = self.keys.get(key) else {
            return Vec::new();
        };
        let mut kids: Vec<(&String, &KidState)> = state.kids.iter().collect();
        kids.sort_by(|a, b| b.1.last_used.cmp(&a.1.last_used).then(a.0.cmp(b.0)));
        kids.truncate(MAX_KIDS_PER_REPORT);
        kids.sort_by(|a, b| a.0.cmp(b.0));
        kids.into_iter()
            .map(|(kid, s)| {
                let mut pods: Vec<(&String, &DateTime<Utc>)> = s.pods.iter().collect();
                pods.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                KidUsage {
                    kid: kid.clone(),
                    last_used_at: rfc3339(s.last_used),
                    pods: pods
                        .into_iter()
                        .map(|(uid, at)| PodUsage {
                            uid: uid.clone(),
                            last_used_at: rfc3339(*at),
                        })
                        .collect(),
                    pods_truncated: s.truncated,
                }
            })
            .collect()
    }

    /// The pages of the report of `key` as it stands ([`paginate`] of [`Reporting::report`]),
    /// then, empty, the pages a previous write had beyond them (superseded: rewritten so no
    /// stale page is left saying more than the report does now).
    pub fn pages(&self, key: &KeyRef) -> Vec<Page> {
        let pages = paginate(&self.report(key));
        let total = u32::try_from(pages.len()).unwrap_or(MAX_PAGES);
        let before = self
            .keys
            .get(key)
            .map_or(0, |s| s.pages_written)
            .max(self.listed.get(key).map_or(0, |l| l.pages));
        let mut out: Vec<Page> = (1..)
            .zip(pages)
            .map(|(page, keys)| Page {
                page,
                pages: total,
                keys,
            })
            .collect();
        out.extend((total + 1..=before).map(|page| Page {
            page,
            pages: total,
            keys: Vec::new(),
        }));
        out
    }

    /// Records that the report of `key` as it stands was written, every page of
    /// [`Reporting::pages`], with [`Reporting::next_seq`], in the flush started at `now`.
    pub fn written(&mut self, key: &KeyRef, now: DateTime<Utc>) {
        let pages = paginate(&self.report(key)).len();
        let pages = u32::try_from(pages).unwrap_or(MAX_PAGES);
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        self.seq = self.seq.saturating_add(1);
        let last_used = state
            .kids
            .values()
            .map(|k| k.last_used)
            .max()
            .unwrap_or(now);
        self.listed.insert(
            key.clone(),
            Listed {
                seq: self.seq,
                last_used,
                pages,
            },
        );
        state.last_write = Some(now);
        state.pages_written = pages;
        for kid in state.kids.values_mut() {
            kid.written = Some(Written {
                last_used: kid.last_used,
                pods: kid.pods.keys().cloned().collect(),
            });
            kid.first_unreported = None;
        }
    }

    /// The watermark after the flush started at `start` (every use absorbed is at or before
    /// it): `start` when nothing dirty is left, else the oldest use no write covers.
    pub fn watermark(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        self.keys
            .values()
            .filter_map(KeyState::first_unreported)
            .min()
            .map_or(start, |f| f.min(start))
    }

    /// Number of keys held (for the log).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A token bucket over the caller's clock: `rate` tokens per second, at most `burst`.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<DateTime<Utc>>,
}

impl Bucket {
    pub fn new(rate: f32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: f64::from(rate).max(0.0),
            burst,
            tokens: burst,
            at: None,
        }
    }

    fn refill(&mut self, now: DateTime<Utc>) {
        if let Some(at) = self.at
            && now > at
        {
            let secs = (now - at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
            self.tokens = (self.tokens + secs * self.rate).min(self.burst);
        }
        self.at = Some(self.at.map_or(now, |a| a.max(now)));
    }

    /// Takes `n` more tokens at once, going into debt if need be (the pages of a key after its
    /// first: a key's pages are written together, and later writes wait the debt off).
    pub fn charge(&mut self, now: DateTime<Utc>, n: u32) {
        self.refill(now);
        self.tokens -= f64::from(n);
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: DateTime<Utc>) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is available (zero if one is).
    pub fn wait(&mut self, now: DateTime<Utc>) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else if self.rate <= 0.0 {
            Duration::MAX
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// A Go duration for the Lease annotation (`60s`, `1500ms`).
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The desired Lease of this incarnation (holder, window start, watermark, annotations).
pub fn desired_lease(
    config: &ReportConfig,
    holder: &str,
    since: DateTime<Utc>,
    watermark: DateTime<Utc>,
    stopped: bool,
    listing: &Listing,
) -> (
    LeaseSpec,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
) {
    let secs = config.interval.as_secs().saturating_mul(3).max(1);
    let spec = LeaseSpec {
        holder_identity: Some(holder.to_string()),
        acquire_time: usage::chrono_to_jiff(since).map(MicroTime),
        renew_time: usage::chrono_to_jiff(watermark).map(MicroTime),
        lease_duration_seconds: Some(i32::try_from(secs).unwrap_or(i32::MAX)),
        ..LeaseSpec::default()
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(
        usage::ANN_NAMESPACES.to_string(),
        if config.namespaces.is_empty() {
            "*".to_string()
        } else {
            config.namespaces.join(",")
        },
    );
    annotations.insert(
        usage::ANN_RESOLUTION.to_string(),
        go_duration(config.resolution),
    );
    if stopped {
        annotations.insert(usage::ANN_STOPPED.to_string(), "true".into());
    }
    annotations.insert(
        usage::ANN_REPORTS.to_string(),
        usage::reports_annotation(&listing.reports),
    );
    if listing.overflow {
        annotations.insert(usage::ANN_REPORTS_OVERFLOW.to_string(), "true".into());
    }
    let mut labels = BTreeMap::new();
    labels.insert(
        crate::labels::COMPONENT.to_string(),
        usage::COMPONENT_VERIFIER.to_string(),
    );
    labels.insert(
        crate::labels::MANAGED_BY.to_string(),
        crate::labels::MANAGED_BY_VALUE.to_string(),
    );
    (spec, annotations, labels)
}

/// Forgets the key ids of one key that are not `trusted`, written, and unused for longer than
/// the longest `revokeWhenUnusedFor` ([`Reporting::retain_kids`]).
fn forget_kids(state: &mut KeyState, trusted: impl Fn(&str) -> bool, now: DateTime<Utc>) {
    let horizon = crate::api::limits::REVOKE_WHEN_UNUSED_FOR.duration();
    state.kids.retain(|kid, s| {
        trusted(kid) || s.first_unreported.is_some() || add(s.last_used, horizon) > now
    });
}

/// Adds the heartbeat to a Lease's annotations: alive at `at`, with `pending` reports still to
/// write ([`usage::ANN_HEARTBEAT`], [`usage::ANN_PENDING`]).
pub fn heartbeat(annotations: &mut BTreeMap<String, String>, at: DateTime<Utc>, pending: usize) {
    annotations.insert(
        usage::ANN_HEARTBEAT.to_string(),
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    annotations.insert(usage::ANN_PENDING.to_string(), pending.to_string());
}

/// Page `page` of the report object of `replica` for `key` (server-side apply body), write
/// number `seq`.
pub fn report_object(
    replica: &str,
    key: &KeyRef,
    uid: &str,
    page: Page,
    seq: u64,
    keys_truncated: bool,
) -> KeyUsageReport {
    let name = usage::report_page_name(&key.name, replica, page.page);
    let mut annotations = BTreeMap::new();
    annotations.insert(usage::ANN_REPORT_SEQ.to_string(), seq.to_string());
    // Always present, so a later write that lists every key id clears it (server-side apply).
    // A superseded page lists nothing, so leaves nothing out.
    annotations.insert(
        usage::ANN_KEYS_TRUNCATED.to_string(),
        (keys_truncated && page.page <= page.pages).to_string(),
    );
    let mut labels = BTreeMap::new();
    labels.insert(
        crate::labels::MANAGED_BY.to_string(),
        crate::labels::MANAGED_BY_VALUE.to_string(),
    );
    labels.insert(
        crate::labels::PROVISIONING_KEY.to_string(),
        key.name.clone(),
    );
    labels.insert(usage::REPLICA_LABEL.to_string(), replica.to_string());
    let mut report = KeyUsageReport::new(
        &name,
        KeyUsageReportSpec {
            provisioning_key: key.name.clone(),
            replica: replica.to_string(),
            page: page.page,
            pages: page.pages,
            keys: page.keys,
        },
    );
    report.metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(key.namespace.clone()),
        labels: Some(labels),
        annotations: Some(annotations),
        owner_references: Some(vec![OwnerReference {
            api_version: "keyward.dev/v1alpha1".into(),
            kind: "ProvisioningKey".into(),
            name: key.name.clone(),
            uid: uid.to_string(),
            controller: Some(false),
            block_owner_deletion: Some(false),
        }]),
        ..ObjectMeta::default()
    };
    report
}

mod driver;
pub use driver::{ReportConfig, ReportError, run};

#[cfg(test)]
mod tests;
