"""Fault tests: a real relayd and a real Redis, broken on purpose, judged by the oracle.

Every test runs ``twistd -n relayd`` and ``redis-server`` as child processes
(tests/harness.py), puts them under load from a few client threads
(tests/fault_tools.py: paced, bounded in count and in time), breaks
something (Redis SIGKILLed or SIGSTOPped, relayd SIGKILLed or SIGTERMed, the
spool's file system full) and then asks the `Oracle`: every message
acknowledged with a 2xx is in Redis, nothing is there that was never sent,
payloads and ids are exactly what was sent and acknowledged, and
duplicates stay within the bound each test states and justifies.

The harness's Redis keeps no data across a SIGKILL (no AOF, no RDB, and
`RedisServer` takes no extra arguments), so a test that kills Redis demands
only the messages *sent after the kill* (whose only copy is relayd's spool)
and says so; what was acknowledged before the kill is checked before it.

Outages are scaled down for CI (production runbooks speak of 30 s; here
`OUTAGE_SECONDS`): the code paths are the same after the first second, and
the whole file has to run in a few minutes on two cores.  Each test prints
what it measured (counts, replay time, latencies, RSS); run pytest with
``-s`` to see it.
"""

from __future__ import annotations

import signal
import time
import unittest
from typing import Any

from tests.fault_tools import (
    LoadGenerator,
    Outcome,
    RssSampler,
    metric_values,
    mount_tmpfs,
    oracle_restricted,
    rss_kib,
    stats,
)
from tests.harness import Oracle, RedisServer, RelaydProcess, decode_item, wait_for

#: How long Redis stays dead or frozen.  The scenario is a 30 s outage; 5 s
#: exercises the same paths (spill, group commit, replay) in CI time.
OUTAGE_SECONDS = 5.0
#: Messages per second offered by the load threads together: enough to keep
#: the spool, the commit loop and the replay busy, few enough that a test
#: posts a few thousand messages at most.
LOAD_RATE = 300.0
#: Requests the load must have had answered from within an outage before it
#: ends: half of what LOAD_RATE offers in OUTAGE_SECONDS.  On a loaded box
#: the client threads fall behind their pace, so an outage lasts until this
#: many went through (at least OUTAGE_SECONDS, at most OUTAGE_MAX_SECONDS)
#: instead of failing "too little load" after a fixed 5 s.
OUTAGE_MIN_REQUESTS = int(LOAD_RATE * OUTAGE_SECONDS * 0.5)
#: Longest an outage is held waiting for OUTAGE_MIN_REQUESTS.
OUTAGE_MAX_SECONDS = 30.0
#: Client threads of the load.
LOAD_THREADS = 3
#: Hard cap on requests per load generator (a runaway loop ends here).
LOAD_LIMIT = 6000
#: Hard cap on the seconds a load generator runs.
LOAD_DURATION = 60.0
#: Seconds for acknowledged messages to show up in Redis after it returns;
#: replaying a few thousand spooled records takes well under a second.
ARRIVAL_TIMEOUT = 30.0
#: relayd's default [redis] reply_timeout, which the frozen-Redis test keeps
#: (it used to lower it to 0.5 s, and so never saw a batch wait out the old
#: 5 s default through a 4 s freeze).
DEFAULT_REPLY_TIMEOUT = 1.0
#: Times relayd is SIGKILLed in the crash-loop test.
KILLS = 3
#: Acknowledged messages each relayd incarnation must take before its kill.
ACKS_PER_LIFE = 150
#: Size of the tiny spool file system.
TINY_FS = "256k"
#: [spool] max_bytes of the capped-spool test.
TINY_SPOOL_MAX_BYTES = "256KiB"
#: The slowest answer a stored request may get while Redis is down or frozen:
#: the 1 s reply timeout (frozen) plus a spill and an fsync, with room for a
#: loaded 2-core CI box.  The 10 s ack timeout must never be what answers.
STORED_BOUND = 2.5
#: 503s to see before calling the spool full for good.
FULL_503S = 100
#: [buffer] max_messages of the memory test.
MEMORY_BUFFER_MESSAGES = 200
#: Padding per message in the memory test: 4000 of them are ~100 MiB, so a
#: relayd that kept them would blow through MEMORY_GROWTH_BOUND.
MEMORY_PAYLOAD = 24 * 1024
#: Requests of the memory test.
MEMORY_REQUESTS = 4000
#: RSS growth allowed over the start (KiB): the buffer holds at most
#: 200 x ~24 KiB = ~5 MiB; the rest is allocator slack and HTTP buffers.
MEMORY_GROWTH_BOUND = 100 * 1024


