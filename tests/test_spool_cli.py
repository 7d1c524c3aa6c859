"""Tests for ``relayd spool inspect|verify`` (relayd.spool.cli.main)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from relayd.spool.cli import EXIT_CORRUPT, EXIT_OK, EXIT_USAGE, main
from relayd.spool.record import FRAME_OVERHEAD, encode_record
from relayd.spool.spool import Spool


class SpoolCLITests(SynchronousTestCase):
    """The operator's view of a spool directory, and verify's exit status."""

    def setUp(self) -> None:
        self.base = tempfile.mkdtemp(prefix="spoolcli-")
        self.addCleanup(shutil.rmtree, self.base, True)
        self.dir = os.path.join(self.base, "spool")
        now = [100.0]
        sp = Spool.open(self.dir, 1 << 20, segment_bytes=100, clock=lambda: now[0])
        sp.append([b"a" * 34] * 3)  # 50 bytes each framed; 2 per segment
        now[0] = 200.0
        sp.append([b"b" * 34] * 3)
        sp.ack(sp.read(1, 1 << 20)[0][0])
        sp.close()

    def run_cli(self, *argv):
        """Run main() with a fixed clock; returns (exit status, output)."""
        out = io.StringIO()
        status = main(list(argv), out=out, clock=lambda: 250.0)
        return status, out.getvalue()

    def segments(self):
        """Segment file paths, oldest first."""
        return [os.path.join(self.dir, n) for n in sorted(os.listdir(self.dir)) if n.endswith(".seg")]

    def test_inspect_json(self):
        """inspect reports segments, records, bytes, pending counts and the oldest pending age."""
        status, out = self.run_cli("inspect", "--json", self.dir)
        self.assertEqual(status, EXIT_OK)
        doc = json.loads(out)
        self.assertEqual(doc["segments"], 3)
        self.assertEqual(doc["records"], 6)
        self.assertEqual(doc["bytes"], 6 * (34 + FRAME_OVERHEAD))
        self.assertEqual(doc["pending_records"], 5)
        self.assertEqual(doc["pending_bytes"], 5 * (34 + FRAME_OVERHEAD))
        self.assertEqual(doc["oldest_record_age_seconds"], 150.0)
        self.assertTrue(doc["metadata_ok"])

    def test_inspect_text(self):
        """The human format names every segment and the age."""
        status, out = self.run_cli("inspect", self.dir)
        self.assertEqual(status, EXIT_OK)
        self.assertIn("150.0 s ago", out)
        self.assertEqual(out.count(".seg"), 3)

    def test_verify_clean(self):
        """verify exits 0 on an undamaged spool."""
        status, out = self.run_cli("verify", self.dir)
        self.assertEqual(status, EXIT_OK, out)
        self.assertTrue(out.startswith("OK"), out)

    def test_verify_corrupt(self):
        """verify exits 1 and names the range when any record's CRC fails."""
        with open(self.segments()[1], "r+b") as f:
            f.seek(FRAME_OVERHEAD + 5)
            f.write(b"X")
        status, out = self.run_cli("verify", self.dir)
        self.assertEqual(status, EXIT_CORRUPT, out)
        self.assertIn("corrupt range [0, 50)", out)
        status, out = self.run_cli("verify", "--json", self.dir)
        self.assertEqual((status, json.loads(out)["ok"]), (EXIT_CORRUPT, False))

    def test_verify_torn_tail_is_a_note(self):
        """A torn tail of the newest segment (recovery truncates it) does not fail verify."""
        with open(self.segments()[-1], "ab") as f:
            f.write(encode_record(b"partial", 1.0)[:9])
        status, out = self.run_cli("verify", self.dir)
        self.assertEqual(status, EXIT_OK, out)
        self.assertIn("9 byte(s) of torn tail", out)

    def test_verify_does_not_modify(self):
        """verify and inspect are read-only: files are byte-for-byte unchanged."""
        with open(self.segments()[0], "r+b") as f:
            f.seek(20)
            f.write(b"!")
        before = {n: open(os.path.join(self.dir, n), "rb").read() for n in os.listdir(self.dir) if os.path.isfile(os.path.join(self.dir, n))}
        self.run_cli("verify", self.dir)
        self.run_cli("inspect", self.dir)
        after = {n: open(os.path.join(self.dir, n), "rb").read() for n in os.listdir(self.dir) if os.path.isfile(os.path.join(self.dir, n))}
        self.assertEqual(before, after)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "quarantine")))

    def test_missing_directory_and_usage(self):
        """A missing directory or bad arguments exit 2, not with a traceback."""
        status, out = self.run_cli("verify", os.path.join(self.base, "nope"))
        self.assertEqual(status, EXIT_USAGE)
        self.assertIn("cannot list", out)
        self.assertEqual(main([], out=io.StringIO()), EXIT_USAGE)
        self.assertEqual(main(["frobnicate", self.dir], out=io.StringIO()), EXIT_USAGE)
