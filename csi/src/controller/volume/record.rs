//! The volume record: one JSON value per volume at `/ballast/volumes/<id>`,
//! and the only ways to change it.
//!
//! The record holds everything safety depends on: the epoch, the target's
//! node, and each replica's membership of the in-sync set. It is written
//! only by [`create`] (the key must be absent), [`update`] (a
//! compare-and-set on the revision the change was computed from, retried
//! from a fresh read on conflict) and [`remove`] (also compare-and-set).
//! No code may write a volume key any other way.
//!
//! Fields added later must be `#[serde(default)]` so records written by an
//! older controller still load.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::controller::node::Topology;
use crate::store::{self, ClusterStore, ClusterStoreExt, Expect, Versioned, keys};

/// Most attempts of one compare-and-set before giving up with the
/// conflict (each attempt re-reads the record).
const MAX_CAS_ATTEMPTS: usize = 16;

/// Life cycle of a volume record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// The record exists and its replicas are being created. A record left
    /// in this state by a crashed controller is rolled back by a
    /// reconciler (or finished by a retried CreateVolume).
    Creating,
    /// Every replica was created; the volume may be published.
    Ready,
    /// The volume is being deleted; replicas on nodes that are down are
    /// destroyed when they return, then the record goes.
    Deleting,
}

impl VolumeState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Deleting => "deleting",
        }
    }
}

/// A replica's membership of the in-sync set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Holds every acknowledged write; may serve reads and seed rebuilds.
    InSync,
    /// Dropped from the in-sync set; waits for its node to return (then it
    /// is rebuilt) or to be replaced.
    Faulted,
    /// A target is rebuilding it; takes writes, serves no reads.
    Rebuilding,
}

impl ReplicaState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::Faulted => "faulted",
            ReplicaState::Rebuilding => "rebuilding",
        }
    }
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// Node holding it.
    pub node_id: String,
    /// Its name on that node's agent (the volume id).
    pub replica_name: String,
    /// In-sync set membership.
    pub state: ReplicaState,
    /// When it left the in-sync set (Unix ms), 0 while in sync.
    #[serde(default)]
    pub faulted_since_unix_ms: i64,
    /// True for a replacement replica: it holds no data yet and needs a
    /// full copy, not a delta.
    #[serde(default)]
    pub full_rebuild: bool,
}

/// One way to use a volume (CSI `VolumeCapability`) as CreateVolume or
/// ControllerPublishVolume asked for it, with the filesystem resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityRecord {
    /// The access mode as the CSI spec spells it (`SINGLE_NODE_WRITER`).
    pub access_mode: String,
    /// The filesystem of mount access (`ext4`, `xfs`); `None` for block
    /// access.
    pub fs_type: Option<String>,
}

impl CapabilityRecord {
    /// The access type for people: "block" or "mount (ext4)".
    pub fn access_type(&self) -> String {
        match &self.fs_type {
            None => "block".to_string(),
            Some(fs) => format!("mount ({fs})"),
        }
    }
}

impl std::fmt::Display for CapabilityRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.access_mode, self.access_type())
    }
}

/// Where a volume is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRecord {
    /// Node whose agent runs the target.
    pub node_id: String,
    /// The target's NBD unix socket; empty while it is being started.
    #[serde(default)]
    pub socket_path: String,
    /// The target's NBD URI; empty while it is being started.
    #[serde(default)]
    pub nbd_uri: String,
    /// The capability ControllerPublishVolume published it with; `None`
    /// when published through the management API, which any capability
    /// may then reuse.
    #[serde(default)]
    pub capability: Option<CapabilityRecord>,
}

/// A replica that is no longer part of the volume but still exists on a
/// node that was down when it was replaced; destroyed when the node is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredReplica {
    /// Node holding it.
    pub node_id: String,
    /// Its name on that node.
    pub replica_name: String,
}

