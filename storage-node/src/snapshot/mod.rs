//! The snapshot copy catalog: which snapshot copies this node holds, in
//! which pool, taken of which replica.
//!
//! A snapshot copy is the node's share of a volume snapshot: a reflink
//! (FICLONE, [`reflink`]) of a replica's data file, taken while the volume's
//! target holds its write barrier (or while the volume has no target; the
//! controller arranges that, not this module). It is two files in the
//! replica's pool's `snapshots/` directory: `<snapshot id>.data` and
//! `<snapshot id>.meta.json` ([`CopyMeta`]). A copy shares blocks with its
//! replica, never its lifetime: destroying the replica keeps the copy, and
//! restoring a replica from a copy ([`crate::replica::ReplicaCatalog::restore`])
//! reflinks the other way. [`ranges`] answers which ranges of a copy hold
//! data and where two copies differ.
//!
//! Because FICLONE's cost grows with the replica's extent count, a copy
//! can be prepared first ([`prepare`], outside the barrier: a reflink
//! without fsync or metadata, remembered in memory only) and then
//! completed by [`SnapshotCatalog::create`] under the barrier, which only
//! reflinks (FICLONERANGE) and punches the ranges whose extents changed
//! since; see [`prepare`](mod@prepare).
//!
//! # Invariants
//!
//! - **A copy's data is never modified once its metadata exists.** Data
//!   files are created mode 0400, only written by the one FICLONE that
//!   makes them (and a truncate to the replica's size) or, for a prepared
//!   copy, by that FICLONE and the refresh before the metadata is written,
//!   and opened read-only afterwards. Nothing here exports them.
//! - **A prepared copy is never listed** (nor gettable, nor a restore
//!   source) and not durable: it lives in memory with its data file, and
//!   start-up removes the file like any data file without metadata.
//! - **A half-made copy is never listed.** The metadata file is the commit
//!   point: the data file is created `O_EXCL`, reflinked and fsynced, then
//!   the metadata is written durably ([`crate::durable::replace`], which
//!   also makes the data file's directory entry durable). Only then does
//!   the copy enter the catalog. On any error the data file is removed.
//! - **delete** removes the metadata first, then the data. A crash in
//!   between leaves a data file without metadata.
//!
//! At start-up ([`SnapshotCatalog::load`]) a data file without metadata
//! (an unfinished create or delete) is removed; metadata without data,
//! unreadable metadata, or a data file shorter than its metadata says are
//! reported loudly and kept as [`FaultedCopy`]s whose ids stay reserved
//! until deleted.
//!
//! # Capacity
//!
//! Copies are not provisioned: a copy pins the blocks its replica
//! overwrites later, and XFS reports those through the pool's free space
//! (`free_bytes`), which thick provisioning checks. `provisioned_bytes`
//! counts replicas only; see docs/architecture.md.
//!
//! # Locking
//!
//! The catalog is not internally synchronised; the agent keeps it behind a
//! lock taken after the replica catalog's when both are needed (create and
//! restore; a create of a prepared id refreshes it under both, which is
//! quick). [`prepare`] takes neither lock across its FICLONE: the caller
//! opens the replica's file under the replica catalog's lock and releases
//! it, and [`prepare`] takes the snapshot catalog's lock only to check the
//! id before and to place the file after. Every method blocks on file
//! system calls; async callers use `spawn_blocking`. Range scans work on
//! files opened under the lock ([`SnapshotCatalog::open`]) and run without
//! it.
//!
//! # Extending
//!
//! A new state of a copy gets its own map in [`SnapshotCatalog`], and every
//! operation checks it with the others, so that an id is in one map only.

mod error;
pub mod meta;
pub mod prepare;
pub mod ranges;
pub mod reflink;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use tracing::{error, info, warn};

use crate::durable;
use crate::pool::{Pool, PoolManager};
use crate::replica::{self, DATA_SUFFIX, META_SUFFIX, Replica, SourceCopy};

pub use meta::{CopyMeta, META_FORMAT_VERSION};
pub use ranges::{ByteRange, RangesPage};

pub use error::Error;
pub use prepare::{open_replica, prepare};

use prepare::PreparedCopy;

/// Range pages hold at most this many ranges, whatever the caller asks.
pub const MAX_RANGES_PER_PAGE: usize = 65_536;

/// Range pages hold this many ranges when the caller asks for 0.
pub const DEFAULT_RANGES_PER_PAGE: usize = 1024;

