use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;
use crate::verifier::use_log::{Instance, MemoryUseLog, Use, UseLog};

const INTERVAL: Duration = Duration::from_secs(10);
const RESOLUTION: Duration = Duration::from_secs(60);

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("time")
}

fn t_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_800_000_000_000 + ms).expect("time")
}

fn key(name: &str) -> KeyRef {
    KeyRef::new("ns", name)
}

fn pod(n: u32) -> Instance {
    Instance::Pod(format!("00000000-0000-4000-8000-{n:012}"))
}

fn used(k: &str, kid: &str, instance: Instance, at: DateTime<Utc>) -> Use {
    Use {
        key: key(k),
        kid: kid.into(),
        instance,
        at,
    }
}

fn known(_: &KeyRef) -> Option<Target> {
    Some(Target {
        uid: "uid".into(),
        rotating: false,
    })
}

/// One flush as the driver runs it, without a bucket: the keys written, and the watermark.
fn flush(
    state: &mut Reporting,
    log: &MemoryUseLog,
    start: DateTime<Utc>,
) -> (Vec<KeyRef>, DateTime<Utc>) {
    for u in log.drain(start) {
        state.absorb(u);
    }
    let keys: Vec<KeyRef> = state
        .candidates(start, false, known)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for k in &keys {
        state.written(k, start);
    }
    (keys, state.watermark(start))
}

#[test]
fn a_flood_within_an_interval_makes_one_write() {
    let log = MemoryUseLog::new(1000);
    let mut state = Reporting::new(INTERVAL, Duration::ZERO); // every use newer than the report
    let mut writes = 0;
    // 10,000 requests for one key, one per millisecond, over 10 s; flushes every 10 s.
    for i in 0..10_000 {
        log.record(used("pk", "kid-a", pod(i % 3), t_ms(i64::from(i))));
    }
    let (keys, _) = flush(&mut state, &log, t(10));
    writes += keys.len();
    assert_eq!(writes, 1);
    // The flood goes on; a flush every second (faster than the interval) writes at most
    // once per interval.
    for s in 11..=40 {
        for i in 0..1000 {
            log.record(used(
                "pk",
                "kid-a",
                pod(i % 3),
                t_ms(s * 1000 - 1000 + i64::from(i)),
            ));
        }
        let (keys, _) = flush(&mut state, &log, t(s));
        writes += keys.len();
    }
    // t=10 (first), then 20, 30, 40.
    assert_eq!(writes, 4);
}

#[test]
fn a_new_pod_or_key_id_makes_the_key_dirty_at_once_but_repeated_use_does_not() {
    let log = MemoryUseLog::new(100);
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    log.record(used("pk", "kid-a", pod(1), t(1)));
    assert_eq!(flush(&mut state, &log, t(10)).0, vec![key("pk")]);
    // The same pod again, within the resolution: nothing to write, the watermark advances.
    log.record(used("pk", "kid-a", pod(1), t(25)));
    let (keys, watermark) = flush(&mut state, &log, t(30));
    assert!(keys.is_empty());
    assert_eq!(watermark, t(30));
    // A new pod: written at the next flush.
    log.record(used("pk", "kid-a", pod(2), t(31)));
    assert!(state.dirty_keys().is_empty(), "not drained yet");
    let (keys, watermark) = flush(&mut state, &log, t(40));
    assert_eq!(keys, vec![key("pk")]);
    assert_eq!(watermark, t(40));
    let report = state.report(&key("pk"));
    assert_eq!(report.len(), 1);
    let uids: Vec<&str> = report[0].pods.iter().map(|p| p.uid.as_str()).collect();
    assert_eq!(
        uids,
        vec![
            "00000000-0000-4000-8000-000000000002",
            "00000000-0000-4000-8000-000000000001"
        ]
    );
    // A new key id.
    log.record(used("pk", "kid-b", Instance::Unattributed, t(45)));
    assert_eq!(flush(&mut state, &log, t(50)).0, vec![key("pk")]);
    let report = state.report(&key("pk"));
    assert_eq!(report.len(), 2);
    assert!(
        report[1].pods.is_empty(),
        "unattributed use never counts as a pod"
    );
    assert_eq!(report[1].last_used_at, "2027-01-15T08:00:45Z");
}

