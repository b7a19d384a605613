//! Pools: the node's disks, formatted with XFS and mounted under the agent's
//! state directory, where replicas live as files.
//!
//! A pool comes from a [`PoolSource`]: a block device, or for development a
//! sparse file attached to a loop device. [`Pool::open`] turns a source into a
//! mounted pool:
//!
//! 1. A device (or loop device) already mounted under `<state_dir>/pools/` is
//!    reused as it is: the agent was killed and restarted.
//! 2. Otherwise the device is probed for signatures (`wipefs`). A blank
//!    device is formatted (`mkfs.xfs -m reflink=1 -L ballast`), mounted at
//!    `<state_dir>/pools/<name>` and labelled with `ballast-pool.json`. An XFS
//!    filesystem labelled `ballast` that carries our pool label is imported:
//!    mounted, never reformatted.
//! 3. Anything else (a partition table, any other filesystem, an XFS that is
//!    not ours, LVM, RAID, swap...) is refused with an error naming what was
//!    found, unless the operator set `force_format`.
//!
//! The invariant this module exists to keep: **it never formats a device that
//! carries data** unless told to by an explicit force flag. Any new path that
//! reaches `mkfs` must go through the signature check first.
//!
//! A pool also accounts for its capacity: the replica catalog provisions bytes
//! through [`Pool::provision`], which enforces the overcommit limit and, for
//! thick replicas, the free space.
//!
//! Everything here blocks (mkfs, mount, losetup); async callers use
//! `spawn_blocking`. Dropping a [`Pool`] leaves it mounted, exactly as a crash
//! would; [`Pool::close`] is the clean shutdown.

mod label;
mod manager;
mod open;
mod signature;

use parking_lot::Mutex;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::mount::MntFlags;
use tracing::{info, warn};
use uuid::Uuid;

use crate::host::{loopdev, mountinfo};

pub use label::{LABEL_FILE, LABEL_FORMAT_VERSION, PoolLabel};
pub use manager::PoolManager;
pub use signature::{Signature, XFS_LABEL};

/// Default overcommit limit: thin replicas may provision up to twice the
/// pool's size.
pub const DEFAULT_OVERCOMMIT_PERCENT: u32 = 200;

/// Directory under the state directory where pools are mounted.
pub const POOLS_DIR: &str = "pools";

/// Directory at the root of a pool filesystem that holds replica files.
pub const REPLICAS_DIR: &str = "replicas";

