//! The seed lab itself, on the real binaries: two labs side by side, and a rejected
//! configuration change (the proxies keep the last good configuration; `apply` says why at once).
//! Needs root (skipped loudly otherwise; fails under CI=true).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use mesh_tests::seedlab::{SeedLab, apply_seed_000_waypoint, run_seed_test, seeds};

#[test]
fn two_labs_run_side_by_side() {
    run_seed_test(SeedLab::builder(), |first| {
        let second = SeedLab::builder()
            .start()
            .context("starting a second lab")?;
        ensure!(
            first.ztunnel().metrics_url() != second.ztunnel().metrics_url()
                && first.node() != second.node()
                && first.config_dir() != second.config_dir(),
            "the labs share names or ports"
        );
        // Same pod addresses in both, each reaching its own internet.
        for lab in [&*first, &second] {
            let mark = lab.internet().http_log().len();
            let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
            r.ensure_status(301)?;
            r.ensure_direct()?;
            lab.internet()
                .wait_http_log(mark, Duration::from_secs(5), |e| e["host"] == "aliyun.com")?;
        }
        // A change in one lab is not seen by the other.
        apply_seed_000_waypoint(&second)?;
        second.apply(
            "istio-egress/external-svc-aliyun.yaml",
            seeds::S000_SERVICE_ENTRY,
        )?;
        second
            .curl("sleep", &["-sI", "aliyun.com"])?
            .ensure_via_waypoint()?;
        first
            .curl("sleep", &["-sI", "aliyun.com"])?
            .ensure_direct()
            .context("the first lab must be unaffected")?;
        Ok(())
    });
}

#[test]
fn a_rejected_change_keeps_the_last_good_configuration() {
    run_seed_test(SeedLab::builder(), |lab| {
        apply_seed_000_waypoint(lab)?;
        lab.apply(
            "istio-egress/external-svc-aliyun.yaml",
            seeds::S000_SERVICE_ENTRY,
        )?;
        let broken = seeds::S000_SERVICE_ENTRY.replace("resolution: DNS", "resolution: BOGUS");
        let started = Instant::now();
        let err = match lab.apply("istio-egress/broken.yaml", &broken) {
            Ok(()) => anyhow::bail!("an invalid ServiceEntry was accepted"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains("rejected") && err.contains("broken.yaml"),
            "the error should say the change was rejected and where: {err}"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "a rejected change should be reported promptly, took {:?}",
            started.elapsed()
        );
        let r = lab.curl("sleep", &["-sI", "aliyun.com"])?;
        r.ensure_status(301)?;
        r.ensure_via_waypoint()
            .context("the last good configuration must stay in force")?;
        lab.delete("istio-egress/broken.yaml")?;
        Ok(())
    });
}
