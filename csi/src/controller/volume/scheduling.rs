//! Replica placement: which nodes get a volume's replicas.
//!
//! A pure function of the nodes' liveness, topology and pool figures
//! ([`place`]), so it is tested without any process. The rules:
//!
//! - every replica on a distinct node that is up;
//! - with allowed nodes (the StorageClass's `allowedNodes`), only those;
//!   too few of them with room is an error, never a silent widening;
//! - with a failure-domain key (the StorageClass's `replicaTopologyKey`,
//!   e.g. `topology.kubernetes.io/zone`), every replica on a node with a
//!   distinct value of that topology label (nodes without it get none);
//!   without one, nodes are the failure domains;
//! - a node fits if one of its pools does, by the agent's own rule (the
//!   provisioned sum stays within the pool's overcommit limit; a thick
//!   replica also needs that much free space), so the agent will not refuse
//!   what placement chose unless the figures changed since the heartbeat;
//! - the preferred node (the operator's explicit choice) must fit and gets
//!   the first replica; otherwise the preferred segments (data locality:
//!   CSI preferred topology, else requisite, see ADR 0009) are tried in
//!   order and the first one with a fitting node gets the first replica,
//!   on its roomiest node (a segment may name a zone: any node in it).
//!   None fitting is not an error: the volume is reachable from every
//!   node, so CSI topology never restricts placement;
//! - the others are taken by most headroom (overcommit limit minus
//!   provisioned) of their best pool, then by node id, so placement is
//!   deterministic and spreads volumes over emptier nodes.
//!
//! This module must never read the store or call agents.

use std::collections::BTreeSet;

use crate::controller::node::{PoolCapacity, Topology, in_segment};

/// StorageClass parameter: comma-separated ids of the nodes replicas may
/// be placed on.
pub const ALLOWED_NODES_PARAMETER: &str = "allowedNodes";

/// StorageClass parameter: the node topology label whose values are the
/// failure domains replicas are spread across.
pub const REPLICA_TOPOLOGY_KEY_PARAMETER: &str = "replicaTopologyKey";

/// Errors of placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer nodes than replicas can hold one.
    #[error(
        "Not enough nodes: {needed} replica(s) of {size} ({kind}) need {needed} distinct up nodes with room, but only {fitting} of {up} up node(s) ({registered} registered) have room{excluded}"
    )]
    NotEnoughNodes {
        /// Replicas to place.
        needed: usize,
        /// Nodes that could take one.
        fitting: usize,
        /// Nodes that are up, allowed and not excluded.
        up: usize,
        /// Nodes registered.
        registered: usize,
        /// Replica size, for people.
        size: String,
        /// "thin" or "thick".
        kind: &'static str,
        /// A note on up nodes left out because they already hold the
        /// volume, are not among the allowed nodes or lack the failure
        /// domain label.
        excluded: String,
    },
    /// The nodes with room span fewer failure domains than replicas.
    #[error(
        "Not enough failure domains: {needed} replica(s) need {needed} distinct values of node label {key} (replicaTopologyKey) among up nodes with room, but only {free} are free ({taken} already hold a replica of the volume)"
    )]
    NotEnoughFailureDomains {
        /// Replicas to place.
        needed: usize,
        /// The topology label.
        key: String,
        /// Distinct values among fitting nodes not yet holding a replica.
        free: usize,
        /// Values already holding a replica of the volume.
        taken: usize,
    },
    /// A restore needs at least one replica on a node holding a copy of
    /// the snapshot, and none of them is up with room.
    #[error(
        "No node holding a copy of snapshot {snapshot} ({}) is up with room for a replica", nodes.join(", ")
    )]
    NoSourceCopy {
        /// The snapshot.
        snapshot: String,
        /// The nodes holding its copies.
        nodes: Vec<String>,
    },
    /// The preferred node cannot take a replica.
    #[error("Preferred node {node} cannot hold a replica: {reason}")]
    PreferredNode {
        /// The node.
        node: String,
        /// Why not.
        reason: String,
    },
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            // CSI spec, CreateVolume: no room for the volume is
            // RESOURCE_EXHAUSTED.
            Error::NotEnoughNodes { .. }
            | Error::NotEnoughFailureDomains { .. }
            | Error::PreferredNode { .. } => tonic::Status::resource_exhausted(err.to_string()),
            // The copies exist but cannot be reached now: retry later.
            Error::NoSourceCopy { .. } => tonic::Status::unavailable(err.to_string()),
        }
    }
}

