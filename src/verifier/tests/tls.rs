//! TLS: the real server loop (`serve::serve`) on a socket, with rustls on both ends.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::verifier::serve::{Limits, serve};
use crate::verifier::tls::testing::Ca;
use crate::verifier::tls::{ReloadingCert, provider, server_config};

struct Server {
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(resolver: Arc<ReloadingCert>, header_read_timeout: Duration) -> Server {
    let f = fixture();
    let shared = shared(&f, Arc::new(MemoryUseLog::new(100)));
    let acceptor =
        tokio_rustls::TlsAcceptor::from(Arc::new(server_config(resolver).expect("server config")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = Limits {
        max_connections: 8,
        header_read_timeout,
    };
    tokio::spawn(serve(
        listener,
        router(shared.clone()),
        limits,
        shared.stats.clone(),
        Some(acceptor),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        shared,
        _stop: stop,
    }
}

fn connector(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA pem"))
        .expect("add CA");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GET `path` over TLS trusting `ca`: the response, and the leaf certificate served.
async fn get(
    addr: std::net::SocketAddr,
    ca: &Path,
    path: &str,
) -> std::io::Result<(String, Vec<u8>)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("verifier.test").expect("name");
    let mut tls = connector(ca).connect(name, tcp).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("a peer certificate")[0]
        .as_ref()
        .to_vec();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: verifier.test\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok((out, leaf))
}

#[tokio::test]
async fn https_with_the_right_ca_and_a_failed_handshake_with_a_wrong_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, wrong) = (Ca::new(dir.path(), "right"), Ca::new(dir.path(), "wrong"));
    let (crt, key) = ca.issue("server");
    let resolver = Arc::new(ReloadingCert::new(&crt, &key, Duration::ZERO).expect("load"));
    let s = start(resolver, Duration::from_secs(5)).await;

    let (health, _) = get(s.addr, &ca.cert(), "/healthz")
        .await
        .expect("GET /healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok\n"), "{health}");
    let (jwks, _) = get(s.addr, &ca.cert(), "/keys/ns/a/jwks.json")
        .await
        .expect("GET jwks");
    assert!(jwks.starts_with("HTTP/1.1 200"), "{jwks}");
    let body = jwks.split("\r\n\r\n").nth(1).expect("a body");
    let doc: Jwks = serde_json::from_str(body).expect("a JWKS");
    assert_eq!(doc.keys.len(), 1, "the recorded key only");

    let e = get(s.addr, &wrong.cert(), "/healthz")
        .await
        .expect_err("a certificate of an untrusted CA");
    assert!(
        e.to_string().contains("UnknownIssuer") || e.to_string().contains("invalid peer"),
        "{e}"
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out).await;
    assert!(!out.starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.shared.stats.tls_handshake_failures("error") >= 1);
}

#[tokio::test]
async fn a_new_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "right");
    let (first, second) = (ca.issue("first"), ca.issue("second"));
    let live = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&first.0, &live.0).expect("copy");
    std::fs::copy(&first.1, &live.1).expect("copy");
    let resolver = Arc::new(ReloadingCert::new(&live.0, &live.1, Duration::ZERO).expect("load"));
    let s = start(resolver, Duration::from_secs(5)).await;
    let der = |p: &Path| {
        CertificateDer::from_pem_file(p)
            .expect("pem")
            .as_ref()
            .to_vec()
    };
    let (_, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
    assert_eq!(leaf, der(&first.0));
    std::fs::copy(&second.0, &live.0).expect("copy");
    std::fs::copy(&second.1, &live.1).expect("copy");
    let (_, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
    assert_eq!(leaf, der(&second.0), "the new pair is served");
    // A broken key: the second pair stays.
    std::fs::write(&live.1, b"-----BEGIN PRIVATE KEY-----\nAAAA\n").expect("write");
    let (health, leaf) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(leaf, der(&second.0), "the last good pair stays");
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_closed_at_the_header_read_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "right");
    let (crt, key) = ca.issue("server");
    let resolver = Arc::new(ReloadingCert::new(&crt, &key, Duration::ZERO).expect("load"));
    let s = start(resolver, Duration::from_millis(300)).await;

    let t0 = std::time::Instant::now();
    let mut silent = TcpStream::connect(s.addr).await.expect("connect");
    // A half ClientHello (the record header only) is no better than silence.
    let mut half = TcpStream::connect(s.addr).await.expect("connect");
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("write");
    for stream in [&mut silent, &mut half] {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("closed by the server well before 5 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.shared.stats.tls_handshake_failures("timeout"), 2);
    assert_eq!(s.shared.stats.open_connections(), 0, "both slots are free");
    // The server still answers.
    let (health, _) = get(s.addr, &ca.cert(), "/healthz").await.expect("GET");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
}
