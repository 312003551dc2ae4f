//! In-pod capture against the real kernel: rules installed with `iptables-restore` in a lab pod
//! namespace, connections made from inside it, and what arrives where.
//!
//! Needs root (skipped loudly otherwise; fails under CI=true).

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    Host, Lab, Netns,
    inpod::{
        self, CaptureConfig, CidrSelector, IpFamily, NetnsHandle, connect_in, original_dst,
        render_rules, rules::parse_cidr_list, socket_netns_id,
    },
    lab_enabled,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const MARK: u32 = inpod::DEFAULT_MARK;
/// Every test is bounded: a capture bug shows up as a hang otherwise.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait before concluding a listener received nothing.
const QUIET: Duration = Duration::from_millis(300);

async fn bounded<F: Future<Output = Result<()>>>(test: F) -> Result<()> {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .context("test timed out")?
}

/// A pod (10.244.0.10, fd00:10:244::10) and an "internet" host (203.0.113.10, 2001:db8:113::10).
struct PodLab {
    pod: Host,
    web: Host,
    pod_ns: NetnsHandle,
    web_ns: NetnsHandle,
    _lab: Lab,
}

const POD_V4: &str = "10.244.0.10";
const WEB_V4: &str = "203.0.113.10";
const WEB_V6: &str = "2001:db8:113::10";

impl PodLab {
    fn new() -> Result<Self> {
        let lab = Lab::new()?;
        let pod = lab.add_host("pod", &format!("{POD_V4}/16"))?;
        lab.add_address(&pod, "fd00:10:244::10/64")?;
        let web = lab.add_host("web", &format!("{WEB_V4}/24"))?;
        lab.add_address(&web, &format!("{WEB_V6}/64"))?;
        Ok(Self {
            pod_ns: pod.handle()?,
            web_ns: web.handle()?,
            pod,
            web,
            _lab: lab,
        })
    }
}

/// Runs `test` (bounded) against a fresh [`PodLab`]; skipped where the lab cannot run.
async fn with_pod_lab(test: impl AsyncFnOnce(&PodLab) -> Result<()>) -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let lab = PodLab::new()?;
    bounded(test(&lab)).await
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

/// The ztunnel side of a capture: listeners on the capture ports inside the pod, bound the way
/// ztunnel binds them (dual-stack, so IPv4 arrives as v4-mapped).
async fn capture_listener(pod: &NetnsHandle, port: u16) -> Result<TcpListener> {
    Ok(pod
        .tcp_listener(SocketAddr::from(([0u16; 8], port)))
        .await?)
}

/// Connects from `from` to `dst` (with `mark`); returns the client and what `listener` accepted
/// within 5 s, if anything.
async fn dial(
    from: &NetnsHandle,
    dst: SocketAddr,
    mark: Option<u32>,
    listener: &TcpListener,
) -> Result<(TcpStream, Option<(TcpStream, SocketAddr)>)> {
    let client = connect_in(from, dst, mark).await?;
    Ok((
        client,
        accept_within(listener, Duration::from_secs(5)).await,
    ))
}

async fn accept_within(listener: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    tokio::time::timeout(wait, listener.accept())
        .await
        .ok()
        .and_then(Result::ok)
}

/// Proves the accepted stream is the client's connection: bytes go through both ways.
async fn round_trip(client: &mut TcpStream, server: &mut TcpStream) -> Result<()> {
    client.write_all(b"ping").await?;
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).await?;
    ensure!(&buf == b"ping");
    server.write_all(b"pong").await?;
    client.read_exact(&mut buf).await?;
    ensure!(&buf == b"pong");
    Ok(())
}

/// Unmaps `::ffff:a.b.c.d` so v4 peers compare equal whatever the listener's family.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Connects from the pod to `dst` and asserts the connection lands on `capture` with `dst` as its
/// original destination.
async fn assert_captured(lab: &PodLab, capture: &TcpListener, dst: SocketAddr) -> Result<()> {
    let (mut client, accepted) = dial(&lab.pod_ns, dst, None, capture).await?;
    let (mut server, peer) =
        accepted.with_context(|| format!("connection to {dst} was not captured"))?;
    ensure!(
        canonical(peer) == canonical(client.local_addr()?),
        "peer {peer} is not the client"
    );
    let original = original_dst(&server)?;
    ensure!(original == dst, "original dst {original}, want {dst}");
    round_trip(&mut client, &mut server).await
}

