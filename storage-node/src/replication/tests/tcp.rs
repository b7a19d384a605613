//! Client and server over loopback TCP.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::replication::protocol::{
    Flags, Op, RequestHeader, ResponseHeader, Status, read_payload, read_response_header,
};

#[tokio::test]
async fn every_op_works_over_tcp() {
    let replica = TestReplica::new("vol-tcp", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let client = client(server.local_addr(), "vol-tcp");
    assert_eq!(client.location(), Location::Remote(server.local_addr()));
    exercise_every_op(&client, 1).await;
    // What the client wrote is in the file.
    assert!(replica.file_bytes(70_000, 1000) == pattern(2, 1000)[..]);
    server.stop().await;
}

#[tokio::test]
async fn fencing_errors_cross_the_wire() {
    let replica = TestReplica::new("vol-fence-tcp", 4);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let client = client(server.local_addr(), "vol-fence-tcp");
    let stale = client.write(3, 0, pattern(1, 4096), false).await;
    assert!(
        matches!(
            stale,
            Err(Error::StaleEpoch {
                request: 3,
                current: 4
            })
        ),
        "{stale:?}"
    );
    assert!(stale.as_ref().is_err_and(|e| !e.replica_failed()));
    assert!(replica.file_bytes(0, 4096).iter().all(|&b| b == 0));

    let info = client.info(9).await.expect("claim with epoch 9");
    assert_eq!(info.epoch, 9);
    assert_eq!(replica.store.persisted(), vec![9]);
    assert_eq!(replica.fenced.current_epoch(), 9);
    assert!(matches!(
        client.read(4, 0, 4096).await,
        Err(Error::StaleEpoch { current: 9, .. })
    ));

    // The connection survives refusals.
    client
        .write(9, 0, pattern(2, 4096), true)
        .await
        .expect("write under the current epoch");

    let unknown = self::client(server.local_addr(), "vol-nobody");
    let missing = unknown.read(9, 0, 4096).await;
    assert!(
        matches!(&missing, Err(Error::VolumeNotFound { volume_id }) if volume_id == "vol-nobody"),
        "{missing:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn many_concurrent_requests_complete_correctly() {
    let replica = TestReplica::new("vol-many", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let client = Arc::new(client(server.local_addr(), "vol-many"));
    let tasks: Vec<_> = (0..64u64)
        .map(|task| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                for round in 0..8u64 {
                    // Each task owns its blocks; sizes vary so responses
                    // finish out of order.
                    let offset = (task * 8 + round) * 16384;
                    let len = 512 * (1 + ((task + round) % 32) as usize);
                    let data = pattern(task << 8 | round, len);
                    client
                        .write(1, offset, Arc::clone(&data), round % 3 == 0)
                        .await
                        .expect("write");
                    let back = client.read(1, offset, len).await.expect("read");
                    assert!(back[..] == data[..], "task {task} round {round}");
                }
            })
        })
        .collect();
    for task in tasks {
        bounded("a client task", task).await.expect("task");
    }
    // Every write is in the file.
    for task in [0u64, 31, 63] {
        let offset = (task * 8 + 7) * 16384;
        let len = 512 * (1 + ((task + 7) % 32) as usize);
        assert!(replica.file_bytes(offset, len) == pattern(task << 8 | 7, len)[..]);
    }
    server.stop().await;
}

/// Encodes a request frame (header, volume id, payload).
fn frame(header: RequestHeader, volume_id: &str, payload: &[u8]) -> Vec<u8> {
    let header = RequestHeader {
        payload_len: payload.len() as u32,
        payload_crc: crc32c::crc32c(payload),
        ..header
    };
    let mut bytes = header.encode(volume_id).as_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

fn request(op: Op, request_id: u64, epoch: u64, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        op,
        flags: Flags::NONE,
        request_id,
        epoch,
        session: 1,
        offset,
        length,
        payload_len: 0,
        payload_crc: 0,
    }
}