class FaultTestCase(unittest.TestCase):
    """Shared fixtures and checks."""

    redis: RedisServer
    relayd: RelaydProcess

    def start(self, routes: list[dict[str, Any]], **relayd_kw: Any) -> None:
        """Start Redis and relayd (ready) with `routes`."""
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(self, routes=routes, redis_url=self.redis.url, **relayd_kw)

    def load(self, oracle: Oracle, path: str, **kw: Any) -> LoadGenerator:
        """Start a load generator on `path`; it is stopped in cleanup at the latest."""
        options: dict[str, Any] = {
            "threads": LOAD_THREADS,
            "rate": LOAD_RATE,
            "limit": LOAD_LIMIT,
            "duration": LOAD_DURATION,
        }
        options.update(kw)
        gen = LoadGenerator(oracle, self.relayd, path, **options)
        self.addCleanup(gen.stop)
        return gen.start()

    def hold(self, seconds: float, what: str) -> None:
        """Keep a fault in place for `seconds`, failing at once if relayd dies meanwhile.

        The duration is the scenario (an outage of that length), not a wait
        for something to happen; relayd's liveness is polled throughout.
        """
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not self.relayd.alive():
                self.fail(f"relayd exited during {what}; log tail:\n{self.relayd.log_tail()}")
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))

    def hold_outage(self, gen: LoadGenerator, since: float, what: str) -> None:
        """Hold an outage that began at `since` for OUTAGE_SECONDS, and then on until the load
        has had OUTAGE_MIN_REQUESTS answered from within it (at most OUTAGE_MAX_SECONDS in all).

        The client threads share a loaded box with relayd and fall behind their
        pace there; the test needs that much load *during* the outage, so it
        waits for it rather than asserting the generator's speed.  The
        "too little load" assertion stays, for a load that never comes.
        """
        self.hold(OUTAGE_SECONDS - (time.monotonic() - since), what)
        enough = lambda: len(gen.between(since)) >= OUTAGE_MIN_REQUESTS  # noqa: E731
        while not enough() and time.monotonic() - since < OUTAGE_MAX_SECONDS:
            self.hold(0.1, what)

    def wait_acked(self, oracle: Oracle, n: int, timeout: float, what: str) -> None:
        """Wait for `n` acknowledged messages; on timeout show the oracle and the log."""
        try:
            wait_for(lambda: len(oracle.acked) >= n, timeout, what)
        except AssertionError as e:
            raise AssertionError(
                f"{e}: {len(oracle.acked)} acked, rejected {oracle.rejected[-3:]}, errors {oracle.errors[-3:]}; "
                f"log tail:\n{self.relayd.log_tail()}"
            ) from None

    def wait_arrival(self, oracle: Oracle, list_key: str, timeout: float = ARRIVAL_TIMEOUT) -> float:
        """Wait until every message `oracle` demands is in Redis; return the seconds it took."""
        started = time.monotonic()
        try:
            wait_for(
                lambda: oracle.all_acknowledged_in(self.redis, list_key), timeout, "acknowledged messages in Redis"
            )
        except AssertionError as e:
            have = oracle.cids_in(self.redis, list_key)
            missing = sorted(set(oracle.acked) - have)
            raise AssertionError(
                f"{e}: {len(missing)} of {len(oracle.acked)} missing (e.g. {missing[:3]}); "
                f"metrics {self.spool_metrics()}; log tail:\n{self.relayd.log_tail()}"
            ) from None
        return time.monotonic() - started

    def spool_metrics(self) -> dict[str, float]:
        """The spill/replay counters and gauges relayd exports (empty if it is down)."""
        values = metric_values(self.relayd)
        keys = (
            "relayd_spilled_total",
            "relayd_replayed_total",
            "relayd_spool_messages",
            "relayd_spool_errors_total",
            "relayd_redis_errors_total",
            "relayd_spill_mode",
            "relayd_buffer_messages",
        )
        return {k.replace("relayd_", ""): values[k] for k in keys if k in values}

    def log_lines(self, *words: str, last: int = 6) -> list[str]:
        """The last `last` relayd log lines containing any of `words` (timestamps cut)."""
        lines = [line for line in self.relayd.log_text().splitlines() if any(w in line for w in words)]
        return [line.split(" ", 2)[-1] for line in lines[-last:]]

    def duplicate_cids(self, list_key: str) -> dict[str, int]:
        """``{cid: copies}`` for cids that are in the list more than once (list left as is)."""
        seen: dict[str, int] = {}
        for item in self.redis.items(list_key):
            _envelope, body = decode_item(item)
            if isinstance(body, dict) and isinstance(body.get("cid"), str):
                seen[body["cid"]] = seen.get(body["cid"], 0) + 1
        return {cid: n for cid, n in seen.items() if n > 1}

    def assert_all_2xx(self, outcomes: list[Outcome], what: str) -> None:
        """Every outcome is a 2xx; the failure lists the first few others."""
        bad = [o for o in outcomes if not o.ok]
        if bad:
            sample = [(o.cid, o.status, o.error or (o.problem or {}).get("detail")) for o in bad[:5]]
            self.fail(f"{what}: {len(bad)} of {len(outcomes)} requests not 2xx, e.g. {sample}; {stats(outcomes)}")

    def assert_problem_503(self, o: Outcome) -> None:
        """A 503 answer is problem+json with Retry-After."""
        self.assertEqual(o.content_type.split(";")[0].strip(), "application/problem+json", o)
        self.assertIsNotNone(o.retry_after, f"503 without Retry-After: {o}")
        assert o.retry_after is not None
        self.assertTrue(o.retry_after.strip().isdigit(), f"Retry-After {o.retry_after!r}")
        self.assertEqual((o.problem or {}).get("status"), 503, o.problem)


