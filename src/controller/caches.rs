//! The operator's watch caches: one store per kind and watched scope, shared by both
//! controllers, holding only what decisions read from a cache.
//!
//! | Kind | Cached | Read from the cache for |
//! |---|---|---|
//! | ProvisioningKey | full, `managedFields` dropped | the reconcile's trigger (its spec) |
//! | PolicyAgent | full, `managedFields` dropped | who references a key, who claims a workload |
//! | Keyward-labelled Secrets | [`CachedSecret`]: role, owner, key id, resourceVersion | which key Secrets (`<pk>-k<seq>`) exist; a relist's wake-ups |
//! | Keyward-labelled ConfigMaps | metadata only (no store) | wake-ups only |
//! | KeyUsageReports (verifier) | metadata only | which reports to GET; wake-ups |
//! | Deployments, StatefulSets, DaemonSets | metadata only (no store) | wake-ups only |
//!
//! Key bytes are never cached: Secrets are watched as metadata, and their data is read by GET
//! at the step that needs it. Unlabelled Secrets (Helm records, tokens, TLS) are never watched.
//!
//! A cache is only ever used to decide *what to read*, never as the evidence for an
//! irreversible write: see `provisioning_key::read` for each read's consistency argument.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use k8s_openapi::api::core::v1::Secret;
use kube::core::{ObjectMeta, PartialObjectMeta};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::api::ProvisioningKey;

use crate::api::PolicyAgent;
use crate::labels as l;

/// The stores of one watched scope (a namespace, or all namespaces).
#[derive(Clone)]
pub struct ScopeCaches {
    /// `None`: all namespaces.
    pub namespace: Option<String>,
    pub agents: Store<PolicyAgent>,
    pub secrets: SecretCache,
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

/// What the operator keeps of one Keyward-labelled Secret: what the readers below and a
/// relist's wake-ups read, nothing else (never its data: the watch is a metadata watch). About
/// 90 bytes and five short strings a Secret, where the cached metadata (labels, annotations,
/// owner references, uid, timestamps, in a kube store keyed by `ObjectRef`) took well over a
/// KiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedSecret {
    /// `None` only for an object without one (a relist never takes it for unchanged).
    pub resource_version: Option<Box<str>>,
    /// The `keyward.dev/provisioning-key` label.
    pub provisioning_key: Option<Box<str>>,
    /// The controlling ProvisioningKey: the owner reference with `controller: true` (the API
    /// server allows one) when its kind is `ProvisioningKey`.
    pub owner: Option<SecretOwner>,
    pub role: SecretRole,
}

/// The ProvisioningKey controlling a Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretOwner {
    pub name: Box<str>,
    pub uid: Box<str>,
}

/// What the `keyward.dev/component` label says a Secret is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretRole {
    /// A key Secret (`<pk>-k<seq>`), with its `keyward.dev/key-id` annotation.
    Key { kid: Option<Box<str>> },
    /// An agent Secret: its changes wake the PolicyAgents using its key.
    AgentSecret,
    /// Any other component, or none: kept for a relist's wake-ups only.
    Other,
}

impl CachedSecret {
    /// What is kept of a Secret with metadata `meta`.
    pub fn of(meta: &ObjectMeta) -> Self {
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
        let role = match label(l::COMPONENT).map(String::as_str) {
            Some(l::COMPONENT_KEY) => SecretRole::Key {
                kid: meta
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(l::KEY_ID))
                    .map(|k| k.as_str().into()),
            },
            Some(l::COMPONENT_AGENT_SECRET) => SecretRole::AgentSecret,
            _ => SecretRole::Other,
        };
        let owner = meta
            .owner_references
            .as_ref()
            .and_then(|o| {
                o.iter()
                    .find(|o| o.controller == Some(true) && o.kind == ProvisioningKey::kind(&()))
            })
            .map(|o| SecretOwner {
                name: o.name.as_str().into(),
                uid: o.uid.as_str().into(),
            });
        CachedSecret {
            resource_version: meta.resource_version.as_deref().map(Into::into),
            provisioning_key: label(l::PROVISIONING_KEY).map(|p| p.as_str().into()),
            owner,
            role,
        }
    }

    /// The ProvisioningKey controlling this Secret of namespace `ns`.
    pub fn owner_ref(&self, ns: &str) -> Option<ObjectRef<ProvisioningKey>> {
        self.owner
            .as_ref()
            .map(|o| ObjectRef::new(&o.name).within(ns))
    }

    fn labelled_for(&self, pk: &str) -> bool {
        self.provisioning_key.as_deref() == Some(pk)
    }
}

