//! The transmission phase of one connection (spec "Transmission").
//!
//! Shape: the connection task reads requests in order, checks them, and
//! spawns one task per request that calls the [`BlockDevice`]; each request
//! task sends its reply to a single writer task that batches whatever replies
//! are ready into one vectored write. Replies therefore leave in completion
//! order (the spec allows any order) and never interleave.
//!
//! Invariants:
//! - Memory is bounded per connection and per process: a request (and its
//!   reply) holds a permit of [`Limits::max_requests`] and, for reads and
//!   writes, permits for its payload bytes out of [`Limits::max_bytes`] of
//!   its connection and then out of [`PROCESS_MAX_BYTES`], shared by every
//!   connection of every server in the process; the reader stops reading
//!   the socket while it waits for permits (back-pressure). Permits are
//!   released only once the reply has been written. A client that does not
//!   read its replies stalls its own connection, and holds at most its
//!   connection's share of the process budget. Permits are always taken in
//!   the same order (connection, then process) and a request that holds
//!   process permits needs nothing more to finish, so waiting cannot
//!   deadlock.
//! - Bad input never panics and closes this connection only: a bad request
//!   magic, a write payload above [`MAX_PAYLOAD`] (we will not read it, so
//!   the stream cannot be resynchronised) or a client vanishing mid-request.
//!   Everything else gets an error reply and the connection continues.
//! - Device operations are never cancelled: on any ending (disconnect,
//!   `NBD_CMD_DISC`, violation, server shutdown) the requests already read
//!   run to completion before the connection is closed, so a half-done
//!   write is never abandoned by dropping its future.
//!
//! To support a new command, add it to [`check`] (valid flags and range
//! rules) and to [`execute`].

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, SemaphorePermit, mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error};

use super::export::{Export, MAX_PAYLOAD};
use super::protocol::{self, Command, ReplyHeader, Request, cmd_flag, errno};
use crate::block::{BlockDevice, BlockError};
use crate::buf::IoBuf;

/// Most replies written with one vectored write.
const MAX_BATCH: usize = 64;

/// How long the writer may keep sending queued replies once the server is
/// stopping, before the connection is cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Per-connection bounds on requests in flight (read but not yet replied).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most requests in flight. 128 matches the queue depth of Linux's nbd
    /// driver, so the kernel is never throttled by us.
    pub max_requests: usize,
    /// Most payload bytes (write data held, read data returned) in flight.
    /// A single request larger than this waits until it is alone.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_requests: 128,
            // One maximal request, or 32 of 1 MiB: enough to keep a fast
            // device busy (a queue depth of 8 already saturates sequential
            // 1 MiB writes here), and with `PROCESS_MAX_BYTES` it lets at
            // least two connections make progress at full size.
            max_bytes: MAX_PAYLOAD as usize,
        }
    }
}

/// Most payload bytes in flight over all connections of all servers in the
/// process: what bounds the agent's memory for request data, whatever the
/// number of exports and connections. 64 MiB keeps the agent under the
/// 128 MiB it is meant to fit in (docs/benchmarks.md), leaving room for the
/// idle buffer pool (`buf::pool`, at most 32 MiB) and everything else.
pub const PROCESS_MAX_BYTES: usize = 2 * MAX_PAYLOAD as usize;

/// The permits of [`PROCESS_MAX_BYTES`].
static PROCESS_BYTES: Semaphore = Semaphore::const_new(PROCESS_MAX_BYTES);

