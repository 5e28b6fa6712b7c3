use super::*;
use chrono::TimeZone;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetStatus, DaemonSetUpdateStrategy, Deployment,
    DeploymentCondition, DeploymentSpec, DeploymentStatus, RollingUpdateStatefulSetStrategy,
    StatefulSet, StatefulSetSpec, StatefulSetStatus, StatefulSetUpdateStrategy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn meta(generation: i64) -> ObjectMeta {
    ObjectMeta {
        generation: Some(generation),
        ..Default::default()
    }
}

fn dep(replicas: i32, updated: i32, total: i32, available: i32, observed: i64) -> Deployment {
    Deployment {
        metadata: meta(2),
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(total),
            updated_replicas: Some(updated),
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        }),
    }
}

#[test]
fn deployment_criteria() {
    let cases = [
        ("complete", dep(3, 3, 3, 3, 2), true),
        ("generation not observed", dep(3, 3, 3, 3, 1), false),
        (
            "old replica still present (terminating counts)",
            dep(3, 3, 4, 3, 2),
            false,
        ),
        ("not all updated", dep(3, 2, 3, 3, 2), false),
        ("not all available", dep(3, 3, 3, 2, 2), false),
    ];
    for (name, d, complete) in cases {
        assert_eq!(deployment(&d).0 == Rollout::Complete, complete, "{name}");
    }
}

#[test]
fn deployment_paused_and_deadline() {
    let mut d = dep(3, 1, 3, 3, 2);
    d.spec.as_mut().unwrap().paused = Some(true);
    assert!(matches!(
        deployment(&d).0,
        Rollout::Stalled {
            reason: "DeploymentPaused",
            ..
        }
    ));
    let mut d = dep(3, 1, 3, 3, 2);
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        message: Some("ReplicaSet has timed out progressing.".into()),
        ..Default::default()
    }]);
    assert!(matches!(
        deployment(&d).0,
        Rollout::Failed {
            reason: "ProgressDeadlineExceeded",
            ..
        }
    ));
}

fn sts(
    strategy: Option<StatefulSetUpdateStrategy>,
    cur: &str,
    upd: &str,
    ready: i32,
) -> StatefulSet {
    StatefulSet {
        metadata: meta(1),
        spec: Some(StatefulSetSpec {
            replicas: Some(2),
            update_strategy: strategy,
            ..Default::default()
        }),
        status: Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas: 2,
            updated_replicas: Some(2),
            ready_replicas: Some(ready),
            current_revision: Some(cur.into()),
            update_revision: Some(upd.into()),
            ..Default::default()
        }),
    }
}

#[test]
fn stateful_set_criteria() {
    assert_eq!(stateful_set(&sts(None, "r2", "r2", 2)).0, Rollout::Complete);
    assert!(matches!(
        stateful_set(&sts(None, "r1", "r2", 2)).0,
        Rollout::Progressing(_)
    ));
    assert!(matches!(
        stateful_set(&sts(None, "r2", "r2", 1)).0,
        Rollout::Progressing(_)
    ));
    let on_delete = StatefulSetUpdateStrategy {
        type_: Some("OnDelete".into()),
        rolling_update: None,
    };
    assert!(matches!(
        stateful_set(&sts(Some(on_delete), "r2", "r2", 2)).0,
        Rollout::Stalled {
            reason: "OnDeleteStrategy",
            ..
        }
    ));
    let partition = StatefulSetUpdateStrategy {
        type_: Some("RollingUpdate".into()),
        rolling_update: Some(RollingUpdateStatefulSetStrategy {
            partition: Some(1),
            ..Default::default()
        }),
    };
    assert!(matches!(
        stateful_set(&sts(Some(partition), "r1", "r2", 2)).0,
        Rollout::Stalled {
            reason: "Partitioned",
            ..
        }
    ));
}

fn ds(desired: i32, updated: i32, available: i32, strategy: Option<&str>) -> DaemonSet {
    DaemonSet {
        metadata: meta(3),
        spec: Some(DaemonSetSpec {
            update_strategy: strategy.map(|s| DaemonSetUpdateStrategy {
                type_: Some(s.into()),
                rolling_update: None,
            }),
            ..Default::default()
        }),
        status: Some(DaemonSetStatus {
            observed_generation: Some(3),
            desired_number_scheduled: desired,
            updated_number_scheduled: Some(updated),
            number_available: Some(available),
            number_ready: available,
            current_number_scheduled: desired,
            number_misscheduled: 0,
            ..Default::default()
        }),
    }
}

