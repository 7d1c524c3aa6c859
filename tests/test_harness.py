"""Tests of the black-box harness itself (tests/harness.py), against a real redis-server."""

from __future__ import annotations

import json
import unittest

from tests.harness import (
    Oracle,
    RedisError,
    RedisServer,
    TimeoutExpired,
    decode_item,
    free_port,
    port_accepts,
    process_listens,
    to_toml,
    wait_for,
)

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


class RespClientTests(unittest.TestCase):
    """The tiny RESP client speaks to a real redis-server correctly."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)

    def test_round_trip_all_reply_kinds(self) -> None:
        """Simple strings, integers, bulk strings, nil and arrays decode to str/int/bytes/None/list."""
        with self.redis.client() as c:
            self.assertEqual(c.command("PING"), "PONG")
            self.assertEqual(c.command("SET", "k", "v"), "OK")
            self.assertEqual(c.command("GET", "k"), b"v")
            self.assertIsNone(c.command("GET", "absent"))
            self.assertEqual(c.command("INCRBY", "n", 41), 41)
            self.assertEqual(c.command("LPUSH", "l", "a", "b"), 2)
            self.assertEqual(c.command("LRANGE", "l", 0, -1), [b"b", b"a"])

    def test_binary_safe(self) -> None:
        """Every byte value, CRLF and NUL included, survives a SET/GET round trip."""
        payload = bytes(range(256)) * 4 + b"\r\n\x00\r\n"
        with self.redis.client() as c:
            c.command("SET", b"bin\r\nkey", payload)
            self.assertEqual(c.command("GET", b"bin\r\nkey"), payload)

    def test_error_reply_raises(self) -> None:
        """An error reply raises RedisError and leaves the connection usable."""
        with self.redis.client() as c:
            c.command("SET", "s", "x")
            with self.assertRaises(RedisError):
                c.command("LPUSH", "s", "y")  # WRONGTYPE
            self.assertEqual(c.command("PING"), "PONG")

    def test_drain_is_fifo_and_empties(self) -> None:
        """drain() returns LPUSHed items oldest first (RPOP order) and empties the list."""
        for i in range(5):
            self.redis.command("LPUSH", "q", f"m{i}")
        self.assertEqual(self.redis.items("q"), [b"m0", b"m1", b"m2", b"m3", b"m4"])
        self.assertEqual(self.redis.drain("q"), [b"m0", b"m1", b"m2", b"m3", b"m4"])
        self.assertEqual(self.redis.llen("q"), 0)
        self.assertEqual(self.redis.drain("q"), [])


class RedisServerLifecycleTests(unittest.TestCase):
    """The RedisServer fixture's process controls do what they say."""

    def test_pause_resume_kill_restart(self) -> None:
        """A paused server answers nothing, resumes intact, is gone after kill and back on the same port after restart."""
        redis = RedisServer(self)
        port = redis.port
        redis.command("SET", "k", "v")
        redis.pause()
        with redis.client(timeout=0.3) as c:
            c.send("PING")
            with self.assertRaises(OSError):  # socket.timeout is an OSError
                c.read_reply()
        redis.resume()
        self.assertEqual(redis.command("GET", "k"), b"v")
        redis.kill()
        self.assertFalse(port_accepts(port))
        redis.restart()
        self.assertEqual(redis.port, port)
        self.assertEqual(redis.command("PING"), "PONG")
        self.assertIsNone(redis.command("GET", "k"))  # no persistence
        self.assertEqual(redis.stop(), 0)

    def test_free_port_is_bindable(self) -> None:
        """free_port() returns a port nothing listens on."""
        self.assertFalse(port_accepts(free_port()))

    def test_free_port_never_repeats(self) -> None:
        """free_port() hands out no port twice in a run (Linux may return a just-released port again)."""
        ports = [free_port() for _ in range(300)]
        self.assertEqual(len(set(ports)), len(ports))

    def test_process_listens_tells_whose_port_it_is(self) -> None:
        """process_listens() is true for the redis-server that listens on its port, false for another
        process and for a port with no listener: readiness checks cannot be fooled by another daemon."""
        redis = RedisServer(self)
        other = RedisServer(self)
        assert redis.proc is not None and other.proc is not None
        self.assertTrue(process_listens(redis.proc.pid, redis.port))
        self.assertFalse(process_listens(other.proc.pid, redis.port))
        self.assertFalse(process_listens(redis.proc.pid, free_port()))

    def test_wait_for_deadline(self) -> None:
        """wait_for returns the first truthy value and raises after its deadline otherwise."""
        self.assertEqual(wait_for(lambda: 7, 1.0, "seven"), 7)
        with self.assertRaises(TimeoutExpired):
            wait_for(lambda: False, 0.1, "never")


