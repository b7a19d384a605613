//! End-to-end suites: real `ballast-agent` processes served to real NBD
//! clients (nbdinfo, qemu-io, qemu-img, nbdcopy, nbdfuse, fio, libnbd), and
//! whole local clusters (controller and agents) driven through the CLI.
//!
//! Every test runs as root (loop devices, mounts, FUSE). Fixtures in
//! [`harness`] tear everything down even when an assertion fails.

mod app_consistent;
mod bad_input;
mod cluster;
mod crash;
mod csi;
mod csi_controller;
mod csi_errors;
mod csi_node;
mod csi_snapshots;
mod demo;
mod export_fence;
mod filesystem;
mod group_snapshots;
mod harness;
mod nbd_clients;
mod netcut;
mod pools;
mod replica_states;
mod replication;
mod snapshot_copies;
mod snapshot_postgres;
mod snapshots;
