//! Leader election and the resourceVersion preconditions of irreversible writes, against the
//! real local control plane (`e2e/cluster.sh up`). The whole-operator scenarios (two processes,
//! SIGSTOP/SIGCONT, SIGKILL, SIGTERM) are in `e2e/ha.rs`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::TestNamespace;
use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use keyward::controller::provisioning_key::{transition_key_secret, write_bundle};
use keyward::labels as l;
use keyward::leader::{Elector, LeaderElectionConfig, Outcome, Role};
use keyward::rotation::KeyState;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;

fn is_conflict<T: std::fmt::Debug>(res: &Result<T, keyward::controller::Error>) -> bool {
    matches!(
        res,
        Err(keyward::controller::Error::Kube(kube::Error::Api(e))) if e.code == 409
    )
}

/// A revocation decided on a key Secret as it was before someone else (a new leader) changed
/// it is refused with 409 and changes nothing: the private key stays, the state stays. The same
/// for removing a key id from the trust bundle (server-side apply with the bundle's
/// resourceVersion) and for pruning (delete with a resourceVersion precondition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_revocation_writes_get_409_and_revoke_nothing() {
    let ns = TestNamespace::new("leader-rv").await;
    let secrets: Api<Secret> = ns.api();
    let cms: Api<ConfigMap> = ns.api();
    let name = "pk-k1";
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                l::KEY_STATE.to_string(),
                "retiring".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            l::DATA_PRIVATE_KEY.to_string(),
            ByteString(b"not a real key".to_vec()),
        )])),
        ..Default::default()
    };
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create the key Secret");
    let stale = created.resource_version().expect("a resourceVersion");
    // The new leader touches it meanwhile (any write moves the resourceVersion on).
    secrets
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": { "annotations": { "new-leader": "was-here" } } })),
        )
        .await
        .expect("the other writer's patch");

    let res = transition_key_secret(
        &secrets,
        "pk",
        1,
        &stale,
        KeyState::Destroyed,
        &[(l::REVOKED_AT, "2025-01-01T00:00:00Z".to_string())],
        true,
    )
    .await;
    assert!(is_conflict(&res), "expected 409, got {res:?}");
    let now = secrets.get(name).await.expect("read back");
    assert_eq!(
        now.labels().get(l::KEY_STATE).map(String::as_str),
        Some("retiring")
    );
    assert!(
        now.data
            .as_ref()
            .is_some_and(|d| d.contains_key(l::DATA_PRIVATE_KEY)),
        "the private key was deleted by a stale revocation"
    );
    assert!(!now.annotations().contains_key(l::REVOKED_AT));

    // Without a resourceVersion nothing is written at all (never an unconditional revocation).
    let res = transition_key_secret(&secrets, "pk", 1, "", KeyState::Destroyed, &[], true).await;
    assert!(res.is_err(), "a revocation without a precondition was sent");

    // The fresh resourceVersion goes through (the precondition is what refused the stale one).
    let fresh = now.resource_version().expect("a resourceVersion");
    let revoked = transition_key_secret(&secrets, "pk", 1, &fresh, KeyState::Destroyed, &[], true)
        .await
        .expect("a revocation on fresh evidence");
    assert_eq!(
        revoked.labels().get(l::KEY_STATE).map(String::as_str),
        Some("destroyed")
    );

    // Pruning on a stale resourceVersion: 409, the Secret stays.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: Some(fresh),
            uid: None,
        }),
        ..Default::default()
    };
    let res = secrets.delete(name, &dp).await;
    assert!(
        matches!(&res, Err(kube::Error::Api(e)) if e.code == 409),
        "{res:?}"
    );
    assert!(secrets.get_opt(name).await.expect("read").is_some());

    // The trust bundle: a key id is removed only from the bundle as it was read.
    let bundle = |kids: &[&str]| ConfigMap {
        metadata: ObjectMeta {
            name: Some("pk-trust".into()),
            namespace: Some(ns.name().to_string()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            l::DATA_JWKS.to_string(),
            serde_json::to_string(kids).unwrap(),
        )])),
        ..Default::default()
    };
    let first = write_bundle(&cms, bundle(&["k1", "k2"]), None)
        .await
        .expect("create the bundle");
    // A bundle that appeared meanwhile is not overwritten by a create.
    let res = write_bundle(&cms, bundle(&["k9"]), None).await;
    assert!(is_conflict(&res), "{res:?}");
    let stale = first.resource_version().expect("a resourceVersion");
    // The new leader publishes k3.
    write_bundle(&cms, bundle(&["k1", "k2", "k3"]), Some(&stale))
        .await
        .expect("the new leader's write");
    // The paused ex-leader wakes and removes k1 on its stale read: refused.
    let res = write_bundle(&cms, bundle(&["k2"]), Some(&stale)).await;
    assert!(is_conflict(&res), "{res:?}");
    let now = cms.get("pk-trust").await.expect("read back");
    assert_eq!(
        now.data.unwrap_or_default().get(l::DATA_JWKS).cloned(),
        Some(serde_json::to_string(&["k1", "k2", "k3"]).unwrap())
    );
    ns.cleanup().await;
}

