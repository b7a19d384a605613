//! The replica catalog's file operations: creating, cloning, sizing and
//! checking data files. Each removes what it made when it fails, so the
//! catalog's callers find no half-made file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use tracing::warn;

use super::{Error, ReplicaMeta, SourceCopy};
use crate::durable;

/// Creates and sizes a data file and fsyncs it; removes it again on error.
pub(super) fn create_data(
    data_path: &Path,
    meta_path: &Path,
    size_bytes: u64,
    thin: bool,
) -> Result<(), Error> {
    let file = open_new_data(data_path, meta_path)?;
    let sized = set_size(&file, data_path, 0, size_bytes, thin).and_then(|()| {
        file.sync_all().map_err(|source| Error::SyncData {
            path: data_path.to_owned(),
            source,
        })
    });
    if let Err(e) = sized {
        drop(file);
        remove_quietly(data_path);
        return Err(e);
    }
    Ok(())
}

/// Creates a data file as a reflink of a snapshot copy's, sized to
/// `size_bytes`, and fsyncs it; removes it again on error.
pub(super) fn clone_data(
    data_path: &Path,
    meta_path: &Path,
    source: &SourceCopy,
    size_bytes: u64,
    thin: bool,
) -> Result<(), Error> {
    let src = File::open(&source.data_path).map_err(|e| Error::OpenData {
        path: source.data_path.clone(),
        source: e,
    })?;
    let file = open_new_data(data_path, meta_path)?;
    let cloned = crate::snapshot::reflink::clone_file(&src, &file)
        .map_err(|errno| {
            if crate::snapshot::reflink::is_unsupported(errno) {
                Error::ReflinkUnsupported {
                    path: data_path.to_owned(),
                    source_path: source.data_path.clone(),
                    source: errno,
                }
            } else if crate::snapshot::reflink::is_no_space(errno) {
                Error::NoSpace {
                    path: data_path.to_owned(),
                    source: errno,
                }
            } else {
                Error::CloneData {
                    path: data_path.to_owned(),
                    source_path: source.data_path.clone(),
                    source: errno,
                }
            }
        })
        .and_then(|()| {
            // Thin: only the tail past the copy is new (a hole). Thick: every
            // hole from offset 0 is allocated; shared extents stay shared.
            let from = if thin { source.size_bytes } else { 0 };
            set_size(&file, data_path, from, size_bytes, thin)
        })
        .and_then(|()| {
            file.sync_all().map_err(|e| Error::SyncData {
                path: data_path.to_owned(),
                source: e,
            })
        });
    if let Err(e) = cloned {
        drop(file);
        remove_quietly(data_path);
        return Err(e);
    }
    Ok(())
}

/// Creates a new, empty data file (`O_EXCL`); a leftover without metadata
/// is removed first.
pub(super) fn open_new_data(data_path: &Path, meta_path: &Path) -> Result<File, Error> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(data_path)
    };
    let file = match open() {
        // Left by a create whose cleanup failed: without metadata it is
        // garbage, exactly what the next start-up would remove.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !meta_path.exists() => {
            warn!(path = %data_path.display(), "Removing a leftover data file before create");
            fs::remove_file(data_path).and_then(|()| open())
        }
        other => other,
    }
    .map_err(|source| match source.raw_os_error().map(Errno::from_raw) {
        // No room for the new inode.
        Some(errno @ (Errno::ENOSPC | Errno::EDQUOT)) => Error::NoSpace {
            path: data_path.to_owned(),
            source: errno,
        },
        _ => Error::OpenData {
            path: data_path.to_owned(),
            source,
        },
    })?;
    Ok(file)
}

/// Extends a data file from `from` to `to` bytes: a hole when thin, allocated
/// blocks when thick.
pub(super) fn set_size(
    file: &File,
    path: &Path,
    from: u64,
    to: u64,
    thin: bool,
) -> Result<(), Error> {
    let off = |bytes: u64| {
        libc::off_t::try_from(bytes).map_err(|_| Error::InvalidSize { size_bytes: bytes })
    };
    let result = if thin {
        nix::unistd::ftruncate(file, off(to)?)
    } else {
        nix::fcntl::fallocate(file, FallocateFlags::empty(), off(from)?, off(to - from)?)
    };
    result.map_err(|source| match source {
        Errno::ENOSPC | Errno::EDQUOT => Error::NoSpace {
            path: path.to_owned(),
            source,
        },
        _ => Error::ResizeData {
            path: path.to_owned(),
            source,
        },
    })
}

/// Returns why a data file does not back its metadata, if it does not.
pub(super) fn check_data(data_path: &Path, meta: &ReplicaMeta) -> Result<(), String> {
    let len = match fs::metadata(data_path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "metadata without data file {}",
                data_path.display()
            ));
        }
        Err(e) => return Err(format!("cannot stat {}: {e}", data_path.display())),
    };
    if len < meta.size_bytes {
        return Err(format!(
            "data file is {len} bytes, metadata says {}",
            meta.size_bytes
        ));
    }
    if len > meta.size_bytes {
        warn!(path = %data_path.display(), len, size_bytes = meta.size_bytes, "Data file is longer than its metadata: an interrupted grow");
    }
    Ok(())
}

pub(super) fn remove_quietly(path: &Path) {
    if let Err(e) = durable::remove(path) {
        warn!(path = %path.display(), error = %e, "Cannot remove file");
    }
}
