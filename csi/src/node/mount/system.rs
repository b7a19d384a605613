//! The real [`Mounter`]: system calls through `nix` on tokio's blocking
//! pool, filesystem tools as child processes with deadlines.

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use nix::mount::{MntFlags, MsFlags};

use super::{
    Error, FsGeometry, FsType, InodeStats, MountEntry, Mounter, Result, Signature, TargetKind,
    VolumeStats, command, mountinfo,
};

/// Deadline for `blkid`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for `mkfs.*`, `resize2fs` and `xfs_growfs`.
const FS_TOOL_TIMEOUT: Duration = Duration::from_secs(600);
/// blkid's exit code when it found no signature.
const BLKID_NOTHING_FOUND: i32 = 2;
/// blkid's exit code when probing was ambivalent (several signatures).
const BLKID_AMBIVALENT: i32 = 8;
/// e2fsck's exit codes below this mean "clean" (0), "errors corrected"
/// (1) or "corrected, reboot" (2, only meaningful for a mounted root).
const E2FSCK_UNCORRECTED: i32 = 4;
/// What resize2fs prints when the kernel refuses the online resize ioctl
/// (EPERM without CAP_SYS_RESOURCE).
const RESIZE2FS_EPERM: &str = "Permission denied to resize filesystem";

nix::ioctl_read!(
    /// `BLKGETSIZE64`: the size of a block device in bytes.
    blkgetsize64,
    0x12,
    114,
    u64
);

/// The real mount layer of a node. Stateless.
#[derive(Debug, Clone, Default)]
pub struct SystemMounter;

impl SystemMounter {
    /// Creates the mount layer.
    pub fn new() -> Self {
        SystemMounter
    }
}

/// Runs a blocking closure on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(Error::Join)?
}

/// Splits CSI mount flags into kernel mount flags and the filesystem's
/// data string, as mount(8) does. `bind`, `rbind`, `remount` and `move`
/// are refused: they would turn a mount into something else.
pub(super) fn split_flags(flags: &[String]) -> Result<(MsFlags, Vec<String>)> {
    let mut ms = MsFlags::empty();
    let mut data = Vec::new();
    for flag in flags.iter().flat_map(|f| f.split(',')) {
        let flag = flag.trim();
        match flag {
            "" => return Err(Error::MountFlag(flag.to_string())),
            "defaults" | "rw" | "async" | "suid" | "dev" | "exec" | "atime" | "diratime"
            | "nostrictatime" | "nolazytime" | "loud" => {}
            "ro" => ms |= MsFlags::MS_RDONLY,
            "nosuid" => ms |= MsFlags::MS_NOSUID,
            "nodev" => ms |= MsFlags::MS_NODEV,
            "noexec" => ms |= MsFlags::MS_NOEXEC,
            "sync" => ms |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => ms |= MsFlags::MS_DIRSYNC,
            "noatime" => ms |= MsFlags::MS_NOATIME,
            "nodiratime" => ms |= MsFlags::MS_NODIRATIME,
            "relatime" => ms |= MsFlags::MS_RELATIME,
            "strictatime" => ms |= MsFlags::MS_STRICTATIME,
            "lazytime" => ms |= MsFlags::MS_LAZYTIME,
            "silent" => ms |= MsFlags::MS_SILENT,
            "bind" | "rbind" | "remount" | "move" | "shared" | "rshared" | "private"
            | "rprivate" | "slave" | "rslave" | "unbindable" | "runbindable" => {
                return Err(Error::MountFlag(flag.to_string()));
            }
            other => data.push(other.to_string()),
        }
    }
    Ok((ms, data))
}

/// Reads blkid's `-o export` output into a [`Signature`].
pub(super) fn parse_blkid_export(device: &Path, output: &str) -> Result<Signature> {
    let mut ty = None;
    let mut usage = None;
    let mut pttype = None;
    for line in output.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => ty = Some(v.to_string()),
            Some(("USAGE", v)) => usage = Some(v.to_string()),
            Some(("PTTYPE", v)) => pttype = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(match (ty, usage, pttype) {
        (Some(t), None, _) => Signature::Filesystem(t),
        (Some(t), Some(u), _) if u == "filesystem" => Signature::Filesystem(t),
        (Some(t), Some(u), _) => Signature::Other(format!("{t} ({u})")),
        (None, _, Some(p)) => Signature::Other(format!("partition table ({p})")),
        (None, _, None) => {
            return Err(Error::Probe {
                device: device.to_path_buf(),
                output: output.to_string(),
            });
        }
    })
}

