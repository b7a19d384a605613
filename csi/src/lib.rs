//! The Ballast control plane.
//!
//! - [`controller`]: the controller process (`ballast-csi controller`): node
//!   registry, volumes, placement, publication, in-sync sets, reconcilers,
//!   and the management gRPC API.
//! - [`store`]: the cluster store the controller keeps its state in.
//! - [`cluster`]: starts and stops a whole cluster on one machine (the
//!   `ballast cluster` commands, and the integration tests).
//! - [`demo`]: `ballast demo`, the end-to-end story with PostgreSQL on a
//!   volume through a node failure and a failover; its PostgreSQL and
//!   pgbench drivers are reused by the integration tests.
//! - [`node`]: the node plugin's attach (nbdfuse + loop, kernel nbd), mount
//!   and stage/publish logic; the CSI Node service is built on it.
//! - [`service`]: the CSI gRPC services (Identity, Controller, Node) that
//!   `ballast-csi controller` and `ballast-csi node` serve on unix sockets.
//!
//! The operator CLI lives in `src/bin/ballast`.

pub mod cluster;
/// Host tools run with a deadline: the agent's implementation, shared.
pub use ballast_storage_node::host::command;
pub mod controller;
pub mod demo;
pub mod node;
pub mod service;
pub mod store;

/// Formats an error and its sources as "a: b: c": the agent's, shared.
pub(crate) use ballast_storage_node::error_chain;
