//! The destination a connection had before the capture rules redirected it.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
};

use nix::sys::socket::{
    getsockopt,
    sockopt::{Ip6tOriginalDst, OriginalDst},
};
use socket2::SockRef;

/// The original destination of a redirected (REDIRECT/DNAT) TCP connection, read from conntrack:
/// `SO_ORIGINAL_DST` for IPv4 and `IP6T_SO_ORIGINAL_DST` for IPv6.
///
/// The family is taken from the socket's local address. An IPv4 connection accepted on a
/// dual-stack `[::]` listener shows an IPv4-mapped local address; its conntrack entry is IPv4, so
/// it is asked with `SO_ORIGINAL_DST`, and the answer is a plain IPv4 address.
///
/// Fails for a connection that was not redirected:
/// - with `ENOENT` (or `ENOPROTOOPT` without the conntrack module) when conntrack has no entry;
/// - with [`io::ErrorKind::InvalidInput`] wrapping [`NotRedirected`] ("connection was not
///   redirected") when conntrack tracks the connection but did not translate it. Once NAT rules exist in a namespace, conntrack
///   tracks every connection and `SO_ORIGINAL_DST` returns the socket's own address for those
///   that reached the listener directly (a client dialing `pod_ip:15006` or `127.0.0.1:15001`);
///   a proxy that trusted that answer would connect to itself in a loop. Use
///   [`is_not_redirected`] to tell this case apart.
pub fn original_dst(sock: &impl AsFd) -> io::Result<SocketAddr> {
    let local = SockRef::from(sock)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let local = unmap(local);
    let original = if local.is_ipv4() {
        let raw = getsockopt(sock, OriginalDst).map_err(io::Error::from)?;
        SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        ))
    } else {
        let raw = getsockopt(sock, Ip6tOriginalDst).map_err(io::Error::from)?;
        SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
            u32::from_be(raw.sin6_flowinfo),
            raw.sin6_scope_id,
        ))
    };
    // Flowinfo and scope id are not part of where the connection went; compare ip and port.
    let original_unmapped = unmap(original);
    if original_unmapped.ip() == local.ip() && original_unmapped.port() == local.port() {
        return Err(not_redirected(local));
    }
    Ok(original)
}

/// The error inside the [`io::Error`] that [`original_dst`] returns when conntrack tracks a
/// connection but did not translate it: the connection reached the listener directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection was not redirected: its original destination is the listener itself ({local})")]
pub struct NotRedirected {
    /// The listener's address, v4-mapped addresses unmapped.
    pub local: SocketAddr,
}

fn not_redirected(local: SocketAddr) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NotRedirected { local })
}

/// Whether `err` (from [`original_dst`]) means the connection was never redirected, whether
/// conntrack had no entry for it (`ENOENT`; `ENOPROTOOPT` without the conntrack module) or one
/// without translation ([`NotRedirected`]).
pub fn is_not_redirected(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT))
        || err
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<NotRedirected>().is_some())
}

/// `::ffff:a.b.c.d` → `a.b.c.d`, so v4 connections on dual-stack listeners compare as v4.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A loopback connection straight to its listener was not redirected. Without NAT rules in
    // the namespace conntrack has no entry (ENOENT); with them (a host running Docker, or a pod
    // with our capture rules) it has one whose original destination is the listener itself.
    // Either way the answer must be an error, never the listener's own address.
    #[tokio::test]
    async fn unredirected_connection_is_an_error() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                continue; // no IPv6 on this host
            };
            let addr = listener.local_addr().expect("local addr");
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let _client = client.expect("connect");
            let (server, _) = accepted.expect("accept");
            let err = original_dst(&server).expect_err("not redirected");
            assert!(is_not_redirected(&err), "{bind}: {err}");
        }
    }

    #[test]
    fn not_redirected_is_recognised_and_other_errors_are_not() {
        let local: SocketAddr = "127.0.0.1:15001".parse().expect("addr");
        let err = not_redirected(local);
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(is_not_redirected(&err));
        assert!(err.to_string().contains("not redirected"), "{err}");
        assert!(is_not_redirected(&io::Error::from_raw_os_error(
            libc::ENOENT
        )));
        assert!(!is_not_redirected(&io::Error::from_raw_os_error(
            libc::EBADF
        )));
        assert!(!is_not_redirected(&io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an IP socket"
        )));
    }

    #[test]
    fn unmap_only_touches_v4_mapped_addresses() {
        let cases = [
            ("[::ffff:10.0.0.1]:80", "10.0.0.1:80"),
            ("[::1]:80", "[::1]:80"),
            ("10.0.0.1:80", "10.0.0.1:80"),
        ];
        for (input, want) in cases {
            let input: SocketAddr = input.parse().expect("addr");
            assert_eq!(unmap(input), want.parse::<SocketAddr>().expect("addr"));
        }
    }
}
