//! What the volume service does: create, delete, publish, unpublish, get
//! and list, plus the agent calls they are made of.
//!
//! Every operation follows the host-path driver's shape: validate the
//! arguments, take the volume's operation guard, check idempotency against
//! the record, then act. Each step that matters is first committed to the
//! record (compare-and-set) and only then carried out on agents, so a crash
//! at any point leaves a record from which a reconciler (or a retried call)
//! can finish or undo the work:
//!
//! - create: the record (state `creating`, replicas planned) before any
//!   replica; `ready` after all of them. On failure the record goes to
//!   `deleting`, the created replicas are destroyed, then the record.
//! - delete: `deleting` before destroying replicas; the record last.
//! - publish: the raised epoch and the target's node before the target
//!   starts, so a replica can never see an epoch the store does not hold.
//!
//! Nothing here changes a replica's membership of the in-sync set (that is
//! [`super::control`], on a target's request) or lowers an epoch.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use ballast_proto::agent as agent_pb;
use tracing::{info, instrument, warn};

use super::record::{
    self, CapabilityRecord, Change, ReplicaRecord, ReplicaState, TargetRecord, VolumeRecord,
    VolumeState,
};
use super::scheduling::{self, Candidate};
use super::{Error, Volumes};
use crate::controller::agents::AgentError;
use crate::controller::node::{self, NodeView, Topology};
use crate::controller::now_unix_ms;
use ballast_storage_node::guard::OpGuard;

/// Longest volume name, in bytes (the agents' replica name limit).
pub const MAX_NAME_LEN: usize = 128;

/// Volume sizes are multiples of this many bytes (the agents' replica
/// alignment, so O_DIRECT reaches every byte).
pub const SIZE_ALIGN_BYTES: u64 = 4096;

/// What CreateVolume asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    /// Volume name, which becomes its id.
    pub name: String,
    /// Size in bytes, a positive multiple of [`SIZE_ALIGN_BYTES`].
    pub size_bytes: u64,
    /// Sizes in bytes an existing volume of that name may have and still
    /// be the volume asked for (CSI `capacity_range`).
    pub compatible_sizes: RangeInclusive<u64>,
    /// Number of replicas, at least 1.
    pub replica_count: u32,
    /// Sparse replicas.
    pub thin: bool,
    /// A node that must hold one replica (the operator's explicit choice).
    pub preferred_node: Option<String>,
    /// Segments tried in order for one replica (CSI preferred topology);
    /// none fitting is not an error.
    pub preferred_topology: Vec<Topology>,
    /// Segments the volume must be accessible from (CSI requisite
    /// topology): every node, so they restrict nothing (ADR 0009); tried
    /// for one replica when there are no preferred ones.
    pub requisite_topology: Vec<Topology>,
    /// The capabilities the volume must serve; kept in the record.
    pub capabilities: Vec<CapabilityRecord>,
    /// The StorageClass parameters; kept in the record. `allowedNodes`
    /// and `replicaTopologyKey` constrain placement
    /// ([`scheduling::Constraints`]).
    pub parameters: BTreeMap<String, String>,
}

/// Where a published volume is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// NBD URI of the target's export.
    pub nbd_uri: String,
    /// The export's unix socket on the target's node.
    pub socket_path: String,
    /// The epoch the target runs at.
    pub epoch: u64,
}

/// What a delete left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The record and every replica are gone.
    Gone,
    /// Replicas on these nodes (which are down) remain; the record stays
    /// in state `deleting` until a reconciler destroys them.
    Pending(Vec<String>),
}

/// Checks a volume name: 1 to [`MAX_NAME_LEN`] bytes of `[A-Za-z0-9._-]`,
/// not starting with a dot (the agents' replica name rule, since replicas
/// are named by the volume).
///
/// # Errors
///
/// [`Error::InvalidArgument`] saying what is wrong.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let reason = if name.is_empty() {
        "the volume name is empty".to_string()
    } else if name.len() > MAX_NAME_LEN {
        format!("the volume name is longer than {MAX_NAME_LEN} bytes")
    } else if name.starts_with('.') {
        format!("the volume name {name:?} starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        format!("the volume name {name:?} may only hold A-Z, a-z, 0-9, '.', '_' and '-'")
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument { reason })
}

