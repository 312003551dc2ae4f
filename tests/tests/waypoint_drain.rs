//! The waypoint on SIGTERM, beyond what `waypoint_upstream.rs` checks (the in-flight request
//! finishing, the clean exit): no new request is served once the signal arrived, and readiness
//! stops answering "ready" at once, while the request in flight still completes.

mod waypoint_lab;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use mesh_tests::{lab_enabled, lab_test};
use nix::sys::signal::Signal;
use waypoint_lab::{LabConfig, WaypointLab};

#[test]
fn sigterm_refuses_new_requests_while_the_live_one_finishes() {
    if !lab_enabled() {
        return;
    }
    lab_test(|| {
        let mut lab =
            WaypointLab::start(LabConfig::new(waypoint_lab::ALIYUN_SE, &["aliyun.com:80"]))?;
        let out = lab.curl(0, "http://aliyun.com/ok", &["-m", "10"])?;
        ensure!(out.status == 200, "before SIGTERM: {out:?}");
        ensure!(lab.admin("/healthz/ready")?.trim() == "ready");

        // A 3 s request in flight when the signal arrives.
        let mut slow = lab.ns.command("curl");
        slow.args(["-sS", "--max-time", "20", "-w", " %{http_code}"])
            .args(["--connect-to", &lab.connect_to(0), "http://aliyun.com/slow"]);
        let slow = thread::spawn(move || slow.output());
        thread::sleep(Duration::from_millis(800));
        let signalled = Instant::now();
        lab.waypoint.signal(Signal::SIGTERM)?;
        thread::sleep(Duration::from_millis(300));

        // Not ready any more (503, or the admin listener already gone).
        let ready = lab.admin("/healthz/ready");
        ensure!(
            !matches!(&ready, Ok(body) if body.trim() == "ready"),
            "readiness after SIGTERM: {ready:?}"
        );
        // A new request (a new tunnel from the stand-in ztunnel) is not served.
        let out = lab.curl(0, "http://aliyun.com/ok", &["-m", "3"])?;
        ensure!(
            out.status != 200,
            "a request sent after SIGTERM was served: {out:?}"
        );
        ensure!(
            lab.waypoint.try_wait()?.is_none(),
            "the waypoint must wait for the live request"
        );

        let out = slow
            .join()
            .map_err(|_| anyhow::anyhow!("curl thread panicked"))?
            .context("running curl")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            stdout.starts_with("slow") && stdout.trim_end().ends_with(" 200"),
            "the request in flight must finish: {stdout:?} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // --drain-seconds 6 in the lab: gone well before that once nothing is in flight.
        let status = loop {
            if let Some(status) = lab.waypoint.try_wait()? {
                break status;
            }
            ensure!(
                signalled.elapsed() < Duration::from_secs(10),
                "waypoint still running {:?} after SIGTERM",
                signalled.elapsed()
            );
            thread::sleep(Duration::from_millis(50));
        };
        ensure!(status.success(), "clean exit: {status}");
        Ok(())
    });
}
