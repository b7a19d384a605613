#!/usr/bin/env python3
"""Ballast data-plane benchmark: fio jobs side by side, in one run, against

  raw      the replica's file through fio's io_uring engine, O_DIRECT
           (the physical limit of this machine's storage path),
  nbdkit   nbdkit's file plugin serving the same file (a mature C NBD server),
  ballast  the agent's NBD export of that replica.

Prints one Markdown table with IOPS, bandwidth, mean and p99 completion
latency per job and target, and the ratios ballast/nbdkit and ballast/raw;
then the agent's peak RSS while serving 4 exports under load.

Run as root from the repository root: `sudo tests/bench/run.py [--runtime S]`.
This machine is shared and noisy: compare ratios within one run, not
absolute numbers across runs.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
JOBS = ["randread-4k", "randwrite-4k", "write-fsync-4k", "seqwrite-1m"]
WORK = "/var/tmp/ballast-bench"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, pool_bytes):
        self.addr = "127.0.0.1:%d" % free_port()
        self.log = open(os.path.join(WORK, "agent.log"), "w")
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, "target/release/ballast-agent"), "--state-dir", os.path.join(WORK, "state"),
             "--grpc-listen", self.addr, "--pool-file", os.path.join(WORK, "pool.img"),
             "--pool-size", str(pool_bytes)],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit("agent exited; see %s/agent.log" % WORK)
            if subprocess.run(self.cli_args("pool", "list"), capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        sys.exit("agent not ready after 60 s")

    def cli_args(self, *args):
        return [os.path.join(ROOT, "target/release/ballast"), "--agent", "http://" + self.addr, *args]

    def cli(self, *args):
        return sh(*self.cli_args(*args))

    def rss_kib(self, field="VmRSS"):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def fio(job, target_args, runtime, size):
    out = sh("fio", os.path.join(ROOT, "tests/bench/jobs", job + ".fio"), "--output-format=json",
             "--time_based", "--runtime=%d" % runtime, "--ramp_time=2", "--size=%d" % size,
             "--group_reporting", *target_args)
    report = json.loads(out[out.index("{"):])
    j = report["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    clat = side["clat_ns"]
    p99 = clat.get("percentile", {}).get("99.000000", 0)
    if j["error"]:
        sys.exit("fio %s failed with error %s" % (job, j["error"]))
    # For fsync jobs the latency that matters includes the flush.
    sync = j.get("sync", {}).get("lat_ns", {})
    mean = clat["mean"] + (sync.get("mean", 0) if sync else 0)
    return {"iops": side["iops"], "bw": side["bw_bytes"], "mean_us": mean / 1000, "p99_us": p99 / 1000}


def drop_cache(path):
    """Writes back and evicts the page cache of `path`.

    nbdkit's file plugin does buffered I/O on the same file that raw and
    Ballast open with O_DIRECT. Left alone, its cached and dirty pages would
    tax the next target: an O_DIRECT write must first write back and
    invalidate any cached page in its range, and io_uring cannot do that
    without blocking, so every such write is punted to a kernel worker
    thread. Every target therefore starts with none of the file cached.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=15, help="seconds per fio job (default 15)")
    ap.add_argument("--size", default=2 << 30, type=int, help="replica size in bytes (default 2 GiB)")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma-separated jobs to run (default: all)")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS measurement")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (loop devices and mounts)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--bins"], cwd=ROOT, check=True)
    shutil.rmtree(WORK, ignore_errors=True)
    os.makedirs(WORK)
    agent = Agent(4 * args.size + (2 << 30))
    nbdkit = None
    try:
        agent.cli("replica", "create", "bench", "--size", str(args.size))
        replica = [r for r in json.loads(agent.cli("-o", "json", "replica", "list")) if r["name"] == "bench"][0]
        path = replica["path"]
        # Fill the file once so reads hit written data, never holes.
        sh("fio", "--name=fill", "--ioengine=io_uring", "--direct=1", "--rw=write", "--bs=1m",
           "--iodepth=8", "--filename=" + path, "--size=%d" % args.size)
        sock = os.path.join(WORK, "ballast.sock")
        uri = agent.cli("export", "start", "bench", "--socket", sock).strip()
        nbdkit_sock = os.path.join(WORK, "nbdkit.sock")
        nbdkit = subprocess.Popen(["nbdkit", "-f", "-U", nbdkit_sock, "file", path],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(nbdkit_sock):
            time.sleep(0.1)
        targets = {
            "raw": ["--ioengine=io_uring", "--direct=1", "--filename=" + path],
            "nbdkit": ["--ioengine=nbd", "--uri=nbd+unix:///?socket=" + nbdkit_sock],
            "ballast": ["--ioengine=nbd", "--uri=" + uri],
        }
        results = {}
        jobs = [j for j in args.jobs.split(",") if j]
        for job in jobs:
            if job not in JOBS:
                sys.exit("unknown job %s (jobs: %s)" % (job, ", ".join(JOBS)))
            for name, targs in targets.items():
                print("running %s on %s" % (job, name), file=sys.stderr, flush=True)
                drop_cache(path)
                results[(job, name)] = fio(job, targs, args.runtime, args.size)

        print("| job | target | IOPS | MiB/s | mean µs | p99 µs | ballast/nbdkit | ballast/raw |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for job in jobs:
            b = results[(job, "ballast")]
            for name in targets:
                r = results[(job, name)]
                ratios = ("", "")
                if name == "ballast":
                    ratios = ("%.2f×" % (b["iops"] / results[(job, "nbdkit")]["iops"]),
                              "%.2f×" % (b["iops"] / results[(job, "raw")]["iops"]))
                print("| %s | %s | %.0f | %.1f | %.0f | %.0f | %s | %s |" % (
                    job, name, r["iops"], r["bw"] / 2**20, r["mean_us"], r["p99_us"], *ratios))
        print("\nRatios are of IOPS (higher is better for Ballast).")

        if args.no_rss:
            return
        # Memory: 4 exports under concurrent random-write load.
        agent.cli("export", "stop", "bench")
        uris = []
        for i in range(4):
            agent.cli("replica", "create", "rss%d" % i, "--size", str(512 << 20), "--thin")
            uris.append(agent.cli("export", "start", "rss%d" % i, "--socket",
                                  os.path.join(WORK, "rss%d.sock" % i)).strip())
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], agent.rss_kib())
                time.sleep(0.2)

        t = threading.Thread(target=sample)
        t.start()
        procs = [subprocess.Popen(["fio", "--name=rss", "--ioengine=nbd", "--uri=" + u, "--rw=randrw",
                                   "--bsrange=4k-1m", "--iodepth=32", "--numjobs=2", "--size=512M",
                                   "--time_based", "--runtime=%d" % args.runtime],
                                  stdout=subprocess.DEVNULL) for u in uris]
        for p in procs:
            p.wait()
        done.set()
        t.join()
        print("\nAgent RSS serving 4 exports (8 connections, iodepth 32, 4k-1M random read/write): "
              "peak sampled %.1f MiB, VmHWM %.1f MiB" % (peak[0] / 1024, agent.rss_kib("VmHWM") / 1024))
    finally:
        if nbdkit:
            nbdkit.terminate()
        agent.stop()
        subprocess.run(["umount", "-l", os.path.join(WORK, "state/pools/pool")], capture_output=True)
        for line in sh("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith(WORK):
                subprocess.run(["losetup", "-d", parts[0]], capture_output=True)


if __name__ == "__main__":
    main()