fn required(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::InvalidArgument {
            reason: format!("{field} is required"),
        });
    }
    Ok(())
}

impl CreateRequest {
    /// A request for exactly `size_bytes`, with no topology, capabilities
    /// or parameters (the management API's).
    pub fn new(name: &str, size_bytes: u64, replica_count: u32, thin: bool) -> Self {
        Self {
            name: name.to_string(),
            size_bytes,
            compatible_sizes: size_bytes..=size_bytes,
            replica_count,
            thin,
            preferred_node: None,
            preferred_topology: Vec::new(),
            requisite_topology: Vec::new(),
            capabilities: Vec::new(),
            parameters: BTreeMap::new(),
        }
    }

    /// Checks every argument.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name(&self.name)?;
        if self.size_bytes == 0 {
            return Err(Error::InvalidArgument {
                reason: "the size must be greater than 0".to_string(),
            });
        }
        if !self.size_bytes.is_multiple_of(SIZE_ALIGN_BYTES) {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "the size {} is not a multiple of {SIZE_ALIGN_BYTES} bytes",
                    self.size_bytes
                ),
            });
        }
        if self.replica_count == 0 {
            return Err(Error::InvalidArgument {
                reason: "the replica count must be at least 1".to_string(),
            });
        }
        if let Some(node) = &self.preferred_node {
            crate::controller::node::operations::validate_node_id(node)?;
        }
        Ok(())
    }

    /// Where the parameters let replicas go.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad `allowedNodes` or
    /// `replicaTopologyKey`.
    pub fn constraints(&self) -> Result<scheduling::Constraints, Error> {
        scheduling::Constraints::from_parameters(&self.parameters)
            .map_err(|reason| Error::InvalidArgument { reason })
    }

    /// Why `existing`, a volume of the same name, is not the volume this
    /// request asks for (CSI spec, CreateVolume: "Volume already exists
    /// but is incompatible"); empty if it is. The topology requirement is
    /// not compared: a volume is reachable from every node (ADR 0009).
    fn incompatibilities(&self, existing: &VolumeRecord) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.compatible_sizes.contains(&existing.size_bytes) {
            let (low, high) = (*self.compatible_sizes.start(), *self.compatible_sizes.end());
            let wanted = if low == high {
                format!("{low} bytes")
            } else if high == u64::MAX {
                format!("at least {low} bytes")
            } else {
                format!("{low} to {high} bytes")
            };
            reasons.push(format!(
                "its size is {} bytes, not {wanted}",
                existing.size_bytes
            ));
        }
        if existing.replica_count != self.replica_count {
            reasons.push(format!(
                "it has {} replica(s), not {}",
                existing.replica_count, self.replica_count
            ));
        }
        if existing.thin != self.thin {
            reasons.push(if existing.thin {
                "it is thin, not thick".to_string()
            } else {
                "it is thick, not thin".to_string()
            });
        }
        reasons.extend(
            self.capabilities
                .iter()
                .filter_map(|c| existing.supports(c).err()),
        );
        if let Ok(constraints) = self.constraints() {
            for replica in &existing.replicas {
                if !constraints.allows(&replica.node_id) {
                    reasons.push(format!(
                        "its replica on {} is not among {}",
                        replica.node_id,
                        scheduling::ALLOWED_NODES_PARAMETER
                    ));
                }
            }
        }
        reasons
    }
}

