//! Snapshot copies on a real agent over gRPC, written and read by qemu-io
//! through raw NBD exports: a copy keeps the bytes of its instant, a
//! restore starts with them (and a grown tail of zeros), and the changed
//! ranges between two copies name what was overwritten in between.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use ballast_proto::agent::export_service_client::ExportServiceClient;
use ballast_proto::agent::replica_service_client::ReplicaServiceClient;
use ballast_proto::agent::snapshot_service_client::SnapshotServiceClient;
use ballast_proto::agent::{
    ByteRange, CreateReplicaRequest, CreateSnapshotCopyRequest, DestroyReplicaRequest,
    GetAllocatedRangesRequest, GetChangedRangesRequest, ListReplicasRequest,
    ListSnapshotCopiesRequest, StartExportRequest, StopExportRequest,
};
use tonic::transport::Channel;

use crate::harness::{Agent, GIB, MIB, TestDir, run};

const T: Duration = Duration::from_secs(120);

/// Runs qemu-io commands against `uri`; returns stdout, failing if qemu-io
/// failed or reported a failed pattern check.
fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = run(&mut cmd, T)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

struct Clients {
    replicas: ReplicaServiceClient<Channel>,
    exports: ExportServiceClient<Channel>,
    snapshots: SnapshotServiceClient<Channel>,
}

impl Clients {
    async fn connect(agent: &Agent) -> Result<Self> {
        let channel = Channel::from_shared(format!("http://{}", agent.grpc))?
            .connect()
            .await?;
        Ok(Self {
            replicas: ReplicaServiceClient::new(channel.clone()),
            exports: ExportServiceClient::new(channel.clone()),
            snapshots: SnapshotServiceClient::new(channel),
        })
    }

    /// Exports `name` on `socket`, runs `f` with the NBD URI, and stops the
    /// export again (a copy is taken of an idle replica).
    async fn with_export<T>(
        &mut self,
        name: &str,
        socket: &Path,
        f: impl FnOnce(&str) -> Result<T>,
    ) -> Result<T> {
        let export = self
            .exports
            .start_export(StartExportRequest {
                name: name.into(),
                socket_path: socket.display().to_string(),
                tcp_address: String::new(),
            })
            .await?
            .into_inner();
        let result = f(&export.uri);
        self.exports
            .stop_export(StopExportRequest { name: name.into() })
            .await?;
        result
    }
}

