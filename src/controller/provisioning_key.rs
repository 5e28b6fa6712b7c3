//! ProvisioningKey reconcile: observe (fresh reads) -> plan (pure) -> apply (one write) -> repeat,
//! then report status and Events.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};
use zeroize::{Zeroize, Zeroizing};

use super::audit::{self, Audit, reason};
use super::{Context, Error, FIELD_MANAGER, Result, parse_ts, ts, ts_start};
use crate::api::PolicyAgent;
use crate::api::conditions::{self, condition};
use crate::api::provisioning_key::{
    HistoryEntry, KeyInfo, ProvisioningKey, ProvisioningKeyStatus, RevokedKey, TrustedKey,
};
use crate::fault;
use crate::keys::{self, Jwks, KeyPair, PublicKey, TokenClaims};
use crate::labels as l;
use crate::rotation::{
    self, AgentSecret, AgentSecretObs, BundleObs, Consumer, HandOutReason, KeyState, Observed,
    ObservedKey, Phase, Plan, Settings, Step, Trigger,
};

/// Most writes one reconcile makes before it yields to other objects.
const MAX_STEPS_PER_RECONCILE: usize = 12;
/// History entries kept in status.
const HISTORY_LIMIT: usize = 10;
/// Secret type of the operator-owned key Secrets.
pub const KEY_SECRET_TYPE: &str = "keyward.dev/key";

/// Name of the key Secret with sequence number `seq`.
pub fn key_secret_name(pk_name: &str, seq: u32) -> String {
    format!("{pk_name}-k{seq}")
}

/// What observe read besides the pure [`Observed`]: names, versions and public keys by seq.
#[derive(Default)]
struct Refs {
    /// seq -> (resourceVersion, SPKI PEM of the public key)
    keys: BTreeMap<u32, (String, String)>,
}

fn object_key(pk: &ProvisioningKey) -> Result<(String, String)> {
    Ok((
        pk.namespace().ok_or(Error::MissingObjectKey)?,
        pk.meta().name.clone().ok_or(Error::MissingObjectKey)?,
    ))
}

