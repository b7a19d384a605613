//! Removing what a local cluster left in the kernel: volumes its node
//! plugins left staged, mounts under its directory and loop devices backed
//! by files under it.
//!
//! Agents unmount their pools and detach their loop devices when they stop
//! cleanly; this is for agents that were killed. It must never touch a
//! mount or a loop device outside the cluster directory.

use std::fs;
use std::path::{Path, PathBuf};

use ballast_storage_node::host::loopdev;
use nix::mount::{MntFlags, umount2};

use crate::node::mount::MountEntry;
use crate::node::mount::mountinfo;

/// The kernel's mount table; empty if it cannot be read or parsed
/// (clean-up is best effort, and what is left is reported).
fn mount_table() -> Vec<MountEntry> {
    mountinfo::read().unwrap_or_default()
}

/// Mount points of `entries` that `keep` selects, deepest first.
fn deepest_first(entries: Vec<MountEntry>, keep: impl Fn(&MountEntry) -> bool) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = entries
        .into_iter()
        .filter(|m| keep(m))
        .map(|m| m.mount_point)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    deepest_first(mount_table(), |m| m.mount_point.starts_with(dir))
}

/// Loop devices (`/dev/loopN`) whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    loopdev::backed_under(dir)
}

/// Unmounts every mount under `dir` (lazily if a plain unmount fails) and
/// detaches every loop device backed by a file under `dir`. Returns what
/// is still left afterwards (mounts, then loop devices).
pub fn clean_under(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            break;
        }
        unmount(&mounts);
    }
    detach_loops(&loops_under(dir));
    // Detaching is asynchronous for a device still open somewhere; give
    // the kernel a moment before reporting leftovers.
    for _ in 0..20 {
        if loops_under(dir).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (mounts_under(dir), loops_under(dir))
}

/// Unstages whatever volumes a node plugin left attached: every mount of a
/// loop device whose backing file is under `state_dir` (the nbdfuse file),
/// wherever it is mounted (staging mounts and the bind mounts of publish),
/// is unmounted, deepest first; those loop devices are detached; then the
/// FUSE mounts under `state_dir` are unmounted, which ends their nbdfuse.
/// Best effort: what is left is reported by [`clean_under`] later.
pub fn detach_volumes(state_dir: &Path) {
    let loops = loops_under(state_dir);
    let devices: Vec<u64> = loops.iter().filter_map(|l| device_number(l)).collect();
    unmount(&deepest_first(mount_table(), |m| {
        devices.contains(&m.dev())
    }));
    detach_loops(&loops);
    unmount(&mounts_under(state_dir));
}

/// The device number of a block device node, as the mount table gives it.
fn device_number(device: &Path) -> Option<u64> {
    use std::os::unix::fs::FileTypeExt as _;
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata(device).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// Unmounts each of `mounts` in order, lazily if a plain unmount fails.
fn unmount(mounts: &[PathBuf]) {
    for mount in mounts {
        if umount2(mount, MntFlags::empty()).is_err() {
            let _ = umount2(mount, MntFlags::MNT_DETACH);
        }
    }
}

/// Detaches loop devices with `losetup -d` (each with a deadline),
/// ignoring failures.
fn detach_loops(loops: &[PathBuf]) {
    for device in loops {
        let _ = loopdev::detach(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_outside_the_directory_is_listed() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(mounts_under(dir.path()).is_empty());
    }
}
