//! The controller: the one process that owns the cluster store.
//!
//! It keeps the node registry ([`node`]), the volumes with their replicas,
//! epochs and in-sync sets ([`volume`]), the snapshots ([`snapshot`]), serves the management API of
//! `proto/ballast/controller.proto` to agents, targets and the CLI, and runs
//! the reconcilers ([`reconciler`]) that repair what a crash or a lost node
//! left behind.
//!
//! # Layout
//!
//! One folder per resource, each with the same files (Mayastor's control
//! plane): `mod.rs` (records and the module's error), `operations.rs` (what
//! the resource does, callable without gRPC), `api.rs` (the management
//! API's gRPC adapter; "service" means a CSI service, in `crate::service`)
//! and `reconcile.rs` (its reconcilers); `volume/scheduling.rs` is replica
//! placement. Shared plumbing: [`Context`], the per-volume operation guard
//! ([`ballast_storage_node::guard`]), and cached clients of the agents ([`agents`]).
//!
//! # Invariants
//!
//! - Every change of a volume record is a compare-and-set on the revision
//!   it was read at (see `volume::record`), so concurrent operations and
//!   reconcilers never overwrite each other's decisions.
//! - A change of the in-sync set is committed to the store before the call
//!   that asked for it returns.
//! - Only this module tree reads or writes the store; agents and the CLI
//!   go through the gRPC services.
//!
//! The controller must never hold cluster state only in memory that safety
//! depends on: memory holds heartbeats (liveness) and rebuild progress,
//! both of which a restart may lose without harm.

pub mod agents;
pub mod node;
pub mod reconciler;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testing;
pub mod volume;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::controller::node_service_server::NodeServiceServer;
use ballast_proto::controller::snapshot_service_server::SnapshotServiceServer;
use ballast_proto::controller::target_control_service_server::TargetControlServiceServer;
use ballast_proto::controller::volume_service_server::VolumeServiceServer;
use tracing::info;

use crate::store::ClusterStore;

/// Settings of a controller, from the `ballast-csi controller` flags.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where the management API listens.
    pub listen: SocketAddr,
    /// The management API's address as agents and targets dial it
    /// (`http://HOST:PORT`), sent to targets for their in-sync set calls.
    pub advertise_address: String,
    /// A node without a heartbeat for this long is down.
    pub heartbeat_timeout: Duration,
    /// A faulted replica whose node has been silent this long is replaced
    /// by a new replica on another node.
    pub node_down_after: Duration,
    /// Time between two reconciler passes.
    pub reconcile_interval: Duration,
    /// How long one call to an agent may take.
    pub agent_timeout: Duration,
}

impl ControllerConfig {
    /// A configuration with the default timings for `listen`, advertised as
    /// `http://<listen>`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            advertise_address: format!("http://{listen}"),
            heartbeat_timeout: Duration::from_secs(10),
            node_down_after: Duration::from_secs(600),
            reconcile_interval: Duration::from_secs(2),
            agent_timeout: Duration::from_secs(60),
        }
    }
}

/// What every service and reconciler of the controller shares.
#[derive(Debug)]
pub struct Context {
    /// The cluster store.
    pub store: Arc<dyn ClusterStore>,
    /// Registered nodes and their liveness.
    pub nodes: node::Registry,
    /// Clients of the agents' gRPC APIs.
    pub agents: agents::AgentClients,
    /// Per-volume operation guards.
    pub guards: ballast_storage_node::guard::OpGuards,
    /// Rebuild progress reported by targets (memory only).
    pub rebuilds: volume::RebuildProgress,
    /// Where snapshot hooks run ([`snapshot::quiesce::NodePluginHooks`]
    /// unless replaced, e.g. by the Kubernetes pod-exec runner).
    pub hooks: Arc<dyn snapshot::quiesce::HookRunner>,
    /// The controller's settings.
    pub config: ControllerConfig,
}

impl Context {
    /// Builds the shared context on an opened store.
    pub fn new(store: Arc<dyn ClusterStore>, config: ControllerConfig) -> Arc<Self> {
        Self::with_hooks(store, config, Arc::new(snapshot::quiesce::NodePluginHooks))
    }

    /// Builds the shared context on an opened store, with snapshot hooks
    /// run by `hooks`.
    pub fn with_hooks(
        store: Arc<dyn ClusterStore>,
        config: ControllerConfig,
        hooks: Arc<dyn snapshot::quiesce::HookRunner>,
    ) -> Arc<Self> {
        Arc::new(Self {
            nodes: node::Registry::new(store.clone(), config.heartbeat_timeout),
            agents: agents::AgentClients::new(config.agent_timeout),
            guards: ballast_storage_node::guard::OpGuards::default(),
            rebuilds: volume::RebuildProgress::default(),
            hooks,
            store,
            config,
        })
    }

    /// The reconcilers, in the order each pass runs them.
    pub fn reconcilers(self: &Arc<Self>) -> Vec<Box<dyn reconciler::Reconciler>> {
        vec![
            Box::new(node::reconcile::NodeLiveness::new(self.clone())),
            Box::new(volume::reconcile::Leftovers::new(self.clone())),
            Box::new(volume::reconcile::ReplicaRepair::new(self.clone())),
            Box::new(snapshot::reconcile::Leftovers::new(self.clone())),
        ]
    }
}

/// Errors of running the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The management API could not be served (address in use, ...).
    #[error("Cannot serve the management API on {listen}")]
    Serve {
        /// The listen address.
        listen: SocketAddr,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Serves the management API and runs the reconcilers until `shutdown`
/// completes.
///
/// # Errors
///
/// [`Error::Serve`] if the listen address cannot be bound or serving fails.
pub async fn run(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listen = context.config.listen;
    let reconcilers = tokio::spawn(reconciler::run_forever(
        context.reconcilers(),
        context.config.reconcile_interval,
    ));
    let volumes = Arc::new(volume::Volumes::new(context.clone()));
    info!(%listen, "Serving the management API");
    let served = tonic::transport::Server::builder()
        .add_service(NodeServiceServer::new(node::api::NodeApi::new(
            context.clone(),
        )))
        .add_service(VolumeServiceServer::new(volume::api::VolumeApi::new(
            volumes.clone(),
        )))
        .add_service(SnapshotServiceServer::new(snapshot::api::SnapshotApi::new(
            Arc::new(snapshot::Snapshots::new(context.clone())),
        )))
        .add_service(TargetControlServiceServer::new(
            volume::api::TargetControlApi::new(volumes),
        ))
        .serve_with_shutdown(listen, shutdown)
        .await;
    reconcilers.abort();
    served.map_err(|source| Error::Serve { listen, source })
}

/// The current time in Unix milliseconds (0 if the clock is before 1970).
pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
