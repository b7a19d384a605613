//! Snapshot copy tests on real file-backed XFS pools (root): real FICLONE,
//! real SEEK_DATA/SEEK_HOLE, real FIEMAP.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;

use super::*;
use crate::pool::PoolManager;
use crate::pool::tests::TestEnv;
use crate::replica::{CreateReplica, ReplicaCatalog};

mod prepared;

const K4: u64 = 4096;
const MIB: u64 = 1 << 20;

struct Node {
    env: TestEnv,
}

struct Catalogs {
    replicas: ReplicaCatalog,
    copies: parking_lot::Mutex<SnapshotCatalog>,
}

impl Node {
    fn new() -> Self {
        Self {
            env: TestEnv::new(),
        }
    }

    /// Opens the pool and loads both catalogs, as an agent start does.
    fn start(&self) -> Catalogs {
        let pools = Arc::new(
            PoolManager::open_all(&self.env.state_dir(), &[self.env.file_config("pool-a.img")])
                .expect("pools"),
        );
        Catalogs {
            replicas: ReplicaCatalog::load(pools.clone()).expect("replica catalog"),
            copies: parking_lot::Mutex::new(
                SnapshotCatalog::load(pools).expect("snapshot catalog"),
            ),
        }
    }

    fn stop(&self, c: Catalogs) {
        // Prepared copies hold their files open, which would keep the
        // pool's mount busy.
        let Catalogs { replicas, copies } = c;
        drop(copies);
        replicas.pools().close_all().expect("close pools");
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.env.state_dir().join("pools/pool-a/snapshots")
    }
}

impl Catalogs {
    fn replica(&mut self, name: &str, size_bytes: u64) -> Replica {
        self.replicas
            .create(&CreateReplica {
                name: name.to_owned(),
                volume_id: format!("vol-{name}"),
                size_bytes,
                thin: true,
                pool: None,
            })
            .expect("create replica")
    }

    fn prepare(&mut self, id: &str, replica: &str) -> Result<(), Error> {
        let replica = self.replicas.get(replica)?;
        let src = open_replica(&replica)?;
        prepare(&self.copies, id, &replica, &src)
    }

    fn copy(&mut self, id: &str, replica: &str) -> Result<SnapshotCopy, Error> {
        let replicas = &self.replicas;
        self.copies
            .lock()
            .create(id, replica, |name| replicas.get(name))
    }
}

/// Writes `pattern` over `[offset, offset + len)` of a file and fsyncs it.
fn write(path: &Path, offset: u64, len: u64, pattern: u8) {
    let file = File::options()
        .write(true)
        .open(path)
        .expect("open for write");
    file.write_all_at(&vec![pattern; len as usize], offset)
        .expect("write");
    file.sync_all().expect("fsync");
}

fn read(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .expect("open")
        .read_exact_at(&mut buf, offset)
        .expect("read");
    buf
}

fn assert_filled(path: &Path, offset: u64, len: u64, pattern: u8) {
    let got = read(path, offset, len);
    let bad = got.iter().position(|b| *b != pattern);
    assert_eq!(
        bad,
        None,
        "{} at {offset}+{len}: expected {pattern:#x}",
        path.display()
    );
}

fn range(offset: u64, length: u64) -> ByteRange {
    ByteRange { offset, length }
}

#[test]
fn copy_keeps_the_bytes_of_its_instant() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 16 * MIB);
    write(&r1.data_path, 0, 2 * MIB, 0xaa);

    let copy = c.copy("snap-1", "r1").expect("copy");
    assert_eq!(copy.pool, "pool-a");
    assert_eq!(copy.data_path, node.snapshots_dir().join("snap-1.data"));
    assert_eq!(
        copy.meta_path,
        node.snapshots_dir().join("snap-1.meta.json")
    );
    assert_eq!(copy.meta.replica_name, "r1");
    assert_eq!(copy.meta.volume_id, "vol-r1");
    assert_eq!(copy.meta.size_bytes, 16 * MIB);
    assert!(copy.meta.created_at_unix_nanos > 0);
    assert_eq!(CopyMeta::load(&copy.meta_path).expect("meta"), copy.meta);
    assert_eq!(fs::metadata(&copy.data_path).expect("data").len(), 16 * MIB);
    let mode = fs::metadata(&copy.data_path)
        .expect("data")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o400, "copies are read-only");
    // Shares the replica's blocks: maps (at least) what was written.
    assert!(allocated_bytes(&copy).expect("allocated") >= 2 * MIB);
    assert_eq!(c.copies.lock().list(), vec![copy.clone()]);

    write(&r1.data_path, 0, MIB, 0xbb);
    write(&r1.data_path, 8 * MIB, K4, 0xcc);
    assert_filled(&r1.data_path, 0, MIB, 0xbb);
    assert_filled(&copy.data_path, 0, 2 * MIB, 0xaa);
    assert_filled(&copy.data_path, 8 * MIB, K4, 0);

    // A restart finds the copy as it was.
    node.stop(c);
    let c = node.start();
    assert_eq!(
        c.copies.lock().get("snap-1").expect("get after restart"),
        copy
    );
    assert_filled(&copy.data_path, 0, 2 * MIB, 0xaa);
    node.stop(c);
}

