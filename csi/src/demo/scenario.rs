//! The demo's story, step by step (see the parent module's docs), and the
//! [`Resources`] it leaves for the clean-up: what is running or published
//! at each moment, recorded before each step that creates it, so the
//! clean-up undoes exactly what exists even when a step failed half-way
//! or the story was interrupted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_proto::agent::GetTargetRequest;
use ballast_proto::agent::target_service_client::TargetServiceClient;
use ballast_proto::controller::volume_service_client::VolumeServiceClient;
use ballast_proto::controller::{GetVolumeRequest, Volume};
use nix::sys::signal::Signal;
use tonic::transport::{Channel, Endpoint};

use super::kubelet::{Attachment, Kubelet};
use super::pgbench::{self, Load, LoadSpec, Outcome};
use super::postgres::{self, Instance};
use super::progress::{Console, bar, bytes};
use super::replicas::{self, Comparison};
use super::report::{Check, LoadFigures, RebuildFigures, ReplicaState, Report, VolumeState};
use super::{Error, Options};
use crate::cluster::{self, ClusterInfo, ClusterSpec, NodeInfo};

/// The volume, named like a PVC's volume.
const VOLUME: &str = "pvc-demo-postgres";
/// The pod that uses it.
const POD: &str = "postgres-0";
/// Where PostgreSQL runs first.
const FIRST_NODE: &str = "node-1";
/// The node whose agent is killed, and where PostgreSQL moves afterwards.
const SECOND_NODE: &str = "node-2";
/// Nodes in the cluster and replicas of the volume.
const NODES: usize = 3;
/// How long the killed replica may take to leave the in-sync set.
const DROP_BOUND: Duration = Duration::from_secs(30);
/// How long the replica may take to be back in sync after its agent
/// restarted (a check, not an error).
const REBUILD_BOUND: Duration = Duration::from_secs(120);
/// Deadline of `pgbench -i`.
const INIT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the controller is asked for the volume's state.
const POLL: Duration = Duration::from_millis(200);

/// What exists and must be undone; see the module docs.
#[derive(Debug, Default)]
pub(super) struct Resources {
    /// The demo directory, once the cluster start was attempted.
    pub(super) dir: Option<PathBuf>,
    kubelet: Option<Kubelet>,
    /// Volumes published on a node (ControllerPublishVolume was called).
    attachments: Vec<Attachment>,
    server: Option<postgres::Server>,
}

