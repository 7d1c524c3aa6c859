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
read and ``ack()``.

On-disk layout (one directory per worker, one `Spool` per directory)
====================================================================
``NNNNNNNNNNNNNNNNNNNN.seg``
    Segment files, named by a 20-digit, monotonically increasing sequence
    number, so lexical order is log order.  A segment is a plain
    concatenation of records; there is no file header.
``meta.json``
    The durable read cursor: ``{"version", "segment", "offset", "acked",
    "crc"}`` where ``crc`` is the CRC32C of the other fields.  Written as
    ``meta.json.tmp`` -> fsync -> rename -> fsync(directory).
``lock``
    ``flock``-ed for the lifetime of the `Spool`: two processes never share
    a directory.
``quarantine/<segment>-<offset>.bad``
    Verbatim copies of byte ranges that recovery had to skip.

Record framing (all integers little-endian)::

    +-------------+----------------+------------------+------------------+
    | length  u32 | crc32c u32     | timestamp f64    | payload          |
    +-------------+----------------+------------------+------------------+
                   \\____ covers ____/  \\______ length bytes ______________/
                   (timestamp + payload)

``length`` counts timestamp + payload (so it is at least 8), ``crc32c`` is
CRC-32C (Castagnoli) over those ``length`` bytes, ``timestamp`` is the
append time in seconds from the injected clock.  Payloads are opaque bytes;
`encode_entry` / `decode_entry` are a tiny codec for (Redis list key, item).

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
import json
import os
import re
import struct
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attrs
from crc32c import crc32c
from twisted.logger import Logger

__all__ = [
    "Spool",
    "SpoolError",
    "SpoolDirectoryError",
    "SpoolLockedError",
    "SpoolFull",
    "SpoolWriteError",
    "SpoolClosedError",
    "Position",
    "ScanReport",
    "SegmentReport",
    "encode_entry",
    "decode_entry",
    "encode_record",
    "decode_record",
    "scan_directory",
    "FSYNC_POLICIES",
    "DEFAULT_SEGMENT_BYTES",
    "MAX_PAYLOAD_BYTES",
    "FRAME_OVERHEAD",
]

FSYNC_POLICIES = ("always", "batch", "never")

# 64 MiB: big enough that per-segment costs (create, fsync of the directory,
# unlink) vanish next to the data, small enough that one fully acknowledged
# segment is freed promptly.  Vector uses 128 MiB, NSQ 100 MiB.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

# Hard cap on one payload: a sanity bound for recovery's length check.  Far
# above any HTTP body relayd accepts (1 MiB by default).
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

_HEADER = struct.Struct("<II")  # length, crc32c
_U32 = struct.Struct("<I")
_TS = struct.Struct("<d")
HEADER_BYTES = _HEADER.size  # 8
TS_BYTES = _TS.size  # 8
FRAME_OVERHEAD = HEADER_BYTES + TS_BYTES  # 16 bytes around every payload
_MIN_LENGTH = TS_BYTES
_MAX_LENGTH = MAX_PAYLOAD_BYTES + TS_BYTES

# Resync only considers candidate frames up to this length unless larger
# records have been seen: 1 MiB is relayd's default HTTP body cap.
_RESYNC_MIN_BOUND = 1024 * 1024 + TS_BYTES
# Resync candidates longer than this must also be followed by a plausible
# header (or end of data), which keeps random garbage cheap to scan.
_CHAIN_CHECK_LENGTH = 64 * 1024
# Bounds on one pread when replaying: at least a page or so, at most a few
# batches' worth (the consumer asks for ~1000 records / 1 MiB at a time).
_READ_CHUNK_MIN = 4096
_READ_CHUNK_MAX = 4 * 1024 * 1024

SEGMENT_SUFFIX = ".seg"
META_NAME = "meta.json"
META_TMP_NAME = "meta.json.tmp"
LOCK_NAME = "lock"
QUARANTINE_DIR = "quarantine"
_META_VERSION = 1

