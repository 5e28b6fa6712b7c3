//! ProvisioningKey reconcile: read (fresh reads, one snapshot) -> plan (pure) -> apply (one
//! write) -> repeat, then report status and Events.
//!
//! | phase   | module                                              | client |
//! |---------|-----------------------------------------------------|--------|
//! | read    | [`read`]: one snapshot of fresh reads               | reads  |
//! | map     | `rotation::snapshot`: the planner's input           | none   |
//! | plan    | `rotation::plan`: the next step                     | none   |
//! | apply   | [`apply`]: one write per step kind                  | writes |
//! | outcome | `rotation::outcome`: status, Events, counts, gauges | none   |
//! | report  | [`report`]: writes status, Events, metrics          | writes |

mod apply;
mod copies;
mod read;
mod report;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use tracing::debug;

use super::{Context, Error, Result};
use crate::api::provisioning_key::ProvisioningKey;
use crate::keys::KeyPair;
use crate::rotation::outcome::Trail;
use crate::rotation::snapshot::{Written, took_record_write};
use crate::rotation::{self, Step};

pub use crate::rotation::desired::{KEY_SECRET_TYPE, key_secret_name};
pub use crate::rotation::outcome::desired_status;
pub use apply::{transition_key_secret, write_bundle};
pub use read::{SCAN_DELAY, Scan, Scans};

/// Most writes one reconcile makes before it yields to other objects.
const MAX_STEPS_PER_RECONCILE: usize = 12;

fn object_key(pk: &ProvisioningKey) -> Result<(String, String)> {
    Ok((
        pk.namespace().ok_or(Error::MissingObjectKey)?,
        pk.meta().name.clone().ok_or(Error::MissingObjectKey)?,
    ))
}

/// The reconcile entry point. A failed reconcile reports its error in the `Ready` condition
/// (not only in the log) and is retried with backoff by the controller's error policy.
pub async fn reconcile(pk: Arc<ProvisioningKey>, ctx: Arc<Context>) -> Result<Action> {
    if pk.meta().deletion_timestamp.is_some() {
        // Owned objects are garbage-collected through their owner references; the bundle's
        // copies in other namespaces are removed here (the finalizer holds the key until then).
        if let Ok((ns, name)) = object_key(&pk) {
            ctx.metrics.remove_key(&ns, &name);
        }
        copies::finalize(&ctx, &pk).await?;
        return Ok(Action::await_change());
    }
    // The object comes from the watch cache. When it does not show our own last trust-record
    // write yet (a reconcile woken by an owned object within milliseconds of that write), the
    // plan would be made from the record before it and write it again: read it fresh instead.
    let pk = if ctx.own_records.unseen(pk.meta()) {
        let (ns, name) = object_key(&pk)?;
        let api: Api<ProvisioningKey> = Api::namespaced(ctx.client.clone(), &ns);
        match api.get_opt(&name).await? {
            Some(fresh) => Arc::new(fresh),
            // Deleted since: its owned objects are garbage-collected.
            None => return Ok(Action::await_change()),
        }
    } else {
        pk
    };
    let now = ctx.now();
    let mut trail = Trail::default();
    let result = run_steps(&ctx, &pk, now, &mut trail).await;
    // An Event held for a hand-out that did not come is recorded, however the reconcile ended.
    report::record(&ctx, &pk, trail.finish()).await;
    match result {
        Ok(requeue) => {
            // The bundle's copies in other namespaces, once the key's own objects are settled.
            let copies = copies::sync(&ctx, &pk).await?;
            ctx.backoff.reset(&super::object_key(&*pk));
            let requeue = match (requeue, copies) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            Ok(requeue.map_or_else(Action::await_change, Action::requeue))
        }
        Err(e) => {
            if e.reportable()
                && let Err(report_err) = report::error(&ctx, &pk, &e, now).await
            {
                debug!(error = %report_err, "could not report the error in status");
            }
            Err(e)
        }
    }
}

/// How soon a key whose consumer scan saw terminating pods is looked at again.
const SETTLING_RECHECK: Duration = Duration::from_secs(3);

async fn run_steps(
    ctx: &Context,
    pk: &ProvisioningKey,
    now: DateTime<Utc>,
    trail: &mut Trail,
) -> Result<Option<Duration>> {
    let mut raw = read::snapshot(ctx, pk).await?;
    // The reconcile's own copy: a record write moves its resourceVersion and record on.
    let mut pk_now = pk.clone();
    let pk = &mut pk_now;
    let mut fresh: Option<(u32, KeyPair)> = None;
    let mut now = now;
    let mut stepped = false;
    for _ in 0..MAX_STEPS_PER_RECONCILE {
        // Each step decides and stamps with the time it runs at, not the reconcile's start: a
        // write slowed down by the API server (429s retried, a latency spike) must not let the
        // next step stamp "published at" before the bundle held the key, which would shorten
        // publishDelay by the delay (found by e2e/faults.rs, APF 429s).
        now = now.max(ctx.now());
        read::consumers_when_needed(ctx, pk, &mut raw, now).await?;
        let read = read::map(ctx, pk, &raw);
        let plan = rotation::plan(&read.settings, &read.observed, now);
        let Some(step) = &plan.step else {
            // A key this reconcile took from nothing (its first key minted here) has no status
            // of ours to be stale about; any other reads its status again first.
            let first = raw.never_reconciled && stepped;
            report::status_and_events(ctx, pk, &read, &plan, now, first).await?;
            // Terminating pods in the consumer scan: look again once they are gone.
            let settling = raw.consumers.as_ref().is_some_and(|c| c.settling);
            let requeue = match (plan.requeue_after, settling) {
                (Some(d), true) => Some(d.min(SETTLING_RECHECK)),
                (None, true) => Some(SETTLING_RECHECK),
                (d, false) => d,
            };
            return Ok(requeue);
        };
        let (mut minted, written) = match apply::step(ctx, pk, &read, step, now, &mut fresh).await {
            // A key never reconciled did not read its bundle and agent Secret (see
            // `read::snapshot`): a create that found the name taken reads everything now, and the
            // plan reports the taken name (`TrustBundleNameTaken`, `SecretNameTaken`) at once.
            Err(Error::NameTaken { .. }) if raw.never_reconciled => {
                raw = read::snapshot(ctx, pk).await?;
                raw.never_reconciled = false;
                continue;
            }
            r => r?,
        };
        if let (Some(m), Step::Mint { seq, .. }) = (minted.as_mut(), step) {
            fresh = m.pair.take().map(|p| (*seq, p));
        }
        apply::remember(&written, &ctx.own_writes);
        if let Written::ProvisioningKey(w) = &written {
            took_record_write(pk, w);
        }
        stepped = true;
        raw.absorb(written);
        if let Step::Destroy { seq, .. } | Step::Deactivate { seq } = step {
            ctx.scans.forget(&uid_of(pk), *seq);
        }
        report::applied(ctx, pk, &read, step, minted.as_ref(), trail).await;
    }
    Ok(Some(Duration::from_millis(200)))
}

fn uid_of(pk: &ProvisioningKey) -> String {
    pk.meta().uid.clone().unwrap_or_default()
}