class RedisKilledTests(FaultTestCase):
    """1. Redis SIGKILLed under load, for `OUTAGE_SECONDS`, then started again."""

    def test_stored_acks_survive_redis_outage(self) -> None:
        """Redis is SIGKILLed under load on an ack = "stored" route: every request keeps getting
        a 2xx (the spool takes them), and after Redis restarts every message acknowledged
        during the outage is in Redis.

        This Redis loses its data on SIGKILL (no AOF; the harness passes
        ``--appendonly no``), so messages acknowledged *before* the kill are
        checked in a first phase (load, stop, check, drain), and the second
        phase demands only messages sent after the kill.
        """
        self.start([{"path": "/leads", "list": "leads", "ack": "stored"}])
        # Phase 1: the normal path under the same load; proves the baseline, then empties Redis.
        warm = Oracle(route="/leads")
        gen = self.load(warm, "/leads", limit=300)
        wait_for(lambda: gen.finished, 20.0, "warm-up load to finish")
        gen.stop()
        self.assert_all_2xx(gen.snapshot(), "warm-up with Redis up")
        self.wait_arrival(warm, "leads")
        warm.assert_ok(self, self.redis, "leads")

        # Phase 2: kill Redis under load.
        oracle = Oracle(route="/leads")
        gen = self.load(oracle, "/leads")
        self.wait_acked(oracle, 200, 20.0, "200 acknowledged before the kill")
        self.redis.kill()
        killed_at = time.monotonic()
        self.hold_outage(gen, killed_at, "the Redis outage")
        outage_seconds = time.monotonic() - killed_at
        outage = gen.between(killed_at)
        during = self.spool_metrics()
        self.redis.restart()
        # Replay time: until everything acknowledged during the outage is in Redis
        # (the load keeps going meanwhile: it exercises the spill -> direct switch).
        spooled = {o.cid for o in outage if o.ok}
        replay_seconds = self.wait_arrival(oracle_restricted(oracle, lambda cid, _body: cid in spooled), "leads")
        self.wait_acked(oracle, len(oracle.acked) + 300, 20.0, "300 more acknowledged after Redis returned")
        gen.stop()

        after_kill = {o.cid for o in gen.between(killed_at)}
        demanded = oracle_restricted(oracle, lambda cid, _body: cid in after_kill)
        self.wait_arrival(demanded, "leads")
        everything = gen.snapshot()
        self.assertGreaterEqual(len(outage), OUTAGE_MIN_REQUESTS, f"too little load: {stats(outage)}")
        self.assert_all_2xx(outage, "requests sent while Redis was dead")
        self.assert_all_2xx(everything, "requests of the whole run")
        # Duplicates: only a replay batch whose LPUSH reply was lost can repeat; Redis
        # was restarted before any replay, so at most one replay batch (1000 records).
        report = demanded.assert_ok(self, self.redis, "leads", max_duplicates=1000)
        print(
            f"\n[redis killed {outage_seconds:.1f}s] outage: {stats(outage)}; metrics during outage {during}; "
            f"{len(demanded.acked)} demanded acks all arrived; the {len(spooled)} "
            f"spooled during the outage were in Redis {replay_seconds:.2f}s after its restart; {report.items} items, {report.duplicates} dup(s)"
        )


