//! Test certificates by the `openssl` command: a CA, and a server certificate for 127.0.0.1 it
//! signs (a self-signed server certificate carries `CA:TRUE`, which rustls refuses as a
//! server's own).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, ensure};

/// In `dir`: `ca.crt` (and its key) and a server pair `tls.crt`, `tls.key` for 127.0.0.1.
/// Returns `(ca, cert, key)`.
pub fn ca_and_server(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl")?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subj = [
        "-days",
        "1",
        "-subj",
        "/CN=keyward test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ];
    openssl(&[&["req", "-x509"][..], &ec, &subj].concat())?;
    let csr = [
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "tls.key",
        "-out",
        "tls.csr",
    ];
    openssl(&[&["req"][..], &ec, &csr].concat())?;
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "tls.crt",
    ])?;
    Ok((dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key")))
}
