//! Runs the util-linux and xfsprogs tools the pool code shells out to.
//!
//! Output is parsed, so every tool runs under the C locale.

use std::ffi::OsStr;
use std::process::Command;

use super::Error;

/// Runs `program` with `args` and returns its standard output.
///
/// # Errors
///
/// [`Error::Spawn`] if the program could not be started (not installed),
/// [`Error::CommandFailed`] if it exited unsuccessfully; both name the command.
pub(super) fn run<I, S>(program: &'static str, args: I) -> Result<String, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let command_line = std::iter::once(program.to_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!(command = %command_line, "Running");
    let output = Command::new(program)
        .args(&args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| Error::Spawn { program, source })?;
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: command_line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
