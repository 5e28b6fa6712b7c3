//! PolicyAgent against the real local control plane (`e2e/cluster.sh up`).
//!
//! Each test gets its own namespace, its own stand-in kubelet (which runs the workloads' pods:
//! running, ready, loopback IPs, the agent Secret projected) and its own in-process operator
//! watching only that namespace. Every PolicyAgent uses `connectivityCheck.mode: RolloutOnly`,
//! so confirmation rests on the rollout alone and no agent HTTP server is needed.
//!
//! Waits are watch-based with timeouts; the only plain sleeps are where a test must let time
//! pass to show that nothing happens.

use std::collections::BTreeSet;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use keyward::api::{PolicyAgent, ProvisioningKey};
use keyward::controller::provisioning_key::key_secret_name;
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::conditions::{deployment_rolled_out, statefulset_rolled_out};
use keyward_testbed::{Kubelet, KubeletConfig, KubeletHandle};
use keyward_testbed::{wait_for, wait_for_deleted};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

/// The ProvisioningKey every test uses, and the agent Secret it hands out (a name of its own,
/// so the workloads mount `spec.secretName`, not the default).
const PK: &str = "agents";
const SECRET: &str = "agents-key";

/// The test bed of one test: namespace, stand-in kubelet, in-process operator.
struct Bed {
    ns: TestNamespace,
    kubelet: KubeletHandle,
    op: Operator,
}

impl Bed {
    async fn new(prefix: &str) -> Self {
        Self::with_kubelet(prefix, KubeletConfig::default()).await
    }

    /// The usual start: the key, Deployment `opa` (2 replicas) and PolicyAgent `opa-agents`,
    /// confirmed on the first key; returns its key id.
    async fn confirmed_deployment(&self) -> String {
        self.confirmed_deployment_with(json!({}), 2).await
    }

    /// [`Bed::confirmed_deployment`] with `spec` merged into the key's spec and `replicas` pods.
    async fn confirmed_deployment_with(&self, spec: Value, replicas: i32) -> String {
        let kid1 = self.key_with(spec).await;
        self.deployment("opa", replicas).await;
        self.policy_agent("opa-agents", PK, "Deployment", "opa")
            .await;
        let pas: Api<PolicyAgent> = self.api();
        wait_pa(&pas, "opa-agents", "confirmed", TIMEOUT, |pa| {
            confirmed_on(pa, &kid1)
        })
        .await;
        kid1
    }

    async fn with_kubelet(prefix: &str, kubelet: KubeletConfig) -> Self {
        // Operator and kubelet logs, shown with a failing test's output.
        keyward_testbed::init_tracing();
        let ns = TestNamespace::new(prefix).await;
        let kubelet = Kubelet::start(ns.client(), ns.name(), kubelet);
        let op = Operator::start(ns.name(), Floors::none()).await;
        Bed { ns, kubelet, op }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        self.ns.api()
    }

    async fn finish(self) {
        self.op.stop().await;
        self.kubelet.shutdown().await;
        self.ns.cleanup().await;
    }

    /// Creates the ProvisioningKey (fast rotation: publishDelay 1s, no debounce) and waits until
    /// it is settled; returns the key id its agent Secret carries.
    async fn key(&self) -> String {
        self.key_with(json!({})).await
    }

    /// [`Bed::key`] with `extra` merged into the spec (top-level fields; `rotation` replaces the
    /// default one).
    async fn key_with(&self, extra: Value) -> String {
        let pks: Api<ProvisioningKey> = self.api();
        let mut spec = json!({
            "secretName": SECRET,
            "rotation": { "publishDelay": "1s", "overlap": "1s", "minInterval": "0s" },
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        create_pk(&pks, PK, json!({}), spec).await;
        wait_pk(&pks, PK, "settled on its first key", is_settled).await;
        agent_kid(&self.api()).await
    }

    /// Creates a Deployment of `replicas` agents mounting the agent Secret and waits until its
    /// first rollout is complete (before any PolicyAgent exists: no key id in the template).
    async fn deployment(&self, name: &str, replicas: i32) -> Deployment {
        self.create_deployment(name, replicas, SECRET).await;
        wait_for(&self.api(), name, deployment_rolled_out(), TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("Deployment {name}: first rollout: {e}"))
            .expect("the Deployment exists")
    }

    /// Creates a Deployment of `replicas` agents mounting the Secret `secret`.
    async fn create_deployment(&self, name: &str, replicas: i32, secret: &str) {
        let d: Deployment = serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": { "name": name },
            "spec": {
                "replicas": replicas,
                "selector": { "matchLabels": { "app": name } },
                "template": pod_template(name, secret),
            },
        }))
        .expect("a valid Deployment");
        self.api::<Deployment>()
            .create(&PostParams::default(), &d)
            .await
            .unwrap_or_else(|e| panic!("create Deployment {name}: {e}"));
    }

    /// Creates a PolicyAgent (RolloutOnly) for the workload `kind`/`workload`, using `pk`.
    async fn policy_agent(&self, name: &str, pk: &str, kind: &str, workload: &str) -> PolicyAgent {
        let pa: PolicyAgent = serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1",
            "kind": "PolicyAgent",
            "metadata": { "name": name },
            "spec": {
                "provisioningKeyRef": { "name": pk },
                "workloadRef": { "kind": kind, "name": workload },
                "connectivityCheck": { "mode": "RolloutOnly" },
            },
        }))
        .expect("a valid PolicyAgent");
        self.api::<PolicyAgent>()
            .create(&PostParams::default(), &pa)
            .await
            .unwrap_or_else(|e| panic!("create PolicyAgent {name}: {e}"))
    }
}

/// Agent pods: any image (the stand-in kubelet runs nothing), the agent Secret `secret` as
/// volume `keyward`.
fn pod_template(app: &str, secret: &str) -> Value {
    json!({
        "metadata": { "labels": { "app": app } },
        "spec": {
            "containers": [{
                "name": "agent",
                "image": "example.com/policy-agent:test",
                "volumeMounts": [{ "name": "keyward", "mountPath": "/var/run/keyward", "readOnly": true }],
            }],
            "volumes": [{ "name": "keyward", "secret": { "secretName": secret } }],
        },
    })
}

/// The key id the agent Secret carries now.
async fn agent_kid(secrets: &Api<Secret>) -> String {
    let s = secrets.get(SECRET).await.expect("the agent Secret");
    data(&s, l::DATA_KEY_ID).expect("the agent Secret carries key-id")
}

/// The key id in a Deployment's pod template.
fn template_kid(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(l::KEY_ID)
        .cloned()
}

fn pa_condition<'a>(
    pa: &'a PolicyAgent,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    pa.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Status describes the current generation.
fn pa_observed(pa: &PolicyAgent) -> bool {
    pa.status.as_ref().and_then(|s| s.observed_generation) == pa.metadata.generation
}

