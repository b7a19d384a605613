//! `ballast demo snapshot`: an app-consistent group snapshot of a
//! PostgreSQL whose data and WAL are on two volumes served from two nodes,
//! taken under pgbench, restored on a third node.
//!
//! 1. A local 3-node cluster; `pvc-pg-data` published on node-1 and
//!    `pvc-pg-wal` on node-2 (3 replicas each, ext4), staged and published
//!    through the CSI sockets; PostgreSQL with `pg_wal` on the second;
//!    `pgbench -i`; a table for the post-hook.
//! 2. pgbench runs; halfway, CreateVolumeGroupSnapshot of both volumes
//!    with the class parameters `ballast.io/freeze: "true"`, a pre-hook
//!    that runs `CHECKPOINT` and a post-hook that records the snapshot in
//!    the database (so it must not be in the snapshot).
//! 3. Both members restored (CreateVolume from each member snapshot) on
//!    node-3; a second PostgreSQL starts on the pair and recovers.
//! 4. The report: each member's paused window and freeze, the longest
//!    pgbench stall around the cut, the restore and recovery times, and
//!    the checks: pgbench saw no error, both members were frozen, the
//!    restored database holds every transaction committed before the cut
//!    and none committed after it, `pg_amcheck` finds nothing, and the
//!    post-hook's row is live but not in the restored copy.
//!
//! With `--crash-consistent` the group snapshot is taken without freeze
//! and hooks, to compare (`tests/bench/snapshots.py --parts freeze`).

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use ballast_proto::controller::snapshot_service_client::SnapshotServiceClient;
use ballast_proto::controller::{GetGroupSnapshotRequest, Snapshot};

use super::kubelet::Attachment;
use super::pgbench::{self, Load, LoadSpec};
use super::postgres::{self, Instance};
use super::progress::Console;
use super::report::{Check, all_passed, write_checks};
use super::scenario::{
    INIT_TIMEOUT, Resources, blocking, load_check, prepare_dir, print_progress,
    sleep_while_running, start_cluster, volume_size,
};
use super::{Error, Options};

/// The data volume and where it is published.
const DATA: (&str, &str) = ("pvc-pg-data", "node-1");
/// The WAL volume and where it is published.
const WAL: (&str, &str) = ("pvc-pg-wal", "node-2");
/// Where the snapshot is restored.
const RESTORE_NODE: &str = "node-3";
/// Replicas of each volume.
const REPLICAS: u32 = 3;
/// The group snapshot.
const GROUP: &str = "grp-pg-demo";
/// Bytes of the WAL volume (`max_wal_size` is 256 MB).
const WAL_BYTES: u64 = 768 << 20;

/// What one member's snapshot shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFigures {
    /// The volume.
    pub volume_id: String,
    /// Where its target ran.
    pub node_id: String,
    /// How long its writes were held.
    pub paused_ms: u64,
    /// Its filesystem was frozen through the cut.
    pub frozen: bool,
    /// Hooks run for it.
    pub hooks_run: u32,
}

/// The closing report of `ballast demo snapshot`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotReport {
    /// The members.
    pub members: Vec<MemberFigures>,
    /// From the CreateVolumeGroupSnapshot call to its answer (hooks,
    /// freeze, cut, thaw).
    pub group_call: Duration,
    /// pgbench's throughput over the whole run.
    pub tps: Option<f64>,
    /// The longest time without a completed transaction around the cut.
    pub stall_at_cut: Option<Duration>,
    /// The longest such time in the whole run.
    pub longest_stall: Option<Duration>,
    /// CreateVolume of both restored volumes.
    pub restore: Duration,
    /// From starting PostgreSQL on the restored pair until it accepted
    /// connections (crash recovery from the WAL included).
    pub recovery: Duration,
    /// Every check, in the order made.
    pub checks: Vec<Check>,
}

