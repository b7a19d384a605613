//! Pools and replicas through the agent's real interface: signature checks,
//! re-import after restarts, capacity limits, replica lifecycle.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;

use crate::harness::{Agent, Child, GIB, MIB, PoolFile, TestDir, bin, run_ok};

const T: Duration = Duration::from_secs(120);

/// Attaches `file` to a free loop device; the TestDir detaches it.
fn loop_attach(file: &std::path::Path) -> Result<String> {
    Ok(run_ok(
        Command::new("losetup").args(["--find", "--show"]).arg(file),
        T,
    )?
    .trim()
    .to_string())
}

/// Starts an agent that is expected to refuse to start; returns its log.
fn agent_refuses(dir: &TestDir, args: &[&str]) -> Result<String> {
    let log = dir.join("refused.log");
    let mut agent = Child::spawn(
        "ballast-agent",
        Command::new(bin("ballast-agent"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--grpc-listen")
            .arg(format!("127.0.0.1:{}", crate::harness::free_port()))
            .args(args),
        &log,
    )?;
    let status = agent.wait_timeout(Duration::from_secs(60))?;
    assert!(
        !status.success(),
        "the agent must refuse to start: {}",
        fs::read_to_string(&log)?
    );
    Ok(fs::read_to_string(&log)?)
}

#[test]
fn device_with_ext4_is_refused_unless_forced() -> Result<()> {
    let dir = TestDir::new("ext4-refused");
    let file = dir.join("disk.img");
    fs::File::create(&file)?.set_len(512 * MIB)?;
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file), T)?;
    let device = loop_attach(&file)?;

    let log = agent_refuses(&dir, &["--pool-device", &device])?;
    assert!(
        log.contains("ext4"),
        "the error must name the signature found: {log}"
    );
    // Nothing was formatted: the ext4 filesystem is still there.
    let probe = run_ok(
        Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(&device),
        T,
    )?;
    assert_eq!(probe.trim(), "ext4");

    // With --force-format the agent formats it and serves it as a pool.
    let agent = Agent::start_with(&dir, vec![], &["--pool-device", &device, "--force-format"])?;
    let pools = agent.cli_json(&["pool", "list"])?;
    assert_eq!(pools.as_array().map(Vec::len), Some(1), "{pools}");
    assert_eq!(pools[0]["device"], device.as_str());
    let probe = run_ok(
        Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "TYPE"])
            .arg(&device),
        T,
    )?;
    assert_eq!(probe.trim(), "xfs");
    Ok(())
}

#[test]
fn device_with_partition_table_is_refused() -> Result<()> {
    let dir = TestDir::new("gpt-refused");
    let file = dir.join("disk.img");
    fs::File::create(&file)?.set_len(256 * MIB)?;
    let mut sfdisk = Command::new("sfdisk");
    sfdisk.arg("--quiet").arg(&file);
    let mut child = sfdisk.stdin(std::process::Stdio::piped()).spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .map(|mut s| s.write_all(b"label: gpt\n,,L\n"))
        .transpose()?;
    assert!(child.wait()?.success());
    let device = loop_attach(&file)?;
    let log = agent_refuses(&dir, &["--pool-device", &device])?;
    assert!(
        log.to_lowercase().contains("gpt"),
        "the error must name the partition table: {log}"
    );
    Ok(())
}

#[test]
fn restart_reimports_pools_and_replicas_without_reformatting() -> Result<()> {
    let dir = TestDir::new("reimport");
    let mut agent = Agent::start(&dir, GIB)?;
    let before = agent.cli_json(&["pool", "list"])?;
    let uuid = before[0]["uuid"].as_str().unwrap_or_default().to_string();
    assert!(!uuid.is_empty());

    let socket = dir.join("r.sock");
    let uri = agent.create_export("keep", "32MiB", &socket, true)?;
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x77 0 1M"])
            .arg(&uri),
        T,
    )?;

    // A clean stop, then a crash (SIGKILL leaves the pool mounted).
    agent.stop()?;
    agent.restart()?;
    agent.signal(Signal::SIGKILL)?;
    agent.restart()?;

    let after = agent.cli_json(&["pool", "list"])?;
    assert_eq!(
        after[0]["uuid"],
        uuid.as_str(),
        "the pool must be re-imported, not reformatted"
    );
    let replicas = agent.cli_json(&["replica", "list"])?;
    assert_eq!(replicas[0]["name"], "keep");
    assert_eq!(replicas[0]["size_bytes"], 32 * MIB);
    let uri = agent.cli_ok(&[
        "export",
        "start",
        "keep",
        "--socket",
        &socket.to_string_lossy(),
    ])?;
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x77 0 1M"])
            .arg(uri.trim()),
        T,
    )?;
    assert!(!out.contains("fail"), "{out}");
    Ok(())
}

