//! Epoch fencing of one replica: [`FencedReplica`].
//!
//! # What it owns
//!
//! A [`FencedReplica`] wraps the replica's data path ([`ReplicaData`]), the
//! replica's highest accepted epoch (loaded from its metadata), and an
//! [`EpochStore`] that persists a new epoch durably (the agent's
//! [`CatalogEpochStore`] calls [`ReplicaCatalog::set_epoch`] on the blocking
//! pool). Every operation carries the caller's epoch and is *admitted* before
//! it touches data:
//!
//! - `epoch < highest`: refused with [`Error::StaleEpoch`], reporting the
//!   current epoch; nothing is read or written.
//! - `epoch == highest`: admitted at once.
//! - `epoch > highest`: the new epoch is persisted first (durably), then the
//!   request is admitted and `highest` raised. If persisting fails the
//!   request fails with [`Error::PersistEpoch`] and the old epoch stays.
//!
//! # Fencing invariant
//!
//! DESIGN.md, invariant 3: *a stale target can never write after a newer one
//! has started.* Refusing lower epochs is not enough: a write admitted under
//! epoch 1 may still be running on the device when epoch 2 arrives, and could
//! land after the epoch-2 target has read or written the same bytes. So the
//! epoch sits in an async reader-writer lock (tokio's, which is fair: FIFO):
//!
//! - Every admitted operation holds a *read* guard from its epoch check until
//!   the device call has completed.
//! - Raising the epoch takes the *write* guard, which waits for every
//!   admitted operation (all under lower epochs) to complete; it persists the
//!   new epoch, updates it, and downgrades to a read guard for the request
//!   that raised it. Operations that arrive meanwhile queue behind the
//!   writer, then see the new epoch, and lower ones are refused.
//! - Concurrent raises serialise on the write guard; a raise to an epoch at
//!   most the current one does nothing.
//!
//! # Sessions
//!
//! The same ordering holds *within* an epoch between the connections of a
//! remote target ([`super::protocol`], sessions). Requests from the server
//! carry their connection's session; the lock holds the newest (epoch,
//! session) admitted, compared in that order:
//!
//! - a lower session under the current epoch is refused with
//!   [`Error::StaleSession`], nothing executed;
//! - a higher session takes the write guard like an epoch raise (waiting
//!   for every admitted operation, all of older sessions or epochs), then
//!   records the session (in memory only: after a restart no connection of
//!   before can send anything) and downgrades;
//! - raising the epoch resets the session to the raising request's.
//!
//! In-process callers (the [`ReplicaIo`] methods of [`FencedReplica`]) have
//! no session and are only checked by epoch: their requests are never
//! abandoned while queued (a local request is waited for, not timed out).
//!
//! Cancellation must not break this: dropping a caller's future must not
//! release the guard while the kernel may still write. So every operation,
//! including its admission and any epoch persist, runs in its own tokio task
//! that owns the guard and runs to completion whatever happens to the caller.
//!
//! While the replica is open, the [`FencedReplica`] must be the only writer
//! of its epoch: the agent raises epochs through
//! [`FencedReplica::raise_epoch`], never behind its back in the catalog, or
//! the in-memory epoch would lag the durable one.
//!
//! # What it must never do
//!
//! Touch data for a stale epoch or session; run I/O under an epoch that is
//! not yet durable; let an I/O admitted under an old epoch (or session)
//! overlap one admitted under a newer one.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};
use tracing::{debug, info};

use super::sparse;
use super::{
    Error, Extent, Location, RegionHash, ReplicaInfo, ReplicaIo, check_payload_len,
    check_region_bytes, hash_chunk_bytes,
};
use crate::block::{BlockDevice, BlockError};
use crate::buf::IoBuf;
use crate::replica::data::ReplicaData;
use crate::replica::{Replica, ReplicaCatalog};

/// The error an [`EpochStore`] reports.
pub type PersistError = Box<dyn std::error::Error + Send + Sync>;

/// Durable storage of a replica's highest accepted epoch.
///
/// The agent implements it over the replica catalog ([`CatalogEpochStore`]);
/// tests implement it in memory.
#[async_trait]
pub trait EpochStore: Send + Sync + 'static {
    /// Persists `epoch` as the replica's highest accepted epoch, durably
    /// (fsynced) before returning `Ok`. Called only with an epoch higher than
    /// any it was called with before, and never concurrently for one replica.
    /// On error the previous epoch must still be in force on disk.
    async fn persist(&self, epoch: u64) -> Result<(), PersistError>;
}

