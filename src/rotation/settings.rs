//! The spec resolved into the values the planner uses: defaults applied, durations parsed and
//! checked against the operator's floors and the ceilings of `api::limits`, names and
//! `secretTemplate` checked as the API server would check the objects made from them. Every
//! schema rule (CEL included, from the same constants) is enforced here as well, so that an
//! object that reached the API server without them (older Kubernetes, no CEL, stored before a
//! rule existed) is reported with `Ready=False` and never acted on.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::api::conditions::reasons;
use crate::api::limits::{self, Ceiling};
use crate::api::provisioning_key::{ProvisioningKey, SecretTemplate};
use crate::labels as l;

/// Lower bounds on durations: operator flags with safe defaults, so tests and demos can lower them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Floors {
    /// Smallest `rotation.interval` accepted (default 1h).
    pub interval: Duration,
    /// Smallest `rotation.minInterval` accepted (default 1m).
    pub min_interval: Duration,
    /// Smallest `rotation.publishDelay` accepted (default 0s).
    pub publish_delay: Duration,
    /// Smallest `rotation.overlap` accepted (default 1m).
    pub overlap: Duration,
    /// Smallest `token.ttl` accepted (default 5m).
    pub token_ttl: Duration,
    /// The clock skew allowed between the operator and whoever verifies tokens (default 1m): a
    /// sealed key that consumers no PolicyAgent covers may hold is revoked only this long after
    /// its last token expired.
    pub clock_skew: Duration,
}

impl Default for Floors {
    fn default() -> Self {
        Floors {
            interval: Duration::from_secs(3600),
            min_interval: Duration::from_secs(60),
            publish_delay: Duration::ZERO,
            overlap: Duration::from_secs(60),
            token_ttl: Duration::from_secs(300),
            clock_skew: Duration::from_secs(60),
        }
    }
}

impl Floors {
    /// No floors at all (unit tests).
    pub fn none() -> Self {
        Floors {
            interval: Duration::ZERO,
            min_interval: Duration::ZERO,
            publish_delay: Duration::ZERO,
            overlap: Duration::ZERO,
            token_ttl: Duration::from_secs(1),
            clock_skew: Duration::ZERO,
        }
    }
}

pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_PUBLISH_DELAY: Duration = Duration::from_secs(120);
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(600);
pub const DEFAULT_CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(900);
/// `rotation.retainDeactivatedFor` when unset: a deactivated key can be reactivated for a day.
pub const DEFAULT_RETAIN_DEACTIVATED_FOR: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The audience of a key created before audiences became per key (and still issued by such a
/// key while its spec leaves `token.audience` unset), and the verifier's fallback.
pub const DEFAULT_AUDIENCE: &str = "keyward";

/// The audience a new key issues when its spec leaves `token.audience` unset: unique per key,
/// so a token of one key never carries another's audience.
pub fn default_audience(pk: &ProvisioningKey) -> String {
    format!(
        "keyward:{}/{}",
        pk.metadata.namespace.as_deref().unwrap_or_default(),
        pk.metadata.name.as_deref().unwrap_or_default()
    )
}
pub const DEFAULT_ISSUER: &str = "keyward";

/// A spec the operator refuses to act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {value:?} is not a duration (use Go syntax such as 720h, 90m or 30s)")]
    MalformedDuration { field: &'static str, value: String },
    #[error("{field}: {value} is below the operator's floor of {floor}")]
    BelowFloor {
        field: &'static str,
        value: String,
        floor: String,
    },
    #[error("{field}: {value} is above the ceiling of {ceiling}")]
    AboveCeiling {
        field: &'static str,
        value: String,
        ceiling: String,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(
        "{field} cannot change on a live key (it is {recorded:?}, the spec asks for {requested:?}); Keyward keeps serving {recorded:?}: change it back, or create a new ProvisioningKey"
    )]
    NameChanged {
        field: &'static str,
        recorded: String,
        requested: String,
    },
}

impl SpecError {
    /// PascalCase reason for `Ready=False` and Warning Events.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::MalformedDuration { .. } => "MalformedDuration",
            SpecError::BelowFloor { .. } => "BelowFloor",
            SpecError::AboveCeiling { .. } | SpecError::Invalid { .. } => reasons::INVALID_SPEC,
            SpecError::NameChanged { .. } => "NameImmutable",
        }
    }
}

