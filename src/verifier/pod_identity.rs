//! Which pod presented a token: a projected, pod-bound ServiceAccount token with the `keyward`
//! audience, sent next to the agent's key token in `X-Keyward-Pod-Token` (by the loopback
//! sidecar `keyward agent-proxy`, docs/agent-proxy.md), and checked by the API server
//! (TokenReview). The pod's UID comes from the review (`authentication.kubernetes.io/pod-uid`
//! in the user's extra), never from anything the client wrote; a pod can therefore
//! acknowledge only itself.
//!
//! The review is off the request path: a request whose pod token is not yet known counts as
//! unattributed use of its key id at once, and the review runs in the background; when the
//! API server vouches for the pod, the use is recorded again for that pod, at the time of the
//! request. Verdicts are cached by the token's SHA-256 (never the token itself), bounded in
//! number and in time, so a client cannot grow the cache or make one review per request.
//! Reviews run only for requests whose key token verified: an attacker needs a valid key
//! token to cause one.
//!
//! A pod token counts only for keys in the pod's own namespace.
//!
//! An agent outside the cluster has no pod: it is a ServiceAccount (a PolicyAgent with
//! `workloadRef.kind: ServiceAccount`). It sends a token of that ServiceAccount for the audience
//! `keyward-consumer` in `X-Keyward-Consumer-Token` (`keyward token sync --acknowledge-via`),
//! reviewed the same way; the instance is the ServiceAccount's UID, from the review, and counts
//! only for keys in the ServiceAccount's namespace. A separate header and audience: a pod token
//! never names a ServiceAccount, and a consumer token never names a pod.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::index::KeyRef;
use super::stats::Stats;
use super::use_log::{Instance, Use, UseLog};

/// The header carrying the pod-bound ServiceAccount token (set by `keyward agent-proxy`).
pub const POD_TOKEN_HEADER: &str = "x-keyward-pod-token";
/// The header carrying an agent-outside-the-cluster's ServiceAccount token (set by
/// `keyward token sync --acknowledge-via`).
pub const CONSUMER_TOKEN_HEADER: &str = "x-keyward-consumer-token";
/// The audience of those tokens.
pub const CONSUMER_AUDIENCE: &str = "keyward-consumer";
/// Default of `--pod-token-audience`.
pub const DEFAULT_AUDIENCE: &str = "keyward";
/// The user's extra that names the pod a ServiceAccount token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
/// How long a pod's verdict is cached. A pod token lives at least 10 minutes (the API
/// server's floor) and the kubelet replaces it at 80 % of its life.
pub const VERDICT_TTL: Duration = Duration::from_secs(300);
/// How long a refused token is remembered (no new review for it meanwhile).
pub const REFUSED_TTL: Duration = Duration::from_secs(60);
/// Most verdicts cached; beyond that, new tokens are not reviewed until entries expire.
pub const MAX_CACHED: usize = 16_384;
/// Most reviews in flight at once; a request beyond that is not attributed (counted `busy`).
pub const MAX_IN_FLIGHT: usize = 16;
/// Longest pod token considered (a projected token is about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The rule of the pod-token policy (chart `podTokenPolicy`): a TokenRequest (create on
/// `serviceaccounts/token`) for `audience` is refused, so that only the kubelets (exempt by the
/// policy's match condition) mint pod tokens the verifier accepts. Without it, anyone who may
/// create tokens for the agent's ServiceAccount could mint one bound to another pod, and
/// acknowledge for that pod. The chart's template carries this text, with the default
/// audience, verbatim (a test checks it).
pub fn minting_rule(audience: &str) -> String {
    format!(
        "!(has(object.spec.audiences) && object.spec.audiences.exists(a, a == {}))",
        crate::admission::cel_strings([audience])
    )
}

/// The pod-token policy's message to a refused requester.
pub const MINTING_MESSAGE: &str = "only kubelets may request ServiceAccount tokens for the keyward audience (a pod token identifies its pod to the keyward verifier; see podTokenPolicy)";

