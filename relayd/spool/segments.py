"""Segment files: their names, how to list them, and how bytes reach the disk.

A spool directory holds ``NNNNNNNNNNNNNNNNNNNN.seg`` files, named by a
20-digit, monotonically increasing sequence number so that lexical order is
log order.  A segment is a plain concatenation of records (see
`relayd.spool.record`); there is no file header.  Records never span
segments, only the newest segment is ever written to, the writer creates
segments and only the reader (``ack``) deletes them.

This module also owns the durability vocabulary: the ``fsync`` policy names
the configuration accepts (`FSYNC_POLICIES`, declared here once and imported
by `relayd.config`) and the two primitives every durable step goes through,
`fdatasync` (segment data) and `fsync_dir` (a created, renamed or deleted
directory entry).  Callers reach them as ``segments.fdatasync(...)`` so that
a test can observe or fail every fsync the spool issues in one place.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

from twisted.logger import Logger

__all__ = [
    "FSYNC_POLICIES",
    "DEFAULT_SEGMENT_BYTES",
    "SEGMENT_SUFFIX",
    "LOCK_NAME",
    "segment_name",
    "list_segments",
    "read_file",
    "fdatasync",
    "fsync_dir",
    "truncate_file",
    "unlink_segment",
]

FSYNC_POLICIES = ("always", "batch", "never")
"""``always``: every append is durable before it returns; ``batch``: durable
at ``sync()`` (group commit); ``never``: the OS decides."""

# 64 MiB: big enough that per-segment costs (create, fsync of the directory,
# unlink) vanish next to the data, small enough that one fully acknowledged
# segment is freed promptly.  Vector uses 128 MiB, NSQ 100 MiB.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

SEGMENT_SUFFIX = ".seg"
LOCK_NAME = "lock"


def segment_name(seq: int) -> str:
    """File name of segment ``seq`` (20 digits, so names sort in log order)."""
    return "%020d%s" % (seq, SEGMENT_SUFFIX)


def list_segments(path: str) -> Dict[int, str]:
    """Map sequence number -> file name for every well-formed segment name."""
    found: Dict[int, str] = {}
    for name in os.listdir(path):
        if name.endswith(SEGMENT_SUFFIX):
            stem = name[: -len(SEGMENT_SUFFIX)]
            if stem.isdigit():
                found[int(stem)] = name
    return found


def read_file(path: str) -> bytes:
    """A whole file's bytes (segments are scanned in one read at open)."""
    with open(path, "rb") as f:
        return f.read()


def fsync_dir(path: str) -> None:
    """Make the directory's entries (created, renamed, deleted files) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
"""Make a file's data durable (``fsync`` where ``fdatasync`` is missing)."""


def truncate_file(fname: str, size: int, durable: bool) -> None:
    """Cut a segment back to ``size`` bytes (a torn tail), fdatasync-ed if ``durable``."""
    fd = os.open(fname, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        if durable:
            fdatasync(fd)
    finally:
        os.close(fd)


def unlink_segment(path: str, seq: int, log: Logger) -> None:
    """Delete segment ``seq``'s file; a failure is logged, not raised.

    Harmless if it fails: recovery deletes segments behind the cursor.  The
    caller owes a directory fsync either way.
    """
    try:
        os.unlink(os.path.join(path, segment_name(seq)))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.error("spool {path}: cannot delete segment {seq}: {err}", path=path, seq=seq, err=e)