#[test]
fn copies_keep_their_instant_and_restores_start_from_it() -> Result<()> {
    let dir = TestDir::new("snapshots");
    let agent = Agent::start(&dir, GIB)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut c = Clients::connect(&agent).await?;
        let sock = dir.join("nbd.sock");
        c.replicas
            .create_replica(CreateReplicaRequest {
                name: "orig".into(),
                size_bytes: 64 * MIB,
                thin: true,
                ..Default::default()
            })
            .await?;

        // Pattern A over the first 4 MiB and at 40 MiB.
        c.with_export("orig", &sock, |uri| {
            qemu_io(uri, &["write -P 0xaa 0 4M", "write -P 0xaa 40M 64k"])
        })
        .await?;
        let copy_a = c
            .snapshots
            .create_snapshot_copy(CreateSnapshotCopyRequest {
                snapshot_id: "snap-a".into(),
                replica_name: "orig".into(),
            })
            .await?
            .into_inner();
        ensure!(copy_a.size_bytes == 64 * MIB, "{copy_a:?}");
        ensure!(copy_a.replica_name == "orig" && copy_a.volume_id.is_empty());
        ensure!(copy_a.allocated_bytes >= 4 * MIB + 64 * 1024, "{copy_a:?}");
        ensure!(
            copy_a.path.ends_with("/snapshots/snap-a.data"),
            "{copy_a:?}"
        );

        // The same request again is the same copy; the id for another
        // replica is ALREADY_EXISTS.
        let again = c
            .snapshots
            .create_snapshot_copy(CreateSnapshotCopyRequest {
                snapshot_id: "snap-a".into(),
                replica_name: "orig".into(),
            })
            .await?
            .into_inner();
        ensure!(again.created_at_unix_nanos == copy_a.created_at_unix_nanos);
        let conflict = c
            .snapshots
            .create_snapshot_copy(CreateSnapshotCopyRequest {
                snapshot_id: "snap-a".into(),
                replica_name: "other".into(),
            })
            .await
            .expect_err("same id, other replica");
        ensure!(
            conflict.code() == tonic::Code::AlreadyExists,
            "{conflict:?}"
        );
        let unknown = c
            .snapshots
            .create_snapshot_copy(CreateSnapshotCopyRequest {
                snapshot_id: "snap-x".into(),
                replica_name: "nope".into(),
            })
            .await
            .expect_err("unknown replica");
        ensure!(unknown.code() == tonic::Code::NotFound, "{unknown:?}");

        let allocated = c
            .snapshots
            .get_allocated_ranges(GetAllocatedRangesRequest {
                snapshot_id: "snap-a".into(),
                starting_offset: 0,
                max_results: 0,
            })
            .await?
            .into_inner();
        ensure!(
            allocated.ranges
                == vec![
                    ByteRange {
                        offset: 0,
                        length: 4 * MIB
                    },
                    ByteRange {
                        offset: 40 * MIB,
                        length: 64 * 1024
                    }
                ],
            "{allocated:?}"
        );
        ensure!(allocated.next_offset == 64 * MIB && allocated.size_bytes == 64 * MIB);

        // Pattern B over 1 MiB inside A, then a second copy.
        c.with_export("orig", &sock, |uri| qemu_io(uri, &["write -P 0xbb 1M 1M"]))
            .await?;
        c.snapshots
            .create_snapshot_copy(CreateSnapshotCopyRequest {
                snapshot_id: "snap-b".into(),
                replica_name: "orig".into(),
            })
            .await?;

        // Restore snap-a into a larger replica.
        let restored = c
            .replicas
            .create_replica(CreateReplicaRequest {
                name: "restored".into(),
                size_bytes: 96 * MIB,
                thin: true,
                source_snapshot: "snap-a".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(restored.source_snapshot == "snap-a", "{restored:?}");
        ensure!(restored.size_bytes == 96 * MIB && restored.pool == copy_a.pool);
        let listed = c
            .replicas
            .list_replicas(ListReplicasRequest {})
            .await?
            .into_inner()
            .replicas;
        ensure!(
            listed
                .iter()
                .any(|r| r.name == "restored" && r.source_snapshot == "snap-a"),
            "{listed:?}"
        );
        let missing = c
            .replicas
            .create_replica(CreateReplicaRequest {
                name: "from-nothing".into(),
                size_bytes: 96 * MIB,
                thin: true,
                source_snapshot: "snap-none".into(),
                ..Default::default()
            })
            .await
            .expect_err("no such copy");
        ensure!(missing.code() == tonic::Code::NotFound, "{missing:?}");
        let smaller = c
            .replicas
            .create_replica(CreateReplicaRequest {
                name: "smaller".into(),
                size_bytes: 32 * MIB,
                thin: true,
                source_snapshot: "snap-a".into(),
                ..Default::default()
            })
            .await
            .expect_err("smaller than the copy");
        ensure!(
            smaller.code() == tonic::Code::InvalidArgument,
            "{smaller:?}"
        );

        c.with_export("restored", &sock, |uri| {
            qemu_io(
                uri,
                &[
                    "read -P 0xaa 0 4M",
                    "read -P 0 4M 36M",
                    "read -P 0xaa 40M 64k",
                    // The grown tail reads zeros.
                    "read -P 0 64M 32M",
                ],
            )
        })
        .await?;
        c.with_export("orig", &sock, |uri| {
            qemu_io(
                uri,
                &[
                    "read -P 0xaa 0 1M",
                    "read -P 0xbb 1M 1M",
                    "read -P 0xaa 2M 2M",
                ],
            )
        })
        .await?;

        // What B overwrote, and nothing else, changed between the copies.
        let changed = c
            .snapshots
            .get_changed_ranges(GetChangedRangesRequest {
                base_snapshot_id: "snap-a".into(),
                target_snapshot_id: "snap-b".into(),
                starting_offset: 0,
                max_results: 0,
            })
            .await?
            .into_inner();
        ensure!(
            changed.ranges
                == vec![ByteRange {
                    offset: MIB,
                    length: MIB
                }],
            "{changed:?}"
        );
        ensure!(changed.next_offset == 64 * MIB && changed.size_bytes == 64 * MIB);

        // The copies outlive their replica, across a restart.
        c.replicas
            .destroy_replica(DestroyReplicaRequest {
                name: "orig".into(),
            })
            .await?;
        anyhow::Ok(())
    })?;

    let mut agent = agent;
    agent.restart()?;
    runtime.block_on(async {
        let mut c = Clients::connect(&agent).await?;
        let copies = c
            .snapshots
            .list_snapshot_copies(ListSnapshotCopiesRequest {})
            .await?
            .into_inner()
            .copies;
        let ids: Vec<&str> = copies.iter().map(|c| c.snapshot_id.as_str()).collect();
        ensure!(ids == ["snap-a", "snap-b"], "{copies:?}");
        let again = c
            .replicas
            .create_replica(CreateReplicaRequest {
                name: "again".into(),
                size_bytes: 64 * MIB,
                thin: true,
                source_snapshot: "snap-b".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(again.source_snapshot == "snap-b");
        c.with_export("again", &dir.join("again.sock"), |uri| {
            qemu_io(
                uri,
                &[
                    "read -P 0xaa 0 1M",
                    "read -P 0xbb 1M 1M",
                    "read -P 0 4M 36M",
                ],
            )
        })
        .await?;
        anyhow::Ok(())
    })
}
