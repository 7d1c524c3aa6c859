"""The hash sink: apply one `Batch` to the counter's Redis hash, exactly once.

One EVAL (scripts.APPLY) over keys in the hash's slot: the hash, the
batch's marker and the seen-id sets of the batch's ts buckets.  The marker
(``{hash}:batch:<batch id>``, kept `marker_ttl` seconds) makes any rerun of
the same batch a no-op that answers what the first run did: a reply lost
to a timeout and resent by the client (the redis-py#261 bug class), or a
recovery after a crash between this step and the batch leaving its
processing list.

The seen-id sets (``{hash}:seen:<minute>``, kept `dedupe_window` seconds
past their minute) catch a message the outbox pushed twice (an LPUSH that
timed out but ran, a spool replay after a crash): counted in one batch,
its second copy is taken out of another.  The script only sends ids; when
it finds some already seen it answers with them (no writes) and the sink
calls again with the sums without them, declaring them: two calls for the
rare batch with a duplicate, one argument per message for all the others
(no per-message key index and value to ship and parse in Lua).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import inlineCallbacks

from relayd.counters.aggregate import Batch
from relayd.counters.keys import SEEN_BUCKET_SECONDS, CounterKeys
from relayd.counters.scripts import APPLY
from relayd.redis.scripts import Script

_APPLY = Script(APPLY)


#: APPLY calls per batch at most: a first call, a second declaring the
#: duplicates the first found; more only if the seen sets change between
#: the two (another process counting a copy of the same message right then).
MAX_APPLY_ROUNDS = 4


class Applied:
    """What applying a batch did: messages not counted, keys left out, final sums.

    `sums` (what the hash received, and PostgreSQL must) is built on first
    use from the batch when the batch went in whole: counting into the hash
    alone never needs it keyed by str.
    """

    __slots__ = ("duplicates", "excluded", "first", "_sums", "_batch")

    def __init__(
        self,
        duplicates: Tuple[str, ...],  # ids already counted by an earlier batch
        excluded: Tuple[str, ...],  # keys whose stored total could not take the sum
        sums: Optional[Dict[str, int]],  # None: the batch's own sums
        first: bool,  # False when the marker said it was applied before
        batch: Optional[Batch] = None,
    ) -> None:
        if sums is None and batch is None:
            raise TypeError("Applied needs sums or the batch")
        self.duplicates = duplicates
        self.excluded = excluded
        self.first = first
        self._sums = sums
        self._batch = batch

    @property
    def sums(self) -> Dict[str, int]:
        """Key -> what the hash received for it."""
        if self._sums is None:
            assert self._batch is not None
            self._sums = self._batch.sums
        return self._sums

    def __repr__(self) -> str:
        return f"Applied(duplicates={self.duplicates!r}, excluded={self.excluded!r}, first={self.first!r})"


def _buckets(batch: Batch, dedupe_window: int) -> Dict[int, Sequence[bytes]]:
    """The batch's message ids per seen-set bucket (ts minute)."""
    if dedupe_window <= 0 or not batch.ids or batch.ts_range is None:
        return {}
    low, high = (int(t // SEEN_BUCKET_SECONDS) for t in batch.ts_range)
    if low == high:
        return {low: batch.ids}  # the usual batch: a few seconds of traffic, one minute
    out: Dict[int, List[bytes]] = {}
    for message_id, ts in zip(batch.ids, batch.tss):
        out.setdefault(int(ts // SEEN_BUCKET_SECONDS), []).append(message_id)
    return dict(out)


def apply_args(
    batch: Batch,
    marker_ttl: int,
    dedupe_window: int,
    sums: Optional[Dict[str, int]] = None,
    declared: Sequence[str] = (),
) -> Tuple[List[bytes], List[Any], List[str]]:
    """(bucket numbers, ARGV, field order) for scripts.APPLY.

    `sums` (default: the batch's) must be the batch's sums without the
    `declared` duplicates; fields go in sorted order, zero sums left out,
    so a recovery that only knows the duplicates (from the marker) derives
    the same field order (`fields_of`).
    """
    source = batch.sums if sums is None else sums
    fields = fields_of(source)
    pairs: List[bytes] = [b""] * (2 * len(fields))
    pairs[0::2] = [f.encode("utf-8") for f in fields]
    pairs[1::2] = [b"%d" % source[f] for f in fields]
    buckets, argv = _argv(batch, marker_ttl, dedupe_window, pairs, declared)
    return buckets, argv, fields


def _argv(
    batch: Batch, marker_ttl: int, dedupe_window: int, pairs: List[bytes], declared: Sequence[str]
) -> Tuple[List[bytes], List[Any]]:
    """(bucket numbers, ARGV) for scripts.APPLY given the ``field, sum`` pairs."""
    argv: List[Any] = [b"%d" % marker_ttl, b"%d" % (len(pairs) // 2)]
    argv.extend(pairs)
    buckets = _buckets(batch, dedupe_window)
    extra = sorted(buckets)
    for b in extra:
        members = buckets[b]
        argv.append(b"%d" % ((b + 1) * SEEN_BUCKET_SECONDS + dedupe_window))
        argv.append(b"%d" % len(members))
        argv.extend(members)
    argv.append(b"%d" % len(declared))
    argv.extend(d.encode("ascii") for d in declared)
    return [b"%d" % b for b in extra], argv


def fields_of(sums: Dict[str, int]) -> List[str]:
    """The APPLY field order: keys with a non-zero sum, sorted."""
    return sorted(k for k, v in sums.items() if v != 0)


def parse_ids(text: bytes) -> Tuple[str, ...]:
    """``b"id1,id2"`` -> ids."""
    return tuple(sorted(d.decode("ascii") for d in text.split(b",") if d))


def parse_marker(marker: bytes, fields: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """``b"id1,id2\\n3,7"`` -> (duplicate ids, excluded keys)."""
    dups, _, excluded = marker.partition(b"\n")
    keys = tuple(fields[int(i) - 1] for i in excluded.split(b",") if i)
    return parse_ids(dups), keys


class HashSink:
    """Applies batches of one counter to its hash (see the module docstring)."""

    def __init__(self, keys: CounterKeys, marker_ttl: int, dedupe_window: int) -> None:
        self._keys = keys
        self._marker_ttl = marker_ttl
        self._dedupe_window = dedupe_window

    @inlineCallbacks
    def apply(self, redis: Any, batch: Batch) -> Any:
        """Apply `batch`; fires with `Applied` (same answer on every rerun)."""
        sums: Optional[Dict[str, int]] = None  # None: the batch's own (sent as `Batch.field_args`)
        declared: Tuple[str, ...] = ()
        for _ in range(MAX_APPLY_ROUNDS):
            if sums is None:
                buckets, argv = _argv(batch, self._marker_ttl, self._dedupe_window, batch.field_args(), declared)
            else:
                buckets, argv, _fields = apply_args(batch, self._marker_ttl, self._dedupe_window, sums, declared)
            keys = [self._keys.hash, self._keys.marker(batch.id)] + [self._keys.seen(int(b)) for b in buckets]
            status, marker = yield _APPLY(redis, keys, argv)
            if int(status) != 2:
                break
            declared = parse_ids(marker)  # already counted: take them out and declare them
            sums = batch.without(declared)
        else:
            raise RuntimeError(f"counter batch {batch.id}: the seen-id sets kept changing under APPLY")
        dups_text, _, excluded_text = marker.partition(b"\n")
        dups = parse_ids(dups_text)
        if dups != declared:
            sums = batch.without(dups)  # the marker of an earlier run: rebuild what it applied
        excluded: Tuple[str, ...] = ()
        if excluded_text.strip(b","):
            if sums is None:
                sums = batch.sums
            dups, excluded = parse_marker(marker, fields_of(sums))
            sums = dict(sums)
            for k in excluded:
                sums.pop(k, None)
        return Applied(dups, excluded, sums, int(status) == 1, batch)
