//! Prometheus metrics, named in cert-manager's style.
//!
//! Labels are bounded: `namespace` and `name` of a ProvisioningKey for the per-key gauges, and
//! small fixed sets (`trigger`, `result`, `kind`, `controller`, `reason`, `verb`, `code`) for
//! everything else. No key id, fingerprint, token or key byte ever becomes a label or a value:
//! every label value is either a `&'static str` from a fixed list or a Kubernetes object's
//! namespace and name.
//!
//! Per-key gauges exist only while this replica runs the controllers (the leader):
//! [`Metrics::clear_keys`] drops them all when leadership is lost, and a deleted key's series
//! are removed ([`Metrics::remove_key`]), so a standby never doubles an alert.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::policy_agent::WorkloadKind;
use crate::client::RequestStats;
use crate::rotation::Trigger;

/// `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A ProvisioningKey (never its key id).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct KeyLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyConditionLabels {
    namespace: String,
    name: String,
    condition: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    trigger: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verb: &'static str,
    code: String,
}

/// The outcome of a rotation and the per-key gauges are decided with the rest of a reconcile's
/// outcome (pure, in `rotation::outcome`); the registry only records them.
pub use crate::rotation::outcome::{KeyGauges, RotationResult};

/// The controllers, as the `controller` label names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerKind {
    ProvisioningKey,
    PolicyAgent,
}

impl ControllerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ControllerKind::ProvisioningKey => "provisioningkey",
            ControllerKind::PolicyAgent => "policyagent",
        }
    }
}

/// The `condition` label values of `keyward_key_ready_status`.
pub const CONDITION_VALUES: [&str; 3] = ["True", "False", "Unknown"];

/// The operator's metrics. Cheap to clone (one `Arc`); clones share the registry.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct Inner {
    registry: Registry,
    key_expiration: Family<KeyLabels, Gauge>,
    key_next_rotation: Family<KeyLabels, Gauge>,
    key_ready: Family<KeyConditionLabels, Gauge>,
    rotation_stalled: Family<KeyLabels, Gauge>,
    verifier_silent: Family<KeyLabels, Gauge>,
    agents_confirmed: Family<KeyLabels, Gauge>,
    agents_total: Family<KeyLabels, Gauge>,
    rotations: Family<RotationLabels, Counter>,
    revocations: Family<KindLabels, Counter>,
    bundle_tampered: Counter,
    rollouts: Family<KindLabels, Counter>,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Family<ControllerLabels, Histogram>,
    leader: Gauge<i64, AtomicI64>,
    /// The keys that have per-key series.
    keys: Mutex<BTreeSet<KeyLabels>>,
}

/// Exports the client's response counts at scrape time (`keyward_kube_requests_total`).
#[derive(Debug)]
struct KubeRequests(RequestStats);

