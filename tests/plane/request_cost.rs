//! What one key costs the API server, counted at the operator's client by verb, resource and
//! query, in a namespace that also holds 2,000 unrelated Secrets (Helm release records, tokens,
//! certificates in real clusters).
//!
//! Counting the objects returned could not catch the expensive requests: a label-selected LIST
//! returns a handful of objects while etcd reads every Secret in the namespace. So this test
//! fails on the request *class*: no namespace-wide (or cluster-wide) LIST may be sent on the hot
//! path, i.e. anywhere but the watches' own start-up LISTs (the cold path, excluded by starting
//! the count once the operator is up) and the consumer scan, a pod LIST at most once per
//! rotation. Needs the local control plane (`e2e/cluster.sh up`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward::client::{RequestKey, RequestTable};
use keyward::labels as l;
use keyward::rotation::Floors;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const UNRELATED: usize = 2_000;

/// 2,000 Secrets Keyward has nothing to do with: Helm-release-like, token-like and TLS-like,
/// a few KiB each.
async fn unrelated_secrets(secrets: &Api<Secret>) {
    futures::stream::iter(0..UNRELATED)
        .map(|i| {
            let secrets = secrets.clone();
            async move {
                let (name, kind) = match i % 3 {
                    0 => (
                        format!("sh.helm.release.v1.app{i}.v1"),
                        "helm.sh/release.v1",
                    ),
                    1 => (format!("token-{i}"), "Opaque"),
                    _ => (format!("tls-{i}"), "kubernetes.io/tls"),
                };
                let mut data = BTreeMap::new();
                if kind == "kubernetes.io/tls" {
                    data.insert("tls.crt".to_string(), ByteString(vec![b'c'; 2048]));
                    data.insert("tls.key".to_string(), ByteString(vec![b'k'; 1024]));
                } else {
                    data.insert("release".to_string(), ByteString(vec![b'x'; 3072]));
                }
                let s = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name),
                        labels: Some(BTreeMap::from([("owner".to_string(), "helm".to_string())])),
                        ..Default::default()
                    },
                    type_: Some(kind.to_string()),
                    data: Some(data),
                    ..Default::default()
                };
                secrets
                    .create(&PostParams::default(), &s)
                    .await
                    .expect("create an unrelated Secret");
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

fn lists(snapshot: &BTreeMap<RequestKey, u64>) -> Vec<(String, u64)> {
    snapshot
        .iter()
        .filter(|(k, _)| k.is_collection_list())
        .map(|(k, n)| (k.to_string(), *n))
        .collect()
}

fn count(snapshot: &BTreeMap<RequestKey, u64>, f: impl Fn(&RequestKey) -> bool) -> u64 {
    snapshot.iter().filter(|(k, _)| f(k)).map(|(_, n)| n).sum()
}

#[tokio::test]
async fn one_key_costs_no_namespace_wide_list_among_2000_unrelated_secrets() {
    let ns = TestNamespace::new("kw-cost").await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    unrelated_secrets(&secrets).await;

    let op = Operator::start(ns.name(), Floors::none()).await;
    // The watches' start-up LISTs are the cold path: count from here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = op.requests().clone();
    stats.reset();

    // 1. The first key, from creation until settled.
    create_pk(
        &pks,
        "cost",
        json!({}),
        json!({ "rotation": { "minInterval": "0s", "publishDelay": "1s", "overlap": "1s" } }),
    )
    .await;
    let pk = wait_pk(&pks, "cost", "settled", is_settled).await;
    let first = stats.snapshot();
    println!(
        "first key, {} requests, {} writes:\n{}",
        stats.total(),
        stats.writes(),
        RequestTable(first.clone())
    );
    assert!(
        lists(&first).is_empty(),
        "namespace-wide LISTs on the first key's path: {:?}",
        lists(&first)
    );
    // Key Secret, trust record, trust bundle, agent Secret, two audit Events, status.
    assert!(
        stats.writes() <= 7,
        "the first key took {} writes",
        stats.writes()
    );

    // 2. Settled: nothing at all while idle.
    stats.reset();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = stats.snapshot();
    assert_eq!(
        stats.writes(),
        0,
        "writes while idle:\n{}",
        RequestTable(idle.clone())
    );
    assert!(
        lists(&idle).is_empty(),
        "LISTs while idle: {:?}",
        lists(&idle)
    );

    // 3. A rotation with no consumer: the old key waits its overlap and is revoked. The only
    //    collection LIST allowed is the consumer scan's pod LIST, once.
    stats.reset();
    let old = pk
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|c| c.kid.clone())
        .expect("current key");
    merge(
        &pks,
        "cost",
        json!({ "metadata": { "annotations": { l::ROTATE: "cost-1" } } }),
    )
    .await;
    let pk = wait_pk(&pks, "cost", "rotated, old key revoked", |pk| {
        pk.status
            .as_ref()
            .and_then(|s| s.current_key.as_ref())
            .is_some_and(|c| c.kid != old && rotated_to(pk, &c.kid, &[old.as_str()]))
    })
    .await;
    assert!(pk.status.is_some());
    let rotation = stats.snapshot();
    println!(
        "one rotation, {} requests, {} writes:\n{}",
        stats.total(),
        stats.writes(),
        RequestTable(rotation.clone())
    );
    let pod_lists = count(&rotation, |k| {
        k.is_collection_list() && k.resource == "pods"
    });
    assert!(pod_lists <= 1, "{pod_lists} pod LISTs in one rotation");
    let other: Vec<(String, u64)> = lists(&rotation)
        .into_iter()
        .filter(|(k, _)| !k.contains("pods"))
        .collect();
    assert!(
        other.is_empty(),
        "namespace-wide LISTs on a rotation's path: {other:?}"
    );
    op.stop().await;
    ns.cleanup().await;
}
