//! `ballast demo`: the end-to-end story on a local cluster with PostgreSQL
//! (see `ballast_csi::demo`).

use std::path::PathBuf;
use std::time::Duration;

use ballast_csi::demo::{self, Options};
use clap::Args;

/// Which story `ballast demo` tells.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Story {
    /// A replica's agent killed and rebuilt under pgbench, then a failover
    /// of PostgreSQL to another node.
    Failover,
    /// An app-consistent group snapshot (freeze, CHECKPOINT pre-hook) of
    /// PostgreSQL's data and WAL volumes on two nodes under pgbench,
    /// restored on a third.
    Snapshot,
}

/// Flags of `ballast demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// The story to run.
    #[arg(value_enum, default_value = "failover")]
    story: Story,
    /// Directory for the cluster, PostgreSQL's socket and all logs; it must
    /// be new or empty. Default: a fresh directory under /var/tmp, removed
    /// after a successful run (unless --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the cluster running at the end, with the volume (unpublished,
    /// not deleted) and all logs; prints how to stop it.
    #[arg(long)]
    keep: bool,
    /// Seconds of each phase of the pgbench load: before the fault, during
    /// it, and after the rebuild (pgbench runs three times as long).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pgbench_seconds: u64,
    /// pgbench scale factor (`pgbench -i -s`; 100,000 accounts, about
    /// 16 MB, per unit).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    scale: u32,
    /// With `snapshot`: take the group snapshot without freeze and hooks
    /// (crash-consistent), to compare the paused window and pgbench's
    /// stall with the app-consistent one.
    #[arg(long)]
    crash_consistent: bool,
    /// pgbench client sessions.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=25))]
    clients: u32,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let options = Options {
        dir: args.dir,
        keep: args.keep,
        phase: Duration::from_secs(args.pgbench_seconds),
        scale: args.scale,
        clients: args.clients,
        bin_dir: None,
        crash_consistent: args.crash_consistent,
    };
    let (text, checks) = match args.story {
        Story::Failover => {
            let report = demo::run(&options).await?;
            (report.to_string(), report.checks)
        }
        Story::Snapshot => {
            let report = demo::run_snapshot(&options).await?;
            (report.to_string(), report.checks)
        }
    };
    println!();
    println!("{text}");
    let failed = checks.iter().filter(|c| !c.passed).count();
    anyhow::ensure!(
        demo::report::all_passed(&checks),
        "{failed} of {} checks failed",
        checks.len()
    );
    Ok(())
}
