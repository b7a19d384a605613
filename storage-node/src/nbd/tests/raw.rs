//! Raw-socket tests: the server against hand-built (and broken) protocol
//! messages.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{Fixture, MemDevice, ZeroesCall, within};
use crate::nbd::MAX_PAYLOAD;
use crate::nbd::protocol::{
    Command, OptionHeader, Request, chunk, client_flag, cmd, cmd_flag, errno, handshake_flag, info,
    magic, opt, rep, tx_flag,
};
use crate::nbd::server::{Error as ServerError, NbdServer};
use crate::nbd::transmission::Limits;

const SIZE: usize = 1 << 20;

/// A hand-driven NBD client.
struct Raw {
    stream: UnixStream,
}

/// One option reply: option, reply type, data.
type OptionReply = (u32, u32, Vec<u8>);

impl Raw {
    async fn connect(fixture: &Fixture) -> Self {
        let stream = within("connect", UnixStream::connect(&fixture.socket))
            .await
            .expect("connect");
        Self { stream }
    }

    /// Reads the greeting and returns the handshake flags.
    async fn greeting(&mut self) -> u16 {
        let mut buf = [0u8; 18];
        self.read_exact(&mut buf).await;
        assert_eq!(&buf[0..8], &magic::NBD.to_be_bytes());
        assert_eq!(&buf[8..16], &magic::IHAVEOPT.to_be_bytes());
        u16::from_be_bytes([buf[16], buf[17]])
    }

    /// Greeting plus client flags.
    async fn start(fixture: &Fixture, client_flags: u32) -> Self {
        let mut c = Self::connect(fixture).await;
        let flags = c.greeting().await;
        assert_eq!(
            flags,
            handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES
        );
        c.send(&client_flags.to_be_bytes()).await;
        c
    }

    /// Negotiates the default export with `NBD_OPT_GO`, optionally with
    /// structured replies; returns the client and the transmission flags.
    async fn negotiate(fixture: &Fixture, structured: bool) -> (Self, u16) {
        let mut c = Self::start(fixture, client_flag::FIXED_NEWSTYLE).await;
        if structured {
            c.option(opt::STRUCTURED_REPLY, &[]).await;
            assert_eq!(c.option_reply().await.1, rep::ACK);
        }
        let (size, flags) = c.go("").await.expect("GO succeeds");
        assert_eq!(size, SIZE as u64);
        (c, flags)
    }

    /// Sends `NBD_OPT_GO` for `name`; returns the export size and flags, or
    /// the error reply type.
    async fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        self.option(opt::GO, &data).await;
        let mut export = None;
        loop {
            let (option, kind, data) = self.option_reply().await;
            assert_eq!(option, opt::GO);
            match kind {
                rep::INFO if data[0..2] == info::EXPORT.to_be_bytes() => {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
                rep::INFO => {}
                rep::ACK => return Ok(export.expect("NBD_INFO_EXPORT before ACK")),
                error => return Err(error),
            }
        }
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let header = OptionHeader {
            option,
            length: data.len() as u32,
        };
        self.send(&header.encode()).await;
        self.send(data).await;
    }

