//! Snapshot hooks on this node: a user's command run before a volume is
//! frozen and cut (`ballast.io/pre-hook`, e.g. a database CHECKPOINT) or
//! after it is thawed (`ballast.io/post-hook`).
//!
//! The command runs as `sh -c COMMAND` with the volume's staging path and
//! ids in its environment, in a process group of its own, so that at its
//! timeout the shell and everything it started are killed together. It
//! must never run without a timeout, and never with the node plugin's
//! stdin.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::{info, warn};

/// Longest a hook may run.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes of a hook's output kept for its answer (the tail).
pub const OUTPUT_TAIL_BYTES: usize = 4096;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the freeze and the cut.
    Pre,
    /// After the thaw.
    Post,
}

impl Phase {
    /// `pre` or `post`, as `BALLAST_HOOK_PHASE` and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Post => "post",
        }
    }

    /// Parses [`Phase::as_str`]'s spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pre" => Some(Phase::Pre),
            "post" => Some(Phase::Post),
            _ => None,
        }
    }
}

/// One hook to run.
#[derive(Debug, Clone)]
pub struct Hook<'a> {
    /// The member volume.
    pub volume_id: &'a str,
    /// The snapshot (or group snapshot) being taken.
    pub snapshot_id: &'a str,
    /// Before or after the cut.
    pub phase: Phase,
    /// A shell command line.
    pub command: &'a str,
    /// Longest it may run.
    pub timeout: Duration,
    /// The volume's staging path on this node, if staged here.
    pub mount_path: Option<&'a Path>,
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command is empty, or the timeout out of range.
    #[error("Invalid hook: {0}")]
    InvalidArgument(String),
    /// `sh` could not be started.
    #[error("Cannot start the {phase} hook {command:?}")]
    Spawn {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("The {phase} hook {command:?} failed ({status}): {output}")]
    Failed {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its output.
        output: String,
    },
    /// The command outlived its timeout and was killed.
    #[error(
        "The {phase} hook {command:?} did not finish within {timeout:?} and was killed: {output}"
    )]
    Timeout {
        /// `pre` or `post`.
        phase: &'static str,
        /// The command.
        command: String,
        /// Its timeout.
        timeout: Duration,
        /// The tail of its output so far (empty: it is not collected
        /// from a killed hook).
        output: String,
    },
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::Spawn { .. } => tonic::Status::internal(message),
            Error::Failed { .. } => tonic::Status::failed_precondition(message),
            Error::Timeout { .. } => tonic::Status::deadline_exceeded(message),
        }
    }
}

/// Runs `hook` to completion within its timeout; returns the tail of
/// its standard output and error.
///
/// # Errors
///
/// [`Error::InvalidArgument`], [`Error::Spawn`], [`Error::Failed`] for an
/// unsuccessful exit, [`Error::Timeout`] (the whole process group is
/// killed).
pub async fn run(hook: &Hook<'_>) -> Result<String, Error> {
    if hook.command.trim().is_empty() {
        return Err(Error::InvalidArgument("the command is empty".into()));
    }
    if hook.timeout.is_zero() || hook.timeout > MAX_TIMEOUT {
        return Err(Error::InvalidArgument(format!(
            "the timeout must be between 1 ms and {MAX_TIMEOUT:?}, not {:?}",
            hook.timeout
        )));
    }
    let phase = hook.phase.as_str();
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(hook.command)
        .env("BALLAST_VOLUME_ID", hook.volume_id)
        .env("BALLAST_SNAPSHOT_ID", hook.snapshot_id)
        .env("BALLAST_HOOK_PHASE", phase)
        .env(
            "BALLAST_MOUNT_PATH",
            hook.mount_path.unwrap_or(Path::new("")),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().map_err(|source| Error::Spawn {
        phase,
        command: hook.command.to_string(),
        source,
    })?;
    let group = child.id().and_then(|id| i32::try_from(id).ok());
    info!(volume.id = %hook.volume_id, snapshot.id = %hook.snapshot_id, phase, command = %hook.command, "Running hook");
    match tokio::time::timeout(hook.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let output = tail(&out.stdout, &out.stderr);
            if out.status.success() {
                Ok(output)
            } else {
                let status = match (out.status.code(), out.status.signal()) {
                    (Some(code), _) => format!("exit code {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    (None, None) => out.status.to_string(),
                };
                Err(Error::Failed {
                    phase,
                    command: hook.command.to_string(),
                    status,
                    output,
                })
            }
        }
        Ok(Err(source)) => Err(Error::Spawn {
            phase,
            command: hook.command.to_string(),
            source,
        }),
        Err(_) => {
            // The shell itself died with the future (kill_on_drop); what
            // it started must go too.
            if let Some(group) = group
                && let Err(err) = killpg(Pid::from_raw(group), Signal::SIGKILL)
            {
                warn!(volume.id = %hook.volume_id, %err, "Cannot kill the process group of a timed-out hook");
            }
            Err(Error::Timeout {
                phase,
                command: hook.command.to_string(),
                timeout: hook.timeout,
                output: String::new(),
            })
        }
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] of stdout then stderr, as text.
fn tail(stdout: &[u8], stderr: &[u8]) -> String {
    let mut all = String::from_utf8_lossy(stdout).into_owned();
    all.push_str(&String::from_utf8_lossy(stderr));
    let all = all.trim();
    let mut start = all.len().saturating_sub(OUTPUT_TAIL_BYTES);
    while !all.is_char_boundary(start) {
        start += 1;
    }
    all[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(command: &str, timeout: Duration) -> Hook<'_> {
        Hook {
            volume_id: "vol-1",
            snapshot_id: "snap-1",
            phase: Phase::Pre,
            command,
            timeout,
            mount_path: Some(Path::new("/mnt/vol-1")),
        }
    }

    #[tokio::test]
    async fn a_hook_sees_its_volume_in_the_environment() {
        let out = run(&hook(
            "echo $BALLAST_VOLUME_ID $BALLAST_SNAPSHOT_ID $BALLAST_HOOK_PHASE $BALLAST_MOUNT_PATH",
            Duration::from_secs(10),
        ))
        .await
        .expect("hook runs");
        assert_eq!(out, "vol-1 snap-1 pre /mnt/vol-1");
    }

    #[tokio::test]
    async fn a_failing_hook_reports_its_status_and_output() {
        let err = run(&hook(
            "echo no checkpoint >&2; exit 3",
            Duration::from_secs(10),
        ))
        .await
        .expect_err("exit 3 fails");
        let Error::Failed { status, output, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(status, "exit code 3");
        assert_eq!(output, "no checkpoint");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("still-running");
        let command = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let err = run(&hook(&command, Duration::from_millis(300)))
            .await
            .expect_err("times out");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        // The background child was killed with the group: it never
        // touches its marker.
        std::thread::sleep(Duration::from_secs(3));
        assert!(!marker.exists(), "a child of the hook outlived its timeout");
    }

    #[test]
    fn tails_keep_the_end_on_a_character_boundary() {
        let long = "é".repeat(OUTPUT_TAIL_BYTES);
        let kept = tail(long.as_bytes(), b"");
        assert!(kept.len() <= OUTPUT_TAIL_BYTES);
        assert!(kept.chars().all(|c| c == 'é'));
    }
}
