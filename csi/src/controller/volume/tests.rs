//! Volume operations, in-sync set rules and reconcilers against a real
//! embedded store and fake agents.

use std::time::Duration;

use ballast_proto::controller::TargetControlRefusal;
use ballast_proto::controller::target_control_refusal::Reason as RefusalReason;
use tonic::Code;

use super::operations::{CreateRequest, DeleteOutcome};
use super::reconcile::{Leftovers, ReplicaRepair};
use super::record::{self, ReplicaRecord, ReplicaState, VolumeRecord, VolumeState};
use super::{Error, Volumes};
use crate::controller::node::NodeState;
use crate::controller::reconciler::Reconciler;
use crate::controller::testing::{Fixture, GIB};

fn request(name: &str, size: u64, replicas: u32) -> CreateRequest {
    CreateRequest::new(name, size, replicas, true)
}

fn code(err: Error) -> Code {
    tonic::Status::from(err).code()
}

/// The typed refusal (reason, volume epoch) a FAILED_PRECONDITION status
/// of `err` carries for targets.
fn refusal(err: Error) -> Option<(RefusalReason, u64)> {
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    TargetControlRefusal::from_status(&status).map(|r| (r.reason(), r.volume_epoch))
}

fn every_replica(fixture: &Fixture) -> Vec<(String, Vec<String>)> {
    fixture
        .agents
        .iter()
        .map(|a| (a.node_id.clone(), a.replica_names()))
        .collect()
}

/// What a real target does when it drops a replica: its own view marks
/// the replica faulted.
fn mark_faulted_at_target(fixture: &Fixture, target_node: &str, volume: &str, replica_node: &str) {
    let agent = fixture.agent(target_node);
    let mut state = agent.state();
    let target = state.targets.get_mut(volume).expect("target runs");
    for replica in &mut target.replicas {
        if replica.node_id == replica_node {
            replica.state = "faulted".into();
            replica.in_sync = false;
        }
    }
}

async fn stored(fixture: &Fixture, id: &str) -> Option<VolumeRecord> {
    record::read(&fixture.context.store, id)
        .await
        .expect("read the record")
        .map(|v| v.value)
}

#[tokio::test]
async fn create_places_replicas_on_distinct_nodes_and_is_idempotent() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    let created = volumes
        .create(&request("vol-a", GIB, 2))
        .await
        .expect("create");
    assert_eq!(created.state, VolumeState::Ready);
    assert_eq!(created.replicas.len(), 2);
    assert_ne!(created.replicas[0].node_id, created.replicas[1].node_id);
    for replica in &created.replicas {
        assert_eq!(replica.state, ReplicaState::InSync);
        let agent = fixture.agent(&replica.node_id);
        assert_eq!(agent.replica_names(), ["vol-a"], "{}", replica.node_id);
        let state = agent.state();
        let on_agent = &state.replicas["vol-a"];
        assert_eq!((on_agent.size_bytes, on_agent.thin), (GIB, true));
        assert_eq!(on_agent.volume_id, "vol-a");
    }
    let holders = every_replica(&fixture)
        .into_iter()
        .filter(|(_, r)| !r.is_empty())
        .count();
    assert_eq!(holders, 2, "no third replica anywhere");

    let again = volumes
        .create(&request("vol-a", GIB, 2))
        .await
        .expect("same request again");
    assert_eq!(again, created, "the existing volume is returned as it is");

    let err = volumes
        .create(&request("vol-a", 2 * GIB, 2))
        .await
        .expect_err("other size");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(code(err), Code::AlreadyExists);
    let mut thick = request("vol-a", GIB, 2);
    thick.thin = false;
    assert_eq!(
        code(volumes.create(&thick).await.expect_err("thick")),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn invalid_arguments_are_refused_before_anything_happens() {
    let fixture = Fixture::new(1).await;
    let volumes = Volumes::new(fixture.context.clone());
    for (what, bad) in [
        ("empty name", request("", GIB, 1)),
        ("slash", request("a/b", GIB, 1)),
        ("leading dot", request(".hidden", GIB, 1)),
        ("long name", request(&"x".repeat(129), GIB, 1)),
        ("zero size", request("v", 0, 1)),
        ("unaligned size", request("v", 4097, 1)),
        ("no replicas", request("v", GIB, 0)),
    ] {
        let err = volumes.create(&bad).await.expect_err(what);
        assert_eq!(code(err), Code::InvalidArgument, "{what}");
    }
    assert!(volumes.list().await.expect("list").is_empty());
    assert!(fixture.agents[0].replica_names().is_empty());
    volumes
        .create(&request(&"x".repeat(128), 4096, 1))
        .await
        .expect("128 bytes is the limit");
}

#[tokio::test]
async fn too_few_nodes_or_too_little_room_leave_nothing_behind() {
    let fixture = Fixture::new(2).await;
    let volumes = Volumes::new(fixture.context.clone());
    let err = volumes
        .create(&request("v", GIB, 3))
        .await
        .expect_err("3 replicas on 2 nodes");
    let message = err.to_string();
    assert!(message.contains("only 2 of 2 up node(s)"), "{message}");
    assert_eq!(code(err), Code::ResourceExhausted);
    // Pools are 4 GiB with 200% overcommit: 9 GiB fits nowhere.
    let err = volumes
        .create(&request("big", 9 * GIB, 1))
        .await
        .expect_err("larger than any pool");
    assert!(err.to_string().contains("only 0 of 2"), "{err}");
    assert_eq!(code(err), Code::ResourceExhausted);
    assert!(volumes.list().await.expect("list").is_empty());
    assert!(every_replica(&fixture).iter().all(|(_, r)| r.is_empty()));
}

#[tokio::test]
async fn a_replica_that_fails_undoes_the_whole_volume() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    fixture.agent("node-3").state().fail_create = Some(Code::ResourceExhausted);
    let err = volumes
        .create(&request("v", GIB, 3))
        .await
        .expect_err("node-3 refuses");
    assert!(err.to_string().contains("node-3"), "{err}");
    assert_eq!(code(err), Code::ResourceExhausted);
    assert!(stored(&fixture, "v").await.is_none(), "record removed");
    assert!(
        every_replica(&fixture).iter().all(|(_, r)| r.is_empty()),
        "replicas destroyed: {:?}",
        every_replica(&fixture)
    );
    // Once the node accepts again, the same request succeeds.
    fixture.agent("node-3").state().fail_create = None;
    volumes.create(&request("v", GIB, 3)).await.expect("retry");
}

