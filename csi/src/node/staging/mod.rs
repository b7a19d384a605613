//! The logic of NodeStageVolume, NodeUnstageVolume, NodePublishVolume,
//! NodeUnpublishVolume, NodeExpandVolume and NodeGetVolumeStats, as plain
//! async functions over an [`Attacher`] and a [`Mounter`].
//!
//! The gRPC service (a later step) validates nothing itself: it converts the
//! request with [`capability`] and the types here, takes the per-volume
//! guard, and calls these functions. They follow the CSI spec (v1.12,
//! "Node Service RPC"):
//!
//! - Idempotency: staging a volume that is already staged at the same path
//!   from the same device with a compatible capability, or publishing one
//!   that is already published at the same target compatibly, succeeds and
//!   changes nothing; unstage and unpublish of something that is not there
//!   succeed.
//! - Incompatible repeats, and staging a volume at a second path, are
//!   `ALREADY_EXISTS` ("Volume published but is incompatible");
//!   capabilities the volume cannot satisfy — a filesystem type other than
//!   the one on the device, a device with a foreign signature — are
//!   `FAILED_PRECONDITION` ("Exceeds capabilities"); a publish without
//!   staging path is `FAILED_PRECONDITION` ("Staging target path not
//!   set").
//! - A failed stage leaves nothing attached: any error after the attach
//!   detaches again (unless the device is in use by someone else).
//! - A device is formatted only when `blkid -p` finds no signature at all
//!   (see `node::mount`); an existing filesystem is mounted as it is,
//!   after growing it if the device has grown (ControllerExpandVolume is
//!   offline, so the node learns a new size at stage): ext4 offline before
//!   the mount, XFS online right after it. A read-only stage grows nothing.
//!
//! These functions never keep state: everything is read back from the
//! attacher and the mount table on every call.

use std::path::{Path, PathBuf};

use ballast_proto::csi;
use tracing::{info, instrument, warn};

use super::attach::{self, Attacher, NbdUri};
use super::mount::{self, FsType, Mounter, Signature, TargetKind, VolumeStats};

#[cfg(test)]
pub(crate) mod tests;

/// How many stacked mounts unmount and unpublish peel off a path at most.
const MAX_STACKED_MOUNTS: usize = 8;

