//! The apply phase: the executor of [`rotation::write`](crate::rotation::write). What a step
//! writes is decided there, purely; here each [`Write`] becomes one API call, behind the leader
//! fence, with the precondition it carries. What the step records (Events, counters) is decided
//! in `rotation::outcome`.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info};
use zeroize::Zeroizing;

use super::super::caches::OwnWrites;
use super::super::{Context, Error, FIELD_MANAGER, Result};
use super::{object_key, uid_of};
use crate::api::provisioning_key::ProvisioningKey;
use crate::fault;
use crate::keys::KeyPair;
use crate::labels as l;
use crate::rotation::desired::key_secret_name;
use crate::rotation::observe;
use crate::rotation::outcome::Minted;
use crate::rotation::snapshot::{Read, Written, wipe};
use crate::rotation::write::{self, Exists, KeyNeed, KeyPatch, Object, Write};
use crate::rotation::{KeyState, Step};

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

/// Applies `step`: its write, and the key minted (for the audit and a hand-out later in the
/// same reconcile). `fresh` is a key minted earlier in this reconcile.
pub(super) async fn step(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    now: chrono::DateTime<chrono::Utc>,
    fresh: &mut Option<(u32, KeyPair)>,
) -> Result<(Option<Minted>, Written)> {
    let (ns, name) = object_key(pk)?;
    debug!(pk = %name, ?step, "applying step");
    // The key the write needs: a new one, or the stored one a hand-out signs with (read once,
    // here, the only step that needs a private key).
    let key = match write::key_need(step) {
        Some(KeyNeed::New) => Some(KeyPair::generate_kind(pk.spec.algorithm.into())),
        Some(KeyNeed::Stored(seq)) => match fresh.take().filter(|(s, _)| *s == seq) {
            Some((_, pair)) => Some(pair),
            None => read_private_key(ctx, &ns, &name, seq).await?,
        },
        None => None,
    };
    let jti = uuid::Uuid::new_v4().to_string();
    let inputs = write::Inputs {
        pk,
        read,
        now,
        key: key.as_ref(),
        jti: &jti,
    };
    let Some(w) = write::of(step, &inputs)? else {
        return Ok((None, Written::Nothing));
    };
    // Under leader election, nothing is written unless this replica holds the Lease right now
    // (the client's fence checks again as the request is sent).
    ctx.ensure_leading()?;
    if matches!(step, Step::Destroy { .. } | Step::Deactivate { .. }) {
        fault::before("revoke");
    }
    let done = execute(ctx, &ns, w).await?;
    let uid = uid_of(pk);
    let written = match (step, done) {
        (Step::Mint { seq, .. }, Done::Secret(s, fresh_write)) => {
            ctx.caches.minted(&uid, *seq);
            if !fresh_write {
                info!(pk = %name, seq, "key Secret already exists; not minting again");
                return Ok((None, Written::KeySecret(*seq, Box::new(s))));
            }
            fault::after("mint");
            let pair = key.ok_or(Error::MissingObjectKey)?;
            let public = pair.public_key();
            let minted = Minted {
                kid: public.key_id(),
                fingerprint: public.fingerprint(),
                pair: Some(pair),
            };
            return Ok((Some(minted), Written::KeySecret(*seq, Box::new(s))));
        }
        (Step::DropLegacyRecord, Done::ProvisioningKey(written)) => {
            ctx.own_records.wrote(written.meta());
            info!(pk = %name, "trust record annotation of an earlier version removed (the record is in status)");
            Written::ProvisioningKey(written)
        }
        (Step::WriteRecord { record }, Done::ProvisioningKey(written)) => {
            // A reconcile woken before the watch cache shows this write reads the object again.
            ctx.own_records.wrote(written.meta());
            fault::after("record");
            info!(pk = %name, kids = ?record.kids.keys().collect::<Vec<_>>(), "trust record written");
            Written::ProvisioningKey(written)
        }
        (Step::WriteBundle { trusted, revoked }, Done::ConfigMap(cm)) => {
            fault::after("bundle");
            info!(pk = %name, trusted = ?trusted, revoked = ?revoked, "trust bundle written");
            Written::Bundle(Box::new(cm))
        }
        (Step::HandOut { .. }, Done::Secret(s, _)) => {
            fault::after("hand-out");
            Written::AgentSecret(Box::new(s))
        }
        (Step::Prune { seq }, Done::Deleted) => {
            ctx.caches.gone(&uid, *seq);
            info!(pk = %name, secret = %key_secret_name(&name, *seq), "pruned old revoked key Secret");
            Written::KeySecretGone(*seq)
        }
        (Step::Repair { seq }, Done::Secret(s, _)) => Written::KeySecret(*seq, Box::new(s)),
        (transition, Done::Secret(s, _)) => {
            let (seq, point) = match transition {
                Step::MarkPublished { seq } => (*seq, "mark-published"),
                Step::RecordPublished { seq } => (*seq, "record-published"),
                Step::Activate { seq, .. } => (*seq, "activate"),
                Step::Retire { seq } => (*seq, "retire"),
                Step::Destroy { seq, .. } | Step::Deactivate { seq } => (*seq, "revoke"),
                Step::Reactivate { seq, .. } => (*seq, "reactivate"),
                _ => return Ok((None, Written::Nothing)),
            };
            fault::after(point);
            Written::KeySecret(seq, Box::new(s))
        }
        _ => Written::Nothing,
    };
    Ok((None, written))
}

