//! The demo's closing report: the volume's and replicas' states, what
//! pgbench measured before, during and after the fault, the rebuild, and
//! one PASS or FAIL line per check. The demo fails (non-zero exit) unless
//! every check passed.
//!
//! The text is for people but stable enough for the integration test to
//! read: check lines start with `PASS` or `FAIL` after the indentation,
//! and measured numbers follow a `name:` label.

use std::fmt;
use std::time::Duration;

use super::progress::bytes;

/// One check of the demo.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Whether it held.
    pub passed: bool,
    /// What was checked.
    pub what: String,
    /// What was seen.
    pub detail: String,
}

impl Check {
    /// A check that held if `passed`.
    pub fn new(passed: bool, what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            passed,
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// One replica's state at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaState {
    /// Its node.
    pub node_id: String,
    /// `in-sync`, `faulted` or `rebuilding`.
    pub state: String,
}

/// The volume at the end, as the controller reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeState {
    /// The volume id.
    pub volume_id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// `healthy`, `degraded`, ...
    pub status: String,
    /// Where it is published (empty if nowhere).
    pub target_node_id: String,
    /// The epoch (raised by every publish).
    pub epoch: u64,
    /// Its replicas.
    pub replicas: Vec<ReplicaState>,
}

/// What pgbench measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadFigures {
    /// pgbench's scale.
    pub scale: u32,
    /// Client sessions.
    pub clients: u32,
    /// Length of the run.
    pub duration: Duration,
    /// Transactions processed, as pgbench reported.
    pub processed: Option<u64>,
    /// Failed transactions.
    pub failed: u64,
    /// Throughput before the kill.
    pub tps_before: Option<f64>,
    /// Throughput from the kill until the replica was back in sync (or
    /// the end of the run).
    pub tps_during: Option<f64>,
    /// Throughput after the replica was back in sync.
    pub tps_after: Option<f64>,
    /// Length of the "during" window.
    pub fault_window: Option<Duration>,
    /// The longest time in which no transaction completed.
    pub longest_stall: Option<Duration>,
    /// When that stall began, counted from the start of the run.
    pub stall_at: Option<Duration>,
    /// The slowest transaction.
    pub slowest: Option<Duration>,
}

/// The fault and the rebuild.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebuildFigures {
    /// The node whose agent was killed.
    pub node_id: String,
    /// From the kill until the controller showed the replica out of sync.
    pub dropped_after: Option<Duration>,
    /// How long the agent stayed down.
    pub outage: Duration,
    /// From the agent's restart until the replica was in sync again.
    pub in_sync_after: Option<Duration>,
    /// Bytes of the regions the rebuild found different and copied.
    pub rebuilt_bytes: u64,
}

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// The volume at the end.
    pub volume: VolumeState,
    /// pgbench's figures.
    pub load: LoadFigures,
    /// The fault and rebuild.
    pub rebuild: RebuildFigures,
    /// Every check, in the order made.
    pub checks: Vec<Check>,
}

