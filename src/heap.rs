//! Gives the system back the memory glibc's allocator keeps after a burst.
//!
//! glibc returns freed memory to the system by itself only from the top of an arena, and only
//! while nothing live sits above it. After a burst (the PolicyAgents' checks listing pods and
//! ReplicaSets, a watch's relist, a cold start) the freed pages stay resident although nothing
//! uses them: about 11 MiB of an idle operator at 1,000 keys with the benchmark's 100
//! PolicyAgents, against a live heap far below RSS (docs/performance.md, "Memory").
//! `malloc_trim(0)` hands back every whole free page of every arena; live allocations are not
//! touched.
//!
//! This is the one `unsafe` call of the crate (`unsafe_code` is denied everywhere else): a call
//! into glibc with no pointer and no precondition.

use std::time::Duration;

/// How often a long-running command trims: often enough that an idle process is back at its
/// live size within seconds of a burst; the trim itself walks the free lists (microseconds
/// when there is nothing to give back).
pub const PERIOD: Duration = Duration::from_secs(10);

/// Returns the free pages of every arena to the system. Whether anything was returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim() -> bool {
    // SAFETY: `malloc_trim` takes no pointer and has no precondition; glibc takes each arena's
    // lock while it trims that arena, as it does for any malloc or free.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere (musl, other systems) the allocator returns memory by itself, or has no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() -> bool {
    false
}

/// Trims every [`PERIOD`], for as long as the process runs (spawned by `keyward run`,
/// `keyward verifier` and `keyward agent-proxy`).
pub async fn trim_periodically() {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let released = trim();
        tracing::trace!(released, "heap trimmed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, from `/proc/self/statm` (pages of 4 KiB).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Memory freed below a live allocation stays resident until the trim, and the trim gives
    /// it back without touching what is live.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn a_trim_returns_memory_freed_below_a_live_allocation() {
        const MIB: u64 = 1 << 20;
        // 64 MiB in small blocks (below glibc's mmap threshold, so they come from the heap),
        // written so their pages are resident, then one live block above them.
        let blocks: Vec<Box<[u8; 1024]>> = (0..64 * 1024).map(|_| Box::new([7u8; 1024])).collect();
        let live = Box::new([9u8; 1024]);
        let before_free = rss_bytes();
        drop(blocks);
        let freed = rss_bytes();
        trim();
        let after = rss_bytes();
        assert_eq!(live[1023], 9);
        assert!(
            before_free.saturating_sub(freed) < 32 * MIB,
            "glibc returned the blocks by itself ({} MiB): the test shows nothing",
            before_free.saturating_sub(freed) / MIB
        );
        assert!(
            freed.saturating_sub(after) >= 32 * MIB,
            "the trim returned {} MiB of 64 freed",
            freed.saturating_sub(after) / MIB
        );
    }

    /// The trim is the crate's only `unsafe`: no other file allows it.
    #[test]
    fn no_other_code_allows_unsafe() {
        let needle = ["allow(", "unsafe_code)"].concat();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut stack = vec![root.clone()];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && path != root.join("heap.rs")
                    && std::fs::read_to_string(&path).unwrap().contains(&needle)
                {
                    found.push(path);
                }
            }
        }
        assert!(found.is_empty(), "unsafe code allowed in {found:?}");
    }
}
