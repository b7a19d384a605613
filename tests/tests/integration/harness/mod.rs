//! Test fixtures that start real Ballast processes and always clean up.
//!
//! A [`TestDir`] is a scratch directory on a real filesystem (pool files need
//! loop devices; O_DIRECT needs a filesystem that supports it). Dropping it
//! unmounts everything under it, detaches loop devices backed by files in it
//! and removes it, even when the test failed half-way. An [`Agent`] runs
//! `ballast-agent` with file-backed pools in such a directory; [`Child`]
//! kills any helper process (nbdfuse, fio) on drop.
//!
//! Submodules: [`cluster`] (a local cluster through `ballast cluster up`),
//! [`csi`] (CSI clients playing kubelet and the sidecars),
//! [`network`] and [`netcluster`] (a cluster in network namespaces, for
//! partitions), [`fio`] (the verified workload of the fault suites).

pub mod cluster;
pub mod csi;
pub mod fio;
pub mod netcluster;
pub mod network;
pub mod postgres;

use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// Directory holding the workspace binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/integration-HASH -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary; panics with a hint if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a command to completion with a deadline, returning its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {desc}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return child
                .wait_with_output()
                .with_context(|| format!("waiting for {desc}"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "{desc} timed out after {timeout:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs qemu-io on `uri` (a raw image) with `commands` (each one `-c`);
/// fails when a `read -P` finds other bytes.
pub fn qemu_io(uri: &str, commands: &[&str]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = run_ok(cmd.arg(uri), Duration::from_secs(120))?;
    if out.contains("Pattern verification failed") {
        bail!("qemu-io {commands:?}: {out}");
    }
    Ok(())
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}): stdout: {} stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on loopback (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on loopback")
}

/// A scratch directory that cleans up mounts and loop devices under it.
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates a fresh directory under /var/tmp (a real filesystem).
    pub fn new(name: &str) -> Self {
        let base = Path::new("/var/tmp/ballast-tests");
        fs::create_dir_all(base).expect("create /var/tmp/ballast-tests");
        let path = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir_in(base)
            .expect("create test dir")
            .keep();
        Self { path }
    }

    /// A path inside the directory.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        cleanup_under(&self.path);
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Unmounts every mount point under `dir` (deepest first) and detaches every
/// loop device whose backing file is under `dir`.
pub fn cleanup_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    for _ in 0..3 {
        let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(&dir))
            .collect();
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stderr(Stdio::null())
                .status();
        }
    }
    // Loop devices: /sys/block/loopN/loop/backing_file names the file.
    if let Ok(entries) = fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(backing) = fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            let backing = backing.trim().trim_end_matches(" (deleted)");
            if Path::new(backing).starts_with(&dir) {
                let _ = Command::new("losetup")
                    .arg("-d")
                    .arg(format!("/dev/{name}"))
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Child {
    inner: Option<std::process::Child>,
    name: String,
}

impl Child {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe. It makes the child die
        // with the test thread that spawned it, even when the test process is
        // killed on a timeout and no Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self {
            inner: Some(child),
            name: name.to_string(),
        })
    }

    /// Process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.inner.as_ref().map(|c| c.id() as i32).unwrap_or(0))
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        signal::kill(self.pid(), sig).with_context(|| format!("signal {sig} to {}", self.name))
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.inner.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits up to `timeout` for the process to exit; returns its status.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let name = self.name.clone();
        let child = self.inner.as_mut().context("process already reaped")?;
        wait_for(&format!("{name} to exit"), timeout, || {
            child.try_wait().ok().flatten()
        })
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.inner.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One file-backed pool of an agent.
#[derive(Clone)]
pub struct PoolFile {
    /// Backing file path.
    pub path: PathBuf,
    /// Size in bytes used when the file is created.
    pub size_bytes: u64,
}

/// A running `ballast-agent` with file-backed pools in a [`TestDir`].
pub struct Agent {
    process: Child,
    /// gRPC address (`127.0.0.1:PORT`).
    pub grpc: SocketAddr,
    state_dir: PathBuf,
    pools: Vec<PoolFile>,
    log: PathBuf,
    extra_args: Vec<String>,
}