impl Collector for KubeRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "keyward_kube_requests",
            "Kubernetes API requests this process sent, by verb (get, list, watch, create, update, patch, delete, deletecollection) and HTTP status code of the response (\"<error>\": no response)",
            None,
            MetricType::Counter,
        )?;
        for ((verb, code), n) in self.0.responses() {
            let labels = RequestLabels {
                verb: verb.as_str(),
                code: code.to_string(),
            };
            ConstCounter::new(n).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// A registry with every metric, exporting the response counts of `requests` (the client's
    /// [`RequestStats`]).
    pub fn new(requests: &RequestStats) -> Self {
        let mut registry = Registry::default();
        let key_expiration = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_key_expiration_timestamp_seconds",
            "Expiry (Unix seconds) of the token in the key's agent Secret; absent while the Secret holds no token",
            key_expiration.clone(),
        );
        let key_next_rotation = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_key_next_rotation_timestamp_seconds",
            "When the key's next scheduled rotation is due (Unix seconds); absent when none is scheduled (suspended, or a rotation in flight)",
            key_next_rotation.clone(),
        );
        let key_ready = Family::<KeyConditionLabels, Gauge>::default();
        registry.register(
            "keyward_key_ready_status",
            "The key's Ready condition: one series per condition (True, False, Unknown), the one that holds is 1",
            key_ready.clone(),
        );
        let rotation_stalled = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_rotation_stalled",
            "1 while the key's Stalled condition is True (a rotation waits on agents past its deadline, or the spec cannot be served), else 0",
            rotation_stalled.clone(),
        );
        let verifier_silent = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_rotation_verifier_silent",
            "1 while the key's old key is held because the keyward verifier replicas cannot vouch that it is unused (Stalled, reason VerifierSilent), else 0",
            verifier_silent.clone(),
        );
        let agents_confirmed = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_agents_confirmed",
            "PolicyAgents referencing the key that are confirmed on its current key",
            agents_confirmed.clone(),
        );
        let agents_total = Family::<KeyLabels, Gauge>::default();
        registry.register(
            "keyward_agents_total",
            "PolicyAgents referencing the key",
            agents_total.clone(),
        );
        let rotations = Family::<RotationLabels, Counter>::default();
        registry.register(
            "keyward_rotations",
            "Key rotations by trigger (Initial: the first key, never completed; Interval; RequestToken: spec.rotation.requestToken; Annotation: keyward.dev/rotate; Compromised: spec.compromisedKeys; Replacement: the current key could no longer be served) and result (started: a new key was minted; completed: the last key it superseded was revoked, after every agent confirmed the new key or at once when compromised; stalled: the rotation became Stalled)",
            rotations.clone(),
        );
        let revocations = Family::<KindLabels, Counter>::default();
        registry.register(
            "keyward_revocations",
            "Keys revoked, by kind (normal: after the evidence that no agent needs it; emergency: listed in spec.compromisedKeys)",
            revocations.clone(),
        );
        let bundle_tampered = Counter::default();
        registry.register(
            "keyward_bundle_tampered",
            "Trust bundles rewritten because they trusted a key id the operator never recorded (a JWK injected into the ConfigMap; the verifier never trusted it)",
            bundle_tampered.clone(),
        );
        let rollouts = Family::<KindLabels, Counter>::default();
        registry.register(
            "keyward_rollouts_triggered",
            "Workload rollouts triggered to move pods to a new key, by workload kind (Deployment, StatefulSet, DaemonSet)",
            rollouts.clone(),
        );
        let reconciles = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "keyward_reconcile",
            "Reconciles run, by controller (provisioningkey, policyagent)",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "keyward_reconcile_errors",
            "Reconciles that failed, by controller and reason (the Warning Event reason, e.g. KubeApiError, NameTaken)",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::<ControllerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "keyward_reconcile_duration_seconds",
            "Time a reconcile took, by controller",
            reconcile_duration.clone(),
        );
        let leader = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        registry.register(
            "keyward_leader",
            "1 while this replica is the leader (runs the controllers), else 0",
            leader.clone(),
        );
        registry.register(
            "keyward_build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(KubeRequests(requests.clone())));
        Metrics(Arc::new(Inner {
            registry,
            key_expiration,
            key_next_rotation,
            key_ready,
            rotation_stalled,
            verifier_silent,
            agents_confirmed,
            agents_total,
            rotations,
            revocations,
            bundle_tampered,
            rollouts,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            keys: Mutex::default(),
        }))
    }

    /// Every metric in the Prometheus text format (version 0.0.4, see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0.registry)
        {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }

    // -- per key --------------------------------------------------------------------------------

    /// Sets the gauges of key `namespace/name` from what its reconcile reported.
    pub fn set_key(&self, namespace: &str, name: &str, g: &KeyGauges) {
        let key = KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let m = &self.0;
        match g.token_expiration {
            Some(t) => {
                m.key_expiration.get_or_create(&key).set(t);
            }
            None => {
                m.key_expiration.remove(&key);
            }
        }
        match g.next_rotation {
            Some(t) => {
                m.key_next_rotation.get_or_create(&key).set(t);
            }
            None => {
                m.key_next_rotation.remove(&key);
            }
        }
        self.set_key_ready(namespace, name, g.ready);
        m.rotation_stalled
            .get_or_create(&key)
            .set(i64::from(g.stalled));
        m.verifier_silent
            .get_or_create(&key)
            .set(i64::from(g.verifier_silent));
        m.agents_total
            .get_or_create(&key)
            .set(i64::try_from(g.agents_total).unwrap_or(i64::MAX));
        m.agents_confirmed
            .get_or_create(&key)
            .set(i64::try_from(g.agents_confirmed).unwrap_or(i64::MAX));
    }

    /// Sets `keyward_key_ready_status` of a key: the series of `status` (`True`, `False` or
    /// `Unknown`; anything else counts as `Unknown`) is 1, the other two 0.
    pub fn set_key_ready(&self, namespace: &str, name: &str, status: &str) {
        let status = if CONDITION_VALUES.contains(&status) {
            status
        } else {
            "Unknown"
        };
        self.keys().insert(KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        });
        for condition in CONDITION_VALUES {
            self.0
                .key_ready
                .get_or_create(&KeyConditionLabels {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    condition,
                })
                .set(i64::from(condition == status));
        }
    }

    /// Drops every series of key `namespace/name` (the key was deleted).
    pub fn remove_key(&self, namespace: &str, name: &str) {
        let key = KeyLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let m = &self.0;
        for family in [
            &m.key_expiration,
            &m.key_next_rotation,
            &m.rotation_stalled,
            &m.verifier_silent,
            &m.agents_confirmed,
            &m.agents_total,
        ] {
            family.remove(&key);
        }
        self.keys().remove(&key);
        for condition in CONDITION_VALUES {
            m.key_ready.remove(&KeyConditionLabels {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                condition,
            });
        }
    }

    /// Drops the series of every key for which `keep(namespace, name)` is false (after a
    /// relist: keys deleted while the watch was down).
    pub fn retain_keys(&self, keep: impl Fn(&str, &str) -> bool) {
        let gone: Vec<KeyLabels> = self
            .keys()
            .iter()
            .filter(|k| !keep(&k.namespace, &k.name))
            .cloned()
            .collect();
        for k in gone {
            self.remove_key(&k.namespace, &k.name);
        }
    }

    /// Drops every per-key series (leadership lost: only the leader exports them).
    pub fn clear_keys(&self) {
        let m = &self.0;
        m.key_expiration.clear();
        m.key_next_rotation.clear();
        m.key_ready.clear();
        m.rotation_stalled.clear();
        m.verifier_silent.clear();
        m.agents_confirmed.clear();
        m.agents_total.clear();
        self.keys().clear();
    }

    /// The keys that have per-key series.
    pub fn key_count(&self) -> usize {
        self.keys().len()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, BTreeSet<KeyLabels>> {
        self.0.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    // -- events ---------------------------------------------------------------------------------

    pub fn rotation(&self, trigger: Trigger, result: RotationResult) {
        self.0
            .rotations
            .get_or_create(&RotationLabels {
                trigger: trigger.as_str(),
                result: result.as_str(),
            })
            .inc();
    }

    pub fn revocation(&self, emergency: bool) {
        self.0
            .revocations
            .get_or_create(&KindLabels {
                kind: if emergency { "emergency" } else { "normal" },
            })
            .inc();
    }

    pub fn bundle_tampered(&self) {
        self.0.bundle_tampered.inc();
    }

    pub fn rollout_triggered(&self, kind: WorkloadKind) {
        let kind = match kind {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        };
        self.0.rollouts.get_or_create(&KindLabels { kind }).inc();
    }

    /// Records one reconcile: its duration, and its error reason if it failed.
    pub fn reconciled(
        &self,
        controller: ControllerKind,
        took: Duration,
        error: Option<&'static str>,
    ) {
        let labels = ControllerLabels {
            controller: controller.as_str(),
        };
        self.0.reconciles.get_or_create(&labels).inc();
        self.0
            .reconcile_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.0
                .reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: labels.controller,
                    reason,
                })
                .inc();
        }
    }

    /// `keyward_leader`: whether this replica leads (runs the controllers).
    pub fn set_leader(&self, leading: bool) {
        self.0.leader.set(i64::from(leading));
    }
}

