//! The CSI SnapshotMetadata service (CSI spec v1.10+, "SnapshotMetadata
//! Service RPC"; Kubernetes KEP 3314, changed block tracking), served by
//! the controller: GetMetadataAllocated and GetMetadataDelta over the
//! controller's snapshot operations ([`Snapshots`]).
//!
//! Both stream `VARIABLE_LENGTH` tuples, strictly ascending and not
//! overlapping, in messages of at most `max_results` tuples (0: the
//! plugin's choice, 1024), each message carrying the same
//! `volume_capacity_bytes`. A stream resumed at `starting_offset` begins
//! with the range that holds it, clipped to start there. Errors (KEP 3314,
//! "GetMetadataAllocated Errors", "GetMetadataDelta Errors"): a missing
//! snapshot id or a negative offset or count `INVALID_ARGUMENT`, snapshots
//! of different volumes `INVALID_ARGUMENT`, an unknown snapshot
//! `NOT_FOUND`, `starting_offset` at or past the volume's size
//! `OUT_OF_RANGE`. An error after the first message ends the stream with
//! that status.
//!
//! Delta granularity: see [`crate::controller::snapshot::metadata`].

use std::pin::Pin;
use std::sync::Arc;

use ballast_proto::csi;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::controller::snapshot::Snapshots;
use crate::controller::snapshot::metadata::RangesPage;

/// Messages buffered ahead of a slow client.
const STREAM_BUFFER: usize = 4;

/// The SnapshotMetadata service.
#[derive(Debug, Clone)]
pub struct SnapshotMetadata {
    snapshots: Arc<Snapshots>,
}

impl SnapshotMetadata {
    /// The service over the controller's snapshot operations.
    pub fn new(snapshots: Arc<Snapshots>) -> Self {
        Self { snapshots }
    }
}

/// A stream of responses the service sends.
type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn offset_and_count(offset: i64, count: i32) -> Result<(u64, u32), Status> {
    let offset = u64::try_from(offset)
        .map_err(|_| Status::invalid_argument("starting_offset must not be negative"))?;
    let count = u32::try_from(count)
        .map_err(|_| Status::invalid_argument("max_results must not be negative"))?;
    Ok((offset, count))
}

fn blocks(page: &RangesPage) -> Vec<csi::BlockMetadata> {
    page.ranges
        .iter()
        .map(|&(offset, length)| csi::BlockMetadata {
            byte_offset: i64::try_from(offset).unwrap_or(i64::MAX),
            size_bytes: i64::try_from(length).unwrap_or(i64::MAX),
        })
        .collect()
}

/// Streams pages: the first is fetched before answering, so its errors
/// are the RPC's status; the rest follow through a bounded channel.
async fn stream_pages<T, F, Fut>(
    first_offset: u64,
    fetch: F,
    wrap: fn(&RangesPage) -> T,
) -> Result<Responses<T>, Status>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<RangesPage, Status>> + Send,
{
    let first = fetch(first_offset).await?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut page = first;
        let mut offset = first_offset;
        loop {
            if tx.send(Ok(wrap(&page))).await.is_err() {
                return; // The client went away.
            }
            // Each page moves on, or the agent broke its contract.
            if page.is_last() || page.next_offset <= offset {
                return;
            }
            offset = page.next_offset;
            page = match fetch(offset).await {
                Ok(page) => page,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

#[tonic::async_trait]
impl csi::snapshot_metadata_server::SnapshotMetadata for SnapshotMetadata {
    type GetMetadataAllocatedStream = Responses<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Responses<csi::GetMetadataDeltaResponse>;

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn get_metadata_allocated(
        &self,
        request: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let req = request.into_inner();
        if req.snapshot_id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        let (offset, count) = offset_and_count(req.starting_offset, req.max_results)?;
        let snapshots = Arc::clone(&self.snapshots);
        let id = req.snapshot_id;
        let fetch = move |offset| {
            let snapshots = Arc::clone(&snapshots);
            let id = id.clone();
            async move {
                snapshots
                    .allocated_ranges(&id, offset, count)
                    .await
                    .map_err(Status::from)
            }
        };
        let stream = stream_pages(offset, fetch, |page| csi::GetMetadataAllocatedResponse {
            block_metadata_type: csi::BlockMetadataType::VariableLength.into(),
            volume_capacity_bytes: i64::try_from(page.size_bytes).unwrap_or(i64::MAX),
            block_metadata: blocks(page),
        })
        .await?;
        Ok(Response::new(stream))
    }

    #[instrument(err, skip_all, fields(base = %request.get_ref().base_snapshot_id, target = %request.get_ref().target_snapshot_id))]
    async fn get_metadata_delta(
        &self,
        request: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let req = request.into_inner();
        if req.base_snapshot_id.is_empty() || req.target_snapshot_id.is_empty() {
            return Err(Status::invalid_argument(
                "base_snapshot_id and target_snapshot_id are required",
            ));
        }
        let (offset, count) = offset_and_count(req.starting_offset, req.max_results)?;
        let snapshots = Arc::clone(&self.snapshots);
        let (base, target) = (req.base_snapshot_id, req.target_snapshot_id);
        let fetch = move |offset| {
            let snapshots = Arc::clone(&snapshots);
            let (base, target) = (base.clone(), target.clone());
            async move {
                snapshots
                    .changed_ranges(&base, &target, offset, count)
                    .await
                    .map_err(Status::from)
            }
        };
        let stream = stream_pages(offset, fetch, |page| csi::GetMetadataDeltaResponse {
            block_metadata_type: csi::BlockMetadataType::VariableLength.into(),
            volume_capacity_bytes: i64::try_from(page.size_bytes).unwrap_or(i64::MAX),
            block_metadata: blocks(page),
        })
        .await?;
        Ok(Response::new(stream))
    }
}
