//! Replication tests: real replica files under `/var/tmp` (O_DIRECT), a real
//! I/O engine, and TCP on loopback only. Every wait is bounded.
//!
//! - `fence`: epoch admission, persist-before-I/O, the in-flight ordering of
//!   an epoch raise, cancellation, and the replica catalog's durable epoch.
//! - `tcp`: every op over client and server against the in-process replica,
//!   concurrency and out-of-order completion, rebuild helpers.
//! - `faults`: corrupted and oversized frames, garbage, a killed server, a
//!   silent server.

mod bench;
mod faults;
mod fence;
mod session;
mod tcp;

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::block::{BlockDevice, BlockError};
use crate::replica::data::ReplicaData;
use crate::uring::IoEngine;
use crate::uring::tests::scratch_dir;

/// Size of test replicas: 8 MiB.
const SIZE: u64 = 8 << 20;

/// Upper bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// Awaits `future` for at most [`WAIT`].
async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// An in-memory [`EpochStore`] that records what it persisted, can be made
/// slow or failing, and runs a hook before it returns.
#[derive(Default)]
struct MemoryStore {
    persisted: Mutex<Vec<u64>>,
    delay: Mutex<Duration>,
    fail: AtomicBool,
    #[allow(clippy::type_complexity)]
    hook: Mutex<Option<Box<dyn Fn(u64) + Send + Sync>>>,
}

impl MemoryStore {
    fn persisted(&self) -> Vec<u64> {
        self.persisted.lock().expect("lock").clone()
    }

    fn set_delay(&self, delay: Duration) {
        *self.delay.lock().expect("lock") = delay;
    }

    fn on_persist(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        *self.hook.lock().expect("lock") = Some(Box::new(hook));
    }
}

#[async_trait]
impl EpochStore for MemoryStore {
    async fn persist(&self, epoch: u64) -> Result<(), PersistError> {
        let delay = *self.delay.lock().expect("lock");
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err("injected persist failure".into());
        }
        if let Some(hook) = &*self.hook.lock().expect("lock") {
            hook(epoch);
        }
        self.persisted.lock().expect("lock").push(epoch);
        Ok(())
    }
}

/// A replica file with its data path, fenced, and the store behind it.
struct TestReplica {
    _dir: tempfile::TempDir,
    path: PathBuf,
    data: Arc<ReplicaData>,
    store: Arc<MemoryStore>,
    fenced: Arc<FencedReplica>,
}

impl TestReplica {
    fn new(volume_id: &str, epoch: u64) -> TestReplica {
        let dir = scratch_dir();
        let path = dir.path().join("replica.data");
        File::create(&path)
            .and_then(|f| f.set_len(SIZE))
            .expect("create replica file");
        let engine = IoEngine::start(1, 64).expect("start engine");
        let data = Arc::new(ReplicaData::open(&path, SIZE, engine).expect("open replica"));
        let store = Arc::new(MemoryStore::default());
        let fenced = Arc::new(FencedReplica::new(
            &format!("{volume_id}-r"),
            volume_id,
            Arc::clone(&data),
            epoch,
            store.clone(),
        ));
        TestReplica {
            _dir: dir,
            path,
            data,
            store,
            fenced,
        }
    }

    /// The file's bytes, read without the data path.
    fn file_bytes(&self, offset: u64, length: usize) -> Vec<u8> {
        let bytes = std::fs::read(&self.path).expect("read replica file");
        bytes[offset as usize..offset as usize + length].to_vec()
    }
}

/// A resolver over a fixed map.
#[derive(Default)]
struct MapResolver(Mutex<HashMap<String, Arc<FencedReplica>>>);

impl MapResolver {
    fn with(replicas: &[&Arc<FencedReplica>]) -> Arc<MapResolver> {
        let resolver = MapResolver::default();
        for replica in replicas {
            resolver
                .0
                .lock()
                .expect("lock")
                .insert(replica.volume_id().to_owned(), Arc::clone(replica));
        }
        Arc::new(resolver)
    }
}

impl ReplicaResolver for MapResolver {
    fn resolve(&self, volume_id: &str) -> Option<Arc<FencedReplica>> {
        self.0.lock().expect("lock").get(volume_id).cloned()
    }
}

async fn start_server(resolver: Arc<MapResolver>) -> ReplicaServer {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    ReplicaServer::start(any, resolver)
        .await
        .expect("start server")
}

fn client(addr: SocketAddr, volume_id: &str) -> ReplicaClient {
    client_with(addr, volume_id, Duration::from_secs(5))
}

fn client_with(addr: SocketAddr, volume_id: &str, timeout: Duration) -> ReplicaClient {
    let config = ClientConfig {
        request_timeout: timeout,
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    };
    ReplicaClient::new(addr, volume_id, config).expect("client")
}