/// The reconcile entry point.
pub async fn reconcile(pk: Arc<ProvisioningKey>, ctx: Arc<Context>) -> Result<Action> {
    if pk.meta().deletion_timestamp.is_some() {
        // Owned objects are garbage-collected through their owner references.
        return Ok(Action::await_change());
    }
    let now = ctx.now();
    let settings = match Settings::resolve(&pk, &ctx.config.floors) {
        Ok(s) => s,
        Err(e) => {
            report_invalid(&ctx, &pk, e.reason(), &e.to_string(), now).await?;
            return Ok(Action::await_change());
        }
    };
    for _ in 0..MAX_STEPS_PER_RECONCILE {
        let (observed, refs) = observe(&ctx, &pk, &settings).await?;
        let plan = rotation::plan(&settings, &observed, now);
        match &plan.step {
            None => {
                report(&ctx, &pk, &observed, &plan, now).await?;
                return Ok(plan
                    .requeue_after
                    .map_or_else(Action::await_change, Action::requeue));
            }
            Some(step) => apply(&ctx, &pk, &settings, &observed, &refs, step, now).await?,
        }
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

// ---------------------------------------------------------------------------------------------
// observe: reads only, always fresh from the API server (never the watch cache, which may not
// yet show our own last write).

async fn observe(
    ctx: &Context,
    pk: &ProvisioningKey,
    settings: &Settings,
) -> Result<(Observed, Refs)> {
    let (ns, name) = object_key(pk)?;
    let uid = pk.meta().uid.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let pas: Api<PolicyAgent> = Api::namespaced(ctx.client.clone(), &ns);

    let selector = format!(
        "{}={name},{}={}",
        l::PROVISIONING_KEY,
        l::COMPONENT,
        l::COMPONENT_KEY
    );
    let list = secrets
        .list(&ListParams::default().labels(&selector))
        .await?;
    let mut keys = Vec::new();
    let mut refs = Refs::default();
    for s in list.items.iter().filter(|s| controlled_by(s.meta(), &uid)) {
        match parse_key_secret(s) {
            Ok((k, pem)) => {
                refs.keys
                    .insert(k.seq, (s.resource_version().unwrap_or_default(), pem));
                keys.push(k);
            }
            Err(message) => {
                // A key Secret we cannot read is never acted on; it is reported.
                tracing::warn!(secret = %s.name_any(), %message, "ignoring unreadable key Secret");
            }
        }
    }
    keys.sort_by_key(|k| k.seq);

    let bundle = match cms.get_opt(&settings.trust_bundle_name).await? {
        None => BundleObs::Missing,
        Some(cm) if !controlled_by(cm.meta(), &uid) => BundleObs::Foreign,
        Some(cm) => {
            let data = cm.data.unwrap_or_default();
            // Only entries whose kid is the thumbprint of their key count; anything else makes
            // the bundle differ from the desired one, so it is rewritten.
            let kids = data
                .get(l::DATA_JWKS)
                .and_then(|j| serde_json::from_str::<Jwks>(j).ok())
                .map(|jwks| {
                    jwks.keys
                        .iter()
                        .map(|jwk| match PublicKey::from_jwk(jwk) {
                            Ok(p) => p.key_id(),
                            Err(_) => "<invalid>".to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let revoked = data
                .get(l::DATA_REVOKED)
                .and_then(|j| serde_json::from_str::<Vec<String>>(j).ok())
                .unwrap_or_default();
            BundleObs::Owned { kids, revoked }
        }
    };

    let agent_secret = match secrets.get_opt(&settings.secret_name).await? {
        None => AgentSecretObs::Missing,
        Some(s) if !controlled_by(s.meta(), &uid) => AgentSecretObs::Foreign,
        Some(s) => AgentSecretObs::Owned(inspect_agent_secret(&s, pk, settings, &keys, &refs)),
    };

    let consumers = pas
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|pa| {
            pa.spec.provisioning_key_ref.name == name && pa.meta().deletion_timestamp.is_none()
        })
        // A PolicyAgent refused because another one already manages its workload does nothing;
        // the owner stands for the workload.
        .filter(|pa| {
            !pa.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == conditions::READY && c.reason == "WorkloadClaimed")
            })
        })
        .map(|pa| {
            let status = pa.status.clone().unwrap_or_default();
            Consumer {
                name: pa.name_any(),
                confirmed_kid: status.confirmed_key_id.clone(),
                rolled_at: status.rolled_at.as_deref().and_then(parse_ts),
                waiting_reason: status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == conditions::CONNECTED && c.status != "True")
                    .map(|c| format!("{}: {}", c.reason, c.message)),
            }
        })
        .collect();

    let observed = Observed {
        keys,
        rotate_annotation: pk.annotations().get(l::ROTATE).cloned(),
        bundle,
        agent_secret,
        consumers,
    };
    Ok((observed, refs))
}

fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .as_ref()
        .is_some_and(|o| o.iter().any(|r| r.controller == Some(true) && r.uid == uid))
}

fn parse_key_secret(s: &Secret) -> std::result::Result<(ObservedKey, String), String> {
    let labels = s.labels();
    let ann = s.annotations();
    let get = |k: &str| ann.get(k).cloned();
    let seq = labels
        .get(l::KEY_SEQ)
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or("missing or malformed key-seq label")?;
    let state = labels
        .get(l::KEY_STATE)
        .and_then(|v| KeyState::parse(v))
        .ok_or("missing or malformed key-state label")?;
    let data = s.data.clone().unwrap_or_default();
    let pem = data
        .get(l::DATA_PUBLIC_KEY)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or("missing public key")?;
    let public = PublicKey::from_spki_pem(&pem).map_err(|e| e.to_string())?;
    let kid = public.key_id();
    if get(l::KEY_ID).as_deref() != Some(kid.as_str()) {
        return Err("key-id annotation does not match the public key".into());
    }
    let created_at = get(l::CREATED_AT)
        .as_deref()
        .and_then(parse_ts)
        .or_else(|| {
            s.meta()
                .creation_timestamp
                .as_ref()
                .and_then(|t| DateTime::from_timestamp(t.0.as_second(), 0))
        })
        .ok_or("missing created-at")?;
    let at = |k: &str| get(k).as_deref().and_then(parse_ts);
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
            revoked_at: at(l::REVOKED_AT),
            has_private_key: data.contains_key(l::DATA_PRIVATE_KEY),
        },
        pem,
    ))
}

