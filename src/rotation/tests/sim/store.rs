//! The simulator's objects: a key's Secrets, its trust bundle, its agent Secret and the
//! ProvisioningKey itself, as the API server would store them (resourceVersions, uids). Every
//! planned step reaches them only through the in-memory executor
//! (`rotation::write::memory`), with the write the controller makes (`rotation::write::of`);
//! the simulator's evidence is parsed back from them by the controller's own observe.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;

use crate::api::provisioning_key::ProvisioningKey;
use crate::rotation::write::memory::{Kind, Objects, Stored};

/// Why the store refused a write.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    AlreadyExists,
    NotFound,
    Conflict,
}

#[derive(Clone, Debug, Default)]
pub struct Store {
    objects: BTreeMap<(u8, String), Stored>,
    version: u64,
}

fn key(kind: Kind, name: &str) -> (u8, String) {
    let k = match kind {
        Kind::Secret => 0,
        Kind::ConfigMap => 1,
        Kind::ProvisioningKey => 2,
    };
    (k, name.to_string())
}

fn kind_name(o: &Stored) -> (Kind, String) {
    match o {
        Stored::Secret(s) => (Kind::Secret, s.name_any()),
        Stored::ConfigMap(c) => (Kind::ConfigMap, c.name_any()),
        Stored::ProvisioningKey(p) => (Kind::ProvisioningKey, p.name_any()),
    }
}

fn meta(o: &mut Stored) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    match o {
        Stored::Secret(s) => &mut s.metadata,
        Stored::ConfigMap(c) => &mut c.metadata,
        Stored::ProvisioningKey(p) => &mut p.metadata,
    }
}

impl Store {
    /// Stores `o` as the API server would: a new resourceVersion, and a uid when it has none.
    fn put(&mut self, mut o: Stored) {
        self.version += 1;
        let (kind, name) = kind_name(&o);
        let m = meta(&mut o);
        m.resource_version = Some(self.version.to_string());
        if m.uid.is_none() {
            m.uid = Some(format!("uid-{}", self.version));
        }
        self.objects.insert(key(kind, &name), o);
    }

    /// Stores `pk` (set up by the test, not written by the operator).
    pub fn put_pk(&mut self, pk: ProvisioningKey) {
        self.put(Stored::ProvisioningKey(Box::new(pk)));
    }

    pub fn pk(&self, name: &str) -> Option<ProvisioningKey> {
        match self.objects.get(&key(Kind::ProvisioningKey, name)) {
            Some(Stored::ProvisioningKey(p)) => Some((**p).clone()),
            _ => None,
        }
    }

    pub fn secrets(&self) -> Vec<Secret> {
        self.objects
            .values()
            .filter_map(|o| match o {
                Stored::Secret(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn secret(&self, name: &str) -> Option<&Secret> {
        match self.objects.get(&key(Kind::Secret, name)) {
            Some(Stored::Secret(s)) => Some(s),
            _ => None,
        }
    }

    pub fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        match self.objects.get(&key(Kind::ConfigMap, name)) {
            Some(Stored::ConfigMap(c)) => Some(c),
            _ => None,
        }
    }

    /// Someone else edits Secret `name` (not the operator): a new resourceVersion.
    pub fn edit_secret(&mut self, name: &str, f: impl FnOnce(&mut Secret)) {
        if let Some(Stored::Secret(mut s)) = self.objects.get(&key(Kind::Secret, name)).cloned() {
            f(&mut s);
            self.put(Stored::Secret(s));
        }
    }

    /// Someone else deletes the object.
    pub fn remove(&mut self, kind: Kind, name: &str) {
        self.objects.remove(&key(kind, name));
    }
}

impl Objects for Store {
    type Error = Refused;

    fn get(&self, kind: Kind, name: &str) -> Option<Stored> {
        self.objects.get(&key(kind, name)).cloned()
    }

    fn create(&mut self, mut object: Stored) -> Result<(), Refused> {
        let (kind, name) = kind_name(&object);
        if self.objects.contains_key(&key(kind, &name)) {
            return Err(Refused::AlreadyExists);
        }
        let m = meta(&mut object);
        m.uid = None;
        m.resource_version = None;
        self.put(object);
        Ok(())
    }

    fn update(&mut self, mut object: Stored) -> Result<(), Refused> {
        let (kind, name) = kind_name(&object);
        let Some(mut current) = self.objects.get(&key(kind, &name)).cloned() else {
            return Err(Refused::NotFound);
        };
        let (m, c) = (meta(&mut object).clone(), meta(&mut current).clone());
        if m.resource_version.is_some() && m.resource_version != c.resource_version
            || m.uid.is_some() && m.uid != c.uid
        {
            return Err(Refused::Conflict);
        }
        meta(&mut object).uid = c.uid;
        self.put(object);
        Ok(())
    }

    fn delete(&mut self, kind: Kind, name: &str, uid: &str) -> Result<(), Refused> {
        let Some(mut current) = self.objects.get(&key(kind, name)).cloned() else {
            return Err(Refused::NotFound);
        };
        if meta(&mut current).uid.as_deref() != Some(uid) {
            return Err(Refused::Conflict);
        }
        self.objects.remove(&key(kind, name));
        Ok(())
    }

    fn already_exists(e: &Refused) -> bool {
        *e == Refused::AlreadyExists
    }

    fn not_found(e: &Refused) -> bool {
        *e == Refused::NotFound
    }
}
