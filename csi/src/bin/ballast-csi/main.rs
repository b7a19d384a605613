//! `ballast-csi`: Ballast's control-plane processes.
//!
//! `ballast-csi controller` runs the controller: it opens the cluster
//! store, serves the management API (nodes, volumes, target control) on
//! `--listen` and, with `--endpoint`, the CSI Identity and Controller
//! services on a unix socket, and runs the reconcilers, until SIGTERM or
//! SIGINT.
//!
//! `ballast-csi node` runs the CSI node plugin: the Identity and Node
//! services on a unix socket, attaching volumes over NBD, formatting and
//! mounting them.
//!
//! `ballast-csi probe` calls Identity.Probe on an endpoint: the liveness and
//! readiness probe of the chart's pods.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ballast_csi::controller::snapshot::pod_hooks::PodExecHooks;
use ballast_csi::controller::snapshot::quiesce::{HookRunner, NodePluginHooks};
use ballast_csi::controller::{self, Context, ControllerConfig};
use ballast_csi::node::attach::{self, AttachMode};
use ballast_csi::node::freeze::Freezer;
use ballast_csi::node::mount::SystemMounter;
use ballast_csi::service::group_controller::GroupController;
use ballast_csi::service::snapshot_metadata::SnapshotMetadata;
use ballast_csi::service::{self, controller::Controller, identity::Identity, node::Node};
use ballast_csi::store;
use ballast_proto::agent::quiesce_service_server::QuiesceServiceServer;
use ballast_proto::csi::controller_server::ControllerServer;
use ballast_proto::csi::group_controller_server::GroupControllerServer;
use ballast_proto::csi::identity_client::IdentityClient;
use ballast_proto::csi::identity_server::IdentityServer;
use ballast_proto::csi::node_server::NodeServer;
use ballast_proto::csi::snapshot_metadata_server::SnapshotMetadataServer;
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
    /// Runs the CSI node plugin: attach, format, mount and publish
    /// volumes on this node.
    Node(NodeArgs),
    /// Calls Identity.Probe on a CSI endpoint; exits 0 when the plugin is
    /// ready, 1 otherwise (a pod's exec probe).
    Probe(ProbeArgs),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// The CSI endpoint: unix:///path/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,

    /// How long the probe may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct NodeArgs {
    /// The CSI endpoint kubelet dials: unix:///path/csi.sock (mode 0600).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,

    /// This node's id: the id its storage agent registered with.
    #[arg(long, env = "BALLAST_NODE_ID")]
    node_id: String,

    /// Where the plugin keeps its attachment records.
    #[arg(
        long,
        env = "BALLAST_NODE_STATE_DIR",
        default_value = "/var/lib/ballast/csi-node"
    )]
    state_dir: std::path::PathBuf,

    /// How volumes become block devices: auto (kernel nbd when loaded,
    /// else nbdfuse + loop), kernel-nbd or nbdfuse-loop.
    #[arg(long, default_value = "auto")]
    attach: AttachMode,

    /// Most volumes published on this node at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,

    /// A topology label of this node, KEY=VALUE (repeatable), e.g.
    /// topology.kubernetes.io/zone=zone-a: NodeGetInfo reports it next to
    /// topology.ballast.io/node=<node id>. Give the agent the same labels.
    #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = parse_label)]
    topology: Vec<(String, String)>,
}

