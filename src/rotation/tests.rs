//! Tests of the rotation planner: a table of single decisions covering every branch, tests of
//! `Settings::resolve`, scenario runs and property tests on a small simulator that applies each
//! planned step to an in-memory model of the evidence and checks the safety invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;

use super::KeyState::{Active, Pending, Published, Retiring, Revoked};
use super::*;
use crate::api::provisioning_key::{
    CompromisedKeyId, ProvisioningKey, ProvisioningKeySpec, RotationSpec, SecretTemplate,
    TokenSpec, TrustBundleSpec,
};

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

/// A fake key id for `seq` (43 base64url characters, like an RFC 7638 thumbprint).
fn kid(seq: u32) -> String {
    format!("{:A>43}", format!("kid{seq}"))
}

/// Resolved settings with short durations: minInterval 1m, publishDelay 2m, overlap 10m,
/// confirmationTimeout 15m, token ttl 1h, no interval, no request.
fn settings() -> Settings {
    Settings {
        secret_name: "demo".into(),
        trust_bundle_name: "demo-trust".into(),
        include_private_key: false,
        interval: None,
        min_interval: secs(60),
        publish_delay: secs(120),
        overlap: secs(600),
        confirmation_timeout: secs(900),
        revoke_when_unused_for: None,
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
        revoked_at: if state >= KeyState::Revoked {
            plus(DAY + 1000)
        } else {
            None
        },
        has_private_key: state != KeyState::Revoked,
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
        has_private_key: false,
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
    super::plan(settings, &recorded(settings, obs), now)
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
    name: &'static str,
    settings: Settings,
    observed: Observed,
    now: DateTime<Utc>,
    expect_step: Option<Step>,
    expect_phase: Phase,
    checks: Vec<Check>,
}

fn case(
    name: &'static str,
    settings: Settings,
    observed: Observed,
    expect_step: Option<Step>,
    expect_phase: Phase,
) -> Case {
    Case {
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

fn cases() -> Vec<Case> {
    use Step::*;
    let s = settings;
    vec![
        // --- First key -----------------------------------------------------------------------
        case(
            "first mint consumes the present requestToken and annotation",
            with_settings(|s| s.request_token = some("r1")),
            with_obs(vec![], |o| {
                o.rotate_annotation = some("a1");
                o.bundle = BundleObs::Missing;
            }),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: some("r1"),
                consumed_annotation: some("a1"),
                active: true,
            }),
            Phase::Pending,
        ),
        case(
            "first mint without requests",
            s(),
            with_obs(vec![], |o| o.bundle = BundleObs::Missing),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: true,
            }),
            Phase::Pending,
        ),
        case(
            "first mint while the bundle trusts an unrecorded key: created pending",
            s(),
            with_obs(vec![], |o| o.bundle = bundle(&[7], &[])),
            Some(Mint {
                seq: 8,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        case(
            "first mint while an agent Secret exists: created pending",
            s(),
            with_obs(vec![], |o| {
                o.bundle = BundleObs::Missing;
                o.agent_secret = agent(&kid(9));
            }),
            Some(Mint {
                seq: 1,
                trigger: Trigger::Initial,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        case(
            "first key created active, crash before the bundle: the bundle is written first",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = BundleObs::Missing;
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            "first key created active, bundle emptied by someone: rewritten before the hand-out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = bundle(&[], &[]);
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            "first key created active, crash after the bundle: handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::NewKey,
            }),
            Phase::Pending,
        ),
        case(
            "first key created active, bundle someone else's: never handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = AgentSecretObs::Missing;
            }),
            None,
            Phase::Pending,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "first key created active, agent Secret someone else's: not handed out",
            s(),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Foreign;
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            "first key created active, compromised before its hand-out: a successor is minted",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(vec![first_active()], |o| {
                o.agent_secret = AgentSecretObs::Missing;
            }),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        case(
            "first key created active and handed out: ready",
            s(),
            obs(vec![first_active()]),
            None,
            Phase::Ready,
        )
        .check(Check::NotBlocked),
        case(
            "rotated key whose bundle became someone else's: not handed out",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = agent(&kid(1));
            }),
            None,
            Phase::Publishing,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN))
        .check(Check::Rotating(reasons::PUBLISHING)),
        case(
            "first key: pending is labelled published before the bundle is written",
            s(),
            with_obs(vec![key(1, Pending)], |o| o.bundle = BundleObs::Missing),
            Some(MarkPublished { seq: 1 }),
            Phase::Publishing,
        ),
        case(
            "rotated key: pending is labelled published",
            s(),
            obs(vec![key(1, Active), key(2, Pending)]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "missing bundle is written with the published key",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: None,
                    ..key(1, Published)
                }],
                |o| o.bundle = BundleObs::Missing,
            ),
            Some(WriteBundle {
                trusted: vec![kid(1)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            "bundle mismatch: exact trusted and revoked lists in seq order",
            s(),
            with_obs(
                vec![
                    key(1, Revoked),
                    key(2, Retiring),
                    key(3, Active),
                    ObservedKey {
                        published_at: None,
                        ..key(4, Published)
                    },
                ],
                |o| o.bundle = bundle(&[2, 3], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(2), kid(3), kid(4)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            "bundle mismatch in the revoked list only",
            s(),
            with_obs(vec![key(1, Revoked), key(2, Active)], |o| {
                o.bundle = bundle(&[2], &[])
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            "bundle that still trusts a revoked key is rewritten",
            s(),
            with_obs(vec![key(1, Revoked), key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[])
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            "publication is recorded once the bundle contains the kid",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: None,
                    ..key(2, Published)
                },
            ]),
            Some(RecordPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "publication is not recorded while the bundle lacks the kid",
            s(),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: None,
                        ..key(2, Published)
                    },
                ],
                |o| o.bundle = bundle(&[1], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(1), kid(2)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            "first key is activated at once (no publishDelay)",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: Some(now()),
                    ..key(1, Published)
                }],
                |o| o.agent_secret = AgentSecretObs::Missing,
            ),
            Some(Activate {
                seq: 1,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        // --- publishDelay ------------------------------------------------------------------
        case(
            "rotated key is not activated before publishDelay",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(60)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(60)))
        .check(Check::Rotating(reasons::PUBLISHING)),
        case(
            "rotated key is activated once publishDelay has passed",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(120)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        case(
            "the same evidence once publishDelay has passed: activated",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(60)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        )
        .at(later(60)),
        case(
            "publishDelay counts from published_at, not from the mint",
            s(),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    created_at: ago(DAY),
                    published_at: Some(ago(119)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(1))),
        // --- Retirement and hand-out ---------------------------------------------------------
        case(
            "older active key retires",
            s(),
            with_obs(vec![key(1, Active), key(2, Active)], |o| {
                o.agent_secret = agent(&kid(1))
            }),
            Some(Retire { seq: 1 }),
            Phase::Confirming,
        ),
        case(
            "superseded published key retires",
            s(),
            obs(vec![key(1, Published), key(2, Active)]),
            Some(Retire { seq: 1 }),
            Phase::Confirming,
        ),
        case(
            "new key is handed out when the agent Secret holds the old kid",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = agent(&kid(1))
            }),
            Some(HandOut {
                seq: 2,
                reason: HandOutReason::NewKey,
            }),
            Phase::Confirming,
        ),
        case(
            "key is handed out when the agent Secret is missing",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = AgentSecretObs::Missing
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::NewKey,
            }),
            Phase::Pending,
        ),
        case(
            "repair on metadata mismatch",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.metadata_matches = false)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            "repair when the private key is missing but includePrivateKey is set",
            with_settings(|s| s.include_private_key = true),
            obs(vec![key(1, Active)]),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            "repair when the private key is present but not wanted",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.has_private_key = true)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            "repair when token claims differ from the spec",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.token_claims_match = false)
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        case(
            "token refresh at half the ttl",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(1800).timestamp());
                    a.token_exp = Some(ago(1800).timestamp() + TTL as i64);
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            "no token refresh before half the ttl",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(1799).timestamp());
                    a.token_exp = Some(ago(1799).timestamp() + TTL as i64);
                })
            }),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::TokenRefreshAt(later(1))),
        case(
            "token refresh when the ttl changed",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_exp = a.token_iat.map(|iat| iat + 2 * TTL as i64)
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            "token refresh when the token cannot be read",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = None;
                    a.token_exp = None;
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        ),
        case(
            "steady state: nothing to do, wake up for the token refresh",
            s(),
            obs(vec![key(1, Revoked), key(2, Active)]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1740)))
        .check(Check::TokenRefreshAt(later(1740)))
        .check(Check::NotBlocked),
        // --- Revocation without consumers: overlap --------------------------------------------
        case(
            "no revocation before the overlap (no consumers)",
            s(),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(599)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::Rotating(reasons::OVERLAP)),
        case(
            "revocation at retired_at + overlap (no consumers)",
            s(),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(600)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            Some(Revoke {
                seq: 1,
                emergency: false,
            }),
            Phase::Overlap,
        ),
        // --- revokeWhenUnusedFor: the control plane's word ------------------------------------
        case(
            "unused-for: revoked when every replica vouches for the whole window",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 400), (2, 1)])),
            Some(Revoke {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            "unused-for: held while the old key was used inside the window",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 30)])),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE))
        .check(Check::RotatingMentions("last used at"))
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(10))),
        case(
            "unused-for: a use just before the window counts (resolution)",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5)], &[(1, 310)])),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE)),
        case(
            "unused-for: a replica restarted inside the window is not yet evidence",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5), replica(100, 5)], &[])),
            None,
            Phase::Overlap,
        )
        .check(Check::RotatingMentions("not yet vouched"))
        .check(Check::NotStalled),
        case(
            "unused-for: usage not read is never evidence (VerifierSilent)",
            unused_5m(),
            confirmed_with(None),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::Rotating(reasons::VERIFIER_SILENT)),
        case(
            "unused-for: no verifier replica is never evidence (VerifierSilent)",
            unused_5m(),
            confirmed_with(usage(vec![], &[])),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::RotatingMentions("no keyward verifier replica")),
        case(
            "unused-for: one silent replica holds it, however quiet the others",
            unused_5m(),
            confirmed_with(usage(vec![replica(3600, 5), replica(3600, 120)], &[])),
            None,
            Phase::Stalled,
        )
        .check(Check::StalledBecause(reasons::VERIFIER_SILENT))
        .check(Check::RotatingMentions("silent: v-3600")),
        case(
            "unused-for: the agents' evidence still comes first",
            unused_5m(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("a", Some(1), Some(ago(10)))];
                o.usage = usage(vec![replica(3600, 5)], &[]);
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::Rotating(reasons::CONFIRMING)),
        case(
            "unused-for: no consumers, overlap passed, still in use: held",
            unused_5m(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(600)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.usage = usage(vec![replica(3600, 5)], &[(1, 20)]),
            ),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OLD_KEY_IN_USE)),
        case(
            "unused-for: compromisedKeys overrides it (used now, verifier silent)",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.revoke_when_unused_for = Some(secs(300));
            }),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| o.usage = usage(vec![replica(3600, 120)], &[(1, 0)]),
            ),
            Some(Revoke {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        // --- Revocation with consumers: evidence --------------------------------------------
        case(
            "no revocation while a consumer is confirmed on the old kid (overlap long past)",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![
                    consumer("a", Some(2), Some(ago(10))),
                    consumer("b", Some(1), Some(ago(10))),
                ]
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::Rotating(reasons::CONFIRMING))
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(890))),
        case(
            "no revocation while a consumer has confirmed nothing yet",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![
                    consumer("a", Some(2), None),
                    consumer("b", None, Some(now())),
                ]
            }),
            None,
            Phase::Confirming,
        ),
        case(
            "revocation as soon as every consumer is confirmed on the current kid",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(now()),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| {
                    o.consumers = vec![
                        consumer("a", Some(2), Some(ago(10))),
                        consumer("b", Some(2), Some(ago(10))),
                    ]
                },
            ),
            Some(Revoke {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            "stalled after confirmationTimeout from the roll",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("a", Some(1), Some(ago(900)))]
            }),
            None,
            Phase::Stalled,
        )
        .check(Check::Stalled),
        case(
            "not stalled before confirmationTimeout from the roll (retired long ago)",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(100 * 3600)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(899)))],
            ),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(1))),
        case(
            "not rolled yet: confirmationTimeout counts from the retirement",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(900)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", None, None)],
            ),
            None,
            Phase::Stalled,
        )
        .check(Check::Stalled),
        case(
            "a delayed roll is never a stall",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![Consumer {
                    waiting_reason: some("RolloutDelayed: rollout minInterval"),
                    ..consumer("a", Some(1), None)
                }]
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(1740))),
        case(
            "a roll from an earlier rotation does not start the confirmationTimeout",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(100)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(5000)))],
            ),
            None,
            Phase::Confirming,
        )
        .check(Check::NotStalled)
        .check(Check::Requeue(secs(800))),
        // --- Requests ---------------------------------------------------------------------------
        case(
            "new requestToken triggers a rotation",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![ObservedKey {
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r2"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "requestToken consumed by the mint: no second mint",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![
                ObservedKey {
                    consumed_request_token: some("r1"),
                    ..key(1, Active)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Pending)
                },
            ]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "requestToken consumed: nothing to do after the rotation",
            with_settings(|s| s.request_token = some("r2")),
            obs(vec![
                ObservedKey {
                    consumed_request_token: some("r1"),
                    ..key(1, Revoked)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Ready,
        ),
        case(
            "removing the requestToken does not rotate",
            s(),
            obs(vec![ObservedKey {
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        ),
        case(
            "new rotate annotation triggers a rotation",
            s(),
            with_obs(
                vec![ObservedKey {
                    consumed_annotation: some("a1"),
                    ..key(1, Active)
                }],
                |o| o.rotate_annotation = some("a2"),
            ),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Annotation,
                consumed_request_token: None,
                consumed_annotation: some("a2"),
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "annotation consumed by the mint: no second mint",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        consumed_annotation: some("a1"),
                        ..key(1, Active)
                    },
                    ObservedKey {
                        consumed_annotation: some("a2"),
                        ..key(2, Pending)
                    },
                ],
                |o| o.rotate_annotation = some("a2"),
            ),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "annotation consumed: nothing to do after the rotation",
            s(),
            with_obs(
                vec![
                    ObservedKey {
                        consumed_annotation: some("a1"),
                        ..key(1, Revoked)
                    },
                    ObservedKey {
                        consumed_annotation: some("a2"),
                        ..key(2, Active)
                    },
                ],
                |o| o.rotate_annotation = some("a2"),
            ),
            None,
            Phase::Ready,
        ),
        case(
            "token and annotation requested together: one mint consumes both",
            with_settings(|s| s.request_token = some("r2")),
            with_obs(vec![key(1, Active)], |o| o.rotate_annotation = some("a2")),
            Some(Mint {
                seq: 2,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r2"),
                consumed_annotation: some("a2"),
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "request during an in-flight rotation waits (publishing)",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            None,
            Phase::Publishing,
        ),
        case(
            "request during an in-flight rotation waits (overlap)",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(10)),
                    ..key(1, Retiring)
                },
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Overlap,
        ),
        case(
            "request during an in-flight rotation waits (confirming)",
            with_settings(|s| s.request_token = some("r3")),
            with_obs(
                vec![
                    key(1, Retiring),
                    ObservedKey {
                        consumed_request_token: some("r2"),
                        ..key(2, Active)
                    },
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(10)))],
            ),
            None,
            Phase::Confirming,
        ),
        case(
            "request made during a rotation is served after it completes",
            with_settings(|s| s.request_token = some("r3")),
            obs(vec![
                key(1, Revoked),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    ..key(2, Active)
                },
            ]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r3"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        // --- minInterval ------------------------------------------------------------------------
        case(
            "minInterval delays a request until the earliest time",
            with_settings(|s| {
                s.request_token = some("r3");
                s.min_interval = secs(600);
            }),
            obs(vec![
                key(1, Revoked),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    created_at: ago(100),
                    activated_at: Some(ago(50)),
                    ..key(2, Active)
                },
            ]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(500)))
        .check(Check::Rotating(reasons::IDLE)),
        case(
            "minInterval elapsed: the delayed request is served",
            with_settings(|s| {
                s.request_token = some("r3");
                s.min_interval = secs(600);
            }),
            obs(vec![
                key(1, Revoked),
                ObservedKey {
                    consumed_request_token: some("r2"),
                    created_at: ago(600),
                    activated_at: Some(ago(550)),
                    ..key(2, Active)
                },
            ]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r3"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "minInterval delays a due interval rotation",
            with_settings(|s| {
                s.interval = Some(secs(30));
                s.min_interval = secs(600);
            }),
            obs(vec![ObservedKey {
                created_at: ago(100),
                activated_at: Some(ago(50)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(500))),
        // --- interval ---------------------------------------------------------------------------
        case(
            "interval due: rotation with Trigger::Interval",
            with_settings(|s| s.interval = Some(secs(3600))),
            obs(vec![ObservedKey {
                activated_at: Some(ago(3600)),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Interval,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "interval not due yet: wake up when it is",
            with_settings(|s| s.interval = Some(secs(3600))),
            obs(vec![ObservedKey {
                activated_at: Some(ago(3599)),
                ..key(1, Active)
            }]),
            None,
            Phase::Ready,
        )
        .check(Check::Requeue(secs(1)))
        .check(Check::NextRotationAt(later(1))),
        // --- suspend ----------------------------------------------------------------------------
        case(
            "suspend blocks a requested rotation",
            with_settings(|s| {
                s.suspend = true;
                s.request_token = some("r2");
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        case(
            "suspend blocks a due interval rotation",
            with_settings(|s| {
                s.suspend = true;
                s.interval = Some(secs(3600));
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        case(
            "suspend does not block the activation of an in-flight key",
            with_settings(|s| s.suspend = true),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(200)),
                    ..key(2, Published)
                },
            ]),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        ),
        case(
            "suspend does not block the revocation of an in-flight old key",
            with_settings(|s| s.suspend = true),
            obs(vec![
                ObservedKey {
                    retired_at: Some(ago(700)),
                    ..key(1, Retiring)
                },
                key(2, Active),
            ]),
            Some(Revoke {
                seq: 1,
                emergency: false,
            }),
            Phase::Overlap,
        ),
        case(
            "suspended and idle",
            with_settings(|s| s.suspend = true),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        ),
        // --- Names taken ------------------------------------------------------------------------
        case(
            "foreign trust bundle: blocked, not even the first mint",
            s(),
            with_obs(vec![], |o| o.bundle = BundleObs::Foreign),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "foreign trust bundle during a rotation: labels move, the bundle is never written",
            s(),
            with_obs(vec![key(1, Active), key(2, Pending)], |o| {
                o.bundle = BundleObs::Foreign
            }),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "foreign agent Secret: blocked",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = AgentSecretObs::Foreign
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            "foreign agent Secret before the first key: blocked",
            s(),
            with_obs(vec![], |o| o.agent_secret = AgentSecretObs::Foreign),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        // --- Break-glass --------------------------------------------------------------------------
        case(
            "compromised current key: successor minted ignoring minInterval and suspend",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.suspend = true;
                s.min_interval = secs(DAY as u64);
                s.request_token = some("r1");
            }),
            obs(vec![ObservedKey {
                created_at: ago(10),
                activated_at: Some(ago(5)),
                consumed_request_token: some("r1"),
                ..key(1, Active)
            }]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: some("r1"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        case(
            "compromise: successor labelled published",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    created_at: now(),
                    ..key(2, Pending)
                },
            ]),
            Some(MarkPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "compromise: successor written into the bundle (compromised key still trusted)",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: None,
                        ..key(2, Published)
                    },
                ],
                |o| o.bundle = bundle(&[1], &[]),
            ),
            Some(WriteBundle {
                trusted: vec![kid(1), kid(2)],
                revoked: vec![],
            }),
            Phase::Publishing,
        ),
        case(
            "compromise: successor publication recorded",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    published_at: None,
                    ..key(2, Published)
                },
            ]),
            Some(RecordPublished { seq: 2 }),
            Phase::Publishing,
        ),
        case(
            "compromise: key revoked as soon as the successor is published (before publishDelay)",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    trigger: Trigger::Compromised,
                    published_at: Some(now()),
                    ..key(2, Published)
                },
            ]),
            Some(Revoke {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        )
        .check(Check::Rotating(reasons::EMERGENCY)),
        case(
            "compromise: bundle rewritten with the successor only",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Revoked),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| {
                    o.bundle = bundle(&[1, 2], &[]);
                    o.agent_secret = agent(&kid(1));
                },
            ),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            "compromise: successor activated at once as an emergency",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Revoked),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(Activate {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromise: successor handed out",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Revoked),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        activated_at: Some(now()),
                        ..key(2, Active)
                    },
                ],
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(HandOut {
                seq: 2,
                reason: HandOutReason::NewKey,
            }),
            Phase::Confirming,
        ),
        case(
            "compromise: no confirmation needed, consumers still on the compromised kid",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        trigger: Trigger::Compromised,
                        published_at: Some(now()),
                        ..key(2, Published)
                    },
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(10)))],
            ),
            Some(Revoke {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromise during a rotation: the in-flight key is the successor",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            Some(Revoke {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromise during a rotation: the in-flight successor is activated as an emergency",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    key(1, Revoked),
                    ObservedKey {
                        published_at: Some(ago(10)),
                        ..key(2, Published)
                    },
                ],
                |o| o.agent_secret = agent(&kid(1)),
            ),
            Some(Activate {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromised current key with a retiring predecessor: a successor is minted first",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![key(1, Retiring), key(2, Active)]),
            Some(Mint {
                seq: 3,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "compromised pending key: revoked without ever being published",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![key(1, Active), key(2, Pending)]),
            Some(Revoke {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromised retiring key: revoked at once, consumers not awaited",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(
                vec![
                    ObservedKey {
                        retired_at: Some(ago(1)),
                        ..key(1, Retiring)
                    },
                    key(2, Active),
                ],
                |o| o.consumers = vec![consumer("a", Some(1), Some(ago(1)))],
            ),
            Some(Revoke {
                seq: 1,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromised in-flight key: revoked, the current key stays",
            with_settings(|s| s.compromised = compromised(&[2])),
            obs(vec![
                key(1, Active),
                ObservedKey {
                    published_at: Some(ago(10)),
                    ..key(2, Published)
                },
            ]),
            Some(Revoke {
                seq: 2,
                emergency: true,
            }),
            Phase::Publishing,
        ),
        case(
            "compromised key already revoked: nothing to do",
            with_settings(|s| s.compromised = compromised(&[1])),
            obs(vec![key(1, Revoked), key(2, Active)]),
            None,
            Phase::Ready,
        ),
        // --- Prune --------------------------------------------------------------------------------
        case(
            "prune the oldest revoked key beyond RETAIN_REVOKED",
            s(),
            obs((1..=6)
                .map(|s| key(s, Revoked))
                .chain([key(7, Active)])
                .collect()),
            Some(Prune { seq: 1 }),
            Phase::Ready,
        ),
        case(
            "RETAIN_REVOKED revoked keys are kept",
            s(),
            obs((1..=5)
                .map(|s| key(s, Revoked))
                .chain([key(6, Active)])
                .collect()),
            None,
            Phase::Ready,
        ),
        // --- Recovery -------------------------------------------------------------------------------
        case(
            "no key left to hand out: a new one is minted",
            s(),
            with_obs(vec![key(1, Revoked)], |o| o.agent_secret = agent(&kid(1))),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        // --- Liveness first: refused specs, names owned by someone else ------------------------
        case(
            "refused spec: a due token refresh still happens",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "rotation.interval: 1m is below the operator's floor".into(),
                })
            }),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(3000).timestamp());
                    a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                })
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        )
        .check(Check::Blocked("BelowFloor")),
        case(
            "refused spec: a due rotation is refused, not started",
            with_settings(|s| {
                s.interval = Some(secs(3600));
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Ready,
        )
        .check(Check::Blocked("BelowFloor"))
        .check(Check::Rotating(reasons::REFUSED))
        .check(Check::TokenRefreshAt(
            ago(60) + chrono::Duration::seconds(TTL as i64 / 2),
        )),
        case(
            "refused spec: a rotation in flight still completes",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "MalformedDuration",
                    message: "bad".into(),
                })
            }),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: Some(ago(200)),
                        ..key(2, Published)
                    },
                ],
                |_| {},
            ),
            Some(Activate {
                seq: 2,
                emergency: false,
            }),
            Phase::Publishing,
        )
        .check(Check::Blocked("MalformedDuration")),
        case(
            "refused spec: a valid compromisedKeys entry is honoured at once",
            with_settings(|s| {
                s.compromised = compromised(&[1]);
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
            }),
            obs(vec![key(1, Active)]),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Compromised,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "foreign agent Secret: never written, no revocation, bundle still kept",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = AgentSecretObs::Foreign;
            }),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::SECRET_NAME_TAKEN)),
        case(
            "foreign trust bundle: the token is still refreshed",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.bundle = BundleObs::Foreign;
                o.agent_secret = agent_with(&kid(1), |a| {
                    a.token_iat = Some(ago(3000).timestamp());
                    a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                });
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::TokenRefresh,
            }),
            Phase::Ready,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "foreign trust bundle: a published key is never activated",
            s(),
            with_obs(
                vec![ObservedKey {
                    published_at: None,
                    ..key(1, Published)
                }],
                |o| {
                    o.bundle = BundleObs::Foreign;
                    o.agent_secret = AgentSecretObs::Missing;
                },
            ),
            None,
            Phase::Invalid,
        )
        .check(Check::Blocked(reasons::TRUST_BUNDLE_NAME_TAKEN)),
        case(
            "agent Secret without hand-out time is repaired (the overlap clock needs it)",
            s(),
            with_obs(vec![key(1, Active)], |o| {
                o.agent_secret = agent_with(&kid(1), |a| a.handed_out_at = None);
            }),
            Some(HandOut {
                seq: 1,
                reason: HandOutReason::Repair,
            }),
            Phase::Ready,
        ),
        // --- Consumers no PolicyAgent covers ---------------------------------------------------
        case(
            "uncovered consumer: confirmed agents are not enough before the overlap",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(100)))];
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(120)));
                o.keys[0].retired_at = Some(ago(121));
                o.keys[0].last_token_exp = Some(ago(10));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Rotating(reasons::OVERLAP))
        .check(Check::Requeue(UNCOVERED_RECHECK)),
        case(
            "uncovered consumer: a sealed key also waits for its last token to expire",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(700)));
                o.keys[0].retired_at = Some(ago(701));
                o.keys[0].last_token_exp = Some(later(1000));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(UNCOVERED_RECHECK))
        .check(Check::RotatingMentions("2025-06-01T12:17:40")),
        case(
            "uncovered consumer: revoked once overlap and last token (plus skew) have passed",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(700)))];
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(700)));
                o.keys[0].retired_at = Some(ago(701));
                o.keys[0].last_token_exp = Some(ago(61));
                o.uncovered = Some(vec![Uncovered {
                    pod: "other-1".into(),
                    workload: "Deployment/other".into(),
                }]);
            }),
            Some(Revoke {
                seq: 1,
                emergency: false,
            }),
            Phase::Confirming,
        ),
        case(
            "consumers not looked at: never revoke on missing evidence",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", Some(2), Some(ago(700)))];
                o.uncovered = None;
            }),
            None,
            Phase::Confirming,
        ),
        case(
            "overlap counts from the hand-out, not from the retirement",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.keys[0].retired_at = Some(ago(3000));
                o.agent_secret = agent_with(&kid(2), |a| a.handed_out_at = Some(ago(300)));
            }),
            None,
            Phase::Overlap,
        )
        .check(Check::Requeue(secs(300))),
        // --- Tamper: the bundle, sequence numbers ----------------------------------------------
        case(
            "a trusted key whose key Secret is gone stays in the bundle",
            s(),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[]);
            }),
            None,
            Phase::Ready,
        ),
        case(
            "an unrecorded trusted key listed as compromised is revoked in the bundle",
            with_settings(|s| s.compromised = compromised(&[1])),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[1, 2], &[]);
            }),
            Some(WriteBundle {
                trusted: vec![kid(2)],
                revoked: vec![kid(1)],
            }),
            Phase::Publishing,
        ),
        case(
            "a pruned revoked key stays in the revoked list",
            s(),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = bundle(&[2], &[1]);
            }),
            None,
            Phase::Ready,
        ),
        case(
            "sequence numbers are never reused after a key Secret is deleted",
            with_settings(|s| s.request_token = some("r9")),
            with_obs(vec![key(2, Active)], |o| {
                o.bundle = BundleObs::Owned {
                    kids: vec![kid(2)],
                    revoked: vec![],
                    last_seq: 3,
                };
            }),
            Some(Mint {
                seq: 4,
                trigger: Trigger::RequestToken,
                consumed_request_token: some("r9"),
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "no current key left (its Secret deleted): a replacement is minted, the old id stays trusted",
            s(),
            with_obs(vec![key(1, Revoked)], |o| {
                o.bundle = BundleObs::Owned {
                    kids: vec![kid(2)],
                    revoked: vec![kid(1)],
                    last_seq: 2,
                };
                o.agent_secret = agent(&kid(2));
            }),
            Some(Mint {
                seq: 3,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Pending,
        ),
        case(
            "a replacement for an unrecorded current key waits publishDelay (agents still hold it)",
            s(),
            with_obs(
                vec![
                    key(1, Revoked),
                    ObservedKey {
                        published_at: Some(ago(30)),
                        ..key(3, Published)
                    },
                ],
                |o| {
                    o.bundle = BundleObs::Owned {
                        kids: vec![kid(2), kid(3)],
                        revoked: vec![kid(1)],
                        last_seq: 3,
                    };
                    o.agent_secret = agent(&kid(2));
                },
            ),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(90))),
        case(
            "an edited key Secret gets its metadata back before anything else",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.keys[0].edited = some("labelled revoked without a recorded revocation");
                o.consumers = vec![consumer("opa", Some(2), Some(ago(100)))];
            }),
            Some(Repair { seq: 1 }),
            Phase::Ready,
        ),
        case(
            "a current key that lost its private key is replaced at once, even when refused",
            with_settings(|s| {
                s.refused = Some(Refusal {
                    reason: "BelowFloor",
                    message: "below".into(),
                });
                s.suspend = true;
            }),
            with_obs(vec![key(1, Active)], |o| o.keys[0].has_private_key = false),
            Some(Mint {
                seq: 2,
                trigger: Trigger::Replacement,
                consumed_request_token: None,
                consumed_annotation: None,
                active: false,
            }),
            Phase::Publishing,
        ),
        case(
            "no refresh is attempted with a key that lost its private key; the successor waits publishDelay",
            s(),
            with_obs(
                vec![
                    key(1, Active),
                    ObservedKey {
                        published_at: Some(ago(30)),
                        trigger: Trigger::Replacement,
                        ..key(2, Published)
                    },
                ],
                |o| {
                    o.keys[0].has_private_key = false;
                    o.agent_secret = agent_with(&kid(1), |a| {
                        a.token_iat = Some(ago(3000).timestamp());
                        a.token_exp = Some(ago(3000).timestamp() + TTL as i64);
                    });
                },
            ),
            None,
            Phase::Publishing,
        )
        .check(Check::Requeue(secs(90))),
        // --- Stuck rotations are visible ---------------------------------------------------------
        case(
            "a request made during a rotation is queued and reported",
            s(),
            with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
                o.consumers = vec![consumer("opa", None, Some(ago(10)))];
                o.rotate_annotation = some("again");
            }),
            None,
            Phase::Confirming,
        )
        .check(Check::RotatingMentions("is queued")),
        case(
            "an overdue scheduled rotation is reported while suspended",
            with_settings(|s| {
                s.interval = Some(secs(DAY as u64));
                s.suspend = true;
            }),
            obs(vec![key(1, Active)]),
            None,
            Phase::Suspended,
        )
        .check(Check::RotatingMentions("overdue")),
    ]
}

