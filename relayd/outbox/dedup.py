"""Idempotent pushes: `DedupListTarget`, one script per batch that stores each request once.

A request that carries an ``Idempotency-Key`` travels as one *bundle* (its
key digest, its first message id and all its messages) to a
`DedupListTarget`.  The target writes a batch of bundles with one ``EVALSHA``:
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

Cost (issue 14: at most 15 % slower than a POST without a key): one
EVALSHA per batch, one-message bundles sliced rather than decoded, and a
reply that is an empty array unless a bundle was a duplicate.  Figures and
the benchmark: docs/benchmarks.md, "Idempotency-Key cost".
"""

from __future__ import annotations

import struct
from operator import itemgetter
from typing import ClassVar, List, Optional, Sequence, Tuple

import attrs

from relayd.redis.keys import companion
from relayd.redis.scripts import Script

_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")  # message count + the first message's length
_HEADER = struct.Struct("<Q")  # window in ms

#: KEYS: the list, then one marker per bundle.  ARGV: the window (ms), the
#: bundles' message counts (empty when every bundle holds one message, the
#: hot path: one POST, one message; else "n1,n2,.."), then per bundle its
#: first id and its messages.  Returns an empty array when every bundle was
#: stored (the common case: nothing to parse), else one entry per bundle: ''
#: if stored, else the first copy's id.  LPUSH at most 1000 values per call:
#: Lua's unpack has a C-stack limit of ~8000 arguments.  Run by EVALSHA
#: (`Script`): a batch does not carry the script text, and Redis does not
#: hash it per call.
#:
#: Two loops, one semantics.  The hot path (one message per bundle, Redis >=
#: 7.0, which is when ``redis.REDIS_VERSION_NUM`` exists and SET takes NX
#: with GET) marks and reads a repeat's first id in one call whose reply is
#: nil when the SET won (no reply table to build), reads the id and the
#: message at fixed places (2i-1, 2i) and builds the answer only once a
#: repeat shows up: ~7 % fewer instructions in Redis per keyed request than
#: the general loop (docs/benchmarks.md, "Idempotency-Key cost").  The
#: general loop serves NDJSON bundles and Redis < 7.0.
_SCRIPT = Script(
    """
local window = ARGV[1]
local out = nil
local push = {}
local np = 0
if ARGV[2] == '' and redis.REDIS_VERSION_NUM then
  for i = 2, #KEYS do
    local first = redis.call('SET', KEYS[i], ARGV[i + i - 1], 'NX', 'GET', 'PX', window)
    if first then
      if not out then
        out = {}
        for k = 1, i - 2 do out[k] = '' end
      end
      out[i - 1] = first
    else
      np = np + 1
      push[np] = ARGV[i + i]
      if out then out[i - 1] = '' end
    end
  end
else
  local counts = {}
  if ARGV[2] ~= '' then
    for c in string.gmatch(ARGV[2], '%d+') do counts[#counts + 1] = tonumber(c) end
  end
  local dup = false
  local pos = 3
  out = {}
  for i = 2, #KEYS do
    local n = counts[i - 1] or 1
    if redis.call('SET', KEYS[i], ARGV[pos], 'NX', 'PX', window) then
      for j = pos + 1, pos + n do
        np = np + 1
        push[np] = ARGV[j]
      end
      out[i - 1] = ''
    else
      dup = true
      out[i - 1] = redis.call('GET', KEYS[i]) or ''
    end
    pos = pos + 1 + n
  end
  if not dup then out = nil end
end
for k = 1, np, 1000 do
  redis.call('LPUSH', KEYS[1], unpack(push, k, math.min(k + 999, np)))
end
return out or {}
"""
)


#: First byte of a *single* bundle: one message, a 32-byte digest and a
#: 30-byte id at fixed places, the message after them (no length fields).
#: The general layout starts with the digest's length, which is never 255.
SINGLE = 0xFF
_SINGLE_TAG = b"\xff"
_DIGEST_LEN = 32  # `relayd.ingest.idempotency.key_digest`: 16 bytes, hex
_ID_LEN = 30  # `relayd.ids`: 30 hex digits
_SINGLE_HEAD = 1 + _DIGEST_LEN + _ID_LEN
_TAG = itemgetter(slice(0, 1))  # a slice: an empty bundle has no first byte
_SINGLE_DIGEST = itemgetter(slice(1, 1 + _DIGEST_LEN))
_SINGLE_ID = itemgetter(slice(1 + _DIGEST_LEN, _SINGLE_HEAD))
_SINGLE_MESSAGE = itemgetter(slice(_SINGLE_HEAD, None))


