//! Interoperability of `keyward::keys` with an independent implementation: the `openssl` CLI
//! (3.x, which supports Ed25519 and `pkeyutl -rawin`).
//!
//! The CLI is required: if it cannot be run, these tests FAIL with an explanation rather than
//! being skipped. Set `KEYWARD_TEST_OPENSSL` to use a binary other than `openssl` on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyward::keys::{Jwks, KeyPair, PublicKey, TokenClaims, verify_token};
use sha2::{Digest as _, Sha256};

fn openssl_bin() -> String {
    std::env::var("KEYWARD_TEST_OPENSSL").unwrap_or_else(|_| "openssl".to_owned())
}

/// Run `openssl` with `args` in `dir`; panics with a clear message if it cannot be started.
fn openssl(dir: &Path, args: &[&str]) -> Output {
    let bin = openssl_bin();
    Command::new(&bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the openssl CLI ({bin:?}): {e}. The keys interop tests need \
                 OpenSSL 3.x to check keyward's key and token encodings against an independent \
                 implementation; install it (e.g. `apt-get install openssl`) or point \
                 KEYWARD_TEST_OPENSSL at the binary."
            )
        })
}

/// Run `openssl` and require success; returns stdout.
fn openssl_ok(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = openssl(dir, args);
    assert!(
        out.status.success(),
        "`openssl {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A temporary directory, after checking that the CLI is OpenSSL 3+ with Ed25519 support.
fn workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("create temp dir");
    let version = String::from_utf8_lossy(&openssl_ok(dir.path(), &["version"])).into_owned();
    let major = version
        .strip_prefix("OpenSSL ")
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        major.is_some_and(|m| m >= 3),
        "the keys interop tests need OpenSSL 3.x (Ed25519 and `pkeyutl -rawin`), found: {}",
        version.trim()
    );
    dir
}

