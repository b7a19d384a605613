//! Targets: the per-volume I/O front end of a published volume.
//!
//! # What it owns
//!
//! A [`Target`] is a [`BlockDevice`](crate::block::BlockDevice) that the NBD
//! server exports. It holds the volume's epoch and its replica set, each
//! replica an `Arc<dyn ReplicaIo>` (the agent's own [`FencedReplica`] for
//! the local replica, a [`ReplicaClient`] for the others) with two
//! separate pieces of state (STYLE.md: health apart from sync state):
//!
//! - *sync state* ([`SyncState`]): `InSync` (member of the in-sync set:
//!   takes writes, serves reads, seeds rebuilds), `Dropping` (failed; the
//!   controller is being asked to drop it), `Faulted` (dropped; takes
//!   nothing), `Rebuilding` (takes writes, never reads), `Joining` (rebuilt;
//!   the controller is being asked to add it back);
//! - *health*: whether its last request succeeded, which only orders the
//!   choice among in-sync replicas for reads.
//!
//! # The write path (invariants 1 and 2)
//!
//! WRITE, TRIM and WRITE_ZEROES take shared region locks ([`regions`]),
//! choose their replicas (in-sync, joining and rebuilding ones), send to
//! all of them at once, and are acknowledged only when every in-sync
//! replica succeeded. When an in-sync replica fails or times out, the
//! acknowledgement waits while the target asks the controller to drop it
//! (`TargetControlService.DropReplica`, retried with backoff for as long as
//! the target runs, see [`control`]); after the commit the write is
//! acknowledged if at least one in-sync replica holds it. One drop task per
//! replica: concurrent failing writes all wait on the same drop. The last
//! in-sync replica is never dropped: the write fails with EIO instead. From
//! the drop on, the replica's *dirty-region log* ([`regions::RegionMap`],
//! 1 MiB regions) records every region written without it, starting with
//! the regions whose writes may not have been flushed on it yet. A replica
//! that has not accepted this target's epoch (it did not answer the claim
//! at start) gets no log: an older target may still write to it, and only
//! a comparison of hashes finds those writes (see [`rebuild`]).
//! FLUSH goes to the same replicas with the same rules.
//!
//! # Fencing (invariant 3)
//!
//! A `StaleEpoch` answer from any replica, or from the controller, fences
//! the target for good: the request fails with ESHUTDOWN, and so does every
//! later request, reads included (a fenced target may hold stale data).
//!
//! # Reads
//!
//! From the local in-sync replica if there is one, else from another
//! in-sync one; a failed replica is dropped (as above, but the read does
//! not wait for the commit) and the read retried on another in-sync
//! replica.
//!
//! # Rebuild (invariant 4)
//!
//! See [`rebuild`]: a faulted replica is brought back while I/O continues,
//! and joins the in-sync set only after the controller committed it.
//!
//! # What it must never do
//!
//! Acknowledge a write that is not on every in-sync replica (or whose
//! missing replicas' drops have not been committed); read from a replica
//! that is not in sync; serve anything once fenced.
//!
//! [`FencedReplica`]: crate::replication::FencedReplica
//! [`ReplicaClient`]: crate::replication::ReplicaClient

pub mod barrier;
pub mod control;
mod io;
mod manager;
mod member;
pub mod rebuild;
pub mod regions;
mod resolver;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::replication::{self, Location, ReplicaIo};

pub use barrier::MAX_DEADLINE as MAX_PAUSE_DEADLINE;
pub use control::{Controller, Verdict};
pub use manager::{ReplicaAddress, StartTarget, TargetInfo, Targets, TargetsConfig};
pub use member::SyncState;
pub use resolver::LocalReplicas;

use barrier::{Barrier, PauseError, Resumed};
use member::Member;
use regions::{RegionLocks, WriteGenerations};

