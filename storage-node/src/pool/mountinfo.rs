//! Reads `/proc/self/mountinfo` to find where a pool device is mounted.
//!
//! The agent restarted after SIGKILL finds its pools still mounted; mounting
//! again would stack a second mount of the same XFS on the same path.

use std::io;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// Device number (`major`, `minor`) of the mounted filesystem.
    pub(super) dev: (u64, u64),
    /// Where it is mounted, unescaped.
    pub(super) mount_point: PathBuf,
    /// Filesystem type, e.g. `xfs`.
    pub(super) fs_type: String,
    /// Mount source as the kernel reports it, e.g. `/dev/loop3`.
    pub(super) source: String,
}

/// Reads and parses the mount table of the agent's mount namespace.
///
/// # Errors
///
/// Returns the error of reading `/proc/self/mountinfo`.
pub(super) fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Returns the entries mounted exactly at `path`, topmost last.
pub(super) fn at<'a>(mounts: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    mounts.iter().filter(|m| m.mount_point == path).collect()
}

/// Parses mountinfo text, skipping lines it cannot understand.
fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // Fields: id parent major:minor root mount_point options [optional...] - fstype source super_options
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split(' ').collect();
    let (major, minor) = head.get(2)?.split_once(':')?;
    let mount_point = unescape(head.get(4)?);
    let mut tail = tail.split(' ');
    let fs_type = tail.next()?.to_owned();
    let source = unescape(tail.next()?);
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        mount_point: PathBuf::from(mount_point),
        fs_type,
        source,
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes.get(i + 1..i + 4)
            && code.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = code
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 7:3 / /var/lib/ballast/pools/pool\\040a rw,noatime shared:5 - xfs /dev/loop3 rw,inode64
garbage line without separator
43 27 7:x / /bad rw - xfs /dev/loop4 rw
";

    #[test]
    fn parses_entries_and_unescapes_paths() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        let pool = &mounts[1];
        assert_eq!(pool.dev, (7, 3));
        assert_eq!(
            pool.mount_point,
            PathBuf::from("/var/lib/ballast/pools/pool a")
        );
        assert_eq!(pool.fs_type, "xfs");
        assert_eq!(pool.source, "/dev/loop3");
        assert_eq!(at(&mounts, Path::new("/")).len(), 1);
        assert!(at(&mounts, Path::new("/bad")).is_empty());
    }

    #[test]
    fn unescape_leaves_invalid_escapes() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("a\\9zz"), "a\\9zz");
        assert_eq!(unescape("tail\\04"), "tail\\04");
    }

    #[test]
    fn reads_own_mount_table() {
        let mounts = read().expect("read mountinfo");
        assert!(!at(&mounts, Path::new("/")).is_empty(), "{mounts:?}");
    }
}
