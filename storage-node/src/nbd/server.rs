//! Listeners and the lifecycle of an NBD server.
//!
//! This module owns the sockets (a unix socket, optionally a TCP port), the
//! accept loops, one task per connection, and orderly shutdown. A connection
//! task runs `handshake` and then `transmission`; whatever happens inside it
//! is logged and ends that connection only.
//!
//! Invariants:
//! - [`NbdServer::stop`] returns only when every listener and connection task
//!   has finished and the socket file is gone; no task outlives it.
//! - Dropping an [`NbdServer`] without `stop` still tells every task to wind
//!   down (they finish in the background).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{Instrument, debug, error, warn};

use super::export::{Export, ExportTable};
use super::handshake::{self, Negotiated};
use super::transmission::{self, Limits, stop_requested};
use crate::uring::LocalRing;

/// Size in bytes of each connection's read buffer. Big enough to take in
/// a burst of pipelined request headers (and small write payloads) with one
/// system call; larger payloads bypass it.
const READ_BUFFER: usize = 64 << 10;

/// Entries of each connection's own io_uring ([`LocalRing`]): one per
/// request in flight at the default [`Limits::max_requests`]; requests
/// beyond it (read-modify-writes issue several operations) go to the I/O
/// engine's ring threads.
const LOCAL_RING_ENTRIES: u32 = 128;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Errors of starting an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An export name is not a valid NBD string or is used twice.
    #[error("Invalid export name {0:?}")]
    InvalidExportName(String),
    /// The socket path exists and is not a socket, or a server answers on it.
    #[error("Socket path {0} is in use")]
    SocketPathInUse(PathBuf),
    /// Removing a stale socket file failed.
    #[error("Cannot remove stale socket {path}")]
    RemoveStaleSocket {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding the unix socket failed.
    #[error("Cannot listen on unix socket {path}")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Restricting the socket file to its owner failed.
    #[error("Cannot set permissions of unix socket {path}")]
    SetPermissions {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Binding the TCP listener failed.
    #[error("Cannot listen on TCP address {addr}")]
    BindTcp {
        /// The requested address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A running NBD server: one unix socket (and optionally one TCP listener)
/// serving a table of exports.
///
/// Each volume target runs its own server with one export, which is also the
/// default export (selected by the empty name).
pub struct NbdServer {
    shutdown: watch::Sender<bool>,
    listeners: Vec<JoinHandle<()>>,
    unix_socket: PathBuf,
    socket_removed: bool,
    tcp_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
}

impl NbdServer {
    /// Starts serving `export` on the unix socket at `unix_socket` (created
    /// with mode 0600, replacing a stale socket file) and, if `tcp` is given,
    /// on that TCP address (port 0 picks a free port; see
    /// [`tcp_addr`](Self::tcp_addr)).
    ///
    /// # Errors
    /// [`Error::InvalidExportName`] if the name is not an NBD string (UTF-8,
    /// no NUL, at most 4096 bytes); [`Error::SocketPathInUse`] if the path is
    /// not a socket or another server answers on it; the bind and permission
    /// errors otherwise.
    ///
    /// # Panics
    /// Panics if called outside a tokio runtime.
    pub fn start(
        export: Export,
        unix_socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<Self, Error> {
        let exports = ExportTable::new(export, Vec::new()).map_err(Error::InvalidExportName)?;
        Self::start_with(exports, unix_socket, tcp, Limits::default())
    }

    /// Starts a server on an export table with explicit per-connection
    /// limits (used by tests).
    pub(crate) fn start_with(
        exports: ExportTable,
        unix_socket: &Path,
        tcp: Option<SocketAddr>,
        limits: Limits,
    ) -> Result<Self, Error> {
        let tcp_listener = tcp
            .map(|addr| {
                let bind = || {
                    let listener = std::net::TcpListener::bind(addr)?;
                    listener.set_nonblocking(true)?;
                    TcpListener::from_std(listener)
                };
                bind().map_err(|source| Error::BindTcp { addr, source })
            })
            .transpose()?;
        let tcp_addr = tcp_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .or(tcp);
        let unix_listener = bind_unix(unix_socket)?;

        let (shutdown, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            exports,
            limits,
            stats: Arc::new(Stats::default()),
        });
        let mut listeners = vec![tokio::spawn(accept_loop(
            Listener::Unix(unix_listener),
            shared.clone(),
            stop_rx.clone(),
        ))];
        if let Some(listener) = tcp_listener {
            listeners.push(tokio::spawn(accept_loop(
                Listener::Tcp(listener),
                shared.clone(),
                stop_rx,
            )));
        }
        debug!(socket = %unix_socket.display(), tcp = ?tcp_addr, "NBD server started");
        Ok(Self {
            shutdown,
            listeners,
            unix_socket: unix_socket.to_owned(),
            socket_removed: false,
            tcp_addr,
            stats: shared.stats.clone(),
        })
    }

    /// Number of client connections currently open (negotiating or
    /// transmitting).
    pub fn connections(&self) -> usize {
        self.stats.open.load(Ordering::Relaxed)
    }

    /// Number of client connections accepted since the server started.
    pub fn connections_accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    /// Path of the unix socket.
    pub fn unix_socket(&self) -> &Path {
        &self.unix_socket
    }

    /// Address of the TCP listener, if any (with the actual port when port 0
    /// was requested).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops the server: closes the listeners, lets every connection finish
    /// the requests it already read (errors new ones by closing), closes the
    /// connections, waits for all tasks and removes the socket file.
    ///
    /// A client that does not read its replies is cut off after a grace
    /// period; device operations in flight are always waited for.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for listener in std::mem::take(&mut self.listeners) {
            if let Err(e) = listener.await {
                error!(
                    error = &e as &dyn std::error::Error,
                    "NBD listener task failed"
                );
            }
        }
        self.remove_socket();
        debug!(socket = %self.unix_socket.display(), "NBD server stopped");
    }

    fn remove_socket(&mut self) {
        if !self.socket_removed {
            self.socket_removed = true;
            if let Err(e) = std::fs::remove_file(&self.unix_socket)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(
                    socket = %self.unix_socket.display(),
                    error = &e as &dyn std::error::Error,
                    "Cannot remove NBD socket"
                );
            }
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.remove_socket();
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("unix_socket", &self.unix_socket)
            .field("tcp_addr", &self.tcp_addr)
            .field("connections", &self.connections())
            .finish()
    }
}

/// Binds the unix socket, replacing a stale socket file but never a live
/// server's socket or a file of another kind.
fn bind_unix(path: &Path) -> Result<UnixListener, Error> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::SocketPathInUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| Error::RemoveStaleSocket {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(Error::SocketPathInUse(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::BindUnix {
        path: path.to_owned(),
        source,
    })?;
    // Only the agent (root) and the node plugin on the same node connect;
    // nobody else may read or write the volume.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        Error::SetPermissions {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// State shared by the listeners and connections of one server.
struct Shared {
    exports: ExportTable,
    limits: Limits,
    stats: Arc<Stats>,
}

#[derive(Default)]
struct Stats {
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// Counts a connection as open for as long as it lives.
struct OpenGuard(Arc<Stats>);

impl OpenGuard {
    fn new(stats: Arc<Stats>) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    /// Accepts one connection and describes its peer for logs.
    ///
    /// # Cancel safety
    /// Cancel safe (both tokio `accept`s are).
    async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let peer = match stream.peer_cred().ok().and_then(|c| c.pid()) {
                    Some(pid) => format!("unix:pid={pid}"),
                    None => "unix".to_owned(),
                };
                Ok((Stream::Unix(stream), peer))
            }
            Listener::Tcp(l) => {
                let (stream, addr) = l.accept().await?;
                // Replies are written in whole batches; Nagle would only
                // delay them.
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), format!("tcp:{addr}")))
            }
        }
    }
}

