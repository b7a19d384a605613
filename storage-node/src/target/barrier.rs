//! The write barrier of a target: the instant of a snapshot's cut.
//!
//! # What it owns
//!
//! A gate that every request changing replicas (WRITE, TRIM, WRITE_ZEROES,
//! FLUSH) passes for its whole life, from admission to its answer
//! (including any wait for a drop to commit), and the one pause that may
//! close it. [`Barrier::pause`] closes the gate: requests not yet admitted
//! wait, and the pause completes once every admitted request has answered.
//! From then until [`Barrier::resume`] or the pause's deadline, whichever
//! comes first, no request changes any replica: each in-sync replica holds
//! exactly the writes acknowledged before the pause, which is what a
//! snapshot copies. Reads are not gated.
//!
//! The gate is a tokio `RwLock`, which is fair: once a pause waits for the
//! exclusive side, later requests queue behind it, so a steady stream of
//! writes cannot starve a pause.
//!
//! The protocol is "pause, report paused, wait for resume or deadline" so
//! that one controller can hold several targets (on several nodes) paused
//! at once for a group snapshot, and a controller that vanishes never holds
//! writes beyond the deadline.
//!
//! # What it must never do
//!
//! Report paused while an admitted request may still change a replica;
//! answer a resume with `was_paused = true` after any request passed the
//! gate since the pause; hold the gate past the deadline.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, oneshot};
use tracing::{info, warn};

/// Longest deadline a pause may ask for.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// Errors of [`Barrier::pause`].
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Another pause holds (or is closing) the barrier.
    #[error("The write barrier is held by pause {pause_id:?}")]
    Held {
        /// The pause that holds it.
        pause_id: String,
    },
    /// The requests in flight did not all answer within the deadline; the
    /// barrier was not raised (requests go on).
    #[error("Writes in flight did not complete within the pause's deadline of {deadline:?}")]
    Deadline {
        /// The pause's deadline.
        deadline: Duration,
    },
    /// The deadline is zero or longer than [`MAX_DEADLINE`].
    #[error("A pause deadline must be between 1 ms and {MAX_DEADLINE:?}, not {deadline:?}")]
    InvalidDeadline {
        /// The deadline asked for.
        deadline: Duration,
    },
}

/// A raised barrier, as [`Barrier::pause`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paused {
    /// When the last admitted request answered and the gate closed: the
    /// instant of the cut.
    pub paused_at: SystemTime,
}

/// What [`Barrier::resume`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// True when this call dropped the barrier; false when the pause was
    /// unknown (never raised, or dropped at its deadline), so writes may
    /// have run since.
    pub was_paused: bool,
    /// How long the gate was closed, when `was_paused`.
    pub paused: Duration,
}

/// Puts a closing barrier back to open when dropped (see [`Barrier::pause`]).
struct Reopen {
    state: Arc<Mutex<State>>,
}

impl Drop for Reopen {
    fn drop(&mut self) {
        let mut state = self.state.lock();
        if matches!(*state, State::Closing { .. }) {
            *state = State::Open;
        }
    }
}

/// Proof that a request passed the gate; it holds the gate open (shared)
/// until dropped.
pub struct Admission {
    _guard: OwnedRwLockReadGuard<()>,
}

/// The barrier; see the module docs.
#[derive(Default)]
pub struct Barrier {
    gate: Arc<RwLock<()>>,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
enum State {
    #[default]
    Open,
    /// A pause waits for the requests in flight.
    Closing {
        pause_id: String,
    },
    Held(Held),
}

struct Held {
    pause_id: String,
    /// Tells every holder apart, so that a deadline firing late cannot
    /// reopen a later pause with the same id.
    generation: u64,
    paused: Paused,
    closed_at: Instant,
    release: oneshot::Sender<()>,
}

impl Barrier {
    /// Waits until the gate is open and admits one request; the request
    /// keeps the admission until it has answered.
    ///
    /// # Cancel safety
    /// Cancel safe: a cancelled wait admits nothing.
    pub async fn admit(&self) -> Admission {
        Admission {
            _guard: Arc::clone(&self.gate).read_owned().await,
        }
    }

