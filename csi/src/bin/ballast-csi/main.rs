//! `ballast-csi`: Ballast's control-plane processes.
//!
//! `ballast-csi controller` runs the controller: it opens the cluster
//! store, serves the management API (nodes, volumes, target control) on
//! `--listen`, and runs the reconcilers, until SIGTERM or SIGINT. The CSI
//! node plugin (`ballast-csi node`) joins in a later release.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use ballast_csi::controller::{self, Context, ControllerConfig};
use ballast_csi::store;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Ballast control plane.
#[derive(Parser)]
#[command(name = "ballast-csi", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the controller: cluster store, node registry, volumes,
    /// placement, publication, in-sync sets and reconcilers.
    Controller(ControllerArgs),
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Address of the management gRPC API (TCP).
    #[arg(
        long,
        env = "BALLAST_CONTROLLER_LISTEN",
        default_value = "127.0.0.1:9600"
    )]
    listen: SocketAddr,

    /// The management API's address as agents and targets reach it
    /// (default: http://<--listen>). Set it when listening on 0.0.0.0.
    #[arg(long, env = "BALLAST_CONTROLLER_ADVERTISE")]
    advertise_address: Option<String>,

    /// The cluster store: embedded:///path/ballast.redb (one file, for a
    /// single machine) or etcd://host:port[,host:port...][/namespace].
    #[arg(long, env = "BALLAST_STORE")]
    store: String,

    /// A node without a heartbeat for this long is down (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,

    /// A faulted replica whose node has been down this long is replaced by
    /// a new replica on another node (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    node_down_after: Duration,

    /// Time between two passes of the reconcilers.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    reconcile_interval: Duration,

    /// How long one call to an agent may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    agent_timeout: Duration,
}

/// Parses "500ms", "10s", "10m", "1h" (a bare number is seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 10s, 10m, 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "" | "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.saturating_mul(60)),
        "h" => Duration::from_secs(number.saturating_mul(3600)),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    if duration.is_zero() {
        return Err(format!("the duration {text:?} must be greater than zero"));
    }
    Ok(duration)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Controller(args) => run_controller(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_controller(args: ControllerArgs) -> anyhow::Result<()> {
    if args.heartbeat_timeout >= args.node_down_after {
        anyhow::bail!(
            "--node-down-after ({:?}) must be longer than --heartbeat-timeout ({:?})",
            args.node_down_after,
            args.heartbeat_timeout
        );
    }
    if args.heartbeat_timeout < Duration::from_secs(5) {
        // Agents send a heartbeat every 2 s.
        warn!(
            timeout = ?args.heartbeat_timeout,
            "A heartbeat timeout under 5 s (2.5 agent heartbeats) lets nodes flap on a loaded machine"
        );
    }
    let store = store::open_store(&args.store)
        .await
        .with_context(|| format!("Cannot open the cluster store {}", args.store))?;
    info!(store = %args.store, "Cluster store opened");
    let mut config = ControllerConfig::new(args.listen);
    if let Some(advertise) = args.advertise_address {
        config.advertise_address = advertise;
    }
    config.heartbeat_timeout = args.heartbeat_timeout;
    config.node_down_after = args.node_down_after;
    config.reconcile_interval = args.reconcile_interval;
    config.agent_timeout = args.agent_timeout;
    let context = Context::new(store, config);

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = sigint.recv() => info!("SIGINT received"),
        }
    };
    controller::run(context, shutdown).await?;
    info!("Controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10x", "-1s", "0s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
    }
}
