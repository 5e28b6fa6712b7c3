use super::*;
use crate::api::key_usage::{KeyUsageReportSpec, KidUsage, PodUsage};
use proptest::prelude::*;

fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + secs, 0).expect("time")
}

fn replica(name: &str, since: i64, watermark: i64) -> Replica {
    Replica {
        name: name.into(),
        since: t(since),
        watermark: t(watermark),
        lease_duration: Duration::from_secs(30),
        namespaces: None,
        resolution: Duration::from_secs(10),
        stopped: false,
        reports: BTreeMap::new(),
        reports_overflow: false,
        heartbeat: None,
        pending: 0,
    }
}

/// [`replica`] whose Lease lists its report of `pk` in `ns` at write `seq`.
fn listing(mut r: Replica, seq: u64) -> Replica {
    r.reports.insert(report_key("ns", "pk"), seq);
    r
}

/// [`report`] numbered `seq` (and `truncated`: it left key ids out).
fn numbered(mut r: KeyUsageReport, seq: u64, truncated: bool) -> KeyUsageReport {
    let ann = r.metadata.annotations.get_or_insert_with(Default::default);
    ann.insert(ANN_REPORT_SEQ.into(), seq.to_string());
    ann.insert(ANN_KEYS_TRUNCATED.into(), truncated.to_string());
    r
}

fn report(replica: &str, kid: &str, at: i64, pods: &[&str]) -> KeyUsageReport {
    KeyUsageReport::new(
        &report_name("pk", replica),
        KeyUsageReportSpec {
            provisioning_key: "pk".into(),
            replica: replica.into(),
            page: 1,
            pages: 1,
            keys: vec![KidUsage {
                kid: kid.into(),
                last_used_at: crate::time::ts(t(at)),
                pods: pods
                    .iter()
                    .map(|u| PodUsage {
                        uid: (*u).into(),
                        last_used_at: crate::time::ts(t(at)),
                    })
                    .collect(),
                pods_truncated: false,
            }],
        },
    )
}

const W: Duration = Duration::from_secs(300);

#[test]
fn unused_verdicts() {
    let ok = |rs: Vec<Replica>| rs.into_iter().map(Ok).collect::<Vec<_>>();
    let mut stopped = replica("b", 0, 100);
    stopped.stopped = true;
    let mut elsewhere = replica("b", 900, 990);
    elsewhere.namespaces = Some(["other".to_string()].into());
    let used_at_600 = key_use(&[report("a", "old", 600, &[])], &[], "ns", "pk", t(1000));
    let used_at_700 = key_use(&[report("a", "old", 700, &[])], &[], "ns", "pk", t(1000));
    let used_at_690 = key_use(&[report("a", "old", 690, &[])], &[], "ns", "pk", t(1000));
    let used_at_675_by_b = key_use(&[report("b", "old", 675, &[])], &[], "ns", "pk", t(0));
    let never = KeyUse::default();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<Result<Replica, String>>, &KeyUse, i64, &str)> = vec![
        ("no replica at all", vec![], &never, 1000, "silent"),
        (
            "one replica, quiet for the window",
            ok(vec![replica("a", 0, 995)]),
            &never,
            1000,
            "yes",
        ),
        (
            "used inside the window",
            ok(vec![replica("a", 0, 995)]),
            &used_at_700,
            1000,
            "in-use",
        ),
        (
            "used before the window, plus resolution",
            ok(vec![replica("a", 0, 995)]),
            &used_at_690,
            1000,
            "in-use",
        ),
        (
            "used long before the window",
            ok(vec![replica("a", 0, 995)]),
            &used_at_600,
            1000,
            "yes",
        ),
        (
            "watermark older than the lease",
            ok(vec![replica("a", 0, 995)]),
            &used_at_600,
            1400,
            "silent",
        ),
        (
            "replica restarted inside the window",
            ok(vec![replica("a", 800, 995)]),
            &never,
            1000,
            "warming",
        ),
        (
            "a second replica is silent",
            ok(vec![replica("a", 0, 995), replica("b", 0, 900)]),
            &never,
            1000,
            "silent",
        ),
        (
            "a second replica stopped cleanly",
            ok(vec![replica("a", 0, 995), stopped]),
            &never,
            1000,
            "yes",
        ),
        (
            "a replica watching another namespace",
            ok(vec![replica("a", 0, 995), elsewhere]),
            &never,
            1000,
            "yes",
        ),
        (
            "an unreadable Lease",
            vec![Ok(replica("a", 0, 995)), Err("bad".into())],
            &never,
            1000,
            "silent",
        ),
        (
            "the lagging watermark is the one that counts",
            ok(vec![replica("a", 0, 995), replica("b", 0, 980)]),
            &used_at_675_by_b,
            1000,
            "in-use",
        ),
    ];
    for (name, leases, usage, now, want) in cases {
        let cov = coverage(&leases, &[], "ns", t(now));
        let got = match unused_for(W, "old", usage, &cov) {
            Unused::Yes => "yes",
            Unused::InUse { .. } => "in-use",
            Unused::Warming { .. } => "warming",
            Unused::Unproven { .. } => "unproven",
            Unused::Silent(_) => "silent",
            Unused::Behind(_) => "behind",
        };
        assert_eq!(got, want, "{name}: {cov:?}");
    }
}

