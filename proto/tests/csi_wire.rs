//! Checks `csi.proto` against the CSI v1.12 wire format with hand-written
//! bytes: a wrong field number, wire type or enum value makes a decode land
//! in the wrong field (or in none) and an encode produce other bytes.
//!
//! Each byte string is spelled out as tag, length, payload, with the tag
//! written as `(field << 3) | wire_type` so the number under test is visible.

use ballast_proto::csi;
use prost::Message;
use std::collections::HashMap;

/// Wire type of varints (ints, bools, enums).
const VARINT: u8 = 0;
/// Wire type of strings, bytes, sub-messages and map entries.
const LEN: u8 = 2;

fn tag(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}

/// One length-delimited field: tag, length, payload.
fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![
        tag(field, LEN),
        u8::try_from(payload.len()).expect("short test payload"),
    ];
    out.extend_from_slice(payload);
    out
}

/// One varint field with a value below 128.
fn small_varint(field: u8, value: u8) -> Vec<u8> {
    assert!(value < 128);
    vec![tag(field, VARINT), value]
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn node_stage_volume_request_fields() {
    // volume_id = 1, staging_target_path = 3, volume_capability = 4 with
    // mount = 2 { fs_type = 1 } and access_mode = 3 { mode = 1 }.
    let bytes = cat(&[
        ld(1, b"vol-1"),
        ld(3, b"/stage"),
        ld(
            4,
            &cat(&[
                ld(2, &ld(1, b"ext4")),
                ld(3, &small_varint(1, 1)), // SINGLE_NODE_WRITER
            ]),
        ),
        ld(5, &cat(&[ld(1, b"user"), ld(2, b"pw")])), // secrets
    ]);
    let req = csi::NodeStageVolumeRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(req.volume_id, "vol-1");
    assert_eq!(req.staging_target_path, "/stage");
    assert_eq!(req.secrets.get("user").map(String::as_str), Some("pw"));
    let cap = req.volume_capability.expect("volume_capability");
    match cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => assert_eq!(m.fs_type, "ext4"),
        other => panic!("expected a mount access type, got {other:?}"),
    }
    assert_eq!(
        cap.access_mode.map(|m| m.mode()),
        Some(csi::volume_capability::access_mode::Mode::SingleNodeWriter)
    );
}

#[test]
fn block_access_type_is_field_one() {
    let bytes = cat(&[ld(1, &[]), ld(3, &small_varint(1, 7))]);
    let cap = csi::VolumeCapability::decode(bytes.as_slice()).expect("decode");
    assert!(matches!(
        cap.access_type,
        Some(csi::volume_capability::AccessType::Block(_))
    ));
    assert_eq!(
        cap.access_mode.map(|m| m.mode()),
        Some(csi::volume_capability::access_mode::Mode::SingleNodeMultiWriter)
    );
}

#[test]
fn node_publish_volume_request_encodes_in_spec_numbers() {
    let req = csi::NodePublishVolumeRequest {
        volume_id: "v".into(),
        staging_target_path: "/s".into(),
        target_path: "/t".into(),
        readonly: true,
        secrets: HashMap::from([("k".to_string(), "x".to_string())]),
        ..Default::default()
    };
    let want = cat(&[
        ld(1, b"v"),
        ld(3, b"/s"),
        ld(4, b"/t"),
        small_varint(6, 1),
        ld(7, &cat(&[ld(1, b"k"), ld(2, b"x")])),
    ]);
    assert_eq!(req.encode_to_vec(), want);
}

#[test]
fn volume_stats_and_condition_fields() {
    let want = cat(&[
        ld(
            1,
            &cat(&[
                small_varint(1, 10), // available
                small_varint(2, 30), // total
                small_varint(3, 20), // used
                small_varint(4, 2),  // unit = INODES
            ]),
        ),
        ld(2, &cat(&[small_varint(1, 1), ld(2, b"bad")])),
    ]);
    let resp = csi::NodeGetVolumeStatsResponse {
        usage: vec![csi::VolumeUsage {
            available: 10,
            total: 30,
            used: 20,
            unit: csi::volume_usage::Unit::Inodes as i32,
        }],
        volume_condition: Some(csi::VolumeCondition {
            abnormal: true,
            message: "bad".into(),
        }),
    };
    assert_eq!(resp.encode_to_vec(), want);
}

#[test]
fn v1_12_controller_fields() {
    // CreateVolumeRequest.mutable_parameters = 8 and the MODIFY_VOLUME = 14
    // controller capability (GA in v1.12).
    let bytes = cat(&[ld(1, b"pvc-1"), ld(8, &cat(&[ld(1, b"iops"), ld(2, b"9")]))]);
    let req = csi::CreateVolumeRequest::decode(bytes.as_slice()).expect("decode");
    assert_eq!(req.name, "pvc-1");
    assert_eq!(
        req.mutable_parameters.get("iops").map(String::as_str),
        Some("9")
    );

    let cap = csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc {
                r#type: csi::controller_service_capability::rpc::Type::ModifyVolume as i32,
            },
        )),
    };
    assert_eq!(cap.encode_to_vec(), ld(1, &small_varint(1, 14)));

    // Snapshot.group_snapshot_id = 6; PluginCapability.volume_expansion = 2.
    let snap = csi::Snapshot::decode(ld(6, b"g1").as_slice()).expect("decode");
    assert_eq!(snap.group_snapshot_id, "g1");
    let pcap =
        csi::PluginCapability::decode(ld(2, &small_varint(1, 1)).as_slice()).expect("decode");
    assert!(matches!(
        pcap.r#type,
        Some(csi::plugin_capability::Type::VolumeExpansion(
            csi::plugin_capability::VolumeExpansion { r#type: 1 }
        ))
    ));
}
