//! Serving: hickory-server does the UDP/TCP framing, our handler decides local vs forwarded.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Record};
use hickory_resolver::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tracing::{debug, warn};

use crate::Error;
use crate::names::{self, LocalAnswer, NameTable, Names, PodDnsContext};
use crate::upstream::{ClientOptions, Forwarder, Upstreams};

/// A TCP client that sends no query for this long is disconnected (ztunnel's value).
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Responses buffered per TCP connection (ztunnel's value).
const TCP_RESPONSE_BUFFER: usize = 32;

/// The DNS proxy for one pod: answers mesh hosts from a [`NameTable`], forwards the rest.
///
/// Cheap to clone; clones share the table and upstream configuration.
#[derive(Clone)]
pub struct DnsProxy {
    inner: Arc<Inner>,
}

struct Inner {
    table: Arc<dyn NameTable>,
    names: Names,
    forwarder: Forwarder,
    namespace: String,
}

impl DnsProxy {
    /// Fails only if the context holds a namespace, cluster domain or search domain that is
    /// not a valid DNS name.
    pub fn new(
        table: Arc<dyn NameTable>,
        upstreams: Upstreams,
        ctx: PodDnsContext,
    ) -> Result<Self, Error> {
        let names = Names::compile(&ctx)?;
        Ok(Self {
            inner: Arc::new(Inner {
                table,
                names,
                forwarder: Forwarder::new(upstreams),
                namespace: ctx.namespace().to_owned(),
            }),
        })
    }

    /// Serves DNS on an already bound UDP socket and TCP listener until `shutdown` completes.
    pub async fn serve(
        &self,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        self.serve_all(vec![udp], vec![tcp], shutdown).await
    }

    /// Like [`serve`](Self::serve) for several sockets (e.g. 127.0.0.1:15053 and [::1]:15053).
    ///
    /// Returns `Ok(())` after `shutdown`, or an error if a socket fails unrecoverably.
    pub async fn serve_all(
        &self,
        udp: Vec<std::net::UdpSocket>,
        tcp: Vec<std::net::TcpListener>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Error> {
        if udp.is_empty() && tcp.is_empty() {
            return Err(Error::NoListeners);
        }
        let mut server = hickory_server::Server::new(Handler {
            inner: self.inner.clone(),
        });
        for socket in udp {
            socket.set_nonblocking(true).map_err(Error::Socket)?;
            server.register_socket(tokio::net::UdpSocket::from_std(socket).map_err(Error::Socket)?);
        }
        for listener in tcp {
            listener.set_nonblocking(true).map_err(Error::Socket)?;
            server.register_listener(
                tokio::net::TcpListener::from_std(listener).map_err(Error::Socket)?,
                TCP_IDLE_TIMEOUT,
                TCP_RESPONSE_BUFFER,
            );
        }
        tokio::select! {
            result = server.block_until_done() => result.map_err(Error::Server),
            () = shutdown => {
                debug!(namespace = %self.inner.namespace, "DNS proxy shutting down");
                server.shutdown_gracefully().await.map_err(Error::Server)
            }
        }
    }
}

struct Handler {
    inner: Arc<Inner>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        // hickory-server already dropped undecodable datagrams and answered FORMERR where it
        // could read a header; what is left is a well-formed message.
        if request.metadata.message_type != MessageType::Query {
            // A response (QR=1) sent to us. Answering it, even with FORMERR, lets two servers
            // bounce messages between them forever and reflects spoofed traffic: drop it. (The
            // hickory-server version we use drops these before calling us; this does not rely
            // on that.)
            debug!(target: "dns", src = %request.src(), id = request.metadata.id, "dropped a DNS response sent to the proxy");
            return not_sent(&request.metadata);
        }
        if request.metadata.op_code != OpCode::Query {
            return send_error(request, response_handle, ResponseCode::NotImp).await;
        }
        let Ok(info) = request.request_info() else {
            // Zero or several questions.
            return send_error(request, response_handle, ResponseCode::FormErr).await;
        };
        let query = info.query.original().clone();

        if query.query_class() == DNSClass::IN
            && let LocalAnswer::Records(records) = names::answer(
                self.inner.table.as_ref(),
                &self.inner.names,
                query.name(),
                query.query_type(),
            )
        {
            debug!(
                target: "dns",
                src = %request.src(),
                name = %query.name(),
                qtype = %query.query_type(),
                answers = records.len(),
                "answered locally"
            );
            return send_local(request, response_handle, &records).await;
        }

        let client = ClientOptions {
            recursion_desired: request.metadata.recursion_desired,
            checking_disabled: request.metadata.checking_disabled,
            edns: request
                .edns
                .as_ref()
                .map(|edns| (edns.max_payload(), edns.flags().dnssec_ok)),
        };
        match self
            .inner
            .forwarder
            .forward(&query, &client, request.protocol())
            .await
        {
            Ok(upstream) => {
                debug!(
                    target: "dns",
                    src = %request.src(),
                    name = %query.name(),
                    qtype = %query.query_type(),
                    rcode = %upstream.metadata.response_code,
                    answers = upstream.answers.len(),
                    "forwarded"
                );
                send_forwarded(request, response_handle, &upstream).await
            }
            Err(error) => {
                warn!(
                    target: "dns",
                    src = %request.src(),
                    name = %query.name(),
                    qtype = %query.query_type(),
                    %error,
                    "forwarding failed"
                );
                send_error(request, response_handle, ResponseCode::ServFail).await
            }
        }
    }
}

/// The OPT record of our response: only if the client sent one, sized to the client's limit
/// (hickory truncates UDP responses to the response's payload size).
fn response_edns(request: &Request, upstream: Option<&Edns>) -> Option<Edns> {
    let client = request.edns.as_ref()?;
    let mut edns = upstream.cloned().unwrap_or_default();
    edns.set_max_payload(client.max_payload().max(512))
        .set_version(0)
        .set_dnssec_ok(client.flags().dnssec_ok);
    Some(edns)
}

async fn send_local<R: ResponseHandler>(
    request: &Request,
    response_handle: R,
    records: &[Record],
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.authoritative = true;
    metadata.recursion_available = true;
    metadata.response_code = ResponseCode::NoError;
    let edns = response_edns(request, None);
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let response = builder.build(metadata, records, &[], &[], &[]);
    send(response_handle, response, &request.metadata).await
}

async fn send_forwarded<R: ResponseHandler>(
    request: &Request,
    response_handle: R,
    upstream: &Message,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    let from = &upstream.metadata;
    metadata.authoritative = from.authoritative;
    metadata.truncation = from.truncation;
    metadata.recursion_available = from.recursion_available;
    metadata.authentic_data = from.authentic_data;
    metadata.response_code = from.response_code;
    let edns = response_edns(request, upstream.edns.as_ref());
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let response = builder.build(
        metadata,
        &upstream.answers,
        &upstream.authorities,
        &[],
        &upstream.additionals,
    );
    send(response_handle, response, &request.metadata).await
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    response_handle: R,
    code: ResponseCode,
) -> ResponseInfo {
    let mut response =
        MessageResponseBuilder::from_message_request(request).error_msg(&request.metadata, code);
    response.metadata_mut().recursion_available = true;
    send(response_handle, response, &request.metadata).await
}

/// What to report for a request that gets no reply.
fn not_sent(request: &Metadata) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(request);
    metadata.response_code = ResponseCode::Refused;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

async fn send<'a, R: ResponseHandler>(
    mut response_handle: R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Metadata,
) -> ResponseInfo {
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            debug!(target: "dns", %error, id = request.id, "sending DNS response failed");
            let mut metadata = Metadata::response_from_request(request);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use hickory_resolver::net::NetError;
    use hickory_resolver::net::runtime::TokioTime;
    use hickory_resolver::net::xfer::Protocol;
    use hickory_server::zone_handler::MessageResponse;

    use super::*;

    /// Counts what the handler sends.
    #[derive(Clone, Default)]
    struct Recorder(Arc<AtomicUsize>);

    #[async_trait::async_trait]
    impl ResponseHandler for Recorder {
        async fn send_response<'a>(
            &mut self,
            response: MessageResponse<
                '_,
                'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
                impl Iterator<Item = &'a Record> + Send + 'a,
            >,
        ) -> Result<ResponseInfo, NetError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(ResponseInfo::from(Header {
                metadata: *response.metadata(),
                counts: HeaderCounts::default(),
            }))
        }
    }

    fn handler() -> Handler {
        let proxy = DnsProxy::new(
            Arc::new(|_: &str| None),
            Upstreams::new(vec![]),
            PodDnsContext::new("default"),
        )
        .expect("proxy");
        Handler { inner: proxy.inner }
    }

    fn request(message_type: MessageType) -> Request {
        let mut message = Message::query();
        message.metadata.id = 0x4242;
        message.metadata.message_type = message_type;
        message.queries.push(Query::query(
            Name::from_ascii("example.com.").expect("name"),
            RecordType::A,
        ));
        let src: SocketAddr = "127.0.0.1:5353".parse().expect("addr");
        Request::from_bytes(message.to_vec().expect("encode"), src, Protocol::Udp).expect("request")
    }

    #[tokio::test]
    async fn responses_sent_to_the_proxy_get_no_reply() {
        let handler = handler();
        let sent = Recorder::default();
        handler
            .handle_request::<_, TokioTime>(&request(MessageType::Response), sent.clone())
            .await;
        assert_eq!(sent.0.load(Ordering::SeqCst), 0, "a response was answered");

        // Control: a query through the same handler is answered (SERVFAIL: no upstreams).
        handler
            .handle_request::<_, TokioTime>(&request(MessageType::Query), sent.clone())
            .await;
        assert_eq!(sent.0.load(Ordering::SeqCst), 1);
    }
}
