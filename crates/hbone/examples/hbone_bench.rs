//! HBONE loopback benchmark: tunnel vs plain TLS vs plain TCP, latency, 100 streams vs 1, and
//! a flow-control window sweep. Run with `scripts/bench-hbone` (release build).
//!
//! One process, two threads, each running a single-threaded tokio runtime: one is the client
//! side (the app writing, the HBONE client or TLS client, the outbound proxies), the other the
//! server side (HBONE server, TLS server, sinks, the inbound proxies). That is two proxies on a
//! 2-core node (ztunnel and a waypoint each run per-thread runtimes); the only hand-offs between
//! threads go through sockets, as between processes. `--shared-runtime` puts both sides on one
//! 2-worker work-stealing runtime instead, for comparison.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use certs::{CertificateAuthority, IdentityManager, SpiffeId};
use hbone::{Client, Config, IncomingConnect, Server, TunnelRequest};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

const CHUNK: usize = 256 * 1024;
const MIB: u64 = 1024 * 1024;
/// Authority ports the bench handler dispatches on.
const SINK: u16 = 1;
const ECHO: u16 = 2;
/// A sink reading 16 KiB at a time (see the aggregate section).
const SINK_16K: u16 = 3;
/// App reads and writes per stream in the aggregate section's first comparison: 100 streams'
/// buffers (1.6 MiB a side) stay in cache, as one stream's do.
const SMALL_CHUNK: usize = 16 * 1024;

struct Args {
    size: u64,
    reps: usize,
    pings: usize,
    sweep: bool,
    /// Only this single-stream throughput test (tcp, tls, tunnel): for profiling.
    only: Option<String>,
    /// Overrides `Config::max_send_buffer` (KiB), for tuning runs.
    send_buffer: Option<usize>,
    /// Overrides `Config::connection_window` (KiB), for tuning runs.
    conn_window: Option<u32>,
    /// Overrides `Config::max_frame_size` (KiB), for tuning runs.
    max_frame: Option<u32>,
    /// Overrides `Config::max_streams_per_connection`, for tuning runs.
    streams_per_conn: Option<usize>,
    /// Raise glibc's trim threshold (as the binaries should); off with --glibc-default.
    tune_malloc: bool,
    /// Client and server on one 2-worker multi-thread runtime instead of a thread each.
    shared_runtime: bool,
}

fn args() -> Args {
    let mut a = Args {
        // Many short paired runs: this VM's slow spells last seconds, so a pair 0.2 s apart
        // sees the same machine, and the median of 31 pairs moved ±3 % between bench runs
        // where 5 pairs of 1 GiB moved ±15 %.
        size: 128 * MIB,
        reps: 31,
        pings: 20_000,
        sweep: true,
        only: None,
        send_buffer: None,
        tune_malloc: true,
        conn_window: None,
        max_frame: None,
        streams_per_conn: None,
        shared_runtime: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--size-mib" => {
                a.size = it
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map_or(a.size, |m| m * MIB)
            }
            "--reps" => a.reps = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.reps),
            "--pings" => a.pings = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.pings),
            "--no-sweep" => a.sweep = false,
            "--glibc-default" => a.tune_malloc = false,
            "--shared-runtime" => a.shared_runtime = true,
            "--streams-per-conn" => a.streams_per_conn = it.next().and_then(|v| v.parse().ok()),
            "--conn-window-kib" => a.conn_window = it.next().and_then(|v| v.parse().ok()),
            "--max-frame-kib" => a.max_frame = it.next().and_then(|v| v.parse().ok()),
            "--only" => a.only = it.next(),
            "--send-buffer-kib" => a.send_buffer = it.next().and_then(|v| v.parse().ok()),
            other => {
                eprintln!(
                    "usage: hbone_bench [--size-mib N] [--reps N] [--pings N] [--no-sweep] [--only tcp|tls|tunnel|tls-proxy|hbone-proxy|hundred] [--send-buffer-kib N] [--glibc-default] [--shared-runtime] [--conn-window-kib N] [--max-frame-kib N] [--streams-per-conn N] (got {other})"
                );
                std::process::exit(2);
            }
        }
    }
    a
}

