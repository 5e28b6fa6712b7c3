//! The watches feeding the index: ProvisioningKeys (spec: audience, issuer, publishDelay,
//! bundle name; metadata: UID) and the Keyward-labelled trust-bundle ConfigMaps (labels,
//! owner references and data), in each watched namespace or all. A re-list replaces what the
//! index holds for that scope, so objects deleted while the watch was down disappear.

use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::Shared;
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

/// Runs every watch until the task is dropped.
pub async fn watch(client: Client, namespaces: Vec<String>, shared: Arc<Shared>) {
    let mut tasks = Vec::new();
    let pks = apis::<ProvisioningKey>(&client, &namespaces);
    let cms = apis::<ConfigMap>(&client, &namespaces);
    shared.expect_lists(pks.len() + cms.len());
    for (scope, api) in pks {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        tasks.push(tokio::spawn(follow(
            stream,
            scope,
            shared.clone(),
            |s: &Shared, scope, objs: &[ProvisioningKey]| s.update(|i| i.replace_keys(scope, objs)),
            |s: &Shared, pk: &ProvisioningKey| s.update(|i| i.apply_key(pk)),
            |s: &Shared, pk: &ProvisioningKey| s.update(|i| i.delete_key(pk)),
        )));
    }
    for (scope, api) in cms {
        let config = watcher::Config::default().labels(&bundle_selector());
        let stream = watcher(api, config).default_backoff();
        tasks.push(tokio::spawn(follow(
            stream,
            scope,
            shared.clone(),
            |s: &Shared, scope, objs: &[ConfigMap]| {
                for (cm, e) in s.update(|i| i.replace_bundles(scope, objs)) {
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

async fn follow<K, S>(
    stream: S,
    scope: Option<String>,
    shared: Arc<Shared>,
    replace: impl Fn(&Shared, Option<&str>, &[K]),
    apply: impl Fn(&Shared, &K),
    delete: impl Fn(&Shared, &K),
) where
    K: Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
{
    futures::pin_mut!(stream);
    let mut buffer: Option<Vec<K>> = None;
    let mut listed = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => buffer = Some(Vec::new()),
            Ok(watcher::Event::InitApply(o)) => buffer.get_or_insert_with(Vec::new).push(o),
            Ok(watcher::Event::InitDone) => {
                replace(
                    &shared,
                    scope.as_deref(),
                    &buffer.take().unwrap_or_default(),
                );
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
            Ok(watcher::Event::Apply(o)) => apply(&shared, &o),
            Ok(watcher::Event::Delete(o)) => delete(&shared, &o),
            Err(e) => warn!(error = %e, "watch failed; retrying with backoff"),
        }
    }
}
