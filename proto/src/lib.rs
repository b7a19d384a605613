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
}

/// The Container Storage Interface v1.12, package `csi.v1`: the Identity,
/// Controller, GroupController, SnapshotMetadata and Node services.
pub mod csi {
    tonic::include_proto!("csi.v1");
}