/// Phase `Confirmed` on `kid`, Ready=True, for the current generation.
fn confirmed_on(pa: &PolicyAgent, kid: &str) -> bool {
    let Some(s) = pa.status.as_ref() else {
        return false;
    };
    pa_observed(pa)
        && s.phase.as_deref() == Some("Confirmed")
        && s.confirmed_key_id.as_deref() == Some(kid)
        && pa_condition(pa, "Ready").is_some_and(|c| c.status == "True")
}

/// Ready=False with `reason`, for the current generation.
fn pa_not_ready_because(pa: &PolicyAgent, reason: &str) -> bool {
    pa_observed(pa)
        && pa_condition(pa, "Ready").is_some_and(|c| c.status == "False" && c.reason == reason)
}

async fn wait_pa(
    api: &Api<PolicyAgent>,
    name: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&PolicyAgent) -> bool,
) -> PolicyAgent {
    wait_obj(api, name, what, timeout, cond).await
}

/// ReplicaSets controlled by the Deployment.
async fn replica_sets(rss: &Api<ReplicaSet>, d: &Deployment) -> Vec<ReplicaSet> {
    let uid = d.uid().expect("the Deployment has a uid");
    rss.list(&ListParams::default())
        .await
        .expect("list ReplicaSets")
        .items
        .into_iter()
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect()
}

/// Uids of the live (not terminating) pods labelled `app=<app>`.
async fn pod_uids(pods: &Api<Pod>, app: &str) -> BTreeSet<String> {
    pods.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.uid())
        .collect()
}

