//! What the demo watches while a fault plays out: a volume's record as the
//! controller's management API reports it (replica states, the in-sync
//! set), and a rebuild's progress as its target counts it.
//!
//! Every wait polls at [`POLL`] and is bounded.

use std::time::{Duration, Instant, SystemTime};

use ballast_proto::agent::GetTargetRequest;
use ballast_proto::agent::target_service_client::TargetServiceClient;
use ballast_proto::controller::volume_service_client::VolumeServiceClient;
use ballast_proto::controller::{GetVolumeRequest, Volume};
use tonic::transport::{Channel, Endpoint};

use super::Error;
use super::progress::Console;
use crate::cluster::{ClusterInfo, NodeInfo};

/// How long a killed replica may take to leave the in-sync set.
pub const DROP_BOUND: Duration = Duration::from_secs(30);
/// How long a replica may take to be back in sync after its agent
/// restarted.
pub const REBUILD_BOUND: Duration = Duration::from_secs(120);
/// How often the controller and the target are asked.
const POLL: Duration = Duration::from_millis(200);

/// What [`Watch::wait_rebuild`] saw.
#[derive(Debug, Clone, Default)]
pub struct Rebuild {
    /// When the replica was seen in sync again: the time since the
    /// agent's restart, and the wall-clock time.
    pub in_sync: Option<(Duration, SystemTime)>,
    /// Bytes of the regions the rebuild found different and copied, as
    /// the target counts them.
    pub total_bytes: u64,
    /// The replica's last state.
    pub last_state: String,
}

/// One volume seen through the controller's management API.
#[derive(Debug, Clone)]
pub struct Watch {
    volume_id: String,
    volumes: VolumeServiceClient<Channel>,
}

impl Watch {
    /// Connects to the controller of `info`.
    ///
    /// # Errors
    ///
    /// [`Error::ControllerUnreachable`].
    pub async fn connect(info: &ClusterInfo, volume_id: &str) -> Result<Self, Error> {
        let address = info.controller_address().unwrap_or_default().to_string();
        let channel = channel(&address)
            .await
            .map_err(|source| Error::ControllerUnreachable { address, source })?;
        Ok(Self {
            volume_id: volume_id.to_string(),
            volumes: VolumeServiceClient::new(channel),
        })
    }

    /// The volume's record.
    ///
    /// # Errors
    ///
    /// [`Error::Controller`].
    pub async fn volume(&mut self) -> Result<Volume, Error> {
        self.volumes
            .get_volume(GetVolumeRequest {
                volume_id: self.volume_id.clone(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| Error::Controller {
                call: "GetVolume",
                status,
            })
    }

    /// Waits until the controller shows `node_id`'s replica out of the
    /// in-sync set, for at most [`DROP_BOUND`].
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::Controller`].
    pub async fn wait_dropped(&mut self, node_id: &str) -> Result<(), Error> {
        let deadline = Instant::now() + DROP_BOUND;
        loop {
            let volume = self.volume().await?;
            if replica_state(&volume, node_id).is_some_and(|s| s != "in-sync") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("The drop of {node_id}'s replica from the in-sync set"),
                    timeout: DROP_BOUND,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Shows the rebuild of `node_id`'s replica as a progress bar until the
    /// controller has it in sync, for at most [`REBUILD_BOUND`] after
    /// `restarted`. The state comes from the controller (the in-sync set is
    /// its record); the progress from the target on `target_node`, which
    /// counts every copied region at once (the controller hears of it once
    /// a second, and forgets it when the replica is in sync). Not being in
    /// sync in time is not an error: [`Rebuild::in_sync`] stays None.
    ///
    /// # Errors
    ///
    /// [`Error::Controller`], [`Error::AgentUnreachable`].
    pub async fn wait_rebuild(
        &mut self,
        node_id: &str,
        target_node: &NodeInfo,
        console: &Console,
        restarted: Instant,
    ) -> Result<Rebuild, Error> {
        let address = target_node.agent_address.clone();
        let mut target = TargetServiceClient::new(channel(&address).await.map_err(|source| {
            Error::AgentUnreachable {
                node_id: target_node.node_id.clone(),
                address,
                source,
            }
        })?);
        let deadline = restarted + REBUILD_BOUND;
        let mut rebuild = Rebuild::default();
        loop {
            let volume = self.volume().await?;
            let state = replica_state(&volume, node_id).unwrap_or("missing");
            rebuild.last_state = state.to_string();
            let progress = self.target_progress(&mut target, node_id).await;
            if let Some((_, total)) = progress {
                rebuild.total_bytes = total;
            }
            match (state, progress) {
                ("in-sync", _) => {
                    console.clear_status();
                    rebuild.in_sync = Some((restarted.elapsed(), SystemTime::now()));
                    return Ok(rebuild);
                }
                ("rebuilding", Some((done, total))) => console.progress("rebuild", done, total),
                ("rebuilding", None) => console.status("rebuild starting"),
                (other, _) => {
                    console.status(&format!(
                        "replica {other}: waiting for its agent to register"
                    ));
                }
            }
            if Instant::now() >= deadline {
                console.clear_status();
                return Ok(rebuild);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The target's rebuild progress of `node_id`'s replica (done and
    /// total bytes); None if the target cannot be asked.
    async fn target_progress(
        &self,
        target: &mut TargetServiceClient<Channel>,
        node_id: &str,
    ) -> Option<(u64, u64)> {
        let target = target
            .get_target(GetTargetRequest {
                volume_id: self.volume_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        let replica = target.replicas.iter().find(|r| r.node_id == node_id)?;
        Some((replica.rebuild_done_bytes, replica.rebuild_total_bytes))
    }
}

/// The state of `node_id`'s replica of `volume`.
fn replica_state<'a>(volume: &'a Volume, node_id: &str) -> Option<&'a str> {
    volume
        .replicas
        .iter()
        .find(|r| r.node_id == node_id)
        .map(|r| r.state.as_str())
}

async fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(address.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}
