//! The nbdfuse + loop backend.
//!
//! For volume `V` under the backend's root `R` (`<state_dir>/attach`):
//!
//! ```text
//! R/V/uri           the export's URI, written before nbdfuse starts
//! R/V/nbdfuse.pid   nbdfuse's pid, written by nbdfuse when it serves
//! R/V/nbdfuse.log   nbdfuse's stdout and stderr
//! R/V/fuse/         the FUSE mount point
//! R/V/fuse/disk     the export as a file (nbdfuse MOUNTPOINT/FILENAME form)
//! /dev/loopN        a loop device over R/V/fuse/disk (--direct-io=off)
//! ```
//!
//! Rediscovery: FUSE mounts at `R/*/fuse` in `/proc/self/mountinfo`, and
//! `/sys/block/loop*/loop/backing_file` pointing at `R/*/fuse/disk`.
//!
//! nbdfuse runs in its own session so that it outlives a restart of the
//! node plugin (the volume's filesystem sits on it); the plugin reaps it
//! while it lives, init does after a restart. It is stopped the way its
//! manual asks, by unmounting its FUSE mount, and killed only if it has not
//! exited a while after that.

use std::collections::HashMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ballast_storage_node::host::loopdev;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tracing::{info, warn};

use super::{
    Attacher, Attachment, Error, NbdUri, Result, command, device_in_use, read_mounts,
    sys_block_dev, validate_volume_id, wait_for,
};

