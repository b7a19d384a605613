//! The process-wide pool of [`IoBuf`](super::IoBuf) allocations.
//!
//! Every NBD request needs a page-aligned buffer, and most are of a few sizes
//! (4 KiB, 64 KiB, 1 MiB). Allocating each afresh is slow for large ones: the
//! system allocator maps new pages for every 1 MiB buffer, which then take a
//! page fault per 4 KiB and are zeroed twice (by the kernel and by
//! `alloc_zeroed`). The pool keeps released allocations and hands them out
//! again.
//!
//! # Size classes
//!
//! Allocations are `4 KiB · 2^k` bytes for `k` in `0..CLASSES` (4 KiB to
//! 32 MiB, the largest NBD payload); a request gets the smallest class that
//! holds it. Larger allocations (no NBD request needs one) are exact
//! multiples of 4 KiB and never pooled.
//!
//! # Memory bounds
//!
//! - At most [`IDLE_MAX_BYTES`] bytes sit idle in the pool, and at most
//!   [`CLASS_IDLE_MAX_BYTES`] of them in one class, so a burst of one size
//!   cannot crowd out the others. A released allocation beyond those bounds
//!   goes back to the system at once.
//! - Allocations of [`MMAP_MIN_BYTES`] or more are private anonymous
//!   mappings of their own, so releasing one (`munmap`) returns its memory to
//!   the kernel exactly; the system allocator would keep freed large chunks
//!   in its heap.
//! - [`trim`] releases the idle allocations of every class that has not
//!   been used since the previous call; the agent calls it periodically, so
//!   an idle agent holds no pooled memory.
//!
//! # Initialised memory
//!
//! Every allocation is zero-filled when it is created (fresh anonymous
//! mappings are zero; smaller ones come from `alloc_zeroed`), and nothing
//! ever de-initialises it, so every byte of every pooled allocation is
//! initialised: recycled memory holds whatever an earlier buffer left there.
//! Whether that is acceptable is decided by the callers in `buf.rs`.

use parking_lot::Mutex;
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::IO_ALIGN;

/// Number of size classes: 4 KiB · 2^0 … 4 KiB · 2^13 = 32 MiB.
const CLASSES: usize = 14;

/// Most bytes idle in the pool over all classes.
pub const IDLE_MAX_BYTES: usize = 32 << 20;

/// Most bytes idle in one class.
pub const CLASS_IDLE_MAX_BYTES: usize = 8 << 20;

/// Allocations at least this large are anonymous mappings of their own.
pub const MMAP_MIN_BYTES: usize = 128 << 10;

/// An allocation of `capacity` bytes, aligned to [`IO_ALIGN`], every byte
/// initialised.
pub(super) struct Chunk {
    pub(super) ptr: NonNull<u8>,
    pub(super) capacity: usize,
}

// SAFETY: a `Chunk` is the only handle to its allocation (like a `Box<[u8]>`),
// so it can move between threads.
unsafe impl Send for Chunk {}

/// The idle allocations of one size class.
struct Class {
    idle: Mutex<Vec<NonNullSend>>,
    /// Set when the class hands out a buffer; cleared by [`trim`].
    used: AtomicBool,
}

/// A pooled allocation's address; the class implies its size.
struct NonNullSend(NonNull<u8>);

// SAFETY: the pool is the only owner of an idle allocation, so its address
// can move between threads like a `Box`.
unsafe impl Send for NonNullSend {}

impl Class {
    const fn new() -> Self {
        Class {
            idle: Mutex::new(Vec::new()),
            used: AtomicBool::new(false),
        }
    }
}

struct Pool {
    classes: [Class; CLASSES],
    idle_bytes: AtomicUsize,
}

static POOL: Pool = Pool {
    classes: [const { Class::new() }; CLASSES],
    idle_bytes: AtomicUsize::new(0),
};

/// The class of allocations that hold `len` bytes, with its capacity; None
/// beyond the largest class.
fn class_of(len: usize) -> Option<(usize, usize)> {
    let pages = len.max(1).div_ceil(IO_ALIGN).checked_next_power_of_two()?;
    let class = pages.trailing_zeros() as usize;
    (class < CLASSES).then_some((class, pages * IO_ALIGN))
}

/// Takes an allocation that holds at least `len` bytes. The second value
/// is true if the memory is known to be all zeroes (a fresh allocation),
/// false if it holds what an earlier buffer left.
pub(super) fn take(len: usize) -> (Chunk, bool) {
    let Some((class, capacity)) = class_of(len) else {
        let capacity = len.div_ceil(IO_ALIGN) * IO_ALIGN;
        return (allocate(capacity), true);
    };
    let pool_class = &POOL.classes[class];
    pool_class.used.store(true, Ordering::Relaxed);
    let reused = pool_class.idle.lock().pop();
    match reused {
        Some(NonNullSend(ptr)) => {
            POOL.idle_bytes.fetch_sub(capacity, Ordering::Relaxed);
            (Chunk { ptr, capacity }, false)
        }
        None => (allocate(capacity), true),
    }
}

