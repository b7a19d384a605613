//! Sessions: requests of a connection the client gave up on never execute
//! after requests of its newer connection (docs/adr/0007).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::fence::gated;
use super::*;
use crate::replication::fence::Command;
use crate::replication::protocol::{ResponseHeader, Status, read_response_header};

/// Writes `data` at `offset` as the server does for a request of `epoch`
/// and `session`.
async fn submit_write(
    fenced: &FencedReplica,
    epoch: u64,
    session: u64,
    offset: u64,
    data: &IoBuf,
) -> Result<(), Error> {
    let (done, outcome) = oneshot::channel();
    let command = Command::Write {
        offset,
        data: IoBuf::from_slice(data),
        fua: false,
    };
    fenced.submit(epoch, session, command, move |result| {
        let _ = done.send(result.map(drop));
    });
    outcome.await.expect("the request's outcome")
}

/// A new session is admitted only after every request of older sessions
/// completed; requests of older sessions arriving later are refused.
#[tokio::test]
async fn a_new_session_waits_for_older_ones_and_fences_them() {
    let replica = TestReplica::new("vol-gated", 1);
    let (device, fenced, events) = gated(&replica);
    device.armed.store(true, Ordering::SeqCst);

    let slow = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { submit_write(&fenced, 1, 5, 0, &pattern(1, 4096)).await }
    });
    bounded("the old session's write", device.entered.notified()).await;
    let newer = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { submit_write(&fenced, 1, 6, 4096, &pattern(2, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !newer.is_finished(),
        "session 6 admitted while session 5 I/O ran"
    );
    // Arrives while session 6 waits: refused once session 6 is admitted.
    let late = tokio::spawn({
        let fenced = Arc::clone(&fenced);
        async move { submit_write(&fenced, 1, 5, 8192, &pattern(3, 4096)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;

    device.release.add_permits(1);
    bounded("the old write", slow)
        .await
        .expect("join")
        .expect("the session-5 write succeeds");
    bounded("the newer write", newer)
        .await
        .expect("join")
        .expect("the session-6 write succeeds");
    let late = bounded("the late write", late).await.expect("join");
    assert!(
        matches!(
            late,
            Err(Error::StaleSession {
                request: 5,
                current: 6
            })
        ),
        "{late:?}"
    );
    assert!(late.as_ref().is_err_and(Error::replica_failed));
    assert_eq!(*events.lock().expect("lock"), vec!["write@0", "write@4096"]);
    assert!(replica.file_bytes(8192, 4096).iter().all(|&b| b == 0));

    // In-process callers have no session; a new epoch starts over.
    fenced
        .write(1, 8192, pattern(4, 4096), false)
        .await
        .expect("in-process write");
    submit_write(&fenced, 2, 1, 0, &pattern(5, 4096))
        .await
        .expect("session 1 of epoch 2");
    let stale = submit_write(&fenced, 1, 7, 0, &pattern(6, 4096)).await;
    assert!(
        matches!(stale, Err(Error::StaleEpoch { current: 2, .. })),
        "{stale:?}"
    );
}

/// A TCP proxy in front of `server`. It holds everything the client sends
/// on its first connection until `release` is notified, as the socket
/// buffer of a paused node would, then delivers it on a connection the
/// server still has open and reports the server's answer. Later
/// connections are forwarded at once.
async fn holding_proxy(
    server: SocketAddr,
) -> (SocketAddr, Arc<Notify>, oneshot::Receiver<ResponseHeader>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("proxy address");
    let release = Arc::new(Notify::new());
    let (answer, answered) = oneshot::channel();
    let held_release = Arc::clone(&release);
    tokio::spawn(async move {
        let (mut down, _) = listener.accept().await.expect("accept");
        let mut up = TcpStream::connect(server).await.expect("connect upstream");
        tokio::spawn(async move {
            // Until the client tears the connection down.
            let mut held = Vec::new();
            let _ = down.read_to_end(&mut held).await;
            held_release.notified().await;
            up.write_all(&held).await.expect("deliver the held bytes");
            let header = read_response_header(&mut up)
                .await
                .expect("an answer")
                .expect("an answer before the close");
            let _ = answer.send(header);
        });
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut up = TcpStream::connect(server).await.expect("connect upstream");
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    (addr, release, answered)
}

/// The write of a connection torn down after a timeout reaches the replica
/// only after the client's next connection wrote the same block: it is
/// refused, and the block keeps the newer data.
#[tokio::test]
async fn a_write_of_a_torn_down_connection_never_lands_late() {
    let replica = TestReplica::new("vol-session", 1);
    let server = start_server(MapResolver::with(&[&replica.fenced])).await;
    let (proxy, release, answered) = holding_proxy(server.local_addr()).await;
    let client = client_with(proxy, "vol-session", Duration::from_millis(300));

    let old = client.write(1, 0, pattern(1, 4096), false).await;
    assert!(matches!(old, Err(Error::Timeout { .. })), "{old:?}");
    client
        .write(1, 0, pattern(2, 4096), false)
        .await
        .expect("the write on the new connection");

    release.notify_one();
    let answer = bounded("the held write's answer", answered)
        .await
        .expect("the proxy's report");
    assert_eq!(answer.status, Status::StaleSession);
    assert!(
        replica.file_bytes(0, 4096) == pattern(2, 4096)[..],
        "the old connection's write landed after the newer one"
    );
    server.stop().await;
}
