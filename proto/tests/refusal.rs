//! `TargetControlRefusal` in gRPC status details: round trip, and the
//! google.rpc.Status layout generic gRPC tools decode.

use ballast_proto::controller::TargetControlRefusal;
use ballast_proto::controller::target_control_refusal::Reason;
use prost::Message;

#[test]
fn refusals_round_trip_in_status_details() {
    let status = TargetControlRefusal::new(Reason::StaleEpoch, 7)
        .into_status(tonic::Code::FailedPrecondition, "Worded any way");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "Worded any way");
    let refusal = TargetControlRefusal::from_status(&status).expect("typed refusal");
    assert_eq!(refusal.reason(), Reason::StaleEpoch);
    assert_eq!(refusal.volume_epoch, 7);
    assert_eq!(
        TargetControlRefusal::from_status(&tonic::Status::failed_precondition("stale epoch")),
        None
    );
}

#[test]
fn details_are_a_google_rpc_status() {
    let status = TargetControlRefusal::new(Reason::LastInSyncReplica, 0)
        .into_status(tonic::Code::FailedPrecondition, "last");
    let decoded = tonic_types::Status::decode(status.details()).expect("google.rpc.Status");
    assert_eq!(decoded.code, tonic::Code::FailedPrecondition as i32);
    assert_eq!(decoded.message, "last");
    let any = &decoded.details[0];
    assert_eq!(any.type_url, TargetControlRefusal::TYPE_URL);
    let refusal = TargetControlRefusal::decode(any.value.as_slice()).expect("refusal");
    assert_eq!(refusal.reason(), Reason::LastInSyncReplica);
}
