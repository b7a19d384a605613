#!/usr/bin/env python3
"""Ballast snapshot benchmark, in one run on this machine:

  1. Write stall: fio 4k randwrite QD16 on a published 3-replica volume for
     --runtime seconds, once without snapshots and once with a snapshot
     taken every 2 s; completion latency (max, p99, p99.9) side by side.
  2. Snapshot creation time of a written 1 GiB and 10 GiB 3-replica volume
     (published: at the target's barrier), median of 3, with the time the
     barrier held writes.
  3. Restore by reflink (every replica on a node holding a copy) vs by copy
     (a replica on a node without one, filled by the target's full rebuild
     at publish), in MiB/s of the volume's allocated bytes.
  4. GetMetadataDelta (`ballast snapshot diff`) of the 10 GiB volume with
     1 % of it overwritten (4 KiB random writes) between two snapshots.
  5. Group snapshots of 2, 4 and 8 volumes (256 MiB, 3 replicas, targets
     spread over the 3 nodes) while fio 4k randwrite QD16 runs on the
     first: the longest time any member's barrier held writes, the
     group's creation time, fio's completion latency.
  6. App-consistent against crash-consistent group snapshots of
     PostgreSQL (data and WAL on two volumes on two nodes) under pgbench:
     `ballast demo snapshot`, 3 runs with freeze and a CHECKPOINT pre-hook
     and 3 with `--crash-consistent`, alternating; each member's paused
     window, the CSI call's time and pgbench's longest stall at the cut.

Every cluster is a `ballast cluster up` on loopback under WORK, always
brought down, also on failure. Prints the Markdown tables of the
"Snapshots" section of docs/benchmarks.md and writes every number to
WORK/results.json. Run as root from the repository root:
`tests/bench/snapshots.py`. The "nodes" share one disk and two cores here:
compare ratios within one run, not absolute numbers across runs.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import replication as repl  # noqa: E402  (cluster helpers, fio over NBD)

ROOT = repl.ROOT
WORK = "/var/tmp/ballast-snapbench"
GIB = 1 << 30
MIB = 1 << 20
log = repl.log


class Cluster(repl.Cluster):
    def __init__(self, name):
        super().__init__(name)
        self.dir = os.path.join(WORK, name)

    def json(self, *args):
        return json.loads(self.cli("-o", "json", *args))


def clat(job):
    """Completion latency of a fio job's writes: (max, p99, p99.9) in ms."""
    c = job["write"]["clat_ns"]
    p = c.get("percentile", {})
    return (c["max"] / 1e6, p.get("99.000000", 0) / 1e6, p.get("99.900000", 0) / 1e6)


def randwrite(uri, runtime, size):
    return repl.fio_nbd(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--time_based",
                        "--runtime=%d" % runtime, "--size=%d" % size, "--direct=1",
                        "--percentile_list=99:99.9")


def stall(cluster, uri, runtime):
    """fio without, then with, a snapshot every 2 s."""
    base = randwrite(uri, runtime, GIB)
    taken, paused, stop = [], [], threading.Event()

    def snapshots():
        i = 0
        while not stop.wait(2.0):
            s = cluster.json("snapshot", "create", "stall-%d" % i, "--volume", "v1")
            taken.append(s["snapshot_id"])
            paused.append(s["paused_ms"])
            i += 1

    t = threading.Thread(target=snapshots)
    t.start()
    try:
        loaded = randwrite(uri, runtime, GIB)
    finally:
        stop.set()
        t.join()
    for name in taken:
        cluster.cli("snapshot", "delete", name)
    return {"without": clat(base), "with": clat(loaded), "snapshots": len(taken),
            "paused_ms": paused, "iops_without": base["write"]["iops"],
            "iops_with": loaded["write"]["iops"]}


