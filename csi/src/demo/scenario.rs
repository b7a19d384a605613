//! The demo's story, step by step (see the parent module's docs), and the
//! [`Resources`] it leaves for the clean-up: what is running or published
//! at each moment, recorded before each step that creates it, so the
//! clean-up undoes exactly what exists even when a step failed half-way
//! or the story was interrupted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ballast_proto::controller::Volume;
use ballast_proto::csi;
use nix::sys::signal::Signal;

use super::kubelet::{Attachment, Kubelet};
use super::pgbench::{self, Load, LoadSpec, Outcome};
use super::postgres::{self, Instance};
use super::progress::{Console, bytes};
use super::replicas::{self, Comparison};
use super::report::{Check, LoadFigures, RebuildFigures, ReplicaState, Report, VolumeState};
use super::watch::{self, REBUILD_BOUND, Watch};
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
pub(super) const NODES: usize = 3;
/// Deadline of `pgbench -i`.
pub(super) const INIT_TIMEOUT: Duration = Duration::from_secs(600);
/// How often pgbench is checked while a phase runs.
const POLL: Duration = Duration::from_millis(200);

/// What exists and must be undone; see the module docs.
#[derive(Debug, Default)]
pub(super) struct Resources {
    /// The demo directory, once the cluster start was attempted.
    pub(super) dir: Option<PathBuf>,
    pub(super) kubelet: Option<Kubelet>,
    /// Volumes published on a node (ControllerPublishVolume was called).
    pub(super) attachments: Vec<Attachment>,
    pub(super) server: Option<postgres::Server>,
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
            match blocking("stop the cluster", move || cluster::down(&dir)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => note(err.into()),
                Err(err) => note(err),
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
                "{} is still published on {} and mounted at {}",
                attachment.volume_id,
                attachment.node_id,
                attachment.target_path.display()
            ));
        }
        console.detail(&format!(
            "look:  ballast --cluster {} volume list",
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
    let mut story = Story::start(options, console, res, dir).await?;
    let volume = story.create_volume().await?;
    let first = story
        .publish(
            &volume,
            FIRST_NODE,
            "NodeStageVolume (mkfs.ext4), NodePublishVolume",
        )
        .await?;
    let pg = story.start_postgres(&binaries, &first).await?;
    let fault = story.fault_under_load(&pg).await?;

    story.console.step(&format!(
        "Failover: stop PostgreSQL cleanly; NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume on {FIRST_NODE}"
    ));
    story.stop_postgres().await?;
    story.unpublish(&first).await?;
    let second = story
        .publish(
            &volume,
            SECOND_NODE,
            "NodeStageVolume, NodePublishVolume; PostgreSQL starts there",
        )
        .await?;
    let pg = pg.with_data_dir(&second.target_path.join("pgdata"))?;
    story.res.server.insert(pg.spawn()?).wait_ready().await?;
    story
        .console
        .detail(&format!("PostgreSQL serves {}", pg.data_dir().display()));

    let (mut checks, end) = story.check_data(&pg, &fault).await?;
    story.console.step(&format!(
        "Stop PostgreSQL; NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume on {SECOND_NODE}; compare the replicas byte for byte"
    ));
    story.stop_postgres().await?;
    story.unpublish(&second).await?;
    checks.push(compare_replicas(&story.info, &end).await?);
    if !options.keep {
        story.console.step("DeleteVolume; cluster down");
        story.kubelet.delete_volume(VOLUME).await?;
    }
    Ok(Report {
        volume: volume_state(&end),
        load: fault.load_figures(options),
        rebuild: RebuildFigures {
            node_id: SECOND_NODE.to_string(),
            dropped_after: fault.dropped_after.as_ref().ok().copied(),
            outage: fault.outage,
            in_sync_after: fault.rebuild.in_sync.map(|(after, _)| after),
            rebuilt_bytes: fault.rebuild.total_bytes,
        },
        checks,
    })
}

/// The clients and records the steps share.
struct Story<'a> {
    options: &'a Options,
    console: &'a Console,
    res: &'a mut Resources,
    info: ClusterInfo,
    kubelet: Kubelet,
    watch: Watch,
}

/// What the load through the fault measured.
struct FaultRun {
    /// How long pgbench ran.
    duration: Duration,
    outcome: Outcome,
    killed_at: SystemTime,
    /// From the kill until the controller showed the replica out of sync.
    dropped_after: Result<Duration, Error>,
    /// How long the agent stayed down.
    outage: Duration,
    rebuild: watch::Rebuild,
}

