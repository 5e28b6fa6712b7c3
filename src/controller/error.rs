//! The error of a reconcile, and the bounded text of it that status and Events may carry.

/// Errors of a reconcile. Each variant has a PascalCase reason for Warning Events and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("key Secret {name} is unusable: {message}")]
    KeySecret { name: String, message: String },
    #[error("key material: {0}")]
    Key(#[from] crate::keys::KeyError),
    #[error("object has no namespace or name")]
    MissingObjectKey,
    #[error(
        "{kind} {name} exists and is not owned by this ProvisioningKey; Keyward will not write it (delete or rename it; retrying with backoff)"
    )]
    NameTaken { kind: &'static str, name: String },
    #[error("not the leader: this replica does not hold the leader election Lease; not writing")]
    NotLeading,
}

impl From<crate::rotation::write::Error> for Error {
    fn from(e: crate::rotation::write::Error) -> Self {
        use crate::rotation::write::Error as W;
        match e {
            W::MissingObjectKey => Error::MissingObjectKey,
            W::KeySecret { name, message } => Error::KeySecret { name, message },
            W::Key(e) => Error::Key(e),
        }
    }
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApiError",
            Error::KeySecret { .. } => "KeySecretUnusable",
            Error::Key(e) => e.reason(),
            Error::MissingObjectKey => "MissingObjectKey",
            Error::NameTaken { .. } => "NameTaken",
            Error::NotLeading => "NotLeading",
        }
    }

    /// The API server gave no answer at all (connection refused or dropped, a timeout). An
    /// answer, even a 5xx or a 429, is not an outage: such an object keeps its own backoff
    /// (announcing a return for it would clear that backoff about once a second).
    pub fn unreachable(&self) -> bool {
        match self {
            Error::Kube(kube::Error::Service(e)) => !e.is::<crate::leader::NotLeading>(),
            Error::Kube(kube::Error::HyperError(_) | kube::Error::ReadEvents(_)) => true,
            _ => false,
        }
    }

    /// The error as it may appear in status and Events: an API server's message is bounded and
    /// loses every quoted value (a 422 quotes the values it refused, which may be anything a
    /// spec or a Secret held), other errors are bounded. The log keeps [`Display`].
    pub fn public_message(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(e)) => bounded(&format!(
                "Kubernetes API request failed: {} {}: {}",
                e.code,
                e.reason,
                unquoted(&e.message)
            )),
            other => bounded(&other.to_string()),
        }
    }

    /// Whether the error belongs in the object's `Ready` condition. An optimistic-concurrency
    /// conflict (409 on an update) is routine: it is retried, not reported.
    pub fn reportable(&self) -> bool {
        !matches!(self, Error::Kube(kube::Error::Api(e)) if e.code == 409)
            && !matches!(self, Error::NotLeading)
            && !matches!(self, Error::Kube(kube::Error::Service(e)) if e.is::<crate::leader::NotLeading>())
    }
}

/// Most characters of an error message written to status or an Event.
pub const MAX_PUBLIC_MESSAGE: usize = 256;

/// `message` cut at [`MAX_PUBLIC_MESSAGE`] characters (with an ellipsis), control characters
/// replaced.
pub fn bounded(message: &str) -> String {
    let mut out: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_PUBLIC_MESSAGE)
        .collect();
    if message.chars().nth(MAX_PUBLIC_MESSAGE).is_some() {
        out.push('…');
    }
    out
}

/// `message` with every double-quoted part replaced by `"…"`.
pub fn unquoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(1024));
    let mut inside = false;
    let mut escaped = false;
    for c in message.chars() {
        if inside {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    inside = false;
                    out.push_str("…\"");
                }
                _ => escaped = false,
            }
        } else {
            out.push(c);
            if c == '"' {
                inside = true;
            }
        }
    }
    if inside {
        out.push('…');
    }
    out
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_text_in_status_is_bounded_and_unquoted() {
        let e = Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            message: format!(
                "Secret \"opa\" is invalid: metadata.labels: Invalid value: \"{}\": must be 63 characters or less",
                "sEcReT-VaLuE".repeat(40)
            ),
            reason: "Invalid".into(),
            code: 422,
            ..kube::core::Status::default()
        })));
        let m = e.public_message();
        assert!(!m.contains("sEcReT"), "{m}");
        assert!(!m.contains("opa"), "{m}");
        assert!(
            m.starts_with("Kubernetes API request failed: 422 Invalid: Secret \"…\" is invalid"),
            "{m}"
        );
        assert!(m.chars().count() <= MAX_PUBLIC_MESSAGE + 1);
        let long = Error::KeySecret {
            name: "k".into(),
            message: "x\n".repeat(500),
        };
        let m = long.public_message();
        assert_eq!(m.chars().count(), MAX_PUBLIC_MESSAGE + 1);
        assert!(!m.contains('\n'));
        assert_eq!(unquoted(r#"a "b\"c" d "e"#), r#"a "…" d "…"#);
    }

    /// Only no answer at all is an outage: an answer (5xx, 429, 4xx) or a refusal by the
    /// leader fence keeps the object's own backoff.
    #[test]
    fn only_no_answer_is_an_outage() {
        let status = |code: u16| {
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..kube::core::Status::default()
            })))
        };
        for code in [403, 409, 429, 500, 503] {
            assert!(!status(code).unreachable(), "{code}");
        }
        let refused: tower::BoxError = "client error (Connect)".into();
        assert!(Error::Kube(kube::Error::Service(refused)).unreachable());
        let fenced: tower::BoxError = Box::new(crate::leader::NotLeading);
        assert!(!Error::Kube(kube::Error::Service(fenced)).unreachable());
        assert!(!Error::MissingObjectKey.unreachable());
    }
}
