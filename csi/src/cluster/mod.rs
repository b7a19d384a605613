//! A whole Ballast cluster on one machine, for development, trials and the
//! integration tests: `ballast cluster up | status | down`.
//!
//! [`up`] starts, all on loopback and daemonised (see [`process`]):
//!
//! - with the etcd store, a real `etcd` (Debian's `etcd-server`, or the
//!   binary named by `BALLAST_ETCD`) with its data in `DIR/etcd`;
//! - the controller, `ballast-csi controller`, with the embedded store in
//!   `DIR/ballast.redb` or the etcd above;
//! - N agents, `ballast-agent`, each with a file-backed pool
//!   `DIR/node-K/pool.img` and state in `DIR/node-K/state`, registered with
//!   the controller as `node-K`;
//! - next to each agent, its CSI node plugin, `ballast-csi node`, serving
//!   Identity, Node and QuiesceService on `DIR/node-K/csi.sock` (the agent
//!   forwards freezes and hooks there) with its state in
//!   `DIR/node-K/csi-state` (attach backend auto-detected);
//!
//! then waits (bounded) until every node is registered and up and every
//! CSI socket exists, and writes
//! `DIR/cluster.json` ([`ClusterInfo`]): addresses, pids, logs. The file
//! is written after each process starts, so [`down`] can stop whatever a
//! failed `up` left. Logs are `DIR/*.log`. Running `up` again on a stopped
//! cluster restarts it on the same ports with the same data.
//!
//! [`down`] first unstages what the node plugins left attached: it stops
//! the plugins, then, while the agents still serve the volumes (so dirty
//! pages reach every replica), unmounts every mount of a loop device backed
//! by a file in a plugin's state directory, wherever it is mounted, and
//! detaches those loop devices and their nbdfuse. Then it stops the other processes
//! the cluster file names (SIGTERM, then SIGKILL after a grace period; a
//! pid is signalled only if its start time matches the record, see
//! [`process`]), unmounts everything under `DIR` and detaches loop devices
//! backed by files under `DIR`. It is safe to run twice. This module must never signal a process it did not start or
//! touch anything outside `DIR`.
//!
//! Binaries are looked up in one directory, by default the one holding the
//! running executable (`ballast`, `ballast-csi` and `ballast-agent` are
//! built side by side).

pub mod cleanup;
pub mod process;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_proto::controller::ListNodesRequest;
use ballast_proto::controller::node_service_client::NodeServiceClient;
use serde::{Deserialize, Serialize};

pub use process::ProcessInfo;

/// Name of the cluster file in the cluster directory.
pub const CLUSTER_FILE: &str = "cluster.json";

/// How long processes get to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(20);

/// Errors of the local cluster launcher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation failed.
    #[error("Cannot access {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The cluster file cannot be read or written.
    #[error("Invalid cluster file {path}")]
    ClusterFile {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// There is no cluster file in the directory.
    #[error(
        "No cluster in {dir}: {CLUSTER_FILE} is missing (run `ballast cluster up --dir {dir}`)"
    )]
    NoCluster {
        /// The directory.
        dir: PathBuf,
    },
    /// The cluster has no node of that id.
    #[error("The cluster has no node {node_id}")]
    NodeNotFound {
        /// The node id asked for.
        node_id: String,
    },
    /// The cluster's processes still run.
    #[error(
        "The cluster in {dir} is already running; run `ballast cluster down --dir {dir}` first"
    )]
    AlreadyRunning {
        /// The directory.
        dir: PathBuf,
    },
    /// A binary is missing.
    #[error("{path} is missing; build the workspace binaries (cargo build --workspace --bins)")]
    MissingBinary {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A process could not be started.
    #[error("Cannot start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A signal could not be sent.
    #[error("Cannot signal process {pid}")]
    Signal {
        /// The process id.
        pid: i32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// A process did not stop after SIGSTOP.
    #[error("Cannot stop a process")]
    Stop(#[from] ballast_storage_node::host::process::Error),
    /// A component did not become ready in time.
    #[error("{what} not ready after {timeout:?}; last log lines:\n{log_tail}")]
    NotReady {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// The end of the relevant log.
        log_tail: String,
    },
    /// A process exited during start-up.
    #[error("{what} exited during start-up; last log lines:\n{log_tail}")]
    Exited {
        /// Which process.
        what: String,
        /// The end of its log.
        log_tail: String,
    },
    /// No free port could be found on loopback.
    #[error("Cannot find a free port on 127.0.0.1")]
    NoPort(#[source] std::io::Error),
    /// `down` could not remove everything.
    #[error(
        "Left behind after stopping the cluster: processes {processes:?}, mounts {mounts:?}, loop devices {loops:?}"
    )]
    Leftovers {
        /// Pids still running.
        processes: Vec<i32>,
        /// Mounts still under the directory.
        mounts: Vec<PathBuf>,
        /// Loop devices still backed by files under the directory.
        loops: Vec<PathBuf>,
    },
}

/// Which cluster store the controller uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One redb file in the cluster directory.
    Embedded,
    /// A real etcd on loopback.
    Etcd,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The cluster directory.
    pub dir: PathBuf,
    /// Number of agents.
    pub nodes: usize,
    /// Size of each agent's pool file (created sparse).
    pub pool_size_bytes: u64,
    /// The store backend.
    pub store: StoreKind,
    /// Where `ballast-csi` and `ballast-agent` are.
    pub bin_dir: PathBuf,
    /// Extra `ballast-csi controller` flags (e.g. `--node-down-after 30s`).
    pub controller_args: Vec<String>,
    /// How long to wait for every node to be up.
    pub ready_timeout: Duration,
}

