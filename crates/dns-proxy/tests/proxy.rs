//! The proxy on loopback, between hickory's client and a fake upstream served by hickory-server.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dns_proxy::{
    AsyncUpstreamSocketFactory, DefaultSocketFactory, DnsProxy, NameTable, PodDnsContext,
    ResolvConf, SocketFuture, UpstreamSocketFactory, Upstreams,
};
use hickory_proto::op::{Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, MX, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::net::client::ClientHandle;
use hickory_resolver::net::runtime::{Time, TokioRuntimeProvider};
use hickory_resolver::net::tcp::TcpClientStream;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::{DnsExchange, Protocol};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::oneshot;

const VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 1);
const REAL_ALIYUN: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);

fn n(s: &str) -> Name {
    Name::from_str(s).expect("test name")
}

// ---------- fake upstream ----------

#[derive(Clone, Copy)]
enum Behaviour {
    /// One zone: aliyun.com (A, MX), external.example.com (A), servfail.example.com → SERVFAIL,
    /// everything else NXDOMAIN with the zone's SOA.
    Normal,
    /// SERVFAIL for everything.
    ServFail,
}

/// Per query the upstream saw: its EDNS payload size and DO bit, `None` without an OPT record.
type EdnsLog = Arc<Mutex<Vec<Option<(u16, bool)>>>>;

struct FakeUpstream {
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<(String, RecordType, Protocol)>>>,
    edns_seen: EdnsLog,
}

fn record(name: &str, rdata: RData) -> Record {
    Record::from_rdata(n(name), 300, rdata)
}

#[async_trait::async_trait]
impl RequestHandler for FakeUpstream {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let info = request.request_info().expect("one question");
        let name = info.query.name().to_string();
        let qtype = info.query.query_type();
        self.seen
            .lock()
            .expect("lock")
            .push((name.clone(), qtype, request.protocol()));
        self.edns_seen.lock().expect("lock").push(
            request
                .edns
                .as_ref()
                .map(|edns| (edns.max_payload(), edns.flags().dnssec_ok)),
        );

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        metadata.authoritative = true;
        let soa = record(
            "example.com.",
            RData::SOA(SOA::new(
                n("ns.example.com."),
                n("hostmaster.example.com."),
                1,
                3600,
                600,
                86400,
                60,
            )),
        );
        let (code, answers, authorities) = match (self.behaviour, name.as_str(), qtype) {
            (Behaviour::ServFail, ..) | (_, "servfail.example.com.", _) => {
                (ResponseCode::ServFail, vec![], vec![])
            }
            (_, "aliyun.com.", RecordType::A) => (
                ResponseCode::NoError,
                vec![record("aliyun.com.", RData::A(A(REAL_ALIYUN)))],
                vec![],
            ),
            (_, "aliyun.com.", RecordType::MX) => (
                ResponseCode::NoError,
                vec![record(
                    "aliyun.com.",
                    RData::MX(MX::new(10, n("mx.aliyun.com."))),
                )],
                vec![],
            ),
            (_, "external.example.com.", RecordType::A) => (
                ResponseCode::NoError,
                vec![record("external.example.com.", RData::A(A(EXTERNAL)))],
                vec![],
            ),
            _ => (ResponseCode::NXDomain, vec![], vec![soa]),
        };
        metadata.response_code = code;
        let response = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            &answers,
            &authorities,
            &[],
            &[],
        );
        response_handle
            .send_response(response)
            .await
            .expect("fake upstream send")
    }
}

/// UDP and TCP on the same loopback port.
fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)) {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, RecordType, Protocol)>>>,
    edns_seen: EdnsLog,
    _server: hickory_server::Server<FakeUpstream>,
}

impl Upstream {
    fn queries(&self) -> Vec<(String, RecordType, Protocol)> {
        self.seen.lock().expect("lock").clone()
    }

    fn edns(&self) -> Vec<Option<(u16, bool)>> {
        self.edns_seen.lock().expect("lock").clone()
    }
}

