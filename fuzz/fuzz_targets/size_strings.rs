//! Sizes with SI or IEC suffixes (`512MiB`, `4GiB`, `10G`) as the
//! command-line flags of `ballast-agent` and `ballast` take them
//! ([`parse_bytes`]).
//!
//! Must hold: no panic; an accepted size printed as a plain number of
//! bytes parses to the same size.
#![no_main]

use ballast_storage_node::parse_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(bytes) = parse_bytes(text) {
        assert_eq!(parse_bytes(&bytes.to_string()), Ok(bytes));
    }
});
