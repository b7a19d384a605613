//! A real PostgreSQL server (Debian's packages) with its data directory on a
//! mounted volume: initdb, start, SQL through `psql`, `pg_amcheck`, a clean
//! stop, or SIGKILL of every process of the instance for crash tests.
//!
//! - Binaries come from the newest `/usr/lib/postgresql/<version>/bin`
//!   (`apt-get install postgresql postgresql-contrib`); nothing is taken
//!   from `PATH`.
//! - PostgreSQL refuses to run as root: every program here runs as the
//!   `postgres` user that Debian's package creates (clients too, so the
//!   files they write belong to it). The data directory is created owned
//!   by `postgres` with mode 0700, as initdb requires.
//! - The server listens on a unix socket in a directory of the caller's
//!   choosing and on no TCP port, with `fsync`, `full_page_writes` and
//!   `synchronous_commit` on: a committed transaction is on the volume.
//!   The package's own cluster (`/var/lib/postgresql/<version>/main`) is
//!   neither used nor touched.
//! - The server is a child of this process in its own process group, so a
//!   Ctrl-C at the terminal reaches only the caller, which stops the server
//!   itself. Dropping a [`Server`] SIGKILLs the postmaster as a last resort;
//!   call [`Server::stop`] or [`Server::kill`] instead.
//! - Every wait is bounded and every program runs with a deadline.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::command;

/// Where Debian installs each PostgreSQL major version.
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// The operating system user PostgreSQL runs as, and its superuser role.
pub const ROLE: &str = "postgres";
/// The database the demo and the tests use.
pub const DATABASE: &str = "postgres";

/// How long a started server may take to accept connections (crash
/// recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a fast shutdown may take before an immediate one.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long processes may take to disappear after SIGKILL.
const KILL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of initdb (it syncs every file it writes).
const INITDB_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of one `psql` call.
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of `pg_amcheck`.
const AMCHECK_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of the PostgreSQL instance.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL is not installed: no {DEBIAN_ROOT}/<version>/bin/postgres (run scripts/setup.sh, or apt-get install postgresql postgresql-contrib)"
    )]
    NotInstalled,
    /// The `postgres` user does not exist.
    #[error("There is no user {ROLE} (Debian's postgresql package creates it)")]
    NoUser,
    /// The `postgres` user cannot reach a directory the instance needs.
    #[error(
        "PostgreSQL runs as {ROLE}, which cannot enter {dir} (mode {mode:o}); use a directory whose parents others may enter, e.g. under /var/tmp"
    )]
    Unreachable {
        /// The directory that blocks the way.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The socket path would not fit in a unix socket address.
    #[error(
        "The socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter directory"
    )]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
    },
    /// The data directory already holds something.
    #[error("The data directory {0} is not empty")]
    DataDirNotEmpty(PathBuf),
    /// A file or directory operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Changing a file's owner failed.
    #[error("Cannot give {path} to {ROLE}")]
    Chown {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// A program could not be run to success (start, deadline or exit
    /// status).
    #[error(transparent)]
    Program(#[from] command::Error),
    /// The server exited before it accepted connections.
    #[error("PostgreSQL exited during start-up; last lines of {log}:\n{log_tail}")]
    Exited {
        /// The server log.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// The server did not accept connections in time.
    #[error(
        "PostgreSQL did not accept connections within {timeout:?}; last lines of {log}:\n{log_tail}"
    )]
    NotReady {
        /// The deadline.
        timeout: Duration,
        /// The server log.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// A fast shutdown did not finish in time; the server was killed.
    #[error("PostgreSQL did not shut down within {0:?} and was killed")]
    NotStopped(Duration),
    /// A signal could not be sent.
    #[error("Cannot signal PostgreSQL process {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// Processes of the instance survived SIGKILL (stuck in the kernel,
    /// e.g. on I/O to a device that does not answer).
    #[error("PostgreSQL processes {0:?} still exist {KILL_TIMEOUT:?} after SIGKILL")]
    Survivors(Vec<i32>),
}

/// The programs of one PostgreSQL major version.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
    version: String,
}

