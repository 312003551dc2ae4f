//! The admin server over a real loopback socket, with hyper's HTTP/1 client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use telemetry::{AdminState, ConnectionLabels, Metrics, Readiness, ResponseFlag, TrafficLabels};
use tokio::sync::oneshot;

struct Reply {
    status: StatusCode,
    content_type: Option<String>,
    body: String,
}

async fn call(addr: std::net::SocketAddr, method: Method, path: &str) -> Reply {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ascii").to_owned());
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        content_type,
        body: String::from_utf8(body.to_vec()).expect("utf8"),
    }
}

#[tokio::test]
async fn admin_endpoints_over_loopback() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let readiness = Readiness::new();
    let state = AdminState::new(metrics.clone(), readiness.clone())
        .with_config_dump(|| serde_json::json!({"services": ["aliyun.com"]}));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(telemetry::admin::serve(listener, state, async {
        let _ = stopped.await;
    }));

    // Readiness flips 503 → 200 with the flag.
    let reply = call(addr, Method::GET, "/healthz/ready").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    readiness.set_ready(true);
    let reply = call(addr, Method::GET, "/healthz/ready").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "ready");
    readiness.set_ready(false);
    assert_eq!(
        call(addr, Method::GET, "/healthz/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Metrics in Prometheus text format on both paths, reflecting live counters.
    let conn = metrics.connection(&ConnectionLabels {
        traffic: TrafficLabels::default(),
        response_flags: ResponseFlag::UpstreamConnectionFailure.into(),
    });
    conn.opened();
    for path in ["/metrics", "/stats/prometheus"] {
        let reply = call(addr, Method::GET, path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(
            reply.content_type.as_deref(),
            Some("text/plain; version=0.0.4"),
            "{path}"
        );
        let line = reply
            .body
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .expect("opened counter exported");
        assert!(line.contains(r#"response_flags="UF""#), "{line}");
        assert!(line.ends_with("} 1"), "{line}");
    }

    let reply = call(addr, Method::GET, "/config_dump").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    let dump: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(dump["services"][0], "aliyun.com");

    assert_eq!(
        call(addr, Method::GET, "/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(addr, Method::GET, "/stats").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(addr, Method::DELETE, "/config_dump").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let head = call(addr, Method::HEAD, "/metrics").await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());

    // Shutdown stops accepting.
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .expect("server task");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn raw_http10_client_gets_a_response() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let readiness = Readiness::new();
    readiness.set_ready(true);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(telemetry::admin::serve(
        listener,
        AdminState::new(metrics, readiness),
        std::future::pending(),
    ));

    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
        .await
        .expect("in time")
        .expect("read");
    assert!(response.starts_with("HTTP/1.0 200 OK\r\n"), "{response}");
    assert!(response.ends_with("\r\n\r\nready"), "{response}");
    server.abort();
}

#[tokio::test]
async fn metrics_and_readiness_ports_do_not_expose_the_config_dump() {
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let readiness = Readiness::new();
    readiness.set_ready(true);
    let state = AdminState::new(metrics, readiness)
        .with_config_dump(|| serde_json::json!({"secret": "configuration"}));
    let mut servers = Vec::new();
    let bind = |endpoints: telemetry::Endpoints| {
        let state = state.clone();
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let task = tokio::spawn(telemetry::admin::serve_endpoints(
                listener,
                state,
                endpoints,
                std::future::pending(),
            ));
            (addr, task)
        }
    };
    let (metrics_port, task) = bind(telemetry::Endpoints::METRICS).await;
    servers.push(task);
    let (ready_port, task) = bind(telemetry::Endpoints::READINESS).await;
    servers.push(task);
    let (admin_port, task) = bind(telemetry::Endpoints::ADMIN).await;
    servers.push(task);

    let cases = [
        (metrics_port, "/metrics", StatusCode::OK),
        (metrics_port, "/stats/prometheus", StatusCode::OK),
        (metrics_port, "/config_dump", StatusCode::NOT_FOUND),
        (metrics_port, "/healthz/ready", StatusCode::NOT_FOUND),
        (ready_port, "/healthz/ready", StatusCode::OK),
        (ready_port, "/config_dump", StatusCode::NOT_FOUND),
        (ready_port, "/metrics", StatusCode::NOT_FOUND),
        (admin_port, "/config_dump", StatusCode::OK),
        (admin_port, "/metrics", StatusCode::OK),
        (admin_port, "/healthz/ready", StatusCode::OK),
    ];
    for (addr, path, want) in cases {
        let reply = call(addr, Method::GET, path).await;
        assert_eq!(reply.status, want, "{addr}{path}");
        if want == StatusCode::NOT_FOUND {
            assert!(
                !reply.body.contains("secret"),
                "{addr}{path}: {}",
                reply.body
            );
        }
    }
    for server in servers {
        server.abort();
    }
}
