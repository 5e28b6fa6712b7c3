//! When scheduled work falls due: the interval rotation and the token refresh.
//!
//! Keys created together (1,000 ProvisioningKeys applied by one GitOps sync) would otherwise
//! fall due together, interval after interval: a burst of mints, bundle writes, hand-outs and
//! workload rolls at the same second, and a burst of token refreshes every half token life.
//! Each key therefore moves its scheduled times EARLIER by a per-key offset:
//!
//! - never later than asked: the offset is only ever subtracted, so a key never lives longer
//!   than `rotation.interval` and a token never comes closer to its expiry than half its life;
//! - bounded: at most [`JITTER_SHARE`] of the period (a rotation happens after at least 90% of
//!   the interval, a token is refreshed between 40% and 50% of its life) and at most
//!   [`JITTER_CAP`], so a long interval stays predictable to the minute;
//! - deterministic: the offset is a hash of the ProvisioningKey's uid (stable for the object's
//!   life, unlike its name, which a re-created object reuses), so the decision stays a pure
//!   function of (settings, evidence, now) and the same key always gets the same time.
//!
//! A herd of 1,000 keys spreads over the bound's whole seconds (up to 601 one-second slots for
//! a 10 minute bound), about two per second instead of 1,000 at once. After the first jittered
//! rotation the herd keeps spreading: each key's period is its own (interval minus its offset).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{ObservedKey, Settings, add};

/// Largest offset, whatever the period.
pub const JITTER_CAP: Duration = Duration::from_secs(600);
/// Largest offset as a share of the period: one tenth.
pub const JITTER_SHARE: u32 = 10;

/// What an offset is for: each purpose gets its own, independent offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Rotation,
    TokenRefresh,
}

impl Purpose {
    fn salt(self) -> &'static str {
        match self {
            Purpose::Rotation => "rotation",
            Purpose::TokenRefresh => "token-refresh",
        }
    }
}

/// The largest offset for `period`: a tenth of it, at most [`JITTER_CAP`], in whole seconds
/// (stored timestamps have whole seconds). Zero below 10 s.
pub fn bound(period: Duration) -> Duration {
    Duration::from_secs((period.as_secs() / u64::from(JITTER_SHARE)).min(JITTER_CAP.as_secs()))
}

/// 64 well-mixed bits from `uid` and `purpose`: FNV-1a, then the SplitMix64 finalizer (FNV
/// alone mixes its low bits poorly for inputs that differ only at the end, as uids may). Not
/// `std`'s hasher, whose output may change between Rust releases: the offset must not move
/// when the operator is rebuilt.
fn mix(uid: &str, purpose: Purpose) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in purpose.salt().bytes().chain([0]).chain(uid.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The offset of the key with `uid` for `purpose` over `period`: whole seconds in
/// `0..=bound(period)`. Zero without a uid (an object that never reached the API server, such as
/// a unit test's): with no stable seed, the time asked for.
pub fn offset(uid: &str, purpose: Purpose, period: Duration) -> Duration {
    if uid.is_empty() {
        return Duration::ZERO;
    }
    let b = bound(period).as_secs();
    Duration::from_secs(mix(uid, purpose) % (b + 1))
}

fn sub(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(t)
}

/// When the current key `cur` is due for its interval rotation as asked: `interval` after it
/// became current. `None` without an interval.
pub fn rotation_due_unjittered(settings: &Settings, cur: &ObservedKey) -> Option<DateTime<Utc>> {
    settings
        .interval
        .map(|i| add(cur.activated_at.unwrap_or(cur.created_at), i))
}

/// When the interval rotation of `cur` is started: [`rotation_due_unjittered`] minus this
/// key's rotation offset.
pub fn rotation_due(settings: &Settings, cur: &ObservedKey) -> Option<DateTime<Utc>> {
    let interval = settings.interval?;
    rotation_due_unjittered(settings, cur)
        .map(|due| sub(due, offset(&settings.uid, Purpose::Rotation, interval)))
}

/// When a token issued at `iat` and expiring at `exp` (seconds) is re-issued: at half its life,
/// minus this key's refresh offset over its lifetime. So between 40% and 50% of its life: it
/// never expires before its refresh, and the refresh is never due at the moment the new token is
/// issued (for lifetimes below 10 s there is no offset). `None` when the times make no sense.
pub fn token_refresh_at(settings: &Settings, iat: i64, exp: i64) -> Option<DateTime<Utc>> {
    let half = DateTime::from_timestamp(iat.checked_add(exp.checked_sub(iat)? / 2)?, 0)?;
    let life = Duration::from_secs(u64::try_from(exp - iat).ok()?);
    Some(sub(
        half,
        offset(&settings.uid, Purpose::TokenRefresh, life),
    ))
}

/// When a scheduled rotation may start: [`rotation_due`], then, with a `rotation.window`, the
/// window's next opening at or after both it and `now`. While the window is open, a due
/// rotation keeps its due time (already passed: it starts now), so the time shown in status
/// does not move with `now`. A window can delay a scheduled rotation, never hasten it.
pub fn rotation_start(
    settings: &Settings,
    cur: &ObservedKey,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let due = rotation_due(settings, cur)?;
    match &settings.window {
        None => Some(due),
        Some(w) if w.contains(due.max(now)) => Some(due),
        Some(w) => w.next_open(due.max(now)),
    }
}
