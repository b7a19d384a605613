//! `ballast demo`: what Ballast is for, shown end to end on this machine
//! with a real database.
//!
//! The story ([`scenario`]), driven through the CSI sockets exactly as
//! Kubernetes drives them ([`kubelet`]), on a local 3-node cluster with the
//! embedded store that the demo starts and stops ([`crate::cluster`]):
//!
//! 1. CreateVolume (3 replicas, ext4); ControllerPublishVolume on node-1,
//!    NodeStageVolume, NodePublishVolume.
//! 2. A real PostgreSQL ([`postgres`]) with its data directory on the
//!    volume; `pgbench -i`, then a timed pgbench load ([`pgbench`]).
//! 3. During the load, SIGKILL of node-2's agent, which holds a replica but
//!    not the target: pgbench must go on without an error.
//! 4. The agent restarts; the rebuild's progress is shown until the replica
//!    is back in sync.
//! 5. Failover: PostgreSQL stops cleanly, the volume is unpublished from
//!    node-1 and published on node-2 (whose replica was the rebuilt one;
//!    the target reads its local replica), PostgreSQL starts there, and the
//!    data is checked: `pgbench_history` holds exactly the transactions
//!    pgbench counted, `pg_amcheck` finds no corruption. Unpublished, the
//!    three replica files are compared byte for byte ([`replicas`]).
//! 6. The [`report`]: volume and replica states, TPS before, during and
//!    after the fault, the longest stall, the rebuild time, and PASS or
//!    FAIL per check.
//!
//! `ballast demo snapshot` tells the other story ([`snapshot`]): an
//! app-consistent group snapshot of PostgreSQL with its data and WAL on
//! volumes served from two nodes, taken under pgbench (filesystems frozen,
//! a CHECKPOINT pre-hook) and restored on a third node.
//!
//! A line per step with the elapsed time, pgbench's progress each second and
//! a progress bar for the rebuild are printed as it goes ([`progress`]).
//!
//! # Clean-up
//!
//! Whatever happens (a failed step, a failed check, Ctrl-C or SIGTERM), the
//! demo stops pgbench and PostgreSQL, and unless `--keep` unpublishes and
//! unstages the volume and stops the cluster (`cluster::down` also removes
//! every mount and loop device under the directory), so a failed demo
//! leaves nothing behind. With `--keep` the cluster keeps running with
//! whatever exists (after a successful run, the volume, unpublished), and
//! the demo says how to stop it. Every wait is bounded.

pub mod kubelet;
pub mod pgbench;
pub mod postgres;
pub mod progress;
pub mod replicas;
pub mod report;
mod scenario;
pub mod snapshot;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

pub use report::Report;
pub use snapshot::SnapshotReport;

use crate::cluster;
use progress::Console;
use scenario::Resources;

/// What `ballast demo` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for the cluster, PostgreSQL's socket and logs; None for a
    /// fresh directory under /var/tmp (removed after a successful run
    /// without `keep`). It must be empty or absent.
    pub dir: Option<PathBuf>,
    /// Leave the cluster and the volume in place at the end.
    pub keep: bool,
    /// Length of each of the load's three phases (before, during and after
    /// the fault); pgbench runs three times as long.
    pub phase: Duration,
    /// pgbench's scale (`pgbench -i -s`).
    pub scale: u32,
    /// pgbench client sessions.
    pub clients: u32,
    /// Where the cluster's binaries are; None for next to this executable.
    pub bin_dir: Option<PathBuf>,
    /// `ballast demo snapshot` only: take the group snapshot without the
    /// freeze and the hooks (crash-consistent), to compare.
    pub crash_consistent: bool,
}

