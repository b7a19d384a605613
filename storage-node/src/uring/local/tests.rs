//! Per-thread rings: the same results as the ring threads, requests in
//! flight when the connection goes away, and the rules of installing one.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::super::IoEngine;
use super::super::tests::scratch_dir;
use super::*;
use crate::block::BlockDevice;
use crate::buf::IoBuf;
use crate::replica::data::ReplicaData;

const FILE_BYTES: u64 = 4 << 20;
const BLOCK: u64 = 4096;

/// A current-thread runtime, as an NBD connection thread builds it.
fn connection_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build runtime")
}

fn install(runtime: &tokio::runtime::Runtime, entries: u32) -> LocalRing {
    let _context = runtime.enter();
    LocalRing::install(entries).expect("install a per-thread ring")
}

fn open_direct(path: &std::path::Path) -> Arc<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT test file");
    file.set_len(FILE_BYTES).expect("size test file");
    Arc::new(file)
}

/// Deterministic pseudo-random numbers (xorshift), so failures replay.
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

fn filled(len: usize, seed: u64) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    let mut rng = Rng(seed | 1);
    for b in buf.iter_mut() {
        *b = rng.next() as u8;
    }
    buf
}

/// Reads the whole file through the page cache (coherent with the direct
/// writes once they have completed).
fn file_contents(path: &std::path::Path) -> Vec<u8> {
    let mut contents = Vec::new();
    std::fs::File::open(path)
        .expect("open for reading")
        .read_to_end(&mut contents)
        .expect("read file");
    contents
}

#[test]
fn engine_requests_run_on_the_local_ring() {
    let dir = scratch_dir();
    let path = dir.path().join("f");
    let file = open_direct(&path);
    let engine = IoEngine::start(1, 8).expect("start engine");
    let runtime = connection_runtime();
    let ring = install(&runtime, 16);

    runtime.block_on(async {
        let data = filled(64 << 10, 7);
        let expected = data.to_vec();
        let (data, written) = engine.write(&file, 8192, data, true).await;
        assert_eq!(written.expect("write"), 64 << 10);
        assert_eq!(data.len(), 64 << 10, "the buffer comes back");
        engine.fsync(&file, true).await.expect("fdatasync");
        let (read_back, read) = engine.read(&file, 8192, IoBuf::zeroed(64 << 10)).await;
        assert_eq!(read.expect("read"), 64 << 10);
        assert_eq!(&read_back[..], &expected[..]);
        // Past the end of the file: a short read, as on the ring threads.
        let (_, read) = engine
            .read(&file, FILE_BYTES - BLOCK, IoBuf::zeroed(2 * BLOCK as usize))
            .await;
        assert_eq!(read.expect("short read"), BLOCK as usize);
        // Kernel errors come back with the buffer: O_DIRECT needs alignment.
        let (buf, result) = engine.write(&file, 100, IoBuf::zeroed(4096), false).await;
        assert_eq!(
            result.expect_err("unaligned").raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(buf.len(), 4096);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        engine
            .fallocate(&file, mode, 8192, BLOCK)
            .await
            .expect("punch a hole");
    });
    assert_eq!(
        ring.started(),
        6,
        "every request went through the local ring"
    );
    drop(runtime);
    drop(ring);
    let contents = file_contents(&path);
    assert!(
        contents[8192..12288].iter().all(|&b| b == 0),
        "hole punched"
    );
}

#[test]
fn other_threads_use_the_engine() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"));
    let engine = IoEngine::start(1, 8).expect("start engine");
    let runtime = connection_runtime();
    let ring = install(&runtime, 16);
    runtime.block_on(async {
        let engine = Arc::clone(&engine);
        let file = Arc::clone(&file);
        tokio::task::spawn_blocking(move || {
            connection_runtime().block_on(async {
                let (_, written) = engine.write(&file, 0, filled(4096, 1), false).await;
                written.expect("write from another thread");
            });
        })
        .await
        .expect("join");
    });
    assert_eq!(ring.started(), 0, "another thread never uses this ring");
}