fn main() -> io::Result<()> {
    let args = args();
    if args.shared_runtime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let server = rt.handle().clone();
        return rt.block_on(run(args, server));
    }
    // The server side: its own thread and runtime, alive until the process exits.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(rt.handle().clone()));
            rt.block_on(std::future::pending::<()>());
        })?;
    let server = rx.recv().map_err(io::Error::other)??;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args, server))
}

/// Binds a loopback listener and runs `serve` on it in runtime `rt`.
fn listen_on<F, Fut>(rt: &Handle, serve: F) -> io::Result<SocketAddr>
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.set_nonblocking(true)?;
    let addr = l.local_addr()?;
    rt.spawn(async move {
        // from_std registers the socket with the reactor of the runtime it runs in.
        match TcpListener::from_std(l) {
            Ok(l) => serve(l).await,
            Err(e) => eprintln!("bench listener {addr}: {e}"),
        }
    });
    Ok(addr)
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

/// Reads to EOF, answers the byte count, closes.
async fn sink<S: AsyncRead + AsyncWrite + Unpin>(s: S) -> io::Result<()> {
    sink_with(s, CHUNK).await
}

/// [`sink`] reading `chunk` bytes at a time.
async fn sink_with<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, chunk: usize) -> io::Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes()).await?;
    s.shutdown().await
}

/// Echoes until EOF.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
        s.flush().await?;
    }
}

/// Writes `bytes`, half-closes, waits for the sink's count. Returns the elapsed time.
async fn blast<S: AsyncRead + AsyncWrite + Unpin>(s: S, bytes: u64) -> io::Result<Duration> {
    blast_with(s, bytes, CHUNK).await
}

/// [`blast`] writing `chunk` bytes at a time.
async fn blast_with<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    bytes: u64,
    chunk: usize,
) -> io::Result<Duration> {
    let buf = vec![0xa5u8; chunk];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        s.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await?;
    let elapsed = start.elapsed();
    if u64::from_be_bytes(ack) != bytes {
        return Err(io::Error::other("sink saw a different byte count"));
    }
    Ok(elapsed)
}

async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    n: usize,
) -> io::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new(3).map_err(io::Error::other)?;
    let mut b = [0u8; 1];
    // Warm up (and let TCP leave slow start).
    for _ in 0..200 {
        s.write_all(&b).await?;
        s.read_exact(&mut b).await?;
    }
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b).await?;
        s.flush().await?;
        s.read_exact(&mut b).await?;
        h.record(t.elapsed().as_nanos() as u64)
            .map_err(io::Error::other)?;
    }
    Ok(h)
}

/// CPU time (user + system) this process has used: a measure of cost that, unlike throughput,
/// holds up when other work competes for the cores.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we hand it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

struct Fixture {
    tcp: SocketAddr,
    /// Outbound proxies (app TCP in, TLS or HBONE out) whose far ends forward to the `tcp` sink:
    /// the path ztunnel and a waypoint put traffic on.
    tls_proxy: SocketAddr,
    hbone_proxy: SocketAddr,
    tls: SocketAddr,
    tls_client: Arc<rustls::ClientConfig>,
    hbone: SocketAddr,
    client: Client,
}

async fn serve_tcp(listener: TcpListener, echo_mode: bool) {
    while let Ok((s, _)) = listener.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let _ = if echo_mode {
                echo(s).await
            } else {
                sink(s).await
            };
        });
    }
}

