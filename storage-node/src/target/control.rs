//! The target's client of the controller's `TargetControlService`: the
//! in-sync set changes that decide safety (DropReplica, ReplicaInSync) and
//! rebuild progress reports.
//!
//! [`Controller::commit`] retries a change until the controller gives a
//! definite answer: committed, refused, or "your epoch is stale" (told by
//! the typed [`TargetControlRefusal`] in the status details, never by the
//! wording of the message). Transport
//! errors, timeouts and the controller's own failures (UNAVAILABLE,
//! INTERNAL, ...) leave the outcome unknown, so they are retried with a
//! bounded backoff for as long as the target runs (invariant 2: a write
//! that waits on a drop is never acknowledged while the controller cannot
//! be reached).
//!
//! What it must never do: report a change as committed without an OK
//! answer from the controller.

use std::time::Duration;

use ballast_proto::controller::target_control_refusal::Reason as RefusalReason;
use ballast_proto::controller::target_control_service_client::TargetControlServiceClient;
use ballast_proto::controller::{
    DropReplicaRequest, ReplicaInSyncRequest, ReportRebuildRequest, TargetControlRefusal,
};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use super::Error;

/// First delay between two attempts of an in-sync set change.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The controller's answer to an in-sync set change, once definite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Committed to the cluster store.
    Committed,
    /// Refused, nothing committed (e.g. the last in-sync replica).
    Refused(String),
    /// Refused because the target's epoch is not the volume's: the target
    /// must stop serving.
    StaleEpoch(String),
    /// The target stopped before an answer came.
    Stopped,
}

/// A lazily connected client of the controller's TargetControlService.
#[derive(Debug, Clone)]
pub struct Controller {
    address: String,
    client: TargetControlServiceClient<Channel>,
}