/// Directory at the root of a pool filesystem that holds snapshot copies
/// (see [`crate::snapshot`]).
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// Deadline of `wipefs` and `losetup` calls: they only read a few sectors
/// or issue an ioctl, so one that takes longer hangs on a dying device.
const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Deadline of `mkfs.xfs`, which discards the whole device first (minutes
/// on a large SSD).
const MKFS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Longest pool name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Errors of pool operations.
///
/// For gRPC:
/// - `InvalidArgument`: `InvalidName`, `InvalidOvercommit`, `SizeRequired`,
///   `InvalidSize`, `FileSizeMismatch`, `WrongSourceType`.
/// - `NotFound`: `SourceNotFound`, `PoolNotFound`.
/// - `FailedPrecondition` (the device must not be touched, or the node is
///   misconfigured): `ForeignSignature`, `UnlabelledFilesystem`,
///   `DeviceInUse`, `MountPointBusy`, `UnsupportedLabelVersion`,
///   `DuplicatePool`, `PoolClosed`, `NoPools`.
/// - `ResourceExhausted`: `OvercommitLimit`, `InsufficientSpace`,
///   `NoPoolFits`.
/// - `Internal`: the rest (system calls and tools that failed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool name is empty, too long or has characters outside
    /// `[A-Za-z0-9._-]` (or starts with a dot).
    #[error("Invalid pool name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The overcommit percentage is zero.
    #[error("Invalid overcommit limit {percent}%: must be at least 1%")]
    InvalidOvercommit {
        /// The rejected percentage.
        percent: u32,
    },
    /// A pool file must be created but no size was given.
    #[error("Pool file {} does not exist and no pool size was given", path.display())]
    SizeRequired {
        /// The missing pool file.
        path: PathBuf,
    },
    /// A pool file size that is zero or not a multiple of 4096 bytes.
    #[error("Invalid pool size {size_bytes} bytes for {}: must be a positive multiple of 4096", path.display())]
    InvalidSize {
        /// The pool file.
        path: PathBuf,
        /// The rejected size in bytes.
        size_bytes: u64,
    },
    /// An existing pool file has another size than the configured one.
    #[error("Pool file {} is {actual_bytes} bytes, not the configured {configured_bytes}", path.display())]
    FileSizeMismatch {
        /// The pool file.
        path: PathBuf,
        /// Its size on disk in bytes.
        actual_bytes: u64,
        /// The configured size in bytes.
        configured_bytes: u64,
    },
    /// The configured device or file does not exist.
    #[error("Pool source {} does not exist", path.display())]
    SourceNotFound {
        /// The missing path.
        path: PathBuf,
    },
    /// A device source that is not a block device, or a file source that is
    /// not a regular file.
    #[error("Pool source {} is not a {expected}", path.display())]
    WrongSourceType {
        /// The source path.
        path: PathBuf,
        /// What it should have been: "block device" or "regular file".
        expected: &'static str,
    },
    /// The source could not be inspected or created.
    #[error("Cannot access pool source {}", path.display())]
    Source {
        /// The source path.
        path: PathBuf,
        /// The failed file operation.
        #[source]
        source: io::Error,
    },
    /// The device carries signatures and `force_format` is not set.
    #[error(
        "Device {} carries {}; refusing to format without --force-format",
        device.display(),
        signature::describe(signatures)
    )]
    ForeignSignature {
        /// The probed device.
        device: PathBuf,
        /// Everything found on it.
        signatures: Vec<Signature>,
    },
    /// A `ballast`-labelled XFS with files in it but no pool label.
    #[error(
        "Device {} holds an XFS filesystem labelled {XFS_LABEL:?} with files but no {LABEL_FILE}; refusing to import or format it without --force-format",
        device.display()
    )]
    UnlabelledFilesystem {
        /// The device.
        device: PathBuf,
    },
    /// The device is mounted somewhere outside the agent's pools directory.
    #[error("Device {} is in use: mounted at {}", device.display(), mount_point.display())]
    DeviceInUse {
        /// The device.
        device: PathBuf,
        /// One place where it is mounted.
        mount_point: PathBuf,
    },
    /// Another filesystem is already mounted where the pool should go.
    #[error("Mount point {} is already in use by {mounted}", path.display())]
    MountPointBusy {
        /// The pool's mount point.
        path: PathBuf,
        /// The source of the filesystem mounted there.
        mounted: String,
    },
    /// A pool file's loop device could not be attached or detached.
    #[error("Loop device")]
    LoopDevice(#[from] crate::host::loopdev::Error),
    /// The pool label exists but cannot be read or parsed.
    #[error("Cannot read pool label {}", path.display())]
    ReadLabel {
        /// The label file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pool label could not be written.
    #[error("Cannot write pool label {}", path.display())]
    WriteLabel {
        /// The label file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The pool label was written by a newer Ballast.
    #[error("Pool label {} has format version {version}; this agent reads up to {LABEL_FORMAT_VERSION}", path.display())]
    UnsupportedLabelVersion {
        /// The label file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// A directory under the state directory or the pool could not be made.
    #[error("Cannot create directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/mountinfo` could not be read or parsed.
    #[error("Cannot read the mount table")]
    MountTable(#[source] crate::host::mountinfo::Error),
    /// mount(2) failed.
    #[error("Cannot mount {} at {}", device.display(), target.display())]
    Mount {
        /// The device.
        device: PathBuf,
        /// The mount point.
        target: PathBuf,
        /// The system call's error.
        #[source]
        source: Errno,
    },
    /// umount2(2) failed.
    #[error("Cannot unmount {}", target.display())]
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// The system call's error (`EBUSY` while replicas are open).
        #[source]
        source: Errno,
    },
    /// statvfs(2) on the pool failed.
    #[error("Cannot query free space of {}", path.display())]
    Statvfs {
        /// The pool mount point.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: Errno,
    },
    /// An external tool (`losetup`, `wipefs`, `mkfs.xfs`) could not be
    /// started, exited unsuccessfully or outlived its deadline.
    #[error("Cannot run a host tool")]
    Command(#[from] crate::host::command::Error),
    /// An external tool printed something this code cannot understand.
    #[error("Unexpected output from `{command}`: {detail}")]
    CommandOutput {
        /// The command.
        command: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// No pool has this name.
    #[error("Pool {name} not found")]
    PoolNotFound {
        /// The requested name.
        name: String,
    },
    /// Two configured sources are the same pool (same name or same uuid).
    #[error("Pool sources {} and {} are both pool {name} ({uuid})", first.display(), second.display())]
    DuplicatePool {
        /// The pool name.
        name: String,
        /// The uuid of the pool opened second.
        uuid: Uuid,
        /// The device of the pool opened first.
        first: PathBuf,
        /// The device of the pool opened second.
        second: PathBuf,
    },
    /// The pool has been closed.
    #[error("Pool {name} is closed")]
    PoolClosed {
        /// The pool name.
        name: String,
    },
    /// Provisioning would exceed the overcommit limit.
    #[error(
        "Pool {pool} cannot provision {requested_bytes} more bytes: {provisioned_bytes} of its {limit_bytes}-byte limit ({overcommit_percent}% of {total_bytes} bytes) are provisioned"
    )]
    OvercommitLimit {
        /// The pool name.
        pool: String,
        /// Bytes asked for.
        requested_bytes: u64,
        /// Bytes already provisioned.
        provisioned_bytes: u64,
        /// The limit in bytes.
        limit_bytes: u64,
        /// The limit as a percentage of the pool size.
        overcommit_percent: u32,
        /// Pool size in bytes.
        total_bytes: u64,
    },
    /// A thick replica needs more free space than the pool has.
    #[error("Pool {pool} has {free_bytes} free bytes; a thick allocation needs {requested_bytes}")]
    InsufficientSpace {
        /// The pool name.
        pool: String,
        /// Bytes asked for.
        requested_bytes: u64,
        /// Free bytes in the pool.
        free_bytes: u64,
    },
    /// No pool can take an allocation; `reasons` says why for each pool.
    #[error("No pool can hold {requested_bytes} more bytes: {reasons}")]
    NoPoolFits {
        /// Bytes asked for.
        requested_bytes: u64,
        /// One reason per pool.
        reasons: String,
    },
    /// The agent has no pools at all.
    #[error("This node has no pools")]
    NoPools,
}

impl Error {
    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        // No `_` arm: a new variant must choose its code.
        match self {
            Self::InvalidName { .. }
            | Self::InvalidOvercommit { .. }
            | Self::SizeRequired { .. }
            | Self::InvalidSize { .. }
            | Self::FileSizeMismatch { .. }
            | Self::WrongSourceType { .. } => Code::InvalidArgument,
            Self::SourceNotFound { .. } | Self::PoolNotFound { .. } => Code::NotFound,
            Self::ForeignSignature { .. }
            | Self::UnlabelledFilesystem { .. }
            | Self::DeviceInUse { .. }
            | Self::MountPointBusy { .. }
            | Self::UnsupportedLabelVersion { .. }
            | Self::DuplicatePool { .. }
            | Self::PoolClosed { .. }
            | Self::NoPools => Code::FailedPrecondition,
            Self::OvercommitLimit { .. }
            | Self::InsufficientSpace { .. }
            | Self::NoPoolFits { .. } => Code::ResourceExhausted,
            Self::Source { .. }
            | Self::LoopDevice(_)
            | Self::ReadLabel { .. }
            | Self::WriteLabel { .. }
            | Self::CreateDir { .. }
            | Self::MountTable(_)
            | Self::Mount { .. }
            | Self::Unmount { .. }
            | Self::Statvfs { .. }
            | Self::Command(_)
            | Self::CommandOutput { .. } => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), crate::error_chain(&e))
    }
}

/// Where a pool's storage comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSource {
    /// A whole block device, e.g. `/dev/nvme1n1` (`--pool-device`).
    Device(PathBuf),
    /// A file attached to a loop device (`--pool-file`, `--pool-size`), for
    /// development and tests. Created sparse if missing, which needs
    /// `size_bytes`.
    File {
        /// The backing file.
        path: PathBuf,
        /// Size in bytes for a new file; if the file exists it must match.
        size_bytes: Option<u64>,
    },
}

