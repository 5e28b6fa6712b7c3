//! Raw objects to [`AgentInput`], pure: no client, no clock. The controller reads the objects
//! (fresh), the model-based tests build them by hand; both map them here.

use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::ResourceExt;

use super::check::Check;
use super::{AgentInput, Evidence, PodObs};
use crate::api::ProvisioningKey;
use crate::api::policy_agent::{PolicyAgent, PolicyAgentStatus};
use crate::labels as l;
use crate::reason::Reason;
use crate::workload::{self, Lineage, Workload};

/// The raw objects one PolicyAgent decision is made on.
#[derive(Clone, Copy, Debug)]
pub struct AgentObjects<'a> {
    pub pa: &'a PolicyAgent,
    /// Every PolicyAgent of the namespace (the claims on workloads); may include `pa`.
    pub agents: &'a [PolicyAgent],
    pub pk: Option<&'a ProvisioningKey>,
    /// The Secret named by the ProvisioningKey's `secretName`, if it exists.
    pub agent_secret: Option<&'a Secret>,
    /// The workload named by `spec.workloadRef`, if it exists.
    pub workload: Option<&'a Workload>,
    /// The ServiceAccount named by `spec.workloadRef` of kind `ServiceAccount` (an agent
    /// outside the cluster), if it exists.
    pub service_account: Option<&'a ServiceAccount>,
    pub lineage: Lineage<'a>,
    /// Pods of the namespace; may include unrelated ones.
    pub pods: &'a [Pod],
    /// Whether the caps on concurrent rolls leave room for this workload.
    pub roll_slot: super::RollSlot,
}

/// Why a PolicyAgent does nothing but report: `Ready=False` with [`Refusal::reason`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{kind} {name} is already managed by PolicyAgent {owner}")]
    WorkloadClaimed {
        kind: String,
        name: String,
        owner: String,
    },
    #[error("ProvisioningKey {name} not found in namespace {namespace}")]
    ProvisioningKeyNotFound { name: String, namespace: String },
    #[error("Secret {secret} of ProvisioningKey {name} does not carry a key yet")]
    KeyNotHandedOut { name: String, secret: String },
    #[error("{kind} {name} not found in namespace {namespace}")]
    WorkloadNotFound {
        kind: String,
        name: String,
        namespace: String,
    },
}

impl Refusal {
    /// The PascalCase reason of `Ready=False` and of the Warning Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidSpec(_) => crate::api::conditions::reasons::INVALID_SPEC,
            Refusal::WorkloadClaimed { .. } => Reason::WorkloadClaimed.as_str(),
            Refusal::ProvisioningKeyNotFound { .. } => Reason::ProvisioningKeyNotFound.as_str(),
            Refusal::KeyNotHandedOut { .. } => Reason::KeyNotHandedOut.as_str(),
            Refusal::WorkloadNotFound { .. } => Reason::WorkloadNotFound.as_str(),
        }
    }

    /// A user error to fix (Warning Event), rather than something still to come.
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Refusal::InvalidSpec(_) | Refusal::WorkloadClaimed { .. }
        )
    }
}

fn claim_key(pa: &PolicyAgent) -> (Option<i64>, String) {
    (
        pa.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        pa.name_any(),
    )
}

/// The PolicyAgent that holds the claim on `pa`'s workload when it is not `pa`: one PolicyAgent
/// per workload, the oldest (creation time, then name) of those naming the same workload that
/// are not being deleted. A workload is identified by its kind and name in the namespace, that
/// is by the one object (uid) that exists under them.
pub fn claimant<'a>(pa: &PolicyAgent, agents: &'a [PolicyAgent]) -> Option<&'a PolicyAgent> {
    let me = claim_key(pa);
    agents
        .iter()
        .filter(|o| {
            o.name_any() != pa.name_any()
                && o.metadata.deletion_timestamp.is_none()
                && o.spec.workload_ref == pa.spec.workload_ref
                && claim_key(o) < me
        })
        .min_by_key(|o| claim_key(o))
}

/// The key id the agent Secret carries, if the Secret is controlled by the ProvisioningKey
/// (never from ProvisioningKey status, never from a Secret someone else owns).
pub fn secret_kid(pk: &ProvisioningKey, secret: &Secret) -> Option<String> {
    let pk_uid = pk.metadata.uid.as_deref()?;
    let owned = secret
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == pk_uid);
    if !owned {
        return None;
    }
    secret
        .data
        .as_ref()?
        .get(l::DATA_KEY_ID)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// The confirmation recorded in a status, when complete.
