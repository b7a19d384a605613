//! Generated gRPC types and services of Ballast.
//!
//! `agent` is the storage agent's API (pools, replicas, exports), served by
//! `ballast-agent` and used by the operator CLI and, later, the controller.
//! The `.proto` files under `proto/ballast/` are the wire contract: field
//! numbers are never reused.

#![allow(missing_docs, clippy::all)]

/// The storage agent API, package `ballast.agent.v1`.
pub mod agent {
    tonic::include_proto!("ballast.agent.v1");
}
