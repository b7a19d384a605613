//! Parses `/proc/self/mountinfo`: what is mounted where, from which device,
//! read-only or not. The kernel's table is the only source of truth for
//! mounts; the node plugin never keeps its own list.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;

/// One line of `/proc/self/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// Major device number of the mounted filesystem's device (`st_dev`).
    pub major: u32,
    /// Minor device number of the mounted filesystem's device.
    pub minor: u32,
    /// Path inside the source filesystem that is mounted (`/` for a whole
    /// filesystem; the device node's path for a bind-mounted device node).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub mount_options: String,
    /// Filesystem type (`ext4`, `xfs`, `fuse`, `devtmpfs`, ...).
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, `/dev/fuse`, ...).
    pub source: String,
    /// Superblock options.
    pub super_options: String,
}

impl MountEntry {
    /// True when this mount is read-only (`ro` among the per-mount options).
    pub fn read_only(&self) -> bool {
        self.mount_options.split(',').any(|o| o == "ro")
    }

    /// The mounted filesystem's device number, as `st_dev`/`st_rdev` use it.
    pub fn dev(&self) -> u64 {
        nix::sys::stat::makedev(u64::from(self.major), u64::from(self.minor))
    }
}

/// A line of mountinfo that does not have the documented shape.
#[derive(Debug, thiserror::Error)]
#[error("Malformed mountinfo line {line}: {text:?}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// The line.
    pub text: String,
}

/// Parses the whole text of a mountinfo file, in mount order (later entries
/// are mounted on top of earlier ones at the same mount point).
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| ParseError {
                line: i + 1,
                text: l.to_string(),
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let mount_id = fields.next()?.parse().ok()?;
    let parent_id = fields.next()?.parse().ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let mount_options = fields.next()?.to_string();
    // Optional fields ("shared:1", "master:2", ...) end with a lone "-".
    loop {
        if fields.next()? == "-" {
            break;
        }
    }
    let fs_type = fields.next()?.to_string();
    let source = unescape(fields.next()?).to_string_lossy().into_owned();
    let super_options = fields.next().unwrap_or_default().to_string();
    Some(MountEntry {
        mount_id,
        parent_id,
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`,
/// `\134`) in a mountinfo path.
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = (u32::from(oct[0] - b'0') << 6)
                    | (u32::from(oct[1] - b'0') << 3)
                    | u32::from(oct[2] - b'0');
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
42 22 0:39 / /var/lib/ballast/attach/pvc-1/fuse rw,nosuid,nodev,relatime - fuse /dev/fuse rw,user_id=0,group_id=0
50 22 7:3 / /var/lib/kubelet/stage\\040dir ro,relatime shared:5 master:2 - xfs /dev/loop3 ro,nouuid
51 22 0:5 /loop3 /var/lib/kubelet/pods/p/dev/vol rw,nosuid - devtmpfs udev rw,size=100k
";

    #[test]
    fn parses_fields_optional_tags_and_escapes() {
        let m = parse(SAMPLE).expect("parse");
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].fs_type, "fuse");
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/ballast/attach/pvc-1/fuse")
        );
        let stage = &m[2];
        assert_eq!(
            stage.mount_point,
            PathBuf::from("/var/lib/kubelet/stage dir")
        );
        assert_eq!((stage.major, stage.minor), (7, 3));
        assert_eq!(stage.fs_type, "xfs");
        assert_eq!(stage.source, "/dev/loop3");
        assert_eq!(stage.super_options, "ro,nouuid");
        assert!(stage.read_only());
        assert!(!m[1].read_only());
        assert_eq!(stage.dev(), nix::sys::stat::makedev(7, 3));
        assert_eq!(m[3].root, PathBuf::from("/loop3"));
    }

    #[test]
    fn rejects_malformed_lines() {
        let err = parse("22 1 8:1 / /\n").expect_err("too short");
        assert_eq!(err.line, 1);
        assert!(parse("x 1 8:1 / / rw - ext4 /dev/sda1 rw").is_err());
    }

    #[test]
    fn leaves_non_octal_backslashes_alone() {
        assert_eq!(unescape(r"a\b\0"), PathBuf::from(r"a\b\0"));
        assert_eq!(unescape(r"a\134b"), PathBuf::from(r"a\b"));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/var/tmp/a\040b"), PathBuf::from("/var/tmp/a b"));
        assert_eq!(unescape(r"/x\134y"), PathBuf::from(r"/x\y"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
        assert_eq!(unescape(r"/trailing\04"), PathBuf::from(r"/trailing\04"));
    }
}
