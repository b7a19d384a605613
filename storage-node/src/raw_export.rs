//! The agent's running NBD exports, one per exported replica: the raw
//! export path (`ballast export start`), for standalone replicas only.
//!
//! Owns the map from replica name to its [`NbdServer`] and the
//! [`FencedReplica`] behind it. An export never touches replica data
//! around the fence: its I/O goes through the replica's [`FencedReplica`]
//! at the replica's epoch (0), so if anything ever raised the epoch, every
//! later export request would be refused (invariant 3).
//!
//! What it must never do: serve a replica that belongs to a volume. Such a
//! replica (a volume id in its metadata, or an epoch above 0: a target
//! has used it) is written only by its volume's target, which sends every
//! write to every in-sync replica and logs dirty regions for rebuilds; a
//! raw export would bypass both, so [`Exports::start`] refuses it with
//! [`Error::VolumeReplica`]. A standalone replica (no volume id) can never
//! join a volume: the volume id is fixed at creation and targets resolve
//! replicas by it.
//!
//! It never changes replica files or metadata; the replica catalog does
//! that, and tells this module about size changes through
//! [`Exports::resize`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tracing::info;

use crate::block::{BlockDevice, BlockError};
use crate::buf::IoBuf;
use crate::nbd::{self, Export, NbdServer};
use crate::replica::Replica;
use crate::replica::data::{self, ReplicaData};
use crate::replication::{CatalogEpochStore, FencedReplica, ReplicaIo};
use crate::uring::IoEngine;

/// Errors of starting and stopping exports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The replica is already exported with other arguments.
    #[error(
        "Replica {name} is already exported on {} (tcp {tcp:?}); stop that export first",
        socket.display()
    )]
    Conflict {
        /// Replica name.
        name: String,
        /// Unix socket of the running export.
        socket: PathBuf,
        /// TCP address of the running export.
        tcp: Option<SocketAddr>,
    },
    /// The socket path is not absolute.
    #[error("Socket path {} must be absolute", path.display())]
    RelativeSocket {
        /// The offending path.
        path: PathBuf,
    },
    /// The replica belongs to a volume: only the volume's target may
    /// write it (see the module docs).
    #[error(
        "Replica {name} belongs to volume {volume_id:?} (epoch {epoch}); a raw export would bypass fencing and the in-sync set. Publish the volume (ballast volume publish) and use its target's NBD export instead; only standalone replicas (created without --volume-id) can be exported"
    )]
    VolumeReplica {
        /// Replica name.
        name: String,
        /// The volume in its metadata (empty for a standalone replica).
        volume_id: String,
        /// Its highest accepted epoch.
        epoch: u64,
    },
    /// The replica's data file could not be opened.
    #[error("Cannot open replica {name} for I/O")]
    Open {
        /// Replica name.
        name: String,
        /// The cause.
        #[source]
        source: data::Error,
    },
    /// The NBD server could not start.
    #[error("Cannot start the NBD server of replica {name}")]
    Start {
        /// Replica name.
        name: String,
        /// The cause.
        #[source]
        source: nbd::Error,
    },
    /// The served size could not follow a grown replica.
    #[error("Cannot serve the new size of replica {name}")]
    Resize {
        /// Replica name.
        name: String,
        /// The cause.
        #[source]
        source: data::Error,
    },
}

/// One running export, as reported to clients of the agent API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export (and replica) name.
    pub name: String,
    /// Unix socket the NBD server listens on.
    pub socket: PathBuf,
    /// TCP address, when the export also listens on TCP.
    pub tcp: Option<SocketAddr>,
    /// Open client connections.
    pub connections: usize,
}

impl ExportInfo {
    /// The NBD URI of the unix socket export
    /// (`nbd+unix:///NAME?socket=PATH`, NBD URI specification).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.name, self.socket.display())
    }
}

/// A standalone replica served through its fence at a fixed epoch.
struct FencedDevice {
    fenced: Arc<FencedReplica>,
    epoch: u64,
}

#[async_trait]
impl BlockDevice for FencedDevice {
    fn size_bytes(&self) -> u64 {
        self.fenced.size_bytes()
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        Ok(self.fenced.read(self.epoch, offset, length).await?)
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        let data = Arc::new(data);
        Ok(self.fenced.write(self.epoch, offset, data, fua).await?)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(self.fenced.flush(self.epoch).await?)
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        Ok(self.fenced.trim(self.epoch, offset, length).await?)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let fenced = &self.fenced;
        Ok(fenced
            .write_zeroes(self.epoch, offset, length, punch_hole, fua)
            .await?)
    }
}