impl<'a> Story<'a> {
    /// Starts the cluster in `dir` and connects the clients.
    async fn start(
        options: &'a Options,
        console: &'a Console,
        res: &'a mut Resources,
        dir: PathBuf,
    ) -> Result<Self, Error> {
        let pool_bytes = (volume_size(options.scale) + (2 << 30)).max(4 << 30);
        let (info, kubelet) = start_cluster(options, console, res, &dir, pool_bytes).await?;
        let watch = Watch::connect(&info, VOLUME).await?;
        Ok(Self {
            options,
            console,
            res,
            info,
            kubelet,
            watch,
        })
    }

    async fn create_volume(&mut self) -> Result<csi::Volume, Error> {
        let bytes_wanted = volume_size(self.options.scale);
        self.console.step(&format!(
            "CreateVolume {VOLUME}: {}, {NODES} replicas, ext4, thin",
            bytes(bytes_wanted)
        ));
        let volume = self
            .kubelet
            .create_volume(VOLUME, bytes_wanted, NODES as u32, "ext4")
            .await?;
        let record = self.watch.volume().await?;
        let holders: Vec<&str> = record.replicas.iter().map(|r| r.node_id.as_str()).collect();
        self.console
            .detail(&format!("replicas on {}", holders.join(", ")));
        Ok(volume)
    }

    /// ControllerPublishVolume on `node_id`, then NodeStageVolume and
    /// NodePublishVolume there for the pod.
    async fn publish(
        &mut self,
        volume: &csi::Volume,
        node_id: &str,
        node_steps: &str,
    ) -> Result<Attachment, Error> {
        self.console.step(&format!(
            "ControllerPublishVolume on {node_id}, {node_steps}"
        ));
        let context = self.kubelet.controller_publish(volume, node_id).await?;
        let attachment = self.kubelet.attachment(VOLUME, node_id, POD);
        self.res.attachments.push(attachment.clone());
        self.kubelet
            .node_publish(volume, &context, &attachment)
            .await?;
        let record = self.watch.volume().await?;
        self.console.detail(&format!(
            "target on {} at epoch {} ({}); mounted at {}",
            record.target_node_id,
            record.epoch,
            record.nbd_uri,
            attachment.target_path.display()
        ));
        Ok(attachment)
    }

    /// NodeUnpublishVolume, NodeUnstageVolume, ControllerUnpublishVolume.
    async fn unpublish(&mut self, attachment: &Attachment) -> Result<(), Error> {
        self.kubelet.node_unpublish(attachment).await?;
        self.kubelet
            .controller_unpublish(VOLUME, &attachment.node_id)
            .await?;
        self.res
            .attachments
            .retain(|a| a.node_id != attachment.node_id);
        Ok(())
    }

    /// initdb on the volume, start, and `pgbench -i`.
    async fn start_postgres(
        &mut self,
        binaries: &postgres::Binaries,
        attachment: &Attachment,
    ) -> Result<Instance, Error> {
        self.console.step(&format!(
            "PostgreSQL {}: initdb on the volume, start (unix socket only; fsync, full_page_writes on)",
            binaries.version()
        ));
        let dir = self.res.dir.clone().unwrap_or_default();
        let pg = Instance::new(
            &attachment.target_path.join("pgdata"),
            &dir.join("postgres"),
            &dir.join("postgres.log"),
        )?;
        pg.init().await?;
        self.res.server.insert(pg.spawn()?).wait_ready().await?;
        self.console.detail(&format!(
            "data directory {}; socket in {}; log {}",
            pg.data_dir().display(),
            pg.socket_dir().display(),
            pg.log().display()
        ));
        self.console
            .step(&format!("pgbench -i -s {}", self.options.scale));
        pgbench::initialize(&pg, self.options.scale, INIT_TIMEOUT).await?;
        Ok(pg)
    }

    async fn stop_postgres(&mut self) -> Result<(), Error> {
        if let Some(server) = self.res.server.take() {
            server.stop().await?;
        }
        Ok(())
    }