impl Binaries {
    /// The newest version under [`DEBIAN_ROOT`].
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`] if none has a `bin/postgres`.
    pub fn find() -> Result<Self, Error> {
        Self::find_in(Path::new(DEBIAN_ROOT))
    }

    fn find_in(root: &Path) -> Result<Self, Error> {
        let entries = std::fs::read_dir(root).map_err(|_| Error::NotInstalled)?;
        let newest = entries
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.to_string();
                let key = version_key(&version)?;
                entry.path().join("bin/postgres").is_file().then_some((
                    key,
                    version,
                    entry.path().join("bin"),
                ))
            })
            .max_by(|a, b| a.0.cmp(&b.0));
        let (_, version, dir) = newest.ok_or(Error::NotInstalled)?;
        Ok(Self { dir, version })
    }

    /// The major version (`15`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The path of one of its programs (`psql`, `pgbench`, ...).
    pub fn path(&self, program: &str) -> PathBuf {
        self.dir.join(program)
    }
}

/// Orders `9.6` before `15`; None for names that are not versions.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The `postgres` account's ids.
#[derive(Debug, Clone, Copy)]
struct Account {
    uid: Uid,
    gid: Gid,
}

impl Account {
    fn lookup() -> Result<Self, Error> {
        let user = User::from_name(ROLE).ok().flatten().ok_or(Error::NoUser)?;
        Ok(Self {
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// True if this account may enter a directory with `meta`.
    fn may_enter(&self, meta: &std::fs::Metadata) -> bool {
        let mode = meta.mode();
        mode & 0o001 != 0
            || (meta.uid() == self.uid.as_raw() && mode & 0o100 != 0)
            || (meta.gid() == self.gid.as_raw() && mode & 0o010 != 0)
    }

    fn chown(&self, path: &Path) -> Result<(), Error> {
        nix::unistd::chown(path, Some(self.uid), Some(self.gid)).map_err(|source| Error::Chown {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Creates `dir` (and its parents) for the `postgres` user with `mode`.
/// An existing directory is given to `postgres` and set to `mode` too.
fn create_owned_dir(account: &Account, dir: &Path, mode: u32) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        op: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    account.chown(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        Error::Io {
            op: "set the mode of",
            path: dir.to_path_buf(),
            source,
        }
    })
}

/// Checks that `account` may enter every existing ancestor of `path`.
fn check_reachable(account: &Account, path: &Path) -> Result<(), Error> {
    for dir in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if !account.may_enter(&meta) {
            return Err(Error::Unreachable {
                dir: dir.to_path_buf(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    Ok(())
}

/// One PostgreSQL instance: its data directory, socket directory and log.
/// Cheap to clone; it holds no process (see [`Server`]).
#[derive(Debug, Clone)]
pub struct Instance {
    binaries: Binaries,
    account: Account,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
}

impl Instance {
    /// An instance with its data in `data_dir` (created by [`Self::init`]),
    /// listening in `socket_dir` (created now, owned by `postgres`, mode
    /// 0700) and logging to `log`. Finds the binaries and the `postgres`
    /// user, and checks that `postgres` can reach both directories.
    ///
    /// # Errors
    ///
    /// [`Error::NotInstalled`], [`Error::NoUser`], [`Error::Unreachable`],
    /// [`Error::SocketPathTooLong`], and I/O errors creating the socket
    /// directory.
    pub fn new(data_dir: &Path, socket_dir: &Path, log: &Path) -> Result<Self, Error> {
        let binaries = Binaries::find()?;
        let account = Account::lookup()?;
        let socket = socket_dir.join(".s.PGSQL.5432");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::SocketPathTooLong { path: socket });
        }
        check_reachable(&account, data_dir)?;
        check_reachable(&account, socket_dir)?;
        create_owned_dir(&account, socket_dir, 0o700)?;
        Ok(Self {
            binaries,
            account,
            data_dir: data_dir.to_path_buf(),
            socket_dir: socket_dir.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// The same instance with its data directory elsewhere (the volume
    /// mounted on another node).
    pub fn with_data_dir(&self, data_dir: &Path) -> Result<Self, Error> {
        check_reachable(&self.account, data_dir)?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            ..self.clone()
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The binaries in use.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// Creates `dir` owned by `postgres` (mode 0755), for files a client
    /// such as pgbench writes.
    ///
    /// # Errors
    ///
    /// I/O and ownership errors.
    pub fn create_client_dir(&self, dir: &Path) -> Result<(), Error> {
        check_reachable(&self.account, dir)?;
        create_owned_dir(&self.account, dir, 0o755)
    }

    /// `program` set up to run as `postgres`, in `/`, in its own process
    /// group, with stdin closed, killed if the handle is dropped.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.binaries.path(program));
        command
            .uid(self.account.uid.as_raw())
            .gid(self.account.gid.as_raw())
            .current_dir("/")
            .process_group(0)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// A client program (`psql`, `pgbench`, `pg_amcheck`, `pg_isready`)
    /// with the connection options of this instance: its socket, the
    /// superuser role. The database name is left to the caller.
    pub fn client(&self, program: &str) -> Command {
        let mut command = self.command(program);
        command
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-U")
            .arg(ROLE)
            .env("PGCONNECT_TIMEOUT", "10");
        command
    }

    /// Runs initdb into a new, empty data directory (created owned by
    /// `postgres` with mode 0700) and adds the demo's settings to its
    /// `postgresql.conf`: the unix socket only, every durability setting on,
    /// a small memory and WAL footprint.
    ///
    /// # Errors
    ///
    /// [`Error::DataDirNotEmpty`], initdb's failure, I/O errors.
    pub async fn init(&self) -> Result<(), Error> {
        self.init_with_wal(None).await
    }

    /// [`Self::init`] with the write-ahead log in `wal_dir` (`initdb
    /// --waldir`: the data directory's `pg_wal` is a symbolic link to it),
    /// e.g. on a volume of its own. `wal_dir` is created owned by
    /// `postgres` and must be empty.
    ///
    /// # Errors
    ///
    /// As [`Self::init`].
    pub async fn init_with_wal(&self, wal_dir: Option<&Path>) -> Result<(), Error> {
        let not_empty = std::fs::read_dir(&self.data_dir)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        if not_empty {
            return Err(Error::DataDirNotEmpty(self.data_dir.clone()));
        }
        create_owned_dir(&self.account, &self.data_dir, 0o700)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(&self.data_dir)
            .args(["--auth=trust", "--username", ROLE, "--encoding=UTF8"])
            .arg("--locale=C");
        if let Some(wal_dir) = wal_dir {
            create_owned_dir(&self.account, wal_dir, 0o700)?;
            initdb.arg("--waldir").arg(wal_dir);
        }
        command::run_of(initdb, "initdb", INITDB_TIMEOUT).await?;
        let conf = self.data_dir.join("postgresql.conf");
        let socket_dir = self.socket_dir.display().to_string().replace('\'', "''");
        let settings = format!(
            "\n# Ballast demo: a unix socket only; a commit is durable on the volume.\n\
             listen_addresses = ''\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = on\n\
             full_page_writes = on\n\
             synchronous_commit = on\n\
             shared_buffers = 64MB\n\
             max_wal_size = 256MB\n\
             max_connections = 30\n"
        );
        let mut text = std::fs::read_to_string(&conf).map_err(|source| Error::Io {
            op: "read",
            path: conf.clone(),
            source,
        })?;
        text.push_str(&settings);
        std::fs::write(&conf, text).map_err(|source| Error::Io {
            op: "write",
            path: conf.clone(),
            source,
        })
    }