fn agent_labels(
    pk_name: &str,
    settings_template: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = l::user_metadata(settings_template);
    labels.insert(l::MANAGED_BY.into(), l::MANAGED_BY_VALUE.into());
    labels.insert(l::PROVISIONING_KEY.into(), pk_name.into());
    labels.insert(l::COMPONENT.into(), l::COMPONENT_AGENT_SECRET.into());
    labels
}

fn agent_annotations(kid: &str, template: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut ann = l::user_metadata(template);
    ann.insert(l::KEY_ID.into(), kid.into());
    ann
}

fn template(pk: &ProvisioningKey) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let t = pk.spec.secret_template.clone().unwrap_or_default();
    (t.labels, t.annotations)
}

fn inspect_agent_secret(
    s: &Secret,
    pk: &ProvisioningKey,
    settings: &Settings,
    keys: &[ObservedKey],
    refs: &Refs,
) -> AgentSecret {
    let data = s.data.clone().unwrap_or_default();
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let kid = text(l::DATA_KEY_ID);
    let key = kid
        .as_ref()
        .and_then(|kid| keys.iter().find(|k| &k.kid == kid));
    let public_pem = key
        .and_then(|k| refs.keys.get(&k.seq))
        .map(|(_, pem)| pem.clone());
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
    let content_ok = public_pem.is_some() && text(l::DATA_PUBLIC_KEY) == public_pem;
    let token = text(l::DATA_TOKEN);
    // The token must verify under the key it claims, with the claims the spec asks for.
    let verified = match (&token, &public_pem) {
        (Some(token), Some(pem)) => PublicKey::from_spki_pem(pem).ok().and_then(|p| {
            let jwks = Jwks {
                keys: vec![p.to_jwk()],
            };
            // Checked at the token's own issue time: validity in time is the planner's
            // business (refresh at half-life), the signature and claims are checked here.
            let (_, unverified) = keys::decode_token_unverified(token).ok()?;
            keys::verify_token(token, &jwks, &[], unverified.iat, 0).ok()
        }),
        _ => None,
    };
    let token_claims_match = verified.as_ref().is_some_and(|(h, c)| {
        Some(&h.kid) == kid.as_ref()
            && c.iss == settings.issuer
            && c.aud == settings.audience
            && c.sub == format!("{ns}/{name}")
    });
    AgentSecret {
        kid,
        token_iat: verified.as_ref().map(|(_, c)| c.iat),
        token_exp: verified.as_ref().map(|(_, c)| c.exp),
        token_claims_match,
        has_private_key: data.contains_key(l::DATA_PRIVATE_KEY),
        metadata_matches: labels_ok
            && ann_ok
            && content_ok
            && s.type_.as_deref() == Some(l::AGENT_SECRET_TYPE),
    }
}

// ---------------------------------------------------------------------------------------------
// apply: one idempotent write, with names known in advance; then its audit record.

fn key_ref(pk: &ProvisioningKey, seq: u32) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: pk.namespace(),
        name: Some(key_secret_name(&pk.name_any(), seq)),
        ..Default::default()
    }
}

fn find(obs: &Observed, seq: u32) -> Option<&ObservedKey> {
    obs.keys.iter().find(|k| k.seq == seq)
}

