//! The data path of one replica file: `O_DIRECT` reads and writes through
//! the [`IoEngine`], exposed as a [`BlockDevice`].
//!
//! # What it owns
//!
//! [`ReplicaData`] owns an open descriptor of the replica file and turns
//! byte-addressed block requests into aligned direct I/O:
//! - Reads are widened to logical block boundaries and the requested bytes
//!   copied out.
//! - Writes whose offset and length are block multiples go straight to the
//!   file; other writes read the partial head and tail blocks, merge, and
//!   write whole blocks back (read-modify-write).
//! - FUA writes use `RWF_DSYNC`; FLUSH is `fdatasync`; TRIM punches holes
//!   (thin stays thin); WRITE_ZEROES zeroes a range, keeping it allocated
//!   unless a hole is allowed. Partial blocks at the edges of TRIM and
//!   WRITE_ZEROES are zeroed by read-modify-write.
//!
//! # Concurrency invariant
//!
//! A read-modify-write rewrites bytes it was not asked to write (the rest of
//! its edge blocks). A write to those bytes landing between the read and the
//! write-back would be lost. So every request that changes data holds
//! `edges`, a reader-writer lock: whole-block requests share it, requests with
//! partial blocks take it exclusively. Reads take no lock. The exclusive path
//! runs in a spawned task that keeps the lock until the write-back completes,
//! even if the caller's future is dropped. Unaligned writes are therefore
//! serialised; clients that care about speed send block-aligned requests
//! (NBD advertises [`ReplicaData::block_size`] as the minimum block size).
//!
//! # What it must never do
//!
//! Touch bytes at or past [`ReplicaData::size_bytes`], grow or shrink the file
//! (the replica catalog sizes it), or know anything about epochs, metadata or
//! replication.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::sync::RwLock;

use crate::block::{BlockDevice, BlockError};
use crate::buf::{IO_ALIGN, IoBuf};
use crate::uring::{self, IoEngine};

/// Smallest logical block size we align to, in bytes.
const MIN_BLOCK_SIZE: u64 = 512;

/// Block size used when the file system does not report its direct I/O
/// alignment, in bytes: no Linux block device has a larger logical block.
const FALLBACK_BLOCK_SIZE: u64 = 4096;

/// Largest zero-filled buffer written when the file system cannot zero a
/// range with `fallocate`, in bytes.
const ZERO_CHUNK: usize = 1 << 20;

/// Errors of opening and resizing a replica's data file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened for direct I/O.
    #[error("Cannot open replica file {} for direct I/O", path.display())]
    Open {
        /// Path of the replica file.
        path: PathBuf,
        /// Error of open(2); `EINVAL` means the file system lacks `O_DIRECT`.
        #[source]
        source: io::Error,
    },
    /// The file's attributes could not be read.
    #[error("Cannot read the attributes of replica file {}", path.display())]
    Stat {
        /// Path of the replica file.
        path: PathBuf,
        /// Error of fstat(2).
        #[source]
        source: io::Error,
    },
    /// The file system reports that this file cannot do direct I/O.
    #[error("Replica file {} does not support direct I/O", path.display())]
    DirectIoUnsupported {
        /// Path of the replica file.
        path: PathBuf,
    },
    /// Direct I/O on the file needs buffers more aligned than [`IoBuf`]'s.
    #[error(
        "Replica file {} needs direct I/O buffers aligned to {mem_align} bytes, more than {IO_ALIGN}",
        path.display()
    )]
    MemoryAlignment {
        /// Path of the replica file.
        path: PathBuf,
        /// Required memory alignment in bytes.
        mem_align: u32,
    },
    /// The replica size is not a whole number of logical blocks.
    #[error(
        "Replica size of {size_bytes} bytes is not a multiple of the logical block size of {block_size} bytes"
    )]
    UnalignedSize {
        /// Requested size in bytes.
        size_bytes: u64,
        /// Logical block size in bytes.
        block_size: u64,
    },
    /// The file is shorter than the replica size.
    #[error(
        "Replica file {} holds {file_bytes} bytes, fewer than the replica size of {size_bytes} bytes",
        path.display()
    )]
    FileTooSmall {
        /// Path of the replica file.
        path: PathBuf,
        /// Length of the file in bytes.
        file_bytes: u64,
        /// Requested size in bytes.
        size_bytes: u64,
    },
}