/// A volume as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume id, which is also its name and its replicas' name.
    pub volume_id: String,
    /// Size in bytes, a multiple of 4096.
    pub size_bytes: u64,
    /// Number of replicas, each on a distinct node.
    pub replica_count: u32,
    /// Sparse replicas.
    pub thin: bool,
    /// Raised by every publish; targets carry it on every request.
    pub epoch: u64,
    /// Life cycle state.
    pub state: VolumeState,
    /// The target, while published.
    #[serde(default)]
    pub target: Option<TargetRecord>,
    /// The replicas, one per node.
    pub replicas: Vec<ReplicaRecord>,
    /// Replaced replicas still to destroy.
    #[serde(default)]
    pub retired: Vec<RetiredReplica>,
    /// When the volume was created (Unix ms).
    pub created_unix_ms: i64,
    /// The capabilities CreateVolume asked for (CSI
    /// `volume_capabilities`), which decide what the volume may be used
    /// as later. Empty for a volume created through the management API
    /// or by an older controller: any supported capability may use it.
    #[serde(default)]
    pub capabilities: Vec<CapabilityRecord>,
    /// The StorageClass parameters CreateVolume was given (CSI
    /// `parameters`) without the external-provisioner's
    /// `csi.storage.k8s.io/` keys, as given: what a restore or clone of
    /// the volume must be compared with, and what operators read.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// The requisite topology CreateVolume was given (CSI
    /// `accessibility_requirements.requisite`), as given, for people: a
    /// volume is accessible from every node, so it restricts no replica
    /// (ADR 0009).
    #[serde(default)]
    pub requisite_topology: Vec<Topology>,
    /// The last target went away without confirming that it finished its
    /// writes (its node was unreachable when the volume was unpublished):
    /// the in-sync replicas may differ in writes it never acknowledged,
    /// so the next publish resynchronises them (see
    /// [`VolumeRecord::resync_from_one`]).
    #[serde(default)]
    pub unclean_stop: bool,
    /// What the volume was created from (CSI `volume_content_source`);
    /// `None` for a volume created empty.
    #[serde(default)]
    pub content_source: Option<ContentSource>,
}

/// What a volume was created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentSource {
    /// The snapshot whose copies its first replicas are restored from; for
    /// a clone, the clone's internal snapshot of the source volume.
    pub snapshot_id: String,
    /// For a clone: the volume cloned.
    #[serde(default)]
    pub volume_id: Option<String>,
}

impl ContentSource {
    /// "snapshot S" or "volume V", for people.
    pub fn describe(&self) -> String {
        match &self.volume_id {
            Some(volume) => format!("volume {volume}"),
            None => format!("snapshot {}", self.snapshot_id),
        }
    }
}

