//! GitOps behaviour against the real local control plane (`e2e/cluster.sh up`): what Argo CD
//! and Flux see when they sync Keyward's resources and the workloads Keyward rolls.
//!
//! - the operator never writes the `spec` of a ProvisioningKey or a PolicyAgent (managedFields);
//! - it owns exactly one pod-template annotation on a workload, and a re-apply of the workload's
//!   manifest as Argo CD (client-side `kubectl apply`) or Flux (server-side apply as
//!   `kustomize-controller`, `--force-conflicts`) would do neither removes it nor shows as drift;
//! - a new `rotation.requestToken` in the synced manifest rotates exactly once;
//! - generated Secrets and ConfigMaps carry no Argo CD or Flux tracking metadata;
//! - the examples' live `.spec` equals their manifests' `.spec` after the operator settled;
//! - the Argo CD health check (`docs/gitops/health.lua`) on statuses the operator wrote.
//!
//! Each test has its own namespace, stand-in kubelet and in-process operator. `kubectl` (on the
//! PATH, with the plane's `KUBECONFIG`) plays the GitOps controllers.

use std::process::{Command, Stdio};

use crate::common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use keyward::api::{PolicyAgent, ProvisioningKey};
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::conditions::deployment_rolled_out;
use keyward_testbed::{Kubelet, KubeletConfig, KubeletHandle, wait_for};
use kube::api::ListParams;
use kube::{Api, Resource, ResourceExt};
use serde_json::{Value, json};

/// The test bed of one test: namespace, stand-in kubelet, in-process operator.
struct Bed {
    ns: TestNamespace,
    kubelet: KubeletHandle,
    op: Operator,
}

impl Bed {
    async fn new(prefix: &str) -> Self {
        keyward_testbed::init_tracing();
        let ns = TestNamespace::new(prefix).await;
        let kubelet = Kubelet::start(ns.client(), ns.name(), KubeletConfig::default());
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

    /// `kubectl <args> -n <ns>` with `stdin`; returns (exit code, stdout, stderr).
    async fn kubectl(&self, args: &[&str], stdin: &str) -> (i32, String, String) {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["-n".to_string(), self.ns.name().to_string()]);
        let stdin = stdin.to_string();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = Command::new("kubectl")
                .args(&all)
                .env("KUBECONFIG", keyward_testbed::kubeconfig_path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run kubectl (it must be on the PATH)");
            if let Some(mut input) = child.stdin.take() {
                input
                    .write_all(stdin.as_bytes())
                    .expect("write kubectl's stdin");
            }
            let out = child.wait_with_output().expect("wait for kubectl");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .await
        .expect("the kubectl task")
    }

    /// `kubectl <args>` that must succeed; returns stdout.
    async fn kubectl_ok(&self, args: &[&str], stdin: &str) -> String {
        let (code, out, err) = self.kubectl(args, stdin).await;
        assert_eq!(code, 0, "kubectl {args:?} failed: {err}{out}");
        out
    }

    async fn finish(self) {
        self.op.stop().await;
        self.kubelet.shutdown().await;
        self.ns.cleanup().await;
    }
}

/// Status describes the current generation.
fn observed<K: Resource>(obj: &K, observed_generation: Option<i64>) -> bool {
    observed_generation == obj.meta().generation
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

/// Confirmed on `kid`, Ready, for the current generation.
fn confirmed_on(pa: &PolicyAgent, kid: &str) -> bool {
    pa.status.as_ref().is_some_and(|s| {
        observed(pa, s.observed_generation)
            && s.phase.as_deref() == Some("Confirmed")
            && s.confirmed_key_id.as_deref() == Some(kid)
    }) && pa_condition(pa, "Ready").is_some_and(|c| c.status == "True")
}

/// The managedFields entries of `manager`.
fn managed_by<'a>(entries: &'a [ManagedFieldsEntry], manager: &str) -> Vec<&'a ManagedFieldsEntry> {
    entries
        .iter()
        .filter(|e| e.manager.as_deref() == Some(manager))
        .collect()
}

