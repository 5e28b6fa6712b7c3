//! Table-driven tests of the CLI's pure parts on fixture objects.

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};

use super::rotate::{self, Requested};
use super::status::exit_code;
use super::view::{self, ago, human, keys_table, summarize, table, until};
use super::{EXIT_NOT_READY, EXIT_OK};
use crate::api::{PolicyAgent, ProvisioningKey};

const K1: &str = "K1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const K2: &str = "K2bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0)
        .single()
        .expect("a valid time")
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": type_, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": "2025-06-01T11:55:00Z",
    })
}

/// A key settled on K2 after an annotation-triggered rotation from K1.
fn settled(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
        "metadata": { "name": name, "namespace": ns, "generation": 1 },
        "spec": { "rotation": { "interval": "720h" } },
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "currentKey": {
                "kid": K2, "fingerprint": "SHA256:ab:cd",
                "createdAt": "2025-06-01T10:58:00Z", "activatedAt": "2025-06-01T11:00:00Z"
            },
            "trustedKeys": [ { "kid": K2, "state": "Active" } ],
            "revokedKeys": [ { "kid": K1, "revokedAt": "2025-06-01T11:10:00Z" } ],
            "nextRotationAt": "2025-07-01T11:00:00Z",
            "tokenRefreshAt": "2025-06-01T12:25:00Z",
            "conditions": [
                cond("Ready", "True", "KeyActive", &format!("key {K2} is current and handed out")),
                cond("Rotating", "False", "Idle", "no rotation in flight"),
                cond("Stalled", "False", "Idle", "not stalled"),
            ],
            "history": [
                { "kid": K2, "trigger": "Annotation", "state": "active",
                  "mintedAt": "2025-06-01T10:58:00Z", "activatedAt": "2025-06-01T11:00:00Z" },
                { "kid": K1, "trigger": "Initial", "state": "revoked",
                  "mintedAt": "2025-05-01T10:00:00Z", "activatedAt": "2025-05-01T10:00:00Z",
                  "retiredAt": "2025-06-01T11:00:00Z", "revokedAt": "2025-06-01T11:10:00Z" },
            ],
        }
    })
}

fn pk(v: Value) -> ProvisioningKey {
    serde_json::from_value(v).expect("a valid ProvisioningKey fixture")
}

/// `v` with the member at `pointer` set (created when its parent object exists).
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    if let Some(slot) = v.pointer_mut(pointer) {
        *slot = value;
        return v;
    }
    let (parent, key) = pointer.rsplit_once('/').expect("a JSON pointer");
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("the parent object exists")
        .insert(key.to_string(), value);
    v
}

fn stalled() -> Value {
    let v = settled("team-a", "stuck");
    let v = with(v, "/status/phase", json!("Stalled"));
    with(
        v,
        "/status/conditions/2",
        cond(
            "Stalled",
            "True",
            "RotationStalled",
            "1 of 3 PolicyAgents not confirmed on the new key after 15m",
        ),
    )
}

fn agent(name: &str, key: &str, confirmed: Option<&str>, pods: (i32, i32)) -> PolicyAgent {
    serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent",
        "metadata": { "name": name, "namespace": "team-a" },
        "spec": {
            "provisioningKeyRef": { "name": key },
            "workloadRef": { "kind": "Deployment", "name": format!("{name}-opa") },
        },
        "status": {
            "phase": if confirmed == Some(K2) { "Confirmed" } else { "Confirming" },
            "confirmedKeyId": confirmed,
            "pods": { "total": pods.1, "onCurrentKey": pods.1, "confirmed": pods.0 },
            "conditions": [ cond("Ready", if confirmed == Some(K2) { "True" } else { "False" },
                                 "Confirming", "waiting for pods") ],
        }
    }))
    .expect("a valid PolicyAgent fixture")
}