/// Reads the private key of key Secret `seq`, wiping the decoded data map.
async fn read_private_key(ctx: &Context, ns: &str, pk: &str, seq: u32) -> Result<Option<KeyPair>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut key_secret = secrets.get(&key_secret_name(pk, seq)).await?;
    let private = key_secret
        .data
        .as_ref()
        .and_then(|d| d.get(l::DATA_PRIVATE_KEY))
        .map(|b| Zeroizing::new(String::from_utf8_lossy(&b.0).into_owned()));
    // The decoded data map holds the private key: wipe it, not just drop it.
    wipe(&mut key_secret);
    drop(key_secret);
    match private {
        Some(p) => Ok(Some(KeyPair::from_pkcs8_pem(&p)?)),
        None => Ok(None),
    }
}

/// Remembers the object a step wrote, so its watch event wakes no reconcile of its own.
pub(super) fn remember(written: &Written, own: &OwnWrites) {
    match written {
        Written::KeySecret(_, s) | Written::AgentSecret(s) => own.wrote(&s.metadata),
        Written::Bundle(cm) => own.wrote(&cm.metadata),
        // The ProvisioningKey is remembered where it is written (`Context::own_records`).
        Written::Nothing | Written::KeySecretGone(_) | Written::ProvisioningKey(_) => {}
    }
}

/// What the API server answered to a write.
enum Done {
    /// The Secret as stored; `false` when a create found it existing already and ours.
    Secret(Secret, bool),
    ConfigMap(ConfigMap),
    ProvisioningKey(Box<ProvisioningKey>),
    Deleted,
}