/// The match condition that exempts the kubelets and `minters` from the pod-token policy.
pub fn minting_condition(minters: &[String]) -> String {
    let kubelet = "(request.userInfo.username.startsWith('system:node:') && 'system:nodes' in request.userInfo.groups)";
    if minters.is_empty() {
        format!("!{kubelet}")
    } else {
        format!(
            "!({kubelet} || request.userInfo.username in [{}])",
            crate::admission::cel_strings(minters)
        )
    }
}

/// The pod-token policy and its binding, as objects (tests install them; the chart has its own
/// template with the same rule): `minters` may also request tokens for `audience`; the binding
/// covers `namespace` only, or every namespace.
pub fn minting_policy_objects(
    name: &str,
    audience: &str,
    minters: &[String],
    namespace: Option<&str>,
) -> (serde_json::Value, serde_json::Value) {
    use crate::admission;
    let policy = admission::policy(
        name,
        serde_json::json!([{
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["serviceaccounts/token"],
        }]),
        serde_json::json!([{ "name": "not-a-kubelet", "expression": minting_condition(minters) }]),
        None,
        serde_json::json!([{ "expression": minting_rule(audience), "message": MINTING_MESSAGE, "reason": "Forbidden" }]),
    );
    (policy, admission::binding(name, namespace))
}

/// The pod a token is bound to, as the API server said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodId {
    pub namespace: String,
    pub uid: String,
}

/// Why a review gave no pod (also the metric's `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAPod {
    /// The API server did not authenticate the token (forged, expired, wrong audience, or its
    /// pod is gone).
    Unauthenticated,
    /// Authenticated, but not a ServiceAccount token bound to a pod.
    NotPodBound,
}

impl NotAPod {
    pub fn result(self) -> &'static str {
        match self {
            NotAPod::Unauthenticated => "unauthenticated",
            NotAPod::NotPodBound => "not_pod_bound",
        }
    }
}

/// The ServiceAccount user of a TokenReview's status, and its namespace: authenticated, valid
/// for `audience`, a ServiceAccount (`system:serviceaccount:<namespace>:<name>`).
fn service_account_user<'a>(
    status: &'a TokenReviewStatus,
    audience: &str,
) -> Result<(&'a k8s_openapi::api::authentication::v1::UserInfo, &'a str), NotAPod> {
    if status.authenticated != Some(true) || status.error.as_deref().is_some_and(|e| !e.is_empty())
    {
        return Err(NotAPod::Unauthenticated);
    }
    // The API server returns the requested audiences the token is valid for.
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(NotAPod::Unauthenticated);
    }
    let user = status.user.as_ref().ok_or(NotAPod::NotPodBound)?;
    let namespace = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .map(|(ns, _)| ns)
        .ok_or(NotAPod::NotPodBound)?;
    Ok((user, namespace))
}

/// A UUID, not nil, in its hyphenated form.
fn uuid_of(s: &str) -> Option<String> {
    uuid::Uuid::try_parse(s)
        .ok()
        .filter(|u| !u.is_nil())
        .map(|u| u.hyphenated().to_string())
}

/// The pod of a TokenReview's status (pure): authenticated, for `audience`, a ServiceAccount
/// (`system:serviceaccount:<namespace>:<name>`) with exactly one pod UID, a UUID.
pub fn pod_of(status: &TokenReviewStatus, audience: &str) -> Result<PodId, NotAPod> {
    let (user, namespace) = service_account_user(status, audience)?;
    let uid = match user.extra.as_ref().and_then(|e| e.get(POD_UID_EXTRA)) {
        Some(v) if v.len() == 1 => uuid_of(&v[0]).ok_or(NotAPod::NotPodBound)?,
        _ => return Err(NotAPod::NotPodBound),
    };
    Ok(PodId {
        namespace: namespace.to_string(),
        uid,
    })
}