/// The data of one replica file, served through the I/O engine.
///
/// Cheap to share behind an `Arc`; every method may be called concurrently.
pub struct ReplicaData {
    path: PathBuf,
    io: FileIo,
    size_bytes: AtomicU64,
    /// Shared by whole-block writers, exclusive for read-modify-write (see
    /// the module docs).
    edges: Arc<RwLock<()>>,
}

impl ReplicaData {
    /// Opens the replica file at `path` (`O_RDWR | O_DIRECT | O_CLOEXEC`) and
    /// serves its first `size_bytes` bytes through `engine`.
    ///
    /// The file must already be at least `size_bytes` long, and `size_bytes`
    /// a multiple of the file's logical block size.
    ///
    /// Errors: [`Error::Open`], [`Error::Stat`],
    /// [`Error::DirectIoUnsupported`], [`Error::MemoryAlignment`],
    /// [`Error::UnalignedSize`], [`Error::FileTooSmall`].
    pub fn open(path: &Path, size_bytes: u64, engine: Arc<IoEngine>) -> Result<ReplicaData, Error> {
        // std opens with O_CLOEXEC.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        let block_size = block_size(&file, path)?;
        let replica = ReplicaData {
            path: path.to_owned(),
            io: FileIo {
                engine,
                file: Arc::new(file),
                block_size,
            },
            size_bytes: AtomicU64::new(0),
            edges: Arc::new(RwLock::new(())),
        };
        replica.set_size_bytes(size_bytes)?;
        tracing::debug!(
            path = %path.display(),
            size_bytes,
            block_size,
            "Opened replica data file"
        );
        Ok(replica)
    }

    /// Changes the size served, in bytes, after the file was resized by its
    /// owner (growing the file first, then calling this, is what expansion
    /// does). Requests already running keep the size they checked.
    ///
    /// Errors: [`Error::UnalignedSize`], [`Error::Stat`],
    /// [`Error::FileTooSmall`]; the size is unchanged on error.
    pub fn set_size_bytes(&self, size_bytes: u64) -> Result<(), Error> {
        let block_size = self.io.block_size;
        if !size_bytes.is_multiple_of(block_size) {
            return Err(Error::UnalignedSize {
                size_bytes,
                block_size,
            });
        }
        let file_bytes = self
            .io
            .file
            .metadata()
            .map_err(|source| Error::Stat {
                path: self.path.clone(),
                source,
            })?
            .len();
        if file_bytes < size_bytes {
            return Err(Error::FileTooSmall {
                path: self.path.clone(),
                file_bytes,
                size_bytes,
            });
        }
        self.size_bytes.store(size_bytes, Ordering::Release);
        Ok(())
    }

    /// Logical block size of the file in bytes: requests whose offset and
    /// length are multiples of it avoid read-modify-write.
    pub fn block_size(&self) -> u64 {
        self.io.block_size
    }

    /// Path of the replica file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        BlockError::check_range(offset, length, self.size_bytes.load(Ordering::Acquire))
    }

    /// Zeroes `length` bytes at `offset` with fallocate `mode` on the whole
    /// blocks and writes on the partial ones.
    async fn zero_range(&self, offset: u64, length: u64, mode: i32) -> Result<(), BlockError> {
        let end = offset + length;
        let head_end = self.io.align_up(offset).min(end);
        let tail_start = self.io.align_down(end).max(head_end);
        if head_end == offset && tail_start == end {
            let _shared = self.edges.read().await;
            return self.io.zero_blocks(offset, length, mode).await;
        }
        let exclusive = Arc::clone(&self.edges).write_owned().await;
        let io = self.io.clone();
        run_to_completion(async move {
            let _exclusive = exclusive;
            if offset < head_end {
                io.merge(offset, &vec![0; (head_end - offset) as usize], false)
                    .await?;
            }
            if tail_start < end {
                io.merge(tail_start, &vec![0; (end - tail_start) as usize], false)
                    .await?;
            }
            if head_end < tail_start {
                io.zero_blocks(head_end, tail_start - head_end, mode)
                    .await?;
            }
            Ok(())
        })
        .await
    }
}

