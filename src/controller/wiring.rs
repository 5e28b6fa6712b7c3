//! The wiring of the controllers: per watched scope, the watches that fill the caches and
//! route wake-ups (including deletions, which shared subscriptions do not carry), and the two
//! controllers that run the reconciles.

use std::future::Future;
use std::sync::Arc;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::utils::Predicate;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch::{Receiver, Sender};

use super::backoff::Outage;
use super::caches::{CachedSecret, OwnWrites, ScopeCaches, SecretCache, SecretRole, SecretWriter};
use super::{Context, Error, Result, backoff, policy_agent, provisioning_key};
use crate::api::policy_agent::WorkloadKind;
use crate::api::{KeyUsageReport, PolicyAgent, ProvisioningKey};
use crate::labels;
use crate::metrics::{ControllerKind, Metrics};

/// One future of the running operator (a watch or a controller).
pub(super) type Run = BoxFuture<'static, ()>;

/// The writers of one scope's caches, and the senders of their readiness.
pub(super) struct ScopeWriters {
    agents: Writer<PolicyAgent>,
    secrets: SecretWriter,
    reports: Writer<PartialObjectMeta<KeyUsageReport>>,
    agents_ready: Sender<bool>,
    secrets_ready: Sender<bool>,
}

/// One scope's caches (what the reconciles read) and their writers (what its watches fill).
pub(super) fn scope_caches(ns: &Option<String>) -> (ScopeCaches, ScopeWriters) {
    let (agents, agents_writer) = reflector::store_shared::<PolicyAgent>(SHARED_BUFFER);
    let secrets = SecretCache::default();
    let secrets_writer = SecretWriter::new(secrets.clone());
    let (reports, reports_writer) = reflector::store::<PartialObjectMeta<KeyUsageReport>>();
    let (agents_ready_tx, agents_ready) = tokio::sync::watch::channel(false);
    let (secrets_ready_tx, secrets_ready) = tokio::sync::watch::channel(false);
    let caches = ScopeCaches {
        namespace: ns.clone(),
        agents,
        secrets,
        reports,
        agents_ready,
        secrets_ready,
    };
    let writers = ScopeWriters {
        agents: agents_writer,
        secrets: secrets_writer,
        reports: reports_writer,
        agents_ready: agents_ready_tx,
        secrets_ready: secrets_ready_tx,
    };
    (caches, writers)
}

/// What every watch of one scope is wired with.
struct Scope<S> {
    client: Client,
    ns: Option<String>,
    /// The shutdown signal (shared): every watch ends, every controller drains, on it.
    stop: S,
    /// Only Keyward-labelled Secrets and ConfigMaps are watched, never every Secret.
    owned: watcher::Config,
    /// Wake-ups routed by hand, because they include deletions (a deleted agent Secret is
    /// re-created; a deleted PolicyAgent no longer holds back a revocation), which shared
    /// subscriptions do not carry.
    to_pk: UnboundedSender<ObjectRef<ProvisioningKey>>,
    to_pa: UnboundedSender<ObjectRef<PolicyAgent>>,
    /// Whether the API server answers (every watch reports to it).
    outage: Arc<Outage>,
}

/// Wires one scope: its watches and its two controllers, in the order they are run. Also
/// returns the receiver of the ProvisioningKey list's completion; `None` when the shared
/// PolicyAgent stream is unavailable.
pub(super) fn scope<S>(
    client: &Client,
    ns: &Option<String>,
    ctx: &Arc<Context>,
    (writers, cache): (ScopeWriters, ScopeCaches),
    stop: S,
    config: &controller::Config,
) -> Option<(Vec<Run>, Receiver<bool>)>
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let Some(agents_sub) = writers.agents.subscribe() else {
        tracing::error!("shared PolicyAgent stream unavailable");
        return None;
    };
    let (pk_tx, pk_rx) = futures::channel::mpsc::unbounded::<ObjectRef<ProvisioningKey>>();
    let (pa_tx, pa_rx) = futures::channel::mpsc::unbounded::<ObjectRef<PolicyAgent>>();
    let sc = Scope {
        client: client.clone(),
        ns: ns.clone(),
        stop,
        owned: watcher::Config::default().labels(labels::MANAGED_SELECTOR),
        to_pk: pk_tx,
        to_pa: pa_tx,
        outage: ctx.outage.clone(),
    };
    let own_writes = ctx.own_writes.clone();
    let mut runs = vec![
        labelled_secrets(
            &sc,
            writers.secrets,
            writers.secrets_ready,
            cache.agents.clone(),
            own_writes.clone(),
        ),
        policy_agents(&sc, writers.agents, writers.agents_ready),
        usage_reports(&sc, writers.reports, cache.agents.clone()),
        trust_bundles(&sc, own_writes),
    ];
    runs.push(recovery(&sc, ctx));
    let (keys, keys_ready) = key_controller(&sc, ctx, pk_rx, config);
    runs.push(keys);
    runs.push(agent_controller(
        &sc,
        ctx,
        (agents_sub, cache.agents.clone()),
        pa_rx,
        config,
    ));
    Some((runs, keys_ready))
}

