//! The cut: every in-sync replica of one or more volumes copied at one
//! instant (a snapshot, or a group snapshot's members).
//!
//! ```text
//!  controller            member targets (one per published volume)      replica agents
//!   │ 0. PrepareSnapshotCopy ───────────────────────────────────────────────> reflink now
//!   │ 1. PauseTarget ──────────> close the barrier: writes in flight finish,
//!   │                            new ones wait; answer paused + in-sync set
//!   │    (all members paused)
//!   │ 2. CreateSnapshotCopy ────────────────────────────────────────────────> refresh, fsync, commit
//!   │ 3. ResumeTarget ─────────> open the barrier; was_paused?
//! ```
//!
//! On a published volume the target's write barrier makes the instant:
//! `PauseTarget` answers once no write is in flight, with the in-sync set
//! at that moment; each of those replicas' agents completes its copy
//! (`CreateSnapshotCopy`, durable when it answers); `ResumeTarget` drops
//! the barrier. Copies are prepared before the pause (a reflink of the
//! replica as it is then), so the copy under the barrier only refreshes
//! what was written since. Every member's target is paused before any copy
//! is taken and resumed only after every copy is durable, so a write that
//! depends on another member's acknowledged write is in the cut only if
//! that write is too (invariant 5). The cut counts only if every resume
//! finds its barrier still up (`was_paused`): a barrier that dropped at its
//! deadline let writes through while copies were being taken. One deadline
//! covers the barrier phase; each agent drops its barrier at that deadline
//! on its own, so a controller that dies mid-cut holds writes no longer.
//!
//! An unpublished volume has no writer: its in-sync replicas on nodes that
//! are up are copied as they are, during phase 2.
//!
//! This module takes copies and reports them; it must never write a
//! record (the caller removes copies of a failed cut through the
//! snapshots' records, which name every node that may hold one).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_proto::agent as agent_pb;
use futures_util::future::join_all;
use tracing::{info, warn};

use super::Error;
use super::record::CopyRecord;
use crate::controller::Context;
use crate::controller::agents::AgentError;
use crate::controller::volume::record::{ReplicaRecord, ReplicaState, VolumeRecord};

/// What a completed cut holds for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// One durable copy per in-sync replica at the cut.
    pub copies: Vec<CopyRecord>,
    /// The instant of the cut, nanoseconds since the Unix epoch.
    pub created_at_unix_nanos: u64,
    /// How long the volume's writes were held, in milliseconds.
    pub paused_ms: u64,
}

/// One volume of a cut and the snapshot its copies are named by.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The volume, as read under its guard.
    pub volume: &'a VolumeRecord,
    /// The snapshot id its copies take.
    pub snapshot_id: &'a str,
}

/// Takes one cut of every member within `deadline` (counted from the first
/// pause). The caller holds every member volume's guard (no publish or
/// unpublish meanwhile). `asked[i]` receives every node asked for a copy
/// of member `i`, which may hold one whatever the outcome.
///
/// # Errors
///
/// [`Error::CutDeadline`] when a barrier does not close, or the copies do
/// not complete, while the barriers hold; [`Error::NoInSyncReplica`] when
/// a member has no in-sync replica on a node that is up;
/// [`Error::NodeDown`], [`Error::Agent`] when an agent refuses or cannot
/// be reached. Every barrier raised is dropped before the error returns;
/// copies taken before the failure stay for the caller to remove.
pub async fn take_group(
    context: &Context,
    members: &[Member<'_>],
    deadline: Duration,
    asked: &mut [Vec<String>],
) -> Result<Vec<Taken>, Error> {
    prepare(context, members, deadline, asked)
        .await?
        .take(asked)
        .await
}

/// A cut whose copies are prepared (phase 0), not yet taken.
pub struct Prepared<'a> {
    cuts: Vec<Cut<'a>>,
    deadline: Duration,
    /// Per member, the in-sync nodes that were asked to prepare.
    in_sync: Vec<Vec<String>>,
}

