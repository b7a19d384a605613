//! The target's I/O: [`BlockDevice`] for [`Target`], the fan-out of
//! writes and flushes, and reads with failover. The rules are in the
//! parent module's docs; this file applies them.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use tracing::debug;

use super::member::{DropOutcome, Member, Route, SyncState, Wait};
use super::{Core, Target};
use crate::block::{BlockDevice, BlockError};
use crate::buf::IoBuf;
use crate::replication::{self, ReplicaIo};

/// A request that changes replicas.
#[derive(Clone)]
enum Op {
    Write {
        offset: u64,
        data: Arc<IoBuf>,
        fua: bool,
    },
    Trim {
        offset: u64,
        length: u64,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    },
    Flush,
}

impl Op {
    /// The bytes the request changes (`None` for FLUSH).
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            Op::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Op::Trim { offset, length } | Op::WriteZeroes { offset, length, .. } => {
                Some((*offset, *length))
            }
            Op::Flush => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Trim { .. } => "trim",
            Op::WriteZeroes { .. } => "write-zeroes",
            Op::Flush => "flush",
        }
    }

    async fn send(&self, io: Arc<dyn ReplicaIo>, epoch: u64) -> Result<(), replication::Error> {
        match self {
            Op::Write { offset, data, fua } => {
                io.write(epoch, *offset, Arc::clone(data), *fua).await
            }
            Op::Trim { offset, length } => io.trim(epoch, *offset, *length).await,
            Op::WriteZeroes {
                offset,
                length,
                punch_hole,
                fua,
            } => {
                io.write_zeroes(epoch, *offset, *length, *punch_hole, *fua)
                    .await
            }
            Op::Flush => io.flush(epoch).await,
        }
    }
}

fn unavailable(core: &Core) -> BlockError {
    if core.fenced.load(Ordering::Acquire) {
        BlockError::Unavailable(format!(
            "The target of volume {} at epoch {} is fenced: a newer epoch exists",
            core.volume_id, core.epoch
        ))
    } else {
        BlockError::Unavailable(format!(
            "The target of volume {} is stopped",
            core.volume_id
        ))
    }
}

fn eio(message: String) -> BlockError {
    BlockError::Io(io::Error::other(message))
}

impl Core {
    fn check_serving(&self) -> Result<(), BlockError> {
        if self.fenced.load(Ordering::Acquire) || self.is_stopped() {
            return Err(unavailable(self));
        }
        Ok(())
    }