/// The ServiceAccount of a TokenReview's status (pure): authenticated, for `audience`, a
/// ServiceAccount (`system:serviceaccount:<namespace>:<name>`) whose UID (the review's
/// `user.uid`) is a UUID. Bound or not to a pod: the identity is the ServiceAccount.
pub fn service_account_of(status: &TokenReviewStatus, audience: &str) -> Result<PodId, NotAPod> {
    let (user, namespace) = service_account_user(status, audience)?;
    let uid = user
        .uid
        .as_deref()
        .and_then(uuid_of)
        .ok_or(NotAPod::NotPodBound)?;
    Ok(PodId {
        namespace: namespace.to_string(),
        uid,
    })
}

/// Asks the API server about a token.
pub trait Reviewer: Send + Sync {
    /// The review's status; an error when the review itself failed (network, 403, ...): then
    /// nothing is cached for long.
    fn review(
        &self,
        token: String,
        audience: String,
    ) -> BoxFuture<'static, Result<TokenReviewStatus, String>>;
}

/// TokenReview through the API server (needs `create` on `tokenreviews`).
pub struct ApiReviewer(pub kube::Client);

impl Reviewer for ApiReviewer {
    fn review(
        &self,
        token: String,
        audience: String,
    ) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
        let api: kube::Api<TokenReview> = kube::Api::all(self.0.clone());
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![audience]),
                },
                ..TokenReview::default()
            };
            match api.create(&kube::api::PostParams::default(), &review).await {
                Ok(r) => Ok(r.status.unwrap_or_default()),
                // The error names the resource and status, never the request body.
                Err(kube::Error::Api(s)) => {
                    Err(format!("TokenReview refused: {} {}", s.code, s.reason))
                }
                Err(e) => Err(format!(
                    "TokenReview failed: {}",
                    crate::controller::bounded(&e.to_string())
                )),
            }
        })
    }
}

#[derive(Clone, Debug)]
enum Verdict {
    Pod(PodId),
    Refused,
    /// A review is running; requests meanwhile count as unattributed.
    Pending,
}

#[derive(Clone, Debug)]
struct Entry {
    verdict: Verdict,
    until: Instant,
}

/// The cache of verdicts, keyed by the token's SHA-256.
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], Entry>,
}

impl Cache {
    fn get(&self, key: &[u8; 32], now: Instant) -> Option<&Verdict> {
        self.entries
            .get(key)
            .filter(|e| e.until > now)
            .map(|e| &e.verdict)
    }

    /// Inserts, making room by dropping expired entries; `false` when still full.
    fn insert(&mut self, key: [u8; 32], entry: Entry, now: Instant) -> bool {
        if self.entries.len() >= MAX_CACHED && !self.entries.contains_key(&key) {
            self.entries.retain(|_, e| e.until > now);
            if self.entries.len() >= MAX_CACHED {
                return false;
            }
        }
        self.entries.insert(key, entry);
        true
    }
}

/// Which token a header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// A pod-bound ServiceAccount token (`X-Keyward-Pod-Token`): the instance is the pod.
    Pod,
    /// An agent outside the cluster's ServiceAccount token (`X-Keyward-Consumer-Token`): the
    /// instance is the ServiceAccount.
    Consumer,
}

/// Attributes accepted requests to pods.
pub struct PodIdentity {
    reviewer: Arc<dyn Reviewer>,
    audience: String,
    cache: Mutex<Cache>,
    in_flight: Arc<Semaphore>,
    stats: Arc<Stats>,
    /// When a failed review was last logged (at most one warning a minute).
    last_warned: Mutex<Option<Instant>>,
}