    /// The load through the fault: pgbench for three phases; after the
    /// first, SIGKILL of [`SECOND_NODE`]'s agent; after an outage, its
    /// restart and the rebuild; then the end of the load.
    async fn fault_under_load(&mut self, pg: &Instance) -> Result<FaultRun, Error> {
        let phase = self.options.phase.max(Duration::from_secs(2));
        let duration = phase * 3;
        self.console.step(&format!(
            "pgbench: {} clients for {} s (TPC-B-like: each transaction updates 3 tables and adds a pgbench_history row)",
            self.options.clients,
            duration.as_secs()
        ));
        let dir = self.res.dir.clone().unwrap_or_default();
        // Dropped (when a step fails or the demo is interrupted), the load
        // kills pgbench.
        let mut load = Load::start(
            pg,
            &LoadSpec {
                clients: self.options.clients,
                threads: self.options.clients.clamp(1, 2),
                duration,
                log_dir: dir.join("pgbench"),
            },
        )?;
        let printer = print_progress(&mut load, self.console);
        let load_started = Instant::now();
        sleep_while_running(&mut load, phase).await;

        let node = node_info(&self.info, SECOND_NODE)?;
        self.console.step(&format!(
            "SIGKILL the agent of {SECOND_NODE} (pid {}): it holds a replica; the target is on {FIRST_NODE}",
            node.process.pid
        ));
        let killed_at = SystemTime::now();
        let killed = Instant::now();
        kill_agent(&node).await?;
        let dropped_after = self
            .watch
            .wait_dropped(SECOND_NODE)
            .await
            .map(|()| killed.elapsed());
        match &dropped_after {
            Ok(after) => self.console.detail(&format!(
                "the target dropped {SECOND_NODE}'s replica from the in-sync set after {:.2} s; writes go on to the other replicas",
                after.as_secs_f64()
            )),
            Err(err) => self.console.detail(&crate::error_chain(err)),
        }
        let outage = (phase / 3).max(Duration::from_secs(2));
        tokio::time::sleep(outage.saturating_sub(killed.elapsed())).await;

        self.console.step(&format!(
            "Restarting the agent of {SECOND_NODE}; the controller has the target rebuild its replica"
        ));
        let outage = killed.elapsed();
        let restarted = Instant::now();
        let restart_dir = dir.clone();
        blocking("restart the agent", move || {
            cluster::restart_node(&restart_dir, SECOND_NODE)
        })
        .await??;
        let target_node = node_info(&self.info, FIRST_NODE)?;
        let rebuild = self
            .watch
            .wait_rebuild(SECOND_NODE, &target_node, self.console, restarted)
            .await?;
        match rebuild.in_sync {
            Some((after, _)) => self.console.detail(&format!(
                "{SECOND_NODE}'s replica is back in sync {:.2} s after the restart ({} of regions that differed copied)",
                after.as_secs_f64(),
                bytes(rebuild.total_bytes)
            )),
            None => self.console.detail(&format!(
                "{SECOND_NODE}'s replica is not in sync {} s after the restart",
                REBUILD_BOUND.as_secs()
            )),
        }

        let remaining = duration.saturating_sub(load_started.elapsed());
        self.console.note(&format!(
            "waiting for pgbench to finish ({} s left)",
            remaining.as_secs()
        ));
        let outcome = load.finish(remaining + Duration::from_secs(120)).await?;
        let _ = printer.await;
        self.console.detail(&format!(
            "pgbench finished: {} transactions processed, {} failed, exit code {}",
            outcome
                .processed
                .map_or_else(|| "no count of".to_string(), |n| n.to_string()),
            outcome.failed,
            outcome
                .exit_code
                .map_or_else(|| "none (killed)".to_string(), |c| c.to_string())
        ));
        Ok(FaultRun {
            duration,
            outcome,
            killed_at,
            dropped_after,
            outage,
            rebuild,
        })
    }

    /// The checks of the data and the cluster after the failover; returns
    /// them with the volume's state.
    async fn check_data(
        &mut self,
        pg: &Instance,
        fault: &FaultRun,
    ) -> Result<(Vec<Check>, Volume), Error> {
        self.console
            .step("Checking the data: count(*) FROM pgbench_history, pg_amcheck --heapallindexed");
        let history = pg.query("SELECT count(*) FROM pgbench_history").await?;
        let amcheck = pg.amcheck().await?;
        let end = self.watch.volume().await?;
        let outcome = &fault.outcome;
        let in_sync = end.replicas.iter().filter(|r| r.state == "in-sync").count();
        let checks = vec![
            load_check(outcome, "pgbench ran without errors through the fault"),
            Check::new(
                fault.dropped_after.is_ok(),
                format!("{SECOND_NODE}'s replica left the in-sync set after the kill"),
                match &fault.dropped_after {
                    Ok(after) => format!("after {:.2} s", after.as_secs_f64()),
                    Err(err) => err.to_string(),
                },
            ),
            Check::new(
                fault.rebuild.in_sync.is_some(),
                format!(
                    "{SECOND_NODE}'s replica back in sync within {} s of its agent's restart",
                    REBUILD_BOUND.as_secs()
                ),
                fault.rebuild.in_sync.map_or_else(
                    || format!("last seen {}", fault.rebuild.last_state),
                    |(after, _)| format!("in {:.2} s", after.as_secs_f64()),
                ),
            ),
            Check::new(
                outcome.processed.is_some() && history.parse::<u64>().ok() == outcome.processed,
                format!("every committed transaction is there after failover to {SECOND_NODE}"),
                format!(
                    "pgbench_history has {history} rows, pgbench processed {}",
                    outcome
                        .processed
                        .map_or_else(|| "an unknown number of".to_string(), |n| n.to_string())
                ),
            ),
            Check::new(
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
            ),
            Check::new(
                end.status == "healthy" && in_sync == end.replica_count as usize,
                "the volume is healthy at the end",
                format!(
                    "{}: {in_sync} of {} replicas in sync",
                    end.status, end.replica_count
                ),
            ),
        ];
        Ok((checks, end))
    }
}

