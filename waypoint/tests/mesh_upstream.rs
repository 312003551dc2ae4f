//! Mesh endpoints are reached over HBONE: an in-process `hbone::Server` on a loopback address's
//! 15008 stands in for the destination pod's ztunnel and answers HTTP inside the tunnel with
//! what it saw (the CONNECT authority, the client's verified identity, the HTTP version).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use certs::{CertificateAuthority, IdentityManager, SpiffeId};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_config::{NamespacedName, Snapshot};
use telemetry::ResponseFlag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use waypoint::upstream::{
    Cluster, ClusterRequest, HttpVersion, MeshClient, Upstream, UpstreamError, build_cluster,
};

/// A loopback address of its own per test (all of 127/8 is local), so each fake ztunnel can
/// listen on the real HBONE port 15008 without colliding with other tests or processes.
fn loopback() -> IpAddr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        100 + (pid % 100) as u8,
        ((pid / 100) % 250) as u8,
        NEXT.fetch_add(1, Ordering::Relaxed),
    ))
}

fn config(pod_ip: IpAddr) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: default
  labels: {{app: web}}
  annotations: {{strait.dev/netns: /run/netns/web}}
spec: {{nodeName: node-2, serviceAccountName: web}}
status: {{podIP: {pod_ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080, name: http}}
  - {{port: 81, targetPort: 8080, name: http2}}
  - {{port: 82, targetPort: 8080, name: tcp}}
"#
    )
}

const TD: &str = "cluster.local";

fn waypoint_id() -> SpiffeId {
    SpiffeId::new(TD, "istio-egress", "waypoint")
}

fn manager(ca: &Arc<CertificateAuthority>) -> IdentityManager {
    IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(3600))
}

/// What the fake ztunnel saw per CONNECT: (authority, client identity).
type Seen = Arc<Mutex<Vec<(SocketAddr, String)>>>;

/// An HBONE server at `ip:15008` presenting `server_id`; inside each tunnel an HTTP/1.1 or
/// HTTP/2 server answers `<authority> <client identity> <version>`.
async fn fake_ztunnel(
    ca: &Arc<CertificateAuthority>,
    ip: IpAddr,
    server_id: SpiffeId,
) -> (Seen, CancellationToken) {
    let identities = manager(ca);
    identities.fetch(&server_id).await.expect("server cert");
    let server =
        hbone::Server::new(&identities, &server_id, hbone::Config::default()).expect("server");
    let listener = TcpListener::bind((ip, hbone::HBONE_PORT))
        .await
        .expect("bind loopback 15008");
    let seen: Seen = Arc::default();
    let stop = CancellationToken::new();
    let record = seen.clone();
    let handler = move |connect: hbone::IncomingConnect| {
        let record = record.clone();
        async move {
            let meta = connect.meta().clone();
            record
                .lock()
                .expect("lock")
                .push((meta.authority, meta.peer_identity.to_string()));
            let Ok(tunnel) = connect.accept() else { return };
            let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                let text = format!(
                    "{} {} {:?}",
                    meta.authority,
                    meta.peer_identity,
                    req.version()
                );
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tunnel), svc)
                .await;
        }
    };
    let token = stop.clone();
    tokio::spawn(async move {
        server
            .serve(listener, handler, token.cancelled_owned())
            .await
    });
    (seen, stop)
}

fn cluster(snap: &Snapshot, port: u16) -> Cluster {
    let svc = snap
        .service_by_host("web.default.svc.cluster.local")
        .expect("service")
        .clone();
    let sp = svc.port(port).expect("port").clone();
    build_cluster(
        snap,
        &NamespacedName::new("istio-egress", "waypoint"),
        &svc,
        &sp,
        None,
        ClusterRequest {
            original: None,
            request_host: None,
            downstream: HttpVersion::Http1,
            upgrade: false,
        },
    )
}

async fn waypoint_upstream(ca: &Arc<CertificateAuthority>) -> (Upstream, MeshClient) {
    let identities = manager(ca);
    identities
        .fetch(&waypoint_id())
        .await
        .expect("waypoint cert");
    let mesh = MeshClient::new(
        identities,
        waypoint_id(),
        &NamespacedName::new("istio-egress", "waypoint"),
        hbone::Config::default(),
    );
    let upstream = Upstream::new(None, Some(mesh.clone())).expect("upstream");
    (upstream, mesh)
}

