//! The server against real NBD clients run as subprocesses: libnbd's
//! nbdinfo, nbdcopy, nbdsh and nbdfuse (with mkfs.ext4 and e2fsck on top),
//! qemu-io and qemu-img.
//!
//! A missing tool fails the test with a message naming it; these clients are
//! the point of the tests, so they are never skipped silently.

use std::process::{Output, Stdio};

use serde_json::Value;
use tokio::process::Command;

use super::{Fixture, MemDevice, within};
use crate::nbd::transmission::Limits;

const SIZE: usize = 8 << 20;

/// Runs `program` with `args`, killing it if the test gives up on it.
async fn run(program: &str, args: &[&str]) -> Output {
    run_env(program, args, &[]).await
}

/// Like [`run`], with extra environment variables.
async fn run_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    within(&format!("{program} {args:?}"), command.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

/// Asserts the program succeeded and returns its standard output.
fn success(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {}: stdout {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output, what: &str) -> Value {
    let stdout = success(out, what);
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{what} printed bad JSON ({e}): {stdout}"))
}

/// Bytes that differ from block to block, with a hole of zeroes, so that a
/// misplaced or dropped block is noticed.
fn image(len: usize) -> Vec<u8> {
    let mut data: Vec<u8> = (0..len)
        .map(|i| ((i / 4096) as u8).wrapping_mul(37) ^ (i as u8))
        .collect();
    data[len / 4..len / 2].fill(0);
    data
}

fn check_export(export: &Value) {
    assert_eq!(export["export-size"], SIZE as u64, "{export}");
    for key in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[key], true, "{key} in {export}");
    }
    assert_eq!(export["is_read_only"], false, "{export}");
    assert_eq!(export["block_size_minimum"], 1, "{export}");
    assert_eq!(export["block_size_preferred"], 4096, "{export}");
    assert_eq!(export["block_size_maximum"], 32 << 20, "{export}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_and_block_sizes() {
    let f = Fixture::start(SIZE);
    for uri in [f.uri(), f.named_uri()] {
        let info = json(&run("nbdinfo", &["--json", &uri]).await, "nbdinfo");
        assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
        check_export(&info["exports"][0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_over_tcp() {
    let f = Fixture::start_with(MemDevice::new(SIZE), Limits::default(), true);
    let addr = f.server.tcp_addr().expect("TCP listener");
    let uri = format!("nbd://{addr}/{}", Fixture::EXPORT);
    let info = json(&run("nbdinfo", &["--json", &uri]).await, "nbdinfo");
    check_export(&info["exports"][0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_the_export() {
    let f = Fixture::start(SIZE);
    let list = json(
        &run("nbdinfo", &["--list", "--json", &f.uri()]).await,
        "nbdinfo --list",
    );
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports in {list}"))
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, [Fixture::EXPORT]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_and_verifies_patterns() {
    let f = Fixture::start(SIZE);
    let uri = f.uri();
    let qemu_io = |command: &'static str| {
        let uri = uri.clone();
        async move { run("qemu-io", &["-f", "raw", "-c", command, &uri]).await }
    };

    success(&qemu_io("write -P 0xab 0 64k").await, "qemu-io write");
    let contents = f.device.contents();
    assert!(contents[..64 << 10].iter().all(|&b| b == 0xab));
    assert!(contents[64 << 10..].iter().all(|&b| b == 0));

    let out = success(&qemu_io("read -P 0xab 0 64k").await, "qemu-io read");
    assert!(!out.contains("fail"), "{out}");

    let wrong = qemu_io("read -P 0xcd 0 64k").await;
    let stdout = String::from_utf8_lossy(&wrong.stdout);
    assert!(
        !wrong.status.success() || stdout.contains("Pattern verification failed"),
        "reading the wrong pattern succeeded: {stdout}"
    );

    // Unaligned I/O and zeroing through qemu's own request splitting.
    success(
        &qemu_io("write -P 0x5a 1000 3000").await,
        "qemu-io unaligned write",
    );
    assert!(f.device.contents()[1000..4000].iter().all(|&b| b == 0x5a));
    success(&qemu_io("write -z 0 4096").await, "qemu-io write -z");
    assert!(f.device.contents()[..4096].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_an_image_in_and_compares() {
    let f = Fixture::start(SIZE);
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src.img");
    let data = image(SIZE);
    std::fs::write(&src, &data).expect("write image");
    let src = src.to_str().expect("UTF-8 path");
    let uri = f.uri();

    success(
        &run(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri],
        )
        .await,
        "qemu-img convert",
    );
    assert!(f.device.contents() == data, "export differs from the image");
    success(
        &run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src, &uri],
        )
        .await,
        "qemu-img compare",
    );

    // The comparison notices a difference.
    f.device.fill(SIZE - 1, &[data[SIZE - 1] ^ 1]);
    let differs = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &uri],
    )
    .await;
    assert_eq!(
        differs.status.code(),
        Some(1),
        "qemu-img compare missed a change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_uses_several_connections() {
    let f = Fixture::start(SIZE);
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let data = image(SIZE);
    std::fs::write(&src, &data).expect("write image");
    let (src, dst) = (
        src.to_str().expect("UTF-8 path"),
        dst.to_str().expect("UTF-8 path"),
    );
    let uri = f.uri();

    success(
        &run("nbdcopy", &["--connections=4", "--threads=4", src, &uri]).await,
        "nbdcopy in",
    );
    assert!(f.device.contents() == data, "export differs from the image");
    let accepted = f.server.connections_accepted();
    assert!(
        accepted >= 4,
        "nbdcopy opened {accepted} connections; multi-conn not used"
    );

    success(
        &run("nbdcopy", &["--connections=4", "--threads=4", &uri, dst]).await,
        "nbdcopy out",
    );
    assert!(
        std::fs::read(dst).expect("read copy") == data,
        "copy differs"
    );
    f.wait_idle().await;
}

/// libnbd (through nbdsh, which provides the handle `h`) with structured
/// replies turned off, so the simple-reply path is exercised by a real
/// client too, including many requests in flight.
const LIBNBD_SIMPLE_REPLIES: &str = r#"
import os

h.set_request_structured_replies(False)
h.connect_uri(os.environ["NBD_TEST_URI"])
assert not h.get_structured_replies_negotiated()
assert h.get_size() == int(os.environ["NBD_TEST_SIZE"])
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.can_multi_conn() and not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1

block = bytes(range(256)) * 16
h.pwrite(block * 16, 0, nbd.CMD_FLAG_FUA)
assert h.pread(len(block) * 16, 0) == block * 16
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 4096) == bytes(4096)
h.trim(8192, 8192)
h.flush()

# 64 writes, then 64 reads, all in flight at once.
for i in range(64):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), (100 + i) * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(b, (100 + i) * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (b, c) in enumerate(zip(bufs, cookies)):
    assert h.aio_command_completed(c)
    assert b.to_bytearray() == bytearray([i]) * 4096, i

h.shutdown()
print("ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnbd_with_simple_replies() {
    let f = Fixture::start(SIZE);
    let size = SIZE.to_string();
    let uri = f.uri();
    // The bindings are a distribution package built for the distribution's
    // Python; nbdsh runs whatever `python3` is first on PATH, which may be a
    // developer's pyenv or venv without them.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = run_env(
        "nbdsh",
        &["-c", LIBNBD_SIMPLE_REPLIES],
        &[
            ("NBD_TEST_URI", &uri),
            ("NBD_TEST_SIZE", &size),
            ("PATH", &path),
        ],
    )
    .await;
    assert_eq!(success(&out, "nbdsh").trim(), "ok");

    let contents = f.device.contents();
    assert!(contents[4096..16384].iter().all(|&b| b == 0));
    for i in 0..64usize {
        let at = (100 + i) * 4096;
        assert!(
            contents[at..at + 4096].iter().all(|&b| b == i as u8),
            "block {i}"
        );
    }
    assert!(f.device.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    f.wait_idle().await;
}

/// Unmounts a FUSE mount point when dropped, so a failing test leaves no
/// mount behind.
struct FuseMount(std::path::PathBuf);

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkfs_through_nbdfuse() {
    const FS_SIZE: usize = 64 << 20;
    let f = Fixture::start_with(MemDevice::new(FS_SIZE), Limits::default(), false);
    let dir = tempfile::tempdir().expect("temp dir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");
    let disk = mnt.join("disk");

    let mut nbdfuse = Command::new("nbdfuse")
        .arg(&disk)
        .arg(f.uri())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nbdfuse (is it installed?): {e}"));
    let mount = FuseMount(mnt.clone());
    within("nbdfuse to mount", async {
        while std::fs::metadata(&disk).map(|m| m.len()).ok() != Some(FS_SIZE as u64) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;

    let disk_path = disk.to_str().expect("UTF-8 path");
    success(
        &run("mkfs.ext4", &["-q", "-F", disk_path]).await,
        "mkfs.ext4",
    );
    // Read back through NBD and check every structure mkfs wrote.
    success(&run("e2fsck", &["-f", "-n", disk_path]).await, "e2fsck");
    let contents = f.device.contents();
    // The ext4 superblock magic (0xEF53) at byte 1024 + 56.
    assert_eq!(&contents[1024 + 56..1024 + 58], &[0x53, 0xef]);

    drop(mount);
    let status = within("nbdfuse to exit", nbdfuse.wait())
        .await
        .expect("nbdfuse status");
    assert!(status.success(), "nbdfuse exited with {status}");
    f.wait_idle().await;
}
