//! Test fixtures for the controller: a controller context on a real
//! embedded store in a temporary directory, and fake agents.
//!
//! A [`FakeAgent`] is a tonic server on loopback that implements the
//! agent's replica and target services in memory, with switches to make
//! calls fail. It stands in for `ballast-agent` only where a real one is
//! not needed (unit tests of the controller's decisions and error paths);
//! the integration tests in `tests/` start real agents.

use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ballast_proto::agent as pb;
use ballast_proto::agent::replica_service_server::{ReplicaService, ReplicaServiceServer};
use ballast_proto::agent::target_service_server::{TargetService, TargetServiceServer};
use ballast_proto::controller as cpb;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::{Context, ControllerConfig};
use crate::store::{ClusterStore, EmbeddedStore};

/// What a fake agent holds and was asked.
#[derive(Debug, Default)]
pub(crate) struct FakeState {
    pub replicas: BTreeMap<String, pb::Replica>,
    pub targets: BTreeMap<String, pb::Target>,
    pub add_replica_calls: Vec<pb::AddReplicaRequest>,
    pub start_target_calls: Vec<pb::StartTargetRequest>,
    /// Make CreateReplica fail with this code.
    pub fail_create: Option<tonic::Code>,
    /// Make StartTarget fail with this code.
    pub fail_start_target: Option<tonic::Code>,
    /// The pause id holding each volume's barrier.
    pub paused: BTreeMap<String, String>,
    pub pause_calls: Vec<pb::PauseTargetRequest>,
    pub resume_calls: Vec<pb::ResumeTargetRequest>,
    /// Make PauseTarget fail with this code.
    pub fail_pause: Option<tonic::Code>,
}

/// An in-memory agent on a loopback port.
pub(crate) struct FakeAgent {
    pub node_id: String,
    pub address: SocketAddr,
    pub state: Arc<Mutex<FakeState>>,
    _shutdown: oneshot::Sender<()>,
}

impl FakeAgent {
    pub(crate) async fn start(node_id: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let address = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(FakeState::default()));
        let (tx, rx) = oneshot::channel::<()>();
        let service = FakeService {
            state: state.clone(),
        };
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(ReplicaServiceServer::new(service.clone()))
                .add_service(TargetServiceServer::new(service))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await;
        });
        Self {
            node_id: node_id.to_string(),
            address,
            state,
            _shutdown: tx,
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock()
    }

    pub(crate) fn replica_names(&self) -> Vec<String> {
        self.state().replicas.keys().cloned().collect()
    }
}

#[derive(Clone)]
struct FakeService {
    state: Arc<Mutex<FakeState>>,
}

impl FakeService {
    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock()
    }
}

#[tonic::async_trait]
impl ReplicaService for FakeService {
    async fn create_replica(
        &self,
        request: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        if let Some(code) = state.fail_create {
            return Err(Status::new(code, "fake agent: create refused"));
        }
        if let Some(existing) = state.replicas.get(&request.name) {
            if existing.size_bytes != request.size_bytes {
                return Err(Status::already_exists("fake agent: other size"));
            }
            return Ok(Response::new(existing.clone()));
        }
        let replica = pb::Replica {
            name: request.name.clone(),
            pool: "pool0".into(),
            volume_id: request.volume_id,
            size_bytes: request.size_bytes,
            thin: request.thin,
            ..Default::default()
        };
        state.replicas.insert(request.name, replica.clone());
        Ok(Response::new(replica))
    }

    async fn grow_replica(
        &self,
        request: Request<pb::GrowReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        let replica = state
            .replicas
            .get_mut(&request.name)
            .ok_or_else(|| Status::not_found("no such replica"))?;
        if request.size_bytes < replica.size_bytes {
            return Err(Status::out_of_range("replicas never shrink"));
        }
        replica.size_bytes = request.size_bytes;
        Ok(Response::new(replica.clone()))
    }

    async fn destroy_replica(
        &self,
        request: Request<pb::DestroyReplicaRequest>,
    ) -> Result<Response<pb::DestroyReplicaResponse>, Status> {
        self.state().replicas.remove(&request.get_ref().name);
        Ok(Response::new(pb::DestroyReplicaResponse {}))
    }

    async fn list_replicas(
        &self,
        _request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: self.state().replicas.values().cloned().collect(),
        }))
    }
}

#[tonic::async_trait]
impl TargetService for FakeService {
    async fn start_target(
        &self,
        request: Request<pb::StartTargetRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.start_target_calls.push(request.clone());
        if let Some(code) = state.fail_start_target {
            return Err(Status::new(code, "fake agent: target refused"));
        }
        if let Some(running) = state.targets.get(&request.volume_id)
            && running.epoch > request.epoch
        {
            return Err(Status::failed_precondition("fake agent: lower epoch"));
        }
        let socket = format!("/fake/{}.sock", request.volume_id);
        let target = pb::Target {
            volume_id: request.volume_id.clone(),
            epoch: request.epoch,
            size_bytes: request.size_bytes,
            nbd_uri: format!("nbd+unix:///{}?socket={socket}", request.volume_id),
            socket_path: socket,
            replicas: request.replicas,
            serving: true,
        };
        state.targets.insert(request.volume_id, target.clone());
        Ok(Response::new(target))
    }

    async fn stop_target(
        &self,
        request: Request<pb::StopTargetRequest>,
    ) -> Result<Response<pb::StopTargetResponse>, Status> {
        self.state().targets.remove(&request.get_ref().volume_id);
        Ok(Response::new(pb::StopTargetResponse {}))
    }

    async fn get_target(
        &self,
        request: Request<pb::GetTargetRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        self.state()
            .targets
            .get(&request.get_ref().volume_id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("fake agent: no target"))
    }

