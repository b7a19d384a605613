//! Rebuild: bringing a faulted or new replica into the in-sync set while
//! I/O continues (DESIGN.md, invariant 4).
//!
//! # Sequence
//!
//! 1. [`super::Target::add_replica`] turns the member `Rebuilding` (from
//!    then on every write goes to it too) and starts [`run`].
//! 2. A barrier on the region locks waits for every write that chose its
//!    replicas before that, so each later write reaches the replica, and
//!    every earlier one is on the source before anything is compared.
//! 3. The regions to copy (a [`RegionMap`], 1 MiB regions) are:
//!    - [`RebuildKind::DirtyLog`] (a returning replica the target dropped
//!      after it had claimed it): the dirty-region log kept since the drop;
//!    - [`RebuildKind::Hashes`] (a returning replica without a valid log):
//!      regions whose `region_hashes` differ between an in-sync source and
//!      the replica, over the whole volume;
//!    - [`RebuildKind::Full`] (a new replica): regions allocated on the
//!      source or on the replica (`allocated_extents`). A new replica is
//!      sparse, so it reads as zeroes and holds nothing the source lacks;
//!      only a replica that an earlier, aborted attempt wrote to has
//!      extents of its own, and those alone are trimmed.
//! 4. Each copy covers up to [`COPY_CHUNK_BYTES`] of consecutive regions
//!    to copy, [`COPIES_IN_FLIGHT`] at once. A copy takes the regions'
//!    *exclusive* locks (application writes to them wait), lists the
//!    source's and the replica's allocated extents in the chunk, copies the
//!    source's extents and trims what only the replica has, clears the
//!    regions from the map, then releases the locks. So a copy never
//!    overwrites a newer write, only allocated bytes move, and a copy that
//!    fails or is cancelled (another chunk failed first) leaves its regions
//!    in the log for the next attempt.
//! 5. When no region is left, the replica is flushed, turns `Joining`, and
//!    the controller is asked (`ReplicaInSync`, retried until it answers);
//!    only after its commit does the member become `InSync`.
//!
//! # When a dirty-region log may be trusted
//!
//! A log records what *this* target wrote without the replica. It is only
//! complete if nobody else wrote to the replica since the drop, and an
//! older target can: until a replica has accepted this target's epoch, a
//! paused or partitioned older target (epoch lower than ours) may still
//! write to it, e.g. to its own local replica, in regions this target
//! never writes. So a log is valid only for a replica that had persisted
//! this target's epoch before the log started: it answered the target's
//! claim (INFO at the target's epoch) at start, or a rebuild's scan under
//! this epoch completed (`claimed` in the member's state). A replica that
//! did not answer the claim is dropped without a log, and its rebuild
//! compares hashes over the whole volume; the scan's first request raises
//! the replica to this epoch, which waits for every request of an older
//! epoch still executing there, so the hashes see every stale write. The
//! replica's epoch is not asked for when the rebuild starts: the
//! rebuild's own writes (or an earlier aborted attempt) may already have
//! raised it, hiding stale writes that landed before. A restarted target
//! has no log at all and compares hashes too, for the same reason.
//!
//! A failed write or copy to the replica aborts the rebuild (back to
//! `Faulted`, with the regions still to copy kept as its log); a failed
//! source is dropped like any failed in-sync replica. Every request of a
//! rebuild carries the target's epoch. Progress (bytes of regions done and
//! to do) is reported to the controller every [`REPORT_INTERVAL`] and shown
//! by GetTarget.
//!
//! # What it must never do
//!
//! Let a replica join before every region is copied and every write issued
//! during the rebuild reached it; let a copy and a write to the same region
//! overlap; read from anything but an in-sync replica.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tracing::{info, warn};

use super::member::{Member, SyncState};
use super::regions::{REGION_BYTES, RegionMap};
use super::{Core, region_span_bytes};
use crate::replication::{self, Extent, ReplicaIo};

/// Most bytes one copy covers: 4 regions (4 MiB).
pub const COPY_CHUNK_BYTES: u64 = 4 * REGION_BYTES;

/// Copies in flight at once per rebuild.
pub const COPIES_IN_FLIGHT: usize = 8;

/// How often progress is reported to the controller.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes hashed per `region_hashes` call (bounds memory for big volumes).
const HASH_WINDOW_BYTES: u64 = 16 << 30;