async fn get(upstream: &Upstream, snap: &Snapshot, cluster: &Cluster) -> String {
    let addr = upstream.pick(snap, cluster, None).await.expect("endpoint");
    let lease = upstream
        .checkout(snap, cluster, addr)
        .await
        .expect("tunnelled connection");
    let req = http::Request::builder()
        .uri("/")
        .header(http::header::HOST, "web.default.svc.cluster.local")
        .body(waypoint::http::body::empty())
        .expect("request");
    let resp = lease.send(req).await.expect("response");
    assert_eq!(resp.status(), http::StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test]
async fn http_to_a_mesh_pod_goes_through_a_pooled_hbone_tunnel() {
    let ca = Arc::new(CertificateAuthority::generate(TD).expect("ca"));
    let pod = loopback();
    let (seen, stop) = fake_ztunnel(&ca, pod, SpiffeId::new(TD, "default", "web")).await;
    let snap = mesh_config::load_sources([("c.yaml", config(pod).as_str())]).expect("config");
    let (upstream, mesh) = waypoint_upstream(&ca).await;
    let authority = SocketAddr::new(pod, 8080);
    let want_id = waypoint_id().to_string();

    // HTTP/1.1 inside the tunnel, twice: the second request reuses the keep-alive tunnel.
    let h1 = cluster(&snap, 80);
    for _ in 0..2 {
        let body = get(&upstream, &snap, &h1).await;
        assert_eq!(body, format!("{authority} {want_id} HTTP/1.1"));
        // The connection returns to the pool once hyper has finished the message.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // HTTP/2 port: prior-knowledge HTTP/2 inside its own tunnel.
    let h2 = cluster(&snap, 81);
    assert_eq!(
        get(&upstream, &snap, &h2).await,
        format!("{authority} {want_id} HTTP/2.0")
    );

    // L4 (TCP port): the raw stream is the tunnel.
    let tcp = cluster(&snap, 82);
    let addr = upstream.pick(&snap, &tcp, None).await.expect("endpoint");
    let mut stream = upstream
        .connect_l4(&snap, &tcp, addr, true)
        .await
        .expect("tunnel");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(
        answer.ends_with(&format!("{authority} {want_id} HTTP/1.1")),
        "{answer}"
    );

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![(authority, want_id.clone()); 3],
        "one CONNECT per HTTP/1.1 keep-alive connection, one for HTTP/2, one for L4"
    );
    // The three tunnels share one mTLS HTTP/2 connection to the pod's ztunnel.
    let stats = mesh.pool_stats();
    assert_eq!(stats.connections_opened, 1, "{stats:?}");
    assert_eq!(stats.streams_opened, 3, "{stats:?}");
    stop.cancel();
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_a_connection_failure() {
    let ca = Arc::new(CertificateAuthority::generate(TD).expect("ca"));
    let pod = loopback();
    let (seen, stop) = fake_ztunnel(&ca, pod, SpiffeId::new(TD, "default", "impostor")).await;
    let snap = mesh_config::load_sources([("c.yaml", config(pod).as_str())]).expect("config");
    let (upstream, _mesh) = waypoint_upstream(&ca).await;
    let h1 = cluster(&snap, 80);
    let addr = upstream.pick(&snap, &h1, None).await.expect("endpoint");
    let err = upstream
        .checkout(&snap, &h1, addr)
        .await
        .err()
        .expect("refused: the peer is not spiffe://cluster.local/ns/default/sa/web");
    assert!(matches!(err, UpstreamError::Hbone { .. }), "{err}");
    assert_eq!(err.flag(), ResponseFlag::UpstreamConnectionFailure);
    assert!(err.is_connect_failure());
    assert_eq!(err.addr(), Some(SocketAddr::new(pod, 8080)));
    let reason = err.transport_failure_reason().expect("reason");
    assert!(
        reason.starts_with("TLS_error:|CERTIFICATE_VERIFY_FAILED"),
        "{reason}"
    );
    assert!(err.local_reply_body().contains(&reason));
    assert!(
        seen.lock().expect("lock").is_empty(),
        "no CONNECT may reach an unverified peer"
    );
    stop.cancel();
}

#[tokio::test]
async fn no_plaintext_fallback_when_the_tunnel_cannot_open() {
    let ca = Arc::new(CertificateAuthority::generate(TD).expect("ca"));
    // Nothing listens on the pod's 15008 (but a plaintext server listens on its target port:
    // it must not be used).
    let pod = loopback();
    let plain = TcpListener::bind((pod, 8080)).await.expect("bind");
    let snap = mesh_config::load_sources([("c.yaml", config(pod).as_str())]).expect("config");
    let (upstream, _mesh) = waypoint_upstream(&ca).await;
    let h1 = cluster(&snap, 80);
    let addr = upstream.pick(&snap, &h1, None).await.expect("endpoint");
    let err = upstream
        .checkout(&snap, &h1, addr)
        .await
        .err()
        .expect("no tunnel, no connection");
    assert_eq!(err.flag(), ResponseFlag::UpstreamConnectionFailure);
    let reason = err.transport_failure_reason().expect("reason");
    assert!(
        reason.starts_with("HBONE_error:|delayed connect error to"),
        "{reason}"
    );
    // The plaintext port saw nothing.
    let accepted = tokio::time::timeout(Duration::from_millis(50), plain.accept()).await;
    assert!(accepted.is_err(), "plaintext fallback happened");

    // Without an HBONE client at all, mesh endpoints fail too.
    let bare = Upstream::new(None, None).expect("upstream");
    let err = bare
        .checkout(&snap, &h1, addr)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, UpstreamError::NoMeshClient { .. }), "{err}");
    assert_eq!(err.flag(), ResponseFlag::UpstreamConnectionFailure);
}

