//! `Settings::resolve`, continued: refused names, ceilings and floors, the secret template (the
//! valid entries kept, the last good settings kept on an invalid one), Go durations.

use super::*;

/// Names the operator refuses that a spec cannot express: the ProvisioningKey's own name (a
/// label value, at most 63 characters) and a default agent Secret name of a key Secret's form.
#[test]
fn resolve_refuses_names() {
    let named = |name: &str, spec: ProvisioningKeySpec| ProvisioningKey::new(name, spec);
    /// The refusal expected: the field the message starts with, and words it contains.
    type Refused<'a> = Option<(&'a str, &'a str)>;
    let cases: Vec<(&str, ProvisioningKey, Refused)> = vec![
        (
            "63 characters",
            named(&"a".repeat(63), Default::default()),
            None,
        ),
        (
            "64 characters",
            named(&"a".repeat(64), Default::default()),
            Some(("metadata.name", "at most 63")),
        ),
        (
            "own name of a key Secret's form",
            named("a-k2", Default::default()),
            Some(("secretName", "set spec.secretName")),
        ),
        (
            "own name of a key Secret's form, with a secretName",
            named(
                "a-k2",
                ProvisioningKeySpec {
                    secret_name: some("agents-a"),
                    ..Default::default()
                },
            ),
            None,
        ),
        (
            "k8s is not a sequence",
            named("opa-k8s", Default::default()),
            None,
        ),
    ];
    for (what, pk, expected) in cases {
        match (Settings::resolve(&pk, &Floors::none()), expected) {
            (Ok(_), None) => {}
            (Err(e), Some((field, words))) => {
                assert_eq!(e.reason(), "InvalidSpec", "{what}: {e}");
                let msg = e.to_string();
                assert!(
                    msg.starts_with(field) && msg.contains(words),
                    "{what}: {msg}"
                );
            }
            (got, want) => panic!("{what}: expected {want:?}, got {got:?}"),
        }
    }
}

