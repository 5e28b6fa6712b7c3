//! The retry policy: per-object exponential backoff with jitter, and the controllers' error
//! policy that applies it; the watches' backoff; and what happens when the API server answers
//! again after an outage ([`Outage`]): every object's backoff is cleared and the objects whose
//! reconcile failed are requeued at once, instead of each waiting out its pending delay.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::{Context, Error};

/// Per-object retry backoff: exponential from [`Backoff::BASE`], capped at [`Backoff::CAP`],
/// jittered (75-125 %), reset by a successful reconcile (or after a quiet period).
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
    /// The objects whose last reconcile failed: requeued when the API server answers again.
    failed: std::sync::Mutex<std::collections::BTreeSet<Failed>>,
}

/// An object whose last reconcile failed: its kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failed {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
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

    fn failed(&self, failed: Failed) {
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        f.insert(failed);
    }

    /// After an outage: clears every object's backoff and hands back (and forgets) the failed
    /// objects of namespace `ns` (`None`: of every namespace), to be requeued at once.
    pub fn recover(&self, ns: &Option<String>) -> Vec<Failed> {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let mut f = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let (mine, rest): (Vec<Failed>, Vec<Failed>) = std::mem::take(&mut *f)
            .into_iter()
            .partition(|o| ns.is_none() || o.namespace == *ns);
        f.extend(rest);
        mine
    }
}

/// Whether the watches find the API server failing, and the news of its return: the first
/// event a watch delivers after any watch failed. Every scope then clears the backoff and
/// requeues its failed objects ([`Backoff::recover`]).
pub struct Outage {
    failing: AtomicBool,
    back: tokio::sync::broadcast::Sender<()>,
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            failing: AtomicBool::new(false),
            back: tokio::sync::broadcast::channel(16).0,
        }
    }
}

impl Outage {
    /// A watch delivered an event (`ok`) or failed.
    pub fn observe(&self, ok: bool) {
        if !ok {
            if !self.failing.swap(true, Ordering::SeqCst) {
                warn!("a watch failed: the API server is out of reach or refusing; retrying");
            }
        } else if self.failing.swap(false, Ordering::SeqCst) {
            info!("the API server answers again: clearing the backoff, requeueing failed objects");
            let _ = self.back.send(());
        }
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<()> {
        self.back.subscribe()
    }

    /// Whether a watch failed and nothing has answered since.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// Asks the API server for its version every [`Outage::PROBE`] (±20 %) while a watch has
    /// failed, and announces its return on the first answer. A watch that comes back with its
    /// resourceVersion delivers nothing until an object changes, and a failed reconcile waits
    /// out its backoff (up to a minute), so neither would notice the return by itself. Costs
    /// nothing while the API server answers: one atomic load per period.
    pub async fn probe(&self, client: &kube::Client) {
        loop {
            let period =
                Self::PROBE.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.8..1.2));
            tokio::time::sleep(period).await;
            // Bounded: an API server that hangs (stopped, not gone) must not hold the probe for
            // the client's read timeout (minutes) once it answers again.
            if self.failing()
                && tokio::time::timeout(Self::PROBE * 2, client.apiserver_version())
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                self.observe(true);
            }
        }
    }

    /// How often [`Outage::probe`] asks during an outage.
    pub const PROBE: Duration = Duration::from_secs(1);
}