fn fake_upstream(behaviour: Behaviour) -> Upstream {
    let (udp, tcp) = bind_pair();
    let addr = udp.local_addr().expect("addr");
    udp.set_nonblocking(true).expect("nonblocking");
    tcp.set_nonblocking(true).expect("nonblocking");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let edns_seen = Arc::new(Mutex::new(Vec::new()));
    let mut server = hickory_server::Server::new(FakeUpstream {
        behaviour,
        seen: seen.clone(),
        edns_seen: edns_seen.clone(),
    });
    server.register_socket(tokio::net::UdpSocket::from_std(udp).expect("tokio udp"));
    server.register_listener(
        tokio::net::TcpListener::from_std(tcp).expect("tokio tcp"),
        Duration::from_secs(5),
        16,
    );
    Upstream {
        addr,
        seen,
        edns_seen,
        _server: server,
    }
}

// ---------- proxy under test ----------

type Table = Arc<RwLock<HashMap<String, Vec<IpAddr>>>>;

fn mesh_table() -> Table {
    Arc::new(RwLock::new(HashMap::from([
        ("aliyun.com".to_owned(), vec![IpAddr::V4(VIP)]),
        (
            "reviews.default.svc.cluster.local".to_owned(),
            vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))],
        ),
    ])))
}

struct Proxy {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), dns_proxy::Error>>,
}

impl Proxy {
    async fn stop(mut self) -> Result<(), dns_proxy::Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("proxy stops promptly")
            .expect("proxy task")
    }
}

fn start_proxy(table: Table, upstreams: Upstreams) -> Proxy {
    let lookup = move |fqdn: &str| table.read().expect("lock").get(fqdn).cloned();
    let table: Arc<dyn NameTable> = Arc::new(lookup);
    let ctx = PodDnsContext::new("default").with_search_domains(["corp.example"]);
    let proxy = DnsProxy::new(table, upstreams, ctx).expect("proxy");
    let (udp, tcp) = bind_pair();
    let addr = udp.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        proxy
            .serve(udp, tcp, async {
                let _ = stopped.await;
            })
            .await
    });
    Proxy {
        addr,
        stop: Some(stop),
        task,
    }
}

fn udp_client(addr: SocketAddr) -> DnsExchange<TokioRuntimeProvider> {
    UdpClientStream::builder(addr, TokioRuntimeProvider::new())
        .with_timeout(Some(Duration::from_secs(5)))
        .exchange()
}

/// The provider must outlive the exchange: its handle owns the exchange's background task.
async fn tcp_client(addr: SocketAddr) -> (DnsExchange<TokioRuntimeProvider>, TokioRuntimeProvider) {
    let provider = TokioRuntimeProvider::new();
    let exchange =
        TcpClientStream::exchange(addr, None, Duration::from_secs(5), None, provider.clone())
            .await
            .expect("tcp connect to proxy");
    (exchange, provider)
}

async fn ask<C: ClientHandle>(client: &mut C, name: &str, qtype: RecordType) -> Message {
    client
        .query(n(name), DNSClass::IN, qtype)
        .await
        .expect("a DNS response")
        .into_message()
}

fn a_records(message: &Message) -> Vec<(String, Ipv4Addr, u32)> {
    message
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(ip)) => Some((r.name.to_string(), *ip, r.ttl)),
            _ => None,
        })
        .collect()
}

// ---------- tests ----------