Position = Tuple[int, int, int]
"""Opaque, totally ordered token naming the point just after one record.

Compare positions with ``<``; hand them back to `Spool.ack` or to
`Spool.read` (``after=``).  Do not build or pick them apart yourself.
"""


# --------------------------------------------------------------------------
# Errors


class SpoolError(Exception):
    """Base class for everything the spool raises on purpose."""


class SpoolDirectoryError(SpoolError):
    """The spool directory cannot be created, opened, locked or written."""


class SpoolLockedError(SpoolDirectoryError):
    """Another `Spool` (probably another process) holds this directory."""


class SpoolFull(SpoolError):
    """Appending would take the spool past ``max_bytes``; nothing was written."""


class SpoolWriteError(SpoolError):
    """The disk refused a write or fsync (ENOSPC, EIO, EDQUOT, EFBIG, ...).

    After an ``append`` failure the log is unchanged.  After a ``sync``
    failure, records appended since the previous successful sync must be
    treated as not durable (their producers should see an error).
    ``errno`` carries the underlying error number.
    """

    def __init__(self, message: str, errno_: Optional[int] = None) -> None:
        super().__init__(message)
        self.errno = errno_


@attrs.define
class SyncPlan:
    """What one group commit makes durable (see `Spool.begin_sync`)."""

    path: str
    fds: List[int]  # owned: closed by `run_sync`
    dir: bool
    meta: Optional[Dict[str, int]]


def run_sync(plan: SyncPlan) -> None:
    """Perform a plan: fdatasync the segments, then the directory and the cursor.

    Touches only the plan's own fds and files, so it may run in a thread
    while the owning `Spool` keeps appending.  Raises OSError.
    """
    try:
        for fd in plan.fds:
            _fdatasync(fd)
    finally:
        for fd in plan.fds:
            os.close(fd)
    if plan.meta is not None:
        tmp = os.path.join(plan.path, META_TMP_NAME)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(plan.meta, sort_keys=True).encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(plan.path, META_NAME))
    if plan.dir or plan.meta is not None:
        _fsync_dir(plan.path)


class SpoolClosedError(SpoolError):
    """The `Spool` was used after ``close()``."""


# --------------------------------------------------------------------------
# Entry codec and record framing (pure functions)

_ENTRY_KEY_LEN = struct.Struct("<I")


def encode_entry(list_key: bytes, item: bytes) -> bytes:
    """Pack a Redis list key and one item into a spool payload.

    Layout: ``key length (u32 LE) + key + item``; the item takes the rest, so
    any bytes round-trip.
    """
    return _ENTRY_KEY_LEN.pack(len(list_key)) + list_key + item


def decode_entry(payload: bytes) -> Tuple[bytes, bytes]:
    """Inverse of `encode_entry`; raises ``ValueError`` on a malformed payload."""
    if len(payload) < 4:
        raise ValueError("spool entry shorter than its key-length field")
    (klen,) = _ENTRY_KEY_LEN.unpack_from(payload, 0)
    if 4 + klen > len(payload):
        raise ValueError("spool entry key length runs past the payload")
    return payload[4 : 4 + klen], payload[4 + klen :]


def encode_record(payload: bytes, timestamp: float) -> bytes:
    """Frame one payload as it is stored on disk (see the module docstring)."""
    body = _TS.pack(timestamp) + payload
    return _HEADER.pack(len(body), crc32c(body)) + body


def decode_record(buf: bytes, offset: int = 0) -> Optional[Tuple[float, bytes, int]]:
    """Parse the frame at ``offset`` of ``buf``.

    Returns ``(timestamp, payload, next_offset)``, or ``None`` if the bytes at
    ``offset`` are not a complete frame whose length and CRC check out.
    """
    end = _frame_end(buf, offset, len(buf))
    if end < 0:
        return None
    (ts,) = _TS.unpack_from(buf, offset + HEADER_BYTES)
    return ts, bytes(buf[offset + FRAME_OVERHEAD : end]), end