/// Waits (watch-based) for an Event about the object `regarding` with `reason` whose note
/// satisfies `note`; panics on timeout with the Events seen for that object.
async fn wait_event(
    events: &Api<Event>,
    regarding: &str,
    reason: &str,
    note: impl Fn(&str) -> bool,
) -> Event {
    let matches = |e: &Event| {
        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
            && e.reason.as_deref() == Some(reason)
            && note(e.note.as_deref().unwrap_or_default())
    };
    let mut stream = pin!(
        watcher(events.clone(), watcher::Config::default())
            .default_backoff()
            .applied_objects()
    );
    let found = tokio::time::timeout(TIMEOUT, async {
        while let Some(e) = stream.next().await {
            if let Ok(e) = e
                && matches(&e)
            {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => e,
        _ => {
            let seen: Vec<(Option<String>, Option<String>, Option<String>)> = events
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding))
                .map(|e| (e.type_, e.reason, e.note))
                .collect();
            panic!("no {reason} Event about {regarding} within {TIMEOUT:?}; seen: {seen:#?}")
        }
    }
}

/// Waits until the operator's write counter has not moved for `quiet`; returns it. Polls (a
/// counter has no watch).
async fn quiet_writes(op: &Operator, quiet: Duration) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    let mut last = op.writes();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = op.writes();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the operator kept writing for {TIMEOUT:?} ({last} writes)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Roll, confirm; rotate: roll once more, confirm, and only then revoke the old key.

/// Fails if the roll or the confirmation is missing, if the template carries another key id
/// than the Secret, if the rotation rolls the workload twice (or a later Secret write rolls it
/// again), or if the old key is revoked before the PolicyAgent confirms the new one. For the
/// last, the rotation's pods become ready only 2-3 s after their creation, so the roll takes
/// at least 4 s: a revocation after the 1 s overlap regardless of the PolicyAgent (checked by
/// making the ProvisioningKey ignore its consumers) is seen before the confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_only_agent_is_rolled_and_confirmed() {
    let slow = Arc::new(AtomicBool::new(false));
    let hook = slow.clone();
    let kubelet = KubeletConfig::default().with_ready(move |p: &Pod| {
        !hook.load(Ordering::SeqCst)
            || p.metadata.creation_timestamp.as_ref().is_some_and(|t| {
                k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second() >= 3
            })
    });
    let bed = Bed::with_kubelet("kw-pa-roll", kubelet).await;
    let pks: Api<ProvisioningKey> = bed.api();
    let secrets: Api<Secret> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let rss: Api<ReplicaSet> = bed.api();
    let pas: Api<PolicyAgent> = bed.api();
    let events: Api<Event> = bed.api();

    let kid1 = bed.key().await;
    let d0 = bed.deployment("opa", 2).await;
    assert_eq!(template_kid(&d0), None);
    assert_eq!(replica_sets(&rss, &d0).await.len(), 1);

    bed.policy_agent("opa-agents", PK, "Deployment", "opa")
        .await;
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the first key",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid1),
    )
    .await;
    let d1 = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&d1).as_deref(), Some(kid1.as_str()));
    assert_eq!(
        d1.annotations().get(l::POLICY_AGENT).map(String::as_str),
        Some("opa-agents")
    );
    assert_eq!(
        replica_sets(&rss, &d1).await.len(),
        2,
        "the first roll adds exactly one ReplicaSet"
    );
    let s = pa.status.clone().expect("status");
    assert_eq!(s.phase.as_deref(), Some("Confirmed"));
    assert_eq!(s.target_key_id.as_deref(), Some(kid1.as_str()));
    let pods = s.pods.expect("status.pods");
    assert_eq!(
        (pods.total, pods.on_current_key, pods.confirmed),
        (2, 2, 2),
        "{pods:?}"
    );
    assert!(s.workload.as_ref().is_some_and(|w| w.complete));
    let h = s.history.first().expect("status.history[0]");
    assert_eq!(h.kid, kid1);
    assert!(
        h.rolled_at.is_some() && h.confirmed_at.is_some(),
        "history[0] records the roll and the confirmation: {h:?}"
    );
    assert_eq!(s.history.len(), 1, "{:?}", s.history);
    wait_event(&events, "opa-agents", "RolloutTriggered", |n| {
        n.contains(&format!("to key {kid1}"))
    })
    .await;
    wait_event(&events, "opa-agents", "AgentConfirmed", |n| {
        n.contains(&kid1)
    })
    .await;

    // Rotate, with pods slow to become ready.
    slow.store(true, Ordering::SeqCst);
    merge(
        &pks,
        PK,
        json!({ "metadata": { "annotations": { l::ROTATE: "rotate-1" } } }),
    )
    .await;
    let k2 = wait_obj(
        &secrets,
        &key_secret_name(PK, 2),
        "second key minted",
        TIMEOUT,
        |_| true,
    )
    .await;
    let kid2 = kid(&k2);
    // The moment the old key is seen revoked, the PolicyAgent must already be confirmed on the
    // new one: the ProvisioningKey revokes only on that evidence.
    let old = wait_obj(
        &secrets,
        &key_secret_name(PK, 1),
        "old key revoked",
        TIMEOUT,
        |s| state(s) == "deactivated",
    )
    .await;
    let pa = pas.get_status("opa-agents").await.expect("PolicyAgent");
    assert!(
        confirmed_on(&pa, &kid2),
        "old key {kid1} revoked while the PolicyAgent is not confirmed on {kid2}: {:?}",
        pa.status
    );
    let s = pa.status.clone().expect("status");
    let h = &s.history;
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(
        (h[0].kid.as_str(), h[1].kid.as_str()),
        (kid2.as_str(), kid1.as_str())
    );
    let confirmed_at = h[0]
        .confirmed_at
        .as_deref()
        .and_then(keyward::controller::parse_ts)
        .expect("history[0].confirmedAt");
    assert!(h[0].rolled_at.is_some(), "{h:?}");
    assert!(
        at(&old, l::DEACTIVATED_AT) >= confirmed_at,
        "revoked-at precedes the confirmation"
    );

    let d2 = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&d2).as_deref(), Some(kid2.as_str()));
    let g2 = d2.metadata.generation.expect("generation");
    assert_eq!(
        Some(g2),
        d1.metadata.generation.map(|g| g + 1),
        "the rotation rolls the Deployment exactly once"
    );
    assert_eq!(replica_sets(&rss, &d2).await.len(), 3);
    wait_pk(&pks, PK, "rotation to the second key complete", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    wait_event(&events, PK, "KeyRevoked", |n| {
        n.contains(&kid1)
            && n.contains(&format!(
                "every PolicyAgent (opa-agents) is confirmed on {kid2}"
            ))
    })
    .await;
    // The second roll and confirmation are Events of their own, naming the second key: Events
    // about a key name that key's Secret as `related`, so kube's Recorder does not merge them
    // into the first key's Events (it would keep the first note only).
    wait_event(&events, "opa-agents", "RolloutTriggered", |n| {
        n.contains(&format!("to key {kid2}"))
    })
    .await;
    wait_event(&events, "opa-agents", "AgentConfirmed", |n| {
        n.contains(&kid2)
    })
    .await;

    // The revocation (and the trust bundle write) after the confirmation roll nothing more.
    expect_never(
        &deploys,
        "opa",
        "another roll after the rotation",
        Duration::from_secs(3),
        move |d: Option<&Deployment>| d.is_some_and(|d| d.metadata.generation != Some(g2)),
    )
    .await;
    assert_eq!(replica_sets(&rss, &d2).await.len(), 3);
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 2. One PolicyAgent per workload.

/// The later PolicyAgent is named so that it sorts first: only its age can make it lose. Fails
/// if the newer one takes over (it would roll nothing here, but would report Confirmed), or if
/// the refused one never takes over once the owner is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_policy_agent_for_a_workload_is_refused() {
    let bed = Bed::new("kw-pa-claim").await;
    let pas: Api<PolicyAgent> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let events: Api<Event> = bed.api();
    let kid1 = bed.key().await;
    bed.deployment("opa", 2).await;

    let created = Instant::now();
    let owner = bed.policy_agent("zz-owner", PK, "Deployment", "opa").await;
    wait_pa(&pas, "zz-owner", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    let d = deploys.get("opa").await.expect("the Deployment");
    // creationTimestamp has a resolution of one second.
    tokio::time::sleep_until((created + Duration::from_millis(1100)).into()).await;
    let late = bed.policy_agent("aa-late", PK, "Deployment", "opa").await;
    assert!(
        late.metadata.creation_timestamp > owner.metadata.creation_timestamp,
        "the test needs distinct creation times"
    );
    let pa = wait_pa(&pas, "aa-late", "refused", TIMEOUT, |pa| {
        pa_not_ready_because(pa, "WorkloadClaimed")
    })
    .await;
    let ready = pa_condition(&pa, "Ready").expect("Ready");
    assert!(
        ready.message.contains("PolicyAgent zz-owner"),
        "the message names the owner: {}",
        ready.message
    );
    assert_ne!(
        pa.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Confirmed")
    );
    assert_eq!(
        pa.status.as_ref().and_then(|s| s.confirmed_key_id.clone()),
        None
    );
    let e = wait_event(&events, "aa-late", "WorkloadClaimed", |n| {
        n.contains("zz-owner")
    })
    .await;
    assert_eq!(e.type_.as_deref(), Some("Warning"));

    // The owner works normally and the workload was not touched by the refused one.
    let owner = pas.get_status("zz-owner").await.expect("owner");
    assert!(confirmed_on(&owner, &kid1), "{:?}", owner.status);
    let d_after = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(d_after.metadata.generation, d.metadata.generation);
    assert_eq!(
        d_after
            .annotations()
            .get(l::POLICY_AGENT)
            .map(String::as_str),
        Some("zz-owner")
    );

    // The owner goes: the refused one takes over (the template already runs the key: no roll).
    pas.delete("zz-owner", &DeleteParams::default())
        .await
        .expect("delete the owner");
    wait_pa(
        &pas,
        "aa-late",
        "takes over once the owner is gone",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid1),
    )
    .await;
    let d_end = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(d_end.metadata.generation, d.metadata.generation);
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Deleting a PolicyAgent leaves its workload alone.

/// Fails if deleting the PolicyAgent changes the workload (say, a cleanup that removes the
/// key-id annotation from the pod template: a new generation and new pods).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_policy_agent_does_not_restart_its_workload() {
    let bed = Bed::new("kw-pa-delete").await;
    let pas: Api<PolicyAgent> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let pods: Api<Pod> = bed.api();
    let kid1 = bed.key().await;
    bed.deployment("opa", 2).await;
    let pa = bed
        .policy_agent("opa-agents", PK, "Deployment", "opa")
        .await;
    wait_pa(&pas, "opa-agents", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    let d = wait_for(&deploys, "opa", deployment_rolled_out(), TIMEOUT)
        .await
        .expect("rolled out")
        .expect("the Deployment");
    let generation = d.metadata.generation;
    let template = d.spec.clone().expect("spec").template;
    assert_eq!(template_kid(&d).as_deref(), Some(kid1.as_str()));
    let before = pod_uids(&pods, "opa").await;
    assert_eq!(before.len(), 2);

    pas.delete("opa-agents", &DeleteParams::default())
        .await
        .expect("delete the PolicyAgent");
    wait_for_deleted(&pas, "opa-agents", &pa.uid().expect("uid"), TIMEOUT)
        .await
        .expect("the PolicyAgent is gone");
    expect_never(
        &deploys,
        "opa",
        "a change of the Deployment after its PolicyAgent was deleted",
        Duration::from_secs(4),
        move |d: Option<&Deployment>| {
            d.is_some_and(|d| {
                d.metadata.generation != generation
                    || d.spec.as_ref().map(|s| &s.template) != Some(&template)
            })
        },
    )
    .await;
    assert_eq!(
        pod_uids(&pods, "opa").await,
        before,
        "the pods were replaced"
    );
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Missing references.

/// Both PolicyAgents start with a reference that does not resolve, then the missing object is
/// created and each proceeds to Confirmed. Fails if a missing reference is reported with
/// another reason, or if the PolicyAgent does not recover once the object exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_references_are_reported() {
    let bed = Bed::new("kw-pa-missing").await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let secrets: Api<Secret> = bed.api();
    let kid1 = bed.key().await;
    // Its pods stay pending until the key's Secret exists.
    bed.create_deployment("for-late-key", 1, "late-key-secret")
        .await;
    bed.policy_agent("no-key", "late-key", "Deployment", "for-late-key")
        .await;
    bed.policy_agent("no-workload", PK, "Deployment", "late-workload")
        .await;
    let pa = wait_pa(&pas, "no-key", "ProvisioningKeyNotFound", TIMEOUT, |pa| {
        pa_not_ready_because(pa, "ProvisioningKeyNotFound")
    })
    .await;
    assert_eq!(
        pa.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    assert!(
        pa_condition(&pa, "Ready").is_some_and(|c| c.message.contains("late-key")),
        "{:?}",
        pa.status
    );
    let pa = wait_pa(&pas, "no-workload", "WorkloadNotFound", TIMEOUT, |pa| {
        pa_not_ready_because(pa, "WorkloadNotFound")
    })
    .await;
    assert!(
        pa_condition(&pa, "Ready").is_some_and(|c| c.message.contains("late-workload")),
        "{:?}",
        pa.status
    );

    // Create what is missing; both proceed (woken by the new agent Secret, the new Deployment).
    let spec = json!({ "secretName": "late-key-secret" });
    create_pk(&pks, "late-key", json!({}), spec).await;
    bed.deployment("late-workload", 2).await;
    let late_pk = wait_pk(&pks, "late-key", "settled", is_settled).await;
    let late_kid = late_pk
        .status
        .and_then(|s| s.current_key)
        .map(|k| k.kid)
        .expect("current key");
    assert_ne!(late_kid, kid1);
    assert_eq!(
        data(
            &secrets.get("late-key-secret").await.expect("Secret"),
            l::DATA_KEY_ID
        )
        .as_deref(),
        Some(late_kid.as_str())
    );
    let (a, b) = tokio::join!(
        wait_pa(
            &pas,
            "no-key",
            "confirmed once the key exists",
            TIMEOUT,
            |pa| confirmed_on(pa, &late_kid)
        ),
        wait_pa(
            &pas,
            "no-workload",
            "confirmed once the workload exists",
            TIMEOUT,
            |pa| confirmed_on(pa, &kid1)
        ),
    );
    assert_eq!(a.status.and_then(|s| s.pods).map(|p| p.total), Some(1));
    assert_eq!(b.status.and_then(|s| s.pods).map(|p| p.total), Some(2));
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A paused Deployment.

/// Confirmed on the first key, then paused and rotated: the roll is written but cannot proceed,
/// so the PolicyAgent reports Stalled/DeploymentPaused (with a Warning Event) and the old key
/// stays trusted; resumed, it confirms and the old key is revoked. Fails if the pause is
/// reported as an ordinary rollout in progress, or if the old key is revoked during the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_deployment_is_reported_stalled() {
    let bed = Bed::new("kw-pa-paused").await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let secrets: Api<Secret> = bed.api();
    let cms: Api<ConfigMap> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let events: Api<Event> = bed.api();
    let kid1 = bed.confirmed_deployment().await;
    merge(&deploys, "opa", json!({ "spec": { "paused": true } })).await;
    merge(
        &pks,
        PK,
        json!({ "metadata": { "annotations": { l::ROTATE: "rotate-1" } } }),
    )
    .await;
    let kid2 = kid(&wait_obj(
        &secrets,
        &key_secret_name(PK, 2),
        "second key minted",
        TIMEOUT,
        |_| true,
    )
    .await);

    let pa = wait_pa(
        &pas,
        "opa-agents",
        "Stalled on the paused Deployment",
        TIMEOUT,
        |pa| {
            pa.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Stalled")
                    && s.target_key_id.as_deref() == Some(kid2.as_str())
            })
        },
    )
    .await;
    let s = pa.status.clone().expect("status");
    assert_eq!(s.target_key_id.as_deref(), Some(kid2.as_str()));
    assert_eq!(s.confirmed_key_id.as_deref(), Some(kid1.as_str()));
    assert!(
        ["Ready", "Connected"].iter().any(|t| {
            pa_condition(&pa, t)
                .is_some_and(|c| c.status == "False" && c.reason == "DeploymentPaused")
        }),
        "{:?}",
        s.conditions
    );
    // The roll was written (the template runs the new key) but nothing rolls.
    let d = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&d).as_deref(), Some(kid2.as_str()));
    let e = wait_event(&events, "opa-agents", "DeploymentPaused", |_| true).await;
    assert_eq!(e.type_.as_deref(), Some("Warning"));

    // The old key stays trusted while the agents cannot move.
    expect_never(
        &secrets,
        &key_secret_name(PK, 1),
        "the old key revoked while the Deployment is paused",
        Duration::from_secs(5),
        |s: Option<&Secret>| s.is_none_or(|s| state(s) == "deactivated"),
    )
    .await;
    let bundle = cms.get(&format!("{PK}-trust")).await.expect("trust bundle");
    let jwks = bundle
        .data
        .as_ref()
        .and_then(|d| d.get(l::DATA_JWKS))
        .expect("jwks.json");
    assert!(
        jwks.contains(&kid1),
        "the old key left the trust bundle: {jwks}"
    );

    // Resumed: the Deployment change wakes the PolicyAgent (without that watch it would look
    // again only 30 s after the stall, some 25 s from here: past the 15 s allowed), the rollout
    // proceeds, the PolicyAgent confirms and the old key is revoked.
    merge(&deploys, "opa", json!({ "spec": { "paused": false } })).await;
    wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the new key after the resume",
        Duration::from_secs(15),
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    wait_pk(&pks, PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 6. A partitioned StatefulSet.

/// Fails if a partition is waited on as an ordinary rollout (phase Rolling, no Warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_partition_is_reported() {
    let bed = Bed::new("kw-pa-partition").await;
    let pas: Api<PolicyAgent> = bed.api();
    let stss: Api<StatefulSet> = bed.api();
    let pods: Api<Pod> = bed.api();
    let events: Api<Event> = bed.api();
    let kid1 = bed.key().await;
    let sts: StatefulSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": "opa" },
        "spec": {
            "replicas": 2,
            "serviceName": "opa",
            "selector": { "matchLabels": { "app": "opa" } },
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "partition": 1 } },
            "template": pod_template("opa", SECRET),
        },
    }))
    .expect("a valid StatefulSet");
    stss.create(&PostParams::default(), &sts)
        .await
        .expect("create the StatefulSet");
    wait_for(&stss, "opa", statefulset_rolled_out(), TIMEOUT)
        .await
        .expect("the StatefulSet runs");
    bed.policy_agent("opa-agents", PK, "StatefulSet", "opa")
        .await;
    let pa = wait_pa(&pas, "opa-agents", "Partitioned", TIMEOUT, |pa| {
        pa_not_ready_because(pa, "Partitioned")
    })
    .await;
    let s = pa.status.clone().expect("status");
    assert_eq!(s.phase.as_deref(), Some("Stalled"));
    assert_eq!(s.target_key_id.as_deref(), Some(kid1.as_str()));
    assert_eq!(s.confirmed_key_id, None);
    let ready = pa_condition(&pa, "Ready").expect("Ready");
    assert!(
        ready.message.contains("partition is 1"),
        "{}",
        ready.message
    );
    let e = wait_event(&events, "opa-agents", "Partitioned", |_| true).await;
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    // The roll was written; the pod below the partition keeps the old template.
    let sts = stss.get("opa").await.expect("the StatefulSet");
    let kid_in_template = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(l::KEY_ID).cloned());
    assert_eq!(kid_in_template.as_deref(), Some(kid1.as_str()));
    let pod0 = pods.get("opa-0").await.expect("pod opa-0");
    assert_eq!(pod0.annotations().get(l::KEY_ID), None);
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 7. A settled PolicyAgent costs nothing.