/// Deadline for nbdfuse to connect and serve its file.
const NBDFUSE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline for `losetup` and `fusermount3`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a detached loop device may take to let go of its file.
const LOOP_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long nbdfuse may take to exit once unmounted, before it is killed.
const NBDFUSE_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an unmount of the FUSE file that fails with EBUSY is retried
/// (the loop device lets go of the file a moment after its detach).
const FUSE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Attaches exports with nbdfuse and a loop device. See the module docs.
#[derive(Debug)]
pub struct NbdfuseLoop {
    root: PathBuf,
    /// One lock per volume, serialising its attach and detach. Volumes do
    /// not wait for each other: an export slow to answer nbdfuse's
    /// handshake must not hold up every other volume of the node
    /// (`losetup --find` picks free loop devices safely on its own).
    locks: parking_lot::Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// The files of one volume.
struct Paths {
    dir: PathBuf,
    mountpoint: PathBuf,
    file: PathBuf,
    pidfile: PathBuf,
    urifile: PathBuf,
    log: PathBuf,
}

/// What the system says about one volume.
struct State {
    fuse_mounted: bool,
    /// Loop devices over the volume's file, as (name, device path).
    loops: Vec<(String, PathBuf)>,
    uri: Option<String>,
}

impl NbdfuseLoop {
    /// Creates the backend with its records under `root` (created if
    /// missing and made canonical, since mount points are compared with the
    /// kernel's canonical paths).
    pub fn new(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "create directory",
            path: root.clone(),
            source,
        })?;
        let root = std::fs::canonicalize(&root).map_err(|source| Error::Io {
            op: "resolve",
            path: root.clone(),
            source,
        })?;
        Ok(NbdfuseLoop {
            root,
            locks: parking_lot::Mutex::default(),
        })
    }

    /// The directory holding every volume's files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the lock of `volume_id`, forgetting the locks nobody holds.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it completes takes nothing.
    async fn lock(&self, volume_id: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock();
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(locks.entry(volume_id.to_string()).or_default())
        };
        lock.lock_owned().await
    }

    fn paths(&self, volume_id: &str) -> Paths {
        let dir = self.root.join(volume_id);
        let mountpoint = dir.join("fuse");
        Paths {
            file: mountpoint.join("disk"),
            mountpoint,
            pidfile: dir.join("nbdfuse.pid"),
            urifile: dir.join("uri"),
            log: dir.join("nbdfuse.log"),
            dir,
        }
    }

    fn state(&self, p: &Paths) -> Result<State> {
        let mounts = read_mounts()?;
        let fuse_mounted = mounts.iter().any(|m| m.mount_point == p.mountpoint);
        let loops = loops_backed_by()
            .into_iter()
            .filter(|(_, backing)| *backing == p.file)
            .map(|(name, _)| {
                let dev = PathBuf::from("/dev").join(&name);
                (name, dev)
            })
            .collect();
        let uri = std::fs::read_to_string(&p.urifile)
            .ok()
            .map(|s| s.trim().to_string());
        Ok(State {
            fuse_mounted,
            loops,
            uri,
        })
    }

    /// Starts nbdfuse for `uri` and waits until its file is served.
    async fn start_nbdfuse(&self, volume_id: &str, uri: &NbdUri, p: &Paths) -> Result<()> {
        let io = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { op, path, source }
        };
        std::fs::create_dir_all(&p.mountpoint).map_err(io("create directory", &p.mountpoint))?;
        let tmp = p.dir.join("uri.tmp");
        std::fs::write(&tmp, uri.as_str()).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &p.urifile).map_err(io("rename", &p.urifile))?;
        match std::fs::remove_file(&p.pidfile) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &p.pidfile)(e));
            }
            _ => {}
        }
        let log = std::fs::File::create(&p.log).map_err(io("create", &p.log))?;
        let log_err = log.try_clone().map_err(io("duplicate", &p.log))?;

        let mut cmd = std::process::Command::new("nbdfuse");
        cmd.arg("-P")
            .arg(&p.pidfile)
            .arg(&p.file)
            .arg(uri.as_str())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls setsid(2), which is async-signal-safe; it allocates
        // nothing and touches no lock.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Tool {
            what: "nbdfuse",
            source: command::Error::Spawn {
                program: "nbdfuse".into(),
                source,
            },
        })?;
        info!(volume.id = volume_id, pid = child.id(), uri = %uri, "started nbdfuse");

        let deadline = tokio::time::Instant::now() + NBDFUSE_READY_TIMEOUT;
        let outcome = loop {
            if let Ok(Some(_status)) = child.try_wait() {
                break Err(Error::NbdfuseExited {
                    volume_id: volume_id.to_string(),
                    log: log_tail(&p.log),
                });
            }
            let served = p.pidfile.exists()
                && read_mounts().is_ok_and(|m| m.iter().any(|m| m.mount_point == p.mountpoint))
                && p.file.is_file();
            if served {
                break Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break Err(Error::Timeout {
                    what: format!("nbdfuse to serve {}", p.file.display()),
                    timeout: NBDFUSE_READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if outcome.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = self.unmount_fuse(p).await;
            return outcome;
        }
        // Reap nbdfuse when it exits (after detach's unmount); a restarted
        // plugin leaves that to init.
        let spawned = std::thread::Builder::new()
            .name("nbdfuse-reaper".into())
            .spawn(move || {
                let _ = child.wait();
            });
        if let Err(e) = spawned {
            warn!(volume.id = volume_id, error = %e, "cannot start a reaper thread for nbdfuse");
        }
        Ok(())
    }

    async fn unmount_fuse(&self, p: &Paths) -> Result<()> {
        if !read_mounts()?.iter().any(|m| m.mount_point == p.mountpoint) {
            return Ok(());
        }
        // A detached loop device drops its reference to the FUSE file a
        // moment after sysfs stops naming it (the kernel finishes the
        // teardown in a work queue), so a busy unmount is retried briefly.
        let deadline = std::time::Instant::now() + FUSE_BUSY_TIMEOUT;
        loop {
            let result = command::run(
                "fusermount3",
                ["-u".as_ref(), p.mountpoint.as_os_str()],
                TOOL_TIMEOUT,
            )
            .await;
            match result {
                Ok(_) => return Ok(()),
                Err(command::Error::Failed { ref stderr, .. })
                    if stderr.contains("busy") && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    return Err(Error::Tool {
                        what: "fusermount3 -u",
                        source,
                    });
                }
            }
        }
    }

    async fn setup_loop(&self, p: &Paths) -> Result<PathBuf> {
        let file = p.file.clone();
        tokio::task::spawn_blocking(move || loopdev::attach_buffered(&file))
            .await
            .map_err(Error::Join)?
            .map_err(Error::LoopDevice)
    }

    /// Tears down everything of one volume; the caller holds the lock.
    async fn teardown(&self, volume_id: &str, p: &Paths) -> Result<()> {
        let state = self.state(p)?;
        let mounts = read_mounts()?;
        for (name, device) in &state.loops {
            let busy = sys_block_dev(name).is_some_and(|dev| device_in_use(name, dev, &mounts));
            if busy {
                return Err(Error::DeviceBusy {
                    volume_id: volume_id.to_string(),
                    device: device.clone(),
                });
            }
        }
        for (name, device) in &state.loops {
            let detached = device.clone();
            tokio::task::spawn_blocking(move || loopdev::detach(&detached))
                .await
                .map_err(Error::Join)?
                .map_err(Error::LoopDevice)?;
            // The kernel only lets go of the file once nobody has the
            // device open; until then LOOP_CLR_FD merely sets autoclear.
            let released = wait_for(
                format!("{} to release {}", device.display(), p.file.display()),
                LOOP_RELEASE_TIMEOUT,
                || {
                    (loopdev::backing_file_of(name).as_deref() != Some(p.file.as_path()))
                        .then_some(())
                },
            )
            .await;
            if released.is_err() {
                return Err(Error::DeviceBusy {
                    volume_id: volume_id.to_string(),
                    device: device.clone(),
                });
            }
            info!(volume.id = volume_id, device = %device.display(), "detached loop device");
        }

        let pid = read_pid(&p.pidfile);
        self.unmount_fuse(p).await?;
        if let Some(pid) = pid.filter(|pid| is_our_nbdfuse(*pid, &p.file)) {
            let exited = wait_for("nbdfuse to exit", NBDFUSE_EXIT_TIMEOUT, || {
                (!process_alive(pid)).then_some(())
            })
            .await;
            if exited.is_err() && is_our_nbdfuse(pid, &p.file) {
                warn!(
                    volume.id = volume_id,
                    pid, "nbdfuse did not exit after unmount; killing it"
                );
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                wait_for("nbdfuse to die", NBDFUSE_EXIT_TIMEOUT, || {
                    (!process_alive(pid)).then_some(())
                })
                .await?;
            }
        }
        for f in [&p.pidfile, &p.urifile, &p.log, &p.dir.join("uri.tmp")] {
            let _ = std::fs::remove_file(f);
        }
        for d in [&p.mountpoint, &p.dir] {
            match std::fs::remove_dir(d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io {
                        op: "remove directory",
                        path: d.clone(),
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Attacher for NbdfuseLoop {
    fn name(&self) -> &'static str {
        "nbdfuse-loop"
    }

    async fn attach(&self, volume_id: &str, uri: &NbdUri) -> Result<PathBuf> {
        validate_volume_id(volume_id)?;
        let _guard = self.lock(volume_id).await;
        let p = self.paths(volume_id);
        let state = self.state(&p)?;
        if state.fuse_mounted {
            if let Some(attached) = state.uri.filter(|u| u != uri.as_str()) {
                return Err(Error::UriMismatch {
                    volume_id: volume_id.to_string(),
                    attached,
                    requested: uri.to_string(),
                });
            }
            if let Some((_, device)) = state.loops.into_iter().next() {
                return Ok(device);
            }
        } else {
            // Leftovers of a stopped nbdfuse (no mount) are stale: a loop
            // device over an unmounted path cannot exist, so start afresh.
            self.start_nbdfuse(volume_id, uri, &p).await?;
        }
        match self.setup_loop(&p).await {
            Ok(device) => {
                info!(volume.id = volume_id, device = %device.display(), "attached through nbdfuse and loop");
                Ok(device)
            }
            Err(e) => {
                if let Err(cleanup) = self.teardown(volume_id, &p).await {
                    warn!(volume.id = volume_id, error = %cleanup, "cleanup after a failed attach failed");
                }
                Err(e)
            }
        }
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        validate_volume_id(volume_id)?;
        let _guard = self.lock(volume_id).await;
        let p = self.paths(volume_id);
        self.teardown(volume_id, &p).await
    }

    async fn list(&self) -> Result<Vec<Attachment>> {
        let mut found: Vec<Attachment> = Vec::new();
        let mut add = |volume_id: String, device: Option<PathBuf>| match found
            .iter_mut()
            .find(|a| a.volume_id == volume_id)
        {
            Some(a) => {
                if a.device.is_none() {
                    a.device = device;
                }
            }
            None => found.push(Attachment {
                volume_id,
                device,
                uri: None,
                problem: None,
            }),
        };
        for m in read_mounts()? {
            if let Some(v) = volume_of(&self.root, &m.mount_point, false) {
                add(v, None);
            }
        }
        for (name, backing) in loops_backed_by() {
            if let Some(v) = volume_of(&self.root, &backing, true) {
                add(v, Some(PathBuf::from("/dev").join(name)));
            }
        }
        for a in &mut found {
            let p = self.paths(&a.volume_id);
            a.uri = std::fs::read_to_string(&p.urifile)
                .ok()
                .map(|s| s.trim().to_string());
            a.problem = match read_pid(&p.pidfile) {
                Some(pid) if is_our_nbdfuse(pid, &p.file) && process_alive(pid) => None,
                Some(pid) => Some(format!(
                    "nbdfuse (pid {pid}), which serves the export, has exited: I/O fails until the volume is unstaged and staged again"
                )),
                None => {
                    Some("nbdfuse has not recorded its pid: the attachment is incomplete".into())
                }
            };
        }
        found.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(found)
    }
}

/// The volume whose mount point (`R/V/fuse`) or file (`R/V/fuse/disk`) is
/// `path`.
fn volume_of(root: &Path, path: &Path, file: bool) -> Option<String> {
    let rest = path.strip_prefix(root).ok()?;
    let mut parts = rest.components();
    let volume = parts.next()?.as_os_str().to_str()?.to_string();
    let want: &[&str] = if file { &["fuse", "disk"] } else { &["fuse"] };
    let tail: Vec<_> = parts.map(|c| c.as_os_str().to_str()).collect();
    (tail.len() == want.len() && tail.iter().zip(want).all(|(a, b)| *a == Some(*b)))
        .then_some(volume)
}

/// Every loop device with a backing file, as (name, backing file).
fn loops_backed_by() -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|name| name.starts_with("loop"))
        .filter_map(|name| loopdev::backing_file_of(&name).map(|f| (name, f)))
        .collect()
}

fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// True when `pid` runs and is not a zombie.
pub(crate) fn process_alive(pid: i32) -> bool {
    procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// True when `pid` is an nbdfuse serving `file` (guards against a pid that
/// was reused after nbdfuse exited).
fn is_our_nbdfuse(pid: i32, file: &Path) -> bool {
    // A command line that is not UTF-8 is not one we started.
    let Ok(args) = procfs::process::Process::new(pid).and_then(|p| p.cmdline()) else {
        return false;
    };
    let is_nbdfuse = args.first().is_some_and(|a| a.ends_with("nbdfuse"));
    is_nbdfuse && args.iter().any(|a| Path::new(a) == file)
}

/// The last lines of nbdfuse's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "no output".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_paths_are_recognised() {
        let root = Path::new("/var/lib/ballast/attach");
        assert_eq!(
            volume_of(root, Path::new("/var/lib/ballast/attach/pvc-1/fuse"), false),
            Some("pvc-1".to_string())
        );
        assert_eq!(
            volume_of(
                root,
                Path::new("/var/lib/ballast/attach/pvc-1/fuse/disk"),
                true
            ),
            Some("pvc-1".to_string())
        );
        assert_eq!(
            volume_of(root, Path::new("/var/lib/ballast/attach/pvc-1/fuse"), true),
            None
        );
        assert_eq!(
            volume_of(root, Path::new("/var/lib/ballast/attach/pvc-1"), false),
            None
        );
        assert_eq!(
            volume_of(root, Path::new("/elsewhere/pvc-1/fuse"), false),
            None
        );
    }

    #[test]
    fn this_process_is_alive_and_a_bogus_pid_is_not() {
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(i32::MAX));
    }
}
