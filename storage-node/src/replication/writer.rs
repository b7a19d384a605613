//! The batched frame writer that both ends of a replica connection use.
//!
//! Frames queue in a channel; the writer takes every frame that is queued,
//! copies small ones into one buffer and sends it with one `write` call, and
//! flushes as soon as the queue is empty (after letting ready tasks run once,
//! so that they can add to the batch), so a busy connection sends many
//! frames per system call and an idle one adds no latency. Large payloads
//! (over [`INLINE_BYTES`]) are written from their own buffers, never copied.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Payloads up to this many bytes are copied into the batch buffer.
pub(crate) const INLINE_BYTES: usize = 64 * 1024;

/// A batch is sent once it holds this many bytes, even if more frames wait.
const BATCH_BYTES: usize = 256 * 1024;

/// A frame: a header (with any variable part) and a payload.
pub(crate) trait Frame: Send + 'static {
    /// The bytes before the payload.
    fn head(&self) -> &[u8];
    /// The payload.
    fn body(&self) -> &[u8];
}

/// Writes frames from `outbox` to `write` until every sender is gone, then
/// shuts the write side down. Each batch must be written within `timeout`.
///
/// Errors: the first write error, or `TimedOut`; the connection is then
/// dead and the remaining frames are dropped.
///
/// # Cancel safety
/// Not cancel safe: a frame may be half written when the future is dropped,
/// which leaves the stream unusable (callers drop the socket with it).
pub(crate) async fn write_frames<W, F>(
    mut write: W,
    mut outbox: mpsc::UnboundedReceiver<F>,
    timeout: Duration,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    F: Frame,
{
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES + INLINE_BYTES);
    while let Some(first) = outbox.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next {
            batch.extend_from_slice(frame.head());
            let body = frame.body();
            if body.len() <= INLINE_BYTES {
                batch.extend_from_slice(body);
            } else {
                send(&mut write, &mut batch, body, timeout).await?;
            }
            next = if batch.len() >= BATCH_BYTES {
                None
            } else if let Ok(frame) = outbox.try_recv() {
                Some(frame)
            } else {
                // Lets the tasks that are ready run first: under load they
                // queue more frames for this batch; when idle this returns
                // at once.
                tokio::task::yield_now().await;
                outbox.try_recv().ok()
            };
        }
        send(&mut write, &mut batch, &[], timeout).await?;
    }
    write.shutdown().await
}

/// Writes `batch` (then clears it) and `body`, within `timeout`.
async fn send<W: AsyncWrite + Unpin>(
    write: &mut W,
    batch: &mut Vec<u8>,
    body: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let io = async {
        write.write_all(batch).await?;
        batch.clear();
        write.write_all(body).await?;
        write.flush().await
    };
    tokio::time::timeout(timeout, io)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    struct Bytes(Vec<u8>, Vec<u8>);

    impl Frame for Bytes {
        fn head(&self) -> &[u8] {
            &self.0
        }
        fn body(&self) -> &[u8] {
            &self.1
        }
    }

    #[tokio::test]
    async fn frames_arrive_in_order_small_and_large() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut expected = Vec::new();
        for i in 0..50u8 {
            let body = vec![i; if i % 10 == 0 { INLINE_BYTES + 1 } else { 100 }];
            expected.extend_from_slice(&[i, i]);
            expected.extend_from_slice(&body);
            tx.send(Bytes(vec![i, i], body)).expect("queue");
        }
        drop(tx);
        let writer = tokio::spawn(write_frames(client, rx, Duration::from_secs(5)));
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read");
        writer.await.expect("join").expect("write");
        assert!(got == expected, "frames reordered or lost");
    }
}
