//! A whole local cluster as tests drive it: `ballast cluster up` in a
//! [`TestDir`], the operator CLI against it, and `ballast cluster down` on
//! drop, so nothing survives a failed assertion. Clusters of test processes
//! that were killed before their Drop ran are swept by the next test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ballast_csi::cluster::ClusterInfo;
use serde_json::Value;

use super::{TestDir, bin, run, wait_for};

/// Deadline of one CLI call.
pub const T: Duration = Duration::from_secs(120);

/// What tests ask any cluster's controller through the CLI: implemented by
/// [`Cluster`] and the network-namespace cluster, which differ only in how
/// the CLI reaches the controller.
pub trait ControllerCli {
    /// Runs `ballast -o json ARGS` against the controller and parses it.
    fn cli_json(&self, args: &[&str]) -> Result<Value>;

    /// The replicas of `volume` as (node id, state) pairs, from
    /// `volume show`.
    fn replica_states(&self, volume: &str) -> Result<Vec<(String, String)>> {
        let shown = self.cli_json(&["volume", "show", volume])?;
        Ok(shown["replicas"]
            .as_array()
            .context("replicas is an array")?
            .iter()
            .map(|r| {
                (
                    r["node_id"].as_str().unwrap_or_default().to_string(),
                    r["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// `node list` as (id, state) pairs.
    fn node_states(&self) -> Result<Vec<(String, String)>> {
        let nodes = self.cli_json(&["node", "list"])?;
        Ok(nodes
            .as_array()
            .context("node list is an array")?
            .iter()
            .map(|n| {
                (
                    n["node_id"].as_str().unwrap_or_default().to_string(),
                    n["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    /// Waits until node `node` is in `state` (`up`, `down`).
    fn wait_node(&self, node: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("{node} to be {state}"), timeout, || {
            self.node_states()
                .ok()
                .filter(|nodes| nodes.iter().any(|(n, s)| n == node && s == state))
        })
        .map(|_| ())
    }
}

impl ControllerCli for Cluster {
    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        Cluster::cli_json(self, args)
    }
}

/// A cluster started with `ballast cluster up`, stopped on drop.
pub struct Cluster {
    /// The test directory holding the cluster and test files.
    pub dir: TestDir,
    /// The cluster directory (`cluster.json`, logs, node state).
    pub path: PathBuf,
}

impl Cluster {
    /// `ballast cluster up` with `nodes` agents of 1 GiB pools.
    pub fn up(name: &str, nodes: usize, store: &str, extra: &[&str]) -> Result<Self> {
        sweep_orphans();
        let dir = TestDir::new(name);
        mark_owner(&dir)?;
        let path = dir.join("cluster");
        let cluster = Self { dir, path };
        let nodes = nodes.to_string();
        let mut args = vec![
            "cluster",
            "up",
            "--nodes",
            &nodes,
            "--pool-size",
            "1GiB",
            "--store",
            store,
            "--timeout",
            "90",
        ];
        args.extend_from_slice(extra);
        cluster.cli_ok(&args)?;
        Ok(cluster)
    }

    /// The agent process of node `node` as `cluster.json` records it.
    pub fn node_process(&self, node: &str) -> Result<ballast_csi::cluster::ProcessInfo> {
        Ok(self
            .info()?
            .nodes
            .into_iter()
            .find(|n| n.node_id == node)
            .with_context(|| format!("no node {node}"))?
            .process)
    }

    pub fn info(&self) -> Result<ClusterInfo> {
        Ok(ClusterInfo::load(&self.path)?)
    }

    /// Runs `ballast --cluster DIR ARGS` (and `--dir DIR` for cluster
    /// commands).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(bin("ballast"));
        cmd.arg("--cluster").arg(&self.path).args(args);
        if args.first() == Some(&"cluster") {
            cmd.arg("--dir").arg(&self.path);
        }
        run(&mut cmd, T)
    }

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

    /// Runs a command that must fail; returns its stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if out.status.success() {
            bail!(
                "ballast {args:?} succeeded but must fail: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.cli_ok(&all)?;
        serde_json::from_str(&text).with_context(|| format!("JSON of {args:?}: {text}"))
    }

    /// Replicas on `node`'s agent: name -> (volume id, size).
    pub fn replicas_on(&self, node: &str) -> Result<BTreeMap<String, (String, u64)>> {
        let info = self.info()?;
        let agent = info
            .nodes
            .iter()
            .find(|n| n.node_id == node)
            .with_context(|| format!("no node {node}"))?;
        let out = run_ok_json(
            Command::new(bin("ballast"))
                .args(["-o", "json", "--agent", &agent.agent_address])
                .args(["replica", "list"]),
        )?;
        let list = out.as_array().context("replica list is an array")?;
        Ok(list
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_string(),
                    (
                        r["volume_id"].as_str().unwrap_or_default().to_string(),
                        r["size_bytes"].as_u64().unwrap_or_default(),
                    ),
                )
            })
            .collect())
    }

    /// Every node's replica names.
    pub fn all_replicas(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let mut all = BTreeMap::new();
        for node in self.info()?.nodes {
            let names = self.replicas_on(&node.node_id)?.into_keys().collect();
            all.insert(node.node_id, names);
        }
        Ok(all)
    }

    /// Waits until every node is up; on timeout the error carries the
    /// last node states and the end of every log of the cluster.
    pub fn wait_all_up(&self, count: usize) -> Result<()> {
        wait_for("every node to be up", Duration::from_secs(60), || {
            self.node_states()
                .ok()
                .filter(|nodes| nodes.len() == count && nodes.iter().all(|(_, s)| s == "up"))
        })
        .map(|_| ())
        .with_context(|| {
            format!(
                "node states: {:?}\n{}",
                self.node_states(),
                self.log_tails(20)
            )
        })
    }

    /// The last `lines` lines of every `*.log` in the cluster and test
    /// directories, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let test_dir = self.dir.join("");
        let mut logs: Vec<PathBuf> = [self.path.as_path(), test_dir.as_path()]
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs.iter()
            .map(|log| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..].join("\n");
                format!("== {}\n{tail}", log.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn volume(&self, name: &str) -> Result<Value> {
        self.cli_json(&["volume", "show", name])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the processes first; the TestDir then removes the rest.
        let _ = run(
            Command::new(bin("ballast"))
                .args(["cluster", "down", "--dir"])
                .arg(&self.path),
            T,
        );
        let _ = &self.dir;
    }
}

/// File in a test directory naming the test process that owns its cluster.
const OWNER_FILE: &str = "owner.pid";

/// Records this test process as the owner of `dir`, for [`sweep_orphans`].
pub fn mark_owner(dir: &TestDir) -> Result<()> {
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;
    Ok(())
}

/// Stops clusters whose test process is gone without running its Drop
/// (killed on a timeout): the cluster's daemons run in their own sessions
/// and would otherwise outlive it. Then removes the test directories of
/// dead owners (their mounts and loop devices too). Clusters of live tests
/// are left alone.
pub fn sweep_orphans() {
    let Ok(entries) = std::fs::read_dir("/var/tmp/ballast-tests") else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(owner) = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
        else {
            continue;
        };
        if pid_running(owner) {
            continue;
        }
        let _ = run(
            Command::new(bin("ballast"))
                .args(["cluster", "down", "--dir"])
                .arg(dir.join("cluster")),
            T,
        );
        crate::harness::cleanup_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

pub fn run_ok_json(cmd: &mut Command) -> Result<Value> {
    let out = run(cmd, T)?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub fn pid_running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // A zombie has exited.
    stat.rsplit_once(')')
        .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        .unwrap_or(false)
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_string)
        .collect()
}

pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|f| Path::new(f).starts_with(dir))
        })
        .map(str::to_string)
        .collect()
}
