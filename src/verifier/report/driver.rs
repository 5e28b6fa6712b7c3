//! The reporter's driver, the only part of reporting with a client: every report interval it
//! drains the use log into the pure [`Reporting`] state, writes the due reports (their pages)
//! while the token bucket allows, and renews the replica's Lease.

use super::*;

/// The reporting flags.
#[derive(Clone, Debug)]
pub struct ReportConfig {
    /// `--replica-id`.
    pub replica: String,
    /// `--lease-namespace`.
    pub lease_namespace: String,
    /// The watched namespaces (empty: all), for the Lease annotation.
    pub namespaces: Vec<String>,
    pub interval: Duration,
    pub resolution: Duration,
    pub qps: f32,
    pub burst: u32,
}

/// Why reporting stopped the process.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Another process with the same `--replica-id` took the Lease over.
    #[error(
        "Lease {lease} is now held by {holder:?}, not this process ({me}): another process runs with the same --replica-id"
    )]
    LeaseLost {
        lease: String,
        holder: String,
        me: String,
    },
}

/// Report writes one replica keeps in flight at once.
const REPORT_WRITES_IN_FLIGHT: usize = 8;

/// A finished write of one key's report pages.
struct Written {
    key: KeyRef,
    /// Pages written.
    pages: u64,
    /// The page that failed and why.
    failed: Option<(String, String)>,
}

struct Reporter {
    client: Client,
    config: ReportConfig,
    shared: Arc<Shared>,
    log: Arc<MemoryUseLog>,
    state: Reporting,
    bucket: Bucket,
    holder: String,
    since: DateTime<Utc>,
    /// The last watermark written (never moves backwards); `None` until the Lease is ours.
    renewed: Option<DateTime<Utc>>,
    failed_writes: u64,
    writes: u64,
}

impl ReportError {
    /// PascalCase reason, for logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ReportError::LeaseLost { .. } => "VerifierLeaseLost",
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Reporter {
    /// Every pod use dropped so far, as metrics: by the use log (full between flushes: the use
    /// is kept, unattributed) and by the per-key-id bound here (`podsTruncated`).
    fn record_drops(&self) {
        let stats = &self.shared.stats;
        stats.pods_dropped(crate::verifier::stats::DROPPED_USE_LOG, self.log.dropped());
        stats.pods_dropped(
            crate::verifier::stats::DROPPED_REPORT_BOUND,
            self.state.pods_evicted(),
        );
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.config.lease_namespace)
    }

    fn lease_name(&self) -> String {
        usage::lease_name(&self.config.replica)
    }

    /// Drains the log and writes the dirty keys; returns the watermark.
    /// `start` is the flush's scheduled start, taken before any request of this tick: the
    /// per-key interval is judged between scheduled starts, so the latency of the Lease read
    /// before the flush never makes a key skip an interval.
    async fn flush(&mut self, last: bool, start: DateTime<Utc>) -> DateTime<Utc> {
        for used in self.log.drain(start) {
            self.state.absorb(used);
        }
        // Under one read of the index, with nothing collected for the keys that need no write
        // (a map of every key's target and trusted key ids cost megabytes a second at 10,000
        // keys). Keys the index no longer knows are forgotten: their reports go with the key.
        // Key ids their bundle no longer lists are forgotten once written and long unused (a
        // key whose bundle is not known right now keeps them all).
        let candidates = {
            let index = self.shared.index.read().unwrap_or_else(|e| e.into_inner());
            let target = |k: &KeyRef| {
                index
                    .report_target(k)
                    .map(|(uid, rotating)| Target { uid, rotating })
            };
            self.state.retain(|k| index.report_target(k).is_some());
            self.state
                .retain_kids_of_every_key(|k| index.trusted_kids(k), start);
            self.state.candidates(start, last, target)
        };
        // A flush spends at most 80 % of an interval waiting for tokens (the Lease is renewed
        // after it), so the steady rate is --report-qps, not just the burst per interval.
        let budget = add(start, self.config.interval.mul_f64(0.8));
        // Writes go out concurrently (at most REPORT_WRITES_IN_FLIGHT), still paced by the
        // token bucket: one replica's steady rate is --report-qps whatever the API server's
        // latency, where serial writes managed only 1/latency per second. Backpressure: a full
        // set of writes in flight waits for one to finish before the next token is spent.
        let mut inflight: tokio::task::JoinSet<Written> = tokio::task::JoinSet::new();
        for (key, target) in candidates {
            let pages = self.state.pages(&key);
            while inflight.len() >= REPORT_WRITES_IN_FLIGHT {
                if let Some(done) = inflight.join_next().await {
                    self.written(done, start);
                }
            }
            while let Some(done) = inflight.try_join_next() {
                self.written(done, start);
            }
            if !last {
                let now = Utc::now();
                let wait = self.bucket.wait(now);
                if add(now, wait) > budget {
                    debug!("report rate limit reached; the rest stays dirty");
                    break;
                }
                tokio::time::sleep(wait).await;
                let now = Utc::now();
                if !self.bucket.take(now) {
                    break;
                }
                let more = u32::try_from(pages.len().saturating_sub(1)).unwrap_or(u32::MAX);
                self.bucket.charge(now, more);
            }
            // Every page with the same seq; the key counts as written (and its pages are
            // listed) only once all are. A page that fails leaves the others at the new seq,
            // which is never below what the Lease lists, and the next flush writes them again.
            let seq = self.state.next_seq();
            let keys_truncated = self.state.keys_truncated(&key);
            let reports: Vec<KeyUsageReport> = pages
                .into_iter()
                .map(|page| {
                    report_object(
                        &self.config.replica,
                        &key,
                        &target.uid,
                        page,
                        seq,
                        keys_truncated,
                    )
                })
                .collect();
            let api: Api<KeyUsageReport> = Api::namespaced(self.client.clone(), &key.namespace);
            inflight.spawn(async move {
                let params = PatchParams::apply(usage::FIELD_MANAGER).force();
                let mut pages = 0;
                for report in &reports {
                    let name = report.metadata.name.clone().unwrap_or_default();
                    if let Err(e) = api.patch(&name, &params, &Patch::Apply(report)).await {
                        return Written {
                            key,
                            pages,
                            failed: Some((name, e.to_string())),
                        };
                    }
                    pages += 1;
                }
                Written {
                    key,
                    pages,
                    failed: None,
                }
            });
        }
        while let Some(done) = inflight.join_next().await {
            self.written(done, start);
        }
        self.record_drops();
        self.state.watermark(start)
    }

