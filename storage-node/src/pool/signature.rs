//! Finds what a device already carries before the agent dares to format it.
//!
//! Uses `wipefs --no-act --json`, which runs every libblkid probe (filesystems,
//! partition tables, RAID and LVM members, swap) at every offset it knows, as
//! `blkid -p` does, without touching the device.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::{Error, TOOL_TIMEOUT};
use crate::host::command::run_blocking;

/// The XFS filesystem label (`mkfs.xfs -L`) of every Ballast pool.
///
/// XFS labels hold at most 12 bytes, too few for a pool name, so the label
/// marks the filesystem as Ballast's and `ballast-pool.json` names the pool.
/// A foreign XFS (any other label) is refused without being mounted.
pub const XFS_LABEL: &str = "ballast";

/// A signature found on a device: a filesystem, partition table or other
/// on-disk format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Signature {
    /// What libblkid calls it: `ext4`, `xfs`, `dos`, `gpt`, `PMBR`,
    /// `LVM2_member`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Byte offset of the magic on the device, as `wipefs` prints it (`0x438`).
    pub offset: String,
    /// Filesystem label, when the format has one.
    #[serde(default)]
    pub label: Option<String>,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} signature at offset {}", self.kind, self.offset)?;
        if let Some(label) = &self.label {
            write!(f, " (label {label:?})")?;
        }
        Ok(())
    }
}

/// Joins signatures into one readable list for an error message.
pub(super) fn describe(signatures: &[Signature]) -> String {
    signatures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a probed device is, as far as the pool code cares.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Contents {
    /// No signature at all: safe to format.
    Blank,
    /// Only an XFS filesystem labelled [`XFS_LABEL`]: probably a pool, to be
    /// confirmed by its `ballast-pool.json`.
    BallastXfs,
    /// Anything else: never formatted without `force_format`.
    Foreign(Vec<Signature>),
}

/// Lists the signatures on `device`.
///
/// # Errors
///
/// Returns the error of running `wipefs` or of parsing its output.
pub(super) fn probe(device: &Path) -> Result<Vec<Signature>, Error> {
    let out = run_blocking(
        "wipefs",
        ["--no-act".as_ref(), "--json".as_ref(), device.as_os_str()],
        TOOL_TIMEOUT,
    )?;
    parse(&out)
}

/// Classifies a device by its signatures.
pub(super) fn classify(signatures: Vec<Signature>) -> Contents {
    match signatures.as_slice() {
        [] => Contents::Blank,
        [only] if only.kind == "xfs" && only.label.as_deref() == Some(XFS_LABEL) => {
            Contents::BallastXfs
        }
        _ => Contents::Foreign(signatures),
    }
}

fn parse(out: &str) -> Result<Vec<Signature>, Error> {
    #[derive(Deserialize)]
    struct Report {
        #[serde(default)]
        signatures: Vec<Signature>,
    }
    // Older wipefs versions print nothing at all for a blank device.
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str::<Report>(out)
        .map(|r| r.signatures)
        .map_err(|e| Error::CommandOutput {
            command: "wipefs --no-act --json",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(kind: &str, label: Option<&str>) -> Signature {
        Signature {
            kind: kind.to_owned(),
            offset: "0x0".to_owned(),
            label: label.map(str::to_owned),
        }
    }

    #[test]
    fn parses_wipefs_json() {
        let out = r#"{"signatures": [
            {"device":"loop0","offset":"0x438","type":"ext4","uuid":"6db3","label":null},
            {"device":"loop0","offset":"0x1fe","type":"dos","uuid":null,"label":null}
        ]}"#;
        let sigs = parse(out).expect("parse");
        assert_eq!(sigs.len(), 2);
        assert_eq!(sigs[0].kind, "ext4");
        assert_eq!(sigs[0].offset, "0x438");
        assert_eq!(sigs[0].label, None);
        assert_eq!(
            describe(&sigs),
            "ext4 signature at offset 0x438, dos signature at offset 0x1fe"
        );
        assert!(parse("").expect("empty").is_empty());
        assert!(parse("{\"signatures\": []}").expect("no sigs").is_empty());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn classifies_only_our_xfs_as_ours() {
        assert_eq!(classify(vec![]), Contents::Blank);
        assert_eq!(
            classify(vec![sig("xfs", Some(XFS_LABEL))]),
            Contents::BallastXfs
        );
        for foreign in [
            vec![sig("xfs", None)],
            vec![sig("xfs", Some("data"))],
            vec![sig("ext4", Some(XFS_LABEL))],
            vec![sig("xfs", Some(XFS_LABEL)), sig("dos", None)],
        ] {
            assert!(
                matches!(classify(foreign.clone()), Contents::Foreign(s) if s == foreign),
                "{foreign:?}"
            );
        }
    }
}
