//! TLS for the verifier (`--tls-cert-file`, `--tls-key-file`): rustls with the `ring` provider,
//! and a certificate resolver that re-reads the two PEM files while the verifier runs.
//!
//! Reload: at most every [`RELOAD_INTERVAL`], the next handshake reads both files and compares
//! their contents (a SHA-256 of the bytes) with what is loaded. Contents, not modification
//! times: a Kubernetes Secret volume updates by swapping a `..data` symlink, which leaves the
//! paths and, often, the times alone. A new pair that parses, and whose key matches the
//! certificate, replaces the old one for the following handshakes; a broken one (half written,
//! wrong key, not PEM) keeps the last good pair and logs one warning per distinct bad content,
//! naming the files and the error, never key bytes. Open connections keep their session.
//!
//! The key file's bytes are read into a zeroizing buffer; rustls holds the parsed key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use zeroize::Zeroizing;

/// How often the files are compared with what is loaded (at most; only when a handshake comes).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// How `keyward verifier` serves: TLS from two files, or plain HTTP by explicit choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Tls { cert: PathBuf, key: PathBuf },
    PlainHttp,
}

impl Mode {
    /// The mode from `--tls-cert-file`, `--tls-key-file` and `--plain-http`; no TLS files and
    /// no `--plain-http` is an error (the verifier does not fall back to plain HTTP).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        plain_http: bool,
    ) -> Result<Mode, String> {
        let cert = cert.filter(|p| !p.as_os_str().is_empty());
        let key = key.filter(|p| !p.as_os_str().is_empty());
        match (cert, key, plain_http) {
            (Some(_), _, true) | (_, Some(_), true) => Err(
                "--plain-http and --tls-cert-file/--tls-key-file exclude each other: pick one"
                    .into(),
            ),
            (Some(cert), Some(key), false) => Ok(Mode::Tls {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }),
            (Some(_), None, false) => Err("--tls-cert-file needs --tls-key-file".into()),
            (None, Some(_), false) => Err("--tls-key-file needs --tls-cert-file".into()),
            (None, None, true) => Ok(Mode::PlainHttp),
            (None, None, false) => Err("no TLS certificate: pass --tls-cert-file and \
                 --tls-key-file (PEM), or --plain-http to serve plain HTTP (a sidecar on loopback)"
                .into()),
        }
    }

    /// The scheme the verifier serves, for the start-up log line.
    pub fn scheme(&self) -> &'static str {
        match self {
            Mode::Tls { .. } => "https",
            Mode::PlainHttp => "http",
        }
    }
}

/// Why a certificate/key pair was not loaded. Messages name files and rustls errors only.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM CERTIFICATE in it")]
    NoCertificate { path: String },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: String, reason: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1) in it")]
    BadKey { path: String },
    #[error("{key} does not fit {cert}: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider: rustls's `ring` (the one kube already uses).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A loaded pair and the digest of the bytes it came from.
struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
}

/// Reads and checks the pair; `digest` covers both files' bytes.
fn load(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Loaded, (TlsError, Option<[u8; 32]>)> {
    let read = |p: &Path| {
        std::fs::read(p).map(Zeroizing::new).map_err(|source| {
            (
                TlsError::Read {
                    path: p.display().to_string(),
                    source,
                },
                None,
            )
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let digest: [u8; 32] = {
        let mut h = Sha256::new();
        h.update((cert_pem.len() as u64).to_be_bytes());
        h.update(cert_pem.as_slice());
        h.update(key_pem.as_slice());
        h.finalize().into()
    };
    let bad = |e: TlsError| (e, Some(digest));
    let cert_name = || cert_path.display().to_string();
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            bad(TlsError::BadCertificate {
                path: cert_name(),
                reason: e.to_string(),
            })
        })?;
    if certs.is_empty() {
        return Err(bad(TlsError::NoCertificate { path: cert_name() }));
    }
    // The error of a key parse is not shown: it could quote the file.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        bad(TlsError::BadKey {
            path: key_path.display().to_string(),
        })
    })?;
    let key = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        bad(TlsError::Mismatch {
            cert: cert_name(),
            key: key_path.display().to_string(),
            reason: e.to_string(),
        })
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        digest,
    })
}