/// Accepts connections until shutdown, then waits for them to finish.
async fn accept_loop(listener: Listener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            () = stop_requested(&mut stop) => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    error!(error = &e as &dyn std::error::Error, "NBD connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    let span = tracing::debug_span!("nbd_connection", peer = %peer);
                    match stream.into_std() {
                        Ok(stream) => {
                            connections.spawn_blocking(move || {
                                connection_thread(stream, &peer, &shared, shutdown, span);
                            });
                        }
                        Err(e) => warn!(error = &e as &dyn std::error::Error, "Cannot hand an NBD connection to its thread"),
                    }
                }
                Err(e) => {
                    warn!(error = &e as &dyn std::error::Error, "Accepting an NBD connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    while let Some(done) = connections.join_next().await {
        if let Err(e) = done {
            error!(
                error = &e as &dyn std::error::Error,
                "NBD connection task failed"
            );
        }
    }
}

/// Runs one connection on the calling thread, in a runtime of its own, with
/// an io_uring of its own.
///
/// Each connection has a thread: its reader, request tasks and reply writer
/// then share one thread and wake each other without crossing to another
/// one. On a busy machine this halves the context switches per request
/// compared with running every connection on the agent's multi-threaded
/// runtime (see docs/benchmarks.md). The thread also owns a [`LocalRing`],
/// so the replica I/O of its requests is submitted and reaped on it too,
/// without the hop to an I/O engine thread and back
/// (docs/adr/0008-per-connection-io-rings.md). NBD clients open few
/// connections (Linux's nbd driver one per queue), so a thread each is
/// cheap.
fn connection_thread(
    stream: StdStream,
    peer: &str,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
    span: tracing::Span,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(
                error = &e as &dyn std::error::Error,
                "Cannot start the runtime of an NBD connection"
            );
            return;
        }
    };
    let local_ring = {
        let _context = runtime.enter();
        match LocalRing::install(LOCAL_RING_ENTRIES) {
            Ok(ring) => Some(ring),
            Err(e) => {
                // The I/O engine's threads serve the connection instead.
                warn_once_without_local_ring(&e);
                None
            }
        }
    };
    runtime.block_on(
        async move {
            match stream.into_tokio() {
                Ok(Stream::Unix(s)) => {
                    let (r, w) = s.into_split();
                    run_connection(r, w, peer, shared, shutdown).await;
                }
                Ok(Stream::Tcp(s)) => {
                    let (r, w) = s.into_split();
                    run_connection(r, w, peer, shared, shutdown).await;
                }
                Err(e) => {
                    warn!(
                        error = &e as &dyn std::error::Error,
                        "Cannot register an NBD connection with its runtime"
                    );
                }
            }
        }
        .instrument(span),
    );
    // Tasks first (a request future left over gives its operation up to
    // the ring), then the ring, which waits for operations in flight.
    drop(runtime);
    drop(local_ring);
}

