//! The connectivity check and rollout pacing of a PolicyAgent, resolved from its spec (pure).

use std::time::Duration;

use crate::api::policy_agent::{CheckMode, CheckVia, PolicyAgent, Scheme};

pub const DEFAULT_PATH: &str = "/health?bundles=true";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(2);
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 2;

/// The check settings resolved from the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub mode: CheckMode,
    pub port: i32,
    pub path: String,
    pub scheme: Scheme,
    pub timeout: Duration,
    pub period: Duration,
    /// Required consecutive successes per pod; 0 in `RolloutOnly` and `Acknowledgement` modes.
    pub success_threshold: u32,
    /// Each pod must be acknowledged by a verifier (mode `Acknowledgement`, or
    /// `requireAcknowledgement` with `Http`).
    pub acknowledgement: bool,
    pub via: CheckVia,
    pub min_roll_interval: Duration,
}

fn dur(
    field: &str,
    v: Option<&String>,
    default: Duration,
) -> std::result::Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => crate::rotation::parse_duration(s).ok_or_else(|| {
            format!("{field}: {s:?} is not a duration (use Go syntax such as 2s or 1m)")
        }),
    }
}

/// Resolve and validate the PolicyAgent's spec (the operator enforces every schema rule too).
/// The error is the message of `Ready=False` (`InvalidSpec`).
pub fn resolve_check(pa: &PolicyAgent) -> std::result::Result<Check, String> {
    let cc = pa.spec.connectivity_check.clone().unwrap_or_default();
    // An agent outside the cluster has no pod to check: the verifiers' acknowledgement alone.
    let external =
        pa.spec.workload_ref.kind == crate::api::policy_agent::WorkloadKind::ServiceAccount;
    if external && cc.mode.is_some_and(|m| m != CheckMode::Acknowledgement) {
        return Err(
            "workloadRef.kind ServiceAccount (an agent outside the cluster) is confirmed by acknowledgement only: leave connectivityCheck.mode unset or set it to Acknowledgement"
                .into(),
        );
    }
    let mode = match cc.mode {
        None if external => CheckMode::Acknowledgement,
        m => m.unwrap_or_default(),
    };
    let http = cc.http.clone();
    if mode == CheckMode::Http && http.is_none() {
        return Err(
            "connectivityCheck.http is required when connectivityCheck.mode is Http (the default)"
                .into(),
        );
    }
    if mode != CheckMode::Http && cc.require_acknowledgement == Some(true) {
        return Err(
            "connectivityCheck.requireAcknowledgement applies to mode Http; use mode Acknowledgement for the acknowledgement alone"
                .into(),
        );
    }
    let http = http.unwrap_or_default();
    if mode == CheckMode::Http && !(1..=65535).contains(&http.port) {
        return Err(format!(
            "connectivityCheck.http.port: {} is not a port",
            http.port
        ));
    }
    let path = http
        .path
        .clone()
        .unwrap_or_else(|| DEFAULT_PATH.to_string());
    if !path.starts_with('/') {
        return Err("connectivityCheck.http.path must start with /".into());
    }
    let threshold = http
        .success_threshold
        .map_or(DEFAULT_SUCCESS_THRESHOLD, |t| {
            u32::try_from(t.clamp(1, 100)).unwrap_or(1)
        });
    let rollout = pa.spec.rollout.clone().unwrap_or_default();
    Ok(Check {
        mode,
        port: http.port,
        path,
        scheme: http.scheme.unwrap_or_default(),
        timeout: dur(
            "connectivityCheck.http.timeout",
            http.timeout.as_ref(),
            DEFAULT_TIMEOUT,
        )?,
        period: dur(
            "connectivityCheck.http.period",
            http.period.as_ref(),
            DEFAULT_PERIOD,
        )?,
        success_threshold: if mode == CheckMode::Http {
            threshold
        } else {
            0
        },
        acknowledgement: mode == CheckMode::Acknowledgement
            || (mode == CheckMode::Http && cc.require_acknowledgement == Some(true)),
        via: http.via.unwrap_or_default(),
        min_roll_interval: dur(
            "rollout.minInterval",
            rollout.min_interval.as_ref(),
            Duration::ZERO,
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_spec_validation() {
        let mut pa = PolicyAgent::new("a", Default::default());
        assert!(resolve_check(&pa).unwrap_err().contains("http is required"));
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: Some(CheckMode::RolloutOnly),
            ..Default::default()
        });
        assert_eq!(resolve_check(&pa).unwrap().success_threshold, 0);
        assert!(!resolve_check(&pa).unwrap().acknowledgement);
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: Some(CheckMode::Acknowledgement),
            ..Default::default()
        });
        let c = resolve_check(&pa).unwrap();
        assert_eq!((c.success_threshold, c.acknowledgement), (0, true));
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: Some(CheckMode::RolloutOnly),
            require_acknowledgement: Some(true),
            ..Default::default()
        });
        assert!(
            resolve_check(&pa)
                .unwrap_err()
                .contains("requireAcknowledgement")
        );
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: None,
            http: Some(crate::api::policy_agent::HttpCheck {
                port: 8181,
                ..Default::default()
            }),
            require_acknowledgement: Some(true),
        });
        let c = resolve_check(&pa).unwrap();
        assert_eq!((c.success_threshold, c.acknowledgement), (2, true));
        pa.spec.connectivity_check = Some(crate::api::policy_agent::ConnectivityCheck {
            mode: None,
            http: Some(crate::api::policy_agent::HttpCheck {
                port: 8181,
                timeout: Some("2 seconds".into()),
                ..Default::default()
            }),
            require_acknowledgement: None,
        });
        assert!(resolve_check(&pa).unwrap_err().contains("timeout"));
    }
}
