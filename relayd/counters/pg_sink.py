"""The PostgreSQL sink: summaries of applied batches, exactly once per batch.

One transaction per chunk of queued summaries (psycopg 3, one connection
on one thread per counter per process)::

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

Why psycopg 3 on one dedicated thread (Twisted's `deferToThreadPool`)
rather than `adbapi`: psycopg is the maintained PostgreSQL driver (binary
wheels, native arrays); adbapi would run it the same way but logs a
traceback ("Rollback failed") for every transaction cut by a lost
connection, so a PostgreSQL restart would fill the log, and it adds a
``select 1`` round trip to each rollback.  Here one connection lives on one
thread per counter: opened on first use, closed and reopened after any
error.  Async-native drivers (asyncpg) need an asyncio loop next to the
reactor; txpostgres is unmaintained.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

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


    def __init__(self, reactor: Any, url: str, name: str, table: str) -> None:
        self._reactor = reactor
        self._url = url
        self._name = name
        self._table = table
        self._pool = ThreadPool(1, 1, name=f"relayd-pg-{name}")
        self._conn: Any = None  # used on the pool's thread only
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

    def _transaction(self, work: Callable[[Any], Any]) -> Any:
        """On the pool's thread: run `work(cursor)` in one transaction (COMMIT on return)."""
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self._url, connect_timeout=CONNECT_TIMEOUT)
            with self._conn.transaction(), self._conn.cursor() as cursor:
                return work(cursor)
        except BaseException:
            conn, self._conn = self._conn, None  # a failed transaction: start afresh next time
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - already broken
                    pass
            raise

    def _run(self, work: Callable[[Any], Any]) -> Deferred:
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, self._transaction, work)

    def apply(self, summaries: Sequence[Summary]) -> Deferred:
        """One transaction; fires with the number of batches that were new."""

        def ready(n: int) -> int:
            self._schema_ready = True
            return n

        return self._run(lambda cursor: self._apply(cursor, summaries)).addCallback(ready)

    def prune(self) -> Deferred:
        """Delete applied-batch ids older than `APPLIED_RETENTION`."""
        return self._run(
            lambda cursor: cursor.execute(
                f"DELETE FROM {self._table}_batches WHERE name = %s "
                f"AND applied_at < now() - interval '{APPLIED_RETENTION}'",
                (self._name,),
            )
        )

    def close(self) -> None:
        """Close the connection and stop the thread (waits for a transaction in progress)."""
        if self._pool.started:
            self._pool.callInThread(self._close_conn)
            self._pool.stop()

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