def fragment(uri, size):
    """Sequential fill, then 4 KiB random overwrites of 1 % (many extents)."""
    repl.prefill(uri, size)
    repl.fio_nbd(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=%d" % size,
                 "--io_size=%d" % (size // 100), "--end_fsync=1")


def creation(cluster, name):
    times, paused = [], []
    for i in range(3):
        t = time.time()
        s = cluster.json("snapshot", "create", "%s-c%d" % (name, i), "--volume", name)
        times.append(time.time() - t)
        paused.append(s["paused_ms"])
    for i in range(3):
        cluster.cli("snapshot", "delete", "%s-c%d" % (name, i))
    return {"median_s": statistics.median(times), "times_s": times, "paused_ms": paused}


def restores(cluster, size):
    """1-replica source on node-1 with `size` written: reflink restore on
    node-1 vs a copy to node-2 through publish and full rebuild."""
    cluster.cli("volume", "create", "src", "--size", str(size), "--replicas", "1", "--node", "node-1")
    uri = cluster.cli("volume", "publish", "src", "--node", "node-1").strip()
    repl.prefill(uri, size)
    cluster.cli("volume", "unpublish", "src")
    cluster.cli("snapshot", "create", "src-snap", "--volume", "src")
    t = time.time()
    cluster.cli("volume", "create", "by-reflink", "--from-snapshot", "src-snap", "--replicas", "1")
    reflink_s = time.time() - t
    # Two replicas: node-1 restored by reflink, the other filled by a copy.
    t = time.time()
    cluster.cli("volume", "create", "by-copy", "--from-snapshot", "src-snap", "--replicas", "2")
    cluster.cli("volume", "publish", "by-copy", "--node", "node-1")
    cluster.wait_in_sync("by-copy", timeout=600)
    copy_s = time.time() - t
    mib = size / MIB
    return {"bytes": size, "reflink_s": reflink_s, "copy_s": copy_s,
            "reflink_mibs": mib / reflink_s, "copy_mibs": mib / copy_s}


def delta(cluster, uri, size):
    cluster.cli("snapshot", "create", "d-base", "--volume", "v10")
    repl.fio_nbd(uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=%d" % size,
                 "--io_size=%d" % (size // 100), "--end_fsync=1", "--randrepeat=0")
    cluster.cli("snapshot", "create", "d-target", "--volume", "v10")
    times = []
    for _ in range(3):
        t = time.time()
        d = cluster.json("snapshot", "diff", "d-base", "d-target")
        times.append(time.time() - t)
    return {"median_s": statistics.median(times), "times_s": times, "ranges": len(d["ranges"]),
            "changed_bytes": d["changed_bytes"], "size_bytes": d["size_bytes"]}


def group_stall(cluster, counts=(2, 4, 8), runtime=10):
    volumes = []
    for i in range(max(counts)):
        name = "grp%d" % i
        cluster.cli("volume", "create", name, "--size", str(256 * MIB), "--replicas", "3", "--thin")
        uri = cluster.cli("volume", "publish", name, "--node", "node-%d" % (i % 3 + 1)).strip()
        repl.fio_nbd(uri, "--rw=write", "--bs=1m", "--iodepth=8", "--size=%d" % (64 * MIB), "--end_fsync=1")
        volumes.append((name, uri))
    results = {}
    for n in counts:
        members = [v for v, _ in volumes[:n]]
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("fio", randwrite(volumes[0][1], runtime, 64 * MIB)))
        t.start()
        held, walls = [], []
        try:
            for k in range(3):
                time.sleep(2.0)
                args = ["snapshot", "group", "create", "g%d-%d" % (n, k)]
                for m in members:
                    args += ["--volume", m]
                start = time.time()
                g = cluster.json(*args)
                walls.append(time.time() - start)
                held.append(max(s["paused_ms"] for s in g["snapshots"]))
        finally:
            t.join()
        for k in range(3):
            cluster.cli("snapshot", "group", "delete", "g%d-%d" % (n, k))
        m, p99, p999 = clat(out["fio"])
        results[n] = {"held_ms": held, "wall_s": walls, "fio_max_ms": m, "fio_p99_ms": p99,
                      "fio_p999_ms": p999}
    return results


def demo_snapshot(crash_consistent, k, seconds=8, scale=5):
    """One `ballast demo snapshot` run; the figures of its report."""
    name = "demo-%s-%d" % ("crash" if crash_consistent else "frozen", k)
    args = [os.path.join(ROOT, "target/release/ballast"), "demo", "snapshot",
            "--dir", os.path.join(WORK, name), "--pgbench-seconds", str(seconds), "--scale", str(scale)]
    if crash_consistent:
        args.append("--crash-consistent")
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(args), out.stdout[-2000:] + out.stderr[-2000:]))
    report = out.stdout.split("REPORT", 1)[1]
    held = [int(line.split("writes held: ")[1].split()[0]) for line in report.splitlines()
            if "writes held: " in line]
    call_ms = int(report.split("answered in ")[1].split()[0])
    stall_ms = int(report.split("stall at the cut: ")[1].split()[0])
    shutil.rmtree(os.path.join(WORK, name), ignore_errors=True)
    return {"held_ms": held, "call_ms": call_ms, "stall_ms": stall_ms}


def freeze(runs=3):
    results = {"frozen": [], "crash": []}
    for k in range(runs):
        for crash in (False, True):
            log("demo snapshot %s %d" % ("crash-consistent" if crash else "frozen", k))
            results["crash" if crash else "frozen"].append(demo_snapshot(crash, k))
    return results


def report(r):
    print("### Results\n")
    s = r.get("stall")
    if s:
        print("Write stall, fio 4k randwrite QD16, %d snapshots during the second run:\n" % s["snapshots"])
        print("| run | IOPS | max ms | p99 ms | p99.9 ms |")
        print("|---|---:|---:|---:|---:|")
        for key, label in (("without", "no snapshots"), ("with", "a snapshot every 2 s")):
            m, p99, p999 = s[key]
            print("| %s | %.0f | %.1f | %.2f | %.2f |" % (label, s["iops_" + key], m, p99, p999))
        (m0, p0, q0), (m1, p1, q1) = s["without"], s["with"]
        print("| ratio | %.2f× | %.2f× | %.2f× | %.2f× |\n" % (
            s["iops_with"] / s["iops_without"], m1 / m0, p1 / p0 if p0 else 0, q1 / q0 if q0 else 0))
        print("Barrier held writes for %s ms per snapshot.\n" % ", ".join(str(p) for p in s["paused_ms"]))
    c = r.get("creation")
    if c:
        print("| snapshot of | median s | runs s | writes held ms |")
        print("|---|---:|---|---|")
        for name, v in c.items():
            print("| %s | %.3f | %s | %s |" % (name, v["median_s"], ", ".join("%.3f" % t for t in v["times_s"]),
                                              ", ".join(str(p) for p in v["paused_ms"])))
        print()
    x = r.get("restore")
    if x:
        print("| restore of %d MiB | s | MiB/s |" % (x["bytes"] // MIB))
        print("|---|---:|---:|")
        print("| by reflink | %.3f | %.0f |" % (x["reflink_s"], x["reflink_mibs"]))
        print("| by copy (publish + full rebuild) | %.2f | %.0f |" % (x["copy_s"], x["copy_mibs"]))
        print("| ratio reflink/copy | | %.0f× |\n" % (x["reflink_mibs"] / x["copy_mibs"]))
    g = r.get("group")
    if g:
        print("Group snapshots (no freeze), fio 4k randwrite QD16 on the first member:\n")
        print("| volumes | writes held, longest member, ms | group create s | fio max ms | fio p99 ms |")
        print("|---:|---|---|---:|---:|")
        for n, v in sorted(g.items(), key=lambda kv: int(kv[0])):
            print("| %s | %s | %s | %.1f | %.2f |" % (
                n, ", ".join(str(h) for h in v["held_ms"]), ", ".join("%.3f" % w for w in v["wall_s"]),
                v["fio_max_ms"], v["fio_p99_ms"]))
        print()
    z = r.get("freeze")
    if z:
        print("PostgreSQL group snapshot under pgbench (`ballast demo snapshot`, scale 5, 4 clients):\n")
        print("| snapshot | writes held per member, ms | CSI call ms | pgbench stall at the cut ms |")
        print("|---|---|---|---|")
        for key, label in (("crash", "crash-consistent"), ("frozen", "freeze + CHECKPOINT pre-hook + post-hook")):
            runs = z[key]
            print("| %s | %s | %s | %s |" % (
                label, "; ".join("/".join(str(h) for h in x["held_ms"]) for x in runs),
                ", ".join(str(x["call_ms"]) for x in runs), ", ".join(str(x["stall_ms"]) for x in runs)))
        med = lambda key, field: statistics.median(x[field] for x in z[key])  # noqa: E731
        print("| ratio frozen/crash (medians) | | %.1f× | %.1f× |\n" % (
            med("frozen", "call_ms") / max(med("crash", "call_ms"), 1),
            med("frozen", "stall_ms") / max(med("crash", "stall_ms"), 1)))
    d = r.get("delta")
    if d:
        print("GetMetadataDelta of %d GiB with %.1f MiB changed: %d ranges, median %.3f s (%s).\n" % (
            d["size_bytes"] // GIB, d["changed_bytes"] / MIB, d["ranges"], d["median_s"],
            ", ".join("%.3f" % t for t in d["times_s"])))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=20, help="seconds per fio run of the stall part")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    ap.add_argument("--parts", default="stall,creation,restore,delta,group,freeze")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop devices and mounts)")
    parts = set(args.parts.split(","))
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    Cluster("main").down()
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    results, failures = {}, []
    cluster = Cluster("main")
    down = True
    try:
        if "freeze" in parts:
            log("freeze")
            results["freeze"] = freeze()
    except Exception as e:  # noqa: BLE001 (report what failed)
        log("failed: %s" % e)
        failures.append(str(e))
    try:
        if not parts - {"freeze"}:
            return finish(results, failures, down)
        cluster.up(3, "24GiB")
        cluster.cli("volume", "create", "v1", "--size", str(GIB), "--replicas", "3", "--thin")
        uri1 = cluster.cli("volume", "publish", "v1", "--node", "node-1").strip()
        if "stall" in parts or "creation" in parts:
            fragment(uri1, GIB)
        if "stall" in parts:
            log("stall")
            results["stall"] = stall(cluster, uri1, args.runtime)
        if "creation" in parts or "delta" in parts:
            cluster.cli("volume", "create", "v10", "--size", str(10 * GIB), "--replicas", "3", "--thin")
            uri10 = cluster.cli("volume", "publish", "v10", "--node", "node-1").strip()
            log("filling 10 GiB")
            fragment(uri10, 10 * GIB)
        if "creation" in parts:
            log("creation")
            results["creation"] = {"1 GiB": creation(cluster, "v1"), "10 GiB": creation(cluster, "v10")}
        if "delta" in parts:
            log("delta")
            results["delta"] = delta(cluster, uri10, 10 * GIB)
        if "restore" in parts:
            log("restore")
            results["restore"] = restores(cluster, 2 * GIB)
        if "group" in parts:
            log("group")
            results["group"] = group_stall(cluster)
    except Exception as e:  # noqa: BLE001 (report what failed)
        log("failed: %s" % e)
        failures.append(str(e))
    finally:
        down = cluster.down()
    return finish(results, failures, down)


def finish(results, failures, down):
    """Writes results.json, prints the tables; removes the pool files of a
    cluster that went down."""
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"results": results, "failures": failures}, f, indent=1, default=str)
    report(results)
    for failure in failures:
        print("\nFAILED: %s" % failure)
    for node in range(1, 4):
        pool = os.path.join(WORK, "main", "node-%d" % node, "pool.img")
        if down and os.path.exists(pool):
            os.remove(pool)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
