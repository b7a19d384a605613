//! The Ballast control plane.
//!
//! Today this crate holds the operator CLI (`src/bin/ballast`), the
//! cluster store ([`store`]) the controller keeps its state in, and the node
//! plugin's attach, mount and stage logic ([`node`]); the CSI services and
//! placement join it as they are built.

pub mod node;
pub mod store;