/// Deterministic bytes for `seed`.
fn pattern(seed: u64, len: usize) -> Arc<IoBuf> {
    let mut buf = IoBuf::zeroed(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for byte in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    Arc::new(buf)
}

/// Wraps a replica's data path; a write can be held at the device until the
/// test releases it, and completed writes are logged.
struct GatedDevice {
    inner: Arc<ReplicaData>,
    armed: AtomicBool,
    entered: Notify,
    release: Semaphore,
    events: Arc<Mutex<Vec<String>>>,
}

impl GatedDevice {
    fn new(inner: Arc<ReplicaData>, events: Arc<Mutex<Vec<String>>>) -> GatedDevice {
        GatedDevice {
            inner,
            armed: AtomicBool::new(false),
            entered: Notify::new(),
            release: Semaphore::new(0),
            events,
        }
    }
}

#[async_trait]
impl BlockDevice for GatedDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    async fn read(&self, offset: u64, length: usize) -> Result<IoBuf, BlockError> {
        self.inner.read(offset, length).await
    }

    async fn write(&self, offset: u64, data: IoBuf, fua: bool) -> Result<(), BlockError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            self.release
                .acquire()
                .await
                .expect("gate semaphore")
                .forget();
        }
        let result = self.inner.write(offset, data, fua).await;
        self.events
            .lock()
            .expect("lock")
            .push(format!("write@{offset}"));
        result
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, length: u64) -> Result<(), BlockError> {
        self.inner.trim(offset, length).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.inner
            .write_zeroes(offset, length, punch_hole, fua)
            .await
    }
}

/// Runs every operation through `io` at `epoch` and checks the results
/// against what was written: the same test for in-process and remote
/// replicas.
async fn exercise_every_op(io: &dyn ReplicaIo, epoch: u64) {
    let info = io.info(epoch).await.expect("info");
    assert_eq!(info.size_bytes, SIZE);
    assert_eq!(info.epoch, epoch);
    assert!(info.block_size.is_power_of_two() && info.block_size >= 512);

    // Aligned and unaligned writes, FUA and not, then reads of each.
    let a = pattern(1, 64 * 1024);
    io.write(epoch, 0, Arc::clone(&a), false)
        .await
        .expect("aligned write");
    let b = pattern(2, 1000);
    io.write(epoch, 70_000, Arc::clone(&b), true)
        .await
        .expect("unaligned FUA write");
    io.flush(epoch).await.expect("flush");
    assert!(io.read(epoch, 0, a.len()).await.expect("read a")[..] == a[..]);
    assert!(io.read(epoch, 70_000, b.len()).await.expect("read b")[..] == b[..]);
    let edge = io.read(epoch, 69_999, 1002).await.expect("read around b");
    assert_eq!(edge[0], 0);
    assert!(edge[1..1001] == b[..]);
    assert_eq!(edge[1001], 0);

    // TRIM reads back zeroes; WRITE_ZEROES with and without a hole too.
    io.trim(epoch, 4096, 8192).await.expect("trim");
    let trimmed = io.read(epoch, 0, 16384).await.expect("read trimmed");
    assert!(trimmed[..4096] == a[..4096]);
    assert!(trimmed[4096..12288].iter().all(|&x| x == 0));
    assert!(trimmed[12288..] == a[12288..16384]);
    io.write_zeroes(epoch, 20_000, 3000, true, false)
        .await
        .expect("write zeroes, hole allowed");
    io.write_zeroes(epoch, 40_000, 5000, false, true)
        .await
        .expect("write zeroes, no hole, FUA");
    let zeroed = io.read(epoch, 0, a.len()).await.expect("read zeroed");
    assert!(zeroed[20_000..23_000].iter().all(|&x| x == 0));
    assert_eq!(zeroed[19_999], a[19_999]);
    assert_eq!(zeroed[23_000], a[23_000]);
    assert!(zeroed[40_000..45_000].iter().all(|&x| x == 0));
    assert!(zeroed[45_000..] == a[45_000..]);

    // A read at the very end, and one past it.
    io.read(epoch, SIZE - 10, 10).await.expect("read the end");
    assert!(matches!(
        io.read(epoch, SIZE - 10, 11).await,
        Err(Error::OutOfRange {
            size_bytes: SIZE,
            ..
        })
    ));
    assert!(matches!(
        io.write(epoch, SIZE, pattern(3, 1), false).await,
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        io.read(epoch, 0, MAX_PAYLOAD_BYTES + 1).await,
        Err(Error::InvalidRequest { .. })
    ));

    // Rebuild helpers: the first 64 KiB hold data, the rest of the first
    // MiB is a hole.
    let hashes = io
        .region_hashes(epoch, 0, 1 << 20, 64 * 1024)
        .await
        .expect("region hashes");
    assert_eq!(hashes.len(), 16);
    let first = io
        .read(epoch, 0, 64 * 1024)
        .await
        .expect("read first region");
    assert_eq!(hashes[0].hash, sparse::hash(&first));
    assert!(!hashes[0].hole);
    assert!(hashes[2..].iter().all(|h| h.hole));
    assert_eq!(hashes[5].hash, sparse::zeroes_hash(64 * 1024));
    let extents = io
        .allocated_extents(epoch, 0, SIZE)
        .await
        .expect("allocated extents");
    assert!(!extents.is_empty() && extents[0].offset == 0);
    assert!(extents.iter().all(|e| e.end() <= 128 * 1024), "{extents:?}");
}