class RedisFrozenTests(FaultTestCase):
    """2. Redis SIGSTOPped under load: reply timeouts make relayd spill."""

    def test_frozen_redis_spills_within_bound(self) -> None:
        """Redis is SIGSTOPped (sockets open, no replies) under load on an ack = "stored" route with
        relayd's default config: every request still gets a 2xx, each within STORED_BOUND
        (< ack_timeout), because a batch on the wire fails after the 1 s reply timeout and
        spills; after SIGCONT every acknowledged message is in Redis.

        Redis keeps its data across SIGSTOP, so this checks *every* ack.
        Duplicate bound: only messages of batches on the wire when Redis
        froze may repeat (an LPUSH that timed out on relayd's side still runs
        when Redis wakes up, and its messages were spilled too), so only
        messages sent within a reply timeout (+0.5 s) of SIGSTOP; and no
        message has more copies than push attempts that fit in the freeze.
        """
        self.start([{"path": "/leads", "list": "leads", "ack": "stored"}])
        oracle = Oracle(route="/leads")
        gen = self.load(oracle, "/leads")
        self.wait_acked(oracle, 200, 20.0, "200 acknowledged before the freeze")
        self.redis.pause()
        paused_at = time.monotonic()
        self.hold_outage(gen, paused_at, "the Redis freeze")
        freeze_seconds = time.monotonic() - paused_at
        frozen = gen.between(paused_at)
        during = self.spool_metrics()
        self.redis.resume()
        resumed_at = time.monotonic()
        self.wait_acked(oracle, len(oracle.acked) + 300, 20.0, "300 more acknowledged after SIGCONT")
        gen.stop()

        catch_up = self.wait_arrival(oracle, "leads")
        everything = gen.snapshot()
        self.assertGreaterEqual(len(frozen), OUTAGE_MIN_REQUESTS, f"too little load: {stats(frozen)}")
        self.assert_all_2xx(everything, "requests around a frozen Redis")
        slow = [o for o in everything if o.latency >= STORED_BOUND]
        self.assertEqual(
            [(o.cid, round(o.latency, 3), o.status) for o in slow[:5]],
            [],
            f"{len(slow)} requests took >= {STORED_BOUND}s",
        )
        sent_at = {o.cid: o.sent_at for o in everything}
        dups = self.duplicate_cids("leads")
        late = sorted(cid for cid in dups if sent_at.get(cid, 0.0) >= resumed_at)
        self.assertEqual(late[:5], [], f"{len(late)} messages sent after SIGCONT were pushed twice")
        # Only batches on the wire when Redis froze can run twice (once on thaw, once from the
        # spool): sent at most one reply timeout before the freeze, or during the reply timeout
        # after it, before relayd saw the timeout and stopped writing to the frozen Redis.
        window = DEFAULT_REPLY_TIMEOUT + 0.5
        outside = sorted(round(sent_at[cid] - paused_at, 2) for cid in dups if abs(sent_at[cid] - paused_at) > window)
        self.assertEqual(outside[:5], [], f"{len(outside)} duplicates sent outside +-{window}s of SIGSTOP")
        in_window = sum(1 for o in everything if abs(o.sent_at - paused_at) <= window)
        offsets = sorted(sent_at[cid] - paused_at for cid in dups)
        copies = sorted(set(dups.values()))
        dup_note = (
            f"dups sent {offsets[0]:+.2f}..{offsets[-1]:+.2f}s around SIGSTOP, copies {copies}" if dups else "no dups"
        )
        # Each push attempt to the frozen Redis costs at least one reply timeout,
        # so no message can have more copies than attempts that fit in the freeze.
        max_copies = 1 + int((resumed_at - paused_at) / DEFAULT_REPLY_TIMEOUT) + 1
        self.assertLessEqual(max(dups.values(), default=1), max_copies, "more copies than push attempts")
        report = oracle.assert_ok(self, self.redis, "leads", max_duplicates=in_window)
        print(
            f"\n[redis frozen {freeze_seconds:.1f}s, reply_timeout {DEFAULT_REPLY_TIMEOUT}s] frozen: {stats(frozen)}; "
            f"whole run: {stats(everything)}; metrics while frozen {during}; all {len(oracle.acked)} acks arrived "
            f"{catch_up:.2f}s after load stopped; {report.items} items, {report.duplicates} dup(s) ({dup_note}); log: {self.log_lines('redis', 'spill')}"
        )


