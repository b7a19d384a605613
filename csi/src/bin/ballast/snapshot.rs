//! `ballast snapshot ...`: volume snapshots, through the controller.

use std::time::{Duration, UNIX_EPOCH};

use ballast_proto::controller::{
    CreateGroupSnapshotRequest, CreateSnapshotRequest, DeleteGroupSnapshotRequest,
    DeleteSnapshotRequest, DiffSnapshotsRequest, GetGroupSnapshotRequest, GetSnapshotRequest,
    ListGroupSnapshotsRequest, ListSnapshotsRequest, Snapshot,
    snapshot_service_client::SnapshotServiceClient,
};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Takes a crash-consistent snapshot of a volume: at its target's write
    /// barrier when published (writes wait while the copies are taken),
    /// from its idle replicas when not. Idempotent for the same name and
    /// volume.
    Create {
        /// Snapshot name: letters, digits, '.', '_' and '-' (at most 128).
        name: String,
        /// The volume to snapshot.
        #[arg(long)]
        volume: String,
        /// Longest the cut may hold the volume's writes (e.g. 10s, 500ms).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        deadline: Duration,
        #[command(flatten)]
        quiesce: QuiesceArgs,
    },
    /// Lists snapshots.
    List {
        /// Only this volume's snapshots.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Shows a snapshot with its copies.
    Show {
        /// Snapshot name.
        name: String,
    },
    /// Deletes a snapshot and its copies (volumes restored from it are not
    /// affected).
    Delete {
        /// Snapshot name.
        name: String,
    },
    /// Prints the byte ranges that differ between two snapshots of one
    /// volume (changed block tracking), at the pool filesystem's extent
    /// granularity: every changed byte is in a range.
    Diff {
        /// The older snapshot.
        base: String,
        /// The newer snapshot.
        target: String,
    },
    /// Group snapshots: one instant across several volumes.
    #[command(subcommand)]
    Group(GroupCommand),
}

/// App consistency: hooks and filesystem freeze around the cut.
#[derive(clap::Args)]
pub struct QuiesceArgs {
    /// Freeze the filesystem of each published volume (FIFREEZE on the
    /// node it is staged on) through the cut: the snapshot holds a clean
    /// filesystem.
    #[arg(long)]
    freeze: bool,
    /// A command (sh -c) run on the node of each published volume before
    /// the freeze, with BALLAST_MOUNT_PATH set (repeat for several, run in
    /// order); a failure fails the snapshot before any write is held.
    #[arg(long = "pre-hook", value_name = "CMD")]
    pre_hooks: Vec<String>,
    /// A command run after the thaw (repeat; run in reverse order, also
    /// when the snapshot failed after the pre-hooks started).
    #[arg(long = "post-hook", value_name = "CMD")]
    post_hooks: Vec<String>,
    /// Longest one hook may run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    hook_timeout: Duration,
}

impl QuiesceArgs {
    /// The request fields: (freeze, pre_hooks, post_hooks, hook_timeout_ms).
    fn fields(self) -> anyhow::Result<(bool, Vec<String>, Vec<String>, u32)> {
        let timeout = self.hook_timeout;
        let hook_timeout_ms = u32::try_from(timeout.as_millis())
            .map_err(|_| anyhow::anyhow!("The hook timeout {timeout:?} is too long"))?;
        Ok((
            self.freeze,
            self.pre_hooks,
            self.post_hooks,
            hook_timeout_ms,
        ))
    }
}

/// " (frozen)", or the notes of what quiescing did not do.
fn quiesced(snapshot: &Snapshot) -> String {
    let mut parts = Vec::new();
    if snapshot.frozen {
        parts.push("frozen".to_string());
    }
    if snapshot.hooks_run > 0 {
        parts.push(format!("{} hook(s)", snapshot.hooks_run));
    }
    parts.extend(snapshot.quiesce_notes.iter().cloned());
    parts.join("; ")
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Takes one snapshot of each volume at one instant: every volume's
    /// target is paused before any copy and resumed after all (write-order
    /// consistent across the volumes). Members are named GROUP-VOLUME.
    Create {
        /// Group name: letters, digits, '.', '_' and '-'.
        name: String,
        /// A member volume (repeat for each).
        #[arg(long = "volume", required = true)]
        volumes: Vec<String>,
        /// Longest the cut may hold the volumes' writes (e.g. 10s, 500ms).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        deadline: Duration,
        #[command(flatten)]
        quiesce: QuiesceArgs,
    },
    /// Lists group snapshots.
    List,
    /// Shows a group snapshot with its members and each one's paused window.
    Show {
        /// Group name.
        name: String,
    },
    /// Deletes a group snapshot and its member snapshots.
    Delete {
        /// Group name.
        name: String,
    },
}

