//! The stage and publish rules with a fake attacher and mount layer: no
//! root, no devices. The fake behaves like the kernel where it matters
//! (a mount needs the filesystem that is on the device; unmount of a path
//! that is not mounted fails; detach of a mounted device is refused).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use ballast_proto::csi;
use tonic::Code;

use super::*;
use crate::node::attach::{self, Attachment};
use crate::node::mount::{self, FsGeometry, MountEntry};

const URI: &str = "nbd+unix:///vol-1?socket=/run/t/vol-1.sock";

/// The fake's state; the CSI Node service tests read it too.
#[derive(Default)]
pub(crate) struct World {
    /// volume -> (device, uri)
    attached: BTreeMap<String, (PathBuf, String)>,
    next_loop: u32,
    /// What a volume's device holds when it is attached.
    content: HashMap<String, Signature>,
    /// device -> signature, while attached.
    signatures: HashMap<PathBuf, Signature>,
    mounts: Vec<MountEntry>,
    targets: HashSet<PathBuf>,
    pub(crate) mkfs: Vec<(PathBuf, FsType)>,
    attach_calls: usize,
    grown: Vec<PathBuf>,
    /// device -> filesystem blocks (4 KiB) where the filesystem is
    /// smaller than the device ([`DEVICE_BYTES`]).
    fs_blocks: HashMap<PathBuf, u64>,
    fail_mount: bool,
    /// The problem every attachment reports.
    pub(crate) problem: Option<String>,
}

/// The size of every fake device.
const DEVICE_BYTES: u64 = 1 << 30;

/// An attacher and mounter in memory.
#[derive(Clone, Default)]
pub(crate) struct Fake(Arc<Mutex<World>>);

impl Fake {
    pub(crate) fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().expect("fake world lock")
    }
}

fn loop_minor(device: &Path) -> Option<u64> {
    device.to_str()?.strip_prefix("/dev/loop")?.parse().ok()
}

fn entry(dev: (u32, u32), root: &str, at: &Path, fs: &str, source: &str, ro: bool) -> MountEntry {
    MountEntry {
        mount_id: 100,
        parent_id: 1,
        major: dev.0,
        minor: dev.1,
        root: PathBuf::from(root),
        mount_point: at.to_path_buf(),
        mount_options: if ro { "ro".into() } else { "rw".into() },
        fs_type: fs.into(),
        source: source.into(),
        super_options: String::new(),
    }
}

fn sys(op: &'static str, path: &Path) -> mount::Error {
    mount::Error::Sys {
        op,
        path: path.to_path_buf(),
        source: nix::Error::EINVAL,
    }
}

#[async_trait]
impl Attacher for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn attach(&self, volume_id: &str, uri: &NbdUri) -> attach::Result<PathBuf> {
        let mut w = self.world();
        w.attach_calls += 1;
        if let Some((dev, u)) = w.attached.get(volume_id) {
            assert_eq!(u, uri.as_str(), "the fake expects one URI per volume");
            return Ok(dev.clone());
        }
        let dev = PathBuf::from(format!("/dev/loop{}", w.next_loop));
        w.next_loop += 1;
        let sig = w
            .content
            .get(volume_id)
            .cloned()
            .unwrap_or(Signature::Blank);
        w.signatures.insert(dev.clone(), sig);
        w.attached
            .insert(volume_id.to_string(), (dev.clone(), uri.to_string()));
        Ok(dev)
    }

    async fn detach(&self, volume_id: &str) -> attach::Result<()> {
        let mut w = self.world();
        let Some((dev, _)) = w.attached.get(volume_id).cloned() else {
            return Ok(());
        };
        let minor = loop_minor(&dev).expect("fake device");
        let name = format!("loop{minor}");
        if attach::device_in_use(&name, nix::sys::stat::makedev(7, minor), &w.mounts) {
            return Err(attach::Error::DeviceBusy {
                volume_id: volume_id.into(),
                device: dev,
            });
        }
        w.attached.remove(volume_id);
        // What was written to the device stays with the volume.
        if let Some(sig) = w.signatures.remove(&dev) {
            w.content.insert(volume_id.to_string(), sig);
        }
        Ok(())
    }

    async fn list(&self) -> attach::Result<Vec<Attachment>> {
        let w = self.world();
        Ok(w.attached
            .iter()
            .map(|(v, (d, u))| Attachment {
                volume_id: v.clone(),
                device: Some(d.clone()),
                uri: Some(u.clone()),
                problem: w.problem.clone(),
            })
            .collect())
    }
}