impl VolumeRecord {
    /// The replica on `node_id`.
    pub fn replica(&self, node_id: &str) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.node_id == node_id)
    }

    /// The replica on `node_id`, for changing it.
    pub fn replica_mut(&mut self, node_id: &str) -> Option<&mut ReplicaRecord> {
        self.replicas.iter_mut().find(|r| r.node_id == node_id)
    }

    /// Keeps one in-sync replica and faults the other in-sync ones, for a
    /// new target after one that stopped uncleanly (its node died, or it
    /// was moved while running).
    ///
    /// Why: an old target's write that it never acknowledged may have
    /// reached some in-sync replicas and not others. Every in-sync replica
    /// holds every acknowledged write, so any one is a correct source, but
    /// reads spread over replicas that differ could return a block's old
    /// contents after its new ones. The faulted replicas are rebuilt from
    /// the kept one by comparing region hashes (a new target has no
    /// dirty-region log), which makes them byte-identical again.
    ///
    /// The kept replica is the one on `target_node` if it is in sync, else
    /// the first in-sync one on a node for which `is_up` holds, else the
    /// first in-sync one. Returns the nodes whose replicas were faulted.
    pub fn resync_from_one(
        &mut self,
        target_node: &str,
        is_up: impl Fn(&str) -> bool,
        now_unix_ms: i64,
    ) -> Vec<String> {
        let in_sync = |r: &&ReplicaRecord| r.state == ReplicaState::InSync;
        let source = self
            .replicas
            .iter()
            .filter(in_sync)
            .find(|r| r.node_id == target_node)
            .or_else(|| {
                self.replicas
                    .iter()
                    .filter(in_sync)
                    .find(|r| is_up(&r.node_id))
            })
            .or_else(|| self.replicas.iter().find(in_sync))
            .map(|r| r.node_id.clone());
        let Some(source) = source else {
            return Vec::new();
        };
        let mut faulted = Vec::new();
        for replica in &mut self.replicas {
            if replica.state == ReplicaState::InSync && replica.node_id != source {
                replica.state = ReplicaState::Faulted;
                replica.faulted_since_unix_ms = now_unix_ms;
                faulted.push(replica.node_id.clone());
            }
        }
        self.unclean_stop = false;
        faulted
    }

    /// Number of in-sync replicas.
    pub fn in_sync_count(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .count()
    }

    /// True if every replica is in sync and none is missing.
    pub fn is_healthy(&self) -> bool {
        self.in_sync_count() == self.replicas.len()
            && self.replicas.len() >= usize::try_from(self.replica_count).unwrap_or(usize::MAX)
    }

    /// The filesystem a mount of the volume holds, `None` if it was not
    /// created for mount access.
    pub fn fs_type(&self) -> Option<&str> {
        self.capabilities.iter().find_map(|c| c.fs_type.as_deref())
    }

    /// Whether `capability` may use the volume: its access type (block,
    /// or mount with the same filesystem) must be one CreateVolume asked
    /// for. Access modes are not compared: any supported one works on any
    /// volume, which one target on one node serves. A volume with no
    /// recorded capabilities accepts every one.
    ///
    /// # Errors
    ///
    /// Why not, for people.
    pub fn supports(&self, capability: &CapabilityRecord) -> Result<(), String> {
        if self.capabilities.is_empty()
            || self
                .capabilities
                .iter()
                .any(|c| c.fs_type == capability.fs_type)
        {
            return Ok(());
        }
        let mut created_for: Vec<String> = self
            .capabilities
            .iter()
            .map(CapabilityRecord::access_type)
            .collect();
        created_for.dedup();
        Err(format!(
            "volume {} was created for {} access, not {}",
            self.volume_id,
            created_for.join(" and "),
            capability.access_type()
        ))
    }

    /// Nodes that hold or held a replica of the volume and still may have
    /// its file: the replicas' nodes and the retired ones. A new replica
    /// must go elsewhere (replica files are named by the volume id).
    pub fn occupied_nodes(&self) -> Vec<String> {
        self.replicas
            .iter()
            .map(|r| r.node_id.clone())
            .chain(self.retired.iter().map(|r| r.node_id.clone()))
            .collect()
    }
}

/// What a change closure decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Write the changed record.
    Write,
    /// Leave the record as it is (already in the wanted state).
    Keep,
}

/// Reads volume `volume_id`.
///
/// # Errors
///
/// The store's error.
pub async fn read(
    store: &Arc<dyn ClusterStore>,
    volume_id: &str,
) -> Result<Option<Versioned<VolumeRecord>>, store::Error> {
    store.get_json(&keys::volume(volume_id)).await
}

/// Reads every volume, sorted by id.
///
/// # Errors
///
/// The store's error.
pub async fn list(store: &Arc<dyn ClusterStore>) -> Result<Vec<VolumeRecord>, store::Error> {
    Ok(store
        .list_json::<VolumeRecord>(keys::VOLUMES)
        .await?
        .into_iter()
        .map(|(_, versioned)| versioned.value)
        .collect())
}

/// Writes a new record; the key must be absent.
///
/// # Errors
///
/// `store::Error::Conflict` if the volume exists.
pub async fn create(
    store: &Arc<dyn ClusterStore>,
    record: &VolumeRecord,
) -> Result<Versioned<VolumeRecord>, store::Error> {
    let revision = store
        .compare_and_put_json(&keys::volume(&record.volume_id), record, Expect::Absent)
        .await?;
    Ok(Versioned {
        value: record.clone(),
        revision,
    })
}

