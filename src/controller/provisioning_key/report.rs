//! The report phase: status (only when it changed), Events and metrics. What to report is
//! decided in `rotation::outcome`; this module only writes it.

use chrono::{DateTime, Utc};
use kube::Api;
use kube::Resource;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::audit::{self, Audit};
use super::super::{Context, Error, FIELD_MANAGER, Result};
use super::object_key;
use crate::api::conditions;
use crate::api::provisioning_key::{ProvisioningKey, ProvisioningKeyStatus};
use crate::metrics::{Metrics, RotationResult};
use crate::rotation::outcome::{
    self, Counted, Minted, Trail, cond, desired_status, key_gauges, step_audits, step_counts,
};
use crate::rotation::snapshot::Read;
use crate::rotation::{Plan, Step};

/// Records an applied step: its audit Events (through the reconcile's `trail`, which may hold
/// a first key's Event for its hand-out), then its counters.
pub(super) async fn applied(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    step: &Step,
    minted: Option<&Minted>,
    trail: &mut Trail,
) {
    record(
        ctx,
        pk,
        trail.after(step, step_audits(pk, read, step, minted)),
    )
    .await;
    for count in step_counts(read, step, minted.is_some()) {
        record_count(&ctx.metrics, count);
    }
}

/// Records audit Events about `pk`.
pub(super) async fn record(ctx: &Context, pk: &ProvisioningKey, facts: Vec<Audit<'_>>) {
    let regarding = pk.object_ref(&());
    for fact in facts {
        audit::record(ctx, &regarding, fact).await;
    }
}

/// One counter increment.
fn record_count(metrics: &Metrics, count: Counted) {
    match count {
        Counted::Rotation(trigger, result) => metrics.rotation(trigger, result),
        Counted::Revocation { emergency } => metrics.revocation(emergency),
        Counted::Lifecycle(kind) => metrics.key_lifecycle(kind),
        Counted::BundleTampered => metrics.bundle_tampered(),
    }
}

async fn write_status(
    ctx: &Context,
    pk: &ProvisioningKey,
    status: &ProvisioningKeyStatus,
) -> Result<bool> {
    if pk.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let body = json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "status": status,
    });
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    // A status write that carried a first trust record: a reconcile woken before the watch
    // cache shows it reads the object again (see `Context::own_records`).
    if pk.status.as_ref().and_then(|s| s.trust_record.as_ref()) != status.trust_record.as_ref() {
        ctx.own_records.wrote(written.meta());
    }
    Ok(true)
}

/// `pk` with its status as the API server has it now (spec and metadata unchanged: those the plan
/// was made from). The object a reconcile gets comes from the watch cache, which may not show
/// this operator's own last status write yet; comparing against that stale copy re-sent an
/// identical status (a wasted write on a settled object) and could reset `lastTransitionTime`.
async fn with_fresh_status(ctx: &Context, pk: &ProvisioningKey) -> Result<ProvisioningKey> {
    let (ns, name) = object_key(pk)?;
    let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
    let fresh = api.get_status(&name).await?;
    let mut pk = pk.clone();
    pk.status = fresh.status;
    Ok(pk)
}

/// Writes the status of a settled reconcile (only when it changed), sets the key's gauges, and
/// records the Warnings of the status' transitions.
pub(super) async fn status_and_events(
    ctx: &Context,
    pk: &ProvisioningKey,
    read: &Read,
    plan: &Plan,
    now: DateTime<Utc>,
    first_status: bool,
) -> Result<()> {
    let obs = &read.observed;
    // A key this reconcile took from nothing has no status of ours to be stale about: its
    // first status is written without reading it again (one GET per new key).
    let pk = &if first_status {
        pk.clone()
    } else {
        with_fresh_status(ctx, pk).await?
    };
    let mut status = desired_status(pk, &read.settings, obs, plan, now);
    let previous = pk.status.clone().unwrap_or_default();
    // Uncovered consumers are only seen while a key is retiring; between rotations the last
    // count is kept rather than flapping.
    if obs.uncovered.is_none() {
        status.uncovered_consumers = previous.uncovered_consumers.clone();
    }
    let written = write_status(ctx, pk, &status).await?;
    let (ns, name) = object_key(pk)?;
    ctx.metrics
        .set_key(&ns, &name, &key_gauges(&status, obs, plan));
    if !written {
        return Ok(());
    }
    let facts = outcome::report_facts(&previous, &status, read, plan);
    if let Some(trigger) = facts.stalled_rotation {
        ctx.metrics.rotation(trigger, RotationResult::Stalled);
    }
    let regarding = pk.object_ref(&());
    for fact in facts.audits {
        audit::record(ctx, &regarding, fact).await;
    }
    Ok(())
}

/// Reports a failed reconcile in the `Ready` condition (reason and message of the error), so
/// the last error is visible in status and not only in the log. Everything else in status is
/// kept as it was.
pub(super) async fn error(
    ctx: &Context,
    pk: &ProvisioningKey,
    error: &Error,
    now: DateTime<Utc>,
) -> Result<()> {
    let pk = &with_fresh_status(ctx, pk).await?;
    let previous = pk.status.clone().unwrap_or_default();
    let status = outcome::failed_status(
        pk,
        error.reason(),
        error.public_message(),
        matches!(error, Error::NameTaken { .. }),
        now,
    );
    let written = write_status(ctx, pk, &status).await?;
    let (ns, name) = object_key(pk)?;
    ctx.metrics.set_key_ready(&ns, &name, "False");
    if written {
        let was = cond(&previous, conditions::READY).map(|c| c.reason.clone());
        if was.as_deref() != Some(error.reason()) {
            audit::record(
                ctx,
                &pk.object_ref(&()),
                Audit {
                    warning: true,
                    reason: error.reason(),
                    action: "Reconcile",
                    note: error.public_message(),
                    related: None,
                },
            )
            .await;
        }
    }
    Ok(())
}