/// Passes over the regions left before giving up (a pass leaves regions
/// only when writes failed on the replica, which aborts anyway).
const MAX_PASSES: usize = 8;

/// How a rebuild finds the regions to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildKind {
    /// The target's dirty-region log since it dropped the replica.
    DirtyLog,
    /// Regions whose content hashes differ.
    Hashes,
    /// Regions allocated on the source or the replica (a new replica).
    Full,
}

/// Why a rebuild stopped.
struct Abort {
    reason: String,
    /// The replica's content is unknown (its log is discarded).
    unknown: bool,
}

impl Abort {
    fn new(reason: impl Into<String>) -> Self {
        Abort {
            reason: reason.into(),
            unknown: false,
        }
    }
}

/// Which replica a rebuild request went to.
enum Side {
    Source,
    Replica,
}

/// Rebuilds `member` (generation `generation` of its rebuilds) with
/// `pending` holding the regions known to differ; see the module docs.
pub(crate) async fn run(
    core: Arc<Core>,
    member: Arc<Member>,
    generation: u64,
    kind: RebuildKind,
    pending: Arc<RegionMap>,
) {
    match rebuild(&core, &member, generation, kind, &pending).await {
        Ok(()) => {
            core.join(&member).await;
        }
        Err(abort) => core.abort_rebuild(&member, Some(generation), abort.unknown, &abort.reason),
    }
}

async fn rebuild(
    core: &Arc<Core>,
    member: &Arc<Member>,
    generation: u64,
    kind: RebuildKind,
    pending: &Arc<RegionMap>,
) -> Result<(), Abort> {
    core.locks.barrier().await;
    let source = core
        .members()
        .into_iter()
        .filter(|m| !Arc::ptr_eq(m, member) && m.sync() == SyncState::InSync)
        .min_by_key(|m| (!m.is_healthy(), !m.is_local()))
        .ok_or_else(|| Abort::new("No in-sync replica to copy from"))?;
    let source_io = source.io();
    let replica_io = member.io();
    match kind {
        RebuildKind::DirtyLog => {}
        RebuildKind::Hashes => {
            mark_differing(core, &source, &*source_io, &*replica_io, pending).await?;
        }
        RebuildKind::Full => {
            mark_allocated(core, &source, &*source_io, &*replica_io, pending).await?;
        }
    }
    {
        // The map now holds every region that differs: from here on it is
        // a complete log, even if the rebuild is aborted.
        let mut state = member.lock();
        if state.sync != SyncState::Rebuilding || state.rebuild != generation {
            return Err(Abort::new("Rebuild superseded"));
        }
        state.scanning = false;
        // The scan's requests were admitted under this target's epoch (a
        // dirty-log rebuild needs `claimed` already): no older target can
        // write to the replica any more.
        state.claimed = true;
    }
    let total: u64 = pending
        .marked()
        .into_iter()
        .map(|r| region_span_bytes(r, 1, core.size_bytes))
        .sum();
    member.progress.total.store(total, Ordering::Relaxed);
    info!(
        volume.id = %core.volume_id,
        node.id = %member.node_id,
        source = %source.node_id,
        epoch = core.epoch,
        ?kind,
        total_bytes = total,
        "Copying regions"
    );

    let copying = copy_passes(
        core,
        member,
        generation,
        &source,
        &source_io,
        &replica_io,
        pending,
    );
    tokio::pin!(copying);
    let mut ticker = tokio::time::interval(REPORT_INTERVAL);
    let copied = loop {
        tokio::select! {
            result = &mut copying => break result,
            _ = ticker.tick() => report(core, member),
        }
    };
    copied?;
    report(core, member);

    replica_io
        .flush(core.epoch)
        .await
        .map_err(|e| replica_error(core, Side::Replica, &source, e))?;
    let mut state = member.lock();
    if state.sync != SyncState::Rebuilding || state.rebuild != generation || pending.count() != 0 {
        return Err(Abort::new("Rebuild superseded"));
    }
    state.sync = SyncState::Joining;
    drop(state);
    info!(
        volume.id = %core.volume_id,
        node.id = %member.node_id,
        epoch = core.epoch,
        copied_bytes = member.progress.copied.load(Ordering::Relaxed),
        "Every region copied; asking the controller to mark the replica in sync"
    );
    Ok(())
}