/// Namespace -> name -> Secret.
type SecretMap = BTreeMap<Box<str>, BTreeMap<Box<str>, CachedSecret>>;

/// The Keyward-labelled Secrets of one scope, as [`CachedSecret`]s; filled by a
/// [`SecretWriter`]. Cheap to clone (one `Arc`).
#[derive(Clone, Default)]
pub struct SecretCache(Arc<RwLock<SecretMap>>);

impl SecretCache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, SecretMap> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, SecretMap> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Secret `ns/name`, as the cache has it.
    pub fn get(&self, ns: &str, name: &str) -> Option<CachedSecret> {
        self.read().get(ns)?.get(name).cloned()
    }

    /// How many Secrets the cache holds.
    pub fn len(&self) -> usize {
        self.read().values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sequence numbers (from their names) of the key Secrets in `ns` labelled for
    /// ProvisioningKey `pk` and controlled by uid `uid`.
    fn key_seqs(&self, ns: &str, pk: &str, uid: &str) -> BTreeSet<u32> {
        let cache = self.read();
        let Some(secrets) = cache.get(ns) else {
            return BTreeSet::new();
        };
        secrets
            .iter()
            .filter(|(_, s)| {
                matches!(s.role, SecretRole::Key { .. })
                    && s.labelled_for(pk)
                    && s.owner.as_ref().is_some_and(|o| &*o.uid == uid)
            })
            .filter_map(|(name, _)| crate::rotation::observe::seq_from_name(name))
            .collect()
    }

    /// The name of the key Secret in `ns` labelled for ProvisioningKey `pk` that holds key
    /// `kid`.
    fn key_secret_with_kid(&self, ns: &str, pk: &str, kid: &str) -> Option<String> {
        self.read()
            .get(ns)?
            .iter()
            .find(|(_, s)| {
                s.labelled_for(pk)
                    && matches!(&s.role, SecretRole::Key { kid: Some(k) } if &**k == kid)
            })
            .map(|(name, _)| name.to_string())
    }
}

/// Fills a [`SecretCache`] from the labelled-Secret watch, and tells which Secrets' owners each
/// event wakes, with the semantics of [`Relist`](super::wiring::Relist) over a kube store: a
/// relist's list is built apart and swapped in at `InitDone` (until then readers see the
/// previous list); a relisted Secret at the resourceVersion the cache holds wakes nothing, and
/// a Secret the cache held that the relist no longer lists wakes its owners, as a delete does.
pub struct SecretWriter {
    cache: SecretCache,
    /// The list in progress after a watch (re)start.
    relisting: Option<SecretMap>,
}

impl SecretWriter {
    pub fn new(cache: SecretCache) -> Self {
        SecretWriter {
            cache,
            relisting: None,
        }
    }

