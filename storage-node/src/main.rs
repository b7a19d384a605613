//! `ballast-agent`: the storage agent that runs on every node.
//!
//! Opens the node's pools (formatting blank disks, importing Ballast pools,
//! refusing anything that carries data), then serves the agent gRPC API
//! until SIGTERM or SIGINT, when it stops its exports and closes its pools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ballast_storage_node::agent::{Agent, AgentConfig};
use ballast_storage_node::pool::{self, PoolConfig, PoolSource};
use ballast_storage_node::registration::{self, NodeIdentity};
use ballast_storage_node::{api, buf};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Ballast storage agent: pools this node's disks into replicas and serves
/// them over NBD.
#[derive(Parser, Debug)]
#[command(name = "ballast-agent", version)]
struct Args {
    /// Directory for pool mount points and agent state.
    #[arg(long, env = "BALLAST_STATE_DIR", default_value = "/var/lib/ballast")]
    state_dir: PathBuf,

    /// Address of the agent's gRPC API.
    #[arg(long, env = "BALLAST_GRPC_LISTEN", default_value = "127.0.0.1:9500")]
    grpc_listen: SocketAddr,

    /// A whole disk to use as a pool (repeatable). A blank disk is formatted
    /// with XFS; a disk that carries any signature is refused unless
    /// --force-format is given; a Ballast pool is imported.
    #[arg(long = "pool-device", value_name = "DEVICE")]
    pool_devices: Vec<PathBuf>,

    /// A file to use as a pool through a loop device (repeatable), for
    /// development and tests; created sparse with --pool-size if missing.
    #[arg(long = "pool-file", value_name = "PATH")]
    pool_files: Vec<PathBuf>,

    /// Size in bytes of pool files that do not exist yet (suffixes: MiB,
    /// GiB, ...).
    #[arg(long, value_parser = ballast_storage_node::parse_bytes)]
    pool_size: Option<u64>,

    /// Format pool devices even if they carry a partition table or a
    /// filesystem. Destroys their data. Never reformats a Ballast pool.
    #[arg(long)]
    force_format: bool,

    /// Limit on the sum of replica sizes of a pool, in percent of its size
    /// (thin provisioning overcommit).
    #[arg(long, default_value_t = pool::DEFAULT_OVERCOMMIT_PERCENT)]
    overcommit_percent: u32,

    /// Number of io_uring threads for replica I/O.
    #[arg(long, default_value_t = 2)]
    io_threads: usize,

    /// Submission queue entries of each io_uring.
    #[arg(long, default_value_t = 256)]
    io_queue_depth: u32,

    /// This node's id in the cluster (default: the host name).
    #[arg(long, env = "BALLAST_NODE_ID")]
    node_id: Option<String>,

    /// The controller's management API (http://HOST:PORT). The agent
    /// registers there and sends heartbeats; without it the agent runs
    /// standalone.
    #[arg(long, env = "BALLAST_CONTROLLER")]
    controller: Option<String>,

    /// Address of the replica protocol listener (HOST:PORT), advertised to
    /// the controller for other nodes' targets.
    #[arg(long, env = "BALLAST_DATA_LISTEN")]
    data_listen: Option<SocketAddr>,

    /// The CSI node plugin of this node (`unix:///path/csi.sock`), to which
    /// freezes and snapshot hooks are forwarded. Without it the agent
    /// cannot quiesce volumes for app-consistent snapshots.
    #[arg(long, env = "BALLAST_NODE_PLUGIN_ENDPOINT")]
    node_plugin_endpoint: Option<String>,

    /// A topology label of this node, key=value (repeatable).
    /// topology.ballast.io/node=<node id> is always added.
    #[arg(long = "topology", value_name = "KEY=VALUE")]
    topology: Vec<String>,
}

impl Args {
    fn agent_config(&self) -> AgentConfig {
        let config = |source| PoolConfig {
            force_format: self.force_format,
            overcommit_percent: self.overcommit_percent,
            ..PoolConfig::new(source)
        };
        let devices = self
            .pool_devices
            .iter()
            .map(|d| config(PoolSource::Device(d.clone())));
        let files = self.pool_files.iter().map(|f| {
            config(PoolSource::File {
                path: f.clone(),
                size_bytes: self.pool_size,
            })
        });
        AgentConfig {
            state_dir: self.state_dir.clone(),
            pools: devices.chain(files).collect(),
            io_threads: self.io_threads,
            io_queue_depth: self.io_queue_depth,
        }
    }
}

