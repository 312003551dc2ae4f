//! Forwarding to the upstream resolvers.
//!
//! The client's question is re-asked upstream (same transport as the client used, so a truncated
//! UDP answer makes the client retry over TCP and we follow), and the upstream's answer is
//! relayed as is: rcode (NXDOMAIN, SERVFAIL, …), flags and all three record sections.
//!
//! Upstream sockets come from an [`AsyncUpstreamSocketFactory`] (any synchronous
//! [`UpstreamSocketFactory`] is one): ztunnel creates them inside the pod's network namespace
//! with its mark (0x539) so that the pod's own DNS redirect rules do not capture the proxy's
//! queries back into itself.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_proto::op::ResponseCode;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, DnsResponse, Edns, Message, Query};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{RuntimeProvider, TokioHandle, TokioTime};
use hickory_resolver::net::tcp::TcpClientStream;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::{DnsHandle, Protocol};
use tracing::debug;

use crate::Error;

/// Default budget for answering a forwarded query, across all upstreams. Below glibc's 5 s
/// per-try timeout so that the client sees our SERVFAIL rather than its own timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(4);

/// Creates the sockets the proxy uses to reach upstream resolvers, synchronously.
///
/// Called on a Tokio worker thread for every forwarded UDP query and every upstream TCP
/// connection, so it must be quick. Hopping to a thread parked in a network namespace and
/// waiting for it blocks that worker meanwhile; implement [`AsyncUpstreamSocketFactory`] instead
/// to wait without blocking (e.g. with `inpod::NetnsHandle::run`). Every implementation of this
/// trait is also an [`AsyncUpstreamSocketFactory`], whose futures are ready at once.
pub trait UpstreamSocketFactory: Send + Sync + 'static {
    /// A UDP socket bound to `local` (an unspecified address of the upstream's family, port 0).
    fn udp_bind(&self, local: SocketAddr) -> io::Result<std::net::UdpSocket>;

    /// An unconnected TCP socket of `peer`'s address family.
    fn tcp_socket(&self, peer: SocketAddr) -> io::Result<tokio::net::TcpSocket>;
}

/// The future an [`AsyncUpstreamSocketFactory`] returns.
pub type SocketFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// Creates the sockets the proxy uses to reach upstream resolvers, asynchronously: what the
/// proxy uses internally.
///
/// For factories that must wait for something (a namespace's thread, a privileged helper)
/// without blocking a Tokio worker. The proxy awaits these futures within the query's upstream
/// timeout. Synchronous [`UpstreamSocketFactory`] implementations get this trait for free; the
/// method names differ so that both traits can be in scope without ambiguity.
///
/// ```
/// use std::{io, net::SocketAddr};
/// use dns_proxy::{AsyncUpstreamSocketFactory, SocketFuture};
///
/// struct OnTheBlockingPool;
///
/// impl AsyncUpstreamSocketFactory for OnTheBlockingPool {
///     fn udp_bind_async(&self, local: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket> {
///         Box::pin(async move {
///             tokio::task::spawn_blocking(move || std::net::UdpSocket::bind(local))
///                 .await
///                 .map_err(io::Error::other)?
///         })
///     }
///
///     fn tcp_socket_async(&self, peer: SocketAddr) -> SocketFuture<'_, tokio::net::TcpSocket> {
///         Box::pin(async move {
///             if peer.is_ipv4() {
///                 tokio::net::TcpSocket::new_v4()
///             } else {
///                 tokio::net::TcpSocket::new_v6()
///             }
///         })
///     }
/// }
/// ```
pub trait AsyncUpstreamSocketFactory: Send + Sync + 'static {
    /// A UDP socket bound to `local` (an unspecified address of the upstream's family, port 0).
    fn udp_bind_async(&self, local: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket>;

    /// An unconnected TCP socket of `peer`'s address family.
    fn tcp_socket_async(&self, peer: SocketAddr) -> SocketFuture<'_, tokio::net::TcpSocket>;
}

impl<F: UpstreamSocketFactory> AsyncUpstreamSocketFactory for F {
    fn udp_bind_async(&self, local: SocketAddr) -> SocketFuture<'_, std::net::UdpSocket> {
        Box::pin(std::future::ready(self.udp_bind(local)))
    }

    fn tcp_socket_async(&self, peer: SocketAddr) -> SocketFuture<'_, tokio::net::TcpSocket> {
        Box::pin(std::future::ready(self.tcp_socket(peer)))
    }
}

/// A shared synchronous factory, adapted to the async trait through the blanket impl.
struct Blocking(Arc<dyn UpstreamSocketFactory>);

impl UpstreamSocketFactory for Blocking {
    fn udp_bind(&self, local: SocketAddr) -> io::Result<std::net::UdpSocket> {
        self.0.udp_bind(local)
    }

    fn tcp_socket(&self, peer: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        self.0.tcp_socket(peer)
    }
}

