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
//!
//! The per-key gauges are kept as one small [`KeySeries`] per key and written out at scrape time
//! (as cert-manager computes its timestamps), in the exposition label families would give: a
//! family per metric, with its HELP and TYPE, each series labelled `namespace` and `name`. Label
//! families held about ten series a key, each with its own copy of both labels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::policy_agent::WorkloadKind;
use crate::client::RequestStats;
use crate::rotation::Trigger;

/// `Content-Type` of [`Metrics::encode`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The labels of a per-key series: a ProvisioningKey (never its key id).
fn key_labels<'a>(namespace: &'a str, name: &'a str) -> [(&'static str, &'a str); 2] {
    [("namespace", namespace), ("name", name)]
}

/// The labels of a `keyward_key_ready_status` series.
fn key_condition_labels<'a>(
    namespace: &'a str,
    name: &'a str,
    condition: &'static str,
) -> [(&'static str, &'a str); 3] {
    [
        ("namespace", namespace),
        ("name", name),
        ("condition", condition),
    ]
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
    /// The per-key gauges (shared with the registry's [`PerKey`] collector).
    keys: Arc<Mutex<KeyMap>>,
    rotations: Family<RotationLabels, Counter>,
    revocations: Family<KindLabels, Counter>,
    key_lifecycle: Family<KindLabels, Counter>,
    bundle_tampered: Counter,
    rollouts: Family<KindLabels, Counter>,
    reconciles: Family<ControllerLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Family<ControllerLabels, Histogram>,
    leader: Gauge<i64, AtomicI64>,
}

/// The per-key gauges of one key, as its reconcile last set them: 72 bytes (a map entry with
/// the key's name, about 0.2 KiB), where label families held ten series, each with its own
/// copy of the labels and its own `Arc` (about 1.7 KiB a key; both estimated from the types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeySeries {
    /// `keyward_key_expiration_timestamp_seconds`, when set.
    token_expiration: Option<i64>,
    /// `keyward_key_next_rotation_timestamp_seconds`, when set.
    next_rotation: Option<i64>,
    /// `keyward_key_ready_status`: the condition that holds, from [`CONDITION_VALUES`].
    ready: &'static str,
    /// The gauges only [`Metrics::set_key`] sets (`set_key_ready` alone leaves them absent).
    state: Option<KeyState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyState {
    stalled: bool,
    verifier_silent: bool,
    agents_confirmed: i64,
    agents_total: i64,
    deactivated: i64,
}

/// Namespace -> name -> the key's gauges.
type KeyMap = BTreeMap<String, BTreeMap<String, KeySeries>>;

/// The per-key gauges, in registration order: name, HELP (with the `.` that
/// [`Registry::register`] appends), and the key's series (`None`: absent).
type PerKeyGauge = (&'static str, &'static str, fn(&KeySeries) -> Option<i64>);

const PER_KEY_GAUGES: [PerKeyGauge; 7] = [
    (
        "keyward_key_expiration_timestamp_seconds",
        "Expiry (Unix seconds) of the token in the key's agent Secret; absent while the Secret holds no token.",
        |k| k.token_expiration,
    ),
    (
        "keyward_key_next_rotation_timestamp_seconds",
        "When the key's next scheduled rotation is due (Unix seconds); absent when none is scheduled (suspended, or a rotation in flight).",
        |k| k.next_rotation,
    ),
    (
        "keyward_rotation_stalled",
        "1 while the key's Stalled condition is True (a rotation waits on agents past its deadline, or the spec cannot be served), else 0.",
        |k| k.state.map(|s| i64::from(s.stalled)),
    ),
    (
        "keyward_rotation_verifier_silent",
        "1 while the key's old key is held because the keyward verifier replicas cannot vouch that it is unused (Stalled, reason VerifierSilent), else 0.",
        |k| k.state.map(|s| i64::from(s.verifier_silent)),
    ),
    (
        "keyward_agents_confirmed",
        "PolicyAgents referencing the key that are confirmed on its current key.",
        |k| k.state.map(|s| s.agents_confirmed),
    ),
    (
        "keyward_agents_total",
        "PolicyAgents referencing the key.",
        |k| k.state.map(|s| s.agents_total),
    ),
    (
        "keyward_keys_deactivated",
        "The key's keys that are deactivated (refused everywhere, private key kept) and not yet destroyed: keyward reactivate can bring them back.",
        |k| k.state.map(|s| s.deactivated),
    ),
];

const KEY_READY: (&str, &str) = (
    "keyward_key_ready_status",
    "The key's Ready condition: one series per condition (True, False, Unknown), the one that holds is 1.",
);