/// A healthy snapshot copy as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCopy {
    /// The snapshot id, unique on the node.
    pub snapshot_id: String,
    /// Name of the pool holding it.
    pub pool: String,
    /// The data file (read-only).
    pub data_path: PathBuf,
    /// The metadata file.
    pub meta_path: PathBuf,
    /// Its metadata (replica, volume, size in bytes, time taken).
    pub meta: CopyMeta,
}

impl SnapshotCopy {
    /// What identifies the copy's volume: the volume id, or for a copy of a
    /// standalone replica the replica name.
    pub fn volume_key(&self) -> &str {
        if self.meta.volume_id.is_empty() {
            &self.meta.replica_name
        } else {
            &self.meta.volume_id
        }
    }
}

/// A copy found damaged at start-up; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultedCopy {
    /// The snapshot id.
    pub snapshot_id: String,
    /// Name of the pool holding its files.
    pub pool: String,
    /// Its data file (which may be missing).
    pub data_path: PathBuf,
    /// Its metadata file.
    pub meta_path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// A copy with its data file open for reading, for range scans outside the
/// catalog's lock (a copy deleted meanwhile stays readable through it).
#[derive(Debug)]
pub struct OpenCopy {
    /// The copy.
    pub copy: SnapshotCopy,
    /// Its data file, read-only.
    pub file: File,
}

/// Every snapshot copy on this node.
#[derive(Debug)]
pub struct SnapshotCatalog {
    pools: Arc<PoolManager>,
    copies: BTreeMap<String, SnapshotCopy>,
    faulted: BTreeMap<String, FaultedCopy>,
    /// Copies made by [`prepare`] and not yet completed; in memory only.
    prepared: BTreeMap<String, PreparedCopy>,
    /// Ids deleted in the last [`PREPARE_TOMBSTONE`], which a prepare
    /// refuses (see [`SnapshotCatalog::delete`]); in memory only.
    deleted: BTreeMap<String, std::time::Instant>,
}

/// How long a deleted id refuses prepares: longer than any controller
/// waits for a prepare, so one that arrives (or finishes its FICLONE) after
/// the delete of its failed cut cannot leave a prepared copy behind.
pub const PREPARE_TOMBSTONE: std::time::Duration = std::time::Duration::from_secs(600);

impl SnapshotCatalog {
    /// Builds the catalog by scanning the `snapshots/` directory of every
    /// pool (creating it where missing) and finishing interrupted
    /// operations (see the module docs).
    ///
    /// # Errors
    ///
    /// [`Error::Scan`] if a directory cannot be made or listed,
    /// [`Error::DuplicateCopy`] if two pools hold the same id, or the error
    /// of removing an unfinished copy. Damaged copies are not errors: see
    /// [`SnapshotCatalog::faulted`].
    pub fn load(pools: Arc<PoolManager>) -> Result<Self, Error> {
        let mut catalog = Self {
            pools,
            copies: BTreeMap::new(),
            faulted: BTreeMap::new(),
            prepared: BTreeMap::new(),
            deleted: BTreeMap::new(),
        };
        for pool in catalog.pools.list() {
            catalog.scan_pool(&pool)?;
        }
        info!(
            copies = catalog.copies.len(),
            faulted = catalog.faulted.len(),
            "Snapshot copy catalog loaded"
        );
        Ok(catalog)
    }