#[test]
fn last_used_at_is_refreshed_at_the_resolution() {
    let log = MemoryUseLog::new(100);
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    log.record(used("pk", "kid-a", Instance::Unattributed, t(0)));
    assert_eq!(flush(&mut state, &log, t(10)).0.len(), 1);
    // 59 s newer than the reported use: covered.
    log.record(used("pk", "kid-a", Instance::Unattributed, t(59)));
    let (keys, watermark) = flush(&mut state, &log, t(60));
    assert!(keys.is_empty());
    assert_eq!(watermark, t(60));
    // 60 s newer: dirty, written.
    log.record(used("pk", "kid-a", Instance::Unattributed, t(60)));
    let (keys, _) = flush(&mut state, &log, t(70));
    assert_eq!(keys.len(), 1);
    assert_eq!(
        state.report(&key("pk"))[0].last_used_at,
        "2027-01-15T08:01:00Z"
    );
}

#[test]
fn the_watermark_never_passes_an_unreported_use() {
    let log = MemoryUseLog::new(100);
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    log.record(used("a", "kid-a", pod(1), t(1)));
    flush(&mut state, &log, t(5));
    // A new pod at 7, then a flush at 9: the key was written at 5, so not again before 15;
    // the watermark stays at the uncovered use.
    log.record(used("a", "kid-a", pod(2), t(7)));
    log.record(used("a", "kid-a", pod(3), t(8)));
    let (keys, watermark) = flush(&mut state, &log, t(9));
    assert!(keys.is_empty());
    assert_eq!(watermark, t(7));
    // Another key written meanwhile does not move it.
    log.record(used("b", "kid-b", pod(1), t(10)));
    let (keys, watermark) = flush(&mut state, &log, t(12));
    assert_eq!(keys, vec![key("b")]);
    assert_eq!(watermark, t(7));
    let (keys, watermark) = flush(&mut state, &log, t(15));
    assert_eq!(keys, vec![key("a")]);
    assert_eq!(watermark, t(15));
}

#[test]
fn a_failed_write_keeps_the_entry_dirty() {
    let log = MemoryUseLog::new(100);
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    log.record(used("pk", "kid-a", pod(1), t(3)));
    for u in log.drain(t(10)) {
        state.absorb(u);
    }
    assert_eq!(state.candidates(t(10), false, known).len(), 1);
    // The write failed: `written` is not called.
    assert_eq!(state.watermark(t(10)), t(3));
    assert_eq!(state.dirty_keys(), vec![key("pk")]);
    // Retried at the next flush (no successful write yet, so no interval to wait).
    assert_eq!(state.candidates(t(11), false, known).len(), 1);
    state.written(&key("pk"), t(20));
    assert_eq!(state.watermark(t(20)), t(20));
}

#[test]
fn unknown_keys_are_skipped_and_forgotten() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    state.absorb(used("gone", "kid-a", pod(1), t(1)));
    state.absorb(used("pk", "kid-a", pod(1), t(2)));
    let only_pk = |k: &KeyRef| (k.name == "pk").then(|| known(k)).flatten();
    let c = state.candidates(t(10), false, only_pk);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, key("pk"));
    state.retain(|k| k.name == "pk");
    assert_eq!(state.len(), 1);
    assert_eq!(state.watermark(t(10)), t(2));
}

#[test]
fn keys_with_a_rotation_in_flight_go_first_and_the_bucket_bounds_a_flush() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        state.absorb(used(
            name,
            "kid",
            pod(1),
            t(i64::try_from(i).expect("small")),
        ));
    }
    let target = |k: &KeyRef| {
        Some(Target {
            uid: format!("uid-{}", k.name),
            rotating: k.name == "c" || k.name == "d",
        })
    };
    let order: Vec<String> = state
        .candidates(t(10), false, target)
        .into_iter()
        .map(|(k, _)| k.name)
        .collect();
    assert_eq!(order, vec!["c", "d", "a", "b"]);
    // A bucket of 2 tokens at 1/s: two writes now, the rest stay dirty.
    let mut bucket = Bucket::new(1.0, 2);
    let mut written = Vec::new();
    for (k, _) in state.candidates(t(10), false, target) {
        if !bucket.take(t(10)) {
            break;
        }
        written.push(k.name.clone());
        state.written(&k, t(10));
    }
    assert_eq!(written, vec!["c", "d"]);
    assert_eq!(state.watermark(t(10)), t(0));
    assert_eq!(bucket.wait(t(10)), Duration::from_secs(1));
    assert!(bucket.take(t(11)));
    assert!(!bucket.take(t(11)));
}

