//! `rotation.revokeWhenUnusedFor` against a real API server: the operator revokes an old key
//! only on the verifier replicas' word (their Leases and KeyUsageReports, written here as a
//! verifier replica would, see `keyward::usage`), and holds it, visibly, while they are silent
//! or while something still uses it. The verifier process itself is tested in tests/plane/verifier.rs
//! and, with real OPA agents and nginx, in e2e/.

use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use keyward::api::ProvisioningKey;
use keyward::api::key_usage::{KeyUsageReport, KeyUsageReportSpec, KidUsage};
use keyward::controller::WriteCounter;
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward::usage;
use kube::Api;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

const WINDOW_SECS: i64 = 8;

fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(usage::chrono_to_jiff(t).expect("time"))
}

/// A stand-in verifier replica: its Lease, renewed every second (the watermark follows the
/// clock), and its report for one key, written on demand.
struct Replica {
    leases: Api<Lease>,
    name: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(ns: &str, replica: &str, since: DateTime<Utc>) -> Self {
        let leases: Api<Lease> =
            Api::namespaced(kube::Client::try_default().await.expect("client"), ns);
        let name = usage::lease_name(replica);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(
                    [
                        (
                            l::COMPONENT.to_string(),
                            usage::COMPONENT_VERIFIER.to_string(),
                        ),
                        (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (usage::ANN_NAMESPACES.to_string(), "*".to_string()),
                        (usage::ANN_RESOLUTION.to_string(), "1s".to_string()),
                        (usage::ANN_REPORTS.to_string(), "{}".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(format!("{replica}/test")),
                acquire_time: Some(micro(since)),
                renew_time: Some(micro(Utc::now())),
                lease_duration_seconds: Some(3),
                ..Default::default()
            }),
        };
        leases
            .create(&PostParams::default(), &lease)
            .await
            .expect("create the replica's Lease");
        let (api, n) = (leases.clone(), name.clone());
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let body = json!({ "spec": { "renewTime": micro(Utc::now()) } });
                let _ = api
                    .patch(&n, &PatchParams::default(), &Patch::Merge(&body))
                    .await;
            }
        });
        Replica {
            leases,
            name,
            renew,
        }
    }

    /// Lists, in the Lease, this replica's report of `pk` in `ns` at write `seq` (as a replica
    /// does at the renewal after the write).
    async fn list(&self, ns: &str, pk: &str, seq: u64) {
        let reports = usage::reports_annotation(&[(usage::report_key(ns, pk), seq)].into());
        let body = json!({ "metadata": { "annotations": { usage::ANN_REPORTS: reports } } });
        self.leases
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .expect("list the report in the Lease");
    }

    /// Stops renewing: the replica goes silent (its watermark stops).
    fn silence(&self) {
        self.renew.abort();
    }

    async fn delete(self) {
        self.renew.abort();
        let _ = self.leases.delete(&self.name, &Default::default()).await;
    }
}

/// Writes replica `replica`'s report for key `pk`: `kid` last used at `at`.
async fn report(ns: &TestNamespace, pk: &str, replica: &str, kid: &str, at: DateTime<Utc>) {
    numbered_report(ns, pk, replica, kid, at, None).await;
}

/// [`report`], as write number `seq` (annotation `keyward.dev/report-seq`).
async fn numbered_report(
    ns: &TestNamespace,
    pk: &str,
    replica: &str,
    kid: &str,
    at: DateTime<Utc>,
    seq: Option<u64>,
) {
    let reports: Api<KeyUsageReport> = ns.api();
    let name = usage::report_name(pk, replica);
    let mut r = KeyUsageReport::new(
        &name,
        KeyUsageReportSpec {
            provisioning_key: pk.into(),
            replica: replica.into(),
            page: 1,
            pages: 1,
            keys: vec![KidUsage {
                kid: kid.into(),
                last_used_at: at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                pods: Vec::new(),
                pods_truncated: false,
            }],
        },
    );
    r.metadata.labels = Some(
        [
            (l::MANAGED_BY.to_string(), l::MANAGED_BY_VALUE.to_string()),
            (l::PROVISIONING_KEY.to_string(), pk.to_string()),
            (usage::REPLICA_LABEL.to_string(), replica.to_string()),
        ]
        .into(),
    );
    if let Some(seq) = seq {
        r.metadata.annotations =
            Some([(usage::ANN_REPORT_SEQ.to_string(), seq.to_string())].into());
    }
    reports
        .patch(
            &name,
            &PatchParams::apply(usage::FIELD_MANAGER).force(),
            &Patch::Apply(&r),
        )
        .await
        .expect("write the usage report");
}

