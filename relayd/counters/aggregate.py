"""Pure aggregation: list items -> one `Batch` (per-key sums, dead items).

No I/O and no clock: everything the exactly-once protocol needs to know
about a batch is computed here from the bytes of its items, so a process
that recovers a crashed batch recomputes *the same* batch (same digest,
same sums) from the same items.

- The batch id is the SHA-1 of the items, length-prefixed, in the order
  the processing list holds them (`batch_digest`).  Redis computes the same
  digest in Lua to fence the "complete" step (work_queue.py), and the hash
  sink records it as the applied-batch marker.  Distinct batches have
  distinct items (message ids are unique), hence distinct ids.
- Values are integers with ``|v| < 2**53``: Redis' Lua computes with
  doubles, which are exact below 2**53, so the Lua apply can adjust sums
  for duplicates exactly; per-key sums are kept in that range too (a
  message that would push its key's batch sum out of it is dead-lettered).
  Increments of 9e15 are not a counting use case; the bound is documented.
- A message id that occurs twice in one batch is counted once (the
  outbox is at-least-once); ids across batches are deduplicated by the
  hash sink.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import attrs
import ujson

#: Values and per-batch sums stay below this magnitude (exact in Lua's doubles).
MAX_MAGNITUDE = 2**53


class PointerError(ValueError):
    """A JSON pointer that is not RFC 6901 syntax."""


def parse_pointer(text: str) -> Tuple[str, ...]:
    """RFC 6901 ``/a/b~1c`` -> ``("a", "b/c")``; the empty pointer is refused.

    The whole document (``""``) is never a counter key or value, so a
    config that says so is a mistake worth an error.
    """
    if not text.startswith("/"):
        raise PointerError(f"expected a JSON pointer like /key, got {text!r}")
    parts = text[1:].split("/")
    out = []
    for p in parts:
        if "~" in p.replace("~0", "").replace("~1", ""):
            raise PointerError(f"bad escape in JSON pointer {text!r} (only ~0 and ~1)")
        out.append(p.replace("~1", "/").replace("~0", "~"))
    return tuple(out)


_MISSING = object()


def resolve(doc: Any, pointer: Tuple[str, ...]) -> Any:
    """The value at `pointer` in `doc`, or `_MISSING`."""
    for part in pointer:
        if isinstance(doc, dict):
            if part not in doc:
                return _MISSING
            doc = doc[part]
        elif isinstance(doc, list):
            if not part.isdigit() or (part != "0" and part.startswith("0")) or int(part) >= len(doc):
                return _MISSING
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


class Counted(NamedTuple):
    """One counted message: its id (for cross-batch dedupe), key and value.

    A NamedTuple, not attrs: one is built per message on the counting path
    (3x cheaper to create than a frozen attrs instance).
    """

    id: str
    key: str
    value: int
    ts: float


@attrs.frozen
class Dead:
    """One item that cannot be counted, and why (goes to ``<list>:dead``)."""

    item: bytes
    reason: str

    def letter(self) -> bytes:
        """The dead-letter item: ``{"message": <item>, "error": {"detail": reason}}``."""
        try:
            message: Any = ujson.loads(self.item)
        except ValueError:
            message = self.item.decode("utf-8", "replace")
        return ujson.dumps(
            {"message": message, "error": {"detail": self.reason}}, ensure_ascii=False, escape_forward_slashes=False
        ).encode("utf-8")


@attrs.frozen
class Batch:
    """The aggregate of one processing list's items."""

    id: str  # batch_digest(items)
    sums: Dict[str, int]  # key -> sum of the counted messages' values
    counted: Tuple[Counted, ...]  # every counted message (dedupe and PG adjust)
    dead: Tuple[Dead, ...]
    min_ts: Optional[float]  # ts of the oldest item (counted or dead), for staleness
    size: int  # items in the batch

    def without(self, duplicate_ids: Sequence[str]) -> Dict[str, int]:
        """The sums once the messages with `duplicate_ids` are taken out (zeros dropped)."""
        if not duplicate_ids:
            return dict(self.sums)
        dups = set(duplicate_ids)
        sums = dict(self.sums)
        for c in self.counted:
            if c.id in dups:
                sums[c.key] -= c.value
                dups.discard(c.id)  # a batch counts an id once
        return {k: v for k, v in sums.items() if v != 0}


