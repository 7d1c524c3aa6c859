"""What the spool raises on purpose, in one place so every layer can catch it.

The hierarchy encodes what a caller can do about each failure: a
`SpoolDirectoryError` (or `SpoolLockedError`) means the directory itself is
unusable and the daemon cannot start a spool there; `SpoolFull` means try
again after acknowledging (nothing was written); `SpoolWriteError` means the
disk refused a write or an fsync and carries the ``errno`` so callers can
tell a full disk from a failing one.  Contents never raise: recovery
quarantines corruption instead (see `relayd.spool.recovery`).
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "SpoolError",
    "SpoolDirectoryError",
    "SpoolLockedError",
    "SpoolFull",
    "SpoolWriteError",
    "SpoolClosedError",
]


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


class SpoolClosedError(SpoolError):
    """The `Spool` was used after ``close()``."""