/// The resolved spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub secret_name: String,
    pub trust_bundle_name: String,
    pub include_private_key: bool,
    /// `spec.token.mode: ProofOfPossession` (recorded in the trust record for the verifier).
    pub proof_of_possession: bool,
    pub interval: Option<Duration>,
    pub min_interval: Duration,
    pub publish_delay: Duration,
    pub overlap: Duration,
    pub confirmation_timeout: Duration,
    /// `rotation.revokeWhenUnusedFor`: the old key is revoked only after a window this long in
    /// which every verifier replica vouches that nothing used it.
    pub revoke_when_unused_for: Option<Duration>,
    /// `rotation.retainDeactivatedFor`: how long a revoked key stays deactivated (out of the
    /// trusted set, private key kept, reactivatable) before it is destroyed. Zero destroys it
    /// at once.
    pub retain_deactivated_for: Duration,
    /// `token.claims`: static claims on every token (validated: no reserved name).
    pub claims: BTreeMap<String, String>,
    /// `rotation.window`: when a scheduled rotation may start.
    pub window: Option<super::window::Window>,
    pub request_token: Option<String>,
    pub token_ttl: Duration,
    pub audience: String,
    pub issuer: String,
    pub suspend: bool,
    pub compromised: BTreeSet<String>,
    /// See [`Floors::clock_skew`].
    pub clock_skew: Duration,
    /// The ProvisioningKey's uid: the seed of its offsets in [`super::schedule`] (stable for the
    /// object's life, so the decision stays a pure function of spec, evidence and now). Empty
    /// for an object that never reached the API server: no offsets.
    pub uid: String,
    /// Set when the spec is refused: no new rotation starts, while the current key keeps being
    /// served (tokens refreshed, Secret and bundle repaired) with the last good settings.
    pub refused: Option<Refusal>,
}

/// Why new rotations are refused (`Ready=False` with this reason and message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

impl From<&SpecError> for Refusal {
    fn from(e: &SpecError) -> Self {
        Refusal {
            reason: e.reason(),
            message: format!("{e}; no new rotation starts, the current key is still served"),
        }
    }
}

/// The names of the agent Secret and the trust bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub secret_name: String,
    pub trust_bundle_name: String,
}

/// The last good settings, read from evidence, never from status: the durations recorded on
/// the newest key Secret when it was minted, and the claims and lifetime of the token the agent
/// Secret holds now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LastGood {
    /// Names recorded on the newest key Secret (a live key never changes them).
    pub names: Option<Names>,
    pub min_interval: Option<Duration>,
    pub publish_delay: Option<Duration>,
    pub overlap: Option<Duration>,
    pub confirmation_timeout: Option<Duration>,
    pub token_ttl: Option<Duration>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
    /// `aud` of the trust record (what the verifier checks now).
    pub recorded_audience: Option<String>,
    /// The static claims of the trust record (kept while the spec is refused).
    pub recorded_claims: Option<BTreeMap<String, String>>,
    /// Whether the trust record holds the key in proof-of-possession mode.
    pub recorded_pop: Option<bool>,
}

impl LastGood {
    /// The audience a key whose spec leaves `token.audience` unset keeps: the one it already
    /// issues (recorded, else in the agent Secret's token). `None` for a new key.
    fn kept_audience(&self) -> Option<String> {
        self.recorded_audience
            .clone()
            .or_else(|| self.audience.clone())
    }
}