/// Warns when the unauthenticated listener `what` binds `addr` beyond
/// loopback (docs/architecture.md, "Trust boundary").
fn warn_unless_loopback(what: &str, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        warn!(
            address = %addr,
            "The {what} accepts unauthenticated connections beyond this machine: keep it on a network only the cluster's nodes reach"
        );
    }
    if addr.ip().is_unspecified() {
        warn!(
            address = %addr,
            "The {what} is advertised as an unspecified address, which other nodes cannot reach: give this node's address"
        );
    }
}

/// How often idle I/O buffers of unused sizes go back to the system.
const POOL_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns the buffer pool's idle memory of sizes nobody used in the last
/// interval, so an agent whose load stopped holds no pooled memory.
async fn trim_buffer_pool() {
    let mut interval = tokio::time::interval(POOL_TRIM_INTERVAL);
    loop {
        interval.tick().await;
        let released = buf::pool::trim();
        if released > 0 {
            tracing::debug!(released, "Released idle I/O buffers");
        }
    }
}

impl Args {
    fn node_identity(&self) -> anyhow::Result<NodeIdentity> {
        let node_id = self.node_id.clone().unwrap_or_else(registration::hostname);
        Ok(NodeIdentity::new(
            node_id,
            &self.topology,
            format!("http://{}", self.grpc_listen),
            self.data_listen.map(|a| a.to_string()).unwrap_or_default(),
        )?)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = args.agent_config();
    let agent = tokio::task::spawn_blocking(move || Agent::open(&config))
        .await?
        .map_err(|e| anyhow::anyhow!(ballast_storage_node::error_chain(&e)))
        .context("Cannot start the agent")?;
    let agent = Arc::new(agent);
    warn_unless_loopback("agent API (--grpc-listen)", args.grpc_listen);
    if let Some(listen) = args.data_listen {
        warn_unless_loopback("replica protocol (--data-listen)", listen);
    }
    let replica_server = match args.data_listen {
        Some(listen) => Some(
            agent
                .serve_replicas(listen)
                .await
                .context("Cannot start the replica protocol listener")?,
        ),
        None => None,
    };
    let registration = match &args.controller {
        Some(controller) => Some(tokio::spawn(registration::run(
            agent.clone(),
            args.node_identity()?,
            registration::controller_channel(controller)?,
        ))),
        None => None,
    };

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = sigint.recv() => info!("SIGINT received"),
        }
    };
    tokio::spawn(trim_buffer_pool());
    info!(grpc = %args.grpc_listen, "Serving the agent API");
    let node_plugin = match &args.node_plugin_endpoint {
        Some(endpoint) => Some(
            tonic::transport::Endpoint::from_shared(endpoint.clone())
                .with_context(|| format!("Invalid --node-plugin-endpoint {endpoint:?}"))?
                .connect_lazy(),
        ),
        None => None,
    };
    let served = api::serve(agent.clone(), args.grpc_listen, node_plugin, shutdown).await;
    if let Some(registration) = registration {
        registration.abort();
    }
    if let Some(server) = replica_server {
        server.stop().await;
    }
    if let Err(e) = agent.shutdown().await {
        error!(error = %ballast_storage_node::error_chain(&e), "Clean shutdown failed");
    }
    served.context("The agent API failed")?;
    info!("Agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_default_to_loopback() {
        // The environment may name addresses; the defaults are the point.
        for var in ["BALLAST_GRPC_LISTEN", "BALLAST_DATA_LISTEN"] {
            assert!(std::env::var_os(var).is_none(), "{var} is set");
        }
        let args = Args::try_parse_from(["ballast-agent"]).expect("defaults parse");
        assert!(args.grpc_listen.ip().is_loopback(), "{}", args.grpc_listen);
        assert_eq!(
            args.data_listen, None,
            "the replica protocol listens only where told"
        );
        let given = Args::try_parse_from([
            "ballast-agent",
            "--grpc-listen",
            "10.0.0.5:9500",
            "--data-listen",
            "10.0.0.5:9700",
        ])
        .expect("explicit addresses parse");
        assert_eq!(given.grpc_listen.to_string(), "10.0.0.5:9500");
        assert_eq!(
            given.data_listen.map(|a| a.to_string()).as_deref(),
            Some("10.0.0.5:9700")
        );
    }
}
