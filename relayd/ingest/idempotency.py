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
from typing import Callable, Dict, Optional

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
    """Recently stored digests -> first message id, in two generations: bounded in count and by the window.

    Each generation is a plain dict with the time it started; new keys go
    to the current one, and when it holds half of `max_keys`, or is half a
    window old, it becomes the previous one and the previous one is dropped
    whole.  So a key is remembered for at least half a window (unless
    `max_keys` newer ones came since) and never past its window: a
    generation is dropped once its *start* is a window old.  Forgetting
    early only costs a Redis round trip (Redis decides); answering late
    would be wrong.  Cheaper than an LRU (`OrderedDict` with an expiry tuple
    per key) on the hot path of unique keys: a miss is two dict lookups and
    a put one insert, with no per-key tuple or linked-list node to
    allocate, touch and free.  A hit does not refresh a key: repeats are
    retries, they come soon after the first.
    """

    def __init__(self, seconds: Callable[[], float], window: float, max_keys: int = RECENT_KEYS) -> None:
        self._seconds = seconds
        self._window = window
        self._cap = max(1, max_keys // 2)  # keys per generation
        self._keep_previous = max_keys >= 2
        self._current: Dict[bytes, bytes] = {}
        self._previous: Dict[bytes, bytes] = {}
        self._current_start = self._previous_start = seconds()

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def get(self, digest: bytes) -> Optional[bytes]:
        """The first id stored under `digest`, if this process saw it within the window."""
        first_id = self._current.get(digest)
        if first_id is not None:
            if self._seconds() >= self._current_start + self._window:
                self._current, self._previous = {}, {}  # both generations are a window old
                return None
            return first_id
        first_id = self._previous.get(digest)
        if first_id is not None and self._seconds() >= self._previous_start + self._window:
            self._previous = {}
            return None
        return first_id

    def put(self, digest: bytes, first_id: bytes, since: float) -> None:
        """Remember that `digest` is stored as `first_id`; `since` is when its request started.

        Redis set the key's marker no earlier than `since`, so a key goes
        into the newest generation that started no later than `since`
        (none: not remembered, which costs a round trip, not a wrong
        answer).  Then a generation dropped a window after its start never
        outlives a marker of its own: filing a key by the time of the
        *answer* let memory say "duplicate" for as long as Redis took to
        answer after the marker expired.  A key already remembered keeps
        its generation (never extends an earlier expiry).
        """
        previous = self._previous
        if since >= self._current_start:
            current = self._current
            if digest in previous:
                previous[digest] = first_id
                return
            if digest not in current and (
                len(current) >= self._cap or since - self._current_start >= self._window / 2
            ):
                self._previous = current if self._keep_previous else {}
                self._previous_start = self._current_start
                self._current = current = {}
                self._current_start = since
            current[digest] = first_id
        elif (
            self._keep_previous
            and since >= self._previous_start
            and len(previous) < self._cap
            and digest not in self._current
        ):
            previous[digest] = first_id