/// Errors of starting, changing and stopping targets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request is malformed.
    #[error("Invalid request: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// The volume has no running target on this node.
    #[error("No target of volume {volume_id} runs on this node")]
    TargetNotFound {
        /// The volume id.
        volume_id: String,
    },
    /// A newer target exists: a running target or a replica has a higher
    /// epoch than the request's.
    #[error("Epoch {epoch} of volume {volume_id} is stale: epoch {current} is in force")]
    StaleEpoch {
        /// The volume id.
        volume_id: String,
        /// The request's epoch.
        epoch: u64,
        /// The higher epoch.
        current: u64,
    },
    /// A request named another epoch than the running target's.
    #[error("Volume {volume_id} runs at epoch {running}, not {epoch}")]
    EpochMismatch {
        /// The volume id.
        volume_id: String,
        /// The request's epoch.
        epoch: u64,
        /// The running target's epoch.
        running: u64,
    },
    /// The target is fenced (a newer epoch exists) and changes nothing.
    #[error("Target of volume {volume_id} at epoch {epoch} is fenced")]
    Fenced {
        /// The volume id.
        volume_id: String,
        /// The target's epoch.
        epoch: u64,
    },
    /// Another operation on the volume's target is in progress.
    #[error("Another operation on the target of volume {volume_id} is in progress")]
    Busy {
        /// The volume id.
        volume_id: String,
    },
    /// The replica is being dropped; it can be added once that committed.
    #[error("Replica on node {node_id} of volume {volume_id} is being dropped; retry later")]
    ReplicaDropping {
        /// The volume id.
        volume_id: String,
        /// The replica's node.
        node_id: String,
    },
    /// No in-sync replica answered when the target started.
    #[error("No in-sync replica of volume {volume_id} is reachable")]
    NoInSyncReplica {
        /// The volume id.
        volume_id: String,
        /// The replicas' errors, one per line.
        errors: String,
    },
    /// A replica cannot be addressed.
    #[error("Cannot reach replica on node {node_id}")]
    Replica {
        /// The replica's node.
        node_id: String,
        /// The cause.
        #[source]
        source: replication::Error,
    },
    /// The controller's address is not a URI.
    #[error("Controller address {address:?} is invalid")]
    ControllerAddress {
        /// The address as given.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The directory of target sockets cannot be created.
    #[error("Cannot create {}", path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The write barrier cannot be raised.
    #[error("Cannot pause the target of volume {volume_id}")]
    Pause {
        /// The volume id.
        volume_id: String,
        /// Why.
        #[source]
        source: PauseError,
    },
    /// The NBD export cannot start.
    #[error("Cannot start the NBD export of volume {volume_id}")]
    Export {
        /// The volume id.
        volume_id: String,
        /// The cause.
        #[source]
        source: crate::nbd::Error,
    },
}

/// A replica handed to a target: where it is, how to reach it, and whether
/// it is in the in-sync set as the controller recorded it.
#[derive(Clone)]
pub struct ReplicaSpec {
    /// The node that holds it (what the controller's calls name).
    pub node_id: String,
    /// Its name on that node.
    pub replica_name: String,
    /// Its node's replica protocol address (HOST:PORT), for status only.
    pub data_address: String,
    /// How to reach it.
    pub io: Arc<dyn ReplicaIo>,
    /// True for a member of the in-sync set.
    pub in_sync: bool,
}

impl std::fmt::Debug for ReplicaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSpec")
            .field("node_id", &self.node_id)
            .field("replica_name", &self.replica_name)
            .field("data_address", &self.data_address)
            .field("location", &self.io.location())
            .field("in_sync", &self.in_sync)
            .finish()
    }
}

/// What a target is started with.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The volume id (what every replica request names).
    pub volume_id: String,
    /// The epoch the controller raised for this target.
    pub epoch: u64,
    /// Size of the volume in bytes.
    pub size_bytes: u64,
    /// How long claiming each replica (admitting the epoch) may take at
    /// start.
    pub claim_timeout: Duration,
}

/// One replica as a target sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Its node.
    pub node_id: String,
    /// Its name on that node.
    pub replica_name: String,
    /// Its node's data address.
    pub data_address: String,
    /// In-process or remote.
    pub location: Location,
    /// Sync state.
    pub state: SyncState,
    /// Whether its last request succeeded.
    pub healthy: bool,
    /// Rebuild progress: bytes of regions done (see [`rebuild`]).
    pub rebuild_done_bytes: u64,
    /// Rebuild progress: bytes of regions to do.
    pub rebuild_total_bytes: u64,
    /// Data bytes the last rebuild copied (allocated bytes only).
    pub rebuild_copied_bytes: u64,
    /// Regions in the dirty-region log, `None` when there is no log.
    pub dirty_regions: Option<u64>,
}

/// A target's state, for GetTarget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// The volume id.
    pub volume_id: String,
    /// The target's epoch.
    pub epoch: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// False once fenced or stopped.
    pub serving: bool,
    /// Every replica.
    pub replicas: Vec<ReplicaStatus>,
}

/// A raised write barrier: the instant of the cut and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedCut {
    /// When the gate closed.
    pub paused_at: std::time::SystemTime,
    /// Nodes of the replicas in the in-sync set at the cut.
    pub in_sync_node_ids: Vec<String>,
}

/// The target of one volume; see the module docs.
pub struct Target {
    core: Arc<Core>,
}

