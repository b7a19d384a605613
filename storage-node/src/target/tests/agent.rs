//! The agent's wiring, as root: a real agent with a file pool, its
//! replica server on `--data-listen`, and its targets (StartTarget's
//! idempotency and epochs, the socket it picks, the local replica reached
//! in-process and shared with the replica server, StopTarget).

use crate::agent::{Agent, AgentConfig};
use crate::pool::{PoolConfig, PoolSource};
use crate::replica::CreateReplica;
use crate::target::{ReplicaAddress, StartTarget};

use super::*;

const SIZE: u64 = 16 << 20;

async fn scenario(agent: Arc<Agent>, state_dir: PathBuf) {
    agent
        .create_replica(CreateReplica {
            name: VOLUME.to_owned(),
            volume_id: VOLUME.to_owned(),
            size_bytes: SIZE,
            thin: true,
            pool: None,
        })
        .await
        .expect("create replica");
    let server = agent
        .serve_replicas("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("replica server");
    let b = Node::new("b", SIZE);
    b.serve().await;
    let (controller, address) = start_controller(2, &["a", "b"]).await;
    let start = |epoch| StartTarget {
        volume_id: VOLUME.to_owned(),
        epoch,
        size_bytes: SIZE,
        socket_path: None,
        replicas: vec![
            ReplicaAddress {
                node_id: "a".into(),
                replica_name: VOLUME.into(),
                data_address: server.local_addr().to_string(),
                in_sync: true,
            },
            ReplicaAddress {
                node_id: "b".into(),
                replica_name: "b-r".into(),
                data_address: b.addr.lock().expect("lock").expect("served").to_string(),
                in_sync: true,
            },
        ],
        controller_address: address.clone(),
    };
    let targets = agent.targets();
    let info = bounded("start", targets.start(start(2)))
        .await
        .expect("start target");
    let socket = state_dir.join("targets").join(format!("{VOLUME}.sock"));
    assert_eq!(info.socket_path, socket);
    assert_eq!(
        info.nbd_uri,
        format!("nbd+unix:///{VOLUME}?socket={}", socket.display())
    );
    assert_eq!(info.status.replicas[0].location, Location::Local);
    assert!(matches!(
        info.status.replicas[1].location,
        Location::Remote(_)
    ));
    // Idempotent for the same epoch; a lower one is refused.
    let again = bounded("start again", targets.start(start(2)))
        .await
        .expect("same epoch");
    assert_eq!(again.socket_path, info.socket_path);
    let lower = bounded("start lower", targets.start(start(1))).await;
    assert!(
        matches!(lower, Err(Error::StaleEpoch { current: 2, .. })),
        "{lower:?}"
    );

    // The local replica took the epoch, durably, through the shared fence:
    // the replica server reports the same epoch to a remote client.
    let replicas = agent.list_replicas().await.expect("list replicas");
    assert_eq!(replicas[0].replica.meta.epoch, 2);
    let remote =
        ReplicaClient::new(server.local_addr(), VOLUME, ClientConfig::default()).expect("client");
    let seen = bounded("info", remote.info(2)).await.expect("info");
    assert_eq!(seen.epoch, 2);

    // A write through NBD lands on both replicas.
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 64k", &info.nbd_uri])
        .kill_on_drop(true)
        .output();
    let out = bounded("qemu-io", out).await.expect("run qemu-io");
    assert!(out.status.success(), "{out:?}");
    let local = std::fs::read(&replicas[0].replica.data_path).expect("read local replica");
    for bytes in [&local, &b.bytes()] {
        assert!(
            bytes[1 << 20..(1 << 20) + 65_536]
                .iter()
                .all(|&x| x == 0x5a)
        );
    }

    // A higher epoch replaces the target; the old one is gone.
    let newer = bounded("start newer", targets.start(start(3)))
        .await
        .expect("higher epoch");
    assert_eq!(newer.status.epoch, 3);
    assert_eq!(targets.list().len(), 1);
    assert_eq!(targets.get(VOLUME).expect("get").status.epoch, 3);
    // AddReplica needs the running epoch.
    let mismatch = targets
        .add_replica(VOLUME, 2, start(3).replicas[1].clone(), false)
        .await;
    assert!(
        matches!(mismatch, Err(Error::EpochMismatch { .. })),
        "{mismatch:?}"
    );

    assert!(bounded("stop", targets.stop(VOLUME)).await.expect("stop"));
    assert!(
        !bounded("stop again", targets.stop(VOLUME))
            .await
            .expect("stop")
    );
    assert!(matches!(
        targets.get(VOLUME),
        Err(Error::TargetNotFound { .. })
    ));
    assert!(!socket.exists(), "the socket outlived its target");
    assert!(controller.drops().is_empty(), "{:?}", controller.calls());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_targets_over_its_own_replicas() {
    let dir = scratch_dir();
    let state_dir = dir.path().join("state");
    let config = AgentConfig {
        state_dir: state_dir.clone(),
        pools: vec![PoolConfig::new(PoolSource::File {
            path: dir.path().join("pool.img"),
            size_bytes: Some(512 << 20),
        })],
        io_threads: 1,
        io_queue_depth: 64,
    };
    let agent = tokio::task::spawn_blocking(move || Agent::open(&config))
        .await
        .expect("open task")
        .expect("agent opens");
    let agent = Arc::new(agent);
    // Run the scenario in its own task so the pool is closed (unmounted,
    // loop device detached) even when an assertion fails.
    let result = tokio::spawn(scenario(Arc::clone(&agent), state_dir)).await;
    agent.shutdown().await.expect("agent shutdown");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic.into_panic());
    }
}
