//! Per-volume operation guards: the agent library's, shared (see
//! [`ballast_storage_node::guard`] for what they order and what they do not).

pub use ballast_storage_node::guard::{OpGuard, OpGuards};
