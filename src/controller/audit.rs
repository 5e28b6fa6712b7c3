//! Audit trail: every transition becomes a Kubernetes Event (events.k8s.io/v1) and a structured
//! log line. Notes name key ids and fingerprints, never key bytes.
//!
//! Each Event is created directly (no client-side aggregation): every audited fact is its own
//! Event, and nothing is cached per Event. (kube's `Recorder` keeps every Event it sent for six
//! minutes to merge repeats into a series: about 4 KiB per new key, the largest per-key memory
//! cost at thousands of keys, for facts that never repeat: each note names its key id.) A
//! repeated Warning is recorded only on a condition's transition, so nothing floods.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tracing::{info, warn};

use super::Context;

/// The Event reasons and the audited fact are pure (decided in `rotation::outcome`).
pub use crate::rotation::outcome::{Audit, reason};

/// Publishes the Event and writes the log line. An Event that cannot be published is logged and
/// never fails the reconcile.
pub async fn record(ctx: &Context, regarding: &ObjectReference, audit: Audit<'_>) {
    let object = format!(
        "{}/{}/{}",
        regarding.kind.as_deref().unwrap_or_default(),
        regarding.namespace.as_deref().unwrap_or_default(),
        regarding.name.as_deref().unwrap_or_default()
    );
    if audit.warning {
        warn!(audit = true, reason = audit.reason, object = %object, note = %audit.note, "audit");
    } else {
        info!(audit = true, reason = audit.reason, object = %object, note = %audit.note, "audit");
    }
    let mut note = audit.note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let Some(ns) = regarding.namespace.clone() else {
        return;
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or("keyward"),
                now.as_nanosecond()
            )),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(if audit.warning { "Warning" } else { "Normal" }.to_string()),
        reason: Some(audit.reason.to_string()),
        note: Some(note),
        action: Some(audit.action.to_string()),
        regarding: Some(regarding.clone()),
        related: audit.related,
        reporting_controller: Some(super::FIELD_MANAGER.to_string()),
        reporting_instance: Some(ctx.config.instance.clone()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &event).await {
        warn!(error = %e, reason = audit.reason, "failed to publish Event");
    }
}
