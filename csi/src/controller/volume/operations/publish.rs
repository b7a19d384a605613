//! Publish and unpublish: the epoch raised and committed before the target
//! starts, the target started on the node, its NBD socket recorded.

use super::*;

/// Where a published volume is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// NBD URI of the target's export.
    pub nbd_uri: String,
    /// The export's unix socket on the target's node.
    pub socket_path: String,
    /// The epoch the target runs at.
    pub epoch: u64,
}

impl Volumes {
    /// Publishes a volume on a node: raises the epoch, starts the target
    /// there and returns its NBD socket. Idempotent for the node it is
    /// published on (while that target runs).
    ///
    /// # Errors
    ///
    /// [`Error::PublishedElsewhere`] if published on another node and
    /// `force` is not set; [`Error::NodeDown`]; [`Error::Agent`] if the
    /// target does not start (the volume is then not published).
    pub async fn publish(
        &self,
        volume_id: &str,
        node_id: &str,
        force: bool,
    ) -> Result<Publication, Error> {
        self.publish_as(volume_id, node_id, force, None).await
    }

    /// Publishes a volume on a node for `capability` (CSI
    /// ControllerPublishVolume), never moving it: as [`Volumes::publish`]
    /// without force, and the capability is recorded with the target.
    ///
    /// # Errors
    ///
    /// As [`Volumes::publish`]; [`Error::InvalidArgument`] if the volume
    /// was not created for the capability's access type;
    /// [`Error::PublishedIncompatible`] if it is published on the node
    /// with another capability.
    pub async fn publish_with(
        &self,
        volume_id: &str,
        node_id: &str,
        capability: &CapabilityRecord,
    ) -> Result<Publication, Error> {
        self.publish_as(volume_id, node_id, false, Some(capability))
            .await
    }

    #[instrument(err, skip(self, capability), fields(volume.id = %volume_id, node.id = %node_id, epoch = tracing::field::Empty))]
    async fn publish_as(
        &self,
        volume_id: &str,
        node_id: &str,
        force: bool,
        capability: Option<&CapabilityRecord>,
    ) -> Result<Publication, Error> {
        required("volume_id", volume_id)?;
        required("node_id", node_id)?;
        let _guard = self.guard(volume_id)?;
        let store = &self.context.store;
        let current = record::read(store, volume_id)
            .await?
            .ok_or_else(|| not_found(volume_id))?
            .value;
        if let Some(capability) = capability {
            current
                .supports(capability)
                .map_err(|reason| Error::InvalidArgument { reason })?;
        }
        check_publishable(&current)?;
        let node = self.up_node(node_id).await?;
        let previous = current.target.clone();
        if let Some(target) = &previous {
            if target.node_id == node_id {
                if let (Some(existing), Some(requested)) = (&target.capability, capability)
                    && existing != requested
                {
                    return Err(Error::PublishedIncompatible {
                        volume: volume_id.to_string(),
                        node: node_id.to_string(),
                        existing: existing.to_string(),
                        requested: requested.to_string(),
                    });
                }
                if let Some(publication) = self.running_target(&current, &node).await? {
                    // A publish interrupted after the target started (a
                    // crash) left the socket unrecorded: record it now.
                    if target.nbd_uri != publication.nbd_uri
                        || target.socket_path != publication.socket_path
                    {
                        self.record_socket(volume_id, node_id, &publication).await?;
                    }
                    return Ok(publication);
                }
                info!("The target is not running at the volume's epoch; starting it again");
            } else if !force {
                return Err(Error::PublishedElsewhere {
                    volume: volume_id.to_string(),
                    node: target.node_id.clone(),
                    requested: node_id.to_string(),
                });
            }
        }
        // Commit the new epoch and the target's node before the target
        // starts: no replica may see an epoch the store does not hold.
        let nodes = &self.context.nodes;
        let raised = record::update(store, volume_id, |r| {
            check_publishable(r)?;
            r.epoch += 1;
            // A target is still recorded (it died, or is being moved while
            // it runs) or went away uncleanly: its unacknowledged writes
            // may sit on some in-sync replicas only.
            if r.target.is_some() || r.unclean_stop {
                let faulted = r.resync_from_one(
                    node_id,
                    |n| nodes.state(n) == node::NodeState::Up,
                    now_unix_ms(),
                );
                if !faulted.is_empty() {
                    info!(faulted = ?faulted, "The previous target stopped uncleanly; these replicas are rebuilt from one in-sync replica");
                }
            }
            // A restart on the same node without a capability (the
            // management API) keeps the one CSI published with.
            let kept = r
                .target
                .as_ref()
                .filter(|t| t.node_id == node_id)
                .and_then(|t| t.capability.clone());
            r.target = Some(TargetRecord {
                node_id: node_id.to_string(),
                socket_path: String::new(),
                nbd_uri: String::new(),
                capability: capability.cloned().or(kept),
            });
            Ok::<_, Error>(Change::Write)
        })
        .await?
        .ok_or_else(|| not_found(volume_id))?
        .value;
        let epoch = raised.epoch;
        tracing::Span::current().record("epoch", epoch);
        info!("Epoch raised; starting the target");
        let started = self.start_target(&raised, &node).await;
        if let Some(old) = previous.filter(|t| t.node_id != node_id) {
            // Forced move: the old target is fenced by the new epoch as
            // soon as the new target reaches the replicas; stopping it is
            // a courtesy that may fail if its node is gone.
            if let Err(err) = self.stop_target(&old.node_id, volume_id).await {
                warn!(old.node = %old.node_id, error = %crate::error_chain(&err), "Cannot stop the old target; the new epoch fences it");
            }
        }
        let target = match started {
            Ok(target) => target,
            Err(err) => {
                if let Err(stop) = self.stop_target(node_id, volume_id).await {
                    warn!(error = %crate::error_chain(&stop), "Cannot stop the target that failed to start");
                }
                record::update(store, volume_id, |r| {
                    if r.epoch != epoch
                        || r.target.as_ref().map(|t| t.node_id.as_str()) != Some(node_id)
                    {
                        return Ok::<_, Error>(Change::Keep);
                    }
                    r.target = None;
                    Ok(Change::Write)
                })
                .await?;
                return Err(err);
            }
        };
        let publication = Publication {
            nbd_uri: target.nbd_uri.clone(),
            socket_path: target.socket_path.clone(),
            epoch,
        };
        self.record_socket(volume_id, node_id, &publication).await?;
        info!(uri = %publication.nbd_uri, "Volume published");
        Ok(publication)
    }