#[async_trait]
impl Mounter for Fake {
    async fn probe(&self, device: &Path) -> mount::Result<Signature> {
        self.world()
            .signatures
            .get(device)
            .cloned()
            .ok_or_else(|| sys("probe", device))
    }

    async fn mkfs(&self, device: &Path, fs: FsType) -> mount::Result<()> {
        let mut w = self.world();
        assert_eq!(
            w.signatures.get(device),
            Some(&Signature::Blank),
            "mkfs on a device that is not blank"
        );
        w.signatures.insert(
            device.to_path_buf(),
            Signature::Filesystem(fs.as_str().into()),
        );
        w.mkfs.push((device.to_path_buf(), fs));
        Ok(())
    }

    async fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        _flags: &[String],
        read_only: bool,
    ) -> mount::Result<()> {
        let mut w = self.world();
        let on_device = w.signatures.get(device) == Some(&Signature::Filesystem(fs_type.into()));
        if w.fail_mount || !on_device || !w.targets.contains(target) {
            return Err(sys("mount", target));
        }
        let minor = loop_minor(device).expect("fake device");
        let e = entry(
            (7, minor as u32),
            "/",
            target,
            fs_type,
            &device.to_string_lossy(),
            read_only,
        );
        w.mounts.push(e);
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, read_only: bool) -> mount::Result<()> {
        let mut w = self.world();
        if !w.targets.contains(target) {
            return Err(sys("bind mount", target));
        }
        let e = if let Some(minor) = loop_minor(source) {
            entry(
                (0, 5),
                &format!("/loop{minor}"),
                target,
                "devtmpfs",
                "udev",
                read_only,
            )
        } else {
            let src = w
                .mounts
                .iter()
                .rev()
                .find(|m| m.mount_point == source)
                .cloned()
                .ok_or_else(|| sys("bind mount", source))?;
            let mut e = src;
            e.mount_point = target.to_path_buf();
            e.mount_options = if read_only { "ro".into() } else { "rw".into() };
            e
        };
        w.mounts.push(e);
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> mount::Result<()> {
        let mut w = self.world();
        let pos = w
            .mounts
            .iter()
            .rposition(|m| m.mount_point == target)
            .ok_or_else(|| sys("umount", target))?;
        w.mounts.remove(pos);
        Ok(())
    }

    async fn mounts(&self) -> mount::Result<Vec<MountEntry>> {
        Ok(self.world().mounts.clone())
    }

    async fn device_number(&self, path: &Path) -> mount::Result<u64> {
        if let Some(minor) = loop_minor(path) {
            return Ok(nix::sys::stat::makedev(7, minor));
        }
        let w = self.world();
        w.mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == path && m.fs_type == "devtmpfs")
            .and_then(|m| loop_minor(&Path::new("/dev").join(m.root.strip_prefix("/").ok()?)))
            .map(|minor| nix::sys::stat::makedev(7, minor))
            .ok_or_else(|| sys("stat", path))
    }

    async fn create_target(&self, path: &Path, _kind: TargetKind) -> mount::Result<()> {
        self.world().targets.insert(path.to_path_buf());
        Ok(())
    }

    async fn remove_target(&self, path: &Path) -> mount::Result<()> {
        self.world().targets.remove(path);
        Ok(())
    }

    async fn grow(&self, device: &Path, mount_path: &Path, _fs_type: &str) -> mount::Result<()> {
        let mut w = self.world();
        assert!(
            w.mounts.iter().any(|m| m.mount_point == mount_path),
            "online growth of an unmounted filesystem"
        );
        w.grown.push(device.to_path_buf());
        w.fs_blocks.remove(device);
        Ok(())
    }

    async fn fs_geometry(&self, device: &Path, _fs: FsType) -> mount::Result<FsGeometry> {
        let w = self.world();
        let blocks = w
            .fs_blocks
            .get(device)
            .copied()
            .unwrap_or(DEVICE_BYTES >> 12);
        Ok(FsGeometry {
            blocks,
            block_size: 4096,
        })
    }

    async fn grow_offline(&self, device: &Path, fs: FsType) -> mount::Result<()> {
        let mut w = self.world();
        assert!(
            !w.mounts
                .iter()
                .any(|m| m.source == device.to_string_lossy()),
            "offline growth of a mounted device"
        );
        assert_eq!(fs, FsType::Ext4, "only ext4 grows offline");
        w.grown.push(device.to_path_buf());
        w.fs_blocks.remove(device);
        Ok(())
    }

    async fn fs_stats(&self, _path: &Path) -> mount::Result<VolumeStats> {
        Ok(VolumeStats {
            total_bytes: 100,
            available_bytes: 60,
            used_bytes: 40,
            inodes: None,
        })
    }

    async fn block_size_bytes(&self, _path: &Path) -> mount::Result<u64> {
        Ok(DEVICE_BYTES)
    }
}

