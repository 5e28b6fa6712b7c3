//! The operator's watch caches: one store per kind and watched scope, shared by both
//! controllers, holding only what decisions read from a cache.
//!
//! | Kind | Cached | Read from the cache for |
//! |---|---|---|
//! | ProvisioningKey | full, `managedFields` dropped | the reconcile's trigger (its spec) |
//! | PolicyAgent | full, `managedFields` dropped | who references a key, who claims a workload |
//! | Keyward-labelled Secrets | metadata only | which key Secrets (`<pk>-k<seq>`) exist |
//! | Keyward-labelled ConfigMaps | metadata only (no store) | wake-ups only |
//! | KeyUsageReports (verifier) | metadata only | which reports to GET; wake-ups |
//! | Deployments, StatefulSets, DaemonSets | metadata only (no store) | wake-ups only |
//!
//! Key bytes are never cached: Secrets are watched as metadata, and their data is read by GET
//! at the step that needs it. Unlabelled Secrets (Helm records, tokens, TLS) are never watched.
//!
//! A cache is only ever used to decide *what to read*, never as the evidence for an
//! irreversible write: see `provisioning_key::read` for each read's consistency argument.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use crate::api::PolicyAgent;
use crate::labels as l;

/// The stores of one watched scope (a namespace, or all namespaces).
#[derive(Clone)]
pub struct ScopeCaches {
    /// `None`: all namespaces.
    pub namespace: Option<String>,
    pub agents: Store<PolicyAgent>,
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Usage reports of the verifier replicas (names only: their content is read by GET).
    pub reports: Store<PartialObjectMeta<crate::api::KeyUsageReport>>,
    /// Set once each store has applied its first complete LIST (see [`Caches::ready`]).
    pub agents_ready: tokio::sync::watch::Receiver<bool>,
    pub secrets_ready: tokio::sync::watch::Receiver<bool>,
}

impl ScopeCaches {
    fn covers(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }
}

/// Every scope's stores, plus what this process itself wrote (so a read right after our own
/// write never depends on the watch having delivered it).
#[derive(Default)]
pub struct Caches {
    scopes: Vec<ScopeCaches>,
    /// Key Secret sequence numbers this process minted, per ProvisioningKey uid, until the
    /// watch shows them.
    minted: Mutex<HashMap<String, BTreeSet<u32>>>,
}

impl Caches {
    pub fn new(scopes: Vec<ScopeCaches>) -> Self {
        Caches {
            scopes,
            ..Caches::default()
        }
    }

    fn scope(&self, ns: &str) -> Option<&ScopeCaches> {
        self.scopes.iter().find(|s| s.covers(ns))
    }

    /// Waits until every store has applied its first complete LIST (a consistent snapshot).
    ///
    /// Readiness comes from the watch streams themselves (their first `InitDone`), not from
    /// kube-runtime's `Store::wait_until_ready`: that keeps a single waker, so of several tasks
    /// waiting at once (reconciles, and the controller's own runner) only the last one polled
    /// would ever be woken.
    pub async fn ready(&self) {
        for s in &self.scopes {
            // Only fails when the stream is gone, i.e. during shutdown: nothing to wait for.
            let _ = s.agents_ready.clone().wait_for(|r| *r).await;
            let _ = s.secrets_ready.clone().wait_for(|r| *r).await;
        }
    }

