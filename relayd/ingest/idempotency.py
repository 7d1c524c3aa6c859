"""Idempotency-Key at ingest: the header's rules, the key digest, and recent keys in memory.

The contract: ``Idempotency-Key: <1-255 visible ASCII chars>`` on a POST
makes a repeat of that key on that route, within the route's
``idempotency_window``, stored once.  Redis is the source of truth (the
script in `relayd.outbox.dedup`); `RecentKeys` only answers fast repeats
that this process saw, without a round trip.

The key itself may carry user data, so it never leaves this module: Redis
gets a digest of (route, key), and logs get nothing.
"""

from __future__ import annotations

import binascii
import hashlib
from collections import OrderedDict
from typing import Callable, Optional, Tuple

from relayd.ingest.problems import BadRequest

MAX_KEY_BYTES = 255
_VISIBLE = bytes(range(0x21, 0x7F))  # the header's alphabet: printable ASCII without space
#: Keys remembered per route: ~100 B each, so ~10 MiB at most per route.
RECENT_KEYS = 100_000


class InvalidIdempotencyKey(BadRequest):  # type: ignore[misc]  # BadRequest is made by problems._problem(): typed `type`
    """A malformed Idempotency-Key header."""

    slug = "invalid-idempotency-key"
    title = "Invalid Idempotency-Key"
    reason = "idempotency_key"


def parse_key(raw: bytes) -> bytes:
    """The header's value if it is 1-255 visible ASCII characters; else a 400 problem."""
    if not raw:
        raise InvalidIdempotencyKey("Idempotency-Key must not be empty")
    if len(raw) > MAX_KEY_BYTES:
        raise InvalidIdempotencyKey(f"Idempotency-Key is {len(raw)} bytes; at most {MAX_KEY_BYTES}")
    if raw.translate(None, _VISIBLE):  # what is left is not visible ASCII (one C call, not a loop)
        raise InvalidIdempotencyKey("Idempotency-Key must be visible ASCII (no spaces or control characters)")
    return raw


def key_digest(route: bytes, key: bytes) -> bytes:
    """A route-scoped, fixed-size name for a key (hex): the same key on two routes differs."""
    return hashlib.blake2b(route + b"\0" + key, digest_size=16).hexdigest().encode()


def key_digester(route: bytes) -> Callable[[bytes], bytes]:
    """`key_digest` for one route, with the route already hashed (a copy of the state, not a new hash per key)."""
    seed = hashlib.blake2b(route + b"\0", digest_size=16)

    def digest(key: bytes) -> bytes:
        h = seed.copy()
        h.update(key)
        return binascii.hexlify(h.digest())

    return digest


class RecentKeys:
    """An LRU of digest -> (first message id, expiry), bounded in count and by the window."""

    def __init__(self, seconds: Callable[[], float], window: float, max_keys: int = RECENT_KEYS) -> None:
        self._seconds = seconds
        self._window = window
        self._max = max_keys
        self._keys: OrderedDict[bytes, Tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, digest: bytes) -> Optional[bytes]:
        """The first id stored under `digest`, if this process saw it within the window."""
        hit = self._keys.get(digest)
        if hit is None:
            return None
        first_id, expires = hit
        if self._seconds() >= expires:
            del self._keys[digest]
            return None
        self._keys.move_to_end(digest)
        return first_id

    def put(self, digest: bytes, first_id: bytes) -> None:
        """Remember that `digest` is stored as `first_id` (never extends an earlier expiry)."""
        keys = self._keys
        hit = keys.get(digest)
        if hit is not None:
            keys[digest] = (first_id, hit[1])
            keys.move_to_end(digest)
            return
        keys[digest] = (first_id, self._seconds() + self._window)
        if len(keys) > self._max:
            keys.popitem(last=False)
