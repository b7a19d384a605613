//! The [`Reconciler`] trait shared by every reconciler, and the loop that
//! runs them.
//!
//! A reconciler compares what the store says with what should be and does
//! one step towards it per pass. Every reconciler must be:
//!
//! - idempotent: running a pass twice does no more than running it once;
//! - restart-safe: it keeps no state between passes that correctness
//!   depends on, so a controller that crashed half-way through a pass
//!   finishes the work on its next start;
//! - polite: it takes a volume's operation guard before a multi-step change
//!   and skips the volume when the guard is busy.
//!
//! To add one: a small struct holding the shared [`super::Context`], an
//! `impl Reconciler`, and an entry in [`super::Context::reconcilers`].
//! A reconciler must never fail the whole pass for one bad volume: it logs
//! and moves on, and returns an error only when it could not look at
//! anything (the store is unreachable).

use std::time::Duration;

use async_trait::async_trait;
use tracing::warn;

/// One repair loop of the controller.
#[async_trait]
pub trait Reconciler: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// Runs one pass.
    ///
    /// # Errors
    ///
    /// The store error that kept the pass from running at all; it is
    /// logged and the next pass tries again.
    async fn reconcile(&self) -> Result<(), crate::store::Error>;
}

/// Runs every reconciler in order, once per `interval`, forever.
///
/// # Cancel safety
///
/// Cancel safe between store operations: every step a reconciler takes is
/// a compare-and-set, so aborting the task (at controller shutdown) leaves
/// work for the next start, never a half-written record.
pub async fn run_forever(reconcilers: Vec<Box<dyn Reconciler>>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        run_once(&reconcilers).await;
    }
}

/// Runs one pass of every reconciler, logging failures.
pub async fn run_once(reconcilers: &[Box<dyn Reconciler>]) {
    for reconciler in reconcilers {
        if let Err(error) = reconciler.reconcile().await {
            warn!(reconciler = reconciler.name(), error = %crate::error_chain(&error), "Reconciler pass failed");
        }
    }
}
