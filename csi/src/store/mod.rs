//! The cluster store: where the controller keeps nodes, pools, volumes,
//! in-sync sets and epochs.
//!
//! The controller is the only process that reads and writes it. Everything
//! above this module talks to a [`ClusterStore`] trait object; two backends
//! implement it:
//!
//! - [`EtcdStore`]: etcd, for production. Revisions are etcd's.
//! - [`EmbeddedStore`]: one redb file, for one-machine clusters, tests and the
//!   demo.
//!
//! [`open_store`] picks one from a single address string (the controller's
//! `--store` flag).
//!
//! # The model
//!
//! A flat map from string keys to byte values. Every change is stamped with a
//! store-wide revision that strictly increases; a key's revision is the
//! revision of the change that last wrote it (etcd's `mod_revision`). A
//! deleted and recreated key gets a new, higher revision, so a revision never
//! names two different values of one key.
//!
//! Writes are [`Txn`]s: a list of checks ([`Expect`]) and a list of puts and
//! deletes, applied all together at one revision only if every check holds,
//! and otherwise not at all ([`Error::Conflict`]). The single-key writes
//! ([`ClusterStore::put`], [`ClusterStore::compare_and_put`], ...) are
//! one-operation transactions. Safety-critical records (a volume's epoch and
//! in-sync set) must only be written with a check on the revision they were
//! read at, so that two controllers, or one stale controller, never overwrite
//! each other's decisions.
//!
//! # Failure semantics
//!
//! - `Ok`: the change is committed and durable.
//! - [`Error::Conflict`]: nothing was written.
//! - [`Error::Unavailable`]: the store could not be reached, or did not
//!   answer in time. A write may or may not have been committed (etcd may
//!   have applied it before the answer was lost). The caller must treat it as
//!   not committed for any decision that depends on it (never acknowledge
//!   on it), and re-read the keys to learn the outcome before retrying.
//! - [`Error::InvalidRequest`], [`Error::Encode`]: refused before anything
//!   was sent; nothing was written.
//! - [`Error::Backend`], [`Error::Corrupt`]: the operation failed; for writes
//!   the same rule as for `Unavailable` applies, since such a failure may
//!   come after the commit.
//!
//! # Cancel safety
//!
//! Reads are cancel safe. Dropping a write future is like
//! [`Error::Unavailable`]: the write may still complete (the embedded store
//! finishes it on a blocking thread; etcd may already hold the request).
//!
//! # Keys
//!
//! Keys are UTF-8 strings; the controller's layout is in [`keys`]. `list`
//! takes a raw byte prefix, so callers end a prefix with `/` to stay inside
//! one directory.
//!
//! # Extending
//!
//! A new backend implements [`ClusterStore::get`], [`ClusterStore::list`] and
//! [`ClusterStore::commit`] (calling [`Txn::validate`] first), gets a scheme
//! in [`StoreAddress`], and must pass the shared conformance suite in
//! `tests.rs`. This module must never interpret values: records and their
//! meaning belong to the controller.

mod embedded;
mod etcd;
#[cfg(test)]
pub(crate) mod etcd_server;
pub mod keys;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};

/// Any error, boxed: the causes of [`Error::Unavailable`], [`Error::Corrupt`]
/// and [`Error::Backend`] come from several libraries.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Most checks, and separately most operations, in one [`Txn`]. etcd's
/// default `--max-txn-ops` is 128; the embedded store enforces the same so
/// that code tested on it also works on etcd.
pub const MAX_TXN_OPS: usize = 128;

