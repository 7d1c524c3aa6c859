"""Spool throughput: spill (append + group-commit sync) and replay (read + ack).

Usage: python bench/spool_bench.py [--records N] [--size BYTES] [--dir DIR] [--json]

Appends N records of SIZE bytes under fsync="batch", calling sync() every
1000 records (the daemon's group commit: one fsync answers a batch of
requests), reopens the spool (timing recovery's full CRC scan), then reads
and acknowledges everything in batches of 1000 with a sync() every 10
batches.  Also times the fsync policies on a smaller run.  One process, one
core.  DIR defaults to a temporary directory on the current file system
(fsync cost depends entirely on the disk under it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from relayd.spool.record import FRAME_OVERHEAD  # noqa: E402
from relayd.spool.spool import Spool  # noqa: E402

BATCH = 1000  # records per sync() and per read(): the forwarder's batch size
ACK_SYNC_EVERY = 10  # read batches per sync() during replay (cursor persistence)


def spill_and_replay(path: str, records: int, size: int) -> dict:
    """The headline numbers: 1M-record spill then replay under fsync="batch"."""
    payload = os.urandom(size)
    batch = [payload] * BATCH
    sp = Spool.open(path, max_bytes=records * (size + FRAME_OVERHEAD) * 2, fsync="batch")
    syncs = 0
    t0 = time.perf_counter()
    for _ in range(records // BATCH):
        sp.append(batch)
        sp.sync()
        syncs += 1
    t_spill = time.perf_counter() - t0
    sp.close()

    t0 = time.perf_counter()
    sp = Spool.open(path, max_bytes=records * (size + FRAME_OVERHEAD) * 2, fsync="batch")
    t_open = time.perf_counter() - t0
    assert sp.pending_records == records, sp.pending_records

    n = 0
    i = 0
    t0 = time.perf_counter()
    while True:
        recs = sp.read(BATCH, 1 << 30)
        if not recs:
            break
        n += len(recs)
        sp.ack(recs[-1][0])
        i += 1
        if i % ACK_SYNC_EVERY == 0:
            sp.sync()
    sp.sync()
    t_replay = time.perf_counter() - t0
    assert n == records and sp.pending_records == 0
    sp.close()
    mb = records * size / 1e6
    return {
        "records": records,
        "payload_bytes": size,
        "spill_msgs_per_s": records / t_spill,
        "spill_MB_per_s": mb / t_spill,
        "spill_seconds": t_spill,
        "syncs": syncs,
        "open_scan_seconds": t_open,
        "replay_msgs_per_s": records / t_replay,
        "replay_MB_per_s": mb / t_replay,
        "replay_seconds": t_replay,
    }


def policy_costs(base: str, size: int) -> dict:
    """msgs/s per fsync policy, appending batches of 1 and of 100 records."""
    payload = os.urandom(size)
    out = {}
    for policy in ("always", "batch", "never"):
        for per_append in (1, 100):
            total = 2000 if per_append == 1 else 100_000
            path = os.path.join(base, "%s-%d" % (policy, per_append))
            sp = Spool.open(path, max_bytes=1 << 34, fsync=policy)
            batch = [payload] * per_append
            t0 = time.perf_counter()
            for _ in range(total // per_append):
                sp.append(batch)
                if policy == "batch":
                    sp.sync()  # group commit once per append call
            dt = time.perf_counter() - t0
            sp.close()
            shutil.rmtree(path)
            out["%s/%d" % (policy, per_append)] = total / dt
    return out


def main() -> int:
    """Run the benchmark and print the numbers."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--dir", default=None, help="parent directory for the scratch spool")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
    try:
        result = spill_and_replay(os.path.join(base, "main"), args.records, args.size)
        result["policies_msgs_per_s"] = policy_costs(base, args.size)
        result["python"] = sys.version.split()[0]
        result["implementation"] = sys.implementation.name
    finally:
        shutil.rmtree(base, True)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print("spill  (append + sync/1000): %9.0f msgs/s  %6.1f MB/s  (%d syncs)" % (
            result["spill_msgs_per_s"], result["spill_MB_per_s"], result["syncs"]))
        print("open   (recovery scan):      %9.2f s for %d records" % (result["open_scan_seconds"], args.records))
        print("replay (read + ack):         %9.0f msgs/s  %6.1f MB/s" % (
            result["replay_msgs_per_s"], result["replay_MB_per_s"]))
        for k, v in result["policies_msgs_per_s"].items():
            print("policy %-12s            %9.0f msgs/s" % (k, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