/// Returns an allocation to the pool, or to the system if the pool is full
/// or the size is not a class.
pub(super) fn give(chunk: Chunk) {
    let Some((class, capacity)) = class_of(chunk.capacity).filter(|&(_, c)| c == chunk.capacity)
    else {
        release(chunk);
        return;
    };
    let reserved = POOL
        .idle_bytes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |idle| {
            (idle + capacity <= IDLE_MAX_BYTES).then_some(idle + capacity)
        })
        .is_ok();
    if reserved {
        let mut idle = POOL.classes[class].idle.lock();
        if (idle.len() + 1) * capacity <= CLASS_IDLE_MAX_BYTES {
            idle.push(NonNullSend(chunk.ptr));
            return;
        }
        drop(idle);
        POOL.idle_bytes.fetch_sub(capacity, Ordering::Relaxed);
    }
    release(chunk);
}

/// Releases the idle allocations of every class not used since the previous
/// call; returns the number of bytes given back to the system.
pub fn trim() -> usize {
    let mut released = 0;
    for (class, pool_class) in POOL.classes.iter().enumerate() {
        if pool_class.used.swap(false, Ordering::Relaxed) {
            continue;
        }
        let idle = std::mem::take(&mut *pool_class.idle.lock());
        let capacity = IO_ALIGN << class;
        for NonNullSend(ptr) in idle {
            POOL.idle_bytes.fetch_sub(capacity, Ordering::Relaxed);
            release(Chunk { ptr, capacity });
            released += capacity;
        }
    }
    released
}

/// Bytes idle in the pool now.
pub fn idle_bytes() -> usize {
    POOL.idle_bytes.load(Ordering::Relaxed)
}

/// Allocates `capacity` zeroed bytes (a non-zero multiple of [`IO_ALIGN`]).
fn allocate(capacity: usize) -> Chunk {
    if capacity >= MMAP_MIN_BYTES {
        // SAFETY: an anonymous private mapping with a null hint touches no
        // existing memory; the result is checked for MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        match NonNull::new(raw.cast::<u8>()).filter(|_| raw != libc::MAP_FAILED) {
            // Anonymous mappings are page-aligned and read as zeroes.
            Some(ptr) => return Chunk { ptr, capacity },
            None => alloc::handle_alloc_error(layout(capacity)),
        }
    }
    let layout = layout(capacity);
    // SAFETY: `layout` has a non-zero size (at least IO_ALIGN bytes).
    let raw = unsafe { alloc::alloc_zeroed(layout) };
    match NonNull::new(raw) {
        Some(ptr) => Chunk { ptr, capacity },
        None => alloc::handle_alloc_error(layout),
    }
}

/// Gives an allocation back to the system.
fn release(chunk: Chunk) {
    if chunk.capacity >= MMAP_MIN_BYTES {
        // SAFETY: chunks of this size were mapped by `allocate` with exactly
        // this length, and a `Chunk` is the only handle to its mapping, so
        // nothing refers to it after this.
        let rc = unsafe { libc::munmap(chunk.ptr.as_ptr().cast(), chunk.capacity) };
        debug_assert_eq!(rc, 0, "munmap of an IoBuf allocation failed");
    } else {
        // SAFETY: chunks of this size come from `alloc_zeroed` with this same
        // layout, and a `Chunk` is the only handle to its allocation.
        unsafe { alloc::dealloc(chunk.ptr.as_ptr(), layout(chunk.capacity)) }
    }
}

fn layout(capacity: usize) -> Layout {
    Layout::from_size_align(capacity, IO_ALIGN).expect("IoBuf capacity overflows isize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_powers_of_two_pages() {
        assert_eq!(class_of(0), Some((0, 4096)));
        assert_eq!(class_of(4096), Some((0, 4096)));
        assert_eq!(class_of(4097), Some((1, 8192)));
        assert_eq!(class_of(1 << 20), Some((8, 1 << 20)));
        assert_eq!(class_of((1 << 20) + 1), Some((9, 2 << 20)));
        assert_eq!(class_of(32 << 20), Some((13, 32 << 20)));
        assert_eq!(class_of((32 << 20) + 1), None);
    }

    #[test]
    fn idle_memory_stays_bounded() {
        // Other tests allocate concurrently, so only the bound is checked.
        let chunks: Vec<_> = (0..64).map(|_| take(1 << 20).0).collect();
        for chunk in chunks {
            give(chunk);
        }
        assert!(idle_bytes() <= IDLE_MAX_BYTES);
        assert!(POOL.classes[8].idle.lock().len() * (1 << 20) <= CLASS_IDLE_MAX_BYTES);
    }
}