    /// The PolicyAgents of `ns`, as the cache has them.
    pub fn agents(&self, ns: &str) -> Vec<Arc<PolicyAgent>> {
        self.scope(ns)
            .map(|s| {
                s.agents
                    .state()
                    .into_iter()
                    .filter(|pa| pa.namespace().as_deref() == Some(ns))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The names of the verifier usage reports of ProvisioningKey `pk` in `ns`.
    pub fn report_names(&self, ns: &str, pk: &str) -> Vec<String> {
        self.scope(ns)
            .map(|s| {
                s.reports
                    .state()
                    .into_iter()
                    .filter(|m| {
                        m.namespace().as_deref() == Some(ns)
                            && m.labels().get(l::PROVISIONING_KEY).map(String::as_str) == Some(pk)
                    })
                    .map(|m| m.name_any())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The sequence numbers of the key Secrets that ProvisioningKey `name` (uid `uid`) in `ns`
    /// controls: those the watch cache has, plus those this process minted that the watch has
    /// not delivered yet.
    pub fn key_seqs(&self, ns: &str, name: &str, uid: &str) -> BTreeSet<u32> {
        let mut seqs: BTreeSet<u32> = self
            .scope(ns)
            .map(|s| {
                s.secrets
                    .state()
                    .into_iter()
                    .filter(|m| {
                        m.namespace().as_deref() == Some(ns)
                            && m.labels().get(l::COMPONENT).map(String::as_str)
                                == Some(l::COMPONENT_KEY)
                            && m.labels().get(l::PROVISIONING_KEY).map(String::as_str) == Some(name)
                            && crate::rotation::observe::controlled_by(m.meta(), uid)
                    })
                    .filter_map(|m| crate::rotation::observe::seq_from_name(&m.name_any()))
                    .collect()
            })
            .unwrap_or_default();
        let mut minted = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(own) = minted.get_mut(uid) {
            // Once the watch shows a key Secret, the cache is its source.
            own.retain(|seq| !seqs.contains(seq));
            seqs.extend(own.iter().copied());
            if own.is_empty() {
                minted.remove(uid);
            }
        }
        seqs
    }

    /// The name of the key Secret of ProvisioningKey `pk` in `ns` that holds key `kid`.
    pub fn key_secret_with_kid(&self, ns: &str, pk: &str, kid: &str) -> Option<String> {
        self.scope(ns)?
            .secrets
            .state()
            .into_iter()
            .find(|m| {
                m.namespace().as_deref() == Some(ns)
                    && m.labels().get(l::PROVISIONING_KEY).map(String::as_str) == Some(pk)
                    && m.labels().get(l::COMPONENT).map(String::as_str) == Some(l::COMPONENT_KEY)
                    && m.annotations().get(l::KEY_ID).map(String::as_str) == Some(kid)
            })
            .map(|m| m.name_any())
    }

    /// Records a key Secret this process created (or found already created: a 409 on mint).
    pub fn minted(&self, uid: &str, seq: u32) {
        let mut minted = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        minted.entry(uid.to_string()).or_default().insert(seq);
    }

    /// Forgets a key Secret this process pruned or found gone.
    pub fn gone(&self, uid: &str, seq: u32) {
        let mut minted = self.minted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(own) = minted.get_mut(uid) {
            own.remove(&seq);
        }
    }
}

/// The objects this process wrote, by namespace/name and the resourceVersion the API server
/// returned. The watch event of such a write is an echo: the reconcile that made the write
/// already continued from its response, so the echo does not need to wake it again. An event
/// with any other resourceVersion (someone else's change) always wakes it.
#[derive(Clone, Default)]
pub struct OwnWrites(Arc<Mutex<HashMap<String, String>>>);

/// Most writes remembered; beyond it the oldest are forgotten (their echo then wakes one
/// needless reconcile, nothing worse).
const OWN_WRITES_KEPT: usize = 100_000;

impl OwnWrites {
    fn key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<String> {
        Some(format!(
            "{}/{}",
            meta.namespace.as_deref()?,
            meta.name.as_deref()?
        ))
    }

    /// Records a write's response.
    pub fn wrote(&self, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
        let (Some(key), Some(rv)) = (Self::key(meta), meta.resource_version.clone()) else {
            return;
        };
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= OWN_WRITES_KEPT {
            m.clear();
        }
        m.insert(key, rv);
    }

    /// Whether a watch event is the echo of our own last write of that object.
    pub fn echo(&self, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
        let Some(key) = Self::key(meta) else {
            return false;
        };
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&key) {
            Some(rv) if Some(rv) == meta.resource_version.as_ref() => {
                m.remove(&key);
                true
            }
            _ => false,
        }
    }
}
