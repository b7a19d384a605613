//! The replica catalog: which replicas this node holds, in which pool, with
//! what size and epoch.
//!
//! A replica is two files in its pool's `replicas/` directory:
//! `<name>.data` (the volume's bytes, sparse when thin) and `<name>.meta.json`
//! ([`ReplicaMeta`]). The catalog creates, grows and destroys them, persists
//! epochs, and rebuilds itself at start-up by scanning every pool. It never
//! opens data files for I/O: the agent opens [`data::ReplicaData`] (the
//! `O_DIRECT` data path through the [`crate::uring`] engine) on the path the
//! catalog returns.
//!
//! # Crash safety
//!
//! The metadata file is the commit point of every operation:
//!
//! - **create**: data file (`O_EXCL`), sized, fsynced; then the metadata,
//!   written durably (which also makes the data file's directory entry
//!   durable). A data file without metadata is an unfinished create.
//! - **grow**: the data file is extended and fsynced, then the metadata. A
//!   crash in between leaves a data file longer than the metadata says, which
//!   is harmless: the metadata size is the replica's size, and a retried grow
//!   completes.
//! - **restore** (a create from a snapshot copy, [`ReplicaCatalog::restore`]):
//!   the data file (`O_EXCL`) is a reflink (FICLONE) of the copy's data file,
//!   extended to the requested size, fsynced; then the metadata, which names
//!   the copy in `source_snapshot`. A crash before the metadata leaves a data
//!   file without metadata, removed like an unfinished create. The restored
//!   replica shares blocks with the copy, never its lifetime.
//! - **destroy**: metadata first, then data. A crash in between leaves a data
//!   file without metadata, which the next start-up removes as it would an
//!   unfinished create. The other order would leave metadata without data,
//!   which must not be mistaken for anything but lost data.
//!
//! At start-up ([`ReplicaCatalog::load`]) data without metadata is removed;
//! metadata without data, unreadable metadata, or a data file shorter than its
//! metadata says are reported loudly and kept as [`FaultedReplica`]s: their
//! names stay reserved (a create with that name fails rather than silently
//! making an empty replica for a volume that had data) until they are
//! destroyed.
//!
//! The catalog is not internally synchronised: mutations take `&mut self`, and
//! the agent keeps it behind one lock. Every method blocks on file system
//! calls; async callers use `spawn_blocking`.

pub mod data;
mod error;
mod files;
pub mod meta;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::durable;
use crate::pool::{Pool, PoolManager};

pub use meta::{DATA_SUFFIX, META_FORMAT_VERSION, META_SUFFIX, ReplicaMeta};

pub use error::Error;
use files::{check_data, clone_data, create_data, remove_quietly, set_size};

/// Longest replica name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Replica sizes are multiples of this many bytes, so O_DIRECT I/O on 4 KiB
/// sector devices can reach every byte.
pub const SIZE_ALIGN_BYTES: u64 = 4096;

/// A healthy replica as the catalog knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Replica name, unique on the node.
    pub name: String,
    /// Name of the pool holding it.
    pub pool: String,
    /// The data file, to open for I/O.
    pub data_path: PathBuf,
    /// The metadata file.
    pub meta_path: PathBuf,
    /// Its metadata (size in bytes, thin, epoch, volume id).
    pub meta: ReplicaMeta,
}

/// A replica found damaged at start-up; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultedReplica {
    /// Replica name.
    pub name: String,
    /// Name of the pool holding its files.
    pub pool: String,
    /// Its data file (which may be missing).
    pub data_path: PathBuf,
    /// Its metadata file.
    pub meta_path: PathBuf,
    /// Its metadata, when it could be read.
    pub meta: Option<ReplicaMeta>,
    /// What is wrong.
    pub reason: String,
}

