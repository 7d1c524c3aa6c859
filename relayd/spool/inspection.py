"""Read-only inspection of a spool directory (``relayd spool inspect|verify``).

`scan_directory` reports what recovery would find without locking or
changing anything, so an operator can run it next to a live daemon (a record
being written at that moment may then show up as a torn tail).  It uses the
same frame walk as recovery (`relayd.spool.scan`) and the same cursor
(`relayd.spool.meta`), so "verify says clean" and "open finds nothing to
quarantine" cannot drift apart.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import attrs

from relayd.spool.errors import SpoolDirectoryError
from relayd.spool.meta import load_meta
from relayd.spool.scan import RESYNC_MIN_BOUND, scan_bytes
from relayd.spool.segments import list_segments, read_file

__all__ = ["SegmentReport", "ScanReport", "scan_directory"]


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
        names = list_segments(path)
    except OSError as e:
        raise SpoolDirectoryError("cannot list spool directory %s: %s" % (path, e.strerror)) from None
    meta = load_meta(path)
    seqs = sorted(names)
    if meta is None:
        cursor = (seqs[0] if seqs else 0, 0)
    else:
        cursor = (meta[0], meta[1])
    reports: List[SegmentReport] = []
    pending_records = 0
    pending_bytes = 0
    oldest: Optional[float] = None
    bound = RESYNC_MIN_BOUND
    for seq in seqs:
        try:
            buf = read_file(os.path.join(path, names[seq]))
        except OSError:
            buf = b""
        mark = cursor[1] if seq == cursor[0] else (0 if seq > cursor[0] else -1)
        scan = scan_bytes(buf, mark, bound)
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
