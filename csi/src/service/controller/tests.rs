//! The Controller service against a real embedded store and fake agents:
//! every rule of the CSI spec it answers for, with the code it names.

use std::collections::HashMap;
use std::sync::Arc;

use ballast_proto::csi;
use ballast_proto::csi::controller_server::Controller as _;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::{Code, Request};

use super::*;
use crate::controller::testing::{Fixture, GIB};
use crate::service::TOPOLOGY_NODE_KEY;

fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn create_request(name: &str, required: i64, replicas: u32) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: HashMap::from([
            ("replicas".to_string(), replicas.to_string()),
            ("fsType".to_string(), "xfs".to_string()),
            (
                "csi.storage.k8s.io/pvc/name".to_string(),
                "data".to_string(),
            ),
        ]),
        ..Default::default()
    }
}

fn service(fixture: &Fixture) -> Controller {
    Controller::new(
        Arc::new(Volumes::new(fixture.context.clone())),
        Arc::new(Snapshots::new(fixture.context.clone())),
    )
}

async fn create(c: &Controller, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Code> {
    c.create_volume(Request::new(req))
        .await
        .map(|r| r.into_inner().volume.unwrap_or_default())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn create_rounds_up_is_idempotent_and_refuses_another_size() {
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    let volume = create(&c, create_request("pvc-1", 10_000, 2)).await;
    let volume = volume.expect("create");
    assert_eq!(volume.volume_id, "pvc-1");
    assert_eq!(volume.capacity_bytes, 12_288, "rounded up to 4096");
    assert_eq!(
        volume.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    let again = create(&c, create_request("pvc-1", 10_000, 2)).await;
    assert_eq!(again.ok(), Some(volume), "same request, same volume");
    assert_eq!(
        create(&c, create_request("pvc-1", 3 * 4096, 3)).await.err(),
        Some(Code::AlreadyExists),
        "same name, other replica count"
    );
    assert_eq!(
        create(&c, create_request("pvc-1", 8 * 4096, 2)).await.err(),
        Some(Code::AlreadyExists),
        "same name, larger size"
    );
    let smaller = create(&c, create_request("pvc-1", 4096, 2)).await;
    assert_eq!(
        smaller.map(|v| v.capacity_bytes),
        Ok(12_288),
        "a larger volume satisfies a smaller required_bytes"
    );
    let mut ext4 = create_request("pvc-1", 10_000, 2);
    ext4.parameters.insert("fsType".into(), "ext4".into());
    assert_eq!(create(&c, ext4).await.err(), Some(Code::AlreadyExists));
    let mut block = create_request("pvc-1", 10_000, 2);
    block.volume_capabilities = vec![block_cap(Mode::SingleNodeWriter)];
    assert_eq!(create(&c, block).await.err(), Some(Code::AlreadyExists));
    let mut thick = create_request("pvc-1", 10_000, 2);
    thick.parameters.insert("thin".into(), "false".into());
    assert_eq!(create(&c, thick).await.err(), Some(Code::AlreadyExists));
    let mut other_mode = create_request("pvc-1", 10_000, 2);
    other_mode.volume_capabilities = vec![mount_cap(Mode::SingleNodeMultiWriter)];
    assert!(
        create(&c, other_mode).await.is_ok(),
        "any single-node mode serves the volume"
    );
    let stored = fixture.context.store.clone();
    let record = crate::controller::volume::record::read(&stored, "pvc-1")
        .await
        .expect("read")
        .expect("exists")
        .value;
    assert_eq!(record.fs_type(), Some("xfs"));
    assert_eq!(
        record.parameters.get("replicas").map(String::as_str),
        Some("2")
    );
    assert!(
        !record
            .parameters
            .contains_key("csi.storage.k8s.io/pvc/name"),
        "{:?}",
        record.parameters
    );
}

#[tokio::test]
async fn create_checks_arguments_first() {
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    let mut no_caps = create_request("pvc-2", GIB as i64, 1);
    no_caps.volume_capabilities.clear();
    assert_eq!(create(&c, no_caps).await.err(), Some(Code::InvalidArgument));
    assert_eq!(
        create(&c, create_request("", 4096, 1)).await.err(),
        Some(Code::InvalidArgument)
    );
    let mut multi = create_request("pvc-2", 4096, 1);
    multi.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    assert_eq!(create(&c, multi).await.err(), Some(Code::InvalidArgument));
    let mut bad_param = create_request("pvc-2", 4096, 1);
    bad_param.parameters.insert("thin".into(), "maybe".into());
    assert_eq!(
        create(&c, bad_param).await.err(),
        Some(Code::InvalidArgument)
    );
    let mut unknown = create_request("pvc-2", 4096, 1);
    unknown.parameters.insert("colour".into(), "red".into());
    assert_eq!(create(&c, unknown).await.err(), Some(Code::InvalidArgument));
    let mut source = create_request("pvc-2", 4096, 1);
    source.volume_content_source = Some(csi::VolumeContentSource::default());
    assert_eq!(create(&c, source).await.err(), Some(Code::InvalidArgument));
    let mut range = create_request("pvc-2", 10_000, 1);
    range.capacity_range = Some(csi::CapacityRange {
        required_bytes: 10_000,
        limit_bytes: 10_001,
    });
    assert_eq!(
        create(&c, range).await.err(),
        Some(Code::OutOfRange),
        "12288 > limit"
    );
    assert_eq!(
        create(&c, create_request("pvc-2", 4096, 4)).await.err(),
        Some(Code::ResourceExhausted),
        "4 replicas on 3 nodes"
    );
    assert!(
        fixture.agents.iter().all(|a| a.replica_names().is_empty()),
        "no refused request created a replica"
    );
}

#[tokio::test]
async fn publish_unpublish_and_their_errors() {
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    create(&c, create_request("pvc-3", GIB as i64, 3))
        .await
        .expect("create");
    let publish = |volume: &str, node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    };
    let context = c
        .controller_publish_volume(Request::new(publish("pvc-3", "node-1")))
        .await
        .expect("publish")
        .into_inner()
        .publish_context;
    let uri = context
        .get(PUBLISH_CONTEXT_NBD_URI)
        .cloned()
        .unwrap_or_default();
    assert!(uri.starts_with("nbd+unix:///pvc-3"), "{context:?}");
    let again = c
        .controller_publish_volume(Request::new(publish("pvc-3", "node-1")))
        .await
        .map(|r| r.into_inner().publish_context);
    assert_eq!(again.ok(), Some(context), "idempotent on the same node");
    let code = |r: Result<tonic::Response<csi::ControllerPublishVolumeResponse>, tonic::Status>| {
        r.err().map(|s| s.code())
    };
    assert_eq!(
        code(
            c.controller_publish_volume(Request::new(publish("pvc-3", "node-2")))
                .await
        ),
        Some(Code::FailedPrecondition),
        "single-node mode published elsewhere"
    );
    assert_eq!(
        code(
            c.controller_publish_volume(Request::new(publish("nope", "node-2")))
                .await
        ),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(
            c.controller_publish_volume(Request::new(publish("pvc-3", "node-9")))
                .await
        ),
        Some(Code::NotFound),
        "unknown node"
    );
    let mut no_cap = publish("pvc-3", "node-1");
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.controller_publish_volume(Request::new(no_cap)).await),
        Some(Code::InvalidArgument)
    );
    let mut reader = publish("pvc-3", "node-1");
    reader.volume_capability = Some(mount_cap(Mode::SingleNodeReaderOnly));
    assert_eq!(
        code(c.controller_publish_volume(Request::new(reader)).await),
        Some(Code::AlreadyExists),
        "published on node-1 with another access mode"
    );
    let mut block = publish("pvc-3", "node-1");
    block.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert_eq!(
        code(c.controller_publish_volume(Request::new(block)).await),
        Some(Code::InvalidArgument),
        "created for mount access only"
    );
    let mut readonly = publish("pvc-3", "node-1");
    readonly.readonly = true;
    assert_eq!(
        code(c.controller_publish_volume(Request::new(readonly)).await),
        Some(Code::InvalidArgument),
        "no PUBLISH_READONLY"
    );

    let got = c
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-3".into(),
        }))
        .await
        .expect("get")
        .into_inner();
    let status = got.status.unwrap_or_default();
    assert_eq!(status.published_node_ids, ["node-1"]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));

    let delete = c
        .delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: "pvc-3".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(
        delete.err().map(|s| s.code()),
        Some(Code::FailedPrecondition),
        "in use"
    );

    let unpublish = |volume: &str, node: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    };
    c.controller_unpublish_volume(Request::new(unpublish("pvc-3", "node-2")))
        .await
        .expect("unpublish from a node it is not published on");
    assert_eq!(
        fixture.agent("node-1").state().targets.len(),
        1,
        "the target on node-1 is left alone"
    );
    for (volume, node) in [("pvc-3", "node-1"), ("pvc-3", "node-1"), ("nope", "node-1")] {
        c.controller_unpublish_volume(Request::new(unpublish(volume, node)))
            .await
            .unwrap_or_else(|e| panic!("unpublish {volume} from {node}: {e}"));
    }
    assert!(
        fixture.agent("node-1").state().targets.is_empty(),
        "target stopped"
    );
    c.controller_publish_volume(Request::new(publish("pvc-3", "node-2")))
        .await
        .expect("publish on another node after unpublish");
}

