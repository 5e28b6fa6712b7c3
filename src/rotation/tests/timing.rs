//! When the planner looks again: what waiting plans report, a requeue that is never zero, and
//! the schedule offsets (jitter) seeded by the ProvisioningKey's uid.

use super::*;

#[test]
fn waiting_plans_report_next_rotation_and_token_refresh() {
    let s = with_settings(|s| s.interval = Some(secs(7200)));
    let k1 = ObservedKey {
        activated_at: Some(ago(3600)),
        ..key(1, Active)
    };
    let p = plan(
        &s,
        &obs(vec![
            k1.clone(),
            ObservedKey {
                published_at: Some(ago(10)),
                ..key(2, Published)
            },
        ]),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.next_rotation_at, Some(later(3600)));
    assert_eq!(p.token_refresh_at, Some(later(1740)));
    assert_eq!(p.requeue_after, Some(secs(110)));
}

#[test]
fn requeue_is_never_zero() {
    // A request delayed by minInterval wakes up exactly when it may be served.
    let p = plan(
        &with_settings(|s| s.min_interval = secs(60)),
        &with_obs(
            vec![ObservedKey {
                created_at: now(),
                ..key(1, Active)
            }],
            |o| o.rotate_annotation = some("a"),
        ),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(secs(60)));
    // Something due in a millisecond is looked at after 200ms, never in a hot loop.
    let p = plan(
        &settings(),
        &obs(vec![
            ObservedKey {
                retired_at: Some(ago(600) + chrono::Duration::milliseconds(1)),
                ..key(1, Retiring)
            },
            key(2, Active),
        ]),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(Duration::from_millis(200)));
}

// ---------------------------------------------------------------------------------------------
// Schedule offsets (jitter)
// ---------------------------------------------------------------------------------------------

const UID: &str = "0c6d2a57-1f3e-4b8a-9d0c-5e7f3a2b1c4d";

fn jittered(f: impl FnOnce(&mut Settings)) -> Settings {
    with_settings(|s| {
        s.uid = UID.into();
        f(s)
    })
}

fn offset_of(s: &Settings, purpose: schedule::Purpose, period: u64) -> chrono::Duration {
    chrono::Duration::from_std(schedule::offset(&s.uid, purpose, secs(period))).expect("small")
}

/// The seed is the ProvisioningKey's uid, also when the spec is refused (the current key's
/// token keeps being refreshed on the same schedule).
#[test]
fn resolve_carries_the_uid() {
    let mut p = pk(ProvisioningKeySpec::default());
    p.metadata.uid = Some(UID.into());
    let s = Settings::resolve(&p, &Floors::none()).expect("valid");
    assert_eq!(s.uid, UID);
    p.spec.rotation = Some(RotationSpec {
        interval: Some("soon".into()),
        ..Default::default()
    });
    let s = resolve_or_keep(&p, &Floors::none(), &LastGood::default());
    assert!(s.refused.is_some());
    assert_eq!(s.uid, UID);
}

#[test]
fn bounds_are_a_tenth_capped_at_ten_minutes() {
    for (period, bound) in [
        (0, 0),
        (9, 0),
        (10, 1),
        (300, 30),
        (3600, 360),
        (6000, 600),
        (7200, 600),
        (30 * DAY as u64, 600),
    ] {
        assert_eq!(
            schedule::bound(secs(period)),
            secs(bound),
            "period {period}s"
        );
    }
    // No uid, no offset: the time asked for.
    assert_eq!(
        schedule::offset("", schedule::Purpose::Rotation, secs(3600)),
        Duration::ZERO
    );
}

/// The scheduled rotation and the token refresh happen at the jittered times, which status
/// shows; the key's own uid decides them.
#[test]
fn jitter_moves_the_schedule_earlier_and_status_shows_it() {
    let s = jittered(|s| s.interval = Some(secs(7200)));
    let off = offset_of(&s, schedule::Purpose::Rotation, 7200);
    let refresh_off = offset_of(&s, schedule::Purpose::TokenRefresh, TTL);
    assert!(off > chrono::Duration::zero() && refresh_off > chrono::Duration::zero());
    // Key 1 became current 2h - 1h ago: due in an hour as asked, earlier by its offset.
    let k1 = ObservedKey {
        activated_at: Some(ago(3600)),
        ..key(1, Active)
    };
    let o = obs(vec![k1.clone()]);
    let p = plan(&s, &o, now());
    assert_eq!(p.step, None);
    assert_eq!(p.next_rotation_at, Some(later(3600) - off));
    // The token (issued a minute ago) is refreshed at half its life, earlier by its offset.
    let refresh = ago(60) + chrono::Duration::seconds(TTL as i64 / 2) - refresh_off;
    assert_eq!(p.token_refresh_at, Some(refresh));
    assert_eq!(p.requeue_after, (refresh - now()).to_std().ok());
    // Between the jittered and the asked time: the rotation starts.
    let at = later(3600) - off;
    let o2 = with_obs(vec![k1.clone()], |o| {
        o.agent_secret = agent_with(&kid(1), |a| {
            a.token_iat = Some(at.timestamp() - 60);
            a.token_exp = Some(at.timestamp() - 60 + TTL as i64);
        })
    });
    let p = plan(&s, &o2, at);
    assert!(
        matches!(
            p.step,
            Some(Step::Mint {
                trigger: Trigger::Interval,
                ..
            })
        ),
        "{p:?}"
    );
    // A second before it: nothing yet, and the wake-up is at the jittered time.
    let p = plan(&s, &o2, at - chrono::Duration::seconds(1));
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(secs(1)));
    // Token refresh at its jittered time, not before.
    let p = plan(&s, &o, refresh);
    assert_eq!(
        p.step,
        Some(Step::HandOut {
            seq: 1,
            reason: HandOutReason::TokenRefresh
        })
    );
    let p = plan(&s, &o, refresh - chrono::Duration::seconds(1));
    assert_eq!(p.step, None);
}

