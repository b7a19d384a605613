//! Byte ranges of files: where a file holds data (`SEEK_DATA`/`SEEK_HOLE`)
//! and where two reflinked files may differ (their FIEMAP extent maps).
//!
//! Both scans return a page: strictly ascending, non-overlapping ranges with
//! adjacent ones merged, clipped to the starting offset, at most `max`
//! ranges, and the offset where the next page starts (the end of the scanned
//! length when nothing is left). Neither scan reads or writes file data.
//!
//! # FIEMAP
//!
//! `FS_IOC_FIEMAP` is `_IOWR('f', 11, struct fiemap)`; the structures below
//! follow `include/uapi/linux/fiemap.h` (and
//! `Documentation/filesystems/fiemap.rst`) field for field. The request
//! number is computed by nix's `request_code_readwrite!` from the size of
//! the header, as the kernel's `_IOWR` does; the extents follow the header
//! in the same buffer. No crate on crates.io wraps FIEMAP with the kernel's
//! request-number macro and the flags we need while being widely used, so
//! this module carries the ~60 lines itself.
//!
//! Two files' extents at the same logical offset that map the same physical
//! address (in the same filesystem) hold the same bytes: that is what a
//! reflink shares until either file is written. Everything else is
//! "changed": a hole against data, different physical addresses, and any
//! extent whose physical address means nothing (flagged `UNKNOWN`,
//! `DELALLOC`, `ENCODED`, `DATA_ENCRYPTED`, `NOT_ALIGNED`, `DATA_INLINE` or
//! `DATA_TAIL`). Holes in both are unchanged.
//!
//! [`updates`] runs the same comparison for the refresh of a prepared copy
//! and also says, for each changed range, whether the newer file holds data
//! there (reflink it) or not (punch it). It counts unwritten extents
//! (`FIEMAP_EXTENT_UNWRITTEN`, preallocated blocks that read as zeros) as
//! holes, since a reflink does not share them.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// A byte range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub length: u64,
}

impl ByteRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// One page of ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RangesPage {
    /// The ranges, ascending, non-overlapping, adjacent ones merged.
    pub ranges: Vec<ByteRange>,
    /// Where the next page starts; the scanned length when nothing is left.
    pub next_offset: u64,
}

/// Collects ranges up to `max`, merging adjacent ones.
struct Collector {
    ranges: Vec<ByteRange>,
    max: usize,
}

impl Collector {
    fn new(max: usize) -> Self {
        Self {
            ranges: Vec::new(),
            max: max.max(1),
        }
    }

    /// Adds `[start, end)`; returns false (adding nothing) when the page is
    /// full and the range does not extend the last one.
    fn add(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        if let Some(last) = self.ranges.last_mut()
            && last.end() == start
        {
            last.length += end - start;
            return true;
        }
        if self.ranges.len() == self.max {
            return false;
        }
        self.ranges.push(ByteRange {
            offset: start,
            length: end - start,
        });
        true
    }
}

fn off(bytes: u64) -> Result<libc::off_t, Errno> {
    libc::off_t::try_from(bytes).map_err(|_| Errno::EOVERFLOW)
}

