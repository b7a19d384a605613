//! The agent: pools, the replica catalog, the I/O engine, the exports, the
//! fenced replicas that the replica server and local targets share, and the
//! volume targets, with the operations the gRPC API offers on them.
//!
//! Every operation that touches disks (mkfs, mount, fallocate, metadata
//! fsync, FICLONE, FIEMAP) runs on tokio's blocking pool so the runtime's
//! threads stay free for NBD traffic. Catalog changes are serialised by one
//! mutex; export changes by another, which is always taken first when both
//! are needed (destroy and grow must see whether the replica is exported).
//! The snapshot copy catalog has a third lock, always taken after the
//! replica catalog's (a copy reads a replica, a restore makes one); range
//! scans open the copies under it and run without it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use crate::pool::{self, Pool, PoolCapacity, PoolConfig, PoolManager};
use crate::raw_export::{self, ExportInfo, Exports};
use crate::replica::{self, CreateReplica, Replica, ReplicaCatalog};
use crate::replication::{self, ReplicaServer};
use crate::snapshot::{self, RangesPage, SnapshotCatalog, SnapshotCopy};
use crate::target::{LocalReplicas, Targets, TargetsConfig};
use crate::uring::{self, IoEngine};

/// Errors of agent operations. Each maps to one gRPC code in `api`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pool operation failed.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// A replica operation failed.
    #[error(transparent)]
    Replica(#[from] replica::Error),
    /// A snapshot copy operation failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// An export operation failed.
    #[error(transparent)]
    Export(#[from] raw_export::Error),
    /// The I/O engine could not start.
    #[error("Cannot start the io_uring I/O engine")]
    Engine(#[source] uring::Error),
    /// The replica is exported, so it cannot be destroyed.
    #[error("Replica {name} is exported; stop its export first")]
    ReplicaExported {
        /// Replica name.
        name: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("Internal task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Directory for pool mount points and agent state.
    pub state_dir: PathBuf,
    /// The pools to open or create.
    pub pools: Vec<PoolConfig>,
    /// Number of io_uring ring threads.
    pub io_threads: usize,
    /// Submission queue entries per ring.
    pub io_queue_depth: u32,
}

/// A pool with its current capacity figures.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    /// The pool.
    pub pool: Arc<Pool>,
    /// Its capacity in bytes.
    pub capacity: PoolCapacity,
}

/// A replica with figures read from its file.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// The replica as the catalog knows it.
    pub replica: Replica,
    /// Bytes of the pool its data file occupies.
    pub allocated_bytes: u64,
    /// True while an NBD export serves it.
    pub exported: bool,
}

/// A snapshot copy with figures read from its file.
#[derive(Debug, Clone)]
pub struct SnapshotCopyStatus {
    /// The copy as the catalog knows it.
    pub copy: SnapshotCopy,
    /// Bytes of the pool its data file maps (shared or not).
    pub allocated_bytes: u64,
}

/// The storage agent of one node.
pub struct Agent {
    pools: Arc<PoolManager>,
    catalog: Arc<Mutex<ReplicaCatalog>>,
    snapshots: Arc<parking_lot::Mutex<SnapshotCatalog>>,
    exports: tokio::sync::Mutex<Exports>,
    /// Fenced replicas, shared by the replica server and local targets.
    local: Arc<LocalReplicas>,
    targets: Targets,
}

impl Agent {
    /// Opens (formats, imports, mounts) every configured pool, loads the
    /// replica catalog and starts the I/O engine. Blocking: call it from
    /// `spawn_blocking` or before the runtime serves anything.
    ///
    /// Errors: the first pool that cannot be opened ([`Error::Pool`]; pools
    /// already opened are closed again), [`Error::Replica`] or
    /// [`Error::Snapshot`] if a catalog cannot be loaded, [`Error::Engine`].
    pub fn open(config: &AgentConfig) -> Result<Self, Error> {
        let engine =
            IoEngine::start(config.io_threads, config.io_queue_depth).map_err(Error::Engine)?;
        let pools = Arc::new(PoolManager::open_all(&config.state_dir, &config.pools)?);
        let loaded = ReplicaCatalog::load(pools.clone())
            .map_err(Error::from)
            .and_then(|catalog| {
                let snapshots = SnapshotCatalog::load(pools.clone())?;
                Ok((catalog, snapshots))
            });
        let (catalog, snapshots) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                if let Err(close) = pools.close_all() {
                    warn!(error = %crate::error_chain(&close), "Cannot close pools after a failed start");
                }
                return Err(e);
            }
        };
        for faulted in catalog.faulted() {
            warn!(replica.id = %faulted.name, pool.name = %faulted.pool, reason = %faulted.reason, "Replica is faulted");
        }
        for faulted in snapshots.faulted() {
            warn!(snapshot.id = %faulted.snapshot_id, pool = %faulted.pool, reason = %faulted.reason, "Snapshot copy is faulted");
        }
        info!(
            pools = pools.list().len(),
            replicas = catalog.list().len(),
            snapshot_copies = snapshots.list().len(),
            "Agent ready"
        );
        let catalog = Arc::new(Mutex::new(catalog));
        let local = Arc::new(LocalReplicas::new(catalog.clone(), engine.clone()));
        let targets = Targets::new(TargetsConfig::new(&config.state_dir), local.clone());
        Ok(Self {
            pools,
            catalog,
            snapshots: Arc::new(parking_lot::Mutex::new(snapshots)),
            exports: tokio::sync::Mutex::new(Exports::new(engine)),
            local,
            targets,
        })
    }

    /// Every pool with its capacity.
    pub async fn list_pools(&self) -> Result<Vec<PoolStatus>, Error> {
        let pools = self.pools.clone();
        blocking(move || {
            pools
                .list()
                .into_iter()
                .map(|pool| {
                    let capacity = pool.capacity()?;
                    Ok(PoolStatus { pool, capacity })
                })
                .collect()
        })
        .await
    }

    /// One pool by name. Errors: `pool::Error::PoolNotFound`.
    pub async fn get_pool(&self, name: &str) -> Result<PoolStatus, Error> {
        let pools = self.pools.clone();
        let name = name.to_string();
        blocking(move || {
            let pool = pools.get(&name)?;
            let capacity = pool.capacity()?;
            Ok(PoolStatus { pool, capacity })
        })
        .await
    }

    /// Creates a replica (idempotent; see `ReplicaCatalog::create`).
    pub async fn create_replica(&self, request: CreateReplica) -> Result<ReplicaStatus, Error> {
        let name = request.name.clone();
        self.with_catalog(move |catalog| catalog.create(&request).map(|_| ()))
            .await?;
        self.replica_status(&name).await
    }

    /// Creates a replica restored from the snapshot copy `snapshot_id`
    /// (idempotent; see `ReplicaCatalog::restore`). An earlier identical
    /// restore is returned even if the copy has since been deleted.
    ///
    /// Errors: [`Error::Replica`] (invalid arguments, ALREADY_EXISTS, pool
    /// mismatch, size below the copy's, no space, no reflink),
    /// [`Error::Snapshot`] (`NotFound` if the node holds no such copy).
    pub async fn restore_replica(
        &self,
        request: CreateReplica,
        snapshot_id: &str,
    ) -> Result<ReplicaStatus, Error> {
        let name = request.name.clone();
        let catalog = self.catalog.clone();
        let snapshots = self.snapshots.clone();
        let snapshot_id = snapshot_id.to_string();
        blocking(move || {
            let mut replicas = lock(&catalog);
            if replicas.existing(&request, &snapshot_id)?.is_some() {
                return Ok(());
            }
            // Held across the reflink: the copy cannot be deleted meanwhile.
            let copies = snapshots.lock();
            let source = copies.source(&snapshot_id)?;
            replicas.restore(&request, &source)?;
            Ok(())
        })
        .await?;
        self.replica_status(&name).await
    }

    /// Takes a snapshot copy of a replica (idempotent; see
    /// `SnapshotCatalog::create`), refreshing a prepared one. The caller
    /// (the controller) makes sure no write is in flight: the target's
    /// barrier is up, or there is no target.
    ///
    /// Errors: [`Error::Snapshot`] (invalid id, ALREADY_EXISTS, unknown or
    /// faulted replica, no reflink, no space).
    pub async fn create_snapshot_copy(
        &self,
        snapshot_id: &str,
        replica_name: &str,
    ) -> Result<SnapshotCopyStatus, Error> {
        let catalog = self.catalog.clone();
        let snapshots = self.snapshots.clone();
        let snapshot_id = snapshot_id.to_string();
        let replica_name = replica_name.to_string();
        blocking(move || {
            // The replica catalog's lock keeps the replica from being
            // destroyed or grown during the reflink.
            let replicas = lock(&catalog);
            let copy = snapshots
                .lock()
                .create(&snapshot_id, &replica_name, |name| replicas.get(name))?;
            drop(replicas);
            copy_status(copy)
        })
        .await
    }

    /// Prepares a snapshot copy of a replica outside the write barrier (see
    /// `snapshot::prepare`): the replica catalog's lock is held only to
    /// find the replica and open its data file, the snapshot catalog's only
    /// around the FICLONE. Idempotent for the same id and replica.
    ///
    /// Errors: [`Error::Snapshot`] (invalid id, ALREADY_EXISTS for another
    /// replica or a complete copy, no reflink, no space), [`Error::Replica`]
    /// (unknown or faulted replica).
    pub async fn prepare_snapshot_copy(
        &self,
        snapshot_id: &str,
        replica_name: &str,
    ) -> Result<(), Error> {
        let catalog = self.catalog.clone();
        let snapshots = self.snapshots.clone();
        let snapshot_id = snapshot_id.to_string();
        let replica_name = replica_name.to_string();
        blocking(move || {
            snapshot::validate_id(&snapshot_id)?;
            let (replica, src) = {
                let replicas = lock(&catalog);
                let replica = replicas.get(&replica_name)?;
                let src = snapshot::open_replica(&replica)?;
                (replica, src)
            };
            snapshot::prepare(&snapshots, &snapshot_id, &replica, &src)?;
            Ok(())
        })
        .await
    }

    /// Deletes a snapshot copy (also a prepared one); an unknown id is not an error. Replicas
    /// restored from it are not affected.
    ///
    /// Errors: [`Error::Snapshot`] (invalid id, metadata not removable).
    pub async fn delete_snapshot_copy(&self, snapshot_id: &str) -> Result<(), Error> {
        let snapshots = self.snapshots.clone();
        let snapshot_id = snapshot_id.to_string();
        blocking(move || {
            snapshots.lock().delete(&snapshot_id)?;
            Ok(())
        })
        .await
    }

    /// Every snapshot copy of every pool, with its allocation.
    ///
    /// Errors: [`Error::Snapshot`] if a copy's file cannot be stat'ed.
    pub async fn list_snapshot_copies(&self) -> Result<Vec<SnapshotCopyStatus>, Error> {
        let snapshots = self.snapshots.clone();
        blocking(move || {
            let copies = snapshots.lock().list();
            copies.into_iter().map(copy_status).collect()
        })
        .await
    }

    /// The ranges of a copy that hold data, from `starting_offset`, at most
    /// `max_results` (0: 1024).
    ///
    /// Errors: [`Error::Snapshot`] (`NotFound`, `OutOfRange`, `MapRanges`).
    pub async fn allocated_ranges(
        &self,
        snapshot_id: &str,
        starting_offset: u64,
        max_results: u32,
    ) -> Result<(RangesPage, u64), Error> {
        let snapshots = self.snapshots.clone();
        let snapshot_id = snapshot_id.to_string();
        blocking(move || {
            let copy = snapshots.lock().open(&snapshot_id)?;
            let page = snapshot::allocated_ranges(&copy, starting_offset, max_results)?;
            Ok((page, copy.copy.meta.size_bytes))
        })
        .await
    }

    /// The ranges in which `target_id` may differ from `base_id` (two
    /// copies of one volume), from `starting_offset`, at most `max_results`
    /// (0: 1024). Returns the page and the target's size in bytes.
    ///
    /// Errors: [`Error::Snapshot`] (`NotFound`, `DifferentVolumes`,
    /// `OutOfRange`, `MapRanges`).
    pub async fn changed_ranges(
        &self,
        base_id: &str,
        target_id: &str,
        starting_offset: u64,
        max_results: u32,
    ) -> Result<(RangesPage, u64), Error> {
        let snapshots = self.snapshots.clone();
        let base_id = base_id.to_string();
        let target_id = target_id.to_string();
        blocking(move || {
            let (base, target) = {
                let copies = snapshots.lock();
                (copies.open(&base_id)?, copies.open(&target_id)?)
            };
            let page = snapshot::changed_ranges(&base, &target, starting_offset, max_results)?;
            Ok((page, target.copy.meta.size_bytes))
        })
        .await
    }

    /// Grows a replica to `size_bytes`, also for a running export.
    pub async fn grow_replica(&self, name: &str, size_bytes: u64) -> Result<ReplicaStatus, Error> {
        let exports = self.exports.lock().await;
        let owned = name.to_string();
        let replica = self
            .with_catalog(move |catalog| catalog.grow(&owned, size_bytes))
            .await?;
        exports.resize(name, replica.meta.size_bytes)?;
        drop(exports);
        if let Err(e) = self.local.resize(name, replica.meta.size_bytes) {
            warn!(replica.id = %name, error = %crate::error_chain(&e), "Cannot serve the new size to targets");
        }
        self.replica_status(name).await
    }

    /// Destroys a replica; a missing one is not an error. Errors:
    /// [`Error::ReplicaExported`] while it is exported.
    pub async fn destroy_replica(&self, name: &str) -> Result<(), Error> {
        let exports = self.exports.lock().await;
        if exports.is_exported(name) {
            return Err(Error::ReplicaExported {
                name: name.to_string(),
            });
        }
        self.local.evict(name);
        let owned = name.to_string();
        let result = self
            .with_catalog(move |catalog| match catalog.destroy(&owned) {
                Err(replica::Error::NotFound { .. }) => Ok(()),
                other => other,
            })
            .await;
        drop(exports);
        result
    }

    /// Every replica with its allocation and export state.
    pub async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, Error> {
        let exports = self.exports.lock().await;
        let statuses = self
            .with_catalog(|catalog| {
                catalog
                    .list()
                    .into_iter()
                    .map(|replica| {
                        let allocated_bytes = catalog.allocated_bytes(&replica.name)?;
                        Ok((replica, allocated_bytes))
                    })
                    .collect::<Result<Vec<_>, replica::Error>>()
            })
            .await?;
        Ok(statuses
            .into_iter()
            .map(|(replica, allocated_bytes)| ReplicaStatus {
                exported: exports.is_exported(&replica.name),
                replica,
                allocated_bytes,
            })
            .collect())
    }

    /// Starts an NBD export of the standalone replica `name` (idempotent
    /// for the same arguments). Errors: `raw_export::Error::VolumeReplica`
    /// for a replica of a volume (only its target writes it).
    pub async fn start_export(
        &self,
        name: &str,
        socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<ExportInfo, Error> {
        let mut exports = self.exports.lock().await;
        let owned = name.to_string();
        let replica = self
            .with_catalog(move |catalog| catalog.get(&owned))
            .await?;
        let epochs = replication::CatalogEpochStore::new(self.catalog.clone(), &replica.name);
        Ok(exports.start(&replica, epochs, socket, tcp)?)
    }

    /// Stops the export of `name`; stopping a stopped export is not an error.
    pub async fn stop_export(&self, name: &str) {
        self.exports.lock().await.stop(name).await;
    }

    /// The running exports.
    pub async fn list_exports(&self) -> Vec<ExportInfo> {
        self.exports.lock().await.list()
    }

    /// Stops every export and closes the pools (unmount; detach the loop
    /// devices of file pools). Replicas and pools are found again by the
    /// next start.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.targets.stop_all().await;
        self.exports.lock().await.stop_all().await;
        self.local.close_all();
        let pools = self.pools.clone();
        blocking(move || Ok(pools.close_all()?)).await
    }

    /// The volume targets running on this node.
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Starts the replica protocol server on `listen`, serving this node's
    /// replicas (by volume id) to remote targets, and records its address
    /// so local targets reach the node's own replicas in-process.
    ///
    /// Errors: [`replication::Error::Bind`].
    pub async fn serve_replicas(
        &self,
        listen: SocketAddr,
    ) -> Result<ReplicaServer, replication::Error> {
        let server = ReplicaServer::start(listen, self.local.clone()).await?;
        self.local.set_data_address(server.local_addr());
        Ok(server)
    }

    async fn replica_status(&self, name: &str) -> Result<ReplicaStatus, Error> {
        let exported = self.exports.lock().await.is_exported(name);
        let owned = name.to_string();
        let (replica, allocated_bytes) = self
            .with_catalog(move |catalog| {
                let replica = catalog.get(&owned)?;
                let allocated = catalog.allocated_bytes(&owned)?;
                Ok((replica, allocated))
            })
            .await?;
        Ok(ReplicaStatus {
            replica,
            allocated_bytes,
            exported,
        })
    }

    /// Runs `f` on the catalog on the blocking pool.
    async fn with_catalog<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut ReplicaCatalog) -> Result<T, replica::Error> + Send + 'static,
    ) -> Result<T, Error> {
        let catalog = self.catalog.clone();
        blocking(move || Ok(f(&mut lock(&catalog))?)).await
    }
}

fn copy_status(copy: SnapshotCopy) -> Result<SnapshotCopyStatus, Error> {
    let allocated_bytes = snapshot::allocated_bytes(&copy)?;
    Ok(SnapshotCopyStatus {
        copy,
        allocated_bytes,
    })
}

/// Locks the catalog; a panic while it was held leaves it usable because
/// every catalog change is written to disk before memory is updated.
fn lock(catalog: &Mutex<ReplicaCatalog>) -> MutexGuard<'_, ReplicaCatalog> {
    catalog
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(Error::Task)?
}
