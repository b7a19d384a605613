//! Pool tests on real loop devices, real `mkfs.xfs` and real mounts (root).
//!
//! Every test holds a [`TestEnv`] whose `Drop` unmounts everything under its
//! directory and detaches every loop device backed by a file in it, so a
//! failed assertion leaves nothing behind. The cleanup uses the mount table and
//! sysfs directly, not the code under test.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::*;

/// Small enough to be cheap, large enough for mkfs.xfs (300 MiB minimum).
const POOL_BYTES: u64 = 512 << 20;

pub(crate) struct TestEnv {
    dir: tempfile::TempDir,
}

impl TestEnv {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("ballast-pool-test")
                .tempdir()
                .expect("tempdir"),
        }
    }

    pub(crate) fn root(&self) -> PathBuf {
        fs::canonicalize(self.dir.path()).expect("canonical tempdir")
    }

    pub(crate) fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    /// A file pool configuration for a new 512 MiB file called `name`.
    pub(crate) fn file_config(&self, name: &str) -> PoolConfig {
        PoolConfig::new(PoolSource::File {
            path: self.path(name),
            size_bytes: Some(POOL_BYTES),
        })
    }

    /// Creates a sparse file of `bytes`.
    fn sparse_file(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.path(name);
        let file = fs::File::create(&path).expect("create file");
        file.set_len(bytes).expect("set_len");
        path
    }

    /// Attaches `file` to a loop device by hand (for `PoolSource::Device`).
    fn attach(&self, file: &Path) -> PathBuf {
        let dev = run_ok("losetup", &["--find", "--show", path_str(file)]);
        PathBuf::from(dev.trim())
    }

    fn loop_devices(&self) -> Vec<PathBuf> {
        let root = self.root();
        let mut found = Vec::new();
        let Ok(entries) = fs::read_dir("/sys/block") else {
            return found;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let backing = entry.path().join("loop/backing_file");
            if let Ok(text) = fs::read_to_string(backing)
                && Path::new(text.trim_end_matches('\n')).starts_with(&root)
            {
                found.push(PathBuf::from("/dev").join(name));
            }
        }
        found
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let root = self.root();
        if let Ok(mounts) = mountinfo::read() {
            let mut ours: Vec<_> = mounts
                .into_iter()
                .filter(|m| m.mount_point.starts_with(&root))
                .collect();
            ours.reverse();
            for m in ours {
                let _ = nix::mount::umount2(&m.mount_point, MntFlags::MNT_DETACH);
            }
        }
        for dev in self.loop_devices() {
            let _ = Command::new("losetup").arg("--detach").arg(&dev).status();
        }
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mounts_at(path: &Path) -> usize {
    let mounts = mountinfo::read().expect("mountinfo");
    mountinfo::at(&mounts, path).len()
}

fn kinds(device: &Path) -> Vec<String> {
    signature::probe(device)
        .expect("probe")
        .into_iter()
        .map(|s| s.kind)
        .collect()
}

/// Writes a DOS partition table with one Linux partition.
fn write_mbr(path: &Path) {
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[1..4].copy_from_slice(&[0, 2, 0]);
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&8192u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    write_at(path, 0, &mbr);
}

/// Writes a protective MBR and a primary GPT with one partition, as sgdisk
/// would (without the backup copy, which libblkid does not need).
fn write_gpt(path: &Path, disk_bytes: u64) {
    let sectors = disk_bytes / 512;
    let mut pmbr = [0u8; 512];
    pmbr[446 + 4] = 0xee;
    pmbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    let protective = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    pmbr[446 + 12..446 + 16].copy_from_slice(&protective.to_le_bytes());
    pmbr[510] = 0x55;
    pmbr[511] = 0xaa;

    let mut entries = vec![0u8; 128 * 128];
    entries[0..16].copy_from_slice(&[0x0f; 16]);
    entries[16..32].copy_from_slice(&[0x42; 16]);
    entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
    entries[40..48].copy_from_slice(&(sectors - 2048).to_le_bytes());

    let mut header = [0u8; 92];
    header[0..8].copy_from_slice(b"EFI PART");
    header[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    header[12..16].copy_from_slice(&92u32.to_le_bytes());
    header[24..32].copy_from_slice(&1u64.to_le_bytes());
    header[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
    header[40..48].copy_from_slice(&34u64.to_le_bytes());
    header[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
    header[56..72].copy_from_slice(&[0x17; 16]);
    header[72..80].copy_from_slice(&2u64.to_le_bytes());
    header[80..84].copy_from_slice(&128u32.to_le_bytes());
    header[84..88].copy_from_slice(&128u32.to_le_bytes());
    header[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
    let header_crc = crc32(&header);
    header[16..20].copy_from_slice(&header_crc.to_le_bytes());

    write_at(path, 0, &pmbr);
    write_at(path, 512, &header);
    write_at(path, 1024, &entries);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(bytes).expect("write");
    file.sync_all().expect("sync");
}

#[test]
fn names_are_validated_and_derived() {
    for good in ["a", "pool-1", "Pool_2.x", &"p".repeat(MAX_NAME_LEN)] {
        validate_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "",
        ".hidden",
        "a/b",
        "a b",
        "ü",
        &"p".repeat(MAX_NAME_LEN + 1),
    ] {
        assert!(
            matches!(validate_name(bad), Err(Error::InvalidName { .. })),
            "{bad:?} accepted"
        );
    }
    assert_eq!(
        derive_name(Path::new("/var/tmp/pool-a.img")).expect("file"),
        "pool-a"
    );
    assert_eq!(
        derive_name(Path::new("/dev/nvme1n1")).expect("device"),
        "nvme1n1"
    );
    assert_eq!(
        derive_name(Path::new("/dev/disk/by-id/ata-X Y:Z")).expect("odd"),
        "ata-X-Y-Z"
    );
    assert_eq!(
        derive_name(Path::new("/x/.hidden.img")).expect("dot"),
        "hidden"
    );
    assert!(derive_name(Path::new("/")).is_err());
}

#[test]
fn bad_sources_are_refused_before_touching_anything() {
    let env = TestEnv::new();
    let state = env.state_dir();

    let missing = PoolConfig::new(PoolSource::File {
        path: env.path("missing.img"),
        size_bytes: None,
    });
    assert!(matches!(
        Pool::open(&state, &missing),
        Err(Error::SizeRequired { .. })
    ));
    assert!(!env.path("missing.img").exists());

    let odd = PoolConfig::new(PoolSource::File {
        path: env.path("odd.img"),
        size_bytes: Some(POOL_BYTES + 1),
    });
    assert!(matches!(
        Pool::open(&state, &odd),
        Err(Error::InvalidSize { .. })
    ));

    env.sparse_file("small.img", POOL_BYTES / 2);
    let mismatch = PoolConfig::new(PoolSource::File {
        path: env.path("small.img"),
        size_bytes: Some(POOL_BYTES),
    });
    assert!(matches!(
        Pool::open(&state, &mismatch),
        Err(Error::FileSizeMismatch { actual_bytes, .. }) if actual_bytes == POOL_BYTES / 2
    ));

    let not_device = PoolConfig::new(PoolSource::Device(env.path("small.img")));
    assert!(matches!(
        Pool::open(&state, &not_device),
        Err(Error::WrongSourceType {
            expected: "block device",
            ..
        })
    ));
    let no_device = PoolConfig::new(PoolSource::Device(env.path("nope")));
    assert!(matches!(
        Pool::open(&state, &no_device),
        Err(Error::SourceNotFound { .. })
    ));

    let mut zero = env.file_config("zero.img");
    zero.overcommit_percent = 0;
    assert!(matches!(
        Pool::open(&state, &zero),
        Err(Error::InvalidOvercommit { .. })
    ));
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());
}

#[test]
fn file_pool_is_formatted_labelled_and_reimported_without_reformat() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let file = env.path("pool-a.img");

    let pool = Pool::open(&state, &env.file_config("pool-a.img")).expect("create pool");
    let mount = state.join(POOLS_DIR).join("pool-a");
    assert_eq!(pool.name(), "pool-a");
    assert_eq!(pool.mount_path(), mount);
    assert_eq!(pool.uuid().get_version_num(), 4);
    assert_eq!(mounts_at(&mount), 1);
    assert_eq!(loopdev::backing_file(pool.device()), Some(file.clone()));
    assert!(pool.replicas_dir().is_dir());
    let on_disk = label::read(&mount).expect("read label").expect("label");
    assert_eq!(&on_disk, pool.label());
    let sigs = signature::probe(pool.device()).expect("probe");
    assert_eq!(sigs.len(), 1, "{sigs:?}");
    assert_eq!(sigs[0].kind, "xfs");
    assert_eq!(sigs[0].label.as_deref(), Some(XFS_LABEL));
    let xfs_info = run_ok("xfs_info", &[path_str(&mount)]);
    assert!(xfs_info.contains("reflink=1"), "{xfs_info}");

    let uuid = pool.uuid();
    let device = pool.device().to_owned();
    fs::write(mount.join("marker"), b"still here").expect("marker");

    // The agent is killed: no close, the mount and the loop device stay.
    drop(pool);
    let pool = Pool::open(&state, &env.file_config("pool-a.img")).expect("reopen mounted");
    assert_eq!(pool.uuid(), uuid);
    assert_eq!(pool.device(), device);
    assert_eq!(mounts_at(&mount), 1, "mounted twice");
    assert_eq!(env.loop_devices(), vec![device.clone()]);
    assert_eq!(
        fs::read(mount.join("marker")).expect("marker survives"),
        b"still here"
    );

    pool.close().expect("close");
    pool.close().expect("second close is a no-op");
    assert_eq!(mounts_at(&mount), 0);
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());
    assert!(matches!(pool.capacity(), Err(Error::PoolClosed { .. })));

    // A clean restart imports; a configured name does not override the label.
    let mut config = PoolConfig::new(PoolSource::File {
        path: file.clone(),
        size_bytes: None,
    });
    config.name = Some("renamed".to_owned());
    let pool = Pool::open(&state, &config).expect("import");
    assert_eq!(pool.uuid(), uuid);
    assert_eq!(pool.name(), "pool-a");
    assert_eq!(pool.mount_path(), mount);
    assert_eq!(mounts_at(&state.join(POOLS_DIR).join("renamed")), 0);
    assert_eq!(
        fs::read(mount.join("marker")).expect("marker survives import"),
        b"still here"
    );
    pool.close().expect("close");
}

#[test]
fn ext4_is_refused_by_name_and_formatted_only_with_force() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let file = env.sparse_file("ext4.img", POOL_BYTES);
    run_ok("mkfs.ext4", &["-q", "-F", path_str(&file)]);

    // As a file source: refused, and the loop device it attached is released.
    let err = Pool::open(&state, &env.file_config("ext4.img")).expect_err("ext4 file refused");
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());
    assert!(matches!(err, Error::ForeignSignature { .. }), "{err:?}");

    // As a device source.
    let device = env.attach(&file);
    let config = PoolConfig::new(PoolSource::Device(device.clone()));
    let err = Pool::open(&state, &config).expect_err("ext4 device refused");
    let message = err.to_string();
    assert!(
        message.contains("ext4 signature at offset 0x438")
            && message.contains(path_str(&device))
            && message.contains("--force-format"),
        "{message}"
    );
    assert_eq!(
        kinds(&device),
        vec!["ext4"],
        "the refusal touched the device"
    );
    assert_eq!(
        mounts_at(
            &state
                .join(POOLS_DIR)
                .join(derive_name(&device).expect("name"))
        ),
        0
    );

    let forced = PoolConfig {
        force_format: true,
        ..config.clone()
    };
    let pool = Pool::open(&state, &forced).expect("forced format");
    assert_eq!(kinds(&device), vec!["xfs"]);
    let uuid = pool.uuid();
    pool.close().expect("close");
    assert_eq!(
        env.loop_devices(),
        vec![device.clone()],
        "a device pool must not detach its device"
    );

    // Our own pool is imported, never reformatted, force or not.
    let pool = Pool::open(&state, &forced).expect("import with force set");
    assert_eq!(pool.uuid(), uuid);
    pool.close().expect("close");
}