fn mount_cap(fs: Option<FsType>) -> Capability {
    Capability {
        access: Access::Mount {
            fs_type: fs,
            flags: vec![],
        },
        reader_only: false,
        single_writer: false,
    }
}

fn block_cap() -> Capability {
    Capability {
        access: Access::Block,
        reader_only: false,
        single_writer: false,
    }
}

fn stage_req(volume: &str, staging: &str, cap: Capability) -> StageRequest {
    StageRequest {
        volume_id: volume.into(),
        uri: URI.replace("vol-1", volume),
        staging_path: staging.into(),
        capability: cap,
    }
}

fn publish_req(
    volume: &str,
    staging: &str,
    target: &str,
    cap: Capability,
    ro: bool,
) -> PublishRequest {
    PublishRequest {
        volume_id: volume.into(),
        staging_path: staging.into(),
        target_path: target.into(),
        capability: cap,
        read_only: ro,
    }
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    tonic::Status::from(r.expect_err("expected an error")).code()
}

#[tokio::test]
async fn stage_formats_a_blank_device_once_and_is_idempotent() {
    let f = Fake::default();
    let req = stage_req("vol-1", "/stage/1", mount_cap(Some(FsType::Ext4)));
    stage(&f, &f, &req).await.expect("first stage");
    stage(&f, &f, &req).await.expect("repeated stage");
    let w = f.world();
    assert_eq!(w.mkfs, vec![(PathBuf::from("/dev/loop0"), FsType::Ext4)]);
    let at_stage: Vec<_> = w
        .mounts
        .iter()
        .filter(|m| m.mount_point == Path::new("/stage/1"))
        .collect();
    assert_eq!(at_stage.len(), 1, "one staging mount, not two");
    assert_eq!(at_stage[0].fs_type, "ext4");
}

#[tokio::test]
async fn stage_never_formats_an_existing_filesystem() {
    let f = Fake::default();
    f.world()
        .content
        .insert("vol-1".into(), Signature::Filesystem("xfs".into()));
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage with the filesystem on the device");
    let w = f.world();
    assert!(w.mkfs.is_empty(), "mkfs ran: {:?}", w.mkfs);
    assert_eq!(w.mounts.last().map(|m| m.fs_type.as_str()), Some("xfs"));
}

#[tokio::test]
async fn fs_type_mismatch_is_failed_precondition_and_leaves_nothing_attached() {
    let f = Fake::default();
    f.world()
        .content
        .insert("vol-1".into(), Signature::Filesystem("ext4".into()));
    let r = stage(
        &f,
        &f,
        &stage_req("vol-1", "/stage/1", mount_cap(Some(FsType::Xfs))),
    )
    .await;
    assert!(matches!(r, Err(Error::FsTypeMismatch { .. })), "{r:?}");
    assert_eq!(code(r), Code::FailedPrecondition);
    let w = f.world();
    assert!(w.attached.is_empty(), "still attached: {:?}", w.attached);
    assert!(w.mkfs.is_empty());
    assert!(w.mounts.is_empty());
}

