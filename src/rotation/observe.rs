//! From raw objects to [`Observed`]: the mapping the ProvisioningKey controller runs on what it
//! read, and the model-based property test runs on its model. Pure: no client, no clock.
//!
//! Most of the ways a rotation can go wrong in a real cluster live here, not in the planner:
//! which key Secrets count, which PolicyAgent evidence still holds, which pods hold a key.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::DateTime;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::{
    AgentSecret, AgentSecretObs, BundleObs, Consumer, KeyState, LastGood, Names, Observed,
    ObservedKey, Settings, Trigger, Uncovered,
};
use crate::api::conditions;
use crate::api::policy_agent::WorkloadKind;
use crate::api::{PolicyAgent, ProvisioningKey};
use crate::keys::{self, Jwk, Jwks, PublicKey};
use crate::labels as l;
use crate::workload::{self, Lineage, Workload};

/// The settings a key Secret records when it is minted (annotation `keyward.dev/settings`), so
/// that a rotation in flight finishes with them even when the spec is refused later, and so
/// that the names of the agent Secret and trust bundle never change on a live key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedSettings {
    pub secret_name: String,
    pub trust_bundle: String,
    /// Seconds.
    pub min_interval: u64,
    pub publish_delay: u64,
    pub overlap: u64,
    pub confirmation_timeout: u64,
}

impl RecordedSettings {
    pub fn from_settings(s: &Settings) -> Self {
        RecordedSettings {
            secret_name: s.secret_name.clone(),
            trust_bundle: s.trust_bundle_name.clone(),
            min_interval: s.min_interval.as_secs(),
            publish_delay: s.publish_delay.as_secs(),
            overlap: s.overlap.as_secs(),
            confirmation_timeout: s.confirmation_timeout.as_secs(),
        }
    }
}

/// What a key Secret read yields besides its [`ObservedKey`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    pub resource_version: String,
    /// SPKI PEM of the public key.
    pub public_pem: String,
}

/// The key Secrets a ProvisioningKey controls, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySecrets {
    /// Sorted by `seq`.
    pub keys: Vec<ObservedKey>,
    pub refs: BTreeMap<u32, KeyRef>,
    /// Settings recorded on the newest key Secret that has them.
    pub recorded: Option<RecordedSettings>,
    /// Key Secrets that could not be read, or whose labels disagreed with the evidence
    /// (`name: why`), for a Warning.
    pub tampered: Vec<String>,
}

/// Everything a ProvisioningKey's decision is made from, as read.
pub struct KeyObjects<'a> {
    pub pk: &'a ProvisioningKey,
    /// Secrets labelled as this key's key Secrets (whatever their owner: only those the
    /// ProvisioningKey controls count).
    pub key_secrets: &'a [Secret],
    pub bundle: Option<&'a ConfigMap>,
    pub agent_secret: Option<&'a Secret>,
    /// Every PolicyAgent of the namespace.
    pub agents: &'a [PolicyAgent],
    /// The workloads those PolicyAgents name, as read now.
    pub workloads: &'a [Workload],
    pub lineage: Lineage<'a>,
    /// Every pod of the namespace; `None` when not read (no key is retiring).
    pub pods: Option<&'a [Pod]>,
}

/// The result of [`observe`].
pub struct Mapped {
    pub settings: Settings,
    pub observed: Observed,
    pub secrets: KeySecrets,
    /// JWKs of the bundle by key id (only entries that check against their RFC 7638 key id).
    pub bundle_jwks: BTreeMap<String, Jwk>,
}

pub use crate::time::{parse_ts, ts, ts_start};

/// Whether `meta` names the object with `uid` as its controller.
pub fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.controller == Some(true) && r.uid == uid))
}

fn uid_of(pk: &ProvisioningKey) -> String {
    pk.meta().uid.clone().unwrap_or_default()
}