#[tokio::test]
async fn the_preferred_node_holds_a_replica() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    let mut req = request("v", GIB, 1);
    req.preferred_node = Some("node-2".into());
    let created = volumes.create(&req).await.expect("create");
    assert_eq!(created.replicas[0].node_id, "node-2");
    req.name = "w".into();
    req.preferred_node = Some("node-9".into());
    let err = volumes.create(&req).await.expect_err("unknown node");
    assert_eq!(code(err), Code::ResourceExhausted);
}

#[tokio::test]
async fn delete_is_idempotent_refused_while_published_and_waits_for_down_nodes() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    assert_eq!(
        volumes.delete("never-existed").await.expect("idempotent"),
        DeleteOutcome::Gone
    );
    volumes.create(&request("v", GIB, 3)).await.expect("create");
    volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish");
    let err = volumes.delete("v").await.expect_err("published");
    assert_eq!(code(err), Code::FailedPrecondition);
    assert!(stored(&fixture, "v").await.is_some());
    volumes.unpublish("v").await.expect("unpublish");

    fixture.set_alive("node-3", false);
    fixture.wait_node("node-3", NodeState::Down).await;
    let outcome = volumes.delete("v").await.expect("delete");
    assert_eq!(outcome, DeleteOutcome::Pending(vec!["node-3".to_string()]));
    assert_eq!(
        stored(&fixture, "v").await.map(|r| r.state),
        Some(VolumeState::Deleting)
    );
    assert!(fixture.agent("node-1").replica_names().is_empty());
    assert_eq!(fixture.agent("node-3").replica_names(), ["v"]);
    // The name is not free until the last replica is gone.
    let err = volumes
        .create(&request("v", GIB, 3))
        .await
        .expect_err("still deleting");
    assert_eq!(code(err), Code::Aborted);
    // A deleting volume cannot be published.
    assert!(volumes.publish("v", "node-1", false).await.is_err());

    let leftovers = Leftovers::new(fixture.context.clone());
    leftovers.reconcile().await.expect("pass");
    assert!(stored(&fixture, "v").await.is_some(), "node-3 still down");
    fixture.set_alive("node-3", true);
    fixture.wait_node("node-3", NodeState::Up).await;
    leftovers.reconcile().await.expect("pass");
    assert!(stored(&fixture, "v").await.is_none(), "record gone");
    assert!(fixture.agent("node-3").replica_names().is_empty());
    assert_eq!(
        volumes.delete("v").await.expect("again"),
        DeleteOutcome::Gone
    );
}

