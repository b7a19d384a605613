#!/usr/bin/python3
"""Writes rounds of 4 KiB blocks to an NBD export with libnbd, flushing after
each round, and prints "DURABLE <round>" once a round's flush has completed.

Each block is written at most once, so a verifier knows exactly what every
block must hold: rounds up to the last durable one must read back; later
rounds may or may not have landed. Runs until the server goes away.

Usage: nbd_crash_writer.py URI BLOCKS_PER_ROUND ROUNDS
Block b of round r lives at offset (r * BLOCKS_PER_ROUND + b) * 4096 and
holds the bytes of pattern(r, b) (see verify mode: `--verify LAST_DURABLE`).
"""
import sys

import nbd

BLOCK = 4096


def pattern(round_no, block_no):
    head = b"ballast round %08d block %04d " % (round_no, block_no)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def write(uri, per_round, rounds):
    h = nbd.NBD()
    h.connect_uri(uri)
    for r in range(rounds):
        cookies = []
        for b in range(per_round):
            off = (r * per_round + b) * BLOCK
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(r, b))), off))
        # Wait for every write of the round (raising if one failed), then flush.
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            h.aio_command_completed(c)
        h.flush()
        print("DURABLE %d" % r, flush=True)


def verify(uri, per_round, rounds, last_durable):
    h = nbd.NBD()
    h.connect_uri(uri)
    bad = 0
    for r in range(rounds):
        data = h.pread(per_round * BLOCK, r * per_round * BLOCK)
        for b in range(per_round):
            got = data[b * BLOCK:(b + 1) * BLOCK]
            want = pattern(r, b)
            if r <= last_durable:
                ok = got == want
            else:
                ok = got == want or got == bytes(BLOCK)
            if not ok:
                bad += 1
                if bad <= 5:
                    print("round %d block %d holds %r" % (r, b, got[:40]), file=sys.stderr)
    print("BAD %d" % bad, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    uri, per_round, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 5 and sys.argv[4] == "--verify":
        sys.exit(verify(uri, per_round, rounds, int(sys.argv[5])))
    try:
        write(uri, per_round, rounds)
    except nbd.Error as e:
        print("STOPPED %s" % e, flush=True)
        sys.exit(0)