#[test]
fn replicas_respect_capacity_and_lifecycle_rules() -> Result<()> {
    let dir = TestDir::new("replicas");
    let pools = vec![
        PoolFile {
            path: dir.join("small.img"),
            size_bytes: GIB,
        },
        PoolFile {
            path: dir.join("big.img"),
            size_bytes: GIB,
        },
    ];
    let agent = Agent::start_with(&dir, pools, &["--overcommit-percent", "150"])?;
    let pools = agent.cli_json(&["pool", "list"])?;
    assert_eq!(pools.as_array().map(Vec::len), Some(2), "{pools}");
    let total = pools[0]["total_bytes"].as_u64().unwrap_or(0);
    assert!(
        total > 900 * MIB && total <= GIB,
        "XFS capacity of a 1 GiB pool: {total}"
    );

    // Thin replicas may overcommit up to the limit, not beyond.
    agent.cli_ok(&[
        "replica", "create", "t1", "--size", "1GiB", "--thin", "--pool", "small",
    ])?;
    let over = agent.cli(&[
        "replica", "create", "t2", "--size", "1GiB", "--thin", "--pool", "small",
    ])?;
    assert!(
        !over.status.success(),
        "150 % overcommit must refuse 2 GiB on a 1 GiB pool"
    );
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(
        err.contains("ResourceExhausted") || err.to_lowercase().contains("overcommit"),
        "{err}"
    );

    // Thick replicas need real free space and occupy it.
    agent.cli_ok(&[
        "replica", "create", "k1", "--size", "256MiB", "--pool", "big",
    ])?;
    let replicas = agent.cli_json(&["replica", "list"])?;
    let k1 = replicas
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "k1")
        .cloned()
        .unwrap_or_default();
    assert!(
        k1["allocated_bytes"].as_u64().unwrap_or(0) >= 256 * MIB,
        "{k1}"
    );
    let t1 = replicas
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "t1")
        .cloned()
        .unwrap_or_default();
    assert!(
        t1["allocated_bytes"].as_u64().unwrap_or(u64::MAX) < MIB,
        "a thin replica starts empty: {t1}"
    );

    // Without --pool, the pool with most free space is chosen.
    agent.cli_ok(&["replica", "create", "auto", "--size", "64MiB", "--thin"])?;
    let replicas = agent.cli_json(&["replica", "list"])?;
    let auto = replicas
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "auto")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        auto["pool"], "small",
        "small has more free space (k1 is thick on big): {replicas}"
    );

    // Idempotent create; another size for the same name is refused.
    agent.cli_ok(&[
        "replica", "create", "k1", "--size", "256MiB", "--pool", "big",
    ])?;
    let dup = agent.cli(&["replica", "create", "k1", "--size", "128MiB"])?;
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));

    // Bad names and sizes are refused with a clear error, nothing created.
    for (name, size) in [("../etc", "1MiB"), ("ok", "1000"), ("", "1MiB")] {
        let out = agent.cli(&["replica", "create", name, "--size", size])?;
        assert!(!out.status.success(), "{name:?} {size} must be refused");
    }
    let out = agent.cli(&["replica", "create", "x", "--size", "lots"])?;
    assert!(!out.status.success());
    assert_eq!(
        agent
            .cli_json(&["replica", "list"])?
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // Grow (only up), and it shows in the export size.
    agent.cli_ok(&["replica", "grow", "auto", "--size", "128MiB"])?;
    assert!(
        !agent
            .cli(&["replica", "grow", "auto", "--size", "64MiB"])?
            .status
            .success()
    );
    let uri = agent.cli_ok(&[
        "export",
        "start",
        "auto",
        "--socket",
        &dir.join("g.sock").to_string_lossy(),
    ])?;
    let info = run_ok(Command::new("nbdinfo").args(["--size"]).arg(uri.trim()), T)?;
    assert_eq!(info.trim(), (128 * MIB).to_string());

    // An exported replica cannot be destroyed; after stop it can.
    let busy = agent.cli(&["replica", "destroy", "auto"])?;
    assert!(
        !busy.status.success(),
        "destroying an exported replica must fail"
    );
    agent.cli_ok(&["export", "stop", "auto"])?;
    agent.cli_ok(&["replica", "destroy", "auto"])?;
    agent.cli_ok(&["replica", "destroy", "auto"])?; // idempotent
    assert_eq!(
        agent
            .cli_json(&["replica", "list"])?
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    Ok(())
}
