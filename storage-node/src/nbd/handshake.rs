//! The negotiation phase of one connection (spec "Handshake").
//!
//! This module owns fixed newstyle negotiation, from the server's greeting up
//! to the moment both sides enter transmission (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`) or the client aborts. Oldstyle and non-fixed
//! newstyle clients are refused by closing the connection.
//!
//! Invariants:
//! - Nothing a client sends can make this module allocate more than
//!   [`MAX_OPTION_DATA`] bytes or panic; option data above that is skipped
//!   through the read buffer (answered with `NBD_REP_ERR_TOO_BIG`), and data
//!   above [`OPTION_DISCARD_LIMIT`] is treated as a denial of service
//!   (hard disconnect, as the spec's "Termination of the session during
//!   option haggling" permits).
//! - An option this server does not know gets `NBD_REP_ERR_UNSUP` and the
//!   client may go on negotiating.
//!
//! To support a new option, add a match arm to [`Negotiation::handle`]; it
//! appends its replies to the output buffer and decides whether negotiation
//! ends.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::export::{BLOCK_SIZES, Export, ExportTable, transmission_flags};
use super::protocol::{
    self, InfoRequest, OptionHeader, client_flag, handshake_flag, info, opt, rep,
};

/// Largest option data in bytes that is read into memory and parsed.
///
/// The biggest legitimate option this server parses is `NBD_OPT_GO` with a
/// maximal 4096-byte export name, its framing and a list of information
/// requests; 8 KiB holds that with room to spare.
pub const MAX_OPTION_DATA: usize = 8 << 10;

/// Largest option data in bytes that is skipped (and answered with
/// `NBD_REP_ERR_TOO_BIG`) rather than treated as an attack that closes the
/// connection.
pub const OPTION_DISCARD_LIMIT: usize = 1 << 20;

/// Handshake flags this server sends.
const HANDSHAKE_FLAGS: u16 = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;

/// Client flags this server understands.
const KNOWN_CLIENT_FLAGS: u32 = client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES;

/// Errors that end negotiation by closing the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client closed the connection.
    #[error("Client closed the connection during negotiation")]
    Closed,
    /// Reading from or writing to the client failed.
    #[error("Negotiation I/O failed")]
    Io(#[source] io::Error),
    /// The client set flags this server did not advertise or know.
    #[error("Client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[error("Client does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    /// An option header or `NBD_OPT_EXPORT_NAME` name was malformed.
    #[error("Malformed option")]
    Protocol(#[source] protocol::Error),
    /// Option data larger than [`OPTION_DISCARD_LIMIT`].
    #[error("Option {option} announces {length} bytes of data")]
    OptionTooLarge {
        /// The option type.
        option: u32,
        /// Announced data length in bytes.
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the spec
    /// requires closing the connection.
    #[error("Client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

impl Error {
    /// True if the client broke the protocol (worth a warning), false if the
    /// connection merely went away.
    pub fn is_violation(&self) -> bool {
        !matches!(self, Error::Closed | Error::Io(_))
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Closed
        } else {
            Error::Io(e)
        }
    }
}

/// How negotiation ended without error.
#[derive(Debug)]
pub enum Negotiated {
    /// Both sides enter the transmission phase on `export`.
    Transmission {
        /// The selected export.
        export: Arc<Export>,
        /// Whether `NBD_OPT_STRUCTURED_REPLY` was negotiated.
        structured_replies: bool,
    },
    /// The client sent `NBD_OPT_ABORT`; close the connection.
    Aborted,
}

/// Runs fixed newstyle negotiation on a fresh connection.
///
/// `reader` must be the buffered reader the transmission phase continues
/// with, since the client may pipeline its first requests behind
/// `NBD_OPT_GO`.
///
/// # Errors
/// See [`Error`]; every error means the connection must be closed.
///
/// # Cancel safety
/// Not cancel safe: dropping the future mid-way leaves the stream at an
/// unknown position, so the connection must then be closed.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &ExportTable,
) -> Result<Negotiated, Error>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .write_all(&protocol::greeting(HANDSHAKE_FLAGS))
        .await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(Error::UnknownClientFlags(client_flags));
    }
    if client_flags & client_flag::FIXED_NEWSTYLE == 0 {
        return Err(Error::NotFixedNewstyle);
    }
    let mut negotiation = Negotiation {
        exports,
        no_zeroes: client_flags & client_flag::NO_ZEROES != 0,
        structured_replies: false,
    };

    let mut data = Vec::new();
    let mut out = Vec::with_capacity(256);
    loop {
        let mut header = [0u8; protocol::OPTION_HEADER_LEN];
        reader.read_exact(&mut header).await?;
        let header = OptionHeader::decode(&header).map_err(Error::Protocol)?;
        let length = header.length as usize;
        out.clear();

        let outcome = if length > MAX_OPTION_DATA {
            // NBD_OPT_EXPORT_NAME cannot be answered with an error, and a name
            // this long is invalid anyway.
            if length > OPTION_DISCARD_LIMIT || header.option == opt::EXPORT_NAME {
                return Err(Error::OptionTooLarge {
                    option: header.option,
                    length: header.length,
                });
            }
            skip(reader, length).await?;
            debug!(
                option = header.option,
                length, "Refusing option with oversized data"
            );
            protocol::push_option_reply(
                &mut out,
                header.option,
                rep::ERR_TOO_BIG,
                b"Option data too large",
            );
            None
        } else {
            data.resize(length, 0);
            reader.read_exact(&mut data).await?;
            negotiation.handle(header.option, &data, &mut out)?
        };

        match outcome {
            Some(Negotiated::Aborted) => {
                // The client may already have hung up without waiting for the
                // acknowledgement (spec: `NBD_OPT_ABORT`); that is fine.
                let _ = writer.write_all(&out).await;
                let _ = writer.flush().await;
                return Ok(Negotiated::Aborted);
            }
            outcome => {
                writer.write_all(&out).await?;
                writer.flush().await?;
                if let Some(done) = outcome {
                    return Ok(done);
                }
            }
        }
    }
}

