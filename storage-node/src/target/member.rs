//! One replica of a target ([`Member`]) and the transitions of its sync
//! state, which decide safety:
//!
//! ```text
//!  InSync ──fails──► Dropping ──DropReplica committed──► Faulted ──AddReplica──► Rebuilding
//!    ▲                  │ refused (e.g. last in-sync)                 ▲              │ copied
//!    └──────────────────┘                                             │ fails        ▼
//!    └─────────────────────────── ReplicaInSync committed ──────── Joining ◄─────────┘
//!                                                (Joining fails ──► Dropping)
//! ```
//!
//! Every transition happens under the member's state mutex. At most one
//! drop task runs per member; I/O that needs the drop waits on its
//! outcome (a `watch` channel). DropReplica and ReplicaInSync of one member
//! are serialised by the member's control lock, so the controller sees
//! them in the order the target decided them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use tokio::sync::watch;
use tracing::{info, warn};

use super::control::Verdict;
use super::rebuild::{self, RebuildKind};
use super::regions::RegionMap;
use super::{Core, Error, ReplicaSpec, ReplicaStatus};
use crate::replication::ReplicaIo;

/// A replica's sync state as its target sees it; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// In the in-sync set: takes writes, serves reads, seeds rebuilds.
    InSync,
    /// Failed; its drop from the in-sync set is being committed. Takes
    /// nothing; writes that miss it wait for the commit.
    Dropping,
    /// Out of the in-sync set; takes nothing.
    Faulted,
    /// Being rebuilt: takes writes, never serves reads.
    Rebuilding,
    /// Rebuilt; its return to the in-sync set is being committed. Takes
    /// writes like an in-sync replica (a failure must be dropped before
    /// acknowledging), never serves reads.
    Joining,
}

impl SyncState {
    /// The name used in the APIs: "in-sync", "faulted" or "rebuilding"
    /// (`Dropping` shows as faulted, `Joining` as rebuilding).
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncState::InSync => "in-sync",
            SyncState::Dropping | SyncState::Faulted => "faulted",
            SyncState::Rebuilding | SyncState::Joining => "rebuilding",
        }
    }
}

/// The outcome of a member's drop, as I/O waiting on it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropOutcome {
    /// Not decided yet.
    Pending,
    /// Committed: writes the replica missed may be acknowledged.
    Committed,
    /// Refused: the replica stays in sync; writes it missed fail.
    Refused,
    /// The target is fenced.
    StaleEpoch,
    /// The target stopped first.
    Stopped,
}

/// What one request must wait for before it may be acknowledged, for one
/// replica it did not land on.
#[derive(Debug)]
pub(crate) enum Wait {
    /// Nothing: the replica is already out of the in-sync set.
    Nothing,
    /// The replica's drop.
    Drop(watch::Receiver<DropOutcome>),
    /// The replica is the last in-sync one and cannot be dropped.
    LastInSync,
}

/// Rebuild progress of a member, in bytes.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) done: AtomicU64,
    pub(crate) total: AtomicU64,
    pub(crate) copied: AtomicU64,
}

pub(crate) struct State {
    pub(crate) sync: SyncState,
    /// The current drop's outcome, while `Dropping`.
    drop: Option<watch::Receiver<DropOutcome>>,
    /// Regions that may differ from the in-sync replicas, while out of
    /// sync; `None` when unknown (a rebuild then compares hashes). While
    /// rebuilding: the regions still to copy.
    pub(crate) log: Option<Arc<RegionMap>>,
    /// Generation of the latest rebuild; a rebuild task whose generation is
    /// no longer current has been aborted.
    pub(crate) rebuild: u64,
    /// True while a rebuild is still finding the regions that differ
    /// (hashes, extents): until then `log` is incomplete, and an abort
    /// must discard it.
    pub(crate) scanning: bool,
    /// True once the replica is known to have accepted the target's epoch
    /// (it answered the claim at start, or a rebuild's scan under this
    /// target's epoch): from then on no older target can write to it, so
    /// a dirty-region log started later describes every change it missed.
    /// While false, an older target (paused or partitioned) may still be
    /// writing to it in regions this target never writes, and only a
    /// comparison of the whole volume finds those (invariant 4).
    pub(crate) claimed: bool,
}

/// One replica of a target.
pub(crate) struct Member {
    pub(crate) node_id: String,
    pub(crate) replica_name: String,
    pub(crate) data_address: RwLock<String>,
    io: RwLock<Arc<dyn ReplicaIo>>,
    state: Mutex<State>,
    /// Serialises this member's DropReplica and ReplicaInSync calls.
    control: tokio::sync::Mutex<()>,
    healthy: AtomicBool,
    pub(crate) progress: Progress,
}

