//! Volume capabilities (CSI spec, VolumeCapability): their form, which
//! ones Ballast serves, and their form in the volume record
//! ([`CapabilityRecord`], with the filesystem resolved).
//!
//! A volume is served by one target, on one node, at a time. So only the
//! single-node access modes are served (`SINGLE_NODE_WRITER`,
//! `SINGLE_NODE_READER_ONLY`, `SINGLE_NODE_SINGLE_WRITER`,
//! `SINGLE_NODE_MULTI_WRITER`). The multi-node ones are refused, and
//! `MULTI_NODE_READER_ONLY` too: reading a volume on two nodes at once
//! needs two targets or a target reached across nodes, neither of which
//! exists; Kubernetes would attach the second node and wait forever.
//! Access is block or mount with ext4 or xfs.

use ballast_proto::csi;
use ballast_proto::csi::volume_capability::AccessType;
use ballast_proto::csi::volume_capability::access_mode::Mode;

use super::{Error, invalid};
use crate::controller::volume::record::CapabilityRecord;
use crate::node::mount::FsType;

/// The access modes a volume may be used with.
const SUPPORTED_MODES: [Mode; 4] = [
    Mode::SingleNodeWriter,
    Mode::SingleNodeReaderOnly,
    Mode::SingleNodeSingleWriter,
    Mode::SingleNodeMultiWriter,
];

/// Checks the form of `cap` and resolves it: a mount without a filesystem
/// type gets `fs_type` (the volume's).
///
/// # Errors
///
/// [`Error::InvalidArgument`] if the access mode or type is missing.
pub(super) fn resolve(
    cap: &csi::VolumeCapability,
    fs_type: &str,
) -> Result<CapabilityRecord, Error> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| invalid("volume_capability.access_mode is required"))?;
    let fs_type = match cap.access_type.as_ref() {
        None => return Err(invalid("volume_capability.access_type is required")),
        Some(AccessType::Block(_)) => None,
        Some(AccessType::Mount(m)) if m.fs_type.is_empty() => Some(fs_type.to_string()),
        Some(AccessType::Mount(m)) => Some(m.fs_type.clone()),
    };
    Ok(CapabilityRecord {
        access_mode: mode.as_str_name().to_string(),
        fs_type,
    })
}

/// Why Ballast cannot serve `cap`, `None` if it can.
pub(super) fn unsupported(cap: &CapabilityRecord) -> Option<String> {
    if !SUPPORTED_MODES
        .iter()
        .any(|m| m.as_str_name() == cap.access_mode)
    {
        return Some(format!(
            "access mode {} is not supported: a volume is served by one target on one node at a time, so only single-node modes are",
            cap.access_mode
        ));
    }
    match &cap.fs_type {
        Some(fs) if FsType::parse(fs).is_none() => Some(format!(
            "filesystem type {fs:?} is not supported (ext4, xfs)"
        )),
        _ => None,
    }
}

/// Resolves `cap` for `volume_fs` and refuses what Ballast cannot serve.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if it is malformed or not supported.
pub(super) fn supported(
    cap: &csi::VolumeCapability,
    volume_fs: &str,
) -> Result<CapabilityRecord, Error> {
    let resolved = resolve(cap, volume_fs)?;
    match unsupported(&resolved) {
        Some(reason) => Err(invalid(reason)),
        None => Ok(resolved),
    }
}

/// The filesystem a new volume gets: the mount capabilities' `fs_type`
/// (they must agree), else the StorageClass's `fsType`, else ext4.
///
/// # Errors
///
/// [`Error::InvalidArgument`] if the capabilities name two filesystems or
/// contradict the `fsType` parameter: a volume holds one filesystem.
pub(super) fn fs_type_for_create(
    caps: &[csi::VolumeCapability],
    parameter: Option<FsType>,
) -> Result<String, Error> {
    let mut named: Vec<&str> = caps
        .iter()
        .filter_map(|c| match c.access_type.as_ref() {
            Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => Some(m.fs_type.as_str()),
            _ => None,
        })
        .collect();
    named.sort_unstable();
    named.dedup();
    match (named.as_slice(), parameter) {
        ([], parameter) => Ok(parameter.unwrap_or(FsType::DEFAULT).as_str().to_string()),
        ([one], None) => Ok(one.to_string()),
        ([one], Some(parameter)) if *one == parameter.as_str() => Ok(one.to_string()),
        ([one], Some(parameter)) => Err(invalid(format!(
            "volume_capabilities ask for fs_type {one:?} but parameter fsType is {:?}",
            parameter.as_str()
        ))),
        (several, _) => Err(invalid(format!(
            "volume_capabilities ask for several filesystems ({}); a volume holds one",
            several.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use ballast_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    use super::*;

    fn cap(mode: Mode, fs: Option<&str>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode.into() }),
            access_type: Some(match fs {
                None => AccessType::Block(BlockVolume {}),
                Some(fs) => AccessType::Mount(MountVolume {
                    fs_type: fs.into(),
                    ..Default::default()
                }),
            }),
        }
    }

    #[test]
    fn a_mount_without_fs_type_gets_the_volumes() {
        let resolved = resolve(&cap(Mode::SingleNodeWriter, Some("")), "xfs").expect("resolve");
        assert_eq!(resolved.fs_type.as_deref(), Some("xfs"));
        assert_eq!(resolved.access_mode, "SINGLE_NODE_WRITER");
        let block = resolve(&cap(Mode::SingleNodeWriter, None), "xfs").expect("resolve");
        assert_eq!(block.fs_type, None);
        let mut no_mode = cap(Mode::SingleNodeWriter, None);
        no_mode.access_mode = None;
        assert!(resolve(&no_mode, "ext4").is_err());
    }

    #[test]
    fn only_single_node_modes_and_known_filesystems_are_served() {
        for mode in SUPPORTED_MODES {
            assert!(
                supported(&cap(mode, Some("ext4")), "ext4").is_ok(),
                "{mode:?}"
            );
        }
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let err = supported(&cap(mode, None), "ext4").expect_err("multi-node");
            assert!(err.to_string().contains("single-node"), "{err}");
        }
        let err =
            supported(&cap(Mode::SingleNodeWriter, Some("btrfs")), "ext4").expect_err("btrfs");
        assert!(err.to_string().contains("btrfs"), "{err}");
    }

    #[test]
    fn a_new_volume_gets_one_filesystem() {
        let mount = |fs| cap(Mode::SingleNodeWriter, Some(fs));
        assert_eq!(
            fs_type_for_create(&[mount("")], None).ok().as_deref(),
            Some("ext4")
        );
        assert_eq!(
            fs_type_for_create(&[mount("")], Some(FsType::Xfs))
                .ok()
                .as_deref(),
            Some("xfs")
        );
        assert_eq!(
            fs_type_for_create(&[mount("xfs"), mount("")], Some(FsType::Xfs))
                .ok()
                .as_deref(),
            Some("xfs")
        );
        assert!(fs_type_for_create(&[mount("xfs")], Some(FsType::Ext4)).is_err());
        assert!(fs_type_for_create(&[mount("xfs"), mount("ext4")], None).is_err());
    }
}
