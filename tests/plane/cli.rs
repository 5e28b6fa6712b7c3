//! `keyward status` and `keyward rotate` as a user runs them: the built binary, against the real
//! local control plane (`e2e/cluster.sh up`), with `--kubeconfig`. The operator runs in-process
//! (watching only the test's namespace) so a requested rotation really happens.
//!
//! What each would catch: a request written into the spec (the generation changes) fails
//! `rotate_requests_through_the_annotation_and_status_shows_it`; exit 0 for a key that is not
//! Ready fails `status_exits_3_for_a_key_that_is_not_ready`.

use std::process::Command;

use crate::common::*;
use k8s_openapi::api::core::v1::Secret;
use keyward::api::ProvisioningKey;
use keyward::labels as l;
use keyward::rotation::Floors;
use keyward_testbed::kubeconfig_path;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// What one run of the binary returned.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `keyward <args> --kubeconfig <the plane's>` (off the async workers) with no KUBECONFIG
/// in its environment, so the flag is what connects it.
async fn keyward(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
    cmd.args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .env_remove("KUBECONFIG");
    let what = format!("keyward {}", args.join(" "));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the blocking task")
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn quick_rotation() -> Value {
    json!({ "rotation": { "publishDelay": "1s", "overlap": "1s", "minInterval": "0s" } })
}

fn current_kid(pk: &ProvisioningKey) -> Option<String> {
    pk.status
        .as_ref()
        .and_then(|s| s.current_key.as_ref())
        .map(|c| c.kid.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_exits_1_with_a_clear_message() {
    let ns = TestNamespace::new("kw-cli-missing").await;
    let want = format!(
        "ProvisioningKey \"nope\" not found in namespace \"{}\"",
        ns.name()
    );
    for args in [
        vec!["status", "-n", ns.name(), "nope"],
        vec!["rotate", "-n", ns.name(), "nope"],
    ] {
        let run = keyward(&args).await;
        assert_eq!(run.code, 1, "{args:?}: {run}");
        assert!(run.stderr.contains(&want), "{args:?}: {run}");
        assert!(run.stdout.is_empty(), "{args:?}: {run}");
    }
    // An empty namespace: nothing to report, nothing wrong.
    let run = keyward(&["status", "-n", ns.name()]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stderr.contains("No ProvisioningKeys found"), "{run}");
    // Usage errors are clap's exit code 2.
    let run = keyward(&["rotate", "-n", ns.name()]).await;
    assert_eq!(run.code, 2, "{run}");
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_requests_through_the_annotation_and_status_shows_it() {
    let ns = TestNamespace::new("kw-cli-rotate").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let name = "payments";
    create_pk(&pks, name, json!({}), quick_rotation()).await;
    let settled = wait_pk(&pks, name, "settled on the first key", is_settled).await;
    let kid1 = current_kid(&settled).expect("a current key");

    // The table: Ready, the short key id, never rotated, exit 0.
    let run = keyward(&["status", "-n", ns.name()]).await;
    assert_eq!(run.code, 0, "{run}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("a row for {name}: {run}"));
    for cell in ["True", "Ready", &kid1[..10], "never", "on request"] {
        assert!(row.contains(cell), "{cell:?} in {row:?}");
    }

    // rotate: one merge patch of the annotation; the spec (generation) is untouched.
    let run = keyward(&["rotate", "-n", ns.name(), name]).await;
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.contains(&format!(
            "provisioningkey {}/{name}: rotation requested ({}=",
            ns.name(),
            l::ROTATE
        )),
        "{run}"
    );
    assert!(run.stdout.contains(&kid1), "names the current key: {run}");
    let after = pks.get(name).await.expect("get the key");
    let value = after
        .annotations()
        .get(l::ROTATE)
        .cloned()
        .expect("the rotate annotation");
    assert!(
        run.stdout.contains(&value),
        "prints the value it set: {run}"
    );
    assert_eq!(after.metadata.generation, settled.metadata.generation);
    assert_eq!(after.spec, settled.spec);

    // The operator serves the request; status shows the rotation.
    let rotated = wait_pk(&pks, name, "rotated by the annotation", |pk| {
        is_settled(pk) && current_kid(pk).is_some_and(|k| k != kid1)
    })
    .await;
    let kid2 = current_kid(&rotated).expect("a current key");
    let run = keyward(&["status", "-n", ns.name(), name]).await;
    assert_eq!(run.code, 0, "{run}");
    for want in [
        format!("Current key:    {kid2}\n"),
        "trigger Annotation".to_string(),
        format!("{kid2}   Annotation"),
        "Stalled:        no\n".to_string(),
    ] {
        assert!(run.stdout.contains(&want), "{want:?} in {run}");
    }

    // --wait: returns once the new key is handed out, with the old and new key ids.
    let run = keyward(&[
        "rotate",
        "-n",
        ns.name(),
        name,
        "--wait",
        "--timeout",
        "60s",
    ])
    .await;
    assert_eq!(run.code, 0, "{run}");
    let done = pks.get(name).await.expect("get the key");
    let kid3 = current_kid(&done).expect("a current key");
    assert_ne!(kid3, kid2);
    assert!(
        run.stdout.contains(&format!("rotated: {kid2} -> {kid3}")),
        "{run}"
    );

    // -o json: the summary a script reads.
    let run = keyward(&["status", "-n", ns.name(), "-o", "json"]).await;
    assert_eq!(run.code, 0, "{run}");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
    assert_eq!(doc["healthy"], true, "{run}");
    assert_eq!(doc["items"][0]["currentKey"]["kid"], kid3.as_str(), "{run}");
    assert_eq!(
        doc["items"][0]["lastRotation"]["trigger"], "Annotation",
        "{run}"
    );

    op.stop().await;
    ns.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_3_for_a_key_that_is_not_ready() {
    let ns = TestNamespace::new("kw-cli-notready").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    // A Secret the key's agent Secret name collides with: Keyward never writes it, and the
    // key is not Ready (SecretNameTaken).
    secrets
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("taken".into()),
                    ..ObjectMeta::default()
                },
                ..Secret::default()
            },
        )
        .await
        .expect("create the colliding Secret");
    create_pk(&pks, "taken", json!({}), json!({})).await;
    create_pk(&pks, "fine", json!({}), json!({})).await;
    wait_pk(&pks, "taken", "not Ready: SecretNameTaken", |pk| {
        not_ready_because(pk, "SecretNameTaken")
    })
    .await;
    wait_pk(&pks, "fine", "settled", is_settled).await;

    // The one healthy key alone: 0. The namespace, holding a key that is not Ready: 3.
    let run = keyward(&["status", "-n", ns.name(), "fine"]).await;
    assert_eq!(run.code, 0, "{run}");
    let run = keyward(&["status", "-n", ns.name()]).await;
    assert_eq!(run.code, 3, "{run}");
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with("taken"))
        .unwrap_or_else(|| panic!("a row for taken: {run}"));
    assert!(row.contains("False"), "{row}");
    let run = keyward(&["status", "-n", ns.name(), "-o", "wide"]).await;
    assert_eq!(run.code, 3, "{run}");
    assert!(
        run.stdout.contains(": SecretNameTaken: "),
        "the reason in wide: {run}"
    );

    let run = keyward(&["status", "-n", ns.name(), "taken"]).await;
    assert_eq!(run.code, 3, "{run}");
    assert!(
        run.stdout
            .contains("Ready:          False (SecretNameTaken)"),
        "{run}"
    );
    assert!(run.stdout.contains("Attention:"), "{run}");

    op.stop().await;
    ns.cleanup().await;
}

/// `keyward reactivate` as a user runs it: refused with a clear message (exit 1) for a key id
/// still trusted or unknown, then, once the rotation deactivated the old key, a request with
/// `--wait` that returns when the key id is trusted again, and `status` listing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactivate_brings_a_deactivated_key_back_and_refuses_what_it_cannot() {
    let ns = TestNamespace::new("kw-cli-reactivate").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let name = "billing";
    create_pk(&pks, name, json!({}), quick_rotation()).await;
    let settled = wait_pk(&pks, name, "settled on the first key", is_settled).await;
    let kid1 = current_kid(&settled).expect("a current key");

    let run = keyward(&["reactivate", "-n", ns.name(), name, &kid1, "--reason", "x"]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("is still trusted"), "{run}");
    let run = keyward(&["reactivate", "-n", ns.name(), name, "nope", "--reason", "x"]).await;
    assert_eq!(run.code, 1, "{run}");
    assert!(run.stderr.contains("lists no revoked key nope"), "{run}");
    let run = keyward(&["reactivate", "-n", ns.name(), name, &kid1, "--reason", " "]).await;
    assert_eq!(run.code, 2, "an empty reason is a usage error: {run}");

    let run = keyward(&["rotate", "-n", ns.name(), name]).await;
    assert_eq!(run.code, 0, "{run}");
    wait_pk(&pks, name, "k1 deactivated", |pk| {
        pk.status.as_ref().is_some_and(|s| {
            s.revoked_keys
                .iter()
                .any(|k| k.kid == kid1 && k.state.as_deref() == Some("Deactivated"))
        })
    })
    .await;
    let run = keyward(&["status", "-n", ns.name(), name]).await;
    assert!(
        run.stdout
            .contains(&format!("{kid1}  Deactivated (reactivatable until")),
        "{run}"
    );

    let run = keyward(&[
        "reactivate",
        "-n",
        ns.name(),
        name,
        &kid1,
        "--reason",
        "INC-9",
        "--wait",
    ])
    .await;
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("is trusted again"), "{run}");
    let pk = pks.get(name).await.expect("get");
    assert!(
        pk.annotations()
            .get(l::REACTIVATE)
            .is_some_and(|v| v.starts_with(&format!("{kid1},"))),
        "the request annotation"
    );
    assert_eq!(
        pk.annotations()
            .get(l::REACTIVATE_REASON)
            .map(String::as_str),
        Some("INC-9")
    );
    drop(op);
    ns.cleanup().await;
}

