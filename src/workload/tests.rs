use super::*;
use serde_json::{Value, json};

fn from<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn owner(kind: &str, name: &str, uid: &str) -> Value {
    json!([{ "apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": true }])
}

fn deployment(uid: &str, revision: &str, generation: i64, observed: i64) -> Workload {
    Workload::Deployment(from(json!({
        "metadata": {
            "name": "opa", "uid": uid, "generation": generation,
            "annotations": { DEPLOYMENT_REVISION: revision },
        },
        "spec": {
            "selector": { "matchLabels": { "app": "opa" } },
            "template": { "metadata": { "annotations": { "keyward.dev/key-id": "K2" } } },
        },
        "status": { "observedGeneration": observed },
    })))
}

fn replica_set(name: &str, uid: &str, owner_uid: &str, hash: &str, revision: &str) -> ReplicaSet {
    from(json!({
        "metadata": {
            "name": name, "uid": uid,
            "labels": { POD_TEMPLATE_HASH: hash },
            "annotations": { DEPLOYMENT_REVISION: revision },
            "ownerReferences": owner("Deployment", "opa", owner_uid),
        },
    }))
}

fn stateful_set(uid: &str, update: &str, generation: i64, observed: i64) -> Workload {
    Workload::StatefulSet(from(json!({
        "metadata": { "name": "web", "uid": uid, "generation": generation },
        "spec": {
            "serviceName": "web",
            "selector": { "matchLabels": { "app": "web" } },
            "template": {},
        },
        "status": { "replicas": 0, "observedGeneration": observed, "updateRevision": update },
    })))
}

fn daemon_set(uid: &str, generation: i64, observed: i64) -> Workload {
    Workload::DaemonSet(from(json!({
        "metadata": { "name": "node-agent", "uid": uid, "generation": generation },
        "spec": { "selector": { "matchLabels": { "app": "node-agent" } }, "template": {} },
        "status": {
            "observedGeneration": observed, "currentNumberScheduled": 0,
            "desiredNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0,
        },
    })))
}

fn revision(
    name: &str,
    owner_kind: &str,
    owner_uid: &str,
    hash: &str,
    rev: i64,
) -> ControllerRevision {
    from(json!({
        "metadata": {
            "name": name,
            "labels": { CONTROLLER_REVISION_HASH: hash },
            "ownerReferences": owner(owner_kind, "x", owner_uid),
        },
        "revision": rev,
    }))
}

fn pod(owner_refs: Value, labels: Value, phase: Option<&str>, terminating: bool) -> Pod {
    let mut p: Pod = from(json!({
        "metadata": { "name": "p", "uid": "pod-uid", "labels": labels, "ownerReferences": owner_refs },
        "spec": { "containers": [] },
    }));
    if let Some(phase) = phase {
        p.status = Some(from(json!({ "phase": phase })));
    }
    if terminating {
        p.metadata.deletion_timestamp = Some(from(json!("2026-11-22T12:00:00Z")));
    }
    p
}

#[test]
fn accessors() {
    let d = deployment("d1", "2", 1, 1);
    assert_eq!(d.kind(), WorkloadKind::Deployment);
    assert_eq!(d.name(), "opa");
    assert_eq!(d.uid().as_deref(), Some("d1"));
    assert_eq!(d.template_kid().as_deref(), Some("K2"));
    assert_eq!(
        d.selector()
            .and_then(|s| s.match_labels)
            .and_then(|m| m.get("app").cloned()),
        Some("opa".to_string())
    );
    assert_eq!(stateful_set("s1", "web-1", 1, 1).template_kid(), None);
    assert_eq!(daemon_set("x", 1, 1).kind(), WorkloadKind::DaemonSet);
    assert!(matches!(
        stateful_set("s1", "web-1", 1, 1).rollout().0,
        Rollout::Progressing(_)
    ));
}

