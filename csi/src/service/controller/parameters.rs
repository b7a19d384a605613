//! What a CreateVolume request asks for besides capabilities: the
//! StorageClass parameters, the capacity range and the topology
//! requirement, each checked.
//!
//! # StorageClass parameters
//!
//! - `replicas`: number of replicas, each on its own node (default 3).
//! - `thin`: `"true"` (default) or `"false"`.
//! - `fsType`: `ext4` (default) or `xfs`, for mount access when the
//!   capability names no `fs_type`.
//! - `allowedNodes`: comma-separated node ids; replicas go only to
//!   these (too few with room is `RESOURCE_EXHAUSTED`). Default: any node.
//! - `replicaTopologyKey`: a node topology label key (e.g.
//!   `topology.kubernetes.io/zone`); each replica goes to a node with a
//!   distinct value of it. Default: nodes are the failure domains.
//! - Keys under `csi.storage.k8s.io/` (added by the external-provisioner)
//!   are ignored; any other key is `INVALID_ARGUMENT`.
//!
//! To add one, parse it in [`Parameters::parse`], compare it in
//! [`differences`] (ValidateVolumeCapabilities) and, if it changes the
//! volume, in the volume operations' create compatibility check.

use std::collections::{BTreeMap, HashMap};

use ballast_proto::csi;

use super::{Error, invalid};
use crate::controller::node::Topology;
use crate::controller::volume::operations::SIZE_ALIGN_BYTES;
use crate::controller::volume::record::VolumeRecord;
use crate::controller::volume::scheduling::{
    ALLOWED_NODES_PARAMETER, Constraints, REPLICA_TOPOLOGY_KEY_PARAMETER,
};
use crate::node::mount::FsType;

/// Size of a volume whose request gives no capacity (CSI spec,
/// CreateVolume: "If not specified, the Plugin MAY choose an
/// implementation-defined capacity range").
pub const DEFAULT_SIZE_BYTES: u64 = 1 << 30;

/// Replicas of a volume whose StorageClass does not say.
pub const DEFAULT_REPLICAS: u32 = 3;

/// Prefix of the parameters the external-provisioner adds.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

const REPLICAS: &str = "replicas";
const THIN: &str = "thin";
const FS_TYPE: &str = "fsType";

/// StorageClass parameters, checked (public for the fuzz targets in
/// `fuzz/`, which drive [`Parameters::parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    /// `replicas`: at least 1.
    pub replicas: u32,
    /// `thin`.
    pub thin: bool,
    /// `fsType`; `None` when not given.
    pub fs_type: Option<FsType>,
    /// `allowedNodes` and `replicaTopologyKey`.
    pub constraints: Constraints,
}

impl Parameters {
    /// Parses `parameters`; absent keys take their defaults.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a bad value or an unknown key.
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, Error> {
        let mut parsed = Self {
            replicas: DEFAULT_REPLICAS,
            thin: true,
            fs_type: None,
            constraints: Constraints::from_parameters(parameters).map_err(invalid)?,
        };
        for (key, value) in parameters {
            match key.as_str() {
                REPLICAS => {
                    parsed.replicas = value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        invalid(format!(
                            "parameter replicas={value:?} is not a count of at least 1"
                        ))
                    })?;
                }
                THIN => {
                    parsed.thin = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "parameter thin={value:?} is not \"true\" or \"false\""
                            )));
                        }
                    };
                }
                FS_TYPE => {
                    parsed.fs_type = Some(FsType::parse(value).ok_or_else(|| {
                        invalid(format!("parameter fsType={value:?} is not ext4 or xfs"))
                    })?);
                }
                ALLOWED_NODES_PARAMETER | REPLICA_TOPOLOGY_KEY_PARAMETER => {}
                other if other.starts_with(PROVISIONER_PREFIX) => {}
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(parsed)
    }
}