/// `keyward token sync` as an agent outside the cluster runs it: a plain process with a
/// kubeconfig whose ServiceAccount may only `get` the one agent Secret. `--once` writes the token
/// (mode 0600) and exits 0; a key it may not read exits 1 naming the refusal; the long-running
/// form replaces the file atomically after a rotation, with the new key's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_sync_keeps_a_file_fresh_with_a_one_secret_kubeconfig() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use std::os::unix::fs::PermissionsExt as _;
    let ns = TestNamespace::new("kw-cli-sync").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let secrets: Api<Secret> = ns.api();
    let mut spec = quick_rotation();
    spec["token"] = json!({ "ttl": "40s" });
    create_pk(&pks, "edge", json!({}), spec).await;
    create_pk(&pks, "other", json!({}), quick_rotation()).await;
    let settled = wait_pk(&pks, "edge", "settled", is_settled).await;
    let kid1 = current_kid(&settled).expect("a current key");

    // A ServiceAccount that may read the one Secret `edge`, and a kubeconfig with its token.
    let sas: Api<ServiceAccount> = ns.api();
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({ "metadata": { "name": "sync" } })).expect("sa"),
    )
    .await
    .expect("create the ServiceAccount");
    ns.api::<Role>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": { "name": "sync" },
            "rules": [{ "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["edge"], "verbs": ["get"] }],
        })).expect("role"))
        .await
        .expect("create the Role");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": { "name": "sync" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sync" },
            "subjects": [{ "kind": "ServiceAccount", "name": "sync", "namespace": ns.name() }],
        })).expect("binding"))
        .await
        .expect("create the RoleBinding");
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({ "spec": { "expirationSeconds": 3600 } })).expect("request");
    let sa_token = sas
        .create_token_request("sync", &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("status")
        .token;
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig =
        keyward_testbed::kubeconfig_with_token(dir.path(), "sync", &sa_token).expect("kubeconfig");
    let out = dir.path().join("token");
    let sync = |key: &str, once: bool| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"));
        cmd.args(["token", "sync", "--key", &format!("{}/{key}", ns.name())])
            .arg("--out")
            .arg(&out)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env_remove("KUBECONFIG")
            .kill_on_drop(true);
        if once {
            cmd.arg("--once");
        }
        cmd
    };
    let file_kid = || {
        std::fs::read_to_string(&out)
            .ok()
            .and_then(|t| keyward::keys::decode_token_unverified(&t).ok())
            .map(|(h, _)| h.kid)
    };

    // --once: written, 0600, the agent Secret's token.
    let run = sync("edge", true).output().await.expect("run");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let agent = secrets.get("edge").await.expect("agent Secret");
    assert_eq!(
        std::fs::read_to_string(&out).expect("the token file"),
        data(&agent, l::DATA_TOKEN).expect("token")
    );
    assert_eq!(file_kid().as_deref(), Some(kid1.as_str()));
    let mode = std::fs::metadata(&out).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // A key this kubeconfig may not read: exit 1, a clear message, the file untouched.
    let run = sync("other", true).output().await.expect("run");
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("forbidden") || stderr.contains("Forbidden"),
        "{stderr}"
    );
    assert_eq!(file_kid().as_deref(), Some(kid1.as_str()));

    // Long-running: a rotation reaches the file.
    let mut child = sync("edge", false).spawn().expect("spawn");
    merge(
        &pks,
        "edge",
        json!({ "metadata": { "annotations": { l::ROTATE: "sync-1" } } }),
    )
    .await;
    let rotated = wait_pk(&pks, "edge", "rotated", |pk| {
        is_settled(pk) && current_kid(pk).is_some_and(|k| k != kid1)
    })
    .await;
    let kid2 = current_kid(&rotated).expect("the new key");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while file_kid().as_deref() != Some(kid2.as_str()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the token file never carried the new key {kid2}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".keyward-token-"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
    let _ = child.kill().await;
    drop(op);
    ns.cleanup().await;
}