    /// Takes a copy of the replica `replica_name`, which `lookup` resolves
    /// (the caller holds the replica catalog's lock across the call, so the
    /// replica cannot be destroyed or grown meanwhile). Returns the existing
    /// copy if `snapshot_id` was already taken of that replica; `lookup` is
    /// then not called.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidId`], [`Error::Faulted`] if the id belongs to a
    /// faulted copy, [`Error::AlreadyExists`] for a copy of another replica,
    /// [`Error::Replica`] from `lookup` (`NotFound` for an unknown replica),
    /// [`Error::ReflinkUnsupported`], [`Error::NoSpace`], and file errors.
    /// On error no files are left behind.
    pub fn create(
        &mut self,
        snapshot_id: &str,
        replica_name: &str,
        lookup: impl FnOnce(&str) -> Result<Replica, replica::Error>,
    ) -> Result<SnapshotCopy, Error> {
        validate_id(snapshot_id)?;
        self.check_not_faulted(snapshot_id)?;
        if let Some(existing) = self.copies.get(snapshot_id) {
            if existing.meta.replica_name == replica_name {
                return Ok(existing.clone());
            }
            return Err(Error::AlreadyExists {
                id: snapshot_id.to_owned(),
                replica_name: existing.meta.replica_name.clone(),
            });
        }
        if let Some(prepared) = self.prepared.get(snapshot_id)
            && prepared.replica_name != replica_name
        {
            return Err(Error::AlreadyExists {
                id: snapshot_id.to_owned(),
                replica_name: prepared.replica_name.clone(),
            });
        }
        let replica = lookup(replica_name)?;
        let pool = self.pools.get(&replica.pool)?;
        let (data_path, meta_path) = paths(&pool, snapshot_id);

        match self.prepared.remove(snapshot_id) {
            Some(prepared) if prepared.pool == replica.pool => {
                let (cloned, punched) = prepare::refresh(snapshot_id, prepared, &replica)?;
                info!(
                    snapshot.id = %snapshot_id,
                    replica.name = %replica.name,
                    cloned,
                    punched,
                    "Prepared snapshot copy refreshed"
                );
            }
            other => {
                if let Some(prepared) = other {
                    // The replica moved to another pool since (destroyed
                    // and made again): the prepared file is of no use.
                    prepare::discard(snapshot_id, prepared);
                }
                clone_replica(&replica, &data_path, &meta_path)?;
            }
        }
        let meta = CopyMeta {
            format_version: META_FORMAT_VERSION,
            snapshot_id: snapshot_id.to_owned(),
            replica_name: replica.name.clone(),
            volume_id: replica.meta.volume_id.clone(),
            size_bytes: replica.meta.size_bytes,
            created_at_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        };
        if let Err(source) = meta.store(&meta_path) {
            remove_quietly(&data_path);
            return Err(no_space_or(&meta_path, source, |path, source| {
                Error::WriteMeta { path, source }
            }));
        }
        let copy = SnapshotCopy {
            snapshot_id: snapshot_id.to_owned(),
            pool: pool.name().to_owned(),
            data_path,
            meta_path,
            meta,
        };
        info!(
            snapshot.id = %copy.snapshot_id,
            replica.name = %copy.meta.replica_name,
            volume.id = %copy.meta.volume_id,
            pool = %copy.pool,
            size_bytes = copy.meta.size_bytes,
            "Snapshot copy created"
        );
        self.copies.insert(snapshot_id.to_owned(), copy.clone());
        // A complete copy under the id: a delete of it is no longer recent.
        self.deleted.remove(snapshot_id);
        Ok(copy)
    }

    /// Deletes a copy (healthy, faulted or prepared): its metadata, then its
    /// data. Returns false if there was no such copy. Replicas restored from it
    /// keep their blocks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidId`], or [`Error::Remove`] if the metadata could not
    /// be removed (the copy then still exists). A data file that cannot be
    /// removed once the metadata is gone is logged and left for the next
    /// start-up.
    pub fn delete(&mut self, snapshot_id: &str) -> Result<bool, Error> {
        validate_id(snapshot_id)?;
        // Also when nothing is there yet: the delete of a failed cut may
        // overtake its prepare (a request queued on a paused agent, or a
        // FICLONE still running after its caller gave up).
        self.deleted
            .retain(|_, at| at.elapsed() < PREPARE_TOMBSTONE);
        self.deleted
            .insert(snapshot_id.to_owned(), std::time::Instant::now());
        if self.drop_prepared(snapshot_id) {
            return Ok(true);
        }
        let (meta_path, data_path, pool) = if let Some(c) = self.copies.get(snapshot_id) {
            (c.meta_path.clone(), c.data_path.clone(), c.pool.clone())
        } else if let Some(f) = self.faulted.get(snapshot_id) {
            (f.meta_path.clone(), f.data_path.clone(), f.pool.clone())
        } else {
            return Ok(false);
        };
        let left =
            durable::remove_committed(&meta_path, &data_path).map_err(|source| Error::Remove {
                path: meta_path.clone(),
                source,
            })?;
        if let Some(e) = left {
            warn!(snapshot.id = %snapshot_id, path = %data_path.display(), error = %e, "Cannot remove data of a deleted snapshot copy; it will be removed at the next start-up");
        }
        self.copies.remove(snapshot_id);
        self.faulted.remove(snapshot_id);
        info!(snapshot.id = %snapshot_id, pool = %pool, "Snapshot copy deleted");
        Ok(true)
    }