/// Parses the key Secrets that `pk` controls.
pub fn key_secrets(pk: &ProvisioningKey, secrets: &[Secret]) -> KeySecrets {
    let uid = uid_of(pk);
    let mut out = KeySecrets::default();
    let mut recorded: Option<(u32, RecordedSettings)> = None;
    for s in secrets.iter().filter(|s| controlled_by(s.meta(), &uid)) {
        match parse_key_secret(s) {
            Ok((k, pem, tamper, rec)) => {
                if let Some(why) = tamper {
                    out.tampered.push(format!("{}: {why}", s.name_any()));
                }
                if let Some(rec) = rec
                    && recorded.as_ref().is_none_or(|(seq, _)| k.seq > *seq)
                {
                    recorded = Some((k.seq, rec));
                }
                out.refs.insert(
                    k.seq,
                    KeyRef {
                        resource_version: s.resource_version().unwrap_or_default(),
                        public_pem: pem,
                    },
                );
                out.keys.push(k);
            }
            Err(why) => out.tampered.push(format!("{}: {why}", s.name_any())),
        }
    }
    out.keys.sort_by_key(|k| k.seq);
    out.recorded = recorded.map(|(_, r)| r);
    out
}

type Parsed = (
    ObservedKey,
    String,
    Option<String>,
    Option<RecordedSettings>,
);

/// One key Secret. Its state label is believed only as far as the evidence allows: `revoked`
/// needs the private key gone and the revocation recorded; a key whose private key is gone and
/// whose revocation is recorded is revoked whatever its label says (never trusted again).
fn parse_key_secret(s: &Secret) -> Result<Parsed, String> {
    let labels = s.labels();
    let ann = s.annotations();
    let get = |k: &str| ann.get(k).cloned();
    let labelled_seq = labels.get(l::KEY_SEQ).and_then(|v| v.parse::<u32>().ok());
    let named_seq = seq_from_name(&s.name_any());
    let seq = named_seq
        .or(labelled_seq)
        .ok_or("missing or malformed key-seq label")?;
    let data = s.data.clone().unwrap_or_default();
    let pem = data
        .get(l::DATA_PUBLIC_KEY)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or("missing public key")?;
    let public = PublicKey::from_spki_pem(&pem).map_err(|e| e.to_string())?;
    let kid = public.key_id();
    let mut tamper = None;
    if labelled_seq != Some(seq) {
        tamper = Some("key-seq label does not match the Secret's name".to_string());
    }
    if get(l::KEY_ID).as_deref() != Some(kid.as_str()) {
        tamper = Some("key-id annotation does not match the public key".to_string());
    }
    let at = |k: &str| get(k).as_deref().and_then(parse_ts);
    let created_at = at(l::CREATED_AT)
        .or_else(|| {
            s.meta()
                .creation_timestamp
                .as_ref()
                .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
        })
        .ok_or("missing created-at")?;
    let has_private_key = data.contains_key(l::DATA_PRIVATE_KEY);
    let revoked_at = at(l::REVOKED_AT);
    let labelled = labels.get(l::KEY_STATE).and_then(|v| KeyState::parse(v));
    // Each transition writes its label together with its timestamp (publication excepted: the
    // `published` label comes first, its time when the bundle is seen to contain the key), so
    // the timestamps tell the state; a label that disagrees was edited by someone else.
    let (deactivated_at, reactivated_at) = (at(l::DEACTIVATED_AT), at(l::REACTIVATED_AT));
    let state = if !has_private_key && revoked_at.is_some() {
        KeyState::Destroyed
    } else if deactivated_at.is_some() {
        // A reactivation removes `deactivated-at` (and stamps `reactivated-at`), so its presence
        // is a deactivation not undone since, even within the same second.
        KeyState::Deactivated
    } else if at(l::RETIRED_AT).is_some() {
        KeyState::Retiring
    } else if at(l::ACTIVATED_AT).is_some() {
        KeyState::Active
    } else if at(l::PUBLISHED_AT).is_some() || labelled == Some(KeyState::Published) {
        KeyState::Published
    } else {
        KeyState::Pending
    };
    if labelled != Some(state) {
        tamper = Some(match labelled {
            None => "missing or malformed key-state label".to_string(),
            Some(KeyState::Destroyed) => "labelled destroyed without a recorded destruction".into(),
            Some(l) => format!(
                "labelled {} but its evidence says {}",
                l.as_str(),
                state.as_str()
            ),
        });
    }
    let recorded = get(l::SETTINGS).and_then(|v| serde_json::from_str(&v).ok());
    Ok((
        ObservedKey {
            seq,
            fingerprint: public.fingerprint(),
            kid,
            state,
            trigger: get(l::TRIGGER)
                .as_deref()
                .and_then(Trigger::parse)
                .unwrap_or(Trigger::Initial),
            consumed_request_token: get(l::CONSUMED_REQUEST_TOKEN),
            consumed_annotation: get(l::CONSUMED_ROTATE),
            created_at,
            published_at: at(l::PUBLISHED_AT),
            activated_at: at(l::ACTIVATED_AT),
            retired_at: at(l::RETIRED_AT),
            revoked_at,
            deactivated_at,
            reactivated_at,
            consumed_reactivate: get(l::CONSUMED_REACTIVATE),
            has_private_key,
            last_token_exp: at(l::LAST_TOKEN_EXP),
            edited: tamper.clone(),
        },
        pem,
        tamper,
        recorded,
    ))
}

