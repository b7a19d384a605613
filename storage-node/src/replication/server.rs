//! The replica server: serves this node's [`FencedReplica`]s to remote
//! targets over the replica protocol ([`super::protocol`]).
//!
//! # Shape
//!
//! [`ReplicaServer::start`] binds a TCP listener and spawns an accept loop.
//! Each connection gets one task in which a reader (frames in) and a writer
//! (responses out) run side by side; every request executes in its own task,
//! so requests on one connection run concurrently and are answered in the
//! order they complete:
//!
//! ```text
//! socket ─► reader: header ─► [permits] ─► payload ─► FencedReplica::submit
//!                                                     (one task: admit, I/O,
//!                                                      queue the response) ─┐
//! socket ◄─ writer: drain the queue, batch into one buffer, flush when idle ◄┘
//! ```
//!
//! # Bounds and back-pressure
//!
//! Each connection may have at most [`ServerConfig::max_in_flight_requests`]
//! requests and [`ServerConfig::max_in_flight_bytes`] bytes (payloads in and
//! out) executing. The reader takes the permits for a request after reading
//! its header and before reading its payload; when none are left it stops
//! reading, and TCP flow control pushes back on the client.
//!
//! # Bad input
//!
//! A request that fails its CRC is answered with CHECKSUM, any other
//! malformed frame with BAD_REQUEST; then the reader stops, requests already
//! executing are answered, and the connection is closed. Other connections
//! are not affected. A frame is executed only once all of it checked out, so
//! corrupted data is never written.
//!
//! # What it must never do
//!
//! Panic on network input, read more than it has permits for, or execute any
//! part of a frame that failed validation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::fence::{Command, Outcome};
use super::protocol::{
    self, Flags, Op, RequestHeader, ResponseHeader, Status, read_payload, read_request_header,
};
use super::{
    Error, FencedReplica, MAX_EXTENTS_PER_RESPONSE, MAX_PAYLOAD_BYTES, MAX_REGIONS_PER_REQUEST,
    ReplicaIo, writer,
};
use crate::buf::IoBuf;

/// Maps volume ids to the replicas this node serves. The agent implements
/// it over its map of open replicas.
pub trait ReplicaResolver: Send + Sync + 'static {
    /// Returns the fenced replica of `volume_id` on this node, or `None`
    /// (answered with NOT_FOUND). Called for every request: it must be a
    /// quick lookup that never blocks.
    fn resolve(&self, volume_id: &str) -> Option<Arc<FencedReplica>>;
}

/// Limits of a [`ReplicaServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests executing at once per connection.
    pub max_in_flight_requests: usize,
    /// Payload bytes (requests and responses) held at once per connection;
    /// at least [`MAX_PAYLOAD_BYTES`] so every request can run.
    pub max_in_flight_bytes: usize,
    /// How long writing a batch of responses may take before the connection
    /// is considered dead and closed.
    pub write_timeout: Duration,
    /// How long [`ReplicaServer::stop`] waits for connections to answer the
    /// requests they are executing before cutting them off.
    pub stop_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_in_flight_requests: 256,
            max_in_flight_bytes: 2 * MAX_PAYLOAD_BYTES,
            write_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// A running replica server; see the module docs.
///
/// Dropping it without [`ReplicaServer::stop`] aborts every connection at
/// once (requests already executing still complete on their replicas, but
/// are not answered), as a crash would.
#[derive(Debug)]
pub struct ReplicaServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl ReplicaServer {
    /// Listens on `listen` with the default [`ServerConfig`] and serves the
    /// replicas `resolver` finds.
    ///
    /// Errors: [`Error::Bind`].
    pub async fn start(
        listen: SocketAddr,
        resolver: Arc<dyn ReplicaResolver>,
    ) -> Result<ReplicaServer, Error> {
        Self::start_with(listen, resolver, ServerConfig::default()).await
    }

