//! The apply phase: one idempotent write per step, with names known in advance and the
//! resourceVersion the decision was made on as its precondition. One function per step kind;
//! what the step records (Events, counters) is decided in `rotation::outcome`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};
use zeroize::Zeroizing;

use super::super::caches::OwnWrites;
use super::super::{Context, Error, FIELD_MANAGER, Result, ts_start};
use super::{object_key, uid_of};
use crate::api::provisioning_key::ProvisioningKey;
use crate::fault;
use crate::keys::KeyPair;
use crate::labels as l;
use crate::rotation::desired::{self, key_secret_name};
use crate::rotation::observe::{self, KeyRef};
use crate::rotation::outcome::{Minted, find};
use crate::rotation::snapshot::{Read, Written, wipe};
use crate::rotation::{AgentSecretObs, KeyState, Step};
use crate::trust_record::{self, TrustRecord};

/// What every write of one step is made with.
struct Target<'a> {
    ctx: &'a Context,
    pk: &'a ProvisioningKey,
    read: &'a Read,
    ns: String,
    name: String,
    secrets: Api<Secret>,
    owner: OwnerReference,
    now: DateTime<Utc>,
}

fn create_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

fn merge_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Applies `step`: the write, and the key minted (for the audit and a hand-out later in the
/// same reconcile). `fresh` is a key minted earlier in this reconcile.
pub(super) async fn step(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    now: DateTime<Utc>,
    fresh: &mut Option<(u32, KeyPair)>,
) -> Result<(Option<Minted>, Written)> {
    let (ns, name) = object_key(pk)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey)?;
    debug!(pk = %name, ?step, "applying step");
    // Under leader election, nothing is written unless this replica holds the Lease right now
    // (the client's fence checks again as the request is sent).
    ctx.ensure_leading()?;
    let t = Target {
        ctx,
        pk,
        read,
        ns,
        name,
        secrets,
        owner,
        now,
    };
    let obs = &read.observed;
    let written = match step {
        Step::Mint { seq, .. } => return mint(&t, step, *seq).await,
        Step::MarkPublished { seq } => {
            transition(&t, *seq, KeyState::Published, &[], false, "mark-published").await?
        }
        Step::WriteRecord { record } => {
            let written = Written::Record(Box::new(write_record(&t, record).await?));
            fault::after("record");
            info!(pk = %t.name, kids = ?record.kids.keys().collect::<Vec<_>>(), "trust record written");
            written
        }
        Step::WriteBundle { trusted, revoked } => bundle(&t, trusted, revoked).await?,
        Step::RecordPublished { seq } => {
            let at = [(l::PUBLISHED_AT, ts_start(now))];
            transition(
                &t,
                *seq,
                KeyState::Published,
                &at,
                false,
                "record-published",
            )
            .await?
        }
        Step::Activate { seq, .. } => {
            let at = [(l::ACTIVATED_AT, ts_start(now))];
            transition(&t, *seq, KeyState::Active, &at, false, "activate").await?
        }
        Step::Retire { seq } => {
            let annotations = desired::retire_annotations(obs, *seq, now);
            transition(&t, *seq, KeyState::Retiring, &annotations, false, "retire").await?
        }
        Step::HandOut { seq, .. } => {
            let fresh = fresh.take().filter(|(s, _)| s == seq).map(|(_, p)| p);
            let written = Written::AgentSecret(Box::new(hand_out(&t, *seq, fresh).await?));
            fault::after("hand-out");
            written
        }
        Step::Revoke { seq, .. } => {
            fault::before("revoke");
            let at = [(l::REVOKED_AT, ts_start(now))];
            transition(&t, *seq, KeyState::Revoked, &at, true, "revoke").await?
        }
        Step::Repair { seq } => repair(&t, *seq).await?,
        Step::Prune { seq } => prune(&t, *seq).await?,
    };
    Ok((None, written))
}

/// Remembers the object a step wrote, so its watch event wakes no reconcile of its own.
pub(super) fn remember(written: &Written, own: &OwnWrites) {
    match written {
        Written::KeySecret(_, s) | Written::AgentSecret(s) => own.wrote(&s.metadata),
        Written::Bundle(cm) => own.wrote(&cm.metadata),
        // Not remembered: the ProvisioningKey's watch event of it wakes one reconcile that
        // writes nothing (and `ns/name` would collide with an agent Secret of the same name).
        Written::Nothing | Written::KeySecretGone(_) | Written::Record(_) => {}
    }
}