#[test]
fn create_is_idempotent_and_refuses_conflicts() {
    let node = Node::new();
    let mut c = node.start();
    c.replica("r1", 4 * MIB);
    c.replica("r2", 4 * MIB);
    let first = c.copy("s1", "r1").expect("copy");
    assert_eq!(c.copy("s1", "r1").expect("again"), first);

    let other = c.copy("s1", "r2").expect_err("same id, other replica");
    assert!(matches!(other, Error::AlreadyExists { .. }), "{other}");
    assert_eq!(other.code(), tonic::Code::AlreadyExists);

    let unknown = c.copy("s2", "nope").expect_err("unknown replica");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
    for bad in ["", ".hidden", "a/b", &"x".repeat(129)] {
        let e = c.copy(bad, "r1").expect_err("invalid id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
    }
    // Nothing was left behind by the refusals.
    let mut names: Vec<String> = fs::read_dir(node.snapshots_dir())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["s1.data", "s1.meta.json"]);

    assert!(c.copies.lock().delete("s1").expect("delete"));
    assert!(!c.copies.lock().delete("s1").expect("delete again"));
    assert!(
        fs::read_dir(node.snapshots_dir())
            .expect("list")
            .next()
            .is_none()
    );
    assert_eq!(
        c.copies.lock().get("s1").expect_err("deleted").code(),
        tonic::Code::NotFound
    );
    node.stop(c);
}

#[test]
fn destroying_the_replica_keeps_its_copies() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 4 * MIB);
    write(&r1.data_path, 0, MIB, 0x5a);
    let copy = c.copy("s1", "r1").expect("copy");
    c.replicas.destroy("r1").expect("destroy replica");
    assert!(!r1.data_path.exists());
    assert_filled(&copy.data_path, 0, MIB, 0x5a);
    // A retried create of the same copy still answers (the replica is gone).
    assert_eq!(c.copy("s1", "r1").expect("retry"), copy);

    node.stop(c);
    let c = node.start();
    assert_eq!(c.copies.lock().list(), vec![copy.clone()]);
    assert_filled(&copy.data_path, 0, MIB, 0x5a);
    node.stop(c);
}

#[test]
fn load_removes_unfinished_copies_and_reserves_damaged_ones() {
    let node = Node::new();
    let mut c = node.start();
    c.replica("r1", 4 * MIB);
    c.copy("good", "r1").expect("copy");

    // The agent is killed (the pool stays mounted) and leaves behind:
    let dir = node.snapshots_dir();
    // A crash between the reflink and the metadata.
    fs::write(dir.join("unfinished.data"), b"x").expect("orphan data");
    // A crash during a metadata write.
    fs::write(dir.join(".good.meta.json.tmp.1.0"), b"{").expect("temp");
    // Metadata whose data file is gone, and metadata that does not parse.
    fs::copy(dir.join("good.meta.json"), dir.join("lost.meta.json")).expect("meta copy");
    fs::write(dir.join("garbled.meta.json"), b"{\"snapshot_id\":").expect("garbled");
    fs::write(dir.join("garbled.data"), b"").expect("garbled data");
    drop(c);

    let mut c = node.start();
    assert!(!dir.join("unfinished.data").exists());
    assert!(!dir.join(".good.meta.json.tmp.1.0").exists());
    let ids: Vec<String> = c
        .copies
        .lock()
        .list()
        .into_iter()
        .map(|c| c.snapshot_id)
        .collect();
    assert_eq!(ids, vec!["good"]);
    let faulted: Vec<String> = c
        .copies
        .lock()
        .faulted()
        .into_iter()
        .map(|f| f.snapshot_id)
        .collect();
    assert_eq!(faulted, vec!["garbled", "lost"]);

    // Their ids stay reserved: no silent new copy under them.
    for id in ["garbled", "lost"] {
        let e = c.copy(id, "r1").expect_err("faulted id");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        assert_eq!(
            c.copies.lock().get(id).expect_err("faulted").code(),
            tonic::Code::FailedPrecondition
        );
    }
    assert!(c.copies.lock().delete("garbled").expect("delete faulted"));
    assert!(!dir.join("garbled.data").exists());
    c.copy("garbled", "r1").expect("id free again");
    node.stop(c);
}

