//! Loopback integration: pooled client, server, echo targets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hbone::{Client, Config, Error, IncomingConnect, TunnelRequest};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;

fn request(server: &TestServer, target: std::net::SocketAddr) -> TunnelRequest {
    TunnelRequest::new(id("client"), server.addr, vec![id("server")], target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_ten_connections() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let client = Client::new(m.identities.clone(), Config::default());
    const STREAMS: usize = 1000;
    // `opened`: every stream is open (they are truly concurrent); `go`: stats were taken.
    let opened = Arc::new(Barrier::new(STREAMS + 1));
    let go = Arc::new(Barrier::new(STREAMS + 1));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let client = client.clone();
        let req = request(&server, "10.0.0.1:80".parse().unwrap());
        let (opened, go) = (opened.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = client.open(req).await.expect("open");
            opened.wait().await;
            go.wait().await;
            let msg = format!("stream {i}");
            t.write_all(msg.as_bytes()).await.unwrap();
            t.shutdown().await.unwrap();
            let mut back = String::new();
            t.read_to_string(&mut back).await.unwrap();
            assert_eq!(back, msg);
        }));
    }
    opened.wait().await;
    let stats = client.pool_stats();
    assert_eq!(stats.streams_active, STREAMS);
    // 100 streams per connection: exactly ten, even though all opens raced.
    assert_eq!(stats.connections_opened, 10, "{stats:?}");
    assert_eq!(stats.connections_pooled, 10, "{stats:?}");
    go.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
    let stats = client.pool_stats();
    assert_eq!(stats.streams_opened, STREAMS as u64);
    assert_eq!(stats.streams_active, 0);
    assert_eq!(stats.connections_opened, 10);
    assert_eq!(server.handled(), STREAMS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_over_one_connection_when_allowed() {
    let m = mesh();
    let config = Config {
        max_streams_per_connection: 1000,
        max_concurrent_streams: 1000,
        ..Config::default()
    };
    let server = TestServer::start(&m.identities, &id("server"), config.clone(), self_echo).await;
    let client = Client::new(m.identities.clone(), config);
    let opened = Arc::new(Barrier::new(1001));
    let go = Arc::new(Barrier::new(1001));
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let client = client.clone();
        let req = request(&server, "10.0.0.1:80".parse().unwrap());
        let (opened, go) = (opened.clone(), go.clone());
        tasks.push(tokio::spawn(async move {
            let mut t = client.open(req).await.expect("open");
            opened.wait().await;
            go.wait().await;
            t.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 4];
            t.read_exact(&mut back).await.unwrap();
            assert_eq!(u32::from_be_bytes(back), i);
        }));
    }
    opened.wait().await;
    assert_eq!(client.pool_stats().connections_opened, 1);
    assert_eq!(client.pool_stats().streams_active, 1000);
    go.wait().await;
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_with_checksum() {
    let m = mesh();
    let (counts_tx, mut counts_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |c: IncomingConnect| {
        let counts_tx = counts_tx.clone();
        async move {
            let mut upstream = tokio::net::TcpStream::connect(c.meta().authority)
                .await
                .unwrap();
            let mut tunnel = c.accept().unwrap();
            let counts = hbone::copy_bidirectional(&mut tunnel, &mut upstream).await;
            let _ = counts_tx.send(counts.map_err(|e| e.to_string()));
        }
    };
    let server = TestServer::start(&m.identities, &id("server"), Config::default(), handler).await;
    let target = echo_target().await;
    let client = Client::new(m.identities.clone(), Config::default());
    let tunnel = client.open(request(&server, target)).await.unwrap();

    const LEN: usize = 64 * 1024 * 1024;
    let data = Arc::new(pattern(7, LEN));
    let mut sent_sum = Fnv::default();
    sent_sum.update(&data);
    let (mut r, mut w) = tunnel.into_split();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            // Uneven chunks, to cross frame and buffer boundaries at odd places.
            for chunk in data.chunks(100_003) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        })
    };
    let mut got_sum = Fnv::default();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got_sum.update(&buf[..n]);
        got += n;
    }
    writer.await.unwrap();
    assert_eq!(got, LEN);
    assert_eq!(got_sum.0, sent_sum.0, "checksum of the echoed bytes");
    let (to_target, from_target) = counts_rx.recv().await.unwrap().expect("server-side copy");
    assert_eq!(to_target, LEN as u64, "tunnel -> target bytes");
    assert_eq!(from_target, LEN as u64, "target -> tunnel bytes");
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() {
    let m = mesh();
    let server = TestServer::start(&m.identities, &id("server"), Config::default(), forward).await;
    let target = collect_then_reply_target().await;
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client.open(request(&server, target)).await.unwrap();
    t.write_all(&[1u8; 5000]).await.unwrap();
    // END_STREAM: the target sees EOF, and only then writes its answer.
    t.shutdown().await.unwrap();
    let mut answer = String::new();
    t.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 5000 bytes");
    // Writing after shutdown is an error, not a silent drop.
    assert!(t.write_all(b"late").await.is_err());
}

#[tokio::test]
async fn echo_keeps_data_flowing_after_peer_half_close() {
    let m = mesh();
    let server = TestServer::start(&m.identities, &id("server"), Config::default(), forward).await;
    let target = echo_target().await;
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client.open(request(&server, target)).await.unwrap();
    let data = pattern(1, 300_000);
    t.write_all(&data).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(
        back, data,
        "the echo's remaining data arrives after our half-close"
    );
}

