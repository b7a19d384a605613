//! The NBD server that exports a [`BlockDevice`](crate::block::BlockDevice)
//! to NBD clients: the kernel's nbd driver, qemu, libnbd's tools, fio.
//!
//! It implements the NBD protocol as specified in `doc/proto.md` of the
//! NetworkBlockDevice/nbd project ("the spec" in these docs):
//! - fixed newstyle negotiation only, with `NBD_OPT_GO`, `NBD_OPT_INFO`,
//!   `NBD_OPT_EXPORT_NAME`, `NBD_OPT_LIST`, `NBD_OPT_ABORT` and
//!   `NBD_OPT_STRUCTURED_REPLY`; other options get `NBD_REP_ERR_UNSUP`;
//! - `NBD_CMD_READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES` (with
//!   `NO_HOLE`), `DISC`, and FUA; many requests in flight per connection,
//!   replies in completion order, several connections per export
//!   (`NBD_FLAG_CAN_MULTI_CONN`);
//! - simple replies, or structured replies when the client asks for them.
//!
//! Layout, one job per module:
//! - [`protocol`]: constants and byte layouts, no I/O;
//! - `export`: the export table, transmission flags and block sizes;
//! - `handshake`: the negotiation phase of one connection;
//! - `transmission`: the transmission phase of one connection;
//! - `server`: listeners, connection tasks and shutdown ([`NbdServer`]).
//!
//! What this module must never do: crash the process or grow memory without
//! bound because of what a client sends. Malformed input gets an error reply
//! when the stream can continue, and otherwise closes that one connection
//! (DESIGN.md, safety invariant 6). No TLS: exports are served on a unix
//! socket reachable only by root on the node (and on TCP for tests and
//! benchmarks).

mod export;
mod handshake;
pub mod protocol;
mod server;
mod transmission;

#[cfg(test)]
pub(crate) mod tests;

pub use export::{BLOCK_SIZES, Export, MAX_PAYLOAD};
pub use server::{Error, NbdServer, serve_stream};
