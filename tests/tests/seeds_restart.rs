//! Restarting a proxy mid-scenario (seed 000's setup): the configuration lives in the watched
//! directory, so a restarted waypoint or ztunnel picks it all up again, the very next request
//! succeeds, and later changes still hot-reload. On the real binaries in a [`SeedLab`]; needs
//! root (skipped loudly otherwise; fails under CI=true).

use anyhow::{Context, Result, ensure};
use mesh_tests::seedlab::{LOG_WAIT, SeedLab, apply_seed_000_waypoint, run_seed_test, seeds};

const SE_FILE: &str = "istio-egress/external-svc-aliyun.yaml";

/// Seed 000 through step 3; one request through the waypoint.
fn through_the_waypoint(lab: &SeedLab) -> Result<()> {
    apply_seed_000_waypoint(lab)?;
    lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY)?;
    let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
    r.ensure_status(301)?;
    r.ensure_via_waypoint()
}

/// After a restart: the first request goes through the waypoint again, and seed 000 step 4
/// (applied now) takes effect — the restarted process watches the directory too.
fn still_works(lab: &SeedLab, what: &str) -> Result<()> {
    let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
    r.ensure_status(301)
        .with_context(|| format!("first request after restarting {what}"))?;
    r.ensure_via_waypoint()
        .with_context(|| format!("first request after restarting {what}"))?;

    lab.apply(SE_FILE, seeds::S000_SERVICE_ENTRY_UPGRADE)?;
    lab.apply("istio-egress/aliyun-com.yaml", seeds::S000_DESTINATION_RULE)?;
    let mark = lab.internet().http_log().len();
    let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
    r.ensure_status(301)?;
    r.ensure_via_waypoint()?;
    let seen = lab
        .internet()
        .wait_http_log(mark, LOG_WAIT, |e| e["host"] == "aliyun.com")?;
    ensure!(
        seen["server_port"] == "443" && seen["ssl_server_name"] == "aliyun.com",
        "after restarting {what}, a change applied later must take effect (TLS to :443): {seen}"
    );
    Ok(())
}

#[test]
fn restarting_the_waypoint_loses_no_configuration() {
    run_seed_test(SeedLab::builder(), |lab| {
        through_the_waypoint(lab)?;
        lab.restart_waypoint("waypoint")?;
        still_works(lab, "the waypoint")
    });
}

#[test]
fn restarting_ztunnel_loses_no_configuration() {
    run_seed_test(SeedLab::builder(), |lab| {
        through_the_waypoint(lab)?;
        lab.restart_ztunnel()?;
        still_works(lab, "ztunnel")
    });
}
