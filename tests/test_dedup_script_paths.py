"""The dedup script's two loops agree: the one-message hot path (SET NX GET) and the general loop.

`relayd.outbox.dedup` runs batches of one-message bundles on Redis >= 7.0
through a hot path, and NDJSON bundles (or older Redis) through the general
loop.  Both must leave the same list, the same markers (value and expiry)
and give the same answers; here the same batches run through each on a
real redis-server, the general loop forced by spelling out the counts
("1,1,..."), which the script reads as NDJSON-style bundles of one message.

test-case-name: tests.test_dedup_script_paths
"""

from __future__ import annotations

import unittest
from typing import Any, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.outbox.dedup import DedupListTarget, encode_bundle
from tests.harness import RedisServer

WINDOW_MS = 60_000


class ScriptPathsTests(unittest.TestCase):
    """Hot path and general loop of the dedup script, on a real Redis."""

    @classmethod
    def setUpClass(cls) -> None:
        cls._case = unittest.TestCase()
        cls.redis = RedisServer(cls._case)  # type: ignore[arg-type]
        version = cls.redis.command("INFO", "server").decode()
        major = int(version.split("redis_version:")[1].split(".")[0])
        if major < 7:  # pragma: no cover - the CI's Debian has 7.0
            raise unittest.SkipTest("the hot path needs Redis >= 7.0 (SET NX GET)")

    @classmethod
    def tearDownClass(cls) -> None:
        cls._case.doCleanups()

    def run_batch(self, list_key: bytes, bundles: List[bytes], general: bool) -> Any:
        """One batch through the script (EVAL: no script cache involved), on `list_key`'s markers."""
        [command] = DedupListTarget(list_key, WINDOW_MS).commands(bundles)
        numkeys = int(command[2])
        keys, argv = list(command[3 : 3 + numkeys]), list(command[3 + numkeys :])
        self.assertEqual(argv[1], b"", "one-message bundles take the hot path unless told otherwise")
        if general:
            argv[1] = b",".join([b"1"] * len(bundles))
        return self.redis.command("EVAL", DedupListTarget.script.source, numkeys, *keys, *argv)

    @settings(max_examples=50, deadline=None)
    @given(
        earlier=st.lists(st.integers(0, 5), max_size=4, unique=True),
        batches=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=8), min_size=1, max_size=4),
    )
    def test_hot_path_and_general_loop_agree(self, earlier: List[int], batches: List[List[int]]) -> None:
        """Keys already marked (by an earlier request), repeats inside a batch and across batches: both loops
        store the same messages in the same order, answer each repeat with the same first id, and leave the
        same markers with an expiry within the window."""
        self.redis.command("FLUSHALL")
        for list_key in (b"hot", b"general"):
            target = DedupListTarget(list_key, WINDOW_MS)
            for k in earlier:
                self.redis.command("SET", target.marker(b"d%d" % k), b"earlier-%d" % k, "PX", WINDOW_MS)
        n = 0
        for keys in batches:
            bundles = []
            for k in keys:
                n += 1
                bundles.append(encode_bundle(b"d%d" % k, b"id-%d" % n, [b"message-%d" % n]))
            hot = self.run_batch(b"hot", bundles, general=False)
            general = self.run_batch(b"general", bundles, general=True)
            self.assertEqual(hot, general)
        self.assertEqual(self.redis.items("hot"), self.redis.items("general"))
        markers: List[List[Tuple[bytes, Any]]] = []
        for list_key in (b"hot", b"general"):
            target = DedupListTarget(list_key, WINDOW_MS)
            values = []
            for k in sorted({k for keys in batches for k in keys} | set(earlier)):
                marker = target.marker(b"d%d" % k)
                values.append((b"d%d" % k, self.redis.command("GET", marker)))
                self.assertTrue(0 < int(self.redis.command("PTTL", marker)) <= WINDOW_MS)
            markers.append(values)
        self.assertEqual(markers[0], markers[1])

    def test_first_copy_wins_inside_one_batch(self) -> None:
        """A key twice in one hot-path batch, after a stored one: the second copy is dropped and answered
        with the first copy's id; the answer has one entry per bundle ('' when stored)."""
        self.redis.command("FLUSHALL")
        bundles = [encode_bundle(d, i, [m]) for d, i, m in ((b"a", b"id-1", b"m1"), (b"b", b"id-2", b"m2"), (b"b", b"id-3", b"m3"))]
        self.assertEqual(self.run_batch(b"hot", bundles, general=False), [b"", b"", b"id-2"])
        self.assertEqual(self.redis.items("hot"), [b"m1", b"m2"])
        self.assertEqual(self.run_batch(b"hot", [encode_bundle(b"c", b"id-4", [b"m4"])], general=False), [])
