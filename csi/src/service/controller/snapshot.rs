//! The Controller service's snapshot RPCs (CSI spec, CreateSnapshot,
//! DeleteSnapshot, ListSnapshots, GetSnapshot) over the controller's
//! snapshot operations ([`Snapshots`]).
//!
//! # VolumeSnapshotClass parameters
//!
//! - `deadline`: longest the cut may hold the volume's writes, as a
//!   duration (`10s`, `500ms`; default 10 s, at most 10 min). A cut that
//!   does not complete in time fails with `DEADLINE_EXCEEDED` and keeps
//!   nothing; the CO retries.
//! - `ballast.io/freeze`: `"true"` freezes the filesystem of the volume
//!   (FIFREEZE on the node it is staged on) from before the cut until just
//!   after it: the snapshot holds a clean filesystem, not one that needs
//!   journal recovery. Block volumes and volumes not staged are cut
//!   without a freeze, with a note.
//! - `ballast.io/pre-hook`, `ballast.io/post-hook`: a command (`sh -c`) run
//!   on the volume's node before the freeze, and after the thaw; a failing
//!   pre-hook fails the snapshot (`FAILED_PRECONDITION`) before any write
//!   is held, and the post-hook runs anyway. `ballast.io/hook-timeout`
//!   bounds each (default 30 s).
//! - Keys under `csi.storage.k8s.io/` (added by the external-snapshotter)
//!   are ignored; any other key is `INVALID_ARGUMENT`.
//!
//! A snapshot's `creation_time` is the cut (when the target's write
//! barrier closed), and it is `ready_to_use` as soon as it is returned:
//! every copy is durable before CreateSnapshot answers.

use std::collections::HashMap;
use std::time::Duration;

use ballast_proto::csi;

use super::{Controller, Error, i64_bytes, invalid, required};
use crate::controller::snapshot::quiesce::Quiesce;
use crate::controller::snapshot::record::{SnapshotRecord, SnapshotState};
use crate::controller::snapshot::{self, CLONE_PREFIX, CreateRequest, DEFAULT_DEADLINE};

/// VolumeSnapshotClass parameter: the cut's deadline.
pub const DEADLINE_PARAMETER: &str = "deadline";

/// (Group) snapshot class parameter: freeze the filesystems (`"true"`).
pub const FREEZE_PARAMETER: &str = "ballast.io/freeze";

/// (Group) snapshot class parameter: a command run before the freeze.
pub const PRE_HOOK_PARAMETER: &str = "ballast.io/pre-hook";

/// (Group) snapshot class parameter: a command run after the thaw.
pub const POST_HOOK_PARAMETER: &str = "ballast.io/post-hook";

/// (Group) snapshot class parameter: longest a hook may run.
pub const HOOK_TIMEOUT_PARAMETER: &str = "ballast.io/hook-timeout";

/// Prefix of the parameters the external-snapshotter adds.
pub(crate) const SNAPSHOTTER_PREFIX: &str = "csi.storage.k8s.io/";

/// What a (group) snapshot class's parameters ask for (public, with
/// [`class_parameters`], for the fuzz targets in `fuzz/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassParameters {
    /// The cut's deadline.
    pub deadline: Duration,
    /// Hooks and freeze.
    pub quiesce: Quiesce,
}

/// Parses the parameters of a VolumeSnapshotClass or
/// VolumeGroupSnapshotClass (see the module docs).
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a bad value or an unknown key.
pub fn class_parameters(parameters: &HashMap<String, String>) -> Result<ClassParameters, Error> {
    let duration = |key: &str, value: &str| {
        humantime::parse_duration(value)
            .map_err(|e| invalid(format!("parameter {key}={value:?} is not a duration: {e}")))
    };
    let mut parsed = ClassParameters {
        deadline: DEFAULT_DEADLINE,
        quiesce: Quiesce::default(),
    };
    for (key, value) in parameters {
        match key.as_str() {
            DEADLINE_PARAMETER => parsed.deadline = duration(key, value)?,
            FREEZE_PARAMETER => {
                parsed.quiesce.freeze = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(invalid(format!(
                            "parameter {key}={value:?} is not \"true\" or \"false\""
                        )));
                    }
                }
            }
            PRE_HOOK_PARAMETER => parsed.quiesce.pre_hooks = vec![value.clone()],
            POST_HOOK_PARAMETER => parsed.quiesce.post_hooks = vec![value.clone()],
            HOOK_TIMEOUT_PARAMETER => parsed.quiesce.hook_timeout = duration(key, value)?,
            other if other.starts_with(SNAPSHOTTER_PREFIX) => {}
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    parsed
        .quiesce
        .validate()
        .map_err(|e| invalid(e.to_string()))?;
    Ok(parsed)
}

/// A time in nanoseconds since the Unix epoch as a protobuf Timestamp.
pub(crate) fn to_timestamp(nanos: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(nanos / 1_000_000_000).unwrap_or(i64::MAX),
        // Below 10^9, so it fits.
        nanos: i32::try_from(nanos % 1_000_000_000).unwrap_or(0),
    }
}

/// The snapshot as CSI returns it.
pub(crate) fn to_snapshot(record: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: i64_bytes(record.size_bytes),
        snapshot_id: record.snapshot_id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        creation_time: Some(to_timestamp(record.created_at_unix_nanos)),
        ready_to_use: record.state == SnapshotState::Ready,
        group_snapshot_id: record.group_snapshot_id.clone().unwrap_or_default(),
    }
}

/// Snapshots that CSI shows: ready ones, not a clone's internal ones.
fn listed(record: &SnapshotRecord) -> bool {
    record.state == SnapshotState::Ready && record.clone_for.is_none()
}