/// A watch stream with the watches' backoff ([`WatchBackoff`]), reporting every event and
/// failure to `outage`. A pending retry is cut short when the API server's return is announced
/// ([`Outage::probe`]), so every watch is re-established at once instead of after its wait.
pub fn watch_backoff<S, T, E>(
    stream: S,
    outage: Arc<Outage>,
) -> impl futures::Stream<Item = Result<T, E>> + Send + 'static
where
    S: futures::Stream<Item = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    use futures::StreamExt as _;
    let back = outage.subscribe();
    let state = (
        Box::pin(stream),
        WatchBackoff::default(),
        back,
        outage,
        None,
    );
    futures::stream::unfold(
        state,
        |(mut stream, mut backoff, mut back, outage, pause): (_, _, _, _, Option<Duration>)| async move {
            if let Some(d) = pause {
                // Only news from after this failure ends the wait.
                while back.try_recv().is_ok() {}
                tokio::select! {
                    () = tokio::time::sleep(d) => {}
                    _ = back.recv() => {
                        // The API server answers again: a watch that still fails right after
                        // (a restarted API server warming its caches) retries from 200 ms, not
                        // from where the outage left its backoff (up to 4 s).
                        backoff = WatchBackoff::default();
                    }
                }
            }
            let item = stream.next().await?;
            let pause = match &item {
                Ok(_) => {
                    backoff = WatchBackoff::default();
                    outage.observe(true);
                    None
                }
                Err(_) => {
                    outage.observe(false);
                    backoff.next()
                }
            };
            Some((item, (stream, backoff, back, outage, pause)))
        },
    )
}

/// The watches' backoff: 200 ms doubling to [`WatchBackoff::CAP`], ±20 %, reset by every event
/// a watch delivers. kube's default (800 ms doubling to 30 s, reset only after 120 s) made the
/// operator wait out up to 30 s after an outage ended; 4 s keeps a relisting watch cheap for the
/// API server (one failed request per watch per 4 s) and its return noticed within seconds.
#[derive(Default)]
pub struct WatchBackoff {
    attempt: u32,
}

impl WatchBackoff {
    pub const CAP: Duration = Duration::from_secs(4);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = Duration::from_millis(200)
            .saturating_mul(2u32.saturating_pow(self.attempt.min(16)))
            .min(Self::CAP);
        self.attempt = self.attempt.saturating_add(1);
        Some(d.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.8..1.2)))
    }
}

/// The controllers' trigger backoff: none. kube's controller pauses all of its triggers (every
/// watch it reconciles on, and the requeues after an outage) with its default backoff, up to
/// 30 s, after any trigger stream fails. Each of our watch streams already waits out its own
/// backoff ([`watch_backoff`]), and that wait ends when the API server returns; a second,
/// longer pause on top held the first reconcile after a 30 s outage back by up to 8 s.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoPause;

impl Iterator for NoPause {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoPause {
    fn reset(&mut self) {}
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
    ctx.backoff.failed(Failed {
        kind: K::kind(&()).to_string(),
        namespace: obj.namespace(),
        name: obj.name_any(),
    });
    warn!(object = %key, reason = error.reason(), error = %error, retry_in = ?delay, "reconcile failed; retrying");
    if error.unreachable() {
        // The watches may not notice (a hung connection, or no watch restarted yet): the probe
        // then finds the API server's return.
        ctx.outage.observe(false);
    }
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

    #[test]
    fn recovery_clears_the_backoff_and_hands_back_each_scopes_failed_objects() {
        let b = Backoff::default();
        for _ in 0..6 {
            b.fail("ProvisioningKey/a.ns1");
        }
        let f = |ns: &str, name: &str| Failed {
            kind: "ProvisioningKey".into(),
            namespace: Some(ns.into()),
            name: name.into(),
        };
        b.failed(f("ns1", "a"));
        b.failed(f("ns2", "b"));
        b.failed(f("ns1", "a"));
        assert_eq!(b.recover(&Some("ns1".into())), vec![f("ns1", "a")]);
        assert!(b.fail("ProvisioningKey/a.ns1") <= Backoff::BASE.mul_f64(1.25));
        assert_eq!(b.recover(&None), vec![f("ns2", "b")]);
        assert!(b.recover(&None).is_empty());
    }