/// Sends the member's progress to the controller in the background.
fn report(core: &Arc<Core>, member: &Member) {
    let controller = core.controller.clone();
    let volume_id = core.volume_id.clone();
    let node_id = member.node_id.clone();
    let epoch = core.epoch;
    let done = member.progress.done.load(Ordering::Relaxed);
    let total = member.progress.total.load(Ordering::Relaxed);
    core.spawn(async move {
        controller
            .report_rebuild(&volume_id, epoch, &node_id, done, total)
            .await;
    });
}

/// Turns a rebuild request's error into an abort, fencing the target on a
/// stale epoch and dropping a failed source.
fn replica_error(
    core: &Arc<Core>,
    side: Side,
    source: &Arc<Member>,
    error: replication::Error,
) -> Abort {
    let message = crate::error_chain(&error);
    if let replication::Error::StaleEpoch { .. } = error {
        core.fence(&message);
        return Abort::new(format!("Stale epoch: {message}"));
    }
    match side {
        Side::Source => {
            if error.replica_failed() {
                let _ = core.fail_member(
                    source,
                    None,
                    false,
                    &format!("rebuild read failed: {message}"),
                );
            }
            Abort::new(format!("The source failed: {message}"))
        }
        Side::Replica => Abort::new(format!("The replica failed: {message}")),
    }
}

/// Marks regions whose hashes differ between source and replica.
async fn mark_differing(
    core: &Arc<Core>,
    source: &Arc<Member>,
    source_io: &dyn ReplicaIo,
    replica_io: &dyn ReplicaIo,
    pending: &RegionMap,
) -> Result<(), Abort> {
    let mut offset = 0;
    while offset < core.size_bytes {
        let length = HASH_WINDOW_BYTES.min(core.size_bytes - offset);
        let (theirs, ours) = futures_util::future::join(
            source_io.region_hashes(core.epoch, offset, length, REGION_BYTES),
            replica_io.region_hashes(core.epoch, offset, length, REGION_BYTES),
        )
        .await;
        let theirs = theirs.map_err(|e| replica_error(core, Side::Source, source, e))?;
        let ours = ours.map_err(|e| replica_error(core, Side::Replica, source, e))?;
        for region in super::regions::regions_of(offset, length) {
            let index = (region - offset / REGION_BYTES) as usize;
            let same = matches!(
                (theirs.get(index), ours.get(index)),
                (Some(a), Some(b)) if a.offset == b.offset && a.length == b.length && a.hash == b.hash
            );
            if !same {
                pending.mark_region(region);
            }
        }
        offset += length;
    }
    Ok(())
}

/// Marks regions allocated on the source or on the replica.
async fn mark_allocated(
    core: &Arc<Core>,
    source: &Arc<Member>,
    source_io: &dyn ReplicaIo,
    replica_io: &dyn ReplicaIo,
    pending: &RegionMap,
) -> Result<(), Abort> {
    let (theirs, ours) = futures_util::future::join(
        source_io.allocated_extents(core.epoch, 0, core.size_bytes),
        replica_io.allocated_extents(core.epoch, 0, core.size_bytes),
    )
    .await;
    let theirs = theirs.map_err(|e| replica_error(core, Side::Source, source, e))?;
    let ours = ours.map_err(|e| replica_error(core, Side::Replica, source, e))?;
    for extent in theirs.iter().chain(&ours) {
        pending.mark(extent.offset, extent.length);
    }
    Ok(())
}

