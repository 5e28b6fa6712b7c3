//! Tests of the rotation planner, as specifications. One table of single decisions per rule of
//! the chain ([`super::rules::RULES`], in its order: first key, repair, publish, break-glass,
//! activate, replace, retire, hand out, confirm/hold/revoke, prune, rotate), each row naming its
//! rule; `plan`'s overrides (refused spec, foreign names) and the trust record; tests of
//! `Settings::resolve`; the schedule (requeue, jitter); and scenario runs and property tests on a
//! small simulator that applies each planned step to an in-memory model of the evidence and
//! checks the safety invariants. This file holds the shared builders and the table runner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use super::KeyState::{Active, Deactivated, Destroyed, Pending, Published, Retiring};
use super::*;
use crate::api::provisioning_key::{
    CompromisedKeyId, ProvisioningKey, ProvisioningKeySpec, RotationSpec, SecretTemplate,
    TokenSpec, TrustBundleSpec,
};

// One table per rule of the chain, and `plan`'s overrides ([`TABLES`] lists them in the chain's
// order).
mod activate;
mod break_glass;
mod confirm_hold_revoke;
mod deactivate;
mod first_key;
mod hand_out;
mod overrides;
mod prune;
mod publish;
mod repair;
mod replace;
mod retire;
mod rotate;

mod resolve;
mod resolve_limits;
mod sim;
mod timing;
mod trust_record;
mod writes;

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

const DAY: i64 = 86_400;
/// Token lifetime of [`settings`].
const TTL: u64 = 3600;

/// The fixed "now" of the table tests.
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0)
        .single()
        .expect("valid date")
}

fn ago(secs: i64) -> DateTime<Utc> {
    now() - chrono::Duration::seconds(secs)
}

fn later(secs: i64) -> DateTime<Utc> {
    now() + chrono::Duration::seconds(secs)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The key of sequence number `seq` in these tests: derived from `seq`, so tables and the
/// simulator name the same key ids.
fn key_pair(seq: u32) -> crate::keys::KeyPair {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&seq.to_be_bytes());
    crate::keys::KeyPair::from_seed(&seed)
}

/// The RFC 7638 key id of [`key_pair`]`(seq)`.
fn kid(seq: u32) -> String {
    thread_local! {
        static KIDS: std::cell::RefCell<BTreeMap<u32, String>> = const {
            std::cell::RefCell::new(BTreeMap::new())
        };
    }
    KIDS.with(|k| {
        k.borrow_mut()
            .entry(seq)
            .or_insert_with(|| key_pair(seq).key_id())
            .clone()
    })
}

/// Resolved settings with short durations: minInterval 1m, publishDelay 2m, overlap 10m,
/// confirmationTimeout 15m, token ttl 1h, no interval, no request.
fn settings() -> Settings {
    Settings {
        secret_name: "demo".into(),
        trust_bundle_name: "demo-trust".into(),
        include_private_key: false,
        proof_of_possession: false,
        interval: None,
        min_interval: secs(60),
        publish_delay: secs(120),
        overlap: secs(600),
        confirmation_timeout: secs(900),
        revoke_when_unused_for: None,
        // Destroyed at once: the tables of the first revocation step predate deactivation;
        // `deactivate.rs` has the rows of a retained key.
        retain_deactivated_for: Duration::ZERO,
        claims: BTreeMap::new(),
        window: None,
        request_token: None,
        token_ttl: secs(TTL),
        audience: "keyward".into(),
        issuer: "keyward".into(),
        suspend: false,
        compromised: BTreeSet::new(),
        clock_skew: secs(60),
        // No uid: no offsets, so the table's times are the ones asked for; the jitter has its
        // own rows and properties.
        uid: String::new(),
        refused: None,
    }
}

