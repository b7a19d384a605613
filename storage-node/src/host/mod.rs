//! Helpers for the host both the agent and the CSI plugins run on: running
//! its tools with a deadline ([`command`]), reading its mount table
//! ([`mountinfo`]), driving its loop devices ([`loopdev`]) and stopping a
//! process for certain ([`process`]).
//!
//! They live in one place so the agent (`ballast-agent`) and the control
//! plane (`ballast-csi`, `ballast`, which depends on this library for them)
//! share one implementation with one behaviour: every tool call has a
//! deadline, a malformed mount table is an error, a loop device is found by
//! what the kernel reports in sysfs. Nothing here knows about pools,
//! volumes or CSI; a helper that needs such a term belongs with its caller.

pub mod command;
pub mod loopdev;
pub mod mountinfo;
pub mod process;