/// After confirmation the counter of the operator's mutating requests must stand still for 5 s
/// while both controllers reconcile again: label changes on the PolicyAgent and on its
/// Deployment are watch events for the PolicyAgent controller (it watches both) and, for the
/// PolicyAgent, for the ProvisioningKey controller (it watches PolicyAgents). Fails on any
/// write per reconcile: a status rewritten with a new lastTransitionTime or compared against a
/// stale copy, an Event per reconcile, a template patched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_policy_agent_makes_no_writes() {
    let bed = Bed::new("kw-pa-quiet").await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let kid1 = bed.confirmed_deployment().await;
    wait_pk(&pks, PK, "settled", is_settled).await;
    let before = quiet_writes(&bed.op, Duration::from_millis(1500)).await;
    let start = Instant::now();
    for i in 1..=2 {
        let poke = json!({ "metadata": { "labels": { "example.com/poke": i.to_string() } } });
        tokio::time::sleep(Duration::from_secs(1)).await;
        merge(&pas, "opa-agents", poke.clone()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        merge(&deploys, "opa", poke).await;
    }
    tokio::time::sleep_until((start + Duration::from_secs(5)).into()).await;
    let after = bed.op.writes();
    assert_eq!(
        after,
        before,
        "a settled PolicyAgent made {} writes in 5 s",
        after - before
    );
    let pa = pas.get_status("opa-agents").await.expect("PolicyAgent");
    assert!(confirmed_on(&pa, &kid1), "{:?}", pa.status);
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 8. Ordinary cluster life: evictions, scaling to zero, replaced and re-pointed workloads.

/// Holds the pods of one app unready: those created at or after the moment [`Hold::start`]
/// was called, until [`Hold::release`]. Pods created before keep their readiness.
#[derive(Clone, Default)]
struct Hold {
    on: Arc<AtomicBool>,
    cutoff: Arc<AtomicI64>,
    app: Arc<std::sync::Mutex<String>>,
}

impl Hold {
    fn kubelet(&self) -> KubeletConfig {
        let hold = self.clone();
        KubeletConfig::default().with_ready(move |p: &Pod| !hold.holds(p))
    }

    fn holds(&self, p: &Pod) -> bool {
        let app = self.app.lock().map(|a| a.clone()).unwrap_or_default();
        self.on.load(Ordering::SeqCst)
            && p.labels().get("app") == Some(&app)
            && p.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0.as_second() >= self.cutoff.load(Ordering::SeqCst))
    }

    /// From now on, new pods of `app` stay unready. Waits just over a second first: creation
    /// timestamps have a resolution of one second, and earlier pods must fall before the cutoff.
    async fn start(&self, app: &str) {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        if let Ok(mut a) = self.app.lock() {
            *a = app.to_string();
        }
        self.cutoff.store(
            k8s_openapi::jiff::Timestamp::now().as_second(),
            Ordering::SeqCst,
        );
        self.on.store(true, Ordering::SeqCst);
    }

    fn release(&self) {
        self.on.store(false, Ordering::SeqCst);
    }
}