#[test]
fn pods_belong_by_owner_references_only() {
    let d = deployment("d1", "2", 1, 1);
    let rss = [
        replica_set("opa-aaa", "rs1", "d1", "aaa", "1"),
        replica_set("opa-bbb", "rs2", "d1", "bbb", "2"),
        // Same labels, another Deployment (an older one of the same name, or a lookalike).
        replica_set("opa-ccc", "rs3", "other-deployment", "ccc", "1"),
    ];
    let lineage = Lineage {
        replica_sets: &rss,
        revisions: &[],
    };
    let labels = json!({ "app": "opa", POD_TEMPLATE_HASH: "bbb" });
    let cases = [
        (
            "pod of the current ReplicaSet",
            owner("ReplicaSet", "opa-bbb", "rs2"),
            true,
        ),
        (
            "pod of an older ReplicaSet of the Deployment",
            owner("ReplicaSet", "opa-aaa", "rs1"),
            true,
        ),
        (
            "identical labels, ReplicaSet of another Deployment",
            owner("ReplicaSet", "opa-ccc", "rs3"),
            false,
        ),
        (
            "ReplicaSet not in the lineage",
            owner("ReplicaSet", "gone", "rs9"),
            false,
        ),
        (
            "no owner at all (a bare pod with the labels)",
            json!([]),
            false,
        ),
        (
            "owner that is not the controller",
            json!([{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "opa-bbb", "uid": "rs2" }]),
            false,
        ),
    ];
    for (name, refs, owned) in cases {
        assert_eq!(
            owns_pod(
                &d,
                lineage,
                &pod(refs, labels.clone(), Some("Running"), false)
            ),
            owned,
            "{name}"
        );
    }
    // The Deployment replaced under the same name (new uid): the old ReplicaSets and their pods
    // belong to the old object (the garbage collector removes them), never to the new one.
    let replaced = deployment("d2", "1", 1, 1);
    let old_pod = pod(
        owner("ReplicaSet", "opa-bbb", "rs2"),
        labels,
        Some("Running"),
        false,
    );
    assert!(!owns_pod(&replaced, lineage, &old_pod));
}

#[test]
fn stateful_and_daemon_set_pods_belong_by_uid() {
    let s = stateful_set("s1", "web-2", 1, 1);
    let none = Lineage::default();
    let p = |kind: &str, uid: &str| {
        pod(
            owner(kind, "web", uid),
            json!({ "app": "web" }),
            Some("Running"),
            false,
        )
    };
    assert!(owns_pod(&s, none, &p("StatefulSet", "s1")));
    assert!(
        !owns_pod(&s, none, &p("StatefulSet", "s0")),
        "a replaced StatefulSet's pod"
    );
    assert!(
        !owns_pod(&s, none, &p("DaemonSet", "s1")),
        "kind must match too"
    );
    let d = daemon_set("ds1", 1, 1);
    assert!(owns_pod(&d, none, &p("DaemonSet", "ds1")));
    assert!(!owns_pod(&d, none, &p("DaemonSet", "ds0")));
    // No uid (never created): owns nothing.
    let mut anonymous = stateful_set("s1", "web-2", 1, 1);
    if let Workload::StatefulSet(s) = &mut anonymous {
        s.metadata.uid = None;
    }
    assert!(!owns_pod(&anonymous, none, &p("StatefulSet", "s1")));
}

#[test]
fn current_revision_per_kind() {
    let rss = [
        replica_set("opa-aaa", "rs1", "d1", "aaa", "1"),
        replica_set("opa-bbb", "rs2", "d1", "bbb", "2"),
        replica_set("opa-ccc", "rs3", "other", "ccc", "3"),
    ];
    let crs = [
        revision("web-1", "StatefulSet", "s1", "h1", 1),
        revision("agent-h2", "DaemonSet", "ds1", "h2", 2),
        revision("agent-h3", "DaemonSet", "ds1", "h3", 3),
        revision("agent-h9", "DaemonSet", "other", "h9", 9),
    ];
    let lineage = Lineage {
        replica_sets: &rss,
        revisions: &crs,
    };
    let cases: [(&str, Workload, Option<&str>); 9] = [
        (
            "Deployment at revision 2",
            deployment("d1", "2", 3, 3),
            Some("bbb"),
        ),
        (
            "Deployment at revision 1 (rolled back)",
            deployment("d1", "1", 3, 3),
            Some("aaa"),
        ),
        (
            "Deployment: revision of another Deployment's ReplicaSet",
            deployment("d1", "3", 3, 3),
            None,
        ),
        (
            "Deployment: spec not observed yet",
            deployment("d1", "2", 4, 3),
            None,
        ),
        (
            "StatefulSet: updateRevision",
            stateful_set("s1", "web-2", 2, 2),
            Some("web-2"),
        ),
        (
            "StatefulSet: spec not observed yet",
            stateful_set("s1", "web-2", 3, 2),
            None,
        ),
        (
            "DaemonSet: highest revision it owns",
            daemon_set("ds1", 1, 1),
            Some("h3"),
        ),
        (
            "DaemonSet: spec not observed yet",
            daemon_set("ds1", 2, 1),
            None,
        ),
        ("DaemonSet without revisions", daemon_set("ds2", 1, 1), None),
    ];
    for (name, w, want) in cases {
        assert_eq!(current_revision(&w, lineage).as_deref(), want, "{name}");
    }
}

