//! One vocabulary of reasons: every reason Keyward writes into a condition, an Event or a
//! metric label, as one enum whose string form is written here and nowhere else. The named
//! constants the modules use (`rotation::reasons`, `controller::audit::reason`,
//! `agent::reasons`, `api::conditions::reasons`) are these strings, so two modules naming the
//! same reason name the same variant. A leaf module: it depends on nothing of Keyward's.
//!
//! Not here: the kinds of error (`controller::Error::reason`, `keys::KeyError::reason`,
//! `rotation::SpecError::reason`) and the verifier's refusals (`verifier::Refusal::reason`),
//! which are enums of their own with their string form in one place each.

/// A reason (PascalCase, as Kubernetes writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    // ProvisioningKey conditions.
    KeyActive,
    Minting,
    Publishing,
    AwaitingConfirmation,
    Overlap,
    RotationStalled,
    Suspended,
    Idle,
    SecretNameTaken,
    TrustBundleNameTaken,
    EmergencyRevocation,
    RotationRefused,
    UncoveredConsumers,
    UnrecordedTrustedKeys,
    BundleTampered,
    VerifierSilent,
    VerifierBehind,
    OldKeyInUse,
    // kstatus conditions of both kinds.
    Reconciled,
    ReconcileFailed,
    InvalidSpec,
    // ProvisioningKey Events.
    KeyMinted,
    KeyPublished,
    KeyActivated,
    KeyHandedOut,
    KeyRetiring,
    KeyRevoked,
    KeyReactivated,
    KeyDestroyed,
    KeySecretRepaired,
    TokenRefreshed,
    // PolicyAgent Events.
    RolloutTriggered,
    AgentConfirmed,
    // PolicyAgent conditions.
    RolloutDelayed,
    RolloutQueued,
    RolloutInProgress,
    RevisionUnknown,
    PodsNotOnKey,
    ConnectivityPending,
    AcknowledgementPending,
    Confirmed,
    KeyRotationInProgress,
    WorkloadClaimed,
    ProvisioningKeyNotFound,
    KeyNotHandedOut,
    WorkloadNotFound,
    // A workload's rollout that will not finish by itself.
    DeploymentPaused,
    ProgressDeadlineExceeded,
    OnDeleteStrategy,
    Partitioned,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 50] = [
        Reason::KeyActive,
        Reason::Minting,
        Reason::Publishing,
        Reason::AwaitingConfirmation,
        Reason::Overlap,
        Reason::RotationStalled,
        Reason::Suspended,
        Reason::Idle,
        Reason::SecretNameTaken,
        Reason::TrustBundleNameTaken,
        Reason::EmergencyRevocation,
        Reason::RotationRefused,
        Reason::UncoveredConsumers,
        Reason::UnrecordedTrustedKeys,
        Reason::BundleTampered,
        Reason::VerifierSilent,
        Reason::VerifierBehind,
        Reason::OldKeyInUse,
        Reason::Reconciled,
        Reason::ReconcileFailed,
        Reason::InvalidSpec,
        Reason::KeyMinted,
        Reason::KeyPublished,
        Reason::KeyActivated,
        Reason::KeyHandedOut,
        Reason::KeyRetiring,
        Reason::KeyRevoked,
        Reason::KeyReactivated,
        Reason::KeyDestroyed,
        Reason::KeySecretRepaired,
        Reason::TokenRefreshed,
        Reason::RolloutTriggered,
        Reason::AgentConfirmed,
        Reason::RolloutDelayed,
        Reason::RolloutQueued,
        Reason::RolloutInProgress,
        Reason::RevisionUnknown,
        Reason::PodsNotOnKey,
        Reason::ConnectivityPending,
        Reason::AcknowledgementPending,
        Reason::Confirmed,
        Reason::KeyRotationInProgress,
        Reason::WorkloadClaimed,
        Reason::ProvisioningKeyNotFound,
        Reason::KeyNotHandedOut,
        Reason::WorkloadNotFound,
        Reason::DeploymentPaused,
        Reason::ProgressDeadlineExceeded,
        Reason::OnDeleteStrategy,
        Reason::Partitioned,
    ];

    /// The string written to the API and to metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::KeyActive => "KeyActive",
            Reason::Minting => "Minting",
            Reason::Publishing => "Publishing",
            Reason::AwaitingConfirmation => "AwaitingConfirmation",
            Reason::Overlap => "Overlap",
            Reason::RotationStalled => "RotationStalled",
            Reason::Suspended => "Suspended",
            Reason::Idle => "Idle",
            Reason::SecretNameTaken => "SecretNameTaken",
            Reason::TrustBundleNameTaken => "TrustBundleNameTaken",
            Reason::EmergencyRevocation => "EmergencyRevocation",
            Reason::RotationRefused => "RotationRefused",
            Reason::UncoveredConsumers => "UncoveredConsumers",
            Reason::UnrecordedTrustedKeys => "UnrecordedTrustedKeys",
            Reason::BundleTampered => "BundleTampered",
            Reason::VerifierSilent => "VerifierSilent",
            Reason::VerifierBehind => "VerifierBehind",
            Reason::OldKeyInUse => "OldKeyInUse",
            Reason::Reconciled => "Reconciled",
            Reason::ReconcileFailed => "ReconcileFailed",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::KeyMinted => "KeyMinted",
            Reason::KeyPublished => "KeyPublished",
            Reason::KeyActivated => "KeyActivated",
            Reason::KeyHandedOut => "KeyHandedOut",
            Reason::KeyRetiring => "KeyRetiring",
            Reason::KeyRevoked => "KeyRevoked",
            Reason::KeyReactivated => "KeyReactivated",
            Reason::KeyDestroyed => "KeyDestroyed",
            Reason::KeySecretRepaired => "KeySecretRepaired",
            Reason::TokenRefreshed => "TokenRefreshed",
            Reason::RolloutTriggered => "RolloutTriggered",
            Reason::AgentConfirmed => "AgentConfirmed",
            Reason::RolloutDelayed => "RolloutDelayed",
            Reason::RolloutQueued => "RolloutQueued",
            Reason::RolloutInProgress => "RolloutInProgress",
            Reason::RevisionUnknown => "RevisionUnknown",
            Reason::PodsNotOnKey => "PodsNotOnKey",
            Reason::ConnectivityPending => "ConnectivityPending",
            Reason::AcknowledgementPending => "AcknowledgementPending",
            Reason::Confirmed => "Confirmed",
            Reason::KeyRotationInProgress => "KeyRotationInProgress",
            Reason::WorkloadClaimed => "WorkloadClaimed",
            Reason::ProvisioningKeyNotFound => "ProvisioningKeyNotFound",
            Reason::KeyNotHandedOut => "KeyNotHandedOut",
            Reason::WorkloadNotFound => "WorkloadNotFound",
            Reason::DeploymentPaused => "DeploymentPaused",
            Reason::ProgressDeadlineExceeded => "ProgressDeadlineExceeded",
            Reason::OnDeleteStrategy => "OnDeleteStrategy",
            Reason::Partitioned => "Partitioned",
        }
    }

    /// The reason a string names, if any.
    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;
    use std::collections::BTreeSet;

    #[test]
    fn every_reason_has_one_distinct_pascal_case_string() {
        let strings: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            strings.len(),
            Reason::ALL.len(),
            "two reasons share a string"
        );
        for r in Reason::ALL {
            let s = r.as_str();
            assert!(
                s.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                "{s}"
            );
            assert!(s.chars().all(|c| c.is_ascii_alphanumeric()), "{s}");
            assert_eq!(Reason::parse(s), Some(r));
            // The Debug form is the variant's name: the string is the name.
            assert_eq!(format!("{r:?}"), s);
        }
    }
}
