//! What a ProvisioningKey reconcile records, pure: the status and its conditions
//! ([`status`]), the audit Events of an applied step and of a report's transitions ([`audit`]),
//! and the counters and gauges ([`counts`]). The controller only writes them.

pub mod audit;
pub mod counts;
pub mod status;
#[cfg(test)]
mod tests;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;

use super::desired::key_secret_name;
use super::observe::ts;
use super::{KeyState, Observed, ObservedKey};
use crate::api::provisioning_key::{ProvisioningKey, ProvisioningKeyStatus};
use crate::keys::KeyPair;

pub use audit::{
    Audit, ReportFacts, Trail, reason, report_facts, revocation_evidence, step_audits,
};
pub use counts::{Counted, KeyGauges, RotationResult, key_gauges, step_counts};
pub use status::{desired_status, failed_status};

/// History entries kept in status.
pub const HISTORY_LIMIT: usize = 10;
/// Workloads of uncovered consumers named in status.
pub const UNCOVERED_NAMED: usize = 5;
/// The state shown for a trusted key id that no key Secret records.
pub const UNRECORDED: &str = "Unrecorded";

/// A key minted by the apply step: its id and fingerprint, for the audit (never key bytes).
pub struct Minted {
    pub kid: String,
    pub fingerprint: String,
    /// The key itself, kept (zeroized on drop) for a hand-out later in the same reconcile, so
    /// its private key is not read back from the API server right after it was written.
    pub pair: Option<KeyPair>,
}

/// The key Secret of key `seq`, as the `related` object of its Events.
pub fn key_ref(pk: &ProvisioningKey, seq: u32) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: pk.namespace(),
        name: Some(key_secret_name(&pk.name_any(), seq)),
        ..Default::default()
    }
}

pub fn find(obs: &Observed, seq: u32) -> Option<&ObservedKey> {
    obs.keys.iter().find(|k| k.seq == seq)
}

/// When a verifier last reported `kid` used (status `trustedKeys[].lastUsedAt`).
pub fn last_used(obs: &Observed, kid: &str) -> Option<String> {
    obs.usage
        .as_ref()
        .and_then(|u| u.key_use.last_used.get(kid))
        .map(|t| ts(*t))
}

/// The newest key not revoked: the one a rotation in flight is about.
pub fn in_flight(obs: &Observed) -> Option<&ObservedKey> {
    obs.keys
        .iter()
        .rev()
        .find(|k| k.state != KeyState::Destroyed)
}

/// The condition of type `t` in `s`.
pub fn cond<'a>(s: &'a ProvisioningKeyStatus, t: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

pub fn jiff_from(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}
