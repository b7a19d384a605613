//! The CSI node plugin's machinery: attach a volume's NBD export as a block
//! device, put a filesystem on it, mount it, and bind it into pods.
//!
//! - [`attach`]: NBD export to block device and back (nbdfuse + loop, or the
//!   kernel's nbd driver), rediscovered from the system after a restart.
//! - [`mount`]: filesystem detection and creation, mounts, bind mounts,
//!   online growth and capacity, read from the kernel's mount table.
//! - [`staging`]: NodeStage, NodeUnstage, NodePublish, NodeUnpublish,
//!   NodeExpand and NodeGetVolumeStats as plain async functions over the two traits above, with the CSI
//!   idempotency and error rules.
//! - [`freeze`] and [`hook`]: quiescing a staged volume for an
//!   app-consistent snapshot (FIFREEZE/FITHAW, and the user's pre/post
//!   commands), reached through the agent's `QuiesceService`.
//!
//! The gRPC `Node` service is a thin layer on [`staging`].
//!
//! # What this code must never do
//!
//! Format a device that holds a filesystem, a partition table or any other
//! signature (DESIGN.md, safety invariant 6); leave a volume attached after
//! a failed stage; detach a device that is still mounted; or keep state in
//! memory that the system does not also hold, since the node plugin may be
//! restarted at any time.

pub mod attach;
pub mod freeze;
pub mod hook;
pub mod mount;
pub mod staging;

#[cfg(test)]
mod tests;

pub use crate::command::Error as CommandError;

/// The `publish_context` key under which ControllerPublishVolume returns
/// the volume's NBD URI (`nbd+unix:///<export>?socket=<path>`).
pub const PUBLISH_CONTEXT_NBD_URI: &str = "ballast.io/nbd-uri";
