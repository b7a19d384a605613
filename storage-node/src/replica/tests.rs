//! Replica catalog tests on real file-backed XFS pools (root).

use std::fs;
use std::sync::Arc;

use super::*;
use crate::pool::tests::TestEnv;
use crate::pool::{self, PoolConfig, PoolManager};

const MIB: u64 = 1 << 20;

struct Node {
    env: TestEnv,
    configs: Vec<PoolConfig>,
}

impl Node {
    fn new() -> Self {
        let env = TestEnv::new();
        let configs = vec![env.file_config("pool-a.img")];
        Self { env, configs }
    }

    /// Opens the pools and loads the catalog, as an agent start does.
    fn start(&self) -> ReplicaCatalog {
        let pools = PoolManager::open_all(&self.env.state_dir(), &self.configs).expect("pools");
        ReplicaCatalog::load(Arc::new(pools)).expect("catalog")
    }

    /// Closes the pools, as a clean agent shutdown does.
    fn stop(&self, catalog: ReplicaCatalog) {
        catalog.pools().close_all().expect("close pools");
    }
}

fn req(name: &str, size_bytes: u64, thin: bool) -> CreateReplica {
    CreateReplica {
        name: name.to_owned(),
        volume_id: format!("vol-{name}"),
        size_bytes,
        thin,
        pool: None,
    }
}

fn provisioned(catalog: &ReplicaCatalog) -> (u64, u64) {
    let cap = catalog
        .pools()
        .get("pool-a")
        .expect("pool")
        .capacity()
        .expect("capacity");
    (cap.provisioned_bytes, cap.replica_count)
}