/// Issue 18, finding 4: a report that a Lease lists but that is missing, older than listed
/// or unnumbered, a Lease whose list overflowed, and a report that left key ids out, make the
/// key ids concerned used at the evaluation time: never unused. Everything else as before.
#[test]
fn missing_stale_or_incomplete_reports_count_as_used_now() {
    // Replica a: quiet for the window (watermark 995, started at 0); "old" last used at 600.
    let quiet = |seq: u64, trunc: bool| numbered(report("a", "old", 600, &[]), seq, trunc);
    let other_kid = |seq: u64, trunc: bool| numbered(report("a", "other", 600, &[]), seq, trunc);
    let mut overflowed = replica("a", 0, 995);
    overflowed.reports_overflow = true;
    let mut overflowed_elsewhere = overflowed.clone();
    overflowed_elsewhere.namespaces = Some(["other".to_string()].into());
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<Replica>, Vec<KeyUsageReport>, &str)> = vec![
        (
            "listed and present at the listed write",
            vec![listing(replica("a", 0, 995), 3)],
            vec![quiet(3, false)],
            "yes",
        ),
        (
            "present at a later write than listed (the Lease is renewed after)",
            vec![listing(replica("a", 0, 995), 3)],
            vec![quiet(4, false)],
            "yes",
        ),
        (
            "listed but missing (deleted)",
            vec![listing(replica("a", 0, 995), 3)],
            vec![],
            "unproven",
        ),
        (
            "listed, present at an older write (replaced by an older copy)",
            vec![listing(replica("a", 0, 995), 3)],
            vec![quiet(2, false)],
            "unproven",
        ),
        (
            "listed, present but unnumbered",
            vec![listing(replica("a", 0, 995), 3)],
            vec![report("a", "old", 600, &[])],
            "unproven",
        ),
        (
            "listed by a stopped replica, missing",
            {
                let mut b = listing(replica("b", 0, 100), 1);
                b.stopped = true;
                vec![replica("a", 0, 995), b]
            },
            vec![],
            "unproven",
        ),
        (
            "another replica's report missing",
            vec![replica("a", 0, 995), listing(replica("b", 0, 995), 9)],
            vec![quiet(1, false)],
            "unproven",
        ),
        (
            "not listed, nothing reported",
            vec![replica("a", 0, 995)],
            vec![],
            "yes",
        ),
        (
            "the Lease's list overflowed and does not list the key",
            vec![overflowed.clone()],
            vec![],
            "unproven",
        ),
        (
            "the Lease's list overflowed but lists the key",
            vec![listing(overflowed, 3)],
            vec![quiet(3, false)],
            "yes",
        ),
        (
            "an overflowed list of a replica watching another namespace",
            vec![replica("a", 0, 995), overflowed_elsewhere],
            vec![],
            "yes",
        ),
        (
            "a report that left key ids out, the key id not listed",
            vec![listing(replica("a", 0, 995), 3)],
            vec![other_kid(3, true)],
            "unproven",
        ),
        (
            "a report that left key ids out, the key id listed",
            vec![listing(replica("a", 0, 995), 3)],
            vec![quiet(3, true)],
            "yes",
        ),
        (
            "a report that lists every key id, the key id absent",
            vec![listing(replica("a", 0, 995), 3)],
            vec![other_kid(3, false)],
            "yes",
        ),
    ];
    for (name, replicas, reports, want) in cases {
        let leases: Vec<Result<Replica, String>> = replicas.into_iter().map(Ok).collect();
        let usage = key_use(&reports, &leases, "ns", "pk", t(1000));
        let cov = coverage(&leases, &[], "ns", t(1000));
        let verdict = unused_for(W, "old", &usage, &cov);
        let got = match &verdict {
            Unused::Yes => "yes",
            Unused::InUse { .. } => "in-use",
            Unused::Warming { .. } => "warming",
            Unused::Unproven { .. } => "unproven",
            Unused::Silent(_) => "silent",
            Unused::Behind(_) => "behind",
        };
        assert_eq!(got, want, "{name}: {verdict:?}");
        if let Unused::Unproven { until, .. } = verdict {
            // Used "now" (the evaluation time): unused a whole window after it at the earliest.
            assert!(until >= t(1000) + chrono::Duration::seconds(300), "{name}");
        }
    }
}