impl PoolSource {
    /// Returns the configured path (device or file).
    pub fn path(&self) -> &Path {
        match self {
            Self::Device(path) | Self::File { path, .. } => path,
        }
    }
}

/// How to open one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The device or file.
    pub source: PoolSource,
    /// Pool name for a new pool; derived from the source when `None`. An
    /// imported pool keeps the name in its label whatever this says.
    pub name: Option<String>,
    /// Format the device even though it carries signatures. Never reformats
    /// an existing Ballast pool.
    pub force_format: bool,
    /// Provisioned bytes may reach this percentage of the pool size.
    pub overcommit_percent: u32,
}

impl PoolConfig {
    /// Returns a configuration with a derived name, no forced format and the
    /// default overcommit limit.
    pub fn new(source: PoolSource) -> Self {
        Self {
            source,
            name: None,
            force_format: false,
            overcommit_percent: DEFAULT_OVERCOMMIT_PERCENT,
        }
    }
}

/// A snapshot of a pool's space, all in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// Size of the pool filesystem.
    pub total_bytes: u64,
    /// Space available for new data.
    pub free_bytes: u64,
    /// Sum of the sizes of the pool's replicas.
    pub provisioned_bytes: u64,
    /// Most bytes that may be provisioned (`total * overcommit / 100`).
    pub limit_bytes: u64,
    /// The overcommit limit in percent.
    pub overcommit_percent: u32,
    /// Number of replicas in the pool.
    pub replica_count: u64,
}

