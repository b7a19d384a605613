//! The Ballast control plane.
//!
//! - [`controller`]: the controller process (`ballast-csi controller`): node
//!   registry, volumes, placement, publication, in-sync sets, reconcilers,
//!   and the management gRPC API.
//! - [`store`]: the cluster store the controller keeps its state in.
//! - [`cluster`]: starts and stops a whole cluster on one machine (the
//!   `ballast cluster` commands, and the integration tests).
//! - [`node`]: the node plugin's attach (nbdfuse + loop, kernel nbd), mount
//!   and stage/publish logic; the CSI Node service is built on it.
//! - [`service`]: the CSI gRPC services (Identity, Controller, Node) that
//!   `ballast-csi controller` and `ballast-csi node` serve on unix sockets.
//!
//! The operator CLI lives in `src/bin/ballast`.

pub mod cluster;
pub mod controller;
pub mod node;
pub mod service;
pub mod store;
