//! Per-thread io_uring rings: I/O submitted and reaped by the thread that
//! asked for it, without a hop to a ring thread and back.
//!
//! # What it owns
//!
//! A [`LocalRing`] is installed on a thread that runs a current-thread tokio
//! runtime (an NBD connection's thread). While it is installed, every
//! [`IoEngine`](super::IoEngine) request *polled for the first time on that
//! thread* goes into the thread's own ring instead of a ring thread's inbox:
//!
//! - The request's future pushes its SQE into the ring's SQ and wakes the
//!   ring's driver task; it does not enter the kernel itself. The driver runs
//!   after the tasks that were ready before it (tokio's current-thread
//!   scheduler is FIFO), so the SQEs of every request started in one round of
//!   the runtime go to the kernel with one `io_uring_enter`.
//! - The ring signals an eventfd (registered with `IORING_REGISTER_EVENTFD`)
//!   that the runtime watches (`AsyncFd`), so completions wake the driver on
//!   the same thread. With `IORING_SETUP_DEFER_TASKRUN` (Linux 6.1) the
//!   kernel defers completion work to the driver's next `io_uring_enter`
//!   instead of interrupting the thread.
//! - The driver reaps every CQE, continues short transfers, and wakes the
//!   request's task; the request takes its result from its slot. No channel,
//!   no allocation and no lock per request (a waker clone is the only
//!   atomic operation).
//!
//! Requests that find no local ring (any other thread: the agent's runtime,
//! the replication server, `spawn_blocking` threads) or a full one go to the
//! engine's ring threads as before. Both paths have the same semantics.
//!
//! # Memory invariant
//!
//! As for the ring threads: an operation ([`Op`]) owns its buffer and file,
//! and the ring's slot table owns the operation from the moment its SQE is
//! pushed until its final CQE has been reaped. A request future only holds
//! the slot's index; dropping it marks the slot abandoned, and the driver
//! drops the operation once the kernel has completed it. Dropping the
//! [`LocalRing`] waits (blocking the thread) for every operation in flight.
//! If a ring cannot be drained (a bug), its operations are leaked, never
//! freed.
//!
//! # Threading rules
//!
//! The ring belongs to one thread (`Rc`, thread-local); request futures are
//! `Send` (they hold plain indices) but find their ring through the thread
//! local, so a request started on the ring's thread must be polled to the end
//! there. On a current-thread runtime, tasks never move; [`LocalRing::install`]
//! refuses other runtimes. A future that breaks the rule anyway (polled on
//! another thread after it started) fails with an I/O error; memory stays
//! safe because the slot keeps the operation until its completion.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use io_uring::IoUring;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinHandle;

use super::op::{Op, Step};

/// `IORING_ENTER_GETEVENTS`: run deferred completion work and reap.
const ENTER_GETEVENTS: u32 = 1;

/// Most passes the driver makes in one poll before it lets other tasks run.
const MAX_PASSES_PER_POLL: usize = 4;

thread_local! {
    static CURRENT: RefCell<Option<Rc<Ring>>> = const { RefCell::new(None) };
}

/// Identifies rings, so a request never looks into another ring installed
/// later on the same (pooled) thread.
static NEXT_RING_ID: AtomicU64 = AtomicU64::new(1);

/// Errors of installing a per-thread ring.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not called inside a current-thread tokio runtime.
    #[error("A per-thread io_uring needs a current-thread tokio runtime")]
    Runtime,
    /// The thread has a per-thread ring already.
    #[error("This thread has a per-thread io_uring already")]
    Installed,
    /// `entries` was zero.
    #[error("A per-thread io_uring needs at least one entry")]
    Config,
    /// The kernel refused to create the ring.
    #[error("Cannot create a per-thread io_uring of {entries} entries")]
    CreateRing {
        /// Requested submission queue depth.
        entries: u32,
        /// Error of io_uring_setup(2).
        #[source]
        source: io::Error,
    },
    /// The completion eventfd could not be created, registered with the
    /// ring, or registered with the runtime.
    #[error("Cannot set up the completion eventfd of a per-thread io_uring")]
    EventFd(#[source] io::Error),
}

