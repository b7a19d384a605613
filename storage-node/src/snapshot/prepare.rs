//! Prepared copies: most of a copy's reflink taken before the write barrier,
//! so that the barrier only pays for what changed since.
//!
//! FICLONE's cost grows with the replica's extent count (a fragmented 1 GiB
//! replica with ~64k extents takes about a second), and the volume's writes
//! wait for it. [`prepare`] takes that reflink while writes still flow: the
//! copy's data file `<id>.data`, not fsynced and without metadata, so it is
//! neither listed nor durable (a crash leaves a data file without metadata,
//! which start-up removes like any unfinished copy). The catalog remembers
//! in memory which replica it was prepared of, with the file open for
//! writing. [`SnapshotCatalog::create`] of a prepared id then refreshes it
//! under the barrier (`refresh`): it compares the two files' extent maps
//! ([`ranges::updates`]), reflinks the ranges the replica rewrote
//! (FICLONERANGE), punches those it punched, sets the replica's length,
//! fsyncs and commits the metadata as for any copy.
//!
//! # Invariants
//!
//! - An id is in at most one of the catalog's maps: complete copies,
//!   faulted copies, prepared copies.
//! - A prepared copy's data file is only written by its prepare and its
//!   refresh; once its metadata exists it is a copy like any other.
//! - The reflink of [`prepare`] runs without any lock: into a temporary file
//!   (`.<id>.data.tmp.*`, removed at start-up), renamed to `<id>.data`
//!   under the catalog's lock after checking again that the id is free, so
//!   a concurrent prepare, create or delete of the id never sees a half-made
//!   file.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use tracing::{info, warn};

use super::ranges::{self, Update};
use super::{
    Error, MAX_RANGES_PER_PAGE, SnapshotCatalog, clone_error, no_space_or, paths, remove_quietly,
    trim_to, validate_id,
};
use crate::durable;
use crate::replica::Replica;

/// The block size of our pools (XFS, 4 KiB): reflinked ranges are aligned
/// to it.
const BLOCK: u64 = 4096;

/// A prepared copy: its data file exists, its metadata does not.
#[derive(Debug)]
pub(super) struct PreparedCopy {
    /// The replica it is a reflink of.
    pub(super) replica_name: String,
    /// Name of the pool holding it (the replica's).
    pub(super) pool: String,
    /// Its data file.
    pub(super) data_path: PathBuf,
    /// The data file, open for writing (the file's mode is 0400).
    pub(super) file: File,
}

/// Opens a replica's data file read-only, for a reflink of it.
///
/// # Errors
///
/// [`Error::OpenData`].
pub fn open_replica(replica: &Replica) -> Result<File, Error> {
    File::open(&replica.data_path).map_err(|source| Error::OpenData {
        path: replica.data_path.clone(),
        source,
    })
}

/// Prepares the copy `snapshot_id` of `replica`, whose data file the caller
/// opened ([`open_replica`]) under the replica catalog's lock and may have
/// released it since. Takes `copies`' lock twice, briefly, and runs the
/// FICLONE between without it. Idempotent: a copy already prepared of the
/// same replica is kept as it is.
///
/// # Errors
///
/// [`Error::InvalidId`], [`Error::Faulted`], [`Error::AlreadyExists`] if
/// the id is prepared of another replica or is a complete copy,
/// [`Error::Pool`], [`Error::ReflinkUnsupported`], [`Error::NoSpace`], and
/// file errors. On error no files are left behind.
pub fn prepare(
    copies: &parking_lot::Mutex<SnapshotCatalog>,
    snapshot_id: &str,
    replica: &Replica,
    src: &File,
) -> Result<(), Error> {
    let Some(data_path) = copies.lock().prepare_target(snapshot_id, replica)? else {
        return Ok(());
    };
    let (staged_path, staged) = stage(replica, src, &data_path)?;
    let mut copies = copies.lock();
    let placed = copies
        .prepare_target(snapshot_id, replica)
        .and_then(|target| match target {
            // Prepared meanwhile by a concurrent call: keep that one.
            None => Ok(false),
            Some(_) => fs::rename(&staged_path, &data_path)
                .map(|()| true)
                .map_err(|source| Error::Rename {
                    from: staged_path.clone(),
                    to: data_path.clone(),
                    source,
                }),
        });
    match placed {
        Ok(true) => {}
        Ok(false) => {
            remove_quietly(&staged_path);
            return Ok(());
        }
        Err(e) => {
            remove_quietly(&staged_path);
            return Err(e);
        }
    }
    info!(
        snapshot.id = %snapshot_id,
        replica.name = %replica.name,
        pool = %replica.pool,
        "Snapshot copy prepared"
    );
    copies.prepared.insert(
        snapshot_id.to_owned(),
        PreparedCopy {
            replica_name: replica.name.clone(),
            pool: replica.pool.clone(),
            data_path,
            file: staged,
        },
    );
    Ok(())
}