async fn response(stream: &mut TcpStream) -> (ResponseHeader, Vec<u8>) {
    let header = bounded("a response", read_response_header(stream))
        .await
        .expect("response header")
        .expect("a response, not the end of the stream");
    let payload = read_payload(
        stream,
        header.request_id,
        header.payload_len,
        header.payload_crc,
    )
    .await
    .expect("response payload");
    (header, payload.to_vec())
}

/// The server answers in completion order: a request stuck behind a slow
/// epoch persist does not hold up a later request on the same connection.
#[tokio::test]
async fn the_server_answers_out_of_order() {
    let slow = TestReplica::new("vol-slow", 1);
    let fast = TestReplica::new("vol-fast", 1);
    slow.store.set_delay(Duration::from_millis(500));
    let server = start_server(MapResolver::with(&[&slow.fenced, &fast.fenced])).await;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut bytes = frame(request(Op::Info, 1, 2, 0, 0), "vol-slow", &[]);
    bytes.extend(frame(request(Op::Read, 2, 1, 0, 4096), "vol-fast", &[]));
    stream.write_all(&bytes).await.expect("send both");
    let (first, payload) = response(&mut stream).await;
    assert_eq!((first.request_id, first.status), (2, Status::Ok));
    assert_eq!(payload.len(), 4096);
    let (second, _) = response(&mut stream).await;
    assert_eq!((second.request_id, second.status), (1, Status::Ok));
    server.stop().await;
}

/// The client matches responses to requests by id, whatever their order.
#[tokio::test]
async fn the_client_matches_out_of_order_responses() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    // A fake replica: reads three READs, answers them in reverse, each with
    // its request id in every byte.
    let fake = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let (header, _) = protocol::read_request_header(&mut stream)
                .await
                .expect("request")
                .expect("a request");
            ids.push((header.request_id, header.length));
        }
        for (id, length) in ids.into_iter().rev() {
            let payload = vec![id as u8; length as usize];
            let header = ResponseHeader {
                status: Status::Ok,
                request_id: id,
                detail: 0,
                payload_len: payload.len() as u32,
                payload_crc: crc32c::crc32c(&payload),
            };
            stream.write_all(&header.encode()).await.expect("send");
            stream.write_all(&payload).await.expect("send");
        }
        // Hold the connection until the client is done.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    });
    let client = Arc::new(client(addr, "vol-fake"));
    let reads: Vec<_> = (1..=3usize)
        .map(|n| {
            let client = Arc::clone(&client);
            tokio::spawn(async move { client.read(1, 0, n * 100).await })
        })
        .collect();
    for (n, read) in reads.into_iter().enumerate() {
        let buf = bounded("a read", read).await.expect("join").expect("read");
        assert_eq!(
            buf.len(),
            (n + 1) * 100,
            "response matched to the wrong request"
        );
        // All bytes carry the same id: the response was not mixed.
        assert!(buf.iter().all(|&b| b == buf[0]));
    }
    drop(client);
    bounded("the fake replica", fake).await.expect("fake");
}