/// `<pk>-k<seq>` -> `seq` (the name is fixed at mint; a label can be edited).
pub fn seq_from_name(name: &str) -> Option<u32> {
    name.rsplit_once("-k").and_then(|(_, n)| n.parse().ok())
}

/// The names this key's objects use: recorded on its key Secrets once it has one.
pub fn names(pk: &ProvisioningKey, secrets: &KeySecrets) -> Names {
    super::names(
        pk,
        secrets
            .recorded
            .as_ref()
            .map(|r| Names {
                secret_name: r.secret_name.clone(),
                trust_bundle_name: r.trust_bundle.clone(),
            })
            .as_ref(),
    )
}

/// Claims of the token an agent Secret holds, verified under the key it names.
struct TokenFacts {
    kid: Option<String>,
    claims: Option<(keys::TokenHeader, keys::TokenClaims)>,
}

fn text(s: &Secret, k: &str) -> Option<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(k))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn token_facts(s: &Secret, secrets: &KeySecrets) -> TokenFacts {
    let kid = text(s, l::DATA_KEY_ID);
    let key = kid
        .as_ref()
        .and_then(|kid| secrets.keys.iter().find(|k| &k.kid == kid));
    let public_pem = key
        .and_then(|k| secrets.refs.get(&k.seq))
        .map(|r| r.public_pem.clone());
    let claims = match (text(s, l::DATA_TOKEN), &public_pem) {
        (Some(token), Some(pem)) => PublicKey::from_spki_pem(pem).ok().and_then(|p| {
            let jwks = Jwks {
                keys: vec![p.to_jwk()],
            };
            // Checked at the token's own issue time: validity in time is the planner's
            // business (refresh at half-life), the signature and claims are checked here.
            let (_, unverified) = keys::decode_token_unverified(&token).ok()?;
            keys::verify_token(&token, &jwks, &[], unverified.iat, 0).ok()
        }),
        _ => None,
    };
    TokenFacts { kid, claims }
}