/// Sockets in the caller's current network namespace, optionally with `SO_MARK`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultSocketFactory {
    mark: Option<u32>,
}

impl DefaultSocketFactory {
    /// Plain sockets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sockets carrying `mark` (needs CAP_NET_ADMIN), e.g. ztunnel's 0x539.
    pub fn with_mark(mark: u32) -> Self {
        Self { mark: Some(mark) }
    }

    fn socket(&self, addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
        if let Some(mark) = self.mark {
            set_mark(&socket, mark)?;
        }
        Ok(socket)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_mark(socket: &socket2::Socket, mark: u32) -> io::Result<()> {
    socket.set_mark(mark)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_mark(_: &socket2::Socket, _: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_MARK is only available on Linux",
    ))
}

impl UpstreamSocketFactory for DefaultSocketFactory {
    fn udp_bind(&self, local: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let socket = self.socket(local, socket2::Type::DGRAM)?;
        socket.bind(&local.into())?;
        Ok(socket.into())
    }

    fn tcp_socket(&self, peer: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.socket(peer, socket2::Type::STREAM)?;
        socket.set_nonblocking(true)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

/// The upstream resolvers and how to reach them.
#[derive(Clone)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    socket_factory: Arc<dyn AsyncUpstreamSocketFactory>,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstreams")
            .field("servers", &self.servers)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Resolvers tried in order (like resolv.conf `nameserver` lines), with
    /// [`DEFAULT_UPSTREAM_TIMEOUT`] and [`DefaultSocketFactory`].
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Self {
            servers,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            socket_factory: Arc::new(DefaultSocketFactory::new()),
        }
    }

    /// The `nameserver`s of a parsed resolv.conf (port 53).
    pub fn from_resolv_conf(conf: &ResolvConf) -> Self {
        Self::new(conf.nameservers.clone())
    }

    /// Total time to get an answer for one query; each of the `n` upstreams gets `timeout / n`.
    /// When it runs out the client gets SERVFAIL.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Where upstream sockets come from (see [`UpstreamSocketFactory`]; it runs on the Tokio
    /// worker serving the query).
    pub fn with_socket_factory(mut self, factory: Arc<dyn UpstreamSocketFactory>) -> Self {
        self.socket_factory = Arc::new(Blocking(factory));
        self
    }

    /// Where upstream sockets come from, awaited without blocking a Tokio worker (see
    /// [`AsyncUpstreamSocketFactory`]).
    pub fn with_async_socket_factory(
        mut self,
        factory: Arc<dyn AsyncUpstreamSocketFactory>,
    ) -> Self {
        self.socket_factory = factory;
        self
    }

    /// The configured resolvers.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }
}

/// What the proxy takes from a resolv.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, port 53.
    pub nameservers: Vec<SocketAddr>,
    /// The `search` (or `domain`) list, without trailing dots.
    pub search: Vec<String>,
}

impl ResolvConf {
    /// Reads and parses `path`.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| Error::ResolvConf {
            path: path.to_owned(),
            reason: source.to_string(),
        })?;
        Self::parse(&data).map_err(|e| match e {
            Error::ResolvConf { reason, .. } => Error::ResolvConf {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Parses resolv.conf contents (hickory's parser; malformed lines are skipped with a warning).
    pub fn parse(data: &[u8]) -> Result<Self, Error> {
        let (config, _opts) =
            hickory_resolver::system_conf::parse_resolv_conf(data).map_err(|e| {
                Error::ResolvConf {
                    path: PathBuf::new(),
                    reason: e.to_string(),
                }
            })?;
        let nameservers = config
            .name_servers()
            .iter()
            .map(|ns| SocketAddr::new(ns.ip, 53))
            .collect();
        let search = config
            .search()
            .iter()
            .map(|name| {
                let mut s = name.to_ascii();
                if s.ends_with('.') {
                    s.pop();
                }
                s
            })
            .filter(|s| !s.is_empty())
            .collect();
        Ok(Self {
            nameservers,
            search,
        })
    }
}

/// Why no upstream answer could be relayed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstreams,
    #[error("no upstream answered in time (last error: {0})")]
    Exhausted(String),
}

/// Hickory's Tokio runtime with sockets from the caller's factory.
#[derive(Clone)]
struct FactoryRuntime {
    handle: TokioHandle,
    factory: Arc<dyn AsyncUpstreamSocketFactory>,
}

impl RuntimeProvider for FactoryRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = tokio::net::UdpSocket;
    // Hickory's own adapter from Tokio to futures-io streams (what its TokioRuntimeProvider uses).
    type Tcp = AsyncIoTokioAsStd<tokio::net::TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.handle.clone()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        let factory = self.factory.clone();
        Box::pin(async move {
            let socket = factory.tcp_socket_async(server_addr).await?;
            if let Some(bind_addr) = bind_addr {
                socket.bind(bind_addr)?;
            }
            socket.set_nodelay(true)?;
            let connect = socket.connect(server_addr);
            let stream = match timeout {
                Some(limit) => tokio::time::timeout(limit, connect).await.map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "upstream TCP connect timed out")
                })??,
                None => connect.await?,
            };
            Ok(AsyncIoTokioAsStd(stream))
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        let factory = self.factory.clone();
        Box::pin(async move {
            let socket = factory.udp_bind_async(local_addr).await?;
            socket.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(socket)
        })
    }
}

