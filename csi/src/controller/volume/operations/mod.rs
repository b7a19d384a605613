//! What the volume resource does: create, delete, get and list here,
//! publish and unpublish in `publish`, and the agent calls they are made
//! of (shared with the reconcilers) in `agent_calls`.
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
    self, CapabilityRecord, Change, ContentSource, ReplicaRecord, ReplicaState, TargetRecord,
    VolumeRecord, VolumeState,
};
use super::scheduling::{self, Candidate};
use super::{Error, Volumes};
use crate::controller::agents::AgentError;
use crate::controller::node::{self, NodeView, Topology};
use crate::controller::now_unix_ms;
use ballast_storage_node::guard::OpGuard;

mod agent_calls;
mod publish;
mod restore;

pub use publish::Publication;
pub use restore::Source;

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
    /// Size in bytes, a positive multiple of [`SIZE_ALIGN_BYTES`]; 0 with a
    /// `source` means the source's size. A source larger than this grows
    /// the volume to the source's size if `compatible_sizes` allows it.
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
    /// What the volume starts with (CSI `volume_content_source`); `None`
    /// for an empty volume.
    pub source: Option<Source>,
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
    /// A request for exactly `size_bytes` (any size when 0: a restore's
    /// source size), with no topology, capabilities or parameters (the
    /// management API's).
    pub fn new(name: &str, size_bytes: u64, replica_count: u32, thin: bool) -> Self {
        Self {
            name: name.to_string(),
            size_bytes,
            compatible_sizes: if size_bytes == 0 {
                0..=u64::MAX
            } else {
                size_bytes..=size_bytes
            },
            replica_count,
            thin,
            preferred_node: None,
            preferred_topology: Vec::new(),
            requisite_topology: Vec::new(),
            capabilities: Vec::new(),
            parameters: BTreeMap::new(),
            source: None,
        }
    }

    /// Checks every argument.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        validate_name(&self.name)?;
        if self.size_bytes == 0 && self.source.is_none() {
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
        match &self.source {
            Some(source) if !source.matches(existing.content_source.as_ref()) => {
                reasons.push(match &existing.content_source {
                    Some(theirs) => format!(
                        "it was created from {}, not {}",
                        theirs.describe(),
                        source.describe()
                    ),
                    None => format!("it was created empty, not from {}", source.describe()),
                });
            }
            None if existing.content_source.is_some() => reasons.push(format!(
                "it was created from {}",
                existing
                    .content_source
                    .as_ref()
                    .map(ContentSource::describe)
                    .unwrap_or_default()
            )),
            _ => {}
        }
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
        let restore = match &request.source {
            Some(source) => Some(self.resolve_source(&request.name, source).await?),
            None => None,
        };
        let size_bytes = match &restore {
            Some(restore) if restore.snapshot.size_bytes > request.size_bytes => {
                let needed = restore.snapshot.size_bytes;
                if request.size_bytes > 0 && !request.compatible_sizes.contains(&needed) {
                    return Err(Error::SourceTooLarge {
                        source_name: restore.content_source.describe(),
                        source_bytes: needed,
                        limit_bytes: *request.compatible_sizes.end(),
                    });
                }
                needed
            }
            _ => request.size_bytes,
        };
        let candidates = self.candidates().await?;
        let count = usize::try_from(request.replica_count).unwrap_or(usize::MAX);
        // Data locality (ADR 0009): the preferred segments, else the
        // requisite ones; neither restricts where replicas may go.
        let locality = if request.preferred_topology.is_empty() {
            &request.requisite_topology
        } else {
            &request.preferred_topology
        };
        let constraints = request.constraints()?;
        let placement = scheduling::Request {
            size_bytes,
            thin: request.thin,
            count,
            preferred_node: request.preferred_node.as_deref(),
            preferred: locality,
            constraints: &constraints,
            exclude: &[],
            holders: &[],
        };
        let (replicas, content_source, unclean_stop) = match restore {
            None => {
                // Fresh replicas all read as zeros: they are in sync from
                // the start.
                let nodes = scheduling::place(&candidates, &placement)?;
                (
                    restore::restored_replicas(&request.name, &nodes, &[]),
                    None,
                    false,
                )
            }
            Some(restore) => {
                let placed = self.place_restore(&candidates, &restore.snapshot, &placement);
                let (restored, others) = match placed {
                    Ok(placed) => placed,
                    Err(err) => {
                        self.drop_clone_snapshot(&restore.content_source).await;
                        return Err(err);
                    }
                };
                (
                    restore::restored_replicas(&request.name, &restored, &others),
                    Some(restore.content_source),
                    restore.snapshot.unclean,
                )
            }
        };
        let nodes: Vec<String> = replicas.iter().map(|r| r.node_id.clone()).collect();
        let planned = VolumeRecord {
            volume_id: request.name.clone(),
            size_bytes,
            replica_count: request.replica_count,
            thin: request.thin,
            epoch: 0,
            state: VolumeState::Creating,
            target: None,
            replicas,
            retired: Vec::new(),
            created_unix_ms: now_unix_ms(),
            capabilities: request.capabilities.clone(),
            parameters: request.parameters.clone(),
            requisite_topology: request.requisite_topology.clone(),
            unclean_stop,
            content_source,
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
        if let Some(source) = &ready.value.content_source {
            self.drop_clone_snapshot(source).await;
        }
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
