"""Reusable pieces of the fault tests (tests/test_faults.py).

- `LoadGenerator`: a few client threads posting oracle messages, paced, and
  bounded in count *and* time; every answer is kept as an `Outcome` so a
  test can ask what happened in a time window (e.g. "while Redis was down,
  was every answer a 2xx, and how slow was the slowest?").
- `rss_kib` / `RssSampler`: resident memory of a process from /proc.
- `mount_tmpfs`: a tiny tmpfs (a spool that fills up), unmounted in cleanup,
  or a clear `SkipTest` where mounting is not allowed.
- `metric_values`: relayd's /metrics as ``{sample name: summed value}``.
- `oracle_restricted`: an `Oracle` view that demands only some of the
  acknowledged messages (for a Redis that lost its data on SIGKILL).

`RelaydProcess.post` shares one keep-alive connection and is not
thread-safe, so the load threads each hold their own `http.client`
connection to the ingest port.  Nothing here sleeps to "let things
happen": the only sleeps are pacing of the load (a rate) and backing off a
refused connection while relayd restarts.
"""

from __future__ import annotations

import copy
import errno
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.harness import Oracle, RelaydProcess

#: Per-request socket timeout of the load clients, seconds: longer than any
#: ack_timeout the fault tests configure, so relayd's own 503 comes first.
LOAD_HTTP_TIMEOUT = 15.0
#: Seconds a load thread waits after "connection refused" (relayd restarting)
#: before the next attempt: keeps a dead port from turning into a busy loop.
REFUSED_BACKOFF = 0.02
#: Seconds `LoadGenerator.stop` waits for each thread (a request in flight
#: ends within LOAD_HTTP_TIMEOUT).
JOIN_TIMEOUT = LOAD_HTTP_TIMEOUT + 5.0


@dataclass
class Outcome:
    """One request of the load: when it went out, when and how it ended."""

    cid: str
    n: int
    sent_at: float  # time.monotonic() before the request was written
    done_at: float
    status: int | None  # None: transport error (the message may or may not have arrived)
    content_type: str = ""
    retry_after: str | None = None
    problem: dict[str, Any] | None = None  # the problem document of a non-2xx answer
    error: str = ""

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return self.status is not None and 200 <= self.status < 300

    @property
    def latency(self) -> float:
        """Seconds from send to answer (or error)."""
        return self.done_at - self.sent_at


@dataclass
class LoadStats:
    """Counts over a set of outcomes."""

    total: int = 0
    ok: int = 0
    errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    max_ok_latency: float = 0.0

    def __str__(self) -> str:
        return (
            f"{self.total} requests: {self.ok} 2xx, {self.errors} transport errors, "
            f"statuses {dict(sorted(self.by_status.items()))}, slowest 2xx {self.max_ok_latency:.3f}s"
        )


def stats(outcomes: Iterable[Outcome]) -> LoadStats:
    """Summarise `outcomes`."""
    s = LoadStats()
    for o in outcomes:
        s.total += 1
        if o.status is None:
            s.errors += 1
            continue
        s.by_status[o.status] = s.by_status.get(o.status, 0) + 1
        if o.ok:
            s.ok += 1
            s.max_ok_latency = max(s.max_ok_latency, o.latency)
    return s