#[derive(Debug, Default)]
struct Accounting {
    provisioned_bytes: u64,
    replicas: u64,
}

/// A mounted pool.
#[derive(Debug)]
pub struct Pool {
    label: PoolLabel,
    source: PoolSource,
    device: PathBuf,
    mount_path: PathBuf,
    overcommit_percent: u32,
    accounting: Mutex<Accounting>,
    closed: AtomicBool,
}

impl Pool {
    /// Opens the pool on `config.source`: reuses an existing mount, imports a
    /// Ballast pool, or formats a blank device, and mounts it at
    /// `<state_dir>/pools/<name>`.
    ///
    /// A loop device attached by this call is detached again if opening fails.
    ///
    /// # Errors
    ///
    /// Configuration errors ([`Error::InvalidName`], [`Error::SizeRequired`],
    /// [`Error::InvalidSize`], [`Error::FileSizeMismatch`],
    /// [`Error::SourceNotFound`], [`Error::WrongSourceType`]), refusals
    /// ([`Error::ForeignSignature`], [`Error::UnlabelledFilesystem`],
    /// [`Error::DeviceInUse`], [`Error::MountPointBusy`]) and system failures
    /// (tool, mount and label errors).
    pub fn open(state_dir: &Path, config: &PoolConfig) -> Result<Self, Error> {
        let name = match &config.name {
            Some(name) => {
                validate_name(name)?;
                name.clone()
            }
            None => derive_name(config.source.path())?,
        };
        if config.overcommit_percent == 0 {
            return Err(Error::InvalidOvercommit { percent: 0 });
        }
        let pools_dir = state_dir.join(POOLS_DIR);
        open::create_dir(&pools_dir)?;
        // The mount table lists canonical paths.
        let pools_dir = fs::canonicalize(&pools_dir).map_err(|source| Error::CreateDir {
            path: pools_dir.clone(),
            source,
        })?;

        let (device, attached_here) = match &config.source {
            PoolSource::Device(path) => (open::block_device(path)?, false),
            PoolSource::File { path, size_bytes } => {
                let file = open::prepare_file(path, *size_bytes)?;
                match loopdev::find_attached(&file)? {
                    Some(dev) => {
                        info!(pool.name = %name, file = %file.display(), device = %dev.display(), "Reusing loop device");
                        (dev, false)
                    }
                    None => {
                        let dev = loopdev::attach(&file)?;
                        info!(pool.name = %name, file = %file.display(), device = %dev.display(), "Attached loop device");
                        (dev, true)
                    }
                }
            }
        };

        match open::open_device(&pools_dir, &name, config, &device) {
            Ok((label, mount_path)) => {
                info!(
                    pool.name = %label.name,
                    pool.uuid = %label.uuid,
                    device = %device.display(),
                    mount = %mount_path.display(),
                    "Pool open"
                );
                Ok(Self {
                    label,
                    source: config.source.clone(),
                    device,
                    mount_path,
                    overcommit_percent: config.overcommit_percent,
                    accounting: Mutex::new(Accounting::default()),
                    closed: AtomicBool::new(false),
                })
            }
            Err(e) => {
                if attached_here && let Err(detach) = loopdev::detach_and_wait(&device) {
                    warn!(device = %device.display(), error = %detach, "Cannot detach loop device after a failed open");
                }
                Err(e)
            }
        }
    }