/// Errors of the stage and publish logic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A REQUIRED request field is missing or empty.
    #[error("Missing required field {0}")]
    MissingField(&'static str),
    /// A request field has a value the plugin cannot accept.
    #[error("Invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The filesystem type is not one the plugin can create or mount.
    #[error("Unsupported filesystem type {0:?} (ext4, xfs)")]
    UnsupportedFsType(String),
    /// The access mode cannot be served with this access type (a local
    /// filesystem cannot be written from several nodes).
    #[error("Access mode {0} is not supported for filesystem volumes")]
    UnsupportedAccessMode(String),
    /// NodePublishVolume without a staging path.
    #[error("staging_target_path is required: the plugin has STAGE_UNSTAGE_VOLUME")]
    StagingPathNotSet,
    /// NodePublishVolume or NodeExpandVolume before NodeStageVolume.
    #[error("Volume {volume_id} is not staged at {path}")]
    NotStaged {
        /// The volume.
        volume_id: String,
        /// The staging path given.
        path: PathBuf,
    },
    /// Something other than this volume, or this volume with another
    /// capability, is staged at the staging path.
    #[error("Staging path {path} holds something incompatible: {reason}")]
    StagedIncompatible {
        /// The staging path.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Something other than this volume, or this volume with other
    /// arguments, is published at the target path.
    #[error("Target path {path} holds something incompatible: {reason}")]
    PublishedIncompatible {
        /// The target path.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The device already holds a filesystem of another type.
    #[error("Device {device} holds {existing}, not the requested {requested}")]
    FsTypeMismatch {
        /// The device.
        device: PathBuf,
        /// The filesystem on it.
        existing: String,
        /// The filesystem asked for.
        requested: FsType,
    },
    /// The device holds a signature that is not a filesystem; it is never
    /// formatted over.
    #[error("Device {device} holds {what}; refusing to format it")]
    ForeignSignature {
        /// The device.
        device: PathBuf,
        /// What blkid found.
        what: String,
    },
    /// The volume's device is mounted at another path than the one given.
    #[error("Volume {volume_id} is already staged or in use at another path")]
    InUseElsewhere {
        /// The volume.
        volume_id: String,
    },
    /// NodeUnstageVolume while publish mounts of the volume remain.
    #[error("Volume {volume_id} is still published; unpublish it first")]
    StillPublished {
        /// The volume.
        volume_id: String,
    },
    /// Mounts at a path did not go away after repeated unmounts.
    #[error("{path} is still mounted after {MAX_STACKED_MOUNTS} unmounts")]
    StillMounted {
        /// The path.
        path: PathBuf,
    },
    /// A SINGLE_NODE_SINGLE_WRITER volume is already published at another
    /// target path (CSI spec, NodePublishVolume: the mode allows one
    /// publication at a time; a second one exceeds the capability).
    #[error(
        "Volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published at {other}; unpublish it there first"
    )]
    SingleWriterPublished {
        /// The volume.
        volume_id: String,
        /// Where it is published.
        other: PathBuf,
    },
    /// A read-only raw block publish: the kernel does not enforce a
    /// read-only mount on a device node, so it cannot be honoured yet.
    #[error("Read-only publishing of raw block volumes is not supported")]
    ReadOnlyBlock,
    /// NodeExpandVolume asked for more than the attached device holds: the
    /// volume was not expanded (ControllerExpandVolume) before it was
    /// staged here.
    #[error(
        "Volume {volume_id} needs {required_bytes} bytes but its device holds {device_bytes}; expansion is offline: unstage, ControllerExpandVolume, stage again"
    )]
    BeyondDevice {
        /// The volume.
        volume_id: String,
        /// The capacity asked for.
        required_bytes: u64,
        /// The attached device's size.
        device_bytes: u64,
    },
    /// NodeExpandVolume's `volume_capability` does not describe what is
    /// staged or published at `volume_path` (CSI spec, NodeExpandVolume:
    /// "Exceeds capabilities").
    #[error("Volume {volume_id} at {path} is not {requested}: {found}")]
    CapabilityMismatch {
        /// The volume.
        volume_id: String,
        /// The path given.
        path: PathBuf,
        /// The access the capability names.
        requested: String,
        /// What is there.
        found: String,
    },
    /// No volume is staged or published at the given path.
    #[error("Volume {volume_id} is not staged or published at {path}")]
    VolumeNotFound {
        /// The volume.
        volume_id: String,
        /// The path given.
        path: PathBuf,
    },
    /// Attaching or detaching failed.
    #[error(transparent)]
    Attach(#[from] attach::Error),
    /// A mount or filesystem operation failed.
    #[error(transparent)]
    Mount(#[from] mount::Error),
}

/// Result of the stage and publish logic.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = crate::error_chain(&e);
        match e {
            // CSI spec, NodeExpandVolume: "Exceeds capabilities" is
            // INVALID_ARGUMENT there (FAILED_PRECONDITION in stage and
            // publish).
            Error::MissingField(_)
            | Error::InvalidField { .. }
            | Error::UnsupportedFsType(_)
            | Error::CapabilityMismatch { .. } => tonic::Status::invalid_argument(msg),
            // CSI spec, NodeStageVolume: "Volume published but is
            // incompatible"; a second staging path is an incompatible
            // argument too (the CO "SHALL ensure that there is only one
            // staging_target_path per volume").
            Error::StagedIncompatible { .. }
            | Error::PublishedIncompatible { .. }
            | Error::InUseElsewhere { .. } => tonic::Status::already_exists(msg),
            Error::BeyondDevice { .. } => tonic::Status::out_of_range(msg),
            Error::UnsupportedAccessMode(_)
            | Error::StagingPathNotSet
            | Error::NotStaged { .. }
            | Error::FsTypeMismatch { .. }
            | Error::ForeignSignature { .. }
            | Error::StillPublished { .. }
            | Error::SingleWriterPublished { .. }
            | Error::ReadOnlyBlock => tonic::Status::failed_precondition(msg),
            Error::VolumeNotFound { .. } => tonic::Status::not_found(msg),
            Error::StillMounted { .. } => tonic::Status::internal(msg),
            Error::Attach(e) => e.into(),
            Error::Mount(e) => e.into(),
        }
    }
}