impl SnapshotCatalog {
    /// Returns whether `snapshot_id` is prepared (not yet complete).
    pub fn is_prepared(&self, snapshot_id: &str) -> bool {
        self.prepared.contains_key(snapshot_id)
    }

    /// Returns the data file a prepare of `snapshot_id` of `replica` makes,
    /// or `None` if the id is already prepared of that replica.
    fn prepare_target(
        &self,
        snapshot_id: &str,
        replica: &Replica,
    ) -> Result<Option<PathBuf>, Error> {
        validate_id(snapshot_id)?;
        self.check_not_faulted(snapshot_id)?;
        let recent = |at: &std::time::Instant| at.elapsed() < super::PREPARE_TOMBSTONE;
        if self.deleted.get(snapshot_id).is_some_and(recent) {
            return Err(Error::RecentlyDeleted {
                id: snapshot_id.to_owned(),
            });
        }
        if let Some(existing) = self.copies.get(snapshot_id) {
            return Err(Error::AlreadyExists {
                id: snapshot_id.to_owned(),
                replica_name: existing.meta.replica_name.clone(),
            });
        }
        if let Some(prepared) = self.prepared.get(snapshot_id) {
            if prepared.replica_name == replica.name && prepared.pool == replica.pool {
                return Ok(None);
            }
            return Err(Error::AlreadyExists {
                id: snapshot_id.to_owned(),
                replica_name: prepared.replica_name.clone(),
            });
        }
        let pool = self.pools.get(&replica.pool)?;
        Ok(Some(paths(&pool, snapshot_id).0))
    }

    /// Removes a prepared copy's file ([`discard`]) and state; returns
    /// false if the id is not prepared.
    pub(super) fn drop_prepared(&mut self, snapshot_id: &str) -> bool {
        let Some(prepared) = self.prepared.remove(snapshot_id) else {
            return false;
        };
        discard(snapshot_id, prepared);
        true
    }
}

/// Removes a prepared copy's file. A file that cannot be removed is logged
/// and left for the next start-up (it has no metadata).
pub(super) fn discard(snapshot_id: &str, prepared: PreparedCopy) {
    drop(prepared.file);
    match durable::remove(&prepared.data_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(snapshot.id = %snapshot_id, path = %prepared.data_path.display(), error = %e, "Cannot remove a prepared snapshot copy; it will be removed at the next start-up");
        }
    }
    info!(snapshot.id = %snapshot_id, replica.name = %prepared.replica_name, "Prepared snapshot copy removed");
}

/// Reflinks the replica into a new temporary file next to `data_path`, at
/// the replica's size, not fsynced; removes it again on error.
fn stage(replica: &Replica, src: &File, data_path: &Path) -> Result<(PathBuf, File), Error> {
    let staged_path = durable::temp_path(data_path).map_err(|source| Error::OpenData {
        path: data_path.to_owned(),
        source,
    })?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&staged_path)
        .map_err(|source| {
            no_space_or(&staged_path, source, |path, source| Error::OpenData {
                path,
                source,
            })
        })?;
    let made = super::reflink::clone_file(src, &file)
        .map_err(|errno| clone_error(errno, &staged_path, &replica.data_path))
        .and_then(|()| trim_to(&file, &staged_path, replica.meta.size_bytes));
    if let Err(e) = made {
        drop(file);
        remove_quietly(&staged_path);
        return Err(e);
    }
    Ok((staged_path, file))
}

