//! The Ballast control plane.
//!
//! Today this crate holds the operator CLI (`src/bin/ballast`); the CSI
//! controller, node plugin, placement and cluster store join it as they are
//! built.
