//! The write each step makes (`rotation::write::of`): one row per step kind, with its verb,
//! object, precondition and changes. Both executors (the controller's and the in-memory one)
//! carry out exactly these.

use super::*;
use crate::labels as l;
use crate::rotation::observe::{KeyRef, KeySecrets};
use crate::rotation::snapshot::Read;
use crate::rotation::write::{self, Exists, Object, Write};

fn demo() -> ProvisioningKey {
    let mut pk = ProvisioningKey::new("demo", Default::default());
    pk.metadata.namespace = Some("ns".into());
    pk.metadata.uid = Some("u1".into());
    pk.metadata.resource_version = Some("5".into());
    pk
}

/// Key 1 active (handed out), key 2 published; every object read at a resourceVersion.
fn read(agent: AgentSecretObs, bundle_rv: Option<&str>) -> Read {
    let mut o = obs(vec![key(1, Active), key(2, Published)]);
    o.agent_secret = agent;
    let refs = [1u32, 2]
        .into_iter()
        .map(|seq| {
            let r = KeyRef {
                resource_version: format!("1{seq}"),
                public_pem: key_pair(seq).public_key().to_spki_pem(),
            };
            (seq, r)
        })
        .collect();
    Read {
        settings: settings(),
        observed: o,
        secrets: KeySecrets {
            refs,
            ..Default::default()
        },
        bundle_jwks: BTreeMap::new(),
        bundle_rv: bundle_rv.map(str::to_string),
        agent_secret_rv: Some("9".into()),
    }
}

/// A write in one line: verb, object, precondition and what it sets.
fn shape(w: &Write) -> String {
    match w {
        Write::Create { object, exists } => format!("create {} ({exists:?})", object.name()),
        Write::Patch(p) => format!(
            "patch {} at {}: labels {:?}, annotations {:?}{}{}",
            p.name,
            p.resource_version,
            p.labels,
            p.annotations.keys().collect::<Vec<_>>(),
            if p.remove_annotations.is_empty() {
                String::new()
            } else {
                format!(", removed {:?}", p.remove_annotations)
            },
            if p.drop_private {
                ", private key dropped"
            } else {
                ""
            }
        ),
        Write::Apply { object } => {
            let rv = match object {
                Object::Secret(s) => s.metadata.resource_version.clone(),
                Object::ConfigMap(c) => c.metadata.resource_version.clone(),
            };
            format!("apply {} at {rv:?}", object.name())
        }
        Write::Record {
            name,
            uid,
            resource_version,
            was,
            ..
        } => format!("record in {name}'s status at {resource_version} (uid {uid}), was {was:?}"),
        Write::RemoveAnnotation {
            name,
            resource_version,
            key,
        } => format!("remove annotation {key} of {name} at {resource_version}"),
        Write::Delete {
            name,
            resource_version,
        } => format!("delete {name} at {resource_version}"),
    }
}

fn write_of(step: &Step, read: &Read, key: Option<u32>) -> Result<Option<String>, String> {
    let pair = key.map(key_pair);
    let inputs = write::Inputs {
        pk: &demo(),
        read,
        now: now(),
        key: pair.as_ref(),
        jti: "j",
    };
    write::of(step, &inputs)
        .map(|w| w.as_ref().map(shape))
        .map_err(|e| e.to_string())
}