#[tokio::test]
async fn delete_is_idempotent() {
    let fixture = Fixture::new(2).await;
    let c = service(&fixture);
    create(&c, create_request("pvc-4", GIB as i64, 2))
        .await
        .expect("create");
    for _ in 0..2 {
        c.delete_volume(Request::new(csi::DeleteVolumeRequest {
            volume_id: "pvc-4".into(),
            ..Default::default()
        }))
        .await
        .expect("delete");
    }
    assert!(fixture.agents.iter().all(|a| a.replica_names().is_empty()));
    let missing = c
        .delete_volume(Request::new(csi::DeleteVolumeRequest::default()))
        .await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::InvalidArgument));
}

#[tokio::test]
async fn list_pages_through_volumes_and_refuses_foreign_tokens() {
    let fixture = Fixture::new(1).await;
    let c = service(&fixture);
    for name in ["a", "b", "c"] {
        create(&c, create_request(name, 4096, 1))
            .await
            .expect("create");
    }
    let list = |max: i32, token: &str| {
        c.list_volumes(Request::new(csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        }))
    };
    let first = list(2, "").await.expect("first page").into_inner();
    let ids: Vec<_> = first
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref())
        .map(|v| v.volume_id.as_str())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let second = list(2, &first.next_token)
        .await
        .expect("second page")
        .into_inner();
    let ids: Vec<_> = second
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref())
        .map(|v| v.volume_id.as_str())
        .collect();
    assert_eq!(ids, ["c"]);
    assert_eq!(second.next_token, "");
    assert_eq!(
        list(0, "").await.map(|r| r.into_inner().entries.len()).ok(),
        Some(3)
    );
    assert_eq!(
        list(1, "x").await.err().map(|s| s.code()),
        Some(Code::Aborted)
    );
    assert_eq!(
        list(1, "9").await.err().map(|s| s.code()),
        Some(Code::Aborted)
    );
    assert_eq!(
        list(-1, "").await.err().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
}

