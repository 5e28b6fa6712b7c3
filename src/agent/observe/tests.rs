//! The mapping from raw objects, end to end through the decision: what a real namespace holds
//! (evicted leftovers, lookalike pods, replaced workloads, rival PolicyAgents).

use std::time::Duration;

use chrono::{TimeZone, Utc};
use k8s_openapi::api::apps::v1::ReplicaSet;
use serde_json::{Value, json};

use super::*;
use crate::agent::{Decision, decide, reasons};
use crate::api::policy_agent::CheckMode;

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn check() -> Check {
    Check {
        mode: CheckMode::RolloutOnly,
        port: 0,
        path: "/".into(),
        scheme: Default::default(),
        timeout: Duration::from_secs(1),
        period: Duration::from_secs(1),
        success_threshold: 0,
        acknowledgement: false,
        via: Default::default(),
        min_roll_interval: Duration::ZERO,
    }
}

fn pa(name: &str, created: &str, workload: &str, status: Value) -> PolicyAgent {
    from(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent",
        "metadata": { "name": name, "namespace": "ns", "creationTimestamp": created },
        "spec": {
            "provisioningKeyRef": { "name": "agents" },
            "workloadRef": { "kind": "Deployment", "name": workload },
            "connectivityCheck": { "mode": "RolloutOnly" },
        },
        "status": status,
    }))
}

fn pk() -> ProvisioningKey {
    from(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
        "metadata": { "name": "agents", "namespace": "ns", "uid": "pk-uid" },
        "spec": { "secretName": "agents-key" },
    }))
}

fn secret(owner_uid: &str, kid: &str) -> Secret {
    from(json!({
        "metadata": {
            "name": "agents-key", "namespace": "ns",
            "ownerReferences": [{ "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
                "name": "agents", "uid": owner_uid, "controller": true }],
        },
        "data": { "key-id": base64(kid) },
    }))
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Deployment `opa` (uid `d1`) at revision 2 (ReplicaSet `rs2`, hash `h2`), `replicas` desired,
/// rollout complete, template on key K2.
fn deployment(uid: &str, replicas: i32) -> Workload {
    Workload::Deployment(from(json!({
        "metadata": {
            "name": "opa", "namespace": "ns", "uid": uid, "generation": 3,
            "annotations": { "deployment.kubernetes.io/revision": "2" },
        },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": "opa" } },
            "template": { "metadata": { "annotations": { "keyward.dev/key-id": "K2" } } },
        },
        "status": {
            "observedGeneration": 3, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
        },
    })))
}

fn replica_set(uid: &str, owner: &str, hash: &str, revision: &str) -> ReplicaSet {
    from(json!({
        "metadata": {
            "name": format!("opa-{hash}"), "uid": uid,
            "labels": { "app": "opa", "pod-template-hash": hash },
            "annotations": { "deployment.kubernetes.io/revision": revision },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "Deployment", "name": "opa",
                "uid": owner, "controller": true }],
        },
    }))
}

fn pod(name: &str, rs: &str, hash: &str, kid: &str, phase: &str) -> Pod {
    from(json!({
        "metadata": {
            "name": name, "uid": name,
            "labels": { "app": "opa", "pod-template-hash": hash },
            "annotations": { "keyward.dev/key-id": kid },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x",
                "uid": rs, "controller": true }],
        },
        "status": {
            "phase": phase,
            "conditions": [{ "type": "Ready", "status": if phase == "Running" { "True" } else { "False" } }],
        },
    }))
}

struct World {
    agents: Vec<PolicyAgent>,
    pk: ProvisioningKey,
    secret: Secret,
    workload: Workload,
    replica_sets: Vec<ReplicaSet>,
    pods: Vec<Pod>,
}

impl World {
    fn new(pods: Vec<Pod>) -> Self {
        World {
            agents: vec![pa("opa-agents", "2026-01-01T00:00:00Z", "opa", json!({}))],
            pk: pk(),
            secret: secret("pk-uid", "K2"),
            workload: deployment("d1", 2),
            replica_sets: vec![
                replica_set("rs1", "d1", "h1", "1"),
                replica_set("rs2", "d1", "h2", "2"),
                // A lookalike: another Deployment's ReplicaSet with the same labels.
                replica_set("rs9", "other", "h2", "2"),
            ],
            pods,
        }
    }

    fn objects(&self) -> AgentObjects<'_> {
        AgentObjects {
            pa: &self.agents[0],
            agents: &self.agents,
            pk: Some(&self.pk),
            agent_secret: Some(&self.secret),
            workload: Some(&self.workload),
            service_account: None,
            lineage: Lineage {
                replica_sets: &self.replica_sets,
                revisions: &[],
            },
            pods: &self.pods,
            roll_slot: crate::agent::RollSlot::Free,
        }
    }

    fn decide(&self) -> Result<Decision, Refusal> {
        let input = observe(&self.objects(), &|_, _| 0, &check())?;
        Ok(decide(
            &input,
            Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap(),
        ))
    }
}