/// Creates key Secret `seq` with a new key (POST: a 409 means it was already minted).
async fn mint(t: &Target<'_>, step: &Step, seq: u32) -> Result<(Option<Minted>, Written)> {
    let Some(mint) = desired::MintOf::of(step) else {
        return Ok((None, Written::Nothing));
    };
    let pair = KeyPair::generate();
    let public = pair.public_key();
    let (kid, fingerprint) = (public.key_id(), public.fingerprint());
    let mut secret =
        desired::key_secret(t.pk, t.owner.clone(), &t.read.settings, mint, &pair, t.now);
    let created = t.secrets.create(&create_params(), &secret).await;
    wipe(&mut secret);
    let uid = uid_of(t.pk);
    let written = match created {
        Ok(s) => {
            t.ctx.caches.minted(&uid, seq);
            Written::KeySecret(seq, Box::new(s))
        }
        // Already minted (by us before a crash, or by another replica): the existing
        // Secret is the evidence; never mint twice for the same seq. A Secret of that
        // name that this ProvisioningKey does not control is someone else's: never
        // taken for ours, reported, retried with backoff.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let key_name = key_secret_name(&t.name, seq);
            let existing = t.secrets.get_opt(&key_name).await?;
            if let Some(s) = existing.filter(|s| observe::controlled_by(s.meta(), &uid)) {
                info!(pk = %t.name, seq, "key Secret already exists; not minting again");
                t.ctx.caches.minted(&uid, seq);
                return Ok((None, Written::KeySecret(seq, Box::new(s))));
            }
            return Err(Error::NameTaken {
                kind: "Secret",
                name: key_name,
            });
        }
        Err(e) => return Err(e.into()),
    };
    fault::after("mint");
    let minted = Minted {
        kid,
        fingerprint,
        pair: Some(pair),
    };
    Ok((Some(minted), written))
}

/// Writes the trust bundle listing `trusted` and `revoked`.
async fn bundle(t: &Target<'_>, trusted: &[String], revoked: &[String]) -> Result<Written> {
    let read = t.read;
    let cm = desired::trust_bundle(
        t.pk,
        t.owner.clone(),
        &read.settings,
        &read.observed,
        &read.secrets.refs,
        &read.bundle_jwks,
        trusted,
        revoked,
    )?;
    let cms = Api::namespaced(t.ctx.client.clone(), &t.ns);
    let cm = write_bundle(&cms, cm, read.bundle_rv.as_deref()).await?;
    fault::after("bundle");
    info!(pk = %t.name, trusted = ?trusted, revoked = ?revoked, "trust bundle written");
    Ok(Written::Bundle(Box::new(cm)))
}

/// Restores the labels and annotations of key Secret `seq`.
async fn repair(t: &Target<'_>, seq: u32) -> Result<Written> {
    let Some(k) = find(&t.read.observed, seq) else {
        return Ok(Written::Nothing);
    };
    let name = &t.name;
    let key_name = key_secret_name(name, seq);
    // Only the metadata is restored, with the observed resourceVersion as precondition;
    // the state written is the one the key's evidence supports.
    let body = json!({
        "metadata": {
            "resourceVersion": observed_rv(name, &t.read.secrets.refs, seq)?,
            "labels": {
                l::MANAGED_BY: l::MANAGED_BY_VALUE,
                l::PROVISIONING_KEY: name,
                l::COMPONENT: l::COMPONENT_KEY,
                l::KEY_STATE: k.state.as_str(),
                l::KEY_SEQ: seq.to_string(),
            },
            "annotations": { l::KEY_ID: k.kid, l::FINGERPRINT: k.fingerprint },
        }
    });
    let s = t
        .secrets
        .patch(&key_name, &merge_params(), &Patch::Merge(&body))
        .await?;
    Ok(Written::KeySecret(seq, Box::new(s)))
}

/// Deletes old revoked key Secret `seq`, only as it was read (revoked, by this
/// resourceVersion).
async fn prune(t: &Target<'_>, seq: u32) -> Result<Written> {
    let key_name = key_secret_name(&t.name, seq);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: Some(observed_rv(&t.name, &t.read.secrets.refs, seq)?),
            uid: None,
        }),
        ..Default::default()
    };
    match t.secrets.delete(&key_name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    t.ctx.caches.gone(&uid_of(t.pk), seq);
    info!(pk = %t.name, secret = %key_name, "pruned old revoked key Secret");
    Ok(Written::KeySecretGone(seq))
}

/// The resourceVersion of key Secret `seq` as read: the precondition of every write to it. A
/// write without one would be unconditional, so its absence is an error, never a default.
fn observed_rv(pk_name: &str, refs: &BTreeMap<u32, KeyRef>, seq: u32) -> Result<String> {
    refs.get(&seq)
        .map(|r| r.resource_version.clone())
        .filter(|rv| !rv.is_empty())
        .ok_or_else(|| Error::KeySecret {
            name: key_secret_name(pk_name, seq),
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        })
}

/// Moves a key Secret forward to `state` (see [`transition_key_secret`]), then passes the
/// fault-injection point `point`.
async fn transition(
    t: &Target<'_>,
    seq: u32,
    state: KeyState,
    annotations: &[(&str, String)],
    drop_private: bool,
    point: &str,
) -> Result<Written> {
    let rv = observed_rv(&t.name, &t.read.secrets.refs, seq)?;
    let s = transition_key_secret(
        &t.secrets,
        &t.name,
        seq,
        &rv,
        state,
        annotations,
        drop_private,
    )
    .await?;
    fault::after(point);
    Ok(Written::KeySecret(seq, Box::new(s)))
}