class LoadGenerator:
    """`threads` clients posting oracle messages to `path`, paced at `rate` msgs/s in total.

    Bounded: stops after `limit` requests (all threads together) or
    `duration` seconds, whichever comes first, or at `stop()`.  Each message
    is a fresh oracle message (``{"cid", "n", "pad"}`` with `payload_bytes`
    of padding); it is recorded as sent before it goes out and acknowledged
    only after a 2xx, exactly like `Oracle.post`.
    """

    def __init__(
        self,
        oracle: Oracle,
        relayd: RelaydProcess,
        path: str,
        *,
        threads: int = 3,
        rate: float | None = 300.0,
        limit: int = 3000,
        duration: float = 60.0,
        payload_bytes: int = 0,
        keep_alive: bool = True,
    ) -> None:
        self.oracle = oracle
        self.relayd = relayd
        self.path = path
        self.threads = threads
        self.rate = rate
        self.limit = limit
        self.duration = duration
        self.pad = "x" * payload_bytes
        self.keep_alive = keep_alive
        self.outcomes: list[Outcome] = []
        self.crashes: list[str] = []  # unexpected exceptions in a load thread
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._issued = 0
        self._threads: list[threading.Thread] = []
        self._deadline = 0.0

    # -- control -----------------------------------------------------------

    def start(self) -> LoadGenerator:
        """Start the client threads; returns self."""
        self._deadline = time.monotonic() + self.duration
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop all threads and wait for them (each ends within its request timeout)."""
        self._stopping.set()
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            raise AssertionError(f"load threads still running after stop: {alive}")

    @property
    def finished(self) -> bool:
        """True once every thread has ended (limit, duration or stop)."""
        return all(not t.is_alive() for t in self._threads)

    def count(self, predicate: Callable[[Outcome], bool] = lambda o: True) -> int:
        """How many outcomes so far satisfy `predicate` (thread-safe snapshot)."""
        with self._lock:
            return sum(1 for o in self.outcomes if predicate(o))

    def snapshot(self) -> list[Outcome]:
        """A copy of the outcomes so far."""
        with self._lock:
            return list(self.outcomes)

    def between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        """Outcomes of requests *sent* within ``[start, end)`` (monotonic seconds)."""
        return [o for o in self.snapshot() if start <= o.sent_at < end]

    # -- the client threads -------------------------------------------------

    def _take_ticket(self) -> bool:
        with self._lock:
            if self._issued >= self.limit:
                return False
            self._issued += 1
            return True

    def _run(self, index: int) -> None:
        conn: http.client.HTTPConnection | None = None
        per_thread = (self.rate / self.threads) if self.rate else None
        started = time.monotonic()
        k = 0
        try:
            while not self._stopping.is_set() and time.monotonic() < self._deadline and self._take_ticket():
                if per_thread:
                    # Pacing: the k-th request of this thread is due at k / rate.
                    due = started + k / per_thread + index / (per_thread * self.threads)
                    delay = due - time.monotonic()
                    if delay > 0 and self._stopping.wait(delay):
                        break
                k += 1
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.relayd.ingest_port, timeout=LOAD_HTTP_TIMEOUT)
                conn, refused = self._one(conn)
                if refused:
                    self._stopping.wait(REFUSED_BACKOFF)
        except Exception as e:  # noqa: BLE001 - reported by the test, not swallowed
            self.crashes.append(f"{threading.current_thread().name}: {e!r}")
        finally:
            if conn is not None:
                conn.close()

    def _one(self, conn: http.client.HTTPConnection) -> tuple[http.client.HTTPConnection | None, bool]:
        """One request; returns (connection to reuse or None, whether it was refused)."""
        oracle = self.oracle
        cid, body = oracle.new_message(pad=self.pad)
        oracle.send(cid, body)
        data = json.dumps(body).encode()
        sent_at = time.monotonic()
        try:
            conn.request("POST", self.path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException) as e:
            done = time.monotonic()
            conn.close()
            oracle.errors.append(f"{cid}: {e!r}")
            self._record(Outcome(cid, body["n"], sent_at, done, None, error=repr(e)))
            refused = isinstance(e, ConnectionRefusedError) or getattr(e, "errno", None) == errno.ECONNREFUSED
            return None, refused
        done = time.monotonic()
        status = resp.status
        headers = {k.lower(): v for k, v in resp.getheaders()}
        outcome = Outcome(
            cid,
            body["n"],
            sent_at,
            done,
            status,
            content_type=headers.get("content-type", ""),
            retry_after=headers.get("retry-after"),
        )
        if 200 <= status < 300:
            oracle.acknowledge(cid, json.loads(payload)["id"])
        else:
            oracle.rejected.append((cid, status, payload[:300]))
            try:
                outcome.problem = json.loads(payload)
            except ValueError:
                outcome.problem = {"unparsed": payload[:300].decode("utf-8", "replace")}
        self._record(outcome)
        if resp.will_close or not self.keep_alive:
            conn.close()
            return None, False
        return conn, False

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (``VmRSS`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Samples `rss_kib(pid)` every `interval` seconds until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name=f"rss-{pid}")
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        """Sample until `stop` (or the process is gone)."""
        while not self._stopping.is_set():
            try:
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
                self.samples += 1
            except (OSError, AssertionError):
                return
            self._stopping.wait(self.interval)

    def stop(self) -> int:
        """Stop, join, return the peak in KiB."""
        self._stopping.set()
        self.join(5.0)
        return self.peak_kib


# --------------------------------------------------------------------------
# A tiny file system
# --------------------------------------------------------------------------


def mount_tmpfs(test: unittest.TestCase, size: str) -> str:
    """Mount a tmpfs of `size` (e.g. ``"256k"``) on a fresh directory; return it.

    Cleanup (registered on `test`) unmounts and removes it; register this
    *before* the relayd fixture so relayd is killed first (cleanups run
    last-in first-out).  Raises `unittest.SkipTest` with the reason when
    mounting is not permitted (not root, no CAP_SYS_ADMIN, no mount binary).
    """
    path = tempfile.mkdtemp(prefix="relayd-tmpfs-")
    mount = shutil.which("mount")
    if mount is None:
        os.rmdir(path)
        raise unittest.SkipTest("no mount(8) binary: cannot build a tiny file system for the spool")
    proc = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if proc.returncode != 0:
        os.rmdir(path)
        raise unittest.SkipTest(
            f"mount -t tmpfs not permitted here (uid {os.getuid()}): {proc.stderr.strip() or proc.returncode}"
        )

    def unmount() -> None:
        done = subprocess.run(["umount", path], capture_output=True, timeout=10)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True, timeout=10)
        shutil.rmtree(path, ignore_errors=True)

    test.addCleanup(unmount)
    return path


def fs_usage(path: str) -> tuple[int, int]:
    """``(used bytes, total bytes)`` of the file system holding `path`."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total


# --------------------------------------------------------------------------
# Metrics and oracle views
# --------------------------------------------------------------------------


def metric_values(relayd: RelaydProcess) -> dict[str, float]:
    """relayd's /metrics as ``{sample name: value summed over labels}`` (empty if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        status, _headers, body = relayd.get_admin("/metrics", timeout=5.0)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def oracle_restricted(oracle: Oracle, keep: Callable[[str, Any], bool]) -> Oracle:
    """A copy of `oracle` that demands only the acknowledged messages `keep(cid, body)` selects.

    Everything sent stays known (so a message that was not demanded but
    arrives anyway is not "unknown"); payload and id checks apply to every
    item as before.
    """
    view = copy.copy(oracle)
    view.sent = dict(oracle.sent)
    view.acked = {cid: mid for cid, mid in oracle.acked.items() if keep(cid, oracle.sent[cid])}
    view.errors = list(oracle.errors)
    view.rejected = list(oracle.rejected)
    return view