/// Rebuild helpers compare replicas: identical content hashes equal whether
/// allocated or not, and one differing block shows up in exactly its region.
#[tokio::test]
async fn region_hashes_find_the_differing_region() {
    let local = TestReplica::new("vol-hash", 1);
    let remote = TestReplica::new("vol-hash", 1);
    let server = start_server(MapResolver::with(&[&remote.fenced])).await;
    let client = client(server.local_addr(), "vol-hash");
    let region = 256 * 1024;

    // Same data in both; region 3 is written with zeroes on the remote
    // (allocated) and left a hole locally.
    for (offset, seed) in [(0u64, 1u64), (300_000, 2), (5 << 20, 3)] {
        let data = pattern(seed, 100_000);
        local
            .fenced
            .write(1, offset, Arc::clone(&data), false)
            .await
            .expect("local write");
        client
            .write(1, offset, data, false)
            .await
            .expect("remote write");
    }
    client
        .write_zeroes(1, 3 * region, region, false, false)
        .await
        .expect("allocate zeroes remotely");
    client
        .write(
            1,
            3 * region + region / 2,
            Arc::new(IoBuf::zeroed(4096)),
            false,
        )
        .await
        .expect("write zero bytes remotely");

    let ours = local
        .fenced
        .region_hashes(1, 0, SIZE, region)
        .await
        .expect("local hashes");
    let theirs = client
        .region_hashes(1, 0, SIZE, region)
        .await
        .expect("remote hashes");
    assert_eq!(ours.len(), (SIZE / region) as usize);
    let hashes = |h: &[RegionHash]| h.iter().map(|r| r.hash).collect::<Vec<_>>();
    assert_eq!(hashes(&ours), hashes(&theirs), "identical content");
    assert!(ours[3].hole, "never written locally");
    assert!(!theirs[3].hole, "written with zero bytes remotely");
    assert!(ours[4].hole && theirs[4].hole);

    // One block differs: only its region's hash does.
    client
        .write(1, (5 << 20) + 8192, pattern(99, 4096), false)
        .await
        .expect("diverge");
    let theirs = client
        .region_hashes(1, 0, SIZE, region)
        .await
        .expect("remote hashes");
    let differing: Vec<u64> = ours
        .iter()
        .zip(&theirs)
        .filter(|(a, b)| a.hash != b.hash)
        .map(|(a, _)| a.offset)
        .collect();
    assert_eq!(differing, vec![5 << 20]);

    // Odd sizes: a shorter last region, and more regions than one request
    // carries (the client splits).
    let odd = client
        .region_hashes(1, 4096, 10_000, 4096)
        .await
        .expect("odd range");
    assert_eq!(odd.len(), 3);
    assert_eq!((odd[2].offset, odd[2].length), (4096 + 8192, 10_000 - 8192));
    let many = client
        .region_hashes(1, 0, SIZE, 64)
        .await
        .expect("tiny regions");
    assert_eq!(many.len() as u64, SIZE / 64);
    assert!(many.windows(2).all(|w| w[0].end_matches(&w[1])));
    assert!(matches!(
        client.region_hashes(1, 0, SIZE, 0).await,
        Err(Error::InvalidRequest { .. })
    ));
    server.stop().await;
}

impl RegionHash {
    fn end_matches(&self, next: &RegionHash) -> bool {
        self.offset + self.length == next.offset
    }
}

#[tokio::test]
async fn allocated_extents_list_only_written_ranges() {
    let replica = TestReplica::new("vol-sparse", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let client = client(server.local_addr(), "vol-sparse");
    let writes = [(0u64, 4096usize), (1 << 20, 8192), (SIZE - 4096, 4096)];
    for (offset, len) in writes {
        client
            .write(1, offset, pattern(offset, len), false)
            .await
            .expect("write");
    }
    let expected: Vec<Extent> = writes
        .iter()
        .map(|&(offset, len)| Extent {
            offset,
            length: len as u64,
        })
        .collect();
    let local = replica
        .fenced
        .allocated_extents(1, 0, SIZE)
        .await
        .expect("local extents");
    assert_eq!(local, expected);
    let remote = client
        .allocated_extents(1, 0, SIZE)
        .await
        .expect("remote extents");
    assert_eq!(remote, expected);
    // Clipped to the range asked for.
    let clipped = client
        .allocated_extents(1, (1 << 20) + 4096, 1 << 20)
        .await
        .expect("clipped");
    assert_eq!(
        clipped,
        vec![Extent {
            offset: (1 << 20) + 4096,
            length: 4096
        }]
    );
    // Trimmed space is a hole again.
    client.trim(1, 1 << 20, 8192).await.expect("trim");
    let after = client
        .allocated_extents(1, 0, SIZE)
        .await
        .expect("extents after trim");
    assert_eq!(after, vec![expected[0], expected[2]]);
    server.stop().await;
}