fn retiring_last_used(pk: &ProvisioningKey) -> Option<String> {
    pk.status
        .as_ref()?
        .trusted_keys
        .iter()
        .find(|k| k.state == "Retiring")?
        .last_used_at
        .clone()
}

fn rotating_reason(pk: &ProvisioningKey) -> Option<String> {
    condition(pk, "Rotating")
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone())
}

fn stalled_reason(pk: &ProvisioningKey) -> Option<String> {
    condition(pk, "Stalled")
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone())
}

/// The old key outlives every hold: no replica (VerifierSilent, an Event); a replica that sees
/// it used (OldKeyInUse, lastUsedAt in status); a replica gone silent (VerifierSilent again);
/// and it is revoked only once a live replica has vouched for a whole quiet window, never
/// earlier than the window after its last reported use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_key_is_revoked_only_on_the_verifiers_word() {
    let ns = TestNamespace::new("kw-usage").await;
    let op = Operator::start_configured(
        ns.name(),
        Floors::none(),
        WriteCounter::default(),
        keyward::controller::Observability::new(&WriteCounter::default()),
        |c| c.verifier_namespace = Some(ns.name().to_string()),
    )
    .await;
    let pks: Api<ProvisioningKey> = ns.api();
    let spec = json!({ "rotation": {
        "publishDelay": "1s", "overlap": "1s", "minInterval": "0s",
        "revokeWhenUnusedFor": format!("{WINDOW_SECS}s"),
    }});
    create_pk(&pks, "pk", json!({}), spec).await;
    let first = wait_pk(&pks, "pk", "settled on the first key", is_settled).await;
    let old = first
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.kid.clone())
        .expect("a current key");

    // 1. No verifier replica at all: held, Stalled VerifierSilent, with an Event.
    merge(
        &pks,
        "pk",
        json!({ "metadata": { "annotations": { l::ROTATE: "1" } } }),
    )
    .await;
    let pk = wait_pk(&pks, "pk", "held: no verifier replica", |pk| {
        stalled_reason(pk).as_deref() == Some("VerifierSilent")
    })
    .await;
    let message = condition(&pk, "Stalled")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains(&old) && message.contains("no keyward verifier replica"),
        "{message}"
    );
    // The Event is recorded right after the status that shows the stall: wait for it, then
    // make sure it stays one.
    let events: Api<Event> = ns.api();
    let silent = || async {
        events
            .list(&ListParams::default())
            .await
            .expect("list Events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("VerifierSilent"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while silent().await == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(silent().await, 1, "one VerifierSilent Event");

    // 2. A replica that started long ago sees the old key used now: held, OldKeyInUse, and
    //    status shows when it was last used.
    let replica = Replica::start(ns.name(), "v-0", Utc::now() - chrono::Duration::hours(1)).await;
    report(&ns, "pk", "v-0", &old, Utc::now()).await;
    let pk = wait_pk(&pks, "pk", "held: old key in use", |pk| {
        rotating_reason(pk).as_deref() == Some("OldKeyInUse")
            && stalled_reason(pk).is_none()
            && retiring_last_used(pk).is_some()
    })
    .await;
    assert!(condition(&pk, "Rotating").is_some_and(|c| c.message.contains("last used at")));

    // 3. The replica goes silent (its Lease stops advancing): held again, VerifierSilent,
    //    naming the replica, even though nothing reported a use since.
    // Reported to the second, as the report holds it.
    let last_use = DateTime::from_timestamp(Utc::now().timestamp(), 0).expect("time");
    report(&ns, "pk", "v-0", &old, last_use).await;
    replica.silence();
    let pk = wait_pk(&pks, "pk", "held: the replica went silent", |pk| {
        stalled_reason(pk).as_deref() == Some("VerifierSilent")
    })
    .await;
    let message = condition(&pk, "Stalled")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("v-0"), "{message}");
    assert!(
        pk.status
            .as_ref()
            .is_some_and(|s| s.trusted_keys.iter().any(|k| k.kid == old))
    );

    // 4. A live replica again (same id, a new incarnation that started now): the window starts
    //    at its start, so the old key is revoked WINDOW after it, and never before the window
    //    after the last reported use.
    replica.delete().await;
    let restarted = Utc::now();
    let replica = Replica::start(ns.name(), "v-0", restarted).await;
    let done = wait_obj(
        &pks,
        "pk",
        "old key revoked",
        Duration::from_secs(60),
        |pk| {
            pk.status
                .as_ref()
                .is_some_and(|s| s.revoked_keys.iter().any(|k| k.kid == old))
        },
    )
    .await;
    let revoked_at = done
        .status
        .as_ref()
        .and_then(|s| s.revoked_keys.iter().find(|k| k.kid == old))
        .and_then(|k| k.revoked_at.as_deref())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .expect("revokedAt");
    let window = chrono::Duration::seconds(WINDOW_SECS);
    assert!(
        revoked_at >= restarted + window - chrono::Duration::seconds(1),
        "revoked at {revoked_at}, but the replica only vouched since {restarted}"
    );
    assert!(
        revoked_at >= last_use + window,
        "revoked at {revoked_at}, within {WINDOW_SECS}s of the last use at {last_use}"
    );
    let revocations = events
        .list(&ListParams::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("KeyRevoked"))
        .filter_map(|e| e.note)
        .collect::<Vec<_>>();
    assert!(
        revocations
            .iter()
            .any(|n| n.contains("unused for") && n.contains("v-0")),
        "the revocation's audit names the control plane's word: {revocations:?}"
    );
    replica.delete().await;
    op.stop().await;
    ns.cleanup().await;
}

