//! The io_uring I/O engine: OS threads that own io_uring rings and execute
//! reads, writes, syncs and fallocates on behalf of tokio tasks.
//!
//! # What it owns
//!
//! [`IoEngine`] owns a fixed set of ring threads. Each thread owns one
//! [`io_uring::IoUring`], an inbox that submitters push requests into, and an
//! eventfd that wakes it while it waits for completions. Every request holds
//! its buffer ([`IoBuf`]) and its file (`Arc<File>`) until the kernel has
//! posted the request's completion; only then does the ring thread drop them
//! or hand them back through a oneshot channel. This is the memory-safety
//! invariant of the whole module: **the ring thread never frees, moves out of
//! or returns memory the kernel may still read or write**, even when the task
//! that issued the request has been cancelled.
//!
//! A thread may also own a ring of its own ([`LocalRing`], module `local`):
//! requests polled on such a thread are submitted and reaped there, with no
//! hop to a ring thread (NBD connection threads do this; see
//! `docs/adr/0008-per-connection-io-rings.md`). Callers cannot tell the two
//! paths apart; the memory-safety invariant is the same.
//!
//! # What it must never do
//!
//! - Block a tokio worker thread on I/O: callers only push to an inbox and
//!   await a oneshot channel. (Dropping the last [`IoEngine`] handle is the one
//!   exception: it joins the ring threads, which wait for in-flight I/O.)
//! - Lose bytes: a short read or write is continued from where it stopped; a
//!   read returns fewer bytes than asked only at end of file, a write returns
//!   either every byte or an error.
//! - Interpret data or alignment: callers (e.g. [`crate::replica::data`])
//!   align offsets and lengths for `O_DIRECT` themselves.
//!
//! # Extending it
//!
//! A new operation needs an `op::Op` variant, its SQE in `Op::sqe`, its
//! completion accounting in `Op::advance`, its opcode in
//! [`REQUIRED_OPCODES`], and an async method on [`IoEngine`] that goes
//! through `buf_op` or `unit_op` (which pick the local ring or a ring
//! thread).

mod local;
mod op;
mod ring;

use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use io_uring::{IoUring, Probe, opcode};
use tokio::sync::oneshot;

use crate::buf::IoBuf;
pub use local::{Error as LocalRingError, LocalRing};
use op::Op;
use ring::{Inbox, Reply, Request, RingThread, Shared};

/// Opcodes the engine submits, with the names used in error messages.
///
/// The eventfd that wakes a ring thread is read with `Read` as well, so this
/// list is complete.
pub const REQUIRED_OPCODES: &[(u8, &str)] = &[
    (opcode::Read::CODE, "Read"),
    (opcode::Write::CODE, "Write"),
    (opcode::Fsync::CODE, "Fsync"),
    (opcode::Fallocate::CODE, "Fallocate"),
];

