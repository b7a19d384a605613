//! `/proc/self/mountinfo` text, parsed by the one mountinfo parser both
//! the agent and the node plugin use ([`mountinfo::parse`]).
//!
//! Must hold: no panic; a table that parses has one entry per non-blank
//! line, and its fields that cannot hold a space (options, types) hold
//! none.
#![no_main]

use ballast_storage_node::host::mountinfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The callers read the file as UTF-8 (read_to_string).
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    if let Ok(entries) = mountinfo::parse(text) {
        let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(entries.len(), lines, "one entry per line");
        for entry in &entries {
            assert!(!entry.mount_options.contains(' ') && !entry.fs_type.contains(' '));
            let _ = (entry.read_only(), entry.dev());
        }
    }
});
