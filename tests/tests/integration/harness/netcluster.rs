//! A cluster whose processes each have their own network: the controller
//! and every agent run in a host namespace of a [`Network`], talk over
//! its bridge at 10.231.0.x, and can be partitioned from each other.
//!
//! The processes are started directly (not through `ballast cluster up`,
//! which puts everything on loopback), with the flags the launcher uses:
//! the embedded store, 1 GiB file-backed pools, a 5 s heartbeat timeout.
//! The operator CLI runs in the controller's namespace. A published
//! volume's NBD socket is a file under the agent's state directory, so NBD
//! clients run from the test process itself.
//!
//! Teardown, even after a failed assertion: the agents and the controller
//! are SIGKILLed (and die with the test thread if it is killed, see
//! [`Child`]), then the namespaces are deleted, then the [`TestDir`]
//! unmounts the pools and detaches their loop devices. If the test process
//! itself is killed, the next fixture sweeps its namespaces and directory.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::cluster::{ControllerCli, T, mark_owner, sweep_orphans};
use super::network::Network;
use super::{Child, TestDir, bin, run};

/// Port of the controller's management API in its namespace.
const CONTROLLER_PORT: u16 = 9600;
/// Ports of each agent's gRPC API and replica protocol in its namespace.
const AGENT_PORT: u16 = 9500;
const DATA_PORT: u16 = 9501;

/// One agent of a [`NetCluster`].
pub struct NetNode {
    /// Node id (`node-K`).
    pub id: String,
    /// Index of its host in the network.
    pub host: usize,
    /// The agent's state directory.
    pub state_dir: PathBuf,
}

/// A controller and agents in their own network namespaces.
pub struct NetCluster {
    // Fields drop in order: processes, then namespaces, then files.
    agents: Vec<Child>,
    controller: Child,
    /// The network (host 0 is the controller, host K is `node-K`).
    pub net: Network,
    /// The agents.
    pub nodes: Vec<NetNode>,
    controller_url: String,
    /// Logs, store, pools and agent state.
    pub dir: TestDir,
}

impl NetCluster {
    /// Starts a controller and `count` agents, each in its own namespace,
    /// and waits until every node is up.
    pub fn up(name: &str, count: usize) -> Result<Self> {
        sweep_orphans();
        let dir = TestDir::new(name);
        mark_owner(&dir)?;
        let mut net = Network::new()?;
        let ctrl = net.add_host("ctrl", 2)?;
        let controller_url = format!("http://{}:{CONTROLLER_PORT}", net.host(ctrl).address);
        let controller = Child::spawn(
            "ballast-csi controller",
            net.host(ctrl)
                .ns
                .command(bin("ballast-csi"))
                .arg("controller")
                .arg("--listen")
                .arg(format!("{}:{CONTROLLER_PORT}", net.host(ctrl).address))
                .arg("--store")
                .arg(format!("embedded://{}", dir.join("ballast.redb").display()))
                .args(["--heartbeat-timeout", "5s"])
                .env("RUST_LOG", "info"),
            &dir.join("controller.log"),
        )?;
        let mut agents = Vec::new();
        let mut nodes = Vec::new();
        for k in 1..=count {
            let id = format!("node-{k}");
            let last = u8::try_from(10 + k).context("too many nodes")?;
            let host = net.add_host(&id, last)?;
            let address: Ipv4Addr = net.host(host).address;
            let node_dir = dir.join(&id);
            let state_dir = node_dir.join("state");
            std::fs::create_dir_all(&state_dir)?;
            let agent = Child::spawn(
                &format!("ballast-agent {id}"),
                net.host(host)
                    .ns
                    .command(bin("ballast-agent"))
                    .args(["--node-id", &id])
                    .arg("--pool-file")
                    .arg(node_dir.join("pool.img"))
                    .args(["--pool-size", "1GiB"])
                    .arg("--state-dir")
                    .arg(&state_dir)
                    .arg("--grpc-listen")
                    .arg(format!("{address}:{AGENT_PORT}"))
                    .arg("--data-listen")
                    .arg(format!("{address}:{DATA_PORT}"))
                    .args(["--controller", &controller_url])
                    .env("RUST_LOG", "info,ballast_storage_node=debug"),
                &dir.join(&format!("{id}.log")),
            )?;
            agents.push(agent);
            nodes.push(NetNode {
                id,
                host,
                state_dir,
            });
        }
        let mut cluster = Self {
            agents,
            controller,
            net,
            nodes,
            controller_url,
            dir,
        };
        cluster.wait_all_up(Duration::from_secs(90))?;
        Ok(cluster)
    }

    /// Waits until the controller lists every agent as up, failing early
    /// with a log if a process exited.
    fn wait_all_up(&mut self, timeout: Duration) -> Result<()> {
        let count = self.nodes.len();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if !self.controller.is_running() {
                bail!("the controller exited:\n{}", self.log("controller"));
            }
            for (agent, node) in self.agents.iter_mut().zip(&self.nodes) {
                if !agent.is_running() {
                    bail!("the agent of {} exited:\n{}", node.id, self.log(&node.id));
                }
            }
            if self
                .node_states()
                .is_ok_and(|states| states.len() == count && states.iter().all(|(_, s)| s == "up"))
            {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "not every node is up after {timeout:?}:\n{}",
                    self.log("controller")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The log of `controller` or of a node.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(&format!("{name}.log"))).unwrap_or_default()
    }

    /// The agent of node `id`.
    pub fn node(&self, id: &str) -> Result<&NetNode> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .with_context(|| format!("no node {id}"))
    }

    /// Runs `ballast --controller URL ARGS...` in the controller's
    /// namespace.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run(
            self.net
                .host(0)
                .ns
                .command(bin("ballast"))
                .args(["--controller", &self.controller_url])
                .args(args),
            T,
        )
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "ballast {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a CLI command with `-o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.cli_ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("JSON of {args:?}: {text}"))
    }
}

impl ControllerCli for NetCluster {
    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        NetCluster::cli_json(self, args)
    }
}