/// Errors of starting the I/O engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `threads` or `queue_depth` was zero.
    #[error("I/O engine needs at least one thread and a queue depth of at least one")]
    Config,
    /// The kernel refused to create a ring (io_uring disabled by
    /// `kernel.io_uring_disabled`, seccomp, or memory limits).
    #[error(
        "Cannot create an io_uring ring of {queue_depth} entries on kernel {kernel} \
         (is io_uring disabled by sysctl kernel.io_uring_disabled or a seccomp profile?)"
    )]
    CreateRing {
        /// Requested submission queue depth.
        queue_depth: u32,
        /// Running kernel release.
        kernel: String,
        /// Error of io_uring_setup(2).
        #[source]
        source: io::Error,
    },
    /// The kernel cannot report which opcodes it supports (Linux older than 5.6).
    #[error("Cannot probe io_uring opcodes on kernel {kernel} (Linux 5.6 or later is required)")]
    Probe {
        /// Running kernel release.
        kernel: String,
        /// Error of IORING_REGISTER_PROBE.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks opcodes the engine needs.
    #[error("Kernel {kernel} lacks the io_uring opcodes {} (Linux 5.6 or later is required)", missing.join(", "))]
    MissingOpcodes {
        /// Running kernel release.
        kernel: String,
        /// Names of the unsupported opcodes.
        missing: Vec<&'static str>,
    },
    /// The eventfd that wakes a ring thread could not be created.
    #[error("Cannot create the wakeup eventfd of an I/O thread")]
    EventFd(#[source] io::Error),
    /// A ring thread could not be spawned.
    #[error("Cannot spawn I/O thread {index}")]
    Spawn {
        /// Index of the thread.
        index: usize,
        /// Error of thread creation.
        #[source]
        source: io::Error,
    },
}

/// A handle to one ring thread.
struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A pool of threads, each owning an io_uring ring, that execute file I/O for
/// async callers.
///
/// Requests are spread over the threads round-robin. Every method takes an
/// owned buffer and returns it with the result, so no memory is borrowed
/// across the kernel boundary.
///
/// Dropping the last handle stops accepting requests, lets every queued and
/// in-flight request finish, and joins the threads; this blocks the dropping
/// thread until the in-flight I/O completes.
pub struct IoEngine {
    workers: Vec<Worker>,
    next: AtomicUsize,
}

impl IoEngine {
    /// Starts `threads` ring threads, each with a submission queue of
    /// `queue_depth` entries (rounded up to a power of two by the kernel).
    ///
    /// Probes the kernel first and fails with [`Error::MissingOpcodes`] naming
    /// what is missing. Other errors: [`Error::Config`] for zero arguments,
    /// [`Error::CreateRing`], [`Error::Probe`], [`Error::EventFd`],
    /// [`Error::Spawn`].
    pub fn start(threads: usize, queue_depth: u32) -> Result<Arc<IoEngine>, Error> {
        if threads == 0 || queue_depth == 0 {
            return Err(Error::Config);
        }
        let mut rings = Vec::with_capacity(threads);
        for _ in 0..threads {
            rings.push(create_ring(queue_depth)?);
        }
        if let Some(first) = rings.first() {
            probe(first)?;
        }

        let mut engine = IoEngine {
            workers: Vec::with_capacity(threads),
            next: AtomicUsize::new(0),
        };
        for (index, ring) in rings.into_iter().enumerate() {
            let shared = Arc::new(Shared {
                inbox: Mutex::new(Inbox::default()),
                wake_fd: eventfd().map_err(Error::EventFd)?,
            });
            let thread_shared = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("ballast-uring-{index}"))
                .spawn(move || RingThread::new(ring, thread_shared).run())
                // `engine` is dropped on this error path, which stops and
                // joins the threads already started.
                .map_err(|source| Error::Spawn { index, source })?;
            engine.workers.push(Worker {
                shared,
                thread: Some(thread),
            });
        }
        tracing::info!(threads, queue_depth, "Started the io_uring I/O engine");
        Ok(Arc::new(engine))
    }

    /// Number of ring threads.
    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Reads `buf.len()` bytes at byte `offset` of `file` into `buf`.
    ///
    /// Returns the buffer and the number of bytes read, which is less than
    /// `buf.len()` only when the file ends first. For an `O_DIRECT` file,
    /// `offset`, `buf.len()` and the buffer address must be aligned as the
    /// file system requires, or the kernel answers `EINVAL`.
    ///
    /// Errors: the kernel's error for the read, or an error if the engine is
    /// shutting down. If a ring thread died (a bug), the returned buffer is
    /// empty.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the read: the ring (thread or
    /// local) keeps the buffer until the kernel is done with it and then
    /// frees it.
    pub async fn read(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: IoBuf,
    ) -> (IoBuf, io::Result<usize>) {
        let op = Op::Read {
            file: Arc::clone(file),
            offset,
            buf,
            done: 0,
        };
        self.buf_op(op).await
    }

    /// Writes all `buf.len()` bytes of `buf` at byte `offset` of `file`.
    ///
    /// With `dsync` the write is submitted with `RWF_DSYNC`: when it returns
    /// `Ok` the data (and the metadata needed to read it) is durable, like a
    /// write followed by `fdatasync` (FUA).
    ///
    /// Returns the buffer and `buf.len()` on success; a write never succeeds
    /// partially. Errors: the kernel's error (e.g. `ENOSPC`), a
    /// `WriteZero` error if the kernel made no progress, or an error if the
    /// engine is shutting down. If a ring thread died (a bug), the returned
    /// buffer is empty.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the write: it may still reach the
    /// file. The ring (thread or local) keeps the buffer until the kernel is
    /// done with it.
    pub async fn write(
        &self,
        file: &Arc<File>,
        offset: u64,
        buf: IoBuf,
        dsync: bool,
    ) -> (IoBuf, io::Result<usize>) {
        let op = Op::Write {
            file: Arc::clone(file),
            offset,
            buf,
            done: 0,
            dsync,
        };
        self.buf_op(op).await
    }

    /// Flushes `file` to stable storage: `fdatasync` semantics with
    /// `datasync`, full `fsync` (data and all metadata) without.
    ///
    /// Errors: the kernel's error (`EIO` means written data was lost), or an
    /// error if the engine is shutting down.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the sync.
    pub async fn fsync(&self, file: &Arc<File>, datasync: bool) -> io::Result<()> {
        let op = Op::Fsync {
            file: Arc::clone(file),
            datasync,
        };
        self.unit_op(op).await
    }

    /// Calls `fallocate(file, mode, offset, len)` (offsets and lengths in
    /// bytes; `mode` is a set of `libc::FALLOC_FL_*` flags).
    ///
    /// Errors: the kernel's error (`EOPNOTSUPP` if the file system lacks the
    /// mode, `ENOSPC`), or an error if the engine is shutting down.
    ///
    /// # Cancel safety
    /// Dropping the future does not cancel the call.
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let op = Op::Fallocate {
            file: Arc::clone(file),
            mode,
            offset,
            len,
        };
        self.unit_op(op).await
    }

    /// Runs a read or write on the calling thread's [`LocalRing`] if it has
    /// one with room, else on a ring thread.
    async fn buf_op(&self, op: Op) -> (IoBuf, io::Result<usize>) {
        let op = match local::start(op) {
            Ok(ticket) => {
                return match ticket.await {
                    Ok((op, result)) => (op.into_buf(), result),
                    Err(local::Lost) => (IoBuf::zeroed(0), Err(thread_lost())),
                };
            }
            Err(op) => op,
        };
        let (tx, rx) = oneshot::channel();
        let request = Request {
            op,
            reply: Reply::Buf(tx),
        };
        if let Err(request) = self.worker().submit(request) {
            return (request.into_buf(), Err(stopped()));
        }
        rx.await
            .unwrap_or_else(|_| (IoBuf::zeroed(0), Err(thread_lost())))
    }

    /// As [`buf_op`](Self::buf_op), for operations without a buffer.
    async fn unit_op(&self, op: Op) -> io::Result<()> {
        let op = match local::start(op) {
            Ok(ticket) => {
                return match ticket.await {
                    Ok((_, result)) => result.map(drop),
                    Err(local::Lost) => Err(thread_lost()),
                };
            }
            Err(op) => op,
        };
        let (tx, rx) = oneshot::channel();
        let request = Request {
            op,
            reply: Reply::Unit(tx),
        };
        if self.worker().submit(request).is_err() {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(thread_lost()))
    }

    fn worker(&self) -> &Shared {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        &self.workers[index].shared
    }
}