    #[test]
    fn watch_backoff_is_capped() {
        let mut w = WatchBackoff::default();
        let first = w.next().unwrap_or_default();
        assert!(first >= Duration::from_millis(160) && first <= Duration::from_millis(240));
        let later: Vec<Duration> = (0..20).filter_map(|_| w.next()).collect();
        assert!(later.iter().all(|d| *d <= WatchBackoff::CAP.mul_f64(1.2)));
        assert!(later[later.len() - 1] >= WatchBackoff::CAP.mul_f64(0.8));
    }

    #[test]
    fn an_outage_is_announced_once_on_the_first_success_after_failures() {
        let o = Outage::default();
        let mut rx = o.subscribe();
        o.observe(true);
        assert!(rx.try_recv().is_err(), "no outage, no news");
        o.observe(false);
        o.observe(false);
        o.observe(true);
        o.observe(true);
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "announced once");
    }

    /// A watch waiting out its retry after failures is re-established as soon as the API
    /// server's return is announced, not after its wait (here at least 1.28 s).
    #[tokio::test(start_paused = true)]
    async fn a_pending_watch_retry_ends_when_the_api_server_is_back() {
        use futures::StreamExt as _;
        let outage = Arc::new(Outage::default());
        let items = futures::stream::iter([Err(()), Err(()), Err(()), Err(()), Ok(1u32)]);
        let mut watch = Box::pin(watch_backoff(items, outage.clone()));
        for _ in 0..4 {
            assert_eq!(watch.next().await, Some(Err(())));
        }
        assert!(outage.failing());
        let start = tokio::time::Instant::now();
        let announcer = outage.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            announcer.observe(true);
        });
        assert_eq!(watch.next().await, Some(Ok(1)));
        let waited = start.elapsed();
        assert!(
            waited < Duration::from_millis(200),
            "waited {waited:?} for a retry the announcement should have cut short"
        );
    }

    /// After the announcement a watch that fails again (a restarted API server still warming
    /// up) retries after 200 ms, not after the 3.2 s its backoff had reached.
    #[tokio::test(start_paused = true)]
    async fn the_announcement_resets_the_watch_backoff() {
        use futures::StreamExt as _;
        let outage = Arc::new(Outage::default());
        let items = futures::stream::iter([Err(()), Err(()), Err(()), Err(()), Err(()), Ok(1u32)]);
        let mut watch = Box::pin(watch_backoff(items, outage.clone()));
        for _ in 0..4 {
            assert_eq!(watch.next().await, Some(Err(())));
        }
        let announcer = outage.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            announcer.observe(true);
        });
        assert_eq!(watch.next().await, Some(Err(())));
        let start = tokio::time::Instant::now();
        assert_eq!(watch.next().await, Some(Ok(1)));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(160) && waited <= Duration::from_millis(240),
            "waited {waited:?} after the announcement, not 200 ms ±20 %"
        );
    }

    /// Without an announcement, a failed watch waits out its backoff: 200 ms doubling, ±20 %.
    #[tokio::test(start_paused = true)]
    async fn a_failed_watch_waits_out_its_backoff() {
        use futures::StreamExt as _;
        let outage = Arc::new(Outage::default());
        let items = futures::stream::iter([Err(()), Err(()), Ok(1u32), Err(()), Ok(2)]);
        let mut watch = Box::pin(watch_backoff(items, outage));
        let start = tokio::time::Instant::now();
        assert_eq!(watch.next().await, Some(Err(())));
        assert_eq!(watch.next().await, Some(Err(())));
        assert_eq!(watch.next().await, Some(Ok(1)));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(480) && waited <= Duration::from_millis(720),
            "waited {waited:?}, not 200 ms + 400 ms ±20 %"
        );
        // An event resets it: the next failure waits 200 ms again, not 800 ms.
        let start = tokio::time::Instant::now();
        assert_eq!(watch.next().await, Some(Err(())));
        assert_eq!(watch.next().await, Some(Ok(2)));
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(160) && waited <= Duration::from_millis(240),
            "waited {waited:?} after an event, not 200 ms ±20 %"
        );
    }
}