/// Connects from the pod to `dst` (a listener in the web namespace) and asserts it arrives there
/// directly, and that `capture` saw nothing.
async fn assert_bypassed(
    lab: &PodLab,
    capture: &TcpListener,
    real: &TcpListener,
    dst: SocketAddr,
    mark: Option<u32>,
) -> Result<()> {
    let (mut client, accepted) = dial(&lab.pod_ns, dst, mark, real).await?;
    let (mut server, _) = accepted
        .with_context(|| format!("connection to {dst} did not reach the real destination"))?;
    ensure!(server.local_addr()? == dst);
    round_trip(&mut client, &mut server).await?;
    if let Some((_, peer)) = accept_within(capture, QUIET).await {
        bail!("capture listener also got a connection from {peer}");
    }
    Ok(())
}

async fn install(lab: &PodLab, cfg: &CaptureConfig) -> Result<()> {
    inpod::install_rules(&lab.pod_ns, cfg).await?;
    Ok(())
}

/// Rule lines of the nat table, without comments and counters that change between saves.
async fn nat_rules(ns: &NetnsHandle, family: IpFamily) -> Result<Vec<String>> {
    Ok(inpod::save_nat(ns, family)
        .await?
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.strip_suffix(" [0:0]") {
            Some(decl) => decl.to_owned(),
            None => l.to_owned(),
        })
        .collect())
}

fn count(lines: &[String], wanted: &str) -> usize {
    lines.iter().filter(|l| *l == wanted).count()
}

/// Every rule `render_rules` produces is in the saved table exactly once.
fn assert_installed_once(saved: &[String], cfg: &CaptureConfig, family: IpFamily) -> Result<()> {
    for rule in render_rules(cfg, family)
        .lines()
        .filter(|l| l.starts_with("-A "))
    {
        let n = count(saved, rule);
        ensure!(
            n == 1,
            "{family:?}: {rule:?} present {n} times in\n{}",
            saved.join("\n")
        );
    }
    Ok(())
}