/// State shared by the target, its drop tasks and its rebuilds.
pub(crate) struct Core {
    volume_id: String,
    epoch: u64,
    size_bytes: u64,
    members: RwLock<Vec<Arc<Member>>>,
    /// Members whose sync state is `InSync`.
    in_sync: AtomicUsize,
    controller: Controller,
    fenced: AtomicBool,
    stopped: watch::Sender<bool>,
    locks: RegionLocks,
    generations: WriteGenerations,
    barrier: Barrier,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Target {
    /// Starts the target: claims every replica with the new epoch (each
    /// within `config.claim_timeout`) and begins dropping in-sync replicas
    /// that do not answer.
    ///
    /// Errors: [`Error::InvalidArgument`] (no replica, none in sync, a
    /// duplicate node, zero size), [`Error::StaleEpoch`] when a replica has
    /// a higher epoch, [`Error::NoInSyncReplica`] when no in-sync replica
    /// answers.
    pub async fn start(
        config: TargetConfig,
        replicas: Vec<ReplicaSpec>,
        controller: Controller,
    ) -> Result<Arc<Target>, Error> {
        let invalid = |reason: &str| Error::InvalidArgument {
            reason: reason.to_owned(),
        };
        if config.volume_id.is_empty() || config.size_bytes == 0 {
            return Err(invalid("a volume id and a size are required"));
        }
        if !replicas.iter().any(|r| r.in_sync) {
            return Err(invalid("at least one replica must be in sync"));
        }
        let mut nodes = HashSet::new();
        if !replicas.iter().all(|r| nodes.insert(r.node_id.clone())) {
            return Err(invalid("two replicas on one node"));
        }
        let (stopped, _) = watch::channel(false);
        let in_sync = replicas.iter().filter(|r| r.in_sync).count();
        let core = Arc::new(Core {
            volume_id: config.volume_id.clone(),
            epoch: config.epoch,
            size_bytes: config.size_bytes,
            members: RwLock::new(replicas.into_iter().map(Member::new).collect()),
            in_sync: AtomicUsize::new(in_sync),
            controller,
            fenced: AtomicBool::new(false),
            stopped,
            locks: RegionLocks::default(),
            generations: WriteGenerations::new(config.size_bytes),
            barrier: Barrier::default(),
            tasks: Mutex::new(Vec::new()),
        });
        core.claim_all(config.claim_timeout).await?;
        info!(
            volume.id = %core.volume_id,
            epoch = core.epoch,
            size_bytes = core.size_bytes,
            in_sync = core.in_sync.load(Ordering::Acquire),
            "Target started"
        );
        Ok(Arc::new(Target { core }))
    }

    /// The volume id.
    pub fn volume_id(&self) -> &str {
        &self.core.volume_id
    }

    /// The target's epoch.
    pub fn epoch(&self) -> u64 {
        self.core.epoch
    }

    /// False once the target is fenced or stopped.
    pub fn is_serving(&self) -> bool {
        !self.core.fenced.load(Ordering::Acquire) && !*self.core.stopped.borrow()
    }

    /// The target's state and every replica's.
    pub fn status(&self) -> TargetStatus {
        TargetStatus {
            volume_id: self.core.volume_id.clone(),
            epoch: self.core.epoch,
            size_bytes: self.core.size_bytes,
            serving: self.is_serving(),
            replicas: self.core.members().iter().map(|m| m.status()).collect(),
        }
    }

    /// Brings a replica (back) into the volume: a member that is faulted is
    /// rebuilt, by delta or, with `full`, in full (see [`rebuild`]); a
    /// replica on a node the target does not know is added as a new member
    /// and rebuilt. A replica already in sync, rebuilding or joining is left
    /// alone (idempotent).
    ///
    /// Errors: [`Error::Fenced`], [`Error::ReplicaDropping`] while its drop
    /// is in progress.
    pub fn add_replica(&self, spec: ReplicaSpec, full: bool) -> Result<(), Error> {
        self.core.add_replica(spec, full)
    }

    /// Raises the write barrier for a snapshot's cut (see [`barrier`]):
    /// returns once no request that changes replicas is in flight, with
    /// the cut's time and the nodes of the replicas in sync at it, each of
    /// which holds every write acknowledged before it. The barrier drops at
    /// `started + deadline` unless [`Target::resume`] drops it first.
    ///
    /// Errors: [`Error::Fenced`] or [`Error::TargetNotFound`] (stopped),
    /// [`Error::Pause`] (held by another pause, or the requests in flight
    /// outlasted the deadline).
    pub async fn pause(
        &self,
        pause_id: &str,
        started: std::time::Instant,
        deadline: Duration,
    ) -> Result<PausedCut, Error> {
        let core = &self.core;
        core.check_target()?;
        let spawn = |task| core.spawn(task);
        let paused = core
            .barrier
            .pause(pause_id, started, deadline, spawn)
            .await
            .map_err(|source| Error::Pause {
                volume_id: core.volume_id.clone(),
                source,
            })?;
        let in_sync_node_ids = core
            .members()
            .iter()
            .filter(|m| m.sync() == SyncState::InSync)
            .map(|m| m.node_id.clone())
            .collect();
        info!(
            volume.id = %core.volume_id,
            epoch = core.epoch,
            pause.id = pause_id,
            "Write barrier raised"
        );
        Ok(PausedCut {
            paused_at: paused.paused_at,
            in_sync_node_ids,
        })
    }

    /// Drops the barrier that `pause_id` raised; see [`Resumed`].
    pub fn resume(&self, pause_id: &str) -> Resumed {
        self.core.barrier.resume(pause_id)
    }

    /// Stops the target: requests waiting for the controller fail (they are
    /// never acknowledged), new requests are refused, drops and rebuilds
    /// are abandoned. Call it before stopping the NBD server, which waits
    /// for requests in flight.
    ///
    /// # Cancel safety
    /// Cancel safe: the target is stopped once the first poll returns.
    pub async fn stop(&self) {
        self.core.stopped.send_replace(true);
        let tasks = std::mem::take(&mut *lock(&self.core.tasks));
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        info!(volume.id = %self.core.volume_id, epoch = self.core.epoch, "Target stopped");
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("volume_id", &self.core.volume_id)
            .field("epoch", &self.core.epoch)
            .finish()
    }
}

impl Core {
    /// A snapshot of the members.
    fn members(&self) -> Vec<Arc<Member>> {
        self.members
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Errors: [`Error::Fenced`] once fenced, [`Error::TargetNotFound`]
    /// once stopped.
    fn check_target(&self) -> Result<(), Error> {
        if self.fenced.load(Ordering::Acquire) {
            return Err(Error::Fenced {
                volume_id: self.volume_id.clone(),
                epoch: self.epoch,
            });
        }
        if self.is_stopped() {
            return Err(Error::TargetNotFound {
                volume_id: self.volume_id.clone(),
            });
        }
        Ok(())
    }

    fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Fences the target for good (a newer epoch exists).
    fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            warn!(
                volume.id = %self.volume_id,
                epoch = self.epoch,
                reason = why,
                "Target fenced: a newer epoch exists; refusing all I/O"
            );
        }
    }