/// Relays questions to the upstreams.
pub(crate) struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    runtime: FactoryRuntime,
}

impl Forwarder {
    pub(crate) fn new(config: Upstreams) -> Self {
        Self {
            upstreams: config.servers,
            timeout: config.timeout,
            runtime: FactoryRuntime {
                handle: TokioHandle::default(),
                factory: config.socket_factory,
            },
        }
    }

    /// Asks the upstreams `query` in order and returns the first usable answer.
    ///
    /// Like glibc, SERVFAIL/REFUSED/NOTIMP make us try the next upstream; if every upstream
    /// answers that way the last answer is relayed. Transport errors and timeouts also move on.
    pub(crate) async fn forward(
        &self,
        query: &Query,
        client: &ClientOptions,
        protocol: Protocol,
    ) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        let attempts = u32::try_from(self.upstreams.len()).unwrap_or(u32::MAX);
        let per_upstream = self.timeout / attempts;
        let mut last_answer: Option<Message> = None;
        let mut last_error = String::from("none");
        for (i, &upstream) in self.upstreams.iter().enumerate() {
            let request = client.request(query.clone());
            let exchange = self.exchange(upstream, request, protocol, per_upstream);
            match tokio::time::timeout(per_upstream, exchange).await {
                Ok(Ok(response)) => {
                    let message = response.into_message();
                    let retry_next = matches!(
                        message.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
                    );
                    if retry_next && i + 1 < self.upstreams.len() {
                        debug!(upstream = %upstream, rcode = %message.metadata.response_code, "trying next upstream");
                        last_answer = Some(message);
                        continue;
                    }
                    return Ok(message);
                }
                Ok(Err(error)) => {
                    debug!(upstream = %upstream, %error, "upstream query failed");
                    last_error = error.to_string();
                }
                Err(_) => {
                    debug!(upstream = %upstream, ?per_upstream, "upstream query timed out");
                    last_error = format!("{upstream} timed out");
                }
            }
        }
        last_answer.ok_or(ForwardError::Exhausted(last_error))
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        request: DnsRequest,
        protocol: Protocol,
        timeout: Duration,
    ) -> Result<DnsResponse, NetError> {
        if protocol == Protocol::Tcp {
            // One connection per query: TCP is the rare fallback for truncated answers.
            let exchange =
                TcpClientStream::exchange(upstream, None, timeout, Some(1), self.runtime.clone())
                    .await?;
            first_response(exchange.send(request)).await
        } else {
            // A fresh exchange per query: it is a task and a channel (each UDP query gets its
            // own socket anyway), and nothing long-lived is tied to one runtime or can wedge.
            let exchange = UdpClientStream::builder(upstream, self.runtime.clone())
                .with_timeout(Some(timeout))
                // The kernel's ephemeral ports are random enough and keep factories simple.
                .with_os_port_selection(true)
                .exchange();
            first_response(exchange.send(request)).await
        }
    }
}

async fn first_response<S>(mut responses: S) -> Result<DnsResponse, NetError>
where
    S: futures::Stream<Item = Result<DnsResponse, NetError>> + Unpin,
{
    match responses.next().await {
        Some(result) => result,
        None => Err(NetError::from("upstream closed without answering")),
    }
}

/// The parts of the client's request that shape the upstream request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientOptions {
    pub(crate) recursion_desired: bool,
    pub(crate) checking_disabled: bool,
    /// The client's EDNS payload size and DO bit; `None` when it sent no OPT record.
    pub(crate) edns: Option<(u16, bool)>,
}

impl ClientOptions {
    fn request(&self, query: Query) -> DnsRequest {
        // `Message::query()` picks a random id per upstream attempt.
        let mut message = Message::query();
        message.metadata.recursion_desired = self.recursion_desired;
        message.metadata.checking_disabled = self.checking_disabled;
        message.queries.push(query);
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = self.recursion_desired;
        match self.edns {
            Some((payload, dnssec_ok)) => {
                // Ask with the client's own limits so the upstream truncates exactly as it would
                // for the client.
                let mut edns = Edns::new();
                edns.set_max_payload(payload.max(512))
                    .set_dnssec_ok(dnssec_ok);
                message.edns = Some(edns);
                options.use_edns = true;
                options.edns_payload_len = payload.max(512);
                options.edns_set_dnssec_ok = dnssec_ok;
            }
            None => options.use_edns = false,
        }
        DnsRequest::new(message, options)
    }
}
