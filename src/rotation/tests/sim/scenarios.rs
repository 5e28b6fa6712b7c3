//! Scenario runs on the simulator: a first key, requests, minInterval, consumers, compromise,
//! prune.

use super::*;

fn started(settings: Settings) -> Sim {
    let mut sim = Sim::new(settings);
    sim.settle().unwrap_or_else(|e| panic!("{e}"));
    sim
}

fn run(sim: &mut Sim, f: impl FnOnce(&mut Sim) -> SimResult) {
    f(sim).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn scenario_first_key() {
    let sim = started(with_settings(|s| s.request_token = some("r1")));
    let kinds: Vec<&str> = sim
        .steps
        .iter()
        .map(|(_, s)| match s {
            Step::Mint { active: true, .. } => "Mint(active)",
            Step::WriteRecord { .. } => "WriteRecord",
            Step::WriteBundle { .. } => "WriteBundle",
            Step::HandOut { .. } => "HandOut",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Three writes: the key Secret created active, the trust bundle, the agent Secret; the
    // trust record rides on the status write that ends the reconcile.
    assert_eq!(kinds, ["Mint(active)", "WriteBundle", "HandOut"]);
    assert_eq!(
        sim.obs.record.as_ref().map(|r| r.kids.len()),
        Some(1),
        "the first key is recorded by the closing status write"
    );
    assert_eq!(
        sim.obs.keys[0].consumed_request_token.as_deref(),
        Some("r1")
    );
    // The first key is handed out at once (no publishDelay), and nothing more happens.
    assert!(sim.steps.iter().all(|(t, _)| *t == now()));
    assert_eq!(sim.mints(), [Trigger::Initial]);
}

#[test]
fn scenario_request_token_rotates_exactly_once() {
    let mut sim = started(with_settings(|s| s.request_token = some("r1")));
    run(&mut sim, |sim| {
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        let p = sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        // Waiting for publishDelay: the next look is exactly when it ends.
        assert_eq!(p.requeue_after, Some(secs(120)));
        sim.drain()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        // Much later, the same token never rotates again.
        sim.advance(secs(30 * 86_400));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        Ok(())
    });
    assert_eq!(
        sim.obs.keys.iter().map(|k| k.state).collect::<Vec<_>>(),
        [KeyState::Destroyed, KeyState::Active]
    );
}

#[test]
fn scenario_annotation_rotates_exactly_once() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.obs.rotate_annotation = some("2025-06-01T12:00:00Z");
        sim.advance(secs(61));
        sim.settle()?;
        sim.drain()?;
        sim.advance(secs(30 * 86_400));
        sim.settle()?;
        Ok(())
    });
    assert_eq!(sim.mints(), [Trigger::Initial, Trigger::Annotation]);
}

#[test]
fn scenario_request_during_rotation_is_served_after_it() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        sim.settle()?;
        // In flight (waiting for publishDelay); a new request arrives.
        sim.advance(secs(30));
        sim.settings.request_token = some("r3");
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        sim.drain()?;
        Ok(())
    });
    assert_eq!(
        sim.mints(),
        [
            Trigger::Initial,
            Trigger::RequestToken,
            Trigger::RequestToken
        ]
    );
    // The third key was minted only after the second rotation completed (old key revoked).
    let (t3, _) = sim
        .steps
        .iter()
        .filter(|(_, s)| matches!(s, Step::Mint { .. }))
        .nth(2)
        .expect("third mint");
    let (t_revoke, _) = sim
        .steps
        .iter()
        .find(|(_, s)| matches!(s, Step::Destroy { seq: 1, .. }))
        .expect("k1 revoked");
    assert!(t_revoke <= t3);
    assert_eq!(
        sim.obs
            .keys
            .last()
            .and_then(|k| k.consumed_request_token.as_deref()),
        Some("r3")
    );
}

#[test]
fn scenario_min_interval_delays_and_never_drops() {
    let mut sim = started(with_settings(|s| {
        s.min_interval = secs(3600);
        s.token_ttl = secs(4 * 3600);
    }));
    run(&mut sim, |sim| {
        sim.advance(secs(600));
        sim.settings.request_token = some("r2");
        let p = sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial]);
        assert_eq!(p.requeue_after, Some(secs(3000)));
        sim.advance(secs(2999));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial]);
        sim.advance(secs(1));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        Ok(())
    });
}

