//! The pool label: `ballast-pool.json` at the root of a pool's filesystem.
//!
//! The label is what makes an XFS filesystem a Ballast pool: its name is
//! authoritative on import (it wins over a name derived from the device) and
//! its uuid identifies the pool to the controller across restarts, device
//! renames and moves to another node.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Error;
use crate::durable;

/// File name of the label at the root of the pool filesystem.
pub const LABEL_FILE: &str = "ballast-pool.json";

/// The label format this code writes and the newest it reads.
pub const LABEL_FORMAT_VERSION: u32 = 1;

/// Contents of `ballast-pool.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolLabel {
    /// Label format version, [`LABEL_FORMAT_VERSION`] when written by this code.
    pub format_version: u32,
    /// Pool name, unique on the node.
    pub name: String,
    /// Pool identity, a random (v4) uuid chosen when the pool was formatted.
    pub uuid: Uuid,
    /// When the pool was formatted, in seconds since the Unix epoch.
    pub created_at_unix_secs: u64,
}

impl PoolLabel {
    /// Returns a label for a pool formatted now.
    pub fn new(name: &str) -> Self {
        Self {
            format_version: LABEL_FORMAT_VERSION,
            name: name.to_owned(),
            uuid: Uuid::new_v4(),
            created_at_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Parses the contents of a label file read from `path` (which only
    /// names the file in errors). Reading a pool's label calls this; the
    /// fuzz targets (`fuzz/`) call it with their input.
    ///
    /// # Errors
    ///
    /// [`Error::ReadLabel`] if it cannot be parsed,
    /// [`Error::UnsupportedLabelVersion`] if it was written by a newer
    /// Ballast.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let path = path.to_owned();
        let label: PoolLabel = serde_json::from_slice(bytes).map_err(|e| Error::ReadLabel {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if label.format_version > LABEL_FORMAT_VERSION {
            return Err(Error::UnsupportedLabelVersion {
                path,
                version: label.format_version,
            });
        }
        Ok(label)
    }
}

/// Reads the label of the filesystem mounted at `root`; `None` if it has none.
///
/// # Errors
///
/// [`Error::ReadLabel`] if the file exists but cannot be read or parsed,
/// [`Error::UnsupportedLabelVersion`] if it was written by a newer Ballast.
pub(super) fn read(root: &Path) -> Result<Option<PoolLabel>, Error> {
    let path = root.join(LABEL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::ReadLabel { path, source }),
    };
    PoolLabel::parse(&path, &bytes).map(Some)
}

/// Writes the label at the root of the filesystem mounted at `root`,
/// atomically and durably.
///
/// # Errors
///
/// [`Error::WriteLabel`] if the file could not be written.
pub(super) fn write(root: &Path, label: &PoolLabel) -> Result<(), Error> {
    let path = root.join(LABEL_FILE);
    let mut json = serde_json::to_vec_pretty(label).map_err(|e| Error::WriteLabel {
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    json.push(b'\n');
    durable::replace(&path, &json).map_err(|source| Error::WriteLabel { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_round_trips_and_rejects_newer_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read missing"), None);

        let label = PoolLabel::new("pool-a");
        assert_eq!(label.uuid.get_version_num(), 4);
        write(dir.path(), &label).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(label.clone()));

        let newer = PoolLabel {
            format_version: LABEL_FORMAT_VERSION + 1,
            ..label
        };
        write(dir.path(), &newer).expect("write newer");
        assert!(matches!(
            read(dir.path()),
            Err(Error::UnsupportedLabelVersion { version, .. }) if version == LABEL_FORMAT_VERSION + 1
        ));

        std::fs::write(dir.path().join(LABEL_FILE), b"{ torn").expect("corrupt");
        assert!(matches!(read(dir.path()), Err(Error::ReadLabel { .. })));
    }
}