class CrashLoopTests(FaultTestCase):
    """3. relayd SIGKILLed repeatedly under load while Redis is down."""

    def test_repeated_sigkill_with_redis_down(self) -> None:
        """With Redis dead, relayd is SIGKILLed KILLS times under load on an ack = "stored"
        route and restarted each time (same config, same spool dir); then Redis
        starts: every acknowledged message of every incarnation is in Redis.

        Duplicate bound: 0.  At-least-once allows a repeat only for a record
        that was pushed to Redis but whose spool cursor was not yet durable;
        Redis is down for all the kills, so nothing is pushed before the last
        start, and that start is not interrupted.
        """
        self.start([{"path": "/leads", "list": "leads", "ack": "stored"}])
        self.redis.kill()
        oracle = Oracle(route="/leads")
        gen = self.load(oracle, "/leads")
        restarts: list[float] = []
        for i in range(KILLS):
            self.wait_acked(oracle, len(oracle.acked) + ACKS_PER_LIFE, 20.0, f"{ACKS_PER_LIFE} acks in life {i + 1}")
            self.relayd.kill()
            started = time.monotonic()
            self.relayd.start()  # waits for /readyz 200: the spool can take messages
            restarts.append(time.monotonic() - started)
        self.wait_acked(oracle, len(oracle.acked) + ACKS_PER_LIFE, 20.0, "acks after the last restart")
        gen.stop()
        spooled = self.spool_metrics()
        self.redis.restart()
        replay = self.wait_arrival(oracle, "leads")
        s = stats(gen.snapshot())
        self.assertEqual(gen.crashes, [])
        # Besides transport errors at the kills, only 2xx: no 5xx with a spool that has room.
        self.assertEqual(set(s.by_status) - {200, 201, 202}, set(), f"unexpected statuses: {s}")
        report = oracle.assert_ok(self, self.redis, "leads", max_duplicates=0)
        print(
            f"\n[{KILLS}x SIGKILL, redis down] load: {s}; restarts took {[round(r, 2) for r in restarts]}s; "
            f"spool before Redis returned {spooled}; {len(oracle.acked)} acks replayed in {replay:.2f}s; "
            f"{report.items} items, {report.duplicates} dup(s)"
        )


