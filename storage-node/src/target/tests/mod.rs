//! Target tests: real replica files under `/var/tmp` (O_DIRECT), one local
//! [`FencedReplica`] and remote ones behind real [`ReplicaServer`]s on
//! loopback, and a stand-in controller: a tonic `TargetControlService`
//! server that records calls and can be made to block, fail or refuse.
//! Every wait is bounded.
//!
//! - `io`: fan-out, failover through DropReplica (invariant 2), fencing
//!   (invariant 3), the last in-sync replica.
//! - `rebuild`: delta (dirty log, hashes), full, concurrent writes, joining
//!   only after the commit (invariant 4).
//! - `agent`: a real agent (file pool, as root): replica server, StartTarget,
//!   StopTarget, the local replica shared with the replica server.
//! - `bench`: full-rebuild throughput (ignored; run by hand).
//! - `clients`: fio with verification through the real NBD server on a
//!   3-replica target, with a replica killed mid-run.

mod agent;
mod barrier;
mod bench;
mod clients;
mod io;
mod rebuild;

use std::collections::HashSet;
use std::fs::File;
use std::io as stdio;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ballast_proto::controller::target_control_refusal::Reason as RefusalReason;
use ballast_proto::controller::target_control_service_server::{
    TargetControlService, TargetControlServiceServer,
};
use ballast_proto::controller::{
    DropReplicaRequest, ReplicaInSyncRequest, ReportRebuildRequest, ReportRebuildResponse,
    TargetControlRefusal, VolumeReplicas,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::*;
use crate::buf::IoBuf;
use crate::replica::data::ReplicaData;
use crate::replication::{
    ClientConfig, EpochStore, Extent, FencedReplica, PersistError, RegionHash, ReplicaClient,
    ReplicaInfo, ReplicaResolver, ReplicaServer,
};
use crate::uring::IoEngine;
use crate::uring::tests::scratch_dir;

/// Upper bound of any single wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// The volume of every test.
const VOLUME: &str = "vol-t";

/// Awaits `future` for at most [`WAIT`].
async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Polls `check` every 20 ms until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deterministic bytes for `seed`.
fn pattern(seed: u64, len: usize) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for byte in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    buf
}

/// An epoch store in memory.
#[derive(Default)]
struct MemoryEpochs;

#[async_trait]
impl EpochStore for MemoryEpochs {
    async fn persist(&self, _epoch: u64) -> Result<(), PersistError> {
        Ok(())
    }
}

/// A resolver serving one fenced replica.
struct One(Arc<FencedReplica>);

impl ReplicaResolver for One {
    fn resolve(&self, volume_id: &str) -> Option<Arc<FencedReplica>> {
        (volume_id == VOLUME).then(|| Arc::clone(&self.0))
    }
}

/// A replica file with its fenced replica, optionally served over TCP.
struct Node {
    id: String,
    _dir: tempfile::TempDir,
    path: PathBuf,
    fenced: Arc<FencedReplica>,
    server: Mutex<Option<ReplicaServer>>,
    addr: Mutex<Option<SocketAddr>>,
}

impl Node {
    /// A sparse replica file of `size` bytes on node `id`, at epoch 1.
    fn new(id: &str, size: u64) -> Node {
        let dir = scratch_dir();
        let path = dir.path().join("replica.data");
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create replica file");
        let engine = IoEngine::start(1, 128).expect("start engine");
        let data = Arc::new(ReplicaData::open(&path, size, engine).expect("open replica"));
        let fenced = Arc::new(FencedReplica::new(
            &format!("{id}-r"),
            VOLUME,
            data,
            1,
            Arc::new(MemoryEpochs),
        ));
        Node {
            id: id.to_owned(),
            _dir: dir,
            path,
            fenced,
            server: Mutex::new(None),
            addr: Mutex::new(None),
        }
    }

    /// Starts (or restarts) its replica server on a free loopback port.
    async fn serve(&self) -> SocketAddr {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let server = ReplicaServer::start(any, Arc::new(One(Arc::clone(&self.fenced))))
            .await
            .expect("start replica server");
        let addr = server.local_addr();
        *self.server.lock().expect("lock") = Some(server);
        *self.addr.lock().expect("lock") = Some(addr);
        addr
    }

    /// Kills its replica server as a crash would: connections are cut,
    /// nothing is answered any more.
    fn kill(&self) {
        drop(self.server.lock().expect("lock").take());
    }

