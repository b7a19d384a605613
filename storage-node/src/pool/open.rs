//! How a pool source becomes a mounted pool: reuse a mount left by a killed
//! agent, import a Ballast pool, or format a blank device.
//!
//! Every path to `mkfs.xfs` goes through the signature check in
//! [`open_device`]; `force_format` is the only way past it.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tracing::{info, warn};

use super::label::{self, PoolLabel};
use super::signature::{self, XFS_LABEL};
use super::{
    Error, MKFS_TIMEOUT, PoolConfig, REPLICAS_DIR, SNAPSHOTS_DIR, TOOL_TIMEOUT, mountinfo,
    validate_name,
};
use crate::durable;
use crate::host::command;

/// Opens the pool on a resolved block device; returns its label and mount path.
pub(super) fn open_device(
    pools_dir: &Path,
    name: &str,
    config: &PoolConfig,
    device: &Path,
) -> Result<(PoolLabel, PathBuf), Error> {
    let dev = device_number(device)?;
    let mounts = mountinfo::read().map_err(Error::MountTable)?;
    let mounted: Vec<_> = mounts.iter().filter(|m| m.dev() == dev).collect();
    if let Some(ours) = mounted
        .iter()
        .find(|m| m.mount_point.parent() == Some(pools_dir) && m.fs_type == "xfs")
    {
        info!(pool.name = %name, mount = %ours.mount_point.display(), "Pool already mounted; reusing the mount");
        return adopt(pools_dir, &ours.mount_point, config, device)?.ok_or_else(|| {
            Error::UnlabelledFilesystem {
                device: device.to_owned(),
            }
        });
    }
    if let Some(elsewhere) = mounted.first() {
        return Err(Error::DeviceInUse {
            device: device.to_owned(),
            mount_point: elsewhere.mount_point.clone(),
        });
    }

    match signature::classify(signature::probe(device)?) {
        signature::Contents::Blank => format(pools_dir, name, device, false),
        signature::Contents::BallastXfs => {
            let target = mount_new(pools_dir, name, device)?;
            match adopt(pools_dir, &target, config, device) {
                Ok(Some(opened)) => Ok(opened),
                Ok(None) => {
                    unmount(&target)?;
                    if config.force_format {
                        warn!(pool.name = %name, device = %device.display(), "Reformatting an unlabelled Ballast XFS because force_format is set");
                        format(pools_dir, name, device, true)
                    } else {
                        Err(Error::UnlabelledFilesystem {
                            device: device.to_owned(),
                        })
                    }
                }
                Err(e) => {
                    if let Err(u) = unmount(&target) {
                        warn!(mount = %target.display(), error = %u, "Cannot unmount after a failed import");
                    }
                    Err(e)
                }
            }
        }
        signature::Contents::Foreign(signatures) => {
            if !config.force_format {
                return Err(Error::ForeignSignature {
                    device: device.to_owned(),
                    signatures,
                });
            }
            warn!(
                pool.name = %name,
                device = %device.display(),
                signatures = %signature::describe(&signatures),
                "Formatting over existing signatures because force_format is set"
            );
            format(pools_dir, name, device, true)
        }
    }
}

/// Takes over a mounted Ballast XFS: reads its label, moves the mount to the
/// label's name if needed. Returns `None` for a filesystem that is not a pool
/// (no label, not empty); it is left mounted for the caller to deal with.
fn adopt(
    pools_dir: &Path,
    mount_path: &Path,
    config: &PoolConfig,
    device: &Path,
) -> Result<Option<(PoolLabel, PathBuf)>, Error> {
    let mounted_as = mount_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let label = match label::read(mount_path)? {
        Some(label) => label,
        None if is_empty_dir(mount_path)? => {
            // mkfs and mount happened but the agent died before writing the
            // label: nothing can be in an empty filesystem, so finish the job.
            info!(pool.name = %mounted_as, "Completing an interrupted format: writing the pool label");
            let label = PoolLabel::new(&mounted_as);
            label::write(mount_path, &label)?;
            label
        }
        None => return Ok(None),
    };
    validate_name(&label.name)?;
    if let Some(configured) = &config.name
        && *configured != label.name
    {
        warn!(pool.name = %label.name, configured = %configured, "Configured pool name differs from the pool label; the label wins");
    }
    let mount_path = if label.name == mounted_as {
        mount_path.to_owned()
    } else {
        unmount(mount_path)?;
        if let Err(e) = fs::remove_dir(mount_path) {
            warn!(path = %mount_path.display(), error = %e, "Cannot remove the old mount point");
        }
        mount_new(pools_dir, &label.name, device)?
    };
    create_dir(&mount_path.join(REPLICAS_DIR))?;
    create_dir(&mount_path.join(SNAPSHOTS_DIR))?;
    Ok(Some((label, mount_path)))
}

