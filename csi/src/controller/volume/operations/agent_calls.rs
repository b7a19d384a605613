//! The building blocks operations and reconcilers share: the operation
//! guard, node look-ups, and the agent calls (replicas and targets) they are
//! made of.

use super::*;

impl Volumes {
    /// Takes the volume's operation guard.
    pub(crate) fn guard(&self, volume_id: &str) -> Result<OpGuard, Error> {
        self.context
            .guards
            .try_acquire(volume_id)
            .ok_or_else(|| Error::Busy {
                volume: volume_id.to_string(),
            })
    }

    /// Every registered node as placement sees it.
    pub(crate) async fn candidates(&self) -> Result<Vec<Candidate>, Error> {
        Ok(self
            .context
            .nodes
            .list()
            .await?
            .into_iter()
            .map(|view| Candidate {
                up: view.is_up(),
                node_id: view.record.node_id,
                topology: view.record.topology,
                pools: view.pools,
            })
            .collect())
    }

    /// A registered node.
    pub(crate) async fn node(&self, node_id: &str) -> Result<NodeView, Error> {
        self.context
            .nodes
            .get(node_id)
            .await?
            .ok_or_else(|| Error::NodeNotFound {
                node: node_id.to_string(),
            })
    }

    /// A registered node that is up.
    pub(crate) async fn up_node(&self, node_id: &str) -> Result<NodeView, Error> {
        let node = self.node(node_id).await?;
        if !node.is_up() {
            return Err(Error::NodeDown {
                node: node_id.to_string(),
            });
        }
        Ok(node)
    }

    /// Creates (idempotently) the replica of `volume` on `node_id`.
    pub(crate) async fn create_replica(
        &self,
        volume: &VolumeRecord,
        node_id: &str,
    ) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.replicas(&node.record.agent_address)?;
        // The replicas placed on the source's copies start as reflinks of
        // them; the others start empty and are rebuilt from those.
        let source_snapshot = match (&volume.content_source, volume.replica(node_id)) {
            (Some(source), Some(replica))
                if volume.state == VolumeState::Creating
                    && replica.state == ReplicaState::InSync =>
            {
                source.snapshot_id.clone()
            }
            _ => String::new(),
        };
        let replica = client
            .create_replica(agent_pb::CreateReplicaRequest {
                name: volume.volume_id.clone(),
                size_bytes: volume.size_bytes,
                thin: volume.thin,
                pool: String::new(),
                volume_id: volume.volume_id.clone(),
                source_snapshot,
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    node_id,
                    format!("Creating replica {}", volume.volume_id),
                    status,
                )
            })?
            .into_inner();
        self.context
            .nodes
            .note_provisioned(node_id, &replica.pool, volume.size_bytes, volume.thin);
        info!(node.id = %node_id, pool = %replica.pool, "Replica created");
        Ok(())
    }

    /// Destroys replica `name` on `node_id`; a missing replica is fine.
    pub(crate) async fn destroy_replica(&self, node_id: &str, name: &str) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.replicas(&node.record.agent_address)?;
        client
            .destroy_replica(agent_pb::DestroyReplicaRequest {
                name: name.to_string(),
            })
            .await
            .map_err(|status| {
                AgentError::new(node_id, format!("Destroying replica {name}"), status)
            })?;
        info!(node.id = %node_id, replica.id = %name, "Replica destroyed");
        Ok(())
    }

    /// Starts the target of `volume` (at its current epoch) on `node`.
    pub(crate) async fn start_target(
        &self,
        volume: &VolumeRecord,
        node: &NodeView,
    ) -> Result<agent_pb::Target, Error> {
        let replicas = self.target_replicas(volume).await?;
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        Ok(client
            .start_target(agent_pb::StartTargetRequest {
                volume_id: volume.volume_id.clone(),
                epoch: volume.epoch,
                size_bytes: volume.size_bytes,
                // The agent picks the socket under its state directory.
                socket_path: String::new(),
                replicas,
                controller_address: self.context.config.advertise_address.clone(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    &node.record.node_id,
                    format!("Starting the target of volume {}", volume.volume_id),
                    status,
                )
            })?
            .into_inner())
    }

    /// The replicas of `volume` as a target needs them: with their nodes'
    /// data addresses and in-sync flags.
    pub(crate) async fn target_replicas(
        &self,
        volume: &VolumeRecord,
    ) -> Result<Vec<agent_pb::TargetReplica>, Error> {
        let nodes = self.context.nodes.list().await?;
        Ok(volume
            .replicas
            .iter()
            .map(|r| {
                let data_address = nodes
                    .iter()
                    .find(|n| n.record.node_id == r.node_id)
                    .map(|n| n.record.data_address.clone())
                    .unwrap_or_default();
                agent_pb::TargetReplica {
                    node_id: r.node_id.clone(),
                    replica_name: r.replica_name.clone(),
                    data_address,
                    in_sync: r.state == ReplicaState::InSync,
                    state: r.state.as_str().to_string(),
                    rebuild_done_bytes: 0,
                    rebuild_total_bytes: 0,
                }
            })
            .collect())
    }

    /// Stops the volume's target on `node_id` (idempotent on the agent).
    pub(crate) async fn stop_target(&self, node_id: &str, volume_id: &str) -> Result<(), Error> {
        let node = self.up_node(node_id).await?;
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        match client
            .stop_target(agent_pb::StopTargetRequest {
                volume_id: volume_id.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(AgentError::new(
                node_id,
                format!("Stopping the target of volume {volume_id}"),
                status,
            )
            .into()),
        }
    }

    /// The volume's target on `node`, `None` if it runs none.
    pub(crate) async fn get_target(
        &self,
        node: &NodeView,
        volume_id: &str,
    ) -> Result<Option<agent_pb::Target>, Error> {
        let mut client = self.context.agents.targets(&node.record.agent_address)?;
        match client
            .get_target(agent_pb::GetTargetRequest {
                volume_id: volume_id.to_string(),
            })
            .await
        {
            Ok(target) => Ok(Some(target.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(AgentError::new(
                &node.record.node_id,
                format!("Reading the target of volume {volume_id}"),
                status,
            )
            .into()),
        }
    }
}