/// The leaf field paths a managedFields entry owns (`f:spec.f:template...`), `.` separated.
fn owned_paths(entry: &ManagedFieldsEntry) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v.as_object() {
            Some(map) if !map.is_empty() => {
                for (k, child) in map {
                    if k == "." {
                        continue;
                    }
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(child, &path, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    let mut out = Vec::new();
    if let Some(f) = entry.fields_v1.as_ref() {
        walk(&f.0, "", &mut out);
    }
    out
}

/// The agent workload as its owner keeps it in Git: no Keyward annotation anywhere.
const WORKLOAD: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: opa
  labels: {app: opa}
spec:
  replicas: 2
  selector:
    matchLabels: {app: opa}
  template:
    metadata:
      labels: {app: opa}
      annotations: {team.example/owner: payments}
    spec:
      containers:
      - name: agent
        image: example.com/policy-agent:test
        volumeMounts:
        - {name: keyward, mountPath: /var/run/keyward, readOnly: true}
      volumes:
      - name: keyward
        secret: {secretName: agents-key}
"#;

const POLICY_AGENT: &str = r#"apiVersion: keyward.dev/v1alpha1
kind: PolicyAgent
metadata:
  name: opa-agents
spec:
  provisioningKeyRef: {name: agents}
  workloadRef: {kind: Deployment, name: opa}
  connectivityCheck: {mode: RolloutOnly}
"#;

/// The ProvisioningKey manifest with `token` as `rotation.requestToken`.
fn key_manifest(token: &str) -> String {
    format!(
        r#"apiVersion: keyward.dev/v1alpha1
kind: ProvisioningKey
metadata:
  name: agents
spec:
  secretName: agents-key
  rotation:
    publishDelay: 1s
    overlap: 1s
    minInterval: 0s
    requestToken: "{token}"
"#
    )
}

fn template_kid(d: &Deployment) -> Option<String> {
    keyward::workload::Workload::Deployment(d.clone()).template_kid()
}

/// The pod template did not change, so no rollout started. (The generation may move: a
/// Deployment's generation also counts metadata annotation changes, and kubectl's server-side
/// apply drops `last-applied-configuration`, as Flux does.)
fn assert_no_rollout(before: &Deployment, after: &Deployment) {
    let template = |d: &Deployment| {
        serde_json::to_value(&d.spec.as_ref().expect("spec").template).expect("json")
    };
    assert_eq!(
        template(before),
        template(after),
        "the pod template changed"
    );
    let revision = |d: &Deployment| {
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .cloned()
    };
    assert_eq!(revision(before), revision(after), "a new rollout revision");
}

/// Re-applies the workload manifest as Argo CD (client-side apply; `kubectl diff` clean) and as
/// Flux (server-side apply as `kustomize-controller`, forcing conflicts; its dry run returns the
/// live template), and checks that the Keyward annotation survives with no new rollout.
async fn reapply_keeps_the_annotation(bed: &Bed, kid: &str) {
    let deploys: Api<Deployment> = bed.api();
    let before = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(template_kid(&before).as_deref(), Some(kid));

    // Argo CD: client-side apply (three-way merge with last-applied-configuration).
    let (code, out, err) = bed.kubectl(&["diff", "-f", "-"], WORKLOAD).await;
    assert_eq!(
        code, 0,
        "kubectl diff shows drift before the re-apply: {out}{err}"
    );
    bed.kubectl_ok(&["apply", "-f", "-"], WORKLOAD).await;
    let after = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(
        template_kid(&after).as_deref(),
        Some(kid),
        "client-side apply removed it"
    );
    assert_no_rollout(&before, &after);
    let (code, out, err) = bed.kubectl(&["diff", "-f", "-"], WORKLOAD).await;
    assert_eq!(code, 0, "kubectl diff shows drift: {out}{err}");

    // Flux: server-side apply as kustomize-controller; drift detection is a dry run compared
    // with the live object.
    let ssa = [
        "apply",
        "--server-side",
        "--field-manager=kustomize-controller",
        "--force-conflicts",
        "-f",
        "-",
    ];
    let dry: Deployment = serde_json::from_str(
        &bed.kubectl_ok(
            &[&ssa[..], &["--dry-run=server", "-o", "json"]].concat(),
            WORKLOAD,
        )
        .await,
    )
    .expect("the dry run's Deployment");
    let live = deploys.get("opa").await.expect("the Deployment");
    let template = |d: &Deployment| serde_json::to_value(&d.spec.as_ref().expect("spec").template);
    assert_eq!(
        template(&dry).expect("json"),
        template(&live).expect("json"),
        "Flux's dry run differs from the live template (drift)"
    );
    bed.kubectl_ok(&ssa, WORKLOAD).await;
    let after = deploys.get("opa").await.expect("the Deployment");
    assert_eq!(
        template_kid(&after).as_deref(),
        Some(kid),
        "server-side apply removed it"
    );
    assert_no_rollout(&before, &after);

    // On the workload Keyward owns exactly one pod-template field: its annotation.
    let fields = after.metadata.managed_fields.clone().unwrap_or_default();
    let ours: Vec<String> = managed_by(&fields, "keyward")
        .into_iter()
        .flat_map(owned_paths)
        .filter(|p| p.starts_with("f:spec"))
        .collect();
    assert_eq!(
        ours,
        vec![format!(
            "f:spec.f:template.f:metadata.f:annotations.f:{}",
            l::KEY_ID
        )],
        "Keyward's fields under spec of the workload"
    );
}

// ---------------------------------------------------------------------------------------------

/// The whole GitOps round trip on one key, one workload and one PolicyAgent, all applied with
/// kubectl: re-applies keep Keyward's annotation, a new requestToken in the manifest rotates
/// exactly once, and after the rotation Keyward owns no field under `spec` of either resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_reapply_rotation_by_commit_and_no_spec_writes() {
    let bed = Bed::new("kw-gitops-sync").await;
    let pks: Api<ProvisioningKey> = bed.api();
    let pas: Api<PolicyAgent> = bed.api();
    let secrets: Api<Secret> = bed.api();

    bed.kubectl_ok(&["apply", "-f", "-"], &key_manifest("initial"))
        .await;
    let pk = wait_pk(&pks, "agents", "settled on its first key", is_settled).await;
    let kid1 = pk.status.and_then(|s| s.current_key).expect("a key").kid;
    bed.kubectl_ok(&["apply", "-f", "-"], WORKLOAD).await;
    wait_for(
        &bed.api::<Deployment>(),
        "opa",
        deployment_rolled_out(),
        TIMEOUT,
    )
    .await
    .expect("the first rollout");
    bed.kubectl_ok(&["apply", "-f", "-"], POLICY_AGENT).await;
    wait_obj(&pas, "opa-agents", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    reapply_keeps_the_annotation(&bed, &kid1).await;

    // Rotation by commit: the same manifest with a new requestToken, synced twice.
    for _ in 0..2 {
        bed.kubectl_ok(&["apply", "-f", "-"], &key_manifest("rotate-1"))
            .await;
    }
    let pk = wait_pk(&pks, "agents", "rotated once", |pk| {
        is_settled(pk)
            && pk
                .status
                .as_ref()
                .is_some_and(|s| s.current_key.as_ref().is_some_and(|c| c.kid != kid1))
    })
    .await;
    let kid2 = pk.status.and_then(|s| s.current_key).expect("a key").kid;
    wait_obj(
        &pas,
        "opa-agents",
        "confirmed on the new key",
        TIMEOUT,
        |pa| confirmed_on(pa, &kid2),
    )
    .await;
    wait_pk(&pks, "agents", "the old key revoked", |pk| {
        rotated_to(pk, &kid2, &[&kid1])
    })
    .await;
    // Re-synced again: no third key.
    bed.kubectl_ok(&["apply", "-f", "-"], &key_manifest("rotate-1"))
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let keys = key_secrets(&secrets, "agents").await;
    assert_eq!(
        keys.len(),
        2,
        "exactly one rotation for one new requestToken"
    );
    assert_eq!(
        annotation(&keys[1], l::TRIGGER).as_deref(),
        Some("RequestToken")
    );
    reapply_keeps_the_annotation(&bed, &kid2).await;

    // The operator never wrote spec of either resource (only status, as `keyward`).
    let pk = pks.get("agents").await.expect("the key");
    let pa = pas.get("opa-agents").await.expect("the agent");
    for (what, fields) in [
        ("ProvisioningKey", pk.metadata.managed_fields.clone()),
        ("PolicyAgent", pa.metadata.managed_fields.clone()),
    ] {
        let fields = fields.unwrap_or_default();
        let ours = managed_by(&fields, "keyward");
        assert!(!ours.is_empty(), "{what}: keyward writes its status");
        // (1.20's managedFields have no `subresource`: the owned paths tell.)
        // Keyward owns status alone (the trust record included): never a field a GitOps
        // manifest sets.
        for e in ours {
            let outside: Vec<String> = owned_paths(e)
                .into_iter()
                .filter(|p| !p.starts_with("f:status"))
                .collect();
            assert!(outside.is_empty(), "{what}: keyward owns {outside:?}");
        }
    }
    // Both kinds: kstatus conditions for the current generation, each with its generation.
    for (what, generation, status_generation, conditions) in [
        (
            "ProvisioningKey",
            pk.metadata.generation,
            pk.status.as_ref().and_then(|s| s.observed_generation),
            pk.status.clone().unwrap_or_default().conditions,
        ),
        (
            "PolicyAgent",
            pa.metadata.generation,
            pa.status.as_ref().and_then(|s| s.observed_generation),
            pa.status.clone().unwrap_or_default().conditions,
        ),
    ] {
        assert_eq!(status_generation, generation, "{what}");
        for (t, want) in [
            ("Ready", "True"),
            ("Reconciling", "False"),
            ("Stalled", "False"),
        ] {
            let c = conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap_or_else(|| panic!("{what}: no {t} condition"));
            assert_eq!(c.status, want, "{what} {t}: {c:?}");
            assert_eq!(c.observed_generation, generation, "{what} {t}");
        }
    }
    bed.finish().await;
}

/// A ProvisioningKey synced by Argo CD or Flux carries their tracking labels and annotations
/// (and a secretTemplate may too): none of them reaches a generated Secret or ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_generated_objects_carry_no_tracking_metadata() {
    let bed = Bed::new("kw-gitops-track").await;
    let pks: Api<ProvisioningKey> = bed.api();
    let tracking = json!({
        "app.kubernetes.io/instance": "keys-app",
        "kustomize.toolkit.fluxcd.io/name": "keys",
        "kustomize.toolkit.fluxcd.io/namespace": "flux-system",
        "helm.toolkit.fluxcd.io/name": "keys",
        "helm.toolkit.fluxcd.io/namespace": "flux-system",
    });
    let tracking_annotations = json!({
        "argocd.argoproj.io/tracking-id": "keys-app:keyward.dev/ProvisioningKey:ns/tracked",
        "argocd.argoproj.io/sync-wave": "1",
    });
    let mut labels = tracking.clone();
    labels["team"] = json!("payments");
    let mut annotations = tracking_annotations.clone();
    annotations["team.example/contact"] = json!("payments@example.com");
    let manifest = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": "tracked", "labels": tracking, "annotations": tracking_annotations },
        "spec": {
            "secretTemplate": { "labels": labels, "annotations": annotations },
            "rotation": { "publishDelay": "1s", "overlap": "1s", "minInterval": "0s" },
        },
    });
    bed.kubectl_ok(&["apply", "-f", "-"], &manifest.to_string())
        .await;
    wait_pk(&pks, "tracked", "settled", is_settled).await;

    let selector = format!("{}=tracked", l::PROVISIONING_KEY);
    let lp = ListParams::default().labels(&selector);
    let secrets = bed.api::<Secret>().list(&lp).await.expect("list").items;
    let cms = bed.api::<ConfigMap>().list(&lp).await.expect("list").items;
    assert_eq!(secrets.len(), 2, "the key Secret and the agent Secret");
    assert_eq!(cms.len(), 1, "the trust bundle");
    let metas = secrets
        .iter()
        .map(|s| s.metadata.clone())
        .chain(cms.iter().map(|c| c.metadata.clone()));
    for m in metas {
        let name = m.name.clone().unwrap_or_default();
        for (k, _) in m
            .labels
            .iter()
            .flatten()
            .chain(m.annotations.iter().flatten())
        {
            assert!(
                !l::is_gitops_tracking(k) && !k.starts_with("argocd.argoproj.io/"),
                "{name} carries {k}"
            );
        }
    }
    let agent = secrets
        .iter()
        .find(|s| s.name_any() == "tracked")
        .expect("the agent Secret");
    assert_eq!(
        agent.labels().get("team").map(String::as_str),
        Some("payments")
    );
    assert_eq!(
        agent
            .annotations()
            .get("team.example/contact")
            .map(String::as_str),
        Some("payments@example.com")
    );
    bed.finish().await;
}

