//! Loop devices for file-backed (development) pools, through `losetup`.
//!
//! `losetup` rather than the loop ioctls: it already handles the race for a
//! free device (`LOOP_CTL_GET_FREE` then retry on `EBUSY`), the choice between
//! `LOOP_CONFIGURE` and the older `LOOP_SET_FD` + `LOOP_SET_STATUS64` on older
//! kernels, and finds attachments by the backing file's device and inode
//! rather than by path. Attaching happens once per pool at start-up, so the
//! cost of a process is irrelevant, and util-linux is already required for
//! `wipefs`. The ioctl route would add several `unsafe` blocks for no gain.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Error, TOOL_TIMEOUT};
use crate::host::command::run_blocking;

/// Returns the loop device already backed by `file`, if any.
///
/// An agent killed with SIGKILL leaves its loop devices attached; reusing them
/// rather than attaching a second one keeps one block device per pool file (two
/// would let the same XFS be mounted twice through different devices).
///
/// # Errors
///
/// Returns the error of running `losetup`.
pub(super) fn find_attached(file: &Path) -> Result<Option<PathBuf>, Error> {
    let out = run_blocking(
        "losetup",
        [
            "--list".as_ref(),
            "--noheadings".as_ref(),
            "--output".as_ref(),
            "NAME".as_ref(),
            "--associated".as_ref(),
            file.as_os_str(),
        ],
        TOOL_TIMEOUT,
    )?;
    let mut devices = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = devices.next().map(PathBuf::from);
    let others: Vec<&str> = devices.collect();
    if let Some(dev) = &first
        && !others.is_empty()
    {
        tracing::warn!(
            file = %file.display(),
            using = %dev.display(),
            others = ?others,
            "Pool file is attached to several loop devices"
        );
    }
    Ok(first)
}

/// Attaches `file` to a free loop device and returns the device path.
///
/// Direct I/O is requested so the pool's data is not cached twice (once for
/// the XFS on the loop device and once for the backing file); if the backing
/// filesystem refuses it the device is attached without.
///
/// # Errors
///
/// Returns the error of running `losetup`.
pub(super) fn attach(file: &Path) -> Result<PathBuf, Error> {
    let attach_with = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.push(file.as_os_str());
        run_blocking("losetup", args, TOOL_TIMEOUT)
    };
    let out = match attach_with(&["--direct-io=on"]) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "Direct I/O loop attach failed; retrying without");
            // A failure after the attach itself must not leave two devices.
            if let Some(dev) = find_attached(file)? {
                return Ok(dev);
            }
            attach_with(&[])?
        }
    };
    let dev = out.trim();
    if dev.is_empty() {
        return Err(Error::CommandOutput {
            command: "losetup --find --show",
            detail: "no device name printed".to_owned(),
        });
    }
    Ok(PathBuf::from(dev))
}

/// How long [`detach`] waits for the kernel to let go of a loop device.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Detaches a loop device and waits until it is gone.
///
/// While any process holds the device open (another `losetup --find` or
/// `blkid` scanning devices is enough), the kernel only marks it for
/// autoclear and detaches it on the last close. Waiting keeps a quick
/// re-open of the same pool file from reusing a device about to vanish.
///
/// # Errors
///
/// Returns the error of running `losetup --detach`, or
/// [`Error::DetachTimeout`] if the device is still attached after 10 s.
pub(super) fn detach(device: &Path) -> Result<(), Error> {
    run_blocking(
        "losetup",
        ["--detach".as_ref(), device.as_os_str()],
        TOOL_TIMEOUT,
    )?;
    let deadline = Instant::now() + DETACH_TIMEOUT;
    while backing_file(device).is_some() {
        if Instant::now() >= deadline {
            return Err(Error::DetachTimeout {
                device: device.to_owned(),
                waited: DETACH_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Returns the backing file of a loop device as the kernel reports it in
/// sysfs, or `None` for a device that is not a loop device or not attached.
pub(super) fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_str()?;
    if !name.starts_with("loop") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let path = text.trim_end_matches('\n');
    (!path.is_empty()).then(|| PathBuf::from(path))
}
