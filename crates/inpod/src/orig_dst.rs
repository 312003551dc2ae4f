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
/// Fails with `ENOENT` for a connection that was not redirected.
pub fn original_dst(sock: &impl AsFd) -> io::Result<SocketAddr> {
    let local = SockRef::from(sock)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))?;
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let raw = getsockopt(sock, OriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        )))
    } else {
        let raw = getsockopt(sock, Ip6tOriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(raw.sin6_addr.s6_addr),
            u16::from_be(raw.sin6_port),
            u32::from_be(raw.sin6_flowinfo),
            raw.sin6_scope_id,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A loopback connection is not in any NAT table: the kernel must say so rather than invent an
    // address, and we must pass that through as an error.
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
            let err = original_dst(&server).expect_err("no conntrack NAT entry");
            // ENOENT when conntrack has no entry; ENOPROTOOPT when the conntrack module is absent.
            assert!(
                matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
                "{bind}: {err}"
            );
        }
    }
}
