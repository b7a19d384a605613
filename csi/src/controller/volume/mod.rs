//! Volumes: their records, life cycle, publication, in-sync sets and
//! repair.
//!
//! - [`record`]: the volume record in the store and the compare-and-set
//!   helpers that are the only way to change it.
//! - [`scheduling`]: replica placement.
//! - [`operations`]: create, delete, publish, unpublish, get, list.
//! - [`expand`]: offline growth of every replica, then the record.
//! - [`control`]: the in-sync set changes targets ask for (drop a replica,
//!   mark it in sync) and rebuild progress.
//! - [`api`]: the management API's gRPC adapters (`VolumeService`,
//!   `TargetControlService`).
//! - [`state`]: a replica's shown state, from its sync state and its
//!   node's health.
//! - [`reconcile`]: finishing interrupted creates and deletes, rebuilding
//!   faulted replicas and replacing those on nodes that stay down.
//!
//! # Life cycle
//!
//! ```text
//!  CreateVolume ──> creating ──(every replica created)──> ready ──DeleteVolume──> deleting ──> (gone)
//!                      └──(a replica failed, or a crash)──────────────────────────────^
//! ```
//!
//! A volume id is its name (a CSI volume name); each replica is a file
//! named by the volume id on its node. A name can be used again once the
//! old volume's record is gone, which waits for every replica to be
//! destroyed (see docs/adr/0006-volume-id-is-the-name.md).
//!
//! # Epochs and the in-sync set
//!
//! See docs/architecture.md. This module must never change a replica's
//! membership of the in-sync set except through [`control`] (on a target's
//! request, with the target's epoch checked) and never raise an epoch
//! except in publish.

pub mod api;
pub mod control;
pub mod expand;
pub mod operations;
pub mod reconcile;
pub mod record;
pub mod scheduling;
pub mod state;
#[cfg(test)]
mod tests;

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::controller as pb;
use ballast_proto::controller::target_control_refusal::Reason as RefusalReason;

pub use self::record::ContentSource;
use self::record::{ReplicaState, VolumeRecord, VolumeState};
use super::agents::{self, AgentError};
use super::{Context, node};
use crate::store;

