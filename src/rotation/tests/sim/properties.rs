//! Property tests: random histories of events on the simulator keep the invariants, and each
//! request rotates exactly once.

use super::*;

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
    /// A new `keyward.dev/reactivate` request naming the newest deactivated key (or, with none,
    /// the current key: refused).
    Reactivate,
    /// Someone edits the newest deactivated key Secret back to `retiring` (label, and the
    /// `deactivated-at` annotation removed).
    TamperDeactivated,
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
        2 => Just(Event::Reactivate),
        1 => Just(Event::TamperDeactivated),
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
        // retainDeactivatedFor: destroyed at once, or kept deactivated a while.
        prop_oneof![1 => Just(0u64), 2 => 1u64..=7200],
        // Mostly no rotation window, sometimes a daily one (start minute, length in minutes).
        prop_oneof![3 => Just(None), 1 => (0u32..1440, 1u32..1439).prop_map(Some)],
        // Proof of possession (with the private key): no token in the agent Secret.
        any::<bool>(),
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
                retain,
                window,
                pop,
            )| {
                Settings {
                    interval: interval.map(secs),
                    min_interval: secs(min_interval),
                    publish_delay: secs(publish_delay),
                    overlap: secs(overlap),
                    confirmation_timeout: secs(timeout),
                    token_ttl: secs(ttl),
                    include_private_key: private || pop,
                    proof_of_possession: pop,
                    request_token: token,
                    uid,
                    retain_deactivated_for: secs(retain),
                    window: window.map(|(start, len)| {
                        let hm = |m: u32| format!("{:02}:{:02}", m / 60 % 24, m % 60);
                        crate::rotation::window::Window::parse(
                            &[],
                            &hm(start),
                            &hm((start + len) % 1440),
                            None,
                        )
                        .expect("a valid window")
                    }),
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
                    .find(|k| k.state != KeyState::Destroyed)
                {
                    self.settings.compromised.insert(k.kid.clone());
                }
            }
            Event::Suspend(b) => self.settings.suspend = *b,
            Event::TamperAgentSecret => {
                let name = self.settings.secret_name.clone();
                self.store.edit_secret(&name, |s| s.metadata.labels = None);
            }
            Event::DeleteAgentSecret => {
                let name = self.settings.secret_name.clone();
                self.store.remove(memory::Kind::Secret, &name);
            }
            Event::DeleteBundle => {
                let name = self.settings.trust_bundle_name.clone();
                self.store.remove(memory::Kind::ConfigMap, &name);
            }
            Event::Crash(_) => {}
            Event::Reactivate => {
                let keys = &self.obs.keys;
                let target = keys
                    .iter()
                    .rev()
                    .find(|k| k.state == KeyState::Deactivated)
                    .or_else(|| current(keys));
                if let Some(k) = target {
                    self.obs.reactivate_annotation = Some(format!("{},{n}", k.kid));
                }
            }
            Event::TamperDeactivated => {
                if let Some(k) = self
                    .obs
                    .keys
                    .iter()
                    .rev()
                    .find(|k| k.state == KeyState::Deactivated)
                {
                    let name = crate::rotation::desired::key_secret_name("demo", k.seq);
                    self.store.edit_secret(&name, |s| {
                        s.metadata
                            .labels
                            .get_or_insert_default()
                            .insert(l::KEY_STATE.into(), "retiring".into());
                        s.metadata
                            .annotations
                            .get_or_insert_default()
                            .remove(l::DEACTIVATED_AT);
                    });
                }
            }
        }
        self.sync();
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