#[test]
fn table() {
    let cases = cases();
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
                "case {:?}:\n    {}\n    plan: {p:?}",
                c.name,
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
    for c in cases() {
        for (what, u) in &evidence {
            let mut settings = c.settings.clone();
            settings.revoke_when_unused_for = Some(secs(300));
            let mut observed = c.observed.clone();
            observed.usage = u.clone();
            let p = plan(&settings, &observed, c.now);
            if let Some(Step::Revoke { seq, emergency }) = p.step {
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
    let cases = cases();
    let names: BTreeSet<&str> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len());
}

#[test]
fn waiting_plans_report_next_rotation_and_token_refresh() {
    let s = with_settings(|s| s.interval = Some(secs(7200)));
    let k1 = ObservedKey {
        activated_at: Some(ago(3600)),
        ..key(1, Active)
    };
    let p = plan(
        &s,
        &obs(vec![
            k1.clone(),
            ObservedKey {
                published_at: Some(ago(10)),
                ..key(2, Published)
            },
        ]),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.next_rotation_at, Some(later(3600)));
    assert_eq!(p.token_refresh_at, Some(later(1740)));
    assert_eq!(p.requeue_after, Some(secs(110)));
}

#[test]
fn requeue_is_never_zero() {
    // A request delayed by minInterval wakes up exactly when it may be served.
    let p = plan(
        &with_settings(|s| s.min_interval = secs(60)),
        &with_obs(
            vec![ObservedKey {
                created_at: now(),
                ..key(1, Active)
            }],
            |o| o.rotate_annotation = some("a"),
        ),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(secs(60)));
    // Something due in a millisecond is looked at after 200ms, never in a hot loop.
    let p = plan(
        &settings(),
        &obs(vec![
            ObservedKey {
                retired_at: Some(ago(600) + chrono::Duration::milliseconds(1)),
                ..key(1, Retiring)
            },
            key(2, Active),
        ]),
        now(),
    );
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(Duration::from_millis(200)));
}

// ---------------------------------------------------------------------------------------------
// Settings::resolve
// ---------------------------------------------------------------------------------------------

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

#[test]
fn resolve_defaults() {
    let s = Settings::resolve(&pk(ProvisioningKeySpec::default()), &Floors::default())
        .expect("the empty spec is valid");
    assert_eq!(
        s,
        Settings {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
            include_private_key: false,
            interval: None,
            min_interval: super::settings::DEFAULT_MIN_INTERVAL,
            publish_delay: super::settings::DEFAULT_PUBLISH_DELAY,
            overlap: super::settings::DEFAULT_OVERLAP,
            confirmation_timeout: super::settings::DEFAULT_CONFIRMATION_TIMEOUT,
            revoke_when_unused_for: None,
            request_token: None,
            token_ttl: super::settings::DEFAULT_TOKEN_TTL,
            audience: "keyward:/demo".into(), // per key (no namespace here)
            issuer: "keyward".into(),
            suspend: false,
            compromised: BTreeSet::new(),
            clock_skew: secs(60),
            uid: String::new(),
            refused: None,
        }
    );
    assert_eq!(s.min_interval, secs(60));
    assert_eq!(s.publish_delay, secs(120));
    assert_eq!(s.overlap, secs(600));
    assert_eq!(s.confirmation_timeout, secs(900));
    assert_eq!(s.token_ttl, secs(3600));
}

#[test]
fn resolve_explicit_values() {
    let good = "A".repeat(40) + "b-_";
    let spec = ProvisioningKeySpec {
        secret_name: some("agents"),
        include_private_key: Some(true),
        rotation: Some(RotationSpec {
            interval: some("720h"),
            min_interval: some("90s"),
            publish_delay: some("1m30s"),
            overlap: some("0.5h"),
            confirmation_timeout: some("5m"),
            revoke_when_unused_for: some("5m"),
            request_token: some("r1"),
        }),
        token: Some(TokenSpec {
            audience: some("cp"),
            ttl: some("10m"),
            issuer: some("me"),
        }),
        trust_bundle: Some(TrustBundleSpec {
            config_map_name: some("bundle"),
        }),
        suspend: Some(true),
        compromised_keys: vec![CompromisedKeyId(good.clone())],
        ..Default::default()
    };
    let s = Settings::resolve(&pk(spec), &Floors::default()).expect("valid spec");
    assert_eq!(s.secret_name, "agents");
    assert_eq!(s.trust_bundle_name, "bundle");
    assert!(s.include_private_key);
    assert_eq!(s.interval, Some(secs(720 * 3600)));
    assert_eq!(s.min_interval, secs(90));
    assert_eq!(s.publish_delay, secs(90));
    assert_eq!(s.overlap, secs(1800));
    assert_eq!(s.confirmation_timeout, secs(300));
    assert_eq!(s.revoke_when_unused_for, Some(secs(300)));
    assert_eq!(s.request_token.as_deref(), Some("r1"));
    assert_eq!(s.token_ttl, secs(600));
    assert_eq!((s.audience.as_str(), s.issuer.as_str()), ("cp", "me"));
    assert!(s.suspend);
    assert_eq!(s.compromised, BTreeSet::from([good]));
}

#[test]
fn resolve_errors() {
    let bad_kid = |k: &str| ProvisioningKeySpec {
        compromised_keys: vec![CompromisedKeyId(k.into())],
        ..Default::default()
    };
    let cases: Vec<(&str, ProvisioningKeySpec, Floors, &str, &str)> = vec![
        (
            "words",
            rotation(|r| r.interval = some("10 minutes")),
            Floors::none(),
            "MalformedDuration",
            "rotation.interval",
        ),
        (
            "negative",
            rotation(|r| r.min_interval = some("-5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.minInterval",
        ),
        (
            "no unit",
            rotation(|r| r.overlap = some("600")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "empty",
            rotation(|r| r.publish_delay = some("")),
            Floors::none(),
            "MalformedDuration",
            "rotation.publishDelay",
        ),
        (
            "bare zero",
            rotation(|r| r.publish_delay = some("0")),
            Floors::none(),
            "MalformedDuration",
            "rotation.publishDelay",
        ),
        (
            "plus sign",
            rotation(|r| r.overlap = some("+5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "leading dot",
            rotation(|r| r.overlap = some(".5h")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "negative component",
            rotation(|r| r.overlap = some("1h-5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "overflow",
            rotation(|r| r.overlap = some("99999999999999999999h")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "unknown unit",
            rotation(|r| r.overlap = some("5x")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "bad confirmationTimeout",
            rotation(|r| r.confirmation_timeout = some("soon")),
            Floors::none(),
            "MalformedDuration",
            "rotation.confirmationTimeout",
        ),
        (
            "bad ttl",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1d"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "MalformedDuration",
            "token.ttl",
        ),
        (
            "interval below floor",
            rotation(|r| r.interval = some("30m")),
            Floors::default(),
            "BelowFloor",
            "rotation.interval",
        ),
        (
            "minInterval below floor",
            rotation(|r| r.min_interval = some("10s")),
            Floors::default(),
            "BelowFloor",
            "rotation.minInterval",
        ),
        (
            "overlap below floor",
            rotation(|r| r.overlap = some("30s")),
            Floors::default(),
            "BelowFloor",
            "rotation.overlap",
        ),
        (
            "ttl below floor",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1m"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::default(),
            "BelowFloor",
            "token.ttl",
        ),
        (
            "short kid",
            bad_kid("abc"),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "kid with bad characters",
            bad_kid(&format!("{}+/", "A".repeat(41))),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "kid too long",
            bad_kid(&"A".repeat(44)),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "bad secretName",
            ProvisioningKeySpec {
                secret_name: some("Bad_Name"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "bad configMapName",
            ProvisioningKeySpec {
                trust_bundle: Some(TrustBundleSpec {
                    config_map_name: some("-x"),
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "trustBundle.configMapName",
        ),
        (
            "interval above its ceiling",
            rotation(|r| r.interval = some("8785h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.interval",
        ),
        (
            "minInterval above its ceiling",
            rotation(|r| r.min_interval = some("721h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.minInterval",
        ),
        (
            "publishDelay above its ceiling",
            rotation(|r| r.publish_delay = some("24h1s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.publishDelay",
        ),
        (
            "overlap of 10^12 seconds",
            rotation(|r| r.overlap = some("1000000000000s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.overlap",
        ),
        (
            "confirmationTimeout in days",
            rotation(|r| r.confirmation_timeout = some("30d")),
            Floors::none(),
            "MalformedDuration",
            "rotation.confirmationTimeout",
        ),
        (
            "confirmationTimeout above its ceiling",
            rotation(|r| r.confirmation_timeout = some("720h0.001s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.confirmationTimeout",
        ),
        (
            "revokeWhenUnusedFor above its ceiling",
            rotation(|r| r.revoke_when_unused_for = some("100000h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.revokeWhenUnusedFor",
        ),
        (
            "ttl above its ceiling",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("25h"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token.ttl",
        ),
        (
            "ttl written as 1e12s",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1e12s"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "MalformedDuration",
            "token.ttl",
        ),
        (
            "secretName of a key Secret's form",
            ProvisioningKeySpec {
                secret_name: some("demo-k2"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "secretName of another key's key Secret",
            ProvisioningKeySpec {
                secret_name: some("other-k17"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "reserved template label",
            template(&[("keyward.dev/key-id", "forged")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "managed-by template label",
            template(&[("app.kubernetes.io/managed-by", "me")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label key",
            template(&[("team name", "a")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label prefix",
            template(&[("Example.com/team", "a")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label value",
            template(&[("team", "pay ments")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "template label value too long",
            template(&[("team", &"a".repeat(64))], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template annotation key",
            template(&[], &[("a/b/c", "x")]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "reserved template annotation",
            template(&[], &[("keyward.dev/handed-out-at", "x")]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "template annotations too large",
            template(
                &[],
                &[
                    ("a.example/one", &"x".repeat(128 * 1024)),
                    ("a.example/two", &"x".repeat(128 * 1024)),
                ],
            ),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "empty audience",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    audience: some(""),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, floors, reason, field) in cases {
        match Settings::resolve(&pk(spec), &floors) {
            Ok(s) => failures.push(format!(
                "{name}: expected {reason} on {field}, resolved to {s:?}"
            )),
            Err(e) => {
                let got_field = match &e {
                    SpecError::MalformedDuration { field, .. }
                    | SpecError::BelowFloor { field, .. }
                    | SpecError::AboveCeiling { field, .. }
                    | SpecError::Invalid { field, .. }
                    | SpecError::NameChanged { field, .. } => *field,
                };
                if e.reason() != reason || got_field != field {
                    failures.push(format!(
                        "{name}: expected {reason} on {field}, got {} on {got_field}: {e}",
                        e.reason()
                    ));
                }
                if !e.to_string().starts_with(field) {
                    failures.push(format!("{name}: message does not name the field: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

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

/// Names the operator refuses that a spec cannot express: the ProvisioningKey's own name (a
/// label value, at most 63 characters) and a default agent Secret name of a key Secret's form.
#[test]
fn resolve_refuses_names() {
    let named = |name: &str, spec: ProvisioningKeySpec| ProvisioningKey::new(name, spec);
    /// The refusal expected: the field the message starts with, and words it contains.
    type Refused<'a> = Option<(&'a str, &'a str)>;
    let cases: Vec<(&str, ProvisioningKey, Refused)> = vec![
        (
            "63 characters",
            named(&"a".repeat(63), Default::default()),
            None,
        ),
        (
            "64 characters",
            named(&"a".repeat(64), Default::default()),
            Some(("metadata.name", "at most 63")),
        ),
        (
            "own name of a key Secret's form",
            named("a-k2", Default::default()),
            Some(("secretName", "set spec.secretName")),
        ),
        (
            "own name of a key Secret's form, with a secretName",
            named(
                "a-k2",
                ProvisioningKeySpec {
                    secret_name: some("agents-a"),
                    ..Default::default()
                },
            ),
            None,
        ),
        (
            "k8s is not a sequence",
            named("opa-k8s", Default::default()),
            None,
        ),
    ];
    for (what, pk, expected) in cases {
        match (Settings::resolve(&pk, &Floors::none()), expected) {
            (Ok(_), None) => {}
            (Err(e), Some((field, words))) => {
                assert_eq!(e.reason(), "InvalidSpec", "{what}: {e}");
                let msg = e.to_string();
                assert!(
                    msg.starts_with(field) && msg.contains(words),
                    "{what}: {msg}"
                );
            }
            (got, want) => panic!("{what}: expected {want:?}, got {got:?}"),
        }
    }
}

/// The ceilings: exactly at each is accepted, just above is `InvalidSpec` naming the field, the
/// value and the ceiling (the same constants the CRD's CEL rules are generated from).
#[test]
fn resolve_ceilings() {
    use crate::api::limits;
    let with = |field: &str, value: &str| -> ProvisioningKeySpec {
        let v = some(value);
        match field {
            "token.ttl" => ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: v,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "rotation.interval" => rotation(|r| r.interval = v),
            "rotation.minInterval" => rotation(|r| r.min_interval = v),
            "rotation.publishDelay" => rotation(|r| r.publish_delay = v),
            "rotation.overlap" => rotation(|r| r.overlap = v),
            "rotation.confirmationTimeout" => rotation(|r| r.confirmation_timeout = v),
            "rotation.revokeWhenUnusedFor" => rotation(|r| r.revoke_when_unused_for = v),
            other => panic!("no field {other}"),
        }
    };
    for c in limits::CEILINGS {
        let at = format!("{}h", c.hours);
        Settings::resolve(&pk(with(c.field, &at)), &Floors::none())
            .unwrap_or_else(|e| panic!("{}: {at} refused: {e}", c.field));
        let minutes = format!("{}m", c.hours * 60 - 1);
        Settings::resolve(&pk(with(c.field, &minutes)), &Floors::none())
            .unwrap_or_else(|e| panic!("{}: {minutes} refused: {e}", c.field));
        for above in [format!("{}h1s", c.hours), "1000000000000s".to_string()] {
            let e = Settings::resolve(&pk(with(c.field, &above)), &Floors::none())
                .expect_err("above the ceiling");
            assert_eq!(
                e,
                SpecError::AboveCeiling {
                    field: c.field,
                    value: above.clone(),
                    ceiling: at.clone(),
                }
            );
            assert_eq!(e.reason(), "InvalidSpec");
            assert_eq!(
                e.to_string(),
                format!("{}: {above} is above the ceiling of {at}", c.field)
            );
        }
    }
}

/// An invalid `secretTemplate` is refused, and what the agent Secret gets meanwhile is its valid
/// part only (so its writes never fail with 422); a valid template is copied whole.
#[test]
fn usable_template_keeps_the_valid_entries() {
    use super::settings::usable_template;
    let spec = template(
        &[
            ("team", "payments"),
            ("bad key", "x"),
            ("tier", "bad value"),
            ("keyward.dev/x", "y"),
        ],
        &[
            ("team.example/contact", "a@b"),
            ("a/b/c", "x"),
            ("keyward.dev/key-id", "forged"),
        ],
    );
    let t = spec.secret_template.clone().unwrap_or_default();
    let kept = usable_template(&t);
    assert_eq!(kept.labels.keys().collect::<Vec<_>>(), ["team"]);
    assert_eq!(
        kept.annotations.keys().collect::<Vec<_>>(),
        ["team.example/contact"]
    );
    let valid = template(
        &[("team", "payments"), ("empty", "")],
        &[("note", "any value at all")],
    );
    let t = valid.secret_template.clone().unwrap_or_default();
    assert_eq!(usable_template(&t), t);
    Settings::resolve(&pk(valid), &Floors::none()).expect("a valid template");
    // Too large together: no user annotation at all.
    let big = template(
        &[("team", "payments")],
        &[
            ("a.example/one", &"x".repeat(200 * 1024)),
            ("a.example/two", &"x".repeat(100 * 1024)),
        ],
    );
    let kept = usable_template(&big.secret_template.clone().unwrap_or_default());
    assert!(kept.annotations.is_empty());
    assert_eq!(kept.labels.len(), 1);
}

/// A refused template goes through `resolve_or_keep` like every refusal: the key keeps being
/// served with the last good settings, `Ready=False InvalidSpec`.
#[test]
fn an_invalid_template_keeps_the_last_good_settings() {
    let last = LastGood {
        names: Some(Names {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
        }),
        token_ttl: Some(secs(600)),
        ..Default::default()
    };
    let s = resolve_or_keep(
        &pk(template(&[("keyward.dev/provisioning-key", "other")], &[])),
        &Floors::none(),
        &last,
    );
    let refused = s.refused.expect("refused");
    assert_eq!(refused.reason, "InvalidSpec");
    assert!(
        refused.message.contains("secretTemplate.labels")
            && refused.message.contains("keyward.dev/provisioning-key")
            && refused.message.contains("still served"),
        "{}",
        refused.message
    );
    assert_eq!(s.token_ttl, secs(600));
    assert_eq!(s.secret_name, "demo");
}

/// Writing a default name explicitly on a live key is no change: the recorded names are the
/// effective ones. Setting another name is refused (`NameImmutable`).
#[test]
fn an_explicit_default_name_is_no_change() {
    let last = LastGood {
        names: Some(Names {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
        }),
        ..Default::default()
    };
    let explicit = ProvisioningKeySpec {
        secret_name: some("demo"),
        trust_bundle: Some(TrustBundleSpec {
            config_map_name: some("demo-trust"),
        }),
        ..Default::default()
    };
    let s = resolve_or_keep(&pk(explicit), &Floors::none(), &last);
    assert_eq!(s.refused, None);
    let other = ProvisioningKeySpec {
        secret_name: some("agents"),
        ..Default::default()
    };
    let s = resolve_or_keep(&pk(other), &Floors::none(), &last);
    assert_eq!(s.refused.map(|r| r.reason), Some("NameImmutable"));
    assert_eq!(s.secret_name, "demo");
}

#[test]
fn resolve_accepts_go_durations() {
    for (value, expected) in [
        ("720h", secs(720 * 3600)),
        ("1h30m", secs(5400)),
        ("0.5h", secs(1800)),
        ("90s", secs(90)),
        ("1.5s", Duration::from_millis(1500)),
        ("500ms", Duration::from_millis(500)),
        ("10us", Duration::from_micros(10)),
        ("10µs", Duration::from_micros(10)),
        ("7ns", Duration::from_nanos(7)),
        ("0s", Duration::ZERO),
        ("1m1m", secs(120)),
    ] {
        let s = Settings::resolve(&pk(rotation(|r| r.overlap = some(value))), &Floors::none());
        assert_eq!(s.map(|s| s.overlap), Ok(expected), "{value:?}");
    }
}

#[test]
fn resolve_floors() {
    // The interval floor is what BelowFloor reports.
    let e = Settings::resolve(
        &pk(rotation(|r| r.interval = some("30m"))),
        &Floors::default(),
    )
    .expect_err("below the default 1h floor");
    assert_eq!(
        e,
        SpecError::BelowFloor {
            field: "rotation.interval",
            value: "30m".into(),
            floor: "1h".into()
        }
    );
    assert_eq!(e.reason(), "BelowFloor");
    // Exactly at the floor is accepted; without floors a second is accepted.
    let s = Settings::resolve(
        &pk(rotation(|r| r.interval = some("1h"))),
        &Floors::default(),
    )
    .expect("at the floor");
    assert_eq!(s.interval, Some(secs(3600)));
    let s = Settings::resolve(&pk(rotation(|r| r.interval = some("1s"))), &Floors::none())
        .expect("no floor");
    assert_eq!(s.interval, Some(secs(1)));
    // A floor above a default raises the default.
    let floors = Floors {
        overlap: secs(3600),
        ..Floors::default()
    };
    let s = Settings::resolve(&pk(ProvisioningKeySpec::default()), &floors).expect("defaults");
    assert_eq!(s.overlap, secs(3600));
    // Zero durations are durations.
    let s = Settings::resolve(
        &pk(rotation(|r| r.publish_delay = some("0s"))),
        &Floors::default(),
    )
    .expect("0s");
    assert_eq!(s.publish_delay, Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// Simulator
// ---------------------------------------------------------------------------------------------

/// An in-memory model of the evidence the controller observes. Every planned step is applied
/// the way the controller would apply it, and the safety invariants are checked after each.
#[derive(Clone, Debug)]
struct Sim {
    settings: Settings,
    obs: Observed,
    now: DateTime<Utc>,
    /// Some key was recorded as published in the trust bundle.
    ever_published: bool,
    /// Some key was activated.
    ever_activated: bool,
    /// Every key the agent Secret has held.
    handed_out: BTreeSet<String>,
    /// The emergency flag of each key's activation.
    activated_emergency: BTreeMap<u32, bool>,
    /// Every step applied, with the time.
    steps: Vec<(DateTime<Utc>, Step)>,
    log: Vec<String>,
    counter: u32,
}

type SimResult<T = ()> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

impl Sim {
    fn new(settings: Settings) -> Self {
        Sim {
            settings,
            obs: Observed {
                keys: Vec::new(),
                rotate_annotation: None,
                bundle: BundleObs::Missing,
                agent_secret: AgentSecretObs::Missing,
                consumers: Vec::new(),
                uncovered: Some(Vec::new()),
                usage: None,
                record: None,
            },
            now: now(),
            ever_published: false,
            ever_activated: false,
            handed_out: BTreeSet::new(),
            activated_emergency: BTreeMap::new(),
            steps: Vec::new(),
            log: Vec::new(),
            counter: 0,
        }
    }

    fn fail(&self, message: String) -> String {
        let tail = &self.log[self.log.len().saturating_sub(60)..];
        format!(
            "{message}\n  at {}\n  keys: {:#?}\n  bundle: {:?}\n  agent: {:?}\n  consumers: {:?}\n  log (last 60):\n    {}",
            self.now,
            self.obs.keys,
            self.obs.bundle,
            self.obs.agent_secret,
            self.obs.consumers,
            tail.join("\n    ")
        )
    }

    fn advance(&mut self, d: Duration) {
        self.now += chrono::Duration::from_std(d).expect("small duration");
        self.log
            .push(format!("advance {}", humantime::format_duration(d)));
    }

    fn key(&self, seq: u32) -> SimResult<&ObservedKey> {
        self.obs
            .keys
            .iter()
            .find(|k| k.seq == seq)
            .ok_or_else(|| format!("no key {seq}"))
    }

    fn key_mut(&mut self, seq: u32) -> SimResult<&mut ObservedKey> {
        self.obs
            .keys
            .iter_mut()
            .find(|k| k.seq == seq)
            .ok_or_else(|| format!("no key {seq}"))
    }

    fn agent_kid(&self) -> Option<String> {
        match &self.obs.agent_secret {
            AgentSecretObs::Owned(s) => s.kid.clone(),
            _ => None,
        }
    }

    /// Plans, twice: the planner must be deterministic.
    fn plan(&self) -> SimResult<Plan> {
        let p = super::plan(&self.settings, &self.obs, self.now);
        let again = super::plan(&self.settings, &self.obs, self.now);
        ensure!(
            p == again,
            "{}",
            self.fail(format!("not deterministic: {p:?} vs {again:?}"))
        );
        Ok(p)
    }

    /// Plans and applies at most one step; `Ok(None)` at a fixed point.
    fn step(&mut self) -> SimResult<Option<Step>> {
        let p = self.plan()?;
        let Some(step) = p.step else { return Ok(None) };
        self.log.push(format!(
            "{} {step:?} ({:?})",
            self.now.format("%d %H:%M:%S"),
            p.phase
        ));
        self.apply(&step)
            .map_err(|e| self.fail(format!("after {step:?}: {e}")))?;
        self.steps.push((self.now, step.clone()));
        Ok(Some(step))
    }

    /// Applies steps until the planner has nothing left to do.
    fn settle(&mut self) -> SimResult<Plan> {
        for _ in 0..64 {
            if self.step()?.is_none() {
                let p = self.plan()?;
                self.check_fixed_point(&p)
                    .map_err(|e| self.fail(format!("at a fixed point: {e}")))?;
                return Ok(p);
            }
        }
        Err(self.fail("no fixed point after 64 steps (hot loop)".into()))
    }

    /// Applies `step` as the controller would, checking the invariants that concern it.
    fn apply(&mut self, step: &Step) -> SimResult {
        let before = self.obs.keys.clone();
        let cur_before = current(&before).cloned();
        let now = self.now;
        let delay = chrono::Duration::from_std(self.settings.publish_delay).expect("small");
        let overlap = chrono::Duration::from_std(self.settings.overlap).expect("small");
        match step {
            Step::Mint {
                seq,
                trigger,
                consumed_request_token,
                consumed_annotation,
                active,
            } => {
                let expected = before.last().map_or(1, |k| k.seq + 1);
                ensure!(*seq == expected, "minted seq {seq}, expected {expected}");
                if *active {
                    // (g) Only a first key is created active, and only when nothing is trusted
                    // and no agent Secret exists (nobody for publishDelay to protect).
                    let trusted = match &self.obs.bundle {
                        BundleObs::Owned { kids, .. } => kids.clone(),
                        _ => Vec::new(),
                    };
                    ensure!(
                        *trigger == Trigger::Initial
                            && before.is_empty()
                            && trusted.is_empty()
                            && self.obs.agent_secret == AgentSecretObs::Missing
                            && self.handed_out.is_empty(),
                        "{trigger:?} key created active with keys {before:?}, bundle trusting {trusted:?}, agent Secret {:?}",
                        self.obs.agent_secret
                    );
                }
                if *trigger == Trigger::Initial {
                    ensure!(
                        before.is_empty(),
                        "Initial mint with keys {:?}",
                        before.iter().map(|k| (k.seq, k.state)).collect::<Vec<_>>()
                    );
                }
                if !matches!(trigger, Trigger::Compromised) {
                    // (d) A rotation starts only when none is in flight.
                    let in_flight: Vec<u32> = before
                        .iter()
                        .filter(|k| {
                            matches!(
                                k.state,
                                KeyState::Pending | KeyState::Published | KeyState::Retiring
                            )
                        })
                        .map(|k| k.seq)
                        .collect();
                    ensure!(
                        in_flight.is_empty(),
                        "{trigger:?} rotation started while keys {in_flight:?} are in flight"
                    );
                }
                if matches!(
                    trigger,
                    Trigger::Interval | Trigger::RequestToken | Trigger::Annotation
                ) {
                    ensure!(
                        !self.settings.suspend,
                        "{trigger:?} rotation started while suspended"
                    );
                    let last = before.last().ok_or("rotation without a previous key")?;
                    let earliest = last.created_at
                        + chrono::Duration::from_std(self.settings.min_interval).expect("small");
                    ensure!(
                        now >= earliest,
                        "{trigger:?} rotation before minInterval ({earliest})"
                    );
                }
                if *trigger == Trigger::Interval {
                    // (i) A scheduled rotation is at most the jitter bound early.
                    let cur = cur_before
                        .as_ref()
                        .ok_or("Interval rotation without a key")?;
                    let interval = self.settings.interval.ok_or("Interval without interval")?;
                    let due = schedule::rotation_due_unjittered(&self.settings, cur)
                        .ok_or("no due time")?;
                    let earliest =
                        due - chrono::Duration::from_std(schedule::bound(interval)).expect("small");
                    ensure!(
                        now >= earliest,
                        "Interval rotation at {now}, due {due}, earliest allowed {earliest}"
                    );
                }
                // As `desired::key_secret`: a key created active records its publication and
                // activation at its creation.
                let at = active.then_some(now);
                if *active {
                    self.ever_published = true;
                    self.ever_activated = true;
                    self.activated_emergency.insert(*seq, false);
                }
                self.obs.keys.push(ObservedKey {
                    seq: *seq,
                    kid: kid(*seq),
                    fingerprint: format!("fp{seq}"),
                    state: if *active {
                        KeyState::Active
                    } else {
                        KeyState::Pending
                    },
                    trigger: *trigger,
                    consumed_request_token: consumed_request_token.clone(),
                    consumed_annotation: consumed_annotation.clone(),
                    created_at: now,
                    published_at: at,
                    activated_at: at,
                    retired_at: None,
                    revoked_at: None,
                    has_private_key: true,
                    last_token_exp: None,
                    edited: None,
                });
            }
            Step::MarkPublished { seq } => {
                let k = self.key_mut(*seq)?;
                ensure!(
                    k.state == KeyState::Pending,
                    "MarkPublished of a {:?} key",
                    k.state
                );
                k.state = KeyState::Published;
            }
            Step::WriteRecord { record } => {
                // (r) A key id leaves the record only once its key is revoked or listed as
                // compromised (or it is no longer in the bundle).
                let listed = |kid: &String| matches!(&self.obs.bundle, BundleObs::Owned { kids, .. } if kids.contains(kid));
                for kid in self.obs.record.iter().flat_map(|r| r.kids.keys()) {
                    if record.has(kid) || self.settings.compromised.contains(kid) || !listed(kid) {
                        continue;
                    }
                    let state = before.iter().find(|k| &k.kid == kid).map(|k| k.state);
                    ensure!(
                        state == Some(KeyState::Revoked),
                        "WriteRecord dropped key id {kid} in state {state:?} while the bundle trusts it"
                    );
                }
                self.obs.record = Some(record.clone());
            }
            Step::WriteBundle { trusted, revoked } => {
                // (c) Once a key was published, the bundle always trusts at least one key.
                ensure!(!trusted.is_empty(), "WriteBundle with no trusted key");
                // (r) The bundle trusts only recorded key ids (a compromised one left the
                // record first, and leaves the bundle at its revocation).
                for kid in trusted
                    .iter()
                    .filter(|k| !self.settings.compromised.contains(*k))
                {
                    ensure!(
                        self.obs.record.as_ref().is_some_and(|r| r.has(kid)),
                        "WriteBundle trusts {kid}, which the trust record does not list"
                    );
                }
                let target = bundle_target(&self.settings, &self.obs);
                ensure!(
                    trusted.clone() == desired_bundle(&before).0
                        && (trusted.clone(), revoked.clone())
                            == (target.trusted.clone(), target.revoked.clone()),
                    "WriteBundle is not the desired bundle"
                );
                self.obs.bundle = BundleObs::Owned {
                    kids: trusted.clone(),
                    revoked: revoked.clone(),
                    last_seq: target.last_seq,
                };
            }
            Step::RecordPublished { seq } => {
                let in_bundle = matches!(&self.obs.bundle, BundleObs::Owned { kids, .. } if kids.contains(&kid(*seq)));
                ensure!(
                    in_bundle,
                    "RecordPublished of key {seq} that is not in the bundle"
                );
                let k = self.key_mut(*seq)?;
                ensure!(
                    k.state == KeyState::Published,
                    "RecordPublished of a {:?} key",
                    k.state
                );
                ensure!(k.published_at.is_none(), "RecordPublished twice");
                k.published_at = Some(now);
                self.ever_published = true;
            }
            Step::Activate { seq, emergency } => {
                let ever_activated = self.ever_activated;
                let compromised_listed = !self.settings.compromised.is_empty();
                let no_current = cur_before.is_none();
                let k = self.key_mut(*seq)?;
                ensure!(
                    k.state == KeyState::Published,
                    "Activate of a {:?} key",
                    k.state
                );
                let published_at = k
                    .published_at
                    .ok_or("Activate of a key whose publication is not recorded")?;
                let skips_delay = now < published_at + delay;
                // (e) publishDelay is honoured except for the first key and in an emergency,
                // and a skipped delay is always reported as an emergency.
                if ever_activated && skips_delay {
                    ensure!(
                        *emergency,
                        "key {seq} activated {}s after publication without emergency",
                        (now - published_at).num_seconds()
                    );
                }
                if *emergency {
                    ensure!(
                        compromised_listed && (k.trigger == Trigger::Compromised || no_current),
                        "emergency activation without a compromised current key"
                    );
                }
                k.state = KeyState::Active;
                k.activated_at = Some(now);
                self.ever_activated = true;
                self.activated_emergency.insert(*seq, *emergency);
            }
            Step::Retire { seq } => {
                let cur = cur_before.as_ref().ok_or("Retire without a current key")?;
                ensure!(
                    *seq < cur.seq,
                    "Retire of key {seq} that is not older than the current key"
                );
                let k = self.key_mut(*seq)?;
                ensure!(
                    matches!(k.state, KeyState::Active | KeyState::Published),
                    "Retire of a {:?} key",
                    k.state
                );
                k.state = KeyState::Retiring;
                k.retired_at = Some(now);
            }
            Step::HandOut { seq, reason } => {
                let cur = cur_before.as_ref().ok_or("HandOut without a current key")?;
                ensure!(
                    *seq == cur.seq,
                    "HandOut of key {seq}, current is {}",
                    cur.seq
                );
                let old_kid = self.agent_kid();
                let changes = old_kid.as_deref() != Some(cur.kid.as_str());
                ensure!(
                    changes == (*reason == HandOutReason::NewKey),
                    "HandOut {reason:?} with old kid {old_kid:?}"
                );
                // (r) A token is handed out only for a recorded key id, with a lifetime the
                // record covers.
                ensure!(
                    self.obs
                        .record
                        .as_ref()
                        .and_then(|r| r.kids.get(&cur.kid))
                        .is_some_and(|t| *t >= self.settings.token_ttl.as_secs()),
                    "HandOut of key {seq} whose key id the trust record does not cover: {:?}",
                    self.obs.record
                );
                // (h) A key reaches the agent Secret only while the bundle lists it (the state
                // of a key created active says nothing about the bundle).
                if changes {
                    ensure!(
                        matches!(&self.obs.bundle, BundleObs::Owned { kids, .. } if kids.contains(&cur.kid)),
                        "key {seq} handed out while the bundle is {:?}",
                        self.obs.bundle
                    );
                }
                if !self.handed_out.contains(&cur.kid) && !self.handed_out.is_empty() {
                    // (e) A key reaches the agents only publishDelay after it was published,
                    // except for the first key and in an emergency.
                    let published_at = cur.published_at.ok_or("handing out an unpublished key")?;
                    let emergency = self.activated_emergency.get(seq).copied().unwrap_or(false);
                    ensure!(
                        emergency || now >= published_at + delay,
                        "key {seq} handed out {}s after publication",
                        (now - published_at).num_seconds()
                    );
                }
                let iat = now.timestamp();
                let handed_out_at = match &self.obs.agent_secret {
                    AgentSecretObs::Owned(s) if !changes => s.handed_out_at.or(Some(now)),
                    _ => Some(now),
                };
                self.obs.agent_secret = AgentSecretObs::Owned(AgentSecret {
                    kid: Some(cur.kid.clone()),
                    token_iat: Some(iat),
                    token_exp: Some(iat + self.settings.token_ttl.as_secs() as i64),
                    token_claims_match: true,
                    has_private_key: self.settings.include_private_key,
                    metadata_matches: true,
                    handed_out_at,
                    token_audience: Some(self.settings.audience.clone()),
                    token_issuer: Some(self.settings.issuer.clone()),
                });
                if changes {
                    // The PolicyAgent controller rolls every workload to the new key.
                    for c in &mut self.obs.consumers {
                        c.rolled_at = Some(now);
                        c.waiting_reason = Some("rolling".into());
                    }
                }
                self.handed_out.insert(cur.kid.clone());
            }
            Step::Revoke { seq, emergency } => {
                let kid_compromised = self.settings.compromised.contains(&kid(*seq));
                ensure!(
                    *emergency == kid_compromised,
                    "Revoke emergency={emergency} of a key compromised={kid_compromised}"
                );
                let k = self.key(*seq)?.clone();
                ensure!(k.state != KeyState::Revoked, "Revoke of a revoked key");
                if !emergency {
                    ensure!(
                        k.state == KeyState::Retiring,
                        "non-emergency Revoke of a {:?} key",
                        k.state
                    );
                    let cur = cur_before.as_ref().ok_or("Revoke without a current key")?;
                    ensure!(
                        self.agent_kid().as_deref() == Some(cur.kid.as_str()),
                        "Revoke before the current key was handed out"
                    );
                    if self.obs.consumers.is_empty() {
                        // (b) Without consumers, only after the overlap.
                        let retired_at = k.retired_at.ok_or("retiring key without retired_at")?;
                        ensure!(
                            now >= retired_at + overlap,
                            "Revoke {}s after retirement, overlap is {}s",
                            (now - retired_at).num_seconds(),
                            overlap.num_seconds()
                        );
                    } else {
                        // (a) With consumers, only when every one is confirmed on the current kid.
                        let waiting: Vec<&str> = self
                            .obs
                            .consumers
                            .iter()
                            .filter(|c| c.confirmed_kid.as_deref() != Some(cur.kid.as_str()))
                            .map(|c| c.name.as_str())
                            .collect();
                        ensure!(
                            waiting.is_empty(),
                            "Revoke while {waiting:?} are not confirmed on {}",
                            cur.kid
                        );
                    }
                }
                let k = self.key_mut(*seq)?;
                k.state = KeyState::Revoked;
                k.revoked_at = Some(now);
                k.has_private_key = false;
            }
            Step::Prune { seq } => {
                let revoked: Vec<u32> = before
                    .iter()
                    .filter(|k| k.state == KeyState::Revoked)
                    .map(|k| k.seq)
                    .collect();
                ensure!(
                    revoked.len() > RETAIN_REVOKED,
                    "Prune with only {} revoked keys",
                    revoked.len()
                );
                ensure!(
                    revoked.first() == Some(seq),
                    "Prune of key {seq}, oldest revoked is {:?}",
                    revoked.first()
                );
                self.obs.keys.retain(|k| k.seq != *seq);
            }
            Step::Repair { seq } => {
                let k = self.key_mut(*seq)?;
                ensure!(
                    k.edited.is_some(),
                    "Repair of key {seq} that was not edited"
                );
                k.edited = None;
            }
        }
        self.check_transition(&before, step)?;
        self.check_state()
    }

    /// (f) States only move forward; keys appear only by Mint and disappear only by Prune.
    fn check_transition(&self, before: &[ObservedKey], step: &Step) -> SimResult {
        for b in before {
            match self.obs.keys.iter().find(|k| k.seq == b.seq) {
                None => ensure!(
                    matches!(step, Step::Prune { seq } if *seq == b.seq)
                        && b.state == KeyState::Revoked,
                    "key {} disappeared",
                    b.seq
                ),
                Some(a) => {
                    ensure!(
                        a.state >= b.state,
                        "key {} moved back from {:?} to {:?}",
                        b.seq,
                        b.state,
                        a.state
                    );
                    ensure!(
                        a.kid == b.kid && a.created_at == b.created_at,
                        "key {} changed identity",
                        b.seq
                    );
                    for (name, x, y) in [
                        ("published_at", b.published_at, a.published_at),
                        ("activated_at", b.activated_at, a.activated_at),
                        ("retired_at", b.retired_at, a.retired_at),
                        ("revoked_at", b.revoked_at, a.revoked_at),
                    ] {
                        ensure!(x.is_none() || x == y, "key {}: {name} changed", b.seq);
                    }
                }
            }
        }
        let added = self
            .obs
            .keys
            .iter()
            .filter(|k| !before.iter().any(|b| b.seq == k.seq))
            .count();
        ensure!(
            added == usize::from(matches!(step, Step::Mint { .. })),
            "{added} keys appeared"
        );
        Ok(())
    }

    /// Invariants of the evidence after every step.
    fn check_state(&self) -> SimResult {
        let keys = &self.obs.keys;
        // (c) Once published, the desired bundle (and the written one) never becomes empty.
        if self.ever_published {
            ensure!(
                !desired_bundle(keys).0.is_empty(),
                "nothing trusted any more"
            );
            if let BundleObs::Owned { kids, .. } = &self.obs.bundle {
                ensure!(!kids.is_empty(), "empty trust bundle");
            }
        }
        // (d) At most one rotation in flight. What holds after every step:
        // - at most one key that is not compromised is on its way in (pending or published);
        //   a compromised in-flight key can coexist with the emergency successor minted for
        //   a compromised current key until it is revoked, a few steps later;
        // - at most one key newer than the current one that is not compromised;
        // - at most one key on its way out (retiring);
        // - at most two active keys (right after an activation; the older one retires next);
        // - a rotation other than an emergency starts only when nothing is in flight (checked
        //   at Mint).
        let count = |f: &dyn Fn(&ObservedKey) -> bool| keys.iter().filter(|k| f(k)).count();
        let trusted_or_pending = |k: &ObservedKey| {
            k.state != KeyState::Revoked && !self.settings.compromised.contains(&k.kid)
        };
        let incoming = count(&|k| {
            matches!(k.state, KeyState::Pending | KeyState::Published) && trusted_or_pending(k)
        });
        ensure!(incoming <= 1, "{incoming} keys on their way in");
        if let Some(cur) = current(keys) {
            let newer = count(&|k| k.seq > cur.seq && trusted_or_pending(k));
            ensure!(newer <= 1, "{newer} keys newer than the current one");
        }
        let retiring = count(&|k| k.state == KeyState::Retiring);
        ensure!(retiring <= 1, "{retiring} retiring keys");
        let active = count(&|k| k.state == KeyState::Active);
        ensure!(active <= 2, "{active} active keys");
        // Revoked keys hold no private key.
        ensure!(
            keys.iter()
                .all(|k| k.state != KeyState::Revoked || !k.has_private_key),
            "revoked key with private key"
        );
        // Keys are sorted by seq with unique kids.
        ensure!(
            keys.windows(2).all(|w| w[0].seq < w[1].seq),
            "keys not sorted by seq"
        );
        Ok(())
    }

    /// At a fixed point: the evidence is consistent, nothing becomes due before the requeue,
    /// and no rotation is pending that the planner forgot.
    fn check_fixed_point(&self, p: &Plan) -> SimResult {
        ensure!(p.step.is_none(), "not a fixed point");
        self.check_schedule(p)?;
        if self.obs.bundle == BundleObs::Foreign || self.obs.agent_secret == AgentSecretObs::Foreign
        {
            return Ok(());
        }
        let keys = &self.obs.keys;
        let cur = current(keys).ok_or("no current key at a fixed point")?;
        ensure!(
            matches!(&self.obs.bundle, BundleObs::Owned { kids, .. } if kids.clone() == desired_bundle(keys).0),
            "bundle differs from the desired one"
        );
        ensure!(
            self.agent_kid().as_deref() == Some(cur.kid.as_str()),
            "agent Secret does not hold the current key"
        );
        ensure!(
            self.obs
                .record
                .as_ref()
                .map(|r| r.kids.keys().cloned().collect::<BTreeSet<_>>())
                == Some(desired_bundle(keys).0.into_iter().collect()),
            "the trust record does not list exactly the trusted key ids: {:?}",
            self.obs.record
        );
        ensure!(
            keys.iter().filter(|k| k.state == KeyState::Active).count() == 1,
            "more than one active key"
        );
        ensure!(
            keys.iter().all(|k| k.state != KeyState::Pending),
            "pending key at a fixed point"
        );
        ensure!(
            keys.iter().all(
                |k| k.state == KeyState::Revoked || !self.settings.compromised.contains(&k.kid)
            ),
            "compromised key still trusted at a fixed point"
        );
        // Once no rotation is in flight, old revoked keys are pruned.
        if keys
            .iter()
            .all(|k| matches!(k.state, KeyState::Active | KeyState::Revoked))
        {
            let revoked = keys.iter().filter(|k| k.state == KeyState::Revoked).count();
            ensure!(revoked <= RETAIN_REVOKED, "{revoked} revoked keys kept");
        }
        // Nothing becomes due before the requeue: planning just before it still does nothing.
        let horizon = match p.requeue_after {
            Some(d) => {
                chrono::Duration::from_std(d).expect("small") - chrono::Duration::milliseconds(1)
            }
            None => chrono::Duration::days(400),
        };
        let early = super::plan(&self.settings, &self.obs, self.now + horizon);
        ensure!(
            early.step.is_none(),
            "{:?} due at {horizon} but requeue_after is {:?}",
            early.step,
            p.requeue_after
        );
        Ok(())
    }

    /// (i) The times a plan shows are the jittered ones it acts on: never later than asked,
    /// never earlier than the bound; a token is refreshed before it expires and after it was
    /// issued.
    fn check_schedule(&self, p: &Plan) -> SimResult {
        if let (Some(cur), Some(interval)) = (current(&self.obs.keys), self.settings.interval) {
            let due = schedule::rotation_due_unjittered(&self.settings, cur).ok_or("no due")?;
            let bound = chrono::Duration::from_std(schedule::bound(interval)).expect("small");
            let shown = p
                .next_rotation_at
                .ok_or("no nextRotationAt with an interval")?;
            ensure!(
                shown <= due && shown >= due - bound,
                "nextRotationAt {shown} outside [{}, {due}]",
                due - bound
            );
        }
        if let AgentSecretObs::Owned(AgentSecret {
            token_iat: Some(iat),
            token_exp: Some(exp),
            ..
        }) = &self.obs.agent_secret
        {
            let shown = p.token_refresh_at.ok_or("no tokenRefreshAt")?.timestamp();
            let (life, half) = (exp - iat, iat + (exp - iat) / 2);
            let bound = schedule::bound(secs(life as u64)).as_secs() as i64;
            ensure!(
                shown <= half && shown >= half - bound && shown > *iat && shown < *exp,
                "tokenRefreshAt {shown} for a token issued {iat}, expiring {exp}"
            );
        }
        Ok(())
    }

    /// Whether every request was served, no compromised key is trusted and (unless an interval
    /// keeps rotating, possibly back to back) no rotation is in flight.
    fn converged(&self) -> bool {
        let keys = &self.obs.keys;
        let latest = keys.last();
        let served = |wanted: &Option<String>, consumed: Option<&Option<String>>| {
            wanted.is_none() || consumed == Some(wanted)
        };
        let idle = keys
            .iter()
            .all(|k| matches!(k.state, KeyState::Active | KeyState::Revoked));
        current(keys).is_some()
            && (idle || self.settings.interval.is_some())
            && keys.iter().all(|k| {
                k.state == KeyState::Revoked || !self.settings.compromised.contains(&k.kid)
            })
            && served(
                &self.settings.request_token,
                latest.map(|k| &k.consumed_request_token),
            )
            && served(
                &self.obs.rotate_annotation,
                latest.map(|k| &k.consumed_annotation),
            )
            && self.agent_kid() == current(keys).map(|k| k.kid.clone())
    }

    fn confirm_all(&mut self) {
        let kid = self.agent_kid();
        for c in &mut self.obs.consumers {
            c.confirmed_kid = kid.clone();
            c.waiting_reason = None;
        }
    }

    /// Lets time pass with every consumer confirming, until the rotation completes and every
    /// request is served (delayed, never dropped).
    fn drain(&mut self) -> SimResult {
        self.settings.suspend = false;
        self.log.push("drain".into());
        for _ in 0..200 {
            self.confirm_all();
            let p = self.settle()?;
            if self.converged() {
                return Ok(());
            }
            self.advance(p.requeue_after.unwrap_or(secs(3600)));
        }
        Err(self
            .fail("did not converge: a request was dropped or a rotation never completed".into()))
    }

    fn mints(&self) -> Vec<Trigger> {
        self.steps
            .iter()
            .filter_map(|(_, s)| match s {
                Step::Mint { trigger, .. } => Some(*trigger),
                _ => None,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

fn started(settings: Settings) -> Sim {
    let mut sim = Sim::new(settings);
    sim.settle().unwrap_or_else(|e| panic!("{e}"));
    sim
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
    }
}

fn run(sim: &mut Sim, f: impl FnOnce(&mut Sim) -> SimResult) {
    f(sim).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn scenario_first_key() {
    let sim = started(with_settings(|s| s.request_token = some("r1")));
    let kinds: Vec<&str> = sim
        .steps
        .iter()
        .map(|(_, s)| match s {
            Step::Mint { active: true, .. } => "Mint(active)",
            Step::WriteRecord { .. } => "WriteRecord",
            Step::WriteBundle { .. } => "WriteBundle",
            Step::HandOut { .. } => "HandOut",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // Four writes: the key Secret created active, the trust record, the trust bundle, the
    // agent Secret.
    assert_eq!(
        kinds,
        ["Mint(active)", "WriteRecord", "WriteBundle", "HandOut"]
    );
    assert_eq!(
        sim.obs.keys[0].consumed_request_token.as_deref(),
        Some("r1")
    );
    // The first key is handed out at once (no publishDelay), and nothing more happens.
    assert!(sim.steps.iter().all(|(t, _)| *t == now()));
    assert_eq!(sim.mints(), [Trigger::Initial]);
}

#[test]
fn scenario_request_token_rotates_exactly_once() {
    let mut sim = started(with_settings(|s| s.request_token = some("r1")));
    run(&mut sim, |sim| {
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        let p = sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        // Waiting for publishDelay: the next look is exactly when it ends.
        assert_eq!(p.requeue_after, Some(secs(120)));
        sim.drain()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        // Much later, the same token never rotates again.
        sim.advance(secs(30 * 86_400));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        Ok(())
    });
    assert_eq!(
        sim.obs.keys.iter().map(|k| k.state).collect::<Vec<_>>(),
        [KeyState::Revoked, KeyState::Active]
    );
}

#[test]
fn scenario_annotation_rotates_exactly_once() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.obs.rotate_annotation = some("2025-06-01T12:00:00Z");
        sim.advance(secs(61));
        sim.settle()?;
        sim.drain()?;
        sim.advance(secs(30 * 86_400));
        sim.settle()?;
        Ok(())
    });
    assert_eq!(sim.mints(), [Trigger::Initial, Trigger::Annotation]);
}

#[test]
fn scenario_request_during_rotation_is_served_after_it() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        sim.settle()?;
        // In flight (waiting for publishDelay); a new request arrives.
        sim.advance(secs(30));
        sim.settings.request_token = some("r3");
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        sim.drain()?;
        Ok(())
    });
    assert_eq!(
        sim.mints(),
        [
            Trigger::Initial,
            Trigger::RequestToken,
            Trigger::RequestToken
        ]
    );
    // The third key was minted only after the second rotation completed (old key revoked).
    let (t3, _) = sim
        .steps
        .iter()
        .filter(|(_, s)| matches!(s, Step::Mint { .. }))
        .nth(2)
        .expect("third mint");
    let (t_revoke, _) = sim
        .steps
        .iter()
        .find(|(_, s)| matches!(s, Step::Revoke { seq: 1, .. }))
        .expect("k1 revoked");
    assert!(t_revoke <= t3);
    assert_eq!(
        sim.obs
            .keys
            .last()
            .and_then(|k| k.consumed_request_token.as_deref()),
        Some("r3")
    );
}

#[test]
fn scenario_min_interval_delays_and_never_drops() {
    let mut sim = started(with_settings(|s| {
        s.min_interval = secs(3600);
        s.token_ttl = secs(4 * 3600);
    }));
    run(&mut sim, |sim| {
        sim.advance(secs(600));
        sim.settings.request_token = some("r2");
        let p = sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial]);
        assert_eq!(p.requeue_after, Some(secs(3000)));
        sim.advance(secs(2999));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial]);
        sim.advance(secs(1));
        sim.settle()?;
        assert_eq!(sim.mints(), [Trigger::Initial, Trigger::RequestToken]);
        Ok(())
    });
}

#[test]
fn scenario_consumers_gate_revocation() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        sim.obs.consumers = vec![
            consumer("a", Some(1), Some(now())),
            consumer("b", Some(1), Some(now())),
        ];
        sim.advance(secs(3600));
        sim.settings.request_token = some("r2");
        sim.settle()?;
        sim.advance(secs(120));
        sim.settle()?;
        assert_eq!(sim.key(2)?.state, KeyState::Active);
        assert_eq!(sim.key(1)?.state, KeyState::Retiring);
        // Long past the overlap, one consumer confirmed: still trusted.
        sim.advance(secs(86_400));
        sim.obs.consumers[0].confirmed_kid = Some(kid(2));
        let p = sim.settle()?;
        assert_eq!(sim.key(1)?.state, KeyState::Retiring);
        assert_eq!(p.phase, Phase::Stalled);
        // Both confirmed: revoked at once.
        sim.obs.consumers[1].confirmed_kid = Some(kid(2));
        let p = sim.settle()?;
        assert_eq!(sim.key(1)?.state, KeyState::Revoked);
        assert_eq!(p.phase, Phase::Ready);
        Ok(())
    });
}

#[test]
fn scenario_compromise() {
    let mut sim = started(with_settings(|s| {
        s.suspend = true;
        s.min_interval = secs(86_400);
    }));
    run(&mut sim, |sim| {
        sim.obs.consumers = vec![consumer("a", Some(1), Some(now()))];
        sim.advance(secs(10));
        sim.settings.compromised.insert(kid(1));
        let before = sim.steps.len();
        sim.settle()?;
        let steps: Vec<Step> = sim.steps[before..].iter().map(|(_, s)| s.clone()).collect();
        assert_eq!(
            steps,
            [
                // The compromised key id leaves the trust record first: the verifier refuses
                // it from this write on.
                Step::WriteRecord {
                    record: sim_record(&sim.settings, &[])
                },
                Step::Mint {
                    seq: 2,
                    trigger: Trigger::Compromised,
                    consumed_request_token: None,
                    consumed_annotation: None,
                    active: false,
                },
                Step::WriteRecord {
                    record: sim_record(&sim.settings, &[2])
                },
                Step::MarkPublished { seq: 2 },
                Step::WriteBundle {
                    trusted: vec![kid(1), kid(2)],
                    revoked: vec![]
                },
                Step::RecordPublished { seq: 2 },
                Step::Revoke {
                    seq: 1,
                    emergency: true
                },
                Step::WriteBundle {
                    trusted: vec![kid(2)],
                    revoked: vec![kid(1)]
                },
                Step::Activate {
                    seq: 2,
                    emergency: true
                },
                Step::HandOut {
                    seq: 2,
                    reason: HandOutReason::NewKey
                },
            ]
        );
        assert!(
            sim.steps[before..].iter().all(|(t, _)| *t == sim.now),
            "all at once"
        );
        Ok(())
    });
}

#[test]
fn scenario_prune() {
    let mut sim = started(settings());
    run(&mut sim, |sim| {
        for i in 0..8 {
            sim.advance(secs(3600));
            sim.settings.request_token = Some(format!("r{i}"));
            sim.drain()?;
        }
        Ok(())
    });
    assert_eq!(sim.mints().len(), 9);
    let revoked = sim
        .obs
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Revoked)
        .count();
    assert_eq!(revoked, RETAIN_REVOKED);
    assert!(
        sim.steps
            .iter()
            .any(|(_, s)| matches!(s, Step::Prune { seq: 1 }))
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Event {
    /// Time passes.
    Advance(u32),
    /// A new `rotation.requestToken`.
    RequestToken,
    /// A new `keyward.dev/rotate` annotation.
    Annotate,
    AddConsumer,
    RemoveConsumer,
    /// Every consumer confirms the kid in the agent Secret.
    ConfirmAll,
    /// The first unconfirmed consumer confirms the kid in the agent Secret.
    ConfirmOne,
    /// The current key is listed in `compromisedKeys`.
    CompromiseCurrent,
    /// The newest non-revoked key is listed in `compromisedKeys`.
    CompromiseNewest,
    Suspend(bool),
    /// Someone edits the agent Secret's labels.
    TamperAgentSecret,
    /// Someone deletes the agent Secret.
    DeleteAgentSecret,
    /// Someone deletes the trust bundle.
    DeleteBundle,
    /// The operator crashes after this many steps of the next event; it resumes from evidence.
    Crash(u8),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => prop_oneof![0u32..=5, 0u32..=300, 0u32..=7200].prop_map(Event::Advance),
        2 => Just(Event::RequestToken),
        2 => Just(Event::Annotate),
        1 => Just(Event::AddConsumer),
        1 => Just(Event::RemoveConsumer),
        2 => Just(Event::ConfirmAll),
        1 => Just(Event::ConfirmOne),
        1 => Just(Event::CompromiseCurrent),
        1 => Just(Event::CompromiseNewest),
        1 => any::<bool>().prop_map(Event::Suspend),
        1 => Just(Event::TamperAgentSecret),
        1 => Just(Event::DeleteAgentSecret),
        1 => Just(Event::DeleteBundle),
        2 => (0u8..6).prop_map(Event::Crash),
    ]
}

fn sim_settings() -> impl Strategy<Value = Settings> {
    (
        prop::option::of(prop_oneof![300u64..=3600, 3600u64..=14_400]),
        0u64..=600,
        0u64..=600,
        0u64..=1200,
        60u64..=1800,
        prop_oneof![Just(300u64), Just(3600u64), 600u64..=7200],
        any::<bool>(),
        prop::option::of(Just("r0".to_string())),
        // Mostly a uid (jittered schedule), sometimes none (the times asked for).
        prop_oneof![3 => "[0-9a-f]{8}-[0-9a-f]{4}", 1 => Just(String::new())],
    )
        .prop_map(
            |(
                interval,
                min_interval,
                publish_delay,
                overlap,
                timeout,
                ttl,
                private,
                token,
                uid,
            )| {
                Settings {
                    interval: interval.map(secs),
                    min_interval: secs(min_interval),
                    publish_delay: secs(publish_delay),
                    overlap: secs(overlap),
                    confirmation_timeout: secs(timeout),
                    token_ttl: secs(ttl),
                    include_private_key: private,
                    request_token: token,
                    uid,
                    ..settings()
                }
            },
        )
}

impl Sim {
    fn event(&mut self, e: &Event, budget: Option<u8>) -> SimResult {
        self.counter += 1;
        let n = self.counter;
        self.log.push(format!("event {e:?}"));
        match e {
            Event::Advance(s) => self.advance(secs(u64::from(*s))),
            Event::RequestToken => self.settings.request_token = Some(format!("r{n}")),
            Event::Annotate => self.obs.rotate_annotation = Some(format!("a{n}")),
            Event::AddConsumer => self.obs.consumers.push(Consumer {
                name: format!("agent-{n}"),
                confirmed_kid: None,
                rolled_at: None,
                waiting_reason: Some("new".into()),
            }),
            Event::RemoveConsumer => {
                self.obs.consumers.pop();
            }
            Event::ConfirmAll => self.confirm_all(),
            Event::ConfirmOne => {
                let kid = self.agent_kid();
                if let Some(c) = self
                    .obs
                    .consumers
                    .iter_mut()
                    .find(|c| c.confirmed_kid != kid)
                {
                    c.confirmed_kid = kid;
                    c.waiting_reason = None;
                }
            }
            Event::CompromiseCurrent => {
                if let Some(c) = current(&self.obs.keys) {
                    self.settings.compromised.insert(c.kid.clone());
                }
            }
            Event::CompromiseNewest => {
                if let Some(k) = self
                    .obs
                    .keys
                    .iter()
                    .rev()
                    .find(|k| k.state != KeyState::Revoked)
                {
                    self.settings.compromised.insert(k.kid.clone());
                }
            }
            Event::Suspend(b) => self.settings.suspend = *b,
            Event::TamperAgentSecret => {
                if let AgentSecretObs::Owned(a) = &mut self.obs.agent_secret {
                    a.metadata_matches = false;
                }
            }
            Event::DeleteAgentSecret => self.obs.agent_secret = AgentSecretObs::Missing,
            Event::DeleteBundle => self.obs.bundle = BundleObs::Missing,
            Event::Crash(_) => {}
        }
        match budget {
            // Crashed: only some steps happen before the next event.
            Some(n) => {
                for _ in 0..n {
                    if self.step()?.is_none() {
                        break;
                    }
                }
                Ok(())
            }
            None => self.settle().map(|_| ()),
        }
    }
}

fn run_events(settings: Settings, events: &[Event]) -> SimResult<Sim> {
    let mut sim = Sim::new(settings);
    sim.settle()?;
    let mut budget = None;
    for e in events {
        let b = budget.take();
        if let Event::Crash(n) = e {
            budget = Some(*n);
        }
        sim.event(e, b)?;
    }
    sim.drain()?;
    Ok(sim)
}

/// 256 cases (well under a second); `PROPTEST_CASES` asks for more.
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

proptest! {
    #![proptest_config(config())]

    /// Random sequences of events: every step keeps the safety invariants, planning is
    /// deterministic, fixed points are reached (no hot loop), nothing becomes due before the
    /// requeue, and once time passes every request is served and every rotation completes.
    #[test]
    fn random_histories_keep_the_invariants(settings in sim_settings(), events in prop::collection::vec(event(), 1..40)) {
        run_events(settings, &events).map_err(TestCaseError::fail)?;
    }

    /// Requests are served exactly once: each distinct request value is consumed by one mint.
    #[test]
    fn each_request_rotates_once(settings in sim_settings(), gaps in prop::collection::vec(0u32..=7200, 1..8)) {
        let settings = Settings { interval: None, ..settings };
        let mut sim = Sim::new(settings);
        sim.settle().map_err(TestCaseError::fail)?;
        for g in &gaps {
            sim.event(&Event::Advance(*g), None).map_err(TestCaseError::fail)?;
            sim.event(&Event::RequestToken, None).map_err(TestCaseError::fail)?;
            sim.drain().map_err(TestCaseError::fail)?;
        }
        let mints = sim.mints();
        prop_assert_eq!(mints.len(), gaps.len() + 1, "mints: {:?}", mints);
        prop_assert!(mints[1..].iter().all(|t| *t == Trigger::RequestToken));
    }
}

// ---------------------------------------------------------------------------------------------
// Schedule offsets (jitter)
// ---------------------------------------------------------------------------------------------

const UID: &str = "0c6d2a57-1f3e-4b8a-9d0c-5e7f3a2b1c4d";

fn jittered(f: impl FnOnce(&mut Settings)) -> Settings {
    with_settings(|s| {
        s.uid = UID.into();
        f(s)
    })
}

fn offset_of(s: &Settings, purpose: schedule::Purpose, period: u64) -> chrono::Duration {
    chrono::Duration::from_std(schedule::offset(&s.uid, purpose, secs(period))).expect("small")
}

/// The seed is the ProvisioningKey's uid, also when the spec is refused (the current key's
/// token keeps being refreshed on the same schedule).
#[test]
fn resolve_carries_the_uid() {
    let mut p = pk(ProvisioningKeySpec::default());
    p.metadata.uid = Some(UID.into());
    let s = Settings::resolve(&p, &Floors::none()).expect("valid");
    assert_eq!(s.uid, UID);
    p.spec.rotation = Some(RotationSpec {
        interval: Some("soon".into()),
        ..Default::default()
    });
    let s = resolve_or_keep(&p, &Floors::none(), &LastGood::default());
    assert!(s.refused.is_some());
    assert_eq!(s.uid, UID);
}

#[test]
fn bounds_are_a_tenth_capped_at_ten_minutes() {
    for (period, bound) in [
        (0, 0),
        (9, 0),
        (10, 1),
        (300, 30),
        (3600, 360),
        (6000, 600),
        (7200, 600),
        (30 * DAY as u64, 600),
    ] {
        assert_eq!(
            schedule::bound(secs(period)),
            secs(bound),
            "period {period}s"
        );
    }
    // No uid, no offset: the time asked for.
    assert_eq!(
        schedule::offset("", schedule::Purpose::Rotation, secs(3600)),
        Duration::ZERO
    );
}

/// The scheduled rotation and the token refresh happen at the jittered times, which status
/// shows; the key's own uid decides them.
#[test]
fn jitter_moves_the_schedule_earlier_and_status_shows_it() {
    let s = jittered(|s| s.interval = Some(secs(7200)));
    let off = offset_of(&s, schedule::Purpose::Rotation, 7200);
    let refresh_off = offset_of(&s, schedule::Purpose::TokenRefresh, TTL);
    assert!(off > chrono::Duration::zero() && refresh_off > chrono::Duration::zero());
    // Key 1 became current 2h - 1h ago: due in an hour as asked, earlier by its offset.
    let k1 = ObservedKey {
        activated_at: Some(ago(3600)),
        ..key(1, Active)
    };
    let o = obs(vec![k1.clone()]);
    let p = plan(&s, &o, now());
    assert_eq!(p.step, None);
    assert_eq!(p.next_rotation_at, Some(later(3600) - off));
    // The token (issued a minute ago) is refreshed at half its life, earlier by its offset.
    let refresh = ago(60) + chrono::Duration::seconds(TTL as i64 / 2) - refresh_off;
    assert_eq!(p.token_refresh_at, Some(refresh));
    assert_eq!(p.requeue_after, (refresh - now()).to_std().ok());
    // Between the jittered and the asked time: the rotation starts.
    let at = later(3600) - off;
    let o2 = with_obs(vec![k1.clone()], |o| {
        o.agent_secret = agent_with(&kid(1), |a| {
            a.token_iat = Some(at.timestamp() - 60);
            a.token_exp = Some(at.timestamp() - 60 + TTL as i64);
        })
    });
    let p = plan(&s, &o2, at);
    assert!(
        matches!(
            p.step,
            Some(Step::Mint {
                trigger: Trigger::Interval,
                ..
            })
        ),
        "{p:?}"
    );
    // A second before it: nothing yet, and the wake-up is at the jittered time.
    let p = plan(&s, &o2, at - chrono::Duration::seconds(1));
    assert_eq!(p.step, None);
    assert_eq!(p.requeue_after, Some(secs(1)));
    // Token refresh at its jittered time, not before.
    let p = plan(&s, &o, refresh);
    assert_eq!(
        p.step,
        Some(Step::HandOut {
            seq: 1,
            reason: HandOutReason::TokenRefresh
        })
    );
    let p = plan(&s, &o, refresh - chrono::Duration::seconds(1));
    assert_eq!(p.step, None);
}

/// A herd: 1,000 keys (uids differing only in their last digits, the hardest case for a weak
/// hash) due at the same time spread over the whole bound.
#[test]
fn a_herd_of_keys_spreads_over_the_bound() {
    for (purpose, period) in [
        (schedule::Purpose::Rotation, 30 * DAY as u64),
        (schedule::Purpose::TokenRefresh, 24 * 3600),
    ] {
        let mut per_second = BTreeMap::<u64, u32>::new();
        for i in 0..1000 {
            let uid = format!("6f1c2d3e-4b5a-4c6d-8e7f-{i:012}");
            let o = schedule::offset(&uid, purpose, secs(period)).as_secs();
            *per_second.entry(o).or_default() += 1;
        }
        let busiest = per_second.values().max().copied().unwrap_or_default();
        // 601 one-second slots; about 1.7 keys each on average.
        assert!(
            per_second.len() >= 450 && busiest <= 8,
            "{purpose:?}: {} distinct seconds, busiest {busiest}",
            per_second.len()
        );
        let max = per_second.keys().max().copied().unwrap_or_default();
        assert!(
            (590..=600).contains(&max),
            "{purpose:?}: largest offset {max}"
        );
    }
    // The two purposes draw independent offsets.
    let same = (0..100)
        .filter(|i| {
            let uid = format!("uid-{i}");
            schedule::offset(&uid, schedule::Purpose::Rotation, secs(7200))
                == schedule::offset(&uid, schedule::Purpose::TokenRefresh, secs(7200))
        })
        .count();
    assert!(same < 5, "{same} of 100 uids get the same offset for both");
}

proptest! {
    #![proptest_config(config())]

    /// The scheduled rotation is never later than asked, never earlier than the bound, and the
    /// same uid always gets the same time.
    #[test]
    fn rotation_jitter_is_bounded_and_stable(
        uid in "[0-9a-z-]{0,40}",
        interval in prop_oneof![1u64..=120, 120u64..=86_400, 86_400u64..=400 * 86_400],
        activated in 0i64..=4_000_000_000,
    ) {
        let s = with_settings(|s| {
            s.interval = Some(secs(interval));
            s.uid = uid.clone();
        });
        let k = ObservedKey {
            activated_at: DateTime::from_timestamp(activated, 0),
            ..key(1, Active)
        };
        let asked = schedule::rotation_due_unjittered(&s, &k).expect("due");
        let due = schedule::rotation_due(&s, &k).expect("due");
        let bound = (interval / 10).min(600) as i64;
        prop_assert!(due <= asked, "later than asked: {due} > {asked}");
        prop_assert!(due >= asked - chrono::Duration::seconds(bound), "earlier than the bound");
        prop_assert_eq!(Some(due), schedule::rotation_due(&s.clone(), &k.clone()));
        // What status shows is what is acted on (a settled key, its token just issued).
        let o = with_obs(vec![k], |o| {
            o.agent_secret = agent_with(&kid(1), |a| {
                a.token_iat = Some(activated);
                a.token_exp = Some(activated + TTL as i64);
            })
        });
        let p = plan(&s, &o, DateTime::from_timestamp(activated, 0).expect("t"));
        prop_assert_eq!(p.step, None);
        prop_assert_eq!(p.next_rotation_at, Some(due));
    }

    /// The token is refreshed between 40% and 50% of its life: never after half of it (so it
    /// never expires first), never at or before its issue (so a refresh never loops), the same
    /// time for the same uid.
    #[test]
    fn refresh_jitter_is_bounded_and_stable(
        uid in "[0-9a-z-]{0,40}",
        ttl in prop_oneof![1i64..=20, 20i64..=86_400, 86_400i64..=30 * 86_400],
        iat in 0i64..=4_000_000_000,
    ) {
        let s = with_settings(|s| s.uid = uid.clone());
        let exp = iat + ttl;
        let t = schedule::token_refresh_at(&s, iat, exp).expect("a time").timestamp();
        let half = iat + ttl / 2;
        let bound = (ttl / 10).min(600);
        prop_assert!(t <= half && t >= half - bound, "{t} outside [{}, {half}]", half - bound);
        prop_assert!(t < exp, "refresh at or after expiry");
        if ttl >= 2 {
            prop_assert!(t > iat, "refresh due at issue: a loop");
        }
        // 40% of its life, to the whole second the times are stored in.
        prop_assert!(10 * (t - iat) >= 4 * ttl - 10, "earlier than 40% of the life");
        prop_assert_eq!(schedule::token_refresh_at(&s, iat, exp).map(|d| d.timestamp()), Some(t));
    }
}

// ---------------------------------------------------------------------------------------------
// The trust record (issue "The trust boundary", part 2)
// ---------------------------------------------------------------------------------------------

/// Evidence of a settled key 2 (key 1 revoked) with this record on the ProvisioningKey.
fn with_record(kids: &[u32], bundle_kids: &[u32]) -> Observed {
    with_obs(vec![key(1, Revoked), key(2, Active)], |o| {
        o.bundle = bundle(bundle_kids, &[1]);
        o.record = Some(sim_record(&settings(), kids));
    })
}

#[test]
fn a_settled_key_with_its_record_writes_nothing() {
    let p = super::plan(&settings(), &with_record(&[2], &[2]), now());
    assert_eq!(p.step, None);
    assert!(p.injected.is_empty());
}

#[test]
fn an_injected_key_id_leaves_the_bundle_and_is_reported() {
    let mut o = with_record(&[2], &[2]);
    let BundleObs::Owned { kids, .. } = &mut o.bundle else {
        unreachable!()
    };
    kids.push(kid(9));
    let p = super::plan(&settings(), &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteBundle {
            trusted: vec![kid(2)],
            revoked: vec![kid(1)],
        })
    );
    assert_eq!(p.injected, vec![kid(9)]);
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(9)]);
}

#[test]
fn a_recorded_key_id_whose_secret_was_lost_stays_trusted_and_recorded() {
    // Key 1's Secret is gone, but the record lists it: the operator minted it.
    let mut o = with_obs(vec![key(2, Active)], |o| {
        o.bundle = bundle(&[1, 2], &[]);
    });
    o.record = Some(sim_record(&settings(), &[1, 2]));
    let p = super::plan(&settings(), &o, now());
    assert!(!matches!(p.step, Some(Step::WriteRecord { .. })), "{p:?}");
    let target = bundle_target(&settings(), &o);
    assert_eq!(target.unrecorded, vec![kid(1)]);
    assert!(target.injected.is_empty());
    assert_eq!(
        desired_record(&settings(), &o),
        sim_record(&settings(), &[1, 2])
    );
    // Never recorded: the same key id is dropped.
    o.record = Some(sim_record(&settings(), &[2]));
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(1)]);
    assert_eq!(
        desired_record(&settings(), &o),
        sim_record(&settings(), &[2])
    );
}

#[test]
fn a_key_without_a_record_gets_one_from_its_key_secrets_first() {
    // After an upgrade: no record yet. The minted key ids are recorded before anything else;
    // a bundle entry no key Secret accounts for was never recorded and is not adopted.
    let mut o = with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
        o.bundle = bundle(&[1, 2, 7], &[]);
    });
    o.record = None;
    let p = super::plan(&settings(), &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteRecord {
            record: sim_record(&settings(), &[1, 2])
        })
    );
    o.record = Some(sim_record(&settings(), &[1, 2]));
    assert_eq!(bundle_target(&settings(), &o).injected, vec![kid(7)]);
}

#[test]
fn the_record_keeps_the_longest_lifetime_a_key_id_signed() {
    let mut o = with_record(&[2], &[2]);
    let mut s = settings();
    s.token_ttl = secs(600);
    // Lowered from 3600 s: the record keeps 3600 (tokens issued before still live that long).
    assert_eq!(desired_record(&s, &o).kids[&kid(2)], TTL);
    // Raised: recorded before a token of that lifetime is handed out.
    s.token_ttl = secs(7200);
    let p = super::plan(&s, &o, now());
    assert_eq!(
        p.step,
        Some(Step::WriteRecord {
            record: sim_record(&s, &[2])
        })
    );
    // The token the agent Secret holds counts too (a record lost with a long-lived token out).
    o.record = Some(TrustRecord::default());
    if let AgentSecretObs::Owned(a) = &mut o.agent_secret {
        a.token_iat = Some(now().timestamp());
        a.token_exp = Some(now().timestamp() + 5000);
    }
    assert_eq!(desired_record(&settings(), &o).kids[&kid(2)], 5000);
}

#[test]
fn a_compromised_key_id_leaves_the_record_at_once() {
    let o = with_obs(vec![key(1, Retiring), key(2, Active)], |o| {
        o.record = Some(sim_record(&settings(), &[1, 2]));
    });
    let s = with_settings(|s| {
        s.compromised.insert(kid(1));
    });
    assert_eq!(
        super::plan(&s, &o, now()).step,
        Some(Step::WriteRecord {
            record: sim_record(&s, &[2])
        })
    );
}

#[test]
fn the_record_carries_the_names_and_claims_the_operator_signs_with() {
    let o = with_record(&[2], &[2]);
    let s = with_settings(|s| {
        s.audience = "keyward:ns/demo".into();
        s.issuer = "https://issuer".into();
    });
    let Some(Step::WriteRecord { record }) = super::plan(&s, &o, now()).step else {
        panic!("no record write");
    };
    assert_eq!(
        (
            record.bundle.as_str(),
            record.aud.as_str(),
            record.iss.as_str()
        ),
        ("demo-trust", "keyward:ns/demo", "https://issuer")
    );
}

/// Issue 18 part 1: a key created without `token.audience` issues its own audience,
/// `keyward:<ns>/<name>`; a key that already issues one keeps it (an upgrade refuses no token);
/// an audience in the spec always wins.
#[test]
fn the_default_audience_is_per_key_and_sticks_to_a_live_key() {
    let mut new = pk(ProvisioningKeySpec::default());
    new.metadata.namespace = Some("team-a".into());
    let s = resolve_or_keep(&new, &Floors::none(), &LastGood::default());
    assert_eq!(s.audience, "keyward:team-a/demo");
    // Minted before audiences were per key: its token and record say `keyward`.
    for last in [
        LastGood {
            audience: Some(DEFAULT_AUDIENCE.into()),
            ..Default::default()
        },
        LastGood {
            recorded_audience: Some(DEFAULT_AUDIENCE.into()),
            ..Default::default()
        },
    ] {
        assert_eq!(
            resolve_or_keep(&new, &Floors::none(), &last).audience,
            "keyward"
        );
    }
    let mut explicit = new.clone();
    explicit.spec.token = Some(TokenSpec {
        audience: some("bundles"),
        ..Default::default()
    });
    let last = LastGood {
        recorded_audience: Some(DEFAULT_AUDIENCE.into()),
        ..Default::default()
    };
    assert_eq!(
        resolve_or_keep(&explicit, &Floors::none(), &last).audience,
        "bundles"
    );
}
