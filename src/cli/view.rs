//! Pure helpers that turn ProvisioningKeys and PolicyAgents into summaries, rows and text.
//! No client and no clock: `now` is passed in, so every function here is tested on fixtures.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use serde::Serialize;

use crate::api::conditions::{READY, STALLED};
use crate::api::provisioning_key::{HistoryEntry, RevokedKey, TrustedKey};
use crate::api::{PolicyAgent, ProvisioningKey};

/// What `status` reports about one key (also the `-o json|yaml` document). Key ids and
/// fingerprints only: status never holds key material, and neither does this.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeySummary {
    pub namespace: String,
    pub name: String,
    /// `True`, `False` or `Unknown` (no Ready condition yet).
    pub ready: String,
    /// Ready, not Stalled, and the status describes the current generation.
    pub healthy: bool,
    /// Why the key is not healthy (empty when healthy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_key: Option<CurrentKey>,
    pub trusted_keys: Vec<TrustedKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<Rotation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<String>,
    pub suspended: bool,
    /// The Stalled condition when it is True.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stalled: Option<Reason>,
    /// PolicyAgents that reference the key, and how many are confirmed on its current key.
    pub agents: AgentCounts,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CurrentKey {
    pub kid: String,
    pub fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<String>,
}

/// The newest rotation (a mint that was not the key's first).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    pub kid: String,
    pub trigger: String,
    /// When the new key was handed out (else when it was minted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Reason {
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentCounts {
    pub confirmed: usize,
    pub total: usize,
}

/// One PolicyAgent as the detailed view shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    pub name: String,
    /// `Kind/name`.
    pub workload: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Confirmed on the key's current key id.
    pub confirmed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_key_id: Option<String>,
    /// Pods confirmed / total, when the agent reported pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods_confirmed: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pods_total: Option<i32>,
    pub ready: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One key in full (the detailed view and its `-o json|yaml` document).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyDetail {
    #[serde(flatten)]
    pub summary: KeySummary,
    #[serde(rename = "policyAgents")]
    pub agent_list: Vec<AgentSummary>,
    pub conditions: Vec<ConditionView>,
    pub history: Vec<HistoryEntry>,
    pub revoked_keys: Vec<RevokedKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_refresh_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncovered_consumers: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The PolicyAgents of `agents` that reference `pk` (same namespace, by name).
pub fn agents_of<'a>(pk: &ProvisioningKey, agents: &'a [PolicyAgent]) -> Vec<&'a PolicyAgent> {
    agents
        .iter()
        .filter(|a| {
            a.namespace() == pk.namespace() && a.spec.provisioning_key_ref.name == pk.name_any()
        })
        .collect()
}

/// Summarizes one key; `agents` may hold PolicyAgents of any key (those of `pk` are picked).
pub fn summarize(pk: &ProvisioningKey, agents: &[PolicyAgent]) -> KeySummary {
    let status = pk.status.clone().unwrap_or_default();
    let ready = find(&status.conditions, READY);
    let stalled = find(&status.conditions, STALLED)
        .filter(|c| c.status == "True")
        .map(|c| Reason {
            reason: c.reason.clone(),
            message: c.message.clone(),
        });
    let current_kid = status.current_key.as_ref().map(|k| k.kid.as_str());
    let mine = agents_of(pk, agents);
    let confirmed = mine
        .iter()
        .filter(|a| agent_confirmed_on(a, current_kid))
        .count();
    let observed = pk.status.is_some() && status.observed_generation == pk.metadata.generation;
    let ready_status = ready.map_or_else(|| "Unknown".to_string(), |c| c.status.clone());
    let unhealthy_reason = if pk.status.is_none() {
        Some("no status yet: is the operator running and watching this namespace?".to_string())
    } else if !observed {
        Some(format!(
            "status describes generation {}, the spec is at generation {}",
            status
                .observed_generation
                .map_or_else(|| "none".into(), |g| g.to_string()),
            pk.metadata
                .generation
                .map_or_else(|| "none".into(), |g| g.to_string()),
        ))
    } else if let Some(s) = &stalled {
        Some(format!("Stalled: {}: {}", s.reason, s.message))
    } else {
        match ready {
            Some(c) if c.status == "True" => None,
            Some(c) => Some(format!("not Ready: {}: {}", c.reason, c.message)),
            None => Some("no Ready condition yet".to_string()),
        }
    };
    KeySummary {
        namespace: pk.namespace().unwrap_or_default(),
        name: pk.name_any(),
        ready: ready_status,
        healthy: unhealthy_reason.is_none(),
        unhealthy_reason,
        phase: status.phase.clone(),
        current_key: status.current_key.as_ref().map(|k| CurrentKey {
            kid: k.kid.clone(),
            fingerprint: k.fingerprint.clone(),
            activated_at: k.activated_at.clone(),
        }),
        trusted_keys: status.trusted_keys.clone(),
        last_rotation: last_rotation(&status.history),
        next_rotation_at: status.next_rotation_at.clone(),
        suspended: pk.spec.suspend == Some(true),
        stalled,
        agents: AgentCounts {
            confirmed,
            total: mine.len(),
        },
    }
}