/// Returns the first byte at or after `pos` that holds data, or `None` if
/// there is none before `size`.
fn next_data(file: &File, pos: u64, size: u64) -> Result<Option<u64>, Errno> {
    if pos >= size {
        return Ok(None);
    }
    match lseek(file, off(pos)?, Whence::SeekData) {
        // A negative offset cannot come back from a successful lseek.
        Ok(at) => Ok(u64::try_from(at).ok().filter(|at| *at < size)),
        // No data at or after `pos`.
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Returns the ranges of `file` below `size` bytes that hold data, from
/// `start` on (a range that begins before `start` is clipped to it).
/// Unwritten (preallocated) extents count as holes where the filesystem
/// reports them so (XFS does).
///
/// # Errors
///
/// The `lseek` error (`EOVERFLOW` for offsets past `off_t`).
pub fn allocated(file: &File, size: u64, start: u64, max: usize) -> Result<RangesPage, Errno> {
    let mut page = Collector::new(max);
    let mut pos = start;
    while let Some(data) = next_data(file, pos, size)? {
        let hole = lseek(file, off(data)?, Whence::SeekHole)?;
        let end = u64::try_from(hole).unwrap_or(size).min(size);
        if !page.add(data, end) {
            return Ok(RangesPage {
                ranges: page.ranges,
                next_offset: data,
            });
        }
        pos = end;
    }
    Ok(RangesPage {
        ranges: page.ranges,
        next_offset: size,
    })
}

/// `struct fiemap_extent` from `linux/fiemap.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` from `linux/fiemap.h`, without its flexible array.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RawHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

const _: () = assert!(size_of::<RawExtent>() == 56 && size_of::<RawHeader>() == 32);

/// Extents asked for per ioctl.
const BATCH: usize = 128;

/// The ioctl's buffer: the header followed by room for `BATCH` extents.
#[repr(C)]
struct RawFiemap {
    header: RawHeader,
    extents: [RawExtent; BATCH],
}

const FIEMAP_FLAG_SYNC: u32 = 0x0001;
const FIEMAP_EXTENT_LAST: u32 = 0x0001;
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0002;
const FIEMAP_EXTENT_DELALLOC: u32 = 0x0004;
const FIEMAP_EXTENT_ENCODED: u32 = 0x0008;
const FIEMAP_EXTENT_DATA_ENCRYPTED: u32 = 0x0080;
const FIEMAP_EXTENT_NOT_ALIGNED: u32 = 0x0100;
const FIEMAP_EXTENT_DATA_INLINE: u32 = 0x0200;
const FIEMAP_EXTENT_DATA_TAIL: u32 = 0x0400;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0800;

/// Extent flags under which the physical address says nothing about the
/// bytes (see the module docs).
const INCOMPARABLE: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL;

mod sys {
    use super::{RawFiemap, RawHeader};

    nix::ioctl_readwrite_bad!(
        /// `FS_IOC_FIEMAP`: `_IOWR('f', 11, struct fiemap)`.
        fs_ioc_fiemap,
        nix::request_code_readwrite!(b'f', 11, size_of::<RawHeader>()),
        RawFiemap
    );
}

/// One extent of a file's map, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

impl Extent {
    fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    fn comparable(&self) -> bool {
        self.flags & INCOMPARABLE == 0
    }

    /// The device offset of file offset `pos` (inside the extent).
    fn physical_at(&self, pos: u64) -> u64 {
        self.physical.wrapping_add(pos - self.logical)
    }
}

/// Walks a file's extent map forwards, fetching `BATCH` extents at a time.
struct ExtentCursor<'a> {
    file: &'a File,
    /// Extents are only needed below this offset.
    end: u64,
    batch: VecDeque<Extent>,
    next_fetch: u64,
    synced: bool,
    done: bool,
}

impl<'a> ExtentCursor<'a> {
    fn new(file: &'a File, start: u64, end: u64) -> Self {
        Self {
            file,
            end,
            batch: VecDeque::new(),
            next_fetch: start,
            synced: false,
            done: false,
        }
    }

    /// Returns the first extent that ends after `pos`, or `None` if the file
    /// maps nothing more below `end`.
    fn at_or_after(&mut self, pos: u64) -> Result<Option<Extent>, Errno> {
        loop {
            while let Some(e) = self.batch.front() {
                if e.end() > pos {
                    return Ok(Some(*e));
                }
                self.batch.pop_front();
            }
            if self.done {
                return Ok(None);
            }
            self.fetch(pos.max(self.next_fetch))?;
        }
    }

    fn fetch(&mut self, from: u64) -> Result<(), Errno> {
        if from >= self.end {
            self.done = true;
            return Ok(());
        }
        let mut buf = Box::new(RawFiemap {
            header: RawHeader {
                fm_start: from,
                fm_length: self.end - from,
                // Flush dirty pages once so that delayed allocations have
                // their blocks and a physical address.
                fm_flags: if self.synced { 0 } else { FIEMAP_FLAG_SYNC },
                fm_mapped_extents: 0,
                fm_extent_count: BATCH as u32,
                fm_reserved: 0,
            },
            extents: [RawExtent {
                fe_logical: 0,
                fe_physical: 0,
                fe_length: 0,
                fe_reserved64: [0; 2],
                fe_flags: 0,
                fe_reserved: [0; 3],
            }; BATCH],
        });
        // SAFETY: `buf` is a valid, exclusively borrowed `struct fiemap`
        // header followed by room for `fm_extent_count` extents, laid out as
        // in linux/fiemap.h; the kernel writes at most that many extents and
        // the buffer outlives the call. The descriptor is open (borrowed).
        unsafe { sys::fs_ioc_fiemap(self.file.as_raw_fd(), &mut *buf) }?;
        self.synced = true;
        let mapped = (buf.header.fm_mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            self.done = true;
            return Ok(());
        }
        for raw in &buf.extents[..mapped] {
            let extent = Extent {
                logical: raw.fe_logical,
                physical: raw.fe_physical,
                length: raw.fe_length,
                flags: raw.fe_flags,
            };
            if extent.flags & FIEMAP_EXTENT_LAST != 0 {
                self.done = true;
            }
            if extent.length > 0 {
                self.next_fetch = self.next_fetch.max(extent.end());
                self.batch.push_back(extent);
            }
        }
        // Past the range, or no progress (which would loop forever).
        if self.next_fetch >= self.end || self.next_fetch <= from {
            self.done = true;
        }
        Ok(())
    }
}

/// Returns the extent map of `file` between `start` and `end` bytes.
///
/// # Errors
///
/// The ioctl's error (`EOPNOTSUPP` where the filesystem has no FIEMAP).
pub fn extents(file: &File, start: u64, end: u64) -> Result<Vec<Extent>, Errno> {
    let mut cursor = ExtentCursor::new(file, start, end);
    let mut out = Vec::new();
    let mut pos = start;
    while let Some(e) = cursor.at_or_after(pos)? {
        out.push(e);
        pos = e.end();
        if pos >= end {
            break;
        }
    }
    Ok(out)
}

/// What one file has at an offset, and up to where that holds.
#[derive(Debug, Clone, Copy)]
enum Mapping {
    /// Past the file's size (only the base can be shorter).
    Past,
    Hole,
    Data(Extent),
}

fn mapping_at(cursor: &mut ExtentCursor<'_>, pos: u64, size: u64) -> Result<(Mapping, u64), Errno> {
    if pos >= size {
        return Ok((Mapping::Past, u64::MAX));
    }
    Ok(match cursor.at_or_after(pos)? {
        None => (Mapping::Hole, size),
        Some(e) if e.logical > pos => (Mapping::Hole, e.logical.min(size)),
        Some(e) => (Mapping::Data(e), e.end().min(size)),
    })
}

/// Which of the two files a FIEMAP error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The older file.
    Base,
    /// The newer file.
    Target,
}

