//! Crash consistency: SIGKILL the agent while a libnbd client writes and
//! flushes; after a restart every write completed before the last completed
//! FLUSH reads back.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::{Agent, Child, GIB, TestDir, run, wait_for};

const WRITER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nbd_crash_writer.py");
/// 32 blocks of 4 KiB per round, 2048 rounds: 256 MiB, each block written once.
const PER_ROUND: &str = "32";
const ROUNDS: &str = "2048";

fn last_durable(log: &Path) -> Option<i64> {
    fs::read_to_string(log)
        .ok()?
        .lines()
        .filter_map(|l| l.strip_prefix("DURABLE "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
}

#[test]
fn flushed_writes_survive_agent_sigkill() -> Result<()> {
    let dir = TestDir::new("crash");
    let mut agent = Agent::start(&dir, GIB)?;
    let socket = dir.join("c.sock");
    let uri = agent.create_export("vol-c", "256MiB", &socket, true)?;

    let log = dir.join("writer.log");
    let mut writer = Child::spawn(
        "writer",
        Command::new("/usr/bin/python3")
            .arg(WRITER)
            .args([&uri, PER_ROUND, ROUNDS]),
        &log,
    )?;
    wait_for("40 durable rounds", Duration::from_secs(120), || {
        last_durable(&log).filter(|&r| r >= 40)
    })?;
    agent.kill();
    writer.wait_timeout(Duration::from_secs(60))?;
    let durable = last_durable(&log).context("writer reported no durable round")?;
    let text = fs::read_to_string(&log)?;
    assert!(
        durable < 2047 && text.contains("STOPPED"),
        "the agent must die while the writer is still writing: {}",
        text.lines().last().unwrap_or_default()
    );

    agent.restart()?;
    let uri = agent.cli_ok(&[
        "export",
        "start",
        "vol-c",
        "--socket",
        &socket.to_string_lossy(),
    ])?;
    let out = run(
        Command::new("/usr/bin/python3").arg(WRITER).args([
            uri.trim(),
            PER_ROUND,
            ROUNDS,
            "--verify",
            &durable.to_string(),
        ]),
        Duration::from_secs(120),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("BAD 0"),
        "after the crash, rounds up to {durable} must read back: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