fn confirmed_at_h2(uid: &str) -> Result<Decision, Refusal> {
    Ok(Decision::Confirmed {
        evidence: Evidence {
            key_id: "K2".into(),
            workload_uid: uid.into(),
            revision: "h2".into(),
        },
    })
}

fn waits(d: &Result<Decision, Refusal>, why: &str) -> bool {
    matches!(d, Ok(Decision::Wait { reason, .. }) if *reason == why)
}

fn on_k2(name: &str) -> Pod {
    pod(name, "rs2", "h2", "K2", "Running")
}

#[test]
fn pods_of_the_namespace_as_they_come() {
    let cases: Vec<(&str, Vec<Pod>, Result<Decision, Refusal>)> = vec![
        (
            "two pods on the key",
            vec![on_k2("a"), on_k2("b")],
            confirmed_at_h2("d1"),
        ),
        (
            "an evicted pod of the old ReplicaSet left over",
            vec![
                on_k2("a"),
                on_k2("b"),
                pod("old", "rs1", "h1", "K1", "Failed"),
            ],
            confirmed_at_h2("d1"),
        ),
        (
            "a completed pod left over",
            vec![
                on_k2("a"),
                on_k2("b"),
                pod("old", "rs1", "h1", "K1", "Succeeded"),
            ],
            confirmed_at_h2("d1"),
        ),
        (
            "a lookalike pod on the old key, of another Deployment's ReplicaSet",
            vec![
                on_k2("a"),
                on_k2("b"),
                pod("x", "rs9", "h2", "K1", "Running"),
            ],
            confirmed_at_h2("d1"),
        ),
        (
            "a pod of the old ReplicaSet in phase Unknown",
            vec![
                on_k2("a"),
                on_k2("b"),
                pod("old", "rs1", "h1", "K1", "Unknown"),
            ],
            Ok(Decision::Wait {
                reason: reasons::PODS_NOT_ON_KEY,
                message: String::new(),
                retry_after: None,
            }),
        ),
        (
            "a pod of the old ReplicaSet still running",
            vec![
                on_k2("a"),
                on_k2("b"),
                pod("old", "rs1", "h1", "K1", "Running"),
            ],
            Ok(Decision::Wait {
                reason: reasons::PODS_NOT_ON_KEY,
                message: String::new(),
                retry_after: None,
            }),
        ),
    ];
    for (name, pods, want) in cases {
        let got = World::new(pods).decide();
        match &want {
            Ok(Decision::Wait { reason, .. }) => assert!(waits(&got, reason), "{name}: {got:?}"),
            _ => assert_eq!(got, want, "{name}"),
        }
    }
}

#[test]
fn terminating_pod_blocks_until_gone() {
    let mut old = pod("old", "rs1", "h1", "K1", "Running");
    old.metadata.deletion_timestamp = Some(from(json!("2026-11-22T11:59:00Z")));
    let w = World::new(vec![on_k2("a"), on_k2("b"), old]);
    assert!(waits(&w.decide(), reasons::PODS_NOT_ON_KEY));
}

#[test]
fn scaled_to_zero_is_confirmed_on_the_template() {
    let mut w = World::new(vec![pod("old", "rs1", "h1", "K1", "Failed")]);
    w.workload = deployment("d1", 0);
    assert_eq!(w.decide(), confirmed_at_h2("d1"));
}

#[test]
fn replaced_workload_owns_nothing_of_its_predecessor() {
    // Same name, new uid, no ReplicaSet yet: the old pods (on the key) do not count for it.
    let mut w = World::new(vec![on_k2("a"), on_k2("b")]);
    w.workload = deployment("d2", 2);
    w.agents[0] = pa(
        "opa-agents",
        "2026-01-01T00:00:00Z",
        "opa",
        json!({ "confirmedKeyId": "K2", "confirmedWorkloadUid": "d1", "confirmedRevision": "h2" }),
    );
    let input = observe(&w.objects(), &|_, _| 0, &check()).unwrap();
    assert!(input.pods.is_empty());
    assert_eq!(input.current_revision, None);
    assert_eq!(
        input.previous.as_ref().map(|e| e.workload_uid.as_str()),
        Some("d1")
    );
    assert_eq!(
        input.standing(),
        None,
        "the old confirmation does not carry over"
    );
    assert!(waits(&w.decide(), reasons::REVISION_UNKNOWN));
}

