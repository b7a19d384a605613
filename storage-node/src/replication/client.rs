//! The replica client: a target's connection to one replica on another node.
//!
//! # Shape
//!
//! A [`ReplicaClient`] is one logical connection to a remote agent's data
//! address for one volume, shared by every task of the target. It pipelines:
//! many requests are outstanding at once and complete in whatever order the
//! server answers them.
//!
//! ```text
//! callers ─► [budget] ─► register id → oneshot ─► outbox ─► writer task ─► socket
//! callers ◄─ oneshot ◄─ reader task: match response id ◄──────────────────── socket
//! ```
//!
//! - Every request gets a fresh id and a oneshot channel in the connection's
//!   pending map; the reader task completes it when its response arrives.
//! - In-flight payload bytes (sent plus expected back, at least a page per
//!   request) are bounded by a semaphore ([`ClientConfig::max_in_flight_bytes`]);
//!   callers wait for budget before anything is sent.
//! - The writer task batches queued frames into few system calls
//!   (the `writer` module).
//!
//! # Failures
//!
//! - A request without a response within [`ClientConfig::request_timeout`]
//!   fails with [`Error::Timeout`], and the connection is torn down because
//!   its state is unknown: every other request on it fails with
//!   [`Error::Disconnected`].
//! - A socket error, a closed connection, or a malformed or corrupt response
//!   (CRC mismatch) tears the connection down the same way.
//! - Every connection carries a new session number, higher than any
//!   earlier connection of this process ([`protocol`], sessions): once a
//!   request of the new connection is admitted by the replica, requests
//!   still queued on a torn-down connection are refused (STALE_SESSION)
//!   instead of executing late.
//! - The next request after a failure reconnects, within
//!   [`ClientConfig::connect_timeout`]; a failed connect is
//!   [`Error::Connect`]. There is no retry of requests: whether a failed
//!   request executed is unknown, and only the target can decide what that
//!   means for the in-sync set.
//!
//! # What it must never do
//!
//! Complete a request with another request's response, hand out bytes that
//! failed their CRC, or keep waiting on a connection it has given up on.

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, warn};

use super::protocol::{
    self, EncodedRequest, Flags, Op, RequestHeader, ResponseHeader, Status, read_payload,
    read_response_header,
};
use super::{
    Error, Extent, Location, MAX_PAYLOAD_BYTES, MAX_VOLUME_ID_BYTES, RegionHash, ReplicaInfo,
    ReplicaIo, check_payload_len, check_region_bytes, hash_chunk_bytes, writer,
};
use crate::buf::IoBuf;

/// Settings of a [`ReplicaClient`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long a request may wait for its response once sent.
    pub request_timeout: Duration,
    /// How long establishing a connection may take.
    pub connect_timeout: Duration,
    /// Payload bytes in flight at once (sent plus expected back); raised to
    /// at least [`MAX_PAYLOAD_BYTES`] so every request can be sent.
    pub max_in_flight_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_in_flight_bytes: 2 * MAX_PAYLOAD_BYTES,
        }
    }
}

/// The next connection session of this process. Sessions only need to grow
/// per (epoch, replica), and one epoch belongs to one target in one
/// process, so one counter for every client of the process keeps them
/// growing even when a target replaces a client with a new one. Starts at
/// 1: session 0 stays below every connection.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// Bytes a request counts against the budget at least, so that many small
/// requests are bounded too.
const MIN_REQUEST_COST: usize = 4096;

/// A pipelined connection to one remote replica; see the module docs.
pub struct ReplicaClient {
    addr: SocketAddr,
    volume_id: String,
    config: ClientConfig,
    budget: Arc<Semaphore>,
    next_id: AtomicU64,
    /// The live connection, if any.
    current: Mutex<Option<Arc<Connection>>>,
    /// Held while connecting, so concurrent callers share one attempt.
    connecting: tokio::sync::Mutex<()>,
}

