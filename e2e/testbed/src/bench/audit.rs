//! The operator's requests, as the API server itself recorded them (its audit log).
//!
//! `e2e/cluster.sh up` with `KEYWARD_AUDIT_LOG=<path>` writes one JSON line per request stage
//! (Metadata level, `RequestReceived` omitted). The bench reads the file incrementally and keeps
//! the operator's requests: user agent `keyward/...`, or, whatever its user agent, the
//! ServiceAccount it runs as. Counting on the server side sees what the operator really sent,
//! retries and watch restarts included, with no help from the operator's code.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

/// One request of the operator.
#[derive(Clone, Debug)]
pub struct Request {
    /// When the API server received it.
    pub at: Timestamp,
    /// Kubernetes verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// `resource[/subresource]` (with `.group` for non-core groups), or the path for
    /// non-resource requests.
    pub resource: String,
    /// `ns` (namespaced request), `all` (cluster-wide, namespaced resource) or `-`.
    pub scope: &'static str,
    /// Whether the request names one object (get/patch/... by name).
    pub named: bool,
    /// The query, normalized: selectors kept with their values, other parameters by name only
    /// (resource versions, timeouts and continue tokens differ on every request).
    pub query: String,
    /// HTTP status code.
    pub code: i32,
    /// Who sent it (the authenticated user).
    pub user: String,
    /// The object's name, for a request that names one.
    pub name: Option<String>,
}

impl Request {
    /// Mutating request.
    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// The grouping key for "requests by resource and query".
    pub fn shape(&self) -> String {
        let target = if self.named { "/{name}" } else { "" };
        let query = if self.query.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query)
        };
        format!(
            "{} {} [{}{}]{}",
            self.verb, self.resource, self.scope, target, query
        )
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    #[serde(rename = "auditID")]
    audit_id: String,
    verb: String,
    #[serde(rename = "requestURI")]
    request_uri: String,
    user: User,
    #[serde(default)]
    user_agent: String,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    response_status: Option<Status>,
    request_received_timestamp: String,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    api_group: Option<String>,
    #[serde(default)]
    subresource: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    code: i32,
}

/// The audit log, read incrementally; keeps the operator's requests in memory.
pub struct AuditLog {
    path: PathBuf,
    users: Vec<String>,
    offset: u64,
    partial: Vec<u8>,
    seen: HashSet<String>,
    requests: Vec<Request>,
}

impl AuditLog {
    /// A reader for `path`, keeping requests with a `keyward/` user agent or by `user`.
    pub fn new(path: PathBuf, user: &str) -> Self {
        Self::with_users(path, &[user.to_string()])
    }

    /// A reader for `path`, keeping requests with a `keyward/` user agent or by one of `users`
    /// (tell them apart by [`Request::user`]).
    pub fn with_users(path: PathBuf, users: &[String]) -> Self {
        Self {
            path,
            users: users.to_vec(),
            offset: 0,
            partial: Vec::new(),
            seen: HashSet::new(),
            requests: Vec::new(),
        }
    }

    /// Reads what the API server appended since the last call.
    pub fn refresh(&mut self) -> anyhow::Result<()> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            // The API server creates the file with its first audited request.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("open {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let Ok(line) = serde_json::from_slice::<Line>(line) else {
                continue;
            };
            if !(line.user_agent.starts_with("keyward/")
                || self.users.contains(&line.user.username))
            {
                continue;
            }
            // A watch has two events (ResponseStarted, ResponseComplete): count it once.
            if !self.seen.insert(line.audit_id.clone()) {
                continue;
            }
            let Ok(at) = line.request_received_timestamp.parse::<Timestamp>() else {
                continue;
            };
            self.requests.push(request(at, line));
        }
        Ok(())
    }

    /// The operator's requests received in `[from, to)`.
    pub fn between(&self, from: Timestamp, to: Timestamp) -> Vec<&Request> {
        self.requests
            .iter()
            .filter(|r| r.at >= from && r.at < to)
            .collect()
    }

    /// When the operator's last request at or after `from` was received.
    pub fn last_since(&self, from: Timestamp) -> Option<Timestamp> {
        self.requests
            .iter()
            .filter(|r| r.at >= from)
            .map(|r| r.at)
            .max()
    }
}