#[test]
fn refusals() {
    let mut w = World::new(vec![]);
    w.secret = secret("someone-else", "K2");
    assert_eq!(w.decide().unwrap_err().reason(), "KeyNotHandedOut");

    let mut w = World::new(vec![]);
    w.workload = Workload::StatefulSet(from(json!({ "metadata": { "name": "opa", "uid": "s1" } })));
    assert_eq!(w.decide().unwrap_err().reason(), "WorkloadNotFound");

    let mut w = World::new(vec![]);
    w.pk = from(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
        "metadata": { "name": "other", "uid": "pk-uid" }, "spec": {},
    }));
    assert_eq!(w.decide().unwrap_err().reason(), "ProvisioningKeyNotFound");
}

#[test]
fn one_policy_agent_per_workload() {
    let t1 = "2026-01-01T00:00:00Z";
    let t2 = "2026-01-01T00:00:05Z";
    let me = pa("bb", t2, "opa", json!({}));
    let cases: Vec<(&str, Vec<PolicyAgent>, Option<&str>)> = vec![
        ("alone", vec![me.clone()], None),
        (
            "an older one for the same workload",
            vec![me.clone(), pa("zz", t1, "opa", json!({}))],
            Some("zz"),
        ),
        (
            "same age, name sorts first",
            vec![me.clone(), pa("aa", t2, "opa", json!({}))],
            Some("aa"),
        ),
        (
            "same age, name sorts after",
            vec![me.clone(), pa("cc", t2, "opa", json!({}))],
            None,
        ),
        (
            "a newer one",
            vec![
                me.clone(),
                pa("aa", "2026-01-02T00:00:00Z", "opa", json!({})),
            ],
            None,
        ),
        (
            "an older one for another workload",
            vec![me.clone(), pa("zz", t1, "other", json!({}))],
            None,
        ),
        (
            "an older one being deleted",
            vec![me.clone(), {
                let mut p = pa("zz", t1, "opa", json!({}));
                p.metadata.deletion_timestamp = Some(from(json!(t2)));
                p
            }],
            None,
        ),
    ];
    for (name, agents, owner) in cases {
        assert_eq!(
            claimant(&me, &agents).map(|p| p.name_any()).as_deref(),
            owner,
            "{name}"
        );
    }
    let mut w = World::new(vec![on_k2("a"), on_k2("b")]);
    w.agents = vec![me, pa("zz", t1, "opa", json!({}))];
    let refusal = w.decide().unwrap_err();
    assert_eq!(refusal.reason(), "WorkloadClaimed");
    assert!(refusal.to_string().contains("PolicyAgent zz"), "{refusal}");
}

/// An agent outside the cluster: its ServiceAccount stands for its one "pod". It is never
/// rolled, confirmed only once a verifier acknowledged the ServiceAccount on the Secret's key
/// id, and a missing ServiceAccount is reported like a missing workload.
#[test]
fn an_agent_outside_the_cluster_is_confirmed_by_acknowledgement_alone_and_never_rolled() {
    let mut outside = pa("outside", "2026-01-01T00:00:00Z", "edge-agent", json!({}));
    outside.spec.workload_ref.kind = crate::api::policy_agent::WorkloadKind::ServiceAccount;
    let sa: ServiceAccount = from(json!({
        "metadata": { "name": "edge-agent", "namespace": "ns", "uid": "sa-uid" },
    }));
    let (pk, secret) = (pk(), secret("pk-uid", "K2"));
    let agents = vec![outside.clone()];
    let objects = |sa: Option<&ServiceAccount>| {
        observe(
            &AgentObjects {
                pa: &outside,
                agents: &agents,
                pk: Some(&pk),
                agent_secret: Some(&secret),
                workload: None,
                service_account: sa,
                lineage: Lineage {
                    replica_sets: &[],
                    revisions: &[],
                },
                pods: &[],
                roll_slot: crate::agent::RollSlot::Free,
            },
            &|_, _| 0,
            &Check {
                acknowledgement: true,
                ..check()
            },
        )
    };
    let now = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    let mut input = objects(Some(&sa)).expect("input");
    assert_eq!(input.workload_uid, "sa-uid");
    assert_eq!(input.pods.len(), 1);
    assert_eq!(input.pods[0].uid, "sa-uid");
    // Not acknowledged: waits, and never rolls.
    let waiting = decide(&input, now);
    assert!(matches!(waiting, Decision::Wait { .. }), "{waiting:?}");
    // Acknowledged on the Secret's key id: confirmed on it.
    input.pods[0].acknowledged = true;
    match decide(&input, now) {
        Decision::Confirmed { evidence } => {
            assert_eq!(evidence.key_id, "K2");
            assert_eq!(evidence.workload_uid, "sa-uid");
            assert_eq!(evidence.revision, EXTERNAL_REVISION);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        objects(None),
        Err(Refusal::WorkloadNotFound { .. })
    ));
}
