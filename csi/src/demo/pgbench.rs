//! pgbench against a [`postgres::Instance`]: `pgbench -i` to create the
//! TPC-B-like tables, and a timed load whose results are measured from
//! pgbench's own output.
//!
//! A [`Load`] runs `pgbench -T SECONDS -P 1 -l`:
//!
//! - `-P 1` prints a progress line a second on stderr; each is parsed into
//!   a [`Progress`] and handed to the caller as it comes
//!   ([`Load::take_progress`]), for a live view.
//! - `-l` writes one line per transaction (client, number, latency in µs,
//!   script, completion time as epoch seconds and µs) to files under a
//!   directory owned by `postgres`, read back as a [`TransactionLog`] when
//!   pgbench has exited. It gives the throughput between any two instants
//!   and the longest stall: the longest time in which no transaction
//!   completed at all.
//! - The summary on stdout gives the processed and failed transaction
//!   counts. pgbench's vacuum before the run empties `pgbench_history`, to
//!   which every TPC-B-like transaction adds one row, so after the run the
//!   table holds exactly the transactions pgbench counted as processed
//!   (plus any whose commit succeeded but whose answer was lost).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::postgres::{self, DATABASE, Instance};
use crate::command;

/// Prefix of the per-transaction log files (`tx.<pid>`, `tx.<pid>.<thread>`).
const LOG_PREFIX: &str = "tx";

/// Errors of pgbench runs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// pgbench could not be run (see the cause).
    #[error("pgbench")]
    Program(#[from] postgres::Error),
    /// pgbench did not exit within its deadline (and was killed).
    #[error("pgbench did not exit within {0:?}")]
    Timeout(Duration),
    /// Reading pgbench's output or logs failed.
    #[error("Cannot read {path}")]
    Io {
        /// The file or stream.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Creates the pgbench tables at `scale` (100,000 accounts per unit,
/// about 16 MB), replacing any that exist.
///
/// # Errors
///
/// [`Error::Program`] if pgbench fails or passes `timeout`.
pub async fn initialize(instance: &Instance, scale: u32, timeout: Duration) -> Result<(), Error> {
    let mut pgbench = instance.client("pgbench");
    pgbench
        .args(["-i", "-q", "-s", &scale.to_string()])
        .arg(DATABASE);
    command::run_of(pgbench, "pgbench -i", timeout)
        .await
        .map_err(postgres::Error::from)?;
    Ok(())
}

/// What load to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent client sessions (`-c`).
    pub clients: u32,
    /// pgbench worker threads (`-j`).
    pub threads: u32,
    /// How long (`-T`, whole seconds, at least 1).
    pub duration: Duration,
    /// Directory for the per-transaction logs; created owned by `postgres`.
    pub log_dir: PathBuf,
}

/// One `-P` progress line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Time since the start of the run, in seconds.
    pub at_secs: f64,
    /// Transactions per second over the last interval.
    pub tps: f64,
    /// Average latency in milliseconds over the last interval.
    pub latency_ms: Option<f64>,
    /// Failed transactions in the last interval.
    pub failed: Option<u64>,
}

/// A running pgbench load.
#[derive(Debug)]
pub struct Load {
    child: Child,
    started: SystemTime,
    log_dir: PathBuf,
    progress: Option<mpsc::UnboundedReceiver<Progress>>,
    stderr: JoinHandle<StderrSummary>,
    stdout: JoinHandle<String>,
}

/// What the stderr reader kept.
#[derive(Debug, Default)]
struct StderrSummary {
    progress: Vec<Progress>,
    /// Lines that are not progress (or the vacuum's notice): errors,
    /// notices of aborts.
    other: Vec<String>,
}

