//! What the verifier knows, fed by its watches and read by every request: the ProvisioningKeys
//! (audience, issuer, publishDelay, the trust bundle's name and the key's UID) and the
//! Keyward-labelled trust-bundle ConfigMaps. Plain data, no client: the watch loop in
//! `watch.rs` applies events, the request handlers read.
//!
//! A bundle is used for key `<ns>/<name>` only when the ConfigMap is the one the key's trust
//! record names, is labelled with that key's name, and is controlled by that key (owner
//! reference with the key's UID). A ConfigMap that someone else labels to look like a bundle is
//! ignored. Of a bundle, only the key ids the trust record lists are trusted
//! ([`crate::trust_record`]): anyone who may patch the ConfigMap can add a JWK, nobody but the
//! operator can add its key id to the record.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use sha2::{Digest as _, Sha256};

use crate::api::ProvisioningKey;
use crate::keys::Jwks;
use crate::labels as l;
use crate::rotation::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, DEFAULT_PUBLISH_DELAY};
use crate::trust_record::TrustRecord;

/// A ProvisioningKey by namespace and name: what a token's `sub` names (`<ns>/<name>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyRef {
    pub namespace: String,
    pub name: String,
}

impl KeyRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        KeyRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `<namespace>/<name>` (both non-empty, one slash).
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| KeyRef::new(ns, name))
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the verifier takes from a ProvisioningKey: its trust record (the key ids the operator
/// minted, the bundle name, `aud` and `iss` it signs with, each key id's longest token
/// lifetime), and `publishDelay` from the spec (only a cache lifetime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyParams {
    pub uid: String,
    pub audience: String,
    pub issuer: String,
    pub publish_delay: Duration,
    pub trust_bundle: String,
    /// The recorded key ids, sorted, each with the longest token lifetime (seconds) the operator
    /// signed with it. Empty when the key has no readable record: nothing of it is trusted. A
    /// sorted slice, not a map: a key has one or two, and a one-entry `BTreeMap` allocates a
    /// node of eleven (about 370 bytes per key, 3.6 MiB at 10,000 keys).
    pub kids: Box<[(String, u64)]>,
    /// Whether the key has a readable trust record.
    pub recorded: bool,
    /// The static claims the operator signs (`spec.token.claims`), as recorded.
    pub claims: BTreeMap<String, String>,
    /// `spec.token.mode: ProofOfPossession`, as recorded: bearer tokens signed by the key are
    /// refused; only access tokens of the token endpoint pass.
    pub pop: bool,
}

impl KeyParams {
    /// The key's parameters: the trust record's, or (no readable record yet: the operator has
    /// not reconciled it since an upgrade) the spec's names with no key id trusted. A malformed
    /// `publishDelay`, which the operator refuses, counts as the default.
    pub fn of(pk: &ProvisioningKey) -> Self {
        let token = pk.spec.token.clone().unwrap_or_default();
        let publish_delay = pk
            .spec
            .rotation
            .as_ref()
            .and_then(|r| r.publish_delay.as_deref())
            .and_then(crate::rotation::parse_duration)
            .unwrap_or(DEFAULT_PUBLISH_DELAY);
        let uid = pk.metadata.uid.clone().unwrap_or_default();
        match TrustRecord::of(pk) {
            Some(Ok(r)) => KeyParams {
                uid,
                audience: r.aud,
                issuer: r.iss,
                publish_delay,
                trust_bundle: r.bundle,
                kids: r.kids.into_iter().collect(),
                recorded: true,
                claims: r.claims,
                pop: r.pop,
            },
            _ => KeyParams {
                uid,
                audience: token.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
                issuer: token.issuer.unwrap_or_else(|| DEFAULT_ISSUER.into()),
                publish_delay,
                trust_bundle: pk.trust_bundle_name(),
                kids: Box::default(),
                recorded: false,
                claims: BTreeMap::new(),
                pop: false,
            },
        }
    }

    /// Whether the record lists `kid`.
    pub fn trusts(&self, kid: &str) -> bool {
        self.recorded_ttl(kid).is_some()
    }

    /// The longest lifetime a token of `kid` may have (`exp - iat`), as recorded.
    pub fn ttl_of(&self, kid: &str) -> Duration {
        Duration::from_secs(self.recorded_ttl(kid).unwrap_or(0))
    }

