"""The change log: which streams got new entries, so readers read only those.

Every batch written to a stream route also appends the stream's name to
one small Redis Stream, `CHANGES_KEY` (``XADD relayd:fanout:changes MAXLEN
~ 20000 * s <stream>``, pipelined after the batch's XADDs on the same
connection, so a reader that sees the name finds the entries).  Each
process's reader blocks on that one key and then reads only the changed
streams it watches.  Before it, the reader's ``XREAD BLOCK`` named every
watched stream: with 1,000 teams each read cost Redis ~1.6 ms and relayd
the arguments and reply of 1,000 keys, and at 2,000 POSTs/s the reader fell
seconds behind (docs/benchmarks.md, fan-out).

Why a stream and not ``PUBLISH``: a reader that reconnects resumes the log
from its last id instead of losing what was published meanwhile, it needs
no pub/sub connection mode, and blocking on one key costs Redis the same
as a pub/sub wake-up.  Why not keyspace notifications: they need
``notify-keyspace-events`` set on the server, which relayd should not
require of an operator.

The log is a hint, never the data: the entries are in the user's streams
and the reader's positions say what it delivered.  A name missed (log
trimmed while a reader was away, a reconnect) only delays delivery until
the reader's full sweep of its watched streams, which runs after every
(re)connect and every `relayd.fanout.reader.SWEEP_INTERVAL`.

Cluster (not supported for stream routes yet, config refuses it): the log
is one key, so one node; a cluster would keep one log per node, named with
a hash tag of that node's slots.
"""

from __future__ import annotations

from typing import Any, Iterable, Set, Tuple

#: The change log's key.  One per Redis: several relayd deployments on one
#: Redis share it (a reader ignores names it does not watch).
CHANGES_KEY = b"relayd:fanout:changes"
#: Entries kept (``MAXLEN ~``): at 2,000 batches/s, ~10 s of changes, so a
#: reader stalled for less than that misses nothing; ~1 MiB of Redis memory.
CHANGES_MAXLEN = 20000
_FIELD = b"s"


def notify_command(stream: bytes) -> Tuple[bytes, ...]:
    """The command appended to a batch written to `stream`."""
    return (b"XADD", CHANGES_KEY, b"MAXLEN", b"~", b"%d" % CHANGES_MAXLEN, b"*", _FIELD, stream)


def changed_streams(entries: Iterable[Any]) -> Tuple[bytes, Set[bytes]]:
    """``XREAD`` entries of the log -> (id of the last one, names of the streams in them).

    `entries` is non-empty (``[id, [field, value, ...]]`` each).
    """
    names: Set[bytes] = set()
    last = b""
    for entry_id, fields in entries:
        last = entry_id
        for i in range(1, len(fields), 2):
            names.add(fields[i])
    return last, names