/// Parameters of [`ReplicaCatalog::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateReplica {
    /// Replica name: 1 to 128 bytes of `[A-Za-z0-9._-]`, no leading dot.
    pub name: String,
    /// The volume it is a copy of; empty for a standalone replica, which
    /// only `ballast export` serves and no target ever resolves.
    pub volume_id: String,
    /// Size in bytes, a positive multiple of 4096.
    pub size_bytes: u64,
    /// Sparse (`true`) or fully allocated up front (`false`).
    pub thin: bool,
    /// The pool to create it in; chosen by free space when `None`.
    pub pool: Option<String>,
}

/// A snapshot copy a replica is restored from: the part of a
/// [`crate::snapshot::SnapshotCopy`] that [`ReplicaCatalog::restore`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceCopy {
    /// The snapshot id, recorded in the new replica's metadata.
    pub snapshot_id: String,
    /// The pool holding the copy; the replica is made in the same pool.
    pub pool: String,
    /// The copy's data file.
    pub data_path: PathBuf,
    /// The copy's size in bytes.
    pub size_bytes: u64,
}

#[derive(Debug)]
struct Entry {
    replica: Replica,
    pool: Arc<Pool>,
}

/// Every replica on this node.
#[derive(Debug)]
pub struct ReplicaCatalog {
    pools: Arc<PoolManager>,
    replicas: BTreeMap<String, Entry>,
    faulted: BTreeMap<String, (FaultedReplica, Arc<Pool>)>,
}

impl ReplicaCatalog {
    /// Builds the catalog by scanning the `replicas/` directory of every
    /// pool, finishing interrupted operations (see the module docs), and sets
    /// each pool's provisioned bytes and replica count from what it found.
    ///
    /// There is one catalog per [`PoolManager`]: loading another one replaces
    /// the pools' accounting.
    ///
    /// # Errors
    ///
    /// [`Error::Scan`] if a directory cannot be listed,
    /// [`Error::DuplicateReplica`] if two pools hold the same name, or the
    /// error of removing an unfinished create. Damaged replicas are not
    /// errors: see [`ReplicaCatalog::faulted`].
    pub fn load(pools: Arc<PoolManager>) -> Result<Self, Error> {
        let mut catalog = Self {
            pools,
            replicas: BTreeMap::new(),
            faulted: BTreeMap::new(),
        };
        for pool in catalog.pools.list() {
            catalog.scan_pool(&pool)?;
        }
        info!(
            replicas = catalog.replicas.len(),
            faulted = catalog.faulted.len(),
            "Replica catalog loaded"
        );
        Ok(catalog)
    }

    /// Returns the pools the catalog places replicas in.
    pub fn pools(&self) -> &Arc<PoolManager> {
        &self.pools
    }

    /// Creates a replica, or returns the existing one if a replica with the
    /// same name, volume, size and thinness exists (in the requested pool,
    /// if one is named).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::InvalidSize`],
    /// [`Error::AlreadyExists`] for the same name
    /// with other parameters, [`Error::Faulted`] if the name belongs to a
    /// faulted replica, [`Error::Pool`] (pool not found, no pool fits,
    /// overcommit limit, insufficient space), [`Error::NoSpace`], and file
    /// errors. On error no files are left behind.
    pub fn create(&mut self, req: &CreateReplica) -> Result<Replica, Error> {
        if let Some(existing) = self.existing(req, "")? {
            return Ok(existing);
        }

        let pool = match &req.pool {
            Some(name) => self.pools.get(name)?,
            None => self.pools.choose(req.size_bytes, !req.thin)?,
        };
        let provision = pool.provision(req.size_bytes, !req.thin, true)?;
        let (data_path, meta_path) = paths(&pool, &req.name);

        create_data(&data_path, &meta_path, req.size_bytes, req.thin)?;
        let meta = ReplicaMeta::new(&req.volume_id, req.size_bytes, req.thin);
        if let Err(e) = meta.store(&meta_path) {
            remove_quietly(&data_path);
            return Err(e);
        }
        provision.commit();

        let replica = Replica {
            name: req.name.clone(),
            pool: pool.name().to_owned(),
            data_path,
            meta_path,
            meta,
        };
        info!(
            replica.id = %replica.name,
            volume.id = %replica.meta.volume_id,
            pool.name = %replica.pool,
            size_bytes = replica.meta.size_bytes,
            thin = replica.meta.thin,
            "Replica created"
        );
        self.replicas.insert(
            req.name.clone(),
            Entry {
                replica: replica.clone(),
                pool,
            },
        );
        Ok(replica)
    }