impl Volumes {
    /// Creates a volume, or returns it if it exists and is compatible
    /// with the request (idempotent by name).
    ///
    /// # Errors
    ///
    /// [`Error::VolumeMismatch`] if the name exists and is not compatible
    /// (see [`CreateRequest::incompatibilities`]);
    /// [`Error::Placement`] if not enough nodes have room;
    /// [`Error::Deleting`] while a volume of that name is being deleted;
    /// [`Error::Agent`] if a replica cannot be created (everything created
    /// is undone first).
    #[instrument(err, skip(self, request), fields(volume.id = %request.name))]
    pub async fn create(&self, request: &CreateRequest) -> Result<VolumeRecord, Error> {
        request.validate()?;
        let _guard = self.guard(&request.name)?;
        let store = &self.context.store;
        if let Some(existing) = record::read(store, &request.name).await? {
            let existing = existing.value;
            let reasons = request.incompatibilities(&existing);
            if !reasons.is_empty() {
                return Err(Error::VolumeMismatch {
                    volume: request.name.clone(),
                    reasons: reasons.join("; "),
                });
            }
            return match existing.state {
                VolumeState::Ready => Ok(existing),
                VolumeState::Deleting => Err(deleting(&existing)),
                // A create that did not finish (a crash, or an agent that
                // failed and a rollback that waits for a node): finish it.
                VolumeState::Creating => self.finish_create(existing).await,
            };
        }
        let candidates = self.candidates().await?;
        let count = usize::try_from(request.replica_count).unwrap_or(usize::MAX);
        // Data locality (ADR 0009): the preferred segments, else the
        // requisite ones; neither restricts where replicas may go.
        let locality = if request.preferred_topology.is_empty() {
            &request.requisite_topology
        } else {
            &request.preferred_topology
        };
        let nodes = scheduling::place(
            &candidates,
            &scheduling::Request {
                size_bytes: request.size_bytes,
                thin: request.thin,
                count,
                preferred_node: request.preferred_node.as_deref(),
                preferred: locality,
                constraints: &request.constraints()?,
                exclude: &[],
                holders: &[],
            },
        )?;
        let planned = VolumeRecord {
            volume_id: request.name.clone(),
            size_bytes: request.size_bytes,
            replica_count: request.replica_count,
            thin: request.thin,
            epoch: 0,
            state: VolumeState::Creating,
            target: None,
            // Fresh replicas all read as zeros: they are in sync from the
            // start.
            replicas: nodes
                .iter()
                .map(|node| ReplicaRecord {
                    node_id: node.clone(),
                    replica_name: request.name.clone(),
                    state: ReplicaState::InSync,
                    faulted_since_unix_ms: 0,
                    full_rebuild: false,
                })
                .collect(),
            retired: Vec::new(),
            created_unix_ms: now_unix_ms(),
            capabilities: request.capabilities.clone(),
            parameters: request.parameters.clone(),
            requisite_topology: request.requisite_topology.clone(),
            unclean_stop: false,
        };
        record::create(store, &planned).await?;
        info!(nodes = ?nodes, "Volume record created; creating replicas");
        self.finish_create(planned).await
    }

    /// Creates every replica of a `creating` record, then marks it ready;
    /// on failure undoes everything and returns the failure.
    async fn finish_create(&self, planned: VolumeRecord) -> Result<VolumeRecord, Error> {
        for replica in &planned.replicas {
            if let Err(err) = self.create_replica(&planned, &replica.node_id).await {
                warn!(node.id = %replica.node_id, error = %crate::error_chain(&err), "Replica creation failed; undoing the volume");
                if let Err(undo) = self.roll_back_create(&planned.volume_id).await {
                    warn!(error = %crate::error_chain(&undo), "Undoing the volume is not finished; a reconciler completes it");
                }
                return Err(err);
            }
        }
        let ready = record::update(&self.context.store, &planned.volume_id, |r| match r.state {
            VolumeState::Creating => {
                r.state = VolumeState::Ready;
                Ok(Change::Write)
            }
            VolumeState::Ready => Ok(Change::Keep),
            VolumeState::Deleting => Err(deleting(r)),
        })
        .await?
        .ok_or_else(|| not_found(&planned.volume_id))?;
        info!("Volume created");
        Ok(ready.value)
    }

