//! The `ProvisioningKey` custom resource.
//!
//! Defaults are applied by the operator, not by the schema, so a GitOps controller that syncs
//! a manifest sees no permanent diff from server-side defaulting.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::limits;

/// The key algorithm.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Algorithm {
    /// Ed25519; tokens are signed `EdDSA`. The default.
    #[default]
    Ed25519,
    /// ECDSA on the P-256 curve; tokens are signed `ES256`. For clients that cannot sign
    /// EdDSA: OPA's OAuth2 client assertions (`tokenMode: ProofOfPossession`) accept only the
    /// RSA, ECDSA and HMAC algorithms.
    #[allow(clippy::upper_case_acronyms)]
    ECDSAP256,
}

/// How agents prove themselves with the key.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum TokenMode {
    /// Agents send the signed token from the agent Secret (a bearer credential: whoever copies
    /// it may use it until it expires). The default.
    #[default]
    Bearer,
    /// Agents hold the private key (`includePrivateKey: true`) and sign a short-lived client
    /// assertion (RFC 7523) for each access token they fetch from the verifier's token
    /// endpoint; the verifier refuses a bearer token signed by the key itself.
    ProofOfPossession,
}

/// A provisioning key that policy agents use to prove who they are to a control plane.
///
/// Keyward mints an Ed25519 key into an operator-owned Secret, publishes its public key in a
/// trust bundle ConfigMap (JWKS), hands a signed token (and optionally the private key) to
/// agents through the agent Secret, rotates on a schedule or on request, and revokes the old key
/// only after the overlap (or, with PolicyAgents, after every agent is confirmed on the new key).
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "keyward.dev",
    version = "v1alpha1",
    kind = "ProvisioningKey",
    namespaced,
    shortname = "pk",
    category = "keyward",
    status = "ProvisioningKeyStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Key ID","type":"string","jsonPath":".status.currentKey.kid"}"#,
    printcolumn = r#"{"name":"Last Used","type":"date","jsonPath":".status.trustedKeys[?(@.state==\"Active\")].lastUsedAt"}"#,
    printcolumn = r#"{"name":"Old Key Last Used","type":"date","jsonPath":".status.trustedKeys[?(@.state==\"Retiring\")].lastUsedAt"}"#,
    printcolumn = r#"{"name":"Next Rotation","type":"string","jsonPath":".status.nextRotationAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = limits::secret_name_immutable(),
    validation = limits::config_map_name_immutable(),
    validation = limits::name_length(),
    validation = limits::secret_name_unlike_a_key_secret(),
    validation = limits::proof_of_possession_needs_the_private_key()
)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningKeySpec {
    /// Key algorithm: `Ed25519` (default) or `ECDSAP256`. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("algorithm is immutable"))]
    #[schemars(transform = no_schema_default)]
    pub algorithm: Algorithm,

    /// Name of the agent Secret that workloads mount (default: the ProvisioningKey's name).
    /// Cannot change on a live key: the API server (a CEL rule at the root, comparing the
    /// effective names, so setting the default explicitly passes) and the operator refuse a
    /// change, including a name set on a live key that had none. Must not end in `-k<digits>`
    /// (key Secrets are named `<ProvisioningKey name>-k<sequence>`); a ProvisioningKey whose
    /// own name ends so needs a `secretName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: Option<String>,

    /// Labels and annotations for the agent Secret. Argo CD and Flux tracking metadata is never
    /// copied, so the generated Secret is not mistaken for a synced one. Keys must be valid
    /// Kubernetes label and annotation keys, label values valid label values, the annotations
    /// at most 255 KiB in all; keys under `keyward.dev/` and `app.kubernetes.io/managed-by` are
    /// Keyward's own and refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,

    /// Also put the PKCS#8 private key into the agent Secret (for agents that sign their own
    /// assertions). Default `false`: agents get a signed token and never hold the private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_private_key: Option<bool>,

    /// When and how keys rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,

    /// The bearer token handed to agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenSpec>,

    /// Where the public keys the control plane must trust are published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<TrustBundleSpec>,

    /// No rotation starts while true (a rotation already in flight completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,

    /// Break-glass: key ids (RFC 7638 thumbprints) that are compromised. Keyward mints and
    /// publishes a successor, revokes the listed keys at once without waiting for confirmation,
    /// hands out the successor and rolls the agents. The trust bundle never becomes empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub compromised_keys: Vec<CompromisedKeyId>,
}

