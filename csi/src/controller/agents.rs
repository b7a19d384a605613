//! Clients of the agents' gRPC APIs, one cached channel per agent address.
//!
//! Channels connect lazily and reconnect by themselves, so an agent that
//! restarts on the same address is reached again without any bookkeeping
//! here. Every call is bounded by the controller's agent timeout.
//!
//! This module owns only connections: it must never decide anything about
//! volumes or nodes. An agent's error status is carried to the caller as
//! [`AgentError`], which keeps the agent's code so the caller can tell
//! "node unreachable" from "agent refused".

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Duration;

use ballast_proto::agent::quiesce_service_client::QuiesceServiceClient;
use ballast_proto::agent::replica_service_client::ReplicaServiceClient;
use ballast_proto::agent::snapshot_service_client::SnapshotServiceClient;
use ballast_proto::agent::target_service_client::TargetServiceClient;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Errors of reaching agents.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node registered an agent address that is not a URI.
    #[error("Invalid agent address {address:?}")]
    InvalidAddress {
        /// The address as registered.
        address: String,
        /// What the URI parser said.
        #[source]
        source: tonic::transport::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidAddress { .. } => tonic::Code::Internal,
        };
        tonic::Status::new(code, crate::error_chain(&err))
    }
}

/// An error an agent answered (or the transport reported) for one call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{action} on node {node} failed: {message}")]
pub struct AgentError {
    /// The node whose agent was called.
    pub node: String,
    /// What was asked, e.g. "Creating replica v1".
    pub action: String,
    /// The gRPC code of the answer.
    pub code: tonic::Code,
    /// The agent's message.
    pub message: String,
}

impl AgentError {
    /// Wraps `status` from a call to `node`'s agent.
    pub fn new(node: &str, action: impl Into<String>, status: tonic::Status) -> Self {
        let message = match (status.code(), status.message()) {
            (tonic::Code::Unimplemented, "") => {
                "the agent does not implement this call (an older agent?)".to_string()
            }
            (code, "") => format!("{code:?}: {}", code.description()),
            (_, message) => message.to_string(),
        };
        Self {
            node: node.to_string(),
            action: action.into(),
            code: status.code(),
            message,
        }
    }

    /// The code the controller answers with when this error ends an
    /// operation: an unreachable agent is `UNAVAILABLE`, a full node
    /// `RESOURCE_EXHAUSTED`, a refused precondition stays one, anything
    /// else is the controller's `INTERNAL` failure.
    pub fn status_code(&self) -> tonic::Code {
        use tonic::Code;
        match self.code {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Code::Unavailable,
            Code::ResourceExhausted => Code::ResourceExhausted,
            Code::FailedPrecondition => Code::FailedPrecondition,
            Code::Unimplemented => Code::Unimplemented,
            Code::Ok
            | Code::Unknown
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Aborted
            | Code::OutOfRange
            | Code::Internal
            | Code::DataLoss
            | Code::Unauthenticated => Code::Internal,
        }
    }

    /// True if the agent could not be reached (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        )
    }
}

/// Cached channels to agents.
#[derive(Debug)]
pub struct AgentClients {
    timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
}

impl AgentClients {
    /// Clients whose calls are bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The replica service of the agent at `address`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`].
    pub fn replicas(&self, address: &str) -> Result<ReplicaServiceClient<Channel>, Error> {
        Ok(ReplicaServiceClient::new(self.channel(address)?))
    }

    /// The target service of the agent at `address`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`].
    pub fn targets(&self, address: &str) -> Result<TargetServiceClient<Channel>, Error> {
        Ok(TargetServiceClient::new(self.channel(address)?))
    }

    /// The snapshot service of the agent at `address`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`].
    pub fn snapshots(&self, address: &str) -> Result<SnapshotServiceClient<Channel>, Error> {
        Ok(SnapshotServiceClient::new(self.channel(address)?))
    }

    /// The quiesce service (freeze, thaw, hooks) of the agent at
    /// `address`, which forwards to its node plugin.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`].
    pub fn quiesce(&self, address: &str) -> Result<QuiesceServiceClient<Channel>, Error> {
        Ok(QuiesceServiceClient::new(self.channel(address)?))
    }

    fn channel(&self, address: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint =
            Endpoint::from_shared(address.to_string()).map_err(|source| Error::InvalidAddress {
                address: address.to_string(),
                source,
            })?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.timeout)
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}
