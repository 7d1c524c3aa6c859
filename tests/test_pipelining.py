"""Pipelined requests against a real relayd: answers come back whole and in request order.

Answers given while a request is read (accepted acks, problems) are held to
the end of the reactor turn (`relayd.wire.TurnSends`), stored acks go when
Redis replies, and Twisted writes some answers itself (a 400 for a broken
request).  Several requests in one TCP write exercise all three on one
connection in one turn: the order must still be the requests' order, and
each acknowledged message must be in its list, in that order.
"""

from __future__ import annotations

import time
import unittest
from typing import List, Optional, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd.codec import decode_envelope
from tests.edge_tools import ClassScope, Closed, RawResponse, connect, post_bytes, read_responses, start_relayd
from tests.harness import RedisServer

#: (kind, route, body): what one pipelined request is.
KINDS = {
    "accepted": ("/acc", b'{"n":%d}'),
    "stored": ("/sto", b'{"n":%d}'),
    "invalid": ("/acc", b'{"n":%d'),  # not JSON: a 400 problem, given while the request is read
}


class PipeliningTest(unittest.TestCase):
    """One relayd with an accepted and a stored route; requests sent back to back in one write."""

    @classmethod
    def setUpClass(cls) -> None:
        scope = ClassScope(cls)
        cls.redis = RedisServer(scope)
        cls.relayd = start_relayd(
            scope,
            cls.redis,
            [{"path": "/acc", "list": "acc", "ack": "accepted"}, {"path": "/sto", "list": "sto", "ack": "stored"}],
        )
        cls.port = cls.relayd.ingest_port

    def _exchange(self, kinds: List[str], tail: bytes = b"") -> Tuple[List[RawResponse], Optional[Closed]]:
        self.redis.command("DEL", "acc", "sto")
        data = b"".join(post_bytes(KINDS[k][0], KINDS[k][1] % i) for i, k in enumerate(kinds)) + tail
        with connect(self.port) as s:
            s.sendall(data)
            return read_responses(s, len(kinds) + (1 if tail else 0), timeout=15.0)

    def _check(self, kinds: List[str], responses: List[RawResponse]) -> None:
        """Statuses in request order; each acked message in its list at its place, with the id it was given."""
        expected_lists = {"acc": [], "sto": []}  # type: dict
        for i, (kind, resp) in enumerate(zip(kinds, responses)):
            if kind == "invalid":
                self.assertEqual(resp.status, 400, f"request {i} ({kind}) got {resp.raw[:300]!r}")
                continue
            self.assertEqual(resp.status, 200, f"request {i} ({kind}) got {resp.raw[:300]!r}")
            expected_lists["acc" if kind == "accepted" else "sto"].append((i, resp.json()["id"]))
        for name, want in expected_lists.items():
            deadline = time.monotonic() + 10
            while self.redis.llen(name) < len(want) and time.monotonic() < deadline:
                time.sleep(0.01)
            stored = [decode_envelope(raw) for raw in self.redis.items(name)]
            self.assertEqual([(e["body"]["n"], e["id"]) for e in stored], want, f"list {name}")

    def test_mixed_acks_and_a_problem_in_order(self) -> None:
        """Accepted, stored, a 400 and accepted again: four answers, in that order."""
        kinds = ["accepted", "stored", "invalid", "accepted", "stored"]
        responses, _ = self._exchange(kinds)
        self.assertEqual(len(responses), len(kinds))
        self._check(kinds, responses)

    def test_a_broken_request_after_a_held_answer(self) -> None:
        """Twisted's own 400 for an unparseable request never overtakes the answer held before it."""
        responses, _ = self._exchange(["accepted", "accepted"], tail=b"NOT HTTP AT ALL\r\n\r\n")
        self.assertGreaterEqual(len(responses), 2, "the two answers before the broken request")
        self._check(["accepted", "accepted"], responses[:2])
        if len(responses) > 2:
            self.assertGreaterEqual(responses[2].status, 400)

    def test_http10_close_after_a_held_answer(self) -> None:
        """An HTTP/1.0 request (no keep-alive): its held answer arrives whole, then the close."""
        self.redis.command("DEL", "acc")
        with connect(self.port) as s:
            s.sendall(b"POST /acc HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{\"n\":7}\n")
            responses, closed = read_responses(s, 2)
        self.assertEqual(len(responses), 1)
        self.assertEqual(responses[0].status, 200, responses[0].raw)
        self.assertEqual(closed, Closed(b""))  # then the close, with nothing after the answer

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=8))
    def test_any_mix_in_order(self, kinds: List[str]) -> None:
        """Any pipelined mix of accepted, stored and refused requests: answers and lists in request order."""
        responses, _ = self._exchange(kinds)
        self.assertEqual(len(responses), len(kinds), [r.raw[:80] for r in responses])
        self._check(kinds, responses)


if __name__ == "__main__":  # pragma: no cover
    unittest.main()
