//! Projected volumes as a kubelet mounts them: pod-bound ServiceAccount tokens (from the
//! TokenRequest API, with the source's audience and lifetime, bound to the pod by name and
//! uid), ConfigMap and Secret keys, and downward-API fields. On a current cluster the
//! ServiceAccount admission plugin adds one such volume (`kube-api-access-*`) to every pod;
//! a pod template may add its own with another audience.
//!
//! What to fetch and when to refresh are pure functions here; the requests are made by the
//! kubelet's worker.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{KeyToPath, Pod};
use k8s_openapi::jiff::Timestamp;

/// The kubelet's default token lifetime when a source names none (`expirationSeconds`).
pub(crate) const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// The kubelet refreshes a token once it is older than this share of its lifetime...
const REFRESH_AT: f64 = 0.8;
/// ...or older than a day, whichever comes first.
const REFRESH_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// One source of a projected volume.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Source {
    /// A ServiceAccount token bound to the pod, written to `path`.
    Token {
        /// `None`: the API server's own audiences (`--api-audiences`).
        audience: Option<String>,
        expiration_seconds: i64,
        path: PathBuf,
    },
    /// Keys of a ConfigMap of the pod's namespace.
    ConfigMap {
        name: String,
        items: Option<Vec<KeyToPath>>,
        optional: bool,
    },
    /// Keys of a Secret of the pod's namespace.
    Secret {
        name: String,
        items: Option<Vec<KeyToPath>>,
        optional: bool,
    },
    /// A field of the pod (`metadata.name`, `metadata.namespace`, `metadata.uid`,
    /// `spec.serviceAccountName`, `spec.nodeName`, `metadata.labels['k']`,
    /// `metadata.annotations['k']`), written to `path`.
    Field { field_path: String, path: PathBuf },
}

/// A pod volume of type `projected`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ProjectedVolume {
    pub volume: String,
    pub sources: Vec<Source>,
    pub default_mode: Option<i32>,
}

/// The pod's projected volumes, in pod order.
pub(crate) fn projected_volumes(pod: &Pod) -> Vec<ProjectedVolume> {
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    volumes
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let p = v.projected.as_ref()?;
            let mut sources = Vec::new();
            for s in p.sources.iter().flatten() {
                if let Some(t) = &s.service_account_token {
                    sources.push(Source::Token {
                        audience: t.audience.clone().filter(|a| !a.is_empty()),
                        expiration_seconds: t.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
                        path: PathBuf::from(&t.path),
                    });
                }
                if let Some(c) = &s.config_map {
                    sources.push(Source::ConfigMap {
                        name: c.name.clone(),
                        items: c.items.clone(),
                        optional: c.optional.unwrap_or(false),
                    });
                }
                if let Some(c) = &s.secret {
                    sources.push(Source::Secret {
                        name: c.name.clone(),
                        items: c.items.clone(),
                        optional: c.optional.unwrap_or(false),
                    });
                }
                if let Some(d) = &s.downward_api {
                    for item in d.items.iter().flatten() {
                        if let Some(f) = &item.field_ref {
                            sources.push(Source::Field {
                                field_path: f.field_path.clone(),
                                path: PathBuf::from(&item.path),
                            });
                        }
                    }
                }
            }
            Some(ProjectedVolume {
                volume: v.name.clone(),
                sources,
                default_mode: p.default_mode,
            })
        })
        .collect()
}

/// A downward-API field of the pod, as the kubelet renders it (`None`: not supported here).
pub(crate) fn field_value(pod: &Pod, field_path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let map_key = |prefix: &str| {
        field_path
            .strip_prefix(prefix)?
            .strip_suffix("']")
            .map(str::to_string)
    };
    match field_path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "metadata.labels" | "metadata.annotations" => {
            let map = if field_path == "metadata.labels" {
                meta.labels.clone()
            } else {
                meta.annotations.clone()
            };
            Some(
                map.unwrap_or_default()
                    .iter()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect(),
            )
        }
        _ => {
            if let Some(k) = map_key("metadata.labels['") {
                meta.labels.as_ref()?.get(&k).cloned()
            } else if let Some(k) = map_key("metadata.annotations['") {
                meta.annotations.as_ref()?.get(&k).cloned()
            } else {
                None
            }
        }
    }
}

/// The TokenRequest body for a token source bound to `pod` (by name and uid, as the kubelet
/// binds it).
pub(crate) fn token_request(
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "expirationSeconds": expiration_seconds,
        "boundObjectRef": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        },
    });
    if let Some(aud) = audience {
        spec["audiences"] = serde_json::json!([aud]);
    }
    serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": spec,
    })
}