/// Errors of volume operations.
///
/// For gRPC (see `From<Error> for tonic::Status`): arguments are
/// `INVALID_ARGUMENT`; missing volumes, nodes and replicas `NOT_FOUND`; a
/// name reused with other parameters, or a publication repeated with
/// another capability, `ALREADY_EXISTS`; a concurrent
/// operation, or a volume still being created or deleted, `ABORTED` (retry
/// later); states that forbid the request (published, stale epoch, last
/// in-sync replica) `FAILED_PRECONDITION`; a node that is down
/// `UNAVAILABLE`; no room `RESOURCE_EXHAUSTED`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request argument is missing or malformed.
    #[error("Invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// No volume with this id.
    #[error("Volume {volume} does not exist")]
    VolumeNotFound {
        /// The volume id.
        volume: String,
    },
    /// The node was never registered.
    #[error("Node {node} is not registered")]
    NodeNotFound {
        /// The node id.
        node: String,
    },
    /// The node is registered but sends no heartbeats.
    #[error("Node {node} is down (no heartbeat within the timeout)")]
    NodeDown {
        /// The node id.
        node: String,
    },
    /// The name exists and is not compatible with the request.
    #[error("Volume {volume} already exists but is incompatible: {reasons}")]
    VolumeMismatch {
        /// The volume id.
        volume: String,
        /// What differs, for people.
        reasons: String,
    },
    /// The volume is published on the node with another capability (CSI
    /// ControllerPublishVolume: "Volume published but is incompatible").
    #[error(
        "Volume {volume} is already published on node {node} as {existing}, not as {requested}"
    )]
    PublishedIncompatible {
        /// The volume id.
        volume: String,
        /// The node.
        node: String,
        /// The capability it is published with.
        existing: String,
        /// The capability asked for.
        requested: String,
    },
    /// Another operation on the volume is in progress.
    #[error("Another operation on volume {volume} is in progress; retry later")]
    Busy {
        /// The volume id.
        volume: String,
    },
    /// The volume is being created (by an operation that did not finish).
    #[error("Volume {volume} is still being created; retry later")]
    Creating {
        /// The volume id.
        volume: String,
    },
    /// The volume is being deleted; its name is free once every replica is
    /// destroyed.
    #[error("Volume {volume} is being deleted{pending}; retry later")]
    Deleting {
        /// The volume id.
        volume: String,
        /// What it waits for, for people.
        pending: String,
    },
    /// The volume is published, which forbids the request.
    #[error("Volume {volume} is published on node {node}; unpublish it first")]
    Published {
        /// The volume id.
        volume: String,
        /// Where it is published.
        node: String,
    },
    /// The volume is published on another node and force was not given.
    #[error(
        "Volume {volume} is published on node {node}, not on {requested}; unpublish it first or publish with force"
    )]
    PublishedElsewhere {
        /// The volume id.
        volume: String,
        /// Where it is published.
        node: String,
        /// Where publishing was asked.
        requested: String,
    },
    /// A target asked with an epoch other than the volume's.
    #[error("Stale epoch {epoch} for volume {volume}: the volume is at epoch {current}")]
    StaleEpoch {
        /// The volume id.
        volume: String,
        /// The epoch the target sent.
        epoch: u64,
        /// The volume's epoch.
        current: u64,
    },
    /// Dropping the replica would leave no in-sync replica.
    #[error(
        "Replica on node {node} is the last in-sync replica of volume {volume}; it cannot be dropped"
    )]
    LastInSync {
        /// The volume id.
        volume: String,
        /// The node of the replica.
        node: String,
    },
    /// The volume has no replica on the node.
    #[error("Volume {volume} has no replica on node {node}")]
    ReplicaNotFound {
        /// The volume id.
        volume: String,
        /// The node id.
        node: String,
    },
    /// Replicas cannot be placed.
    #[error(transparent)]
    Placement(#[from] scheduling::Error),
    /// The source snapshot of a restore or clone is missing, not ready,
    /// or could not be taken.
    #[error(transparent)]
    Snapshot(#[from] crate::controller::snapshot::Error),
    /// The volume's size range cannot hold its source.
    #[error(
        "The source {source_name} holds {source_bytes} bytes, more than the {limit_bytes} bytes the volume may have"
    )]
    SourceTooLarge {
        /// "snapshot S" or "volume V".
        source_name: String,
        /// The source's size.
        source_bytes: u64,
        /// The largest size the request allows.
        limit_bytes: u64,
    },
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// An agent cannot be addressed.
    #[error(transparent)]
    AgentAddress(#[from] agents::Error),
    /// The node registry failed.
    #[error(transparent)]
    Node(#[from] node::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let code = match err {
            Error::Placement(err) => return err.into(),
            Error::AgentAddress(err) => return err.into(),
            Error::Node(err) => return err.into(),
            Error::Store(err) => return err.into(),
            Error::Snapshot(err) => return err.into(),
            Error::SourceTooLarge { .. } => Code::OutOfRange,
            Error::Agent(ref agent) => agent.status_code(),
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::VolumeNotFound { .. }
            | Error::NodeNotFound { .. }
            | Error::ReplicaNotFound { .. } => Code::NotFound,
            Error::NodeDown { .. } => Code::Unavailable,
            Error::VolumeMismatch { .. } | Error::PublishedIncompatible { .. } => {
                Code::AlreadyExists
            }
            Error::Busy { .. } | Error::Creating { .. } | Error::Deleting { .. } => Code::Aborted,
            Error::Published { .. } | Error::PublishedElsewhere { .. } => Code::FailedPrecondition,
            // Targets act on these two (fence, or keep the replica): they
            // read the typed reason in the details, never the message.
            Error::StaleEpoch { current, .. } => {
                return pb::TargetControlRefusal::new(RefusalReason::StaleEpoch, current)
                    .into_status(Code::FailedPrecondition, crate::error_chain(&err));
            }
            Error::LastInSync { .. } => {
                return pb::TargetControlRefusal::new(RefusalReason::LastInSyncReplica, 0)
                    .into_status(Code::FailedPrecondition, crate::error_chain(&err));
            }
        };
        tonic::Status::new(code, crate::error_chain(&err))
    }
}

/// Rebuild progress as targets report it; memory only.
#[derive(Debug, Default)]
pub struct RebuildProgress {
    entries: Mutex<HashMap<(String, String), Progress>>,
}

/// One replica's rebuild progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The epoch of the target that reported it.
    pub epoch: u64,
    /// Bytes copied.
    pub done_bytes: u64,
    /// Bytes to copy.
    pub total_bytes: u64,
}

impl RebuildProgress {
    /// Records a report.
    pub fn report(&self, volume: &str, node: &str, progress: Progress) {
        self.lock()
            .insert((volume.to_string(), node.to_string()), progress);
    }

