//! Time and durations, a leaf module: Go-style durations from user input, and timestamps as
//! Keyward stores them (RFC 3339, whole seconds). Used by the rotation, the usage evidence and
//! the flags alike; it depends on nothing of Keyward's.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Parses a Go-style duration (`720h`, `1h30m`, `500ms`) from user input; `None` when malformed.
/// The one entry point for every duration in a spec or a flag: it never panics.
pub fn parse_duration(value: &str) -> Option<Duration> {
    Some(value)
        .filter(|v| well_formed(v))
        .and_then(|v| kube::core::Duration::from_str(v).ok())
        .filter(|d| !d.is_negative())
        .map(Into::into)
}

/// Whether `value` matches [`crate::api::DURATION_PATTERN`] (one or more `<digits>[.<digits>]<unit>`)
/// and is at most about 30,000 years. kube's parser accepts more (`""`, `0`, `+5m`) and panics on
/// a negative component (`1h-5m`) or on overflow (`99999999999999999999h`, which the schema
/// pattern allows), so it only sees values that pass this check.
fn well_formed(value: &str) -> bool {
    const UNITS: [(&str, f64); 7] = [
        ("ns", 1e-9),
        ("us", 1e-6),
        ("µs", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
        ("m", 60.0),
        ("h", 3600.0),
    ];
    let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (mut rest, mut total) = (value, 0f64);
    while !rest.is_empty() {
        let mut len = digits(rest);
        if len == 0 {
            return false;
        }
        if let Some(frac) = rest[len..].strip_prefix('.') {
            match digits(frac) {
                0 => return false,
                n => len += 1 + n,
            }
        }
        let Ok(number) = rest[..len].parse::<f64>() else {
            return false;
        };
        rest = &rest[len..];
        let Some((unit, scale)) = UNITS.iter().find(|(u, _)| rest.starts_with(u)) else {
            return false;
        };
        rest = &rest[unit.len()..];
        total += number * scale;
    }
    !value.is_empty() && total.is_finite() && total <= 1e12
}

/// Formats a timestamp the way Keyward stores it (RFC 3339, seconds, `Z`).
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Formats the start of a wait (`published-at`, `retired-at`, `rolled-at`, ...) rounded UP to the
/// whole second, so that a wait measured from the stored value is never shorter than asked
/// (truncating would let `publishDelay: 2s` end after 1.0 s).
pub fn ts_start(t: DateTime<Utc>) -> String {
    let rounded = if t.timestamp_subsec_nanos() > 0 {
        DateTime::from_timestamp(t.timestamp().saturating_add(1), 0).unwrap_or(t)
    } else {
        t
    };
    ts(rounded)
}

/// Parses a timestamp as Keyward stores it (RFC 3339).
pub fn parse_ts(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Where decisions take `now` from: the wall clock in the process, a [`ManualClock`] in tests
/// that are not about real time. The controllers read it once per reconcile and pass `now`
/// down; nothing that decides reads the wall clock itself.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The operator's clock: the API server's time, carried forward by the monotonic clock.
///
/// The local wall clock can jump (an NTP step, a VM restored from a snapshot, a bad RTC), and
/// every timed decision Keyward makes (token `nbf`/`exp`, overlaps, timeouts, schedules) would
/// jump with it: an hour forward issues tokens that verifiers refuse as not yet valid and
/// times out rollouts; an hour back issues tokens that are already expired. So after start the
/// wall clock is read only to report skew. Time is an anchor (a wall time at a monotonic
/// instant) plus the monotonic time since; the anchor starts at the local wall clock and
/// follows the API server, the cluster's reference for every timestamp Keyward writes: each
/// response's `Date` header ([`ApiClock::observe_date`]) re-anchors the clock when it falls
/// outside the window that header allows.
#[derive(Debug)]
pub struct ApiClock {
    anchor: std::sync::Mutex<(DateTime<Utc>, std::time::Instant)>,
}

/// A `Date` header has whole seconds and is stamped before the response travels: the server's
/// time at receipt lies in `[date, date + 1 s + latency]`. An estimate that far outside (or
/// further) is re-anchored to `date + 0.5 s`.
const DATE_BEHIND: chrono::Duration = chrono::Duration::seconds(1);
const DATE_AHEAD: chrono::Duration = chrono::Duration::seconds(2);

/// Where to re-anchor an `estimate` of the server's time at receipt given the response's
/// `date`, or `None` when the estimate is consistent with it.
pub fn reanchor(estimate: DateTime<Utc>, date: DateTime<Utc>) -> Option<DateTime<Utc>> {
    (estimate < date - DATE_BEHIND || estimate > date + DATE_AHEAD)
        .then(|| date + chrono::Duration::milliseconds(500))
}

impl ApiClock {
    /// Anchored at the local wall clock now.
    pub fn new() -> Self {
        Self::anchored(Utc::now(), std::time::Instant::now())
    }

    pub fn anchored(wall: DateTime<Utc>, at: std::time::Instant) -> Self {
        ApiClock {
            anchor: std::sync::Mutex::new((wall, at)),
        }
    }

    /// The time at monotonic instant `at`.
    pub fn at(&self, at: std::time::Instant) -> DateTime<Utc> {
        let (wall, anchor) = *self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        let since = if at >= anchor {
            chrono::Duration::from_std(at - anchor).unwrap_or(chrono::Duration::MAX)
        } else {
            -chrono::Duration::from_std(anchor - at).unwrap_or(chrono::Duration::MAX)
        };
        wall.checked_add_signed(since).unwrap_or(wall)
    }

    /// A response's `Date` (the server's clock), received at `received`. Returns how far the
    /// clock moved (positive: forward) when it was re-anchored.
    pub fn observe_date(
        &self,
        date: DateTime<Utc>,
        received: std::time::Instant,
    ) -> Option<chrono::Duration> {
        let estimate = self.at(received);
        let to = reanchor(estimate, date)?;
        *self.anchor.lock().unwrap_or_else(|e| e.into_inner()) = (to, received);
        Some(to - estimate)
    }

    /// The local wall clock minus this clock (positive: the local clock is ahead).
    pub fn local_skew(&self) -> chrono::Duration {
        Utc::now() - self.now()
    }
}

impl Default for ApiClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ApiClock {
    fn now(&self) -> DateTime<Utc> {
        self.at(std::time::Instant::now())
    }
}

/// Parses an HTTP `Date` header (IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_http_date(v: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A clock that moves only when told (tests).
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(std::sync::Mutex::new(at))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t = chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| t.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A shared clock for configuration structs (cloneable, printable).
#[derive(Clone)]
pub struct SharedClock(pub std::sync::Arc<dyn Clock>);

impl SharedClock {
    pub fn now(&self) -> DateTime<Utc> {
        self.0.now()
    }
}

impl Default for SharedClock {
    fn default() -> Self {
        SharedClock(std::sync::Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let c = std::sync::Arc::new(ManualClock::new(t0));
        let shared = SharedClock(c.clone());
        assert_eq!(shared.now(), t0);
        c.advance(Duration::from_secs(90));
        assert_eq!(shared.now().timestamp(), 1_800_000_090);
        c.set(t0);
        assert_eq!(c.now(), t0);
        c.advance(Duration::MAX);
        assert_eq!(c.now(), DateTime::<Utc>::MAX_UTC);
        assert!(SharedClock::default().now() > t0 - chrono::Duration::days(3650));
    }

    #[test]
    fn the_api_clock_follows_the_monotonic_clock_and_the_servers_date_only() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let i0 = std::time::Instant::now();
        let c = ApiClock::anchored(t0, i0);
        let at = |s: u64| i0 + Duration::from_secs(s);
        assert_eq!(c.at(at(90)).timestamp(), 1_800_000_090);
        // A Date consistent with the estimate (whole seconds, stamped before the response
        // travelled) moves nothing.
        for (received, date) in [(90, 90), (90, 89), (90, 88), (90, 91)] {
            let d = t0 + chrono::Duration::seconds(date - 90 + 90);
            assert_eq!(c.observe_date(d, at(received)), None, "date {date}");
        }
        assert_eq!(c.at(at(90)).timestamp(), 1_800_000_090);
        // The server is an hour ahead of the anchor (the local clock was an hour behind at
        // start): the clock follows it, from that instant on.
        let server = t0 + chrono::Duration::seconds(3600 + 100);
        let moved = c.observe_date(server, at(100)).expect("re-anchored");
        assert_eq!(moved.num_milliseconds(), 3_600_500);
        assert_eq!(c.at(at(100)), server + chrono::Duration::milliseconds(500));
        assert_eq!(
            c.at(at(160)),
            server + chrono::Duration::milliseconds(60_500)
        );
        // And back.
        let moved = c
            .observe_date(t0 + chrono::Duration::seconds(200), at(200))
            .expect("re-anchored");
        assert!(moved < -chrono::Duration::seconds(3599));
        // Instants before the anchor are in its past.
        assert!(c.at(i0) < c.at(at(200)));
    }

    #[test]
    fn reanchor_window_and_http_dates() {
        let d = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let ms = chrono::Duration::milliseconds;
        assert_eq!(reanchor(d, d), None);
        assert_eq!(reanchor(d + ms(2000), d), None);
        assert_eq!(reanchor(d - ms(1000), d), None);
        assert_eq!(reanchor(d + ms(2001), d), Some(d + ms(500)));
        assert_eq!(reanchor(d - ms(1001), d), Some(d + ms(500)));
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").map(|t| t.timestamp()),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        // The wall clock is only read for the skew, which is small here.
        assert!(ApiClock::new().local_skew().num_seconds().abs() < 5);
    }
}