#[test]
fn create_grow_destroy_and_list() {
    let node = Node::new();
    let mut catalog = node.start();
    assert!(catalog.list().is_empty());

    let r1 = catalog
        .create(&req("r1", 64 * MIB, true))
        .expect("create r1");
    assert_eq!(r1.pool, "pool-a");
    let dir = node.env.state_dir().join("pools/pool-a/replicas");
    assert_eq!(r1.data_path, dir.join("r1.data"));
    assert_eq!(r1.meta_path, dir.join("r1.meta.json"));
    assert_eq!(fs::metadata(&r1.data_path).expect("data").len(), 64 * MIB);
    assert_eq!(ReplicaMeta::load(&r1.meta_path).expect("meta"), r1.meta);
    assert_eq!(r1.meta.volume_id, "vol-r1");
    assert_eq!(r1.meta.epoch, 0);
    assert!(r1.meta.thin);
    assert_eq!(catalog.get("r1").expect("get"), r1);
    assert_eq!(provisioned(&catalog), (64 * MIB, 1));

    catalog.create(&req("r2", 4096, true)).expect("create r2");
    let names: Vec<String> = catalog.list().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["r1", "r2"]);

    let grown = catalog.grow("r1", 128 * MIB).expect("grow");
    assert_eq!(grown.meta.size_bytes, 128 * MIB);
    assert_eq!(fs::metadata(&r1.data_path).expect("data").len(), 128 * MIB);
    assert_eq!(
        ReplicaMeta::load(&r1.meta_path).expect("meta").size_bytes,
        128 * MIB
    );
    assert_eq!(catalog.grow("r1", 128 * MIB).expect("same size"), grown);
    assert!(matches!(
        catalog.grow("r1", 64 * MIB),
        Err(Error::Shrink { size_bytes, .. }) if size_bytes == 128 * MIB
    ));
    assert!(matches!(
        catalog.grow("r1", 128 * MIB + 1),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        catalog.grow("nope", 8192),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(provisioned(&catalog), (128 * MIB + 4096, 2));

    catalog.destroy("r1").expect("destroy");
    assert!(!r1.data_path.exists() && !r1.meta_path.exists());
    assert!(matches!(catalog.get("r1"), Err(Error::NotFound { .. })));
    assert!(matches!(catalog.destroy("r1"), Err(Error::NotFound { .. })));
    assert_eq!(provisioned(&catalog), (4096, 1));
    node.stop(catalog);
}

#[test]
fn create_is_idempotent_and_validates_its_arguments() {
    let node = Node::new();
    let mut catalog = node.start();
    let first = catalog.create(&req("r1", 8 * MIB, true)).expect("create");
    let again = catalog
        .create(&req("r1", 8 * MIB, true))
        .expect("idempotent");
    assert_eq!(again, first);
    let in_pool = CreateReplica {
        pool: Some("pool-a".to_owned()),
        ..req("r1", 8 * MIB, true)
    };
    assert_eq!(catalog.create(&in_pool).expect("same pool named"), first);
    assert_eq!(provisioned(&catalog), (8 * MIB, 1));

    for conflicting in [
        req("r1", 16 * MIB, true),
        req("r1", 8 * MIB, false),
        CreateReplica {
            volume_id: "other".to_owned(),
            ..req("r1", 8 * MIB, true)
        },
    ] {
        let err = catalog.create(&conflicting).expect_err("conflict");
        assert!(matches!(err, Error::AlreadyExists { .. }), "{err:?}");
    }
    assert_eq!(
        ReplicaMeta::load(&first.meta_path).expect("meta"),
        first.meta
    );

    let long = "r".repeat(MAX_NAME_LEN);
    catalog
        .create(&req(&long, 4096, true))
        .expect("128 bytes is fine");
    for bad in [
        "",
        ".r",
        "a/b",
        "a b",
        "r\u{e9}",
        &"r".repeat(MAX_NAME_LEN + 1),
    ] {
        let err = catalog.create(&req(bad, 4096, true)).expect_err(bad);
        assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err:?}");
    }
    for size in [0, 4095, 4097, 1 << 63] {
        let err = catalog.create(&req("r9", size, true)).expect_err("size");
        assert!(matches!(err, Error::InvalidSize { .. }), "{size}: {err:?}");
    }
    let standalone = CreateReplica {
        volume_id: String::new(),
        ..req("r9", 4096, true)
    };
    let created = catalog.create(&standalone).expect("standalone replica");
    assert_eq!(created.meta.volume_id, "");
    // Its volume id is fixed: a volume cannot take it over by name.
    assert!(matches!(
        catalog.create(&req("r9", 4096, true)),
        Err(Error::AlreadyExists { .. })
    ));
    catalog.destroy("r9").expect("destroy");
    let no_pool = CreateReplica {
        pool: Some("nope".to_owned()),
        ..req("r9", 4096, true)
    };
    assert!(matches!(
        catalog.create(&no_pool),
        Err(Error::Pool(pool::Error::PoolNotFound { .. }))
    ));
    let dir = node.env.state_dir().join("pools/pool-a/replicas");
    assert!(!dir.join("r9.data").exists());
    node.stop(catalog);
}

#[test]
fn thin_and_thick_allocation_and_capacity_limits() {
    let node = Node::new();
    let mut catalog = node.start();

    catalog.create(&req("thin", 64 * MIB, true)).expect("thin");
    catalog
        .create(&req("thick", 64 * MIB, false))
        .expect("thick");
    let thin = catalog.allocated_bytes("thin").expect("thin allocated");
    let thick = catalog.allocated_bytes("thick").expect("thick allocated");
    assert!(thin < MIB, "thin replica allocated {thin} bytes");
    assert!(thick >= 64 * MIB, "thick replica allocated {thick} bytes");

    catalog.grow("thin", 96 * MIB).expect("grow thin");
    catalog.grow("thick", 96 * MIB).expect("grow thick");
    let thin = catalog.allocated_bytes("thin").expect("thin allocated");
    let thick = catalog.allocated_bytes("thick").expect("thick allocated");
    assert!(thin < MIB, "grown thin replica allocated {thin} bytes");
    assert!(
        thick >= 96 * MIB,
        "grown thick replica allocated {thick} bytes"
    );

    let cap = catalog
        .pools()
        .get("pool-a")
        .expect("pool")
        .capacity()
        .expect("capacity");
    let too_thick = (cap.free_bytes + MIB).next_multiple_of(4096);
    let err = catalog
        .create(&req("huge-thick", too_thick, false))
        .expect_err("thick beyond free space");
    assert!(
        matches!(err, Error::Pool(pool::Error::NoPoolFits { .. })),
        "{err:?}"
    );
    let room = (cap.limit_bytes - cap.provisioned_bytes) / 4096 * 4096;
    let err = catalog
        .create(&req("over", room + 4096, true))
        .expect_err("over the overcommit limit");
    assert!(
        matches!(err, Error::Pool(pool::Error::NoPoolFits { .. })),
        "{err:?}"
    );
    let err = catalog
        .create(&CreateReplica {
            pool: Some("pool-a".to_owned()),
            ..req("over", room + 4096, true)
        })
        .expect_err("over the limit in a named pool");
    assert!(
        matches!(err, Error::Pool(pool::Error::OvercommitLimit { .. })),
        "{err:?}"
    );
    catalog
        .create(&req("fits", room, true))
        .expect("thin up to the limit");
    let err = catalog
        .grow("fits", room + 4096)
        .expect_err("grow over the limit");
    assert!(
        matches!(err, Error::Pool(pool::Error::OvercommitLimit { .. })),
        "{err:?}"
    );
    let dir = node.env.state_dir().join("pools/pool-a/replicas");
    assert!(!dir.join("over.data").exists() && !dir.join("huge-thick.data").exists());
    assert_eq!(provisioned(&catalog), (96 * MIB * 2 + room, 3));
    node.stop(catalog);
}

