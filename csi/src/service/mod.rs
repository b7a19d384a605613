//! The CSI gRPC services (CSI spec v1.12), one file per service like the
//! reference host-path driver:
//!
//! - [`identity`]: GetPluginInfo, GetPluginCapabilities, Probe; served by
//!   both `ballast-csi controller` and `ballast-csi node`.
//! - [`controller`]: the Controller service, a thin adapter over the
//!   in-process volume operations of [`crate::controller::volume`].
//! - [`node`]: the Node service, a thin adapter over
//!   [`crate::node::staging`].
//! - [`group_controller`]: the GroupController service (group snapshots),
//!   served by `ballast-csi controller`.
//! - [`snapshot_metadata`]: the SnapshotMetadata service (changed block
//!   tracking), served by `ballast-csi controller`.
//! - [`quiesce`]: Ballast's `QuiesceService` (freeze, thaw, hooks), served
//!   by `ballast-csi node` beside Node for its agent to forward to.
//!
//! Every handler has the same shape (STYLE.md, "Handlers"): validate the
//! request (`INVALID_ARGUMENT`), take the volume's operation guard
//! (`ABORTED` on a concurrent operation), check idempotency, act. Requests
//! are never logged whole: their `secrets` maps must not reach a log, so
//! `#[instrument]` skips the request and records the volume id only.
//!
//! To add a service (GroupController), add a file here with its own error
//! enum and an explicit `From<Error> for tonic::Status`, and serve it from
//! [`serve`]'s callers.

pub mod controller;
pub mod group_controller;
pub mod identity;
pub mod node;
pub mod quiesce;
pub mod snapshot_metadata;

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The driver name kubelet and the sidecars know us by (CSI spec,
/// "GetPluginInfo": a domain name in reverse order is not required, but
/// the name must be at most 63 characters of DNS label characters and dots).
pub const DRIVER_NAME: &str = "csi.ballast.io";

pub use crate::controller::node::TOPOLOGY_NODE_KEY;

/// Errors of binding a CSI endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint is not a `unix://` URL.
    #[error("Endpoint {0:?} is not unix:///absolute/path")]
    Endpoint(String),
    /// The socket cannot be bound or secured.
    #[error("Cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Endpoint(_) => tonic::Status::invalid_argument(err.to_string()),
            Error::Listen { .. } => tonic::Status::internal(crate::error_chain(&err)),
        }
    }
}

/// The socket path of a `unix:///path` (or `unix:/path`) endpoint.
///
/// # Errors
///
/// [`Error::Endpoint`] for any other form.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, Error> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .ok_or_else(|| Error::Endpoint(endpoint.to_string()))?;
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(Error::Endpoint(endpoint.to_string()));
    }
    Ok(path.to_path_buf())
}

/// Binds the unix socket of `endpoint` with mode 0600 (only root, which
/// kubelet runs as, may talk to the driver). A stale socket file left by
/// a previous run is removed first.
///
/// # Errors
///
/// [`Error::Endpoint`], or [`Error::Listen`] if the socket cannot be
/// bound or its mode set.
pub fn listen(endpoint: &str) -> Result<(PathBuf, UnixListenerStream), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = endpoint_path(endpoint)?;
    let listen_err = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(listen_err)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok((path, UnixListenerStream::new(listener)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_absolute_unix_paths() {
        assert_eq!(
            endpoint_path("unix:///run/csi/csi.sock").ok(),
            Some(PathBuf::from("/run/csi/csi.sock"))
        );
        assert_eq!(
            endpoint_path("unix:/run/csi.sock").ok(),
            Some(PathBuf::from("/run/csi.sock"))
        );
        for bad in ["/run/csi.sock", "tcp://127.0.0.1:1", "unix://relative.sock"] {
            assert!(endpoint_path(bad).is_err(), "{bad} was accepted");
        }
    }
}
