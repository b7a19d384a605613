//! What the node registry does: register, heartbeat, list, and the
//! liveness and capacity questions placement and reconcilers ask.

use parking_lot::MutexGuard;
use std::time::{Duration, Instant};

use ballast_proto::controller as pb;
use tracing::info;

use super::{
    Error, Liveness, NodeRecord, NodeState, NodeView, PoolCapacity, Registry, TOPOLOGY_NODE_KEY,
    Topology,
};
use crate::controller::now_unix_ms;
use crate::store::{ClusterStoreExt, keys};

/// Longest node id, in bytes (Kubernetes node names are at most 253).
pub const MAX_NODE_ID_LEN: usize = 253;

/// Checks a node id: 1 to [`MAX_NODE_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
///
/// # Errors
///
/// [`Error::InvalidNode`] saying what is wrong.
pub fn validate_node_id(node_id: &str) -> Result<(), Error> {
    let reason = if node_id.is_empty() {
        "the node id is empty"
    } else if node_id.len() > MAX_NODE_ID_LEN {
        "the node id is longer than 253 bytes"
    } else if !node_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        "the node id may only hold A-Z, a-z, 0-9, '.', '_' and '-'"
    } else {
        return Ok(());
    };
    Err(Error::InvalidNode {
        reason: format!("{reason} ({node_id:?})"),
    })
}

impl Registry {
    /// Registers (or re-registers) a node and counts it as a heartbeat.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidNode`] for a bad id or a missing agent address;
    /// [`Error::Store`] if the record cannot be written.
    pub async fn register(&self, node: &pb::Node) -> Result<NodeRecord, Error> {
        validate_node_id(&node.node_id)?;
        if node.agent_address.is_empty() {
            return Err(Error::InvalidNode {
                reason: format!("node {} has no agent address", node.node_id),
            });
        }
        let pools: Vec<PoolCapacity> = node.pools.iter().map(PoolCapacity::from_proto).collect();
        let mut topology: Topology = node
            .topology
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // The agent adds it itself; a node must be its own segment even
        // if one does not.
        topology.insert(TOPOLOGY_NODE_KEY.to_string(), node.node_id.clone());
        let record = NodeRecord {
            node_id: node.node_id.clone(),
            topology,
            agent_address: node.agent_address.clone(),
            data_address: node.data_address.clone(),
            pools: pools.clone(),
            registered_unix_ms: now_unix_ms(),
        };
        self.store
            .put_json(&keys::node(&record.node_id), &record)
            .await?;
        self.seen(&record.node_id, pools);
        info!(node.id = %record.node_id, agent = %record.agent_address, data = %record.data_address, "Node registered");
        Ok(record)
    }

    /// Records a heartbeat with fresh pool figures.
    ///
    /// # Errors
    ///
    /// [`Error::NodeNotFound`] if the node never registered (the agent then
    /// registers again); [`Error::Store`] if the store cannot say.
    pub async fn heartbeat(&self, node_id: &str, pools: &[pb::Pool]) -> Result<(), Error> {
        validate_node_id(node_id)?;
        let pools = pools.iter().map(PoolCapacity::from_proto).collect();
        let known = self.live().contains_key(node_id);
        if !known {
            // First heartbeat since this controller started: the record
            // must exist in the store.
            let record = self
                .store
                .get_json::<NodeRecord>(&keys::node(node_id))
                .await?;
            if record.is_none() {
                return Err(Error::NodeNotFound {
                    node: node_id.to_string(),
                });
            }
        }
        self.seen(node_id, pools);
        Ok(())
    }

    /// Every registered node with its liveness, sorted by id.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the records cannot be read.
    pub async fn list(&self) -> Result<Vec<NodeView>, Error> {
        let records = self.store.list_json::<NodeRecord>(keys::NODES).await?;
        Ok(records
            .into_iter()
            .map(|(_, versioned)| self.view(versioned.value))
            .collect())
    }

    /// One node with its liveness, `None` if it never registered.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] if the record cannot be read.
    pub async fn get(&self, node_id: &str) -> Result<Option<NodeView>, Error> {
        let record = self
            .store
            .get_json::<NodeRecord>(&keys::node(node_id))
            .await?;
        Ok(record.map(|versioned| self.view(versioned.value)))
    }

    /// Up or down, from memory alone. A node not heard from since this
    /// controller started is down.
    pub fn state(&self, node_id: &str) -> NodeState {
        let last_seen = self.live().get(node_id).map(|l| l.last_seen);
        match last_seen {
            Some(last) if last.elapsed() < self.heartbeat_timeout => NodeState::Up,
            Some(_) | None => NodeState::Down,
        }
    }

    /// Time since the node's last heartbeat, or since this controller
    /// started if none arrived since.
    pub fn silent_for(&self, node_id: &str) -> Duration {
        let last = self
            .live()
            .get(node_id)
            .map(|l| l.last_seen)
            .unwrap_or(self.started);
        Instant::now().saturating_duration_since(last)
    }

