//! Network cuts between agents (issue 3): a controller and three agents in
//! their own network namespaces ([`NetCluster`]), a 3-replica volume
//! published on node-1 under fio with verification, and node-3 cut off
//! while fio writes. The target must drop the unreachable replica without
//! failing a write, and once the network is healed the controller must
//! hand the replica back to the target for a delta rebuild, after which
//! the three replica files are identical.
//!
//! Two cuts: node-3 unplugged from the switch (cut from everybody, the
//! controller too, so it is also seen down), and a cut between node-1 and
//! node-3 only (node-3 stays up at the controller, whose reconciler keeps
//! trying to rebuild a replica the target cannot reach).

use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};

use crate::harness::cluster::ControllerCli;
use crate::harness::cluster::T;
use crate::harness::netcluster::NetCluster;
use crate::harness::{fio, run, wait_for};

/// How a test cuts node-3 off.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// node-3's switch port down.
    Unplug,
    /// Blackhole routes between node-1 and node-3.
    Pair,
}

/// Runs the scenario of the module docs with `cut`.
fn cut_and_heal(name: &str, cut: Cut) -> Result<()> {
    let cluster = NetCluster::up(name, 3)?;
    let (node1, node3) = (cluster.node("node-1")?.host, cluster.node("node-3")?.host);
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "256MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let uri = cluster.cli_ok(&["volume", "publish", "vol", "--node", "node-1"])?;
    let mut load = fio::start(&cluster.dir, uri.trim(), "fio.log")?;
    std::thread::sleep(Duration::from_secs(2));

    match cut {
        Cut::Unplug => cluster.net.unplug(node3)?,
        Cut::Pair => cluster.net.cut_between(node1, node3)?,
    }
    wait_for(
        "node-3's replica to leave the in-sync set",
        Duration::from_secs(60),
        || {
            cluster
                .replica_states("vol")
                .ok()
                .filter(|s| s.iter().any(|(n, st)| n == "node-3" && st != "in-sync"))
        },
    )?;
    ensure!(
        load.is_running(),
        "fio finished before the drop: the cut must land while it writes"
    );
    if let Cut::Unplug = cut {
        cluster.wait_node("node-3", "down", Duration::from_secs(30))?;
    }
    // Writes go on without node-3 for a while, then the network heals.
    std::thread::sleep(Duration::from_secs(3));
    let states = cluster.replica_states("vol")?;
    ensure!(
        states.iter().any(|(n, s)| n == "node-3" && s != "in-sync"),
        "node-3 cannot be in sync while it is cut off: {states:?}"
    );
    match cut {
        Cut::Unplug => cluster.net.plug(node3)?,
        Cut::Pair => cluster.net.heal_between(node1, node3)?,
    }
    fio::assert_clean(&cluster.dir, &mut load, "fio.log")?;

    // The same replica comes back (a delta rebuild, not a replacement).
    let states = wait_for(
        "every replica back in sync",
        Duration::from_secs(90),
        || {
            cluster
                .replica_states("vol")
                .ok()
                .filter(|s| s.len() == 3 && s.iter().all(|(_, st)| st == "in-sync"))
        },
    )?;
    let mut on: Vec<&str> = states.iter().map(|(n, _)| n.as_str()).collect();
    on.sort_unstable();
    ensure!(
        on == ["node-1", "node-2", "node-3"],
        "the replicas moved: {states:?}"
    );

    cluster.cli_ok(&["volume", "unpublish", "vol"])?;
    let file = |id: &str| -> Result<_> {
        Ok(cluster
            .node(id)?
            .state_dir
            .join("pools/pool/replicas/vol.data"))
    };
    let first = file("node-1")?;
    for id in ["node-2", "node-3"] {
        let out = run(Command::new("cmp").arg(&first).arg(file(id)?), T)?;
        ensure!(
            out.status.success(),
            "the replica on {id} differs from node-1's ({cut:?}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[test]
fn an_unplugged_replica_node_is_dropped_and_rebuilt() -> Result<()> {
    cut_and_heal("netcut-unplug", Cut::Unplug)
}

#[test]
fn a_cut_between_target_and_replica_drops_and_rebuilds_it() -> Result<()> {
    cut_and_heal("netcut-pair", Cut::Pair)
}
