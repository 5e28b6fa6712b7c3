use super::*;
use chrono::TimeZone;
use k8s_openapi::api::apps::v1::{
    DaemonSetSpec, DaemonSetStatus, DaemonSetUpdateStrategy, DeploymentCondition, DeploymentSpec,
    DeploymentStatus, RollingUpdateStatefulSetStrategy, StatefulSetSpec, StatefulSetStatus,
    StatefulSetUpdateStrategy,
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
        terminating: false,
        ready: true,
        successes,
    }
}

fn input(template: Option<&str>, pods: Vec<PodObs>) -> AgentInput {
    AgentInput {
        secret_kid: "K2".into(),
        template_kid: template.map(Into::into),
        rollout: Rollout::Complete,
        pods,
        success_threshold: 2,
        rolled_at: None,
        min_roll_interval: Duration::ZERO,
        roll_slot_free: true,
        confirmed_kid: Some("K1".into()),
    }
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap()
}

#[test]
fn rolls_only_when_the_template_lacks_the_secret_key() {
    assert_eq!(
        decide(&input(Some("K1"), vec![]), now()),
        AgentStep::Roll { kid: "K2".into() }
    );
    assert_eq!(
        decide(&input(None, vec![]), now()),
        AgentStep::Roll { kid: "K2".into() }
    );
    // Already on the key: never roll again (operator restarts, resyncs, token refreshes).
    let i = input(Some("K2"), vec![pod("a", "K2", 2)]);
    assert_eq!(decide(&i, now()), AgentStep::Confirmed { kid: "K2".into() });
}

#[test]
fn roll_waits_for_min_interval_and_the_cap() {
    let mut i = input(Some("K1"), vec![]);
    i.rolled_at = Some(now() - chrono::Duration::seconds(10));
    i.min_roll_interval = Duration::from_secs(60);
    assert!(
        matches!(decide(&i, now()), AgentStep::Wait { reason: reasons::ROLL_DELAYED, retry_after: Some(d), .. } if d == Duration::from_secs(50))
    );
    let mut i = input(Some("K1"), vec![]);
    i.roll_slot_free = false;
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: reasons::ROLL_QUEUED,
            ..
        }
    ));
}

#[test]
fn confirmation_needs_every_criterion() {
    // Rollout in progress.
    let mut i = input(Some("K2"), vec![pod("a", "K2", 5)]);
    i.rollout = Rollout::Progressing("1 of 2".into());
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: reasons::ROLLING,
            ..
        }
    ));
    // A pod still on the old key.
    let i = input(Some("K2"), vec![pod("a", "K2", 5), pod("b", "K1", 5)]);
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: reasons::PODS_NOT_ON_KEY,
            ..
        }
    ));
    // A terminating pod.
    let mut old = pod("b", "K1", 0);
    old.terminating = true;
    let i = input(Some("K2"), vec![pod("a", "K2", 5), old]);
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: reasons::PODS_NOT_ON_KEY,
            ..
        }
    ));
    // Not enough consecutive checks.
    let i = input(Some("K2"), vec![pod("a", "K2", 2), pod("b", "K2", 1)]);
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: reasons::CHECKS_PENDING,
            ..
        }
    ));
    // No pods at all is never a confirmation.
    let i = input(Some("K2"), vec![]);
    assert!(matches!(decide(&i, now()), AgentStep::Wait { .. }));
    // Rollout-only mode: threshold 0.
    let mut i = input(Some("K2"), vec![pod("a", "K2", 0)]);
    i.success_threshold = 0;
    assert_eq!(decide(&i, now()), AgentStep::Confirmed { kid: "K2".into() });
    // A paused workload whose pods all run the key is confirmed by its pods.
    let mut i = input(Some("K2"), vec![pod("a", "K2", 5)]);
    i.rollout = Rollout::Stalled {
        reason: "DeploymentPaused",
        message: "p".into(),
    };
    assert_eq!(decide(&i, now()), AgentStep::Confirmed { kid: "K2".into() });
    // Stalled kinds are reported, never waited on silently.
    let mut i = input(Some("K2"), vec![pod("a", "K2", 5), pod("b", "K1", 5)]);
    i.rollout = Rollout::Stalled {
        reason: "Partitioned",
        message: "p".into(),
    };
    assert!(matches!(
        decide(&i, now()),
        AgentStep::Wait {
            reason: "Partitioned",
            ..
        }
    ));
}