/// A herd: 1,000 keys (uids differing only in their last digits, the hardest case for a weak
/// hash) due at the same time spread over the whole bound.
#[test]
fn a_herd_of_keys_spreads_over_the_bound() {
    for (purpose, period) in [
        (schedule::Purpose::Rotation, 30 * DAY as u64),
        (schedule::Purpose::TokenRefresh, 24 * 3600),
    ] {
        let mut per_second = BTreeMap::<u64, u32>::new();
        for i in 0..1000 {
            let uid = format!("6f1c2d3e-4b5a-4c6d-8e7f-{i:012}");
            let o = schedule::offset(&uid, purpose, secs(period)).as_secs();
            *per_second.entry(o).or_default() += 1;
        }
        let busiest = per_second.values().max().copied().unwrap_or_default();
        // 601 one-second slots; about 1.7 keys each on average.
        assert!(
            per_second.len() >= 450 && busiest <= 8,
            "{purpose:?}: {} distinct seconds, busiest {busiest}",
            per_second.len()
        );
        let max = per_second.keys().max().copied().unwrap_or_default();
        assert!(
            (590..=600).contains(&max),
            "{purpose:?}: largest offset {max}"
        );
    }
    // The two purposes draw independent offsets.
    let same = (0..100)
        .filter(|i| {
            let uid = format!("uid-{i}");
            schedule::offset(&uid, schedule::Purpose::Rotation, secs(7200))
                == schedule::offset(&uid, schedule::Purpose::TokenRefresh, secs(7200))
        })
        .count();
    assert!(same < 5, "{same} of 100 uids get the same offset for both");
}

proptest! {
    #![proptest_config(config())]

    /// The scheduled rotation is never later than asked, never earlier than the bound, and the
    /// same uid always gets the same time.
    #[test]
    fn rotation_jitter_is_bounded_and_stable(
        uid in "[0-9a-z-]{0,40}",
        interval in prop_oneof![1u64..=120, 120u64..=86_400, 86_400u64..=400 * 86_400],
        activated in 0i64..=4_000_000_000,
    ) {
        let s = with_settings(|s| {
            s.interval = Some(secs(interval));
            s.uid = uid.clone();
        });
        let k = ObservedKey {
            activated_at: DateTime::from_timestamp(activated, 0),
            ..key(1, Active)
        };
        let asked = schedule::rotation_due_unjittered(&s, &k).expect("due");
        let due = schedule::rotation_due(&s, &k).expect("due");
        let bound = (interval / 10).min(600) as i64;
        prop_assert!(due <= asked, "later than asked: {due} > {asked}");
        prop_assert!(due >= asked - chrono::Duration::seconds(bound), "earlier than the bound");
        prop_assert_eq!(Some(due), schedule::rotation_due(&s.clone(), &k.clone()));
        // What status shows is what is acted on (a settled key, its token just issued).
        let o = with_obs(vec![k], |o| {
            o.agent_secret = agent_with(&kid(1), |a| {
                a.token_iat = Some(activated);
                a.token_exp = Some(activated + TTL as i64);
            })
        });
        let p = plan(&s, &o, DateTime::from_timestamp(activated, 0).expect("t"));
        prop_assert_eq!(p.step, None);
        prop_assert_eq!(p.next_rotation_at, Some(due));
    }

    /// The token is refreshed between 40% and 50% of its life: never after half of it (so it
    /// never expires first), never at or before its issue (so a refresh never loops), the same
    /// time for the same uid.
    #[test]
    fn refresh_jitter_is_bounded_and_stable(
        uid in "[0-9a-z-]{0,40}",
        ttl in prop_oneof![1i64..=20, 20i64..=86_400, 86_400i64..=30 * 86_400],
        iat in 0i64..=4_000_000_000,
    ) {
        let s = with_settings(|s| s.uid = uid.clone());
        let exp = iat + ttl;
        let t = schedule::token_refresh_at(&s, iat, exp).expect("a time").timestamp();
        let half = iat + ttl / 2;
        let bound = (ttl / 10).min(600);
        prop_assert!(t <= half && t >= half - bound, "{t} outside [{}, {half}]", half - bound);
        prop_assert!(t < exp, "refresh at or after expiry");
        if ttl >= 2 {
            prop_assert!(t > iat, "refresh due at issue: a loop");
        }
        // 40% of its life, to the whole second the times are stored in.
        prop_assert!(10 * (t - iat) >= 4 * ttl - 10, "earlier than 40% of the life");
        prop_assert_eq!(schedule::token_refresh_at(&s, iat, exp).map(|d| d.timestamp()), Some(t));
    }
}
