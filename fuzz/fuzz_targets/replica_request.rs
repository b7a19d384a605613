//! Replica protocol requests as a replica's server reads them: frames built
//! from structured input with correct CRCs, then damaged (a byte changed,
//! with or without a fixed-up header CRC; a payload bit flipped; cut short;
//! trailing garbage), read by the real frame reader
//! ([`read_request_header`], [`read_payload`]) and checked by the server's
//! real request checks ([`check_request`]), frame after frame as on one
//! connection.
//!
//! An input that starts with the request magic (`BLRQ`) is instead a raw
//! byte stream, as a target sent it: the seeds captured from a real target
//! (`capture-seeds.sh`) are such streams.
//!
//! Must hold: no panic, no hang; every accepted header re-encodes to the
//! bytes it was read from; an intact stream decodes to exactly the frames
//! that were encoded; a changed header byte without a fixed CRC, or a
//! flipped payload bit, is refused.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use ballast_fuzz::{Damage, block_on_bounded, damage};
use ballast_storage_node::replication::protocol::{
    Flags, MAX_VOLUME_ID_BYTES, Op, REQUEST_MAGIC, RequestHeader, read_payload, read_request_header,
};
use ballast_storage_node::replication::server::check_request;
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Frame {
    op: u8,
    flags: u16,
    request_id: u64,
    epoch: u64,
    session: u64,
    offset: u64,
    length: u64,
    volume_id: String,
    payload: Vec<u8>,
    damage: Damage,
}

impl Frame {
    fn header(&self) -> RequestHeader {
        RequestHeader {
            op: Op::from_code(1 + self.op % 8).expect("codes 1 to 8 are ops"),
            flags: Flags(self.flags),
            request_id: self.request_id,
            epoch: self.epoch,
            session: self.session,
            offset: self.offset,
            length: self.length,
            payload_len: u32::try_from(self.payload.len()).expect("a fuzz input is small"),
            payload_crc: crc32c::crc32c(&self.payload),
        }
    }

    /// A volume id the encoder accepts: 1 to 128 bytes of UTF-8.
    fn volume_id(&self) -> &str {
        let mut end = self.volume_id.len().min(MAX_VOLUME_ID_BYTES);
        while !self.volume_id.is_char_boundary(end) {
            end -= 1;
        }
        match &self.volume_id[..end] {
            "" => "v",
            id => id,
        }
    }
}

/// Builds the byte stream of `frames`, each damaged as it says, and where
/// each starts and whether its damage must make the reader refuse it.
fn build(frames: &[Frame]) -> (Vec<u8>, Vec<(usize, bool)>) {
    let mut stream = Vec::new();
    let mut layout = Vec::new();
    for frame in frames {
        let encoded = frame.header().encode(frame.volume_id());
        let header_len = encoded.as_bytes().len();
        let mut bytes = encoded.as_bytes().to_vec();
        bytes.extend_from_slice(&frame.payload);
        let intact = bytes.clone();
        damage(&mut bytes, header_len, 60, &frame.damage);
        let must_refuse = match frame.damage {
            Damage::SetByte {
                at, fix_crc: false, ..
            } => {
                let at = usize::from(at) % intact.len();
                at < header_len && bytes[at] != intact[at]
            }
            Damage::FlipPayloadBit { .. } => !frame.payload.is_empty(),
            _ => false,
        };
        layout.push((stream.len(), must_refuse));
        stream.extend_from_slice(&bytes);
    }
    (stream, layout)
}

/// Reads `stream` frame after frame as the server does; `frames` and
/// `layout` say what it was built from (empty for a raw stream).
fn read(stream: &[u8], frames: &[Frame], layout: &[(usize, bool)]) {
    block_on_bounded("reading replica requests", async {
        let mut reader = stream;
        let mut index = 0;
        // Frames are compared with what was encoded while everything
        // before them was intact.
        let mut intact_so_far = true;
        loop {
            let start = stream.len() - reader.len();
            let frame = frames.get(index).filter(|_| intact_so_far);
            let expect = frame.filter(|_| layout[index].0 == start);
            let must_refuse = expect.is_some() && layout[index].1;
            let (header, volume_id) = match read_request_header(&mut reader).await {
                Ok(Some(decoded)) => decoded,
                Ok(None) => break,
                Err(_) => break,
            };
            let consumed = &stream[start..stream.len() - reader.len()];
            assert_eq!(
                header.encode(&volume_id).as_bytes(),
                consumed,
                "an accepted request header re-encodes to its bytes"
            );
            if let Some(frame) = expect
                && must_refuse
                && matches!(frame.damage, Damage::SetByte { .. })
            {
                panic!("a header changed without fixing its CRC was accepted: {frame:?}");
            }
            let payload = read_payload(
                &mut reader,
                header.request_id,
                header.payload_len,
                header.payload_crc,
            )
            .await;
            if let Some(frame) = expect {
                if matches!(frame.damage, Damage::None) {
                    assert_eq!(header, frame.header());
                    assert_eq!(volume_id, frame.volume_id());
                    assert!(payload.is_ok(), "an intact payload is accepted");
                }
                if must_refuse {
                    assert!(
                        payload.is_err(),
                        "a flipped payload bit is refused: {frame:?}"
                    );
                }
                intact_so_far = matches!(frame.damage, Damage::None);
            } else {
                intact_so_far = false;
            }
            let Ok(payload) = payload else { break };
            // Refusals are answers, not failures; only a panic would be.
            let _ = check_request(&header, payload);
            index += 1;
        }
    });
}

fuzz_target!(|input: &[u8]| {
    if input.starts_with(&REQUEST_MAGIC) {
        read(input, &[], &[]);
        return;
    }
    let Ok(frames) = Vec::<Frame>::arbitrary_take_rest(Unstructured::new(input)) else {
        return;
    };
    let (stream, layout) = build(&frames);
    read(&stream, &frames, &layout);
});
