//! Smoke tests of the test bed against the local control plane (`e2e/cluster.sh up`, then
//! `eval "$(e2e/cluster.sh env)"`): Deployments and StatefulSets run and roll through the
//! stand-in kubelet, agents answer on their pod IPs and see Secret updates, and a rollout
//! wait fails when pods are not ready.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::TestNamespace;
use anyhow::{Context, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Secret};
use keyward_testbed::{
    HttpAgent, Kubelet, KubeletConfig, POD_NAME_HEADER, conditions, eventually, init_tracing,
    wait_for,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::Condition;
use kube::{Api, ResourceExt};
use serde_json::json;

const IMAGE: &str = "keyward.invalid/agent:test";
const WAIT: Duration = Duration::from_secs(40);

fn deployment(name: &str, replicas: i32, secret: Option<&str>) -> anyhow::Result<Deployment> {
    let mut pod_spec = json!({
        "containers": [{"name": "agent", "image": IMAGE}],
        "terminationGracePeriodSeconds": 1,
    });
    if let Some(secret) = secret {
        pod_spec["volumes"] = json!([{"name": "config", "secret": {"secretName": secret}}]);
        pod_spec["containers"][0]["volumeMounts"] =
            json!([{"name": "config", "mountPath": "/etc/agent"}]);
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }))?)
}

fn statefulset(name: &str, replicas: i32) -> anyhow::Result<StatefulSet> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": "agent", "image": IMAGE}],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        },
    }))?)
}

fn template_annotation_patch(key: &str, value: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {key: value}}}}}))
}

async fn pods_of(pods: &Api<Pod>, app: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items)
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

fn http() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?)
}