/// Sends `w` to the API server in namespace `ns`.
async fn execute(ctx: &Context, ns: &str, w: Write) -> Result<Done> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    match w {
        Write::Create {
            object: Object::Secret(mut s),
            exists,
        } => {
            let name = s.name_any();
            let owner = Object::Secret(s.clone()).owner_uid();
            let created = secrets.create(&create_params(), &s).await;
            wipe(&mut s);
            match created {
                Ok(s) => Ok(Done::Secret(s, true)),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    created_already(&secrets, name, owner, exists, e).await
                }
                Err(e) => Err(e.into()),
            }
        }
        Write::Create {
            object: Object::ConfigMap(cm),
            exists,
        } => match cms.create(&create_params(), &cm).await {
            Ok(cm) => Ok(Done::ConfigMap(cm)),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let name = cm.name_any();
                let owner = Object::ConfigMap(cm).owner_uid();
                let ours = match exists {
                    Exists::NameTaken => false,
                    _ => cms
                        .get_opt(&name)
                        .await?
                        .is_some_and(|c| observe::controlled_by(c.meta(), &owner)),
                };
                match ours {
                    // Ours, created since it was read: read again and decide again.
                    true => Err(kube::Error::Api(e).into()),
                    false => Err(Error::NameTaken {
                        kind: "ConfigMap",
                        name,
                    }),
                }
            }
            Err(e) => Err(e.into()),
        },
        Write::Patch(p) => Ok(Done::Secret(send_patch(&secrets, &p).await?, true)),
        Write::Apply {
            object: Object::Secret(mut s),
        } => {
            let applied = apply(&secrets, &s).await;
            wipe(&mut s);
            Ok(Done::Secret(applied?, true))
        }
        Write::Apply {
            object: Object::ConfigMap(cm),
        } => Ok(Done::ConfigMap(apply(&cms, &cm).await?)),
        Write::Record {
            name,
            uid,
            resource_version,
            was,
            value,
        } => {
            let pks: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), ns);
            let body = |rv: &str| {
                json!({
                    "metadata": { "resourceVersion": rv },
                    "status": { "trustRecord": value },
                })
            };
            let pk = match pks
                .patch_status(
                    &name,
                    &merge_params(),
                    &Patch::Merge(body(&resource_version)),
                )
                .await
            {
                Ok(pk) => pk,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    // Our own status write since the read moved the resourceVersion: the record
                    // the decision rests on is checked, not the whole object. Sent again once at
                    // the current resourceVersion only while the stored record is still `was`.
                    let now = pks.get_status(&name).await?;
                    let stored = now.status.as_ref().and_then(|s| s.trust_record.clone());
                    let rv = now.meta().resource_version.clone().unwrap_or_default();
                    if now.meta().uid.as_deref() != Some(uid.as_str())
                        || stored != was
                        || rv.is_empty()
                    {
                        return Err(kube::Error::Api(e).into());
                    }
                    pks.patch_status(&name, &merge_params(), &Patch::Merge(body(&rv)))
                        .await?
                }
                Err(e) => return Err(e.into()),
            };
            Ok(Done::ProvisioningKey(Box::new(pk)))
        }
        Write::RemoveAnnotation {
            name,
            resource_version,
            key,
        } => {
            let pks: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), ns);
            let body = json!({
                "metadata": { "resourceVersion": resource_version, "annotations": { key: null } },
            });
            let pk = pks
                .patch(&name, &merge_params(), &Patch::Merge(&body))
                .await?;
            Ok(Done::ProvisioningKey(Box::new(pk)))
        }
        Write::Delete {
            name,
            resource_version,
        } => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: Some(resource_version),
                    uid: None,
                }),
                ..Default::default()
            };
            match secrets.delete(&name, &dp).await {
                Ok(_) => Ok(Done::Deleted),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Done::Deleted),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// A Secret create answered 409: the same write done before (ours), or someone else's name.
async fn created_already(
    secrets: &Api<Secret>,
    name: String,
    owner: String,
    exists: Exists,
    e: Box<kube::core::Status>,
) -> Result<Done> {
    match exists {
        // Already minted (by us before a crash, or by another replica): the existing Secret is
        // the evidence; never mint twice for the same seq. One this ProvisioningKey does not
        // control is someone else's: never taken for ours, reported, retried with backoff.
        Exists::SameIfControlledBy(uid) => match secrets.get_opt(&name).await? {
            Some(s) if observe::controlled_by(s.meta(), &uid) => Ok(Done::Secret(s, false)),
            _ => Err(Error::NameTaken {
                kind: "Secret",
                name,
            }),
        },
        Exists::NameTaken => Err(Error::NameTaken {
            kind: "Secret",
            name,
        }),
        // A Secret this key created since it was read (or that a key never reconciled did not
        // read, see `read::snapshot`): read again and decide again. Anyone else's: taken.
        Exists::Conflict => match secrets.get_opt(&name).await? {
            Some(s) if observe::controlled_by(s.meta(), &owner) => Err(kube::Error::Api(e).into()),
            _ => Err(Error::NameTaken {
                kind: "Secret",
                name,
            }),
        },
    }
}

/// Server-side apply (forced, one field manager) of `obj`; the resourceVersion it carries is
/// the precondition.
async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?)
}

async fn send_patch(secrets: &Api<Secret>, p: &KeyPatch) -> Result<Secret> {
    Ok(secrets
        .patch(&p.name, &merge_params(), &Patch::Merge(&p.body()))
        .await?)
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
    let name = key_secret_name(pk_name, seq);
    if observed_rv.is_empty() {
        return Err(Error::KeySecret {
            name,
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        });
    }
    let p = KeyPatch {
        name,
        resource_version: observed_rv.to_string(),
        labels: [(l::KEY_STATE.to_string(), state.as_str().to_string())].into(),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        remove_annotations: Vec::new(),
        drop_private,
    };
    send_patch(secrets, &p).await
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
    match observed_rv {
        Some(rv) => {
            cm.metadata.resource_version = Some(rv.to_string());
            apply(cms, &cm).await
        }
        None => Ok(cms.create(&create_params(), &cm).await?),
    }
}
