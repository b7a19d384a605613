//! The embedded cluster store: one redb file, for one-machine clusters,
//! tests and the demo.
//!
//! # Layout
//!
//! ```text
//! table "kv"   : &str -> (u64, &[u8])   key -> (mod revision, value)
//! table "meta" : &str -> u64            "revision" -> store revision
//!                                       "format"   -> FORMAT_VERSION
//! ```
//!
//! Every change is one redb write transaction that checks, applies the
//! operations stamped with `revision + 1`, and stores the new revision in
//! `meta`, so the counter and the data can never disagree, also across a
//! crash. redb commits with `Durability::Immediate` (fsync before `commit`
//! returns), so an `Ok` write survives a crash of the process or machine.
//! redb admits one write transaction at a time, which is what makes the
//! checks and the writes of a [`Txn`] atomic.
//!
//! redb calls block, so they run on tokio's blocking pool. redb locks the
//! file: a second process (or a second `open` in this one) is refused
//! instead of corrupting it. This module must never be used by more than
//! one controller; that is what etcd is for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{ClusterStore, Error, Expect, Op, Txn, Versioned};

/// Key to (modification revision, value).
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");

/// Store-wide counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `META` key of the store revision: the revision of the last change, 0 for
/// a new store.
const REVISION: &str = "revision";

/// `META` key of the layout version, so that a later layout can recognise
/// (and migrate) an older file instead of misreading it.
const FORMAT: &str = "format";

/// The layout described in the module documentation.
const FORMAT_VERSION: u64 = 1;

/// A cluster store in one redb file. Cheap to clone; clones share the file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it (not its directory) if
    /// missing.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] if the file cannot be opened or created, or is
    /// already open (in this or another process); [`Error::Corrupt`] if it
    /// is not a store file of a layout this build knows.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self, Error> {
        let path = path.into();
        let db_path = path.clone();
        let db = blocking(move || open_file(&db_path)).await?;
        Ok(Self {
            db: Arc::new(db),
            path: Arc::new(path),
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the database on the blocking pool.
    async fn with_db<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, Error> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        blocking(move || f(&db)).await
    }
}

#[async_trait]
impl ClusterStore for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        let key = key.to_owned();
        self.with_db(move |db| {
            let read = db.begin_read().map_err(backend)?;
            let table = read.open_table(KV).map_err(backend)?;
            let found = table.get(key.as_str()).map_err(backend)?;
            Ok(found.map(|guard| {
                let (revision, value) = guard.value();
                Versioned {
                    value: value.to_vec(),
                    revision,
                }
            }))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, Error> {
        let prefix = prefix.to_owned();
        self.with_db(move |db| {
            // One read transaction: a consistent snapshot of the prefix.
            let read = db.begin_read().map_err(backend)?;
            let table = read.open_table(KV).map_err(backend)?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..).map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let key = key.value();
                // Keys are ordered bytewise, so the prefix's keys are one run.
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (revision, value) = value.value();
                out.push((
                    key.to_owned(),
                    Versioned {
                        value: value.to_vec(),
                        revision,
                    },
                ));
            }
            Ok(out)
        })
        .await
    }

    async fn commit(&self, txn: Txn) -> Result<u64, Error> {
        txn.validate()?;
        self.with_db(move |db| apply(db, &txn)).await
    }
}

/// Opens or creates the file and checks or writes its layout version.
fn open_file(path: &Path) -> Result<Database, Error> {
    let db = Database::create(path).map_err(backend)?;
    let write = db.begin_write().map_err(backend)?;
    {
        // Opening a table in a write transaction creates it, so that reads
        // never meet a missing table.
        let kv = write.open_table(KV).map_err(backend)?;
        let mut meta = write.open_table(META).map_err(backend)?;
        let format = meta.get(FORMAT).map_err(backend)?.map(|g| g.value());
        match format {
            Some(FORMAT_VERSION) => {}
            None if kv.is_empty().map_err(backend)? => {
                meta.insert(FORMAT, FORMAT_VERSION).map_err(backend)?;
            }
            other => {
                return Err(Error::Corrupt {
                    key: format!("{}#meta/{FORMAT}", path.display()),
                    source: format!(
                        "Store layout version {other:?}; this build reads {FORMAT_VERSION}"
                    )
                    .into(),
                });
            }
        }
    }
    write.commit().map_err(backend)?;
    Ok(db)
}

/// Applies a validated transaction in one redb write transaction.
fn apply(db: &Database, txn: &Txn) -> Result<u64, Error> {
    let write = db.begin_write().map_err(backend)?;
    let outcome = {
        let mut kv = write.open_table(KV).map_err(backend)?;
        let mut meta = write.open_table(META).map_err(backend)?;
        let current = meta
            .get(REVISION)
            .map_err(backend)?
            .map_or(0, |g| g.value());
        check(&kv, txn.checks()).and_then(|()| {
            let next = current.checked_add(1).ok_or_else(|| Error::Corrupt {
                key: format!("#meta/{REVISION}"),
                source: "The store revision is at its maximum".into(),
            })?;
            let mut changed = false;
            for op in txn.ops() {
                match op {
                    Op::Put { key, value } => {
                        kv.insert(key.as_str(), (next, value.as_slice()))
                            .map_err(backend)?;
                        changed = true;
                    }
                    Op::Delete { key } => {
                        changed |= kv.remove(key.as_str()).map_err(backend)?.is_some();
                    }
                }
            }
            // Like etcd, a transaction that changes nothing does not use up
            // a revision.
            if changed {
                meta.insert(REVISION, next).map_err(backend)?;
                Ok((true, next))
            } else {
                Ok((false, current))
            }
        })
    };
    match outcome {
        Ok((true, revision)) => {
            write.commit().map_err(backend)?;
            Ok(revision)
        }
        Ok((false, revision)) => {
            write.abort().map_err(backend)?;
            Ok(revision)
        }
        Err(err) => {
            // Nothing may stay half-applied: abort explicitly, and report
            // the conflict even if the abort itself fails.
            let _ = write.abort();
            Err(err)
        }
    }
}

/// Evaluates the checks in order; the first that fails is the conflict.
fn check<T: ReadableTable<&'static str, (u64, &'static [u8])>>(
    kv: &T,
    checks: &[(String, Expect)],
) -> Result<(), Error> {
    for (key, expected) in checks {
        let current = kv.get(key.as_str()).map_err(backend)?.map(|g| g.value().0);
        if !expected.holds(current) {
            return Err(Error::Conflict {
                key: key.clone(),
                current,
            });
        }
    }
    Ok(())
}

/// Runs blocking redb work on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|join| Error::Backend(Box::new(join)))?
}

fn backend(err: impl Into<redb::Error>) -> Error {
    Error::Backend(Box::new(err.into()))
}