#[test]
fn restore_reflinks_the_copy_and_grows() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 8 * MIB);
    write(&r1.data_path, 0, 8 * MIB, 0xaa);
    c.copy("s1", "r1").expect("copy");
    write(&r1.data_path, 0, MIB, 0xbb);
    let before = c
        .replicas
        .pools()
        .get("pool-a")
        .expect("pool")
        .capacity()
        .expect("capacity");

    let source = c.copies.lock().source("s1").expect("source");
    let req = CreateReplica {
        name: "restored".into(),
        volume_id: "vol-new".into(),
        size_bytes: 12 * MIB,
        thin: true,
        pool: Some("pool-a".into()),
    };
    let restored = c.replicas.restore(&req, &source).expect("restore");
    assert_eq!(restored.meta.source_snapshot, "s1");
    assert_eq!(restored.meta.volume_id, "vol-new");
    assert_eq!(restored.meta.size_bytes, 12 * MIB);
    assert_eq!(
        fs::metadata(&restored.data_path).expect("data").len(),
        12 * MIB
    );
    assert_filled(&restored.data_path, 0, 8 * MIB, 0xaa);
    assert_filled(&restored.data_path, 8 * MIB, 4 * MIB, 0);
    let after = c
        .replicas
        .pools()
        .get("pool-a")
        .expect("pool")
        .capacity()
        .expect("capacity");
    assert_eq!(after.provisioned_bytes, before.provisioned_bytes + 12 * MIB);
    assert_eq!(after.replica_count, before.replica_count + 1);

    // Idempotent; other parameters or another source are ALREADY_EXISTS.
    assert_eq!(c.replicas.restore(&req, &source).expect("again"), restored);
    let plain = c.replicas.create(&req).expect_err("same name, no source");
    assert_eq!(plain.code(), tonic::Code::AlreadyExists, "{plain}");
    let bigger = CreateReplica {
        size_bytes: 16 * MIB,
        ..req.clone()
    };
    let e = c
        .replicas
        .restore(&bigger, &source)
        .expect_err("other size");
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");

    // Invalid restores leave nothing behind.
    let smaller = CreateReplica {
        name: "small".into(),
        size_bytes: 4 * MIB,
        ..req.clone()
    };
    let e = c
        .replicas
        .restore(&smaller, &source)
        .expect_err("too small");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let elsewhere = CreateReplica {
        name: "elsewhere".into(),
        pool: Some("pool-b".into()),
        ..req.clone()
    };
    let e = c
        .replicas
        .restore(&elsewhere, &source)
        .expect_err("other pool");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert_eq!(
        c.copies.lock().source("nope").expect_err("no copy").code(),
        tonic::Code::NotFound
    );
    let names: Vec<String> = c.replicas.list().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["r1", "restored"]);

    // Writes to the restored replica reach neither the copy nor r1.
    write(&restored.data_path, 0, K4, 0xdd);
    let copy = c.copies.lock().get("s1").expect("copy");
    assert_filled(&copy.data_path, 0, 8 * MIB, 0xaa);
    assert_filled(&r1.data_path, 0, MIB, 0xbb);

    // The restored replica outlives the copy, and its metadata survives a
    // restart with the source named.
    assert!(c.copies.lock().delete("s1").expect("delete copy"));
    assert_filled(&restored.data_path, K4, 8 * MIB - K4, 0xaa);
    node.stop(c);
    let c = node.start();
    assert_eq!(
        c.replicas
            .get("restored")
            .expect("restored after restart")
            .meta
            .source_snapshot,
        "s1"
    );
    node.stop(c);
}

