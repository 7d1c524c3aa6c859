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
its second copy is subtracted in another.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import attrs
from twisted.internet.defer import inlineCallbacks

from relayd.counters.aggregate import Batch
from relayd.counters.keys import SEEN_BUCKET_SECONDS, CounterKeys
from relayd.counters.scripts import APPLY, Script

_APPLY = Script(APPLY)


@attrs.frozen
class Applied:
    """What applying a batch did: messages not counted, keys left out, final sums."""

    duplicates: Tuple[str, ...]  # ids already counted by an earlier batch
    excluded: Tuple[str, ...]  # keys whose stored total could not take the sum
    sums: Dict[str, int]  # what the hash received (and PostgreSQL must)
    first: bool  # False when the marker said it was applied before


def apply_args(batch: Batch, marker_ttl: int, dedupe_window: int) -> Tuple[List[bytes], List[Any], List[str]]:
    """(keys beyond hash+marker, ARGV, field order) for scripts.APPLY."""
    fields = sorted(batch.sums)
    index = {k: i + 1 for i, k in enumerate(fields)}
    argv: List[Any] = [b"%d" % marker_ttl, b"%d" % len(fields)]
    for k in fields:
        argv.append(k.encode("utf-8"))
        argv.append(b"%d" % batch.sums[k])
    buckets: Dict[int, List[Any]] = {}
    if dedupe_window > 0:
        for c in batch.counted:
            buckets.setdefault(int(c.ts // SEEN_BUCKET_SECONDS), []).append(c)
    extra: List[int] = sorted(buckets)
    for b in extra:
        members = buckets[b]
        argv.append(b"%d" % ((b + 1) * SEEN_BUCKET_SECONDS + dedupe_window))
        argv.append(b"%d" % len(members))
        for c in members:
            argv.extend((c.id.encode("ascii", "replace"), b"%d" % index[c.key], b"%d" % c.value))
    return [b"%d" % b for b in extra], argv, fields


def parse_marker(marker: bytes, fields: Sequence[str]) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """``b"id1,id2\\n3,7"`` -> (duplicate ids, excluded keys)."""
    dups, _, excluded = marker.partition(b"\n")
    ids = tuple(d.decode("ascii") for d in dups.split(b",") if d)
    keys = tuple(fields[int(i) - 1] for i in excluded.split(b",") if i)
    return ids, keys


class HashSink:
    """Applies batches of one counter to its hash (see the module docstring)."""

    def __init__(self, keys: CounterKeys, marker_ttl: int, dedupe_window: int) -> None:
        self._keys = keys
        self._marker_ttl = marker_ttl
        self._dedupe_window = dedupe_window

    @inlineCallbacks
    def apply(self, redis: Any, batch: Batch) -> Any:
        """Apply `batch`; fires with `Applied` (same answer on every rerun)."""
        buckets, argv, fields = apply_args(batch, self._marker_ttl, self._dedupe_window)
        keys = [self._keys.hash, self._keys.marker(batch.id)] + [self._keys.seen(int(b)) for b in buckets]
        status, marker = yield _APPLY(redis, keys, argv)
        dups, excluded = parse_marker(marker, fields)
        sums = batch.without(dups)
        for k in excluded:
            sums.pop(k, None)
        return Applied(dups, excluded, sums, int(status) == 1)