/// The ceilings: exactly at each is accepted, just above is `InvalidSpec` naming the field, the
/// value and the ceiling (the same constants the CRD's CEL rules are generated from).
#[test]
fn resolve_ceilings() {
    use crate::api::limits;
    let with = |field: &str, value: &str| -> ProvisioningKeySpec {
        let v = some(value);
        match field {
            "token.ttl" => ProvisioningKeySpec {
                token: Some(TokenSpec {
                    ttl: v,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "rotation.interval" => rotation(|r| r.interval = v),
            "rotation.minInterval" => rotation(|r| r.min_interval = v),
            "rotation.publishDelay" => rotation(|r| r.publish_delay = v),
            "rotation.overlap" => rotation(|r| r.overlap = v),
            "rotation.confirmationTimeout" => rotation(|r| r.confirmation_timeout = v),
            "rotation.revokeWhenUnusedFor" => rotation(|r| r.revoke_when_unused_for = v),
            "rotation.retainDeactivatedFor" => rotation(|r| r.retain_deactivated_for = v),
            other => panic!("no field {other}"),
        }
    };
    for c in limits::CEILINGS {
        let at = format!("{}h", c.hours);
        Settings::resolve(&pk(with(c.field, &at)), &Floors::none())
            .unwrap_or_else(|e| panic!("{}: {at} refused: {e}", c.field));
        let minutes = format!("{}m", c.hours * 60 - 1);
        Settings::resolve(&pk(with(c.field, &minutes)), &Floors::none())
            .unwrap_or_else(|e| panic!("{}: {minutes} refused: {e}", c.field));
        for above in [format!("{}h1s", c.hours), "1000000000000s".to_string()] {
            let e = Settings::resolve(&pk(with(c.field, &above)), &Floors::none())
                .expect_err("above the ceiling");
            assert_eq!(
                e,
                SpecError::AboveCeiling {
                    field: c.field,
                    value: above.clone(),
                    ceiling: at.clone(),
                }
            );
            assert_eq!(e.reason(), "InvalidSpec");
            assert_eq!(
                e.to_string(),
                format!("{}: {above} is above the ceiling of {at}", c.field)
            );
        }
    }
}

/// An invalid `secretTemplate` is refused, and what the agent Secret gets meanwhile is its valid
/// part only (so its writes never fail with 422); a valid template is copied whole.
#[test]
fn usable_template_keeps_the_valid_entries() {
    use crate::rotation::settings::usable_template;
    let spec = template(
        &[
            ("team", "payments"),
            ("bad key", "x"),
            ("tier", "bad value"),
            ("keyward.dev/x", "y"),
        ],
        &[
            ("team.example/contact", "a@b"),
            ("a/b/c", "x"),
            ("keyward.dev/key-id", "forged"),
        ],
    );
    let t = spec.secret_template.clone().unwrap_or_default();
    let kept = usable_template(&t);
    assert_eq!(kept.labels.keys().collect::<Vec<_>>(), ["team"]);
    assert_eq!(
        kept.annotations.keys().collect::<Vec<_>>(),
        ["team.example/contact"]
    );
    let valid = template(
        &[("team", "payments"), ("empty", "")],
        &[("note", "any value at all")],
    );
    let t = valid.secret_template.clone().unwrap_or_default();
    assert_eq!(usable_template(&t), t);
    Settings::resolve(&pk(valid), &Floors::none()).expect("a valid template");
    // Too large together: no user annotation at all.
    let big = template(
        &[("team", "payments")],
        &[
            ("a.example/one", &"x".repeat(200 * 1024)),
            ("a.example/two", &"x".repeat(100 * 1024)),
        ],
    );
    let kept = usable_template(&big.secret_template.clone().unwrap_or_default());
    assert!(kept.annotations.is_empty());
    assert_eq!(kept.labels.len(), 1);
}

/// A refused template goes through `resolve_or_keep` like every refusal: the key keeps being
/// served with the last good settings, `Ready=False InvalidSpec`.
#[test]
fn an_invalid_template_keeps_the_last_good_settings() {
    let last = LastGood {
        names: Some(Names {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
        }),
        token_ttl: Some(secs(600)),
        ..Default::default()
    };
    let s = resolve_or_keep(
        &pk(template(&[("keyward.dev/provisioning-key", "other")], &[])),
        &Floors::none(),
        &last,
    );
    let refused = s.refused.expect("refused");
    assert_eq!(refused.reason, "InvalidSpec");
    assert!(
        refused.message.contains("secretTemplate.labels")
            && refused.message.contains("keyward.dev/provisioning-key")
            && refused.message.contains("still served"),
        "{}",
        refused.message
    );
    assert_eq!(s.token_ttl, secs(600));
    assert_eq!(s.secret_name, "demo");
}

/// Writing a default name explicitly on a live key is no change: the recorded names are the
/// effective ones. Setting another name is refused (`NameImmutable`).
#[test]
fn an_explicit_default_name_is_no_change() {
    let last = LastGood {
        names: Some(Names {
            secret_name: "demo".into(),
            trust_bundle_name: "demo-trust".into(),
        }),
        ..Default::default()
    };
    let explicit = ProvisioningKeySpec {
        secret_name: some("demo"),
        trust_bundle: Some(TrustBundleSpec {
            config_map_name: some("demo-trust"),
            namespace_selector: None,
        }),
        ..Default::default()
    };
    let s = resolve_or_keep(&pk(explicit), &Floors::none(), &last);
    assert_eq!(s.refused, None);
    let other = ProvisioningKeySpec {
        secret_name: some("agents"),
        ..Default::default()
    };
    let s = resolve_or_keep(&pk(other), &Floors::none(), &last);
    assert_eq!(s.refused.map(|r| r.reason), Some("NameImmutable"));
    assert_eq!(s.secret_name, "demo");
}

#[test]
fn resolve_accepts_go_durations() {
    for (value, expected) in [
        ("720h", secs(720 * 3600)),
        ("1h30m", secs(5400)),
        ("0.5h", secs(1800)),
        ("90s", secs(90)),
        ("1.5s", Duration::from_millis(1500)),
        ("500ms", Duration::from_millis(500)),
        ("10us", Duration::from_micros(10)),
        ("10µs", Duration::from_micros(10)),
        ("7ns", Duration::from_nanos(7)),
        ("0s", Duration::ZERO),
        ("1m1m", secs(120)),
    ] {
        let s = Settings::resolve(&pk(rotation(|r| r.overlap = some(value))), &Floors::none());
        assert_eq!(s.map(|s| s.overlap), Ok(expected), "{value:?}");
    }
}

#[test]
fn resolve_floors() {
    // The interval floor is what BelowFloor reports.
    let e = Settings::resolve(
        &pk(rotation(|r| r.interval = some("30m"))),
        &Floors::default(),
    )
    .expect_err("below the default 1h floor");
    assert_eq!(
        e,
        SpecError::BelowFloor {
            field: "rotation.interval",
            value: "30m".into(),
            floor: "1h".into()
        }
    );
    assert_eq!(e.reason(), "BelowFloor");
    // Exactly at the floor is accepted; without floors a second is accepted.
    let s = Settings::resolve(
        &pk(rotation(|r| r.interval = some("1h"))),
        &Floors::default(),
    )
    .expect("at the floor");
    assert_eq!(s.interval, Some(secs(3600)));
    let s = Settings::resolve(&pk(rotation(|r| r.interval = some("1s"))), &Floors::none())
        .expect("no floor");
    assert_eq!(s.interval, Some(secs(1)));
    // A floor above a default raises the default.
    let floors = Floors {
        overlap: secs(3600),
        ..Floors::default()
    };
    let s = Settings::resolve(&pk(ProvisioningKeySpec::default()), &floors).expect("defaults");
    assert_eq!(s.overlap, secs(3600));
    // Zero durations are durations.
    let s = Settings::resolve(
        &pk(rotation(|r| r.publish_delay = some("0s"))),
        &Floors::default(),
    )
    .expect("0s");
    assert_eq!(s.publish_delay, Duration::ZERO);
}