    /// A client of its server with a short timeout.
    fn client(&self) -> Arc<dyn ReplicaIo> {
        let addr = self.addr.lock().expect("lock").expect("served");
        let config = ClientConfig {
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ..ClientConfig::default()
        };
        Arc::new(ReplicaClient::new(addr, VOLUME, config).expect("client"))
    }

    /// The target's view of it: in-process or through its server.
    fn spec(&self, io: Arc<dyn ReplicaIo>, in_sync: bool) -> ReplicaSpec {
        ReplicaSpec {
            node_id: self.id.clone(),
            replica_name: format!("{}-r", self.id),
            data_address: self
                .addr
                .lock()
                .expect("lock")
                .map(|a| a.to_string())
                .unwrap_or_default(),
            io,
            in_sync,
        }
    }

    /// The file's bytes, read without the data path.
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read replica file")
    }

    /// Writes `data` at `offset` straight to the replica at `epoch`.
    async fn put(&self, epoch: u64, offset: u64, data: IoBuf) {
        self.fenced
            .write(epoch, offset, Arc::new(data), false)
            .await
            .expect("direct write");
    }
}

/// Asserts that replicas hold the same bytes, naming the first difference.
fn assert_identical(a: &Node, b: &Node) {
    let (x, y) = (a.bytes(), b.bytes());
    assert_eq!(x.len(), y.len());
    if let Some(at) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "replicas {} and {} differ at byte {at} (region {})",
            a.id,
            b.id,
            at as u64 / regions::REGION_BYTES
        );
    }
}

/// A [`ReplicaIo`] wrapper whose requests can be made to fail, and whose
/// next read can be held until the test releases it.
struct Flaky {
    inner: Arc<dyn ReplicaIo>,
    fail: AtomicBool,
    /// Writes at offsets from this one on fail (`u64::MAX`: none).
    fail_writes_from: AtomicU64,
    /// Writes at offsets below this one never complete (0: none).
    hold_writes_below: AtomicU64,
    hold_read: AtomicBool,
    held: tokio::sync::Notify,
    release: tokio::sync::Semaphore,
}

