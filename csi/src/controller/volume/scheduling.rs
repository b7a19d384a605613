//! Replica placement: which nodes get a volume's replicas.
//!
//! A pure function of the nodes' liveness and pool figures ([`place`]), so
//! it is tested without any process. The rules:
//!
//! - every replica on a distinct node that is up;
//! - a node fits if one of its pools does, by the agent's own rule (the
//!   provisioned sum stays within the pool's overcommit limit; a thick
//!   replica also needs that much free space), so the agent will not refuse
//!   what placement chose unless the figures changed since the heartbeat;
//! - the preferred node, if any, must fit and gets the first replica;
//! - the others are taken by most headroom (overcommit limit minus
//!   provisioned) of their best pool, then by node id, so placement is
//!   deterministic and spreads volumes over emptier nodes.
//!
//! Topology beyond the node (zones, racks) is not considered yet: nodes
//! are the failure domains. This module must never read the store or call
//! agents.

use crate::controller::node::PoolCapacity;

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
        /// Nodes that are up and not excluded.
        up: usize,
        /// Nodes registered.
        registered: usize,
        /// Replica size, for people.
        size: String,
        /// "thin" or "thick".
        kind: &'static str,
        /// A note on nodes left out because they already hold the volume.
        excluded: String,
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
            Error::NotEnoughNodes { .. } | Error::PreferredNode { .. } => {
                tonic::Status::resource_exhausted(err.to_string())
            }
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
    /// Its pools' latest figures.
    pub pools: Vec<PoolCapacity>,
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
    /// Nodes that must not get any (they already hold one).
    pub exclude: &'a [String],
}

/// Chooses `request.count` distinct nodes, the preferred one first.
///
/// # Errors
///
/// [`Error::PreferredNode`] if the preferred node is unknown, down,
/// excluded or full; [`Error::NotEnoughNodes`] if fewer nodes fit than
/// replicas are needed.
pub fn place(candidates: &[Candidate], request: &Request<'_>) -> Result<Vec<String>, Error> {
    let excluded = |id: &str| request.exclude.iter().any(|e| e == id);
    let mut chosen = Vec::with_capacity(request.count);
    if let Some(preferred) = request.preferred_node {
        let reason = match candidates.iter().find(|c| c.node_id == preferred) {
            None => Some("it is not registered".to_string()),
            Some(c) if !c.up => Some("it is down".to_string()),
            Some(_) if excluded(preferred) => {
                Some("it already holds a replica of the volume".to_string())
            }
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
    }
    let mut fitting: Vec<(u64, &str)> = candidates
        .iter()
        .filter(|c| c.up && !excluded(&c.node_id))
        .filter(|c| Some(c.node_id.as_str()) != request.preferred_node)
        .filter_map(|c| best_headroom(c, request).map(|h| (h, c.node_id.as_str())))
        .collect();
    // Most headroom first; ties by node id for a deterministic choice.
    fitting.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let missing = request.count.saturating_sub(chosen.len());
    if fitting.len() < missing {
        let up = candidates
            .iter()
            .filter(|c| c.up && !excluded(&c.node_id))
            .count();
        let excluded_up = candidates
            .iter()
            .filter(|c| c.up && excluded(&c.node_id))
            .count();
        return Err(Error::NotEnoughNodes {
            needed: request.count,
            fitting: fitting.len() + chosen.len(),
            up,
            registered: candidates.len(),
            size: bytes(request.size_bytes),
            kind: if request.thin { "thin" } else { "thick" },
            excluded: if excluded_up > 0 {
                format!("; {excluded_up} other up node(s) already hold a replica of the volume")
            } else {
                String::new()
            },
        });
    }
    chosen.extend(fitting.iter().take(missing).map(|(_, id)| id.to_string()));
    Ok(chosen)
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
            pools: vec![PoolCapacity {
                name: "pool0".into(),
                total_bytes: total,
                free_bytes: free,
                provisioned_bytes: provisioned,
                overcommit_percent: 200,
            }],
        }
    }

    fn request(count: usize, size: u64, thin: bool) -> Request<'static> {
        Request {
            size_bytes: size,
            thin,
            count,
            preferred_node: None,
            exclude: &[],
        }
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
}
