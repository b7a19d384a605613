//! A real NBD client on a 3-replica target through the real NBD server:
//! fio's nbd engine writing with verification while a replica is killed,
//! then qemu-io reading back.

use std::process::Stdio;

use tokio::process::Command;

use super::*;
use crate::nbd::{Export, NbdServer};

const SIZE: u64 = 64 << 20;

/// Runs `program`, killing it if the test gives up; panics unless it
/// succeeds, and returns its standard output.
async fn run(program: &str, args: &[String]) -> String {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within 120 s"))
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} failed with {}: stdout {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verifies_through_nbd_while_a_replica_dies() {
    let cluster = Cluster::start(SIZE).await;
    let dir = scratch_dir();
    let socket = dir.path().join("target.sock");
    let server = NbdServer::start(
        Export {
            name: VOLUME.to_owned(),
            device: Arc::clone(&cluster.target) as Arc<dyn crate::block::BlockDevice>,
        },
        &socket,
        None,
    )
    .expect("NBD server starts");
    let uri = format!("nbd+unix:///{VOLUME}?socket={}", socket.display());

    let fio = {
        let args: Vec<String> = [
            "--name=replicated",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--size=48M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=0",
            "--verify_state_save=0",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        tokio::spawn(async move { run("fio", &args).await })
    };
    // Kill c once writes are flowing.
    eventually("fio writing", || cluster.c.bytes().iter().any(|&b| b != 0)).await;
    cluster.c.kill();
    let report = bounded("fio", fio).await.expect("fio task");
    assert!(report.contains("replicated"), "{report}");

    assert_eq!(
        cluster.controller.drops(),
        vec![Call::Drop {
            node: "c".into(),
            committed: true
        }]
    );
    bounded("flush", crate::block::BlockDevice::flush(&*cluster.target))
        .await
        .expect("flush");
    assert_identical(&cluster.a, &cluster.b);

    // qemu-io reads through the same export what fio wrote on a and b.
    let expected = cluster.a.bytes();
    let probe = expected[..65_536].iter().position(|&b| b != 0);
    if let Some(at) = probe {
        let out = run(
            "qemu-io",
            &[
                "-f".into(),
                "raw".into(),
                "-c".into(),
                format!("read -P {} {at} 1", expected[at]),
                uri.clone(),
            ],
        )
        .await;
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    bounded("NBD server stop", server.stop()).await;
}