def pack(items: Sequence[bytes]) -> bytes:
    """``len:item`` for each item, concatenated (the digest's input; TAKE's reply)."""
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


def split_packed(packed: bytes) -> List[bytes]:
    """Inverse of `pack`; raises ValueError on a malformed string."""
    items = []
    pos, end = 0, len(packed)
    find = packed.find
    while pos < end:
        colon = find(b":", pos)
        if colon < 0:
            raise ValueError("malformed packed items")
        start = colon + 1
        stop = start + int(packed[pos:colon])
        if stop > end:
            raise ValueError("truncated packed items")
        items.append(packed[start:stop])
        pos = stop
    return items


def batch_digest(items: Sequence[bytes]) -> str:
    """SHA-1 hex of ``len:item`` for each item; the Lua fence computes the same."""
    h = hashlib.sha1()
    for item in items:
        h.update(b"%d:" % len(item))
        h.update(item)
    return h.hexdigest()


def _key_text(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def aggregate(items: Sequence[bytes], key_pointer: Tuple[str, ...], value_pointer: Tuple[str, ...]) -> Batch:
    """Sum the envelopes in `items` per key; dead-letter what does not fit.

    An item is counted when it is a relayd envelope (``id``, ``ts`` and
    ``body``) whose body has a string (or integer) at `key_pointer` and an
    integer ``|v| < 2**53`` at `value_pointer`.  Anything else is `Dead`
    with a reason; it never stops the batch.
    """
    sums: Dict[str, int] = {}
    counted: List[Counted] = []
    dead: List[Dead] = []
    seen: set = set()
    min_ts: Optional[float] = None
    for item in items:
        try:
            env = ujson.loads(item)
        except ValueError:
            dead.append(Dead(item, "not JSON"))
            continue
        if not isinstance(env, dict) or "body" not in env or not isinstance(env.get("id"), str):
            dead.append(Dead(item, "not a relayd envelope (id, ts, body)"))
            continue
        ts = env.get("ts")
        if isinstance(ts, (int, float)) and not isinstance(ts, bool):
            min_ts = ts if min_ts is None else min(min_ts, ts)
        else:
            ts = 0.0
        body = env["body"]
        key = _key_text(resolve(body, key_pointer))
        if key is None:
            dead.append(Dead(item, "key pointer " + "/" + "/".join(key_pointer) + ": missing or not a string"))
            continue
        value = resolve(body, value_pointer)
        if not isinstance(value, int) or isinstance(value, bool):
            dead.append(Dead(item, "value pointer " + "/" + "/".join(value_pointer) + ": missing or not an integer"))
            continue
        if not -MAX_MAGNITUDE < value < MAX_MAGNITUDE:
            dead.append(Dead(item, "value out of range (|value| must be < 2**53)"))
            continue
        message_id = env["id"]
        if message_id in seen:
            continue  # the outbox pushed this message twice: count it once
        total = sums.get(key, 0) + value
        if not -MAX_MAGNITUDE < total < MAX_MAGNITUDE:
            dead.append(Dead(item, "key's sum in one batch out of range (|sum| must be < 2**53)"))
            continue
        seen.add(message_id)
        sums[key] = total
        counted.append(Counted(message_id, key, value, float(ts)))
    return Batch(
        id=batch_digest(items),
        sums=sums,
        counted=tuple(counted),
        dead=tuple(dead),
        min_ts=min_ts,
        size=len(items),
    )
