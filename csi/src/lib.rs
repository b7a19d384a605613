//! The Ballast control plane.
//!
//! - [`controller`]: the controller process (`ballast-csi controller`): node
//!   registry, volumes, placement, publication, in-sync sets, reconcilers,
//!   and the management gRPC API.
//! - [`store`]: the cluster store the controller keeps its state in.
//! - [`cluster`]: starts and stops a whole cluster on one machine (the
//!   `ballast cluster` commands, and the integration tests).
//!
//! The operator CLI lives in `src/bin/ballast`; the CSI node plugin joins
//! this crate later.

pub mod cluster;
pub mod controller;
pub mod store;