    /// Turns a `creating` record into `deleting` and destroys what exists.
    async fn roll_back_create(&self, volume_id: &str) -> Result<DeleteOutcome, Error> {
        record::update(&self.context.store, volume_id, |r| {
            if r.state == VolumeState::Deleting {
                return Ok::<_, Error>(Change::Keep);
            }
            r.state = VolumeState::Deleting;
            Ok(Change::Write)
        })
        .await?;
        self.finish_delete(volume_id).await
    }

    /// Deletes a volume and its replicas. Idempotent: a missing volume is
    /// not an error. Replicas on nodes that are down are destroyed when
    /// the nodes return (the record stays, in state `deleting`).
    ///
    /// # Errors
    ///
    /// [`Error::Published`] while published; [`Error::Agent`] if an agent
    /// that is up fails to destroy its replica (the record stays
    /// `deleting`; a retry or a reconciler finishes).
    #[instrument(err, skip(self))]
    pub async fn delete(&self, volume_id: &str) -> Result<DeleteOutcome, Error> {
        required("volume_id", volume_id)?;
        let _guard = self.guard(volume_id)?;
        let marked = record::update(&self.context.store, volume_id, |r| {
            if let Some(target) = &r.target {
                return Err(Error::Published {
                    volume: r.volume_id.clone(),
                    node: target.node_id.clone(),
                });
            }
            if r.state == VolumeState::Deleting {
                return Ok(Change::Keep);
            }
            r.state = VolumeState::Deleting;
            Ok(Change::Write)
        })
        .await?;
        if marked.is_none() {
            return Ok(DeleteOutcome::Gone);
        }
        let outcome = self.finish_delete(volume_id).await?;
        match &outcome {
            DeleteOutcome::Gone => info!("Volume deleted"),
            DeleteOutcome::Pending(nodes) => info!(
                nodes = ?nodes,
                "Volume deleted; its replicas on nodes that are down are destroyed when they return"
            ),
        }
        Ok(outcome)
    }

