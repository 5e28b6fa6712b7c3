//! The objects a step writes, built purely: no client, no clock, no randomness (the key pair,
//! the time and the token id are passed in). The controller sends them; the model-based property
//! test applies them to its model, so both write exactly the same objects.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use super::observe::{
    KeyRef, RecordedSettings, agent_annotations, agent_labels, template, ts, ts_start,
};
use super::{AgentSecretObs, KeyState, Observed, Settings, Trigger};
use crate::api::ProvisioningKey;
use crate::keys::{Jwk, Jwks, KeyError, KeyPair, PublicKey, TokenClaims};
use crate::labels as l;

/// Secret type of the operator-owned key Secrets.
pub const KEY_SECRET_TYPE: &str = "keyward.dev/key";

/// Name of the key Secret with sequence number `seq`.
pub fn key_secret_name(pk_name: &str, seq: u32) -> String {
    format!("{pk_name}-k{seq}")
}

/// What a mint records besides the key: its sequence number, trigger and the requests it serves.
#[derive(Clone, Copy, Debug)]
pub struct MintOf<'a> {
    pub seq: u32,
    pub trigger: Trigger,
    pub consumed_request_token: Option<&'a str>,
    pub consumed_annotation: Option<&'a str>,
    /// Created already `active`, see [`super::Step::Mint`].
    pub active: bool,
}

impl<'a> MintOf<'a> {
    /// What a [`super::Step::Mint`] records; `None` for any other step.
    pub fn of(step: &'a super::Step) -> Option<Self> {
        match step {
            super::Step::Mint {
                seq,
                trigger,
                consumed_request_token,
                consumed_annotation,
                active,
            } => Some(MintOf {
                seq: *seq,
                trigger: *trigger,
                consumed_request_token: consumed_request_token.as_deref(),
                consumed_annotation: consumed_annotation.as_deref(),
                active: *active,
            }),
            _ => None,
        }
    }
}