impl Report {
    /// True if there is at least one check and every check passed.
    pub fn passed(&self) -> bool {
        all_passed(&self.checks)
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn or_na<T>(value: Option<T>, show: impl FnOnce(T) -> String) -> String {
    value.map_or_else(|| "n/a".to_string(), show)
}

fn tps(value: Option<f64>) -> String {
    or_na(value, |t| format!("{t:.1}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.volume;
        writeln!(f, "REPORT")?;
        writeln!(
            f,
            "  volume {}: {}, {}, published on {}, epoch {}",
            v.volume_id,
            bytes(v.size_bytes),
            v.status,
            if v.target_node_id.is_empty() {
                "no node"
            } else {
                &v.target_node_id
            },
            v.epoch
        )?;
        for replica in &v.replicas {
            writeln!(f, "    replica on {:8} {}", replica.node_id, replica.state)?;
        }
        let l = &self.load;
        writeln!(
            f,
            "  pgbench (scale {}, {} clients, {}): {} transactions, {} failed",
            l.scale,
            l.clients,
            secs(l.duration),
            or_na(l.processed, |n| n.to_string()),
            l.failed
        )?;
        writeln!(f, "    TPS before the fault: {}", tps(l.tps_before))?;
        writeln!(
            f,
            "    TPS during the fault: {} (kill to back in sync: {})",
            tps(l.tps_during),
            or_na(l.fault_window, secs)
        )?;
        writeln!(f, "    TPS after the rebuild: {}", tps(l.tps_after))?;
        writeln!(
            f,
            "    longest stall: {} (no transaction completed; began {} into the run)",
            or_na(l.longest_stall, secs),
            or_na(l.stall_at, secs)
        )?;
        writeln!(f, "    slowest transaction: {}", or_na(l.slowest, secs))?;
        let r = &self.rebuild;
        writeln!(
            f,
            "  fault: agent of {} killed; replica out of sync after {}; agent down for {}",
            r.node_id,
            or_na(r.dropped_after, secs),
            secs(r.outage)
        )?;
        writeln!(
            f,
            "    rebuild time: {} from the agent's restart to in sync ({} of regions that differed copied)",
            or_na(r.in_sync_after, secs),
            bytes(r.rebuilt_bytes)
        )?;
        write_checks(f, &self.checks)
    }
}

/// True if there is at least one check and every check passed.
pub fn all_passed(checks: &[Check]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c.passed)
}

/// The `checks` block and the `RESULT` line that end every report.
///
/// # Errors
///
/// The formatter's.
pub fn write_checks(f: &mut fmt::Formatter<'_>, checks: &[Check]) -> fmt::Result {
    writeln!(f, "  checks")?;
    for check in checks {
        writeln!(
            f,
            "    {}  {}: {}",
            if check.passed { "PASS" } else { "FAIL" },
            check.what,
            check.detail
        )?;
    }
    let passed = checks.iter().filter(|c| c.passed).count();
    write!(
        f,
        "  RESULT: {} ({passed} of {} checks passed)",
        if all_passed(checks) { "PASS" } else { "FAIL" },
        checks.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            volume: VolumeState {
                volume_id: "pvc-x".into(),
                size_bytes: 1 << 30,
                status: "healthy".into(),
                target_node_id: "node-2".into(),
                epoch: 3,
                replicas: vec![ReplicaState {
                    node_id: "node-1".into(),
                    state: "in-sync".into(),
                }],
            },
            load: LoadFigures {
                scale: 10,
                clients: 4,
                duration: Duration::from_secs(60),
                processed: Some(4000),
                tps_before: Some(80.25),
                tps_during: Some(50.0),
                tps_after: None,
                fault_window: Some(Duration::from_millis(7500)),
                longest_stall: Some(Duration::from_millis(1200)),
                ..Default::default()
            },
            rebuild: RebuildFigures {
                node_id: "node-2".into(),
                rebuilt_bytes: 3 << 20,
                ..Default::default()
            },
            checks: vec![
                Check::new(true, "pgbench ran without errors", "0 failed"),
                Check::new(false, "volume healthy", "2 of 3 in sync"),
            ],
        }
    }

    #[test]
    fn the_report_shows_figures_and_checks() {
        let text = report().to_string();
        assert!(text.contains("volume pvc-x: 1.0 GiB, healthy, published on node-2, epoch 3"));
        assert!(text.contains("TPS before the fault: 80.2"), "{text}");
        assert!(text.contains("TPS during the fault: 50.0 (kill to back in sync: 7.50 s)"));
        assert!(text.contains("TPS after the rebuild: n/a"));
        assert!(text.contains("longest stall: 1.20 s"));
        assert!(text.contains("(3.0 MiB of regions that differed copied)"));
        assert!(text.contains("    PASS  pgbench ran without errors: 0 failed"));
        assert!(text.contains("    FAIL  volume healthy: 2 of 3 in sync"));
        assert!(text.ends_with("RESULT: FAIL (1 of 2 checks passed)"));
    }

    #[test]
    fn a_report_passes_only_with_every_check_passed() {
        let mut r = report();
        assert!(!r.passed());
        r.checks.retain(|c| c.passed);
        assert!(r.passed());
        r.checks.clear();
        assert!(!r.passed(), "no check, no pass");
    }
}