/// The recorded confirmation: (confirmedKeyId, confirmedWorkloadUid, confirmedRevision).
fn evidence(pa: &PolicyAgent) -> (Option<String>, Option<String>, Option<String>) {
    let s = pa.status.clone().unwrap_or_default();
    (
        s.confirmed_key_id,
        s.confirmed_workload_uid,
        s.confirmed_revision,
    )
}

/// The `pod-template-hash` of the Deployment's ReplicaSet at its current revision.
async fn current_hash(rss: &Api<ReplicaSet>, d: &Deployment) -> String {
    let revision = d
        .annotations()
        .get("deployment.kubernetes.io/revision")
        .cloned()
        .expect("the Deployment has a revision");
    replica_sets(rss, d)
        .await
        .into_iter()
        .find(|rs| rs.annotations().get("deployment.kubernetes.io/revision") == Some(&revision))
        .and_then(|rs| rs.labels().get("pod-template-hash").cloned())
        .expect("the current ReplicaSet")
}

/// Rotates the key with the annotation; returns the new key id.
async fn rotate(bed: &Bed, seq: u32) -> String {
    let pks: Api<ProvisioningKey> = bed.api();
    merge(
        &pks,
        PK,
        json!({ "metadata": { "annotations": { l::ROTATE: format!("rotate-{seq}") } } }),
    )
    .await;
    kid(&wait_obj(
        &bed.api::<Secret>(),
        &key_secret_name(PK, seq),
        "next key minted",
        TIMEOUT,
        |_| true,
    )
    .await)
}