pub fn recorded(status: Option<&PolicyAgentStatus>) -> Option<Evidence> {
    let s = status?;
    Some(Evidence {
        key_id: s.confirmed_key_id.clone()?,
        workload_uid: s.confirmed_workload_uid.clone()?,
        revision: s.confirmed_revision.clone()?,
    })
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Maps the raw objects to the decision's input; `successes(pod uid, kid)` gives the
/// consecutive successful checks recorded for a pod on a key. Pods count when the workload
/// controls them (owner references, never labels alone) and they may hold a key (evicted and
/// completed pods do not).
pub fn observe(
    objs: &AgentObjects<'_>,
    successes: &dyn Fn(&str, &str) -> u32,
    check: &Check,
) -> Result<AgentInput, Refusal> {
    let pa = objs.pa;
    let ns = pa.namespace().unwrap_or_default();
    let wref = &pa.spec.workload_ref;
    if let Some(owner) = claimant(pa, objs.agents) {
        return Err(Refusal::WorkloadClaimed {
            kind: wref.kind.to_string(),
            name: wref.name.clone(),
            owner: owner.name_any(),
        });
    }
    let pk_name = &pa.spec.provisioning_key_ref.name;
    let Some(pk) = objs.pk.filter(|pk| pk.name_any() == *pk_name) else {
        return Err(Refusal::ProvisioningKeyNotFound {
            name: pk_name.clone(),
            namespace: ns,
        });
    };
    let Some(secret_kid) = objs
        .agent_secret
        .filter(|s| s.name_any() == pk.secret_name())
        .and_then(|s| secret_kid(pk, s))
    else {
        return Err(Refusal::KeyNotHandedOut {
            name: pk_name.clone(),
            secret: pk.secret_name(),
        });
    };
    let not_found = || Refusal::WorkloadNotFound {
        kind: wref.kind.to_string(),
        name: wref.name.clone(),
        namespace: ns.clone(),
    };
    if wref.kind == crate::api::policy_agent::WorkloadKind::ServiceAccount {
        let sa = objs
            .service_account
            .filter(|s| s.name_any() == wref.name)
            .ok_or_else(not_found)?;
        let uid = sa.uid().ok_or_else(not_found)?;
        return Ok(external(
            pa,
            &wref.name,
            uid,
            secret_kid,
            objs.roll_slot,
            check,
        ));
    }
    let w = objs
        .workload
        .filter(|w| w.kind() == wref.kind && w.name() == wref.name)
        .ok_or_else(not_found)?;
    let workload_uid = w.uid().ok_or_else(not_found)?;
    let pods = objs
        .pods
        .iter()
        .filter(|p| workload::owns_pod(w, objs.lineage, p) && workload::holds_key(p))
        .map(|p| {
            let uid = p.uid().unwrap_or_default();
            PodObs {
                name: p.name_any(),
                successes: successes(&uid, &secret_kid),
                acknowledged: false,
                uid,
                kid: p.annotations().get(l::KEY_ID).cloned(),
                revision: workload::pod_revision(w.kind(), p),
                terminating: p.metadata.deletion_timestamp.is_some(),
                unknown: workload::phase(p) == Some("Unknown"),
                ready: pod_ready(p),
            }
        })
        .collect();
    let (rollout, figures) = w.rollout();
    Ok(AgentInput {
        secret_kid,
        template_kid: w.template_kid(),
        workload_uid,
        current_revision: workload::current_revision(w, objs.lineage),
        rollout,
        figures,
        pods,
        success_threshold: check.success_threshold,
        require_ack: check.acknowledgement,
        rolled_at: w.rolled_at(),
        min_roll_interval: check.min_roll_interval,
        roll_slot: objs.roll_slot,
        previous: recorded(pa.status.as_ref()),
    })
}

pub use crate::api::policy_agent::EXTERNAL_REVISION;

/// The input of an agent outside the cluster, identified by its ServiceAccount (`uid`): one
/// "pod", the consumer itself, that holds whatever the agent Secret carries (it reads the
/// Secret, nothing is rolled) and is confirmed only by a verifier's acknowledgement of the
/// ServiceAccount on that key id.
fn external(
    pa: &PolicyAgent,
    name: &str,
    uid: String,
    secret_kid: String,
    roll_slot: super::RollSlot,
    check: &Check,
) -> AgentInput {
    AgentInput {
        template_kid: Some(secret_kid.clone()),
        workload_uid: uid.clone(),
        current_revision: Some(EXTERNAL_REVISION.into()),
        rollout: super::Rollout::Complete,
        figures: super::Figures::default(),
        pods: vec![PodObs {
            name: format!("serviceaccount/{name}"),
            uid,
            kid: Some(secret_kid.clone()),
            revision: Some(EXTERNAL_REVISION.into()),
            terminating: false,
            unknown: false,
            ready: true,
            successes: 0,
            acknowledged: false,
        }],
        success_threshold: 0,
        require_ack: true,
        rolled_at: None,
        min_roll_interval: check.min_roll_interval,
        roll_slot,
        previous: recorded(pa.status.as_ref()),
        secret_kid,
    }
}

#[cfg(test)]
mod tests;