/// Errors that end the transmission phase by closing the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading requests failed.
    #[error("Reading requests failed")]
    Read(#[source] io::Error),
    /// Writing replies failed.
    #[error("Writing replies failed")]
    Write(#[source] io::Error),
    /// The client closed the connection in the middle of a request header
    /// or write payload.
    #[error("Client disconnected in the middle of a request")]
    Truncated,
    /// A request header was malformed (bad magic).
    #[error("Malformed request")]
    Protocol(#[source] protocol::Error),
    /// An `NBD_CMD_WRITE` announced more payload than we accept; reading
    /// past it is impossible without buffering it, so the stream is lost.
    #[error("Write request announces {length} bytes of payload, more than {MAX_PAYLOAD}")]
    PayloadTooLarge {
        /// Announced payload length in bytes.
        length: u32,
    },
}

impl Error {
    /// True if the client broke the protocol (worth a warning), false if the
    /// connection merely went away.
    pub fn is_violation(&self) -> bool {
        matches!(self, Error::Protocol(_) | Error::PayloadTooLarge { .. })
    }
}

/// How the transmission phase ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    Closed,
    /// The server is stopping.
    Shutdown,
}

/// Serves requests on `export` until the client disconnects, breaks the
/// protocol, or `shutdown` turns true (or its sender is dropped).
///
/// Before returning, every request already read has been executed and its
/// reply written (or dropped if the client is gone), and the write side has
/// been shut down.
///
/// # Errors
/// See [`Error`]; the connection must be closed in every case.
///
/// # Cancel safety
/// Not cancel safe: use `shutdown` to stop it. Dropping the future mid-way
/// aborts request tasks, and with them device operations.
pub async fn serve<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    export: Arc<Export>,
    structured_replies: bool,
    limits: Limits,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Ended, Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (replies, queue) = mpsc::unbounded_channel();
    let writer_failed = Arc::new(Notify::new());
    let writer_task = tokio::spawn(write_replies(writer, queue, writer_failed.clone()));
    let permits = Permits {
        requests: Arc::new(Semaphore::new(limits.max_requests.max(1))),
        bytes: Arc::new(Semaphore::new(limits.max_bytes.max(1))),
        max_bytes: limits.max_bytes.max(1),
    };
    let device = export.device.clone();
    let mut tasks = JoinSet::new();

    let result = loop {
        while let Some(done) = tasks.try_join_next() {
            log_task_panic(done);
        }
        let next = tokio::select! {
            biased;
            _ = stop_requested(shutdown) => break Ok(Ended::Shutdown),
            // The writer's error is reported below, once it has been joined.
            () = writer_failed.notified() => break Ok(Ended::Closed),
            next = read_request(&mut reader, &*device, structured_replies, &permits) => next,
        };
        match next {
            Ok(Next::Execute(job)) => {
                let device = device.clone();
                let replies = replies.clone();
                tasks.spawn(async move {
                    let reply = execute(job, &*device, structured_replies).await;
                    // Fails only if the writer is gone; the reply (and its
                    // permits) is then simply dropped.
                    let _ = replies.send(reply);
                });
            }
            Ok(Next::Reply(reply)) => {
                let _ = replies.send(reply);
            }
            Ok(Next::Disconnect) => break Ok(Ended::Disconnect),
            Ok(Next::Closed) => break Ok(Ended::Closed),
            Err(e) => break Err(e),
        }
    };

    while let Some(done) = tasks.join_next().await {
        log_task_panic(done);
    }
    drop(replies);
    let written = finish_writer(writer_task, shutdown).await;
    match (result, written) {
        (Err(e), _) => Err(e),
        // Replies to a client that hung up cannot be delivered; that is
        // the hang-up, not a second failure.
        (Ok(Ended::Closed), Err(_)) => Ok(Ended::Closed),
        (Ok(_), Err(e)) => Err(Error::Write(e)),
        (Ok(ended), Ok(())) => Ok(ended),
    }
}

/// Resolves once the server asks connections to stop (or its sender is
/// gone).
///
/// # Cancel safety
/// Cancel safe.
pub async fn stop_requested(shutdown: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

fn log_task_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        error!(
            error = &e as &dyn std::error::Error,
            "NBD request task failed"
        );
    }
}

/// Waits for the writer to drain its queue; once the server is stopping it
/// gets [`SHUTDOWN_GRACE`] before it is aborted, so a client that stopped
/// reading cannot hold up shutdown.
async fn finish_writer(
    mut task: JoinHandle<io::Result<()>>,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    let joined = tokio::select! {
        joined = &mut task => joined,
        () = stop_requested(shutdown) => match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                task.abort();
                return Err(io::Error::new(io::ErrorKind::TimedOut, "Client did not read its replies"));
            }
        },
    };
    joined.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// The permits that bound one connection's requests in flight.