impl Load {
    /// Starts `pgbench -T -P 1 -l` as `spec` says; returns at once.
    ///
    /// # Errors
    ///
    /// [`Error::Program`] if the log directory cannot be made or pgbench
    /// cannot start.
    pub fn start(instance: &Instance, spec: &LoadSpec) -> Result<Self, Error> {
        instance.create_client_dir(&spec.log_dir)?;
        let seconds = spec.duration.as_secs().max(1);
        let mut pgbench = instance.client("pgbench");
        pgbench
            .arg("-c")
            .arg(spec.clients.to_string())
            .arg("-j")
            .arg(spec.threads.max(1).to_string())
            .arg("-T")
            .arg(seconds.to_string())
            .args(["-P", "1", "-l"])
            .arg(format!(
                "--log-prefix={}",
                spec.log_dir.join(LOG_PREFIX).display()
            ))
            .arg(DATABASE)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = SystemTime::now();
        let mut child = pgbench.spawn().map_err(|source| {
            Error::Program(postgres::Error::Program(command::Error::Spawn {
                program: "pgbench".into(),
                source,
            }))
        })?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let stderr = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut summary = StderrSummary::default();
            let Some(stderr) = stderr else {
                return summary;
            };
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match parse_progress(&line) {
                    Some(progress) => {
                        summary.progress.push(progress);
                        // The receiver may be gone; the samples are kept.
                        let _ = sender.send(progress);
                    }
                    // The vacuum before the run reports itself on stderr.
                    None if line.trim() == "starting vacuum...end." => {}
                    None => summary.other.push(line),
                }
            }
            summary
        });
        let stdout = child.stdout.take();
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut stdout) = stdout {
                let _ = stdout.read_to_string(&mut text).await;
            }
            text
        });
        Ok(Self {
            child,
            started,
            log_dir: spec.log_dir.clone(),
            progress: Some(receiver),
            stderr,
            stdout,
        })
    }

    /// When pgbench was started.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The progress lines as they are printed (once; later calls get
    /// None). The channel closes when pgbench exits.
    pub fn take_progress(&mut self) -> Option<mpsc::UnboundedReceiver<Progress>> {
        self.progress.take()
    }

    /// True once pgbench has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Waits (at most `timeout`) for pgbench to exit and collects its
    /// results. On the deadline pgbench is killed.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], and errors reading the transaction logs.
    pub async fn finish(mut self, timeout: Duration) -> Result<Outcome, Error> {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.map_err(|source| Error::Io {
                path: PathBuf::from("pgbench"),
                source,
            })?,
            Err(_) => {
                let _ = self.child.kill().await;
                return Err(Error::Timeout(timeout));
            }
        };
        let stderr = self.stderr.await.unwrap_or_default();
        let stdout = self.stdout.await.unwrap_or_default();
        let summary = Summary::parse(&stdout);
        let transactions = TransactionLog::read(&self.log_dir)?;
        Ok(Outcome {
            exit_code: status.code(),
            processed: summary.processed,
            failed: summary.failed,
            errors: stderr.other,
            progress: stderr.progress,
            transactions,
            started: self.started,
        })
    }
}

/// The results of a finished load.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// pgbench's exit code (0: success, 2: the run was aborted); None if it
    /// was killed by a signal.
    pub exit_code: Option<i32>,
    /// "number of transactions actually processed", if printed.
    pub processed: Option<u64>,
    /// "number of failed transactions", 0 if not printed.
    pub failed: u64,
    /// Lines on stderr other than progress and the vacuum notice: errors.
    pub errors: Vec<String>,
    /// Every progress line.
    pub progress: Vec<Progress>,
    /// Every transaction from the `-l` logs.
    pub transactions: TransactionLog,
    /// When pgbench was started.
    pub started: SystemTime,
}

impl Outcome {
    /// True if pgbench ran to its end without any error: exit code 0, no
    /// failed transaction, nothing on stderr but progress, at least one
    /// transaction processed.
    pub fn clean(&self) -> bool {
        self.exit_code == Some(0)
            && self.failed == 0
            && self.errors.is_empty()
            && self.processed.is_some_and(|n| n > 0)
    }
}

/// The counts of pgbench's summary on stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Transactions processed (committed and acknowledged to pgbench).
    pub processed: Option<u64>,
    /// Failed transactions.
    pub failed: u64,
}

impl Summary {
    /// Parses pgbench's summary.
    pub fn parse(stdout: &str) -> Self {
        let mut summary = Self::default();
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
                // `-T` prints "N"; `-t` prints "N/M".
                summary.processed = rest.trim().split('/').next().and_then(|n| n.parse().ok());
            } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
                summary.failed = rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
        }
        summary
    }
}