/// An [`EpochStore`] that writes the epoch into the replica's metadata file
/// with [`ReplicaCatalog::set_epoch`], on the blocking pool.
#[derive(Debug, Clone)]
pub struct CatalogEpochStore {
    catalog: Arc<Mutex<ReplicaCatalog>>,
    replica: String,
}

impl CatalogEpochStore {
    /// Persists epochs of the replica named `replica` in `catalog` (the
    /// agent's catalog, behind its one mutex).
    pub fn new(catalog: Arc<Mutex<ReplicaCatalog>>, replica: &str) -> Self {
        Self {
            catalog,
            replica: replica.to_owned(),
        }
    }
}

#[async_trait]
impl EpochStore for CatalogEpochStore {
    async fn persist(&self, epoch: u64) -> Result<(), PersistError> {
        let catalog = Arc::clone(&self.catalog);
        let name = self.replica.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while the lock was held leaves the catalog usable:
            // every catalog change is on disk before it is in memory.
            let mut catalog = catalog
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            catalog.set_epoch(&name, epoch).map(drop)
        })
        .await?
        .map_err(PersistError::from)
    }
}

/// One replica behind epoch fencing: see the module docs.
///
/// Cheap to share behind an `Arc`; every method may be called concurrently,
/// from within a tokio runtime.
///
/// # Cancel safety
///
/// Every async method is cancel safe in the sense that matters for fencing:
/// its admission, any epoch persist and its I/O run in their own task and
/// complete even if the caller's future is dropped, holding off newer epochs
/// until then. The caller only loses the result.
pub struct FencedReplica {
    inner: Arc<Inner>,
}

struct Inner {
    replica_id: String,
    volume_id: String,
    device: Arc<dyn BlockDevice>,
    block_size: u64,
    /// The data file, for allocation queries; `None` when the device is not
    /// a file (tests), in which case everything counts as data.
    data_path: Option<PathBuf>,
    store: Arc<dyn EpochStore>,
    /// The highest accepted epoch and the newest session admitted under
    /// it; read guards are held by admitted I/O.
    epoch: Arc<RwLock<Admitted>>,
    /// A copy of `epoch` readable without waiting.
    current: AtomicU64,
}

impl FencedReplica {
    /// Fences `data`, the data path of replica `replica_id` of volume
    /// `volume_id`, whose highest accepted epoch is `epoch` (from its
    /// metadata). New epochs are persisted through `store`.
    pub fn new(
        replica_id: &str,
        volume_id: &str,
        data: Arc<ReplicaData>,
        epoch: u64,
        store: Arc<dyn EpochStore>,
    ) -> Self {
        let block_size = data.block_size();
        let data_path = Some(data.path().to_owned());
        Self::with_device(
            replica_id, volume_id, data, block_size, data_path, epoch, store,
        )
    }

    /// Fences `data` for the catalog's `replica`, starting from the epoch in
    /// its metadata.
    pub fn for_replica(
        replica: &Replica,
        data: Arc<ReplicaData>,
        store: Arc<dyn EpochStore>,
    ) -> Self {
        Self::new(
            &replica.name,
            &replica.meta.volume_id,
            data,
            replica.meta.epoch,
            store,
        )
    }