/// Labelled Secrets, watched as metadata and cached as [`CachedSecret`]s: a change wakes the
/// ProvisioningKey controlling the Secret (unless it is this process's own write) and the
/// PolicyAgents using it; a relist wakes only what changed (see [`SecretWriter`]).
fn labelled_secrets<S>(
    sc: &Scope<S>,
    mut writer: SecretWriter,
    ready: Sender<bool>,
    agents_store: Store<PolicyAgent>,
    own_writes: OwnWrites,
) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let (to_pk, to_pa) = (sc.to_pk.clone(), sc.to_pa.clone());
    watch(
        scoped::<PartialObjectMeta<Secret>>(&sc.client, &sc.ns),
        sc.owned.clone(),
        // The event is read into a `CachedSecret` and dropped: nothing to trim.
        |_| {},
        sc.stop.clone(),
        sc.outage.clone(),
    )
    .for_each(move |ev| {
        if let Ok(ev) = ev {
            writer.apply(&ev, |ns, name, s| {
                if let Some(pk) = s.owner_ref(ns)
                    && !own_writes.echo_of(ns, name, s.resource_version.as_deref())
                {
                    let _ = to_pk.unbounded_send(pk);
                }
                for pa in agents_of_secret(&agents_store, ns, s) {
                    let _ = to_pa.unbounded_send(pa);
                }
            });
            // After the list is swapped in, as the reflector's store did.
            if matches!(ev, watcher::Event::InitDone) {
                ready.send_replace(true);
            }
        }
        futures::future::ready(())
    })
    .boxed()
}

/// PolicyAgents, cached in full (the stream is shared with their controller): a change wakes
/// the ProvisioningKey it references.
fn policy_agents<S>(sc: &Scope<S>, writer: Writer<PolicyAgent>, ready: Sender<bool>) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let to_pk = sc.to_pk.clone();
    let mut relist = Relist::new(writer.as_reader());
    reflector(
        writer,
        watch(
            scoped::<PolicyAgent>(&sc.client, &sc.ns),
            watcher::Config::default(),
            slim,
            sc.stop.clone(),
            sc.outage.clone(),
        ),
    )
    .for_each(move |ev| {
        if let Ok(ev) = ev {
            if matches!(ev, watcher::Event::InitDone) {
                ready.send_replace(true);
            }
            relist.touched(&ev, |pa| {
                if let Some(ns) = pa.meta().namespace.clone() {
                    let _ = to_pk.unbounded_send(
                        ObjectRef::new(&pa.spec.provisioning_key_ref.name).within(&ns),
                    );
                }
            });
        }
        futures::future::ready(())
    })
    .boxed()
}

