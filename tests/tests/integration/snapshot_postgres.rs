//! PostgreSQL restored from a snapshot taken under pgbench: the restored
//! database recovers from its WAL, passes `pg_amcheck`, and holds every
//! transaction committed before the cut and none committed after it.
//!
//! PostgreSQL runs as the `postgres` user, so the test directory is made
//! enterable by others (mode 0755).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ballast_csi::demo::postgres::Instance;
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{channel, mount_cap};
use crate::harness::postgres::{committing_load, history, kubelet};

const SOURCE: &str = "pvc-pg-source";
const RESTORED: &str = "pvc-pg-restored";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restored_from_a_snapshot_under_pgbench_holds_the_cut() -> Result<()> {
    let cluster = Cluster::up("snap-postgres", 3, "embedded", &[])?;
    let mut kubelet = kubelet(&cluster).await?;
    let mut ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);

    let volume = kubelet.create_volume(SOURCE, 512 << 20, 3, "ext4").await?;
    let context = kubelet.controller_publish(&volume, "node-1").await?;
    let first = kubelet.attachment(SOURCE, "node-1", "postgres-0");
    kubelet.node_publish(&volume, &context, &first).await?;
    let pg = Instance::new(
        &first.target_path.join("pgdata"),
        &cluster.dir.join("pg"),
        &cluster.dir.join("postgres.log"),
    )?;
    pg.init().await?;
    let server = pg.start().await?;
    let load = committing_load(&pg, &cluster, Duration::from_secs(12)).await?;

    // The cut, between two counts of committed transactions.
    let before = history(&pg).await?;
    let snapshot = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: SOURCE.into(),
            name: "snap-pg".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    let after = history(&pg).await?;
    ensure!(snapshot.ready_to_use, "{snapshot:?}");
    let outcome = load.finish(Duration::from_secs(120)).await?;
    ensure!(outcome.clean(), "pgbench saw errors: {:?}", outcome.errors);
    let total = history(&pg).await?;
    ensure!(
        total > after,
        "pgbench went on after the cut: {total} vs {after}"
    );
    server.stop().await?;

    // Restore to a new volume on another node; PostgreSQL recovers there.
    let restored = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: RESTORED.into(),
            volume_capabilities: vec![mount_cap("ext4")],
            parameters: [("replicas".to_string(), "2".to_string())].into(),
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource {
                        snapshot_id: snapshot.snapshot_id.clone(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let context = kubelet.controller_publish(&restored, "node-3").await?;
    let second = kubelet.attachment(RESTORED, "node-3", "postgres-restored");
    kubelet.node_publish(&restored, &context, &second).await?;
    let restored_pg = pg.with_data_dir(&second.target_path.join("pgdata"))?;
    let server = restored_pg.start().await?;
    let rows = history(&restored_pg).await?;
    let amcheck = restored_pg.amcheck().await?;
    server.stop().await?;
    kubelet.node_unpublish(&second).await?;
    kubelet.node_unpublish(&first).await?;
    ensure!(
        !amcheck.corrupt && amcheck.relations > 0,
        "pg_amcheck: {}",
        amcheck.report
    );
    ensure!(
        (before..=after).contains(&rows),
        "the restored database holds {rows} transactions; committed before the cut {before}, after it {after}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_with_its_wal_on_another_node_restores_from_a_group_snapshot() -> Result<()> {
    use ballast_proto::csi::group_controller_client::GroupControllerClient;

    const DATA: &str = "pvc-pg-data";
    const WAL: &str = "pvc-pg-wal";
    let cluster = Cluster::up("group-postgres", 3, "embedded", &[])?;
    let mut kubelet = kubelet(&cluster).await?;
    let channel = channel(&cluster.path.join("csi.sock")).await?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut groups = GroupControllerClient::new(channel);

    // Data on node-1, WAL on node-2: two targets on two nodes.
    let mut attachments = Vec::new();
    for (name, bytes, node) in [(DATA, 512 << 20, "node-1"), (WAL, 320 << 20, "node-2")] {
        let volume = kubelet.create_volume(name, bytes, 2, "ext4").await?;
        let context = kubelet.controller_publish(&volume, node).await?;
        let attachment = kubelet.attachment(name, node, "postgres-0");
        kubelet.node_publish(&volume, &context, &attachment).await?;
        attachments.push(attachment);
    }
    let pg = Instance::new(
        &attachments[0].target_path.join("pgdata"),
        &cluster.dir.join("pg"),
        &cluster.dir.join("postgres.log"),
    )?;
    pg.init_with_wal(Some(&attachments[1].target_path.join("pgwal")))
        .await?;
    let server = pg.start().await?;
    let load = committing_load(&pg, &cluster, Duration::from_secs(10)).await?;

    let before = history(&pg).await?;
    let group = groups
        .create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
            name: "grp-pg".into(),
            source_volume_ids: vec![DATA.into(), WAL.into()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .group_snapshot
        .context("no group")?;
    let after = history(&pg).await?;
    ensure!(group.ready_to_use, "{group:?}");
    let outcome = load.finish(Duration::from_secs(120)).await?;
    ensure!(outcome.clean(), "pgbench saw errors: {:?}", outcome.errors);
    server.stop().await?;

    // Both members restored on node-3; PostgreSQL recovers from the pair.
    let mut restored = Vec::new();
    for source in [DATA, WAL] {
        let member = group
            .snapshots
            .iter()
            .find(|s| s.source_volume_id == source)
            .context("member")?;
        let name = format!("{source}-restored");
        let volume = ctl
            .create_volume(csi::CreateVolumeRequest {
                name: name.clone(),
                volume_capabilities: vec![mount_cap("ext4")],
                parameters: [("replicas".to_string(), "1".to_string())].into(),
                volume_content_source: Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource {
                            snapshot_id: member.snapshot_id.clone(),
                        },
                    )),
                }),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        let context = kubelet.controller_publish(&volume, "node-3").await?;
        let attachment = kubelet.attachment(&name, "node-3", "postgres-restored");
        kubelet.node_publish(&volume, &context, &attachment).await?;
        restored.push(attachment);
    }
    // pg_wal points at the WAL volume's old mount; the pair is mounted
    // elsewhere now (a pod on another node would mount it at the same
    // path, and need nothing of this).
    let data_dir = restored[0].target_path.join("pgdata");
    std::fs::remove_file(data_dir.join("pg_wal"))?;
    std::os::unix::fs::symlink(
        restored[1].target_path.join("pgwal"),
        data_dir.join("pg_wal"),
    )?;
    let restored_pg = pg.with_data_dir(&data_dir)?;
    let server = restored_pg.start().await?;
    let rows = history(&restored_pg).await?;
    let amcheck = restored_pg.amcheck().await?;
    server.stop().await?;
    for attachment in restored.iter().chain(&attachments) {
        kubelet.node_unpublish(attachment).await?;
    }
    ensure!(
        !amcheck.corrupt && amcheck.relations > 0,
        "pg_amcheck: {}",
        amcheck.report
    );
    ensure!(
        (before..=after).contains(&rows),
        "the restored pair holds {rows} transactions; committed before the cut {before}, after it {after}"
    );
    Ok(())
}
