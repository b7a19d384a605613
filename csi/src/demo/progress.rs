//! What the demo prints while it runs: a line per step with the time since
//! the start, detail lines under it, and a status line (a spinner, or the
//! rebuild's progress bar) that indicatif redraws in place on a terminal.
//!
//! A [`Console`] is shared (cheap clones) by the steps and by the task that
//! prints pgbench's progress, so their lines never tear the status line:
//! every line is printed with the status line suspended. When stdout is not
//! a terminal the status line is printed as an ordinary line, at most once
//! a second and only when it changed.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Indent of detail and status lines: the width of a time stamp and a space.
const INDENT: &str = "          ";
/// How often a terminal's spinner turns.
const TICK: Duration = Duration::from_millis(120);
/// How often, at most, a changed status is printed when stdout is not a
/// terminal.
const PLAIN_STATUS_EVERY: Duration = Duration::from_secs(1);

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
    /// The status line drawn on a terminal.
    bar: Option<ProgressBar>,
    /// The status line last printed when stdout is not a terminal, and when.
    plain: Option<(String, Instant)>,
}

impl Console {
    /// A console on stdout that counts time from now.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                start: Instant::now(),
                terminal: std::io::stdout().is_terminal(),
                step: 0,
                bar: None,
                plain: None,
            })),
        }
    }

    /// Time since the console was created.
    pub fn elapsed(&self) -> Duration {
        self.inner.lock().start.elapsed()
    }

    /// Prints the next numbered step: `[  12.3s] 4. title`.
    pub fn step(&self, title: &str) {
        let mut inner = self.inner.lock();
        inner.step += 1;
        let line = format!("{} {}. {title}", stamp(inner.start), inner.step);
        inner.print(&line);
    }

    /// Prints a detail line under the current step.
    pub fn detail(&self, text: &str) {
        self.inner.lock().print(&format!("{INDENT}{text}"));
    }

    /// Prints a line with a time stamp but no step number.
    pub fn note(&self, text: &str) {
        let inner = self.inner.lock();
        let line = format!("{}    {text}", stamp(inner.start));
        inner.print(&line);
    }

    /// Shows `text` with a spinner as the status line (replacing the
    /// previous one).
    pub fn status(&self, text: &str) {
        let mut inner = self.inner.lock();
        if inner.terminal {
            let bar = inner.bar();
            bar.set_style(style("{spinner} {msg}"));
            bar.unset_length();
            bar.set_message(text.to_string());
        } else {
            inner.print_plain(text);
        }
    }

    /// Shows a progress bar of `done_bytes` out of `total_bytes` after
    /// `label` as the status line; `label starting` while the total is not
    /// known (0).
    pub fn progress(&self, label: &str, done_bytes: u64, total_bytes: u64) {
        if total_bytes == 0 {
            return self.status(&format!("{label} starting"));
        }
        let mut inner = self.inner.lock();
        if inner.terminal {
            let bar = inner.bar();
            bar.set_style(style(
                "{spinner} {msg} [{bar:20}] {percent}% ({bytes} of {total_bytes})",
            ));
            bar.set_length(total_bytes);
            bar.set_position(done_bytes.min(total_bytes));
            bar.set_message(label.to_string());
        } else {
            inner.print_plain(&format!("{label} {}", bar(done_bytes, total_bytes)));
        }
    }

    /// Removes the status line.
    pub fn clear_status(&self) {
        let mut inner = self.inner.lock();
        if let Some(bar) = inner.bar.take() {
            bar.finish_and_clear();
        }
        inner.plain = None;
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Prints `line` above the status line.
    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// The terminal's status line, drawn from now on.
    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.enable_steady_tick(TICK);
            bar
        })
    }

    /// Prints a status line on a non-terminal stdout: only a changed one,
    /// and at most once per [`PLAIN_STATUS_EVERY`].
    fn print_plain(&mut self, text: &str) {
        let due = self
            .plain
            .as_ref()
            .is_none_or(|(last, at)| last != text && at.elapsed() >= PLAIN_STATUS_EVERY);
        if due {
            println!("{INDENT}{text}");
            self.plain = Some((text.to_string(), Instant::now()));
        }
    }
}

/// A status line style, indented, from a template that is a constant of
/// this module.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!("{INDENT}{template}"))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("#>.")
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