class TinySpoolTests(FaultTestCase):
    """4. The spool fills up while Redis is down: its file system (a 256 KiB tmpfs), or ``max_bytes``."""

    def test_full_filesystem_answers_promptly_and_recovers(self) -> None:
        """The spool on a 256 KiB tmpfs (ENOSPC), Redis dead: see `check_full_spool`."""
        self.check_full_spool(mount_tmpfs(self, TINY_FS), {})

    def test_spool_max_bytes_answers_promptly_and_recovers(self) -> None:
        """The spool capped by ``[spool] max_bytes`` on a roomy disk, Redis dead: see `check_full_spool`."""
        self.check_full_spool(None, {"max_bytes": TINY_SPOOL_MAX_BYTES})

    def check_full_spool(self, spool_dir: str | None, spool: dict[str, Any]) -> None:
        """Stored POSTs of ~900 B get 2xx until the spool is full, then 503 problem+json with
        Retry-After; every answer comes within STORED_BOUND (the default 10 s ack timeout is never
        what answers: no ``store-timeout`` at all); never a 2xx for a message that was not stored,
        and a 503 that says nothing was stored enqueued nothing (both proved once Redis returns);
        relayd stays alive, and after Redis returns and the spool drains, POSTs get 2xx again
        without anyone touching relayd.
        """
        self.start([{"path": "/leads", "list": "leads", "ack": "stored"}], spool_dir=spool_dir, spool=spool)
        self.redis.kill()
        oracle = Oracle(route="/leads")
        gen = self.load(oracle, "/leads", payload_bytes=900)
        try:
            wait_for(lambda: gen.count(lambda o: o.status == 503) >= FULL_503S, 30.0, f"{FULL_503S} 503s")
        except AssertionError as e:
            raise AssertionError(f"{e}; {stats(gen.snapshot())}; log tail:\n{self.relayd.log_tail()}") from None
        self.assertTrue(self.relayd.alive(), f"relayd died on a full spool; log tail:\n{self.relayd.log_tail()}")
        self.assertEqual(self.relayd.get_admin("/healthz", timeout=5.0)[0], 200)
        ready_status = self.relayd.get_admin("/readyz", timeout=5.0)[0]
        full = self.spool_metrics()
        gen.stop()
        outcomes = gen.snapshot()
        s = stats(outcomes)
        self.assertEqual(gen.crashes, [])
        self.assertEqual(s.errors, 0, f"transport errors on a full spool: {oracle.errors[:3]}")
        self.assertEqual(set(s.by_status) - {200, 503}, set(), f"unexpected statuses: {s}")
        self.assertGreater(s.ok, 0, "nothing was spooled before the spool filled")
        reasons: dict[str, int] = {}
        for o in outcomes:
            if o.status == 503:
                self.assert_problem_503(o)
                key = str((o.problem or {}).get("type", "?")).rsplit("/", 1)[-1]
                reasons[key] = reasons.get(key, 0) + 1
        slow = sorted((round(o.latency, 2), o.status) for o in outcomes if o.latency > STORED_BOUND)
        self.assertEqual(slow[:5], [], f"{len(slow)} answers slower than {STORED_BOUND}s; 503 kinds {reasons}")
        self.assertNotIn("store-timeout", reasons, "the ack timeout answered: a request hung")
        self.assertEqual(ready_status, 503, "/readyz must say what ingest does: nothing can store")

        self.redis.restart()
        replay = self.wait_arrival(oracle, "leads")
        wait_for(
            lambda: self.spool_metrics().get("spool_messages") == 0 and self.spool_metrics().get("spill_mode") == 0,
            ARRIVAL_TIMEOUT,
            "the spool to drain and relayd to leave spill mode",
        )
        # Recovery by itself: a POST gets a 2xx again, and then every POST does.
        recovered_at = time.monotonic()

        def post_ok() -> bool:
            resp = oracle.post(self.relayd, "/leads", timeout=10.0)
            return resp is not None and 200 <= resp[0] < 300

        wait_for(post_ok, 20.0, "a 2xx after Redis returned and the spool drained")
        recovery = time.monotonic() - recovered_at
        for i in range(20):
            resp = oracle.post(self.relayd, "/leads", timeout=10.0)
            self.assertTrue(resp is not None and 200 <= resp[0] < 300, f"post {i} after recovery: {resp}")
        self.wait_arrival(oracle, "leads")
        self.assertTrue(self.relayd.alive())

        # Only "store-failed" (an fsync failed after the write) may have stored something.
        answered_503 = {o.cid for o in outcomes if o.status == 503 and "store-failed" not in str(o.problem)}
        present = oracle.cids_in(self.redis, "leads")
        with self.subTest("a 503 that says nothing was stored enqueued nothing"):
            self.assertEqual(sorted(answered_503 & present)[:5], [], f"{len(answered_503 & present)} 503'd present")
        report = oracle.assert_ok(self, self.redis, "leads", max_duplicates=0)
        print(
            f"\n[full spool {spool or TINY_FS}] load: {s}; 503 kinds {reasons}; slowest "
            f"{max(o.latency for o in outcomes):.3f}s; metrics when full {full}; replayed in {replay:.2f}s; "
            f"first 2xx {recovery:.2f}s after drain; {report.items} items, {report.duplicates} dup(s)"
        )


