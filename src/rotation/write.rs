//! Writes as data. The planner decides the next [`Step`]; [`of`] turns it into the one object
//! write that step makes, a [`Write`]: the verb, the object (or the change) and its
//! precondition. What each step writes is decided here, once, and purely.
//!
//! Two executors carry a `Write` out, and neither knows what a step means:
//! - the controller's (`controller::provisioning_key::apply`) sends it to the API server, with
//!   the leader fence;
//! - the in-memory one ([`memory`]) applies it to a model's objects through the model's own
//!   create, update and delete, so that the model's conflicts and crashes fire per write. The
//!   rotation simulator and the model test (`tests/model.rs`) both use it.
//!
//! | step              | write                                                        |
//! |-------------------|--------------------------------------------------------------|
//! | `Mint`            | create key Secret `<pk>-k<seq>`; one that exists and is ours is the same mint |
//! | `MarkPublished`, `RecordPublished`, `Activate`, `Retire`, `Revoke` | patch the key Secret's state (and timestamps), at the resourceVersion read; `Revoke` also drops the private key |
//! | `Repair`          | patch the key Secret's labels and annotations back, at the resourceVersion read |
//! | `WriteRecord`     | merge-patch `status.trustRecord` of the ProvisioningKey, at the resourceVersion read |
//! | `DropLegacyRecord`| merge-patch the earlier versions' record annotation away, at the resourceVersion read |
//! | `WriteBundle`     | apply the trust bundle at the resourceVersion read, or create it |
//! | `HandOut`         | apply the agent Secret at the resourceVersion read, or create it (someone else's name is refused) |
//! | `Prune`           | delete the key Secret, at the resourceVersion read            |

pub mod memory;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Resource, ResourceExt};

use super::desired::{self, key_secret_name};
use super::outcome::find;
use super::snapshot::{Read, wipe};
use super::{AgentSecretObs, KeyState, Step};
use crate::api::provisioning_key::ProvisioningKey;
use crate::keys::{KeyError, KeyPair};
use crate::labels as l;
use crate::time::ts_start;
use crate::trust_record;

/// One object write.
#[derive(Debug, PartialEq)]
pub enum Write {
    /// POST `object`; what an object of that name that exists already means is `exists`.
    Create { object: Object, exists: Exists },
    /// A merge patch of a key Secret (see [`KeyPatch`]).
    Patch(KeyPatch),
    /// Server-side apply (forced, one field manager) of `object`, which carries the
    /// resourceVersion read as its precondition. Only for objects this ProvisioningKey owns
    /// whole: every field it applies is one it wrote.
    Apply { object: Object },
    /// A merge patch of ProvisioningKey `name`'s `status.trustRecord` to `value`, at
    /// `resource_version` (the one read). The record the decision was made on is `was`: a 409
    /// is retried once at the current resourceVersion only while the object is still `uid` and
    /// the record stored is still `was` (a status write in between changed nothing the
    /// decision rests on; a key deleted and created again under the same name is another key).
    Record {
        name: String,
        uid: String,
        resource_version: String,
        was: Option<String>,
        value: String,
    },
    /// A merge patch removing annotation `key` of ProvisioningKey `name`, at
    /// `resource_version`.
    RemoveAnnotation {
        name: String,
        resource_version: String,
        key: &'static str,
    },
    /// DELETE key Secret `name` at `resource_version`; one that is gone already is deleted.
    Delete {
        name: String,
        resource_version: String,
    },
}

/// An object a write carries whole.
#[derive(Debug, PartialEq)]
pub enum Object {
    Secret(Box<Secret>),
    ConfigMap(Box<ConfigMap>),
}

impl Object {
    pub fn name(&self) -> String {
        match self {
            Object::Secret(s) => s.name_any(),
            Object::ConfigMap(c) => c.name_any(),
        }
    }

