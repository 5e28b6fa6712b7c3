//! The `KeyUsageReport` custom resource: what one `keyward verifier` replica saw of one
//! ProvisioningKey's key ids, written by that replica and read by the operator.
//!
//! Why its own kind (and not the ProvisioningKey's status, a ConfigMap or a Lease):
//! - Evidence from another component gets its own object, so neither component can write the
//!   other's fields, and RBAC keeps them apart: the verifier can create and patch
//!   `keyusagereports` and nothing else (it never writes ProvisioningKeys, Secrets or the trust
//!   bundle ConfigMaps; write access to ConfigMaps would let it edit a trust bundle).
//! - One object per (replica, ProvisioningKey), in the key's namespace, owned by the key (so it
//!   goes with it): each key's writes are its own (at most one per key per report interval,
//!   never a read-modify-write of a shared object), and the size stays bounded (key ids x
//!   [`MAX_PODS_PER_KID`] pods) however many keys exist. More pods than a report holds go on
//!   further pages: separate objects `spec.page` 2, 3, ... of `spec.pages` (see
//!   `crate::usage::report_page_name`), written together with the same sequence number; no pod
//!   is dropped for want of room.
//! - The replica's liveness and the time window it vouches for are not here: they are in one
//!   `coordination.k8s.io` Lease per replica (see `crate::verifier::report`), renewed every
//!   interval, as the kubelet separates its cheap heartbeat (a Lease) from its data (written
//!   on change). A key nobody uses costs no write at all.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most pods listed per key id on one page (a report with more pods has more pages).
pub const MAX_PODS_PER_KID: usize = 256;
/// Most pages of one (replica, ProvisioningKey) report: the verifier holds at most
/// `MAX_PAGES x MAX_PODS_PER_KID` (65,536) pods per key id (`podsTruncated` past that).
pub const MAX_PAGES: u32 = 256;

fn one() -> u32 {
    1
}

/// Use of one ProvisioningKey's key ids seen by one verifier replica.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "KeyUsageReport",
    namespaced,
    shortname = "kur",
    category = "keyward",
    printcolumn = r#"{"name":"Key","type":"string","jsonPath":".spec.provisioningKey"}"#,
    printcolumn = r#"{"name":"Replica","type":"string","jsonPath":".spec.replica"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KeyUsageReportSpec {
    /// The ProvisioningKey (same namespace).
    #[schemars(length(min = 1, max = 253))]
    pub provisioning_key: String,
    /// The verifier replica that wrote this report (its `--replica-id`).
    #[schemars(length(min = 1, max = 253))]
    pub replica: String,
    /// This object's page (1-based) of the replica's report of the key. Page 1 is named
    /// `<provisioningKey>.<replica>`, page n `<provisioningKey>.<replica>.p<n>`. Every page lists
    /// the same key ids with the same `lastUsedAt`; the pods are split across pages. A page
    /// above `pages` is superseded (the report shrank) and lists nothing.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub page: u32,
    /// How many pages the report had at this write.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 256))]
    pub pages: u32,
    /// One entry per key id the replica accepted a token of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["kid"]))]
    pub keys: Vec<KidUsage>,
}

impl Default for KeyUsageReportSpec {
    fn default() -> Self {
        KeyUsageReportSpec {
            provisioning_key: String::new(),
            replica: String::new(),
            page: 1,
            pages: 1,
            keys: Vec::new(),
        }
    }
}

/// Use of one key id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KidUsage {
    pub kid: String,
    /// The last accepted request with this key id (RFC 3339), from anyone, accurate to the
    /// replica's report resolution (its Lease annotation `keyward.dev/report-resolution`).
    pub last_used_at: String,
    /// Pods (by UID) seen with this key id, most recent first, this page's share (the pods of
    /// every page together are all the pods the replica holds); requests without a verified
    /// pod UID count above but never here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub pods: Vec<PodUsage>,
    /// More pods were seen than the replica holds in memory (65,536 per key id): a pod not
    /// listed on any page may still have used this key id. Repeated on every page.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pods_truncated: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodUsage {
    pub uid: String,
    pub last_used_at: String,
}
