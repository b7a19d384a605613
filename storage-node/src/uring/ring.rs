//! One ring thread: its inbox, its table of in-flight requests and its loop.
//!
//! The loop, in one iteration:
//! 1. Under the inbox lock, take every queued request (swapping vectors, so
//!    no allocation) and, if there was none, mark the thread as sleeping so
//!    the next submitter signals the eventfd.
//! 2. Push SQEs: the eventfd read first (so a sleeping thread can always be
//!    woken), then requests to continue (short transfers, `EAGAIN`), then new
//!    requests while the in-flight table has room.
//! 3. One `io_uring_enter` submits the batch and, if the thread is sleeping,
//!    waits for at least one completion.
//! 4. Reap every CQE: finish the request (reply through its oneshot channel)
//!    or queue it to continue.
//!
//! In-flight requests are capped at the CQ size minus one (the eventfd read),
//! so the CQ cannot overflow.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

use super::op::{Op, Step};
use crate::buf::IoBuf;

/// `user_data` of the eventfd read; every other value is an index into the
/// in-flight table.
const WAKE_TOKEN: u64 = u64::MAX;

pub(super) type BufReply = oneshot::Sender<(IoBuf, io::Result<usize>)>;
pub(super) type UnitReply = oneshot::Sender<io::Result<()>>;

/// State shared between submitters and one ring thread.
pub(super) struct Shared {
    pub(super) inbox: Mutex<Inbox>,
    /// Signalled (written) by submitters when the thread sleeps.
    pub(super) wake_fd: OwnedFd,
}

/// Requests queued for a ring thread, and its sleep/shutdown flags.
#[derive(Default)]
pub(super) struct Inbox {
    pub(super) requests: Vec<Request>,
    /// The thread found the inbox empty and will block in the kernel until a
    /// completion arrives: the next submitter must signal the eventfd.
    pub(super) sleeping: bool,
    /// The engine is shutting down: no new requests are accepted.
    pub(super) closed: bool,
}

/// One operation and the channel its result goes back through.
pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply: Reply,
}

/// Where a request's result goes.
pub(super) enum Reply {
    /// Reads and writes: the buffer and the bytes transferred.
    Buf(BufReply),
    /// Syncs and fallocates: success or the error.
    Unit(UnitReply),
}

impl Request {
    /// Gives back the buffer of a request that was never submitted.
    pub(super) fn into_buf(self) -> IoBuf {
        self.op.into_buf()
    }

    /// Sends the result to the caller, handing the buffer back.
    fn finish(self, result: io::Result<usize>) {
        // A send fails only when the caller dropped its future; the buffer
        // and file are then dropped here, after the kernel is done with them.
        match self.reply {
            Reply::Buf(tx) => {
                let _ = tx.send((self.op.into_buf(), result));
            }
            Reply::Unit(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
        }
    }
}

/// A request that owns a slot of the in-flight table.
struct InFlight {
    request: Request,
    retries: u32,
}

/// The state owned by one ring thread.
pub(super) struct RingThread {
    ring: IoUring,
    shared: Arc<Shared>,
    /// In-flight table, indexed by `user_data`. A slot is occupied from the
    /// moment its SQE is pushed until its final CQE is reaped.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    occupied: usize,
    /// Accepted requests waiting for a free slot.
    pending: VecDeque<Request>,
    /// Slots whose request must be submitted again.
    resubmit: Vec<usize>,
    /// Swapped with the inbox's vector so taking requests never allocates.
    batch: Vec<Request>,
    cqes: Vec<(u64, i32)>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    cq_overflow: u32,
}

impl RingThread {
    pub(super) fn new(ring: IoUring, shared: Arc<Shared>) -> RingThread {
        let capacity = (ring.params().cq_entries() as usize)
            .saturating_sub(1)
            .max(1);
        RingThread {
            ring,
            shared,
            slots: (0..capacity).map(|_| None).collect(),
            free: (0..capacity).rev().collect(),
            occupied: 0,
            pending: VecDeque::with_capacity(capacity),
            resubmit: Vec::with_capacity(capacity),
            batch: Vec::with_capacity(capacity),
            cqes: Vec::with_capacity(capacity + 1),
            wake_buf: Box::new(0),
            wake_armed: false,
            cq_overflow: 0,
        }
    }

    /// Runs until the engine closes the inbox and every accepted request has
    /// completed.
    pub(super) fn run(mut self) {
        loop {
            let (closing, sleeping) = self.take_inbox();
            if closing && self.is_idle() {
                break;
            }
            self.push_all(closing);
            // While closing, wait for completions instead of spinning: every
            // in-flight request completes, and the close() that set `closed`
            // also signalled the eventfd, so an armed eventfd read does too.
            let wait = sleeping || (closing && (self.occupied > 0 || self.wake_armed));
            self.enter(usize::from(wait));
            self.reap();
        }
        tracing::debug!("io_uring thread stopped");
    }

    /// Moves queued requests to `pending`; returns (closing, sleeping).
    fn take_inbox(&mut self) -> (bool, bool) {
        let mut inbox = self.shared.inbox.lock();
        std::mem::swap(&mut inbox.requests, &mut self.batch);
        let closing = inbox.closed;
        // Sleep only when nothing new arrived: new requests are submitted
        // without waiting, and the next iteration decides again.
        let sleeping = self.batch.is_empty() && !closing;
        inbox.sleeping = sleeping;
        drop(inbox);
        self.pending.extend(self.batch.drain(..));
        (closing, sleeping)
    }

