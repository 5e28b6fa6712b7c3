//! The in-memory executor: a [`Write`] applied to a model's objects through the model's own
//! get, create, update and delete ([`Objects`]), as the API server would apply it. A model's
//! conflicts, refusals and crashes therefore fire per write, and no model keeps its own copy of
//! what a step writes.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;

use super::{Exists, Object, Write};
use crate::api::provisioning_key::ProvisioningKey;
use crate::rotation::observe::controlled_by;

/// The kinds a ProvisioningKey reconcile writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Secret,
    ConfigMap,
    ProvisioningKey,
}

/// An object as a model stores it.
#[derive(Clone, Debug)]
pub enum Stored {
    Secret(Secret),
    ConfigMap(ConfigMap),
    ProvisioningKey(Box<ProvisioningKey>),
}

impl Stored {
    fn resource_version(&self) -> Option<String> {
        match self {
            Stored::Secret(o) => o.resource_version(),
            Stored::ConfigMap(o) => o.resource_version(),
            Stored::ProvisioningKey(o) => o.resource_version(),
        }
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Stored::Secret(o) => &o.metadata,
            Stored::ConfigMap(o) => &o.metadata,
            Stored::ProvisioningKey(o) => &o.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Stored::Secret(o) => &mut o.metadata,
            Stored::ConfigMap(o) => &mut o.metadata,
            Stored::ProvisioningKey(o) => &mut o.metadata,
        }
    }
}

impl From<Object> for Stored {
    fn from(o: Object) -> Self {
        match o {
            Object::Secret(s) => Stored::Secret(*s),
            Object::ConfigMap(c) => Stored::ConfigMap(*c),
        }
    }
}

/// A model's objects, in one namespace.
pub trait Objects {
    /// The model's own refusals (a conflict, a crash, an exhausted write budget).
    type Error;
    fn get(&self, kind: Kind, name: &str) -> Option<Stored>;
    /// Creates `object`; refuses a name that exists ([`Objects::already_exists`]).
    fn create(&mut self, object: Stored) -> Result<(), Self::Error>;
    /// Replaces the stored object of that name. A resourceVersion or uid set on `object` is a
    /// precondition the model checks.
    fn update(&mut self, object: Stored) -> Result<(), Self::Error>;
    /// Deletes the object of that name and `uid`.
    fn delete(&mut self, kind: Kind, name: &str, uid: &str) -> Result<(), Self::Error>;
    fn already_exists(e: &Self::Error) -> bool;
    fn not_found(e: &Self::Error) -> bool;
}

/// Why a write failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Error<E> {
    /// The model refused it.
    Store(E),
    /// The precondition failed: the object changed since it was read (409).
    Conflict,
    /// The object to change is gone (404).
    NotFound,
    /// An object of that name is someone else's.
    NameTaken(String),
}

/// Applies `write` to `objects`; returns the object as stored after it (`None` for a delete).
pub fn execute<O: Objects>(
    objects: &mut O,
    write: Write,
) -> Result<Option<Stored>, Error<O::Error>> {
    match write {
        Write::Create { object, exists } => {
            let name = object.name();
            let owner = object.owner_uid();
            let kind = match &object {
                Object::Secret(_) => Kind::Secret,
                Object::ConfigMap(_) => Kind::ConfigMap,
            };
            match objects.create(object.into()) {
                Ok(()) => Ok(objects.get(kind, &name)),
                Err(e) if O::already_exists(&e) => match exists {
                    Exists::SameIfControlledBy(uid) => match objects.get(kind, &name) {
                        Some(Stored::Secret(s)) if controlled_by(&s.metadata, &uid) => {
                            Ok(Some(Stored::Secret(s)))
                        }
                        _ => Err(Error::NameTaken(name)),
                    },
                    Exists::NameTaken => Err(Error::NameTaken(name)),
                    Exists::Conflict => match objects.get(kind, &name) {
                        Some(o) if controlled_by(o.meta(), &owner) => Err(Error::Store(e)),
                        _ => Err(Error::NameTaken(name)),
                    },
                },
                Err(e) => Err(Error::Store(e)),
            }
        }
        Write::Patch(p) => {
            let Some(Stored::Secret(mut s)) = objects.get(Kind::Secret, &p.name) else {
                return Err(Error::NotFound);
            };
            if s.resource_version().as_deref() != Some(p.resource_version.as_str()) {
                return Err(Error::Conflict);
            }
            p.apply_to(&mut s);
            s.metadata.uid = None;
            objects.update(Stored::Secret(s)).map_err(Error::Store)?;
            Ok(objects.get(Kind::Secret, &p.name))
        }
        Write::Apply { object } => {
            let name = object.name();
            let kind = match &object {
                Object::Secret(_) => Kind::Secret,
                Object::ConfigMap(_) => Kind::ConfigMap,
            };
            let mut applied = Stored::from(object);
            match objects.get(kind, &name) {
                None => objects.create(applied).map_err(Error::Store)?,
                Some(current) => {
                    let rv = applied.resource_version();
                    if rv.is_some() && rv != current.resource_version() {
                        return Err(Error::Conflict);
                    }
                    // Forced apply by the one manager of every field: the applied object is
                    // the stored one.
                    let meta = applied.meta_mut();
                    meta.resource_version = current.resource_version();
                    meta.uid = None;
                    objects.update(applied).map_err(Error::Store)?;
                }
            }
            Ok(objects.get(kind, &name))
        }
        Write::Record {
            name,
            uid,
            resource_version,
            was,
            value,
        } => update_pk(objects, &name, |pk| {
            let stored = pk.status.as_ref().and_then(|s| s.trust_record.clone());
            // A 409 is retried once at the current resourceVersion while the object and its
            // record are unchanged.
            if pk.metadata.uid.as_deref() != Some(uid.as_str())
                || pk.resource_version().as_deref() != Some(resource_version.as_str())
                    && stored != was
            {
                return false;
            }
            pk.status.get_or_insert_default().trust_record = Some(value);
            true
        }),
        Write::RemoveAnnotation {
            name,
            resource_version,
            key,
        } => update_pk(objects, &name, |pk| {
            if pk.resource_version().as_deref() != Some(resource_version.as_str()) {
                return false;
            }
            pk.annotations_mut().remove(key);
            true
        }),
        Write::Delete {
            name,
            resource_version,
        } => {
            let Some(current) = objects.get(Kind::Secret, &name) else {
                return Ok(None);
            };
            if current.resource_version().as_deref() != Some(resource_version.as_str()) {
                return Err(Error::Conflict);
            }
            let Stored::Secret(s) = current else {
                return Ok(None);
            };
            let uid = s.metadata.uid.clone().unwrap_or_default();
            match objects.delete(Kind::Secret, &name, &uid) {
                Err(e) if O::not_found(&e) => Ok(None),
                other => other.map(|()| None).map_err(Error::Store),
            }
        }
    }
}

/// Changes ProvisioningKey `name` with `change`, which returns `false` for a failed
/// precondition (a conflict).
fn update_pk<O: Objects>(
    objects: &mut O,
    name: &str,
    change: impl FnOnce(&mut ProvisioningKey) -> bool,
) -> Result<Option<Stored>, Error<O::Error>> {
    let Some(Stored::ProvisioningKey(mut pk)) = objects.get(Kind::ProvisioningKey, name) else {
        return Err(Error::NotFound);
    };
    if !change(&mut pk) {
        return Err(Error::Conflict);
    }
    pk.metadata.uid = None;
    objects
        .update(Stored::ProvisioningKey(pk))
        .map_err(Error::Store)?;
    Ok(objects.get(Kind::ProvisioningKey, name))
}
