"""The PostgreSQL sink: summaries of applied batches, exactly once per batch.

One transaction per chunk of queued summaries (psycopg 3, one connection
on one thread per counter per process)::

    INSERT INTO <table>_batches (name, batch) SELECT $name, unnest($ids)
        ON CONFLICT DO NOTHING RETURNING batch          -- which are new?
    CREATE TEMP TABLE relayd_counter_stage (key text, value bigint) ON COMMIT DROP
    COPY relayd_counter_stage FROM STDIN (FORMAT BINARY) -- the new batches' sums
    INSERT INTO <table> AS t (name, key, value)
        SELECT $name, key, value FROM relayd_counter_stage ORDER BY key
        ON CONFLICT (name, key) DO UPDATE SET value = t.value + EXCLUDED.value
    COMMIT

Only after COMMIT does the flusher remove the summaries from Redis
(work_queue.trim_pending), so a crash or a lost COMMIT reply replays them
and the ``_batches`` rows make the replay a no-op.  Keys are upserted in
sorted order (``ORDER BY key``): concurrent transactions (several
processes, several hosts) lock rows in the same order and cannot deadlock,
the seed's postmortem bug.

Why COPY into a staging table rather than ``unnest`` of array parameters:
for 100k keys, adapting and shipping two 100k-element arrays cost the
client ~0.16 s of CPU and the server as much again to parse them; binary
COPY costs ~0.02 s on each side (bench/counters_bench.py, docs/counters.md).
The staging table is created per transaction (``ON COMMIT DROP``), so it
works through transaction-pooling proxies and after reconnects; the upsert
is then one statement however many keys there are.  The table is created
with ``fillfactor = 70``: an update-heavy table whose rows keep free room
in their page gets HOT updates (no new index entry per update), which cut
the server's CPU per 100k updated keys from ~0.75 s to ~0.5 s here.

``_batches`` rows are pruned after `APPLIED_RETENTION` (a day): a summary
is removed from Redis seconds after its COMMIT, so a replay older than a
day cannot happen unless Redis lost writes.

Why psycopg 3 on one dedicated thread (Twisted's `deferToThreadPool`)
rather than `adbapi`: psycopg is the maintained PostgreSQL driver (binary
wheels, native arrays, binary COPY); adbapi would run it the same way but
logs a traceback ("Rollback failed") for every transaction cut by a lost
connection, so a PostgreSQL restart would fill the log, and it adds a
``select 1`` round trip to each rollback.  Here one connection lives on one
thread per counter: opened on first use, closed and reopened after any
error.  Async-native drivers (asyncpg) need an asyncio loop next to the
reactor; txpostgres is unmaintained.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from relayd.counters.summary import Summary

#: The per-transaction staging table the sums are COPYed into.
STAGE_TABLE = "relayd_counter_stage"
#: Free room left in each page of the counters table (see the module docstring).
FILLFACTOR = 70
#: How long applied-batch ids are kept (see the module docstring).
APPLIED_RETENTION = "1 day"
#: Seconds libpq waits for a connection (PostgreSQL down must fail fast).
CONNECT_TIMEOUT = 5


def ddl(table: str) -> List[str]:
    """The DDL relayd runs at start (idempotent); documented in docs/counters.md."""
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (name text NOT NULL, key text NOT NULL, "
        f"value bigint NOT NULL, PRIMARY KEY (name, key)) WITH (fillfactor = {FILLFACTOR})",
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


    def __init__(self, reactor: IReactorFromThreads, url: str, name: str, table: str) -> None:
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
        if keys:
            cursor.execute(f"CREATE TEMP TABLE {STAGE_TABLE} (key text, value bigint) ON COMMIT DROP")
            with cursor.copy(f"COPY {STAGE_TABLE} (key, value) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int8"])
                write_row = copy.write_row
                for row in zip(keys, values):
                    write_row(row)
            cursor.execute(
                f"INSERT INTO {self._table} AS t (name, key, value) "
                f"SELECT %s, key, value FROM {STAGE_TABLE} ORDER BY key "
                f"ON CONFLICT (name, key) DO UPDATE SET value = t.value + EXCLUDED.value",
                (self._name,),
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

    def _run(self, work: Callable[[Any], Any]) -> Deferred[Any]:
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, self._transaction, work)

    def apply(self, summaries: Sequence[Summary]) -> Deferred[int]:
        """One transaction; fires with the number of batches that were new."""

        def ready(n: int) -> int:
            self._schema_ready = True
            return n

        return self._run(lambda cursor: self._apply(cursor, summaries)).addCallback(ready)

    def prune(self) -> Deferred[Any]:
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