#[test]
fn each_step_makes_one_write_with_its_precondition() {
    let owned = obs(vec![key(1, Active)]).agent_secret;
    let r = read(owned.clone(), Some("7"));
    let state = |s: &str| format!("{{\"{}\": \"{s}\"}}", l::KEY_STATE);
    let mint = Step::Mint {
        seq: 3,
        trigger: Trigger::Interval,
        consumed_request_token: None,
        consumed_annotation: None,
        active: false,
    };
    let record = Step::WriteRecord {
        record: sim_record(&settings(), &[1, 2]),
    };
    let bundle = Step::WriteBundle {
        trusted: vec![kid(1), kid(2)],
        revoked: vec![],
    };
    let hand_out = Step::HandOut {
        seq: 1,
        reason: HandOutReason::TokenRefresh,
    };
    #[rustfmt::skip]
    let rows: Vec<(&str, Step, Option<u32>, String)> = vec![
        ("mint creates the key Secret; an existing one of ours is the same mint",
            mint, Some(3), "create demo-k3 (SameIfControlledBy(\"u1\"))".into()),
        ("mark-published moves the state only",
            Step::MarkPublished { seq: 2 }, None,
            format!("patch demo-k2 at 12: labels {}, annotations []", state("published"))),
        ("record-published stamps the publication",
            Step::RecordPublished { seq: 2 }, None,
            format!("patch demo-k2 at 12: labels {}, annotations [\"{}\"]", state("published"), l::PUBLISHED_AT)),
        ("activate stamps the activation",
            Step::Activate { seq: 2, emergency: false }, None,
            format!("patch demo-k2 at 12: labels {}, annotations [\"{}\"]", state("active"), l::ACTIVATED_AT)),
        ("retire stamps the retirement and the last token's expiry",
            Step::Retire { seq: 1 }, None,
            format!("patch demo-k1 at 11: labels {}, annotations [\"{}\", \"{}\"]", state("retiring"), l::LAST_TOKEN_EXP, l::RETIRED_AT)),
        ("destroy drops the private key",
            Step::Destroy { seq: 1, emergency: false }, None,
            format!("patch demo-k1 at 11: labels {}, annotations [\"{}\"], private key dropped", state("destroyed"), l::REVOKED_AT)),
        ("deactivate keeps the private key",
            Step::Deactivate { seq: 1 }, None,
            format!("patch demo-k1 at 11: labels {}, annotations [\"{}\"]", state("deactivated"), l::DEACTIVATED_AT)),
        ("reactivate stamps it, records the request served, and removes the deactivation",
            Step::Reactivate { seq: 1, request: "r".into() }, None,
            format!("patch demo-k1 at 11: labels {}, annotations [\"{}\", \"{}\"], removed [\"{}\"]", state("retiring"), l::CONSUMED_REACTIVATE, l::REACTIVATED_AT, l::DEACTIVATED_AT)),
        ("prune deletes at the resourceVersion read",
            Step::Prune { seq: 1 }, None, "delete demo-k1 at 11".into()),
        ("the trust record is one status field, at the key's resourceVersion",
            record, None, "record in demo's status at 5 (uid u1), was None".into()),
        ("the earlier versions' annotation is removed at the key's resourceVersion",
            Step::DropLegacyRecord, None, format!("remove annotation {} of demo at 5", crate::trust_record::ANNOTATION)),
        ("a bundle read is applied at its resourceVersion",
            bundle.clone(), None, "apply demo-trust at Some(\"7\")".into()),
        ("an owned agent Secret is applied at its resourceVersion",
            hand_out.clone(), Some(1), "apply demo at Some(\"9\")".into()),
    ];
    for (why, step, key, want) in rows {
        assert_eq!(write_of(&step, &r, key), Ok(Some(want)), "{why}");
    }
    // What was missing is created: one created meanwhile is a conflict (read again and retried)
    // when this key controls it, and a taken name (never taken over) when anyone else does.
    let missing = read(AgentSecretObs::Missing, None);
    assert_eq!(
        write_of(&bundle, &missing, None),
        Ok(Some("create demo-trust (Conflict)".into()))
    );
    assert_eq!(
        write_of(&hand_out, &missing, Some(1)),
        Ok(Some("create demo (Conflict)".into()))
    );
    // A hand-out signs only with the key of its key id, and only with a key.
    assert!(write_of(&hand_out, &r, Some(2)).is_err_and(|e| e.contains("does not match")));
    assert!(write_of(&hand_out, &r, None).is_err_and(|e| e.contains("no private key")));
    // A key Secret write without the resourceVersion read is never made unconditionally.
    let mut no_rv = read(owned, Some("7"));
    no_rv.secrets.refs.clear();
    for step in [
        Step::Retire { seq: 1 },
        Step::Prune { seq: 1 },
        Step::Repair { seq: 1 },
    ] {
        assert!(
            write_of(&step, &no_rv, None).is_err_and(|e| e.contains("precondition")),
            "{step:?}"
        );
    }
    // A repair of a key that is gone writes nothing.
    assert_eq!(write_of(&Step::Repair { seq: 9 }, &r, None), Ok(None));
}

#[test]
fn a_key_patch_body_carries_its_precondition() {
    let p = write::KeyPatch {
        name: "demo-k1".into(),
        resource_version: "11".into(),
        labels: [(l::KEY_STATE.to_string(), "revoked".to_string())].into(),
        annotations: BTreeMap::new(),
        remove_annotations: Vec::new(),
        drop_private: true,
    };
    let body = p.body();
    assert_eq!(body["metadata"]["resourceVersion"], "11");
    assert_eq!(body["metadata"]["labels"][l::KEY_STATE], "revoked");
    assert!(body["data"][l::DATA_PRIVATE_KEY].is_null());
    assert!(body["data"].as_object().is_some_and(|d| d.len() == 1));
    let _ = Exists::NameTaken;
}

/// A trust record write that meets a 409 is retried at the current resourceVersion while the
/// record it was decided on is still stored, but never on a key deleted and created again
/// under the same name meanwhile: that is another key, with its own record.
#[test]
fn a_record_write_lands_only_on_the_key_it_was_decided_for() {
    use super::sim::store::Store;
    use crate::rotation::write::memory::{self, Kind};
    let fresh = || {
        let mut pk = ProvisioningKey::new("demo", Default::default());
        pk.metadata.namespace = Some("ns".into());
        pk
    };
    let record = Step::WriteRecord {
        record: sim_record(&settings(), &[1]),
    };
    let owned = obs(vec![key(1, Active)]).agent_secret;
    let r = read(owned, Some("7"));
    let write_for = |pk: &ProvisioningKey| {
        let inputs = write::Inputs {
            pk,
            read: &r,
            now: now(),
            key: None,
            jti: "j",
        };
        write::of(&record, &inputs)
            .expect("a record write")
            .expect("one write")
    };
    let stored_record = |store: &Store| store.pk("demo").and_then(|p| p.status?.trust_record);

    // A status write in between (a condition, say) leaves the record alone: the write lands.
    let mut store = Store::default();
    store.put_pk(fresh());
    let read_pk = store.pk("demo").expect("stored");
    let w = write_for(&read_pk);
    let mut bumped = read_pk.clone();
    bumped.status.get_or_insert_default().observed_generation = Some(1);
    store.put_pk(bumped);
    assert!(memory::execute(&mut store, w).is_ok());
    assert!(stored_record(&store).is_some());

    // The key deleted and created again under its name: refused, and nothing is recorded.
    let mut store = Store::default();
    store.put_pk(fresh());
    let w = write_for(&store.pk("demo").expect("stored"));
    store.remove(Kind::ProvisioningKey, "demo");
    store.put_pk(fresh());
    assert!(matches!(
        memory::execute(&mut store, w),
        Err(memory::Error::Conflict)
    ));
    assert_eq!(stored_record(&store), None);
}