#[test]
fn partition_tables_are_refused() {
    let env = TestEnv::new();
    let state = env.state_dir();

    let mbr = env.sparse_file("mbr.img", POOL_BYTES);
    write_mbr(&mbr);
    let err = Pool::open(&state, &env.file_config("mbr.img")).expect_err("dos refused");
    assert!(
        matches!(&err, Error::ForeignSignature { signatures, .. } if signatures.iter().any(|s| s.kind == "dos")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("dos signature at offset 0x1fe"),
        "{err}"
    );

    let gpt = env.sparse_file("gpt.img", POOL_BYTES);
    write_gpt(&gpt, POOL_BYTES);
    let err = Pool::open(&state, &env.file_config("gpt.img")).expect_err("gpt refused");
    assert!(
        matches!(&err, Error::ForeignSignature { signatures, .. } if signatures.iter().any(|s| s.kind == "gpt")),
        "{err:?}"
    );
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());

    // Forced over the GPT, the pool must come back on the next start-up
    // rather than be refused for leftovers of the partition table.
    let forced = PoolConfig {
        force_format: true,
        ..env.file_config("gpt.img")
    };
    let pool = Pool::open(&state, &forced).expect("forced format over gpt");
    let uuid = pool.uuid();
    pool.close().expect("close");
    let pool = Pool::open(&state, &env.file_config("gpt.img")).expect("reimport");
    assert_eq!(pool.uuid(), uuid);
    pool.close().expect("close");
}

