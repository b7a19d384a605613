//! kubelet's plugin registration service (pluginregistration v1), served by
//! `ballast-csi node --kubelet-registration` on a socket in kubelet's
//! `plugins_registry` directory.
//!
//! kubelet's plugin watcher finds the socket, calls `GetInfo` to learn that
//! this is the CSI plugin `csi.ballast.io` and where its endpoint is on the
//! node, then calls the CSI `NodeGetInfo` there and reports the outcome with
//! `NotifyRegistrationStatus`. This is what the node-driver-registrar
//! sidecar does; the node plugin does it itself because that sidecar's Go
//! module is not served to this project (docs/kubernetes.md).
//!
//! The service owns nothing but the endpoint it announces; it never touches
//! a volume.

use ballast_proto::pluginregistration::registration_server::Registration;
use ballast_proto::pluginregistration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};
use tonic::{Request, Response, Status};
use tracing::{error, info};

use super::DRIVER_NAME;

/// The plugin type kubelet expects of a CSI driver.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// The CSI versions kubelet may speak to this plugin (kubelet's CSI client
/// accepts "1.0.0" and later 1.x).
pub const SUPPORTED_VERSIONS: [&str; 1] = ["1.0.0"];

/// The registration service of one node plugin.
#[derive(Debug, Clone)]
pub struct KubeletRegistration {
    endpoint: String,
}

impl KubeletRegistration {
    /// A service that announces `endpoint`: the CSI socket's path on the node
    /// as kubelet sees it (e.g.
    /// `/var/lib/kubelet/plugins/csi.ballast.io/csi.sock`), which differs from
    /// the path inside the node plugin's container.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
        }
    }
}

#[tonic::async_trait]
impl Registration for KubeletRegistration {
    async fn get_info(&self, _: Request<InfoRequest>) -> Result<Response<PluginInfo>, Status> {
        Ok(Response::new(PluginInfo {
            r#type: CSI_PLUGIN_TYPE.to_string(),
            name: DRIVER_NAME.to_string(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            info!(endpoint = %self.endpoint, "kubelet registered the node plugin");
        } else {
            // kubelet retries when the socket is created again; the plugin
            // keeps serving so that a restart of kubelet finds it.
            error!(endpoint = %self.endpoint, error = %status.error, "kubelet refused to register the node plugin");
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn announces_the_driver_and_the_endpoint_kubelet_dials() {
        let service = KubeletRegistration::new("/var/lib/kubelet/plugins/csi.ballast.io/csi.sock");
        let info = service
            .get_info(Request::new(InfoRequest {}))
            .await
            .map(Response::into_inner)
            .ok();
        assert_eq!(
            info,
            Some(PluginInfo {
                r#type: "CSIPlugin".to_string(),
                name: "csi.ballast.io".to_string(),
                endpoint: "/var/lib/kubelet/plugins/csi.ballast.io/csi.sock".to_string(),
                supported_versions: vec!["1.0.0".to_string()],
            })
        );
    }
}
