//! A small simulator: the objects of one ProvisioningKey (`store`), every planned step written
//! to them by the controller's own write (`rotation::write::of`) through the in-memory executor
//! (`rotation::write::memory`), the evidence parsed back by the controller's own observe, and
//! the safety invariants checked after each step (`invariants`). Scenario runs (`scenarios`)
//! and property tests on random histories (`properties`) drive it. The consumers, the rotate
//! annotation and the settings are the simulator's own: they stand for other controllers and
//! for the user.

use super::*;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use crate::labels as l;
use crate::rotation::observe;
use crate::rotation::snapshot::Read;
use crate::rotation::write::{self, KeyNeed, memory};

/// An in-memory model of the evidence the controller observes. Every planned step is applied
/// the way the controller would apply it, and the safety invariants are checked after each.
#[derive(Clone, Debug)]
struct Sim {
    settings: Settings,
    /// The evidence: keys, bundle, agent Secret and record parsed from `store` after each write;
    /// the rest set by the simulation.
    obs: Observed,
    /// The ProvisioningKey "demo" and the objects it owns.
    pk: ProvisioningKey,
    store: store::Store,
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
        let mut pk = ProvisioningKey::new("demo", Default::default());
        pk.metadata.namespace = Some("ns".into());
        pk.metadata.uid = Some("sim-uid".into());
        let mut store = store::Store::default();
        store.put_pk(pk.clone());
        Sim {
            settings,
            pk,
            store,
            obs: Observed {
                keys: Vec::new(),
                rotate_annotation: None,
                reactivate_annotation: None,
                bundle: BundleObs::Missing,
                agent_secret: AgentSecretObs::Missing,
                consumers: Vec::new(),
                uncovered: Some(Vec::new()),
                usage: None,
                record: None,
                legacy_record: Default::default(),
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

    /// The key Secrets of "demo" as stored.
    fn key_secrets(&self) -> observe::KeySecrets {
        let secrets: Vec<Secret> = self
            .store
            .secrets()
            .into_iter()
            .filter(|s| {
                s.labels().get(l::PROVISIONING_KEY).map(String::as_str) == Some("demo")
                    && s.labels().get(l::COMPONENT).map(String::as_str) == Some(l::COMPONENT_KEY)
            })
            .collect();
        observe::key_secrets(&self.pk, &secrets)
    }

    /// What the controller would read now.
    fn read(&self) -> Read {
        let secrets = self.key_secrets();
        let cm = self.store.config_map(&self.settings.trust_bundle_name);
        let agent = self.store.secret(&self.settings.secret_name);
        let (_, bundle_jwks, _) =
            observe::bundle_and_agent(&self.pk, &self.settings, &secrets, cm, agent);
        Read {
            settings: self.settings.clone(),
            observed: self.obs.clone(),
            secrets,
            bundle_jwks,
            bundle_rv: cm.and_then(|c| c.resource_version()),
            agent_secret_rv: agent.and_then(|s| s.resource_version()),
        }
    }

    /// Parses the evidence back from the objects, as the controller's observe does.
    fn sync(&mut self) {
        if let Some(pk) = self.store.pk("demo") {
            self.pk = pk;
        }
        let secrets = self.key_secrets();
        let cm = self.store.config_map(&self.settings.trust_bundle_name);
        let agent = self.store.secret(&self.settings.secret_name);
        let (bundle, _, agent_secret) =
            observe::bundle_and_agent(&self.pk, &self.settings, &secrets, cm, agent);
        self.obs.keys = secrets.keys;
        self.obs.bundle = bundle;
        self.obs.agent_secret = agent_secret;
        self.obs.record = TrustRecord::of(&self.pk).map(Result::unwrap_or_default);
        self.obs.legacy_record = crate::trust_record::Legacy::of(&self.pk);
    }

    /// Writes `step` to the objects: the controller's write, by the in-memory executor.
    fn write(&mut self, step: &Step) -> SimResult {
        let key = match write::key_need(step) {
            Some(KeyNeed::New) => match step {
                Step::Mint { seq, .. } => Some(key_pair(*seq)),
                _ => None,
            },
            Some(KeyNeed::Stored(seq)) => self
                .store
                .secret(&crate::rotation::desired::key_secret_name("demo", seq))
                .and_then(|s| s.data.as_ref()?.get(l::DATA_PRIVATE_KEY).cloned())
                .map(|pem| crate::keys::KeyPair::from_pkcs8_pem(&String::from_utf8_lossy(&pem.0)))
                .transpose()
                .map_err(|e| format!("stored private key: {e}"))?,
            None => None,
        };
        let read = self.read();
        let jti = format!("jti-{}", self.counter);
        let inputs = write::Inputs {
            pk: &self.pk,
            read: &read,
            now: self.now,
            key: key.as_ref(),
            jti: &jti,
        };
        let Some(w) = write::of(step, &inputs).map_err(|e| format!("no write: {e}"))? else {
            return Ok(());
        };
        memory::execute(&mut self.store, w).map_err(|e| format!("write refused: {e:?}"))?;
        self.sync();
        Ok(())
    }

    /// The controller's status write, as far as the trust record goes.
    fn write_status_record(&mut self, record: &TrustRecord) {
        if let Some(mut pk) = self.store.pk("demo") {
            pk.status.get_or_insert_default().trust_record = Some(record.render());
            self.store.put_pk(pk);
        }
        self.sync();
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

    fn agent_kid(&self) -> Option<String> {
        match &self.obs.agent_secret {
            AgentSecretObs::Owned(s) => s.kid.clone(),
            _ => None,
        }
    }

    /// Plans, twice: the planner must be deterministic.
    fn plan(&self) -> SimResult<Plan> {
        let p = crate::rotation::plan(&self.settings, &self.obs, self.now);
        let again = crate::rotation::plan(&self.settings, &self.obs, self.now);
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
        let Some(step) = p.step else {
            // The status write that ends the reconcile carries a key's first record.
            if let Some(r) = &p.record {
                self.log
                    .push(format!("status write with the first record {r:?}"));
                self.write_status_record(r);
            }
            return Ok(None);
        };
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
                if *active {
                    self.ever_published = true;
                    self.ever_activated = true;
                    self.activated_emergency.insert(*seq, false);
                }
                let _ = (consumed_request_token, consumed_annotation);
            }
            Step::MarkPublished { seq } => {
                let k = self.key(*seq)?;
                ensure!(
                    k.state == KeyState::Pending,
                    "MarkPublished of a {:?} key",
                    k.state
                );
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
                        state.is_some_and(KeyState::revoked),
                        "WriteRecord dropped key id {kid} in state {state:?} while the bundle trusts it"
                    );
                }
            }
            Step::DropLegacyRecord => {
                ensure!(
                    self.obs.legacy_record == crate::trust_record::Legacy::Stale,
                    "the annotation removed while the status holds no newer record"
                );
            }
            Step::WriteBundle { trusted, revoked } => {
                // (c) Once a key was published, the bundle always trusts at least one key.
                ensure!(!trusted.is_empty(), "WriteBundle with no trusted key");
                // (r) The bundle trusts only recorded key ids (a compromised one left the
                // record first, and leaves the bundle at its revocation). Before a key's first
                // record (carried by the reconcile's status write) nothing of it is trusted.
                for kid in trusted
                    .iter()
                    .filter(|k| !self.settings.compromised.contains(*k))
                    .filter(|_| self.obs.record.is_some())
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
            }
            Step::RecordPublished { seq } => {
                let in_bundle = matches!(&self.obs.bundle, BundleObs::Owned { kids, .. } if kids.contains(&kid(*seq)));
                ensure!(
                    in_bundle,
                    "RecordPublished of key {seq} that is not in the bundle"
                );
                let k = self.key(*seq)?;
                ensure!(
                    k.state == KeyState::Published,
                    "RecordPublished of a {:?} key",
                    k.state
                );
                ensure!(k.published_at.is_none(), "RecordPublished twice");
                self.ever_published = true;
            }
            Step::Activate { seq, emergency } => {
                let ever_activated = self.ever_activated;
                let compromised_listed = !self.settings.compromised.is_empty();
                let no_current = cur_before.is_none();
                let k = self.key(*seq)?.clone();
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
                self.ever_activated = true;
                self.activated_emergency.insert(*seq, *emergency);
            }
            Step::Retire { seq } => {
                let cur = cur_before.as_ref().ok_or("Retire without a current key")?;
                ensure!(
                    *seq < cur.seq,
                    "Retire of key {seq} that is not older than the current key"
                );
                let k = self.key(*seq)?;
                ensure!(
                    matches!(k.state, KeyState::Active | KeyState::Published),
                    "Retire of a {:?} key",
                    k.state
                );
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
                // record covers; or before a key's first record, which the reconcile's status
                // write carries (the verifier trusts nothing of the key until then).
                ensure!(
                    self.obs
                        .record
                        .as_ref()
                        .map_or(self.handed_out.is_empty(), |r| r
                            .kids
                            .get(&cur.kid)
                            .is_some_and(|t| *t >= self.settings.token_ttl.as_secs())),
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
                if changes {
                    // The PolicyAgent controller rolls every workload to the new key.
                    for c in &mut self.obs.consumers {
                        c.rolled_at = Some(now);
                        c.waiting_reason = Some("rolling".into());
                    }
                }
                self.handed_out.insert(cur.kid.clone());
            }
            Step::Reactivate { seq, request } => {
                let k = self.key(*seq)?.clone();
                ensure!(
                    k.state == KeyState::Deactivated && k.has_private_key,
                    "Reactivate of a {:?} key",
                    k.state
                );
                ensure!(
                    !self.settings.compromised.contains(&k.kid),
                    "Reactivate of a compromised key"
                );
                ensure!(
                    self.obs.reactivate_annotation.as_ref() == Some(request)
                        && rules::reactivate_kid(request) == k.kid,
                    "Reactivate of {} on request {request:?}, annotation {:?}",
                    k.kid,
                    self.obs.reactivate_annotation
                );
            }
            Step::Destroy {
                seq,
                emergency: false,
            } if self.key(*seq)?.state == KeyState::Deactivated => {
                let k = self.key(*seq)?.clone();
                let since = k
                    .deactivated_at
                    .ok_or("deactivated key without deactivated_at")?;
                let retain = chrono::Duration::from_std(self.settings.retain_deactivated_for)
                    .expect("small");
                let deactivated: Vec<u32> = before
                    .iter()
                    .filter(|k| k.state == KeyState::Deactivated)
                    .map(|k| k.seq)
                    .collect();
                let over_cap = deactivated.len() > crate::rotation::rules::MAX_DEACTIVATED
                    && deactivated.first() == Some(seq);
                ensure!(
                    over_cap || now >= since + retain,
                    "Destroy {}s after deactivation, retainDeactivatedFor is {}s",
                    (now - since).num_seconds(),
                    retain.num_seconds()
                );
            }
            Step::Deactivate { seq } | Step::Destroy { seq, .. } => {
                let emergency = matches!(
                    step,
                    Step::Destroy {
                        emergency: true,
                        ..
                    }
                );
                let kid_compromised = self.settings.compromised.contains(&kid(*seq));
                ensure!(
                    emergency == kid_compromised,
                    "Revoke emergency={emergency} of a key compromised={kid_compromised}"
                );
                ensure!(
                    !matches!(
                        step,
                        Step::Destroy {
                            emergency: false,
                            ..
                        }
                    ) || self.settings.retain_deactivated_for.is_zero(),
                    "a retiring key destroyed without being deactivated, retainDeactivatedFor {:?}",
                    self.settings.retain_deactivated_for
                );
                let k = self.key(*seq)?.clone();
                ensure!(k.state != KeyState::Destroyed, "Revoke of a revoked key");
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
                            "Destroy {}s after retirement, overlap is {}s",
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
            }
            Step::Prune { seq } => {
                let revoked: Vec<u32> = before
                    .iter()
                    .filter(|k| k.state == KeyState::Destroyed)
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
            }
            Step::Repair { seq } => {
                // Edited as the trust record sees it (a deactivation the Secret lost counts).
                let anchored = crate::rotation::anchored(&self.obs);
                let view = anchored.as_ref().unwrap_or(&self.obs);
                let k = view
                    .keys
                    .iter()
                    .find(|k| k.seq == *seq)
                    .ok_or_else(|| format!("no key {seq}"))?;
                ensure!(
                    k.edited.is_some(),
                    "Repair of key {seq} that was not edited"
                );
            }
        }
        self.write(step)?;
        self.check_transition(&before, step)?;
        self.check_state()
    }
    /// Whether every request was served, no compromised key is trusted and (unless an interval
    /// keeps rotating, possibly back to back) no rotation is in flight.
    fn converged(&self) -> bool {
        let keys = &self.obs.keys;
        let latest = keys.last();
        let served = |wanted: &Option<String>, consumed: Option<&Option<String>>| {
            wanted.is_none() || consumed == Some(wanted)
        };
        let idle = keys.iter().all(|k| {
            matches!(
                k.state,
                KeyState::Active | KeyState::Deactivated | KeyState::Destroyed
            )
        });
        current(keys).is_some()
            && (idle || self.settings.interval.is_some())
            && keys.iter().all(|k| {
                k.state == KeyState::Destroyed || !self.settings.compromised.contains(&k.kid)
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

// Declared after `ensure!`, which they use.
mod invariants;
mod properties;
mod scenarios;
pub(super) mod store;
