//! `hbone-relay`: plain TCP in, one HBONE tunnel per connection out — what ztunnel does for a
//! captured connection, without the capture. For tests, demos and benchmarks:
//!
//! ```text
//! hbone-relay --ca-dir ca/ --waypoint 127.0.0.1:15008 --config-dir cfg/ \
//!     --map 127.0.0.1:18080=aliyun.com:80
//! curl --connect-to aliyun.com:80:127.0.0.1:18080 http://aliyun.com/
//! ```
//!
//! Each accepted connection opens a CONNECT to the target (a VIP:port; host names are looked up
//! in the configuration's DNS table, as the DNS proxy would answer them) with
//! `forwarded: for="<client ip:port>";host=<name>`, presenting a certificate for `--identity`
//! minted from the CA, and accepting only `--waypoint-identity`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use certs::{CertificateAuthority, IdentityManager, SpiffeId};
use clap::Parser;
use hbone::{Client, Forwarded, TunnelRequest};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

#[derive(Parser)]
#[command(
    name = "hbone-relay",
    about = "TCP in, HBONE tunnel out (one per connection)"
)]
struct Args {
    /// Directory with ca-cert.pem and ca-key.pem.
    #[arg(long)]
    ca_dir: PathBuf,
    /// Identity presented to the waypoint.
    #[arg(long, default_value = "spiffe://cluster.local/ns/default/sa/sleep")]
    identity: SpiffeId,
    /// The waypoint's HBONE address.
    #[arg(long, default_value = "127.0.0.1:15008")]
    waypoint: SocketAddr,
    /// The identity the waypoint must present.
    #[arg(
        long,
        default_value = "spiffe://cluster.local/ns/istio-egress/sa/waypoint"
    )]
    waypoint_identity: SpiffeId,
    /// Configuration directory, to turn host names into VIPs.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// LISTEN=TARGET, e.g. 127.0.0.1:18080=aliyun.com:80 or 127.0.0.1:18081=240.240.0.7:80.
    #[arg(long = "map", required = true)]
    maps: Vec<String>,
    /// Tunnels per pooled HBONE connection before another is opened (ztunnel's pool limit).
    #[arg(long, default_value_t = hbone::Config::default().max_streams_per_connection)]
    streams_per_connection: usize,
    /// 0: one single-threaded runtime (the default). N: a work-stealing runtime with N workers,
    /// whose LIFO slot runs the HBONE connection task right after the tunnel that woke it, so
    /// requests leave one by one instead of in a burst per event-loop pass.
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
    /// I/O events taken per event-loop poll (tokio's max_io_events_per_tick; the waypoint's
    /// workers take 16, see waypoint::proxy::IO_EVENTS_PER_TICK). Default: tokio's, 1,024.
    #[arg(long)]
    io_events_per_tick: Option<usize>,
}

struct Route {
    listen: SocketAddr,
    target: SocketAddr,
    host: Option<String>,
}

fn parse_routes(args: &Args) -> anyhow::Result<Vec<Route>> {
    let snap = match &args.config_dir {
        Some(dir) => Some(
            mesh_config::load_dir(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?,
        ),
        None => None,
    };
    let mut routes = Vec::new();
    for m in &args.maps {
        let (listen, target) = m
            .split_once('=')
            .with_context(|| format!("--map {m:?}: expected LISTEN=TARGET"))?;
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("--map {m:?}: listen address"))?;
        if let Ok(target) = target.parse::<SocketAddr>() {
            routes.push(Route {
                listen,
                target,
                host: None,
            });
            continue;
        }
        let (host, port) = target
            .rsplit_once(':')
            .with_context(|| format!("--map {m:?}: target needs a port"))?;
        let port: u16 = port.parse().with_context(|| format!("--map {m:?}: port"))?;
        let Some(snap) = &snap else {
            bail!("--map {m:?}: a host name target needs --config-dir")
        };
        let ips = snap
            .resolve_name(host)
            .with_context(|| format!("{host} has no VIP in the configuration"))?;
        let ip: IpAddr = ips
            .iter()
            .copied()
            .find(IpAddr::is_ipv4)
            .or_else(|| ips.first().copied())
            .with_context(|| format!("{host} has no VIP"))?;
        routes.push(Route {
            listen,
            target: SocketAddr::new(ip, port),
            host: Some(host.to_owned()),
        });
    }
    Ok(routes)
}

fn main() -> anyhow::Result<()> {
    telemetry::init_tracing(
        telemetry::LogFormat::Plain,
        &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    )?;
    let args = Args::parse();
    let routes = parse_routes(&args)?;
    // One thread, like one waypoint worker: the relay shares the bench's two cores with the
    // waypoint, and a single-threaded runtime spends less of them on cross-thread wake-ups.
    let mut builder = match args.worker_threads {
        0 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    if let Some(n) = args.io_events_per_tick {
        anyhow::ensure!(n > 0, "--io-events-per-tick must be at least 1");
        builder.max_io_events_per_tick(n);
    }
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async move {
        let ca = Arc::new(CertificateAuthority::load_dir(&args.ca_dir).with_context(|| format!("CA in {}", args.ca_dir.display()))?);
        let ids = IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(24 * 3600));
        ids.fetch(&args.identity).await.context("minting the relay's certificate")?;
        let config = hbone::Config {
            max_streams_per_connection: args.streams_per_connection.max(1),
            ..hbone::Config::default()
        };
        let client = Client::new(ids, config);
        let mut tasks = Vec::new();
        for r in routes {
            let listener = TcpListener::bind(r.listen).await.with_context(|| format!("binding {}", r.listen))?;
            info!(listen = %r.listen, target = %r.target, host = ?r.host, waypoint = %args.waypoint, "relay listening");
            let ctx = Arc::new(Ctx {
                client: client.clone(),
                source: args.identity.clone(),
                waypoint: args.waypoint,
                waypoint_identity: args.waypoint_identity.clone(),
                target: r.target,
                host: r.host,
            });
            tasks.push(tokio::spawn(accept_loop(listener, ctx)));
        }
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

struct Ctx {
    client: Client,
    source: SpiffeId,
    waypoint: SocketAddr,
    waypoint_identity: SpiffeId,
    target: SocketAddr,
    host: Option<String>,
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = relay(&ctx, tcp, peer).await {
                        warn!(%peer, error = %format!("{e:#}"), "relay failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(ctx: &Ctx, mut tcp: TcpStream, peer: SocketAddr) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut forwarded = Forwarded::new(peer);
    if let Some(h) = &ctx.host {
        forwarded = forwarded.with_host(h.clone());
    }
    let req = TunnelRequest::new(
        ctx.source.clone(),
        ctx.waypoint,
        vec![ctx.waypoint_identity.clone()],
        ctx.target,
    )
    .forwarded(&forwarded)?;
    let mut tunnel = ctx.client.open(req).await.context("opening the tunnel")?;
    let (up, down) = hbone::copy_bidirectional(&mut tunnel, &mut tcp).await?;
    debug!(%peer, up, down, "relayed");
    Ok(())
}