/// Returns the ranges below `target_size` bytes, from `start` on, where
/// `target` may differ from `base` (see the module docs); past
/// `base_size` everything counts as changed. `same_filesystem` must be true
/// only if both files are on one filesystem: physical addresses are
/// compared only then.
///
/// # Errors
///
/// The FIEMAP error and the file it came from.
pub fn changed(
    base: (&File, u64),
    target: (&File, u64),
    same_filesystem: bool,
    start: u64,
    max: usize,
) -> Result<RangesPage, (Side, Errno)> {
    let (base, base_size) = base;
    let (target, end) = target;
    let mut base_cursor = ExtentCursor::new(base, start, base_size.min(end));
    let mut target_cursor = ExtentCursor::new(target, start, end);
    let mut page = Collector::new(max);
    let mut pos = start;
    while pos < end {
        let (b, b_until) =
            mapping_at(&mut base_cursor, pos, base_size).map_err(|e| (Side::Base, e))?;
        let (t, t_until) =
            mapping_at(&mut target_cursor, pos, end).map_err(|e| (Side::Target, e))?;
        let until = b_until.min(t_until).min(end);
        let unchanged = match (b, t) {
            (Mapping::Hole, Mapping::Hole) => true,
            (Mapping::Data(b), Mapping::Data(t)) => {
                same_filesystem
                    && b.comparable()
                    && t.comparable()
                    && b.physical_at(pos) == t.physical_at(pos)
            }
            _ => false,
        };
        if !unchanged && !page.add(pos, until) {
            return Ok(RangesPage {
                ranges: page.ranges,
                next_offset: pos,
            });
        }
        pos = until;
    }
    Ok(RangesPage {
        ranges: page.ranges,
        next_offset: end,
    })
}

/// What makes a range of an older reflink equal to the newer file again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The newer file holds data here: reflink the range from it.
    Clone(ByteRange),
    /// The newer file has a hole (or unwritten blocks) here, the older one
    /// data: punch the range.
    Punch(ByteRange),
}

impl Update {
    /// The range to update.
    pub fn range(&self) -> ByteRange {
        match self {
            Self::Clone(r) | Self::Punch(r) => *r,
        }
    }
}

