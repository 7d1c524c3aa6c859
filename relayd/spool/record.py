"""One record on disk: its framing, its CRC32C, and the entry codec inside it.

Pure functions over bytes; no files, no clock.  Everything else in the spool
(appending, reading, recovery's scan, ``relayd spool verify``) agrees on what
a record looks like by importing it from here.

Record framing (all integers little-endian)::

    +-------------+----------------+------------------+------------------+
    | length  u32 | crc32c u32     | timestamp f64    | payload          |
    +-------------+----------------+------------------+------------------+
                   \\____ covers ____/  \\______ length bytes ______________/
                   (timestamp + payload)

``length`` counts timestamp + payload (so it is at least 8), ``crc32c`` is
CRC-32C (Castagnoli) over those ``length`` bytes, ``timestamp`` is the
append time in seconds from the injected clock.  Why per record and not per
segment: ``oldest_timestamp`` is then exact.  Why CRC-32C: hardware
accelerated (the ``crc32c`` package), and it is what Vector's ``disk_v2``
and Kafka use to tell a torn or rotten frame from a valid one.

Payloads are opaque to the spool; `encode_entry` / `decode_entry` are a tiny
codec for (Redis list key, item).  The daemon writes payloads through
`relayd.outbox.targets` (a record carries its target), whose list-target
encoding is byte-for-byte this entry format, so older spools replay.
"""

from __future__ import annotations

import struct
from typing import Optional, Tuple

from crc32c import crc32c

__all__ = [
    "encode_entry",
    "decode_entry",
    "encode_record",
    "decode_record",
    "frame_end",
    "HEADER",
    "TIMESTAMP",
    "U32",
    "HEADER_BYTES",
    "TS_BYTES",
    "FRAME_OVERHEAD",
    "MAX_PAYLOAD_BYTES",
    "MIN_LENGTH",
    "MAX_LENGTH",
]

# Hard cap on one payload: a sanity bound for recovery's length check.  Far
# above any HTTP body relayd accepts (1 MiB by default).
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

HEADER = struct.Struct("<II")  # length, crc32c
U32 = struct.Struct("<I")
TIMESTAMP = struct.Struct("<d")
HEADER_BYTES = HEADER.size  # 8
TS_BYTES = TIMESTAMP.size  # 8
FRAME_OVERHEAD = HEADER_BYTES + TS_BYTES  # 16 bytes around every payload
MIN_LENGTH = TS_BYTES
MAX_LENGTH = MAX_PAYLOAD_BYTES + TS_BYTES

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
    body = TIMESTAMP.pack(timestamp) + payload
    return HEADER.pack(len(body), crc32c(body)) + body


def decode_record(buf: bytes, offset: int = 0) -> Optional[Tuple[float, bytes, int]]:
    """Parse the frame at ``offset`` of ``buf``.

    Returns ``(timestamp, payload, next_offset)``, or ``None`` if the bytes at
    ``offset`` are not a complete frame whose length and CRC check out.
    """
    end = frame_end(buf, offset, len(buf))
    if end < 0:
        return None
    (ts,) = TIMESTAMP.unpack_from(buf, offset + HEADER_BYTES)
    return float(ts), bytes(buf[offset + FRAME_OVERHEAD : end]), end


def frame_end(buf: bytes, p: int, limit: int) -> int:
    """End offset of the valid frame at ``p`` (ending at or before ``limit``), else -1."""
    if p + HEADER_BYTES > limit:
        return -1
    length, crc = HEADER.unpack_from(buf, p)
    if length < MIN_LENGTH or length > MAX_LENGTH:
        return -1
    q = p + HEADER_BYTES + length
    if q > limit:
        return -1
    if crc32c(memoryview(buf)[p + HEADER_BYTES : q]) != crc:
        return -1
    return int(q)