#[tokio::test]
async fn publish_raises_the_epoch_and_is_idempotent_on_the_same_node() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    let first = volumes
        .publish("v", "node-3", false)
        .await
        .expect("publish");
    assert_eq!(first.epoch, 1);
    assert_eq!(first.socket_path, "/fake/v.sock");
    let calls = fixture.agent("node-3").state().start_target_calls.clone();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!((call.epoch, call.size_bytes), (1, GIB));
    assert!(call.socket_path.is_empty(), "the agent picks the socket");
    assert_eq!(call.replicas.len(), 2);
    assert!(
        call.replicas
            .iter()
            .all(|r| r.in_sync && !r.data_address.is_empty())
    );
    assert_eq!(call.controller_address, "http://127.0.0.1:1");

    let again = volumes.publish("v", "node-3", false).await.expect("again");
    assert_eq!(again, first, "same target, same epoch");
    assert_eq!(fixture.agent("node-3").state().start_target_calls.len(), 1);
    let stored = stored(&fixture, "v").await.expect("record");
    assert_eq!(stored.epoch, 1);
    assert_eq!(
        stored.target.map(|t| (t.node_id, t.nbd_uri)),
        Some(("node-3".to_string(), first.nbd_uri.clone()))
    );

    // The agent restarted and lost its target: publish starts it again at
    // a new epoch instead of returning a socket nobody serves.
    fixture.agent("node-3").state().targets.clear();
    let restarted = volumes
        .publish("v", "node-3", false)
        .await
        .expect("restart");
    assert_eq!(restarted.epoch, 2);
}

#[tokio::test]
async fn a_publish_interrupted_after_the_target_started_is_completed_by_a_retry() {
    let fixture = Fixture::new(2).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    let first = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish");
    // What a controller that crashed between StartTarget and recording the
    // socket leaves: the target runs, the record has no socket.
    record::update::<Error>(&fixture.context.store, "v", |r| {
        if let Some(t) = &mut r.target {
            t.socket_path.clear();
            t.nbd_uri.clear();
        }
        Ok(record::Change::Write)
    })
    .await
    .expect("update");
    let retried = volumes.publish("v", "node-1", false).await.expect("retry");
    assert_eq!(
        retried, first,
        "the running target is adopted, not restarted"
    );
    let target = stored(&fixture, "v")
        .await
        .and_then(|r| r.target)
        .expect("target");
    assert_eq!(target.nbd_uri, first.nbd_uri);
    assert_eq!(target.socket_path, first.socket_path);
}

