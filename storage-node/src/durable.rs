//! Atomic, durable replacement of small files (pool labels, replica metadata).
//!
//! [`replace`] writes the new contents to a temporary file in the target's own
//! directory, fsyncs it, renames it over the target and fsyncs the directory.
//! After a crash at any point a reader finds either the complete old contents
//! or the complete new ones, never a torn mix, and once [`replace`] has
//! returned the new contents survive a crash.
//!
//! Temporary files are named `.<target name>.tmp.<pid>.<n>`. Callers that scan
//! a directory skip names starting with a dot and may delete leftovers found by
//! [`is_temp_name`] (a crash between create and rename leaves one behind).
//!
//! This module must never write in place: a partially written label or
//! metadata file would make a pool or a replica unreadable after a crash.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix marker that every temporary file created by [`replace`] carries.
const TEMP_MARKER: &str = ".tmp.";

/// Distinguishes temporary files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Atomically and durably replaces `path` with `contents`.
///
/// The file is created with mode 0644 if it does not exist. On return the new
/// contents and the directory entry are on stable storage.
///
/// # Errors
///
/// Returns the I/O error of the first step that failed (create, write, fsync,
/// rename or the directory fsync). If the rename has not happened the target is
/// untouched and the temporary file is removed; if only the directory fsync
/// failed the new contents are visible but may not survive a crash.
pub fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path)?;
    let tmp = temp_path(path)?;
    let written = write_synced(&tmp, contents).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // The temp file is garbage whatever happened; the original error is
        // the one worth reporting.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Removes `path` and fsyncs its directory so the removal survives a crash.
///
/// # Errors
///
/// Returns the error of `unlink` (including `NotFound`) or of the directory
/// fsync.
pub fn remove(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    sync_dir(parent_dir(path)?)
}

/// Removes a file pair whose metadata file is its commit point: the
/// metadata first (durably), then the data. A missing file is not an
/// error. Returns the error of removing the data, which the caller only
/// reports: without its metadata the data file is an unfinished file that
/// the next start-up removes.
///
/// # Errors
///
/// Returns the error of removing the metadata file (nothing is removed).
pub fn remove_committed(meta_path: &Path, data_path: &Path) -> io::Result<Option<io::Error>> {
    match remove(meta_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match remove(data_path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Ok(Some(e)),
    }
}

/// Fsyncs a directory, making creations, renames and removals of its entries
/// durable.
///
/// # Errors
///
/// Returns the error of opening or fsyncing the directory.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Returns whether a directory entry name is a temporary file left by
/// [`replace`].
pub fn is_temp_name(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARKER))
}

fn write_synced(tmp: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn parent_dir(path: &Path) -> io::Result<&Path> {
    match path.parent() {
        // A bare file name has an empty parent: the current directory.
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(invalid_target(path)),
    }
}

/// Returns a new temporary name next to `path` (see the module docs), for
/// callers that make a file there and rename it into place themselves.
///
/// # Errors
///
/// `InvalidInput` if `path` has no UTF-8 file name.
pub(crate) fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or_else(|| invalid_target(path))?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{name}{TEMP_MARKER}{}.{n}", std::process::id());
    Ok(path.with_file_name(tmp))
}

fn invalid_target(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("Not a file path with a UTF-8 name: {}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replace_creates_then_overwrites_without_leftovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("label.json");

        replace(&target, b"first").expect("create");
        assert_eq!(fs::read(&target).expect("read"), b"first");

        replace(&target, b"second, longer").expect("overwrite");
        assert_eq!(fs::read(&target).expect("read"), b"second, longer");

        replace(&target, b"3").expect("shrink");
        assert_eq!(fs::read(&target).expect("read"), b"3");
        assert_eq!(entries(dir.path()), vec!["label.json".to_owned()]);
    }

    #[test]
    fn failed_replace_leaves_target_and_no_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("meta.json");
        replace(&target, b"old").expect("create");

        // A directory where the target should be makes the rename fail after
        // the temp file was written.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).expect("mkdir");
        fs::write(blocked.join("inner"), b"x").expect("fill dir");
        let err = replace(&blocked, b"new").expect_err("rename over a non-empty dir");
        assert_ne!(err.kind(), io::ErrorKind::NotFound, "{err}");

        assert_eq!(fs::read(&target).expect("read"), b"old");
        assert_eq!(
            entries(dir.path()),
            vec!["blocked".to_owned(), "meta.json".to_owned()]
        );
    }

    #[test]
    fn replace_in_missing_dir_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = replace(&dir.path().join("nope/x.json"), b"x").expect_err("no dir");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn remove_deletes_and_reports_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("x");
        replace(&target, b"x").expect("create");
        remove(&target).expect("remove");
        assert!(!target.exists());
        let err = remove(&target).expect_err("second remove");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn temp_names_are_recognised() {
        let target = Path::new("/pool/replicas/r1.meta.json");
        let tmp = temp_path(target).expect("temp path");
        assert_eq!(tmp.parent(), target.parent());
        assert!(is_temp_name(tmp.file_name().expect("name")));
        assert!(!is_temp_name(OsStr::new("r1.meta.json")));
        assert!(!is_temp_name(OsStr::new("r1.tmp.data")));
        assert!(temp_path(Path::new("/")).is_err());
    }
}