impl std::fmt::Debug for ReplicaData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaData")
            .field("path", &self.path)
            .field("size_bytes", &self.size_bytes.load(Ordering::Relaxed))
            .field("block_size", &self.io.block_size)
            .finish()
    }
}

#[async_trait]
impl BlockDevice for ReplicaData {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        self.check_range(offset, length as u64)?;
        if length == 0 {
            return Ok(IoBuf::zeroed(0));
        }
        let end = offset + length as u64;
        let start = self.io.align_down(offset);
        let span = (self.io.align_up(end) - start) as usize;
        let mut buf = self.io.read_exact(start, span).await?;
        if span != length {
            let at = (offset - start) as usize;
            buf.copy_within(at..at + length, 0);
            buf.set_len(length);
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        let length = data.len() as u64;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        if self.io.is_aligned(offset) && self.io.is_aligned(length) {
            let _shared = self.edges.read().await;
            return self.io.write_all(offset, data, fua).await.map(drop);
        }
        let exclusive = Arc::clone(&self.edges).write_owned().await;
        let io = self.io.clone();
        run_to_completion(async move {
            let _exclusive = exclusive;
            io.merge(offset, &data, fua).await
        })
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        // fdatasync, not a full fsync. NBD_CMD_FLUSH promises that completed
        // writes survive a crash, i.e. that the data can be read back. That
        // needs the data blocks and the metadata needed to find them (file
        // size, extent maps: allocations, unwritten-to-written conversions,
        // punched holes and zeroed ranges), which is exactly what fdatasync
        // persists (POSIX "synchronized I/O data integrity"). XFS implements
        // it by forcing the log whenever the inode carries any logged change
        // other than timestamps, and allocation changes are always logged.
        // What fdatasync skips, the timestamps, no NBD client can observe.
        // nbdkit's file plugin makes the same choice.
        self.io
            .engine
            .fsync(&self.io.file, true)
            .await
            .map_err(block_error)
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.zero_range(offset, length, mode).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let mode = if punch_hole {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.zero_range(offset, length, mode).await?;
        if fua {
            self.io
                .engine
                .fsync(&self.io.file, true)
                .await
                .map_err(block_error)?;
        }
        Ok(())
    }
}

/// What a request needs to do I/O on the file; cloned into tasks that must
/// outlive the caller's future.
#[derive(Clone)]
struct FileIo {
    engine: Arc<IoEngine>,
    file: Arc<File>,
    /// Logical block size in bytes, a power of two.
    block_size: u64,
}

impl FileIo {
    fn is_aligned(&self, value: u64) -> bool {
        value & (self.block_size - 1) == 0
    }

    fn align_down(&self, value: u64) -> u64 {
        value & !(self.block_size - 1)
    }

    /// Rounds up; callers pass values at most the (aligned) replica size, so
    /// this cannot overflow.
    fn align_up(&self, value: u64) -> u64 {
        self.align_down(value + (self.block_size - 1))
    }