    fn recorded_ttl(&self, kid: &str) -> Option<u64> {
        self.kids
            .binary_search_by(|(k, _)| k.as_str().cmp(kid))
            .ok()
            .map(|i| self.kids[i].1)
    }
}

/// One document of a bundle as served: the ConfigMap's bytes and their strong ETag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub body: String,
    pub etag: String,
}

impl Document {
    pub fn new(body: String) -> Self {
        let etag = etag_of(body.as_bytes());
        Document { body, etag }
    }
}

/// Strong ETag: the quoted base64url of the first 16 bytes of SHA-256 over the body.
pub fn etag_of(body: &[u8]) -> String {
    format!(
        "\"{}\"",
        URL_SAFE_NO_PAD.encode(&Sha256::digest(body)[..16])
    )
}

/// A parsed trust-bundle ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// The `keyward.dev/provisioning-key` label.
    pub key_name: String,
    /// UIDs of the ProvisioningKeys that control it (owner references with `controller: true`).
    pub owner_uids: Vec<String>,
    pub jwks: Jwks,
    pub revoked: Vec<String>,
    pub jwks_doc: Document,
    pub revoked_doc: Document,
}

/// Why a labelled ConfigMap is not a usable bundle (its name goes to the log, never its data).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("has no keyward.dev/provisioning-key label")]
    NoKeyLabel,
    #[error("jwks.json is missing or is not a JWKS")]
    Jwks,
    #[error("revoked.json is not a list of key ids")]
    Revoked,
}

impl Bundle {
    pub fn parse(cm: &ConfigMap) -> Result<Self, BundleError> {
        let key_name = cm
            .labels()
            .get(l::PROVISIONING_KEY)
            .cloned()
            .ok_or(BundleError::NoKeyLabel)?;
        let entry = |k: &str| cm.data.as_ref().and_then(|d| d.get(k));
        let jwks_body = entry(l::DATA_JWKS).cloned().ok_or(BundleError::Jwks)?;
        let jwks: Jwks = serde_json::from_str(&jwks_body).map_err(|_| BundleError::Jwks)?;
        let revoked_body = entry(l::DATA_REVOKED)
            .cloned()
            .unwrap_or_else(|| "[]".into());
        let revoked: Vec<String> =
            serde_json::from_str(&revoked_body).map_err(|_| BundleError::Revoked)?;
        let owner_uids = cm
            .owner_references()
            .iter()
            .filter(|o| o.kind == "ProvisioningKey" && o.controller == Some(true))
            .map(|o| o.uid.clone())
            .collect();
        Ok(Bundle {
            key_name,
            owner_uids,
            jwks,
            revoked,
            jwks_doc: Document::new(jwks_body),
            revoked_doc: Document::new(revoked_body),
        })
    }
}

/// A ProvisioningKey as the index keeps it: its reference and its parameters.
pub type KeyEntry = (KeyRef, KeyParams);

/// What the index keeps of `pk`. A watch's re-list reduces each object to this as it arrives,
/// so a list of 10,000 keys is never held as whole objects (spec, status, managed fields) at
/// once: memory that the allocator would keep long after the list.
pub fn key_entry(pk: &ProvisioningKey) -> KeyEntry {
    (
        KeyRef::new(pk.namespace().unwrap_or_default(), pk.name_any()),
        KeyParams::of(pk),
    )
}

/// A trust-bundle ConfigMap as the index keeps it: where it is, and the parsed bundle or why
/// it is unusable.
#[derive(Clone, Debug)]
pub struct BundleEntry {
    at: (String, String),
    parsed: Result<Bundle, BundleError>,
}

/// What the index keeps of `cm` (see [`key_entry`]).
pub fn bundle_entry(cm: &ConfigMap) -> BundleEntry {
    BundleEntry {
        at: (cm.namespace().unwrap_or_default(), cm.name_any()),
        parsed: Bundle::parse(cm),
    }
}

/// Everything the watches delivered. `None` namespace in a scope means all namespaces.
#[derive(Clone, Debug, Default)]
pub struct Index {
    keys: BTreeMap<KeyRef, KeyParams>,
    /// By namespace and ConfigMap name.
    bundles: BTreeMap<(String, String), Bundle>,
}

