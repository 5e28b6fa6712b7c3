//! Rotation windows (`spec.rotation.window`): when a scheduled rotation may start. Pure: a
//! window and an instant in, the first instant at or after it that lies in the window out.
//!
//! A window is a daily span of local wall-clock time (`start`, `end`, `HH:MM`) on some days of
//! the week, in an IANA time zone (compiled in with `chrono-tz`). When `end` is at or before
//! `start`, the span runs past midnight into the next day (`22:00`-`06:00`). Daylight saving:
//! a local time the clocks skip (02:30 on a spring-forward night) is read as the first instant
//! after the gap; a local time that occurs twice (02:30 on a fall-back night) as its first
//! occurrence. Only scheduled rotations wait for a window; requests and compromise never do.

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Days the window opens on (Monday = 0), by the local date of its `start`.
    pub days: [bool; 7],
    pub start: NaiveTime,
    pub end: NaiveTime,
    pub tz: Tz,
}

/// Day names as the spec writes them.
pub const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Why a window does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("{0:?} is not a time of day (HH:MM, 00:00 to 23:59)")]
    Time(String),
    #[error("{0:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")]
    Day(String),
    #[error("{0:?} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)")]
    TimeZone(String),
    #[error("start and end are the same time: the window would never close or never open")]
    Empty,
}

fn time(s: &str) -> Result<NaiveTime, WindowError> {
    let ok = s.len() == 5 && s.as_bytes()[2] == b':';
    ok.then(|| NaiveTime::parse_from_str(s, "%H:%M").ok())
        .flatten()
        .ok_or_else(|| WindowError::Time(s.to_string()))
}

