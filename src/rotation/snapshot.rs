//! The snapshot a ProvisioningKey reconcile decides on: the raw objects its read phase fetched
//! ([`Raw`]), kept current with the responses of its own writes ([`Written`]), and their pure
//! mapping into the planner's input ([`Read`]). No client, no clock.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{ControllerRevision, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use zeroize::Zeroize;

use super::observe::{self, KeyObjects, KeySecrets};
use super::{Floors, Observed, Settings, Uncovered, UsageObs};
use crate::api::{PolicyAgent, ProvisioningKey};
use crate::keys;
use crate::labels as l;
use crate::workload::{Lineage, Workload};

/// The raw objects a reconcile decides on. Secret data is held only while the reconcile runs;
/// private key bytes are wiped as soon as a key Secret is read (only their presence counts).
#[derive(Default)]
pub struct Raw {
    /// Key Secrets by sequence number.
    pub key_secrets: BTreeMap<u32, Secret>,
    pub bundle: Option<ConfigMap>,
    pub agent_secret: Option<Secret>,
    /// The namespace's PolicyAgents from the watch cache; those referencing the key are
    /// replaced by fresh GETs once its consumers matter (a key is retiring).
    pub agents: Vec<PolicyAgent>,
    /// Read only while a key is retiring.
    pub consumers: Option<ConsumerReads>,
    /// Key use reported by the verifier replicas.
    pub usage: Option<UsageObs>,
    /// The ProvisioningKey had never been reconciled when this snapshot was read (no key
    /// Secret, no trust record): when the reconcile mints its first key, its first status is
    /// written without reading the status again.
    pub never_reconciled: bool,
}

/// What the revocation of a retiring key is decided on.
#[derive(Default)]
pub struct ConsumerReads {
    pub workloads: Vec<Workload>,
    pub replica_sets: Vec<ReplicaSet>,
    pub revisions: Vec<ControllerRevision>,
    /// Pods using the agent Secret that no PolicyAgent covers; `None` until scanned.
    pub uncovered: Option<Vec<Uncovered>>,
    /// The scan saw pods using the agent Secret that are terminating: its result is about to
    /// change, so it was not kept, and the key is looked at again soon (nothing else wakes it:
    /// pods are not watched).
    pub settling: bool,
}

/// The object a step wrote, as the API server returned it.
pub enum Written {
    Nothing,
    KeySecret(u32, Box<Secret>),
    KeySecretGone(u32),
    Bundle(Box<ConfigMap>),
    AgentSecret(Box<Secret>),
    /// The ProvisioningKey, as a write of its trust record (or of the earlier versions'
    /// annotation) left it: the reconcile takes its resourceVersion, annotations and record
    /// ([`took_record_write`]).
    ProvisioningKey(Box<ProvisioningKey>),
}

impl Raw {
    pub fn key_secret_list(&self) -> Vec<Secret> {
        self.key_secrets.values().cloned().collect()
    }

    /// Keeps a key Secret as read, its private key wiped (its presence is the evidence).
    pub fn insert_key_secret(&mut self, seq: u32, mut s: Secret) {
        wipe_private(&mut s);
        self.key_secrets.insert(seq, s);
    }

    /// Takes a write's response as the object's current state: a GET right after the write
    /// would return the same (or something newer that the next reconcile sees).
    pub fn absorb(&mut self, written: Written) {
        match written {
            Written::Nothing => {}
            Written::KeySecret(seq, s) => self.insert_key_secret(seq, *s),
            Written::KeySecretGone(seq) => {
                self.key_secrets.remove(&seq);
            }
            Written::Bundle(cm) => self.bundle = Some(*cm),
            // Taken into the reconcile's ProvisioningKey, see `took_record_write`.
            Written::ProvisioningKey(_) => {}
            Written::AgentSecret(s) => {
                if let Some(old) = self.agent_secret.as_mut() {
                    wipe(old);
                }
                self.agent_secret = Some(*s);
            }
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        for s in self.key_secrets.values_mut() {
            wipe(s);
        }
        if let Some(s) = self.agent_secret.as_mut() {
            wipe(s);
        }
    }
}

/// Takes what a record write changed on the ProvisioningKey into `pk`, the reconcile's copy
/// (its spec stays the one the reconcile was given): the resourceVersion (the precondition of
/// the next write to it), the annotations and the record.
pub fn took_record_write(pk: &mut ProvisioningKey, written: &ProvisioningKey) {
    pk.metadata.resource_version = written.metadata.resource_version.clone();
    pk.metadata.annotations = written.metadata.annotations.clone();
    pk.status.get_or_insert_default().trust_record =
        written.status.as_ref().and_then(|s| s.trust_record.clone());
}

/// Wipes the private key of a key Secret, keeping the entry (its presence is evidence).
pub fn wipe_private(s: &mut Secret) {
    if let Some(v) = s.data.as_mut().and_then(|d| d.get_mut(l::DATA_PRIVATE_KEY)) {
        v.0.zeroize();
    }
}

/// Wipes every data value of a Secret.
pub fn wipe(secret: &mut Secret) {
    if let Some(data) = secret.data.as_mut() {
        for v in data.values_mut() {
            v.0.zeroize();
        }
    }
}

/// What observe read: the planner's input and what apply needs besides it.
pub struct Read {
    pub settings: Settings,
    pub observed: Observed,
    pub secrets: KeySecrets,
    pub bundle_jwks: BTreeMap<String, keys::Jwk>,
    /// resourceVersions of the trust bundle and of the agent Secret as read: the preconditions
    /// of their writes.
    pub bundle_rv: Option<String>,
    pub agent_secret_rv: Option<String>,
}

/// The pure mapping of what was read.
pub fn map(pk: &ProvisioningKey, raw: &Raw, floors: &Floors) -> Read {
    let key_secrets = raw.key_secret_list();
    let none = ConsumerReads::default();
    let consumers = raw.consumers.as_ref().unwrap_or(&none);
    let mut mapped = observe::observe(
        &KeyObjects {
            pk,
            key_secrets: &key_secrets,
            bundle: raw.bundle.as_ref(),
            agent_secret: raw.agent_secret.as_ref(),
            agents: &raw.agents,
            workloads: &consumers.workloads,
            lineage: Lineage {
                replica_sets: &consumers.replica_sets,
                revisions: &consumers.revisions,
            },
            pods: None,
        },
        floors,
    );
    mapped.observed.uncovered = consumers.uncovered.clone();
    mapped.observed.usage = raw.usage.clone();
    Read {
        settings: mapped.settings,
        observed: mapped.observed,
        secrets: mapped.secrets,
        bundle_jwks: mapped.bundle_jwks,
        bundle_rv: raw.bundle.as_ref().and_then(|c| c.resource_version()),
        agent_secret_rv: raw.agent_secret.as_ref().and_then(|s| s.resource_version()),
    }
}