#[tokio::test]
async fn mesh_host_gets_vip_and_is_not_forwarded() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let mut client = udp_client(proxy.addr);

    let response = ask(&mut client, "aliyun.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    assert_eq!(
        a_records(&response),
        vec![("aliyun.com.".to_owned(), VIP, 30)]
    );
    assert!(
        upstream.queries().is_empty(),
        "mesh hosts are answered locally"
    );
    proxy.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn search_domain_forms_get_cname_and_vip() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let mut client = udp_client(proxy.addr);

    for queried in [
        "aliyun.com.default.svc.cluster.local.",
        "aliyun.com.svc.cluster.local.",
        "aliyun.com.cluster.local.",
        "aliyun.com.corp.example.",
    ] {
        let response = ask(&mut client, queried, RecordType::A).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{queried}"
        );
        let cname = response.answers.first().expect("cname first");
        assert_eq!(cname.name, n(queried));
        assert_eq!(
            cname.data,
            RData::CNAME(CNAME(n("aliyun.com."))),
            "{queried}"
        );
        assert_eq!(
            a_records(&response),
            vec![("aliyun.com.".to_owned(), VIP, 30)]
        );
    }
    // Kubernetes short names resolve under the queried name.
    let response = ask(&mut client, "reviews.", RecordType::A).await;
    assert_eq!(
        a_records(&response),
        vec![("reviews.".to_owned(), Ipv4Addr::new(10, 96, 0, 10), 30)]
    );
    assert!(upstream.queries().is_empty());

    // Another namespace's search domain is not applied: that goes upstream (NXDOMAIN there).
    let response = ask(
        &mut client,
        "aliyun.com.other.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries().len(), 1);
}

#[tokio::test]
async fn aaaa_for_v4_only_mesh_host_is_empty_noerror() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let mut client = udp_client(proxy.addr);

    for name in ["aliyun.com.", "aliyun.com.default.svc.cluster.local."] {
        let response = ask(&mut client, name, RecordType::AAAA).await;
        assert_eq!(
            response.metadata.response_code,
            ResponseCode::NoError,
            "{name}"
        );
        assert!(response.metadata.authoritative);
        assert!(
            response.answers.is_empty(),
            "{name}: {:?}",
            response.answers
        );
    }
    assert!(upstream.queries().is_empty());
}

#[tokio::test]
async fn other_names_and_types_are_forwarded_faithfully() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let mut client = udp_client(proxy.addr);

    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        a_records(&response),
        vec![("external.example.com.".to_owned(), EXTERNAL, 300)]
    );

    // NXDOMAIN comes back with the upstream's SOA, for negative caching.
    let response = ask(&mut client, "nope.example.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(response.answers.is_empty());
    assert!(
        matches!(
            response.authorities.first().map(|r| &r.data),
            Some(RData::SOA(_))
        ),
        "{:?}",
        response.authorities
    );

    let response = ask(&mut client, "servfail.example.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);

    // Types other than A/AAAA go upstream even for mesh hosts (as in ztunnel).
    let response = ask(&mut client, "aliyun.com.", RecordType::MX).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(
        response.answers.first().map(|r| &r.data),
        Some(RData::MX(_))
    ));

    assert_eq!(
        upstream.queries(),
        vec![
            (
                "external.example.com.".to_owned(),
                RecordType::A,
                Protocol::Udp
            ),
            ("nope.example.com.".to_owned(), RecordType::A, Protocol::Udp),
            (
                "servfail.example.com.".to_owned(),
                RecordType::A,
                Protocol::Udp
            ),
            ("aliyun.com.".to_owned(), RecordType::MX, Protocol::Udp),
        ]
    );
}

#[tokio::test]
async fn tcp_works_like_udp_and_forwards_over_tcp() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let (mut client, _provider) = tcp_client(proxy.addr).await;

    let response = ask(
        &mut client,
        "aliyun.com.default.svc.cluster.local.",
        RecordType::A,
    )
    .await;
    assert_eq!(
        a_records(&response),
        vec![("aliyun.com.".to_owned(), VIP, 30)]
    );

    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(
        a_records(&response),
        vec![("external.example.com.".to_owned(), EXTERNAL, 300)]
    );
    let response = ask(&mut client, "nope.example.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);

    let protocols: Vec<_> = upstream.queries().into_iter().map(|q| q.2).collect();
    assert_eq!(protocols, vec![Protocol::Tcp, Protocol::Tcp]);
}