    /// The UID of the controller owner reference the object carries (its ProvisioningKey).
    pub fn owner_uid(&self) -> String {
        let meta = match self {
            Object::Secret(s) => &s.metadata,
            Object::ConfigMap(c) => &c.metadata,
        };
        meta.owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone())
            .unwrap_or_default()
    }

    /// Wipes the Secret data a write carried (after the request).
    pub fn wipe(&mut self) {
        if let Object::Secret(s) = self {
            wipe(s);
        }
    }
}

/// What an object that exists already under the name of a create means.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exists {
    /// The same write, done before (by this replica before a crash, or by another): it counts
    /// as written when the object is controlled by this uid; otherwise the name is taken.
    SameIfControlledBy(String),
    /// Someone else's object: the name is taken (never taken over).
    NameTaken,
    /// One controlled by the same owner: a race with another writer (or an object the
    /// reconcile did not read), retried after a fresh read. Anyone else's: the name is taken.
    Conflict,
}

/// A merge patch of key Secret `name`, at `resource_version` (the one the decision was made
/// on): labels and annotations set, and with `drop_private` the private key removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPatch {
    pub name: String,
    pub resource_version: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Annotations removed (a reactivation removes `deactivated-at`).
    pub remove_annotations: Vec<String>,
    pub drop_private: bool,
}

impl KeyPatch {
    /// The body of the merge patch (the resourceVersion in it is the precondition).
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "metadata": {
                "resourceVersion": self.resource_version,
                "labels": self.labels,
                "annotations": self.annotations,
            }
        });
        for a in &self.remove_annotations {
            body["metadata"]["annotations"][a.as_str()] = serde_json::Value::Null;
        }
        if self.drop_private {
            body["data"] = serde_json::json!({ l::DATA_PRIVATE_KEY: null });
        }
        body
    }

    /// Applies the patch to `s` as the API server does (the precondition is the caller's).
    pub fn apply_to(&self, s: &mut Secret) {
        let labels = s.metadata.labels.get_or_insert_default();
        labels.extend(self.labels.clone());
        let annotations = s.metadata.annotations.get_or_insert_default();
        annotations.extend(self.annotations.clone());
        for a in &self.remove_annotations {
            annotations.remove(a);
        }
        if self.drop_private
            && let Some(d) = s.data.as_mut()
            && let Some(mut v) = d.remove(l::DATA_PRIVATE_KEY)
        {
            zeroize::Zeroize::zeroize(&mut v.0);
        }
    }
}

/// Why a step has no write.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the ProvisioningKey has no name, namespace, uid or resourceVersion")]
    MissingObjectKey,
    /// A write to key Secret `name` could not be made; `message` says why.
    #[error("key Secret {name}: {message}")]
    KeySecret { name: String, message: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The key a step needs from its executor: [`of`] is pure, the executor makes or reads keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyNeed {
    /// A new key (a mint).
    New,
    /// The private key of key Secret `seq` (a hand-out).
    Stored(u32),
}

/// The key `step` needs, if any.
pub fn key_need(step: &Step) -> Option<KeyNeed> {
    match step {
        Step::Mint { .. } => Some(KeyNeed::New),
        Step::HandOut { seq, .. } => Some(KeyNeed::Stored(*seq)),
        _ => None,
    }
}

/// What a write is made from besides the step: the snapshot it was decided on, the time, the
/// key the step needs ([`key_need`]) and, for a hand-out, the token's `jti`.
pub struct Inputs<'a> {
    pub pk: &'a ProvisioningKey,
    pub read: &'a Read,
    pub now: DateTime<Utc>,
    pub key: Option<&'a KeyPair>,
    pub jti: &'a str,
}

