//! A manual measurement, not a pass/fail test: 4 KiB random-write IOPS to
//! one in-process replica, one remote replica, and three replicas (one
//! in-process and two remote, fanned out as a target does). Run with
//!
//! ```text
//! cargo test --release -p ballast-storage-node fan_out_write_iops -- --ignored --nocapture
//! ```

use std::time::Instant;

use super::*;

/// Writers in flight at once (the queue depth).
const DEPTH: u64 = 32;

/// How long each configuration runs.
const RUN: Duration = Duration::from_secs(1);

/// Writes 4 KiB blocks at pseudo-random offsets through `write` from
/// [`DEPTH`] tasks for [`RUN`]; returns writes per second.
async fn measure<F, Fut>(write: F) -> f64
where
    F: Fn(u64, Arc<IoBuf>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let write = Arc::new(write);
    let started = Instant::now();
    let tasks: Vec<_> = (0..DEPTH)
        .map(|task| {
            let write = Arc::clone(&write);
            tokio::spawn(async move {
                let data = pattern(task, 4096);
                let mut x = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut done = 0u64;
                while started.elapsed() < RUN {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    write((x % (SIZE / 4096)) * 4096, Arc::clone(&data)).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("writer");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Rounds of every configuration, interleaved, so that load from other
/// work on a shared machine hits them alike; medians are reported.
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand in release mode"]
async fn fan_out_write_iops() {
    let local = TestReplica::new("vol-bench", 1);
    let remote_a = TestReplica::new("vol-bench", 1);
    let remote_b = TestReplica::new("vol-bench", 1);
    let server_a = start_server(MapResolver::with(&[&remote_a.fenced])).await;
    let server_b = start_server(MapResolver::with(&[&remote_b.fenced])).await;
    let client_a: Arc<dyn ReplicaIo> = Arc::new(client(server_a.local_addr(), "vol-bench"));
    let client_b: Arc<dyn ReplicaIo> = Arc::new(client(server_b.local_addr(), "vol-bench"));
    let configs: Vec<(&str, Vec<Arc<dyn ReplicaIo>>)> = vec![
        ("1 in-process", vec![local.fenced.clone()]),
        ("1 remote", vec![Arc::clone(&client_a)]),
        // Three times the disk writes on one machine, without the protocol.
        (
            "3 in-process",
            vec![
                local.fenced.clone(),
                remote_a.fenced.clone(),
                remote_b.fenced.clone(),
            ],
        ),
        (
            "3 (1 in-process + 2 remote)",
            vec![local.fenced.clone(), client_a, client_b],
        ),
    ];
    let mut results = vec![Vec::new(); configs.len()];
    for _ in 0..ROUNDS {
        for (config, (_, replicas)) in configs.iter().enumerate() {
            results[config].push(fan_out(replicas.clone()).await);
        }
    }
    let medians: Vec<f64> = results
        .iter_mut()
        .map(|r| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        })
        .collect();
    println!("4 KiB random writes, depth {DEPTH}, median of {ROUNDS} rounds of {RUN:?}:");
    for ((name, _), iops) in configs.iter().zip(&medians) {
        println!("  {name:<28} {iops:>8.0} IOPS  {:.2}x", iops / medians[0]);
    }
    server_a.stop().await;
    server_b.stop().await;
}

/// Measures writes fanned out to every one of `replicas` at once.
async fn fan_out(replicas: Vec<Arc<dyn ReplicaIo>>) -> f64 {
    let replicas = Arc::new(replicas);
    measure(move |offset, data| {
        let replicas = Arc::clone(&replicas);
        async move {
            // Concurrently, in the caller's task, as a target fans out.
            let result = match &replicas[..] {
                [one] => one.write(1, offset, data, false).await,
                [a, b, c] => {
                    let (a, b, c) = tokio::join!(
                        a.write(1, offset, Arc::clone(&data), false),
                        b.write(1, offset, Arc::clone(&data), false),
                        c.write(1, offset, data, false),
                    );
                    a.and(b).and(c)
                }
                _ => unreachable!("configurations have one or three replicas"),
            };
            result.expect("fan-out write");
        }
    })
    .await
}