#[tokio::test]
async fn unreachable_upstream_gives_servfail_in_bounded_time() {
    // Bound but never answers: a black hole rather than ICMP-refused, the slow case.
    let black_hole = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let proxy = start_proxy(
        mesh_table(),
        Upstreams::new(vec![black_hole.local_addr().expect("addr")])
            .with_timeout(Duration::from_millis(400)),
    );
    let mut client = udp_client(proxy.addr);

    let started = Instant::now();
    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    let elapsed = started.elapsed();
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // Mesh hosts keep working without any upstream.
    let response = ask(&mut client, "aliyun.com.", RecordType::A).await;
    assert_eq!(
        a_records(&response),
        vec![("aliyun.com.".to_owned(), VIP, 30)]
    );
}

#[tokio::test]
async fn next_upstream_is_tried_after_timeout_or_servfail() {
    let black_hole = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let failing = fake_upstream(Behaviour::ServFail);
    let good = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(
        mesh_table(),
        Upstreams::new(vec![
            black_hole.local_addr().expect("addr"),
            failing.addr,
            good.addr,
        ])
        .with_timeout(Duration::from_millis(1500)),
    );
    let mut client = udp_client(proxy.addr);

    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(
        a_records(&response),
        vec![("external.example.com.".to_owned(), EXTERNAL, 300)]
    );
    assert_eq!(failing.queries().len(), 1);
    assert_eq!(good.queries().len(), 1);
}

#[tokio::test]
async fn servfail_from_every_upstream_is_relayed() {
    let failing = fake_upstream(Behaviour::ServFail);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![failing.addr]));
    let mut client = udp_client(proxy.addr);
    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(failing.queries().len(), 1);
}

#[tokio::test]
async fn garbage_does_not_stop_the_server() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.connect(proxy.addr).await.expect("connect");

    // Too short for a header: dropped silently.
    socket.send(b"\x00\x01garbage").await.expect("send");
    socket.send(&[]).await.expect("send");
    // A header promising a question that is not there: FORMERR with the same id.
    let mut bad = vec![0xBE, 0xEF, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(b"\x3fshort");
    socket.send(&bad).await.expect("send");
    let mut buf = [0u8; 4096];
    let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("FORMERR in time")
        .expect("recv");
    let formerr = Message::from_vec(&buf[..len]).expect("a DNS message");
    assert_eq!(formerr.metadata.id, 0xBEEF);
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);

    // A well-formed query, hand-encoded with hickory-proto (no dig needed), still works.
    let mut query = Message::query();
    query.metadata.id = 0x1234;
    query.metadata.recursion_desired = true;
    query.queries.push(hickory_proto::op::Query::query(
        n("aliyun.com."),
        RecordType::A,
    ));
    socket
        .send(&query.to_vec().expect("encode"))
        .await
        .expect("send");
    let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    let response = Message::from_vec(&buf[..len]).expect("a DNS message");
    assert_eq!(response.metadata.id, 0x1234);
    assert!(response.metadata.recursion_desired);
    assert!(response.metadata.recursion_available);
    assert_eq!(
        a_records(&response),
        vec![("aliyun.com.".to_owned(), VIP, 30)]
    );
    // No OPT in the query, so none in the answer.
    assert!(response.edns.is_none());
}

#[tokio::test]
async fn table_is_consulted_per_query() {
    let upstream = fake_upstream(Behaviour::Normal);
    let table = mesh_table();
    let proxy = start_proxy(table.clone(), Upstreams::new(vec![upstream.addr]));
    let mut client = udp_client(proxy.addr);

    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, EXTERNAL);

    let new_vip = Ipv4Addr::new(240, 240, 0, 9);
    table
        .write()
        .expect("lock")
        .insert("external.example.com".to_owned(), vec![IpAddr::V4(new_vip)]);
    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(
        a_records(&response),
        vec![("external.example.com.".to_owned(), new_vip, 30)]
    );

    table.write().expect("lock").remove("aliyun.com");
    let response = ask(&mut client, "aliyun.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, REAL_ALIYUN);
}