/// Errors that stop the demo (failed checks are not errors: they are in
/// the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The demo needs root.
    #[error("ballast demo needs root: it attaches loop devices, mounts filesystems and uses FUSE")]
    NotRoot,
    /// The demo directory is not empty.
    #[error("{0} is not empty: the demo needs a new or empty directory")]
    DirNotEmpty(PathBuf),
    /// A file or directory operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Starting, changing or stopping the local cluster failed.
    #[error("Local cluster")]
    Cluster(#[from] cluster::Error),
    /// A CSI call failed.
    #[error("CSI")]
    Csi(#[from] kubelet::Error),
    /// The replicas could not be compared.
    #[error("Replica comparison")]
    Replicas(#[from] replicas::Error),
    /// PostgreSQL failed.
    #[error("PostgreSQL")]
    Postgres(#[from] postgres::Error),
    /// pgbench failed.
    #[error("pgbench")]
    Pgbench(#[from] pgbench::Error),
    /// The controller's management API failed.
    #[error("{call} failed: {} ({:?})", .status.message(), .status.code())]
    Controller {
        /// The call.
        call: &'static str,
        /// The status.
        status: tonic::Status,
    },
    /// The controller's management API cannot be reached.
    #[error("Cannot reach the controller at {address}")]
    ControllerUnreachable {
        /// Its address.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// An agent's management API cannot be reached.
    #[error("Cannot reach the agent of {node_id} at {address}")]
    AgentUnreachable {
        /// The node.
        node_id: String,
        /// Its address.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A blocking task of the demo failed to run to its end.
    #[error("The task to {what} failed")]
    Task {
        /// What it was to do.
        what: &'static str,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Something expected did not happen in time.
    #[error("{what} did not happen within {timeout:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// The run was interrupted by a signal.
    #[error("Interrupted by {0}")]
    Interrupted(&'static str),
    /// A component answered something the demo cannot use.
    #[error("Unexpected answer: {0}")]
    Unexpected(String),
}

/// Runs the demo as `options` say and returns its report; cleans up in
/// every case (see the module docs).
///
/// # Errors
///
/// Any [`Error`] that stopped the story; the clean-up's own error if the
/// story finished but the clean-up left something behind.
pub async fn run(options: &Options) -> Result<Report, Error> {
    run_story(options, Report::passed, |options, console, res| {
        Box::pin(scenario::run(options, console, res))
    })
    .await
}

/// Runs `ballast demo snapshot` ([`snapshot`]) as `options` say and
/// returns its report; cleans up as [`run`] does.
///
/// # Errors
///
/// As [`run`].
pub async fn run_snapshot(options: &Options) -> Result<SnapshotReport, Error> {
    run_story(options, SnapshotReport::passed, |options, console, res| {
        Box::pin(snapshot::run(options, console, res))
    })
    .await
}

/// A story's future, borrowing what [`run_story`] lends it.
type StoryFuture<'a, R> = std::pin::Pin<Box<dyn Future<Output = Result<R, Error>> + 'a>>;

/// Runs `story` until it ends or a signal comes, then cleans up what
/// [`Resources`] holds; `passed` tells whether a fresh directory may go.
async fn run_story<R>(
    options: &Options,
    passed: fn(&R) -> bool,
    story: impl for<'a> FnOnce(&'a Options, &'a Console, &'a mut Resources) -> StoryFuture<'a, R>,
) -> Result<R, Error> {
    let console = Console::new();
    let mut resources = Resources::default();
    let outcome = tokio::select! {
        outcome = story(options, &console, &mut resources) => outcome,
        signal = interrupted() => Err(Error::Interrupted(signal)),
    };
    if let Err(err) = &outcome {
        console.clear_status();
        console.note(&format!("demo stopped: {}", crate::error_chain(err)));
    }
    let cleaned = resources.teardown(&console, options.keep).await;
    if options.keep {
        resources.print_kept(&console);
    }
    match (outcome, cleaned) {
        (Ok(report), Ok(())) => {
            if !options.keep
                && options.dir.is_none()
                && passed(&report)
                && let Some(dir) = &resources.dir
            {
                // A fresh directory of a successful run holds nothing
                // worth keeping but gigabytes of pool files.
                let _ = std::fs::remove_dir_all(dir);
            }
            Ok(report)
        }
        (Ok(_), Err(err)) => Err(err),
        (Err(err), cleaned) => {
            if let Err(cleanup) = cleaned {
                console.note(&format!(
                    "clean-up failed too: {}",
                    crate::error_chain(&cleanup)
                ));
            }
            if let Some(dir) = &resources.dir {
                console.note(&format!("logs are in {}", dir.display()));
            }
            Err(err)
        }
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM with the signal's name.
///
/// # Cancel safety
///
/// Cancel safe: nothing is consumed until a signal arrives.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    // A signal that cannot be watched never resolves (rather than at once).
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => "SIGINT",
        () = term => "SIGTERM",
    }
}