def _frame_end(buf: bytes, p: int, limit: int) -> int:
    """End offset of the valid frame at ``p`` (ending at or before ``limit``), else -1."""
    if p + HEADER_BYTES > limit:
        return -1
    length, crc = _HEADER.unpack_from(buf, p)
    if length < _MIN_LENGTH or length > _MAX_LENGTH:
        return -1
    q = p + HEADER_BYTES + length
    if q > limit:
        return -1
    if crc32c(memoryview(buf)[p + HEADER_BYTES : q]) != crc:
        return -1
    return q


_resync_patterns: Dict[int, re.Pattern[bytes]] = {}


def _resync_pattern(bound: int) -> re.Pattern[bytes]:
    """Regex matching offsets whose u32 LE could be a length in [8, bound] (bound < 2**24).

    Pure function of ``bound``; compiled patterns are cached (immutable values).
    """
    hi = min(bound >> 16, 0xFF)
    pat = _resync_patterns.get(hi)
    if pat is None:
        alts = [rb"[\x08-\xff]\x00\x00\x00", rb".[\x01-\xff]\x00\x00"]
        if hi >= 1:
            alts.append(rb"..[\x01-" + b"\\x%02x" % hi + rb"]\x00")
        pat = re.compile(rb"(?=" + b"|".join(alts) + rb")", re.DOTALL)
        _resync_patterns[hi] = pat
    return pat


_NONZERO_RUN = re.compile(rb"[^\x00]+")


def _resync(buf: bytes, start: int, limit: int, bound: int) -> int:
    """First offset after ``start`` where a valid frame begins, or ``limit`` if none.

    ``buf[:limit]`` holds the data; only lengths up to ``bound`` are tried.
    A plausible length (8 <= n < 2**24) has a non-zero byte among its low
    three bytes, so candidates lie just before or inside runs of non-zero
    bytes: zero-filled ranges (a crash's usual leftover) are skipped at
    memchr-like speed instead of being tried offset by offset.
    """
    bound = min(bound, (1 << 24) - 1)
    mv = memoryview(buf)
    unpack = _HEADER.unpack_from
    search = _resync_pattern(bound).search
    c = start + 1
    for run in _NONZERO_RUN.finditer(buf, start + 1, limit):
        c = max(c, run.start() - 3)
        window_end = min(limit, run.end() + 3)
        while True:
            m = search(buf, c, window_end)
            if m is None:
                break
            c = m.start()
            if c + HEADER_BYTES > limit:
                return limit
            length, crc = unpack(buf, c)
            c += 1
            if length > bound:
                continue
            q = c - 1 + HEADER_BYTES + length
            if q > limit:
                continue
            if length > _CHAIN_CHECK_LENGTH and q != limit:
                if q + HEADER_BYTES > limit:
                    continue
                (nxt,) = _U32.unpack_from(buf, q)
                if nxt < _MIN_LENGTH or q + HEADER_BYTES + nxt > limit:
                    continue
            if crc32c(mv[c - 1 + HEADER_BYTES : q]) == crc:
                return c - 1
        c = max(c, run.end())
    return limit


@attrs.define
class _SegmentScan:
    """What one pass over a segment's bytes found."""

    records: int = 0
    # (start, end) of ranges that are not valid frames but are followed by one.
    bad: List[Tuple[int, int]] = attrs.field(factory=list)
    # Start of a trailing range with no valid frame after it (torn tail), or None.
    tail: Optional[int] = None
    # Record index at ``mark`` if ``mark`` is a frame boundary, else None.
    mark_index: Optional[int] = None
    # Timestamp of the first record at or after ``mark``.
    first_ts: Optional[float] = None
    largest: int = 0


