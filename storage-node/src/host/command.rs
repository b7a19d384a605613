//! Runs external programs with a deadline: the tools the agent's pools
//! (`wipefs`, `mkfs.xfs`, `losetup`) and the node plugin (`losetup`,
//! `blkid`, `mkfs.*`, `resize2fs`, `fusermount3`, `nbd-client`) rely on,
//! and the demo's PostgreSQL clients (`initdb`, `psql`, `pgbench`,
//! `pg_amcheck`).
//!
//! Every call is bounded: a tool that hangs (a dead NBD server under a loop
//! device can make `blkid` wait forever) is killed when its deadline passes
//! and reported as [`Error::Timeout`]. Output is captured; stdin is closed.
//! [`output`] and [`run`] run the tool under the C locale, since callers
//! parse what it prints; a prepared command ([`output_of`], [`run_of`])
//! keeps the environment its caller gave it.
//!
//! This is the only place that starts a host tool: it must never offer a
//! way to run one without a deadline. Synchronous code (the pool code, which
//! runs on blocking threads) uses [`run_blocking`], which runs the same
//! future to completion on a thread of its own.

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
pub async fn output<I, S>(program: &str, args: I, timeout: Duration) -> Result<Output, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    tracing::debug!(
        program,
        args = ?args,
        timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        "Running"
    );
    let mut command = tokio::process::Command::new(program);
    command.args(&args).env("LC_ALL", "C").stdin(Stdio::null());
    output_of(command, program, timeout).await
}

/// Runs a prepared `command` (its user, environment and stdin as the
/// caller set them) to completion within `timeout`, capturing its output
/// whatever the exit status; `program` names it in errors.
///
/// # Cancel safety
///
/// Dropping the future kills the child (`kill_on_drop`).
pub async fn output_of(
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
pub async fn run<I, S>(program: &str, args: I, timeout: Duration) -> Result<String, Error>
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
pub async fn run_of(
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

/// Like [`run`], for synchronous callers: runs the same future on a
/// single-threaded runtime of its own, on a thread of its own, so it may
/// be called from any thread, inside an async runtime or not (it blocks
/// the caller until the tool ends or its deadline passes).
///
/// # Errors
///
/// As [`run`]; [`Error::Spawn`] also when the runtime cannot be built.
pub fn run_blocking<I, S>(program: &str, args: I, timeout: Duration) -> Result<String, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::Spawn {
                    program: program.to_string(),
                    source,
                })?;
            runtime.block_on(run(program, &args, timeout))
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The [`Error::Failed`] describing `out`. Its message is standard error,
/// or standard output for programs that report there (pg_amcheck).
pub fn failed(program: &str, out: &Output) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tool_past_its_deadline_is_killed() {
        let err = run("sleep", ["5"], Duration::from_millis(100))
            .await
            .expect_err("sleep 5 outlives 100 ms");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    }

    #[test]
    fn blocking_callers_get_the_deadline_too() {
        let err = run_blocking("sleep", ["5"], Duration::from_millis(100))
            .expect_err("sleep 5 outlives 100 ms");
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        let out =
            run_blocking("sh", ["-c", "echo $LC_ALL"], Duration::from_secs(10)).expect("sh runs");
        assert_eq!(out.trim(), "C", "tools run under the C locale");
    }

    #[tokio::test]
    async fn blocking_runner_works_inside_a_runtime() {
        let out = run_blocking("true", std::iter::empty::<&str>(), Duration::from_secs(10));
        assert_eq!(out.expect("true runs"), "");
    }

    #[test]
    fn failures_name_the_program_and_keep_stderr() {
        let err = run_blocking(
            "sh",
            ["-c", "echo oops >&2; exit 3"],
            Duration::from_secs(10),
        )
        .expect_err("exit 3");
        match err {
            Error::Failed {
                program,
                code,
                stderr,
                ..
            } => {
                assert_eq!(program, "sh");
                assert_eq!(code, Some(3));
                assert_eq!(stderr, "oops");
            }
            other => panic!("{other:?}"),
        }
        let missing = run_blocking("ballast-no-such-tool", ["x"], Duration::from_secs(10));
        assert!(matches!(missing, Err(Error::Spawn { .. })), "{missing:?}");
    }
}