#[tokio::test]
async fn publishing_elsewhere_needs_force_which_fences_and_stops_the_old_target() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish");
    let err = volumes
        .publish("v", "node-2", false)
        .await
        .expect_err("elsewhere");
    assert_eq!(code(err), Code::FailedPrecondition);
    assert_eq!(
        stored(&fixture, "v").await.map(|r| r.epoch),
        Some(1),
        "epoch untouched"
    );

    let moved = volumes.publish("v", "node-2", true).await.expect("force");
    assert_eq!(moved.epoch, 2);
    assert!(
        fixture.agent("node-1").state().targets.is_empty(),
        "old target stopped"
    );
    assert_eq!(fixture.agent("node-2").state().targets["v"].epoch, 2);

    volumes.unpublish("v").await.expect("unpublish");
    assert!(fixture.agent("node-2").state().targets.is_empty());
    let record = stored(&fixture, "v").await.expect("record");
    assert!(record.target.is_none());
    assert_eq!(record.epoch, 2, "unpublish keeps the epoch");
    volumes.unpublish("v").await.expect("idempotent");
    assert_eq!(
        code(volumes.unpublish("nope").await.expect_err("missing")),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_target_that_fails_to_start_leaves_the_volume_unpublished() {
    let fixture = Fixture::new(2).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    fixture.agent("node-1").state().fail_start_target = Some(Code::Unimplemented);
    let err = volumes
        .publish("v", "node-1", false)
        .await
        .expect_err("target refused");
    assert_eq!(code(err), Code::Unimplemented);
    let record = stored(&fixture, "v").await.expect("record");
    assert!(record.target.is_none());
    assert_eq!(
        record.epoch, 1,
        "the raised epoch stays: epochs never go back"
    );
    assert_eq!(
        code(
            volumes
                .publish("v", "node-9", false)
                .await
                .expect_err("unknown node")
        ),
        Code::NotFound
    );
    fixture.set_alive("node-2", false);
    fixture.wait_node("node-2", NodeState::Down).await;
    assert_eq!(
        code(
            volumes
                .publish("v", "node-2", false)
                .await
                .expect_err("down node")
        ),
        Code::Unavailable
    );
}

#[tokio::test]
async fn drop_replica_checks_the_epoch_and_never_drops_the_last_in_sync_replica() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    let nodes: Vec<String> = stored(&fixture, "v")
        .await
        .expect("record")
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .collect();

    let err = volumes
        .drop_replica("v", epoch - 1, &nodes[0], "io error")
        .await
        .expect_err("stale");
    assert!(matches!(err, Error::StaleEpoch { .. }), "{err:?}");
    assert_eq!(refusal(err), Some((RefusalReason::StaleEpoch, epoch)));
    let err = volumes
        .drop_replica("v", epoch + 1, &nodes[0], "io error")
        .await
        .expect_err("future epoch");
    assert_eq!(code(err), Code::FailedPrecondition);
    assert_eq!(
        stored(&fixture, "v").await.expect("record").in_sync_count(),
        2,
        "nothing changed"
    );

    let after = volumes
        .drop_replica("v", epoch, &nodes[0], "io error")
        .await
        .expect("drop");
    let dropped = after.replica(&nodes[0]).expect("replica");
    assert_eq!(dropped.state, ReplicaState::Faulted);
    assert!(dropped.faulted_since_unix_ms > 0);
    let stored_now = stored(&fixture, "v").await.expect("record");
    assert_eq!(stored_now, after, "committed before the answer");
    let again = volumes
        .drop_replica("v", epoch, &nodes[0], "io error")
        .await
        .expect("idempotent");
    assert_eq!(again, after, "a second drop changes nothing");

    let err = volumes
        .drop_replica("v", epoch, &nodes[1], "io error")
        .await
        .expect_err("last in-sync");
    assert!(matches!(err, Error::LastInSync { .. }), "{err:?}");
    assert_eq!(refusal(err), Some((RefusalReason::LastInSyncReplica, 0)));
    assert_eq!(
        code(
            volumes
                .drop_replica("v", epoch, "node-9", "x")
                .await
                .expect_err("no replica there")
        ),
        Code::NotFound
    );

    let err = volumes
        .replica_in_sync("v", epoch - 1, &nodes[0])
        .await
        .expect_err("stale");
    assert_eq!(code(err), Code::FailedPrecondition);
    let back = volumes
        .replica_in_sync("v", epoch, &nodes[0])
        .await
        .expect("in sync");
    assert_eq!(back.in_sync_count(), 2);
    assert_eq!(
        back.replica(&nodes[0]).map(|r| r.faulted_since_unix_ms),
        Some(0)
    );
    volumes
        .replica_in_sync("v", epoch, &nodes[0])
        .await
        .expect("idempotent");
}