    /// Returns a healthy copy.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidId`], [`Error::Faulted`] or [`Error::NotFound`].
    pub fn get(&self, snapshot_id: &str) -> Result<SnapshotCopy, Error> {
        validate_id(snapshot_id)?;
        self.check_not_faulted(snapshot_id)?;
        self.copies
            .get(snapshot_id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                id: snapshot_id.to_owned(),
            })
    }

    /// Returns every healthy copy, ordered by snapshot id.
    pub fn list(&self) -> Vec<SnapshotCopy> {
        self.copies.values().cloned().collect()
    }

    /// Returns every faulted copy, ordered by snapshot id.
    pub fn faulted(&self) -> Vec<FaultedCopy> {
        self.faulted.values().cloned().collect()
    }

    /// Returns what a restore from the copy needs. The caller holds the
    /// catalog's lock until the restore is done, so the copy stays.
    ///
    /// # Errors
    ///
    /// Those of [`SnapshotCatalog::get`].
    pub fn source(&self, snapshot_id: &str) -> Result<SourceCopy, Error> {
        let copy = self.get(snapshot_id)?;
        Ok(SourceCopy {
            snapshot_id: copy.snapshot_id,
            pool: copy.pool,
            data_path: copy.data_path,
            size_bytes: copy.meta.size_bytes,
        })
    }

    /// Opens a copy's data file read-only, for range scans.
    ///
    /// # Errors
    ///
    /// Those of [`SnapshotCatalog::get`], [`Error::OpenData`].
    pub fn open(&self, snapshot_id: &str) -> Result<OpenCopy, Error> {
        let copy = self.get(snapshot_id)?;
        let file = File::open(&copy.data_path).map_err(|source| Error::OpenData {
            path: copy.data_path.clone(),
            source,
        })?;
        Ok(OpenCopy { copy, file })
    }

    fn check_not_faulted(&self, snapshot_id: &str) -> Result<(), Error> {
        match self.faulted.get(snapshot_id) {
            Some(f) => Err(Error::Faulted {
                id: snapshot_id.to_owned(),
                reason: f.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn pool_of(&self, snapshot_id: &str) -> Option<String> {
        self.copies
            .get(snapshot_id)
            .map(|c| c.pool.clone())
            .or_else(|| self.faulted.get(snapshot_id).map(|f| f.pool.clone()))
    }

    fn scan_pool(&mut self, pool: &Arc<Pool>) -> Result<(), Error> {
        let dir = pool.snapshots_dir();
        let scan_err = |source| Error::Scan {
            path: dir.clone(),
            source,
        };
        if !dir.is_dir() {
            // A pool made before snapshot copies existed.
            fs::create_dir(&dir)
                .and_then(|()| durable::sync_dir(pool.mount_path()))
                .map_err(scan_err)?;
        }
        let mut metas = BTreeSet::new();
        let mut datas = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(scan_err)? {
            let file_name = entry.map_err(scan_err)?.file_name();
            let Some(file_name) = file_name.to_str() else {
                warn!(pool = %pool.name(), file = ?file_name, "Ignoring a file with a non-UTF-8 name");
                continue;
            };
            if durable::is_temp_name(file_name.as_ref()) {
                let path = dir.join(file_name);
                info!(pool = %pool.name(), path = %path.display(), "Removing an interrupted metadata write");
                remove_quietly(&path);
            } else if let Some(id) = file_name.strip_suffix(META_SUFFIX) {
                metas.insert(id.to_owned());
            } else if let Some(id) = file_name.strip_suffix(DATA_SUFFIX) {
                datas.insert(id.to_owned());
            } else {
                warn!(pool = %pool.name(), file = %file_name, "Ignoring an unexpected file among snapshot copies");
            }
        }
        for id in metas.union(&datas) {
            if validate_id(id).is_err() {
                warn!(pool = %pool.name(), snapshot.id = %id, "Ignoring snapshot copy files with an invalid id");
                continue;
            }
            let (data_path, meta_path) = paths(pool, id);
            if !metas.contains(id) {
                warn!(snapshot.id = %id, pool = %pool.name(), "Removing the data file of an unfinished snapshot copy or delete");
                durable::remove(&data_path).map_err(|source| Error::Remove {
                    path: data_path.clone(),
                    source,
                })?;
                continue;
            }
            if let Some(first_pool) = self.pool_of(id) {
                return Err(Error::DuplicateCopy {
                    id: id.clone(),
                    first_pool,
                    second_pool: pool.name().to_owned(),
                });
            }
            let checked = CopyMeta::load(&meta_path)
                .map_err(|e| crate::error_chain(&e))
                .and_then(|meta| check_data(id, &data_path, &meta).map(|()| meta));
            match checked {
                Ok(meta) => {
                    self.copies.insert(
                        id.clone(),
                        SnapshotCopy {
                            snapshot_id: id.clone(),
                            pool: pool.name().to_owned(),
                            data_path,
                            meta_path,
                            meta,
                        },
                    );
                }
                Err(reason) => {
                    error!(snapshot.id = %id, pool = %pool.name(), reason = %reason, "Snapshot copy is faulted; it keeps its id until deleted");
                    self.faulted.insert(
                        id.clone(),
                        FaultedCopy {
                            snapshot_id: id.clone(),
                            pool: pool.name().to_owned(),
                            data_path,
                            meta_path,
                            reason,
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

/// Returns the bytes of the pool a copy's data file maps (`st_blocks *
/// 512`), shared or not.
///
/// # Errors
///
/// [`Error::SyncData`] if the file cannot be stat'ed.
pub fn allocated_bytes(copy: &SnapshotCopy) -> Result<u64, Error> {
    let meta = fs::metadata(&copy.data_path).map_err(|source| Error::SyncData {
        path: copy.data_path.clone(),
        source,
    })?;
    Ok(meta.blocks().saturating_mul(512))
}

/// Returns the ranges of a copy that hold data, from `starting_offset` on,
/// at most `max_results` (0: [`DEFAULT_RANGES_PER_PAGE`]; capped at
/// [`MAX_RANGES_PER_PAGE`]).
///
/// # Errors
///
/// [`Error::OutOfRange`] if `starting_offset` is at or past the copy's
/// size, [`Error::MapRanges`].
pub fn allocated_ranges(
    copy: &OpenCopy,
    starting_offset: u64,
    max_results: u32,
) -> Result<RangesPage, Error> {
    let size = copy.copy.meta.size_bytes;
    check_offset(&copy.copy, starting_offset)?;
    ranges::allocated(&copy.file, size, starting_offset, page_len(max_results)).map_err(|source| {
        Error::MapRanges {
            id: copy.copy.snapshot_id.clone(),
            source,
        }
    })
}

/// Returns the ranges in which `target` may differ from `base`, from
/// `starting_offset` on, up to the target's size (past the base's size
/// everything counts as changed), at most `max_results` (0:
/// [`DEFAULT_RANGES_PER_PAGE`]; capped at [`MAX_RANGES_PER_PAGE`]). Extents
/// sharing physical blocks are unchanged; see [`ranges`].
///
/// # Errors
///
/// [`Error::DifferentVolumes`] unless both copies are of one volume (for
/// standalone replicas: of one replica name), [`Error::OutOfRange`] if
/// `starting_offset` is at or past the target's size, [`Error::MapRanges`].
pub fn changed_ranges(
    base: &OpenCopy,
    target: &OpenCopy,
    starting_offset: u64,
    max_results: u32,
) -> Result<RangesPage, Error> {
    if base.copy.volume_key() != target.copy.volume_key()
        || base.copy.meta.volume_id != target.copy.meta.volume_id
    {
        return Err(Error::DifferentVolumes {
            base: base.copy.snapshot_id.clone(),
            base_volume: base.copy.volume_key().to_owned(),
            target: target.copy.snapshot_id.clone(),
            target_volume: target.copy.volume_key().to_owned(),
        });
    }
    check_offset(&target.copy, starting_offset)?;
    let same_filesystem = base.copy.pool == target.copy.pool;
    ranges::changed(
        (&base.file, base.copy.meta.size_bytes),
        (&target.file, target.copy.meta.size_bytes),
        same_filesystem,
        starting_offset,
        page_len(max_results),
    )
    .map_err(|(side, source)| Error::MapRanges {
        id: match side {
            ranges::Side::Base => base.copy.snapshot_id.clone(),
            ranges::Side::Target => target.copy.snapshot_id.clone(),
        },
        source,
    })
}

/// Checks a snapshot id: the rules of replica names
/// ([`replica::name_problem`]), since both name files in a pool.
///
/// # Errors
///
/// [`Error::InvalidId`] saying what is wrong.
pub fn validate_id(id: &str) -> Result<(), Error> {
    match replica::name_problem(id) {
        Some(reason) => Err(Error::InvalidId {
            id: id.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_offset(copy: &SnapshotCopy, offset: u64) -> Result<(), Error> {
    if offset >= copy.meta.size_bytes {
        return Err(Error::OutOfRange {
            id: copy.snapshot_id.clone(),
            offset,
            size_bytes: copy.meta.size_bytes,
        });
    }
    Ok(())
}

fn page_len(max_results: u32) -> usize {
    match usize::try_from(max_results) {
        Ok(0) => DEFAULT_RANGES_PER_PAGE,
        Ok(n) => n.min(MAX_RANGES_PER_PAGE),
        Err(_) => MAX_RANGES_PER_PAGE,
    }
}

fn paths(pool: &Pool, id: &str) -> (PathBuf, PathBuf) {
    let dir = pool.snapshots_dir();
    (
        dir.join(format!("{id}{DATA_SUFFIX}")),
        dir.join(format!("{id}{META_SUFFIX}")),
    )
}

/// Creates the copy's data file as a reflink of the replica's, at the
/// replica's size, and fsyncs it; removes it again on error.
fn clone_replica(replica: &Replica, data_path: &Path, meta_path: &Path) -> Result<(), Error> {
    let src = open_replica(replica)?;
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(data_path)
    };
    let file = match open() {
        // Left by a copy whose cleanup failed: without metadata it is
        // garbage, exactly what the next start-up would remove.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !meta_path.exists() => {
            warn!(path = %data_path.display(), "Removing a leftover snapshot copy data file");
            fs::remove_file(data_path).and_then(|()| open())
        }
        other => other,
    }
    .map_err(|source| {
        no_space_or(data_path, source, |path, source| Error::OpenData {
            path,
            source,
        })
    })?;
    let made = reflink::clone_file(&src, &file)
        .map_err(|errno| clone_error(errno, data_path, &replica.data_path))
        .and_then(|()| trim_to(&file, data_path, replica.meta.size_bytes))
        .and_then(|()| {
            file.sync_all().map_err(|source| {
                no_space_or(data_path, source, |path, source| Error::SyncData {
                    path,
                    source,
                })
            })
        });
    if let Err(e) = made {
        drop(file);
        remove_quietly(data_path);
        return Err(e);
    }
    Ok(())
}

/// Returns the error for a failed FICLONE or FICLONERANGE of `source_path`
/// into `path`.
fn clone_error(errno: Errno, path: &Path, source_path: &Path) -> Error {
    if reflink::is_unsupported(errno) {
        Error::ReflinkUnsupported {
            path: path.to_owned(),
            source_path: source_path.to_owned(),
            source: errno,
        }
    } else if reflink::is_no_space(errno) {
        Error::NoSpace {
            path: path.to_owned(),
            source: errno.into(),
        }
    } else {
        Error::Clone {
            path: path.to_owned(),
            source_path: source_path.to_owned(),
            source: errno,
        }
    }
}

/// Cuts a new copy to `size_bytes` when its replica's file was longer (an
/// interrupted grow left a tail that is not part of the volume).
fn trim_to(file: &File, path: &Path, size_bytes: u64) -> Result<(), Error> {
    let len = file
        .metadata()
        .map_err(|source| Error::SyncData {
            path: path.to_owned(),
            source,
        })?
        .len();
    if len <= size_bytes {
        return Ok(());
    }
    let size = libc::off_t::try_from(size_bytes).map_err(|_| Error::ResizeData {
        path: path.to_owned(),
        source: Errno::EFBIG,
    })?;
    nix::unistd::ftruncate(file, size).map_err(|source| Error::ResizeData {
        path: path.to_owned(),
        source,
    })
}

/// Returns why a data file does not back its metadata, if it does not.
fn check_data(id: &str, data_path: &Path, meta: &CopyMeta) -> Result<(), String> {
    if meta.snapshot_id != id {
        return Err(format!(
            "metadata names snapshot {:?}, not {id:?}",
            meta.snapshot_id
        ));
    }
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
    Ok(())
}

/// Returns [`Error::NoSpace`] for `ENOSPC` and `EDQUOT`, else `other`.
fn no_space_or(
    path: &Path,
    source: io::Error,
    other: impl FnOnce(PathBuf, io::Error) -> Error,
) -> Error {
    let no_space = source
        .raw_os_error()
        .is_some_and(|code| reflink::is_no_space(Errno::from_raw(code)));
    if no_space {
        Error::NoSpace {
            path: path.to_owned(),
            source,
        }
    } else {
        other(path.to_owned(), source)
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = durable::remove(path) {
        warn!(path = %path.display(), error = %e, "Cannot remove file");
    }
}