impl SnapshotReport {
    /// True if there is at least one check and every check passed.
    pub fn passed(&self) -> bool {
        all_passed(&self.checks)
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

impl fmt::Display for SnapshotReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "REPORT")?;
        writeln!(
            f,
            "  group snapshot {GROUP}: CreateVolumeGroupSnapshot answered in {}",
            ms(self.group_call)
        )?;
        for m in &self.members {
            writeln!(
                f,
                "    {} (target on {}): writes held: {} ms, {}, {} hook(s) run",
                m.volume_id,
                m.node_id,
                m.paused_ms,
                if m.frozen { "frozen" } else { "not frozen" },
                m.hooks_run
            )?;
        }
        let or_na = |d: Option<Duration>| d.map_or_else(|| "n/a".to_string(), ms);
        writeln!(
            f,
            "  pgbench: {} tps; stall at the cut: {} (longest in the run: {})",
            self.tps
                .map_or_else(|| "n/a".to_string(), |t| format!("{t:.1}")),
            or_na(self.stall_at_cut),
            or_na(self.longest_stall)
        )?;
        writeln!(
            f,
            "  restore on {RESTORE_NODE}: volumes created in {}; PostgreSQL recovered in {}",
            ms(self.restore),
            ms(self.recovery)
        )?;
        write_checks(f, &self.checks)
    }
}

