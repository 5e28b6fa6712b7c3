//! The watches feeding the index: ProvisioningKeys (spec: audience, issuer, publishDelay,
//! bundle name; metadata: UID) and the Keyward-labelled trust-bundle ConfigMaps (labels,
//! owner references and data), in each watched namespace or all. A re-list replaces what the
//! index holds for that scope, so objects deleted while the watch was down disappear. A failed
//! watch is rebuilt and lists again (see `fresh`).

use std::sync::Arc;

use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::Shared;
use super::index::{bundle_entry, key_entry};
use crate::api::ProvisioningKey;
use crate::labels as l;

/// Selector of the trust-bundle ConfigMaps.
pub fn bundle_selector() -> String {
    format!(
        "{},{}={}",
        l::MANAGED_SELECTOR,
        l::COMPONENT,
        l::COMPONENT_TRUST_BUNDLE
    )
}

fn apis<K>(client: &Client, namespaces: &[String]) -> Vec<(Option<String>, Api<K>)>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        vec![(None, Api::all(client.clone()))]
    } else {
        namespaces
            .iter()
            .map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns)))
            .collect()
    }
}

/// First and longest wait before a failed watch is rebuilt.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs every watch until the task is dropped.
pub async fn watch(client: Client, namespaces: Vec<String>, shared: Arc<Shared>) {
    let mut tasks = Vec::new();
    let pks = apis::<ProvisioningKey>(&client, &namespaces);
    let cms = apis::<ConfigMap>(&client, &namespaces);
    shared.expect_lists(pks.len() + cms.len());
    for (scope, api) in pks {
        let slot = shared.freshness.register();
        tasks.push(tokio::spawn(follow(
            move || watcher(api.clone(), watcher::Config::default()),
            scope,
            slot,
            shared.clone(),
            key_entry,
            |s: &Shared, scope, keys| s.update(|i| i.replace_keys(scope, keys)),
            |s: &Shared, pk: &ProvisioningKey| s.update(|i| i.apply_key(pk)),
            |s: &Shared, pk: &ProvisioningKey| s.update(|i| i.delete_key(pk)),
        )));
    }
    for (scope, api) in cms {
        let slot = shared.freshness.register();
        tasks.push(tokio::spawn(follow(
            move || {
                watcher(
                    api.clone(),
                    watcher::Config::default().labels(&bundle_selector()),
                )
            },
            scope,
            slot,
            shared.clone(),
            bundle_entry,
            |s: &Shared, scope, bundles| {
                for (cm, e) in s.update(|i| i.replace_bundles(scope, bundles)) {
                    warn!(configmap = %cm, error = %e, "trust bundle ignored");
                }
            },
            |s: &Shared, cm: &ConfigMap| {
                if let Err(e) = s.update(|i| i.apply_bundle(cm)) {
                    warn!(configmap = %format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any()),
                          error = %e, "trust bundle ignored");
                }
            },
            |s: &Shared, cm: &ConfigMap| s.update(|i| i.delete_bundle(cm)),
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Follows one watch. After an error the watch is dropped and built again (after a capped,
/// jittered backoff), so that it lists afresh: a view is confirmed only by a complete list or
/// by an event, never assumed after a silent re-watch. A list is buffered as `reduce` makes
/// each object (what the index keeps of it), never as whole objects.
#[allow(clippy::too_many_arguments)]
async fn follow<K, C, S>(
    make: impl Fn() -> S,
    scope: Option<String>,
    slot: usize,
    shared: Arc<Shared>,
    reduce: impl Fn(&K) -> C,
    replace: impl Fn(&Shared, Option<&str>, Vec<C>),
    apply: impl Fn(&Shared, &K),
    delete: impl Fn(&Shared, &K),
) where
    K: Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    let mut listed = false;
    let mut retry = RETRY_FIRST;
    loop {
        let stream = make();
        futures::pin_mut!(stream);
        let mut buffer: Option<Vec<C>> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => buffer = Some(Vec::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    buffer.get_or_insert_with(Vec::new).push(reduce(&o));
                }
                Ok(watcher::Event::InitDone) => {
                    replace(&shared, scope.as_deref(), buffer.take().unwrap_or_default());
                    shared.freshness.confirmed(slot);
                    retry = RETRY_FIRST;
                    if !listed {
                        listed = true;
                        shared.listed();
                        let usable = shared.update(|i| i.usable());
                        info!(
                            scope = scope.as_deref().unwrap_or("all namespaces"),
                            usable, "listed"
                        );
                    }
                }
                Ok(watcher::Event::Apply(o)) => {
                    apply(&shared, &o);
                    shared.freshness.confirmed(slot);
                }
                Ok(watcher::Event::Delete(o)) => {
                    delete(&shared, &o);
                    shared.freshness.confirmed(slot);
                }
                Err(e) => {
                    shared.freshness.failed(slot, Instant::now());
                    warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "watch failed; listing again");
                    break;
                }
            }
        }
        tokio::time::sleep(jittered(retry)).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// `d` plus up to a quarter of it, at random.
fn jittered(d: Duration) -> Duration {
    use rand::Rng as _;
    let quarter = u64::try_from(d.as_millis() / 4).unwrap_or(0);
    d + Duration::from_millis(rand::thread_rng().gen_range(0..=quarter))
}
