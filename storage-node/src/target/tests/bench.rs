//! A manual measurement, not a pass/fail test: full-rebuild throughput of
//! a fully written volume from the in-process replica to a remote one over
//! loopback (goal: at least 200 MiB/s). Run with
//!
//! ```text
//! cargo test --release -p ballast-storage-node full_rebuild_throughput -- --ignored --nocapture
//! ```

use super::*;
use crate::block::BlockDevice;

/// Volume size: 512 MiB, all of it written.
const SIZE: u64 = 512 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run it by hand in release mode"]
async fn full_rebuild_throughput() {
    let cluster = Cluster::start_with(SIZE, [true, true, false]).await;
    for offset in (0..SIZE).step_by(4 << 20) {
        cluster
            .target
            .write(offset, pattern(offset, 4 << 20), false)
            .await
            .expect("fill");
    }
    cluster.target.flush().await.expect("flush");
    let started = Instant::now();
    cluster
        .target
        .add_replica(cluster.c.spec(cluster.c.client(), false), true)
        .expect("add replica");
    cluster.wait_state("c", SyncState::InSync).await;
    let elapsed = started.elapsed();
    let copied = cluster.state("c").rebuild_copied_bytes;
    assert_eq!(copied, SIZE);
    println!(
        "full rebuild: {} MiB in {:.2} s = {:.0} MiB/s",
        copied >> 20,
        elapsed.as_secs_f64(),
        (copied >> 20) as f64 / elapsed.as_secs_f64()
    );
}