/// Errors of cluster store operations.
///
/// For gRPC (see the `From<Error> for tonic::Status` impl): `Conflict` is
/// `Aborted` (the caller lost a race and may retry from a fresh read),
/// `Unavailable` is `Unavailable`, everything else is `Internal`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A check of a transaction did not hold; nothing was written.
    /// `current` is the key's revision when the check was evaluated (`None`:
    /// the key did not exist).
    #[error("Revision check on {key} failed: the key is {}", describe_current(*.current))]
    Conflict {
        /// The key whose check failed (the first failing one, in the order
        /// the checks were added).
        key: String,
        /// The key's revision at the time of the check, `None` when absent.
        current: Option<u64>,
    },

    /// The backend could not be reached or did not answer in time. A write
    /// may or may not have been committed: re-read before deciding.
    #[error("Cluster store is unavailable; the operation may or may not have been committed")]
    Unavailable(#[source] BoxError),

    /// A stored value (or a key, or the store's own metadata) could not be
    /// decoded.
    #[error("Value at {key} cannot be decoded")]
    Corrupt {
        /// The key whose value is bad.
        key: String,
        /// What the decoder said.
        #[source]
        source: BoxError,
    },

    /// A value could not be serialized to JSON before writing; nothing was
    /// written.
    #[error("Value for {key} cannot be encoded")]
    Encode {
        /// The key that was to be written.
        key: String,
        /// What the encoder said.
        #[source]
        source: serde_json::Error,
    },

    /// A request that no backend accepts (an empty key, a revision of 0, a
    /// key written twice in one transaction, too many operations). This is a
    /// bug in the caller; nothing was written.
    #[error("Invalid store request: {0}")]
    InvalidRequest(String),

    /// A store address that [`open_store`] does not understand.
    #[error("Invalid store address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The backend failed in another way (I/O error of the embedded file, an
    /// error status from etcd). For writes, treat like `Unavailable`.
    #[error("Cluster store backend failed")]
    Backend(#[source] BoxError),
}

fn describe_current(current: Option<u64>) -> String {
    match current {
        Some(revision) => format!("at revision {revision}"),
        None => "absent".to_owned(),
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::Conflict { .. } => tonic::Code::Aborted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Corrupt { .. } => tonic::Code::Internal,
            Error::Encode { .. } => tonic::Code::Internal,
            Error::InvalidRequest(_) => tonic::Code::Internal,
            Error::InvalidAddress { .. } => tonic::Code::Internal,
            Error::Backend(_) => tonic::Code::Internal,
        };
        tonic::Status::new(code, crate::error_chain(&err))
    }
}

/// A value and the revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T = Vec<u8>> {
    /// The value: raw bytes, or a decoded record for the typed helpers.
    pub value: T,
    /// The key's modification revision (etcd `mod_revision`): the store
    /// revision of the last change that wrote this key. Never 0.
    pub revision: u64,
}

/// What a transaction expects of a key before it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist (create only).
    Absent,
    /// The key exists and was last written at exactly this revision. 0 is
    /// refused with [`Error::InvalidRequest`]: no value has revision 0, and
    /// etcd would read it as "absent".
    Revision(u64),
}

impl Expect {
    /// Whether a key whose current revision is `current` (`None`: absent)
    /// meets this expectation.
    pub fn holds(self, current: Option<u64>) -> bool {
        match (self, current) {
            (Expect::Absent, None) => true,
            (Expect::Revision(expected), Some(actual)) => expected == actual,
            _ => false,
        }
    }

    /// The expectation that a key is exactly as read: absent if it was not
    /// found, else at the revision it was read at. The usual way to build a
    /// read-modify-write.
    pub fn from_read<T>(read: Option<&Versioned<T>>) -> Self {
        match read {
            Some(versioned) => Expect::Revision(versioned.revision),
            None => Expect::Absent,
        }
    }
}

/// One write of a [`Txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets `key` to `value`, creating it if absent.
    Put {
        /// The key to write.
        key: String,
        /// The new value.
        value: Vec<u8>,
    },
    /// Removes `key`; nothing happens if it is absent.
    Delete {
        /// The key to remove.
        key: String,
    },
}

impl Op {
    /// The key this operation writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
}

/// An all-or-nothing write: every check must hold, then every operation is
/// applied at one new revision.
///
/// Used for records that must change together, such as a volume record and
/// its name index. Limits, checked by [`Txn::validate`]: at most
/// [`MAX_TXN_OPS`] checks and [`MAX_TXN_OPS`] operations, no key written twice,
/// no empty key, no `Expect::Revision(0)`. A key may be both checked and
/// written, which is the compare-and-set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    checks: Vec<(String, Expect)>,
    ops: Vec<Op>,
}

impl Txn {
    /// Creates an empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check: the transaction applies only if `key` meets `expected`.
    pub fn check(mut self, key: impl Into<String>, expected: Expect) -> Self {
        self.checks.push((key.into(), expected));
        self
    }

    /// Adds a put of raw bytes.
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a put of `value` serialized as JSON.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if serde_json refuses the value.
    pub fn put_json<T: Serialize + ?Sized>(
        self,
        key: impl Into<String>,
        value: &T,
    ) -> Result<Self, Error> {
        let key = key.into();
        let bytes = encode(&key, value)?;
        Ok(self.put(key, bytes))
    }