def encode_bundle(digest: bytes, first_id: bytes, items: Sequence[bytes]) -> bytes:
    """One request's messages with its key digest and first id, as one buffer/spool item.

    The hot path, one POST with one message and the usual digest and id
    sizes, is a *single* bundle: ``0xff, digest (32), first id (30),
    message``, so that `DedupListTarget.commands` cuts a whole batch of
    them with C-level slicing (no per-bundle Python).  Anything else:
    ``u8 len, digest, u8 len, first id, u32 count, (u32 len, message)*``
    (little endian), the layout every release reads (spools written before
    the single layout hold only this one).
    """
    if len(items) == 1 and len(digest) == _DIGEST_LEN and len(first_id) == _ID_LEN:
        return b"".join((_SINGLE_TAG, digest, first_id, items[0]))
    if len(digest) >= SINGLE:  # its length byte would read as the single tag
        raise ValueError(f"digest of {len(digest)} bytes; at most {SINGLE - 1}")
    parts = [_U8.pack(len(digest)), digest, _U8.pack(len(first_id)), first_id, _U32.pack(len(items))]
    for item in items:
        parts.append(_U32.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_bundle(bundle: bytes) -> Tuple[bytes, bytes, List[bytes]]:
    """Inverse of `encode_bundle`; ``ValueError`` on malformed bytes."""
    if bundle[:1] == _SINGLE_TAG:
        if len(bundle) < _SINGLE_HEAD:
            raise ValueError("single bundle shorter than its digest and id")
        return _SINGLE_DIGEST(bundle), _SINGLE_ID(bundle), [_SINGLE_MESSAGE(bundle)]
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


def _count_at(bundle: bytes) -> int:
    """Where a bundle's message count starts (after its digest and first id)."""
    dlen = bundle[0]
    return 2 + dlen + bundle[1 + dlen]


def message_count(bundle: bytes) -> int:
    """How many messages `bundle` holds, without decoding them."""
    if bundle[:1] == _SINGLE_TAG:
        return 1
    try:
        return int(_U32.unpack_from(bundle, _count_at(bundle))[0])
    except (IndexError, struct.error) as e:
        raise ValueError(f"malformed bundle: {e}") from None


def _all_single(items: Sequence[bytes]) -> bool:
    """Is every bundle of `items` a well-formed single one?  (C-level passes, no Python per bundle.)"""
    return set(map(_TAG, items)) == {_SINGLE_TAG} and min(map(len, items)) >= _SINGLE_HEAD


@attrs.frozen(cache_hash=True)
class DedupListTarget:
    """A list whose requests are stored once per idempotency key within `window_ms`."""

    KIND: ClassVar[int] = 2
    #: The script of `commands`: the writer runs the command through it (EVAL after NOSCRIPT).
    script: ClassVar[Script] = _SCRIPT
    key: bytes
    window_ms: int

    def marker(self, digest: bytes) -> bytes:
        """The key remembering one request, in the list's slot."""
        return companion(self.key, b"idem", digest)

    def commands(self, items: Sequence[bytes]) -> List[Tuple[bytes, ...]]:
        """One EVALSHA for the whole batch of bundles (the writer falls back to EVAL: `script`).

        The hot path, a batch of single bundles only, is cut by C-level
        slicing into keys and arguments (~0.2 against ~0.9 us a bundle for
        the per-bundle loop); any other batch (NDJSON bundles, spools of
        earlier releases) goes through `decode_bundle`, which validates.
        """
        prefix = self.marker(b"")
        if items and _all_single(items):  # the hot path: every bundle one POST with one message
            n = len(items)
            keys = [self.key]
            keys += map(prefix.__add__, map(_SINGLE_DIGEST, items))
            argv: List[bytes] = [b""] * (2 * n + 2)
            argv[0] = b"%d" % self.window_ms
            argv[2::2] = map(_SINGLE_ID, items)
            argv[3::2] = map(_SINGLE_MESSAGE, items)
            return [_SCRIPT.command(keys, argv)]
        keys = [self.key]
        argv = [b"%d" % self.window_ms, b""]
        counts: Optional[List[int]] = None  # stays None while every bundle holds one message
        for bundle in items:
            digest, first_id, messages = decode_bundle(bundle)
            keys.append(prefix + digest)
            argv.append(first_id)
            argv.extend(messages)
            if len(messages) == 1 and counts is None:
                continue
            if counts is None:
                counts = [1] * (len(keys) - 2)
            counts.append(len(messages))
        if counts is not None:
            argv[1] = b",".join(b"%d" % c for c in counts)
        return [_SCRIPT.command(keys, argv)]

    def outcomes(self, replies: Sequence[object]) -> Optional[List[Optional[bytes]]]:
        """Per bundle: None if it was stored now, else the id of the first copy (None: all stored)."""
        reply = replies[0]
        assert isinstance(reply, list), reply
        if not reply:
            return None
        return [r if r else None for r in reply]

    def pushed(self, items: Sequence[bytes], outcomes: Optional[List[Optional[bytes]]]) -> int:
        """Messages of the bundles that were stored now (duplicates pushed nothing)."""
        if _all_single(items):  # one message each
            return len(items) if outcomes is None else outcomes.count(None)
        total = 0
        for i, bundle in enumerate(items):
            if outcomes is None or outcomes[i] is None:
                total += message_count(bundle)
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
