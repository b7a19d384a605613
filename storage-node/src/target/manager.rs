//! The agent's running targets, one per published volume, each with its
//! NBD export: [`Targets`].
//!
//! Operations on one volume are serialised by a per-volume guard; a second
//! concurrent operation on the same volume gets [`Error::Busy`] instead of
//! racing (STYLE.md, Mayastor's `VolumeOpGuard`). The map itself is only
//! locked for lookups and inserts, never across an await.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::info;

use super::barrier::Resumed;
use super::{
    Controller, Error, LocalReplicas, PausedCut, ReplicaSpec, Target, TargetConfig, TargetStatus,
    lock,
};
use crate::guard::{OpGuard, OpGuards};
use crate::nbd::{Export, NbdServer};
use crate::replication::{ClientConfig, ReplicaClient, ReplicaIo};

/// Settings of the agent's targets.
#[derive(Debug, Clone)]
pub struct TargetsConfig {
    /// Directory of target sockets picked by the agent
    /// (`<state_dir>/targets/<volume>.sock`).
    pub socket_dir: PathBuf,
    /// Settings of the connections to remote replicas.
    pub client: ClientConfig,
    /// Timeout of each call to the controller.
    pub control_timeout: Duration,
    /// How long claiming a replica may take when a target starts.
    pub claim_timeout: Duration,
}

impl TargetsConfig {
    /// Defaults for an agent whose state directory is `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            socket_dir: state_dir.join("targets"),
            client: ClientConfig::default(),
            control_timeout: Duration::from_secs(5),
            claim_timeout: Duration::from_secs(5),
        }
    }
}

/// Where one replica of a volume is, as StartTarget and AddReplica name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaAddress {
    /// Its node.
    pub node_id: String,
    /// Its name on that node.
    pub replica_name: String,
    /// Its node's replica protocol address (HOST:PORT).
    pub data_address: String,
    /// True for a member of the in-sync set.
    pub in_sync: bool,
}

/// A StartTarget request.
#[derive(Debug, Clone)]
pub struct StartTarget {
    /// The volume id.
    pub volume_id: String,
    /// The epoch the controller raised.
    pub epoch: u64,
    /// Size of the volume in bytes.
    pub size_bytes: u64,
    /// The NBD socket, or `None` for `<socket_dir>/<volume>.sock`.
    pub socket_path: Option<PathBuf>,
    /// Every replica of the volume.
    pub replicas: Vec<ReplicaAddress>,
    /// The controller's management API (`http://HOST:PORT`).
    pub controller_address: String,
}

/// A running target as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    /// The target's state.
    pub status: TargetStatus,
    /// Its NBD socket.
    pub socket_path: PathBuf,
    /// The NBD URI of the socket (`nbd+unix:///VOLUME?socket=PATH`).
    pub nbd_uri: String,
}

struct Running {
    target: Arc<Target>,
    server: NbdServer,
    socket: PathBuf,
}

impl Running {
    fn info(&self) -> TargetInfo {
        TargetInfo {
            status: self.target.status(),
            nbd_uri: format!(
                "nbd+unix:///{}?socket={}",
                self.target.volume_id(),
                self.socket.display()
            ),
            socket_path: self.socket.clone(),
        }
    }
}

/// The agent's targets; see the module docs.
pub struct Targets {
    config: TargetsConfig,
    local: Arc<LocalReplicas>,
    running: Mutex<BTreeMap<String, Running>>,
    busy: OpGuards,
}

impl Targets {
    /// No targets yet; local replicas are found in `local`.
    pub fn new(config: TargetsConfig, local: Arc<LocalReplicas>) -> Self {
        Self {
            config,
            local,
            running: Mutex::new(BTreeMap::new()),
            busy: OpGuards::default(),
        }
    }

    fn guard(&self, volume_id: &str) -> Result<OpGuard, Error> {
        self.busy.try_acquire(volume_id).ok_or_else(|| Error::Busy {
            volume_id: volume_id.to_owned(),
        })
    }

