//! Limits on a ProvisioningKey's input, in one place: the CRD's CEL rules are generated from
//! these constants and the operator (`rotation::settings`) checks the same constants, so the
//! API server and the operator cannot disagree.

use std::time::Duration;

use kube::core::Rule;

use super::DURATION_PATTERN;

/// An upper bound on a duration field, in whole hours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceiling {
    /// The field's path below `spec`, as messages name it (`token.ttl`).
    pub field: &'static str,
    /// The bound, inclusive.
    pub hours: u64,
}

/// `token.ttl`: a stolen token is good for at most a day.
pub const TOKEN_TTL: Ceiling = Ceiling {
    field: "token.ttl",
    hours: 24,
};
/// `rotation.publishDelay`: a new key waits at most a day before agents get it.
pub const PUBLISH_DELAY: Ceiling = Ceiling {
    field: "rotation.publishDelay",
    hours: 24,
};
/// `rotation.overlap`: an old key stays trusted at most 30 days after a rotation.
pub const OVERLAP: Ceiling = Ceiling {
    field: "rotation.overlap",
    hours: 720,
};
/// `rotation.revokeWhenUnusedFor`: the use check waits at most 30 days.
pub const REVOKE_WHEN_UNUSED_FOR: Ceiling = Ceiling {
    field: "rotation.revokeWhenUnusedFor",
    hours: 720,
};
/// `rotation.retainDeactivatedFor`: a deactivated key is destroyed at most 30 days later.
pub const RETAIN_DEACTIVATED_FOR: Ceiling = Ceiling {
    field: "rotation.retainDeactivatedFor",
    hours: 720,
};
/// `rotation.confirmationTimeout`: at most 30 days before a rotation is reported `Stalled`.
pub const CONFIRMATION_TIMEOUT: Ceiling = Ceiling {
    field: "rotation.confirmationTimeout",
    hours: 720,
};
/// `rotation.minInterval`: the debounce is at most 30 days.
pub const MIN_INTERVAL: Ceiling = Ceiling {
    field: "rotation.minInterval",
    hours: 720,
};
/// `rotation.interval`: a key is rotated at least once a year (366 days).
pub const INTERVAL: Ceiling = Ceiling {
    field: "rotation.interval",
    hours: 8784,
};

/// Every ceiling, for tests and documentation.
pub const CEILINGS: [Ceiling; 8] = [
    TOKEN_TTL,
    PUBLISH_DELAY,
    OVERLAP,
    REVOKE_WHEN_UNUSED_FOR,
    RETAIN_DEACTIVATED_FOR,
    CONFIRMATION_TIMEOUT,
    MIN_INTERVAL,
    INTERVAL,
];

/// A duration whose every component is short enough that CEL's `duration()` (Go's
/// `time.ParseDuration`, which fails beyond about 292 years) parses it: at most 5 digits of
/// hours, 7 of minutes, 9 of seconds, 12 of milliseconds, 15 of microseconds, 18 of
/// nanoseconds (leading zeros aside). Within the schema's 32 characters such a value is at most
/// about a century. A value that matches [`DURATION_PATTERN`] but not this one has a component
/// of at least 100000h (or the same in another unit), far above every ceiling.
pub const CEL_PARSEABLE_DURATION: &str = r"^(0*([0-9]{1,5}(\.[0-9]+)?h|[0-9]{1,7}(\.[0-9]+)?m|[0-9]{1,9}(\.[0-9]+)?s|[0-9]{1,12}(\.[0-9]+)?ms|[0-9]{1,15}(\.[0-9]+)?(us|µs)|[0-9]{1,18}(\.[0-9]+)?ns))+$";

impl Ceiling {
    /// The bound as a [`Duration`].
    pub const fn duration(&self) -> Duration {
        Duration::from_secs(self.hours * 3600)
    }

    /// The bound in Go syntax (`24h`), as CEL's `duration()` and messages write it.
    pub fn go(&self) -> String {
        format!("{}h", self.hours)
    }

    /// The message of the CEL rule (the operator's refusal, `SpecError::AboveCeiling`, names
    /// the same field and bound, and the value).
    pub fn message(&self) -> String {
        format!("{} must be at most {}", self.field, self.go())
    }

    /// The field-level CEL rule. A malformed value passes it (the schema's `pattern` refuses
    /// it with its own message), and a value too long for CEL's `duration()` fails it without
    /// a CEL runtime error (see [`CEL_PARSEABLE_DURATION`]).
    pub fn rule(&self) -> Rule {
        Rule::new(format!(
            "!self.matches(r'{DURATION_PATTERN}') || (self.matches(r'{CEL_PARSEABLE_DURATION}') && duration(self) <= duration('{}'))",
            self.go()
        ))
        .message(self.message().as_str())
    }
}

