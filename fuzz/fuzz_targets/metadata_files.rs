//! The files an agent reads back from its pools at start-up: a replica's
//! `<name>.meta.json`, a snapshot copy's `<id>.meta.json` and a pool's
//! `ballast-pool.json`. The first input byte picks the file, the rest is
//! its contents, parsed by the real readers' parse step.
//!
//! Must hold: no panic; a file that parses, written back the way the agent
//! writes it (pretty JSON), parses to the same value.
#![no_main]

use std::path::Path;

use ballast_storage_node::pool::PoolLabel;
use ballast_storage_node::replica::meta::ReplicaMeta;
use ballast_storage_node::snapshot::meta::CopyMeta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&kind, contents)) = input.split_first() else {
        return;
    };
    let path = Path::new("/fuzz/file.json");
    match kind % 3 {
        0 => {
            if let Ok(meta) = ReplicaMeta::parse(path, contents) {
                let json = serde_json::to_vec_pretty(&meta).expect("serializable");
                assert_eq!(ReplicaMeta::parse(path, &json).ok(), Some(meta));
            }
        }
        1 => {
            if let Ok(meta) = CopyMeta::parse(path, contents) {
                let json = serde_json::to_vec_pretty(&meta).expect("serializable");
                assert_eq!(CopyMeta::parse(path, &json).ok(), Some(meta));
            }
        }
        _ => {
            if let Ok(label) = PoolLabel::parse(path, contents) {
                let json = serde_json::to_vec_pretty(&label).expect("serializable");
                assert_eq!(PoolLabel::parse(path, &json).ok(), Some(label));
            }
        }
    }
});
