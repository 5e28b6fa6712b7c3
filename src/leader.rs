//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly one
//! runs the controllers and writes.
//!
//! # The protocol (client-go's `leaderelection`, by hand on kube's `Api<Lease>`)
//! - A candidate reads the Lease every `retry_period` (jittered by up to 20 %). It takes the
//!   Lease when it is missing, released (empty `holderIdentity`) or expired. *Expired* is judged
//!   by this process's own monotonic clock: the time since it last saw the Lease's
//!   `resourceVersion` change is compared with the holder's `leaseDurationSeconds`. Remote
//!   timestamps (`renewTime`) are never compared with the local wall clock, so clock skew
//!   between replicas does not matter, only clock *rate*.
//! - Every write of the Lease is a replace carrying the `resourceVersion` that was read
//!   (optimistic concurrency): of two candidates racing for an expired Lease, one gets 409.
//! - The leader renews every `retry_period`. It counts itself the leader only while less than
//!   `renew_deadline` has passed since the last successful renewal was *sent* (the instant is
//!   taken before the request, so it is never later than when the API server stored it, and
//!   thus never later than when any other candidate saw the change):
//!   [`LeaderHandle::is_leading`]. A candidate takes over at the earliest `lease_duration` after
//!   it saw that renewal, so the leader stops believing it leads at least
//!   `lease_duration - renew_deadline` (5 s by default) before anyone else can start.
//!
//! # Why two replicas never both write
//! 1. **Stop before release.** On SIGTERM the leader stops its controllers and waits for the
//!    in-flight reconciles (bounded by [`crate::controller::SHUTDOWN_DRAIN`]), and only then
//!    releases the Lease (empty holder, `leaseDurationSeconds: 1`, as client-go's
//!    `ReleaseOnCancel`), so the standby takes over at its next retry instead of after a whole
//!    lease duration: a rolling upgrade hands over at once.
//! 2. **Stop on loss.** When a renewal has not succeeded within `renew_deadline` (API server
//!    unreachable, or another replica holds the Lease) the controllers are stopped at once and
//!    the process exits non-zero after they drained ([`run`] returns [`LeadershipLost`]), like
//!    controller-runtime. Exiting rather than going back to standby means nothing of the old
//!    term survives into a new one (watch caches, consumer scans, probe evidence, roll slots,
//!    the own-write echo filter): the container restarts as a fresh standby within seconds.
//! 3. **A fence on every write.** While leader election is on, the controllers' client is
//!    wrapped by [`fenced`]: a mutating request is refused unless [`LeaderHandle::is_leading`]
//!    holds at the moment it is sent. This is checked on the local monotonic clock, which keeps
//!    running while a process is stopped, so a leader paused (SIGSTOP, a long GC-like stall, a
//!    frozen VM) past its renew deadline refuses every write from the first instruction it runs
//!    after it wakes, before its election task even noticed the loss. The reconcilers also
//!    check it explicitly right before each rotation step and each roll (a clear error in the
//!    log instead of a failed request).
//! 4. **Preconditions on irreversible writes.** A write already past the fence when the process
//!    was paused is still sent when it wakes. Every irreversible write therefore carries the
//!    `resourceVersion` of the object it was decided from: marking a key Secret revoked (and
//!    deleting its private key), removing a key id from the trust bundle, pruning a key Secret,
//!    handing out a key, rolling a workload. If the new leader has changed that object
//!    meanwhile, the stale write fails with 409 and changes nothing.
//!
//! What remains: a write that passed the fence and then sat in a paused process is decided on
//! reads at most a few seconds older than the pause; if nobody changed the object it was
//! decided from, it lands as decided. That is the same decision the process would have taken
//! without the pause; evidence that changed elsewhere (a PolicyAgent's confirmation) only ever
//! moves forward while a key is retiring.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::client::Body;
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

/// Defaults of the three settings (client-go's and controller-runtime's).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// The default Lease name (`--leader-election-id`).
pub const DEFAULT_LEASE_NAME: &str = "keyward";
/// Retry periods are stretched by a random factor in `[1, JITTER)`.
const JITTER: f64 = 1.2;