impl ReplicaClient {
    /// A client for the replica of `volume_id` served at `addr`. Connects
    /// lazily, on the first request.
    ///
    /// Errors: [`Error::InvalidRequest`] if `volume_id` is empty or longer
    /// than [`MAX_VOLUME_ID_BYTES`].
    pub fn new(addr: SocketAddr, volume_id: &str, config: ClientConfig) -> Result<Self, Error> {
        if volume_id.is_empty() || volume_id.len() > MAX_VOLUME_ID_BYTES {
            return Err(Error::InvalidRequest {
                reason: format!(
                    "volume id of {} bytes is not between 1 and {MAX_VOLUME_ID_BYTES}",
                    volume_id.len()
                ),
            });
        }
        let budget = config.max_in_flight_bytes.max(MAX_PAYLOAD_BYTES);
        Ok(Self {
            addr,
            volume_id: volume_id.to_owned(),
            config,
            budget: Arc::new(Semaphore::new(budget)),
            next_id: AtomicU64::new(1),
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The replica's data address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// True when a connection is established and has not failed.
    pub fn is_connected(&self) -> bool {
        self.current.lock().as_ref().is_some_and(|c| !c.is_failed())
    }

    /// Returns the live connection, connecting if there is none.
    async fn connection(&self) -> Result<Arc<Connection>, Error> {
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(connection) = self.live() {
            return Ok(connection);
        }
        let connection = self.connect().await?;
        *self.current.lock() = Some(Arc::clone(&connection));
        Ok(connection)
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .as_ref()
            .filter(|c| !c.is_failed())
            .cloned()
    }

    async fn connect(&self) -> Result<Arc<Connection>, Error> {
        let addr = self.addr;
        let connect_err = |source| Error::Connect { addr, source };
        let stream = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        let (read, write) = stream.into_split();
        let (outbox, queued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            addr,
            volume_id: self.volume_id.clone(),
            state: Mutex::new(State {
                waiters: HashMap::new(),
                failed: None,
                tasks: Vec::new(),
            }),
        });
        let reader = tokio::spawn(read_responses(
            BufReader::with_capacity(64 * 1024, read),
            Arc::clone(&shared),
        ));
        let writing = Arc::clone(&shared);
        // A write stuck for a request timeout has timed out its requests.
        let write_timeout = self.config.request_timeout;
        let writer = tokio::spawn(async move {
            if let Err(error) = writer::write_frames(write, queued, write_timeout).await {
                writing.fail(protocol::Error::Io(error));
            }
        });
        shared.adopt(&[reader.abort_handle(), writer.abort_handle()]);
        // Taken after the connection is up, so a connection opened later
        // always carries a higher session than this one.
        let session = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        debug!(volume.id = %self.volume_id, %addr, session, "Connected to replica");
        Ok(Arc::new(Connection {
            shared,
            outbox,
            session,
        }))
    }

    /// Sends one request and waits for its response; `decode` turns an OK
    /// response into the result. Any protocol error tears the connection
    /// down.
    async fn call<T>(
        &self,
        call: Call,
        decode: impl FnOnce(u64, IoBuf) -> Result<T, protocol::Error>,
    ) -> Result<T, Error> {
        let Call {
            op,
            flags,
            epoch,
            offset,
            length,
            body,
            answer_bytes,
        } = call;
        let cost = body
            .as_bytes()
            .len()
            .max(answer_bytes)
            .clamp(MIN_REQUEST_COST, MAX_PAYLOAD_BYTES);
        let _budget = self
            .budget
            .acquire_many(cost as u32)
            .await
            .map_err(|_| self.disconnected(protocol::Error::ClientClosed))?;
        let connection = self.connection().await?;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let payload = body.as_bytes();
        let header = RequestHeader {
            op,
            flags,
            request_id,
            epoch,
            session: connection.session,
            offset,
            length,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        }
        .encode(&self.volume_id);
        let (done, response) = oneshot::channel();
        let shared = &connection.shared;
        shared.register(request_id, done)?;
        // Forgets the request if this future is dropped before its response.
        let registered = Registered { shared, request_id };
        if connection.outbox.send(Outgoing { header, body }).is_err() {
            return Err(self.disconnected(protocol::Error::Closed));
        }
        let reply = match tokio::time::timeout(self.config.request_timeout, response).await {
            Ok(Ok(reply)) => reply?,
            Ok(Err(_)) => return Err(self.disconnected(protocol::Error::Closed)),
            Err(_) => {
                warn!(
                    volume.id = %self.volume_id,
                    addr = %self.addr,
                    epoch,
                    %op,
                    timeout = ?self.config.request_timeout,
                    "Replica request timed out; dropping the connection"
                );
                shared.fail(protocol::Error::Abandoned);
                return Err(Error::Timeout {
                    addr: self.addr,
                    timeout: self.config.request_timeout,
                });
            }
        };
        drop(registered);
        let (header, payload) = reply;
        if header.status != Status::Ok {
            let session = connection.session;
            return Err(self.status_error(&header, payload, epoch, session, offset, length));
        }
        decode(request_id, payload).map_err(|error| {
            let error = Arc::new(error);
            shared.fail_shared(Arc::clone(&error));
            Error::Disconnected {
                addr: self.addr,
                source: error,
            }
        })
    }

    fn disconnected(&self, error: protocol::Error) -> Error {
        Error::Disconnected {
            addr: self.addr,
            source: Arc::new(error),
        }
    }

    /// The error a non-OK response stands for.
    fn status_error(
        &self,
        header: &ResponseHeader,
        payload: IoBuf,
        epoch: u64,
        session: u64,
        offset: u64,
        length: u64,
    ) -> Error {
        let message = String::from_utf8_lossy(&payload).into_owned();
        match header.status {
            Status::StaleEpoch => Error::StaleEpoch {
                request: epoch,
                current: header.detail,
            },
            Status::StaleSession => Error::StaleSession {
                request: session,
                current: header.detail,
            },
            Status::NotFound => Error::VolumeNotFound {
                volume_id: self.volume_id.clone(),
            },
            Status::OutOfRange => Error::OutOfRange {
                offset,
                length,
                size_bytes: header.detail,
            },
            Status::NoSpace => Error::NoSpace,
            Status::Unavailable => Error::Unavailable { reason: message },
            Status::IoError | Status::BadRequest | Status::Checksum | Status::Ok => Error::Remote {
                status: header.status,
                message,
            },
        }
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        if let Some(connection) = self.current.lock().take() {
            connection.shared.fail(protocol::Error::ClientClosed);
        }
    }
}

impl std::fmt::Debug for ReplicaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClient")
            .field("addr", &self.addr)
            .field("volume_id", &self.volume_id)
            .field("connected", &self.is_connected())
            .finish()
    }
}

