//! The volume reconcilers.
//!
//! - [`Leftovers`] finishes what an interrupted operation left: a record
//!   still `creating` with no operation in progress (the controller
//!   crashed mid-create) is rolled back; a `deleting` record has its
//!   remaining replicas destroyed as their nodes come up, then goes; a
//!   replaced (retired) replica is destroyed when its node comes back.
//! - [`ReplicaRepair`] brings faulted replicas back. A faulted replica
//!   whose node is up is handed to the volume's target for a delta rebuild
//!   (`AddReplica(full_rebuild=false)`), and its state becomes
//!   `rebuilding`; a replica recorded `rebuilding` that the live target
//!   reports faulted (its rebuild was aborted, e.g. its node died) is
//!   recorded `faulted` again. One whose node has been silent for longer than
//!   `--node-down-after` is replaced: a new replica on another node that
//!   holds none of the volume (within its `allowedNodes` and in a free
//!   failure domain, see the scheduling module), recorded first (the old one becomes
//!   retired), then created, then rebuilt in full. A volume that is not
//!   published has no target, so nothing can rebuild it: its replicas stay
//!   faulted (replacements are still placed and created) and its status
//!   says so.
//!
//! Both work only on volumes that need it, take the volume's guard (and
//! skip the volume while an operation holds it), decide from a fresh read,
//! and write with compare-and-set; running a pass twice, or after a crash
//! half-way, is harmless.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use ballast_proto::agent as agent_pb;
use tracing::{debug, info, warn};

use super::operations::DeleteOutcome;
use super::record::{self, Change, ReplicaRecord, ReplicaState, RetiredReplica, VolumeState};
use super::scheduling;
use super::{Error, Volumes};
use crate::controller::agents::AgentError;
use crate::controller::node::NodeState;
use crate::controller::reconciler::Reconciler;
use crate::controller::{Context, now_unix_ms};
use crate::error_chain;
use crate::store;

/// Keeps the store error of a failed pass, logs the others.
fn pass_result(volume_id: &str, result: Result<(), Error>) -> Result<(), store::Error> {
    match result {
        Ok(()) => Ok(()),
        Err(Error::Store(err @ store::Error::Unavailable(_))) => Err(err),
        Err(err) => {
            warn!(volume.id = %volume_id, error = %error_chain(&err), "Volume repair step failed; retrying on the next pass");
            Ok(())
        }
    }
}

/// Finishes interrupted creates and deletes; destroys retired replicas.
pub struct Leftovers {
    volumes: Volumes,
}

impl Leftovers {
    /// A reconciler over `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self {
            volumes: Volumes::new(context),
        }
    }

    async fn finish(&self, volume: &record::VolumeRecord) -> Result<(), Error> {
        let id = &volume.volume_id;
        let Ok(_guard) = self.volumes.guard(id) else {
            return Ok(());
        };
        if volume.state == VolumeState::Creating {
            warn!(volume.id = %id, "Volume creation was interrupted; undoing it");
            record::update(&self.volumes.context.store, id, |r| {
                if r.state != VolumeState::Creating {
                    return Ok::<_, Error>(Change::Keep);
                }
                r.state = VolumeState::Deleting;
                Ok(Change::Write)
            })
            .await?;
        }
        match self.volumes.finish_delete(id).await? {
            DeleteOutcome::Gone => info!(volume.id = %id, "Deletion finished"),
            DeleteOutcome::Pending(nodes) => {
                debug!(volume.id = %id, nodes = ?nodes, "Deletion waits for nodes");
            }
        }
        Ok(())
    }

    async fn destroy_retired(&self, volume: &record::VolumeRecord) -> Result<(), Error> {
        let id = &volume.volume_id;
        let nodes = &self.volumes.context.nodes;
        let ready: Vec<&RetiredReplica> = volume
            .retired
            .iter()
            .filter(|r| nodes.state(&r.node_id) == NodeState::Up)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let Ok(_guard) = self.volumes.guard(id) else {
            return Ok(());
        };
        let mut destroyed = Vec::new();
        for retired in ready {
            match self
                .volumes
                .destroy_replica(&retired.node_id, &retired.replica_name)
                .await
            {
                Ok(()) => destroyed.push(retired.clone()),
                Err(err) => {
                    warn!(volume.id = %id, node.id = %retired.node_id, error = %error_chain(&err), "Cannot destroy a replaced replica yet");
                }
            }
        }
        record::update(&self.volumes.context.store, id, |r| {
            let before = r.retired.len();
            r.retired.retain(|x| !destroyed.contains(x));
            Ok::<_, Error>(if r.retired.len() == before {
                Change::Keep
            } else {
                Change::Write
            })
        })
        .await?;
        Ok(())
    }
}

