"""Walking a segment's bytes: find every valid frame and every bad range between them.

Pure functions over bytes, shared by recovery at open
(`relayd.spool.recovery`), by `Spool.read` when it meets corruption that
appeared after open, and by the read-only ``relayd spool verify``
(`relayd.spool.inspection`).

Why resynchronisation is careful: one bad record must never condemn the
rest of a file (NSQ's failure mode), so after a frame fails its length or
CRC check, the scan looks for the next offset whose length and CRC verify.
That tries every byte offset, so it must be cheap: candidates are
pre-filtered in C (a regex on the length field), zero-filled ranges (a
crash's usual leftover) are skipped at memchr-like speed, and only lengths
up to the largest record seen (at least 1 MiB) are considered.  A segment of
random garbage costs seconds, not hours.  A record larger than that bound
which directly follows a corrupt range is quarantined with it.  A false
resync needs a random 32-bit CRC match.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import attrs
from crc32c import crc32c

from relayd.spool.record import HEADER, HEADER_BYTES, MAX_LENGTH, MIN_LENGTH, TIMESTAMP, TS_BYTES, U32

__all__ = ["RESYNC_MIN_BOUND", "SegmentScan", "scan_bytes", "resync"]

# Resync only considers candidate frames up to this length unless larger
# records have been seen: 1 MiB is relayd's default HTTP body cap.
RESYNC_MIN_BOUND = 1024 * 1024 + TS_BYTES
# Resync candidates longer than this must also be followed by a plausible
# header (or end of data), which keeps random garbage cheap to scan.
_CHAIN_CHECK_LENGTH = 64 * 1024

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


def resync(buf: bytes, start: int, limit: int, bound: int) -> int:
    """First offset after ``start`` where a valid frame begins, or ``limit`` if none.

    ``buf[:limit]`` holds the data; only lengths up to ``bound`` are tried.
    A plausible length (8 <= n < 2**24) has a non-zero byte among its low
    three bytes, so candidates lie just before or inside runs of non-zero
    bytes: zero-filled ranges (a crash's usual leftover) are skipped at
    memchr-like speed instead of being tried offset by offset.
    """
    bound = min(bound, (1 << 24) - 1)
    mv = memoryview(buf)
    unpack = HEADER.unpack_from
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
                (nxt,) = U32.unpack_from(buf, q)
                if nxt < MIN_LENGTH or q + HEADER_BYTES + nxt > limit:
                    continue
            if crc32c(mv[c - 1 + HEADER_BYTES : q]) == crc:
                return c - 1
        c = max(c, run.end())
    return limit


@attrs.define
class SegmentScan:
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


def scan_bytes(buf: bytes, mark: int, bound: int) -> SegmentScan:
    """Walk every frame of one segment's contents, noting records and bad ranges.

    ``mark`` is an offset of interest (the read cursor; -1 for none): the
    result says whether it is a frame boundary and which record starts there.
    """
    out = SegmentScan()
    limit = len(buf)
    p = 0
    records = 0
    largest = 0
    mv = memoryview(buf)
    unpack = HEADER.unpack_from
    while p < limit:
        if p == mark:
            out.mark_index = records
        q = -1
        if p + HEADER_BYTES <= limit:
            length, crc = unpack(buf, p)
            if MIN_LENGTH <= length <= MAX_LENGTH:
                q = p + HEADER_BYTES + length
                if q > limit or crc32c(mv[p + HEADER_BYTES : q]) != crc:
                    q = -1
                elif length > largest:
                    largest = length
        if q < 0:
            nxt = resync(buf, p, limit, max(bound, largest))
            if nxt >= limit:
                out.tail = p
                break
            if p < mark < nxt:
                mark = -1  # the cursor points into garbage; not a boundary
            out.bad.append((p, nxt))
            p = nxt
            continue
        if out.first_ts is None and p >= mark >= 0:
            (out.first_ts,) = TIMESTAMP.unpack_from(buf, p + HEADER_BYTES)
        records += 1
        p = q
    if p == mark and out.tail is None:
        out.mark_index = records
    out.records = records
    out.largest = largest
    return out