/// The key Secret `<pk>-k<seq>` of a freshly minted key, with the settings it was minted under:
/// state `pending`, or for a first key created `active` (see [`super::Step::Mint`]) state
/// `active` with `published-at` and `activated-at` equal to `created-at`, the same label and
/// timestamps the two later transitions would write, so the evidence reads the same way. Holds
/// the private key: the caller wipes it after the request.
pub fn key_secret(
    pk: &ProvisioningKey,
    owner: OwnerReference,
    settings: &Settings,
    mint: MintOf<'_>,
    pair: &KeyPair,
    now: DateTime<Utc>,
) -> Secret {
    let name = pk.name_any();
    let public = pair.public_key();
    let state = if mint.active {
        KeyState::Active
    } else {
        KeyState::Pending
    };
    let labels = BTreeMap::from([
        (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
        (l::PROVISIONING_KEY.to_string(), name.clone()),
        (l::COMPONENT.to_string(), l::COMPONENT_KEY.to_string()),
        (l::KEY_STATE.to_string(), state.as_str().to_string()),
        (l::KEY_SEQ.to_string(), mint.seq.to_string()),
    ]);
    let mut annotations = BTreeMap::from([
        (l::KEY_ID.to_string(), public.key_id()),
        (l::FINGERPRINT.to_string(), public.fingerprint()),
        (l::TRIGGER.to_string(), mint.trigger.as_str().to_string()),
        (l::CREATED_AT.to_string(), ts_start(now)),
        (
            l::SETTINGS.to_string(),
            serde_json::to_string(&RecordedSettings::from_settings(settings)).unwrap_or_default(),
        ),
    ]);
    if mint.active {
        // `published-at` here records the decision, taken before the bundle write: for a key
        // created active it starts no wait (publishDelay concerns successors only); the
        // hand-out waits for the bundle itself.
        for k in [l::PUBLISHED_AT, l::ACTIVATED_AT] {
            annotations.insert(k.to_string(), ts_start(now));
        }
    }
    if let Some(t) = mint.consumed_request_token {
        annotations.insert(l::CONSUMED_REQUEST_TOKEN.into(), t.to_string());
    }
    if let Some(a) = mint.consumed_annotation {
        annotations.insert(l::CONSUMED_ROTATE.into(), a.to_string());
    }
    let private = pair.to_pkcs8_pem();
    Secret {
        metadata: ObjectMeta {
            name: Some(key_secret_name(&name, mint.seq)),
            namespace: pk.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some(KEY_SECRET_TYPE.into()),
        data: Some(BTreeMap::from([
            (
                l::DATA_PRIVATE_KEY.to_string(),
                ByteString(private.as_bytes().to_vec()),
            ),
            (
                l::DATA_PUBLIC_KEY.to_string(),
                ByteString(public.to_spki_pem().into_bytes()),
            ),
        ])),
        ..Default::default()
    }
}

/// The trust bundle ConfigMap for `trusted` and `revoked` key ids. Every JWK comes from a minted
/// key Secret, or is one the bundle already trusted (checked against its RFC 7638 key id) and
/// only revocation may remove.
#[allow(clippy::too_many_arguments)]
pub fn trust_bundle(
    pk: &ProvisioningKey,
    owner: OwnerReference,
    settings: &Settings,
    obs: &Observed,
    refs: &BTreeMap<u32, KeyRef>,
    bundle_jwks: &BTreeMap<String, Jwk>,
    trusted: &[String],
    revoked: &[String],
) -> Result<ConfigMap, KeyError> {
    let keys = trusted
        .iter()
        .filter_map(|kid| {
            let minted = obs
                .keys
                .iter()
                .find(|k| &k.kid == kid)
                .and_then(|k| refs.get(&k.seq))
                .map(|r| PublicKey::from_spki_pem(&r.public_pem).map(|p| p.to_jwk()));
            minted.or_else(|| bundle_jwks.get(kid).cloned().map(Ok))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let last_seq = super::bundle_target(settings, obs).last_seq;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(settings.trust_bundle_name.clone()),
            namespace: pk.namespace(),
            labels: Some(BTreeMap::from([
                (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                (l::PROVISIONING_KEY.to_string(), pk.name_any()),
                (
                    l::COMPONENT.to_string(),
                    l::COMPONENT_TRUST_BUNDLE.to_string(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                l::LAST_SEQ.to_string(),
                last_seq.to_string(),
            )])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (l::DATA_JWKS.to_string(), pretty(&Jwks { keys })),
            (l::DATA_REVOKED.to_string(), pretty(&revoked.to_vec())),
        ])),
        ..Default::default()
    })
}

/// Pretty JSON (empty on the impossible failure of serializing plain data).
fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The agent Secret for the key `pair` (whose id the caller checked): key id, public key, a fresh
/// token (`jti` given), the private key only when the spec asks for it, and when this key id was
/// first handed out (kept across token refreshes and repairs). Holds a token, and maybe the
/// private key: the caller wipes it after the request.
pub fn agent_secret(
    pk: &ProvisioningKey,
    owner: OwnerReference,
    settings: &Settings,
    obs: &Observed,
    pair: &KeyPair,
    now: DateTime<Utc>,
    jti: String,
) -> Result<Secret, KeyError> {
    let (ns, name) = (pk.namespace().unwrap_or_default(), pk.name_any());
    let kid = pair.key_id();
    let iat = now.timestamp();
    let claims = TokenClaims {
        iss: settings.issuer.clone(),
        sub: format!("{ns}/{name}"),
        aud: settings.audience.clone(),
        iat,
        nbf: iat,
        exp: iat + i64::try_from(settings.token_ttl.as_secs()).unwrap_or(i64::MAX / 2),
        jti,
    };
    let (tl, ta) = template(pk);
    let mut data = BTreeMap::from([
        (
            l::DATA_KEY_ID.to_string(),
            ByteString(kid.clone().into_bytes()),
        ),
        (
            l::DATA_PUBLIC_KEY.to_string(),
            ByteString(pair.public_key().to_spki_pem().into_bytes()),
        ),
    ]);
    // Proof of possession: the agent signs its own client assertions; a bearer token signed by
    // the key would be a reusable credential (the verifier refuses it anyway).
    if !settings.proof_of_possession {
        let token = pair.sign_token_with(&claims, &settings.claims)?;
        data.insert(l::DATA_TOKEN.to_string(), ByteString(token.into_bytes()));
    }
    if settings.include_private_key {
        data.insert(
            l::DATA_PRIVATE_KEY.into(),
            ByteString(pair.to_pkcs8_pem().as_bytes().to_vec()),
        );
    }
    let handed_out_at = match &obs.agent_secret {
        AgentSecretObs::Owned(s) if s.kid.as_deref() == Some(kid.as_str()) => s.handed_out_at,
        _ => None,
    }
    .map_or_else(|| ts_start(now), ts);
    let mut annotations = agent_annotations(&kid, &ta);
    annotations.insert(l::HANDED_OUT_AT.into(), handed_out_at);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(ns),
            labels: Some(agent_labels(&name, &tl)),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some(l::AGENT_SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    })
}

/// Annotations of a retirement: when, and until when the last token the key signed is valid
/// (the agent Secret still carries it at this point: the successor is handed out after).
pub fn retire_annotations(
    obs: &Observed,
    seq: u32,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let mut ann = vec![(l::RETIRED_AT, ts_start(now))];
    let kid = obs
        .keys
        .iter()
        .find(|k| k.seq == seq)
        .map(|k| k.kid.as_str());
    if let AgentSecretObs::Owned(s) = &obs.agent_secret
        && s.kid.as_deref() == kid
        && let Some(exp) = s.token_exp.and_then(|e| DateTime::from_timestamp(e, 0))
    {
        ann.push((l::LAST_TOKEN_EXP, ts(exp)));
    }
    ann
}
