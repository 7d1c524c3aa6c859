"""Pure aggregation: list items -> one `Batch` (per-key sums, dead items).

No I/O and no clock: everything the exactly-once protocol needs to know
about a batch is computed here from the bytes of its items, so a process
that recovers a crashed batch recomputes *the same* batch (same digest,
same sums) from the same items.

- The batch id is the SHA-1 of ``<len 1>,...,<len n>\n<SHA-1 of the items
  concatenated>`` (`frame`), items in the order the processing list holds
  them.  TAKE computes it in Lua, stores it next to the processing list
  (the "complete" step fences on it) and returns it with the batch; the
  hash sink records it as the applied-batch marker.  Distinct batches have distinct items (message ids are unique),
  hence distinct ids.
- Values are integers with ``|v| < 2**53`` and so are per-key sums within
  a batch (a message that would push its key's batch sum out of that range
  is dead-lettered): exact as doubles anywhere (Lua, JSON readers).
  Increments of 9e15 are not a counting use case; the bound is documented.
- A message id that occurs twice in one batch is counted once (the
  outbox is at-least-once); ids across batches are deduplicated by the
  hash sink.
- Two parsers, one result.  `aggregate_framed` first tries the *lean*
  parser: one compiled regular expression over the concatenated items
  (TAKE's reply) that accepts only envelopes of the exact shape ingest
  writes for a flat body ``{"<key>":"<string>","<value>":<integer>}`` (either
  order), then checks in C-level bulk operations that the matches tile the
  batch exactly (match i has exactly item i's length, as many matches as
  items), that no id repeats and that no sum leaves the range.  Items
  that shape covers parse to exactly what ``ujson.loads`` gives (no
  escapes, no control characters, integers without exponent), so the sums
  are the same; anything else (a misfit, a nested pointer, an escaped key,
  a repeated id, non-UTF-8) makes the whole batch take the general parser
  (`aggregate`: ``ujson.loads`` per item, every misfit dead-lettered with
  its reason).  The lean path costs ~0.6 us an item against ~3 us.
- Before the pattern, a *uniform* batch (every item one length and
  layout: what ingest writes for one route, fixed-width ids and ts) is cut
  at fixed offsets by uniform.py (~0.3 us an item), with the same
  exactness argument: same columns as the pattern, or None.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from itertools import accumulate
from operator import add, sub
from typing import Any, Dict, List, NamedTuple, Optional, Pattern, Sequence, Set, Tuple

import attrs
import ujson

from relayd.counters.uniform import Columns, parse_uniform

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


class Batch:
    """The aggregate of one processing list's items.

    The counted messages are kept as columns (ids, keys, values, ts), the
    shape the lean parser produces without a Python object per message;
    `counted` builds `Counted` tuples on demand (duplicates, exclusions:
    rare paths).  The lean parser's sums stay keyed by the keys' UTF-8
    bytes (`field_args` sends them to Redis as they are); `sums`, keyed by
    str, is built on first use (PostgreSQL summaries, duplicates).
    """

    __slots__ = (
        "id", "_sums", "_raw_sums", "dead", "min_ts", "size", "ids", "_keys", "_values", "_tss", "ts_range", "_counted"
    )

    def __init__(
        self,
        id: str,
        sums: Optional[Dict[str, int]],
        dead: Tuple[Dead, ...],
        min_ts: Optional[float],
        size: int,
        ids: Sequence[bytes],
        keys: Sequence[Any],
        values: Sequence[int],
        tss: Sequence[Any],
        ts_range: Optional[Tuple[float, float]] = None,
        raw_sums: Optional[Dict[bytes, int]] = None,
    ) -> None:
        self.id = id  # the batch id (TAKE's, or frame(items).id)
        if sums is None and raw_sums is None:
            raise TypeError("a Batch needs sums or raw_sums")
        self._sums = sums  # key -> sum of the counted messages' values (zeros dropped)
        self._raw_sums = raw_sums  # the same keyed by UTF-8 bytes, zeros kept (lean parser)
        self.dead = dead
        self.min_ts = min_ts  # ts of the oldest item (counted or dead), for staleness
        self.size = size  # items in the batch
        self.ids = ids  # counted message ids (ASCII bytes), one per distinct id, batch order
        self._keys = keys  # their keys (str, or UTF-8 bytes from the lean parser)
        self._values = values
        self._tss = tss  # their ts: floats (0.0 when the envelope had none), or the lean parser's digits
        #: (lowest, highest) ts of the counted messages; None when there are none.
        self.ts_range = ts_range if ts_range is not None else ((min(tss), max(tss)) if tss else None)
        self._counted: Optional[Tuple[Counted, ...]] = None

    @property
    def sums(self) -> Dict[str, int]:
        """Key -> sum of the counted messages' values, zero sums left out (built on first use)."""
        if self._sums is None:
            assert self._raw_sums is not None
            self._sums = {k.decode("utf-8"): v for k, v in self._raw_sums.items() if v != 0}
        return self._sums

    def field_args(self) -> List[bytes]:
        """``field, sum, field, sum, ...`` as bytes for APPLY: non-zero sums, fields sorted.

        The order is `sorted(self.sums)`'s: UTF-8 byte order is code point
        order, so sorting the lean parser's bytes keys needs no decoding.
        """
        raw = self._raw_sums
        if raw is None:
            sums = self.sums
            fields = sorted(sums)
            pairs: List[bytes] = [b""] * (2 * len(fields))
            pairs[0::2] = [f.encode("utf-8") for f in fields]
            pairs[1::2] = [b"%d" % sums[f] for f in fields]
            return pairs
        keys = sorted(raw) if 0 not in raw.values() else sorted(k for k, v in raw.items() if v != 0)
        values = list(map(raw.__getitem__, keys))
        pairs = [b""] * (2 * len(keys))
        pairs[0::2] = keys
        pairs[1::2] = list(map(_SMALL_INTS.__getitem__, values)) if values and min(values) >= 0 and max(values) < len(_SMALL_INTS) else [b"%d" % v for v in values]
        return pairs

    @property
    def tss(self) -> Sequence[float]:
        """The counted messages' ts as floats (converted on first use)."""
        if self._tss and not isinstance(self._tss[0], float):
            self._tss = list(map(float, self._tss))
        return self._tss

    @property
    def counted(self) -> Tuple[Counted, ...]:
        """Every counted message (built on first use)."""
        if self._counted is None:
            self._counted = tuple(
                Counted(i.decode("ascii", "replace"), k.decode("utf-8") if isinstance(k, bytes) else k, v, t)
                for i, k, v, t in zip(self.ids, self._keys, self._values, self.tss)
            )
        return self._counted

    def without(self, duplicate_ids: Sequence[str]) -> Dict[str, int]:
        """The sums once the messages with `duplicate_ids` are taken out (zeros dropped)."""
        sums = dict(self.sums)
        if duplicate_ids:
            dups = set(duplicate_ids)
            for c in self.counted:
                if c.id in dups:
                    sums[c.key] -= c.value
                    dups.discard(c.id)  # a batch counts an id once
        return {k: v for k, v in sums.items() if v != 0}