class TomlWriterTests(unittest.TestCase):
    """The config writer produces TOML that parses back to the same values."""

    def test_round_trip(self) -> None:
        """Tables and [[route]] arrays written by to_toml parse back unchanged."""
        tables = {"server": {"listen": 'tcp:1:interface="x"', "workers": 2, "f": 1.5, "b": True}}
        routes = [{"path": "/a", "list": "a"}, {"path": "/b", "list": "b", "max_body": "1KiB"}]
        self.assertEqual(tomllib.loads(to_toml(tables, routes)), {**tables, "route": routes})


class OracleTests(unittest.TestCase):
    """The oracle catches lost, invented, altered and duplicated messages."""

    def setUp(self) -> None:
        self.redis = RedisServer(self)
        self.oracle = Oracle(route="/r")

    def _push(self, cid: str, body: object, message_id: str) -> None:
        envelope = {"id": message_id, "ts": 1.0, "route": "/r", "content_type": "application/json", "body": body}
        self.redis.command("LPUSH", "l", json.dumps(envelope))

    def _sent_and_acked(self, n: int) -> list:
        out = []
        for i in range(n):
            cid, body = self.oracle.new_message()
            self.oracle.send(cid, body)
            self.oracle.acknowledge(cid, f"id{i}")
            out.append((cid, body, f"id{i}"))
        return out

    def test_all_present_is_clean(self) -> None:
        """Every acknowledged message present once: no problems, no duplicates."""
        for cid, body, mid in self._sent_and_acked(3):
            self._push(cid, body, mid)
        report = self.oracle.check(self.redis, "l")
        self.assertEqual(report.problems(), [])
        self.assertEqual((report.items, report.duplicates), (3, 0))

    def test_flags_missing_id(self) -> None:
        """An acknowledged message absent from Redis is reported missing."""
        msgs = self._sent_and_acked(3)
        for cid, body, mid in msgs[:2]:
            self._push(cid, body, mid)
        report = self.oracle.check(self.redis, "l")
        self.assertEqual(report.missing, [msgs[2][0]])
        for cid, body, mid in msgs[:2]:
            self._push(cid, body, mid)
        with self.assertRaises(AssertionError):
            self.oracle.assert_ok(self, self.redis, "l")

    def test_flags_unknown_id(self) -> None:
        """A message in Redis that was never sent is reported unknown."""
        for cid, body, mid in self._sent_and_acked(1):
            self._push(cid, body, mid)
        self._push("never-sent", {"cid": "never-sent", "n": 0}, "idX")
        report = self.oracle.check(self.redis, "l")
        self.assertEqual(report.unknown, ["never-sent"])

    def test_sent_but_unacknowledged_may_be_present(self) -> None:
        """A message sent without a 2xx may or may not arrive; both are fine."""
        cid, body = self.oracle.new_message()
        self.oracle.send(cid, body)
        self._push(cid, body, "idU")
        self.assertEqual(self.oracle.check(self.redis, "l").problems(), [])

    def test_flags_payload_and_id_mismatch(self) -> None:
        """A changed body or a different envelope id is reported as a mismatch."""
        (cid, body, mid), (cid2, body2, _mid2) = self._sent_and_acked(2)
        self._push(cid, {**body, "n": -1}, mid)
        self._push(cid2, body2, "other-id")
        self.assertEqual(len(self.oracle.check(self.redis, "l").mismatched), 2)

    def test_counts_duplicates(self) -> None:
        """The same message twice counts one duplicate (at-least-once), not a problem."""
        ((cid, body, mid),) = self._sent_and_acked(1)
        self._push(cid, body, mid)
        self._push(cid, body, mid)
        report = self.oracle.check(self.redis, "l")
        self.assertEqual((report.problems(), report.duplicates), ([], 1))

    def test_decode_raw_body_items(self) -> None:
        """Items pushed with format = "body" (raw JSON, no envelope) decode too."""
        self.assertEqual(decode_item(b'{"cid": "x"}'), (None, {"cid": "x"}))
        self.assertEqual(decode_item(b"\xff"), (None, b"\xff"))


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
