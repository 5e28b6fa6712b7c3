//! The `PolicyAgent` custom resource: a workload whose pods use a ProvisioningKey.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::provisioning_key::conditions_schema;

/// A workload of policy agents that mounts a ProvisioningKey's agent Secret.
///
/// Keyward rolls the workload when the key rotates and confirms, per pod, that the agents
/// connect with the new key; the old key is revoked only after every PolicyAgent that
/// references it is confirmed on its successor.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "PolicyAgent",
    namespaced,
    shortname = "pa",
    category = "keyward",
    status = "PolicyAgentStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Workload","type":"string","jsonPath":".spec.workloadRef.name"}"#,
    printcolumn = r#"{"name":"Confirmed Key","type":"string","jsonPath":".status.confirmedKeyId"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.pods.total"}"#,
    printcolumn = r#"{"name":"Confirmed","type":"integer","jsonPath":".status.pods.confirmed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAgentSpec {
    /// The ProvisioningKey (same namespace) whose agent Secret the workload mounts.
    pub provisioning_key_ref: LocalRef,
    /// The workload running the agents.
    pub workload_ref: WorkloadRef,
    /// How Keyward confirms that a pod connects with the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectivity_check: Option<ConnectivityCheck>,
    /// Rollout pacing for this workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
    DaemonSet,
    /// An agent outside the cluster (a VM, a CI job) that has no pod: it is this
    /// ServiceAccount. Nothing is rolled; it is confirmed when a `keyward verifier` accepted a
    /// request with the agent Secret's key id and a token of this ServiceAccount for the
    /// audience `keyward-consumer` (`keyward token sync --acknowledge-via`). The connectivity
    /// check is always `Acknowledgement`.
    ServiceAccount,
}

/// The `confirmedRevision` of an agent outside the cluster (`ServiceAccount`): it has no pod
/// template.
pub const EXTERNAL_REVISION: &str = "external";

impl std::fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::ServiceAccount => "ServiceAccount",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    pub kind: WorkloadKind,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum CheckMode {
    /// An HTTP check against every pod.
    #[default]
    Http,
    /// Rollout completion only, for agents without a health endpoint.
    RolloutOnly,
    /// The control plane's acknowledgement only: a `keyward verifier` accepted a request with
    /// the new key id and the pod's own pod-bound ServiceAccount token (audience `keyward`,
    /// in `X-Keyward-Pod-Token`, see docs/agent-proxy.md). No HTTP check.
    Acknowledgement,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum CheckVia {
    /// Straight to the pod IP (the operator needs network access to pods).
    #[default]
    PodIp,
    /// Through the API server's pods proxy (`pods/proxy` RBAC).
    ApiServerProxy,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Scheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTPS (the agent's certificate is not verified: the check proves liveness of the
    /// bundle download, not the agent's identity).
    Https,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectivityCheck {
    /// `Http` (default) or `RolloutOnly`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<CheckMode>,
    /// The HTTP check; required when mode is `Http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// With mode `Http`: also require the control plane's acknowledgement of each pod (see mode
    /// `Acknowledgement`). The HTTP check passes with either key while both are trusted; the
    /// acknowledgement proves which key the pod actually used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_acknowledgement: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCheck {
    /// Port of the agent's health endpoint (OPA: 8181).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Path and query (default `/health?bundles=true`, OPA's bundle health).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// `HTTP` (default) or `HTTPS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<Scheme>,
    /// Timeout of one check (default `2s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub timeout: Option<String>,
    /// Consecutive successes required since the pod started (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: Option<i32>,
    /// Time between checks of one pod (default `2s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub period: Option<String>,
    /// `PodIp` (default) or `ApiServerProxy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<CheckVia>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Minimum time between two rolls of this workload (default `0s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub min_interval: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAgentStatus {
    /// `Pending`, `Rolling`, `Confirming`, `Confirmed`, `Stalled` or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The key id every agent pod is confirmed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<String>,
    /// UID of the workload the confirmation was measured on. A confirmation counts only while
    /// the workload named by `spec.workloadRef` still has this UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_workload_uid: Option<String>,
    /// Template revision the confirmation was measured on (`pod-template-hash` of a
    /// Deployment's ReplicaSet, or the `controller-revision-hash` of a StatefulSet or
    /// DaemonSet). A confirmation counts only while the workload is still at this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_revision: Option<String>,
    /// The key id the workload is being rolled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_key_id: Option<String>,
    /// When the workload was last rolled by Keyward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRollout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Bounded history of rolls and confirmations, newest first (Events expire after an hour).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AgentHistoryEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentHistoryEntry {
    /// The key id the workload was rolled to.
    pub kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_at: Option<String>,
    /// Pods confirmed on the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<i32>,
    /// UID of the workload the confirmation was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_workload_uid: Option<String>,
    /// Template revision the confirmation was measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_revision: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodCounts {
    pub total: i32,
    pub on_current_key: i32,
    pub confirmed: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRollout {
    pub desired: i32,
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    pub complete: bool,
}