    /// Listens on `listen` with `config`.
    ///
    /// Errors: [`Error::Bind`].
    pub async fn start_with(
        listen: SocketAddr,
        resolver: Arc<dyn ReplicaResolver>,
        mut config: ServerConfig,
    ) -> Result<ReplicaServer, Error> {
        config.max_in_flight_bytes = config.max_in_flight_bytes.max(MAX_PAYLOAD_BYTES);
        config.max_in_flight_requests = config.max_in_flight_requests.max(1);
        let bind_err = |source| Error::Bind {
            addr: listen,
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let (shutdown, stopping) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, resolver, Arc::new(config), stopping));
        info!(addr = %local_addr, "Replica server listening");
        Ok(ReplicaServer {
            local_addr,
            shutdown,
            accept: Some(accept),
        })
    }

    /// The address the server listens on (with the port chosen by the kernel
    /// when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets every connection answer the requests it is
    /// executing (within [`ServerConfig::stop_grace`]), and closes them.
    ///
    /// # Cancel safety
    /// Cancel safe: if the future is dropped, the server still stops: in the
    /// background once the future was polled, else at once as on drop.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        info!(addr = %self.local_addr, "Replica server stopped");
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            // Aborting the accept loop drops its JoinSet, which aborts every
            // connection task.
            accept.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    resolver: Arc<dyn ReplicaResolver>,
    config: Arc<ServerConfig>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopping.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        Arc::clone(&resolver),
                        Arc::clone(&config),
                        stopping.clone(),
                    ));
                }
                Err(error) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(%error, "Cannot accept a replica connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let grace = config.stop_grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = connections.len(),
            "Replica connections did not drain in time; closing them"
        );
        connections.shutdown().await;
    }
}

/// Bytes the reader buffers from the socket.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How long a connection closed for bad input keeps reading (and discarding)
/// what the peer still sends.
const LINGER: Duration = Duration::from_secs(1);

/// A response on its way to the writer.
struct Response {
    header: [u8; protocol::RESPONSE_HEADER_LEN],
    payload: Payload,
}

impl writer::Frame for Response {
    fn head(&self) -> &[u8] {
        &self.header
    }

    fn body(&self) -> &[u8] {
        self.payload.as_bytes()
    }
}

enum Payload {
    None,
    Data(IoBuf),
    Bytes(Vec<u8>),
}

impl Payload {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Data(buf) => buf,
            Payload::Bytes(bytes) => bytes,
        }
    }
}

impl Response {
    fn new(status: Status, request_id: u64, detail: u64, payload: Payload) -> Response {
        let bytes = payload.as_bytes();
        let header = ResponseHeader {
            status,
            request_id,
            detail,
            payload_len: bytes.len() as u32,
            payload_crc: crc32c::crc32c(bytes),
        }
        .encode();
        Response { header, payload }
    }

    fn error(request_id: u64, status: Status, detail: u64, message: &str) -> Response {
        let message = protocol::truncate_message(message).as_bytes().to_vec();
        Response::new(status, request_id, detail, Payload::Bytes(message))
    }

    fn from_error(request_id: u64, error: &Error) -> Response {
        let (status, detail) = error.status();
        Response::error(request_id, status, detail, &crate::error_chain(error))
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    resolver: Arc<dyn ReplicaResolver>,
    config: Arc<ServerConfig>,
    stopping: watch::Receiver<bool>,
) {
    if let Err(error) = stream.set_nodelay(true) {
        warn!(%peer, %error, "Cannot set TCP_NODELAY on a replica connection");
    }
    debug!(%peer, "Replica connection opened");
    let (read, write) = stream.into_split();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, read);
    let (responses, outbox) = mpsc::unbounded_channel();
    // Reader and writer share this task, so aborting it (a dropped server)
    // closes the whole socket at once, as a crash would. The writer ends
    // once every executing request has answered (each holds a sender).
    let (outcome, written) = tokio::join!(
        read_requests(&mut reader, peer, resolver, &config, responses, stopping),
        writer::write_frames(write, outbox, config.write_timeout),
    );
    if let Err(error) = written {
        warn!(%peer, %error, "Cannot send replica responses");
    }
    match outcome {
        Ok(()) => debug!(%peer, "Replica connection closed"),
        Err(error) => {
            warn!(%peer, error = %crate::error_chain(&error), "Closed a replica connection after bad input");
            // Read what the peer still sends until it closes, so that the
            // close is not a reset that could destroy the answer in flight.
            let mut sink = tokio::io::sink();
            let drain = tokio::io::copy(&mut reader, &mut sink);
            let _ = tokio::time::timeout(LINGER, drain).await;
        }
    }
}