impl Agent {
    /// Starts an agent with one pool file of `pool_bytes` named `pool0.img`.
    pub fn start(dir: &TestDir, pool_bytes: u64) -> Result<Self> {
        Self::start_with(
            dir,
            vec![PoolFile {
                path: dir.join("pool0.img"),
                size_bytes: pool_bytes,
            }],
            &[],
        )
    }

    /// Starts an agent with the given pools and extra command-line arguments.
    pub fn start_with(dir: &TestDir, pools: Vec<PoolFile>, extra_args: &[&str]) -> Result<Self> {
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir)?;
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let log = dir.join("agent.log");
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let process = Self::spawn(&state_dir, grpc, &pools, &extra_args, &log)?;
        let mut agent = Self {
            process,
            grpc,
            state_dir,
            pools,
            log,
            extra_args,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn spawn(
        state_dir: &Path,
        grpc: SocketAddr,
        pools: &[PoolFile],
        extra_args: &[String],
        log: &Path,
    ) -> Result<Child> {
        let mut cmd = Command::new(bin("ballast-agent"));
        cmd.arg("--state-dir")
            .arg(state_dir)
            .arg("--grpc-listen")
            .arg(grpc.to_string());
        for p in pools {
            cmd.arg("--pool-file").arg(&p.path);
        }
        if let Some(p) = pools.first() {
            cmd.arg("--pool-size").arg(p.size_bytes.to_string());
        }
        cmd.args(extra_args);
        cmd.env("RUST_LOG", "info,ballast_storage_node=debug");
        writeln!(
            fs::OpenOptions::new().create(true).append(true).open(log)?,
            "--- starting {cmd:?}"
        )?;
        Child::spawn("ballast-agent", &mut cmd, log)
    }

    /// Waits until the agent answers `pool list`, or fails with its log.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if !self.process.is_running() {
                bail!(
                    "ballast-agent exited during start-up; log:\n{}",
                    self.log_text()
                );
            }
            if self
                .cli(&["pool", "list"])
                .map(|o| o.status.success())
                .unwrap_or(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ballast-agent not ready after 60 s; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `ballast --agent ADDR ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        run(
            Command::new(bin("ballast"))
                .arg("--agent")
                .arg(format!("http://{}", self.grpc))
                .args(args),
            Duration::from_secs(30),
        )
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "ballast {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a CLI command with `-o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let text = self.cli_ok(&all)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing JSON from ballast {args:?}: {text}"))
    }

    /// Creates a replica and exports it on `socket`; returns the NBD URI.
    pub fn create_export(
        &self,
        name: &str,
        size: &str,
        socket: &Path,
        thin: bool,
    ) -> Result<String> {
        let mut args = vec!["replica", "create", name, "--size", size];
        if thin {
            args.push("--thin");
        }
        self.cli_ok(&args)?;
        let uri = self.cli_ok(&[
            "export",
            "start",
            name,
            "--socket",
            &socket.to_string_lossy(),
        ])?;
        Ok(uri.trim().to_string())
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        self.process.signal(sig)
    }

    /// SIGKILLs the agent (a crash).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the agent with SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.process.signal(Signal::SIGTERM)?;
        self.process.wait_timeout(Duration::from_secs(30))
    }

    /// Starts the agent again with the same state, pools and port.
    pub fn restart(&mut self) -> Result<()> {
        self.process.kill();
        self.process = Self::spawn(
            &self.state_dir,
            self.grpc,
            &self.pools,
            &self.extra_args,
            &self.log,
        )?;
        self.wait_ready()
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// Size helpers.
pub const MIB: u64 = 1 << 20;
/// One gibibyte in bytes.
pub const GIB: u64 = 1 << 30;

/// Files under `dir` (at most 8 levels down) whose path ends in `suffix`.
pub fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, suffix: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth < 8 {
                walk(&path, suffix, depth + 1, found);
            } else if kind.is_file() && path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, suffix, 0, &mut found);
    found.sort();
    found
}