impl Drop for IoEngine {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.shared.close();
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take()
                && thread.join().is_err()
            {
                tracing::error!("An io_uring thread panicked");
            }
        }
        tracing::debug!("Stopped the io_uring I/O engine");
    }
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("threads", &self.workers.len())
            .finish()
    }
}

/// The error inside the [`io::Error`] of a request refused because the
/// engine is shutting down; see [`is_stopped`].
#[derive(Debug, thiserror::Error)]
#[error("I/O engine is shutting down")]
pub struct Stopped;

/// True if `error` means the engine refused the request because it is
/// shutting down (rather than the kernel failing it).
pub fn is_stopped(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<Stopped>())
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, Stopped)
}

fn thread_lost() -> io::Error {
    io::Error::other("I/O engine thread exited before completing the request")
}

/// Release of the running kernel, for error messages.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .ok()
        .and_then(|uts| uts.release().to_str().map(str::to_owned))
        .unwrap_or_else(|| "(unknown release)".to_owned())
}

fn create_ring(queue_depth: u32) -> Result<IoUring, Error> {
    // A CQ twice the SQ lets the ring thread keep one full SQ of requests in
    // flight while the previous batch's completions are still unreaped; the
    // thread also caps in-flight requests to the CQ size, so the CQ never
    // overflows.
    IoUring::builder()
        .setup_cqsize(queue_depth.saturating_mul(2))
        .build(queue_depth)
        .map_err(|source| Error::CreateRing {
            queue_depth,
            kernel: kernel_release(),
            source,
        })
}

/// Checks that `ring`'s kernel supports every opcode in [`REQUIRED_OPCODES`].
fn probe(ring: &IoUring) -> Result<(), Error> {
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|source| Error::Probe {
            kernel: kernel_release(),
            source,
        })?;
    let missing: Vec<&'static str> = REQUIRED_OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingOpcodes {
            kernel: kernel_release(),
            missing,
        })
    }
}

/// Creates a blocking eventfd.
///
/// Blocking on purpose: io_uring completes a read of a blocking eventfd when
/// it is signalled, whereas on an `O_NONBLOCK` one it may complete the read
/// with `EAGAIN` at once.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a valid descriptor that nothing else owns; the
    // `OwnedFd` becomes its only owner and closes it once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Shared {
    /// Queues `request` for the ring thread, waking it if it sleeps.
    /// Returns the request back if the engine is shutting down.
    fn submit(&self, request: Request) -> Result<(), Request> {
        let wake = {
            let mut inbox = self.inbox.lock();
            if inbox.closed {
                return Err(request);
            }
            inbox.requests.push(request);
            // The ring thread sets `sleeping` under this lock only after it
            // found the inbox empty, so either it sees this request or we see
            // the flag: no wakeup is lost.
            std::mem::take(&mut inbox.sleeping)
        };
        if wake {
            self.wake();
        }
        Ok(())
    }

    /// Stops accepting requests and wakes the ring thread so it winds down.
    fn close(&self) {
        self.inbox.lock().closed = true;
        self.wake();
    }

    fn wake(&self) {
        if let Err(error) = nix::unistd::write(&self.wake_fd, &1u64.to_ne_bytes()) {
            // Only possible if the counter would overflow u64, i.e. the ring
            // thread has not read it for 2^64 wakeups; it is awake anyway.
            tracing::warn!(%error, "Cannot signal an io_uring thread");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