/// Claim names `spec.token.claims` may not set: the registered JWT claims the operator signs
/// itself (RFC 7519 4.1), JOSE header names, and claims with a meaning to OAuth and OpenID
/// Connect verifiers (RFC 7800 `cnf`, RFC 8693 `act`/`may_act`, RFC 9068 `client_id`, OIDC's
/// `azp`, `nonce`, `auth_time`, `at_hash`, `sid`). Reserved so a static claim never contradicts
/// or impersonates what a verifier reads as identity or proof.
pub const RESERVED_CLAIMS: [&str; 22] = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "alg",
    "kid",
    "typ",
    "cty",
    "crit",
    "jku",
    "jwk",
    "cnf",
    "act",
    "may_act",
    "client_id",
    "azp",
    "nonce",
    "auth_time",
    "sid",
];
/// Most static claims on a key's tokens.
pub const MAX_CLAIMS: usize = 16;
/// Longest value of a static claim (a token stays small: at most 16 KiB in all).
pub const MAX_CLAIM_VALUE: usize = 512;
/// A claim name: a letter, then letters, digits, `_`, `.`, `:` or `-`, at most 64 characters.
pub const CLAIM_NAME_PATTERN: &str = r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$";
/// Message of the rule on `spec.rotation.window`.
pub const WINDOW_EMPTY: &str = "rotation.window: start and end must differ";
/// Message of the rule on `spec.token.claims`.
pub const CLAIMS_RESERVED: &str = "spec.token.claims must not set a reserved claim (iss, sub, aud, exp, nbf, iat, jti, alg, kid, typ, cty, crit, jku, jwk, cnf, act, may_act, client_id, azp, nonce, auth_time, sid), and each name must match ^[A-Za-z][A-Za-z0-9_.:-]{0,63}$";

/// The CEL rule on `spec.token.claims`: no reserved name, every name well formed.
pub fn claims_rule() -> Rule {
    let reserved = RESERVED_CLAIMS
        .iter()
        .map(|c| format!("'{c}'"))
        .collect::<Vec<_>>()
        .join(", ");
    Rule::new(format!(
        "self.all(k, !(k in [{reserved}]) && k.matches(r'{CLAIM_NAME_PATTERN}'))"
    ))
    .message(CLAIMS_RESERVED)
}

/// Kubernetes' limit on a label value; a ProvisioningKey's name is one (the
/// `keyward.dev/provisioning-key` label on the objects it owns).
pub const MAX_NAME_LENGTH: usize = 63;