fn revoked(pk: &ProvisioningKey, kid: &str) -> bool {
    pk.status
        .as_ref()
        .is_some_and(|s| s.revoked_keys.iter().any(|k| k.kid == kid))
}

/// A ProvisioningKey with `revokeWhenUnusedFor`, settled, then rotated: its old key id.
async fn rotated(pks: &Api<ProvisioningKey>) -> String {
    let spec = json!({ "rotation": {
        "publishDelay": "1s", "overlap": "1s", "minInterval": "0s",
        "revokeWhenUnusedFor": format!("{WINDOW_SECS}s"),
    }});
    create_pk(pks, "pk", json!({}), spec).await;
    let first = wait_pk(pks, "pk", "settled on the first key", is_settled).await;
    let old = first
        .status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|k| k.kid.clone())
        .expect("a current key");
    merge(
        pks,
        "pk",
        json!({ "metadata": { "annotations": { l::ROTATE: "1" } } }),
    )
    .await;
    old
}

fn operator_for(ns: &TestNamespace) -> impl std::future::Future<Output = Operator> + '_ {
    operator_expecting(ns, &[])
}

/// The operator, started with `--verifier-replicas` = `replicas`.
fn operator_expecting<'a>(
    ns: &'a TestNamespace,
    replicas: &[&str],
) -> impl std::future::Future<Output = Operator> + 'a {
    let replicas: Vec<String> = replicas.iter().map(|r| r.to_string()).collect();
    Operator::start_configured(
        ns.name(),
        Floors::none(),
        WriteCounter::default(),
        keyward::controller::Observability::new(&WriteCounter::default()),
        move |c| {
            c.verifier_namespace = Some(ns.name().to_string());
            c.verifier_replicas = replicas;
        },
    )
}