/// Verifier usage reports: names cached; a new or changed report wakes its key (status
/// lastUsedAt, revokeWhenUnusedFor) and the PolicyAgents using that key (acknowledgement).
fn usage_reports<S>(
    sc: &Scope<S>,
    writer: Writer<PartialObjectMeta<KeyUsageReport>>,
    agents_store: Store<PolicyAgent>,
) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let (to_pk, to_pa) = (sc.to_pk.clone(), sc.to_pa.clone());
    let mut relist = Relist::new(writer.as_reader());
    reflector(
        writer,
        watch(
            scoped::<PartialObjectMeta<KeyUsageReport>>(&sc.client, &sc.ns),
            sc.owned.clone(),
            slim,
            sc.stop.clone(),
            sc.outage.clone(),
        ),
    )
    .for_each(move |ev| {
        if let Ok(ev) = ev {
            relist.touched(&ev, |r| {
                if let Some(ns) = r.metadata.namespace.clone()
                    && let Some(pk) = r.labels().get(labels::PROVISIONING_KEY).cloned()
                {
                    let _ = to_pk.unbounded_send(ObjectRef::new(&pk).within(&ns));
                    for pa in agents_store.state() {
                        if pa.meta().namespace.as_deref() == Some(ns.as_str())
                            && pa.spec.provisioning_key_ref.name == pk
                        {
                            let _ = to_pa.unbounded_send(ObjectRef::from_obj(&*pa));
                        }
                    }
                }
            });
        }
        futures::future::ready(())
    })
    .boxed()
}

/// Trust bundles (labelled ConfigMaps): wake-ups only, no store.
fn trust_bundles<S>(sc: &Scope<S>, own_writes: OwnWrites) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let to_pk = sc.to_pk.clone();
    let mut versions = BundleVersions::default();
    watch(
        scoped::<PartialObjectMeta<ConfigMap>>(&sc.client, &sc.ns),
        sc.owned.clone(),
        slim,
        sc.stop.clone(),
        sc.outage.clone(),
    )
    .for_each(move |ev| {
        if let Ok(ev) = ev {
            for (pk, meta) in versions.touched(&ev) {
                if meta.is_none_or(|m| !own_writes.echo(m)) {
                    let _ = to_pk.unbounded_send(pk);
                }
            }
        }
        futures::future::ready(())
    })
    .boxed()
}

/// The ProvisioningKey controller of one scope, and the receiver of its list's completion.
fn key_controller<S>(
    sc: &Scope<S>,
    ctx: &Arc<Context>,
    wake: UnboundedReceiver<ObjectRef<ProvisioningKey>>,
    config: &controller::Config,
) -> (Run, Receiver<bool>)
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let (pk_store, pk_writer) = reflector::store::<ProvisioningKey>();
    let (pk_ready, pk_ready_rx) = tokio::sync::watch::channel(false);
    let pk_stream = reflector(
        pk_writer,
        watch(
            scoped::<ProvisioningKey>(&sc.client, &sc.ns),
            watcher::Config::default(),
            slim_pk,
            sc.stop.clone(),
            sc.outage.clone(),
        ),
    )
    .inspect(key_gauges_follow_watch(
        ctx.metrics.clone(),
        pk_store.clone(),
        sc.ns.clone(),
        pk_ready,
    ))
    .applied_objects()
    // A ProvisioningKey is reconciled when its spec (generation) or annotations (a rotation
    // request) change, not on its own status writes.
    .predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    )
    // Nor on the echo of its own trust-record write: the reconcile that wrote it goes on. The
    // predicate has seen the new annotations first, so the next event compares against them.
    .try_filter({
        let own = ctx.own_records.clone();
        move |pk| futures::future::ready(!own.echo(pk.meta()))
    });
    let keys = Controller::for_stream(pk_stream, pk_store)
        .with_config(config.clone())
        .trigger_backoff(backoff::NoPause)
        .reconcile_on(wake)
        .graceful_shutdown_on(sc.stop.clone())
        .run(
            |pk, ctx| {
                timed(
                    ControllerKind::ProvisioningKey,
                    ctx.clone(),
                    provisioning_key::reconcile(pk, ctx),
                )
            },
            backoff::error_policy,
            ctx.clone(),
        )
        .for_each(log_result);
    (keys.boxed(), pk_ready_rx)
}