    /// Closes the gate for the pause `pause_id`: waits until every admitted
    /// request answered, then holds new ones until [`Barrier::resume`] with
    /// the same id or until `deadline` after `started` (when the request
    /// arrived), whichever comes first. The same id while it holds answers
    /// the same [`Paused`]. The holder runs as a task that `spawn` starts
    /// (the target's, so that stopping the target drops the barrier).
    ///
    /// Errors: [`PauseError::Held`] while another pause holds or closes the
    /// gate (or the same one is still closing), [`PauseError::Deadline`]
    /// when the requests in flight outlast the deadline,
    /// [`PauseError::InvalidDeadline`].
    ///
    /// # Cancel safety
    /// Cancel safe: a pause cancelled while closing gives up and leaves the
    /// barrier open; once it answered, it holds until resumed or its
    /// deadline.
    pub async fn pause(
        &self,
        pause_id: &str,
        started: Instant,
        deadline: Duration,
        spawn: impl FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>),
    ) -> Result<Paused, PauseError> {
        if deadline.is_zero() || deadline > MAX_DEADLINE {
            return Err(PauseError::InvalidDeadline { deadline });
        }
        {
            let mut state = self.state.lock();
            match &*state {
                State::Held(held) if held.pause_id == pause_id => return Ok(held.paused.clone()),
                State::Held(Held { pause_id, .. }) | State::Closing { pause_id } => {
                    return Err(PauseError::Held {
                        pause_id: pause_id.clone(),
                    });
                }
                State::Open => {
                    *state = State::Closing {
                        pause_id: pause_id.to_owned(),
                    }
                }
            }
        }
        // Reopens the state if this future is dropped while closing (the
        // caller went away: gRPC drops the handler of a cancelled call) or
        // times out; once the state is `Held` its drop changes nothing.
        let _reopen = Reopen {
            state: Arc::clone(&self.state),
        };
        let expires = started + deadline;
        let closing = tokio::time::timeout_at(expires.into(), Arc::clone(&self.gate).write_owned());
        let Ok(guard) = closing.await else {
            return Err(PauseError::Deadline { deadline });
        };
        let paused = Paused {
            paused_at: SystemTime::now(),
        };
        let (release, released) = oneshot::channel();
        let generation = next_generation();
        *self.state.lock() = State::Held(Held {
            pause_id: pause_id.to_owned(),
            generation,
            paused: paused.clone(),
            closed_at: Instant::now(),
            release,
        });
        spawn(Box::pin(hold(
            guard,
            released,
            expires,
            Arc::clone(&self.state),
            generation,
            pause_id.to_owned(),
        )));
        Ok(paused)
    }

    /// Drops the barrier raised by `pause_id`. Idempotent; see [`Resumed`].
    pub fn resume(&self, pause_id: &str) -> Resumed {
        let mut state = self.state.lock();
        let held = match std::mem::take(&mut *state) {
            State::Held(held) if held.pause_id == pause_id => held,
            other => {
                *state = other;
                return Resumed::not_paused();
            }
        };
        let paused = held.closed_at.elapsed();
        // The holder drops the gate's guard on this signal; if it already
        // fired its deadline it is waiting for this lock and will find the
        // state open. Either way nothing passed the gate before now.
        let _ = held.release.send(());
        Resumed {
            was_paused: true,
            paused,
        }
    }

    /// The id of the pause that holds the gate, if one does.
    pub fn holder(&self) -> Option<String> {
        match &*self.state.lock() {
            State::Held(held) => Some(held.pause_id.clone()),
            State::Open | State::Closing { .. } => None,
        }
    }
}

