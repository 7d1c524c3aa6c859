"""The spool: a durable, bounded, append-only segment log on local disk.

When Redis is slower than HTTP ingest (or down), a worker spills messages to
its spool and replays them later.  The spool is a write-ahead queue with one
writer and one reader, modelled on NSQ's ``go-diskqueue`` (segments, a read
and a write cursor, atomic metadata, ``.bad`` quarantine) and Vector's
``disk_v2`` (CRC32C per record, records never span files, the writer creates
files and the reader deletes them), minus their known failure modes: one bad
record never condemns a whole file (NSQ) and no corruption ever stops the
spool from opening (Vector's crash loops).

The core is synchronous and reactor-free: callers (the daemon's spool
service) decide when to append, when to ``sync()`` (group commit) and when to
read and ``ack()``.  This module owns the `Spool` class: the directory lock,
the in-memory index of segments and cursors, append, group commit
(``begin_sync`` / ``end_sync``), read, ack and close.  Its parts live next
to it, one concern each:

``record``       the frame of one record (length, CRC32C, timestamp) and the entry codec
``segments``     segment file names, listing, fsync primitives, ``FSYNC_POLICIES``
``meta``         the ``meta.json`` cursor document (built and written in one place)
``sync``         `SyncPlan` / `run_sync`: a group commit, runnable in a thread
``scan``         walking a segment's frames, resynchronising after corruption
``recovery``     rebuilding the index at open; torn tails, ``quarantine/``
``inspection``   read-only `scan_directory` for ``relayd spool inspect|verify``
``errors``       the exceptions

On-disk layout (one directory per worker, one `Spool` per directory)
====================================================================
``NNNNNNNNNNNNNNNNNNNN.seg``
    Segment files, named by a 20-digit, monotonically increasing sequence
    number, so lexical order is log order.  A segment is a plain
    concatenation of records (`relayd.spool.record`); there is no file header.
``meta.json``
    The durable read cursor: ``{"version", "segment", "offset", "acked",
    "crc"}`` where ``crc`` is the CRC32C of the other fields.  Written as
    ``meta.json.tmp`` -> fsync -> rename -> fsync(directory).
``lock``
    ``flock``-ed for the lifetime of the `Spool`: two processes never share
    a directory.
``quarantine/<segment>-<offset>.bad``
    Verbatim copies of byte ranges that recovery had to skip.

Invariants
==========
1. Records never span segments.  A segment is sealed when the next record
   would take it past ``segment_bytes`` (a record larger than that gets a
   segment of its own); only the newest segment is ever written to.
2. The writer creates segments; only the reader (``ack``) deletes them, and
   only whole segments in which every record has been acknowledged.  (A
   fully drained active segment is also reclaimed when space is needed or at
   ``close()``.)
3. The durable read cursor only ever covers acknowledged records, so a
   stale cursor means duplicates and a cursor past the surviving data (a
   crash under ``"never"``) is simply clamped.  ``sync()`` still fsyncs
   segment data before metadata.  Metadata lost or corrupt => replay from
   the oldest segment: duplicates, never loss.  A cursor naming a segment
   that no longer exists means that segment was fully acknowledged.
4. Everything appended before a successful ``sync()`` (or any ``append()``
   under ``fsync="always"``) survives a crash.  Records read but not yet
   durably acknowledged may be delivered again (at-least-once).
5. ``append()`` is all-or-nothing: on ``SpoolFull`` nothing is written; on
   ``SpoolWriteError`` partial writes are truncated away so the log ends on a
   record boundary.
6. Opening never fails because of file contents, only because the directory
   is unusable.  Recovery truncates a torn tail of the newest segment; any
   other frame that fails its length or CRC check is copied to
   ``quarantine/``, counted in ``corrupt_records`` and skipped by scanning
   forward for the next frame whose length and CRC verify.

Costs worth knowing
===================
* Opening scans (reads and CRC-checks) every unacknowledged segment once,
  to find torn tails and corruption and to count pending records.
* Resynchronisation after corruption tries every byte offset; candidates
  are pre-filtered in C (regex on the length field) and only lengths up to
  the largest record seen (at least 1 MiB) are considered, so even a segment
  of random garbage costs seconds, not hours.  A record larger than that
  which directly follows a corrupt range is quarantined with it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from crc32c import crc32c
from twisted.logger import Logger

from relayd.spool import segments
from relayd.spool.errors import SpoolClosedError, SpoolDirectoryError, SpoolFull, SpoolLockedError, SpoolWriteError
from relayd.spool.meta import build_meta, write_meta
from relayd.spool.record import (
    FRAME_OVERHEAD,
    HEADER,
    HEADER_BYTES,
    MAX_LENGTH,
    MAX_PAYLOAD_BYTES,
    MIN_LENGTH,
    TIMESTAMP,
    TS_BYTES,
)
from relayd.spool.recovery import quarantine, recover
from relayd.spool.scan import RESYNC_MIN_BOUND, resync
from relayd.spool.segments import DEFAULT_SEGMENT_BYTES, FSYNC_POLICIES, LOCK_NAME, segment_name, unlink_segment
from relayd.spool.sync import SyncPlan, run_sync

__all__ = ["Spool", "Position"]

# Bounds on one pread when replaying: at least a page or so, at most a few
# batches' worth (the consumer asks for ~1000 records / 1 MiB at a time).
_READ_CHUNK_MIN = 4096
_READ_CHUNK_MAX = 4 * 1024 * 1024

Position = Tuple[int, int, int]
"""Opaque, totally ordered token naming the point just after one record.