/// The YAML documents of `path` (relative to the repository) of the given kinds, as JSON.
fn manifests(path: &str, kinds: &[&str]) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).expect("valid YAML");
            v
        })
        .filter(|v| kinds.iter().any(|k| v["kind"] == json!(k)))
        .collect()
}

/// Every example applied, the operator settled: the live `.spec` of each ProvisioningKey and
/// PolicyAgent is exactly its manifest's (no schema default, no operator write, so a GitOps
/// tool that compares the two sees no drift).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_examples_live_spec_equals_manifest() {
    let bed = Bed::new("kw-gitops-examples").await;
    let pks: Api<ProvisioningKey> = bed.api();
    let pas: Api<PolicyAgent> = bed.api();
    let files = [
        "examples/provisioningkey.yaml",
        "examples/agents/opa-deployment.yaml",
    ];
    for f in files {
        let path = format!("{}/{f}", env!("CARGO_MANIFEST_DIR"));
        bed.kubectl_ok(&["apply", "-f", &path], "").await;
    }
    let mut checked = 0;
    for f in files {
        for m in manifests(f, &["ProvisioningKey", "PolicyAgent"]) {
            let name = m["metadata"]["name"].as_str().expect("a name").to_string();
            let live = if m["kind"] == json!("ProvisioningKey") {
                let pk = wait_pk(&pks, &name, "settled", is_settled).await;
                serde_json::to_value(&pk).expect("json")
            } else {
                // The example's agents answer no HTTP check here: settled means the status
                // describes the current generation.
                let pa = wait_obj(&pas, &name, "status written", TIMEOUT, |pa| {
                    pa.status
                        .as_ref()
                        .is_some_and(|s| observed(pa, s.observed_generation))
                })
                .await;
                serde_json::to_value(&pa).expect("json")
            };
            // The live object as the API server serves it (not through our types).
            let raw: Value = serde_json::from_str(
                &bed.kubectl_ok(
                    &[
                        "get",
                        m["kind"].as_str().unwrap_or_default(),
                        &name,
                        "-o",
                        "json",
                    ],
                    "",
                )
                .await,
            )
            .expect("kubectl get -o json");
            assert_eq!(raw["spec"], m["spec"], "{f}: live spec of {name} drifted");
            assert_eq!(
                live["spec"], m["spec"],
                "{f}: spec of {name} as Keyward reads it"
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 2,
        "one ProvisioningKey and one PolicyAgent in the examples"
    );
    bed.finish().await;
}

// ---------------------------------------------------------------------------------------------
// The Argo CD health check, evaluated with Lua 5.4 (mlua) on statuses the operator wrote. The
// script sticks to what Argo CD's Lua 5.1 (gopher-lua) understands.

const HEALTH_LUA: &str = include_str!("../../docs/gitops/health.lua");

/// Runs the health check on `obj` (a resource as JSON); returns (status, message).
fn health(obj: &Value) -> (String, String) {
    use mlua::LuaSerdeExt;
    let lua = mlua::Lua::new();
    let options = mlua::serde::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let value = lua.to_value_with(obj, options).expect("obj as a Lua value");
    lua.globals().set("obj", value).expect("set obj");
    let hs: mlua::Table = lua
        .load(HEALTH_LUA)
        .set_name("health.lua")
        .eval()
        .expect("the health check runs");
    (
        hs.get::<String>("status").expect("hs.status"),
        hs.get::<String>("message").expect("hs.message"),
    )
}

/// The Argo CD ConfigMap example embeds the same script for both kinds.
#[test]
fn gitops_argocd_cm_embeds_the_health_check() {
    let cm = manifests("docs/gitops/argocd-cm.yaml", &["ConfigMap"]);
    let data = &cm.first().expect("argocd-cm")["data"];
    for kind in ["ProvisioningKey", "PolicyAgent"] {
        let key = format!("resource.customizations.health.keyward.dev_{kind}");
        assert_eq!(
            data[&key].as_str().map(str::trim),
            Some(HEALTH_LUA.trim()),
            "{key} in docs/gitops/argocd-cm.yaml must be docs/gitops/health.lua"
        );
    }
    // The worked examples parse, and Flux checks both kinds.
    let app = manifests("docs/gitops/argocd-application.yaml", &["Application"]);
    assert_eq!(app.len(), 1);
    assert!(app[0]["spec"].get("ignoreDifferences").is_none());
    let ks = manifests("docs/gitops/flux-kustomization.yaml", &["Kustomization"]);
    let kinds: Vec<&Value> = ks[0]["spec"]["healthChecks"]
        .as_array()
        .expect("healthChecks")
        .iter()
        .map(|c| &c["kind"])
        .collect();
    assert_eq!(kinds, [&json!("ProvisioningKey"), &json!("PolicyAgent")]);
    // A resource the operator has not seen yet.
    let fresh = json!({ "metadata": { "generation": 1 } });
    assert_eq!(health(&fresh).0, "Progressing");
}

/// Health of real statuses: a settled key (Healthy), a rotating key (Healthy, the rotation in
/// the message, never Degraded), a key whose Secret name someone else owns (Degraded), a new
/// spec not yet observed (Progressing), a stalled agent (Degraded) and a confirmed one (Healthy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitops_health_check_on_real_statuses() {
    let bed = Bed::new("kw-gitops-health").await;
    let pks: Api<ProvisioningKey> = bed.api();
    let pas: Api<PolicyAgent> = bed.api();

    // Settled.
    bed.kubectl_ok(&["apply", "-f", "-"], &key_manifest("initial"))
        .await;
    let pk = wait_pk(&pks, "agents", "settled", is_settled).await;
    let kid1 = pk
        .status
        .clone()
        .and_then(|s| s.current_key)
        .expect("key")
        .kid;
    let (status, message) = health(&as_json(&pk));
    assert_eq!(status, "Healthy", "settled key: {message}");

    // Rotating: a requested rotation waiting out a long publishDelay.
    let slow = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": "slow" },
        "spec": { "rotation": { "publishDelay": "1h", "minInterval": "0s", "requestToken": "a" } },
    });
    bed.kubectl_ok(&["apply", "-f", "-"], &slow.to_string())
        .await;
    wait_pk(&pks, "slow", "settled", is_settled).await;
    let mut slow2 = slow.clone();
    slow2["spec"]["rotation"]["requestToken"] = json!("b");
    bed.kubectl_ok(&["apply", "-f", "-"], &slow2.to_string())
        .await;
    let pk = wait_pk(&pks, "slow", "rotating", |pk| {
        pk.status.as_ref().is_some_and(|s| {
            observed(pk, s.observed_generation)
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Rotating" && c.status == "True")
        })
    })
    .await;
    let cond = |pk: &ProvisioningKey, t: &str| condition(pk, t).map(|c| c.status.clone());
    assert_eq!(
        cond(&pk, "Reconciling").as_deref(),
        Some("False"),
        "a rotation is not Reconciling"
    );
    assert_eq!(cond(&pk, "Ready").as_deref(), Some("True"));
    let (status, message) = health(&as_json(&pk));
    assert_eq!(status, "Healthy", "rotating key: {message}");
    assert!(message.contains("Rotation in flight"), "{message}");

    // Invalid: the agent Secret's name belongs to someone else.
    bed.kubectl_ok(
        &["create", "secret", "generic", "taken", "--from-literal=x=y"],
        "",
    )
    .await;
    let taken = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": { "name": "invalid" },
        "spec": { "secretName": "taken" },
    });
    bed.kubectl_ok(&["apply", "-f", "-"], &taken.to_string())
        .await;
    let pk = wait_pk(&pks, "invalid", "stalled", |pk| {
        observed(pk, pk.status.as_ref().and_then(|s| s.observed_generation))
            && cond(pk, "Stalled").as_deref() == Some("True")
    })
    .await;
    assert_eq!(cond(&pk, "Reconciling").as_deref(), Some("False"));
    let (status, message) = health(&as_json(&pk));
    assert_eq!(status, "Degraded", "invalid key: {message}");
    assert!(message.contains("SecretNameTaken"), "{message}");

    // A new generation the operator has not observed yet (as Argo CD may see it right after a
    // sync): the settled key with its generation moved past the status.
    let mut pending = as_json(&pks.get("agents").await.expect("key"));
    pending["metadata"]["generation"] =
        json!(pending["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
    assert_eq!(health(&pending).0, "Progressing");

    // Agents: one confirmed, one whose Deployment is paused (its roll cannot finish: Stalled).
    bed.kubectl_ok(&["apply", "-f", "-"], WORKLOAD).await;
    wait_for(
        &bed.api::<Deployment>(),
        "opa",
        deployment_rolled_out(),
        TIMEOUT,
    )
    .await
    .expect("the first rollout");
    bed.kubectl_ok(&["apply", "-f", "-"], POLICY_AGENT).await;
    let pa = wait_obj(&pas, "opa-agents", "confirmed", TIMEOUT, |pa| {
        confirmed_on(pa, &kid1)
    })
    .await;
    let (status, message) = health(&as_json(&pa));
    assert_eq!(status, "Healthy", "confirmed agent: {message}");

    let paused = WORKLOAD
        .replace("name: opa\n", "name: paused\n")
        .replace("replicas: 2", "replicas: 1\n  paused: true");
    bed.kubectl_ok(&["apply", "-f", "-"], &paused).await;
    let agent = POLICY_AGENT
        .replace("name: opa-agents", "name: paused-agents")
        .replace("name: opa}", "name: paused}");
    bed.kubectl_ok(&["apply", "-f", "-"], &agent).await;
    let pa = wait_obj(&pas, "paused-agents", "stalled", TIMEOUT, |pa| {
        pa.status
            .as_ref()
            .is_some_and(|s| observed(pa, s.observed_generation))
            && pa_condition(pa, "Stalled").is_some_and(|c| c.status == "True")
    })
    .await;
    let (status, message) = health(&as_json(&pa));
    assert_eq!(status, "Degraded", "stalled agent: {message}");
    assert!(message.contains("DeploymentPaused"), "{message}");
    bed.finish().await;
}

/// A resource as JSON.
fn as_json<T: serde::Serialize>(o: &T) -> Value {
    serde_json::to_value(o).expect("json")
}