def _scan_bytes(buf: bytes, mark: int, bound: int) -> _SegmentScan:
    """Walk every frame of one segment's contents, noting records and bad ranges."""
    out = _SegmentScan()
    limit = len(buf)
    p = 0
    records = 0
    largest = 0
    mv = memoryview(buf)
    unpack = _HEADER.unpack_from
    while p < limit:
        if p == mark:
            out.mark_index = records
        q = -1
        if p + HEADER_BYTES <= limit:
            length, crc = unpack(buf, p)
            if _MIN_LENGTH <= length <= _MAX_LENGTH:
                q = p + HEADER_BYTES + length
                if q > limit or crc32c(mv[p + HEADER_BYTES : q]) != crc:
                    q = -1
                elif length > largest:
                    largest = length
        if q < 0:
            nxt = _resync(buf, p, limit, max(bound, largest))
            if nxt >= limit:
                out.tail = p
                break
            if p < mark < nxt:
                mark = -1  # the cursor points into garbage; not a boundary
            out.bad.append((p, nxt))
            p = nxt
            continue
        if out.first_ts is None and p >= mark >= 0:
            (out.first_ts,) = _TS.unpack_from(buf, p + HEADER_BYTES)
        records += 1
        p = q
    if p == mark and out.tail is None:
        out.mark_index = records
    out.records = records
    out.largest = largest
    return out


# --------------------------------------------------------------------------
# Small file-system helpers


def _segment_name(seq: int) -> str:
    return "%020d%s" % (seq, SEGMENT_SUFFIX)


def _list_segments(path: str) -> Dict[int, str]:
    """Map sequence number -> file name for every well-formed segment name."""
    found: Dict[int, str] = {}
    for name in os.listdir(path):
        if name.endswith(SEGMENT_SUFFIX):
            stem = name[: -len(SEGMENT_SUFFIX)]
            if stem.isdigit():
                found[int(stem)] = name
    return found


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fdatasync = getattr(os, "fdatasync", os.fsync)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _meta_crc(segment: int, offset: int, acked: int) -> int:
    return crc32c(b"%d:%d:%d" % (segment, offset, acked))


def _load_meta(path: str) -> Optional[Tuple[int, int, int]]:
    """The (segment, offset, acked) cursor in ``meta.json``, or None if missing/invalid."""
    try:
        raw = _read_file(os.path.join(path, META_NAME))
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        d = json.loads(raw.decode("utf-8"))
        seg, off, acked, crc = d["segment"], d["offset"], d["acked"], d["crc"]
        if d.get("version") != _META_VERSION:
            return None
        for v in (seg, off, acked, crc):
            if type(v) is not int or v < 0:
                return None
        if crc != _meta_crc(seg, off, acked):
            return None
        return seg, off, acked
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------
# Read-only inspection (used by `relayd spool inspect/verify`)


@attrs.frozen
class SegmentReport:
    """One segment as `scan_directory` saw it."""

    sequence: int
    size: int
    records: int
    corrupt_ranges: Tuple[Tuple[int, int], ...]
    torn_tail: Optional[int]


@attrs.frozen
class ScanReport:
    """Read-only summary of a spool directory; no file is modified."""

    segments: Tuple[SegmentReport, ...]
    meta_ok: bool
    cursor: Tuple[int, int]
    pending_records: int
    pending_bytes: int
    oldest_timestamp: Optional[float]

    @property
    def corrupt_ranges(self) -> int:
        """Number of mid-log ranges that recovery would quarantine."""
        return sum(len(s.corrupt_ranges) for s in self.segments)