pub async fn run(cmd: SnapshotCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = SnapshotServiceClient::new(channel);
    match cmd {
        SnapshotCommand::Create {
            name,
            volume,
            deadline,
            quiesce,
        } => {
            let deadline_ms = u32::try_from(deadline.as_millis())
                .map_err(|_| anyhow::anyhow!("The deadline {deadline:?} is too long"))?;
            let (freeze, pre_hooks, post_hooks, hook_timeout_ms) = quiesce.fields()?;
            let snapshot = client
                .create_snapshot(CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: volume.clone(),
                    deadline_ms,
                    freeze,
                    pre_hooks,
                    post_hooks,
                    hook_timeout_ms,
                })
                .await
                .map_err(|s| status_error(&format!("Snapshotting volume {volume} failed"), s))?
                .into_inner();
            let nodes: Vec<&str> = snapshot.copies.iter().map(|c| c.node_id.as_str()).collect();
            let mut text = format!(
                "Took snapshot {} of volume {} ({}) with copies on {}; writes held {} ms",
                snapshot.snapshot_id,
                snapshot.source_volume_id,
                output::bytes(snapshot.size_bytes),
                nodes.join(", "),
                snapshot.paused_ms
            );
            let quiesced = quiesced(&snapshot);
            if !quiesced.is_empty() {
                text.push_str(&format!(" ({quiesced})"));
            }
            output::print_item(format, &snapshot, &text)
        }
        SnapshotCommand::List { volume } => {
            let snapshots = client
                .list_snapshots(ListSnapshotsRequest {
                    source_volume_id: volume.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error("Listing snapshots failed", s))?
                .into_inner()
                .snapshots;
            output::print_list(
                format,
                &snapshots,
                &["NAME", "VOLUME", "SIZE", "STATE", "CREATED", "COPIES"],
                |s| {
                    vec![
                        s.snapshot_id.clone(),
                        s.source_volume_id.clone(),
                        output::bytes(s.size_bytes),
                        s.state.clone(),
                        created(s),
                        s.copies.len().to_string(),
                    ]
                },
            )
        }
        SnapshotCommand::Show { name } => {
            let snapshot = client
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Showing snapshot {name} failed"), s))?
                .into_inner();
            match format {
                Format::Json => output::print_item(format, &snapshot, ""),
                Format::Table => {
                    print_snapshot(&snapshot);
                    Ok(())
                }
            }
        }
        SnapshotCommand::Delete { name } => {
            client
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Deleting snapshot {name} failed"), s))?;
            println!("Deleted snapshot {name}");
            Ok(())
        }
        SnapshotCommand::Group(cmd) => run_group(cmd, client, format).await,
        SnapshotCommand::Diff { base, target } => {
            let diff = client
                .diff_snapshots(DiffSnapshotsRequest {
                    base_snapshot_id: base.clone(),
                    target_snapshot_id: target.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Comparing {base} and {target} failed"), s))?
                .into_inner();
            match format {
                Format::Json => output::print_item(format, &diff, ""),
                Format::Table => {
                    output::print_list(format, &diff.ranges, &["OFFSET", "LENGTH"], |r| {
                        vec![r.offset.to_string(), r.length.to_string()]
                    })?;
                    println!(
                        "{} changed in {} range(s) of {}",
                        output::bytes(diff.changed_bytes),
                        diff.ranges.len(),
                        output::bytes(diff.size_bytes)
                    );
                    Ok(())
                }
            }
        }
    }
}

async fn run_group(
    cmd: GroupCommand,
    mut client: SnapshotServiceClient<Channel>,
    format: Format,
) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create {
            name,
            volumes,
            deadline,
            quiesce,
        } => {
            let deadline_ms = u32::try_from(deadline.as_millis())
                .map_err(|_| anyhow::anyhow!("The deadline {deadline:?} is too long"))?;
            let (freeze, pre_hooks, post_hooks, hook_timeout_ms) = quiesce.fields()?;
            let group = client
                .create_group_snapshot(CreateGroupSnapshotRequest {
                    name: name.clone(),
                    source_volume_ids: volumes,
                    deadline_ms,
                    freeze,
                    pre_hooks,
                    post_hooks,
                    hook_timeout_ms,
                })
                .await
                .map_err(|s| status_error(&format!("Group snapshot {name} failed"), s))?
                .into_inner();
            let held: Vec<String> = group
                .snapshots
                .iter()
                .map(|s| match quiesced(s) {
                    q if q.is_empty() => format!("{} {} ms", s.source_volume_id, s.paused_ms),
                    q => format!("{} {} ms ({q})", s.source_volume_id, s.paused_ms),
                })
                .collect();
            let text = format!(
                "Took group snapshot {} of {}; writes held: {}",
                group.group_snapshot_id,
                group.source_volume_ids.join(", "),
                held.join(", ")
            );
            output::print_item(format, &group, &text)
        }
        GroupCommand::List => {
            let groups = client
                .list_group_snapshots(ListGroupSnapshotsRequest {})
                .await
                .map_err(|s| status_error("Listing group snapshots failed", s))?
                .into_inner()
                .group_snapshots;
            output::print_list(
                format,
                &groups,
                &["NAME", "VOLUMES", "STATE", "CREATED"],
                |g| {
                    vec![
                        g.group_snapshot_id.clone(),
                        g.source_volume_ids.join(","),
                        g.state.clone(),
                        rfc3339(g.created_at_unix_nanos),
                    ]
                },
            )
        }
        GroupCommand::Show { name } => {
            let group = client
                .get_group_snapshot(GetGroupSnapshotRequest {
                    group_snapshot_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Showing group snapshot {name} failed"), s))?
                .into_inner();
            match format {
                Format::Json => output::print_item(format, &group, ""),
                Format::Table => {
                    println!("Group snapshot: {}", group.group_snapshot_id);
                    println!("State:          {}", group.state);
                    println!("Cut at:         {}", rfc3339(group.created_at_unix_nanos));
                    output::print_list(
                        format,
                        &group.snapshots,
                        &["MEMBER", "VOLUME", "COPIES", "WRITES HELD", "QUIESCED"],
                        |s| {
                            vec![
                                s.snapshot_id.clone(),
                                s.source_volume_id.clone(),
                                s.copies.len().to_string(),
                                format!("{} ms", s.paused_ms),
                                quiesced(s),
                            ]
                        },
                    )
                }
            }
        }
        GroupCommand::Delete { name } => {
            client
                .delete_group_snapshot(DeleteGroupSnapshotRequest {
                    group_snapshot_id: name.clone(),
                })
                .await
                .map_err(|s| status_error(&format!("Deleting group snapshot {name} failed"), s))?;
            println!("Deleted group snapshot {name}");
            Ok(())
        }
    }
}

/// A time in nanoseconds since the Unix epoch in RFC 3339 (UTC), empty
/// for 0.
fn rfc3339(nanos: u64) -> String {
    if nanos == 0 {
        return String::new();
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(nanos)).to_string()
}

/// The cut's time in RFC 3339 (UTC), empty before the cut.
fn created(snapshot: &Snapshot) -> String {
    rfc3339(snapshot.created_at_unix_nanos)
}

fn print_snapshot(snapshot: &Snapshot) {
    println!("Snapshot:     {}", snapshot.snapshot_id);
    println!("Volume:       {}", snapshot.source_volume_id);
    println!(
        "Size:         {} ({} bytes)",
        output::bytes(snapshot.size_bytes),
        snapshot.size_bytes
    );
    println!(
        "State:        {}{}",
        snapshot.state,
        if snapshot.ready_to_use {
            " (ready to use)"
        } else {
            ""
        }
    );
    println!("Cut at:       {}", created(snapshot));
    println!("Writes held:  {} ms", snapshot.paused_ms);
    let quiesced = quiesced(snapshot);
    if !quiesced.is_empty() {
        println!("Quiesced:     {quiesced}");
    }
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(vec!["  NODE", "POOL", "ALLOCATED"]);
    for copy in &snapshot.copies {
        table.add_row(vec![
            format!("  {}", copy.node_id),
            copy.pool.clone(),
            output::bytes(copy.allocated_bytes),
        ]);
    }
    println!("Copies:\n{table}");
}