#[async_trait]
impl ReplicaIo for ReplicaClient {
    fn volume_id(&self) -> &str {
        &self.volume_id
    }

    fn location(&self) -> Location {
        Location::Remote(self.addr)
    }

    async fn info(&self, epoch: u64) -> Result<ReplicaInfo, Error> {
        self.call(
            Call {
                answer_bytes: protocol::INFO_BYTES,
                ..Call::new(Op::Info, epoch)
            },
            |request_id, payload| protocol::decode_info(request_id, &payload),
        )
        .await
    }

    async fn read(&self, epoch: u64, offset: u64, length: usize) -> Result<IoBuf, Error> {
        check_payload_len(length)?;
        self.call(
            Call {
                offset,
                length: length as u64,
                answer_bytes: length,
                ..Call::new(Op::Read, epoch)
            },
            |request_id, payload| {
                if payload.len() != length {
                    return Err(protocol::Error::Malformed {
                        request_id,
                        reason: format!("READ of {length} bytes answered {}", payload.len()),
                    });
                }
                Ok(payload)
            },
        )
        .await
    }

    async fn write(
        &self,
        epoch: u64,
        offset: u64,
        data: Arc<IoBuf>,
        fua: bool,
    ) -> Result<(), Error> {
        check_payload_len(data.len())?;
        let length = data.len() as u64;
        self.call(
            Call {
                flags: Flags::NONE.with(Flags::FUA, fua),
                offset,
                length,
                body: Body::Data(data),
                ..Call::new(Op::Write, epoch)
            },
            expect_empty,
        )
        .await
    }

