//! Test fixtures for the NBD server: an in-memory [`BlockDevice`] and a
//! harness that runs a server on a unix socket in a temporary directory.
//!
//! - `raw` drives the server over raw sockets with well-formed and malformed
//!   input.
//! - `clients` runs real NBD clients nobody here wrote (libnbd's nbdinfo,
//!   nbdcopy, nbdsh and nbdfuse, qemu-io, qemu-img, mkfs.ext4 and e2fsck) as
//!   subprocesses.
//!
//! Every wait is bounded by [`within`]; temporary directories and child
//! processes are cleaned up on drop, so also when a test fails.

mod clients;
mod raw;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::export::{Export, ExportTable};
use super::server::NbdServer;
use super::transmission::Limits;
use crate::block::{BlockDevice, BlockError};
use crate::buf::IoBuf;

/// Upper bound for any single wait in these tests.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than [`WAIT`].
pub(crate) async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

/// A `write_zeroes` call as the device saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ZeroesCall {
    pub offset: u64,
    pub length: u64,
    pub punch_hole: bool,
    pub fua: bool,
}

/// An in-memory block device that records what it was asked to do.
#[derive(Default)]
pub(crate) struct MemDevice {
    data: Mutex<Vec<u8>>,
    /// Reads of this offset are delayed (to force out-of-order replies).
    slow_offset: Option<u64>,
    /// Delay applied to every read (to keep requests in flight).
    read_delay: Option<Duration>,
    pub flushes: AtomicUsize,
    pub fua_writes: AtomicUsize,
    pub zeroes: Mutex<Vec<ZeroesCall>>,
    reads_in_flight: AtomicUsize,
    pub max_reads_in_flight: AtomicUsize,
}

impl MemDevice {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            ..Self::default()
        }
    }

    /// Delays reads at `offset` by a second.
    pub(crate) fn with_slow_offset(mut self, offset: u64) -> Self {
        self.slow_offset = Some(offset);
        self
    }

    /// Delays every read by `delay`.
    pub(crate) fn with_read_delay(mut self, delay: Duration) -> Self {
        self.read_delay = Some(delay);
        self
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.data.lock().expect("not poisoned").clone()
    }

    pub(crate) fn fill(&self, offset: usize, bytes: &[u8]) {
        self.data.lock().expect("not poisoned")[offset..offset + bytes.len()]
            .copy_from_slice(bytes);
    }

    fn range(&self, offset: u64, length: u64) -> Result<std::ops::Range<usize>, BlockError> {
        BlockError::check_range(offset, length, self.size_bytes())?;
        Ok(offset as usize..(offset + length) as usize)
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.data.lock().expect("not poisoned").len() as u64
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        let now = self.reads_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_reads_in_flight.fetch_max(now, Ordering::SeqCst);
        if self.slow_offset == Some(offset) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if let Some(delay) = self.read_delay {
            tokio::time::sleep(delay).await;
        }
        self.reads_in_flight.fetch_sub(1, Ordering::SeqCst);
        let range = self.range(offset, length as u64)?;
        Ok(IoBuf::from_slice(
            &self.data.lock().expect("not poisoned")[range],
        ))
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        let range = self.range(offset, data.len() as u64)?;
        self.data.lock().expect("not poisoned")[range].copy_from_slice(&data);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let range = self.range(offset, length)?;
        self.data.lock().expect("not poisoned")[range].fill(0);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        let range = self.range(offset, length)?;
        self.data.lock().expect("not poisoned")[range].fill(0);
        self.zeroes.lock().expect("not poisoned").push(ZeroesCall {
            offset,
            length,
            punch_hole,
            fua,
        });
        Ok(())
    }
}

/// A server on a unix socket in a temporary directory, serving
/// [`Fixture::EXPORT`] backed by a [`MemDevice`].
pub(crate) struct Fixture {
    pub server: NbdServer,
    pub device: Arc<MemDevice>,
    pub socket: PathBuf,
    // Dropped last: removed after the server is gone.
    _dir: tempfile::TempDir,
}

impl Fixture {
    pub(crate) const EXPORT: &'static str = "vol-1";

    /// Serves a zeroed device of `size` bytes with default limits.
    pub(crate) fn start(size: usize) -> Self {
        Self::start_with(MemDevice::new(size), Limits::default(), false)
    }

    /// Serves `device` with `limits`, also on TCP (127.0.0.1, free port) if
    /// `tcp` is set.
    pub(crate) fn start_with(device: MemDevice, limits: Limits, tcp: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("nbd.sock");
        let device = Arc::new(device);
        let export = Export {
            name: Self::EXPORT.to_owned(),
            device: device.clone(),
        };
        let exports = ExportTable::new(export, Vec::new()).expect("valid export");
        let tcp = tcp.then(|| "127.0.0.1:0".parse().expect("address"));
        let server = NbdServer::start_with(exports, &socket, tcp, limits).expect("server starts");
        Self {
            server,
            device,
            socket,
            _dir: dir,
        }
    }

    /// The NBD URI of the default export.
    pub(crate) fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The NBD URI of the export by its name.
    pub(crate) fn named_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            Self::EXPORT,
            self.socket.display()
        )
    }

    /// Waits until the server has no open connection.
    pub(crate) async fn wait_idle(&self) {
        within("connections to close", async {
            while self.server.connections() != 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}