    /// Applies watch event `ev` to the cache, then calls `wake(namespace, name, secret)` with
    /// each Secret whose owners the event must wake.
    pub fn apply(
        &mut self,
        ev: &watcher::Event<PartialObjectMeta<Secret>>,
        mut wake: impl FnMut(&str, &str, &CachedSecret),
    ) {
        let key = |o: &PartialObjectMeta<Secret>| -> (Box<str>, Box<str>) {
            (
                o.metadata.namespace.as_deref().unwrap_or_default().into(),
                o.name_any().into(),
            )
        };
        match ev {
            watcher::Event::Apply(o) => {
                let ((ns, name), s) = (key(o), CachedSecret::of(&o.metadata));
                self.cache
                    .write()
                    .entry(ns.clone())
                    .or_default()
                    .insert(name.clone(), s.clone());
                wake(&ns, &name, &s);
            }
            watcher::Event::Delete(o) => {
                let (ns, name) = key(o);
                {
                    let mut cache = self.cache.write();
                    if let Some(secrets) = cache.get_mut(&ns) {
                        secrets.remove(&name);
                        if secrets.is_empty() {
                            cache.remove(&ns);
                        }
                    }
                }
                wake(&ns, &name, &CachedSecret::of(&o.metadata));
            }
            watcher::Event::Init => self.relisting = Some(SecretMap::new()),
            watcher::Event::InitApply(o) => {
                let ((ns, name), s) = (key(o), CachedSecret::of(&o.metadata));
                let unchanged = s.resource_version.is_some()
                    && self.cache.get(&ns, &name).map(|h| h.resource_version)
                        == Some(s.resource_version.clone());
                if !unchanged {
                    wake(&ns, &name, &s);
                }
                self.relisting
                    .get_or_insert_default()
                    .entry(ns)
                    .or_default()
                    .insert(name, s);
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let gone: Vec<(Box<str>, Box<str>, CachedSecret)> = {
                    let mut cache = self.cache.write();
                    let before = std::mem::replace(&mut *cache, listed);
                    before
                        .into_iter()
                        .flat_map(|(ns, secrets)| {
                            secrets
                                .into_iter()
                                .map(move |(name, s)| (ns.clone(), name, s))
                        })
                        .filter(|(ns, name, _)| {
                            cache.get(ns).is_none_or(|now| !now.contains_key(name))
                        })
                        .collect()
                };
                for (ns, name, s) in gone {
                    wake(&ns, &name, &s);
                }
            }
        }
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
            .map(|s| s.secrets.key_seqs(ns, name, uid))
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
        self.scope(ns)?.secrets.key_secret_with_kid(ns, pk, kid)
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
        match (meta.namespace.as_deref(), meta.name.as_deref()) {
            (Some(ns), Some(name)) => self.echo_of(ns, name, meta.resource_version.as_deref()),
            _ => false,
        }
    }