/// `token.claims`, checked as the CRD's rule does (the same constants), plus the size limits.
fn claims(c: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>, SpecError> {
    let invalid = |message: String| SpecError::Invalid {
        field: "token.claims",
        message,
    };
    if c.len() > limits::MAX_CLAIMS {
        return Err(invalid(format!(
            "{} claims; at most {}",
            c.len(),
            limits::MAX_CLAIMS
        )));
    }
    for (k, v) in c {
        if limits::RESERVED_CLAIMS.contains(&k.as_str()) || !claim_name(k) {
            return Err(invalid(limits::CLAIMS_RESERVED.to_string()));
        }
        if v.chars().count() > limits::MAX_CLAIM_VALUE {
            return Err(invalid(format!(
                "the value of {k:?} is longer than {} characters",
                limits::MAX_CLAIM_VALUE
            )));
        }
    }
    Ok(c.clone())
}

/// [`limits::CLAIM_NAME_PATTERN`] without a regex engine.
pub fn claim_name(k: &str) -> bool {
    let mut chars = k.chars();
    k.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
}

/// The valid entries of `compromisedKeys` (break-glass never waits for a typo elsewhere, nor
/// for an invalid entry beside it).
pub fn valid_compromised(pk: &ProvisioningKey) -> BTreeSet<String> {
    pk.spec
        .compromised_keys
        .iter()
        .map(|k| k.0.clone())
        .filter(|k| is_key_id(k))
        .collect()
}

fn is_key_id(k: &str) -> bool {
    k.len() == 43
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The names a key uses: those recorded on its key Secrets once it has one (they never change on
/// a live key), else the spec's.
pub fn names(pk: &ProvisioningKey, recorded: Option<&Names>) -> Names {
    recorded.cloned().unwrap_or_else(|| Names {
        secret_name: pk.secret_name(),
        trust_bundle_name: pk.trust_bundle_name(),
    })
}

/// The settings a reconcile acts on. A valid spec resolves as [`Settings::resolve`]; a refused one
/// (malformed, below a floor, a name changed on a live key) keeps serving the last good settings
/// and starts no rotation, with [`Settings::refused`] saying why.
pub fn resolve_or_keep(pk: &ProvisioningKey, floors: &Floors, last: &LastGood) -> Settings {
    let names = names(pk, last.names.as_ref());
    let name_change = last.names.as_ref().and_then(|rec| {
        let spec_secret = pk.secret_name();
        let spec_bundle = pk.trust_bundle_name();
        if rec.secret_name != spec_secret {
            Some(SpecError::NameChanged {
                field: "secretName",
                recorded: rec.secret_name.clone(),
                requested: spec_secret,
            })
        } else if rec.trust_bundle_name != spec_bundle {
            Some(SpecError::NameChanged {
                field: "trustBundle.configMapName",
                recorded: rec.trust_bundle_name.clone(),
                requested: spec_bundle,
            })
        } else {
            None
        }
    });
    // An unset audience: a new key gets its own (`keyward:<ns>/<name>`); a key that already
    // issues one keeps it (keys from before audiences were per key keep `keyward`, so an
    // upgrade refuses no token).
    let unset_audience = pk.spec.token.as_ref().is_none_or(|t| t.audience.is_none());
    let kept = last.kept_audience().filter(|_| unset_audience);
    match (Settings::resolve(pk, floors), name_change) {
        (Ok(mut s), None) => {
            if let Some(a) = kept {
                s.audience = a;
            }
            s
        }
        (Ok(mut s), Some(e)) => {
            if let Some(a) = kept {
                s.audience = a;
            }
            s.secret_name = names.secret_name;
            s.trust_bundle_name = names.trust_bundle_name;
            s.refused = Some(Refusal::from(&e));
            s
        }
        (Err(e), _) => {
            let or = |v: Option<Duration>, d: Duration, floor: Duration| v.unwrap_or(d.max(floor));
            Settings {
                secret_name: names.secret_name,
                trust_bundle_name: names.trust_bundle_name,
                include_private_key: pk.spec.include_private_key.unwrap_or(false),
                // A refused spec never loosens the mode: proof of possession, once recorded or
                // asked for, stays.
                proof_of_possession: pk_asks_pop(pk) || last.recorded_pop.unwrap_or(false),
                interval: None,
                min_interval: or(last.min_interval, DEFAULT_MIN_INTERVAL, floors.min_interval),
                publish_delay: or(
                    last.publish_delay,
                    DEFAULT_PUBLISH_DELAY,
                    floors.publish_delay,
                ),
                overlap: or(last.overlap, DEFAULT_OVERLAP, floors.overlap),
                confirmation_timeout: or(
                    last.confirmation_timeout,
                    DEFAULT_CONFIRMATION_TIMEOUT,
                    Duration::ZERO,
                ),
                // A refused spec never loosens the use check: a malformed value holds the old
                // key (as the longest window would) until the spec is fixed.
                revoke_when_unused_for: pk
                    .spec
                    .rotation
                    .as_ref()
                    .and_then(|r| r.revoke_when_unused_for.as_ref())
                    .map(|v| parse_duration(v).unwrap_or(Duration::MAX)),
                // Nor does it hasten destruction: a deactivated key is kept as long as allowed.
                retain_deactivated_for: limits::RETAIN_DEACTIVATED_FOR.duration(),
                // The claims the agents' tokens carry now: a refused spec changes no scope.
                claims: last.recorded_claims.clone().unwrap_or_default(),
                // No scheduled rotation while refused (`interval` is unset): no window either.
                window: None,
                request_token: pk
                    .spec
                    .rotation
                    .as_ref()
                    .and_then(|r| r.request_token.clone()),
                token_ttl: or(last.token_ttl, DEFAULT_TOKEN_TTL, floors.token_ttl),
                audience: last
                    .audience
                    .clone()
                    .or_else(|| last.recorded_audience.clone())
                    .unwrap_or_else(|| default_audience(pk)),
                issuer: last
                    .issuer
                    .clone()
                    .unwrap_or_else(|| DEFAULT_ISSUER.to_string()),
                suspend: pk.spec.suspend.unwrap_or(false),
                compromised: valid_compromised(pk),
                clock_skew: floors.clock_skew,
                uid: uid(pk),
                refused: Some(Refusal::from(&e)),
            }
        }
    }
}

fn uid(pk: &ProvisioningKey) -> String {
    pk.metadata.uid.clone().unwrap_or_default()
}

/// A duration field: `default` (raised to the floor) when unset, else the value, which must be
/// well formed, at least `floor` and at most the field's [`Ceiling`] (the same constant the
/// CRD's CEL rule is generated from).
fn duration(
    ceiling: Ceiling,
    value: Option<&String>,
    default: Duration,
    floor: Duration,
) -> Result<Duration, SpecError> {
    let field = ceiling.field;
    let Some(value) = value else {
        return Ok(default.max(floor));
    };
    let parsed = parse_duration(value).ok_or_else(|| SpecError::MalformedDuration {
        field,
        value: value.clone(),
    })?;
    if parsed < floor {
        return Err(SpecError::BelowFloor {
            field,
            value: value.clone(),
            floor: humantime::format_duration(floor).to_string(),
        });
    }
    if parsed > ceiling.duration() {
        return Err(SpecError::AboveCeiling {
            field,
            value: value.clone(),
            ceiling: ceiling.go(),
        });
    }
    Ok(parsed)
}

/// Parses a Go-style duration (see [`crate::time::parse_duration`]).
pub use crate::time::parse_duration;

fn dns_name(field: &'static str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && value
            .as_bytes()
            .first()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && value
            .as_bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid {
            field,
            message: format!("{value:?} is not a valid object name"),
        })
    }
}

/// The ProvisioningKey's name is a label value on everything it owns: at most 63 characters
/// (the CRD refuses a longer name on creation, [`limits::name_length`]).
fn object_name(pk: &ProvisioningKey) -> Result<(), SpecError> {
    let name = pk.metadata.name.as_deref().unwrap_or_default();
    if name.len() > limits::MAX_NAME_LENGTH {
        return Err(SpecError::Invalid {
            field: "metadata.name",
            message: format!(
                "{} characters; at most {} (the name is a label value on the objects Keyward creates): create the key under a shorter name",
                name.len(),
                limits::MAX_NAME_LENGTH
            ),
        });
    }
    Ok(())
}

/// An agent Secret named `<something>-k<digits>` could take a key Secret's name (the agent
/// Secret of key `a-k2` blocks key `a`'s second mint); the CRD refuses it on creation
/// ([`limits::secret_name_unlike_a_key_secret`]).
fn secret_name_unlike_a_key_secret(
    pk: &ProvisioningKey,
    secret_name: &str,
) -> Result<(), SpecError> {
    if !limits::is_key_secret_like(secret_name) {
        return Ok(());
    }
    let how = if pk.spec.secret_name.is_some() {
        "choose another spec.secretName (a live key cannot change it: create a new ProvisioningKey)"
    } else {
        "the ProvisioningKey's name is the default; set spec.secretName to another name (on a live key, which cannot change its name, create a new ProvisioningKey)"
    };
    Err(SpecError::Invalid {
        field: "secretName",
        message: format!(
            "the agent Secret's name {secret_name:?} ends in -k<digits>, the form of key Secret names (<ProvisioningKey name>-k<sequence>), and could take another key's Secret name: {how}"
        ),
    })
}

/// Kubernetes' limit on all the annotations of one object is 256 KiB; the template may use all
/// of it but 1 KiB, which is left for Keyward's own annotations on the agent Secret.
pub const MAX_TEMPLATE_ANNOTATIONS_BYTES: usize = 255 * 1024;

/// Why a `secretTemplate` key (with its value, for a label) would be refused by the API server
/// or would overwrite Keyward's own metadata; `None` when it is fine.
fn template_entry_problem(key: &str, label_value: Option<&str>) -> Option<String> {
    if l::is_reserved(key) {
        return Some(format!(
            "{key:?} is Keyward's own (keys under keyward.dev/ and {} are set by the operator)",
            l::MANAGED_BY
        ));
    }
    if let Err(why) = l::qualified_name(key) {
        return Some(format!("{key:?} is not a valid key: {why}"));
    }
    match label_value.map(l::label_value) {
        Some(Err(why)) => Some(format!(
            "the value of {key:?} is not a valid label value: {why}"
        )),
        _ => None,
    }
}

fn annotations_size(annotations: &std::collections::BTreeMap<String, String>) -> usize {
    annotations.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Checks `secretTemplate` as the API server would check the agent Secret's metadata, so an
/// invalid template is reported (`InvalidSpec`) instead of failing every write of the Secret.
fn secret_template(t: &SecretTemplate) -> Result<(), SpecError> {
    for (k, v) in &t.labels {
        if let Some(problem) = template_entry_problem(k, Some(v)) {
            return Err(SpecError::Invalid {
                field: "secretTemplate.labels",
                message: problem,
            });
        }
    }
    for k in t.annotations.keys() {
        if let Some(problem) = template_entry_problem(k, None) {
            return Err(SpecError::Invalid {
                field: "secretTemplate.annotations",
                message: problem,
            });
        }
    }
    let size = annotations_size(&t.annotations);
    if size > MAX_TEMPLATE_ANNOTATIONS_BYTES {
        return Err(SpecError::Invalid {
            field: "secretTemplate.annotations",
            message: format!(
                "{size} bytes in all; at most {MAX_TEMPLATE_ANNOTATIONS_BYTES} (Kubernetes allows 256 KiB of annotations per object, 1 KiB is kept for Keyward's own)"
            ),
        });
    }
    Ok(())
}

/// The part of `secretTemplate` that is written to the agent Secret: the valid entries only, and
/// no annotation at all when they are too large together. For a valid template this is the
/// template; for an invalid one (refused with `InvalidSpec`) the agent Secret is still written,
/// with its token refreshed, instead of failing every write with 422.
pub fn usable_template(t: &SecretTemplate) -> SecretTemplate {
    let labels = t
        .labels
        .iter()
        .filter(|(k, v)| template_entry_problem(k, Some(v)).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let annotations = t
        .annotations
        .iter()
        .filter(|(k, _)| template_entry_problem(k, None).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let annotations = if annotations_size(&annotations) > MAX_TEMPLATE_ANNOTATIONS_BYTES {
        Default::default()
    } else {
        annotations
    };
    SecretTemplate {
        labels,
        annotations,
    }
}

impl Settings {
    /// Resolve and validate a ProvisioningKey's spec.
    pub fn resolve(pk: &ProvisioningKey, floors: &Floors) -> Result<Settings, SpecError> {
        let spec = &pk.spec;
        let rotation = spec.rotation.clone().unwrap_or_default();
        let token = spec.token.clone().unwrap_or_default();
        let interval = match &rotation.interval {
            None => None,
            Some(_) => Some(duration(
                limits::INTERVAL,
                rotation.interval.as_ref(),
                Duration::ZERO,
                floors.interval,
            )?),
        };
        let secret_name = pk.secret_name();
        let trust_bundle_name = pk.trust_bundle_name();
        object_name(pk)?;
        dns_name("secretName", &secret_name)?;
        dns_name("trustBundle.configMapName", &trust_bundle_name)?;
        secret_name_unlike_a_key_secret(pk, &secret_name)?;
        if let Some(t) = &spec.secret_template {
            secret_template(t)?;
        }
        let compromised: BTreeSet<String> =
            spec.compromised_keys.iter().map(|k| k.0.clone()).collect();
        if let Some(bad) = compromised.iter().find(|k| !is_key_id(k)) {
            return Err(SpecError::Invalid {
                field: "compromisedKeys",
                message: format!(
                    "{bad:?} is not a key id (RFC 7638 thumbprint, 43 base64url characters)"
                ),
            });
        }
        let audience = token.audience.unwrap_or_else(|| default_audience(pk));
        let issuer = token.issuer.unwrap_or_else(|| DEFAULT_ISSUER.to_string());
        if audience.is_empty() || issuer.is_empty() {
            return Err(SpecError::Invalid {
                field: "token",
                message: "audience and issuer must not be empty".into(),
            });
        }
        Ok(Settings {
            secret_name,
            trust_bundle_name,
            include_private_key: spec.include_private_key.unwrap_or(false),
            proof_of_possession: pk_asks_pop(pk),
            interval,
            min_interval: duration(
                limits::MIN_INTERVAL,
                rotation.min_interval.as_ref(),
                DEFAULT_MIN_INTERVAL,
                floors.min_interval,
            )?,
            publish_delay: duration(
                limits::PUBLISH_DELAY,
                rotation.publish_delay.as_ref(),
                DEFAULT_PUBLISH_DELAY,
                floors.publish_delay,
            )?,
            overlap: duration(
                limits::OVERLAP,
                rotation.overlap.as_ref(),
                DEFAULT_OVERLAP,
                floors.overlap,
            )?,
            confirmation_timeout: duration(
                limits::CONFIRMATION_TIMEOUT,
                rotation.confirmation_timeout.as_ref(),
                DEFAULT_CONFIRMATION_TIMEOUT,
                Duration::ZERO,
            )?,
            revoke_when_unused_for: rotation
                .revoke_when_unused_for
                .as_ref()
                .map(|v| {
                    duration(
                        limits::REVOKE_WHEN_UNUSED_FOR,
                        Some(v),
                        Duration::ZERO,
                        Duration::from_secs(1),
                    )
                })
                .transpose()?,
            retain_deactivated_for: duration(
                limits::RETAIN_DEACTIVATED_FOR,
                rotation.retain_deactivated_for.as_ref(),
                DEFAULT_RETAIN_DEACTIVATED_FOR,
                Duration::ZERO,
            )?,
            claims: claims(&token.claims)?,
            window: rotation
                .window
                .as_ref()
                .map(|w| {
                    let days: Vec<String> = w.days.iter().map(|d| format!("{d:?}")).collect();
                    super::window::Window::parse(&days, &w.start, &w.end, w.time_zone.as_deref())
                })
                .transpose()
                .map_err(|e| SpecError::Invalid {
                    field: "rotation.window",
                    message: e.to_string(),
                })?,
            request_token: rotation.request_token,
            token_ttl: duration(
                limits::TOKEN_TTL,
                token.ttl.as_ref(),
                DEFAULT_TOKEN_TTL,
                floors.token_ttl,
            )?,
            audience,
            issuer,
            suspend: spec.suspend.unwrap_or(false),
            compromised,
            clock_skew: floors.clock_skew,
            uid: uid(pk),
            refused: None,
        })
    }
}

/// Whether the spec asks for `token.mode: ProofOfPossession`.
fn pk_asks_pop(pk: &ProvisioningKey) -> bool {
    pk.spec.token.as_ref().and_then(|t| t.mode)
        == Some(crate::api::provisioning_key::TokenMode::ProofOfPossession)
}