    /// Starts the target of a volume and its NBD export. Idempotent for
    /// the same volume and epoch; a higher epoch replaces a running target.
    ///
    /// Errors: [`Error::InvalidArgument`], [`Error::Busy`],
    /// [`Error::StaleEpoch`] (a running target or a replica has a higher
    /// epoch), [`Error::ControllerAddress`], [`Error::Replica`],
    /// [`Error::NoInSyncReplica`], [`Error::SocketDir`], [`Error::Export`].
    pub async fn start(&self, request: StartTarget) -> Result<TargetInfo, Error> {
        crate::replica::validate_name(&request.volume_id).map_err(|e| Error::InvalidArgument {
            reason: format!("volume id: {e}"),
        })?;
        if request.epoch == 0 || request.size_bytes == 0 || request.replicas.is_empty() {
            return Err(Error::InvalidArgument {
                reason: "epoch, size_bytes and replicas are required".to_owned(),
            });
        }
        if request.controller_address.is_empty() {
            return Err(Error::InvalidArgument {
                reason: "controller_address is required".to_owned(),
            });
        }
        if let Some(path) = &request.socket_path
            && !path.is_absolute()
        {
            return Err(Error::InvalidArgument {
                reason: format!("socket path {} must be absolute", path.display()),
            });
        }
        let _guard = self.guard(&request.volume_id)?;
        let running_epoch = lock(&self.running)
            .get(&request.volume_id)
            .map(|r| r.target.epoch());
        match running_epoch {
            Some(epoch) if epoch == request.epoch => {
                if let Some(running) = lock(&self.running).get(&request.volume_id) {
                    return Ok(running.info());
                }
            }
            Some(epoch) if epoch > request.epoch => {
                return Err(Error::StaleEpoch {
                    volume_id: request.volume_id.clone(),
                    epoch: request.epoch,
                    current: epoch,
                });
            }
            Some(_) => {
                self.stop_running(&request.volume_id).await;
            }
            None => {}
        }

        let mut specs = Vec::with_capacity(request.replicas.len());
        for replica in &request.replicas {
            specs.push(self.spec(&request.volume_id, replica).await?);
        }
        let controller = Controller::new(&request.controller_address, self.config.control_timeout)?;
        let target = Target::start(
            TargetConfig {
                volume_id: request.volume_id.clone(),
                epoch: request.epoch,
                size_bytes: request.size_bytes,
                claim_timeout: self.config.claim_timeout,
            },
            specs,
            controller,
        )
        .await?;
        let socket = match request.socket_path {
            Some(path) => path,
            None => {
                std::fs::create_dir_all(&self.config.socket_dir).map_err(|source| {
                    Error::SocketDir {
                        path: self.config.socket_dir.clone(),
                        source,
                    }
                })?;
                self.config
                    .socket_dir
                    .join(format!("{}.sock", request.volume_id))
            }
        };
        let export = Export {
            name: request.volume_id.clone(),
            device: Arc::clone(&target) as Arc<dyn crate::block::BlockDevice>,
        };
        let server = match NbdServer::start(export, &socket, None) {
            Ok(server) => server,
            Err(source) => {
                target.stop().await;
                return Err(Error::Export {
                    volume_id: request.volume_id,
                    source,
                });
            }
        };
        let running = Running {
            target,
            server,
            socket,
        };
        let info = running.info();
        info!(
            volume.id = %request.volume_id,
            epoch = request.epoch,
            socket = %info.socket_path.display(),
            "Target exported"
        );
        lock(&self.running).insert(request.volume_id, running);
        Ok(info)
    }

    /// Stops the target of `volume_id` and its export. Returns false if
    /// none was running (idempotent).
    ///
    /// Errors: [`Error::Busy`].
    pub async fn stop(&self, volume_id: &str) -> Result<bool, Error> {
        let _guard = self.guard(volume_id)?;
        Ok(self.stop_running(volume_id).await)
    }

    async fn stop_running(&self, volume_id: &str) -> bool {
        let Some(running) = lock(&self.running).remove(volume_id) else {
            return false;
        };
        // First the target, so requests waiting on the controller fail and
        // the NBD server's wait for requests in flight ends.
        running.target.stop().await;
        running.server.stop().await;
        true
    }

    /// Stops every target (agent shutdown).
    pub async fn stop_all(&self) {
        let volumes: Vec<String> = lock(&self.running).keys().cloned().collect();
        for volume in volumes {
            self.stop_running(&volume).await;
        }
    }

    /// The running target of `volume_id`.
    ///
    /// Errors: [`Error::TargetNotFound`].
    pub fn get(&self, volume_id: &str) -> Result<TargetInfo, Error> {
        lock(&self.running)
            .get(volume_id)
            .map(Running::info)
            .ok_or_else(|| Error::TargetNotFound {
                volume_id: volume_id.to_owned(),
            })
    }

    /// Every running target.
    pub fn list(&self) -> Vec<TargetInfo> {
        lock(&self.running).values().map(Running::info).collect()
    }