Compare positions with ``<``; hand them back to `Spool.ack` or to
`Spool.read` (``after=``).  Do not build or pick them apart yourself.
"""


class Spool:
    """A durable FIFO of opaque byte payloads in one directory.

    Create with `Spool.open`.  Not thread-safe; one instance per directory
    (enforced with ``flock``).
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        max_bytes: int,
        segment_bytes: int,
        fsync: str,
        clock: Callable[[], float],
        lock_fd: int,
    ) -> None:
        """Private: use `Spool.open`, which also runs recovery."""
        self._path = path
        self._max_bytes = max_bytes
        self._segment_bytes = segment_bytes
        self._policy = fsync
        self._clock = clock
        self._lock_fd: Optional[int] = lock_fd
        # seq -> size in bytes (the active segment's size is the write end,
        # always on a record boundary) and seq -> number of valid records.
        self._sizes: Dict[int, int] = {}
        self._counts: Dict[int, int] = {}
        self._seqs: List[int] = []  # ascending
        # Known bad ranges: seq -> {start: end}; reads jump over them.
        self._bad: Dict[int, Dict[int, int]] = {}
        self._next_seq = 0
        self._wseq: Optional[int] = None
        self._wfd: Optional[int] = None
        self._wdirty = False
        self._sealed_dirty: Dict[int, int] = {}  # seq -> fd awaiting fsync
        self._dir_dirty = False
        self._meta_dirty = False
        self._poisoned = False  # an fsync failed: start a fresh segment
        self._rfd_seq: Optional[int] = None
        self._rfd: Optional[int] = None
        # Durable-to-be read cursor: (segment, offset, records before offset).
        self._rseq = 0
        self._roff = 0
        self._ridx = 0
        self._acked_total = 0
        self._corrupt = 0
        self._torn_bytes = 0
        self._resync_bound = RESYNC_MIN_BOUND
        self._oldest_cache: Optional[Tuple[Tuple[int, int], Optional[float]]] = None
        self._closed = False

    # -- opening and recovery ------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str,
        max_bytes: int,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: str = "batch",
        clock: Callable[[], float] = time.time,
    ) -> Spool:
        """Open (creating if needed) the spool in ``path`` and recover it.

        ``max_bytes`` bounds the total size of segment files; ``fsync`` is
        ``"always"`` (every append is durable before it returns), ``"batch"``
        (durable at ``sync()``) or ``"never"`` (the OS decides).  ``clock``
        returns seconds; it stamps records (pass ``reactor.seconds``).

        Raises ``ValueError`` for bad arguments and ``SpoolDirectoryError``
        (or its subclass ``SpoolLockedError``) if the directory is unusable.
        Corrupt contents never raise: see the module docstring.
        """
        if fsync not in FSYNC_POLICIES:
            raise ValueError("fsync must be one of %s, not %r" % (", ".join(FSYNC_POLICIES), fsync))
        if max_bytes <= 0 or segment_bytes <= 0:
            raise ValueError("max_bytes and segment_bytes must be positive")
        path = os.fspath(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise SpoolDirectoryError("cannot create spool directory %s: %s" % (path, e.strerror or e)) from None
        if not os.path.isdir(path):
            raise SpoolDirectoryError("spool path is not a directory: %s" % (path,))
        try:
            lock_fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SpoolDirectoryError("cannot write in spool directory %s: %s" % (path, e.strerror)) from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise SpoolLockedError("spool directory %s is in use by another process" % (path,)) from None
        spool = cls(path, max_bytes, segment_bytes, fsync, clock, lock_fd)
        try:
            spool._recover()
        except OSError as e:
            spool._close_fds()
            raise SpoolDirectoryError("cannot recover spool directory %s: %s" % (path, e)) from None
        except BaseException:
            spool._close_fds()
            raise
        return spool

    def _recover(self) -> None:
        """Adopt what `relayd.spool.recovery.recover` rebuilt; persist a moved cursor."""
        path = self._path
        log = recover(path, self._policy != "never", self._log)
        self._seqs, self._sizes, self._counts, self._bad = log.seqs, log.sizes, log.counts, log.bad
        self._next_seq = log.next_seq
        self._rseq, self._roff, self._ridx = log.rseq, log.roff, log.ridx
        self._acked_total = log.acked_total
        self._corrupt = log.corrupt
        self._torn_bytes = log.torn_bytes
        self._resync_bound = log.resync_bound
        self._dir_dirty = log.dir_dirty
        if self._seqs:
            self._wseq = self._seqs[-1]
            self._wfd = os.open(os.path.join(path, segment_name(self._wseq)), os.O_RDWR | os.O_CLOEXEC)
        self._meta_dirty = log.meta_changed
        if log.meta_changed or self._dir_dirty:
            self._write_meta(durable=self._policy != "never")
        if self._corrupt or self._torn_bytes:
            self._log.warn(
                "spool {path}: recovered; skipped {corrupt} corrupt range(s) into quarantine/, "
                "truncated {torn} byte(s) of torn tail",
                path=path,
                corrupt=self._corrupt,
                torn=self._torn_bytes,
            )

    def _quarantine(self, seq: int, start: int, data: bytes) -> None:
        """Count a corrupt range met while reading and keep a copy of its bytes."""
        self._corrupt += 1
        if quarantine(self._path, seq, start, data, self._policy != "never", self._log):
            self._dir_dirty = True

    # -- properties ----------------------------------------------------------

    @property
    def path(self) -> str:
        """The spool directory."""
        return self._path

    @property
    def fsync_policy(self) -> str:
        """``"always"``, ``"batch"`` or ``"never"``."""
        return self._policy

    @property
    def pending_records(self) -> int:
        """Records appended and not yet acknowledged (read or not)."""
        total = sum(self._counts[s] for s in self._seqs if s >= self._rseq)
        return max(0, total - self._ridx)

    @property
    def pending_bytes(self) -> int:
        """Bytes on disk from the read cursor to the write end, framing included."""
        total = sum(self._sizes[s] for s in self._seqs if s >= self._rseq)
        return max(0, total - self._roff)

    @property
    def disk_bytes(self) -> int:
        """Total size of all segment files: what ``max_bytes`` bounds."""
        return sum(self._sizes.values())

    @property
    def segment_count(self) -> int:
        """Number of segment files."""
        return len(self._seqs)

    @property
    def corrupt_records(self) -> int:
        """Corrupt ranges skipped (and quarantined) since this `Spool` was opened.

        A range is usually one record; adjacent corrupt records count once.
        """
        return self._corrupt

    @property
    def torn_bytes(self) -> int:
        """Bytes of torn tail truncated by recovery at open."""
        return self._torn_bytes

    @property
    def acked_records(self) -> int:
        """Records acknowledged over the directory's life (persisted in metadata)."""
        return self._acked_total

    @property
    def needs_sync(self) -> bool:
        """True when ``sync()`` has work to do (never under ``fsync="never"``)."""
        if self._policy == "never" or self._closed:
            return False
        return bool(self._wdirty or self._sealed_dirty or self._dir_dirty or self._meta_dirty)

    @property
    def oldest_timestamp(self) -> Optional[float]:
        """Append time (clock seconds) of the oldest unacknowledged record, or None."""
        key = (self._rseq, self._roff)
        if self._oldest_cache is not None and self._oldest_cache[0] == key:
            return self._oldest_cache[1]
        ts: Optional[float] = None
        first = self.read(1, 0)
        if first:
            (seq, end, _), payload = first[0]
            start = end - len(payload) - FRAME_OVERHEAD
            raw = self._pread(seq, TS_BYTES, start + HEADER_BYTES)
            (ts,) = TIMESTAMP.unpack(raw)
            self._oldest_cache = (key, ts)  # fixed until the cursor moves
        return ts

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    # -- writing -------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> None:
        """Append records, all or nothing, in order.

        Not durable until ``sync()`` unless the policy is ``"always"``.
        Raises ``SpoolFull`` (nothing written), ``SpoolWriteError`` (nothing
        written, log consistent), ``ValueError`` for a payload larger than
        ``MAX_PAYLOAD_BYTES``.
        """
        self._check_open()
        if not payloads:
            return
        tsb = TIMESTAMP.pack(float(self._clock()))
        seed = crc32c(tsb)
        pack = HEADER.pack
        seg_limit = self._segment_bytes
        # Plan: list of (seq, start offset, [chunks]) per target segment.
        cur_seq = self._wseq
        if self._poisoned or cur_seq is None:
            cur_seq = None
            cur_size = 0
        else:
            cur_size = self._sizes[cur_seq]
        next_seq = self._next_seq
        plan: List[Tuple[Optional[int], int, List[bytes]]] = []
        chunks: List[bytes] = []
        start_size = cur_size
        total = 0
        for p in payloads:
            n = len(p)
            if n > MAX_PAYLOAD_BYTES:
                raise ValueError("spool payload of %d bytes exceeds %d" % (n, MAX_PAYLOAD_BYTES))
            flen = n + FRAME_OVERHEAD
            if cur_seq is None or (cur_size > 0 and cur_size + flen > seg_limit):
                if chunks:
                    plan.append((cur_seq, start_size, chunks))
                cur_seq, cur_size, start_size, chunks = next_seq, 0, 0, []
                next_seq += 1
            chunks.append(pack(n + TS_BYTES, crc32c(p, seed)))
            chunks.append(tsb)
            chunks.append(p)
            cur_size += flen
            total += flen
        plan.append((cur_seq, start_size, chunks))
        if self.disk_bytes + total > self._max_bytes:
            self._reclaim_drained()
            if self.disk_bytes + total > self._max_bytes:
                raise SpoolFull(
                    "spool %s full: %d + %d bytes > max %d" % (self._path, self.disk_bytes, total, self._max_bytes)
                )
            # Reclaiming closed the active segment; re-plan from scratch.
            return self.append(payloads)
        try:
            self._execute(plan, next_seq)
        except SpoolWriteError as e:
            # The file system is fuller than max_bytes assumed (a small or
            # shared disk): a drained active segment can still give space back.
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and self._reclaim_drained():
                return self.append(payloads)
            raise
        if self._policy == "always":
            self.sync()

    def _execute(self, plan: List[Tuple[Optional[int], int, List[bytes]]], next_seq: int) -> None:
        created: List[Tuple[int, int]] = []  # (seq, fd)
        touched_old: Optional[Tuple[int, int]] = None  # (fd, original size)
        done: List[Tuple[int, int, int, int]] = []  # (seq, fd, new size, records)
        try:
            for seq, start, chunks in plan:
                assert seq is not None
                if seq == self._wseq and not self._poisoned:
                    fd = self._wfd
                    assert fd is not None
                    touched_old = (fd, start)
                else:
                    fd = os.open(
                        os.path.join(self._path, segment_name(seq)),
                        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o644,
                    )
                    created.append((seq, fd))
                data = b"".join(chunks)
                off = start
                view = memoryview(data)
                while view:
                    n = os.pwrite(fd, view, off)
                    off += n
                    view = view[n:]
                done.append((seq, fd, off, len(chunks) // 3))
        except OSError as e:
            self._rollback(touched_old, created)
            raise SpoolWriteError(
                "spool %s: write failed: %s" % (self._path, os.strerror(e.errno) if e.errno else e), e.errno
            ) from None
        # Commit the in-memory state.
        for seq, fd, size, count in done:
            if seq != self._wseq or self._poisoned:
                self._seal_active()
                self._wseq, self._wfd = seq, fd
                self._seqs.append(seq)
                self._counts[seq] = 0
                self._bad[seq] = {}
                self._dir_dirty = True
                self._poisoned = False
            self._sizes[seq] = size
            self._counts[seq] += count
            self._wdirty = True
        self._next_seq = next_seq

    def _rollback(self, touched_old: Optional[Tuple[int, int]], created: List[Tuple[int, int]]) -> None:
        """Undo a failed append: truncate the old segment, remove new ones."""
        if touched_old is not None:
            fd, size = touched_old
            try:
                os.ftruncate(fd, size)
            except OSError as e:
                # The next append overwrites from ``size`` anyway (pwrite at
                # our own offset); recovery would treat leftovers as torn.
                self._log.error("spool {path}: cannot truncate after failed write: {err}", path=self._path, err=e)
        for seq, fd in created:
            os.close(fd)
            try:
                os.unlink(os.path.join(self._path, segment_name(seq)))
            except OSError as e:
                self._log.error("spool {path}: cannot remove partial segment: {err}", path=self._path, err=e)

    def _seal_active(self) -> None:
        """The active segment stops receiving writes; keep its fd until synced."""
        if self._wseq is None or self._wfd is None:
            return
        if self._wdirty and self._policy != "never":
            self._sealed_dirty[self._wseq] = self._wfd
        else:
            os.close(self._wfd)
        self._wseq = self._wfd = None
        self._wdirty = False

    def sync(self) -> None:
        """Make everything appended and acknowledged so far durable.

        One call covers any number of appends (group commit).  A no-op under
        ``fsync="never"``.  Raises ``SpoolWriteError`` if an fsync fails; the
        records appended since the last successful sync are then not known
        to be durable, and later appends go to a fresh segment.
        """
        plan = self.begin_sync()
        if plan is None:
            return
        try:
            run_sync(plan)
        except OSError as e:
            failure = self.end_sync(plan, e)
            assert failure is not None
            raise failure from None
        self.end_sync(plan, None)

    def begin_sync(self) -> Optional[SyncPlan]:
        """Take what a sync must make durable, so it can run off this thread.

        The plan owns its file descriptors (sealed segments' fds, a dup of
        the active one): appends, acks and segment deletion may go on while
        `run_sync` works, and what they dirty waits for the next plan.
        None when there is nothing to do (or under ``fsync="never"``).
        """
        self._check_open()
        if self._policy == "never" or not self.needs_sync:
            return None
        fds = list(self._sealed_dirty.values())
        self._sealed_dirty = {}
        if self._wdirty and self._wfd is not None:
            fds.append(os.dup(self._wfd))
        self._wdirty = False
        meta = None
        if self._meta_dirty:
            meta = build_meta(self._rseq, self._roff, self._acked_total)
        plan = SyncPlan(self._path, fds, self._dir_dirty, meta)
        self._dir_dirty = self._meta_dirty = False
        return plan

    def end_sync(self, plan: SyncPlan, error: Optional[OSError]) -> Optional[SpoolWriteError]:
        """Record a plan's outcome; on failure return the error to raise.

        fsyncgate: a failed fsync may have dropped dirty pages, so the
        segment is never trusted with new data again (the next append starts
        a fresh one) and directory and metadata are redone next time.
        """
        if error is None:
            return None
        self._poisoned = True
        self._dir_dirty = self._dir_dirty or plan.dir
        self._meta_dirty = self._meta_dirty or plan.meta is not None
        return SpoolWriteError(
            "spool %s: fsync failed: %s" % (self._path, os.strerror(error.errno) if error.errno else error), error.errno
        )

    def _write_meta(self, durable: bool) -> None:
        """Persist the read cursor: tmp -> fsync -> rename -> fsync(dir)."""
        write_meta(self._path, build_meta(self._rseq, self._roff, self._acked_total), durable)
        if durable:
            segments.fsync_dir(self._path)
            self._dir_dirty = False
        else:
            self._dir_dirty = True
        self._meta_dirty = False

    # -- reading -------------------------------------------------------------

    def _fd_for(self, seq: int) -> int:
        if seq == self._wseq and self._wfd is not None:
            return self._wfd
        fd = self._sealed_dirty.get(seq)
        if fd is not None:
            return fd
        if self._rfd_seq != seq:
            if self._rfd is not None:
                os.close(self._rfd)
                self._rfd = self._rfd_seq = None
            self._rfd = os.open(os.path.join(self._path, segment_name(seq)), os.O_RDONLY | os.O_CLOEXEC)
            self._rfd_seq = seq
        assert self._rfd is not None
        return self._rfd

    def _pread(self, seq: int, n: int, offset: int) -> bytes:
        fd = self._fd_for(seq)
        out = os.pread(fd, n, offset)
        while len(out) < n:
            more = os.pread(fd, n - len(out), offset + len(out))
            if not more:
                break
            out += more
        return out

    def _next_segment(self, seq: int) -> Optional[int]:
        for s in self._seqs:
            if s > seq:
                return s
        return None

    def read(self, max_records: int = 1000, max_bytes: int = 1024 * 1024, after: Optional[Position] = None) -> List[Tuple[Position, bytes]]:
        """Return up to ``max_records`` pending records without consuming them.

        Starts at the durable read cursor, or just after ``after`` (a
        position from an earlier ``read``) so a consumer can keep several
        batches in flight before acknowledging.  Stops before the payload
        total would exceed ``max_bytes``, but always returns at least one
        record if any is pending.  Reads see every appended record, synced
        or not.  Corrupt ranges met here (disk rot since open) are skipped,
        counted and quarantined like at recovery.
        """
        self._check_open()
        seq, off, idx = self._rseq, self._roff, self._ridx
        if after is not None and (after[0], after[1]) > (seq, off):
            seq, off, idx = after
        out: List[Tuple[Position, bytes]] = []
        nbytes = 0
        unpack = HEADER.unpack_from
        while len(out) < max_records:
            size = self._sizes.get(seq)
            if size is None or off >= size:
                if size is not None and seq == self._wseq:
                    break
                nxt = self._next_segment(seq)
                if nxt is None:
                    break
                seq, off, idx = nxt, 0, 0
                continue
            room = (max_bytes - nbytes) + FRAME_OVERHEAD * (max_records - len(out))
            want = min(size - off, _READ_CHUNK_MAX, max(_READ_CHUNK_MIN, room))
            buf = self._pread(seq, want, off)
            limit = len(buf)
            mv = memoryview(buf)
            p = 0
            progressed = False
            while len(out) < max_records:
                if off + p + HEADER_BYTES > size:
                    if off + p < size:  # a stub shorter than a header
                        p = self._skip_bad(seq, off + p, size) - off
                        progressed = True
                    break
                if p + HEADER_BYTES > limit:
                    break  # header straddles the chunk: read on
                length, crc = unpack(buf, p)
                q = p + HEADER_BYTES + length
                if length < MIN_LENGTH or length > MAX_LENGTH or off + q > size:
                    p = self._skip_bad(seq, off + p, size) - off
                    progressed = True
                    break
                if q > limit:
                    if progressed:
                        break  # next chunk starts at this record
                    # One record larger than the chunk: fetch it whole.
                    buf = self._pread(seq, q, off)
                    limit = len(buf)
                    mv = memoryview(buf)
                    if q > limit:
                        break  # file shorter than recorded: give up for now
                plen = length - TS_BYTES
                if out and nbytes + plen > max_bytes:
                    return out
                if crc32c(mv[p + HEADER_BYTES : q]) != crc:
                    p = self._skip_bad(seq, off + p, size) - off
                    progressed = True
                    break
                idx += 1
                out.append(((seq, off + q, idx), buf[p + FRAME_OVERHEAD : q]))
                nbytes += plen
                p = q
                progressed = True
            if not progressed:
                break
            off += p
        return out

    def _skip_bad(self, seq: int, start: int, size: int) -> int:
        """Offset of the next valid frame after a bad one at ``start``."""
        known = self._bad.get(seq, {}).get(start)
        if known is not None:
            return known
        buf = self._pread(seq, size - start, start)
        nxt = start + resync(buf, 0, len(buf), self._resync_bound)
        self._bad.setdefault(seq, {})[start] = nxt
        self._quarantine(seq, start, buf[: nxt - start])
        return nxt

    def ack(self, position: Position) -> None:
        """Acknowledge every record up to and including the one at ``position``.

        Cumulative (like a Kafka offset); acknowledging an old position is a
        no-op.  Deletes segments that become fully acknowledged.  The new
        cursor is durable at once under ``"always"``, at the next ``sync()``
        under ``"batch"``.  Raises ``ValueError`` for a position the spool
        never handed out.
        """
        self._check_open()
        seq, off, idx = position
        if (seq, off) <= (self._rseq, self._roff):
            return
        size = self._sizes.get(seq)
        if size is None or off > size:
            raise ValueError("spool position %r is not a record of this spool" % (position,))
        before = self.pending_records
        self._rseq, self._roff, self._ridx = seq, off, idx
        if off == size and seq != self._wseq:
            nxt = self._next_segment(seq)
            assert nxt is not None  # a sealed segment has a successor
            self._rseq, self._roff, self._ridx = nxt, 0, 0
        self._acked_total += before - self.pending_records
        for s in [s for s in self._seqs if s < self._rseq]:
            self._delete_segment(s)
        self._meta_dirty = True
        if self._policy == "always":
            try:
                self.sync()
            except SpoolWriteError:
                self._log.failure("spool {path}: cannot persist read cursor", path=self._path)
        elif self._policy == "never":
            self._write_meta(durable=False)

    def _delete_segment(self, seq: int) -> None:
        if self._rfd_seq == seq and self._rfd is not None:
            os.close(self._rfd)
            self._rfd = self._rfd_seq = None
        fd = self._sealed_dirty.pop(seq, None)
        if fd is not None:
            os.close(fd)  # fully acknowledged: no need to make it durable
        if seq == self._wseq:
            assert self._wfd is not None
            os.close(self._wfd)
            self._wseq = self._wfd = None
            self._wdirty = False
        self._seqs.remove(seq)
        del self._sizes[seq]
        del self._counts[seq]
        self._bad.pop(seq, None)
        self._unlink_segment_file(seq)

    def _unlink_segment_file(self, seq: int) -> None:
        unlink_segment(self._path, seq, self._log)
        self._dir_dirty = True

    def _reclaim_drained(self) -> bool:
        """Delete the active segment if everything in it was acknowledged."""
        if self._wseq is None or self.pending_records:
            return False
        if (self._rseq, self._roff) != (self._wseq, self._sizes[self._wseq]):
            return False
        self._delete_segment(self._wseq)
        self._rseq, self._roff, self._ridx = self._next_seq, 0, 0
        self._meta_dirty = True
        if self._policy == "always":
            self.sync()
        elif self._policy == "never":
            self._write_meta(durable=False)
        return True

    # -- closing -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosedError("spool %s is closed" % (self._path,))

    def close(self) -> None:
        """Make state durable (per policy), delete a fully drained log, release the directory.

        Idempotent.
        """
        if self._closed:
            return
        try:
            self._reclaim_drained()
            if self._policy == "never":
                if self._meta_dirty:
                    self._write_meta(durable=False)
            else:
                self.sync()
        finally:
            self._closed = True
            self._close_fds()

    def _close_fds(self) -> None:
        fds = list(self._sealed_dirty.values())
        self._sealed_dirty.clear()
        for fd in (self._wfd, self._rfd, self._lock_fd):
            if fd is not None:
                fds.append(fd)
        self._wfd = self._rfd = self._lock_fd = None
        self._wseq = self._rfd_seq = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<Spool %s segments=%d pending=%d>" % (self._path, len(self._seqs), self.pending_records)
