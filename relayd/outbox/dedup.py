"""Idempotent pushes: `DedupListTarget`, one script per batch that stores each request once.

A request that carries an ``Idempotency-Key`` travels as one *bundle* (its
key digest, its first message id and all its messages) to a
`DedupListTarget`.  The target writes a batch of bundles with one ``EVAL``:
for each bundle ``SET <marker> <first id> NX PX <window>``, and only when
the SET won are its messages pushed (``LPUSH``, in order).  A repeat gets
the first request's id back.  Because the SET and the push run in one
script, two copies racing through two processes or hosts can never both be
pushed; because the spool and the replay carry the same bundle to the same
script, a repeat that was spooled while Redis was down is dropped at
replay.

Cluster: the markers are companions of the list
(`relayd.redis.keys.companion`), so every key of the script is in the
list's slot.

A script does not roll back: the SET comes first, so a script that fails
half-way (out of memory) has marked bundles it did not push.  Redis only
fails a script that way on OOM with ``maxmemory``; the retry then answers
"duplicate" for them.  Documented in docs/idempotency.md.
"""

from __future__ import annotations

import struct
from typing import ClassVar, List, Optional, Sequence, Tuple

import attrs

from relayd.redis.keys import companion

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_HEADER = struct.Struct("<Q")  # window in ms

#: LPUSH at most this many values per call inside the script: Lua's unpack
#: has a C-stack limit of ~8000 arguments.
_SCRIPT = b"""
local window = ARGV[1]
local pos = 2
local out = {}
local push = {}
for i = 2, #KEYS do
  local id = ARGV[pos]
  local n = tonumber(ARGV[pos + 1])
  pos = pos + 2
  if redis.call('SET', KEYS[i], id, 'NX', 'PX', window) then
    for j = pos, pos + n - 1 do push[#push + 1] = ARGV[j] end
    out[#out + 1] = ''
  else
    out[#out + 1] = redis.call('GET', KEYS[i]) or ''
  end
  pos = pos + n
end
for k = 1, #push, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(push, k, math.min(k + 999, #push)))
end
return out
"""


def encode_bundle(digest: bytes, first_id: bytes, items: Sequence[bytes]) -> bytes:
    """One request's messages with its key digest and first id, as one buffer/spool item."""
    parts = [_U8.pack(len(digest)), digest, _U8.pack(len(first_id)), first_id, _U32.pack(len(items))]
    for item in items:
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_bundle(bundle: bytes) -> Tuple[bytes, bytes, List[bytes]]:
    """Inverse of `encode_bundle`; ``ValueError`` on malformed bytes."""
    try:
        pos = 0
        (n,) = _U8.unpack_from(bundle, pos)
        digest = bundle[pos + 1 : pos + 1 + n]
        pos += 1 + n
        (n,) = _U8.unpack_from(bundle, pos)
        first_id = bundle[pos + 1 : pos + 1 + n]
        pos += 1 + n
        (count,) = _U32.unpack_from(bundle, pos)
        pos += 4
        items = []
        for _ in range(count):
            (n,) = _U32.unpack_from(bundle, pos)
            pos += 4
            if pos + n > len(bundle):
                raise ValueError("bundle item runs past its end")
            items.append(bundle[pos : pos + n])
            pos += n
    except struct.error as e:
        raise ValueError(f"malformed bundle: {e}") from None
    if pos != len(bundle):
        raise ValueError("bundle has trailing bytes")
    return digest, first_id, items


@attrs.frozen(cache_hash=True)
class DedupListTarget:
    """A list whose requests are stored once per idempotency key within `window_ms`."""

    KIND: ClassVar[int] = 2
    key: bytes
    window_ms: int

    def marker(self, digest: bytes) -> bytes:
        """The key remembering one request, in the list's slot."""
        return companion(self.key, b"idem", digest)

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """One EVAL for the whole batch of bundles."""
        keys = [self.key]
        argv: List[bytes] = [b"%d" % self.window_ms]
        for bundle in items:
            digest, first_id, messages = decode_bundle(bundle)
            keys.append(self.marker(digest))
            argv.append(first_id)
            argv.append(b"%d" % len(messages))
            argv.extend(messages)
        return [(b"EVAL", _SCRIPT, b"%d" % len(keys), *keys, *argv)]

    def outcomes(self, replies: Sequence[object]) -> List[Optional[bytes]]:
        """Per bundle: None if it was stored now, else the id of the first copy."""
        reply = replies[0]
        assert isinstance(reply, list), reply
        return [r if r else None for r in reply]  # type: ignore[misc]

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Messages of the bundles that were stored now (duplicates pushed nothing)."""
        total = 0
        for i, bundle in enumerate(items):
            if outcomes is None or outcomes[i] is None:
                total += len(decode_bundle(bundle)[2])
        return total

    def spool_header(self) -> bytes:
        """Window and list key."""
        return _HEADER.pack(self.window_ms) + self.key

    @classmethod
    def from_spool_header(cls, header: bytes) -> DedupListTarget:
        """Inverse of `spool_header`."""
        if len(header) < _HEADER.size:
            raise ValueError("dedup target header too short")
        (window_ms,) = _HEADER.unpack_from(header, 0)
        return cls(header[_HEADER.size :], window_ms)