/// A node as placement sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Node id.
    pub node_id: String,
    /// Whether its heartbeats arrive.
    pub up: bool,
    /// Its topology labels.
    pub topology: Topology,
    /// Its pools' latest figures.
    pub pools: Vec<PoolCapacity>,
}

impl Candidate {
    /// Whether the node lies in one of `segments`; every node does when
    /// there are none.
    pub fn in_any(&self, segments: &[Topology]) -> bool {
        segments.is_empty() || segments.iter().any(|s| in_segment(&self.topology, s))
    }

    /// The largest replica one of its pools can take.
    pub fn room_bytes(&self, thin: bool) -> u64 {
        self.pools
            .iter()
            .map(|p| p.room_bytes(thin))
            .max()
            .unwrap_or(0)
    }
}

/// Where a volume's replicas may go, from its StorageClass parameters
/// ([`ALLOWED_NODES_PARAMETER`], [`REPLICA_TOPOLOGY_KEY_PARAMETER`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Nodes replicas may be placed on; empty: any.
    pub allowed_nodes: Vec<String>,
    /// Node topology label whose values are the failure domains; `None`:
    /// nodes are.
    pub failure_domain_key: Option<String>,
}

impl Constraints {
    /// Reads the constraints from a volume's parameters; other keys are
    /// ignored.
    ///
    /// # Errors
    ///
    /// A message for people if `allowedNodes` is empty, names an empty or
    /// invalid node id or one twice, or `replicaTopologyKey` is empty.
    pub fn from_parameters<'a>(
        parameters: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Result<Self, String> {
        let mut constraints = Self::default();
        for (key, value) in parameters {
            match key.as_str() {
                ALLOWED_NODES_PARAMETER => {
                    let mut seen = BTreeSet::new();
                    for id in value.split(',').map(str::trim) {
                        if id.is_empty() {
                            return Err(format!(
                                "parameter {ALLOWED_NODES_PARAMETER}={value:?} holds an empty node id (give comma-separated node ids)"
                            ));
                        }
                        crate::controller::node::operations::validate_node_id(id).map_err(
                            |err| format!("parameter {ALLOWED_NODES_PARAMETER}={value:?}: {err}"),
                        )?;
                        if !seen.insert(id) {
                            return Err(format!(
                                "parameter {ALLOWED_NODES_PARAMETER}={value:?} names node {id:?} twice"
                            ));
                        }
                        constraints.allowed_nodes.push(id.to_string());
                    }
                }
                REPLICA_TOPOLOGY_KEY_PARAMETER => {
                    if value.trim().is_empty() {
                        return Err(format!(
                            "parameter {REPLICA_TOPOLOGY_KEY_PARAMETER} is empty (give a node topology label key, e.g. topology.kubernetes.io/zone)"
                        ));
                    }
                    constraints.failure_domain_key = Some(value.trim().to_string());
                }
                _ => {}
            }
        }
        Ok(constraints)
    }

    /// Whether replicas may be placed on `node_id`.
    pub fn allows(&self, node_id: &str) -> bool {
        self.allowed_nodes.is_empty() || self.allowed_nodes.iter().any(|n| n == node_id)
    }
}

/// What to place.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Size of each replica.
    pub size_bytes: u64,
    /// Thin (sparse) replicas need no free space up front.
    pub thin: bool,
    /// Number of replicas to place.
    pub count: usize,
    /// A node that must get one of them.
    pub preferred_node: Option<&'a str>,
    /// Segments tried in order for the first replica when there is no
    /// preferred node (data locality); none fitting is not an error.
    pub preferred: &'a [Topology],
    /// Allowed nodes and failure domains.
    pub constraints: &'a Constraints,
    /// Nodes that must not get any (they already hold one).
    pub exclude: &'a [String],
    /// Nodes holding replicas that stay: their failure domains are taken.
    pub holders: &'a [String],
}

