//! A real etcd server on loopback for tests (Debian's `etcd-server`, or the
//! binary named by `BALLAST_ETCD`).
//!
//! Each [`EtcdServer`] has its own data directory and random free ports, so
//! tests run in parallel. Dropping it kills the process (also when it is
//! paused, and when the test panicked) and removes the data directory. It
//! must never touch an etcd it did not start.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

use super::{EtcdConfig, EtcdStore};

/// How long etcd may take to answer after starting.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How long every etcd thread may take to stop after SIGSTOP.
const STOPPED_WITHIN: Duration = Duration::from_secs(5);

/// A running etcd, killed on drop.
pub(crate) struct EtcdServer {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits (bounded) until it answers. Retries with other
    /// ports if one was taken between choosing and binding it.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("ballast-etcd-").tempdir()?;
            let (client_port, peer_port) = free_ports()?;
            let mut server = Self {
                child: None,
                dir,
                client_port,
                peer_port,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// A client configuration with short timeouts, keys under `namespace`.
    pub(crate) fn config(&self, namespace: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.endpoint()],
            namespace: namespace.to_owned(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// Freezes etcd with SIGSTOP: its sockets stay open but nothing answers,
    /// like a paused or partitioned node. Returns once every etcd thread is
    /// stopped, so no request sent after it is served.
    pub(crate) fn pause(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("etcd is not running")?;
        let pid = i32::try_from(child.id()).context("Process id out of range")?;
        ballast_storage_node::host::process::stop(pid, STOPPED_WITHIN).context("Pausing etcd")
    }

    /// Resumes etcd after [`Self::pause`].
    pub(crate) fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills etcd with SIGKILL and reaps it; the data directory stays.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("Killing etcd")?;
            child.wait().context("Reaping etcd")?;
        }
        Ok(())
    }

    /// Kills etcd and starts it again on the same data directory and ports.
    pub(crate) async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.launch().await
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("etcd is not running")?;
        let pid = i32::try_from(child.id()).context("Process id out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("Sending {signal} to etcd"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let binary = std::env::var_os("BALLAST_ETCD").unwrap_or_else(|| "/usr/bin/etcd".into());
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut command = Command::new(&binary);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes one async-signal-safe system call (prctl); it allocates
        // nothing and touches no lock.
        unsafe {
            // A test killed by its timeout runs no Drop; etcd must not
            // outlive it. The signal fires when the forking thread exits,
            // which is the test's own thread, alive for the whole test.
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("--name=default")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "Starting {} (install Debian's etcd-server, or set BALLAST_ETCD)",
                    binary.to_string_lossy()
                )
            })?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        let mut config = self.config("");
        config.connect_timeout = Duration::from_secs(1);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("etcd exited with {status}:\n{}", self.log_tail());
            }
            match EtcdStore::connect(config.clone()).await {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    bail!(
                        "etcd did not answer within {READY_WITHIN:?} ({:#}):\n{}",
                        anyhow::Error::from(err),
                        self.log_tail()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process; the TempDir then removes the
        // data directory.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two distinct free loopback ports. They are free when chosen; etcd binds
/// them a moment later, and [`EtcdServer::start`] retries if one was taken.
fn free_ports() -> anyhow::Result<(u16, u16)> {
    let client = TcpListener::bind("127.0.0.1:0")?;
    let peer = TcpListener::bind("127.0.0.1:0")?;
    Ok((client.local_addr()?.port(), peer.local_addr()?.port()))
}
