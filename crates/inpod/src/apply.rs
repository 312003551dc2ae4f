//! Applying the capture ruleset inside a namespace: the I/O edge around [`crate::rules`].

use std::process::{Command, Output};

use crate::{
    Error, NetnsHandle,
    netns::show_command,
    rules::{CaptureConfig, IpFamily, NatState, render_install, render_remove},
};

/// How long `iptables-restore` waits for the xtables lock (legacy backend) before failing.
const LOCK_WAIT: &str = "--wait=10";

/// Installs (or updates to) the capture rules for `cfg` in `netns`, for each of `cfg.families`.
///
/// Idempotent: our chains are flushed and refilled in one `iptables-restore` transaction and the
/// jumps into them are added only when missing, so a restarted ztunnel neither duplicates nor
/// leaks rules, and a changed scope replaces the old one. Reading the table and writing it back are
/// two steps: callers serialize installs per namespace (ztunnel handles one pod event at a time).
pub async fn install_rules(netns: &NetnsHandle, cfg: &CaptureConfig) -> Result<(), Error> {
    cfg.validate()?;
    for &family in &cfg.families {
        let current = NatState::parse(&save_nat(netns, family).await?);
        restore(netns, family, render_install(cfg, family, &current)).await?;
        tracing::info!(netns = %netns.path().display(), ?family, "capture rules installed");
    }
    Ok(())
}

/// Removes our jumps and chains (and nothing else) from `netns` for each of `families`.
/// Removing rules that are not there is not an error.
pub async fn remove_rules(netns: &NetnsHandle, families: &[IpFamily]) -> Result<(), Error> {
    for &family in families {
        let current = NatState::parse(&save_nat(netns, family).await?);
        if let Some(script) = render_remove(&current) {
            restore(netns, family, script).await?;
            tracing::info!(netns = %netns.path().display(), ?family, "capture rules removed");
        }
    }
    Ok(())
}

/// The `nat` table of `netns` as `iptables-save -t nat` (or `ip6tables-save`) prints it.
pub async fn save_nat(netns: &NetnsHandle, family: IpFamily) -> Result<String, Error> {
    let mut command = Command::new(family.save_command());
    command.args(["-t", "nat"]);
    let output = run_checked(netns, command, None).await?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn restore(netns: &NetnsHandle, family: IpFamily, script: String) -> Result<(), Error> {
    tracing::debug!(netns = %netns.path().display(), ?family, %script, "iptables-restore");
    let mut command = Command::new(family.restore_command());
    command.args(["--noflush", LOCK_WAIT]);
    run_checked(netns, command, Some(script.into_bytes())).await?;
    Ok(())
}

async fn run_checked(
    netns: &NetnsHandle,
    command: Command,
    stdin: Option<Vec<u8>>,
) -> Result<Output, Error> {
    let shown = show_command(&command);
    let output = netns.command_output(command, stdin).await?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::Command {
            path: netns.path().to_path_buf(),
            command: shown,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
