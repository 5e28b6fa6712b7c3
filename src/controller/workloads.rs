//! Reads of a PolicyAgent's workload, its lineage (ReplicaSets, ControllerRevisions) and its
//! pods. Each read is a GET or LIST straight from the API server (never a watch cache), so the
//! decision sees the state as of this reconcile: a roll or a confirmation is never decided on a
//! cache that lags behind our own last write or the workload controller's.
//!
//! (A LIST at `resourceVersionMatch=NotOlderThan` the workload's resourceVersion, served from
//! the API server's watch cache, was tried: on 1.20 a resource's watch cache only advances with
//! events of that resource, so such a read blocks for 3 s and fails with 504 whenever, say, no
//! pod changed since the Deployment's last write.)
//!
//! Lists are narrowed by the workload's label selector (a server-side filter), then
//! filtered by controller ownership (uid): labels alone never decide which objects belong.

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::api::policy_agent::WorkloadKind;
use crate::workload::{Lineage, Workload, owned_replica_sets, owned_revisions, owns_pod};

/// The workload `kind`/`name`, read with a GET (fresh: its uid, generation, template and
/// status as the API server has them now). `None` when it does not exist.
pub async fn fetch(
    client: &Client,
    ns: &str,
    kind: WorkloadKind,
    name: &str,
) -> Result<Option<Workload>, kube::Error> {
    Ok(match kind {
        WorkloadKind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(Workload::Deployment),
        WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(Workload::StatefulSet),
        WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
            .get_opt(name)
            .await?
            .map(Workload::DaemonSet),
        // Not a workload: an agent outside the cluster (see `agent::observe::external`).
        WorkloadKind::ServiceAccount => None,
    })
}

/// A label selector as a list-request string; `None` for a selector that selects nothing we can
/// express (no requirement at all, or an unknown operator): then nothing is listed.
pub fn selector_string(sel: &LabelSelector) -> Option<String> {
    let mut parts: Vec<String> = sel
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.clone().unwrap_or_default() {
        let values = e.values.unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            _ => return None,
        });
    }
    if parts.is_empty() {
        None
    } else {
        Some(parts.join(","))
    }
}

/// The ReplicaSets (Deployment) or ControllerRevisions (StatefulSet, DaemonSet) controlled by
/// `w`. Listed after `w` was read, so every
/// ReplicaSet or revision the workload's status refers to already exists (the controllers
/// create them before they update the workload's status); a newer one the workload does not
/// know yet is ignored by [`crate::workload::current_revision`].
pub async fn lineage(
    client: &Client,
    ns: &str,
    w: &Workload,
) -> Result<(Vec<ReplicaSet>, Vec<ControllerRevision>), kube::Error> {
    let Some(sel) = w.selector().as_ref().and_then(selector_string) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let lp = ListParams::default().labels(&sel);
    Ok(match w {
        Workload::Deployment(_) => {
            let all = Api::<ReplicaSet>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
                .items;
            let owned = owned_replica_sets(
                w,
                Lineage {
                    replica_sets: &all,
                    revisions: &[],
                },
            )
            .cloned()
            .collect();
            (owned, Vec::new())
        }
        Workload::StatefulSet(_) | Workload::DaemonSet(_) => {
            let all = Api::<ControllerRevision>::namespaced(client.clone(), ns)
                .list(&lp)
                .await?
                .items;
            let owned = owned_revisions(
                w,
                Lineage {
                    replica_sets: &[],
                    revisions: &all,
                },
            )
            .cloned()
            .collect();
            (Vec::new(), owned)
        }
    })
}

/// The pods of `w`: listed by its selector, kept when [`owns_pod`] (by controller uid through
/// `lineage`). Listed after the lineage, so a pod's ReplicaSet is in `lineage` unless it was
/// created in between;
/// such a pod is left out for this reconcile, and the rollout criteria (which count it through
/// the workload's status) keep the decision waiting.
pub async fn pods(
    client: &Client,
    ns: &str,
    w: &Workload,
    lineage: Lineage<'_>,
) -> Result<Vec<Pod>, kube::Error> {
    let Some(sel) = w.selector().as_ref().and_then(selector_string) else {
        return Ok(Vec::new());
    };
    Ok(Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&sel))
        .await?
        .items
        .into_iter()
        .filter(|p| owns_pod(w, lineage, p))
        .collect())
}
