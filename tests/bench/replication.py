#!/usr/bin/env python3
"""Ballast replication benchmark, in one run on this machine:

  1. 1 replica vs 3 replicas: the fio jobs of tests/bench/jobs/ through fio's
     nbd engine against the published volume's NBD URI, thick 2 GiB volumes
     prefilled with 1 MiB sequential writes; 1- and 3-replica runs are
     interleaved job by job (alternating which goes first).
  2. Rebuild: a full rebuild (a 2 GiB volume with 1 GiB written loses a
     replica's node for longer than --node-down-after; the controller places
     a new replica on a 4th node), and a delta rebuild (a replica's agent is
     SIGKILLed, 10 MiB are written during a 30 s outage, the agent is
     restarted).
  3. The longest I/O stall fio sees (4k randwrite QD16, every completion
     logged) when a replica's agent is SIGKILLed, and when it is SIGSTOPped
     (the replica protocol's request timeout then decides).

Every cluster is a `ballast cluster up` on loopback under WORK, and is always
brought down with `ballast cluster down`, also on failure. Prints Markdown
tables (the "Replication" section of docs/benchmarks.md) and writes every
number to WORK/results.json.

Run as root from the repository root: `tests/bench/replication.py`.
The three or four "nodes" share one disk and two cores here: compare ratios
within one run, not absolute numbers across runs.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as single  # noqa: E402  (the single-node benchmark: same fio jobs and parsing)

ROOT = single.ROOT
JOBS = single.JOBS
WORK = "/var/tmp/ballast-replbench"
BALLAST = os.path.join(ROOT, "target/release/ballast")
GIB = 1 << 30
MIB = 1 << 20
VOLUME_SIZE = 2 * GIB
TARGET = "node-1"
# Goals of issue 3.
GOAL_RANDWRITE = 0.5   # 3r/1r IOPS, at least
GOAL_FSYNC_LAT = 2.5   # 3r/1r mean latency of write-fsync-4k, at most
GOAL_READ = 0.9        # 3r/1r IOPS of randread-4k, at least
GOAL_FULL_MIBS = 200   # full rebuild throughput, at least
GOAL_DELTA_S = 5       # delta rebuild, at most
GOAL_STALL_S = 2       # plus the replica request timeout
REQUEST_TIMEOUT_S = 5  # storage-node/src/replication/client.rs, ClientConfig::default()


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def sh(*args):
    return single.sh(*args)


def fio_nbd(uri, *args):
    """Runs one fio job on `uri`; returns its JSON report's first job."""
    out = sh("fio", "--name=job", "--ioengine=nbd", "--uri=" + uri, "--output-format=json", *args)
    j = json.loads(out[out.index("{"):])["jobs"][0]
    if j["error"]:
        raise RuntimeError("fio %s failed with error %s" % (" ".join(args), j["error"]))
    return j