/// The access type of a volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A raw block device.
    Block,
    /// A mounted filesystem; `fs_type` `None` means "the one on the device,
    /// or [`FsType::DEFAULT`] on a blank device".
    Mount {
        /// The requested filesystem.
        fs_type: Option<FsType>,
        /// CSI mount flags.
        flags: Vec<String>,
    },
}

/// A CSI volume capability, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Block or mount.
    pub access: Access,
    /// True for the `*_READER_ONLY` access modes: the volume is staged
    /// read-only.
    pub reader_only: bool,
    /// True for SINGLE_NODE_SINGLE_WRITER (Kubernetes ReadWriteOncePod):
    /// the volume may be published at one target path only.
    pub single_writer: bool,
}

/// Checks a CSI `volume_capability` (REQUIRED in every stage and publish
/// call) and converts it.
pub fn capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability> {
    use csi::volume_capability::AccessType;
    use csi::volume_capability::access_mode::Mode;

    let cap = cap.ok_or(Error::MissingField("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .filter(|m| *m != Mode::Unknown)
        .ok_or(Error::MissingField("volume_capability.access_mode"))?;
    let access = match cap.access_type.as_ref() {
        None => return Err(Error::MissingField("volume_capability.access_type")),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if matches!(
                mode,
                Mode::MultiNodeMultiWriter | Mode::MultiNodeSingleWriter
            ) {
                return Err(Error::UnsupportedAccessMode(mode.as_str_name().to_string()));
            }
            let fs_type = match m.fs_type.as_str() {
                "" => None,
                other => Some(
                    FsType::parse(other).ok_or_else(|| Error::UnsupportedFsType(other.into()))?,
                ),
            };
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability {
        access,
        reader_only: matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly),
        single_writer: mode == Mode::SingleNodeSingleWriter,
    })
}

/// NodeStageVolume, converted.
#[derive(Debug, Clone)]
pub struct StageRequest {
    /// The volume.
    pub volume_id: String,
    /// The export's URI, from the publish context.
    pub uri: String,
    /// Where to mount the filesystem (ignored for block access).
    pub staging_path: PathBuf,
    /// The checked capability.
    pub capability: Capability,
}

/// NodePublishVolume, converted.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// The volume.
    pub volume_id: String,
    /// Where it was staged (REQUIRED: the plugin stages).
    pub staging_path: PathBuf,
    /// Where to publish it: a directory (mount) or a file (block).
    pub target_path: PathBuf,
    /// The checked capability.
    pub capability: Capability,
    /// Publish read-only.
    pub read_only: bool,
}

fn absolute(field: &'static str, path: &Path) -> Result<()> {
    if path.as_os_str().is_empty() {
        return Err(Error::MissingField(field));
    }
    if !path.is_absolute() {
        return Err(Error::InvalidField {
            field,
            reason: format!("{} is not an absolute path", path.display()),
        });
    }
    Ok(())
}

fn volume_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(Error::MissingField("volume_id"));
    }
    attach::validate_volume_id(id)?;
    Ok(())
}

/// The device of `volume_id` if it is fully attached.
async fn attached_device(attacher: &dyn Attacher, volume_id: &str) -> Result<Option<PathBuf>> {
    Ok(attacher.find(volume_id).await?.and_then(|a| a.device))
}

/// True when `device` is mounted anywhere or its node is bind-mounted.
async fn device_in_use(mounter: &dyn Mounter, device: &Path) -> Result<bool> {
    let rdev = mounter.device_number(device).await?;
    let mounts = mounter.mounts().await?;
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    Ok(attach::device_in_use(name, rdev, &mounts))
}