impl ClusterSpec {
    /// A spec with defaults: 4 GiB pools, the embedded store, binaries
    /// next to the running executable, 120 s to get ready.
    pub fn new(dir: impl Into<PathBuf>, nodes: usize) -> Self {
        let bin_dir = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        Self {
            dir: dir.into(),
            nodes,
            pool_size_bytes: 4 << 30,
            store: StoreKind::Embedded,
            bin_dir,
            controller_args: Vec::new(),
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// The etcd of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdInfo {
    /// Client URL (`http://127.0.0.1:P`).
    pub client_url: String,
    /// Peer port.
    pub peer_port: u16,
    /// The process.
    pub process: ProcessInfo,
}

/// The controller of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// Management API (`http://127.0.0.1:P`).
    pub address: String,
    /// The CSI Identity and Controller services (`unix:///DIR/csi.sock`);
    /// empty in clusters started before the controller served CSI.
    #[serde(default)]
    pub csi_endpoint: String,
    /// The process.
    pub process: ProcessInfo,
}

/// One agent of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id (`node-K`).
    pub node_id: String,
    /// The agent's gRPC API (`http://127.0.0.1:P`).
    pub agent_address: String,
    /// The agent's replica protocol address (`127.0.0.1:P`).
    pub data_address: String,
    /// The pool file.
    pub pool_file: PathBuf,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// The agent process.
    pub process: ProcessInfo,
    /// The node plugin's CSI Identity and Node services
    /// (`unix:///DIR/node-K/csi.sock`); empty in clusters started before
    /// `up` started node plugins.
    #[serde(default)]
    pub csi_endpoint: String,
    /// The node plugin's state directory (its attachments live there).
    #[serde(default)]
    pub csi_state_dir: Option<PathBuf>,
    /// The node plugin process (`ballast-csi node`).
    #[serde(default)]
    pub plugin: Option<ProcessInfo>,
}

impl NodeInfo {
    /// The path of the node plugin's CSI socket, if it has one.
    pub fn csi_socket(&self) -> Option<&Path> {
        self.csi_endpoint.strip_prefix("unix://").map(Path::new)
    }
}

/// `DIR/cluster.json`: everything needed to talk to and stop a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster directory (absolute).
    pub dir: PathBuf,
    /// The store address the controller uses.
    pub store: String,
    /// The store backend.
    pub store_kind: StoreKind,
    /// The etcd, with the etcd store.
    pub etcd: Option<EtcdInfo>,
    /// The controller, once started.
    pub controller: Option<ControllerInfo>,
    /// The agents started so far.
    pub nodes: Vec<NodeInfo>,
}

impl ClusterInfo {
    /// The controller's management API address.
    pub fn controller_address(&self) -> Option<&str> {
        self.controller.as_ref().map(|c| c.address.as_str())
    }

    /// Every process of the cluster: node plugins, agents, then controller,
    /// then etcd (the order `down` stops them in).
    pub fn processes(&self) -> Vec<&ProcessInfo> {
        self.nodes
            .iter()
            .filter_map(|n| n.plugin.as_ref())
            .chain(self.nodes.iter().map(|n| &n.process))
            .chain(self.controller.iter().map(|c| &c.process))
            .chain(self.etcd.iter().map(|e| &e.process))
            .collect()
    }