/// Many concurrent writes of random sizes and FUA flags, more than the ring
/// holds (the rest go to the engine), checked against a model of the file;
/// then reads of random ranges, also checked.
#[test]
fn concurrent_writes_match_a_model() {
    let dir = scratch_dir();
    let path = dir.path().join("f");
    let file = open_direct(&path);
    let engine = IoEngine::start(1, 16).expect("start engine");
    let runtime = connection_runtime();
    let ring = install(&runtime, 8);
    let mut model = vec![0u8; FILE_BYTES as usize];
    let mut rng = Rng(0x5eed);
    let blocks = FILE_BYTES / BLOCK;

    runtime.block_on(async {
        for round in 0..8 {
            // Writes of one round never overlap, so any completion order
            // gives the same file.
            let mut taken = vec![false; blocks as usize];
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..64 {
                let len = 1 + rng.below(16);
                let start = rng.below(blocks - len);
                let range = start as usize..(start + len) as usize;
                if taken[range.clone()].iter().any(|&t| t) {
                    continue;
                }
                taken[range].iter_mut().for_each(|t| *t = true);
                let data = filled((len * BLOCK) as usize, round * 1000 + i + 1);
                let offset = (start * BLOCK) as usize;
                model[offset..offset + data.len()].copy_from_slice(&data);
                let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
                let fua = rng.below(4) == 0;
                tasks.spawn(async move {
                    let expected = data.len();
                    let (_, written) = engine.write(&file, offset as u64, data, fua).await;
                    assert_eq!(written.expect("write"), expected);
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("write task");
            }
            let mut reads = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let len = 1 + rng.below(32);
                let start = rng.below(blocks - len);
                let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
                let offset = (start * BLOCK) as usize;
                let expected = model[offset..offset + (len * BLOCK) as usize].to_vec();
                reads.spawn(async move {
                    let buf = IoBuf::zeroed(expected.len());
                    let (buf, read) = engine.read(&file, offset as u64, buf).await;
                    assert_eq!(read.expect("read"), expected.len());
                    assert!(
                        buf[..] == expected[..],
                        "read at {offset} differs from the model"
                    );
                });
            }
            while let Some(done) = reads.join_next().await {
                done.expect("read task");
            }
        }
    });
    assert!(ring.started() > 0, "the local ring was used");
    drop(runtime);
    drop(ring);
    assert!(file_contents(&path) == model, "the file matches the model");
}

/// Unaligned writes through `ReplicaData` (read-modify-write in a spawned
/// task) on a connection thread, against a model.
#[test]
fn replica_read_modify_write_matches_a_model() {
    let dir = scratch_dir();
    let path = dir.path().join("replica");
    drop(open_direct(&path));
    let engine = IoEngine::start(1, 16).expect("start engine");
    let replica = Arc::new(ReplicaData::open(&path, FILE_BYTES, engine).expect("open replica"));
    let runtime = connection_runtime();
    let ring = install(&runtime, 32);
    let mut model = vec![0u8; FILE_BYTES as usize];
    let mut rng = Rng(0xabcdef);

    runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..128 {
            let len = 1 + rng.below(3 * BLOCK);
            let offset = rng.below(FILE_BYTES - len);
            let data = filled(len as usize, i + 1);
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
            let replica = Arc::clone(&replica);
            // One at a time: overlapping writes in flight together may
            // land in any order.
            replica
                .write(offset, data, i % 5 == 0)
                .await
                .expect("unaligned write");
            if i % 16 == 0 {
                tasks.spawn(async move { replica.flush().await.expect("flush") });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("flush task");
        }
        let got = replica.read(1000, 100_000).await.expect("read");
        assert!(got[..] == model[1000..101_000], "unaligned read matches");
    });
    assert!(ring.started() > 128, "RMW reads and writes used the ring");
    drop(runtime);
    drop(ring);
    assert!(file_contents(&path) == model, "the file matches the model");
}

/// Requests whose futures are dropped while the kernel holds them, then the
/// runtime and the ring dropped: every write still lands, nothing is freed
/// early (the kernel would scribble on freed memory, which a later check
/// of the buffers' pool would not necessarily see, but the writes' data
/// would be wrong if their buffers were reused before the kernel read
/// them).
#[test]
fn dropping_everything_with_requests_in_flight_completes_them() {
    let dir = scratch_dir();
    let path = dir.path().join("f");
    let file = open_direct(&path);
    let engine = IoEngine::start(1, 16).expect("start engine");
    let runtime = connection_runtime();
    let ring = install(&runtime, 64);
    let mut model = vec![0u8; FILE_BYTES as usize];

    runtime.block_on(async {
        for i in 0..48u64 {
            let offset = i * 16 * BLOCK;
            let data = filled(16 * BLOCK as usize, i + 100);
            model[offset as usize..(offset + 16 * BLOCK) as usize].copy_from_slice(&data);
            let write = engine.write(&file, offset, data, i % 2 == 0);
            // Polls the write once (it is pushed to the ring), then drops it.
            tokio::select! {
                biased;
                _ = write => {}
                () = std::future::ready(()) => {}
            }
        }
        // Left running when the runtime goes away.
        for i in 48..64u64 {
            let offset = i * 16 * BLOCK;
            let data = filled(16 * BLOCK as usize, i + 100);
            model[offset as usize..(offset + 16 * BLOCK) as usize].copy_from_slice(&data);
            let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
            tokio::spawn(async move {
                let _ = engine.write(&file, offset, data, false).await;
            });
        }
        tokio::task::yield_now().await;
    });
    assert_eq!(ring.started(), 64);
    drop(runtime);
    drop(ring);
    let contents = file_contents(&path);
    for i in 0..64usize {
        let range = i * 16 * BLOCK as usize..(i + 1) * 16 * BLOCK as usize;
        assert!(
            contents[range.clone()] == model[range],
            "write {i} landed intact"
        );
    }
    // The engine is still usable from a plain thread afterwards.
    let mut check = vec![0u8; 4096];
    std::fs::File::open(&path)
        .expect("open")
        .read_exact_at(&mut check, 0)
        .expect("read");
    assert_eq!(check[..], model[..4096]);
}

#[test]
fn install_needs_a_current_thread_runtime_and_only_once() {
    assert!(matches!(LocalRing::install(8), Err(Error::Runtime)));
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    {
        let _context = multi.enter();
        assert!(matches!(LocalRing::install(8), Err(Error::Runtime)));
    }
    let runtime = connection_runtime();
    let _context = runtime.enter();
    assert!(matches!(LocalRing::install(0), Err(Error::Config)));
    let ring = LocalRing::install(8).expect("first install");
    assert!(matches!(LocalRing::install(8), Err(Error::Installed)));
    drop(ring);
    let again = LocalRing::install(8).expect("install after uninstall");
    drop(again);
}
