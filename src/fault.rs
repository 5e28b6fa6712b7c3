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

/// Called right before a named write is sent. A no-op in normal builds.
///
/// `KEYWARD_PAUSE_BEFORE=<point>` stops the process (SIGSTOP to itself) right before the first
/// write named `<point>`, after every check that precedes it (the leadership check included),
/// so a test can show what a paused leader does when it wakes: the HA tests resume it with
/// SIGCONT after another replica took over.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn before(_point: &str) {}

#[cfg(feature = "fault-injection")]
pub fn before(point: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DONE: AtomicBool = AtomicBool::new(false);
    if std::env::var("KEYWARD_PAUSE_BEFORE").ok().as_deref() != Some(point)
        || DONE.swap(true, Ordering::SeqCst)
    {
        return;
    }
    eprintln!("keyward: fault injection: stopping right before write {point:?}");
    let _ = std::process::Command::new("kill")
        .args(["-STOP", &std::process::id().to_string()])
        .status();
    // The stop is delivered asynchronously: make sure it took effect before the write.
    std::thread::sleep(std::time::Duration::from_millis(200));
    eprintln!("keyward: fault injection: resumed before write {point:?}");
}

/// Whether the leader-election write fence and leadership checks are switched off
/// (`KEYWARD_UNFENCED=1`, fault-injection builds only), so a test can show that the
/// resourceVersion preconditions alone refuse a woken ex-leader's stale write.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn unfenced() -> bool {
    false
}

#[cfg(feature = "fault-injection")]
pub fn unfenced() -> bool {
    std::env::var_os("KEYWARD_UNFENCED").is_some()
}