impl Flaky {
    fn new(inner: Arc<dyn ReplicaIo>) -> Arc<Flaky> {
        Arc::new(Flaky {
            inner,
            fail: AtomicBool::new(false),
            fail_writes_from: AtomicU64::new(u64::MAX),
            hold_writes_below: AtomicU64::new(0),
            hold_read: AtomicBool::new(false),
            held: tokio::sync::Notify::new(),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    fn check(&self) -> Result<(), replication::Error> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(replication::Error::Device(stdio::Error::other(
                "injected failure",
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl ReplicaIo for Flaky {
    fn volume_id(&self) -> &str {
        self.inner.volume_id()
    }

    fn location(&self) -> Location {
        self.inner.location()
    }

    async fn info(&self, epoch: u64) -> Result<ReplicaInfo, replication::Error> {
        self.check()?;
        self.inner.info(epoch).await
    }

    async fn read(
        &self,
        epoch: u64,
        offset: u64,
        length: usize,
    ) -> Result<IoBuf, replication::Error> {
        self.check()?;
        if self.hold_read.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            self.release
                .acquire()
                .await
                .expect("release semaphore")
                .forget();
        }
        self.inner.read(epoch, offset, length).await
    }

    async fn write(
        &self,
        epoch: u64,
        offset: u64,
        data: Arc<IoBuf>,
        fua: bool,
    ) -> Result<(), replication::Error> {
        self.check()?;
        if offset >= self.fail_writes_from.load(Ordering::SeqCst) {
            return Err(replication::Error::Device(stdio::Error::other(
                "injected write failure",
            )));
        }
        if offset < self.hold_writes_below.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.inner.write(epoch, offset, data, fua).await
    }

    async fn flush(&self, epoch: u64) -> Result<(), replication::Error> {
        self.check()?;
        self.inner.flush(epoch).await
    }

    async fn trim(&self, epoch: u64, offset: u64, length: u64) -> Result<(), replication::Error> {
        self.check()?;
        self.inner.trim(epoch, offset, length).await
    }

    async fn write_zeroes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), replication::Error> {
        self.check()?;
        self.inner
            .write_zeroes(epoch, offset, length, punch_hole, fua)
            .await
    }

    async fn region_hashes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionHash>, replication::Error> {
        self.check()?;
        self.inner
            .region_hashes(epoch, offset, length, region_bytes)
            .await
    }

    async fn allocated_extents(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, replication::Error> {
        self.check()?;
        self.inner.allocated_extents(epoch, offset, length).await
    }
}

/// A call the stand-in controller received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// DropReplica for a node, and whether it was committed.
    Drop { node: String, committed: bool },
    /// ReplicaInSync for a node, and whether it was committed.
    InSync { node: String, committed: bool },
    /// ReportRebuild.
    Report { node: String, done: u64, total: u64 },
}

/// A check run when ReplicaInSync arrives (before it commits).
type InSyncHook = Box<dyn Fn(&str) + Send + Sync>;

/// The stand-in controller's state.
struct ControlState {
    epoch: AtomicU64,
    in_sync: Mutex<HashSet<String>>,
    calls: Mutex<Vec<Call>>,
    /// DropReplica and ReplicaInSync wait while this is true.
    blocked: watch::Sender<bool>,
    /// Answer the next N DropReplica calls with UNAVAILABLE.
    fail_drops: AtomicU32,
    /// Calls received while blocked or failing.
    attempts: AtomicU32,
    on_in_sync: Mutex<Option<InSyncHook>>,
    /// Answer a stale epoch with words only, without the typed refusal.
    stale_in_words_only: AtomicBool,
}

#[derive(Clone)]
struct FakeController(Arc<ControlState>);

impl FakeController {
    fn calls(&self) -> Vec<Call> {
        self.0.calls.lock().expect("lock").clone()
    }

    fn drops(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Drop { .. }))
            .collect()
    }

    fn in_syncs(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::InSync { .. }))
            .collect()
    }

    fn block(&self, blocked: bool) {
        self.0.blocked.send_replace(blocked);
    }

    fn on_in_sync(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        *self.0.on_in_sync.lock().expect("lock") = Some(Box::new(hook));
    }

    /// Moves the volume to `epoch`, as publishing a newer target does.
    fn set_epoch(&self, epoch: u64) {
        self.0.epoch.store(epoch, Ordering::SeqCst);
    }

    /// From now on answers a stale epoch in words only: the message says
    /// "stale epoch" but the status carries no typed refusal.
    fn stale_in_words_only(&self) {
        self.0.stale_in_words_only.store(true, Ordering::SeqCst);
    }

    /// Refuses an epoch other than the volume's. The message is worded
    /// unlike the real controller's on purpose: targets must decide on the
    /// typed refusal in the details.
    fn check_epoch(&self, epoch: u64) -> Result<(), Status> {
        let current = self.0.epoch.load(Ordering::SeqCst);
        if epoch == current {
            return Ok(());
        }
        if self.0.stale_in_words_only.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition(format!(
                "Stale epoch {epoch} for volume {VOLUME}: the volume is at epoch {current}"
            )));
        }
        Err(
            TargetControlRefusal::new(RefusalReason::StaleEpoch, current).into_status(
                tonic::Code::FailedPrecondition,
                format!("Volume {VOLUME} now belongs to the target of generation {current}"),
            ),
        )
    }

    async fn wait_unblocked(&self) {
        let mut blocked = self.0.blocked.subscribe();
        let _ = blocked.wait_for(|b| !*b).await;
    }
}

