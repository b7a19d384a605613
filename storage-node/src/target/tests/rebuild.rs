//! Rebuilds: delta by dirty log and by hashes, full, concurrent writes,
//! and joining only after the controller's commit.

use std::os::unix::fs::MetadataExt;

use super::*;
use crate::block::BlockDevice;
use crate::target::regions::REGION_BYTES;

const MIB: u64 = 1 << 20;

/// Records, when ReplicaInSync arrives, whether the rebuilt replica's file
/// equals the source's and that the target does not count it in sync yet.
fn check_at_in_sync(cluster: &Cluster, source: &Node, rebuilt: &Node) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (source_path, rebuilt_path) = (source.path.clone(), rebuilt.path.clone());
    let target = Arc::downgrade(&cluster.target);
    let record = Arc::clone(&seen);
    cluster.controller.on_in_sync(move |node| {
        let same = std::fs::read(&source_path).ok() == std::fs::read(&rebuilt_path).ok();
        let state = target.upgrade().map(|t| {
            t.status()
                .replicas
                .into_iter()
                .find(|r| r.node_id == node)
                .map(|r| r.state)
        });
        record
            .lock()
            .expect("lock")
            .push(format!("{node} identical={same} state={state:?}"));
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_rebuild_copies_only_the_dirty_regions() {
    let size = 16 * MIB;
    let cluster = Cluster::start(size).await;
    let target = &cluster.target;
    for region in 0..12 {
        bounded(
            "base write",
            target.write(region * MIB, pattern(region, MIB as usize), false),
        )
        .await
        .expect("base write");
    }
    bounded("flush", target.flush()).await.expect("flush");

    cluster.c.kill();
    for (i, region) in [2u64, 5, 9, 5].into_iter().enumerate() {
        bounded(
            "write while c is down",
            target.write(region * MIB + 4096, pattern(50 + i as u64, 65_536), false),
        )
        .await
        .expect("write while c is down");
    }
    cluster.wait_state("c", SyncState::Faulted).await;
    assert_eq!(cluster.state("c").dirty_regions, Some(3));

    // c comes back (same file, new port).
    cluster.c.serve().await;
    let seen = check_at_in_sync(&cluster, &cluster.a, &cluster.c);
    target
        .add_replica(cluster.c.spec(cluster.c.client(), false), false)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;

    let c = cluster.state("c");
    assert_eq!(
        c.rebuild_copied_bytes,
        3 * MIB,
        "copied more than the dirty regions"
    );
    assert_eq!(c.rebuild_total_bytes, 3 * MIB);
    assert_eq!(c.rebuild_done_bytes, 3 * MIB);
    assert_identical(&cluster.a, &cluster.c);
    assert_identical(&cluster.a, &cluster.b);
    assert_eq!(
        *seen.lock().expect("lock"),
        vec!["c identical=true state=Some(Some(Joining))".to_owned()]
    );
    assert_eq!(
        cluster.controller.in_syncs(),
        vec![Call::InSync {
            node: "c".into(),
            committed: true
        }]
    );
    assert!(cluster.controller.calls().iter().any(|call| matches!(
        call,
        Call::Report { node, done, total } if node == "c" && done == total && *total == 3 * MIB
    )));
    // Back in the in-sync set: it takes writes again.
    bounded("write", target.write(0, pattern(99, 4096), false))
        .await
        .expect("write after the rebuild");
    bounded("flush", target.flush()).await.expect("flush");
    assert_identical(&cluster.a, &cluster.c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cancelled_by_a_failing_chunk_keeps_its_regions_in_the_log() {
    // 8 MiB of base data: a full rebuild copies two 4 MiB chunks at once.
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 8).await;
    b.serve().await;
    c.serve().await;
    let (_controller, address) = start_controller(2, &["a", "b"]).await;
    let flaky = Flaky::new(c.client());
    let target = start_target(
        size,
        vec![
            a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
            c.spec(Arc::clone(&flaky) as Arc<dyn ReplicaIo>, false),
        ],
        &address,
    )
    .await;
    // The first chunk's copy write hangs; the second chunk's fails, which
    // ends the rebuild and cancels the first copy mid-way.
    flaky.hold_writes_below.store(4 * MIB, Ordering::SeqCst);
    flaky.fail_writes_from.store(4 * MIB, Ordering::SeqCst);
    let spec = ReplicaSpec {
        io: Arc::clone(&flaky) as Arc<dyn ReplicaIo>,
        ..c.spec(c.client(), false)
    };
    target.add_replica(spec, true).expect("add replica");
    eventually("the rebuild to fail", || {
        target.status().replicas[2].state == SyncState::Faulted
    })
    .await;
    assert_eq!(
        target.status().replicas[2].dirty_regions,
        Some(8),
        "the cancelled copy's regions must stay in the log"
    );
}

/// Three replica files with the same base data (the first `base` MiB).
async fn nodes_with_base(size: u64, base: u64) -> (Node, Node, Node) {
    let (a, b, c) = (
        Node::new("a", size),
        Node::new("b", size),
        Node::new("c", size),
    );
    for region in 0..base {
        for node in [&a, &b, &c] {
            node.put(1, region * MIB, pattern(region, MIB as usize))
                .await;
        }
    }
    (a, b, c)
}

/// A cluster over prepared nodes, at epoch 2, `c` out of sync.
async fn assemble(a: Node, b: Node, c: Node, size: u64) -> Cluster {
    b.serve().await;
    c.serve().await;
    let (controller, address) = start_controller(2, &["a", "b"]).await;
    let specs = vec![
        a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, true),
        b.spec(b.client(), true),
        c.spec(c.client(), false),
    ];
    let target = start_target(size, specs, &address).await;
    Cluster {
        a,
        b,
        c,
        controller,
        target,
        size,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_rebuild_without_a_log_compares_hashes() {
    let size = 16 * MIB;
    let (a, b, c) = nodes_with_base(size, 4).await;
    // Writes c missed (as if the target that dropped it is gone).
    for node in [&a, &b] {
        node.put(1, MIB + 4096, pattern(70, 65_536)).await;
        node.put(1, 6 * MIB, pattern(71, 65_536)).await;
    }
    let cluster = assemble(a, b, c, size).await;
    let c = cluster.state("c");
    assert_eq!((c.state, c.dirty_regions), (SyncState::Faulted, None));

    let seen = check_at_in_sync(&cluster, &cluster.a, &cluster.c);
    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), false)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;
    let c = cluster.state("c");
    // Region 1 (allocated in full) and the 64 KiB written in region 6.
    assert_eq!(c.rebuild_copied_bytes, MIB + 65_536);
    assert_eq!(c.rebuild_total_bytes, 2 * MIB);
    assert_identical(&cluster.a, &cluster.c);
    assert_eq!(seen.lock().expect("lock").len(), 1);
    assert!(seen.lock().expect("lock")[0].contains("identical=true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_rebuild_copies_only_allocated_extents() {
    let size = 16 * MIB;
    let (a, b, c) = (
        Node::new("a", size),
        Node::new("b", size),
        Node::new("c", size),
    );
    let extents = [0, 5 * MIB + 131_072, 13 * MIB];
    for node in [&a, &b] {
        for (i, offset) in extents.into_iter().enumerate() {
            node.put(1, offset, pattern(i as u64, 262_144)).await;
        }
    }
    // What an aborted earlier attempt could have left on the new replica:
    // bytes where the source has holes.
    c.put(1, 9 * MIB, pattern(80, 65_536)).await;
    c.put(1, 5 * MIB, pattern(81, 65_536)).await;
    let cluster = assemble(a, b, c, size).await;

    let seen = check_at_in_sync(&cluster, &cluster.a, &cluster.c);
    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), true)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;
    let c = cluster.state("c");
    assert_eq!(
        c.rebuild_copied_bytes,
        3 * 262_144,
        "copied more than the allocated extents"
    );
    assert_identical(&cluster.a, &cluster.c);
    assert!(seen.lock().expect("lock")[0].contains("identical=true"));
    // Thin stays thin: nothing but the copied extents is allocated.
    let allocated = std::fs::metadata(&cluster.c.path).expect("stat").blocks() * 512;
    assert!(
        allocated <= 2 * MIB,
        "the new replica holds {allocated} bytes"
    );
}

/// A small xorshift generator: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, trims and zeroes in `area` until `stop`; returns the
/// area's expected content.
async fn hammer(
    target: Arc<Target>,
    seed: u64,
    area: std::ops::Range<u64>,
    initial: Vec<u8>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut model = initial;
    let span = area.end - area.start;
    while !stop.load(Ordering::SeqCst) {
        let length = 1 + rng.below(256 * 1024);
        let offset = area.start + rng.below(span - length);
        let at = (offset - area.start) as usize;
        let end = at + length as usize;
        match rng.below(10) {
            0 => {
                target.trim(offset, length).await.expect("trim");
                model[at..end].fill(0);
            }
            1 => {
                target
                    .write_zeroes(offset, length, rng.below(2) == 0, false)
                    .await
                    .expect("write zeroes");
                model[at..end].fill(0);
            }
            _ => {
                let data = pattern(rng.next(), length as usize);
                model[at..end].copy_from_slice(&data);
                target.write(offset, data, false).await.expect("write");
            }
        }
        ops.fetch_add(1, Ordering::SeqCst);
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_rebuild_end_on_every_replica() {
    let size = 64 * MIB;
    let (a, b, c) = (
        Node::new("a", size),
        Node::new("b", size),
        Node::new("c", size),
    );
    let mut base = vec![0u8; size as usize];
    for region in 0..48 {
        let data = pattern(region, MIB as usize);
        base[(region * MIB) as usize..((region + 1) * MIB) as usize].copy_from_slice(&data);
        a.put(1, region * MIB, IoBuf::from_slice(&data)).await;
        b.put(1, region * MIB, data).await;
    }
    let cluster = assemble(a, b, c, size).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let quarter = size / 4;
    let writers: Vec<_> = (0..4u64)
        .map(|q| {
            let area = q * quarter..(q + 1) * quarter;
            let initial = base[area.start as usize..area.end as usize].to_vec();
            tokio::spawn(hammer(
                Arc::clone(&cluster.target),
                q + 7,
                area,
                initial,
                Arc::clone(&stop),
                Arc::clone(&ops),
            ))
        })
        .collect();
    eventually("writes before the rebuild", || {
        ops.load(Ordering::SeqCst) >= 50
    })
    .await;
    let before = ops.load(Ordering::SeqCst);
    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), true)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;
    let during = ops.load(Ordering::SeqCst) - before;
    let joined = ops.load(Ordering::SeqCst);
    eventually("writes after the join", || {
        ops.load(Ordering::SeqCst) >= joined + 50
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut model = Vec::new();
    for writer in writers {
        model.extend(bounded("writer", writer).await.expect("writer task"));
    }
    bounded("flush", cluster.target.flush())
        .await
        .expect("flush");
    assert!(during > 0, "no write overlapped the rebuild");
    assert!(
        cluster.a.bytes() == model,
        "replica a differs from what was written"
    );
    assert_identical(&cluster.a, &cluster.b);
    assert_identical(&cluster.a, &cluster.c);
    assert_eq!(cluster.controller.in_syncs().len(), 1);
    assert_eq!(cluster.size, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_replica_joins_only_after_the_commit() {
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 2).await;
    let cluster = assemble(a, b, c, size).await;
    cluster.controller.block(true);
    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), true)
        .expect("add replica");
    cluster.wait_state("c", SyncState::Joining).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.state("c").state, SyncState::Joining);
    assert!(cluster.controller.in_syncs().is_empty());
    // Writes still reach it while it joins.
    bounded(
        "write while joining",
        cluster.target.write(3 * MIB, pattern(5, 4096), false),
    )
    .await
    .expect("write while joining");
    cluster.controller.block(false);
    cluster.wait_state("c", SyncState::InSync).await;
    bounded("flush", cluster.target.flush())
        .await
        .expect("flush");
    assert_identical(&cluster.a, &cluster.c);
    assert_eq!(cluster.controller.in_syncs().len(), 1);
    assert_eq!(REGION_BYTES, MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failure_aborts_the_rebuild_but_not_the_write() {
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 2).await;
    b.serve().await;
    c.serve().await;
    let (controller, address) = start_controller(2, &["a", "b"]).await;
    let flaky = Flaky::new(c.client());
    let target = start_target(
        size,
        vec![
            a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
            c.spec(Arc::clone(&flaky) as Arc<dyn ReplicaIo>, false),
        ],
        &address,
    )
    .await;
    // The rebuild waits behind the controller; then the replica fails.
    controller.block(true);
    let spec = ReplicaSpec {
        io: Arc::clone(&flaky) as Arc<dyn ReplicaIo>,
        ..c.spec(c.client(), false)
    };
    target.add_replica(spec, true).expect("add replica");
    eventually("joining", || {
        target.status().replicas[2].state == SyncState::Joining
    })
    .await;
    flaky.fail.store(true, Ordering::SeqCst);
    let write = {
        let target = Arc::clone(&target);
        tokio::spawn(async move { target.write(0, pattern(1, 4096), false).await })
    };
    controller.block(false);
    bounded("write", write)
        .await
        .expect("task")
        .expect("a failing joining replica does not fail the write");
    eventually("faulted", || {
        target.status().replicas[2].state == SyncState::Faulted
    })
    .await;
    // The drop came after the join, so the store ends with c out of sync.
    let calls: Vec<Call> = controller
        .calls()
        .into_iter()
        .filter(|c| !matches!(c, Call::Report { .. }))
        .collect();
    assert_eq!(
        calls,
        vec![
            Call::InSync {
                node: "c".into(),
                committed: true
            },
            Call::Drop {
                node: "c".into(),
                committed: true
            }
        ]
    );
    assert!(!controller.0.in_sync.lock().expect("lock").contains("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waits_for_the_copy_of_its_region() {
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 1).await;
    b.serve().await;
    c.serve().await;
    let (controller, address) = start_controller(2, &["a", "b"]).await;
    let source = Flaky::new(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>);
    let target = start_target(
        size,
        vec![
            a.spec(Arc::clone(&source) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
            c.spec(c.client(), false),
        ],
        &address,
    )
    .await;
    // The copy of region 0 stops between its read of the source and its
    // write to c.
    source.hold_read.store(true, Ordering::SeqCst);
    let held = source.held.notified();
    target
        .add_replica(c.spec(c.client(), false), true)
        .expect("add replica");
    bounded("the copy's read", held).await;
    let write = {
        let target = Arc::clone(&target);
        tokio::spawn(async move { target.write(4096, pattern(9, 4096), false).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !write.is_finished(),
        "a write to a region being copied completed during the copy"
    );
    source.release.add_permits(1);
    bounded("write", write)
        .await
        .expect("task")
        .expect("write after the copy");
    eventually("in sync", || {
        target.status().replicas[2].state == SyncState::InSync
    })
    .await;
    assert_identical(&a, &c);
    assert_eq!(controller.in_syncs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_aborted_before_its_scan_keeps_no_log() {
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 2).await;
    b.serve().await;
    c.serve().await;
    let (_controller, address) = start_controller(2, &["a", "b"]).await;
    let flaky = Flaky::new(c.client());
    let spec = |io: Arc<Flaky>| ReplicaSpec {
        io: io as Arc<dyn ReplicaIo>,
        ..c.spec(c.client(), false)
    };
    let target = start_target(
        size,
        vec![
            a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
            spec(Arc::clone(&flaky)),
        ],
        &address,
    )
    .await;
    // Hashing c fails: the rebuild stops before it knows what differs.
    flaky.fail.store(true, Ordering::SeqCst);
    target
        .add_replica(spec(Arc::clone(&flaky)), false)
        .expect("add replica");
    eventually("faulted again", || {
        let c = &target.status().replicas[2];
        c.state == SyncState::Faulted && c.rebuild_total_bytes == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = &target.status().replicas[2];
    assert_eq!(c.state, SyncState::Faulted);
    assert_eq!(c.dirty_regions, None, "an incomplete log was kept");
}

/// Invariant 4 against a stale target: the target (epoch 2) never claimed
/// c (c did not answer at start), so c still accepts epoch 1, and an older
/// target writes region 3 there, which this target never writes. A rebuild
/// by dirty-region log would miss it; the rebuild must compare hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_the_target_never_claimed_is_rebuilt_by_hashes() {
    let size = 8 * MIB;
    let (a, b, c) = nodes_with_base(size, 4).await;
    b.serve().await;
    c.serve().await;
    let (controller, address) = start_controller(2, &["a", "b", "c"]).await;
    // c is unreachable while the target starts (a paused node).
    let unreachable = Flaky::new(c.client());
    unreachable.fail.store(true, Ordering::SeqCst);
    let target = start_target(
        size,
        vec![
            a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, true),
            b.spec(b.client(), true),
            ReplicaSpec {
                io: unreachable as Arc<dyn ReplicaIo>,
                ..c.spec(c.client(), true)
            },
        ],
        &address,
    )
    .await;
    let cluster = Cluster {
        a,
        b,
        c,
        controller,
        target,
        size,
    };
    cluster.wait_state("c", SyncState::Faulted).await;
    assert_eq!(cluster.c.fenced.current_epoch(), 1, "c was claimed");
    // The new target writes region 1 only: its log (if it kept one) holds
    // region 1 and not region 3.
    bounded(
        "write",
        cluster.target.write(MIB, pattern(71, MIB as usize), false),
    )
    .await
    .expect("write while c is out");
    bounded("flush", cluster.target.flush())
        .await
        .expect("flush");
    // The old target (epoch 1) resumes and writes its local replica c.
    cluster.c.put(1, 3 * MIB, pattern(72, MIB as usize)).await;
    assert_eq!(
        cluster.state("c").dirty_regions,
        None,
        "a dirty-region log was kept for a replica an older target can write"
    );

    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), false)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;
    assert_eq!(cluster.c.fenced.current_epoch(), 2);
    assert_identical(&cluster.a, &cluster.c);
    assert_identical(&cluster.a, &cluster.b);
    assert_eq!(
        cluster.state("c").rebuild_copied_bytes,
        2 * MIB,
        "the regions written by either target are copied, no others"
    );
}
