//! A one-namespace lab for driving the real `waypoint` binary.
//!
//! ```text
//!  netns "wp" (lo only):
//!    curl ──▶ hbone-relay 10.244.1.10:180xx ══HBONE══▶ waypoint 127.0.0.1:15008 ──▶ "internet"
//!    203.0.113.10 aliyun.com   nginx :80 (301, Server: Tengine), :443 (TLS, test CA), :8080 (echo)
//!    203.0.113.11 httpbin.org  nginx :80 (mirror / split target)
//!    203.0.113.12 bad.example  nginx :80 → 503          203.0.113.13 good.example nginx :80 → 200
//!    203.0.113.14 badcert.example nginx :443 with a certificate from another CA
//!    203.0.113.15 mtls.example nginx :443 requiring a client certificate from the test CA
//!    (`client.pem` / `client.key` in the PKI dir; answers "mtls-ok <client subject>")
//!    (aliyun.com /stall sends "head", then stalls 3 s; httpbin.org and good.example /upload
//!    read the whole request body and answer with its length)
//!    203.0.113.53 dnsmasq for all of the above
//! ```
//!
//! `hbone-relay` plays ztunnel: one tunnel per curl connection, `:authority` = the host's VIP
//! (from the config), `forwarded: for="<curl's address>"`. The waypoint's access log is its
//! stdout (JSON lines), read back from the child's log file.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_tests::{ChildGuard, CurlOutput, Netns, Nginx, NginxConfig, start_dnsmasq, workspace_bin};
use serde_json::Value;

pub const CLIENT_IP: &str = "10.244.1.10";
pub const DNS_IP: &str = "203.0.113.53";
pub const HOSTS: &[(&str, &str)] = &[
    ("aliyun.com", "203.0.113.10"),
    ("httpbin.org", "203.0.113.11"),
    ("bad.example", "203.0.113.12"),
    ("good.example", "203.0.113.13"),
    ("badcert.example", "203.0.113.14"),
    ("mtls.example", "203.0.113.15"),
];

/// Namespaces, the sleep client pod and the waypoint Gateway + pod (seed 000 step 2).
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata:
  name: istio-egress
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    trustDomain: cluster.local
    outboundTrafficPolicy:
      mode: @POLICY@
---
apiVersion: v1
kind: Pod
metadata:
  name: sleep-0
  namespace: default
  labels: {app: sleep}
spec: {serviceAccountName: sleep}
status: {podIP: 10.244.1.10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: istio-egress}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: istio-egress
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec: {serviceAccountName: waypoint}
status: {podIP: 10.244.1.20}
"#;

/// Seed 000 step 3: the ServiceEntry for aliyun.com.
pub const ALIYUN_SE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-svc-aliyun, namespace: istio-egress}
spec:
  hosts: [aliyun.com]
  location: MESH_EXTERNAL
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  resolution: DNS
"#;