    /// Fences any block device; allocation queries read `data_path` when
    /// given. Used by tests to put a controllable device behind the fence.
    pub(crate) fn with_device(
        replica_id: &str,
        volume_id: &str,
        device: Arc<dyn BlockDevice>,
        block_size: u64,
        data_path: Option<PathBuf>,
        epoch: u64,
        store: Arc<dyn EpochStore>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                replica_id: replica_id.to_owned(),
                volume_id: volume_id.to_owned(),
                device,
                block_size,
                data_path,
                store,
                epoch: Arc::new(RwLock::new(Admitted { epoch, session: 0 })),
                current: AtomicU64::new(epoch),
            }),
        }
    }

    /// The replica's name on this node.
    pub fn replica_id(&self) -> &str {
        &self.inner.replica_id
    }

    /// The highest accepted epoch, without waiting for a raise in progress
    /// (which may be about to raise it).
    pub fn current_epoch(&self) -> u64 {
        self.inner.current.load(Ordering::Acquire)
    }

    /// Size of the replica in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.device.size_bytes()
    }

    /// Admits `epoch` without doing I/O: persists it first if it is higher
    /// than the highest accepted one (waiting for I/O under lower epochs to
    /// complete). The agent calls it when a target is created.
    ///
    /// Errors: [`Error::StaleEpoch`], [`Error::PersistEpoch`].
    pub async fn raise_epoch(&self, epoch: u64) -> Result<(), Error> {
        self.run(epoch, Command::Admit).await.map(drop)
    }

    /// Executes `command` under an admission of `epoch` in its own task, so
    /// that the admission and the I/O run to completion even if the caller's
    /// future is dropped (see the module docs).
    async fn run(&self, epoch: u64, command: Command) -> Result<Outcome, Error> {
        let inner = Arc::clone(&self.inner);
        let task = async move { inner.admit_and_execute(epoch, None, command).await };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => runtime.spawn(task).await.unwrap_or_else(|error| {
                Err(Error::Device(io::Error::other(format!(
                    "Replica I/O task failed: {error}"
                ))))
            }),
            Err(_) => task.await,
        }
    }

    /// Executes `command` under an admission of `epoch` and `session` (a
    /// remote connection's, see the module docs) in a new task and hands
    /// the outcome to `then` from that task: what the server does, one task
    /// per request. Must be called within a tokio runtime.
    pub(crate) fn submit(
        &self,
        epoch: u64,
        session: u64,
        command: Command,
        then: impl FnOnce(Result<Outcome, Error>) + Send + 'static,
    ) {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(
            async move { then(inner.admit_and_execute(epoch, Some(session), command).await) },
        );
    }
}

/// The newest admission: the highest accepted epoch and the newest
/// session admitted under it (0 when only in-process callers were).
#[derive(Debug, Clone, Copy)]
struct Admitted {
    epoch: u64,
    session: u64,
}

impl Admitted {
    /// True when a request of `epoch` and `session` must raise this
    /// admission (and so wait for every operation admitted before).
    fn is_older_than(&self, epoch: u64, session: Option<u64>) -> bool {
        epoch > self.epoch || (epoch == self.epoch && session.is_some_and(|s| s > self.session))
    }
}

/// One operation on the replica, executed under one admission.
#[derive(Debug)]
pub(crate) enum Command {
    /// Only admits the epoch.
    Admit,
    /// Reports size, block size and epoch.
    Info,
    /// Reads `length` bytes at `offset`.
    Read { offset: u64, length: usize },
    /// Writes `data` at `offset`.
    Write { offset: u64, data: IoBuf, fua: bool },
    /// Flushes.
    Flush,
    /// Discards a range.
    Trim { offset: u64, length: u64 },
    /// Zeroes a range.
    WriteZeroes {
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    },
    /// Hashes a range (at most [`hash_chunk_bytes`] of it) in regions.
    RegionHashes {
        offset: u64,
        length: u64,
        region_bytes: u64,
    },
    /// Lists up to `max_extents` allocated extents in a range.
    AllocatedExtents {
        offset: u64,
        length: u64,
        max_extents: usize,
    },
}

/// What a [`Command`] produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Nothing to return.
    Done,
    /// INFO's answer.
    Info(ReplicaInfo),
    /// Bytes read.
    Data(IoBuf),
    /// Region hashes.
    Hashes(Vec<RegionHash>),
    /// Extents, and the offset up to which they are complete.
    Extents(Vec<Extent>, u64),
}

/// The error for an outcome that does not match its command (a bug).
fn mismatch(outcome: Outcome) -> Error {
    Error::Device(io::Error::other(format!(
        "Replica command produced an unexpected {outcome:?}"
    )))
}

impl Inner {
    /// Checks `epoch` (and `session`, for a remote request) against the
    /// newest admission, raising it if older; the returned guard keeps any
    /// raise waiting until it is dropped.
    async fn admit(
        &self,
        epoch: u64,
        session: Option<u64>,
    ) -> Result<OwnedRwLockReadGuard<Admitted>, Error> {
        let admitted = Arc::clone(&self.epoch).read_owned().await;
        if !admitted.is_older_than(epoch, session) {
            return self.check(epoch, session, admitted);
        }
        drop(admitted);
        // Waits for every operation admitted under a lower epoch or an
        // older session.
        let mut raising = Arc::clone(&self.epoch).write_owned().await;
        if raising.is_older_than(epoch, session) {
            if epoch > raising.epoch {
                self.store
                    .persist(epoch)
                    .await
                    .map_err(|source| Error::PersistEpoch { epoch, source })?;
                info!(
                    volume.id = %self.volume_id,
                    replica.id = %self.replica_id,
                    epoch,
                    previous = raising.epoch,
                    "Replica epoch raised"
                );
                raising.epoch = epoch;
                self.current.store(epoch, Ordering::Release);
            } else {
                debug!(
                    volume.id = %self.volume_id,
                    replica.id = %self.replica_id,
                    epoch,
                    session,
                    previous = raising.session,
                    "Replica session raised"
                );
            }
            raising.session = session.unwrap_or(0);
        }
        self.check(epoch, session, raising.downgrade())
    }