/// Formats `device`, mounts it and writes a new label.
fn format(
    pools_dir: &Path,
    name: &str,
    device: &Path,
    force: bool,
) -> Result<(PoolLabel, PathBuf), Error> {
    // A name taken by another pool is found before the device is touched.
    free_mount_point(pools_dir, name)?;
    if force {
        // mkfs.xfs -f leaves signatures it does not overwrite (a GPT backup
        // header at the end of the disk); wiping them keeps the next start-up
        // from refusing our own pool.
        command::run_blocking(
            "wipefs",
            ["--all".as_ref(), device.as_os_str()],
            TOOL_TIMEOUT,
        )?;
    }
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "-m".as_ref(),
        "reflink=1".as_ref(),
        "-L".as_ref(),
        XFS_LABEL.as_ref(),
    ];
    if force {
        args.push("-f".as_ref());
    }
    args.push(device.as_os_str());
    info!(pool.name = %name, device = %device.display(), "Formatting pool with XFS");
    command::run_blocking("mkfs.xfs", args, MKFS_TIMEOUT)?;
    let target = mount_new(pools_dir, name, device)?;
    let label = PoolLabel::new(name);
    let labelled = label::write(&target, &label)
        .and_then(|()| create_dir(&target.join(REPLICAS_DIR)))
        .and_then(|()| create_dir(&target.join(SNAPSHOTS_DIR)));
    if let Err(e) = labelled {
        if let Err(u) = unmount(&target) {
            warn!(mount = %target.display(), error = %u, "Cannot unmount after a failed format");
        }
        return Err(e);
    }
    Ok((label, target))
}

/// Creates `<pools_dir>/<name>` and checks that nothing is mounted there.
fn free_mount_point(pools_dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let target = pools_dir.join(name);
    create_dir(&target)?;
    let mounts = mountinfo::read().map_err(Error::MountTable)?;
    if let Some(other) = mountinfo::at(&mounts, &target).last() {
        return Err(Error::MountPointBusy {
            path: target,
            mounted: other.source.clone(),
        });
    }
    Ok(target)
}

/// Mounts `device` at `<pools_dir>/<name>`, which must not be a mount point.
fn mount_new(pools_dir: &Path, name: &str, device: &Path) -> Result<PathBuf, Error> {
    let target = free_mount_point(pools_dir, name)?;
    nix::mount::mount(
        Some(device),
        &target,
        Some("xfs"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|source| Error::Mount {
        device: device.to_owned(),
        target: target.clone(),
        source,
    })?;
    Ok(target)
}

/// How long [`unmount`] retries a busy filesystem.
const UNMOUNT_BUSY_TIMEOUT: Duration = Duration::from_secs(3);

/// Unmounts `target`, retrying for a while if it is busy.
///
/// A filesystem is briefly busy after its last file is closed if another
/// thread forked a child in between: the child holds copies of every open
/// file until its `exec` closes them. Any real holder (an open replica, an
/// export) keeps it busy past the timeout and the error is returned.
pub(super) fn unmount(target: &Path) -> Result<(), Error> {
    let deadline = Instant::now() + UNMOUNT_BUSY_TIMEOUT;
    loop {
        match nix::mount::umount2(target, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(Errno::EBUSY) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(Error::Unmount {
                    target: target.to_owned(),
                    source,
                });
            }
        }
    }
}

/// Creates a directory (and parents) durably.
pub(super) fn create_dir(path: &Path) -> Result<(), Error> {
    let made = fs::create_dir_all(path).and_then(|()| match path.parent() {
        Some(parent) => durable::sync_dir(parent),
        None => Ok(()),
    });
    made.map_err(|source| Error::CreateDir {
        path: path.to_owned(),
        source,
    })
}

fn is_empty_dir(path: &Path) -> Result<bool, Error> {
    let mut entries = fs::read_dir(path).map_err(|source| Error::Source {
        path: path.to_owned(),
        source,
    })?;
    Ok(entries.next().is_none())
}

/// Checks that `path` is a block device and returns its canonical path.
pub(super) fn block_device(path: &Path) -> Result<PathBuf, Error> {
    let meta = source_metadata(path)?;
    if !meta.file_type().is_block_device() {
        return Err(Error::WrongSourceType {
            path: path.to_owned(),
            expected: "block device",
        });
    }
    fs::canonicalize(path).map_err(|source| Error::Source {
        path: path.to_owned(),
        source,
    })
}

/// Returns the (major, minor) of a block device, as the mount table shows it.
fn device_number(device: &Path) -> Result<u64, Error> {
    Ok(source_metadata(device)?.rdev())
}

/// Creates a missing pool file (sparse) or checks an existing one; returns its
/// canonical path.
pub(super) fn prepare_file(path: &Path, size_bytes: Option<u64>) -> Result<PathBuf, Error> {
    if let Some(size_bytes) = size_bytes
        && (size_bytes == 0 || !size_bytes.is_multiple_of(4096))
    {
        return Err(Error::InvalidSize {
            path: path.to_owned(),
            size_bytes,
        });
    }
    let io_err = |source| Error::Source {
        path: path.to_owned(),
        source,
    };
    match fs::metadata(path) {
        Ok(meta) => {
            if !meta.is_file() {
                return Err(Error::WrongSourceType {
                    path: path.to_owned(),
                    expected: "regular file",
                });
            }
            if let Some(configured_bytes) = size_bytes
                && configured_bytes != meta.len()
            {
                return Err(Error::FileSizeMismatch {
                    path: path.to_owned(),
                    actual_bytes: meta.len(),
                    configured_bytes,
                });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let size_bytes = size_bytes.ok_or_else(|| Error::SizeRequired {
                path: path.to_owned(),
            })?;
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_err)?;
            file.set_len(size_bytes).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            info!(file = %path.display(), size_bytes, "Created sparse pool file");
        }
        Err(e) => return Err(io_err(e)),
    }
    fs::canonicalize(path).map_err(io_err)
}

fn source_metadata(path: &Path) -> Result<fs::Metadata, Error> {
    fs::metadata(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            Error::SourceNotFound {
                path: path.to_owned(),
            }
        } else {
            Error::Source {
                path: path.to_owned(),
                source,
            }
        }
    })
}
