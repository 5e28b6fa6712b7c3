//! The verifier's own metrics, served on `/metrics`: decisions by result and reason, and the
//! connection limits at work. Every label value is a `&'static str` from a fixed list; no key,
//! key id, token or client input becomes a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    result: &'static str,
    reason: &'static str,
}

/// Counters and gauges of one verifier process.
pub struct Stats {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    open_connections: Gauge,
    connections_refused: Counter,
    upstream_timeouts: Counter,
    tls_handshake_failures: Family<HandshakeLabels, Counter>,
    view_unconfirmed: Gauge,
    pod_token_reviews: Family<ReviewLabels, Counter>,
    pods_dropped: Family<DroppedLabels, Counter>,
    remote_age: Family<RemoteLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RemoteLabels {
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReviewLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    stage: &'static str,
}

/// `stage` of `keyward_verifier_pods_dropped`: the use log was full between two report flushes,
/// so the use was kept without its pod.
pub const DROPPED_USE_LOG: &str = "use_log";
/// `stage` of `keyward_verifier_pods_dropped`: a key id held the most pods the reporter keeps
/// in memory, so the oldest were evicted and its report says `podsTruncated`.
pub const DROPPED_REPORT_BOUND: &str = "report_bound";

impl Default for Stats {
    fn default() -> Self {
        let mut registry = Registry::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "keyward_verifier_decisions",
            "Token decisions of this verifier, by result (allowed, refused) and reason (the X-Keyward-Reason of a refusal; empty when allowed)",
            decisions.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "keyward_verifier_open_connections",
            "Client connections this verifier holds open",
            open_connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "keyward_verifier_connections_refused",
            "Connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let upstream_timeouts = Counter::default();
        registry.register(
            "keyward_verifier_upstream_timeouts",
            "Proxied requests answered 504 because the upstream did not answer within --upstream-timeout",
            upstream_timeouts.clone(),
        );
        let tls_handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "keyward_verifier_tls_handshake_failures",
            "TLS handshakes that failed, by reason (timeout: not done within --header-read-timeout; error: refused by the client or the server)",
            tls_handshake_failures.clone(),
        );
        let view_unconfirmed = Gauge::default();
        registry.register(
            "keyward_verifier_view_unconfirmed_seconds",
            "How long a watch of ProvisioningKeys or trust bundles has been failing (0 while every watch is confirmed); over --max-staleness the verifier is not ready",
            view_unconfirmed.clone(),
        );
        let pod_token_reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "keyward_verifier_pod_token_reviews",
            "Pod tokens (X-Keyward-Pod-Token) by outcome: pod (the API server named a pod), unauthenticated, not_pod_bound, error (the review failed, e.g. no RBAC), busy (not reviewed: too many in flight or the cache full), other_namespace (a pod used a key of another namespace; not attributed)",
            pod_token_reviews.clone(),
        );
        let pods_dropped = Family::<DroppedLabels, Counter>::default();
        registry.register(
            "keyward_verifier_pods_dropped",
            "Pod attributions of accepted requests this verifier could not report, by stage (use_log: the use log was full between flushes, the use was reported without its pod; report_bound: a key id held 65,536 pods, the oldest were evicted and the report says podsTruncated)",
            pods_dropped.clone(),
        );
        let remote_age = Family::<RemoteLabels, Gauge>::default();
        registry.register(
            "keyward_verifier_remote_bundle_age_seconds",
            "Age of each remote bundle's last good fetch (--remote-bundle), by name; -1 when it was never fetched. Over its max-staleness its routes refuse every token",
            remote_age.clone(),
        );
        Stats {
            registry,
            remote_age,
            pod_token_reviews,
            pods_dropped,
            view_unconfirmed,
            tls_handshake_failures,
            decisions,
            open_connections,
            connections_refused,
            upstream_timeouts,
        }
    }
}

impl Stats {
    /// Sets `keyward_verifier_remote_bundle_age_seconds{name}` (`None`: never fetched, -1).
    pub fn remote_age(&self, name: &str, age: Option<std::time::Duration>) {
        self.remote_age
            .get_or_create(&RemoteLabels {
                name: name.to_string(),
            })
            .set(age.map_or(-1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    }

    /// Sets `keyward_verifier_view_unconfirmed_seconds`.
    pub fn view_unconfirmed(&self, d: std::time::Duration) {
        self.view_unconfirmed
            .set(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    }

    pub fn allowed(&self) {
        self.decisions
            .get_or_create(&DecisionLabels {
                result: "allowed",
                reason: "",
            })
            .inc();
    }

    pub fn refused(&self, reason: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                result: "refused",
                reason,
            })
            .inc();
    }

    /// How many decisions of `result` and `reason` were counted (tests and the hostile corpus).
    pub fn decisions(&self, result: &'static str, reason: &'static str) -> u64 {
        self.decisions
            .get_or_create(&DecisionLabels { result, reason })
            .get()
    }

    pub fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.get()
    }

    /// A TLS handshake failed; `reason` is `timeout` or `error`.
    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .inc();
    }

    /// How many TLS handshakes failed for `reason`.
    pub fn tls_handshake_failures(&self, reason: &'static str) -> u64 {
        self.tls_handshake_failures
            .get_or_create(&HandshakeLabels { reason })
            .get()
    }

    /// A pod token's outcome (`result` from a fixed list, see the metric's help).
    pub fn pod_token_review(&self, result: &'static str) {
        self.pod_token_reviews
            .get_or_create(&ReviewLabels { result })
            .inc();
    }

    /// How many pod tokens had outcome `result`.
    pub fn pod_token_reviews(&self, result: &'static str) -> u64 {
        self.pod_token_reviews
            .get_or_create(&ReviewLabels { result })
            .get()
    }

    /// Raises `keyward_verifier_pods_dropped{stage}` to `total` (a running total kept by the
    /// use log or the reporter; never lowered).
    pub fn pods_dropped(&self, stage: &'static str, total: u64) {
        let c = self.pods_dropped.get_or_create(&DroppedLabels { stage });
        let now = c.get();
        if total > now {
            c.inc_by(total - now);
        }
    }

    /// `keyward_verifier_pods_dropped{stage}`.
    pub fn pods_dropped_total(&self, stage: &'static str) -> u64 {
        self.pods_dropped
            .get_or_create(&DroppedLabels { stage })
            .get()
    }

    pub fn upstream_timeout(&self) {
        self.upstream_timeouts.inc();
    }

    /// Prometheus text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