fn election(ns: &str, id: &str) -> LeaderElectionConfig {
    LeaderElectionConfig {
        lease_duration: Duration::from_secs(4),
        renew_deadline: Duration::from_secs(3),
        retry_period: Duration::from_millis(500),
        ..LeaderElectionConfig::new(ns, "keyward", id.to_string())
    }
}

/// Two electors: one leads, the other stands by. When the leader stops renewing without
/// releasing (it died, or it is paused), the standby waits a whole lease duration from when
/// it last saw the Lease change, then takes over; when a leader releases, the standby takes
/// over at its next retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_expiry_and_at_once_after_release() {
    let ns = TestNamespace::new("leader-lease").await;
    let client = ns.client();
    let leases: Api<Lease> = ns.api();
    let holder = || async {
        leases
            .get_opt("keyward")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };

    let (a, a_handle) = Elector::new(client.clone(), election(ns.name(), "a"));
    let (a_stop, a_stopped) = tokio::sync::oneshot::channel::<()>();
    let a_task = tokio::spawn(a.run(async move {
        let _ = a_stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(5), a_handle.leading())
        .await
        .expect("a leads");
    assert!(a_handle.is_leading());

    let (b, b_handle) = Elector::new(client.clone(), election(ns.name(), "b"));
    let (b_stop, b_stopped) = tokio::sync::oneshot::channel::<()>();
    let b_task = tokio::spawn(b.run(async move {
        let _ = b_stopped.await;
    }));
    let mut b_role = b_handle.role();
    tokio::time::timeout(
        Duration::from_secs(5),
        b_role.wait_for(|r| *r == Role::Standby),
    )
    .await
    .expect("b stands by")
    .expect("b's role");
    assert!(!b_handle.is_leading());
    assert_eq!(holder().await, "a");

    // A dies without releasing: its task is aborted (no more renewals).
    a_task.abort();
    let died = Instant::now();
    drop(a_stop);
    tokio::time::timeout(Duration::from_secs(10), b_handle.leading())
        .await
        .expect("b takes over");
    let took = died.elapsed();
    assert_eq!(holder().await, "b");
    // Not before a whole lease duration (less the retry period A may have renewed in before
    // dying), and not much after: one retry period plus jitter.
    assert!(
        took >= Duration::from_millis(3400) && took < Duration::from_secs(6),
        "b took over {took:?} after a died (lease 4 s, retry 0.5 s)"
    );
    // A's handle stopped leading by itself, on its own clock.
    assert!(!a_handle.is_leading());

    // A third elector stands by; b releases: c takes over at its next retry.
    let (c, c_handle) = Elector::new(client.clone(), election(ns.name(), "c"));
    let c_task = tokio::spawn(c.run(futures::future::pending::<()>()));
    let mut c_role = c_handle.role();
    tokio::time::timeout(
        Duration::from_secs(5),
        c_role.wait_for(|r| *r == Role::Standby),
    )
    .await
    .expect("c stands by")
    .expect("c's role");
    let released = Instant::now();
    let _ = b_stop.send(());
    assert_eq!(b_task.await.expect("b's task"), Outcome::Released);
    tokio::time::timeout(Duration::from_secs(5), c_handle.leading())
        .await
        .expect("c takes over");
    assert!(
        released.elapsed() < Duration::from_millis(1500),
        "c took {:?} after b released (retry 0.5 s)",
        released.elapsed()
    );
    c_task.abort();
    ns.cleanup().await;
}

/// `Elector::run` releases the Lease when told to stop while leading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_releases_the_lease() {
    let ns = TestNamespace::new("leader-release").await;
    let leases: Api<Lease> = ns.api();
    let (a, a_handle) = Elector::new(ns.client(), election(ns.name(), "a"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(a.run(async move {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(5), a_handle.leading())
        .await
        .expect("a leads");
    let _ = stop.send(());
    let outcome = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("a stops")
        .expect("a's task");
    assert_eq!(outcome, Outcome::Released);
    assert!(!a_handle.is_leading());
    let spec = leases
        .get("keyward")
        .await
        .expect("Lease")
        .spec
        .unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some(""));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    ns.cleanup().await;
}