impl Resources {
    /// Stops PostgreSQL; unless `keep`, unpublishes what is
    /// published and stops the cluster.
    ///
    /// # Errors
    ///
    /// The first error; every step is tried regardless.
    pub(super) async fn teardown(&mut self, console: &Console, keep: bool) -> Result<(), Error> {
        let mut first: Option<Error> = None;
        let mut note = |err: Error| {
            console.note(&format!("clean-up: {}", crate::error_chain(&err)));
            first.get_or_insert(err);
        };
        if let Some(server) = self.server.take() {
            console.note("stopping PostgreSQL");
            if let Err(err) = server.stop().await {
                note(err.into());
            }
        }
        if keep {
            return first.map_or(Ok(()), Err);
        }
        if let Some(kubelet) = self.kubelet.as_mut() {
            for attachment in self.attachments.drain(..).rev() {
                console.note(&format!(
                    "NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume on {}",
                    attachment.node_id
                ));
                if let Err(err) = kubelet.node_unpublish(&attachment).await {
                    note(err.into());
                }
                if let Err(err) = kubelet
                    .controller_unpublish(&attachment.volume_id, &attachment.node_id)
                    .await
                {
                    note(err.into());
                }
            }
        }
        if let Some(dir) = self.dir.clone() {
            console.note("stopping the cluster (ballast cluster down)");
            let down = tokio::task::spawn_blocking(move || cluster::down(&dir)).await;
            match down {
                Ok(Ok(())) => {}
                Ok(Err(err)) => note(err.into()),
                Err(join) => note(Error::Io {
                    op: "stop the cluster in",
                    path: self.dir.clone().unwrap_or_default(),
                    source: std::io::Error::other(join.to_string()),
                }),
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Tells what a kept cluster holds and how to stop it.
    pub(super) fn print_kept(&self, console: &Console) {
        let Some(dir) = &self.dir else { return };
        console.note("the cluster keeps running (--keep)");
        for attachment in &self.attachments {
            console.detail(&format!(
                "{VOLUME} is still published on {} and mounted at {}",
                attachment.node_id,
                attachment.target_path.display()
            ));
        }
        console.detail(&format!(
            "look:  ballast --cluster {} volume show {VOLUME}",
            dir.display()
        ));
        console.detail(&format!(
            "stop:  ballast cluster down --dir {}",
            dir.display()
        ));
    }
}

/// Runs the story; see the parent module's docs.
pub(super) async fn run(
    options: &Options,
    console: &Console,
    res: &mut Resources,
) -> Result<Report, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    // Fail before starting anything if PostgreSQL is missing.
    let binaries = postgres::Binaries::find()?;
    let dir = prepare_dir(options.dir.as_deref())?;
    res.dir = Some(dir.clone());
    let volume_bytes = volume_size(options.scale);

    console.step(&format!(
        "Starting a local cluster in {}: controller (embedded store), {NODES} agents, {NODES} CSI node plugins",
        dir.display()
    ));
    let mut spec = ClusterSpec::new(&dir, NODES);
    spec.pool_size_bytes = (volume_bytes + (2 << 30)).max(4 << 30);
    if let Some(bin_dir) = &options.bin_dir {
        spec.bin_dir = bin_dir.clone();
    }
    let info = cluster::up(&spec).await?;
    console.detail(&format!(
        "{NODES} nodes up; logs in {}/*.log",
        dir.display()
    ));
    let mut volumes = management_client(&info).await?;
    let endpoints: Vec<(String, String)> = info
        .nodes
        .iter()
        .map(|n| (n.node_id.clone(), n.csi_endpoint.clone()))
        .collect();
    let csi_endpoint = info
        .controller
        .as_ref()
        .map(|c| c.csi_endpoint.clone())
        .unwrap_or_default();
    let mut kubelet = Kubelet::connect(&dir.join("kubelet"), &csi_endpoint, &endpoints).await?;
    res.kubelet = Some(kubelet.clone());

    console.step(&format!(
        "CreateVolume {VOLUME}: {}, {NODES} replicas, ext4, thin",
        bytes(volume_bytes)
    ));
    let volume = kubelet
        .create_volume(VOLUME, volume_bytes, NODES as u32, "ext4")
        .await?;
    let record = get_volume(&mut volumes).await?;
    let holders: Vec<&str> = record.replicas.iter().map(|r| r.node_id.as_str()).collect();
    console.detail(&format!("replicas on {}", holders.join(", ")));

    console.step(&format!(
        "ControllerPublishVolume on {FIRST_NODE}, NodeStageVolume (mkfs.ext4), NodePublishVolume"
    ));
    let context = kubelet.controller_publish(&volume, FIRST_NODE).await?;
    let first = kubelet.attachment(VOLUME, FIRST_NODE, POD);
    res.attachments.push(first.clone());
    kubelet.node_publish(&volume, &context, &first).await?;
    let record = get_volume(&mut volumes).await?;
    console.detail(&format!(
        "target on {} at epoch {} ({}); mounted at {}",
        record.target_node_id,
        record.epoch,
        record.nbd_uri,
        first.target_path.display()
    ));

    console.step(&format!(
        "PostgreSQL {}: initdb on the volume, start (unix socket only; fsync, full_page_writes on)",
        binaries.version()
    ));
    let pg = Instance::new(
        &first.target_path.join("pgdata"),
        &dir.join("postgres"),
        &dir.join("postgres.log"),
    )?;
    pg.init().await?;
    res.server.insert(pg.spawn()?).wait_ready().await?;
    console.detail(&format!(
        "data directory {}; socket in {}; log {}",
        pg.data_dir().display(),
        pg.socket_dir().display(),
        pg.log().display()
    ));

    console.step(&format!("pgbench -i -s {}", options.scale));
    pgbench::initialize(&pg, options.scale, INIT_TIMEOUT).await?;

    let phase = options.phase.max(Duration::from_secs(2));
    let load_duration = phase * 3;
    console.step(&format!(
        "pgbench: {} clients for {} s (TPC-B-like: each transaction updates 3 tables and adds a pgbench_history row)",
        options.clients,
        load_duration.as_secs()
    ));
    // Dropped (when a step fails or the demo is interrupted), the load
    // kills pgbench.
    let mut load = Load::start(
        &pg,
        &LoadSpec {
            clients: options.clients,
            threads: options.clients.clamp(1, 2),
            duration: load_duration,
            log_dir: dir.join("pgbench"),
        },
    )?;
    let printer = print_progress(&mut load, console);
    let load_started = Instant::now();
    sleep_while_running(&mut load, phase).await;

    let node = node_info(&info, SECOND_NODE)?;
    console.step(&format!(
        "SIGKILL the agent of {SECOND_NODE} (pid {}): it holds a replica; the target is on {FIRST_NODE}",
        node.process.pid
    ));
    let killed_at = SystemTime::now();
    let killed = Instant::now();
    kill_agent(&node).await?;
    let dropped_after = wait_dropped(&mut volumes).await.map(|()| killed.elapsed());
    match &dropped_after {
        Ok(after) => console.detail(&format!(
            "the target dropped {SECOND_NODE}'s replica from the in-sync set after {:.2} s; writes go on to the other replicas",
            after.as_secs_f64()
        )),
        Err(err) => console.detail(&crate::error_chain(err)),
    }
    let outage = (phase / 3).max(Duration::from_secs(2));
    tokio::time::sleep(outage.saturating_sub(killed.elapsed())).await;

    console.step(&format!(
        "Restarting the agent of {SECOND_NODE}; the controller has the target rebuild its replica"
    ));
    let outage = killed.elapsed();
    let restarted = Instant::now();
    let restart_dir = dir.clone();
    tokio::task::spawn_blocking(move || cluster::restart_node(&restart_dir, SECOND_NODE))
        .await
        .map_err(|join| Error::Io {
            op: "restart the agent in",
            path: dir.clone(),
            source: std::io::Error::other(join.to_string()),
        })??;
    let mut target = target_client(&node_info(&info, FIRST_NODE)?).await?;
    let rebuild = wait_rebuild(&mut volumes, &mut target, console, restarted).await?;
    let in_sync_at = rebuild.in_sync.map(|(_, at)| at);
    let in_sync_after = rebuild.in_sync.map(|(after, _)| after);
    match in_sync_after {
        Some(after) => console.detail(&format!(
            "{SECOND_NODE}'s replica is back in sync {:.2} s after the restart ({} of regions that differed copied)",
            after.as_secs_f64(),
            bytes(rebuild.total_bytes)
        )),
        None => console.detail(&format!(
            "{SECOND_NODE}'s replica is not in sync {} s after the restart",
            REBUILD_BOUND.as_secs()
        )),
    }

    let remaining = load_duration.saturating_sub(load_started.elapsed());
    console.note(&format!(
        "waiting for pgbench to finish ({} s left)",
        remaining.as_secs()
    ));
    let outcome = load.finish(remaining + Duration::from_secs(120)).await?;
    let _ = printer.await;
    console.detail(&format!(
        "pgbench finished: {} transactions processed, {} failed, exit code {}",
        outcome
            .processed
            .map_or_else(|| "no count of".to_string(), |n| n.to_string()),
        outcome.failed,
        outcome
            .exit_code
            .map_or_else(|| "none (killed)".to_string(), |c| c.to_string())
    ));

    console.step(&format!(
        "Failover: stop PostgreSQL cleanly; NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume on {FIRST_NODE}"
    ));
    if let Some(server) = res.server.take() {
        server.stop().await?;
    }
    kubelet.node_unpublish(&first).await?;
    kubelet.controller_unpublish(VOLUME, FIRST_NODE).await?;
    res.attachments.retain(|a| a.node_id != FIRST_NODE);

    console.step(&format!(
        "ControllerPublishVolume on {SECOND_NODE}, NodeStageVolume, NodePublishVolume; PostgreSQL starts there"
    ));
    let context = kubelet.controller_publish(&volume, SECOND_NODE).await?;
    let second = kubelet.attachment(VOLUME, SECOND_NODE, POD);
    res.attachments.push(second.clone());
    kubelet.node_publish(&volume, &context, &second).await?;
    let pg = pg.with_data_dir(&second.target_path.join("pgdata"))?;
    res.server.insert(pg.spawn()?).wait_ready().await?;
    let record = get_volume(&mut volumes).await?;
    console.detail(&format!(
        "target on {} at epoch {}; PostgreSQL serves {}",
        record.target_node_id,
        record.epoch,
        pg.data_dir().display()
    ));

    console.step("Checking the data: count(*) FROM pgbench_history, pg_amcheck --heapallindexed");
    let history = pg.query("SELECT count(*) FROM pgbench_history").await?;
    let amcheck = pg.amcheck().await?;
    let end = get_volume(&mut volumes).await?;

    let mut checks = Vec::new();
    checks.push(load_check(&outcome));
    checks.push(Check::new(
        dropped_after.is_ok(),
        format!("{SECOND_NODE}'s replica left the in-sync set after the kill"),
        match &dropped_after {
            Ok(after) => format!("after {:.2} s", after.as_secs_f64()),
            Err(err) => err.to_string(),
        },
    ));
    checks.push(Check::new(
        in_sync_after.is_some(),
        format!(
            "{SECOND_NODE}'s replica back in sync within {} s of its agent's restart",
            REBUILD_BOUND.as_secs()
        ),
        in_sync_after.map_or_else(
            || format!("last seen {}", rebuild.last_state),
            |after| format!("in {:.2} s", after.as_secs_f64()),
        ),
    ));
    checks.push(Check::new(
        outcome.processed.is_some() && history.parse::<u64>().ok() == outcome.processed,
        format!("every committed transaction is there after failover to {SECOND_NODE}"),
        format!(
            "pgbench_history has {history} rows, pgbench processed {}",
            outcome
                .processed
                .map_or_else(|| "an unknown number of".to_string(), |n| n.to_string())
        ),
    ));
    checks.push(Check::new(
        !amcheck.corrupt && amcheck.relations > 0,
        "pg_amcheck --heapallindexed --parent-check finds no corruption",
        if amcheck.corrupt {
            amcheck
                .report
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            format!("{} tables and indexes checked", amcheck.relations)
        },
    ));
    let in_sync = end.replicas.iter().filter(|r| r.state == "in-sync").count();
    checks.push(Check::new(
        end.status == "healthy" && in_sync == end.replica_count as usize,
        "the volume is healthy at the end",
        format!(
            "{}: {in_sync} of {} replicas in sync",
            end.status, end.replica_count
        ),
    ));

    console.step(&format!(
        "Stop PostgreSQL; NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume on {SECOND_NODE}; compare the replicas byte for byte"
    ));
    if let Some(server) = res.server.take() {
        server.stop().await?;
    }
    kubelet.node_unpublish(&second).await?;
    kubelet.controller_unpublish(VOLUME, SECOND_NODE).await?;
    res.attachments.clear();
    checks.push(compare_replicas(&info, &end).await?);

    let stall = outcome.transactions.longest_stall();
    let report = Report {
        volume: volume_state(&end),
        load: load_figures(
            options,
            load_duration,
            &outcome,
            killed_at,
            in_sync_at,
            stall,
        ),
        rebuild: RebuildFigures {
            node_id: SECOND_NODE.to_string(),
            dropped_after: dropped_after.ok(),
            outage,
            in_sync_after,
            rebuilt_bytes: rebuild.total_bytes,
        },
        checks,
    };
    if !options.keep {
        console.step("DeleteVolume; cluster down");
        kubelet.delete_volume(VOLUME).await?;
    }
    Ok(report)
}

/// The demo directory: the one given (new or empty) or a fresh one under
/// /var/tmp; mode 0755, since PostgreSQL (user `postgres`) must enter it.
fn prepare_dir(dir: Option<&Path>) -> Result<PathBuf, Error> {
    let dir = match dir {
        Some(dir) => std::path::absolute(dir).map_err(|source| Error::Io {
            op: "resolve",
            path: dir.to_path_buf(),
            source,
        })?,
        None => {
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            PathBuf::from(format!(
                "/var/tmp/ballast-demo-{stamp}-{}",
                std::process::id()
            ))
        }
    };
    let io = |op: &'static str| {
        let path = dir.clone();
        move |source| Error::Io { op, path, source }
    };
    if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(Error::DirNotEmpty(dir));
    }
    std::fs::create_dir_all(&dir).map_err(io("create"))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io("set the mode of"))?;
    Ok(dir)
}