/// Consumes `length` bytes through the reader's own buffer, allocating
/// nothing.
async fn skip<R: AsyncBufRead + Unpin>(reader: &mut R, mut length: usize) -> Result<(), Error> {
    while length > 0 {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(Error::Closed);
        }
        let n = available.len().min(length);
        reader.consume(n);
        length -= n;
    }
    Ok(())
}

/// The state of negotiation on one connection.
struct Negotiation<'a> {
    exports: &'a ExportTable,
    no_zeroes: bool,
    structured_replies: bool,
}

impl Negotiation<'_> {
    /// Handles one option with its data, appending the replies to `out`.
    /// Returns `Some` when negotiation ends.
    fn handle(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Negotiated>, Error> {
        match option {
            opt::EXPORT_NAME => {
                let name = protocol::decode_string(data).map_err(Error::Protocol)?;
                let Some(export) = self.exports.lookup(name) else {
                    return Err(Error::UnknownExport(name.to_owned()));
                };
                protocol::push_export_name_reply(
                    out,
                    export.device.size_bytes(),
                    transmission_flags(self.structured_replies),
                    self.no_zeroes,
                );
                Ok(Some(self.enter(export)))
            }
            opt::ABORT => {
                // The spec says to ignore any data sent with NBD_OPT_ABORT.
                protocol::push_option_reply(out, option, rep::ACK, &[]);
                Ok(Some(Negotiated::Aborted))
            }
            opt::LIST => {
                if !data.is_empty() {
                    invalid(out, option, "NBD_OPT_LIST takes no data");
                    return Ok(None);
                }
                for export in self.exports.iter() {
                    protocol::push_rep_server(out, &export.name);
                }
                protocol::push_option_reply(out, option, rep::ACK, &[]);
                Ok(None)
            }
            opt::INFO | opt::GO => self.info(option, data, out),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    invalid(out, option, "NBD_OPT_STRUCTURED_REPLY takes no data");
                    return Ok(None);
                }
                self.structured_replies = true;
                protocol::push_option_reply(out, option, rep::ACK, &[]);
                Ok(None)
            }
            _ => {
                // Includes NBD_OPT_STARTTLS (we run in NOTLS mode, where
                // ERR_UNSUP is allowed), the metadata context options and
                // extended headers.
                debug!(option, "Unsupported option");
                protocol::push_option_reply(
                    out,
                    option,
                    rep::ERR_UNSUP,
                    b"Option not supported by this server",
                );
                Ok(None)
            }
        }
    }

    /// Handles `NBD_OPT_INFO` and `NBD_OPT_GO` (spec "`NBD_OPT_INFO` and
    /// `NBD_OPT_GO`").
    fn info(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Negotiated>, Error> {
        let request = match InfoRequest::decode(data) {
            Ok(request) => request,
            Err(e) => {
                debug!(option, error = %e, "Invalid information request");
                invalid(out, option, "Malformed NBD_OPT_INFO/NBD_OPT_GO data");
                return Ok(None);
            }
        };
        let Some(export) = self.exports.lookup(request.name) else {
            protocol::push_option_reply(out, option, rep::ERR_UNKNOWN, b"No such export");
            return Ok(None);
        };
        protocol::push_info_export(
            out,
            option,
            export.device.size_bytes(),
            transmission_flags(self.structured_replies),
        );
        // Sent even when not requested (the spec allows unrequested
        // information): our minimum equals the default, so a client that
        // ignores it is still served correctly.
        protocol::push_info_block_size(out, option, BLOCK_SIZES);
        if request.requests.contains(&info::NAME) {
            protocol::push_info_text(out, option, info::NAME, &export.name);
        }
        protocol::push_option_reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            Ok(Some(self.enter(export)))
        } else {
            Ok(None)
        }
    }

    fn enter(&self, export: &Arc<Export>) -> Negotiated {
        Negotiated::Transmission {
            export: export.clone(),
            structured_replies: self.structured_replies,
        }
    }
}