async fn hbone_handler(c: IncomingConnect) {
    let target = c.meta().authority;
    if target.port() > SINK_16K {
        // Forward, as ztunnel inbound / a waypoint does.
        let Ok(mut upstream) = TcpStream::connect(target).await else {
            return c.reject(http::StatusCode::SERVICE_UNAVAILABLE);
        };
        let _ = upstream.set_nodelay(true);
        let Ok(mut tunnel) = c.accept() else { return };
        let _ = hbone::copy_bidirectional(&mut tunnel, &mut upstream).await;
        return;
    }
    let Ok(tunnel) = c.accept() else { return };
    let _ = match target.port() {
        ECHO => echo(tunnel).await,
        SINK_16K => sink_with(tunnel, SMALL_CHUNK).await,
        _ => sink(tunnel).await,
    };
}

/// Plain TLS forwarding both ways with tokio's copy and 256 KiB buffers (ztunnel's largest).
async fn copy_plain<A, B>(mut a: A, mut b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, CHUNK, CHUNK).await;
}

async fn fixture(
    identities: &IdentityManager,
    config: Config,
    server_rt: &Handle,
) -> io::Result<Fixture> {
    let client_rt = Handle::current();
    let tcp = listen_on(server_rt, |l| serve_tcp(l, false))?;

    // Plain TLS with exactly HBONE's configs (TLS 1.3, same suites, same certificates).
    let acceptor = tokio_rustls::TlsAcceptor::from(
        identities
            .server_config(&id("server"))
            .map_err(io::Error::other)?,
    );
    let tls = listen_on(server_rt, |tls_l| async move {
        while let Ok((s, _)) = tls_l.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let mut first = [0u8; 1];
                // The first byte says what to do: 1 sink, 2 echo.
                let mut s = s;
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                let _ = if first[0] == ECHO as u8 {
                    echo(s).await
                } else {
                    sink(s).await
                };
            });
        }
    })?;
    let tls_client = identities
        .client_config(&id("client"), &[id("server")])
        .map_err(io::Error::other)?;

    let server =
        Server::new(identities, &id("server"), config.clone()).map_err(io::Error::other)?;
    let hbone = listen_on(server_rt, |hbone_l| async move {
        let _ = server
            .serve(hbone_l, hbone_handler, std::future::pending())
            .await;
    })?;
    let client = Client::new(identities.clone(), config);

    // TLS proxy pair: app -> [tls_proxy] -> TLS -> [tls_fwd] -> tcp sink.
    let acceptor = tokio_rustls::TlsAcceptor::from(
        identities
            .server_config(&id("server"))
            .map_err(io::Error::other)?,
    );
    let tls_fwd = listen_on(server_rt, move |fwd_l| async move {
        while let Ok((s, _)) = fwd_l.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(s) = acceptor.accept(s).await else {
                    return;
                };
                let Ok(up) = TcpStream::connect(tcp).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                copy_plain(s, up).await;
            });
        }
    })?;
    let connector = tokio_rustls::TlsConnector::from(tls_client.clone());
    let tls_proxy = listen_on(&client_rt, move |out_l| async move {
        while let Ok((app, _)) = out_l.accept().await {
            let _ = app.set_nodelay(true);
            let connector = connector.clone();
            tokio::spawn(async move {
                let Ok(s) = TcpStream::connect(tls_fwd).await else {
                    return;
                };
                let _ = s.set_nodelay(true);
                let name = rustls::pki_types::ServerName::from(tls_fwd.ip());
                let Ok(s) = connector.connect(name, s).await else {
                    return;
                };
                copy_plain(app, s).await;
            });
        }
    })?;

    // HBONE proxy: app -> [hbone_proxy] -> tunnel -> [server handler] -> tcp sink.
    let proxy_client = client.clone();
    let hbone_proxy = listen_on(&client_rt, move |out_l| async move {
        while let Ok((mut app, _)) = out_l.accept().await {
            let _ = app.set_nodelay(true);
            let client = proxy_client.clone();
            tokio::spawn(async move {
                let req = TunnelRequest::new(id("client"), hbone, vec![id("server")], tcp);
                let Ok(mut tunnel) = client.open(req).await else {
                    return;
                };
                let _ = hbone::copy_bidirectional(&mut tunnel, &mut app).await;
            });
        }
    })?;

    Ok(Fixture {
        tcp,
        tls_proxy,
        hbone_proxy,
        tls,
        tls_client,
        hbone,
        client,
    })
}