/// Brings a prepared copy up to the replica's current contents and length
/// (see the module docs) and fsyncs it. The caller holds the replica
/// catalog's lock and the volume's write barrier. Returns the number of
/// ranges reflinked and punched. On error the copy's file is removed.
///
/// # Errors
///
/// [`Error::OpenData`], [`Error::ResizeData`], [`Error::MapRanges`], the
/// errors of a reflink ([`Error::ReflinkUnsupported`], [`Error::NoSpace`],
/// [`Error::Clone`]), [`Error::PunchHole`], [`Error::SyncData`].
pub(super) fn refresh(
    snapshot_id: &str,
    prepared: PreparedCopy,
    replica: &Replica,
) -> Result<(usize, usize), Error> {
    let result = open_replica(replica).and_then(|src| {
        let counts = apply_updates(snapshot_id, &prepared, &src, replica)?;
        prepared.file.sync_all().map_err(|source| {
            no_space_or(&prepared.data_path, source, |path, source| {
                Error::SyncData { path, source }
            })
        })?;
        Ok(counts)
    });
    if result.is_err() {
        drop(prepared.file);
        remove_quietly(&prepared.data_path);
    }
    result
}

fn apply_updates(
    snapshot_id: &str,
    prepared: &PreparedCopy,
    src: &File,
    replica: &Replica,
) -> Result<(usize, usize), Error> {
    let path = &prepared.data_path;
    let size = replica.meta.size_bytes;
    let len = libc::off_t::try_from(size).map_err(|_| Error::ResizeData {
        path: path.clone(),
        source: Errno::EFBIG,
    })?;
    // First the length, so that the comparison covers the grown tail (a
    // hole in the copy) and nothing past the end.
    nix::unistd::ftruncate(&prepared.file, len).map_err(|source| Error::ResizeData {
        path: path.clone(),
        source,
    })?;
    let (mut cloned, mut punched) = (0, 0);
    let mut start = 0;
    while start < size {
        let (updates, next) =
            ranges::updates(&prepared.file, src, size, start, MAX_RANGES_PER_PAGE).map_err(
                |(_, source)| Error::MapRanges {
                    id: snapshot_id.to_owned(),
                    source,
                },
            )?;
        for update in updates {
            let r = update.range();
            let (outer_start, outer_end) = (
                r.offset / BLOCK * BLOCK,
                r.end().div_ceil(BLOCK).saturating_mul(BLOCK).min(size),
            );
            match update {
                Update::Clone(_) => {
                    clone(prepared, src, replica, outer_start, outer_end)?;
                    cloned += 1;
                }
                Update::Punch(_) => {
                    // Only whole blocks inside the range are punched; a
                    // partial block at either edge (never on XFS, whose
                    // extents are block aligned) is reflinked instead,
                    // which is right whatever the replica holds there.
                    let inner_start = r.offset.div_ceil(BLOCK).saturating_mul(BLOCK);
                    let inner_end = (r.end() / BLOCK * BLOCK).max(inner_start);
                    clone(
                        prepared,
                        src,
                        replica,
                        outer_start,
                        inner_start.min(outer_end),
                    )?;
                    punch(prepared, inner_start, inner_end)?;
                    clone(
                        prepared,
                        src,
                        replica,
                        inner_end.max(outer_start),
                        outer_end,
                    )?;
                    punched += 1;
                }
            }
        }
        start = next;
    }
    Ok((cloned, punched))
}

/// Reflinks `[start, end)` of the replica into the same range of the copy.
fn clone(
    prepared: &PreparedCopy,
    src: &File,
    replica: &Replica,
    start: u64,
    end: u64,
) -> Result<(), Error> {
    if start >= end {
        return Ok(());
    }
    super::reflink::clone_range(src, start, end - start, &prepared.file, start)
        .map_err(|errno| clone_error(errno, &prepared.data_path, &replica.data_path))
}

/// Punches `[start, end)` of the copy, keeping its size.
fn punch(prepared: &PreparedCopy, start: u64, end: u64) -> Result<(), Error> {
    if start >= end {
        return Ok(());
    }
    let err = |source| Error::PunchHole {
        path: prepared.data_path.clone(),
        offset: start,
        length: end - start,
        source,
    };
    let offset = libc::off_t::try_from(start).map_err(|_| err(Errno::EOVERFLOW))?;
    let length = libc::off_t::try_from(end - start).map_err(|_| err(Errno::EOVERFLOW))?;
    fallocate(
        &prepared.file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
    .map_err(|source| {
        if super::reflink::is_no_space(source) {
            Error::NoSpace {
                path: prepared.data_path.clone(),
                source: source.into(),
            }
        } else {
            err(source)
        }
    })
}