#[test]
fn a_thick_restore_allocates_the_tail() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 4 * MIB);
    write(&r1.data_path, 0, MIB, 0x11);
    c.copy("s1", "r1").expect("copy");
    let source = c.copies.lock().source("s1").expect("source");
    let thick = c
        .replicas
        .restore(
            &CreateReplica {
                name: "thick".into(),
                volume_id: String::new(),
                size_bytes: 8 * MIB,
                thin: false,
                pool: None,
            },
            &source,
        )
        .expect("thick restore");
    assert!(!thick.meta.thin);
    assert!(c.replicas.allocated_bytes("thick").expect("allocated") >= 8 * MIB);
    assert_filled(&thick.data_path, 0, MIB, 0x11);
    assert_filled(&thick.data_path, MIB, 7 * MIB, 0);
    node.stop(c);
}

#[test]
fn allocated_ranges_are_the_written_ranges() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 64 * MIB);
    let written = [
        range(K4, K4),
        range(MIB, 3 * K4),
        range(10 * MIB + 8 * K4, 5 * K4),
        range(40 * MIB, K4),
        range(64 * MIB - K4, K4),
    ];
    for r in written {
        write(&r1.data_path, r.offset, r.length, 0x77);
    }
    c.copy("s1", "r1").expect("copy");
    let copy = c.copies.lock().open("s1").expect("open");

    let all = allocated_ranges(&copy, 0, 0).expect("ranges");
    assert_eq!(all.ranges, written.to_vec());
    assert_eq!(all.next_offset, 64 * MIB);

    // Paging: one range at a time, resuming at next_offset.
    let mut pages = Vec::new();
    let mut offset = 0;
    while offset < 64 * MIB {
        let page = allocated_ranges(&copy, offset, 1).expect("page");
        assert!(page.ranges.len() <= 1);
        assert!(page.next_offset > offset);
        pages.extend(page.ranges);
        offset = page.next_offset;
    }
    assert_eq!(pages, written.to_vec());

    // A start inside a range clips it.
    let clipped = allocated_ranges(&copy, MIB + K4, 2).expect("clipped");
    assert_eq!(clipped.ranges, vec![range(MIB + K4, 2 * K4), written[2]]);
    assert_eq!(clipped.next_offset, 40 * MIB);

    let e = allocated_ranges(&copy, 64 * MIB, 0).expect_err("at the end");
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    drop(copy);
    node.stop(c);
}

/// Whether every range of `inner` lies inside a range of `outer`.
fn covered(inner: &[ByteRange], outer: &[ByteRange]) -> bool {
    inner.iter().all(|i| {
        outer
            .iter()
            .any(|o| o.offset <= i.offset && i.end() <= o.end())
    })
}