    /// Returns the replica a create (`source_snapshot` empty) or a restore
    /// (`source_snapshot` naming the copy) of `req` would return without
    /// doing anything, if one exists: same name, volume, size, thinness and
    /// source snapshot (in the requested pool, if one is named).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::InvalidSize`], [`Error::Faulted`] if
    /// the name belongs to a faulted replica, [`Error::AlreadyExists`] for
    /// the same name with other parameters.
    pub fn existing(
        &self,
        req: &CreateReplica,
        source_snapshot: &str,
    ) -> Result<Option<Replica>, Error> {
        validate_name(&req.name)?;
        validate_size(req.size_bytes)?;
        self.check_not_faulted(&req.name)?;
        let Some(existing) = self.replicas.get(&req.name) else {
            return Ok(None);
        };
        let r = &existing.replica;
        let same = r.meta.size_bytes == req.size_bytes
            && r.meta.thin == req.thin
            && r.meta.volume_id == req.volume_id
            && r.meta.source_snapshot == source_snapshot
            && req.pool.as_ref().is_none_or(|p| *p == r.pool);
        if same {
            return Ok(Some(r.clone()));
        }
        Err(Error::AlreadyExists {
            name: r.name.clone(),
            pool: r.pool.clone(),
            volume_id: r.meta.volume_id.clone(),
            size_bytes: r.meta.size_bytes,
            thin: r.meta.thin,
            source_snapshot: r.meta.source_snapshot.clone(),
        })
    }

    /// Creates a replica whose contents start as those of a snapshot copy:
    /// its data file is a reflink of the copy's, in the copy's pool, grown
    /// to `req.size_bytes` (the tail reads as zeros). A thick restore also
    /// allocates the holes; blocks shared with the copy stay shared until
    /// written. The pool provisions the replica like any other. Returns the
    /// existing replica if the same restore was done before (see
    /// [`ReplicaCatalog::existing`]).
    ///
    /// The caller keeps the copy from being deleted during the call.
    ///
    /// # Errors
    ///
    /// Those of [`ReplicaCatalog::existing`], [`Error::SourcePool`] if
    /// `req.pool` names another pool than the copy's,
    /// [`Error::SmallerThanSource`], [`Error::Pool`] (overcommit limit,
    /// insufficient space), [`Error::ReflinkUnsupported`],
    /// [`Error::NoSpace`], and file errors. On error no files are left
    /// behind.
    pub fn restore(&mut self, req: &CreateReplica, source: &SourceCopy) -> Result<Replica, Error> {
        if let Some(existing) = self.existing(req, &source.snapshot_id)? {
            return Ok(existing);
        }
        if let Some(pool) = req.pool.as_ref().filter(|p| **p != source.pool) {
            return Err(Error::SourcePool {
                name: req.name.clone(),
                pool: pool.clone(),
                snapshot_id: source.snapshot_id.clone(),
                source_pool: source.pool.clone(),
            });
        }
        if req.size_bytes < source.size_bytes {
            return Err(Error::SmallerThanSource {
                name: req.name.clone(),
                size_bytes: req.size_bytes,
                snapshot_id: source.snapshot_id.clone(),
                source_bytes: source.size_bytes,
            });
        }
        let pool = self.pools.get(&source.pool)?;
        let provision = pool.provision(req.size_bytes, !req.thin, true)?;
        let (data_path, meta_path) = paths(&pool, &req.name);

        clone_data(&data_path, &meta_path, source, req.size_bytes, req.thin)?;
        let meta = ReplicaMeta {
            source_snapshot: source.snapshot_id.clone(),
            ..ReplicaMeta::new(&req.volume_id, req.size_bytes, req.thin)
        };
        if let Err(e) = meta.store(&meta_path) {
            remove_quietly(&data_path);
            return Err(e);
        }
        provision.commit();

        let replica = Replica {
            name: req.name.clone(),
            pool: pool.name().to_owned(),
            data_path,
            meta_path,
            meta,
        };
        info!(
            replica.id = %replica.name,
            volume.id = %replica.meta.volume_id,
            snapshot.id = %source.snapshot_id,
            pool.name = %replica.pool,
            size_bytes = replica.meta.size_bytes,
            thin = replica.meta.thin,
            "Replica restored from a snapshot copy"
        );
        self.replicas.insert(
            req.name.clone(),
            Entry {
                replica: replica.clone(),
                pool,
            },
        );
        Ok(replica)
    }