/// The write `step` makes, or `None` when it has nothing to write (a key it concerns is gone).
/// Every write to an object that was read carries the resourceVersion read as its
/// precondition; a missing one is an error, never an unconditional write.
pub fn of(step: &Step, i: &Inputs<'_>) -> Result<Option<Write>, Error> {
    let (pk, read, now) = (i.pk, i.read, i.now);
    let name = pk.meta().name.clone().ok_or(Error::MissingObjectKey)?;
    let owner = pk
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey)?;
    // The key Secrets as the trust record vouches for them (a repair restores that view).
    let anchored = super::anchored(&read.observed);
    let obs = anchored.as_ref().unwrap_or(&read.observed);
    let state = |seq, state: KeyState, at: Option<&'static str>, drop_private| {
        let annotations = at.map(|a| (a, ts_start(now))).into_iter().collect();
        patch(&name, read, seq, state, annotations, drop_private).map(|p| Some(Write::Patch(p)))
    };
    let write = match step {
        Step::Mint { seq, .. } => {
            let (Some(mint), Some(pair)) = (desired::MintOf::of(step), i.key) else {
                return Ok(None);
            };
            let s = desired::key_secret(pk, owner, &read.settings, mint, pair, now);
            debug_assert_eq!(s.name_any(), key_secret_name(&name, *seq));
            Write::Create {
                object: Object::Secret(Box::new(s)),
                exists: Exists::SameIfControlledBy(pk.meta().uid.clone().unwrap_or_default()),
            }
        }
        Step::MarkPublished { seq } => return state(*seq, KeyState::Published, None, false),
        Step::RecordPublished { seq } => {
            return state(*seq, KeyState::Published, Some(l::PUBLISHED_AT), false);
        }
        Step::Activate { seq, .. } => {
            return state(*seq, KeyState::Active, Some(l::ACTIVATED_AT), false);
        }
        Step::Retire { seq } => {
            let annotations = desired::retire_annotations(obs, *seq, now);
            return patch(&name, read, *seq, KeyState::Retiring, annotations, false)
                .map(|p| Some(Write::Patch(p)));
        }
        Step::Deactivate { seq } => {
            return state(*seq, KeyState::Deactivated, Some(l::DEACTIVATED_AT), false);
        }
        Step::Destroy { seq, .. } => {
            return state(*seq, KeyState::Destroyed, Some(l::REVOKED_AT), true);
        }
        Step::Reactivate { seq, request } => {
            let annotations = vec![
                (l::REACTIVATED_AT, ts_start(now)),
                (l::CONSUMED_REACTIVATE, request.clone()),
            ];
            let mut p = patch(&name, read, *seq, KeyState::Retiring, annotations, false)?;
            p.remove_annotations.push(l::DEACTIVATED_AT.to_string());
            return Ok(Some(Write::Patch(p)));
        }
        Step::WriteRecord { record } => Write::Record {
            name,
            uid: pk.meta().uid.clone().ok_or(Error::MissingObjectKey)?,
            resource_version: pk_rv(pk)?,
            was: pk.status.as_ref().and_then(|s| s.trust_record.clone()),
            value: record.render(),
        },
        Step::DropLegacyRecord => Write::RemoveAnnotation {
            name,
            resource_version: pk_rv(pk)?,
            key: trust_record::ANNOTATION,
        },
        Step::WriteBundle { trusted, revoked } => {
            let mut cm = desired::trust_bundle(
                pk,
                owner,
                &read.settings,
                obs,
                &read.secrets.refs,
                &read.bundle_jwks,
                trusted,
                revoked,
            )?;
            match &read.bundle_rv {
                Some(rv) => {
                    cm.metadata.resource_version = Some(rv.clone());
                    Write::Apply {
                        object: Object::ConfigMap(Box::new(cm)),
                    }
                }
                None => Write::Create {
                    object: Object::ConfigMap(Box::new(cm)),
                    exists: Exists::Conflict,
                },
            }
        }
        Step::HandOut { seq, .. } => {
            let key_name = key_secret_name(&name, *seq);
            let pair = i.key.ok_or_else(|| Error::KeySecret {
                name: key_name.clone(),
                message: "has no private key".into(),
            })?;
            if find(obs, *seq).is_none_or(|k| k.kid != pair.key_id()) {
                return Err(Error::KeySecret {
                    name: key_name,
                    message: "private key does not match its key id".into(),
                });
            }
            let mut secret = desired::agent_secret(
                pk,
                owner,
                &read.settings,
                obs,
                pair,
                now,
                i.jti.to_string(),
            )?;
            // A Secret that was missing is created: should someone else's appear meanwhile,
            // the create fails instead of taking it over. An owned one is applied at the
            // resourceVersion read: a stale replica never hands out over a newer hand-out.
            match &obs.agent_secret {
                AgentSecretObs::Owned(_) => {
                    secret.metadata.resource_version = read.agent_secret_rv.clone();
                    Write::Apply {
                        object: Object::Secret(Box::new(secret)),
                    }
                }
                _ => Write::Create {
                    object: Object::Secret(Box::new(secret)),
                    exists: Exists::Conflict,
                },
            }
        }
        Step::Repair { seq } => {
            let Some(k) = find(obs, *seq) else {
                return Ok(None);
            };
            // Only the metadata is restored; the state written is the one the key's evidence
            // supports.
            // A deactivation the trust record holds but the key Secret lost (its annotation
            // removed) is written back, so the Secret's own evidence agrees again.
            let restore = match (k.state, k.deactivated_at) {
                (KeyState::Deactivated, Some(t)) => vec![(l::DEACTIVATED_AT, ts_start(t))],
                _ => Vec::new(),
            };
            let mut p = patch(&name, read, *seq, k.state, restore, false)?;
            p.labels.extend([
                (l::MANAGED_BY.into(), l::MANAGED_BY_VALUE.into()),
                (l::PROVISIONING_KEY.into(), name.clone()),
                (l::COMPONENT.into(), l::COMPONENT_KEY.into()),
                (l::KEY_SEQ.into(), seq.to_string()),
            ]);
            p.annotations.extend([
                (l::KEY_ID.into(), k.kid.clone()),
                (l::FINGERPRINT.into(), k.fingerprint.clone()),
            ]);
            Write::Patch(p)
        }
        Step::Prune { seq } => Write::Delete {
            name: key_secret_name(&name, *seq),
            resource_version: observed_rv(&name, read, *seq)?,
        },
    };
    Ok(Some(write))
}

