//! `ballast`: the operator's command-line tool.
//!
//! - `pool`, `replica`, `export` talk to one storage agent's gRPC API
//!   (`--agent`).
//! - `volume` and `node` talk to the controller: the one of the local
//!   cluster in `--cluster DIR` (its `cluster.json`), or `--controller URL`.
//! - `cluster up | status | down` start and stop a whole cluster on this
//!   machine.
//! - `demo` runs the end-to-end story with PostgreSQL on a local cluster.
//!
//! Every list and show command prints a table by default and JSON with
//! `-o json`; errors go to stderr with a non-zero exit code.

mod cluster;
mod demo;
mod export;
mod node;
mod output;
mod pool;
mod replica;
mod snapshot;
mod volume;

use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

use crate::output::Format;

/// Ballast: replicated block storage for Kubernetes.
#[derive(Parser)]
#[command(name = "ballast", version)]
struct Cli {
    /// gRPC address of the storage agent to talk to.
    #[arg(
        long,
        global = true,
        env = "BALLAST_AGENT",
        default_value = "http://127.0.0.1:9500"
    )]
    agent: String,

    /// Directory of a local cluster (`ballast cluster up --dir`): volume and
    /// node commands talk to its controller.
    #[arg(long, global = true, env = "BALLAST_CLUSTER")]
    cluster: Option<PathBuf>,

    /// The controller's management API (http://HOST:PORT); overrides
    /// --cluster.
    #[arg(long, global = true, env = "BALLAST_CONTROLLER")]
    controller: Option<String>,

    /// Output format of list and show commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Storage pools of the agent (its disks).
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Replicas: files in pools that hold a volume's data.
    #[command(subcommand)]
    Replica(replica::ReplicaCommand),
    /// NBD exports serving replicas.
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Replicated volumes (through the controller).
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Volume snapshots (through the controller).
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Nodes registered with the controller.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// A whole cluster on this machine: controller and agents on loopback.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// The end-to-end demo: PostgreSQL on a 3-replica volume of a local
    /// cluster, driven through CSI, through the loss of a replica's node
    /// and a failover to another node; prints a report with measured
    /// numbers and exits non-zero if a check fails. Needs root and
    /// PostgreSQL (scripts/demo.sh installs what is missing).
    Demo(demo::DemoArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Pool(cmd) => pool::run(cmd, connect("agent", &cli.agent).await?, cli.output).await,
        Command::Replica(cmd) => {
            replica::run(cmd, connect("agent", &cli.agent).await?, cli.output).await
        }
        Command::Export(cmd) => {
            export::run(cmd, connect("agent", &cli.agent).await?, cli.output).await
        }
        Command::Volume(cmd) => {
            let address = controller_address(cli.controller, cli.cluster)?;
            volume::run(cmd, connect("controller", &address).await?, cli.output).await
        }
        Command::Snapshot(cmd) => {
            let address = controller_address(cli.controller, cli.cluster)?;
            snapshot::run(cmd, connect("controller", &address).await?, cli.output).await
        }
        Command::Node(cmd) => {
            let address = controller_address(cli.controller, cli.cluster)?;
            node::run(cmd, connect("controller", &address).await?, cli.output).await
        }
        Command::Cluster(cmd) => cluster::run(cmd, cli.output).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

/// The controller to talk to: `--controller`, else the one in the
/// cluster file of `--cluster`.
fn controller_address(
    controller: Option<String>,
    cluster: Option<PathBuf>,
) -> anyhow::Result<String> {
    if let Some(address) = controller {
        return Ok(address);
    }
    let Some(dir) = cluster else {
        anyhow::bail!(
            "No controller: give --cluster DIR (or set BALLAST_CLUSTER) for a local cluster, or --controller URL"
        );
    };
    let info = ballast_csi::cluster::ClusterInfo::load(&dir)?;
    info.controller_address()
        .map(str::to_string)
        .with_context(|| format!("The cluster in {} has no controller", dir.display()))
}

async fn connect(what: &str, address: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|e| anyhow::anyhow!("Invalid {what} address {address:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .with_context(|| format!("Cannot reach the {what} at {address}"))
}

/// Turns a gRPC status into a readable error: the server's message and code.
fn status_error(action: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{action}: {} ({:?})", status.message(), status.code())
}