    /// Starts the server on the data directory and waits (bounded) until
    /// it accepts connections. After a crash this includes WAL recovery.
    ///
    /// # Errors
    ///
    /// [`Error::Program`], [`Error::Exited`] and [`Error::NotReady`] with the
    /// end of the server log.
    pub async fn start(&self) -> Result<Server, Error> {
        let mut server = self.spawn()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts the server process without waiting; see [`Server::wait_ready`].
    /// Lets a caller keep the handle (for clean-up) before the wait.
    ///
    /// # Errors
    ///
    /// [`Error::Program`] and I/O errors opening the log.
    pub fn spawn(&self) -> Result<Server, Error> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| Error::Io {
                op: "open",
                path: self.log.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| Error::Io {
            op: "open",
            path: self.log.clone(),
            source,
        })?;
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(&self.data_dir)
            .stdout(log)
            .stderr(log_err);
        let child = command.spawn().map_err(|source| command::Error::Spawn {
            program: "postgres".into(),
            source,
        })?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or_default();
        info!(pid, data_dir = %self.data_dir.display(), "PostgreSQL started");
        Ok(Server {
            instance: self.clone(),
            child,
            pid,
        })
    }

    /// Runs one SQL command with `psql` and returns its unaligned,
    /// tuples-only output, trimmed (`SELECT count(*) ...` gives `"42"`).
    ///
    /// # Errors
    ///
    /// [`Error::Program`] with psql's message (`ON_ERROR_STOP` is set),
    /// [`Error::Program`].
    pub async fn query(&self, sql: &str) -> Result<String, Error> {
        let mut psql = self.client("psql");
        psql.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            DATABASE,
        ])
        .arg("-c")
        .arg(sql);
        let out = command::run_of(psql, "psql", QUERY_TIMEOUT).await?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs `pg_amcheck` on the database with heap and B-tree checks,
    /// `--heapallindexed` (every heap tuple is found in its indexes) and
    /// `--parent-check`, installing the amcheck extension if missing.
    ///
    /// # Errors
    ///
    /// [`Error::Program`] if pg_amcheck could not check (exit status other
    /// than 0 and 2); corruption is not an error but [`Amcheck::corrupt`].
    pub async fn amcheck(&self) -> Result<Amcheck, Error> {
        let mut amcheck = self.client("pg_amcheck");
        amcheck.args([
            "-d",
            DATABASE,
            "--install-missing",
            "--heapallindexed",
            "--parent-check",
            "--verbose",
        ]);
        let out = command::output_of(amcheck, "pg_amcheck", AMCHECK_TIMEOUT).await?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // pg_amcheck exits 2 when it found corruption, 1 when it could not run.
        let corrupt = match out.status.code() {
            Some(0) => false,
            Some(2) => true,
            _ => return Err(command::failed("pg_amcheck", &out).into()),
        };
        let relations = stdout
            .lines()
            .chain(stderr.lines())
            .filter(|line| {
                line.contains("checking heap table") || line.contains("checking btree index")
            })
            .count();
        Ok(Amcheck {
            corrupt,
            relations,
            report: stdout.trim().to_string(),
        })
    }
}

