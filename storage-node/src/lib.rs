//! The Ballast storage agent: what runs on every node.
//!
//! - [`pool`] formats and imports the node's disks (XFS with reflink) and
//!   accounts for their capacity.
//! - [`replica`] owns replica files and their metadata inside pools.
//! - [`snapshot`] owns snapshot copies (reflinks of replicas) inside pools,
//!   and maps their allocated and changed ranges.
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
//! - [`guard`] is the per-volume operation guard (also the controller's).
//! - [`registration`] registers the node with the controller and sends
//!   heartbeats (only with `--controller`).
//!
//! The agent holds no cluster state: everything it knows is on its own disks.

pub mod agent;
pub mod api;
pub mod block;
pub mod buf;
pub mod durable;
pub mod guard;
pub mod host;
pub mod nbd;
pub mod pool;
pub mod raw_export;
pub mod registration;
pub mod replica;
pub mod replication;
pub mod snapshot;
pub mod target;
pub mod uring;

/// Formats an error followed by its causes as "a: b: c", for gRPC status
/// messages and logs that leave the process. The agent and the control
/// plane (`ballast_csi`) share this one.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Parses a size in bytes with an optional SI or IEC suffix (`512MiB`,
/// `4GiB`, `1Gi`, `10G`), for command-line flags of `ballast-agent` and
/// `ballast`.
///
/// # Errors
///
/// A message naming the text, for clap to print.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    text.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("invalid size {text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_joins_every_cause() {
        let chained = crate::host::command::Error::Spawn {
            program: "mkfs.xfs".into(),
            source: std::io::Error::other("not installed"),
        };
        assert_eq!(
            error_chain(&chained),
            "Cannot start mkfs.xfs: not installed"
        );
    }

    #[test]
    fn sizes_take_si_and_iec_suffixes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("10G"), Ok(10_000_000_000));
        assert!(parse_bytes("ten").is_err());
    }
}