/// An evicted pod (phase Failed, reason Evicted) stays behind as an API object. Fails if it is
/// counted as an agent pod: it carries the old key and would block the confirmation forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_pod_does_not_block_confirmation() {
    let bed = Bed::new("kw-pa-evicted").await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let pods: Api<Pod> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let kid1 = bed.confirmed_deployment().await;

    // Evict one pod as the kubelet does under node pressure: status only, through pods/status.
    // The stand-in kubelet reports a pod's status only when its readiness changes, so it leaves
    // the Failed phase alone.
    let evicted = pod_uids(&pods, "opa")
        .await
        .into_iter()
        .next()
        .expect("a pod");
    let name = pods
        .list(&ListParams::default().labels("app=opa"))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .find(|p| p.uid().as_deref() == Some(evicted.as_str()))
        .map(|p| p.name_any())
        .expect("the pod");
    let status = json!({ "status": {
        "phase": "Failed", "reason": "Evicted",
        "message": "The node was low on resource: memory.",
    } });
    pods.patch_status(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .expect("evict the pod");
    // The ReplicaSet replaces it; the Deployment is whole again with the evicted pod left over.
    wait_for(&deploys, "opa", deployment_rolled_out(), TIMEOUT)
        .await
        .expect("the Deployment replaces the evicted pod");

    let kid2 = rotate(&bed, 2).await;
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the new key despite the evicted pod",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    assert_eq!(pa.status.and_then(|s| s.pods).map(|p| p.total), Some(2));
    let left = pods
        .get(&name)
        .await
        .expect("the evicted pod is still there");
    assert_eq!(
        left.status.and_then(|s| s.phase).as_deref(),
        Some("Failed"),
        "the test needs the evicted pod to stay"
    );
    wait_pk(&pks, PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

/// A Deployment scaled to zero has no pod to wait for: its template carries the key, so once
/// rolled it is confirmed and the old key revoked. Fails if no pods is taken for "not yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_to_zero_workload_confirms_and_old_key_is_revoked() {
    let bed = Bed::new("kw-pa-zero").await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let pods: Api<Pod> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let rss: Api<ReplicaSet> = bed.api();
    let kid1 = bed.confirmed_deployment().await;
    merge(&deploys, "opa", json!({ "spec": { "replicas": 0 } })).await;
    wait_for(&deploys, "opa", deployment_rolled_out(), TIMEOUT)
        .await
        .expect("scaled to zero");
    keyward_testbed::eventually(
        "the pods are gone",
        TIMEOUT,
        Duration::from_millis(250),
        || async {
            let left = pods
                .list(&ListParams::default().labels("app=opa"))
                .await
                .ok()?;
            left.items.is_empty().then_some(())
        },
    )
    .await
    .expect("pods gone");
    // Scaling is no new revision: the confirmation stands.
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "still confirmed, with no pod",
        TIMEOUT,
        |pa| {
            confirmed_on(pa, &kid1)
                && pa
                    .status
                    .as_ref()
                    .and_then(|s| s.pods.as_ref())
                    .map(|p| p.total)
                    == Some(0)
        },
    )
    .await;
    assert_eq!(pa.status.and_then(|s| s.pods).map(|p| p.total), Some(0));

    let kid2 = rotate(&bed, 2).await;
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the new key with no pods",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    let d = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&d).as_deref(), Some(kid2.as_str()));
    assert_eq!(
        evidence(&pa),
        (
            Some(kid2.clone()),
            d.uid(),
            Some(current_hash(&rss, &d).await)
        ),
        "the confirmation names the rolled template's revision"
    );
    wait_pk(&pks, PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

/// The usual start with a second, paused consumer that holds the old key trusted: Deployments
/// `opa` (2 pods) and `other` (1 pod, paused after its first confirmation), PolicyAgents
/// `opa-agents` and `other-agents`, and Deployments `extra` (2 pods each, no PolicyAgent);
/// the key rotated; `opa-agents` confirmed on the new key, `other-agents` stalled. Returns
/// (old key, new key).
async fn rotation_held_by_a_paused_agent(bed: &Bed, extra: &[&str]) -> (String, String) {
    let pas: Api<PolicyAgent> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let secrets: Api<Secret> = bed.api();
    let kid1 = bed.confirmed_deployment().await;
    for name in extra {
        bed.deployment(name, 2).await;
    }
    bed.deployment("other", 1).await;
    bed.policy_agent("other-agents", PK, "Deployment", "other")
        .await;
    wait_pa(&pas, "other-agents", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    merge(&deploys, "other", json!({ "spec": { "paused": true } })).await;
    let kid2 = rotate(bed, 2).await;
    wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the new key",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    wait_pa(&pas, "other-agents", "stalled", TIMEOUT, |pa| {
        pa_not_ready_because(pa, "DeploymentPaused")
    })
    .await;
    assert_ne!(
        state(&secrets.get(&key_secret_name(PK, 1)).await.expect("key 1")),
        "deactivated"
    );
    (kid1, kid2)
}

/// Resumes `other`, waits for `other-agents` to confirm `kid2`, then expects the old key to
/// stay trusted while `opa-agents` is not confirmed on the workload it names now.
async fn old_key_stays_while_unconfirmed(bed: &Bed, kid2: &str) {
    let pas: Api<PolicyAgent> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    merge(&deploys, "other", json!({ "spec": { "paused": false } })).await;
    wait_pa(
        &pas,
        "other-agents",
        "confirmed after the resume",
        TIMEOUT,
        |pa| confirmed_on(pa, kid2),
    )
    .await;
    // Holds with the current ProvisioningKey code because the PolicyAgent no longer reports a
    // confirmation; a revocation that also checks confirmedWorkloadUid/confirmedRevision keeps
    // it so.
    expect_never(
        &bed.api::<Secret>(),
        &key_secret_name(PK, 1),
        "the old key revoked while pods of the named workload run it",
        Duration::from_secs(4),
        |s: Option<&Secret>| s.is_some_and(|s| state(s) == "deactivated"),
    )
    .await;
}

/// `opa` is deleted and re-created under the same name from a copy taken before the rotation
/// (its template names the old key), while the old key is still trusted. Fails if the
/// confirmation measured on the deleted Deployment is kept (and lets the old key be revoked
/// while the new Deployment's pods run it), or if the new Deployment is not rolled and
/// confirmed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_workload_never_inherits_the_confirmation() {
    let hold = Hold::default();
    let bed = Bed::with_kubelet("kw-pa-replaced", hold.kubelet()).await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let rss: Api<ReplicaSet> = bed.api();
    let (kid1, kid2) = rotation_held_by_a_paused_agent(&bed, &[]).await;
    let before = deploys.get("opa").await.expect("the Deployment");
    let old_uid = before.uid().expect("uid");
    assert_eq!(
        evidence(&pas.get_status("opa-agents").await.expect("pa")).1,
        Some(old_uid.clone())
    );

    // A copy from before the rotation: the template names the old key.
    let mut copy: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "opa" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "opa" } },
            "template": pod_template("opa", SECRET),
        },
    }))
    .expect("a valid Deployment");
    if let Some(t) = copy.spec.as_mut().map(|s| &mut s.template) {
        t.metadata
            .get_or_insert_default()
            .annotations
            .get_or_insert_default()
            .insert(l::KEY_ID.to_string(), kid1.clone());
    }
    hold.start("opa").await;
    deploys
        .delete("opa", &DeleteParams::default())
        .await
        .expect("delete the Deployment");
    wait_for_deleted(&deploys, "opa", &old_uid, TIMEOUT)
        .await
        .expect("the Deployment is gone");
    let new_uid = deploys
        .create(&PostParams::default(), &copy)
        .await
        .expect("re-create the Deployment")
        .uid()
        .expect("uid");
    assert_ne!(new_uid, old_uid);

    let pa = wait_pa(
        &pas,
        "opa-agents",
        "drops the confirmation measured on the deleted Deployment",
        TIMEOUT,
        |pa| {
            evidence(pa) == (None, None, None)
                && pa
                    .status
                    .as_ref()
                    .is_some_and(|s| s.target_key_id.as_deref() == Some(kid2.as_str()))
        },
    )
    .await;
    assert_ne!(
        pa.status.and_then(|s| s.phase).as_deref(),
        Some("Confirmed")
    );
    old_key_stays_while_unconfirmed(&bed, &kid2).await;
    let pa = pas.get_status("opa-agents").await.expect("pa");
    assert_ne!(evidence(&pa).0, Some(kid2.clone()), "{:?}", pa.status);

    hold.release();
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the new Deployment",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    let d = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&d).as_deref(), Some(kid2.as_str()), "rolled");
    assert_eq!(
        evidence(&pa),
        (
            Some(kid2.clone()),
            Some(new_uid),
            Some(current_hash(&rss, &d).await)
        )
    );
    wait_pk(&pks, PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

/// `opa-agents`, confirmed on the new key with `opa`, is re-pointed to Deployment `next`, whose
/// pods started before the rotation. Fails if `confirmedKeyId` is carried over to `next`, or if
/// `next` is not rolled and confirmed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repointed_policy_agent_does_not_carry_the_confirmation() {
    let hold = Hold::default();
    let bed = Bed::with_kubelet("kw-pa-repoint", hold.kubelet()).await;
    let pas: Api<PolicyAgent> = bed.api();
    let pks: Api<ProvisioningKey> = bed.api();
    let deploys: Api<Deployment> = bed.api();
    let rss: Api<ReplicaSet> = bed.api();
    // `next` runs before the rotation: its pods hold the first key.
    let (kid1, kid2) = rotation_held_by_a_paused_agent(&bed, &["next"]).await;
    let next = deploys.get("next").await.expect("the Deployment");

    hold.start("next").await;
    let pa = merge(
        &pas,
        "opa-agents",
        json!({ "spec": { "workloadRef": { "kind": "Deployment", "name": "next" } } }),
    )
    .await;
    let generation = pa.metadata.generation;
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "the re-pointed PolicyAgent drops the confirmation",
        TIMEOUT,
        |pa| pa.status.as_ref().and_then(|s| s.observed_generation) == generation,
    )
    .await;
    assert_eq!(evidence(&pa), (None, None, None), "{:?}", pa.status);
    old_key_stays_while_unconfirmed(&bed, &kid2).await;
    let pa = pas.get_status("opa-agents").await.expect("pa");
    assert_eq!(evidence(&pa), (None, None, None), "{:?}", pa.status);

    hold.release();
    let pa = wait_pa(
        &pas,
        "opa-agents",
        "confirmed on the Deployment it names now",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    let d = deploys.get("next").await.expect("the Deployment");
    assert_eq!(template_kid(&d).as_deref(), Some(kid2.as_str()), "rolled");
    assert_eq!(
        evidence(&pa),
        (
            Some(kid2.clone()),
            next.uid(),
            Some(current_hash(&rss, &d).await)
        )
    );
    // `opa`, which the PolicyAgent no longer names, still runs and mounts the agent Secret: its
    // pods are consumers no PolicyAgent covers, so the old key waits the time fallback (one
    // token lifetime here) instead of being revoked on the PolicyAgents' word alone.
    let pk = wait_pk(&pks, PK, "uncovered consumers reported", |pk| {
        pk.status
            .as_ref()
            .and_then(|s| s.uncovered_consumers.as_ref())
            .is_some_and(|u| u.workloads == vec!["Deployment/opa".to_string()])
    })
    .await;
    assert!(
        !rotated_to(&pk, &kid2, &[&kid1]),
        "revoked with uncovered consumers"
    );
    // Once `opa` is gone, the evidence of the PolicyAgents suffices.
    merge(&deploys, "opa", json!({ "spec": { "replicas": 0 } })).await;
    wait_pk(&pks, PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Ordinary cluster life: consumers that no PolicyAgent covers.

/// Tokens of 20 s and an overlap of 2 s: the last token of the old key outlives the overlap, so
/// a revocation that ignores it shows.
fn short_tokens() -> Value {
    json!({
        "rotation": { "publishDelay": "1s", "overlap": "2s", "minInterval": "0s" },
        "token": { "ttl": "20s" },
    })
}

/// Issue row: "A second workload mounts the agent Secret but no PolicyAgent covers it: the old
/// key was revoked 3.6 s after hand-out, while that workload's pods still held it." Now its
/// pods are uncovered consumers: the old key waits `overlap` from the hand-out and, being sealed,
/// until the last token it signed has expired (plus the allowed clock skew, zero here); a
/// Warning Event and the status name the workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncovered_consumers_keep_the_old_key_until_its_last_token_expired() {
    let bed = Bed::new("kw-uncovered").await;
    let pks: Api<ProvisioningKey> = bed.api();
    let secrets: Api<Secret> = bed.api();
    let kid1 = bed.confirmed_deployment_with(short_tokens(), 1).await;
    // The second workload: same Secret, no PolicyAgent.
    bed.deployment("other", 2).await;

    // The token the uncovered pods may hold: it expires no earlier than this.
    let s = secrets.get(SECRET).await.expect("the agent Secret");
    let token = data(&s, l::DATA_TOKEN).expect("a token");
    let (_, claims) = keyward::keys::decode_token_unverified(&token).expect("decodes");
    merge(
        &pks,
        PK,
        json!({ "metadata": { "annotations": { l::ROTATE: "1" } } }),
    )
    .await;
    let k1 = key_secret_name(PK, 1);
    let revoked = wait_obj(
        &secrets,
        &k1,
        "the old key revoked",
        Duration::from_secs(60),
        |s| state(s) == "deactivated",
    )
    .await;
    let kid2 = agent_kid(&secrets).await;
    assert_ne!(kid1, kid2);
    let revoked_at = at(&revoked, l::DEACTIVATED_AT);
    assert!(
        revoked_at.timestamp() >= claims.exp,
        "old key revoked at {revoked_at}, before the last token it signed expired ({})",
        claims.exp
    );
    let agent = secrets.get(SECRET).await.expect("the agent Secret");
    let handed_out = agent
        .annotations()
        .get(l::HANDED_OUT_AT)
        .and_then(|v| keyward::controller::parse_ts(v))
        .expect("the agent Secret records when its key was handed out");
    assert!(
        revoked_at >= handed_out + chrono::Duration::seconds(2),
        "old key revoked at {revoked_at}, less than overlap after the hand-out at {handed_out}"
    );
    let pk = pks.get(PK).await.expect("the key");
    let uncovered = pk
        .status
        .and_then(|s| s.uncovered_consumers)
        .expect("status reports uncovered consumers");
    assert_eq!(uncovered.count, 2);
    assert_eq!(uncovered.workloads, vec!["Deployment/other".to_string()]);
    let events: Api<Event> = bed.api();
    wait_event(&events, PK, "UncoveredConsumers", |n| {
        n.contains("Deployment/other")
    })
    .await;
    bed.finish().await;
}

/// A PolicyAgent deleted mid-rotation: its workload's pods, still on the old key (their
/// rollout is held back), become consumers that no PolicyAgent covers. The old key must then
/// wait the time fallback (the last token it signed expired), not be revoked at once because no
/// PolicyAgent references the key any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_agent_deleted_mid_rotation_leaves_its_pods_covered_by_the_time_fallback() {
    let hold = Hold::default();
    let bed = Bed::with_kubelet("kw-pa-deleted-mid", hold.kubelet()).await;
    let pks: Api<ProvisioningKey> = bed.api();
    let pas: Api<PolicyAgent> = bed.api();
    let secrets: Api<Secret> = bed.api();
    bed.confirmed_deployment_with(short_tokens(), 2).await;

    hold.start("opa").await;
    let s = secrets.get(SECRET).await.expect("the agent Secret");
    let token = data(&s, l::DATA_TOKEN).expect("a token");
    let (_, claims) = keyward::keys::decode_token_unverified(&token).expect("decodes");
    let kid2 = rotate(&bed, 2).await;
    wait_pa(&pas, "opa-agents", "rolled to the new key", TIMEOUT, |pa| {
        pa.status
            .as_ref()
            .is_some_and(|s| s.target_key_id.as_deref() == Some(kid2.as_str()))
    })
    .await;
    pas.delete("opa-agents", &DeleteParams::default())
        .await
        .expect("delete the PolicyAgent");

    let revoked = wait_obj(
        &secrets,
        &key_secret_name(PK, 1),
        "the old key revoked",
        Duration::from_secs(60),
        |s| state(s) == "deactivated",
    )
    .await;
    let revoked_at = at(&revoked, l::DEACTIVATED_AT);
    assert!(
        revoked_at.timestamp() >= claims.exp,
        "old key revoked at {revoked_at}, before the last token it signed expired ({}), while pods of Deployment opa still ran it",
        claims.exp
    );
    let pk = pks.get(PK).await.expect("the key");
    let uncovered = pk
        .status
        .and_then(|s| s.uncovered_consumers)
        .expect("status reports uncovered consumers");
    assert!(
        uncovered.workloads.contains(&"Deployment/opa".to_string()),
        "{uncovered:?}"
    );
    hold.release();
    bed.finish().await;
}

