//! Replicated volumes under faults, through the real processes of a local
//! cluster: a controller, three agents, targets and the replica protocol,
//! driven by fio, qemu-io and libnbd. Each test checks one of the safety
//! invariants of DESIGN.md and ends by comparing the replica files byte for
//! byte.

use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ballast_proto::agent::target_service_client::TargetServiceClient;
use ballast_proto::agent::{GetTargetRequest, StartTargetRequest, TargetReplica};
use nix::sys::signal::Signal;

use crate::harness::cluster::{Cluster, ControllerCli as _, T};
use crate::harness::{Child, fio, run, run_ok, wait_for};

/// Volume size used by these tests.
const VOLUME: &str = "256MiB";

/// Starts a 3-node cluster with a short heartbeat timeout and a published
/// 3-replica thin volume `vol`; returns the cluster and the NBD URI.
fn published_volume(name: &str, node: &str) -> Result<(Cluster, String)> {
    let cluster = Cluster::up(name, 3, "embedded", &["--heartbeat-timeout", "5s"])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        VOLUME,
        "--replicas",
        "3",
        "--thin",
    ])?;
    let uri = cluster.cli_ok(&["volume", "publish", "vol", "--node", node])?;
    Ok((cluster, uri.trim().to_string()))
}

/// Waits until every replica of `vol` is in sync.
fn wait_in_sync(cluster: &Cluster, timeout: Duration) -> Result<()> {
    wait_for("every replica back in sync", timeout, || {
        cluster
            .replica_states("vol")
            .ok()
            .filter(|states| states.len() == 3 && states.iter().all(|(_, s)| s == "in-sync"))
    })
    .map(|_| ())
}

/// Path of `vol`'s replica file on `node`.
fn replica_file(cluster: &Cluster, node: &str) -> Result<PathBuf> {
    let info = cluster.info()?;
    let node = info
        .nodes
        .iter()
        .find(|n| n.node_id == node)
        .with_context(|| format!("no node {node}"))?;
    Ok(node.state_dir.join("pools/pool/replicas/vol.data"))
}