    /// The last report for a replica.
    pub fn get(&self, volume: &str, node: &str) -> Option<Progress> {
        self.lock()
            .get(&(volume.to_string(), node.to_string()))
            .copied()
    }

    /// Forgets a replica's progress (it is in sync, or faulted again).
    pub fn clear(&self, volume: &str, node: &str) {
        self.lock().remove(&(volume.to_string(), node.to_string()));
    }

    /// Forgets every replica of a volume.
    pub fn clear_volume(&self, volume: &str) {
        self.lock().retain(|(v, _), _| v != volume);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Progress>> {
        self.entries.lock()
    }
}

/// Whether a volume has all the redundancy it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Fewer replicas are in sync than the volume asks for.
    pub abnormal: bool,
    /// Which replicas are not in sync and why, or that all are.
    pub message: String,
}

/// The volume operations, shared by the services and the reconcilers.
#[derive(Debug, Clone)]
pub struct Volumes {
    context: Arc<Context>,
}

impl Volumes {
    /// Operations over `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    /// What the controller observes of `replica` besides its record.
    fn observe(&self, record: &VolumeRecord, replica: &record::ReplicaRecord) -> state::Observed {
        let nodes = &self.context.nodes;
        state::Observed {
            node: state::Liveness {
                state: nodes.state(&replica.node_id),
                silent_for: nodes.silent_for(&replica.node_id),
            },
            target: record.target.as_ref().map(|t| nodes.state(&t.node_id)),
            progress: self
                .context
                .rebuilds
                .get(&record.volume_id, &replica.node_id),
            now_unix_ms: super::now_unix_ms(),
            node_down_after: self.context.config.node_down_after,
        }
    }

    /// The shown state of `replica` (see [`state`]).
    fn shown(&self, record: &VolumeRecord, replica: &record::ReplicaRecord) -> state::Shown {
        state::derive(replica, &self.observe(record, replica))
    }

    /// The volume as the API returns it, with its status for people.
    pub fn to_proto(&self, record: &VolumeRecord) -> pb::Volume {
        let replicas = record
            .replicas
            .iter()
            .map(|r| {
                let shown = self.shown(record, r);
                let (progress, down_since, replace_at) = match shown {
                    state::Shown::Rebuilding { progress } => (progress, 0, 0),
                    state::Shown::NodeDown {
                        since_unix_ms,
                        replace_at_unix_ms,
                    } => (None, since_unix_ms, replace_at_unix_ms.unwrap_or(0)),
                    state::Shown::InSync | state::Shown::Faulted => (None, 0, 0),
                };
                let node_state = match shown {
                    state::Shown::NodeDown { .. } => node::NodeState::Down,
                    _ => node::NodeState::Up,
                };
                pb::Replica {
                    node_id: r.node_id.clone(),
                    replica_name: r.replica_name.clone(),
                    state: shown.as_str().to_string(),
                    rebuild_done_bytes: progress.map(|p| p.done_bytes).unwrap_or(0),
                    rebuild_total_bytes: progress.map(|p| p.total_bytes).unwrap_or(0),
                    faulted_since_unix_ms: r.faulted_since_unix_ms,
                    sync_state: r.state.as_str().to_string(),
                    node_state: node_state.as_str().to_string(),
                    node_down_since_unix_ms: down_since,
                    replace_at_unix_ms: replace_at,
                }
            })
            .collect::<Vec<_>>();
        let target = record.target.as_ref();
        let (status, detail) = self.status(record);
        pb::Volume {
            volume_id: record.volume_id.clone(),
            size_bytes: record.size_bytes,
            replica_count: record.replica_count,
            thin: record.thin,
            epoch: record.epoch,
            target_node_id: target.map(|t| t.node_id.clone()).unwrap_or_default(),
            nbd_uri: target.map(|t| t.nbd_uri.clone()).unwrap_or_default(),
            replicas,
            status: status.to_string(),
            status_detail: detail,
            source_snapshot_id: record
                .content_source
                .as_ref()
                .filter(|s| s.volume_id.is_none())
                .map(|s| s.snapshot_id.clone())
                .unwrap_or_default(),
            source_volume_id: record
                .content_source
                .as_ref()
                .and_then(|s| s.volume_id.clone())
                .unwrap_or_default(),
        }
    }

