//! Runs external programs with a deadline: the tools the node plugin relies
//! on (`losetup`, `blkid`, `mkfs.*`, `resize2fs`, `fusermount3`,
//! `nbd-client`) and the demo's PostgreSQL clients (`initdb`, `psql`,
//! `pgbench`, `pg_amcheck`).
//!
//! Every call is bounded: a tool that hangs (a dead NBD server under a loop
//! device can make `blkid` wait forever) is killed when its deadline passes
//! and reported as [`Error::Timeout`]. Output is captured; stdin is closed.

use std::ffi::OsStr;
use std::process::{Output, Stdio};
use std::time::Duration;

/// Why a tool could not be run to success.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program could not be started (missing binary, permissions).
    #[error("Cannot start {program}")]
    Spawn {
        /// The program's name.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The program ran longer than its deadline and was killed.
    #[error("{program} did not finish within {timeout:?}")]
    Timeout {
        /// The program's name.
        program: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The program exited unsuccessfully.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The program's name.
        program: String,
        /// Its exit status, as printed by the standard library.
        status: String,
        /// Its exit code, if it exited normally.
        code: Option<i32>,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

/// Runs `program args...` to completion within `timeout` and returns its
/// output whatever the exit status.
///
/// # Cancel safety
///
/// Dropping the future kills the child (`kill_on_drop`).
pub(crate) async fn output<I, S>(program: &str, args: I, timeout: Duration) -> Result<Output, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null());
    output_of(command, program, timeout).await
}

/// Runs a prepared `command` (its user, environment and stdin as the
/// caller set them) to completion within `timeout`, capturing its output
/// whatever the exit status; `program` names it in errors.
///
/// # Cancel safety
///
/// Dropping the future kills the child (`kill_on_drop`).
pub(crate) async fn output_of(
    mut command: tokio::process::Command,
    program: &str,
    timeout: Duration,
) -> Result<Output, Error> {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.to_string(),
            source,
        })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(source)) => Err(Error::Spawn {
            program: program.to_string(),
            source,
        }),
        Err(_) => Err(Error::Timeout {
            program: program.to_string(),
            timeout,
        }),
    }
}

/// Like [`output`], but an unsuccessful exit is an [`Error::Failed`]; returns
/// standard output as text.
pub(crate) async fn run<I, S>(program: &str, args: I, timeout: Duration) -> Result<String, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = output(program, args, timeout).await?;
    if !out.status.success() {
        return Err(failed(program, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`output_of`], but an unsuccessful exit is an [`Error::Failed`].
pub(crate) async fn run_of(
    command: tokio::process::Command,
    program: &str,
    timeout: Duration,
) -> Result<Output, Error> {
    let out = output_of(command, program, timeout).await?;
    if !out.status.success() {
        return Err(failed(program, &out));
    }
    Ok(out)
}

/// The [`Error::Failed`] describing `out`. Its message is standard error,
/// or standard output for programs that report there (pg_amcheck).
pub(crate) fn failed(program: &str, out: &Output) -> Error {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    Error::Failed {
        program: program.to_string(),
        status: out.status.to_string(),
        code: out.status.code(),
        stderr: if stderr.is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            stderr
        },
    }
}