    async fn flush(&self, epoch: u64) -> Result<(), Error> {
        self.call(Call::new(Op::Flush, epoch), expect_empty).await
    }

    async fn trim(&self, epoch: u64, offset: u64, length: u64) -> Result<(), Error> {
        self.call(
            Call {
                offset,
                length,
                ..Call::new(Op::Trim, epoch)
            },
            expect_empty,
        )
        .await
    }

    async fn write_zeroes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), Error> {
        let flags = Flags::NONE
            .with(Flags::FUA, fua)
            .with(Flags::NO_HOLE, !punch_hole);
        self.call(
            Call {
                flags,
                offset,
                length,
                ..Call::new(Op::WriteZeroes, epoch)
            },
            expect_empty,
        )
        .await
    }

    async fn region_hashes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionHash>, Error> {
        check_region_bytes(region_bytes)?;
        let end = offset.saturating_add(length);
        let chunk = hash_chunk_bytes(region_bytes);
        let mut hashes = Vec::new();
        let mut start = offset;
        // At least one request, so an empty range checks the epoch.
        loop {
            let stop = end.min(start.saturating_add(chunk));
            let part_length = stop - start;
            let answer = part_length.div_ceil(region_bytes) as usize * protocol::REGION_HASH_BYTES;
            let part = self
                .call(
                    Call {
                        offset: start,
                        length: part_length,
                        body: Body::Small(protocol::encode_region_bytes(region_bytes)),
                        answer_bytes: answer,
                        ..Call::new(Op::RegionHashes, epoch)
                    },
                    |request_id, payload| {
                        protocol::decode_region_hashes(
                            request_id,
                            start,
                            part_length,
                            region_bytes,
                            &payload,
                        )
                    },
                )
                .await?;
            hashes.extend(part);
            start = stop;
            if start >= end {
                return Ok(hashes);
            }
        }
    }

    async fn allocated_extents(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, Error> {
        let end = offset.saturating_add(length);
        let mut extents = Vec::new();
        let mut start = offset;
        // Pages until the server says the list is complete; every page
        // advances (checked when decoding), so this ends.
        loop {
            let (page, complete_to) = self
                .call(
                    Call {
                        offset: start,
                        length: end - start,
                        answer_bytes: 8 + protocol::MAX_EXTENTS_PER_RESPONSE
                            * protocol::EXTENT_BYTES,
                        ..Call::new(Op::AllocatedExtents, epoch)
                    },
                    |request_id, payload| {
                        protocol::decode_extents(request_id, start, end, &payload)
                    },
                )
                .await?;
            extents.extend(page);
            if complete_to >= end {
                return Ok(extents);
            }
            start = complete_to;
        }
    }
}

fn expect_empty(request_id: u64, payload: IoBuf) -> Result<(), protocol::Error> {
    if !payload.is_empty() {
        return Err(protocol::Error::Malformed {
            request_id,
            reason: format!("{} unexpected payload bytes", payload.len()),
        });
    }
    Ok(())
}

/// One request, before it is encoded.
struct Call {
    op: Op,
    flags: Flags,
    epoch: u64,
    offset: u64,
    length: u64,
    body: Body,
    /// Payload bytes expected back, for the in-flight budget.
    answer_bytes: usize,
}

impl Call {
    /// A request for `op` under `epoch` with every other field empty.
    fn new(op: Op, epoch: u64) -> Call {
        Call {
            op,
            flags: Flags::NONE,
            epoch,
            offset: 0,
            length: 0,
            body: Body::None,
            answer_bytes: 0,
        }
    }
}

/// What a request sends after its header.
enum Body {
    None,
    Data(Arc<IoBuf>),
    Small([u8; 8]),
}

impl Body {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Body::None => &[],
            Body::Data(data) => data,
            Body::Small(bytes) => bytes,
        }
    }
}

/// A request on its way to the writer task.
struct Outgoing {
    header: EncodedRequest,
    body: Body,
}