    /// Grows a replica to `size_bytes`; growing to the current size does
    /// nothing. A thick replica's new tail is allocated.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`], [`Error::NotFound`], [`Error::Faulted`],
    /// [`Error::Shrink`] for a smaller size, [`Error::Pool`] (overcommit
    /// limit, insufficient space), [`Error::NoSpace`], and file errors.
    pub fn grow(&mut self, name: &str, size_bytes: u64) -> Result<Replica, Error> {
        validate_size(size_bytes)?;
        self.check_not_faulted(name)?;
        let entry = self.replicas.get_mut(name).ok_or_else(|| Error::NotFound {
            name: name.to_owned(),
        })?;
        let current = entry.replica.meta.size_bytes;
        if size_bytes == current {
            return Ok(entry.replica.clone());
        }
        if size_bytes < current {
            return Err(Error::Shrink {
                name: name.to_owned(),
                size_bytes: current,
                requested_bytes: size_bytes,
            });
        }
        let thin = entry.replica.meta.thin;
        let provision = entry.pool.provision(size_bytes - current, !thin, false)?;
        let data_path = &entry.replica.data_path;
        let file = OpenOptions::new()
            .write(true)
            .open(data_path)
            .map_err(|source| Error::OpenData {
                path: data_path.clone(),
                source,
            })?;
        set_size(&file, data_path, current, size_bytes, thin)?;
        file.sync_all().map_err(|source| Error::SyncData {
            path: data_path.clone(),
            source,
        })?;
        let meta = ReplicaMeta {
            size_bytes,
            ..entry.replica.meta.clone()
        };
        meta.store(&entry.replica.meta_path)?;
        provision.commit();
        entry.replica.meta = meta;
        info!(replica.id = %name, from_bytes = current, size_bytes, "Replica grown");
        Ok(entry.replica.clone())
    }

    /// Destroys a replica (healthy or faulted): removes its metadata, then
    /// its data. The caller must have stopped any export of it first.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], or [`Error::Remove`] if the metadata could not be
    /// removed (the replica then still exists). Once the metadata is gone the
    /// destroy has happened: a data file that cannot be removed is logged and
    /// left for the next start-up to clean.
    pub fn destroy(&mut self, name: &str) -> Result<(), Error> {
        let (meta_path, data_path, pool, size_bytes) = if let Some(e) = self.replicas.get(name) {
            let r = &e.replica;
            (
                r.meta_path.clone(),
                r.data_path.clone(),
                Arc::clone(&e.pool),
                r.meta.size_bytes,
            )
        } else if let Some((f, pool)) = self.faulted.get(name) {
            let size = f.meta.as_ref().map_or(0, |m| m.size_bytes);
            (
                f.meta_path.clone(),
                f.data_path.clone(),
                Arc::clone(pool),
                size,
            )
        } else {
            return Err(Error::NotFound {
                name: name.to_owned(),
            });
        };

        // A faulted replica may have lost its metadata already: that is
        // no error.
        let left =
            durable::remove_committed(&meta_path, &data_path).map_err(|source| Error::Remove {
                path: meta_path.clone(),
                source,
            })?;
        if let Some(e) = left {
            warn!(replica.id = %name, path = %data_path.display(), error = %e, "Cannot remove data of a destroyed replica; it will be removed at the next start-up");
        }
        self.replicas.remove(name);
        self.faulted.remove(name);
        pool.release(size_bytes, true);
        info!(replica.id = %name, pool.name = %pool.name(), "Replica destroyed");
        Ok(())
    }