class GracefulStopTests(FaultTestCase):
    """5. SIGTERM under load with Redis down, ack = "accepted"."""

    def test_sigterm_under_load_with_redis_down(self) -> None:
        """Redis dead, ack = "accepted" route under load: SIGTERM makes relayd exit 0 (it spools
        what it holds in memory); restarted with Redis up, every acknowledged message
        is in Redis.

        Duplicate bound: 0 (no crash and no failed push anywhere: Redis is
        down until after the stop and up for the whole replay).
        """
        self.start([{"path": "/events", "list": "events", "ack": "accepted"}])
        self.redis.kill()
        oracle = Oracle(route="/events")
        gen = self.load(oracle, "/events")
        self.wait_acked(oracle, 1000, 20.0, "1000 acknowledged with Redis down")
        sigterm_at = time.monotonic()
        self.relayd.signal(signal.SIGTERM)
        code = self.relayd.wait(60.0)
        stop_seconds = time.monotonic() - sigterm_at
        gen.stop()
        self.assertEqual(code, 0, f"exit status {code}; log tail:\n{self.relayd.log_tail()}")
        outcomes = gen.snapshot()
        before = [o for o in outcomes if o.done_at < sigterm_at]
        self.assert_all_2xx(before, "requests answered before SIGTERM")
        after = stats(o for o in outcomes if o.done_at >= sigterm_at)
        self.assertEqual(set(after.by_status) - {200, 201, 202, 503}, set(), f"after SIGTERM: {after}")
        stop_log = [line for line in self.relayd.log_text().splitlines() if "spool" in line or "shutdown" in line]

        self.redis.restart()
        self.relayd.start()
        replay = self.wait_arrival(oracle, "events")
        report = oracle.assert_ok(self, self.redis, "events", max_duplicates=0)
        print(
            f"\n[SIGTERM under load, redis down] before: {stats(before)}; after SIGTERM: {after}; "
            f"exit 0 after {stop_seconds:.2f}s; {len(oracle.acked)} acks arrived {replay:.2f}s after restart; "
            f"{report.items} items, {report.duplicates} dup(s); log: {stop_log[-2:]}"
        )