fn request(at: Timestamp, line: Line) -> Request {
    let (path, query) = match line.request_uri.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (line.request_uri.clone(), String::new()),
    };
    let code = line.response_status.map_or(0, |s| s.code);
    let user = line.user.username;
    match line.object_ref {
        Some(o) if !o.resource.is_empty() => {
            let mut resource = o.resource;
            if let Some(g) = o.api_group.filter(|g| !g.is_empty()) {
                resource = format!("{resource}.{g}");
            }
            if let Some(s) = o.subresource.filter(|s| !s.is_empty()) {
                resource = format!("{resource}/{s}");
            }
            let scope = if o.namespace.is_some() {
                "ns"
            } else if path.contains("/namespaces/") || resource.starts_with("namespaces") {
                "-"
            } else {
                "all"
            };
            Request {
                at,
                verb: line.verb,
                resource,
                scope,
                named: o.name.is_some(),
                query: normalize_query(&query),
                code,
                user,
                name: o.name,
            }
        }
        _ => Request {
            at,
            verb: line.verb,
            resource: path,
            scope: "-",
            named: false,
            query: normalize_query(&query),
            code,
            user,
            name: None,
        },
    }
}

/// Keeps selectors (and `watch`) with their values, other parameters by name, sorted.
fn normalize_query(q: &str) -> String {
    let mut parts: Vec<String> = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = decode(k);
            match k.as_str() {
                "labelSelector" | "fieldSelector" => format!("{k}={}", generic(&decode(v))),
                "watch" | "fieldManager" | "force" => format!("{k}={}", decode(v)),
                _ => k,
            }
        })
        .collect();
    parts.sort();
    parts.join("&")
}

/// A selector with the values that name one object (they contain a digit, as the bench's
/// object names do: `key-00042`, `agent-007`) replaced by `*`, so requests of the same shape for
/// different objects group together.
fn generic(selector: &str) -> String {
    selector
        .split(',')
        .map(|term| match term.split_once('=') {
            Some((k, v)) if v.chars().any(|c| c.is_ascii_digit()) => format!("{k}=*"),
            _ => term.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-decoding (and `+` as space) of a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                } else {
                    out.push(b'%');
                    i += 1;
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts of requests by a key, sorted by count (descending), then key.
pub fn count_by<'a>(
    requests: impl IntoIterator<Item = &'a Request>,
    key: impl Fn(&Request) -> String,
) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in requests {
        *counts.entry(key(r)).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// A one-line summary: total, writes, and counts by verb (and error codes seen).
pub fn summary(requests: &[&Request], per: Option<usize>) -> String {
    let total = requests.len();
    if total == 0 {
        return "0 requests".to_string();
    }
    let writes = requests.iter().filter(|r| r.is_write()).count();
    let fmt = |n: usize| match per {
        Some(p) if p > 0 => format!("{:.2}", n as f64 / p as f64),
        _ => n.to_string(),
    };
    let verbs = count_by(requests.iter().copied(), |r| r.verb.clone())
        .into_iter()
        .map(|(v, n)| format!("{v} {}", fmt(n)))
        .collect::<Vec<_>>()
        .join(", ");
    let errors = count_by(requests.iter().copied().filter(|r| r.code >= 400), |r| {
        r.code.to_string()
    })
    .into_iter()
    .map(|(c, n)| match c.as_str() {
        "404" => format!("{n} x 404 (not found)"),
        "409" => format!("{n} x 409 (conflict)"),
        "429" => format!("{n} x 429 (too many requests)"),
        _ => format!("{n} x {c}"),
    })
    .collect::<Vec<_>>()
    .join(", ");
    let errors = if errors.is_empty() {
        String::new()
    } else {
        format!("; errors: {errors}")
    };
    match per {
        Some(p) if p > 0 => format!(
            "{} requests/key ({} writes/key): {verbs}{errors}",
            fmt(total),
            fmt(writes)
        ),
        _ => format!("{total} requests ({writes} writes): {verbs}{errors}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_normalized() {
        assert_eq!(
            normalize_query(
                "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dkeyward&resourceVersion=12&watch=true&timeoutSeconds=290"
            ),
            "labelSelector=app.kubernetes.io/managed-by=keyward&resourceVersion&timeoutSeconds&watch=true"
        );
        assert_eq!(
            normalize_query(
                "labelSelector=keyward.dev%2Fprovisioning-key%3Dkey-00001%2Ckeyward.dev%2Fcomponent%3Dkey"
            ),
            "labelSelector=keyward.dev/provisioning-key=*,keyward.dev/component=key"
        );
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("a+b%41"), "a bA");
    }
}