/// A key in `state` with consistent timestamps: key `seq` is minted `20 - seq` days ago,
/// recorded as published 10s and activated 5m after its mint, retired when its successor is
/// activated (a day later) and revoked shortly after.
fn key(seq: u32, state: KeyState) -> ObservedKey {
    let created_at = ago((20 - i64::from(seq)) * DAY);
    let plus = |s: i64| Some(created_at + chrono::Duration::seconds(s));
    ObservedKey {
        seq,
        kid: kid(seq),
        fingerprint: format!("fp{seq}"),
        state,
        trigger: if seq == 1 {
            Trigger::Initial
        } else {
            Trigger::Interval
        },
        consumed_request_token: None,
        consumed_annotation: None,
        created_at,
        published_at: if state >= KeyState::Published {
            plus(10)
        } else {
            None
        },
        activated_at: if state >= KeyState::Active {
            plus(300)
        } else {
            None
        },
        retired_at: if state >= KeyState::Retiring {
            plus(DAY + 300)
        } else {
            None
        },
        revoked_at: if state == KeyState::Destroyed {
            plus(DAY + 1000)
        } else {
            None
        },
        deactivated_at: if state == KeyState::Deactivated {
            plus(DAY + 1000)
        } else {
            None
        },
        reactivated_at: None,
        consumed_reactivate: None,
        has_private_key: state != KeyState::Destroyed,
        last_token_exp: None,
        edited: None,
    }
}

/// Key 1 as a first key is created (`Step::Mint { active: true }`): active from its creation a
/// minute ago, its publication and activation recorded at that time.
fn first_active() -> ObservedKey {
    ObservedKey {
        created_at: ago(60),
        published_at: Some(ago(60)),
        activated_at: Some(ago(60)),
        ..key(1, Active)
    }
}

/// An owned agent Secret holding `kid` and a token issued a minute ago with the default ttl.
fn agent(kid: &str) -> AgentSecretObs {
    let iat = ago(60).timestamp();
    AgentSecretObs::Owned(AgentSecret {
        kid: Some(kid.to_string()),
        token_iat: Some(iat),
        token_exp: Some(iat + TTL as i64),
        token_claims_match: true,
        static_claims_match: true,
        has_private_key: false,
        has_token: true,
        metadata_matches: true,
        handed_out_at: Some(ago(60)),
        token_audience: Some("keyward".into()),
        token_issuer: Some("keyward".into()),
    })
}

fn agent_with(kid: &str, f: impl FnOnce(&mut AgentSecret)) -> AgentSecretObs {
    let AgentSecretObs::Owned(mut s) = agent(kid) else {
        unreachable!()
    };
    f(&mut s);
    AgentSecretObs::Owned(s)
}

/// Steady evidence for `keys`: the bundle is the desired one, the agent Secret holds the
/// current key with a fresh token, no consumers, no annotation.
fn obs(keys: Vec<ObservedKey>) -> Observed {
    let (kids, revoked) = desired_bundle(&keys);
    // The current key was handed out right after its activation.
    let agent_secret = current(&keys).map_or(AgentSecretObs::Missing, |c| {
        agent_with(&c.kid, |a| {
            a.handed_out_at = c.activated_at.or(Some(ago(60)))
        })
    });
    let last_seq = keys.iter().map(|k| k.seq).max().unwrap_or(0);
    Observed {
        keys,
        rotate_annotation: None,
        reactivate_annotation: None,
        bundle: BundleObs::Owned {
            kids,
            revoked,
            last_seq,
        },
        agent_secret,
        consumers: Vec::new(),
        uncovered: Some(Vec::new()),
        usage: None,
        record: None,
        legacy_record: Default::default(),
    }
}

