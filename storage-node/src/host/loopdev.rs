//! Loop devices through `losetup`: the agent's file-backed (development)
//! pools, the node plugin's nbdfuse attachments, and cluster clean-up.
//! Every call runs `losetup` with a deadline ([`super::command`]); which
//! file backs a device is read from sysfs. Everything here blocks; async
//! callers use `spawn_blocking`.
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

use super::command::{self, run_blocking};

/// Deadline of one `losetup` call: an ioctl or two, so one that takes
/// longer hangs on a device that will not let go.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a loop device could not be set up or torn down.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `losetup` could not be run, failed or outlived its deadline.
    #[error("Cannot run losetup")]
    Command(#[from] command::Error),
    /// `losetup --find --show` succeeded but printed no device.
    #[error("losetup --find --show printed no device name")]
    NoDeviceName,
    /// A detached loop device is still attached after the wait.
    #[error("Loop device {} is still attached {waited:?} after detaching it", device.display())]
    DetachTimeout {
        /// The loop device.
        device: PathBuf,
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Returns the loop device already backed by `file`, if any.
///
/// An agent killed with SIGKILL leaves its loop devices attached; reusing them
/// rather than attaching a second one keeps one block device per pool file (two
/// would let the same XFS be mounted twice through different devices).
///
/// # Errors
///
/// Returns the error of running `losetup`.
pub fn find_attached(file: &Path) -> Result<Option<PathBuf>, Error> {
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

/// Attaches `file` to a free loop device without direct I/O (for a file
/// on FUSE, which does not take `O_DIRECT`) and returns the device path.
///
/// # Errors
///
/// Returns the error of running `losetup`, or [`Error::NoDeviceName`].
pub fn attach_buffered(file: &Path) -> Result<PathBuf, Error> {
    let out = run_blocking(
        "losetup",
        [
            "--find".as_ref(),
            "--show".as_ref(),
            "--direct-io=off".as_ref(),
            file.as_os_str(),
        ],
        TOOL_TIMEOUT,
    )?;
    device_name(&out)
}

fn device_name(out: &str) -> Result<PathBuf, Error> {
    let dev = out.trim();
    if dev.is_empty() {
        return Err(Error::NoDeviceName);
    }
    Ok(PathBuf::from(dev))
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
pub fn attach(file: &Path) -> Result<PathBuf, Error> {
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
    device_name(&out)
}

/// How long [`detach_and_wait`] waits for the kernel to let go of a loop
/// device.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// Detaches a loop device (`losetup --detach`) without waiting: while the
/// device is open the kernel only marks it for autoclear.
///
/// # Errors
///
/// Returns the error of running `losetup`.
pub fn detach(device: &Path) -> Result<(), Error> {
    run_blocking(
        "losetup",
        ["--detach".as_ref(), device.as_os_str()],
        TOOL_TIMEOUT,
    )?;
    Ok(())
}

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
pub fn detach_and_wait(device: &Path) -> Result<(), Error> {
    detach(device)?;
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
/// sysfs (without the ` (deleted)` the kernel appends for a removed file),
/// or `None` for a device that is not a loop device or not attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    backing_file_of(device.file_name()?.to_str()?)
}

/// [`backing_file`] by the device's name in `/sys/block` (`loop3`).
pub fn backing_file_of(name: &str) -> Option<PathBuf> {
    if !name.starts_with("loop") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    let path = text.strip_suffix(" (deleted)").unwrap_or(text);
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// Loop devices (`/dev/loopN`) whose backing file is under `dir`, sorted.
pub fn backed_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut loops: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let backing = backing_file_of(&name)?;
            backing
                .starts_with(dir)
                .then(|| PathBuf::from(format!("/dev/{name}")))
        })
        .collect();
    loops.sort();
    loops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_directory_backs_no_loop_device() {
        let empty = tempfile::tempdir().expect("temp dir");
        assert_eq!(backed_under(empty.path()), Vec::<PathBuf>::new());
        assert_eq!(backing_file(Path::new("/dev/null")), None);
    }
}