/// Leader election settings (flags `--leader-election-*`).
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (the Lease's `holderIdentity`); unique per process.
    pub identity: String,
    /// How long a candidate waits, after it last saw the Lease change, before it takes it.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often the Lease is read (candidates) or renewed (leader).
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// The settings with the defaults (15 s / 10 s / 2 s).
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: String) -> Self {
        LeaderElectionConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity,
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// client-go's rules: lease duration > renew deadline > 1.2 x retry period > 0, whole
    /// seconds for the lease duration (the Lease stores seconds).
    pub fn validate(&self) -> Result<(), String> {
        if self.namespace.is_empty() || self.name.is_empty() || self.identity.is_empty() {
            return Err(
                "leader election needs a Lease namespace, a Lease name and an identity".into(),
            );
        }
        if self.retry_period.is_zero() {
            return Err("--leader-election-retry-period must be more than 0".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return Err(format!(
                "--leader-election-lease-duration ({:?}) must be longer than --leader-election-renew-deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.renew_deadline.as_secs_f64() <= JITTER * self.retry_period.as_secs_f64() {
            return Err(format!(
                "--leader-election-renew-deadline ({:?}) must be longer than {JITTER} x --leader-election-retry-period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.lease_duration.subsec_nanos() != 0
            || self.lease_duration.as_secs() > i32::MAX as u64
        {
            return Err(format!(
                "--leader-election-lease-duration ({:?}) must be whole seconds",
                self.lease_duration
            ));
        }
        Ok(())
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// A unique identity: `POD_NAME` (else the host name) plus `_` and a random suffix, so two
/// processes never share one (client-go's `hostname_uuid`).
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "keyward".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}_{}", &suffix[..8])
}

/// The namespace of the Lease when `--leader-election-namespace` is not given: `POD_NAMESPACE`,
/// else the in-cluster service account's namespace.
pub fn default_namespace() -> Option<String> {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
}

/// This replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Has not read the Lease yet, or lost it.
    Candidate,
    /// Read the Lease: another replica holds it.
    Standby,
    /// Holds the Lease (see [`LeaderHandle::is_leading`] for the check writes rely on).
    Leader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Candidate => "Candidate",
            Role::Standby => "Standby",
            Role::Leader => "Leader",
        }
    }
}

struct Shared {
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    /// When the last successful acquisition or renewal was sent.
    renewed: Mutex<Option<Instant>>,
    /// When the Lease was last read (or written) successfully.
    lease_read: Mutex<Option<Instant>>,
}

impl Shared {
    fn renewed(&self) -> Option<Instant> {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_renewed(&self, at: Option<Instant>) {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    fn set_read(&self, at: Instant) {
        *self.lease_read.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }
}

/// What the rest of the process sees of the election: cheap to clone.
#[derive(Clone)]
pub struct LeaderHandle {
    shared: Arc<Shared>,
    role: watch::Receiver<Role>,
}

impl std::fmt::Debug for LeaderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderHandle")
            .field("identity", &self.shared.identity)
            .field("role", &*self.role.borrow())
            .field("leading", &self.is_leading())
            .finish()
    }
}

impl LeaderHandle {
    /// The role as it changes (for metrics and `/readyz`).
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    pub fn current_role(&self) -> Role {
        *self.role.borrow()
    }

    pub fn identity(&self) -> &str {
        &self.shared.identity
    }

    pub fn lease_duration(&self) -> Duration {
        self.shared.lease_duration
    }

    /// Whether this replica may write now: less than the renew deadline has passed, on the local
    /// monotonic clock (which keeps running while the process is stopped), since the last
    /// successful renewal was sent. Cheap (one uncontended lock); checked before every write.
    pub fn is_leading(&self) -> bool {
        self.shared
            .renewed()
            .is_some_and(|t| t.elapsed() < self.shared.renew_deadline)
    }

    /// When the Lease was last read or written successfully (a standby is ready while this is
    /// within the lease duration).
    pub fn last_lease_read(&self) -> Option<Instant> {
        *self
            .shared
            .lease_read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once this replica leads.
    pub async fn leading(&self) {
        let mut role = self.role.clone();
        while !(*role.borrow_and_update() == Role::Leader && self.is_leading()) {
            if role.changed().await.is_err() {
                futures::future::pending::<()>().await;
            }
        }
    }

    /// Resolves as soon as this replica no longer leads: its role changed, or the renew
    /// deadline passed without a renewal (even if the election task has not noticed yet).
    pub async fn lost(&self) {
        let mut role = self.role.clone();
        loop {
            let renewed = self.shared.renewed();
            let Some(deadline) = renewed
                .map(|t| t + self.shared.renew_deadline)
                .filter(|_| *role.borrow_and_update() == Role::Leader)
                .filter(|d| *d > Instant::now())
            else {
                return;
            };
            tokio::select! {
                changed = role.changed() => {
                    if changed.is_err() {
                        // The election task ended: the deadline still decides.
                        tokio::time::sleep_until(deadline.into()).await;
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
    }

    /// A handle that always leads (for tests of the fence and of the controllers).
    #[doc(hidden)]
    pub fn always_leading(identity: &str) -> LeaderHandle {
        let (_tx, rx) = watch::channel(Role::Leader);
        LeaderHandle {
            shared: Arc::new(Shared {
                identity: identity.into(),
                lease_duration: Duration::from_secs(u64::from(u32::MAX)),
                renew_deadline: Duration::from_secs(u64::from(u32::MAX)),
                renewed: Mutex::new(Some(Instant::now())),
                lease_read: Mutex::new(Some(Instant::now())),
            }),
            role: rx,
        }
    }

    /// Stops leading at once (tests: a handle whose lease was lost).
    #[doc(hidden)]
    pub fn revoke_for_test(&self) {
        self.shared.set_renewed(None);
    }
}

/// How a term ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop: the Lease was released (if it was held).
    Released,
    /// Leadership was lost: not renewed within the renew deadline, or taken by another replica.
    Lost,
}

/// The Lease as last seen.
struct Observed {
    resource_version: String,
    holder: String,
    lease_seconds: Option<i32>,
    /// When this process saw this resourceVersion first.
    at: Instant,
}

/// The election task: campaigns, then renews. Created with [`Elector::new`], run with
/// [`Elector::run`].
pub struct Elector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    shared: Arc<Shared>,
    role: watch::Sender<Role>,
    observed: Option<Observed>,
}

/// Whether a candidate may take the Lease: it is free (no holder), ours, or its holder has not
/// renewed it for a whole lease duration as measured by the observer's own clock since the
/// observed resourceVersion changed. `lease_seconds` is the holder's declared duration (ours
/// when it declared none), honoured up to twice ours: anyone who may create Leases in the
/// namespace can squat the name with `leaseDurationSeconds: 2147483647` and never renew, and
/// must not stall the operator for longer than that (replicas of one release declare the same
/// duration; twice covers a rolling change of it).
pub fn may_acquire(
    holder: &str,
    me: &str,
    observed_at: Instant,
    lease_seconds: Option<i32>,
    fallback: Duration,
    now: Instant,
) -> bool {
    if holder.is_empty() || holder == me {
        return true;
    }
    let duration = lease_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(fallback, Duration::from_secs)
        .min(fallback.saturating_mul(2));
    now.saturating_duration_since(observed_at) >= duration
}

fn micro_now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Elector {
    pub fn new(client: Client, config: LeaderElectionConfig) -> (Elector, LeaderHandle) {
        let (tx, rx) = watch::channel(Role::Candidate);
        let shared = Arc::new(Shared {
            identity: config.identity.clone(),
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            renewed: Mutex::new(None),
            lease_read: Mutex::new(None),
        });
        let handle = LeaderHandle {
            shared: shared.clone(),
            role: rx,
        };
        let elector = Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            shared,
            role: tx,
            observed: None,
        };
        (elector, handle)
    }

    fn set_role(&self, role: Role) {
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }

    fn observe(&mut self, lease: &Lease) {
        let now = Instant::now();
        self.shared.set_read(now);
        let rv = lease.resource_version().unwrap_or_default();
        if self
            .observed
            .as_ref()
            .is_some_and(|o| o.resource_version == rv)
        {
            return;
        }
        let spec = lease.spec.clone().unwrap_or_default();
        self.observed = Some(Observed {
            resource_version: rv,
            holder: spec.holder_identity.unwrap_or_default(),
            lease_seconds: spec.lease_duration_seconds,
            at: now,
        });
    }

    /// One attempt (client-go's `tryAcquireOrRenew`): `Ok(true)` when this replica holds the
    /// Lease afterwards (renewed), `Ok(false)` when another one holds it or won a race.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let sent = Instant::now();
        let me = self.config.identity.clone();
        let Some(current) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.config.lease_seconds()),
                    acquire_time: Some(micro_now()),
                    renew_time: Some(micro_now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    self.shared.set_renewed(Some(sent));
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&current);
        let Some(observed) = self.observed.as_ref() else {
            return Ok(false);
        };
        if !may_acquire(
            &observed.holder,
            &me,
            observed.at,
            observed.lease_seconds,
            self.config.lease_duration,
            Instant::now(),
        ) {
            return Ok(false);
        }
        let old = current.spec.clone().unwrap_or_default();
        let ours = old.holder_identity.as_deref() == Some(me.as_str());
        let mut next = current.clone();
        next.metadata.managed_fields = None;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(self.config.lease_seconds()),
            acquire_time: if ours {
                old.acquire_time.clone()
            } else {
                Some(micro_now())
            },
            renew_time: Some(micro_now()),
            lease_transitions: if ours {
                old.lease_transitions
            } else {
                Some(old.lease_transitions.unwrap_or(0).saturating_add(1))
            },
            ..old
        });
        // `replace` sends the resourceVersion read above: a concurrent change answers 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                self.shared.set_renewed(Some(sent));
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if this replica still holds it: empty holder, duration 1 s (client-go's
    /// `ReleaseOnCancel`), so a standby takes it at its next retry. Called only after the
    /// controllers stopped.
    async fn release(&mut self) {
        self.shared.set_renewed(None);
        self.set_role(Role::Candidate);
        let current = match self.api.get_opt(&self.config.name).await {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "could not read the Lease to release it; it expires by itself");
                return;
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let mut next = current.clone();
        next.metadata.managed_fields = None;
        next.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(micro_now()),
            renew_time: Some(micro_now()),
            ..spec
        });
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => info!(lease = %self.config.name, "leader election: Lease released"),
            Err(e) => {
                warn!(error = %e, "could not release the Lease; it expires by itself")
            }
        }
    }

    fn jittered(&self) -> Duration {
        let f = rand::Rng::gen_range(&mut rand::thread_rng(), 1.0..JITTER);
        self.config.retry_period.mul_f64(f)
    }

    /// Campaigns until this replica leads, then renews until `stop` resolves (the Lease is then
    /// released; the caller must have stopped its controllers first) or leadership is lost.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Outcome {
        let mut stop = pin!(stop.fuse());
        let name = self.config.name.clone();
        // Campaign.
        loop {
            let attempt = tokio::select! {
                _ = &mut stop => return Outcome::Released,
                r = self.try_acquire_or_renew() => r,
            };
            match attempt {
                Ok(true) => break,
                Ok(false) => {
                    let holder = self
                        .observed
                        .as_ref()
                        .map(|o| o.holder.clone())
                        .unwrap_or_default();
                    if self.current_role() != Role::Standby {
                        info!(lease = %name, holder = %holder, "leader election: standing by");
                    }
                    self.set_role(Role::Standby);
                }
                Err(e) => {
                    warn!(lease = %name, error = %e, "leader election: cannot read the Lease")
                }
            }
            tokio::select! {
                _ = &mut stop => return Outcome::Released,
                _ = tokio::time::sleep(self.jittered()) => {}
            }
        }
        info!(lease = %name, identity = %self.config.identity, "leader election: acquired the Lease; leading");
        self.set_role(Role::Leader);
        // Renew.
        loop {
            tokio::select! {
                _ = &mut stop => {
                    self.release().await;
                    return Outcome::Released;
                }
                _ = tokio::time::sleep(self.config.retry_period) => {}
            }
            let Some(deadline) = self
                .shared
                .renewed()
                .map(|t| t + self.config.renew_deadline)
                .filter(|d| *d > Instant::now())
            else {
                return self.lost("the renew deadline passed");
            };
            let attempt = tokio::select! {
                // Stopping while a renewal is in flight: the renewal is dropped, then released.
                _ = &mut stop => {
                    self.release().await;
                    return Outcome::Released;
                }
                r = tokio::time::timeout_at(deadline.into(), self.try_acquire_or_renew()) => r,
            };
            match attempt {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => return self.lost("another replica holds the Lease"),
                Ok(Err(e)) => {
                    warn!(lease = %name, error = %e, "leader election: renewal failed; retrying")
                }
                Err(_) => return self.lost("the renew deadline passed"),
            }
        }
    }

    fn current_role(&self) -> Role {
        *self.role.borrow()
    }

    fn lost(&mut self, why: &str) -> Outcome {
        self.shared.set_renewed(None);
        self.set_role(Role::Candidate);
        warn!(lease = %self.config.name, reason = why, "leader election: leadership lost");
        Outcome::Lost
    }
}

