//! Copies of the trust bundle in other namespaces (`spec.trustBundle.namespaceSelector`): the
//! reads, the writes and the finalizer around [`crate::bundle_copy`] (the pure part).
//!
//! Only a key with a selector (or with the finalizer of one it had) costs anything here: a LIST
//! of namespaces by the selector, a LIST of its copies by label, and a GET of the source bundle.
//! A settled key writes nothing (each copy is compared with what it should hold). Namespaces are
//! not watched: a key with a selector is looked at again every `--bundle-copy-resync` (60 s),
//! which bounds how long a newly labelled namespace waits for its copy, and how long a copy
//! someone edited stays edited. In namespaced mode (`--namespaces`) only watched namespaces get copies.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::super::{Context, FIELD_MANAGER, Result};
use super::object_key;
use crate::api::ProvisioningKey;
use crate::bundle_copy::{self, COPY_OF_UID, FINALIZER, Held};

fn selector(
    pk: &ProvisioningKey,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector> {
    pk.spec.trust_bundle.as_ref()?.namespace_selector.as_ref()
}

fn has_finalizer(pk: &ProvisioningKey) -> bool {
    pk.finalizers().iter().any(|f| f == FINALIZER)
}

/// Brings the copies to what the selector asks for; the delay before looking again.
pub(super) async fn sync(ctx: &Context, pk: &ProvisioningKey) -> Result<Option<Duration>> {
    let Some(sel) = selector(pk) else {
        if has_finalizer(pk) {
            // The selector was removed: the copies go, then the finalizer.
            remove_all(ctx, pk).await?;
            set_finalizer(ctx, pk, false).await?;
        }
        return Ok(None);
    };
    let (ns, name) = object_key(pk)?;
    if !has_finalizer(pk) {
        ctx.ensure_leading()?;
        set_finalizer(ctx, pk, true).await?;
    }
    let source = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&pk.trust_bundle_name())
        .await?;
    let Some(want) = source.as_ref().and_then(|s| bundle_copy::copy_data(pk, s)) else {
        // Nothing trustworthy to copy yet (no record, no bundle): look again soon.
        return Ok(Some(ctx.config.copy_resync));
    };
    let selected = selected_namespaces(ctx, &ns, sel).await?;
    let held = held(ctx, pk, &selected).await?;
    let changes = bundle_copy::changes(&ns, &selected, &held, &want);
    let cm_name = pk.trust_bundle_name();
    for target in &changes.write {
        ctx.ensure_leading()?;
        let copy = bundle_copy::copy_object(pk, target, want.clone());
        Api::<ConfigMap>::namespaced(ctx.client.clone(), target)
            .patch(
                &cm_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&copy),
            )
            .await?;
        info!(pk = %name, namespace = %target, configmap = %cm_name, "trust bundle copied");
    }
    for target in &changes.delete {
        delete_copy(ctx, pk, target).await?;
    }
    for target in &changes.blocked {
        warn!(pk = %name, namespace = %target, configmap = %cm_name,
              "BundleCopyBlocked: a ConfigMap of that name that is not this key's copy exists; it is left alone");
    }
    Ok(Some(ctx.config.copy_resync))
}

/// On deletion: the copies go, then the finalizer (the key's own objects are garbage-collected).
pub(super) async fn finalize(ctx: &Context, pk: &ProvisioningKey) -> Result<()> {
    if !has_finalizer(pk) {
        return Ok(());
    }
    ctx.ensure_leading()?;
    remove_all(ctx, pk).await?;
    set_finalizer(ctx, pk, false).await
}