/// The ProvisioningKey's resourceVersion as read: the precondition of a write to it.
fn pk_rv(pk: &ProvisioningKey) -> Result<String, Error> {
    pk.meta()
        .resource_version
        .clone()
        .filter(|rv| !rv.is_empty())
        .ok_or(Error::MissingObjectKey)
}

/// A state patch of key Secret `seq`.
fn patch(
    pk_name: &str,
    read: &Read,
    seq: u32,
    state: KeyState,
    annotations: Vec<(&'static str, String)>,
    drop_private: bool,
) -> Result<KeyPatch, Error> {
    Ok(KeyPatch {
        name: key_secret_name(pk_name, seq),
        resource_version: observed_rv(pk_name, read, seq)?,
        labels: BTreeMap::from([(l::KEY_STATE.to_string(), state.as_str().to_string())]),
        annotations: annotations
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        remove_annotations: Vec::new(),
        drop_private,
    })
}

/// The resourceVersion of key Secret `seq` as read: the precondition of every write to it. A
/// write without one would be unconditional, so its absence is an error, never a default.
fn observed_rv(pk_name: &str, read: &Read, seq: u32) -> Result<String, Error> {
    read.secrets
        .refs
        .get(&seq)
        .map(|r| r.resource_version.clone())
        .filter(|rv| !rv.is_empty())
        .ok_or_else(|| Error::KeySecret {
            name: key_secret_name(pk_name, seq),
            message: "no resourceVersion was read; not writing it without a precondition".into(),
        })
}
