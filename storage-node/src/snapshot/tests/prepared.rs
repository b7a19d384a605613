//! Prepared copies on real XFS: the refresh under the barrier must leave a
//! copy byte-identical to the replica, whatever was written, punched or
//! grown since the prepare.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Instant;

use nix::fcntl::{FallocateFlags, fallocate};

use super::*;
use crate::pool::{PoolConfig, PoolSource};

/// Punches `[offset, offset + len)` of a file, keeping its size.
fn punch(path: &Path, offset: u64, len: u64) {
    let file = File::options().write(true).open(path).expect("open");
    fallocate(
        &file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .expect("punch");
    file.sync_all().expect("fsync");
}

fn read_all(path: &Path) -> Vec<u8> {
    fs::read(path).expect("read whole file")
}

/// Asserts that two files have the same bytes, naming the first difference.
fn assert_same_bytes(copy: &Path, replica: &Path, len: u64) {
    let (a, b) = (read_all(copy), read_all(replica));
    assert_eq!(a.len() as u64, len, "{} length", copy.display());
    let b = &b[..len as usize];
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    assert_eq!(first, None, "first differing byte");
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn create_refreshes_a_prepared_copy_to_the_replica() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 16 * MIB);
    write(&r1.data_path, 0, 8 * MIB, 0xaa);
    c.prepare("s1", "r1").expect("prepare");

    // After the prepare, writes flow on: 4 KiB overwrites, one into a hole,
    // an unaligned write, a punched range, and a grown tail written to.
    write(&r1.data_path, MIB, K4, 0x01);
    write(&r1.data_path, 3 * MIB + 8 * K4, 3 * K4, 0x02);
    write(&r1.data_path, 7 * MIB + 100, 300, 0x03);
    write(&r1.data_path, 12 * MIB, K4, 0x04);
    punch(&r1.data_path, 2 * MIB, 64 * K4);
    write(&r1.data_path, 2 * MIB + 16 * K4, K4, 0x05);
    c.replicas.grow("r1", 20 * MIB).expect("grow");
    write(&r1.data_path, 18 * MIB, 2 * K4, 0x06);

    let copy = c.copy("s1", "r1").expect("create from prepared");
    assert_eq!(copy.meta.size_bytes, 20 * MIB);
    assert_eq!(copy.data_path, node.snapshots_dir().join("s1.data"));
    assert_eq!(CopyMeta::load(&copy.meta_path).expect("meta"), copy.meta);
    assert_eq!(c.copies.lock().list(), vec![copy.clone()]);
    assert!(!c.copies.lock().is_prepared("s1"));
    assert_same_bytes(&copy.data_path, &r1.data_path, 20 * MIB);
    // The punched range is a hole in the copy too, not zeros written.
    let open = c.copies.lock().open("s1").expect("open");
    let allocated = allocated_ranges(&open, 2 * MIB, 1).expect("allocated");
    assert_eq!(allocated.ranges, vec![range(2 * MIB + 16 * K4, K4)]);
    drop(open);

    // Later writes to the replica do not reach the copy.
    let at_create = read_all(&copy.data_path);
    write(&r1.data_path, 0, 4 * MIB, 0xee);
    write(&r1.data_path, 18 * MIB, K4, 0xef);
    punch(&r1.data_path, 4 * MIB, MIB);
    assert_eq!(read_all(&copy.data_path), at_create);
    // Idempotent like any copy, and the same after a restart.
    assert_eq!(c.copy("s1", "r1").expect("again"), copy);
    node.stop(c);
    let c = node.start();
    assert_eq!(c.copies.lock().get("s1").expect("after restart"), copy);
    assert_eq!(read_all(&copy.data_path), at_create);
    node.stop(c);
}

#[test]
fn a_prepared_copy_is_unlisted_and_gone_after_a_restart() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 4 * MIB);
    write(&r1.data_path, 0, MIB, 0x5a);
    c.prepare("p1", "r1").expect("prepare");

    assert!(c.copies.lock().is_prepared("p1"));
    assert!(c.copies.lock().list().is_empty());
    let e = c.copies.lock().get("p1").expect_err("not complete");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = c.copies.lock().source("p1").expect_err("no restore");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    // Its data file only: no metadata, no temporary file.
    assert_eq!(names(&node.snapshots_dir()), vec!["p1.data"]);
    assert_filled(&node.snapshots_dir().join("p1.data"), 0, MIB, 0x5a);

    // The agent is killed (the pool stays mounted); the next start-up
    // removes the data file as an unfinished copy.
    drop(c);
    let mut c = node.start();
    assert!(names(&node.snapshots_dir()).is_empty());
    assert!(c.copies.lock().list().is_empty());
    assert!(!c.copies.lock().is_prepared("p1"));
    // The id is free: prepared and completed again.
    c.prepare("p1", "r1").expect("prepare again");
    let copy = c.copy("p1", "r1").expect("create");
    assert_same_bytes(&copy.data_path, &r1.data_path, 4 * MIB);
    node.stop(c);
}

