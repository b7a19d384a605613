//! Attaching a volume's NBD export as a local block device.
//!
//! A published volume is served by its target as an NBD export on a unix
//! socket, `nbd+unix:///<export>?socket=<path>` ([`NbdUri`]). This module
//! turns that into a block device node and back, with two backends behind
//! one small [`Attacher`] trait:
//!
//! - [`NbdfuseLoop`]: libnbd's `nbdfuse` exposes the export as a file on a
//!   FUSE mount and a loop device is set up over that file. Works on any
//!   kernel with FUSE and loop (this development machine has no `nbd`
//!   module).
//! - [`KernelNbd`]: the kernel's `nbd` driver through `nbd-client`
//!   (netlink), giving `/dev/nbdN`. Used where the module is present.
//!
//! [`AttachMode::Auto`] picks the kernel driver when `/sys/module/nbd` or
//! `/dev/nbd0` exists, nbdfuse otherwise; the other modes force one.
//!
//! # Invariants
//!
//! - What is attached is always read back from the system (mount table,
//!   `/sys/block`, and the small records each backend keeps under its state
//!   directory), never from memory, so a restarted node plugin finds and can
//!   detach everything a previous instance attached ([`Attacher::list`]).
//! - `attach` and `detach` are idempotent. `detach` refuses a device that
//!   is still mounted or bind-mounted ([`Error::DeviceBusy`]) instead of
//!   pulling it from under a filesystem.
//! - Every wait is bounded.
//!
//! This module never formats, mounts or writes to the device it attaches.
//!
//! # Extending
//!
//! A new backend implements [`Attacher`], keeps whatever it needs to
//! rediscover its attachments on disk or in the kernel, and gets a variant
//! in [`AttachMode`].

mod kernel_nbd;
mod nbdfuse;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use kernel_nbd::KernelNbd;
pub use nbdfuse::NbdfuseLoop;
#[cfg(test)]
pub(crate) use nbdfuse::process_alive as nbdfuse_process_alive;

use super::mount::MountEntry;
use crate::command;

/// Errors of the attach layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The volume id cannot name a directory or device record.
    #[error(
        "Invalid volume id {0:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidVolumeId(String),
    /// The NBD URI is not `nbd+unix:///<export>?socket=<absolute path>`.
    #[error("Invalid NBD URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The volume is already attached from a different export.
    #[error("Volume {volume_id} is attached from {attached}, not {requested}")]
    UriMismatch {
        /// The volume.
        volume_id: String,
        /// The URI it is attached from.
        attached: String,
        /// The URI asked for.
        requested: String,
    },
    /// The device is still mounted, bind-mounted or open.
    #[error("Device {device} of volume {volume_id} is in use")]
    DeviceBusy {
        /// The volume.
        volume_id: String,
        /// Its device.
        device: PathBuf,
    },
    /// No free `/dev/nbdN` is left.
    #[error("No free NBD device")]
    NoFreeDevice,
    /// The backend cannot work on this machine (missing module or tool).
    #[error("{0}")]
    Unavailable(String),
    /// `nbdfuse` exited before its file appeared (unreachable export?).
    #[error("nbdfuse for volume {volume_id} exited: {log}")]
    NbdfuseExited {
        /// The volume.
        volume_id: String,
        /// The end of nbdfuse's log.
        log: String,
    },
    /// Something did not happen within its deadline.
    #[error("Timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        timeout: Duration,
    },
    /// A helper tool (`losetup`, `fusermount3`, `nbd-client`) failed.
    #[error("Running {what}")]
    Tool {
        /// What the tool was doing.
        what: &'static str,
        /// The cause.
        #[source]
        source: command::Error,
    },
    /// A loop device could not be attached or detached.
    #[error("Loop device")]
    LoopDevice(#[source] ballast_storage_node::host::loopdev::Error),
    /// A blocking helper task panicked or was cancelled.
    #[error("Blocking task")]
    Join(#[source] tokio::task::JoinError),
    /// A file operation failed.
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
    /// The mount table could not be read.
    #[error("Reading the mount table")]
    MountInfo(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result of the attach layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = crate::error_chain(&e);
        match e {
            Error::InvalidVolumeId(_) | Error::InvalidUri { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            Error::UriMismatch { .. } | Error::DeviceBusy { .. } | Error::Unavailable(_) => {
                tonic::Status::failed_precondition(msg)
            }
            Error::NoFreeDevice => tonic::Status::resource_exhausted(msg),
            Error::NbdfuseExited { .. } => tonic::Status::unavailable(msg),
            Error::Timeout { .. } => tonic::Status::deadline_exceeded(msg),
            Error::Tool { .. }
            | Error::LoopDevice(_)
            | Error::Join(_)
            | Error::Io { .. }
            | Error::MountInfo(_) => tonic::Status::internal(msg),
        }
    }
}

/// Checks that a volume id is safe as a file name: 1 to 128 characters from
/// `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_volume_id(volume_id: &str) -> Result<()> {
    let ok = !volume_id.is_empty()
        && volume_id.len() <= 128
        && !volume_id.starts_with('.')
        && volume_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidVolumeId(volume_id.to_string()))
    }
}