#[derive(Default)]
struct CountingFactory {
    udp: AtomicUsize,
    tcp: AtomicUsize,
}

impl UpstreamSocketFactory for CountingFactory {
    fn udp_bind(&self, local: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        self.udp.fetch_add(1, Ordering::SeqCst);
        DefaultSocketFactory::new().udp_bind(local)
    }

    fn tcp_socket(&self, peer: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        self.tcp.fetch_add(1, Ordering::SeqCst);
        DefaultSocketFactory::new().tcp_socket(peer)
    }
}

#[tokio::test]
async fn upstream_sockets_come_from_the_factory() {
    let upstream = fake_upstream(Behaviour::Normal);
    let factory = Arc::new(CountingFactory::default());
    let proxy = start_proxy(
        mesh_table(),
        Upstreams::new(vec![upstream.addr]).with_socket_factory(factory.clone()),
    );

    let mut udp = udp_client(proxy.addr);
    ask(&mut udp, "external.example.com.", RecordType::A).await;
    ask(&mut udp, "aliyun.com.", RecordType::A).await; // local: no socket
    assert_eq!(factory.udp.load(Ordering::SeqCst), 1);

    let (mut tcp, _provider) = tcp_client(proxy.addr).await;
    ask(&mut tcp, "external.example.com.", RecordType::A).await;
    assert_eq!(factory.tcp.load(Ordering::SeqCst), 1);
}

/// Wraps a factory and records the `SO_MARK` (read back with getsockopt) of every socket it
/// makes.
struct MarkProbe {
    inner: DefaultSocketFactory,
    marks: Mutex<Vec<(&'static str, u32)>>,
}

impl UpstreamSocketFactory for MarkProbe {
    fn udp_bind(&self, local: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
        let socket = self.inner.udp_bind(local)?;
        let mark = socket2::SockRef::from(&socket).mark()?;
        self.marks.lock().expect("lock").push(("udp", mark));
        Ok(socket)
    }

    fn tcp_socket(&self, peer: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
        let socket = self.inner.tcp_socket(peer)?;
        let mark = socket2::SockRef::from(&socket).mark()?;
        self.marks.lock().expect("lock").push(("tcp", mark));
        Ok(socket)
    }
}

#[tokio::test]
async fn upstream_sockets_carry_the_mark() {
    const MARK: u32 = 0x539;
    let factory = DefaultSocketFactory::with_mark(MARK);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        // Without CAP_NET_ADMIN the factory must fail, and the proxy answer SERVFAIL.
        let err = factory
            .udp_bind("127.0.0.1:0".parse().expect("addr"))
            .expect_err("SO_MARK needs CAP_NET_ADMIN");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        let upstream = fake_upstream(Behaviour::Normal);
        let proxy = start_proxy(
            mesh_table(),
            Upstreams::new(vec![upstream.addr])
                .with_socket_factory(Arc::new(factory))
                .with_timeout(Duration::from_secs(2)),
        );
        let mut client = udp_client(proxy.addr);
        let response = ask(&mut client, "external.example.com.", RecordType::A).await;
        assert_eq!(response.metadata.response_code, ResponseCode::ServFail);
        eprintln!("SKIPPED the SO_MARK checks: not root");
        return;
    }

    // The sockets the factory makes carry the mark, read back from the kernel.
    let udp = factory
        .udp_bind("0.0.0.0:0".parse().expect("addr"))
        .expect("marked udp socket");
    assert_eq!(socket2::SockRef::from(&udp).mark().expect("SO_MARK"), MARK);
    let tcp = factory
        .tcp_socket("127.0.0.1:53".parse().expect("addr"))
        .expect("marked tcp socket");
    assert_eq!(socket2::SockRef::from(&tcp).mark().expect("SO_MARK"), MARK);
    let plain = DefaultSocketFactory::new()
        .udp_bind("0.0.0.0:0".parse().expect("addr"))
        .expect("plain udp socket");
    assert_eq!(socket2::SockRef::from(&plain).mark().expect("SO_MARK"), 0);