#[test]
fn human_durations_read_like_kubectl() {
    let cases = [
        (0, "0s"),
        (45, "45s"),
        (119, "119s"),
        (310, "5m10s"),
        (1800, "30m"),
        (4 * 3600 + 5 * 60, "4h5m"),
        (30 * 3600, "30h"),
        (3 * 86_400 + 2 * 3600, "3d2h"),
        (29 * 86_400, "29d"),
    ];
    for (secs, want) in cases {
        assert_eq!(human(chrono::Duration::seconds(secs)), want, "{secs}s");
    }
    assert_eq!(ago("2025-06-01T11:55:00Z", now()), "5m0s ago");
    assert_eq!(until("2025-07-01T11:00:00Z", now()), "in 29d");
    assert_eq!(until("2025-06-01T11:57:00Z", now()), "overdue 3m0s");
    assert_eq!(ago("not a time", now()), "not a time");
    // The operator stamps whole seconds, and clocks differ a little: not "in 1s".
    assert_eq!(ago("2025-06-01T12:00:02Z", now()), "0s ago");
    assert_eq!(ago("2025-06-01T12:01:00Z", now()), "in 60s");
}

#[test]
fn table_aligns_columns_and_trims_the_last() {
    let t = table(
        &["NAME", "READY", "MESSAGE"],
        &[
            vec!["a".into(), "True".into(), "".into()],
            vec!["longer-name".into(), "False".into(), "why".into()],
        ],
    );
    assert_eq!(
        t,
        "NAME          READY   MESSAGE\n\
         a             True\n\
         longer-name   False   why\n"
    );
}

/// (fixture, agents, ready, healthy, stalled reason, agents "confirmed/total")
#[test]
fn summaries_from_fixtures() {
    let no_status = json!({
        "apiVersion": "keyward.dev/v1alpha1", "kind": "ProvisioningKey",
        "metadata": { "name": "fresh", "namespace": "team-a", "generation": 1 },
        "spec": {},
    });
    let old_generation = with(
        settled("team-a", "edited"),
        "/metadata/generation",
        json!(2),
    );
    let not_ready = with(
        settled("team-a", "taken"),
        "/status/conditions/0",
        cond(
            "Ready",
            "False",
            "SecretNameTaken",
            "Secret \"taken\" exists",
        ),
    );
    let agents = vec![
        agent("a", "payments", Some(K2), (3, 3)),
        agent("b", "payments", Some(K1), (1, 3)),
        agent("c", "other", Some(K2), (1, 1)),
    ];
    type Case = (
        &'static str,
        Value,
        &'static str,
        bool,
        Option<&'static str>,
        (usize, usize),
    );
    let cases: Vec<Case> = vec![
        (
            "settled",
            settled("team-a", "payments"),
            "True",
            true,
            None,
            (1, 2),
        ),
        (
            "stalled",
            stalled(),
            "True",
            false,
            Some("RotationStalled"),
            (0, 0),
        ),
        ("no status", no_status, "Unknown", false, None, (0, 0)),
        (
            "status of an older generation",
            old_generation,
            "True",
            false,
            None,
            (0, 0),
        ),
        ("not ready", not_ready, "False", false, None, (0, 0)),
    ];
    for (what, fixture, ready, healthy, stalled, (confirmed, total)) in cases {
        let s = summarize(&pk(fixture), &agents);
        assert_eq!(s.ready, ready, "{what}");
        assert_eq!(s.healthy, healthy, "{what}: {:?}", s.unhealthy_reason);
        assert_eq!(s.healthy, s.unhealthy_reason.is_none(), "{what}");
        assert_eq!(
            s.stalled.as_ref().map(|r| r.reason.as_str()),
            stalled,
            "{what}"
        );
        assert_eq!(
            (s.agents.confirmed, s.agents.total),
            (confirmed, total),
            "{what}"
        );
    }
}

#[test]
fn last_rotation_skips_the_first_key() {
    let s = summarize(&pk(settled("team-a", "payments")), &[]);
    let r = s.last_rotation.expect("a rotation");
    assert_eq!((r.kid.as_str(), r.trigger.as_str()), (K2, "Annotation"));
    assert_eq!(r.at.as_deref(), Some("2025-06-01T11:00:00Z"));

    let first_only = with(
        settled("team-a", "new"),
        "/status/history",
        json!([{ "kid": K1, "trigger": "Initial", "state": "active" }]),
    );
    assert_eq!(summarize(&pk(first_only), &[]).last_rotation, None);
}

