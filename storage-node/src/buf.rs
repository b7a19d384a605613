//! Page-aligned I/O buffers.
//!
//! `O_DIRECT` requires the memory of every read and write to be aligned to the
//! logical block size of the device; [`IoBuf`] is always aligned to
//! [`IO_ALIGN`] bytes (4096), which satisfies every block size Linux supports.
//! An `IoBuf` owns its memory exclusively, so it can be handed to an io_uring
//! submission and returned with the completion without copying.
//!
//! Allocations are recycled through a process-wide pool with size classes
//! and a bound on idle memory (see [`pool`]). Every byte of every allocation
//! is always initialised; a buffer from [`IoBuf::zeroed`] reads as zeroes,
//! one from [`IoBuf::for_overwrite`] may hold bytes an earlier buffer left,
//! which is why it is only for callers that overwrite all of it.

pub mod pool;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use pool::Chunk;

/// Alignment, in bytes, of every [`IoBuf`] allocation.
pub const IO_ALIGN: usize = 4096;

/// An owned byte buffer aligned to [`IO_ALIGN`].
///
/// `len` bytes are visible through `Deref<Target = [u8]>`; the allocation is
/// `capacity` bytes, a multiple of [`IO_ALIGN`] (at least one page; a power
/// of two pages up to 32 MiB), so a buffer can be read into past its visible
/// length when a request must be widened to block boundaries. Dropping it
/// returns the allocation to the pool.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: `IoBuf` owns its allocation exclusively (like `Vec<u8>`); no other
// pointer to it exists, so moving it to another thread is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]` access, as for `Vec<u8>`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zero-filled buffer of `len` bytes (all of its capacity
    /// is zero).
    ///
    /// # Panics
    /// Panics if `len` rounded up to [`IO_ALIGN`] overflows `isize` (never for
    /// NBD requests, which are bounded to 32 MiB).
    pub fn zeroed(len: usize) -> Self {
        let (chunk, zero) = pool::take(len);
        if !zero {
            // SAFETY: the chunk is `capacity` writable bytes owned by us.
            unsafe { std::ptr::write_bytes(chunk.ptr.as_ptr(), 0, chunk.capacity) };
        }
        Self::from_chunk(chunk, len)
    }

    /// Allocates a buffer of `len` bytes for a caller that will overwrite
    /// every visible byte before anyone reads it: a socket read of exactly
    /// `len` bytes, or a file read whose short result is an error.
    ///
    /// The bytes are initialised but arbitrary: a recycled allocation holds
    /// what an earlier buffer (another request, another volume) left in it.
    /// So the caller must overwrite all `len` bytes, or drop the buffer
    /// unread, and must not [`set_len`](Self::set_len) past bytes it wrote.
    /// In exchange it skips zeroing, which for large buffers costs as much as
    /// the copy that fills them.
    ///
    /// # Panics
    /// As [`zeroed`](Self::zeroed).
    pub fn for_overwrite(len: usize) -> Self {
        let (chunk, _) = pool::take(len);
        Self::from_chunk(chunk, len)
    }

    fn from_chunk(chunk: Chunk, len: usize) -> Self {
        debug_assert!(len <= chunk.capacity);
        // The chunk's ownership moves into the buffer; `Drop` gives it back.
        Self {
            ptr: chunk.ptr,
            len,
            capacity: chunk.capacity,
        }
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Number of visible bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer has no visible bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (a multiple of [`IO_ALIGN`], never less than `len`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the visible length to `len` bytes.
    ///
    /// Bytes that become visible keep whatever they last held: zero if never
    /// written in a buffer from [`zeroed`](Self::zeroed), possibly an earlier
    /// buffer's bytes in one from [`for_overwrite`](Self::for_overwrite).
    /// Either way the buffer never exposes uninitialised memory.
    ///
    /// # Panics
    /// Panics if `len` exceeds [`capacity`](Self::capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Pointer to the first byte, for submitting the buffer to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Mutable pointer to the first byte, for reads issued by the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity >= len` initialised bytes
        // (zeroed when created, only ever overwritten since; see `pool`) and
        // is owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        pool::give(Chunk {
            ptr: self.ptr,
            capacity: self.capacity,
        });
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let buf = IoBuf::zeroed(len);
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len && buf.capacity().is_multiple_of(IO_ALIGN));
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn recycled_buffers_are_zeroed_again() {
        for _ in 0..4 {
            let mut dirty = IoBuf::for_overwrite(8192);
            dirty.fill(0xa5);
            let capacity = dirty.capacity();
            dirty.set_len(capacity);
            dirty.fill(0x5a);
        }
        let mut buf = IoBuf::zeroed(5000);
        assert!(buf.iter().all(|&b| b == 0));
        let capacity = buf.capacity();
        buf.set_len(capacity);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn for_overwrite_has_the_asked_length() {
        for len in [0, 1, 4096, 70_000, 1 << 20, (32 << 20) + 1] {
            let buf = IoBuf::for_overwrite(len);
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len && buf.capacity().is_multiple_of(IO_ALIGN));
            assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
        }
    }

    #[test]
    fn set_len_keeps_contents() {
        let mut buf = IoBuf::from_slice(b"ballast");
        buf.set_len(3);
        assert_eq!(&buf[..], b"bal");
        buf.set_len(7);
        assert_eq!(&buf[..], b"ballast");
    }
}
