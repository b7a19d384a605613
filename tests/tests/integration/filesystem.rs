//! A filesystem on an exported replica: nbdfuse + loop device + mkfs.ext4 +
//! mount, as the node plugin will attach volumes on kernels without nbd.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::{Agent, Child, GIB, TestDir, run_ok, wait_for};

const T: Duration = Duration::from_secs(120);

/// An NBD export attached as a loop device through nbdfuse; detached on drop.
pub struct Attached {
    /// The loop device (`/dev/loopN`).
    pub device: PathBuf,
    fuse_dir: PathBuf,
    _nbdfuse: Child,
}

impl Attached {
    /// Attaches `uri` through nbdfuse at `fuse_dir` and a loop device.
    pub fn new(uri: &str, fuse_dir: &Path, log: &Path) -> Result<Self> {
        fs::create_dir_all(fuse_dir)?;
        let pidfile = fuse_dir.with_extension("pid");
        let nbdfuse = Child::spawn(
            "nbdfuse",
            Command::new("nbdfuse")
                .arg("-P")
                .arg(&pidfile)
                .arg(fuse_dir.join("nbd"))
                .arg(uri),
            log,
        )?;
        let file = fuse_dir.join("nbd");
        wait_for("nbdfuse to mount", Duration::from_secs(30), || {
            (pidfile.exists() && file.exists()).then_some(())
        })?;
        let device = run_ok(
            Command::new("losetup")
                .args(["--find", "--show", "--direct-io=off"])
                .arg(&file),
            T,
        )?;
        Ok(Self {
            device: PathBuf::from(device.trim()),
            fuse_dir: fuse_dir.to_path_buf(),
            _nbdfuse: nbdfuse,
        })
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
    }
}

fn mount(device: &Path, target: &Path) -> Result<()> {
    fs::create_dir_all(target)?;
    run_ok(Command::new("mount").arg(device).arg(target), T).map(|_| ())
}

fn umount(target: &Path) -> Result<()> {
    run_ok(Command::new("umount").arg(target), T).map(|_| ())
}

#[test]
fn ext4_on_nbdfuse_loop_survives_remount() -> Result<()> {
    let dir = TestDir::new("ext4");
    let agent = Agent::start(&dir, GIB)?;
    let uri = agent.create_export("vol-fs", "256MiB", &dir.join("fs.sock"), true)?;
    let attached = Attached::new(&uri, &dir.join("fuse"), &dir.join("nbdfuse.log"))?;

    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&attached.device),
        T,
    )?;
    let mnt = dir.join("mnt");
    mount(&attached.device, &mnt)?;
    let mut expected = Vec::new();
    for i in 0..20u32 {
        let body: Vec<u8> = (0..(i * 7919 + 100))
            .map(|j| (j.wrapping_mul(31) ^ i) as u8)
            .collect();
        let path = mnt.join(format!("file-{i}"));
        fs::write(&path, &body)?;
        expected.push((format!("file-{i}"), body));
    }
    run_ok(&mut Command::new("sync"), T)?;
    umount(&mnt)?;

    // fsck finds a clean filesystem, then a remount shows every file intact.
    run_ok(
        Command::new("fsck.ext4")
            .args(["-n", "-f"])
            .arg(&attached.device),
        T,
    )?;
    mount(&attached.device, &mnt)?;
    for (name, body) in &expected {
        let got = fs::read(mnt.join(name)).with_context(|| format!("reading {name}"))?;
        assert!(&got == body, "{name} differs after remount");
    }
    umount(&mnt)?;
    drop(attached);

    // And again through a fresh attachment after the export restarted.
    agent.cli_ok(&["export", "stop", "vol-fs"])?;
    let uri = agent.cli_ok(&[
        "export",
        "start",
        "vol-fs",
        "--socket",
        &dir.join("fs2.sock").to_string_lossy(),
    ])?;
    let attached = Attached::new(uri.trim(), &dir.join("fuse2"), &dir.join("nbdfuse.log"))?;
    mount(&attached.device, &mnt)?;
    for (name, body) in &expected {
        assert!(
            &fs::read(mnt.join(name))? == body,
            "{name} differs after re-export"
        );
    }
    umount(&mnt)?;
    Ok(())
}
