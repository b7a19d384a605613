//! Filesystems on attached volumes: detect, create, mount, bind-mount,
//! unmount, grow and measure.
//!
//! This module owns every mount the node plugin makes (staging mounts,
//! publish bind mounts, raw-block bind mounts of device nodes) and the
//! creation of filesystems. It answers "what is mounted here" from the
//! kernel's mount table ([`mountinfo`]) and never from memory, so a
//! restarted plugin sees exactly what is there.
//!
//! # The rule it must never break
//!
//! A device that carries any signature — a filesystem, a partition table,
//! RAID or LVM metadata, anything `blkid -p` recognises, or a result blkid
//! calls ambivalent — is never formatted. Only [`Signature::Blank`] may be
//! passed to [`Mounter::mkfs`], and callers check it first (DESIGN.md,
//! safety invariant 6). `mkfs.ext4` is run without `-F` and `mkfs.xfs`
//! without `-f`, so the tools' own refusals (mounted device, existing
//! XFS) stay in force as a second guard.
//!
//! # Shape
//!
//! [`Mounter`] is a small trait so the stage and publish logic
//! (`node::staging`) can be unit-tested with a fake; [`SystemMounter`] is
//! the real one: `nix::mount` for mount and unmount, `blkid`, `mkfs.*`,
//! `dumpe2fs`, `xfs_db`, `e2fsck`, `resize2fs` and `xfs_growfs` as child
//! processes with deadlines, and blocking system calls on tokio's blocking
//! pool.
//!
//! # Growing
//!
//! ext4 grows online only with CAP_SYS_RESOURCE (the kernel's resize ioctl
//! checks it), which containers often drop; it always grows offline, on
//! the unmounted device ([`Mounter::grow_offline`]: `e2fsck -f -p`, then
//! `resize2fs`). XFS grows only mounted (`xfs_growfs`), with
//! CAP_SYS_ADMIN, which a node plugin has anyway.
//!
//! # Extending
//!
//! A new filesystem is a new [`FsType`] variant with its mkfs command, its
//! default mount options and its grow command in `system.rs`.

pub use ballast_storage_node::host::mountinfo;
mod system;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
pub use mountinfo::MountEntry;
pub use system::SystemMounter;

use crate::command;

/// A filesystem the node plugin can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (`mkfs.ext4`, grown online with `resize2fs`).
    Ext4,
    /// XFS (`mkfs.xfs`, grown online with `xfs_growfs`; at least 300 MiB).
    Xfs,
}

impl FsType {
    /// The filesystem used when a volume capability names none.
    pub const DEFAULT: FsType = FsType::Ext4;

    /// Parses a CSI `fs_type` (`"ext4"`, `"xfs"`); `None` for anything else.
    pub fn parse(name: &str) -> Option<FsType> {
        match name {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    /// The kernel's and blkid's name of the filesystem.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `blkid -p` finds at the start of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// No signature at all: the only state in which mkfs is allowed.
    Blank,
    /// A filesystem of this type (blkid's `TYPE`, e.g. `ext4`).
    Filesystem(String),
    /// Something that is not a filesystem but must not be overwritten
    /// either: a partition table, RAID/LVM/crypto metadata, or an
    /// ambivalent probe. The text says what.
    Other(String),
}

/// Whether a publish target is a directory (filesystem volumes) or a file
/// (raw block volumes: the device node is bind-mounted onto it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A directory.
    Directory,
    /// A regular file.
    File,
}

/// The size of a filesystem as its superblock records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGeometry {
    /// Filesystem blocks.
    pub blocks: u64,
    /// Bytes per filesystem block.
    pub block_size: u64,
}

impl FsGeometry {
    /// The filesystem's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }

    /// True when a device of `device_bytes` has room for at least one more
    /// whole block than the filesystem uses: growing would change
    /// something.
    pub fn smaller_than(&self, device_bytes: u64) -> bool {
        device_bytes >= self.bytes().saturating_add(self.block_size)
    }
}

/// Capacity of a mounted filesystem or a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeStats {
    /// Bytes in total.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Inodes (total, free, used); `None` for a raw block device.
    pub inodes: Option<InodeStats>,
}

/// Inode counts of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InodeStats {
    /// Inodes in total.
    pub total: u64,
    /// Free inodes.
    pub free: u64,
    /// Inodes in use.
    pub used: u64,
}