struct Permits {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl Permits {
    /// Waits for room for one more request carrying `payload` bytes.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled wait holds nothing.
    async fn acquire(&self, payload: usize) -> Held {
        // The semaphores are never closed, so acquiring cannot fail.
        let request = self.requests.clone().acquire_owned().await.ok();
        let bytes = match payload.min(self.max_bytes) {
            0 => None,
            n => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                self.bytes.clone().acquire_many_owned(n).await.ok()
            }
        };
        let process_bytes = match payload.min(PROCESS_MAX_BYTES) {
            0 => None,
            n => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                PROCESS_BYTES.acquire_many(n).await.ok()
            }
        };
        Held {
            _request: request,
            _bytes: bytes,
            _process_bytes: process_bytes,
        }
    }
}

/// Permits held by a request until its reply has been written.
struct Held {
    _request: Option<OwnedSemaphorePermit>,
    _bytes: Option<OwnedSemaphorePermit>,
    _process_bytes: Option<SemaphorePermit<'static>>,
}

/// A checked request ready to run on the device.
struct Job {
    request: Request,
    /// The `NBD_CMD_WRITE` payload.
    payload: Option<IoBuf>,
    held: Held,
}

/// One reply queued for the writer.
struct Reply {
    header: ReplyHeader,
    data: Option<IoBuf>,
    _held: Held,
}

impl Reply {
    fn ok(request: &Request, held: Held) -> Self {
        Self {
            header: ReplyHeader::simple(request.handle, 0),
            data: None,
            _held: held,
        }
    }

    fn error(request: &Request, structured_replies: bool, error: u32, held: Held) -> Self {
        // With structured replies a read must never get a simple reply, not
        // even an early error (spec "Structured reply chunk message").
        let header = if structured_replies && request.command == Command::Read {
            ReplyHeader::error_chunk(request.handle, error)
        } else {
            ReplyHeader::simple(request.handle, error)
        };
        Self {
            header,
            data: None,
            _held: held,
        }
    }

    fn read(request: &Request, structured_replies: bool, data: IoBuf, held: Held) -> Self {
        let header = match (structured_replies, data.len()) {
            (false, _) => ReplyHeader::simple(request.handle, 0),
            // An OFFSET_DATA chunk must carry at least one byte.
            (true, 0) => ReplyHeader::none_chunk(request.handle),
            (true, len) => ReplyHeader::offset_data(
                request.handle,
                request.offset,
                u32::try_from(len).unwrap_or(u32::MAX),
            ),
        };
        Self {
            header,
            data: Some(data),
            _held: held,
        }
    }
}

/// What the reader does next.
enum Next {
    Execute(Job),
    /// A reply decided without the device (a refused request).
    Reply(Reply),
    Disconnect,
    Closed,
}

/// Reads and checks the next request.
///
/// # Cancel safety
/// Not cancel safe: a cancelled read loses the bytes consumed so far, so the
/// connection must be closed afterwards (which is what every caller does).
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    device: &dyn BlockDevice,
    structured_replies: bool,
    permits: &Permits,
) -> Result<Next, Error> {
    if reader.fill_buf().await.map_err(Error::Read)?.is_empty() {
        return Ok(Next::Closed);
    }
    let mut header = [0u8; protocol::REQUEST_HEADER_LEN];
    reader.read_exact(&mut header).await.map_err(read_error)?;
    let request = Request::decode(&header).map_err(Error::Protocol)?;
    if request.command == Command::Disc {
        return Ok(Next::Disconnect);
    }
    if request.command == Command::Write && request.length > MAX_PAYLOAD {
        return Err(Error::PayloadTooLarge {
            length: request.length,
        });
    }

    let payload_len = match request.command {
        Command::Read | Command::Write if request.length <= MAX_PAYLOAD => request.length as usize,
        _ => 0,
    };
    let held = permits.acquire(payload_len).await;

    let payload = if request.command == Command::Write {
        // `read_payload` fills every byte or fails, and on failure the
        // buffer is dropped unread.
        let mut buf = IoBuf::for_overwrite(payload_len);
        read_payload(reader, &mut buf).await?;
        Some(buf)
    } else {
        None
    };

    match check(&request, device.size_bytes(), structured_replies) {
        Ok(()) => Ok(Next::Execute(Job {
            request,
            payload,
            held,
        })),
        Err(error) => {
            debug!(
                command = ?request.command,
                offset = request.offset,
                length = request.length,
                flags = request.flags,
                error,
                "Refusing request"
            );
            Ok(Next::Reply(Reply::error(
                &request,
                structured_replies,
                error,
                held,
            )))
        }
    }
}