#[test]
fn prepare_is_idempotent_and_refuses_conflicts() {
    let node = Node::new();
    let mut c = node.start();
    let r1 = c.replica("r1", 4 * MIB);
    c.replica("r2", 4 * MIB);
    write(&r1.data_path, 0, MIB, 0x11);
    c.prepare("s1", "r1").expect("prepare");
    c.prepare("s1", "r1").expect("prepare again");
    assert_eq!(names(&node.snapshots_dir()), vec!["s1.data"]);

    for e in [
        c.prepare("s1", "r2")
            .expect_err("prepare for another replica"),
        c.copy("s1", "r2")
            .map(drop)
            .expect_err("create for another replica"),
    ] {
        assert!(
            matches!(e, Error::AlreadyExists { ref replica_name, .. } if replica_name == "r1"),
            "{e}"
        );
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
    }
    let unknown = c.prepare("s2", "nope").expect_err("unknown replica");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
    for bad in ["", ".hidden", "a/b", &"x".repeat(129)] {
        let e = c.prepare(bad, "r1").expect_err("invalid id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e}");
    }
    // Still prepared of r1 after the refusals, and completed from it.
    write(&r1.data_path, 0, K4, 0x22);
    let copy = c.copy("s1", "r1").expect("create");
    assert_same_bytes(&copy.data_path, &r1.data_path, 4 * MIB);
    // A complete copy cannot be prepared again, of any replica.
    for replica in ["r1", "r2"] {
        let e = c.prepare("s1", replica).expect_err("complete copy");
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    }
    assert_eq!(c.copies.lock().get("s1").expect("still there"), copy);

    // Delete removes a prepared copy, file and state.
    c.prepare("s2", "r2").expect("prepare s2");
    assert!(c.copies.lock().delete("s2").expect("delete prepared"));
    assert!(!c.copies.lock().is_prepared("s2"));
    assert!(!c.copies.lock().delete("s2").expect("delete again"));
    assert_eq!(
        names(&node.snapshots_dir()),
        vec!["s1.data", "s1.meta.json"]
    );
    // A prepare after the delete (one that was late: queued on a paused
    // agent) leaves nothing; a full copy under the id still works.
    let e = c.prepare("s2", "r1").expect_err("recently deleted");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    assert_eq!(
        names(&node.snapshots_dir()),
        vec!["s1.data", "s1.meta.json"]
    );
    // Deleted before it was ever prepared: the delete of a failed cut can
    // overtake its prepare.
    assert!(!c.copies.lock().delete("s3").expect("delete unknown"));
    c.prepare("s3", "r1").expect_err("prepare after its delete");
    assert_eq!(
        names(&node.snapshots_dir()),
        vec!["s1.data", "s1.meta.json"]
    );
    node.stop(c);
}

/// Writes `count` random 4 KiB blocks (O_DIRECT, fsynced) below `size`
/// bytes, from the pseudo-random sequence `seed` picks.
fn random_direct_writes(path: &Path, size: u64, count: u64, seed: u64) {
    let file = File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT");
    let mut buf = vec![0u8; 2 * K4 as usize];
    let at = buf.as_ptr().align_offset(K4 as usize);
    let block = &mut buf[at..at + K4 as usize];
    let mut x = seed | 1;
    for _ in 0..count {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        block.fill(x as u8);
        file.write_all_at(block, (x % (size / K4)) * K4)
            .expect("direct write");
    }
    file.sync_all().expect("fsync");
}

fn extent_count(path: &Path, size: u64) -> usize {
    ranges::extents(&File::open(path).expect("open"), 0, size)
        .expect("fiemap")
        .len()
}

/// Measures the write stall a snapshot costs on a fragmented 1 GiB
/// replica: a plain copy (one FICLONE) against the refresh of a prepared
/// one after 1 MiB of random writes. Prints, asserts only correctness.
/// Run with `cargo nextest run -p ballast-storage-node --run-ignored only
/// measure_ --no-capture`.
#[test]
#[ignore = "a measurement: takes about a minute and 2 GiB of disk"]
fn measure_prepared_refresh_against_a_plain_copy() {
    const GIB: u64 = 1 << 30;
    let env = TestEnv::new();
    let pool = PoolConfig::new(PoolSource::File {
        path: env.path("pool-a.img"),
        size_bytes: Some(4 * GIB),
    });
    let pools = Arc::new(PoolManager::open_all(&env.state_dir(), &[pool]).expect("pools"));
    let mut c = Catalogs {
        replicas: ReplicaCatalog::load(pools.clone()).expect("replica catalog"),
        copies: parking_lot::Mutex::new(SnapshotCatalog::load(pools).expect("snapshot catalog")),
    };
    let r = c.replica("big", GIB);
    {
        let file = File::options()
            .write(true)
            .open(&r.data_path)
            .expect("open");
        let chunk = vec![0x11u8; 4 * MIB as usize];
        for i in 0..GIB / (4 * MIB) {
            file.write_all_at(&chunk, i * 4 * MIB).expect("fill");
        }
        file.sync_all().expect("fsync");
    }
    c.copy("first", "big").expect("first copy");
    random_direct_writes(&r.data_path, GIB, 40_000, 0x9e37_79b9_7f4a_7c15);
    let extents = extent_count(&r.data_path, GIB);

    let t = Instant::now();
    let plain = c.copy("plain", "big").expect("plain copy");
    let plain_time = t.elapsed();
    assert_same_bytes(&plain.data_path, &r.data_path, GIB);
    eprintln!("replica: {extents} extents; plain CreateSnapshotCopy (FICLONE): {plain_time:?}");

    for round in 0..3u64 {
        let id = format!("prepared-{round}");
        let t = Instant::now();
        c.prepare(&id, "big").expect("prepare");
        let prepare_time = t.elapsed();
        random_direct_writes(&r.data_path, GIB, 256, 0x1234_5678 + round);
        let extents = extent_count(&r.data_path, GIB);
        let t = Instant::now();
        let copy = c.copy(&id, "big").expect("create from prepared");
        let refresh_time = t.elapsed();
        assert_same_bytes(&copy.data_path, &r.data_path, GIB);
        eprintln!(
            "round {round}: replica {extents} extents; PrepareSnapshotCopy {prepare_time:?} \
             (no barrier); 1 MiB of 4 KiB random writes; CreateSnapshotCopy refresh {refresh_time:?}"
        );
    }
    let Catalogs { replicas, copies } = c;
    drop(copies);
    replicas.pools().close_all().expect("close pools");
}
