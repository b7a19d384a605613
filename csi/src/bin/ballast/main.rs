//! `ballast`: the operator's command-line tool.
//!
//! Talks to a storage agent's gRPC API (`--agent`) to list pools, manage
//! replicas and start NBD exports. Every command prints a table by default and
//! JSON with `-o json`; errors go to stderr with a non-zero exit code.

mod export;
mod output;
mod pool;
mod replica;

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
    let channel = connect(&cli.agent).await?;
    match cli.command {
        Command::Pool(cmd) => pool::run(cmd, channel, cli.output).await,
        Command::Replica(cmd) => replica::run(cmd, channel, cli.output).await,
        Command::Export(cmd) => export::run(cmd, channel, cli.output).await,
    }
}

async fn connect(address: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(address.to_string())
        .map_err(|e| anyhow::anyhow!("Invalid agent address {address:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint
        .connect()
        .await
        .with_context(|| format!("Cannot reach the agent at {address}"))
}

/// Turns a gRPC status into a readable error: the server's message and code.
fn status_error(action: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{action}: {} ({:?})", status.message(), status.code())
}

/// Parses a size in bytes with an optional SI or IEC suffix (`512MiB`,
/// `4GiB`, `1Gi`, `10G`).
fn parse_bytes(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("invalid size {text:?}: {e}"))
}