    /// Records the socket and URI of the target that runs on `node_id` at
    /// `publication.epoch`, unless the record moved on meanwhile.
    async fn record_socket(
        &self,
        volume_id: &str,
        node_id: &str,
        publication: &Publication,
    ) -> Result<(), Error> {
        record::update(&self.context.store, volume_id, |r| {
            match &mut r.target {
                Some(t) if r.epoch == publication.epoch && t.node_id == node_id => {
                    if t.socket_path == publication.socket_path && t.nbd_uri == publication.nbd_uri
                    {
                        return Ok::<_, Error>(Change::Keep);
                    }
                    t.socket_path = publication.socket_path.clone();
                    t.nbd_uri = publication.nbd_uri.clone();
                    Ok(Change::Write)
                }
                // Changed meanwhile (a newer publish): leave it.
                _ => Ok(Change::Keep),
            }
        })
        .await?;
        Ok(())
    }

    /// The publication of the target on `node` if it runs at the volume's
    /// epoch and serves; `None` if it is gone (e.g. its agent restarted)
    /// or stale.
    async fn running_target(
        &self,
        volume: &VolumeRecord,
        node: &NodeView,
    ) -> Result<Option<Publication>, Error> {
        let Some(target) = self.get_target(node, &volume.volume_id).await? else {
            return Ok(None);
        };
        if target.epoch != volume.epoch || !target.serving {
            return Ok(None);
        }
        Ok(Some(Publication {
            nbd_uri: target.nbd_uri,
            socket_path: target.socket_path,
            epoch: target.epoch,
        }))
    }

    /// Unpublishes a volume: stops its target and clears it from the
    /// record. Idempotent. If the target's node is down, the target cannot
    /// be stopped; the next publish's epoch fences it.
    ///
    /// # Errors
    ///
    /// [`Error::VolumeNotFound`]; [`Error::Agent`] if the target's agent is
    /// up and fails to stop it.
    pub async fn unpublish(&self, volume_id: &str) -> Result<(), Error> {
        self.unpublish_from(volume_id, None).await
    }

    /// Unpublishes a volume if it is published on `node_id` (on any node
    /// when `None`); a volume published elsewhere is left alone. The check
    /// and the unpublish happen under the volume's guard, so a publish
    /// cannot slip in between (CSI ControllerUnpublishVolume names the
    /// node it unpublishes from).
    ///
    /// # Errors
    ///
    /// As [`Volumes::unpublish`].
    #[instrument(err, skip(self))]
    pub async fn unpublish_from(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
    ) -> Result<(), Error> {
        required("volume_id", volume_id)?;
        let _guard = self.guard(volume_id)?;
        let store = &self.context.store;
        let current = record::read(store, volume_id)
            .await?
            .ok_or_else(|| not_found(volume_id))?
            .value;
        let Some(target) = current.target else {
            return Ok(());
        };
        if node_id.is_some_and(|node| node != target.node_id) {
            return Ok(());
        }
        let unclean = match self.stop_target(&target.node_id, volume_id).await {
            Ok(()) => false,
            Err(err @ (Error::NodeDown { .. } | Error::NodeNotFound { .. })) => {
                warn!(node.id = %target.node_id, error = %err, "Target's node is unreachable; the next publish's epoch fences it and resynchronises the replicas");
                true
            }
            Err(Error::Agent(err)) if err.is_unreachable() => {
                warn!(node.id = %target.node_id, error = %err, "Target's agent is unreachable; the next publish's epoch fences it and resynchronises the replicas");
                true
            }
            Err(err) => return Err(err),
        };
        record::update(store, volume_id, |r| {
            if r.target.as_ref().map(|t| &t.node_id) != Some(&target.node_id) {
                return Ok::<_, Error>(Change::Keep);
            }
            r.target = None;
            r.unclean_stop |= unclean;
            Ok(Change::Write)
        })
        .await?;
        info!(node.id = %target.node_id, "Volume unpublished");
        Ok(())
    }
}

fn check_publishable(volume: &VolumeRecord) -> Result<(), Error> {
    match volume.state {
        VolumeState::Ready => Ok(()),
        VolumeState::Creating => Err(Error::Creating {
            volume: volume.volume_id.clone(),
        }),
        VolumeState::Deleting => Err(deleting(volume)),
    }
}
