//! Per-volume operation guards (Mayastor's `VolumeOpGuard`), shared by the
//! agent's targets, the controller and the CSI node service.
//!
//! A multi-step operation on a volume (create, delete, publish, unpublish,
//! stage, a target start or stop, a reconciler's repair) first takes the
//! volume's guard; a second one that arrives meanwhile does not wait and
//! does not race: the services answer `ABORTED` (the agent `Busy`) and the
//! reconcilers skip the volume until their next pass.
//!
//! Guards only order work inside this process. Correctness across a crash
//! or against a stale writer comes from compare-and-set on the volume
//! record (and epochs on replicas), never from a guard. In the controller,
//! the single-record changes targets ask for (drop a replica, mark it in
//! sync) take no guard: a target must get an answer even while a
//! reconciler works on its volume.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::Arc;

/// The set of volumes with an operation in progress.
#[derive(Debug, Default, Clone)]
pub struct OpGuards {
    busy: Arc<Mutex<HashSet<String>>>,
}

impl OpGuards {
    /// Takes the guard of `volume_id`, or `None` if another operation holds
    /// it. The guard is released when the returned value drops.
    pub fn try_acquire(&self, volume_id: &str) -> Option<OpGuard> {
        let mut busy = self.busy.lock();
        if !busy.insert(volume_id.to_string()) {
            return None;
        }
        Some(OpGuard {
            guards: self.clone(),
            volume_id: volume_id.to_string(),
        })
    }

    /// True while an operation holds the guard of `volume_id`.
    pub fn is_busy(&self, volume_id: &str) -> bool {
        self.busy.lock().contains(volume_id)
    }
}

/// A held guard; dropping it releases the volume.
#[derive(Debug)]
#[must_use = "the guard is released when dropped"]
pub struct OpGuard {
    guards: OpGuards,
    volume_id: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.guards.busy.lock().remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_operation_is_refused_until_the_first_ends() {
        let guards = OpGuards::default();
        let first = guards.try_acquire("v1");
        assert!(first.is_some());
        assert!(guards.try_acquire("v1").is_none());
        assert!(guards.try_acquire("v2").is_some(), "other volumes are free");
        assert!(guards.is_busy("v1"));
        drop(first);
        assert!(!guards.is_busy("v1"));
        assert!(guards.try_acquire("v1").is_some());
    }
}