/// The last good settings: durations recorded on the newest key Secret, claims and lifetime of
/// the token the agent Secret holds. Never status.
pub fn last_good(secrets: &KeySecrets, agent_secret: Option<&Secret>, uid: &str) -> LastGood {
    let rec = secrets.recorded.as_ref();
    let token = agent_secret
        .filter(|s| controlled_by(s.meta(), uid))
        .and_then(|s| token_facts(s, secrets).claims);
    LastGood {
        names: rec.map(|r| Names {
            secret_name: r.secret_name.clone(),
            trust_bundle_name: r.trust_bundle.clone(),
        }),
        min_interval: rec.map(|r| Duration::from_secs(r.min_interval)),
        publish_delay: rec.map(|r| Duration::from_secs(r.publish_delay)),
        overlap: rec.map(|r| Duration::from_secs(r.overlap)),
        confirmation_timeout: rec.map(|r| Duration::from_secs(r.confirmation_timeout)),
        token_ttl: token
            .as_ref()
            .and_then(|(_, c)| u64::try_from(c.exp - c.iat).ok())
            .map(Duration::from_secs),
        audience: token.as_ref().map(|(_, c)| c.aud.clone()),
        issuer: token.as_ref().map(|(_, c)| c.iss.clone()),
        recorded_audience: None,
        recorded_claims: None,
        recorded_pop: None,
    }
}

/// Labels Keyward puts on the agent Secret.
pub fn agent_labels(
    pk_name: &str,
    template: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = l::user_metadata(template);
    labels.insert(l::MANAGED_BY.into(), l::MANAGED_BY_VALUE.into());
    labels.insert(l::PROVISIONING_KEY.into(), pk_name.into());
    labels.insert(l::COMPONENT.into(), l::COMPONENT_AGENT_SECRET.into());
    labels
}

/// Annotations Keyward puts on the agent Secret (besides `handed-out-at`).
pub fn agent_annotations(
    kid: &str,
    template: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut ann = l::user_metadata(template);
    ann.insert(l::KEY_ID.into(), kid.into());
    ann
}

/// The user's `secretTemplate` labels and annotations: its valid entries only, so an invalid
/// template (refused with `InvalidSpec`) never makes the agent Secret's writes fail.
pub fn template(pk: &ProvisioningKey) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let t = super::settings::usable_template(&pk.spec.secret_template.clone().unwrap_or_default());
    (t.labels, t.annotations)
}

fn inspect_agent_secret(
    s: &Secret,
    pk: &ProvisioningKey,
    settings: &Settings,
    secrets: &KeySecrets,
) -> AgentSecret {
    let facts = token_facts(s, secrets);
    let kid = facts.kid.clone();
    let public_pem = kid
        .as_ref()
        .and_then(|kid| secrets.keys.iter().find(|k| &k.kid == kid))
        .and_then(|k| secrets.refs.get(&k.seq))
        .map(|r| r.public_pem.clone());
    let (tl, ta) = template(pk);
    let name = pk.name_any();
    let ns = pk.namespace().unwrap_or_default();
    let labels_ok = agent_labels(&name, &tl)
        .iter()
        .all(|(k, v)| s.labels().get(k) == Some(v));
    let ann_ok = kid.as_deref().is_some_and(|kid| {
        agent_annotations(kid, &ta)
            .iter()
            .all(|(k, v)| s.annotations().get(k) == Some(v))
    });
    let content_ok = public_pem.is_some() && text(s, l::DATA_PUBLIC_KEY) == public_pem;
    let verified = facts.claims;
    let token_claims_match = verified.as_ref().is_some_and(|(h, c)| {
        Some(&h.kid) == kid.as_ref()
            && c.iss == settings.issuer
            && c.aud == settings.audience
            && c.sub == format!("{ns}/{name}")
    });
    // The static claims, read only from a token whose signature was checked above.
    let static_claims_match = verified.is_some()
        && text(s, l::DATA_TOKEN)
            .and_then(|t| keys::custom_claims(&t).ok())
            .is_some_and(|extra| {
                extra.len() == settings.claims.len()
                    && settings
                        .claims
                        .iter()
                        .all(|(k, v)| extra.get(k).and_then(|x| x.as_str()) == Some(v.as_str()))
            });
    AgentSecret {
        kid,
        token_iat: verified.as_ref().map(|(_, c)| c.iat),
        token_exp: verified.as_ref().map(|(_, c)| c.exp),
        token_claims_match,
        static_claims_match,
        has_private_key: s
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(l::DATA_PRIVATE_KEY)),
        has_token: s
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(l::DATA_TOKEN)),
        metadata_matches: labels_ok
            && ann_ok
            && content_ok
            && s.type_.as_deref() == Some(l::AGENT_SECRET_TYPE),
        handed_out_at: s
            .annotations()
            .get(l::HANDED_OUT_AT)
            .and_then(|v| parse_ts(v)),
        token_audience: verified.as_ref().map(|(_, c)| c.aud.clone()),
        token_issuer: verified.as_ref().map(|(_, c)| c.iss.clone()),
    }
}