/// Issue 18, finding 4: a report the replica's Lease lists, deleted while the operator is down,
/// is not evidence of silence after the restart: the old key counts as used now and stays
/// trusted for far longer than the window. Once the replica writes the report again (a newer
/// write, listed), the key is revoked on its word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_report_is_never_evidence_of_silence_even_across_a_restart() {
    let ns = TestNamespace::new("kw-usage-del").await;
    let op = operator_for(&ns).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let replica = Replica::start(ns.name(), "v-0", Utc::now() - chrono::Duration::hours(1)).await;
    let old = rotated(&pks).await;
    // The replica sees the old key used now: report write 1, then listed in its Lease.
    numbered_report(&ns, "pk", "v-0", &old, Utc::now(), Some(1)).await;
    replica.list(ns.name(), "pk", 1).await;
    wait_pk(&pks, "pk", "held: old key in use", |pk| {
        rotating_reason(pk).as_deref() == Some("OldKeyInUse")
            && condition(pk, "Rotating").is_some_and(|c| c.message.contains("last used at"))
    })
    .await;

    // The operator stops; the report is deleted; the operator starts again.
    op.stop().await;
    let reports: Api<KeyUsageReport> = ns.api();
    reports
        .delete(&usage::report_name("pk", "v-0"), &Default::default())
        .await
        .expect("delete the report");
    let deleted = Utc::now();
    let op = operator_for(&ns).await;
    let pk = wait_pk(&pks, "pk", "held: the listed report is missing", |pk| {
        rotating_reason(pk).as_deref() == Some("OldKeyInUse")
            && condition(pk, "Rotating").is_some_and(|c| c.message.contains("missing"))
    })
    .await;
    assert!(!revoked(&pk, &old));
    // Without the list, the last use would be gone and the key revoked a window after the
    // replica's start (long past): wait two windows and more.
    expect_never(
        &pks,
        "pk",
        "the old key revoked although its report was deleted",
        Duration::from_secs(u64::try_from(2 * WINDOW_SECS + 4).expect("small")),
        |pk: Option<&ProvisioningKey>| pk.is_some_and(|pk| revoked(pk, &old)),
    )
    .await;

    // The replica writes the report again (write 2, then listed): revoked on its word, no
    // earlier than a window after the deletion was last judged.
    numbered_report(
        &ns,
        "pk",
        "v-0",
        &old,
        deleted - chrono::Duration::hours(1),
        Some(2),
    )
    .await;
    replica.list(ns.name(), "pk", 2).await;
    wait_obj(
        &pks,
        "pk",
        "old key revoked once the report is back",
        Duration::from_secs(60),
        |pk| revoked(pk, &old),
    )
    .await;
    replica.delete().await;
    op.stop().await;
    ns.cleanup().await;
}

/// Issue 18, finding 4 (the measured attack): the serving replica v-0 saw the old key used; its
/// report and its Lease are deleted, and the other replica v-1 saw nothing. With
/// `--verifier-replicas v-0,v-1` the missing Lease holds the key (`VerifierSilent`, naming
/// v-0) instead of leaving v-1 to vouch alone; a new v-0 incarnation then vouches for a whole
/// window before the key goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_of_an_expected_replica_holds_the_old_key() {
    let ns = TestNamespace::new("kw-usage-lease").await;
    let op = operator_expecting(&ns, &["v-0", "v-1"]).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let long_ago = Utc::now() - chrono::Duration::hours(1);
    let serving = Replica::start(ns.name(), "v-0", long_ago).await;
    let quiet = Replica::start(ns.name(), "v-1", long_ago).await;
    let old = rotated(&pks).await;
    numbered_report(&ns, "pk", "v-0", &old, Utc::now(), Some(1)).await;
    serving.list(ns.name(), "pk", 1).await;
    wait_pk(&pks, "pk", "held: old key in use", |pk| {
        rotating_reason(pk).as_deref() == Some("OldKeyInUse")
    })
    .await;

    let reports: Api<KeyUsageReport> = ns.api();
    reports
        .delete(&usage::report_name("pk", "v-0"), &Default::default())
        .await
        .expect("delete the report");
    serving.delete().await;
    let pk = wait_pk(&pks, "pk", "held: an expected replica has no Lease", |pk| {
        stalled_reason(pk).as_deref() == Some("VerifierSilent")
    })
    .await;
    let message = condition(&pk, "Stalled")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("without a Lease") && message.contains("v-0"),
        "{message}"
    );
    expect_never(
        &pks,
        "pk",
        "the old key revoked on the word of the replica that saw nothing",
        Duration::from_secs(u64::try_from(2 * WINDOW_SECS + 4).expect("small")),
        |pk: Option<&ProvisioningKey>| pk.is_some_and(|pk| revoked(pk, &old)),
    )
    .await;

    // v-0 comes back (a new incarnation, its window starting now): revoked a window later.
    let restarted = Utc::now();
    let serving = Replica::start(ns.name(), "v-0", restarted).await;
    let done = wait_obj(
        &pks,
        "pk",
        "old key revoked once v-0 vouches again",
        Duration::from_secs(60),
        |pk| revoked(pk, &old),
    )
    .await;
    let revoked_at = done
        .status
        .as_ref()
        .and_then(|s| s.revoked_keys.iter().find(|k| k.kid == old))
        .and_then(|k| k.revoked_at.as_deref())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .expect("revokedAt");
    assert!(
        revoked_at >= restarted + chrono::Duration::seconds(WINDOW_SECS - 1),
        "revoked at {revoked_at}, v-0 vouched only since {restarted}"
    );
    serving.delete().await;
    quiet.delete().await;
    op.stop().await;
    ns.cleanup().await;
}

