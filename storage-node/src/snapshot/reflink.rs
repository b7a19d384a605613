//! Reflinks: FICLONE, the ioctl that makes one file share every block of
//! another (XFS with `reflink=1`, btrfs), and FICLONERANGE, which does the
//! same for one block-aligned range. Used for snapshot copies (replica to
//! copy), the refresh of a prepared copy (changed ranges of the replica into
//! the copy) and restores (copy to replica). Neither file's data is read or
//! written: the destination's extent map is replaced by the source's, and
//! later writes to either file copy on write.

use std::fs::File;
use std::os::fd::AsRawFd;

use nix::errno::Errno;

mod sys {
    nix::ioctl_write_int_bad!(
        /// FICLONE is `_IOW(0x94, 9, int)`: the argument is the source
        /// descriptor, passed by value. The request number comes from libc.
        ficlone,
        libc::FICLONE
    );
    nix::ioctl_write_ptr_bad!(
        /// FICLONERANGE is `_IOW(0x94, 13, struct file_clone_range)`. The
        /// request number comes from libc.
        ficlonerange,
        libc::FICLONERANGE,
        libc::file_clone_range
    );
}

/// Makes `dst` (open for writing, on the same filesystem) share every block
/// of `src` (open for reading); `dst` takes `src`'s length. The filesystem
/// first flushes `src`'s dirty pages and waits for its direct I/O.
///
/// # Errors
///
/// The ioctl's error: see [`is_unsupported`] and [`is_no_space`]; `EBADF`
/// if `dst` is not open for writing, `ETXTBSY` for a swap file.
pub fn clone_file(src: &File, dst: &File) -> Result<(), Errno> {
    // SAFETY: both descriptors stay open for the call (the Files are
    // borrowed), and FICLONE takes its argument as an integer, not as a
    // pointer into our memory.
    unsafe { sys::ficlone(dst.as_raw_fd(), src.as_raw_fd()) }.map(drop)
}

/// Makes `length` bytes of `dst` (open for writing, on the same filesystem)
/// from `dst_offset` on share the blocks of `src` (open for reading) from
/// `src_offset` on. Offsets and the length must be multiples of the
/// filesystem's block size (4096 bytes on our pools), unless the range ends
/// at the end of `src`. `dst` grows if the range ends past its end.
///
/// # Errors
///
/// The ioctl's error, as for [`clone_file`]; `EINVAL` also for an unaligned
/// range or one past the end of `src`.
pub fn clone_range(
    src: &File,
    src_offset: u64,
    length: u64,
    dst: &File,
    dst_offset: u64,
) -> Result<(), Errno> {
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset,
        src_length: length,
        dest_offset: dst_offset,
    };
    // SAFETY: `range` is a valid `struct file_clone_range` that lives across
    // the call and is only read by the kernel; both descriptors stay open
    // for the call (the Files are borrowed).
    unsafe { sys::ficlonerange(dst.as_raw_fd(), &range) }.map(drop)
}

/// Returns whether a FICLONE error means the filesystem (or this pair of
/// files) cannot reflink: `EOPNOTSUPP` (no reflink support), `EXDEV`
/// (different filesystems), `EINVAL` (a filesystem or file that refuses).
pub fn is_unsupported(errno: Errno) -> bool {
    matches!(errno, Errno::EOPNOTSUPP | Errno::EXDEV | Errno::EINVAL)
}

/// Returns whether a FICLONE error means the filesystem has no room for the
/// new extent map (`ENOSPC`, `EDQUOT`).
pub fn is_no_space(errno: Errno) -> bool {
    matches!(errno, Errno::ENOSPC | Errno::EDQUOT)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn clone_on_tmpfs_is_unsupported() {
        // tmpfs (/dev/shm) cannot reflink: the error must classify as
        // unsupported, which callers answer with FAILED_PRECONDITION.
        let dir = tempfile::tempdir_in("/dev/shm").expect("tmpfs dir");
        let mut src = File::create(dir.path().join("src")).expect("src");
        src.write_all(b"bytes").expect("write");
        let src = File::open(dir.path().join("src")).expect("reopen src");
        let dst = File::create(dir.path().join("dst")).expect("dst");
        let errno = clone_file(&src, &dst).expect_err("tmpfs has no reflink");
        assert!(is_unsupported(errno), "{errno}");
        assert!(!is_no_space(errno));
    }
}