/// The trust bundle: key ids of the entries that check against their RFC 7638 key id (any
/// other entry is dropped at the next write), the revoked list and the sequence high-water mark.
fn bundle(cm: &ConfigMap) -> (BundleObs, BTreeMap<String, Jwk>) {
    let data = cm.data.clone().unwrap_or_default();
    let mut jwks = BTreeMap::new();
    let mut kids = Vec::new();
    let entries = data
        .get(l::DATA_JWKS)
        .and_then(|j| serde_json::from_str::<Jwks>(j).ok())
        .map(|j| j.keys)
        .unwrap_or_default();
    for jwk in entries {
        match PublicKey::from_jwk(&jwk).map(|p| p.key_id()) {
            Ok(id) if jwk.kid.as_deref() == Some(id.as_str()) => {
                kids.push(id.clone());
                jwks.insert(id, jwk);
            }
            _ => kids.push("<invalid>".into()),
        }
    }
    let revoked = data
        .get(l::DATA_REVOKED)
        .and_then(|j| serde_json::from_str::<Vec<String>>(j).ok())
        .unwrap_or_default();
    let last_seq = cm
        .annotations()
        .get(l::LAST_SEQ)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (
        BundleObs::Owned {
            kids,
            revoked,
            last_seq,
        },
        jwks,
    )
}

/// The PolicyAgent that manages `pa`'s workload: the oldest (then by name) of those naming it.
pub fn claim_owner<'a>(pa: &'a PolicyAgent, agents: &'a [PolicyAgent]) -> &'a PolicyAgent {
    agents
        .iter()
        .filter(|o| o.meta().deletion_timestamp.is_none())
        .filter(|o| o.spec.workload_ref == pa.spec.workload_ref)
        .min_by_key(|o| {
            (
                o.meta().creation_timestamp.clone().map(|t| t.0),
                o.name_any(),
            )
        })
        .unwrap_or(pa)
}

fn find_workload<'a>(
    workloads: &'a [Workload],
    kind: WorkloadKind,
    name: &str,
) -> Option<&'a Workload> {
    workloads
        .iter()
        .find(|w| w.kind() == kind && w.name() == name)
}

/// The key id `pa`'s status confirms, if that evidence still holds for the workload as it is
/// now: same generation of the PolicyAgent, same workload (UID), same template revision, and
/// the template still carries the key. `Err` says why not.
pub fn evidence(
    pa: &PolicyAgent,
    workload: Option<&Workload>,
    lineage: Lineage<'_>,
) -> Result<String, String> {
    let status = pa.status.clone().unwrap_or_default();
    let Some(kid) = status.confirmed_key_id.clone() else {
        return Err("not confirmed".into());
    };
    if status.observed_generation != pa.meta().generation {
        return Err(format!(
            "its status is from generation {}, the spec is at {}",
            status.observed_generation.unwrap_or(0),
            pa.meta().generation.unwrap_or(0)
        ));
    }
    let wl = &pa.spec.workload_ref;
    if wl.kind == crate::api::policy_agent::WorkloadKind::ServiceAccount {
        // An agent outside the cluster: nothing rolled, no template to carry the key; its
        // confirmation is the verifiers' acknowledgement of the ServiceAccount on that key id,
        // which the PolicyAgent controller checked (for the ServiceAccount's current uid).
        return if status.confirmed_revision.as_deref()
            == Some(crate::api::policy_agent::EXTERNAL_REVISION)
        {
            Ok(kid)
        } else {
            Err("not confirmed as an agent outside the cluster".into())
        };
    }
    let Some(w) = workload else {
        return Err(format!("{} {} not found", wl.kind, wl.name));
    };
    if w.uid().is_none() || w.uid() != status.confirmed_workload_uid {
        return Err(format!(
            "{} {} was replaced since the confirmation",
            wl.kind, wl.name
        ));
    }
    let revision = workload::current_revision(w, lineage);
    if revision.is_none() || revision != status.confirmed_revision {
        return Err(format!(
            "{} {} is at another template revision than the one confirmed",
            wl.kind, wl.name
        ));
    }
    if w.template_kid().as_deref() != Some(kid.as_str()) {
        return Err(format!(
            "{} {} no longer carries key {kid} in its pod template",
            wl.kind, wl.name
        ));
    }
    Ok(kid)
}