impl Fixture {
    async fn tcp(&self) -> io::Result<TcpStream> {
        let s = TcpStream::connect(self.tcp).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    async fn tls(&self, mode: u16) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let s = TcpStream::connect(self.tls).await?;
        s.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::from(self.tls.ip());
        let mut s = tokio_rustls::TlsConnector::from(self.tls_client.clone())
            .connect(name, s)
            .await?;
        s.write_all(&[mode as u8]).await?;
        Ok(s)
    }

    async fn tunnel(&self, mode: u16) -> io::Result<hbone::Tunnel> {
        let req = TunnelRequest::new(
            id("client"),
            self.hbone,
            vec![id("server")],
            SocketAddr::from(([127, 0, 0, 1], mode)),
        );
        self.client.open(req).await.map_err(io::Error::other)
    }
}

/// One measured run: wall time and the CPU time the whole process spent meanwhile.
#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

async fn measure<F: std::future::Future<Output = io::Result<Duration>>>(
    f: F,
) -> io::Result<Sample> {
    let cpu = cpu_time();
    let wall = f.await?;
    Ok(Sample {
        wall,
        cpu: cpu_time() - cpu,
    })
}

/// The median run by wall time, and the median CPU cost, over `runs`.
fn summarize(runs: &[Sample]) -> Sample {
    let mut runs = runs.to_vec();
    runs.sort_by_key(|s| s.wall);
    let wall = runs[runs.len() / 2].wall;
    runs.sort_by_key(|s| s.cpu);
    Sample {
        wall,
        cpu: runs[runs.len() / 2].cpu,
    }
}

fn row(name: &str, bytes: u64, s: Sample) {
    println!(
        "  {name:<22} {:7.2} Gbit/s   {:5.2} CPU-ns/byte",
        gbps(bytes, s.wall),
        s.cpu.as_nanos() as f64 / bytes as f64
    );
}