fn agent_confirmed_on(agent: &PolicyAgent, kid: Option<&str>) -> bool {
    kid.is_some()
        && agent
            .status
            .as_ref()
            .and_then(|s| s.confirmed_key_id.as_deref())
            == kid
}

/// The newest history entry that is a rotation (not the key's first mint).
fn last_rotation(history: &[HistoryEntry]) -> Option<Rotation> {
    history
        .iter()
        .find(|h| h.trigger != "Initial")
        .map(|h| Rotation {
            kid: h.kid.clone(),
            trigger: h.trigger.clone(),
            at: h.activated_at.clone().or_else(|| h.minted_at.clone()),
        })
}

/// The detailed view's data for one key.
pub fn detail(pk: &ProvisioningKey, agents: &[PolicyAgent]) -> KeyDetail {
    let summary = summarize(pk, agents);
    let status = pk.status.clone().unwrap_or_default();
    let current_kid = status.current_key.as_ref().map(|k| k.kid.as_str());
    let mut agent_list: Vec<AgentSummary> = agents_of(pk, agents)
        .into_iter()
        .map(|a| {
            let s = a.status.clone().unwrap_or_default();
            let ready = find(&s.conditions, READY);
            AgentSummary {
                name: a.name_any(),
                workload: format!("{}/{}", a.spec.workload_ref.kind, a.spec.workload_ref.name),
                phase: s.phase.clone(),
                confirmed: agent_confirmed_on(a, current_kid),
                confirmed_key_id: s.confirmed_key_id.clone(),
                target_key_id: s.target_key_id.clone(),
                pods_confirmed: s.pods.as_ref().map(|p| p.confirmed),
                pods_total: s.pods.as_ref().map(|p| p.total),
                ready: ready.map_or_else(|| "Unknown".to_string(), |c| c.status.clone()),
                reason: ready.map(|c| c.reason.clone()),
                message: ready.map(|c| c.message.clone()),
            }
        })
        .collect();
    agent_list.sort_by(|a, b| a.name.cmp(&b.name));
    KeyDetail {
        summary,
        agent_list,
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionView {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_time: c.last_transition_time.0.to_string(),
            })
            .collect(),
        history: status.history.clone(),
        revoked_keys: status.revoked_keys.clone(),
        token_refresh_at: status.token_refresh_at.clone(),
        uncovered_consumers: status.uncovered_consumers.as_ref().map(|u| {
            if u.workloads.is_empty() {
                format!("{} pods", u.count)
            } else {
                format!("{} pods ({})", u.count, u.workloads.join(", "))
            }
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Text.

/// Width of the short key id in the default table (`-o wide` shows it whole).
pub const SHORT_KID: usize = 10;

/// The first [`SHORT_KID`] characters of a key id.
pub fn short_kid(kid: &str) -> String {
    kid.chars().take(SHORT_KID).collect()
}

/// A duration as kubectl prints ages: `45s`, `5m10s`, `3h`, `29d`.
pub fn human(d: chrono::Duration) -> String {
    let s = d.num_seconds().abs();
    let (m, h, days) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        format!("{m}m{}s", s % 60)
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        format!("{h}h{}m", m % 60)
    } else if h < 48 {
        format!("{h}h")
    } else if days < 8 {
        format!("{days}d{}h", h % 24)
    } else {
        format!("{days}d")
    }
}

fn parse(ts: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(ts)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Clock skew tolerated between the operator's timestamps (whole seconds) and this machine:
/// a past event stamped up to this far ahead still reads `0s ago`, not `in 1s`.
const SKEW: chrono::Duration = chrono::Duration::seconds(5);

/// A past timestamp as `5m ago` (or the text itself when it does not parse).
pub fn ago(ts: &str, now: DateTime<Utc>) -> String {
    match parse(ts) {
        Some(t) if t <= now + SKEW => {
            format!("{} ago", human((now - t).max(chrono::Duration::zero())))
        }
        Some(t) => format!("in {}", human(t - now)),
        None => ts.to_string(),
    }
}

/// A future timestamp as `in 29d`, or `overdue 3m` when it has passed.
pub fn until(ts: &str, now: DateTime<Utc>) -> String {
    match parse(ts) {
        Some(t) if t >= now => format!("in {}", human(t - now)),
        Some(t) => format!("overdue {}", human(now - t)),
        None => ts.to_string(),
    }
}

/// Column-aligned text: every column but the last is padded to its widest cell, three spaces
/// apart (kubectl's layout).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = headers.len();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate().take(columns) {
            if i + 1 < columns {
                out.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            } else {
                out.push_str(cell);
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// The next-rotation cell: `in 29d`, `overdue 3m`, `suspended` or `on request`.
fn next_rotation_cell(s: &KeySummary, now: DateTime<Utc>) -> String {
    match (&s.next_rotation_at, s.suspended) {
        (_, true) => "suspended".to_string(),
        (Some(t), false) => until(t, now),
        (None, false) => "on request".to_string(),
    }
}

fn dash(s: Option<String>) -> String {
    s.filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".to_string())
}

/// The `status` table (several keys). `namespaces` adds the NAMESPACE column (`-A`); `wide`
/// shows full key ids, fingerprints, trusted keys and the reason a key is not healthy.
pub fn keys_table(keys: &[KeySummary], namespaces: bool, wide: bool, now: DateTime<Utc>) -> String {
    let mut headers = vec![];
    if namespaces {
        headers.push("NAMESPACE");
    }
    headers.extend([
        "NAME",
        "READY",
        "PHASE",
        "KEY ID",
        "AGENTS",
        "LAST ROTATION",
        "NEXT ROTATION",
        "STALLED",
    ]);
    if wide {
        headers.extend(["FINGERPRINT", "TRUSTED KEYS", "MESSAGE"]);
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let mut row = vec![];
            if namespaces {
                row.push(k.namespace.clone());
            }
            row.push(k.name.clone());
            row.push(k.ready.clone());
            row.push(dash(k.phase.clone()));
            row.push(dash(k.current_key.as_ref().map(|c| {
                if wide {
                    c.kid.clone()
                } else {
                    short_kid(&c.kid)
                }
            })));
            row.push(if k.agents.total == 0 {
                "-".to_string()
            } else {
                format!("{}/{}", k.agents.confirmed, k.agents.total)
            });
            row.push(match &k.last_rotation {
                Some(r) => match &r.at {
                    Some(at) => format!("{} ({})", ago(at, now), r.trigger),
                    None => r.trigger.clone(),
                },
                None => "never".to_string(),
            });
            row.push(next_rotation_cell(k, now));
            row.push(dash(k.stalled.as_ref().map(|s| s.reason.clone())));
            if wide {
                row.push(dash(k.current_key.as_ref().map(|c| c.fingerprint.clone())));
                row.push(dash(Some(
                    k.trusted_keys
                        .iter()
                        .map(|t| format!("{}:{}", short_kid(&t.kid), t.state))
                        .collect::<Vec<_>>()
                        .join(","),
                )));
                row.push(dash(k.unhealthy_reason.clone()));
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// The detailed view of one key (`keyward status <name>`).
pub fn detail_text(d: &KeyDetail, now: DateTime<Utc>) -> String {
    let mut out = fields_text(d, now);
    agents_text(d, &mut out);
    conditions_text(d, now, &mut out);
    history_text(d, now, &mut out);
    out
}

/// The key's fields, one per line.
fn fields_text(d: &KeyDetail, now: DateTime<Utc>) -> String {
    let s = &d.summary;
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        out.push_str(&format!("{:<16}{}\n", format!("{label}:"), value));
    };
    field("Name", s.name.clone());
    field("Namespace", s.namespace.clone());
    let ready = d.conditions.iter().find(|c| c.type_ == READY);
    field(
        "Ready",
        match ready {
            Some(c) => format!("{} ({}): {}", c.status, c.reason, c.message),
            None => "Unknown (no Ready condition yet)".to_string(),
        },
    );
    field("Phase", dash(s.phase.clone()));
    match &s.current_key {
        Some(c) => {
            field("Current key", c.kid.clone());
            field("Fingerprint", c.fingerprint.clone());
            if let Some(at) = &c.activated_at {
                field("Activated", format!("{} ({at})", ago(at, now)));
            }
        }
        None => field("Current key", "none yet".to_string()),
    }
    field(
        "Trusted keys",
        if s.trusted_keys.is_empty() {
            "none".to_string()
        } else {
            s.trusted_keys
                .iter()
                .map(|t| format!("{} ({})", t.kid, t.state))
                .collect::<Vec<_>>()
                .join("\n                ")
        },
    );
    field(
        "Last rotation",
        match &s.last_rotation {
            Some(r) => match &r.at {
                Some(at) => format!(
                    "{} ({at}), trigger {}, to {}",
                    ago(at, now),
                    r.trigger,
                    r.kid
                ),
                None => format!("trigger {}, to {}", r.trigger, r.kid),
            },
            None => "never (the current key is the first)".to_string(),
        },
    );
    field(
        "Next rotation",
        match (&s.next_rotation_at, s.suspended) {
            (_, true) => "suspended (spec.suspend is true)".to_string(),
            (Some(t), false) => format!("{} ({t})", until(t, now)),
            (None, false) => {
                "on request only (no rotation.interval): keyward rotate, or rotation.requestToken"
                    .to_string()
            }
        },
    );
    if let Some(t) = &d.token_refresh_at {
        field("Token refresh", format!("{} ({t})", until(t, now)));
    }
    field(
        "Stalled",
        match &s.stalled {
            Some(r) => format!("yes: {}: {}", r.reason, r.message),
            None => "no".to_string(),
        },
    );
    if let Some(u) = &d.uncovered_consumers {
        field("Uncovered pods", u.clone());
    }
    if !d.revoked_keys.is_empty() {
        let lines: Vec<String> = d.revoked_keys.iter().map(revoked_line).collect();
        field("Revoked keys", lines.join("\n                "));
    }
    if !s.healthy {
        field("Attention", dash(s.unhealthy_reason.clone()));
    }

    out
}

/// One revoked key: its id, state and, while deactivated, until when it can be reactivated.
pub fn revoked_line(k: &RevokedKey) -> String {
    match (k.state.as_deref(), &k.destroy_at) {
        (Some("Deactivated"), Some(at)) => format!(
            "{}  Deactivated (reactivatable until {at}: keyward reactivate)",
            k.kid
        ),
        (Some(state), _) => format!("{}  {state}", k.kid),
        (None, _) => k.kid.clone(),
    }
}

/// The PolicyAgents of the key, as a table.
fn agents_text(d: &KeyDetail, out: &mut String) {
    let s = &d.summary;
    out.push_str(&format!(
        "\nAgents: {}\n",
        if d.agent_list.is_empty() {
            "no PolicyAgent references this key".to_string()
        } else {
            format!(
                "{}/{} confirmed on the current key",
                s.agents.confirmed, s.agents.total
            )
        }
    ));
    if !d.agent_list.is_empty() {
        let rows: Vec<Vec<String>> = d
            .agent_list
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    a.workload.clone(),
                    dash(a.phase.clone()),
                    if a.confirmed { "yes" } else { "no" }.to_string(),
                    dash(a.confirmed_key_id.as_deref().map(short_kid)),
                    match (a.pods_confirmed, a.pods_total) {
                        (Some(c), Some(t)) => format!("{c}/{t}"),
                        _ => "-".to_string(),
                    },
                    a.ready.clone(),
                    dash(a.reason.clone()),
                    dash(a.message.clone()),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &[
                "NAME",
                "WORKLOAD",
                "PHASE",
                "CONFIRMED",
                "CONFIRMED KEY",
                "PODS",
                "READY",
                "REASON",
                "MESSAGE",
            ],
            &rows,
        )));
    }
}

/// The key's conditions, as a table.
fn conditions_text(d: &KeyDetail, now: DateTime<Utc>, out: &mut String) {
    out.push_str("\nConditions:\n");
    if d.conditions.is_empty() {
        out.push_str("  none yet\n");
    } else {
        let rows: Vec<Vec<String>> = d
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    ago(&c.last_transition_time, now),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            &rows,
        )));
    }
}

/// The key's history, newest first.
fn history_text(d: &KeyDetail, now: DateTime<Utc>, out: &mut String) {
    if !d.history.is_empty() {
        out.push_str("\nHistory (newest first):\n");
        let when = |t: &Option<String>| t.as_deref().map_or_else(|| "-".into(), |t| ago(t, now));
        let rows: Vec<Vec<String>> = d
            .history
            .iter()
            .map(|h| {
                vec![
                    h.kid.clone(),
                    h.trigger.clone(),
                    h.state.clone(),
                    when(&h.minted_at),
                    when(&h.activated_at),
                    when(&h.retired_at),
                    when(&h.revoked_at),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &[
                "KEY ID",
                "TRIGGER",
                "STATE",
                "MINTED",
                "ACTIVATED",
                "RETIRED",
                "REVOKED",
            ],
            &rows,
        )));
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