/// SHA-256 of the leaf certificate's DER, hex (for logs: public, identifies the certificate).
pub fn fingerprint(key: &CertifiedKey) -> String {
    key.cert.first().map_or_else(String::new, |c| {
        Sha256::digest(c.as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    })
}

/// Serves the last good pair read from two files, re-reading them at most every `interval`.
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    interval: Duration,
    current: RwLock<Loaded>,
    /// When the files were last compared, and the digest of the last bad content (warned once).
    checked: Mutex<(Instant, Option<[u8; 32]>)>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair now; an error here stops the verifier from starting.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        interval: Duration,
    ) -> Result<Self, TlsError> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let provider = provider();
        let loaded = load(&cert_path, &key_path, &provider).map_err(|(e, _)| e)?;
        info!(cert = %cert_path.display(), fingerprint = %fingerprint(&loaded.key),
              "TLS certificate loaded");
        Ok(ReloadingCert {
            cert_path,
            key_path,
            provider,
            interval,
            current: RwLock::new(loaded),
            checked: Mutex::new((Instant::now(), None)),
        })
    }

    /// The pair served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .key
            .clone()
    }

    /// Compares the files with what is loaded now and swaps in a good new pair. Returns whether
    /// the served pair changed.
    pub fn reload(&self) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        self.reload_locked(&mut checked)
    }

    fn reload_locked(&self, checked: &mut (Instant, Option<[u8; 32]>)) -> bool {
        checked.0 = Instant::now();
        match load(&self.cert_path, &self.key_path, &self.provider) {
            Ok(new) => {
                let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
                if current.digest == new.digest {
                    return false;
                }
                info!(cert = %self.cert_path.display(), fingerprint = %fingerprint(&new.key),
                      "TLS certificate reloaded");
                *current = new;
                checked.1 = None;
                true
            }
            Err((e, digest)) => {
                // One warning per bad content (a read error is warned each time: it may pass).
                if digest.is_none() || checked.1 != digest {
                    warn!(error = %e, "TLS certificate not reloaded; serving the last good one");
                }
                checked.1 = digest;
                false
            }
        }
    }

    /// Reloads when `interval` has passed since the last check; a handshake that finds another
    /// one checking does not wait for it.
    fn maybe_reload(&self) {
        let Ok(mut checked) = self.checked.try_lock() else {
            return;
        };
        if checked.0.elapsed() >= self.interval {
            self.reload_locked(&mut checked);
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.maybe_reload();
        Some(self.current())
    }
}

/// The server configuration: TLS 1.2 and 1.3 (rustls's safe defaults), no client certificates,
/// ALPN `http/1.1` (the verifier speaks HTTP/1 only), the certificate from `resolver`.
pub fn server_config(resolver: Arc<ReloadingCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The acceptor `serve` uses, from the two files (loaded now).
pub fn acceptor(
    cert: &Path,
    key: &Path,
) -> Result<(tokio_rustls::TlsAcceptor, Arc<ReloadingCert>), TlsError> {
    let resolver = Arc::new(ReloadingCert::new(cert, key, RELOAD_INTERVAL)?);
    let config = server_config(resolver.clone())?;
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), resolver))
}