#[tokio::test]
async fn capacity_is_what_the_replicas_th_roomiest_node_can_take() {
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    let capacity = |replicas: &str| {
        c.get_capacity(Request::new(csi::GetCapacityRequest {
            parameters: HashMap::from([("replicas".to_string(), replicas.to_string())]),
            ..Default::default()
        }))
    };
    let three = capacity("3").await.expect("capacity").into_inner();
    assert!(three.available_capacity > 0, "{three:?}");
    let four = capacity("4").await.expect("capacity").into_inner();
    assert_eq!(four.available_capacity, 0, "only three nodes");
}

#[tokio::test]
async fn validate_confirms_single_node_modes_only() {
    let fixture = Fixture::new(1).await;
    let c = service(&fixture);
    create(&c, create_request("pvc-5", 4096, 1))
        .await
        .expect("create");
    let validate = |mode: Mode, volume: &str| {
        c.validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: volume.into(),
            volume_capabilities: vec![mount_cap(mode)],
            ..Default::default()
        }))
    };
    let ok = validate(Mode::SingleNodeWriter, "pvc-5")
        .await
        .expect("validate")
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = validate(Mode::MultiNodeMultiWriter, "pvc-5")
        .await
        .expect("validate")
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");
    let check = |caps: Vec<csi::VolumeCapability>, parameters: &[(&str, &str)]| {
        c.validate_volume_capabilities(Request::new(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-5".into(),
            volume_capabilities: caps,
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }))
    };
    let block = check(vec![block_cap(Mode::SingleNodeWriter)], &[])
        .await
        .expect("validate")
        .into_inner();
    assert!(block.confirmed.is_none(), "{block:?}");
    assert!(block.message.contains("mount (xfs)"), "{block:?}");
    let params = check(
        vec![mount_cap(Mode::SingleNodeWriter)],
        &[("replicas", "1"), ("thin", "false")],
    )
    .await
    .expect("validate")
    .into_inner();
    assert!(
        params.confirmed.is_none() && params.message.contains("thin"),
        "{params:?}"
    );
    let same = check(
        vec![mount_cap(Mode::SingleNodeWriter)],
        &[("replicas", "1"), ("fsType", "xfs")],
    )
    .await
    .expect("validate")
    .into_inner();
    assert!(same.confirmed.is_some(), "{same:?}");
    assert_eq!(
        validate(Mode::SingleNodeWriter, "nope")
            .await
            .err()
            .map(|s| s.code()),
        Some(Code::NotFound)
    );
}