/// Reconcile duration buckets: 5 ms to about 41 s, doubling.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ResponseCode, Verb};

    fn gauges() -> KeyGauges {
        KeyGauges {
            token_expiration: Some(1_700_000_000),
            next_rotation: Some(1_700_003_600),
            ready: "True",
            stalled: false,
            verifier_silent: false,
            agents_total: 2,
            agents_confirmed: 1,
        }
    }

    /// Lines of the exposition that are samples (not `# HELP`/`# TYPE`).
    fn samples(m: &Metrics) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(String::from)
            .collect()
    }

    #[test]
    fn every_metric_is_exported_under_its_final_name() {
        let stats = RequestStats::default();
        let m = Metrics::new(&stats);
        m.set_key("ns", "pk", &gauges());
        m.rotation(Trigger::Interval, RotationResult::Started);
        m.revocation(false);
        m.revocation(true);
        m.rollout_triggered(WorkloadKind::StatefulSet);
        m.reconciled(
            ControllerKind::ProvisioningKey,
            Duration::from_millis(20),
            Some("KubeApiError"),
        );
        m.set_leader(true);
        stats.record_response(Verb::Patch, ResponseCode::Status(409));
        stats.record_response(Verb::Get, ResponseCode::Error);
        let text = m.encode();
        for line in [
            r#"keyward_key_expiration_timestamp_seconds{namespace="ns",name="pk"} 1700000000"#,
            r#"keyward_key_next_rotation_timestamp_seconds{namespace="ns",name="pk"} 1700003600"#,
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="True"} 1"#,
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="False"} 0"#,
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="Unknown"} 0"#,
            r#"keyward_rotation_stalled{namespace="ns",name="pk"} 0"#,
            r#"keyward_agents_confirmed{namespace="ns",name="pk"} 1"#,
            r#"keyward_agents_total{namespace="ns",name="pk"} 2"#,
            r#"keyward_rotations_total{trigger="Interval",result="started"} 1"#,
            r#"keyward_revocations_total{kind="normal"} 1"#,
            r#"keyward_revocations_total{kind="emergency"} 1"#,
            r#"keyward_rollouts_triggered_total{kind="StatefulSet"} 1"#,
            r#"keyward_reconcile_total{controller="provisioningkey"} 1"#,
            r#"keyward_reconcile_errors_total{controller="provisioningkey",reason="KubeApiError"} 1"#,
            r#"keyward_reconcile_duration_seconds_count{controller="provisioningkey"} 1"#,
            r#"keyward_kube_requests_total{verb="patch",code="409"} 1"#,
            r#"keyward_kube_requests_total{verb="get",code="<error>"} 1"#,
            "keyward_leader 1",
            r#"keyward_build_info{version=""#,
            "# TYPE keyward_reconcile_duration_seconds histogram",
            "# TYPE keyward_rotations_total counter",
            "# TYPE keyward_key_ready_status gauge",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    /// Label names are a fixed, bounded set: a key is named by namespace and name only.
    #[test]
    fn labels_are_bounded_and_name_no_key_id() {
        let m = Metrics::new(&RequestStats::default());
        m.set_key("ns", "pk", &gauges());
        for t in Trigger::ALL {
            for r in [
                RotationResult::Started,
                RotationResult::Completed,
                RotationResult::Stalled,
            ] {
                m.rotation(t, r);
            }
        }
        let allowed = [
            "namespace",
            "name",
            "condition",
            "trigger",
            "result",
            "kind",
            "controller",
            "reason",
            "verb",
            "code",
            "version",
            "le",
        ];
        for line in samples(&m) {
            let Some((_, labels)) = line.split_once('{') else {
                continue;
            };
            let labels = labels.split_once('}').map_or("", |(l, _)| l);
            for pair in labels.split(',') {
                let (name, _) = pair.split_once('=').unwrap_or((pair, ""));
                assert!(allowed.contains(&name), "label {name:?} in {line}");
            }
        }
        // Every trigger x result is one series: 18, whatever the number of keys.
        let rotations = samples(&m)
            .into_iter()
            .filter(|l| l.starts_with("keyward_rotations_total{"))
            .count();
        assert_eq!(rotations, Trigger::ALL.len() * 3);
    }

    #[test]
    fn ready_status_has_three_series_one_of_them_set() {
        let m = Metrics::new(&RequestStats::default());
        m.set_key_ready("ns", "pk", "False");
        let text = m.encode();
        assert!(text.contains(r#"condition="False"} 1"#), "{text}");
        assert!(text.contains(r#"condition="True"} 0"#), "{text}");
        m.set_key_ready("ns", "pk", "whatever");
        let text = m.encode();
        assert!(text.contains(r#"condition="Unknown"} 1"#), "{text}");
        assert!(text.contains(r#"condition="False"} 0"#), "{text}");
    }

    /// A deleted key's series disappear; so do absent timestamps, and every key's on
    /// `clear_keys` (leadership lost) or when a relist no longer has it.
    #[test]
    fn a_deleted_keys_series_disappear() {
        let m = Metrics::new(&RequestStats::default());
        m.set_key("ns", "a", &gauges());
        m.set_key("ns", "b", &gauges());
        m.set_key("other", "a", &gauges());
        let of = |m: &Metrics, ns: &str, name: &str| {
            let needle = format!(r#"namespace="{ns}",name="{name}""#);
            samples(m)
                .into_iter()
                .filter(|l| l.contains(&needle))
                .count()
        };
        assert_eq!(of(&m, "ns", "a"), 9);
        m.remove_key("ns", "a");
        assert_eq!(of(&m, "ns", "a"), 0);
        assert_eq!(of(&m, "ns", "b"), 9);
        assert_eq!(m.key_count(), 2);

        m.set_key(
            "ns",
            "b",
            &KeyGauges {
                token_expiration: None,
                next_rotation: None,
                ..gauges()
            },
        );
        assert_eq!(of(&m, "ns", "b"), 7, "no timestamp series without a value");

        m.retain_keys(|ns, _| ns == "other");
        assert_eq!((of(&m, "ns", "b"), of(&m, "other", "a")), (0, 9));
        m.clear_keys();
        assert_eq!(m.key_count(), 0);
        assert!(
            !samples(&m).iter().any(|l| l.contains("namespace=")),
            "{}",
            m.encode()
        );
        // Counters survive: they are per process, not per key.
        m.revocation(false);
        m.clear_keys();
        assert!(
            m.encode()
                .contains(r#"keyward_revocations_total{kind="normal"} 1"#)
        );
    }
}
