//! Removing what a local cluster left in the kernel: volumes its node
//! plugins left staged, mounts under its directory and loop devices backed
//! by files under it.
//!
//! Agents unmount their pools and detach their loop devices when they stop
//! cleanly; this is for agents that were killed. It must never touch a
//! mount or a loop device outside the cluster directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::mount::{MntFlags, umount2};

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|mount| mount.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    mounts
}

/// Loop devices (`/dev/loopN`) whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut loops = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing
            .trim_end_matches('\n')
            .trim_end_matches(" (deleted)");
        if Path::new(backing).starts_with(dir) {
            loops.push(PathBuf::from(format!("/dev/{name}")));
        }
    }
    loops.sort();
    loops
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
        for mount in mounts {
            if umount2(&mount, MntFlags::empty()).is_err() {
                let _ = umount2(&mount, MntFlags::MNT_DETACH);
            }
        }
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
    let devices: Vec<String> = loops.iter().filter_map(|l| device_number(l)).collect();
    let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let number = fields.nth(2)?;
            let mount_point = fields.nth(1)?;
            devices
                .iter()
                .any(|d| d == number)
                .then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    for mount in mounts {
        if umount2(&mount, MntFlags::empty()).is_err() {
            let _ = umount2(&mount, MntFlags::MNT_DETACH);
        }
    }
    detach_loops(&loops);
    for mount in mounts_under(state_dir) {
        if umount2(&mount, MntFlags::empty()).is_err() {
            let _ = umount2(&mount, MntFlags::MNT_DETACH);
        }
    }
}

/// `MAJOR:MINOR` of a block device, as `/sys/block/NAME/dev` and the
/// third field of `/proc/self/mountinfo` write it.
fn device_number(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let number = fs::read_to_string(format!("/sys/block/{name}/dev")).ok()?;
    Some(number.trim().to_string())
}

/// Detaches loop devices with `losetup -d`, ignoring failures.
fn detach_loops(loops: &[PathBuf]) {
    for device in loops {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(device)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Decodes the octal escapes of `/proc/self/mountinfo` (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = field
                .get(i + 1..i + 4)
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/var/tmp/a\040b"), "/var/tmp/a b");
        assert_eq!(unescape(r"/x\134y"), r"/x\y");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn nothing_outside_the_directory_is_listed() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(mounts_under(dir.path()).is_empty());
        assert!(loops_under(dir.path()).is_empty());
    }
}
