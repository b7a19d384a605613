//! `ballast cluster ...`: a whole cluster on this machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use ballast_csi::cluster::{self, ClusterInfo, ClusterSpec, StoreKind};
use clap::Subcommand;

use crate::output::{self, Format};
use ballast_storage_node::parse_bytes;

/// The cluster store a local cluster uses.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Store {
    /// One file in the cluster directory.
    Embedded,
    /// A real etcd on loopback (Debian's etcd-server).
    Etcd,
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Starts a controller and N agents with file-backed pools on loopback,
    /// and waits until every node is up. Needs root (loop devices, mounts).
    Up {
        /// Directory for pools, state, logs and cluster.json.
        #[arg(long, env = "BALLAST_CLUSTER")]
        dir: PathBuf,
        /// Number of nodes (agents).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Size of each node's pool file.
        #[arg(long, default_value = "4GiB", value_parser = parse_bytes)]
        pool_size: u64,
        /// Cluster store of the controller.
        #[arg(long, value_enum, default_value_t = Store::Embedded)]
        store: Store,
        /// Passed to the controller: a node without a heartbeat for this
        /// long is down (e.g. 10s).
        #[arg(long)]
        heartbeat_timeout: Option<String>,
        /// Passed to the controller: replicas of a node down this long are
        /// replaced elsewhere (e.g. 10m).
        #[arg(long)]
        node_down_after: Option<String>,
        /// Longest wait for every node to be up, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Shows the cluster's processes and nodes.
    Status {
        /// The cluster directory.
        #[arg(long, env = "BALLAST_CLUSTER")]
        dir: PathBuf,
    },
    /// Starts a stopped or killed agent of the cluster again (same node id,
    /// pool and ports); it re-imports its replicas and registers.
    RestartNode {
        /// The node id (node-K).
        node: String,
        /// The cluster directory.
        #[arg(long, env = "BALLAST_CLUSTER")]
        dir: PathBuf,
    },
    /// Stops every process of the cluster and removes its mounts and loop
    /// devices. Safe to run twice.
    Down {
        /// The cluster directory.
        #[arg(long, env = "BALLAST_CLUSTER")]
        dir: PathBuf,
    },
}

pub async fn run(cmd: ClusterCommand, format: Format) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Up {
            dir,
            nodes,
            pool_size,
            store,
            heartbeat_timeout,
            node_down_after,
            timeout,
        } => {
            anyhow::ensure!(nodes >= 1, "A cluster needs at least one node");
            let mut spec = ClusterSpec::new(&dir, nodes);
            spec.pool_size_bytes = pool_size;
            spec.store = match store {
                Store::Embedded => StoreKind::Embedded,
                Store::Etcd => StoreKind::Etcd,
            };
            spec.ready_timeout = Duration::from_secs(timeout);
            if let Some(t) = heartbeat_timeout {
                spec.controller_args
                    .extend(["--heartbeat-timeout".to_string(), t]);
            }
            if let Some(t) = node_down_after {
                spec.controller_args
                    .extend(["--node-down-after".to_string(), t]);
            }
            let info = cluster::up(&spec)
                .await
                .with_context(|| format!("Cannot start the cluster in {}", dir.display()))?;
            let text = format!(
                "Cluster up in {}: controller {} ({}), {} node(s) with CSI node plugins\nUse: export BALLAST_CLUSTER={}",
                info.dir.display(),
                info.controller_address().unwrap_or_default(),
                info.store,
                info.nodes.len(),
                info.dir.display()
            );
            output::print_item(format, &info, &text)
        }
        ClusterCommand::Status { dir } => {
            let info = ClusterInfo::load(&dir)?;
            let nodes = cluster::list_nodes(&info).await.ok();
            if let Format::Json = format {
                return output::print_item(format, &info, "");
            }
            println!("Cluster:    {}", info.dir.display());
            println!("Store:      {}", info.store);
            if let Some(controller) = &info.controller {
                println!(
                    "Controller: {} (pid {}, {})",
                    controller.address,
                    controller.process.pid,
                    running(&controller.process)
                );
                println!("CSI:        {}", controller.csi_endpoint);
            }
            if let Some(etcd) = &info.etcd {
                println!(
                    "etcd:       {} (pid {}, {})",
                    etcd.client_url,
                    etcd.process.pid,
                    running(&etcd.process)
                );
            }
            output::print_list(
                format,
                &info.nodes,
                &[
                    "NODE",
                    "STATE",
                    "PROCESS",
                    "AGENT",
                    "DATA",
                    "NODE PLUGIN",
                    "LOG",
                ],
                |n| {
                    let state = nodes
                        .as_ref()
                        .and_then(|list| list.iter().find(|m| m.node_id == n.node_id))
                        .map(|m| m.state.clone())
                        .unwrap_or_else(|| "unknown".to_string());
                    vec![
                        n.node_id.clone(),
                        state,
                        format!("{} ({})", n.process.pid, running(&n.process)),
                        n.agent_address.clone(),
                        n.data_address.clone(),
                        n.plugin.as_ref().map_or_else(
                            || "-".to_string(),
                            |p| format!("{} ({}, {})", n.csi_endpoint, p.pid, running(p)),
                        ),
                        n.process.log.display().to_string(),
                    ]
                },
            )
        }
        ClusterCommand::RestartNode { node, dir } => {
            let restarted = cluster::restart_node(&dir, &node)
                .with_context(|| format!("Cannot restart {node} in {}", dir.display()))?;
            println!("Restarted {node} (pid {})", restarted.process.pid);
            Ok(())
        }
        ClusterCommand::Down { dir } => {
            cluster::down(&dir)
                .with_context(|| format!("Cannot stop the cluster in {}", dir.display()))?;
            println!("Cluster in {} is down", dir.display());
            Ok(())
        }
    }
}

fn running(process: &cluster::ProcessInfo) -> &'static str {
    if process.is_running() {
        "running"
    } else {
        "stopped"
    }
}
