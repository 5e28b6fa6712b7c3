//! Secret volumes: which a pod mounts, and their files on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Secret};

/// A pod volume backed by a Secret.
#[derive(Clone, Debug)]
pub(crate) struct SecretVolume {
    pub volume: String,
    pub secret: String,
    pub optional: bool,
    pub items: Option<Vec<KeyToPath>>,
    pub default_mode: Option<i32>,
}

pub(crate) fn secret_volumes(pod: &Pod) -> Vec<SecretVolume> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let s = v.secret.as_ref()?;
            Some(SecretVolume {
                volume: v.name.clone(),
                secret: s.secret_name.clone()?,
                optional: s.optional.unwrap_or(false),
                items: s.items.clone(),
                default_mode: s.default_mode,
            })
        })
        .collect()
}

/// A file to project: content and mode.
pub(crate) type Files = BTreeMap<PathBuf, (Vec<u8>, u32)>;

pub(crate) fn safe_relative(p: &str) -> Option<PathBuf> {
    let path = PathBuf::from(p);
    (!p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))).then_some(path)
}

/// The files `vol` should contain given the Secret (absent: `None`), as the kubelet projects
/// them: every key (or only `items`, at their paths), with `defaultMode` / item `mode`.
/// `Err` when the volume cannot be set up (a required Secret or key is missing).
pub(crate) fn project(vol: &SecretVolume, secret: Option<&Secret>) -> Result<Files, String> {
    let default_mode = vol.default_mode.unwrap_or(0o644) as u32;
    let Some(secret) = secret else {
        return if vol.optional {
            Ok(Files::new())
        } else {
            Err(format!("secret {:?} not found", vol.secret))
        };
    };
    let what = format!("secret {:?}", vol.secret);
    project_keys(
        &what,
        secret_data(secret),
        vol.items.as_deref(),
        vol.optional,
        default_mode,
    )
}

/// A Secret's `data`, as bytes.
pub(crate) fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

/// The files of a Secret's or ConfigMap's `data` (`what` names it in errors): every key, or
/// only `items` at their paths (a missing key is an error unless `optional`), with
/// `default_mode` or the item's `mode`.
pub(crate) fn project_keys(
    what: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
    default_mode: u32,
) -> Result<Files, String> {
    let mut files = Files::new();
    match items {
        None => {
            for (key, value) in data {
                let path = safe_relative(&key).ok_or_else(|| format!("bad key {key:?}"))?;
                files.insert(path, (value, default_mode));
            }
        }
        Some(items) => {
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    if optional {
                        continue;
                    }
                    return Err(format!("{what} has no key {:?}", item.key));
                };
                let path =
                    safe_relative(&item.path).ok_or_else(|| format!("bad path {:?}", item.path))?;
                let mode = item.mode.map_or(default_mode, |m| m as u32);
                files.insert(path, (value.clone(), mode));
            }
        }
    }
    Ok(files)
}

/// Makes `dir` hold `files`: each changed file is written to a temporary file in the same
/// directory and renamed over the old one (readers see the old or the new content, never a
/// mix); files of `previous` no longer wanted are removed. Returns whether anything changed.
pub(crate) fn sync_dir(
    dir: &Path,
    files: &Files,
    previous: &BTreeSet<PathBuf>,
) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let mut changed = false;
    for (rel, (content, mode)) in files {
        let path = dir.join(rel);
        let same = std::fs::read(&path).is_ok_and(|old| &old == content)
            && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode);
        if same {
            continue;
        }
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(parent)?;
        tmp.write_all(content)?;
        tmp.as_file().sync_all()?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(*mode))?;
        tmp.persist(&path).map_err(|e| e.error)?;
        changed = true;
    }
    for old in previous.difference(&files.keys().cloned().collect()) {
        match std::fs::remove_file(dir.join(old)) {
            Ok(()) => changed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(data: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    fn vol(optional: bool, items: Option<Vec<KeyToPath>>) -> SecretVolume {
        SecretVolume {
            volume: "v".into(),
            secret: "s".into(),
            optional,
            items,
            default_mode: None,
        }
    }

    #[test]
    fn projects_keys_items_and_missing_secrets() {
        let s = secret(&[("a", "1"), ("b", "2")]);
        let all = project(&vol(false, None), Some(&s)).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[Path::new("a")].0, b"1");
        let items = vec![KeyToPath {
            key: "b".into(),
            path: "sub/b.txt".into(),
            mode: Some(0o600),
        }];
        let some = project(&vol(false, Some(items)), Some(&s)).unwrap();
        assert_eq!(some[Path::new("sub/b.txt")], (b"2".to_vec(), 0o600));
        assert!(project(&vol(false, None), None).is_err());
        assert!(project(&vol(true, None), None).unwrap().is_empty());
        let missing = vec![KeyToPath {
            key: "zz".into(),
            path: "zz".into(),
            mode: None,
        }];
        assert!(project(&vol(false, Some(missing)), Some(&s)).is_err());
    }

    #[test]
    fn sync_rewrites_changed_and_removes_dropped_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = project(&vol(false, None), Some(&secret(&[("a", "1"), ("b", "2")]))).unwrap();
        assert!(sync_dir(dir.path(), &first, &BTreeSet::new()).unwrap());
        assert!(!sync_dir(dir.path(), &first, &first.keys().cloned().collect()).unwrap());
        let second = project(&vol(false, None), Some(&secret(&[("a", "3")]))).unwrap();
        assert!(sync_dir(dir.path(), &second, &first.keys().cloned().collect()).unwrap());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"3");
        assert!(!dir.path().join("b").exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }
}