#[async_trait]
impl Reconciler for Leftovers {
    fn name(&self) -> &'static str {
        "volume-leftovers"
    }

    async fn reconcile(&self) -> Result<(), store::Error> {
        for volume in record::list(&self.volumes.context.store).await? {
            let result = match volume.state {
                VolumeState::Creating | VolumeState::Deleting => self.finish(&volume).await,
                VolumeState::Ready if !volume.retired.is_empty() => {
                    self.destroy_retired(&volume).await
                }
                VolumeState::Ready => Ok(()),
            };
            pass_result(&volume.volume_id, result)?;
        }
        Ok(())
    }
}

/// Rebuilds faulted replicas and replaces those on nodes that stay down.
pub struct ReplicaRepair {
    volumes: Volumes,
    /// (volume, node) pairs already told that no replacement fits, so the
    /// warning is logged once, not every pass.
    warned: Mutex<HashSet<(String, String)>>,
    /// (volume, node) pairs whose replacement replica this controller
    /// created, so creation is not repeated every pass.
    created: Mutex<HashSet<(String, String)>>,
}

impl ReplicaRepair {
    /// A reconciler over `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self {
            volumes: Volumes::new(context),
            warned: Mutex::new(HashSet::new()),
            created: Mutex::new(HashSet::new()),
        }
    }

    fn context(&self) -> &Context {
        &self.volumes.context
    }

    async fn repair(&self, volume_id: &str) -> Result<(), Error> {
        let Ok(_guard) = self.volumes.guard(volume_id) else {
            return Ok(());
        };
        self.replace_lost(volume_id).await?;
        self.ensure_created(volume_id).await?;
        self.start_rebuilds(volume_id).await
    }

    /// Replaces faulted replicas whose node has been silent for longer
    /// than `--node-down-after`. A replica recorded as rebuilding counts as
    /// faulted here: it was handed to the target while its node still
    /// counted as up, and a rebuild to a node that is gone has failed.
    async fn replace_lost(&self, volume_id: &str) -> Result<(), Error> {
        let store = &self.context().store;
        let Some(volume) = record::read(store, volume_id).await? else {
            return Ok(());
        };
        let volume = volume.value;
        let nodes = &self.context().nodes;
        let down_after = self.context().config.node_down_after;
        let lost: Vec<ReplicaRecord> = volume
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::InSync)
            .filter(|r| {
                nodes.state(&r.node_id) == NodeState::Down
                    && nodes.silent_for(&r.node_id) >= down_after
            })
            .cloned()
            .collect();
        for old in lost {
            let occupied = volume.occupied_nodes();
            let candidates = self.volumes.candidates().await?;
            let holders: Vec<String> = volume
                .replicas
                .iter()
                .filter(|r| r.node_id != old.node_id)
                .map(|r| r.node_id.clone())
                .collect();
            // Parameters were checked at create; a record that fails the
            // check now (written by hand) is placed without constraints
            // rather than left short of a replica.
            let constraints =
                scheduling::Constraints::from_parameters(&volume.parameters).unwrap_or_default();
            let placed = scheduling::place(
                &candidates,
                &scheduling::Request {
                    size_bytes: volume.size_bytes,
                    thin: volume.thin,
                    count: 1,
                    preferred_node: None,
                    preferred: &[],
                    constraints: &constraints,
                    exclude: &occupied,
                    holders: &holders,
                },
            );
            let new_node = match placed {
                Ok(mut nodes) => nodes.remove(0),
                Err(err) => {
                    let key = (volume_id.to_string(), old.node_id.clone());
                    if self.warned.lock().insert(key) {
                        warn!(volume.id = %volume_id, node.id = %old.node_id, error = %err, "Replica's node is gone but no other node can take a replacement");
                    }
                    continue;
                }
            };
            self.warned
                .lock()
                .remove(&(volume_id.to_string(), old.node_id.clone()));
            // Record first: a crash after this leaves a replacement the
            // next pass creates, never a replica nobody knows about.
            let now = now_unix_ms();
            let replaced = record::update(store, volume_id, |r| {
                let replica_name = r.volume_id.clone();
                let Some(entry) = r.replica_mut(&old.node_id) else {
                    return Ok::<_, Error>(Change::Keep);
                };
                if entry.state == ReplicaState::InSync
                    || entry.faulted_since_unix_ms != old.faulted_since_unix_ms
                {
                    return Ok(Change::Keep);
                }
                *entry = ReplicaRecord {
                    node_id: new_node.clone(),
                    replica_name,
                    state: ReplicaState::Faulted,
                    faulted_since_unix_ms: now,
                    full_rebuild: true,
                };
                r.retired.push(RetiredReplica {
                    node_id: old.node_id.clone(),
                    replica_name: old.replica_name.clone(),
                });
                Ok(Change::Write)
            })
            .await?;
            let replaced = replaced
                .as_ref()
                .is_some_and(|v| v.value.replica(&new_node).is_some());
            if replaced {
                info!(volume.id = %volume_id, old.node = %old.node_id, node.id = %new_node, "Replica on a lost node replaced by a new one");
            }
        }
        Ok(())
    }

    /// Creates replacement replicas that do not exist yet.
    async fn ensure_created(&self, volume_id: &str) -> Result<(), Error> {
        let Some(volume) = record::read(&self.context().store, volume_id).await? else {
            return Ok(());
        };
        let volume = volume.value;
        for replica in volume.replicas.iter().filter(|r| r.full_rebuild) {
            let key = (volume_id.to_string(), replica.node_id.clone());
            if self.created.lock().contains(&key)
                || self.context().nodes.state(&replica.node_id) != NodeState::Up
            {
                continue;
            }
            match self.volumes.create_replica(&volume, &replica.node_id).await {
                Ok(()) => {
                    self.created.lock().insert(key);
                }
                Err(err) => {
                    warn!(volume.id = %volume_id, node.id = %replica.node_id, error = %error_chain(&err), "Cannot create the replacement replica yet");
                }
            }
        }
        Ok(())
    }

    /// Hands faulted replicas on nodes that are up to the volume's target.
    async fn start_rebuilds(&self, volume_id: &str) -> Result<(), Error> {
        let store = &self.context().store;
        let Some(volume) = record::read(store, volume_id).await? else {
            return Ok(());
        };
        let volume = volume.value;
        let Some(target) = volume.target.as_ref().filter(|t| !t.socket_path.is_empty()) else {
            // Not published: no target can rebuild (the status says so).
            return Ok(());
        };
        let nodes = &self.context().nodes;
        if nodes.state(&target.node_id) != NodeState::Up {
            return Ok(());
        }
        let target_node = self.volumes.node(&target.node_id).await?;
        let Some(view) = self.volumes.get_target(&target_node, volume_id).await? else {
            debug!(volume.id = %volume_id, node.id = %target.node_id, "The volume's target is not running; publish it again");
            return Ok(());
        };
        if view.epoch != volume.epoch {
            return Ok(());
        }
        self.settle_aborted_rebuilds(&volume, &view).await?;
        let replicas = self.volumes.target_replicas(&volume).await?;
        for replica in &volume.replicas {
            if replica.state == ReplicaState::InSync
                || nodes.state(&replica.node_id) != NodeState::Up
            {
                continue;
            }
            if replica.full_rebuild
                && !self
                    .created
                    .lock()
                    .contains(&(volume_id.to_string(), replica.node_id.clone()))
            {
                continue;
            }
            let seen = view
                .replicas
                .iter()
                .find(|t| t.node_id == replica.node_id)
                .map(|t| t.state.as_str());
            if matches!(seen, Some("rebuilding" | "in-sync")) {
                continue;
            }
            let Some(mut wire) = replicas
                .iter()
                .find(|t| t.node_id == replica.node_id)
                .cloned()
            else {
                continue;
            };
            wire.in_sync = false;
            wire.state = ReplicaState::Rebuilding.as_str().to_string();
            let mut client = self
                .context()
                .agents
                .targets(&target_node.record.agent_address)?;
            client
                .add_replica(agent_pb::AddReplicaRequest {
                    volume_id: volume_id.to_string(),
                    epoch: volume.epoch,
                    replica: Some(wire),
                    full_rebuild: replica.full_rebuild,
                })
                .await
                .map_err(|status| {
                    AgentError::new(
                        &target.node_id,
                        format!("Adding replica on {} to the target", replica.node_id),
                        status,
                    )
                })?;
            let epoch = volume.epoch;
            record::update(store, volume_id, |r| {
                if r.epoch != epoch {
                    return Ok::<_, Error>(Change::Keep);
                }
                match r.replica_mut(&replica.node_id) {
                    Some(entry)
                        if entry.state == ReplicaState::Faulted
                            && entry.faulted_since_unix_ms == replica.faulted_since_unix_ms =>
                    {
                        entry.state = ReplicaState::Rebuilding;
                        Ok(Change::Write)
                    }
                    _ => Ok(Change::Keep),
                }
            })
            .await?;
            info!(volume.id = %volume_id, node.id = %replica.node_id, epoch, full = replica.full_rebuild, "Rebuild started");
        }
        Ok(())
    }

    /// Records as faulted the replicas the record holds as rebuilding but
    /// the live target at the volume's epoch reports faulted (or does not
    /// hold): their rebuild was aborted (the target tells the controller
    /// only of drops from the in-sync set and of joins), so the record's
    /// `rebuilding` no longer says what the target does. Membership of the
    /// in-sync set is unchanged; the replica is handed to the target again
    /// once its node is up.
    async fn settle_aborted_rebuilds(
        &self,
        volume: &record::VolumeRecord,
        view: &agent_pb::Target,
    ) -> Result<(), Error> {
        let aborted: Vec<&ReplicaRecord> = volume
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Rebuilding)
            .filter(|r| {
                let seen = view
                    .replicas
                    .iter()
                    .find(|t| t.node_id == r.node_id)
                    .map(|t| t.state.as_str());
                !matches!(seen, Some("rebuilding" | "in-sync"))
            })
            .collect();
        if aborted.is_empty() {
            return Ok(());
        }
        let epoch = volume.epoch;
        record::update(&self.context().store, &volume.volume_id, |r| {
            if r.epoch != epoch {
                return Ok::<_, Error>(Change::Keep);
            }
            let mut change = Change::Keep;
            for old in &aborted {
                if let Some(entry) = r.replica_mut(&old.node_id)
                    && entry.state == ReplicaState::Rebuilding
                    && entry.faulted_since_unix_ms == old.faulted_since_unix_ms
                {
                    entry.state = ReplicaState::Faulted;
                    change = Change::Write;
                }
            }
            Ok(change)
        })
        .await?;
        for old in &aborted {
            self.context()
                .rebuilds
                .clear(&volume.volume_id, &old.node_id);
            info!(volume.id = %volume.volume_id, node.id = %old.node_id, epoch, "The target no longer rebuilds the replica; recorded as faulted");
        }
        Ok(())
    }
}

#[async_trait]
impl Reconciler for ReplicaRepair {
    fn name(&self) -> &'static str {
        "replica-repair"
    }

    async fn reconcile(&self) -> Result<(), store::Error> {
        for volume in record::list(&self.context().store).await? {
            let needs_work = volume.state == VolumeState::Ready
                && volume
                    .replicas
                    .iter()
                    .any(|r| r.state != ReplicaState::InSync);
            if !needs_work {
                continue;
            }
            let result = self.repair(&volume.volume_id).await;
            pass_result(&volume.volume_id, result)?;
        }
        Ok(())
    }
}
