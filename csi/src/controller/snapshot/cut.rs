//! The cut: every in-sync replica of a volume copied at one instant.
//!
//! On a published volume the target's write barrier makes the instant:
//! `PauseTarget` answers once no write is in flight, with the in-sync set
//! at that moment; each of those replicas' agents takes a reflink copy
//! (`CreateSnapshotCopy`, durable when it answers); `ResumeTarget` drops
//! the barrier. The cut counts only if the resume finds the barrier still
//! up (`was_paused`): a barrier that dropped at its deadline let writes
//! through while copies were being taken. The whole cut shares one
//! deadline; the agent drops its barrier at that deadline on its own, so a
//! controller that dies mid-cut holds writes no longer than that.
//!
//! An unpublished volume has no writer: its in-sync replicas on nodes that
//! are up are copied as they are.
//!
//! This module takes copies and reports them; it must never write a
//! record (the caller removes copies of a failed cut through the
//! snapshot's record, which names every node that may hold one).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_proto::agent as agent_pb;
use tracing::{info, warn};

use super::Error;
use super::record::CopyRecord;
use crate::controller::Context;
use crate::controller::agents::AgentError;
use crate::controller::volume::record::{ReplicaRecord, ReplicaState, VolumeRecord};

/// What a completed cut holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// One durable copy per in-sync replica at the cut.
    pub copies: Vec<CopyRecord>,
    /// The instant of the cut, nanoseconds since the Unix epoch.
    pub created_at_unix_nanos: u64,
    /// How long the volume's writes were held, in milliseconds.
    pub paused_ms: u64,
}

/// Takes the cut of `volume` for snapshot `snapshot_id` within
/// `deadline`. The caller holds the volume's guard (no publish or
/// unpublish meanwhile). `asked` receives every node asked for a copy,
/// which may hold one whatever the outcome.
///
/// # Errors
///
/// [`Error::CutDeadline`] when the barrier does not close, or the copies
/// do not complete, while it holds; [`Error::NoInSyncReplica`] when no
/// in-sync replica's node is up; [`Error::Agent`] when an agent refuses or
/// cannot be reached. Copies taken before the failure stay for the caller
/// to remove.
pub async fn take(
    context: &Context,
    volume: &VolumeRecord,
    snapshot_id: &str,
    deadline: Duration,
    asked: &mut Vec<String>,
) -> Result<Taken, Error> {
    let cut = Cut {
        context,
        volume,
        snapshot_id,
        deadline,
    };
    match &volume.target {
        Some(target) => cut.at_barrier(&target.node_id, asked).await,
        None => cut.idle(asked).await,
    }
}

/// One cut in progress.
struct Cut<'a> {
    context: &'a Context,
    volume: &'a VolumeRecord,
    snapshot_id: &'a str,
    /// Longest the barrier may hold writes (and the copies of an idle
    /// volume may take).
    deadline: Duration,
}