/// Parses a `KEY=VALUE` topology label; both sides must be non-empty.
fn parse_label(label: &str) -> Result<(String, String), String> {
    match label.split_once('=') {
        Some((key, value)) if !key.is_empty() && !value.is_empty() => {
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got {label:?}")),
    }
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

    /// Also serve the CSI Identity and Controller services on this
    /// endpoint: unix:///path/csi.sock (created with mode 0600).
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: Option<String>,

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

    /// Where snapshot hooks run: node-plugin (a process on the member's
    /// node, through its agent) or kubernetes (exec in the pods that mount
    /// the member's PVC, with the hooks their annotations declare; the API
    /// server from the in-cluster config or KUBECONFIG).
    #[arg(long, value_enum, default_value = "node-plugin")]
    snapshot_hooks: SnapshotHooks,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SnapshotHooks {
    NodePlugin,
    Kubernetes,
}

/// Parses a positive duration as humantime does ("500ms", "10s", "10m",
/// "1h 30m"); a bare number is seconds, as this flag always took it.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text)
            .map_err(|e| format!("invalid duration {text:?}: {e} (e.g. 500ms, 10s, 10m, 1h)"))?,
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
        Command::Node(args) => run_node(args).await,
        Command::Probe(args) => probe(args).await,
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
    if !args.listen.ip().is_loopback() {
        // docs/architecture.md, "Trust boundary".
        warn!(
            address = %args.listen,
            "The management API (--listen) accepts unauthenticated connections beyond this machine: keep it on a network only the cluster's nodes reach"
        );
    }
    let mut config = ControllerConfig::new(args.listen);
    if let Some(advertise) = args.advertise_address {
        config.advertise_address = advertise;
    }
    config.heartbeat_timeout = args.heartbeat_timeout;
    config.node_down_after = args.node_down_after;
    config.reconcile_interval = args.reconcile_interval;
    config.agent_timeout = args.agent_timeout;
    let hooks: Arc<dyn HookRunner> = match args.snapshot_hooks {
        SnapshotHooks::NodePlugin => Arc::new(NodePluginHooks),
        SnapshotHooks::Kubernetes => Arc::new(PodExecHooks::new(
            kube::Client::try_default()
                .await
                .context("Cannot reach the Kubernetes API server (--snapshot-hooks kubernetes)")?,
        )),
    };
    let context = Context::with_hooks(store, config, hooks);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let csi = match &args.endpoint {
        Some(endpoint) => {
            let (path, incoming) = service::listen(endpoint)?;
            info!(endpoint = %path.display(), "Serving the CSI Identity and Controller services");
            let volumes = Arc::new(controller::volume::Volumes::new(context.clone()));
            let snapshots = Arc::new(controller::snapshot::Snapshots::new(context.clone()));
            let mut stopped = stopped.clone();
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(IdentityServer::new(Identity))
                    .add_service(ControllerServer::new(Controller::new(
                        volumes,
                        snapshots.clone(),
                    )))
                    .add_service(SnapshotMetadataServer::new(SnapshotMetadata::new(
                        snapshots.clone(),
                    )))
                    .add_service(GroupControllerServer::new(GroupController::new(snapshots)))
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }),
            ))
        }
        None => None,
    };
    let mut management_stopped = stopped.clone();
    let management = controller::run(context, async move {
        let _ = management_stopped.wait_for(|s| *s).await;
    });
    tokio::pin!(management);
    let signalled = wait_for_signal()?;
    tokio::pin!(signalled);
    let result = tokio::select! {
        result = &mut management => result.map_err(anyhow::Error::from),
        () = &mut signalled => {
            let _ = stop.send(true);
            management.await.map_err(anyhow::Error::from)
        }
    };
    let _ = stop.send(true);
    if let Some(csi) = csi {
        csi.await
            .context("The CSI server task failed")?
            .context("Cannot serve the CSI services")?;
    }
    result?;
    info!("Controller stopped");
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT.
fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM received"),
            _ = sigint.recv() => info!("SIGINT received"),
        }
    })
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    ballast_csi::controller::node::operations::validate_node_id(&args.node_id)
        .with_context(|| format!("Invalid --node-id {:?}", args.node_id))?;
    std::fs::create_dir_all(&args.state_dir).with_context(|| {
        format!(
            "Cannot create the state directory {}",
            args.state_dir.display()
        )
    })?;
    let attacher = attach::attacher(args.attach, &args.state_dir)
        .context("Cannot set up the attach backend")?;
    info!(node.id = %args.node_id, attach = attacher.name(), "Node plugin starting");
    let mounter: Arc<SystemMounter> = Arc::new(SystemMounter::new());
    let freezer = Freezer::new(&args.state_dir, attacher.clone(), mounter.clone());
    // A node plugin that died with a filesystem frozen must not leave the
    // pod's writes stalled until someone notices.
    freezer.thaw_recorded().await;
    let node = Node::new(
        service::node::NodeConfig {
            node_id: args.node_id.clone(),
            max_volumes: args.max_volumes,
            topology: args.topology.iter().cloned().collect(),
        },
        attacher,
        mounter,
    );
    let (path, incoming) = service::listen(&args.endpoint)?;
    info!(endpoint = %path.display(), "Serving the CSI Identity and Node services, and QuiesceService");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(Identity))
        .add_service(NodeServer::new(node))
        .add_service(QuiesceServiceServer::new(service::quiesce::Quiesce::new(
            freezer,
        )))
        .serve_with_incoming_shutdown(incoming, wait_for_signal()?)
        .await
        .context("Cannot serve the CSI services")?;
    info!("Node plugin stopped");
    Ok(())
}

/// Calls Identity.Probe on `args.endpoint`; fails unless the plugin answers
/// within `args.timeout` and does not say it is not ready (CSI spec,
/// "Probe": an empty `ready` means ready).
async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let call = async {
        let channel = tonic::transport::Endpoint::from_shared(args.endpoint.clone())
            .with_context(|| format!("Invalid --endpoint {:?}", args.endpoint))?
            .connect()
            .await
            .with_context(|| format!("Cannot connect to {}", args.endpoint))?;
        let response = IdentityClient::new(channel)
            .probe(ballast_proto::csi::ProbeRequest {})
            .await
            .context("Probe failed")?
            .into_inner();
        match response.ready {
            Some(false) => anyhow::bail!("The plugin at {} is not ready", args.endpoint),
            _ => Ok(()),
        }
    };
    tokio::time::timeout(args.timeout, call)
        .await
        .with_context(|| format!("No answer from {} within {:?}", args.endpoint, args.timeout))?
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
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        for bad in ["", "s", "10x", "-1s", "0s", "0"] {
            assert!(parse_duration(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn topology_labels_need_a_key_and_a_value() {
        assert_eq!(
            parse_label("topology.kubernetes.io/zone=zone-a"),
            Ok(("topology.kubernetes.io/zone".into(), "zone-a".into()))
        );
        for bad in ["zone", "=zone-a", "topology.kubernetes.io/zone="] {
            assert!(parse_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_management_api_defaults_to_loopback() {
        assert!(std::env::var_os("BALLAST_CONTROLLER_LISTEN").is_none());
        let cli = Cli::try_parse_from(["ballast-csi", "controller", "--store", "embedded:///x"])
            .expect("defaults parse");
        let Command::Controller(args) = cli.command else {
            panic!("not the controller");
        };
        assert!(args.listen.ip().is_loopback(), "{}", args.listen);
    }
}
