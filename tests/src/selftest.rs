//! The harness tested against the real tools (root only; skipped loudly otherwise).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Result, ensure};

use crate::{Lab, Netns, Nginx, NginxConfig, lab_enabled, netns::run_ok, start_dnsmasq};

fn root_network_state() -> Result<BTreeSet<String>> {
    let mut state = BTreeSet::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["-4", "route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
    ] {
        let out = run_ok(Command::new("ip").args(args))?;
        // Link lines carry counters/state flags that change on their own; names are what matter.
        state.extend(out.lines().map(|l| {
            if args[1] == "link" {
                l.split(':').nth(1).unwrap_or(l).trim().to_owned()
            } else {
                l.to_owned()
            }
        }));
    }
    Ok(state)
}

#[test]
fn netns_drop_kills_processes_and_deletes_namespace() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let ns = Netns::new("drop test")?;
    let path = ns.path().to_path_buf();
    ensure!(path.exists(), "{} missing", path.display());
    ensure!(
        ns.name()
            .starts_with(&format!("mt-{}-", std::process::id()))
    );
    ensure!(
        ns.exec_ok(&["ip", "-o", "link", "show", "lo"])?
            .contains("UP")
    );
    // Started outside the guard API: only the namespace's own cleanup can stop it.
    let mut stray = ns.command("sleep").arg("300").spawn()?;
    let pid = stray.id();
    crate::wait_until("sleep to enter the netns", Duration::from_secs(5), || {
        Ok(
            run_ok(Command::new("ip").args(["netns", "pids", ns.name()]))?
                .split_whitespace()
                .any(|p| p == pid.to_string()),
        )
    })?;
    drop(ns);
    ensure!(!path.exists(), "{} still exists", path.display());
    let status = stray.wait()?;
    ensure!(
        !status.success(),
        "sleep should have been killed, got {status}"
    );
    Ok(())
}

#[test]
fn lab_routes_between_subnets_without_touching_the_root_namespace() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let before = root_network_state()?;
    let lab = Lab::new()?;
    let pod = lab.add_host("pod", "10.244.0.10/16")?;
    lab.add_address(&pod, "fd00:10:244::10/64")?;
    let web = lab.add_host("web", "203.0.113.10/24")?;
    lab.add_address(&web, "2001:db8:113::10/64")?;
    ensure!(
        lab.add_host("bad", "203.0.113.1/24").is_err(),
        "gateway address accepted"
    );
    ensure!(
        root_network_state()? == before,
        "the root namespace changed"
    );

    let _nginx = Nginx::start(
        &web,
        &NginxConfig::http(
            "server { listen 80; listen [::]:80; \
             location / { add_header x-lab web always; return 200 \"hello from web\\n\"; } }",
        ),
    )?;
    web.wait_tcp("203.0.113.10:80".parse()?, Duration::from_secs(10))?;

    for url in ["http://203.0.113.10/", "http://[2001:db8:113::10]/"] {
        let out = pod.curl(&[url])?;
        ensure!(out.exit_code == 0, "{url}: curl failed: {}", out.stderr);
        ensure!(out.status == 200, "{url}: status {}", out.status);
        ensure!(
            out.header("X-Lab") == Some("web"),
            "{url}: {:?}",
            out.headers
        );
        ensure!(
            out.body_text() == "hello from web\n",
            "{url}: {}",
            out.body_text()
        );
        ensure!(out.time_total > Duration::ZERO);
    }
    // Nothing listens on 81: a failed transfer is data, not an error.
    let refused = pod.curl(&["http://203.0.113.10:81/"])?;
    ensure!(refused.exit_code == 7 && refused.status == 0, "{refused:?}");
    Ok(())
}

#[test]
fn dnsmasq_answers_configured_names() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let lab = Lab::new()?;
    let dns = lab.add_host("dns", "203.0.113.53/24")?;
    let pod = lab.add_host("pod", "10.244.0.11/16")?;
    let answer: IpAddr = "203.0.113.80".parse()?;
    let _dnsmasq = start_dnsmasq(&dns, dns.ip(), &[("api.example.test", answer)])?;
    pod.set_resolv_conf(&[dns.ip()])?;
    let resolved = pod.exec_ok(&["getent", "ahostsv4", "api.example.test"])?;
    ensure!(resolved.starts_with("203.0.113.80 "), "{resolved}");
    let unknown = pod.exec(&["getent", "ahostsv4", "other.example.test"])?;
    ensure!(!unknown.status.success(), "unknown name resolved");
    let etc = Path::new("/etc/netns").join(pod.name());
    ensure!(etc.exists());
    drop(pod);
    ensure!(!etc.exists(), "{} left behind", etc.display());
    Ok(())
}

#[test]
fn wait_tcp_times_out_and_succeeds() -> Result<()> {
    if !lab_enabled() {
        return Ok(());
    }
    let ns = Netns::new("wait")?;
    let addr: SocketAddr = "127.0.0.1:18080".parse()?;
    ensure!(ns.wait_tcp(addr, Duration::from_millis(300)).is_err());
    let _nginx = Nginx::start(
        &ns,
        &NginxConfig::http("server { listen 127.0.0.1:18080; return 204; }"),
    )?;
    ns.wait_tcp(addr, Duration::from_secs(10))?;
    Ok(())
}