    // And the proxy forwards through exactly such sockets, over UDP and TCP.
    let upstream = fake_upstream(Behaviour::Normal);
    let probe = Arc::new(MarkProbe {
        inner: factory,
        marks: Mutex::default(),
    });
    let proxy = start_proxy(
        mesh_table(),
        Upstreams::new(vec![upstream.addr]).with_socket_factory(probe.clone()),
    );
    let mut client = udp_client(proxy.addr);
    let response = ask(&mut client, "external.example.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, EXTERNAL);
    let (mut tcp_client, _provider) = tcp_client(proxy.addr).await;
    let response = ask(&mut tcp_client, "external.example.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, EXTERNAL);
    assert_eq!(
        *probe.marks.lock().expect("lock"),
        [("udp", MARK), ("tcp", MARK)]
    );
}

/// Encodes a query for `name` A with an OPT record advertising `payload` and the DO bit.
fn edns_query(id: u16, name: &str, payload: u16) -> Vec<u8> {
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.recursion_desired = true;
    query
        .queries
        .push(hickory_proto::op::Query::query(n(name), RecordType::A));
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(payload).set_dnssec_ok(true);
    query.edns = Some(edns);
    query.to_vec().expect("encode")
}

async fn exchange(socket: &tokio::net::UdpSocket, query: &[u8]) -> Message {
    socket.send(query).await.expect("send");
    let mut buf = [0u8; 4096];
    let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    Message::from_vec(&buf[..len]).expect("a DNS message")
}

#[tokio::test]
async fn edns_size_is_preserved_to_the_client_and_upstream() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.connect(proxy.addr).await.expect("connect");
    let mut forwarded = 0;
    // Sizes other than hickory's defaults, so that echoing a default would be caught.
    for (id, payload) in [(1u16, 1400u16), (2, 4000), (3, 700)] {
        for (name, local) in [("aliyun.com.", true), ("external.example.com.", false)] {
            let response = exchange(&socket, &edns_query(id, name, payload)).await;
            assert_eq!(response.metadata.id, id);
            let edns = response.edns.as_ref().expect("OPT echoed");
            assert_eq!(edns.max_payload(), payload, "{name} advertised {payload}");
            assert!(edns.flags().dnssec_ok, "{name}: DO bit echoed");
            if !local {
                forwarded += 1;
                assert_eq!(
                    upstream.edns().last().copied(),
                    Some(Some((payload, true))),
                    "{name}: upstream must be asked with the client's size and DO bit"
                );
            }
        }
    }
    assert_eq!(
        upstream.edns().len(),
        forwarded,
        "mesh hosts are not forwarded"
    );

    // Without an OPT record in the query, none goes upstream or back.
    let mut query = Message::query();
    query.metadata.id = 9;
    query.queries.push(hickory_proto::op::Query::query(
        n("external.example.com."),
        RecordType::A,
    ));
    let response = exchange(&socket, &query.to_vec().expect("encode")).await;
    assert!(response.edns.is_none());
    assert_eq!(upstream.edns().last().copied(), Some(None));
}

#[tokio::test]
async fn dns_responses_sent_to_the_proxy_are_dropped() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.connect(proxy.addr).await.expect("connect");

    // A well-formed response (QR=1), e.g. reflected or spoofed: no reply at all, not FORMERR.
    let mut response = Message::query();
    response.metadata.id = 0x7777;
    response.metadata.message_type = hickory_proto::op::MessageType::Response;
    response.queries.push(hickory_proto::op::Query::query(
        n("external.example.com."),
        RecordType::A,
    ));
    socket
        .send(&response.to_vec().expect("encode"))
        .await
        .expect("send");
    let mut buf = [0u8; 4096];
    let reply = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await;
    assert!(reply.is_err(), "the proxy answered a response: {reply:?}");
    assert!(upstream.queries().is_empty(), "a response was forwarded");

