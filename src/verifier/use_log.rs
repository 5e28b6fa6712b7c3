//! Recording use: which (ProvisioningKey, key id, agent instance) was seen, and when.
//!
//! Every accepted request is handed to a [`UseLog`]. The agent instance is the pod's UID, taken
//! from the pod-bound ServiceAccount token the API server vouched for (`super::pod_identity`;
//! StatefulSets reuse pod names, never UIDs), never from a header the client chose. A request
//! without such a token is recorded as [`Instance::Unattributed`], which proves that the key
//! id is in use but confirms no pod.
//!
//! The reporter (`super::report`) drains the log every report interval and writes what changed
//! to the operator; see docs/verifier.md.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use super::index::KeyRef;

/// Who presented a token.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Instance {
    /// A pod, by its UID (canonical lowercase UUID).
    Pod(String),
    /// No usable pod UID: counts as use of the key id, never as any pod.
    Unattributed,
}

impl Instance {
    pub fn pod_uid(&self) -> Option<&str> {
        match self {
            Instance::Pod(uid) => Some(uid),
            Instance::Unattributed => None,
        }
    }
}

/// One accepted request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    pub key: KeyRef,
    pub kid: String,
    pub instance: Instance,
    pub at: DateTime<Utc>,
}

/// Called on each accepted request. Must not block (a handler calls it inline).
pub trait UseLog: Send + Sync {
    fn record(&self, used: Use);
}

/// Records nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoUseLog;

impl UseLog for NoUseLog {
    fn record(&self, _: Use) {}
}

/// Last time each (key, kid, instance) was seen, in memory, bounded: once `capacity` entries
/// are held, a new triple loses its pod (counted as dropped) but never its use: it is recorded
/// as unattributed use of the key id. Nothing known is evicted, so a flood of made-up pod UIDs
/// cannot erase a real pod's record; and a full log can never make a used key id look unused
/// (the unattributed entries beyond `capacity` are one per verified (key, kid), bounded by the
/// key ids the trust bundles list, not by client input). A reporter drains it later.
#[derive(Debug)]
pub struct MemoryUseLog {
    capacity: usize,
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    last_seen: BTreeMap<(KeyRef, String, Instance), DateTime<Utc>>,
    dropped: u64,
    /// The time of the last [`MemoryUseLog::drain`]: a use recorded afterwards counts as at
    /// least this late, so every use is either in a drain or at or after its time (a handler
    /// reads the clock before it records).
    drained_at: Option<DateTime<Utc>>,
}

