//! The CSI Identity service (CSI spec, "Identity Service RPC").
//!
//! Served by the controller and by every node plugin, which all announce
//! the same capabilities: CONTROLLER_SERVICE,
//! VOLUME_ACCESSIBILITY_CONSTRAINTS, SNAPSHOT_METADATA_SERVICE and
//! GROUP_CONTROLLER_SERVICE (both served by the controller) and OFFLINE
//! volume expansion. CSI spec,
//! "GetPluginCapabilities": the answer is "the grand sum of all
//! capabilities of all instances of the Plugin software", and all
//! instances of one version "SHALL return the same set of capabilities,
//! regardless of ... which RPCs an instance is serving". A CO that asks a
//! node plugin (csi-sanity does, on its node endpoint) learns from it
//! whether to call ControllerPublishVolume, whose `publish_context`
//! NodeStageVolume needs.

use ballast_proto::csi;
use ballast_proto::csi::plugin_capability::{
    Service, Type, VolumeExpansion, service, volume_expansion,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::DRIVER_NAME;

/// The Identity service. It is the same in every process of the plugin:
/// the controller and every node plugin.
#[derive(Debug, Clone, Default)]
pub struct Identity;

impl Identity {
    /// The plugin's capabilities, whichever process serves them.
    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        let services = [
            service::Type::ControllerService,
            service::Type::VolumeAccessibilityConstraints,
            service::Type::SnapshotMetadataService,
            service::Type::GroupControllerService,
        ]
        .into_iter()
        .map(|kind| csi::PluginCapability {
            r#type: Some(Type::Service(Service {
                r#type: kind.into(),
            })),
        });
        // Targets serve the size they started with: volumes grow between
        // an unpublish and the next publish.
        let expansion = csi::PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Offline.into(),
            })),
        };
        services.chain([expansion]).collect()
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    /// Name and version (CSI spec, "GetPluginInfo": both REQUIRED; the
    /// version is the crate's).
    #[instrument(skip_all)]
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    #[instrument(skip_all)]
    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: self.capabilities(),
        }))
    }

    /// Ready as soon as the process serves (CSI spec, "Probe": `ready`
    /// unset or true means ready).
    #[instrument(skip_all)]
    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::identity_server::Identity as _;

    #[tokio::test]
    async fn identity_names_the_driver_and_its_services() {
        let identity = Identity;
        let info = identity
            .get_plugin_info(Request::new(csi::GetPluginInfoRequest {}))
            .await
            .map(Response::into_inner);
        let info = info
            .as_ref()
            .map(|i| (i.name.as_str(), i.vendor_version.as_str()));
        assert_eq!(info.ok(), Some((DRIVER_NAME, env!("CARGO_PKG_VERSION"))));
        let capabilities = identity
            .get_plugin_capabilities(Request::new(csi::GetPluginCapabilitiesRequest {}))
            .await
            .map(|r| r.into_inner().capabilities)
            .unwrap_or_default();
        let services: Vec<service::Type> = capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(Type::Service(s)) => Some(s.r#type()),
                _ => None,
            })
            .collect();
        assert_eq!(
            services,
            [
                service::Type::ControllerService,
                service::Type::VolumeAccessibilityConstraints,
                service::Type::SnapshotMetadataService,
                service::Type::GroupControllerService,
            ]
        );
        let expansion: Vec<volume_expansion::Type> = capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(Type::VolumeExpansion(e)) => Some(e.r#type()),
                _ => None,
            })
            .collect();
        assert_eq!(expansion, [volume_expansion::Type::Offline]);
    }
}
