//! Seed 004 ("Configure the effective range of Waypoint"): `istio.io/use-waypoint` on a
//! namespace versus on a single service, and the access log's `upstream_cluster`. The external
//! services are ServiceEntries in `default` (seed 001's aliyun.com and seed 002's
//! www.aliyun.com); the waypoint is the seed's Gateway in `default`. On the real ztunnel and
//! waypoint in a [`SeedLab`]; needs root (skipped loudly otherwise; fails under CI=true).

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use mesh_tests::seedlab::{
    LOG_WAIT, SeedLab, SeedLabBuilder, USE_WAYPOINT_LABEL, WaypointSpec, default_sleep,
    run_seed_test, seeds, with_label,
};

const ALIYUN_SE: &str = "default/external-svc-http.yaml";
const WWW_SE: &str = "default/aliyun-com-ext.yaml";

/// sleep in `default`, a waypoint pod for `default/waypoint`, both ServiceEntries applied.
fn builder() -> SeedLabBuilder {
    SeedLab::builder()
        .pods(vec![default_sleep()])
        .waypoints(vec![WaypointSpec::new(
            "default",
            "waypoint",
            Ipv4Addr::new(10, 244, 0, 20),
            false,
        )])
        .file(ALIYUN_SE, seeds::S001_SERVICE_ENTRY)
        .file(WWW_SE, seeds::S002_SERVICE_ENTRY)
}

/// Step 1: the seed's waypoint Gateway (`allowedRoutes: Same`), then ready.
fn deploy_waypoint(lab: &SeedLab) -> Result<()> {
    lab.apply("default/waypoint.yaml", seeds::S004_WAYPOINT)?;
    lab.wait_waypoint_ready("waypoint", std::time::Duration::from_secs(15))
}

/// Requests `host` from sleep; checks whether it went through the waypoint and, if so, that the
/// access log names `inbound-vip|80|http|<host>` as the upstream cluster.
fn expect(lab: &SeedLab, host: &str, through_waypoint: bool, stage: &str) -> Result<()> {
    let waypoint = lab.waypoint("waypoint")?;
    let mark = waypoint.access_log().len();
    let r = lab.curl("sleep", &["-I", &format!("http://{host}/")])?;
    r.ensure_status(301)
        .with_context(|| format!("{stage}: {host}"))?;
    if through_waypoint {
        r.ensure_via_waypoint()
            .with_context(|| format!("{stage}: {host}"))?;
        let want = format!("inbound-vip|80|http|{host}");
        let e = waypoint.wait_access_log(mark, LOG_WAIT, |e| e["authority"] == host)?;
        ensure!(
            e["upstream_cluster"]
                .as_str()
                .is_some_and(|c| c.trim_end_matches(';') == want),
            "{stage}: upstream_cluster should be {want}: {e}"
        );
    } else {
        r.ensure_direct()
            .with_context(|| format!("{stage}: {host}"))?;
        // Give a stray entry time to appear before concluding there is none.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let new: Vec<_> = waypoint.access_log().into_iter().skip(mark).collect();
        ensure!(
            new.is_empty(),
            "{stage}: {host} must not go through the waypoint, but it logged {new:?}"
        );
    }
    Ok(())
}

/// Namespace level: `kubectl label namespace default istio.io/use-waypoint=waypoint` sends
/// every service of the namespace through the waypoint; removing the label takes it out of the
/// path again.
#[test]
fn s004_namespace_label_routes_every_service_through_the_waypoint() {
    run_seed_test(builder(), |lab| {
        deploy_waypoint(lab)?;
        for host in ["aliyun.com", "www.aliyun.com"] {
            expect(lab, host, false, "no label")?;
        }
        lab.label_namespace("default", USE_WAYPOINT_LABEL, Some("waypoint"))?;
        for host in ["aliyun.com", "www.aliyun.com"] {
            expect(lab, host, true, "namespace labelled")?;
        }
        lab.label_namespace("default", USE_WAYPOINT_LABEL, None)?;
        for host in ["aliyun.com", "www.aliyun.com"] {
            expect(lab, host, false, "label removed")?;
        }
        Ok(())
    });
}

/// Service level: the label on one ServiceEntry (`kubectl label serviceentry aliyun-com-ext
/// istio.io/use-waypoint=waypoint`) sends only that service through the waypoint.
#[test]
fn s004_service_label_routes_only_that_service_through_the_waypoint() {
    run_seed_test(builder(), |lab| {
        deploy_waypoint(lab)?;
        let labelled = with_label(
            seeds::S002_SERVICE_ENTRY,
            USE_WAYPOINT_LABEL,
            Some("waypoint"),
        )?;
        lab.apply(WWW_SE, &labelled)?;
        expect(lab, "www.aliyun.com", true, "service labelled")?;
        expect(lab, "aliyun.com", false, "other service")?;

        lab.apply(WWW_SE, &with_label(&labelled, USE_WAYPOINT_LABEL, None)?)?;
        expect(lab, "www.aliyun.com", false, "label removed")?;
        Ok(())
    });
}