/// The value of the first line `<key><separator><number>` in a tool's
/// output (`Block count:   65536`, `dblocks = 81920`).
fn field(output: &str, key: &str, separator: char) -> Option<u64> {
    output.lines().find_map(|line| {
        let (k, v) = line.split_once(separator)?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// Reads the geometry of an ext4 filesystem from `dumpe2fs -h` or of an
/// XFS one from `xfs_db -r -c 'sb 0' -c 'print dblocks blocksize'`.
pub(super) fn parse_geometry(fs: FsType, output: &str) -> Option<FsGeometry> {
    let (blocks, block_size) = match fs {
        FsType::Ext4 => (
            field(output, "Block count", ':')?,
            field(output, "Block size", ':')?,
        ),
        FsType::Xfs => (
            field(output, "dblocks", '=')?,
            field(output, "blocksize", '=')?,
        ),
    };
    (block_size > 0).then_some(FsGeometry { blocks, block_size })
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[async_trait]
impl Mounter for SystemMounter {
    async fn probe(&self, device: &Path) -> Result<Signature> {
        let out = command::output(
            "blkid",
            [
                "-p".as_ref(),
                "-o".as_ref(),
                "export".as_ref(),
                device.as_os_str(),
            ],
            PROBE_TIMEOUT,
        )
        .await
        .map_err(Error::Command)?;
        match out.status.code() {
            Some(0) => parse_blkid_export(device, &String::from_utf8_lossy(&out.stdout)),
            Some(BLKID_NOTHING_FOUND) => Ok(Signature::Blank),
            Some(BLKID_AMBIVALENT) => Ok(Signature::Other(
                "several signatures (blkid is ambivalent)".to_string(),
            )),
            _ => Err(Error::Command(command::failed("blkid", &out))),
        }
    }

    async fn mkfs(&self, device: &Path, fs: FsType) -> Result<()> {
        // No -F / -f: see the module documentation.
        let (program, args): (&str, &[&str]) = match fs {
            FsType::Ext4 => ("mkfs.ext4", &["-q", "-E", "nodiscard"]),
            FsType::Xfs => ("mkfs.xfs", &["-q", "-K"]),
        };
        let mut argv: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        argv.push(device.as_os_str());
        command::run(program, argv, FS_TOOL_TIMEOUT)
            .await
            .map_err(Error::Command)?;
        Ok(())
    }

    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        flags: &[String],
        read_only: bool,
    ) -> Result<()> {
        let (mut ms, mut data) = split_flags(flags)?;
        if read_only {
            ms |= MsFlags::MS_RDONLY;
        }
        if fs_type == FsType::Xfs.as_str() && !data.iter().any(|d| d == "nouuid") {
            // Clones and restored snapshots share their source's XFS UUID;
            // without nouuid the second one on a node would not mount.
            data.push("nouuid".to_string());
        }
        let data = data.join(",");
        let (device, target, fs_type) = (
            device.to_path_buf(),
            target.to_path_buf(),
            fs_type.to_string(),
        );
        blocking(move || {
            nix::mount::mount(
                Some(device.as_path()),
                target.as_path(),
                Some(fs_type.as_str()),
                ms,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|source| Error::Sys {
                op: "mount",
                path: target.clone(),
                source,
            })
        })
        .await
    }

    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let (source, target) = (source.to_path_buf(), target.to_path_buf());
        blocking(move || {
            nix::mount::mount(
                Some(source.as_path()),
                target.as_path(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| Error::Sys {
                op: "bind mount",
                path: target.clone(),
                source: e,
            })?;
            if read_only {
                let remount = nix::mount::mount(
                    None::<&str>,
                    target.as_path(),
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                );
                if let Err(e) = remount {
                    let _ = nix::mount::umount2(target.as_path(), MntFlags::empty());
                    return Err(Error::Sys {
                        op: "remount read-only",
                        path: target.clone(),
                        source: e,
                    });
                }
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Path) -> Result<()> {
        let target = target.to_path_buf();
        blocking(move || {
            nix::mount::umount2(target.as_path(), MntFlags::empty()).map_err(|source| Error::Sys {
                op: "umount",
                path: target.clone(),
                source,
            })
        })
        .await
    }

    async fn mounts(&self) -> Result<Vec<MountEntry>> {
        tokio::task::spawn_blocking(mountinfo::read)
            .await
            .map_err(Error::Join)?
            .map_err(|e| Error::MountInfo(Box::new(e)))
    }

    async fn device_number(&self, path: &Path) -> Result<u64> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(io_err("stat", path))?;
        Ok(meta.rdev())
    }

    async fn create_target(&self, path: &Path, kind: TargetKind) -> Result<()> {
        let path = path.to_path_buf();
        blocking(move || match kind {
            TargetKind::Directory => {
                std::fs::create_dir_all(&path).map_err(io_err("create directory", &path))
            }
            TargetKind::File => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
                }
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    Err(e) => Err(io_err("create file", &path)(e)),
                }
            }
        })
        .await
    }

    async fn remove_target(&self, path: &Path) -> Result<()> {
        let path = path.to_path_buf();
        blocking(move || {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            let result = if meta.is_dir() {
                std::fs::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match result {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io_err("remove", &path)(e))
                }
                _ => Ok(()),
            }
        })
        .await
    }

    async fn grow(&self, device: &Path, mount_path: &Path, fs_type: &str) -> Result<()> {
        // Both tools leave a filesystem that already fills its device
        // alone and exit 0.
        match FsType::parse(fs_type) {
            Some(FsType::Ext4) => {
                command::run("resize2fs", [device.as_os_str()], FS_TOOL_TIMEOUT)
                    .await
                    .map_err(|e| match e {
                        command::Error::Failed { ref stderr, .. }
                            if stderr.contains(RESIZE2FS_EPERM) =>
                        {
                            Error::OnlineResizeNotPermitted {
                                device: device.to_path_buf(),
                                source: e,
                            }
                        }
                        other => Error::Command(other),
                    })?;
            }
            Some(FsType::Xfs) => {
                command::run("xfs_growfs", [mount_path.as_os_str()], FS_TOOL_TIMEOUT)
                    .await
                    .map_err(Error::Command)?;
            }
            None => {
                return Err(Error::ResizeUnsupported(format!("{fs_type} filesystems")));
            }
        }
        Ok(())
    }

    async fn fs_geometry(&self, device: &Path, fs: FsType) -> Result<FsGeometry> {
        let (tool, args): (&'static str, Vec<&std::ffi::OsStr>) = match fs {
            FsType::Ext4 => ("dumpe2fs", vec!["-h".as_ref(), device.as_os_str()]),
            FsType::Xfs => (
                "xfs_db",
                vec![
                    "-r".as_ref(),
                    "-c".as_ref(),
                    "sb 0".as_ref(),
                    "-c".as_ref(),
                    "print dblocks blocksize".as_ref(),
                    device.as_os_str(),
                ],
            ),
        };
        let output = command::run(tool, args, PROBE_TIMEOUT)
            .await
            .map_err(Error::Command)?;
        parse_geometry(fs, &output).ok_or_else(|| Error::ToolOutput {
            tool,
            device: device.to_path_buf(),
            output,
        })
    }

    async fn grow_offline(&self, device: &Path, fs: FsType) -> Result<()> {
        if fs != FsType::Ext4 {
            return Err(Error::ResizeUnsupported(format!(
                "{fs} filesystems while unmounted"
            )));
        }
        let out = command::output(
            "e2fsck",
            ["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
            FS_TOOL_TIMEOUT,
        )
        .await
        .map_err(Error::Command)?;
        match out.status.code() {
            Some(code) if code < E2FSCK_UNCORRECTED => {}
            code => {
                return Err(Error::Fsck {
                    device: device.to_path_buf(),
                    output: format!(
                        "exit code {code:?}: {} {}",
                        String::from_utf8_lossy(&out.stdout).trim(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        command::run("resize2fs", [device.as_os_str()], FS_TOOL_TIMEOUT)
            .await
            .map_err(Error::Command)?;
        Ok(())
    }

    async fn fs_stats(&self, path: &Path) -> Result<VolumeStats> {
        let path = path.to_path_buf();
        blocking(move || {
            let st = nix::sys::statvfs::statvfs(path.as_path()).map_err(|source| Error::Sys {
                op: "statvfs",
                path: path.clone(),
                source,
            })?;
            let frsize = st.fragment_size();
            let blocks = st.blocks();
            let free = st.blocks_free();
            Ok(VolumeStats {
                total_bytes: blocks.saturating_mul(frsize),
                available_bytes: st.blocks_available().saturating_mul(frsize),
                used_bytes: blocks.saturating_sub(free).saturating_mul(frsize),
                inodes: Some(InodeStats {
                    total: st.files(),
                    free: st.files_free(),
                    used: st.files().saturating_sub(st.files_free()),
                }),
            })
        })
        .await
    }

    async fn block_size_bytes(&self, path: &Path) -> Result<u64> {
        let path = path.to_path_buf();
        blocking(move || {
            let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
            let mut size: u64 = 0;
            // SAFETY: the fd is open for the duration of the call (`file`
            // lives until the end of the closure) and `size` is a valid,
            // writable u64, which is what BLKGETSIZE64 writes.
            unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }.map_err(|source| Error::Sys {
                op: "BLKGETSIZE64",
                path: path.clone(),
                source,
            })?;
            Ok(size)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_split_into_kernel_flags_and_data() {
        let flags = vec![
            "noatime,nodev".to_string(),
            "discard".to_string(),
            "ro".to_string(),
        ];
        let (ms, data) = split_flags(&flags).expect("valid flags");
        assert_eq!(
            ms,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(data, vec!["discard".to_string()]);
    }

    #[test]
    fn flags_that_change_the_kind_of_mount_are_refused() {
        for bad in ["bind", "remount", "rshared", ""] {
            assert!(
                matches!(split_flags(&[bad.to_string()]), Err(Error::MountFlag(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn filesystem_geometry_is_read_from_the_tools_output() {
        let dumpe2fs = "Filesystem volume name:   <none>\n\
                        Block count:              65536\n\
                        Reserved block count:     3276\n\
                        Block size:               1024\n";
        let ext4 = parse_geometry(FsType::Ext4, dumpe2fs).expect("ext4");
        assert_eq!((ext4.blocks, ext4.block_size), (65536, 1024));
        assert_eq!(ext4.bytes(), 64 << 20);
        assert!(!ext4.smaller_than(64 << 20));
        assert!(
            !ext4.smaller_than((64 << 20) + 1023),
            "not a whole block more"
        );
        assert!(ext4.smaller_than((64 << 20) + 1024));
        let xfs = parse_geometry(FsType::Xfs, "dblocks = 81920\nblocksize = 4096\n").expect("xfs");
        assert_eq!(xfs.bytes(), 320 << 20);
        assert_eq!(parse_geometry(FsType::Xfs, "dblocks = 81920\n"), None);
        assert_eq!(
            parse_geometry(FsType::Ext4, "Block count: x\nBlock size: 1024\n"),
            None
        );
        assert_eq!(
            parse_geometry(FsType::Ext4, "Block count: 1\nBlock size: 0\n"),
            None
        );
    }

    #[test]
    fn blkid_export_output_is_classified() {
        let dev = Path::new("/dev/x");
        let fs = "DEVNAME=/dev/x\nUUID=1\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(
            parse_blkid_export(dev, fs).expect("parse"),
            Signature::Filesystem("ext4".into())
        );
        let raid = "TYPE=linux_raid_member\nUSAGE=raid\n";
        assert_eq!(
            parse_blkid_export(dev, raid).expect("parse"),
            Signature::Other("linux_raid_member (raid)".into())
        );
        let table = "DEVNAME=/dev/x\nPTUUID=abc\nPTTYPE=gpt\n";
        assert_eq!(
            parse_blkid_export(dev, table).expect("parse"),
            Signature::Other("partition table (gpt)".into())
        );
        assert!(parse_blkid_export(dev, "DEVNAME=/dev/x\n").is_err());
    }
}
