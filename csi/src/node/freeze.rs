//! Filesystem freeze and thaw of staged volumes, for app-consistent
//! snapshots (`ballast.io/freeze`).
//!
//! A freeze finds the filesystem mounted from the volume's attached device
//! (its staging mount; the bind mounts into pods share its superblock) and
//! calls FIFREEZE on it: the kernel writes out dirty data and the journal,
//! leaves the on-disk image clean (ext4 clears `needs_recovery`, XFS
//! covers its log) and holds new writes until FITHAW. A block-access
//! volume, or one that is not mounted here, is not frozen, with the
//! reason.
//!
//! # What this code must never do
//!
//! Leave a filesystem frozen: a frozen filesystem stalls every writer of
//! the pod, and a pod that cannot write is an outage. So every freeze is
//! recorded durably under `<state>/frozen/` *before* the ioctl, and thawed
//! by whichever comes first: [`Freezer::thaw`], its deadline (a timer armed
//! before the ioctl, so a controller that dies mid-cut holds writes no
//! longer), or [`Freezer::thaw_recorded`] when the node plugin starts
//! again after a crash. It must never thaw a filesystem frozen by someone
//! else (an administrator's `fsfreeze`): a FIFREEZE answering `EBUSY` is
//! refused and not recorded.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::attach::{self, Attacher};
use super::mount::Mounter;

/// Longest a freeze may last before the node plugin thaws it on its own.
pub const MAX_FREEZE: Duration = Duration::from_secs(600);

// FIFREEZE and FITHAW: _IOWR('X', 119, int) and _IOWR('X', 120, int)
// (linux/fs.h). The argument is ignored by the kernel.
mod sys {
    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);
}

/// Errors of freezing and thawing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request argument is malformed.
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    /// The volume's attachment or mounts could not be read.
    #[error("Cannot find the mounts of volume {volume_id}")]
    Lookup {
        /// The volume.
        volume_id: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The filesystem is frozen already, by another freeze or by someone
    /// else.
    #[error("The filesystem of volume {volume_id} at {} is frozen already{by}", mount_path.display())]
    AlreadyFrozen {
        /// The volume.
        volume_id: String,
        /// Its mount.
        mount_path: PathBuf,
        /// " by freeze <id>", or empty when not frozen by the node plugin.
        by: String,
    },
    /// The freeze record could not be written or removed.
    #[error("Cannot record the freeze of volume {volume_id} in {}", path.display())]
    Record {
        /// The volume.
        volume_id: String,
        /// The record's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// FIFREEZE or FITHAW failed.
    #[error("{call:?} of {} failed", mount_path.display())]
    Ioctl {
        /// Which ioctl.
        call: Call,
        /// The mount.
        mount_path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task of an ioctl died.
    #[error("The freeze task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = crate::error_chain(&err);
        match err {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::AlreadyFrozen { .. } => tonic::Status::failed_precondition(message),
            Error::Lookup { .. } | Error::Record { .. } | Error::Ioctl { .. } | Error::Join(_) => {
                tonic::Status::internal(message)
            }
        }
    }
}

/// The two ioctls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// FIFREEZE.
    Freeze,
    /// FITHAW.
    Thaw,
}

/// What a freeze did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frozen {
    /// The filesystem mounted at this path is frozen.
    At(PathBuf),
    /// Nothing was frozen, for this reason.
    Skipped(String),
}

/// A freeze as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    volume_id: String,
    freeze_id: String,
    mount_path: PathBuf,
}