#[test]
fn the_bucket_refills_at_its_rate_up_to_its_burst() {
    let mut b = Bucket::new(50.0, 100);
    let n = (0..1000).filter(|_| b.take(t(0))).count();
    assert_eq!(n, 100);
    // One second later: 50 more, never more than the burst after a long pause.
    let n = (0..1000).filter(|_| b.take(t(1))).count();
    assert_eq!(n, 50);
    let n = (0..1000).filter(|_| b.take(t(1000))).count();
    assert_eq!(n, 100);
}

/// Finding "past 256 UIDs acknowledgements are truncated": the report pages instead. 1,000
/// pods on one key id make 4 pages of at most 256 pods each, every UID on exactly one page, and
/// every page repeats the key id's `lastUsedAt`; shrinking to 100 pods rewrites pages 2-4 empty
/// (superseded) in the same write, and the Lease lists each page with the write's number.
#[test]
fn a_report_pages_past_the_per_object_cap_and_never_drops_a_pod() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    for i in 0..1000 {
        state.absorb(used("pk", "kid", pod(i), t(i64::from(i))));
    }
    state.absorb(used("pk", "other", Instance::Unattributed, t(5)));
    let pages = state.pages(&key("pk"));
    assert_eq!(pages.len(), 4);
    let mut seen = std::collections::BTreeMap::new();
    for (n, p) in (1..).zip(&pages) {
        assert_eq!((p.page, p.pages), (n, 4));
        let kid = p
            .keys
            .iter()
            .find(|k| k.kid == "kid")
            .expect("kid on every page");
        assert!(kid.pods.len() <= MAX_PODS_PER_KID);
        assert!(!kid.pods_truncated);
        assert_eq!(
            kid.last_used_at,
            rfc3339(t(999)),
            "page {n} understates use"
        );
        let other = p
            .keys
            .iter()
            .find(|k| k.kid == "other")
            .expect("other on every page");
        assert_eq!(other.last_used_at, rfc3339(t(5)));
        for pod in &kid.pods {
            *seen.entry(pod.uid.clone()).or_insert(0) += 1;
        }
        // Every page is a valid object of its own.
        let obj = report_object("verifier-0", &key("pk"), "uid", p.clone(), 3, false);
        assert_eq!(
            obj.metadata.name.as_deref(),
            Some(usage::report_page_name("pk", "verifier-0", n).as_str())
        );
        assert_eq!(usage::report_seq(&obj), Some(3));
    }
    assert_eq!(seen.len(), 1000, "every UID on some page");
    assert!(seen.values().all(|c| *c == 1), "every UID on one page only");
    assert_eq!(pages[3].keys[0].pods.len(), 1000 - 3 * MAX_PODS_PER_KID);
    // Most recent first: page 1 holds the newest.
    assert_eq!(
        pages[0].keys[0].pods[0].uid,
        pod(999).pod_uid().expect("pod")
    );

    // Written: the Lease lists every page with the write's number.
    assert_eq!(state.next_seq(), 1);
    state.written(&key("pk"), t(1000));
    let listed = state.listing(t(1001)).reports;
    assert_eq!(
        listed,
        BTreeMap::from([
            ("ns/pk".to_string(), 1),
            ("ns/pk#2".to_string(), 1),
            ("ns/pk#3".to_string(), 1),
            ("ns/pk#4".to_string(), 1),
        ])
    );

    // Shrinks to 100 pods (the others gone from memory, as after a restart that carried the
    // list over): one page, and pages 2-4 rewritten empty, superseded, with the same write.
    let mut next = Reporting::new(INTERVAL, RESOLUTION);
    next.carry_over(&listed, t(2000));
    for i in 0..100 {
        next.absorb(used("pk", "kid", pod(i), t(2000)));
    }
    let pages = next.pages(&key("pk"));
    assert_eq!(
        pages.iter().map(|p| (p.page, p.pages)).collect::<Vec<_>>(),
        [(1, 1), (2, 1), (3, 1), (4, 1)]
    );
    assert_eq!(pages[0].keys[0].pods.len(), 100);
    assert!(pages[1..].iter().all(|p| p.keys.is_empty()));
    let superseded = report_object("verifier-0", &key("pk"), "uid", pages[1].clone(), 2, true);
    assert_eq!(
        superseded
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(usage::ANN_KEYS_TRUNCATED))
            .map(String::as_str),
        Some("false"),
        "a superseded page lists nothing, so leaves nothing out"
    );
    assert_eq!(next.next_seq(), 2);
    next.written(&key("pk"), t(2000));
    assert_eq!(
        next.listing(t(2001)).reports,
        BTreeMap::from([("ns/pk".to_string(), 2)])
    );
    // Superseded once: the next write is one page only.
    next.absorb(used("pk", "kid", pod(5000), t(2010)));
    assert_eq!(next.pages(&key("pk")).len(), 1);
}

