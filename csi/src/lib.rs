//! The Ballast control plane.
//!
//! Today this crate holds the operator CLI (`src/bin/ballast`) and the
//! cluster store ([`store`]) the controller keeps its state in; the CSI
//! controller, node plugin and placement join it as they are built.

pub mod store;