#[test]
fn pod_revision_per_kind() {
    let p = pod(
        json!([]),
        json!({ POD_TEMPLATE_HASH: "aaa", CONTROLLER_REVISION_HASH: "web-2" }),
        None,
        false,
    );
    assert_eq!(
        pod_revision(WorkloadKind::Deployment, &p).as_deref(),
        Some("aaa")
    );
    assert_eq!(
        pod_revision(WorkloadKind::StatefulSet, &p).as_deref(),
        Some("web-2")
    );
    assert_eq!(
        pod_revision(WorkloadKind::DaemonSet, &p).as_deref(),
        Some("web-2")
    );
    assert_eq!(
        pod_revision(
            WorkloadKind::Deployment,
            &pod(json!([]), json!({}), None, false)
        ),
        None
    );
}

#[test]
fn which_pods_hold_a_key() {
    let cases = [
        ("evicted (Failed)", Some("Failed"), false, false),
        ("completed (Succeeded)", Some("Succeeded"), false, false),
        (
            "Unknown (node lost: may still run)",
            Some("Unknown"),
            false,
            true,
        ),
        ("Pending", Some("Pending"), false, true),
        ("Running", Some("Running"), false, true),
        ("no status yet", None, false, true),
        ("terminating, still running", Some("Running"), true, true),
        ("terminating and failed", Some("Failed"), true, false),
    ];
    for (name, phase, terminating, holds) in cases {
        assert_eq!(
            holds_key(&pod(json!([]), json!({}), phase, terminating)),
            holds,
            "{name}"
        );
    }
}

#[test]
fn secret_usage_forms() {
    let with_spec =
        |spec: Value| -> Pod { from(json!({ "metadata": { "name": "p" }, "spec": spec })) };
    let c = |extra: Value| {
        let mut c = json!({ "name": "c" });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(extra.clone());
        }
        c
    };
    let secret_env = json!({ "env": [{ "name": "T", "valueFrom": { "secretKeyRef": { "name": "agents-key", "key": "token" } } }] });
    let secret_env_from = json!({ "envFrom": [{ "secretRef": { "name": "agents-key" } }] });
    let cases = [
        (
            "secret volume",
            json!({ "containers": [c(json!({}))], "volumes": [{ "name": "k", "secret": { "secretName": "agents-key" } }] }),
            true,
        ),
        (
            "secret volume of another Secret",
            json!({ "containers": [c(json!({}))], "volumes": [{ "name": "k", "secret": { "secretName": "other" } }] }),
            false,
        ),
        (
            "projected volume source",
            json!({ "containers": [c(json!({}))], "volumes": [{ "name": "k", "projected": { "sources": [
                { "configMap": { "name": "agents-key" } },
                { "secret": { "name": "agents-key" } },
            ] } }] }),
            true,
        ),
        (
            "projected: only a ConfigMap of that name",
            json!({ "containers": [c(json!({}))], "volumes": [{ "name": "k", "projected": { "sources": [{ "configMap": { "name": "agents-key" } }] } }] }),
            false,
        ),
        (
            "container env secretKeyRef",
            json!({ "containers": [c(secret_env.clone())] }),
            true,
        ),
        (
            "container envFrom secretRef",
            json!({ "containers": [c(secret_env_from.clone())] }),
            true,
        ),
        (
            "container envFrom of a ConfigMap of that name",
            json!({ "containers": [c(json!({ "envFrom": [{ "configMapRef": { "name": "agents-key" } }] }))] }),
            false,
        ),
        (
            "initContainer env",
            json!({ "containers": [c(json!({}))], "initContainers": [c(secret_env.clone())] }),
            true,
        ),
        (
            "initContainer envFrom",
            json!({ "containers": [c(json!({}))], "initContainers": [c(secret_env_from.clone())] }),
            true,
        ),
        (
            "ephemeralContainer env",
            json!({ "containers": [c(json!({}))], "ephemeralContainers": [c(secret_env)] }),
            true,
        ),
        (
            "ephemeralContainer envFrom",
            json!({ "containers": [c(json!({}))], "ephemeralContainers": [c(secret_env_from)] }),
            true,
        ),
        ("nothing", json!({ "containers": [c(json!({}))] }), false),
    ];
    for (name, spec, uses) in cases {
        assert_eq!(uses_secret(&with_spec(spec), "agents-key"), uses, "{name}");
    }
    assert!(!uses_secret(&Pod::default(), "agents-key"), "no spec");
}