#[test]
fn the_table_of_keys() {
    let agents = vec![
        agent("a", "payments", Some(K2), (3, 3)),
        agent("b", "payments", Some(K1), (1, 3)),
    ];
    let keys = vec![
        summarize(&pk(settled("team-a", "payments")), &agents),
        summarize(&pk(stalled()), &agents),
    ];
    let text = keys_table(&keys, false, false, now());
    assert_eq!(
        text,
        "NAME       READY   PHASE     KEY ID       AGENTS   LAST ROTATION          NEXT ROTATION   STALLED\n\
         payments   True    Ready     K2bbbbbbbb   1/2      60m ago (Annotation)   in 29d          -\n\
         stuck      True    Stalled   K2bbbbbbbb   -        60m ago (Annotation)   in 29d          RotationStalled\n"
    );
    let all = keys_table(&keys, true, false, now());
    assert!(all.starts_with("NAMESPACE   NAME"), "{all}");
    assert!(all.contains("\nteam-a      payments"), "{all}");

    let wide = keys_table(&keys, false, true, now());
    assert!(wide.contains(K2), "wide shows the whole key id: {wide}");
    assert!(wide.contains("SHA256:ab:cd"), "{wide}");
    assert!(wide.contains("K2bbbbbbbb:Active"), "{wide}");
    assert!(
        wide.contains("Stalled: RotationStalled: 1 of 3 PolicyAgents not confirmed"),
        "{wide}"
    );
}

#[test]
fn next_rotation_cell_says_suspended_or_on_request() {
    let suspended = with(settled("team-a", "s"), "/spec/suspend", json!(true));
    let on_request = with(
        settled("team-a", "r"),
        "/status/nextRotationAt",
        Value::Null,
    );
    let overdue = with(
        settled("team-a", "o"),
        "/status/nextRotationAt",
        json!("2025-06-01T11:00:00Z"),
    );
    for (fixture, want) in [
        (suspended, "suspended"),
        (on_request, "on request"),
        (overdue, "overdue 60m"),
    ] {
        let text = keys_table(&[summarize(&pk(fixture), &[])], false, false, now());
        assert!(text.contains(want), "want {want:?} in\n{text}");
    }
}

#[test]
fn the_detailed_view_of_one_key() {
    let agents = vec![
        agent("a", "payments", Some(K2), (3, 3)),
        agent("b", "payments", Some(K1), (1, 3)),
        agent("c", "other", Some(K2), (1, 1)),
    ];
    let d = view::detail(&pk(settled("team-a", "payments")), &agents);
    let text = view::detail_text(&d, now());
    for want in [
        "Name:           payments\n",
        "Namespace:      team-a\n",
        &format!("Ready:          True (KeyActive): key {K2} is current and handed out\n"),
        &format!("Current key:    {K2}\n"),
        "Fingerprint:    SHA256:ab:cd\n",
        &format!("Trusted keys:   {K2} (Active)\n"),
        &format!("Last rotation:  60m ago (2025-06-01T11:00:00Z), trigger Annotation, to {K2}\n"),
        "Next rotation:  in 29d (2025-07-01T11:00:00Z)\n",
        "Token refresh:  in 25m (2025-06-01T12:25:00Z)\n",
        "Stalled:        no\n",
        &format!("Revoked keys:   {K1}\n"),
        "Agents: 1/2 confirmed on the current key\n\
         \x20 NAME   WORKLOAD           PHASE        CONFIRMED   CONFIRMED KEY   PODS   READY   REASON       MESSAGE\n\
         \x20 a      Deployment/a-opa   Confirmed    yes         K2bbbbbbbb      3/3    True    Confirming   waiting for pods\n\
         \x20 b      Deployment/b-opa   Confirming   no          K1aaaaaaaa      1/3    False   Confirming   waiting for pods\n",
        "Conditions:\n  TYPE       STATUS   REASON      SINCE      MESSAGE\n",
        "  Stalled    False    Idle        5m0s ago   not stalled\n",
        "History (newest first):\n",
        "   Initial      revoked   31d ago   31d ago     60m ago   50m ago\n",
    ] {
        assert!(text.contains(want), "want {want:?} in\n{text}");
    }
    assert!(!text.contains("Attention"), "{text}");
    assert!(
        !text.contains("c-opa"),
        "an agent of another key is not listed: {text}"
    );
}