/// Phase 0 of [`take_group`], outside any barrier: prepares the copies of
/// published members (best effort: a copy that is not prepared is taken in
/// full at the barrier). `asked[i]` receives the nodes asked.
///
/// # Errors
///
/// [`Error::NoInSyncReplica`]; the node registry's errors.
pub async fn prepare<'a>(
    context: &'a Context,
    members: &'a [Member<'a>],
    deadline: Duration,
    asked: &mut [Vec<String>],
) -> Result<Prepared<'a>, Error> {
    let cuts: Vec<Cut<'_>> = members
        .iter()
        .map(|m| Cut {
            context,
            volume: m.volume,
            snapshot_id: m.snapshot_id,
            deadline,
        })
        .collect();
    let mut in_sync = Vec::with_capacity(cuts.len());
    for (cut, asked) in cuts.iter().zip(asked.iter_mut()) {
        let nodes = cut.up_in_sync_nodes().await?;
        asked.extend(nodes.iter().cloned());
        in_sync.push(nodes);
    }
    join_all(
        cuts.iter()
            .zip(&in_sync)
            .filter(|(cut, _)| cut.volume.target.is_some())
            .map(|(cut, nodes)| cut.prepare_all(nodes)),
    )
    .await;
    Ok(Prepared {
        cuts,
        deadline,
        in_sync,
    })
}

impl Prepared<'_> {
    /// Phases 1 to 3 of [`take_group`]: pause all, copy all, resume all.
    ///
    /// # Errors
    ///
    /// As [`take_group`].
    pub async fn take(self, asked: &mut [Vec<String>]) -> Result<Vec<Taken>, Error> {
        let Prepared {
            cuts,
            deadline,
            mut in_sync,
        } = self;
        let cuts = &cuts[..];
        // Phase 1: every published member's barrier, at once.
        let until = Instant::now() + deadline;
        let pauses = join_all(cuts.iter().map(|cut| cut.pause())).await;
        let idle_at = unix_nanos(SystemTime::now());
        let mut held = Vec::with_capacity(cuts.len());
        let mut first_error = None;
        for pause in pauses {
            match pause {
                Ok(paused) => held.push(paused),
                Err(err) => {
                    first_error.get_or_insert(err);
                    held.push(None);
                }
            }
        }
        if let Some(err) = first_error {
            resume_all(cuts, &held).await;
            return Err(err);
        }

        // Phase 2: every copy of every member, at once, while all hold.
        for ((paused, asked), nodes) in held.iter().zip(asked.iter_mut()).zip(in_sync.iter_mut()) {
            if let Some(paused) = paused {
                *nodes = paused.response.in_sync_node_ids.clone();
                for node in nodes.iter() {
                    if !asked.contains(node) {
                        asked.push(node.clone());
                    }
                }
            }
        }
        let copied = join_all(
            cuts.iter()
                .zip(in_sync.iter())
                .map(|(cut, nodes)| cut.copy_all(nodes, until)),
        )
        .await;

        // Phase 3: resume all, then judge.
        let resumed = resume_all(cuts, &held).await;
        let mut taken = Vec::with_capacity(cuts.len());
        for (((cut, copies), paused), resumed) in cuts.iter().zip(copied).zip(&held).zip(resumed) {
            let copies = copies?;
            let (created_at_unix_nanos, paused_ms) = match (paused, resumed) {
                (None, _) => (idle_at, 0),
                (Some(_), None) => {
                    return Err(cut.void(
                        "the target could not be asked to resume, so the barrier may have dropped before the copies were done",
                    ));
                }
                (Some(_), Some(r)) if !r.was_paused => {
                    return Err(
                        cut.void("the barrier dropped at its deadline before the copies were done")
                    );
                }
                (Some(p), Some(r)) => (p.response.paused_at_unix_nanos, r.paused_ms),
            };
            info!(
                volume.id = %cut.volume.volume_id,
                snapshot.id = %cut.snapshot_id,
                epoch = cut.volume.epoch,
                paused_ms,
                copies = copies.len(),
                "Cut taken"
            );
            taken.push(Taken {
                copies,
                created_at_unix_nanos,
                paused_ms,
            });
        }
        Ok(taken)
    }
}