impl Controller {
    /// A client of the controller at `address` (`http://HOST:PORT`, or
    /// `HOST:PORT`); every call times out after `timeout`. Connects on the
    /// first call, and again after a failure.
    ///
    /// Errors: [`Error::ControllerAddress`] if `address` is not a URI.
    pub fn new(address: &str, timeout: Duration) -> Result<Self, Error> {
        let uri = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|source| Error::ControllerAddress {
                address: address.to_owned(),
                source,
            })?
            .timeout(timeout)
            .connect_timeout(timeout);
        Ok(Self {
            address: address.to_owned(),
            client: TargetControlServiceClient::new(endpoint.connect_lazy()),
        })
    }

    /// The controller's address as given.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Asks once to drop the replica on `node_id` from the in-sync set.
    async fn drop_replica_once(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        reason: &str,
    ) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .drop_replica(DropReplicaRequest {
                volume_id: volume_id.to_owned(),
                epoch,
                node_id: node_id.to_owned(),
                reason: reason.to_owned(),
            })
            .await
            .map(drop)
    }

    /// Asks once to add the replica on `node_id` to the in-sync set.
    async fn replica_in_sync_once(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
    ) -> Result<(), tonic::Status> {
        self.client
            .clone()
            .replica_in_sync(ReplicaInSyncRequest {
                volume_id: volume_id.to_owned(),
                epoch,
                node_id: node_id.to_owned(),
            })
            .await
            .map(drop)
    }

    /// Drops the replica on `node_id` from the in-sync set, retrying until
    /// the controller answers definitely or `stopped` turns true.
    ///
    /// # Cancel safety
    /// Cancel safe, but a dropped call may have committed: the caller must
    /// then treat the outcome as unknown.
    pub async fn drop_replica(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        reason: &str,
        stopped: watch::Receiver<bool>,
    ) -> Verdict {
        self.commit("DropReplica", volume_id, node_id, stopped, || {
            self.drop_replica_once(volume_id, epoch, node_id, reason)
        })
        .await
    }

    /// Adds the replica on `node_id` to the in-sync set, retrying like
    /// [`Controller::drop_replica`].
    ///
    /// # Cancel safety
    /// As [`Controller::drop_replica`].
    pub async fn replica_in_sync(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        stopped: watch::Receiver<bool>,
    ) -> Verdict {
        self.commit("ReplicaInSync", volume_id, node_id, stopped, || {
            self.replica_in_sync_once(volume_id, epoch, node_id)
        })
        .await
    }

    /// Reports rebuild progress once (not safety-relevant; errors are only
    /// logged).
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn report_rebuild(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        done_bytes: u64,
        total_bytes: u64,
    ) {
        let result = self
            .client
            .clone()
            .report_rebuild(ReportRebuildRequest {
                volume_id: volume_id.to_owned(),
                epoch,
                node_id: node_id.to_owned(),
                done_bytes,
                total_bytes,
            })
            .await;
        if let Err(status) = result {
            debug!(volume.id = %volume_id, node.id = %node_id, epoch, %status, "Cannot report rebuild progress");
        }
    }

    async fn commit<F, Fut>(
        &self,
        what: &str,
        volume_id: &str,
        node_id: &str,
        mut stopped: watch::Receiver<bool>,
        call: F,
    ) -> Verdict
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let mut backoff = BACKOFF_MIN;
        let mut attempt = 0u32;
        loop {
            if *stopped.borrow() {
                return Verdict::Stopped;
            }
            attempt += 1;
            let result = tokio::select! {
                result = call() => result,
                _ = stopped.wait_for(|s| *s) => return Verdict::Stopped,
            };
            let status = match result {
                Ok(()) => return Verdict::Committed,
                Err(status) => status,
            };
            if let Some(verdict) = classify(&status) {
                return verdict;
            }
            warn!(
                volume.id = %volume_id,
                node.id = %node_id,
                controller = %self.address,
                attempt,
                %status,
                "{what} did not reach a verdict; retrying"
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped.wait_for(|s| *s) => return Verdict::Stopped,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// The definite verdict an error status carries, or `None` when the
/// outcome is unknown and the call must be retried.
///
/// The controller answers both a stale epoch and the last in-sync replica
/// with FAILED_PRECONDITION and tells them apart by the typed
/// [`TargetControlRefusal`] in the status details; the message is for
/// people and is never read here. A FAILED_PRECONDITION without a
/// stale-epoch refusal is a plain refusal: nothing was committed, and the
/// target keeps serving.
fn classify(status: &tonic::Status) -> Option<Verdict> {
    use tonic::Code;
    let message = status.message().to_owned();
    match status.code() {
        Code::FailedPrecondition => {
            let reason = TargetControlRefusal::from_status(status).map(|r| r.reason());
            match reason {
                Some(RefusalReason::StaleEpoch) => Some(Verdict::StaleEpoch(message)),
                Some(RefusalReason::LastInSyncReplica | RefusalReason::Unspecified) | None => {
                    Some(Verdict::Refused(message))
                }
            }
        }
        Code::InvalidArgument | Code::NotFound => Some(Verdict::Refused(message)),
        Code::Ok => Some(Verdict::Committed),
        Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(reason: RefusalReason, message: &str) -> tonic::Status {
        TargetControlRefusal::new(reason, 4).into_status(tonic::Code::FailedPrecondition, message)
    }

    #[test]
    fn verdicts_of_statuses() {
        let stale = refusal(
            RefusalReason::StaleEpoch,
            "Stale epoch 3 for volume v: the volume is at epoch 4",
        );
        assert!(matches!(classify(&stale), Some(Verdict::StaleEpoch(_))));
        let last = refusal(
            RefusalReason::LastInSyncReplica,
            "Replica on node n is the last in-sync",
        );
        assert!(matches!(classify(&last), Some(Verdict::Refused(_))));
        assert_eq!(classify(&tonic::Status::unavailable("down")), None);
        assert_eq!(classify(&tonic::Status::deadline_exceeded("slow")), None);
        assert_eq!(classify(&tonic::Status::internal("store")), None);
    }

    #[test]
    fn the_typed_reason_decides_not_the_message() {
        // Reworded: nothing in the message says "stale", the reason does.
        let reworded = refusal(RefusalReason::StaleEpoch, "A newer target owns volume v");
        assert!(matches!(
            classify(&reworded),
            Some(Verdict::StaleEpoch(m)) if m == "A newer target owns volume v"
        ));
        // Words without the reason: a plain refusal, the target serves on.
        let words = tonic::Status::failed_precondition("Stale epoch 3 for volume v");
        assert!(matches!(classify(&words), Some(Verdict::Refused(_))));
        let words_last = refusal(RefusalReason::LastInSyncReplica, "stale epoch");
        assert!(matches!(classify(&words_last), Some(Verdict::Refused(_))));
        // Details that do not decode count as none.
        let garbage = tonic::Status::with_details(
            tonic::Code::FailedPrecondition,
            "stale epoch",
            vec![0xff, 0xff, 0xff].into(),
        );
        assert!(matches!(classify(&garbage), Some(Verdict::Refused(_))));
    }

    #[tokio::test]
    async fn addresses_without_a_scheme_get_http() {
        let controller = Controller::new("127.0.0.1:1", Duration::from_secs(1));
        assert!(controller.is_ok());
        assert!(matches!(
            Controller::new("http://bad host:1", Duration::from_secs(1)),
            Err(Error::ControllerAddress { .. })
        ));
    }
}