/// The whole waypoint in-process: a client tunnels an HTTP request to a Service VIP through it;
/// the Service's pods sit behind fake ztunnels, one genuine and one presenting another identity.
#[tokio::test]
async fn the_waypoint_tunnels_to_pods_and_answers_503_when_the_tunnel_fails() {
    let ca = Arc::new(CertificateAuthority::generate(TD).expect("ca"));
    let (good, bad, listen_ip) = (loopback(), loopback(), loopback());
    let (seen, stop_good) = fake_ztunnel(&ca, good, SpiffeId::new(TD, "default", "web")).await;
    let (bad_seen, stop_bad) =
        fake_ztunnel(&ca, bad, SpiffeId::new(TD, "default", "impostor")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca_dir, cfg_dir) = (dir.path().join("ca"), dir.path().join("cfg"));
    ca.write(&ca_dir).expect("write CA");
    std::fs::create_dir_all(&cfg_dir).expect("mkdir");
    let other = format!(
        r#"
---
apiVersion: v1
kind: Pod
metadata:
  name: other-0
  namespace: default
  labels: {{app: other}}
  annotations: {{strait.dev/netns: /run/netns/other}}
spec: {{nodeName: node-3, serviceAccountName: other}}
status: {{podIP: {bad}}}
---
apiVersion: v1
kind: Service
metadata: {{name: other, namespace: default}}
spec:
  clusterIP: 10.96.0.11
  selector: {{app: other}}
  ports: [{{port: 80, targetPort: 8080, name: http}}]
"#
    );
    std::fs::write(cfg_dir.join("mesh.yaml"), config(good) + &other).expect("write config");

    let mut opts = waypoint::Options::new(ca_dir);
    opts.config_dir = Some(cfg_dir);
    opts.listen = SocketAddr::new(listen_ip, hbone::HBONE_PORT);
    opts.admin = None;
    let stop = CancellationToken::new();
    let waypoint = tokio::spawn(waypoint::run(opts, stop.clone().cancelled_owned()));

    // The client side, as a ztunnel would open it for a pod of the mesh.
    let identities = manager(&ca);
    let client_id = SpiffeId::new(TD, "default", "client");
    identities.fetch(&client_id).await.expect("client cert");
    let client = hbone::Client::new(identities, hbone::Config::default());
    let (status, body) = through_waypoint(&client, &client_id, listen_ip, "10.96.0.10:80").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    assert_eq!(
        body,
        format!("{} {} HTTP/1.1", SocketAddr::new(good, 8080), waypoint_id())
    );
    assert_eq!(seen.lock().expect("lock").len(), 1);

    let (status, body) = through_waypoint(&client, &client_id, listen_ip, "10.96.0.11:80").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.starts_with("upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: TLS_error:|CERTIFICATE_VERIFY_FAILED"),
        "{body}"
    );
    assert!(bad_seen.lock().expect("lock").is_empty());

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), waypoint).await;
    stop_good.cancel();
    stop_bad.cancel();
}

/// One HTTP/1.1 GET through a tunnel to the waypoint at `ip:15008` for `vip`.
async fn through_waypoint(
    client: &hbone::Client,
    client_id: &SpiffeId,
    ip: IpAddr,
    vip: &str,
) -> (http::StatusCode, String) {
    let req = hbone::TunnelRequest::new(
        client_id.clone(),
        SocketAddr::new(ip, hbone::HBONE_PORT),
        vec![waypoint_id()],
        vip.parse().expect("vip"),
    );
    // The waypoint may still be starting.
    let mut tries = 0;
    let tunnel = loop {
        match client.open(req.clone()).await {
            Ok(t) => break t,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("tunnel to the waypoint: {e}"),
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel))
        .await
        .expect("HTTP/1.1 in the tunnel");
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            http::Request::builder()
                .uri("/")
                .header(http::header::HOST, "web.default.svc.cluster.local")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