#[tokio::test]
async fn a_faulted_replica_whose_node_is_up_is_handed_to_the_target() {
    let fixture = Fixture::new(3).await;
    let volumes = Volumes::new(fixture.context.clone());
    let mut req = request("v", GIB, 3);
    req.preferred_node = Some("node-1".into());
    volumes.create(&req).await.expect("create");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    volumes
        .drop_replica("v", epoch, "node-2", "timeout")
        .await
        .expect("drop");
    mark_faulted_at_target(&fixture, "node-1", "v", "node-2");
    let repair = ReplicaRepair::new(fixture.context.clone());
    repair.reconcile().await.expect("pass");
    let calls = fixture.agent("node-1").state().add_replica_calls.clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].epoch, epoch);
    assert!(
        !calls[0].full_rebuild,
        "a returning replica gets a delta rebuild"
    );
    let wire = calls[0].replica.as_ref().expect("replica");
    assert_eq!(
        (
            wire.node_id.as_str(),
            wire.replica_name.as_str(),
            wire.in_sync
        ),
        ("node-2", "v", false)
    );
    assert_eq!(wire.data_address, "127.0.0.1:10002");
    let record = stored(&fixture, "v").await.expect("record");
    assert_eq!(
        record.replica("node-2").map(|r| r.state),
        Some(ReplicaState::Rebuilding)
    );
    // The target reports progress, then says the replica is in sync.
    volumes
        .report_rebuild("v", epoch, "node-2", GIB / 4, GIB)
        .await
        .expect("report");
    let shown = volumes.to_proto(&record);
    assert_eq!(shown.status, "degraded");
    assert!(
        shown.status_detail.contains("rebuilding (25%)"),
        "{}",
        shown.status_detail
    );
    assert_eq!(shown.replicas[1].rebuild_done_bytes, GIB / 4);
    // A second pass does not start a second rebuild.
    repair.reconcile().await.expect("pass");
    assert_eq!(fixture.agent("node-1").state().add_replica_calls.len(), 1);
    let done = volumes
        .replica_in_sync("v", epoch, "node-2")
        .await
        .expect("in sync");
    assert_eq!(volumes.to_proto(&done).status, "healthy");
}

#[tokio::test]
async fn an_unpublished_volume_stays_faulted_and_says_why() {
    let fixture = Fixture::new(2).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 2)).await.expect("create");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    volumes
        .drop_replica("v", epoch, "node-2", "x")
        .await
        .expect("drop");
    volumes.unpublish("v").await.expect("unpublish");
    ReplicaRepair::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    let record = stored(&fixture, "v").await.expect("record");
    assert_eq!(
        record.replica("node-2").map(|r| r.state),
        Some(ReplicaState::Faulted)
    );
    let shown = volumes.to_proto(&record);
    assert_eq!(shown.status, "degraded");
    assert!(
        shown.status_detail.contains("not published"),
        "{}",
        shown.status_detail
    );
}

#[tokio::test]
async fn a_replica_on_a_node_down_too_long_is_replaced_elsewhere() {
    let fixture =
        Fixture::with_timing(4, Duration::from_millis(300), Duration::from_millis(800)).await;
    let volumes = Volumes::new(fixture.context.clone());
    let mut req = request("v", GIB, 3);
    req.preferred_node = Some("node-1".into());
    let created = volumes.create(&req).await.expect("create");
    let lost = created
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .find(|n| n != "node-1")
        .expect("another replica node");
    let spare = fixture
        .agents
        .iter()
        .map(|a| a.node_id.clone())
        .find(|n| created.replica(n).is_none())
        .expect("a node without a replica");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    volumes
        .drop_replica("v", epoch, &lost, "node lost")
        .await
        .expect("drop");
    mark_faulted_at_target(&fixture, "node-1", "v", &lost);
    fixture.set_alive(&lost, false);
    fixture.wait_node(&lost, NodeState::Down).await;
    let repair = ReplicaRepair::new(fixture.context.clone());
    repair.reconcile().await.expect("pass");
    assert!(
        stored(&fixture, "v")
            .await
            .expect("record")
            .replica(&lost)
            .is_some(),
        "not replaced before --node-down-after"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    repair.reconcile().await.expect("pass");
    let record = stored(&fixture, "v").await.expect("record");
    assert!(record.replica(&lost).is_none(), "{record:?}");
    let new = record
        .replica(&spare)
        .expect("replacement on the spare node");
    assert_eq!(
        (new.state, new.full_rebuild),
        (ReplicaState::Rebuilding, true)
    );
    assert_eq!(fixture.agent(&spare).replica_names(), ["v"]);
    assert_eq!(record.retired.len(), 1);
    assert_eq!(record.retired[0].node_id, lost);
    let calls = fixture.agent("node-1").state().add_replica_calls.clone();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].full_rebuild, "a new replica is copied in full");
    assert_eq!(
        calls[0].replica.as_ref().map(|r| r.node_id.clone()),
        Some(spare)
    );

    // The lost node returns: its stale replica is destroyed.
    assert_eq!(fixture.agent(&lost).replica_names(), ["v"]);
    fixture.set_alive(&lost, true);
    fixture.wait_node(&lost, NodeState::Up).await;
    Leftovers::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    assert!(fixture.agent(&lost).replica_names().is_empty());
    assert!(
        stored(&fixture, "v")
            .await
            .expect("record")
            .retired
            .is_empty()
    );
}