#: ``b"%d" % i`` for the small sums most keys have in a batch.
_SMALL_INTS = [b"%d" % i for i in range(1024)]


class Framed(NamedTuple):
    """A batch as TAKE returns it: its id, the items' lengths, the items concatenated."""

    id: str
    lengths: List[int]
    body: bytes

    def items(self) -> List[bytes]:
        """The items, cut out of `body` by `lengths`."""
        ends = list(accumulate(self.lengths))
        return [self.body[end - n : end] for n, end in zip(self.lengths, ends)]


def frame(items: Sequence[bytes]) -> Framed:
    """Frame `items` the way TAKE does (id = SHA-1 of ``<lengths>\\n<SHA-1 hex of the items>``)."""
    header = b",".join([b"%d" % len(item) for item in items])
    body = b"".join(items)
    inner = hashlib.sha1(body).hexdigest().encode("ascii")
    return Framed(hashlib.sha1(header + b"\n" + inner).hexdigest(), [len(item) for item in items], body)


def parse_take_reply(reply: Sequence[bytes]) -> Optional[Framed]:
    """TAKE's ``[id, lengths, items]`` -> `Framed` (None for ``[]``: nothing taken).

    Raises ValueError when the reply is malformed (lengths that do not add
    up to the items): never guess at a batch's boundaries.
    """
    if not reply:
        return None
    batch_id, header, body = reply
    lengths = _uniform_lengths(header, len(body))
    if lengths is None:
        lengths = list(map(int, header.split(b",")))
    if sum(lengths) != len(body) or min(lengths) < 0:
        raise ValueError("malformed TAKE reply: item lengths do not add up")
    return Framed(batch_id.decode("ascii"), lengths, body)