/// `--verifier-replicas`: an expected replica without a Lease means the use cannot be judged,
/// so deleting a Lease never shrinks the coverage; without the list, the Leases that exist are
/// the replicas (and deleting one does shrink it).
#[test]
fn expected_replicas_must_each_have_a_lease() {
    let expected = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut stopped = replica("b", 0, 100);
    stopped.stopped = true;
    let cases: Vec<(&str, Vec<Replica>, Vec<String>, &str)> = vec![
        (
            "no list, one Lease",
            vec![replica("a", 0, 995)],
            vec![],
            "yes",
        ),
        (
            "every expected replica has a Lease",
            vec![replica("a", 0, 995), replica("b", 0, 995)],
            expected(&["a", "b"]),
            "yes",
        ),
        (
            "an expected replica's Lease is gone (deleted)",
            vec![replica("a", 0, 995)],
            expected(&["a", "b"]),
            "silent",
        ),
        ("no Lease at all", vec![], expected(&["a"]), "silent"),
        (
            "an expected replica stopped cleanly",
            vec![replica("a", 0, 995), stopped],
            expected(&["a", "b"]),
            "yes",
        ),
        (
            "an extra replica beyond the list still has to vouch",
            vec![replica("a", 0, 995), replica("c", 0, 900)],
            expected(&["a"]),
            "silent",
        ),
    ];
    for (name, replicas, expected, want) in cases {
        let leases: Vec<Result<Replica, String>> = replicas.into_iter().map(Ok).collect();
        let cov = coverage(&leases, &expected, "ns", t(1000));
        let got = match unused_for(W, "old", &KeyUse::default(), &cov) {
            Unused::Yes => "yes",
            Unused::Silent(_) => "silent",
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(got, want, "{name}: {cov:?}");
    }
    let cov = coverage(
        &[Ok(replica("a", 0, 995))],
        &expected(&["a", "b"]),
        "ns",
        t(1000),
    );
    assert!(
        cov.is_err_and(|m| m.why.contains("without a Lease") && m.why.contains('b') && !m.behind)
    );
}

/// Issue 20, part 3: a replica whose watermark is past its lease duration but whose heartbeat
/// is fresh is behind, not silent; one whose heartbeat is old too (or absent, an older
/// verifier) is silent; a silent replica wins over a behind one. Neither is evidence.
#[test]
fn a_replica_alive_but_behind_is_not_silent() {
    let behind = |name: &str, heartbeat: Option<i64>, pending: u64| {
        let mut r = replica(name, 0, 900);
        r.heartbeat = heartbeat.map(t);
        r.pending = pending;
        r
    };
    let cases: Vec<(&str, Vec<Replica>, Option<bool>)> = vec![
        ("fresh watermark", vec![replica("a", 0, 995)], None),
        (
            "behind, heartbeat 5 s ago",
            vec![behind("a", Some(995), 700)],
            Some(true),
        ),
        (
            "heartbeat older than the lease",
            vec![behind("a", Some(960), 700)],
            Some(false),
        ),
        (
            "no heartbeat (older verifier)",
            vec![behind("a", None, 0)],
            Some(false),
        ),
        (
            "a heartbeat from the future",
            vec![behind("a", Some(2000), 1)],
            Some(false),
        ),
        (
            "one silent, one behind",
            vec![behind("a", Some(995), 3), behind("b", None, 0)],
            Some(false),
        ),
        (
            "one fine, one behind",
            vec![replica("a", 0, 995), behind("b", Some(999), 12)],
            Some(true),
        ),
    ];
    for (name, replicas, want) in cases {
        let leases: Vec<Result<Replica, String>> = replicas.into_iter().map(Ok).collect();
        let cov = coverage(&leases, &[], "ns", t(1000));
        assert_eq!(
            cov.as_ref().err().map(|n| n.behind),
            want,
            "{name}: {cov:?}"
        );
        let verdict = unused_for(W, "old", &KeyUse::default(), &cov);
        match want {
            Some(true) => {
                assert!(
                    matches!(verdict, Unused::Behind(ref m) if m.contains("pending")),
                    "{name}: {verdict:?}"
                );
            }
            Some(false) => assert!(matches!(verdict, Unused::Silent(_)), "{name}: {verdict:?}"),
            None => {}
        }
    }
}

/// The Lease's list is required: a Lease without it (or with an unreadable one) vouches for
/// nothing, so removing the annotation cannot hide a deleted report.
#[test]
fn a_lease_without_its_report_list_vouches_for_nothing() {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
    let lease = |reports: Option<&str>| {
        let mut ann = BTreeMap::from([
            (ANN_NAMESPACES.to_string(), "*".to_string()),
            (ANN_RESOLUTION.to_string(), "10s".to_string()),
        ]);
        if let Some(r) = reports {
            ann.insert(ANN_REPORTS.to_string(), r.to_string());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name("a")),
                annotations: Some(ann),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                acquire_time: chrono_to_jiff(t(0)).map(MicroTime),
                renew_time: chrono_to_jiff(t(995)).map(MicroTime),
                lease_duration_seconds: Some(30),
                ..LeaseSpec::default()
            }),
        }
    };
    assert!(parse_lease(&lease(None)).is_err());
    assert!(parse_lease(&lease(Some("not json"))).is_err());
    let parsed = parse_lease(&lease(Some(r#"{"ns/pk":4}"#))).expect("parses");
    assert_eq!(parsed.reports.get("ns/pk"), Some(&4));
}

#[test]
fn report_names_are_unique_and_valid() {
    assert_eq!(report_name("pk", "verifier-0"), "pk.verifier-0");
    assert_eq!(report_page_name("pk", "verifier-0", 1), "pk.verifier-0");
    assert_eq!(report_page_name("pk", "verifier-0", 2), "pk.verifier-0.p2");
    let long = "p".repeat(250);
    let a = report_name(&long, "verifier-0");
    let b = report_name(&long, "verifier-1");
    assert!(a.len() <= 253 && b.len() <= 253);
    assert_ne!(a, b);
    // Every page of every pair, short and long names: valid DNS subdomains, all distinct.
    let valid = |n: &str| {
        n.len() <= 253
            && n.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    };
    let mut names = BTreeSet::new();
    for pk in ["pk", long.as_str(), &"a.b-".repeat(60)] {
        let pk = pk.trim_end_matches(['.', '-']);
        for replica in ["verifier-0", "verifier-1"] {
            for page in [1, 2, 3, 10, 256] {
                let n = report_page_name(pk, replica, page);
                assert!(valid(&n), "{n}");
                assert!(names.insert(n.clone()), "{n} twice");
            }
        }
    }
    // Lease entries of pages never collide with another key's, and parse back.
    assert_eq!(page_key("ns", "pk", 1), "ns/pk");
    assert_eq!(page_key("ns", "pk", 3), "ns/pk#3");
    assert_eq!(parse_page_key("ns/pk#3"), Some(("ns/pk", 3)));
    assert_eq!(parse_page_key("ns/pk"), Some(("ns/pk", 1)));
    assert_eq!(parse_page_key("ns/pk#1"), None);
    assert_eq!(parse_page_key("ns/pk#x"), None);
}

/// The reports of one replica for `pk`, as the verifier writes them (`n` pods on kid `k1`,
/// write `seq`), and its Lease listing them.
fn paged(n: u32, seq: u64) -> (Vec<KeyUsageReport>, Replica) {
    use crate::verifier::report::{Reporting, report_object};
    use crate::verifier::{Instance, KeyRef, Use};
    let key = KeyRef::new("ns", "pk");
    let mut state = Reporting::new(Duration::from_secs(10), Duration::from_secs(10));
    for _ in 1..seq {
        state.absorb(Use {
            key: KeyRef::new("ns", "earlier"),
            kid: "k".into(),
            instance: Instance::Unattributed,
            at: t(0),
        });
        state.written(&KeyRef::new("ns", "earlier"), t(0));
    }
    for i in 0..n {
        state.absorb(Use {
            key: key.clone(),
            kid: "k1".into(),
            instance: Instance::Pod(format!("00000000-0000-4000-8000-{i:012}")),
            at: t(i64::from(i % 500)),
        });
    }
    assert_eq!(state.next_seq(), seq);
    let reports = state
        .pages(&key)
        .into_iter()
        .map(|p| report_object("a", &key, "uid", p, seq, false))
        .collect();
    state.written(&key, t(600));
    let mut r = replica("a", 0, 995);
    r.reports = state
        .listing(t(601))
        .reports
        .into_iter()
        .filter(|(k, _)| k.starts_with("ns/pk"))
        .collect();
    (reports, r)
}

/// Pages merge: 1,000 pods over 4 pages all reach `KeyUse::pods`, and the key id's last use
/// is the newest of them. A page the Lease lists that is missing or older is doubt, like a
/// missing report; a superseded page adds nothing.
#[test]
fn pages_merge_and_a_missing_or_older_page_is_doubt() {
    let (reports, lease) = paged(1000, 7);
    assert_eq!(reports.len(), 4);
    assert_eq!(lease.reports.len(), 4);
    assert_eq!(lease.reports.get("ns/pk#3"), Some(&7));
    let leases = vec![Ok(lease.clone())];
    let cov = coverage(&leases, &[], "ns", t(1000));
    let u = key_use(&reports, &leases, "ns", "pk", t(1000));
    assert_eq!(u.all_used, None);
    assert_eq!(u.pods["k1"].len(), 1000);
    assert_eq!(u.last_used["k1"], t(499));
    assert!(u.pods_truncated.is_empty());
    assert_eq!(unused_for(W, "k1", &u, &cov), Unused::Yes);

    // Page 3 missing (deleted): the key id counts as used now.
    let without: Vec<KeyUsageReport> = reports
        .iter()
        .filter(|r| r.spec.page != 3)
        .cloned()
        .collect();
    let u = key_use(&without, &leases, "ns", "pk", t(1000));
    let doubt = u.doubt("k1").expect("doubt");
    assert!(doubt.why.contains("pk.a.p3"), "{}", doubt.why);
    assert!(matches!(
        unused_for(W, "k1", &u, &cov),
        Unused::Unproven { .. }
    ));
    // Page 3 an older copy: the same.
    let mut older = reports.clone();
    older[2] = numbered(older[2].clone(), 6, false);
    let u = key_use(&older, &leases, "ns", "pk", t(1000));
    assert!(u.doubt("k1").is_some());
    // Page 3 replaced by another object under its name (another page, another replica): not
    // page 3, so missing.
    let mut moved = reports.clone();
    moved[2].spec.page = 2;
    assert!(
        key_use(&moved, &leases, "ns", "pk", t(1000))
            .doubt("k1")
            .is_some()
    );

    // A superseded page (the report shrank) lists nothing even if it still had content.
    let (small, lease) = paged(100, 8);
    let mut stale = reports[3].clone();
    stale.spec.pages = 1;
    let mut all = small.clone();
    all.push(stale);
    let u = key_use(&all, &[Ok(lease)], "ns", "pk", t(1000));
    assert_eq!(u.all_used, None);
    assert_eq!(u.pods["k1"].len(), 100);
}

/// `podsTruncated` reaches [`KeyUse`], and a pod a truncated list does not name is unknown,
/// never "not seen".
#[test]
fn a_truncated_pod_list_reaches_key_use() {
    let mut r = report("a", "k1", 100, &["p1"]);
    r.spec.keys[0].pods_truncated = true;
    let u = key_use(&[r, report("b", "k2", 100, &["p2"])], &[], "ns", "pk", t(0));
    assert_eq!(u.pods_truncated, BTreeSet::from(["k1".to_string()]));
    assert_eq!(u.pod_seen("k1", "p1"), Some(true));
    assert_eq!(u.pod_seen("k1", "p9"), None);
    assert_eq!(u.pod_seen("k2", "p2"), Some(true));
    assert_eq!(u.pod_seen("k2", "p9"), Some(false));
    assert_eq!(u.pod_seen("k3", "p9"), Some(false));
}

#[test]
fn merged_pods_and_times() {
    let u = key_use(
        &[
            report("a", "k1", 100, &["p1"]),
            report("b", "k1", 200, &["p2"]),
        ],
        &[],
        "ns",
        "pk",
        t(0),
    );
    assert_eq!(u.last_used["k1"], t(200));
    assert_eq!(u.pods["k1"].len(), 2);
}

proptest! {
    /// Safety: whatever the replicas and uses, "unused" is never said while a use inside the
    /// window was seen by a replica whose watermark covers it (the replica reported it, to its
    /// resolution), and never while a replica is silent or started inside the window.
    #[test]
    fn never_unused_while_used_in_window(
        replicas in proptest::collection::vec((0i64..2000, 0i64..2000, any::<bool>()), 1..4),
        uses in proptest::collection::vec((0usize..4, 0i64..2000), 0..6),
        now in 0i64..2500,
    ) {
        let rs: Vec<Replica> = replicas
            .iter()
            .enumerate()
            .map(|(i, (since, len, stopped))| {
                let mut r = replica(&format!("r{i}"), *since, since + len);
                r.stopped = *stopped;
                r
            })
            .collect();
        // Each replica reports the uses it saw before its watermark, rounded down by up to its
        // resolution (the worst a replica may do).
        let mut reports = Vec::new();
        for (who, at) in &uses {
            let r = &rs[who % rs.len()];
            if *at >= r.since.timestamp() - 1_800_000_000 && t(*at) <= r.watermark {
                reports.push(report(&r.name, "old", at - 9, &[]));
            }
        }
        let leases: Vec<Result<Replica, String>> = rs.iter().cloned().map(Ok).collect();
        let usage = key_use(&reports, &leases, "ns", "pk", t(now));
        let cov = coverage(&leases, &[], "ns", t(now));
        if unused_for(W, "old", &usage, &cov) == Unused::Yes {
            let c = cov.expect("covered");
            let start = c.as_of - chrono::Duration::seconds(300);
            for (who, at) in &uses {
                let r = &rs[who % rs.len()];
                let seen = !r.stopped
                    && *at >= r.since.timestamp() - 1_800_000_000
                    && t(*at) <= r.watermark;
                prop_assert!(!(seen && t(*at) >= start && t(*at) <= c.as_of),
                    "use at {at} by {} inside [{start}, {}]", r.name, c.as_of);
            }
            for r in rs.iter().filter(|r| !r.stopped) {
                prop_assert!(r.since <= start);
                prop_assert!(t(now) <= r.watermark + chrono::Duration::seconds(30));
            }
        }
    }
}