/// Test certificates made with the `openssl` command (a CA, and server pairs it signs).
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A CA (`<name>-ca.crt`, `<name>-ca.key`) in `dir`.
    pub struct Ca {
        pub dir: PathBuf,
        pub name: String,
    }

    impl Ca {
        pub fn new(dir: &Path, name: &str) -> Ca {
            let subj = format!("/CN={name}-ca");
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &subj,
                    "-keyout",
                    &format!("{name}-ca.key"),
                    "-out",
                    &format!("{name}-ca.crt"),
                ],
            );
            Ca {
                dir: dir.to_path_buf(),
                name: name.to_string(),
            }
        }

        pub fn cert(&self) -> PathBuf {
            self.dir.join(format!("{}-ca.crt", self.name))
        }

        /// A server pair for `verifier.test` and 127.0.0.1 signed by this CA: `<leaf>.crt`,
        /// `<leaf>.key` (PKCS#8 PEM).
        pub fn issue(&self, leaf: &str) -> (PathBuf, PathBuf) {
            let ext = format!("{leaf}.ext");
            std::fs::write(
                self.dir.join(&ext),
                "subjectAltName=DNS:verifier.test,IP:127.0.0.1\n\
                 extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
            )
            .expect("write ext");
            let (key, csr, crt) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("{leaf}.crt"),
            );
            openssl(
                &self.dir,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    "/CN=verifier.test",
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                ],
            );
            openssl(
                &self.dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    &format!("{}-ca.crt", self.name),
                    "-CAkey",
                    &format!("{}-ca.key", self.name),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &crt,
                ],
            );
            (self.dir.join(crt), self.dir.join(key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Ca;
    use super::*;

    #[test]
    fn mode_from_flags() {
        let (c, k) = (Some(Path::new("tls.crt")), Some(Path::new("tls.key")));
        let empty = Some(Path::new(""));
        let tls = Mode::Tls {
            cert: "tls.crt".into(),
            key: "tls.key".into(),
        };
        for (cert, key, plain, want) in [
            (c, k, false, Ok(tls)),
            (None, None, true, Ok(Mode::PlainHttp)),
            (empty, empty, true, Ok(Mode::PlainHttp)),
            (None, None, false, Err("no TLS certificate")),
            (empty, None, false, Err("no TLS certificate")),
            (c, None, false, Err("--tls-cert-file needs --tls-key-file")),
            (None, k, false, Err("--tls-key-file needs --tls-cert-file")),
            (c, k, true, Err("exclude each other")),
            (c, None, true, Err("exclude each other")),
        ] {
            match (Mode::from_flags(cert, key, plain), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want),
                (Err(got), Err(want)) => assert!(got.contains(want), "{got}"),
                (got, want) => panic!("{cert:?} {key:?} {plain}: got {got:?}, want {want:?}"),
            }
        }
    }

    fn install(from: &(PathBuf, PathBuf), to: &(PathBuf, PathBuf)) {
        std::fs::copy(&from.0, &to.0).expect("copy cert");
        std::fs::copy(&from.1, &to.1).expect("copy key");
    }

    #[test]
    fn reload_swaps_in_a_new_pair_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "test");
        let (first, second) = (ca.issue("first"), ca.issue("second"));
        let live = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        install(&first, &live);
        let r = ReloadingCert::new(&live.0, &live.1, Duration::ZERO).expect("load");
        let served = |r: &ReloadingCert| r.current().cert[0].as_ref().to_vec();
        let der = |p: &Path| {
            CertificateDer::from_pem_file(p)
                .expect("pem")
                .as_ref()
                .to_vec()
        };
        assert_eq!(served(&r), der(&first.0));
        assert!(!r.reload(), "same contents: nothing to swap");

        install(&second, &live);
        assert!(r.reload());
        assert_eq!(served(&r), der(&second.0));

        // Broken files keep the last good pair: not PEM, a half-written key, a key of another
        // certificate, an empty certificate file, a missing file.
        type Breaks<'a> = [(&'a str, Box<dyn Fn() + 'a>); 5];
        let bad: Breaks = [
            (
                "garbage cert",
                Box::new(|| std::fs::write(&live.0, b"not a certificate").expect("w")),
            ),
            (
                "truncated key",
                Box::new(|| {
                    install(&first, &live);
                    let k = std::fs::read(&first.1).expect("r");
                    std::fs::write(&live.1, &k[..k.len() / 2]).expect("w");
                }),
            ),
            (
                "mismatched key",
                Box::new(|| {
                    std::fs::copy(&first.0, &live.0).expect("c");
                    std::fs::copy(&second.1, &live.1).expect("c");
                }),
            ),
            (
                "empty cert",
                Box::new(|| {
                    install(&first, &live);
                    std::fs::write(&live.0, b"").expect("w");
                }),
            ),
            (
                "missing key",
                Box::new(|| std::fs::remove_file(&live.1).expect("rm")),
            ),
        ];
        for (what, make) in bad {
            make();
            assert!(!r.reload(), "{what}");
            assert_eq!(
                served(&r),
                der(&second.0),
                "{what}: still the last good pair"
            );
        }
        install(&first, &live);
        assert!(r.reload());
        assert_eq!(served(&r), der(&first.0));
    }

    #[test]
    fn a_secret_volume_symlink_swap_is_seen() {
        // A Secret volume: tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>; an update writes
        // a new timestamped directory and swaps ..data.
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "test");
        let (first, second) = (ca.issue("first"), ca.issue("second"));
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).expect("mkdir");
        let version = |name: &str, pair: &(PathBuf, PathBuf)| {
            let d = vol.join(name);
            std::fs::create_dir(&d).expect("mkdir");
            install(pair, &(d.join("tls.crt"), d.join("tls.key")));
            let tmp = vol.join("..data_tmp");
            std::os::unix::fs::symlink(name, &tmp).expect("symlink");
            std::fs::rename(&tmp, vol.join("..data")).expect("swap");
        };
        version("..v1", &first);
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), vol.join(f)).expect("symlink");
        }
        let r = ReloadingCert::new(vol.join("tls.crt"), vol.join("tls.key"), Duration::ZERO)
            .expect("load");
        let before = fingerprint(&r.current());
        version("..v2", &second);
        assert!(r.reload());
        assert_ne!(fingerprint(&r.current()), before);
    }

    #[test]
    fn the_resolver_rechecks_at_most_every_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "test");
        let (first, second) = (ca.issue("first"), ca.issue("second"));
        let live = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        install(&first, &live);
        let r = ReloadingCert::new(&live.0, &live.1, Duration::from_secs(3600)).expect("load");
        let before = fingerprint(&r.current());
        install(&second, &live);
        r.maybe_reload();
        assert_eq!(fingerprint(&r.current()), before, "within the interval");
        r.checked.lock().expect("lock").0 = Instant::now() - Duration::from_secs(3601);
        r.maybe_reload();
        assert_ne!(fingerprint(&r.current()), before, "after the interval");
    }

    #[test]
    fn errors_name_files_not_key_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new(dir.path(), "test");
        let (crt, key) = ca.issue("leaf");
        let pem = std::fs::read_to_string(&key).expect("read key");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        std::fs::write(&key, &pem[..pem.len() - 40]).expect("truncate");
        let e = ReloadingCert::new(&crt, &key, RELOAD_INTERVAL)
            .expect_err("a truncated key")
            .to_string();
        assert!(e.contains("leaf.key"), "{e}");
        assert!(!e.contains(&body[..20]), "key bytes in {e}");
    }
}