/// Applies `change` to the current record and writes it with a
/// compare-and-set; on conflict, re-reads and applies `change` again.
/// Returns the record as written (or as read, when `change` kept it), or
/// `None` if the volume does not exist.
///
/// `change` may run several times, each time on a fresh copy; it must
/// decide only from the record it is given.
///
/// # Errors
///
/// The first error `change` returns (nothing is written), the store's
/// error, or the last conflict after [`MAX_CAS_ATTEMPTS`] attempts.
pub async fn update<E: From<store::Error>>(
    store: &Arc<dyn ClusterStore>,
    volume_id: &str,
    mut change: impl FnMut(&mut VolumeRecord) -> Result<Change, E>,
) -> Result<Option<Versioned<VolumeRecord>>, E> {
    let key = keys::volume(volume_id);
    let mut last_conflict = None;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let Some(mut versioned) = store.get_json::<VolumeRecord>(&key).await? else {
            return Ok(None);
        };
        match change(&mut versioned.value)? {
            Change::Keep => return Ok(Some(versioned)),
            Change::Write => {}
        }
        match store
            .compare_and_put_json(&key, &versioned.value, Expect::Revision(versioned.revision))
            .await
        {
            Ok(revision) => {
                versioned.revision = revision;
                return Ok(Some(versioned));
            }
            Err(conflict @ store::Error::Conflict { .. }) => last_conflict = Some(conflict),
            Err(err) => return Err(err.into()),
        }
    }
    Err(last_conflict
        .unwrap_or_else(|| store::Error::InvalidRequest("no compare-and-set attempt".into()))
        .into())
}

