"""Multi-worker relayd as a black box: ``[server] workers = 2`` under twistd.

Real processes only (tests/harness.py): a supervisor, two worker processes
with their own reactors on one SO_REUSEPORT port, a real redis-server, and
the fault oracle (an id counts as acknowledged only after a 2xx).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Dict, List

from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Oracle, RedisServer, RelaydProcess, wait_for
from tests.test_integration_relay import ARRIVAL_TIMEOUT, Poster, RelayTestCase


def worker_info(relayd: RelaydProcess) -> Dict[str, Dict[str, Any]]:
    """``{slot: {"pid": int, "generation": int, "ingested": float}}`` from the supervisor's /metrics."""
    status, _, body = relayd.get_admin("/metrics", timeout=5.0)
    assert status == 200, status
    out: Dict[str, Dict[str, Any]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "relayd_worker_info":
                slot = sample.labels["worker"]
                out.setdefault(slot, {}).update(
                    pid=int(sample.labels["pid"]), generation=int(sample.labels["generation"])
                )
            elif sample.name == "relayd_worker_messages_total":
                out.setdefault(sample.labels["worker"], {})["ingested"] = sample.value
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` exists (and is not a zombie we could see)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Posters:
    """Several `Poster` threads on new connections (so the kernel spreads them over workers)."""

    def __init__(self, test: RelayTestCase, oracle: Oracle, relayd: RelaydProcess, path: str, count: int = 3) -> None:
        self.threads = [Poster(oracle, relayd, path, keep_alive=False) for _ in range(count)]
        test.addCleanup(self.stop)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        for t in self.threads:
            t.stopping.set()
        for t in self.threads:
            if t.is_alive():
                t.join(30.0)


class WorkersTests(RelayTestCase):
    """``workers = 2``: both serve, crashes are survived, reload and stop lose nothing."""

    def start(self, routes: List[Dict[str, Any]], **kw: Any) -> RelaydProcess:
        self.redis = RedisServer(self)
        self.relayd = RelaydProcess(self, routes=routes, redis_url=self.redis.url, server={"workers": 2}, **kw)
        return self.relayd

    def test_both_workers_serve(self) -> None:
        """Two distinct worker pids accept traffic; every message arrives once; /readyz names both workers."""
        relayd = self.start([{"path": "/w", "list": "w"}])
        oracle = Oracle(route="/w")
        for _ in range(300):
            self.assertIsNotNone(oracle.post(relayd, "/w", keep_alive=False))
        self.assertEqual(len(oracle.acked), 300, oracle.rejected[:3])
        info = worker_info(relayd)
        self.assertEqual(sorted(info), ["0", "1"], info)
        pids = {w["pid"] for w in info.values()}
        self.assertEqual(len(pids), 2, info)
        self.assertNotIn(relayd.proc.pid, pids, "workers must be separate processes from the supervisor")
        for slot, w in info.items():
            self.assertGreater(w["ingested"], 0, f"worker {slot} served nothing: {info}")
        self.assertEqual(sum(w["ingested"] for w in info.values()), 300)
        ready = relayd.get_admin("/readyz")
        self.assertEqual(ready[0], 200, ready)
        self.assertIn(b"worker_1", ready[2])
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "w"), ARRIVAL_TIMEOUT, "all messages in Redis")
        oracle.assert_ok(self, self.redis, "w")
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())

    def test_kill_9_worker_under_load(self) -> None:
        """A worker SIGKILLed under load is restarted (new pid) and no acknowledged message is lost."""
        relayd = self.start([{"path": "/k", "list": "k"}])
        oracle = Oracle(route="/k")
        posters = Posters(self, oracle, relayd, "/k")
        posters.start()
        wait_for(lambda: len(oracle.acked) >= 300, 30.0, "300 acknowledged messages")
        before = worker_info(relayd)
        victim = before["0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: worker_info(relayd).get("0", {}).get("pid") not in (None, victim),
            30.0,
            "worker 0 to be restarted with a new pid",
        )
        acked = len(oracle.acked)
        wait_for(lambda: len(oracle.acked) >= acked + 200, 30.0, "200 more acknowledged messages after the restart")
        posters.stop()
        self.assertFalse(pid_alive(victim))
        self.assertEqual(worker_info(relayd)["1"]["pid"], before["1"]["pid"], "the other worker was disturbed")
        self.assertEqual(oracle.rejected, [], "non-2xx answers")
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "k"), ARRIVAL_TIMEOUT, "acknowledged messages")
        report = oracle.assert_ok(self, self.redis, "k", max_duplicates=1000)
        print(
            f"kill -9 worker: {len(oracle.acked)} acked, {report.duplicates} dup(s), "
            f"{len(oracle.errors)} transport error(s) on the killed worker's connections"
        )
        self.assertIn("died with status", relayd.log_text())
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())

    def test_sighup_adds_route_without_errors(self) -> None:
        """SIGHUP with a new route: new workers start, old ones drain; a client on new connections sees no error."""
        route_a = {"path": "/a", "list": "a"}
        relayd = self.start([route_a])
        before = {w["pid"] for w in worker_info(relayd).values()}
        oracle = Oracle(route="/a")
        posters = Posters(self, oracle, relayd, "/a", count=2)
        posters.start()
        wait_for(lambda: len(oracle.acked) >= 100, 20.0, "100 acknowledged messages before SIGHUP")
        relayd.rewrite_config([route_a, {"path": "/b", "list": "b"}])
        relayd.signal(signal.SIGHUP)

        def b_works() -> bool:
            return 200 <= relayd.post("/b", b'{"on": "b"}', keep_alive=False, timeout=5.0)[0] < 300

        wait_for(b_works, 30.0, "POST /b to succeed after SIGHUP")
        wait_for(lambda: all(not pid_alive(p) for p in before), 30.0, "the old workers to exit")
        acked = len(oracle.acked)
        wait_for(lambda: len(oracle.acked) >= acked + 100, 20.0, "100 more acknowledged messages")
        posters.stop()
        after = worker_info(relayd)
        self.assertTrue(all(w["generation"] == 1 for w in after.values()), after)
        self.assertFalse(before & {w["pid"] for w in after.values()})
        self.assertEqual(oracle.errors, [], "connections refused or reset around SIGHUP")
        self.assertEqual(oracle.rejected, [], "non-2xx answers around SIGHUP")
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "a"), ARRIVAL_TIMEOUT, "messages on /a")
        oracle.assert_ok(self, self.redis, "a")
        self.assertGreaterEqual(self.redis.llen("b"), 1)
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())

    def test_sighup_with_bad_config_keeps_serving(self) -> None:
        """A bad config on SIGHUP is rejected with a log line; the same workers keep serving."""
        relayd = self.start([{"path": "/a", "list": "a"}])
        before = worker_info(relayd)
        relayd.write_file("relayd.conf", "[server]\nworkers = 2\nbogus = 1\n[[route]]\npath = '/a'\nlist = 'a'\n")
        relayd.signal(signal.SIGHUP)
        wait_for(lambda: "config rejected" in relayd.log_text(), 10.0, "the rejection log line")
        self.assertIn("server.bogus", relayd.log_text())
        self.assert_2xx(relayd.post("/a", b"{}"))
        self.assertEqual({w["pid"] for w in worker_info(relayd).values()}, {w["pid"] for w in before.values()})
        self.assertEqual(relayd.terminate(), 0, relayd.log_tail())

    def test_sigterm_under_load(self) -> None:
        """SIGTERM while clients post: exit 0, every acknowledged message in Redis, workers gone."""
        relayd = self.start([{"path": "/t", "list": "t", "ack": "accepted"}])
        pids = [w["pid"] for w in worker_info(relayd).values()]
        oracle = Oracle(route="/t")
        posters = Posters(self, oracle, relayd, "/t")
        posters.start()
        wait_for(lambda: len(oracle.acked) >= 300, 30.0, "300 acknowledged messages")
        code = relayd.terminate()
        posters.stop()
        self.assertEqual(code, 0, relayd.log_tail())
        for pid in pids:
            self.assertFalse(pid_alive(pid), f"worker {pid} outlived the supervisor")
        report = oracle.assert_ok(self, self.redis, "t")
        print(f"sigterm under load (ack=accepted): {len(oracle.acked)} acked, {report.items} in Redis")

    def test_supervisor_killed_workers_drain_and_exit(self) -> None:
        """SIGKILL of the supervisor: workers notice (stdin EOF), drain, exit; nothing acknowledged is lost."""
        relayd = self.start([{"path": "/s", "list": "s", "ack": "accepted"}])
        pids = [w["pid"] for w in worker_info(relayd).values()]
        oracle = Oracle(route="/s")
        for _ in range(100):
            oracle.post(relayd, "/s", keep_alive=False)
        relayd.kill()
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30.0, "workers to exit after the supervisor died")
        wait_for(lambda: oracle.all_acknowledged_in(self.redis, "s"), ARRIVAL_TIMEOUT, "acknowledged messages")
        oracle.assert_ok(self, self.redis, "s")


class AdoptionTests(RelayTestCase):
    """Spool directories without a live worker are drained by a live one."""

    def test_orphan_spool_is_adopted_and_removed(self) -> None:
        """Records in ``worker-7`` (appearing while both workers run) reach Redis; the directory goes away.

        (A directory that exists at start is claimed by a starting worker
        and recovered by it instead: that is the restarted-worker path.)
        """
        import shutil
        import tempfile

        from relayd.spool.record import encode_entry
        from relayd.spool.spool import Spool

        self.redis = RedisServer(self)
        base = tempfile.mkdtemp(prefix="relayd-adopt-")
        self.addCleanup(shutil.rmtree, base, True)
        self.relayd = RelaydProcess(
            self, routes=[{"path": "/o", "list": "o"}], redis_url=self.redis.url, spool_dir=base, server={"workers": 2}
        )
        staging = os.path.join(base, "staging")
        with Spool.open(staging, 1 << 20, clock=time.time) as spool:
            spool.append([encode_entry(b"orphans", b'{"n": %d}' % i) for i in range(25)])
            spool.sync()
        orphan = os.path.join(base, "worker-7")
        os.rename(staging, orphan)
        wait_for(lambda: self.redis.llen("orphans") == 25, 30.0, "the orphan's 25 records in Redis")
        wait_for(lambda: not os.path.exists(orphan), 10.0, "the drained orphan directory to be removed")
        self.assertEqual(sorted(self.redis.drain("orphans")), sorted(b'{"n": %d}' % i for i in range(25)))
        self.assertIn("adopted orphan spool", self.relayd.log_text())
        self.assertEqual(self.relayd.terminate(), 0)

    def test_single_process_adopts_too(self) -> None:
        """workers = 1 (no supervisor) drains ``worker-1`` left by an earlier two-worker run."""
        import shutil
        import tempfile

        from relayd.spool.record import encode_entry
        from relayd.spool.spool import Spool

        self.redis = RedisServer(self)
        base = tempfile.mkdtemp(prefix="relayd-adopt-")
        self.addCleanup(shutil.rmtree, base, True)
        with Spool.open(os.path.join(base, "worker-1"), 1 << 20, clock=time.time) as spool:
            spool.append([encode_entry(b"left", b"x%d" % i) for i in range(10)])
            spool.sync()
        self.relayd = RelaydProcess(
            self, routes=[{"path": "/o", "list": "o"}], redis_url=self.redis.url, spool_dir=base
        )
        wait_for(lambda: self.redis.llen("left") == 10, 30.0, "the orphan's records in Redis")
        self.assertEqual(self.relayd.terminate(), 0)