#[tokio::test]
async fn a_replacement_stays_within_the_allowed_nodes() {
    let fixture =
        Fixture::with_timing(3, Duration::from_millis(300), Duration::from_millis(800)).await;
    let volumes = Volumes::new(fixture.context.clone());
    let mut req = request("v", GIB, 2);
    req.parameters = std::collections::BTreeMap::from([(
        "allowedNodes".to_string(),
        "node-1,node-2".to_string(),
    )]);
    volumes.create(&req).await.expect("create");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    volumes
        .drop_replica("v", epoch, "node-2", "node lost")
        .await
        .expect("drop");
    mark_faulted_at_target(&fixture, "node-1", "v", "node-2");
    fixture.set_alive("node-2", false);
    fixture.wait_node("node-2", NodeState::Down).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    ReplicaRepair::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    let record = stored(&fixture, "v").await.expect("record");
    assert!(
        record.replica("node-3").is_none() && record.replica("node-2").is_some(),
        "node-3 is not among allowedNodes: {record:?}"
    );
    assert!(fixture.agent("node-3").replica_names().is_empty());
}

/// Creates volume "v" with `replicas` replicas, publishes it on node-1 and
/// leaves another replica recorded as rebuilding, faulted at the target,
/// on a node that has just died (a repair handed to the target just before
/// the node went). Returns that node's id.
async fn leave_rebuilding_on_a_dead_node(
    fixture: &Fixture,
    volumes: &Volumes,
    replicas: u32,
) -> String {
    let mut req = request("v", GIB, replicas);
    req.preferred_node = Some("node-1".into());
    let created = volumes.create(&req).await.expect("create");
    let lost = created
        .replicas
        .iter()
        .map(|r| r.node_id.clone())
        .find(|n| n != "node-1")
        .expect("another replica node");
    let epoch = volumes
        .publish("v", "node-1", false)
        .await
        .expect("publish")
        .epoch;
    volumes
        .drop_replica("v", epoch, &lost, "node lost")
        .await
        .expect("drop");
    record::update::<Error>(&fixture.context.store, "v", |r| {
        if let Some(entry) = r.replica_mut(&lost) {
            entry.state = ReplicaState::Rebuilding;
        }
        Ok(record::Change::Write)
    })
    .await
    .expect("record the rebuild");
    mark_faulted_at_target(fixture, "node-1", "v", &lost);
    fixture.set_alive(&lost, false);
    lost
}

#[tokio::test]
async fn a_replica_left_rebuilding_on_a_node_that_died_is_replaced() {
    // The repair reconciler handed the replica to the target just before
    // its node died (the node still counted as up): the record says
    // rebuilding, the target's rebuild failed at once. The replica must
    // still be replaced once the node is down for --node-down-after.
    let fixture =
        Fixture::with_timing(4, Duration::from_millis(300), Duration::from_millis(800)).await;
    let volumes = Volumes::new(fixture.context.clone());
    let lost = leave_rebuilding_on_a_dead_node(&fixture, &volumes, 3).await;
    fixture.wait_node(&lost, NodeState::Down).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    ReplicaRepair::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    let record = stored(&fixture, "v").await.expect("record");
    assert!(
        record.replica(&lost).is_none(),
        "a replica stuck rebuilding on a dead node must be replaced: {record:?}"
    );
    assert_eq!(record.retired.len(), 1);
}

#[tokio::test]
async fn an_interrupted_create_is_rolled_back_by_a_reconciler() {
    let fixture = Fixture::new(2).await;
    let volumes = Volumes::new(fixture.context.clone());
    // What a controller that crashed after creating one of two replicas
    // leaves behind.
    let leftover = VolumeRecord {
        volume_id: "v".into(),
        size_bytes: GIB,
        replica_count: 2,
        thin: true,
        epoch: 0,
        state: VolumeState::Creating,
        target: None,
        replicas: ["node-1", "node-2"]
            .iter()
            .map(|n| ReplicaRecord {
                node_id: n.to_string(),
                replica_name: "v".into(),
                state: ReplicaState::InSync,
                faulted_since_unix_ms: 0,
                full_rebuild: false,
            })
            .collect(),
        retired: Vec::new(),
        created_unix_ms: 0,
        capabilities: Vec::new(),
        parameters: Default::default(),
        requisite_topology: Vec::new(),
        unclean_stop: false,
        content_source: None,
    };
    record::create(&fixture.context.store, &leftover)
        .await
        .expect("write");
    volumes
        .create_replica(&leftover, "node-1")
        .await
        .expect("one replica");
    // While an operation holds the volume, the reconciler keeps off.
    let guard = volumes.guard("v").expect("guard");
    Leftovers::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    assert!(stored(&fixture, "v").await.is_some());
    drop(guard);
    Leftovers::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    assert!(stored(&fixture, "v").await.is_none());
    assert!(fixture.agent("node-1").replica_names().is_empty());
}