    async fn list_targets(
        &self,
        _request: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        Ok(Response::new(pb::ListTargetsResponse {
            targets: self.state().targets.values().cloned().collect(),
        }))
    }

    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.add_replica_calls.push(request.clone());
        let target = state
            .targets
            .get_mut(&request.volume_id)
            .ok_or_else(|| Status::not_found("fake agent: no target"))?;
        if let Some(replica) = request.replica {
            target.replicas.retain(|r| r.node_id != replica.node_id);
            target.replicas.push(pb::TargetReplica {
                state: "rebuilding".into(),
                ..replica
            });
        }
        Ok(Response::new(target.clone()))
    }

    async fn pause_target(
        &self,
        request: Request<pb::PauseTargetRequest>,
    ) -> Result<Response<pb::PauseTargetResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.pause_calls.push(request.clone());
        if let Some(code) = state.fail_pause {
            return Err(Status::new(code, "fake agent: pause refused"));
        }
        let target = state
            .targets
            .get(&request.volume_id)
            .ok_or_else(|| Status::not_found("fake agent: no target"))?;
        if target.epoch != request.epoch {
            return Err(Status::failed_precondition("fake agent: other epoch"));
        }
        let in_sync_node_ids = target
            .replicas
            .iter()
            .filter(|r| r.in_sync)
            .map(|r| r.node_id.clone())
            .collect();
        if let Some(holder) = state.paused.get(&request.volume_id)
            && *holder != request.pause_id
        {
            return Err(Status::failed_precondition("fake agent: paused by another"));
        }
        state.paused.insert(request.volume_id, request.pause_id);
        Ok(Response::new(pb::PauseTargetResponse {
            paused_at_unix_nanos: 1_700_000_000_000_000_000,
            in_sync_node_ids,
        }))
    }

    async fn resume_target(
        &self,
        request: Request<pb::ResumeTargetRequest>,
    ) -> Result<Response<pb::ResumeTargetResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state.resume_calls.push(request.clone());
        let was_paused = state.paused.get(&request.volume_id) == Some(&request.pause_id);
        if was_paused {
            state.paused.remove(&request.volume_id);
        }
        Ok(Response::new(pb::ResumeTargetResponse {
            was_paused,
            paused_ms: u64::from(was_paused),
        }))
    }
}

/// A controller context on a fresh embedded store, with fake agents
/// registered as nodes `node-1`..`node-N` (each with one 4 GiB pool) and
/// heartbeats sent for the nodes in `alive`.
pub(crate) struct Fixture {
    pub dir: Arc<tempfile::TempDir>,
    pub context: Arc<Context>,
    pub agents: Vec<FakeAgent>,
    pub alive: Arc<Mutex<HashSet<String>>>,
    heartbeats: tokio::task::JoinHandle<()>,
}

pub(crate) const GIB: u64 = 1 << 30;

impl Fixture {
    pub(crate) async fn new(nodes: usize) -> Self {
        Self::with_timing(nodes, Duration::from_millis(400), Duration::from_secs(600)).await
    }

    pub(crate) async fn with_timing(
        nodes: usize,
        heartbeat_timeout: Duration,
        node_down_after: Duration,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn ClusterStore> = Arc::new(
            EmbeddedStore::open(dir.path().join("ballast.redb"))
                .await
                .expect("open the embedded store"),
        );
        let mut config = ControllerConfig::new("127.0.0.1:1".parse().expect("address"));
        config.heartbeat_timeout = heartbeat_timeout;
        config.node_down_after = node_down_after;
        config.agent_timeout = Duration::from_secs(5);
        let context = Context::new(store, config);
        let mut agents = Vec::new();
        for i in 1..=nodes {
            let agent = FakeAgent::start(&format!("node-{i}")).await;
            context
                .nodes
                .register(&cpb::Node {
                    node_id: agent.node_id.clone(),
                    agent_address: format!("http://{}", agent.address),
                    data_address: format!("127.0.0.1:{}", 10000 + i),
                    pools: vec![pool(4 * GIB, 0)],
                    ..Default::default()
                })
                .await
                .expect("register node");
            agents.push(agent);
        }
        let alive: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(
            agents.iter().map(|a| a.node_id.clone()).collect(),
        ));
        let heartbeats = {
            let context = context.clone();
            let alive = alive.clone();
            tokio::spawn(async move {
                loop {
                    let nodes: Vec<String> = alive.lock().iter().cloned().collect();
                    for node in nodes {
                        let _ = context.nodes.heartbeat(&node, &[pool(4 * GIB, 0)]).await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Self {
            dir: Arc::new(dir),
            context,
            agents,
            alive,
            heartbeats,
        }
    }

    pub(crate) fn agent(&self, node_id: &str) -> &FakeAgent {
        self.agents
            .iter()
            .find(|a| a.node_id == node_id)
            .expect("fake agent for node")
    }

    /// Stops heartbeats of `node_id` (it goes down after the timeout) or
    /// resumes them.
    pub(crate) fn set_alive(&self, node_id: &str, alive: bool) {
        let mut set = self.alive.lock();
        if alive {
            set.insert(node_id.to_string());
        } else {
            set.remove(node_id);
        }
    }

    /// Waits (bounded) until the registry sees `node_id` in `state`.
    pub(crate) async fn wait_node(&self, node_id: &str, state: super::node::NodeState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.context.nodes.state(node_id) != state {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{node_id} never became {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

/// A heartbeat pool figure.
pub(crate) fn pool(total: u64, provisioned: u64) -> cpb::Pool {
    cpb::Pool {
        name: "pool0".into(),
        total_bytes: total,
        free_bytes: total,
        provisioned_bytes: provisioned,
        overcommit_percent: 200,
    }
}
