//! The real `ztunnel` binary against real network namespaces: two pods on node-1, one on node-2
//! (a second ztunnel process), a stand-in waypoint (the hbone crate's server, in this process,
//! listening inside the waypoint's namespace), an "internet" host with nginx and dnsmasq.
//!
//! ```text
//!  client 10.244.1.10 (node-1) ─┐                     ┌─ web 203.0.113.10, .11 (nginx :80, dnsmasq :53)
//!  server 10.244.1.11 (node-1) ─┤ br0 (router ns) ────┤
//!  remote 10.244.2.10 (node-2) ─┤                     │
//!  waypoint 10.244.1.20        ─┘                     │
//! ```
//!
//! Needs root (skipped loudly otherwise; fails under CI=true) and the ztunnel binary built
//! (`scripts/test` does it).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::{
    ChildGuard, Host, Lab, Netns, Nginx, NginxConfig, lab_enabled, require_tools, start_dnsmasq,
    wait_until, workspace_bin,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT: &str = "10.244.1.10";
const SERVER: &str = "10.244.1.11";
const REMOTE: &str = "10.244.2.10";
const WAYPOINT: &str = "10.244.1.20";
const WEB: &str = "203.0.113.10";
/// Excluded from the client's capture (excludeOutboundIPRanges).
const WEB_EXCLUDED: &str = "203.0.113.11";
const SE_HOST: &str = "api.example.com";
const MARKER: &str = "PLAINTEXT-MARKER-7f3a9c";
const WAIT: Duration = Duration::from_secs(20);

/// A ztunnel process with its loopback admin ports.
struct Ztunnel {
    child: ChildGuard,
    admin: SocketAddr,
    metrics: SocketAddr,
}

impl Ztunnel {
    fn start(node: &str, config: &Path, ca: &Path, state: &Path) -> Result<Self> {
        let [admin, metrics, readiness] = free_ports()?;
        let mut command = Command::new(workspace_bin("ztunnel")?);
        command
            .args(["--node", node, "--config-dir"])
            .arg(config)
            .arg("--ca-dir")
            .arg(ca)
            .arg("--state-dir")
            .arg(state);
        command.args([
            "--dns-upstream",
            &format!("{WEB}:53"),
            "--admin",
            &admin.to_string(),
            "--metrics",
            &metrics.to_string(),
            "--readiness",
            &readiness.to_string(),
            "--drain-seconds",
            "2",
            "--log-level",
            "info,ztunnel=debug,hickory_server=warn",
        ]);
        let child = ChildGuard::spawn(format!("ztunnel {node}"), command)?;
        Ok(Ztunnel {
            child,
            admin,
            metrics,
        })
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "-m",
                "5",
                &format!("http://{addr}{path}"),
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn config_dump(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.get(self.admin, "/config_dump")?,
        )?)
    }

    fn generation(&self) -> Result<u64> {
        self.config_dump()?["generation"]
            .as_u64()
            .context("no generation in /config_dump")
    }

    fn metrics_text(&self) -> Result<String> {
        self.get(self.metrics, "/metrics")
    }

    /// Connection log lines (JSON on stdout) so far.
    fn connection_log(&self) -> Vec<serde_json::Value> {
        self.child
            .log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

fn free_ports() -> Result<[SocketAddr; 3]> {
    // Held together so the three differ; released just before ztunnel binds them.
    let listeners = [(); 3].map(|_| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut out = Vec::new();
    for l in listeners {
        out.push(l?.local_addr()?);
    }
    Ok([out[0], out[1], out[2]])
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn pod_yaml(name: &str, sa: &str, node: &str, ip: &str, netns: &Path, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\n  annotations:\n    strait.dev/netns: {}\n{annotations}spec: {{nodeName: {node}, serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n",
        netns.display()
    )
}

fn mesh_yaml(policy: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    trustDomain: cluster.local\n    outboundTrafficPolicy:\n      mode: {policy}\n"
    )
}

const STATIC_YAML: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-egress}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api
  namespace: istio-egress
  labels: {istio.io/use-waypoint: waypoint}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-remote, namespace: default}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/remote]}}]
"#;

/// What the stand-in waypoint saw of one CONNECT.
#[derive(Debug, Clone)]
struct SeenConnect {
    authority: SocketAddr,
    peer: String,
    headers: std::collections::BTreeMap<String, String>,
}

