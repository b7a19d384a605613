//! The block device abstraction that NBD exports serve.
//!
//! A [`BlockDevice`] is anything that stores bytes at offsets: a replica file
//! in a pool today, a replicated volume target later. The NBD server knows
//! only this trait, so new back ends need no change to the protocol code.
//!
//! Contract for implementors:
//! - Ranges are checked by the caller against [`BlockDevice::size_bytes`], but
//!   implementations must still refuse out-of-range requests with
//!   [`BlockError::OutOfRange`] rather than touch bytes past the end.
//! - Offsets and lengths need not be aligned; an implementation that needs
//!   alignment (O_DIRECT) widens the request itself and must not lose a
//!   concurrent write while doing so.
//! - A write that returned `Ok` with `fua = true`, or any write that completed
//!   before a [`BlockDevice::flush`] that returned `Ok`, is durable.

use async_trait::async_trait;

use crate::buf::IoBuf;

/// Errors of block device operations.
///
/// The NBD server maps each variant to an NBD error code with
/// [`BlockError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request touches bytes at or beyond the end of the device.
    #[error(
        "Range of {length} bytes at offset {offset} is beyond the end of the device ({size_bytes} bytes)"
    )]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        length: u64,
        /// Size of the device in bytes.
        size_bytes: u64,
    },
    /// The backing storage has no space left (thin overcommit exhausted).
    #[error("No space left in the pool")]
    NoSpace,
    /// The device refuses I/O (e.g. it was stopped or fenced).
    #[error("Device is not accepting I/O: {0}")]
    Unavailable(String),
    /// The backing storage failed.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

impl BlockError {
    /// The errno an NBD reply carries for this error (NBD protocol,
    /// "Error values": EIO, ENOSPC, EINVAL, ESHUTDOWN are the ones we use).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::NoSpace => libc::ENOSPC,
            BlockError::Unavailable(_) => libc::ESHUTDOWN,
            BlockError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => libc::ENOSPC,
            BlockError::Io(_) => libc::EIO,
        }
    }

    /// Builds an [`BlockError::OutOfRange`] error if `offset + length`
    /// exceeds `size_bytes` (or overflows).
    pub fn check_range(offset: u64, length: u64, size_bytes: u64) -> Result<(), BlockError> {
        match offset.checked_add(length) {
            Some(end) if end <= size_bytes => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                length,
                size_bytes,
            }),
        }
    }
}

/// A byte-addressed device with durable writes.
///
/// All methods may be called concurrently from many tasks; implementations
/// order nothing except what the contract in the module docs requires.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size of the device in bytes.
    fn size_bytes(&self) -> u64;

    /// Reads `length` bytes at `offset`; the returned buffer holds exactly
    /// `length` bytes. Errors: `OutOfRange`, `Unavailable`, `Io`.
    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError>;

    /// Writes `data` at `offset`. With `fua` the data is durable when this
    /// returns `Ok` (NBD_CMD_FLAG_FUA). Errors: `OutOfRange`, `NoSpace`,
    /// `Unavailable`, `Io`.
    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError>;

    /// Makes every write that completed before this call durable
    /// (NBD_CMD_FLUSH).
    async fn flush(&self) -> Result<(), BlockError>;

    /// Discards `length` bytes at `offset`; later reads of the range return
    /// zeroes and a thin device releases the space (NBD_CMD_TRIM).
    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError>;

    /// Writes zeroes to `length` bytes at `offset` (NBD_CMD_WRITE_ZEROES).
    /// When `punch_hole` is false (NBD_CMD_FLAG_NO_HOLE) the range stays
    /// allocated. With `fua` the zeroes are durable when this returns `Ok`.
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError>;
}