    /// Unmounts the pool and, for a file pool, detaches its loop device.
    /// Closing a closed pool does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Unmount`] (`EBUSY` while replica files are open; the pool then
    /// stays open), [`Error::MountTable`], or the error of `losetup --detach`.
    pub fn close(&self) -> Result<(), Error> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mounts = mountinfo::read().map_err(Error::MountTable);
        let unmounted = mounts.and_then(|mounts| {
            if mountinfo::at(&mounts, &self.mount_path).is_empty() {
                return Ok(());
            }
            open::unmount(&self.mount_path)
        });
        if let Err(e) = unmounted {
            self.closed.store(false, Ordering::SeqCst);
            return Err(e);
        }
        if matches!(self.source, PoolSource::File { .. }) {
            loopdev::detach_and_wait(&self.device)?;
        }
        info!(pool.name = %self.label.name, "Pool closed");
        Ok(())
    }

    /// Returns the pool name (from its label).
    pub fn name(&self) -> &str {
        &self.label.name
    }

    /// Returns the pool uuid (from its label).
    pub fn uuid(&self) -> Uuid {
        self.label.uuid
    }

    /// Returns the pool label.
    pub fn label(&self) -> &PoolLabel {
        &self.label
    }

    /// Returns the configured source.
    pub fn source(&self) -> &PoolSource {
        &self.source
    }

    /// Returns the block device the pool filesystem is on (the loop device
    /// for a file pool).
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Returns where the pool filesystem is mounted.
    pub fn mount_path(&self) -> &Path {
        &self.mount_path
    }

    /// Returns the directory holding the pool's replica files.
    pub fn replicas_dir(&self) -> PathBuf {
        self.mount_path.join(REPLICAS_DIR)
    }

    /// Returns the directory holding the pool's snapshot copies.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.mount_path.join(SNAPSHOTS_DIR)
    }

    /// Returns the pool's space and provisioning.
    ///
    /// # Errors
    ///
    /// [`Error::PoolClosed`] or [`Error::Statvfs`].
    #[allow(
        clippy::useless_conversion,
        reason = "statvfs fields are 32-bit on some targets"
    )]
    pub fn capacity(&self) -> Result<PoolCapacity, Error> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::PoolClosed {
                name: self.label.name.clone(),
            });
        }
        let st = nix::sys::statvfs::statvfs(&self.mount_path).map_err(|source| Error::Statvfs {
            path: self.mount_path.clone(),
            source,
        })?;
        let frsize = u64::from(st.fragment_size());
        let total_bytes = u64::from(st.blocks()).saturating_mul(frsize);
        let free_bytes = u64::from(st.blocks_available()).saturating_mul(frsize);
        let limit = u128::from(total_bytes) * u128::from(self.overcommit_percent) / 100;
        let accounting = self.accounting.lock();
        Ok(PoolCapacity {
            total_bytes,
            free_bytes,
            provisioned_bytes: accounting.provisioned_bytes,
            limit_bytes: u64::try_from(limit).unwrap_or(u64::MAX),
            overcommit_percent: self.overcommit_percent,
            replica_count: accounting.replicas,
        })
    }

    /// Reserves `bytes` of provisioned capacity, for a new replica
    /// (`new_replica`) or for growing one. The reservation is released when
    /// the returned guard drops, unless it is committed.
    ///
    /// `preallocate` (thick) also requires `bytes` of actual free space.
    ///
    /// # Errors
    ///
    /// [`Error::OvercommitLimit`], [`Error::InsufficientSpace`], or the errors
    /// of [`Pool::capacity`].
    pub fn provision(
        self: &Arc<Self>,
        bytes: u64,
        preallocate: bool,
        new_replica: bool,
    ) -> Result<Provision, Error> {
        let capacity = self.capacity()?;
        let mut accounting = self.accounting.lock();
        // Checked against the accounting under the lock: statvfs figures may
        // be a moment old, the provisioned sum may not.
        self.check_fits(
            &PoolCapacity {
                provisioned_bytes: accounting.provisioned_bytes,
                ..capacity
            },
            bytes,
            preallocate,
        )?;
        accounting.provisioned_bytes += bytes;
        if new_replica {
            accounting.replicas += 1;
        }
        Ok(Provision {
            pool: Arc::clone(self),
            bytes,
            new_replica,
            committed: false,
        })
    }

    /// Returns `bytes` of provisioned capacity, and one replica if
    /// `removed_replica`.
    pub fn release(&self, bytes: u64, removed_replica: bool) {
        let mut accounting = self.accounting.lock();
        accounting.provisioned_bytes = accounting.provisioned_bytes.saturating_sub(bytes);
        if removed_replica {
            accounting.replicas = accounting.replicas.saturating_sub(1);
        }
    }

    /// Replaces the provisioning figures, after the replica catalog scanned
    /// the pool.
    pub fn set_provisioned(&self, provisioned_bytes: u64, replicas: u64) {
        *self.accounting.lock() = Accounting {
            provisioned_bytes,
            replicas,
        };
    }

    fn check_fits(
        &self,
        capacity: &PoolCapacity,
        bytes: u64,
        preallocate: bool,
    ) -> Result<(), Error> {
        if capacity.provisioned_bytes.saturating_add(bytes) > capacity.limit_bytes {
            return Err(Error::OvercommitLimit {
                pool: self.label.name.clone(),
                requested_bytes: bytes,
                provisioned_bytes: capacity.provisioned_bytes,
                limit_bytes: capacity.limit_bytes,
                overcommit_percent: capacity.overcommit_percent,
                total_bytes: capacity.total_bytes,
            });
        }
        if preallocate && capacity.free_bytes < bytes {
            return Err(Error::InsufficientSpace {
                pool: self.label.name.clone(),
                requested_bytes: bytes,
                free_bytes: capacity.free_bytes,
            });
        }
        Ok(())
    }
}