class MemoryBoundTests(FaultTestCase):
    """6. Memory stays bounded when nothing can take messages."""

    def test_rss_bounded_when_redis_and_spool_are_full(self) -> None:
        """Redis dead, the spool on a 256 KiB tmpfs, [buffer] max_messages = 200, an
        ack = "accepted" route hammered by 4 unpaced clients with 24 KiB messages
        (~100 MiB in total): 503s (problem+json, Retry-After) appear, relayd's RSS
        stays within MEMORY_GROWTH_BOUND of its start, relayd stays alive, and once
        Redis returns every acknowledged message arrives.
        """
        spool_dir = mount_tmpfs(self, TINY_FS)
        self.start(
            [{"path": "/events", "list": "events", "ack": "accepted"}],
            spool_dir=spool_dir,
            buffer={"max_messages": MEMORY_BUFFER_MESSAGES},
        )
        self.redis.kill()
        assert self.relayd.proc is not None
        pid = self.relayd.proc.pid
        # One request first so the HTTP path's lazy imports and caches are in the baseline.
        oracle = Oracle(route="/events")
        self.assertIsNotNone(oracle.post(self.relayd, "/events"))
        start_kib = rss_kib(pid)
        sampler = RssSampler(pid)
        sampler.start()
        self.addCleanup(sampler.stop)
        gen = self.load(
            oracle, "/events", threads=4, rate=None, limit=MEMORY_REQUESTS, duration=90.0, payload_bytes=MEMORY_PAYLOAD
        )
        try:
            wait_for(lambda: gen.finished, 100.0, f"{MEMORY_REQUESTS} requests")
        finally:
            gen.stop()
        peak_kib = sampler.stop()
        end_kib = rss_kib(pid)
        outcomes = gen.snapshot()
        s = stats(outcomes)
        self.assertTrue(self.relayd.alive(), f"relayd died; log tail:\n{self.relayd.log_tail()}")
        self.assertEqual(self.relayd.get_admin("/healthz", timeout=5.0)[0], 200)
        self.assertEqual(gen.crashes, [])
        self.assertEqual(s.errors, 0, f"transport errors: {oracle.errors[:3]}")
        self.assertEqual(set(s.by_status) - {200, 201, 202, 503}, set(), f"unexpected statuses: {s}")
        self.assertGreater(s.by_status.get(503, 0), 0, f"no 503 with Redis and the spool full: {s}")
        for o in outcomes:
            if o.status == 503:
                self.assert_problem_503(o)
        self.assertLess(
            peak_kib - start_kib,
            MEMORY_GROWTH_BOUND,
            f"RSS grew from {start_kib} KiB to a peak of {peak_kib} KiB ({s})",
        )
        buffered = self.spool_metrics()

        self.redis.restart()
        replay = self.wait_arrival(oracle, "events")
        report = oracle.assert_ok(self, self.redis, "events", max_duplicates=0)
        print(
            f"\n[memory, buffer {MEMORY_BUFFER_MESSAGES} msgs, spool {TINY_FS}] load: {s}; RSS start {start_kib} KiB, "
            f"peak {peak_kib} KiB (+{(peak_kib - start_kib) / 1024:.1f} MiB, {sampler.samples} samples), "
            f"end {end_kib} KiB; held {buffered}; {len(oracle.acked)} acks arrived {replay:.2f}s after Redis returned; "
            f"{report.items} items, {report.duplicates} dup(s)"
        )


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