#[test]
fn foreign_xfs_is_refused_and_interrupted_format_is_completed() {
    let env = TestEnv::new();
    let state = env.state_dir();

    let other = env.sparse_file("other.img", POOL_BYTES);
    run_ok("mkfs.xfs", &["-q", "-L", "data", path_str(&other)]);
    let err = Pool::open(&state, &env.file_config("other.img")).expect_err("foreign xfs");
    assert!(
        err.to_string()
            .contains("xfs signature at offset 0x0 (label \"data\")"),
        "{err}"
    );

    // Labelled like a pool but holding files and no pool label: not ours.
    let lookalike = env.sparse_file("lookalike.img", POOL_BYTES);
    run_ok("mkfs.xfs", &["-q", "-L", XFS_LABEL, path_str(&lookalike)]);
    let device = env.attach(&lookalike);
    let scratch = env.path("scratch");
    fs::create_dir(&scratch).expect("mkdir");
    run_ok("mount", &[path_str(&device), path_str(&scratch)]);
    fs::write(scratch.join("someones-data"), b"x").expect("write");
    run_ok("umount", &[path_str(&scratch)]);
    let config = PoolConfig::new(PoolSource::Device(device.clone()));
    let err = Pool::open(&state, &config).expect_err("unlabelled");
    assert!(matches!(err, Error::UnlabelledFilesystem { .. }), "{err:?}");
    let mounts = mountinfo::read().expect("mountinfo");
    assert!(
        !mounts.iter().any(|m| m.source == path_str(&device)),
        "left mounted"
    );

    // mkfs done, label never written (agent killed in between): completed.
    let blank = env.sparse_file("interrupted.img", POOL_BYTES);
    run_ok(
        "mkfs.xfs",
        &["-q", "-m", "reflink=1", "-L", XFS_LABEL, path_str(&blank)],
    );
    let pool = Pool::open(&state, &env.file_config("interrupted.img")).expect("completed");
    assert_eq!(pool.name(), "interrupted");
    assert!(pool.mount_path().join(LABEL_FILE).is_file());
    pool.close().expect("close");
}