/// Logs, once per process, that connections run without their own ring.
fn warn_once_without_local_ring(error: &crate::uring::LocalRingError) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            error = error as &dyn std::error::Error,
            "NBD connections use the I/O engine's threads (no per-connection io_uring)"
        );
    }
}

/// A connection between runtimes: accepted on the server's, served on its
/// own.
enum StdStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Stream {
    fn into_std(self) -> io::Result<StdStream> {
        match self {
            Stream::Unix(s) => s.into_std().map(StdStream::Unix),
            Stream::Tcp(s) => s.into_std().map(StdStream::Tcp),
        }
    }
}

impl StdStream {
    /// Registers the stream with the current runtime. `into_std` leaves
    /// it non-blocking, as tokio needs.
    fn into_tokio(self) -> io::Result<Stream> {
        match self {
            StdStream::Unix(s) => UnixStream::from_std(s).map(Stream::Unix),
            StdStream::Tcp(s) => TcpStream::from_std(s).map(Stream::Tcp),
        }
    }
}

/// Serves one client connection over any pair of byte streams, from the
/// greeting to the close, exactly as [`NbdServer`] serves a connection it
/// accepted: fixed newstyle negotiation on a table whose only (and default)
/// export is `export`, then the transmission phase with the default limits.
/// Returns once the client has gone, disconnected or broken the protocol
/// (which is logged, never returned).
///
/// It runs on the caller's runtime, without a listener, thread or io_uring
/// of its own: the fuzz targets (`fuzz/`) feed it their input as the
/// client's bytes.
///
/// # Errors
/// [`Error::InvalidExportName`] if the export's name is not an NBD string.
///
/// # Cancel safety
/// Not cancel safe (see [`NbdServer::stop`] for how a server stops its
/// connections); dropping the future mid-way aborts device operations.
pub async fn serve_stream<R, W>(read: R, write: W, export: Export) -> Result<(), Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let exports = ExportTable::new(export, Vec::new()).map_err(Error::InvalidExportName)?;
    let shared = Shared {
        exports,
        limits: Limits::default(),
        stats: Arc::new(Stats::default()),
    };
    // Held until the connection ends: a dropped sender means "stop".
    let (_running, shutdown) = watch::channel(false);
    run_connection(read, write, "stream", &shared, shutdown).await;
    Ok(())
}

/// Runs one connection from greeting to close. Never fails: every ending is
/// logged here, as a warning when the client broke the protocol.
async fn run_connection<R, W>(
    read: R,
    mut write: W,
    peer: &str,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let _open = OpenGuard::new(shared.stats.clone());
    debug!("NBD connection accepted");
    let mut reader = BufReader::with_capacity(READ_BUFFER, read);

    let negotiated = tokio::select! {
        () = stop_requested(&mut shutdown) => {
            debug!("Closing negotiating NBD connection: server stopping");
            return;
        }
        negotiated = handshake::negotiate(&mut reader, &mut write, &shared.exports) => negotiated,
    };
    let (export, structured_replies) = match negotiated {
        Ok(Negotiated::Transmission {
            export,
            structured_replies,
        }) => (export, structured_replies),
        Ok(Negotiated::Aborted) => {
            debug!("NBD client ended negotiation");
            return;
        }
        Err(e) if e.is_violation() => {
            warn!(
                peer,
                error = &e as &dyn std::error::Error,
                "Closing NBD connection: negotiation failed"
            );
            return;
        }
        Err(e) => {
            debug!(
                error = &e as &dyn std::error::Error,
                "NBD negotiation ended"
            );
            return;
        }
    };

    debug!(export = %export.name, structured_replies, "NBD transmission started");
    let name = export.name.clone();
    let ended = transmission::serve(
        reader,
        write,
        export,
        structured_replies,
        shared.limits,
        &mut shutdown,
    )
    .await;
    match ended {
        Ok(ended) => debug!(export = %name, ?ended, "NBD connection closed"),
        Err(e) if e.is_violation() => warn!(
            peer,
            export = %name,
            error = &e as &dyn std::error::Error,
            "Closing NBD connection: protocol violation"
        ),
        Err(e) => debug!(
            export = %name,
            error = &e as &dyn std::error::Error,
            "NBD connection closed"
        ),
    }
}