// ---- Issue 18, finding 4: each verifier pod writes only its own evidence. ----

/// A client acting as the ServiceAccount `sa` of `ns` from pod `pod` (impersonation with the
/// extra a pod-bound token carries), or from no pod at all.
async fn client_as_pod(ns: &str, sa: &str, pod: Option<&str>) -> kube::Client {
    let mut cfg = kube_config().await;
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{sa}"));
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    cfg.auth_info.impersonate_user_extra = pod.map(|p| {
        [(
            "authentication.kubernetes.io/pod-name".to_string(),
            vec![p.to_string()],
        )]
        .into()
    });
    kube::Client::try_from(cfg).expect("client")
}

fn test_lease(name: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("x".into()),
            ..Default::default()
        }),
    }
}

fn test_report(name: &str, label: &str, replica: &str) -> KeyUsageReport {
    let mut r = KeyUsageReport::new(
        name,
        KeyUsageReportSpec {
            provisioning_key: "pk".into(),
            replica: replica.into(),
            page: 1,
            pages: 1,
            keys: Vec::new(),
        },
    );
    r.metadata.labels = Some([(usage::REPLICA_LABEL.to_string(), label.to_string())].into());
    r
}

fn forbidden<T: std::fmt::Debug>(what: &str, res: Result<T, kube::Error>) {
    match res {
        // Refused by the policy (its message), not by RBAC or validation.
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("keyward verifier") => {}
        other => panic!("{what}: expected the policy's refusal, got {other:?}"),
    }
}