/// Capacity reserved by [`Pool::provision`]; released on drop unless
/// [`Provision::commit`] was called.
#[derive(Debug)]
#[must_use = "a provision is released when dropped"]
pub struct Provision {
    pool: Arc<Pool>,
    bytes: u64,
    new_replica: bool,
    committed: bool,
}

impl Provision {
    /// Keeps the reservation: the replica now exists with its new size.
    pub fn commit(mut self) {
        self.committed = true;
    }

    /// Returns the pool the capacity is reserved in.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Provision {
    fn drop(&mut self) {
        if !self.committed {
            self.pool.release(self.bytes, self.new_replica);
        }
    }
}

/// Checks a pool name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`, not
/// starting with a dot.
///
/// # Errors
///
/// [`Error::InvalidName`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 64 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name.bytes().all(is_name_byte) {
        Some("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Derives a pool name from a source path: the file stem of a pool file
/// (`/var/tmp/pool-a.img` → `pool-a`), the base name of a device
/// (`/dev/nvme1n1` → `nvme1n1`), with other characters replaced by `-`.
///
/// # Errors
///
/// [`Error::InvalidName`] if nothing usable is left.
pub fn derive_name(path: &Path) -> Result<String, Error> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = stem
        .bytes()
        .map(|b| if is_name_byte(b) { char::from(b) } else { '-' })
        .collect();
    name = name.trim_start_matches('.').to_owned();
    name.truncate(MAX_NAME_LEN);
    validate_name(&name).map(|()| name)
}

/// Unmounts everything mounted under `<state_dir>/pools` and detaches the loop
/// devices behind those mounts: cleanup after an agent that was killed, for
/// test harnesses and `ballast` cluster teardown. Never used by the agent on
/// its own pools (it would pull storage from under live exports).
///
/// # Errors
///
/// [`Error::MountTable`], or the first unmount or detach error after trying
/// every mount.
pub fn force_cleanup(state_dir: &Path) -> Result<(), Error> {
    let Ok(pools_dir) = fs::canonicalize(state_dir.join(POOLS_DIR)) else {
        return Ok(());
    };
    let mounts = mountinfo::read().map_err(Error::MountTable)?;
    let mut ours: Vec<_> = mounts
        .iter()
        .filter(|m| m.mount_point.starts_with(&pools_dir) && m.mount_point != pools_dir)
        .collect();
    // Deepest first, and the topmost of stacked mounts first.
    ours.reverse();
    ours.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    let mut first_error = None;
    for m in ours {
        let unmounted = nix::mount::umount2(&m.mount_point, MntFlags::empty())
            .or_else(|_| nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH));
        if let Err(source) = unmounted {
            first_error.get_or_insert(Error::Unmount {
                target: m.mount_point.clone(),
                source,
            });
            continue;
        }
        let source = Path::new(&m.source);
        if loopdev::backing_file(source).is_some()
            && let Err(e) = loopdev::detach_and_wait(source)
        {
            first_error.get_or_insert(e.into());
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

#[cfg(test)]
pub(crate) mod tests;