#[tokio::test]
async fn a_concurrent_operation_on_the_volume_is_aborted() {
    let fixture = Fixture::new(1).await;
    let c = service(&fixture);
    let held = fixture.context.guards.try_acquire("pvc-6");
    assert!(held.is_some());
    assert_eq!(
        create(&c, create_request("pvc-6", 4096, 1)).await.err(),
        Some(Code::Aborted)
    );
    assert!(fixture.agent("node-1").replica_names().is_empty());
    drop(held);
    create(&c, create_request("pvc-6", 4096, 1))
        .await
        .expect("create once the other operation ended");
}

#[tokio::test]
async fn the_condition_is_abnormal_while_replicas_are_out_of_sync() {
    use crate::controller::volume::record::{self, Change, ReplicaState};
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    create(&c, create_request("pvc-7", 4096, 3))
        .await
        .expect("create");
    let condition = |c: Controller| async move {
        c.controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-7".into(),
        }))
        .await
        .ok()
        .and_then(|r| r.into_inner().status)
        .and_then(|s| s.volume_condition)
    };
    assert_eq!(condition(c.clone()).await.map(|c| c.abnormal), Some(false));
    record::update(&fixture.context.store, "pvc-7", |r| {
        if let Some(replica) = r.replicas.first_mut() {
            replica.state = ReplicaState::Faulted;
        }
        Ok::<_, crate::store::Error>(Change::Write)
    })
    .await
    .expect("fault a replica");
    let abnormal = condition(c.clone()).await.unwrap_or_default();
    assert!(abnormal.abnormal, "{abnormal:?}");
    assert!(abnormal.message.contains("2 of 3"), "{abnormal:?}");
    let missing = c
        .controller_get_volume(Request::new(csi::ControllerGetVolumeRequest {
            volume_id: "nope".into(),
        }))
        .await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::NotFound));
}

