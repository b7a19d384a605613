//! Registration of this agent with the controller, and its heartbeats.
//!
//! When the agent runs with `--controller`, [`run`] registers the node
//! (its id, topology, gRPC and replica protocol addresses, and pools) with
//! the controller's `NodeService`, then sends a heartbeat with fresh pool
//! capacity every [`HEARTBEAT_INTERVAL`]. While the controller cannot be
//! reached, registration is retried with a bounded exponential backoff and
//! heartbeats keep being attempted; a heartbeat answered with `NOT_FOUND`
//! (the controller does not know this node, e.g. its store was reset) sends
//! the agent back to registering.
//!
//! This module owns nothing but that loop. It must never make the agent
//! depend on the controller: the agent serves its API and its replicas
//! whether or not the controller is reachable, and without `--controller`
//! it runs standalone and this module is not used at all.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::controller as pb;
use ballast_proto::controller::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::agent::Agent;

/// Time between two heartbeats. The controller's heartbeat timeout (10 s
/// by default) must be several times longer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// First wait before retrying a failed registration; doubled on each
/// failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Longest wait between two registration attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long one call to the controller may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The topology key every node carries, with its node id as value.
pub const NODE_TOPOLOGY_KEY: &str = "topology.ballast.io/node";

/// Errors of registration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The controller address is not a valid URI.
    #[error("Invalid controller address {address:?}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What the URI parser said.
        #[source]
        source: tonic::transport::Error,
    },
    /// A topology label is not `key=value` with a non-empty key.
    #[error("Invalid topology label {label:?}: expected key=value")]
    InvalidTopology {
        /// The label as given.
        label: String,
    },
}

/// Who this node is, as announced to the controller.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// The node id (unique in the cluster; the Kubernetes node name).
    pub node_id: String,
    /// Topology labels; [`NODE_TOPOLOGY_KEY`] is always set to the node id.
    pub topology: HashMap<String, String>,
    /// The agent's gRPC API as the controller should dial it
    /// (`http://HOST:PORT`).
    pub agent_address: String,
    /// The replica protocol listener (`HOST:PORT`); empty if the agent has
    /// none.
    pub data_address: String,
}

impl NodeIdentity {
    /// Builds the identity from the agent's flags: `labels` are `key=value`
    /// strings; the node's own topology label is added.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidTopology`] for a label without `=` or with an empty
    /// key.
    pub fn new(
        node_id: String,
        labels: &[String],
        agent_address: String,
        data_address: String,
    ) -> Result<Self, Error> {
        let mut topology = HashMap::new();
        for label in labels {
            match label.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    topology.insert(key.to_string(), value.to_string());
                }
                _ => {
                    return Err(Error::InvalidTopology {
                        label: label.clone(),
                    });
                }
            }
        }
        topology.insert(NODE_TOPOLOGY_KEY.to_string(), node_id.clone());
        Ok(Self {
            node_id,
            topology,
            agent_address,
            data_address,
        })
    }
}

