//! The conformance suite every backend must pass, and each backend's own
//! tests (persistence, locking, etcd outages).
//!
//! The suite is plain async functions over `&dyn ClusterStore`; each part
//! works under its own key prefix so parts never see each other's keys.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::etcd_server::EtcdServer;
use super::*;

/// Bound on the whole concurrent-increment part.
const CONCURRENCY_WITHIN: Duration = Duration::from_secs(120);

fn conflict(result: Result<u64, Error>) -> (String, Option<u64>) {
    match result {
        Err(Error::Conflict { key, current }) => (key, current),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn invalid(result: Result<u64, Error>) {
    assert!(
        matches!(result, Err(Error::InvalidRequest(_))),
        "expected an invalid request, got {result:?}"
    );
}

/// Runs every part of the suite against `store`.
async fn conformance(store: Arc<dyn ClusterStore>) {
    get_and_put(&*store).await;
    compare_and_put(&*store).await;
    compare_and_delete(&*store).await;
    delete_is_idempotent(&*store).await;
    list_by_prefix(&*store).await;
    list_many(&*store).await;
    transactions(&*store).await;
    invalid_requests(&*store).await;
    typed_helpers(&*store).await;
    concurrent_increments(Arc::clone(&store)).await;
}

async fn get_and_put(store: &dyn ClusterStore) {
    let (a, b) = ("/gp/a", "/gp/b");
    assert_eq!(store.get(a).await.expect("store call"), None);

    let r1 = store.put(a, b"one".to_vec()).await.expect("store call");
    assert!(r1 > 0);
    let read = store
        .get(a)
        .await
        .expect("store call")
        .expect("a was written");
    assert_eq!(read.value, b"one");
    assert_eq!(read.revision, r1);

    let r2 = store.put(a, b"two".to_vec()).await.expect("store call");
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let r3 = store.put(b, Vec::new()).await.expect("store call");
    assert!(r3 > r2, "revisions increase store-wide: {r2} then {r3}");

    // A key's revision is the revision that last wrote it, not the store's.
    let read = store
        .get(a)
        .await
        .expect("store call")
        .expect("a was written");
    assert_eq!((read.value.as_slice(), read.revision), (&b"two"[..], r2));
    // An empty value is a value, not an absent key.
    let read = store
        .get(b)
        .await
        .expect("store call")
        .expect("b was written");
    assert_eq!((read.value.len(), read.revision), (0, r3));

    // Many sequential writes: strictly increasing, never reused.
    let mut last = r3;
    for i in 0..20 {
        let key = format!("/gp/seq/{}", i % 3);
        let revision = store.put(&key, vec![i]).await.expect("store call");
        assert!(revision > last, "write {i}: {revision} after {last}");
        last = revision;
    }
}

async fn compare_and_put(store: &dyn ClusterStore) {
    let key = "/cas/epoch";
    let r1 = store
        .compare_and_put(key, b"1".to_vec(), Expect::Absent)
        .await
        .expect("store call");
    // Create-only fails once the key exists, and reports its revision.
    let (k, current) = conflict(
        store
            .compare_and_put(key, b"x".to_vec(), Expect::Absent)
            .await,
    );
    assert_eq!((k.as_str(), current), (key, Some(r1)));

    let r2 = store
        .compare_and_put(key, b"2".to_vec(), Expect::Revision(r1))
        .await
        .expect("store call");
    assert!(r2 > r1);
    // A writer that read at r1 lost: it must not overwrite the decision at r2.
    let (_, current) = conflict(
        store
            .compare_and_put(key, b"stale".to_vec(), Expect::Revision(r1))
            .await,
    );
    assert_eq!(current, Some(r2));
    let read = store
        .get(key)
        .await
        .expect("store call")
        .expect("key exists");
    assert_eq!((read.value.as_slice(), read.revision), (&b"2"[..], r2));

    // A revision check on a missing key fails with `current: None`.
    let (k, current) = conflict(
        store
            .compare_and_put("/cas/missing", b"x".to_vec(), Expect::Revision(r2))
            .await,
    );
    assert_eq!((k.as_str(), current), ("/cas/missing", None));
    assert_eq!(store.get("/cas/missing").await.expect("store call"), None);

    // A deleted and recreated key never matches its old revision again.
    store.delete(key).await.expect("store call");
    let (_, current) = conflict(
        store
            .compare_and_put(key, b"old".to_vec(), Expect::Revision(r2))
            .await,
    );
    assert_eq!(current, None);
    let r3 = store
        .compare_and_put(key, b"3".to_vec(), Expect::Absent)
        .await
        .expect("store call");
    assert!(r3 > r2);
}

async fn compare_and_delete(store: &dyn ClusterStore) {
    let key = "/cad/k";
    let (_, current) = conflict(store.compare_and_delete(key, Expect::Revision(7)).await);
    assert_eq!(current, None);
    // Absent on an absent key holds: nothing to delete, no error.
    store
        .compare_and_delete(key, Expect::Absent)
        .await
        .expect("store call");

    let r1 = store.put(key, b"v".to_vec()).await.expect("store call");
    let (_, current) = conflict(store.compare_and_delete(key, Expect::Absent).await);
    assert_eq!(current, Some(r1));
    let r2 = store.put(key, b"w".to_vec()).await.expect("store call");
    let (_, current) = conflict(store.compare_and_delete(key, Expect::Revision(r1)).await);
    assert_eq!(current, Some(r2));
    assert!(
        store.get(key).await.expect("store call").is_some(),
        "a failed delete deletes nothing"
    );

    let r3 = store
        .compare_and_delete(key, Expect::Revision(r2))
        .await
        .expect("store call");
    assert!(r3 > r2);
    assert_eq!(store.get(key).await.expect("store call"), None);
}

async fn delete_is_idempotent(store: &dyn ClusterStore) {
    let key = "/del/k";
    let r1 = store.put(key, b"v".to_vec()).await.expect("store call");
    let r2 = store.delete(key).await.expect("store call");
    assert!(r2 > r1, "a delete that removes a key is a change");
    assert_eq!(store.get(key).await.expect("store call"), None);
    // Deleting again (a retry after Unavailable, say) succeeds and, changing
    // nothing, does not raise the store revision.
    assert_eq!(store.delete(key).await.expect("store call"), r2);
    assert_eq!(store.delete("/del/never").await.expect("store call"), r2);
    assert_eq!(store.get(key).await.expect("store call"), None);
}

async fn list_by_prefix(store: &dyn ClusterStore) {
    let mut written = BTreeMap::new();
    // Out of order on purpose; neighbours that share text with the prefix.
    for key in [
        "/ls/b/1", "/ls/a/2", "/ls", "/ls/ab", "/ls/a/1", "/lt/a/1", "/ls/a",
    ] {
        let revision = store
            .put(key, key.as_bytes().to_vec())
            .await
            .expect("store call");
        written.insert(key, revision);
    }
    let names = |list: &[(String, Versioned)]| -> Vec<String> {
        list.iter().map(|(key, _)| key.clone()).collect()
    };

    let dir = store.list("/ls/a/").await.expect("store call");
    assert_eq!(names(&dir), ["/ls/a/1", "/ls/a/2"]);
    for (key, versioned) in &dir {
        assert_eq!(versioned.value, key.as_bytes());
        assert_eq!(versioned.revision, written[key.as_str()]);
    }
    // A prefix is raw bytes: without the slash it takes in "/ls/ab" too.
    let raw = store.list("/ls/a").await.expect("store call");
    assert_eq!(names(&raw), ["/ls/a", "/ls/a/1", "/ls/a/2", "/ls/ab"]);
    let all = store.list("/ls/").await.expect("store call");
    assert_eq!(
        names(&all),
        ["/ls/a", "/ls/a/1", "/ls/a/2", "/ls/ab", "/ls/b/1"]
    );
    assert!(store.list("/ls/zz/").await.expect("store call").is_empty());

    store.delete("/ls/a/1").await.expect("store call");
    assert_eq!(
        names(&store.list("/ls/a/").await.expect("store call")),
        ["/ls/a/2"]
    );
    // An empty prefix is the whole store; ours are in it, sorted.
    let everything = names(&store.list("").await.expect("store call"));
    assert!(everything.is_sorted(), "{everything:?}");
    assert!(everything.iter().any(|key| key == "/lt/a/1"));
}

/// More keys than one etcd page, written in full-size transactions.
async fn list_many(store: &dyn ClusterStore) {
    let count = 3 * super::etcd::PAGE_SIZE as usize / 2 + 7;
    let keys: Vec<String> = (0..count).map(|i| format!("/many/{i:05}")).collect();
    for chunk in keys.chunks(MAX_TXN_OPS) {
        let txn = chunk
            .iter()
            .fold(Txn::new(), |txn, key| txn.put(key.as_str(), key.as_bytes()));
        store.commit(txn).await.expect("store call");
    }
    let listed = store.list("/many/").await.expect("store call");
    let listed_keys: Vec<&str> = listed.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(listed_keys, keys);
    assert!(listed.iter().all(|(key, v)| v.value == key.as_bytes()));
}

async fn transactions(store: &dyn ClusterStore) {
    let (volume, name) = ("/tx/volumes/v1", "/tx/names/pvc-1");
    let create = || {
        Txn::new()
            .check(volume, Expect::Absent)
            .check(name, Expect::Absent)
            .put(volume, b"record".to_vec())
            .put(name, b"v1".to_vec())
    };
    let r1 = store.commit(create()).await.expect("store call");
    // Both written, at the one revision of the transaction.
    assert_eq!(
        store
            .get(volume)
            .await
            .expect("store call")
            .map(|v| v.revision),
        Some(r1)
    );
    assert_eq!(
        store
            .get(name)
            .await
            .expect("store call")
            .map(|v| v.revision),
        Some(r1)
    );

    // The first failing check is reported; nothing is written.
    let (k, current) = conflict(store.commit(create()).await);
    assert_eq!((k.as_str(), current), (volume, Some(r1)));

    // The first check holds, the second does not: all or nothing.
    let partial = Txn::new()
        .check(volume, Expect::Revision(r1))
        .check("/tx/other", Expect::Revision(r1))
        .put(volume, b"changed".to_vec())
        .delete(name);
    let (k, current) = conflict(store.commit(partial).await);
    assert_eq!((k.as_str(), current), ("/tx/other", None));
    let read = store
        .get(volume)
        .await
        .expect("store call")
        .expect("volume exists");
    assert_eq!((read.value.as_slice(), read.revision), (&b"record"[..], r1));
    assert!(store.get(name).await.expect("store call").is_some());

    // Rename: delete one index entry and create another, atomically.
    let rename = Txn::new()
        .check(volume, Expect::Revision(r1))
        .check("/tx/names/pvc-2", Expect::Absent)
        .delete(name)
        .put("/tx/names/pvc-2", b"v1".to_vec())
        .put(volume, b"renamed".to_vec());
    let r2 = store.commit(rename).await.expect("store call");
    assert!(r2 > r1);
    assert_eq!(store.get(name).await.expect("store call"), None);
    let revisions: Vec<u64> = store
        .list("/tx/")
        .await
        .expect("store call")
        .into_iter()
        .map(|(_, v)| v.revision)
        .collect();
    assert_eq!(revisions, [r2, r2]);

    // Checks alone write nothing and leave the revision where it was.
    let checks_only = Txn::new().check(volume, Expect::Revision(r2));
    assert_eq!(store.commit(checks_only).await.expect("store call"), r2);
    assert_eq!(store.commit(Txn::new()).await.expect("store call"), r2);
}

async fn invalid_requests(store: &dyn ClusterStore) {
    let key = "/invalid/k";
    invalid(
        store
            .compare_and_put(key, b"x".to_vec(), Expect::Revision(0))
            .await,
    );
    invalid(store.put("", b"x".to_vec()).await);
    invalid(store.commit(Txn::new().check("", Expect::Absent)).await);
    invalid(
        store
            .commit(Txn::new().put(key, b"1".to_vec()).put(key, b"2".to_vec()))
            .await,
    );
    invalid(
        store
            .commit(Txn::new().put(key, b"1".to_vec()).delete(key))
            .await,
    );
    let too_many = (0..=MAX_TXN_OPS).fold(Txn::new(), |txn, i| txn.put(format!("{key}/{i}"), b""));
    invalid(store.commit(too_many).await);
    assert!(
        store.list(key).await.expect("store call").is_empty(),
        "nothing written"
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    epoch: u64,
    in_sync: Vec<String>,
}

async fn typed_helpers(store: &dyn ClusterStore) {
    let key = "/json/volume";
    let record = Record {
        epoch: 1,
        in_sync: vec!["r1".into(), "r2".into()],
    };
    let r1 = store.put_json(key, &record).await.expect("store call");
    let read = store
        .get_json::<Record>(key)
        .await
        .expect("store call")
        .expect("written");
    assert_eq!(
        read,
        Versioned {
            value: record.clone(),
            revision: r1
        }
    );

    // A read-modify-write as the controller does it.
    let next = Record {
        epoch: 2,
        in_sync: vec!["r1".into()],
    };
    let r2 = store
        .compare_and_put_json(key, &next, Expect::from_read(Some(&read)))
        .await
        .expect("store call");
    let (_, current) = conflict(
        store
            .compare_and_put_json(key, &record, Expect::from_read(Some(&read)))
            .await,
    );
    assert_eq!(current, Some(r2));
    assert!(matches!(
        store
            .compare_and_put_json(key, &record, Expect::from_read::<Record>(None))
            .await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(
        store
            .get_json::<Record>("/json/none")
            .await
            .expect("store call"),
        None
    );

    let listed = store
        .list_json::<Record>("/json/")
        .await
        .expect("store call");
    assert_eq!(
        listed,
        [(
            key.to_owned(),
            Versioned {
                value: next,
                revision: r2
            }
        )]
    );

    // Bytes that are not a Record are reported as corrupt, naming the key.
    store
        .put("/json/bad", b"{not json".to_vec())
        .await
        .expect("store call");
    match store.get_json::<Record>("/json/bad").await {
        Err(Error::Corrupt { key, .. }) => assert_eq!(key, "/json/bad"),
        other => panic!("expected corrupt, got {other:?}"),
    }
    assert!(matches!(
        store.list_json::<Record>("/json/").await,
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        store.get_json::<String>(key).await,
        Err(Error::Corrupt { .. })
    ));

    // A value serde_json cannot encode is refused before anything is written.
    let unencodable: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
    assert!(matches!(
        store.put_json("/json/unencodable", &unencodable).await,
        Err(Error::Encode { .. })
    ));
    assert_eq!(
        store.get("/json/unencodable").await.expect("store call"),
        None
    );
}

/// M tasks each increment one counter N times with read, compare-and-put,
/// retry on conflict. Exactly one writer may win per revision: the counter
/// must end at exactly N*M, and ordered by revision the winners must have
/// written 1, 2, ..., N*M.
async fn concurrent_increments(store: Arc<dyn ClusterStore>) {
    const TASKS: u64 = 6;
    const EACH: u64 = 15;
    let key = "/concurrent/counter";
    let run = async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                let mut wins = Vec::new();
                while (wins.len() as u64) < EACH {
                    let read = store.get_json::<u64>(key).await.expect("store call");
                    let next = read.as_ref().map_or(0, |v| v.value) + 1;
                    match store
                        .compare_and_put_json(key, &next, Expect::from_read(read.as_ref()))
                        .await
                    {
                        Ok(revision) => wins.push((revision, next)),
                        Err(Error::Conflict { .. }) => {}
                        Err(err) => panic!("increment failed: {err}"),
                    }
                }
                wins
            });
        }
        let mut wins = Vec::new();
        while let Some(task) = tasks.join_next().await {
            wins.extend(task.expect("increment task"));
        }
        wins
    };
    let mut wins = tokio::time::timeout(CONCURRENCY_WITHIN, run)
        .await
        .expect("concurrent increments finish in time");

    let final_value = store
        .get_json::<u64>(key)
        .await
        .expect("store call")
        .expect("written");
    assert_eq!(final_value.value, TASKS * EACH);
    let revisions: HashSet<u64> = wins.iter().map(|(revision, _)| *revision).collect();
    assert_eq!(
        revisions.len() as u64,
        TASKS * EACH,
        "one winner per revision"
    );
    wins.sort_unstable();
    let values: Vec<u64> = wins.iter().map(|(_, value)| *value).collect();
    assert_eq!(values, (1..=TASKS * EACH).collect::<Vec<_>>());
    assert_eq!(final_value.revision, wins.last().map_or(0, |(r, _)| *r));
}

/// What [`write_for_restart`] left, to compare after reopening.
struct Written {
    kept: Versioned,
    last: u64,
}

async fn write_for_restart(store: &dyn ClusterStore) -> Written {
    store
        .put("/restart/gone", b"x".to_vec())
        .await
        .expect("store call");
    let r1 = store
        .compare_and_put("/restart/kept", b"1".to_vec(), Expect::Absent)
        .await
        .expect("store call");
    let r2 = store
        .compare_and_put("/restart/kept", b"2".to_vec(), Expect::Revision(r1))
        .await
        .expect("store call");
    let last = store.delete("/restart/gone").await.expect("store call");
    Written {
        kept: Versioned {
            value: b"2".to_vec(),
            revision: r2,
        },
        last,
    }
}

async fn check_after_restart(store: &dyn ClusterStore, written: Written) {
    assert_eq!(
        store.get("/restart/kept").await.expect("store call"),
        Some(written.kept.clone())
    );
    assert_eq!(store.get("/restart/gone").await.expect("store call"), None);
    // Revisions keep increasing across the restart...
    let r = store
        .put("/restart/new", b"n".to_vec())
        .await
        .expect("store call");
    assert!(
        r > written.last,
        "{r} after restart, {} before",
        written.last
    );
    // ...and a revision read before it still guards a compare-and-put.
    let r2 = store
        .compare_and_put(
            "/restart/kept",
            b"3".to_vec(),
            Expect::Revision(written.kept.revision),
        )
        .await
        .expect("store call");
    assert!(r2 > r);
}

mod embedded {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .expect("open the store file");
        conformance(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path)
            .await
            .expect("open the store file");
        let written = write_for_restart(&store).await;
        drop(store);
        let store = EmbeddedStore::open(&path)
            .await
            .expect("open the store file");
        check_after_restart(&store, written).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_second_open_of_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let first = EmbeddedStore::open(&path)
            .await
            .expect("open the store file");
        let r = first.put("/k", b"v".to_vec()).await.expect("store call");
        let second = EmbeddedStore::open(&path).await;
        assert!(matches!(second, Err(Error::Backend(_))), "{second:?}");
        // The first handle is unharmed.
        assert_eq!(
            first
                .get("/k")
                .await
                .expect("store call")
                .map(|v| v.revision),
            Some(r)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refuses_a_file_that_is_not_a_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-store");
        let content = b"precious data, not a database\n".repeat(200);
        std::fs::write(&path, &content).expect("write the file");
        let opened = EmbeddedStore::open(&path).await;
        assert!(opened.is_err(), "opened a foreign file: {opened:?}");
        assert_eq!(
            std::fs::read(&path).expect("read the file"),
            content,
            "file left untouched"
        );

        let missing_dir = dir.path().join("no/such/dir/store.redb");
        assert!(matches!(
            EmbeddedStore::open(missing_dir).await,
            Err(Error::Backend(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opens_from_an_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let address = format!("embedded://{}", dir.path().join("s.redb").display());
        let store = open_store(&address).await.expect("open the store");
        let r = store.put("/k", b"v".to_vec()).await.expect("store call");
        drop(store);
        let store = open_store(&address).await.expect("open the store");
        assert_eq!(
            store
                .get("/k")
                .await
                .expect("store call")
                .map(|v| v.revision),
            Some(r)
        );
    }
}

mod etcd {
    use super::*;

    /// Upper bound on an answer from a stopped etcd: the request timeout
    /// plus scheduling slack on a busy machine.
    fn unavailable_within(config: &EtcdConfig) -> Duration {
        config.request_timeout + Duration::from_secs(3)
    }

    async fn assert_unavailable<T: std::fmt::Debug>(
        what: &str,
        limit: Duration,
        op: impl std::future::Future<Output = Result<T, Error>>,
    ) {
        let started = Instant::now();
        let result = tokio::time::timeout(limit + Duration::from_secs(5), op)
            .await
            .unwrap_or_else(|_| panic!("{what} hung"));
        let took = started.elapsed();
        assert!(
            matches!(result, Err(Error::Unavailable(_))),
            "{what}: expected Unavailable, got {result:?}"
        );
        assert!(took <= limit, "{what} took {took:?}, more than {limit:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conforms() {
        let etcd = EtcdServer::start().await.expect("start etcd");
        let store = EtcdStore::connect(etcd.config("/conformance"))
            .await
            .expect("connect to etcd");
        conformance(Arc::new(store)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn survives_a_new_client_and_an_etcd_restart() {
        let mut etcd = EtcdServer::start().await.expect("start etcd");
        let store = EtcdStore::connect(etcd.config("/ns"))
            .await
            .expect("connect to etcd");
        let written = write_for_restart(&store).await;
        drop(store);
        let store = EtcdStore::connect(etcd.config("/ns"))
            .await
            .expect("connect to etcd");
        assert_eq!(
            store.get("/restart/kept").await.expect("store call"),
            Some(written.kept.clone())
        );
        drop(store);

        etcd.restart().await.expect("restart etcd");
        let store = EtcdStore::connect(etcd.config("/ns"))
            .await
            .expect("connect to etcd");
        check_after_restart(&store, written).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn namespaces_do_not_see_each_other() {
        let etcd = EtcdServer::start().await.expect("start etcd");
        let a = EtcdStore::connect(etcd.config("/cluster-a"))
            .await
            .expect("connect to etcd");
        let b = EtcdStore::connect(etcd.config("/cluster-b"))
            .await
            .expect("connect to etcd");
        let ra = a
            .put("/ballast/nodes/n1", b"a".to_vec())
            .await
            .expect("store call");
        b.put("/ballast/nodes/n1", b"b".to_vec())
            .await
            .expect("store call");
        b.put("/ballast/nodes/n2", b"b".to_vec())
            .await
            .expect("store call");

        let listed = a.list("").await.expect("store call");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].0, "/ballast/nodes/n1");
        assert_eq!(
            listed[0].1,
            Versioned {
                value: b"a".to_vec(),
                revision: ra
            }
        );
        assert_eq!(b.list("/ballast/").await.expect("store call").len(), 2);
        // A create-only in one namespace ignores the same key in the other.
        a.delete("/ballast/nodes/n1").await.expect("store call");
        a.compare_and_put("/ballast/nodes/n1", b"a2".to_vec(), Expect::Absent)
            .await
            .expect("store call");

        // Without a namespace, the prefixes are visible as stored.
        let raw = EtcdStore::connect(etcd.config(""))
            .await
            .expect("connect to etcd");
        let keys: Vec<String> = raw
            .list("")
            .await
            .expect("store call")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "/cluster-a/ballast/nodes/n1",
                "/cluster-b/ballast/nodes/n1",
                "/cluster-b/ballast/nodes/n2"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_etcd_is_unavailable_not_a_hang() {
        let etcd = EtcdServer::start().await.expect("start etcd");
        let mut config = etcd.config("/pause");
        config.request_timeout = Duration::from_secs(1);
        let limit = unavailable_within(&config);
        let store = EtcdStore::connect(config.clone())
            .await
            .expect("connect to etcd");
        store
            .put("/k", b"before".to_vec())
            .await
            .expect("store call");

        etcd.pause().expect("SIGSTOP etcd");
        assert_unavailable("get", limit, store.get("/k")).await;
        assert_unavailable("list", limit, store.list("/")).await;
        assert_unavailable("put", limit, store.put("/k", b"during".to_vec())).await;
        let cas = store.compare_and_put("/k2", b"x".to_vec(), Expect::Absent);
        assert_unavailable("compare_and_put", limit, cas).await;
        assert_unavailable("connect", limit, EtcdStore::connect(config.clone())).await;

        // Once etcd is back, the same client works again. The put above may
        // or may not have been applied (it is Unavailable's contract), so the
        // value is one of the two.
        etcd.resume().expect("SIGCONT etcd");
        let deadline = Instant::now() + Duration::from_secs(20);
        let read = loop {
            match store.get("/k").await {
                Ok(read) => break read.expect("/k exists"),
                Err(err) if Instant::now() < deadline => {
                    eprintln!("waiting for etcd after SIGCONT: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("etcd did not come back: {err}"),
            }
        };
        assert!(
            read.value == b"before" || read.value == b"during",
            "{read:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_etcd_is_unavailable() {
        let mut etcd = EtcdServer::start().await.expect("start etcd");
        let mut config = etcd.config("/dead");
        config.request_timeout = Duration::from_secs(1);
        config.connect_timeout = Duration::from_secs(1);
        let limit = unavailable_within(&config);
        let store = EtcdStore::connect(config.clone())
            .await
            .expect("connect to etcd");
        store.put("/k", b"v".to_vec()).await.expect("store call");

        etcd.kill().expect("kill etcd");
        assert_unavailable("get", limit, store.get("/k")).await;
        let txn = Txn::new()
            .check("/k", Expect::Absent)
            .put("/k", b"w".to_vec());
        assert_unavailable("commit", limit, store.commit(txn)).await;
        assert_unavailable("connect", limit, EtcdStore::connect(config)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opens_from_an_address() {
        let etcd = EtcdServer::start().await.expect("start etcd");
        let host = etcd.endpoint().replace("http://", "");
        let store = open_store(&format!("etcd://{host}/addr"))
            .await
            .expect("open the store");
        let r = store.put("/k", b"v".to_vec()).await.expect("store call");
        let raw = EtcdStore::connect(etcd.config(""))
            .await
            .expect("connect to etcd");
        assert_eq!(
            raw.get("/addr/k")
                .await
                .expect("store call")
                .map(|v| v.revision),
            Some(r)
        );
    }
}

#[test]
fn addresses_parse() {
    assert_eq!(
        StoreAddress::parse("embedded:///var/lib/ballast/store.redb").expect("valid address"),
        StoreAddress::Embedded("/var/lib/ballast/store.redb".into())
    );
    assert_eq!(
        StoreAddress::parse("embedded://store.redb").expect("valid address"),
        StoreAddress::Embedded("store.redb".into())
    );
    let StoreAddress::Etcd(config) =
        StoreAddress::parse("etcd://10.0.0.1:2379").expect("valid address")
    else {
        panic!("not etcd");
    };
    assert_eq!(config.endpoints, ["http://10.0.0.1:2379"]);
    assert_eq!(config.namespace, "");
    let StoreAddress::Etcd(config) =
        StoreAddress::parse("etcd://a:2379,b:2380,[::1]:2381/prod/east/").expect("valid address")
    else {
        panic!("not etcd");
    };
    assert_eq!(
        config.endpoints,
        ["http://a:2379", "http://b:2380", "http://[::1]:2381"]
    );
    assert_eq!(config.namespace, "/prod/east");

    for bad in [
        "",
        "/var/lib/store.redb",
        "embedded://",
        "etcd://",
        "etcd://host",
        "etcd://host:port",
        "etcd://:2379",
        "etcd://a:2379,",
        "etcd://a:0",
        "redis://a:1",
    ] {
        assert!(
            matches!(StoreAddress::parse(bad), Err(Error::InvalidAddress { .. })),
            "{bad:?} was accepted"
        );
    }
}

#[test]
fn errors_map_to_grpc_codes() {
    let conflict = Error::Conflict {
        key: "/k".into(),
        current: Some(3),
    };
    assert_eq!(
        conflict.to_string(),
        "Revision check on /k failed: the key is at revision 3"
    );
    assert_eq!(tonic::Status::from(conflict).code(), tonic::Code::Aborted);
    let unavailable = tonic::Status::from(timed_out(Duration::from_millis(1500)));
    assert_eq!(unavailable.code(), tonic::Code::Unavailable);
    assert!(
        unavailable.message().contains("No answer within 1500 ms"),
        "{unavailable:?}"
    );
    let absent = Error::Conflict {
        key: "/k".into(),
        current: None,
    };
    assert!(absent.to_string().ends_with("the key is absent"));
}
