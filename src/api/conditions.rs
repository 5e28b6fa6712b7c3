//! Condition types and reason strings shared by conditions, Events and metrics.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

// kstatus (the status convention Flux, kpt and Argo CD's generic checks read):
// - `Ready`: the object does what its spec asks (a ProvisioningKey: its current key is handed
//   out; a PolicyAgent: its agents are confirmed on a key that is still trusted).
// - `Reconciling`: only while a new generation has not been acted on yet (the first key of a new
//   ProvisioningKey, the first confirmation of a new or re-pointed PolicyAgent, a failed
//   reconcile of a new generation). Never during a scheduled or requested rotation: Flux's
//   health checks would otherwise fail on every rotation.
// - `Stalled`: no progress without a human (an invalid or refused spec, a name owned by someone
//   else, a rotation past its confirmation timeout, a rollout that will not finish).
// Every condition carries the `observedGeneration` it was computed for, as does the status.
pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const ROTATING: &str = "Rotating";
pub const STALLED: &str = "Stalled";
pub const CONNECTED: &str = "Connected";

/// Reasons of the kstatus conditions when nothing is going on.
pub mod reasons {
    use crate::reason::Reason;

    /// `Reconciling=False`: the current generation has been acted on.
    pub const RECONCILED: &str = Reason::Reconciled.as_str();
    /// `Reconciling=True`: a new generation whose reconcile failed (the error is in `Ready`).
    pub const RECONCILE_FAILED: &str = Reason::ReconcileFailed.as_str();
    /// `Ready=False`: the spec breaks a rule (a malformed or out-of-range value, an invalid
    /// name or `secretTemplate`).
    pub const INVALID_SPEC: &str = Reason::InvalidSpec.as_str();
}

/// Builds a condition, keeping `lastTransitionTime` of `previous` when the status did not change,
/// so that a settled object produces the same status on every reconcile (no write).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time,
    }
}

/// True when the condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}