async fn apply(
    ctx: &Context,
    pk: &ProvisioningKey,
    settings: &Settings,
    obs: &Observed,
    refs: &Refs,
    step: &Step,
    now: DateTime<Utc>,
) -> Result<()> {
    let (ns, name) = object_key(pk)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let regarding = pk.object_ref(&());
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey)?;
    debug!(pk = %name, ?step, "applying step");
    match step {
        Step::Mint {
            seq,
            trigger,
            consumed_request_token,
            consumed_annotation,
        } => {
            let pair = KeyPair::generate();
            let public = pair.public_key();
            let kid = public.key_id();
            let fingerprint = public.fingerprint();
            let mut labels = BTreeMap::from([
                (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                (l::PROVISIONING_KEY.to_string(), name.clone()),
                (l::COMPONENT.to_string(), l::COMPONENT_KEY.to_string()),
                (
                    l::KEY_STATE.to_string(),
                    KeyState::Pending.as_str().to_string(),
                ),
            ]);
            labels.insert(l::KEY_SEQ.into(), seq.to_string());
            let mut annotations = BTreeMap::from([
                (l::KEY_ID.to_string(), kid.clone()),
                (l::FINGERPRINT.to_string(), fingerprint.clone()),
                (l::TRIGGER.to_string(), trigger.as_str().to_string()),
                (l::CREATED_AT.to_string(), ts_start(now)),
            ]);
            if let Some(t) = consumed_request_token {
                annotations.insert(l::CONSUMED_REQUEST_TOKEN.into(), t.clone());
            }
            if let Some(a) = consumed_annotation {
                annotations.insert(l::CONSUMED_ROTATE.into(), a.clone());
            }
            let private = pair.to_pkcs8_pem();
            let mut secret = Secret {
                metadata: ObjectMeta {
                    name: Some(key_secret_name(&name, *seq)),
                    namespace: Some(ns.clone()),
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
            };
            drop(private);
            let created = secrets
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &secret,
                )
                .await;
            wipe(&mut secret);
            match created {
                Ok(_) => {}
                // Already minted (by us before a crash, or by another replica): the existing
                // Secret is the evidence; never mint twice for the same seq.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    info!(pk = %name, seq, "key Secret already exists; not minting again");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            fault::after("mint");
            audit::record(
                ctx,
                &regarding,
                Audit {
                    warning: false,
                    reason: reason::KEY_MINTED,
                    action: "Mint",
                    note: format!(
                        "minted key {kid} (fingerprint {fingerprint}, seq {seq}, trigger {})",
                        trigger.as_str()
                    ),
                    related: Some(key_ref(pk, *seq)),
                },
            )
            .await;
            if *trigger == Trigger::Compromised {
                audit::record(ctx, &regarding, Audit {
                    warning: true,
                    reason: reason::EMERGENCY_REVOCATION,
                    action: "Mint",
                    note: format!(
                        "compromised key(s) {} listed in spec.compromisedKeys: minted successor {kid}; the compromised keys are revoked without waiting for confirmation",
                        settings.compromised.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                    related: Some(key_ref(pk, *seq)),
                })
                .await;
            }
        }
        Step::MarkPublished { seq } => {
            transition(&secrets, &name, refs, *seq, KeyState::Published, &[], false).await?;
            fault::after("mark-published");
        }
        Step::WriteBundle { trusted, revoked } => {
            let jwks = Jwks {
                keys: obs
                    .keys
                    .iter()
                    .filter(|k| trusted.contains(&k.kid))
                    .map(|k| {
                        let pem = refs
                            .keys
                            .get(&k.seq)
                            .map(|(_, p)| p.as_str())
                            .unwrap_or_default();
                        PublicKey::from_spki_pem(pem).map(|p| p.to_jwk())
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            };
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(settings.trust_bundle_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([
                        (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                        (l::PROVISIONING_KEY.to_string(), name.clone()),
                        (
                            l::COMPONENT.to_string(),
                            l::COMPONENT_TRUST_BUNDLE.to_string(),
                        ),
                    ])),
                    owner_references: Some(vec![owner]),
                    ..Default::default()
                },
                data: Some(BTreeMap::from([
                    (l::DATA_JWKS.to_string(), to_json_pretty(&jwks)),
                    (l::DATA_REVOKED.to_string(), to_json_pretty(revoked)),
                ])),
                ..Default::default()
            };
            let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            cms.patch(
                &settings.trust_bundle_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await?;
            fault::after("bundle");
            info!(pk = %name, trusted = ?trusted, revoked = ?revoked, "trust bundle written");
        }
        Step::RecordPublished { seq } => {
            transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Published,
                &[(l::PUBLISHED_AT, ts_start(now))],
                false,
            )
            .await?;
            fault::after("record-published");
            if let Some(k) = find(obs, *seq) {
                audit::record(
                    ctx,
                    &regarding,
                    Audit {
                        warning: false,
                        reason: reason::KEY_PUBLISHED,
                        action: "Publish",
                        note: format!(
                            "key {} (fingerprint {}) is in trust bundle {}",
                            k.kid, k.fingerprint, settings.trust_bundle_name
                        ),
                        related: Some(key_ref(pk, *seq)),
                    },
                )
                .await;
            }
        }
        Step::Activate { seq, emergency } => {
            transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Active,
                &[(l::ACTIVATED_AT, ts_start(now))],
                false,
            )
            .await?;
            fault::after("activate");
            if let Some(k) = find(obs, *seq) {
                audit::record(
                    ctx,
                    &regarding,
                    Audit {
                        warning: false,
                        reason: reason::KEY_ACTIVATED,
                        action: "Activate",
                        note: format!(
                            "key {} (fingerprint {}) is now current{}",
                            k.kid,
                            k.fingerprint,
                            if *emergency {
                                " (emergency: publishDelay skipped)"
                            } else {
                                ""
                            }
                        ),
                        related: Some(key_ref(pk, *seq)),
                    },
                )
                .await;
            }
        }
        Step::Retire { seq } => {
            transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Retiring,
                &[(l::RETIRED_AT, ts_start(now))],
                false,
            )
            .await?;
            fault::after("retire");
            if let Some(k) = find(obs, *seq) {
                audit::record(
                    ctx,
                    &regarding,
                    Audit {
                        warning: false,
                        reason: reason::KEY_RETIRING,
                        action: "Retire",
                        note: format!(
                            "key {} is superseded; it stays trusted until revocation is safe",
                            k.kid
                        ),
                        related: Some(key_ref(pk, *seq)),
                    },
                )
                .await;
            }
        }
        Step::HandOut { seq, reason: why } => {
            hand_out(ctx, pk, settings, obs, *seq, now).await?;
            fault::after("hand-out");
            let k = find(obs, *seq);
            let kid = k.map(|k| k.kid.clone()).unwrap_or_default();
            let (reason, note) = match why {
                HandOutReason::TokenRefresh => (
                    reason::TOKEN_REFRESHED,
                    format!(
                        "re-issued the token of key {kid} in Secret {}",
                        settings.secret_name
                    ),
                ),
                HandOutReason::NewKey => (
                    reason::KEY_HANDED_OUT,
                    format!("Secret {} now carries key {kid}", settings.secret_name),
                ),
                HandOutReason::Repair => (
                    reason::KEY_HANDED_OUT,
                    format!(
                        "Secret {} rewritten for key {kid} (it differed from the spec)",
                        settings.secret_name
                    ),
                ),
            };
            audit::record(
                ctx,
                &regarding,
                Audit {
                    warning: false,
                    reason,
                    action: "HandOut",
                    note,
                    related: Some(key_ref(pk, *seq)),
                },
            )
            .await;
        }
        Step::Revoke { seq, emergency } => {
            transition(
                &secrets,
                &name,
                refs,
                *seq,
                KeyState::Revoked,
                &[(l::REVOKED_AT, ts_start(now))],
                true,
            )
            .await?;
            fault::after("revoke");
            if let Some(k) = find(obs, *seq) {
                let cur = rotation::current(&obs.keys)
                    .map(|c| c.kid.clone())
                    .unwrap_or_default();
                let evidence = if *emergency {
                    "listed in spec.compromisedKeys; revoked without waiting for confirmation"
                        .to_string()
                } else if obs.consumers.is_empty() {
                    format!(
                        "overlap of {} passed and no PolicyAgent references this key",
                        humantime::format_duration(settings.overlap)
                    )
                } else {
                    format!(
                        "every PolicyAgent ({}) is confirmed on {cur}",
                        obs.consumers
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                audit::record(
                    ctx,
                    &regarding,
                    Audit {
                        warning: *emergency,
                        reason: if *emergency {
                            reason::EMERGENCY_REVOCATION
                        } else {
                            reason::KEY_REVOKED
                        },
                        action: "Revoke",
                        note: format!(
                            "revoked key {} (fingerprint {}); private key deleted; {evidence}",
                            k.kid, k.fingerprint
                        ),
                        related: Some(key_ref(pk, *seq)),
                    },
                )
                .await;
            }
        }
        Step::Prune { seq } => {
            let key_name = key_secret_name(&name, *seq);
            let dp = DeleteParams {
                preconditions: refs.keys.get(seq).map(|(rv, _)| Preconditions {
                    resource_version: Some(rv.clone()),
                    uid: None,
                }),
                ..Default::default()
            };
            match secrets.delete(&key_name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(pk = %name, secret = %key_name, "pruned old revoked key Secret");
        }
    }
    Ok(())
}

/// Moves a key Secret forward to `state`, adding annotations; with `drop_private`, deletes the
/// private key. The merge patch carries the observed resourceVersion, so a concurrent change
/// makes it fail (409) instead of being overwritten.
async fn transition(
    secrets: &Api<Secret>,
    pk_name: &str,
    refs: &Refs,
    seq: u32,
    state: KeyState,
    annotations: &[(&str, String)],
    drop_private: bool,
) -> Result<()> {
    let rv = refs
        .keys
        .get(&seq)
        .map(|(rv, _)| rv.clone())
        .unwrap_or_default();
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut body = json!({
        "metadata": {
            "resourceVersion": rv,
            "labels": { l::KEY_STATE: state.as_str() },
            "annotations": ann,
        }
    });
    if drop_private {
        body["data"] = json!({ l::DATA_PRIVATE_KEY: null });
    }
    secrets
        .patch(
            &key_secret_name(pk_name, seq),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&body),
        )
        .await?;
    Ok(())
}

/// Writes the agent Secret for key `seq`: key id, public key, a fresh token, and the private key
/// only when the spec asks for it.
async fn hand_out(
    ctx: &Context,
    pk: &ProvisioningKey,
    settings: &Settings,
    obs: &Observed,
    seq: u32,
    now: DateTime<Utc>,
) -> Result<()> {
    let (ns, name) = object_key(pk)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let key_name = key_secret_name(&name, seq);
    let key_secret = secrets.get(&key_name).await?;
    let private = key_secret
        .data
        .as_ref()
        .and_then(|d| d.get(l::DATA_PRIVATE_KEY))
        .map(|b| Zeroizing::new(String::from_utf8_lossy(&b.0).into_owned()))
        .ok_or_else(|| Error::KeySecret {
            name: key_name.clone(),
            message: "has no private key".into(),
        })?;
    drop(key_secret);
    let pair = KeyPair::from_pkcs8_pem(&private)?;
    drop(private);
    let kid = pair.key_id();
    if find(obs, seq).is_none_or(|k| k.kid != kid) {
        return Err(Error::KeySecret {
            name: key_name,
            message: "private key does not match its key id".into(),
        });
    }
    let iat = now.timestamp();
    let claims = TokenClaims {
        iss: settings.issuer.clone(),
        sub: format!("{ns}/{name}"),
        aud: settings.audience.clone(),
        iat,
        nbf: iat,
        exp: iat + i64::try_from(settings.token_ttl.as_secs()).unwrap_or(i64::MAX / 2),
        jti: uuid::Uuid::new_v4().to_string(),
    };
    let token = pair.sign_token(&claims)?;
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
        (l::DATA_TOKEN.to_string(), ByteString(token.into_bytes())),
    ]);
    if settings.include_private_key {
        data.insert(
            l::DATA_PRIVATE_KEY.into(),
            ByteString(pair.to_pkcs8_pem().as_bytes().to_vec()),
        );
    }
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: Some(ns.clone()),
            labels: Some(agent_labels(&name, &tl)),
            annotations: Some(agent_annotations(&kid, &ta)),
            owner_references: Some(vec![
                pk.controller_owner_ref(&())
                    .ok_or(Error::MissingObjectKey)?,
            ]),
            ..Default::default()
        },
        type_: Some(l::AGENT_SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    };
    let res = secrets
        .patch(
            &settings.secret_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await;
    wipe(&mut secret);
    res?;
    Ok(())
}

fn wipe(secret: &mut Secret) {
    if let Some(data) = secret.data.as_mut() {
        for v in data.values_mut() {
            v.0.zeroize();
        }
    }
}

fn to_json_pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// report: status (only when it changed) and condition-transition Events.

/// The status a reconcile reports; pure, and the same on every reconcile of a settled object.
pub fn desired_status(
    pk: &ProvisioningKey,
    obs: &Observed,
    plan: &Plan,
    now: DateTime<Utc>,
) -> ProvisioningKeyStatus {
    let previous = pk.status.clone().unwrap_or_default().conditions;
    let generation = pk.meta().generation;
    let now_t = Time(jiff_from(now));
    let cur = rotation::current(&obs.keys);
    let handed_out = matches!(&obs.agent_secret, AgentSecretObs::Owned(s) if cur.is_some_and(|c| s.kid.as_deref() == Some(c.kid.as_str())));
    let ready = match (&plan.blocked, cur) {
        (Some(why), _) => condition(
            &previous,
            conditions::READY,
            false,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        (None, Some(c)) if handed_out => condition(
            &previous,
            conditions::READY,
            true,
            rotation::reasons::KEY_ACTIVE,
            format!("key {} is current and handed out", c.kid),
            generation,
            now_t.clone(),
        ),
        _ => condition(
            &previous,
            conditions::READY,
            false,
            rotation::reasons::MINTING,
            "the first key is being minted and handed out",
            generation,
            now_t.clone(),
        ),
    };
    let rotating = match &plan.rotating {
        Some(why) => condition(
            &previous,
            conditions::ROTATING,
            true,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        None => condition(
            &previous,
            conditions::ROTATING,
            false,
            rotation::reasons::IDLE,
            "no rotation in flight",
            generation,
            now_t.clone(),
        ),
    };
    let stalled = match (&plan.blocked, &plan.stalled) {
        (Some(why), _) | (None, Some(why)) => condition(
            &previous,
            conditions::STALLED,
            true,
            why.reason,
            why.message.clone(),
            generation,
            now_t.clone(),
        ),
        (None, None) => condition(
            &previous,
            conditions::STALLED,
            false,
            rotation::reasons::IDLE,
            "not stalled",
            generation,
            now_t,
        ),
    };
    ProvisioningKeyStatus {
        phase: Some(plan.phase.as_str().to_string()),
        current_key: cur.map(|c| KeyInfo {
            kid: c.kid.clone(),
            fingerprint: c.fingerprint.clone(),
            created_at: Some(ts(c.created_at)),
            activated_at: c.activated_at.map(ts),
        }),
        trusted_keys: obs
            .keys
            .iter()
            .filter(|k| k.state.trusted())
            .map(|k| TrustedKey {
                kid: k.kid.clone(),
                state: k.state.display().to_string(),
            })
            .collect(),
        revoked_keys: obs
            .keys
            .iter()
            .rev()
            .filter(|k| k.state == KeyState::Revoked)
            .map(|k| RevokedKey {
                kid: k.kid.clone(),
                revoked_at: k.revoked_at.map(ts),
            })
            .collect(),
        next_rotation_at: plan.next_rotation_at.map(ts),
        token_refresh_at: plan.token_refresh_at.map(ts),
        observed_generation: generation,
        conditions: vec![ready, rotating, stalled],
        history: obs
            .keys
            .iter()
            .rev()
            .take(HISTORY_LIMIT)
            .map(|k| HistoryEntry {
                kid: k.kid.clone(),
                trigger: k.trigger.as_str().to_string(),
                state: k.state.display().to_string(),
                minted_at: Some(ts(k.created_at)),
                published_at: k.published_at.map(ts),
                activated_at: k.activated_at.map(ts),
                retired_at: k.retired_at.map(ts),
                revoked_at: k.revoked_at.map(ts),
            })
            .collect(),
    }
}

fn jiff_from(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

async fn write_status(
    ctx: &Context,
    pk: &ProvisioningKey,
    status: &ProvisioningKeyStatus,
) -> Result<bool> {
    if pk.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(true)
}

fn cond<'a>(
    s: &'a ProvisioningKeyStatus,
    t: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.conditions.iter().find(|c| c.type_ == t)
}

/// `pk` with its status as the API server has it now (spec and metadata unchanged: those the plan
/// was made from). The object a reconcile gets comes from the watch cache, which may not show
/// this operator's own last status write yet; comparing against that stale copy re-sent an
/// identical status (a wasted write on a settled object) and could reset `lastTransitionTime`.
async fn with_fresh_status(ctx: &Context, pk: &ProvisioningKey) -> Result<ProvisioningKey> {
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = api.get_status(&name).await?;
    let mut pk = pk.clone();
    pk.status = fresh.status;
    Ok(pk)
}

async fn report(
    ctx: &Context,
    pk: &ProvisioningKey,
    obs: &Observed,
    plan: &Plan,
    now: DateTime<Utc>,
) -> Result<()> {
    let pk = &with_fresh_status(ctx, pk).await?;
    let status = desired_status(pk, obs, plan, now);
    let previous = pk.status.clone().unwrap_or_default();
    if write_status(ctx, pk, &status).await? {
        // Warnings on transitions only.
        let regarding = pk.object_ref(&());
        let was =
            cond(&previous, conditions::STALLED).map(|c| (c.status.clone(), c.reason.clone()));
        if let Some(c) = cond(&status, conditions::STALLED).filter(|c| c.status == "True")
            && was != Some((c.status.clone(), c.reason.clone()))
        {
            audit::record(
                ctx,
                &regarding,
                Audit {
                    warning: true,
                    reason: if plan.blocked.is_some() {
                        c.reason.as_str()
                    } else {
                        reason::ROTATION_STALLED
                    },
                    action: "Reconcile",
                    note: c.message.clone(),
                    related: None,
                },
            )
            .await;
        }
    }
    Ok(())
}

async fn report_invalid(
    ctx: &Context,
    pk: &ProvisioningKey,
    reason: &'static str,
    message: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let pk = &with_fresh_status(ctx, pk).await?;
    let previous = pk.status.clone().unwrap_or_default();
    let generation = pk.meta().generation;
    let now_t = Time(jiff_from(now));
    let mut status = previous.clone();
    status.phase = Some(Phase::Invalid.as_str().to_string());
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            &previous.conditions,
            conditions::READY,
            false,
            reason,
            message,
            generation,
            now_t.clone(),
        ),
        condition(
            &previous.conditions,
            conditions::ROTATING,
            false,
            rotation::reasons::IDLE,
            "no rotation while the spec is invalid",
            generation,
            now_t.clone(),
        ),
        condition(
            &previous.conditions,
            conditions::STALLED,
            true,
            reason,
            message,
            generation,
            now_t,
        ),
    ];
    if write_status(ctx, pk, &status).await? {
        let was = cond(&previous, conditions::READY).map(|c| c.reason.clone());
        if was.as_deref() != Some(reason) {
            audit::record(
                ctx,
                &pk.object_ref(&()),
                Audit {
                    warning: true,
                    reason,
                    action: "Validate",
                    note: format!("spec rejected, nothing changed: {message}"),
                    related: None,
                },
            )
            .await;
        }
    }
    Ok(())
}
