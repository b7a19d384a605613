//! Generated gRPC types and services of Ballast.
//!
//! `agent` is the storage agent's API (pools, replicas, exports, targets),
//! served by `ballast-agent`; `controller` is the controller's management
//! API (nodes, volumes, and the in-sync set changes targets ask for).
//! The `.proto` files under `proto/ballast/` are the wire contract: field
//! numbers are never reused.

#![allow(missing_docs, clippy::all)]

/// The storage agent API, package `ballast.agent.v1`.
pub mod agent {
    tonic::include_proto!("ballast.agent.v1");
}

/// The controller's management API, package `ballast.controller.v1`.
pub mod controller {
    tonic::include_proto!("ballast.controller.v1");
}
