//! Bad input and failures: corrupted and oversized frames, garbage, a
//! killed server, a silent one.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::replication::protocol::{
    Flags, Op, RequestHeader, Status, read_payload, read_response_header,
};

/// A WRITE frame of `data` at `offset`.
fn write_frame(request_id: u64, offset: u64, data: &[u8], volume_id: &str) -> Vec<u8> {
    let header = RequestHeader {
        op: Op::Write,
        flags: Flags::FUA,
        request_id,
        epoch: 1,
        session: 1,
        offset,
        length: data.len() as u64,
        payload_len: data.len() as u32,
        payload_crc: crc32c::crc32c(data),
    };
    let mut bytes = header.encode(volume_id).as_bytes().to_vec();
    bytes.extend_from_slice(data);
    bytes
}

/// Reads one response (status, request id), then expects the server to
/// close the connection.
async fn refusal_then_close(stream: &mut TcpStream) -> (Status, u64) {
    let header = bounded("the refusal", read_response_header(stream))
        .await
        .expect("a well-formed response")
        .expect("a response before the close");
    read_payload(
        stream,
        header.request_id,
        header.payload_len,
        header.payload_crc,
    )
    .await
    .expect("the refusal's message");
    let mut rest = Vec::new();
    let read = bounded("the close", stream.read_to_end(&mut rest)).await;
    // A close or a reset both end the connection; nothing else may follow.
    assert!(
        read.is_err() || rest.is_empty(),
        "{} more bytes",
        rest.len()
    );
    (header.status, header.request_id)
}