/// An NBD export on a unix socket: `nbd+unix:///<export>?socket=<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    uri: String,
    export: String,
    socket: PathBuf,
}

impl NbdUri {
    /// The URI as given (libnbd parses it again in nbdfuse).
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The export name (may be empty: the server's default export).
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The server's unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl FromStr for NbdUri {
    type Err = Error;

    /// Parses the URI form targets publish. Percent-encoding and query
    /// parameters other than `socket` are refused rather than guessed at.
    fn from_str(uri: &str) -> Result<Self> {
        let bad = |reason| Error::InvalidUri {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("nbd+unix://")
            .ok_or_else(|| bad("the scheme must be nbd+unix"))?;
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| bad("a host is not allowed; use nbd+unix:///<export>"))?;
        if uri.contains('%') || uri.contains('#') {
            return Err(bad("percent-encoding and fragments are not supported"));
        }
        let (export, query) = rest
            .split_once('?')
            .ok_or_else(|| bad("the socket=<path> parameter is missing"))?;
        let socket = query
            .strip_prefix("socket=")
            .ok_or_else(|| bad("socket=<path> must be the only parameter"))?;
        if socket.contains('&') || socket.is_empty() || !socket.starts_with('/') {
            return Err(bad("socket must be one absolute path"));
        }
        Ok(NbdUri {
            uri: uri.to_string(),
            export: export.to_string(),
            socket: PathBuf::from(socket),
        })
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri)
    }
}

/// A volume attached on this node, as found on the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The volume.
    pub volume_id: String,
    /// Its block device; `None` while only half set up (an nbdfuse mount
    /// without its loop device), which `attach` completes and `detach`
    /// removes.
    pub device: Option<PathBuf>,
    /// The export it is attached from, when recorded.
    pub uri: Option<String>,
    /// Why the attachment cannot serve I/O, as far as the system shows (its
    /// nbdfuse process has exited); `None` when it looks healthy.
    pub problem: Option<String>,
}

/// Turns NBD exports into block devices and back.
#[async_trait]
pub trait Attacher: Send + Sync {
    /// The backend's name, for logs (`nbdfuse-loop`, `kernel-nbd`).
    fn name(&self) -> &'static str;

    /// Attaches `uri` as the block device of `volume_id` and returns the
    /// device path. Idempotent: an existing attachment from the same URI is
    /// returned (and completed if half set up); one from another URI is
    /// [`Error::UriMismatch`]. On failure nothing new is left attached.
    async fn attach(&self, volume_id: &str, uri: &NbdUri) -> Result<PathBuf>;

    /// Detaches `volume_id`. Idempotent: a volume that is not attached is
    /// fine. A device that is still in use is [`Error::DeviceBusy`].
    async fn detach(&self, volume_id: &str) -> Result<()>;

    /// Every attachment of this backend, read from the system.
    async fn list(&self) -> Result<Vec<Attachment>>;

    /// The attachment of `volume_id`, if any.
    async fn find(&self, volume_id: &str) -> Result<Option<Attachment>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|a| a.volume_id == volume_id))
    }
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// The kernel's nbd driver when present, else nbdfuse and loop.
    #[default]
    Auto,
    /// Always the kernel's nbd driver.
    KernelNbd,
    /// Always nbdfuse and loop.
    NbdfuseLoop,
}

impl FromStr for AttachMode {
    type Err = String;

