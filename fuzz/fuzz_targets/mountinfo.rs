//! `/proc/self/mountinfo` as the kernel writes it (bytes, not necessarily
//! UTF-8), parsed by the one mountinfo parser both the agent and the node
//! plugin use ([`mountinfo::parse_bytes`], which `mountinfo::read` calls).
//!
//! Must hold: no panic; a table that parses has one entry per line that is
//! not blank, and its fields that cannot hold a space (options, types) hold
//! none.
#![no_main]

use ballast_storage_node::host::mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(entries) = mountinfo::parse_bytes(input) {
        let lines = input
            .split(|&b| b == b'\n')
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .count();
        assert_eq!(entries.len(), lines, "one entry per line");
        for entry in &entries {
            assert!(!entry.mount_options.contains(' ') && !entry.fs_type.contains(' '));
            let _ = (entry.read_only(), entry.dev());
        }
    }
    if let Ok(text) = std::str::from_utf8(input) {
        assert_eq!(
            mountinfo::parse(text).ok(),
            mountinfo::parse_bytes(input).ok()
        );
    }
});