/// Drops every barrier in `held`; per member, the resume's answer (`None`
/// for an unpublished member or a target that could not be asked).
async fn resume_all(
    cuts: &[Cut<'_>],
    held: &[Option<Paused>],
) -> Vec<Option<agent_pb::ResumeTargetResponse>> {
    join_all(cuts.iter().zip(held).map(|(cut, paused)| async move {
        match paused {
            Some(paused) => cut.resume(paused).await,
            None => None,
        }
    }))
    .await
}

/// A raised barrier.
struct Paused {
    target_node: String,
    address: String,
    response: agent_pb::PauseTargetResponse,
}

/// One volume's part of a cut.
struct Cut<'a> {
    context: &'a Context,
    volume: &'a VolumeRecord,
    snapshot_id: &'a str,
    /// Longest the barriers may hold writes (and the copies of an idle
    /// volume may take).
    deadline: Duration,
}

impl Cut<'_> {
    fn void(&self, why: &str) -> Error {
        Error::CutDeadline {
            volume: self.volume.volume_id.clone(),
            deadline: self.deadline,
            why: why.to_string(),
        }
    }

    /// Raises the volume's barrier; `None` for an unpublished volume.
    async fn pause(&self) -> Result<Option<Paused>, Error> {
        let Some(target) = &self.volume.target else {
            return Ok(None);
        };
        let volume_id = &self.volume.volume_id;
        let target_node = target.node_id.clone();
        let address = agent_address(self.context, &target_node).await?;
        let mut targets = self.context.agents.targets(&address)?;
        let deadline_ms = u32::try_from(self.deadline.as_millis()).unwrap_or(u32::MAX);
        let pause = tokio::time::timeout(
            self.deadline,
            targets.pause_target(agent_pb::PauseTargetRequest {
                volume_id: volume_id.clone(),
                epoch: self.volume.epoch,
                pause_id: self.snapshot_id.to_string(),
                deadline_ms,
            }),
        )
        .await;
        let held_at = |response| Paused {
            target_node: target_node.clone(),
            address: address.clone(),
            response,
        };
        match pause {
            Ok(Ok(paused)) => Ok(Some(held_at(paused.into_inner()))),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(self.void("the writes in flight did not complete"))
            }
            Ok(Err(status)) => {
                // A transport failure may hide a barrier that did close.
                self.resume(&held_at(Default::default())).await;
                Err(AgentError::new(
                    &target_node,
                    format!("Pausing the target of volume {volume_id}"),
                    status,
                )
                .into())
            }
            Err(_) => {
                self.resume(&held_at(Default::default())).await;
                Err(self.void("the target did not answer the pause"))
            }
        }
    }

    /// Drops the barrier; `None` if the target could not be asked (it
    /// drops on its own at its deadline).
    async fn resume(&self, paused: &Paused) -> Option<agent_pb::ResumeTargetResponse> {
        let volume_id = &self.volume.volume_id;
        let request = agent_pb::ResumeTargetRequest {
            volume_id: volume_id.clone(),
            pause_id: self.snapshot_id.to_string(),
        };
        // No longer than the deadline: by then the barrier has dropped on
        // its own, and a stalled node must not hold the other members'
        // answer.
        let result = match self.context.agents.targets(&paused.address) {
            Ok(mut targets) => {
                match tokio::time::timeout(self.deadline, targets.resume_target(request)).await {
                    Ok(answer) => answer.map_err(|status| {
                        crate::error_chain(&AgentError::new(
                            &paused.target_node,
                            format!("Resuming the target of volume {volume_id}"),
                            status,
                        ))
                    }),
                    Err(_) => Err(format!("no answer within {:?}", self.deadline)),
                }
            }
            Err(err) => Err(crate::error_chain(&err)),
        };
        match result {
            Ok(resumed) => Some(resumed.into_inner()),
            Err(error) => {
                warn!(volume.id = %volume_id, snapshot.id = %self.snapshot_id, %error, "Cannot resume the target; its barrier drops at its deadline");
                None
            }
        }
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
        let all = join_all(prepares);
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
        let all = join_all(copies);
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
pub(super) async fn agent_address(context: &Context, node_id: &str) -> Result<String, Error> {
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