class Cluster:
    """A `ballast cluster` in WORK/<name>; see `ballast cluster --help`."""

    def __init__(self, name):
        self.dir = os.path.join(WORK, name)
        self.stopped = set()

    def up(self, nodes, pool_size, *extra):
        log("cluster up: %s, %d nodes" % (self.dir, nodes))
        sh(BALLAST, "cluster", "up", "--dir", self.dir, "--nodes", str(nodes),
           "--pool-size", pool_size, "--heartbeat-timeout", "5s", *extra)

    def down(self):
        for node in list(self.stopped):
            self.signal(node, signal.SIGCONT)
        if os.path.exists(os.path.join(self.dir, "cluster.json")):
            log("cluster down: %s" % self.dir)
            r = subprocess.run([BALLAST, "cluster", "down", "--dir", self.dir],
                               capture_output=True, text=True)
            if r.returncode != 0:
                log("cluster down failed: %s" % r.stderr.strip())
                return False
        return True

    def cli(self, *args):
        return sh(BALLAST, "--cluster", self.dir, *args)

    def volume(self, name):
        return json.loads(self.cli("-o", "json", "volume", "show", name))

    def info(self):
        with open(os.path.join(self.dir, "cluster.json")) as f:
            return json.load(f)

    def node(self, node_id):
        return [n for n in self.info()["nodes"] if n["node_id"] == node_id][0]

    def signal(self, node_id, sig):
        """Signals `node_id`'s agent if it is the process the cluster file names."""
        proc = self.node(node_id)["process"]
        try:
            with open("/proc/%d/stat" % proc["pid"]) as f:
                start = int(f.read().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            return
        if start != proc["start_time"]:
            return
        os.kill(proc["pid"], sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(node_id)
        elif sig == signal.SIGCONT:
            self.stopped.discard(node_id)

    def restart(self, node_id):
        self.cli("cluster", "restart-node", node_id, "--dir", self.dir)

    def agent_log(self, node_id):
        return self.node(node_id)["process"]["log"]

    def wait_node(self, node_id, state, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            nodes = json.loads(self.cli("-o", "json", "node", "list"))
            if any(n["node_id"] == node_id and n["state"] == state for n in nodes):
                return
            time.sleep(0.2)
        raise RuntimeError("%s not %s after %d s" % (node_id, state, timeout))

    def wait_in_sync(self, name, timeout=180):
        """Polls until every replica of `name` is in sync; returns the poll trace."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = self.volume(name)
            if all(r["state"] == "in-sync" for r in v["replicas"]):
                return v
            time.sleep(0.2)
        raise RuntimeError("volume %s not in sync after %d s: %s" % (name, timeout, self.volume(name)))


def ts(line):
    """The time of a tracing log line (`2025-01-01T00:00:00.123456Z ...`), Unix seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z", line)
    if not m:
        return None
    text = m.group(1)
    if "." in text:
        head, frac = text.split(".")
        text = head + "." + frac[:6]
        fmt = "%Y-%m-%dT%H:%M:%S.%f"
    else:
        fmt = "%Y-%m-%dT%H:%M:%S"
    return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()


def log_events(path, volume, node, since):
    """Rebuild events of `volume`'s replica on `node` in a target's log after `since`."""
    wanted = {
        "Replica failed; asking the controller": "failed",
        "Replica dropped from the in-sync set": "dropped",
        "Rebuild started": "started",
        "Copying regions": "copying",
        "Every region copied": "copied",
        "Replica rebuilt and back in the in-sync set": "in-sync",
        "Rebuild aborted": "aborted",
    }
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            if ("volume.id=%s" % volume) not in line or ("node.id=%s" % node) not in line:
                continue
            t = ts(line)
            if t is None or t < since:
                continue
            for text, name in wanted.items():
                if text in line:
                    fields = dict(re.findall(r"(\w+)=(\S+)", line))
                    events.append((t, name, fields))
    return events


def first(events, name, after=0.0):
    for t, n, fields in events:
        if n == name and t >= after:
            return t, fields
    return None, {}


def last(events, name, before):
    found = (None, {})
    for t, n, fields in events:
        if n == name and (before is None or t <= before):
            found = (t, fields)
    return found


# --- 1. 1 replica vs 3 replicas ------------------------------------------

def prefill(uri, size):
    fio_nbd(uri, "--rw=write", "--bs=1m", "--iodepth=8", "--size=%d" % size, "--end_fsync=1")


def flush(uri):
    """Rewrites one block and FLUSHes: the target's dirty-region log starts,
    at a drop, with the regions written since the last FLUSH, so a test of
    a delta rebuild starts from a flushed volume (as a file system keeps it)."""
    fio_nbd(uri, "--rw=write", "--bs=4k", "--size=4k", "--end_fsync=1")


def throughput(cluster, runtime):
    cluster.cli("volume", "create", "r1", "--size", str(VOLUME_SIZE), "--replicas", "1", "--node", TARGET)
    cluster.cli("volume", "create", "r3", "--size", str(VOLUME_SIZE), "--replicas", "3", "--node", TARGET)
    uris = {}
    for name in ("r1", "r3"):
        uris[name] = cluster.cli("volume", "publish", name, "--node", TARGET).strip()
        log("prefilling %s (%s)" % (name, uris[name]))
        t0 = time.time()
        prefill(uris[name], VOLUME_SIZE)
        log("prefilled %s in %.1f s" % (name, time.time() - t0))
    results = {}
    for i, job in enumerate(JOBS):
        order = ("r1", "r3") if i % 2 == 0 else ("r3", "r1")
        for name in order:
            log("running %s on %s" % (job, name))
            before = cpu_sample(cluster)
            r = single.fio(job, ["--ioengine=nbd", "--uri=" + uris[name]], runtime, VOLUME_SIZE)
            r["cpu"] = cpu_delta(before, cpu_sample(cluster))
            results[(job, name)] = r
    return uris, results


def cpu_sample(cluster):
    """CPU seconds used so far by each agent, and by the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"wall": time.time()}
    for n in cluster.info()["nodes"]:
        try:
            with open("/proc/%d/stat" % n["process"]["pid"]) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[n["node_id"]] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    out["busy"] = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
    return out


def cpu_delta(a, b):
    """Agent CPU seconds and machine busy cores over an interval (fio's ramp included)."""
    wall = b["wall"] - a["wall"]
    out = {k: b[k] - a[k] for k in b if k.startswith("node-") and k in a}
    out["machine_busy_cores"] = (b["busy"] - a["busy"]) / wall
    out["agents_cores"] = sum(v for k, v in out.items() if k.startswith("node-")) / wall
    out["wall"] = wall
    return out


# --- 2. Rebuild ------------------------------------------------------------

def delta_rebuild(cluster, uri, victim, outage):
    """SIGKILLs `victim`, writes 10 MiB, restarts it after `outage` s, times the rebuild."""
    cluster.wait_in_sync("r3")
    flush(uri)
    target_log = cluster.agent_log(TARGET)
    t_kill = time.time()
    log("delta: SIGKILL %s's agent" % victim)
    cluster.signal(victim, signal.SIGKILL)
    time.sleep(1)
    t0 = time.time()
    fio_nbd(uri, "--rw=write", "--bs=1m", "--iodepth=1", "--offset=%d" % (512 * MIB), "--size=%d" % (10 * MIB))
    write_s = time.time() - t0
    state = cluster.volume("r3")
    time.sleep(max(0, t_kill + outage - time.time()))
    t_restart = time.time()
    log("delta: restart %s" % victim)
    cluster.restart(victim)
    polls = poll_rebuild(cluster, "r3", victim, 120)
    events = log_events(target_log, "r3", victim, t_kill)
    return summarise_rebuild(polls, events, t_restart, {
        "write_10mib_s": write_s,
        "faulted_after_write": [r["state"] for r in state["replicas"] if r["node_id"] == victim],
    })


def poll_rebuild(cluster, name, node, timeout):
    """(time, state, done, total) of `node`'s replica of `name` until it is in sync."""
    polls = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cluster.volume(name)
        t = time.time()
        mine = [r for r in v["replicas"] if r["node_id"] == node]
        if mine:
            r = mine[0]
            polls.append((t, r["state"], int(r.get("rebuild_done_bytes", 0)), int(r.get("rebuild_total_bytes", 0))))
            if r["state"] == "in-sync":
                return polls
        time.sleep(0.1)
    raise RuntimeError("replica of %s on %s not in sync after %d s" % (name, node, timeout))


def summarise_rebuild(polls, events, t_ref, extra):
    t_rebuilding = next((t for t, s, _, _ in polls if s == "rebuilding"), None)
    t_in_sync = next((t for t, s, _, _ in polls if s == "in-sync"), None)
    total = max((tot for _, _, _, tot in polls), default=0)
    # Attempts that aborted (the reconciler may try while the node still
    # counts as up) come before the one that finished: take the last of each
    # event before the replica joined.
    joined, _ = first(events, "in-sync")
    started, _ = last(events, "started", joined)
    copying, cfields = last(events, "copying", joined)
    copied, dfields = last(events, "copied", joined)
    _, drop = last(events, "dropped", joined)
    out = dict(extra)
    out.update({
        "poll_rebuilding_to_in_sync_s": (t_in_sync - t_rebuilding) if t_rebuilding and t_in_sync else None,
        "poll_ref_to_in_sync_s": (t_in_sync - t_ref) if t_in_sync else None,
        "poll_total_bytes": total,
        "log_started_to_in_sync_s": (joined - started) if started and joined else None,
        "log_copy_s": (copied - copying) if copying and copied else None,
        "log_ref_to_in_sync_s": (joined - t_ref) if joined else None,
        "log_kind": cfields.get("kind"),
        "log_total_bytes": int(cfields["total_bytes"]) if "total_bytes" in cfields else None,
        "log_copied_bytes": int(dfields["copied_bytes"]) if "copied_bytes" in dfields else None,
        "aborts": sum(1 for _, n, _ in events if n == "aborted"),
        "dirty_regions_at_drop": int(drop["dirty_regions"]) if "dirty_regions" in drop else None,
        "events": [(round(t - t_ref, 3), n) for t, n, _ in events],
    })
    return out


def full_rebuild(downs):
    """A 4-node cluster; a replica's node is lost and replaced by a new replica."""
    cluster = Cluster("full")
    try:
        cluster.up(4, "4GiB", "--node-down-after", "6s")
        v = json.loads(cluster.cli("-o", "json", "volume", "create", "full", "--size", str(VOLUME_SIZE),
                                   "--replicas", "3", "--node", TARGET))
        holders = [r["node_id"] for r in v["replicas"]]
        victim = [n for n in holders if n != TARGET][0]
        spare = [n for n in ("node-1", "node-2", "node-3", "node-4") if n not in holders][0]
        uri = cluster.cli("volume", "publish", "full", "--node", TARGET).strip()
        log("full: writing 1 GiB")
        fio_nbd(uri, "--rw=write", "--bs=1m", "--iodepth=8", "--size=%d" % GIB, "--end_fsync=1")
        target_log = cluster.agent_log(TARGET)
        t_kill = time.time()
        log("full: SIGKILL %s's agent; expecting a new replica on %s" % (victim, spare))
        cluster.signal(victim, signal.SIGKILL)
        # Wait until the controller counts the node as down before a write
        # makes the target drop the replica: while the node still counts as
        # up, the repair reconciler hands the faulted replica back to the
        # target, whose rebuild aborts at once, and the record is left
        # "rebuilding", which `replace_lost` never replaces (see the
        # "Replication" section of docs/benchmarks.md).
        cluster.wait_node(victim, "down", 60)
        t_down = time.time()
        # A write makes the target notice and drop the replica.
        fio_nbd(uri, "--rw=write", "--bs=1m", "--iodepth=1", "--size=%d" % (4 * MIB))
        polls = poll_rebuild(cluster, "full", spare, 240)
        events = log_events(target_log, "full", spare, t_kill)
        out = summarise_rebuild(polls, events, t_kill, {"victim": victim, "spare": spare,
                                                        "kill_to_node_down_s": t_down - t_kill})
        return out
    finally:
        downs["full"] = cluster.down()


# --- 3. Stall ----------------------------------------------------------------

def longest_gap(clat_log, kill_at_ms):
    """Longest gap between completions in a fio clat log, and IOPS before/after."""
    times = []
    with open(clat_log) as f:
        for line in f:
            parts = line.split(",")
            if parts and parts[0].strip().isdigit():
                times.append(int(parts[0]))
    times.sort()
    gap, gap_at = 0, 0
    for a, b in zip(times, times[1:]):
        if b - a > gap:
            gap, gap_at = b - a, a
    end = times[-1] if times else 1
    before = sum(1 for t in times if t < kill_at_ms) / (kill_at_ms / 1000)
    after_start = gap_at + gap
    after = sum(1 for t in times if t > after_start) / max(0.001, (end - after_start) / 1000)
    return {"gap_ms": gap, "gap_starts_ms": gap_at, "iops_before": before, "iops_after": after,
            "completions": len(times)}


def stall(cluster, uri, victim, sig, runtime=30, at=10):
    cluster.wait_in_sync("r3")
    flush(uri)
    prefix = os.path.join(WORK, "stall-%s" % signal.Signals(sig).name)
    for old in os.listdir(WORK):
        if old.startswith(os.path.basename(prefix) + "_"):
            os.remove(os.path.join(WORK, old))
    log("stall: fio 4k randwrite QD16 for %d s, %s to %s at %d s" % (runtime, signal.Signals(sig).name, victim, at))
    proc = subprocess.Popen(["fio", "--name=stall", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
                             "--bs=4k", "--iodepth=16", "--size=%d" % (512 * MIB), "--time_based",
                             "--runtime=%d" % runtime, "--write_lat_log=" + prefix, "--output-format=json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t_start = time.time()
    time.sleep(at)
    t_sig = time.time()
    cluster.signal(victim, sig)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError("stall fio failed: %s" % err)
    j = json.loads(out[out.index("{"):])["jobs"][0]
    result = longest_gap(prefix + "_clat.1.log", (t_sig - t_start) * 1000)
    result["max_clat_ms"] = j["write"]["clat_ns"]["max"] / 1e6
    result["fio_errors"] = j["error"]
    result["signal"] = signal.Signals(sig).name
    # Bring the replica back before the next test.
    if sig == signal.SIGSTOP:
        cluster.signal(victim, signal.SIGCONT)
    else:
        cluster.restart(victim)
    t_back = time.time()
    polls = poll_rebuild(cluster, "r3", victim, 240)
    events = log_events(cluster.agent_log(TARGET), "r3", victim, t_sig)
    result["rebuild_after"] = summarise_rebuild(polls, events, t_back, {})
    failed, _ = first(events, "failed")
    dropped, _ = first(events, "dropped")
    result["signal_to_failed_s"] = failed - t_sig if failed else None
    result["signal_to_dropped_s"] = dropped - t_sig if dropped else None
    return result


# --- Report ------------------------------------------------------------------

def met(ok):
    return "met" if ok else "**missed**"


def fmt_s(x):
    return "—" if x is None else "%.2f s" % x


def report(results, full, delta, stalls):
    if results:
        report_throughput(results)
    report_rebuild(full, delta, stalls)


def report_throughput(results):
    print("### 1 replica vs 3 replicas\n")
    print("| job | replicas | IOPS | MiB/s | mean µs | p99 µs | 3r/1r IOPS | 3r/1r mean lat |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for job in JOBS:
        a, b = results[(job, "r1")], results[(job, "r3")]
        for name, r in (("r1", a), ("r3", b)):
            ratio = ("%.2f×" % (b["iops"] / a["iops"]), "%.2f×" % (b["mean_us"] / a["mean_us"])) if name == "r3" else ("", "")
            print("| %s | %s | %.0f | %.1f | %.0f | %.0f | %s | %s |" % (
                job, name[1], r["iops"], r["bw"] / MIB, r["mean_us"], r["p99_us"], *ratio))
    print("\nCPU during each run (fio's 2 s ramp included; the machine has %d cores): "
          "busy cores of the whole machine, cores used by all agents, and agent CPU µs per I/O "
          "(target node, and the other two).\n" % os.cpu_count())
    print("| job | replicas | machine busy cores | agents' cores | node-1 µs/IO | node-2+3 µs/IO |")
    print("|---|---:|---:|---:|---:|---:|")
    for job in JOBS:
        for name in ("r1", "r3"):
            r = results[(job, name)]
            c = r["cpu"]
            ios = r["iops"] * c["wall"]
            others = c.get("node-2", 0) + c.get("node-3", 0)
            print("| %s | %s | %.2f | %.2f | %.0f | %.0f |" % (
                job, name[1], c["machine_busy_cores"], c["agents_cores"],
                c.get("node-1", 0) / ios * 1e6, others / ios * 1e6))
    rw = results[("randwrite-4k", "r3")]["iops"] / results[("randwrite-4k", "r1")]["iops"]
    fs = results[("write-fsync-4k", "r3")]["mean_us"] / results[("write-fsync-4k", "r1")]["mean_us"]
    rd = results[("randread-4k", "r3")]["iops"] / results[("randread-4k", "r1")]["iops"]
    print("\n| goal | measured | |")
    print("|---|---:|---|")
    print("| randwrite-4k 3r/1r IOPS ≥ %.1f× | %.2f× | %s |" % (GOAL_RANDWRITE, rw, met(rw >= GOAL_RANDWRITE)))
    print("| write-fsync-4k 3r/1r mean latency ≤ %.1f× | %.2f× | %s |" % (GOAL_FSYNC_LAT, fs, met(fs <= GOAL_FSYNC_LAT)))
    print("| randread-4k 3r/1r IOPS ≥ %.1f× | %.2f× | %s |" % (GOAL_READ, rd, met(rd >= GOAL_READ)))


def report_rebuild(full, delta, stalls):
    print("\n### Rebuild\n")
    if full:
        copied = full["log_copied_bytes"] or full["poll_total_bytes"]
        secs = full["poll_rebuilding_to_in_sync_s"]
        mibs = copied / MIB / secs if secs else 0
        copy_mibs = copied / MIB / full["log_copy_s"] if full["log_copy_s"] else 0
        print("Full rebuild (2 GiB thick volume, 1 GiB written; %s lost, new replica on %s):\n" % (
            full["victim"], full["spare"]))
        print("| measure | value |")
        print("|---|---:|")
        print("| bytes copied (allocated) | %.0f MiB |" % (copied / MIB))
        print("| kill → replica in sync | %s |" % fmt_s(full["poll_ref_to_in_sync_s"]))
        print("| \"rebuilding\" → \"in-sync\" (volume show) | %s |" % fmt_s(secs))
        print("| copy phase (target log) | %s |" % fmt_s(full["log_copy_s"]))
        print("| throughput, rebuilding → in sync | %.0f MiB/s |" % mibs)
        print("| throughput, copy phase | %.0f MiB/s |" % copy_mibs)
        print("| goal ≥ %d MiB/s | %s |" % (GOAL_FULL_MIBS, met(mibs >= GOAL_FULL_MIBS)))
    if delta:
        print("\nDelta rebuild (SIGKILL, 10 MiB written during a 30 s outage, `cluster restart-node`):\n")
        print("| measure | value |")
        print("|---|---:|")
        print("| rebuild kind (target log) | %s |" % delta["log_kind"])
        print("| dirty 1 MiB regions at the drop | %s |" % delta["dirty_regions_at_drop"])
        print("| bytes to copy | %.0f MiB |" % ((delta["log_total_bytes"] or delta["poll_total_bytes"]) / MIB))
        print("| 10 MiB write with the replica dead (includes the drop) | %s |" % fmt_s(delta["write_10mib_s"]))
        rebuild_s = delta["log_started_to_in_sync_s"]
        print("| restart → in sync (volume show, 0.1 s polls) | %s |" % fmt_s(delta["poll_ref_to_in_sync_s"]))
        print("| Rebuild started → back in sync (target log) | %s |" % fmt_s(rebuild_s))
        print("| goal < %d s (both of the above) | %s |" % (GOAL_DELTA_S, met(
            rebuild_s is not None and rebuild_s < GOAL_DELTA_S
            and delta["poll_ref_to_in_sync_s"] is not None and delta["poll_ref_to_in_sync_s"] < GOAL_DELTA_S)))
    if stalls:
        print("\n### Longest I/O stall (4k randwrite QD16, a non-target agent signalled at 10 s)\n")
        print("| signal | longest gap without completions | max completion latency | signal → replica failed / dropped (target log) | IOPS before | IOPS after | rebuild after (restart/SIGCONT → in sync) | goal < %d s + %d s |" % (GOAL_STALL_S, REQUEST_TIMEOUT_S))
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        for s in stalls:
            print("| %s | %.2f s (at %.1f s) | %.2f s | %s / %s | %.0f | %.0f | %s (%s) | %s |" % (
                s["signal"], s["gap_ms"] / 1000, s["gap_starts_ms"] / 1000, s["max_clat_ms"] / 1000,
                fmt_s(s["signal_to_failed_s"]), fmt_s(s["signal_to_dropped_s"]),
                s["iops_before"], s["iops_after"], fmt_s(s["rebuild_after"]["poll_ref_to_in_sync_s"]),
                s["rebuild_after"]["log_kind"],
                met(s["gap_ms"] / 1000 < GOAL_STALL_S + REQUEST_TIMEOUT_S)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio job in part 1 (default 15)")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    ap.add_argument("--parts", default="throughput,stall,delta,full",
                    help="comma-separated parts to run (default: throughput,stall,delta,full)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop devices and mounts)")
    parts = set(args.parts.split(","))
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    # Leftovers of an earlier run that died before its `cluster down`.
    for name in ("main", "full"):
        Cluster(name).down()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    started = time.time()
    results, full, delta, stalls = {}, None, None, []
    failures = []
    downs = {}

    def attempt(what, fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 (report what failed, run the other parts)
            log("%s failed: %s" % (what, e))
            failures.append("%s: %s" % (what, e))
            return None

    cluster = Cluster("main")
    try:
        cluster.up(3, "6GiB")
        uris = {}
        if "throughput" in parts:
            uris, results = throughput(cluster, args.runtime)
        else:
            cluster.cli("volume", "create", "r3", "--size", str(VOLUME_SIZE), "--replicas", "3", "--node", TARGET)
            uris["r3"] = cluster.cli("volume", "publish", "r3", "--node", TARGET).strip()
            prefill(uris["r3"], VOLUME_SIZE)
        if "stall" in parts:
            for victim, sig in (("node-2", signal.SIGKILL), ("node-3", signal.SIGSTOP)):
                s = attempt("stall %s" % signal.Signals(sig).name, stall, cluster, uris["r3"], victim, sig)
                if s:
                    stalls.append(s)
        if "delta" in parts:
            delta = attempt("delta rebuild", delta_rebuild, cluster, uris["r3"], "node-3", 30)
    except Exception as e:  # noqa: BLE001
        log("main cluster failed: %s" % e)
        failures.append("main cluster: %s" % e)
    finally:
        downs["main"] = cluster.down()
    if "full" in parts:
        full = attempt("full rebuild", full_rebuild, downs)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"throughput": {"%s/%s" % k: v for k, v in results.items()},
                   "full": full, "delta": delta, "stalls": stalls, "failures": failures},
                  f, indent=1, default=str)
    report(results, full, delta, stalls)
    for failure in failures:
        print("\nFAILED: %s" % failure)
    log("done in %.0f s; raw numbers in %s/results.json" % (time.time() - started, WORK))
    # The pool files hold gigabytes; the logs stay.
    for name, down_ok in downs.items():
        for node in range(1, 5):
            pool = os.path.join(WORK, name, "node-%d" % node, "pool.img")
            if down_ok and os.path.exists(pool):
                os.remove(pool)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