/// Chooses `request.count` distinct nodes, the preferred one first.
///
/// # Errors
///
/// [`Error::PreferredNode`] if the preferred node is unknown, down,
/// excluded, not allowed, in a taken failure domain or full;
/// [`Error::NotEnoughNodes`] if fewer nodes fit than replicas are needed;
/// [`Error::NotEnoughFailureDomains`] if they span too few failure domains.
pub fn place(candidates: &[Candidate], request: &Request<'_>) -> Result<Vec<String>, Error> {
    let constraints = request.constraints;
    let key = constraints.failure_domain_key.as_deref();
    let excluded = |id: &str| request.exclude.iter().any(|e| e == id);
    // A node's failure domain: its id, or its value of the key (`None`:
    // it has no such label and gets no replica).
    let domain = |c: &Candidate| -> Option<String> {
        match key {
            None => Some(c.node_id.clone()),
            Some(k) => c.topology.get(k).cloned(),
        }
    };
    let usable = |c: &Candidate| c.up && !excluded(&c.node_id) && constraints.allows(&c.node_id);
    let mut taken: BTreeSet<String> = candidates
        .iter()
        .filter(|c| request.holders.contains(&c.node_id))
        .filter_map(domain)
        .collect();
    let already_taken = taken.len();
    let mut chosen: Vec<String> = Vec::with_capacity(request.count);
    if let Some(preferred) = request.preferred_node {
        let found = candidates.iter().find(|c| c.node_id == preferred);
        let reason = match found {
            None => Some("it is not registered".to_string()),
            Some(c) if !c.up => Some("it is down".to_string()),
            Some(_) if excluded(preferred) => {
                Some("it already holds a replica of the volume".to_string())
            }
            Some(_) if !constraints.allows(preferred) => {
                Some(format!("it is not among {ALLOWED_NODES_PARAMETER}"))
            }
            Some(c) if domain(c).is_none() => Some(format!(
                "it has no topology label {} ({REPLICA_TOPOLOGY_KEY_PARAMETER})",
                key.unwrap_or_default()
            )),
            Some(c) if domain(c).is_some_and(|d| taken.contains(&d)) => Some(format!(
                "its failure domain {} already holds a replica of the volume",
                domain(c).unwrap_or_default()
            )),
            Some(c) if best_headroom(c, request).is_none() => Some(format!(
                "none of its pools has room for {}",
                describe_size(request)
            )),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return Err(Error::PreferredNode {
                node: preferred.to_string(),
                reason,
            });
        }
        chosen.push(preferred.to_string());
        taken.extend(found.and_then(domain));
    }
    let mut fitting: Vec<(u64, &Candidate, String)> = candidates
        .iter()
        .filter(|c| usable(c))
        .filter_map(|c| Some((best_headroom(c, request)?, c, domain(c)?)))
        .collect();
    // Most headroom first; ties by node id for a deterministic choice.
    fitting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.node_id.cmp(&b.1.node_id)));
    let fitting_nodes = fitting.len();
    if chosen.is_empty() && request.count > 0 {
        let local = request.preferred.iter().find_map(|segment| {
            fitting
                .iter()
                .find(|(_, c, d)| in_segment(&c.topology, segment) && !taken.contains(d))
        });
        if let Some((_, c, d)) = local {
            chosen.push(c.node_id.clone());
            taken.insert(d.clone());
        }
    }
    fitting.retain(|(_, c, _)| !chosen.contains(&c.node_id));
    for (_, c, d) in &fitting {
        if chosen.len() >= request.count {
            break;
        }
        if taken.insert(d.clone()) {
            chosen.push(c.node_id.clone());
        }
    }
    if chosen.len() >= request.count {
        chosen.truncate(request.count);
        return Ok(chosen);
    }
    // The preferred node is usable, so it is among the fitting nodes.
    let placed_before_domains = fitting_nodes;
    if let Some(key) = key
        && placed_before_domains >= request.count
    {
        return Err(Error::NotEnoughFailureDomains {
            needed: request.count,
            key: key.to_string(),
            free: taken.len() - already_taken,
            taken: already_taken,
        });
    }
    let up = candidates.iter().filter(|c| usable(c)).count();
    let count_up =
        |f: &dyn Fn(&Candidate) -> bool| candidates.iter().filter(|c| c.up && f(c)).count();
    let excluded_up = count_up(&|c| excluded(&c.node_id));
    let outside_up = count_up(&|c| !excluded(&c.node_id) && !constraints.allows(&c.node_id));
    let unlabelled_up = count_up(&|c| usable(c) && domain(c).is_none());
    let mut notes = String::new();
    if excluded_up > 0 {
        notes.push_str(&format!(
            "; {excluded_up} other up node(s) already hold a replica of the volume"
        ));
    }
    if outside_up > 0 {
        notes.push_str(&format!(
            "; {outside_up} other up node(s) are not among {ALLOWED_NODES_PARAMETER}"
        ));
    }
    if unlabelled_up > 0 {
        notes.push_str(&format!(
            "; {unlabelled_up} up node(s) have no topology label {} ({REPLICA_TOPOLOGY_KEY_PARAMETER})",
            key.unwrap_or_default()
        ));
    }
    Err(Error::NotEnoughNodes {
        needed: request.count,
        fitting: placed_before_domains,
        up,
        registered: candidates.len(),
        size: bytes(request.size_bytes),
        kind: if request.thin { "thin" } else { "thick" },
        excluded: notes,
    })
}

