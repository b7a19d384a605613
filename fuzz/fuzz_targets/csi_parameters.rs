//! CSI StorageClass parameters ([`Parameters::parse`], what CreateVolume
//! and ValidateVolumeCapabilities check) and (group) snapshot class
//! parameters ([`snapshot_class_parameters`]: deadline, freeze, hooks),
//! from a map built out of the input: keys are mostly the known ones,
//! values anything.
//!
//! Must hold: no panic; accepted parameters have at least one replica and
//! distinct, non-empty allowed nodes; the external-provisioner's keys never
//! change the outcome.
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use ballast_csi::service::controller::{Parameters, snapshot_class_parameters};
use libfuzzer_sys::fuzz_target;

const KEYS: &[&str] = &[
    "replicas",
    "thin",
    "fsType",
    "allowedNodes",
    "replicaTopologyKey",
    "deadline",
    "ballast.io/freeze",
    "ballast.io/pre-hook",
    "ballast.io/post-hook",
    "ballast.io/hook-timeout",
    "csi.storage.k8s.io/volumesnapshot/name",
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/fstype",
];

#[derive(Debug, Arbitrary)]
struct Entry {
    key: u8,
    /// Used when `key` picks no known key.
    other_key: String,
    value: String,
}

fuzz_target!(|entries: Vec<Entry>| {
    let parameters: HashMap<String, String> = entries
        .into_iter()
        .map(|e| {
            let key = KEYS
                .get(usize::from(e.key))
                .map_or(e.other_key, |k| (*k).to_owned());
            (key, e.value)
        })
        .collect();
    let without_provisioner: HashMap<String, String> = parameters
        .iter()
        .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();

    let parsed = Parameters::parse(&parameters).ok();
    assert_eq!(parsed, Parameters::parse(&without_provisioner).ok());
    if let Some(parsed) = parsed {
        assert!(parsed.replicas >= 1);
        let nodes = &parsed.constraints.allowed_nodes;
        assert!(nodes.iter().all(|n| !n.is_empty()));
        let mut unique = nodes.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), nodes.len(), "allowed nodes are distinct");
    }
    let class = snapshot_class_parameters(&parameters).ok();
    assert_eq!(class, snapshot_class_parameters(&without_provisioner).ok());
});