def scan_directory(path: str) -> ScanReport:
    """Scan a spool directory without locking or changing it.

    Every CRC of every segment is checked.  Safe to run against a live spool
    (a record being written may then show up as a torn tail).  Raises
    ``SpoolDirectoryError`` if ``path`` is not a readable directory.
    """
    try:
        names = _list_segments(path)
    except OSError as e:
        raise SpoolDirectoryError("cannot list spool directory %s: %s" % (path, e.strerror)) from None
    meta = _load_meta(path)
    seqs = sorted(names)
    if meta is None:
        cursor = (seqs[0] if seqs else 0, 0)
    else:
        cursor = (meta[0], meta[1])
    reports = []
    pending_records = 0
    pending_bytes = 0
    oldest: Optional[float] = None
    bound = _RESYNC_MIN_BOUND
    for seq in seqs:
        try:
            buf = _read_file(os.path.join(path, names[seq]))
        except OSError:
            buf = b""
        mark = cursor[1] if seq == cursor[0] else (0 if seq > cursor[0] else -1)
        scan = _scan_bytes(buf, mark, bound)
        bound = max(bound, scan.largest)
        reports.append(
            SegmentReport(
                sequence=seq,
                size=len(buf),
                records=scan.records,
                corrupt_ranges=tuple(scan.bad),
                torn_tail=scan.tail,
            )
        )
        if seq < cursor[0]:
            continue
        start_idx = scan.mark_index if scan.mark_index is not None else 0
        start_off = mark if scan.mark_index is not None else 0
        pending_records += max(0, scan.records - start_idx)
        pending_bytes += max(0, len(buf) - start_off)
        if oldest is None and scan.first_ts is not None:
            oldest = scan.first_ts
    return ScanReport(
        segments=tuple(reports),
        meta_ok=meta is not None,
        cursor=cursor,
        pending_records=pending_records,
        pending_bytes=pending_bytes,
        oldest_timestamp=oldest,
    )