#[test]
fn changed_ranges_are_the_overwritten_ranges() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 32 * MIB);
    write(&r1.data_path, 0, 8 * MIB, 0xaa);
    c.copy("base", "r1").expect("base copy");

    let overwritten = [
        range(MIB, K4),
        range(3 * MIB + 8 * K4, 3 * K4),
        // Into a hole of the base.
        range(20 * MIB, 2 * K4),
    ];
    for r in overwritten {
        write(&r1.data_path, r.offset, r.length, 0xbb);
    }
    c.copy("target", "r1").expect("target copy");
    let base = c.copies.lock().open("base").expect("open base");
    let target = c.copies.lock().open("target").expect("open target");

    let changed = changed_ranges(&base, &target, 0, 0).expect("changed");
    assert_eq!(changed.next_offset, 32 * MIB);
    eprintln!("XFS reports changed ranges {:?}", changed.ranges);
    assert!(
        covered(&overwritten, &changed.ranges),
        "{:?} must cover {overwritten:?}",
        changed.ranges
    );
    // XFS remaps exactly the written blocks (4 KiB) into the replica.
    assert_eq!(changed.ranges, overwritten.to_vec());

    // A copy compared with itself (or an identical one) has no changes.
    let same = changed_ranges(&target, &target, 0, 0).expect("self");
    assert!(same.ranges.is_empty(), "{:?}", same.ranges);
    assert_eq!(same.next_offset, 32 * MIB);

    // Paging and resuming.
    let first = changed_ranges(&base, &target, 0, 1).expect("page 1");
    assert_eq!(first.ranges, overwritten[..1].to_vec());
    assert_eq!(first.next_offset, overwritten[1].offset);
    let rest = changed_ranges(&base, &target, first.next_offset, 8).expect("page 2");
    assert_eq!(rest.ranges, overwritten[1..].to_vec());
    assert_eq!(rest.next_offset, 32 * MIB);
    let clipped = changed_ranges(&base, &target, 3 * MIB + 9 * K4, 1).expect("clipped");
    assert_eq!(clipped.ranges, vec![range(3 * MIB + 9 * K4, 2 * K4)]);
    assert_eq!(
        changed_ranges(&base, &target, 32 * MIB, 0)
            .expect_err("at the end")
            .code(),
        tonic::Code::OutOfRange
    );

    // A grown volume: everything past the base's size counts as changed.
    c.replicas.grow("r1", 40 * MIB).expect("grow");
    c.copy("grown", "r1").expect("grown copy");
    let grown = c.copies.lock().open("grown").expect("open grown");
    let past = changed_ranges(&target, &grown, 0, 0).expect("grown");
    assert_eq!(past.ranges, vec![range(32 * MIB, 8 * MIB)]);

    // Copies of another volume cannot be compared.
    c.replica("r2", 32 * MIB);
    c.copy("other", "r2").expect("other copy");
    let other = c.copies.lock().open("other").expect("open other");
    let e = changed_ranges(&base, &other, 0, 0).expect_err("other volume");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    drop((base, target, grown, other));
    node.stop(c);
}

/// Fills the pool's free space with a file of its own, as far as the
/// filesystem lets a user file grow.
fn fill_pool(mount: &Path) {
    let filler = File::options()
        .write(true)
        .create_new(true)
        .open(mount.join("filler"))
        .expect("filler");
    let mut offset: i64 = 0;
    let mut chunk: i64 = 256 * MIB as i64;
    while chunk >= K4 as i64 {
        match nix::fcntl::fallocate(&filler, nix::fcntl::FallocateFlags::empty(), offset, chunk) {
            Ok(()) => offset += chunk,
            Err(_) => chunk /= 2,
        }
    }
    filler.sync_all().expect("sync filler");
}

#[test]
fn a_full_pool_refuses_copies_and_restores_and_leaves_nothing_behind() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 16 * MIB);
    // Every other block: a copy's extent map needs many records.
    let file = File::options()
        .write(true)
        .open(&r1.data_path)
        .expect("open r1");
    for block in (0..16 * MIB / K4).step_by(2) {
        file.write_all_at(&[0x42; K4 as usize], block * K4)
            .expect("write");
    }
    file.sync_all().expect("fsync");
    drop(file);
    c.copy("before", "r1")
        .expect("copy before the pool is full");
    let pool = c.replicas.pools().get("pool-a").expect("pool");
    fill_pool(pool.mount_path());

    // A restore: thin, so provisioning lets it through; the file system
    // refuses.
    let source = c.copies.lock().source("before").expect("source");
    let restore = CreateReplica {
        name: "restored".into(),
        volume_id: String::new(),
        size_bytes: 16 * MIB,
        thin: true,
        pool: None,
    };
    let e = c
        .replicas
        .restore(&restore, &source)
        .expect_err("full pool");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(!pool.replicas_dir().join("restored.data").exists());
    assert_eq!(c.replicas.list().len(), 1);

    let mut refused = 0;
    for i in 0..64 {
        let id = format!("s{i}");
        match c.copy(&id, "r1") {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                assert!(!node.snapshots_dir().join(format!("{id}.data")).exists());
                assert!(
                    !node
                        .snapshots_dir()
                        .join(format!("{id}.meta.json"))
                        .exists()
                );
                eprintln!("copy {i} refused: {}", crate::error_chain(&e));
                refused += 1;
                break;
            }
        }
    }
    eprintln!(
        "copies made before refusal: {}",
        c.copies.lock().list().len() - 1
    );
    assert_eq!(refused, 1, "a full pool took 64 copies");
    // What was made is intact and listed; nothing half-made is.
    for copy in c.copies.lock().list() {
        assert_eq!(CopyMeta::load(&copy.meta_path).expect("meta"), copy.meta);
    }
    node.stop(c);
}
