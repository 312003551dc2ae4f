//! `waypoint-controller`: flags, logging, the admin endpoint; the controller is the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use telemetry::{AdminState, Endpoints, LogFormat, Readiness};
use tracing::info;
use waypoint_controller::desired::DEFAULT_GATEWAY_CLASS;
use waypoint_controller::{ControllerMetrics, Settings};

#[derive(Parser)]
#[command(
    name = "waypoint-controller",
    version,
    about = "Deploys a waypoint (ServiceAccount, Deployment, Service) for every istio-waypoint Gateway"
)]
struct Args {
    /// Gateways of this gatewayClassName are ours.
    #[arg(long, env = "GATEWAY_CLASS", default_value = DEFAULT_GATEWAY_CLASS)]
    gateway_class: String,
    /// The waypoint container image.
    #[arg(long, env = "WAYPOINT_IMAGE")]
    waypoint_image: String,
    /// imagePullPolicy of the waypoint container (default: Kubernetes' default for the tag).
    #[arg(long, env = "WAYPOINT_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// Secret in each Gateway's namespace with ca-cert.pem and ca-key.pem, mounted into the
    /// waypoint.
    #[arg(long, env = "CA_SECRET", default_value = "strait-ca")]
    ca_secret: String,
    /// Cluster DNS domain, for the Hostname address in Gateway status.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Readiness (/healthz/ready) and metrics (/metrics, /stats/prometheus) listener.
    #[arg(long, default_value = "0.0.0.0:15000")]
    admin: SocketAddr,
    /// Diagnostic log format on stderr.
    #[arg(long, default_value = "plain")]
    log_format: LogFormat,
    /// Diagnostic log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("waypoint-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    telemetry::init_tracing(args.log_format, &args.log_level)?;
    let settings = Settings {
        gateway_class: args.gateway_class,
        waypoint_image: args.waypoint_image,
        image_pull_policy: args.image_pull_policy,
        ca_secret: args.ca_secret,
        cluster_domain: args.cluster_domain,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        // kube's TLS installs rustls' aws-lc-rs provider itself (its `aws-lc-rs` feature).
        let client = kube::Client::try_default()
            .await
            .context("kubernetes client (in-cluster config or KUBECONFIG)")?;

        // The shared admin server wants the proxy metrics registry; ours are added to it.
        let metrics = Arc::new(telemetry::Metrics::new()?);
        let controller_metrics = ControllerMetrics::new(metrics.registry())?;
        let readiness = Readiness::new();
        let listener = tokio::net::TcpListener::bind(args.admin)
            .await
            .with_context(|| format!("binding --admin {}", args.admin))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            // Err: the sender is gone, which also means stop.
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let admin = tokio::spawn(telemetry::admin::serve_endpoints(
            listener,
            AdminState::new(metrics, readiness.clone()),
            Endpoints::READINESS | Endpoints::METRICS,
            stopped(stop_rx.clone()),
        ));
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutting down");
            let _ = stop_tx.send(true);
        });

        info!(class = %settings.gateway_class, image = %settings.waypoint_image,
            admin = %args.admin, "waypoint controller starting");
        waypoint_controller::run(
            client,
            settings,
            controller_metrics,
            move || readiness.set_ready(true),
            stopped(stop_rx),
        )
        .await;
        let _ = admin.await;
        Ok(())
    })
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers, only ctrl-c can stop us.
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_default_to_istio_waypoint_conventions() {
        let args = Args::try_parse_from(["waypoint-controller", "--waypoint-image", "wp:1"])
            .expect("parses");
        assert_eq!(args.waypoint_image, "wp:1");
        assert_eq!(args.gateway_class, "istio-waypoint");
        assert_eq!(args.ca_secret, "strait-ca");
        assert_eq!(args.admin, "0.0.0.0:15000".parse().expect("addr"));
        assert_eq!(args.image_pull_policy, None);
    }

    #[test]
    fn bad_flags_are_rejected() {
        for bad in [
            vec![
                "waypoint-controller",
                "--waypoint-image",
                "wp:1",
                "--image-pull-policy",
                "Sometimes",
            ],
            vec![
                "waypoint-controller",
                "--waypoint-image",
                "wp:1",
                "--admin",
                "not-an-address",
            ],
        ] {
            assert!(Args::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }
}