    /// Reads `DIR/cluster.json`.
    ///
    /// # Errors
    ///
    /// [`Error::NoCluster`] if it does not exist, [`Error::ClusterFile`] if
    /// it does not parse.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(CLUSTER_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoCluster {
                    dir: dir.to_path_buf(),
                });
            }
            Err(source) => return Err(Error::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|source| Error::ClusterFile { path, source })
    }

    /// Writes `DIR/cluster.json` atomically (temporary file, rename).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] or [`Error::ClusterFile`].
    pub fn save(&self) -> Result<(), Error> {
        let path = self.dir.join(CLUSTER_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::ClusterFile {
            path: path.clone(),
            source,
        })?;
        let tmp = self.dir.join(format!(".{CLUSTER_FILE}.tmp"));
        fs::write(&tmp, text + "\n").map_err(|source| Error::Io {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| Error::Io { path, source })
    }
}

/// Starts a cluster as `spec` says and waits until every node is up.
/// On failure, stops whatever it started before returning the error.
///
/// # Errors
///
/// [`Error::AlreadyRunning`], [`Error::MissingBinary`], [`Error::Spawn`],
/// [`Error::NotReady`] and [`Error::Exited`] (with log lines), and I/O
/// errors of the cluster directory.
pub async fn up(spec: &ClusterSpec) -> Result<ClusterInfo, Error> {
    let dir = absolute(&spec.dir)?;
    create_dir(&dir)?;
    let previous = match ClusterInfo::load(&dir) {
        Ok(info) => Some(info),
        Err(Error::NoCluster { .. } | Error::ClusterFile { .. }) => None,
        Err(err) => return Err(err),
    };
    if let Some(previous) = &previous
        && previous.processes().iter().any(|p| p.is_running())
    {
        return Err(Error::AlreadyRunning { dir });
    }
    let binaries = Binaries::find(&spec.bin_dir, spec.store)?;
    let mut info = ClusterInfo {
        dir: dir.clone(),
        store: String::new(),
        store_kind: spec.store,
        etcd: None,
        controller: None,
        nodes: Vec::new(),
    };
    match start(spec, &binaries, previous.as_ref(), &mut info).await {
        Ok(()) => Ok(info),
        Err(err) => {
            // Leave nothing running behind a failed start.
            let _ = down(&dir);
            Err(err)
        }
    }
}

async fn start(
    spec: &ClusterSpec,
    binaries: &Binaries,
    previous: Option<&ClusterInfo>,
    info: &mut ClusterInfo,
) -> Result<(), Error> {
    let dir = info.dir.clone();
    let mut ports = Ports::default();
    match spec.store {
        StoreKind::Embedded => {
            info.store = format!("embedded://{}", dir.join("ballast.redb").display());
        }
        StoreKind::Etcd => {
            let etcd = start_etcd(
                binaries,
                &dir,
                previous.and_then(|p| p.etcd.as_ref()),
                &mut ports,
            )?;
            let endpoint = etcd.client_url.trim_start_matches("http://").to_string();
            info.store = format!("etcd://{endpoint}");
            info.etcd = Some(etcd);
            info.save()?;
            wait_store(info).await?;
        }
    }

    let controller_port = ports.pick(
        previous
            .and_then(|p| p.controller_address())
            .and_then(port_of),
    )?;
    let listen = format!("127.0.0.1:{controller_port}");
    let csi_endpoint = format!("unix://{}", dir.join("csi.sock").display());
    let mut args = vec![
        "controller".to_string(),
        "--listen".to_string(),
        listen.clone(),
        "--store".to_string(),
        info.store.clone(),
        "--endpoint".to_string(),
        csi_endpoint.clone(),
    ];
    args.extend(spec.controller_args.iter().cloned());
    let controller =
        process::spawn_daemon(&binaries.controller, &args, &dir.join("controller.log"))?;
    info.controller = Some(ControllerInfo {
        address: format!("http://{listen}"),
        csi_endpoint,
        process: controller,
    });
    info.save()?;

    for k in 1..=spec.nodes {
        let node_id = format!("node-{k}");
        let old = previous.and_then(|p| p.nodes.iter().find(|n| n.node_id == node_id));
        let grpc_port = ports.pick(old.and_then(|n| port_of(&n.agent_address)))?;
        let data_port = ports.pick(old.and_then(|n| port_of(&n.data_address)))?;
        let node_dir = dir.join(&node_id);
        let state_dir = node_dir.join("state");
        create_dir(&state_dir)?;
        let pool_file = node_dir.join("pool.img");
        let csi_endpoint = format!("unix://{}", node_dir.join("csi.sock").display());
        let args = vec![
            "--node-id".to_string(),
            node_id.clone(),
            "--pool-file".to_string(),
            pool_file.display().to_string(),
            "--pool-size".to_string(),
            spec.pool_size_bytes.to_string(),
            "--state-dir".to_string(),
            state_dir.display().to_string(),
            "--grpc-listen".to_string(),
            format!("127.0.0.1:{grpc_port}"),
            "--data-listen".to_string(),
            format!("127.0.0.1:{data_port}"),
            "--controller".to_string(),
            format!("http://{listen}"),
            "--node-plugin-endpoint".to_string(),
            csi_endpoint.clone(),
        ];
        let process =
            process::spawn_daemon(&binaries.agent, &args, &dir.join(format!("{node_id}.log")))?;
        info.nodes.push(NodeInfo {
            node_id: node_id.clone(),
            agent_address: format!("http://127.0.0.1:{grpc_port}"),
            data_address: format!("127.0.0.1:{data_port}"),
            pool_file,
            state_dir,
            process,
            csi_endpoint: String::new(),
            csi_state_dir: None,
            plugin: None,
        });
        info.save()?;

        let csi_state_dir = node_dir.join("csi-state");
        let args = vec![
            "node".to_string(),
            "--endpoint".to_string(),
            csi_endpoint.clone(),
            "--node-id".to_string(),
            node_id.clone(),
            "--state-dir".to_string(),
            csi_state_dir.display().to_string(),
        ];
        let plugin = process::spawn_daemon(
            &binaries.controller,
            &args,
            &dir.join(format!("{node_id}-csi.log")),
        )?;
        if let Some(node) = info.nodes.last_mut() {
            node.csi_endpoint = csi_endpoint;
            node.csi_state_dir = Some(csi_state_dir);
            node.plugin = Some(plugin);
        }
        info.save()?;
    }
    wait_nodes_up(info, spec.ready_timeout).await
}