/// The consumers of key `pk`: every PolicyAgent that references it, read fresh, whatever its
/// conditions say. One refused because another PolicyAgent manages the same workload counts as
/// confirmed exactly when that owner is.
pub fn consumers(
    pk_name: &str,
    agents: &[PolicyAgent],
    workloads: &[Workload],
    lineage: Lineage<'_>,
) -> Vec<Consumer> {
    agents
        .iter()
        .filter(|pa| {
            pa.spec.provisioning_key_ref.name == pk_name && pa.meta().deletion_timestamp.is_none()
        })
        .map(|pa| {
            let owner = claim_owner(pa, agents);
            let wl = &owner.spec.workload_ref;
            let w = find_workload(workloads, wl.kind, &wl.name);
            let status = pa.status.clone().unwrap_or_default();
            let (confirmed_kid, why) = match evidence(owner, w, lineage) {
                Ok(kid) => (Some(kid), None),
                Err(why) if owner.name_any() != pa.name_any() => (
                    None,
                    Some(format!(
                        "its workload is managed by PolicyAgent {}: {why}",
                        owner.name_any()
                    )),
                ),
                Err(why) => (None, Some(why)),
            };
            let condition = status
                .conditions
                .iter()
                .find(|c| c.type_ == conditions::CONNECTED && c.status != "True")
                .map(|c| format!("{}: {}", c.reason, c.message));
            Consumer {
                name: pa.name_any(),
                confirmed_kid,
                rolled_at: status.rolled_at.as_deref().and_then(parse_ts),
                waiting_reason: condition.or(why),
            }
        })
        .collect()
}

/// The controller of `pod`, as `Kind/name` (a ReplicaSet is named by its Deployment).
fn controller_of(pod: &Pod, lineage: Lineage<'_>) -> String {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    match owner {
        None => format!("Pod/{}", pod.name_any()),
        Some(o) if o.kind == "ReplicaSet" => lineage
            .replica_sets
            .iter()
            .find(|rs| rs.meta().uid.as_deref() == Some(o.uid.as_str()))
            .and_then(|rs| {
                rs.owner_references()
                    .iter()
                    .find(|r| r.controller == Some(true))
                    .map(|r| format!("{}/{}", r.kind, r.name))
            })
            .unwrap_or_else(|| format!("ReplicaSet/{}", o.name)),
        Some(o) => format!("{}/{}", o.kind, o.name),
    }
}