/// The hbone crate's server inside the waypoint namespace, as the waypoint identity. Each
/// tunnel gets a canned HTTP answer naming the authority it was opened for.
async fn start_waypoint(
    ns: &Netns,
    ca: &Arc<certs::CertificateAuthority>,
) -> Result<(Arc<Mutex<Vec<SeenConnect>>>, tokio_util_shutdown::Trigger)> {
    let ids = certs::IdentityManager::new(ca.clone(), ca.trust_bundle(), Duration::from_secs(3600));
    let id = certs::SpiffeId::new("cluster.local", "istio-egress", "waypoint");
    let server = hbone::Server::new(&ids, &id, hbone::Config::default())?;
    let listener = ns
        .handle()?
        .tcp_listener(sa(&format!("{WAYPOINT}:15008")))
        .await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let (trigger, stopped) = tokio_util_shutdown::pair();
    tokio::spawn(async move {
        let handler = move |connect: hbone::IncomingConnect| {
            let record = record.clone();
            async move {
                let meta = connect.meta().clone();
                if let Ok(mut seen) = record.lock() {
                    seen.push(SeenConnect {
                        authority: meta.authority,
                        peer: meta.peer_identity.to_string(),
                        headers: meta
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                            })
                            .collect(),
                    });
                }
                let Ok(mut tunnel) = connect.accept() else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tunnel.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("waypoint saw {}\n", meta.authority);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tunnel.write_all(response.as_bytes()).await;
                let _ = tunnel.shutdown().await;
                let _ = tunnel.read(&mut buf).await;
            }
        };
        server.serve(listener, handler, stopped).await;
    });
    Ok((seen, trigger))
}

/// A oneshot-based shutdown signal (no extra dependency for the test).
mod tokio_util_shutdown {
    pub struct Trigger(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Trigger {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    pub fn pair() -> (Trigger, impl std::future::Future<Output = ()> + Send) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Trigger(Some(tx)), async move {
            let _ = rx.await;
        })
    }
}

/// `iptables-save -t nat` lines of `ns` that belong to ztunnel's capture.
fn strait_rules(ns: &Netns) -> Result<Vec<String>> {
    Ok(ns
        .exec_ok(&["iptables-save", "-t", "nat"])?
        .lines()
        .filter(|l| l.contains("STRAIT_"))
        .map(str::to_owned)
        .collect())
}

/// Runs blocking lab commands from the async test without starving the stand-in waypoint.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

struct MeshLab {
    client: Host,
    server: Host,
    remote: Host,
    waypoint: Host,
    _web: Host,
    _lab: Lab,
    config: tempfile::TempDir,
    ca_dir: tempfile::TempDir,
    ca: Arc<certs::CertificateAuthority>,
    /// The ztunnels' capture ledgers (one file per node).
    state: tempfile::TempDir,
    _services: Vec<Nginx>,
    _dns: ChildGuard,
}