/// `keyward bundle export` as a user runs it: the JWKS of the key's trusted key ids; a JWK
/// someone injected into the bundle ConfigMap is not exported (the trust record does not list
/// it); the ConfigMap form is a copy, labelled `keyward.dev/exported-from`, never `managed-by`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_export_writes_only_what_the_trust_record_lists() {
    let ns = TestNamespace::new("kw-cli-export").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    create_pk(&pks, "exp", json!({}), quick_rotation()).await;
    let settled = wait_pk(&pks, "exp", "settled", is_settled).await;
    let kid1 = current_kid(&settled).expect("a current key");
    let jwks = |run: &Run| -> Vec<String> {
        let v: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"));
        v["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter_map(|k| k["kid"].as_str().map(str::to_string))
            .collect()
    };
    let run = keyward(&["bundle", "export", "-n", ns.name(), "exp"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(jwks(&run), vec![kid1.clone()]);

    // A JWK injected into the ConfigMap (someone with ConfigMap rights): not exported.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = ns.api();
    let mut cm = cms.get("exp-trust").await.expect("the bundle");
    let forged = keyward::keys::KeyPair::generate().public_key().to_jwk();
    let mut set: keyward::keys::Jwks =
        serde_json::from_str(&cm.data.as_ref().expect("data")[l::DATA_JWKS]).expect("jwks");
    set.keys.push(forged);
    cm.data.get_or_insert_default().insert(
        l::DATA_JWKS.into(),
        serde_json::to_string(&set).expect("json"),
    );
    cm.metadata.managed_fields = None;
    cms.replace("exp-trust", &PostParams::default(), &cm)
        .await
        .expect("inject a JWK");
    let run = keyward(&["bundle", "export", "-n", ns.name(), "exp"]).await;
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(
        jwks(&run),
        vec![kid1.clone()],
        "the injected JWK was exported"
    );

    let run = keyward(&[
        "bundle",
        "export",
        "-n",
        ns.name(),
        "exp",
        "--format",
        "configmap",
        "--name",
        "copy",
        "--to-namespace",
        "edge",
    ])
    .await;
    assert_eq!(run.code, 0, "{run}");
    let cm: Value = serde_yaml::from_str(&run.stdout).expect("a ConfigMap manifest");
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "copy");
    assert_eq!(cm["metadata"]["namespace"], "edge");
    assert_eq!(
        cm["metadata"]["labels"][l::EXPORTED_FROM],
        format!("{}.exp", ns.name())
    );
    assert!(cm["metadata"]["labels"].get(l::MANAGED_BY).is_none());
    let inner: Value =
        serde_json::from_str(cm["data"][l::DATA_JWKS].as_str().expect("jwks.json")).expect("json");
    assert_eq!(inner["keys"][0]["kid"], kid1.as_str());

    let run = keyward(&["bundle", "export", "-n", ns.name(), "nope"]).await;
    assert_eq!(run.code, 1, "{run}");
    drop(op);
    ns.cleanup().await;
}

/// An agent outside the cluster registered as a consumer (issue 21, part 3): a PolicyAgent with
/// `workloadRef: {kind: ServiceAccount, name: edge-agent}`, and `keyward token sync
/// --acknowledge-via` run as a plain process with that ServiceAccount's kubeconfig (get on the
/// one agent Secret, create on its own `serviceaccounts/token`). It is confirmed by the real
/// verifier's report of its ServiceAccount, never rolled. While it is stopped a rotation holds
/// the old key, however long, and an impostor ServiceAccount acknowledging with the new token
/// confirms nothing; restarted, it acknowledges the new key id and only then is the old key
/// revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outside_the_cluster_holds_the_old_key_until_it_acknowledges_the_new() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use keyward::api::PolicyAgent;
    let ns = TestNamespace::new("kw-cli-consumer").await;
    let op = Operator::start(ns.name(), Floors::none()).await;
    let pks: Api<ProvisioningKey> = ns.api();
    let pas: Api<PolicyAgent> = ns.api();
    let sas: Api<ServiceAccount> = ns.api();
    create_pk(&pks, "edge", json!({}), quick_rotation()).await;
    let settled = wait_pk(&pks, "edge", "settled", is_settled).await;
    let kid1 = current_kid(&settled).expect("a current key");
    for name in ["edge-agent", "impostor"] {
        sas.create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": name } })).expect("sa"),
        )
        .await
        .expect("create the ServiceAccount");
    }
    ns.api::<Role>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": { "name": "edge-agent" },
            "rules": [
                { "apiGroups": [""], "resources": ["secrets"], "resourceNames": ["edge"], "verbs": ["get"] },
                { "apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": ["edge-agent"], "verbs": ["create"] },
            ],
        })).expect("role"))
        .await
        .expect("create the Role");
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &serde_json::from_value(json!({
            "metadata": { "name": "edge-agent" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "edge-agent" },
            "subjects": [{ "kind": "ServiceAccount", "name": "edge-agent", "namespace": ns.name() }],
        })).expect("binding"))
        .await
        .expect("create the RoleBinding");
    pas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "keyward.dev/v1alpha1", "kind": "PolicyAgent",
            "metadata": { "name": "outside" },
            "spec": {
                "provisioningKeyRef": { "name": "edge" },
                "workloadRef": { "kind": "ServiceAccount", "name": "edge-agent" },
            },
        }))
        .expect("pa"),
    )
    .await
    .expect("create the PolicyAgent");
    let token_for = |sa: &'static str, hours: i64| {
        let sas = sas.clone();
        async move {
            let request: TokenRequest = serde_json::from_value(json!({
                "spec": { "expirationSeconds": hours * 3600, "audiences": match sa {
                    "impostor" => json!([keyward::verifier::pod_identity::CONSUMER_AUDIENCE]),
                    _ => json!([]),
                } }
            }))
            .expect("request");
            sas.create_token_request(sa, &PostParams::default(), &request)
                .await
                .expect("TokenRequest")
                .status
                .expect("status")
                .token
        }
    };
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = keyward_testbed::kubeconfig_with_token(
        dir.path(),
        "edge-agent",
        &token_for("edge-agent", 1).await,
    )
    .expect("kubeconfig");

    // The real verifier, reporting every second, reviewing pod and consumer tokens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
    let vlog = dir.path().join("verifier.log");
    let _verifier = spawn_keyward(
        &[
            "verifier",
            "--plain-http",
            "--namespaces",
            ns.name(),
            "--address",
            &address,
            "--replica-id",
            "v-0",
            "--lease-namespace",
            ns.name(),
            "--report-interval",
            "1s",
            "--report-resolution",
            "1s",
        ],
        &[],
        &vlog,
    );
    let base = format!("http://{address}");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(std::time::Instant::now() < deadline, "verifier not ready");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let out = dir.path().join("token");
    let sync = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
            .args(["token", "sync", "--key", &format!("{}/edge", ns.name())])
            .arg("--out")
            .arg(&out)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--acknowledge-via",
                &base,
                "--service-account",
                "edge-agent",
            ])
            .env_remove("KUBECONFIG")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn keyward token sync")
    };
    let confirmed = |pa: &PolicyAgent| pa.status.as_ref().and_then(|s| s.confirmed_key_id.clone());
    let wait_confirmed = |kid: String, what: &'static str| {
        let pas = pas.clone();
        async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                let pa = pas.get("outside").await.expect("get the PolicyAgent");
                if confirmed(&pa).as_deref() == Some(kid.as_str()) {
                    return pa;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: the PolicyAgent never confirmed {kid}: {:?}",
                    pa.status
                );
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    };

    // 1. Registered: confirmed on the first key by its acknowledgement.
    let mut child = sync();
    let pa = wait_confirmed(kid1.clone(), "first key").await;
    assert_eq!(
        pa.status.as_ref().and_then(|s| s.rolled_at.clone()),
        None,
        "an agent outside the cluster is never rolled"
    );
    let _ = child.kill().await;

    // 2. Stopped: a rotation holds the old key for it.
    merge(
        &pks,
        "edge",
        json!({ "metadata": { "annotations": { l::ROTATE: "outside-1" } } }),
    )
    .await;
    let rotating = wait_pk(&pks, "edge", "the new key handed out", |pk| {
        current_kid(pk).is_some_and(|k| k != kid1)
    })
    .await;
    let kid2 = current_kid(&rotating).expect("the new key");
    // An impostor ServiceAccount acknowledges with the new token: nothing confirmed.
    let agent_token = {
        let secrets: Api<Secret> = ns.api();
        let s = secrets.get("edge").await.expect("agent Secret");
        data(&s, l::DATA_TOKEN).expect("token")
    };
    let impostor = token_for("impostor", 1).await;
    for _ in 0..3 {
        let res = http
            .get(format!("{base}/auth/{}/edge", ns.name()))
            .bearer_auth(&agent_token)
            .header(
                keyward::verifier::pod_identity::CONSUMER_TOKEN_HEADER,
                &impostor,
            )
            .send()
            .await
            .expect("GET /auth");
        assert_eq!(res.status(), 200);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    // Well beyond overlap (1s) and two report intervals: the old key is still trusted.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let pk = pks.get("edge").await.expect("get");
    let record = keyward::trust_record::TrustRecord::of(&pk)
        .expect("a record")
        .expect("readable");
    assert!(
        record.has(&kid1),
        "the old key was revoked while the outside agent had not acknowledged the new one"
    );
    let pa = pas.get("outside").await.expect("get");
    assert_eq!(
        confirmed(&pa).as_deref(),
        Some(kid1.as_str()),
        "the impostor confirmed nothing"
    );

    // 3. Restarted: it acknowledges the new key id, is confirmed, and only then the old key goes.
    let mut child = sync();
    wait_confirmed(kid2.clone(), "new key").await;
    let revoked = wait_pk(&pks, "edge", "old key revoked", |pk| {
        is_settled(pk)
            && keyward::trust_record::TrustRecord::of(pk)
                .and_then(Result::ok)
                .is_some_and(|r| !r.has(&kid1) && r.has(&kid2))
    })
    .await;
    assert_eq!(current_kid(&revoked).as_deref(), Some(kid2.as_str()));
    let _ = child.kill().await;
    drop(op);
    ns.cleanup().await;
}
