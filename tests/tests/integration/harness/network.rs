//! A private network of network namespaces for partition tests.
//!
//! A [`Network`] is one "switch" namespace holding a bridge, and one
//! namespace per [`Host`], plugged into the bridge by a veth pair: `eth0`
//! in the host, `p-<label>` on the switch. Hosts get addresses of
//! 10.231.0.0/24, which exist only inside these namespaces; each has `lo`
//! up. Nothing is created in the root namespace: the veth pairs are made
//! inside the switch namespace with their host end moved at creation, and
//! no route, address or sysctl outside the namespaces changes.
//!
//! Faults:
//! - [`Network::unplug`] takes a host's switch port down: the host is cut
//!   from every other host (packets are dropped silently), as when its
//!   cable is pulled. [`Network::plug`] restores it.
//! - [`Network::cut_between`] installs blackhole routes in the two hosts
//!   towards each other: only that pair is cut, both directions; the
//!   kernel refuses new connections between them at once and established
//!   ones time out. [`Network::heal_between`] removes them. (tc's
//!   classifiers would drop silently, but kernels built without them are
//!   common; routes always work.)
//!
//! Processes enter a host with `nsenter --net` ([`Namespace::command`]),
//! which changes the network namespace only: unlike `ip netns exec`, it
//! keeps the mount namespace, so pool mounts made by an agent are visible
//! to the test. Loop devices, files and unix sockets are shared as usual.
//!
//! Namespaces are named `bt-<pid>-<seq>-<label>` and deleted on drop;
//! those of test processes that died without dropping them are swept by
//! the next [`Network::new`].

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cluster::pid_running;
use super::run_ok;

/// Prefix of every namespace the fixture creates.
const PREFIX: &str = "bt-";

/// Deadline of one `ip` call.
const IP_TIMEOUT: Duration = Duration::from_secs(30);

/// Distinguishes networks of one test process.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// One named network namespace, deleted on drop.
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates `name` with `lo` up.
    fn create(name: String) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", &name]), IP_TIMEOUT)
            .context("creating a network namespace (needs root and iproute2)")?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_ok(
            Command::new("ip").args(["-n", &self.name]).args(args),
            IP_TIMEOUT,
        )
        .map(|_| ())
    }

    /// A command that runs `program` in this network namespace (and the
    /// test's mount namespace).
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program.as_ref());
        cmd
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = run_ok(
            Command::new("ip").args(["netns", "delete", &self.name]),
            IP_TIMEOUT,
        );
    }
}

/// A host plugged into a [`Network`].
pub struct Host {
    /// Its namespace.
    pub ns: Namespace,
    /// Its address on the network.
    pub address: Ipv4Addr,
    /// Its switch port (the veth end in the switch namespace).
    port: String,
}

/// Namespaces on one bridge; see the module docs.
pub struct Network {
    // Hosts go first: a veth pair disappears with either of its ends.
    hosts: Vec<Host>,
    switch: Namespace,
    prefix: String,
}

impl Network {
    /// Creates the switch namespace and its bridge, after deleting the
    /// namespaces of dead test processes.
    pub fn new() -> Result<Self> {
        sweep_orphans();
        let prefix = format!(
            "{PREFIX}{}-{}-",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let switch = Namespace::create(format!("{prefix}switch"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Self {
            hosts: Vec::new(),
            switch,
            prefix,
        })
    }

    /// Adds host `label` (at most 12 characters) with address
    /// 10.231.0.`last`; returns its index.
    pub fn add_host(&mut self, label: &str, last: u8) -> Result<usize> {
        if label.len() > 12 {
            bail!("host label {label:?} is longer than 12 characters");
        }
        let ns = Namespace::create(format!("{}{label}", self.prefix))?;
        let address = Ipv4Addr::new(10, 231, 0, last);
        let port = format!("p-{label}");
        self.switch.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.switch.ip(&["link", "set", &port, "master", "br0"])?;
        self.switch.ip(&["link", "set", &port, "up"])?;
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.hosts.push(Host { ns, address, port });
        Ok(self.hosts.len() - 1)
    }

    /// Host number `index`.
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index]
    }

    /// Cuts host `index` from every other host.
    pub fn unplug(&self, index: usize) -> Result<()> {
        let port = &self.hosts[index].port;
        self.switch.ip(&["link", "set", port, "down"])
    }

    /// Plugs host `index` back in.
    pub fn plug(&self, index: usize) -> Result<()> {
        let port = &self.hosts[index].port;
        self.switch.ip(&["link", "set", port, "up"])
    }

    /// Cuts hosts `a` and `b` from each other, both directions; the rest
    /// of the network still reaches both.
    pub fn cut_between(&self, a: usize, b: usize) -> Result<()> {
        self.blackhole("add", a, b)?;
        self.blackhole("add", b, a)
    }

    /// Undoes [`Network::cut_between`].
    pub fn heal_between(&self, a: usize, b: usize) -> Result<()> {
        self.blackhole("delete", a, b)?;
        self.blackhole("delete", b, a)
    }

    fn blackhole(&self, verb: &str, from: usize, to: usize) -> Result<()> {
        let to = format!("{}/32", self.hosts[to].address);
        self.hosts[from].ns.ip(&["route", verb, "blackhole", &to])
    }
}

/// Deletes `bt-<pid>-...` namespaces whose test process is gone.
fn sweep_orphans() {
    let Ok(list) = run_ok(Command::new("ip").args(["netns", "list"]), IP_TIMEOUT) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !pid_running(pid) {
            let _ = run_ok(
                Command::new("ip").args(["netns", "delete", name]),
                IP_TIMEOUT,
            );
        }
    }
}