/// Drops the `default` schemars derives from `#[serde(default)]`: a schema default is written
/// into the stored object, so a manifest that leaves the field out would differ from the live
/// object (drift for Argo CD and Flux). The operator applies the default in code instead.
fn no_schema_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// An RFC 7638 thumbprint (43 base64url characters).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct CompromisedKeyId(
    #[schemars(length(min = 43, max = 43), regex(pattern = r"^[A-Za-z0-9_-]{43}$"))] pub String,
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate this long after the current key was activated (Go duration, e.g. `720h`), or up
    /// to a tenth of it (at most 10 minutes) earlier, by an offset fixed per key so keys created
    /// together do not all rotate at once; never later, unless `window` is set: then the
    /// rotation waits for the window's next opening. Unset: rotate only on request. Must be
    /// at least the operator's `--min-rotation-interval` and at most `8784h` (366 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::INTERVAL.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub interval: Option<String>,

    /// Debounce: no new key is minted sooner than this after the previous one (default `1m`,
    /// at most `720h`). Requests inside the window are delayed, never dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::MIN_INTERVAL.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub min_interval: Option<String>,

    /// How long a new key is trusted before agents get it (default `2m`, at most `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::PUBLISH_DELAY.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub publish_delay: Option<String>,

    /// How long the old key stays trusted after a rotation when no PolicyAgent references this
    /// key (default `10m`, at most `720h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::OVERLAP.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub overlap: Option<String>,

    /// How long, from the roll, agents may take to confirm the new key before the rotation is
    /// reported `Stalled` (default `15m`, at most `720h`). The old key stays trusted either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::CONFIRMATION_TIMEOUT.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub confirmation_timeout: Option<String>,

    /// Revoke the old key only when, on top of the confirmations, nothing has used it for this
    /// long (e.g. `5m`), as reported by every `keyward verifier` replica for the whole window.
    /// A silent or restarted verifier never counts as "unused": the old key is held and the
    /// rotation shows `Stalled` with reason `VerifierSilent`. Keys in `compromisedKeys` are
    /// revoked at once regardless. Unset: no use check. At most `720h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::REVOKE_WHEN_UNUSED_FOR.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub revoke_when_unused_for: Option<String>,

    /// How long a revoked key is kept **deactivated** before it is destroyed (default `24h`, at
    /// most `720h`; `0s` destroys it at once). A deactivated key is out of the trust bundle and
    /// the trust record, so every verifier refuses it, but its key Secret keeps the private key:
    /// `keyward reactivate` (or the `keyward.dev/reactivate` annotation) can put it back into
    /// the trusted set until it is destroyed. Keys in `compromisedKeys` are destroyed at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::RETAIN_DEACTIVATED_FOR.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub retain_deactivated_for: Option<String>,

    /// When scheduled rotations (`interval`) may start: a daily span of local time on some days,
    /// in an IANA time zone. A rotation that falls due outside the window waits for its next
    /// opening, so a window can delay a rotation past `interval`. Requests (`requestToken`, the
    /// rotate annotation) and `compromisedKeys` ignore it. A rotation that started inside the
    /// window completes whenever its evidence allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<RotationWindow>,

    /// At most this many workloads of this key's PolicyAgents roll at once (the others are
    /// queued, `RolloutQueued`), beside the operator-wide `--max-concurrent-rolls`. The
    /// rotation's confirmation waits for all of them. Unset: only the operator-wide cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent_rolls: Option<i32>,

    /// Any new value requests one rotation (Git-friendly manual trigger). The value present
    /// when the first key is minted is consumed by that mint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub request_token: Option<String>,
}

/// A rotation window: `start` to `end` local time (`HH:MM`) on `days`, in `timeZone`. When `end`
/// is at or before `start` the window runs past midnight (`22:00` to `06:00`). Daylight saving:
/// a skipped local time means the first instant after the gap, a repeated one its first
/// occurrence.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.start != self.end").message(limits::WINDOW_EMPTY))]
pub struct RotationWindow {
    /// Days the window opens on (by the local date of `start`); empty: every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    pub days: Vec<Weekday>,
    /// Opening time, `HH:MM` (24-hour), local to `timeZone`.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// Closing time, `HH:MM`, exclusive.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
    /// IANA time zone (`Europe/Berlin`, `America/New_York`); default `UTC`. The operator
    /// carries the time-zone database in its binary; an unknown name is `InvalidSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
}