/// NodeStageVolume: attaches the export, creates a filesystem if the
/// device is blank, and mounts it at the staging path (mount access); for
/// block access only attaches.
#[instrument(skip_all, err, fields(volume.id = %req.volume_id))]
pub async fn stage(
    attacher: &dyn Attacher,
    mounter: &dyn Mounter,
    req: &StageRequest,
) -> Result<()> {
    volume_id(&req.volume_id)?;
    absolute("staging_target_path", &req.staging_path)?;
    if req.uri.is_empty() {
        return Err(Error::MissingField("publish_context (NBD URI)"));
    }
    let uri: NbdUri = req.uri.parse()?;

    let existing = attacher.find(&req.volume_id).await?;
    if let Some(uri_now) = existing.as_ref().and_then(|a| a.uri.as_deref())
        && uri_now != uri.as_str()
    {
        return Err(Error::StagedIncompatible {
            path: req.staging_path.clone(),
            reason: format!("the volume is attached from {uri_now}"),
        });
    }
    let existing_device = existing.and_then(|a| a.device);

    if let Access::Mount { fs_type, .. } = &req.capability.access {
        if let Some(entry) = mounter.mounted_at(&req.staging_path).await? {
            let ours = match &existing_device {
                Some(dev) => mounter.device_number(dev).await? == entry.dev(),
                None => false,
            };
            if !ours {
                return Err(Error::StagedIncompatible {
                    path: req.staging_path.clone(),
                    reason: format!("{} ({}) is mounted there", entry.source, entry.fs_type),
                });
            }
            if let Some(fs) = fs_type.filter(|fs| fs.as_str() != entry.fs_type) {
                return Err(Error::StagedIncompatible {
                    path: req.staging_path.clone(),
                    reason: format!("staged as {}, {fs} requested", entry.fs_type),
                });
            }
            if entry.read_only() != req.capability.reader_only {
                return Err(Error::StagedIncompatible {
                    path: req.staging_path.clone(),
                    reason: "staged with another read-only mode".into(),
                });
            }
            info!(path = %req.staging_path.display(), "already staged");
            return Ok(());
        }
        if let Some(dev) = &existing_device
            && device_in_use(mounter, dev).await?
        {
            return Err(Error::InUseElsewhere {
                volume_id: req.volume_id.clone(),
            });
        }
    }

    let device = attacher.attach(&req.volume_id, &uri).await?;
    let staged = match &req.capability.access {
        Access::Block => Ok(()),
        Access::Mount { fs_type, flags } => {
            format_and_mount(mounter, &device, *fs_type, flags, req).await
        }
    };
    if let Err(e) = staged {
        // Nothing may stay attached after a failed stage, unless the
        // device is in use by someone (then it was not ours to take away).
        match device_in_use(mounter, &device).await {
            Ok(false) => {
                if let Err(cleanup) = attacher.detach(&req.volume_id).await {
                    warn!(error = %cleanup, "detach after a failed stage failed");
                }
            }
            Ok(true) => {
                warn!(device = %device.display(), "not detaching a device in use after a failed stage")
            }
            Err(check) => warn!(error = %check, "cannot tell whether the device is in use"),
        }
        return Err(e);
    }
    info!(device = %device.display(), path = %req.staging_path.display(), "staged");
    Ok(())
}

/// Creates a filesystem on a blank device or checks the one on it, grows
/// an existing one that is smaller than its device (ControllerExpandVolume
/// is offline, so a volume comes back here bigger), and mounts it. On an
/// error after the mount, unmounts again.
async fn format_and_mount(
    mounter: &dyn Mounter,
    device: &Path,
    requested: Option<FsType>,
    flags: &[String],
    req: &StageRequest,
) -> Result<()> {
    let (fs, created) = match mounter.probe(device).await? {
        Signature::Blank => {
            let fs = requested.unwrap_or(FsType::DEFAULT);
            info!(device = %device.display(), fs = %fs, "device is blank; creating a filesystem");
            mounter.mkfs(device, fs).await?;
            (fs.as_str().to_string(), true)
        }
        Signature::Filesystem(existing) => {
            if let Some(requested) = requested.filter(|r| r.as_str() != existing) {
                return Err(Error::FsTypeMismatch {
                    device: device.to_path_buf(),
                    existing,
                    requested,
                });
            }
            (existing, false)
        }
        Signature::Other(what) => {
            return Err(Error::ForeignSignature {
                device: device.to_path_buf(),
                what,
            });
        }
    };
    // A filesystem just made fills its device; a read-only stage must not
    // write; a type the plugin does not make (ext3 found on the device) is
    // mounted as it is.
    let grow = match FsType::parse(&fs) {
        Some(fs) if !created && !req.capability.reader_only => {
            smaller_than_device(mounter, device, fs).await?
        }
        _ => None,
    };
    if grow == Some(FsType::Ext4) {
        mounter.grow_offline(device, FsType::Ext4).await?;
        info!(device = %device.display(), "ext4 grown offline to fill the device");
    }
    mounter
        .create_target(&req.staging_path, TargetKind::Directory)
        .await?;
    mounter
        .mount(
            device,
            &req.staging_path,
            &fs,
            flags,
            req.capability.reader_only,
        )
        .await?;
    if grow == Some(FsType::Xfs) {
        if let Err(e) = mounter.grow(device, &req.staging_path, &fs).await {
            if let Err(cleanup) = mounter.unmount(&req.staging_path).await {
                warn!(error = %cleanup, "unmount after a failed growth failed");
            }
            return Err(e.into());
        }
        info!(device = %device.display(), "xfs grown online to fill the device");
    }
    Ok(())
}