/// A per-thread ring installed on the calling thread; see the module docs.
///
/// Dropping it uninstalls the ring and blocks until every operation in flight
/// has completed. Drop it after the runtime that drives it (so the tasks of
/// that runtime are gone first), on the thread that installed it (`!Send`
/// makes sure of that).
pub struct LocalRing {
    ring: Rc<Ring>,
    driver: JoinHandle<()>,
}

impl LocalRing {
    /// Creates a ring of `entries` SQEs (at most `entries` operations in
    /// flight; more go to the engine's ring threads), installs it for the
    /// calling thread, and spawns its driver on the current runtime.
    ///
    /// Uses `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` where
    /// the kernel has them (Linux 6.1), a plain ring otherwise.
    ///
    /// # Errors
    /// [`Error::Runtime`] outside a current-thread runtime,
    /// [`Error::Installed`], [`Error::Config`], [`Error::CreateRing`],
    /// [`Error::EventFd`].
    pub fn install(entries: u32) -> Result<LocalRing, Error> {
        if entries == 0 {
            return Err(Error::Config);
        }
        let handle = Handle::try_current().map_err(|_| Error::Runtime)?;
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return Err(Error::Runtime);
        }
        if CURRENT.with(|current| current.borrow().is_some()) {
            return Err(Error::Installed);
        }
        let (uring, deferred) = create_ring(entries)?;
        let eventfd = nonblocking_eventfd().map_err(Error::EventFd)?;
        uring
            .submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(Error::EventFd)?;
        // SAFETY: `eventfd` is an open descriptor owned by the `OwnedFd`
        // that the `AsyncFd` takes over; an `OwnedFd` always returns the
        // same descriptor and closes it only when dropped with the
        // `AsyncFd`.
        let eventfd = unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }
            .map_err(|error| Error::EventFd(io::Error::from(error)))?;
        // The SQ may hold one SQE per slot, and the CQ (twice the SQ) one
        // CQE per slot: neither can overflow.
        let capacity = uring.params().sq_entries() as usize;
        let id = NEXT_RING_ID.fetch_add(1, Ordering::Relaxed);
        let ring = Rc::new(Ring {
            id,
            eventfd,
            state: RefCell::new(State {
                uring,
                slots: (0..capacity).map(|_| Slot::Free).collect(),
                free: (0..capacity).rev().collect(),
                in_flight: 0,
                started: 0,
                unsubmitted: false,
                again: false,
                driver: None,
                closed: false,
                wakers: Vec::with_capacity(capacity),
            }),
        });
        CURRENT.with(|current| *current.borrow_mut() = Some(Rc::clone(&ring)));
        let driver = handle.spawn(Driver { ring: id });
        tracing::debug!(entries, deferred, "Installed a per-thread io_uring");
        Ok(LocalRing { ring, driver })
    }

    /// Number of operations started on this ring since it was installed
    /// (the rest went to the engine's ring threads).
    pub fn started(&self) -> u64 {
        self.ring.state.borrow().started
    }
}

impl Drop for LocalRing {
    fn drop(&mut self) {
        self.driver.abort();
        let _ = CURRENT.try_with(|current| {
            let mut current = current.borrow_mut();
            if current.as_ref().is_some_and(|ring| ring.id == self.ring.id) {
                *current = None;
            }
        });
        // The `Rc` in `self.ring` is now the last one (the driver and
        // request futures hold ids, not references); dropping it drains.
    }
}

impl std::fmt::Debug for LocalRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRing")
            .field("id", &self.ring.id)
            .finish()
    }
}

