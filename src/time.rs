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
}