    /// Parses `auto`, `kernel-nbd` or `nbdfuse-loop` (a command-line flag).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AttachMode::Auto),
            "kernel-nbd" => Ok(AttachMode::KernelNbd),
            "nbdfuse-loop" => Ok(AttachMode::NbdfuseLoop),
            other => Err(format!(
                "unknown attach mode {other:?} (auto, kernel-nbd, nbdfuse-loop)"
            )),
        }
    }
}

/// True when the kernel's nbd driver is loaded or its devices exist.
pub fn kernel_nbd_available() -> bool {
    Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists()
}

/// Builds the attacher for `mode`, keeping its records under
/// `<state_dir>/attach` (nbdfuse) or `<state_dir>/nbd` (kernel nbd).
pub fn attacher(mode: AttachMode, state_dir: &Path) -> Result<Arc<dyn Attacher>> {
    let kernel = match mode {
        AttachMode::Auto => kernel_nbd_available(),
        AttachMode::KernelNbd => true,
        AttachMode::NbdfuseLoop => false,
    };
    Ok(if kernel {
        Arc::new(KernelNbd::new(state_dir.join("nbd"))?)
    } else {
        Arc::new(NbdfuseLoop::new(state_dir.join("attach"))?)
    })
}

/// True when the block device `name` (`loop3`, `nbd0`) with device number
/// `dev` is mounted, or its node is bind-mounted somewhere (a raw block
/// publish), according to `mounts`.
pub(crate) fn device_in_use(name: &str, dev: u64, mounts: &[MountEntry]) -> bool {
    let node_root = Path::new("/").join(name);
    mounts
        .iter()
        .any(|m| m.dev() == dev || (m.fs_type == "devtmpfs" && m.root == node_root))
}

/// Reads `/sys/block/<name>/dev` ("7:3") as a device number.
pub(crate) fn sys_block_dev(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/sys/block/{name}/dev")).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(nix::sys::stat::makedev(
        major.parse().ok()?,
        minor.parse().ok()?,
    ))
}

/// Reads and parses `/proc/self/mountinfo`.
pub(crate) fn read_mounts() -> Result<Vec<MountEntry>> {
    super::mount::mountinfo::read().map_err(|e| Error::MountInfo(Box::new(e)))
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`.
pub(crate) async fn wait_for<T>(
    what: impl Into<String>,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.into(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_target_uris() {
        let u: NbdUri = "nbd+unix:///pvc-1?socket=/run/ballast/pvc-1.sock"
            .parse()
            .expect("valid");
        assert_eq!(u.export(), "pvc-1");
        assert_eq!(u.socket(), Path::new("/run/ballast/pvc-1.sock"));
        let u: NbdUri = "nbd+unix:///?socket=/s".parse().expect("default export");
        assert_eq!(u.export(), "");
    }

    #[test]
    fn refuses_other_uris() {
        for bad in [
            "nbd://host/x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix:///x?tls=on",
            "nbd+unix:///x?socket=relative",
            "nbd+unix:///x?socket=/s&tls=on",
            "nbd+unix:///x%20y?socket=/s",
        ] {
            assert!(bad.parse::<NbdUri>().is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn volume_ids_must_be_file_name_safe() {
        for good in ["pvc-1", "a.b_c-D9", &"x".repeat(128)] {
            assert!(validate_volume_id(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_volume_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn in_use_means_mounted_or_node_bind_mounted() {
        let dev = nix::sys::stat::makedev(7, 3);
        let mounts = super::super::mount::mountinfo::parse(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             51 22 0:5 /loop3 /pods/p/vol rw - devtmpfs udev rw\n",
        )
        .expect("parse");
        assert!(device_in_use("loop3", dev, &mounts));
        assert!(!device_in_use(
            "loop4",
            nix::sys::stat::makedev(7, 4),
            &mounts
        ));
        let mounted =
            super::super::mount::mountinfo::parse("50 22 7:4 / /stage rw - ext4 /dev/loop4 rw\n")
                .expect("parse");
        assert!(device_in_use(
            "loop4",
            nix::sys::stat::makedev(7, 4),
            &mounted
        ));
    }

    #[test]
    fn attach_modes_parse() {
        assert_eq!("auto".parse(), Ok(AttachMode::Auto));
        assert_eq!("kernel-nbd".parse(), Ok(AttachMode::KernelNbd));
        assert_eq!("nbdfuse-loop".parse(), Ok(AttachMode::NbdfuseLoop));
        assert!("nbd".parse::<AttachMode>().is_err());
    }
}