    // The server still answers queries afterwards.
    let answer = exchange(&socket, &edns_query(0x1111, "aliyun.com.", 1232)).await;
    assert_eq!(answer.metadata.id, 0x1111);
}

/// A factory that is only asynchronous: it waits on another thread (as ztunnel waits for a
/// pod's namespace thread) without blocking the runtime.
struct ThreadHopFactory {
    udp: AtomicUsize,
    tcp: AtomicUsize,
}

impl AsyncUpstreamSocketFactory for ThreadHopFactory {
    fn udp_bind_async(&self, local: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(DefaultSocketFactory::new().udp_bind(local));
            });
            let socket = rx.await.map_err(std::io::Error::other)??;
            self.udp.fetch_add(1, Ordering::SeqCst);
            Ok(socket)
        })
    }

    fn tcp_socket_async(&self, peer: SocketAddr) -> SocketFuture<'_, tokio::net::TcpSocket> {
        Box::pin(async move {
            tokio::task::yield_now().await;
            self.tcp.fetch_add(1, Ordering::SeqCst);
            DefaultSocketFactory::new().tcp_socket(peer)
        })
    }
}

// One worker thread: a factory that blocked it while waiting for its helper thread would stall
// the proxy, the fake upstream and the client alike.
#[tokio::test(flavor = "current_thread")]
async fn async_socket_factories_are_awaited() {
    let upstream = fake_upstream(Behaviour::Normal);
    let factory = Arc::new(ThreadHopFactory {
        udp: AtomicUsize::new(0),
        tcp: AtomicUsize::new(0),
    });
    let proxy = start_proxy(
        mesh_table(),
        Upstreams::new(vec![upstream.addr]).with_async_socket_factory(factory.clone()),
    );
    let mut udp = udp_client(proxy.addr);
    let response = ask(&mut udp, "external.example.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, EXTERNAL);
    let (mut tcp, _provider) = tcp_client(proxy.addr).await;
    let response = ask(&mut tcp, "external.example.com.", RecordType::A).await;
    assert_eq!(a_records(&response)[0].1, EXTERNAL);
    assert_eq!(factory.udp.load(Ordering::SeqCst), 1);
    assert_eq!(factory.tcp.load(Ordering::SeqCst), 1);

    // A synchronous factory is an async one too.
    let sync: Arc<dyn AsyncUpstreamSocketFactory> = Arc::new(DefaultSocketFactory::new());
    let socket = sync
        .udp_bind_async("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    assert_ne!(socket.local_addr().expect("addr").port(), 0);
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let upstream = fake_upstream(Behaviour::Normal);
    let proxy = start_proxy(mesh_table(), Upstreams::new(vec![upstream.addr]));
    let addr = proxy.addr;
    let mut client = udp_client(addr);
    ask(&mut client, "aliyun.com.", RecordType::A).await;
    proxy.stop().await.expect("clean shutdown");

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mut query = Message::query();
    query.queries.push(hickory_proto::op::Query::query(
        n("aliyun.com."),
        RecordType::A,
    ));
    socket
        .send_to(&query.to_vec().expect("encode"), addr)
        .await
        .expect("send");
    let mut buf = [0u8; 512];
    let answer = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf)).await;
    assert!(!matches!(answer, Ok(Ok(_))), "no answer after shutdown");
}

#[tokio::test]
async fn serve_all_needs_a_socket() {
    let proxy = DnsProxy::new(
        Arc::new(|_: &str| None),
        Upstreams::new(vec![]),
        PodDnsContext::new("default"),
    )
    .expect("proxy");
    let result = proxy
        .serve_all(vec![], vec![], std::future::pending())
        .await;
    assert!(matches!(result, Err(dns_proxy::Error::NoListeners)));
}

