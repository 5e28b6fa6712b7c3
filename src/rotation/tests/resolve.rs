//! `Settings::resolve`: defaults, explicit values, and every error.

use super::*;

#[test]
fn resolve_defaults() {
    let s = Settings::resolve(&pk(ProvisioningKeySpec::default()), &Floors::default())
        .expect("the empty spec is valid");
    assert_eq!(
        s,
        Settings {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
            include_private_key: false,
            proof_of_possession: false,
            interval: None,
            min_interval: crate::rotation::settings::DEFAULT_MIN_INTERVAL,
            publish_delay: crate::rotation::settings::DEFAULT_PUBLISH_DELAY,
            overlap: crate::rotation::settings::DEFAULT_OVERLAP,
            confirmation_timeout: crate::rotation::settings::DEFAULT_CONFIRMATION_TIMEOUT,
            revoke_when_unused_for: None,
            retain_deactivated_for: Duration::from_secs(24 * 3600),
            claims: Default::default(),
            window: None,
            request_token: None,
            token_ttl: crate::rotation::settings::DEFAULT_TOKEN_TTL,
            audience: "keyward:/demo".into(), // per key (no namespace here)
            issuer: "keyward".into(),
            suspend: false,
            compromised: BTreeSet::new(),
            clock_skew: secs(60),
            uid: String::new(),
            refused: None,
        }
    );
    assert_eq!(s.min_interval, secs(60));
    assert_eq!(s.publish_delay, secs(120));
    assert_eq!(s.overlap, secs(600));
    assert_eq!(s.confirmation_timeout, secs(900));
    assert_eq!(s.token_ttl, secs(3600));
}

#[test]
fn resolve_explicit_values() {
    let good = "A".repeat(40) + "b-_";
    let spec = ProvisioningKeySpec {
        secret_name: some("agents"),
        include_private_key: Some(true),
        rotation: Some(RotationSpec {
            interval: some("720h"),
            min_interval: some("90s"),
            publish_delay: some("1m30s"),
            overlap: some("0.5h"),
            confirmation_timeout: some("5m"),
            revoke_when_unused_for: some("5m"),
            retain_deactivated_for: some("1h"),
            max_concurrent_rolls: Some(10),
            window: Some(crate::api::provisioning_key::RotationWindow {
                days: vec![crate::api::provisioning_key::Weekday::Mon],
                start: "22:00".into(),
                end: "02:00".into(),
                time_zone: some("Europe/Berlin"),
            }),
            request_token: some("r1"),
        }),
        token: Some(TokenSpec {
            audience: some("cp"),
            ttl: some("10m"),
            issuer: some("me"),
            claims: [("scope".to_string(), "bundles:read".to_string())].into(),
            mode: None,
        }),
        trust_bundle: Some(TrustBundleSpec {
            config_map_name: some("bundle"),
            namespace_selector: None,
        }),
        suspend: Some(true),
        compromised_keys: vec![CompromisedKeyId(good.clone())],
        ..Default::default()
    };
    let s = Settings::resolve(&pk(spec), &Floors::default()).expect("valid spec");
    assert_eq!(s.secret_name, "agents");
    assert_eq!(s.trust_bundle_name, "bundle");
    assert!(s.include_private_key);
    assert_eq!(s.interval, Some(secs(720 * 3600)));
    assert_eq!(s.min_interval, secs(90));
    assert_eq!(s.publish_delay, secs(90));
    assert_eq!(s.overlap, secs(1800));
    assert_eq!(s.confirmation_timeout, secs(300));
    assert_eq!(s.revoke_when_unused_for, Some(secs(300)));
    assert_eq!(s.retain_deactivated_for, secs(3600));
    let w = s.window.as_ref().expect("a window");
    assert_eq!(
        (w.days[0], w.days[1], w.tz),
        (true, false, chrono_tz::Tz::Europe__Berlin)
    );
    assert_eq!(s.request_token.as_deref(), Some("r1"));
    assert_eq!(s.token_ttl, secs(600));
    assert_eq!((s.audience.as_str(), s.issuer.as_str()), ("cp", "me"));
    assert_eq!(
        s.claims.get("scope").map(String::as_str),
        Some("bundles:read")
    );
    assert!(s.suspend);
    assert_eq!(s.compromised, BTreeSet::from([good]));
}