fn read_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Truncated
    } else {
        Error::Read(e)
    }
}

/// Reads a write payload: the bytes already buffered are copied, the rest is
/// read from the socket straight into `buf`, skipping the read buffer.
///
/// # Cancel safety
/// Not cancel safe (see [`read_request`]).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut [u8],
) -> Result<(), Error> {
    let buffered = reader.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    reader.consume(n);
    if n < buf.len() {
        // The read buffer is empty now, so reading past it keeps the order.
        reader
            .get_mut()
            .read_exact(&mut buf[n..])
            .await
            .map_err(read_error)?;
    }
    Ok(())
}

/// Checks flags and range of a request (spec "Request types", "Error
/// values"); returns the NBD error to reply with if it must be refused.
fn check(request: &Request, size_bytes: u64, structured_replies: bool) -> Result<(), u32> {
    let df = if structured_replies { cmd_flag::DF } else { 0 };
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised
    // (spec "Command flags").
    let allowed = cmd_flag::FUA
        | match request.command {
            Command::Read => df,
            Command::WriteZeroes => cmd_flag::NO_HOLE,
            Command::Write | Command::Flush | Command::Trim => 0,
            // Unknown commands (and ones we do not advertise, such as
            // NBD_CMD_CACHE): the spec asks for EINVAL. Only NBD_CMD_WRITE
            // carries a payload ("Request message"), so none is read; a
            // client that sent one anyway desynchronises the stream, and its
            // payload then fails the next magic check, closing the
            // connection.
            Command::Disc | Command::Other(_) => return Err(errno::EINVAL),
        };
    if request.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    let in_range =
        BlockError::check_range(request.offset, u64::from(request.length), size_bytes).is_ok();
    match request.command {
        Command::Read if request.length > MAX_PAYLOAD => Err(errno::EINVAL),
        // The spec ("Error values") wants ENOSPC for writes beyond the end
        // and EINVAL for reads and trims.
        Command::Read | Command::Trim if !in_range => Err(errno::EINVAL),
        Command::Write | Command::WriteZeroes if !in_range => Err(errno::ENOSPC),
        // NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM carry no payload, so lengths
        // above the advertised maximum cost nothing; Linux's nbd driver
        // ignores the maximum for them, so they are accepted. NBD_CMD_FLUSH
        // ignores its reserved offset and length.
        _ => Ok(()),
    }
}

/// Runs a checked request on the device and builds its reply.
async fn execute(job: Job, device: &dyn BlockDevice, structured_replies: bool) -> Reply {
    let Job {
        request,
        payload,
        held,
    } = job;
    let fua = request.flags & cmd_flag::FUA != 0;
    let offset = request.offset;
    let length = u64::from(request.length);
    let result = match request.command {
        Command::Read => {
            let data = if length == 0 {
                Ok(IoBuf::zeroed(0))
            } else {
                device.read(offset, request.length as usize).await
            };
            match data {
                Ok(data) if data.len() == request.length as usize => {
                    return Reply::read(&request, structured_replies, data, held);
                }
                Ok(data) => {
                    error!(
                        offset,
                        length,
                        returned = data.len(),
                        "Block device returned a read of the wrong length"
                    );
                    return Reply::error(&request, structured_replies, errno::EIO, held);
                }
                Err(e) => Err(e),
            }
        }
        Command::Write => match payload {
            Some(data) if length > 0 => device.write(offset, data, fua).await,
            _ => Ok(()),
        },
        Command::Flush => device.flush().await,
        Command::Trim if length == 0 => Ok(()),
        Command::Trim => match device.trim(offset, length).await {
            // The device has no FUA trim, so a flush makes it durable.
            Ok(()) if fua => device.flush().await,
            result => result,
        },
        Command::WriteZeroes if length == 0 => Ok(()),
        Command::WriteZeroes => {
            let punch_hole = request.flags & cmd_flag::NO_HOLE == 0;
            device.write_zeroes(offset, length, punch_hole, fua).await
        }
        // `check` refuses these before a job is made.
        Command::Disc | Command::Other(_) => {
            return Reply::error(&request, structured_replies, errno::EINVAL, held);
        }
    };
    match result {
        Ok(()) => Reply::ok(&request, held),
        Err(e) => {
            debug!(
                command = ?request.command,
                offset,
                length,
                error = &e as &dyn std::error::Error,
                "Block device request failed"
            );
            let error = protocol::error_value(e.errno());
            Reply::error(&request, structured_replies, error, held)
        }
    }
}

