//! Allocation queries on replica files (`SEEK_DATA` / `SEEK_HOLE`) and the
//! region hash used by rebuilds.
//!
//! The queries use their own read-only descriptor of the data file: the
//! allocation map belongs to the file, not the descriptor, so it is the same
//! one the `O_DIRECT` data path writes through. The answers are a snapshot:
//! writes running concurrently may change them, which rebuild tolerates
//! because every write during a rebuild also reaches the rebuilding replica.
//!
//! File systems without `SEEK_DATA` report everything as data (the kernel's
//! generic implementation), which is always correct, only slower to copy.

use std::fs::File;
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use super::Extent;

/// Lists the allocated ranges of the file at `path` within `offset..end`,
/// ascending and clipped to the range, stopping after `max_extents`.
///
/// Returns the extents and the offset up to which the list is complete:
/// `end`, or the end of the last extent when `max_extents` stopped the walk.
/// Blocking: run it on the blocking pool.
pub(crate) fn data_extents(
    path: &Path,
    offset: u64,
    end: u64,
    max_extents: usize,
) -> io::Result<(Vec<Extent>, u64)> {
    let file = File::open(path)?;
    let mut extents = Vec::new();
    let mut pos = offset;
    while pos < end {
        if extents.len() >= max_extents {
            return Ok((extents, pos));
        }
        let data = match seek(&file, pos, Whence::SeekData) {
            Ok(data) => data,
            // No data at or after `pos`.
            Err(Errno::ENXIO) => break,
            // No SEEK_DATA support at all: say everything is data.
            Err(Errno::EINVAL) if extents.is_empty() && pos == offset => {
                extents.push(Extent {
                    offset,
                    length: end - offset,
                });
                break;
            }
            Err(errno) => return Err(errno.into()),
        };
        if data >= end {
            break;
        }
        let hole = match seek(&file, data, Whence::SeekHole) {
            Ok(hole) => hole,
            // The file shrank under us; the rest reads as nothing.
            Err(Errno::ENXIO) => end,
            Err(errno) => return Err(errno.into()),
        };
        let stop = hole.clamp(data + 1, end);
        extents.push(Extent {
            offset: data,
            length: stop - data,
        });
        pos = stop;
    }
    Ok((extents, end))
}

fn seek(file: &File, pos: u64, whence: Whence) -> Result<u64, Errno> {
    let pos = libc::off_t::try_from(pos).map_err(|_| Errno::EOVERFLOW)?;
    let found = lseek(file, pos, whence)?;
    u64::try_from(found).map_err(|_| Errno::EOVERFLOW)
}

/// True when no extent of the ascending, non-overlapping `extents`
/// intersects `offset..offset + length`.
pub(crate) fn is_hole(extents: &[Extent], offset: u64, length: u64) -> bool {
    let end = offset + length;
    // The first extent ending after `offset` is the only candidate.
    let first = extents.partition_point(|e| e.end() <= offset);
    extents.get(first).is_none_or(|e| e.offset >= end)
}

/// XXH3-128 of `data`.
pub(crate) fn hash(data: &[u8]) -> u128 {
    xxh3_128(data)
}

/// XXH3-128 of `length` zero bytes, computed without allocating them.
pub(crate) fn zeroes_hash(length: u64) -> u128 {
    static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut hasher = Xxh3::new();
    let mut left = length;
    while left > 0 {
        let chunk = left.min(ZEROES.len() as u64) as usize;
        hasher.update(&ZEROES[..chunk]);
        left -= chunk as u64;
    }
    hasher.digest128()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_hash_equals_hash_of_zero_bytes() {
        for len in [0usize, 1, 4096, 65_536, 65_537, 1 << 20] {
            assert_eq!(zeroes_hash(len as u64), hash(&vec![0; len]), "{len} bytes");
        }
        assert_ne!(zeroes_hash(4096), zeroes_hash(8192));
    }

    #[test]
    fn is_hole_checks_intersection() {
        let extents = [
            Extent {
                offset: 4096,
                length: 4096,
            },
            Extent {
                offset: 16384,
                length: 8192,
            },
        ];
        assert!(is_hole(&extents, 0, 4096));
        assert!(!is_hole(&extents, 0, 4097));
        assert!(!is_hole(&extents, 8191, 1));
        assert!(is_hole(&extents, 8192, 8192));
        assert!(!is_hole(&extents, 8192, 8193));
        assert!(is_hole(&extents, 24576, 1 << 20));
        assert!(is_hole(&[], 0, 1 << 30));
    }
}