/// Returns the ranges below `size` bytes, from `start` on, in which `older`
/// may differ from `newer`, with what makes them equal, at most `max`
/// entries (adjacent ones of one kind merged), and the offset where the
/// next page starts (`size` when nothing is left). Both files must be on
/// one filesystem and at least `size` bytes long.
///
/// # Errors
///
/// The FIEMAP error and the file it came from ([`Side::Base`] for `older`).
pub fn updates(
    older: &File,
    newer: &File,
    size: u64,
    start: u64,
    max: usize,
) -> Result<(Vec<Update>, u64), (Side, Errno)> {
    let mut older_cursor = ExtentCursor::new(older, start, size);
    let mut newer_cursor = ExtentCursor::new(newer, start, size);
    let max = max.max(1);
    let mut out: Vec<Update> = Vec::new();
    let mut pos = start;
    while pos < size {
        let (o, o_until) = mapping_at(&mut older_cursor, pos, size).map_err(|e| (Side::Base, e))?;
        let (n, n_until) =
            mapping_at(&mut newer_cursor, pos, size).map_err(|e| (Side::Target, e))?;
        let until = o_until.min(n_until).min(size);
        let update = match (written(o), written(n)) {
            (None, None) => None,
            (Some(o), Some(n))
                if o.comparable() && n.comparable() && o.physical_at(pos) == n.physical_at(pos) =>
            {
                None
            }
            (_, Some(_)) => Some(Update::Clone(ByteRange {
                offset: pos,
                length: until - pos,
            })),
            (Some(_), None) => Some(Update::Punch(ByteRange {
                offset: pos,
                length: until - pos,
            })),
        };
        if let Some(update) = update {
            let merged = match (out.last_mut(), update) {
                (Some(Update::Clone(last)), Update::Clone(r))
                | (Some(Update::Punch(last)), Update::Punch(r))
                    if last.end() == r.offset =>
                {
                    last.length += r.length;
                    true
                }
                _ => false,
            };
            if !merged {
                if out.len() == max {
                    return Ok((out, pos));
                }
                out.push(update);
            }
        }
        pos = until;
    }
    Ok((out, size))
}

/// The extent that holds written data, if the mapping is one.
fn written(mapping: Mapping) -> Option<Extent> {
    match mapping {
        Mapping::Data(e) if e.flags & FIEMAP_EXTENT_UNWRITTEN == 0 => Some(e),
        Mapping::Data(_) | Mapping::Hole | Mapping::Past => None,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    const K4: u64 = 4096;

    #[test]
    fn collector_merges_and_stops_when_full() {
        let mut c = Collector::new(2);
        assert!(c.add(0, 10));
        assert!(c.add(10, 20));
        assert!(c.add(30, 40));
        assert!(c.add(40, 50));
        assert!(c.add(50, 50));
        assert!(!c.add(60, 70));
        assert_eq!(
            c.ranges,
            vec![
                ByteRange {
                    offset: 0,
                    length: 20
                },
                ByteRange {
                    offset: 30,
                    length: 20
                }
            ]
        );
    }

    /// A sparse file in a temporary directory (tmpfs and most local
    /// filesystems report holes at page granularity).
    fn sparse(size: u64, written: &[(u64, u64)]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .expect("create");
        file.set_len(size).expect("set_len");
        for &(offset, len) in written {
            file.write_all_at(&vec![0x5a; len as usize], offset)
                .expect("write");
        }
        file.sync_all().expect("sync");
        (dir, file)
    }

    #[test]
    fn allocated_pages_through_a_sparse_file() {
        let size = 64 * K4;
        let (_dir, file) = sparse(size, &[(K4, K4), (10 * K4, 3 * K4), (40 * K4, K4)]);
        let all = allocated(&file, size, 0, 1024).expect("allocated");
        if all.ranges.len() == 1 && all.ranges[0].length == size {
            // The filesystem under the temp dir reports no holes.
            return;
        }
        let want = vec![
            ByteRange {
                offset: K4,
                length: K4,
            },
            ByteRange {
                offset: 10 * K4,
                length: 3 * K4,
            },
            ByteRange {
                offset: 40 * K4,
                length: K4,
            },
        ];
        assert_eq!(all.ranges, want);
        assert_eq!(all.next_offset, size);

        let first = allocated(&file, size, 11 * K4, 1).expect("page");
        assert_eq!(
            first.ranges,
            vec![ByteRange {
                offset: 11 * K4,
                length: 2 * K4
            }]
        );
        assert_eq!(first.next_offset, 40 * K4);
        let second = allocated(&file, size, first.next_offset, 1).expect("page");
        assert_eq!(second.ranges, want[2..].to_vec());
        assert_eq!(second.next_offset, size);
        let none = allocated(&file, size, 41 * K4, 1).expect("page");
        assert!(none.ranges.is_empty());
        assert_eq!(none.next_offset, size);
        // A size below the file's length clips.
        let clipped = allocated(&file, 11 * K4, 0, 8).expect("clipped");
        assert_eq!(clipped.ranges.last().map(ByteRange::end), Some(11 * K4));
    }
}