    /// Adds a delete. Deleting an absent key is not an error.
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }

    /// The checks, in the order they were added.
    pub fn checks(&self) -> &[(String, Expect)] {
        &self.checks
    }

    /// The operations, in the order they were added.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Checks the limits that every backend enforces (see [`Txn`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRequest`] naming the first violation.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidRequest(reason));
        if self.checks.len() > MAX_TXN_OPS || self.ops.len() > MAX_TXN_OPS {
            return invalid(format!(
                "A transaction has {} checks and {} operations; at most {MAX_TXN_OPS} of each",
                self.checks.len(),
                self.ops.len()
            ));
        }
        for (key, expected) in &self.checks {
            if key.is_empty() {
                return invalid("A check has an empty key".to_owned());
            }
            if *expected == Expect::Revision(0) {
                return invalid(format!("The check on {key} expects revision 0"));
            }
        }
        let mut written = HashSet::with_capacity(self.ops.len());
        for op in &self.ops {
            let key = op.key();
            if key.is_empty() {
                return invalid("An operation has an empty key".to_owned());
            }
            // etcd refuses a transaction that writes one key twice; the
            // embedded store follows so both behave the same.
            if !written.insert(key) {
                return invalid(format!("The key {key} is written twice"));
            }
        }
        Ok(())
    }
}

fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|source| Error::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: DeserializeOwned>(key: &str, versioned: Versioned) -> Result<Versioned<T>, Error> {
    let value = serde_json::from_slice(&versioned.value).map_err(|source| Error::Corrupt {
        key: key.to_owned(),
        source: Box::new(source),
    })?;
    Ok(Versioned {
        value,
        revision: versioned.revision,
    })
}

/// The cluster store, as the controller sees it.
///
/// Backends implement [`get`](Self::get), [`list`](Self::list) and
/// [`commit`](Self::commit); the single-key writes are provided on top of
/// `commit`. Every method may fail with [`Error::Unavailable`] or
/// [`Error::Backend`]; see the module documentation for what a failed write
/// means. For typed values, use [`ClusterStoreExt`].
#[async_trait]
pub trait ClusterStore: Send + Sync + fmt::Debug {
    /// Reads one key. `None` if it does not exist.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error>;

    /// Reads every key that starts with `prefix` (raw bytes: `/a/b` also
    /// matches `/a/bc`), sorted by key, as one consistent snapshot. An empty
    /// prefix lists the whole store.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, Error>;

    /// Applies a transaction: if every check holds, applies every operation
    /// at one new revision and returns it; a transaction that changes nothing
    /// (only deletes of absent keys, or no operations) returns the current
    /// store revision and does not raise it.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] for the first check that failed (nothing written);
    /// [`Error::InvalidRequest`] if [`Txn::validate`] refuses it.
    async fn commit(&self, txn: Txn) -> Result<u64, Error>;

    /// Writes `value` at `key` unconditionally; returns the key's new
    /// revision. For records that are safe to overwrite (a node's last
    /// heartbeat), never for epochs or in-sync sets.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, Error> {
        self.commit(Txn::new().put(key, value)).await
    }

    /// Writes `value` at `key` only if the key meets `expected`; returns the
    /// key's new revision.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the key's current revision when it does not.
    async fn compare_and_put(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Expect,
    ) -> Result<u64, Error> {
        self.commit(Txn::new().check(key, expected).put(key, value))
            .await
    }

    /// Deletes `key` only if it meets `expected`; returns the store revision
    /// after the delete. `Expect::Absent` succeeds, deleting nothing, only if
    /// the key is absent.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the key's current revision when it does not.
    async fn compare_and_delete(&self, key: &str, expected: Expect) -> Result<u64, Error> {
        self.commit(Txn::new().check(key, expected).delete(key))
            .await
    }

    /// Deletes `key` if it exists; deleting an absent key succeeds. Returns
    /// the store revision after the delete.
    async fn delete(&self, key: &str) -> Result<u64, Error> {
        self.commit(Txn::new().delete(key)).await
    }
}