/// `o` with the trust record the operator keeps, unless it has one: every key id the bundle
/// trusts (but a compromised one) and every minted one recorded. Most tests are about
/// everything else; the record's own tests set it, and the simulator starts without one.
fn recorded(settings: &Settings, o: &Observed) -> Observed {
    let mut o = o.clone();
    if o.record.is_none() {
        let mut prev = TrustRecord::default();
        if let BundleObs::Owned { kids, .. } = &o.bundle {
            for k in kids {
                prev.kids.insert(k.clone(), settings.token_ttl.as_secs());
            }
        }
        o.record = Some(prev);
        o.record = Some(desired_record(settings, &o));
    }
    o
}

/// The planner on [`recorded`] evidence.
fn plan(settings: &Settings, obs: &Observed, now: DateTime<Utc>) -> Plan {
    crate::rotation::plan(settings, &recorded(settings, obs), now)
}

fn bundle(kids: &[u32], revoked: &[u32]) -> BundleObs {
    BundleObs::Owned {
        kids: kids.iter().map(|s| kid(*s)).collect(),
        revoked: revoked.iter().map(|s| kid(*s)).collect(),
        last_seq: kids.iter().chain(revoked).copied().max().unwrap_or(0),
    }
}

fn consumer(name: &str, confirmed: Option<u32>, rolled_at: Option<DateTime<Utc>>) -> Consumer {
    Consumer {
        name: name.into(),
        confirmed_kid: confirmed.map(kid),
        rolled_at,
        waiting_reason: None,
    }
}

fn with_settings(f: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = settings();
    f(&mut s);
    s
}

fn with_obs(keys: Vec<ObservedKey>, f: impl FnOnce(&mut Observed)) -> Observed {
    let mut o = obs(keys);
    f(&mut o);
    o
}

/// A verifier replica that started `since` seconds ago and reported up to `watermark` seconds
/// ago (lease 30 s, resolution 10 s, every namespace).
fn replica(since: i64, watermark: i64) -> crate::usage::Replica {
    crate::usage::Replica {
        name: format!("v-{since}"),
        since: ago(since),
        watermark: ago(watermark),
        lease_duration: secs(30),
        namespaces: None,
        resolution: secs(10),
        stopped: false,
        reports: Default::default(),
        reports_overflow: false,
        heartbeat: None,
        pending: 0,
    }
}

/// Reported use: these replicas, and each (seq, seconds ago) the last use of that key.
fn usage(replicas: Vec<crate::usage::Replica>, used: &[(u32, i64)]) -> Option<UsageObs> {
    let leases: Vec<Result<crate::usage::Replica, String>> = replicas.into_iter().map(Ok).collect();
    let mut key_use = crate::usage::KeyUse::default();
    for (seq, at) in used {
        key_use.last_used.insert(kid(*seq), ago(*at));
    }
    Some(UsageObs {
        coverage: crate::usage::coverage(&leases, &[], "ns", now()),
        key_use,
    })
}

/// [`settings`] with `revokeWhenUnusedFor: 5m`.
fn unused_5m() -> Settings {
    with_settings(|s| s.revoke_when_unused_for = Some(secs(300)))
}

/// Key 1 retiring, key 2 active, every consumer confirmed on 2: revocable on the agents'
/// evidence alone; `usage` decides the rest.
fn confirmed_with(usage: Option<UsageObs>) -> Observed {
    with_obs(
        vec![
            ObservedKey {
                retired_at: Some(ago(60)),
                ..key(1, Retiring)
            },
            key(2, Active),
        ],
        |o| {
            o.consumers = vec![consumer("a", Some(2), Some(ago(30)))];
            o.usage = usage;
        },
    )
}

fn compromised(seqs: &[u32]) -> BTreeSet<String> {
    seqs.iter().map(|s| kid(*s)).collect()
}

