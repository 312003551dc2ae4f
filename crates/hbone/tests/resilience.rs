//! Refusals (TLS, identity, bad requests, garbage) and dead-connection recovery.

mod common;

use std::sync::Arc;
use std::time::Duration;

use certs::{CertificateAuthority, IdentityManager};
use common::*;
use hbone::{Client, Config, Error, TunnelRequest};
use http::{Method, Request, StatusCode};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn request(server: std::net::SocketAddr) -> TunnelRequest {
    TunnelRequest::new(
        id("client"),
        server,
        vec![id("server")],
        "10.0.0.1:80".parse().unwrap(),
    )
}

async fn ping_pong(t: &mut hbone::Tunnel, byte: u8) {
    t.write_all(&[byte]).await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
    assert_eq!(b[0], byte);
}

#[tokio::test]
async fn client_from_an_untrusted_ca_is_refused() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    // Same trust domain, trusts the real server, but its own certificate is from another CA.
    let rogue_ca = Arc::new(CertificateAuthority::generate(TRUST_DOMAIN).unwrap());
    let rogue = IdentityManager::new(rogue_ca, m.ca.trust_bundle(), Duration::from_secs(3600));
    let client = Client::new(rogue, Config::default());
    let err = client
        .open(request(server.addr))
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::H2 { .. } | Error::Tls { .. }), "{err}");
    assert_eq!(server.handled(), 0, "the handler never saw it");
}

#[derive(Debug)]
struct NoCert;

impl ResolvesClientCert for NoCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let tls =
        certs::tls::client_config(Arc::new(NoCert), &m.ca.trust_bundle(), &[id("server")]).unwrap();
    // TLS 1.3: the client finishes its handshake before the server rejects the (missing)
    // certificate, so the refusal shows up on the first request at the latest.
    let result = match raw_h2(tls, server.addr).await {
        Ok(send) => {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri("10.0.0.1:80")
                .body(())
                .unwrap();
            raw_status(&send, req).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    assert!(result.is_err(), "{result:?}");
    assert_eq!(server.handled(), 0);
}

#[tokio::test]
async fn server_with_an_unexpected_identity_is_refused() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let client = Client::new(m.identities.clone(), Config::default());
    let req = TunnelRequest::new(
        id("client"),
        server.addr,
        vec![id("impostor-check")],
        "10.0.0.1:80".parse().unwrap(),
    );
    let err = client.open(req).await.expect_err("wrong identity");
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    assert_eq!(server.handled(), 0);
    // Expecting one of several identities, the server's among them, is fine.
    let req = TunnelRequest::new(
        id("client"),
        server.addr,
        vec![id("svc-san"), id("server")],
        "10.0.0.1:80".parse().unwrap(),
    );
    let mut t = client.open(req).await.unwrap();
    assert_eq!(t.peer_identity(), &id("server"));
    ping_pong(&mut t, 9).await;
}

#[tokio::test]
async fn non_connect_is_405_and_bad_authority_is_400() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let tls = m
        .identities
        .client_config(&id("client"), &[id("server")])
        .unwrap();
    let send = raw_h2(tls, server.addr).await.unwrap();
    for method in [Method::GET, Method::POST, Method::PUT] {
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("https://{}/", server.addr))
            .body(())
            .unwrap();
        assert_eq!(
            raw_status(&send, req).await.unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}"
        );
    }
    for authority in ["example.com:80", "10.0.0.1:0", "[fe80::1%25eth0]:80"] {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap();
        assert_eq!(
            raw_status(&send, req).await.unwrap(),
            StatusCode::BAD_REQUEST,
            "{authority}"
        );
    }
    // The same connection still serves a good CONNECT.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("10.0.0.1:80")
        .body(())
        .unwrap();
    assert_eq!(raw_status(&send, req).await.unwrap(), StatusCode::OK);
    assert_eq!(
        server.handled(),
        1,
        "only the valid CONNECT reached the handler"
    );
}