impl Resumed {
    fn not_paused() -> Self {
        Resumed {
            was_paused: false,
            paused: Duration::ZERO,
        }
    }
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Holds the gate closed until released or `expires`.
async fn hold(
    guard: OwnedRwLockWriteGuard<()>,
    released: oneshot::Receiver<()>,
    expires: Instant,
    state: Arc<Mutex<State>>,
    generation: u64,
    pause_id: String,
) {
    tokio::select! {
        _ = released => {}
        () = tokio::time::sleep_until(expires.into()) => {
            let mut state = state.lock();
            if matches!(&*state, State::Held(held) if held.generation == generation) {
                *state = State::Open;
                warn!(pause.id = %pause_id, "Write barrier dropped at its deadline without a resume");
            }
        }
    }
    drop(guard);
    info!(pause.id = %pause_id, "Write barrier dropped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_task(task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(task);
    }

    async fn pause(barrier: &Barrier, id: &str, deadline_ms: u64) -> Result<Paused, PauseError> {
        barrier
            .pause(
                id,
                Instant::now(),
                Duration::from_millis(deadline_ms),
                spawn_task,
            )
            .await
    }

    /// True if an admission is granted within 50 ms.
    async fn admits(barrier: &Barrier) -> bool {
        tokio::time::timeout(Duration::from_millis(50), barrier.admit())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn pause_waits_for_admitted_requests_and_holds_new_ones() {
        let barrier = Arc::new(Barrier::default());
        let in_flight = barrier.admit().await;
        let pausing = {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move { pause(&barrier, "snap", 10_000).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !pausing.is_finished(),
            "paused while a request was in flight"
        );
        // Queued behind the pause (fair lock): a new request waits.
        assert!(!admits(&barrier).await);
        drop(in_flight);
        let paused = pausing.await.expect("task").expect("pause");
        assert!(paused.paused_at <= SystemTime::now());
        assert!(!admits(&barrier).await, "admitted while paused");
        assert_eq!(barrier.holder().as_deref(), Some("snap"));
        let resumed = barrier.resume("snap");
        assert!(resumed.was_paused);
        assert!(admits(&barrier).await, "not admitted after resume");
        assert_eq!(barrier.holder(), None);
    }

    #[tokio::test]
    async fn pause_is_idempotent_and_exclusive() {
        let barrier = Barrier::default();
        let first = pause(&barrier, "a", 10_000).await.expect("pause");
        assert_eq!(pause(&barrier, "a", 10_000).await.expect("pause"), first);
        assert!(matches!(
            pause(&barrier, "b", 10_000).await,
            Err(PauseError::Held { pause_id }) if pause_id == "a"
        ));
        assert!(!barrier.resume("b").was_paused, "another id resumed it");
        assert!(barrier.resume("a").was_paused);
        assert!(!barrier.resume("a").was_paused, "resumed twice");
        pause(&barrier, "b", 10_000).await.expect("pause");
        assert!(barrier.resume("b").was_paused);
    }

    #[tokio::test]
    async fn in_flight_request_past_the_deadline_fails_the_pause_and_reopens() {
        let barrier = Barrier::default();
        let in_flight = barrier.admit().await;
        assert!(matches!(
            pause(&barrier, "slow", 50).await,
            Err(PauseError::Deadline { .. })
        ));
        drop(in_flight);
        assert!(
            admits(&barrier).await,
            "gate stayed closed after a failed pause"
        );
        assert_eq!(barrier.holder(), None);
        pause(&barrier, "next", 10_000).await.expect("pause");
    }

    #[tokio::test]
    async fn deadline_drops_the_barrier_and_voids_the_resume() {
        let barrier = Barrier::default();
        pause(&barrier, "lost", 100).await.expect("pause");
        assert!(!admits(&barrier).await);
        let admitted = tokio::time::timeout(Duration::from_secs(5), barrier.admit()).await;
        assert!(admitted.is_ok(), "the deadline did not reopen the gate");
        drop(admitted);
        let resumed = barrier.resume("lost");
        assert!(
            !resumed.was_paused,
            "a resume after the deadline claimed the cut"
        );
    }

    #[tokio::test]
    async fn a_pause_cancelled_while_closing_leaves_the_barrier_open() {
        let barrier = Barrier::default();
        let in_flight = barrier.admit().await;
        // The caller gives up (a gRPC client's timeout drops the handler).
        let cancelled =
            tokio::time::timeout(Duration::from_millis(50), pause(&barrier, "gone", 10_000)).await;
        assert!(cancelled.is_err(), "paused with a request in flight");
        drop(in_flight);
        assert!(admits(&barrier).await, "a cancelled pause closed the gate");
        pause(&barrier, "next", 10_000)
            .await
            .expect("a cancelled pause still holds the barrier");
        assert!(barrier.resume("next").was_paused);
    }

    #[tokio::test]
    async fn invalid_deadlines_are_refused() {
        let barrier = Barrier::default();
        for ms in [0, 600_001] {
            assert!(matches!(
                pause(&barrier, "x", ms).await,
                Err(PauseError::InvalidDeadline { .. })
            ));
        }
        assert!(admits(&barrier).await);
    }
}
