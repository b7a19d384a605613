//! Daemon processes of a local cluster: starting them detached, recognising
//! them later, and stopping them.
//!
//! A daemon is started in its own session (`setsid`), with stdin from
//! `/dev/null` and stdout and stderr appended to its log file, so it
//! outlives the `ballast cluster up` that started it and ignores the
//! terminal's signals. Its pid is recorded together with its start time
//! (field 22 of `/proc/<pid>/stat`): a later `cluster down` signals a pid
//! only if the process there started at the recorded time, so a recycled
//! pid is never touched.

use std::fs;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, Signal};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::Error;

/// A daemon as `cluster.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// The command line it was started with.
    pub command: Vec<String>,
}

impl ProcessInfo {
    /// True if the recorded process still runs (same pid, same start time,
    /// not a zombie).
    pub fn is_running(&self) -> bool {
        matches!(stat(self.pid), Some((start, state)) if start == self.start_time && state != 'Z')
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `signal` if the process still runs; a process that is gone is
    /// not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Signal`] if the system refuses.
    pub fn signal(&self, signal: Signal) -> Result<(), Error> {
        if !self.is_running() {
            return Ok(());
        }
        match signal::kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(source) => Err(Error::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    /// Stops the process with SIGSTOP and waits up to `within` until every
    /// thread of it is stopped (a hung node in tests: nothing it was about
    /// to send goes out after this returns).
    ///
    /// # Errors
    ///
    /// [`Error::Stop`] if it cannot be signalled or still runs.
    pub fn stop(&self, within: Duration) -> Result<(), Error> {
        Ok(ballast_storage_node::host::process::stop(self.pid, within)?)
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            reap(self.pid);
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Stops `processes`: SIGTERM to all, up to `grace` for them to exit, then
/// SIGKILL to the rest and up to 10 s more. Returns the processes that
/// still run after that.
///
/// # Errors
///
/// [`Error::Signal`] if a signal cannot be sent.
pub fn stop_all(processes: &[&ProcessInfo], grace: Duration) -> Result<Vec<ProcessInfo>, Error> {
    for process in processes {
        process.signal(Signal::SIGTERM)?;
    }
    let deadline = Instant::now() + grace;
    for process in processes {
        process.wait_exit(deadline.saturating_duration_since(Instant::now()));
    }
    let mut survivors = Vec::new();
    for process in processes {
        if process.is_running() {
            process.signal(Signal::SIGKILL)?;
            if !process.wait_exit(Duration::from_secs(10)) {
                survivors.push((*process).clone());
            }
        }
    }
    Ok(survivors)
}

/// Starts `program` with `args` as a daemon logging to `log`.
///
/// # Errors
///
/// [`Error::Io`] if the log cannot be opened, [`Error::Spawn`] if the
/// program cannot be started.
pub fn spawn_daemon(program: &Path, args: &[String], log: &Path) -> Result<ProcessInfo, Error> {
    let mut out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| Error::Io {
            path: log.to_path_buf(),
            source,
        })?;
    let command_line: Vec<String> = std::iter::once(program.display().to_string())
        .chain(args.iter().cloned())
        .collect();
    // A header line separates the runs of one log file.
    let _ = writeln!(
        out,
        "--- ballast cluster: starting {}",
        command_line.join(" ")
    );
    let err = out.try_clone().map_err(|source| Error::Io {
        path: log.to_path_buf(),
        source,
    })?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        // Logs go to files: no colour escapes, and no backtraces captured
        // for ordinary errors (a panic still gets one with RUST_BACKTRACE),
        // so the reason a daemon stopped is in the last lines of its log.
        .env("NO_COLOR", "1")
        .env("RUST_LIB_BACKTRACE", "0");
    // SAFETY: the closure runs in the forked child before exec and makes a
    // single async-signal-safe system call (setsid); it allocates nothing
    // and takes no lock.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().map_err(|source| Error::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    let pid = i32::try_from(child.id()).map_err(|_| Error::Spawn {
        program: program.to_path_buf(),
        source: std::io::Error::other("process id out of range"),
    })?;
    // The child is not waited for here: it is a daemon. If this process
    // lives on (a test), `wait_exit` reaps it after it is stopped.
    drop(child);
    let start_time = stat(pid).map(|(start, _)| start).unwrap_or(0);
    Ok(ProcessInfo {
        pid,
        start_time,
        log: log.to_path_buf(),
        command: command_line,
    })
}

/// Start time (clock ticks after boot) and state letter of `pid` from
/// `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(u64, char)> {
    let stat = procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .ok()?;
    Some((stat.starttime, stat.state))
}

/// Reaps `pid` if it is an exited child of this process (a no-op for any
/// other process).
fn reap(pid: i32) {
    let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_is_recognised_stopped_and_not_confused_with_a_recycled_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("sleep.log");
        let info =
            spawn_daemon(Path::new("/bin/sleep"), &["30".to_string()], &log).expect("spawn sleep");
        assert!(info.is_running());
        assert!(info.start_time > 0);
        let recycled = ProcessInfo {
            start_time: info.start_time + 1,
            ..info.clone()
        };
        assert!(
            !recycled.is_running(),
            "another start time is another process"
        );
        recycled.signal(Signal::SIGKILL).expect("no-op");
        assert!(info.is_running(), "the recycled record signalled nothing");
        let survivors = stop_all(&[&info], Duration::from_secs(5)).expect("stop");
        assert!(survivors.is_empty());
        assert!(!info.is_running());
        assert!(info.log_tail(5).contains("starting /bin/sleep 30"));
    }
}