/// Errors of the mount layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op} {path}")]
    Sys {
        /// The call (`mount`, `umount2`, `statvfs`, `BLKGETSIZE64`, ...).
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A tool (`blkid`, `mkfs.*`, `resize2fs`, `xfs_growfs`) failed.
    #[error("Running a filesystem tool")]
    Command(#[source] command::Error),
    /// The mount table could not be read or parsed.
    #[error("Reading the mount table")]
    MountInfo(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A mount flag that the plugin does not accept (`bind`, `remount`,
    /// `move`), or an empty one.
    #[error("Mount flag {0:?} is not allowed")]
    MountFlag(String),
    /// blkid printed something it should not.
    #[error("Unexpected blkid output for {device}: {output}")]
    Probe {
        /// The probed device.
        device: PathBuf,
        /// What it printed.
        output: String,
    },
    /// A filesystem tool printed something the plugin cannot read.
    #[error("Unexpected {tool} output for {device}: {output}")]
    ToolOutput {
        /// The tool.
        tool: &'static str,
        /// The device it ran on.
        device: PathBuf,
        /// What it printed.
        output: String,
    },
    /// Growing was asked for a filesystem type the plugin cannot grow (or
    /// cannot grow in that state: XFS only grows mounted). The text names
    /// what, in the plural ("xfs filesystems while unmounted").
    #[error("Growing {0} is not supported")]
    ResizeUnsupported(String),
    /// The kernel refused ext4's online resize: the plugin lacks
    /// CAP_SYS_RESOURCE.
    #[error(
        "Growing the mounted ext4 filesystem on {device} needs CAP_SYS_RESOURCE, which this node plugin lacks; unstage and stage the volume again to grow it offline"
    )]
    OnlineResizeNotPermitted {
        /// The device.
        device: PathBuf,
        /// resize2fs's failure.
        #[source]
        source: command::Error,
    },
    /// `e2fsck -f -p` found damage it cannot repair without a human; the
    /// filesystem is neither grown nor mounted.
    #[error("The filesystem check of {device} found errors it cannot fix: {output}")]
    Fsck {
        /// The device.
        device: PathBuf,
        /// e2fsck's exit code and output.
        output: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("Blocking task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Result of the mount layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = crate::error_chain(&e);
        match e {
            Error::MountFlag(_) => tonic::Status::invalid_argument(msg),
            // CSI spec, NodeExpandVolume: "Volume in use": the filesystem
            // cannot be grown while staged.
            Error::ResizeUnsupported(_) | Error::OnlineResizeNotPermitted { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            Error::Io { .. }
            | Error::Sys { .. }
            | Error::Command(_)
            | Error::MountInfo(_)
            | Error::Probe { .. }
            | Error::ToolOutput { .. }
            | Error::Fsck { .. }
            | Error::Join(_) => tonic::Status::internal(msg),
        }
    }
}

/// Mounts, filesystems and targets, as the stage and publish logic needs
/// them. Every method is idempotent where the description says so; none
/// keeps state between calls.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// Probes `device` for signatures without using blkid's cache.
    async fn probe(&self, device: &Path) -> Result<Signature>;

    /// Creates a filesystem on `device`. Callers must have seen
    /// [`Signature::Blank`] from [`Mounter::probe`] first.
    async fn mkfs(&self, device: &Path, fs: FsType) -> Result<()>;

    /// Mounts the filesystem on `device` at `target` (an existing
    /// directory) with CSI mount flags, read-only if asked.
    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        flags: &[String],
        read_only: bool,
    ) -> Result<()>;

    /// Bind-mounts `source` (a directory, or a device node) onto `target`
    /// (a directory, or a file); read-only takes a second remount, and if
    /// that fails the bind is undone.
    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;

    /// Unmounts the topmost mount at `target`.
    async fn unmount(&self, target: &Path) -> Result<()>;

    /// The kernel's mount table, in mount order.
    async fn mounts(&self) -> Result<Vec<MountEntry>>;

    /// The device number (`st_rdev`) of the device node at `path`.
    async fn device_number(&self, path: &Path) -> Result<u64>;

    /// Creates a publish target (and its parents) if it does not exist.
    async fn create_target(&self, path: &Path, kind: TargetKind) -> Result<()>;

    /// Removes a publish target (an empty directory or a file); a missing
    /// path is not an error. Never recursive.
    async fn remove_target(&self, path: &Path) -> Result<()>;

    /// Grows the filesystem of `fs_type` on `device`, mounted at
    /// `mount_path`, to fill the device, online. A filesystem that already
    /// fills its device is left as it is. ext4 without CAP_SYS_RESOURCE is
    /// [`Error::OnlineResizeNotPermitted`].
    async fn grow(&self, device: &Path, mount_path: &Path, fs_type: &str) -> Result<()>;

    /// The size of the filesystem `fs` on the unmounted `device`, from its
    /// superblock (a mounted filesystem's on-disk superblock may lag).
    async fn fs_geometry(&self, device: &Path, fs: FsType) -> Result<FsGeometry>;

    /// Grows the filesystem `fs` on the unmounted `device` to fill it:
    /// `e2fsck -f -p` (resize2fs insists on a checked filesystem), then
    /// `resize2fs`. Only ext4; XFS is [`Error::ResizeUnsupported`].
    async fn grow_offline(&self, device: &Path, fs: FsType) -> Result<()>;

    /// Bytes and inodes of the filesystem mounted at `path` (statvfs).
    async fn fs_stats(&self, path: &Path) -> Result<VolumeStats>;

    /// Size in bytes of the block device at `path` (BLKGETSIZE64).
    async fn block_size_bytes(&self, path: &Path) -> Result<u64>;

    /// The topmost mount at `path`, if any.
    async fn mounted_at(&self, path: &Path) -> Result<Option<MountEntry>> {
        let mounts = self.mounts().await?;
        Ok(mounts.into_iter().rev().find(|m| m.mount_point == path))
    }
}
