//! Stopping a process and knowing it has stopped: `kill(SIGSTOP)` only
//! queues the signal, and a thread already running on another core may go on
//! serving a request for a while. Callers that need "nothing answers from
//! now on" (a paused store, a hung agent in a test) wait here until the
//! kernel reports every thread of the process stopped (proc(5),
//! `/proc/<pid>/task/<tid>/stat`, state `T`, read with `procfs`). Blocks; async callers use
//! `spawn_blocking` or accept a wait of a few milliseconds.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How often the thread states are read while waiting.
const POLL: Duration = Duration::from_millis(2);

/// Why a process could not be stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system refused the signal (or the process is gone).
    #[error("Cannot send SIGSTOP to process {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// What kill(2) returned.
        source: Errno,
    },
    /// Some thread still ran when the wait ended.
    #[error("Process {pid} has a thread still running {waited:?} after SIGSTOP")]
    StillRunning {
        /// The process.
        pid: i32,
        /// How long the caller waited.
        waited: Duration,
    },
}

/// Sends SIGSTOP to `pid` and waits up to `within` until every one of its
/// threads is stopped.
///
/// # Errors
///
/// [`Error::Signal`] if the signal cannot be sent, [`Error::StillRunning`]
/// if a thread still runs at the end of the wait.
pub fn stop(pid: i32, within: Duration) -> Result<(), Error> {
    kill(Pid::from_raw(pid), Signal::SIGSTOP).map_err(|source| Error::Signal { pid, source })?;
    let deadline = Instant::now() + within;
    loop {
        if all_threads_stopped(pid) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::StillRunning {
                pid,
                waited: within,
            });
        }
        std::thread::sleep(POLL);
    }
}

/// True when every thread of `pid` is in state `T` (stopped) or `t`
/// (traced). A thread that exits while it is read is not running either; a
/// process that cannot be read at all is not stopped.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = procfs::process::Process::new(pid).and_then(|p| p.tasks()) else {
        return false;
    };
    let mut seen = 0usize;
    for task in tasks.flatten() {
        let Ok(stat) = task.stat() else { continue };
        seen += 1;
        if !matches!(stat.state, 'T' | 't') {
            return false;
        }
    }
    seen > 0
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn a_stopped_process_reports_every_thread_stopped() {
        let mut child = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid fits");
        assert!(!all_threads_stopped(pid), "sleep is not stopped yet");
        stop(pid, Duration::from_secs(5)).expect("stop sleep");
        assert!(all_threads_stopped(pid));
        child.kill().expect("kill sleep");
        child.wait().expect("reap sleep");
    }
}