/// The chart's ValidatingAdmissionPolicy (`keyward::usage::write_policy`), installed for a
/// test ServiceAccount: as pod v-0 it writes its own Lease and report, and nothing of v-1's,
/// nor a Lease of another name (the operator's leader Lease), nor anything without a pod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_pod_writes_only_its_own_reports_and_lease() {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use keyward::usage::write_policy;

    let ns = TestNamespace::new("kw-usage-vap").await;
    let user = format!("system:serviceaccount:{}:verifier", ns.name());
    let admin = kube::Client::try_from(kube_config().await).expect("client");
    let roles: Api<Role> = ns.api();
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "verifier"},
                "rules": [
                    {"apiGroups": ["keyward.dev"], "resources": ["keyusagereports"],
                     "verbs": ["get", "create", "update", "patch", "delete"]},
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                     "verbs": ["get", "create", "update", "patch", "delete"]},
                ],
            }))
            .expect("role"),
        )
        .await
        .expect("create the role");
    let bindings: Api<RoleBinding> = ns.api();
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "verifier"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "verifier"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }))
            .expect("binding"),
        )
        .await
        .expect("create the binding");
    let name = format!("keyward-verifier-writes-{}", ns.name());
    install_admission_policy(write_policy::policy_objects(&name, &user)).await;

    let v0 = client_as_pod(ns.name(), "verifier", Some("v-0")).await;
    let v0_leases: Api<Lease> = Api::namespaced(v0.clone(), ns.name());
    let v0_reports: Api<KeyUsageReport> = Api::namespaced(v0.clone(), ns.name());
    // The policy takes effect once the API server has loaded it: wait for the first refusal.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match v0_leases
            .create(&PostParams::default(), &test_lease("keyward-verifier-v-1"))
            .await
        {
            Err(kube::Error::Api(s)) if s.code == 403 => break,
            Ok(_) => {
                let _ = Api::<Lease>::namespaced(admin.clone(), ns.name())
                    .delete("keyward-verifier-v-1", &Default::default())
                    .await;
            }
            Err(e) => panic!("creating a Lease: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Its own Lease and report: allowed (create, update, server-side apply, delete).
    v0_leases
        .create(&PostParams::default(), &test_lease("keyward-verifier-v-0"))
        .await
        .expect("v-0 creates its own Lease");
    let mut own = v0_leases.get("keyward-verifier-v-0").await.expect("get");
    own.spec
        .get_or_insert_with(Default::default)
        .holder_identity = Some("y".into());
    v0_leases
        .replace("keyward-verifier-v-0", &PostParams::default(), &own)
        .await
        .expect("v-0 renews its own Lease");
    let apply = PatchParams::apply(usage::FIELD_MANAGER).force();
    v0_reports
        .patch(
            "pk.v-0",
            &apply,
            &Patch::Apply(&test_report("pk.v-0", "v-0", "v-0")),
        )
        .await
        .expect("v-0 writes its own report");

    // Another replica's Lease, another name (the operator's leader Lease): refused.
    forbidden(
        "v-0 creates v-1's Lease",
        v0_leases
            .create(&PostParams::default(), &test_lease("keyward-verifier-v-1"))
            .await,
    );
    forbidden(
        "v-0 creates the leader Lease",
        v0_leases
            .create(&PostParams::default(), &test_lease("keyward"))
            .await,
    );
    // Another replica's report (by label or by spec.replica), or relabelling its own: refused.
    forbidden(
        "v-0 writes v-1's report",
        v0_reports
            .patch(
                "pk.v-1",
                &apply,
                &Patch::Apply(&test_report("pk.v-1", "v-1", "v-1")),
            )
            .await,
    );
    forbidden(
        "v-0 writes a report in v-1's name",
        v0_reports
            .patch(
                "pk.x",
                &apply,
                &Patch::Apply(&test_report("pk.x", "v-0", "v-1")),
            )
            .await,
    );
    // v-1's report and Lease, written by their owner (here the admin): v-0 may not change or
    // delete them.
    let admin_reports: Api<KeyUsageReport> = Api::namespaced(admin.clone(), ns.name());
    admin_reports
        .patch(
            "pk.v-1",
            &apply,
            &Patch::Apply(&test_report("pk.v-1", "v-1", "v-1")),
        )
        .await
        .expect("the admin writes v-1's report");
    Api::<Lease>::namespaced(admin.clone(), ns.name())
        .create(&PostParams::default(), &test_lease("keyward-verifier-v-1"))
        .await
        .expect("the admin writes v-1's Lease");
    forbidden(
        "v-0 deletes v-1's report",
        v0_reports.delete("pk.v-1", &Default::default()).await,
    );
    forbidden(
        "v-0 relabels v-1's report as its own",
        v0_reports
            .patch(
                "pk.v-1",
                &apply,
                &Patch::Apply(&test_report("pk.v-1", "v-0", "v-0")),
            )
            .await,
    );
    forbidden(
        "v-0 deletes v-1's Lease",
        v0_leases
            .delete("keyward-verifier-v-1", &Default::default())
            .await,
    );
    // Without a pod (a token not bound to one): nothing, not even its "own" Lease.
    let podless = client_as_pod(ns.name(), "verifier", None).await;
    let podless_leases: Api<Lease> = Api::namespaced(podless, ns.name());
    forbidden(
        "a pod-less token writes a Lease",
        podless_leases
            .create(&PostParams::default(), &test_lease("keyward-verifier-v-0"))
            .await,
    );
    // v-0 may still delete its own objects.
    v0_reports
        .delete("pk.v-0", &Default::default())
        .await
        .expect("v-0 deletes its own report");
    v0_leases
        .delete("keyward-verifier-v-0", &Default::default())
        .await
        .expect("v-0 deletes its own Lease");

    remove_admission_policy(&name).await;
    ns.cleanup().await;
}