#[tokio::test]
async fn handler_rejections_reach_the_client() {
    let m = mesh();
    let handler = |c: IncomingConnect| async move {
        match c.meta().authority.port() {
            1 => c.reject(StatusCode::UNAUTHORIZED),
            2 => c.reject(StatusCode::BAD_GATEWAY),
            3 => c.reject(StatusCode::GATEWAY_TIMEOUT),
            4 => drop(c), // unanswered: 503
            _ => forward(c).await,
        }
    };
    let server = TestServer::start(&m.identities, &id("server"), Config::default(), handler).await;
    let client = Client::new(m.identities.clone(), Config::default());
    for (port, status) in [
        (1, StatusCode::UNAUTHORIZED),
        (2, StatusCode::BAD_GATEWAY),
        (3, StatusCode::GATEWAY_TIMEOUT),
        (4, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let req = request(&server, format!("127.0.0.1:{port}").parse().unwrap());
        let err = client.open(req).await.expect_err("rejected");
        assert_eq!(err.status(), Some(status), "{err}");
        assert!(matches!(err, Error::Status { .. }));
    }
    // An unreachable target: the forward handler answers 503.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = client
        .open(request(&server, closed))
        .await
        .expect_err("unreachable");
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    // Rejections do not poison the pooled connection.
    assert_eq!(client.pool_stats().connections_opened, 1);
    assert_eq!(client.pool_stats().retries, 0);
}

#[tokio::test]
async fn request_headers_and_metadata_reach_the_handler() {
    let m = mesh();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |c: IncomingConnect| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(c.meta().clone());
            let mut h = http::HeaderMap::new();
            h.insert(
                hbone::headers::BAGGAGE,
                http::HeaderValue::from_static("service.name=server"),
            );
            let _ = c.accept_with_headers(h);
        }
    };
    let server = TestServer::start(&m.identities, &id("server"), Config::default(), handler).await;
    let client = Client::new(m.identities.clone(), Config::default());
    let trace = hbone::TraceParent::random();
    let req = request(&server, "240.240.0.1:8080".parse().unwrap())
        .forwarded(
            &hbone::Forwarded::new("10.0.0.5:40000".parse().unwrap()).with_host("httpbin.org"),
        )
        .unwrap()
        .baggage(&hbone::Baggage {
            namespace: Some("default".into()),
            ..Default::default()
        })
        .unwrap()
        .traceparent(&trace);
    let tunnel = client.open(req).await.unwrap();
    let meta = rx.recv().await.unwrap();
    assert_eq!(meta.peer_identity, id("client"));
    assert_eq!(meta.authority, "240.240.0.1:8080".parse().unwrap());
    assert_eq!(meta.remote_addr, tunnel.local_addr());
    assert_eq!(meta.local_addr, server.addr);
    let fwd = meta.forwarded.unwrap();
    assert_eq!(fwd.client_addr(), Some("10.0.0.5:40000".parse().unwrap()));
    assert_eq!(fwd.host.as_deref(), Some("httpbin.org"));
    assert_eq!(
        hbone::Baggage::from_headers(&meta.headers)
            .namespace
            .as_deref(),
        Some("default")
    );
    assert_eq!(
        hbone::TraceParent::from_headers(&meta.headers)
            .unwrap()
            .unwrap(),
        trace
    );
    // The client sees the server's identity and the 200's headers.
    assert_eq!(tunnel.peer_identity(), &id("server"));
    assert_eq!(
        hbone::Baggage::from_headers(tunnel.headers())
            .service_name
            .as_deref(),
        Some("server")
    );
}

#[tokio::test]
async fn idle_connections_are_released() {
    let m = mesh();
    let config = Config {
        idle_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let server = TestServer::start(&m.identities, &id("server"), config.clone(), self_echo).await;
    let client = Client::new(m.identities.clone(), config);
    let mut t = client
        .open(request(&server, "10.0.0.1:80".parse().unwrap()))
        .await
        .unwrap();
    // In use: not idle, however long it takes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(client.pool_stats().connections_pooled, 1);
    t.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    t.read_exact(&mut b).await.unwrap();
    drop(t);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        client.pool_stats().connections_pooled,
        0,
        "idle connection released"
    );
    let _t = client
        .open(request(&server, "10.0.0.1:80".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(client.pool_stats().connections_opened, 2);
}

#[tokio::test]
async fn connect_failure_is_reported() {
    let m = mesh();
    let client = Client::new(m.identities.clone(), Config::default());
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let req = TunnelRequest::new(
        id("client"),
        closed,
        vec![id("server")],
        "10.0.0.1:80".parse().unwrap(),
    );
    let err = client.open(req).await.expect_err("nothing listens");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert_eq!(client.pool_stats().connections_pooled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_in_flight_streams_finish() {
    let m = mesh();
    let server =
        TestServer::start(&m.identities, &id("server"), Config::default(), self_echo).await;
    let addr = server.addr;
    let client = Client::new(m.identities.clone(), Config::default());
    let mut t = client
        .open(request(&server, "10.0.0.1:80".parse().unwrap()))
        .await
        .unwrap();
    t.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    t.read_exact(&mut b).await.unwrap();

    let drained = server.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !drained.is_finished(),
        "the server waits for the in-flight stream"
    );
    // New tunnels are refused (listener closed, GOAWAY on the pooled connection).
    let req = TunnelRequest::new(
        id("client"),
        addr,
        vec![id("server")],
        "10.0.0.1:80".parse().unwrap(),
    );
    assert!(client.open(req).await.is_err());

    // The in-flight stream still works both ways, then ends cleanly.
    let data = pattern(3, 1 << 20);
    t.write_all(&data).await.unwrap();
    t.shutdown().await.unwrap();
    let mut back = Vec::new();
    t.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, data);
    drop(t);
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("server finished draining once the stream ended")
        .unwrap();
}