/// Groups regions into chunks: runs of consecutive regions within one
/// [`COPY_CHUNK_BYTES`]-aligned window, as (first region, count).
fn chunks(regions: &[u64]) -> Vec<(u64, u64)> {
    let per_chunk = COPY_CHUNK_BYTES / REGION_BYTES;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &region in regions {
        match out.last_mut() {
            Some((first, count))
                if *first + *count == region && *first / per_chunk == region / per_chunk =>
            {
                *count += 1;
            }
            _ => out.push((region, 1)),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
async fn copy_passes(
    core: &Arc<Core>,
    member: &Arc<Member>,
    generation: u64,
    source: &Arc<Member>,
    source_io: &Arc<dyn ReplicaIo>,
    replica_io: &Arc<dyn ReplicaIo>,
    pending: &Arc<RegionMap>,
) -> Result<(), Abort> {
    for _ in 0..MAX_PASSES {
        let regions = pending.marked();
        if regions.is_empty() {
            return Ok(());
        }
        let mut copies = futures_util::stream::iter(chunks(&regions))
            .map(|(first, count)| {
                copy_chunk(
                    core, member, generation, source, source_io, replica_io, pending, first, count,
                )
            })
            .buffer_unordered(COPIES_IN_FLIGHT);
        while let Some(result) = copies.next().await {
            result?;
        }
    }
    if pending.count() == 0 {
        Ok(())
    } else {
        Err(Abort::new("Regions kept changing under the rebuild"))
    }
}

/// Copies regions `first..first + count` (one chunk); see the module docs.
#[allow(clippy::too_many_arguments)]
async fn copy_chunk(
    core: &Arc<Core>,
    member: &Arc<Member>,
    generation: u64,
    source: &Arc<Member>,
    source_io: &Arc<dyn ReplicaIo>,
    replica_io: &Arc<dyn ReplicaIo>,
    pending: &RegionMap,
    first: u64,
    count: u64,
) -> Result<(), Abort> {
    let _locked = core.locks.exclusive(first..first + count).await;
    {
        let state = member.lock();
        if state.sync != SyncState::Rebuilding || state.rebuild != generation || core.is_stopped() {
            return Err(Abort::new("Rebuild superseded"));
        }
    }
    let start = first * REGION_BYTES;
    let length = region_span_bytes(first, count, core.size_bytes);
    let epoch = core.epoch;
    let copy = async {
        let (theirs, ours) = futures_util::future::join(
            source_io.allocated_extents(epoch, start, length),
            replica_io.allocated_extents(epoch, start, length),
        )
        .await;
        let theirs = theirs.map_err(|e| (Side::Source, e))?;
        let ours = ours.map_err(|e| (Side::Replica, e))?;
        for extent in &theirs {
            let data = source_io
                .read(epoch, extent.offset, extent.length as usize)
                .await
                .map_err(|e| (Side::Source, e))?;
            replica_io
                .write(epoch, extent.offset, Arc::new(data), false)
                .await
                .map_err(|e| (Side::Replica, e))?;
            member
                .progress
                .copied
                .fetch_add(extent.length, Ordering::Relaxed);
        }
        for extra in subtract(&ours, &theirs) {
            replica_io
                .trim(epoch, extra.offset, extra.length)
                .await
                .map_err(|e| (Side::Replica, e))?;
        }
        Ok::<(), (Side, replication::Error)>(())
    };
    match copy.await {
        Ok(()) => {
            // Cleared only now, still under the exclusive locks: a copy that
            // fails, or is cancelled because another chunk failed and the
            // rebuild stopped waiting for it, leaves its regions in the log.
            for region in first..first + count {
                pending.clear_region(region);
            }
            member.progress.done.fetch_add(length, Ordering::Relaxed);
            Ok(())
        }
        Err((side, error)) => {
            warn!(
                volume.id = %core.volume_id,
                node.id = %member.node_id,
                epoch,
                offset = start,
                "Copy failed"
            );
            Err(replica_error(core, side, source, error))
        }
    }
}

/// The parts of `extents` not covered by `cover` (both ascending and
/// non-overlapping).
fn subtract(extents: &[Extent], cover: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    for extent in extents {
        let mut start = extent.offset;
        let end = extent.end();
        for c in cover {
            if c.end() <= start || c.offset >= end {
                continue;
            }
            if c.offset > start {
                out.push(Extent {
                    offset: start,
                    length: c.offset - start,
                });
            }
            start = start.max(c.end());
        }
        if start < end {
            out.push(Extent {
                offset: start,
                length: end - start,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn chunks_split_at_gaps_and_windows() {
        assert_eq!(chunks(&[]), vec![]);
        assert_eq!(chunks(&[0, 1, 2, 3, 4, 5]), vec![(0, 4), (4, 2)]);
        assert_eq!(
            chunks(&[1, 2, 5, 7, 8]),
            vec![(1, 2), (5, 1), (7, 1), (8, 1)]
        );
    }

    #[test]
    fn subtract_keeps_uncovered_parts() {
        assert_eq!(subtract(&[e(0, 100)], &[]), vec![e(0, 100)]);
        assert_eq!(subtract(&[e(0, 100)], &[e(0, 100)]), vec![]);
        assert_eq!(
            subtract(&[e(0, 100)], &[e(10, 10), e(50, 60)]),
            vec![e(0, 10), e(20, 30)]
        );
        assert_eq!(
            subtract(&[e(0, 10), e(200, 10)], &[e(5, 200)]),
            vec![e(0, 5), e(205, 5)]
        );
    }
}