/// Moves key Secret `seq` forward to `state`, adding annotations; with `drop_private` (a
/// revocation), deletes the private key. The merge patch carries `observed_rv`, the
/// resourceVersion the decision was made on, as a precondition: if anyone (a new leader, while
/// this replica was paused) changed the key Secret since, it fails with 409 and changes
/// nothing.
pub async fn transition_key_secret(
    secrets: &Api<Secret>,
    pk_name: &str,
    seq: u32,
    observed_rv: &str,
    state: KeyState,
    annotations: &[(&str, String)],
    drop_private: bool,
) -> Result<Secret> {
    if observed_rv.is_empty() {
        return Err(Error::KeySecret {
            name: key_secret_name(pk_name, seq),
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        });
    }
    let rv = observed_rv;
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
    let s = secrets
        .patch(
            &key_secret_name(pk_name, seq),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&body),
        )
        .await?;
    Ok(s)
}

/// Writes the trust bundle by server-side apply. When it was read, the body carries its
/// resourceVersion (`observed_rv`), which the API server takes as a precondition: a bundle
/// changed since (a key published or removed by a new leader) answers 409, so a stale
/// decision never drops a trusted key id. A bundle that was missing is created (POST), so one
/// created meanwhile answers 409 too.
pub async fn write_bundle(
    cms: &Api<ConfigMap>,
    mut cm: ConfigMap,
    observed_rv: Option<&str>,
) -> Result<ConfigMap> {
    let name = cm.name_any();
    match observed_rv {
        Some(rv) => {
            cm.metadata.resource_version = Some(rv.to_string());
            Ok(cms
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&cm),
                )
                .await?)
        }
        None => Ok(cms
            .create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &cm,
            )
            .await?),
    }
}

/// Writes the trust record: server-side apply of that one annotation, with the
/// ProvisioningKey's UID as a precondition (a key deleted and created again under the same name
/// answers 409 instead of getting the old key's record).
async fn write_record(t: &Target<'_>, record: &TrustRecord) -> Result<TrustRecord> {
    let (pk, name) = (t.pk, &t.name);
    let pks: Api<ProvisioningKey> = Api::namespaced(t.ctx.client.clone(), &t.ns);
    let body = json!({
        "apiVersion": ProvisioningKey::api_version(&()),
        "kind": ProvisioningKey::kind(&()),
        "metadata": {
            "name": name,
            "uid": uid_of(pk),
            "annotations": { trust_record::ANNOTATION: record.render() },
        },
    });
    let written = pks
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(TrustRecord::of(&written)
        .and_then(|r| r.ok())
        .unwrap_or_else(|| record.clone()))
}

/// Writes the agent Secret for key `seq`: key id, public key, a fresh token, and the private key
/// only when the spec asks for it.
async fn hand_out(t: &Target<'_>, seq: u32, fresh: Option<KeyPair>) -> Result<Secret> {
    let (pk, settings, obs, secrets) = (t.pk, &t.read.settings, &t.read.observed, &t.secrets);
    let observed_rv = t.read.agent_secret_rv.as_deref();
    let key_name = key_secret_name(&t.name, seq);
    let pair = match fresh {
        // Minted by this reconcile: the key Secret POST returned it stored.
        Some(pair) => pair,
        // Otherwise read once, here, the only step that needs the private key.
        None => {
            let mut key_secret = secrets.get(&key_name).await?;
            let private = key_secret
                .data
                .as_ref()
                .and_then(|d| d.get(l::DATA_PRIVATE_KEY))
                .map(|b| Zeroizing::new(String::from_utf8_lossy(&b.0).into_owned()));
            // The decoded data map holds the private key: wipe it, not just drop it.
            wipe(&mut key_secret);
            drop(key_secret);
            let private = private.ok_or_else(|| Error::KeySecret {
                name: key_name.clone(),
                message: "has no private key".into(),
            })?;
            KeyPair::from_pkcs8_pem(&private)?
        }
    };
    let kid = pair.key_id();
    if find(obs, seq).is_none_or(|k| k.kid != kid) {
        return Err(Error::KeySecret {
            name: key_name,
            message: "private key does not match its key id".into(),
        });
    }
    let mut secret = desired::agent_secret(
        pk,
        t.owner.clone(),
        settings,
        obs,
        &pair,
        t.now,
        uuid::Uuid::new_v4().to_string(),
    )?;
    drop(pair);
    // A Secret that was missing is created (POST): should someone else's appear meanwhile,
    // the create fails instead of taking it over. An owned one is applied with the
    // resourceVersion it was read at: a stale replica never hands out over a newer hand-out.
    let res = match &obs.agent_secret {
        AgentSecretObs::Owned(_) => {
            secret.metadata.resource_version = observed_rv.map(str::to_string);
            secrets
                .patch(
                    &settings.secret_name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await
        }
        _ => secrets.create(&create_params(), &secret).await,
    };
    wipe(&mut secret);
    let owned = matches!(&obs.agent_secret, AgentSecretObs::Owned(_));
    match res {
        // 409 on the apply of an owned Secret is a stale resourceVersion: retried, re-read.
        Err(kube::Error::Api(e)) if e.code == 409 && !owned => Err(Error::NameTaken {
            kind: "Secret",
            name: settings.secret_name.clone(),
        }),
        other => Ok(other?),
    }
}
