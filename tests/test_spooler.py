"""The Spooler over a real Spool on disk: can_take, group commit, fsync off the reactor (fake clock).

test-case-name: tests.test_spooler
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayd.ops.metrics import Metrics
from relayd.outbox.spooler import COMMIT_WINDOW, RETRY_AFTER_ERROR, Spooler
from relayd.spool.errors import SpoolFull, SpoolWriteError
from relayd.spool.record import FRAME_OVERHEAD


class SpoolerFixture:
    """A started Spooler in a temp dir."""

    def make(self, test: SynchronousTestCase, fsync: str = "batch", max_bytes: int = 10**8, run_in_thread=None) -> None:
        self.dir = tempfile.mkdtemp()
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.spooler = Spooler(self.clock, self.dir + "/w", max_bytes, fsync, Metrics(), run_in_thread=run_in_thread)
        self.spooler.startService()
        test.addCleanup(lambda: self.spooler.running and self.spooler.stopService())

    def append(self, *payloads: bytes) -> Deferred:
        """Append payloads; the Deferred of their commit."""
        return self.spooler.append(list(payloads))


class GroupCommitTests(SynchronousTestCase, SpoolerFixture):
    """Appends are acknowledged after the fsync of the commit window, not before."""

    def test_appends_fire_after_commit(self):
        """Two appends in one window share one commit; both fire only then."""
        self.make(self)
        d1 = self.append(b"a")
        d2 = self.append(b"b", b"c")
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.clock.advance(COMMIT_WINDOW)
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(self.spooler.spool.pending_records, 3)
        self.assertTrue(self.spooler.pending)

    def test_refusal_window_after_a_write_error(self):
        """After a write error the spool refuses appends for RETRY_AFTER_ERROR, then takes them again."""
        self.make(self)
        self.spooler._refuse("write", "test")
        self.assertFalse(self.spooler.can_take(1, 10))
        self.assertRaises(SpoolWriteError, self.spooler.append, [b"x"])
        self.clock.advance(RETRY_AFTER_ERROR)
        self.assertTrue(self.spooler.can_take(1, 10))

    def test_can_take_counts_the_real_record_size(self):
        """can_take compares the framed size of the records with the room under max_bytes
        (it used to check for 64 bytes whatever the record size)."""
        self.make(self, max_bytes=4096)
        self.assertTrue(self.spooler.can_take(1, 4096 - FRAME_OVERHEAD))
        self.assertFalse(self.spooler.can_take(1, 4096 - FRAME_OVERHEAD + 1))
        self.assertFalse(self.spooler.can_take(2, 4096 - 2 * FRAME_OVERHEAD + 1))
        self.append(b"x" * 2000)
        self.assertFalse(self.spooler.can_take(1, 2100))
        self.assertTrue(self.spooler.can_take(1, 1000))

    def test_full_spool_raises_and_writes_nothing(self):
        """An append past max_bytes raises SpoolFull; nothing is written, and no refusal window starts."""
        self.make(self, max_bytes=4096)
        self.assertRaises(SpoolFull, self.spooler.append, [b"x" * 5000])
        self.assertEqual(self.spooler.spool.pending_records, 0)
        self.assertTrue(self.spooler.can_take(1, 100))


class ThreadedCommitTests(SynchronousTestCase, SpoolerFixture):
    """The fsync runs off the reactor; what arrives meanwhile forms the next group."""

    def setUp(self):
        self.calls = []  # (deferred, function, args) of each "thread" job, run by hand

        def run_in_thread(f, *args):
            d = Deferred()
            self.calls.append((d, f, args))
            return d

        self.make(self, run_in_thread=run_in_thread)

    def finish(self, error=None):
        d, f, args = self.calls.pop(0)
        if error is None:
            f(*args)
            d.callback(None)
        else:
            for fd in args[0].fds:
                os.close(fd)
            d.errback(error)

    def test_groups_while_syncing(self):
        """An append is acknowledged only after its own group's fsync; appends during a sync wait for the next one."""
        first = self.append(b"a")
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(len(self.calls), 1)
        second = self.append(b"b")
        self.clock.advance(COMMIT_WINDOW)
        self.assertEqual(len(self.calls), 1, "one sync at a time")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.finish()
        self.successResultOf(first)
        self.assertNoResult(second)
        self.clock.advance(COMMIT_WINDOW)
        self.finish()
        self.successResultOf(second)

    def test_failed_fsync_fails_its_group_and_later_appends(self):
        """An fsync error fails its group and what was appended meanwhile; then the spool refuses for a while."""
        first = self.append(b"a")
        self.clock.advance(COMMIT_WINDOW)
        second = self.append(b"b")
        self.finish(OSError(5, "Input/output error"))
        self.failureResultOf(first, SpoolWriteError)
        self.failureResultOf(second, SpoolWriteError)
        self.assertFalse(self.spooler.can_take(1, 1))


class ReadinessSizeTests(SynchronousTestCase, SpoolerFixture):
    """refused_size: what /readyz asks about, so that it agrees with ingest."""

    def test_largest_refusal_is_remembered_until_such_a_write_fits(self) -> None:
        """A refused 1000-byte write makes refused_size cover it; smaller successful checks do
        not clear it; a check of at least that size that fits does."""
        self.make(self, max_bytes=4096)
        self.append(b"x" * 3500)
        self.assertFalse(self.spooler.can_take(1, 1000))
        self.assertEqual(self.spooler.refused_size, 1000 + FRAME_OVERHEAD)
        self.assertTrue(self.spooler.can_take(1, 10))
        self.assertEqual(self.spooler.refused_size, 1000 + FRAME_OVERHEAD, "a small write proves nothing")

    def test_cleared_when_a_refused_size_fits_again(self) -> None:
        """After a write error's refusal window, the same size fits again and the mark clears."""
        self.make(self)
        self.spooler._refuse("write", "injected EIO")
        self.assertFalse(self.spooler.can_take(1, 1000))
        self.clock.advance(RETRY_AFTER_ERROR)
        self.assertTrue(self.spooler.can_take(1, 1000))
        self.assertEqual(self.spooler.refused_size, 0)