/// Reads requests until the peer closes, the server stops, or a frame is
/// malformed (answered, then returned as the error).
async fn read_requests(
    reader: &mut BufReader<OwnedReadHalf>,
    peer: SocketAddr,
    resolver: Arc<dyn ReplicaResolver>,
    config: &ServerConfig,
    responses: mpsc::UnboundedSender<Response>,
    mut stopping: watch::Receiver<bool>,
) -> Result<(), protocol::Error> {
    let requests = Arc::new(Semaphore::new(config.max_in_flight_requests));
    let bytes = Arc::new(Semaphore::new(config.max_in_flight_bytes));
    loop {
        let next = tokio::select! {
            // Stopping: answer what is executing, take nothing new.
            _ = stopping.changed() => return Ok(()),
            // The writer failed: the connection is dead.
            () = responses.closed() => return Err(protocol::Error::Closed),
            next = read_request_header(reader) => next,
        };
        let (header, volume_id) = match next {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(error) => return Err(refuse(&responses, error)),
        };
        let cost = request_cost(&header);
        // Back-pressure: no further reading until the permits are free.
        let permits = async {
            let request = Arc::clone(&requests).acquire_owned().await;
            let bytes = Arc::clone(&bytes).acquire_many_owned(cost).await;
            (request, bytes)
        };
        let (Ok(request_permit), Ok(bytes_permit)) = permits.await else {
            return Ok(());
        };
        let payload = read_payload(
            reader,
            header.request_id,
            header.payload_len,
            header.payload_crc,
        )
        .await;
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => return Err(refuse(&responses, error)),
        };
        if let Err(reason) = check_shape(&header, &payload) {
            let error = protocol::Error::Malformed {
                request_id: header.request_id,
                reason,
            };
            return Err(refuse(&responses, error));
        }
        let Some(replica) = resolver.resolve(&volume_id) else {
            debug!(%peer, volume.id = %volume_id, "No replica for a requested volume");
            let error = Error::VolumeNotFound { volume_id };
            let _ = responses.send(Response::from_error(header.request_id, &error));
            continue;
        };
        let command = match command(&header, payload) {
            Ok(command) => command,
            Err(error) => {
                let _ = responses.send(Response::from_error(header.request_id, &error));
                continue;
            }
        };
        let responses = responses.clone();
        let executing = Arc::clone(&replica);
        // One task per request, which answers as soon as the I/O is done.
        replica.submit(header.epoch, header.session, command, move |outcome| {
            let response = respond(&executing, &header, outcome);
            let _ = responses.send(response);
            drop((request_permit, bytes_permit));
        });
    }
}

/// Answers a malformed frame and returns its error.
fn refuse(responses: &mpsc::UnboundedSender<Response>, error: protocol::Error) -> protocol::Error {
    match error {
        protocol::Error::Closed | protocol::Error::Io(_) => {}
        _ => {
            let status = if error.is_checksum() {
                Status::Checksum
            } else {
                Status::BadRequest
            };
            let message = error.to_string();
            let _ = responses.send(Response::error(error.request_id(), status, 0, &message));
        }
    }
    error
}

/// Checks a request whose frame passed [`read_request_header`] and
/// [`read_payload`] the way the server does before it executes it: its
/// lengths fit its op (otherwise BAD_REQUEST closes the connection) and its
/// op's arguments are valid (otherwise the request alone is refused).
/// Returns the reason of a refusal.
///
/// The server runs these same checks inline; this entry point lets the fuzz
/// targets (`fuzz/`) drive them without a replica behind the server.
///
/// # Errors
/// The reason the request would be refused.
pub fn check_request(header: &RequestHeader, payload: IoBuf) -> Result<(), String> {
    check_shape(header, &payload)?;
    command(header, payload)
        .map(drop)
        .map_err(|error| crate::error_chain(&error))
}