# --------------------------------------------------------------------------
# The spool


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
        self._resync_bound = _RESYNC_MIN_BOUND
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
        path = self._path
        try:
            os.unlink(os.path.join(path, META_TMP_NAME))
        except FileNotFoundError:
            pass
        names = _list_segments(path)
        seqs = sorted(names)
        meta = _load_meta(path)
        changed = False
        if meta is None:
            if seqs or os.path.exists(os.path.join(path, META_NAME)):
                self._log.warn(
                    "spool {path}: metadata missing or invalid; replaying from the oldest segment",
                    path=path,
                )
            rseq, roff = (seqs[0] if seqs else 0), 0
            self._acked_total = 0
            changed = True
        else:
            rseq, roff, self._acked_total = meta
        # Segments before the cursor were fully acknowledged; their deletion
        # just had not reached the disk.
        for seq in [s for s in seqs if s < rseq]:
            self._unlink_segment_file(seq)
            seqs.remove(seq)
            changed = True
        self._next_seq = max([rseq] + [s + 1 for s in seqs])
        if rseq not in names:
            # The cursor's segment was deleted (fully acknowledged).
            rseq, roff = (seqs[0] if seqs else self._next_seq), 0
            changed = True
        ridx = 0
        last = seqs[-1] if seqs else None
        for seq in seqs:
            fname = os.path.join(path, names[seq])
            try:
                buf = _read_file(fname)
            except OSError as e:
                # Unreadable file: nothing in it can be served.  Leave it for
                # an operator, count it, carry on with the next segment.
                self._log.error("spool {path}: cannot read segment {seq}: {err}", path=path, seq=seq, err=e)
                self._corrupt += 1
                self._sizes[seq] = 0
                self._counts[seq] = 0
                self._bad[seq] = {}
                self._seqs.append(seq)
                continue
            mark = roff if seq == rseq else 0
            scan = _scan_bytes(buf, mark, self._resync_bound)
            self._resync_bound = max(self._resync_bound, scan.largest)
            size = len(buf)
            tail = scan.tail
            if tail is not None:
                if seq == last:
                    # Torn tail of the newest segment: a write that never
                    # completed.  Cut it off so appends resume on a boundary.
                    self._torn_bytes += size - tail
                    self._truncate_file(fname, tail)
                    size = tail
                    if seq == rseq and roff > size:
                        # The cursor had acknowledged past what survived.
                        roff = size
                        scan = _scan_bytes(buf[:size], roff, self._resync_bound)
                else:
                    scan.bad.append((tail, size))
            if seq == rseq:
                if scan.mark_index is None:
                    self._log.warn(
                        "spool {path}: read cursor {seq}:{off} is not a record boundary; "
                        "replaying the segment from its start",
                        path=path,
                        seq=seq,
                        off=roff,
                    )
                    roff, ridx, changed = 0, 0, True
                else:
                    ridx = scan.mark_index
            if size == 0 and seq != last:
                self._unlink_segment_file(seq)
                if seq == rseq:
                    rseq = seq + 1
                    roff = ridx = 0
                    changed = True
                continue
            self._sizes[seq] = size
            self._counts[seq] = scan.records
            self._bad[seq] = dict(scan.bad)
            self._seqs.append(seq)
            for start, end in scan.bad:
                if seq > rseq or start >= roff:
                    self._quarantine(seq, start, buf[start:end])
        if self._seqs and rseq < self._seqs[0]:
            rseq, roff, ridx = self._seqs[0], 0, 0
        self._rseq, self._roff, self._ridx = rseq, roff, ridx
        if self._seqs:
            self._wseq = self._seqs[-1]
            self._wfd = os.open(os.path.join(path, _segment_name(self._wseq)), os.O_RDWR | os.O_CLOEXEC)
        self._meta_dirty = changed
        if changed or self._dir_dirty:
            self._write_meta(durable=self._policy != "never")
        if self._corrupt or self._torn_bytes:
            self._log.warn(
                "spool {path}: recovered; skipped {corrupt} corrupt range(s) into quarantine/, "
                "truncated {torn} byte(s) of torn tail",
                path=path,
                corrupt=self._corrupt,
                torn=self._torn_bytes,
            )

    def _truncate_file(self, fname: str, size: int) -> None:
        fd = os.open(fname, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if self._policy != "never":
                _fdatasync(fd)
        finally:
            os.close(fd)

    def _quarantine(self, seq: int, start: int, data: bytes) -> None:
        """Count a corrupt range and keep a copy of its bytes for forensics."""
        self._corrupt += 1
        qdir = os.path.join(self._path, QUARANTINE_DIR)
        name = os.path.join(qdir, "%s-%d.bad" % (_segment_name(seq)[: -len(SEGMENT_SUFFIX)], start))
        self._log.error(
            "spool {path}: corrupt range at segment {seq} offset {start} ({n} bytes) quarantined as {name}",
            path=self._path,
            seq=seq,
            start=start,
            n=len(data),
            name=name,
        )
        if os.path.exists(name):
            return  # quarantined by an earlier run
        try:
            os.makedirs(qdir, exist_ok=True)
            tmp = name + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                if self._policy != "never":
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, name)
            self._dir_dirty = True
        except OSError as e:
            # Quarantine is best effort: the bytes stay in the segment anyway.
            self._log.error("spool {path}: cannot write quarantine file: {err}", path=self._path, err=e)

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
            (ts,) = _TS.unpack(raw)
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
        tsb = _TS.pack(float(self._clock()))
        seed = crc32c(tsb)
        pack = _HEADER.pack
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
                        os.path.join(self._path, _segment_name(seq)),
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
                os.unlink(os.path.join(self._path, _segment_name(seq)))
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
            seg, off, acked = self._rseq, self._roff, self._acked_total
            meta = {"version": _META_VERSION, "segment": seg, "offset": off, "acked": acked, "crc": _meta_crc(seg, off, acked)}
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
        seg, off, acked = self._rseq, self._roff, self._acked_total
        doc = {"version": _META_VERSION, "segment": seg, "offset": off, "acked": acked, "crc": _meta_crc(seg, off, acked)}
        tmp = os.path.join(self._path, META_TMP_NAME)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(doc, sort_keys=True).encode("ascii") + b"\n")
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self._path, META_NAME))
        if durable:
            _fsync_dir(self._path)
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
            self._rfd = os.open(os.path.join(self._path, _segment_name(seq)), os.O_RDONLY | os.O_CLOEXEC)
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
        unpack = _HEADER.unpack_from
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
                if length < _MIN_LENGTH or length > _MAX_LENGTH or off + q > size:
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
        nxt = start + _resync(buf, 0, len(buf), self._resync_bound)
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
        try:
            os.unlink(os.path.join(self._path, _segment_name(seq)))
        except FileNotFoundError:
            pass
        except OSError as e:
            # Harmless: recovery deletes segments behind the cursor.
            self._log.error("spool {path}: cannot delete segment {seq}: {err}", path=self._path, seq=seq, err=e)
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