/// The writer task: writes replies in batches until every sender is gone,
/// then shuts the write side down. On failure it wakes `failed` so the reader
/// stops too, and drops the remaining replies (releasing their permits).
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::UnboundedReceiver<Reply>,
    failed: Arc<Notify>,
) -> io::Result<()> {
    let result = async {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            write_batch(&mut writer, &batch).await?;
            batch.clear();
        }
        writer.shutdown().await
    }
    .await;
    if result.is_err() {
        failed.notify_one();
    }
    result
}

/// Writes the headers and data of `batch` with as few system calls as the
/// socket allows.
async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, batch: &[Reply]) -> io::Result<()> {
    let mut slices = Vec::with_capacity(batch.len() * 2);
    for reply in batch {
        slices.push(IoSlice::new(reply.header.as_bytes()));
        if let Some(data) = reply.data.as_deref().filter(|d| !d.is_empty()) {
            slices.push(IoSlice::new(data));
        }
    }
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        let n = writer.write_vectored(remaining).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, n);
    }
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    #[test]
    fn range_errors_follow_the_spec() {
        let size = 1 << 20;
        let past = |c| request(c, 0, size - 512, 1024);
        assert_eq!(check(&past(Command::Read), size, false), Err(errno::EINVAL));
        assert_eq!(check(&past(Command::Trim), size, false), Err(errno::EINVAL));
        assert_eq!(
            check(&past(Command::Write), size, false),
            Err(errno::ENOSPC)
        );
        assert_eq!(
            check(&past(Command::WriteZeroes), size, false),
            Err(errno::ENOSPC)
        );
        let overflow = request(Command::Read, 0, u64::MAX, 2);
        assert_eq!(check(&overflow, size, false), Err(errno::EINVAL));
        let inside = request(Command::Read, 0, size - 512, 512);
        assert_eq!(check(&inside, size, false), Ok(()));
        let huge_read = request(Command::Read, 0, 0, MAX_PAYLOAD + 1);
        assert_eq!(check(&huge_read, u64::MAX, false), Err(errno::EINVAL));
        let huge_zeroes = request(Command::WriteZeroes, 0, 0, u32::MAX);
        assert_eq!(check(&huge_zeroes, u64::MAX, false), Ok(()));
    }

    #[test]
    fn flags_are_checked_per_command() {
        let size = 1 << 20;
        let zeroes = request(
            Command::WriteZeroes,
            cmd_flag::NO_HOLE | cmd_flag::FUA,
            0,
            512,
        );
        assert_eq!(check(&zeroes, size, false), Ok(()));
        let write_no_hole = request(Command::Write, cmd_flag::NO_HOLE, 0, 512);
        assert_eq!(check(&write_no_hole, size, false), Err(errno::EINVAL));
        let fast_zero = request(Command::WriteZeroes, cmd_flag::FAST_ZERO, 0, 512);
        assert_eq!(check(&fast_zero, size, false), Err(errno::EINVAL));
        let df = request(Command::Read, cmd_flag::DF, 0, 512);
        assert_eq!(check(&df, size, false), Err(errno::EINVAL));
        assert_eq!(check(&df, size, true), Ok(()));
        let unknown = request(Command::Other(protocol::cmd::CACHE), 0, 0, 512);
        assert_eq!(check(&unknown, size, false), Err(errno::EINVAL));
    }
}
