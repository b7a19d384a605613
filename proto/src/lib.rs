//! Generated gRPC types and services of Ballast.
//!
//! `agent` is the storage agent's API (pools, replicas, exports, targets),
//! served by `ballast-agent`; `controller` is the controller's management
//! API (nodes, volumes, and the in-sync set changes targets ask for);
//! `csi` is the Container Storage Interface v1.12 (package `csi.v1`) that
//! kubelet and the CSI sidecars speak to `ballast-csi`.
//! The `.proto` files under `proto/` are the wire contract: field numbers
//! are never reused, and `csi.proto` follows the CSI specification exactly.

#![allow(missing_docs, clippy::all)]

/// The storage agent API, package `ballast.agent.v1`.
pub mod agent {
    tonic::include_proto!("ballast.agent.v1");
}

/// The controller's management API, package `ballast.controller.v1`.
pub mod controller {
    tonic::include_proto!("ballast.controller.v1");

    use prost::Message as _;

    impl TargetControlRefusal {
        /// The type URL of the refusal in the status details.
        pub const TYPE_URL: &'static str =
            "type.googleapis.com/ballast.controller.v1.TargetControlRefusal";

        /// A refusal of `reason`; `volume_epoch` is the volume's current
        /// epoch (with [`target_control_refusal::Reason::StaleEpoch`]).
        pub fn new(reason: target_control_refusal::Reason, volume_epoch: u64) -> Self {
            Self {
                reason: reason.into(),
                volume_epoch,
            }
        }

        /// A status of `code` and `message` that carries this refusal in
        /// its details (`grpc-status-details-bin`, as google.rpc.Status).
        pub fn into_status(self, code: tonic::Code, message: impl Into<String>) -> tonic::Status {
            let message = message.into();
            let details = tonic_types::Status {
                code: code as i32,
                message: message.clone(),
                details: vec![prost_types::Any {
                    type_url: Self::TYPE_URL.to_owned(),
                    value: self.encode_to_vec(),
                }],
            };
            tonic::Status::with_details(code, message, details.encode_to_vec().into())
        }

        /// The refusal `status` carries in its details; `None` when it
        /// carries none, or details that do not decode (then the status is
        /// only a message for people).
        pub fn from_status(status: &tonic::Status) -> Option<Self> {
            let details = tonic_types::Status::decode(status.details()).ok()?;
            details
                .details
                .iter()
                .find(|detail| detail.type_url == Self::TYPE_URL)
                .and_then(|detail| Self::decode(detail.value.as_slice()).ok())
        }
    }
}

/// The Container Storage Interface v1.12, package `csi.v1`: the Identity,
/// Controller, GroupController, SnapshotMetadata and Node services.
pub mod csi {
    tonic::include_proto!("csi.v1");
}