/// The node's freezes: at most one per volume.
pub struct Freezer {
    dir: PathBuf,
    attacher: Arc<dyn Attacher>,
    mounter: Arc<dyn Mounter>,
    /// Deadline timers of the freezes this process made, by volume.
    timers: Mutex<HashMap<String, JoinHandle<()>>>,
    /// One lock per volume, held by a freeze through its ioctl and by every
    /// thaw: a thaw that came while FIFREEZE still ran (the controller
    /// gave up waiting) must thaw after it, not find nothing frozen yet and
    /// drop the record of a freeze that then lands.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Freezer {
    /// A freezer recording its freezes under `<state_dir>/frozen`.
    pub fn new(
        state_dir: &Path,
        attacher: Arc<dyn Attacher>,
        mounter: Arc<dyn Mounter>,
    ) -> Arc<Self> {
        Arc::new(Self {
            dir: state_dir.join("frozen"),
            attacher,
            mounter,
            timers: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The lock of `volume_id`'s freezes and thaws.
    fn lock_of(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .entry(volume_id.to_string())
            .or_default()
            .clone()
    }

    /// Freezes the filesystem of `volume_id` for freeze `freeze_id`, thawed
    /// on its own after `deadline` (at most [`MAX_FREEZE`]). The same
    /// freeze id again answers the same.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad id or deadline;
    /// [`Error::AlreadyFrozen`] when another freeze, or someone else,
    /// holds it; [`Error::Lookup`], [`Error::Record`], [`Error::Ioctl`].
    pub async fn freeze(
        self: &Arc<Self>,
        volume_id: &str,
        freeze_id: &str,
        deadline: Duration,
    ) -> Result<Frozen, Error> {
        attach::validate_volume_id(volume_id)
            .map_err(|err| Error::InvalidArgument(err.to_string()))?;
        if freeze_id.is_empty() {
            return Err(Error::InvalidArgument("freeze_id is required".into()));
        }
        if deadline.is_zero() || deadline > MAX_FREEZE {
            return Err(Error::InvalidArgument(format!(
                "the deadline must be between 1 ms and {MAX_FREEZE:?}, not {deadline:?}"
            )));
        }
        let lock = self.lock_of(volume_id);
        let _held = lock.lock().await;
        if let Some(held) = self.read_record(volume_id)? {
            if held.freeze_id == freeze_id {
                return Ok(Frozen::At(held.mount_path));
            }
            return Err(Error::AlreadyFrozen {
                volume_id: volume_id.to_string(),
                mount_path: held.mount_path,
                by: format!(" by freeze {}", held.freeze_id),
            });
        }
        let mount_path = match self.filesystem_mount(volume_id).await? {
            Ok(path) => path,
            Err(reason) => return Ok(Frozen::Skipped(reason)),
        };
        let record = Record {
            volume_id: volume_id.to_string(),
            freeze_id: freeze_id.to_string(),
            mount_path: mount_path.clone(),
        };
        self.write_record(&record)?;
        self.arm_timer(&record, deadline);
        let path = mount_path.clone();
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || ioctl(&path, Call::Freeze)).await? {
            Ok(()) => {
                let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                info!(volume.id = %volume_id, freeze.id = %freeze_id, path = %mount_path.display(), ?deadline, took_ms, "Filesystem frozen");
                Ok(Frozen::At(mount_path))
            }
            Err(err) => {
                self.forget(volume_id);
                if let Err(cleanup) = self.remove_record(volume_id) {
                    warn!(volume.id = %volume_id, error = %crate::error_chain(&cleanup), "Cannot remove the record of a freeze that failed");
                }
                match err {
                    Error::Ioctl { source, .. }
                        if source.raw_os_error() == Some(Errno::EBUSY as i32) =>
                    {
                        Err(Error::AlreadyFrozen {
                            volume_id: volume_id.to_string(),
                            mount_path,
                            by: String::new(),
                        })
                    }
                    err => Err(err),
                }
            }
        }
    }

    /// Thaws what freeze `freeze_id` froze of `volume_id`; false when it
    /// holds nothing (thawed at its deadline, or never frozen).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`]; [`Error::Record`], [`Error::Ioctl`]
    /// (the record stays, so the deadline or the next start thaws again).
    pub async fn thaw(&self, volume_id: &str, freeze_id: &str) -> Result<bool, Error> {
        attach::validate_volume_id(volume_id)
            .map_err(|err| Error::InvalidArgument(err.to_string()))?;
        let lock = self.lock_of(volume_id);
        let _held = lock.lock().await;
        let Some(record) = self.read_record(volume_id)? else {
            return Ok(false);
        };
        if record.freeze_id != freeze_id {
            return Ok(false);
        }
        let thawed = thaw_record(&self.dir, record).await?;
        self.forget(volume_id);
        Ok(thawed)
    }

    /// Thaws every freeze recorded on disk: called at start-up, when no
    /// timer of an earlier process survives. Failures are logged; the
    /// record stays for the next start.
    pub async fn thaw_recorded(&self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => {
                warn!(dir = %self.dir.display(), error = %err, "Cannot list recorded freezes");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(volume_id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|_| path.extension().is_some_and(|e| e == "json"))
            else {
                continue;
            };
            match self.read_record(volume_id) {
                Ok(Some(record)) => {
                    warn!(volume.id = %volume_id, freeze.id = %record.freeze_id, "Thawing a freeze left by an earlier node plugin");
                    if let Err(err) = thaw_record(&self.dir, record).await {
                        warn!(volume.id = %volume_id, error = %crate::error_chain(&err), "Cannot thaw a recorded freeze");
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    warn!(volume.id = %volume_id, error = %crate::error_chain(&err), "Cannot read a recorded freeze")
                }
            }
        }
    }

    /// The mount point of the filesystem on the volume's device, or why
    /// there is none to freeze.
    pub async fn filesystem_mount(
        &self,
        volume_id: &str,
    ) -> Result<Result<PathBuf, String>, Error> {
        let lookup = |source: Box<dyn std::error::Error + Send + Sync>| Error::Lookup {
            volume_id: volume_id.to_string(),
            source,
        };
        let attachment = self
            .attacher
            .find(volume_id)
            .await
            .map_err(|e| lookup(e.into()))?;
        let Some(device) = attachment.and_then(|a| a.device) else {
            return Ok(Err("the volume is not attached on this node".to_string()));
        };
        let rdev = self
            .mounter
            .device_number(&device)
            .await
            .map_err(|e| lookup(e.into()))?;
        let mounts = self.mounter.mounts().await.map_err(|e| lookup(e.into()))?;
        // The filesystem's own mount has the device's number as st_dev;
        // a block-access bind mount of the device node does not (its
        // st_dev is devtmpfs').
        match mounts.iter().find(|m| m.dev() == rdev) {
            Some(mount) => Ok(Ok(mount.mount_point.clone())),
            None => Ok(Err(format!(
                "no filesystem of {} is mounted on this node (block access, or not staged)",
                device.display()
            ))),
        }
    }

    /// Thaws at the deadline unless thawed before (the timer is aborted
    /// then).
    fn arm_timer(self: &Arc<Self>, record: &Record, deadline: Duration) {
        let dir = self.dir.clone();
        let volume_id = record.volume_id.clone();
        let freeze_id = record.freeze_id.clone();
        let lock = self.lock_of(&volume_id);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let _held = lock.lock().await;
            match read_record(&dir, &volume_id) {
                Ok(Some(record)) if record.freeze_id == freeze_id => {
                    warn!(volume.id = %volume_id, freeze.id = %freeze_id, ?deadline, "Thawing at the freeze's deadline");
                    if let Err(err) = thaw_record(&dir, record).await {
                        warn!(volume.id = %volume_id, error = %crate::error_chain(&err), "Cannot thaw at the deadline");
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(volume.id = %volume_id, error = %crate::error_chain(&err), "Cannot read the freeze at its deadline")
                }
            }
        });
        if let Some(old) = self.timers.lock().insert(record.volume_id.clone(), timer) {
            old.abort();
        }
    }

    fn forget(&self, volume_id: &str) {
        if let Some(timer) = self.timers.lock().remove(volume_id) {
            timer.abort();
        }
    }

    fn read_record(&self, volume_id: &str) -> Result<Option<Record>, Error> {
        read_record(&self.dir, volume_id)
    }

    fn write_record(&self, record: &Record) -> Result<(), Error> {
        let path = record_path(&self.dir, &record.volume_id);
        let error = |source| Error::Record {
            volume_id: record.volume_id.clone(),
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(error)?;
        let json = serde_json::to_vec(record).map_err(|e| error(e.into()))?;
        ballast_storage_node::durable::replace(&path, &json).map_err(error)
    }

    fn remove_record(&self, volume_id: &str) -> Result<(), Error> {
        remove_record(&self.dir, volume_id)
    }
}

fn record_path(dir: &Path, volume_id: &str) -> PathBuf {
    dir.join(format!("{volume_id}.json"))
}

fn read_record(dir: &Path, volume_id: &str) -> Result<Option<Record>, Error> {
    let path = record_path(dir, volume_id);
    let error = |source| Error::Record {
        volume_id: volume_id.to_string(),
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| error(e.into())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(error(err)),
    }
}

fn remove_record(dir: &Path, volume_id: &str) -> Result<(), Error> {
    let path = record_path(dir, volume_id);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Record {
            volume_id: volume_id.to_string(),
            path,
            source,
        }),
    }
}

/// FITHAW of a recorded freeze, then the record goes. True when the
/// filesystem was frozen (FITHAW answers `EINVAL` for one that is not:
/// thawed already, or unmounted since).
async fn thaw_record(dir: &Path, record: Record) -> Result<bool, Error> {
    let path = record.mount_path.clone();
    let thawed = match tokio::task::spawn_blocking(move || ioctl(&path, Call::Thaw)).await? {
        Ok(()) => true,
        Err(Error::Ioctl { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(code) if code == Errno::EINVAL as i32 || code == Errno::ENOENT as i32
            ) =>
        {
            false
        }
        Err(err) => return Err(err),
    };
    remove_record(dir, &record.volume_id)?;
    info!(volume.id = %record.volume_id, freeze.id = %record.freeze_id, path = %record.mount_path.display(), thawed, "Filesystem thawed");
    Ok(thawed)
}

/// FIFREEZE (after a syncfs) or FITHAW on the filesystem mounted at
/// `mount_path`. Blocks (FIFREEZE writes out every dirty page).
fn ioctl(mount_path: &Path, call: Call) -> Result<(), Error> {
    let error = |source| Error::Ioctl {
        call,
        mount_path: mount_path.to_path_buf(),
        source,
    };
    let dir = File::open(mount_path).map_err(error)?;
    if call == Call::Freeze {
        // FIFREEZE blocks writers first and syncs after; writing out what
        // is dirty now, while the application still runs, leaves the
        // freeze less to write with its writers held. A failure here only
        // costs that.
        if let Err(errno) = nix::unistd::syncfs(&dir) {
            warn!(path = %mount_path.display(), %errno, "syncfs before the freeze failed");
        }
    }
    let mut unused: nix::libc::c_int = 0;
    // SAFETY: `dir` is an open descriptor for the whole call, and the
    // kernel reads nothing through the pointer, which is valid anyway.
    let result = unsafe {
        match call {
            Call::Freeze => sys::fifreeze(dir.as_raw_fd(), &mut unused),
            Call::Thaw => sys::fithaw(dir.as_raw_fd(), &mut unused),
        }
    };
    result
        .map(|_| ())
        .map_err(|errno| error(std::io::Error::from(errno)))
}