#[tokio::test]
async fn rules_install_idempotently_and_remove_exactly_ours() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let ns = Netns::new("rules")?;
    let handle = ns.handle()?;
    // Someone else's rule, which must survive everything we do.
    ns.exec_ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-d",
        "192.0.2.1/32",
        "-j",
        "RETURN",
    ])?;
    let foreign = "-A OUTPUT -d 192.0.2.1/32 -j RETURN";
    bounded(async {
        let cfg = CaptureConfig::default();
        inpod::install_rules(&handle, &cfg).await?;
        let first = nat_rules(&handle, IpFamily::V4).await?;
        for family in IpFamily::ALL {
            assert_installed_once(&nat_rules(&handle, family).await?, &cfg, family)?;
        }

        // A restart: same config, same table.
        inpod::install_rules(&handle, &cfg).await?;
        ensure!(
            nat_rules(&handle, IpFamily::V4).await? == first,
            "reinstall changed the table"
        );

        // A leaked duplicate jump (e.g. from an older, non-idempotent installer) is cleaned up.
        ns.exec_ok(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-j",
            "STRAIT_OUTPUT",
        ])?;
        inpod::install_rules(&handle, &cfg).await?;
        ensure!(
            nat_rules(&handle, IpFamily::V4).await? == first,
            "duplicate jump kept"
        );

        // A changed scope replaces the old rules instead of adding to them.
        let mut scoped = CaptureConfig::default();
        scoped.scope.include_outbound_cidrs = CidrSelector::Only(parse_cidr_list("10.96.0.0/12")?);
        inpod::install_rules(&handle, &scoped).await?;
        let v4 = nat_rules(&handle, IpFamily::V4).await?;
        assert_installed_once(&v4, &scoped, IpFamily::V4)?;
        ensure!(
            count(&v4, "-A STRAIT_OUTPUT -p tcp -j REDIRECT --to-ports 15001") == 0,
            "old catch-all redirect left behind"
        );
        ensure!(count(&v4, foreign) == 1);

        inpod::remove_rules(&handle, &IpFamily::ALL).await?;
        for family in IpFamily::ALL {
            let left = nat_rules(&handle, family).await?;
            ensure!(
                !left.iter().any(|l| l.contains("STRAIT")),
                "{family:?} rules left: {left:?}"
            );
        }
        ensure!(count(&nat_rules(&handle, IpFamily::V4).await?, foreign) == 1);
        // Removing again is a no-op, not an error.
        inpod::remove_rules(&handle, &IpFamily::ALL).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn outbound_tcp_is_captured_with_its_original_destination() -> Result<()> {
    with_pod_lab(async |lab| {
        install(lab, &CaptureConfig::default()).await?;
        let capture = capture_listener(&lab.pod_ns, 15001).await?;
        // Nothing listens on the destinations: only the capture can accept these.
        assert_captured(lab, &capture, addr(&format!("{WEB_V4}:80"))).await?;
        assert_captured(lab, &capture, addr(&format!("[{WEB_V6}]:443"))).await?;
        // Any address with a route is captured, not just hosts that exist.
        assert_captured(lab, &capture, addr("198.51.100.7:8443")).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn capture_scope_by_cidr_and_port() -> Result<()> {
    with_pod_lab(async |lab| {
        let capture = capture_listener(&lab.pod_ns, 15001).await?;
        let real = lab
            .web_ns
            .tcp_listener(addr(&format!("{WEB_V4}:80")))
            .await?;
        let web = addr(&format!("{WEB_V4}:80"));

        // Excluded CIDR: goes straight to the real host; other destinations still captured.
        let mut cfg = CaptureConfig::default();
        cfg.scope.exclude_outbound_cidrs = parse_cidr_list("203.0.113.0/24")?;
        install(lab, &cfg).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        assert_captured(lab, &capture, addr("198.51.100.7:80")).await?;

        // Include list: only the cluster's service range is captured.
        let mut cfg = CaptureConfig::default();
        cfg.scope.include_outbound_cidrs = CidrSelector::Only(parse_cidr_list("10.96.0.0/12")?);
        install(lab, &cfg).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        assert_captured(lab, &capture, addr("10.96.0.10:80")).await?;

        // Excluded port.
        let mut cfg = CaptureConfig::default();
        cfg.scope.exclude_outbound_ports = vec![80];
        install(lab, &cfg).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        assert_captured(lab, &capture, addr(&format!("{WEB_V4}:8080"))).await?;

        // Included port (includeOutboundPorts): captured whatever the address, even outside
        // the included range and inside an excluded one; other ports follow the ranges.
        let web_8080 = addr(&format!("{WEB_V4}:8080"));
        let mut cfg = CaptureConfig::default();
        cfg.scope.include_outbound_cidrs = CidrSelector::Only(parse_cidr_list("10.96.0.0/12")?);
        cfg.scope.include_outbound_ports = vec![8080];
        install(lab, &cfg).await?;
        assert_captured(lab, &capture, web_8080).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        assert_captured(lab, &capture, addr("10.96.0.10:80")).await?;
        cfg.scope.exclude_outbound_cidrs = parse_cidr_list("203.0.113.0/24")?;
        install(lab, &cfg).await?;
        assert_captured(lab, &capture, web_8080).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn marked_sockets_are_not_captured() -> Result<()> {
    with_pod_lab(async |lab| {
        install(lab, &CaptureConfig::default()).await?;
        let capture = capture_listener(&lab.pod_ns, 15001).await?;
        for web in [format!("{WEB_V4}:80"), format!("[{WEB_V6}]:80")] {
            let web = addr(&web);
            let real = lab.web_ns.tcp_listener(web).await?;
            assert_bypassed(lab, &capture, &real, web, Some(MARK)).await?;
            // The same connection without the mark is captured: the mark is what made the
            // difference.
            assert_captured(lab, &capture, web).await?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dns_is_redirected_to_the_dns_port() -> Result<()> {
    with_pod_lab(async |lab| {
        install(lab, &CaptureConfig::default()).await?;
        for (proxy_bind, resolver) in [
            ("127.0.0.1:15053", "203.0.113.53:53"),
            ("[::1]:15053", "[2001:db8:113::53]:53"),
        ] {
            let resolver = addr(resolver);
            // UDP: the proxy sees the query, and its answer reaches the client as if it came
            // from the resolver (a connected socket drops anything else).
            let proxy = lab.pod_ns.udp_socket(addr(proxy_bind), None).await?;
            let unspecified = if resolver.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let client = lab.pod_ns.udp_socket(addr(unspecified), None).await?;
            client.connect(resolver).await?;
            client.send(b"query").await?;
            let mut buf = [0u8; 64];
            let (n, from) = tokio::time::timeout(Duration::from_secs(5), proxy.recv_from(&mut buf))
                .await
                .with_context(|| format!("udp query to {resolver} not redirected"))??;
            ensure!(&buf[..n] == b"query");
            proxy.send_to(b"answer", from).await?;
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
                .await
                .context("answer did not come back through conntrack")??;
            ensure!(&buf[..n] == b"answer");

            // TCP 53 goes to the same port.
            let proxy_tcp = lab.pod_ns.tcp_listener(addr(proxy_bind)).await?;
            let (mut client, accepted) = dial(&lab.pod_ns, resolver, None, &proxy_tcp).await?;
            let (mut server, _) =
                accepted.with_context(|| format!("tcp dns to {resolver} not redirected"))?;
            ensure!(original_dst(&server)? == resolver);
            round_trip(&mut client, &mut server).await?;
        }

        // ztunnel's own upstream queries carry the mark and go out for real.
        let upstream = lab
            .web_ns
            .udp_socket(addr(&format!("{WEB_V4}:53")), None)
            .await?;
        let marked = lab.pod_ns.udp_socket(addr("0.0.0.0:0"), Some(MARK)).await?;
        marked.send_to(b"upstream", upstream.local_addr()?).await?;
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), upstream.recv_from(&mut buf))
            .await
            .context("marked dns query did not reach the upstream")??;
        ensure!(&buf[..n] == b"upstream");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn inbound_tcp_is_captured_except_hbone() -> Result<()> {
    with_pod_lab(async |lab| {
        install(lab, &CaptureConfig::default()).await?;
        let inbound = capture_listener(&lab.pod_ns, 15006).await?;
        let hbone = capture_listener(&lab.pod_ns, 15008).await?;
        let app = SocketAddr::new(lab.pod.ip(), 8080);

        let (mut client, accepted) = dial(&lab.web_ns, app, None, &inbound).await?;
        let (mut server, peer) = accepted.context("inbound connection not captured")?;
        ensure!(canonical(peer).ip() == lab.web.ip(), "peer {peer}");
        ensure!(original_dst(&server)? == app);
        round_trip(&mut client, &mut server).await?;

        let tunnel = SocketAddr::new(lab.pod.ip(), 15008);
        let (mut client, accepted) = dial(&lab.web_ns, tunnel, None, &hbone).await?;
        let (mut server, _) = accepted.context("HBONE connection did not reach 15008")?;
        ensure!(canonical(server.local_addr()?) == tunnel);
        round_trip(&mut client, &mut server).await?;
        ensure!(
            accept_within(&inbound, QUIET).await.is_none(),
            "HBONE was captured"
        );
        Ok(())
    })
    .await
}

/// With the rules in place conntrack tracks every connection in the pod, so `SO_ORIGINAL_DST`
/// answers even for connections that were never redirected, with the listener's own address.
/// `original_dst` must refuse those, or ztunnel would dial itself in a loop.
#[tokio::test]
async fn direct_connections_to_capture_ports_have_no_original_destination() -> Result<()> {
    with_pod_lab(async |lab| {
        install(lab, &CaptureConfig::default()).await?;
        let outbound = capture_listener(&lab.pod_ns, 15001).await?;
        let inbound = capture_listener(&lab.pod_ns, 15006).await?;

        // A process in the pod dialling the outbound port on loopback (not captured: `-o lo`).
        for dst in ["127.0.0.1:15001", "[::1]:15001"] {
            let dst = addr(dst);
            let (_client, accepted) = dial(&lab.pod_ns, dst, None, &outbound).await?;
            let (server, _) =
                accepted.with_context(|| format!("direct connection to {dst} not accepted"))?;
            match original_dst(&server) {
                Ok(original) => bail!("{dst}: got original destination {original}"),
                Err(e) => ensure!(inpod::is_not_redirected(&e), "{dst}: unexpected error {e}"),
            }
        }

        // A peer dialling the inbound port on the pod's address: REDIRECT maps it onto itself.
        let dst = SocketAddr::new(lab.pod.ip(), 15006);
        let (_client, accepted) = dial(&lab.web_ns, dst, None, &inbound).await?;
        let (server, _) = accepted.context("direct connection to the inbound port not accepted")?;
        let err = original_dst(&server).expect_err("not redirected");
        ensure!(inpod::is_not_redirected(&err), "unexpected error {err}");

        // Control: a captured connection still reports where it was going.
        assert_captured(lab, &outbound, addr(&format!("{WEB_V4}:80"))).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn removed_rules_stop_capturing() -> Result<()> {
    with_pod_lab(async |lab| {
        let capture = capture_listener(&lab.pod_ns, 15001).await?;
        let web = addr(&format!("{WEB_V4}:80"));
        let real = lab.web_ns.tcp_listener(web).await?;
        install(lab, &CaptureConfig::default()).await?;
        assert_captured(lab, &capture, web).await?;
        inpod::remove_rules(&lab.pod_ns, &IpFamily::ALL).await?;
        assert_bypassed(lab, &capture, &real, web, None).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn netns_handle_sockets_live_in_their_namespace() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let pod = Netns::new("handle")?;
    let handle = pod.handle()?;
    bounded(async {
        let host = NetnsHandle::current()?;
        ensure!(
            handle.id() != host.id(),
            "pod and host namespaces must differ"
        );

        let listener = handle.tcp_listener(addr("127.0.0.1:0")).await?;
        ensure!(socket_netns_id(&listener)? == handle.id());
        let udp = handle.udp_socket(addr("127.0.0.1:0"), Some(MARK)).await?;
        ensure!(socket_netns_id(&udp)? == handle.id());
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        ensure!(
            socket_netns_id(&plain)? == host.id(),
            "this thread must not have moved"
        );

        // The pod's loopback is its own: reachable through the handle, not from the host.
        let port = listener.local_addr()?.port();
        let target = addr(&format!("127.0.0.1:{port}"));
        let client = connect_in(&handle, target, None).await?;
        ensure!(socket_netns_id(&client)? == handle.id());
        let (accepted, _) = accept_within(&listener, Duration::from_secs(5))
            .await
            .context("accept in pod")?;
        ensure!(socket_netns_id(&accepted)? == handle.id());
        // The same address dialled from the host lands in the host's namespace (refused, or some
        // host listener that happens to use the port), never on the pod's listener.
        if let Ok(from_host) = TcpStream::connect(target).await {
            ensure!(socket_netns_id(&from_host)? == host.id());
        }
        if let Some((_, peer)) = accept_within(&listener, QUIET).await {
            bail!("the pod's listener accepted {peer} from the host's namespace");
        }

        // Commands started through the handle run in the namespace too.
        let mut cmd = std::process::Command::new("readlink");
        cmd.arg("/proc/self/ns/net");
        let out = handle.command_output(cmd, None).await?;
        let shown = String::from_utf8_lossy(&out.stdout);
        ensure!(
            shown.trim() == handle.id().to_string(),
            "{shown} vs {}",
            handle.id()
        );

        // Errors name the path.
        let missing = NetnsHandle::open("/run/netns/does-not-exist-mesh-tests").unwrap_err();
        ensure!(
            missing
                .to_string()
                .contains("/run/netns/does-not-exist-mesh-tests")
        );
        let not_net = NetnsHandle::open("/proc/self/ns/uts").unwrap_err();
        ensure!(
            matches!(not_net, inpod::Error::Enter { .. }),
            "a uts namespace is not a network namespace: {not_net}"
        );
        Ok(())
    })
    .await
}
