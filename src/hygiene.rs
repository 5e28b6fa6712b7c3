//! Process hygiene for a program that holds private keys: no core dumps, and no ptrace or
//! `/proc/<pid>/mem` reads by other processes of the same user.

/// Turns core dumps off for this process (`RLIMIT_CORE` 0, soft and hard) and marks it not
/// dumpable (`PR_SET_DUMPABLE` 0), so a crash or a `SIGQUIT` writes no memory image that could
/// hold key bytes. Linux only; elsewhere a no-op. Errors are returned for the caller to log:
/// the process is still correct without them.
pub fn forbid_core_dumps() -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{
            DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit,
        };
        setrlimit(
            Resource::Core,
            Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        )
        .map_err(|e| format!("setrlimit(RLIMIT_CORE, 0): {e}"))?;
        set_dumpable_behavior(DumpableBehavior::NotDumpable)
            .map_err(|e| format!("prctl(PR_SET_DUMPABLE, 0): {e}"))?;
    }
    Ok(())
}

/// Whether this process is currently dumpable (`PR_GET_DUMPABLE`); `None` off Linux.
pub fn dumpable() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        rustix::process::dumpable_behavior()
            .ok()
            .map(|b| b != rustix::process::DumpableBehavior::NotDumpable)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
