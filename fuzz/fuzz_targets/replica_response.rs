//! Replica protocol responses as a target's client reads them: a response
//! frame built from structured input with correct CRCs (its payload either
//! raw bytes or a valid INFO, ALLOCATED_EXTENTS or REGION_HASHES answer),
//! damaged, read by the real frame reader ([`read_response_header`],
//! [`read_payload`]) and decoded by the real payload decoders for the
//! request it answers, with that request's arguments bounded as the client
//! bounds them.
//!
//! Must hold: no panic, no hang; an accepted header re-encodes to its
//! bytes; a decoded payload re-encodes to the same bytes (extents, info) or
//! decodes again to the same value (region hashes, whose hole byte is
//! lenient); a changed header byte or a flipped payload bit is refused.
#![no_main]

use arbitrary::Arbitrary;
use ballast_fuzz::{Damage, block_on_bounded, damage};
use ballast_storage_node::replication::protocol::{
    MAX_PAYLOAD_BYTES, MAX_REGIONS_PER_REQUEST, RESPONSE_HEADER_LEN, ResponseHeader, Status,
    decode_extents, decode_info, decode_region_hashes, encode_extents, encode_info,
    encode_region_hashes, read_payload, read_response_header,
};
use ballast_storage_node::replication::{Extent, RegionHash, ReplicaInfo};
use libfuzzer_sys::fuzz_target;

/// The request a response answers, with the arguments the client sent.
#[derive(Debug, Arbitrary)]
enum Request {
    Info,
    Extents {
        offset: u64,
        length: u64,
    },
    RegionHashes {
        offset: u64,
        length: u64,
        region_bytes: u64,
    },
    Read,
}

#[derive(Debug, Arbitrary)]
enum Payload {
    Raw(Vec<u8>),
    Info {
        size_bytes: u64,
        block_size: u64,
        epoch: u64,
    },
    Extents {
        extents: Vec<(u64, u64)>,
        complete_to: u64,
    },
    Hashes(Vec<(u128, bool)>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    status: u8,
    request_id: u64,
    detail: u64,
    request: Request,
    payload: Payload,
    damage: Damage,
}

impl Payload {
    fn encode(&self) -> Vec<u8> {
        match self {
            Payload::Raw(bytes) => bytes.clone(),
            Payload::Info {
                size_bytes,
                block_size,
                epoch,
            } => encode_info(&ReplicaInfo {
                size_bytes: *size_bytes,
                block_size: *block_size,
                epoch: *epoch,
            })
            .to_vec(),
            Payload::Extents {
                extents,
                complete_to,
            } => {
                let extents: Vec<_> = extents
                    .iter()
                    .map(|&(offset, length)| Extent { offset, length })
                    .collect();
                encode_extents(&extents, *complete_to)
            }
            Payload::Hashes(hashes) => {
                let hashes: Vec<_> = hashes
                    .iter()
                    .map(|&(hash, hole)| RegionHash {
                        offset: 0,
                        length: 0,
                        hash,
                        hole,
                    })
                    .collect();
                encode_region_hashes(&hashes)
            }
        }
    }
}

/// Decodes `payload` as the answer to `request`, checking the round trip.
fn decode(request: &Request, payload: &[u8]) {
    match *request {
        Request::Info => {
            if let Ok(info) = decode_info(1, payload) {
                assert_eq!(&encode_info(&info)[..], payload, "INFO re-encodes");
            }
        }
        Request::Extents { offset, length } => {
            // The client asks for offset..offset+length, saturated.
            let end = offset.saturating_add(length);
            if let Ok((extents, complete_to)) = decode_extents(1, offset, end, payload) {
                assert!(complete_to <= end && (complete_to > offset || complete_to == end));
                assert_eq!(
                    encode_extents(&extents, complete_to),
                    payload,
                    "extents re-encode"
                );
            }
        }
        Request::RegionHashes {
            offset,
            length,
            region_bytes,
        } => {
            // The client's bounds: 1 to 32 MiB regions, at most
            // MAX_REGIONS_PER_REQUEST of them, a range that does not wrap.
            let region_bytes = 1 + region_bytes % MAX_PAYLOAD_BYTES as u64;
            let length = length % (region_bytes * MAX_REGIONS_PER_REQUEST + 1);
            let offset = offset.min(u64::MAX - length);
            if let Ok(hashes) = decode_region_hashes(1, offset, length, region_bytes, payload) {
                assert_eq!(hashes.iter().map(|h| h.length).sum::<u64>(), length);
                let again = decode_region_hashes(
                    1,
                    offset,
                    length,
                    region_bytes,
                    &encode_region_hashes(&hashes),
                );
                assert_eq!(again.ok(), Some(hashes), "region hashes round trip");
            }
        }
        Request::Read => {}
    }
}

fuzz_target!(|input: Input| {
    let payload = input.payload.encode();
    let header = ResponseHeader {
        status: Status::from_code(input.status % 10).expect("codes 0 to 9 are statuses"),
        request_id: input.request_id,
        detail: input.detail,
        payload_len: u32::try_from(payload.len()).expect("a fuzz input is small"),
        payload_crc: crc32c::crc32c(&payload),
    };
    let mut frame = header.encode().to_vec();
    frame.extend_from_slice(&payload);
    let intact = frame.clone();
    damage(&mut frame, RESPONSE_HEADER_LEN, 32, &input.damage);

    block_on_bounded("reading a replica response", async {
        let mut reader = &frame[..];
        let Ok(Some(decoded)) = read_response_header(&mut reader).await else {
            return;
        };
        assert_eq!(
            &decoded.encode()[..],
            &frame[..RESPONSE_HEADER_LEN],
            "a header re-encodes"
        );
        if let Damage::SetByte {
            at, fix_crc: false, ..
        } = input.damage
        {
            let at = usize::from(at) % intact.len();
            assert!(
                at >= RESPONSE_HEADER_LEN || frame[at] == intact[at],
                "a header changed without fixing its CRC was accepted"
            );
        }
        if matches!(input.damage, Damage::None) {
            assert_eq!(decoded, header);
        }
        let read = read_payload(
            &mut reader,
            decoded.request_id,
            decoded.payload_len,
            decoded.payload_crc,
        )
        .await;
        if matches!(input.damage, Damage::FlipPayloadBit { .. }) && !payload.is_empty() {
            assert!(read.is_err(), "a flipped payload bit is refused");
        }
        if let Ok(read) = read {
            decode(&input.request, &read);
        }
    });
});