def _uniform_lengths(header: bytes, total: int) -> Optional[List[int]]:
    """``b"182,182,...,182"`` -> ``[182] * n`` without parsing each number, when every item has one length; else None."""
    first = header.partition(b",")[0]
    if not first.isdigit() or first.startswith(b"0"):
        return None
    size = int(first)
    n = total // size
    if n * size != total or header != b",".join([first] * n):
        return None
    return [size] * n


def pack(items: Sequence[bytes]) -> bytes:
    """``len:item`` for each item, concatenated (the fence digest's input)."""
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


def batch_digest(items: Sequence[bytes]) -> str:
    """SHA-1 hex of ``len:item`` for each item; the Lua fence (TRIM_TAIL) computes the same."""
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

    The same as `aggregate_framed` of ``frame(items)`` (lean parser first).
    """
    return aggregate_framed(frame(items), key_pointer, value_pointer)


def aggregate_framed(framed: Framed, key_pointer: Tuple[str, ...], value_pointer: Tuple[str, ...]) -> Batch:
    """`aggregate` of TAKE's framed batch: the lean parser, else the general one."""
    batch = _aggregate_lean(framed, key_pointer, value_pointer)
    if batch is None:
        batch = aggregate_items(framed.items(), key_pointer, value_pointer, framed.id)
    return batch


_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Possessive repeats (*+): nothing here ever needs to backtrack into a string.
_STRING = rb'"[^"\\\x00-\x1f]*+"'
_ENVELOPE_HEAD = (
    rb'\{"id":"([0-9A-Za-z_\-]{1,64}+)","ts":(-?(?:0|[1-9][0-9]{0,17}+)(?:\.[0-9]{1,17}+)?),'
    rb'("route":' + _STRING + rb',"content_type":(?:' + _STRING + rb'|null)),"body":\{'
)
_KEY_FIELD = rb'"%s":"([^"\\\x00-\x1f]*+)"'
#: Integers of up to 15 digits: below 2**53 however signed.
_VALUE_FIELD = rb'"%s":(-?(?:0|[1-9][0-9]{0,14}+))'


def _lean_patterns(key_pointer: Tuple[str, ...], value_pointer: Tuple[str, ...]) -> Tuple[Tuple[Pattern[bytes], int], ...]:
    """(pattern, fixed length) for one-level pointers with plain names, key first and value first.

    Groups: 1 id, 2 ts, 3 the route and content type, then the key and
    the value in body order; an envelope's length is the fixed length plus
    the lengths of the groups.
    """
    if len(key_pointer) != 1 or len(value_pointer) != 1 or key_pointer == value_pointer:
        return ()
    k, v = key_pointer[0], value_pointer[0]
    if not (_SAFE_NAME.fullmatch(k) and _SAFE_NAME.fullmatch(v)):
        return ()
    kf, vf = _KEY_FIELD % re.escape(k).encode(), _VALUE_FIELD % re.escape(v).encode()
    fixed_key_first = len('{"id":"","ts":,,"body":{"%s":"","%s":}}' % (k, v))
    fixed_value_first = len('{"id":"","ts":,,"body":{"%s":,"%s":""}}' % (v, k))
    return (
        (re.compile(_ENVELOPE_HEAD + kf + b"," + vf + rb"\}\}"), fixed_key_first),
        (re.compile(_ENVELOPE_HEAD + vf + b"," + kf + rb"\}\}"), fixed_value_first),
    )


_PATTERNS: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], Tuple[Tuple[Pattern[bytes], int], ...]] = {}


def _aggregate_lean(framed: Framed, key_pointer: Tuple[str, ...], value_pointer: Tuple[str, ...]) -> Optional[Batch]:
    """The lean parser (module docstring); None when the batch needs the general one.

    A uniform batch (every item one length and layout: the usual one) is
    cut at fixed offsets (uniform.py); any other goes through the pattern.
    """
    body = framed.body
    if not body:
        return None
    patterns = _PATTERNS.get((key_pointer, value_pointer))
    if patterns is None:
        patterns = _PATTERNS[(key_pointer, value_pointer)] = _lean_patterns(key_pointer, value_pointer)
    if not body.isascii():
        try:
            body.decode("utf-8")  # ujson refuses invalid UTF-8: let the general parser say so
        except UnicodeDecodeError:
            return None
    columns = parse_uniform(body, framed.lengths, patterns)
    if columns is None:
        columns = _scan(body, framed.lengths, patterns)
        if columns is None:
            return None
    return _lean_batch(framed.id, columns)


