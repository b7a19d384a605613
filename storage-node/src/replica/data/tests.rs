use std::os::unix::fs::MetadataExt;

use super::*;
use crate::uring::tests::scratch_dir;

/// xorshift64*: deterministic, so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

struct Fixture {
    // Kept for its Drop, which removes the directory.
    _dir: tempfile::TempDir,
    path: PathBuf,
    replica: Arc<ReplicaData>,
}

fn fixture(size_bytes: u64) -> Fixture {
    let dir = scratch_dir();
    let path = dir.path().join("replica");
    File::create(&path)
        .and_then(|f| f.set_len(size_bytes))
        .expect("create replica file");
    let engine = IoEngine::start(2, 32).expect("start engine");
    let replica = ReplicaData::open(&path, size_bytes, engine).expect("open replica");
    Fixture {
        _dir: dir,
        path,
        replica: Arc::new(replica),
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

async fn read_all(replica: &ReplicaData) -> Vec<u8> {
    let size = replica.size_bytes() as usize;
    replica.read(0, size).await.expect("read device").to_vec()
}

/// One random request confined to `region`, applied to the replica and to
/// `model` (the expected bytes of the region).
async fn random_op(
    replica: &ReplicaData,
    rng: &mut Rng,
    region: std::ops::Range<u64>,
    model: &mut [u8],
) {
    let block = replica.block_size();
    let span = region.end - region.start;
    let (offset, length) = if rng.below(3) == 0 {
        // Aligned requests, where the region allows them.
        let first = region.start.div_ceil(block) * block;
        let last = region.end / block * block;
        if last > first {
            let start = first + rng.below((last - first) / block) * block;
            let blocks = 1 + rng.below((last - start) / block).min(15);
            (start, blocks * block)
        } else {
            (region.start, span)
        }
    } else {
        let start = region.start + rng.below(span);
        (
            start,
            1 + rng.below((region.end - start).min(3 * block + 100)),
        )
    };
    let at = (offset - region.start) as usize;
    let range = at..at + length as usize;
    match rng.below(8) {
        0..=3 => {
            let data = rng.bytes(length as usize);
            replica
                .write(offset, IoBuf::from_slice(&data), rng.below(4) == 0)
                .await
                .expect("write");
            model[range].copy_from_slice(&data);
        }
        4 | 5 => {
            let got = replica.read(offset, length as usize).await.expect("read");
            assert_eq!(got.len(), length as usize);
            assert!(
                got[..] == model[range],
                "read of {length} bytes at {offset} differs from the model"
            );
        }
        6 => {
            replica.trim(offset, length).await.expect("trim");
            model[range].fill(0);
        }
        _ => {
            let punch = rng.below(2) == 0;
            let fua = rng.below(2) == 0;
            replica
                .write_zeroes(offset, length, punch, fua)
                .await
                .expect("write zeroes");
            model[range].fill(0);
        }
    }
}

#[test]
fn block_size_is_the_direct_io_alignment() {
    let f = fixture(1 << 20);
    let block = f.replica.block_size();
    eprintln!("BLOCK {block}");
    assert!(
        block.is_power_of_two() && (512..=4096).contains(&block),
        "{block}"
    );
    let file = File::open(&f.path).expect("open");
    if let Ok(Some((_, offset_align))) = dio_alignment(&file) {
        assert_eq!(block, u64::from(offset_align).max(MIN_BLOCK_SIZE));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aligned_write_read_round_trip() {
    let f = fixture(1 << 20);
    let data = Rng::new(1).bytes(64 << 10);
    f.replica
        .write(4096, IoBuf::from_slice(&data), false)
        .await
        .expect("write");
    let got = f.replica.read(4096, data.len()).await.expect("read");
    assert!(got[..] == data[..]);
    let before = f.replica.read(0, 4096).await.expect("read");
    assert!(
        before.iter().all(|&b| b == 0),
        "bytes before the write are untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_requests_match_a_model() {
    const SIZE: u64 = 256 << 10;
    let f = fixture(SIZE);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng::new(42);
    for _ in 0..3000 {
        random_op(&f.replica, &mut rng, 0..SIZE, &mut model).await;
    }
    assert!(
        read_all(&f.replica).await == model,
        "final contents differ from the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_disjoint_regions_match_a_model() {
    // Region boundaries fall inside blocks, so neighbours' read-modify-writes
    // share edge blocks: a lost update would show here.
    const REGION: u64 = 10_001;
    const TASKS: u64 = 8;
    let size = (REGION * TASKS).div_ceil(4096) * 4096;
    let f = fixture(size);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let replica = Arc::clone(&f.replica);
        tasks.push(tokio::spawn(async move {
            let region = task * REGION..(task + 1) * REGION;
            let mut model = vec![0u8; REGION as usize];
            let mut rng = Rng::new(task + 100);
            for _ in 0..400 {
                random_op(&replica, &mut rng, region.clone(), &mut model).await;
            }
            model
        }));
    }
    let mut expected = Vec::with_capacity(size as usize);
    for task in tasks {
        expected.extend(task.await.expect("task"));
    }
    expected.resize(size as usize, 0);
    let got = read_all(&f.replica).await;
    let first_difference = got.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "device differs from the merged models"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_end_in_a_serial_order() {
    const SIZE: u64 = 16384;
    let f = fixture(SIZE);
    let block = f.replica.block_size() as usize;
    // (offset, length, fill): a mix of aligned and unaligned writes that
    // overlap each other's blocks.
    let writes: [(u64, usize, u8); 4] = [
        (100, 8900, 0xA1),
        (0, 8192, 0xB2),
        (4000, 8000, 0xC3),
        (8192, 4096, 0xD4),
    ];
    let base = Rng::new(7).bytes(SIZE as usize);

    // Every serial order's result.
    let mut orders = Vec::new();
    let mut permutation = [0usize, 1, 2, 3];
    permutations(&mut permutation, 0, &mut |order: &[usize]| {
        let mut state = base.clone();
        for &i in order {
            let (offset, length, fill) = writes[i];
            state[offset as usize..offset as usize + length].fill(fill);
        }
        orders.push(state);
    });
    assert_eq!(orders.len(), 24);

    for round in 0..150 {
        f.replica
            .write(0, IoBuf::from_slice(&base), false)
            .await
            .expect("reset");
        let tasks: Vec<_> = writes
            .iter()
            .map(|&(offset, length, fill)| {
                let replica = Arc::clone(&f.replica);
                tokio::spawn(async move {
                    replica
                        .write(offset, IoBuf::from_slice(&vec![fill; length]), false)
                        .await
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task").expect("write");
        }
        let got = read_all(&f.replica).await;
        for (index, chunk) in got.chunks(block).enumerate() {
            let range = index * block..(index + 1) * block;
            assert!(
                orders.iter().any(|order| order[range.clone()] == *chunk),
                "round {round}: block {index} matches no serial order of the writes"
            );
        }
    }
}

fn permutations(items: &mut [usize], k: usize, visit: &mut impl FnMut(&[usize])) {
    if k == items.len() {
        visit(items);
        return;
    }
    for i in k..items.len() {
        items.swap(k, i);
        permutations(items, k + 1, visit);
        items.swap(k, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_unaligned_write_never_clobbers_a_later_write() {
    let f = fixture(4 << 20);
    // A long write-back widens the window in which the dropped request's
    // write is still in flight.
    let long = IoBuf::from_slice(&vec![0xAA; 2 << 20]);
    for round in 0..300u64 {
        {
            let unaligned = f.replica.write(100, IoBuf::from_slice(&long), false);
            let mut unaligned = std::pin::pin!(unaligned);
            // Spreads the moment of the drop over the read and the
            // write-back phases of the read-modify-write.
            let delay = std::time::Duration::from_micros(round * 37 % 3000);
            let start = std::time::Instant::now();
            while start.elapsed() < delay {
                tokio::select! {
                    biased;
                    _ = &mut unaligned => break,
                    _ = tokio::task::yield_now() => {}
                }
            }
            // Dropped here, possibly with its read-modify-write in flight.
        }
        let fill = (round % 200) as u8 + 1;
        f.replica
            .write(0, IoBuf::from_slice(&[fill; 4096]), false)
            .await
            .expect("aligned write");
        let got = f.replica.read(0, 4096).await.expect("read");
        assert!(
            got.iter().all(|&b| b == fill),
            "round {round}: a cancelled write overwrote part of a later one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_leaves_zeroes_and_releases_space() {
    const SIZE: u64 = 2 << 20;
    let f = fixture(SIZE);
    let data = Rng::new(3).bytes(SIZE as usize);
    f.replica
        .write(0, IoBuf::from_slice(&data), true)
        .await
        .expect("fill");
    f.replica.flush().await.expect("flush");
    let before = allocated_bytes(&f.path);
    assert!(
        before >= SIZE,
        "the filled file is allocated ({before} bytes)"
    );

    let (offset, length) = (1000u64, 1u64 << 20);
    f.replica.trim(offset, length).await.expect("trim");
    f.replica.flush().await.expect("flush");

    let mut expected = data;
    expected[offset as usize..(offset + length) as usize].fill(0);
    assert!(
        read_all(&f.replica).await == expected,
        "trimmed range reads as zeroes, the rest is intact"
    );
    let released = before - allocated_bytes(&f.path);
    // The file system frees whole blocks of up to 4 KiB inside the range.
    assert!(
        released >= length - 2 * 4096,
        "only {released} bytes released"
    );
    assert_eq!(
        std::fs::metadata(&f.path).expect("stat").len(),
        SIZE,
        "size kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_zeroes_keeps_or_releases_space() {
    const SIZE: u64 = 2 << 20;
    let f = fixture(SIZE);
    let empty = allocated_bytes(&f.path);

    // Without a hole, zeroing a sparse range allocates it.
    f.replica
        .write_zeroes(0, 1 << 20, false, true)
        .await
        .expect("write zeroes");
    let allocated = allocated_bytes(&f.path);
    assert!(
        allocated >= empty + (1 << 20),
        "{allocated} bytes allocated"
    );
    let got = f.replica.read(0, 1 << 20).await.expect("read");
    assert!(got.iter().all(|&b| b == 0));

    // Over data, without a hole: zeroes, still allocated.
    let data = Rng::new(5).bytes(1 << 20);
    f.replica
        .write(1 << 20, IoBuf::from_slice(&data), false)
        .await
        .expect("write");
    f.replica
        .write_zeroes((1 << 20) + 333, 500_000, false, false)
        .await
        .expect("write zeroes");
    let mut expected = data.clone();
    expected[333..333 + 500_000].fill(0);
    let got = f.replica.read(1 << 20, 1 << 20).await.expect("read");
    assert!(got[..] == expected[..], "zeroed range with intact edges");
    let before_punch = allocated_bytes(&f.path);
    assert!(
        before_punch >= 2 << 20,
        "no-hole zeroing keeps the range allocated"
    );

    // With a hole allowed: zeroes, space released.
    f.replica
        .write_zeroes(1 << 20, 1 << 20, true, true)
        .await
        .expect("punch");
    let got = f.replica.read(1 << 20, 1 << 20).await.expect("read");
    assert!(got.iter().all(|&b| b == 0));
    assert!(
        allocated_bytes(&f.path) + (1 << 20) <= before_punch,
        "punching released the range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_requests_are_refused() {
    const SIZE: u64 = 1 << 20;
    let f = fixture(SIZE);
    let out_of_range =
        |result: Result<(), BlockError>| matches!(result, Err(BlockError::OutOfRange { .. }));
    assert!(matches!(
        f.replica.read(SIZE - 10, 11).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.replica.read(u64::MAX, 1).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(out_of_range(
        f.replica.write(SIZE, IoBuf::from_slice(&[1]), false).await
    ));
    assert!(out_of_range(
        f.replica
            .write(SIZE - 4096, IoBuf::zeroed(8192), true)
            .await
    ));
    assert!(out_of_range(f.replica.trim(SIZE - 1, 2).await));
    assert!(out_of_range(f.replica.trim(u64::MAX - 1, 4).await));
    assert!(out_of_range(
        f.replica.write_zeroes(4096, SIZE, false, false).await
    ));
    assert_eq!(
        std::fs::metadata(&f.path).expect("stat").len(),
        SIZE,
        "file not grown"
    );
    // The last byte and empty requests at the end are in range.
    f.replica
        .write(SIZE - 1, IoBuf::from_slice(&[9]), false)
        .await
        .expect("last byte");
    assert_eq!(&f.replica.read(SIZE - 1, 1).await.expect("read")[..], &[9]);
    f.replica
        .write(SIZE, IoBuf::zeroed(0), false)
        .await
        .expect("empty write");
    assert!(
        f.replica
            .read(SIZE, 0)
            .await
            .expect("empty read")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fua_writes_and_flush_succeed() {
    let f = fixture(1 << 20);
    f.replica
        .write(0, IoBuf::from_slice(&[1; 4096]), true)
        .await
        .expect("FUA write");
    f.replica
        .write(5, IoBuf::from_slice(&[2; 10]), true)
        .await
        .expect("unaligned FUA write");
    f.replica.flush().await.expect("flush");
    let got = f.replica.read(0, 4096).await.expect("read");
    assert!(got[..5].iter().all(|&b| b == 1) && got[5..15].iter().all(|&b| b == 2));
    assert!(got[15..].iter().all(|&b| b == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_of_32_mib_work_aligned_and_not() {
    const LEN: usize = 32 << 20;
    let f = fixture(40 << 20);
    let data = Rng::new(11).bytes(LEN);
    f.replica
        .write(0, IoBuf::from_slice(&data), false)
        .await
        .expect("aligned write");
    assert!(f.replica.read(0, LEN).await.expect("read")[..] == data[..]);

    let offset = (4 << 20) + 777;
    let data = Rng::new(12).bytes(LEN);
    f.replica
        .write(offset, IoBuf::from_slice(&data), true)
        .await
        .expect("unaligned write");
    assert!(f.replica.read(offset, LEN).await.expect("read")[..] == data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_checks_size_and_resize_follows_the_file() {
    let dir = scratch_dir();
    let path = dir.path().join("replica");
    let engine = IoEngine::start(1, 8).expect("start engine");
    let missing = ReplicaData::open(&path, 4096, Arc::clone(&engine));
    assert!(matches!(missing, Err(Error::Open { .. })), "{missing:?}");

    let file = File::create(&path).expect("create");
    file.set_len(1 << 20).expect("size");
    let too_big = ReplicaData::open(&path, 2 << 20, Arc::clone(&engine));
    assert!(
        matches!(too_big, Err(Error::FileTooSmall { file_bytes, .. }) if file_bytes == 1 << 20)
    );
    let unaligned = ReplicaData::open(&path, 1000, Arc::clone(&engine));
    assert!(matches!(unaligned, Err(Error::UnalignedSize { .. })));

    let replica = ReplicaData::open(&path, 1 << 20, engine).expect("open");
    assert!(matches!(
        replica.set_size_bytes(2 << 20),
        Err(Error::FileTooSmall { .. })
    ));
    assert_eq!(
        replica.size_bytes(),
        1 << 20,
        "size unchanged after an error"
    );
    assert!(replica.read((1 << 20) + 512, 512).await.is_err());

    file.set_len(2 << 20).expect("grow");
    replica.set_size_bytes(2 << 20).expect("resize");
    assert_eq!(replica.size_bytes(), 2 << 20);
    replica
        .write((2 << 20) - 100, IoBuf::from_slice(&[7; 100]), false)
        .await
        .expect("write in the new space");
    assert_eq!(
        &replica.read((2 << 20) - 100, 100).await.expect("read")[..],
        &[7; 100]
    );
}

#[test]
fn errors_map_to_block_errors() {
    assert!(matches!(
        block_error(io::Error::from_raw_os_error(libc::ENOSPC)),
        BlockError::NoSpace
    ));
    assert!(matches!(
        block_error(io::Error::from_raw_os_error(libc::EDQUOT)),
        BlockError::NoSpace
    ));
    assert!(matches!(
        block_error(io::Error::from_raw_os_error(libc::EIO)),
        BlockError::Io(_)
    ));
    let stopped = io::Error::new(io::ErrorKind::BrokenPipe, uring::Stopped);
    assert!(matches!(block_error(stopped), BlockError::Unavailable(_)));
}

/// A tmpfs of a few pages, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(bytes: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let options = format!("size={bytes}");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| eprintln!("skipping: cannot mount a tmpfs ({e})"))
        .ok()?;
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_is_no_space() {
    let Some(fs) = SmallFs::mount(256 << 10) else {
        return;
    };
    let path = fs.0.path().join("replica");
    File::create(&path)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create sparse replica");
    let engine = IoEngine::start(1, 8).expect("start engine");
    let replica = match ReplicaData::open(&path, 4 << 20, engine) {
        Ok(replica) => replica,
        Err(Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipping: this kernel's tmpfs lacks O_DIRECT");
            return;
        }
        Err(error) => panic!("open: {error}"),
    };
    let result = replica.write(0, IoBuf::zeroed(1 << 20), false).await;
    assert!(matches!(result, Err(BlockError::NoSpace)), "{result:?}");
    let result = replica.write_zeroes(0, 2 << 20, false, false).await;
    assert!(matches!(result, Err(BlockError::NoSpace)), "{result:?}");
}
