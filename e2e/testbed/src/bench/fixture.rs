//! The objects of the benchmark: unrelated Secrets of realistic sizes, ProvisioningKeys,
//! Deployments with their PolicyAgents. Everything is created `concurrency` requests at a time.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rand::RngCore;
use serde_json::{Value, json};

use super::tracker;

/// Creates the namespaces (idempotent).
pub async fn namespaces(client: &Client, names: &[String]) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    for name in names {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("keyward.dev/bench".to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).with_context(|| format!("create namespace {name}")),
        }
    }
    Ok(())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// An unrelated Secret, as found in real namespaces: 6 in 10 small app configs (about
/// 1.5 KiB), 3 in 10 TLS pairs (about 4 KiB), 1 in 10 Helm release records (about 12 KiB,
/// labelled as Helm labels them). Random bytes, so etcd cannot compress them away.
fn unrelated_secret(i: usize) -> Secret {
    let mut labels = std::collections::BTreeMap::new();
    let (type_, data): (&str, Vec<(&str, usize)>) = match i % 10 {
        0..=5 => {
            labels.insert("app".to_string(), format!("app-{}", i % 97));
            (
                "Opaque",
                vec![("password", 32), ("config.yaml", 1200), ("api-key", 64)],
            )
        }
        6..=8 => (
            "kubernetes.io/tls",
            vec![("tls.crt", 2600), ("tls.key", 1700)],
        ),
        _ => {
            labels.insert("owner".into(), "helm".into());
            labels.insert("name".into(), format!("release-{}", i / 10));
            labels.insert("status".into(), "deployed".into());
            labels.insert("version".into(), "1".into());
            ("helm.sh/release.v1", vec![("release", 12_000)])
        }
    };
    let name = if i % 10 == 9 {
        format!("sh.helm.release.v1.release-{}.v1", i / 10)
    } else {
        format!("unrelated-{i:05}")
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        type_: Some(type_.to_string()),
        data: Some(
            data.into_iter()
                .map(|(k, n)| (k.to_string(), ByteString(random_bytes(n))))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// Creates `count` unrelated Secrets spread over `namespaces`, `concurrency` at a time, with
/// `client`; returns the time it took (for W, the bare client's Secret creation rate).
pub async fn unrelated_secrets(
    client: &Client,
    namespaces: &[String],
    count: usize,
    concurrency: usize,
    offset: usize,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    futures::stream::iter((offset..offset + count).map(|i| {
        let api: Api<Secret> = Api::namespaced(client.clone(), &namespaces[i % namespaces.len()]);
        async move {
            api.create(&PostParams::default(), &unrelated_secret(i))
                .await
                .with_context(|| format!("create unrelated Secret {i}"))
        }
    }))
    .buffer_unordered(concurrency)
    .try_for_each(|_| async { Ok(()) })
    .await?;
    Ok(t0.elapsed())
}

/// Name and namespace of key `i` (round robin over the namespaces).
pub fn key_name(i: usize) -> String {
    format!("key-{i:05}")
}

/// The keys' spec: the defaults, except the rotation durations a benchmark cannot wait for:
/// `publishDelay` 2 s (default 2 m) and `overlap` 1 m (default 10 m; the operator's floor).
/// `minInterval` stays at its default (1 m, also the floor): rotations are requested only once
/// it has passed, so they are not delayed by it.
pub fn key_spec() -> Value {
    json!({ "rotation": { "publishDelay": "2s", "overlap": "1m" } })
}

/// Creates ProvisioningKeys `indices` (key `i` in `namespaces[i % len]`), `concurrency` at a
/// time.
pub async fn keys(
    client: &Client,
    namespaces: &[String],
    indices: impl Iterator<Item = usize>,
    concurrency: usize,
) -> anyhow::Result<()> {
    keys_with(client, namespaces, indices, concurrency, &key_spec()).await
}

/// As [`keys`], each with `spec`.
pub async fn keys_with(
    client: &Client,
    namespaces: &[String],
    indices: impl Iterator<Item = usize>,
    concurrency: usize,
    spec: &serde_json::Value,
) -> anyhow::Result<()> {
    let ar = tracker::provisioning_keys();
    futures::stream::iter(indices.map(|i| {
        let ns = &namespaces[i % namespaces.len()];
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        async move {
            let name = key_name(i);
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "ProvisioningKey",
                "metadata": { "name": name },
                "spec": spec,
            }))?;
            api.create(&PostParams::default(), &obj)
                .await
                .with_context(|| format!("create ProvisioningKey {ns}/{name}"))
        }
    }))
    .buffer_unordered(concurrency)
    .try_for_each(|_| async { Ok(()) })
    .await
}

/// Requests one rotation of each `(namespace, name)` with the `keyward.dev/rotate` annotation.
pub async fn rotate(
    client: &Client,
    keys: &[(String, String)],
    value: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let ar = tracker::provisioning_keys();
    futures::stream::iter(keys.iter().map(|(ns, name)| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let body = json!({ "metadata": { "annotations": { "keyward.dev/rotate": value } } });
        async move {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
                .await
                .with_context(|| format!("annotate ProvisioningKey {ns}/{name}"))
        }
    }))
    .buffer_unordered(concurrency)
    .try_for_each(|_| async { Ok(()) })
    .await
}

/// Deployment `name` of `replicas` agent pods mounting the agent Secret `secret` as a volume
/// (the stand-in kubelet runs an HTTP agent answering `/healthz` on port 8080 in each pod).
fn deployment(name: &str, replicas: i32, secret: &str) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "containers": [{
                        "name": "agent",
                        "image": "example.com/policy-agent:bench",
                        "volumeMounts": [{ "name": "keyward", "mountPath": "/var/run/keyward", "readOnly": true }],
                    }],
                    "volumes": [{ "name": "keyward", "secret": { "secretName": secret } }],
                    "terminationGracePeriodSeconds": 0,
                },
            },
        },
    }))?)
}

/// Creates `count` Deployments (`replicas` pods each) and their PolicyAgents in `ns`; agent
/// `i` uses key `keys[i % keys.len()]`. The connectivity check goes straight to the pod IPs
/// (`PodIp`, the mode that works on the local plane: the pods proxy refuses loopback IPs).
pub async fn policy_agents(
    client: &Client,
    ns: &str,
    count: usize,
    replicas: i32,
    keys: &[String],
    concurrency: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    let ar = tracker::policy_agents();
    let pairs: Vec<(String, String)> = (0..count)
        .map(|i| (format!("agent-{i:03}"), keys[i % keys.len()].clone()))
        .collect();
    futures::stream::iter(pairs.iter().map(|(name, key)| {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let pas: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        async move {
            // The agent Secret's default name is the key's name.
            deployments
                .create(&PostParams::default(), &deployment(name, replicas, key)?)
                .await
                .with_context(|| format!("create Deployment {ns}/{name}"))?;
            let pa: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "keyward.dev/v1alpha1",
                "kind": "PolicyAgent",
                "metadata": { "name": name },
                "spec": {
                    "provisioningKeyRef": { "name": key },
                    "workloadRef": { "kind": "Deployment", "name": name },
                    "connectivityCheck": {
                        "http": { "port": 8080, "path": "/healthz", "period": "1s", "successThreshold": 2 },
                    },
                },
            }))?;
            pas.create(&PostParams::default(), &pa)
                .await
                .with_context(|| format!("create PolicyAgent {ns}/{name}"))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(concurrency)
    .try_for_each(|_| async { Ok(()) })
    .await?;
    Ok(pairs)
}
