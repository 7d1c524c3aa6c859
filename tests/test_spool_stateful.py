"""Stateful model test: the spool against a list, across syncs, acks, crashes and restarts.

The model is the list of records appended, plus watermarks: how many had
been appended at the last successful ``sync()`` (the promise under test) and
how many were acknowledged then and since.

The crash simulation does not trust that promise: it watches the spool's
actual fsync calls.  Each file is durable up to its size at its last
fdatasync, a directory entry only after a directory fsync, and ``meta.json``
only as of the last directory fsync.  A crash drops every file descriptor,
cuts each segment back to anywhere between its durable size and its current
size, lets non-durable new files vanish, and may roll ``meta.json`` back:
what a power cut may leave.  A missing fsync in the spool shows up as a lost
record here.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relayd.spool import segments as segments_mod
from relayd.spool.errors import SpoolFull
from relayd.spool.spool import Spool
from tests.strategies import spool_payloads

SEGMENT_BYTES = 160  # a handful of records per segment, so rolling and deletion happen constantly
MAX_BYTES = 2000  # small enough that SpoolFull happens too


class SpoolMachine(RuleBasedStateMachine):
    """Any interleaving of operations keeps every synced, unacked record, in order, inventing none."""

    POLICY = "batch"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spoolsm-")
        self.counter = 0
        # Model: payloads appended (numbered, so unique), oldest first.  The first
        # `acked` of them are acknowledged in memory, the first `durable_acked`
        # durably; the first `synced` were on disk at the last sync.
        self.records = []
        self.acked = 0
        self.durable_acked = 0
        self.synced = 0
        self.synced_sizes = {}  # segment name -> size at its last fdatasync
        self.durable_names = set()  # segment names whose directory entry was fsynced
        self.durable_meta = None  # meta.json bytes as of the last directory fsync
        self._real = (segments_mod.fdatasync, segments_mod.fsync_dir)
        segments_mod.fdatasync = self._observe_fdatasync
        segments_mod.fsync_dir = self._observe_fsync_dir
        self.in_flight = None  # position after the last record read but not acked
        self._in_flight_count = 0
        self.spool = self._open()

    def _open(self):
        sp = Spool.open(self.dir, MAX_BYTES, segment_bytes=SEGMENT_BYTES, fsync=self.POLICY, clock=lambda: 5.0)
        return sp

    def _observe_fdatasync(self, fd):
        self._real[0](fd)
        name = os.path.basename(os.readlink("/proc/self/fd/%d" % fd))
        self.synced_sizes[name] = os.fstat(fd).st_size

    def _observe_fsync_dir(self, path):
        self._real[1](path)
        self.durable_names |= {n for n in os.listdir(self.dir) if n.endswith(".seg")}
        self.durable_meta = self._meta_bytes()

    def _meta_bytes(self):
        try:
            with open(os.path.join(self.dir, "meta.json"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _mark_synced(self):
        """The spool promised durability of everything appended and acked so far."""
        self.synced = len(self.records)
        self.durable_acked = self.acked

    def teardown(self):
        """Release the directory and the fsync observers."""
        segments_mod.fdatasync, segments_mod.fsync_dir = self._real
        if not self.spool.closed:
            self.spool.close()
        shutil.rmtree(self.dir, True)

    @rule(payloads=st.lists(spool_payloads(max_size=40), min_size=1, max_size=6))
    def append(self, payloads):
        """Append tagged payloads; SpoolFull must leave nothing behind."""
        batch = []
        for p in payloads:
            batch.append(b"%06d|" % self.counter + p)
            self.counter += 1
        try:
            self.spool.append(batch)
        except SpoolFull:
            return
        self.records.extend(batch)
        if self.POLICY == "always":
            self._mark_synced()

    @rule()
    def sync(self):
        """Group commit: after this, every appended record and every ack survives a crash."""
        self.spool.sync()
        self._mark_synced()

    @rule(n=st.integers(1, 8), ack=st.integers(0, 8))
    def read_and_ack(self, n, ack):
        """Read a batch (pipelined after any unacked one) and acknowledge a prefix of what was read."""
        recs = self.spool.read(n, 1 << 20, after=self.in_flight)
        start = self.acked if self.in_flight is None else self.acked + self._in_flight_count
        got = [p for _, p in recs]
        assert got == self.records[start : start + n], (got, self.records[start : start + n])
        if not recs:
            return
        if ack == 0:
            self.in_flight = recs[-1][0]
            self._in_flight_count = start - self.acked + len(recs)
            return
        upto = min(ack, len(recs))
        self.spool.ack(recs[upto - 1][0])
        self.acked = start + upto
        self.in_flight = None
        if self.POLICY == "always":
            self._mark_synced()

    @rule()
    def restart(self):
        """A clean close and reopen loses and duplicates nothing."""
        self.spool.close()
        self.spool = self._open()
        got = self._read_everything()
        assert got == self.records[self.acked :], (got, self.records[self.acked :])
        self._rebase(got)

    @rule(data=st.data())
    def crash(self, data):
        """Power cut: unsynced bytes may be lost in part or whole; synced records must survive."""
        self.spool._close_fds()  # drop everything without flushing, like SIGKILL
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".seg"):
                continue
            path = os.path.join(self.dir, name)
            size = os.path.getsize(path)
            if name not in self.durable_names and data.draw(st.booleans(), label="lose " + name):
                os.unlink(path)
                continue
            low = min(self.synced_sizes.get(name, 0), size)
            os.truncate(path, data.draw(st.integers(low, size), label="keep " + name))
        if self._meta_bytes() != self.durable_meta and data.draw(st.booleans(), label="roll back meta"):
            meta = os.path.join(self.dir, "meta.json")
            if self.durable_meta is None:
                os.unlink(meta)
            else:
                with open(meta, "wb") as f:
                    f.write(self.durable_meta)
        self.spool = self._open()
        got = self._read_everything()
        # Payloads are unique (numbered), so each recovered one names its index.
        index = {r: i for i, r in enumerate(self.records)}
        assert all(g in index for g in got), "invented records: %r" % ([g for g in got if g not in index],)
        idx = [index[g] for g in got]
        assert idx == sorted(set(idx)), "reordered or duplicated: %r" % (idx,)
        if self.acked < self.synced:
            # Synced and not acknowledged: must be there, so replay starts at or before it.
            assert got and idx[0] <= self.acked, (idx, self.acked, self.synced)
        if got:
            k = idx[0]
            # Never replay what was durably acknowledged ...
            assert k >= self.durable_acked, (k, self.durable_acked)
            # ... and from the first replayed record on, everything synced is there, contiguous.
            if k < self.synced:
                assert got[: self.synced - k] == self.records[k : self.synced], (idx, k, self.synced)
        self._rebase(got)

    def _read_everything(self):
        out = []
        after = None
        while True:
            recs = self.spool.read(5, 1 << 20, after=after)
            if not recs:
                return out
            out.extend(p for _, p in recs)
            after = recs[-1][0]

    def _rebase(self, recovered):
        """After reopening, the model is exactly what the spool recovered; what is on disk now is durable."""
        self.records = list(recovered)
        self.acked = 0
        self.in_flight = None
        self._mark_synced()
        names = [n for n in os.listdir(self.dir) if n.endswith(".seg")]
        self.synced_sizes = {n: os.path.getsize(os.path.join(self.dir, n)) for n in names}
        self.durable_names = set(names)
        self.durable_meta = self._meta_bytes()

    @invariant()
    def counts_match(self):
        """pending_records is the number of appended, unacknowledged records."""
        assert self.spool.pending_records == len(self.records) - self.acked, (self.spool.pending_records, len(self.records), self.acked)

    @invariant()
    def within_bounds(self):
        """Segment files never exceed max_bytes in total."""
        assert self.spool.disk_bytes <= MAX_BYTES

    @precondition(lambda self: self.in_flight is not None)
    @rule()
    def ack_in_flight(self):
        """Acknowledge a pipelined batch as a whole (the forwarder's usual path)."""
        self.spool.ack(self.in_flight)
        self.acked += self._in_flight_count
        self.in_flight = None
        if self.POLICY == "always":
            self._mark_synced()


class SpoolAlwaysMachine(SpoolMachine):
    """Under fsync="always" every append and ack is durable when it returns."""

    POLICY = "always"


TestSpoolBatch = SpoolMachine.TestCase
TestSpoolAlways = SpoolAlwaysMachine.TestCase