/// Starts `op` on the calling thread's ring. Gives the operation back if the
/// thread has no ring or its ring is full or closed.
pub(super) fn start(op: Op) -> Result<Ticket, Op> {
    match current() {
        Some(ring) => ring.start(op),
        None => Err(op),
    }
}

/// The calling thread's ring, if it has one (and the thread is not exiting).
fn current() -> Option<Rc<Ring>> {
    CURRENT
        .try_with(|current| current.borrow().clone())
        .ok()
        .flatten()
}

/// The calling thread's ring if it is the ring with `id`.
fn current_with_id(id: u64) -> Option<Rc<Ring>> {
    current().filter(|ring| ring.id == id)
}

/// A thread's ring.
struct Ring {
    id: u64,
    eventfd: AsyncFd<OwnedFd>,
    state: RefCell<State>,
}

struct State {
    uring: IoUring,
    /// Indexed by `user_data`.
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots in the [`Slot::InFlight`] state.
    in_flight: usize,
    /// Operations started on this ring since it was installed.
    started: u64,
    /// SQEs have been pushed that the kernel has not taken yet.
    unsubmitted: bool,
    /// The last pass reaped completions, so deferred work may be left over
    /// (the kernel runs a bounded batch per `io_uring_enter`): pass again.
    again: bool,
    /// The driver's waker, taken by the first submitter that needs it.
    driver: Option<Waker>,
    /// Draining: no new operations are accepted.
    closed: bool,
    /// Reused to wake tasks after the state's borrow has ended.
    wakers: Vec<Waker>,
}

enum Slot {
    Free,
    /// The kernel holds (or is about to get) the operation's SQE.
    InFlight {
        op: Op,
        retries: u32,
        /// The task waiting for the result.
        waker: Option<Waker>,
        /// The request future is gone: drop the operation when it completes.
        abandoned: bool,
    },
    /// Completed; waiting for the request future to take the result.
    Done {
        op: Op,
        result: io::Result<usize>,
    },
}

impl Ring {
    fn start(&self, mut op: Op) -> Result<Ticket, Op> {
        let Ok(mut state) = self.state.try_borrow_mut() else {
            return Err(op);
        };
        if state.closed {
            return Err(op);
        }
        let Some(index) = state.free.pop() else {
            return Err(op);
        };
        let entry = op.sqe(index as u64);
        // The slot owns the operation before its SQE can reach the kernel.
        state.slots[index] = Slot::InFlight {
            op,
            retries: 0,
            waker: None,
            abandoned: false,
        };
        // SAFETY: the SQE points at the buffer and names the file of the
        // operation now owned by `slots[index]`, which stays `InFlight` (so
        // the operation is neither dropped nor handed out) until the
        // operation's final CQE is reaped; a drained or leaked ring never
        // frees it earlier (see `Drop for Ring`).
        let pushed = unsafe { state.uring.submission().push(&entry) }.is_ok();
        if !pushed {
            // Cannot happen: the SQ holds one SQE per slot.
            let Slot::InFlight { op, .. } = std::mem::replace(&mut state.slots[index], Slot::Free)
            else {
                unreachable!("the slot was just filled");
            };
            state.free.push(index);
            return Err(op);
        }
        state.in_flight += 1;
        state.started += 1;
        state.unsubmitted = true;
        let driver = state.driver.take();
        drop(state);
        if let Some(driver) = driver {
            driver.wake();
        }
        Ok(Ticket {
            ring: self.id,
            slot: index,
            finished: false,
        })
    }