/// Room for pgbench's tables at `scale` (about 16 MB each) with their
/// indexes and the WAL (`max_wal_size` 256 MB): 1 GiB plus 32 MiB a unit.
fn volume_size(scale: u32) -> u64 {
    (1 << 30) + u64::from(scale) * (32 << 20)
}

/// Compares the volume's replica files on their nodes (the volume must be
/// unpublished).
async fn compare_replicas(info: &ClusterInfo, volume: &Volume) -> Result<Check, Error> {
    let mut files = Vec::new();
    for replica in &volume.replicas {
        let node = node_info(info, &replica.node_id)?;
        files.push(replicas::replica_file(
            &node.state_dir,
            &replica.replica_name,
        )?);
    }
    let count = files.len();
    let comparison = tokio::task::spawn_blocking(move || replicas::compare(&files))
        .await
        .map_err(|join| Error::Io {
            op: "compare the replicas of",
            path: PathBuf::from(VOLUME),
            source: std::io::Error::other(join.to_string()),
        })??;
    let what = format!("the {count} replicas hold the same bytes");
    Ok(match comparison {
        Comparison::Identical(size) => Check::new(
            count == NODES,
            what,
            format!("{count} files of {} compared", bytes(size)),
        ),
        Comparison::Size {
            file,
            size,
            expected,
        } => Check::new(
            false,
            what,
            format!("{} has {size} bytes, not {expected}", file.display()),
        ),
        Comparison::Content { file, offset } => Check::new(
            false,
            what,
            format!("{} differs from the first at byte {offset}", file.display()),
        ),
    })
}

