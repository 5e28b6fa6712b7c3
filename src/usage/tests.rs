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
    }
}

fn report(replica: &str, kid: &str, at: i64, pods: &[&str]) -> KeyUsageReport {
    KeyUsageReport::new(
        &report_name("pk", replica),
        KeyUsageReportSpec {
            provisioning_key: "pk".into(),
            replica: replica.into(),
            keys: vec![KidUsage {
                kid: kid.into(),
                last_used_at: crate::rotation::observe::ts(t(at)),
                pods: pods
                    .iter()
                    .map(|u| PodUsage {
                        uid: (*u).into(),
                        last_used_at: crate::rotation::observe::ts(t(at)),
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
    let used_at_600 = key_use(&[report("a", "old", 600, &[])], t(1000));
    let used_at_700 = key_use(&[report("a", "old", 700, &[])], t(1000));
    let used_at_690 = key_use(&[report("a", "old", 690, &[])], t(1000));
    let used_at_675_by_b = key_use(&[report("b", "old", 675, &[])], t(0));
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
        let cov = coverage(&leases, "ns", t(now));
        let got = match unused_for(W, "old", usage, &cov) {
            Unused::Yes => "yes",
            Unused::InUse { .. } => "in-use",
            Unused::Warming { .. } => "warming",
            Unused::Silent(_) => "silent",
        };
        assert_eq!(got, want, "{name}: {cov:?}");
    }
}

#[test]
fn report_names_are_unique_and_valid() {
    assert_eq!(report_name("pk", "verifier-0"), "pk.verifier-0");
    let long = "p".repeat(250);
    let a = report_name(&long, "verifier-0");
    let b = report_name(&long, "verifier-1");
    assert!(a.len() <= 253 && b.len() <= 253);
    assert_ne!(a, b);
}

#[test]
fn merged_pods_and_times() {
    let u = key_use(
        &[
            report("a", "k1", 100, &["p1"]),
            report("b", "k1", 200, &["p2"]),
        ],
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
        let usage = key_use(&reports, t(now));
        let leases: Vec<Result<Replica, String>> = rs.iter().cloned().map(Ok).collect();
        let cov = coverage(&leases, "ns", t(now));
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
