//! Running the binaries Cargo built for a test run.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};

/// Copies a binary Cargo built for this test run (`env!("CARGO_BIN_EXE_<name>")`) into `dir` and
/// checks that it contains `marker` (for example a text compiled in only with a feature).
///
/// `target/debug/<name>` is shared by every build of the workspace: a concurrent `cargo build`
/// with other features replaces it while tests run (seen: crash tests ran a binary without fault
/// injection and waited for an abort that never came). A private copy taken at the start of a
/// test cannot change under it.
pub fn private_binary_copy(src: &str, dir: &Path, marker: &[u8]) -> anyhow::Result<PathBuf> {
    let name = Path::new(src)
        .file_name()
        .context("binary path has no file name")?;
    let dst = dir.join(name);
    std::fs::copy(src, &dst).with_context(|| format!("copy {src}"))?;
    let bytes = std::fs::read(&dst)?;
    ensure!(
        !marker.is_empty() && bytes.windows(marker.len()).any(|w| w == marker),
        "{src} lacks {:?}: it was rebuilt by a concurrent cargo build with other features; run the tests again",
        String::from_utf8_lossy(marker)
    );
    Ok(dst)
}
