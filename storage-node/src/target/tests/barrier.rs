//! The write barrier on a running target: what a snapshot's cut relies on.

use super::*;
use crate::block::BlockDevice;

const SIZE: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_while_paused_and_every_earlier_write_is_on_every_replica() {
    let cluster = Cluster::start(SIZE).await;
    let target = &cluster.target;
    let before = pattern(1, 65_536).to_vec();
    bounded("write", target.write(0, pattern(1, 65_536), false))
        .await
        .expect("write before the cut");

    let cut = bounded(
        "pause",
        target.pause("snap-1", Instant::now(), Duration::from_secs(10)),
    )
    .await
    .expect("pause");
    let mut nodes = cut.in_sync_node_ids.clone();
    nodes.sort();
    assert_eq!(nodes, ["a", "b", "c"]);
    // Every replica holds the write acknowledged before the cut.
    for node in [&cluster.a, &cluster.b, &cluster.c] {
        assert!(node.bytes()[..65_536] == before[..], "node {}", node.id);
    }

    let after = pattern(2, 65_536).to_vec();
    let held = {
        let target = Arc::clone(target);
        tokio::spawn(async move { target.write(0, pattern(2, 65_536), false).await })
    };
    let flush = {
        let target = Arc::clone(target);
        tokio::spawn(async move { target.flush().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a write ran while the barrier held");
    assert!(!flush.is_finished(), "a flush ran while the barrier held");
    for node in [&cluster.a, &cluster.b, &cluster.c] {
        assert!(
            node.bytes()[..65_536] == before[..],
            "node {} changed under the barrier",
            node.id
        );
    }
    // Reads are not gated.
    let read = bounded("read while paused", target.read(0, 65_536))
        .await
        .expect("read");
    assert!(read[..] == before[..]);

    let resumed = target.resume("snap-1");
    assert!(resumed.was_paused);
    bounded("held write", held)
        .await
        .expect("task")
        .expect("write after resume");
    bounded("held flush", flush)
        .await
        .expect("task")
        .expect("flush after resume");
    for node in [&cluster.a, &cluster.b, &cluster.c] {
        assert!(node.bytes()[..65_536] == after[..], "node {}", node.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_waits_for_a_write_in_flight_and_fails_at_its_deadline() {
    let cluster = Cluster::start(SIZE).await;
    // A write that waits for a drop the controller does not commit yet.
    cluster.controller.block(true);
    cluster.c.kill();
    let waiting = {
        let target = Arc::clone(&cluster.target);
        tokio::spawn(async move { target.write(0, pattern(3, 4096), false).await })
    };
    eventually("the drop is asked for", || {
        cluster.controller.0.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    let result = bounded(
        "pause",
        cluster
            .target
            .pause("snap-2", Instant::now(), Duration::from_millis(300)),
    )
    .await;
    assert!(
        matches!(
            result,
            Err(Error::Pause {
                source: PauseError::Deadline { .. },
                ..
            })
        ),
        "paused with a write in flight: {result:?}"
    );
    // The failed pause holds nothing: the write completes once the drop
    // commits, and later writes run.
    cluster.controller.block(false);
    bounded("waiting write", waiting)
        .await
        .expect("task")
        .expect("write");
    bounded(
        "later write",
        cluster.target.write(8192, pattern(4, 4096), false),
    )
    .await
    .expect("later write");
    assert!(!cluster.target.resume("snap-2").was_paused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_without_resume_drops_at_its_deadline() {
    let cluster = Cluster::start(SIZE).await;
    bounded(
        "pause",
        cluster
            .target
            .pause("lost", Instant::now(), Duration::from_millis(400)),
    )
    .await
    .expect("pause");
    let held = {
        let target = Arc::clone(&cluster.target);
        tokio::spawn(async move { target.write(0, pattern(5, 4096), false).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!held.is_finished(), "a write ran while the barrier held");
    bounded("write held to the deadline", held)
        .await
        .expect("task")
        .expect("write after the deadline");
    assert!(!cluster.target.resume("lost").was_paused);
}