/// Typed helpers over any [`ClusterStore`]: values are JSON, so callers never
/// handle bytes. Implemented for every store, including `dyn ClusterStore`.
#[async_trait]
pub trait ClusterStoreExt: ClusterStore {
    /// Reads and decodes one key.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] if the value is not the JSON of a `T`.
    async fn get_json<T: DeserializeOwned + Send>(
        &self,
        key: &str,
    ) -> Result<Option<Versioned<T>>, Error> {
        match self.get(key).await? {
            Some(versioned) => decode(key, versioned).map(Some),
            None => Ok(None),
        }
    }

    /// Reads and decodes every key under `prefix`, sorted by key.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] for the first value that is not the JSON of a `T`.
    async fn list_json<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Versioned<T>)>, Error> {
        self.list(prefix)
            .await?
            .into_iter()
            .map(|(key, versioned)| decode(&key, versioned).map(|value| (key, value)))
            .collect()
    }

    /// Encodes and writes one key unconditionally; returns its new revision.
    async fn put_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<u64, Error> {
        let bytes = encode(key, value)?;
        self.put(key, bytes).await
    }

    /// Encodes and writes one key if it meets `expected`; returns its new
    /// revision.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] when the key does not meet `expected`.
    async fn compare_and_put_json<T: Serialize + Sync + ?Sized>(
        &self,
        key: &str,
        value: &T,
        expected: Expect,
    ) -> Result<u64, Error> {
        let bytes = encode(key, value)?;
        self.compare_and_put(key, bytes, expected).await
    }
}

impl<S: ClusterStore + ?Sized> ClusterStoreExt for S {}

/// Where the cluster store is, parsed from the controller's `--store` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAddress {
    /// `embedded://<path>`: a redb file, created if missing.
    /// `embedded:///var/lib/ballast/store.redb` is an absolute path,
    /// `embedded://store.redb` a relative one.
    Embedded(PathBuf),
    /// `etcd://host:port[,host:port...][/namespace]`: an etcd cluster over
    /// plain HTTP/2, with every key stored under `/namespace` (default: none).
    /// Timeouts are [`EtcdConfig`]'s defaults.
    Etcd(EtcdConfig),
}

impl StoreAddress {
    /// Parses an address; see the variants for the forms.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] for an unknown scheme, an empty path, an
    /// empty endpoint list, or an endpoint that is not `host:port`.
    pub fn parse(address: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = address.strip_prefix("embedded://") {
            if path.is_empty() {
                return Err(invalid("The path of the store file is empty"));
            }
            return Ok(StoreAddress::Embedded(PathBuf::from(path)));
        }
        if let Some(rest) = address.strip_prefix("etcd://") {
            let (hosts, namespace) = match rest.find('/') {
                Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
                None => (rest, ""),
            };
            let mut endpoints = Vec::new();
            for host in hosts.split(',') {
                let port = host
                    .rsplit_once(':')
                    .map(|(name, port)| (name, port.parse::<u16>()));
                match port {
                    Some((name, Ok(port))) if !name.is_empty() && port != 0 => {
                        endpoints.push(format!("http://{host}"));
                    }
                    _ => return Err(invalid("Every etcd endpoint must be host:port")),
                }
            }
            return Ok(StoreAddress::Etcd(EtcdConfig {
                endpoints,
                namespace: namespace.to_owned(),
                ..EtcdConfig::default()
            }));
        }
        Err(invalid(
            "Expected embedded://<path> or etcd://<host:port>[,<host:port>...][/<namespace>]",
        ))
    }
}

/// Opens the cluster store at `address` (see [`StoreAddress`]).
///
/// The embedded store creates its file if missing; etcd is contacted once
/// and must answer within its connect timeout.
///
/// # Errors
///
/// [`Error::InvalidAddress`] for a bad address; [`Error::Unavailable`] if
/// etcd does not answer; [`Error::Backend`] or [`Error::Corrupt`] if the
/// embedded file cannot be opened (another process holds it, it is not a
/// store file).
pub async fn open_store(address: &str) -> Result<Arc<dyn ClusterStore>, Error> {
    match StoreAddress::parse(address)? {
        StoreAddress::Embedded(path) => Ok(Arc::new(EmbeddedStore::open(path).await?)),
        StoreAddress::Etcd(config) => Ok(Arc::new(EtcdStore::connect(config).await?)),
    }
}

/// An [`Error::Unavailable`] for an operation that got no answer in time.
fn timed_out(after: Duration) -> Error {
    Error::Unavailable(format!("No answer within {} ms", after.as_millis()).into())
}