impl Member {
    pub(crate) fn new(spec: ReplicaSpec) -> Arc<Member> {
        Arc::new(Member {
            node_id: spec.node_id,
            replica_name: spec.replica_name,
            data_address: RwLock::new(spec.data_address),
            io: RwLock::new(spec.io),
            state: Mutex::new(State {
                sync: if spec.in_sync {
                    SyncState::InSync
                } else {
                    SyncState::Faulted
                },
                drop: None,
                log: None,
                rebuild: 0,
                scanning: false,
                claimed: false,
            }),
            control: tokio::sync::Mutex::new(()),
            healthy: AtomicBool::new(true),
            progress: Progress::default(),
        })
    }

    /// How to reach the replica.
    pub(crate) fn io(&self) -> Arc<dyn ReplicaIo> {
        Arc::clone(&self.io.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn sync(&self) -> SyncState {
        self.lock().sync
    }

    pub(crate) fn is_local(&self) -> bool {
        self.io().location() == crate::replication::Location::Local
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Marks `range` in the dirty-region log, if there is one.
    pub(crate) fn mark(state: &State, range: Option<(u64, u64)>) {
        if let (Some(log), Some((offset, length))) = (&state.log, range) {
            log.mark(offset, length);
        }
    }

    pub(crate) fn status(&self) -> ReplicaStatus {
        let state = self.lock();
        ReplicaStatus {
            node_id: self.node_id.clone(),
            replica_name: self.replica_name.clone(),
            data_address: self
                .data_address
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            location: self.io().location(),
            state: state.sync,
            healthy: self.is_healthy(),
            rebuild_done_bytes: self.progress.done.load(Ordering::Relaxed),
            rebuild_total_bytes: self.progress.total.load(Ordering::Relaxed),
            rebuild_copied_bytes: self.progress.copied.load(Ordering::Relaxed),
            dirty_regions: state.log.as_ref().map(|log| log.count()),
        }
    }
}

/// How a request treats one member, decided when it chooses replicas.
#[derive(Debug)]
pub(crate) enum Route {
    /// Send it the request; `counts` when the acknowledgement depends on
    /// it (in sync or joining), not when it is rebuilding.
    Send {
        /// True for in-sync and joining members.
        counts: bool,
    },
    /// Do not send; wait for this before acknowledging.
    Skip(Wait),
}

impl Member {
    /// Chooses how a request that writes `range` (FLUSH: `None`) treats the
    /// member, and records the range in its log when the member misses it.
    pub(crate) fn route(&self, range: Option<(u64, u64)>) -> Route {
        let state = self.lock();
        match state.sync {
            SyncState::InSync | SyncState::Joining => Route::Send { counts: true },
            SyncState::Rebuilding => Route::Send { counts: false },
            SyncState::Dropping => {
                Member::mark(&state, range);
                Route::Skip(match &state.drop {
                    Some(waiter) => Wait::Drop(waiter.clone()),
                    None => Wait::Nothing,
                })
            }
            SyncState::Faulted => {
                Member::mark(&state, range);
                Route::Skip(Wait::Nothing)
            }
        }
    }
}

impl Core {
    /// Takes one member out of the in-sync count unless it is the last.
    fn leave_in_sync(&self) -> bool {
        self.in_sync
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 1).then(|| n - 1)
            })
            .is_ok()
    }

    /// A new dirty-region log, starting with the regions whose writes may
    /// not be durable on the replica yet.
    fn new_log(&self) -> Arc<RegionMap> {
        let log = RegionMap::new(self.size_bytes);
        self.generations.mark_unflushed(&log);
        Arc::new(log)
    }

