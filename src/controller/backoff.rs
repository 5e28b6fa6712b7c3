//! The retry policy: per-object exponential backoff with jitter, and the controllers' error
//! policy that applies it.

use std::sync::Arc;
use std::time::Duration;

use kube::Resource;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use tracing::warn;

use super::{Context, Error};

/// Per-object retry backoff: exponential from [`Backoff::BASE`], capped at [`Backoff::CAP`],
/// jittered (75-125 %), reset by a successful reconcile (or after a quiet period).
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
}

impl Backoff {
    pub const BASE: Duration = Duration::from_millis(500);
    /// Well under half the smallest token ttl, so a failing write never delays a token refresh
    /// past the token's expiry.
    pub const CAP: Duration = Duration::from_secs(60);

    /// The delay before retry number `failures` (1-based), without jitter.
    pub fn delay(failures: u32) -> Duration {
        Self::BASE
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
            .min(Self::CAP)
    }

    /// Records a failure of `key` and returns the jittered delay before its retry.
    pub fn fail(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = f
            .entry(key.to_string())
            .or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() > Self::CAP * 4 {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = std::time::Instant::now();
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0.75..1.25);
        Self::delay(entry.0).mul_f64(jitter)
    }

    pub fn reset(&self, key: &str) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.remove(key);
    }
}

/// The backoff key of an object.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    ObjectRef::from_obj(obj).to_string()
}

pub(super) fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = object_key(&*obj);
    let delay = ctx.backoff.fail(&key);
    warn!(object = %key, reason = error.reason(), error = %error, retry_in = ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(Backoff::delay(1), Duration::from_millis(500));
        assert_eq!(Backoff::delay(2), Duration::from_secs(1));
        assert_eq!(Backoff::delay(5), Duration::from_secs(8));
        assert_eq!(Backoff::delay(8), Backoff::CAP);
        assert_eq!(Backoff::delay(u32::MAX), Backoff::CAP);
        let b = Backoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.fail("ns/pk")).collect();
        for (n, d) in delays.iter().enumerate() {
            let base = Backoff::delay(u32::try_from(n).unwrap() + 1);
            assert!(
                *d >= base.mul_f64(0.75) && *d <= base.mul_f64(1.25),
                "retry {n}: {d:?} outside the jitter of {base:?}"
            );
        }
        b.reset("ns/pk");
        assert!(b.fail("ns/pk") <= Backoff::BASE.mul_f64(1.25));
    }
}