/// `Some(fs)` when the filesystem `fs` on the unmounted `device` has room
/// to grow into.
async fn smaller_than_device(
    mounter: &dyn Mounter,
    device: &Path,
    fs: FsType,
) -> Result<Option<FsType>> {
    let geometry = mounter.fs_geometry(device, fs).await?;
    let device_bytes = mounter.block_size_bytes(device).await?;
    if !geometry.smaller_than(device_bytes) {
        return Ok(None);
    }
    info!(
        device = %device.display(),
        fs = %fs,
        fs_bytes = geometry.bytes(),
        device_bytes,
        "the device is larger than its filesystem; growing it"
    );
    Ok(Some(fs))
}

/// Unmounts every mount stacked at `path`.
async fn unmount_all(mounter: &dyn Mounter, path: &Path) -> Result<()> {
    for _ in 0..MAX_STACKED_MOUNTS {
        if mounter.mounted_at(path).await?.is_none() {
            return Ok(());
        }
        mounter.unmount(path).await?;
    }
    if mounter.mounted_at(path).await?.is_none() {
        return Ok(());
    }
    Err(Error::StillMounted {
        path: path.to_path_buf(),
    })
}

/// NodeUnstageVolume: unmounts the staging path and detaches the device.
/// A volume that is not staged is fine; one that is still published is
/// refused.
#[instrument(skip_all, err, fields(volume.id = %volume, path = %staging_path.display()))]
pub async fn unstage(
    attacher: &dyn Attacher,
    mounter: &dyn Mounter,
    volume: &str,
    staging_path: &Path,
) -> Result<()> {
    volume_id(volume)?;
    absolute("staging_target_path", staging_path)?;
    let device = attached_device(attacher, volume).await?;
    if let (Some(dev), Some(entry)) = (&device, mounter.mounted_at(staging_path).await?)
        && mounter.device_number(dev).await? != entry.dev()
    {
        return Err(Error::StagedIncompatible {
            path: staging_path.to_path_buf(),
            reason: format!("{} is mounted there, not {}", entry.source, dev.display()),
        });
    }
    if let Some(dev) = &device {
        // Any other mount of the device (a publish bind) must go first;
        // refuse before touching the staging mount.
        let rdev = mounter.device_number(dev).await?;
        let others: Vec<_> = mounter
            .mounts()
            .await?
            .into_iter()
            .filter(|m| m.mount_point != staging_path)
            .collect();
        let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if attach::device_in_use(name, rdev, &others) {
            return Err(Error::StillPublished {
                volume_id: volume.to_string(),
            });
        }
    }
    unmount_all(mounter, staging_path).await?;
    attacher.detach(volume).await?;
    info!("unstaged");
    Ok(())
}