/// GET `http://<ip>:<port><path>`; `Some((pod name header, body))` on 200.
async fn get(client: &reqwest::Client, ip: Ipv4Addr, path: &str) -> Option<(String, String)> {
    let url = format!("http://{ip}:{}{path}", HttpAgent::DEFAULT_PORT);
    let resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let pod = resp
        .headers()
        .get(POD_NAME_HEADER)?
        .to_str()
        .ok()?
        .to_string();
    Some((pod, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_becomes_available() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-deploy").await;
    let kubelet = Kubelet::start(ns.client(), ns.name(), KubeletConfig::default());
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment("web", 2, None)?)
        .await?;

    wait_for(
        &deployments,
        "web",
        conditions::deployment_available(),
        WAIT,
    )
    .await?;

    let pods = pods_of(&ns.api(), "web").await?;
    ensure!(pods.len() == 2, "expected 2 pods, got {}", pods.len());
    let mut ips = BTreeSet::new();
    for pod in &pods {
        let ip = pod_ip(pod).context("pod without podIP")?;
        ensure!(
            kubelet.pod_ip(&pod.name_any()) == Some(ip),
            "kubelet and pod status disagree"
        );
        ensure!(
            ip.octets()[0] == 127 && ip.octets()[1] >= 10,
            "pod IP {ip} outside the pool"
        );
        ips.insert(ip);
    }
    ensure!(ips.len() == 2, "pod IPs not unique: {ips:?}");
    ensure!(kubelet.running_pods().iter().all(|p| p.ready));
    kubelet.shutdown().await;
    ns.cleanup().await;
    eprintln!("deployment_becomes_available: {:?}", t0.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_template_change_rolls_out_a_new_replicaset() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-rollout").await;
    let kubelet = Kubelet::start(ns.client(), ns.name(), KubeletConfig::default());
    let deployments: Api<Deployment> = ns.api();
    let replicasets: Api<ReplicaSet> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment("web", 2, None)?)
        .await?;
    wait_for(
        &deployments,
        "web",
        conditions::deployment_rolled_out(),
        WAIT,
    )
    .await?;
    let before: BTreeSet<String> = replicasets
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|rs| rs.name_any())
        .collect();
    ensure!(before.len() == 1, "expected one ReplicaSet, got {before:?}");
    let old_pods: BTreeSet<String> = pods_of(&ns.api(), "web")
        .await?
        .iter()
        .map(|p| p.name_any())
        .collect();

    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &template_annotation_patch("keyward.dev/restart", "1"),
        )
        .await?;
    let rolled = wait_for(
        &deployments,
        "web",
        conditions::deployment_rolled_out(),
        WAIT,
    )
    .await?
    .context("deployment vanished")?;
    ensure!(rolled.status.as_ref().and_then(|s| s.observed_generation) >= Some(2));

    let rss = replicasets.list(&ListParams::default()).await?.items;
    ensure!(
        rss.len() == 2,
        "expected a new ReplicaSet, got {}",
        rss.len()
    );
    let new_rs = rss
        .iter()
        .find(|rs| !before.contains(&rs.name_any()))
        .context("no new ReplicaSet")?;
    let new_status = new_rs
        .status
        .as_ref()
        .context("new ReplicaSet without status")?;
    ensure!(
        new_status.ready_replicas == Some(2),
        "new ReplicaSet not ready: {new_status:?}"
    );
    let old_rs = rss
        .iter()
        .find(|rs| before.contains(&rs.name_any()))
        .context("old RS")?;
    ensure!(
        old_rs.spec.as_ref().and_then(|s| s.replicas) == Some(0),
        "old RS not scaled down"
    );

    let pods = pods_of(&ns.api(), "web").await?;
    ensure!(
        pods.len() == 2,
        "expected 2 pods after the rollout, got {}",
        pods.len()
    );
    for pod in &pods {
        ensure!(
            !old_pods.contains(&pod.name_any()),
            "old pod {} survived",
            pod.name_any()
        );
        ensure!(
            pod.annotations()
                .get("keyward.dev/restart")
                .map(String::as_str)
                == Some("1")
        );
    }
    // The kubelet stops a deleted pod's process a moment after the API server forgets it.
    let current: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: BTreeSet<String> =
            kubelet.running_pods().into_iter().map(|p| p.name).collect();
        if running == current {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "kubelet runs {running:?}, API has {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kubelet.shutdown().await;
    ns.cleanup().await;
    eprintln!(
        "deployment_template_change_rolls_out_a_new_replicaset: {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_rolls_its_pods_after_a_template_change() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-sts").await;
    let kubelet = Kubelet::start(ns.client(), ns.name(), KubeletConfig::default());
    let sets: Api<StatefulSet> = ns.api();
    sets.create(&PostParams::default(), &statefulset("db", 2)?)
        .await?;
    let first = wait_for(&sets, "db", conditions::statefulset_rolled_out(), WAIT)
        .await?
        .context("statefulset vanished")?;
    let old_rev = first
        .status
        .as_ref()
        .and_then(|s| s.update_revision.clone());
    let old_uids: BTreeSet<String> = pods_of(&ns.api(), "db")
        .await?
        .iter()
        .filter_map(|p| p.uid())
        .collect();
    ensure!(old_uids.len() == 2);

    sets.patch(
        "db",
        &PatchParams::default(),
        &template_annotation_patch("keyward.dev/restart", "1"),
    )
    .await?;
    let new_revision = {
        let old_rev = old_rev.clone();
        move |s: Option<&StatefulSet>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|s| s.update_revision.clone())
                != old_rev
        }
    };
    let rolled = wait_for(
        &sets,
        "db",
        conditions::statefulset_rolled_out().and(new_revision),
        WAIT,
    )
    .await?
    .context("statefulset vanished")?;
    let new_rev = rolled
        .status
        .as_ref()
        .and_then(|s| s.update_revision.clone());

    let pods = pods_of(&ns.api(), "db").await?;
    let names: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    ensure!(
        names == BTreeSet::from(["db-0".to_string(), "db-1".to_string()]),
        "{names:?}"
    );
    for pod in &pods {
        let uid = pod.uid().context("pod without uid")?;
        ensure!(
            !old_uids.contains(&uid),
            "pod {} was not replaced",
            pod.name_any()
        );
        ensure!(pod.labels().get("controller-revision-hash") == new_rev.as_ref());
        ensure!(
            kubelet.pod_ip(&pod.name_any()) == pod_ip(pod),
            "kubelet/pod IP mismatch"
        );
    }
    kubelet.shutdown().await;
    ns.cleanup().await;
    eprintln!(
        "statefulset_rolls_its_pods_after_a_template_change: {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_answer_on_pod_ips_and_see_secret_updates() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-agent").await;
    let config = KubeletConfig::default()
        .with_agent(HttpAgent::default())
        .with_secret_sync_delay(Duration::from_millis(500));
    let kubelet = Kubelet::start(ns.client(), ns.name(), config);
    let deployments: Api<Deployment> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let pods_api: Api<Pod> = ns.api();

    // The Secret does not exist yet: like a kubelet, the stand-in keeps the pods pending.
    deployments
        .create(
            &PostParams::default(),
            &deployment("agent", 2, Some("agent-config"))?,
        )
        .await?;
    let pending = wait_for(
        &deployments,
        "agent",
        conditions::deployment_available(),
        Duration::from_secs(3),
    )
    .await;
    ensure!(
        pending.is_err_and(|e| e.is_timeout()),
        "available without its Secret"
    );
    ensure!(
        kubelet.running_pods().is_empty(),
        "pods started without their Secret"
    );

    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "agent-config"},
        "stringData": {"token": "v1", "ca.pem": "ca-1"},
    }))?;
    secrets.create(&PostParams::default(), &secret).await?;
    wait_for(
        &deployments,
        "agent",
        conditions::deployment_available(),
        WAIT,
    )
    .await?;

    let http = http()?;
    let pods = pods_of(&pods_api, "agent").await?;
    ensure!(pods.len() == 2);
    for pod in &pods {
        let name = pod.name_any();
        let ip = pod_ip(pod).context("pod without podIP")?;
        let (who, body) = get(&http, ip, "/healthz").await.context("healthz failed")?;
        ensure!(who == name && body == "ok", "healthz on {ip}: {who} {body}");
        let (who, token) = get(&http, ip, "/files/config/token")
            .await
            .context("no token")?;
        ensure!(who == name && token == "v1", "token on {ip}: {who} {token}");
        let dir = kubelet
            .secret_dir(&name, "config")
            .context("no secret dir")?;
        ensure!(std::fs::read_to_string(dir.join("ca.pem"))? == "ca-1");
    }

    secrets
        .patch(
            "agent-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": "v2"}})),
        )
        .await?;
    for pod in &pods {
        let ip = pod_ip(pod).context("pod without podIP")?;
        let http = http.clone();
        eventually(
            &format!("agent {} sees token v2", pod.name_any()),
            Duration::from_secs(15),
            Duration::from_millis(100),
            || {
                let http = http.clone();
                async move {
                    let (_, token) = get(&http, ip, "/files/config/token").await?;
                    (token == "v2").then_some(())
                }
            },
        )
        .await?;
    }
    kubelet.shutdown().await;
    // The agents are gone with the kubelet.
    for pod in &pods {
        let ip = pod_ip(pod).context("pod without podIP")?;
        ensure!(
            get(&http, ip, "/healthz").await.is_none(),
            "agent on {ip} still answers"
        );
    }
    ns.cleanup().await;
    eprintln!(
        "agents_answer_on_pod_ips_and_see_secret_updates: {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_wait_fails_while_readiness_is_withheld() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-unready").await;
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let config = KubeletConfig::default()
        .with_ready(move |_: &Pod| flag.load(Ordering::SeqCst))
        .with_resync_interval(Duration::from_millis(200));
    let kubelet = Kubelet::start(ns.client(), ns.name(), config);
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment("web", 2, None)?)
        .await?;

    let outcome = wait_for(
        &deployments,
        "web",
        conditions::deployment_available(),
        Duration::from_secs(8),
    )
    .await;
    match outcome {
        Err(e) if e.is_timeout() => eprintln!("as expected: {e}"),
        other => anyhow::bail!("expected the wait to time out, got {other:?}"),
    }
    // The pods do run; they are only not ready.
    let pods = pods_of(&ns.api(), "web").await?;
    ensure!(pods.len() == 2, "expected 2 pods, got {}", pods.len());
    for pod in &pods {
        let status = pod.status.as_ref().context("pod without status")?;
        ensure!(
            status.phase.as_deref() == Some("Running"),
            "{:?}",
            status.phase
        );
        ensure!(!conditions::pod_running_and_ready().matches_object(Some(pod)));
    }

    // Same Deployment, readiness granted: now the same wait succeeds.
    ready.store(true, Ordering::SeqCst);
    wait_for(
        &deployments,
        "web",
        conditions::deployment_available(),
        WAIT,
    )
    .await?;
    kubelet.shutdown().await;
    ns.cleanup().await;
    eprintln!(
        "rollout_wait_fails_while_readiness_is_withheld: {:?}",
        t0.elapsed()
    );
    Ok(())
}