/// Runs the story; see the module docs.
pub(super) async fn run(
    options: &Options,
    console: &Console,
    res: &mut Resources,
) -> Result<SnapshotReport, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    let binaries = postgres::Binaries::find()?;
    let dir = prepare_dir(options.dir.as_deref())?;
    res.dir = Some(dir.clone());
    let data_bytes = volume_size(options.scale);
    let pool_bytes = 2 * (data_bytes + WAL_BYTES) + (2 << 30);
    let (info, mut kubelet) = start_cluster(options, console, res, &dir, pool_bytes).await?;

    let mut sources = Vec::new();
    for ((volume_id, node_id), bytes) in [(DATA, data_bytes), (WAL, WAL_BYTES)] {
        console.step(&format!(
            "CreateVolume {volume_id} ({REPLICAS} replicas, ext4); ControllerPublishVolume on {node_id}, NodeStageVolume, NodePublishVolume"
        ));
        let volume = kubelet
            .create_volume(volume_id, bytes, REPLICAS, "ext4")
            .await?;
        let context = kubelet.controller_publish(&volume, node_id).await?;
        let attachment = kubelet.attachment(volume_id, node_id, "postgres-0");
        res.attachments.push(attachment.clone());
        kubelet.node_publish(&volume, &context, &attachment).await?;
        sources.push(attachment);
    }

    console.step(&format!(
        "PostgreSQL {}: data on {}, pg_wal on {}; pgbench -i -s {}",
        binaries.version(),
        DATA.0,
        WAL.0,
        options.scale
    ));
    let pg = Instance::new(
        &sources[0].target_path.join("pgdata"),
        &dir.join("postgres"),
        &dir.join("postgres.log"),
    )?;
    pg.init_with_wal(Some(&sources[1].target_path.join("pgwal")))
        .await?;
    res.server.insert(pg.spawn()?).wait_ready().await?;
    pgbench::initialize(&pg, options.scale, INIT_TIMEOUT).await?;
    pg.query("CREATE TABLE ballast_snapshots (id text PRIMARY KEY, at timestamptz DEFAULT now())")
        .await?;

    let phase = options.phase.max(Duration::from_secs(2));
    console.step(&format!(
        "pgbench: {} clients for {} s",
        options.clients,
        (phase * 2).as_secs()
    ));
    let mut load = Load::start(
        &pg,
        &LoadSpec {
            clients: options.clients,
            threads: options.clients.clamp(1, 2),
            duration: phase * 2,
            log_dir: dir.join("pgbench"),
        },
    )?;
    let printer = print_progress(&mut load, console);
    sleep_while_running(&mut load, phase).await;

    let pre_hook = hook_sql(&pg, "CHECKPOINT");
    let post_hook = hook_sql(
        &pg,
        "INSERT INTO ballast_snapshots (id) VALUES ('$BALLAST_SNAPSHOT_ID') ON CONFLICT DO NOTHING",
    );
    let parameters: Vec<(&str, &str)> = if options.crash_consistent {
        Vec::new()
    } else {
        vec![
            ("ballast.io/freeze", "true"),
            ("ballast.io/pre-hook", &pre_hook),
            ("ballast.io/post-hook", &post_hook),
            ("ballast.io/hook-timeout", "60s"),
        ]
    };
    console.step(&format!(
        "CreateVolumeGroupSnapshot {GROUP} of {} and {}: {}",
        DATA.0,
        WAL.0,
        if options.crash_consistent {
            "crash-consistent (no freeze, no hooks)"
        } else {
            "ballast.io/freeze, pre-hook CHECKPOINT, post-hook records the snapshot in the database"
        }
    ));
    let before = history(&pg).await?;
    let cut_started = SystemTime::now();
    let called = Instant::now();
    let group = kubelet
        .create_group_snapshot(GROUP, &[DATA.0, WAL.0], &parameters)
        .await?;
    let group_call = called.elapsed();
    let cut_ended = SystemTime::now();
    let after = history(&pg).await?;
    let members = member_figures(&info, &group).await?;
    for m in &members {
        console.detail(&format!(
            "{}: writes held {} ms, {}",
            m.volume_id,
            m.paused_ms,
            if m.frozen { "frozen" } else { "not frozen" }
        ));
    }

    let remaining = (phase * 2).saturating_sub(phase + group_call);
    let outcome = load.finish(remaining + Duration::from_secs(120)).await?;
    let _ = printer.await;
    let log = pgbench::TransactionLog::read(&dir.join("pgbench"))?;
    let recorded_live = pg
        .query(&format!(
            "SELECT count(*) FROM ballast_snapshots WHERE id = '{GROUP}'"
        ))
        .await?;
    if let Some(server) = res.server.take() {
        server.stop().await?;
    }

    console.step(&format!(
        "CreateVolume from each member snapshot; publish both on {RESTORE_NODE}; PostgreSQL recovers there"
    ));
    let restore_started = Instant::now();
    let mut restored = Vec::new();
    for ((volume_id, _), bytes) in [(DATA, data_bytes), (WAL, WAL_BYTES)] {
        let member = group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == volume_id)
            .ok_or_else(|| Error::Unexpected(format!("the group has no member of {volume_id}")))?;
        let name = format!("{volume_id}-restored");
        let volume = kubelet
            .create_volume_from(&name, bytes, 1, "ext4", Some(&member.snapshot_id))
            .await?;
        restored.push(volume);
    }
    let restore = restore_started.elapsed();
    let mut attachments: Vec<Attachment> = Vec::new();
    for volume in &restored {
        let context = kubelet.controller_publish(volume, RESTORE_NODE).await?;
        let attachment = kubelet.attachment(&volume.volume_id, RESTORE_NODE, "postgres-restored");
        res.attachments.push(attachment.clone());
        kubelet.node_publish(volume, &context, &attachment).await?;
        attachments.push(attachment);
    }
    // pg_wal links to the WAL volume's mount in the first pod; the pair is
    // mounted at other paths here (a pod on another node would mount them
    // at the same paths and need nothing of this).
    let data_dir = attachments[0].target_path.join("pgdata");
    let wal_dir = attachments[1].target_path.join("pgwal");
    let link = data_dir.join("pg_wal");
    blocking("relink pg_wal", move || -> std::io::Result<()> {
        std::fs::remove_file(&link)?;
        std::os::unix::fs::symlink(&wal_dir, &link)
    })
    .await?
    .map_err(|source| Error::Io {
        op: "relink pg_wal in",
        path: data_dir.clone(),
        source,
    })?;
    let restored_pg = pg.with_data_dir(&data_dir)?;
    let started = Instant::now();
    res.server.insert(restored_pg.spawn()?).wait_ready().await?;
    let recovery = started.elapsed();
    let rows = history(&restored_pg).await?;
    let amcheck = restored_pg.amcheck().await?;
    let recorded_restored = restored_pg
        .query("SELECT count(*) FROM ballast_snapshots")
        .await?;
    if let Some(server) = res.server.take() {
        server.stop().await?;
    }

    let frozen = members.iter().filter(|m| m.frozen).count();
    let mut checks = vec![load_check(
        &outcome,
        "pgbench ran without errors through the snapshot",
    )];
    if options.crash_consistent {
        checks.push(Check::new(
            group.ready_to_use && frozen == 0,
            "both members were cut at one instant, crash-consistent",
            format!("{} members, {frozen} frozen", members.len()),
        ));
    } else {
        checks.push(Check::new(
            group.ready_to_use && frozen == members.len(),
            "both members were cut at one instant with their filesystems frozen",
            format!("{frozen} of {} frozen", members.len()),
        ));
    }
    checks.push(Check::new(
        (before..=after).contains(&rows),
        "the restored pair holds every transaction committed before the cut and none after it",
        format!("{rows} transactions; {before} committed before the cut, {after} after it"),
    ));
    checks.push(Check::new(
        !amcheck.corrupt && amcheck.relations > 0,
        "pg_amcheck --heapallindexed finds no corruption in the restored database",
        format!("{} relations checked", amcheck.relations),
    ));
    if !options.crash_consistent {
        checks.push(Check::new(
            recorded_live == "1" && recorded_restored == "0",
            "the post-hook ran after the cut: its row is live, not in the snapshot",
            format!("live {recorded_live}, restored {recorded_restored}"),
        ));
    }
    Ok(SnapshotReport {
        members,
        group_call,
        tps: log.tps_between(
            log.first().unwrap_or(cut_started),
            log.last().unwrap_or(cut_ended),
        ),
        stall_at_cut: log
            .longest_stall_around(cut_started, cut_ended)
            .map(|s| s.length),
        longest_stall: log.longest_stall().map(|s| s.length),
        restore,
        recovery,
        checks,
    })
}

