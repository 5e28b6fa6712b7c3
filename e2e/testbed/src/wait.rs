//! Watch-based waiting with a timeout.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a wait ended without its condition.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The condition did not hold within the timeout. `last` is the object's `status` (or the
    /// whole object if it has none, or `<absent>`) as last read, for the failure message.
    #[error("{what} not reached within {after:?}; last seen: {last}")]
    Timeout {
        /// What was waited for (`<kind>/<name>`).
        what: String,
        /// The timeout.
        after: Duration,
        /// The last state seen, as JSON.
        last: String,
    },
    /// The watch behind the wait failed (e.g. the resource type is unknown, or forbidden).
    #[error("waiting for {what} failed: {source}")]
    Failed {
        /// What was waited for (`<kind>/<name>`).
        what: String,
        /// The watch error.
        #[source]
        source: kube::runtime::wait::Error,
    },
}

impl WaitError {
    /// True if the wait ended because the timeout elapsed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WaitError::Timeout { .. })
    }
}

/// Watches the object `name` until `cond` holds, at most `timeout`.
///
/// Returns the object as it was when the condition held (`None` if the condition held for
/// an absent object, as with [`kube::runtime::wait::conditions::is_deleted`]).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    cond: impl Condition<K>,
    timeout: Duration,
) -> Result<Option<K>, WaitError>
where
    K: Resource + Clone + Debug + Send + Serialize + DeserializeOwned + 'static,
    <K as Resource>::DynamicType: Default,
{
    let what = format!("{}/{name}", K::kind(&Default::default()));
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(obj)) => Ok(obj),
        Ok(Err(source)) => Err(WaitError::Failed { what, source }),
        Err(_) => {
            let last = match api.get_opt(name).await {
                Ok(Some(obj)) => describe(&obj),
                Ok(None) => "<absent>".to_string(),
                Err(e) => format!("<cannot read: {e}>"),
            };
            Err(WaitError::Timeout {
                what,
                after: timeout,
                last,
            })
        }
    }
}

/// Waits until the object `name` with uid `uid` is gone (deleted, or replaced by another
/// object of the same name), at most `timeout`.
pub async fn wait_for_deleted<K>(
    api: &Api<K>,
    name: &str,
    uid: &str,
    timeout: Duration,
) -> Result<(), WaitError>
where
    K: Resource + Clone + Debug + Send + Serialize + DeserializeOwned + 'static,
    <K as Resource>::DynamicType: Default,
{
    wait_for(
        api,
        name,
        kube::runtime::wait::conditions::is_deleted(uid),
        timeout,
    )
    .await
    .map(|_| ())
}

fn describe<K: Serialize + ResourceExt>(obj: &K) -> String {
    match serde_json::to_value(obj) {
        Ok(mut v) => {
            let mut out = serde_json::Map::new();
            if let Some(g) = obj.meta().generation {
                out.insert("generation".into(), g.into());
            }
            match v.get_mut("status").map(serde_json::Value::take) {
                Some(status) => {
                    out.insert("status".into(), status);
                }
                None => return v.to_string(),
            }
            serde_json::Value::Object(out).to_string()
        }
        Err(e) => format!("<cannot serialize: {e}>"),
    }
}

/// Polls `check` every `interval` until it returns `Some`, at most `timeout`; for state that
/// has no watch (HTTP answers of agents, files). Returns the value, or the timeout error
/// carrying `what`.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(v) = check().await {
                return v;
            }
        }
    };
    tokio::time::timeout(timeout, poll)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: not reached within {timeout:?}"))
}

/// Conditions for [`wait_for`] (and for `kube::runtime::wait::await_condition`).
pub mod conditions {
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::wait::Condition;
    pub use kube::runtime::wait::conditions::{is_created, is_deleted};

    fn observed(generation: Option<i64>, observed: Option<i64>) -> bool {
        match (generation, observed) {
            (Some(g), Some(o)) => o >= g,
            (None, _) => true,
            (Some(_), None) => false,
        }
    }

    /// The Deployment's `Available` condition is `True` for its current generation and all
    /// `spec.replicas` are available.
    #[must_use]
    pub fn deployment_available() -> impl Condition<Deployment> {
        |obj: Option<&Deployment>| {
            let Some(d) = obj else { return false };
            let Some(s) = &d.status else { return false };
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let available = s
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Available" && c.status == "True");
            observed(d.metadata.generation, s.observed_generation)
                && available
                && s.available_replicas.unwrap_or(0) >= want
        }
    }

    /// The Deployment's rollout is complete, as `kubectl rollout status` decides it:
    /// `observedGeneration >= generation`, `updatedReplicas == spec.replicas`,
    /// `status.replicas == updatedReplicas` (no old pods left) and
    /// `availableReplicas == updatedReplicas`.
    #[must_use]
    pub fn deployment_rolled_out() -> impl Condition<Deployment> {
        |obj: Option<&Deployment>| {
            let Some(d) = obj else { return false };
            let Some(s) = &d.status else { return false };
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let updated = s.updated_replicas.unwrap_or(0);
            observed(d.metadata.generation, s.observed_generation)
                && updated == want
                && s.replicas.unwrap_or(0) == updated
                && s.available_replicas.unwrap_or(0) == updated
        }
    }

    /// The StatefulSet is rolled out: `observedGeneration >= generation`,
    /// `currentRevision == updateRevision`, and `status.replicas`, `readyReplicas`,
    /// `updatedReplicas` all equal `spec.replicas`.
    #[must_use]
    pub fn statefulset_rolled_out() -> impl Condition<StatefulSet> {
        |obj: Option<&StatefulSet>| {
            let Some(sts) = obj else { return false };
            let Some(s) = &sts.status else { return false };
            let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            observed(sts.metadata.generation, s.observed_generation)
                && s.update_revision.is_some()
                && s.current_revision == s.update_revision
                && s.replicas == want
                && s.ready_replicas.unwrap_or(0) == want
                && s.updated_replicas.unwrap_or(0) == want
        }
    }

    /// The ReplicaSet has all `spec.replicas` ready and available for its generation.
    #[must_use]
    pub fn replicaset_ready() -> impl Condition<ReplicaSet> {
        |obj: Option<&ReplicaSet>| {
            let Some(rs) = obj else { return false };
            let Some(s) = &rs.status else { return false };
            let want = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            observed(rs.metadata.generation, s.observed_generation)
                && s.replicas == want
                && s.ready_replicas.unwrap_or(0) == want
                && s.available_replicas.unwrap_or(0) == want
        }
    }

    /// The pod is in phase `Running` and its `Ready` condition is `True`.
    #[must_use]
    pub fn pod_running_and_ready() -> impl Condition<Pod> {
        |obj: Option<&Pod>| {
            let Some(s) = obj.and_then(|p| p.status.as_ref()) else {
                return false;
            };
            s.phase.as_deref() == Some("Running")
                && s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        }
    }
}

/// The test bed's watch backoff: 100 ms doubling to 1 s, reset by the next event. kube's
/// default grows to 30 s, so after an API server outage the bed itself (its kubelet, its
/// histories) could lag the operator by many seconds and blur what the fault suite measures.
#[derive(Clone, Debug)]
pub struct BedBackoff(Duration);

impl BedBackoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        BedBackoff(Self::MIN)
    }
}

impl Default for BedBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for BedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        Some(d)
    }
}

impl kube::runtime::utils::Backoff for BedBackoff {
    fn reset(&mut self) {
        self.0 = Self::MIN;
    }
}