#[test]
fn scenario_consumers_gate_revocation() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.obs.consumers = vec![
            consumer("a", Some(1), Some(now())),
            consumer("b", Some(1), Some(now())),
        ];
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        sim.settle()?;
        sim.advance(secs(120));
        sim.settle()?;
        assert_eq!(sim.key(2)?.state, KeyState::Active);
        assert_eq!(sim.key(1)?.state, KeyState::Retiring);
        // Long past the overlap, one consumer confirmed: still trusted.
        sim.advance(secs(86_400));
        sim.obs.consumers[0].confirmed_kid = Some(kid(2));
        let p = sim.settle()?;
        assert_eq!(sim.key(1)?.state, KeyState::Retiring);
        assert_eq!(p.phase, Phase::Stalled);
        // Both confirmed: revoked at once.
        sim.obs.consumers[1].confirmed_kid = Some(kid(2));
        let p = sim.settle()?;
        assert_eq!(sim.key(1)?.state, KeyState::Destroyed);
        assert_eq!(p.phase, Phase::Ready);
        Ok(())
    });
}

#[test]
fn scenario_compromise() {
    let mut sim = started(with_settings(|s| {
        s.suspend = true;
        s.min_interval = secs(86_400);
    }));
    run(&mut sim, |sim| {
        sim.obs.consumers = vec![consumer("a", Some(1), Some(now()))];
        sim.advance(secs(10));
        sim.settings.compromised.insert(kid(1));
        let before = sim.steps.len();
        sim.settle()?;
        let steps: Vec<Step> = sim.steps[before..].iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(
            steps,
            [
                // The compromised key id leaves the trust record first: the verifier refuses
                // it from this write on.
                Step::WriteRecord {
                    record: sim_record(&sim.settings, &[])
                },
                Step::Mint {
                    seq: 2,
                    trigger: Trigger::Compromised,
                    consumed_request_token: None,
                    consumed_annotation: None,
                    active: false,
                },
                Step::WriteRecord {
                    record: sim_record(&sim.settings, &[2])
                },
                Step::MarkPublished { seq: 2 },
                Step::WriteBundle {
                    trusted: vec![kid(1), kid(2)],
                    revoked: vec![]
                },
                Step::RecordPublished { seq: 2 },
                Step::Destroy {
                    seq: 1,
                    emergency: true
                },
                Step::WriteBundle {
                    trusted: vec![kid(2)],
                    revoked: vec![kid(1)]
                },
                Step::Activate {
                    seq: 2,
                    emergency: true
                },
                Step::HandOut {
                    seq: 2,
                    reason: HandOutReason::NewKey
                },
            ]
        );
        assert!(
            sim.steps[before..].iter().all(|(t, _)| *t == sim.now),
            "all at once"
        );
        Ok(())
    });
}

#[test]
fn scenario_prune() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        for i in 0..8 {
            sim.advance(secs(3600));
            sim.settings.request_token = Some(format!("r{i}"));
            sim.drain()?;
        }
        Ok(())
    });
    assert_eq!(sim.mints().len(), 9);
    let revoked = sim
        .obs
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Destroyed)
        .count();
    assert_eq!(revoked, RETAIN_REVOKED);
    assert!(
        sim.steps
            .iter()
            .any(|(_, s)| matches!(s, Step::Prune { seq: 1 }))
    );
}

/// Deactivate, then destroy, on the simulator's objects: the rotation deactivates the old key
/// (private key kept), `retainDeactivatedFor` later it is destroyed, and a key Secret labelled
/// `revoked` by an earlier version reads as destroyed with no repair (an upgrade writes nothing).
#[test]
fn scenario_deactivate_then_destroy_and_the_legacy_label() {
    let mut sim = started(with_settings(|s| {
        s.request_token = some("r1");
        s.retain_deactivated_for = secs(3600);
    }));
    run(&mut sim, |sim| {
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        sim.drain()?;
        let old = sim.key(1)?.clone();
        ensure!(
            old.state == KeyState::Deactivated && old.has_private_key,
            "old key {:?}, private key {}",
            old.state,
            old.has_private_key
        );
        sim.advance(secs(3600));
        sim.drain()?;
        let old = sim.key(1)?.clone();
        ensure!(
            old.state == KeyState::Destroyed && !old.has_private_key,
            "after the retention: {:?}",
            old.state
        );
        // The label an earlier version wrote for a destroyed key.
        let name = crate::rotation::desired::key_secret_name("demo", 1);
        sim.store.edit_secret(&name, |s| {
            s.metadata
                .labels
                .get_or_insert_default()
                .insert(l::KEY_STATE.into(), "revoked".into());
        });
        sim.sync();
        let k = sim.key(1)?.clone();
        ensure!(
            k.state == KeyState::Destroyed && k.edited.is_none(),
            "a legacy `revoked` label: {:?}, edited {:?}",
            k.state,
            k.edited
        );
        let before = sim.steps.len();
        sim.settle()?;
        ensure!(
            sim.steps.len() == before,
            "an upgrade wrote {:?}",
            &sim.steps[before..]
        );
        Ok(())
    });
}