    /// Destroys the replicas of a `deleting` record on every node that is
    /// up, and removes the record once none is left. The caller holds the
    /// volume's guard.
    pub(crate) async fn finish_delete(&self, volume_id: &str) -> Result<DeleteOutcome, Error> {
        let Some(current) = record::read(&self.context.store, volume_id).await? else {
            return Ok(DeleteOutcome::Gone);
        };
        let volume = &current.value;
        let replicas = volume
            .replicas
            .iter()
            .map(|r| (&r.node_id, &r.replica_name))
            .chain(volume.retired.iter().map(|r| (&r.node_id, &r.replica_name)));
        let mut pending = Vec::new();
        let mut failure = None;
        for (node, name) in replicas {
            match self.destroy_replica(node, name).await {
                Ok(()) => {}
                Err(Error::NodeDown { .. } | Error::NodeNotFound { .. }) => {
                    pending.push(node.clone());
                }
                Err(Error::Agent(err)) if err.is_unreachable() => pending.push(node.clone()),
                Err(err) => {
                    warn!(node.id = %node, error = %crate::error_chain(&err), "Cannot destroy replica");
                    failure.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if !pending.is_empty() {
            return Ok(DeleteOutcome::Pending(pending));
        }
        record::remove(&self.context.store, volume_id, current.revision).await?;
        self.context.rebuilds.clear_volume(volume_id);
        Ok(DeleteOutcome::Gone)
    }

    /// Publishes a volume on a node: raises the epoch, starts the target
    /// there and returns its NBD socket. Idempotent for the node it is
    /// published on (while that target runs).
    ///
    /// # Errors
    ///
    /// [`Error::PublishedElsewhere`] if published on another node and
    /// `force` is not set; [`Error::NodeDown`]; [`Error::Agent`] if the
    /// target does not start (the volume is then not published).
    pub async fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        force: bool,
    ) -> Result<Publication, Error> {
        self.publish_as(volume_id, node_id, force, None).await
    }

    /// Publishes a volume on a node for `capability` (CSI
    /// ControllerPublishVolume), never moving it: as [`Volumes::publish`]
    /// without force, and the capability is recorded with the target.
    ///
    /// # Errors
    ///
    /// As [`Volumes::publish`]; [`Error::InvalidArgument`] if the volume
    /// was not created for the capability's access type;
    /// [`Error::PublishedIncompatible`] if it is published on the node
    /// with another capability.
    pub async fn publish_with(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &CapabilityRecord,
    ) -> Result<Publication, Error> {
        self.publish_as(volume_id, node_id, false, Some(capability))
            .await
    }

    #[instrument(err, skip(self, capability), fields(volume.id = %volume_id, node.id = %node_id, epoch = tracing::field::Empty))]
    async fn publish_as(
        &self,
        volume_id: &str,
        node_id: &str,
        force: bool,
        capability: Option<&CapabilityRecord>,
    ) -> Result<Publication, Error> {
        required("volume_id", volume_id)?;
        required("node_id", node_id)?;
        let _guard = self.guard(volume_id)?;
        let store = &self.context.store;
        let current = record::read(store, volume_id)
            .await?
            .ok_or_else(|| not_found(volume_id))?
            .value;
        if let Some(capability) = capability {
            current
                .supports(capability)
                .map_err(|reason| Error::InvalidArgument { reason })?;
        }
        check_publishable(&current)?;
        let node = self.up_node(node_id).await?;
        let previous = current.target.clone();
        if let Some(target) = &previous {
            if target.node_id == node_id {
                if let (Some(existing), Some(requested)) = (&target.capability, capability)
                    && existing != requested
                {
                    return Err(Error::PublishedIncompatible {
                        volume: volume_id.to_string(),
                        node: node_id.to_string(),
                        existing: existing.to_string(),
                        requested: requested.to_string(),
                    });
                }
                if let Some(publication) = self.running_target(&current, &node).await? {
                    // A publish interrupted after the target started (a
                    // crash) left the socket unrecorded: record it now.
                    if target.nbd_uri != publication.nbd_uri
                        || target.socket_path != publication.socket_path
                    {
                        self.record_socket(volume_id, node_id, &publication).await?;
                    }
                    return Ok(publication);
                }
                info!("The target is not running at the volume's epoch; starting it again");
            } else if !force {
                return Err(Error::PublishedElsewhere {
                    volume: volume_id.to_string(),
                    node: target.node_id.clone(),
                    requested: node_id.to_string(),
                });
            }
        }
        // Commit the new epoch and the target's node before the target
        // starts: no replica may see an epoch the store does not hold.
        let nodes = &self.context.nodes;
        let raised = record::update(store, volume_id, |r| {
            check_publishable(r)?;
            r.epoch += 1;
            // A target is still recorded (it died, or is being moved while
            // it runs) or went away uncleanly: its unacknowledged writes
            // may sit on some in-sync replicas only.
            if r.target.is_some() || r.unclean_stop {
                let faulted = r.resync_from_one(
                    node_id,
                    |n| nodes.state(n) == node::NodeState::Up,
                    now_unix_ms(),
                );
                if !faulted.is_empty() {
                    info!(faulted = ?faulted, "The previous target stopped uncleanly; these replicas are rebuilt from one in-sync replica");
                }
            }
            // A restart on the same node without a capability (the
            // management API) keeps the one CSI published with.
            let kept = r
                .target
                .as_ref()
                .filter(|t| t.node_id == node_id)
                .and_then(|t| t.capability.clone());
            r.target = Some(TargetRecord {
                node_id: node_id.to_string(),
                socket_path: String::new(),
                nbd_uri: String::new(),
                capability: capability.cloned().or(kept),
            });
            Ok::<_, Error>(Change::Write)
        })
        .await?
        .ok_or_else(|| not_found(volume_id))?
        .value;
        let epoch = raised.epoch;
        tracing::Span::current().record("epoch", epoch);
        info!("Epoch raised; starting the target");
        let started = self.start_target(&raised, &node).await;
        if let Some(old) = previous.filter(|t| t.node_id != node_id) {
            // Forced move: the old target is fenced by the new epoch as
            // soon as the new target reaches the replicas; stopping it is
            // a courtesy that may fail if its node is gone.
            if let Err(err) = self.stop_target(&old.node_id, volume_id).await {
                warn!(old.node = %old.node_id, error = %crate::error_chain(&err), "Cannot stop the old target; the new epoch fences it");
            }
        }
        let target = match started {
            Ok(target) => target,
            Err(err) => {
                if let Err(stop) = self.stop_target(node_id, volume_id).await {
                    warn!(error = %crate::error_chain(&stop), "Cannot stop the target that failed to start");
                }
                record::update(store, volume_id, |r| {
                    if r.epoch != epoch
                        || r.target.as_ref().map(|t| t.node_id.as_str()) != Some(node_id)
                    {
                        return Ok::<_, Error>(Change::Keep);
                    }
                    r.target = None;
                    Ok(Change::Write)
                })
                .await?;
                return Err(err);
            }
        };
        let publication = Publication {
            nbd_uri: target.nbd_uri.clone(),
            socket_path: target.socket_path.clone(),
            epoch,
        };
        self.record_socket(volume_id, node_id, &publication).await?;
        info!(uri = %publication.nbd_uri, "Volume published");
        Ok(publication)
    }

    /// Records the socket and URI of the target that runs on `node_id` at
    /// `publication.epoch`, unless the record moved on meanwhile.
    async fn record_socket(
        &self,
        volume_id: &str,
        node_id: &str,
        publication: &Publication,
    ) -> Result<(), Error> {
        record::update(&self.context.store, volume_id, |r| {
            match &mut r.target {
                Some(t) if r.epoch == publication.epoch && t.node_id == node_id => {
                    if t.socket_path == publication.socket_path && t.nbd_uri == publication.nbd_uri
                    {
                        return Ok::<_, Error>(Change::Keep);
                    }
                    t.socket_path = publication.socket_path.clone();
                    t.nbd_uri = publication.nbd_uri.clone();
                    Ok(Change::Write)
                }
                // Changed meanwhile (a newer publish): leave it.
                _ => Ok(Change::Keep),
            }
        })
        .await?;
        Ok(())
    }

    /// The publication of the target on `node` if it runs at the volume's
    /// epoch and serves; `None` if it is gone (e.g. its agent restarted)
    /// or stale.
    async fn running_target(
        &self,
        volume: &VolumeRecord,
        node: &NodeView,
    ) -> Result<Option<Publication>, Error> {
        let Some(target) = self.get_target(node, &volume.volume_id).await? else {
            return Ok(None);
        };
        if target.epoch != volume.epoch || !target.serving {
            return Ok(None);
        }
        Ok(Some(Publication {
            nbd_uri: target.nbd_uri,
            socket_path: target.socket_path,
            epoch: target.epoch,
        }))
    }

    /// Unpublishes a volume: stops its target and clears it from the
    /// record. Idempotent. If the target's node is down, the target cannot
    /// be stopped; the next publish's epoch fences it.
    ///
    /// # Errors
    ///
    /// [`Error::VolumeNotFound`]; [`Error::Agent`] if the target's agent is
    /// up and fails to stop it.
    pub async fn unpublish(&self, volume_id: &str) -> Result<(), Error> {
        self.unpublish_from(volume_id, None).await
    }

    /// Unpublishes a volume if it is published on `node_id` (on any node
    /// when `None`); a volume published elsewhere is left alone. The check
    /// and the unpublish happen under the volume's guard, so a publish
    /// cannot slip in between (CSI ControllerUnpublishVolume names the
    /// node it unpublishes from).
    ///
    /// # Errors
    ///
    /// As [`Volumes::unpublish`].
    #[instrument(err, skip(self))]
    pub async fn unpublish_from(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
    ) -> Result<(), Error> {
        required("volume_id", volume_id)?;
        let _guard = self.guard(volume_id)?;
        let store = &self.context.store;
        let current = record::read(store, volume_id)
            .await?
            .ok_or_else(|| not_found(volume_id))?
            .value;
        let Some(target) = current.target else {
            return Ok(());
        };
        if node_id.is_some_and(|node| node != target.node_id) {
            return Ok(());
        }
        let unclean = match self.stop_target(&target.node_id, volume_id).await {
            Ok(()) => false,
            Err(err @ (Error::NodeDown { .. } | Error::NodeNotFound { .. })) => {
                warn!(node.id = %target.node_id, error = %err, "Target's node is unreachable; the next publish's epoch fences it and resynchronises the replicas");
                true
            }
            Err(Error::Agent(err)) if err.is_unreachable() => {
                warn!(node.id = %target.node_id, error = %err, "Target's agent is unreachable; the next publish's epoch fences it and resynchronises the replicas");
                true
            }
            Err(err) => return Err(err),
        };
        record::update(store, volume_id, |r| {
            if r.target.as_ref().map(|t| &t.node_id) != Some(&target.node_id) {
                return Ok::<_, Error>(Change::Keep);
            }
            r.target = None;
            r.unclean_stop |= unclean;
            Ok(Change::Write)
        })
        .await?;
        info!(node.id = %target.node_id, "Volume unpublished");
        Ok(())
    }

    /// One volume.
    ///
    /// # Errors
    ///
    /// [`Error::VolumeNotFound`].
    pub async fn get(&self, volume_id: &str) -> Result<VolumeRecord, Error> {
        required("volume_id", volume_id)?;
        Ok(record::read(&self.context.store, volume_id)
            .await?
            .ok_or_else(|| not_found(volume_id))?
            .value)
    }

    /// Every volume, sorted by id.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn list(&self) -> Result<Vec<VolumeRecord>, Error> {
        Ok(record::list(&self.context.store).await?)
    }

    // ---- building blocks, shared with the reconcilers ----

    /// Takes the volume's operation guard.
    pub(crate) fn guard(&self, volume_id: &str) -> Result<OpGuard, Error> {
        self.context
            .guards
            .try_acquire(volume_id)
            .ok_or_else(|| Error::Busy {
                volume: volume_id.to_string(),
            })
    }

    /// Every registered node as placement sees it.
    pub(crate) async fn candidates(&self) -> Result<Vec<Candidate>, Error> {
        Ok(self
            .context
            .nodes
            .list()
            .await?
            .into_iter()
            .map(|view| Candidate {
                up: view.is_up(),
                node_id: view.record.node_id,
                topology: view.record.topology,
                pools: view.pools,
            })
            .collect())
    }

    /// A registered node.
    pub(crate) async fn node(&self, node_id: &str) -> Result<NodeView, Error> {
        self.context
            .nodes
            .get(node_id)
            .await?
            .ok_or_else(|| Error::NodeNotFound {
                node: node_id.to_string(),
            })
    }

    /// A registered node that is up.
    pub(crate) async fn up_node(&self, node_id: &str) -> Result<NodeView, Error> {
        let node = self.node(node_id).await?;
        if !node.is_up() {
            return Err(Error::NodeDown {
                node: node_id.to_string(),
            });
        }
        Ok(node)
    }

    /// Creates (idempotently) the replica of `volume` on `node_id`.
    pub(crate) async fn create_replica(
        &self,
        volume: &VolumeRecord,
        node_id: &str,
    ) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.replicas(&node.record.agent_address)?;
        let replica = client
            .create_replica(agent_pb::CreateReplicaRequest {
                name: volume.volume_id.clone(),
                size_bytes: volume.size_bytes,
                thin: volume.thin,
                pool: String::new(),
                volume_id: volume.volume_id.clone(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    node_id,
                    format!("Creating replica {}", volume.volume_id),
                    status,
                )
            })?
            .into_inner();
        self.context
            .nodes
            .note_provisioned(node_id, &replica.pool, volume.size_bytes, volume.thin);
        info!(node.id = %node_id, pool = %replica.pool, "Replica created");
        Ok(())
    }

