//! The Ballast storage agent: what runs on every node.
//!
//! - [`pool`] formats and imports the node's disks (XFS with reflink) and
//!   accounts for their capacity.
//! - [`replica`] owns replica files and their metadata inside pools.
//! - [`durable`] replaces small files atomically and durably (pool labels,
//!   replica metadata).
//! - [`uring`] is the I/O engine: threads that own io_uring rings and execute
//!   O_DIRECT reads, writes, syncs and fallocates for the rest of the agent.
//! - [`block`] is the [`block::BlockDevice`] trait that exports serve.
//! - [`replication`] is the replica protocol between targets and replicas on
//!   other nodes, and the epoch fencing every replica applies.
//! - [`target`] is the per-volume I/O front end of a published volume:
//!   replication fan-out, failover through the controller, rebuild.
//! - [`nbd`] is the NBD server (fixed newstyle handshake, transmission phase).
//! - [`api`] is the agent's gRPC API; [`agent`] wires everything together.
//! - [`host`] runs host tools with a deadline, reads the mount table and
//!   drives loop devices, for the agent and the CSI plugins alike.
//! - [`registration`] registers the node with the controller and sends
//!   heartbeats (only with `--controller`).
//!
//! The agent holds no cluster state: everything it knows is on its own disks.

pub mod agent;
pub mod api;
pub mod block;
pub mod buf;
pub mod durable;
pub mod exports;
pub mod host;
pub mod nbd;
pub mod pool;
pub mod registration;
pub mod replica;
pub mod replication;
pub mod target;
pub mod uring;