/// Bytes of payload a request holds while it executes (what it brings plus
/// what it will answer with), at most [`MAX_PAYLOAD_BYTES`] and at least a
/// page, so that many tiny requests also add up.
fn request_cost(header: &RequestHeader) -> u32 {
    let answer = match header.op {
        Op::Read => header.length,
        Op::RegionHashes => MAX_PAYLOAD_BYTES as u64,
        Op::AllocatedExtents => (MAX_EXTENTS_PER_RESPONSE * protocol::EXTENT_BYTES) as u64,
        Op::Write | Op::Flush | Op::Trim | Op::WriteZeroes | Op::Info => 0,
    };
    let cost = answer
        .max(u64::from(header.payload_len))
        .clamp(4096, MAX_PAYLOAD_BYTES as u64);
    cost as u32
}

/// Checks that the lengths of a well-framed request fit its op.
fn check_shape(header: &RequestHeader, payload: &IoBuf) -> Result<(), String> {
    let expected_payload = match header.op {
        Op::Write => header.length,
        Op::RegionHashes => 8,
        Op::Read | Op::Flush | Op::Trim | Op::WriteZeroes | Op::AllocatedExtents | Op::Info => 0,
    };
    if payload.len() as u64 != expected_payload {
        return Err(format!(
            "{} with length {} carries {} payload bytes",
            header.op,
            header.length,
            payload.len()
        ));
    }
    if header.op == Op::Read && header.length > MAX_PAYLOAD_BYTES as u64 {
        return Err(format!(
            "READ of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
            header.length
        ));
    }
    Ok(())
}

/// The command a well-formed request asks for.
fn command(header: &RequestHeader, payload: IoBuf) -> Result<Command, Error> {
    let (offset, length) = (header.offset, header.length);
    let fua = header.flags.contains(Flags::FUA);
    Ok(match header.op {
        // Bounded by `check_shape`.
        Op::Read => Command::Read {
            offset,
            length: length as usize,
        },
        Op::Write => Command::Write {
            offset,
            data: payload,
            fua,
        },
        Op::Flush => Command::Flush,
        Op::Trim => Command::Trim { offset, length },
        Op::WriteZeroes => Command::WriteZeroes {
            offset,
            length,
            punch_hole: !header.flags.contains(Flags::NO_HOLE),
            fua,
        },
        Op::RegionHashes => {
            let region_bytes =
                protocol::decode_region_bytes(header.request_id, &payload).map_err(|e| {
                    Error::InvalidRequest {
                        reason: e.to_string(),
                    }
                })?;
            // Bounds the response; the replica bounds the bytes hashed.
            if region_bytes == 0 || length.div_ceil(region_bytes) > MAX_REGIONS_PER_REQUEST {
                return Err(Error::InvalidRequest {
                    reason: format!(
                        "{length} bytes in regions of {region_bytes} bytes exceed \
                         {MAX_REGIONS_PER_REQUEST} regions"
                    ),
                });
            }
            Command::RegionHashes {
                offset,
                length,
                region_bytes,
            }
        }
        Op::AllocatedExtents => Command::AllocatedExtents {
            offset,
            length,
            max_extents: MAX_EXTENTS_PER_RESPONSE,
        },
        Op::Info => Command::Info,
    })
}

/// The response to a request that was executed.
fn respond(
    replica: &FencedReplica,
    header: &RequestHeader,
    outcome: Result<Outcome, Error>,
) -> Response {
    let id = header.request_id;
    let payload = match outcome {
        Ok(Outcome::Done) => Payload::None,
        Ok(Outcome::Data(data)) => Payload::Data(data),
        Ok(Outcome::Info(info)) => Payload::Bytes(protocol::encode_info(&info).to_vec()),
        Ok(Outcome::Hashes(hashes)) => Payload::Bytes(protocol::encode_region_hashes(&hashes)),
        Ok(Outcome::Extents(extents, complete_to)) => {
            Payload::Bytes(protocol::encode_extents(&extents, complete_to))
        }
        Err(error) => {
            if !matches!(error, Error::StaleEpoch { .. } | Error::StaleSession { .. }) {
                debug!(
                    volume.id = %replica.volume_id(),
                    replica.id = %replica.replica_id(),
                    epoch = header.epoch,
                    op = %header.op,
                    error = %crate::error_chain(&error),
                    "Replica request failed"
                );
            }
            return Response::from_error(id, &error);
        }
    };
    Response::new(Status::Ok, id, 0, payload)
}
