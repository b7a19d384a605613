//! The state of a replica as the API shows it, derived from two separate
//! things (Mayastor's `ChildState` vs `ChildSyncState`):
//!
//! - health: whether the replica's node is up, from the controller's node
//!   registry (heartbeats), never from the volume record;
//! - sync state: the replica's membership of the in-sync set as the volume
//!   record holds it ([`ReplicaState`]).
//!
//! A replica whose node is down is shown `node-down` whatever its record
//! says: a record left `rebuilding` by a rebuild that was started while the
//! node was up tells nothing once the node stopped answering. A replica is
//! shown `rebuilding` only while its record says so and both its node and
//! its target's node are up (only a live target rebuilds); otherwise a
//! replica that is not in sync is `faulted`.
//!
//! This module only derives; it reads no store and changes no record. The
//! reconciler's replacement rule (a replica that is not in sync, on a node
//! silent for `--node-down-after`, is replaced) is mirrored in
//! [`Shown::NodeDown::replace_at_unix_ms`]; change both together.

use std::time::Duration;

use super::Progress;
use super::record::{ReplicaRecord, ReplicaState};
use crate::controller::node::NodeState;

/// What the controller knows of a node's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Up or down (heartbeats within the heartbeat timeout).
    pub state: NodeState,
    /// Time since its last heartbeat (since the controller started, if
    /// none arrived since).
    pub silent_for: Duration,
}

/// Everything besides the record that a replica's shown state depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The replica's node.
    pub node: Liveness,
    /// The node of the volume's target; `None` when the volume is not
    /// published.
    pub target: Option<NodeState>,
    /// The target's last rebuild report for this replica.
    pub progress: Option<Progress>,
    /// Now, Unix ms.
    pub now_unix_ms: i64,
    /// The controller's `--node-down-after`: how long a node stays silent
    /// before its replicas that are not in sync are replaced.
    pub node_down_after: Duration,
}

/// A replica's shown state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// In the in-sync set and its node is up.
    InSync,
    /// Not in sync, its node is up, and no live target is rebuilding it.
    Faulted,
    /// A live target is rebuilding it; the target's last report, if any.
    Rebuilding {
        /// Bytes copied and to copy, when the target has reported.
        progress: Option<Progress>,
    },
    /// Its node sends no heartbeats.
    NodeDown {
        /// The node's last heartbeat (or the controller's start), Unix ms.
        since_unix_ms: i64,
        /// When the reconciler replaces the replica on another node, Unix
        /// ms; `None` while the record holds it in sync (the target drops
        /// it first, on its first failed write).
        replace_at_unix_ms: Option<i64>,
    },
}

impl Shown {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Shown::InSync => "in-sync",
            Shown::Faulted => "faulted",
            Shown::Rebuilding { .. } => "rebuilding",
            Shown::NodeDown { .. } => "node-down",
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Derives the shown state of `replica` from its record and what is
/// observed now (see the module docs for the rules).
pub fn derive(replica: &ReplicaRecord, observed: &Observed) -> Shown {
    if observed.node.state == NodeState::Down {
        let since_unix_ms = observed
            .now_unix_ms
            .saturating_sub(millis(observed.node.silent_for));
        let replace_at_unix_ms = (replica.state != ReplicaState::InSync)
            .then(|| since_unix_ms.saturating_add(millis(observed.node_down_after)));
        return Shown::NodeDown {
            since_unix_ms,
            replace_at_unix_ms,
        };
    }
    match replica.state {
        ReplicaState::InSync => Shown::InSync,
        ReplicaState::Rebuilding if observed.target == Some(NodeState::Up) => Shown::Rebuilding {
            progress: observed.progress,
        },
        ReplicaState::Rebuilding | ReplicaState::Faulted => Shown::Faulted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn replica(state: ReplicaState) -> ReplicaRecord {
        ReplicaRecord {
            node_id: "node-3".into(),
            replica_name: "vol".into(),
            state,
            faulted_since_unix_ms: NOW - 90_000,
            full_rebuild: false,
        }
    }

    fn observed(node: NodeState, silent_secs: u64, target: Option<NodeState>) -> Observed {
        Observed {
            node: Liveness {
                state: node,
                silent_for: Duration::from_secs(silent_secs),
            },
            target,
            progress: None,
            now_unix_ms: NOW,
            node_down_after: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_rebuilding_replica_whose_node_is_down_is_shown_down_with_its_times() {
        let shown = derive(
            &replica(ReplicaState::Rebuilding),
            &observed(NodeState::Down, 75, Some(NodeState::Up)),
        );
        assert_eq!(
            shown,
            Shown::NodeDown {
                since_unix_ms: NOW - 75_000,
                replace_at_unix_ms: Some(NOW - 75_000 + 600_000),
            }
        );
        assert_eq!(shown.as_str(), "node-down");
    }

    #[test]
    fn an_in_sync_replica_whose_node_is_down_is_down_but_not_yet_replaced() {
        let shown = derive(
            &replica(ReplicaState::InSync),
            &observed(NodeState::Down, 20, Some(NodeState::Up)),
        );
        assert_eq!(
            shown,
            Shown::NodeDown {
                since_unix_ms: NOW - 20_000,
                replace_at_unix_ms: None,
            }
        );
    }

    #[test]
    fn rebuilding_needs_a_live_target() {
        let rebuilding = replica(ReplicaState::Rebuilding);
        assert_eq!(
            derive(
                &rebuilding,
                &observed(NodeState::Up, 0, Some(NodeState::Up))
            ),
            Shown::Rebuilding { progress: None }
        );
        assert_eq!(
            derive(
                &rebuilding,
                &observed(NodeState::Up, 0, Some(NodeState::Down))
            ),
            Shown::Faulted
        );
        assert_eq!(
            derive(&rebuilding, &observed(NodeState::Up, 0, None)),
            Shown::Faulted
        );
    }

    #[test]
    fn replicas_on_live_nodes_show_their_sync_state() {
        let up = observed(NodeState::Up, 1, Some(NodeState::Up));
        assert_eq!(derive(&replica(ReplicaState::InSync), &up), Shown::InSync);
        assert_eq!(derive(&replica(ReplicaState::Faulted), &up), Shown::Faulted);
    }
}
