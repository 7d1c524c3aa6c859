"""The status-pipe protocol between a worker and its supervisor (relayd/process/status.py).

test-case-name: tests.test_status
"""

from __future__ import annotations

import os
import unittest

from hypothesis import given
from hypothesis import strategies as st

from relayd.process.status import FinalMetrics, Heartbeat, Ready, StatusReader, StatusWriter, decode, encode
from tests.strategies import status_messages


class CodecTests(unittest.TestCase):
    """Every message survives the wire, however the bytes arrive."""

    @given(status_messages())
    def test_round_trip(self, message):
        """decode(encode(m)) == m, and one message is one line."""
        line = encode(message)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(decode(line[:-1]), message)

    @given(st.lists(status_messages(), max_size=8), st.data())
    def test_reader_reassembles_any_split(self, messages, data):
        """The reader yields the messages in order whatever the chunking (pipes split writes anywhere)."""
        stream = b"".join(encode(m) for m in messages)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        reader = StatusReader()
        got = []
        start = 0
        for cut in cuts + [len(stream)]:
            got.extend(reader.feed(stream[start:cut]))
            start = cut
        self.assertEqual(got, messages)

    def test_wire_format(self):
        """The JSON lines the supervisor has always read (a worker of the previous release still talks to it)."""
        self.assertEqual(encode(Ready(pid=7, spool="/s")), b'{"ready": true, "pid": 7, "spool": "/s"}\n')
        self.assertEqual(encode(Heartbeat(at=1.5)), b'{"hb": 1.5}\n')
        self.assertEqual(encode(FinalMetrics(text="x 1\n")), b'{"final_metrics": "x 1\\n"}\n')

    def test_garbage_is_skipped(self):
        """Lines that are not messages are dropped, the ones around them kept."""
        reader = StatusReader()
        stream = b"not json\n[1]\n{}\n" + encode(Heartbeat(at=2.0)) + b'{"ready": false}\n'
        self.assertEqual(reader.feed(stream), [Heartbeat(at=2.0)])


class WriterTests(unittest.TestCase):
    """The worker's end over a real pipe."""

    def test_writes_lines_and_survives_a_gone_reader(self):
        """Messages arrive as lines; once the reader is gone, sending is a no-op (no exception)."""
        r, w = os.pipe()
        writer = StatusWriter(w)
        writer.send(Heartbeat(at=3.0))
        self.assertEqual(StatusReader().feed(os.read(r, 4096)), [Heartbeat(at=3.0)])
        os.close(r)
        writer.send(Heartbeat(at=4.0))  # EPIPE: dropped (SIGPIPE is ignored by Python)
        writer.send(Heartbeat(at=5.0))
        os.close(w)

    def test_no_pipe(self):
        """Without a status fd (standalone worker) nothing is written and nothing fails."""
        StatusWriter(None).send(Ready(pid=1, spool="x"))