/// The parameters as the volume record keeps them: without the
/// external-provisioner's keys, which name the claim, not the volume.
pub(super) fn to_keep(parameters: &HashMap<String, String>) -> BTreeMap<String, String> {
    parameters
        .iter()
        .filter(|(k, _)| !k.starts_with(PROVISIONER_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Why `given` parameters do not describe `volume` (CSI
/// ValidateVolumeCapabilities): each key given is compared with what the
/// volume was created with; keys not given are not compared.
pub(super) fn differences(given: &HashMap<String, String>, volume: &VolumeRecord) -> Vec<String> {
    let parsed = match Parameters::parse(given) {
        Ok(parsed) => parsed,
        Err(err) => return vec![err.to_string()],
    };
    let mut reasons = Vec::new();
    if given.contains_key(REPLICAS) && parsed.replicas != volume.replica_count {
        reasons.push(format!(
            "parameter replicas={} but the volume has {} replica(s)",
            parsed.replicas, volume.replica_count
        ));
    }
    if given.contains_key(THIN) && parsed.thin != volume.thin {
        reasons.push(format!(
            "parameter thin={} but the volume is {}",
            parsed.thin,
            if volume.thin { "thin" } else { "thick" }
        ));
    }
    // A record whose own parameters fail the check has no constraints.
    let kept = Constraints::from_parameters(&volume.parameters).unwrap_or_default();
    if given.contains_key(ALLOWED_NODES_PARAMETER)
        && sorted(&parsed.constraints.allowed_nodes) != sorted(&kept.allowed_nodes)
    {
        reasons.push(format!(
            "parameter {ALLOWED_NODES_PARAMETER}={:?} but the volume was created with {:?}",
            parsed.constraints.allowed_nodes.join(","),
            kept.allowed_nodes.join(",")
        ));
    }
    if given.contains_key(REPLICA_TOPOLOGY_KEY_PARAMETER)
        && parsed.constraints.failure_domain_key != kept.failure_domain_key
    {
        reasons.push(format!(
            "parameter {REPLICA_TOPOLOGY_KEY_PARAMETER}={:?} but the volume was created with {:?}",
            parsed.constraints.failure_domain_key.unwrap_or_default(),
            kept.failure_domain_key.unwrap_or_default()
        ));
    }
    if let (Some(wanted), Some(actual)) = (parsed.fs_type, volume.fs_type())
        && wanted.as_str() != actual
    {
        reasons.push(format!(
            "parameter fsType={wanted} but the volume holds {actual}"
        ));
    }
    reasons
}

fn sorted(ids: &[String]) -> Vec<&String> {
    let mut ids: Vec<&String> = ids.iter().collect();
    ids.sort();
    ids
}

/// The size to create for `range` (CSI spec, CapacityRange: at least
/// `required_bytes`, at most `limit_bytes`, either may be 0 for unset),
/// rounded up to [`SIZE_ALIGN_BYTES`].
///
/// # Errors
///
/// [`Error::InvalidArgument`] for negative bounds; [`Error::OutOfRange`]
/// if no aligned size lies within them.
pub(super) fn size_for(range: Option<&csi::CapacityRange>) -> Result<u64, Error> {
    let (required, limit) = bounds(range)?;
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let size = match (required, limit) {
        (0, 0) => DEFAULT_SIZE_BYTES,
        (0, limit) => DEFAULT_SIZE_BYTES.min(limit - limit % SIZE_ALIGN_BYTES),
        (required, _) => required
            .checked_next_multiple_of(SIZE_ALIGN_BYTES)
            .ok_or_else(|| Error::OutOfRange(format!("required_bytes {required} is too large")))?,
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Error::OutOfRange(format!(
            "no multiple of {SIZE_ALIGN_BYTES} bytes lies within [{required}, {limit}]"
        )));
    }
    if i64::try_from(size).is_err() {
        return Err(Error::OutOfRange(format!("{size} bytes is too large")));
    }
    Ok(size)
}

/// The sizes an existing volume may have to satisfy `range`: at least
/// `required_bytes`, at most `limit_bytes` (unbounded when 0).
///
/// # Errors
///
/// [`Error::InvalidArgument`] for negative bounds.
pub(super) fn sizes_within(
    range: Option<&csi::CapacityRange>,
) -> Result<std::ops::RangeInclusive<u64>, Error> {
    let (required, limit) = bounds(range)?;
    Ok(required..=if limit == 0 { u64::MAX } else { limit })
}

fn bounds(range: Option<&csi::CapacityRange>) -> Result<(u64, u64), Error> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let required =
        u64::try_from(required).map_err(|_| invalid("capacity_range.required_bytes < 0"))?;
    let limit = u64::try_from(limit).map_err(|_| invalid("capacity_range.limit_bytes < 0"))?;
    Ok((required, limit))
}

/// A topology requirement, checked (CSI spec, TopologyRequirement).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Requirement {
    /// Where the volume must be accessible from: every node is, so they
    /// restrict nothing; tried in order for one replica (data locality)
    /// when there are no preferred ones (ADR 0009).
    pub requisite: Vec<Topology>,
    /// Tried in order for one replica (data locality).
    pub preferred: Vec<Topology>,
}

impl Requirement {
    /// Checks `requirement`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if it names neither requisite nor
    /// preferred segments (the spec requires one of them), or a segment
    /// is empty.
    pub fn parse(requirement: Option<&csi::TopologyRequirement>) -> Result<Self, Error> {
        let Some(requirement) = requirement else {
            return Ok(Self::default());
        };
        if requirement.requisite.is_empty() && requirement.preferred.is_empty() {
            return Err(invalid(
                "accessibility_requirements names neither requisite nor preferred topologies",
            ));
        }
        let segments = |list: &[csi::Topology], field: &str| {
            list.iter()
                .map(|t| {
                    if t.segments.is_empty() {
                        return Err(invalid(format!(
                            "accessibility_requirements.{field} holds an empty topology"
                        )));
                    }
                    Ok(t.segments
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Topology>())
                })
                .collect::<Result<Vec<_>, Error>>()
        };
        Ok(Self {
            requisite: segments(&requirement.requisite, "requisite")?,
            preferred: segments(&requirement.preferred, "preferred")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_respect_the_capacity_range() {
        let range = |required, limit| {
            size_for(Some(&csi::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }))
            .ok()
        };
        assert_eq!(size_for(None).ok(), Some(DEFAULT_SIZE_BYTES));
        assert_eq!(range(1, 0), Some(4096));
        assert_eq!(range(4096, 4096), Some(4096));
        assert_eq!(
            range(0, 10_000),
            Some(8192),
            "largest aligned size within the limit"
        );
        assert_eq!(range(0, 4095), None);
        assert_eq!(range(5000, 6000), None);
        assert_eq!(range(-1, 0), None);
        let within = |required, limit| {
            sizes_within(Some(&csi::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }))
            .ok()
        };
        assert_eq!(within(10, 0), Some(10..=u64::MAX));
        assert_eq!(within(0, 8192), Some(0..=8192));
    }

    #[test]
    fn parameters_take_defaults_and_refuse_unknown_keys() {
        let parse = |pairs: &[(&str, &str)]| {
            Parameters::parse(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let defaults = parse(&[("csi.storage.k8s.io/pvc/name", "data")]).expect("parse");
        assert_eq!(
            defaults,
            Parameters {
                replicas: DEFAULT_REPLICAS,
                thin: true,
                fs_type: None,
                constraints: Constraints::default(),
            }
        );
        let placed = parse(&[
            ("allowedNodes", "node-1, node-3"),
            ("replicaTopologyKey", "topology.kubernetes.io/zone"),
        ])
        .expect("parse");
        assert_eq!(
            placed.constraints,
            Constraints {
                allowed_nodes: vec!["node-1".into(), "node-3".into()],
                failure_domain_key: Some("topology.kubernetes.io/zone".into()),
            }
        );
        for (key, value, says) in [
            ("allowedNodes", "", "empty node id"),
            ("allowedNodes", "node-1,,node-2", "empty node id"),
            ("allowedNodes", "node-1,node-1", "twice"),
            ("allowedNodes", "node 1", "allowedNodes"),
            ("replicaTopologyKey", " ", "is empty"),
        ] {
            let err = parse(&[(key, value)]).expect_err(value);
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(says)),
                "{key}={value:?}: {err:?}"
            );
        }
        assert!(parse(&[("replicas", "0")]).is_err());
        assert!(parse(&[("thin", "yes")]).is_err());
        assert!(parse(&[("fsType", "btrfs")]).is_err());
        assert!(parse(&[("colour", "red")]).is_err());
        let kept = to_keep(&HashMap::from([
            ("replicas".to_string(), "2".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]));
        assert_eq!(
            kept,
            BTreeMap::from([("replicas".to_string(), "2".to_string())])
        );
    }

    #[test]
    fn a_requirement_needs_segments() {
        assert_eq!(Requirement::parse(None).ok(), Some(Requirement::default()));
        let empty = csi::TopologyRequirement::default();
        assert!(Requirement::parse(Some(&empty)).is_err());
        let blank = csi::TopologyRequirement {
            requisite: vec![csi::Topology::default()],
            preferred: Vec::new(),
        };
        assert!(Requirement::parse(Some(&blank)).is_err());
    }
}