fn in_scope(ns: &str, scope: Option<&str>) -> bool {
    scope.is_none_or(|s| s == ns)
}

impl Index {
    pub fn apply_key(&mut self, pk: &ProvisioningKey) {
        let (key, params) = key_entry(pk);
        self.keys.insert(key, params);
    }

    pub fn delete_key(&mut self, pk: &ProvisioningKey) {
        self.keys.remove(&KeyRef::new(
            pk.namespace().unwrap_or_default(),
            pk.name_any(),
        ));
    }

    /// Replaces every key in `scope` with `keys` (a watch's re-list, each object already
    /// reduced by [`key_entry`]).
    pub fn replace_keys(&mut self, scope: Option<&str>, keys: Vec<KeyEntry>) {
        self.keys.retain(|k, _| !in_scope(&k.namespace, scope));
        self.keys.extend(keys);
    }

    /// Adds or replaces a bundle; an unusable one is removed, and the error says why.
    pub fn apply_bundle(&mut self, cm: &ConfigMap) -> Result<(), BundleError> {
        self.put_bundle(bundle_entry(cm))
    }

    fn put_bundle(&mut self, entry: BundleEntry) -> Result<(), BundleError> {
        match entry.parsed {
            Ok(b) => {
                self.bundles.insert(entry.at, b);
                Ok(())
            }
            Err(e) => {
                self.bundles.remove(&entry.at);
                Err(e)
            }
        }
    }

    pub fn delete_bundle(&mut self, cm: &ConfigMap) {
        self.bundles
            .remove(&(cm.namespace().unwrap_or_default(), cm.name_any()));
    }

    /// Replaces every bundle in `scope` with `bundles` (a watch's re-list, each ConfigMap
    /// already reduced by [`bundle_entry`]); returns the errors of unusable ones.
    pub fn replace_bundles(
        &mut self,
        scope: Option<&str>,
        bundles: Vec<BundleEntry>,
    ) -> Vec<(String, BundleError)> {
        self.bundles.retain(|(ns, _), _| !in_scope(ns, scope));
        bundles
            .into_iter()
            .filter_map(|entry| {
                let name = format!("{}/{}", entry.at.0, entry.at.1);
                self.put_bundle(entry).err().map(|e| (name, e))
            })
            .collect()
    }

    /// The key's parameters and its bundle: the ConfigMap its record names, labelled with its
    /// name and controlled by it. `None` when either is unknown or they do not belong together.
    /// The bundle is as written in the ConfigMap: trust only what [`KeyParams::trusts`] too.
    pub fn bundle(&self, key: &KeyRef) -> Option<(&KeyParams, &Bundle)> {
        let params = self.keys.get(key)?;
        let bundle = self
            .bundles
            .get(&(key.namespace.clone(), params.trust_bundle.clone()))?;
        (bundle.key_name == key.name && bundle.owner_uids.contains(&params.uid))
            .then_some((params, bundle))
    }

    /// What the reporter needs of a key: its UID (for the report's owner reference) and whether
    /// its bundle lists more than one key id (a rotation in flight). `None` when the key is
    /// unknown (deleted, or not watched).
    pub fn report_target(&self, key: &KeyRef) -> Option<(String, bool)> {
        let params = self.keys.get(key)?;
        let rotating = self.trusted_kids(key).is_some_and(|kids| kids.len() > 1);
        Some((params.uid.clone(), rotating))
    }

    /// The key ids the verifier trusts for `key`: those its bundle lists and its record too, in
    /// the bundle's order. `None` when the key or its bundle is unknown.
    pub fn trusted_kids(&self, key: &KeyRef) -> Option<Vec<String>> {
        let (params, bundle) = self.bundle(key)?;
        Some(
            bundle
                .jwks
                .key_ids()
                .into_iter()
                .filter(|k| params.trusts(k))
                .collect(),
        )
    }

    /// Number of usable bundles (for the log and readiness detail).
    pub fn usable(&self) -> usize {
        self.keys
            .keys()
            .filter(|k| self.bundle(k).is_some())
            .count()
    }
}