#[test]
fn pods_are_held_up_to_the_memory_bound_most_recent_kept_and_the_log_stays_bounded() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    let cap = u32::try_from(MAX_PODS_HELD_PER_KID).expect("small");
    // Far past the per-page cap: nothing is dropped.
    for i in 0..1000 {
        state.absorb(used("pk", "kid", pod(i), t(0)));
    }
    assert_eq!(state.report(&key("pk"))[0].pods.len(), 1000);
    assert!(!state.report(&key("pk"))[0].pods_truncated);
    assert_eq!(state.pods_evicted(), 0);
    // Past the memory bound: the oldest are evicted, counted, and the report says so on
    // every page.
    for i in 1000..=cap {
        state.absorb(used("pk", "kid", pod(i), t(i64::from(i))));
    }
    let report = state.report(&key("pk"));
    assert!(report[0].pods.len() <= MAX_PODS_HELD_PER_KID);
    assert!(report[0].pods_truncated);
    let evicted = u64::try_from(MAX_PODS_HELD_PER_KID + 1 - report[0].pods.len()).expect("small");
    assert_eq!(state.pods_evicted(), evicted);
    assert_eq!(report[0].pods[0].uid, pod(cap).pod_uid().expect("pod"));
    assert!(
        report[0]
            .pods
            .iter()
            .all(|p| p.uid != pod(999).pod_uid().expect("pod")),
        "the oldest go first"
    );
    let pages = state.pages(&key("pk"));
    assert_eq!(pages.len(), report[0].pods.len().div_ceil(MAX_PODS_PER_KID));
    assert!(pages.len() <= MAX_PAGES as usize);
    assert!(pages.iter().all(|p| p.keys[0].pods_truncated));
    // The log's capacity still applies between drains, and drops are counted: past it a use
    // loses its pod but not its key id (one unattributed entry per key id).
    let log = MemoryUseLog::new(5);
    for i in 0..20 {
        log.record(used("pk", "kid", pod(i), t(1)));
    }
    assert_eq!(log.dropped(), 15);
    assert_eq!(log.drain(t(2)).len(), 6);
}

