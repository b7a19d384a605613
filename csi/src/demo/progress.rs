//! What the demo prints while it runs: a line per step with the time since
//! the start, detail lines under it, and a status line (the rebuild's
//! progress bar) that is redrawn in place on a terminal.
//!
//! A [`Console`] is shared (cheap clones) by the steps and by the task that
//! prints pgbench's progress, so their lines never tear the status line:
//! every printed line first clears it, and it is drawn again below. When
//! stdout is not a terminal the status line is printed as an ordinary line,
//! at most once a second.

use parking_lot::Mutex;
use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The demo's output; see the module docs.
#[derive(Debug, Clone)]
pub struct Console {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    terminal: bool,
    step: usize,
    /// The status line currently drawn (terminal) or last printed.
    status: Option<String>,
    status_printed: Option<Instant>,
}

impl Console {
    /// A console on stdout that counts time from now.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                start: Instant::now(),
                terminal: std::io::stdout().is_terminal(),
                step: 0,
                status: None,
                status_printed: None,
            })),
        }
    }

    /// Time since the console was created.
    pub fn elapsed(&self) -> Duration {
        self.with(|inner| inner.start.elapsed())
    }

    /// Prints the next numbered step: `[  12.3s] 4. title`.
    pub fn step(&self, title: &str) {
        self.with(|inner| {
            inner.step += 1;
            let line = format!("{} {}. {title}", stamp(inner.start), inner.step);
            inner.print(&line);
        });
    }

    /// Prints a detail line under the current step.
    pub fn detail(&self, text: &str) {
        self.with(|inner| inner.print(&format!("{:10} {text}", "")));
    }

    /// Prints a line with a time stamp but no step number.
    pub fn note(&self, text: &str) {
        self.with(|inner| {
            let line = format!("{}    {text}", stamp(inner.start));
            inner.print(&line);
        });
    }

    /// Shows `text` as the status line (replacing the previous one).
    pub fn status(&self, text: &str) {
        self.with(|inner| {
            let line = format!("{:10} {text}", "");
            if inner.terminal {
                inner.clear_status();
                print!("{line}");
                let _ = std::io::stdout().flush();
                inner.status = Some(line);
            } else if inner.status.as_deref() != Some(line.as_str())
                && inner
                    .status_printed
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            {
                println!("{line}");
                inner.status = Some(line);
                inner.status_printed = Some(Instant::now());
            }
        });
    }

    /// Removes the status line.
    pub fn clear_status(&self) {
        self.with(|inner| {
            inner.clear_status();
            inner.status = None;
            inner.status_printed = None;
        });
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while printing leaves nothing inconsistent: keep going.
        let mut inner = self.inner.lock();
        f(&mut inner)
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn print(&mut self, line: &str) {
        if self.terminal {
            self.clear_status();
            println!("{line}");
            if let Some(status) = &self.status {
                print!("{status}");
            }
        } else {
            println!("{line}");
        }
        let _ = std::io::stdout().flush();
    }

    /// Erases the drawn status line on a terminal (carriage return, clear
    /// to the end of the line).
    fn clear_status(&self) {
        if self.terminal && self.status.is_some() {
            print!("\r\x1b[2K");
        }
    }
}

/// `[  12.3s]`
fn stamp(start: Instant) -> String {
    format!("[{:>6.1}s]", start.elapsed().as_secs_f64())
}

/// A progress bar: `[########............] 40% (1.6 GiB of 4.0 GiB)`;
/// `starting` while the total is not known.
pub fn bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 20;
    if total == 0 {
        return "starting".to_string();
    }
    let done = done.min(total);
    let percent = done.saturating_mul(100) / total;
    let filled = usize::try_from(done.saturating_mul(WIDTH) / total).unwrap_or(0);
    let empty = usize::try_from(WIDTH).unwrap_or(0).saturating_sub(filled);
    format!(
        "[{}{}] {percent}% ({} of {})",
        "#".repeat(filled),
        ".".repeat(empty),
        bytes(done),
        bytes(total)
    )
}

/// A byte count with IEC units (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bars_are_bounded() {
        assert_eq!(bar(0, 0), "starting");
        assert!(bar(0, 100).starts_with("[....................] 0%"));
        assert!(bar(50, 100).starts_with("[##########..........] 50%"));
        assert!(bar(200, 100).starts_with("[####################] 100%"));
        assert_eq!(
            bar(1 << 30, 4 << 30),
            "[#####...............] 25% (1.0 GiB of 4.0 GiB)"
        );
    }

    #[test]
    fn stamps_are_aligned() {
        assert_eq!(stamp(Instant::now()).len(), "[  12.3s]".len());
    }
}
