"""Redis key names that stay in one Cluster hash slot.

Redis Cluster runs a multi-key command or script only when all its keys are
in one slot.  A key's slot is CRC16 of its *hash tag* (the text between the
first ``{`` and the next ``}``, when non-empty) or of the whole key.  So a
list named ``leads`` and a companion ``{leads}:processing:p1`` share a slot
(both hash ``leads``), and a list that carries its own tag, ``{shop}:leads``,
keeps it: its companions are ``{shop}:leads:processing:p1``.

Every feature that keeps state next to a user's key (processing lists, retry
sets, dead letters, batch markers, idempotency keys) names it with
`companion`, so that the same code is correct on one Redis and on a cluster.
"""

from __future__ import annotations

SLOTS = 16384


def _tag_bounds(key: bytes) -> tuple[int, int] | None:
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return start + 1, end
    return None


def hash_tag(key: bytes) -> bytes:
    """The part of `key` that decides its slot (its ``{tag}``, or all of it)."""
    bounds = _tag_bounds(key)
    return key if bounds is None else key[bounds[0] : bounds[1]]


def companion(key: bytes, *parts: bytes) -> bytes:
    """A key for state that belongs to `key`, in `key`'s slot.

    ``companion(b"leads", b"processing", b"p1") == b"{leads}:processing:p1"``;
    ``companion(b"{shop}:leads", b"dead") == b"{shop}:leads:dead"``.
    Raises `ValueError` for a key with a ``}`` but no tag (config checks
    names with it, so this never happens at run time).
    """
    suffix = b"".join(b":" + p for p in parts)
    if _tag_bounds(key) is not None:
        return key + suffix
    if not key:
        raise ValueError("an empty key has no slot to share")
    if b"}" in key:
        # "{a}}" would hash "a", not "a}": no tag can name this key's slot.
        raise ValueError(f"key {key!r} has a '}}' outside a hash tag; no companion key can share its slot")
    return b"{" + key + b"}" + suffix


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The Redis Cluster slot of `key` (``CLUSTER KEYSLOT``)."""
    return crc16(hash_tag(key)) % SLOTS
