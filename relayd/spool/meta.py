"""The meta document: the spool's durable read cursor, built and written in one place.

``meta.json`` holds ``{"version", "segment", "offset", "acked", "crc"}``
where ``crc`` is the CRC32C of the other fields.  It names the point just
after the last acknowledged record (segment sequence number and byte offset)
and the number of records acknowledged over the directory's life.

Why it can be trusted so little: the cursor only ever covers acknowledged
records, so a stale cursor means duplicates, never loss; a missing, torn or
tampered document (failed CRC) simply makes recovery replay from the oldest
segment.  It is replaced atomically: ``meta.json.tmp`` -> fsync -> rename,
and the caller then fsyncs the directory (`relayd.spool.segments.fsync_dir`)
so that the rename itself is durable.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from crc32c import crc32c

from relayd.spool.segments import read_file

__all__ = ["META_NAME", "META_TMP_NAME", "META_VERSION", "Cursor", "meta_crc", "build_meta", "write_meta", "load_meta"]

META_NAME = "meta.json"
META_TMP_NAME = "meta.json.tmp"
META_VERSION = 1

Cursor = Tuple[int, int, int]
"""(segment, offset, acked): what ``meta.json`` persists."""


def meta_crc(segment: int, offset: int, acked: int) -> int:
    """The ``crc`` field: CRC32C over the three values, so a torn document is detected."""
    return crc32c(b"%d:%d:%d" % (segment, offset, acked))


def build_meta(segment: int, offset: int, acked: int) -> Dict[str, int]:
    """The meta document for a cursor (the one place that knows its fields)."""
    return {
        "version": META_VERSION,
        "segment": segment,
        "offset": offset,
        "acked": acked,
        "crc": meta_crc(segment, offset, acked),
    }


def write_meta(path: str, doc: Dict[str, int], durable: bool) -> None:
    """Replace ``meta.json`` in ``path`` atomically: tmp -> (fsync) -> rename.

    ``durable`` fsyncs the temporary file before the rename; the directory
    fsync that makes the rename durable is the caller's (it is shared with
    segment creation and deletion in one group commit).
    """
    tmp = os.path.join(path, META_TMP_NAME)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(doc, sort_keys=True).encode("ascii") + b"\n")
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, META_NAME))


def load_meta(path: str) -> Optional[Cursor]:
    """The (segment, offset, acked) cursor in ``meta.json``, or None if missing/invalid."""
    try:
        raw = read_file(os.path.join(path, META_NAME))
    except OSError:
        return None
    try:
        d = json.loads(raw.decode("utf-8"))
        seg, off, acked, crc = d["segment"], d["offset"], d["acked"], d["crc"]
        if d.get("version") != META_VERSION:
            return None
        for v in (seg, off, acked, crc):
            if type(v) is not int or v < 0:
                return None
        if crc != meta_crc(seg, off, acked):
            return None
        return seg, off, acked
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
