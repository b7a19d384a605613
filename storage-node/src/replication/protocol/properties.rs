//! Properties of the frame codecs over generated messages (proptest):
//! every message decodes to what was encoded, and any one flipped byte of
//! a request header is refused, never misread.

use proptest::prelude::*;

use super::*;

const OPS: [Op; 8] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Trim,
    Op::WriteZeroes,
    Op::RegionHashes,
    Op::AllocatedExtents,
    Op::Info,
];

const STATUSES: [Status; 10] = [
    Status::Ok,
    Status::StaleEpoch,
    Status::NotFound,
    Status::OutOfRange,
    Status::NoSpace,
    Status::IoError,
    Status::BadRequest,
    Status::Checksum,
    Status::Unavailable,
    Status::StaleSession,
];

fn request_header() -> impl Strategy<Value = RequestHeader> {
    (
        prop::sample::select(OPS.to_vec()),
        any::<u16>(),
        any::<[u64; 5]>(),
        0..=MAX_PAYLOAD_BYTES as u32,
        any::<u32>(),
    )
        .prop_map(
            |(op, bits, [request_id, epoch, session, offset, length], payload_len, payload_crc)| {
                RequestHeader {
                    op,
                    // Only the flags the op accepts: others are refused by design.
                    flags: Flags(bits & op.allowed_flags().0),
                    request_id,
                    epoch,
                    session,
                    offset,
                    length,
                    payload_len,
                    payload_crc,
                }
            },
        )
}

fn volume_id() -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z0-9._-]{{1,{MAX_VOLUME_ID_BYTES}}}"))
        .expect("a valid regex")
}

fn decode_request(bytes: &[u8]) -> Result<Option<(RequestHeader, String)>, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut reader = bytes;
    runtime.block_on(read_request_header(&mut reader))
}

fn decode_response(bytes: &[u8]) -> Result<Option<ResponseHeader>, Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut reader = bytes;
    runtime.block_on(read_response_header(&mut reader))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn request_headers_round_trip(header in request_header(), id in volume_id()) {
        let encoded = header.encode(&id);
        let decoded = decode_request(encoded.as_bytes());
        prop_assert_eq!(decoded.ok().flatten(), Some((header, id)));
    }

    #[test]
    fn a_flipped_request_header_byte_is_refused(
        header in request_header(),
        id in volume_id(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let encoded = header.encode(&id);
        let mut bytes = encoded.as_bytes().to_vec();
        let at = at.index(bytes.len());
        bytes[at] ^= 1 << bit;
        let decoded = decode_request(&bytes);
        prop_assert!(decoded.is_err(), "byte {} bit {} misread as {:?}", at, bit, decoded);
    }

    #[test]
    fn response_headers_round_trip(
        status in prop::sample::select(STATUSES.to_vec()),
        fields in any::<(u64, u64, u32)>(),
        payload_len in 0..=MAX_PAYLOAD_BYTES as u32,
    ) {
        let (request_id, detail, payload_crc) = fields;
        let header = ResponseHeader { status, request_id, detail, payload_len, payload_crc };
        let decoded = decode_response(&header.encode());
        prop_assert_eq!(decoded.ok().flatten(), Some(header));
    }

    #[test]
    fn extents_round_trip(
        start in 0u64..1 << 40,
        gaps in prop::collection::vec((0u64..1 << 20, 1u64..1 << 20), 0..64),
        tail in 0u64..1 << 20,
    ) {
        // Ascending, not overlapping, within [start, complete_to).
        let mut extents = Vec::new();
        let mut at = start;
        for (gap, length) in gaps {
            at += gap;
            extents.push(Extent { offset: at, length });
            at += length;
        }
        let complete_to = at + tail + 1;
        let encoded = encode_extents(&extents, complete_to);
        let decoded = decode_extents(1, start, complete_to, &encoded);
        prop_assert_eq!(decoded.ok(), Some((extents, complete_to)));
    }

    #[test]
    fn region_hashes_round_trip(
        start in 0u64..1 << 40,
        regions in prop::collection::vec((any::<u128>(), any::<bool>()), 1..64),
        region_bytes in 1u64..1 << 24,
    ) {
        let hashes: Vec<RegionHash> = regions
            .iter()
            .enumerate()
            .map(|(i, &(hash, hole))| RegionHash {
                offset: start + i as u64 * region_bytes,
                length: region_bytes,
                hash,
                hole,
            })
            .collect();
        let length = region_bytes * hashes.len() as u64;
        let encoded = encode_region_hashes(&hashes);
        let decoded = decode_region_hashes(1, start, length, region_bytes, &encoded);
        prop_assert_eq!(decoded.ok(), Some(hashes));
    }

    #[test]
    fn info_round_trips(size_bytes in any::<u64>(), block_size in any::<u64>(), epoch in any::<u64>()) {
        let info = ReplicaInfo { size_bytes, block_size, epoch };
        prop_assert_eq!(decode_info(1, &encode_info(&info)).ok(), Some(info));
    }
}
