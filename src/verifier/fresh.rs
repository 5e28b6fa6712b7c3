//! Whether the verifier's view is confirmed. Each watch confirms its view when it has listed
//! (and on every event after); a watch error starts a failure that ends only when a new list
//! completes (the watch is rebuilt after an error, so a recovery is always a full, consistent
//! list, never a silent re-watch). A view that has not been confirmed for longer than
//! `--max-staleness` makes the verifier not ready and shows in
//! `keyward_verifier_view_unconfirmed_seconds`.
//!
//! The bound on how long a revoked key id can still pass: the watch lag (milliseconds while
//! the watch is healthy; at most `--max-staleness` before the verifier goes not ready when it
//! is not), plus, for consumers of the HTTP JWKS, its `max-age` (half the key's publishDelay,
//! at most 5 minutes).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default of `--max-staleness`.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(60);

/// The failures of each watch.
#[derive(Debug)]
pub struct Freshness {
    /// Per watch: since when it has been failing (`None`: confirmed).
    failing: Mutex<Vec<Option<Instant>>>,
    pub max_staleness: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness::new(DEFAULT_MAX_STALENESS)
    }
}

impl Freshness {
    pub fn new(max_staleness: Duration) -> Self {
        Freshness {
            failing: Mutex::new(Vec::new()),
            max_staleness,
        }
    }

    /// A new watch (confirmed only once it lists: until then readiness waits for the list).
    pub fn register(&self) -> usize {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        f.push(None);
        f.len() - 1
    }

    /// Watch `slot` listed or delivered an event: its view is confirmed.
    pub fn confirmed(&self, slot: usize) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = f.get_mut(slot) {
            *s = None;
        }
    }

    /// Watch `slot` failed at `now` (a failure already running keeps its start).
    pub fn failed(&self, slot: usize, now: Instant) {
        let mut f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = f.get_mut(slot) {
            s.get_or_insert(now);
        }
    }

    /// How long the view has gone unconfirmed at `now`: the oldest running failure.
    pub fn unconfirmed_for(&self, now: Instant) -> Duration {
        let f = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        oldest_failure(&f, now)
    }

    /// Whether the view is stale: unconfirmed for longer than `max_staleness`.
    pub fn is_stale(&self, now: Instant) -> bool {
        self.unconfirmed_for(now) > self.max_staleness
    }
}

fn oldest_failure(failing: &[Option<Instant>], now: Instant) -> Duration {
    failing
        .iter()
        .flatten()
        .map(|since| now.saturating_duration_since(*since))
        .max()
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_counts_from_its_start_until_a_watch_confirms_again() {
        let f = Freshness::new(Duration::from_secs(60));
        let (a, b) = (f.register(), f.register());
        let t0 = Instant::now();
        assert_eq!(f.unconfirmed_for(t0), Duration::ZERO);
        f.failed(a, t0);
        // A second failure of the same watch does not restart the clock.
        f.failed(a, t0 + Duration::from_secs(30));
        f.failed(b, t0 + Duration::from_secs(50));
        assert_eq!(
            f.unconfirmed_for(t0 + Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert!(!f.is_stale(t0 + Duration::from_secs(60)));
        assert!(f.is_stale(t0 + Duration::from_secs(61)));
        // Watch a lists again: b's failure is what is left.
        f.confirmed(a);
        assert_eq!(
            f.unconfirmed_for(t0 + Duration::from_secs(61)),
            Duration::from_secs(11)
        );
        assert!(!f.is_stale(t0 + Duration::from_secs(61)));
        f.confirmed(b);
        assert_eq!(
            f.unconfirmed_for(t0 + Duration::from_secs(999)),
            Duration::ZERO
        );
        // An unknown slot changes nothing.
        f.failed(7, t0);
        assert_eq!(
            f.unconfirmed_for(t0 + Duration::from_secs(999)),
            Duration::ZERO
        );
    }
}
