//! PostgreSQL on a local cluster, as kubelet would run it: the cluster
//! directory opened to the `postgres` user, a kubelet over the cluster's
//! CSI sockets, and a pgbench load that has started committing.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use anyhow::{Context, Result};
use ballast_csi::demo::kubelet::Kubelet;
use ballast_csi::demo::pgbench::{self, Load, LoadSpec};
use ballast_csi::demo::postgres::Instance;

use super::cluster::Cluster;

/// Makes the cluster's test directory enterable by `postgres` (mode 0755)
/// and connects a kubelet to the controller's and every node plugin's CSI
/// socket.
pub async fn kubelet(cluster: &Cluster) -> Result<Kubelet> {
    std::fs::set_permissions(cluster.dir.join(""), std::fs::Permissions::from_mode(0o755))?;
    let info = cluster.info()?;
    let controller = info.controller.as_ref().context("no controller")?;
    let endpoints: Vec<(String, String)> = info
        .nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.csi_endpoint.clone()))
        .collect();
    Ok(Kubelet::connect(
        &cluster.dir.join("kubelet"),
        &controller.csi_endpoint,
        &endpoints,
    )
    .await?)
}

/// Initialises pgbench (scale 1) on the running `pg`, starts 4 clients for
/// `duration`, and returns once they have committed for 3 s.
pub async fn committing_load(pg: &Instance, cluster: &Cluster, duration: Duration) -> Result<Load> {
    pgbench::initialize(pg, 1, Duration::from_secs(300)).await?;
    let mut load = Load::start(
        pg,
        &LoadSpec {
            clients: 4,
            threads: 2,
            duration,
            log_dir: cluster.dir.join("pgbench"),
        },
    )?;
    let mut progress = load.take_progress().context("progress")?;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(p) = progress.recv().await {
            if p.at_secs >= 3.0 && p.tps > 0.0 {
                return;
            }
        }
    })
    .await
    .context("pgbench committed nothing in 60 s")?;
    Ok(load)
}

/// Transactions pgbench has committed (`count(pgbench_history)`).
pub async fn history(pg: &Instance) -> Result<u64> {
    pg.query("SELECT count(*) FROM pgbench_history")
        .await?
        .parse()
        .context("a count")
}
