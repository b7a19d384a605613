//! The node liveness reconciler: notices nodes going down and coming back.
//!
//! Liveness itself is computed from heartbeats on demand (see
//! [`super::Registry::state`]); this reconciler only turns transitions
//! into log lines an operator can follow. It keeps the last state it saw
//! per node in memory; after a restart it starts from "unknown" and logs
//! each node once.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{Error, NodeState};
use crate::controller::Context;
use crate::controller::reconciler::Reconciler;

/// Logs node state transitions.
pub struct NodeLiveness {
    context: Arc<Context>,
    last: Mutex<HashMap<String, NodeState>>,
}

impl NodeLiveness {
    /// A reconciler over `context`'s registry.
    pub fn new(context: Arc<Context>) -> Self {
        Self {
            context,
            last: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Reconciler for NodeLiveness {
    fn name(&self) -> &'static str {
        "node-liveness"
    }

    async fn reconcile(&self) -> Result<(), crate::store::Error> {
        let nodes = match self.context.nodes.list().await {
            Ok(nodes) => nodes,
            Err(Error::Store(err)) => return Err(err),
            Err(err @ (Error::InvalidNode { .. } | Error::NodeNotFound { .. })) => {
                warn!(error = %err, "Cannot list nodes");
                return Ok(());
            }
        };
        let mut last = self.last.lock();
        for node in nodes {
            let previous = last.insert(node.record.node_id.clone(), node.state);
            if previous == Some(node.state) {
                continue;
            }
            match node.state {
                NodeState::Up => info!(node.id = %node.record.node_id, "Node is up"),
                NodeState::Down => warn!(
                    node.id = %node.record.node_id,
                    silent_secs = node.silent_for.as_secs(),
                    "Node is down: no heartbeat within the timeout"
                ),
            }
        }
        Ok(())
    }
}