fn release_finalizers() -> Patch<serde_json::Value> {
    Patch::Merge(json!({"metadata": {"finalizers": null}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pod_is_stopped_and_finalized_by_the_kubelet() -> anyhow::Result<()> {
    init_tracing();
    let t0 = Instant::now();
    let ns = TestNamespace::new("smoke-terminating").await;
    let kubelet = Kubelet::start(
        ns.client(),
        ns.name(),
        KubeletConfig::default().with_agent(HttpAgent::default()),
    );
    let outcome = terminating_pod_checks(&ns, &kubelet).await;
    kubelet.shutdown().await;
    // Whatever happened, release the pods' finalizer, or the namespace would stay terminating.
    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    let _ = deployments
        .delete("held", &DeleteParams::background())
        .await;
    let released = eventually(
        "held pods released and gone",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            let left = pods_of(&pods, "held").await.ok()?;
            for pod in &left {
                let _ = pods
                    .patch(
                        &pod.name_any(),
                        &PatchParams::default(),
                        &release_finalizers(),
                    )
                    .await;
            }
            left.is_empty().then_some(())
        },
    )
    .await;
    outcome?;
    released?;
    ns.cleanup().await;
    eprintln!(
        "terminating_pod_is_stopped_and_finalized_by_the_kubelet: {:?}",
        t0.elapsed()
    );
    Ok(())
}

async fn terminating_pod_checks(
    ns: &TestNamespace,
    kubelet: &keyward_testbed::KubeletHandle,
) -> anyhow::Result<()> {
    let deployments: Api<Deployment> = ns.api();
    let pods_api: Api<Pod> = ns.api();
    // Pods inherit the template's finalizer, so a deleted pod stays terminating.
    let mut d = deployment("held", 1, None)?;
    if let Some(t) = d.spec.as_mut().and_then(|s| s.template.metadata.as_mut()) {
        t.finalizers = Some(vec!["keyward.dev/test-hold".into()]);
    }
    deployments.create(&PostParams::default(), &d).await?;
    wait_for(
        &deployments,
        "held",
        conditions::deployment_available(),
        WAIT,
    )
    .await?;
    let pod = pods_of(&pods_api, "held").await?.pop().context("no pod")?;
    let (name, uid) = (pod.name_any(), pod.uid().context("pod without uid")?);
    let ip = pod_ip(&pod).context("pod without podIP")?;
    let dir = kubelet.pod_dir(&name).context("no pod dir")?;
    let http = http()?;
    ensure!(
        get(&http, ip, "/healthz").await.is_some(),
        "agent not answering"
    );

    pods_api.delete(&name, &DeleteParams::default()).await?;
    eventually(
        "kubelet stops the terminating pod",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { kubelet.pod_ip(&name).is_none().then_some(()) },
    )
    .await?;
    ensure!(!dir.exists(), "pod directory {} left behind", dir.display());
    ensure!(
        get(&http, ip, "/healthz").await.is_none(),
        "agent still answers"
    );
    let held = pods_api.get(&name).await?;
    ensure!(
        held.metadata.deletion_timestamp.is_some(),
        "pod not terminating"
    );

    // Releasing the finalizer completes the deletion the kubelet requested.
    pods_api
        .patch(&name, &PatchParams::default(), &release_finalizers())
        .await?;
    keyward_testbed::wait_for_deleted(&pods_api, &name, &uid, WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_test_namespace_is_deleted() -> anyhow::Result<()> {
    init_tracing();
    let client = keyward_testbed::client().await;
    let name = {
        let ns = TestNamespace::with_client(client.clone(), "smoke-drop").await;
        ns.name().to_string()
        // dropped here without cleanup(), as after a failed assertion
    };
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let ns = namespaces.get_opt(&name).await?;
    ensure!(
        ns.is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()),
        "namespace {name} not being deleted after drop"
    );
    Ok(())
}