fn some(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// A ProvisioningKey named "demo" with this spec.
fn pk(spec: ProvisioningKeySpec) -> ProvisioningKey {
    ProvisioningKey::new("demo", spec)
}

fn rotation(f: impl FnOnce(&mut RotationSpec)) -> ProvisioningKeySpec {
    let mut r = RotationSpec::default();
    f(&mut r);
    ProvisioningKeySpec {
        rotation: Some(r),
        ..Default::default()
    }
}

/// A spec with this secret template.
fn template(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> ProvisioningKeySpec {
    let map = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    ProvisioningKeySpec {
        secret_template: Some(SecretTemplate {
            labels: map(labels),
            annotations: map(annotations),
        }),
        ..Default::default()
    }
}

/// Proptest settings: 256 cases (well under a second); `PROPTEST_CASES` asks for more.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok());
    ProptestConfig {
        cases: cases.unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The trust record of the simulator's settings listing these keys (token ttl each).
fn sim_record(settings: &Settings, seqs: &[u32]) -> TrustRecord {
    TrustRecord {
        bundle: settings.trust_bundle_name.clone(),
        aud: settings.audience.clone(),
        iss: settings.issuer.clone(),
        kids: seqs
            .iter()
            .map(|s| (kid(*s), settings.token_ttl.as_secs()))
            .collect(),
        deactivated: Default::default(),
        claims: Default::default(),
        pop: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Table of single decisions
// ---------------------------------------------------------------------------------------------

/// Extra expectations on a plan besides its step and phase.
#[derive(Debug)]
enum Check {
    Requeue(Duration),
    Blocked(&'static str),
    NotBlocked,
    Rotating(&'static str),
    Stalled,
    NotStalled,
    NextRotationAt(DateTime<Utc>),
    TokenRefreshAt(DateTime<Utc>),
    RotatingMentions(&'static str),
    StalledBecause(&'static str),
}

impl Check {
    fn verify(&self, p: &Plan) -> Result<(), String> {
        let ok = match self {
            Check::Requeue(d) => p.requeue_after == Some(*d),
            Check::Blocked(reason) => p.blocked.as_ref().is_some_and(|w| w.reason == *reason),
            Check::NotBlocked => p.blocked.is_none(),
            Check::Rotating(reason) => p.rotating.as_ref().is_some_and(|w| w.reason == *reason),
            Check::Stalled => p
                .stalled
                .as_ref()
                .is_some_and(|w| w.reason == reasons::ROTATION_STALLED),
            Check::NotStalled => p.stalled.is_none(),
            Check::NextRotationAt(t) => p.next_rotation_at == Some(*t),
            Check::TokenRefreshAt(t) => p.token_refresh_at == Some(*t),
            Check::RotatingMentions(text) => p
                .rotating
                .as_ref()
                .is_some_and(|w| w.message.contains(text)),
            Check::StalledBecause(reason) => {
                p.stalled.as_ref().is_some_and(|w| w.reason == *reason)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!("check {self:?} failed"))
        }
    }
}

struct Case {
    /// The rule of [`super::rules::RULES`] that decides this row (under `plan`'s overrides).
    rule: &'static str,
    name: &'static str,
    settings: Settings,
    observed: Observed,
    now: DateTime<Utc>,
    expect_step: Option<Step>,
    expect_phase: Phase,
    checks: Vec<Check>,
}

fn case(
    rule: &'static str,
    name: &'static str,
    settings: Settings,
    observed: Observed,
    expect_step: Option<Step>,
    expect_phase: Phase,
) -> Case {
    Case {
        rule,
        name,
        settings,
        observed,
        now: now(),
        expect_step,
        expect_phase,
        checks: Vec::new(),
    }
}

impl Case {
    fn check(mut self, c: Check) -> Self {
        self.checks.push(c);
        self
    }

    fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }
}

/// Every table, in the chain's order.
const TABLES: &[fn() -> Vec<Case>] = &[
    first_key::cases,
    repair::cases,
    publish::cases,
    break_glass::cases,
    activate::cases,
    replace::cases,
    retire::cases,
    hand_out::cases,
    confirm_hold_revoke::cases,
    prune::cases,
    deactivate::cases,
    rotate::cases,
    overrides::cases,
];

fn all_cases() -> Vec<Case> {
    TABLES.iter().flat_map(|table| table()).collect()
}

/// Plans each row: its step, phase and checks, and the same plan again (deterministic).
fn run_table(cases: Vec<Case>) {
    assert_eq!(
        RETAIN_REVOKED, 5,
        "the prune cases assume RETAIN_REVOKED = 5"
    );
    let mut failures = Vec::new();
    for c in &cases {
        let p = plan(&c.settings, &c.observed, c.now);
        let mut problems = Vec::new();
        if p.step != c.expect_step {
            problems.push(format!(
                "step: expected {:?}, got {:?}",
                c.expect_step, p.step
            ));
        }
        if p.phase != c.expect_phase {
            problems.push(format!(
                "phase: expected {:?}, got {:?}",
                c.expect_phase, p.phase
            ));
        }
        problems.extend(c.checks.iter().filter_map(|check| check.verify(&p).err()));
        if p != plan(&c.settings, &c.observed, c.now) {
            problems.push("not deterministic".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "case {:?} (rule {:?}):\n    {}\n    plan: {p:?}",
                c.name,
                c.rule,
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The tables and the chain cannot drift: every row names a rule of
/// [`super::rules::RULES`], and every rule has rows.
#[test]
fn every_row_names_a_rule_of_the_chain() {
    let chain: Vec<&str> = super::rules::RULES
        .iter()
        .map(|(name, _, _)| *name)
        .collect();
    let cases = all_cases();
    let unknown: Vec<String> = cases
        .iter()
        .filter(|c| !chain.contains(&c.rule))
        .map(|c| format!("{:?} names {:?}", c.name, c.rule))
        .collect();
    assert!(
        unknown.is_empty(),
        "rows naming no rule of {chain:?}:\n{}",
        unknown.join("\n")
    );
    let untested: Vec<&&str> = chain
        .iter()
        .filter(|rule| !cases.iter().any(|c| c.rule == **rule))
        .collect();
    assert!(untested.is_empty(), "rules without a row: {untested:?}");
}

/// Whatever else the table's states show: with `revokeWhenUnusedFor` set and reported use that
/// is not a whole quiet window (not read, no replica, a silent one, a restarted one, the old key
/// in use now), no key is ever revoked except as compromised.
#[test]
fn unused_for_never_revokes_without_the_control_planes_word() {
    let evidence: Vec<(&str, Option<UsageObs>)> = vec![
        ("not read", None),
        ("no replica", usage(vec![], &[])),
        ("silent", usage(vec![replica(3600, 60)], &[])),
        ("restarted", usage(vec![replica(60, 1)], &[])),
        (
            "in use",
            usage(
                vec![replica(3600, 1)],
                &(0..12).map(|seq| (seq, 0)).collect::<Vec<_>>(),
            ),
        ),
    ];
    let mut checked = 0;
    for c in all_cases() {
        for (what, u) in &evidence {
            let mut settings = c.settings.clone();
            settings.revoke_when_unused_for = Some(secs(300));
            let mut observed = c.observed.clone();
            observed.usage = u.clone();
            let p = plan(&settings, &observed, c.now);
            let revocation = match p.step {
                Some(Step::Deactivate { seq }) => Some((seq, false)),
                // The end of a deactivated key's retention: it was revoked before.
                Some(Step::Destroy { seq, .. })
                    if c.observed
                        .keys
                        .iter()
                        .any(|k| k.seq == seq && k.state == KeyState::Deactivated) =>
                {
                    None
                }
                Some(Step::Destroy { seq, emergency }) => Some((seq, emergency)),
                _ => None,
            };
            if let Some((seq, emergency)) = revocation {
                assert!(
                    emergency,
                    "case {:?} with use {what}: key {seq} revoked without the control plane's word",
                    c.name
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100);
}

#[test]
fn table_case_names_are_unique() {
    let cases = all_cases();
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len());
}