def _scan(body: bytes, item_lengths: List[int], patterns: Sequence[Tuple[Pattern[bytes], int]]) -> Optional[Columns]:
    """The columns of any lean-shaped batch: one pattern scan, then the tiling check; None if it does not fit."""
    for order, (pattern, fixed) in enumerate(patterns):
        rows = pattern.findall(body)
        if len(rows) != len(item_lengths):
            continue
        ids, tss, heads, first, second = columns = tuple(zip(*rows))
        # The matches tile the batch: as many as items, match i exactly item i's length
        # (the lengths add up to the body, so nothing is left in between).
        lengths = list(map(len, ids))
        for column in columns[1:]:
            lengths = list(map(add, lengths, map(len, column)))
        if list(map(sub, item_lengths, lengths)) != [fixed] * len(rows):
            continue
        keys, raw_values = (first, second) if order == 0 else (second, first)
        return Columns(ids, tss, keys, raw_values)
    return None


def _lean_batch(batch_id: str, columns: Columns) -> Optional[Batch]:
    """The `Batch` of parsed columns; None when the general parser must decide (a repeated id, a sum out of range)."""
    ids, tss, keys, raw_values = columns[:4]
    n = len(ids)
    if len(set(ids)) != n:
        return None  # a message twice in the batch: the general parser counts it once
    by_key: Dict[bytes, int]
    if raw_values.count(b"1") == n:
        values: List[int] = [1] * n
        by_key = Counter(keys)
    else:
        values = list(map(int, raw_values))
        by_key = {}
        get = by_key.get
        for key, value in zip(keys, values):
            by_key[key] = get(key, 0) + value
    if max(by_key.values()) >= MAX_MAGNITUDE or min(by_key.values()) <= -MAX_MAGNITUDE:
        return None  # a batch sum out of range: the general parser dead-letters the overflow
    low, high = (float(min(tss)), float(max(tss))) if columns.ts_fixed_point else _ts_range(tss)
    return Batch(
        id=batch_id,
        sums=None,
        dead=(),
        min_ts=low,
        size=n,
        ids=ids,
        keys=keys,
        values=values,
        tss=tss,
        ts_range=(low, high),
        raw_sums=by_key,
    )


def _ts_range(tss: Sequence[bytes]) -> Tuple[float, float]:
    """(min, max) of JSON numbers given as digits, without a float per item when it can.

    Ingest writes every ts as ``%.6f``: when all have the same length, the
    point at the same place and no sign, the text order is the numeric
    order and two conversions do.  Anything else converts each.
    """
    width = len(tss[0])
    dot = tss[0].find(b".")
    joined = b"".join(tss)
    if (
        dot > 0
        and len(joined) == width * len(tss)
        and b"-" not in joined
        and joined[dot::width].count(b".") == len(tss)
        and joined.count(b".") == len(tss)
    ):
        return float(min(tss)), float(max(tss))
    # ujson reads a number without a point as an int: keep it one (a float would round past 2**53)
    times: List[float] = [float(t) if b"." in t else int(t) for t in tss]
    return min(times), max(times)


def aggregate_items(
    items: Sequence[bytes],
    key_pointer: Tuple[str, ...],
    value_pointer: Tuple[str, ...],
    batch_id: Optional[str] = None,
) -> Batch:
    """The general parser: ``ujson.loads`` per item (`batch_id` default: ``frame(items).id``).

    An item is counted when it is a relayd envelope (``id``, ``ts`` and
    ``body``) whose body has a string (or integer) at `key_pointer` and an
    integer ``|v| < 2**53`` at `value_pointer`.  Anything else is `Dead`
    with a reason; it never stops the batch.
    """
    sums: Dict[str, int] = {}
    ids: List[bytes] = []
    keys: List[str] = []
    values: List[int] = []
    tss: List[float] = []
    dead: List[Dead] = []
    seen: Set[str] = set()
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
        ids.append(message_id.encode("ascii", "replace"))
        keys.append(key)
        values.append(value)
        tss.append(float(ts))
    return Batch(
        id=batch_id if batch_id is not None else frame(items).id,
        sums={k: v for k, v in sums.items() if v != 0},
        dead=tuple(dead),
        min_ts=min_ts,
        size=len(items),
        ids=ids,
        keys=keys,
        values=values,
        tss=tss,
    )