impl Window {
    /// Parses the spec's fields; no days means every day, no time zone means UTC.
    pub fn parse(
        days: &[String],
        start: &str,
        end: &str,
        time_zone: Option<&str>,
    ) -> Result<Self, WindowError> {
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(WindowError::Empty);
        }
        let mut set = [days.is_empty(); 7];
        for d in days {
            let i = DAYS
                .iter()
                .position(|n| n == d)
                .ok_or_else(|| WindowError::Day(d.clone()))?;
            set[i] = true;
        }
        let tz = match time_zone {
            None => Tz::UTC,
            Some(name) => name
                .parse::<Tz>()
                .map_err(|_| WindowError::TimeZone(name.to_string()))?,
        };
        Ok(Window {
            days: set,
            start,
            end,
            tz,
        })
    }

    /// The instant of local `date` `t`: a skipped time is the first instant after the gap, a
    /// repeated time its first occurrence.
    fn instant(&self, date: NaiveDate, t: NaiveTime) -> Option<DateTime<Utc>> {
        let local = date.and_time(t);
        match self.tz.from_local_datetime(&local) {
            LocalResult::Single(x) => Some(x.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
            LocalResult::None => {
                // In a gap: the first whole minute that exists after it (gaps last at most a
                // few hours).
                (1..=24 * 60).find_map(|m| {
                    self.tz
                        .from_local_datetime(&(local + Duration::minutes(m)))
                        .earliest()
                        .map(|x| x.with_timezone(&Utc))
                })
            }
        }
    }

    /// The span `[open, close)` of the window that opens on local `date`, if it opens that day.
    fn span(&self, date: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.days[date.weekday().num_days_from_monday() as usize] {
            return None;
        }
        let open = self.instant(date, self.start)?;
        let close_date = if self.end <= self.start {
            date.succ_opt()?
        } else {
            date
        };
        let close = self.instant(close_date, self.end)?;
        (close > open).then_some((open, close))
    }

    /// Whether `t` lies in the window.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.next_open(t) == Some(t)
    }

    /// The first instant at or after `t` inside the window: `t` itself when the window is
    /// open, else the next opening. `None` only for a window that never opens (no day set).
    pub fn next_open(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = t.with_timezone(&self.tz).date_naive();
        // Yesterday's window may still be open (past midnight); a week and a day cover every
        // next opening.
        let mut best: Option<DateTime<Utc>> = None;
        let mut date = today.pred_opt()?;
        for _ in 0..9 {
            if let Some((open, close)) = self.span(date) {
                if open <= t && t < close {
                    return Some(t);
                }
                if open > t && best.is_none_or(|b| open < b) {
                    best = Some(open);
                }
            }
            date = date.succ_opt()?;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid time")
            .with_timezone(&Utc)
    }

    fn w(days: &[&str], start: &str, end: &str, tz: &str) -> Window {
        let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
        Window::parse(&days, start, end, Some(tz)).expect("valid window")
    }

    /// (window, now, the first instant a scheduled rotation may start)
    #[test]
    fn next_opening_table() {
        let office = w(
            &["Mon", "Tue", "Wed", "Thu", "Fri"],
            "09:00",
            "17:00",
            "Europe/Berlin",
        );
        let night = w(&[], "22:00", "06:00", "America/New_York");
        #[rustfmt::skip]
        let rows: Vec<(&str, &Window, &str, &str)> = vec![
            ("inside: at once", &office, "2026-12-07T10:00:00Z", "2026-12-07T10:00:00Z"),
            ("before opening: the same day's 09:00 CET", &office, "2026-12-07T05:00:00Z", "2026-12-07T08:00:00Z"),
            ("the close is exclusive", &office, "2026-12-07T16:00:00Z", "2026-12-08T08:00:00Z"),
            ("Friday evening: Monday 09:00", &office, "2026-12-04T18:00:00Z", "2026-12-07T08:00:00Z"),
            ("Saturday: Monday", &office, "2026-12-05T12:00:00Z", "2026-12-07T08:00:00Z"),
            ("summer time: 09:00 CEST is 07:00 UTC", &office, "2026-07-01T06:00:00Z", "2026-07-01T07:00:00Z"),
            ("past midnight, still open (yesterday's window)", &night, "2026-12-07T09:00:00Z", "2026-12-07T09:00:00Z"),
            ("overnight window: opens 22:00 EST", &night, "2026-12-07T12:00:00Z", "2026-12-08T03:00:00Z"),
        ];
        for (why, win, now, want) in rows {
            assert_eq!(win.next_open(utc(now)), Some(utc(want)), "{why}");
        }
    }

    /// Spring forward in Berlin (2026-03-29, 02:00 CET becomes 03:00 CEST): a window opening at
    /// 02:30 opens at the first instant after the gap, 03:00 CEST (01:00 UTC). Fall back
    /// (2026-10-25, 03:00 CEST becomes 02:00 CET): 02:30 happens twice; the window opens at
    /// the first, 00:30 UTC, and closes at 04:00 CET (03:00 UTC), an hour longer that night.
    #[test]
    fn daylight_saving_transitions() {
        let early = w(&["Sun"], "02:30", "04:00", "Europe/Berlin");
        assert_eq!(
            early.next_open(utc("2026-03-28T12:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        assert!(early.contains(utc("2026-03-29T01:59:00Z")));
        assert!(
            !early.contains(utc("2026-03-29T02:00:00Z")),
            "04:00 CEST closes it"
        );
        assert_eq!(
            early.next_open(utc("2026-10-24T12:00:00Z")),
            Some(utc("2026-10-25T00:30:00Z"))
        );
        assert!(early.contains(utc("2026-10-25T02:59:00Z")));
        assert!(!early.contains(utc("2026-10-25T03:00:00Z")));
        // New York springs forward at 02:00 too (2026-03-08): an overnight window still opens
        // and closes once per night.
        let night = w(&[], "01:30", "05:00", "America/New_York");
        assert_eq!(
            night.next_open(utc("2026-03-08T05:00:00Z")),
            Some(utc("2026-03-08T06:30:00Z")),
            "01:30 EST exists; it is open until 05:00 EDT"
        );
        assert!(night.contains(utc("2026-03-08T08:59:00Z")));
        assert!(!night.contains(utc("2026-03-08T09:00:00Z")));
    }

    #[test]
    fn bad_windows_say_why() {
        let p = |d: &[&str], s: &str, e: &str, tz: Option<&str>| {
            let d: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            Window::parse(&d, s, e, tz)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(p(&[], "9:00", "17:00", None).is_err_and(|e| e.contains("HH:MM")));
        assert!(p(&[], "24:00", "17:00", None).is_err());
        assert!(p(&["Monday"], "09:00", "17:00", None).is_err_and(|e| e.contains("Mon, Tue")));
        assert!(p(&[], "09:00", "17:00", Some("Mars/Olympus")).is_err_and(|e| e.contains("IANA")));
        assert!(p(&[], "09:00", "09:00", None).is_err_and(|e| e.contains("same time")));
        assert_eq!(p(&[], "09:00", "17:00", None), Ok(()));
    }

    proptest::proptest! {
        /// Whatever the window and the instant: the answer is at or after the instant, inside
        /// the window, within 8 days, and nothing between the two is inside the window (the
        /// first opening), checked minute by minute over the next day.
        #[test]
        fn next_open_is_the_first_open_instant(
            mask in 1u8..128,
            start in 0u32..1440,
            len in 1u32..1439,
            tz in proptest::sample::select(vec!["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
            secs in 1_767_225_600i64..1_830_297_600,
        ) {
            let days: Vec<String> = (0..7).filter(|i| mask & (1 << i) != 0).map(|i| DAYS[i].to_string()).collect();
            let hm = |m: u32| format!("{:02}:{:02}", m / 60 % 24, m % 60);
            let end = (start + len) % 1440;
            let win = Window::parse(&days, &hm(start), &hm(end), Some(tz)).expect("valid");
            let t = DateTime::from_timestamp(secs, 0).expect("valid");
            let open = win.next_open(t).expect("some day is set");
            proptest::prop_assert!(open >= t);
            proptest::prop_assert!(open - t <= Duration::days(8));
            proptest::prop_assert!(win.contains(open));
            let mut m = t + Duration::minutes(1);
            while m < open && m < t + Duration::days(1) {
                proptest::prop_assert!(!win.contains(m), "open at {m}, before {open}");
                m += Duration::minutes(1);
            }
        }
    }
}
