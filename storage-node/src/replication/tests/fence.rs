//! Epoch fencing of the in-process replica.

use super::*;
use crate::pool::PoolManager;
use crate::pool::tests::TestEnv;
use crate::replica::{CreateReplica, ReplicaCatalog, ReplicaMeta};

#[tokio::test]
async fn every_op_works_in_process() {
    let replica = TestReplica::new("vol-local", 1);
    exercise_every_op(replica.fenced.as_ref(), 1).await;
    assert!(replica.store.persisted().is_empty(), "no raise was needed");
}

#[tokio::test]
async fn lower_epochs_are_refused_and_touch_nothing() {
    let replica = TestReplica::new("vol-stale", 5);
    let fenced = &replica.fenced;
    let result = fenced.write(4, 0, pattern(1, 4096), true).await;
    assert!(
        matches!(
            result,
            Err(Error::StaleEpoch {
                request: 4,
                current: 5
            })
        ),
        "{result:?}"
    );
    assert!(replica.file_bytes(0, 4096).iter().all(|&b| b == 0));
    for result in [
        fenced.read(4, 0, 4096).await.map(drop),
        fenced.flush(4).await,
        fenced.trim(4, 0, 4096).await,
        fenced.write_zeroes(4, 0, 4096, false, false).await,
        fenced.region_hashes(4, 0, 4096, 4096).await.map(drop),
        fenced.region_hashes(4, 0, 0, 4096).await.map(drop),
        fenced.allocated_extents(4, 0, 4096).await.map(drop),
        fenced.info(4).await.map(drop),
        fenced.raise_epoch(0).await,
    ] {
        assert!(
            matches!(result, Err(Error::StaleEpoch { current: 5, .. })),
            "{result:?}"
        );
    }
    // A stale request is refused even when its range is also bad.
    assert!(matches!(
        fenced.read(4, SIZE, 4096).await,
        Err(Error::StaleEpoch { .. })
    ));
    assert_eq!(fenced.current_epoch(), 5);
    assert!(replica.store.persisted().is_empty());
}

#[tokio::test]
async fn a_higher_epoch_is_persisted_before_its_io() {
    let replica = TestReplica::new("vol-raise", 1);
    let path = replica.path.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    // When the epoch is persisted, the write carrying it has not happened.
    replica.store.on_persist(move |epoch| {
        let bytes = std::fs::read(&path).expect("read replica file");
        record
            .lock()
            .expect("lock")
            .push((epoch, bytes[..4096].iter().all(|&b| b == 0)));
    });
    let data = pattern(7, 4096);
    replica
        .fenced
        .write(3, 0, Arc::clone(&data), true)
        .await
        .expect("write under a new epoch");
    assert_eq!(*seen.lock().expect("lock"), vec![(3, true)]);
    assert_eq!(replica.store.persisted(), vec![3]);
    assert_eq!(replica.fenced.current_epoch(), 3);
    assert!(replica.file_bytes(0, 4096) == data[..]);

    // The same epoch again persists nothing; a lower one is refused.
    replica
        .fenced
        .write(3, 4096, pattern(8, 4096), false)
        .await
        .expect("write under the same epoch");
    assert_eq!(replica.store.persisted(), vec![3]);
    assert!(matches!(
        replica.fenced.write(2, 0, pattern(9, 4096), false).await,
        Err(Error::StaleEpoch {
            request: 2,
            current: 3
        })
    ));
}

#[tokio::test]
async fn a_failed_persist_keeps_the_old_epoch_and_writes_nothing() {
    let replica = TestReplica::new("vol-persist-fail", 1);
    replica.store.fail.store(true, Ordering::SeqCst);
    let result = replica.fenced.write(2, 0, pattern(1, 4096), true).await;
    assert!(
        matches!(result, Err(Error::PersistEpoch { epoch: 2, .. })),
        "{result:?}"
    );
    assert_eq!(replica.fenced.current_epoch(), 1);
    assert!(replica.file_bytes(0, 4096).iter().all(|&b| b == 0));
    // Epoch 1 still works; once the store works again, 2 is accepted.
    replica
        .fenced
        .write(1, 0, pattern(2, 4096), false)
        .await
        .expect("old epoch still in force");
    replica.store.fail.store(false, Ordering::SeqCst);
    replica.fenced.raise_epoch(2).await.expect("raise");
    assert_eq!(replica.store.persisted(), vec![2]);
}