#[tokio::test]
async fn corrupted_frames_are_refused_and_never_written() {
    let replica = TestReplica::new("vol-crc", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let data = pattern(5, 8192);

    // A flipped payload byte: CHECKSUM (for that request), then the close.
    let mut bytes = write_frame(11, 0, &data, "vol-crc");
    let last = bytes.len() - 100;
    bytes[last] ^= 0x01;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("send");
    assert_eq!(
        refusal_then_close(&mut stream).await,
        (Status::Checksum, 11)
    );

    // A flipped header byte (the offset): CHECKSUM, id unknown.
    let mut bytes = write_frame(12, 0, &data, "vol-crc");
    bytes[25] ^= 0x40;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    stream.write_all(&bytes).await.expect("send");
    assert_eq!(refusal_then_close(&mut stream).await, (Status::Checksum, 0));

    // Nothing reached the file, anywhere.
    let file = std::fs::read(&replica.path).expect("read file");
    assert!(file.iter().all(|&b| b == 0), "corrupt data was written");

    // The intact frame is written: the test's frames are otherwise valid.
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    stream
        .write_all(&write_frame(13, 0, &data, "vol-crc"))
        .await
        .expect("send");
    let ok = bounded("the answer", read_response_header(&mut stream))
        .await
        .expect("response")
        .expect("a response");
    assert_eq!((ok.status, ok.request_id), (Status::Ok, 13));
    assert!(replica.file_bytes(0, 8192) == data[..]);
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_only_its_connection() {
    let replica = TestReplica::new("vol-big", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let healthy = client(server.local_addr(), "vol-big");
    healthy
        .write(1, 0, pattern(1, 4096), false)
        .await
        .expect("write before");

    // A valid header announcing 64 MiB of payload.
    let header = RequestHeader {
        op: Op::Write,
        flags: Flags::NONE,
        request_id: 21,
        epoch: 1,
        session: 1,
        offset: 0,
        length: 64 << 20,
        payload_len: 64 << 20,
        payload_crc: 0,
    };
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    stream
        .write_all(header.encode("vol-big").as_bytes())
        .await
        .expect("send");
    assert_eq!(
        refusal_then_close(&mut stream).await,
        (Status::BadRequest, 21)
    );

    // A READ asking for more than a frame can carry, and a WRITE whose
    // length disagrees with its payload: the same.
    for (op, length, payload) in [
        (Op::Read, 33u64 << 20, &[][..]),
        (Op::Write, 10, &[1u8; 5][..]),
    ] {
        let header = RequestHeader {
            op,
            flags: Flags::NONE,
            request_id: 22,
            epoch: 1,
            session: 1,
            offset: 0,
            length,
            payload_len: payload.len() as u32,
            payload_crc: crc32c::crc32c(payload),
        };
        let mut bytes = header.encode("vol-big").as_bytes().to_vec();
        bytes.extend_from_slice(payload);
        let mut stream = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        stream.write_all(&bytes).await.expect("send");
        assert_eq!(
            refusal_then_close(&mut stream).await,
            (Status::BadRequest, 22),
            "{op}"
        );
    }

    // The other connection never noticed.
    assert!(healthy.is_connected());
    let back = healthy.read(1, 0, 4096).await.expect("read after");
    assert!(back[..] == pattern(1, 4096)[..]);
    assert!(replica.file_bytes(0, 4096) == pattern(1, 4096)[..]);
    server.stop().await;
}

#[tokio::test]
async fn garbage_closes_the_connection_and_the_server_lives_on() {
    let replica = TestReplica::new("vol-junk", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    for junk in [
        b"GET / HTTP/1.1\r\nHost: replica.example\r\nUser-Agent: test\r\nAccept: */*\r\n\r\n"
            .to_vec(),
        pattern(77, 300).to_vec(),
        vec![0; crate::replication::protocol::REQUEST_HEADER_LEN],
    ] {
        let mut stream = TcpStream::connect(server.local_addr())
            .await
            .expect("connect");
        stream.write_all(&junk).await.expect("send");
        let (status, _) = refusal_then_close(&mut stream).await;
        assert_eq!(status, Status::BadRequest);
    }
    // A frame cut short by the peer just ends that connection.
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let bytes = write_frame(1, 0, &pattern(1, 4096), "vol-junk");
    stream.write_all(&bytes[..100]).await.expect("send");
    drop(stream);

    let client = client(server.local_addr(), "vol-junk");
    client.info(1).await.expect("server still serves");
    assert!(replica.file_bytes(0, 4096).iter().all(|&b| b == 0));
    server.stop().await;
}

/// A request the server is executing when it dies fails promptly with
/// Disconnected (not after the timeout); the next request after the server
/// returns reconnects.
#[tokio::test]
async fn a_killed_server_fails_requests_and_the_client_reconnects() {
    let replica = TestReplica::new("vol-kill", 1);
    let resolver = MapResolver::with(&[&replica.fenced]);
    let server = start_server(Arc::clone(&resolver)).await;
    let addr = server.local_addr();
    let client = Arc::new(client_with(addr, "vol-kill", Duration::from_secs(5)));
    client.info(1).await.expect("connected");

    // Raising to epoch 2 persists slowly: the request is in the server.
    replica.store.set_delay(Duration::from_millis(1500));
    let pending = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.info(2).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    drop(server);
    let result = bounded("the pending request", pending).await.expect("join");
    assert!(
        matches!(result, Err(Error::Disconnected { .. })),
        "{result:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "took {:?}",
        killed.elapsed()
    );
    assert!(result.as_ref().is_err_and(Error::replica_failed));

    // While it is down: a connect error.
    let down = client.info(2).await;
    assert!(matches!(down, Err(Error::Connect { .. })), "{down:?}");

    // Back on the same address: the next request reconnects.
    replica.store.set_delay(Duration::ZERO);
    let server = ReplicaServer::start(addr, resolver)
        .await
        .expect("restart on the same address");
    let info = bounded("the request after the restart", client.info(2))
        .await
        .expect("reconnected");
    assert_eq!(info.epoch, 2);
    assert!(client.is_connected());
    server.stop().await;
}

/// A server that accepts but never answers: the request times out within
/// the bound, and other requests on the torn-down connection fail too.
#[tokio::test]
async fn a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(300);
    let client = Arc::new(client_with(addr, "vol-silent", timeout));
    let started = Instant::now();
    let first = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.write(1, 0, pattern(1, 4096), true).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.flush(1).await }
    });
    let first = bounded("the first request", first).await.expect("join");
    let elapsed = started.elapsed();
    assert!(
        matches!(first, Err(Error::Timeout { timeout: t, .. }) if t == timeout),
        "{first:?}"
    );
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
        "timed out after {elapsed:?}"
    );
    // The second was on the same connection, torn down by the first's
    // timeout: it fails with the teardown rather than its own timeout.
    let second = bounded("the second request", second).await.expect("join");
    assert!(
        matches!(second, Err(Error::Disconnected { .. })),
        "{second:?}"
    );
    assert!(!client.is_connected());
    silent.abort();
}

/// A response that fails its CRC is never handed out: the request fails,
/// the connection is dropped, and the next request reconnects.
#[tokio::test]
async fn a_corrupted_response_fails_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    // A fake replica answering each READ with bytes of 7; on the first
    // connection one payload byte is flipped after the CRC was computed.
    let fake = tokio::spawn(async move {
        for corrupt in [true, false] {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let (header, _) = protocol::read_request_header(&mut stream)
                .await
                .expect("request")
                .expect("a request");
            let mut payload = vec![7u8; header.length as usize];
            let response = protocol::ResponseHeader {
                status: Status::Ok,
                request_id: header.request_id,
                detail: 0,
                payload_len: payload.len() as u32,
                payload_crc: crc32c::crc32c(&payload),
            };
            if corrupt {
                payload[100] ^= 0x20;
            }
            stream.write_all(&response.encode()).await.expect("send");
            stream.write_all(&payload).await.expect("send");
            if !corrupt {
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            }
        }
    });
    let client = client(addr, "vol-corrupt");
    let first = client.read(1, 0, 4096).await;
    match &first {
        Err(Error::Disconnected { source, .. }) => assert!(
            matches!(**source, protocol::Error::PayloadChecksum { .. }),
            "{source:?}"
        ),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(!client.is_connected());
    let second = bounded("the retry", client.read(1, 0, 4096))
        .await
        .expect("reconnected read");
    assert!(second.iter().all(|&b| b == 7));
    drop(client);
    bounded("the fake replica", fake).await.expect("fake");
}