impl MeshLab {
    fn new() -> Result<Self> {
        let lab = Lab::new()?;
        let client = lab.add_host("client", &format!("{CLIENT}/16"))?;
        let server = lab.add_host("server", &format!("{SERVER}/16"))?;
        let remote = lab.add_host("remote", &format!("{REMOTE}/16"))?;
        let waypoint = lab.add_host("waypoint", &format!("{WAYPOINT}/16"))?;
        let web = lab.add_host("web", &format!("{WEB}/24"))?;
        lab.add_address(&web, &format!("{WEB_EXCLUDED}/24"))?;

        let services = vec![
            Nginx::start(
                &server,
                &NginxConfig::http(
                    "server { listen 80; location / { return 200 \"server\\n\"; } }",
                ),
            )?,
            Nginx::start(
                &remote,
                &NginxConfig::http(
                    "server { listen 8080; location / { return 200 \"remote $request_uri\\n\"; } }",
                ),
            )?,
            Nginx::start(
                &web,
                &NginxConfig::http(
                    "server { listen 80; location / { return 200 \"web $server_addr\\n\"; } }",
                ),
            )?,
        ];
        for (host, addr) in [
            (&server, format!("{SERVER}:80")),
            (&remote, format!("{REMOTE}:8080")),
            (&web, format!("{WEB}:80")),
        ] {
            host.wait_tcp(sa(&addr), WAIT)?;
        }
        let dns = start_dnsmasq(&web, WEB.parse()?, &[("web.test", WEB.parse()?)])?;
        // The client's resolver is the "internet" one; its port-53 traffic is captured to 15053.
        client.set_resolv_conf(&[WEB.parse()?])?;

        let ca_dir = tempfile::tempdir()?;
        let ca = Arc::new(certs::CertificateAuthority::generate("cluster.local")?);
        ca.write(ca_dir.path())?;

        let config = tempfile::tempdir()?;
        let this = MeshLab {
            client,
            server,
            remote,
            waypoint,
            _web: web,
            _lab: lab,
            config,
            ca_dir,
            ca,
            state: tempfile::tempdir()?,
            _services: services,
            _dns: dns,
        };
        this.write("static.yaml", STATIC_YAML)?;
        this.write("mesh.yaml", &mesh_yaml("ALLOW_ANY"))?;
        this.write(
            "client.yaml",
            &pod_yaml(
                "client",
                "client",
                "node-1",
                CLIENT,
                this.client.path(),
                &format!(
                    "    traffic.sidecar.istio.io/excludeOutboundIPRanges: {WEB_EXCLUDED}/32\n"
                ),
            ),
        )?;
        this.write(
            "server.yaml",
            &pod_yaml("server", "server", "node-1", SERVER, this.server.path(), ""),
        )?;
        this.write(
            "remote.yaml",
            &pod_yaml("remote", "remote", "node-2", REMOTE, this.remote.path(), ""),
        )?;
        let waypoint_pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: waypoint-0\n  namespace: istio-egress\n  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}\n  annotations: {{strait.dev/netns: {}}}\nspec: {{nodeName: node-1, serviceAccountName: waypoint}}\nstatus: {{podIP: {WAYPOINT}}}\n",
            this.waypoint.path().display()
        );
        this.write("waypoint.yaml", &waypoint_pod)?;
        // The configuration must compile before any ztunnel sees it.
        if let Err(errs) = mesh_config::load_dir(this.config.path()) {
            bail!("test mesh does not compile:\n{errs}");
        }
        Ok(this)
    }

    fn write(&self, file: &str, yaml: &str) -> Result<()> {
        // Write then rename, so the watcher never reads half a file.
        let tmp = self.config.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.config.path().join(file))?;
        Ok(())
    }

    fn config_dir(&self) -> PathBuf {
        self.config.path().to_owned()
    }

    fn vip(&self) -> Result<IpAddr> {
        let snap = mesh_config::load_dir(self.config.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
        snap.resolve_name(SE_HOST)
            .and_then(|ips| ips.iter().find(|ip| ip.is_ipv4()).copied())
            .context("no IPv4 VIP for the ServiceEntry")
    }
}

