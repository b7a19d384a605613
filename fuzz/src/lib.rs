//! What the fuzz targets share: a runtime, an in-memory block device, an
//! NBD connection driven from bytes, and the replica protocol's frames
//! built from structured input.
//!
//! Every target drives the real parsing code of `ballast-storage-node` and
//! `ballast-csi`; nothing here re-implements a decoder. The helpers only
//! build inputs (frames whose CRCs are right, so the fuzzer gets past the
//! first check) and run the code under test to completion, bounded in time.
//!
//! To add a target: a file in `fuzz_targets/`, a `[[bin]]` in `Cargo.toml`,
//! a seed directory in `corpus/`, and a line in docs/architecture.md
//! ("Fuzzing"); `scripts/fuzz.sh` runs every `[[bin]]`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arbitrary::Arbitrary;
use async_trait::async_trait;
use ballast_storage_node::block::{BlockDevice, BlockError};
use ballast_storage_node::buf::IoBuf;
use ballast_storage_node::nbd::{self, Export};
use tokio::io::AsyncWrite;
use tokio::runtime::Runtime;

/// Size of the export every NBD target serves. The seed captures use an
/// export of this size too (see `capture-seeds.sh`), so their requests are
/// in range.
pub const EXPORT_BYTES: usize = 4 << 20;

/// Longest one input may run. A run that takes longer is a hang: the target
/// panics, and libFuzzer saves the input (its own `-timeout` catches a
/// loop that never yields).
pub const RUN_LIMIT: Duration = Duration::from_secs(10);

/// The runtime every input runs on: one thread, like an NBD connection's
/// own runtime in the agent.
pub fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Runs `future` on [`runtime`], panicking if it takes longer than
/// [`RUN_LIMIT`].
pub fn block_on_bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    runtime().block_on(async {
        match tokio::time::timeout(RUN_LIMIT, future).await {
            Ok(output) => output,
            Err(_) => panic!("{what} did not finish within {RUN_LIMIT:?}: a hang"),
        }
    })
}

/// A block device in memory that checks every range it is given.
///
/// One device serves every input ([`serve_nbd`]): allocating and zeroing
/// megabytes per input would be most of a run's time. [`MemDevice::reset`]
/// zeroes only what the previous input changed.
pub struct MemDevice {
    data: Mutex<Contents>,
}

struct Contents {
    bytes: Vec<u8>,
    /// The bytes changed since the last reset (empty if none).
    dirty: std::ops::Range<usize>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(Contents {
                bytes: vec![0; size],
                dirty: 0..0,
            }),
        }
    }

    /// Zeroes what was written since the last reset.
    pub fn reset(&self) {
        let mut contents = self.lock();
        let dirty = std::mem::replace(&mut contents.dirty, 0..0);
        contents.bytes[dirty].fill(0);
    }

    fn range(&self, offset: u64, length: u64) -> Result<std::ops::Range<usize>, BlockError> {
        BlockError::check_range(offset, length, self.size_bytes())?;
        let start = usize::try_from(offset).expect("in range of a Vec");
        let end = usize::try_from(offset + length).expect("in range of a Vec");
        Ok(start..end)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `change` on `range` of the bytes and marks it dirty.
    fn change(&self, range: std::ops::Range<usize>, change: impl FnOnce(&mut [u8])) {
        let mut contents = self.lock();
        contents.dirty = if contents.dirty.is_empty() {
            range.clone()
        } else {
            contents.dirty.start.min(range.start)..contents.dirty.end.max(range.end)
        };
        change(&mut contents.bytes[range]);
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.lock().bytes.len() as u64
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        let range = self.range(offset, length as u64)?;
        Ok(IoBuf::from_slice(&self.lock().bytes[range]))
    }

    async fn write(&self, offset: u64, data: IoBuf, _fua: bool) -> Result<(), BlockError> {
        let range = self.range(offset, data.len() as u64)?;
        self.change(range, |bytes| bytes.copy_from_slice(&data));
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        let range = self.range(offset, length)?;
        self.change(range, |bytes| bytes.fill(0));
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        _punch_hole: bool,
        _fua: bool,
    ) -> Result<(), BlockError> {
        let range = self.range(offset, length)?;
        self.change(range, |bytes| bytes.fill(0));
        Ok(())
    }
}

