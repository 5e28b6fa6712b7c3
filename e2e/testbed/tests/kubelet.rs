//! The stand-in kubelet against the local plane (`e2e/cluster.sh up`, then
//! `eval "$(e2e/cluster.sh env)"`): grace periods, eviction and completion, phase Unknown,
//! and the token each pod started with (pods of workloads no PolicyAgent manages included).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use keyward_testbed::{
    Kubelet, KubeletConfig, KubeletError, KubeletHandle, NODE_NAME, PodInfo, TestNamespace,
    conditions, eventually, init_tracing, wait_for,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(40);

/// When each pod's agent started and stopped (by pod name; the latest pod of a name).
type Life = (Instant, Option<Timestamp>);

#[derive(Clone, Default)]
struct Lives(Arc<Mutex<BTreeMap<String, Life>>>);

impl Lives {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Life>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alive(&self, pod: &str) -> bool {
        self.lock().get(pod).is_some_and(|(_, stop)| stop.is_none())
    }

    fn stopped_at(&self, pod: &str) -> Option<Timestamp> {
        self.lock().get(pod).and_then(|(_, stop)| *stop)
    }

    /// An agent that records its life and, with `obey_sigterm`, exits when its pod terminates.
    fn agent(&self, obey_sigterm: bool) -> impl Fn(PodInfo) -> BoxFuture<'static, ()> + use<> {
        let lives = self.clone();
        move |mut info: PodInfo| {
            let lives = lives.clone();
            async move {
                lives
                    .lock()
                    .insert(info.name.clone(), (Instant::now(), None));
                let _guard = StopGuard(lives, info.name.clone());
                if obey_sigterm {
                    info.termination.requested().await;
                } else {
                    std::future::pending::<()>().await;
                }
            }
            .boxed()
        }
    }
}

/// Records the agent's end when its future is dropped (aborted) or returns.
struct StopGuard(Lives, String);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if let Some(entry) = self.0.lock().get_mut(&self.1) {
            entry.1 = Some(Timestamp::now());
        }
    }
}