/// Waits until `zt` runs generation `after + 1` or later.
fn wait_reload(zt: &Ztunnel, after: u64) -> Result<()> {
    wait_until(
        "configuration reload",
        WAIT,
        || Ok(zt.generation()? > after),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ztunnel_carries_pod_traffic_over_hbone() -> Result<()> {
    if !lab_enabled() || !require_tools(&["nginx", "dnsmasq", "tcpdump", "curl"]) {
        return Ok(());
    }
    let lab = blocking(MeshLab::new)?;
    let (seen, _stop_waypoint) = start_waypoint(&lab.waypoint, &lab.ca).await?;
    let mut node1 = blocking(|| {
        Ztunnel::start(
            "node-1",
            &lab.config_dir(),
            lab.ca_dir.path(),
            lab.state.path(),
        )
    })?;
    let mut node2 = blocking(|| {
        Ztunnel::start(
            "node-2",
            &lab.config_dir(),
            lab.ca_dir.path(),
            lab.state.path(),
        )
    })?;
    blocking(|| -> Result<()> {
        node1
            .child
            .wait_for_log("serving pod default/client", WAIT)?;
        node1
            .child
            .wait_for_log("serving pod default/server", WAIT)?;
        node2
            .child
            .wait_for_log("serving pod default/remote", WAIT)?;
        Ok(())
    })?;

    // Rules are in every served pod, exactly once; never in the waypoint's namespace.
    for pod in [&lab.client, &lab.server, &lab.remote] {
        let rules = blocking(|| strait_rules(pod))?;
        ensure!(
            rules
                .iter()
                .filter(|l| *l == "-A OUTPUT -j STRAIT_OUTPUT")
                .count()
                == 1,
            "{}: {rules:#?}",
            pod.name()
        );
    }
    ensure!(
        blocking(|| strait_rules(&lab.waypoint))?.is_empty(),
        "the waypoint is never captured"
    );

    // 1. Same node, pod → pod through HBONE.
    let out = blocking(|| lab.client.curl(&["-m", "10", &format!("http://{SERVER}/")]))?;
    ensure!(
        out.status == 200 && out.body_text() == "server\n",
        "client → server: {out:?}"
    );

    // 2. Across nodes, with a capture on the client's veth: the marker travels only inside TLS.
    let pcap = tempfile::Builder::new().suffix(".pcap").tempfile()?;
    let pcap_path = pcap.path().display().to_string();
    let mut dump = lab.client.spawn(&[
        "tcpdump",
        "-Z",
        "root",
        "--immediate-mode",
        "-i",
        "eth0",
        "-U",
        "-n",
        "-w",
        &pcap_path,
        "tcp",
    ])?;
    blocking(|| dump.wait_for_log("listening on", WAIT))?;
    let out = blocking(|| {
        lab.client
            .curl(&["-m", "10", &format!("http://{REMOTE}:8080/{MARKER}")])
    })?;
    ensure!(
        out.status == 200 && out.body_text().contains(MARKER),
        "client → remote: {out:?}"
    );
    // Let the last packets reach the file before tcpdump is stopped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocking(|| dump.stop())?;
    let captured = std::fs::read(pcap.path())?;
    let hbone_packets = blocking(|| {
        lab.client
            .exec_ok(&["tcpdump", "-r", &pcap_path, "-n", "tcp port 15008"])
    })?;
    ensure!(
        hbone_packets.lines().count() > 4,
        "the capture ({} bytes) saw no HBONE traffic:\n{hbone_packets}\ntcpdump log:\n{}",
        captured.len(),
        dump.log()
    );
    ensure!(
        !captured
            .windows(MARKER.len())
            .any(|w| w == MARKER.as_bytes()),
        "the marker crossed the wire in plaintext"
    );
    let app_packets = blocking(|| {
        lab.client
            .exec_ok(&["tcpdump", "-r", &pcap_path, "-n", "tcp port 8080"])
    })?;
    ensure!(
        app_packets.trim().is_empty(),
        "traffic to the app port left the pod unencrypted:\n{app_packets}"
    );

    // 3. The L4 policy: remote's principal is denied by the server's DENY policy.
    let out = blocking(|| lab.remote.curl(&["-m", "10", &format!("http://{SERVER}/")]))?;
    ensure!(
        out.status == 0 && out.exit_code != 0,
        "remote → server must be refused: {out:?}"
    );
    blocking(|| {
        node1
            .child
            .wait_for_log("inbound connection denied: 401", WAIT)
    })?;
    blocking(|| {
        node2
            .child
            .wait_for_log("HBONE tunnel failed; resetting the client", WAIT)
    })?;

    // 4. ServiceEntry VIP → the waypoint over HBONE, authority = VIP:port, Istio's headers.
    let vip = lab.vip()?;
    let out = blocking(|| lab.client.curl(&["-m", "10", &format!("http://{vip}/")]))?;
    ensure!(
        out.status == 200 && out.body_text() == format!("waypoint saw {vip}:80\n"),
        "client → VIP: {out:?}"
    );
    {
        let seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let connect = seen.last().context("waypoint saw no CONNECT")?;
        ensure!(connect.authority == SocketAddr::new(vip, 80), "{connect:?}");
        ensure!(
            connect.peer == "spiffe://cluster.local/ns/default/sa/client",
            "{connect:?}"
        );
        let header = |name: &str| connect.headers.get(name).cloned().unwrap_or_default();
        ensure!(
            header("forwarded").contains(&format!("for=\"{CLIENT}:"))
                && header("forwarded").contains(&format!("host={SE_HOST}")),
            "{connect:?}"
        );
        ensure!(
            header("baggage").contains("k8s.namespace.name=default"),
            "{connect:?}"
        );
        ensure!(header("traceparent").starts_with("00-"), "{connect:?}");
    }

    // 5. DNS: the mesh host resolves to its VIP, other names through the upstream.
    let resolved = blocking(|| lab.client.exec_ok(&["getent", "ahostsv4", SE_HOST]))?;
    ensure!(
        resolved.split_whitespace().next() == Some(vip.to_string().as_str()),
        "{SE_HOST}: {resolved}"
    );
    let resolved = blocking(|| lab.client.exec_ok(&["getent", "ahostsv4", "web.test"]))?;
    ensure!(
        resolved.split_whitespace().next() == Some(WEB),
        "web.test: {resolved}"
    );
    // End to end by name: DNS answer, capture, HBONE to the waypoint.
    let out = blocking(|| {
        lab.client
            .curl(&["-m", "10", &format!("http://{SE_HOST}/")])
    })?;
    ensure!(
        out.status == 200 && out.body_text().starts_with("waypoint saw"),
        "by name: {out:?}"
    );

    // 6. Outbound policy: ALLOW_ANY passes an unregistered address; REGISTRY_ONLY refuses it
    //    while the excluded range still goes straight out.
    let out = blocking(|| lab.client.curl(&["-m", "10", &format!("http://{WEB}/")]))?;
    ensure!(out.status == 200, "ALLOW_ANY: {out:?}");
    let generation = blocking(|| node1.generation())?;
    lab.write("mesh.yaml", &mesh_yaml("REGISTRY_ONLY"))?;
    blocking(|| wait_reload(&node1, generation))?;
    // Refused like Envoy's BlackHoleCluster: ztunnel itself answers HTTP with a 502.
    let out = blocking(|| lab.client.curl(&["-m", "10", &format!("http://{WEB}/")]))?;
    ensure!(
        out.status == 502
            && out.header("server") == Some("envoy")
            && out.body_text().contains("REGISTRY_ONLY"),
        "REGISTRY_ONLY must refuse {WEB}: {out:?}"
    );
    blocking(|| node1.child.wait_for_log("REGISTRY_ONLY", WAIT))?;
    let out = blocking(|| {
        lab.client
            .curl(&["-m", "10", &format!("http://{WEB_EXCLUDED}/")])
    })?;
    ensure!(
        out.status == 200 && out.body_text() == format!("web {WEB_EXCLUDED}\n"),
        "excluded CIDR: {out:?}"
    );
    let logged = node1.connection_log();
    ensure!(
        !logged.iter().any(|l| l["dst_addr"]
            .as_str()
            .is_some_and(|d| d.starts_with(WEB_EXCLUDED))),
        "the excluded range went through ztunnel"
    );
    ensure!(
        logged
            .iter()
            .any(|l| l["dst_addr"] == format!("{WEB}:80") && l["outcome"] == "denied"),
        "no denied connection line for {WEB}"
    );

    // Telemetry: both reporters, Istio names, and the config dump.
    let text = blocking(|| node1.metrics_text())?;
    for needle in [
        "istio_tcp_connections_opened_total{",
        "istio_tcp_sent_bytes_total{",
        "reporter=\"source\"",
        "reporter=\"destination\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
    ] {
        ensure!(text.contains(needle), "metrics lack {needle}");
    }
    let dump = blocking(|| node1.config_dump())?;
    let pods: Vec<&str> = dump["pods"]
        .as_array()
        .context("pods")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    ensure!(
        pods == ["default/client", "default/server"],
        "served pods: {pods:?}"
    );

    // 7. The server pod leaves the configuration: listeners close, rules are removed.
    let generation = blocking(|| node1.generation())?;
    std::fs::remove_file(lab.config.path().join("server.yaml"))?;
    blocking(|| wait_reload(&node1, generation))?;
    blocking(|| {
        node1
            .child
            .wait_for_log("stopped serving pod default/server", WAIT)
    })?;
    ensure!(
        blocking(|| strait_rules(&lab.server))?.is_empty(),
        "rules left behind in the server pod"
    );
    ensure!(
        !blocking(|| strait_rules(&lab.client))?.is_empty(),
        "the client's rules must stay"
    );

    // 8. Restart: rules are re-installed without duplicates; SIGTERM drains and exits cleanly.
    let status = blocking(|| node2.child.stop())?;
    ensure!(status.success(), "ztunnel node-2 exit: {status}");
    let node2 = blocking(|| {
        Ztunnel::start(
            "node-2",
            &lab.config_dir(),
            lab.ca_dir.path(),
            lab.state.path(),
        )
    })?;
    let mut node2 = node2;
    blocking(|| node2.child.wait_for_log("serving pod default/remote", WAIT))?;
    let rules = blocking(|| strait_rules(&lab.remote))?;
    ensure!(
        rules
            .iter()
            .filter(|l| *l == "-A OUTPUT -j STRAIT_OUTPUT")
            .count()
            == 1,
        "after restart: {rules:#?}"
    );
    let out = blocking(|| lab.remote.curl(&["-m", "10", &format!("http://{vip}/")]))?;
    ensure!(
        out.status == 200 && out.body_text().starts_with("waypoint saw"),
        "restarted node-2: {out:?}"
    );
    let status = blocking(|| node1.child.stop())?;
    ensure!(status.success(), "ztunnel node-1 exit: {status}");
    Ok(())
}