    /// Returns a healthy replica.
    ///
    /// # Errors
    ///
    /// [`Error::Faulted`] or [`Error::NotFound`].
    pub fn get(&self, name: &str) -> Result<Replica, Error> {
        self.check_not_faulted(name)?;
        self.replicas
            .get(name)
            .map(|e| e.replica.clone())
            .ok_or_else(|| Error::NotFound {
                name: name.to_owned(),
            })
    }

    /// Returns every healthy replica, ordered by name.
    pub fn list(&self) -> Vec<Replica> {
        self.replicas.values().map(|e| e.replica.clone()).collect()
    }

    /// Returns every faulted replica, ordered by name.
    pub fn faulted(&self) -> Vec<FaultedReplica> {
        self.faulted.values().map(|(f, _)| f.clone()).collect()
    }

    /// Persists `epoch` as the replica's highest accepted epoch. The same
    /// epoch again does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::StaleEpoch`] for an epoch lower than the accepted one,
    /// [`Error::NotFound`], [`Error::Faulted`], [`Error::WriteMeta`] (the old
    /// epoch then stays in force).
    pub fn set_epoch(&mut self, name: &str, epoch: u64) -> Result<Replica, Error> {
        self.check_not_faulted(name)?;
        let entry = self.replicas.get_mut(name).ok_or_else(|| Error::NotFound {
            name: name.to_owned(),
        })?;
        let current = entry.replica.meta.epoch;
        if epoch < current {
            return Err(Error::StaleEpoch {
                name: name.to_owned(),
                epoch: current,
                requested: epoch,
            });
        }
        if epoch > current {
            let meta = ReplicaMeta {
                epoch,
                ..entry.replica.meta.clone()
            };
            meta.store(&entry.replica.meta_path)?;
            entry.replica.meta = meta;
            info!(replica.id = %name, epoch, "Replica epoch raised");
        }
        Ok(entry.replica.clone())
    }