impl FaultRun {
    /// Throughput before the kill, from the kill until the replica was in
    /// sync again (or the end of the load), and after; stalls.
    fn load_figures(&self, options: &Options) -> LoadFigures {
        let outcome = &self.outcome;
        let log = &outcome.transactions;
        let (first, last) = (log.first(), log.last());
        let in_sync_at = self.rebuild.in_sync.map(|(_, at)| at);
        let fault_end = match (in_sync_at, last) {
            (Some(in_sync), Some(last)) => Some(in_sync.min(last)),
            (None, last) => last,
            (in_sync, None) => in_sync,
        };
        let stall = log.longest_stall();
        LoadFigures {
            scale: options.scale,
            clients: options.clients,
            duration: self.duration,
            processed: outcome.processed,
            failed: outcome.failed,
            tps_before: first.and_then(|first| log.tps_between(first, self.killed_at)),
            tps_during: fault_end.and_then(|end| log.tps_between(self.killed_at, end)),
            tps_after: in_sync_at
                .zip(last)
                .and_then(|(from, last)| log.tps_between(from, last)),
            fault_window: fault_end.and_then(|end| end.duration_since(self.killed_at).ok()),
            longest_stall: stall.map(|s| s.length),
            stall_at: stall.and_then(|s| s.from.duration_since(outcome.started).ok()),
            slowest: log.slowest(),
        }
    }
}

/// Starts a [`NODES`]-node cluster in `dir` with pools of `pool_bytes`
/// and connects a kubelet to its CSI sockets (recorded in `res` for the
/// clean-up).
///
/// # Errors
///
/// The cluster's and the connections' errors.
pub(super) async fn start_cluster(
    options: &Options,
    console: &Console,
    res: &mut Resources,
    dir: &Path,
    pool_bytes: u64,
) -> Result<(ClusterInfo, Kubelet), Error> {
    console.step(&format!(
        "Starting a local cluster in {}: controller (embedded store), {NODES} agents, {NODES} CSI node plugins",
        dir.display()
    ));
    let mut spec = ClusterSpec::new(dir, NODES);
    spec.pool_size_bytes = pool_bytes;
    if let Some(bin_dir) = &options.bin_dir {
        spec.bin_dir = bin_dir.clone();
    }
    let info = cluster::up(&spec).await?;
    console.detail(&format!(
        "{NODES} nodes up; logs in {}/*.log",
        dir.display()
    ));
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
    let kubelet = Kubelet::connect(&dir.join("kubelet"), &csi_endpoint, &endpoints).await?;
    res.kubelet = Some(kubelet.clone());
    Ok((info, kubelet))
}

/// Runs `f` on tokio's blocking pool (process waits, cluster start-up and
/// shut-down, file comparison sleep or read without yielding).
pub(super) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| Error::Task { what, source })
}

/// The demo directory: the one given (new or empty) or a fresh one under
/// /var/tmp; mode 0755, since PostgreSQL (user `postgres`) must enter it.
pub(super) fn prepare_dir(dir: Option<&Path>) -> Result<PathBuf, Error> {
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
pub(super) fn volume_size(scale: u32) -> u64 {
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
    let comparison = blocking("compare the replicas", move || replicas::compare(&files)).await??;
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
pub(super) fn print_progress(load: &mut Load, console: &Console) -> tokio::task::JoinHandle<()> {
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
pub(super) async fn sleep_while_running(load: &mut Load, duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && !load.has_exited() {
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// SIGKILLs an agent and waits (bounded) until it is gone.
async fn kill_agent(node: &NodeInfo) -> Result<(), Error> {
    let process = node.process.clone();
    let node_id = node.node_id.clone();
    let gone = blocking("kill the agent", move || {
        process.signal(Signal::SIGKILL)?;
        Ok::<_, cluster::Error>(process.wait_exit(Duration::from_secs(10)))
    })
    .await??;
    if gone {
        Ok(())
    } else {
        Err(Error::Timeout {
            what: format!("The exit of {node_id}'s agent after SIGKILL"),
            timeout: Duration::from_secs(10),
        })
    }
}

pub(super) fn load_check(outcome: &Outcome, what: &str) -> Check {
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
    Check::new(outcome.clean(), what, detail)
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