/// Unpublishes `vol` (no I/O in flight) and checks that its three replica
/// files hold the same bytes.
fn assert_replicas_identical(cluster: &Cluster) -> Result<()> {
    cluster.cli_ok(&["volume", "unpublish", "vol"])?;
    let first = replica_file(cluster, "node-1")?;
    for node in ["node-2", "node-3"] {
        let other = replica_file(cluster, node)?;
        let out = run(Command::new("cmp").arg(&first).arg(&other), T)?;
        ensure!(
            out.status.success(),
            "replica on {node} differs from node-1: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

#[test]
fn sigkilled_replica_agent_loses_no_write_and_rebuilds() -> Result<()> {
    let (cluster, uri) = published_volume("repl-kill", "node-1")?;
    let mut fio = fio::start(&cluster.dir, &uri, "fio-kill.log")?;
    std::thread::sleep(Duration::from_secs(2));
    cluster.node_process("node-3")?.signal(Signal::SIGKILL)?;

    // The target drops the dead replica through the controller and goes on.
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
    fio::assert_clean(&cluster.dir, &mut fio, "fio-kill.log")?;

    cluster.cli_ok(&["cluster", "restart-node", "node-3"])?;
    wait_in_sync(&cluster, Duration::from_secs(180))?;
    assert_replicas_identical(&cluster)
}

#[test]
fn sigstopped_replica_agent_stalls_io_only_for_the_timeout() -> Result<()> {
    let (cluster, uri) = published_volume("repl-stop", "node-1")?;
    let mut fio = fio::start(&cluster.dir, &uri, "fio-stop.log")?;
    std::thread::sleep(Duration::from_secs(2));
    let hung = cluster.node_process("node-2")?;
    hung.stop(Duration::from_secs(5))?;
    let resumed = (|| -> Result<()> {
        // A hung node: I/O resumes after the replica timeout, and fio sees
        // no error at all.
        fio::assert_clean(&cluster.dir, &mut fio, "fio-stop.log")?;
        let states = cluster.replica_states("vol")?;
        ensure!(
            states.iter().any(|(n, s)| n == "node-2" && s != "in-sync"),
            "the hung replica must have been dropped: {states:?}"
        );
        Ok(())
    })();
    hung.signal(Signal::SIGCONT)?;
    resumed?;
    wait_in_sync(&cluster, Duration::from_secs(180))?;
    assert_replicas_identical(&cluster)
}

/// A libnbd client, connected before a test changes anything, that writes
/// one pattern when told to and reports whether the write was acknowledged.
struct PendingWriter {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

const PENDING_WRITER: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
print("CONNECTED", flush=True)
sys.stdin.readline()
try:
    h.pwrite(bytes([int(sys.argv[2])]) * (1 << 20), 0)
    h.flush()
    print("ACKNOWLEDGED", flush=True)
except nbd.Error as e:
    print("REFUSED %s" % e, flush=True)
"#;

impl PendingWriter {
    fn connect(uri: &str, pattern: u8) -> Result<Self> {
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", PENDING_WRITER, uri, &pattern.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().context("writer stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        ensure!(first == "CONNECTED", "writer did not connect: {first}");
        Ok(Self { child, lines })
    }

    /// Sends the write; returns the writer's verdict line.
    fn write(mut self) -> Result<String> {
        self.child
            .stdin
            .as_mut()
            .context("writer stdin")?
            .write_all(b"go\n")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let verdict = self.lines.next().transpose()?.unwrap_or_default();
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the stale writer did not finish");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(verdict)
    }
}

impl Drop for PendingWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `len` bytes at offset 0 of a replica file.
fn replica_head(cluster: &Cluster, node: &str, len: usize) -> Result<Vec<u8>> {
    let mut data = fs::read(replica_file(cluster, node)?)?;
    data.truncate(len);
    Ok(data)
}

#[test]
fn a_stale_target_cannot_write_after_a_newer_one_started() -> Result<()> {
    let (cluster, uri1) = published_volume("repl-fence", "node-1")?;
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x11 0 1M"])
            .arg(&uri1),
        T,
    )?;
    let stale = PendingWriter::connect(&uri1, 0x99)?;

    // A newer target on node-2 at the next epoch, while node-1's target
    // still runs: what a forced publish does when the old node cannot be
    // told to stop (it is partitioned or paused). Started through the
    // agent's own API so that nothing stops node-1's target.
    let volume = cluster.volume("vol")?;
    let epoch = volume["epoch"].as_u64().context("epoch")? + 1;
    let info = cluster.info()?;
    let replicas = info
        .nodes
        .iter()
        .map(|n| TargetReplica {
            node_id: n.node_id.clone(),
            replica_name: "vol".into(),
            data_address: n.data_address.clone(),
            in_sync: true,
            ..Default::default()
        })
        .collect();
    let node2 = info
        .nodes
        .iter()
        .find(|n| n.node_id == "node-2")
        .context("node-2")?;
    let node1 = info
        .nodes
        .iter()
        .find(|n| n.node_id == "node-1")
        .context("node-1")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = runtime.block_on(async {
        let mut client = TargetServiceClient::connect(node2.agent_address.clone()).await?;
        let target = client
            .start_target(StartTargetRequest {
                volume_id: "vol".into(),
                epoch,
                size_bytes: 256 << 20,
                socket_path: String::new(),
                replicas,
                controller_address: info.controller_address().unwrap_or_default().into(),
            })
            .await?
            .into_inner();
        anyhow::Ok(target)
    })?;
    ensure!(
        target.epoch == epoch,
        "node-2's target runs at epoch {}",
        target.epoch
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x22 0 1M"])
            .arg(&target.nbd_uri),
        T,
    )?;

    // The old target's write is refused, and lands nowhere.
    let verdict = stale.write()?;
    ensure!(
        verdict.starts_with("REFUSED"),
        "a stale target acknowledged a write: {verdict}"
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x22 0 1M"])
            .arg(&target.nbd_uri),
        T,
    )?;
    ensure!(
        !out.contains("fail"),
        "the newer target's data was overwritten: {out}"
    );
    let fenced = runtime.block_on(async {
        let mut client = TargetServiceClient::connect(node1.agent_address.clone()).await?;
        let target = client
            .get_target(GetTargetRequest {
                volume_id: "vol".into(),
            })
            .await?
            .into_inner();
        anyhow::Ok(target)
    })?;
    ensure!(
        !fenced.serving,
        "node-1's target must know it is fenced: {fenced:?}"
    );
    for node in ["node-1", "node-2", "node-3"] {
        let head = replica_head(&cluster, node, 1 << 20)?;
        ensure!(
            head.iter().all(|&b| b == 0x22),
            "replica on {node} holds a stale write"
        );
    }
    Ok(())
}

#[test]
fn writes_wait_while_the_controller_cannot_commit_a_drop() -> Result<()> {
    let (cluster, uri) = published_volume("repl-inv2", "node-1")?;
    let controller = cluster.info()?.controller.context("controller")?.process;
    controller.stop(Duration::from_secs(5))?;
    let outcome = (|| -> Result<Child> {
        cluster.node_process("node-3")?.signal(Signal::SIGKILL)?;
        let mut writer = Child::spawn(
            "qemu-io",
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush"])
                .arg(&uri),
            &cluster.dir.join("qemu-io-inv2.log"),
        )?;
        // Well past the replica timeout: the write cannot be acknowledged
        // because the drop of node-3 cannot be committed.
        std::thread::sleep(Duration::from_secs(12));
        ensure!(
            writer.is_running(),
            "a write was acknowledged while the controller could not commit the drop: {}",
            fs::read_to_string(cluster.dir.join("qemu-io-inv2.log")).unwrap_or_default()
        );
        Ok(writer)
    })();
    controller.signal(Signal::SIGCONT)?;
    let mut writer = outcome?;
    let status = writer.wait_timeout(Duration::from_secs(120))?;
    ensure!(
        status.success(),
        "the write must complete once the controller is back"
    );
    let states = cluster.replica_states("vol")?;
    ensure!(
        states.iter().any(|(n, s)| n == "node-3" && s != "in-sync"),
        "node-3 must be out of the in-sync set: {states:?}"
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x5a 0 1M"])
            .arg(&uri),
        T,
    )?;
    ensure!(!out.contains("fail"), "{out}");
    Ok(())
}

/// A target that dies may leave a write it never acknowledged on some
/// in-sync replicas and not on others. Simulated here by writing straight
/// into node-3's replica file before node-1 (the target's node) dies. The
/// next publish keeps one in-sync replica and rebuilds the others from it,
/// so reads cannot flip between versions and the replicas end identical.
#[test]
fn a_new_target_after_an_unclean_stop_resynchronises_the_replicas() -> Result<()> {
    let (cluster, uri1) = published_volume("repl-resync", "node-1")?;
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xaa 0 1M", "-c", "flush"])
            .arg(&uri1),
        T,
    )?;
    // The unacknowledged write that reached node-3 only.
    run_ok(
        Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!(
                "of={}",
                replica_file(&cluster, "node-3")?.display()
            ))
            .args(["bs=1M", "count=1", "conv=notrunc", "oflag=direct,sync"]),
        T,
    )?;
    let target_agent = cluster.node_process("node-1")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(target_agent.pid),
        Signal::SIGKILL,
    )?;
    cluster.cli_ok(&["volume", "unpublish", "vol"])?;
    let uri2 = cluster.cli_ok(&["volume", "publish", "vol", "--node", "node-2"])?;
    let uri2 = uri2.trim();

    // node-2's replica is kept; node-3's is rebuilt from it by hashes;
    // node-1's waits for its node.
    wait_for(
        "node-2 and node-3 in sync again",
        Duration::from_secs(60),
        || {
            cluster.replica_states("vol").ok().filter(|states| {
                states
                    .iter()
                    .all(|(node, state)| (state == "in-sync") == (node != "node-1"))
            })
        },
    )?;
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0xaa 0 1M"])
            .arg(uri2),
        T,
    )?;
    ensure!(
        !out.contains("fail"),
        "the acknowledged data changed: {out}"
    );
    cluster.cli_ok(&["volume", "unpublish", "vol"])?;
    let out = run(
        Command::new("cmp")
            .arg(replica_file(&cluster, "node-2")?)
            .arg(replica_file(&cluster, "node-3")?),
        T,
    )?;
    ensure!(
        out.status.success(),
        "node-3's replica still differs from node-2's: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
