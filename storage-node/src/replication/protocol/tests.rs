//! Frame encoding and validation.

use super::*;

fn header() -> RequestHeader {
    RequestHeader {
        op: Op::Write,
        flags: Flags::FUA,
        request_id: 7,
        epoch: 3,
        session: 11,
        offset: 4096,
        length: 5,
        payload_len: 5,
        payload_crc: crc32c::crc32c(b"hello"),
    }
}

async fn decode(bytes: &[u8]) -> Result<Option<(RequestHeader, String)>, Error> {
    let mut reader = bytes;
    read_request_header(&mut reader).await
}

#[tokio::test]
async fn request_header_round_trips() {
    let encoded = header().encode("vol-1");
    assert_eq!(encoded.as_bytes().len(), REQUEST_HEADER_LEN + 5);
    let (decoded, volume) = decode(encoded.as_bytes())
        .await
        .expect("decode")
        .expect("a frame");
    assert_eq!(decoded, header());
    assert_eq!(volume, "vol-1");
    assert!(matches!(decode(&[]).await, Ok(None)));
    // Version 1 (no session) is refused, not misread.
    let mut old = encoded.as_bytes().to_vec();
    old[4] = 1;
    assert!(matches!(decode(&old).await, Err(Error::BadVersion(1))));
    assert!(matches!(
        decode(&encoded.as_bytes()[..20]).await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn every_corrupted_header_byte_is_detected() {
    let encoded = header().encode("vol-1");
    for at in 0..encoded.as_bytes().len() {
        let mut bytes = encoded.as_bytes().to_vec();
        bytes[at] ^= 0x10;
        let result = decode(&bytes).await;
        assert!(
            matches!(
                result,
                Err(Error::BadMagic(_)
                    | Error::BadVersion(_)
                    | Error::VolumeIdLength(_)
                    | Error::HeaderChecksum
                    | Error::Closed)
            ),
            "flipping byte {at} gave {result:?}"
        );
    }
}

#[tokio::test]
async fn bounds_and_flags_are_checked_after_the_crc() {
    let big = RequestHeader {
        payload_len: MAX_PAYLOAD_BYTES as u32 + 1,
        ..header()
    };
    assert!(matches!(
        decode(big.encode("v").as_bytes()).await,
        Err(Error::PayloadTooLarge { request_id: 7, .. })
    ));
    let flags = RequestHeader {
        op: Op::Read,
        ..header()
    };
    assert!(matches!(
        decode(flags.encode("v").as_bytes()).await,
        Err(Error::BadFlags { op: Op::Read, .. })
    ));
    let mut unknown = header().encode("v");
    unknown.as_mut_bytes()[5] = 99;
    let bytes = unknown.as_mut_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..60]), b"v");
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode(bytes).await,
        Err(Error::UnknownOp { op: 99, .. })
    ));
}

#[tokio::test]
async fn payload_crc_is_checked() {
    let mut good: &[u8] = b"hello";
    let crc = crc32c::crc32c(b"hello");
    let payload = read_payload(&mut good, 1, 5, crc).await.expect("payload");
    assert_eq!(&payload[..], b"hello");
    let mut bad: &[u8] = b"hellp";
    assert!(matches!(
        read_payload(&mut bad, 1, 5, crc).await,
        Err(Error::PayloadChecksum { request_id: 1 })
    ));
}

#[tokio::test]
async fn response_header_round_trips_and_detects_corruption() {
    let response = ResponseHeader {
        status: Status::StaleEpoch,
        request_id: 9,
        detail: 12,
        payload_len: 0,
        payload_crc: 0,
    };
    let bytes = response.encode();
    let mut reader = &bytes[..];
    assert_eq!(
        read_response_header(&mut reader).await.expect("decode"),
        Some(response)
    );
    for at in 0..bytes.len() {
        let mut corrupt = bytes;
        corrupt[at] ^= 1;
        let mut reader = &corrupt[..];
        assert!(
            read_response_header(&mut reader).await.is_err(),
            "flipping byte {at} went unnoticed"
        );
    }
}

#[test]
fn payload_codecs_round_trip_and_validate() {
    let hashes = vec![
        RegionHash {
            offset: 100,
            length: 10,
            hash: 1 << 100,
            hole: false,
        },
        RegionHash {
            offset: 110,
            length: 5,
            hash: 3,
            hole: true,
        },
    ];
    let encoded = encode_region_hashes(&hashes);
    assert_eq!(
        decode_region_hashes(1, 100, 15, 10, &encoded).expect("hashes"),
        hashes
    );
    assert!(decode_region_hashes(1, 100, 25, 10, &encoded).is_err());

    let extents = vec![
        Extent {
            offset: 0,
            length: 4096,
        },
        Extent {
            offset: 8192,
            length: 100,
        },
    ];
    let encoded = encode_extents(&extents, 10_000);
    assert_eq!(
        decode_extents(1, 0, 20_000, &encoded).expect("extents"),
        (extents.clone(), 10_000)
    );
    // Beyond complete-to, out of order, or no progress: refused.
    assert!(decode_extents(1, 0, 20_000, &encode_extents(&extents, 8200)).is_err());
    let reversed = [extents[1], extents[0]];
    assert!(decode_extents(1, 0, 20_000, &encode_extents(&reversed, 10_000)).is_err());
    assert!(decode_extents(1, 50, 20_000, &encode_extents(&[], 50)).is_err());

    let info = ReplicaInfo {
        size_bytes: 1 << 30,
        block_size: 4096,
        epoch: 4,
    };
    assert_eq!(decode_info(1, &encode_info(&info)).expect("info"), info);
    assert!(decode_info(1, &[0; 8]).is_err());
    assert_eq!(
        decode_region_bytes(1, &encode_region_bytes(77)).expect("region"),
        77
    );
    assert!(decode_region_bytes(1, &[0; 7]).is_err());
}

#[test]
fn messages_are_truncated_on_char_boundaries() {
    let long = "é".repeat(MAX_MESSAGE_BYTES);
    let cut = truncate_message(&long);
    assert!(cut.len() <= MAX_MESSAGE_BYTES && cut.len() > MAX_MESSAGE_BYTES - 2);
    assert_eq!(truncate_message("short"), "short");
}
