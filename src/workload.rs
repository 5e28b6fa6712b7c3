//! Workloads as the PolicyAgent decision sees them, pure (no client): which pods belong to a
//! workload (by `ownerReferences`, never by labels alone), which template revision a workload
//! is at and which revision a pod was created from, which pods still hold a key, and whether a
//! pod uses a Secret.
//!
//! Facts of the Kubernetes controllers this relies on (checked against the local v1.20 plane):
//! - A Deployment's pods are controlled by a ReplicaSet, which is controlled by the Deployment.
//!   The pods and the ReplicaSet carry the label `pod-template-hash`; the ReplicaSet carries the
//!   annotation `deployment.kubernetes.io/revision`, and the Deployment's own annotation of that
//!   name is the revision of its newest ReplicaSet.
//! - A StatefulSet's or DaemonSet's pods are controlled by the workload itself, and carry the
//!   label `controller-revision-hash`. For a StatefulSet its value is the NAME of the
//!   ControllerRevision (`web-6c5d8f`), which is what `status.updateRevision` holds. For a
//!   DaemonSet it is the hash, which the ControllerRevision carries as its own
//!   `controller-revision-hash` label; the DaemonSet's newest ControllerRevision is the one with
//!   the highest `.revision` (a rollback re-numbers the old one).

use k8s_openapi::api::apps::v1::{
    ControllerRevision, DaemonSet, Deployment, ReplicaSet, StatefulSet,
};
use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use crate::api::policy_agent::WorkloadKind;
use crate::labels as l;

pub mod rollout;
pub use rollout::{Figures, Rollout};

/// Label of a Deployment's ReplicaSets and pods: the hash of the pod template.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Label of a StatefulSet's or DaemonSet's pods (and of a DaemonSet's ControllerRevisions).
pub const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
/// Annotation of a Deployment and its ReplicaSets: the rollout revision number.
pub const DEPLOYMENT_REVISION: &str = "deployment.kubernetes.io/revision";

/// A workload that runs policy agents.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    DaemonSet(DaemonSet),
}

impl Workload {
    pub fn kind(&self) -> WorkloadKind {
        match self {
            Workload::Deployment(_) => WorkloadKind::Deployment,
            Workload::StatefulSet(_) => WorkloadKind::StatefulSet,
            Workload::DaemonSet(_) => WorkloadKind::DaemonSet,
        }
    }

    /// The workload's object metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Workload::Deployment(d) => &d.metadata,
            Workload::StatefulSet(s) => &s.metadata,
            Workload::DaemonSet(d) => &d.metadata,
        }
    }

    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }

    pub fn uid(&self) -> Option<String> {
        self.meta().uid.clone()
    }

    /// The pod template (`None` only for an object without spec).
    pub fn template(&self) -> Option<&PodTemplateSpec> {
        match self {
            Workload::Deployment(d) => d.spec.as_ref().map(|s| &s.template),
            Workload::StatefulSet(s) => s.spec.as_ref().map(|s| &s.template),
            Workload::DaemonSet(d) => d.spec.as_ref().map(|s| &s.template),
        }
    }

    /// The `keyward.dev/key-id` annotation of the pod template: the key the pods are rolled to.
    pub fn template_kid(&self) -> Option<String> {
        self.template()?
            .metadata
            .as_ref()?
            .annotations
            .as_ref()?
            .get(l::KEY_ID)
            .cloned()
    }

    pub fn selector(&self) -> Option<LabelSelector> {
        match self {
            Workload::Deployment(d) => d.spec.as_ref().map(|s| s.selector.clone()),
            Workload::StatefulSet(s) => s.spec.as_ref().map(|s| s.selector.clone()),
            Workload::DaemonSet(d) => d.spec.as_ref().map(|s| s.selector.clone()),
        }
    }

    /// The rollout judged by the criteria of the workload's kind.
    pub fn rollout(&self) -> (Rollout, Figures) {
        match self {
            Workload::Deployment(d) => rollout::deployment(d),
            Workload::StatefulSet(s) => rollout::stateful_set(s),
            Workload::DaemonSet(d) => rollout::daemon_set(d),
        }
    }

    /// When Keyward last rolled the workload (`keyward.dev/rolled-at` on its metadata).
    pub fn rolled_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.meta()
            .annotations
            .as_ref()?
            .get(l::ROLLED_AT)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    }

    /// The workload's controller has observed its latest spec.
    fn observed(&self) -> bool {
        let observed = match self {
            Workload::Deployment(d) => d.status.as_ref().and_then(|s| s.observed_generation),
            Workload::StatefulSet(s) => s.status.as_ref().and_then(|s| s.observed_generation),
            Workload::DaemonSet(d) => d.status.as_ref().and_then(|s| s.observed_generation),
        };
        observed.unwrap_or(0) >= self.meta().generation.unwrap_or(0)
    }
}

/// What ties pods to a workload: ReplicaSets (Deployment) and ControllerRevisions (StatefulSet,
/// DaemonSet) of the namespace; may contain unrelated ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lineage<'a> {
    pub replica_sets: &'a [ReplicaSet],
    pub revisions: &'a [ControllerRevision],
}

/// The controller reference of an object (`controller: true`), if any.
pub fn controller_of(refs: Option<&Vec<OwnerReference>>) -> Option<&OwnerReference> {
    refs?.iter().find(|o| o.controller == Some(true))
}

fn controlled_by(meta: &ObjectMeta, kind: &str, uid: &str) -> bool {
    controller_of(meta.owner_references.as_ref()).is_some_and(|o| o.kind == kind && o.uid == uid)
}

