//! The agent: pools, the replica catalog, the I/O engine, the exports, the
//! fenced replicas that the replica server and local targets share, and the
//! volume targets, with the operations the gRPC API offers on them.
//!
//! Every operation that touches disks (mkfs, mount, fallocate, metadata
//! fsync) runs on tokio's blocking pool so the runtime's threads stay free
//! for NBD traffic. Catalog changes are serialised by one mutex; export
//! changes by another, which is always taken first when both are needed
//! (destroy and grow must see whether the replica is exported).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use crate::pool::{self, Pool, PoolCapacity, PoolConfig, PoolManager};
use crate::raw_export::{self, ExportInfo, Exports};
use crate::replica::{self, CreateReplica, Replica, ReplicaCatalog};
use crate::replication::{self, ReplicaServer};
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

/// The storage agent of one node.
pub struct Agent {
    pools: Arc<PoolManager>,
    catalog: Arc<Mutex<ReplicaCatalog>>,
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
    /// already opened are closed again), [`Error::Replica`] if the catalog
    /// cannot be loaded, [`Error::Engine`].
    pub fn open(config: &AgentConfig) -> Result<Self, Error> {
        let engine =
            IoEngine::start(config.io_threads, config.io_queue_depth).map_err(Error::Engine)?;
        let pools = Arc::new(PoolManager::open_all(&config.state_dir, &config.pools)?);
        let catalog = match ReplicaCatalog::load(pools.clone()) {
            Ok(catalog) => catalog,
            Err(e) => {
                if let Err(close) = pools.close_all() {
                    warn!(error = %crate::error_chain(&close), "Cannot close pools after a failed start");
                }
                return Err(e.into());
            }
        };
        for faulted in catalog.faulted() {
            warn!(replica.id = %faulted.name, pool.name = %faulted.pool, reason = %faulted.reason, "Replica is faulted");
        }
        info!(
            pools = pools.list().len(),
            replicas = catalog.list().len(),
            "Agent ready"
        );
        let catalog = Arc::new(Mutex::new(catalog));
        let local = Arc::new(LocalReplicas::new(catalog.clone(), engine.clone()));
        let targets = Targets::new(TargetsConfig::new(&config.state_dir), local.clone());
        Ok(Self {
            pools,
            catalog,
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