/// When the kubelet refreshes a token issued at `issued` that expires at `expires`: at 80 %
/// of its lifetime, or after 24 hours, whichever comes first.
pub(crate) fn refresh_at(issued: Timestamp, expires: Timestamp) -> Timestamp {
    let ttl = expires.duration_since(issued).as_secs_f64().max(0.0);
    let by_share = Duration::from_secs_f64(ttl * REFRESH_AT);
    let after = by_share.min(REFRESH_MAX_AGE);
    issued.checked_add(after).unwrap_or(expires)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapProjection, DownwardAPIProjection, DownwardAPIVolumeFile, ObjectFieldSelector,
        PodSpec, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume, VolumeProjection,
    };
    use kube::api::ObjectMeta;

    /// The volume the ServiceAccount admission plugin adds, plus one with its own audience.
    fn pod() -> Pod {
        let api_access = ProjectedVolumeSource {
            default_mode: Some(0o644),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        expiration_seconds: Some(3607),
                        path: "token".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".into(),
                            path: "ca.crt".into(),
                            mode: None,
                        }]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                field_path: "metadata.namespace".into(),
                                api_version: Some("v1".into()),
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
        };
        let own = ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some("keyward".into()),
                    path: "keyward-token".into(),
                    expiration_seconds: None,
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some("p-1".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "a".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: Some(vec![
                    Volume {
                        name: "kube-api-access-x".into(),
                        projected: Some(api_access),
                        ..Default::default()
                    },
                    Volume {
                        name: "identity".into(),
                        projected: Some(own),
                        ..Default::default()
                    },
                ]),
                containers: vec![],
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn reads_the_admission_plugins_volume_and_an_audience() {
        let vols = projected_volumes(&pod());
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[0].volume, "kube-api-access-x");
        assert_eq!(vols[0].default_mode, Some(0o644));
        assert_eq!(
            vols[0].sources[0],
            Source::Token {
                audience: None,
                expiration_seconds: 3607,
                path: "token".into()
            }
        );
        assert!(
            matches!(&vols[0].sources[1], Source::ConfigMap { name, optional: false, .. } if name == "kube-root-ca.crt")
        );
        assert_eq!(
            vols[0].sources[2],
            Source::Field {
                field_path: "metadata.namespace".into(),
                path: "namespace".into()
            }
        );
        assert_eq!(
            vols[1].sources,
            vec![Source::Token {
                audience: Some("keyward".into()),
                expiration_seconds: DEFAULT_TOKEN_SECONDS,
                path: "keyward-token".into()
            }]
        );
    }

    #[test]
    fn downward_fields() {
        let p = pod();
        assert_eq!(field_value(&p, "metadata.name").as_deref(), Some("p-1"));
        assert_eq!(field_value(&p, "metadata.namespace").as_deref(), Some("ns"));
        assert_eq!(field_value(&p, "metadata.uid").as_deref(), Some("u-1"));
        assert_eq!(
            field_value(&p, "metadata.labels['app']").as_deref(),
            Some("a")
        );
        assert_eq!(
            field_value(&p, "metadata.labels").as_deref(),
            Some("app=\"a\"\n")
        );
        assert_eq!(field_value(&p, "metadata.labels['nope']"), None);
        assert_eq!(field_value(&p, "status.podIP"), None);
    }

    #[test]
    fn the_request_binds_the_token_to_the_pod() {
        let body = token_request(&pod(), Some("keyward"), 600);
        assert_eq!(body["kind"], "TokenRequest");
        assert_eq!(body["spec"]["audiences"], serde_json::json!(["keyward"]));
        assert_eq!(body["spec"]["expirationSeconds"], 600);
        assert_eq!(body["spec"]["boundObjectRef"]["kind"], "Pod");
        assert_eq!(body["spec"]["boundObjectRef"]["name"], "p-1");
        assert_eq!(body["spec"]["boundObjectRef"]["uid"], "u-1");
        // No audience: the server's own (the field is left out, not sent empty).
        assert!(
            token_request(&pod(), None, 600)["spec"]
                .get("audiences")
                .is_none()
        );
    }

    #[test]
    fn refresh_at_eighty_percent_or_a_day() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let hour = t0.checked_add(Duration::from_secs(3600)).unwrap();
        assert_eq!(
            refresh_at(t0, hour),
            t0.checked_add(Duration::from_secs(2880)).unwrap()
        );
        let week = t0.checked_add(Duration::from_secs(7 * 24 * 3600)).unwrap();
        assert_eq!(
            refresh_at(t0, week),
            t0.checked_add(Duration::from_secs(24 * 3600)).unwrap()
        );
        // An expiry before the issue time (a skewed clock) refreshes at once.
        assert_eq!(refresh_at(hour, t0), hour);
    }
}