    /// The volume's status word and, unless healthy, why.
    fn status(&self, record: &VolumeRecord) -> (&'static str, String) {
        match record.state {
            VolumeState::Creating => {
                return ("creating", "Replicas are being created".to_string());
            }
            VolumeState::Deleting => {
                let nodes: Vec<&str> = record
                    .replicas
                    .iter()
                    .map(|r| r.node_id.as_str())
                    .chain(record.retired.iter().map(|r| r.node_id.as_str()))
                    .collect();
                return (
                    "deleting",
                    format!(
                        "Replicas on {} are destroyed as their nodes are up",
                        nodes.join(", ")
                    ),
                );
            }
            VolumeState::Ready => {}
        }
        let wanted = usize::try_from(record.replica_count).unwrap_or(usize::MAX);
        if self.shown_in_sync(record) >= wanted.max(record.replicas.len()) {
            return ("healthy", String::new());
        }
        (
            "degraded",
            capitalise(&self.replica_issues(record).join("; ")),
        )
    }

    /// Replicas shown in sync: in the in-sync set, on a node that is up.
    fn shown_in_sync(&self, record: &VolumeRecord) -> usize {
        record
            .replicas
            .iter()
            .filter(|r| self.shown(record, r) == state::Shown::InSync)
            .count()
    }

    /// The volume's condition (CSI VolumeCondition): abnormal while fewer
    /// replicas are in sync (on nodes that are up) than the volume asks
    /// for, saying which replicas are not and why.
    pub fn condition(&self, record: &VolumeRecord) -> Condition {
        let in_sync = self.shown_in_sync(record);
        let wanted = usize::try_from(record.replica_count).unwrap_or(usize::MAX);
        if in_sync >= wanted {
            return Condition {
                abnormal: false,
                message: format!("All {wanted} replicas are in sync"),
            };
        }
        Condition {
            abnormal: true,
            message: format!(
                "{in_sync} of {wanted} replicas are in sync: {}",
                self.replica_issues(record).join("; ")
            ),
        }
    }

    /// What keeps each replica that is not in sync (or whose node is down)
    /// out of the in-sync set, and missing replicas.
    fn replica_issues(&self, record: &VolumeRecord) -> Vec<String> {
        let published = record.target.is_some();
        let now = super::now_unix_ms();
        let mut issues = Vec::new();
        for replica in &record.replicas {
            let node = &replica.node_id;
            match self.shown(record, replica) {
                state::Shown::InSync => {}
                state::Shown::NodeDown {
                    since_unix_ms,
                    replace_at_unix_ms,
                } => {
                    let down = human_duration(unix_ms_between(since_unix_ms, now));
                    let then = match replace_at_unix_ms {
                        Some(at) if at > now => format!(
                            "it is replaced on another node in {}",
                            human_duration(unix_ms_between(now, at))
                        ),
                        Some(_) => "it is replaced on another node now".to_string(),
                        None => "the target drops it on its next failed write, then it is replaced".to_string(),
                    };
                    issues.push(format!(
                        "replica on {node} is down: its node has sent no heartbeat for {down}; {then}"
                    ));
                }
                state::Shown::Faulted if !published => issues.push(format!(
                    "replica on {node} is faulted; the volume is not published, so no target can rebuild it until it is"
                )),
                state::Shown::Faulted if replica.state == ReplicaState::Rebuilding => {
                    issues.push(format!(
                        "replica on {node} is faulted; its rebuild stopped with its target, which is down"
                    ));
                }
                state::Shown::Faulted => issues.push(format!(
                    "replica on {node} is faulted; its rebuild starts shortly"
                )),
                state::Shown::Rebuilding { progress } => {
                    let percent = progress
                        .filter(|p| p.total_bytes > 0)
                        .map(|p| format!(" ({}%)", p.done_bytes.saturating_mul(100) / p.total_bytes))
                        .unwrap_or_default();
                    issues.push(format!("replica on {node} is rebuilding{percent}"));
                }
            }
        }
        let wanted = usize::try_from(record.replica_count).unwrap_or(usize::MAX);
        if record.replicas.len() < wanted {
            issues.push(format!(
                "{} of {wanted} replicas exist",
                record.replicas.len()
            ));
        }
        issues
    }
}

fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The time from `from` to `to` (Unix ms), zero if `to` is earlier.
fn unix_ms_between(from: i64, to: i64) -> Duration {
    Duration::from_millis(u64::try_from(to.saturating_sub(from)).unwrap_or(0))
}

/// "5m 3s", "42s".
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 60 {
        format!("{}m {}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}