/// Starts the agent of `node_id` again with the command line it was first
/// started with (same node id, pool, state and ports), after it was killed
/// or stopped, and records the new process in `cluster.json`. The agent
/// re-imports its pool and replicas and registers with the controller.
///
/// # Errors
///
/// [`Error::NodeNotFound`], [`Error::AlreadyRunning`] if that agent still
/// runs, [`Error::Spawn`], and errors reading or writing the cluster file.
pub fn restart_node(dir: &Path, node_id: &str) -> Result<NodeInfo, Error> {
    let dir = absolute(dir)?;
    let mut info = ClusterInfo::load(&dir)?;
    let node = info
        .nodes
        .iter_mut()
        .find(|n| n.node_id == node_id)
        .ok_or_else(|| Error::NodeNotFound {
            node_id: node_id.to_string(),
        })?;
    if node.process.is_running() {
        return Err(Error::AlreadyRunning { dir });
    }
    let Some((program, args)) = node.process.command.split_first() else {
        return Err(Error::NodeNotFound {
            node_id: node_id.to_string(),
        });
    };
    node.process = process::spawn_daemon(Path::new(program), args, &node.process.log)?;
    let restarted = node.clone();
    info.save()?;
    Ok(restarted)
}

/// Stops the cluster in `dir` and cleans up its mounts and loop devices.
/// Safe to run twice, and on a directory whose `up` failed half-way.
///
/// # Errors
///
/// [`Error::Leftovers`] if a process, mount or loop device could not be
/// removed; [`Error::Signal`]; errors reading the cluster file (other
/// than its absence).
pub fn down(dir: &Path) -> Result<(), Error> {
    let dir = absolute(dir)?;
    let mut survivors = Vec::new();
    match ClusterInfo::load(&dir) {
        Ok(info) => {
            // Node plugins first, so none stages anything while the
            // volumes are taken down; then what they left, while the
            // agents still serve it.
            let plugins: Vec<&ProcessInfo> = info
                .nodes
                .iter()
                .filter_map(|n| n.plugin.as_ref())
                .collect();
            survivors.extend(process::stop_all(&plugins, STOP_GRACE)?);
            for state_dir in info.nodes.iter().filter_map(|n| n.csi_state_dir.as_ref()) {
                cleanup::detach_volumes(state_dir);
            }
            // Agents (they unmount their pools on SIGTERM), then the
            // controller, then the store.
            let agents: Vec<&ProcessInfo> = info.nodes.iter().map(|n| &n.process).collect();
            survivors.extend(process::stop_all(&agents, STOP_GRACE)?);
            let rest: Vec<&ProcessInfo> = info
                .controller
                .iter()
                .map(|c| &c.process)
                .chain(info.etcd.iter().map(|e| &e.process))
                .collect();
            survivors.extend(process::stop_all(&rest, STOP_GRACE)?);
        }
        Err(Error::NoCluster { .. }) => {}
        Err(err) => return Err(err),
    }
    let (mounts, loops) = if dir.exists() {
        cleanup::clean_under(&dir)
    } else {
        (Vec::new(), Vec::new())
    };
    if survivors.is_empty() && mounts.is_empty() && loops.is_empty() {
        return Ok(());
    }
    Err(Error::Leftovers {
        processes: survivors.iter().map(|p| p.pid).collect(),
        mounts,
        loops,
    })
}