#[tonic::async_trait]
impl TargetControlService for FakeController {
    async fn drop_replica(
        &self,
        request: Request<DropReplicaRequest>,
    ) -> Result<Response<VolumeReplicas>, Status> {
        let request = request.into_inner();
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        if self
            .0
            .fail_drops
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Status::unavailable("injected: store unreachable"));
        }
        self.wait_unblocked().await;
        self.check_epoch(request.epoch)?;
        let mut in_sync = self.0.in_sync.lock().expect("lock");
        let committed = if in_sync.contains(&request.node_id) && in_sync.len() == 1 {
            false
        } else {
            in_sync.remove(&request.node_id);
            true
        };
        self.0.calls.lock().expect("lock").push(Call::Drop {
            node: request.node_id.clone(),
            committed,
        });
        if !committed {
            return Err(
                TargetControlRefusal::new(RefusalReason::LastInSyncReplica, 0).into_status(
                    tonic::Code::FailedPrecondition,
                    format!(
                        "Replica on node {} is the last in-sync replica",
                        request.node_id
                    ),
                ),
            );
        }
        Ok(Response::new(VolumeReplicas {
            epoch: request.epoch,
            replicas: Vec::new(),
        }))
    }

    async fn replica_in_sync(
        &self,
        request: Request<ReplicaInSyncRequest>,
    ) -> Result<Response<VolumeReplicas>, Status> {
        let request = request.into_inner();
        self.wait_unblocked().await;
        self.check_epoch(request.epoch)?;
        if let Some(hook) = &*self.0.on_in_sync.lock().expect("lock") {
            hook(&request.node_id);
        }
        self.0
            .in_sync
            .lock()
            .expect("lock")
            .insert(request.node_id.clone());
        self.0.calls.lock().expect("lock").push(Call::InSync {
            node: request.node_id,
            committed: true,
        });
        Ok(Response::new(VolumeReplicas {
            epoch: request.epoch,
            replicas: Vec::new(),
        }))
    }

    async fn report_rebuild(
        &self,
        request: Request<ReportRebuildRequest>,
    ) -> Result<Response<ReportRebuildResponse>, Status> {
        let request = request.into_inner();
        self.0.calls.lock().expect("lock").push(Call::Report {
            node: request.node_id,
            done: request.done_bytes,
            total: request.total_bytes,
        });
        Ok(Response::new(ReportRebuildResponse {}))
    }
}

/// Starts the stand-in controller on loopback for a volume at `epoch`
/// whose in-sync set is `in_sync`; returns it and its address.
async fn start_controller(epoch: u64, in_sync: &[&str]) -> (FakeController, String) {
    let (blocked, _) = watch::channel(false);
    let controller = FakeController(Arc::new(ControlState {
        epoch: AtomicU64::new(epoch),
        in_sync: Mutex::new(in_sync.iter().map(|s| s.to_string()).collect()),
        calls: Mutex::new(Vec::new()),
        blocked,
        fail_drops: AtomicU32::new(0),
        attempts: AtomicU32::new(0),
        on_in_sync: Mutex::new(None),
        stale_in_words_only: AtomicBool::new(false),
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind controller");
    let addr = listener.local_addr().expect("controller address");
    let service = TargetControlServiceServer::new(controller.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (controller, format!("http://{addr}"))
}

/// A 3-replica volume: node `a` local (in-process), `b` and `c` remote.
struct Cluster {
    a: Node,
    b: Node,
    c: Node,
    controller: FakeController,
    target: Arc<Target>,
    size: u64,
}

impl Cluster {
    /// Starts the three replicas (all in sync) and a target at epoch 2.
    async fn start(size: u64) -> Cluster {
        Self::start_with(size, [true, true, true]).await
    }

    async fn start_with(size: u64, in_sync: [bool; 3]) -> Cluster {
        let (a, b, c) = (
            Node::new("a", size),
            Node::new("b", size),
            Node::new("c", size),
        );
        b.serve().await;
        c.serve().await;
        let names: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .zip(in_sync)
            .filter_map(|(n, s)| s.then_some(n))
            .collect();
        let (controller, address) = start_controller(2, &names).await;
        let specs = vec![
            a.spec(Arc::clone(&a.fenced) as Arc<dyn ReplicaIo>, in_sync[0]),
            b.spec(b.client(), in_sync[1]),
            c.spec(c.client(), in_sync[2]),
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

    fn state(&self, node: &str) -> ReplicaStatus {
        self.target
            .status()
            .replicas
            .into_iter()
            .find(|r| r.node_id == node)
            .unwrap_or_else(|| panic!("no replica on {node}"))
    }

    /// Waits until the replica on `node` is in `state`.
    async fn wait_state(&self, node: &str, state: SyncState) {
        eventually(&format!("replica {node} {state:?}"), || {
            self.state(node).state == state
        })
        .await;
    }
}

/// Starts a target of [`VOLUME`] at epoch 2.
async fn start_target(size: u64, specs: Vec<ReplicaSpec>, controller: &str) -> Arc<Target> {
    let config = TargetConfig {
        volume_id: VOLUME.to_owned(),
        epoch: 2,
        size_bytes: size,
        claim_timeout: Duration::from_secs(5),
    };
    let controller = Controller::new(controller, Duration::from_secs(2)).expect("controller");
    bounded("target start", Target::start(config, specs, controller))
        .await
        .expect("target starts")
}