    fn check(
        &self,
        epoch: u64,
        session: Option<u64>,
        admitted: OwnedRwLockReadGuard<Admitted>,
    ) -> Result<OwnedRwLockReadGuard<Admitted>, Error> {
        if epoch < admitted.epoch {
            debug!(
                volume.id = %self.volume_id,
                replica.id = %self.replica_id,
                epoch,
                current = admitted.epoch,
                "Refusing a request with a stale epoch"
            );
            return Err(Error::StaleEpoch {
                request: epoch,
                current: admitted.epoch,
            });
        }
        if let Some(session) = session.filter(|&s| epoch == admitted.epoch && s < admitted.session)
        {
            debug!(
                volume.id = %self.volume_id,
                replica.id = %self.replica_id,
                epoch,
                session,
                current = admitted.session,
                "Refusing a request of a stale session"
            );
            return Err(Error::StaleSession {
                request: session,
                current: admitted.session,
            });
        }
        Ok(admitted)
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), Error> {
        BlockError::check_range(offset, length, self.device.size_bytes()).map_err(Error::from)
    }

    /// Allocated extents in `offset..end` (at most `max_extents`) and the
    /// offset up to which the list is complete.
    async fn extents(
        &self,
        offset: u64,
        end: u64,
        max_extents: usize,
    ) -> Result<(Vec<Extent>, u64), Error> {
        let Some(path) = self.data_path.clone() else {
            let all = (offset < end).then_some(Extent {
                offset,
                length: end - offset,
            });
            return Ok((all.into_iter().collect(), end));
        };
        tokio::task::spawn_blocking(move || sparse::data_extents(&path, offset, end, max_extents))
            .await
            .map_err(|error| Error::Device(io::Error::other(error)))?
            .map_err(Error::Device)
    }

    /// Hashes `offset..end` in regions of `region_bytes`.
    async fn hash_regions(
        &self,
        offset: u64,
        end: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionHash>, Error> {
        let (extents, _) = self.extents(offset, end, usize::MAX).await?;
        let mut hashes = Vec::with_capacity((end - offset).div_ceil(region_bytes) as usize);
        // At most two distinct lengths: whole regions and a shorter last one.
        let mut zeroes: Option<(u64, u128)> = None;
        let mut start = offset;
        while start < end {
            let length = region_bytes.min(end - start);
            let hole = sparse::is_hole(&extents, start, length);
            let hash = if hole {
                match zeroes {
                    Some((cached, hash)) if cached == length => hash,
                    _ => {
                        let hash = sparse::zeroes_hash(length);
                        zeroes = Some((length, hash));
                        hash
                    }
                }
            } else {
                let data = self.device.read(start, length as usize).await?;
                sparse::hash(&data)
            };
            hashes.push(RegionHash {
                offset: start,
                length,
                hash,
                hole,
            });
            start += length;
        }
        Ok(hashes)
    }

    async fn admit_and_execute(
        &self,
        epoch: u64,
        session: Option<u64>,
        command: Command,
    ) -> Result<Outcome, Error> {
        let _admitted = self.admit(epoch, session).await?;
        self.execute(command).await
    }

    /// Executes an admitted command.
    async fn execute(&self, command: Command) -> Result<Outcome, Error> {
        let device = &self.device;
        match command {
            Command::Admit => Ok(Outcome::Done),
            Command::Info => Ok(Outcome::Info(ReplicaInfo {
                size_bytes: device.size_bytes(),
                block_size: self.block_size,
                epoch: self.current.load(Ordering::Acquire),
            })),
            Command::Read { offset, length } => {
                check_payload_len(length)?;
                Ok(Outcome::Data(device.read(offset, length).await?))
            }
            Command::Write { offset, data, fua } => {
                check_payload_len(data.len())?;
                device.write(offset, data, fua).await?;
                Ok(Outcome::Done)
            }
            Command::Flush => {
                device.flush().await?;
                Ok(Outcome::Done)
            }
            Command::Trim { offset, length } => {
                device.trim(offset, length).await?;
                Ok(Outcome::Done)
            }
            Command::WriteZeroes {
                offset,
                length,
                punch_hole,
                fua,
            } => {
                device.write_zeroes(offset, length, punch_hole, fua).await?;
                Ok(Outcome::Done)
            }
            Command::RegionHashes {
                offset,
                length,
                region_bytes,
            } => {
                check_region_bytes(region_bytes)?;
                self.check_range(offset, length)?;
                if length > hash_chunk_bytes(region_bytes) {
                    return Err(Error::InvalidRequest {
                        reason: format!(
                            "{length} bytes in regions of {region_bytes} exceed {} per request",
                            hash_chunk_bytes(region_bytes)
                        ),
                    });
                }
                let hashes = self
                    .hash_regions(offset, offset + length, region_bytes)
                    .await?;
                Ok(Outcome::Hashes(hashes))
            }
            Command::AllocatedExtents {
                offset,
                length,
                max_extents,
            } => {
                self.check_range(offset, length)?;
                let (extents, complete_to) =
                    self.extents(offset, offset + length, max_extents).await?;
                Ok(Outcome::Extents(extents, complete_to))
            }
        }
    }
}

impl std::fmt::Debug for FencedReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedReplica")
            .field("replica_id", &self.inner.replica_id)
            .field("volume_id", &self.inner.volume_id)
            .field("epoch", &self.current_epoch())
            .finish()
    }
}