/// The ReplicaSets of `lineage` controlled by the Deployment `w`.
pub fn owned_replica_sets<'a>(
    w: &Workload,
    lineage: Lineage<'a>,
) -> impl Iterator<Item = &'a ReplicaSet> {
    let uid = match w {
        Workload::Deployment(_) => w.uid(),
        _ => None,
    };
    lineage.replica_sets.iter().filter(move |rs| {
        uid.as_deref()
            .is_some_and(|u| controlled_by(&rs.metadata, "Deployment", u))
    })
}

/// The ControllerRevisions of `lineage` controlled by the StatefulSet or DaemonSet `w`.
pub fn owned_revisions<'a>(
    w: &Workload,
    lineage: Lineage<'a>,
) -> impl Iterator<Item = &'a ControllerRevision> {
    let owner = match w {
        Workload::Deployment(_) => None,
        _ => w.uid().map(|u| (w.kind().to_string(), u)),
    };
    lineage.revisions.iter().filter(move |cr| {
        owner
            .as_ref()
            .is_some_and(|(kind, uid)| controlled_by(&cr.metadata, kind, uid))
    })
}

/// By ownerReferences (controller=true): Pod -> ReplicaSet -> Deployment (uid), or Pod ->
/// StatefulSet/DaemonSet (uid). Labels alone never decide.
pub fn owns_pod(w: &Workload, lineage: Lineage<'_>, pod: &Pod) -> bool {
    let Some(uid) = w.uid() else {
        return false;
    };
    let Some(owner) = controller_of(pod.metadata.owner_references.as_ref()) else {
        return false;
    };
    match w {
        Workload::Deployment(_) => {
            owner.kind == "ReplicaSet"
                && owned_replica_sets(w, lineage)
                    .any(|rs| rs.metadata.uid.as_deref() == Some(owner.uid.as_str()))
        }
        Workload::StatefulSet(_) | Workload::DaemonSet(_) => {
            owner.kind == w.kind().to_string() && owner.uid == uid
        }
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.labels.as_ref()?.get(key)
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a String> {
    meta.annotations.as_ref()?.get(key)
}

/// The workload's current template revision: Deployment: `pod-template-hash` label of the
/// ReplicaSet owned by it whose `deployment.kubernetes.io/revision` annotation equals the
/// Deployment's; StatefulSet: status.updateRevision; DaemonSet: `controller-revision-hash` label
/// of the owned ControllerRevision with the highest `.revision`. Each only once the controller
/// observed the workload's latest generation (before that, the revision it reports is the
/// previous template's). None when unknown.
pub fn current_revision(w: &Workload, lineage: Lineage<'_>) -> Option<String> {
    if !w.observed() {
        return None;
    }
    match w {
        Workload::Deployment(_) => {
            let revision = annotation(w.meta(), DEPLOYMENT_REVISION)?;
            owned_replica_sets(w, lineage)
                .find(|rs| annotation(&rs.metadata, DEPLOYMENT_REVISION) == Some(revision))
                .and_then(|rs| label(&rs.metadata, POD_TEMPLATE_HASH).cloned())
        }
        Workload::StatefulSet(s) => s.status.as_ref()?.update_revision.clone(),
        Workload::DaemonSet(_) => owned_revisions(w, lineage)
            .max_by_key(|cr| cr.revision)
            .and_then(|cr| label(&cr.metadata, CONTROLLER_REVISION_HASH).cloned()),
    }
}

/// The revision a pod was created from: `pod-template-hash` (Deployment) or
/// `controller-revision-hash` label (StatefulSet, DaemonSet).
pub fn pod_revision(kind: WorkloadKind, pod: &Pod) -> Option<String> {
    let key = match kind {
        WorkloadKind::Deployment => POD_TEMPLATE_HASH,
        WorkloadKind::StatefulSet | WorkloadKind::DaemonSet => CONTROLLER_REVISION_HASH,
        WorkloadKind::ServiceAccount => return None,
    };
    label(&pod.metadata, key).cloned()
}

/// The pod's phase, if reported.
pub fn phase(pod: &Pod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// False for pods in phase Failed or Succeeded (evicted, completed): their containers are gone,
/// they hold no key. Unknown, Pending, Running and terminating pods, whose containers may still
/// run: true.
pub fn holds_key(pod: &Pod) -> bool {
    !matches!(phase(pod), Some("Failed" | "Succeeded"))
}

fn env_uses(env: Option<&Vec<EnvVar>>, env_from: Option<&Vec<EnvFromSource>>, name: &str) -> bool {
    env.into_iter().flatten().any(|e| {
        e.value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .is_some_and(|r| r.name == name)
    }) || env_from
        .into_iter()
        .flatten()
        .any(|e| e.secret_ref.as_ref().is_some_and(|r| r.name == name))
}

fn container_uses(c: &Container, name: &str) -> bool {
    env_uses(c.env.as_ref(), c.env_from.as_ref(), name)
}

/// Whether the pod uses Secret `secret_name`: a `secret` volume, a `projected` volume source,
/// `env[].valueFrom.secretKeyRef` or `envFrom[].secretRef`, in containers, initContainers and
/// ephemeralContainers.
pub fn uses_secret(pod: &Pod, secret_name: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let volume = spec.volumes.iter().flatten().any(|v| {
        v.secret
            .as_ref()
            .is_some_and(|s| s.secret_name.as_deref() == Some(secret_name))
            || v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.secret.as_ref().is_some_and(|s| s.name == secret_name))
            })
    });
    volume
        || spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| container_uses(c, secret_name))
        || spec
            .ephemeral_containers
            .iter()
            .flatten()
            .any(|c| env_uses(c.env.as_ref(), c.env_from.as_ref(), secret_name))
}

#[cfg(test)]
mod tests;