/// Writes the per-key gauges at scrape time. A metric without any series is left out (HELP and
/// TYPE included), as the registry leaves out an empty family.
#[derive(Debug)]
struct PerKey(Arc<Mutex<KeyMap>>);

impl Collector for PerKey {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let keys = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let all = || {
            keys.iter()
                .flat_map(|(ns, names)| names.iter().map(move |(name, k)| (ns, name, k)))
        };
        let [expiration, next_rotation, rest @ ..] = &PER_KEY_GAUGES;
        for (metric, help, value) in [expiration, next_rotation] {
            encode_gauge(&mut encoder, metric, help, all(), value)?;
        }
        // `keyward_key_ready_status` third, as it was registered.
        let (metric, help) = KEY_READY;
        if !keys.is_empty() {
            let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Gauge)?;
            for (namespace, name, k) in all() {
                for condition in CONDITION_VALUES {
                    let labels = key_condition_labels(namespace, name, condition);
                    ConstGauge::new(i64::from(condition == k.ready))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        for (metric, help, value) in rest {
            encode_gauge(&mut encoder, metric, help, all(), value)?;
        }
        Ok(())
    }
}

/// One per-key gauge: a series for each key where `value` has one.
fn encode_gauge<'k>(
    encoder: &mut DescriptorEncoder,
    metric: &str,
    help: &str,
    keys: impl Iterator<Item = (&'k String, &'k String, &'k KeySeries)>,
    value: &fn(&KeySeries) -> Option<i64>,
) -> Result<(), std::fmt::Error> {
    let mut series = keys
        .filter_map(|(ns, name, k)| value(k).map(|v| (ns, name, v)))
        .peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(metric, help, None, MetricType::Gauge)?;
    for (namespace, name, v) in series {
        ConstGauge::new(v).encode(family.encode_family(&key_labels(namespace, name))?)?;
    }
    Ok(())
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
        let keys = Arc::new(Mutex::new(KeyMap::new()));
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
        let key_lifecycle = Family::<KindLabels, Counter>::default();
        registry.register(
            "keyward_key_lifecycle",
            "Key lifecycle transitions after the hand-out, by kind (deactivated: revoked reversibly, private key kept for retainDeactivatedFor; reactivated: a deactivated key put back into the trusted set; destroyed: private key deleted, for good)",
            key_lifecycle.clone(),
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
        registry.register_collector(Box::new(PerKey(keys.clone())));
        registry.register_collector(Box::new(KubeRequests(requests.clone())));
        Metrics(Arc::new(Inner {
            registry,
            keys,
            rotations,
            revocations,
            key_lifecycle,
            bundle_tampered,
            rollouts,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
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
        self.update_key(namespace, name, |k| {
            k.token_expiration = g.token_expiration;
            k.next_rotation = g.next_rotation;
            k.ready = ready_condition(g.ready);
            k.state = Some(KeyState {
                stalled: g.stalled,
                verifier_silent: g.verifier_silent,
                agents_confirmed: i64::try_from(g.agents_confirmed).unwrap_or(i64::MAX),
                agents_total: i64::try_from(g.agents_total).unwrap_or(i64::MAX),
                deactivated: i64::try_from(g.deactivated).unwrap_or(i64::MAX),
            });
        });
    }

    /// Sets `keyward_key_ready_status` of a key: the series of `status` (`True`, `False` or
    /// `Unknown`; anything else counts as `Unknown`) is 1, the other two 0.
    pub fn set_key_ready(&self, namespace: &str, name: &str, status: &str) {
        self.update_key(namespace, name, |k| k.ready = ready_condition(status));
    }

    /// Applies `update` to the gauges of key `namespace/name`, creating them (`Unknown`, no
    /// other series) if it has none.
    fn update_key(&self, namespace: &str, name: &str, update: impl FnOnce(&mut KeySeries)) {
        let mut keys = self.keys();
        let names = match keys.get_mut(namespace) {
            Some(names) => names,
            None => keys.entry(namespace.to_string()).or_default(),
        };
        match names.get_mut(name) {
            Some(k) => update(k),
            None => {
                let mut k = KeySeries {
                    token_expiration: None,
                    next_rotation: None,
                    ready: "Unknown",
                    state: None,
                };
                update(&mut k);
                names.insert(name.to_string(), k);
            }
        }
    }

    /// Drops every series of key `namespace/name` (the key was deleted).
    pub fn remove_key(&self, namespace: &str, name: &str) {
        let mut keys = self.keys();
        if let Some(names) = keys.get_mut(namespace) {
            names.remove(name);
            if names.is_empty() {
                keys.remove(namespace);
            }
        }
    }

    /// Drops the series of every key for which `keep(namespace, name)` is false (after a
    /// relist: keys deleted while the watch was down).
    pub fn retain_keys(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut keys = self.keys();
        keys.retain(|ns, names| {
            names.retain(|name, _| keep(ns, name));
            !names.is_empty()
        });
    }

    /// Drops every per-key series (leadership lost: only the leader exports them).
    pub fn clear_keys(&self) {
        self.keys().clear();
    }

    /// The keys that have per-key series.
    pub fn key_count(&self) -> usize {
        self.keys().values().map(BTreeMap::len).sum()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, KeyMap> {
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

    pub fn key_lifecycle(&self, kind: &'static str) {
        self.0
            .key_lifecycle
            .get_or_create(&KindLabels { kind })
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
            WorkloadKind::ServiceAccount => "ServiceAccount",
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

/// The condition of [`CONDITION_VALUES`] that `status` names (anything else: `Unknown`).
fn ready_condition(status: &str) -> &'static str {
    CONDITION_VALUES
        .into_iter()
        .find(|c| *c == status)
        .unwrap_or("Unknown")
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
            deactivated: 1,
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
        m.key_lifecycle("deactivated");
        m.key_lifecycle("reactivated");
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
            r#"keyward_key_lifecycle_total{kind="deactivated"} 1"#,
            r#"keyward_key_lifecycle_total{kind="reactivated"} 1"#,
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
        assert_eq!(of(&m, "ns", "a"), 10);
        m.remove_key("ns", "a");
        assert_eq!(of(&m, "ns", "a"), 0);
        assert_eq!(of(&m, "ns", "b"), 10);
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
        assert_eq!(of(&m, "ns", "b"), 8, "no timestamp series without a value");

        m.retain_keys(|ns, _| ns == "other");
        assert_eq!((of(&m, "ns", "b"), of(&m, "other", "a")), (0, 10));
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

    /// A key as a test sets it: namespace, name, gauges (`None`: only its ready status), ready
    /// status.
    type KeySet = (&'static str, &'static str, Option<KeyGauges>, &'static str);

    /// The per-key families as label families (the registry before the per-key gauges were
    /// written at scrape time), set with `keys`: the reference a scraper saw.
    fn as_label_families(keys: &[KeySet]) -> String {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Key {
            namespace: String,
            name: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct KeyCondition {
            namespace: String,
            name: String,
            condition: &'static str,
        }
        let mut registry = Registry::default();
        let families: Vec<Family<Key, Gauge>> = (0..7).map(|_| Family::default()).collect();
        let ready = Family::<KeyCondition, Gauge>::default();
        let [exp, next, stalled, silent, confirmed, total, deactivated] = &PER_KEY_GAUGES;
        for (i, (metric, help, _)) in [exp, next].into_iter().enumerate() {
            registry.register(*metric, help.trim_end_matches('.'), families[i].clone());
        }
        registry.register(
            KEY_READY.0,
            KEY_READY.1.trim_end_matches('.'),
            ready.clone(),
        );
        for (i, (metric, help, _)) in [stalled, silent, confirmed, total, deactivated]
            .into_iter()
            .enumerate()
        {
            registry.register(*metric, help.trim_end_matches('.'), families[i + 2].clone());
        }
        for (ns, name, g, status) in keys {
            let key = Key {
                namespace: ns.to_string(),
                name: name.to_string(),
            };
            if let Some(g) = g {
                if let Some(t) = g.token_expiration {
                    families[0].get_or_create(&key).set(t);
                }
                if let Some(t) = g.next_rotation {
                    families[1].get_or_create(&key).set(t);
                }
                families[2].get_or_create(&key).set(i64::from(g.stalled));
                families[3]
                    .get_or_create(&key)
                    .set(i64::from(g.verifier_silent));
                families[4]
                    .get_or_create(&key)
                    .set(i64::try_from(g.agents_confirmed).unwrap_or(i64::MAX));
                families[5]
                    .get_or_create(&key)
                    .set(i64::try_from(g.agents_total).unwrap_or(i64::MAX));
                families[6]
                    .get_or_create(&key)
                    .set(i64::try_from(g.deactivated).unwrap_or(i64::MAX));
            }
            for condition in CONDITION_VALUES {
                ready
                    .get_or_create(&KeyCondition {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        condition,
                    })
                    .set(i64::from(condition == *status));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    /// The per-key families of an exposition, in order: HELP, TYPE, then the samples sorted
    /// (label families write theirs in hash order).
    fn per_key_families(text: &str) -> Vec<Vec<String>> {
        let per_key = |l: &str| {
            PER_KEY_GAUGES
                .iter()
                .map(|(m, _, _)| *m)
                .chain([KEY_READY.0])
                .any(|m| {
                    l.strip_prefix("# HELP ")
                        .or(l.strip_prefix("# TYPE "))
                        .unwrap_or(l)
                        .split([' ', '{'])
                        .next()
                        == Some(m)
                })
        };
        let mut out: Vec<Vec<String>> = Vec::new();
        for l in text.lines().filter(|l| per_key(l)) {
            if l.starts_with("# HELP ") {
                out.push(Vec::new());
            }
            if let Some(f) = out.last_mut() {
                f.push(l.to_string());
            }
        }
        for f in &mut out {
            f[2..].sort();
        }
        out
    }

    /// Per-key series written at scrape time read exactly as label families did: names, HELP
    /// and TYPE lines, labels, values, and the same families absent.
    #[test]
    fn per_key_series_render_as_label_families_did() {
        let no_timestamps = KeyGauges {
            token_expiration: None,
            next_rotation: None,
            ready: "False",
            stalled: true,
            verifier_silent: true,
            agents_total: usize::MAX,
            ..gauges()
        };
        let cases: Vec<Vec<KeySet>> = vec![
            vec![],
            vec![("ns", "pk", Some(gauges()), "True")],
            vec![("ns", "only-ready", None, "False")],
            vec![
                ("ns", "a", Some(gauges()), "True"),
                ("ns", "b", Some(no_timestamps), "False"),
                ("other", "a", None, "Unknown"),
                ("ns", r#"quo"te"#, Some(gauges()), "True"),
            ],
        ];
        for (keys, families) in cases.into_iter().zip([0, 8, 1, 8]) {
            let m = Metrics::new(&RequestStats::default());
            for (ns, name, g, status) in &keys {
                match g {
                    Some(g) => m.set_key(ns, name, g),
                    None => m.set_key_ready(ns, name, status),
                }
            }
            let now = m.encode();
            let before = as_label_families(&keys);
            assert_eq!(per_key_families(&now).len(), families, "{now}");
            assert_eq!(
                per_key_families(&now),
                per_key_families(&before),
                "{now}\n---\n{before}"
            );
        }
    }

    /// One key's series, written out exactly; gone once the key is removed.
    #[test]
    fn one_keys_series_then_none_once_removed() {
        let m = Metrics::new(&RequestStats::default());
        m.set_key("ns", "pk", &gauges());
        let text = m.encode();
        let expected = [
            "# HELP keyward_key_expiration_timestamp_seconds Expiry (Unix seconds) of the token in the key's agent Secret; absent while the Secret holds no token.",
            "# TYPE keyward_key_expiration_timestamp_seconds gauge",
            r#"keyward_key_expiration_timestamp_seconds{namespace="ns",name="pk"} 1700000000"#,
            "# HELP keyward_key_next_rotation_timestamp_seconds When the key's next scheduled rotation is due (Unix seconds); absent when none is scheduled (suspended, or a rotation in flight).",
            "# TYPE keyward_key_next_rotation_timestamp_seconds gauge",
            r#"keyward_key_next_rotation_timestamp_seconds{namespace="ns",name="pk"} 1700003600"#,
            "# HELP keyward_key_ready_status The key's Ready condition: one series per condition (True, False, Unknown), the one that holds is 1.",
            "# TYPE keyward_key_ready_status gauge",
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="True"} 1"#,
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="False"} 0"#,
            r#"keyward_key_ready_status{namespace="ns",name="pk",condition="Unknown"} 0"#,
            "# HELP keyward_rotation_stalled 1 while the key's Stalled condition is True (a rotation waits on agents past its deadline, or the spec cannot be served), else 0.",
            "# TYPE keyward_rotation_stalled gauge",
            r#"keyward_rotation_stalled{namespace="ns",name="pk"} 0"#,
            "# HELP keyward_rotation_verifier_silent 1 while the key's old key is held because the keyward verifier replicas cannot vouch that it is unused (Stalled, reason VerifierSilent), else 0.",
            "# TYPE keyward_rotation_verifier_silent gauge",
            r#"keyward_rotation_verifier_silent{namespace="ns",name="pk"} 0"#,
            "# HELP keyward_agents_confirmed PolicyAgents referencing the key that are confirmed on its current key.",
            "# TYPE keyward_agents_confirmed gauge",
            r#"keyward_agents_confirmed{namespace="ns",name="pk"} 1"#,
            "# HELP keyward_agents_total PolicyAgents referencing the key.",
            "# TYPE keyward_agents_total gauge",
            r#"keyward_agents_total{namespace="ns",name="pk"} 2"#,
        ]
        .join("\n");
        assert!(text.contains(&expected), "{text}");
        m.remove_key("ns", "pk");
        assert_eq!(m.key_count(), 0);
        let text = m.encode();
        assert!(!text.contains("keyward_key_"), "{text}");
        assert!(!text.contains("keyward_agents_"), "{text}");
    }
}