#[tokio::test]
async fn concurrent_raises_serialise_and_persist_each_epoch_once() {
    let replica = TestReplica::new("vol-race", 0);
    replica.store.set_delay(Duration::from_millis(20));
    let raises: Vec<_> = [3u64, 1, 2, 3, 2, 1]
        .into_iter()
        .map(|epoch| {
            let fenced = Arc::clone(&replica.fenced);
            tokio::spawn(async move { fenced.raise_epoch(epoch).await })
        })
        .collect();
    for raise in raises {
        // Lower ones may lose the race; that is their only possible error.
        match bounded("raise", raise).await.expect("join") {
            Ok(()) | Err(Error::StaleEpoch { current: 3, .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    let persisted = replica.store.persisted();
    assert!(
        persisted.windows(2).all(|w| w[0] < w[1]),
        "epochs persisted out of order or twice: {persisted:?}"
    );
    assert_eq!(persisted.last(), Some(&3));
    assert_eq!(replica.fenced.current_epoch(), 3);
}

/// A gated device behind a fence, with the event log both share.
pub(super) fn gated(
    replica: &TestReplica,
) -> (
    Arc<GatedDevice>,
    Arc<FencedReplica>,
    Arc<Mutex<Vec<String>>>,
) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let device = Arc::new(GatedDevice::new(
        Arc::clone(&replica.data),
        Arc::clone(&events),
    ));
    let log = Arc::clone(&events);
    replica
        .store
        .on_persist(move |epoch| log.lock().expect("lock").push(format!("persist {epoch}")));
    let fenced = Arc::new(FencedReplica::with_device(
        "gated-r",
        "vol-gated",
        device.clone(),
        replica.data.block_size(),
        Some(replica.path.clone()),
        1,
        replica.store.clone(),
    ));
    (device, fenced, events)
}

/// DESIGN.md invariant 3: a write admitted under epoch 1 that is still on
/// the device holds off epoch 2 until it completes; epoch-1 requests that
/// arrive meanwhile are refused once epoch 2 is in force.
#[tokio::test]
async fn a_raise_waits_for_io_in_flight_under_the_old_epoch() {
    let replica = TestReplica::new("vol-gated", 1);
    let (device, fenced, events) = gated(&replica);
    device.armed.store(true, Ordering::SeqCst);

    let slow = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { fenced.write(1, 0, pattern(1, 4096), false).await }
    });
    bounded(
        "the slow write reaching the device",
        device.entered.notified(),
    )
    .await;

    let newer = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { fenced.write(2, 4096, pattern(2, 4096), false).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !newer.is_finished(),
        "epoch 2 admitted while epoch 1 I/O ran"
    );
    assert!(
        replica.store.persisted().is_empty(),
        "epoch 2 persisted early"
    );
    assert_eq!(fenced.current_epoch(), 1);

    // Queued behind the raise: refused once epoch 2 is in force.
    let late = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { fenced.write(1, 8192, pattern(3, 4096), false).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    device.release.add_permits(1);
    bounded("the slow write", slow)
        .await
        .expect("join")
        .expect("the slow epoch-1 write succeeds");
    bounded("the epoch-2 write", newer)
        .await
        .expect("join")
        .expect("the epoch-2 write succeeds");
    let late = bounded("the late epoch-1 write", late).await.expect("join");
    assert!(
        matches!(
            late,
            Err(Error::StaleEpoch {
                request: 1,
                current: 2
            })
        ),
        "{late:?}"
    );
    assert_eq!(
        *events.lock().expect("lock"),
        vec!["write@0", "persist 2", "write@4096"]
    );
    assert!(matches!(
        fenced.write(1, 8192, pattern(4, 4096), false).await,
        Err(Error::StaleEpoch { current: 2, .. })
    ));
    assert!(replica.file_bytes(8192, 4096).iter().all(|&b| b == 0));
}

/// Dropping the caller of an in-flight write does not release its hold on
/// the epoch: the raise still waits for the device.
#[tokio::test]
async fn a_cancelled_caller_still_holds_off_a_raise_until_its_io_completes() {
    let replica = TestReplica::new("vol-gated", 1);
    let (device, fenced, events) = gated(&replica);
    device.armed.store(true, Ordering::SeqCst);

    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        fenced.write(1, 0, pattern(1, 4096), false),
    )
    .await;
    assert!(cancelled.is_err(), "the gated write finished early");

    let newer = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { fenced.raise_epoch(2).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!newer.is_finished(), "raised while a cancelled write ran");
    device.release.add_permits(1);
    bounded("the raise", newer)
        .await
        .expect("join")
        .expect("raise");
    assert_eq!(*events.lock().expect("lock"), vec!["write@0", "persist 2"]);
}

/// The catalog's store makes the epoch durable in the metadata file, and a
/// restarted agent (a new catalog and fence) keeps refusing older epochs.
#[tokio::test]
async fn catalog_store_persists_the_epoch_in_the_metadata() {
    let env = TestEnv::new();
    let configs = vec![env.file_config("pool-a.img")];
    let pools = PoolManager::open_all(&env.state_dir(), &configs).expect("pools");
    let catalog = ReplicaCatalog::load(Arc::new(pools)).expect("catalog");
    let catalog = Arc::new(Mutex::new(catalog));
    let replica = catalog
        .lock()
        .expect("lock")
        .create(&CreateReplica {
            name: "r1".into(),
            volume_id: "vol-catalog".into(),
            size_bytes: SIZE,
            thin: true,
            pool: None,
        })
        .expect("create replica");
    let engine = IoEngine::start(1, 16).expect("engine");
    let open = |replica: &crate::replica::Replica| {
        Arc::new(ReplicaData::open(&replica.data_path, SIZE, Arc::clone(&engine)).expect("open"))
    };
    let store = Arc::new(CatalogEpochStore::new(Arc::clone(&catalog), "r1"));
    let fenced = FencedReplica::for_replica(&replica, open(&replica), store);
    assert_eq!(fenced.current_epoch(), 0);
    fenced
        .write(7, 0, pattern(1, 4096), true)
        .await
        .expect("write at epoch 7");
    let meta = ReplicaMeta::load(&replica.meta_path).expect("metadata");
    assert_eq!(meta.epoch, 7, "epoch 7 is in the metadata file");
    drop(fenced);

    // Restart: reload the catalog from disk and fence again.
    let pools = Arc::clone(catalog.lock().expect("lock").pools());
    let reloaded = ReplicaCatalog::load(Arc::clone(&pools)).expect("reload");
    let replica = reloaded.get("r1").expect("replica");
    assert_eq!(replica.meta.epoch, 7);
    let reloaded = Arc::new(Mutex::new(reloaded));
    let store = Arc::new(CatalogEpochStore::new(reloaded, "r1"));
    let fenced = FencedReplica::for_replica(&replica, open(&replica), store);
    assert!(matches!(
        fenced.read(6, 0, 4096).await,
        Err(Error::StaleEpoch {
            request: 6,
            current: 7
        })
    ));
    drop(fenced);
    drop(catalog);
    pools.close_all().expect("close pools");
}