#[test]
fn epochs_persist_across_restarts_and_never_go_back() {
    let node = Node::new();
    let mut catalog = node.start();
    catalog.create(&req("r1", 4096, true)).expect("create");

    assert_eq!(catalog.set_epoch("r1", 5).expect("raise").meta.epoch, 5);
    let err = catalog.set_epoch("r1", 3).expect_err("lower epoch");
    assert!(
        matches!(
            err,
            Error::StaleEpoch {
                epoch: 5,
                requested: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        catalog.set_epoch("r1", 5).expect("same epoch").meta.epoch,
        5
    );
    assert!(matches!(
        catalog.set_epoch("nope", 1),
        Err(Error::NotFound { .. })
    ));

    // Clean restart: pools unmounted and imported again.
    node.stop(catalog);
    let mut catalog = node.start();
    assert_eq!(catalog.get("r1").expect("reloaded").meta.epoch, 5);
    assert!(matches!(
        catalog.set_epoch("r1", 4),
        Err(Error::StaleEpoch { epoch: 5, .. })
    ));
    catalog.set_epoch("r1", 6).expect("raise again");

    // Killed agent: nothing closed, the pool is still mounted.
    drop(catalog);
    let catalog = node.start();
    let r1 = catalog.get("r1").expect("reloaded after kill");
    assert_eq!(r1.meta.epoch, 6);
    assert_eq!(ReplicaMeta::load(&r1.meta_path).expect("meta").epoch, 6);
    assert_eq!(provisioned(&catalog), (4096, 1));
    node.stop(catalog);
}

#[test]
fn reload_finishes_interrupted_operations_and_reports_damage() {
    let node = Node::new();
    let mut catalog = node.start();
    let keep = catalog.create(&req("keep", 8 * MIB, true)).expect("keep");
    let lost = catalog.create(&req("lost", 8 * MIB, true)).expect("lost");
    let short = catalog.create(&req("short", 8 * MIB, true)).expect("short");
    let dir = keep.data_path.parent().expect("dir").to_owned();
    // Killed: the pool stays mounted with the files as they are.
    drop(catalog);

    // Damage and crash leftovers, as a killed agent or a bad disk leaves them.
    fs::write(dir.join("half.data"), b"").expect("unfinished create");
    fs::write(dir.join(".keep.meta.json.tmp.1.2"), b"{").expect("unfinished meta write");
    fs::remove_file(&lost.data_path).expect("lose data");
    fs::OpenOptions::new()
        .write(true)
        .open(&short.data_path)
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    fs::OpenOptions::new()
        .write(true)
        .open(&keep.data_path)
        .and_then(|f| f.set_len(16 * MIB))
        .expect("interrupted grow");
    fs::write(dir.join("torn.meta.json"), b"{\"volume_id\":").expect("torn meta");
    fs::write(dir.join("torn.data"), b"").expect("torn data");
    fs::write(dir.join("README"), b"hands off").expect("stray file");

    let mut catalog = node.start();
    assert!(!dir.join("half.data").exists(), "unfinished create kept");
    assert!(!dir.join(".keep.meta.json.tmp.1.2").exists(), "temp kept");
    assert!(dir.join("README").exists(), "stray file removed");

    let healthy: Vec<String> = catalog.list().into_iter().map(|r| r.name).collect();
    assert_eq!(healthy, vec!["keep"]);
    assert_eq!(catalog.get("keep").expect("keep").meta.size_bytes, 8 * MIB);

    let faulted = catalog.faulted();
    let reasons: Vec<(&str, &str)> = faulted
        .iter()
        .map(|f| (f.name.as_str(), f.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].0 == "lost" && reasons[0].1.contains("without data file"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].0 == "short" && reasons[1].1.contains("4096 bytes"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].0 == "torn" && reasons[2].1.contains("parse"),
        "{reasons:?}"
    );
    assert_eq!(provisioned(&catalog), (3 * 8 * MIB, 4));

    // A faulted name stays reserved and refuses everything but destroy.
    assert!(matches!(catalog.get("lost"), Err(Error::Faulted { .. })));
    assert!(matches!(
        catalog.create(&req("lost", 8 * MIB, true)),
        Err(Error::Faulted { .. })
    ));
    assert!(matches!(
        catalog.set_epoch("lost", 1),
        Err(Error::Faulted { .. })
    ));
    assert!(matches!(
        catalog.grow("short", 16 * MIB),
        Err(Error::Faulted { .. })
    ));
    assert!(dir.join("lost.meta.json").exists());

    for name in ["lost", "short", "torn"] {
        catalog.destroy(name).expect("destroy faulted");
    }
    assert!(catalog.faulted().is_empty());
    assert!(!dir.join("lost.meta.json").exists() && !dir.join("torn.data").exists());
    assert_eq!(provisioned(&catalog), (8 * MIB, 1));
    catalog
        .create(&req("lost", 8 * MIB, true))
        .expect("name free again");
    node.stop(catalog);
}

#[test]
fn duplicate_names_across_pools_stop_the_load() {
    let mut node = Node::new();
    node.configs.push(node.env.file_config("pool-b.img"));
    let mut catalog = node.start();
    let a = catalog
        .create(&CreateReplica {
            pool: Some("pool-a".to_owned()),
            ..req("twin", 4096, true)
        })
        .expect("create");
    let b_dir = node.env.state_dir().join("pools/pool-b/replicas");
    fs::copy(&a.meta_path, b_dir.join("twin.meta.json")).expect("copy meta");
    fs::copy(&a.data_path, b_dir.join("twin.data")).expect("copy data");
    let pools = Arc::clone(catalog.pools());
    drop(catalog);
    let err = ReplicaCatalog::load(Arc::clone(&pools)).expect_err("duplicate");
    assert!(matches!(err, Error::DuplicateReplica { .. }), "{err:?}");
    pools.close_all().expect("close");
}

#[test]
fn errors_map_to_grpc_codes() {
    use tonic::Code;
    let stale = Error::StaleEpoch {
        name: "r".to_owned(),
        epoch: 2,
        requested: 1,
    };
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let full = Error::Pool(pool::Error::OvercommitLimit {
        pool: "p".to_owned(),
        requested_bytes: 1,
        provisioned_bytes: 2,
        limit_bytes: 2,
        overcommit_percent: 200,
        total_bytes: 1,
    });
    assert_eq!(full.code(), Code::ResourceExhausted);
    let exists = Error::AlreadyExists {
        name: "r".to_owned(),
        pool: "p".to_owned(),
        volume_id: "v".to_owned(),
        size_bytes: 4096,
        thin: true,
        source_snapshot: String::new(),
    };
    assert_eq!(exists.code(), Code::AlreadyExists);

    let failed = Error::ResizeData {
        path: "/p/r.data".into(),
        source: nix::errno::Errno::EIO,
    };
    let status = tonic::Status::from(failed);
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status
            .message()
            .starts_with("Cannot size replica data file /p/r.data: ")
            && status.message().contains("I/O error"),
        "{}",
        status.message()
    );
}
