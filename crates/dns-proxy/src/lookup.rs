//! "Resolve this name" for the proxy's owner: the A and AAAA addresses of a host, asked of the
//! same [`Upstreams`] (and socket factory) the proxy forwards to.
//!
//! ztunnel uses it to reach a `resolution: DNS` ServiceEntry host itself. It must not go
//! through the pod's own DNS capture (it would be answered with the VIP again), which is what
//! the upstreams' socket factory already guarantees for forwarded queries.

use std::net::IpAddr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use hickory_resolver::net::xfer::Protocol;

use crate::upstream::{ClientOptions, ForwardError, Forwarder, Upstreams};

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Not a valid DNS name.
    #[error("invalid host name {host:?}: {source}")]
    Name {
        host: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    /// No upstream configured.
    #[error("no upstream resolver configured")]
    NoUpstreams,
    /// Neither the A nor the AAAA question got a usable answer.
    #[error("no upstream answered: {0}")]
    Failed(String),
}

impl Upstreams {
    /// The IPv4 and IPv6 addresses of `host` (an absolute name: no search domains), IPv4
    /// first, both questions asked at once. NXDOMAIN or no records is an empty list, not an
    /// error; it is an error only when neither question got an answer (every upstream
    /// unreachable, timed out, or answering SERVFAIL/REFUSED). A truncated UDP answer is asked
    /// again over TCP.
    pub async fn lookup_ip(&self, host: &str) -> Result<Vec<IpAddr>, LookupError> {
        if self.servers().is_empty() {
            return Err(LookupError::NoUpstreams);
        }
        let mut name = Name::from_ascii(host).map_err(|source| LookupError::Name {
            host: host.to_owned(),
            source,
        })?;
        name.set_fqdn(true);
        let forwarder = Forwarder::new(self.clone());
        let (v4, v6) = futures::join!(
            ask(&forwarder, &name, RecordType::A),
            ask(&forwarder, &name, RecordType::AAAA)
        );
        match (v4, v6) {
            (Err(a), Err(aaaa)) => Err(LookupError::Failed(format!("A: {a}; AAAA: {aaaa}"))),
            (v4, v6) => Ok(v4
                .unwrap_or_default()
                .into_iter()
                .chain(v6.unwrap_or_default())
                .collect()),
        }
    }
}

async fn ask(forwarder: &Forwarder, name: &Name, rtype: RecordType) -> Result<Vec<IpAddr>, String> {
    let query = Query::query(name.clone(), rtype);
    let client = ClientOptions {
        recursion_desired: true,
        checking_disabled: false,
        edns: None,
    };
    let mut answer = forward(forwarder, &query, &client, Protocol::Udp).await?;
    if answer.metadata.truncation {
        answer = forward(forwarder, &query, &client, Protocol::Tcp).await?;
    }
    match answer.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => Ok(addresses(&answer, rtype)),
        code => Err(format!("{rtype} answered {code}")),
    }
}

async fn forward(
    forwarder: &Forwarder,
    query: &Query,
    client: &ClientOptions,
    protocol: Protocol,
) -> Result<Message, String> {
    forwarder
        .forward(query, client, protocol)
        .await
        .map_err(|e: ForwardError| e.to_string())
}

/// The addresses of the asked type in the answer section (CNAME chains are followed by the
/// upstream; only the final records carry addresses).
fn addresses(answer: &Message, rtype: RecordType) -> Vec<IpAddr> {
    answer
        .answers
        .iter()
        .filter_map(|r| match (&r.data, rtype) {
            (RData::A(a), RecordType::A) => Some(IpAddr::V4(a.0)),
            (RData::AAAA(a), RecordType::AAAA) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}