// ---------------------------------------------------------------------------------------------
// The write fence.

/// A write refused because this replica does not hold the Lease.
#[derive(Debug, thiserror::Error)]
#[error(
    "not the leader: this replica does not hold the leader election Lease, so it does not write"
)]
pub struct NotLeading;

/// `client`, with every mutating request (not GET/HEAD) refused with [`NotLeading`] unless
/// `leader.is_leading()` at the moment it is sent. Reads and watches pass.
pub fn fenced(client: Client, leader: LeaderHandle) -> Client {
    let ns = client.default_namespace().to_string();
    Client::new(
        Fence {
            inner: client,
            leader,
        },
        ns,
    )
}

#[derive(Clone)]
struct Fence {
    inner: Client,
    leader: LeaderHandle,
}

impl tower::Service<http::Request<Body>> for Fence {
    type Response = http::Response<Body>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, kube::Error>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let read = matches!(*req.method(), http::Method::GET | http::Method::HEAD);
        if !read && !self.leader.is_leading() {
            warn!(method = %req.method(), path = req.uri().path(), "write refused: this replica does not hold the Lease");
            return futures::future::ready(Err(kube::Error::Service(Box::new(NotLeading)))).boxed();
        }
        let inner = self.inner.clone();
        async move { inner.send(req).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(lease: u64, renew: u64, retry: u64) -> LeaderElectionConfig {
        LeaderElectionConfig {
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
            ..LeaderElectionConfig::new("ns", "keyward", "me".into())
        }
    }

    #[test]
    fn settings_follow_client_go_rules() {
        assert!(config(15, 10, 2).validate().is_ok());
        assert!(config(6, 4, 1).validate().is_ok());
        assert!(config(10, 10, 2).validate().is_err(), "lease = renew");
        assert!(config(15, 2, 2).validate().is_err(), "renew <= 1.2 x retry");
        assert!(config(15, 10, 0).validate().is_err(), "retry 0");
        let mut c = config(15, 10, 2);
        c.lease_duration = Duration::from_millis(15_500);
        assert!(c.validate().is_err(), "fractional lease duration");
    }

    #[test]
    fn expiry_is_judged_by_the_observers_clock() {
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        let d = Duration::from_secs(15);
        // Free or ours: at once.
        assert!(may_acquire("", "me", t0, Some(15), d, t0));
        assert!(may_acquire("me", "me", t0, Some(15), d, t0));
        // Held by another: only a whole lease duration after this observer saw it change,
        // whatever its remote renewTime says.
        assert!(!may_acquire("other", "me", t0, Some(15), d, later(14)));
        assert!(may_acquire("other", "me", t0, Some(15), d, later(15)));
        // The holder's declared duration counts, ours only when it declared none.
        assert!(!may_acquire("other", "me", t0, Some(30), d, later(20)));
        assert!(may_acquire("other", "me", t0, None, d, later(15)));
        // A squatter's huge duration is honoured only up to twice ours (issue 18).
        assert!(!may_acquire(
            "squat",
            "me",
            t0,
            Some(i32::MAX),
            d,
            later(29)
        ));
        assert!(may_acquire("squat", "me", t0, Some(i32::MAX), d, later(30)));
        assert!(may_acquire("other", "me", t0, Some(30), d, later(30)));
    }

    #[tokio::test]
    async fn a_lost_handle_stops_leading_and_fences_writes() {
        let h = LeaderHandle::always_leading("me");
        assert!(h.is_leading());
        h.revoke_for_test();
        assert!(!h.is_leading());
        // `lost` resolves at once for a handle that no longer leads.
        tokio::time::timeout(Duration::from_secs(1), h.lost())
            .await
            .expect("lost() resolves");
        let (service, mut mock) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let client = fenced(Client::new(service, "default"), h);
        let api: Api<Lease> = Api::namespaced(client, "default");
        let err = api
            .create(&PostParams::default(), &Lease::default())
            .await
            .expect_err("a write is refused");
        assert!(err.to_string().contains("not the leader"), "{err}");
        // Nothing reached the API server.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), mock.next_request())
                .await
                .is_err()
        );
    }
}