    /// Destroys replica `name` on `node_id`; a missing replica is fine.
    pub(crate) async fn destroy_replica(&self, node_id: &str, name: &str) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.replicas(&node.record.agent_address)?;
        client
            .destroy_replica(agent_pb::DestroyReplicaRequest {
                name: name.to_string(),
            })
            .await
            .map_err(|status| {
                AgentError::new(node_id, format!("Destroying replica {name}"), status)
            })?;
        info!(node.id = %node_id, replica.id = %name, "Replica destroyed");
        Ok(())
    }

    /// Starts the target of `volume` (at its current epoch) on `node`.
    pub(crate) async fn start_target(
        &self,
        volume: &VolumeRecord,
        node: &NodeView,
    ) -> Result<agent_pb::Target, Error> {
        let replicas = self.target_replicas(volume).await?;
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        Ok(client
            .start_target(agent_pb::StartTargetRequest {
                volume_id: volume.volume_id.clone(),
                epoch: volume.epoch,
                size_bytes: volume.size_bytes,
                // The agent picks the socket under its state directory.
                socket_path: String::new(),
                replicas,
                controller_address: self.context.config.advertise_address.clone(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    &node.record.node_id,
                    format!("Starting the target of volume {}", volume.volume_id),
                    status,
                )
            })?
            .into_inner())
    }

    /// The replicas of `volume` as a target needs them: with their nodes'
    /// data addresses and in-sync flags.
    pub(crate) async fn target_replicas(
        &self,
        volume: &VolumeRecord,
    ) -> Result<Vec<agent_pb::TargetReplica>, Error> {
        let nodes = self.context.nodes.list().await?;
        Ok(volume
            .replicas
            .iter()
            .map(|r| {
                let data_address = nodes
                    .iter()
                    .find(|n| n.record.node_id == r.node_id)
                    .map(|n| n.record.data_address.clone())
                    .unwrap_or_default();
                agent_pb::TargetReplica {
                    node_id: r.node_id.clone(),
                    replica_name: r.replica_name.clone(),
                    data_address,
                    in_sync: r.state == ReplicaState::InSync,
                    state: r.state.as_str().to_string(),
                    rebuild_done_bytes: 0,
                    rebuild_total_bytes: 0,
                }
            })
            .collect())
    }

    /// Stops the volume's target on `node_id` (idempotent on the agent).
    pub(crate) async fn stop_target(&self, node_id: &str, volume_id: &str) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        match client
            .stop_target(agent_pb::StopTargetRequest {
                volume_id: volume_id.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(AgentError::new(
                node_id,
                format!("Stopping the target of volume {volume_id}"),
                status,
            )
            .into()),
        }
    }

    /// The volume's target on `node`, `None` if it runs none.
    pub(crate) async fn get_target(
        &self,
        node: &NodeView,
        volume_id: &str,
    ) -> Result<Option<agent_pb::Target>, Error> {
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        match client
            .get_target(agent_pb::GetTargetRequest {
                volume_id: volume_id.to_string(),
            })
            .await
        {
            Ok(target) => Ok(Some(target.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(AgentError::new(
                &node.record.node_id,
                format!("Reading the target of volume {volume_id}"),
                status,
            )
            .into()),
        }
    }
}

fn check_publishable(volume: &VolumeRecord) -> Result<(), Error> {
    match volume.state {
        VolumeState::Ready => Ok(()),
        VolumeState::Creating => Err(Error::Creating {
            volume: volume.volume_id.clone(),
        }),
        VolumeState::Deleting => Err(deleting(volume)),
    }
}

fn deleting(volume: &VolumeRecord) -> Error {
    let nodes: Vec<&str> = volume
        .replicas
        .iter()
        .map(|r| r.node_id.as_str())
        .chain(volume.retired.iter().map(|r| r.node_id.as_str()))
        .collect();
    Error::Deleting {
        volume: volume.volume_id.clone(),
        pending: if nodes.is_empty() {
            String::new()
        } else {
            format!(" (replicas remain on {})", nodes.join(", "))
        },
    }
}

pub(crate) fn not_found(volume_id: &str) -> Error {
    Error::VolumeNotFound {
        volume: volume_id.to_string(),
    }
}