/// What `pg_amcheck` found.
#[derive(Debug, Clone)]
pub struct Amcheck {
    /// True if it reported corruption.
    pub corrupt: bool,
    /// Tables and indexes checked.
    pub relations: usize,
    /// Its report of problems (empty when clean).
    pub report: String,
}

/// A running server (the postmaster is a child of this process).
#[derive(Debug)]
pub struct Server {
    instance: Instance,
    child: Child,
    pid: i32,
}

impl Server {
    /// The postmaster's process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The instance it serves.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Waits until the server accepts connections (`pg_isready`), for at
    /// most two minutes.
    ///
    /// # Errors
    ///
    /// [`Error::Exited`] if the server exits, [`Error::NotReady`] on the
    /// deadline.
    pub async fn wait_ready(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.child.try_wait().ok().flatten().is_some() {
                return Err(Error::Exited {
                    log: self.instance.log.clone(),
                    log_tail: log_tail(&self.instance.log, 20),
                });
            }
            let mut ready = self.instance.client("pg_isready");
            ready.args(["-d", DATABASE, "-t", "5"]);
            if command::run_of(ready, "pg_isready", Duration::from_secs(10))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    timeout: START_TIMEOUT,
                    log: self.instance.log.clone(),
                    log_tail: log_tail(&self.instance.log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the server cleanly: a fast shutdown (SIGINT: sessions are
    /// ended, a shutdown checkpoint is written), bounded; if it does not
    /// finish, every process of the instance is killed.
    ///
    /// # Errors
    ///
    /// [`Error::NotStopped`] if it had to be killed, [`Error::Signal`].
    pub async fn stop(mut self) -> Result<(), Error> {
        if self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        signal::kill(Pid::from_raw(self.pid), Signal::SIGINT).map_err(|source| Error::Signal {
            pid: self.pid,
            source,
        })?;
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_ok()
        {
            info!(pid = self.pid, "PostgreSQL stopped");
            return Ok(());
        }
        warn!(
            pid = self.pid,
            "PostgreSQL did not shut down in time; killing it"
        );
        self.kill().await?;
        Err(Error::NotStopped(STOP_TIMEOUT))
    }

    /// SIGKILLs every process of the instance, as a crash would end them:
    /// the postmaster is stopped first (so it forks nothing more), its
    /// children are listed and killed, then the postmaster. Waits (bounded)
    /// until all of them are gone.
    ///
    /// # Errors
    ///
    /// [`Error::Survivors`] if some are still there after the deadline (a
    /// process in uninterruptible I/O), [`Error::Signal`].
    pub async fn kill(mut self) -> Result<(), Error> {
        if self.child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        let postmaster = Pid::from_raw(self.pid);
        let send = |pid: i32, sig: Signal| match signal::kill(Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(Error::Signal { pid, source }),
        };
        send(self.pid, Signal::SIGSTOP)?;
        // A stopped postmaster cannot reap its children, so their pids
        // cannot be reused until it dies: the list stays valid.
        let children = children_of(postmaster.as_raw());
        for (pid, _) in &children {
            send(*pid, Signal::SIGKILL)?;
        }
        send(self.pid, Signal::SIGKILL)?;
        let reaped = tokio::time::timeout(KILL_TIMEOUT, self.child.wait())
            .await
            .is_ok();
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut alive: Vec<i32> = children
                .iter()
                .filter(|(pid, start)| process_start(*pid) == Some(*start))
                .map(|(pid, _)| *pid)
                .collect();
            if !reaped {
                alive.push(self.pid);
            }
            if alive.is_empty() {
                info!(
                    pid = self.pid,
                    killed = children.len() + 1,
                    "PostgreSQL killed"
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Survivors(alive));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The children of `parent` as (pid, start time), from `/proc`.
fn children_of(parent: i32) -> Vec<(i32, u64)> {
    let Ok(processes) = procfs::process::all_processes() else {
        return Vec::new();
    };
    processes
        .flatten()
        .filter_map(|process| process.stat().ok())
        .filter(|stat| stat.ppid == parent)
        .map(|stat| (stat.pid, stat.starttime))
        .collect()
}

/// The start time of `pid` if it exists and is not a zombie.
fn process_start(pid: i32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid)
        .and_then(|p| p.stat())
        .ok()?;
    (stat.state != 'Z').then_some(stat.starttime)
}

/// The last `lines` lines of `path`.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_wins() {
        let root = tempfile::tempdir().expect("temp dir");
        for version in ["9.6", "15", "13", "notes"] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).expect("bin");
            std::fs::write(bin.join("postgres"), "").expect("postgres");
        }
        std::fs::create_dir_all(root.path().join("16/bin")).expect("16 without a server");
        let found = Binaries::find_in(root.path()).expect("found");
        assert_eq!(found.version(), "15");
        assert_eq!(found.path("psql"), root.path().join("15/bin/psql"));
        let empty = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            Binaries::find_in(empty.path()),
            Err(Error::NotInstalled)
        ));
    }

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("9.6") < version_key("15"));
        assert!(version_key("10") > version_key("9.6"));
        assert_eq!(version_key("main"), None);
    }

    #[test]
    fn a_private_parent_blocks_the_postgres_user() {
        let account = Account {
            uid: Uid::from_raw(4242),
            gid: Gid::from_raw(4242),
        };
        let root = tempfile::tempdir().expect("temp dir");
        let private = root.path().join("private");
        std::fs::create_dir(&private).expect("dir");
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let err = check_reachable(&account, &private.join("data")).expect_err("blocked");
        assert!(
            matches!(&err, Error::Unreachable { dir, mode: 0o700 } if *dir == private),
            "{err}"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        check_reachable(&account, &private.join("data")).expect("others may enter");
    }

    #[test]
    fn a_child_is_listed_with_its_start_time() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let start = process_start(pid).expect("child runs");
        let listed = children_of(me);
        let _ = child.kill();
        let _ = child.wait();
        assert!(listed.contains(&(pid, start)), "{listed:?}");
        assert_eq!(process_start(pid), None, "a reaped child has no start time");
    }
}