#[test]
fn resolve_errors() {
    let bad_kid = |k: &str| ProvisioningKeySpec {
        compromised_keys: vec![CompromisedKeyId(k.into())],
        ..Default::default()
    };
    let cases: Vec<(&str, ProvisioningKeySpec, Floors, &str, &str)> = vec![
        (
            "an unknown time zone",
            rotation(|r| {
                r.window = Some(crate::api::provisioning_key::RotationWindow {
                    start: "09:00".into(),
                    end: "17:00".into(),
                    time_zone: some("Europe/Atlantis"),
                    ..Default::default()
                })
            }),
            Floors::none(),
            "InvalidSpec",
            "rotation.window",
        ),
        (
            "a reserved claim",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    claims: [("sub".to_string(), "someone-else".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token.claims",
        ),
        (
            "a claim name with a space",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    claims: [("my scope".to_string(), "x".to_string())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token.claims",
        ),
        (
            "words",
            rotation(|r| r.interval = some("10 minutes")),
            Floors::none(),
            "MalformedDuration",
            "rotation.interval",
        ),
        (
            "negative",
            rotation(|r| r.min_interval = some("-5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.minInterval",
        ),
        (
            "no unit",
            rotation(|r| r.overlap = some("600")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "empty",
            rotation(|r| r.publish_delay = some("")),
            Floors::none(),
            "MalformedDuration",
            "rotation.publishDelay",
        ),
        (
            "bare zero",
            rotation(|r| r.publish_delay = some("0")),
            Floors::none(),
            "MalformedDuration",
            "rotation.publishDelay",
        ),
        (
            "plus sign",
            rotation(|r| r.overlap = some("+5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "leading dot",
            rotation(|r| r.overlap = some(".5h")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "negative component",
            rotation(|r| r.overlap = some("1h-5m")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "overflow",
            rotation(|r| r.overlap = some("99999999999999999999h")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "unknown unit",
            rotation(|r| r.overlap = some("5x")),
            Floors::none(),
            "MalformedDuration",
            "rotation.overlap",
        ),
        (
            "bad confirmationTimeout",
            rotation(|r| r.confirmation_timeout = some("soon")),
            Floors::none(),
            "MalformedDuration",
            "rotation.confirmationTimeout",
        ),
        (
            "bad ttl",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1d"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "MalformedDuration",
            "token.ttl",
        ),
        (
            "interval below floor",
            rotation(|r| r.interval = some("30m")),
            Floors::default(),
            "BelowFloor",
            "rotation.interval",
        ),
        (
            "minInterval below floor",
            rotation(|r| r.min_interval = some("10s")),
            Floors::default(),
            "BelowFloor",
            "rotation.minInterval",
        ),
        (
            "overlap below floor",
            rotation(|r| r.overlap = some("30s")),
            Floors::default(),
            "BelowFloor",
            "rotation.overlap",
        ),
        (
            "ttl below floor",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1m"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::default(),
            "BelowFloor",
            "token.ttl",
        ),
        (
            "short kid",
            bad_kid("abc"),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "kid with bad characters",
            bad_kid(&format!("{}+/", "A".repeat(41))),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "kid too long",
            bad_kid(&"A".repeat(44)),
            Floors::none(),
            "InvalidSpec",
            "compromisedKeys",
        ),
        (
            "bad secretName",
            ProvisioningKeySpec {
                secret_name: some("Bad_Name"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "bad configMapName",
            ProvisioningKeySpec {
                trust_bundle: Some(TrustBundleSpec {
                    config_map_name: some("-x"),
                    namespace_selector: None,
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "trustBundle.configMapName",
        ),
        (
            "interval above its ceiling",
            rotation(|r| r.interval = some("8785h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.interval",
        ),
        (
            "minInterval above its ceiling",
            rotation(|r| r.min_interval = some("721h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.minInterval",
        ),
        (
            "publishDelay above its ceiling",
            rotation(|r| r.publish_delay = some("24h1s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.publishDelay",
        ),
        (
            "overlap of 10^12 seconds",
            rotation(|r| r.overlap = some("1000000000000s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.overlap",
        ),
        (
            "confirmationTimeout in days",
            rotation(|r| r.confirmation_timeout = some("30d")),
            Floors::none(),
            "MalformedDuration",
            "rotation.confirmationTimeout",
        ),
        (
            "confirmationTimeout above its ceiling",
            rotation(|r| r.confirmation_timeout = some("720h0.001s")),
            Floors::none(),
            "InvalidSpec",
            "rotation.confirmationTimeout",
        ),
        (
            "revokeWhenUnusedFor above its ceiling",
            rotation(|r| r.revoke_when_unused_for = some("100000h")),
            Floors::none(),
            "InvalidSpec",
            "rotation.revokeWhenUnusedFor",
        ),
        (
            "ttl above its ceiling",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("25h"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token.ttl",
        ),
        (
            "ttl written as 1e12s",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: some("1e12s"),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "MalformedDuration",
            "token.ttl",
        ),
        (
            "secretName of a key Secret's form",
            ProvisioningKeySpec {
                secret_name: some("demo-k2"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "secretName of another key's key Secret",
            ProvisioningKeySpec {
                secret_name: some("other-k17"),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "secretName",
        ),
        (
            "reserved template label",
            template(&[("keyward.dev/key-id", "forged")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "managed-by template label",
            template(&[("app.kubernetes.io/managed-by", "me")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label key",
            template(&[("team name", "a")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label prefix",
            template(&[("Example.com/team", "a")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template label value",
            template(&[("team", "pay ments")], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "template label value too long",
            template(&[("team", &"a".repeat(64))], &[]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.labels",
        ),
        (
            "invalid template annotation key",
            template(&[], &[("a/b/c", "x")]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "reserved template annotation",
            template(&[], &[("keyward.dev/handed-out-at", "x")]),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "template annotations too large",
            template(
                &[],
                &[
                    ("a.example/one", &"x".repeat(128 * 1024)),
                    ("a.example/two", &"x".repeat(128 * 1024)),
                ],
            ),
            Floors::none(),
            "InvalidSpec",
            "secretTemplate.annotations",
        ),
        (
            "empty audience",
            ProvisioningKeySpec {
                token: Some(TokenSpec {
                    audience: some(""),
                    ..Default::default()
                }),
                ..Default::default()
            },
            Floors::none(),
            "InvalidSpec",
            "token",
        ),
    ];
    let mut failures = Vec::new();
    for (name, spec, floors, reason, field) in cases {
        match Settings::resolve(&pk(spec), &floors) {
            Ok(s) => failures.push(format!(
                "{name}: expected {reason} on {field}, resolved to {s:?}"
            )),
            Err(e) => {
                let got_field = match &e {
                    SpecError::MalformedDuration { field, .. }
                    | SpecError::BelowFloor { field, .. }
                    | SpecError::AboveCeiling { field, .. }
                    | SpecError::Invalid { field, .. }
                    | SpecError::NameChanged { field, .. } => *field,
                };
                if e.reason() != reason || got_field != field {
                    failures.push(format!(
                        "{name}: expected {reason} on {field}, got {} on {got_field}: {e}",
                        e.reason()
                    ));
                }
                if !e.to_string().starts_with(field) {
                    failures.push(format!("{name}: message does not name the field: {e}"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
