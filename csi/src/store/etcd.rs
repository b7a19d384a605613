//! The etcd cluster store, for production.
//!
//! Keys are stored as `<namespace><key>`, so several Ballast clusters (or
//! test runs) can share one etcd; the namespace never appears in what this
//! module returns. Revisions are etcd's: a key's revision is its
//! `mod_revision`, and the store revision is etcd's cluster revision.
//!
//! A [`Txn`] is one etcd transaction:
//!
//! ```text
//! if   every check  (Absent: version(key) == 0,  Revision(r): mod_revision(key) == r)
//! then every op     (put / delete)
//! else get every checked key
//! ```
//!
//! etcd does not say which compare failed; the `else` branch reads every
//! checked key at the same revision the compares saw, so the conflict reported
//! is exactly the first failing check with its current revision.
//!
//! Every call is bounded by the request timeout twice over: tonic's
//! per-request timeout, and a tokio timeout around the whole call (a request
//! can also wait for a connection, which tonic's timeout does not cover).
//! Connection failures, timeouts and etcd's own "unavailable" answers become
//! [`Error::Unavailable`]. `list` reads pages of [`PAGE_SIZE`] keys, all at
//! the revision of the first page, so it is one consistent snapshot however
//! long it is; if etcd compacts that revision away between two pages, the
//! list fails with [`Error::Backend`] and the caller lists again. Only plain
//! HTTP/2 is supported for now (no TLS, no auth).

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, KvClient, Txn as EtcdTxn,
    TxnOp, TxnOpResponse,
};
use tonic::Code;

use super::{ClusterStore, Error, Expect, Op, Txn, Versioned, timed_out};

/// Keys per page of a `list`. Small enough that a page of large records stays
/// well under gRPC's default 4 MiB message limit.
pub const PAGE_SIZE: i64 = 500;

/// How to reach etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, such as `http://10.0.0.5:2379`. At least one.
    pub endpoints: Vec<String>,
    /// Prefix of every key in etcd, such as `/cluster-a`; empty for none.
    pub namespace: String,
    /// Bound on establishing a connection and on the first request that
    /// proves etcd answers.
    pub connect_timeout: Duration,
    /// Bound on every request; past it the request fails with
    /// [`Error::Unavailable`].
    pub request_timeout: Duration,
}

impl Default for EtcdConfig {
    /// `http://127.0.0.1:2379`, no namespace, 5 s to connect, 5 s per
    /// request.
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            namespace: String::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// A cluster store in etcd. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    config: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd and checks, with one read, that it answers.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAddress`] for an empty endpoint list or a malformed
    /// endpoint; [`Error::Unavailable`] if no endpoint answers within
    /// `connect_timeout`.
    pub async fn connect(config: EtcdConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::InvalidAddress {
                address: String::new(),
                reason: "No etcd endpoint".to_owned(),
            });
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            // Notices a dead peer on an idle connection, so the next request
            // reconnects instead of writing into a black hole.
            .with_keep_alive(Duration::from_secs(10), config.request_timeout)
            .with_keep_alive_while_idle(true);
        let connect = Client::connect(&config.endpoints, Some(options));
        let client = match tokio::time::timeout(config.connect_timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(etcd_client::Error::InvalidUri(err))) => {
                return Err(Error::InvalidAddress {
                    address: config.endpoints.join(","),
                    reason: err.to_string(),
                });
            }
            Ok(Err(err)) => return Err(map_error(err)),
            Err(_) => return Err(timed_out(config.connect_timeout)),
        };
        let store = Self {
            kv: client.kv_client(),
            config,
        };
        // The client connects lazily; one cheap read proves etcd is there.
        let probe = GetOptions::new().with_count_only();
        let mut kv = store.kv.clone();
        // Any non-empty key does; etcd refuses an empty one.
        let key = store.full_key("/");
        store
            .call_within(store.config.connect_timeout, kv.get(key, Some(probe)))
            .await?;
        Ok(store)
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.config.namespace.len() + key.len());
        full.extend_from_slice(self.config.namespace.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// Strips the namespace from a key etcd returned.
    fn local_key(&self, kv: &KeyValue) -> Result<String, Error> {
        let full = kv.key();
        let corrupt = |reason: &str| Error::Corrupt {
            key: String::from_utf8_lossy(full).into_owned(),
            source: reason.to_owned().into(),
        };
        let local = full
            .strip_prefix(self.config.namespace.as_bytes())
            .ok_or_else(|| corrupt("Key outside the namespace"))?;
        String::from_utf8(local.to_vec()).map_err(|_| corrupt("Key is not UTF-8"))
    }

    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        self.call_within(self.config.request_timeout, request).await
    }

    async fn call_within<T>(
        &self,
        limit: Duration,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(limit, request).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(timed_out(limit)),
        }
    }
}

