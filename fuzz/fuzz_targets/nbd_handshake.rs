//! NBD negotiation (fixed newstyle option haggling) as a client drives it:
//! the input is every byte a client sends, fed to the server's real
//! connection code, which negotiates and, if the client gets that far,
//! serves the transmission phase on an in-memory export.
//!
//! Must hold: no panic, no hang, the server's first bytes are its greeting,
//! and an option header the server accepts re-encodes to the same bytes.
#![no_main]

use ballast_fuzz::serve_nbd;
use ballast_storage_node::nbd::protocol::{self, OptionHeader, magic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|client: &[u8]| {
    // The first option header follows the 4 bytes of client flags.
    if let Some(bytes) = client.get(4..4 + protocol::OPTION_HEADER_LEN) {
        let bytes: &[u8; protocol::OPTION_HEADER_LEN] = bytes.try_into().expect("16 bytes");
        if let Ok(header) = OptionHeader::decode(bytes) {
            assert_eq!(
                &header.encode(),
                bytes,
                "an accepted option header re-encodes"
            );
        }
    }
    let (written, output) = serve_nbd(client);
    assert!(
        written >= protocol::GREETING_LEN as u64,
        "the server greets first"
    );
    assert_eq!(&output[..8], &magic::NBD.to_be_bytes());
    assert_eq!(&output[8..16], &magic::IHAVEOPT.to_be_bytes());
});