#[test]
fn the_detailed_view_says_why_a_key_needs_attention() {
    let d = view::detail(&pk(stalled()), &[]);
    let text = view::detail_text(&d, now());
    for want in [
        "Stalled:        yes: RotationStalled: 1 of 3 PolicyAgents not confirmed on the new key after 15m\n",
        "Attention:      Stalled: RotationStalled:",
        "Agents: no PolicyAgent references this key\n",
    ] {
        assert!(text.contains(want), "want {want:?} in\n{text}");
    }
}

#[test]
fn exit_code_is_3_when_any_key_needs_attention() {
    let ok = summarize(&pk(settled("team-a", "payments")), &[]);
    let bad = summarize(&pk(stalled()), &[]);
    assert_eq!(exit_code([&ok]), EXIT_OK);
    assert_eq!(exit_code(Vec::<&view::KeySummary>::new()), EXIT_OK);
    assert_eq!(exit_code([&ok, &bad]), EXIT_NOT_READY);
}

#[test]
fn json_summary_holds_ids_only() {
    let d = view::detail(&pk(settled("team-a", "payments")), &[]);
    let text = super::encode(&d, super::Output::Json).expect("json");
    let v: Value = serde_json::from_str(&text).expect("valid json");
    assert_eq!(v["currentKey"]["kid"], K2);
    assert_eq!(v["healthy"], true);
    assert_eq!(v["agents"], json!({ "confirmed": 0, "total": 0 }));
    assert_eq!(v["history"][0]["trigger"], "Annotation");
    let yaml = super::encode(&d, super::Output::Yaml).expect("yaml");
    assert!(yaml.contains("name: payments"), "{yaml}");
}

#[test]
fn rotate_patches_the_annotation_only() {
    let value = rotate::request_value(now());
    assert_eq!(value, "2025-06-01T12:00:00.000000Z");
    assert_eq!(
        rotate::request_patch(&value),
        json!({ "metadata": { "annotations": { "keyward.dev/rotate": value } } })
    );
    let line = rotate::requested_line(&Requested {
        namespace: "team-a".into(),
        name: "payments".into(),
        request: value.clone(),
        previous_key: Some(K2.into()),
        new_key: None,
        note: None,
    });
    assert_eq!(
        line,
        format!(
            "provisioningkey team-a/payments: rotation requested (keyward.dev/rotate={value}); current key {K2}"
        )
    );
}

#[test]
fn rotate_notes_and_completion() {
    let settled_pk = pk(settled("team-a", "payments"));
    assert_eq!(rotate::note_for(&settled_pk), None);
    let suspended = pk(with(settled("team-a", "s"), "/spec/suspend", json!(true)));
    assert!(rotate::note_for(&suspended).is_some_and(|n| n.contains("suspend")));
    assert!(rotate::rotated_from(&settled_pk, Some(K1)));
    assert!(
        !rotate::rotated_from(&settled_pk, Some(K2)),
        "same key: not rotated yet"
    );
    let not_ready = pk(with(
        settled("team-a", "p"),
        "/status/conditions/0",
        cond("Ready", "False", "Minting", "x"),
    ));
    assert!(!rotate::rotated_from(&not_ready, Some(K1)));
}