    /// Books a finished report write: its pages count as writes; a key counts as written (at
    /// `start`) only when all its pages are.
    fn written(&mut self, done: Result<Written, tokio::task::JoinError>, start: DateTime<Utc>) {
        let Ok(done) = done else {
            self.failed_writes += 1;
            warn!("a usage report write task failed; its key stays dirty");
            return;
        };
        self.writes += done.pages;
        match done.failed {
            None => {
                self.state.written(&done.key, start);
                debug!(key = %done.key, pages = done.pages, "usage report written");
            }
            Some((report, error)) => {
                self.failed_writes += 1;
                warn!(key = %done.key, report = %report, error = %error, failed_writes = self.failed_writes,
                      "usage report write failed; it stays dirty and holds the watermark back");
            }
        }
    }

    /// Creates or takes over the Lease for this incarnation (new window, new holder).
    async fn acquire(&mut self, watermark: DateTime<Utc>) -> Result<(), kube::Error> {
        let api = self.leases();
        let name = self.lease_name();
        let watermark = watermark.max(self.since);
        let existing = api.get_opt(&name).await?;
        // The previous incarnation's reports stay evidence: keep listing them.
        if let Some(previous) = existing.as_ref().and_then(|l| {
            l.metadata
                .annotations
                .as_ref()?
                .get(usage::ANN_REPORTS)
                .and_then(|j| serde_json::from_str::<BTreeMap<String, u64>>(j).ok())
        }) {
            self.state.carry_over(&previous, self.since);
        }
        let listing = self.state.listing(Utc::now());
        let (spec, mut annotations, labels) = desired_lease(
            &self.config,
            &self.holder,
            self.since,
            watermark,
            false,
            &listing,
        );
        heartbeat(&mut annotations, Utc::now(), self.state.dirty_keys().len());
        match existing {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(self.config.lease_namespace.clone()),
                        annotations: Some(annotations),
                        labels: Some(labels),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                api.create(&PostParams::default(), &lease).await?;
            }
            Some(mut lease) => {
                let previous = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.clone())
                    .unwrap_or_default();
                let mut ann = lease.metadata.annotations.take().unwrap_or_default();
                ann.remove(usage::ANN_STOPPED);
                ann.remove(usage::ANN_REPORTS_OVERFLOW);
                ann.extend(annotations);
                let mut lab = lease.metadata.labels.take().unwrap_or_default();
                lab.extend(labels);
                lease.metadata.annotations = Some(ann);
                lease.metadata.labels = Some(lab);
                lease.spec = Some(spec);
                api.replace(&name, &PostParams::default(), &lease).await?;
                info!(lease = %name, previous = %previous, "verifier Lease taken over by a new incarnation");
            }
        }
        self.renewed = Some(watermark);
        info!(lease = %format!("{}/{name}", self.config.lease_namespace), holder = %self.holder,
              since = %rfc3339(self.since), "verifier Lease acquired");
        Ok(())
    }

    /// Reads the Lease and checks it is still this incarnation's. `Ok(None)` when it cannot be
    /// read now (retried next interval); an error when another process holds it (or it is gone).
    async fn read_own(&self) -> Result<Option<Lease>, ReportError> {
        let name = self.lease_name();
        let lease = match self.leases().get_opt(&name).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Err(ReportError::LeaseLost {
                    lease: name,
                    holder: String::new(),
                    me: self.holder.clone(),
                });
            }
            Err(e) => {
                warn!(error = %e, "cannot read the verifier Lease; retrying next interval");
                return Ok(None);
            }
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        if holder != self.holder {
            return Err(ReportError::LeaseLost {
                lease: name,
                holder,
                me: self.holder.clone(),
            });
        }
        Ok(Some(lease))
    }

    /// Checks the Lease (before writing reports, so a process that lost it writes none), then
    /// flushes and renews the Lease with the watermark (never backwards), replacing the
    /// version read. Before the Lease is first written, tries to acquire it instead.
    async fn tick(
        &mut self,
        last: bool,
        stopping: bool,
        start: DateTime<Utc>,
    ) -> Result<bool, ReportError> {
        let lease = match self.renewed {
            Some(_) => self.read_own().await?,
            None => None,
        };
        let watermark = self.flush(last, start).await;
        let clean = self.state.dirty_keys().is_empty();
        let Some(previous) = self.renewed else {
            if let Err(e) = self.acquire(watermark).await {
                warn!(error = %e, "cannot write the verifier Lease yet; retrying next interval");
            }
            return Ok(false);
        };
        let Some(mut lease) = lease else {
            return Ok(false);
        };
        let watermark = watermark.max(previous);
        let stopped = stopping && clean;
        let listing = self.state.listing(start);
        let (spec, mut annotations, _) = desired_lease(
            &self.config,
            &self.holder,
            self.since,
            watermark,
            stopped,
            &listing,
        );
        // Renewed every interval even while reports lag: the heartbeat says the replica is
        // alive, the pending count how far behind; the watermark above stays the evidence.
        heartbeat(&mut annotations, Utc::now(), self.state.dirty_keys().len());
        let mut ann = lease.metadata.annotations.take().unwrap_or_default();
        ann.remove(usage::ANN_STOPPED);
        ann.remove(usage::ANN_REPORTS_OVERFLOW);
        ann.extend(annotations);
        lease.metadata.annotations = Some(ann);
        lease.spec = Some(spec);
        match self
            .leases()
            .replace(&self.lease_name(), &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.renewed = Some(watermark);
                debug!(watermark = %rfc3339(watermark), stopped, "verifier Lease renewed");
                Ok(stopped)
            }
            Err(e) if is_conflict(&e) => {
                warn!("verifier Lease changed while renewing; checking again next interval");
                Ok(false)
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the verifier Lease; retrying next interval");
                Ok(false)
            }
        }
    }

    async fn run(
        mut self,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ReportError> {
        if let Err(e) = self.acquire(self.since).await {
            warn!(error = %e, "cannot write the verifier Lease yet; serving and retrying every interval");
        }
        let mut next = add(Utc::now(), self.config.interval);
        loop {
            // Flush starts are at least an interval apart on the wall clock, which the
            // per-key bound is judged by.
            let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = tokio::time::sleep(wait + Duration::from_millis(1)) => {}
                _ = stop.changed() => break,
            }
            // The next start is an interval after this one's.
            let start = Utc::now();
            next = add(start, self.config.interval);
            self.tick(false, false, start).await?;
            debug!(
                keys = self.state.len(),
                writes = self.writes,
                failed_writes = self.failed_writes,
                dropped_uses = self.log.dropped(),
                pods_evicted = self.state.pods_evicted(),
                "report flush"
            );
        }
        // Shutdown: the server no longer accepts; a final flush ignoring the bucket, then the
        // Lease with watermark = now and `stopped` (only when everything is written).
        let last = tokio::time::timeout(SHUTDOWN_BUDGET, self.tick(true, true, Utc::now())).await;
        match last {
            Ok(Ok(true)) => info!(
                writes = self.writes,
                failed_writes = self.failed_writes,
                "final usage reports written; verifier Lease marked stopped"
            ),
            Ok(Ok(false)) => error!(
                failed_writes = self.failed_writes,
                "final usage reports or Lease not all written; the Lease is not marked stopped"
            ),
            Ok(Err(e)) => return Err(e),
            Err(_) => error!("final usage report flush timed out; the Lease is not marked stopped"),
        }
        Ok(())
    }
}

/// Runs the reporter until `stop` turns true (then flushes a last time and marks the Lease
/// stopped). Returns an error when the Lease was taken over by another process.
pub async fn run(
    client: Client,
    config: ReportConfig,
    shared: Arc<Shared>,
    log: Arc<MemoryUseLog>,
    since: DateTime<Utc>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ReportError> {
    let holder = format!("{}/{}", config.replica, uuid::Uuid::new_v4());
    info!(replica = %config.replica, holder = %holder, lease_namespace = %config.lease_namespace,
          interval = ?config.interval, resolution = ?config.resolution, qps = config.qps,
          burst = config.burst, "reporting key use");
    let reporter = Reporter {
        client,
        state: Reporting::new(config.interval, config.resolution),
        bucket: Bucket::new(config.qps, config.burst),
        config,
        shared,
        log,
        holder,
        since,
        renewed: None,
        failed_writes: 0,
        writes: 0,
    };
    reporter.run(stop).await
}
