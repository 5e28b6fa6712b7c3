//! Audit trail: every transition becomes a Kubernetes Event (events.k8s.io/v1) and a structured
//! log line. Notes name key ids and fingerprints, never key bytes.
//!
//! kube's `Recorder` merges Events with the same type, reason, action, regarding and related
//! object. Each Event about a key therefore names that key's Secret as its `related` object, so
//! two transitions of different keys stay two Events, each with its own note.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType};
use tracing::{info, warn};

use super::Context;

/// Event reasons (PascalCase), shared with conditions and metrics.
pub mod reason {
    pub const KEY_MINTED: &str = "KeyMinted";
    pub const KEY_PUBLISHED: &str = "KeyPublished";
    pub const KEY_ACTIVATED: &str = "KeyActivated";
    pub const KEY_HANDED_OUT: &str = "KeyHandedOut";
    pub const KEY_RETIRING: &str = "KeyRetiring";
    pub const KEY_REVOKED: &str = "KeyRevoked";
    pub const KEY_PRUNED: &str = "KeyPruned";
    pub const KEY_SECRET_REPAIRED: &str = "KeySecretRepaired";
    pub const TOKEN_REFRESHED: &str = "TokenRefreshed";
    pub const TRUST_BUNDLE_UPDATED: &str = "TrustBundleUpdated";
    pub const EMERGENCY_REVOCATION: &str = "EmergencyRevocation";
    pub const ROTATION_STALLED: &str = "RotationStalled";
    pub const ROLLOUT_TRIGGERED: &str = "RolloutTriggered";
    pub const AGENT_CONFIRMED: &str = "AgentConfirmed";
}

/// One audited fact.
pub struct Audit<'a> {
    pub warning: bool,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: String,
    /// The object the fact is about besides the regarding one (for a key: its Secret).
    pub related: Option<ObjectReference>,
}

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
    let event = Event {
        type_: if audit.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: audit.reason.to_string(),
        note: Some(note),
        action: audit.action.to_string(),
        secondary: audit.related,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        warn!(error = %e, reason = audit.reason, "failed to publish Event");
    }
}