impl MemoryUseLog {
    pub fn new(capacity: usize) -> Self {
        MemoryUseLog {
            capacity,
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When `kid` of `key` was last seen from anyone (attributed or not).
    pub fn last_used(&self, key: &KeyRef, kid: &str) -> Option<DateTime<Utc>> {
        self.lock()
            .last_seen
            .iter()
            .filter(|((k, i, _), _)| k == key && i == kid)
            .map(|(_, at)| *at)
            .max()
    }

    /// The pods seen presenting `kid` of `key`, with when (unattributed use never appears).
    pub fn pods_seen(&self, key: &KeyRef, kid: &str) -> BTreeMap<String, DateTime<Utc>> {
        self.lock()
            .last_seen
            .iter()
            .filter(|((k, i, _), _)| k == key && i == kid)
            .filter_map(|((_, _, inst), at)| inst.pod_uid().map(|u| (u.to_string(), *at)))
            .collect()
    }

    /// Triples not recorded because the log was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Takes everything recorded so far, as of `now`: a use recorded after this call counts as
    /// used at `now` or later (never earlier), so `now` can serve as a watermark. The capacity
    /// then applies to what arrives until the next drain.
    pub fn drain(&self, now: DateTime<Utc>) -> Vec<Use> {
        let mut inner = self.lock();
        inner.drained_at = Some(inner.drained_at.map_or(now, |d| d.max(now)));
        std::mem::take(&mut inner.last_seen)
            .into_iter()
            .map(|((key, kid, instance), at)| Use {
                key,
                kid,
                instance,
                at,
            })
            .collect()
    }
}

impl UseLog for MemoryUseLog {
    fn record(&self, used: Use) {
        let mut inner = self.lock();
        let used_at = inner.drained_at.map_or(used.at, |d| used.at.max(d));
        let id = (used.key, used.kid, used.instance);
        let full = inner.last_seen.len() >= self.capacity;
        match inner.last_seen.get_mut(&id) {
            Some(at) => *at = (*at).max(used_at),
            None if full => {
                inner.dropped += 1;
                let (key, kid, _) = id;
                inner
                    .last_seen
                    .entry((key, kid, Instance::Unattributed))
                    .and_modify(|at| *at = (*at).max(used_at))
                    .or_insert(used_at);
            }
            None => {
                inner.last_seen.insert(id, used_at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81";

    fn used(instance: Instance, secs: i64) -> Use {
        Use {
            key: KeyRef::new("ns", "pk"),
            kid: "kid-a".into(),
            instance,
            at: DateTime::from_timestamp(secs, 0).expect("time"),
        }
    }

    #[test]
    fn unattributed_use_counts_as_use_but_never_as_a_pod() {
        let log = MemoryUseLog::new(10);
        let key = KeyRef::new("ns", "pk");
        log.record(used(Instance::Unattributed, 100));
        log.record(used(Instance::Unattributed, 150));
        assert!(log.pods_seen(&key, "kid-a").is_empty());
        assert_eq!(
            log.last_used(&key, "kid-a").map(|t| t.timestamp()),
            Some(150)
        );
        log.record(used(Instance::Pod(UID.into()), 200));
        log.record(used(Instance::Pod(UID.into()), 120)); // out of order: keeps the latest
        let pods = log.pods_seen(&key, "kid-a");
        assert_eq!(pods.len(), 1);
        assert_eq!(pods.get(UID).map(|t| t.timestamp()), Some(200));
        assert!(log.pods_seen(&key, "kid-b").is_empty());
    }

    #[test]
    fn a_full_log_keeps_what_it_knows() {
        let log = MemoryUseLog::new(1);
        let key = KeyRef::new("ns", "pk");
        log.record(used(Instance::Pod(UID.into()), 100));
        log.record(used(
            Instance::Pod("6f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81".into()),
            110,
        ));
        log.record(used(Instance::Pod(UID.into()), 120));
        assert_eq!(log.dropped(), 1);
        assert_eq!(
            log.pods_seen(&key, "kid-a").get(UID).map(|t| t.timestamp()),
            Some(120)
        );
    }

    /// Issue 18, finding 4: past the capacity a use loses its pod, never its key id.
    #[test]
    fn a_full_log_never_loses_a_key_ids_use() {
        let log = MemoryUseLog::new(100);
        let key = KeyRef::new("ns", "pk");
        for i in 0..100u128 {
            let uid = uuid::Uuid::from_u128(i + 1).hyphenated().to_string();
            log.record(used(Instance::Pod(uid), 100));
        }
        // A flood of made-up pods on another key id: every use of it is still recorded.
        for i in 0..10_000u128 {
            let uid = uuid::Uuid::from_u128(1_000_000 + i)
                .hyphenated()
                .to_string();
            log.record(Use {
                kid: "kid-old".into(),
                ..used(Instance::Pod(uid), 200 + (i as i64 % 7))
            });
        }
        assert_eq!(log.dropped(), 10_000);
        assert_eq!(
            log.last_used(&key, "kid-old").map(|t| t.timestamp()),
            Some(206)
        );
        assert!(log.pods_seen(&key, "kid-old").is_empty());
        let drained = log.drain(DateTime::from_timestamp(300, 0).expect("time"));
        assert_eq!(drained.len(), 101, "100 pods, and one unattributed use");
    }

    #[test]
    fn a_drain_empties_the_log_and_later_uses_are_never_earlier_than_it() {
        let log = MemoryUseLog::new(1);
        log.record(used(Instance::Pod(UID.into()), 100));
        log.record(used(
            Instance::Pod("6f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81".into()),
            100,
        )); // full: kept as unattributed use
        let drained = log.drain(DateTime::from_timestamp(130, 0).expect("time"));
        assert_eq!(drained.len(), 2);
        assert_eq!(log.dropped(), 1);
        // The capacity applies again after a drain; a use stamped before the drain (its handler
        // read the clock, then the drain ran) counts as at the drain.
        log.record(used(Instance::Unattributed, 120));
        let drained = log.drain(DateTime::from_timestamp(140, 0).expect("time"));
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].at.timestamp(), 130);
        assert!(
            log.drain(DateTime::from_timestamp(150, 0).expect("time"))
                .is_empty()
        );
    }
}
