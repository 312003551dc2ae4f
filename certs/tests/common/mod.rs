//! Shared helpers: a TLS handshake over an in-memory duplex pipe.
#![allow(dead_code)] // each test binary uses a different subset

use std::io;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

pub type Client = client::TlsStream<DuplexStream>;
pub type Server = server::TlsStream<DuplexStream>;

/// Runs both halves of a handshake concurrently. The server name is an IP: our client never
/// checks it and sends no SNI.
pub async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (io::Result<Client>, io::Result<Server>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("10.0.0.1").expect("IP server name");
    tokio::join!(
        TlsConnector::from(client).connect(name, c),
        TlsAcceptor::from(server).accept(s)
    )
}

/// Sends `msg` each way and checks it arrives.
pub async fn ping(client: &mut Client, server: &mut Server, msg: &[u8]) {
    client.write_all(msg).await.expect("client write");
    client.flush().await.expect("client flush");
    let mut buf = vec![0; msg.len()];
    server.read_exact(&mut buf).await.expect("server read");
    assert_eq!(buf, msg);
    server.write_all(msg).await.expect("server write");
    server.flush().await.expect("server flush");
    client.read_exact(&mut buf).await.expect("client read");
    assert_eq!(buf, msg);
}

/// Both handshake results; panics unless the server refused (TLS 1.3 clients may finish their
/// half before the server has judged the client certificate). Returns the server's error text.
pub async fn server_refused((client, server): (io::Result<Client>, io::Result<Server>)) -> String {
    let err = match server {
        Ok(_) => panic!("server accepted"),
        Err(e) => e.to_string(),
    };
    // The client must not end up with a usable connection either.
    if let Ok(mut c) = client {
        let mut buf = [0u8; 1];
        let r = c.read(&mut buf).await;
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "client connection still usable: {r:?}"
        );
    }
    err
}