    /// Returns the bytes actually allocated to a replica's data file
    /// (`st_blocks * 512`).
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`], [`Error::Faulted`], [`Error::StatData`].
    pub fn allocated_bytes(&self, name: &str) -> Result<u64, Error> {
        let replica = self.get(name)?;
        let meta = fs::metadata(&replica.data_path).map_err(|source| Error::StatData {
            path: replica.data_path.clone(),
            source,
        })?;
        Ok(meta.blocks().saturating_mul(512))
    }

    fn check_not_faulted(&self, name: &str) -> Result<(), Error> {
        match self.faulted.get(name) {
            Some((f, _)) => Err(Error::Faulted {
                name: name.to_owned(),
                reason: f.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn scan_pool(&mut self, pool: &Arc<Pool>) -> Result<(), Error> {
        let dir = pool.replicas_dir();
        let scan_err = |source| Error::Scan {
            path: dir.clone(),
            source,
        };
        let mut metas = BTreeSet::new();
        let mut datas = BTreeSet::new();
        for entry in fs::read_dir(&dir).map_err(scan_err)? {
            let file_name = entry.map_err(scan_err)?.file_name();
            let Some(file_name) = file_name.to_str() else {
                warn!(pool.name = %pool.name(), file = ?file_name, "Ignoring a file with a non-UTF-8 name");
                continue;
            };
            if durable::is_temp_name(file_name.as_ref()) {
                // A metadata update that crashed before its rename; the old
                // metadata is intact.
                let path = dir.join(file_name);
                info!(pool.name = %pool.name(), path = %path.display(), "Removing an interrupted metadata write");
                remove_quietly(&path);
            } else if let Some(name) = file_name.strip_suffix(META_SUFFIX) {
                metas.insert(name.to_owned());
            } else if let Some(name) = file_name.strip_suffix(DATA_SUFFIX) {
                datas.insert(name.to_owned());
            } else {
                warn!(pool.name = %pool.name(), file = %file_name, "Ignoring an unexpected file among replicas");
            }
        }

        let mut provisioned_bytes = 0u64;
        let mut count = 0u64;
        for name in metas.union(&datas) {
            if validate_name(name).is_err() {
                warn!(pool.name = %pool.name(), name = %name, "Ignoring replica files with an invalid name");
                continue;
            }
            let (data_path, meta_path) = paths(pool, name);
            if !metas.contains(name) {
                warn!(replica.id = %name, pool.name = %pool.name(), "Removing the data file of an unfinished create or destroy");
                durable::remove(&data_path).map_err(|source| Error::Remove {
                    path: data_path.clone(),
                    source,
                })?;
                continue;
            }
            if let Some(first_pool) = self.pool_of(name) {
                return Err(Error::DuplicateReplica {
                    name: name.clone(),
                    first_pool,
                    second_pool: pool.name().to_owned(),
                });
            }
            count += 1;
            let checked = match ReplicaMeta::load(&meta_path) {
                Ok(meta) => match check_data(&data_path, &meta) {
                    Ok(()) => Ok(meta),
                    Err(reason) => Err((reason, Some(meta))),
                },
                Err(e) => Err((crate::error_chain(&e), None)),
            };
            match checked {
                Ok(meta) => {
                    provisioned_bytes += meta.size_bytes;
                    let replica = Replica {
                        name: name.clone(),
                        pool: pool.name().to_owned(),
                        data_path,
                        meta_path,
                        meta,
                    };
                    self.replicas.insert(
                        name.clone(),
                        Entry {
                            replica,
                            pool: Arc::clone(pool),
                        },
                    );
                }
                Err((reason, meta)) => {
                    error!(replica.id = %name, pool.name = %pool.name(), reason = %reason, "Replica is faulted; it keeps its name until destroyed");
                    provisioned_bytes += meta.as_ref().map_or(0, |m| m.size_bytes);
                    let faulted = FaultedReplica {
                        name: name.clone(),
                        pool: pool.name().to_owned(),
                        data_path,
                        meta_path,
                        meta,
                        reason,
                    };
                    self.faulted
                        .insert(name.clone(), (faulted, Arc::clone(pool)));
                }
            }
        }
        pool.set_provisioned(provisioned_bytes, count);
        Ok(())
    }

    fn pool_of(&self, name: &str) -> Option<String> {
        self.replicas
            .get(name)
            .map(|e| e.replica.pool.clone())
            .or_else(|| self.faulted.get(name).map(|(f, _)| f.pool.clone()))
    }
}

/// Checks a replica name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`,
/// not starting with a dot (dot files are the catalog's temporary files).
///
/// # Errors
///
/// [`Error::InvalidName`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), Error> {
    match name_problem(name) {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Returns what is wrong with a name of a file in a pool (a replica name, a
/// snapshot id), or `None` if it is 1 to [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._-]` and does not start with a dot.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed")
    } else {
        None
    }
}

/// Checks a replica size: positive, a multiple of [`SIZE_ALIGN_BYTES`], and
/// representable as a file offset.
///
/// # Errors
///
/// [`Error::InvalidSize`].
pub fn validate_size(size_bytes: u64) -> Result<(), Error> {
    if size_bytes == 0
        || !size_bytes.is_multiple_of(SIZE_ALIGN_BYTES)
        || libc::off_t::try_from(size_bytes).is_err()
    {
        return Err(Error::InvalidSize { size_bytes });
    }
    Ok(())
}

fn paths(pool: &Pool, name: &str) -> (PathBuf, PathBuf) {
    let dir = pool.replicas_dir();
    (
        dir.join(format!("{name}{DATA_SUFFIX}")),
        dir.join(format!("{name}{META_SUFFIX}")),
    )
}
