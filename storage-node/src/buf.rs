//! Page-aligned I/O buffers.
//!
//! `O_DIRECT` requires the memory of every read and write to be aligned to the
//! logical block size of the device; [`IoBuf`] is always aligned to
//! [`IO_ALIGN`] bytes (4096), which satisfies every block size Linux supports.
//! An `IoBuf` owns its memory exclusively, so it can be handed to an io_uring
//! submission and returned with the completion without copying.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment, in bytes, of every [`IoBuf`] allocation.
pub const IO_ALIGN: usize = 4096;

/// An owned, zero-initialised byte buffer aligned to [`IO_ALIGN`].
///
/// `len` bytes are visible through `Deref<Target = [u8]>`; the allocation is
/// `capacity` bytes, rounded up to a multiple of [`IO_ALIGN`] (at least one
/// page), so a buffer can be read into past its visible length when a request
/// must be widened to block boundaries.
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
    /// Allocates a zero-filled buffer of `len` bytes.
    ///
    /// # Panics
    /// Panics if `len` rounded up to [`IO_ALIGN`] overflows `isize` (never for
    /// NBD requests, which are bounded to 32 MiB).
    pub fn zeroed(len: usize) -> Self {
        let capacity = len.max(1).div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Self::layout(capacity);
        // SAFETY: `layout` has a non-zero size (at least IO_ALIGN bytes).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, capacity }
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
    /// Bytes that become visible keep whatever they last held (zero if never
    /// written), so the buffer never exposes uninitialised memory.
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

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, IO_ALIGN).expect("IoBuf capacity overflows isize")
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `capacity >= len` initialised bytes
        // (zeroed at allocation) and is owned by `self`.
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
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this same layout
        // and is freed exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
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
    fn set_len_keeps_contents() {
        let mut buf = IoBuf::from_slice(b"ballast");
        buf.set_len(3);
        assert_eq!(&buf[..], b"bal");
        buf.set_len(7);
        assert_eq!(&buf[..], b"ballast");
    }
}