/// Both kinds of dropped pod are metrics, so none is silent.
#[test]
fn dropped_pods_are_counted_as_metrics() {
    let stats = crate::verifier::Stats::default();
    stats.pods_dropped(crate::verifier::stats::DROPPED_USE_LOG, 15);
    stats.pods_dropped(crate::verifier::stats::DROPPED_USE_LOG, 15);
    stats.pods_dropped(crate::verifier::stats::DROPPED_REPORT_BOUND, 3);
    assert_eq!(
        stats.pods_dropped_total(crate::verifier::stats::DROPPED_USE_LOG),
        15
    );
    let text = stats.encode().expect("encode");
    assert!(
        text.contains(r#"keyward_verifier_pods_dropped_total{stage="use_log"} 15"#),
        "{text}"
    );
    assert!(
        text.contains(r#"keyward_verifier_pods_dropped_total{stage="report_bound"} 3"#),
        "{text}"
    );
}

/// A key's pages go to the bucket together: the first takes a token, the rest go into debt
/// that later writes wait off, so the average stays at the rate.
#[test]
fn a_keys_pages_are_charged_to_the_bucket() {
    let mut b = Bucket::new(2.0, 2);
    assert!(b.take(t(0)));
    b.charge(t(0), 3);
    // 2 - 1 - 3 = -2 tokens: 3 to earn back at 2/s before the next write.
    assert!(!b.take(t(0)));
    assert_eq!(b.wait(t(0)), Duration::from_millis(1500));
    assert!(!b.take(t_ms(1499)));
    assert!(b.take(t_ms(1500)));
}

/// Issue 18, finding 8: the key id set is bounded by the bundle and the longest
/// `revokeWhenUnusedFor`, not by the process's life.
#[test]
fn key_ids_the_bundle_dropped_are_forgotten_once_written_and_long_unused() {
    let horizon = i64::try_from(
        crate::api::limits::REVOKE_WHEN_UNUSED_FOR
            .duration()
            .as_secs(),
    )
    .expect("small");
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    state.absorb(used("pk", "k1", pod(1), t(1)));
    state.absorb(used("pk", "k2", pod(1), t(2)));
    let trusted: std::collections::BTreeSet<String> = ["k2".to_string()].into();
    // k1 is dirty: kept until written; written but used within the horizon: kept (someone
    // who removes it from the bundle for a moment cannot erase its use).
    state.retain_kids(&key("pk"), &trusted, t(3));
    assert_eq!(state.report(&key("pk")).len(), 2);
    state.written(&key("pk"), t(3));
    state.retain_kids(&key("pk"), &trusted, t(horizon));
    assert_eq!(state.report(&key("pk")).len(), 2);
    // Past the horizon: forgotten. In the flush's form, over every key held: a key whose
    // bundle is not known right now (`other`) keeps all its key ids.
    state.absorb(used("other", "o1", pod(1), t(1)));
    state.written(&key("other"), t(1));
    state.retain_kids_of_every_key(
        |k| (k.name == "pk").then(|| trusted.iter().cloned().collect()),
        t(2 + horizon),
    );
    let report = state.report(&key("pk"));
    assert_eq!(
        report.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
        vec!["k2"]
    );
    assert_eq!(state.kid_count(&key("other")), 1);
    // A new use of a forgotten key id (a stale view) is absorbed and reported again.
    state.absorb(used("pk", "k1", pod(1), t(3 + horizon)));
    assert_eq!(state.report(&key("pk")).len(), 2);
    // Rotation after rotation, the set stays at what the bundle lists plus the horizon.
    let hour = 3600;
    for i in 0..2000 {
        let kid = format!("r{i}");
        let at = t(10 + horizon + i * hour);
        state.absorb(used("pk", &kid, pod(1), at));
        state.written(&key("pk"), at);
        let trusted: std::collections::BTreeSet<String> = [kid].into();
        state.retain_kids(&key("pk"), &trusted, at);
    }
    let held = state.report(&key("pk")).len();
    assert!(held <= 64, "{held}"); // the report's own cap
    assert!(
        state.kid_count(&key("pk")) <= 721,
        "{}",
        state.kid_count(&key("pk"))
    );
}

#[test]
fn the_report_and_the_lease_say_what_the_operator_reads() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    state.absorb(used("pk", "kid-a", pod(1), t(1)));
    let page = state.pages(&key("pk")).remove(0);
    let obj = report_object("verifier-0", &key("pk"), "uid-1", page, 7, false);
    assert_eq!(usage::report_seq(&obj), Some(7));
    assert_eq!(obj.metadata.name.as_deref(), Some("pk.verifier-0"));
    let owner = &obj.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("ProvisioningKey", "uid-1")
    );
    assert_eq!(owner.controller, Some(false));
    let labels = obj.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(usage::REPLICA_LABEL).map(String::as_str),
        Some("verifier-0")
    );
    assert_eq!(
        labels
            .get(crate::labels::PROVISIONING_KEY)
            .map(String::as_str),
        Some("pk")
    );
    assert_eq!(obj.spec.keys[0].kid, "kid-a");

    let config = ReportConfig {
        replica: "verifier-0".into(),
        lease_namespace: "kw".into(),
        namespaces: vec!["a".into(), "b".into()],
        interval: INTERVAL,
        resolution: Duration::from_millis(1500),
        qps: 50.0,
        burst: 100,
    };
    let listing = Listing {
        reports: BTreeMap::from([("ns/pk".to_string(), 7)]),
        overflow: false,
    };
    let (spec, ann, labels) = desired_lease(&config, "verifier-0/x", t(0), t(20), true, &listing);
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(usage::lease_name("verifier-0")),
            annotations: Some(ann),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
    };
    let parsed = usage::parse_lease(&lease).expect("the operator parses it");
    assert_eq!(parsed.name, "verifier-0");
    assert_eq!((parsed.since, parsed.watermark), (t(0), t(20)));
    assert_eq!(parsed.lease_duration, Duration::from_secs(30));
    assert_eq!(parsed.resolution, Duration::from_millis(1500));
    assert!(parsed.stopped);
    assert!(parsed.watches("a") && !parsed.watches("c"));
    assert_eq!(parsed.reports, listing.reports);
    assert!(!parsed.reports_overflow);
}

