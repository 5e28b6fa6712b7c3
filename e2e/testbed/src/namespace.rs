//! A unique namespace per test.

use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::wait::conditions;
use kube::{Api, Client, Resource};
use rand::Rng;
use rand::distributions::Alphanumeric;

use crate::wait::wait_for;

/// Label put on every namespace the test bed creates, so leftovers are easy to find:
/// `kubectl get ns -l keyward.dev/testbed`.
const TESTBED_LABEL: &str = "keyward.dev/testbed";

/// A namespace created for one test: `<prefix>-<6 random chars>`, ready for pods (its
/// `default` ServiceAccount exists).
///
/// Call [`TestNamespace::cleanup`] at the end of the test. If the value is dropped without it
/// (a failed assertion, a panic), `Drop` still deletes the namespace, best effort: it runs the
/// delete request on a separate thread with its own Tokio runtime and client (the test's
/// runtime may be shutting down) and waits at most about 10 s for that request.
pub struct TestNamespace {
    name: String,
    client: Client,
    cleaned: bool,
}

impl TestNamespace {
    /// Creates the namespace and waits (at most 60 s) for its `default` ServiceAccount,
    /// which kube-controller-manager creates; pods cannot be created before.
    ///
    /// # Panics
    /// If the plane is unreachable or the namespace cannot be created or made ready.
    pub async fn new(prefix: &str) -> Self {
        let client = crate::client().await;
        Self::with_client(client, prefix).await
    }

    /// As [`TestNamespace::new`], with a given client.
    ///
    /// # Panics
    /// If the namespace cannot be created or made ready.
    pub async fn with_client(client: Client, prefix: &str) -> Self {
        let suffix: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(6)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect();
        let prefix: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(50)
            .collect();
        let name = format!("{}-{suffix}", prefix.trim_matches('-'));
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TESTBED_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        let this = Self {
            name,
            client,
            cleaned: false,
        };
        let sas: Api<ServiceAccount> = this.api();
        wait_for(&sas, "default", conditions::is_created(), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "namespace {}: no default ServiceAccount (is kube-controller-manager running?): {e}",
                    this.name
                )
            });
        tracing::info!(namespace = %this.name, "test namespace ready");
        this
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client the namespace was created with.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An `Api` for a namespaced resource in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Requests deletion of the namespace (and so of everything in it). Does not wait for
    /// the namespace controller to finish; force-deletes its pods (grace period 0) so pods
    /// bound by a kubelet honouring grace periods do not hold the namespace.
    ///
    /// # Panics
    /// If the delete request fails for another reason than the namespace being gone.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        delete_namespace(self.client.clone(), &self.name)
            .await
            .unwrap_or_else(|e| panic!("cannot delete namespace {}: {e}", self.name));
    }
}

async fn delete_namespace(client: Client, name: &str) -> Result<(), kube::Error> {
    match Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await
    {
        Ok(_) => {
            tracing::info!(namespace = %name, "test namespace deletion requested");
            force_delete_pods(client, name).await;
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes the namespace's pods with grace period 0: pods bound to a node (a kubelet with
/// [`crate::KubeletConfig::honour_grace_period`]) would otherwise stay terminating, and the
/// namespace with them, once no kubelet finalizes their deletion.
async fn force_delete_pods(client: Client, name: &str) {
    let pods: Api<Pod> = Api::namespaced(client, name);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    if let Err(e) = pods
        .delete_collection(&params, &ListParams::default())
        .await
    {
        tracing::warn!(namespace = %name, "cannot force-delete the pods: {e}");
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("delete-ns-{name}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("testbed: cannot delete namespace {name}: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async {
                    let attempt = async {
                        let client = crate::client().await;
                        delete_namespace(client, &name).await
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("testbed: cannot delete namespace {name}: {e}"),
                        Err(_) => eprintln!("testbed: deleting namespace {name} timed out"),
                    }
                });
            });
        match thread {
            // A panic inside (e.g. the plane went away) must not turn into a double panic here.
            Ok(handle) => {
                let _ = handle.join();
            }
            Err(e) => eprintln!(
                "testbed: cannot spawn a thread to delete {}: {e}",
                self.name
            ),
        }
    }
}
