//! Fan-out, failover through the controller, fencing, the last in-sync
//! replica.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::block::{BlockDevice, BlockError};

const SIZE: u64 = 16 << 20;

/// Applies a write to the model too.
async fn write(target: &Target, model: &mut [u8], offset: u64, data: IoBuf) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    bounded("write", target.write(offset, data, false))
        .await
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_replica() {
    let cluster = Cluster::start(SIZE).await;
    let target = &cluster.target;
    let mut model = vec![0u8; SIZE as usize];
    // Aligned, unaligned, across a region boundary, the last bytes.
    for (seed, (offset, length)) in [
        (0, 65_536),
        (70_000, 1000),
        ((1 << 20) - 100, 300),
        (5 << 20, 1 << 20),
        (SIZE - 4096, 4096),
    ]
    .into_iter()
    .enumerate()
    {
        write(target, &mut model, offset, pattern(seed as u64, length)).await;
    }
    let fua = pattern(9, 8192);
    model[(3 << 20)..(3 << 20) + 8192].copy_from_slice(&fua);
    bounded("FUA write", target.write(3 << 20, fua, true))
        .await
        .expect("FUA write");
    bounded("trim", target.trim(4096, 8192))
        .await
        .expect("trim");
    model[4096..12_288].fill(0);
    bounded(
        "zeroes",
        target.write_zeroes((5 << 20) + 100, 5000, true, false),
    )
    .await
    .expect("write zeroes");
    model[(5 << 20) + 100..(5 << 20) + 5100].fill(0);
    bounded("zeroes", target.write_zeroes(70_500, 100, false, true))
        .await
        .expect("write zeroes, no hole");
    model[70_500..70_600].fill(0);

    // Concurrent writes to disjoint slots.
    let writes = (0..32u64).map(|i| {
        let target = Arc::clone(target);
        async move {
            target
                .write((8 << 20) + i * 65_536, pattern(100 + i, 65_536), false)
                .await
        }
    });
    for result in bounded("concurrent writes", futures_util::future::join_all(writes)).await {
        result.expect("concurrent write");
    }
    for i in 0..32u64 {
        let at = (8 << 20) + i as usize * 65_536;
        model[at..at + 65_536].copy_from_slice(&pattern(100 + i, 65_536));
    }
    bounded("flush", target.flush()).await.expect("flush");

    for offset in (0..SIZE).step_by(4 << 20) {
        let read = bounded("read", target.read(offset, 4 << 20))
            .await
            .expect("read");
        assert!(
            read[..] == model[offset as usize..offset as usize + (4 << 20)],
            "read at {offset} differs from what was written"
        );
    }
    for node in [&cluster.a, &cluster.b, &cluster.c] {
        assert!(node.bytes() == model, "replica {} differs", node.id);
    }
    assert!(cluster.controller.calls().is_empty());
    assert!(target.is_serving());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_dropped_once_and_writes_go_on() {
    let cluster = Cluster::start(SIZE).await;
    let done = Arc::new(AtomicUsize::new(0));
    // Eight writers, each in its own 2 MiB area.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let target = Arc::clone(&cluster.target);
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut last = Vec::new();
                for i in 0..40u64 {
                    let offset = w * (2 << 20) + (i % 16) * 65_536;
                    let data = pattern(w * 1000 + i, 65_536);
                    last.push((offset, data.to_vec()));
                    target.write(offset, data, false).await?;
                    done.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, BlockError>(last)
            })
        })
        .collect();
    eventually("40 writes done", || done.load(Ordering::SeqCst) >= 40).await;
    cluster.c.kill();
    let mut model = vec![0u8; SIZE as usize];
    for writer in writers {
        let writes = bounded("writer", writer)
            .await
            .expect("writer task")
            .expect("no write failed");
        for (offset, data) in writes {
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
    }
    assert_eq!(
        cluster.controller.drops(),
        vec![Call::Drop {
            node: "c".into(),
            committed: true
        }],
        "exactly one drop, of the killed replica"
    );
    let c = cluster.state("c");
    assert_eq!(c.state, SyncState::Faulted);
    assert!(c.dirty_regions.is_some_and(|n| n > 0), "{c:?}");
    assert!(!c.healthy);
    assert!(
        cluster.a.bytes() == model,
        "replica a lacks acknowledged writes"
    );
    assert!(
        cluster.b.bytes() == model,
        "replica b lacks acknowledged writes"
    );
    assert!(
        cluster.c.bytes() != model,
        "the killed replica got every write"
    );
    // Reads keep working (from a, the local one).
    let read = bounded("read", cluster.target.read(0, 65_536))
        .await
        .expect("read");
    assert!(read[..] == model[..65_536]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_until_the_drop_is_committed() {
    let cluster = Cluster::start(SIZE).await;
    let control = cluster.controller.clone();
    control.0.fail_drops.store(2, Ordering::SeqCst);
    control.block(true);
    cluster.c.kill();

    let first = {
        let target = Arc::clone(&cluster.target);
        tokio::spawn(async move { target.write(0, pattern(1, 4096), false).await })
    };
    // Two refused attempts (UNAVAILABLE), then one that blocks.
    eventually("three DropReplica attempts", || {
        control.0.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    let second = {
        let target = Arc::clone(&cluster.target);
        tokio::spawn(async move { target.write(1 << 20, pattern(2, 4096), false).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !first.is_finished(),
        "a write was acknowledged before the drop committed"
    );
    assert!(
        !second.is_finished(),
        "a write was acknowledged before the drop committed"
    );
    assert!(control.drops().is_empty());
    assert_eq!(cluster.state("c").state, SyncState::Dropping);
    // Reads need no commit: they go to an in-sync replica.
    bounded("read while dropping", cluster.target.read(0, 4096))
        .await
        .expect("read");

    control.block(false);
    bounded("first write", first)
        .await
        .expect("task")
        .expect("acknowledged after the commit");
    bounded("second write", second)
        .await
        .expect("task")
        .expect("acknowledged after the commit");
    assert_eq!(control.drops().len(), 1, "{:?}", control.calls());
    assert_eq!(cluster.state("c").state, SyncState::Faulted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_target_fails_writes_waiting_for_the_controller() {
    let cluster = Cluster::start(SIZE).await;
    cluster.controller.block(true);
    cluster.c.kill();
    let waiting = {
        let target = Arc::clone(&cluster.target);
        tokio::spawn(async move { target.write(0, pattern(1, 4096), false).await })
    };
    eventually("the drop is asked for", || {
        cluster.controller.0.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    bounded("stop", cluster.target.stop()).await;
    let result = bounded("waiting write", waiting).await.expect("task");
    assert!(
        matches!(result, Err(BlockError::Unavailable(_))),
        "a write was acknowledged without a commit: {result:?}"
    );
    assert!(!cluster.target.is_serving());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_fences_the_target() {
    let cluster = Cluster::start(SIZE).await;
    let target = &cluster.target;
    bounded("write", target.write(0, pattern(1, 4096), false))
        .await
        .expect("write before");
    // A newer target claims replica b.
    bounded("raise", cluster.b.fenced.raise_epoch(3))
        .await
        .expect("raise epoch");
    let fenced = bounded("write", target.write(1 << 20, pattern(2, 4096), false)).await;
    assert!(
        matches!(&fenced, Err(e @ BlockError::Unavailable(_)) if e.errno() == libc::ESHUTDOWN),
        "{fenced:?}"
    );
    assert!(!target.is_serving());
    assert!(!target.status().serving);
    let later = bounded("write", target.write(2 << 20, pattern(3, 4096), false)).await;
    assert!(
        matches!(later, Err(BlockError::Unavailable(_))),
        "{later:?}"
    );
    let read = bounded("read", target.read(0, 4096)).await;
    assert!(matches!(read, Err(BlockError::Unavailable(_))), "{read:?}");
    let flush = bounded("flush", target.flush()).await;
    assert!(
        matches!(flush, Err(BlockError::Unavailable(_))),
        "{flush:?}"
    );
    for node in [&cluster.a, &cluster.b, &cluster.c] {
        let bytes = node.bytes();
        assert!(
            bytes[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0),
            "a write after fencing landed on {}",
            node.id
        );
    }
    assert!(
        cluster.b.bytes()[1 << 20..(1 << 20) + 4096]
            .iter()
            .all(|&b| b == 0),
        "the replica with the newer epoch took the stale write"
    );
    assert!(
        cluster.controller.drops().is_empty(),
        "a fenced target dropped replicas"
    );
}

/// The controller's typed refusal fences the target, whatever its words:
/// the stand-in words it unlike the real controller (no "stale").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reworded_stale_epoch_refusal_fences_the_target() {
    let cluster = Cluster::start(SIZE).await;
    let target = &cluster.target;
    bounded("write", target.write(0, pattern(1, 4096), false))
        .await
        .expect("write before");
    // A newer target was published; then b stops answering, so the old
    // target asks to drop it and learns that it is stale.
    cluster.controller.set_epoch(3);
    cluster.b.kill();
    let fenced = bounded("write", target.write(1 << 20, pattern(2, 4096), false)).await;
    assert!(
        matches!(&fenced, Err(e @ BlockError::Unavailable(_)) if e.errno() == libc::ESHUTDOWN),
        "{fenced:?}"
    );
    assert!(!target.is_serving());
    let later = bounded("write", target.write(2 << 20, pattern(3, 4096), false)).await;
    assert!(
        matches!(later, Err(BlockError::Unavailable(_))),
        "{later:?}"
    );
    assert!(
        cluster.controller.drops().is_empty(),
        "a stale target's drop was committed"
    );
}

/// A message that says "stale epoch" without the typed refusal is a plain
/// refusal: the write that missed b fails, the target goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_in_words_only_does_not_fence() {
    let cluster = Cluster::start(SIZE).await;
    let target = &cluster.target;
    cluster.controller.set_epoch(3);
    cluster.controller.stale_in_words_only();
    cluster.b.kill();
    let refused = bounded("write", target.write(0, pattern(1, 4096), false)).await;
    assert!(refused.is_err(), "a write that missed b was acknowledged");
    assert!(
        !matches!(&refused, Err(e) if e.errno() == libc::ESHUTDOWN),
        "words alone fenced the target: {refused:?}"
    );
    assert!(target.is_serving(), "words alone fenced the target");
    assert!(target.status().serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_in_sync_replica_is_never_dropped() {
    let (a, b) = (Node::new("a", SIZE), Node::new("b", SIZE));
    b.serve().await;
    let (controller, address) = start_controller(2, &["a", "b"]).await;
    let flaky = Flaky::new(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>);
    let target = start_target(
        SIZE,
        vec![
            a.spec(Arc::clone(&flaky) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
        ],
        &address,
    )
    .await;
    b.kill();
    bounded("write", target.write(0, pattern(1, 4096), false))
        .await
        .expect("write with b failing");
    assert_eq!(controller.drops().len(), 1);

    flaky.fail.store(true, Ordering::SeqCst);
    let failed = bounded("write", target.write(4096, pattern(2, 4096), false)).await;
    assert!(
        matches!(&failed, Err(e) if e.errno() == libc::EIO),
        "{failed:?}"
    );
    let read = bounded("read", target.read(0, 4096)).await;
    assert!(read.is_err(), "a failing last replica served a read");
    assert_eq!(
        controller.drops().len(),
        1,
        "the last in-sync replica was dropped: {:?}",
        controller.calls()
    );
    let status = target.status();
    assert_eq!(status.replicas[0].state, SyncState::InSync);
    assert!(status.serving);

    flaky.fail.store(false, Ordering::SeqCst);
    bounded("write", target.write(4096, pattern(3, 4096), false))
        .await
        .expect("the replica works again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_drop_fails_the_write_and_keeps_the_replica() {
    // The controller holds only c in sync (e.g. it knows more than the
    // target): dropping c is refused.
    let cluster = Cluster::start(SIZE).await;
    *cluster.controller.0.in_sync.lock().expect("lock") = ["c".to_owned()].into();
    cluster.c.kill();
    let result = bounded("write", cluster.target.write(0, pattern(1, 4096), false)).await;
    assert!(
        matches!(&result, Err(e) if e.errno() == libc::EIO),
        "acknowledged without the commit: {result:?}"
    );
    assert_eq!(
        cluster.controller.drops(),
        vec![Call::Drop {
            node: "c".into(),
            committed: false
        }]
    );
    assert_eq!(cluster.state("c").state, SyncState::InSync);
}