    /// Runs `task` until it ends or the target stops.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        if self.is_stopped() {
            return;
        }
        tasks.push(tokio::spawn(task));
    }

    /// Claims every replica at the target's epoch; see [`Target::start`].
    async fn claim_all(self: &Arc<Self>, timeout: Duration) -> Result<(), Error> {
        let members = self.members();
        let claims = members.iter().map(|member| {
            let io = member.io();
            let epoch = self.epoch;
            async move { tokio::time::timeout(timeout, io.info(epoch)).await }
        });
        let results = futures_util::future::join_all(claims).await;
        let mut failed = Vec::new();
        for (member, result) in members.iter().zip(results) {
            let problem = match result {
                Ok(Ok(info)) if info.size_bytes >= self.size_bytes => None,
                Ok(Ok(info)) => Some(format!(
                    "replica holds {} bytes, the volume {}",
                    info.size_bytes, self.size_bytes
                )),
                Ok(Err(replication::Error::StaleEpoch { current, .. })) => {
                    return Err(Error::StaleEpoch {
                        volume_id: self.volume_id.clone(),
                        epoch: self.epoch,
                        current,
                    });
                }
                Ok(Err(error)) => Some(crate::error_chain(&error)),
                Err(_) => Some(format!("no answer within {timeout:?}")),
            };
            member.set_healthy(problem.is_none());
            if problem.is_none() {
                // It persisted this epoch: older targets are fenced off it.
                member.lock().claimed = true;
            }
            if let Some(problem) = problem {
                warn!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    replica.id = %member.replica_name,
                    epoch = self.epoch,
                    %problem,
                    "Cannot claim replica"
                );
                if member.sync() == SyncState::InSync {
                    failed.push((Arc::clone(member), problem));
                }
            }
        }
        let in_sync = members
            .iter()
            .filter(|m| m.sync() == SyncState::InSync)
            .count();
        if failed.len() == in_sync {
            let errors = failed
                .iter()
                .map(|(m, p)| format!("{}: {p}", m.node_id))
                .collect::<Vec<_>>()
                .join("\n");
            return Err(Error::NoInSyncReplica {
                volume_id: self.volume_id.clone(),
                errors,
            });
        }
        for (member, problem) in failed {
            // The drop runs in the background; the first I/O waits for it.
            let _ = self.fail_member(&member, None, false, &problem);
        }
        Ok(())
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes of `regions` regions starting at region `first`, clipped to the
/// volume's end.
fn region_span_bytes(first: u64, regions: u64, size_bytes: u64) -> u64 {
    let start = first * regions::REGION_BYTES;
    let end = ((first + regions) * regions::REGION_BYTES).min(size_bytes);
    end.saturating_sub(start)
}