/// The controller's view of the nodes, as `ListNodes` returns it.
///
/// # Errors
///
/// [`Error::NotReady`] if the controller cannot be reached within 5 s.
pub async fn list_nodes(info: &ClusterInfo) -> Result<Vec<ballast_proto::controller::Node>, Error> {
    let address = info.controller_address().unwrap_or_default().to_string();
    let unreachable = |detail: String| Error::NotReady {
        what: format!("The controller at {address}"),
        timeout: Duration::from_secs(5),
        log_tail: detail,
    };
    let endpoint = tonic::transport::Endpoint::from_shared(address.clone())
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let nodes = NodeServiceClient::new(channel)
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(|status| unreachable(status.message().to_string()))?
        .into_inner()
        .nodes;
    Ok(nodes)
}

/// Waits until the controller lists every node of `info` as up.
async fn wait_nodes_up(info: &ClusterInfo, timeout: Duration) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        check_alive(info)?;
        let last = match list_nodes(info).await {
            Ok(nodes) => {
                let up = info
                    .nodes
                    .iter()
                    .filter(|n| {
                        nodes
                            .iter()
                            .any(|m| m.node_id == n.node_id && m.state == "up")
                    })
                    .count();
                let sockets = info
                    .nodes
                    .iter()
                    .filter(|n| n.csi_socket().is_none_or(Path::exists))
                    .count();
                if up == info.nodes.len() && sockets == info.nodes.len() {
                    return Ok(());
                }
                format!(
                    "{up} of {} nodes up, {sockets} node plugin sockets",
                    info.nodes.len()
                )
            }
            Err(err) => err.to_string(),
        };
        if Instant::now() >= deadline {
            let logs: Vec<String> = info
                .controller
                .iter()
                .map(|c| ("controller", &c.process))
                .chain(info.nodes.iter().map(|n| (n.node_id.as_str(), &n.process)))
                .chain(
                    info.nodes
                        .iter()
                        .filter_map(|n| Some((n.node_id.as_str(), n.plugin.as_ref()?))),
                )
                .map(|(name, p)| format!("== {name} ({})\n{}", p.log.display(), p.log_tail(5)))
                .collect();
            return Err(Error::NotReady {
                what: format!("The cluster in {} ({last})", info.dir.display()),
                timeout,
                log_tail: logs.join("\n"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fails with the log of the first process that already exited.
fn check_alive(info: &ClusterInfo) -> Result<(), Error> {
    let named = info
        .etcd
        .iter()
        .map(|e| ("etcd".to_string(), &e.process))
        .chain(
            info.controller
                .iter()
                .map(|c| ("the controller".to_string(), &c.process)),
        )
        .chain(
            info.nodes
                .iter()
                .map(|n| (format!("the agent of {}", n.node_id), &n.process)),
        )
        .chain(info.nodes.iter().filter_map(|n| {
            Some((
                format!("the node plugin of {}", n.node_id),
                n.plugin.as_ref()?,
            ))
        }));
    for (what, process) in named {
        if !process.wait_exit(Duration::ZERO) {
            continue;
        }
        return Err(Error::Exited {
            what,
            log_tail: process.log_tail(40),
        });
    }
    Ok(())
}

fn start_etcd(
    binaries: &Binaries,
    dir: &Path,
    previous: Option<&EtcdInfo>,
    ports: &mut Ports,
) -> Result<EtcdInfo, Error> {
    let client_port = ports.pick(previous.and_then(|e| port_of(&e.client_url)))?;
    let peer_port = ports.pick(previous.map(|e| e.peer_port))?;
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let args = vec![
        "--name=ballast".to_string(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=ballast={peer}"),
    ];
    let process = process::spawn_daemon(&binaries.etcd, &args, &dir.join("etcd.log"))?;
    Ok(EtcdInfo {
        client_url: client,
        peer_port,
        process,
    })
}

/// Waits until the store answers (etcd takes a moment to elect itself).
async fn wait_store(info: &ClusterInfo) -> Result<(), Error> {
    let timeout = Duration::from_secs(30);
    let deadline = Instant::now() + timeout;
    loop {
        check_alive(info)?;
        match crate::store::open_store(&info.store).await {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() >= deadline => {
                return Err(Error::NotReady {
                    what: format!("The store {} ({err})", info.store),
                    timeout,
                    log_tail: info
                        .etcd
                        .as_ref()
                        .map(|e| e.process.log_tail(20))
                        .unwrap_or_default(),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The programs a cluster runs.
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
    etcd: PathBuf,
}

impl Binaries {
    fn find(bin_dir: &Path, store: StoreKind) -> Result<Self, Error> {
        let etcd = std::env::var_os("BALLAST_ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
        let binaries = Self {
            controller: bin_dir.join("ballast-csi"),
            agent: bin_dir.join("ballast-agent"),
            etcd,
        };
        let mut needed = vec![&binaries.controller, &binaries.agent];
        if store == StoreKind::Etcd {
            needed.push(&binaries.etcd);
        }
        if let Some(missing) = needed.into_iter().find(|p| !p.exists()) {
            return Err(Error::MissingBinary {
                path: missing.clone(),
            });
        }
        Ok(binaries)
    }
}

/// A free TCP port on loopback (bound, then released for the process that
/// will listen on it).
fn free_port() -> Result<u16, Error> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(Error::NoPort)
}

/// The loopback ports of one `up`, all distinct: a port released by
/// [`free_port`] may be handed out again at once, and an agent given the
/// same port for its API and its replica listener cannot start.
#[derive(Debug, Default)]
struct Ports {
    taken: std::collections::HashSet<u16>,
}

impl Ports {
    /// `previous` (a restarted cluster keeps its ports), else a free port
    /// not handed out before.
    fn pick(&mut self, previous: Option<u16>) -> Result<u16, Error> {
        if let Some(port) = previous {
            self.taken.insert(port);
            return Ok(port);
        }
        for _ in 0..100 {
            let port = free_port()?;
            if self.taken.insert(port) {
                return Ok(port);
            }
        }
        Err(Error::NoPort(std::io::Error::other(
            "the kernel kept handing out ports already taken",
        )))
    }
}

/// The port of `http://HOST:PORT` or `HOST:PORT`.
fn port_of(address: &str) -> Option<u16> {
    address
        .rsplit_once(':')?
        .1
        .trim_end_matches('/')
        .parse()
        .ok()
}

fn absolute(dir: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_of_one_cluster_are_distinct() {
        let mut ports = Ports::default();
        assert_eq!(ports.pick(Some(4242)).ok(), Some(4242));
        let picked: Vec<u16> = (0..200).filter_map(|_| ports.pick(None).ok()).collect();
        assert_eq!(picked.len(), 200);
        let distinct: std::collections::HashSet<u16> = picked.iter().copied().collect();
        assert_eq!(distinct.len(), 200, "a port was handed out twice");
        assert!(!distinct.contains(&4242));
    }

    #[test]
    fn ports_are_read_from_addresses() {
        assert_eq!(port_of("http://127.0.0.1:9600"), Some(9600));
        assert_eq!(port_of("127.0.0.1:10"), Some(10));
        assert_eq!(port_of("nonsense"), None);
    }

    #[test]
    fn down_without_a_cluster_is_harmless_and_idempotent() {
        let dir = tempfile::tempdir().expect("temp dir");
        down(dir.path()).expect("first");
        down(dir.path()).expect("second");
        down(&dir.path().join("missing")).expect("missing directory");
    }

    #[test]
    fn the_cluster_file_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        let info = ClusterInfo {
            dir: dir.path().to_path_buf(),
            store: "embedded:///x".into(),
            store_kind: StoreKind::Embedded,
            etcd: None,
            controller: None,
            nodes: Vec::new(),
        };
        info.save().expect("save");
        assert_eq!(ClusterInfo::load(dir.path()).expect("load"), info);
        let missing = ClusterInfo::load(&dir.path().join("nope")).expect_err("missing");
        assert!(matches!(missing, Error::NoCluster { .. }));
    }
}