/// After an outage (the first watch event after a watch failed): clears every object's backoff
/// and requeues this scope's objects whose reconcile failed, at once, instead of letting each
/// wait out its pending retry delay (up to a minute).
fn recovery<S>(sc: &Scope<S>, ctx: &Arc<Context>) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let mut back = ctx.outage.subscribe();
    let (ctx, ns, stop) = (ctx.clone(), sc.ns.clone(), sc.stop.clone());
    let (to_pk, to_pa) = (sc.to_pk.clone(), sc.to_pa.clone());
    async move {
        let requeue = async move {
            loop {
                match back.recv().await {
                    Ok(()) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
                let failed = ctx.backoff.recover(&ns);
                tracing::info!(namespace = ?ns, requeued = failed.len(), "requeueing the objects whose reconcile failed during the outage");
                for f in failed {
                    let ns = f.namespace.as_deref();
                    if f.kind == ProvisioningKey::kind(&()) {
                        let r = ObjectRef::<ProvisioningKey>::new(&f.name);
                        let _ = to_pk.unbounded_send(match ns {
                            Some(n) => r.within(n),
                            None => r,
                        });
                    } else if f.kind == PolicyAgent::kind(&()) {
                        let r = ObjectRef::<PolicyAgent>::new(&f.name);
                        let _ = to_pa.unbounded_send(match ns {
                            Some(n) => r.within(n),
                            None => r,
                        });
                    }
                }
            }
        };
        tokio::select! {
            () = requeue => {}
            () = stop => {}
        }
    }
    .boxed()
}

/// The PolicyAgent controller of one scope, on the shared PolicyAgent stream.
fn agent_controller<S>(
    sc: &Scope<S>,
    ctx: &Arc<Context>,
    (agents_sub, store): (reflector::ReflectHandle<PolicyAgent>, Store<PolicyAgent>),
    wake: UnboundedReceiver<ObjectRef<PolicyAgent>>,
    config: &controller::Config,
) -> Run
where
    S: Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let (client, ns, stop) = (&sc.client, &sc.ns, &sc.stop);
    Controller::for_shared_stream(agents_sub, store.clone())
        .with_config(config.clone())
        .trigger_backoff(backoff::NoPause)
        // An agent Secret that changes (a new key handed out) wakes the PolicyAgents using it.
        .reconcile_on(wake)
        // A workload that changes (rollout progress, scaling, someone else's edit) wakes
        // the PolicyAgent naming it. Metadata suffices: every change bumps its
        // resourceVersion, and the reconcile reads the workload itself by GET.
        .watches_stream(
            workload_changes::<Deployment>(client, ns, stop.clone(), sc.outage.clone()),
            workload_mapper::<Deployment>(&store, WorkloadKind::Deployment),
        )
        .watches_stream(
            workload_changes::<StatefulSet>(client, ns, stop.clone(), sc.outage.clone()),
            workload_mapper::<StatefulSet>(&store, WorkloadKind::StatefulSet),
        )
        .watches_stream(
            workload_changes::<DaemonSet>(client, ns, stop.clone(), sc.outage.clone()),
            workload_mapper::<DaemonSet>(&store, WorkloadKind::DaemonSet),
        )
        .graceful_shutdown_on(stop.clone())
        .run(
            |pa, ctx| {
                timed(
                    ControllerKind::PolicyAgent,
                    ctx.clone(),
                    policy_agent::reconcile(pa, ctx),
                )
            },
            backoff::error_policy,
            ctx.clone(),
        )
        .for_each(log_result)
        .boxed()
}