/// The namespaces the selector matches (within the watched ones in namespaced mode).
async fn selected_namespaces(
    ctx: &Context,
    source_ns: &str,
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> Result<BTreeSet<String>> {
    // Only namespaces that accept this source's copies (a label only who may edit namespaces
    // sets), and that the selector matches (`{}`: every one that accepts).
    let accept = format!("{}=true", bundle_copy::accept_label(source_ns));
    let empty = sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty());
    let labels = match super::super::workloads::selector_string(sel) {
        Some(s) => format!("{s},{accept}"),
        None if empty => accept,
        // An operator the API does not know: nothing is selected.
        None => return Ok(BTreeSet::new()),
    };
    let list = Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&ListParams::default().labels(&labels))
        .await?;
    let watched = &ctx.config.namespaces;
    Ok(list
        .items
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| n.metadata.name)
        .filter(|n| watched.is_empty() || watched.contains(n))
        .collect())
}

/// What each namespace holds: our copies (by label) and, where a copy is wanted, anything else
/// under the copy's name.
async fn held(
    ctx: &Context,
    pk: &ProvisioningKey,
    selected: &BTreeSet<String>,
) -> Result<BTreeMap<String, Held>> {
    let uid = pk.metadata.uid.clone().unwrap_or_default();
    let lp = ListParams::default().labels(&format!("{COPY_OF_UID}={uid}"));
    let mut held = BTreeMap::new();
    let copies: Vec<ConfigMap> = if ctx.config.namespaces.is_empty() {
        Api::<ConfigMap>::all(ctx.client.clone())
            .list(&lp)
            .await?
            .items
    } else {
        let mut all = Vec::new();
        for ns in &ctx.config.namespaces {
            all.extend(
                Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
                    .list(&lp)
                    .await?
                    .items,
            );
        }
        all
    };
    let cm_name = pk.trust_bundle_name();
    for c in copies.into_iter().filter(|c| c.name_any() == cm_name) {
        if let Some(ns) = c.namespace() {
            held.insert(ns, Held::Copy(c.data.unwrap_or_default()));
        }
    }
    // A wanted namespace without our copy: is the name someone else's?
    let missing: Vec<&String> = selected.iter().filter(|n| !held.contains_key(*n)).collect();
    for ns in missing {
        if Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
            .get_metadata_opt(&cm_name)
            .await?
            .is_some()
        {
            held.insert(ns.clone(), Held::Foreign);
        }
    }
    Ok(held)
}

async fn delete_copy(ctx: &Context, pk: &ProvisioningKey, target: &str) -> Result<()> {
    ctx.ensure_leading()?;
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), target);
    let cm_name = pk.trust_bundle_name();
    // Only our copy, as read: the label is checked on the object the uid names.
    let Some(cm) = api.get_metadata_opt(&cm_name).await? else {
        return Ok(());
    };
    let ours = cm.labels().get(COPY_OF_UID) == pk.metadata.uid.as_ref();
    if !ours {
        return Ok(());
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: cm.metadata.uid.clone(),
            resource_version: cm.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    match api.delete(&cm_name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    info!(pk = %pk.name_any(), namespace = %target, configmap = %cm_name, "trust bundle copy removed");
    Ok(())
}

async fn remove_all(ctx: &Context, pk: &ProvisioningKey) -> Result<()> {
    let held = held(ctx, pk, &BTreeSet::new()).await?;
    for (ns, h) in held {
        if matches!(h, Held::Copy(_)) {
            delete_copy(ctx, pk, &ns).await?;
        }
    }
    Ok(())
}

/// Adds or removes the finalizer.
async fn set_finalizer(ctx: &Context, pk: &ProvisioningKey, on: bool) -> Result<()> {
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let current: Vec<String> = pk.finalizers().to_vec();
    let mut next: Vec<String> = current
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if on {
        next.push(FINALIZER.to_string());
    }
    if next == current {
        return Ok(());
    }
    // A merge patch replaces the list whole; the resourceVersion makes it fail (409, retried)
    // if anyone changed the object since it was read, so no other finalizer is lost.
    let patch = json!({
        "metadata": {
            "resourceVersion": pk.metadata.resource_version,
            "finalizers": next,
        }
    });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}
