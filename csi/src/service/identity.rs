//! The CSI Identity service (CSI spec, "Identity Service RPC").
//!
//! Served by the controller and by every node plugin. The controller's
//! instance announces CONTROLLER_SERVICE, VOLUME_ACCESSIBILITY_CONSTRAINTS
//! and OFFLINE volume expansion; a node plugin's only
//! VOLUME_ACCESSIBILITY_CONSTRAINTS (CSI spec, "GetPluginCapabilities": a
//! plugin reports what the running process serves).

use ballast_proto::csi;
use ballast_proto::csi::plugin_capability::{
    Service, Type, VolumeExpansion, service, volume_expansion,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::DRIVER_NAME;

/// The Identity service.
#[derive(Debug, Clone)]
pub struct Identity {
    controller: bool,
}

impl Identity {
    /// The Identity of the controller process.
    pub fn controller() -> Self {
        Self { controller: true }
    }

    /// The Identity of a node plugin process.
    pub fn node() -> Self {
        Self { controller: false }
    }

    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        let mut kinds = Vec::new();
        if self.controller {
            kinds.push(service::Type::ControllerService);
        }
        kinds.push(service::Type::VolumeAccessibilityConstraints);
        let mut capabilities: Vec<csi::PluginCapability> = kinds
            .into_iter()
            .map(|kind| csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: kind.into(),
                })),
            })
            .collect();
        if self.controller {
            // Targets serve the size they started with: volumes grow
            // between an unpublish and the next publish.
            capabilities.push(csi::PluginCapability {
                r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                    r#type: volume_expansion::Type::Offline.into(),
                })),
            });
        }
        capabilities
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
        let identity = Identity::controller();
        let info = identity
            .get_plugin_info(Request::new(csi::GetPluginInfoRequest {}))
            .await
            .map(Response::into_inner);
        let info = info
            .as_ref()
            .map(|i| (i.name.as_str(), i.vendor_version.as_str()));
        assert_eq!(info.ok(), Some((DRIVER_NAME, env!("CARGO_PKG_VERSION"))));
        assert_eq!(Identity::controller().capabilities().len(), 3);
        assert_eq!(Identity::node().capabilities().len(), 1);
    }
}
