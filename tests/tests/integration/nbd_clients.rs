//! A replica exported over NBD, used by clients nobody here wrote.

use std::fs;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::harness::{Agent, GIB, MIB, TestDir, run, run_ok};

const T: Duration = Duration::from_secs(120);

#[test]
fn nbdinfo_sees_size_and_flags() -> Result<()> {
    let dir = TestDir::new("nbdinfo");
    let agent = Agent::start(&dir, GIB)?;
    let uri = agent.create_export("vol-a", "64MiB", &dir.join("a.sock"), true)?;
    assert_eq!(
        uri,
        format!("nbd+unix:///vol-a?socket={}", dir.join("a.sock").display())
    );

    let info: serde_json::Value =
        serde_json::from_str(&run_ok(Command::new("nbdinfo").arg("--json").arg(&uri), T)?)?;
    let export = &info["exports"][0];
    assert_eq!(info["protocol"], "newstyle-fixed");
    assert_eq!(export["export-name"], "vol-a");
    assert_eq!(export["export-size"], 64 * MIB);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);

    // The listing names the export.
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(&uri),
        T,
    )?;
    assert!(list.contains("\"vol-a\""), "nbdinfo --list: {list}");
    Ok(())
}

#[test]
fn qemu_io_writes_and_reads_patterns() -> Result<()> {
    let dir = TestDir::new("qemu-io");
    let agent = Agent::start(&dir, GIB)?;
    let uri = agent.create_export("vol-q", "64MiB", &dir.join("q.sock"), true)?;

    let qemu_io = |cmds: &[&str]| -> Result<std::process::Output> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        cmd.arg(&uri);
        run(&mut cmd, T)
    };
    let out = qemu_io(&[
        "write -P 0xab 0 64k",
        "write -P 0xcd 1M 4k",
        "write -P 0x11 513 1000", // unaligned
        "writev -P 0x22 8M 4k 12k",
        "write -z 16M 1M",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("error"), "{text}");

    let out = qemu_io(&[
        "read -P 0xab 0 513",
        "read -P 0x11 513 1000",
        "read -P 0xab 1513 64023",
        "read -P 0xcd 1M 4k",
        "read -P 0x22 8M 16k",
        "read -P 0 16M 1M",
        "read -P 0 63M 1M",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "{text}");

    // A wrong pattern must be detected: the check above can fail.
    let out = qemu_io(&["read -P 0x99 0 4k"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Pattern verification failed"), "{text}");
    Ok(())
}

#[test]
fn qemu_img_and_nbdcopy_copy_images_in_and_out() -> Result<()> {
    let dir = TestDir::new("qemu-img");
    let agent = Agent::start(&dir, GIB)?;
    let uri = agent.create_export("vol-i", "48MiB", &dir.join("i.sock"), true)?;

    // A source image with data, holes and a pattern that shifts per block.
    let src = dir.join("src.img");
    let mut data = vec![0u8; (48 * MIB) as usize];
    let mut x: u32 = 0x2545_f491;
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 5 == 3 {
            continue; // leave zero runs
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    fs::write(&src, &data)?;

    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    )?;
    let cmp = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    )?;
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );

    // Copy out with nbdcopy over 4 connections (multi-conn) and compare bytes.
    let out = dir.join("out.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections", "4", "--requests", "16"])
            .arg(&uri)
            .arg(&out),
        T,
    )?;
    assert!(
        fs::read(&out)? == data,
        "nbdcopy output differs from the source image"
    );

    // Changing one byte in the export makes compare fail: the check is real.
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 4096 512"])
            .arg(&uri),
        T,
    )?;
    let cmp = run(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    )?;
    assert!(
        !cmp.status.success(),
        "qemu-img compare missed a changed sector"
    );
    Ok(())
}

#[test]
fn fio_nbd_engine_verifies_with_several_jobs() -> Result<()> {
    let dir = TestDir::new("fio");
    let agent = Agent::start(&dir, GIB)?;
    let uri = agent.create_export("vol-f", "256MiB", &dir.join("f.sock"), true)?;

    // Four jobs on disjoint 32 MiB regions, mixed block sizes, write then
    // verify every block with crc32c.
    let out = run_ok(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=16",
                "--numjobs=4",
                "--size=32M",
                "--offset_increment=32M",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ])
            .arg(format!("--uri={uri}")),
        Duration::from_secs(300),
    )?;
    let json_start = out.find('{').unwrap_or(0);
    let report: serde_json::Value = serde_json::from_str(&out[json_start..])?;
    let jobs = report["jobs"].as_array().cloned().unwrap_or_default();
    assert_eq!(jobs.len(), 4, "{out}");
    for job in &jobs {
        assert_eq!(job["error"], 0, "job error in {job}");
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(written, 32 * MIB, "each job writes its whole region");
        let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
        assert!(verified >= 32 * MIB, "verify phase read {verified} bytes");
    }
    Ok(())
}