    /// Runs a WRITE, TRIM, WRITE_ZEROES or FLUSH on the volume; see the
    /// module docs of `target` for the rules.
    async fn modify(self: &Arc<Self>, op: Op) -> Result<(), BlockError> {
        self.check_serving()?;
        let range = op.range();
        if let Some((offset, length)) = range {
            BlockError::check_range(offset, length, self.size_bytes)?;
        }
        // Held to the answer, so a snapshot's pause waits for this request
        // and no request changes a replica while a pause holds.
        let _admission = self.barrier.admit().await;
        // It may have waited out a pause during which the target stopped.
        self.check_serving()?;
        let flush = matches!(op, Op::Flush);
        let generation = flush.then(|| self.generations.flush_started());
        // Held until every replica answered, so a rebuild copy of these
        // regions runs either wholly before or wholly after this request.
        let guard = match range {
            Some((offset, length)) => Some(self.locks.shared(offset, length).await),
            None => None,
        };
        let mut waits = Vec::new();
        let mut sends = Vec::new();
        for member in self.members() {
            match member.route(range) {
                Route::Send { counts } => sends.push((member, counts)),
                Route::Skip(wait) => waits.push(wait),
            }
        }
        let results = futures_util::future::join_all(
            sends
                .iter()
                .map(|(member, _)| op.send(member.io(), self.epoch)),
        )
        .await;
        if let Some((offset, length)) = range {
            self.generations.written(offset, length);
        }

        let mut acknowledged = 0;
        let mut stale = None;
        let mut failures = Vec::new();
        for ((member, counts), result) in sends.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    member.set_healthy(true);
                    if counts {
                        acknowledged += 1;
                    }
                    if let Some(range) = range {
                        self.landed(&member, range);
                    }
                }
                Err(error @ replication::Error::StaleEpoch { .. }) => stale = Some(error),
                Err(error) => {
                    member.set_healthy(false);
                    failures.push((member, counts, error));
                }
            }
        }
        if let Some(error) = stale {
            self.fence(&error.to_string());
            return Err(unavailable(self));
        }
        for (member, counts, error) in &failures {
            let reason = format!("{} failed: {}", op.name(), crate::error_chain(error));
            if !counts {
                self.rebuild_write_failed(member, range, flush, &reason);
            } else if acknowledged > 0 {
                waits.push(self.fail_member(member, range, flush, &reason));
            }
        }
        if acknowledged == 0 {
            // No replica that counts holds it: fail the request and drop
            // nobody (every replica failing alike is the request's fault or
            // the volume's, not one replica's).
            return Err(match failures.into_iter().find(|(_, counts, _)| *counts) {
                Some((_, _, error)) => error.into(),
                None => eio(format!(
                    "No in-sync replica of volume {} took the {}",
                    self.volume_id,
                    op.name()
                )),
            });
        }
        drop(guard);
        self.wait(waits).await?;
        if let Some(generation) = generation.filter(|_| failures.is_empty()) {
            self.generations.flush_succeeded(generation);
        }
        Ok(())
    }

    /// Waits until every drop a request depends on is decided; fails the
    /// request unless all committed.
    ///
    /// # Cancel safety
    /// Cancel safe; the drops go on without the request.
    async fn wait(&self, waits: Vec<Wait>) -> Result<(), BlockError> {
        for wait in waits {
            let mut waiter = match wait {
                Wait::Nothing => continue,
                Wait::LastInSync => {
                    return Err(eio(format!(
                        "The last in-sync replica of volume {} failed",
                        self.volume_id
                    )));
                }
                Wait::Drop(waiter) => waiter,
            };
            let outcome = match waiter.wait_for(|o| *o != DropOutcome::Pending).await {
                Ok(outcome) => *outcome,
                Err(_) => DropOutcome::Stopped,
            };
            match outcome {
                DropOutcome::Committed => {}
                DropOutcome::Refused => {
                    return Err(eio(format!(
                        "The controller kept a failed replica of volume {} in the in-sync set",
                        self.volume_id
                    )));
                }
                DropOutcome::StaleEpoch | DropOutcome::Stopped | DropOutcome::Pending => {
                    return Err(unavailable(self));
                }
            }
        }
        Ok(())
    }

    /// Reads from the best in-sync replica, failing over to the others.
    async fn read(self: &Arc<Self>, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        self.check_serving()?;
        BlockError::check_range(offset, length as u64, self.size_bytes)?;
        let mut tried: Vec<Arc<Member>> = Vec::new();
        loop {
            let Some(member) = self
                .members()
                .into_iter()
                .filter(|m| m.sync() == SyncState::InSync)
                .filter(|m| !tried.iter().any(|t| Arc::ptr_eq(t, m)))
                .min_by_key(|m| (!m.is_healthy(), !m.is_local()))
            else {
                return Err(eio(format!(
                    "No in-sync replica of volume {} can serve the read",
                    self.volume_id
                )));
            };
            match member.io().read(self.epoch, offset, length).await {
                Ok(data) => {
                    member.set_healthy(true);
                    return Ok(data);
                }
                Err(error @ replication::Error::StaleEpoch { .. }) => {
                    self.fence(&error.to_string());
                    return Err(unavailable(self));
                }
                Err(error) if !error.replica_failed() => return Err(error.into()),
                Err(error) => {
                    member.set_healthy(false);
                    let reason = format!("read failed: {}", crate::error_chain(&error));
                    debug!(volume.id = %self.volume_id, node.id = %member.node_id, %reason, "Read failing over");
                    if let Wait::LastInSync = self.fail_member(&member, None, false, &reason) {
                        return Err(error.into());
                    }
                    tried.push(member);
                }
            }
        }
    }
}

#[async_trait]
impl BlockDevice for Target {
    fn size_bytes(&self) -> u64 {
        self.core.size_bytes
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        self.core.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        self.core
            .modify(Op::Write {
                offset,
                data: Arc::new(data),
                fua,
            })
            .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.core.modify(Op::Flush).await
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.core.modify(Op::Trim { offset, length }).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.core
            .modify(Op::WriteZeroes {
                offset,
                length,
                punch_hole,
                fua,
            })
            .await
    }
}