/// What can still be provisioned (CSI GetCapacity), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// What new volumes may still take: in a segment, the room of its up
    /// nodes together; cluster-wide, the room of every up node together
    /// divided by the replica count (each volume byte is stored that many
    /// times).
    pub available_bytes: u64,
    /// The largest volume that can be created now (with one replica in
    /// the segment, if one is given).
    pub largest_volume_bytes: u64,
}

/// The capacity for volumes of `replicas` replicas, thin or thick, with
/// one replica in `segment` (anywhere if `None`). A node's room is what
/// its pools may still take by the agent's rule ([`PoolCapacity::fits`]).
/// Both figures are 0 when no volume fits at all, and multiples of `align`.
pub fn capacity(
    candidates: &[Candidate],
    segment: Option<&Topology>,
    replicas: usize,
    thin: bool,
    align: u64,
) -> Capacity {
    let up: Vec<&Candidate> = candidates.iter().filter(|c| c.up).collect();
    let in_scope = |c: &Candidate| segment.is_none_or(|s| in_segment(&c.topology, s));
    // The largest volume with one replica on `m`: `m`'s best pool, and
    // the (replicas-1)-th best among the other nodes.
    let largest = up
        .iter()
        .filter(|m| in_scope(m))
        .map(|m| {
            let mut others: Vec<u64> = up
                .iter()
                .filter(|o| o.node_id != m.node_id)
                .map(|o| o.room_bytes(thin))
                .collect();
            others.sort_unstable_by(|a, b| b.cmp(a));
            let rest = match replicas.checked_sub(2) {
                None => u64::MAX,
                Some(i) => others.get(i).copied().unwrap_or(0),
            };
            m.room_bytes(thin).min(rest)
        })
        .max()
        .unwrap_or(0);
    let largest = largest - largest % align.max(1);
    if largest == 0 || replicas == 0 {
        return Capacity {
            available_bytes: 0,
            largest_volume_bytes: 0,
        };
    }
    let total: u64 = up
        .iter()
        .filter(|c| in_scope(c))
        .flat_map(|c| c.pools.iter().map(|p| p.room_bytes(thin)))
        .fold(0, u64::saturating_add);
    let available = if segment.is_some() {
        total
    } else {
        total / u64::try_from(replicas).unwrap_or(u64::MAX)
    };
    Capacity {
        available_bytes: available - available % align.max(1),
        largest_volume_bytes: largest,
    }
}

/// The headroom of the candidate's roomiest pool that fits the request,
/// `None` if no pool fits.
fn best_headroom(candidate: &Candidate, request: &Request<'_>) -> Option<u64> {
    candidate
        .pools
        .iter()
        .filter(|p| p.fits(request.size_bytes, request.thin))
        .map(PoolCapacity::headroom_bytes)
        .max()
}