/// Issue 18, finding 4: each write is numbered, the Lease lists what was written (with the
/// number) only once written, a restart carries the list over and numbers above it, a key is
/// listed until its last use is older than the longest window, and the list is bounded.
#[test]
fn the_lease_lists_each_written_report_with_its_write_number() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    state.absorb(used("a", "kid", pod(1), t(1)));
    state.absorb(used("b", "kid", pod(1), t(1)));
    assert_eq!(state.next_seq(), 1);
    // Not written yet: not listed.
    assert!(state.listing(t(2)).reports.is_empty());
    state.written(&key("a"), t(10));
    state.written(&key("b"), t(10));
    let l = state.listing(t(11));
    assert_eq!(
        l.reports,
        BTreeMap::from([("ns/a".to_string(), 1), ("ns/b".to_string(), 2)])
    );
    assert!(!l.overflow);
    state.absorb(used("a", "kid", pod(2), t(20)));
    assert_eq!(state.next_seq(), 3);
    state.written(&key("a"), t(20));
    assert_eq!(state.listing(t(21)).reports.get("ns/a"), Some(&3));

    // A new incarnation: the previous list is carried over and numbered above.
    let mut next = Reporting::new(INTERVAL, RESOLUTION);
    next.carry_over(&state.listing(t(30)).reports, t(30));
    assert_eq!(next.next_seq(), 4);
    assert_eq!(next.listing(t(31)).reports, state.listing(t(31)).reports);

    // Dropped once the last reported use is older than the longest window (plus resolution).
    let horizon = crate::api::limits::REVOKE_WHEN_UNUSED_FOR.duration() + RESOLUTION;
    let l = state.listing(add(t(1), horizon));
    assert_eq!(l.reports.keys().collect::<Vec<_>>(), ["ns/a"]);
    assert!(state.listing(add(t(20), horizon)).reports.is_empty());
}

#[test]
fn the_lease_list_is_bounded_and_says_when_it_overflowed() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    let long = "k".repeat(200);
    let n = usage::MAX_REPORTS_BYTES / 200 + 10;
    for i in 0..n {
        let name = format!("{long}{i}");
        state.absorb(used(
            &name,
            "kid",
            pod(1),
            t(i64::try_from(i).expect("small")),
        ));
        state.written(&key(&name), t(10_000));
    }
    let l = state.listing(t(10_001));
    assert!(l.overflow);
    assert!(usage::reports_annotation(&l.reports).len() <= usage::MAX_REPORTS_BYTES);
    // The most recently used are kept.
    assert!(l.reports.contains_key(&format!("ns/{long}{}", n - 1)));
    assert!(!l.reports.contains_key(&format!("ns/{long}0")));
}

#[test]
fn a_report_with_more_key_ids_than_it_holds_says_so() {
    let mut state = Reporting::new(INTERVAL, RESOLUTION);
    for i in 0..MAX_KIDS_PER_REPORT {
        state.absorb(used(
            "pk",
            &format!("kid-{i}"),
            Instance::Unattributed,
            t(1),
        ));
    }
    assert!(!state.keys_truncated(&key("pk")));
    state.absorb(used("pk", "one-more", Instance::Unattributed, t(2)));
    assert!(state.keys_truncated(&key("pk")));
    assert_eq!(state.report(&key("pk")).len(), MAX_KIDS_PER_REPORT);
    let page = state.pages(&key("pk")).remove(0);
    let obj = report_object("v-0", &key("pk"), "uid", page, 1, true);
    assert_eq!(
        obj.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(usage::ANN_KEYS_TRUNCATED))
            .map(String::as_str),
        Some("true")
    );
}
