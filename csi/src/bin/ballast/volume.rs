//! `ballast volume ...`: replicated volumes, through the controller.

use ballast_proto::controller::{
    CreateVolumeRequest, DeleteVolumeRequest, GetVolumeRequest, ListVolumesRequest,
    PublishVolumeRequest, Replica, UnpublishVolumeRequest, Volume,
    volume_service_client::VolumeServiceClient,
};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;
use ballast_storage_node::parse_bytes;

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Creates a volume with replicas on distinct nodes (idempotent for the
    /// same name, size, replica count, type and source), empty or restored
    /// from a snapshot or cloned from a volume.
    Create {
        /// Volume name: letters, digits, '.', '_' and '-' (at most 128).
        name: String,
        /// Size with an optional suffix (1GiB, 512MiB); a multiple of 4096.
        /// With --from-snapshot or --from-volume it defaults to the
        /// source's size, and a larger size grows the new volume.
        #[arg(long, value_parser = parse_bytes, required_unless_present_any = ["from_snapshot", "from_volume"])]
        size: Option<u64>,
        /// Number of replicas, each on its own node.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Thin provisioning: replicas are sparse files.
        #[arg(long)]
        thin: bool,
        /// A node that must hold one of the replicas.
        #[arg(long)]
        node: Option<String>,
        /// Restore this snapshot into the new volume.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Clone this volume (at one instant) into the new volume.
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// Lists volumes.
    List,
    /// Shows a volume with its replicas, rebuild progress, and for a replica
    /// whose node is down how long it has been down and when it is replaced.
    Show {
        /// Volume name.
        name: String,
    },
    /// Deletes a volume and its replicas.
    Delete {
        /// Volume name.
        name: String,
    },
    /// Publishes a volume on a node (starts its target); prints the NBD URI.
    Publish {
        /// Volume name.
        name: String,
        /// Node to serve it from.
        #[arg(long)]
        node: String,
        /// Move it from the node it is published on (the old target is
        /// fenced).
        #[arg(long)]
        force: bool,
    },
    /// Unpublishes a volume (stops its target).
    Unpublish {
        /// Volume name.
        name: String,
    },
}

pub async fn run(cmd: VolumeCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = VolumeServiceClient::new(channel);
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            replicas,
            thin,
            node,
            from_snapshot,
            from_volume,
        } => {
            let volume = client
                .create_volume(CreateVolumeRequest {
                    name: name.clone(),
                    size_bytes: size.unwrap_or(0),
                    replica_count: replicas,
                    thin,
                    preferred_node_id: node.unwrap_or_default(),
                    source_snapshot_id: from_snapshot.unwrap_or_default(),
                    source_volume_id: from_volume.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&format!("Creating volume {name} failed"), s))?
                .into_inner();
            let nodes: Vec<&str> = volume.replicas.iter().map(|r| r.node_id.as_str()).collect();
            let source = match (&*volume.source_snapshot_id, &*volume.source_volume_id) {
                (_, volume) if !volume.is_empty() => format!(", cloned from volume {volume}"),
                (snapshot, _) if !snapshot.is_empty() => {
                    format!(", restored from snapshot {snapshot}")
                }
                _ => String::new(),
            };
            let text = format!(
                "Created volume {} ({}, {}{source}) with replicas on {}",
                volume.volume_id,
                output::bytes(volume.size_bytes),
                kind(&volume),
                nodes.join(", ")
            );
            output::print_item(format, &volume, &text)
        }
        VolumeCommand::List => {
            let volumes = client
                .list_volumes(ListVolumesRequest {})
                .await
                .map_err(|s| status_error("Listing volumes failed", s))?
                .into_inner()
                .volumes;
            output::print_list(
                format,
                &volumes,
                &[
                    "NAME",
                    "SIZE",
                    "TYPE",
                    "REPLICAS",
                    "STATUS",
                    "EPOCH",
                    "PUBLISHED ON",
                ],
                |v| {
                    vec![
                        v.volume_id.clone(),
                        output::bytes(v.size_bytes),
                        kind(v).to_string(),
                        format!("{}/{}", in_sync(v), v.replica_count),
                        v.status.clone(),
                        v.epoch.to_string(),
                        v.target_node_id.clone(),
                    ]
                },
            )
        }
        VolumeCommand::Show { name } => {
            let volume = client
                .get_volume(GetVolumeRequest {
                    volume_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Showing volume {name} failed"), s))?
                .into_inner();
            match format {
                Format::Json => output::print_item(format, &volume, ""),
                Format::Table => {
                    print_volume(&volume);
                    Ok(())
                }
            }
        }
        VolumeCommand::Delete { name } => {
            client
                .delete_volume(DeleteVolumeRequest {
                    volume_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Deleting volume {name} failed"), s))?;
            println!("Deleted volume {name}");
            Ok(())
        }
        VolumeCommand::Publish { name, node, force } => {
            let published = client
                .publish_volume(PublishVolumeRequest {
                    volume_id: name.clone(),
                    node_id: node.clone(),
                    force,
                })
                .await
                .map_err(|s| {
                    status_error(&format!("Publishing volume {name} on {node} failed"), s)
                })?
                .into_inner();
            output::print_item(format, &published, &published.nbd_uri)
        }
        VolumeCommand::Unpublish { name } => {
            client
                .unpublish_volume(UnpublishVolumeRequest {
                    volume_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Unpublishing volume {name} failed"), s))?;
            println!("Unpublished volume {name}");
            Ok(())
        }
    }
}

fn kind(volume: &Volume) -> &'static str {
    if volume.thin { "thin" } else { "thick" }
}

fn in_sync(volume: &Volume) -> usize {
    volume
        .replicas
        .iter()
        .filter(|r| r.state == "in-sync")
        .count()
}

fn print_volume(volume: &Volume) {
    println!("Volume:       {}", volume.volume_id);
    println!(
        "Size:         {} ({} bytes, {})",
        output::bytes(volume.size_bytes),
        volume.size_bytes,
        kind(volume)
    );
    println!("Status:       {}", volume.status);
    if !volume.status_detail.is_empty() {
        println!("Detail:       {}", volume.status_detail);
    }
    if !volume.source_volume_id.is_empty() {
        println!("Cloned from:  volume {}", volume.source_volume_id);
    } else if !volume.source_snapshot_id.is_empty() {
        println!("Restored from: snapshot {}", volume.source_snapshot_id);
    }
    println!("Epoch:        {}", volume.epoch);
    if volume.target_node_id.is_empty() {
        println!("Published:    no");
    } else {
        println!("Published on: {}", volume.target_node_id);
        println!("NBD URI:      {}", volume.nbd_uri);
    }
    println!(
        "Replicas:     {} in sync of {}",
        in_sync(volume),
        volume.replica_count
    );
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(vec!["  NODE", "STATE", "DETAIL"]);
    let now = now_unix_ms();
    for replica in &volume.replicas {
        table.add_row(vec![
            format!("  {}", replica.node_id),
            replica.state.clone(),
            replica_detail(replica, now),
        ]);
    }
    println!("{table}");
}

/// Rebuild progress, or for a replica whose node is down how long it has
/// been down and when it is replaced.
fn replica_detail(replica: &Replica, now_unix_ms: i64) -> String {
    match replica.state.as_str() {
        "rebuilding" => ballast_csi::demo::progress::bar(
            replica.rebuild_done_bytes,
            replica.rebuild_total_bytes,
        ),
        "node-down" => {
            let down = format!(
                "node down for {}",
                elapsed(replica.node_down_since_unix_ms, now_unix_ms)
            );
            let at = replica.replace_at_unix_ms;
            if at == 0 {
                format!("{down}; dropped by the target on its next failed write")
            } else if at > now_unix_ms {
                format!("{down}; replaced in {}", elapsed(now_unix_ms, at))
            } else {
                format!("{down}; being replaced")
            }
        }
        _ => String::new(),
    }
}

/// "5m 3s", "42s": the time from `from` to `to` (Unix ms).
fn elapsed(from: i64, to: i64) -> String {
    let secs = to.saturating_sub(from).max(0) / 1000;
    if secs >= 60 {
        format!("{}m {}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn replica(state: &str, down_since: i64, replace_at: i64) -> Replica {
        Replica {
            node_id: "node-3".into(),
            state: state.into(),
            node_down_since_unix_ms: down_since,
            replace_at_unix_ms: replace_at,
            ..Default::default()
        }
    }

    #[test]
    fn a_replica_whose_node_is_down_says_for_how_long_and_when_it_is_replaced() {
        let down = replica("node-down", NOW - 75_000, NOW + 525_000);
        assert_eq!(
            replica_detail(&down, NOW),
            "node down for 1m 15s; replaced in 8m 45s"
        );
        let due = replica("node-down", NOW - 700_000, NOW - 100_000);
        assert_eq!(
            replica_detail(&due, NOW),
            "node down for 11m 40s; being replaced"
        );
        let in_sync = replica("node-down", NOW - 5_000, 0);
        assert_eq!(
            replica_detail(&in_sync, NOW),
            "node down for 5s; dropped by the target on its next failed write"
        );
        assert_eq!(replica_detail(&replica("faulted", 0, 0), NOW), "");
    }
}