fn write(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn claims() -> TokenClaims {
    TokenClaims {
        iss: "keyward".into(),
        sub: "agent-interop".into(),
        aud: "policy-agents".into(),
        iat: 1_700_000_000,
        nbf: 1_700_000_000,
        exp: 1_700_000_600,
        jti: "0d9c1c8e-7a55-4d1f-9a3c-2f1f5b8f9e01".into(),
    }
}

/// The RFC 7638 thumbprint, computed independently of `keyward`.
fn rfc7638_thumbprint(x: &str) -> String {
    let canonical = format!("{{\"crv\":\"Ed25519\",\"kty\":\"OKP\",\"x\":\"{x}\"}}");
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

#[test]
fn openssl_derives_the_same_public_key_and_reads_our_private_key() {
    let dir = workdir();
    let key = KeyPair::generate();
    let priv_pem = key.to_pkcs8_pem();
    write(dir.path(), "priv.pem", priv_pem.as_bytes());

    // Public key derived by openssl from our private key == our SPKI PEM, byte for byte.
    let pub_pem = openssl_ok(dir.path(), &["pkey", "-in", "priv.pem", "-pubout"]);
    assert_eq!(
        String::from_utf8(pub_pem).unwrap(),
        key.public_key().to_spki_pem()
    );

    // openssl re-encodes the private key exactly as we wrote it (RFC 8410 PKCS#8 v1).
    let reencoded = openssl_ok(dir.path(), &["pkey", "-in", "priv.pem"]);
    assert_eq!(String::from_utf8(reencoded).unwrap(), *priv_pem);

    // openssl identifies it as an Ed25519 key.
    let text = openssl_ok(dir.path(), &["pkey", "-in", "priv.pem", "-noout", "-text"]);
    assert!(
        String::from_utf8_lossy(&text).contains("ED25519 Private-Key"),
        "unexpected openssl -text output"
    );
}

#[test]
fn spki_der_carries_the_jwk_x_bytes() {
    let dir = workdir();
    let key = KeyPair::generate();
    let public = key.public_key();
    write(dir.path(), "pub.pem", public.to_spki_pem().as_bytes());

    let der = openssl_ok(
        dir.path(),
        &["pkey", "-pubin", "-in", "pub.pem", "-outform", "DER"],
    );
    assert_eq!(der.len(), 44, "Ed25519 SPKI DER is 44 bytes");
    let jwk = public.to_jwk();
    let x = URL_SAFE_NO_PAD.decode(&jwk.x).unwrap();
    assert_eq!(x.len(), 32);
    assert_eq!(&der[der.len() - 32..], &x[..]);

    // The thumbprint computed here from the canonical JSON equals key_id().
    assert_eq!(rfc7638_thumbprint(&jwk.x), public.key_id());
    assert_eq!(jwk.kid.as_deref(), Some(public.key_id().as_str()));
    assert_eq!(key.key_id(), public.key_id());

    // The SPKI PEM openssl writes back parses to the same key.
    let pem = openssl_ok(dir.path(), &["pkey", "-pubin", "-in", "pub.pem"]);
    let back = PublicKey::from_spki_pem(&String::from_utf8(pem).unwrap()).unwrap();
    assert_eq!(back, public);
}

#[test]
fn openssl_verifies_our_jws_signature() {
    let dir = workdir();
    let key = KeyPair::generate();
    let token = key.sign_token(&claims()).unwrap();
    let (signing_input, sig_b64) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig_b64).unwrap();
    assert_eq!(sig.len(), 64);

    write(
        dir.path(),
        "pub.pem",
        key.public_key().to_spki_pem().as_bytes(),
    );
    write(dir.path(), "signing_input", signing_input.as_bytes());
    write(dir.path(), "sig.bin", &sig);
    let verify = [
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        "pub.pem",
        "-rawin",
        "-in",
        "signing_input",
        "-sigfile",
        "sig.bin",
    ];
    let out = openssl_ok(dir.path(), &verify);
    assert!(
        String::from_utf8_lossy(&out).contains("Signature Verified Successfully"),
        "unexpected openssl output: {}",
        String::from_utf8_lossy(&out)
    );

    // Negative control: openssl rejects the signature over a modified signing input, so the
    // check above is meaningful.
    let mut tampered = signing_input.as_bytes().to_vec();
    tampered.push(b'x');
    write(dir.path(), "signing_input", &tampered);
    let out = openssl(dir.path(), &verify);
    assert!(
        !out.status.success(),
        "openssl accepted a signature over a tampered message"
    );
}

#[test]
fn we_read_openssl_keys_and_verify_openssl_signatures() {
    let dir = workdir();
    openssl_ok(
        dir.path(),
        &["genpkey", "-algorithm", "ed25519", "-out", "priv.pem"],
    );
    openssl_ok(
        dir.path(),
        &["pkey", "-in", "priv.pem", "-pubout", "-out", "pub.pem"],
    );
    let priv_pem = std::fs::read_to_string(dir.path().join("priv.pem")).unwrap();
    let pub_pem = std::fs::read_to_string(dir.path().join("pub.pem")).unwrap();

    let key = KeyPair::from_pkcs8_pem(&priv_pem).unwrap();
    assert_eq!(*key.to_pkcs8_pem(), priv_pem);
    let public = PublicKey::from_spki_pem(&pub_pem).unwrap();
    assert_eq!(key.public_key(), public);
    assert_eq!(public.to_spki_pem(), pub_pem);

    // Build a JWS whose signature is made by openssl, then verify it with keyward.
    let reference = key.sign_token(&claims()).unwrap();
    let (signing_input, our_sig) = reference.rsplit_once('.').unwrap();
    write(dir.path(), "signing_input", signing_input.as_bytes());
    openssl_ok(
        dir.path(),
        &[
            "pkeyutl",
            "-sign",
            "-inkey",
            "priv.pem",
            "-rawin",
            "-in",
            "signing_input",
            "-out",
            "sig.bin",
        ],
    );
    let sig = std::fs::read(dir.path().join("sig.bin")).unwrap();
    assert_eq!(sig.len(), 64);
    // Ed25519 is deterministic: openssl's signature is identical to ours.
    assert_eq!(URL_SAFE_NO_PAD.encode(&sig), our_sig);
    public.verify(signing_input.as_bytes(), &sig).unwrap();

    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&sig));
    let trusted = Jwks {
        keys: vec![public.to_jwk()],
    };
    let (header, got) = verify_token(&token, &trusted, &[], claims().nbf, 0).unwrap();
    assert_eq!(got, claims());
    assert_eq!(header.kid, rfc7638_thumbprint(&public.to_jwk().x));
}