struct Running {
    server: NbdServer,
    data: Arc<ReplicaData>,
    /// The TCP address as asked for (port 0 picks one), for idempotency.
    requested_tcp: Option<SocketAddr>,
}

/// The running exports of the agent.
pub struct Exports {
    engine: Arc<IoEngine>,
    running: BTreeMap<String, Running>,
}

impl Exports {
    /// An empty set of exports whose I/O goes through `engine`.
    pub fn new(engine: Arc<IoEngine>) -> Self {
        Self {
            engine,
            running: BTreeMap::new(),
        }
    }

    /// Starts serving `replica` over NBD on `socket` (and `tcp` if given).
    ///
    /// Idempotent: the same replica on the same socket and TCP address
    /// returns the running export. `epochs` persists epochs of the
    /// replica's fence. Errors: [`Error::VolumeReplica`] for a replica of
    /// a volume, [`Error::Conflict`] for other arguments,
    /// [`Error::RelativeSocket`], [`Error::Open`], [`Error::Start`].
    ///
    /// # Panics
    /// Panics if called outside a tokio runtime.
    pub fn start(
        &mut self,
        replica: &Replica,
        epochs: CatalogEpochStore,
        socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<ExportInfo, Error> {
        if !replica.meta.volume_id.is_empty() || replica.meta.epoch > 0 {
            return Err(Error::VolumeReplica {
                name: replica.name.clone(),
                volume_id: replica.meta.volume_id.clone(),
                epoch: replica.meta.epoch,
            });
        }
        if !socket.is_absolute() {
            return Err(Error::RelativeSocket {
                path: socket.to_owned(),
            });
        }
        if let Some(running) = self.running.get(&replica.name) {
            let info = Self::info(&replica.name, running);
            if info.socket == socket && running.requested_tcp == tcp {
                return Ok(info);
            }
            return Err(Error::Conflict {
                name: replica.name.clone(),
                socket: info.socket,
                tcp: info.tcp,
            });
        }
        let name = replica.name.clone();
        let data = ReplicaData::open(
            &replica.data_path,
            replica.meta.size_bytes,
            self.engine.clone(),
        )
        .map(Arc::new)
        .map_err(|source| Error::Open {
            name: name.clone(),
            source,
        })?;
        let fenced = FencedReplica::for_replica(replica, data.clone(), Arc::new(epochs));
        let export = Export {
            name: name.clone(),
            device: Arc::new(FencedDevice {
                fenced: Arc::new(fenced),
                epoch: replica.meta.epoch,
            }),
        };
        let server = NbdServer::start(export, socket, tcp).map_err(|source| Error::Start {
            name: name.clone(),
            source,
        })?;
        info!(replica.id = %name, socket = %socket.display(), tcp = ?server.tcp_addr(), "Export started");
        let running = Running {
            server,
            data,
            requested_tcp: tcp,
        };
        let info = Self::info(&name, &running);
        self.running.insert(name, running);
        Ok(info)
    }

    /// Stops the export of `name`, waiting for its connections to finish
    /// their in-flight requests. Returns false if it was not running.
    pub async fn stop(&mut self, name: &str) -> bool {
        match self.running.remove(name) {
            Some(running) => {
                running.server.stop().await;
                info!(replica.id = %name, "Export stopped");
                true
            }
            None => false,
        }
    }

    /// Stops every export.
    pub async fn stop_all(&mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// True while `name` is exported.
    pub fn is_exported(&self, name: &str) -> bool {
        self.running.contains_key(name)
    }

    /// Serves `size_bytes` for an exported replica whose file was grown.
    /// Does nothing if `name` is not exported. Errors: [`Error::Resize`].
    pub fn resize(&self, name: &str, size_bytes: u64) -> Result<(), Error> {
        match self.running.get(name) {
            Some(running) => {
                running
                    .data
                    .set_size_bytes(size_bytes)
                    .map_err(|source| Error::Resize {
                        name: name.to_string(),
                        source,
                    })
            }
            None => Ok(()),
        }
    }

    /// The running exports, by name.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.running
            .iter()
            .map(|(name, running)| Self::info(name, running))
            .collect()
    }

    fn info(name: &str, running: &Running) -> ExportInfo {
        ExportInfo {
            name: name.to_string(),
            socket: running.server.unix_socket().to_owned(),
            tcp: running.server.tcp_addr(),
            connections: running.server.connections(),
        }
    }
}