#[test]
fn capacity_and_overcommit_limit() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let config = PoolConfig {
        overcommit_percent: 150,
        ..env.file_config("cap.img")
    };
    let pool = Arc::new(Pool::open(&state, &config).expect("pool"));
    let cap = pool.capacity().expect("capacity");
    assert!(
        cap.total_bytes > POOL_BYTES / 2 && cap.total_bytes <= POOL_BYTES,
        "{cap:?}"
    );
    assert!(
        cap.free_bytes > 0 && cap.free_bytes <= cap.total_bytes,
        "{cap:?}"
    );
    assert_eq!(cap.provisioned_bytes, 0);
    assert_eq!(cap.replica_count, 0);
    assert_eq!(cap.limit_bytes, cap.total_bytes * 3 / 2);

    let first = pool
        .provision(cap.limit_bytes - 4096, false, true)
        .expect("thin up to the limit");
    first.commit();
    let after = pool.capacity().expect("capacity");
    assert_eq!(after.provisioned_bytes, cap.limit_bytes - 4096);
    assert_eq!(after.replica_count, 1);

    let err = pool
        .provision(8192, false, true)
        .expect_err("over the limit");
    assert!(matches!(err, Error::OvercommitLimit { .. }), "{err:?}");
    assert!(err.to_string().contains("150%"), "{err}");

    // An uncommitted provision is returned when dropped.
    drop(pool.provision(4096, false, true).expect("last page"));
    assert_eq!(pool.capacity().expect("capacity"), after);

    pool.release(cap.limit_bytes - 4096, true);
    let err = pool
        .provision(cap.free_bytes + 4096, true, true)
        .expect_err("thick needs free space");
    assert!(matches!(err, Error::InsufficientSpace { .. }), "{err:?}");
    assert_eq!(pool.capacity().expect("capacity").provisioned_bytes, 0);
    pool.close().expect("close");
}