async fn log_result<T: std::fmt::Debug, E: std::fmt::Display>(res: std::result::Result<T, E>) {
    match res {
        Ok(obj) => tracing::debug!(object = ?obj, "reconciled"),
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

/// Runs one reconcile and records it in the metrics (count, duration, error reason).
async fn timed(
    kind: ControllerKind,
    ctx: Arc<Context>,
    reconcile: impl std::future::Future<Output = Result<Action>>,
) -> Result<Action> {
    let start = std::time::Instant::now();
    let res = reconcile.await;
    ctx.metrics
        .reconciled(kind, start.elapsed(), res.as_ref().err().map(Error::reason));
    res
}

/// An `Api` for one namespace, or for all.
pub(super) fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Maps a workload (its metadata) to the PolicyAgents that name it.
fn workload_mapper<K: Resource>(
    store: &Store<PolicyAgent>,
    kind: WorkloadKind,
) -> impl Fn(PartialObjectMeta<K>) -> Vec<ObjectRef<PolicyAgent>> + Send + Sync + Clone + 'static {
    let store = store.clone();
    move |w: PartialObjectMeta<K>| {
        let ns = w.metadata.namespace.clone();
        let name = w.metadata.name.clone();
        store
            .state()
            .into_iter()
            .filter(|pa| {
                pa.meta().namespace == ns
                    && pa.spec.workload_ref.kind == kind
                    && Some(&pa.spec.workload_ref.name) == name.as_ref()
            })
            .map(|pa| ObjectRef::from_obj(&*pa))
            .collect()
    }
}

/// What a secondary watch's event wakes, across relists. After a watch restart (an API server
/// restart, a 410) the watcher lists every object again. An object listed at the
/// resourceVersion the cache already holds did not change while the watch was down: it wakes
/// nothing (a relist used to wake every ProvisioningKey, so after an outage a thousand
/// reconciles queued ahead of the first key that needed one). An object the cache held that
/// the relist no longer lists was deleted meanwhile: it wakes its owners, as a delete does.
///
/// `touched` runs after the reflector applied the event: during a relist, kube-runtime's store
/// still serves the previous list (the new one is buffered until `InitDone`).
pub(crate) struct Relist<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash,
{
    cache: Store<K>,
    /// The objects the cache held when the relist began.
    before: Option<Vec<Arc<K>>>,
}

impl<K> Relist<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    pub(crate) fn new(cache: Store<K>) -> Self {
        Relist {
            cache,
            before: None,
        }
    }

    /// Calls `wake` with each object whose owners event `ev` must wake.
    pub(crate) fn touched(&mut self, ev: &watcher::Event<K>, mut wake: impl FnMut(&K)) {
        match ev {
            watcher::Event::Apply(o) | watcher::Event::Delete(o) => wake(o),
            watcher::Event::Init => self.before = Some(self.cache.state()),
            watcher::Event::InitApply(o) => {
                let rv = o.meta().resource_version.as_ref();
                let held = self.cache.get(&ObjectRef::from_obj(o));
                if rv.is_none() || held.is_none_or(|h| h.meta().resource_version.as_ref() != rv) {
                    wake(o);
                }
            }
            watcher::Event::InitDone => {
                for o in self.before.take().unwrap_or_default() {
                    if self.cache.get(&ObjectRef::from_obj(&*o)).is_none() {
                        wake(&o);
                    }
                }
            }
        }
    }
}

/// [`Relist`] for the trust bundles, which have no cache: the resourceVersion and owning
/// ProvisioningKey of each, by namespace/name (about 100 bytes a key).
#[derive(Default)]
struct BundleVersions {
    seen: std::collections::HashMap<String, (String, ObjectRef<ProvisioningKey>)>,
    /// Names listed so far by the relist in progress.
    relisted: Option<std::collections::HashSet<String>>,
}

impl BundleVersions {
    /// The keys event `ev` wakes, each with the bundle's metadata when the event carries it
    /// (for the own-write check).
    fn touched<'e>(
        &mut self,
        ev: &'e watcher::Event<PartialObjectMeta<ConfigMap>>,
    ) -> Vec<(
        ObjectRef<ProvisioningKey>,
        Option<&'e kube::core::ObjectMeta>,
    )> {
        let key = |m: &PartialObjectMeta<ConfigMap>| {
            format!(
                "{}/{}",
                m.metadata.namespace.as_deref().unwrap_or(""),
                m.name_any()
            )
        };
        match ev {
            watcher::Event::Apply(cm) => self.record(key(cm), cm),
            watcher::Event::Delete(cm) => {
                self.seen.remove(&key(cm));
                owner_pk(cm)
                    .map(|pk| vec![(pk, Some(&cm.metadata))])
                    .unwrap_or_default()
            }
            watcher::Event::Init => {
                self.relisted = Some(std::collections::HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(cm) => {
                let k = key(cm);
                if let Some(r) = self.relisted.as_mut() {
                    r.insert(k.clone());
                }
                let rv = cm.metadata.resource_version.clone();
                if rv.is_some() && self.seen.get(&k).map(|(v, _)| Some(v)) == Some(rv.as_ref()) {
                    return Vec::new();
                }
                self.record(k, cm)
            }
            watcher::Event::InitDone => {
                let listed = self.relisted.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .seen
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                gone.into_iter()
                    .filter_map(|k| self.seen.remove(&k))
                    .map(|(_, pk)| (pk, None))
                    .collect()
            }
        }
    }

    fn record<'e>(
        &mut self,
        k: String,
        cm: &'e PartialObjectMeta<ConfigMap>,
    ) -> Vec<(
        ObjectRef<ProvisioningKey>,
        Option<&'e kube::core::ObjectMeta>,
    )> {
        let Some(pk) = owner_pk(cm) else {
            return Vec::new();
        };
        self.seen.insert(
            k,
            (
                cm.metadata.resource_version.clone().unwrap_or_default(),
                pk.clone(),
            ),
        );
        vec![(pk, Some(&cm.metadata))]
    }
}