#[test]
fn resolv_conf_parsing() {
    let conf = ResolvConf::parse(
        b"# kubelet\nnameserver 10.96.0.10\nnameserver fd00::10\n\
          search default.svc.cluster.local svc.cluster.local cluster.local corp.example.\n\
          options ndots:5\n",
    )
    .expect("parses");
    assert_eq!(
        conf.nameservers,
        vec![
            "10.96.0.10:53".parse::<SocketAddr>().expect("addr"),
            "[fd00::10]:53".parse::<SocketAddr>().expect("addr"),
        ]
    );
    assert_eq!(
        conf.search,
        vec![
            "default.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
            "corp.example"
        ]
    );
    assert_eq!(
        Upstreams::from_resolv_conf(&conf).servers(),
        conf.nameservers
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("resolv.conf");
    std::fs::write(&path, "nameserver 127.0.0.53\n").expect("write");
    assert_eq!(ResolvConf::read(&path).expect("reads").nameservers.len(), 1);
    assert!(matches!(
        ResolvConf::read(dir.path().join("missing")),
        Err(dns_proxy::Error::ResolvConf { .. })
    ));
    assert!(
        ResolvConf::parse(b"search only.example\n").is_err(),
        "no nameserver"
    );
}

// ---------- Upstreams::lookup_ip ----------

#[tokio::test]
async fn lookup_ip_asks_a_and_aaaa_through_the_factory() {
    let upstream = fake_upstream(Behaviour::Normal);
    let factory = Arc::new(CountingFactory::default());
    let upstreams = Upstreams::new(vec![upstream.addr]).with_socket_factory(factory.clone());

    let ips = upstreams
        .lookup_ip("external.example.com")
        .await
        .expect("resolves");
    assert_eq!(ips, vec![IpAddr::V4(EXTERNAL)]);
    let mut asked: Vec<(String, RecordType)> = upstream
        .queries()
        .into_iter()
        .map(|(name, rtype, _)| (name, rtype))
        .collect();
    asked.sort_by_key(|(_, t)| u16::from(*t));
    assert_eq!(
        asked,
        vec![
            ("external.example.com.".to_owned(), RecordType::A),
            ("external.example.com.".to_owned(), RecordType::AAAA),
        ]
    );
    assert_eq!(
        factory.udp.load(Ordering::SeqCst),
        2,
        "one socket per question"
    );

    // NXDOMAIN is an empty answer, not an error.
    assert_eq!(
        upstreams
            .lookup_ip("missing.example.com")
            .await
            .expect("answered"),
        Vec::<IpAddr>::new()
    );
}

#[tokio::test]
async fn lookup_ip_errors() {
    let upstream = fake_upstream(Behaviour::Normal);
    let upstreams = Upstreams::new(vec![upstream.addr]);
    let err = upstreams
        .lookup_ip("servfail.example.com")
        .await
        .expect_err("SERVFAIL for both questions");
    assert!(matches!(err, dns_proxy::LookupError::Failed(_)), "{err}");
    assert!(
        err.to_string().contains("SERVFAIL") || err.to_string().contains("Server Failure"),
        "{err}"
    );

    let err = Upstreams::new(vec![])
        .lookup_ip("external.example.com")
        .await
        .expect_err("no upstreams");
    assert!(matches!(err, dns_proxy::LookupError::NoUpstreams), "{err}");

    let err = upstreams
        .lookup_ip("bad..name")
        .await
        .expect_err("invalid name");
    assert!(matches!(err, dns_proxy::LookupError::Name { .. }), "{err}");

    // A black hole fails within the configured budget.
    let black_hole = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let started = Instant::now();
    let err = Upstreams::new(vec![black_hole.local_addr().expect("addr")])
        .with_timeout(Duration::from_millis(300))
        .lookup_ip("external.example.com")
        .await
        .expect_err("nobody answers");
    assert!(matches!(err, dns_proxy::LookupError::Failed(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