/// Parses a `-P` line: `progress: 5.0 s, 1010.8 tps, lat 0.988 ms stddev
/// 0.301, 0 failed` (the parts after tps vary between versions).
pub fn parse_progress(line: &str) -> Option<Progress> {
    let rest = line.strip_prefix("progress:")?;
    let mut parts = rest.split(',').map(str::trim);
    let at_secs = parts.next()?.strip_suffix(" s")?.trim().parse().ok()?;
    let tps = parts.next()?.strip_suffix(" tps")?.trim().parse().ok()?;
    let mut progress = Progress {
        at_secs,
        tps,
        latency_ms: None,
        failed: None,
    };
    for part in parts {
        if let Some(lat) = part.strip_prefix("lat ") {
            progress.latency_ms = lat.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(failed) = part.strip_suffix(" failed") {
            progress.failed = failed.trim().parse().ok();
        }
    }
    Some(progress)
}

/// The per-transaction logs of a run (`-l`).
#[derive(Debug, Clone, Default)]
pub struct TransactionLog {
    /// Completion times of successful transactions, µs since the Unix
    /// epoch, sorted.
    completions_us: Vec<u64>,
    /// Their latencies in µs.
    latencies_us: Vec<u64>,
    /// Log lines of transactions that failed or were skipped.
    unsuccessful: u64,
}

/// A stretch of time in which no transaction completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// When the last transaction before it completed.
    pub from: SystemTime,
    /// How long until the next one completed.
    pub length: Duration,
}

impl TransactionLog {
    /// Reads every log file of [`LOG_PREFIX`] in `dir`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directory or a file cannot be read.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let mut text = String::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let ours = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{LOG_PREFIX}.")));
            if ours {
                text.push_str(&std::fs::read_to_string(&path).map_err(io(&path))?);
            }
        }
        Ok(Self::parse(&text))
    }

    /// Parses log lines `client_id transaction_no time script_no
    /// time_epoch time_us [...]`; `time` is the latency in µs, or `failed`
    /// / `skipped` (or a failure kind) for unsuccessful transactions.
    /// Malformed lines are ignored.
    pub fn parse(text: &str) -> Self {
        let mut log = Self::default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(latency), Some(secs), Some(micros)) =
                (fields.get(2), fields.get(4), fields.get(5))
            else {
                continue;
            };
            let (Ok(secs), Ok(micros)) = (secs.parse::<u64>(), micros.parse::<u64>()) else {
                continue;
            };
            match latency.parse::<u64>() {
                Ok(latency) => {
                    log.completions_us.push(secs * 1_000_000 + micros);
                    log.latencies_us.push(latency);
                }
                Err(_) => log.unsuccessful += 1,
            }
        }
        log.completions_us.sort_unstable();
        log
    }

    /// Successful transactions logged.
    pub fn len(&self) -> usize {
        self.completions_us.len()
    }

    /// True if no successful transaction was logged.
    pub fn is_empty(&self) -> bool {
        self.completions_us.is_empty()
    }

    /// Transactions logged as failed or skipped.
    pub fn unsuccessful(&self) -> u64 {
        self.unsuccessful
    }

    /// When the first transaction completed.
    pub fn first(&self) -> Option<SystemTime> {
        self.completions_us.first().map(|us| from_micros(*us))
    }

    /// When the last transaction completed.
    pub fn last(&self) -> Option<SystemTime> {
        self.completions_us.last().map(|us| from_micros(*us))
    }

    /// Transactions per second that completed in `[from, to)`; None for an
    /// empty interval.
    pub fn tps_between(&self, from: SystemTime, to: SystemTime) -> Option<f64> {
        let (from, to) = (micros(from), micros(to));
        if to <= from {
            return None;
        }
        let start = self.completions_us.partition_point(|t| *t < from);
        let end = self.completions_us.partition_point(|t| *t < to);
        Some((end - start) as f64 * 1e6 / (to - from) as f64)
    }

    /// The longest time between two consecutive completions.
    pub fn longest_stall(&self) -> Option<Stall> {
        self.completions_us
            .windows(2)
            .map(|pair| (pair[0], pair[1] - pair[0]))
            .max_by_key(|(_, gap)| *gap)
            .map(|(from, gap)| Stall {
                from: from_micros(from),
                length: Duration::from_micros(gap),
            })
    }

    /// The longest time between two consecutive completions that overlaps
    /// `[from, to]` (the gap that holds an event, such as a snapshot's
    /// cut, counts whole).
    pub fn longest_stall_around(&self, from: SystemTime, to: SystemTime) -> Option<Stall> {
        let (from, to) = (micros(from), micros(to));
        self.completions_us
            .windows(2)
            .filter(|pair| pair[1] >= from && pair[0] <= to)
            .map(|pair| (pair[0], pair[1] - pair[0]))
            .max_by_key(|(_, gap)| *gap)
            .map(|(from, gap)| Stall {
                from: from_micros(from),
                length: Duration::from_micros(gap),
            })
    }

    /// The slowest transaction's latency.
    pub fn slowest(&self) -> Option<Duration> {
        self.latencies_us
            .iter()
            .max()
            .map(|us| Duration::from_micros(*us))
    }
}