fn invalid(out: &mut Vec<u8>, option: u32, message: &str) {
    protocol::push_option_reply(out, option, rep::ERR_INVALID, message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::Export;
    use crate::nbd::protocol::{magic, tx_flag};
    use crate::nbd::tests::MemDevice;

    fn table() -> ExportTable {
        let export = |name: &str, size| Export {
            name: name.to_owned(),
            device: Arc::new(MemDevice::new(size)),
        };
        ExportTable::new(export("vol", 1 << 20), vec![export("other", 4096)]).expect("valid")
    }

    /// Splits a server output into (option, reply type, data) triples.
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(&out[0..8], &magic::OPTION_REPLY.to_be_bytes());
            let option = u32::from_be_bytes(out[8..12].try_into().expect("4 bytes"));
            let kind = u32::from_be_bytes(out[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(out[16..20].try_into().expect("4 bytes")) as usize;
            v.push((option, kind, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_describes_export_and_enters_transmission() {
        let table = table();
        let mut n = Negotiation {
            exports: &table,
            no_zeroes: false,
            structured_replies: false,
        };
        let mut out = Vec::new();
        let done = n
            .handle(opt::GO, &go_data("", &[info::NAME]), &mut out)
            .expect("no error");
        match done {
            Some(Negotiated::Transmission {
                export,
                structured_replies,
            }) => {
                assert_eq!(export.name, "vol");
                assert!(!structured_replies);
            }
            other => panic!("unexpected {other:?}"),
        }
        let r = replies(&out);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].1, rep::INFO);
        assert_eq!(&r[0].2[0..2], &info::EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([r[0].2[10], r[0].2[11]]);
        assert_ne!(flags & tx_flag::CAN_MULTI_CONN, 0);
        assert_eq!(&r[1].2[0..2], &info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(&r[2].2[0..2], &info::NAME.to_be_bytes());
        assert_eq!(&r[2].2[2..], b"vol");
        assert_eq!(r[3].1, rep::ACK);
    }

    #[test]
    fn info_does_not_end_negotiation_and_unknown_names_fail() {
        let table = table();
        let mut n = Negotiation {
            exports: &table,
            no_zeroes: false,
            structured_replies: false,
        };
        let mut out = Vec::new();
        let done = n
            .handle(opt::INFO, &go_data("other", &[]), &mut out)
            .expect("no error");
        assert!(done.is_none());
        assert_eq!(replies(&out).last().map(|r| r.1), Some(rep::ACK));

        out.clear();
        let done = n
            .handle(opt::GO, &go_data("missing", &[]), &mut out)
            .expect("no error");
        assert!(done.is_none());
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);

        out.clear();
        let done = n.handle(opt::GO, &[0, 0], &mut out).expect("no error");
        assert!(done.is_none());
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn export_name_honours_no_zeroes_and_closes_on_unknown() {
        let table = table();
        for (no_zeroes, expected_len) in [(false, 134), (true, 10)] {
            let mut n = Negotiation {
                exports: &table,
                no_zeroes,
                structured_replies: false,
            };
            let mut out = Vec::new();
            let done = n.handle(opt::EXPORT_NAME, b"other", &mut out);
            assert!(matches!(done, Ok(Some(Negotiated::Transmission { .. }))));
            assert_eq!(out.len(), expected_len);
            assert_eq!(&out[0..8], &4096u64.to_be_bytes());
        }
        let mut n = Negotiation {
            exports: &table,
            no_zeroes: false,
            structured_replies: false,
        };
        let done = n.handle(opt::EXPORT_NAME, b"nope", &mut Vec::new());
        assert!(matches!(done, Err(Error::UnknownExport(name)) if name == "nope"));
    }

    #[test]
    fn list_structured_and_unknown_options() {
        let table = table();
        let mut n = Negotiation {
            exports: &table,
            no_zeroes: false,
            structured_replies: false,
        };
        let mut out = Vec::new();
        assert!(n.handle(opt::LIST, &[], &mut out).expect("ok").is_none());
        let r = replies(&out);
        let names: Vec<_> = r[..2].iter().map(|r| r.2[4..].to_vec()).collect();
        assert_eq!(names, [b"other".to_vec(), b"vol".to_vec()]);
        assert_eq!(r[2].1, rep::ACK);

        out.clear();
        n.handle(opt::LIST, &[1], &mut out).expect("ok");
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);

        out.clear();
        n.handle(opt::STRUCTURED_REPLY, &[], &mut out).expect("ok");
        assert_eq!(replies(&out)[0].1, rep::ACK);
        assert!(n.structured_replies);

        out.clear();
        n.handle(0xdead, &[1, 2, 3], &mut out).expect("ok");
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (0xdead, rep::ERR_UNSUP));
    }
}