    fn is_idle(&self) -> bool {
        self.occupied == 0 && self.pending.is_empty() && !self.wake_armed
    }

    /// Pushes every SQE that can go into the ring now.
    fn push_all(&mut self, closing: bool) {
        if !closing && !self.wake_armed {
            let entry = opcode::Read::new(
                types::Fd(self.shared.wake_fd.as_raw_fd()),
                std::ptr::from_mut::<u64>(&mut *self.wake_buf).cast::<u8>(),
                8,
            )
            .build()
            .user_data(WAKE_TOKEN);
            // Memory invariant: the SQE points at `wake_buf`, a heap allocation owned
            // by this thread that is neither moved nor freed while
            // `wake_armed` is set (`Drop` leaks it if the thread dies with the
            // read armed), and at `wake_fd`, which `shared` keeps open.
            if self.push(&entry) {
                self.wake_armed = true;
            }
        }
        while let Some(&index) = self.resubmit.last() {
            let Some(Some(in_flight)) = self.slots.get_mut(index) else {
                self.resubmit.pop();
                continue;
            };
            let entry = in_flight.request.op.sqe(index as u64);
            if !self.push(&entry) {
                return;
            }
            self.resubmit.pop();
        }
        while let Some(index) = self.free.last().copied() {
            let Some(mut request) = self.pending.pop_front() else {
                break;
            };
            let entry = request.op.sqe(index as u64);
            // The slot must hold the request before the SQE can reach the
            // kernel; moving `request` moves the `IoBuf` handle, not the
            // heap memory the SQE points at.
            self.slots[index] = Some(InFlight {
                request,
                retries: 0,
            });
            if !self.push(&entry) {
                if let Some(in_flight) = self.slots[index].take() {
                    self.pending.push_front(in_flight.request);
                }
                return;
            }
            self.free.pop();
            self.occupied += 1;
        }
    }

    /// Pushes one SQE, submitting the queue first if it is full. Returns
    /// false if the SQ is still full (the kernel refused the submission).
    ///
    /// Callers guarantee that every buffer and descriptor the SQE refers to
    /// stays alive and in place until its CQE is reaped.
    fn push(&mut self, entry: &squeue::Entry) -> bool {
        for _ in 0..2 {
            // SAFETY: the callers uphold the invariant stated above: the SQE
            // refers to memory owned by an occupied slot of `self.slots` (an
            // `IoBuf` heap allocation and an `Arc<File>`) or to `wake_buf`,
            // and those are only dropped after the matching CQE is reaped.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return true;
            }
            if let Err(error) = self.ring.submit() {
                tracing::debug!(%error, "io_uring submit of a full SQ failed; will retry");
                return false;
            }
        }
        false
    }

    /// Submits the SQ and waits for `want` completions.
    fn enter(&mut self, want: usize) {
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            // EINTR: a signal; EBUSY/EAGAIN: the kernel wants completions
            // reaped or memory freed first. Reaping and looping handles all.
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(error) => {
                // In-flight memory cannot be released without completions, so
                // the only safe reaction is to keep trying.
                tracing::error!(%error, "io_uring_enter failed");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Handles every available completion.
    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        let overflow = cq.overflow();
        self.cqes
            .extend(cq.by_ref().map(|cqe| (cqe.user_data(), cqe.result())));
        drop(cq);
        if overflow != self.cq_overflow {
            // Cannot happen while in-flight requests are capped to the CQ
            // size; kernels with IORING_FEAT_NODROP would not lose them anyway.
            tracing::error!(overflow, "io_uring completion queue overflowed");
            self.cq_overflow = overflow;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        for (user_data, res) in cqes.drain(..) {
            self.complete(user_data, res);
        }
        self.cqes = cqes;
    }

    fn complete(&mut self, user_data: u64, res: i32) {
        if user_data == WAKE_TOKEN {
            self.wake_armed = false;
            if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                tracing::warn!(errno = -res, "Reading the io_uring wakeup eventfd failed");
            }
            return;
        }
        let index = user_data as usize;
        let Some(Some(in_flight)) = self.slots.get_mut(index) else {
            tracing::error!(user_data, "io_uring completion for an unknown request");
            return;
        };
        match in_flight.request.op.advance(res, &mut in_flight.retries) {
            Step::Continue => self.resubmit.push(index),
            Step::Finish(result) => {
                if let Some(in_flight) = self.slots[index].take() {
                    self.free.push(index);
                    self.occupied -= 1;
                    in_flight.request.finish(result);
                }
            }
        }
    }
}

impl Drop for RingThread {
    fn drop(&mut self) {
        // Whatever ends this thread (shutdown or a bug), submitters must stop
        // queueing: dropping the queued requests fails their futures.
        let queued = {
            let mut inbox = self.shared.inbox.lock();
            inbox.closed = true;
            std::mem::take(&mut inbox.requests)
        };
        drop(queued);
        if self.occupied > 0 || self.wake_armed {
            // Only reachable if the loop panicked. The kernel may still write
            // into these buffers after the ring is torn down, so leaking them
            // is the only sound choice.
            tracing::error!(
                in_flight = self.occupied,
                "io_uring thread exited with requests in flight; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(std::mem::take(&mut self.wake_buf));
        }
    }
}