/// The server's side of a connection: counts what it writes and keeps the
/// first [`Output::KEPT`] bytes.
#[derive(Clone, Default)]
pub struct Output(Arc<Mutex<(u64, Vec<u8>)>>);

impl Output {
    /// Bytes kept for checks.
    pub const KEPT: usize = 64 << 10;

    /// Total bytes written and the first [`Output::KEPT`] of them.
    pub fn take(&self) -> (u64, Vec<u8>) {
        let mut inner = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (inner.0, std::mem::take(&mut inner.1))
    }
}

impl AsyncWrite for Output {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.0 += buf.len() as u64;
        let room = Self::KEPT.saturating_sub(inner.1.len());
        inner.1.extend_from_slice(&buf[..buf.len().min(room)]);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves one NBD connection whose client sends `client` and then closes,
/// on an export of [`EXPORT_BYTES`] named `vol`, through the server's real
/// connection code ([`nbd::serve_stream`]). Returns what the server wrote
/// (total bytes, and the first [`Output::KEPT`]).
pub fn serve_nbd(client: &[u8]) -> (u64, Vec<u8>) {
    static DEVICE: OnceLock<Arc<MemDevice>> = OnceLock::new();
    let device = DEVICE.get_or_init(|| Arc::new(MemDevice::new(EXPORT_BYTES)));
    device.reset();
    let export = Export {
        name: "vol".to_owned(),
        device: device.clone(),
    };
    let output = Output::default();
    block_on_bounded(
        "an NBD connection",
        nbd::serve_stream(client, output.clone(), export),
    )
    .expect("a valid export name");
    output.take()
}

/// How a structured input damages a frame after it was encoded correctly.
#[derive(Debug, Arbitrary)]
pub enum Damage {
    /// Leaves it intact.
    None,
    /// Sets byte `at` (modulo the frame's length) to `value`; with
    /// `fix_crc` the header CRC is recomputed afterwards, so the damage
    /// gets past the CRC check and reaches the checks behind it.
    SetByte {
        /// Index into the encoded frame.
        at: u16,
        /// The new value.
        value: u8,
        /// Recompute the header CRC after the change.
        fix_crc: bool,
    },
    /// Flips bit `bit` of the payload (its CRC is then wrong).
    FlipPayloadBit {
        /// Bit index into the payload.
        bit: u32,
    },
    /// Cuts the frame after `at` bytes (the peer went away mid-frame).
    Truncate {
        /// Bytes kept.
        at: u16,
    },
    /// Appends raw bytes after the frame.
    Append(Vec<u8>),
}

/// Applies `damage` to `frame`, whose header is `header_len` bytes and
/// whose header CRC sits at `crc_at` over `frame[..crc_at]` and then
/// `frame[crc_end..header_len]` (the request's volume id follows its CRC).
pub fn damage(frame: &mut Vec<u8>, header_len: usize, crc_at: usize, damage: &Damage) {
    match damage {
        Damage::None => {}
        Damage::SetByte { at, value, fix_crc } => {
            if frame.is_empty() {
                return;
            }
            let at = usize::from(*at) % frame.len();
            frame[at] = *value;
            if *fix_crc && at < header_len && !(crc_at..crc_at + 4).contains(&at) {
                let crc = crc32c::crc32c_append(
                    crc32c::crc32c(&frame[..crc_at]),
                    &frame[crc_at + 4..header_len],
                );
                frame[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
            }
        }
        Damage::FlipPayloadBit { bit } => {
            let payload = frame.len() - header_len;
            if payload > 0 {
                let bit = *bit as usize % (payload * 8);
                frame[header_len + bit / 8] ^= 1 << (bit % 8);
            }
        }
        Damage::Truncate { at } => frame.truncate(usize::from(*at)),
        Damage::Append(bytes) => frame.extend_from_slice(bytes),
    }
}