#[test]
fn cli_flags_parse() {
    use clap::Parser;
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: super::Command,
    }
    let ok = [
        vec!["k", "status"],
        vec!["k", "status", "-A", "-o", "wide"],
        vec!["k", "status", "-n", "a", "payments", "-o", "json"],
        vec!["k", "status", "--kubeconfig", "/x", "--context", "c"],
        vec!["k", "rotate", "-n", "a", "p1", "p2"],
        vec!["k", "rotate", "--all", "-A"],
        vec!["k", "rotate", "p", "--wait", "--timeout", "30s"],
    ];
    for args in ok {
        assert!(Cli::try_parse_from(&args).is_ok(), "{args:?}");
    }
    let usage = [
        vec!["k", "rotate"],
        vec!["k", "rotate", "-A"],
        vec!["k", "rotate", "p", "--all"],
        vec!["k", "rotate", "p", "-A"],
        vec!["k", "rotate", "p", "--timeout", "1m"],
        vec!["k", "status", "p", "-A"],
        vec!["k", "status", "-n", "a", "-A"],
        vec!["k", "status", "-o", "xml"],
    ];
    for args in usage {
        let e = Cli::try_parse_from(&args).expect_err(&format!("{args:?} is a usage error"));
        assert_eq!(e.exit_code(), i32::from(super::EXIT_USAGE), "{args:?}");
    }
}

/// A key id is base64url, so one in 64 begins with `-`: `keyward reactivate` takes it as the
/// key id wherever it stands, and still knows its options (a real plane run once drew one).
#[test]
fn reactivate_takes_a_key_id_that_begins_with_a_hyphen() {
    use clap::Parser;
    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: super::Command,
    }
    let kid = "-S8qRUhjpRw18jXrG0j2tAbCdEfGhIjKlMnOpQrStUv";
    for args in [
        vec!["k", "reactivate", "billing", kid, "--reason", "x"],
        vec![
            "k",
            "reactivate",
            "-n",
            "a",
            "billing",
            kid,
            "--reason",
            "x",
            "--wait",
        ],
        vec!["k", "reactivate", "--reason", "x", "billing", kid],
    ] {
        let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            super::Command::Reactivate(a) => {
                assert_eq!(
                    (a.name.as_str(), a.kid.as_str()),
                    ("billing", kid),
                    "{args:?}"
                );
                assert_eq!(a.reason, "x");
            }
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }
}

/// `keyward reactivate` refuses up front what the operator would refuse, from the key's spec
/// and status, and sends one merge patch of annotations only.
#[test]
fn reactivate_refuses_what_cannot_come_back() {
    use super::reactivate::{refusal, request_patch, trusted_again};
    let pk: ProvisioningKey = serde_json::from_value(json!({
        "apiVersion": "keyward.dev/v1alpha1",
        "kind": "ProvisioningKey",
        "metadata": {"name": "opa", "namespace": "payments"},
        "spec": {"compromisedKeys": ["C".repeat(43)]},
        "status": {
            "trustedKeys": [{"kid": "cur", "state": "Active"}],
            "revokedKeys": [
                {"kid": "old", "state": "Deactivated", "destroyAt": "2026-12-07T10:00:00Z"},
                {"kid": "gone", "state": "Destroyed"},
                {"kid": "C".repeat(43), "state": "Deactivated"}
            ]
        }
    }))
    .expect("fixture");
    assert_eq!(refusal(&pk, "old"), None);
    let why = |kid: &str| refusal(&pk, kid).expect("refused");
    assert!(why("cur").contains("still trusted"));
    assert!(why("gone").contains("destroyed"));
    assert!(why(&"C".repeat(43)).contains("compromisedKeys"));
    assert!(why("never").contains("lists no revoked key never"));
    assert_eq!(
        request_patch("old,t", "INC-1"),
        json!({"metadata": {"annotations": {
            "keyward.dev/reactivate": "old,t",
            "keyward.dev/reactivate-reason": "INC-1"
        }}})
    );
    assert!(trusted_again(&pk, "cur") && !trusted_again(&pk, "old"));
    let line = view::revoked_line(&pk.status.clone().expect("status").revoked_keys[0]);
    assert_eq!(
        line,
        "old  Deactivated (reactivatable until 2026-12-07T10:00:00Z: keyward reactivate)"
    );
}