    /// Handles a failure of `member` on a request that counted on it (it was
    /// in sync or joining when the request chose its replicas): starts its
    /// drop, or joins the drop in progress, and records `range` (what the
    /// request wrote, if anything) in its dirty-region log. `unknown` means
    /// the replica's content can no longer be described by a log (a failed
    /// FLUSH): the log is discarded and a later rebuild compares hashes.
    ///
    /// Returns what the request must wait for before acknowledging.
    pub(crate) fn fail_member(
        self: &Arc<Self>,
        member: &Arc<Member>,
        range: Option<(u64, u64)>,
        unknown: bool,
        reason: &str,
    ) -> Wait {
        let mut state = member.lock();
        let forget = |state: &mut State| {
            if unknown {
                state.log = None;
            } else {
                Member::mark(state, range);
            }
        };
        match state.sync {
            SyncState::InSync | SyncState::Joining => {
                if state.sync == SyncState::InSync && !self.leave_in_sync() {
                    warn!(
                        volume.id = %self.volume_id,
                        node.id = %member.node_id,
                        epoch = self.epoch,
                        %reason,
                        "The last in-sync replica failed; failing the request instead of dropping it"
                    );
                    return Wait::LastInSync;
                }
                // A log is only valid for a replica that holds this
                // target's epoch: see `State::claimed`.
                state.log = (!unknown && state.claimed).then(|| self.new_log());
                Member::mark(&state, range);
                state.sync = SyncState::Dropping;
                let (outcome, waiter) = watch::channel(DropOutcome::Pending);
                state.drop = Some(waiter.clone());
                drop(state);
                warn!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    replica.id = %member.replica_name,
                    epoch = self.epoch,
                    %reason,
                    "Replica failed; asking the controller to drop it from the in-sync set"
                );
                let core = Arc::clone(self);
                let member = Arc::clone(member);
                let reason = reason.to_owned();
                self.spawn(async move { core.run_drop(member, outcome, reason).await });
                Wait::Drop(waiter)
            }
            SyncState::Dropping => {
                forget(&mut state);
                match &state.drop {
                    Some(waiter) => Wait::Drop(waiter.clone()),
                    None => Wait::Nothing,
                }
            }
            SyncState::Faulted => {
                forget(&mut state);
                Wait::Nothing
            }
            SyncState::Rebuilding => {
                // Dropped and already being rebuilt since the request chose
                // it: the rebuild copies what the log holds.
                drop(state);
                if unknown {
                    self.abort_rebuild(member, None, true, reason);
                } else {
                    Member::mark(&member.lock(), range);
                }
                Wait::Nothing
            }
        }
    }

    /// The drop task of one member: asks the controller until it answers
    /// and publishes the outcome.
    async fn run_drop(
        self: Arc<Self>,
        member: Arc<Member>,
        outcome: watch::Sender<DropOutcome>,
        reason: String,
    ) {
        let _control = member.control.lock().await;
        let verdict = self
            .controller
            .drop_replica(
                &self.volume_id,
                self.epoch,
                &member.node_id,
                &reason,
                self.stopped.subscribe(),
            )
            .await;
        let mut state = member.lock();
        let result = match verdict {
            Verdict::Committed => {
                if state.sync == SyncState::Dropping {
                    state.sync = SyncState::Faulted;
                }
                info!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    epoch = self.epoch,
                    dirty_regions = state.log.as_ref().map(|l| l.count()),
                    "Replica dropped from the in-sync set"
                );
                DropOutcome::Committed
            }
            Verdict::Refused(why) => {
                // The controller keeps it in the in-sync set, so it stays
                // in sync here too; requests that missed it fail.
                if state.sync == SyncState::Dropping {
                    state.sync = SyncState::InSync;
                    state.log = None;
                    self.in_sync.fetch_add(1, Ordering::AcqRel);
                }
                warn!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    epoch = self.epoch,
                    reason = %why,
                    "The controller refused to drop the replica; failing the requests that missed it"
                );
                DropOutcome::Refused
            }
            Verdict::StaleEpoch(why) => {
                self.fence(&why);
                DropOutcome::StaleEpoch
            }
            Verdict::Stopped => DropOutcome::Stopped,
        };
        state.drop = None;
        drop(state);
        outcome.send_replace(result);
    }

    /// Aborts the rebuild of `member` (back to faulted) if `generation` is
    /// still its current one (any generation when `None`), marking `range`
    /// as still to copy; `unknown` discards the log. The regions of
    /// possibly unflushed writes join the log, as for a drop.
    pub(crate) fn abort_rebuild(
        &self,
        member: &Member,
        generation: Option<u64>,
        unknown: bool,
        reason: &str,
    ) {
        let mut state = member.lock();
        if state.sync != SyncState::Rebuilding || generation.is_some_and(|g| g != state.rebuild) {
            return;
        }
        state.sync = SyncState::Faulted;
        state.rebuild += 1;
        if unknown || std::mem::take(&mut state.scanning) {
            state.log = None;
        } else if let Some(log) = &state.log {
            self.generations.mark_unflushed(log);
        }
        warn!(
            volume.id = %self.volume_id,
            node.id = %member.node_id,
            epoch = self.epoch,
            %reason,
            "Rebuild aborted; the replica is faulted"
        );
    }

    /// A request failed on a rebuilding `member`: aborts its rebuild and
    /// keeps `range` to copy next time.
    pub(crate) fn rebuild_write_failed(
        &self,
        member: &Member,
        range: Option<(u64, u64)>,
        unknown: bool,
        reason: &str,
    ) {
        {
            let state = member.lock();
            Member::mark(&state, range);
        }
        self.abort_rebuild(member, None, unknown, reason);
    }

    /// A request landed on `member`, which it chose while in sync or
    /// rebuilding; if the member has left since, the write may not be
    /// durable there and its log must cover it.
    pub(crate) fn landed(&self, member: &Member, range: (u64, u64)) {
        let state = member.lock();
        if matches!(state.sync, SyncState::Dropping | SyncState::Faulted) {
            Member::mark(&state, Some(range));
        }
    }

    /// See [`super::Target::add_replica`].
    pub(crate) fn add_replica(
        self: &Arc<Self>,
        spec: ReplicaSpec,
        full: bool,
    ) -> Result<(), Error> {
        if self.fenced.load(Ordering::Acquire) || self.is_stopped() {
            return Err(Error::Fenced {
                volume_id: self.volume_id.clone(),
                epoch: self.epoch,
            });
        }
        let member = {
            let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
            match members.iter().find(|m| m.node_id == spec.node_id) {
                Some(member) => Arc::clone(member),
                None => {
                    let member = Member::new(ReplicaSpec {
                        in_sync: false,
                        ..spec.clone()
                    });
                    members.push(Arc::clone(&member));
                    member
                }
            }
        };
        let mut state = member.lock();
        let kind = match state.sync {
            SyncState::InSync | SyncState::Rebuilding | SyncState::Joining => return Ok(()),
            SyncState::Dropping => {
                return Err(Error::ReplicaDropping {
                    volume_id: self.volume_id.clone(),
                    node_id: member.node_id.clone(),
                });
            }
            SyncState::Faulted if full => RebuildKind::Full,
            SyncState::Faulted if state.log.is_some() && state.claimed => RebuildKind::DirtyLog,
            SyncState::Faulted => RebuildKind::Hashes,
        };
        // A fresh connection (and the address the controller knows now).
        *member.io.write().unwrap_or_else(PoisonError::into_inner) = spec.io;
        *member
            .data_address
            .write()
            .unwrap_or_else(PoisonError::into_inner) = spec.data_address;
        let log = state
            .log
            .take()
            .unwrap_or_else(|| Arc::new(RegionMap::new(self.size_bytes)));
        state.log = Some(Arc::clone(&log));
        state.sync = SyncState::Rebuilding;
        state.rebuild += 1;
        state.scanning = kind != RebuildKind::DirtyLog;
        let generation = state.rebuild;
        drop(state);
        member.progress.done.store(0, Ordering::Relaxed);
        member.progress.total.store(0, Ordering::Relaxed);
        member.progress.copied.store(0, Ordering::Relaxed);
        info!(
            volume.id = %self.volume_id,
            node.id = %member.node_id,
            epoch = self.epoch,
            ?kind,
            "Rebuild started"
        );
        let core = Arc::clone(self);
        self.spawn(rebuild::run(core, member, generation, kind, log));
        Ok(())
    }

    /// Adds a rebuilt member back: calls ReplicaInSync and flips it to in
    /// sync after the commit (invariant 4). Returns true when it joined.
    pub(crate) async fn join(&self, member: &Member) -> bool {
        let _control = member.control.lock().await;
        if member.sync() != SyncState::Joining {
            return false;
        }
        let verdict = self
            .controller
            .replica_in_sync(
                &self.volume_id,
                self.epoch,
                &member.node_id,
                self.stopped.subscribe(),
            )
            .await;
        let mut state = member.lock();
        match verdict {
            Verdict::Committed if state.sync == SyncState::Joining => {
                state.sync = SyncState::InSync;
                state.log = None;
                self.in_sync.fetch_add(1, Ordering::AcqRel);
                info!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    epoch = self.epoch,
                    "Replica rebuilt and back in the in-sync set"
                );
                true
            }
            Verdict::Committed => false,
            Verdict::Refused(why) => {
                if state.sync == SyncState::Joining {
                    state.sync = SyncState::Faulted;
                    if let Some(log) = &state.log {
                        self.generations.mark_unflushed(log);
                    }
                }
                warn!(
                    volume.id = %self.volume_id,
                    node.id = %member.node_id,
                    epoch = self.epoch,
                    reason = %why,
                    "The controller refused to add the rebuilt replica"
                );
                false
            }
            Verdict::StaleEpoch(why) => {
                drop(state);
                self.fence(&why);
                false
            }
            Verdict::Stopped => false,
        }
    }
}
