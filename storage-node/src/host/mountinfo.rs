//! Parses `/proc/self/mountinfo`: what is mounted where, from which device,
//! read-only or not. The kernel's table is the only source of truth for
//! mounts; neither the agent (its pools) nor the node plugin (staged and
//! published volumes) keeps its own list.
//!
//! A line that does not have the shape proc(5) documents is an error, not
//! skipped: callers decide from this table whether a device is already
//! mounted (the agent adopts a pool mount instead of mounting the same XFS
//! a second time, the node plugin finds a volume already staged), and a
//! skipped line may be exactly the mount they look for. The kernel writes
//! this file; a line it wrote that we cannot read means the parser is wrong,
//! which should be loud rather than lead to a second mount.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt as _;
use std::path::{Path, PathBuf};

/// Where the kernel shows the calling process's mount namespace.
const MOUNTINFO: &str = "/proc/self/mountinfo";

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

/// Why the mount table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/proc/self/mountinfo` could not be read.
    #[error("Cannot read {MOUNTINFO}")]
    Read(#[source] io::Error),
    /// It has a line this parser does not understand.
    #[error("Cannot parse {MOUNTINFO}")]
    Parse(#[source] ParseError),
}

/// Reads and parses the mount table of the calling process's mount
/// namespace, in mount order. Blocks (a read of procfs, which is quick).
///
/// # Errors
///
/// [`Error::Read`] if the file cannot be read, [`Error::Parse`] for a
/// malformed line (see the module docs for why it is not skipped).
pub fn read() -> Result<Vec<MountEntry>, Error> {
    // Bytes, not a String: the kernel escapes only space, tab, newline and
    // backslash in paths, so a mount point that is not UTF-8 appears as is,
    // and must not make the whole table unreadable.
    let bytes = std::fs::read(MOUNTINFO).map_err(Error::Read)?;
    parse_bytes(&bytes).map_err(Error::Parse)
}

/// Returns the entries mounted exactly at `path`, topmost last.
pub fn at<'a>(mounts: &'a [MountEntry], path: &Path) -> Vec<&'a MountEntry> {
    mounts.iter().filter(|m| m.mount_point == path).collect()
}

/// Parses the whole text of a mountinfo file, in mount order (later entries
/// are mounted on top of earlier ones at the same mount point).
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    parse_bytes(text.as_bytes())
}

/// Parses the bytes of a mountinfo file, which need not be UTF-8: paths are
/// kept byte for byte; the other fields are ASCII when the kernel wrote
/// them.
pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<MountEntry>, ParseError> {
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| ParseError {
                line: i + 1,
                text: String::from_utf8_lossy(l).into_owned(),
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    let number = |field: &[u8]| std::str::from_utf8(field).ok()?.parse().ok();
    let text = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
    let mut fields = line.split(|&b| b == b' ');
    let mount_id = number(fields.next()?)?;
    let parent_id = number(fields.next()?)?;
    let device = fields.next()?;
    let colon = device.iter().position(|&b| b == b':')?;
    let (major, minor) = (&device[..colon], &device[colon + 1..]);
    let root = unescape(fields.next()?);
    let mount_point = unescape(fields.next()?);
    let mount_options = text(fields.next()?);
    // Optional fields ("shared:1", "master:2", ...) end with a lone "-".
    loop {
        if fields.next()? == b"-" {
            break;
        }
    }
    let fs_type = text(fields.next()?);
    let source = unescape(fields.next()?).to_string_lossy().into_owned();
    let super_options = fields.next().map(text).unwrap_or_default();
    Some(MountEntry {
        mount_id,
        parent_id,
        major: number(major)?,
        minor: number(minor)?,
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
fn unescape(bytes: &[u8]) -> PathBuf {
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
        assert_eq!(unescape(r"a\b\0".as_bytes()), PathBuf::from(r"a\b\0"));
        assert_eq!(unescape(r"a\134b".as_bytes()), PathBuf::from(r"a\b"));
    }

    /// Moved from the agent's copy of this parser, which skipped the
    /// malformed lines this one rejects.
    const AGENT_SAMPLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
42 27 7:3 / /var/lib/ballast/pools/pool\\040a rw,noatime shared:5 - xfs /dev/loop3 rw,inode64
";

    #[test]
    fn parses_entries_and_unescapes_paths() {
        let mounts = parse(AGENT_SAMPLE).expect("parse");
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        let pool = &mounts[1];
        assert_eq!((pool.major, pool.minor), (7, 3));
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
    fn a_malformed_line_anywhere_is_an_error_not_skipped() {
        for (bad, line) in [
            ("garbage line without separator\n", 3),
            ("43 27 7:x / /bad rw - xfs /dev/loop4 rw\n", 3),
        ] {
            let text = format!("{AGENT_SAMPLE}{bad}");
            let err = parse(&text).expect_err("malformed line");
            assert_eq!(err.line, line, "{err}");
        }
    }

    #[test]
    fn reads_own_mount_table() {
        let mounts = read().expect("read mountinfo");
        assert!(!at(&mounts, Path::new("/")).is_empty(), "{mounts:?}");
    }

    /// Found by reading the kernel's escaping rules while writing the
    /// mountinfo fuzz target: only space, tab, newline and backslash are
    /// escaped, so a mount point that is not UTF-8 is in the file as is.
    /// It made the whole table unreadable (`read_to_string` failed), and
    /// with it every pool open and volume stage on the node.
    #[test]
    fn a_mount_point_that_is_not_utf8_is_kept_byte_for_byte() {
        use std::os::unix::ffi::OsStrExt as _;
        let text = b"27 1 254:0 / / rw - ext4 /dev/vda rw\n\
            68 27 0:40 / /tmp/x\xff\\040y rw,relatime - tmpfs none rw\n";
        let mounts = parse_bytes(text).expect("parse");
        assert_eq!(mounts.len(), 2);
        assert_eq!(
            mounts[1].mount_point.as_os_str().as_bytes(),
            b"/tmp/x\xff y"
        );
        assert_eq!(mounts[1].fs_type, "tmpfs");
        assert!(parse_bytes(b"68 27 0:40 / /x\xff rw\n").is_err());
    }

    /// The same, through the kernel: a tmpfs mounted at a non-UTF-8 path
    /// (needs root, as the other mount tests).
    #[test]
    fn reads_own_mount_table_with_a_mount_point_that_is_not_utf8() {
        use std::os::unix::ffi::OsStrExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let point = dir
            .path()
            .join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff"));
        std::fs::create_dir(&point).expect("mkdir");
        nix::mount::mount(
            Some("none"),
            &point,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount tmpfs");
        let mounts = read();
        nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        let mounts = mounts.expect("read mountinfo");
        assert_eq!(at(&mounts, &point).len(), 1, "{point:?} in {mounts:?}");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(
            unescape(r"/var/tmp/a\040b".as_bytes()),
            PathBuf::from("/var/tmp/a b")
        );
        assert_eq!(unescape(r"/x\134y".as_bytes()), PathBuf::from(r"/x\y"));
        assert_eq!(unescape("/plain".as_bytes()), PathBuf::from("/plain"));
        assert_eq!(
            unescape(r"/trailing\04".as_bytes()),
            PathBuf::from(r"/trailing\04")
        );
    }
}