/// Pods that use the agent Secret, hold a key (not Failed or Succeeded) and belong to no
/// workload of a PolicyAgent that references this key.
pub fn uncovered(
    pk_name: &str,
    secret_name: &str,
    agents: &[PolicyAgent],
    workloads: &[Workload],
    lineage: Lineage<'_>,
    pods: &[Pod],
) -> Vec<Uncovered> {
    let covered: Vec<&Workload> = agents
        .iter()
        .filter(|pa| {
            pa.spec.provisioning_key_ref.name == pk_name && pa.meta().deletion_timestamp.is_none()
        })
        .filter_map(|pa| {
            find_workload(
                workloads,
                pa.spec.workload_ref.kind,
                &pa.spec.workload_ref.name,
            )
        })
        .collect();
    let mut out: Vec<Uncovered> = pods
        .iter()
        .filter(|p| workload::holds_key(p) && workload::uses_secret(p, secret_name))
        .filter(|p| !covered.iter().any(|w| workload::owns_pod(w, lineage, p)))
        .map(|p| Uncovered {
            pod: p.name_any(),
            workload: controller_of(p, lineage),
        })
        .collect();
    out.sort();
    out
}

/// Maps what was read to the settings and evidence the planner decides on.
pub fn observe(objs: &KeyObjects<'_>, floors: &super::Floors) -> Mapped {
    let pk = objs.pk;
    let uid = uid_of(pk);
    let secrets = key_secrets(pk, objs.key_secrets);
    let agent_secret = objs.agent_secret;
    let mut last = last_good(&secrets, agent_secret, &uid);
    let record = crate::trust_record::TrustRecord::of(pk).and_then(Result::ok);
    last.recorded_claims = record.as_ref().map(|r| r.claims.clone());
    last.recorded_pop = record.as_ref().map(|r| r.pop);
    last.recorded_audience = record.map(|r| r.aud);
    let settings = super::resolve_or_keep(pk, floors, &last);
    let (bundle, bundle_jwks, agent_secret) =
        bundle_and_agent(pk, &settings, &secrets, objs.bundle, agent_secret);
    let name = pk.name_any();
    let consumers = consumers(&name, objs.agents, objs.workloads, objs.lineage);
    let uncovered = objs.pods.map(|pods| {
        uncovered(
            &name,
            &settings.secret_name,
            objs.agents,
            objs.workloads,
            objs.lineage,
            pods,
        )
    });
    let observed = Observed {
        keys: secrets.keys.clone(),
        rotate_annotation: pk.annotations().get(l::ROTATE).cloned(),
        reactivate_annotation: pk.annotations().get(l::REACTIVATE).cloned(),
        bundle,
        agent_secret,
        consumers,
        uncovered,
        usage: None,
        record: crate::trust_record::TrustRecord::of(pk).map(Result::unwrap_or_default),
        legacy_record: crate::trust_record::Legacy::of(pk),
    };
    Mapped {
        settings,
        observed,
        secrets,
        bundle_jwks,
    }
}

/// The trust bundle (with its JWKs by key id) and the agent Secret, parsed under `settings`.
pub fn bundle_and_agent(
    pk: &ProvisioningKey,
    settings: &super::Settings,
    secrets: &KeySecrets,
    bundle_cm: Option<&ConfigMap>,
    agent_secret: Option<&Secret>,
) -> (BundleObs, BTreeMap<String, Jwk>, AgentSecretObs) {
    let uid = uid_of(pk);
    let (bundle, bundle_jwks) = match bundle_cm {
        None => (BundleObs::Missing, BTreeMap::new()),
        Some(cm) if !controlled_by(cm.meta(), &uid) => (BundleObs::Foreign, BTreeMap::new()),
        Some(cm) => bundle(cm),
    };
    let agent_secret = match agent_secret {
        None => AgentSecretObs::Missing,
        Some(s) if !controlled_by(s.meta(), &uid) => AgentSecretObs::Foreign,
        Some(s) => AgentSecretObs::Owned(inspect_agent_secret(s, pk, settings, secrets)),
    };
    (bundle, bundle_jwks, agent_secret)
}

/// Whether the decision needs the workloads and pods (a key is retiring: its revocation is
/// decided on them). Outside a rotation nothing reads them.
pub fn needs_consumers(secrets: &KeySecrets) -> bool {
    secrets.keys.iter().any(|k| k.state == KeyState::Retiring)
}