#[test]
fn daemon_set_criteria() {
    assert_eq!(daemon_set(&ds(4, 4, 4, None)).0, Rollout::Complete);
    assert!(matches!(
        daemon_set(&ds(4, 3, 4, None)).0,
        Rollout::Progressing(_)
    ));
    assert!(matches!(
        daemon_set(&ds(4, 4, 3, None)).0,
        Rollout::Progressing(_)
    ));
    let mut unobserved = ds(4, 4, 4, None);
    unobserved.status.as_mut().unwrap().observed_generation = Some(2);
    assert!(matches!(daemon_set(&unobserved).0, Rollout::Progressing(_)));
    let mut misscheduled = ds(4, 4, 4, None);
    misscheduled.status.as_mut().unwrap().number_misscheduled = 1;
    assert!(matches!(
        daemon_set(&misscheduled).0,
        Rollout::Progressing(_)
    ));
    assert!(matches!(
        daemon_set(&ds(4, 0, 4, Some("OnDelete"))).0,
        Rollout::Stalled {
            reason: "OnDeleteStrategy",
            ..
        }
    ));
}

fn pod(name: &str, kid: &str, successes: u32) -> PodObs {
    PodObs {
        name: name.into(),
        uid: name.into(),
        kid: Some(kid.into()),
        revision: Some("r2".into()),
        terminating: false,
        unknown: false,
        ready: true,
        successes,
        acknowledged: false,
    }
}

fn evidence(kid: &str, uid: &str, revision: &str) -> Evidence {
    Evidence {
        key_id: kid.into(),
        workload_uid: uid.into(),
        revision: revision.into(),
    }
}