    /// One round of the driver; see the module docs.
    fn drive(&self, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..MAX_PASSES_PER_POLL {
            let signalled = match self.eventfd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => {
                    // Consume the signal before running completion work, so
                    // work added after this pass signals again.
                    drain_eventfd(guard.get_inner());
                    guard.clear_ready();
                    true
                }
                Poll::Ready(Err(error)) => {
                    // Not expected for an eventfd; completions are still
                    // reaped by the passes that submissions cause.
                    tracing::error!(%error, "Polling the eventfd of a per-thread io_uring failed");
                    false
                }
                Poll::Pending => false,
            };
            let mut state = self.state.borrow_mut();
            if !(signalled || state.unsubmitted || state.again) {
                state.driver = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let reaped = state.pass(0);
            // The kernel runs a bounded batch of deferred completion work
            // per `io_uring_enter` and does not signal the eventfd for what
            // it left over, so a pass that reaped anything is followed by
            // another. (Left-over work that posts no CQE at all, e.g. a
            // request the kernel re-issues, is picked up by the next signal.)
            state.again = reaped > 0;
            let mut wakers = std::mem::take(&mut state.wakers);
            drop(state);
            for waker in wakers.drain(..) {
                waker.wake();
            }
            let mut state = self.state.borrow_mut();
            state.wakers = wakers;
            if state.again {
                // Pass again after the tasks just woken have run: their new
                // requests then go in with the same `io_uring_enter`.
                state.driver = None;
                drop(state);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl State {
    /// Submits every pushed SQE, runs deferred completion work, waits for
    /// `want` completions, and reaps every CQE. Returns the CQEs reaped.
    fn pass(&mut self, want: u32) -> usize {
        let to_submit = self.uring.submission().len() as u32;
        // SAFETY: every SQE in the SQ refers to an operation owned by an
        // `InFlight` slot (see `Ring::start` and `State::complete`), which
        // keeps its buffer and file alive until the final CQE is reaped.
        let entered = unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, want, ENTER_GETEVENTS, None)
        };
        if let Err(error) = entered
            && !matches!(
                error.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
            )
        {
            // In-flight memory cannot be released without completions, so
            // the only safe reaction is to try again on the next pass.
            tracing::error!(%error, "io_uring_enter on a per-thread ring failed");
        }
        self.unsubmitted = !self.uring.submission().is_empty();
        let mut reaped = 0;
        loop {
            let Some(cqe) = self.uring.completion().next() else {
                break;
            };
            reaped += 1;
            self.complete(cqe.user_data() as usize, cqe.result());
        }
        reaped
    }

    fn complete(&mut self, index: usize, res: i32) {
        let Some(Slot::InFlight {
            op,
            retries,
            waker,
            abandoned,
        }) = self.slots.get_mut(index)
        else {
            tracing::error!(
                index,
                "Completion for an unknown slot of a per-thread io_uring"
            );
            return;
        };
        let result = match op.advance(res, retries) {
            Step::Continue => {
                let entry = op.sqe(index as u64);
                // SAFETY: as in `Ring::start`: the slot stays `InFlight`,
                // owning the operation the SQE points into, until the final
                // CQE.
                if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                    self.unsubmitted = true;
                    return;
                }
                // Cannot happen (one SQE per slot); fail the operation
                // rather than lose track of it.
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            }
            Step::Finish(result) => result,
        };
        if let Some(waker) = waker.take() {
            self.wakers.push(waker);
        }
        let abandoned = *abandoned;
        let Slot::InFlight { op, .. } = std::mem::replace(&mut self.slots[index], Slot::Free)
        else {
            unreachable!("matched above");
        };
        self.in_flight -= 1;
        if abandoned {
            // The kernel is done with it and nobody waits: drop it.
            drop(op);
            self.free.push(index);
        } else {
            self.slots[index] = Slot::Done { op, result };
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let state = self.state.get_mut();
        state.closed = true;
        let mut failures = 0;
        while state.in_flight > 0 && failures < 1000 {
            let before = state.in_flight;
            state.pass(1);
            if state.in_flight == before {
                failures += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            } else {
                failures = 0;
            }
        }
        for waker in state.wakers.drain(..) {
            waker.wake();
        }
        if state.in_flight > 0 {
            // Only reachable if the kernel keeps refusing to enter. It may
            // still write into these buffers, so leak them (and the ring,
            // whose closing would not wait for them either).
            tracing::error!(
                in_flight = state.in_flight,
                "Per-thread io_uring dropped with operations in flight; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut state.slots));
        }
    }
}

/// A request started on a thread's ring: resolves to the operation (with its
/// buffer) and its result.
///
/// Holds only indices, so it is `Send`; see the module docs for why it must
/// still be polled on the thread that started it.
///
/// # Cancel safety
/// Dropping it does not cancel the operation: the ring keeps the operation
/// until the kernel has completed it, then drops it.
pub(super) struct Ticket {
    ring: u64,
    slot: usize,
    finished: bool,
}

/// The request's ring is gone or not on this thread.
pub(super) struct Lost;

impl Future for Ticket {
    type Output = Result<(Op, io::Result<usize>), Lost>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.finished {
            return Poll::Ready(Err(Lost));
        }
        let Some(ring) = current_with_id(self.ring) else {
            self.finished = true;
            return Poll::Ready(Err(Lost));
        };
        let mut state = ring.state.borrow_mut();
        let state = &mut *state;
        match &mut state.slots[self.slot] {
            Slot::InFlight { waker, .. } => {
                match waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            Slot::Done { .. } => {
                let Slot::Done { op, result } =
                    std::mem::replace(&mut state.slots[self.slot], Slot::Free)
                else {
                    unreachable!("matched above");
                };
                state.free.push(self.slot);
                self.finished = true;
                Poll::Ready(Ok((op, result)))
            }
            Slot::Free => {
                self.finished = true;
                Poll::Ready(Err(Lost))
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let Some(ring) = current_with_id(self.ring) else {
            // Not on the ring's thread (or the ring is gone): the slot keeps
            // the operation until the ring is dropped.
            return;
        };
        let Ok(mut state) = ring.state.try_borrow_mut() else {
            return;
        };
        let state = &mut *state;
        match &mut state.slots[self.slot] {
            Slot::InFlight {
                abandoned, waker, ..
            } => {
                *abandoned = true;
                *waker = None;
            }
            Slot::Done { .. } => {
                state.slots[self.slot] = Slot::Free;
                state.free.push(self.slot);
            }
            Slot::Free => {}
        }
    }
}

/// Drives a thread's ring: a task on the thread's runtime.
struct Driver {
    ring: u64,
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match current_with_id(self.ring) {
            Some(ring) => ring.drive(cx),
            None => Poll::Ready(()),
        }
    }
}

/// Creates the ring, with deferred completion work where the kernel has it.
/// Returns the ring and whether completion work is deferred.
fn create_ring(entries: u32) -> Result<(IoUring, bool), Error> {
    let cq_entries = entries.saturating_mul(2);
    let deferred = IoUring::builder()
        .setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries);
    let (uring, deferred) = match deferred {
        Ok(uring) => (uring, true),
        // EINVAL: a kernel older than 6.1 that lacks the flags.
        Err(_) => (
            IoUring::builder()
                .setup_cqsize(cq_entries)
                .build(entries)
                .map_err(|source| Error::CreateRing { entries, source })?,
            false,
        ),
    };
    // Saves the kernel a file-table lookup per io_uring_enter; optional.
    if let Err(error) = uring.submitter().register_ring_fd() {
        tracing::debug!(%error, "Cannot register a per-thread io_uring's own fd");
    }
    Ok((uring, deferred))
}

/// Creates a non-blocking eventfd for completion notifications.
fn nonblocking_eventfd() -> io::Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
    Ok(OwnedFd::from(fd))
}

/// Resets the eventfd's counter (one non-blocking read).
fn drain_eventfd(fd: &OwnedFd) {
    let mut counter = [0u8; 8];
    // EAGAIN (nothing to read) is fine; an eventfd read cannot fail
    // otherwise with an 8-byte buffer.
    let _ = nix::unistd::read(fd, &mut counter);
}

#[cfg(test)]
mod tests;