/// Terminating pods whose containers still run hold the key they started with: the stand-in
/// kubelet keeps a terminating pod (and its agent) running for its grace period, as a kubelet
/// does. While any pod of the old template still exists, the old key must not be revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pods_hold_the_old_key_until_they_are_gone() {
    let bed = Bed::with_kubelet(
        "kw-pa-grace",
        KubeletConfig::default().with_grace_period(true),
    )
    .await;
    let kid1 = bed.key().await;
    let mut template = pod_template("opa", SECRET);
    template["spec"]["terminationGracePeriodSeconds"] = json!(6);
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "opa" },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "opa" } },
            "template": template,
        },
    }))
    .expect("a valid Deployment");
    bed.api::<Deployment>()
        .create(&PostParams::default(), &d)
        .await
        .expect("create the Deployment");
    bed.policy_agent("opa-agents", PK, "Deployment", "opa")
        .await;
    let pas: Api<PolicyAgent> = bed.api();
    wait_pa(&pas, "opa-agents", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    let pods: Api<Pod> = bed.api();
    let old = pod_uids(&pods, "opa").await;
    assert_eq!(old.len(), 2);
    let kid2 = rotate(&bed, 2).await;
    let secrets: Api<Secret> = bed.api();
    let k1 = key_secret_name(PK, 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut saw_terminating = false;
    loop {
        let present: Vec<Pod> = pods
            .list(&ListParams::default().labels("app=opa"))
            .await
            .expect("list pods")
            .items
            .into_iter()
            .filter(|p| p.uid().is_some_and(|u| old.contains(&u)))
            .collect();
        saw_terminating |= present
            .iter()
            .any(|p| p.metadata.deletion_timestamp.is_some());
        let state = state(&secrets.get(&k1).await.expect("key 1"));
        if present.is_empty() {
            break;
        }
        assert_ne!(
            state,
            "deactivated",
            "old key revoked while {} pod(s) that started with it still exist",
            present.len()
        );
        assert!(Instant::now() < deadline, "old pods never went away");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        saw_terminating,
        "no old pod was seen terminating: the grace period was not honoured"
    );
    wait_pk(&bed.api::<ProvisioningKey>(), PK, "old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}

/// A per-key roll budget (issue "The key's whole life", part 4): three Deployments on one key
/// with `rotation.maxConcurrentRolls: 1`. Sampled every 50 ms during the rotation, at most one of
/// them has a rollout in progress; the others report `RolloutQueued` naming the budget (in
/// `Connected`); and the
/// rotation completes once all three are confirmed (the old key is then revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_roll_budget_rolls_its_workloads_one_at_a_time() {
    let bed = Bed::new("kw-budget").await;
    let kid1 = bed
        .key_with(json!({ "rotation": {
            "publishDelay": "1s", "overlap": "1s", "minInterval": "0s", "maxConcurrentRolls": 1
        } }))
        .await;
    let names = ["a1", "a2", "a3"];
    for n in names {
        bed.deployment(n, 1).await;
        bed.policy_agent(&format!("{n}-agents"), PK, "Deployment", n)
            .await;
    }
    let pas: Api<PolicyAgent> = bed.api();
    for n in names {
        wait_pa(&pas, &format!("{n}-agents"), "confirmed", TIMEOUT, |pa| {
            confirmed_on(pa, &kid1)
        })
        .await;
    }
    let deployments: Api<Deployment> = bed.api();
    let rolling_now = || async {
        let list = deployments.list(&Default::default()).await.expect("list");
        list.items
            .iter()
            .filter(|d| {
                let st = d.status.clone().unwrap_or_default();
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                st.observed_generation < d.metadata.generation
                    || st.updated_replicas.unwrap_or(0) < want
                    || st.available_replicas.unwrap_or(0) < want
            })
            .count()
    };
    let kid2 = rotate(&bed, 2).await;
    let mut most = 0;
    let mut queued_seen = false;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        most = most.max(rolling_now().await);
        let list = pas
            .list(&Default::default())
            .await
            .expect("list PolicyAgents");
        queued_seen |= list.items.iter().any(|pa| {
            // During a rotation Ready stays True (KeyRotationInProgress); the wait is in
            // Connected.
            pa_condition(pa, "Connected").is_some_and(|c| {
                c.reason == "RolloutQueued" && c.message.contains("maxConcurrentRolls")
            })
        });
        if list.items.iter().all(|pa| confirmed_on(pa, &kid2)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not all confirmed on {kid2}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        most <= 1,
        "{most} workloads of one key rolled at once (budget 1)"
    );
    assert!(
        queued_seen,
        "no PolicyAgent reported RolloutQueued naming the budget"
    );
    let pks: Api<ProvisioningKey> = bed.api();
    wait_pk(&pks, PK, "rotation complete", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    bed.finish().await;
}
