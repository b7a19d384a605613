//! One I/O operation as the kernel sees it: its file, buffer and progress,
//! how to build its SQE, and how a completion advances it.
//!
//! Shared by the engine's ring threads ([`super::ring`]) and the per-thread
//! rings ([`super::local`]); neither knows how the other delivers results.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};

use crate::buf::IoBuf;

/// Largest transfer submitted in one SQE, in bytes (the SQE length is a u32;
/// 1 GiB keeps continuations aligned for `O_DIRECT`).
const MAX_TRANSFER: usize = 1 << 30;

/// Times an operation is resubmitted after `EAGAIN` or `EINTR` without making
/// progress before the error is returned to the caller.
const MAX_RETRIES: u32 = 64;

/// One I/O operation. It owns everything its SQE points at (the buffer, the
/// file), so whoever holds it keeps that memory alive.
///
/// `done` counts bytes already transferred, so a short read or write is
/// continued from where it stopped.
pub(super) enum Op {
    Read {
        file: Arc<File>,
        offset: u64,
        buf: IoBuf,
        done: usize,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        buf: IoBuf,
        done: usize,
        dsync: bool,
    },
    Fsync {
        file: Arc<File>,
        datasync: bool,
    },
    Fallocate {
        file: Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// What to do with an operation after a completion.
pub(super) enum Step {
    /// Submit the rest of the operation again.
    Continue,
    /// Finish with this result (bytes transferred for reads and writes).
    Finish(io::Result<usize>),
}

impl Op {
    /// Gives back the buffer (an empty one for operations without).
    pub(super) fn into_buf(self) -> IoBuf {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
            Op::Fsync { .. } | Op::Fallocate { .. } => IoBuf::zeroed(0),
        }
    }

    /// The part of a read or write not yet done: (file offset, position in
    /// the buffer, length), all in bytes. None for other operations.
    pub(super) fn remaining(&self) -> Option<(u64, usize, usize)> {
        match self {
            Op::Read {
                offset, buf, done, ..
            }
            | Op::Write {
                offset, buf, done, ..
            } => {
                let len = (buf.len() - *done).min(MAX_TRANSFER);
                Some((*offset + *done as u64, *done, len))
            }
            Op::Fsync { .. } | Op::Fallocate { .. } => None,
        }
    }

    /// Builds the SQE for the part of the operation not yet done.
    ///
    /// The SQE points into `self`'s buffer and names `self`'s file: whoever
    /// pushes it must keep `self` alive (it may move: the buffer is a heap
    /// allocation of its own) until the matching CQE is reaped.
    pub(super) fn sqe(&mut self, user_data: u64) -> squeue::Entry {
        let (offset, position, len) = self.remaining().unwrap_or_default();
        let entry = match self {
            Op::Read { file, buf, .. } => {
                let ptr = buf.as_mut_ptr().wrapping_add(position);
                opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, len as u32)
                    .offset(offset)
                    .build()
            }
            Op::Write {
                file, buf, dsync, ..
            } => {
                let ptr = buf.as_ptr().wrapping_add(position);
                let rw_flags = if *dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, len as u32)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build()
            }
            Op::Fsync { file, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(flags)
                    .build()
            }
            Op::Fallocate {
                file,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(file.as_raw_fd()), *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
        };
        entry.user_data(user_data)
    }

    /// Accounts for a completion with result `res` (bytes or `-errno`).
    pub(super) fn advance(&mut self, res: i32, retries: &mut u32) -> Step {
        if res < 0 {
            let errno = -res;
            // Regular files rarely answer EAGAIN through io_uring (the kernel
            // retries in its worker pool), but some block layers do under
            // memory pressure; retrying a bounded number of times turns a
            // transient condition into a success rather than an I/O error.
            if (errno == libc::EAGAIN || errno == libc::EINTR) && *retries < MAX_RETRIES {
                *retries += 1;
                return Step::Continue;
            }
            return Step::Finish(Err(io::Error::from_raw_os_error(errno)));
        }
        let transferred = res as usize;
        match self {
            Op::Read { buf, done, .. } => {
                if transferred == 0 {
                    // End of file: the caller sees the short count.
                    return Step::Finish(Ok(*done));
                }
                *done = (*done + transferred).min(buf.len());
                *retries = 0;
                if *done < buf.len() {
                    Step::Continue
                } else {
                    Step::Finish(Ok(*done))
                }
            }
            Op::Write { buf, done, .. } => {
                if transferred == 0 && !buf.is_empty() {
                    return Step::Finish(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "Write made no progress",
                    )));
                }
                *done = (*done + transferred).min(buf.len());
                *retries = 0;
                if *done < buf.len() {
                    Step::Continue
                } else {
                    Step::Finish(Ok(*done))
                }
            }
            Op::Fsync { .. } | Op::Fallocate { .. } => Step::Finish(Ok(0)),
        }
    }
}