/// Reads until the server closes; a reset counts as closed.
async fn closed_by_server(mut s: TcpStream) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server must close the connection");
}

#[tokio::test]
async fn garbage_plain_tcp_and_non_h2_are_closed_without_harm() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;

    // Plain HTTP/1.1 to a TLS port.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_server(s).await;

    // Random bytes.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&pattern(5, 4096)).await.unwrap();
    closed_by_server(s).await;

    // Connect and say nothing, then hang up.
    drop(TcpStream::connect(server.addr).await.unwrap());

    // Valid mTLS without ALPN h2.
    let mut no_alpn = (*m
        .identities
        .client_config(&id("client"), &[id("server")])
        .unwrap())
    .clone();
    no_alpn.alpn_protocols.clear();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::from(server.addr.ip());
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(no_alpn))
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "closed: {r:?}");
    }

    // Valid mTLS with ALPN h2, then not HTTP/2.
    let tls_cfg = m
        .identities
        .client_config(&id("client"), &[id("server")])
        .unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::from(server.addr.ip());
    let mut tls = tokio_rustls::TlsConnector::from(tls_cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "non-h2 bytes after TLS must close the connection"
    );

    // The server is unharmed.
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client.open(request(server.addr)).await.unwrap();
    ping_pong(&mut t, 1).await;
    assert_eq!(server.handled(), 1);
}

#[tokio::test]
async fn killed_pooled_connection_is_replaced_transparently() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client.open(request(proxy.addr)).await.unwrap();
    ping_pong(&mut t, 1).await;
    drop(t);

    proxy.kill();
    let mut t = client
        .open(request(proxy.addr))
        .await
        .expect("a new connection, unseen by the caller");
    ping_pong(&mut t, 2).await;
    let stats = client.pool_stats();
    assert_eq!(stats.connections_opened, 2, "{stats:?}");
    assert_eq!(stats.connections_pooled, 1, "{stats:?}");
}

#[tokio::test]
async fn open_that_dies_with_its_connection_is_retried_once() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client.open(request(proxy.addr)).await.unwrap();
    ping_pong(&mut t, 1).await;

    // The pooled connection looks alive to the client but its HEADERS go nowhere...
    proxy.freeze(true);
    let opening = {
        let client = client.clone();
        let req = request(proxy.addr);
        tokio::spawn(async move { client.open(req).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!opening.is_finished());
    // ...then the connection dies before the server could accept the stream.
    proxy.kill();
    proxy.freeze(false);
    let mut t2 = tokio::time::timeout(Duration::from_secs(5), opening)
        .await
        .expect("retried promptly")
        .unwrap()
        .expect("the retry on a new connection succeeds");
    ping_pong(&mut t2, 2).await;
    let stats = client.pool_stats();
    assert_eq!(stats.retries, 1, "{stats:?}");
    assert_eq!(stats.connections_opened, 2, "{stats:?}");
    // The tunnel that lived on the dead connection reports an error instead of hanging.
    let mut b = [0u8; 1];
    assert!(t.read(&mut b).await.is_err() || b == [0]);
}

#[tokio::test]
async fn unanswered_pings_drop_the_connection() {
    let m = mesh();
    let config = Config {
        ping_interval: Some(Duration::from_millis(100)),
        ping_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let server = TestServer::start(&m.identities, &id("server"), config.clone(), self_echo).await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::new(m.identities.clone(), config);
    let mut t = client.open(request(proxy.addr)).await.unwrap();
    ping_pong(&mut t, 1).await;
    // Pings keep a healthy idle connection alive.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.pool_stats().connections_pooled, 1);

    proxy.freeze(true);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        client.pool_stats().connections_pooled,
        0,
        "dead connection left the pool"
    );
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), t.read(&mut b)).await;
    assert!(matches!(r, Ok(Err(_))), "the stream on it fails: {r:?}");

    proxy.freeze(false);
    let mut t = client.open(request(proxy.addr)).await.unwrap();
    ping_pong(&mut t, 2).await;
    assert_eq!(client.pool_stats().connections_opened, 2);
}
