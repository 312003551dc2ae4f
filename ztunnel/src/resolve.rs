//! Looking up a ServiceEntry host for ztunnel itself (a `resolution: DNS` ServiceEntry reached
//! through its VIP, without waypoint), from inside the pod's namespace with the mark so the
//! pod's DNS capture does not answer us with the VIP again.
//!
//! A thin adapter: the dns-proxy crate forwards whole queries but has no "resolve this name"
//! call; the messages are built and parsed with hickory-proto, one UDP exchange per upstream
//! and record type.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use inpod::NetnsHandle;
use socket2::{Domain, Protocol, Socket, Type};

use crate::MARK;

/// Budget for one upstream's answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("invalid host name {host:?}: {reason}")]
    Name { host: String, reason: String },
    #[error("no upstream resolver configured")]
    NoUpstreams,
    #[error("no upstream answered: {0}")]
    Exhausted(String),
}

/// The A and AAAA addresses of `host` (IPv4 first).
pub async fn lookup(
    netns: &NetnsHandle,
    upstreams: &[SocketAddr],
    host: &str,
) -> Result<Vec<IpAddr>, ResolveError> {
    if upstreams.is_empty() {
        return Err(ResolveError::NoUpstreams);
    }
    let mut name = Name::from_ascii(host).map_err(|e| ResolveError::Name {
        host: host.to_owned(),
        reason: e.to_string(),
    })?;
    name.set_fqdn(true);
    let mut last_error = String::from("none");
    for upstream in upstreams {
        let mut found = Vec::new();
        let mut answered = false;
        for rtype in [RecordType::A, RecordType::AAAA] {
            match exchange(netns, *upstream, &name, rtype).await {
                Ok(ips) => {
                    answered = true;
                    found.extend(ips);
                }
                Err(e) => last_error = format!("{upstream}: {e}"),
            }
        }
        if answered {
            return Ok(found);
        }
    }
    Err(ResolveError::Exhausted(last_error))
}

async fn exchange(
    netns: &NetnsHandle,
    upstream: SocketAddr,
    name: &Name,
    rtype: RecordType,
) -> io::Result<Vec<IpAddr>> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), rtype));
    let wire = query.to_vec().map_err(io::Error::other)?;
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = netns
        .run(move || -> io::Result<std::net::UdpSocket> {
            let s = Socket::new(
                Domain::for_address(upstream),
                Type::DGRAM,
                Some(Protocol::UDP),
            )?;
            s.set_mark(MARK)?;
            s.set_nonblocking(true)?;
            s.bind(&local.into())?;
            Ok(s.into())
        })
        .await
        .map_err(io::Error::other)??;
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    socket.connect(upstream).await?;
    socket.send(&wire).await?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + QUERY_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
        let Some(bytes) = buf.get(..n) else { continue };
        let Ok(answer) = Message::from_vec(bytes) else {
            continue; // garbage on our port: keep waiting for the real answer
        };
        if answer.metadata.id != query.metadata.id {
            continue;
        }
        if !matches!(
            answer.metadata.response_code,
            ResponseCode::NoError | ResponseCode::NXDomain
        ) {
            return Err(io::Error::other(format!(
                "{rtype} answered {}",
                answer.metadata.response_code
            )));
        }
        return Ok(answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect());
    }
}