fn deployment(
    name: &str,
    replicas: i32,
    grace: i64,
    secret: Option<&str>,
) -> anyhow::Result<Deployment> {
    let mut pod_spec = json!({
        "containers": [{"name": "agent", "image": "keyward.invalid/agent:test"}],
        "terminationGracePeriodSeconds": grace,
    });
    if let Some(secret) = secret {
        pod_spec["volumes"] = json!([
            {"name": "other", "emptyDir": {}},
            {"name": "config", "secret": {"secretName": secret}},
        ]);
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

async fn running_pods_of(pods: &Api<Pod>, app: &str) -> anyhow::Result<Vec<Pod>> {
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .collect())
}

fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

async fn start(ns: &TestNamespace, d: &Deployment) -> anyhow::Result<Pod> {
    let deployments: Api<Deployment> = ns.api();
    let name = d.name_any();
    deployments.create(&PostParams::default(), d).await?;
    wait_for(
        &deployments,
        &name,
        conditions::deployment_available(),
        WAIT,
    )
    .await?;
    running_pods_of(&ns.api(), &name)
        .await?
        .pop()
        .context("no running pod")
}

async fn finish(
    ns: TestNamespace,
    kubelet: KubeletHandle,
    outcome: anyhow::Result<()>,
) -> anyhow::Result<()> {
    kubelet.shutdown().await;
    outcome?;
    ns.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_pod_runs_until_its_grace_period_ends() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-grace").await;
    let lives = Lives::default();
    let config = KubeletConfig::default()
        .with_grace_period(true)
        .with_agent(lives.agent(false));
    let kubelet = Kubelet::start(ns.client(), ns.name(), config);
    let outcome = async {
        let pod = start(&ns, &deployment("graceful", 1, 4, None)?).await?;
        let name = pod.name_any();
        let uid = pod.uid().context("no uid")?;
        ensure!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE_NAME),
            "pod not bound to {NODE_NAME}"
        );
        ensure!(lives.alive(&name), "agent not running");
        let pods: Api<Pod> = ns.api();
        pods.delete(&name, &DeleteParams::default()).await?;
        let deleted_at = Timestamp::now();
        // Within the grace period: still there, Running, agent running, marked terminating.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let held = pods.get(&name).await?;
        let deadline = held
            .metadata
            .deletion_timestamp
            .as_ref()
            .context("pod not terminating")?
            .0;
        ensure!(
            phase(&held) == Some("Running"),
            "terminating pod not Running: {:?}",
            phase(&held)
        );
        ensure!(lives.alive(&name), "agent stopped within the grace period");
        let listed = kubelet.running_pods();
        ensure!(
            listed.iter().any(|p| p.name == name && p.terminating),
            "kubelet does not list the pod as terminating: {listed:?}"
        );
        keyward_testbed::wait_for_deleted(&pods, &name, &uid, WAIT).await?;
        let stopped = lives.stopped_at(&name).context("agent never stopped")?;
        ensure!(
            stopped >= deadline,
            "agent stopped at {stopped}, before the deadline {deadline}"
        );
        ensure!(
            stopped.duration_since(deleted_at) >= k8s_openapi::jiff::SignedDuration::from_secs(2),
            "grace period of 4 s not honoured: stopped {stopped}, deleted {deleted_at}"
        );
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_exiting_on_sigterm_ends_the_grace_period_early() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-sigterm").await;
    let lives = Lives::default();
    let config = KubeletConfig::default()
        .with_grace_period(true)
        .with_agent(lives.agent(true));
    let kubelet = Kubelet::start(ns.client(), ns.name(), config);
    let outcome = async {
        // The default grace period (30 s) is far longer than the wait below.
        let pod = start(&ns, &deployment("obedient", 1, 30, None)?).await?;
        let (name, uid) = (pod.name_any(), pod.uid().context("no uid")?);
        let pods: Api<Pod> = ns.api();
        let t0 = Instant::now();
        pods.delete(&name, &DeleteParams::default()).await?;
        keyward_testbed::wait_for_deleted(&pods, &name, &uid, Duration::from_secs(15)).await?;
        ensure!(t0.elapsed() < Duration::from_secs(15));
        ensure!(!lives.alive(&name), "agent still running");
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_evicted_while_terminating_is_finalized() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-evict-terminating").await;
    let lives = Lives::default();
    let config = KubeletConfig::default()
        .with_grace_period(true)
        .with_agent(lives.agent(false));
    let kubelet = Kubelet::start(ns.client(), ns.name(), config);
    let outcome = async {
        let pod = start(&ns, &deployment("doomed", 1, 30, None)?).await?;
        let (name, uid) = (pod.name_any(), pod.uid().context("no uid")?);
        let pods: Api<Pod> = ns.api();
        pods.delete(&name, &DeleteParams::default()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(lives.alive(&name), "agent stopped before its grace period");
        kubelet.evict(&name).await?;
        ensure!(!lives.alive(&name), "evicted agent still running");
        // Far sooner than the 30 s grace period.
        keyward_testbed::wait_for_deleted(&pods, &name, &uid, Duration::from_secs(10)).await?;
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_grace_periods_pods_are_not_bound_and_go_at_once() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-nograce").await;
    let lives = Lives::default();
    let kubelet = Kubelet::start(
        ns.client(),
        ns.name(),
        KubeletConfig::default().with_agent(lives.agent(false)),
    );
    let outcome = async {
        let pod = start(&ns, &deployment("quick", 1, 30, None)?).await?;
        let (name, uid) = (pod.name_any(), pod.uid().context("no uid")?);
        ensure!(
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_none()
        );
        let pods: Api<Pod> = ns.api();
        pods.delete(&name, &DeleteParams::default()).await?;
        keyward_testbed::wait_for_deleted(&pods, &name, &uid, Duration::from_secs(5)).await?;
        eventually(
            "agent stopped",
            Duration::from_secs(5),
            Duration::from_millis(100),
            || async { (!lives.alive(&name)).then_some(()) },
        )
        .await?;
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_and_completed_pods_stay_and_are_replaced() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-evict").await;
    let lives = Lives::default();
    let kubelet = Kubelet::start(
        ns.client(),
        ns.name(),
        KubeletConfig::default().with_agent(lives.agent(false)),
    );
    let outcome = async {
        let pods: Api<Pod> = ns.api();
        let first = start(&ns, &deployment("evictee", 1, 1, None)?).await?;
        let name = first.name_any();
        kubelet.evict(&name).await?;
        ensure!(!lives.alive(&name), "evicted pod's agent still running");
        let evicted = pods.get(&name).await?;
        let status = evicted.status.clone().context("no status")?;
        ensure!(
            status.phase.as_deref() == Some("Failed"),
            "phase {:?}",
            status.phase
        );
        ensure!(
            status.reason.as_deref() == Some("Evicted"),
            "reason {:?}",
            status.reason
        );
        ensure!(kubelet.pod_ip(&name).is_none(), "evicted pod still listed");
        // The ReplicaSet replaces it, and the kubelet runs the replacement.
        let replacement = eventually(
            "replacement running",
            WAIT,
            Duration::from_millis(200),
            || async {
                let running = running_pods_of(&pods, "evictee").await.ok()?;
                running.into_iter().find(|p| p.name_any() != name)
            },
        )
        .await?;
        let second = replacement.name_any();
        ensure!(lives.alive(&second), "replacement's agent not running");
        // Never touched again: still Failed, same resourceVersion, a while later.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let later = pods.get(&name).await?;
        ensure!(phase(&later) == Some("Failed"));
        ensure!(
            later.resource_version() == evicted.resource_version(),
            "evicted pod was modified"
        );
        ensure!(
            matches!(
                kubelet.evict(&name).await,
                Err(KubeletError::AlreadyEnded(_))
            ),
            "second eviction accepted"
        );
        ensure!(matches!(
            kubelet.evict("nope").await,
            Err(KubeletError::NoSuchPod(_))
        ));

        kubelet.complete(&second).await?;
        ensure!(phase(&pods.get(&second).await?) == Some("Succeeded"));
        ensure!(!lives.alive(&second), "completed pod's agent still running");
        let third = eventually(
            "second replacement running",
            WAIT,
            Duration::from_millis(200),
            || async {
                let running = running_pods_of(&pods, "evictee").await.ok()?;
                running
                    .into_iter()
                    .find(|p| p.name_any() != name && p.name_any() != second)
            },
        )
        .await?
        .name_any();

        kubelet.set_unknown(&third).await?;
        ensure!(phase(&pods.get(&third).await?) == Some("Unknown"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        ensure!(lives.alive(&third), "agent of the Unknown pod stopped");
        ensure!(
            phase(&pods.get(&third).await?) == Some("Unknown"),
            "kubelet overwrote Unknown"
        );
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_any_workload_record_the_token_they_started_with() -> anyhow::Result<()> {
    init_tracing();
    let ns = TestNamespace::new("kubelet-token").await;
    let lives = Lives::default();
    let kubelet = Kubelet::start(
        ns.client(),
        ns.name(),
        KubeletConfig::default()
            .with_agent(lives.agent(false))
            .with_secret_sync_delay(Duration::ZERO),
    );
    let outcome = async {
        let secrets: Api<Secret> = ns.api();
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "agent"},
            "stringData": {"token": "token-1", "other": "x"},
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
        // One Deployment a PolicyAgent could manage, one that merely mounts the same Secret.
        let managed = start(&ns, &deployment("managed", 1, 1, Some("agent"))?).await?;
        let bystander = start(&ns, &deployment("bystander", 1, 1, Some("agent"))?).await?;
        for pod in [&managed, &bystander] {
            ensure!(
                kubelet.token_at_start(&pod.name_any()).as_deref() == Some("token-1"),
                "{} started with {:?}",
                pod.name_any(),
                kubelet.token_at_start(&pod.name_any())
            );
        }
        secrets
            .patch(
                "agent",
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"token": "token-2"}})),
            )
            .await?;
        // The running pod's file follows the Secret, its token at start does not.
        let dir = kubelet
            .secret_dir(&bystander.name_any(), "config")
            .context("no volume dir")?;
        eventually(
            "file synced",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || async {
                (std::fs::read_to_string(dir.join("token")).ok()? == "token-2").then_some(())
            },
        )
        .await?;
        ensure!(kubelet.token_at_start(&bystander.name_any()).as_deref() == Some("token-1"));
        let deployments: Api<Deployment> = ns.api();
        deployments
            .patch(
                "bystander",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await?;
        let new = eventually(
            "second bystander",
            WAIT,
            Duration::from_millis(200),
            || async {
                let pods = running_pods_of(&ns.api(), "bystander").await.ok()?;
                pods.into_iter()
                    .find(|p| p.name_any() != bystander.name_any())
            },
        )
        .await?;
        ensure!(kubelet.token_at_start(&new.name_any()).as_deref() == Some("token-2"));
        let listed = kubelet.running_pods();
        ensure!(
                listed
                    .iter()
                    .any(|p| p.name == new.name_any()
                        && p.token_at_start.as_deref() == Some("token-2")),
                "running_pods lacks the token: {listed:?}"
            );
        ensure!(kubelet.token_at_start("never-started").is_none());
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}

/// The claims of a JWT, decoded without checking the signature (the TokenReview checks it).
fn jwt_claims(token: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// As a real kubelet: a pod gets the ServiceAccount admission plugin's `kube-api-access-*`
/// volume and its template's own projected token (with an audience), both pod-bound tokens
/// from the TokenRequest API. The API server (TokenReview) says which pod a token belongs to,
/// its claims name the pod, the node and a unique `jti`, and a token for another audience is
/// not accepted for this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_read_projected_pod_bound_service_account_tokens() -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::TokenReview;
    init_tracing();
    let ns = TestNamespace::new("kubelet-sa-token").await;
    let seen: Arc<Mutex<BTreeMap<String, PodInfo>>> = Arc::default();
    let agent = {
        let seen = seen.clone();
        move |info: PodInfo| {
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(info.name.clone(), info);
            std::future::pending::<()>().boxed()
        }
    };
    // Bound to the test bed's Node, as a scheduler would, so the token carries node claims.
    let kubelet = Kubelet::start(
        ns.client(),
        ns.name(),
        KubeletConfig::default()
            .with_agent(agent)
            .with_grace_period(true),
    );
    let outcome = async {
        let mut d = deployment("identity", 2, 1, None)?;
        let spec = d
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .context("pod spec")?;
        spec.volumes = Some(vec![serde_json::from_value(json!({
            "name": "identity",
            "projected": {"sources": [
                {"serviceAccountToken": {"audience": "keyward-test", "expirationSeconds": 600, "path": "token"}},
                {"downwardAPI": {"items": [{"path": "uid", "fieldRef": {"fieldPath": "metadata.uid"}}]}},
            ]},
        }))?]);
        let pod = start(&ns, &d).await?;
        let name = pod.name_any();
        let uid = pod.uid().context("uid")?;
        let info = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned()
            .context("the agent did not start")?;
        // The admission plugin's volume (API server audience, CA, namespace) and our own.
        let api_access = info
            .projected_dirs
            .iter()
            .find(|(v, _)| v.starts_with("kube-api-access-"))
            .map(|(_, d)| d.clone())
            .context(format!("no kube-api-access volume: {:?}", info.projected_dirs))?;
        ensure!(std::fs::read_to_string(api_access.join("namespace"))? == ns.name());
        ensure!(std::fs::read_to_string(api_access.join("ca.crt"))?.contains("BEGIN CERTIFICATE"));
        let dir = info.projected_dirs.get("identity").context("no identity volume")?;
        ensure!(std::fs::read_to_string(dir.join("uid"))? == uid);
        let token = std::fs::read_to_string(dir.join("token"))?;

        let claims = jwt_claims(&token)?;
        let k8s = &claims["kubernetes.io"];
        ensure!(claims["aud"] == json!(["keyward-test"]), "aud: {}", claims["aud"]);
        ensure!(k8s["namespace"] == json!(ns.name()), "{k8s}");
        ensure!(k8s["pod"]["name"] == json!(name) && k8s["pod"]["uid"] == json!(uid), "{k8s}");
        ensure!(k8s["node"]["name"] == json!(NODE_NAME), "no node claim: {k8s}");
        ensure!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()), "no jti: {claims}");
        let exp = claims["exp"].as_i64().context("exp")? - claims["iat"].as_i64().context("iat")?;
        ensure!(exp == 600, "lifetime {exp} s, wanted 600");
        // The other pod's token is another token (its own jti and pod).
        let other = seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|i| i.name != name)
            .cloned()
            .context("second pod")?;
        let other_token =
            std::fs::read_to_string(other.projected_dirs.get("identity").context("dir")?.join("token"))?;
        let other_claims = jwt_claims(&other_token)?;
        ensure!(other_claims["jti"] != claims["jti"]);
        ensure!(other_claims["kubernetes.io"]["pod"]["name"] == json!(other.name));

        // The API server vouches for it: authenticated, for this audience, as this pod.
        let reviews: Api<TokenReview> = Api::all(ns.client());
        let review = |token: String, audience: &str| {
            serde_json::from_value::<TokenReview>(json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": {"token": token, "audiences": [audience]},
            }))
        };
        let status = reviews
            .create(&PostParams::default(), &review(token.clone(), "keyward-test")?)
            .await?
            .status
            .context("no review status")?;
        ensure!(status.authenticated == Some(true), "not authenticated: {:?}", status.error);
        let user = status.user.context("no user")?;
        ensure!(
            user.username.as_deref()
                == Some(format!("system:serviceaccount:{}:default", ns.name()).as_str())
        );
        let extra = user.extra.unwrap_or_default();
        ensure!(
            extra.get("authentication.kubernetes.io/pod-name") == Some(&vec![name.clone()]),
            "{extra:?}"
        );
        ensure!(extra.get("authentication.kubernetes.io/pod-uid") == Some(&vec![uid.clone()]));
        // Another audience: not accepted.
        let status = reviews
            .create(&PostParams::default(), &review(token, "someone-else")?)
            .await?
            .status
            .context("no review status")?;
        ensure!(status.authenticated != Some(true), "accepted for another audience");
        Ok(())
    }
    .await;
    finish(ns, kubelet, outcome).await
}
