//! Byte-for-byte comparison of a volume's replica files on the nodes of a
//! local cluster: after a rebuild, every replica of an unpublished volume
//! must hold the same bytes.
//!
//! A replica is `<state dir>/pools/<pool>/replicas/<name>.data` on its node
//! (see `storage-node`'s `replica` module). The files are read through the
//! page cache of each node's pool filesystem, which is coherent with the
//! agents' direct I/O. Compare only while no target runs: a write landing
//! between two reads would show as a difference.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Bytes read from each file at a time.
const CHUNK: usize = 1 << 20;

/// Errors of the comparison.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node's replica file was not found.
    #[error("No replica file {name}.data under {state_dir}/pools/*/replicas")]
    NotFound {
        /// The node's state directory.
        state_dir: PathBuf,
        /// The replica name.
        name: String,
    },
    /// A file could not be read.
    #[error("Cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The file of replica `name` under an agent's `state_dir`.
///
/// # Errors
///
/// [`Error::NotFound`].
pub fn replica_file(state_dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let not_found = || Error::NotFound {
        state_dir: state_dir.to_path_buf(),
        name: name.to_string(),
    };
    let pools = std::fs::read_dir(state_dir.join("pools")).map_err(|_| not_found())?;
    pools
        .flatten()
        .map(|pool| pool.path().join("replicas").join(format!("{name}.data")))
        .find(|file| file.is_file())
        .ok_or_else(not_found)
}

/// Where the files first differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    /// Every file holds the same bytes; the size compared.
    Identical(u64),
    /// The first file and another differ in size.
    Size {
        /// The file that differs from the first.
        file: PathBuf,
        /// Its size.
        size: u64,
        /// The first file's size.
        expected: u64,
    },
    /// The first file and another differ at a byte offset.
    Content {
        /// The file that differs from the first.
        file: PathBuf,
        /// The offset of the first differing chunk.
        offset: u64,
    },
}

/// Compares `files` with the first of them, a chunk at a time.
///
/// # Errors
///
/// [`Error::Read`].
pub fn compare(files: &[PathBuf]) -> Result<Comparison, Error> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Read { path, source }
    };
    let Some(first) = files.first() else {
        return Ok(Comparison::Identical(0));
    };
    let size = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(read_error(path))
    };
    let expected = size(first)?;
    for file in &files[1..] {
        let got = size(file)?;
        if got != expected {
            return Ok(Comparison::Size {
                file: file.clone(),
                size: got,
                expected,
            });
        }
    }
    let mut readers = files
        .iter()
        .map(|path| File::open(path).map_err(read_error(path)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reference = vec![0u8; CHUNK];
    let mut other = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < expected {
        let len = usize::try_from((expected - offset).min(CHUNK as u64)).unwrap_or(CHUNK);
        readers[0]
            .read_exact(&mut reference[..len])
            .map_err(read_error(first))?;
        for (reader, path) in readers[1..].iter_mut().zip(&files[1..]) {
            reader
                .read_exact(&mut other[..len])
                .map_err(read_error(path))?;
            if other[..len] != reference[..len] {
                return Ok(Comparison::Content {
                    file: path.clone(),
                    offset,
                });
            }
        }
        offset += len as u64;
    }
    Ok(Comparison::Identical(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_and_different_files_are_told_apart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..(3 * CHUNK + 100)).map(|i| (i % 251) as u8).collect();
        let mut files = Vec::new();
        for name in ["a", "b", "c"] {
            let path = dir.path().join(name);
            std::fs::write(&path, &data).expect("write");
            files.push(path);
        }
        assert_eq!(
            compare(&files).expect("compare"),
            Comparison::Identical(data.len() as u64)
        );
        let mut changed = data.clone();
        changed[2 * CHUNK + 7] ^= 1;
        std::fs::write(&files[2], &changed).expect("write");
        assert_eq!(
            compare(&files).expect("compare"),
            Comparison::Content {
                file: files[2].clone(),
                offset: 2 * CHUNK as u64
            }
        );
        std::fs::write(&files[1], &data[..10]).expect("write");
        assert!(matches!(
            compare(&files).expect("compare"),
            Comparison::Size { size: 10, .. }
        ));
    }

    #[test]
    fn replica_files_are_found_in_any_pool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let replicas = dir.path().join("pools/pool0/replicas");
        std::fs::create_dir_all(&replicas).expect("dirs");
        std::fs::write(replicas.join("pvc-1.data"), "").expect("file");
        assert_eq!(
            replica_file(dir.path(), "pvc-1").expect("found"),
            replicas.join("pvc-1.data")
        );
        assert!(matches!(
            replica_file(dir.path(), "pvc-2"),
            Err(Error::NotFound { .. })
        ));
    }
}