    /// Adds `bytes` to the provisioned figure of `pool` on `node_id` (and,
    /// for a thick replica, takes them from its free space) until the next
    /// heartbeat replaces the figures, so placements made between two
    /// heartbeats see replicas created meanwhile.
    pub fn note_provisioned(&self, node_id: &str, pool: &str, bytes: u64, thin: bool) {
        if let Some(live) = self.live().get_mut(node_id)
            && let Some(p) = live.pools.iter_mut().find(|p| p.name == pool)
        {
            p.provisioned_bytes = p.provisioned_bytes.saturating_add(bytes);
            if !thin {
                p.free_bytes = p.free_bytes.saturating_sub(bytes);
            }
        }
    }

    fn seen(&self, node_id: &str, pools: Vec<PoolCapacity>) {
        let previous = self.live().insert(
            node_id.to_string(),
            Liveness {
                last_seen: Instant::now(),
                last_seen_unix_ms: now_unix_ms(),
                pools,
            },
        );
        if previous.is_none() {
            info!(node.id = %node_id, "First heartbeat from node since the controller started");
        }
    }

    fn view(&self, record: NodeRecord) -> NodeView {
        let live = self.live().get(&record.node_id).cloned();
        let state = self.state(&record.node_id);
        let silent_for = self.silent_for(&record.node_id);
        let (last_heartbeat_unix_ms, pools) = match live {
            Some(live) => (live.last_seen_unix_ms, live.pools),
            None => (0, record.pools.clone()),
        };
        NodeView {
            record,
            state,
            silent_for,
            last_heartbeat_unix_ms,
            pools,
        }
    }

    fn live(&self) -> MutexGuard<'_, std::collections::HashMap<String, Liveness>> {
        // Plain values: a panic while the lock was held cannot leave them
        // half-updated.
        self.live.lock()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::EmbeddedStore;

    fn node(id: &str) -> pb::Node {
        pb::Node {
            node_id: id.to_string(),
            agent_address: "http://127.0.0.1:1".to_string(),
            pools: vec![pb::Pool {
                name: "pool0".into(),
                total_bytes: 100,
                free_bytes: 100,
                provisioned_bytes: 0,
                overcommit_percent: 200,
            }],
            ..Default::default()
        }
    }

    async fn registry(dir: &tempfile::TempDir, timeout: Duration) -> Registry {
        let store = EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .expect("open the embedded store");
        Registry::new(Arc::new(store), timeout)
    }

    #[tokio::test]
    async fn heartbeat_of_an_unknown_node_is_not_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = registry(&dir, Duration::from_secs(10)).await;
        let err = registry
            .heartbeat("ghost", &[])
            .await
            .expect_err("unknown node");
        assert!(matches!(err, Error::NodeNotFound { .. }), "{err:?}");
        registry.register(&node("n1")).await.expect("register");
        registry.heartbeat("n1", &[]).await.expect("heartbeat");
    }

    #[tokio::test]
    async fn nodes_are_up_after_a_heartbeat_and_down_after_the_timeout() {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = registry(&dir, Duration::from_millis(200)).await;
        registry.register(&node("n1")).await.expect("register");
        let nodes = registry.list().await.expect("list");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].state, NodeState::Up);
        assert_eq!(nodes[0].pools[0].name, "pool0");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(registry.state("n1"), NodeState::Down);
        registry.heartbeat("n1", &[]).await.expect("heartbeat");
        assert_eq!(registry.state("n1"), NodeState::Up);
    }

    #[tokio::test]
    async fn a_restarted_registry_knows_nodes_but_sees_them_down_until_a_heartbeat() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let registry = registry(&dir, Duration::from_secs(10)).await;
            registry.register(&node("n1")).await.expect("register");
        }
        let registry = registry(&dir, Duration::from_secs(10)).await;
        let nodes = registry.list().await.expect("list");
        assert_eq!(nodes.len(), 1, "the record survived");
        assert_eq!(nodes[0].state, NodeState::Down);
        registry
            .heartbeat("n1", &[])
            .await
            .expect("known from the store");
        assert_eq!(registry.state("n1"), NodeState::Up);
    }

    #[tokio::test]
    async fn registration_is_validated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = registry(&dir, Duration::from_secs(10)).await;
        for bad in ["", "a/b", "a b"] {
            let err = registry.register(&node(bad)).await.expect_err(bad);
            assert!(matches!(err, Error::InvalidNode { .. }), "{bad}: {err:?}");
        }
        let mut no_address = node("n1");
        no_address.agent_address.clear();
        assert!(registry.register(&no_address).await.is_err());
    }

    #[test]
    fn pool_fit_follows_the_agents_rule() {
        let pool = PoolCapacity {
            name: "p".into(),
            total_bytes: 1000,
            free_bytes: 300,
            provisioned_bytes: 1500,
            overcommit_percent: 200,
        };
        assert_eq!(pool.limit_bytes(), 2000);
        assert!(pool.fits(500, true), "thin up to the limit");
        assert!(!pool.fits(501, true), "thin beyond the limit");
        assert!(!pool.fits(400, false), "thick needs free space");
        assert!(pool.fits(300, false));
    }
}
