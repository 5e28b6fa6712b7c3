//! A watch (cluster-wide) over ProvisioningKeys or PolicyAgents that keeps the latest status
//! of each, so a phase can wait for "all N Ready" without listing thousands of objects again
//! and again. The bench reads the CRDs as JSON (no dependency on the operator's crate: the
//! bench must build and run against any version of the operator).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

pub fn provisioning_keys() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keyward.dev", "v1alpha1", "ProvisioningKey"),
        "provisioningkeys",
    )
}

pub fn policy_agents() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keyward.dev", "v1alpha1", "PolicyAgent"),
        "policyagents",
    )
}

/// What the bench needs of one object.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub generation: Option<i64>,
    /// `status` as JSON (`Null` when absent).
    pub status: Value,
}

impl Seen {
    fn condition(&self, type_: &str) -> Option<&str> {
        self.status
            .get("conditions")?
            .as_array()?
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))?
            .get("status")?
            .as_str()
    }

    fn observed(&self) -> bool {
        self.status
            .get("observedGeneration")
            .and_then(Value::as_i64)
            == self.generation
    }

    /// Ready=True for the current generation.
    pub fn ready(&self) -> bool {
        self.observed() && self.condition("Ready") == Some("True")
    }

    /// The ProvisioningKey's current key id.
    pub fn current_kid(&self) -> Option<&str> {
        self.status.get("currentKey")?.get("kid")?.as_str()
    }

    /// When the ProvisioningKey's current key was minted.
    pub fn current_created(&self) -> Option<Timestamp> {
        self.status
            .get("currentKey")?
            .get("createdAt")?
            .as_str()?
            .parse()
            .ok()
    }

    /// Whether `kid` is listed in the ProvisioningKey's `status.revokedKeys`.
    pub fn revoked(&self, kid: &str) -> bool {
        self.status
            .get("revokedKeys")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
            })
    }

    /// A ProvisioningKey settled (Ready, not rotating) on a key.
    pub fn settled(&self) -> bool {
        self.ready() && self.condition("Rotating") != Some("True") && self.current_kid().is_some()
    }

    /// A PolicyAgent confirmed on `kid`, Ready, for its current generation.
    pub fn confirmed_on(&self, kid: &str) -> bool {
        self.ready()
            && self.status.get("phase").and_then(Value::as_str) == Some("Confirmed")
            && self.status.get("confirmedKeyId").and_then(Value::as_str) == Some(kid)
    }
}

/// The latest state of every object of one kind, by `namespace/name`.
#[derive(Clone)]
pub struct Tracker {
    objects: Arc<Mutex<HashMap<String, Seen>>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

pub fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Tracker {
    /// Starts watching every object of `resource` in the cluster.
    pub fn start(client: Client, resource: &ApiResource) -> Self {
        let api: Api<DynamicObject> = Api::all_with(client, resource);
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let out = objects.clone();
        let task = tokio::spawn(async move {
            let mut stream = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut init: HashMap<String, Seen> = HashMap::new();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut map = out.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Event::Apply(o) => {
                        map.insert(id(&o), seen(&o));
                    }
                    Event::Delete(o) => {
                        map.remove(&id(&o));
                    }
                    Event::Init => init.clear(),
                    Event::InitApply(o) => {
                        init.insert(id(&o), seen(&o));
                    }
                    Event::InitDone => *map = std::mem::take(&mut init),
                }
            }
        });
        Self {
            objects,
            task: Arc::new(task),
        }
    }

    /// Runs `f` over the current states.
    pub fn with<T>(&self, f: impl FnOnce(&HashMap<String, Seen>) -> T) -> T {
        f(&self.objects.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits (polling the watch's state every 200 ms) until `done` holds; `Err` with
    /// `progress` after `timeout`.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&HashMap<String, Seen>) -> bool,
        progress: impl Fn(&HashMap<String, Seen>) -> String,
    ) -> anyhow::Result<Timestamp> {
        let t0 = Instant::now();
        let mut last_report = Instant::now();
        loop {
            super::guard::check()?;
            if self.with(&done) {
                return Ok(Timestamp::now());
            }
            if t0.elapsed() > timeout {
                anyhow::bail!(
                    "{what}: not reached within {timeout:?}: {}",
                    self.with(&progress)
                );
            }
            if last_report.elapsed() > Duration::from_secs(15) {
                super::say(&format!("  ... {what}: {}", self.with(&progress)));
                last_report = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

fn id(o: &DynamicObject) -> String {
    key(&o.namespace().unwrap_or_default(), &o.name_any())
}

fn seen(o: &DynamicObject) -> Seen {
    Seen {
        generation: o.metadata.generation,
        status: o.data.get("status").cloned().unwrap_or(Value::Null),
    }
}