#[async_trait]
impl ReplicaIo for FencedReplica {
    fn volume_id(&self) -> &str {
        &self.inner.volume_id
    }

    fn location(&self) -> Location {
        Location::Local
    }

    async fn info(&self, epoch: u64) -> Result<ReplicaInfo, Error> {
        match self.run(epoch, Command::Info).await? {
            Outcome::Info(info) => Ok(info),
            other => Err(mismatch(other)),
        }
    }

    async fn read(&self, epoch: u64, offset: u64, length: usize) -> Result<IoBuf, Error> {
        check_payload_len(length)?;
        match self.run(epoch, Command::Read { offset, length }).await? {
            Outcome::Data(data) => Ok(data),
            other => Err(mismatch(other)),
        }
    }

    async fn write(
        &self,
        epoch: u64,
        offset: u64,
        data: Arc<IoBuf>,
        fua: bool,
    ) -> Result<(), Error> {
        check_payload_len(data.len())?;
        // The engine needs an owned buffer; copy only if it is shared.
        let data = Arc::try_unwrap(data).unwrap_or_else(|shared| IoBuf::from_slice(&shared));
        self.run(epoch, Command::Write { offset, data, fua })
            .await
            .map(drop)
    }

    async fn flush(&self, epoch: u64) -> Result<(), Error> {
        self.run(epoch, Command::Flush).await.map(drop)
    }

    async fn trim(&self, epoch: u64, offset: u64, length: u64) -> Result<(), Error> {
        self.run(epoch, Command::Trim { offset, length })
            .await
            .map(drop)
    }

    async fn write_zeroes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), Error> {
        let command = Command::WriteZeroes {
            offset,
            length,
            punch_hole,
            fua,
        };
        self.run(epoch, command).await.map(drop)
    }

    async fn region_hashes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionHash>, Error> {
        check_region_bytes(region_bytes)?;
        // Each chunk checks its own range; this spares hashing the chunks
        // before a range that cannot succeed.
        self.inner.check_range(offset, length)?;
        let end = offset + length;
        let chunk = hash_chunk_bytes(region_bytes);
        let mut hashes = Vec::new();
        let mut start = offset;
        // One admission per chunk, so a long hash cannot hold off a newer
        // epoch for long; at least one, so an empty range checks the epoch.
        loop {
            let stop = end.min(start.saturating_add(chunk));
            let command = Command::RegionHashes {
                offset: start,
                length: stop - start,
                region_bytes,
            };
            match self.run(epoch, command).await? {
                Outcome::Hashes(part) => hashes.extend(part),
                other => return Err(mismatch(other)),
            }
            start = stop;
            if start >= end {
                return Ok(hashes);
            }
        }
    }

    async fn allocated_extents(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, Error> {
        let command = Command::AllocatedExtents {
            offset,
            length,
            max_extents: usize::MAX,
        };
        match self.run(epoch, command).await? {
            Outcome::Extents(extents, _) => Ok(extents),
            other => Err(mismatch(other)),
        }
    }
}