/// NodePublishVolume: bind-mounts the staged filesystem onto the target
/// directory, or the device node onto the target file (block access);
/// read-only if asked.
#[instrument(skip_all, err, fields(volume.id = %req.volume_id, path = %req.target_path.display()))]
pub async fn publish(
    attacher: &dyn Attacher,
    mounter: &dyn Mounter,
    req: &PublishRequest,
) -> Result<()> {
    volume_id(&req.volume_id)?;
    absolute("target_path", &req.target_path)?;
    if req.staging_path.as_os_str().is_empty() {
        return Err(Error::StagingPathNotSet);
    }
    absolute("staging_target_path", &req.staging_path)?;
    let read_only = req.read_only || req.capability.reader_only;
    let not_staged = || Error::NotStaged {
        volume_id: req.volume_id.clone(),
        path: req.staging_path.clone(),
    };
    let device = attached_device(attacher, &req.volume_id)
        .await?
        .ok_or_else(not_staged)?;
    let rdev = mounter.device_number(&device).await?;

    let (source, kind) = match req.capability.access {
        // A read-only bind of a device node still opens for writing: the
        // ro flag of a mount does not apply to device files. Refuse rather
        // than publish writable.
        Access::Block if read_only => return Err(Error::ReadOnlyBlock),
        Access::Block => (device.clone(), TargetKind::File),
        Access::Mount { .. } => {
            let staged = mounter
                .mounted_at(&req.staging_path)
                .await?
                .filter(|e| e.dev() == rdev)
                .ok_or_else(not_staged)?;
            if staged.read_only() && !read_only {
                return Err(Error::InvalidField {
                    field: "readonly",
                    reason: "the volume is staged read-only".into(),
                });
            }
            (req.staging_path.clone(), TargetKind::Directory)
        }
    };

    if let Some(entry) = mounter.mounted_at(&req.target_path).await? {
        let same = match kind {
            TargetKind::Directory => entry.dev() == rdev,
            TargetKind::File => mounter.device_number(&req.target_path).await? == rdev,
        };
        if !same {
            return Err(Error::PublishedIncompatible {
                path: req.target_path.clone(),
                reason: format!("{} ({}) is mounted there", entry.source, entry.fs_type),
            });
        }
        if entry.read_only() != read_only {
            return Err(Error::PublishedIncompatible {
                path: req.target_path.clone(),
                reason: format!("published with read-only = {}", entry.read_only()),
            });
        }
        info!("already published");
        return Ok(());
    }
    if req.capability.single_writer {
        let name = device
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let other = mounter.mounts().await?.into_iter().find(|m| {
            m.mount_point != req.staging_path
                && attach::device_in_use(name, rdev, std::slice::from_ref(m))
        });
        if let Some(other) = other {
            return Err(Error::SingleWriterPublished {
                volume_id: req.volume_id.clone(),
                other: other.mount_point,
            });
        }
    }

    mounter.create_target(&req.target_path, kind).await?;
    if let Err(e) = mounter.bind(&source, &req.target_path, read_only).await {
        if let Err(cleanup) = mounter.remove_target(&req.target_path).await {
            warn!(error = %cleanup, "removing the target after a failed publish failed");
        }
        return Err(e.into());
    }
    info!(read_only, "published");
    Ok(())
}

/// NodeUnpublishVolume: unmounts the target and removes the directory or
/// file the publish created. A target that is not there is fine.
#[instrument(skip_all, err, fields(volume.id = %volume, path = %target_path.display()))]
pub async fn unpublish(mounter: &dyn Mounter, volume: &str, target_path: &Path) -> Result<()> {
    volume_id(volume)?;
    absolute("target_path", target_path)?;
    unmount_all(mounter, target_path).await?;
    mounter.remove_target(target_path).await?;
    info!("unpublished");
    Ok(())
}