impl PodIdentity {
    pub fn new(
        reviewer: Arc<dyn Reviewer>,
        audience: impl Into<String>,
        stats: Arc<Stats>,
    ) -> Self {
        PodIdentity {
            reviewer,
            audience: audience.into(),
            cache: Mutex::new(Cache::default()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            stats,
            last_warned: Mutex::new(None),
        }
    }

    /// The instance of an accepted request for `key` (its key id `kid`, at `at`): the pod of a
    /// known pod token, else unattributed. An unknown token is reviewed in the background and,
    /// if it names a pod of `key`'s namespace, recorded in `log` as that pod's use at `at`.
    pub fn attribute(
        self: &Arc<Self>,
        header: Option<&http::HeaderValue>,
        key: &KeyRef,
        kid: &str,
        at: DateTime<Utc>,
        log: &Arc<dyn UseLog>,
    ) -> Instance {
        self.attribute_as(TokenKind::Pod, header, key, kid, at, log)
    }

    /// [`PodIdentity::attribute`] for a token of `kind`.
    pub fn attribute_as(
        self: &Arc<Self>,
        kind: TokenKind,
        header: Option<&http::HeaderValue>,
        key: &KeyRef,
        kid: &str,
        at: DateTime<Utc>,
        log: &Arc<dyn UseLog>,
    ) -> Instance {
        let Some(token) = header
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
        else {
            return Instance::Unattributed;
        };
        // The kind is part of the cache key: one token never gets the other kind's verdict.
        let mut hasher = Sha256::new();
        hasher.update(match kind {
            TokenKind::Pod => b"pod\0".as_slice(),
            TokenKind::Consumer => b"consumer\0".as_slice(),
        });
        hasher.update(token.as_bytes());
        let digest: [u8; 32] = hasher.finalize().into();
        let now = Instant::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&digest, now) {
                Some(Verdict::Pod(pod)) => return self.instance_for(pod, key),
                Some(Verdict::Refused | Verdict::Pending) => return Instance::Unattributed,
                None => {}
            }
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                self.stats.pod_token_review("busy");
                return Instance::Unattributed;
            };
            let pending = Entry {
                verdict: Verdict::Pending,
                until: now + REFUSED_TTL,
            };
            if !cache.insert(digest, pending, now) {
                self.stats.pod_token_review("busy");
                return Instance::Unattributed;
            }
            let this = self.clone();
            let (key, kid, log, token) =
                (key.clone(), kid.to_string(), log.clone(), token.to_string());
            tokio::spawn(async move {
                let _permit = permit;
                let audience = match kind {
                    TokenKind::Pod => this.audience.clone(),
                    TokenKind::Consumer => CONSUMER_AUDIENCE.to_string(),
                };
                let reviewed = this.reviewer.review(token, audience).await;
                if let Some(pod) = this.settle(kind, digest, reviewed)
                    && let Instance::Pod(uid) = this.instance_for(&pod, &key)
                {
                    log.record(Use {
                        key,
                        kid,
                        instance: Instance::Pod(uid),
                        at,
                    });
                }
            });
        }
        Instance::Unattributed
    }

    fn instance_for(&self, pod: &PodId, key: &KeyRef) -> Instance {
        if pod.namespace == key.namespace {
            Instance::Pod(pod.uid.clone())
        } else {
            self.stats.pod_token_review("other_namespace");
            Instance::Unattributed
        }
    }

    /// Caches a review's outcome; the pod, if any.
    fn settle(
        &self,
        kind: TokenKind,
        digest: [u8; 32],
        reviewed: Result<TokenReviewStatus, String>,
    ) -> Option<PodId> {
        let now = Instant::now();
        let identify = |s: &TokenReviewStatus| match kind {
            TokenKind::Pod => pod_of(s, &self.audience),
            TokenKind::Consumer => service_account_of(s, CONSUMER_AUDIENCE),
        };
        let (verdict, ttl, pod) = match reviewed.map(|s| identify(&s)) {
            Ok(Ok(pod)) => {
                self.stats.pod_token_review(match kind {
                    TokenKind::Pod => "pod",
                    TokenKind::Consumer => "service_account",
                });
                debug!(pod = %pod.uid, "pod token reviewed");
                (Verdict::Pod(pod.clone()), VERDICT_TTL, Some(pod))
            }
            Ok(Err(not)) => {
                self.stats.pod_token_review(not.result());
                (Verdict::Refused, REFUSED_TTL, None)
            }
            Err(e) => {
                self.stats.pod_token_review("error");
                self.warn(&e);
                // Retried after a short while: the next request after it reviews again.
                (Verdict::Refused, Duration::from_secs(5), None)
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entries.insert(
            digest,
            Entry {
                verdict,
                until: now + ttl,
            },
        );
        pod
    }

    fn warn(&self, e: &str) {
        let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            *last = Some(now);
            warn!(error = %e, "cannot review pod tokens: requests count as use of their key id but acknowledge no pod (needs RBAC create on tokenreviews; see docs/verifier.md)");
        }
    }

    /// Verdicts cached (tests).
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .len()
    }
}