fn describe_size(request: &Request<'_>) -> String {
    format!(
        "{} ({})",
        bytes(request.size_bytes),
        if request.thin { "thin" } else { "thick" }
    )
}

/// Formats a byte count with IEC units.
pub(crate) fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(id: &str, up: bool, total: u64, free: u64, provisioned: u64) -> Candidate {
        Candidate {
            node_id: id.to_string(),
            up,
            topology: segment(id),
            pools: vec![PoolCapacity {
                name: "pool0".into(),
                total_bytes: total,
                free_bytes: free,
                provisioned_bytes: provisioned,
                overcommit_percent: 200,
            }],
        }
    }

    static ANYWHERE: Constraints = Constraints {
        allowed_nodes: Vec::new(),
        failure_domain_key: None,
    };

    fn request(count: usize, size: u64, thin: bool) -> Request<'static> {
        Request {
            size_bytes: size,
            thin,
            count,
            preferred_node: None,
            preferred: &[],
            constraints: &ANYWHERE,
            exclude: &[],
            holders: &[],
        }
    }

    fn zoned(id: &str, zone: &str, provisioned: u64) -> Candidate {
        let mut candidate = node(id, true, 4 * GIB, 4 * GIB, provisioned);
        candidate.topology.insert(ZONE.into(), zone.into());
        candidate
    }

    const ZONE: &str = "topology.kubernetes.io/zone";

    fn segment(node: &str) -> Topology {
        Topology::from([(
            crate::controller::node::TOPOLOGY_NODE_KEY.to_string(),
            node.to_string(),
        )])
    }

    #[test]
    fn replicas_go_to_distinct_nodes_with_most_headroom_first() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 3 * GIB),
            node("b", true, 4 * GIB, 4 * GIB, 0),
            node("c", true, 4 * GIB, 4 * GIB, GIB),
            node("d", true, 4 * GIB, 4 * GIB, 0),
        ];
        let placed = place(&nodes, &request(3, GIB, true)).expect("placement");
        assert_eq!(placed, ["b", "d", "c"]);
    }

    #[test]
    fn down_nodes_are_never_chosen() {
        let nodes = [
            node("a", false, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 0),
        ];
        assert_eq!(place(&nodes, &request(1, GIB, true)).expect("one"), ["b"]);
        let err = place(&nodes, &request(2, GIB, true)).expect_err("only one up");
        assert!(
            matches!(
                err,
                Error::NotEnoughNodes {
                    needed: 2,
                    fitting: 1,
                    up: 1,
                    registered: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("only 1 of 1 up node(s)"), "{err}");
    }

    #[test]
    fn thick_replicas_need_free_space_thin_ones_the_overcommit_limit() {
        // 4 GiB pool, 1 GiB free, 6 GiB provisioned of an 8 GiB limit.
        let nodes = [node("a", true, 4 * GIB, GIB, 6 * GIB)];
        assert!(
            place(&nodes, &request(1, 2 * GIB, true)).is_ok(),
            "thin fits the limit"
        );
        assert!(
            place(&nodes, &request(1, 3 * GIB, true)).is_err(),
            "thin beyond the overcommit limit"
        );
        assert!(
            place(&nodes, &request(1, 2 * GIB, false)).is_err(),
            "thick needs free space"
        );
        assert!(place(&nodes, &request(1, GIB, false)).is_ok());
    }

    #[test]
    fn a_volume_larger_than_any_pool_fits_nowhere() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 0),
        ];
        let err = place(&nodes, &request(1, 9 * GIB, true)).expect_err("too big");
        assert!(err.to_string().contains("only 0 of 2 up node(s)"), "{err}");
    }

    #[test]
    fn the_preferred_node_comes_first_and_must_fit() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 3 * GIB),
            node("c", false, 4 * GIB, 4 * GIB, 0),
        ];
        let mut req = request(2, GIB, true);
        req.preferred_node = Some("b");
        assert_eq!(place(&nodes, &req).expect("placement"), ["b", "a"]);
        for (preferred, reason) in [("c", "down"), ("zz", "not registered"), ("b", "no room")] {
            let mut req = request(1, if reason == "no room" { 6 * GIB } else { GIB }, true);
            req.preferred_node = Some(preferred);
            let err = place(&nodes, &req).expect_err(reason);
            assert!(
                matches!(err, Error::PreferredNode { .. }),
                "{reason}: {err:?}"
            );
        }
    }

    #[test]
    fn excluded_nodes_are_skipped_and_named_in_the_error() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 0),
        ];
        let exclude = vec!["a".to_string()];
        let mut req = request(1, GIB, true);
        req.exclude = &exclude;
        assert_eq!(place(&nodes, &req).expect("placement"), ["b"]);
        let exclude = vec!["a".to_string(), "b".to_string()];
        req.exclude = &exclude;
        let err = place(&nodes, &req).expect_err("all excluded");
        assert!(err.to_string().contains("already hold a replica"), "{err}");
    }

    #[test]
    fn a_node_fits_if_any_of_its_pools_does() {
        let mut candidate = node("a", true, GIB, GIB, 2 * GIB);
        candidate.pools.push(PoolCapacity {
            name: "big".into(),
            total_bytes: 8 * GIB,
            free_bytes: 8 * GIB,
            provisioned_bytes: 0,
            overcommit_percent: 100,
        });
        assert_eq!(
            place(&[candidate], &request(1, 4 * GIB, false)).expect("fits"),
            ["a"]
        );
    }

    #[test]
    fn allowed_nodes_limit_every_replica() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 3 * GIB),
            node("c", true, 4 * GIB, 4 * GIB, GIB),
        ];
        let allowed = Constraints {
            allowed_nodes: vec!["b".into(), "c".into()],
            failure_domain_key: None,
        };
        let mut req = request(2, GIB, true);
        req.constraints = &allowed;
        assert_eq!(
            place(&nodes, &req).expect("placement"),
            ["c", "b"],
            "a has the most headroom but is not allowed"
        );
        req.count = 3;
        let err = place(&nodes, &req).expect_err("only two nodes allowed");
        assert!(matches!(err, Error::NotEnoughNodes { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("1 other up node(s) are not among allowedNodes"),
            "{err}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::ResourceExhausted
        );
        let mut strict = request(1, GIB, true);
        strict.constraints = &allowed;
        strict.preferred_node = Some("a");
        assert!(matches!(
            place(&nodes, &strict),
            Err(Error::PreferredNode { .. })
        ));
        // A preferred segment outside the allowed nodes is only a wish.
        let preferred = [segment("a")];
        let mut local = request(1, GIB, true);
        local.constraints = &allowed;
        local.preferred = &preferred;
        assert_eq!(place(&nodes, &local).expect("placement"), ["c"]);
    }

    #[test]
    fn the_first_preferred_node_gets_a_replica_and_the_others_go_anywhere() {
        let nodes = [
            node("node-1", true, 4 * GIB, 4 * GIB, 3 * GIB),
            node("node-2", true, 4 * GIB, 4 * GIB, 0),
            node("node-3", true, 4 * GIB, 4 * GIB, 0),
        ];
        // One segment naming node-1, the least roomy node: what csi-sanity
        // and a WaitForFirstConsumer claim send.
        let preferred = [segment("node-1")];
        let mut req = request(3, GIB, true);
        req.preferred = &preferred;
        assert_eq!(
            place(&nodes, &req).expect("placement"),
            ["node-1", "node-2", "node-3"]
        );
        req.count = 2;
        assert_eq!(
            place(&nodes, &req).expect("placement"),
            ["node-1", "node-2"]
        );
    }

    #[test]
    fn a_failure_domain_key_spreads_replicas_across_its_values() {
        let nodes = [
            zoned("a1", "a", 0),
            zoned("a2", "a", 0),
            zoned("b1", "b", GIB),
            zoned("b2", "b", 2 * GIB),
            zoned("c1", "c", 3 * GIB),
            node("x", true, 4 * GIB, 4 * GIB, 0),
        ];
        let spread = Constraints {
            allowed_nodes: Vec::new(),
            failure_domain_key: Some(ZONE.into()),
        };
        let mut req = request(3, GIB, true);
        req.constraints = &spread;
        // By headroom alone: a1, a2, x. One per zone, x has no zone.
        assert_eq!(place(&nodes, &req).expect("placement"), ["a1", "b1", "c1"]);
        // A preferred zone (a segment naming a zone, not a node) takes one.
        let preferred = [Topology::from([(ZONE.to_string(), "c".to_string())])];
        req.preferred = &preferred;
        assert_eq!(place(&nodes, &req).expect("placement"), ["c1", "a1", "b1"]);
        req.preferred = &[];
        req.count = 4;
        let err = place(&nodes, &req).expect_err("three zones");
        assert!(
            matches!(
                err,
                Error::NotEnoughFailureDomains {
                    needed: 4,
                    free: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        // A replacement avoids the zones of the replicas that stay.
        let holders = vec!["a1".to_string(), "b2".to_string()];
        let mut replace = request(1, GIB, true);
        replace.constraints = &spread;
        replace.exclude = &holders;
        replace.holders = &holders;
        assert_eq!(place(&nodes, &replace).expect("placement"), ["c1"]);
    }

    #[test]
    fn preferred_segments_are_tried_in_order_and_may_all_fail() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, 4 * GIB, 7 * GIB),
            node("c", true, 4 * GIB, 4 * GIB, 3 * GIB),
            node("d", false, 4 * GIB, 4 * GIB, 0),
        ];
        // d is down and b is full: c, the first preferred node that fits,
        // gets the first replica even though a has more headroom.
        let preferred = [segment("d"), segment("b"), segment("c")];
        let mut req = request(2, 2 * GIB, true);
        req.preferred = &preferred;
        assert_eq!(place(&nodes, &req).expect("placement"), ["c", "a"]);
        let preferred = [segment("d"), segment("b")];
        req.preferred = &preferred;
        req.count = 1;
        assert_eq!(
            place(&nodes, &req).expect("no preferred node fits"),
            ["a"],
            "a preference that cannot be met is not an error"
        );
    }

    #[test]
    fn capacity_per_segment_and_for_the_cluster() {
        let nodes = [
            node("a", true, 4 * GIB, 4 * GIB, 0),
            node("b", true, 4 * GIB, GIB, 6 * GIB),
            node("c", true, 4 * GIB, 4 * GIB, 4 * GIB),
            node("d", false, 4 * GIB, 4 * GIB, 0),
        ];
        // Thin room (overcommit limit 8 GiB minus provisioned): a 8, b 2,
        // c 4; d is down. Thick room is also capped by free space: a 4,
        // b 1, c 4.
        let thin = capacity(&nodes, None, 2, true, 4096);
        assert_eq!(thin.largest_volume_bytes, 4 * GIB, "second best node");
        assert_eq!(thin.available_bytes, 7 * GIB, "14 GiB of room, 2 copies");
        let thick = capacity(&nodes, None, 2, false, 4096);
        assert_eq!(thick.largest_volume_bytes, 4 * GIB);
        assert_eq!(thick.available_bytes, 9 * GIB / 2);
        let on_b = capacity(&nodes, Some(&segment("b")), 2, true, 4096);
        assert_eq!(on_b.largest_volume_bytes, 2 * GIB, "b's own room");
        assert_eq!(on_b.available_bytes, 2 * GIB);
        let on_a = capacity(&nodes, Some(&segment("a")), 3, true, 4096);
        assert_eq!(
            on_a.largest_volume_bytes,
            2 * GIB,
            "b and c hold the others"
        );
        assert_eq!(on_a.available_bytes, 8 * GIB);
        let down = capacity(&nodes, Some(&segment("d")), 1, true, 4096);
        assert_eq!(down.available_bytes, 0, "a down node has no capacity");
        let too_many = capacity(&nodes, None, 4, true, 4096);
        assert_eq!(too_many.available_bytes, 0, "only three nodes are up");
        assert_eq!(too_many.largest_volume_bytes, 0);
    }
}
