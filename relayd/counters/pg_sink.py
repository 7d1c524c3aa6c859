"""The PostgreSQL sink: summaries of applied batches, exactly once per batch.

One transaction per chunk of queued summaries (Twisted's `adbapi` pool,
one connection per counter per process, psycopg 3)::

    INSERT INTO <table>_batches (name, batch) SELECT $name, unnest($ids)
        ON CONFLICT DO NOTHING RETURNING batch          -- which are new?
    INSERT INTO <table> AS t (name, key, value)
        SELECT $name, k, v FROM unnest($keys, $values) AS u(k, v)
        ON CONFLICT (name, key) DO UPDATE SET value = t.value + EXCLUDED.value
                                                      -- new batches only,
                                                      -- keys sorted, 10k a statement
    COMMIT

Only after COMMIT does the flusher remove the summaries from Redis
(work_queue.trim_pending), so a crash or a lost COMMIT reply replays them
and the ``_batches`` rows make the replay a no-op.  Keys are upserted in
sorted order: concurrent transactions (several processes, several hosts)
lock rows in the same order and cannot deadlock, the seed's postmortem bug.

``_batches`` rows are pruned after `APPLIED_RETENTION` (a day): a summary
is removed from Redis seconds after its COMMIT, so a replay older than a
day cannot happen unless Redis lost writes.

Why adbapi + psycopg 3: psycopg is the maintained PostgreSQL driver (binary
wheels, server-side parameter binding, native arrays); adbapi runs it in
the reactor's thread pool with no extra dependency.  Async-native drivers
(asyncpg) need an asyncio loop next to the reactor; txpostgres is
unmaintained.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred

from relayd.counters.summary import Summary

#: Keys per upsert statement: 10k keys of ~40 B is a 400 KB statement.
UPSERT_CHUNK = 10_000
#: How long applied-batch ids are kept (see the module docstring).
APPLIED_RETENTION = "1 day"
#: Seconds libpq waits for a connection (PostgreSQL down must fail fast).
CONNECT_TIMEOUT = 5


def ddl(table: str) -> List[str]:
    """The DDL relayd runs at start (idempotent); documented in docs/counters.md."""
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (name text NOT NULL, key text NOT NULL, "
        f"value bigint NOT NULL, PRIMARY KEY (name, key))",
        f"CREATE TABLE IF NOT EXISTS {table}_batches (name text NOT NULL, batch text NOT NULL, "
        f"applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (name, batch))",
    ]


def merge_new(summaries: Sequence[Summary], new_ids: Sequence[str]) -> Tuple[List[str], List[int]]:
    """Sum the summaries whose batch is in `new_ids`; keys sorted (lock order)."""
    new = set(new_ids)
    total: Dict[str, int] = {}
    for s in summaries:
        if s.batch in new:
            new.discard(s.batch)  # a batch queued twice counts once
            for k, v in s.sums.items():
                total[k] = total.get(k, 0) + v
    keys = sorted(k for k, v in total.items() if v != 0)
    return keys, [total[k] for k in keys]


class PostgresSink:
    """Applies summaries of one counter to its table (see the module docstring)."""

    def __init__(self, reactor: Any, url: str, name: str, table: str, pool: Any = None) -> None:
        self._name = name
        self._table = table
        self._pool = pool or adbapi.ConnectionPool(
            "psycopg",
            url,
            connect_timeout=CONNECT_TIMEOUT,
            cp_min=1,
            cp_max=1,
            cp_reconnect=True,
            cp_noisy=False,
            cp_reactor=reactor,
        )
        self._schema_ready = False

    def _create(self, cursor: Any) -> None:
        for statement in ddl(self._table):
            cursor.execute(statement)

    def _apply(self, cursor: Any, summaries: Sequence[Summary]) -> int:
        if not self._schema_ready:
            self._create(cursor)
        ids = sorted({s.batch for s in summaries})
        cursor.execute(
            f"INSERT INTO {self._table}_batches (name, batch) SELECT %s, unnest(%s::text[]) "
            f"ON CONFLICT DO NOTHING RETURNING batch",
            (self._name, ids),
        )
        new_ids = [row[0] for row in cursor.fetchall()]
        keys, values = merge_new(summaries, new_ids)
        for i in range(0, len(keys), UPSERT_CHUNK):
            cursor.execute(
                f"INSERT INTO {self._table} AS t (name, key, value) "
                f"SELECT %s, k, v FROM unnest(%s::text[], %s::bigint[]) AS u(k, v) "
                f"ON CONFLICT (name, key) DO UPDATE SET value = t.value + EXCLUDED.value",
                (self._name, keys[i : i + UPSERT_CHUNK], values[i : i + UPSERT_CHUNK]),
            )
        return len(new_ids)

    def apply(self, summaries: Sequence[Summary]) -> Deferred:
        """One transaction; fires with the number of batches that were new."""
        d = self._pool.runInteraction(self._apply, summaries)

        def ready(n: int) -> int:
            self._schema_ready = True
            return n

        return d.addCallback(ready)

    def prune(self) -> Deferred:
        """Delete applied-batch ids older than `APPLIED_RETENTION`."""
        return self._pool.runOperation(
            f"DELETE FROM {self._table}_batches WHERE name = %s AND applied_at < now() - interval '{APPLIED_RETENTION}'",
            (self._name,),
        )

    def close(self) -> None:
        """Close the pool's connections (stops its threads)."""
        self._pool.close()