    async fn option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; 20];
        self.read_exact(&mut header).await;
        assert_eq!(&header[0..8], &magic::OPTION_REPLY.to_be_bytes());
        let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
        let kind = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0; len as usize];
        self.read_exact(&mut data).await;
        (option, kind, data)
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let request = Request {
            flags,
            command: Command::from_type(command),
            handle,
            offset,
            length,
        };
        self.send(&request.encode()).await;
    }

    /// Reads a simple reply with `data_len` bytes of data on success;
    /// returns (error, handle, data).
    async fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut header = [0u8; 16];
        self.read_exact(&mut header).await;
        assert_eq!(&header[0..4], &magic::SIMPLE_REPLY.to_be_bytes());
        let error = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
        let handle = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let mut data = vec![0; if error == 0 { data_len } else { 0 }];
        self.read_exact(&mut data).await;
        (error, handle, data)
    }

    /// Reads one structured chunk; returns (flags, type, handle, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut header = [0u8; 20];
        self.read_exact(&mut header).await;
        assert_eq!(&header[0..4], &magic::STRUCTURED_REPLY.to_be_bytes());
        let flags = u16::from_be_bytes([header[4], header[5]]);
        let kind = u16::from_be_bytes([header[6], header[7]]);
        let handle = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
        let mut payload = vec![0; len as usize];
        self.read_exact(&mut payload).await;
        (flags, kind, handle, payload)
    }

    async fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(cmd::WRITE, 0, handle, offset, data.len() as u32)
            .await;
        self.send(data).await;
        let (error, h, _) = self.simple_reply(0).await;
        assert_eq!(h, handle);
        error
    }

    async fn read(&mut self, handle: u64, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        self.request(cmd::READ, 0, handle, offset, length).await;
        let (error, h, data) = self.simple_reply(length as usize).await;
        assert_eq!(h, handle);
        if error == 0 { Ok(data) } else { Err(error) }
    }

    /// Sends a payload-less command and returns its error.
    async fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.request(command, flags, 77, offset, length).await;
        let (error, handle, _) = self.simple_reply(0).await;
        assert_eq!(handle, 77);
        error
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("send", self.stream.write_all(bytes))
            .await
            .expect("send");
    }

    async fn read_exact(&mut self, buf: &mut [u8]) {
        within("read", self.stream.read_exact(buf))
            .await
            .expect("server sent the expected bytes");
    }

    /// Asserts the server closes the connection without sending anything
    /// more.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match within("server to close", self.stream.read(&mut buf)).await {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got {n} more bytes: {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("expected close, got error {e}"),
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_serve_every_command() {
    let f = Fixture::start(SIZE);
    let (mut c, flags) = Raw::negotiate(&f, false).await;
    for flag in [
        tx_flag::HAS_FLAGS,
        tx_flag::SEND_FLUSH,
        tx_flag::SEND_FUA,
        tx_flag::SEND_TRIM,
        tx_flag::SEND_WRITE_ZEROES,
        tx_flag::CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & flag, 0, "flag {flag:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & (tx_flag::READ_ONLY | tx_flag::SEND_DF), 0);

    // Unaligned write with FUA, read back.
    let data = pattern(5000, 7);
    c.request(cmd::WRITE, cmd_flag::FUA, 1, 513, data.len() as u32)
        .await;
    c.send(&data).await;
    assert_eq!(c.simple_reply(0).await, (0, 1, vec![]));
    assert_eq!(f.device.fua_writes.load(Ordering::SeqCst), 1);
    assert_eq!(c.read(2, 513, 5000).await, Ok(data.clone()));
    assert_eq!(&f.device.contents()[513..5513], &data[..]);

    assert_eq!(c.command(cmd::FLUSH, 0, 0, 0).await, 0);
    assert_eq!(f.device.flushes.load(Ordering::SeqCst), 1);

    // TRIM with FUA flushes after trimming.
    assert_eq!(c.command(cmd::TRIM, cmd_flag::FUA, 513, 100).await, 0);
    assert_eq!(f.device.flushes.load(Ordering::SeqCst), 2);
    assert!(f.device.contents()[513..613].iter().all(|&b| b == 0));

    let zero_flags = cmd_flag::NO_HOLE | cmd_flag::FUA;
    assert_eq!(c.command(cmd::WRITE_ZEROES, zero_flags, 4096, 512).await, 0);
    assert_eq!(c.command(cmd::WRITE_ZEROES, 0, 8192, 1024).await, 0);
    let calls = f.device.zeroes.lock().expect("not poisoned").clone();
    assert_eq!(
        calls,
        [
            ZeroesCall {
                offset: 4096,
                length: 512,
                punch_hole: false,
                fua: true
            },
            ZeroesCall {
                offset: 8192,
                length: 1024,
                punch_hole: true,
                fua: false
            },
        ]
    );
    assert_eq!(c.read(3, 4096, 512).await, Ok(vec![0; 512]));

    // Zero-length requests succeed without touching the device.
    assert_eq!(c.read(4, 0, 0).await, Ok(vec![]));
    assert_eq!(c.command(cmd::WRITE, 0, 0, 0).await, 0);

    c.request(cmd::DISC, 0, 9, 0, 0).await;
    c.expect_closed().await;
    f.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_carry_reads_and_errors() {
    let f = Fixture::start(SIZE);
    f.device.fill(4096, &pattern(4096, 3));
    let (mut c, flags) = Raw::negotiate(&f, true).await;
    assert_ne!(flags & tx_flag::SEND_DF, 0);

    c.request(cmd::READ, cmd_flag::DF, 5, 4096, 4096).await;
    let (flags, kind, handle, payload) = c.chunk().await;
    assert_eq!(
        (flags, kind, handle),
        (chunk::FLAG_DONE, chunk::OFFSET_DATA, 5)
    );
    assert_eq!(&payload[0..8], &4096u64.to_be_bytes());
    assert_eq!(&payload[8..], &pattern(4096, 3)[..]);

    c.request(cmd::READ, 0, 6, SIZE as u64, 512).await;
    let (flags, kind, handle, payload) = c.chunk().await;
    assert_eq!((flags, kind, handle), (chunk::FLAG_DONE, chunk::ERROR, 6));
    assert_eq!(&payload[0..4], &errno::EINVAL.to_be_bytes());

    c.request(cmd::READ, 0, 7, 0, 0).await;
    let (flags, kind, handle, payload) = c.chunk().await;
    assert_eq!((flags, kind, handle), (chunk::FLAG_DONE, chunk::NONE, 7));
    assert!(payload.is_empty());

    // Replies without data stay simple.
    assert_eq!(c.write(8, 0, &[1, 2, 3]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_only_that_connection() {
    let f = Fixture::start(SIZE);
    let (mut bad, _) = Raw::negotiate(&f, false).await;
    let (mut good, _) = Raw::negotiate(&f, false).await;

    bad.send(&[0x55; 28]).await;
    bad.expect_closed().await;

    assert_eq!(good.write(1, 0, b"still here").await, 0);
    assert_eq!(good.read(2, 0, 10).await, Ok(b"still here".to_vec()));
    // The server counts the bad connection until its task has finished,
    // which may be just after the client saw the socket close.
    within("the bad connection to be gone", async {
        while f.server.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(f.server.connections(), 1, "the good connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_option_magic_closes() {
    let f = Fixture::start(SIZE);
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    c.send(&[0xaa; 16]).await;
    c.expect_closed().await;
    f.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_fixed_newstyle_or_with_unknown_flags_are_refused() {
    let f = Fixture::start(SIZE);
    for client_flags in [
        0,
        client_flag::NO_ZEROES,
        client_flag::FIXED_NEWSTYLE | 1 << 5,
    ] {
        let mut c = Raw::start(&f, client_flags).await;
        c.expect_closed().await;
    }
    // A well-behaved client is still welcome.
    Raw::negotiate(&f, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_options_are_refused_and_negotiation_continues() {
    let f = Fixture::start(SIZE);
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;

    for option in [0x1234, opt::STARTTLS, opt::SET_META_CONTEXT] {
        c.option(option, &[1, 2, 3, 4, 5]).await;
        let (o, kind, _) = c.option_reply().await;
        assert_eq!((o, kind), (option, rep::ERR_UNSUP));
    }
    c.option(opt::LIST, &[]).await;
    let (_, kind, data) = c.option_reply().await;
    assert_eq!(kind, rep::SERVER);
    assert_eq!(&data[4..], Fixture::EXPORT.as_bytes());
    assert_eq!(c.option_reply().await.1, rep::ACK);

    assert_eq!(c.go("missing").await, Err(rep::ERR_UNKNOWN));
    c.go(Fixture::EXPORT).await.expect("GO by name");
    assert_eq!(c.read(1, 0, 16).await, Ok(vec![0; 16]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_options_are_refused_or_close_the_connection() {
    let f = Fixture::start(SIZE);

    // Too big to parse, small enough to skip: refused, connection usable.
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    c.option(opt::GO, &vec![0u8; 64 << 10]).await;
    assert_eq!(c.option_reply().await.1, rep::ERR_TOO_BIG);
    c.go("").await.expect("GO after refusal");
    assert_eq!(c.read(1, 0, 4).await, Ok(vec![0; 4]));

    // An absurd length is a denial of service: closed without reading it.
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    let header = OptionHeader {
        option: opt::GO,
        length: u32::MAX,
    };
    c.send(&header.encode()).await;
    c.expect_closed().await;

    // NBD_OPT_EXPORT_NAME cannot be refused, so an oversized one closes.
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    c.option(opt::EXPORT_NAME, &vec![b'a'; 9000]).await;
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_honours_no_zeroes() {
    let f = Fixture::start(SIZE);
    for (client_flags, reply_len) in [
        (client_flag::FIXED_NEWSTYLE, 134),
        (client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES, 10),
    ] {
        let mut c = Raw::start(&f, client_flags).await;
        c.option(opt::EXPORT_NAME, Fixture::EXPORT.as_bytes()).await;
        let mut reply = vec![0u8; reply_len];
        c.read_exact(&mut reply).await;
        assert_eq!(&reply[0..8], &(SIZE as u64).to_be_bytes());
        assert!(reply[10..].iter().all(|&b| b == 0));
        // The next bytes must be the reply to our read, not padding.
        assert_eq!(c.read(1, 0, 8).await, Ok(vec![0; 8]));
    }

    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    c.option(opt::EXPORT_NAME, b"missing").await;
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_get_spec_errors_and_connection_continues() {
    let f = Fixture::start(SIZE);
    let (mut c, _) = Raw::negotiate(&f, false).await;
    let end = SIZE as u64;

    assert_eq!(c.read(1, end - 512, 1024).await, Err(errno::EINVAL));
    assert_eq!(c.read(2, u64::MAX - 1, 4).await, Err(errno::EINVAL));
    assert_eq!(c.write(3, end - 2, &[9; 4]).await, errno::ENOSPC);
    assert_eq!(c.command(cmd::TRIM, 0, end, 1).await, errno::EINVAL);
    assert_eq!(
        c.command(cmd::WRITE_ZEROES, 0, end - 1, 2).await,
        errno::ENOSPC
    );
    assert_eq!(c.read(4, 0, MAX_PAYLOAD + 1).await, Err(errno::EINVAL));
    assert!(
        f.device.contents().iter().all(|&b| b == 0),
        "nothing written"
    );

    assert_eq!(c.write(5, end - 4, &[9; 4]).await, 0);
    assert_eq!(c.read(6, end - 4, 4).await, Ok(vec![9; 4]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commands_and_flags_get_einval() {
    let f = Fixture::start(SIZE);
    let (mut c, _) = Raw::negotiate(&f, false).await;

    assert_eq!(c.command(cmd::CACHE, 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.command(cmd::BLOCK_STATUS, 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.command(42, 0, 0, 512).await, errno::EINVAL);
    assert_eq!(c.command(cmd::FLUSH, 1 << 9, 0, 0).await, errno::EINVAL);
    // DF without structured replies is not a valid flag.
    c.request(cmd::READ, cmd_flag::DF, 1, 0, 8).await;
    assert_eq!(c.simple_reply(8).await.0, errno::EINVAL);
    // A write with a bad flag still has its payload consumed.
    c.request(cmd::WRITE, cmd_flag::NO_HOLE, 2, 0, 4).await;
    c.send(&[1, 2, 3, 4]).await;
    assert_eq!(c.simple_reply(0).await, (errno::EINVAL, 2, vec![]));

    assert_eq!(c.read(3, 0, 4).await, Ok(vec![0; 4]));

    // An unknown command followed by a payload: the payload cannot be told
    // apart from the next request, fails its magic check, and closes.
    let (mut c, _) = Raw::negotiate(&f, false).await;
    c.request(42, 0, 4, 0, 28).await;
    c.send(&[0x11; 28]).await;
    assert_eq!(c.simple_reply(0).await, (errno::EINVAL, 4, vec![]));
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_write_length_closes_only_that_connection() {
    let f = Fixture::start(SIZE);
    let (mut bad, _) = Raw::negotiate(&f, false).await;
    let (mut good, _) = Raw::negotiate(&f, false).await;

    bad.request(cmd::WRITE, 0, 1, 0, MAX_PAYLOAD + 1).await;
    bad.expect_closed().await;

    assert_eq!(good.write(2, 0, b"fine").await, 0);
    assert_eq!(good.read(3, 0, 4).await, Ok(b"fine".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_request_is_harmless() {
    let f = Fixture::start(SIZE);

    let (mut c, _) = Raw::negotiate(&f, false).await;
    c.request(cmd::WRITE, 0, 1, 0, 64 << 10).await;
    c.send(&[0xee; 1000]).await;
    drop(c);

    let (mut c, _) = Raw::negotiate(&f, false).await;
    c.send(&[0x25, 0x60, 0x95, 0x13, 0, 0]).await;
    drop(c);

    // Mid-negotiation, too.
    let mut c = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    c.send(
        &OptionHeader {
            option: opt::GO,
            length: 100,
        }
        .encode(),
    )
    .await;
    drop(c);

    f.wait_idle().await;
    assert!(
        f.device.contents().iter().all(|&b| b == 0),
        "partial write applied"
    );
    let (mut c, _) = Raw::negotiate(&f, false).await;
    assert_eq!(c.write(2, 0, &[1; 8]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_leave_in_completion_order() {
    let f = Fixture::start_with(
        MemDevice::new(SIZE).with_slow_offset(0),
        Limits::default(),
        false,
    );
    let (mut c, _) = Raw::negotiate(&f, false).await;
    c.request(cmd::READ, 0, 1, 0, 512).await;
    c.request(cmd::READ, 0, 2, 4096, 512).await;
    let (_, first, _) = c.simple_reply(512).await;
    let (_, second, _) = c.simple_reply(512).await;
    assert_eq!(
        (first, second),
        (2, 1),
        "fast read should overtake slow read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_finishes_requests_in_flight() {
    let f = Fixture::start_with(
        MemDevice::new(SIZE).with_slow_offset(0),
        Limits::default(),
        false,
    );
    f.device.fill(0, b"slow data");
    let (mut c, _) = Raw::negotiate(&f, false).await;
    c.request(cmd::READ, 0, 1, 0, 9).await;
    c.request(cmd::DISC, 0, 2, 0, 0).await;
    assert_eq!(c.simple_reply(9).await, (0, 1, b"slow data".to_vec()));
    c.expect_closed().await;
}

/// Pipelines `count` reads and returns the most the device saw at once.
async fn max_reads_in_flight(limits: Limits, count: u64) -> usize {
    let f = Fixture::start_with(
        MemDevice::new(SIZE).with_read_delay(Duration::from_millis(20)),
        limits,
        false,
    );
    let (mut c, _) = Raw::negotiate(&f, false).await;
    for handle in 0..count {
        c.request(cmd::READ, 0, handle, handle * 4096, 4096).await;
    }
    let mut handles: Vec<u64> = Vec::new();
    for _ in 0..count {
        let (error, handle, _) = c.simple_reply(4096).await;
        assert_eq!(error, 0);
        handles.push(handle);
    }
    handles.sort_unstable();
    assert_eq!(handles, (0..count).collect::<Vec<_>>());
    f.device.max_reads_in_flight.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_bounded() {
    let by_count = Limits {
        max_requests: 2,
        max_bytes: 1 << 20,
    };
    let max = max_reads_in_flight(by_count, 16).await;
    assert!(
        (1..=2).contains(&max),
        "{max} reads in flight with a bound of 2"
    );

    let by_bytes = Limits {
        max_requests: 128,
        max_bytes: 3 * 4096,
    };
    let max = max_reads_in_flight(by_bytes, 16).await;
    assert!(
        (1..=3).contains(&max),
        "{max} reads in flight with 3 reads' worth of bytes"
    );

    // Without a tight bound the same pipeline runs concurrently, so the
    // checks above can fail.
    let max = max_reads_in_flight(Limits::default(), 16).await;
    assert!(max > 3, "only {max} reads in flight without a bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_connections_and_removes_the_socket() {
    let f = Fixture::start(SIZE);
    let (mut transmitting, _) = Raw::negotiate(&f, false).await;
    let mut negotiating = Raw::start(&f, client_flag::FIXED_NEWSTYLE).await;
    within("connections to register", async {
        while f.server.connections() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    let Fixture {
        server,
        socket,
        _dir,
        ..
    } = f;
    within("server to stop", server.stop()).await;
    assert!(!socket.exists(), "socket file left behind");
    transmitting.expect_closed().await;
    negotiating.expect_closed().await;
    assert!(UnixStream::connect(&socket).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_path_checks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let export = || crate::nbd::Export {
        name: "x".to_owned(),
        device: std::sync::Arc::new(MemDevice::new(4096)),
    };

    // A stale socket file is replaced.
    let path = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let server = NbdServer::start(export(), &path, None).expect("replaces stale socket");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path)
            .expect("socket exists")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A live server's socket is not stolen.
    match NbdServer::start(export(), &path, None) {
        Err(ServerError::SocketPathInUse(p)) => assert_eq!(p, path),
        other => panic!("expected SocketPathInUse, got {other:?}"),
    }
    within("stop", server.stop()).await;

    // Nor is a file that is not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"data").expect("write file");
    assert!(matches!(
        NbdServer::start(export(), &file, None),
        Err(ServerError::SocketPathInUse(_))
    ));
    assert_eq!(std::fs::read(&file).expect("file kept"), b"data");

    // Export names must be NBD strings.
    let bad = crate::nbd::Export {
        name: "a\0b".to_owned(),
        ..export()
    };
    assert!(matches!(
        NbdServer::start(bad, &dir.path().join("bad.sock"), None),
        Err(ServerError::InvalidExportName(_))
    ));
}
