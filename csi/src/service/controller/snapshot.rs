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
use crate::controller::snapshot::record::{SnapshotRecord, SnapshotState};
use crate::controller::snapshot::{self, CLONE_PREFIX, CreateRequest, DEFAULT_DEADLINE};

/// VolumeSnapshotClass parameter: the cut's deadline.
pub const DEADLINE_PARAMETER: &str = "deadline";

/// Prefix of the parameters the external-snapshotter adds.
const SNAPSHOTTER_PREFIX: &str = "csi.storage.k8s.io/";

/// The `deadline` parameter of a (group) snapshot class.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a bad duration or an unknown key.
pub(crate) fn deadline(parameters: &HashMap<String, String>) -> Result<Duration, Error> {
    let mut deadline = DEFAULT_DEADLINE;
    for (key, value) in parameters {
        match key.as_str() {
            DEADLINE_PARAMETER => {
                deadline = humantime::parse_duration(value).map_err(|e| {
                    invalid(format!(
                        "parameter {DEADLINE_PARAMETER}={value:?} is not a duration: {e}"
                    ))
                })?;
            }
            other if other.starts_with(SNAPSHOTTER_PREFIX) => {}
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    Ok(deadline)
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
        let request = CreateRequest {
            deadline: deadline(&req.parameters)?,
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
    fn the_deadline_parameter_is_a_duration_and_unknown_keys_are_refused() {
        assert_eq!(
            deadline(&HashMap::new()).expect("default"),
            DEFAULT_DEADLINE
        );
        let given = HashMap::from([
            (DEADLINE_PARAMETER.to_string(), "1500ms".to_string()),
            (
                "csi.storage.k8s.io/volumesnapshot/name".to_string(),
                "s".to_string(),
            ),
        ]);
        assert_eq!(
            deadline(&given).expect("given"),
            Duration::from_millis(1500)
        );
        for bad in [
            HashMap::from([(DEADLINE_PARAMETER.to_string(), "soon".to_string())]),
            HashMap::from([("freeze".to_string(), "true".to_string())]),
        ] {
            assert!(matches!(deadline(&bad), Err(Error::InvalidArgument(_))));
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
        };
        let snapshot = to_snapshot(&record);
        let time = snapshot.creation_time.expect("time");
        assert_eq!((time.seconds, time.nanos), (1_700_000_000, 123_456_789));
        assert!(snapshot.ready_to_use);
        assert_eq!(snapshot.size_bytes, 1 << 20);
    }
}