/// Deletes the record if it is still at `revision`.
///
/// # Errors
///
/// `store::Error::Conflict` if it changed since.
pub async fn remove(
    store: &Arc<dyn ClusterStore>,
    volume_id: &str,
    revision: u64,
) -> Result<(), store::Error> {
    store
        .compare_and_delete(&keys::volume(volume_id), Expect::Revision(revision))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    fn record() -> VolumeRecord {
        VolumeRecord {
            volume_id: "v1".into(),
            size_bytes: 4096,
            replica_count: 1,
            thin: true,
            epoch: 0,
            state: VolumeState::Ready,
            target: None,
            replicas: vec![ReplicaRecord {
                node_id: "n1".into(),
                replica_name: "v1".into(),
                state: ReplicaState::InSync,
                faulted_since_unix_ms: 0,
                full_rebuild: false,
            }],
            retired: Vec::new(),
            created_unix_ms: 1,
            capabilities: Vec::new(),
            parameters: BTreeMap::new(),
            requisite_topology: Vec::new(),
            unclean_stop: false,
            content_source: None,
        }
    }

    fn three_in_sync() -> VolumeRecord {
        let mut r = record();
        r.replicas = ["n1", "n2", "n3"]
            .iter()
            .map(|n| ReplicaRecord {
                node_id: n.to_string(),
                replica_name: "v1".into(),
                state: ReplicaState::InSync,
                faulted_since_unix_ms: 0,
                full_rebuild: false,
            })
            .collect();
        r.unclean_stop = true;
        r
    }

    fn in_sync_nodes(r: &VolumeRecord) -> Vec<&str> {
        r.replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync)
            .map(|r| r.node_id.as_str())
            .collect()
    }

    #[test]
    fn a_resync_keeps_the_new_targets_replica_and_faults_the_others() {
        let mut r = three_in_sync();
        assert_eq!(r.resync_from_one("n2", |_| true, 7), ["n1", "n3"]);
        assert_eq!(in_sync_nodes(&r), ["n2"]);
        assert!(
            r.replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Faulted)
                .all(|r| r.faulted_since_unix_ms == 7)
        );
        assert!(!r.unclean_stop);
    }

    #[test]
    fn a_resync_keeps_a_replica_on_an_up_node_when_the_target_has_none() {
        let mut r = three_in_sync();
        // The target's node holds no replica and n1 (the dead old target's
        // node) is down: the kept copy must be one the target can reach.
        assert_eq!(r.resync_from_one("n4", |n| n != "n1", 1), ["n1", "n3"]);
        assert_eq!(in_sync_nodes(&r), ["n2"]);
        // Nothing up at all: still exactly one in-sync replica is kept.
        let mut r = three_in_sync();
        r.resync_from_one("n4", |_| false, 1);
        assert_eq!(in_sync_nodes(&r), ["n1"]);
        // Faulted replicas stay faulted and never become the source.
        let mut r = three_in_sync();
        r.replicas[0].state = ReplicaState::Faulted;
        assert_eq!(r.resync_from_one("n1", |_| true, 1), ["n3"]);
        assert_eq!(in_sync_nodes(&r), ["n2"]);
    }

    #[tokio::test]
    async fn update_retries_from_a_fresh_read_after_a_conflict() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn ClusterStore> = Arc::new(
            EmbeddedStore::open(dir.path().join("s.redb"))
                .await
                .expect("open"),
        );
        create(&store, &record()).await.expect("create");
        let mut calls = 0;
        let updated = update::<store::Error>(&store, "v1", |r| {
            calls += 1;
            if calls == 1 {
                // Another writer changes the record between our read and
                // our write: raise the epoch behind our back.
                let store = store.clone();
                let mut other = r.clone();
                other.epoch = 7;
                std::thread::spawn(move || {
                    tokio::runtime::Runtime::new()
                        .expect("runtime")
                        .block_on(store.put_json(&keys::volume("v1"), &other))
                })
                .join()
                .expect("thread")
                .expect("put");
            }
            r.epoch += 1;
            Ok(Change::Write)
        })
        .await
        .expect("update")
        .expect("exists");
        assert_eq!(calls, 2, "the change ran again on the fresh record");
        assert_eq!(
            updated.value.epoch, 8,
            "the other writer's epoch was not lost"
        );
    }

    #[tokio::test]
    async fn records_without_new_fields_still_load() {
        let json = r#"{"volume_id":"v","size_bytes":4096,"replica_count":1,"thin":false,
            "epoch":3,"state":"ready","replicas":[{"node_id":"n","replica_name":"v","state":"in-sync"}],
            "created_unix_ms":0}"#;
        let record: VolumeRecord = serde_json::from_str(json).expect("decode");
        assert_eq!(record.epoch, 3);
        assert!(record.target.is_none() && record.retired.is_empty());
        assert!(record.capabilities.is_empty() && record.requisite_topology.is_empty());
        let cap = CapabilityRecord {
            access_mode: "SINGLE_NODE_WRITER".into(),
            fs_type: None,
        };
        assert_eq!(record.supports(&cap), Ok(()), "anything goes");
    }

    #[test]
    fn capabilities_must_match_the_access_type_created_for() {
        let mut record = record();
        let mount = |fs: &str| CapabilityRecord {
            access_mode: "SINGLE_NODE_WRITER".into(),
            fs_type: Some(fs.into()),
        };
        record.capabilities = vec![mount("xfs")];
        assert_eq!(record.fs_type(), Some("xfs"));
        let mut reader = mount("xfs");
        reader.access_mode = "SINGLE_NODE_READER_ONLY".into();
        assert_eq!(record.supports(&reader), Ok(()), "modes are not compared");
        let err = record.supports(&mount("ext4")).expect_err("other fs");
        assert_eq!(
            err,
            "volume v1 was created for mount (xfs) access, not mount (ext4)"
        );
        let block = CapabilityRecord {
            access_mode: "SINGLE_NODE_WRITER".into(),
            fs_type: None,
        };
        assert!(record.supports(&block).is_err());
        record.capabilities.push(block.clone());
        assert_eq!(record.supports(&block), Ok(()));
    }
}
