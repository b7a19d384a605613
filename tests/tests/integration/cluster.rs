//! A whole cluster on loopback through the operator's interface: `ballast
//! cluster up | down`, nodes, volumes and their replicas on real agents,
//! publication, controller restarts on both store backends, bad input.
//!
//! Every test starts its own cluster in a [`TestDir`]; [`Cluster`] runs
//! `ballast cluster down` on drop (then the TestDir removes any mount or
//! loop device left), so nothing survives a failed assertion.

use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::harness::cluster::ControllerCli;
use crate::harness::cluster::{Cluster, T, loops_under, mounts_under, pid_running};
use crate::harness::{Child, bin, run, wait_for};

#[test]
fn cluster_up_places_replicas_on_every_node_and_delete_removes_them() -> Result<()> {
    let cluster = Cluster::up("cluster-up", 3, "embedded", &[])?;
    let nodes = cluster.node_states()?;
    assert_eq!(
        nodes,
        [
            ("node-1".to_string(), "up".to_string()),
            ("node-2".to_string(), "up".to_string()),
            ("node-3".to_string(), "up".to_string())
        ]
    );
    let out = cluster.cli_ok(&[
        "volume",
        "create",
        "vol-a",
        "--size",
        "64MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    assert!(out.contains("Created volume vol-a"), "{out}");
    for node in ["node-1", "node-2", "node-3"] {
        let replicas = cluster.replicas_on(node)?;
        assert_eq!(
            replicas.get("vol-a"),
            Some(&("vol-a".to_string(), 64 << 20)),
            "{node}: {replicas:?}"
        );
    }
    let volume = cluster.volume("vol-a")?;
    assert_eq!(volume["status"], "healthy");
    let replica_nodes: Vec<&str> = volume["replicas"]
        .as_array()
        .context("replicas")?
        .iter()
        .map(|r| {
            assert_eq!(r["state"], "in-sync");
            r["node_id"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(replica_nodes.len(), 3);
    let list = cluster.cli_ok(&["volume", "list"])?;
    assert!(list.contains("vol-a") && list.contains("3/3"), "{list}");
    let show = cluster.cli_ok(&["volume", "show", "vol-a"])?;
    assert!(show.contains("Status:       healthy"), "{show}");

    // Idempotent create: the same request changes nothing.
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-a",
        "--size",
        "64MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    assert_eq!(cluster.all_replicas()?.values().flatten().count(), 3);

    cluster.cli_ok(&["volume", "delete", "vol-a"])?;
    assert!(cluster.all_replicas()?.values().all(Vec::is_empty));
    let err = cluster.cli_err(&["volume", "show", "vol-a"])?;
    assert!(
        err.contains("does not exist") && err.contains("NotFound"),
        "{err}"
    );
    cluster.cli_ok(&["volume", "delete", "vol-a"])?;
    Ok(())
}

#[test]
fn published_volume_serves_io_to_qemu_io() -> Result<()> {
    let cluster = Cluster::up("cluster-publish", 3, "embedded", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-q",
        "--size",
        "64MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let uri = cluster.cli_ok(&["volume", "publish", "vol-q", "--node", "node-2"])?;
    let uri = uri.trim().to_string();
    assert!(uri.starts_with("nbd+unix:///"), "{uri}");
    let qemu_io = |cmds: &[&str]| -> Result<Output> {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        run(cmd.arg(&uri), T)
    };
    let out = qemu_io(&["write -P 0xab 0 1M", "write -P 0xcd 8M 64k", "flush"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = qemu_io(&[
        "read -P 0xab 0 1M",
        "read -P 0xcd 8M 64k",
        "read -P 0 4M 64k",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{text}"
    );
    // A wrong pattern is caught: the check is real.
    let out = qemu_io(&["read -P 0x11 0 4k"])?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));

    let volume = cluster.volume("vol-q")?;
    assert_eq!(volume["target_node_id"], "node-2");
    assert_eq!(volume["epoch"], 1);
    // Publishing again on the same node is idempotent.
    assert_eq!(
        cluster
            .cli_ok(&["volume", "publish", "vol-q", "--node", "node-2"])?
            .trim(),
        uri
    );
    let err = cluster.cli_err(&["volume", "publish", "vol-q", "--node", "node-1"])?;
    assert!(err.contains("FailedPrecondition"), "{err}");
    let err = cluster.cli_err(&["volume", "delete", "vol-q"])?;
    assert!(err.contains("unpublish it first"), "{err}");
    cluster.cli_ok(&["volume", "unpublish", "vol-q"])?;
    assert_eq!(cluster.volume("vol-q")?["target_node_id"], "");
    cluster.cli_ok(&["volume", "delete", "vol-q"])?;
    Ok(())
}

#[test]
fn bad_input_gets_clear_errors_and_creates_nothing() -> Result<()> {
    let cluster = Cluster::up("cluster-bad", 3, "embedded", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "keep",
        "--size",
        "16MiB",
        "--replicas",
        "2",
    ])?;
    let before = cluster.all_replicas()?;

    let err = cluster.cli_err(&[
        "volume",
        "create",
        "huge",
        "--size",
        "5GiB",
        "--replicas",
        "1",
    ])?;
    assert!(
        err.contains("Not enough nodes") && err.contains("ResourceExhausted"),
        "{err}"
    );
    let err = cluster.cli_err(&[
        "volume",
        "create",
        "many",
        "--size",
        "16MiB",
        "--replicas",
        "4",
    ])?;
    assert!(err.contains("only 3 of 3 up node(s)"), "{err}");
    let err = cluster.cli_err(&[
        "volume",
        "create",
        "keep",
        "--size",
        "32MiB",
        "--replicas",
        "2",
    ])?;
    assert!(
        err.contains("already exists") && err.contains("AlreadyExists"),
        "{err}"
    );
    let err = cluster.cli_err(&["volume", "create", "a/b", "--size", "16MiB"])?;
    assert!(err.contains("InvalidArgument"), "{err}");
    let err = cluster.cli_err(&["volume", "create", "odd", "--size", "5000"])?;
    assert!(err.contains("multiple of 4096"), "{err}");
    let err = cluster.cli_err(&["volume", "publish", "nope", "--node", "node-1"])?;
    assert!(err.contains("NotFound"), "{err}");
    let err = cluster.cli_err(&["volume", "publish", "keep", "--node", "node-9"])?;
    assert!(err.contains("node-9") && err.contains("NotFound"), "{err}");

    assert_eq!(
        cluster.all_replicas()?,
        before,
        "no replica was created or lost"
    );
    let volumes = cluster.cli_json(&["volume", "list"])?;
    let names: Vec<&str> = volumes
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|v| v["volume_id"].as_str())
        .collect();
    assert_eq!(names, ["keep"]);
    assert_eq!(cluster.volume("keep")?["size_bytes"], 16 << 20);

    // Without a cluster or controller the CLI says what is missing.
    let out = run(
        Command::new(bin("ballast"))
            .env_remove("BALLAST_CLUSTER")
            .env_remove("BALLAST_CONTROLLER")
            .args(["volume", "list"]),
        T,
    )?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cluster"));
    Ok(())
}

/// Creates a volume whose epoch was raised by a publish, restarts the
/// controller (SIGKILL, then the same command line), then the whole
/// cluster, and checks volumes and epochs each time.
fn restart_keeps_volumes_and_epochs(store: &str) -> Result<()> {
    let cluster = Cluster::up(&format!("cluster-restart-{store}"), 2, store, &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "durable",
        "--size",
        "32MiB",
        "--replicas",
        "2",
        "--thin",
    ])?;
    // Publish raises the epoch before the target starts, so the epoch is
    // raised whether or not this agent already has a target.
    let published = cluster.cli(&["volume", "publish", "durable", "--node", "node-1"])?;
    if published.status.success() {
        cluster.cli_ok(&["volume", "unpublish", "durable"])?;
    }
    let before = cluster.volume("durable")?;
    assert_eq!(before["epoch"], 1);

    let info = cluster.info()?;
    let controller = info.controller.as_ref().context("controller")?;
    signal::kill(Pid::from_raw(controller.process.pid), Signal::SIGKILL)?;
    wait_for("the controller to die", Duration::from_secs(10), || {
        (!pid_running(controller.process.pid)).then_some(())
    })?;
    let mut restarted = Child::spawn(
        "ballast-csi",
        Command::new(&controller.process.command[0]).args(&controller.process.command[1..]),
        &cluster.dir.join("controller-restarted.log"),
    )?;
    cluster.wait_all_up(2)?;
    assert_eq!(
        cluster.volume("durable")?,
        before,
        "after a controller restart"
    );

    restarted.kill();
    cluster.cli_ok(&["cluster", "down"])?;
    cluster.cli_ok(&[
        "cluster",
        "up",
        "--nodes",
        "2",
        "--pool-size",
        "1GiB",
        "--store",
        store,
    ])?;
    cluster.wait_all_up(2)?;
    assert_eq!(
        cluster.volume("durable")?,
        before,
        "after a cluster restart"
    );
    for node in ["node-1", "node-2"] {
        assert!(cluster.replicas_on(node)?.contains_key("durable"), "{node}");
    }
    // The epoch keeps rising from where it was.
    let _ = cluster.cli(&["volume", "publish", "durable", "--node", "node-2"])?;
    assert_eq!(cluster.volume("durable")?["epoch"], 2);
    Ok(())
}

#[test]
fn controller_restart_keeps_volumes_and_epochs_embedded() -> Result<()> {
    restart_keeps_volumes_and_epochs("embedded")
}

#[test]
fn controller_restart_keeps_volumes_and_epochs_etcd() -> Result<()> {
    restart_keeps_volumes_and_epochs("etcd")
}

#[test]
fn nodes_go_down_without_heartbeats_and_deletes_finish_when_they_return() -> Result<()> {
    let cluster = Cluster::up(
        "cluster-liveness",
        2,
        "embedded",
        &["--heartbeat-timeout", "5s"],
    )?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "16MiB",
        "--replicas",
        "2",
        "--thin",
    ])?;
    let info = cluster.info()?;
    let agent2 = info.nodes[1].process.pid;
    signal::kill(Pid::from_raw(agent2), Signal::SIGSTOP)?;
    let result = (|| -> Result<()> {
        // Heartbeats come every 2 s; 5 s without one is "down" (tight
        // enough for a quick test, loose enough for a loaded machine).
        cluster.wait_node("node-2", "down", Duration::from_secs(30))?;
        // node-1 stays up: only node-2 stopped sending heartbeats.
        assert!(
            cluster
                .node_states()?
                .contains(&("node-1".into(), "up".into()))
        );
        let err = cluster.cli_err(&[
            "volume",
            "create",
            "w",
            "--size",
            "16MiB",
            "--replicas",
            "2",
        ])?;
        assert!(err.contains("only 1 of 1 up node(s)"), "{err}");
        // Deleting while node-2 is down: the volume goes to "deleting" and
        // node-1's replica is destroyed at once.
        cluster.cli_ok(&["volume", "delete", "v"])?;
        assert_eq!(cluster.volume("v")?["status"], "deleting");
        assert!(!cluster.replicas_on("node-1")?.contains_key("v"));
        Ok(())
    })();
    signal::kill(Pid::from_raw(agent2), Signal::SIGCONT)?;
    result?;
    cluster.wait_node("node-2", "up", Duration::from_secs(20))?;
    wait_for("the deletion to finish", Duration::from_secs(30), || {
        cluster
            .cli(&["volume", "show", "v"])
            .ok()
            .filter(|o| !o.status.success())
    })?;
    assert!(!cluster.replicas_on("node-2")?.contains_key("v"));
    Ok(())
}

#[test]
fn cluster_down_twice_leaves_no_process_mount_or_loop_device() -> Result<()> {
    let cluster = Cluster::up("cluster-down", 2, "etcd", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "v",
        "--size",
        "16MiB",
        "--replicas",
        "2",
    ])?;
    let info = cluster.info()?;
    let pids: Vec<i32> = info.processes().iter().map(|p| p.pid).collect();
    assert_eq!(
        pids.len(),
        6,
        "etcd, controller, two agents and their node plugins"
    );
    assert!(pids.iter().all(|p| pid_running(*p)));
    assert_eq!(mounts_under(&cluster.path).len(), 2, "one pool per agent");
    assert_eq!(loops_under(&cluster.path).len(), 2);
    // A crashed agent leaves its pool mounted: down must clean it anyway.
    signal::kill(Pid::from_raw(info.nodes[0].process.pid), Signal::SIGKILL)?;

    let out = cluster.cli_ok(&["cluster", "down"])?;
    assert!(out.contains("is down"), "{out}");
    for pid in &pids {
        assert!(!pid_running(*pid), "process {pid} still runs");
    }
    assert_eq!(mounts_under(&cluster.path), Vec::<String>::new());
    assert_eq!(loops_under(&cluster.path), Vec::<String>::new());
    cluster.cli_ok(&["cluster", "down"])?;
    let err = cluster.cli_err(&["node", "list"])?;
    assert!(err.contains("Cannot reach the controller"), "{err}");
    Ok(())
}

#[test]
fn agents_register_again_when_the_controller_forgot_them() -> Result<()> {
    let cluster = Cluster::up("cluster-forgot", 2, "embedded", &[])?;
    let info = cluster.info()?;
    let controller = info.controller.as_ref().context("controller")?;
    signal::kill(Pid::from_raw(controller.process.pid), Signal::SIGKILL)?;
    wait_for("the controller to die", Duration::from_secs(10), || {
        (!pid_running(controller.process.pid)).then_some(())
    })?;
    // A new, empty store: the controller knows no node, so the agents'
    // heartbeats get NOT_FOUND and they must register again.
    std::fs::remove_file(info.dir.join("ballast.redb"))?;
    let _restarted = Child::spawn(
        "ballast-csi",
        Command::new(&controller.process.command[0]).args(&controller.process.command[1..]),
        &cluster.dir.join("controller-restarted.log"),
    )?;
    cluster.wait_all_up(2)?;
    let nodes = cluster.cli_json(&["node", "list"])?;
    for node in nodes.as_array().context("nodes")? {
        assert!(
            !node["agent_address"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
        assert!(!node["data_address"].as_str().unwrap_or_default().is_empty());
        assert_eq!(node["pools"].as_array().map(Vec::len), Some(1), "{node}");
    }
    let agent_log = std::fs::read_to_string(&info.nodes[0].process.log)?;
    assert!(agent_log.contains("registering again"), "{agent_log}");
    Ok(())
}