fn input(template: Option<&str>, pods: Vec<PodObs>) -> AgentInput {
    AgentInput {
        secret_kid: "K2".into(),
        template_kid: template.map(Into::into),
        workload_uid: "w1".into(),
        current_revision: Some("r2".into()),
        rollout: Rollout::Complete,
        figures: Figures {
            desired: i32::try_from(pods.len()).unwrap(),
            ..Figures::default()
        },
        pods,
        success_threshold: 2,
        require_ack: false,
        rolled_at: None,
        min_roll_interval: Duration::ZERO,
        roll_slot: crate::agent::RollSlot::Free,
        previous: Some(evidence("K1", "w1", "r1")),
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
}

fn confirmed(kid: &str) -> Decision {
    Decision::Confirmed {
        evidence: evidence(kid, "w1", "r2"),
    }
}

fn waits(d: &Decision, why: &str) -> bool {
    matches!(d, Decision::Wait { reason, .. } if *reason == why)
}

#[test]
fn rolls_only_when_the_template_lacks_the_secret_key() {
    assert_eq!(
        decide(&input(Some("K1"), vec![]), now()),
        Decision::Roll { kid: "K2".into() }
    );
    assert_eq!(
        decide(&input(None, vec![]), now()),
        Decision::Roll { kid: "K2".into() }
    );
    // Already on the key: never roll again (operator restarts, resyncs, token refreshes).
    let i = input(Some("K2"), vec![pod("a", "K2", 2)]);
    assert_eq!(decide(&i, now()), confirmed("K2"));
}

#[test]
fn roll_waits_for_min_interval_and_the_cap() {
    let mut i = input(Some("K1"), vec![]);
    i.rolled_at = Some(now() - chrono::Duration::seconds(10));
    i.min_roll_interval = Duration::from_secs(60);
    assert!(
        matches!(decide(&i, now()), Decision::Wait { reason: reasons::ROLL_DELAYED, retry_after: Some(d), .. } if d == Duration::from_secs(50))
    );
    let mut i = input(Some("K1"), vec![]);
    i.roll_slot = crate::agent::RollSlot::OperatorCap;
    assert!(waits(&decide(&i, now()), reasons::ROLL_QUEUED));
    // The key's own budget queues it too, and says which cap it is.
    i.roll_slot = crate::agent::RollSlot::KeyBudget(10);
    match decide(&i, now()) {
        Decision::Wait {
            reason, message, ..
        } => {
            assert_eq!(reason, reasons::ROLL_QUEUED);
            assert!(message.contains("maxConcurrentRolls"), "{message}");
        }
        other => panic!("not queued: {other:?}"),
    }
}

#[test]
fn confirmation_needs_every_criterion() {
    let terminating = |mut p: PodObs| {
        p.terminating = true;
        p
    };
    let unknown = |mut p: PodObs| {
        p.unknown = true;
        p
    };
    let at = |mut p: PodObs, r: &str| {
        p.revision = Some(r.into());
        p
    };
    let rollout = |mut i: AgentInput, r: Rollout| {
        i.rollout = r;
        i
    };
    let stalled = |reason| Rollout::Stalled {
        reason,
        message: "m".into(),
    };
    let cases: Vec<(&str, AgentInput, Result<&str, &str>)> = vec![
        (
            "rollout in progress",
            rollout(
                input(Some("K2"), vec![pod("a", "K2", 5)]),
                Rollout::Progressing("1 of 2".into()),
            ),
            Err(reasons::ROLLING),
        ),
        (
            "a pod still on the old key",
            input(Some("K2"), vec![pod("a", "K2", 5), pod("b", "K1", 5)]),
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "a terminating pod on the old key",
            input(
                Some("K2"),
                vec![pod("a", "K2", 5), terminating(pod("b", "K1", 0))],
            ),
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "a pod in phase Unknown (even one on the new key)",
            input(
                Some("K2"),
                vec![pod("a", "K2", 5), unknown(pod("b", "K2", 5))],
            ),
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "a pod on the key but of another revision",
            input(
                Some("K2"),
                vec![pod("a", "K2", 5), at(pod("b", "K2", 5), "r1")],
            ),
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "revision unknown",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 5)]);
                i.current_revision = None;
                i
            },
            Err(reasons::REVISION_UNKNOWN),
        ),
        (
            "not enough consecutive checks",
            input(Some("K2"), vec![pod("a", "K2", 2), pod("b", "K2", 1)]),
            Err(reasons::CHECKS_PENDING),
        ),
        (
            "a pod not ready",
            input(
                Some("K2"),
                vec![pod("a", "K2", 2), {
                    let mut p = pod("b", "K2", 2);
                    p.ready = false;
                    p
                }],
            ),
            Err(reasons::CHECKS_PENDING),
        ),
        (
            "no pods while some are desired",
            {
                let mut i = input(Some("K2"), vec![]);
                i.figures.desired = 2;
                i
            },
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "scaled to zero: no pods, none desired, rollout complete",
            input(Some("K2"), vec![]),
            Ok("K2"),
        ),
        (
            "scaled to zero, but an old pod still terminating",
            input(Some("K2"), vec![terminating(pod("b", "K1", 0))]),
            Err(reasons::PODS_NOT_ON_KEY),
        ),
        (
            "acknowledgement required: checked pods wait for it",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 2), pod("b", "K2", 2)]);
                i.require_ack = true;
                i.pods[0].acknowledged = true;
                i
            },
            Err(reasons::ACK_PENDING),
        ),
        (
            "acknowledgement required: checks still come first",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 1)]);
                i.require_ack = true;
                i.pods[0].acknowledged = true;
                i
            },
            Err(reasons::CHECKS_PENDING),
        ),
        (
            "acknowledgement required: every pod checked and acknowledged",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 2), pod("b", "K2", 3)]);
                i.require_ack = true;
                i.pods.iter_mut().for_each(|p| p.acknowledged = true);
                i
            },
            Ok("K2"),
        ),
        (
            "acknowledgement mode alone (threshold 0): waits for it, then confirms",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 0)]);
                i.success_threshold = 0;
                i.require_ack = true;
                i
            },
            Err(reasons::ACK_PENDING),
        ),
        (
            "acknowledgement mode alone: an acknowledged pod not ready is not confirmed",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 0)]);
                i.success_threshold = 0;
                i.require_ack = true;
                i.pods[0].acknowledged = true;
                i.pods[0].ready = false;
                i
            },
            Err(reasons::CHECKS_PENDING),
        ),
        (
            "rollout-only mode: threshold 0",
            {
                let mut i = input(Some("K2"), vec![pod("a", "K2", 0)]);
                i.success_threshold = 0;
                i
            },
            Ok("K2"),
        ),
        (
            "a paused workload whose pods all run the key is confirmed by its pods",
            rollout(
                input(Some("K2"), vec![pod("a", "K2", 5)]),
                stalled("DeploymentPaused"),
            ),
            Ok("K2"),
        ),
        (
            "stalled kinds are reported, never waited on silently",
            rollout(
                input(Some("K2"), vec![pod("a", "K2", 5), pod("b", "K1", 5)]),
                stalled("Partitioned"),
            ),
            Err("Partitioned"),
        ),
    ];
    for (name, i, want) in cases {
        let d = decide(&i, now());
        match want {
            Ok(kid) => assert_eq!(d, confirmed(kid), "{name}"),
            Err(reason) => assert!(waits(&d, reason), "{name}: {d:?}"),
        }
    }
}