/// The ProvisioningKey controlling a labelled ConfigMap.
fn owner_pk<K>(s: &PartialObjectMeta<K>) -> Option<ObjectRef<ProvisioningKey>> {
    let ns = s.metadata.namespace.as_deref()?;
    s.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "ProvisioningKey")
        .map(|o| ObjectRef::new(&o.name).within(ns))
}

/// The PolicyAgents using an agent Secret of namespace `ns` (by its ProvisioningKey label).
fn agents_of_secret(
    store: &Store<PolicyAgent>,
    ns: &str,
    s: &CachedSecret,
) -> Vec<ObjectRef<PolicyAgent>> {
    if s.role != SecretRole::AgentSecret {
        return Vec::new();
    }
    let Some(pk) = s.provisioning_key.as_deref() else {
        return Vec::new();
    };
    store
        .state()
        .into_iter()
        .filter(|pa| {
            pa.meta().namespace.as_deref() == Some(ns) && pa.spec.provisioning_key_ref.name == pk
        })
        .map(|pa| ObjectRef::from_obj(&*pa))
        .collect()
}

/// Drops what no decision reads from a cache before an object is cached: `managedFields` and
/// kubectl's `last-applied-configuration` (often the largest parts of an object).
fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// A cached ProvisioningKey is a trigger, its spec and its trust record: the rest of status is
/// always read fresh (by `get_status`) before it is compared or written, so it is not kept. The
/// record (`status.trustRecord`, a few hundred bytes) is decided on like the spec; a reconcile
/// whose cached copy predates the operator's own last record write reads the object fresh
/// (`Context::own_records`).
fn slim_pk(pk: &mut ProvisioningKey) {
    slim(pk);
    pk.status = pk.status.take().and_then(|s| s.trust_record).map(|r| {
        crate::api::provisioning_key::ProvisioningKeyStatus {
            trust_record: Some(r),
            ..Default::default()
        }
    });
}

/// A watcher stream with backoff, trimmed by `trim` before anything caches it, ending at
/// `shutdown`.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: fn(&mut K),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    outage: Arc<Outage>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // Every failure and every event tells whether the API server answers (see `Outage`).
    backoff::watch_backoff(watcher::watcher(api, config), outage)
        .modify(trim)
        .take_until(shutdown)
}

/// Changes of one workload kind, as metadata (a wake-up: the reconcile reads the workload by
/// GET).
fn workload_changes<K>(
    client: &Client,
    ns: &Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    outage: Arc<Outage>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    watch(
        scoped::<PartialObjectMeta<K>>(client, ns),
        watcher::Config::default(),
        slim,
        shutdown,
        outage,
    )
    .touched_objects()
}

/// Buffer of a shared watch stream (events a slow subscriber may lag behind).
pub(super) const SHARED_BUFFER: usize = 1024;