#[tokio::test]
async fn foreign_signatures_are_never_formatted() {
    let f = Fake::default();
    f.world().content.insert(
        "vol-1".into(),
        Signature::Other("partition table (gpt)".into()),
    );
    let r = stage(
        &f,
        &f,
        &stage_req("vol-1", "/stage/1", mount_cap(Some(FsType::Ext4))),
    )
    .await;
    assert!(matches!(r, Err(Error::ForeignSignature { .. })), "{r:?}");
    let w = f.world();
    assert!(w.mkfs.is_empty());
    assert!(w.attached.is_empty());
}

#[tokio::test]
async fn a_failed_mount_detaches_again() {
    let f = Fake::default();
    f.world().fail_mount = true;
    let r = stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None))).await;
    assert!(matches!(r, Err(Error::Mount(_))), "{r:?}");
    let w = f.world();
    assert_eq!(w.attach_calls, 1, "the failure came after the attach");
    assert!(w.attached.is_empty(), "still attached: {:?}", w.attached);
}

#[tokio::test]
async fn invalid_requests_fail_before_anything_is_attached() {
    let f = Fake::default();
    let mut bad_path = stage_req("vol-1", "relative/stage", mount_cap(None));
    assert_eq!(code(stage(&f, &f, &bad_path).await), Code::InvalidArgument);
    bad_path.staging_path = PathBuf::new();
    assert_eq!(code(stage(&f, &f, &bad_path).await), Code::InvalidArgument);
    let mut bad_uri = stage_req("vol-1", "/stage/1", mount_cap(None));
    bad_uri.uri = "nbd://host/vol-1".into();
    assert_eq!(code(stage(&f, &f, &bad_uri).await), Code::InvalidArgument);
    let bad_id = stage_req("../etc", "/stage/1", mount_cap(None));
    assert_eq!(code(stage(&f, &f, &bad_id).await), Code::InvalidArgument);
    assert_eq!(f.world().attach_calls, 0);
}

#[test]
fn capabilities_are_checked() {
    use csi::volume_capability::{
        AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
    };
    let cap = |at: Option<AccessType>, mode: Mode| csi::VolumeCapability {
        access_type: at,
        access_mode: Some(AccessMode { mode: mode as i32 }),
    };
    let mount = |fs: &str| {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    };
    assert_eq!(code(capability(None)), Code::InvalidArgument);
    assert_eq!(
        code(capability(Some(&cap(None, Mode::SingleNodeWriter)))),
        Code::InvalidArgument
    );
    assert_eq!(
        code(capability(Some(&cap(mount("ext4"), Mode::Unknown)))),
        Code::InvalidArgument
    );
    let bogus = capability(Some(&cap(mount("bogusfs"), Mode::SingleNodeWriter)));
    assert!(matches!(bogus, Err(Error::UnsupportedFsType(_))));
    assert_eq!(code(bogus), Code::InvalidArgument);
    assert_eq!(
        code(capability(Some(&cap(
            mount("ext4"),
            Mode::MultiNodeMultiWriter
        )))),
        Code::FailedPrecondition
    );
    let ro = capability(Some(&cap(mount(""), Mode::MultiNodeReaderOnly))).expect("valid");
    assert!(ro.reader_only);
    assert_eq!(
        ro.access,
        Access::Mount {
            fs_type: None,
            flags: vec![]
        }
    );
    let block = capability(Some(&cap(
        Some(AccessType::Block(BlockVolume {})),
        Mode::MultiNodeMultiWriter,
    )))
    .expect("block volumes may be shared");
    assert_eq!(block.access, Access::Block);
}

#[tokio::test]
async fn incompatible_restage_is_already_exists() {
    let f = Fake::default();
    stage(
        &f,
        &f,
        &stage_req("vol-1", "/stage/1", mount_cap(Some(FsType::Ext4))),
    )
    .await
    .expect("stage");
    // Same path, other filesystem type.
    let r = stage(
        &f,
        &f,
        &stage_req("vol-1", "/stage/1", mount_cap(Some(FsType::Xfs))),
    )
    .await;
    assert_eq!(code(r), Code::AlreadyExists);
    // Same path, another volume.
    let r = stage(&f, &f, &stage_req("vol-2", "/stage/1", mount_cap(None))).await;
    assert_eq!(code(r), Code::AlreadyExists);
    // The refused calls changed nothing.
    let w = f.world();
    assert_eq!(w.attached.len(), 1);
    assert_eq!(w.mounts.len(), 1);
}

