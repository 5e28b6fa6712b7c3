//! The operator process composed: the controllers ([`crate::controller`]) run under leader
//! election ([`crate::leader`]). This module uses both; neither uses it, so the two stay
//! independent of each other's lifecycle.

use std::future::Future;
use std::time::Duration;

use futures::FutureExt;
use kube::Client;
use tracing::{info, warn};

use crate::leader::{Elector, LeaderElectionConfig, LeaderHandle, Role};

/// The process lost the Lease while leading (its controllers stopped): exit non-zero.
#[derive(Debug, thiserror::Error)]
#[error(
    "leadership lost: the controllers were stopped; exiting so the container restarts as a standby"
)]
pub struct LeadershipLost;

/// Runs the controllers only while this replica holds the Lease `election`:
/// stands by until it leads, then runs [`crate::controller::run`] until `shutdown` resolves or
/// leadership is lost. On `shutdown` the controllers are stopped and drained first, then the
/// Lease is released. On a loss the controllers are stopped at once (their writes are already
/// fenced) and [`LeadershipLost`] is returned.
pub async fn run(
    client: Client,
    config: crate::controller::OperatorConfig,
    writes: crate::controller::WriteCounter,
    obs: crate::controller::Observability,
    election: LeaderElectionConfig,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), LeadershipLost> {
    let (elector, handle) = Elector::new(client.clone(), election);
    run_elected(client, config, writes, obs, elector, handle, shutdown).await
}

/// As [`run`], with the elector made by the caller, who keeps a clone of its handle (for
/// `/readyz` and the `keyward_leader` metric, which must work while standing by).
pub async fn run_elected(
    client: Client,
    mut config: crate::controller::OperatorConfig,
    writes: crate::controller::WriteCounter,
    obs: crate::controller::Observability,
    elector: Elector,
    handle: LeaderHandle,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), LeadershipLost> {
    let readiness = tokio::spawn(mirror_role(handle.clone(), obs.health.clone()));
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let election_task = tokio::spawn(elector.run(async move {
        let _ = release_rx.await;
    }));
    let shutdown = Box::pin(shutdown).shared();
    info!(identity = %handle.identity(), "leader election: waiting for the Lease");
    tokio::select! {
        _ = shutdown.clone() => {
            let _ = release_tx.send(());
            let _ = election_task.await;
            readiness.abort();
            return Ok(());
        }
        _ = handle.leading() => {}
    }
    config.leader = Some(handle.clone());
    let lost = {
        let h = handle.clone();
        async move { h.lost().await }
    }
    .shared();
    let stop = {
        let (shutdown, lost) = (shutdown.clone(), lost.clone());
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = lost => {}
            }
        }
    };
    crate::controller::run(client, config, writes.clone(), obs, stop).await;
    readiness.abort();
    let non_lease_writes = |w: &crate::controller::WriteCounter| {
        w.snapshot()
            .iter()
            .filter(|(k, _)| k.is_write() && k.resource != "leases")
            .map(|(_, n)| *n)
            .sum::<u64>()
    };
    if handle.is_leading() && shutdown.peek().is_some() {
        let _ = release_tx.send(());
        let _ = election_task.await;
        info!(
            writes = non_lease_writes(&writes),
            "controllers stopped, then the Lease released"
        );
        Ok(())
    } else {
        election_task.abort();
        warn!(
            writes = non_lease_writes(&writes),
            "controllers stopped after leadership was lost"
        );
        Err(LeadershipLost)
    }
}

/// Keeps `/readyz` in step with the election: the leader is ready once its caches synced
/// (`controller::run` says so), a standby only while it has read the Lease within the lease
/// duration (it could take over), anything else is not ready.
async fn mirror_role(handle: LeaderHandle, health: crate::http::Health) {
    use crate::http::Role as Ready;
    let lease_duration = handle.lease_duration();
    loop {
        let fresh = handle
            .last_lease_read()
            .is_some_and(|t| t.elapsed() < lease_duration);
        health.set_role(match handle.current_role() {
            Role::Leader => Ready::Leader,
            Role::Standby if fresh => Ready::Standby,
            Role::Standby | Role::Candidate => Ready::Electing,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