/// Per-key gauges follow the ProvisioningKey watch of one scope: a deleted key's series are
/// removed, and after each complete list (a relist after a watch error included) the series of
/// keys the list no longer has. Also reports the list's completion (`ready`).
fn key_gauges_follow_watch(
    metrics: Metrics,
    store: Store<ProvisioningKey>,
    scope: Option<String>,
    ready: tokio::sync::watch::Sender<bool>,
) -> impl FnMut(&Result<watcher::Event<ProvisioningKey>, watcher::Error>) {
    move |ev| match ev {
        Ok(watcher::Event::Delete(pk)) => {
            if let (Some(ns), Some(name)) =
                (pk.meta().namespace.as_deref(), pk.meta().name.as_deref())
            {
                metrics.remove_key(ns, name);
            }
        }
        Ok(watcher::Event::InitDone) => {
            // The reflector has applied the list before the event gets here.
            metrics.retain_keys(|ns, name| {
                scope.as_deref().is_some_and(|s| s != ns)
                    || store.get(&ObjectRef::new(name).within(ns)).is_some()
            });
            ready.send_replace(true);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;

    #[test]
    fn a_cached_provisioning_key_keeps_its_trust_record_and_no_other_status() {
        use crate::api::provisioning_key::ProvisioningKeyStatus;
        let mut pk = ProvisioningKey::new("k", Default::default());
        pk.status = Some(ProvisioningKeyStatus {
            phase: Some("Ready".into()),
            trust_record: Some("{}".into()),
            ..Default::default()
        });
        slim_pk(&mut pk);
        assert_eq!(
            pk.status,
            Some(ProvisioningKeyStatus {
                trust_record: Some("{}".into()),
                ..Default::default()
            })
        );
        pk.status = Some(ProvisioningKeyStatus {
            phase: Some("Ready".into()),
            ..Default::default()
        });
        slim_pk(&mut pk);
        assert_eq!(pk.status, None);
    }

    fn secret(name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            types: None,
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                resource_version: Some(rv.into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "keyward.dev/v1alpha1".into(),
                    kind: "ProvisioningKey".into(),
                    name: format!("pk-{name}"),
                    uid: "u".into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            _phantom: Default::default(),
        }
    }

    fn bundle(name: &str, rv: &str) -> PartialObjectMeta<ConfigMap> {
        let s = secret(name, rv);
        PartialObjectMeta {
            types: None,
            metadata: s.metadata,
            _phantom: Default::default(),
        }
    }

    /// Feeds `events` through a store and a [`Relist`] as the reflector does (store first);
    /// the names woken, in order.
    fn run(
        writer: &mut Writer<PartialObjectMeta<Secret>>,
        relist: &mut Relist<PartialObjectMeta<Secret>>,
        events: Vec<watcher::Event<PartialObjectMeta<Secret>>>,
    ) -> Vec<String> {
        let mut woken = Vec::new();
        for ev in events {
            writer.apply_watcher_event(&ev);
            relist.touched(&ev, |s| woken.push(s.name_any()));
        }
        woken
    }

    fn list(
        objs: Vec<PartialObjectMeta<Secret>>,
    ) -> Vec<watcher::Event<PartialObjectMeta<Secret>>> {
        let mut evs = vec![watcher::Event::Init];
        evs.extend(objs.into_iter().map(watcher::Event::InitApply));
        evs.push(watcher::Event::InitDone);
        evs
    }

    #[test]
    fn a_relist_wakes_only_what_changed_appeared_or_vanished_meanwhile() {
        let mut writer = Writer::<PartialObjectMeta<Secret>>::default();
        let mut relist = Relist::new(writer.as_reader());
        // The first list wakes everything.
        let first = run(
            &mut writer,
            &mut relist,
            list(vec![secret("a", "1"), secret("b", "2"), secret("c", "3")]),
        );
        assert_eq!(first, ["a", "b", "c"]);
        // Live events wake as before.
        let live = run(
            &mut writer,
            &mut relist,
            vec![watcher::Event::Apply(secret("a", "4"))],
        );
        assert_eq!(live, ["a"]);
        // After a watch restart: `a` unchanged, `b` changed, `c` deleted meanwhile, `d` new.
        let again = run(
            &mut writer,
            &mut relist,
            list(vec![secret("a", "4"), secret("b", "5"), secret("d", "6")]),
        );
        assert_eq!(again, ["b", "d", "c"]);
        // The cache holds the new list; a second identical relist wakes nothing.
        let idle = run(
            &mut writer,
            &mut relist,
            list(vec![secret("a", "4"), secret("b", "5"), secret("d", "6")]),
        );
        assert!(idle.is_empty(), "{idle:?}");
        // An object without a resourceVersion is never taken for unchanged.
        let mut no_rv = secret("a", "4");
        no_rv.metadata.resource_version = None;
        let woken = run(
            &mut writer,
            &mut relist,
            list(vec![no_rv, secret("b", "5"), secret("d", "6")]),
        );
        assert_eq!(woken, ["a"]);
    }

    /// The labelled-Secret cache keeps [`Relist`]'s semantics: the same events wake the same
    /// Secrets, in the same order, as a kube store with a [`Relist`] over it.
    #[test]
    fn the_compact_secret_cache_wakes_what_a_relist_over_a_store_wakes() {
        let mut store = Writer::<PartialObjectMeta<Secret>>::default();
        let mut relist = Relist::new(store.as_reader());
        let cache = SecretCache::default();
        let mut compact = SecretWriter::new(cache.clone());
        let mut no_rv = secret("a", "4");
        no_rv.metadata.resource_version = None;
        let steps = vec![
            list(vec![secret("a", "1"), secret("b", "2"), secret("c", "3")]),
            vec![watcher::Event::Apply(secret("a", "4"))],
            list(vec![secret("a", "4"), secret("b", "5"), secret("d", "6")]),
            list(vec![secret("a", "4"), secret("b", "5"), secret("d", "6")]),
            list(vec![no_rv, secret("b", "5"), secret("d", "6")]),
            vec![watcher::Event::Delete(secret("d", "7"))],
        ];
        let expected: [&[&str]; 6] = [
            &["a", "b", "c"],
            &["a"],
            &["b", "d", "c"],
            &[],
            &["a"],
            &["d"],
        ];
        for (events, expected) in steps.into_iter().zip(expected) {
            let by_store = run(&mut store, &mut relist, events.clone());
            let mut by_cache = Vec::new();
            for ev in &events {
                compact.apply(ev, |ns, name, s| {
                    assert_eq!(ns, "ns");
                    // Every one of these Secrets names its owner, as the store's would.
                    assert_eq!(
                        s.owner_ref(ns),
                        Some(ObjectRef::new(&format!("pk-{name}")).within("ns"))
                    );
                    by_cache.push(name.to_string());
                });
            }
            assert_eq!(by_store, expected);
            assert_eq!(by_cache, expected);
        }
        assert_eq!(cache.len(), 2, "a and b; d deleted");
    }

    /// During a relist the cache serves the previous list; `InitDone` swaps the new one in.
    #[test]
    fn the_compact_secret_cache_swaps_a_relist_in_at_init_done() {
        let cache = SecretCache::default();
        let mut w = SecretWriter::new(cache.clone());
        for ev in list(vec![secret("a", "1"), secret("b", "2")]) {
            w.apply(&ev, |_, _, _| {});
        }
        w.apply(&watcher::Event::Init, |_, _, _| {});
        w.apply(&watcher::Event::InitApply(secret("a", "3")), |_, _, _| {});
        let rv = |name: &str| {
            cache
                .get("ns", name)
                .and_then(|s| s.resource_version.map(String::from))
        };
        assert_eq!((rv("a"), rv("b")), (Some("1".into()), Some("2".into())));
        w.apply(&watcher::Event::InitDone, |_, _, _| {});
        assert_eq!((rv("a"), rv("b")), (Some("3".into()), None));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_bundle_relist_wakes_only_the_keys_whose_bundle_changed_or_vanished() {
        let mut v = BundleVersions::default();
        let names = |evs: Vec<watcher::Event<PartialObjectMeta<ConfigMap>>>,
                     v: &mut BundleVersions| {
            evs.iter()
                .flat_map(|e| v.touched(e).into_iter().map(|(pk, _)| pk.name))
                .collect::<Vec<_>>()
        };
        let list = |objs: Vec<PartialObjectMeta<ConfigMap>>| {
            let mut evs = vec![watcher::Event::Init];
            evs.extend(objs.into_iter().map(watcher::Event::InitApply));
            evs.push(watcher::Event::InitDone);
            evs
        };
        let first = names(list(vec![bundle("a", "1"), bundle("b", "2")]), &mut v);
        assert_eq!(first, ["pk-a", "pk-b"]);
        let again = names(list(vec![bundle("a", "1")]), &mut v);
        assert_eq!(again, ["pk-b"], "b vanished; a unchanged");
        let changed = names(list(vec![bundle("a", "7")]), &mut v);
        assert_eq!(changed, ["pk-a"]);
        let live = names(vec![watcher::Event::Delete(bundle("a", "8"))], &mut v);
        assert_eq!(live, ["pk-a"]);
        assert!(v.seen.is_empty());
    }
}