    /// Reads exactly `len` bytes at `offset` (both aligned).
    async fn read_exact(&self, offset: u64, len: usize) -> Result<IoBuf, BlockError> {
        // The kernel fills all `len` bytes, or the read fails below and the
        // buffer is dropped unread.
        let (buf, result) = self
            .engine
            .read(&self.file, offset, IoBuf::for_overwrite(len))
            .await;
        let read = result.map_err(block_error)?;
        if read < len {
            // The file is never shorter than the replica size (checked when
            // it is set), so someone truncated it under us.
            return Err(BlockError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "Replica file ends at byte {}, inside the replica",
                    offset + read as u64
                ),
            )));
        }
        Ok(buf)
    }

    /// Writes all of `buf` at `offset` (both aligned); returns the buffer.
    async fn write_all(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, BlockError> {
        let (buf, result) = self.engine.write(&self.file, offset, buf, fua).await;
        result.map_err(block_error)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`, neither of which need be aligned, by
    /// reading the partial edge blocks, merging, and writing whole blocks.
    /// The caller holds the `edges` lock exclusively.
    async fn merge(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        let block = self.block_size as usize;
        let end = offset + data.len() as u64;
        let start = self.align_down(offset);
        let span = (self.align_up(end) - start) as usize;
        let tail_block = start + (span - block) as u64;
        let head_partial = start != offset;
        // A single partial block is read once, as the head.
        let tail_partial = start + span as u64 != end && !(head_partial && tail_block == start);

        let head = async {
            if head_partial {
                self.read_exact(start, block).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let tail = async {
            if tail_partial {
                self.read_exact(tail_block, block).await.map(Some)
            } else {
                Ok(None)
            }
        };
        let (head, tail) = tokio::join!(head, tail);
        let mut buf = IoBuf::zeroed(span);
        if let Some(head) = head? {
            buf[..block].copy_from_slice(&head);
        }
        if let Some(tail) = tail? {
            buf[span - block..].copy_from_slice(&tail);
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.write_all(start, buf, fua).await.map(drop)
    }

    /// Zeroes whole blocks with `fallocate(mode)`, writing zeroes instead if
    /// the file system does not support the mode.
    async fn zero_blocks(&self, offset: u64, length: u64, mode: i32) -> Result<(), BlockError> {
        match self
            .engine
            .fallocate(&self.file, mode, offset, length)
            .await
        {
            Ok(()) => return Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::debug!(mode, "fallocate mode unsupported; writing zeroes");
            }
            Err(error) => return Err(block_error(error)),
        }
        let mut zeroes = IoBuf::zeroed(ZERO_CHUNK.min(length as usize));
        let mut done = 0;
        while done < length {
            let chunk = (length - done).min(ZERO_CHUNK as u64) as usize;
            zeroes.set_len(chunk);
            zeroes = self.write_all(offset + done, zeroes, false).await?;
            done += chunk as u64;
        }
        Ok(())
    }
}

/// Runs `work` in its own task so that it completes (and releases the locks
/// it holds only afterwards) even if the caller's future is dropped; outside
/// a tokio runtime it runs inline.
async fn run_to_completion<F>(work: F) -> Result<(), BlockError>
where
    F: Future<Output = Result<(), BlockError>> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => runtime
            .spawn(work)
            .await
            .unwrap_or_else(|error| Err(BlockError::Io(io::Error::other(error)))),
        Err(_) => work.await,
    }
}

/// Maps an I/O error to the block error NBD clients understand.
fn block_error(error: io::Error) -> BlockError {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => BlockError::NoSpace,
        _ if uring::is_stopped(&error) => BlockError::Unavailable(error.to_string()),
        _ => BlockError::Io(error),
    }
}

/// The logical block size of `file` in bytes, from its direct I/O offset
/// alignment (statx `STATX_DIOALIGN`, Linux 6.1), at least
/// [`MIN_BLOCK_SIZE`]; [`FALLBACK_BLOCK_SIZE`] when the kernel or file system
/// does not say.
fn block_size(file: &File, path: &Path) -> Result<u64, Error> {
    let (mem_align, offset_align) = match dio_alignment(file) {
        Ok(Some(alignment)) => alignment,
        Ok(None) => return Ok(FALLBACK_BLOCK_SIZE),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "statx failed; assuming 4096-byte blocks");
            return Ok(FALLBACK_BLOCK_SIZE);
        }
    };
    if offset_align == 0 {
        return Err(Error::DirectIoUnsupported {
            path: path.to_owned(),
        });
    }
    if mem_align as usize > IO_ALIGN {
        return Err(Error::MemoryAlignment {
            path: path.to_owned(),
            mem_align,
        });
    }
    let block_size = u64::from(offset_align).max(MIN_BLOCK_SIZE);
    if block_size.is_power_of_two() {
        Ok(block_size)
    } else {
        Ok(FALLBACK_BLOCK_SIZE.max(block_size.next_power_of_two()))
    }
}

/// The (memory, offset) alignment direct I/O on `file` requires, in bytes,
/// or None if the kernel or file system does not report it.
fn dio_alignment(file: &File) -> io::Result<Option<(u32, u32)>> {
    const EMPTY_PATH: &CStr = c"";
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `file` is an open descriptor, `EMPTY_PATH` is a NUL-terminated
    // string that outlives the call, and `stx` points to writable memory of
    // the size of `struct statx`, which the kernel fills.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            EMPTY_PATH.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `struct statx` is plain integers, for which all-zero bytes (as
    // initialised) or whatever the kernel wrote are valid values.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

#[cfg(test)]
mod tests;