impl writer::Frame for Outgoing {
    fn head(&self) -> &[u8] {
        self.header.as_bytes()
    }

    fn body(&self) -> &[u8] {
        self.body.as_bytes()
    }
}

/// A response: its header and payload.
type Reply = (ResponseHeader, IoBuf);

/// One TCP connection: the queue to its writer and the state its reader
/// shares with callers.
struct Connection {
    shared: Arc<Shared>,
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The session every request on this connection carries.
    session: u64,
}

impl Connection {
    fn is_failed(&self) -> bool {
        self.shared.state().failed.is_some()
    }
}

struct Shared {
    addr: SocketAddr,
    volume_id: String,
    state: Mutex<State>,
}

struct State {
    /// Requests awaiting a response, by id.
    waiters: HashMap<u64, oneshot::Sender<Result<Reply, Error>>>,
    /// Why the connection failed; once set, nothing new is registered.
    failed: Option<Arc<protocol::Error>>,
    /// The reader and writer tasks, aborted when the connection fails.
    tasks: Vec<AbortHandle>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn adopt(&self, tasks: &[AbortHandle]) {
        let mut state = self.state();
        if state.failed.is_some() {
            tasks.iter().for_each(AbortHandle::abort);
        } else {
            state.tasks.extend_from_slice(tasks);
        }
    }

    fn register(
        &self,
        request_id: u64,
        done: oneshot::Sender<Result<Reply, Error>>,
    ) -> Result<(), Error> {
        let mut state = self.state();
        if let Some(cause) = &state.failed {
            return Err(Error::Disconnected {
                addr: self.addr,
                source: Arc::clone(cause),
            });
        }
        state.waiters.insert(request_id, done);
        Ok(())
    }

    fn complete(&self, request_id: u64, reply: Reply) {
        // A response nobody waits for belongs to a request that timed out or
        // was cancelled; it is dropped.
        if let Some(done) = self.state().waiters.remove(&request_id) {
            let _ = done.send(Ok(reply));
        }
    }

    fn fail(&self, cause: protocol::Error) {
        self.fail_shared(Arc::new(cause));
    }

    /// Marks the connection failed, fails every waiting request, and stops
    /// the reader and writer (which closes the socket). Only the first cause
    /// is kept.
    fn fail_shared(&self, cause: Arc<protocol::Error>) {
        let (waiters, tasks) = {
            let mut state = self.state();
            if state.failed.is_some() {
                return;
            }
            state.failed = Some(Arc::clone(&cause));
            (
                std::mem::take(&mut state.waiters),
                std::mem::take(&mut state.tasks),
            )
        };
        if !matches!(*cause, protocol::Error::ClientClosed) {
            warn!(
                volume.id = %self.volume_id,
                addr = %self.addr,
                error = %cause,
                outstanding = waiters.len(),
                "Replica connection failed"
            );
        }
        for done in waiters.into_values() {
            let _ = done.send(Err(Error::Disconnected {
                addr: self.addr,
                source: Arc::clone(&cause),
            }));
        }
        tasks.iter().for_each(AbortHandle::abort);
    }
}

/// Removes a request from the pending map when dropped, so a cancelled
/// caller leaves nothing behind.
struct Registered<'a> {
    shared: &'a Shared,
    request_id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.state().waiters.remove(&self.request_id);
    }
}

/// Reads responses and hands each to its waiter until the connection fails.
async fn read_responses(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let cause = loop {
        let header = match read_response_header(&mut reader).await {
            Ok(Some(header)) => header,
            Ok(None) => break protocol::Error::Closed,
            Err(error) => break error,
        };
        let payload = read_payload(
            &mut reader,
            header.request_id,
            header.payload_len,
            header.payload_crc,
        )
        .await;
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => break error,
        };
        if header.status == Status::Checksum {
            // The server saw a corrupt frame and closes; which request it was
            // cannot be trusted.
            break protocol::Error::PeerChecksum;
        }
        shared.complete(header.request_id, (header, payload));
    };
    shared.fail(cause);
}