impl Cut<'_> {
    async fn at_barrier(&self, target_node: &str, asked: &mut Vec<String>) -> Result<Taken, Error> {
        let Cut {
            context,
            volume,
            snapshot_id,
            deadline,
            ..
        } = *self;
        let volume_id = &volume.volume_id;
        let void = |why: &str| Error::CutDeadline {
            volume: volume_id.clone(),
            deadline,
            why: why.to_string(),
        };
        // Outside the barrier: each in-sync replica is reflinked now, so
        // the copy under the barrier only refreshes what changed since and
        // its cost grows with those writes, not with the replica's extents.
        let in_sync = self.up_in_sync_nodes().await?;
        asked.extend(in_sync.iter().cloned());
        self.prepare_all(&in_sync).await;
        let address = agent_address(context, target_node).await?;
        let mut targets = context.agents.targets(&address)?;
        // The barrier's own deadline starts with the pause.
        let until = Instant::now() + deadline;
        let deadline_ms = u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX);
        let pause = tokio::time::timeout(
            deadline,
            targets.pause_target(agent_pb::PauseTargetRequest {
                volume_id: volume_id.clone(),
                epoch: volume.epoch,
                pause_id: snapshot_id.to_string(),
                deadline_ms,
            }),
        )
        .await;
        let paused = match pause {
            Ok(Ok(paused)) => paused.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                return Err(void("the writes in flight did not complete"));
            }
            Ok(Err(status)) => {
                // A transport failure may hide a barrier that did close.
                resume(context, &address, target_node, volume_id, snapshot_id).await;
                return Err(AgentError::new(
                    target_node,
                    format!("Pausing the target of volume {volume_id}"),
                    status,
                )
                .into());
            }
            Err(_) => {
                resume(context, &address, target_node, volume_id, snapshot_id).await;
                return Err(void("the target did not answer the pause"));
            }
        };
        asked.extend(
            paused
                .in_sync_node_ids
                .iter()
                .filter(|n| !asked.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let copied = self.copy_all(&paused.in_sync_node_ids, until).await;
        let resumed = resume(context, &address, target_node, volume_id, snapshot_id).await;
        let copies = copied?;
        let Some(resumed) = resumed else {
            return Err(void(
                "the target could not be asked to resume, so the barrier may have dropped before the copies were done",
            ));
        };
        if !resumed.was_paused {
            return Err(void(
                "the barrier dropped at its deadline before the copies were done",
            ));
        }
        info!(
            volume.id = %volume_id,
            snapshot.id = %snapshot_id,
            epoch = volume.epoch,
            paused_ms = resumed.paused_ms,
            "Cut taken at the write barrier"
        );
        Ok(Taken {
            copies,
            created_at_unix_nanos: paused.paused_at_unix_nanos,
            paused_ms: resumed.paused_ms,
        })
    }

    async fn idle(&self, asked: &mut Vec<String>) -> Result<Taken, Error> {
        let created_at_unix_nanos = unix_nanos(SystemTime::now());
        let until = Instant::now() + self.deadline;
        let nodes = self.up_in_sync_nodes().await?;
        asked.extend(nodes.iter().cloned());
        let copies = self.copy_all(&nodes, until).await?;
        Ok(Taken {
            copies,
            created_at_unix_nanos,
            paused_ms: 0,
        })
    }

    /// The nodes of the record's in-sync replicas that are up.
    ///
    /// Errors: [`Error::NoInSyncReplica`] when there is none.
    async fn up_in_sync_nodes(&self) -> Result<Vec<String>, Error> {
        let volume = self.volume;
        let mut nodes = Vec::new();
        for replica in volume
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
        {
            match self.context.nodes.get(&replica.node_id).await? {
                Some(node) if node.is_up() => nodes.push(replica.node_id.clone()),
                _ => {
                    warn!(volume.id = %volume.volume_id, node.id = %replica.node_id, "In-sync replica's node is down; the snapshot has no copy there")
                }
            }
        }
        if nodes.is_empty() {
            return Err(Error::NoInSyncReplica {
                volume: volume.volume_id.clone(),
            });
        }
        Ok(nodes)
    }

    /// Prepares a copy on each of `nodes` at once (outside the barrier),
    /// within the deadline. Best effort: a node that fails is copied in
    /// full under the barrier, or fails the cut there.
    async fn prepare_all(&self, nodes: &[String]) {
        let prepares = nodes.iter().map(|node_id| async move {
            let result = self.prepare_one(node_id).await;
            if let Err(err) = &result {
                warn!(volume.id = %self.volume.volume_id, snapshot.id = %self.snapshot_id, node.id = %node_id, error = %crate::error_chain(err), "Cannot prepare the copy; it is taken in full at the barrier");
            }
        });
        let all = futures_util::future::join_all(prepares);
        if tokio::time::timeout(self.deadline, all).await.is_err() {
            warn!(volume.id = %self.volume.volume_id, snapshot.id = %self.snapshot_id, "Preparing the copies outlasted the deadline; they are taken at the barrier");
        }
    }

    async fn prepare_one(&self, node_id: &str) -> Result<(), Error> {
        let replica = self.replica_on(node_id)?;
        let address = agent_address(self.context, node_id).await?;
        self.context
            .agents
            .snapshots(&address)?
            .prepare_snapshot_copy(agent_pb::CreateSnapshotCopyRequest {
                snapshot_id: self.snapshot_id.to_string(),
                replica_name: replica.replica_name.clone(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    node_id,
                    format!(
                        "Preparing a copy of replica {} for snapshot {}",
                        replica.replica_name, self.snapshot_id
                    ),
                    status,
                )
            })?;
        Ok(())
    }

    /// The volume's replica on `node_id`.
    fn replica_on(&self, node_id: &str) -> Result<&ReplicaRecord, Error> {
        self.volume
            .replica(node_id)
            .ok_or_else(|| Error::InvalidArgument {
                reason: format!(
                    "node {node_id} holds no replica of volume {}",
                    self.volume.volume_id
                ),
            })
    }

    /// Takes (or, if prepared, refreshes) the copy on `node_id`.
    async fn copy_one(&self, node_id: &str) -> Result<CopyRecord, Error> {
        let replica = self.replica_on(node_id)?;
        let address = agent_address(self.context, node_id).await?;
        let copy = self
            .context
            .agents
            .snapshots(&address)?
            .create_snapshot_copy(agent_pb::CreateSnapshotCopyRequest {
                snapshot_id: self.snapshot_id.to_string(),
                replica_name: replica.replica_name.clone(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    node_id,
                    format!(
                        "Copying replica {} for snapshot {}",
                        replica.replica_name, self.snapshot_id
                    ),
                    status,
                )
            })?
            .into_inner();
        Ok(CopyRecord {
            node_id: node_id.to_string(),
            pool: copy.pool,
            allocated_bytes: copy.allocated_bytes,
        })
    }

    /// Copies the replicas on `nodes` at once, all by `until`.
    async fn copy_all(&self, nodes: &[String], until: Instant) -> Result<Vec<CopyRecord>, Error> {
        let volume = self.volume;
        if nodes.is_empty() {
            return Err(Error::NoInSyncReplica {
                volume: volume.volume_id.clone(),
            });
        }
        let copies = nodes.iter().map(|node_id| self.copy_one(node_id));
        let all = futures_util::future::join_all(copies);
        let Ok(results) = tokio::time::timeout_at(until.into(), all).await else {
            return Err(Error::CutDeadline {
                volume: volume.volume_id.clone(),
                deadline: self.deadline,
                why: "the copies were not all durable in time".to_string(),
            });
        };
        results.into_iter().collect()
    }
}