/// A day of the week.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    /// `aud` claim of the token (default: `keyward`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,

    /// Token lifetime (default `1h`, at most `24h`); tokens are re-issued at 40-50 % of it (an
    /// offset fixed per key spreads the refreshes of keys created together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = limits::TOKEN_TTL.rule())]
    #[schemars(
        length(max = 32),
        regex(pattern = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
    )]
    pub ttl: Option<String>,

    /// `iss` claim (default: `keyward`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub issuer: Option<String>,

    /// Static claims added to every token of this key (at most 16; values at most 512
    /// characters), e.g. `scope: "bundles:read"` (space-separated values, as OAuth's `scope`).
    /// A verifier route can require one (`--require-claim scope=bundles:read`). Registered JWT
    /// claims and names with a meaning to OAuth and OpenID Connect are refused. A change is a
    /// token refresh, never a rotation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = limits::claims_rule())]
    #[schemars(extend("maxProperties" = 16), extend("additionalProperties" = {"type": "string", "maxLength": 512}))]
    pub claims: BTreeMap<String, String>,

    /// `Bearer` (default): agents send the token. `ProofOfPossession`: agents sign a client
    /// assertion with the private key (needs `includePrivateKey: true`) at the verifier's
    /// token endpoint, and the verifier refuses bearer tokens signed by the key itself. A
    /// change is neither a rotation nor a roll: it takes effect in every verifier as the trust
    /// record is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<TokenMode>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustBundleSpec {
    /// ConfigMap that receives the JWKS (default `<name>-trust`). It belongs to this
    /// ProvisioningKey alone; naming another object's ConfigMap is an error. Cannot change on a
    /// live key (a CEL rule at the root compares the effective names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub config_map_name: Option<String>,

    /// Copy the bundle (its trusted key ids only) into every namespace whose labels match and
    /// that accepts copies from this key's namespace (label
    /// `accept-bundles.keyward.dev/<this namespace>: "true"` on the namespace), as a ConfigMap of
    /// the same name labelled `keyward.dev/copy-of-uid`; kept in sync (within a minute of a
    /// namespace's labels changing), and removed from a namespace that no longer matches and
    /// when this key is deleted. A ConfigMap of that name that is not such a copy is never
    /// overwritten. Unset: no copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// Observed state, derived from evidence (the key Secrets) on every reconcile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProvisioningKeyStatus {
    /// `Pending`, `Ready`, `Publishing`, `Confirming`, `Overlap`, `Stalled`, `Suspended` or `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,

    /// The key handed out to agents now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_key: Option<KeyInfo>,

    /// Every key the control plane must accept now, with its state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_keys: Vec<TrustedKey>,

    /// Recently revoked key ids (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_keys: Vec<RevokedKey>,

    /// When the next scheduled rotation is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<String>,

    /// When the agent token is re-issued next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_refresh_at: Option<String>,

    /// Pods that use the agent Secret but belong to no PolicyAgent's workload, as seen during the
    /// last rotation (pods are looked at while a key is retiring): they have no evidence, so the
    /// old key waits the time fallback for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncovered_consumers: Option<UncoveredConsumers>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Bounded history of keys and their lifecycle timestamps, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,

    /// The trust record (compact JSON): the key ids this operator minted and has not revoked,
    /// and the names and claims it signs with. The verifier trusts no other key id. Only the
    /// operator may write it: the chart's ValidatingAdmissionPolicy refuses any other change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_record: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UncoveredConsumers {
    /// How many pods.
    pub count: i32,
    /// The first few of their workloads (`Kind/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub kid: String,
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustedKey {
    pub kid: String,
    /// `Published`, `Active`, `Retiring`, or `Unrecorded` (trusted by the bundle, but its key
    /// Secret is gone or unreadable: it stays trusted until listed in `compromisedKeys`).
    pub state: String,
    /// The last request a `keyward verifier` accepted with this key id (from any replica,
    /// accurate to the replicas' report resolution). Absent: no verifier reported a use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevokedKey {
    pub kid: String,
    /// `Deactivated` (every verifier refuses it; `keyward reactivate` can bring it back until
    /// `destroyAt`) or `Destroyed` (private key deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// When it left the trusted set (its deactivation, or its destruction when it was never
    /// deactivated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// A deactivated key: when it will be destroyed (`retainDeactivatedFor` after its
    /// deactivation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroy_at: Option<String>,
    /// A destroyed key: when its private key was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub kid: String,
    /// What caused the mint: `Initial`, `Interval`, `RequestToken`, `Annotation`, `Compromised`,
    /// `Replacement` (the current key could no longer be served).
    pub trigger: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minted_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<String>,
    /// When it was deactivated (the last time, if it was reactivated since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reactivated_at: Option<String>,
    /// When it was destroyed (private key deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

/// Conditions as a list-map keyed by `type`, so server-side apply merges them per type.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}

impl ProvisioningKey {
    /// Name of the agent Secret.
    pub fn secret_name(&self) -> String {
        self.spec
            .secret_name
            .clone()
            .unwrap_or_else(|| self.metadata.name.clone().unwrap_or_default())
    }

    /// Name of the trust bundle ConfigMap.
    pub fn trust_bundle_name(&self) -> String {
        self.spec
            .trust_bundle
            .as_ref()
            .and_then(|t| t.config_map_name.clone())
            .unwrap_or_else(|| format!("{}-trust", self.metadata.name.clone().unwrap_or_default()))
    }
}