#[test]
fn recorded_confirmation_stands_only_for_the_same_workload_and_revision() {
    let with = |previous: Evidence, uid: &str, revision: Option<&str>| {
        let mut i = input(Some("K2"), vec![]);
        i.previous = Some(previous);
        i.workload_uid = uid.into();
        i.current_revision = revision.map(Into::into);
        i
    };
    let e = evidence("K1", "w1", "r1");
    let cases = [
        (
            "same workload, same revision",
            with(e.clone(), "w1", Some("r1")),
            true,
        ),
        (
            "replaced under the same name (new uid)",
            with(e.clone(), "w2", Some("r1")),
            false,
        ),
        (
            "new template revision",
            with(e.clone(), "w1", Some("r2")),
            false,
        ),
        (
            "revision momentarily unknown (spec change not yet observed)",
            with(e.clone(), "w1", None),
            true,
        ),
        (
            "re-pointed to another workload with the same revision name",
            with(e.clone(), "other", Some("r1")),
            false,
        ),
    ];
    for (name, i, stands) in cases {
        assert_eq!(i.standing() == Some(&e), stands, "{name}");
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn pod_obs() -> impl Strategy<Value = PodObs> {
        (
            prop_oneof![Just(None), Just(Some("K1")), Just(Some("K2"))],
            prop_oneof![Just(None), Just(Some("r1")), Just(Some("r2"))],
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            0u32..4,
            any::<bool>(),
        )
            .prop_map(
                |(kid, rev, terminating, unknown, ready, successes, acknowledged)| PodObs {
                    name: "p".into(),
                    uid: "p".into(),
                    kid: kid.map(Into::into),
                    revision: rev.map(Into::into),
                    terminating,
                    unknown,
                    ready,
                    successes,
                    acknowledged,
                },
            )
    }

    fn agent_input() -> impl Strategy<Value = AgentInput> {
        (
            prop_oneof![Just(None), Just(Some("K1")), Just(Some("K2"))],
            prop_oneof![Just(None), Just(Some("r1")), Just(Some("r2"))],
            prop::collection::vec(pod_obs(), 0..4),
            0i32..3,
            prop_oneof![
                Just(Rollout::Complete),
                Just(Rollout::Progressing("m".into())),
                Just(Rollout::Stalled {
                    reason: "DeploymentPaused",
                    message: "m".into()
                }),
            ],
            0u32..3,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                |(template, revision, pods, desired, rollout, threshold, slot, ack)| AgentInput {
                    secret_kid: "K2".into(),
                    template_kid: template.map(Into::into),
                    workload_uid: "w1".into(),
                    current_revision: revision.map(Into::into),
                    rollout,
                    figures: Figures {
                        desired,
                        ..Figures::default()
                    },
                    pods,
                    success_threshold: threshold,
                    require_ack: ack,
                    rolled_at: None,
                    min_roll_interval: Duration::ZERO,
                    roll_slot: if slot {
                        crate::agent::RollSlot::Free
                    } else {
                        crate::agent::RollSlot::OperatorCap
                    },
                    previous: None,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

        /// A confirmation is only ever evidence of what the input shows: the template and
        /// every pod on the Secret's key at the current revision, nothing terminating or
        /// Unknown, every pod checked, and pods present unless none is desired.
        #[test]
        fn confirmation_rests_on_every_pod(input in agent_input()) {
            match decide(&input, now()) {
                Decision::Confirmed { evidence } => {
                    prop_assert_eq!(input.template_kid.as_deref(), Some("K2"));
                    prop_assert_eq!(&evidence.key_id, "K2");
                    prop_assert_eq!(&evidence.workload_uid, "w1");
                    prop_assert_eq!(Some(&evidence.revision), input.current_revision.as_ref());
                    prop_assert!(input.pods.iter().all(|p| !p.terminating && !p.unknown
                        && p.kid.as_deref() == Some("K2")
                        && p.revision == input.current_revision
                        && p.ready && p.successes >= input.success_threshold
                        && (!input.require_ack || p.acknowledged)));
                    prop_assert!(!input.pods.is_empty() || input.figures.desired == 0);
                }
                Decision::Roll { kid } => {
                    prop_assert_eq!(kid.as_str(), "K2");
                    prop_assert_ne!(input.template_kid.as_deref(), Some("K2"));
                    prop_assert!(input.roll_slot == crate::agent::RollSlot::Free);
                }
                Decision::Wait { .. } => {}
            }
        }
    }
}
