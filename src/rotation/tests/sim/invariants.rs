//! The safety invariants the simulator checks after each step.

use super::*;

impl Sim {
    /// (f) States only move forward; keys appear only by Mint and disappear only by Prune.
    pub(super) fn check_transition(&self, before: &[ObservedKey], step: &Step) -> SimResult {
        for b in before {
            match self.obs.keys.iter().find(|k| k.seq == b.seq) {
                None => ensure!(
                    matches!(step, Step::Prune { seq } if *seq == b.seq)
                        && b.state == KeyState::Destroyed,
                    "key {} disappeared",
                    b.seq
                ),
                Some(a) => {
                    // The one way back: a reactivation request, from deactivated to retiring.
                    let reactivated = matches!(step, Step::Reactivate { seq, .. } if *seq == b.seq)
                        && b.state == KeyState::Deactivated
                        && a.state == KeyState::Retiring;
                    ensure!(
                        a.state >= b.state || reactivated,
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
    pub(super) fn check_state(&self) -> SimResult {
        // The key Secrets as the trust record vouches for them: a deactivated key someone edited
        // back to `retiring` is still deactivated (and is repaired).
        let anchored = crate::rotation::anchored(&self.obs);
        let keys = &anchored.as_ref().unwrap_or(&self.obs).keys;
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
            k.state != KeyState::Destroyed && !self.settings.compromised.contains(&k.kid)
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
                .all(|k| k.state != KeyState::Destroyed || !k.has_private_key),
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
    pub(super) fn check_fixed_point(&self, p: &Plan) -> SimResult {
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
            keys.iter()
                .all(|k| k.state == KeyState::Destroyed
                    || !self.settings.compromised.contains(&k.kid)),
            "compromised key still trusted at a fixed point"
        );
        // Once no rotation is in flight, old revoked keys are pruned.
        if keys
            .iter()
            .all(|k| matches!(k.state, KeyState::Active | KeyState::Destroyed))
        {
            let revoked = keys
                .iter()
                .filter(|k| k.state == KeyState::Destroyed)
                .count();
            ensure!(revoked <= RETAIN_REVOKED, "{revoked} revoked keys kept");
        }
        // Nothing becomes due before the requeue: planning just before it still does nothing.
        let horizon = match p.requeue_after {
            Some(d) => {
                chrono::Duration::from_std(d).expect("small") - chrono::Duration::milliseconds(1)
            }
            None => chrono::Duration::days(400),
        };
        let early = crate::rotation::plan(&self.settings, &self.obs, self.now + horizon);
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
    pub(super) fn check_schedule(&self, p: &Plan) -> SimResult {
        if let (Some(cur), Some(interval)) = (current(&self.obs.keys), self.settings.interval) {
            let due = schedule::rotation_due_unjittered(&self.settings, cur).ok_or("no due")?;
            let bound = chrono::Duration::from_std(schedule::bound(interval)).expect("small");
            let shown = p
                .next_rotation_at
                .ok_or("no nextRotationAt with an interval")?;
            match &self.settings.window {
                None => ensure!(
                    shown <= due && shown >= due - bound,
                    "nextRotationAt {shown} outside [{}, {due}]",
                    due - bound
                ),
                // A window only delays: to its first opening at or after the jittered due time
                // and now, and never before the bound.
                Some(w) => {
                    let jittered = schedule::rotation_due(&self.settings, cur).ok_or("no due")?;
                    let now = self.now;
                    let ok = if shown > now {
                        w.contains(shown) && Some(shown) == w.next_open(jittered.max(now))
                    } else {
                        shown == jittered && w.contains(now)
                    };
                    ensure!(
                        ok && shown >= due - bound,
                        "nextRotationAt {shown} is not the window's first opening after {jittered} and {now}"
                    );
                }
            }
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
}