impl Controller {
    pub(super) async fn create_snapshot_rpc(
        &self,
        req: &csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Error> {
        required("name", &req.name)?;
        required("source_volume_id", &req.source_volume_id)?;
        let parameters = class_parameters(&req.parameters)?;
        let request = CreateRequest {
            deadline: parameters.deadline,
            quiesce: parameters.quiesce,
            ..CreateRequest::new(&req.name, &req.source_volume_id)
        };
        let record = self.snapshots.create(&request).await?;
        Ok(to_snapshot(&record))
    }

    /// CSI spec, DeleteSnapshot: a snapshot that does not exist is deleted
    /// (0 OK). Copies on nodes that are down go when the nodes return.
    pub(super) async fn delete_snapshot_rpc(
        &self,
        req: &csi::DeleteSnapshotRequest,
    ) -> Result<(), Error> {
        required("snapshot_id", &req.snapshot_id)?;
        if req.snapshot_id.starts_with(CLONE_PREFIX) {
            // Not a snapshot CSI handed out: nothing of the CO's to delete.
            return Ok(());
        }
        self.snapshots.delete(&req.snapshot_id).await?;
        Ok(())
    }

    /// Ready snapshots in id order, filtered by `snapshot_id` and
    /// `source_volume_id` (an unknown one lists nothing); tokens work as
    /// ListVolumes' do.
    pub(super) async fn list_snapshots_rpc(
        &self,
        req: &csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Error> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| invalid("max_entries must not be negative"))?;
        let snapshots: Vec<SnapshotRecord> = self
            .snapshots
            .list()
            .await?
            .into_iter()
            .filter(listed)
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
            })
            .collect();
        let start = if req.starting_token.is_empty() {
            0
        } else {
            snapshots
                .iter()
                .position(|s| s.snapshot_id == req.starting_token)
                .ok_or_else(|| Error::InvalidToken(req.starting_token.clone()))?
        };
        let end = if max == 0 {
            snapshots.len()
        } else {
            start.saturating_add(max).min(snapshots.len())
        };
        let entries = snapshots
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|s| csi::list_snapshots_response::Entry {
                snapshot: Some(to_snapshot(s)),
            })
            .collect();
        let next_token = snapshots
            .get(end)
            .map(|s| s.snapshot_id.clone())
            .unwrap_or_default();
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token,
        })
    }

    /// CSI spec, GetSnapshot: `NOT_FOUND` for an unknown snapshot.
    pub(super) async fn get_snapshot_rpc(
        &self,
        req: &csi::GetSnapshotRequest,
    ) -> Result<csi::Snapshot, Error> {
        required("snapshot_id", &req.snapshot_id)?;
        let record = self.snapshots.get(&req.snapshot_id).await?;
        if record.clone_for.is_some() || record.state == SnapshotState::Deleting {
            return Err(snapshot::Error::SnapshotNotFound {
                snapshot: req.snapshot_id.clone(),
            }
            .into());
        }
        Ok(to_snapshot(&record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_parameters_parse_and_unknown_keys_are_refused() {
        let defaults = class_parameters(&HashMap::new()).expect("default");
        assert_eq!(defaults.deadline, DEFAULT_DEADLINE);
        assert!(defaults.quiesce.is_none());
        let given = HashMap::from([
            (DEADLINE_PARAMETER.to_string(), "1500ms".to_string()),
            (FREEZE_PARAMETER.to_string(), "true".to_string()),
            (
                PRE_HOOK_PARAMETER.to_string(),
                "psql -c CHECKPOINT".to_string(),
            ),
            (POST_HOOK_PARAMETER.to_string(), "echo done".to_string()),
            (HOOK_TIMEOUT_PARAMETER.to_string(), "5s".to_string()),
            (
                "csi.storage.k8s.io/volumesnapshot/name".to_string(),
                "s".to_string(),
            ),
        ]);
        let parsed = class_parameters(&given).expect("given");
        assert_eq!(parsed.deadline, Duration::from_millis(1500));
        assert_eq!(
            parsed.quiesce,
            Quiesce {
                freeze: true,
                pre_hooks: vec!["psql -c CHECKPOINT".into()],
                post_hooks: vec!["echo done".into()],
                hook_timeout: Duration::from_secs(5),
            }
        );
        for bad in [
            HashMap::from([(DEADLINE_PARAMETER.to_string(), "soon".to_string())]),
            HashMap::from([("freeze".to_string(), "true".to_string())]),
            HashMap::from([(FREEZE_PARAMETER.to_string(), "yes".to_string())]),
            HashMap::from([(PRE_HOOK_PARAMETER.to_string(), " ".to_string())]),
            HashMap::from([(HOOK_TIMEOUT_PARAMETER.to_string(), "2h".to_string())]),
        ] {
            assert!(
                matches!(class_parameters(&bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn creation_time_is_the_cut() {
        let record = SnapshotRecord {
            snapshot_id: "s".into(),
            source_volume_id: "v".into(),
            size_bytes: 1 << 20,
            state: SnapshotState::Ready,
            nodes: vec!["n1".into()],
            copies: Vec::new(),
            created_at_unix_nanos: 1_700_000_000_123_456_789,
            paused_ms: 3,
            unclean: false,
            clone_for: None,
            group_snapshot_id: None,
            quiesce: None,
        };
        let snapshot = to_snapshot(&record);
        let time = snapshot.creation_time.expect("time");
        assert_eq!((time.seconds, time.nanos), (1_700_000_000, 123_456_789));
        assert!(snapshot.ready_to_use);
        assert_eq!(snapshot.size_bytes, 1 << 20);
    }
}
