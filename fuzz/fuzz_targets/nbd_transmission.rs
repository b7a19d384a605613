//! The NBD transmission phase fed from a byte stream: the first input byte
//! picks how a well-behaved client negotiates (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`, with or without structured replies and
//! `NO_ZEROES`), the rest is the stream of request headers and write
//! payloads it then sends, all through the server's real connection code on
//! an in-memory export.
//!
//! Must hold: no panic, no hang, and a request header the server accepts
//! re-encodes to the same bytes.
#![no_main]

use ballast_fuzz::serve_nbd;
use ballast_storage_node::nbd::protocol::{self, OptionHeader, Request, client_flag, opt};
use libfuzzer_sys::fuzz_target;

/// The client's bytes of a negotiation chosen by `style`.
fn negotiation(style: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut flags = client_flag::FIXED_NEWSTYLE;
    if style & 1 != 0 {
        flags |= client_flag::NO_ZEROES;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    let mut option = |option, data: &[u8]| {
        let header = OptionHeader {
            option,
            length: u32::try_from(data.len()).expect("short"),
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(data);
    };
    if style & 2 != 0 {
        option(opt::STRUCTURED_REPLY, &[]);
    }
    if style & 4 != 0 {
        option(opt::EXPORT_NAME, b"vol");
    } else {
        // The default export (empty name), asking for its name.
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&protocol::info::NAME.to_be_bytes());
        option(opt::GO, &go);
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&style, requests)) = input.split_first() else {
        return;
    };
    if let Some(bytes) = requests.get(..protocol::REQUEST_HEADER_LEN) {
        let bytes: &[u8; protocol::REQUEST_HEADER_LEN] = bytes.try_into().expect("28 bytes");
        if let Ok(request) = Request::decode(bytes) {
            assert_eq!(&request.encode(), bytes, "an accepted request re-encodes");
        }
    }
    let mut client = negotiation(style);
    client.extend_from_slice(requests);
    serve_nbd(&client);
});