const NGINX: &str = r#"
include /etc/nginx/modules-enabled/*.conf;
user root;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log info;
events { worker_connections 1024; }
http {
  log_format lab '$server_addr:$server_port "$ssl_server_name" "$request" host=$http_host rid=$http_x_request_id status=$status len=$request_length';
  access_log @DIR@/lab.log lab;
  client_body_temp_path @DIR@/client_body;
  proxy_temp_path @DIR@/proxy;
  fastcgi_temp_path @DIR@/fastcgi;
  uwsgi_temp_path @DIR@/uwsgi;
  scgi_temp_path @DIR@/scgi;
  keepalive_requests 100000;
  client_max_body_size 8m;
  more_set_headers "Server: Tengine";
  server {
    listen 203.0.113.10:80;
    location / { return 301 https://aliyun.com/; }
    location /ok { return 200 "aliyun\n"; }
    location /slow { echo_sleep 3; echo "slow"; }
    location /stall { echo "head"; echo_flush; echo_sleep 3; echo "tail"; }
    location /headers { echo "x-added=$http_x_added x-removed=$http_x_removed path=$request_uri host=$http_host"; }
  }
  server {
    listen 203.0.113.10:443 ssl;
    ssl_certificate @PKI@/server.pem;
    ssl_certificate_key @PKI@/server.key;
    location / { return 301 https://aliyun.com/; }
    location /ok { return 200 "aliyun-tls\n"; }
  }
  server {
    listen 203.0.113.11:80;
    location / { return 200 "httpbin\n"; }
    location /upload { client_body_buffer_size 8m; echo_read_request_body; echo "httpbin got $content_length"; }
  }
  server {
    listen 203.0.113.11:443 ssl;
    ssl_certificate @PKI@/server.pem;
    ssl_certificate_key @PKI@/server.key;
    location / { return 200 "httpbin-tls\n"; }
  }
  server {
    listen 203.0.113.12:80;
    location / { return 503 "bad\n"; }
  }
  server {
    listen 203.0.113.13:80;
    location / { return 200 "good\n"; }
    location /upload { client_body_buffer_size 8m; echo_read_request_body; echo "good got $content_length"; }
  }
  server {
    listen 203.0.113.14:443 ssl;
    ssl_certificate @PKI@/bad.pem;
    ssl_certificate_key @PKI@/bad.key;
    location / { return 200 "should never be seen\n"; }
  }
  server {
    listen 203.0.113.15:443 ssl;
    ssl_certificate @PKI@/server.pem;
    ssl_certificate_key @PKI@/server.key;
    ssl_client_certificate @PKI@/ca.pem;
    ssl_verify_client on;
    location / { return 200 "mtls-ok $ssl_client_s_dn\n"; }
  }
}
"#;

/// What a lab runs.
pub struct LabConfig {
    /// `ALLOW_ANY` or `REGISTRY_ONLY`.
    pub policy: &'static str,
    /// Istio YAML added to the base configuration.
    pub yaml: String,
    /// Relay targets, `host:port` (host names resolved to VIPs from the config) or `ip:port`.
    /// Target `i` is reachable at `CLIENT_IP:18000+i`.
    pub targets: Vec<String>,
    /// Extra waypoint command-line arguments.
    pub waypoint_args: Vec<String>,
}

impl LabConfig {
    pub fn new(yaml: impl Into<String>, targets: &[&str]) -> Self {
        LabConfig {
            policy: "ALLOW_ANY",
            yaml: yaml.into(),
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
            waypoint_args: Vec::new(),
        }
    }

    pub fn waypoint_args(mut self, args: &[&str]) -> Self {
        self.waypoint_args
            .extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn registry_only(mut self) -> Self {
        self.policy = "REGISTRY_ONLY";
        self
    }
}

pub struct WaypointLab {
    // Drop order: processes, then files, then the namespace.
    pub relay: ChildGuard,
    pub waypoint: ChildGuard,
    pub nginx: Nginx,
    pub dnsmasq: ChildGuard,
    pub pki: tempfile::TempDir,
    pub config: tempfile::TempDir,
    pub targets: Vec<String>,
    pub ns: Netns,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("openssl").current_dir(dir).args(args)).map(drop)
}

/// The mesh CA (via the `certs` binary), a test CA for the "internet" with a server certificate
/// for aliyun.com / httpbin.org, and a self-signed certificate nobody trusts.
fn make_pki(dir: &Path) -> Result<()> {
    run(Command::new(workspace_bin("certs")?)
        .args(["init", "--trust-domain", "cluster.local", "--out"])
        .arg(dir.join("mesh-ca")))?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=waypoint test internet CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=aliyun.com",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:aliyun.com,DNS:httpbin.org,DNS:mtls.example\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )?;
    // A client certificate from the test CA, for MUTUAL origination to mtls.example.
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=waypoint-egress-client",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ],
    )?;
    let mut bad = vec!["req", "-x509"];
    bad.extend(ec);
    bad.extend([
        "-keyout",
        "bad.key",
        "-out",
        "bad.pem",
        "-days",
        "2",
        "-subj",
        "/CN=badcert.example",
        "-addext",
        "subjectAltName=DNS:badcert.example",
    ]);
    openssl(dir, &bad)
}

impl WaypointLab {
    pub fn start(cfg: LabConfig) -> Result<Self> {
        let ns = Netns::new("waypoint")?;
        for (_, ip) in HOSTS {
            ns.ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        for ip in [DNS_IP, CLIENT_IP, "10.244.1.20"] {
            ns.ip_cmd(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        let pki = tempfile::Builder::new().prefix("wp-pki-").tempdir()?;
        make_pki(pki.path())?;

        let nginx_conf = NGINX.replace("@PKI@", &pki.path().display().to_string());
        let nginx = Nginx::start(&ns, &NginxConfig::Full(nginx_conf))?;
        let records: Vec<(&str, IpAddr)> = HOSTS
            .iter()
            .map(|(h, ip)| Ok((*h, ip.parse()?)))
            .collect::<Result<_>>()?;
        let dnsmasq = start_dnsmasq(&ns, DNS_IP.parse()?, &records)?;
        for (_, ip) in HOSTS {
            let port = if ["203.0.113.14", "203.0.113.15"].contains(ip) {
                443
            } else {
                80
            };
            ns.wait_tcp(SocketAddr::new(ip.parse()?, port), Duration::from_secs(10))?;
        }

        let config = tempfile::Builder::new().prefix("wp-config-").tempdir()?;
        std::fs::write(
            config.path().join("base.yaml"),
            BASE.replace("@POLICY@", cfg.policy),
        )?;
        std::fs::write(config.path().join("test.yaml"), &cfg.yaml)?;
        let check = run(Command::new(workspace_bin("waypoint")?)
            .arg("check")
            .arg(config.path()));
        check.context("the test configuration does not validate")?;

        let mesh_ca = pki.path().join("mesh-ca");
        // `2>&1` inside the child: stdout (access log) and stderr (diagnostics) then share one
        // file offset. ChildGuard opens the log twice without O_APPEND, so two separate
        // descriptors would overwrite each other's lines.
        let mut cmd = ns.command("sh");
        cmd.args(["-c", "exec \"$0\" \"$@\" 2>&1"])
            .arg(workspace_bin("waypoint")?);
        cmd.arg("--config-dir")
            .arg(config.path())
            .arg("--ca-dir")
            .arg(&mesh_ca)
            .args([
                "--gateway",
                "istio-egress/waypoint",
                "--listen",
                "0.0.0.0:15008",
            ])
            .args([
                "--admin",
                "127.0.0.1:15000",
                "--dns-server",
                &format!("{DNS_IP}:53"),
            ])
            .args(["--drain-seconds", "6"])
            .args(&cfg.waypoint_args)
            // The seeds' DestinationRules carry no caCertificates: the "system" roots are the
            // test internet's CA (rustls-native-certs reads SSL_CERT_FILE).
            .env("SSL_CERT_FILE", pki.path().join("ca.pem"))
            .env("RUST_LOG", "info,waypoint=debug");
        let waypoint = ChildGuard::spawn("waypoint", cmd)?;
        ns.wait_tcp("127.0.0.1:15008".parse()?, Duration::from_secs(20))
            .with_context(|| format!("waypoint did not listen; log:\n{}", waypoint.log()))?;

        let mut cmd = ns.command(workspace_bin("hbone-relay")?);
        cmd.arg("--ca-dir")
            .arg(&mesh_ca)
            .arg("--config-dir")
            .arg(config.path());
        cmd.args(["--waypoint", "127.0.0.1:15008"]);
        for (i, t) in cfg.targets.iter().enumerate() {
            cmd.args(["--map", &format!("{CLIENT_IP}:{}={t}", 18000 + i)]);
        }
        let relay = ChildGuard::spawn("hbone-relay", cmd)?;
        for i in 0..cfg.targets.len() {
            let addr = SocketAddr::new(CLIENT_IP.parse()?, 18000 + i as u16);
            ns.wait_tcp(addr, Duration::from_secs(10))
                .with_context(|| format!("relay did not listen; log:\n{}", relay.log()))?;
        }
        Ok(WaypointLab {
            relay,
            waypoint,
            nginx,
            dnsmasq,
            pki,
            config,
            targets: cfg.targets,
            ns,
        })
    }

    /// `--connect-to` sending every connection of a curl run to the relay of target `i`.
    pub fn connect_to(&self, i: usize) -> String {
        format!("::{CLIENT_IP}:{}", 18000 + i)
    }

    /// curl through target `i` to `url`, with `extra` arguments.
    pub fn curl(&self, i: usize, url: &str, extra: &[&str]) -> Result<CurlOutput> {
        let via = self.connect_to(i);
        let mut args = vec!["--connect-to", via.as_str()];
        args.extend_from_slice(extra);
        args.push(url);
        self.ns.curl(&args)
    }

    /// The waypoint's access-log entries so far.
    pub fn access_log(&self) -> Vec<Value> {
        self.waypoint
            .log()
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v.get("response_flags").is_some() && v.get("upstream_cluster").is_some())
            .collect()
    }

    /// Waits for an access-log entry after the first `after` that satisfies `pred`.
    pub fn wait_log(&self, after: usize, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.access_log();
            if let Some(e) = log.iter().skip(after).find(|e| pred(e)) {
                return Ok(e.clone());
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching access-log entry; entries after {after}: {:#?}",
                    &log[after.min(log.len())..]
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// nginx's access log (`lab` format).
    pub fn nginx_log(&self) -> String {
        std::fs::read_to_string(self.nginx.dir().join("lab.log")).unwrap_or_default()
    }

    /// Waits until nginx's log has a line containing every one of `needles`.
    pub fn wait_nginx(&self, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self
                .nginx_log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Ok(line.to_owned());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx logged no line with {needles:?}; log:\n{}",
                    self.nginx_log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The test CA's certificate (for DestinationRule `caCertificates`).
    /// A file of the lab's PKI (`client.pem`, `client.key`, `ca.pem`), base64 as a Secret's
    /// `data` holds it.
    pub fn pki_base64(&self, file: &str) -> Result<String> {
        let out = run(Command::new("openssl")
            .current_dir(self.pki.path())
            .args(["base64", "-A", "-in", file]))?;
        Ok(out.trim().to_owned())
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.pki.path().join("ca.pem")
    }

    /// Runs curl with raw arguments inside the namespace; returns stdout.
    pub fn curl_raw(&self, args: &[&str]) -> Result<String> {
        let out = self
            .ns
            .exec(&[&["curl", "-sS", "--max-time", "60"], args].concat())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Fetches every one of `urls` through target `i` in a single curl run, so requests share
    /// keep-alive connections; bodies are discarded and stdout has one status code per line.
    pub fn curl_statuses(&self, i: usize, urls: &[String]) -> Result<String> {
        let via = self.connect_to(i);
        let mut args: Vec<&str> = vec!["-w", "%{http_code}\\n", "--connect-to", &via];
        for u in urls {
            args.extend(["-o", "/dev/null", u.as_str()]);
        }
        self.curl_raw(&args)
    }

    /// The waypoint's admin endpoint `path`.
    pub fn admin(&self, path: &str) -> Result<String> {
        self.curl_raw(&[&format!("http://127.0.0.1:15000{path}")])
    }
}

/// Runs `body` as a lab test (`mesh_tests::lab_test`), or skips it where the lab cannot run.
pub fn lab_case(body: impl FnOnce() -> Result<()>) {
    if !mesh_tests::lab_enabled() {
        return;
    }
    mesh_tests::lab_test(body);
}

/// A string field of an access-log entry.
pub fn field<'a>(e: &'a Value, name: &str) -> &'a str {
    e.get(name).and_then(Value::as_str).unwrap_or("")
}