    /// The running target of `volume_id`, checked to run at `epoch`.
    ///
    /// Errors: [`Error::TargetNotFound`], [`Error::EpochMismatch`].
    fn running_at(&self, volume_id: &str, epoch: u64) -> Result<Arc<Target>, Error> {
        let target = lock(&self.running)
            .get(volume_id)
            .map(|r| Arc::clone(&r.target))
            .ok_or_else(|| Error::TargetNotFound {
                volume_id: volume_id.to_owned(),
            })?;
        if target.epoch() != epoch {
            return Err(Error::EpochMismatch {
                volume_id: volume_id.to_owned(),
                epoch,
                running: target.epoch(),
            });
        }
        Ok(target)
    }

    /// Raises the write barrier of the running target of `volume_id` at
    /// `epoch` (see [`Target::pause`]). Not serialised with the volume's
    /// other operations: a pause must not wait behind a rebuild's start.
    ///
    /// Errors: [`Error::TargetNotFound`], [`Error::EpochMismatch`],
    /// [`Error::Fenced`], [`Error::Pause`].
    pub async fn pause(
        &self,
        volume_id: &str,
        epoch: u64,
        pause_id: &str,
        started: std::time::Instant,
        deadline: std::time::Duration,
    ) -> Result<PausedCut, Error> {
        if pause_id.is_empty() {
            return Err(Error::InvalidArgument {
                reason: "a pause id is required".to_owned(),
            });
        }
        let target = self.running_at(volume_id, epoch)?;
        target.pause(pause_id, started, deadline).await
    }

    /// Drops the barrier `pause_id` raised on the running target of
    /// `volume_id` (see [`Target::resume`]).
    ///
    /// Errors: [`Error::TargetNotFound`].
    pub fn resume(&self, volume_id: &str, pause_id: &str) -> Result<Resumed, Error> {
        let target = lock(&self.running)
            .get(volume_id)
            .map(|r| Arc::clone(&r.target))
            .ok_or_else(|| Error::TargetNotFound {
                volume_id: volume_id.to_owned(),
            })?;
        Ok(target.resume(pause_id))
    }

    /// Starts the rebuild of a replica of the running target of
    /// `volume_id` at `epoch` (see [`Target::add_replica`]).
    ///
    /// Errors: [`Error::TargetNotFound`], [`Error::Busy`],
    /// [`Error::EpochMismatch`], [`Error::Fenced`],
    /// [`Error::ReplicaDropping`], [`Error::Replica`].
    pub async fn add_replica(
        &self,
        volume_id: &str,
        epoch: u64,
        replica: ReplicaAddress,
        full: bool,
    ) -> Result<TargetInfo, Error> {
        if replica.node_id.is_empty() {
            return Err(Error::InvalidArgument {
                reason: "the replica's node_id is required".to_owned(),
            });
        }
        let _guard = self.guard(volume_id)?;
        let target = self.running_at(volume_id, epoch)?;
        let spec = self.spec(volume_id, &replica).await?;
        target.add_replica(spec, full)?;
        self.get(volume_id)
    }

    /// How a target reaches `replica`: in-process when it is on this node,
    /// else through a replica client to its node's data address.
    async fn spec(&self, volume_id: &str, replica: &ReplicaAddress) -> Result<ReplicaSpec, Error> {
        let local =
            replica.data_address.is_empty() || self.local.is_local_address(&replica.data_address);
        let open_error = |e: crate::replica::data::Error| Error::Replica {
            node_id: replica.node_id.clone(),
            source: crate::replication::Error::Device(std::io::Error::other(crate::error_chain(
                &e,
            ))),
        };
        let found = if local {
            self.local.get(volume_id).map_err(open_error)?
        } else {
            None
        };
        let io: Arc<dyn ReplicaIo> = match found {
            Some(fenced) => fenced,
            None => {
                let addr = resolve(&replica.data_address).await.map_err(|reason| {
                    Error::InvalidArgument {
                        reason: format!(
                            "replica on node {}: data address {:?}: {reason}",
                            replica.node_id, replica.data_address
                        ),
                    }
                })?;
                Arc::new(
                    ReplicaClient::new(addr, volume_id, self.config.client.clone()).map_err(
                        |source| Error::Replica {
                            node_id: replica.node_id.clone(),
                            source,
                        },
                    )?,
                )
            }
        };
        Ok(ReplicaSpec {
            node_id: replica.node_id.clone(),
            replica_name: replica.replica_name.clone(),
            data_address: replica.data_address.clone(),
            io,
            in_sync: replica.in_sync,
        })
    }
}

/// Resolves HOST:PORT to its first address.
async fn resolve(address: &str) -> Result<SocketAddr, String> {
    if address.is_empty() {
        return Err("empty, and the replica is not on this node".to_owned());
    }
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| "resolves to no address".to_owned())
}