#[test]
fn manager_opens_chooses_and_closes() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let small = env.file_config("small.img");
    let big = PoolConfig::new(PoolSource::File {
        path: env.path("big.img"),
        size_bytes: Some(POOL_BYTES * 2),
    });

    let manager = PoolManager::open_all(&state, &[small.clone(), big.clone()]).expect("open all");
    let names: Vec<String> = manager.list().iter().map(|p| p.name().to_owned()).collect();
    assert_eq!(names, vec!["big", "small"]);
    assert_eq!(manager.get("small").expect("get").name(), "small");
    assert!(matches!(
        manager.get("nope"),
        Err(Error::PoolNotFound { .. })
    ));
    assert_eq!(manager.choose(4096, false).expect("choose").name(), "big");

    // Fill "big" to its limit: the next allocation goes to "small".
    let big_pool = manager.get("big").expect("big");
    let limit = big_pool.capacity().expect("cap").limit_bytes;
    big_pool
        .provision(limit, false, true)
        .expect("fill")
        .commit();
    assert_eq!(manager.choose(4096, false).expect("choose").name(), "small");
    let err = manager
        .choose(POOL_BYTES * 8, false)
        .expect_err("fits nowhere");
    let message = err.to_string();
    assert!(
        message.contains("Pool big") && message.contains("Pool small"),
        "{message}"
    );
    manager.close_all().expect("close all");
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());

    // The same file twice is one pool, not two; start-up fails cleanly.
    let err = PoolManager::open_all(&state, &[small.clone(), small]).expect_err("duplicate");
    assert!(matches!(err, Error::DuplicatePool { .. }), "{err:?}");
    assert_eq!(mounts_at(&state.join(POOLS_DIR).join("small")), 0);
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());

    assert!(matches!(
        PoolManager::open_all(&state, &[])
            .expect("empty")
            .choose(1, false),
        Err(Error::NoPools)
    ));
}

#[test]
fn force_cleanup_releases_a_killed_agents_pools() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let pool = Pool::open(&state, &env.file_config("killed.img")).expect("pool");
    let mount = pool.mount_path().to_owned();
    drop(pool);
    assert_eq!(mounts_at(&mount), 1);
    force_cleanup(&state).expect("cleanup");
    assert_eq!(mounts_at(&mount), 0);
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());
    force_cleanup(&env.path("never-used")).expect("nothing to clean");
}

#[test]
fn a_name_taken_by_another_pool_is_refused_before_formatting() {
    let env = TestEnv::new();
    let state = env.state_dir();
    let config = |dir: &str| {
        fs::create_dir(env.path(dir)).expect("mkdir");
        PoolConfig::new(PoolSource::File {
            path: env.path(dir).join("pool.img"),
            size_bytes: Some(POOL_BYTES),
        })
    };
    let (a, b) = (config("a"), config("b"));

    let err = PoolManager::open_all(&state, &[a.clone(), b.clone()]).expect_err("same name");
    assert!(matches!(err, Error::MountPointBusy { .. }), "{err:?}");
    assert!(
        kinds(&env.path("b/pool.img")).is_empty(),
        "second device was formatted"
    );
    assert!(env.loop_devices().is_empty(), "{:?}", env.loop_devices());

    let b = PoolConfig {
        name: Some("pool-b".to_owned()),
        ..b
    };
    let manager = PoolManager::open_all(&state, &[a, b]).expect("named apart");
    let names: Vec<String> = manager.list().iter().map(|p| p.name().to_owned()).collect();
    assert_eq!(names, vec!["pool", "pool-b"]);
    manager.close_all().expect("close");
}