/// Prints `base / ours` for throughput and CPU efficiency as the median of the per-rep ratios,
/// with their range. Runs of one rep are measured back to back, so pairing them cancels what
/// this VM's host does to both alike (throughput here flips between two levels ~40% apart for
/// seconds at a time, whatever runs); a ratio of two medians would not.
fn ratio(name: &str, ours: &[Sample], base: &[Sample], target: &str) {
    let paired = |f: fn(&Sample) -> Duration| {
        let mut r: Vec<f64> = ours
            .iter()
            .zip(base)
            .map(|(o, b)| f(b).as_secs_f64() / f(o).as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        (r[r.len() / 2], r[0], r[r.len() - 1])
    };
    let (tput, tmin, tmax) = paired(|s| s.wall);
    let (eff, emin, emax) = paired(|s| s.cpu);
    println!(
        "  {name:<22} {tput:7.3} throughput ({tmin:.2}-{tmax:.2})   {eff:5.3} CPU efficiency ({emin:.2}-{emax:.2})   {target}",
    );
}

async fn run(args: Args, server_rt: Handle) -> io::Result<()> {
    let total = Instant::now();
    let ca = Arc::new(CertificateAuthority::generate("cluster.local").map_err(io::Error::other)?);
    let identities = IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(3600));
    let mut config = Config::default();
    if let Some(kib) = args.send_buffer {
        config.max_send_buffer = kib * 1024;
    }
    if let Some(n) = args.streams_per_conn {
        config.max_streams_per_connection = n;
    }
    if let Some(kib) = args.max_frame {
        config.max_frame_size = kib * 1024;
    }
    if let Some(kib) = args.conn_window {
        config.connection_window = kib * 1024;
    }
    let fx = fixture(&identities, config, &server_rt).await?;
    let size = args.size;
    let reps = args.reps.max(1);
    if let Some(only) = &args.only {
        if args.tune_malloc {
            hbone::alloc::tune_glibc_malloc();
        }
        for _ in 0..reps {
            let s = measure(async {
                match only.as_str() {
                    "tcp" => blast(fx.tcp().await?, size).await,
                    "tls" => blast(fx.tls(SINK).await?, size).await,
                    "tls-proxy" => blast(connect(fx.tls_proxy).await?, size).await,
                    "hbone-proxy" => blast(connect(fx.hbone_proxy).await?, size).await,
                    "hundred" => hundred_streams(&fx, size / 100, SINK, CHUNK).await,
                    _ => blast(fx.tunnel(SINK).await?, size).await,
                }
            })
            .await?;
            row(only, size, s);
        }
        return Ok(());
    }
    println!(
        "HBONE loopback benchmark: {} MiB per run, {reps} interleaved runs (figures: medians; ratios: median and range of the per-run ratios), one process, {}",
        size / MIB,
        if args.shared_runtime {
            "client and server on one 2-worker runtime"
        } else {
            "client and server each on a single-threaded runtime of its own"
        }
    );
    println!(
        "CPU-ns/byte is process CPU time (client + server) per byte: robust to other load on the box."
    );
    println!();

    // --- single stream, default glibc malloc first (mallopt cannot be undone) ---
    let mut untuned = Vec::new();
    for _ in 0..reps {
        untuned.push(measure(async { blast(fx.tunnel(SINK).await?, size).await }).await?);
    }
    let untuned = summarize(&untuned);
    let tuned = args.tune_malloc && hbone::alloc::tune_glibc_malloc();

    let (mut tcp, mut tls, mut tun) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        tcp.push(measure(async { blast(fx.tcp().await?, size).await }).await?);
        tls.push(measure(async { blast(fx.tls(SINK).await?, size).await }).await?);
        tun.push(measure(async { blast(fx.tunnel(SINK).await?, size).await }).await?);
    }

    println!("single stream, client writes / server reads (AsyncWrite, AsyncRead), 256 KiB writes");
    println!(
        "  allocator: glibc{}",
        if tuned {
            ", M_TRIM_THRESHOLD 64 MiB"
        } else {
            " defaults"
        }
    );
    row("plain TCP", size, summarize(&tcp));
    row("plain TLS 1.3", size, summarize(&tls));
    row("HBONE tunnel", size, summarize(&tun));
    row("HBONE, default malloc", size, untuned);
    ratio("tunnel / TLS", &tun, &tls, "(target >= 0.85)");
    println!();

    // --- proxied: the path ztunnel and the waypoint put traffic on ---
    let (mut ptls, mut ptun) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        ptls.push(measure(async { blast(connect(fx.tls_proxy).await?, size).await }).await?);
        ptun.push(measure(async { blast(connect(fx.hbone_proxy).await?, size).await }).await?);
    }
    println!("proxied single stream: app -TCP-> proxy -(TLS | HBONE)-> proxy -TCP-> sink");
    row("TLS proxies", size, summarize(&ptls));
    row("HBONE + copy helper", size, summarize(&ptun));
    ratio("HBONE / TLS", &ptun, &ptls, "");
    println!();

    // --- latency ---
    let tcp_h = ping_pong(fx.tcp_echo(&server_rt).await?, args.pings).await?;
    let tls_h = ping_pong(fx.tls(ECHO).await?, args.pings).await?;
    let tun_h = ping_pong(fx.tunnel(ECHO).await?, args.pings).await?;
    println!("1-byte ping-pong round trip ({} samples)", args.pings);
    for (name, h) in [
        ("plain TCP", &tcp_h),
        ("plain TLS 1.3", &tls_h),
        ("HBONE tunnel", &tun_h),
    ] {
        println!(
            "  {name:<22} p50 {:6.1} us   p99 {:6.1} us",
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3
        );
    }
    println!();

    // --- 100 streams vs 1 ---
    // Twice: with 16 KiB app reads/writes per stream (100 streams' app buffers, 1.6 MiB a
    // side, fit in cache as one stream's do) and with 256 KiB ones (one stream then sends
    // 64 KiB DATA frames; 100 streams' app buffers are 25 MiB a side).
    let (mut one, mut hundred, mut one_big, mut hundred_big) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let per = size / 100;
    for _ in 0..reps {
        one.push(
            measure(async { blast_with(fx.tunnel(SINK_16K).await?, per * 100, SMALL_CHUNK).await })
                .await?,
        );
        hundred.push(measure(hundred_streams(&fx, per, SINK_16K, SMALL_CHUNK)).await?);
        one_big.push(measure(async { blast(fx.tunnel(SINK).await?, per * 100).await }).await?);
        hundred_big.push(measure(hundred_streams(&fx, per, SINK, CHUNK)).await?);
    }
    println!(
        "aggregate throughput on one pooled connection (connections opened so far: {})",
        fx.client.pool_stats().connections_opened
    );
    println!("  16 KiB app reads/writes per stream:");
    row("1 stream", per * 100, summarize(&one));
    row("100 streams", per * 100, summarize(&hundred));
    ratio("100 / 1", &hundred, &one, "(target >= 1.0)");
    println!("  256 KiB app reads/writes per stream (100 streams: 50 MiB of app buffers):");
    row("1 stream", per * 100, summarize(&one_big));
    row("100 streams", per * 100, summarize(&hundred_big));
    ratio("100 / 1", &hundred_big, &one_big, "");
    println!();

    // --- flow-control sweep ---
    if args.sweep {
        println!(
            "single-stream tunnel by HTTP/2 settings (stream window / connection window / max frame)"
        );
        let sweep: [(&str, u32, u32, u32); 4] = [
            ("h2 defaults 64K/64K/16K", 65_535, 65_535, 16_384),
            ("1M/4M/16K", 1 << 20, 4 << 20, 16_384),
            ("Istio 4M/16M/1M", 4 << 20, 16 << 20, 1 << 20),
            ("16M/64M/1M", 16 << 20, 64 << 20, 1 << 20),
        ];
        for (name, stream, conn, frame) in sweep {
            let config = Config {
                stream_window: stream,
                connection_window: conn,
                max_frame_size: frame,
                max_send_buffer: stream as usize,
                ..Config::default()
            };
            let fx = fixture(&identities, config, &server_rt).await?;
            let mut runs = Vec::new();
            for _ in 0..reps {
                runs.push(measure(async { blast(fx.tunnel(SINK).await?, size / 2).await }).await?);
            }
            row(name, size / 2, summarize(&runs));
        }
        println!();
    }
    println!("total bench time {:.1} s", total.elapsed().as_secs_f64());
    Ok(())
}

/// 100 tunnels to sink `mode` (opened first, not timed) each sending `per` bytes at once,
/// `chunk` bytes per write; the wall time.
async fn hundred_streams(fx: &Fixture, per: u64, mode: u16, chunk: usize) -> io::Result<Duration> {
    let mut tunnels = Vec::new();
    for _ in 0..100 {
        tunnels.push(fx.tunnel(mode).await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = tunnels
        .into_iter()
        .map(|t| tokio::spawn(blast_with(t, per, chunk)))
        .collect();
    for t in tasks {
        t.await.map_err(io::Error::other)??;
    }
    Ok(start.elapsed())
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

impl Fixture {
    async fn tcp_echo(&self, server_rt: &Handle) -> io::Result<TcpStream> {
        // A dedicated echo listener, started on first use.
        let addr = listen_on(server_rt, |l| serve_tcp(l, true))?;
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}