/// A reviewer answering from a table (unit tests of the verifier).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers from a table of token -> status, counting reviews.
    pub struct Table {
        pub answers: HashMap<String, TokenReviewStatus>,
        pub reviews: AtomicUsize,
    }

    impl Table {
        pub fn new(answers: impl IntoIterator<Item = (&'static str, TokenReviewStatus)>) -> Self {
            Table {
                answers: answers
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                reviews: AtomicUsize::new(0),
            }
        }

        pub fn reviews(&self) -> usize {
            self.reviews.load(Ordering::SeqCst)
        }
    }

    impl Reviewer for Table {
        fn review(
            &self,
            token: String,
            _audience: String,
        ) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
            self.reviews.fetch_add(1, Ordering::SeqCst);
            let answer = self
                .answers
                .get(&token)
                .cloned()
                .ok_or_else(|| "unknown".to_string());
            Box::pin(async move { answer })
        }
    }

    /// A review's status: `username` with pod UIDs `uids`, valid for `audiences`.
    pub fn status(
        username: &str,
        uids: &[&str],
        audiences: &[&str],
        ok: bool,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(ok),
            audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(BTreeMap::from([(
                    POD_UID_EXTRA.to_string(),
                    uids.iter().map(|s| s.to_string()).collect(),
                )])),
                ..UserInfo::default()
            }),
            error: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Table, status};
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const UID: &str = "3f1c1a52-9d0e-4a53-8a3e-0c2f5b6a7d81";

    #[test]
    fn the_chart_carries_the_minting_rule_verbatim() {
        let chart = include_str!("../../charts/keyward/templates/pod-token-policy.yaml");
        // The template fills in the configured audience where the rule has 'keyward'.
        let templated = minting_rule(DEFAULT_AUDIENCE).replace("'keyward'", "'%s'");
        assert!(
            chart.contains(&templated),
            "charts/keyward/templates/pod-token-policy.yaml does not carry minting_rule(\"keyward\")"
        );
        assert!(chart.contains(MINTING_MESSAGE));
        let kubelet = minting_condition(&[]);
        assert!(chart.contains(&format!("$kubelet := {:?}", &kubelet[1..])));
        assert_eq!(
            minting_condition(&["ci".to_string()]),
            "!((request.userInfo.username.startsWith('system:node:') && 'system:nodes' in request.userInfo.groups) || request.userInfo.username in ['ci'])"
        );
    }

    #[test]
    fn a_consumer_token_names_its_service_account_by_uid_and_nothing_else_does() {
        use k8s_openapi::api::authentication::v1::UserInfo;
        const SA_UID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        let review =
            |username: &str, uid: Option<&str>, audiences: &[&str], ok: bool| TokenReviewStatus {
                authenticated: Some(ok),
                audiences: Some(audiences.iter().map(|s| s.to_string()).collect()),
                user: Some(UserInfo {
                    username: Some(username.into()),
                    uid: uid.map(str::to_string),
                    ..UserInfo::default()
                }),
                error: None,
            };
        let sa = "system:serviceaccount:team-a:edge-agent";
        assert_eq!(
            service_account_of(
                &review(sa, Some(SA_UID), &[CONSUMER_AUDIENCE], true),
                CONSUMER_AUDIENCE
            ),
            Ok(PodId {
                namespace: "team-a".into(),
                uid: SA_UID.into()
            })
        );
        let refused = [
            // Not authenticated, or for another audience (a pod token, an API token).
            review(sa, Some(SA_UID), &[CONSUMER_AUDIENCE], false),
            review(sa, Some(SA_UID), &["keyward"], true),
            review(sa, Some(SA_UID), &[], true),
            // Not a ServiceAccount: a user or a node.
            review("alice", Some(SA_UID), &[CONSUMER_AUDIENCE], true),
            review("system:node:n1", Some(SA_UID), &[CONSUMER_AUDIENCE], true),
            review(
                "system:serviceaccount:team-a:",
                Some(SA_UID),
                &[CONSUMER_AUDIENCE],
                true,
            ),
            // No UID, or not a UUID.
            review(sa, None, &[CONSUMER_AUDIENCE], true),
            review(sa, Some("edge-agent"), &[CONSUMER_AUDIENCE], true),
            review(
                sa,
                Some("00000000-0000-0000-0000-000000000000"),
                &[CONSUMER_AUDIENCE],
                true,
            ),
        ];
        for r in refused {
            assert!(service_account_of(&r, CONSUMER_AUDIENCE).is_err(), "{r:?}");
        }
        // A consumer-audience token never names a pod, whatever its extras.
        let bound = status(sa, &[UID], &[CONSUMER_AUDIENCE], true);
        assert!(pod_of(&bound, DEFAULT_AUDIENCE).is_err());
    }

    #[test]
    fn only_an_authenticated_pod_bound_token_for_the_audience_names_a_pod() {
        let sa = "system:serviceaccount:team-a:agent";
        assert_eq!(
            pod_of(&status(sa, &[UID], &["keyward"], true), "keyward"),
            Ok(PodId {
                namespace: "team-a".into(),
                uid: UID.into()
            })
        );
        let cases: Vec<(TokenReviewStatus, NotAPod)> = vec![
            (
                status(sa, &[UID], &["keyward"], false),
                NotAPod::Unauthenticated,
            ),
            (status(sa, &[UID], &[], true), NotAPod::Unauthenticated),
            (
                status(sa, &[UID], &["https://kubernetes.default.svc"], true),
                NotAPod::Unauthenticated,
            ),
            (
                status("alice", &[UID], &["keyward"], true),
                NotAPod::NotPodBound,
            ),
            (
                status("system:node:n1", &[UID], &["keyward"], true),
                NotAPod::NotPodBound,
            ),
            (status(sa, &[], &["keyward"], true), NotAPod::NotPodBound),
            (
                status(sa, &[UID, UID], &["keyward"], true),
                NotAPod::NotPodBound,
            ),
            (
                status(sa, &["not-a-uuid"], &["keyward"], true),
                NotAPod::NotPodBound,
            ),
            (
                status(
                    sa,
                    &["00000000-0000-0000-0000-000000000000"],
                    &["keyward"],
                    true,
                ),
                NotAPod::NotPodBound,
            ),
            (
                status("system:serviceaccount::agent", &[UID], &["keyward"], true),
                NotAPod::NotPodBound,
            ),
        ];
        for (s, want) in cases {
            assert_eq!(pod_of(&s, "keyward"), Err(want), "{s:?}");
        }
        let mut errored = status(sa, &[UID], &["keyward"], true);
        errored.error = Some("boom".into());
        assert_eq!(pod_of(&errored, "keyward"), Err(NotAPod::Unauthenticated));
    }

    #[derive(Default)]
    struct Recorded(Mutex<Vec<Use>>);
    impl UseLog for Recorded {
        fn record(&self, used: Use) {
            self.0.lock().expect("lock").push(used);
        }
    }

    fn key(ns: &str) -> KeyRef {
        KeyRef {
            namespace: ns.into(),
            name: "pk".into(),
        }
    }

    #[tokio::test]
    async fn a_pod_token_is_reviewed_once_and_attributes_only_in_its_namespace() {
        let table = Arc::new(Table::new([
            (
                "good",
                status(
                    "system:serviceaccount:team-a:agent",
                    &[UID],
                    &["keyward"],
                    true,
                ),
            ),
            (
                "forged",
                status(
                    "system:serviceaccount:team-a:agent",
                    &[UID],
                    &["keyward"],
                    false,
                ),
            ),
        ]));
        let stats = Arc::new(Stats::default());
        let ids = Arc::new(PodIdentity::new(
            table.clone(),
            DEFAULT_AUDIENCE,
            stats.clone(),
        ));
        let rec = Arc::new(Recorded::default());
        let log: Arc<dyn UseLog> = rec.clone();
        let at = Utc::now();
        let h = |s: &str| http::HeaderValue::from_str(s).expect("header");

        // First sight: unattributed now, the pod's use recorded once reviewed.
        let first = ids.attribute(Some(&h("good")), &key("team-a"), "k1", at, &log);
        assert_eq!(first, Instance::Unattributed);
        for _ in 0..50 {
            if !rec.0.lock().expect("lock").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let recorded = rec.0.lock().expect("lock").clone();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].instance, Instance::Pod(UID.into()));
        assert_eq!((recorded[0].kid.as_str(), recorded[0].at), ("k1", at));
        // Then from the cache, without another review.
        for _ in 0..10 {
            assert_eq!(
                ids.attribute(Some(&h("good")), &key("team-a"), "k1", at, &log),
                Instance::Pod(UID.into())
            );
        }
        // Another namespace's key: the pod does not count for it.
        assert_eq!(
            ids.attribute(Some(&h("good")), &key("team-b"), "k1", at, &log),
            Instance::Unattributed
        );
        assert_eq!(table.reviews(), 1);

        // A forged token: reviewed once, never a pod, remembered.
        for _ in 0..5 {
            assert_eq!(
                ids.attribute(Some(&h("forged")), &key("team-a"), "k1", at, &log),
                Instance::Unattributed
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(table.reviews(), 2);
        assert_eq!(stats.pod_token_reviews("unauthenticated"), 1);
        assert_eq!(stats.pod_token_reviews("pod"), 1);
        assert_eq!(
            rec.0.lock().expect("lock").len(),
            1,
            "no use recorded for a forged token"
        );

        // No header, an empty one, an oversize one: nothing reviewed.
        let big = "x".repeat(MAX_TOKEN_BYTES + 1);
        for v in [None, Some(h("")), Some(h(&big))] {
            assert_eq!(
                ids.attribute(v.as_ref(), &key("team-a"), "k1", at, &log),
                Instance::Unattributed
            );
        }
        assert_eq!(table.reviews(), 2);
    }

    #[tokio::test]
    async fn the_cache_and_the_reviews_in_flight_are_bounded() {
        let mut cache = Cache::default();
        let now = Instant::now();
        for i in 0..MAX_CACHED {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_le_bytes());
            assert!(cache.insert(
                k,
                Entry {
                    verdict: Verdict::Refused,
                    until: now + REFUSED_TTL
                },
                now
            ));
        }
        assert!(!cache.insert(
            [0xff; 32],
            Entry {
                verdict: Verdict::Refused,
                until: now + REFUSED_TTL
            },
            now
        ));
        // Expired entries make room.
        let later = now + REFUSED_TTL + Duration::from_secs(1);
        assert!(cache.insert(
            [0xff; 32],
            Entry {
                verdict: Verdict::Refused,
                until: later + REFUSED_TTL
            },
            later
        ));
        assert_eq!(cache.entries.len(), 1);

        // A reviewer that never answers: at most MAX_IN_FLIGHT reviews, the rest `busy`.
        struct Never(AtomicUsize);
        impl Reviewer for Never {
            fn review(
                &self,
                _: String,
                _: String,
            ) -> BoxFuture<'static, Result<TokenReviewStatus, String>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Box::pin(futures::future::pending())
            }
        }
        let never = Arc::new(Never(AtomicUsize::new(0)));
        let stats = Arc::new(Stats::default());
        let ids = Arc::new(PodIdentity::new(
            never.clone(),
            DEFAULT_AUDIENCE,
            stats.clone(),
        ));
        let log: Arc<dyn UseLog> = Arc::new(Recorded::default());
        for i in 0..100 {
            let v = http::HeaderValue::from_str(&format!("t{i}")).expect("header");
            ids.attribute(Some(&v), &key("a"), "k", Utc::now(), &log);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(never.0.load(Ordering::SeqCst), MAX_IN_FLIGHT);
        assert_eq!(stats.pod_token_reviews("busy"), 100 - MAX_IN_FLIGHT as u64);
    }
}