/// The host name of this machine, the default node id.
///
/// The node name from `uname(2)` (this UTS namespace's host name); falls
/// back to `localhost` when it is empty or not UTF-8.
pub fn hostname() -> String {
    nix::sys::utsname::uname()
        .ok()
        .and_then(|uts| uts.nodename().to_str().map(str::to_string))
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A channel to the controller that connects lazily and reconnects by
/// itself.
///
/// # Errors
///
/// [`Error::InvalidAddress`] if `address` is not a URI.
pub fn controller_channel(address: &str) -> Result<Channel, Error> {
    let endpoint =
        Endpoint::from_shared(address.to_string()).map_err(|source| Error::InvalidAddress {
            address: address.to_string(),
            source,
        })?;
    Ok(endpoint
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_lazy())
}

/// Registers the node and sends heartbeats forever.
///
/// Never returns; errors are logged and retried.
///
/// # Cancel safety
///
/// Cancel safe: the loop holds no state that outlives a call, so dropping
/// the future (e.g. at agent shutdown) only stops the heartbeats; the
/// controller then sees the node go down after its heartbeat timeout.
pub async fn run(agent: Arc<Agent>, identity: NodeIdentity, channel: Channel) {
    let mut client = NodeServiceClient::new(channel);
    loop {
        register(&agent, &identity, &mut client).await;
        heartbeat_until_unknown(&agent, &identity, &mut client).await;
    }
}

/// Registers, retrying with backoff until the controller accepts.
async fn register(agent: &Agent, identity: &NodeIdentity, client: &mut NodeServiceClient<Channel>) {
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        let node = pb::Node {
            node_id: identity.node_id.clone(),
            topology: identity.topology.clone(),
            agent_address: identity.agent_address.clone(),
            data_address: identity.data_address.clone(),
            pools: pools(agent).await,
            state: String::new(),
            last_heartbeat_unix_ms: 0,
        };
        match client
            .register_node(pb::RegisterNodeRequest { node: Some(node) })
            .await
        {
            Ok(_) => {
                info!(node.id = %identity.node_id, "Registered with the controller");
                return;
            }
            Err(status) => {
                attempts += 1;
                // The first failures are expected while the controller
                // starts; say so once, then keep quiet at debug level.
                if attempts == 1 || attempts.is_multiple_of(20) {
                    warn!(node.id = %identity.node_id, code = ?status.code(), error = %status.message(), attempts, "Cannot register with the controller; retrying");
                } else {
                    debug!(node.id = %identity.node_id, code = ?status.code(), error = %status.message(), "Registration failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Sends heartbeats every [`HEARTBEAT_INTERVAL`] until the controller
/// answers `NOT_FOUND`.
async fn heartbeat_until_unknown(
    agent: &Agent,
    identity: &NodeIdentity,
    client: &mut NodeServiceClient<Channel>,
) {
    let mut failing = false;
    let mut interval = tokio::time::interval(HEARTBEAT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; registration just reported the
    // pools, so skip it.
    interval.tick().await;
    loop {
        interval.tick().await;
        let request = pb::HeartbeatRequest {
            node_id: identity.node_id.clone(),
            pools: pools(agent).await,
        };
        match client.heartbeat(request).await {
            Ok(_) => {
                if failing {
                    info!(node.id = %identity.node_id, "Heartbeats reach the controller again");
                    failing = false;
                }
            }
            Err(status) if status.code() == tonic::Code::NotFound => {
                warn!(node.id = %identity.node_id, "The controller does not know this node; registering again");
                return;
            }
            Err(status) => {
                if !failing {
                    warn!(node.id = %identity.node_id, code = ?status.code(), error = %status.message(), "Heartbeat failed; retrying");
                    failing = true;
                }
            }
        }
    }
}

/// The agent's pools with their capacity, as the controller wants them.
/// A pool whose capacity cannot be read is left out (so nothing is placed
/// on it) and logged.
async fn pools(agent: &Agent) -> Vec<pb::Pool> {
    match agent.list_pools().await {
        Ok(pools) => pools
            .into_iter()
            .map(|status| pb::Pool {
                name: status.pool.name().to_string(),
                total_bytes: status.capacity.total_bytes,
                free_bytes: status.capacity.free_bytes,
                provisioned_bytes: status.capacity.provisioned_bytes,
                overcommit_percent: status.capacity.overcommit_percent,
            })
            .collect(),
        Err(e) => {
            warn!(error = %error_text(&e), "Cannot read pool capacity for the heartbeat");
            Vec::new()
        }
    }
}

fn error_text(e: &crate::agent::Error) -> String {
    crate::error_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_adds_the_node_label_and_parses_labels() {
        let identity = NodeIdentity::new(
            "n1".into(),
            &["topology.kubernetes.io/zone=a".into(), "rack=".into()],
            "http://127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
        )
        .expect("valid labels");
        assert_eq!(
            identity.topology.get(NODE_TOPOLOGY_KEY).map(String::as_str),
            Some("n1")
        );
        assert_eq!(
            identity
                .topology
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("a")
        );
        assert_eq!(identity.topology.get("rack").map(String::as_str), Some(""));
    }

    #[test]
    fn identity_refuses_malformed_labels() {
        for bad in ["no-equals", "=value"] {
            let result = NodeIdentity::new("n".into(), &[bad.into()], String::new(), String::new());
            assert!(
                matches!(result, Err(Error::InvalidTopology { .. })),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn hostname_is_never_empty() {
        assert!(!hostname().is_empty());
    }
}