/// A hook command that runs `sql` as PostgreSQL's superuser over the
/// instance's socket (the hook itself runs as root on the member's node).
fn hook_sql(pg: &Instance, sql: &str) -> String {
    format!(
        "runuser -u postgres -- {} -h {} -U postgres -d postgres -v ON_ERROR_STOP=1 -Atc \"{sql}\"",
        pg.binaries().path("psql").display(),
        pg.socket_dir().display()
    )
}

/// Transactions pgbench has committed.
async fn history(pg: &Instance) -> Result<u64, Error> {
    let count = pg.query("SELECT count(*) FROM pgbench_history").await?;
    count
        .parse()
        .map_err(|_| Error::Unexpected(format!("count(*) of pgbench_history printed {count:?}")))
}

/// Each member's paused window and freeze, from the management API.
async fn member_figures(
    info: &crate::cluster::ClusterInfo,
    group: &ballast_proto::csi::VolumeGroupSnapshot,
) -> Result<Vec<MemberFigures>, Error> {
    let address = info.controller_address().unwrap_or_default().to_string();
    let channel = tonic::transport::Endpoint::from_shared(address.clone())
        .map(|e| e.connect_lazy())
        .map_err(|source| Error::ControllerUnreachable { address, source })?;
    let shown = SnapshotServiceClient::new(channel)
        .get_group_snapshot(GetGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
        })
        .await
        .map_err(|status| Error::Controller {
            call: "GetGroupSnapshot",
            status,
        })?
        .into_inner();
    Ok(shown
        .snapshots
        .iter()
        .map(|s: &Snapshot| MemberFigures {
            volume_id: s.source_volume_id.clone(),
            node_id: [DATA, WAL]
                .iter()
                .find(|(v, _)| *v == s.source_volume_id)
                .map(|(_, n)| n.to_string())
                .unwrap_or_default(),
            paused_ms: s.paused_ms,
            frozen: s.frozen,
            hooks_run: s.hooks_run,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_shows_each_member_and_the_checks() {
        let report = SnapshotReport {
            members: vec![MemberFigures {
                volume_id: "pvc-pg-data".into(),
                node_id: "node-1".into(),
                paused_ms: 12,
                frozen: true,
                hooks_run: 2,
            }],
            group_call: Duration::from_millis(850),
            tps: Some(120.5),
            stall_at_cut: Some(Duration::from_millis(300)),
            longest_stall: None,
            restore: Duration::from_millis(40),
            recovery: Duration::from_millis(1200),
            checks: vec![Check::new(true, "a check", "held")],
        };
        let text = report.to_string();
        assert!(
            text.contains(
                "pvc-pg-data (target on node-1): writes held: 12 ms, frozen, 2 hook(s) run"
            ),
            "{text}"
        );
        assert!(
            text.contains("stall at the cut: 300 ms (longest in the run: n/a)"),
            "{text}"
        );
        assert!(text.contains("PostgreSQL recovered in 1200 ms"), "{text}");
        assert!(
            text.ends_with("RESULT: PASS (1 of 1 checks passed)"),
            "{text}"
        );
    }
}
