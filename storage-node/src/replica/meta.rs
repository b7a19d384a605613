//! Replica metadata: `<name>.meta.json` next to the replica's `<name>.data`.
//!
//! The metadata file is the commit record of a replica: a data file without
//! one is an unfinished create (or destroy) and is removed on start-up. It is
//! only ever replaced whole through [`crate::durable::replace`], so after a
//! crash it holds either the old or the new contents. The highest accepted
//! epoch lives here because fencing must survive restarts: a replica persists
//! a new epoch before accepting any I/O under it.

use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Error;
use crate::durable;

/// The metadata format this code writes and the newest it reads.
pub const META_FORMAT_VERSION: u32 = 1;

/// File name suffix of replica data files.
pub const DATA_SUFFIX: &str = ".data";

/// File name suffix of replica metadata files.
pub const META_SUFFIX: &str = ".meta.json";

/// Contents of a replica's metadata file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeta {
    /// Metadata format version, [`META_FORMAT_VERSION`] when written by this
    /// code.
    pub format_version: u32,
    /// The volume this replica is a copy of.
    pub volume_id: String,
    /// Size of the replica (the volume) in bytes.
    pub size_bytes: u64,
    /// Thin (sparse) or thick (fully allocated up front).
    pub thin: bool,
    /// Highest epoch this replica has accepted; requests carrying a lower one
    /// are refused. Starts at 0.
    pub epoch: u64,
    /// When the replica was created, in seconds since the Unix epoch.
    pub created_at_unix_secs: u64,
    /// The snapshot copy the replica was restored from; empty if none.
    /// Absent from metadata written before restores existed (read as empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source_snapshot: String,
}

impl ReplicaMeta {
    /// Returns the metadata of a replica created now, at epoch 0.
    pub fn new(volume_id: &str, size_bytes: u64, thin: bool) -> Self {
        Self {
            format_version: META_FORMAT_VERSION,
            volume_id: volume_id.to_owned(),
            size_bytes,
            thin,
            epoch: 0,
            created_at_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            source_snapshot: String::new(),
        }
    }

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

    /// Replaces the metadata file atomically and durably.
    ///
    /// # Errors
    ///
    /// [`Error::WriteMeta`]; the previous contents are then still in place.
    pub fn store(&self, path: &Path) -> Result<(), Error> {
        let write_err = |source| Error::WriteMeta {
            path: path.to_owned(),
            source,
        };
        let mut json = serde_json::to_vec_pretty(self)
            .map_err(|e| write_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        json.push(b'\n');
        durable::replace(path, &json).map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_rejects_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(format!("r1{META_SUFFIX}"));

        assert!(matches!(
            ReplicaMeta::load(&path),
            Err(Error::ReadMeta { source, .. }) if source.kind() == io::ErrorKind::NotFound
        ));

        let meta = ReplicaMeta::new("vol-1", 1 << 20, true);
        assert_eq!(meta.epoch, 0);
        assert!(meta.created_at_unix_secs > 0);
        meta.store(&path).expect("store");
        assert_eq!(ReplicaMeta::load(&path).expect("load"), meta);

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(json["volume_id"], "vol-1");
        assert_eq!(json["size_bytes"], 1 << 20);
        assert_eq!(json["format_version"], META_FORMAT_VERSION);

        let newer = ReplicaMeta {
            format_version: META_FORMAT_VERSION + 1,
            ..meta
        };
        newer.store(&path).expect("store newer");
        assert!(matches!(
            ReplicaMeta::load(&path),
            Err(Error::UnsupportedMetaVersion { version, .. }) if version == META_FORMAT_VERSION + 1
        ));

        // Metadata written before restores existed has no source_snapshot.
        std::fs::write(
            &path,
            br#"{"format_version":1,"volume_id":"v","size_bytes":4096,"thin":true,"epoch":2,"created_at_unix_secs":5}"#,
        )
        .expect("old metadata");
        let old = ReplicaMeta::load(&path).expect("load old metadata");
        assert_eq!(old.source_snapshot, "");
        assert_eq!(old.epoch, 2);

        std::fs::write(&path, b"{\"volume_id\": 3").expect("corrupt");
        assert!(matches!(
            ReplicaMeta::load(&path),
            Err(Error::ParseMeta { .. })
        ));
    }
}