/// The agent address of `node_id`, which must be up.
async fn agent_address(context: &Context, node_id: &str) -> Result<String, Error> {
    match context.nodes.get(node_id).await? {
        Some(node) if node.is_up() => Ok(node.record.agent_address),
        _ => Err(Error::NodeDown {
            node: node_id.to_string(),
        }),
    }
}

fn unix_nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Drops the barrier; `None` if the target could not be asked (it drops
/// on its own at its deadline).
async fn resume(
    context: &Context,
    address: &str,
    target_node: &str,
    volume_id: &str,
    snapshot_id: &str,
) -> Option<agent_pb::ResumeTargetResponse> {
    let request = agent_pb::ResumeTargetRequest {
        volume_id: volume_id.to_string(),
        pause_id: snapshot_id.to_string(),
    };
    let result = match context.agents.targets(address) {
        Ok(mut targets) => targets.resume_target(request).await.map_err(|status| {
            crate::error_chain(&AgentError::new(
                target_node,
                format!("Resuming the target of volume {volume_id}"),
                status,
            ))
        }),
        Err(err) => Err(crate::error_chain(&err)),
    };
    match result {
        Ok(resumed) => Some(resumed.into_inner()),
        Err(error) => {
            warn!(volume.id = %volume_id, snapshot.id = %snapshot_id, %error, "Cannot resume the target; its barrier drops at its deadline");
            None
        }
    }
}
