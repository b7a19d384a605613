//! Nodes: the registry of storage agents and their liveness.
//!
//! An agent registers its node at start (`RegisterNode`): the record (id,
//! topology, the agent's gRPC address, its replica protocol address, and
//! the pools as they were then) is written to the store under
//! `/ballast/nodes/<id>`. Registration overwrites: the agent describes
//! itself, and its latest description wins.
//!
//! Liveness is memory only: the last heartbeat of each node and the pool
//! capacity it carried. A node is `up` while its last heartbeat is younger
//! than the heartbeat timeout, `down` otherwise. After a controller restart
//! every node is down until its next heartbeat (2 s later), and a node's
//! silence is counted from the controller's start at the earliest, so a
//! restart never makes a node look down for longer than it was.
//!
//! Placement reads capacity from here (heartbeat figures, adjusted for
//! replicas this controller created since the last heartbeat). This module
//! must never make decisions about volumes.

pub mod api;
pub mod operations;
pub mod reconcile;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_proto::controller as pb;
use serde::{Deserialize, Serialize};

use crate::store::{self, ClusterStore};

/// Errors of node operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A registration or heartbeat is malformed.
    #[error("Invalid node: {reason}")]
    InvalidNode {
        /// What is wrong.
        reason: String,
    },
    /// No node with this id ever registered.
    #[error("Node {node} is not registered")]
    NodeNotFound {
        /// The node id.
        node: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidNode { .. } => tonic::Status::invalid_argument(crate::error_chain(&err)),
            Error::NodeNotFound { .. } => tonic::Status::not_found(crate::error_chain(&err)),
            Error::Store(err) => err.into(),
        }
    }
}

/// The topology key of a node: every node carries it with its own id as
/// value, so each node is its own topology segment (CSI spec,
/// NodeGetInfo `accessible_topology`).
pub const TOPOLOGY_NODE_KEY: &str = "topology.ballast.io/node";

/// Topology labels of a node, or a topology segment to match them
/// against (CSI `Topology.segments`): key to value.
pub type Topology = BTreeMap<String, String>;

/// Whether a node with `labels` lies in `segment`: every key of the
/// segment has the same value among the labels (CSI spec, Topology). An
/// empty segment contains every node.
pub fn in_segment(labels: &Topology, segment: &Topology) -> bool {
    segment.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A node as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node id.
    pub node_id: String,
    /// Topology labels; [`TOPOLOGY_NODE_KEY`] is always among them.
    pub topology: Topology,
    /// The agent's gRPC API (`http://HOST:PORT`).
    pub agent_address: String,
    /// The agent's replica protocol listener (`HOST:PORT`), may be empty.
    pub data_address: String,
    /// The node's pools when it registered.
    pub pools: Vec<PoolCapacity>,
    /// When it last registered (Unix ms).
    pub registered_unix_ms: i64,
}

/// Capacity figures of one pool, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCapacity {
    /// Pool name on its node.
    pub name: String,
    /// Size of the pool's filesystem.
    pub total_bytes: u64,
    /// Free space of the filesystem.
    pub free_bytes: u64,
    /// Sum of the sizes of its replicas.
    pub provisioned_bytes: u64,
    /// Limit on `provisioned_bytes` in percent of `total_bytes`.
    pub overcommit_percent: u32,
}

impl PoolCapacity {
    /// Most bytes that may be provisioned in the pool.
    pub fn limit_bytes(&self) -> u64 {
        let limit = u128::from(self.total_bytes) * u128::from(self.overcommit_percent) / 100;
        u64::try_from(limit).unwrap_or(u64::MAX)
    }

    /// Whether a replica of `size_bytes` fits, by the agent's own rule:
    /// the provisioned sum stays within the overcommit limit, and a thick
    /// replica also needs that much free space.
    pub fn fits(&self, size_bytes: u64, thin: bool) -> bool {
        let within_limit = self.provisioned_bytes.saturating_add(size_bytes) <= self.limit_bytes();
        within_limit && (thin || self.free_bytes >= size_bytes)
    }

    /// Bytes that may still be provisioned (limit minus provisioned).
    pub fn headroom_bytes(&self) -> u64 {
        self.limit_bytes().saturating_sub(self.provisioned_bytes)
    }

    /// The largest replica that [`fits`](Self::fits): the headroom, and
    /// for a thick replica no more than the free space.
    pub fn room_bytes(&self, thin: bool) -> u64 {
        if thin {
            self.headroom_bytes()
        } else {
            self.headroom_bytes().min(self.free_bytes)
        }
    }

    fn from_proto(pool: &pb::Pool) -> Self {
        Self {
            name: pool.name.clone(),
            total_bytes: pool.total_bytes,
            free_bytes: pool.free_bytes,
            provisioned_bytes: pool.provisioned_bytes,
            overcommit_percent: pool.overcommit_percent,
        }
    }

    fn to_proto(&self) -> pb::Pool {
        pb::Pool {
            name: self.name.clone(),
            total_bytes: self.total_bytes,
            free_bytes: self.free_bytes,
            provisioned_bytes: self.provisioned_bytes,
            overcommit_percent: self.overcommit_percent,
        }
    }
}

/// Whether a node's agent is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Heartbeats arrive.
    Up,
    /// No heartbeat within the heartbeat timeout.
    Down,
}

impl NodeState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
        }
    }
}

/// A registered node with its liveness.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// The stored record.
    pub record: NodeRecord,
    /// Up or down.
    pub state: NodeState,
    /// Time since its last heartbeat (since the controller started, if
    /// none arrived since).
    pub silent_for: Duration,
    /// Unix ms of its last heartbeat seen by this controller, 0 if none.
    pub last_heartbeat_unix_ms: i64,
    /// Latest pool figures: from the last heartbeat, else from the record.
    pub pools: Vec<PoolCapacity>,
}

impl NodeView {
    /// The node as the API returns it.
    pub fn to_proto(&self) -> pb::Node {
        pb::Node {
            node_id: self.record.node_id.clone(),
            topology: self.record.topology.clone().into_iter().collect(),
            agent_address: self.record.agent_address.clone(),
            data_address: self.record.data_address.clone(),
            pools: self.pools.iter().map(PoolCapacity::to_proto).collect(),
            state: self.state.as_str().to_string(),
            last_heartbeat_unix_ms: self.last_heartbeat_unix_ms,
        }
    }

    /// True if the node is up.
    pub fn is_up(&self) -> bool {
        self.state == NodeState::Up
    }
}

/// What the last heartbeat of a node said.
#[derive(Debug, Clone)]
struct Liveness {
    last_seen: Instant,
    last_seen_unix_ms: i64,
    pools: Vec<PoolCapacity>,
}

/// The node registry: records in the store, liveness in memory.
#[derive(Debug)]
pub struct Registry {
    store: Arc<dyn ClusterStore>,
    heartbeat_timeout: Duration,
    started: Instant,
    live: Mutex<HashMap<String, Liveness>>,
}

impl Registry {
    /// A registry on `store`; nodes are down after `heartbeat_timeout`
    /// without a heartbeat.
    pub fn new(store: Arc<dyn ClusterStore>, heartbeat_timeout: Duration) -> Self {
        Self {
            store,
            heartbeat_timeout,
            started: Instant::now(),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The heartbeat timeout.
    pub fn heartbeat_timeout(&self) -> Duration {
        self.heartbeat_timeout
    }
}