fn micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        let p = parse_progress("progress: 5.0 s, 1010.8 tps, lat 0.988 ms stddev 0.301, 0 failed")
            .expect("parsed");
        assert_eq!(p.at_secs, 5.0);
        assert_eq!(p.tps, 1010.8);
        assert_eq!(p.latency_ms, Some(0.988));
        assert_eq!(p.failed, Some(0));
        let stalled =
            parse_progress("progress: 12.0 s, 0.0 tps, lat 0.000 ms stddev 0.000, 0 failed")
                .expect("a second without transactions");
        assert_eq!(stalled.tps, 0.0);
        let old = parse_progress("progress: 3.0 s, 88.5 tps, lat 11.291 ms stddev 2.1")
            .expect("no failed count");
        assert_eq!(old.failed, None);
        assert_eq!(parse_progress("pgbench: error: client 3 aborted"), None);
        assert_eq!(parse_progress("progress: soon"), None);
    }

    #[test]
    fn the_summary_gives_processed_and_failed() {
        let out = "transaction type: <builtin: TPC-B (sort of)>\n\
                   number of clients: 8\n\
                   number of transactions actually processed: 6676\n\
                   number of failed transactions: 3 (0.045%)\n\
                   tps = 2211.835240 (without initial connection time)\n";
        assert_eq!(
            Summary::parse(out),
            Summary {
                processed: Some(6676),
                failed: 3
            }
        );
        assert_eq!(
            Summary::parse("number of transactions actually processed: 70/80\n").processed,
            Some(70)
        );
        assert_eq!(Summary::parse("").processed, None);
    }

    #[test]
    fn the_transaction_log_gives_throughput_stalls_and_latency() {
        // Four transactions at 100.0, 100.5, 103.0 and 103.2 s; one failed.
        let log = TransactionLog::parse(
            "0 1 4000 0 100 0\n\
             1 1 6000 0 100 500000\n\
             0 2 2500000 0 103 0\n\
             1 2 failed 0 103 100000\n\
             1 3 2700000 0 103 200000\n\
             garbage\n",
        );
        assert_eq!(log.len(), 4);
        assert_eq!(log.unsuccessful(), 1);
        let at = |s: f64| UNIX_EPOCH + Duration::from_secs_f64(s);
        assert_eq!(log.first(), Some(at(100.0)));
        assert_eq!(log.last(), Some(at(103.2)));
        let stall = log.longest_stall().expect("a stall");
        assert_eq!(stall.from, at(100.5));
        assert_eq!(stall.length, Duration::from_millis(2500));
        assert_eq!(log.slowest(), Some(Duration::from_millis(2700)));
        assert_eq!(log.tps_between(at(100.0), at(101.0)), Some(2.0));
        assert_eq!(log.tps_between(at(101.0), at(103.0)), Some(0.0));
        assert_eq!(log.tps_between(at(103.0), at(103.0)), None);
        assert!(TransactionLog::parse("").longest_stall().is_none());
        // Around 103.1 s only the gap from 103.0 to 103.2 counts.
        let around = log
            .longest_stall_around(at(103.1), at(103.1))
            .expect("a gap around 103.1 s");
        assert_eq!(around.from, at(103.0));
        assert_eq!(around.length, Duration::from_millis(200));
        let around = log
            .longest_stall_around(at(101.0), at(103.1))
            .expect("a gap");
        assert_eq!(around.length, Duration::from_millis(2500));
    }

    #[test]
    fn log_files_of_every_thread_are_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("tx.77"), "0 1 10 0 5 0\n").expect("thread 0");
        std::fs::write(dir.path().join("tx.77.1"), "1 1 10 0 6 0\n").expect("thread 1");
        std::fs::write(dir.path().join("other"), "2 1 10 0 7 0\n").expect("not ours");
        let log = TransactionLog::read(dir.path()).expect("read");
        assert_eq!(log.len(), 2);
    }
}