#[tokio::test]
async fn a_second_operation_on_a_busy_volume_is_aborted() {
    let fixture = Fixture::new(1).await;
    let volumes = Volumes::new(fixture.context.clone());
    volumes.create(&request("v", GIB, 1)).await.expect("create");
    let _guard = volumes.guard("v").expect("guard");
    assert_eq!(
        code(
            volumes
                .publish("v", "node-1", false)
                .await
                .expect_err("busy")
        ),
        Code::Aborted
    );
    assert_eq!(
        code(volumes.delete("v").await.expect_err("busy")),
        Code::Aborted
    );
}

#[tokio::test]
async fn volumes_and_epochs_survive_a_controller_restart() {
    let fixture = Fixture::new(2).await;
    {
        let volumes = Volumes::new(fixture.context.clone());
        volumes.create(&request("v", GIB, 2)).await.expect("create");
        volumes
            .publish("v", "node-1", false)
            .await
            .expect("publish");
        volumes.publish("v", "node-2", true).await.expect("force");
    }
    let before = stored(&fixture, "v").await.expect("record");
    assert_eq!(before.epoch, 2);
    let dir = fixture.dir.clone();
    let path = dir.path().join("ballast.redb");
    drop(fixture);
    // The fixture held the only handle on the store file; a new context
    // opens it as a restarted controller would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let store = loop {
        match crate::store::EmbeddedStore::open(&path).await {
            Ok(store) => break store,
            // The aborted heartbeat task may hold the old handle a moment.
            Err(err) if tokio::time::Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(err) => panic!("reopen the store: {err}"),
        }
    };
    let after = record::read(&(std::sync::Arc::new(store) as _), "v")
        .await
        .expect("read")
        .expect("record")
        .value;
    assert_eq!(after, before);
}

#[tokio::test]
async fn a_replica_left_rebuilding_on_a_dead_node_is_shown_down_not_rebuilding() {
    // As above, but the node has not been down for --node-down-after yet:
    // the replica must be shown down with when it is replaced, the
    // condition must say so, and the record must stop claiming a rebuild
    // the live target reports aborted.
    let fixture =
        Fixture::with_timing(3, Duration::from_millis(300), Duration::from_secs(600)).await;
    let volumes = Volumes::new(fixture.context.clone());
    let lost = leave_rebuilding_on_a_dead_node(&fixture, &volumes, 2).await;
    fixture.wait_node(&lost, NodeState::Down).await;

    let record = stored(&fixture, "v").await.expect("record");
    let shown = volumes.to_proto(&record);
    let replica = shown
        .replicas
        .iter()
        .find(|r| r.node_id == lost)
        .expect("the lost replica");
    assert_eq!(replica.state, "node-down", "{replica:?}");
    assert_eq!(replica.sync_state, "rebuilding", "{replica:?}");
    assert_eq!(replica.node_state, "down", "{replica:?}");
    assert!(replica.node_down_since_unix_ms > 0, "{replica:?}");
    assert_eq!(
        replica.replace_at_unix_ms,
        replica.node_down_since_unix_ms + 600_000,
        "{replica:?}"
    );
    assert!(shown.status_detail.contains("is down"), "{shown:?}");
    let condition = volumes.condition(&record);
    assert!(condition.abnormal);
    assert!(
        condition
            .message
            .contains(&format!("replica on {lost} is down"))
            && condition.message.contains("replaced on another node in")
            && !condition.message.contains("rebuilding"),
        "{condition:?}"
    );

    ReplicaRepair::new(fixture.context.clone())
        .reconcile()
        .await
        .expect("pass");
    let record = stored(&fixture, "v").await.expect("record");
    assert_eq!(
        record.replica(&lost).map(|r| r.state),
        Some(ReplicaState::Faulted),
        "the target aborted the rebuild; the record must not say rebuilding: {record:?}"
    );
}