#[async_trait]
impl ClusterStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, Error> {
        let mut kv = self.kv.clone();
        let response = self.call(kv.get(self.full_key(key), None)).await?;
        response.kvs().first().map(versioned).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, Error> {
        let mut kv = self.kv.clone();
        let start = self.full_key(prefix);
        let end = prefix_end(&start);
        // etcd refuses an empty key; "\0" to "\0" is its whole keyspace.
        let mut from = if start.is_empty() { vec![0] } else { start };
        // 0 reads the latest revision; the first page's revision pins the
        // rest, so the pages form one snapshot.
        let mut revision = 0;
        let mut out = Vec::new();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(PAGE_SIZE)
                .with_revision(revision);
            let response = self.call(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = response.header().map_or(0, |header| header.revision());
                if revision <= 0 {
                    return Err(missing_header());
                }
            }
            for item in response.kvs() {
                out.push((self.local_key(item)?, versioned(item)?));
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    // The smallest key after `last`.
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    async fn commit(&self, txn: Txn) -> Result<u64, Error> {
        txn.validate()?;
        let mut compares = Vec::with_capacity(txn.checks().len());
        let mut reads = Vec::with_capacity(txn.checks().len());
        for (key, expected) in txn.checks() {
            let full = self.full_key(key);
            compares.push(match expected {
                Expect::Absent => Compare::version(full.clone(), CompareOp::Equal, 0),
                Expect::Revision(revision) => {
                    let revision = i64::try_from(*revision).map_err(|_| {
                        Error::InvalidRequest(format!(
                            "The check on {key} expects revision {revision}, beyond etcd's range"
                        ))
                    })?;
                    Compare::mod_revision(full.clone(), CompareOp::Equal, revision)
                }
            });
            reads.push(TxnOp::get(full, None));
        }
        let ops: Vec<TxnOp> = txn
            .ops()
            .iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(key), value.clone(), None),
                Op::Delete { key } => TxnOp::delete(self.full_key(key), None),
            })
            .collect();
        let request = EtcdTxn::new().when(compares).and_then(ops).or_else(reads);

        let mut kv = self.kv.clone();
        let response = self.call(kv.txn(request)).await?;
        if response.succeeded() {
            return header_revision(response.header());
        }
        let answers = response.op_responses();
        for ((key, expected), answer) in txn.checks().iter().zip(&answers) {
            let TxnOpResponse::Get(read) = answer else {
                return Err(Error::Backend(
                    "etcd answered a failed transaction with a write".into(),
                ));
            };
            let current = read.kvs().first().map(versioned).transpose()?;
            let current = current.map(|v| v.revision);
            if !expected.holds(current) {
                return Err(Error::Conflict {
                    key: key.clone(),
                    current,
                });
            }
        }
        // The reads ran at the revision the compares saw, so one of them
        // must have shown the failure.
        Err(Error::Backend(
            "etcd refused a transaction whose checks all hold".into(),
        ))
    }
}

fn versioned(kv: &KeyValue) -> Result<Versioned, Error> {
    let revision = u64::try_from(kv.mod_revision())
        .ok()
        .filter(|&revision| revision > 0)
        .ok_or_else(|| Error::Corrupt {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            source: format!("etcd returned mod_revision {}", kv.mod_revision()).into(),
        })?;
    Ok(Versioned {
        value: kv.value().to_vec(),
        revision,
    })
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<u64, Error> {
    header
        .and_then(|header| u64::try_from(header.revision()).ok())
        .ok_or_else(missing_header)
}

fn missing_header() -> Error {
    Error::Backend("etcd answered without a valid revision header".into())
}

/// The end of the key range holding every key that starts with `prefix`: the
/// prefix with its last byte below 0xff incremented and the rest dropped.
/// `[0]` (etcd's "to the end of the keyspace") when there is no such byte.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Sorts etcd client errors into "could not reach etcd" and the rest.
fn map_error(err: etcd_client::Error) -> Error {
    match &err {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            Error::Unavailable(Box::new(err))
        }
        // Unavailable: no connection or no leader; DeadlineExceeded and
        // Cancelled: tonic's request timeout or etcd's own ("request timed
        // out"). In every case the request may or may not have been applied.
        etcd_client::Error::GRpcStatus(status)
            if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ) =>
        {
            Error::Unavailable(Box::new(err))
        }
        _ => Error::Backend(Box::new(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
