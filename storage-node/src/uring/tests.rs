use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::*;

/// A temporary directory on a file system that supports `O_DIRECT`.
///
/// `/tmp` may be tmpfs; `BALLAST_TEST_DIR` overrides the default of
/// `/var/tmp`.
pub(crate) fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("BALLAST_TEST_DIR").unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("ballast-test-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("cannot create a scratch dir in {base:?}: {e}"))
}

fn open_direct(path: &Path, len: u64) -> Arc<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open O_DIRECT test file");
    file.set_len(len).expect("size test file");
    Arc::new(file)
}

fn pattern(seed: u64, len: usize) -> IoBuf {
    let mut buf = IoBuf::zeroed(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    buf
}

#[test]
fn start_probes_the_kernel() {
    let ring = create_ring(8).expect("create ring");
    probe(&ring).expect("this kernel supports every opcode the engine needs");
    let engine = IoEngine::start(2, 8).expect("start engine");
    assert_eq!(engine.threads(), 2);
}

#[test]
fn start_refuses_zero_threads_or_depth() {
    assert!(matches!(IoEngine::start(0, 8), Err(Error::Config)));
    assert!(matches!(IoEngine::start(1, 0), Err(Error::Config)));
}

#[test]
fn missing_opcode_error_names_the_opcode_and_kernel() {
    let error = Error::MissingOpcodes {
        kernel: "5.4.0".into(),
        missing: vec!["Fallocate", "Fsync"],
    };
    let message = error.to_string();
    assert!(message.contains("Fallocate, Fsync"), "{message}");
    assert!(message.contains("5.4.0"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_then_read_round_trips() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 1 << 20);
    let engine = IoEngine::start(2, 16).expect("start engine");

    let data = pattern(1, 64 * 1024);
    let expected = data.to_vec();
    let (data, written) = engine.write(&file, 8192, data, false).await;
    assert_eq!(written.expect("write"), 64 * 1024);
    assert_eq!(data.len(), 64 * 1024, "the buffer comes back");

    let (buf, read) = engine.read(&file, 8192, IoBuf::zeroed(64 * 1024)).await;
    assert_eq!(read.expect("read"), 64 * 1024);
    assert!(buf[..] == expected[..], "read back what was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_complete() {
    const BLOCKS: u64 = 512;
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), BLOCKS * 4096);
    // A queue depth far below the number of requests exercises the pending
    // queue and full-SQ paths.
    let engine = IoEngine::start(2, 4).expect("start engine");

    let mut tasks = Vec::new();
    for block in 0..BLOCKS {
        let engine = Arc::clone(&engine);
        let file = Arc::clone(&file);
        tasks.push(tokio::spawn(async move {
            let (_, result) = engine
                .write(&file, block * 4096, pattern(block, 4096), block % 7 == 0)
                .await;
            result.map(|n| (block, n))
        }));
    }
    for task in tasks {
        let (_, n) = task.await.expect("join").expect("write");
        assert_eq!(n, 4096);
    }
    engine.fsync(&file, true).await.expect("fdatasync");
    engine.fsync(&file, false).await.expect("fsync");

    for block in 0..BLOCKS {
        let (buf, read) = engine.read(&file, block * 4096, IoBuf::zeroed(4096)).await;
        assert_eq!(read.expect("read"), 4096);
        assert!(
            buf[..] == pattern(block, 4096)[..],
            "block {block} holds its own write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_past_end_of_file_is_short() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 3 * 4096);
    let engine = IoEngine::start(1, 8).expect("start engine");
    let (_, read) = engine.read(&file, 2 * 4096, IoBuf::zeroed(2 * 4096)).await;
    assert_eq!(read.expect("read"), 4096, "only one block lies before EOF");
    let (_, read) = engine.read(&file, 3 * 4096, IoBuf::zeroed(4096)).await;
    assert_eq!(read.expect("read"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_errors_are_returned_with_the_buffer() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 1 << 20);
    let engine = IoEngine::start(1, 8).expect("start engine");
    // O_DIRECT refuses an offset that is not sector aligned. (Reads of a
    // hole may be served anyway, so this is a write.)
    let (buf, written) = engine.write(&file, 1, pattern(2, 4096), false).await;
    let error = written.expect_err("unaligned O_DIRECT write must fail");
    assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
    assert!(
        buf[..] == pattern(2, 4096)[..],
        "the buffer comes back intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallocate_punches_holes() {
    let dir = scratch_dir();
    let path = dir.path().join("f");
    let file = open_direct(&path, 1 << 20);
    let engine = IoEngine::start(1, 8).expect("start engine");
    let (_, written) = engine.write(&file, 0, pattern(3, 1 << 20), true).await;
    written.expect("write");
    let before = std::fs::metadata(&path).expect("stat").blocks();

    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    engine
        .fallocate(&file, mode, 0, 1 << 19)
        .await
        .expect("punch hole");
    let after = std::fs::metadata(&path).expect("stat");
    assert!(
        after.blocks() < before,
        "{} blocks before, {} after",
        before,
        after.blocks()
    );
    assert_eq!(after.len(), 1 << 20, "KEEP_SIZE keeps the size");

    let (buf, read) = engine.read(&file, 0, IoBuf::zeroed(1 << 19)).await;
    read.expect("read");
    assert!(buf.iter().all(|&b| b == 0), "a hole reads as zeroes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallocate_errors_are_returned() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 4096);
    let engine = IoEngine::start(1, 8).expect("start engine");
    // PUNCH_HOLE without KEEP_SIZE is invalid.
    let error = engine
        .fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)
        .await
        .expect_err("invalid mode");
    assert_eq!(error.raw_os_error(), Some(libc::EOPNOTSUPP));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_complete_in_full() {
    const LEN: usize = 32 << 20;
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), LEN as u64);
    let engine = IoEngine::start(1, 8).expect("start engine");
    let data = pattern(9, LEN);
    let expected = data.to_vec();
    let (_, written) = engine.write(&file, 0, data, false).await;
    assert_eq!(written.expect("write"), LEN);
    let (buf, read) = engine.read(&file, 0, IoBuf::zeroed(LEN)).await;
    assert_eq!(read.expect("read"), LEN);
    assert!(buf[..] == expected[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_leave_the_buffer_to_the_ring() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 64 << 20);
    let engine = IoEngine::start(2, 8).expect("start engine");
    for i in 0..256u64 {
        let write = engine.write(&file, (i % 64) << 20, pattern(i, 1 << 20), false);
        let read = engine.read(&file, ((i + 7) % 64) << 20, IoBuf::zeroed(1 << 20));
        // Polls each future once (which submits it) and then drops it while
        // the kernel may still be using its buffer.
        tokio::select! {
            biased;
            _ = write => {}
            _ = std::future::ready(()) => {}
        }
        tokio::select! {
            biased;
            _ = read => {}
            _ = std::future::ready(()) => {}
        }
    }
    let (_, read) = engine.read(&file, 0, IoBuf::zeroed(4096)).await;
    assert_eq!(read.expect("the engine still works"), 4096);
}

#[test]
fn drop_completes_requests_in_flight() {
    const REQUESTS: u64 = 64;
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), REQUESTS << 20);
    let engine = IoEngine::start(2, 4).expect("start engine");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for i in 0..REQUESTS {
            let write = engine.write(&file, i << 20, pattern(i, 1 << 20), false);
            tokio::select! {
                biased;
                _ = write => {}
                _ = std::future::ready(()) => {}
            }
        }
    });
    // Joins the threads; every accepted write must have been executed.
    drop(engine);

    let engine = IoEngine::start(1, 8).expect("restart engine");
    runtime.block_on(async {
        for i in 0..REQUESTS {
            let (buf, read) = engine.read(&file, i << 20, IoBuf::zeroed(1 << 20)).await;
            read.expect("read");
            assert!(
                buf[..] == pattern(i, 1 << 20)[..],
                "write {i} was completed before shutdown"
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_engine_refuses_requests_and_returns_the_buffer() {
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), 4096);
    let engine = IoEngine::start(2, 8).expect("start engine");
    for worker in &engine.workers {
        worker.shared.close();
    }
    let (buf, written) = engine.write(&file, 0, pattern(1, 4096), false).await;
    let error = written.expect_err("closed engine");
    assert!(is_stopped(&error), "{error}");
    assert!(
        buf[..] == pattern(1, 4096)[..],
        "the caller gets its data back"
    );
    let error = engine.fsync(&file, true).await.expect_err("closed engine");
    assert!(is_stopped(&error), "{error}");
    assert!(!is_stopped(&io::Error::from_raw_os_error(libc::EPIPE)));
}

mod continuation {
    //! Short transfers and retries, driven without a kernel.

    use super::super::op::*;
    use super::*;

    fn write_request(len: usize) -> Op {
        let file = Arc::new(File::open("/dev/null").expect("open /dev/null"));
        Op::Write {
            file,
            offset: 4096,
            buf: pattern(5, len),
            done: 0,
            dsync: false,
        }
    }

    #[test]
    fn short_write_continues_where_it_stopped() {
        let mut request = write_request(3 * 4096);
        let mut retries = 0;
        assert!(matches!(
            request.advance(4096, &mut retries),
            Step::Continue
        ));
        assert_eq!(request.remaining(), Some((8192, 4096, 8192)));
        assert!(matches!(
            request.advance(8192, &mut retries),
            Step::Finish(Ok(12288))
        ));
    }

    #[test]
    fn write_without_progress_fails() {
        let mut request = write_request(4096);
        let mut retries = 0;
        match request.advance(0, &mut retries) {
            Step::Finish(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
            _ => panic!("a write that made no progress must fail"),
        }
    }

    #[test]
    fn eagain_is_retried_a_bounded_number_of_times() {
        let mut request = write_request(4096);
        let mut retries = 0;
        let mut continued = 0;
        loop {
            match request.advance(-libc::EAGAIN, &mut retries) {
                Step::Continue => continued += 1,
                Step::Finish(Err(e)) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
                    break;
                }
                Step::Finish(Ok(_)) => panic!("EAGAIN is not success"),
            }
            assert!(continued <= 1000, "retries must be bounded");
        }
        assert!(continued > 0, "EAGAIN must be retried at least once");
    }

    #[test]
    fn read_stops_at_end_of_file() {
        let mut request = Op::Read {
            file: Arc::new(File::open("/dev/null").expect("open /dev/null")),
            offset: 0,
            buf: IoBuf::zeroed(8192),
            done: 0,
        };
        let mut retries = 0;
        assert!(matches!(
            request.advance(4096, &mut retries),
            Step::Continue
        ));
        assert!(matches!(
            request.advance(0, &mut retries),
            Step::Finish(Ok(4096))
        ));
    }
}

/// Prints the engine's 4 KiB random-read and -write rates at queue depth 32
/// (`cargo test -p ballast-storage-node --release -- --ignored --nocapture
/// engine_throughput`), to compare with fio's io_uring engine on the same
/// machine. Asserts nothing about speed.
#[test]
#[ignore = "a measurement, not a test"]
fn engine_throughput() {
    const FILE_BYTES: u64 = 256 << 20;
    const DEPTH: u64 = 32;
    let dir = scratch_dir();
    let file = open_direct(&dir.path().join("f"), FILE_BYTES);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let engine = IoEngine::start(1, 64).expect("start engine");
    runtime.block_on(async {
        let (_, written) = engine
            .write(&file, 0, IoBuf::zeroed(FILE_BYTES as usize), false)
            .await;
        written.expect("fill");
        for write in [false, true] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            let mut tasks = Vec::new();
            for task in 0..DEPTH {
                let (engine, file) = (Arc::clone(&engine), Arc::clone(&file));
                tasks.push(tokio::spawn(async move {
                    let mut x = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    let mut buf = IoBuf::zeroed(4096);
                    let mut ops = 0u64;
                    while std::time::Instant::now() < deadline {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let offset = x % (FILE_BYTES / 4096) * 4096;
                        let (back, result) = if write {
                            engine.write(&file, offset, buf, false).await
                        } else {
                            engine.read(&file, offset, buf).await
                        };
                        result.expect("I/O");
                        buf = back;
                        ops += 1;
                    }
                    ops
                }));
            }
            let mut ops = 0;
            for task in tasks {
                ops += task.await.expect("task");
            }
            let kind = if write { "randwrite" } else { "randread" };
            println!("{kind} 4k qd{DEPTH}: {} IOPS", ops / 3);
        }
    });
}
