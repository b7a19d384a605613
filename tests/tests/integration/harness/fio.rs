//! fio with verification over an NBD export, the workload of the fault
//! suites: random writes of 4–64 KiB over 96 MiB, then every block read
//! back and checked (crc32c). It is rate-limited (12 MiB/s) so that faults
//! injected a few seconds after it starts land in the middle of the write
//! phase.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{Child, TestDir};

/// Bytes fio writes, then verifies.
const REGION_BYTES: u64 = 96 << 20;

/// Starts fio against `uri` with its JSON report in `dir/log`.
pub fn start(dir: &TestDir, uri: &str, log: &str) -> Result<Child> {
    Child::spawn(
        "fio",
        Command::new("fio")
            .args([
                "--name=faults",
                "--thread",
                "--ioengine=nbd",
                "--rw=randwrite",
            ])
            .args([
                "--bsrange=4k-64k",
                "--iodepth=16",
                "--size=96M",
                "--rate=12m",
            ])
            .args([
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .args(["--output-format=json"])
            .arg(format!("--uri={uri}")),
        &dir.join(log),
    )
}

/// Waits for fio to finish and checks that it saw no error at all, wrote
/// its whole region and verified it.
pub fn assert_clean(dir: &TestDir, fio: &mut Child, log: &str) -> Result<()> {
    let status = fio.wait_timeout(Duration::from_secs(240))?;
    let text = fs::read_to_string(dir.join(log))?;
    ensure!(status.success(), "fio failed ({status}): {text}");
    let report: Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio JSON: {text}"))?;
    let job = &report["jobs"][0];
    ensure!(job["error"] == 0, "fio job error: {job}");
    ensure!(
        job["write"]["io_bytes"].as_u64() == Some(REGION_BYTES),
        "fio must write its whole region: {}",
        job["write"]
    );
    ensure!(
        job["read"]["io_bytes"].as_u64() >= Some(REGION_BYTES),
        "fio must verify what it wrote: {}",
        job["read"]
    );
    Ok(())
}