#[tokio::test]
async fn expansion_is_offline_idempotent_and_grows_every_replica() {
    let fixture = Fixture::new(2).await;
    let c = service(&fixture);
    create(&c, create_request("pvc-8", 4096, 2))
        .await
        .expect("create");
    let expand = |required: i64, limit: i64| {
        c.controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-8".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        }))
    };
    let grown = expand(10_000, 0).await.expect("expand").into_inner();
    assert_eq!(grown.capacity_bytes, 12_288);
    assert!(grown.node_expansion_required, "a filesystem must grow too");
    for agent in &fixture.agents {
        assert_eq!(
            agent.state().replicas["pvc-8"].size_bytes,
            12_288,
            "{}",
            agent.node_id
        );
    }
    let again = expand(8192, 0)
        .await
        .expect("smaller is a no-op")
        .into_inner();
    assert_eq!(again.capacity_bytes, 12_288);
    assert_eq!(
        expand(8192, 8192).await.err().map(|s| s.code()),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        expand(0, 0).await.err().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );

    c.controller_publish_volume(Request::new(csi::ControllerPublishVolumeRequest {
        volume_id: "pvc-8".into(),
        node_id: "node-1".into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }))
    .await
    .expect("publish");
    assert_eq!(
        expand(1 << 20, 0).await.err().map(|s| s.code()),
        Some(Code::FailedPrecondition),
        "offline only"
    );
    let unknown = c
        .controller_expand_volume(Request::new(csi::ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 4096,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(Code::NotFound));
}

#[tokio::test]
async fn topology_requirements_place_replicas() {
    let fixture = Fixture::new(3).await;
    let c = service(&fixture);
    let node = |id: &str| csi::Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), id.to_string())]),
    };
    let holders = |name: &str| -> Vec<String> {
        fixture
            .agents
            .iter()
            .filter(|a| a.replica_names().contains(&name.to_string()))
            .map(|a| a.node_id.clone())
            .collect()
    };
    let mut local = create_request("local", 4096, 1);
    local.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![node("node-2"), node("node-1")],
    });
    let volume = create(&c, local).await.expect("create");
    assert_eq!(holders("local"), ["node-2"], "the first preferred node");
    assert!(
        volume.accessible_topology.is_empty(),
        "reachable everywhere"
    );

    // Requisite says where the volume must be accessible from: every
    // node, so a one-node requisite (csi-sanity, WaitForFirstConsumer)
    // places one replica there and the others anywhere.
    let mut pinned = create_request("pinned", 4096, 3);
    pinned.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![node("node-2")],
        preferred: Vec::new(),
    });
    let volume = create(&c, pinned.clone()).await.expect("create");
    assert_eq!(holders("pinned"), ["node-1", "node-2", "node-3"]);
    assert!(volume.accessible_topology.is_empty());
    let mut elsewhere = pinned.clone();
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![node("node-9")],
        preferred: Vec::new(),
    });
    create(&c, elsewhere)
        .await
        .expect("the same volume: reachable from anywhere");
    let mut near = create_request("near", 4096, 1);
    near.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![node("node-3"), node("node-1")],
        preferred: Vec::new(),
    });
    create(&c, near).await.expect("create");
    assert_eq!(holders("near"), ["node-3"], "the first requisite node");

    let mut fenced = create_request("fenced", 4096, 2);
    fenced
        .parameters
        .insert("allowedNodes".to_string(), "node-1,node-3".to_string());
    create(&c, fenced.clone()).await.expect("create");
    assert_eq!(holders("fenced"), ["node-1", "node-3"]);
    let mut elsewhere = fenced.clone();
    elsewhere
        .parameters
        .insert("allowedNodes".to_string(), "node-2,node-3".to_string());
    assert_eq!(
        create(&c, elsewhere).await.err(),
        Some(Code::AlreadyExists),
        "its replica on node-1 is not among the new allowedNodes"
    );
    let mut cramped = create_request("cramped", 4096, 3);
    cramped
        .parameters
        .insert("allowedNodes".to_string(), "node-1,node-3".to_string());
    assert_eq!(
        create(&c, cramped).await.err(),
        Some(Code::ResourceExhausted)
    );
    let mut bad = create_request("bad", 4096, 1);
    bad.parameters
        .insert("allowedNodes".to_string(), "node-1,".to_string());
    assert_eq!(create(&c, bad).await.err(), Some(Code::InvalidArgument));
    let mut empty = create_request("empty", 4096, 1);
    empty.accessibility_requirements = Some(csi::TopologyRequirement::default());
    assert_eq!(create(&c, empty).await.err(), Some(Code::InvalidArgument));
}