async fn management_client(info: &ClusterInfo) -> Result<VolumeServiceClient<Channel>, Error> {
    let address = info.controller_address().unwrap_or_default().to_string();
    let unreachable = |source| Error::ControllerUnreachable {
        address: address.clone(),
        source,
    };
    let channel = Endpoint::from_shared(address.clone())
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(unreachable)?;
    Ok(VolumeServiceClient::new(channel))
}

async fn target_client(node: &NodeInfo) -> Result<TargetServiceClient<Channel>, Error> {
    let address = node.agent_address.clone();
    let unreachable = |source| Error::AgentUnreachable {
        node_id: node.node_id.clone(),
        address: address.clone(),
        source,
    };
    let channel = Endpoint::from_shared(address.clone())
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(unreachable)?;
    Ok(TargetServiceClient::new(channel))
}

async fn get_volume(client: &mut VolumeServiceClient<Channel>) -> Result<Volume, Error> {
    client
        .get_volume(GetVolumeRequest {
            volume_id: VOLUME.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| Error::Controller {
            call: "GetVolume",
            status,
        })
}

fn node_info(info: &ClusterInfo, node_id: &str) -> Result<NodeInfo, Error> {
    info.nodes
        .iter()
        .find(|n| n.node_id == node_id)
        .cloned()
        .ok_or_else(|| cluster::Error::NodeNotFound {
            node_id: node_id.to_string(),
        })
        .map_err(Error::from)
}

/// Prints pgbench's progress lines under the current step until pgbench
/// closes its output.
fn print_progress(load: &mut Load, console: &Console) -> tokio::task::JoinHandle<()> {
    let receiver = load.take_progress();
    let console = console.clone();
    tokio::spawn(async move {
        let Some(mut receiver) = receiver else { return };
        while let Some(p) = receiver.recv().await {
            console.detail(&format!(
                "pgbench {:>4.0} s {:>8.1} tps{}",
                p.at_secs,
                p.tps,
                p.latency_ms
                    .map(|ms| format!("  lat {ms:.1} ms"))
                    .unwrap_or_default()
            ));
        }
    })
}

/// Sleeps for `duration`, or less if pgbench exits.
async fn sleep_while_running(load: &mut Load, duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && !load.has_exited() {
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// SIGKILLs an agent and waits (bounded) until it is gone.
async fn kill_agent(node: &NodeInfo) -> Result<(), Error> {
    let process = node.process.clone();
    let node_id = node.node_id.clone();
    let gone = tokio::task::spawn_blocking(move || {
        process.signal(Signal::SIGKILL)?;
        Ok::<_, cluster::Error>(process.wait_exit(Duration::from_secs(10)))
    })
    .await
    .map_err(|join| Error::Io {
        op: "kill the agent of",
        path: PathBuf::from(&node_id),
        source: std::io::Error::other(join.to_string()),
    })??;
    if gone {
        Ok(())
    } else {
        Err(Error::Timeout {
            what: format!("The exit of {node_id}'s agent after SIGKILL"),
            timeout: Duration::from_secs(10),
        })
    }
}

/// Waits until the controller shows [`SECOND_NODE`]'s replica out of the
/// in-sync set.
async fn wait_dropped(volumes: &mut VolumeServiceClient<Channel>) -> Result<(), Error> {
    let deadline = Instant::now() + DROP_BOUND;
    loop {
        let volume = get_volume(volumes).await?;
        if replica_state(&volume, SECOND_NODE).is_some_and(|s| s != "in-sync") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("The drop of {SECOND_NODE}'s replica from the in-sync set"),
                timeout: DROP_BOUND,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What the rebuild wait saw.
struct Rebuild {
    /// When the replica was seen in sync again: the time since the
    /// agent's restart, and the wall-clock time.
    in_sync: Option<(Duration, SystemTime)>,
    /// Bytes of the regions the rebuild found different and copied, as
    /// the target counts them.
    total_bytes: u64,
    /// The replica's last state.
    last_state: String,
}

/// Shows the rebuild of [`SECOND_NODE`]'s replica as a progress bar until
/// the controller has it in sync, for at most [`REBUILD_BOUND`] after
/// `restarted`. The state comes from the controller (the in-sync set is
/// its record); the progress from the target itself, on the agent of
/// [`FIRST_NODE`], which counts every copied region at once (the
/// controller hears of it once a second, and forgets it when the replica
/// is in sync).
async fn wait_rebuild(
    volumes: &mut VolumeServiceClient<Channel>,
    target: &mut TargetServiceClient<Channel>,
    console: &Console,
    restarted: Instant,
) -> Result<Rebuild, Error> {
    let deadline = restarted + REBUILD_BOUND;
    let mut rebuild = Rebuild {
        in_sync: None,
        total_bytes: 0,
        last_state: String::new(),
    };
    loop {
        let volume = get_volume(volumes).await?;
        let state = replica_state(&volume, SECOND_NODE).unwrap_or("missing");
        rebuild.last_state = state.to_string();
        let progress = target_progress(target).await;
        if let Some((_, total)) = progress {
            rebuild.total_bytes = total;
        }
        match (state, progress) {
            ("in-sync", _) => {
                console.clear_status();
                rebuild.in_sync = Some((restarted.elapsed(), SystemTime::now()));
                return Ok(rebuild);
            }
            ("rebuilding", Some((done, total))) => {
                console.status(&format!("rebuild {}", bar(done, total)));
            }
            ("rebuilding", None) => console.status("rebuild starting"),
            (other, _) => {
                console.status(&format!(
                    "replica {other}: waiting for its agent to register"
                ));
            }
        }
        if Instant::now() >= deadline {
            console.clear_status();
            return Ok(rebuild);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The target's rebuild progress of [`SECOND_NODE`]'s replica (done and
/// total bytes); None if the target cannot be asked.
async fn target_progress(target: &mut TargetServiceClient<Channel>) -> Option<(u64, u64)> {
    let target = target
        .get_target(GetTargetRequest {
            volume_id: VOLUME.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    let replica = target.replicas.iter().find(|r| r.node_id == SECOND_NODE)?;
    Some((replica.rebuild_done_bytes, replica.rebuild_total_bytes))
}

fn replica_state<'a>(volume: &'a Volume, node_id: &str) -> Option<&'a str> {
    volume
        .replicas
        .iter()
        .find(|r| r.node_id == node_id)
        .map(|r| r.state.as_str())
}

fn load_check(outcome: &Outcome) -> Check {
    let detail = if outcome.clean() {
        format!(
            "exit code 0, {} transactions, 0 failed",
            outcome.processed.unwrap_or_default()
        )
    } else {
        format!(
            "exit code {:?}, {} failed{}",
            outcome.exit_code,
            outcome.failed,
            outcome
                .errors
                .first()
                .map(|e| format!(", first error: {e}"))
                .unwrap_or_default()
        )
    };
    Check::new(
        outcome.clean(),
        "pgbench ran without errors through the fault",
        detail,
    )
}

fn load_figures(
    options: &Options,
    duration: Duration,
    outcome: &Outcome,
    killed_at: SystemTime,
    in_sync_at: Option<SystemTime>,
    stall: Option<pgbench::Stall>,
) -> LoadFigures {
    let log = &outcome.transactions;
    let (first, last) = (log.first(), log.last());
    let fault_end = match (in_sync_at, last) {
        (Some(in_sync), Some(last)) => Some(in_sync.min(last)),
        (None, last) => last,
        (in_sync, None) => in_sync,
    };
    LoadFigures {
        scale: options.scale,
        clients: options.clients,
        duration,
        processed: outcome.processed,
        failed: outcome.failed,
        tps_before: first.and_then(|first| log.tps_between(first, killed_at)),
        tps_during: fault_end.and_then(|end| log.tps_between(killed_at, end)),
        tps_after: in_sync_at
            .zip(last)
            .and_then(|(from, last)| log.tps_between(from, last)),
        fault_window: fault_end.and_then(|end| end.duration_since(killed_at).ok()),
        longest_stall: stall.map(|s| s.length),
        stall_at: stall.and_then(|s| s.from.duration_since(outcome.started).ok()),
        slowest: log.slowest(),
    }
}

fn volume_state(volume: &Volume) -> VolumeState {
    VolumeState {
        volume_id: volume.volume_id.clone(),
        size_bytes: volume.size_bytes,
        status: volume.status.clone(),
        target_node_id: volume.target_node_id.clone(),
        epoch: volume.epoch,
        replicas: volume
            .replicas
            .iter()
            .map(|r| ReplicaState {
                node_id: r.node_id.clone(),
                state: r.state.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_with_files_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("x"), "").expect("file");
        assert!(matches!(
            prepare_dir(Some(dir.path())),
            Err(Error::DirNotEmpty(_))
        ));
        let fresh = dir.path().join("demo");
        assert_eq!(prepare_dir(Some(&fresh)).expect("new"), fresh);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&fresh)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(prepare_dir(Some(&fresh)).expect("empty"), fresh);
    }

    #[test]
    fn the_volume_grows_with_the_scale() {
        assert_eq!(volume_size(0), 1 << 30);
        assert_eq!(volume_size(10), (1 << 30) + 320 * (1 << 20));
        assert_eq!(volume_size(10) % 4096, 0);
    }
}