/// Key Secrets are named `<ProvisioningKey name>-k<sequence>`
/// ([`crate::rotation::desired::key_secret_name`]): an agent Secret named like one could take
/// another key's next key Secret name (the agent Secret of key `a-k2` blocks key `a`'s second
/// mint). True for any `<something>-k<digits>`.
pub fn is_key_secret_like(name: &str) -> bool {
    name.rsplit_once("-k").is_some_and(|(head, seq)| {
        !head.is_empty() && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

/// The CEL expression of the agent Secret's effective name (`spec.secretName`, default the
/// ProvisioningKey's name), of `self` or `oldSelf`.
fn effective_secret_name(obj: &str) -> String {
    format!("(has({obj}.spec.secretName) ? {obj}.spec.secretName : {obj}.metadata.name)")
}

/// The CEL expression of the trust bundle's effective name (`spec.trustBundle.configMapName`,
/// default `<name>-trust`), of `self` or `oldSelf`.
fn effective_bundle_name(obj: &str) -> String {
    format!(
        "(has({obj}.spec.trustBundle) && has({obj}.spec.trustBundle.configMapName) ? {obj}.spec.trustBundle.configMapName : {obj}.metadata.name + '-trust')"
    )
}

/// Message of the root rule that keeps the agent Secret's name.
pub const SECRET_NAME_IMMUTABLE: &str = "secretName is immutable: the agent Secret's name (spec.secretName, default the ProvisioningKey's name) cannot change on a live key";
/// Message of the root rule that keeps the trust bundle's name.
pub const CONFIG_MAP_NAME_IMMUTABLE: &str = "configMapName is immutable: the trust bundle's name (spec.trustBundle.configMapName, default <name>-trust) cannot change on a live key";
/// Message of the root rule on the ProvisioningKey's name length.
pub const NAME_TOO_LONG: &str = "metadata.name must be at most 63 characters (it is a label value on the objects Keyward creates)";
/// Message of the root rule against agent Secret names that look like key Secret names.
pub const SECRET_NAME_LIKE_A_KEY_SECRET: &str = "the agent Secret's name (spec.secretName, default the ProvisioningKey's name) must not end in -k<digits>, the form of key Secret names (<ProvisioningKey name>-k<sequence>): set spec.secretName to another name";

/// The rules at the root of the ProvisioningKey CRD, in the order the CRD lists them.
///
/// The names are compared by their effective values, so a name going from unset to set is
/// refused as a change, and writing the default explicitly (as a GitOps tool may) passes. The
/// two creation rules use `optionalOldSelf` and pass on every update (`oldSelf.hasValue()`):
/// the values they check cannot change, and an object stored before the rule existed stays
/// writable (the operator reports it with `Ready=False`).
pub fn provisioning_key_rules() -> Vec<Rule> {
    vec![
        secret_name_immutable(),
        config_map_name_immutable(),
        name_length(),
        secret_name_unlike_a_key_secret(),
    ]
}

/// The agent Secret's effective name never changes.
pub fn secret_name_immutable() -> Rule {
    Rule::new(format!(
        "{} == {}",
        effective_secret_name("self"),
        effective_secret_name("oldSelf")
    ))
    .message(SECRET_NAME_IMMUTABLE)
    .field_path(".spec.secretName")
}

/// The trust bundle's effective name never changes.
pub fn config_map_name_immutable() -> Rule {
    Rule::new(format!(
        "{} == {}",
        effective_bundle_name("self"),
        effective_bundle_name("oldSelf")
    ))
    .message(CONFIG_MAP_NAME_IMMUTABLE)
    .field_path(".spec.trustBundle.configMapName")
}

/// The ProvisioningKey's name fits a label value (checked on creation).
pub fn name_length() -> Rule {
    Rule::new(format!(
        "size(self.metadata.name) <= {MAX_NAME_LENGTH} || oldSelf.hasValue()"
    ))
    .message(NAME_TOO_LONG)
    .optional_old_self(true)
}

/// `spec.token.mode: ProofOfPossession` needs `spec.includePrivateKey: true`: the agent signs
/// its assertions with the key.
pub fn proof_of_possession_needs_the_private_key() -> Rule {
    Rule::new(
        "!has(self.spec.token) || !has(self.spec.token.mode) || self.spec.token.mode != 'ProofOfPossession' || (has(self.spec.includePrivateKey) && self.spec.includePrivateKey)",
    )
    .message(POP_NEEDS_PRIVATE_KEY)
}

/// The message of [`proof_of_possession_needs_the_private_key`].
pub const POP_NEEDS_PRIVATE_KEY: &str = "spec.token.mode ProofOfPossession needs spec.includePrivateKey: true (the agent signs its client assertions with the key)";

/// The agent Secret's effective name is not of the form of a key Secret's (checked on
/// creation; the name cannot change afterwards).
pub fn secret_name_unlike_a_key_secret() -> Rule {
    Rule::new(format!(
        "!{}.matches('^.+-k[0-9]+$') || oldSelf.hasValue()",
        effective_secret_name("self")
    ))
    .message(SECRET_NAME_LIKE_A_KEY_SECRET)
    .field_path(".spec.secretName")
    .optional_old_self(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_in_the_cel_rules_are_the_constants() {
        for c in CEILINGS {
            let rule = c.rule();
            assert!(
                rule.rule
                    .ends_with(&format!("duration(self) <= duration('{}h'))", c.hours)),
                "{}",
                rule.rule
            );
            assert_eq!(c.duration(), Duration::from_secs(c.hours * 3600));
            assert_eq!(
                rule.message,
                Some(kube::core::Message::Message(format!(
                    "{} must be at most {}h",
                    c.field, c.hours
                )))
            );
        }
    }

    /// The guard pattern refuses only values above every ceiling: the largest component each
    /// unit allows is above the largest ceiling, and a value of 32 characters made of them is
    /// below Go's limit (about 292 years).
    #[test]
    fn cel_parseable_bounds_are_above_every_ceiling_and_below_go_overflow() {
        let largest = CEILINGS.iter().map(|c| c.hours).max().unwrap_or(0) * 3600;
        // The smallest value with one more digit, per unit, in seconds.
        for (first_refused, scale) in [
            (1e5, 3600.0),
            (1e7, 60.0),
            (1e9, 1.0),
            (1e12, 1e-3),
            (1e15, 1e-6),
            (1e18, 1e-9),
        ] {
            assert!(first_refused * scale > largest as f64, "{first_refused}");
        }
        // The densest component (most seconds per character) filling all 32 characters stays
        // below 2^63 ns; a fraction adds less than one unit, and leading zeros add nothing.
        let densest = [
            (1e5 * 3600.0, 6.0),
            (1e7 * 60.0, 8.0),
            (1e9, 10.0),
            (1e12 * 1e-3, 14.0),
            (1e15 * 1e-6, 17.0),
            (1e18 * 1e-9, 20.0),
        ]
        .into_iter()
        .map(|(secs, chars)| secs / chars)
        .fold(0.0, f64::max);
        assert!(densest * 32.0 < 9.2e9, "{densest}");
    }

    #[test]
    fn key_secret_like_names() {
        for (name, like) in [
            ("a-k2", true),
            ("a-k12", true),
            ("agents-k1", true),
            ("a-k-k3", true),
            ("-k1", false),
            ("a-k", false),
            ("a-kx", false),
            ("a-k8s", false),
            ("agents", false),
            ("k1", false),
            ("a-k1b", false),
        ] {
            assert_eq!(is_key_secret_like(name), like, "{name}");
        }
    }
}
