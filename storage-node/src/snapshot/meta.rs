//! Snapshot copy metadata: `<snapshot id>.meta.json` next to the copy's
//! `<snapshot id>.data`.
//!
//! The metadata file is the commit record of a copy: a data file without
//! one is an unfinished copy and is removed at start-up. It is written once,
//! through [`crate::durable::replace`], and never changed (a copy is
//! read-only); deleting a copy removes it first.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Error;
use crate::durable;

/// The metadata format this code writes and the newest it reads.
pub const META_FORMAT_VERSION: u32 = 1;

/// Contents of a snapshot copy's metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyMeta {
    /// Metadata format version, [`META_FORMAT_VERSION`] when written by this
    /// code.
    pub format_version: u32,
    /// The snapshot id; equals the file name's stem.
    pub snapshot_id: String,
    /// The replica the copy was taken of (which may since be destroyed).
    pub replica_name: String,
    /// That replica's volume; empty for a standalone replica.
    pub volume_id: String,
    /// The replica's size when the copy was taken, in bytes: the copy's size.
    pub size_bytes: u64,
    /// When the copy was taken (its metadata written), in nanoseconds since
    /// the Unix epoch.
    pub created_at_unix_nanos: u64,
}

impl CopyMeta {
    /// Reads a metadata file.
    ///
    /// # Errors
    ///
    /// [`Error::ReadMeta`] (including `NotFound`), [`Error::ParseMeta`], or
    /// [`Error::UnsupportedMetaVersion`] for a file written by a newer
    /// Ballast.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::ReadMeta {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &bytes)
    }

    /// Parses the contents of a metadata file read from `path` (which only
    /// names the file in errors). [`load`](Self::load) reads the file and
    /// calls this; the fuzz targets (`fuzz/`) call it with their input.
    ///
    /// # Errors
    ///
    /// [`Error::ParseMeta`], or [`Error::UnsupportedMetaVersion`] for a file
    /// written by a newer Ballast.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, Error> {
        let meta: Self = serde_json::from_slice(bytes).map_err(|source| Error::ParseMeta {
            path: path.to_owned(),
            source,
        })?;
        if meta.format_version > META_FORMAT_VERSION {
            return Err(Error::UnsupportedMetaVersion {
                path: path.to_owned(),
                version: meta.format_version,
            });
        }
        Ok(meta)
    }

    /// Writes the metadata file atomically and durably.
    ///
    /// # Errors
    ///
    /// The I/O error of [`durable::replace`]; nothing is then in place.
    pub fn store(&self, path: &Path) -> io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        json.push(b'\n');
        durable::replace(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s1.meta.json");
        assert!(matches!(
            CopyMeta::load(&path),
            Err(Error::ReadMeta { source, .. }) if source.kind() == io::ErrorKind::NotFound
        ));
        let meta = CopyMeta {
            format_version: META_FORMAT_VERSION,
            snapshot_id: "s1".into(),
            replica_name: "r1".into(),
            volume_id: "vol-1".into(),
            size_bytes: 1 << 20,
            created_at_unix_nanos: 7,
        };
        meta.store(&path).expect("store");
        assert_eq!(CopyMeta::load(&path).expect("load"), meta);

        let newer = CopyMeta {
            format_version: META_FORMAT_VERSION + 1,
            ..meta
        };
        newer.store(&path).expect("store newer");
        assert!(matches!(
            CopyMeta::load(&path),
            Err(Error::UnsupportedMetaVersion { .. })
        ));
        std::fs::write(&path, b"{\"snapshot_id\": ").expect("corrupt");
        assert!(matches!(
            CopyMeta::load(&path),
            Err(Error::ParseMeta { .. })
        ));
    }
}