    /// Whether the object in hand predates our own last write of it: the watch cache has not
    /// delivered that write yet. A remembered write the object has already passed (a later
    /// resourceVersion: the echo was coalesced into a relist, or filtered out) is forgotten.
    pub fn unseen(
        &self,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> bool {
        let Some(key) = Self::key(meta) else {
            return false;
        };
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(held) = m.get(&key) else {
            return false;
        };
        let have = meta.resource_version.as_deref();
        if have == Some(held.as_str()) {
            // Seen: a status write's echo never reaches `echo` (status changes wake no
            // reconcile), so it is forgotten here.
            m.remove(&key);
            return false;
        }
        // resourceVersions are opaque, but the API server's are etcd revisions; where both parse,
        // a newer object in hand means our write is already in it.
        let newer = match (
            have.and_then(|r| r.parse::<u64>().ok()),
            held.parse::<u64>().ok(),
        ) {
            (Some(have), Some(held)) => have > held,
            _ => false,
        };
        if newer {
            m.remove(&key);
        }
        !newer
    }

    /// [`OwnWrites::echo`] of object `ns/name` at resourceVersion `rv`.
    pub fn echo_of(&self, ns: &str, name: &str, rv: Option<&str>) -> bool {
        let key = format!("{ns}/{name}");
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(&key) {
            Some(held) if Some(held.as_str()) == rv => {
                m.remove(&key);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn meta(name: &str, component: &str, kid: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            resource_version: Some("7".into()),
            labels: Some(
                [
                    (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                    (l::PROVISIONING_KEY.to_string(), "pk".to_string()),
                    (l::COMPONENT.to_string(), component.to_string()),
                ]
                .into(),
            ),
            annotations: kid.map(|k| {
                [
                    (l::KEY_ID.to_string(), k.to_string()),
                    (l::SETTINGS.to_string(), "{}".to_string()),
                ]
                .into()
            }),
            owner_references: Some(vec![OwnerReference {
                api_version: "keyward.dev/v1alpha1".into(),
                kind: "ProvisioningKey".into(),
                name: "pk".into(),
                uid: "uid-1".into(),
                controller: Some(true),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        }
    }

    fn caches(metas: Vec<ObjectMeta>) -> Caches {
        let secrets = SecretCache::default();
        let mut w = SecretWriter::new(secrets.clone());
        for m in metas {
            let ev = watcher::Event::Apply(PartialObjectMeta {
                types: None,
                metadata: m,
                _phantom: Default::default(),
            });
            w.apply(&ev, |_, _, _| {});
        }
        let (_, agents) = kube::runtime::reflector::store::<PolicyAgent>();
        let (_, reports) = kube::runtime::reflector::store();
        let (_, ready) = tokio::sync::watch::channel(true);
        Caches::new(vec![ScopeCaches {
            namespace: None,
            agents: agents.as_reader(),
            secrets,
            reports: reports.as_reader(),
            agents_ready: ready.clone(),
            secrets_ready: ready,
        }])
    }

    #[test]
    fn a_cached_secret_keeps_its_role_owner_key_id_and_version_only() {
        let key = CachedSecret::of(&meta("pk-k3", l::COMPONENT_KEY, Some("kid-3")));
        assert_eq!(
            key,
            CachedSecret {
                resource_version: Some("7".into()),
                provisioning_key: Some("pk".into()),
                owner: Some(SecretOwner {
                    name: "pk".into(),
                    uid: "uid-1".into()
                }),
                role: SecretRole::Key {
                    kid: Some("kid-3".into())
                },
            }
        );
        assert_eq!(key.owner_ref("ns"), Some(ObjectRef::new("pk").within("ns")));
        let agent = CachedSecret::of(&meta("pk-agent", l::COMPONENT_AGENT_SECRET, None));
        assert_eq!(agent.role, SecretRole::AgentSecret);
        let mut foreign = meta("x", "something", None);
        if let Some(o) = foreign.owner_references.as_mut() {
            o[0].kind = "Deployment".into();
        }
        let foreign = CachedSecret::of(&foreign);
        assert_eq!((foreign.role, foreign.owner), (SecretRole::Other, None));
    }

    #[test]
    fn key_seqs_and_key_ids_are_read_from_the_compact_cache() {
        let mut other_uid = meta("pk-k9", l::COMPONENT_KEY, Some("kid-9"));
        if let Some(o) = other_uid.owner_references.as_mut() {
            o[0].uid = "uid-old".into();
        }
        let mut elsewhere = meta("pk-k4", l::COMPONENT_KEY, Some("kid-4"));
        elsewhere.namespace = Some("other".into());
        let c = caches(vec![
            meta("pk-k1", l::COMPONENT_KEY, Some("kid-1")),
            meta("pk-k2", l::COMPONENT_KEY, Some("kid-2")),
            meta("pk-agent", l::COMPONENT_AGENT_SECRET, None),
            other_uid,
            elsewhere,
        ]);
        assert_eq!(c.key_seqs("ns", "pk", "uid-1"), BTreeSet::from([1, 2]));
        assert_eq!(c.key_seqs("ns", "pk", "uid-old"), BTreeSet::from([9]));
        assert_eq!(c.key_seqs("ns", "other-pk", "uid-1"), BTreeSet::new());
        assert_eq!(c.key_seqs("other", "pk", "uid-1"), BTreeSet::from([4]));
        // What this process minted counts until the watch shows it.
        c.minted("uid-1", 3);
        assert_eq!(c.key_seqs("ns", "pk", "uid-1"), BTreeSet::from([1, 2, 3]));
        assert_eq!(
            c.key_secret_with_kid("ns", "pk", "kid-2").as_deref(),
            Some("pk-k2")
        );
        assert_eq!(c.key_secret_with_kid("ns", "pk", "kid-4"), None);
        assert_eq!(c.key_secret_with_kid("ns", "other-pk", "kid-1"), None);
    }

    #[test]
    fn an_object_older_than_our_own_write_is_unseen_until_the_watch_catches_up() {
        let own = OwnWrites::default();
        let at = |rv: &str| ObjectMeta {
            name: Some("pk".into()),
            namespace: Some("ns".into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        // Nothing written: nothing unseen.
        assert!(!own.unseen(&at("5")));
        own.wrote(&at("10"));
        // The cache still holds the object before our write.
        assert!(own.unseen(&at("9")));
        assert!(own.unseen(&at("9")), "asking does not forget");
        // The echo itself is seen, and forgotten then (a status write's echo never reaches the
        // watch's echo filter, which would forget it otherwise).
        assert!(
            own.echo(&at("10")),
            "the echo filter sees an annotation write's echo"
        );
        own.wrote(&at("10"));
        assert!(!own.unseen(&at("10")));
        assert!(!own.echo(&at("10")), "forgotten once seen");
        // A later object (the echo coalesced into a relist) forgets the write.
        own.wrote(&at("20"));
        assert!(!own.unseen(&at("25")));
        assert!(!own.unseen(&at("19")), "forgotten once passed");
        // Opaque (non-numeric) versions: only equality counts.
        own.wrote(&at("abc"));
        assert!(own.unseen(&at("abd")));
    }
}
