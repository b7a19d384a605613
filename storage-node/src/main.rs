//! `ballast-agent`: the storage agent that runs on every node.
//!
//! Opens the node's pools (formatting blank disks, importing Ballast pools,
//! refusing anything that carries data), then serves the agent gRPC API
//! until SIGTERM or SIGINT, when it stops its exports and closes its pools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ballast_storage_node::agent::{Agent, AgentConfig};
use ballast_storage_node::api;
use ballast_storage_node::pool::{self, PoolConfig, PoolSource};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

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
    #[arg(long, value_parser = parse_bytes)]
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

    /// Address of the replica protocol listener (HOST:PORT), advertised to
    /// the controller for other nodes' targets.
    #[arg(long, env = "BALLAST_DATA_LISTEN")]
    data_listen: Option<SocketAddr>,
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("invalid size {text:?}: {e}"))
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
        .map_err(|e| anyhow::anyhow!(pool::error_chain(&e)))
        .context("Cannot start the agent")?;
    let agent = Arc::new(agent);
    let replica_server = match args.data_listen {
        Some(listen) => Some(
            agent
                .serve_replicas(listen)
                .await
                .context("Cannot start the replica protocol listener")?,
        ),
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
    info!(grpc = %args.grpc_listen, "Serving the agent API");
    let served = api::serve(agent.clone(), args.grpc_listen, shutdown).await;
    if let Some(server) = replica_server {
        server.stop().await;
    }
    if let Err(e) = agent.shutdown().await {
        error!(error = %pool::error_chain(&e), "Clean shutdown failed");
    }
    served.context("The agent API failed")?;
    info!("Agent stopped");
    Ok(())
}