/// NodeExpandVolume: grows the filesystem staged or published at
/// `volume_path` online to fill its device, which ControllerExpandVolume
/// (offline) grew before the volume was staged. Returns the device's size
/// in bytes. A filesystem that already fills its device (stage grows it)
/// and a raw block volume need no work. `required_bytes` beyond the
/// device is [`Error::BeyondDevice`]; an `access` (the request's OPTIONAL
/// `volume_capability`) that is not what is at the path, block for a
/// filesystem, mount for a device or another filesystem type, is
/// [`Error::CapabilityMismatch`].
#[instrument(skip_all, err, fields(volume.id = %volume, path = %volume_path.display()))]
pub async fn expand(
    attacher: &dyn Attacher,
    mounter: &dyn Mounter,
    volume: &str,
    volume_path: &Path,
    access: Option<&Access>,
    required_bytes: u64,
) -> Result<u64> {
    volume_id(volume)?;
    if volume_path.as_os_str().is_empty() {
        return Err(Error::MissingField("volume_path"));
    }
    let not_found = || Error::VolumeNotFound {
        volume_id: volume.to_string(),
        path: volume_path.to_path_buf(),
    };
    // The volume first, the path's form after (see `stats`).
    let device = attached_device(attacher, volume)
        .await?
        .ok_or_else(not_found)?;
    if !volume_path.is_absolute() {
        return Err(not_found());
    }
    let rdev = mounter.device_number(&device).await?;
    let entry = mounter
        .mounted_at(volume_path)
        .await?
        .ok_or_else(not_found)?;
    let filesystem = entry.dev() == rdev;
    if !filesystem && mounter.device_number(volume_path).await.ok() != Some(rdev) {
        return Err(not_found());
    }
    let mismatch = |requested: String, found: String| Error::CapabilityMismatch {
        volume_id: volume.to_string(),
        path: volume_path.to_path_buf(),
        requested,
        found,
    };
    match access {
        Some(Access::Block) if filesystem => {
            return Err(mismatch(
                "block".into(),
                format!("a mounted {} filesystem", entry.fs_type),
            ));
        }
        Some(Access::Mount { .. }) if !filesystem => {
            return Err(mismatch("a filesystem".into(), "a raw block device".into()));
        }
        Some(Access::Mount {
            fs_type: Some(fs), ..
        }) if fs.as_str() != entry.fs_type => {
            return Err(mismatch(
                fs.to_string(),
                format!("a mounted {} filesystem", entry.fs_type),
            ));
        }
        _ => {}
    }
    let device_bytes = mounter.block_size_bytes(&device).await?;
    if required_bytes > device_bytes {
        return Err(Error::BeyondDevice {
            volume_id: volume.to_string(),
            required_bytes,
            device_bytes,
        });
    }
    if filesystem {
        mounter.grow(&device, volume_path, &entry.fs_type).await?;
        info!(fs = %entry.fs_type, device_bytes, "filesystem fills the device");
    }
    Ok(device_bytes)
}

/// NodeGetVolumeStats, answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes (and inodes of a filesystem).
    pub usage: VolumeStats,
    /// Why the volume is abnormal (its attachment cannot serve I/O);
    /// `None` when it looks healthy from this node.
    pub problem: Option<String>,
}

/// NodeGetVolumeStats: bytes and inodes of the filesystem at `volume_path`,
/// or the size of the device bind-mounted there (block access), and the
/// health of the volume's attachment.
#[instrument(skip_all, err, fields(volume.id = %volume, path = %volume_path.display()))]
pub async fn stats(
    attacher: &dyn Attacher,
    mounter: &dyn Mounter,
    volume: &str,
    volume_path: &Path,
) -> Result<Stats> {
    volume_id(volume)?;
    if volume_path.as_os_str().is_empty() {
        return Err(Error::MissingField("volume_path"));
    }
    let not_found = || Error::VolumeNotFound {
        volume_id: volume.to_string(),
        path: volume_path.to_path_buf(),
    };
    // CSI spec, NodeGetVolumeStats and NodeExpandVolume: a volume this
    // node does not have, and one that "does not exist on the specified
    // path", are both NOT_FOUND. A relative path is one where no volume
    // can be staged or published, so it is the second case, not
    // INVALID_ARGUMENT; the volume is looked up first so that an unknown
    // volume is NOT_FOUND whatever path comes with it.
    let attachment = attacher.find(volume).await?.ok_or_else(not_found)?;
    let device = attachment.device.clone().ok_or_else(not_found)?;
    if !volume_path.is_absolute() {
        return Err(not_found());
    }
    let rdev = mounter.device_number(&device).await?;
    let entry = mounter
        .mounted_at(volume_path)
        .await?
        .ok_or_else(not_found)?;
    let usage = if entry.dev() == rdev {
        mounter.fs_stats(volume_path).await?
    } else if mounter.device_number(volume_path).await.ok() == Some(rdev) {
        VolumeStats {
            total_bytes: mounter.block_size_bytes(volume_path).await?,
            ..VolumeStats::default()
        }
    } else {
        return Err(not_found());
    };
    Ok(Stats {
        usage,
        problem: attachment.problem,
    })
}
