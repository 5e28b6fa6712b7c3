//! Fault injection for crash tests, compiled only with the `fault-injection` feature.
//!
//! `KEYWARD_CRASH_AFTER=<point>[:<n>]` aborts the process right after the n-th (default first)
//! completed write named `<point>`, so a test can kill the operator at an exact place. Points:
//! `mint`, `mark-published`, `bundle`, `record-published`, `activate`, `retire`, `hand-out`,
//! `revoke`, `roll`, `confirm`.

/// What a fault-injection build prints as it aborts. Tests look for it in the binary to make sure
/// they run a fault-injection build (the text is only compiled in with the feature).
pub const ABORT_MESSAGE: &str = "keyward: fault injection: aborting right after write";

/// Called right after a named write succeeded. A no-op in normal builds.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn after(_point: &str) {}

#[cfg(feature = "fault-injection")]
pub fn after(point: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static HITS: AtomicU32 = AtomicU32::new(0);
    let Ok(spec) = std::env::var("KEYWARD_CRASH_AFTER") else {
        return;
    };
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name.to_string(), n.parse::<u32>().unwrap_or(1)),
        None => (spec.clone(), 1),
    };
    if name != point {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 >= n {
        eprintln!("{ABORT_MESSAGE} {point:?}");
        std::process::abort();
    }
}