#[tokio::test]
async fn staging_a_volume_at_a_second_path_is_refused() {
    let f = Fake::default();
    stage(&f, &f, &stage_req("vol-1", "/stage/a", mount_cap(None)))
        .await
        .expect("stage");
    let r = stage(&f, &f, &stage_req("vol-1", "/stage/b", mount_cap(None))).await;
    assert!(matches!(r, Err(Error::InUseElsewhere { .. })), "{r:?}");
    assert_eq!(code(r), Code::AlreadyExists);
    let w = f.world();
    assert_eq!(w.mounts.len(), 1);
    assert_eq!(w.mounts[0].mount_point, Path::new("/stage/a"));
    assert_eq!(
        w.attached.len(),
        1,
        "the failure must not detach a volume in use"
    );
}

#[tokio::test]
async fn publish_rules() {
    let f = Fake::default();
    let cap = mount_cap(None);
    // Before staging.
    let r = publish(
        &f,
        &f,
        &publish_req("vol-1", "/stage/1", "/pod/1", cap.clone(), false),
    )
    .await;
    assert!(matches!(r, Err(Error::NotStaged { .. })), "{r:?}");
    assert_eq!(code(r), Code::FailedPrecondition);
    stage(&f, &f, &stage_req("vol-1", "/stage/1", cap.clone()))
        .await
        .expect("stage");
    // Without staging path.
    let r = publish(
        &f,
        &f,
        &publish_req("vol-1", "", "/pod/1", cap.clone(), false),
    )
    .await;
    assert!(matches!(r, Err(Error::StagingPathNotSet)));
    assert_eq!(code(r), Code::FailedPrecondition);

    let ro = publish_req("vol-1", "/stage/1", "/pod/1", cap.clone(), true);
    publish(&f, &f, &ro).await.expect("publish read-only");
    publish(&f, &f, &ro).await.expect("repeated publish");
    let rw_same_target = publish_req("vol-1", "/stage/1", "/pod/1", cap.clone(), false);
    assert_eq!(
        code(publish(&f, &f, &rw_same_target).await),
        Code::AlreadyExists
    );
    {
        let w = f.world();
        let at: Vec<_> = w
            .mounts
            .iter()
            .filter(|m| m.mount_point == Path::new("/pod/1"))
            .collect();
        assert_eq!(at.len(), 1);
        assert!(at[0].read_only());
    }
    publish(
        &f,
        &f,
        &publish_req("vol-1", "/stage/1", "/pod/2", cap, false),
    )
    .await
    .expect("second target");

    // Unstage while published is refused and changes nothing.
    let mounts_before = f.world().mounts.len();
    let r = unstage(&f, &f, "vol-1", Path::new("/stage/1")).await;
    assert!(matches!(r, Err(Error::StillPublished { .. })), "{r:?}");
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(f.world().attached.len(), 1);
    assert_eq!(f.world().mounts.len(), mounts_before);

    for t in ["/pod/1", "/pod/2"] {
        unpublish(&f, "vol-1", Path::new(t))
            .await
            .expect("unpublish");
        unpublish(&f, "vol-1", Path::new(t))
            .await
            .expect("repeated unpublish");
    }
    unstage(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("unstage");
    unstage(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("repeated unstage");
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("restage");
    unstage(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("unstage again");
    let w = f.world();
    assert!(w.mounts.is_empty(), "left mounted: {:?}", w.mounts);
    assert!(w.attached.is_empty());
    assert!(
        w.targets.iter().all(|t| !t.starts_with("/pod")),
        "targets left: {:?}",
        w.targets
    );
    assert_eq!(w.mkfs.len(), 1, "restaging must not format again");
}

#[tokio::test]
async fn a_single_node_single_writer_volume_is_published_once() {
    let f = Fake::default();
    let single = Capability {
        single_writer: true,
        ..mount_cap(None)
    };
    stage(&f, &f, &stage_req("vol-1", "/stage/1", single.clone()))
        .await
        .expect("stage");
    let first = publish_req("vol-1", "/stage/1", "/pod/1", single.clone(), false);
    publish(&f, &f, &first).await.expect("first publish");
    publish(&f, &f, &first)
        .await
        .expect("the same publish again");
    let second = publish_req("vol-1", "/stage/1", "/pod/2", single.clone(), false);
    let r = publish(&f, &f, &second).await;
    assert!(
        matches!(r, Err(Error::SingleWriterPublished { ref other, .. }) if other == Path::new("/pod/1")),
        "{r:?}"
    );
    assert_eq!(code(r), Code::FailedPrecondition);
    assert!(!f.world().targets.iter().any(|t| t == Path::new("/pod/2")));
    unpublish(&f, "vol-1", Path::new("/pod/1"))
        .await
        .expect("unpublish");
    publish(&f, &f, &second)
        .await
        .expect("published at the new target once the old one is gone");
}

#[tokio::test]
async fn block_volumes_bind_the_device_node() {
    let f = Fake::default();
    stage(&f, &f, &stage_req("vol-1", "/stage/1", block_cap()))
        .await
        .expect("stage");
    {
        let w = f.world();
        assert!(w.mounts.is_empty(), "block staging mounts nothing");
        assert!(w.mkfs.is_empty(), "block staging formats nothing");
    }
    let req = publish_req("vol-1", "/stage/1", "/pod/dev/vol", block_cap(), false);
    publish(&f, &f, &req).await.expect("publish");
    publish(&f, &f, &req).await.expect("repeated publish");
    let st = stats(&f, &f, "vol-1", Path::new("/pod/dev/vol"))
        .await
        .expect("stats");
    assert_eq!(st.usage.total_bytes, DEVICE_BYTES);
    assert_eq!(
        code(unstage(&f, &f, "vol-1", Path::new("/stage/1")).await),
        Code::FailedPrecondition
    );
    unpublish(&f, "vol-1", Path::new("/pod/dev/vol"))
        .await
        .expect("unpublish");
    unstage(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("unstage");
    let w = f.world();
    assert!(w.attached.is_empty() && w.mounts.is_empty() && w.targets.is_empty());
}

#[tokio::test]
async fn expand_and_stats_find_the_volume_or_say_not_found() {
    let f = Fake::default();
    assert_eq!(
        code(expand(&f, &f, "vol-1", Path::new("/stage/1"), None, 0).await),
        Code::NotFound
    );
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    let size = expand(&f, &f, "vol-1", Path::new("/stage/1"), None, DEVICE_BYTES)
        .await
        .expect("expand");
    assert_eq!(size, DEVICE_BYTES);
    let r = expand(
        &f,
        &f,
        "vol-1",
        Path::new("/stage/1"),
        None,
        DEVICE_BYTES + 1,
    )
    .await;
    assert!(matches!(r, Err(Error::BeyondDevice { .. })), "{r:?}");
    assert_eq!(code(r), Code::OutOfRange);
    assert_eq!(f.world().grown, vec![PathBuf::from("/dev/loop0")]);
    let st = stats(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("stats");
    assert_eq!((st.usage.total_bytes, st.usage.used_bytes), (100, 40));
    assert_eq!(st.problem, None);
    f.world().problem = Some("nbdfuse has exited".into());
    let st = stats(&f, &f, "vol-1", Path::new("/stage/1"))
        .await
        .expect("stats of an abnormal volume");
    assert_eq!(st.problem.as_deref(), Some("nbdfuse has exited"));
    assert_eq!(
        code(stats(&f, &f, "vol-1", Path::new("/elsewhere")).await),
        Code::NotFound
    );
}

/// CSI spec, NodeGetVolumeStats and NodeExpandVolume: the volume is looked
/// up before the path's form, so an unknown volume is NOT_FOUND with any
/// path (csi-sanity sends "some/path"), and a known one at a relative or
/// missing path is NOT_FOUND too ("does not exist on the specified path");
/// only a missing field is INVALID_ARGUMENT.
#[tokio::test]
async fn expand_and_stats_check_the_volume_before_the_path() {
    let f = Fake::default();
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    let rows = [
        ("vol-2", "some/path", Code::NotFound),
        ("vol-2", "/stage/1", Code::NotFound),
        ("vol-1", "some/path", Code::NotFound),
        ("vol-1", "/does/not/exist", Code::NotFound),
        ("vol-1", "", Code::InvalidArgument),
        ("", "some/path", Code::InvalidArgument),
    ];
    for (volume, path, want) in rows {
        let path = Path::new(path);
        assert_eq!(
            code(stats(&f, &f, volume, path).await),
            want,
            "NodeGetVolumeStats({volume:?}, {path:?})"
        );
        assert_eq!(
            code(expand(&f, &f, volume, path, None, 0).await),
            want,
            "NodeExpandVolume({volume:?}, {path:?})"
        );
    }
}

/// CSI spec, NodeExpandVolume, "Exceeds capabilities": a
/// `volume_capability` that is not what is at `volume_path` is
/// INVALID_ARGUMENT and grows nothing; one that matches, or none, is fine.
#[tokio::test]
async fn expand_checks_the_capability_against_what_is_at_the_path() {
    let f = Fake::default();
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    let at = Path::new("/stage/1");
    let rows = [
        (Access::Block, Code::InvalidArgument),
        (mount_cap(Some(FsType::Xfs)).access, Code::InvalidArgument),
    ];
    for (access, want) in rows {
        let r = expand(&f, &f, "vol-1", at, Some(&access), 0).await;
        assert_eq!(code(r), want, "{access:?}");
    }
    assert!(f.world().grown.is_empty(), "nothing was grown");
    for access in [mount_cap(None).access, mount_cap(Some(FsType::Ext4)).access] {
        expand(&f, &f, "vol-1", at, Some(&access), 0)
            .await
            .expect("a matching capability");
    }

    let b = Fake::default();
    stage(&b, &b, &stage_req("vol-2", "/stage/2", block_cap()))
        .await
        .expect("stage block");
    publish(
        &b,
        &b,
        &publish_req("vol-2", "/stage/2", "/pod/2", block_cap(), false),
    )
    .await
    .expect("publish block");
    let r = expand(
        &b,
        &b,
        "vol-2",
        Path::new("/pod/2"),
        Some(&mount_cap(None).access),
        0,
    )
    .await;
    assert_eq!(
        code(r),
        Code::InvalidArgument,
        "mount capability on a block volume"
    );
    expand(
        &b,
        &b,
        "vol-2",
        Path::new("/pod/2"),
        Some(&Access::Block),
        0,
    )
    .await
    .expect("block capability on a block volume");
}

/// A volume whose device (the fake's first, `/dev/loop0`) holds `fs` in
/// half of its blocks, as after an offline ControllerExpandVolume.
fn grown_device(fs: &str) -> Fake {
    let f = Fake::default();
    let mut w = f.world();
    w.content
        .insert("vol-1".into(), Signature::Filesystem(fs.into()));
    w.fs_blocks
        .insert(PathBuf::from("/dev/loop0"), DEVICE_BYTES >> 13);
    drop(w);
    f
}

#[tokio::test]
async fn stage_grows_ext4_offline_before_mounting_it() {
    // The fake asserts that the growth happens while unmounted.
    let f = grown_device("ext4");
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    let w = f.world();
    assert_eq!(w.grown, [PathBuf::from("/dev/loop0")]);
    assert!(w.mkfs.is_empty());
    assert_eq!(w.mounts.len(), 1);
}

#[tokio::test]
async fn stage_grows_xfs_online_after_mounting_it() {
    // The fake asserts that the growth happens while mounted.
    let f = grown_device("xfs");
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    let w = f.world();
    assert_eq!(w.grown, [PathBuf::from("/dev/loop0")]);
    assert_eq!(w.mounts.len(), 1);
}

#[tokio::test]
async fn stage_grows_nothing_that_fills_its_device_or_is_read_only() {
    let f = Fake::default();
    f.world()
        .content
        .insert("vol-1".into(), Signature::Filesystem("ext4".into()));
    stage(&f, &f, &stage_req("vol-1", "/stage/1", mount_cap(None)))
        .await
        .expect("stage");
    assert!(
        f.world().grown.is_empty(),
        "the filesystem filled its device"
    );

    let f = grown_device("ext4");
    let mut read_only = mount_cap(None);
    read_only.reader_only = true;
    stage(&f, &f, &stage_req("vol-1", "/stage/1", read_only))
        .await
        .expect("stage read-only");
    let w = f.world();
    assert!(w.grown.is_empty(), "a read-only stage wrote to the volume");
    assert!(w.mounts.first().is_some_and(|m| m.read_only()));
}
